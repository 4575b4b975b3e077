//! ALUA target port groups at run time (SPC-4 §5.16, implicit ALUA): the admin API's
//! `GET /v1/port-groups` and `PUT /v1/port-groups/<id>` `{"state": "standby"}`, and their
//! client `ironlun ctl port-group [ID STATE] [--json]`.
//!
//! A state change applies to every LU of every target at once; each LU raises ASYMMETRIC
//! ACCESS STATE CHANGED (2Ah/06h) on its I_T nexuses and from then on answers commands that
//! arrive through the group's ports as the state requires.

use crate::admin::Response;
use crate::ctl::{Client, CtlError};
use crate::target::Registry;
use ironlun_scsi::alua::{AccessState, PortGroups, ALL_STATES};
use serde::{Deserialize, Serialize};
use std::io::Write;

/// One target port group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortGroupJson {
    pub id: u16,
    /// [`AccessState::name`]: `active_optimized`, `active_non_optimized`, `standby`,
    /// `unavailable` or `transitioning`.
    pub state: String,
    /// The portal group tags (relative target port identifiers) of its portals.
    pub tpgts: Vec<u16>,
    /// The state was changed since the daemon started (RTPG STATUS CODE 02h).
    pub changed: bool,
}

/// `GET /v1/port-groups`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortGroupsJson {
    pub groups: Vec<PortGroupJson>,
}

/// The body of `PUT /v1/port-groups/<id>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortGroupRequest {
    pub state: String,
}

fn to_json(groups: &PortGroups) -> PortGroupsJson {
    PortGroupsJson {
        groups: groups
            .groups()
            .iter()
            .map(|g| PortGroupJson {
                id: g.id,
                state: g.state.name().to_string(),
                tpgts: g.ports.clone(),
                changed: g.changed,
            })
            .collect(),
    }
}

fn json<T: Serialize>(v: &T) -> Response {
    match serde_json::to_vec_pretty(v) {
        Ok(mut body) => {
            body.push(b'\n');
            Response {
                status: 200,
                body,
                allow: "GET",
                content_type: crate::admin::JSON,
            }
        }
        Err(e) => Response::error(500, &format!("cannot encode JSON: {e}")),
    }
}

/// `GET /v1/port-groups` → [`PortGroupsJson`].
pub fn get(registry: &Registry) -> Response {
    json(&to_json(&registry.port_groups()))
}

/// `PUT /v1/port-groups/<id>` with [`PortGroupRequest`] → the group as [`PortGroupJson`];
/// 400 `bad_state` for an unknown state, 404 for an unknown group.
pub fn put(registry: &Registry, id: &str, body: &[u8]) -> Response {
    let Some(id) = id.parse::<u16>().ok().filter(|i| *i != 0) else {
        return Response::error(404, &format!("no such port group: {id:?}"));
    };
    let req: PortGroupRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return Response::error_code(400, "bad_request", &format!("request body: {e}")),
    };
    let Some(state) = AccessState::from_name(&req.state) else {
        let names: Vec<&str> = ALL_STATES.iter().map(|s| s.name()).collect();
        return Response::error_code(
            400,
            "bad_state",
            &format!(
                "state {:?}: expected one of {}",
                req.state,
                names.join(", ")
            ),
        );
    };
    if let Err(e) = registry.set_port_group_state(id, state) {
        return Response::error(404, &e.to_string());
    }
    let all = to_json(&registry.port_groups());
    match all.groups.into_iter().find(|g| g.id == id) {
        Some(g) => json(&g),
        None => Response::error(404, &format!("no port group {id}")),
    }
}

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
