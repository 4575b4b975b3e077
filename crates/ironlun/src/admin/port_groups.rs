//! ALUA target port groups at run time (SPC-4 §5.16, implicit ALUA): the admin API's
//! `GET /v1/port-groups` and `PUT /v1/port-groups/<id>` `{"state": "standby"}` (client:
//! `ironlun ctl port-group`, in `ironlun-cli`). The state itself lives in the
//! [`Registry`]'s LUs.
//!
//! A state change applies to every LU of every target at once; each LU raises ASYMMETRIC
//! ACCESS STATE CHANGED (2Ah/06h) on its I_T nexuses and from then on answers commands that
//! arrive through the group's ports as the state requires.

use super::Response;
use crate::target::Registry;
use ironlun_api::{PortGroupJson, PortGroupRequest, PortGroupsJson};
use ironlun_scsi::alua::{AccessState, PortGroups, ALL_STATES};
use serde::Serialize;

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
                content_type: super::JSON,
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
