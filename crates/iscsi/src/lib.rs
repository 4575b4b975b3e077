//! Sans-IO iSCSI (RFC 7143) for the ironlun target and initiator.
//!
//! No sockets and no clocks live here: callers feed received bytes and `now`, and take back
//! PDUs to send and events to act on. See [`connection::Connection`] for the driving contract.

pub mod acl;
pub mod bhs;
pub mod chap;
pub mod connection;
pub mod data_in;
pub mod digest;
pub mod discovery;
pub mod error;
pub mod framer;
pub mod limits;
pub mod login;
pub mod negotiation;
pub mod pdu;
pub mod r2t;
pub mod session;
pub mod text;

pub use error::PduError;
pub use limits::Limits;
pub use pdu::{Header, Pdu};
