//! ALUA target port groups (SPC-4 §5.16): `GET /v1/port-groups`, `PUT /v1/port-groups/<id>`.

use serde::{Deserialize, Serialize};

/// One target port group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortGroupJson {
    pub id: u16,
    /// The access state (SPC-4 §6.37): `active_optimized`, `active_non_optimized`, `standby`,
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
