//! `ironlun ctl cluster [--json]` and `ironlun ctl cluster move TARGET LUN GATEWAY`: the
//! gateways of a cluster with their leases, and each LU's active gateway (issue 18), through
//! `GET /v1/cluster` and `PUT /v1/cluster/luns/<target>/<lun>/active`.

use crate::ctl::{Client, CtlError};
use ironlun_api::{ClusterJson, ClusterLunJson};
use std::io::Write;

/// `ironlun ctl cluster`: move LU `(target, lun)` to `gateway` first when given, then show
/// the cluster.
pub fn ctl(
    client: &Client,
    mv: Option<(String, u64, String)>,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), CtlError> {
    if let Some((target, lun, gateway)) = mv {
        let body = serde_json::json!({ "gateway": gateway });
        let _: ClusterLunJson = crate::ctl::call_json(
            client,
            "PUT",
            &format!(
                "/v1/cluster/luns/{}/{lun}/active",
                ironlun_api::percent_encode(&target)
            ),
            Some(&body),
            crate::ctl::RESPONSE_TIMEOUT,
        )?;
    }
    let text = if json {
        let v: serde_json::Value = client.get_json("/v1/cluster")?;
        let mut s = serde_json::to_string_pretty(&v)
            .map_err(|e| CtlError(format!("cannot encode JSON: {e}")))?;
        s.push('\n');
        s
    } else {
        render(&client.get_json::<ClusterJson>("/v1/cluster")?)
    };
    out.write_all(text.as_bytes())
        .map_err(|e| CtlError(format!("cannot write output: {e}")))
}

/// Two tables: the gateways (id, name, TPGTs, lease, seconds left), then each LU with its
/// active gateway and whether the answering gateway serves it.
pub fn render(c: &ClusterJson) -> String {
    let gws: Vec<Vec<String>> = c
        .gateways
        .iter()
        .map(|g| {
            let tpgts: Vec<String> = g.tpgts.iter().map(u16::to_string).collect();
            vec![
                g.id.to_string(),
                if g.name == c.gateway {
                    format!("{} *", g.name)
                } else {
                    g.name.clone()
                },
                tpgts.join(","),
                if g.live { "live" } else { "gone" }.to_string(),
                g.lease.clone().unwrap_or_else(|| "-".into()),
                g.ttl_seconds
                    .map_or_else(|| "-".into(), |t| format!("{t}s")),
            ]
        })
        .collect();
    let luns: Vec<Vec<String>> = c
        .luns
        .iter()
        .map(|l| {
            vec![
                l.target.clone(),
                l.lun.to_string(),
                l.active.clone().unwrap_or_else(|| "-".into()),
                if l.serving { "yes" } else { "no" }.to_string(),
                l.generation.to_string(),
            ]
        })
        .collect();
    format!(
        "cluster {} (answered by {})\n{}\n{}",
        c.cluster,
        c.gateway,
        crate::table::render(
            0,
            &["ID", "GATEWAY", "TPGTS", "STATE", "LEASE", "TTL"],
            &gws
        ),
        crate::table::render(0, &["TARGET", "LUN", "ACTIVE", "SERVING", "PRGEN"], &luns),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use ironlun_api::GatewayJson;

    #[test]
    fn renders_gateways_and_luns() {
        let c = ClusterJson {
            cluster: "lab".into(),
            gateway: "gw-a".into(),
            gateways: vec![
                GatewayJson {
                    id: 1,
                    name: "gw-a".into(),
                    tpgts: vec![1],
                    live: true,
                    lease: Some("694d".into()),
                    ttl_seconds: Some(4),
                },
                GatewayJson {
                    id: 2,
                    name: "gw-b".into(),
                    tpgts: vec![2, 3],
                    live: false,
                    lease: None,
                    ttl_seconds: None,
                },
            ],
            luns: vec![ClusterLunJson {
                target: "iqn.2026-11.io.ironlun:lab".into(),
                lun: 0,
                serial: "s".into(),
                active: Some("gw-a".into()),
                serving: true,
                generation: 3,
            }],
        };
        let text = render(&c);
        assert!(
            text.starts_with("cluster lab (answered by gw-a)\n"),
            "{text}"
        );
        assert!(text.contains("gw-a *"), "{text}");
        assert!(text.contains("2,3"), "{text}");
        assert!(text.contains("gone"), "{text}");
        assert!(text.contains("iqn.2026-11.io.ironlun:lab"), "{text}");
    }
}
