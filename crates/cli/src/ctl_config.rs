//! `ironlun ctl lun list|add|remove|resize` and `ironlun ctl reload`: the client side of live
//! reconfiguration (`ironlun::reconfig` in the daemon). Text output is a table or one line per change;
//! `--json` prints the admin API's JSON.

use crate::ctl::{call_json, Client, CtlError, RESPONSE_TIMEOUT};
use ironlun_api::percent_encode;
use ironlun_api::{ChangeJson, LunsJson};
use std::io::Write;

fn write(out: &mut dyn Write, text: &str) -> Result<(), CtlError> {
    out.write_all(text.as_bytes())
        .map_err(|e| CtlError(format!("cannot write output: {e}")))
}

fn write_json<T: serde::Serialize>(out: &mut dyn Write, v: &T) -> Result<(), CtlError> {
    let mut s = serde_json::to_string_pretty(v)
        .map_err(|e| CtlError(format!("cannot encode JSON: {e}")))?;
    s.push('\n');
    write(out, &s)
}

/// A size as the config writes it (`512M`, `10GiB`, bytes), checked before it is sent.
pub fn check_size(s: &str) -> Result<(), CtlError> {
    ironlun_api::parse_size_text(s)
        .map(|_| ())
        .map_err(|e| CtlError(format!("size {s:?}: {e}")))
}

/// The lines of a change: what was applied, what needs a restart, where it was saved.
pub fn render_change(c: &ChangeJson) -> String {
    let mut s = String::new();
    for a in &c.applied {
        s.push_str(&format!("applied: {a}\n"));
    }
    if c.applied.is_empty() {
        s.push_str("nothing to apply\n");
    }
    for r in &c.needs_restart {
        s.push_str(&format!("needs restart: {r}\n"));
    }
    match (&c.path, c.saved) {
        (Some(p), true) => s.push_str(&format!("saved to {p}\n")),
        (Some(p), false) => s.push_str(&format!("read from {p}\n")),
        (None, _) => s.push_str("not saved: the daemon runs without a config file\n"),
    }
    s
}

fn change(
    client: &Client,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), CtlError> {
    let c: ChangeJson = call_json(client, method, path, body, RESPONSE_TIMEOUT)?;
    if json {
        write_json(out, &c)
    } else {
        write(out, &render_change(&c))
    }
}

/// `ctl lun list`.
pub fn list(client: &Client, json: bool, out: &mut dyn Write) -> Result<(), CtlError> {
    let l: LunsJson = client.get_json("/v1/luns")?;
    if json {
        return write_json(out, &l);
    }
    let rows: Vec<Vec<String>> = l
        .luns
        .iter()
        .map(|x| {
            vec![
                x.target.clone(),
                x.lun.to_string(),
                x.backstore.clone(),
                human_size(x.size),
                x.block_size.to_string(),
                if x.offline { "offline" } else { "online" }.to_string(),
            ]
        })
        .collect();
    write(
        out,
        &crate::table::render(
            0,
            &["TARGET", "LUN", "BACKSTORE", "SIZE", "BLOCK", "STATE"],
            &rows,
        ),
    )
}

/// `bytes` in the largest binary unit that divides it exactly (`1 GiB`, `512 MiB`), else
/// in bytes: the table never rounds a size (`--json` has the byte count).
pub fn human_size(bytes: u64) -> String {
    const UNITS: [(u64, &str); 4] = [
        (1 << 40, "TiB"),
        (1 << 30, "GiB"),
        (1 << 20, "MiB"),
        (1 << 10, "KiB"),
    ];
    UNITS
        .iter()
        .find(|(u, _)| bytes >= *u && bytes.is_multiple_of(*u))
        .map_or_else(
            || format!("{bytes} B"),
            |(u, name)| format!("{} {name}", bytes / u),
        )
}

/// What `ctl lun add` sends.
pub struct AddArgs {
    pub backstore: String,
    pub size: Option<String>,
    pub path: Option<String>,
    pub block_size: Option<u32>,
}

/// `ctl lun add TARGET/LUN --backstore KIND [--size S] [--path P] [--block-size N]`.
pub fn add(
    client: &Client,
    lu: &(String, u64),
    a: &AddArgs,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), CtlError> {
    if let Some(s) = &a.size {
        check_size(s)?;
    }
    let body = serde_json::to_value(ironlun_api::LunRequest {
        id: lu.1,
        backstore: a.backstore.clone(),
        size: a.size.clone().map(ironlun_api::SizeArg::Text),
        path: a.path.clone(),
        block_size: a.block_size,
    })
    .map_err(|e| CtlError(format!("cannot encode JSON: {e}")))?;
    let path = format!("/v1/targets/{}/luns", percent_encode(&lu.0));
    change(client, "POST", &path, Some(&body), json, out)
}

/// `ctl lun remove TARGET/LUN`.
pub fn remove(
    client: &Client,
    lu: &(String, u64),
    json: bool,
    out: &mut dyn Write,
) -> Result<(), CtlError> {
    let path = format!("/v1/targets/{}/luns/{}", percent_encode(&lu.0), lu.1);
    change(client, "DELETE", &path, None, json, out)
}

/// `ctl lun resize TARGET/LUN SIZE` (grow only).
pub fn resize(
    client: &Client,
    lu: &(String, u64),
    size: &str,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), CtlError> {
    check_size(size)?;
    let path = format!("/v1/luns/{}/{}/resize", percent_encode(&lu.0), lu.1);
    let body = serde_json::json!({ "size": size });
    change(client, "POST", &path, Some(&body), json, out)
}

