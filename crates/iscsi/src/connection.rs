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

use crate::data_in::{self, Residual, Stamps};
use crate::error::ErrorAction;
use crate::framer::{self, Digests, Framed, Framer};
use crate::limits::Limits;
use crate::login::{Login, LoginReply, LoginStatus, SessionType, LOGIN_MAX_SEGMENT};
use crate::negotiation::{ConnectionParams, DigestKind, Offers, SessionParams, NOT_UNDERSTOOD, REJECT};
use crate::pdu::{
    Ahs, Header, LoginRequest, LoginResponse, LogoutReason, LogoutResponse, NopIn, Pdu, R2t, Reject, RejectReason,
    ScsiCommand, TaskAttr, TaskMgmtResponse, TextResponse, TmfFunction, TmfResponse, RESERVED_TAG,
};
use crate::r2t::{WriteBuffer, WriteParams};
use crate::session::{sn_lt, Admission, CmdWindow};
use crate::{bhs, discovery, negotiation, text};
use bytes::{Bytes, BytesMut};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
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

/// Fixed-format sense for a command whose ExpectedDataTransferLength exceeds
/// [`Limits::max_transfer`]: ILLEGAL REQUEST, INVALID FIELD IN CDB (SPC-4 §4.5.3, Table 28).
const SENSE_TRANSFER_TOO_LONG: [u8; 18] = [0x70, 0, 0x05, 0, 0, 0, 0, 0x0a, 0, 0, 0, 0, 0x24, 0, 0, 0, 0, 0];
/// SCSI status CHECK CONDITION (SAM-5 §5.3).
const STATUS_CHECK_CONDITION: u8 = 0x02;

/// Target-side connection state machine.
pub struct Connection {
    config: Arc<PortalConfig>,
    framer: Framer,
    phase: Phase,
    events: VecDeque<Event>,
    out: VecDeque<(Pdu, Digests)>,
    closed: Option<CloseReason>,
    /// StatSN the next response carries (§4.2.2.2).
    stat_sn: u32,
    tsih: u16,
    /// Digests in force for what we send.
    tx_digests: Digests,
    next_ttt: u32,
}

enum Phase {
    /// Before the first Login Request, or during login.
    Login(Box<LoginPhase>),
    FullFeature(Box<Ffp>),
}

struct LoginPhase {
    login: Login,
    /// CmdSN of the first Login Request (ExpCmdSN of the session), once received.
    exp_cmd_sn: Option<u32>,
    cid: u16,
}

/// Full feature phase state.
struct Ffp {
    session: SessionInfo,
    discovery: bool,
    cid: u16,
    params: SessionParams,
    conn_params: ConnectionParams,
    /// Held commands; `None` marks a CmdSN considered received by an ABORT TASK (§11.5.1 b).
    window: CmdWindow<Option<Pdu>>,
    tasks: HashMap<u32, Task>,
    /// TMFs handed to the owner, by ITT.
    tmfs: HashMap<u32, TmfFunction>,
    text: Option<TextExchange>,
}

struct Task {
    lun: u64,
    expected_in: u32,
    expected_out: u32,
    state: TaskState,
}

enum TaskState {
    /// Waiting for Data-Out.
    Receiving { cmd: ScsiCommandEvent, buffer: WriteBuffer },
    /// Handed to the owner as [`Event::Command`].
    Running { r2t_count: u32 },
}

/// A Text Request/Response exchange that spans PDUs (§11.10.2 C bit, §11.11 TTT).
struct TextExchange {
    itt: u32,
    ttt: u32,
    rx: Vec<u8>,
    tx_rest: Bytes,
}

impl Connection {
    /// A fresh connection, in the login phase, on a portal described by `config`. The session
    /// it creates gets TSIH 1; a daemon serving several sessions uses
    /// [`Connection::new_with_tsih`] to keep TSIHs unique (§11.12.6).
    pub fn new(config: std::sync::Arc<PortalConfig>, now: Instant) -> Self {
        Self::new_with_tsih(config, 1, now)
    }

