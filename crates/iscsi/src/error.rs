//! Protocol errors of the PDU layer (DESIGN.md §3 rule 4: one place to the wire per layer).

use crate::pdu::RejectReason;

/// An error in a received PDU. [`PduError::action`] says how it reaches the wire.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PduError {
    /// An opcode outside RFC 7143 §11.2.1.2's list; the PDU is skipped by its lengths.
    #[error("unknown opcode {0:#04x}")]
    UnknownOpcode(u8),
    /// A peer length over our [`crate::Limits`] (TotalAHSLength, DataSegmentLength, text
    /// across continuations): refused before any payload is buffered.
    #[error("{field} = {value} exceeds limit {limit}")]
    TooLong {
        field: &'static str,
        value: u32,
        limit: u32,
    },
    /// Header digest mismatch: the lengths cannot be trusted, so neither can the framing
    /// (§7.8 lets the target drop the connection).
    #[error("header digest mismatch")]
    HeaderDigest,
    /// Data digest mismatch: the PDU is discarded and rejected (§7.8, §11.17.1 reason 0x02).
    #[error("data digest mismatch")]
    DataDigest,
    /// A slice shorter than the PDU it should hold (decode helpers, never the framer, which waits).
    #[error("truncated: need {need} bytes, have {have}")]
    Truncated { need: usize, have: usize },
    /// A field value the RFC does not allow (AHS layout, text syntax, reserved codes).
    #[error("invalid field {0}")]
    InvalidField(&'static str),
    /// A PDU that is well formed but not allowed here (§11.17.1 reason 0x04).
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
    /// Map to the wire per RFC 7143 §7.8 / §11.17: unknown opcode → Reject "command not
    /// supported" (0x05), data digest → 0x02, invalid field → 0x09, protocol error → 0x04;
    /// an over-limit length, a header digest error or a truncated PDU → drop the connection.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_action_table() {
        let table = [
            (
                PduError::UnknownOpcode(0x1c),
                ErrorAction::Reject(RejectReason::CommandNotSupported),
            ),
            (
                PduError::DataDigest,
                ErrorAction::Reject(RejectReason::DataDigestError),
            ),
            (
                PduError::InvalidField("x"),
                ErrorAction::Reject(RejectReason::InvalidPduField),
            ),
            (
                PduError::Protocol("x"),
                ErrorAction::Reject(RejectReason::ProtocolError),
            ),
            (
                PduError::TooLong {
                    field: "f",
                    value: 2,
                    limit: 1,
                },
                ErrorAction::Drop,
            ),
            (PduError::HeaderDigest, ErrorAction::Drop),
            (PduError::Truncated { need: 48, have: 0 }, ErrorAction::Drop),
        ];
        for (error, action) in table {
            assert_eq!(error.action(), action, "{error}");
        }
    }
}
