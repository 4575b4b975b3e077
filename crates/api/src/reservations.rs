//! The reservation state of LUs: `GET /v1/reservations[/<target>/<lun>]` (SPC-4 §5.13, as
//! PERSISTENT RESERVE IN READ FULL STATUS reports it, plus the SPC-2 holder and APTPL).

use crate::ownership::HandoverJson;
use serde::{Deserialize, Serialize};

/// `GET /v1/reservations`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReservationsList {
    pub luns: Vec<LuReservations>,
}

/// The reservation state of one LU (SPC-4 §5.13; what PERSISTENT RESERVE IN READ FULL STATUS
/// reports, plus the SPC-2 holder and APTPL).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LuReservations {
    pub target: String,
    pub lun: u64,
    /// PRgeneration (SPC-4 §6.15.2).
    pub generation: u32,
    /// Activate Persist Through Power Loss (SPC-4 §5.13.5).
    pub aptpl: bool,
    pub reservation: Option<ReservationJson>,
    pub registrations: Vec<RegistrationJson>,
    /// Initiator port holding an SPC-2 RESERVE(6/10) reservation.
    pub spc2_holder: Option<String>,
    /// Host owning the LU under target-managed ownership (semantics.md §3).
    #[serde(default)]
    pub owner: Option<String>,
    /// Epoch of the last ownership decision (0: never owned).
    #[serde(default)]
    pub epoch: u64,
    /// The handover in progress.
    #[serde(default)]
    pub handover: Option<HandoverJson>,
}

/// The persistent reservation of an LU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReservationJson {
    /// Type code (SPC-4 §6.16.2 Table 213).
    #[serde(rename = "type")]
    pub type_code: u8,
    pub type_name: String,
    /// `"LU_SCOPE"` (the only scope SPC-4 defines).
    pub scope: String,
    /// The reservation key as `0x` and 16 hex digits; 0 for the all-registrants types.
    pub key: String,
    /// Initiator port of the holder; `null` for the all-registrants types (every registrant
    /// holds it).
    pub holder: Option<String>,
}

/// One registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistrationJson {
    /// `name,i,0x<ISID>`, or the bare name for an initiator-device registration.
    pub initiator_port: String,
    pub key: String,
    /// `<target>,t,0x<RTPI as 4 hex digits>` (SPC-4 §7.6.4.6), or `"all"` (ALL_TG_PT=1).
    pub target_port: String,
    pub rtpi: Option<u16>,
    pub holder: bool,
}

/// A reservation key as the API prints it.
pub fn fmt_key(key: u64) -> String {
    format!("0x{key:016x}")
}
