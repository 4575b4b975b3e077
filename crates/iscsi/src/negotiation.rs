//! Operational parameter negotiation (RFC 7143 §6.2, §13): each key with its result function.
//!
//! The target declares its offers in [`Offers`]; after login the agreed values are in
//! [`SessionParams`] (and per-direction MaxRecvDataSegmentLength in [`ConnectionParams`]).

/// What the target offers or accepts (the config's `[negotiation]` table). Defaults do not
/// throttle throughput: large bursts, ImmediateData=Yes, InitialR2T=No, MaxOutstandingR2T > 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offers {
    pub header_digest: Vec<DigestKind>,
    pub data_digest: Vec<DigestKind>,
    pub max_connections: u16,
    pub initial_r2t: bool,
    pub immediate_data: bool,
    /// Our receive limit, declared to the initiator (§13.12).
    pub max_recv_data_segment_length: u32,
    pub max_burst_length: u32,
    pub first_burst_length: u32,
    pub default_time2wait: u16,
    pub default_time2retain: u16,
    pub max_outstanding_r2t: u16,
    pub data_pdu_in_order: bool,
    pub data_sequence_in_order: bool,
    pub error_recovery_level: u8,
}

/// Digest choice for HeaderDigest / DataDigest (§13.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DigestKind {
    None,
    Crc32c,
}

impl Default for Offers {
    fn default() -> Self {
        Offers {
            header_digest: vec![DigestKind::None, DigestKind::Crc32c],
            data_digest: vec![DigestKind::None, DigestKind::Crc32c],
            max_connections: 1,
            initial_r2t: false,
            immediate_data: true,
            max_recv_data_segment_length: 256 * 1024,
            max_burst_length: 16 * 1024 * 1024,
            first_burst_length: 256 * 1024,
            default_time2wait: 2,
            default_time2retain: 20,
            max_outstanding_r2t: 16,
            data_pdu_in_order: true,
            data_sequence_in_order: true,
            error_recovery_level: 0,
        }
    }
}

/// Session-wide values agreed at login (RFC 7143 defaults until negotiated).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionParams {
    pub max_connections: u16,
    pub initial_r2t: bool,
    pub immediate_data: bool,
    pub max_burst_length: u32,
    pub first_burst_length: u32,
    pub default_time2wait: u16,
    pub default_time2retain: u16,
    pub max_outstanding_r2t: u16,
    pub data_pdu_in_order: bool,
    pub data_sequence_in_order: bool,
    pub error_recovery_level: u8,
}

impl Default for SessionParams {
    /// RFC 7143 §13 defaults.
    fn default() -> Self {
        SessionParams {
            max_connections: 1,
            initial_r2t: true,
            immediate_data: true,
            max_burst_length: 262_144,
            first_burst_length: 65_536,
            default_time2wait: 2,
            default_time2retain: 20,
            max_outstanding_r2t: 1,
            data_pdu_in_order: true,
            data_sequence_in_order: true,
            error_recovery_level: 0,
        }
    }
}

/// Connection-only values agreed at login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionParams {
    pub header_digest: DigestKind,
    pub data_digest: DigestKind,
    /// What the initiator declared: our Data-In / text segments must not exceed it.
    pub max_xmit_data_segment_length: u32,
    /// What we declared: the largest data segment we accept.
    pub max_recv_data_segment_length: u32,
}

impl Default for ConnectionParams {
    fn default() -> Self {
        ConnectionParams {
            header_digest: DigestKind::None,
            data_digest: DigestKind::None,
            max_xmit_data_segment_length: 8192,
            max_recv_data_segment_length: 8192,
        }
    }
}
