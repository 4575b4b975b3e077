//! Which commands a reservation lets through (SPC-4 §5.13.1 Table 65, SBC-3 §4.17 Table 13;
//! SPC-2 §5.5.1 for RESERVE(6/10) reservations; semantics §1.6 and §1.8).
//!
//! An explicit opcode table, not the data direction: SYNCHRONIZE CACHE moves no data but
//! modifies the medium's state and conflicts like a write.

use super::ReservationType;

/// Access class of a command under a persistent reservation held by another I_T nexus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Allowed under every reservation type (Table 65 "Allowed" in every column).
    Always,
    /// Allowed under Write Exclusive types, conflicts under Exclusive Access types.
    ReadLike,
    /// Conflicts unless the requester has registrant access (the default).
    Modify,
    /// PERSISTENT RESERVE OUT: decided by the service action itself (Table 66).
    PrOut,
    /// RESERVE(6/10) / RELEASE(6/10): SPC-2 reservations, §1.8 rules.
    Spc2Reserve,
    Spc2Release,
}

/// Operation codes outside [`crate::cdb::op`] that the table names.
mod more {
    pub const RECEIVE_DIAGNOSTIC_RESULTS: u8 = 0x1C;
    pub const READ_BUFFER: u8 = 0x3C;
    pub const LOG_SENSE: u8 = 0x4D;
    pub const READ_ATTRIBUTE: u8 = 0x8C;
    pub const SECURITY_PROTOCOL_IN: u8 = 0xA2;
    pub const SERVICE_ACTION_IN_12: u8 = 0xAB;
}

/// Classify a CDB (byte 0, and the fields Table 65 depends on).
pub fn classify(cdb: &[u8]) -> Class {
    use crate::cdb::op::*;
    use more::*;
    let byte = |i: usize| cdb.get(i).copied().unwrap_or(0);
    match byte(0) {
        TEST_UNIT_READY
        | REQUEST_SENSE
        | INQUIRY
        | LOG_SENSE
        | PERSISTENT_RESERVE_IN
        | READ_CAPACITY_10
        | REPORT_LUNS => Class::Always,
        // RECEIVE COPY RESULTS (LID1) is allowed under every reservation (SPC-4 table 62).
        RECEIVE_COPY_RESULTS => Class::Always,
        // READ CAPACITY(16) and the like are Always; GET LBA STATUS reads.
        SERVICE_ACTION_IN_16 => match byte(1) & 0x1F {
            0x10 => Class::Always,
            _ => Class::ReadLike,
        },
        // REPORT IDENTIFYING INFORMATION 05h, TARGET PORT GROUPS 0Ah, PRIORITY 0Eh,
        // TIMESTAMP 0Fh are Always; REPORT SUPPORTED OPERATION CODES / TMFs read.
        MAINTENANCE_IN => match byte(1) & 0x1F {
            0x05 | 0x0A | 0x0E | 0x0F => Class::Always,
            _ => Class::ReadLike,
        },
        // READ MEDIA SERIAL NUMBER.
        SERVICE_ACTION_IN_12 if byte(1) & 0x1F == 0x01 => Class::Always,
        PREVENT_ALLOW_MEDIUM_REMOVAL if byte(4) & 0x03 == 0 => Class::Always,
        START_STOP_UNIT if byte(4) & 0x01 == 1 && byte(4) >> 4 == 0 => Class::Always,
        MODE_SENSE_6
        | MODE_SENSE_10
        | READ_6
        | READ_10
        | READ_12
        | READ_16
        | VERIFY_10
        | VERIFY_12
        | VERIFY_16
        | PRE_FETCH_10
        | PRE_FETCH_16
        | READ_BUFFER
        | RECEIVE_DIAGNOSTIC_RESULTS
        | SECURITY_PROTOCOL_IN
        | READ_ATTRIBUTE
        | READ_DEFECT_DATA_10
        | READ_DEFECT_DATA_12 => Class::ReadLike,
        PERSISTENT_RESERVE_OUT => Class::PrOut,
        RESERVE_6 | RESERVE_10 => Class::Spc2Reserve,
        RELEASE_6 | RELEASE_10 => Class::Spc2Release,
        _ => Class::Modify,
    }
}

/// The requester's standing under the persistent reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Standing {
    /// The reservation's type (`None`: no persistent reservation).
    pub reservation: Option<ReservationType>,
    /// The requester's I_T nexus is registered.
    pub registered: bool,
    /// It holds the reservation (every registrant for the all-registrants types).
    pub holder: bool,
}

/// Table 65 / SBC-3 Table 13 for classes [`Class::Always`], [`Class::ReadLike`],
/// [`Class::Modify`]: `true` = allowed. The other classes are decided by their commands.
pub fn allowed(class: Class, s: Standing) -> bool {
    let Some(ty) = s.reservation else {
        return true;
    };
    if s.holder {
        return true;
    }
    let registrant_access = s.registered && ty.registrants_have_access();
    match class {
        Class::Always | Class::PrOut | Class::Spc2Reserve | Class::Spc2Release => true,
        Class::ReadLike => registrant_access || !ty.exclusive_access(),
        Class::Modify => registrant_access,
    }
}

/// SPC-2 §5.5.1 as ironlun applies it (semantics §1.8): while another I_T nexus holds a
/// RESERVE(6/10) reservation, only INQUIRY, REQUEST SENSE, REPORT LUNS and RELEASE(6/10)
/// (GOOD, no effect) are allowed. PERSISTENT RESERVE IN/OUT conflict for every I_T nexus,
/// the holder's included (§1.4 pre-check 1).
pub fn spc2_allowed(cdb: &[u8], holder: bool) -> bool {
    use crate::cdb::op::*;
    let opcode = cdb.first().copied().unwrap_or(0);
    if matches!(opcode, PERSISTENT_RESERVE_IN | PERSISTENT_RESERVE_OUT) {
        return false;
    }
    holder
        || matches!(
            opcode,
            INQUIRY | REQUEST_SENSE | REPORT_LUNS | RELEASE_6 | RELEASE_10
        )
}