/// `ctl lun offline|online TARGET/LUN`.
pub fn set_offline(
    client: &Client,
    lu: &(String, u64),
    offline: bool,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), CtlError> {
    let op = if offline { "offline" } else { "online" };
    let path = format!("/v1/luns/{}/{}/{op}", percent_encode(&lu.0), lu.1);
    change(client, "POST", &path, None, json, out)
}

/// `ctl target list`.
pub fn target_list(client: &Client, json: bool, out: &mut dyn Write) -> Result<(), CtlError> {
    let t: ironlun_api::TargetsJson = client.get_json("/v1/targets")?;
    if json {
        return write_json(out, &t);
    }
    let rows: Vec<Vec<String>> = t
        .targets
        .iter()
        .map(|x| {
            let luns: Vec<String> = x.luns.iter().map(u64::to_string).collect();
            vec![
                x.name.clone(),
                luns.join(","),
                x.allowed_initiators
                    .as_ref()
                    .map_or_else(|| "*".to_string(), |a| a.join(",")),
                if x.chap { "yes" } else { "no" }.to_string(),
            ]
        })
        .collect();
    write(
        out,
        &crate::table::render(0, &["TARGET", "LUNS", "ALLOWED", "CHAP"], &rows),
    )
}

/// `ctl target add|remove NAME`: a target added has no LUNs until `ctl lun add`; a target
/// removed closes its sessions.
pub fn target_change(
    client: &Client,
    name: &str,
    add: bool,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), CtlError> {
    if add {
        let body = serde_json::json!({ "name": name });
        change(client, "POST", "/v1/targets", Some(&body), json, out)
    } else {
        let path = format!("/v1/targets/{}", percent_encode(name));
        change(client, "DELETE", &path, None, json, out)
    }
}

/// `ctl portal list`.
pub fn portal_list(client: &Client, json: bool, out: &mut dyn Write) -> Result<(), CtlError> {
    let p: ironlun_api::PortalsJson = client.get_json("/v1/portals")?;
    if json {
        return write_json(out, &p);
    }
    let rows: Vec<Vec<String>> = p
        .portals
        .iter()
        .map(|x| vec![x.listen.clone(), x.tpgt.to_string(), x.bound.clone()])
        .collect();
    write(
        out,
        &crate::table::render(0, &["LISTEN", "TPGT", "BOUND"], &rows),
    )
}

/// `ctl portal add ADDR [--tpgt N]`.
pub fn portal_add(
    client: &Client,
    listen: std::net::SocketAddr,
    tpgt: Option<u16>,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), CtlError> {
    let body = serde_json::to_value(ironlun_api::PortalRequest { listen, tpgt })
        .map_err(|e| CtlError(format!("cannot encode JSON: {e}")))?;
    change(client, "POST", "/v1/portals", Some(&body), json, out)
}

/// `ctl portal remove ADDR`: stops accepting there; its connections keep running.
pub fn portal_remove(
    client: &Client,
    listen: std::net::SocketAddr,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), CtlError> {
    let path = format!("/v1/portals/{}", percent_encode(&listen.to_string()));
    change(client, "DELETE", &path, None, json, out)
}

/// `ctl acl list TARGET`.
pub fn acl_list(
    client: &Client,
    target: &str,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), CtlError> {
    let t: ironlun_api::TargetJson =
        client.get_json(&format!("/v1/targets/{}/acl", percent_encode(target)))?;
    if json {
        return write_json(out, &t);
    }
    let rows: Vec<Vec<String>> = match &t.allowed_initiators {
        None => vec![vec!["* (no ACL: every initiator)".to_string()]],
        Some(a) => a.iter().map(|i| vec![i.clone()]).collect(),
    };
    write(out, &crate::table::render(0, &["ALLOWED INITIATOR"], &rows))
}

/// `ctl acl add|remove TARGET INITIATOR`.
pub fn acl_change(
    client: &Client,
    target: &str,
    initiator: &str,
    add: bool,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), CtlError> {
    if add {
        let path = format!("/v1/targets/{}/acl", percent_encode(target));
        let body = serde_json::json!({ "initiator": initiator });
        change(client, "POST", &path, Some(&body), json, out)
    } else {
        let path = format!(
            "/v1/targets/{}/acl/{}",
            percent_encode(target),
            percent_encode(initiator)
        );
        change(client, "DELETE", &path, None, json, out)
    }
}

/// `ctl reload`: the daemon re-reads its config file (as on SIGHUP).
pub fn reload(client: &Client, json: bool, out: &mut dyn Write) -> Result<(), CtlError> {
    change(client, "POST", "/v1/reload", None, json, out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn sizes_in_the_table_are_exact() {
        assert_eq!(human_size(1 << 30), "1 GiB");
        assert_eq!(human_size(3 << 29), "1536 MiB");
        assert_eq!(human_size(2 << 40), "2 TiB");
        assert_eq!(human_size(4096), "4 KiB");
        assert_eq!(human_size(1000), "1000 B");
        assert_eq!(human_size(0), "0 B");
    }

    #[test]
    fn sizes_are_checked_before_sending() {
        assert!(check_size("512M").is_ok());
        assert!(check_size("10GiB").is_ok());
        let e = check_size("12 parsecs").unwrap_err();
        assert!(e.0.contains("12 parsecs"), "{}", e.0);
    }

    #[test]
    fn change_lines() {
        let c = ChangeJson {
            applied: vec!["target t LUN 1: added".into()],
            needs_restart: vec!["[limits]".into()],
            saved: true,
            path: Some("/etc/ironlun.toml".into()),
        };
        assert_eq!(
            render_change(&c),
            "applied: target t LUN 1: added\nneeds restart: [limits]\nsaved to /etc/ironlun.toml\n"
        );
        let c = ChangeJson::default();
        assert_eq!(
            render_change(&c),
            "nothing to apply\nnot saved: the daemon runs without a config file\n"
        );
    }
}
