//! SCSI status codes (SAM-5 §5.3.1).

pub const GOOD: u8 = 0x00;
pub const CHECK_CONDITION: u8 = 0x02;
pub const CONDITION_MET: u8 = 0x04;
pub const BUSY: u8 = 0x08;
pub const RESERVATION_CONFLICT: u8 = 0x18;
pub const TASK_SET_FULL: u8 = 0x28;
pub const ACA_ACTIVE: u8 = 0x30;
pub const TASK_ABORTED: u8 = 0x40;

/// Not a status: SAM-5 defines no code FFh (unlisted codes are reserved). Marks a command that
/// ends without any status or response: a task aborted by another I_T nexus while the control
/// mode page's TAS is zero (SAM-5 §5.6, SPC-4 §7.5.8). It never goes on the wire; the
/// transport forgets the task instead.
pub const NO_STATUS: u8 = 0xFF;
