//! `ironlun ctl port-group [ID STATE] [--json]`: ALUA target port groups (SPC-4 §5.16) of a
//! running daemon, through `GET /v1/port-groups` and `PUT /v1/port-groups/<id>`.

use crate::ctl::{Client, CtlError};
use ironlun_api::{PortGroupJson, PortGroupsJson};
use std::io::Write;

/// `ironlun ctl port-group [ID STATE] [--json]`: set group `ID` to `STATE` when given, then
/// list every group.
pub fn ctl(
    client: &Client,
    set: Option<(u16, String)>,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), CtlError> {
    if let Some((id, state)) = set {
        let body = serde_json::json!({ "state": state });
        let _: PortGroupJson = crate::ctl::call_json(
            client,
            "PUT",
            &format!("/v1/port-groups/{id}"),
            Some(&body),
            crate::ctl::RESPONSE_TIMEOUT,
        )?;
    }
    let text = if json {
        let v: serde_json::Value = client.get_json("/v1/port-groups")?;
        let mut s = serde_json::to_string_pretty(&v)
            .map_err(|e| CtlError(format!("cannot encode JSON: {e}")))?;
        s.push('\n');
        s
    } else {
        render(&client.get_json::<PortGroupsJson>("/v1/port-groups")?)
    };
    out.write_all(text.as_bytes())
        .map_err(|e| CtlError(format!("cannot write output: {e}")))
}

/// The group table: id, access state, portal group tags, changed since start.
pub fn render(groups: &PortGroupsJson) -> String {
    if groups.groups.is_empty() {
        return "no port groups\n".to_string();
    }
    let rows: Vec<Vec<String>> = groups
        .groups
        .iter()
        .map(|g| {
            let tpgts: Vec<String> = g.tpgts.iter().map(u16::to_string).collect();
            vec![
                g.id.to_string(),
                g.state.clone(),
                if tpgts.is_empty() {
                    "-".to_string()
                } else {
                    tpgts.join(",")
                },
                if g.changed { "yes" } else { "no" }.to_string(),
            ]
        })
        .collect();
    crate::table::render(0, &["GROUP", "STATE", "TPGTS", "CHANGED"], &rows)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn renders_groups() {
        let g = PortGroupsJson {
            groups: vec![
                PortGroupJson {
                    id: 1,
                    state: "active_optimized".into(),
                    tpgts: vec![1, 3],
                    changed: false,
                },
                PortGroupJson {
                    id: 2,
                    state: "standby".into(),
                    tpgts: vec![2],
                    changed: true,
                },
            ],
        };
        assert_eq!(
            render(&g),
            "GROUP  STATE             TPGTS  CHANGED\n\
             1      active_optimized  1,3    no\n\
             2      standby           2      yes\n"
        );
        assert_eq!(
            render(&PortGroupsJson { groups: vec![] }),
            "no port groups\n"
        );
    }
}
