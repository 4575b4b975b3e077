//! The admin API's wire contract (`/v1`): every JSON body the daemon's admin server sends or
//! accepts, the paths' percent-encoding, and the constants a client needs to time its calls.
//! The daemon (`ironlun::admin`) and the client (`ironlun-cli`, `ironlun ctl`) both use these
//! types and nothing else of each other. Serde only: no runtime, no I/O.
//!
//! Endpoints (all answering `application/json`):
//! - `GET /v1/health` → [`Health`];
//! - `GET /v1/reservations` → [`ReservationsList`]; `GET /v1/reservations/<target>/<lun>` →
//!   [`LuReservations`] (404 when unknown);
//! - `GET /v1/luns/<target>/<lun>/ownership` → [`OwnershipJson`];
//!   `POST …/owner` [`OwnerRequest`] → [`OwnerJson`];
//!   `POST …/handover/prepare|commit|abort` [`HandoverRequest`] → [`PrepareJson`],
//!   [`CommitJson`], [`OwnerJson`] (semantics.md §3);
//! - `GET /v1/events?since=SEQ` → [`EventsJson`];
//! - `GET /v1/port-groups` → [`PortGroupsJson`]; `PUT /v1/port-groups/<id>` [`PortGroupRequest`];
//! - `GET /v1/cluster` → [`ClusterJson`]; `PUT /v1/cluster/luns/<target>/<lun>/active`
//!   [`ActiveRequest`] → [`ClusterLunJson`] (cluster mode; 404 on one node);
//! - `GET /v1/targets|luns|portals|config`, and the changes of [`config`] → [`ChangeJson`].
//!
//! Errors are [`ErrorJson`] with a 4xx/5xx status.

pub mod auth;
pub mod cluster;
pub mod config;
pub mod events;
pub mod ownership;
pub mod port_groups;
pub mod reservations;

pub use auth::*;
pub use cluster::*;
pub use config::*;
pub use events::*;
pub use ownership::*;
pub use port_groups::*;
pub use reservations::*;

use serde::{Deserialize, Serialize};

/// `GET /v1/health`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    pub status: String,
    pub version: String,
}

/// `{"error": "…", "code": "…"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorJson {
    pub error: String,
    /// Machine-readable reason (e.g. `not_owner`, `stale_epoch`, `not_found`).
    #[serde(default)]
    pub code: String,
}

/// Decode `%XX` escapes of one path segment; `None` for a bad escape or non-UTF-8 result.
pub fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0usize;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hex = bytes.get(i.checked_add(1)?..i.checked_add(3)?)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i = i.checked_add(3)?;
        } else {
            out.push(b);
            i = i.checked_add(1)?;
        }
    }
    String::from_utf8(out).ok()
}

/// Percent-encode a path segment: everything but unreserved characters and `:` (RFC 3986
/// §3.3 allows `:` in a segment; iSCSI names are full of it).
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~:".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_coding_round_trips() {
        for s in ["iqn.2026-11.io.ironlun:lab", "a b/c%d", "é"] {
            assert_eq!(percent_decode(&percent_encode(s)).as_deref(), Some(s));
        }
        assert_eq!(percent_encode("a b/c"), "a%20b%2Fc");
        assert_eq!(percent_decode("%"), None);
        assert_eq!(percent_decode("%4"), None);
        assert_eq!(percent_decode("%ff"), None); // not UTF-8
    }
}
