//! The target side of one iSCSI connection (and, with MaxConnections=1, its session), sans-IO.
//!
//! # Driving contract
//! The owner (the daemon) loops:
//! 1. append received bytes to a `BytesMut` and call [`Connection::receive`] with `now`;
//! 2. drain [`Connection::poll_event`] and act on each [`Event`] (run SCSI commands, TMFs, …),
//!    answering with [`Connection::complete_command`] / [`Connection::complete_tmf`] — in any order,
//!    from any later time;
//! 3. drain [`Connection::poll_transmit`] and write each [`Transmit`] (vectored pieces) to the socket;
//! 4. call [`Connection::handle_timeout`] at [`Connection::poll_timeout`];
//! 5. close the socket once [`Connection::is_closed`] and every transmit is written.
//!
//! The connection owns login (security stage with AuthMethod=None, operational negotiation),
//! discovery and SendTargets, the CmdSN window and StatSN, immediate/unsolicited/solicited
//! Data-Out assembly via R2T, Data-In splitting with status in the final Data-In, residuals,
//! NOP-Out/NOP-In, Logout, Reject, and task management bookkeeping (RFC 7143).

use crate::limits::Limits;
use crate::negotiation::Offers;
use crate::pdu::{TaskAttr, TmfFunction, TmfResponse};
use bytes::{Bytes, BytesMut};
use std::time::Instant;

/// One target the portal serves, as seen by login and SendTargets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetInfo {
    /// iSCSI name, e.g. `iqn.2026-11.io.ironlun:lab`.
    pub name: String,
    pub alias: Option<String>,
    /// Portals reported by SendTargets as `TargetAddress=addr:port,tpgt` (§13.9).
    pub addresses: Vec<String>,
    /// Target portal group tag (§13.9, reported as TargetPortalGroupTag in login).
    pub portal_group_tag: u16,
}

/// Everything a connection needs to know about the portal it was accepted on.
#[derive(Debug, Clone)]
pub struct PortalConfig {
    pub targets: Vec<TargetInfo>,
    pub offers: Offers,
    pub limits: Limits,
    /// Our TargetPortalGroupTag on this portal.
    pub portal_group_tag: u16,
    /// Depth of the CmdSN window we grant (MaxCmdSN - ExpCmdSN + 1).
    pub cmd_window: u32,
}

/// What the session is once login completes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    pub initiator_name: String,
    pub initiator_alias: Option<String>,
    pub isid: [u8; 6],
    pub tsih: u16,
    /// `None` for a discovery session.
    pub target_name: Option<String>,
    pub portal_group_tag: u16,
}

/// A SCSI command ready to execute: all its Data-Out has arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScsiCommandEvent {
    pub itt: u32,
    pub lun: u64,
    /// The whole CDB (16 header bytes, plus the extended-CDB AHS when present).
    pub cdb: Bytes,
    pub attr: TaskAttr,
    /// All write data (empty for reads); at most ExpectedDataTransferLength bytes.
    pub data_out: Bytes,
    /// ExpectedDataTransferLength when the R bit is set (the read allocation), else 0.
    pub expected_in_len: u32,
    /// ExpectedDataTransferLength when the W bit is set, else 0.
    pub expected_out_len: u32,
}

/// A task management request the SCSI layer must carry out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskMgmtEvent {
    pub itt: u32,
    pub function: TmfFunction,
    pub lun: u64,
    pub referenced_task_tag: u32,
}

/// Something the owner must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Login reached full feature phase.
    LoggedIn(SessionInfo),
    Command(ScsiCommandEvent),
    /// Answer with [`Connection::complete_tmf`]. Tasks the TMF aborts are answered by the owner
    /// as usual; the connection drops their responses (RFC 7143 §11.5.1).
    TaskMgmt(TaskMgmtEvent),
    /// Commands with these ITTs are gone (aborted, or the connection is closing): the owner
    /// may stop working on them; their completions will be ignored.
    Aborted(Vec<u32>),
}

/// The outcome of a SCSI command, from the SCSI layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScsiCompletion {
    /// SCSI status byte (SAM-5): 0x00 GOOD, 0x02 CHECK CONDITION, 0x18 RESERVATION CONFLICT, …
    pub status: u8,
    /// Sense data (without the 2-byte SenseLength prefix); empty unless CHECK CONDITION.
    pub sense: Bytes,
    /// Data-In payload; may be longer than the initiator's allocation (then it is cut and
    /// overflow reported) or shorter (underflow reported).
    pub data_in: Bytes,
}

/// Vectored pieces of one or more PDUs to write in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    pub pieces: Vec<Bytes>,
}

/// Why the connection closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    Logout,
    LoginFailed,
    ProtocolError(String),
}

/// Target-side connection state machine.
pub struct Connection {
    _private: (),
}

impl Connection {
    /// A fresh connection, in the login phase, on a portal described by `config`.
    pub fn new(config: std::sync::Arc<PortalConfig>, now: Instant) -> Self {
        let _ = (config, now);
        todo!()
    }

    /// Consume whole PDUs from the front of `buf`. Partial PDUs stay in `buf` for the next call.
    pub fn receive(&mut self, buf: &mut BytesMut, now: Instant) {
        let _ = (buf, now);
        todo!()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        todo!()
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        todo!()
    }

    /// Answer a [`Event::Command`]. Unknown or aborted ITTs are ignored.
    pub fn complete_command(&mut self, itt: u32, completion: ScsiCompletion) {
        let _ = (itt, completion);
        todo!()
    }

    /// Answer a [`Event::TaskMgmt`].
    pub fn complete_tmf(&mut self, itt: u32, response: TmfResponse) {
        let _ = (itt, response);
        todo!()
    }

    /// When [`Connection::handle_timeout`] wants to be called next (NOP-In keepalive, login timeout).
    pub fn poll_timeout(&self) -> Option<Instant> {
        todo!()
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        let _ = now;
        todo!()
    }

    /// True once the connection must be closed (after its last transmit is written).
    pub fn is_closed(&self) -> Option<&CloseReason> {
        todo!()
    }

    /// Session identity once logged in.
    pub fn session(&self) -> Option<&SessionInfo> {
        todo!()
    }
}
