//! Bounds checked before any peer-controlled length is buffered (DESIGN.md §3 rule 2).

/// Hard bounds on what a peer may make us buffer. Every length read off the wire is checked
/// against these before a byte of its payload is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest DataSegmentLength accepted in any PDU (before negotiation: 8192 per RFC 7143 §13.12).
    pub max_data_segment: u32,
    /// Largest TotalAHSLength in bytes (the field is in 4-byte words, at most 255 words).
    pub max_ahs: u32,
    /// Largest text payload across continuations (login and Text requests).
    pub max_text: u32,
    /// Largest ExpectedDataTransferLength accepted for one SCSI command.
    pub max_transfer: u32,
    /// Largest CDB length including the extended-CDB AHS.
    pub max_cdb: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_data_segment: 16 * 1024 * 1024,
            max_ahs: 255 * 4,
            max_text: 64 * 1024,
            max_transfer: 64 * 1024 * 1024,
            max_cdb: 260,
        }
    }
}
