//! Errors of the initiator. The target is a peer: nothing it sends can make us panic, every
//! surprise becomes one of these.

use ironlun_iscsi::pdu::RejectReason;
use ironlun_iscsi::PduError;

/// Everything that can go wrong talking to a target.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The target sent bytes that do not frame or decode as a PDU.
    #[error("bad PDU from target: {0}")]
    Pdu(#[from] PduError),
    /// Login Response with Status-Class ≠ 0 (RFC 7143 §11.13.5).
    #[error("login failed: status class {class:#04x} detail {detail:#04x}")]
    LoginFailed { class: u8, detail: u8 },
    /// The target answered something RFC 7143 does not allow at this point.
    #[error("protocol violation by target: {0}")]
    Protocol(String),
    /// The target rejected one of our PDUs (RFC 7143 §11.17).
    #[error("target rejected our PDU: {0:?}")]
    Rejected(RejectReason),
    /// A SCSI command completed with a status other than GOOD (from the convenience helpers).
    #[error("SCSI status {status:#04x}")]
    Status { status: u8, sense: bytes::Bytes },
    /// iSCSI Response field ≠ 0 in a SCSI Response (§11.4.3): the target did not run the command.
    #[error("iSCSI response {0:#04x}")]
    Response(u8),
    /// Logout Response with Response ≠ 0 (§11.15.1).
    #[error("logout refused: response {0}")]
    LogoutFailed(u8),
    /// The connection closed (EOF, reset or earlier fatal error) before the answer came.
    #[error("connection closed")]
    Closed,
    #[error("timed out")]
    Timeout,
    /// Mutual CHAP: the target's CHAP_N/CHAP_R did not prove it knows its secret, or the
    /// target left the security stage without authenticating itself (RFC 7143 §12.1.3).
    #[error("target failed mutual CHAP authentication")]
    TargetAuthentication,
    /// The caller asked for something we cannot express (e.g. data not a whole number of blocks).
    #[error("invalid argument: {0}")]
    InvalidArgument(&'static str),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;
