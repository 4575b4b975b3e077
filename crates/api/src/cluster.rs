//! Cluster mode (issue 18): `GET /v1/cluster` → [`ClusterJson`];
//! `PUT /v1/cluster/luns/<target>/<lun>/active` [`ActiveRequest`] → [`ClusterLunJson`].

use serde::{Deserialize, Serialize};

/// One gateway of the layout as etcd sees it now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayJson {
    /// Its id (position in `[cluster] gateways`, from 1; also its ALUA target port group).
    pub id: u32,
    pub name: String,
    /// Its TPGTs (relative target port identifiers).
    pub tpgts: Vec<u16>,
    /// Its member key exists (it holds a live lease).
    pub live: bool,
    /// The lease id, hex, while live.
    pub lease: Option<String>,
    /// Seconds left on the lease as etcd counts them, while live.
    pub ttl_seconds: Option<i64>,
}

/// One LU's cluster state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterLunJson {
    pub target: String,
    pub lun: u64,
    pub serial: String,
    /// The active/optimized gateway's name (`None` until the key exists).
    pub active: Option<String>,
    /// This gateway's replica is current and serves I/O.
    pub serving: bool,
    /// PRgeneration of this gateway's replica.
    pub generation: u32,
}

/// `GET /v1/cluster`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterJson {
    pub cluster: String,
    /// The gateway that answered.
    pub gateway: String,
    pub gateways: Vec<GatewayJson>,
    pub luns: Vec<ClusterLunJson>,
}

/// The body of `PUT /v1/cluster/luns/<target>/<lun>/active`: the gateway to make active.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActiveRequest {
    pub gateway: String,
}
