//! The one sense table (SPC-4 §4.5): every [`SenseReason`] maps to key / ASC / ASCQ here.

/// Why a command ends in CHECK CONDITION. One variant per distinct sense code the LU reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SenseReason {
    /// ILLEGAL REQUEST, INVALID COMMAND OPERATION CODE (20h/00h).
    InvalidOpcode,
}
