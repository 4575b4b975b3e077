//! Persistent reservations (SPC-4 §5.13, PERSISTENT RESERVE IN §6.15, OUT §6.16) and SPC-2
//! RESERVE/RELEASE (SPC-2 §5.5.1, §7.21, §7.24), for one logical unit.
//!
//! Pure and deterministic: the state machine takes the requesting I_T nexus, the CDB fields and
//! the parameter list, and returns the new state's effects (unit attentions to queue, nexuses
//! whose tasks must be aborted, whether the APTPL file must be rewritten). The LU
//! ([`crate::lu::LogicalUnit`]) owns one [`PrState`] shared by every session, portal and
//! portal group; the daemon performs the aborts and the durable write.
//!
//! SKELETON: the types below are the contract between the SCSI core and the daemon; the
//! behaviour is filled in by the `pr` work item.

use std::fmt;

/// An iSCSI initiator port, `<initiator name>,i,0x<ISID>` (SPC-4 §7.6.4.6; RFC 7143 §4.2.7.1).
/// The name is stored lower-cased: iSCSI names compare case-insensitively (RFC 3722).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InitiatorPort {
    name: String,
    isid: [u8; 6],
}

impl InitiatorPort {
    pub fn new(name: &str, isid: [u8; 6]) -> Self {
        InitiatorPort {
            name: name.to_ascii_lowercase(),
            isid,
        }
    }

    /// The iSCSI initiator name (lower-cased).
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn isid(&self) -> [u8; 6] {
        self.isid
    }
}

impl fmt::Display for InitiatorPort {
    /// `iqn.example:host,i,0x023d00000001`: 12 lower-case hex digits, as LIO prints it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{},i,0x", self.name)?;
        for b in self.isid {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// An I_T nexus as persistent reservations see it: the initiator port and the relative target
/// port identifier of the target port (the portal group tag of the portal group the session
/// logged in through; SPC-4 §3.1.124, RFC 7143 §4.4.1).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ItNexus {
    pub initiator: InitiatorPort,
    pub rtpi: u16,
}

/// Reservation types (SPC-4 §6.16.2 Table 213); 0, 2 and 4 are obsolete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReservationType {
    WriteExclusive = 1,
    ExclusiveAccess = 3,
    WriteExclusiveRegistrantsOnly = 5,
    ExclusiveAccessRegistrantsOnly = 6,
    WriteExclusiveAllRegistrants = 7,
    ExclusiveAccessAllRegistrants = 8,
}

impl ReservationType {
    pub fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            1 => Self::WriteExclusive,
            3 => Self::ExclusiveAccess,
            5 => Self::WriteExclusiveRegistrantsOnly,
            6 => Self::ExclusiveAccessRegistrantsOnly,
            7 => Self::WriteExclusiveAllRegistrants,
            8 => Self::ExclusiveAccessAllRegistrants,
            _ => return None,
        })
    }

    pub fn code(self) -> u8 {
        self as u8
    }

    /// Short name as sg_persist and targetcli print it.
    pub fn name(self) -> &'static str {
        match self {
            Self::WriteExclusive => "Write Exclusive",
            Self::ExclusiveAccess => "Exclusive Access",
            Self::WriteExclusiveRegistrantsOnly => "Write Exclusive, Registrants Only",
            Self::ExclusiveAccessRegistrantsOnly => "Exclusive Access, Registrants Only",
            Self::WriteExclusiveAllRegistrants => "Write Exclusive, All Registrants",
            Self::ExclusiveAccessAllRegistrants => "Exclusive Access, All Registrants",
        }
    }
}

/// A read-only view of one LU's reservation state, for `ironlun ctl reservations` and the
/// admin API.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PrSnapshot {
    /// PRgeneration (SPC-4 §6.15.2).
    pub generation: u32,
    /// The APTPL value of the last successful REGISTER / REGISTER AND IGNORE / REGISTER AND MOVE.
    pub aptpl: bool,
    pub registrations: Vec<RegistrationView>,
    pub reservation: Option<ReservationView>,
    /// Initiator port holding an SPC-2 RESERVE(6/10) reservation, if any.
    pub spc2_holder: Option<String>,
}

/// One registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistrationView {
    /// `name,i,0x<ISID>`, or just `name` for a registration of the initiator device (a
    /// SPEC_I_PT / REGISTER AND MOVE TransportID in format 00b: every ISID of that name).
    pub initiator_port: String,
    pub key: u64,
    /// Relative target port identifier; `None` when registered with ALL_TG_PT=1.
    pub rtpi: Option<u16>,
    /// This registration holds the reservation (every registrant for the all-registrants types).
    pub holder: bool,
}

/// The persistent reservation, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReservationView {
    pub ty: ReservationType,
    /// Always 0 (LU_SCOPE).
    pub scope: u8,
    /// The holder's current key; 0 for the all-registrants types (SPC-4 §6.15.3).
    pub key: u64,
}

/// Effects of a PR OUT that the daemon must carry out before it reports the completion
/// (see [`crate::lu::Step::PrCommit`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Persist {
    /// APTPL is in effect: write these bytes durably (temp file, fsync, rename, fsync dir)
    /// as the LU's state file before the PR OUT completes (SPC-4 §5.13.5.1).
    Write(Vec<u8>),
    /// APTPL was turned off: remove the LU's state file (durably) before the PR OUT completes.
    Remove,
}

/// Why a persisted state file was refused at start ([`crate::lu::LogicalUnit::restore_pr`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PersistError {
    #[error("not an ironlun PR state file (bad magic or version)")]
    NotPrState,
    #[error(
        "state file belongs to another logical unit (serial {found:?}, expected {expected:?})"
    )]
    Foreign { found: String, expected: String },
    #[error("corrupt PR state file: {0}")]
    Corrupt(String),
}

/// All PR and SPC-2 reservation state of one logical unit.
#[derive(Debug, Clone, Default)]
pub struct PrState {}
