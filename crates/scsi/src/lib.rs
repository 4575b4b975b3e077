//! Sans-IO SCSI logical unit (SPC-4, SBC-3) for ironlun.
//!
//! [`LogicalUnit::execute`] takes a CDB and its Data-Out and returns a [`Step`]: either the
//! finished [`Completion`] or one backstore operation ([`IoOp`]) to perform, after which the
//! caller hands the [`IoResult`] to [`LogicalUnit::resume`] (or [`Step::Wait`]: the I/O waits for
//! a COMPARE AND WRITE's range lock, SBC-3 §5.2). No I/O and no clock live here, so
//! the whole command set is tested in memory. The caller holds the LU lock only around
//! `execute`/`resume`, never across the I/O.

pub mod alua;
pub mod cdb;
pub mod lu;
pub mod lun;
pub mod mode;
pub mod pr;
pub mod sanitize;
pub mod sense;
pub mod status;
pub mod ua;
pub mod vpd;
pub mod xcopy;

pub use lu::{
    AbortTicket, Completion, Continuation, IoErrorKind, IoOp, IoResult, LogicalUnit, LuConfig,
    NexusId, PrCommit, ResetKind, Step, TmfEffect,
};
pub use sense::SenseReason;
