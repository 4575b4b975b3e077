//! Protocol errors of the PDU layer (DESIGN.md §3 rule 4: one place to the wire per layer).

use crate::pdu::RejectReason;

/// An error in a received PDU. [`PduError::action`] says how it reaches the wire.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PduError {
    #[error("unknown opcode {0:#04x}")]
    UnknownOpcode(u8),
    #[error("{field} = {value} exceeds limit {limit}")]
    TooLong { field: &'static str, value: u32, limit: u32 },
    #[error("header digest mismatch")]
    HeaderDigest,
    #[error("data digest mismatch")]
    DataDigest,
    #[error("truncated: need {need} bytes, have {have}")]
    Truncated { need: usize, have: usize },
    #[error("invalid field {0}")]
    InvalidField(&'static str),
    #[error("protocol error: {0}")]
    Protocol(&'static str),
}

/// What the connection does about a [`PduError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorAction {
    /// Send a Reject with this reason (the header is kept), and go on.
    Reject(RejectReason),
    /// The stream can no longer be framed (or the header cannot be trusted): drop the connection.
    Drop,
}

impl PduError {
    /// Map to the wire per RFC 7143 §7.8 / §11.17.
    pub fn action(&self) -> ErrorAction {
        match self {
            PduError::UnknownOpcode(_) => ErrorAction::Reject(RejectReason::CommandNotSupported),
            PduError::DataDigest => ErrorAction::Reject(RejectReason::DataDigestError),
            PduError::InvalidField(_) => ErrorAction::Reject(RejectReason::InvalidPduField),
            PduError::Protocol(_) => ErrorAction::Reject(RejectReason::ProtocolError),
            PduError::TooLong { .. } | PduError::HeaderDigest | PduError::Truncated { .. } => {
                ErrorAction::Drop
            }
        }
    }
}
