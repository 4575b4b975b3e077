//! Async iSCSI initiator (RFC 7143, initiator side) for ironlun's tests, benchmarks and
//! negative tests.
//!
//! - [`Session::connect`]: TCP connect, login (AuthMethod=None or CHAP, operational negotiation), then
//!   SCSI commands with several in flight, NOP, task management, logout.
//! - [`discover`]: SendTargets=All over a discovery session.
//! - [`RawConnection`]: bytes and PDUs exactly as the test writes them, for what real
//!   initiators never send.
//!
//! The target is a peer: whatever it sends becomes an [`Error`], never a panic.

pub mod discovery;
pub mod error;
pub mod login;
pub mod options;
pub mod pr;
pub mod raw;
pub mod scsi;
pub mod seq;
pub mod session;
mod transport;
pub mod xcopy;

pub use discovery::{discover, discover_with};
pub use error::{Error, Result};
pub use ironlun_iscsi::chap::ChapAlgorithm;
pub use ironlun_iscsi::pdu::{TmfFunction, TmfResponse};
pub use options::{ChapCredentials, LoginOptions, Negotiated};
pub use raw::RawConnection;
pub use scsi::{Capacity, CommandResult, Residual, SenseKey};
pub use session::{PendingCommand, Session};
