//! Live reconfiguration (`ironlun ctl target|lun|portal|acl|config`): the targets, LUNs,
//! portals and ACL entries of the running config, and the result of a change.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

/// The result of a change, as the admin API reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeJson {
    /// What was applied, one line each.
    pub applied: Vec<String>,
    /// What differs but needs a restart (left as it is).
    pub needs_restart: Vec<String>,
    /// The config file was written.
    pub saved: bool,
    /// The config file, if the daemon has one.
    pub path: Option<String>,
}

/// A LUN to add (`POST /v1/targets/<iqn>/luns`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LunRequest {
    pub id: u64,
    /// `ram`, `file`, `uring`, `vhd` or `block` (`rbd` LUNs come from the config file: the
    /// request has no pool or image).
    pub backstore: String,
    /// Bytes or with a unit (`512M`, `10GiB`).
    #[serde(default)]
    pub size: Option<SizeArg>,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub block_size: Option<u32>,
}

/// A size as bytes or text with a unit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SizeArg {
    Bytes(u64),
    Text(String),
}

impl SizeArg {
    pub fn bytes(&self) -> Result<u64, String> {
        match self {
            SizeArg::Bytes(b) => Ok(*b),
            SizeArg::Text(t) => parse_size_text(t),
        }
    }
}

/// `POST /v1/luns/<iqn>/<lun>/resize`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResizeRequest {
    pub size: SizeArg,
}

/// `POST /v1/targets`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetRequest {
    pub name: String,
}

/// One target of `GET /v1/targets`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetJson {
    pub name: String,
    pub luns: Vec<u64>,
    /// `None`: every initiator is allowed.
    pub allowed_initiators: Option<Vec<String>>,
    pub chap: bool,
}

/// `GET /v1/targets`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetsJson {
    pub targets: Vec<TargetJson>,
}

/// One portal of `GET /v1/portals`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortalJson {
    /// As configured.
    pub listen: String,
    pub tpgt: u16,
    /// The bound address.
    pub bound: String,
}

/// `GET /v1/portals`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortalsJson {
    pub portals: Vec<PortalJson>,
}

/// `POST /v1/portals`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortalRequest {
    pub listen: SocketAddr,
    #[serde(default)]
    pub tpgt: Option<u16>,
}

/// `POST /v1/targets/<iqn>/acl`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AclRequest {
    pub initiator: String,
}

/// One LUN of `GET /v1/luns`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LunJson {
    pub target: String,
    pub lun: u64,
    pub backstore: String,
    pub size: u64,
    pub block_size: u32,
    /// Taken offline through the admin API.
    pub offline: bool,
}

/// `GET /v1/luns`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LunsJson {
    pub luns: Vec<LunJson>,
}

/// `GET /v1/config`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigJson {
    /// The config file; `None` with the embedded default.
    pub path: Option<String>,
    /// The running config text.
    pub toml: String,
}

/// A size as the config and the API write it: bytes, or a number with a binary unit
/// (`B`, `K`/`KiB`, `M`/`MiB`, `G`/`GiB`, `T`/`TiB`).
pub fn parse_size_text(t: &str) -> Result<u64, String> {
    let t = t.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("cannot read size {t:?}"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        "TiB" | "T" => 1 << 40,
        u => return Err(format!("unknown unit {u:?}; use B, KiB, MiB, GiB or TiB")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {t:?} overflows"))
}