    /// A fresh connection whose session, if login succeeds, gets `tsih` (non-zero, unique
    /// among the portal's live sessions — the caller allocates it; 0 is replaced by 1).
    pub fn new_with_tsih(config: Arc<PortalConfig>, tsih: u16, now: Instant) -> Self {
        let _ = now;
        let mut limits = config.limits.clone();
        limits.max_data_segment = limits.max_data_segment.min(u32::try_from(LOGIN_MAX_SEGMENT).unwrap_or(8192));
        let login = Login::new(config.offers.clone(), config.limits.max_data_segment, config.limits.max_text);
        Connection {
            framer: Framer::new(limits),
            phase: Phase::Login(Box::new(LoginPhase { login, exp_cmd_sn: None, cid: 0 })),
            events: VecDeque::new(),
            out: VecDeque::new(),
            closed: None,
            stat_sn: 0,
            tsih: tsih.max(1),
            tx_digests: Digests::default(),
            next_ttt: 0,
            config,
        }
    }

    /// Consume whole PDUs from the front of `buf`. Partial PDUs stay in `buf` for the next call.
    pub fn receive(&mut self, buf: &mut BytesMut, now: Instant) {
        let _ = now;
        while self.closed.is_none() {
            match self.framer.next_pdu(buf) {
                Ok(None) => break,
                Ok(Some(Framed::Pdu(pdu))) => self.handle_pdu(pdu),
                Ok(Some(Framed::Bad { error, header })) => match (error.action(), &self.phase) {
                    (ErrorAction::Reject(reason), Phase::FullFeature(_)) => {
                        tracing::debug!(%error, "rejecting PDU");
                        self.send_reject(reason, header);
                    }
                    _ => self.close(CloseReason::ProtocolError(error.to_string())),
                },
                Err(error) => self.close(CloseReason::ProtocolError(error.to_string())),
            }
        }
        if self.closed.is_some() {
            buf.clear();
        }
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// All queued PDUs, encoded, as one vectored write.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        if self.out.is_empty() {
            return None;
        }
        let mut pieces = Vec::new();
        while let Some((pdu, digests)) = self.out.pop_front() {
            pieces.extend(framer::encode_pdu(&pdu, digests));
        }
        Some(Transmit { pieces })
    }

    /// Answer a [`Event::Command`]. Unknown or aborted ITTs are ignored.
    pub fn complete_command(&mut self, itt: u32, completion: ScsiCompletion) {
        self.finish_command(itt, completion, None);
    }

    /// Answer a [`Event::Command`] that wrote, also reporting `spdtl_out`: the number of bytes
    /// the CDB asked the initiator to send (SPDTL). When it differs from the initiator's
    /// ExpectedDataTransferLength the response carries the write residual (§11.4.5: overflow
    /// when the CDB wanted more, underflow when less).
    pub fn complete_command_with_spdtl(&mut self, itt: u32, completion: ScsiCompletion, spdtl_out: u32) {
        self.finish_command(itt, completion, Some(spdtl_out));
    }

    /// Answer a [`Event::TaskMgmt`].
    pub fn complete_tmf(&mut self, itt: u32, response: TmfResponse) {
        if self.closed.is_some() {
            return;
        }
        let Phase::FullFeature(ffp) = &mut self.phase else { return };
        let Some(function) = ffp.tmfs.remove(&itt) else { return };
        self.send_tmf_response(itt, response);
        if function == TmfFunction::TargetColdReset && response == TmfResponse::FunctionComplete {
            // §11.5.1: after a cold reset the target drops all its connections.
            self.close(CloseReason::ProtocolError("target cold reset".to_string()));
        }
    }

    /// When [`Connection::handle_timeout`] wants to be called next (NOP-In keepalive, login
    /// timeout). No timers are armed yet: always `None`.
    pub fn poll_timeout(&self) -> Option<Instant> {
        None
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        let _ = now;
    }

    /// True once the connection must be closed (after its last transmit is written).
    pub fn is_closed(&self) -> Option<&CloseReason> {
        self.closed.as_ref()
    }

    /// Session identity once logged in.
    pub fn session(&self) -> Option<&SessionInfo> {
        match &self.phase {
            Phase::FullFeature(ffp) => Some(&ffp.session),
            Phase::Login(_) => None,
        }
    }

    /// The negotiated session parameters, once logged in.
    pub fn session_params(&self) -> Option<&SessionParams> {
        match &self.phase {
            Phase::FullFeature(ffp) => Some(&ffp.params),
            Phase::Login(_) => None,
        }
    }

    /// The negotiated connection parameters, once logged in.
    pub fn connection_params(&self) -> Option<&ConnectionParams> {
        match &self.phase {
            Phase::FullFeature(ffp) => Some(&ffp.conn_params),
            Phase::Login(_) => None,
        }
    }

    // ----- plumbing -------------------------------------------------------------------------

    fn next_stat_sn(&mut self) -> u32 {
        let sn = self.stat_sn;
        self.stat_sn = self.stat_sn.wrapping_add(1);
        sn
    }

    fn alloc_ttt(next: &mut u32) -> u32 {
        *next = next.wrapping_add(1);
        if *next == RESERVED_TAG {
            *next = 1;
        }
        *next
    }

    fn window_sns(&self) -> (u32, u32) {
        match &self.phase {
            Phase::FullFeature(ffp) => (ffp.window.exp_cmd_sn(), ffp.window.max_cmd_sn()),
            Phase::Login(lp) => {
                let exp = lp.exp_cmd_sn.unwrap_or(0);
                (exp, exp.wrapping_add(self.config.cmd_window.max(1)).wrapping_sub(1))
            }
        }
    }

    fn push(&mut self, header: Header, data: Bytes) {
        self.out.push_back((Pdu { header, ahs: Vec::new(), data }, self.tx_digests));
    }

    /// Close (idempotent): commands already handed to the owner are reported aborted.
    fn close(&mut self, reason: CloseReason) {
        if self.closed.is_some() {
            return;
        }
        tracing::debug!(?reason, "closing connection");
        if let Phase::FullFeature(ffp) = &mut self.phase {
            let running: Vec<u32> = ffp
                .tasks
                .drain()
                .filter(|(_, t)| matches!(t.state, TaskState::Running { .. }))
                .map(|(itt, _)| itt)
                .collect();
            if !running.is_empty() {
                self.events.push_back(Event::Aborted(running));
            }
        }
        self.closed = Some(reason);
    }

    fn send_reject(&mut self, reason: RejectReason, header: Bytes) {
        let (exp_cmd_sn, max_cmd_sn) = self.window_sns();
        let stat_sn = self.next_stat_sn();
        let header_data = header.slice(..header.len().min(bhs::BHS_LEN));
        self.push(
            Header::Reject(Reject { reason, stat_sn, exp_cmd_sn, max_cmd_sn, data_sn_or_r2t_sn: 0 }),
            header_data,
        );
    }

    /// Reject a decoded PDU, re-encoding its BHS for the Reject's data segment (§11.17).
    fn reject_pdu(&mut self, reason: RejectReason, pdu: &Pdu) {
        let mut raw = BytesMut::with_capacity(bhs::BHS_LEN);
        let mut ahs = BytesMut::new();
        bhs::encode_ahs(&pdu.ahs, &mut ahs);
        let ahs_len = u32::try_from(ahs.len()).unwrap_or(0);
        let dsl = u32::try_from(pdu.data.len()).unwrap_or(0);
        bhs::encode_header(&pdu.header, ahs_len, dsl, &mut raw);
        self.send_reject(reason, raw.freeze());
    }

    fn handle_pdu(&mut self, pdu: Pdu) {
        if matches!(self.phase, Phase::Login(_)) {
            match &pdu.header {
                Header::LoginRequest(req) => {
                    let req = req.clone();
                    self.on_login(&req, &pdu.data);
                }
                // §6: nothing but Login Requests before full feature phase.
                _ => self.close(CloseReason::ProtocolError("non-login PDU during login".to_string())),
            }
            return;
        }
        let (immediate, cmd_sn) = match &pdu.header {
            Header::DataOut(_) => {
                self.on_data_out(pdu);
                return;
            }
            Header::ScsiCommand(h) => (h.immediate, h.cmd_sn),
            Header::TaskMgmtRequest(h) => (h.immediate, h.cmd_sn),
            Header::TextRequest(h) => (h.immediate, h.cmd_sn),
            Header::LogoutRequest(h) => (h.immediate, h.cmd_sn),
            Header::NopOut(h) => (h.immediate, h.cmd_sn),
            // Login after login, SNACK at ErrorRecoveryLevel 0, and target opcodes.
            _ => {
                self.reject_pdu(RejectReason::ProtocolError, &pdu);
                return;
            }
        };
        if immediate {
            self.execute(pdu);
            return;
        }
        let Phase::FullFeature(ffp) = &mut self.phase else { return };
        match ffp.window.admit(cmd_sn, Some(pdu)) {
            (Admission::Deliver, Some(Some(p))) => self.execute(p),
            (Admission::Drop, _) => {
                // §4.2.2.1: outside the window → silently ignored.
                tracing::debug!(cmd_sn, "command outside the CmdSN window dropped");
                return;
            }
            _ => {}
        }
        self.drain_window();
    }

    fn drain_window(&mut self) {
        loop {
            if self.closed.is_some() {
                return;
            }
            let Phase::FullFeature(ffp) = &mut self.phase else { return };
            match ffp.window.next_ready() {
                Some(Some(p)) => self.execute(p),
                Some(None) => {}
                None => return,
            }
        }
    }

    fn execute(&mut self, pdu: Pdu) {
        if self.closed.is_some() {
            return;
        }
        match &pdu.header {
            Header::ScsiCommand(_) => self.on_command(pdu),
            Header::TaskMgmtRequest(_) => self.on_tmf(pdu),
            Header::TextRequest(_) => self.on_text(pdu),
            Header::LogoutRequest(_) => self.on_logout(pdu),
            Header::NopOut(_) => self.on_nop(pdu),
            _ => {}
        }
    }

    // ----- login ----------------------------------------------------------------------------

    fn on_login(&mut self, req: &LoginRequest, data: &Bytes) {
        let Phase::Login(lp) = &mut self.phase else { return };
        if lp.exp_cmd_sn.is_none() {
            // §11.13.4: the first response's StatSN starts the connection's StatSN.
            lp.exp_cmd_sn = Some(req.cmd_sn);
            lp.cid = req.cid;
            self.stat_sn = req.exp_stat_sn;
        }
        let reply: LoginReply =
            lp.login.on_request(req, data, &self.config.targets, self.config.portal_group_tag);
        let (exp_cmd_sn, max_cmd_sn) = self.window_sns();
        let stat_sn = self.next_stat_sn();
        let failed = reply.status != LoginStatus::SUCCESS;
        let header = LoginResponse {
            transit: reply.transit,
            continue_: reply.continue_,
            csg: reply.csg,
            nsg: reply.nsg,
            version_max: 0,
            version_active: 0,
            isid: req.isid,
            tsih: if reply.complete { self.tsih } else { 0 },
            itt: req.itt,
            stat_sn,
            exp_cmd_sn,
            max_cmd_sn,
            status_class: reply.status.class,
            status_detail: reply.status.detail,
        };
        // Login responses never carry digests (§13.1: digests start after login).
        self.out.push_back((
            Pdu { header: Header::LoginResponse(header), ahs: Vec::new(), data: reply.data },
            Digests::default(),
        ));
        if failed {
            tracing::debug!(?reply.status, "login failed");
            self.closed = Some(CloseReason::LoginFailed);
            return;
        }
        if reply.complete {
            self.enter_full_feature(exp_cmd_sn);
        }
    }

    fn enter_full_feature(&mut self, exp_cmd_sn: u32) {
        let Phase::Login(lp) = &mut self.phase else { return };
        let Some(identity) = lp.login.identity() else {
            self.close(CloseReason::ProtocolError("login completed without identity".to_string()));
            return;
        };
        let cid = lp.cid;
        let neg = &lp.login.negotiation;
        let conn_params = neg.connection.clone();
        let params = neg.session.clone();
        let discovery = identity.session_type == SessionType::Discovery;
        let portal_group_tag = identity.target.as_ref().map_or(self.config.portal_group_tag, |t| t.portal_group_tag);
        let session = SessionInfo {
            initiator_name: identity.initiator_name,
            initiator_alias: identity.initiator_alias,
            isid: identity.isid,
            tsih: self.tsih,
            target_name: identity.target.map(|t| t.name),
            portal_group_tag,
        };
        self.tx_digests = Digests {
            header: conn_params.header_digest == DigestKind::Crc32c,
            data: conn_params.data_digest == DigestKind::Crc32c,
        };
        self.framer.digests = self.tx_digests;
        // PDUs larger than what we declared now end the connection in the framer (§13.12).
        self.framer.limits.max_data_segment =
            self.config.limits.max_data_segment.min(conn_params.max_recv_data_segment_length);
        self.events.push_back(Event::LoggedIn(session.clone()));
        self.phase = Phase::FullFeature(Box::new(Ffp {
            session,
            discovery,
            cid,
            window: CmdWindow::new(exp_cmd_sn, self.config.cmd_window),
            params,
            conn_params,
            tasks: HashMap::new(),
            tmfs: HashMap::new(),
            text: None,
        }));
    }

    // ----- SCSI commands and data -----------------------------------------------------------

    fn on_command(&mut self, pdu: Pdu) {
        let Header::ScsiCommand(h) = &pdu.header else { return };
        let h: ScsiCommand = h.clone();
        let Phase::FullFeature(ffp) = &mut self.phase else { return };
        if ffp.discovery {
            // §4.3: a discovery session carries only Text, NOP and Logout.
            self.reject_pdu(RejectReason::ProtocolError, &pdu);
            return;
        }
        if ffp.tasks.contains_key(&h.itt) {
            self.reject_pdu(RejectReason::TaskInProgress, &pdu);
            return;
        }
        // CDB: 16 header bytes plus the extended-CDB AHS (§11.2.2.3).
        let mut cdb = BytesMut::from(&h.cdb[..]);
        let mut bidi_read = None;
        for ahs in &pdu.ahs {
            match ahs {
                Ahs::ExtendedCdb(ext) => cdb.extend_from_slice(ext),
                Ahs::BidiReadLength(len) => bidi_read = Some(*len),
                Ahs::Other { .. } => {}
            }
        }
        if u32::try_from(cdb.len()).map_or(true, |l| l > self.config.limits.max_cdb) {
            self.reject_pdu(RejectReason::InvalidPduField, &pdu);
            return;
        }
        let edtl = h.expected_data_transfer_length;
        let (expected_in, expected_out) = match (h.read, h.write) {
            (true, true) => (bidi_read.unwrap_or(0), edtl),
            (true, false) => (edtl, 0),
            (false, true) => (0, edtl),
            (false, false) => (0, 0),
        };
        let imm_len = u32::try_from(pdu.data.len()).unwrap_or(u32::MAX);
        let params = ffp.params.clone();
        if imm_len > 0 && (!h.write || !params.immediate_data || imm_len > expected_out || imm_len > params.first_burst_length)
        {
            // §11.3.4 / §13.11: immediate data only with W, when negotiated, within bounds.
            self.reject_pdu(RejectReason::ProtocolError, &pdu);
            return;
        }
        let cmd = ScsiCommandEvent {
            itt: h.itt,
            lun: h.lun,
            cdb: cdb.freeze(),
            attr: h.attr,
            data_out: Bytes::new(),
            expected_in_len: expected_in,
            expected_out_len: expected_out,
        };
        if expected_in > self.config.limits.max_transfer || expected_out > self.config.limits.max_transfer {
            // Too large to buffer: fail the command before allocating (DESIGN.md §3 rule 2).
            let sense = Bytes::from_static(&SENSE_TRANSFER_TOO_LONG);
            ffp.tasks.insert(h.itt, Task { lun: h.lun, expected_in, expected_out, state: TaskState::Running { r2t_count: 0 } });
            let completion = ScsiCompletion { status: STATUS_CHECK_CONDITION, sense, data_in: Bytes::new() };
            self.finish_command(h.itt, completion, None);
            return;
        }
        if expected_out == 0 {
            ffp.tasks.insert(h.itt, Task { lun: h.lun, expected_in, expected_out, state: TaskState::Running { r2t_count: 0 } });
            self.events.push_back(Event::Command(cmd));
            return;
        }
        // §4.2.2.3 / §13.10: unsolicited Data-Out follows only with InitialR2T=No and F=0.
        let unsolicited_end = if !params.initial_r2t && !h.final_ {
            params.first_burst_length.min(expected_out).max(imm_len)
        } else {
            imm_len
        };
        let wparams = WriteParams {
            max_burst: params.max_burst_length,
            max_outstanding_r2t: params.max_outstanding_r2t,
            data_pdu_in_order: params.data_pdu_in_order,
        };
        let buffer = WriteBuffer::new(expected_out, &pdu.data, unsolicited_end, wparams);
        ffp.tasks.insert(
            h.itt,
            Task { lun: h.lun, expected_in, expected_out, state: TaskState::Receiving { cmd, buffer } },
        );
        self.advance_write(h.itt);
    }

    /// Send the R2Ts the task may have outstanding; hand it to the owner once all data is in.
    fn advance_write(&mut self, itt: u32) {
        let (exp_cmd_sn, max_cmd_sn) = self.window_sns();
        let stat_sn = self.stat_sn;
        let Phase::FullFeature(ffp) = &mut self.phase else { return };
        let Some(task) = ffp.tasks.get_mut(&itt) else { return };
        let TaskState::Receiving { buffer, .. } = &mut task.state else { return };
        let next_ttt = &mut self.next_ttt;
        let r2ts = buffer.solicit(|| Self::alloc_ttt(next_ttt));
        let complete = buffer.is_complete();
        let lun = task.lun;
        for r in r2ts {
            let header = R2t {
                lun,
                itt,
                ttt: r.ttt,
                stat_sn,
                exp_cmd_sn,
                max_cmd_sn,
                r2t_sn: r.r2t_sn,
                buffer_offset: r.buffer_offset,
                desired_data_transfer_length: r.desired_length,
            };
            self.out.push_back((Pdu { header: Header::R2t(header), ahs: Vec::new(), data: Bytes::new() }, self.tx_digests));
        }
        if !complete {
            return;
        }
        let Some(task) = ffp.tasks.get_mut(&itt) else { return };
        let state = std::mem::replace(&mut task.state, TaskState::Running { r2t_count: 0 });
        if let TaskState::Receiving { mut cmd, buffer } = state {
            task.state = TaskState::Running { r2t_count: buffer.r2t_count() };
            cmd.data_out = buffer.into_data();
            self.events.push_back(Event::Command(cmd));
        }
    }

    fn on_data_out(&mut self, pdu: Pdu) {
        let Header::DataOut(h) = &pdu.header else { return };
        let Phase::FullFeature(ffp) = &mut self.phase else { return };
        let Some(task) = ffp.tasks.get_mut(&h.itt) else {
            // Data for a task that is gone (aborted or failed): dropped (§11.5.1).
            tracing::debug!(itt = h.itt, "Data-Out for unknown task dropped");
            return;
        };
        let TaskState::Receiving { buffer, .. } = &mut task.state else {
            tracing::debug!(itt = h.itt, "Data-Out for a task not awaiting data dropped");
            return;
        };
        if let Err(e) = buffer.data_out(h, &pdu.data) {
            // ErrorRecoveryLevel 0: sequence errors are recovered by session recovery (§7.1.5).
            self.close(CloseReason::ProtocolError(e.to_string()));
            return;
        }
        let itt = h.itt;
        self.advance_write(itt);
    }

    fn finish_command(&mut self, itt: u32, completion: ScsiCompletion, spdtl_out: Option<u32>) {
        if self.closed.is_some() {
            return;
        }
        let (exp_cmd_sn, max_cmd_sn) = self.window_sns();
        let Phase::FullFeature(ffp) = &mut self.phase else { return };
        let Some(task) = ffp.tasks.get(&itt) else { return };
        let TaskState::Running { r2t_count } = task.state else { return };
        let Some(task) = ffp.tasks.remove(&itt) else { return };
        let out_residual = spdtl_out.map_or(Residual::default(), |s| Residual::of(task.expected_out, u64::from(s)));
        let c = data_in::Completion {
            itt,
            lun: task.lun,
            status: completion.status,
            sense: &completion.sense,
            data_in: &completion.data_in,
            expected_in: task.expected_in,
            out_residual,
            max_segment: ffp.conn_params.max_xmit_data_segment_length,
            r2t_count,
        };
        let stat_sn = self.stat_sn;
        self.stat_sn = self.stat_sn.wrapping_add(1);
        let digests = self.tx_digests;
        for pdu in data_in::complete(&c, Stamps { stat_sn, exp_cmd_sn, max_cmd_sn }) {
            self.out.push_back((pdu, digests));
        }
    }

    // ----- task management ------------------------------------------------------------------

    fn on_tmf(&mut self, pdu: Pdu) {
        let Header::TaskMgmtRequest(h) = &pdu.header else { return };
        let Phase::FullFeature(ffp) = &mut self.phase else { return };
        if ffp.discovery {
            self.reject_pdu(RejectReason::ProtocolError, &pdu);
            return;
        }
        let lun = h.lun;
        let affected: Vec<u32> = match h.function {
            TmfFunction::AbortTask => {
                if !ffp.tasks.contains_key(&h.referenced_task_tag) {
                    // §11.5.1 b/c: an unknown task is complete if its RefCmdSN is in the window
                    // and before this request (then it counts as received), else does not exist.
                    let response = if ffp.window.in_window(h.ref_cmd_sn) && sn_lt(h.ref_cmd_sn, h.cmd_sn) {
                        ffp.window.skip(h.ref_cmd_sn);
                        TmfResponse::FunctionComplete
                    } else {
                        TmfResponse::TaskDoesNotExist
                    };
                    self.send_tmf_response(h.itt, response);
                    self.drain_window();
                    return;
                }
                vec![h.referenced_task_tag]
            }
            TmfFunction::AbortTaskSet | TmfFunction::ClearTaskSet | TmfFunction::LogicalUnitReset => {
                ffp.tasks.iter().filter(|(_, t)| t.lun == lun).map(|(itt, _)| *itt).collect()
            }
            TmfFunction::TargetWarmReset | TmfFunction::TargetColdReset => ffp.tasks.keys().copied().collect(),
            TmfFunction::ClearAca => Vec::new(),
            TmfFunction::TaskReassign => {
                // Needs ErrorRecoveryLevel 2 (§11.5.1).
                self.send_tmf_response(h.itt, TmfResponse::ReassignmentNotSupported);
                return;
            }
            TmfFunction::Other(_) => {
                self.send_tmf_response(h.itt, TmfResponse::FunctionNotSupported);
                return;
            }
        };
        let mut aborted = Vec::new();
        for itt in affected {
            if let Some(task) = ffp.tasks.remove(&itt) {
                if matches!(task.state, TaskState::Running { .. }) {
                    aborted.push(itt);
                }
            }
        }
        if !aborted.is_empty() {
            aborted.sort_unstable();
            self.events.push_back(Event::Aborted(aborted));
        }
        ffp.tmfs.insert(h.itt, h.function);
        self.events.push_back(Event::TaskMgmt(TaskMgmtEvent {
            itt: h.itt,
            function: h.function,
            lun,
            referenced_task_tag: h.referenced_task_tag,
        }));
    }

    fn send_tmf_response(&mut self, itt: u32, response: TmfResponse) {
        let (exp_cmd_sn, max_cmd_sn) = self.window_sns();
        let stat_sn = self.next_stat_sn();
        self.push(Header::TaskMgmtResponse(TaskMgmtResponse { response, itt, stat_sn, exp_cmd_sn, max_cmd_sn }), Bytes::new());
    }

    // ----- text, NOP, logout ----------------------------------------------------------------

    fn on_text(&mut self, pdu: Pdu) {
        let Header::TextRequest(h) = &pdu.header else { return };
        let Phase::FullFeature(ffp) = &mut self.phase else { return };
        let max_text = usize::try_from(self.config.limits.max_text).unwrap_or(usize::MAX);
        let seg = usize::try_from(ffp.conn_params.max_xmit_data_segment_length.max(1)).unwrap_or(8192);
        // A reserved TTT starts a new exchange (§11.10.4); otherwise it continues ours.
        let continuing = h.ttt != RESERVED_TAG
            && ffp.text.as_ref().is_some_and(|t| t.itt == h.itt && t.ttt == h.ttt);
        if !continuing {
            ffp.text = Some(TextExchange { itt: h.itt, ttt: RESERVED_TAG, rx: Vec::new(), tx_rest: Bytes::new() });
        }
        let Some(ex) = ffp.text.as_mut() else { return };
        if continuing && !ex.tx_rest.is_empty() {
            // The initiator fetches the next piece of our long response.
        } else {
            if ex.rx.len().saturating_add(pdu.data.len()) > max_text {
                ffp.text = None;
                self.reject_pdu(RejectReason::ProtocolError, &pdu);
                return;
            }
            ex.rx.extend_from_slice(&pdu.data);
            if h.continue_ {
                ex.ttt = Self::alloc_ttt(&mut self.next_ttt);
                let ttt = ex.ttt;
                self.send_text_response(h.itt, h.lun, ttt, false, false, Bytes::new());
                return;
            }
            let rx = std::mem::take(&mut ex.rx);
            let Ok(pairs) = text::parse(&rx) else {
                ffp.text = None;
                self.reject_pdu(RejectReason::ProtocolError, &pdu);
                return;
            };
            let own = if ffp.discovery { None } else { ffp.session.target_name.as_deref() };
            let mut reply = Vec::new();
            for (key, value) in &pairs {
                if key == "SendTargets" {
                    reply.extend(discovery::send_targets(value, &self.config.targets, own));
                } else if negotiation::rule_of(key).is_some() {
                    // We do not renegotiate in full feature phase.
                    reply.push((key.clone(), REJECT.to_string()));
                } else {
                    reply.push((key.clone(), NOT_UNDERSTOOD.to_string()));
                }
            }
            ex.tx_rest = Bytes::from(text::encode(&reply));
        }
        let take = ex.tx_rest.len().min(seg);
        let piece = ex.tx_rest.split_to(take);
        let (final_, ttt) = if ex.tx_rest.is_empty() {
            (true, RESERVED_TAG)
        } else {
            ex.ttt = Self::alloc_ttt(&mut self.next_ttt);
            (false, ex.ttt)
        };
        if final_ {
            ffp.text = None;
        }
        self.send_text_response(h.itt, h.lun, ttt, final_, !final_, piece);
    }

    fn send_text_response(&mut self, itt: u32, lun: u64, ttt: u32, final_: bool, continue_: bool, data: Bytes) {
        let (exp_cmd_sn, max_cmd_sn) = self.window_sns();
        let stat_sn = self.next_stat_sn();
        self.push(
            Header::TextResponse(TextResponse { final_, continue_, lun, itt, ttt, stat_sn, exp_cmd_sn, max_cmd_sn }),
            data,
        );
    }

    fn on_nop(&mut self, pdu: Pdu) {
        let Header::NopOut(h) = &pdu.header else { return };
        if h.ttt != RESERVED_TAG || h.itt == RESERVED_TAG {
            // An answer to our NOP-In, or a ping that wants no answer (§11.18).
            return;
        }
        let Phase::FullFeature(ffp) = &self.phase else { return };
        let max = usize::try_from(ffp.conn_params.max_xmit_data_segment_length).unwrap_or(8192);
        let data = pdu.data.slice(..pdu.data.len().min(max));
        let (exp_cmd_sn, max_cmd_sn) = self.window_sns();
        let stat_sn = self.next_stat_sn();
        self.push(
            Header::NopIn(NopIn { lun: h.lun, itt: h.itt, ttt: RESERVED_TAG, stat_sn, exp_cmd_sn, max_cmd_sn }),
            data,
        );
    }

    fn on_logout(&mut self, pdu: Pdu) {
        let Header::LogoutRequest(h) = &pdu.header else { return };
        let Phase::FullFeature(ffp) = &self.phase else { return };
        // §11.15.1 Response: 0 closed, 1 CID not found, 2 recovery not supported.
        let response = match h.reason {
            LogoutReason::CloseSession => 0,
            LogoutReason::CloseConnection if h.cid == ffp.cid => 0,
            LogoutReason::CloseConnection => 1,
            LogoutReason::RemoveConnectionForRecovery => 2,
            LogoutReason::Other(_) => {
                self.reject_pdu(RejectReason::InvalidPduField, &pdu);
                return;
            }
        };
        let time2wait = if response == 0 { 0 } else { ffp.params.default_time2wait };
        let (exp_cmd_sn, max_cmd_sn) = self.window_sns();
        let stat_sn = self.next_stat_sn();
        self.push(
            Header::LogoutResponse(LogoutResponse {
                response,
                itt: h.itt,
                stat_sn,
                exp_cmd_sn,
                max_cmd_sn,
                time2wait,
                time2retain: 0,
            }),
            Bytes::new(),
        );
        if response == 0 {
            self.close(CloseReason::Logout);
        }
    }
}
