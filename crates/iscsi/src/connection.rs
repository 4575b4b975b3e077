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
//! What a peer can make the connection hold is bounded: at most the CmdSN window depth of
//! immediate SCSI commands (more are rejected, RFC 7143 §11.17.1 reason 0x06) on top of the
//! window itself, and write data only as it arrives — [`Connection::held_data_out_bytes`]
//! reports it for a budget across connections.
//!
//! # Data-Out pacing
//! The target decides when to solicit write data (RFC 7143 §4.2.2.3, §11.8), so the owner
//! bounds what the connection takes with [`Connection::set_data_out_allowance`]: R2Ts are
//! issued, in command arrival order, only while the Data-Out held plus the Data-Out still
//! expected by open sequences ([`Connection::committed_data_out_bytes`]) stays within the
//! allowance, and a new WRITE whose immediate and unsolicited data does not fit is answered at
//! once with TASK SET FULL. Two exceptions keep every well-behaved initiator progressing, whatever
//! the allowance: a WRITE arriving while nothing is committed is always taken, and the oldest
//! command still receiving data may always have one R2T sequence outstanding when the
//! connection has none. See [`Connection::set_data_out_allowance`] for the resulting bound.
//!
//! The connection owns login (security stage with AuthMethod=None, operational negotiation),
//! discovery and SendTargets, the CmdSN window and StatSN, immediate/unsolicited/solicited
//! Data-Out assembly via R2T, Data-In splitting with status in the final Data-In, residuals,
//! NOP-Out/NOP-In, Logout, Reject, and task management bookkeeping (RFC 7143).

use crate::acl::{Acl, SessionLimits, SessionSlot};
use crate::chap::{AuthLimiter, ChapConfig};
use crate::data_in::{self, Residual, Stamps};
use crate::discovery::TargetPortal;
use crate::error::ErrorAction;
use crate::framer::{self, Digests, Framed, Framer};
use crate::limits::Limits;
use crate::login::{Login, LoginReply, LoginStatus, SessionType, LOGIN_MAX_SEGMENT};
use crate::negotiation::{
    ConnectionParams, DigestKind, Offers, SessionParams, NOT_UNDERSTOOD, REJECT,
};
use crate::pdu::{
    Ahs, AsyncMessage, Header, LoginRequest, LoginResponse, LogoutReason, LogoutResponse, NopIn,
    Opcode, Pdu, R2t, Reject, RejectReason, ScsiCommand, TaskAttr, TaskMgmtResponse, TextResponse,
    TmfFunction, TmfResponse, RESERVED_TAG,
};
use crate::r2t::{WriteBuffer, WriteParams};
use crate::session::{sn_lt, Admission, CmdWindow};
use crate::{bhs, discovery, negotiation, text};
use bytes::{Bytes, BytesMut};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One target the portal serves, as seen by login and SendTargets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetInfo {
    /// iSCSI name, e.g. `iqn.2026-11.io.ironlun:lab`.
    pub name: String,
    pub alias: Option<String>,
    /// Every portal of every portal group that serves the target, reported by SendTargets as
    /// `TargetAddress=addr:port,tpgt` (§13.3, §13.9; see [`crate::discovery`]).
    pub addresses: Vec<TargetPortal>,
    /// Target portal group tag (§13.9, reported as TargetPortalGroupTag in login).
    pub portal_group_tag: u16,
    /// Initiators that may log in to it and see it in SendTargets ([`Acl::allow_all`] by default).
    pub acl: Acl,
    /// CHAP an initiator must pass to log in to this target (§12.1); `None`: AuthMethod=None.
    pub chap: Option<ChapConfig>,
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
    /// Live-session counters shared by all the daemon's portals; a login that would exceed
    /// a limit fails with OUT OF RESOURCES (§11.13.5).
    pub sessions: Arc<SessionLimits>,
    /// Liveness timers of each connection.
    pub timeouts: Timeouts,
    /// CHAP a discovery session must pass (§12.1); `None`: AuthMethod=None.
    pub discovery_chap: Option<ChapConfig>,
    /// CHAP failures per initiator name, shared by all connections of the portal.
    pub auth_limiter: Arc<Mutex<AuthLimiter>>,
}

/// Per-connection timers, driven through [`Connection::poll_timeout`] /
/// [`Connection::handle_timeout`]. A zero duration disables that timer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Idle time (no PDU received) in full feature phase after which the target pings with a
    /// NOP-In (ITT 0xffffffff, a fresh TTT: RFC 7143 §11.19.2).
    pub nop_interval: Duration,
    /// Time the initiator has to answer a ping with a NOP-Out carrying its TTT (§11.18)
    /// before the connection is closed.
    pub nop_timeout: Duration,
    /// The whole login phase, from the connection's creation to full feature phase.
    pub login: Duration,
    /// Idle time after which a discovery session is closed.
    pub discovery_idle: Duration,
}

impl Default for Timeouts {
    /// 5 s pings, 10 s to answer, 15 s to log in, 60 s idle discovery sessions.
    fn default() -> Self {
        Timeouts {
            nop_interval: Duration::from_secs(5),
            nop_timeout: Duration::from_secs(10),
            login: Duration::from_secs(15),
            discovery_idle: Duration::from_secs(60),
        }
    }
}

impl Timeouts {
    /// Every timer off.
    pub const DISABLED: Timeouts = Timeouts {
        nop_interval: Duration::ZERO,
        nop_timeout: Duration::ZERO,
        login: Duration::ZERO,
        discovery_idle: Duration::ZERO,
    };
}

/// `at + d`, or `None` when `d` is zero (timer disabled) or the sum overflows.
fn deadline(at: Instant, d: Duration) -> Option<Instant> {
    if d.is_zero() {
        None
    } else {
        at.checked_add(d)
    }
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
    /// The session authenticated with CHAP at login (RFC 7143 §12.1.3), e.g. for
    /// authorizing target resets (§11.6.1 response 6).
    pub chap: bool,
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
    /// When its header was received (the `now` of that [`Connection::receive`]): a LUN
    /// RESET, target reset or CLEAR TASK SET that arrived later on any connection aborts it
    /// even if its Data-Out completes afterwards (SAM-5 §7).
    pub arrived: Instant,
}

/// A task management request the SCSI layer must carry out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskMgmtEvent {
    pub itt: u32,
    pub function: TmfFunction,
    pub lun: u64,
    pub referenced_task_tag: u32,
    /// When the request was received (see [`ScsiCommandEvent::arrived`]).
    pub arrived: Instant,
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
    /// The initiator logged out (§11.14) for this reason, and the response was sent.
    Logout(LogoutReason),
    LoginFailed,
    ProtocolError(String),
    /// A [`Timeouts`] timer expired (login, unanswered NOP-In, idle discovery session).
    Timeout(&'static str),
    /// The owner closed it, e.g. because a new login reinstated the session (RFC 7143 §6.3.5).
    Closed(&'static str),
}

/// The reason in words, for logs: `logout (close the session)`, `login failed`, `protocol
/// error: …`, `timeout: NOP-In unanswered`, `closed by the target: session reinstated …`.
impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CloseReason::Logout(r) => write!(f, "logout ({r})"),
            CloseReason::LoginFailed => f.write_str("login failed"),
            CloseReason::ProtocolError(e) => write!(f, "protocol error: {e}"),
            CloseReason::Timeout(what) => write!(f, "timeout: {what}"),
            CloseReason::Closed(why) => write!(f, "closed by the target: {why}"),
        }
    }
}

/// Fixed-format sense for a write whose Data-Out carried a wrong DataSN: ABORTED COMMAND,
/// DATA PHASE ERROR (4Bh/00h, SPC-4 Table 28).
const SENSE_DATA_PHASE_ERROR: [u8; 18] = [
    0x70, 0, 0x0b, 0, 0, 0, 0, 0x0a, 0, 0, 0, 0, 0x4b, 0, 0, 0, 0, 0,
];

/// Fixed-format sense for a command whose ExpectedDataTransferLength exceeds
/// [`Limits::max_transfer`]: ILLEGAL REQUEST, INVALID FIELD IN CDB (SPC-4 §4.5.3, Table 28).
const SENSE_TRANSFER_TOO_LONG: [u8; 18] = [
    0x70, 0, 0x05, 0, 0, 0, 0, 0x0a, 0, 0, 0, 0, 0x24, 0, 0, 0, 0, 0,
];
/// SCSI status CHECK CONDITION (SAM-5 §5.3).
const STATUS_CHECK_CONDITION: u8 = 0x02;
/// SCSI status TASK SET FULL (SAM-5 §5.3.1): the command was not started for lack of
/// resources and may be retried; initiators back off (Linux also lowers the queue depth).
const STATUS_TASK_SET_FULL: u8 = 0x28;
/// AsyncEvent 1: the target requests Logout (RFC 7143 §11.9.1).
const ASYNC_EVENT_LOGOUT_REQUEST: u8 = 1;

/// What one command's write buffer adds to the connection's Data-Out totals.
#[derive(Debug, Clone, Copy)]
struct Usage {
    held: usize,
    awaited: usize,
    r2ts: usize,
}

impl Usage {
    fn of(b: &WriteBuffer) -> Usage {
        Usage {
            held: b.footprint(),
            awaited: b.awaited_bytes(),
            r2ts: b.open_r2ts(),
        }
    }
}

/// Sums of [`Usage`] over the tasks still receiving Data-Out, kept up to date at each change.
#[derive(Debug, Default, Clone, Copy)]
struct DataOutTotals {
    /// Memory held for their data ([`WriteBuffer::footprint`]).
    held: usize,
    /// Data their open sequences still expect ([`WriteBuffer::awaited_bytes`]).
    awaited: usize,
    /// Open R2T sequences.
    r2ts: usize,
}

impl DataOutTotals {
    fn add(&mut self, u: Usage) {
        self.held = self.held.saturating_add(u.held);
        self.awaited = self.awaited.saturating_add(u.awaited);
        self.r2ts = self.r2ts.saturating_add(u.r2ts);
    }

    fn sub(&mut self, u: Usage) {
        self.held = self.held.saturating_sub(u.held);
        self.awaited = self.awaited.saturating_sub(u.awaited);
        self.r2ts = self.r2ts.saturating_sub(u.r2ts);
    }

    fn change(&mut self, before: Usage, after: Usage) {
        self.sub(before);
        self.add(after);
    }

    fn committed(&self) -> usize {
        self.held.saturating_add(self.awaited)
    }
}

/// Target-side connection state machine.
pub struct Connection {
    config: Arc<PortalConfig>,
    framer: Framer,
    phase: Phase,
    events: VecDeque<Event>,
    out: VecDeque<(Pdu, Digests)>,
    closed: Option<CloseReason>,
    /// The status of the login response that failed the login (for metrics by reason).
    login_failure: Option<LoginStatus>,
    /// StatSN the next response carries (§4.2.2.2).
    stat_sn: u32,
    tsih: u16,
    /// Digests in force for what we send.
    tx_digests: Digests,
    next_ttt: u32,
    /// Scratch space the BHSs of outgoing PDUs are encoded into and split off (reused).
    arena: BytesMut,
    /// When the connection was created: the login timer runs from here.
    started: Instant,
    /// The `now` of the last [`Connection::receive`] (idle timers run from here).
    last_rx: Instant,
    /// Our outstanding NOP-In ping: its TTT and when it was sent.
    ping: Option<(u32, Instant)>,
    /// Data-Out held and expected by the tasks still receiving it (see
    /// [`Connection::held_data_out_bytes`], [`Connection::committed_data_out_bytes`]).
    data_out: DataOutTotals,
    /// [`Connection::set_data_out_allowance`]; unlimited until set.
    data_out_allowance: usize,
    /// WRITEs answered with TASK SET FULL ([`Connection::task_set_full_count`]).
    task_set_full: u64,
    /// The last [`Connection::solicit_paced`] held an R2T back for lack of allowance.
    r2ts_withheld: bool,
    /// The owner lets this session send TARGET WARM/COLD RESET
    /// ([`Connection::set_target_reset_allowed`]); refused until then.
    target_reset_allowed: bool,
    /// The address the connection was accepted on ([`Connection::set_local_addr`]).
    local_addr: Option<std::net::SocketAddr>,
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
    /// ITTs of the tasks receiving Data-Out, in command arrival order: R2Ts are issued in this
    /// order ([`Connection::set_data_out_allowance`]).
    receiving: VecDeque<u32>,
    /// TMFs handed to the owner, by ITT.
    tmfs: HashMap<u32, TmfFunction>,
    text: Option<TextExchange>,
    /// This session's place in [`PortalConfig::sessions`], given back on close or drop.
    slot: Option<SessionSlot>,
}

struct Task {
    lun: u64,
    expected_in: u32,
    expected_out: u32,
    state: TaskState,
}

enum TaskState {
    /// Waiting for Data-Out.
    Receiving {
        cmd: ScsiCommandEvent,
        buffer: WriteBuffer,
    },
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
        let mut limits = config.limits.clone();
        limits.max_data_segment = limits
            .max_data_segment
            .min(u32::try_from(LOGIN_MAX_SEGMENT).unwrap_or(8192));
        let login = Login::new(
            config.offers.clone(),
            config.limits.max_data_segment,
            config.limits.max_text,
        )
        .with_auth(
            config.discovery_chap.clone(),
            Some(Arc::clone(&config.auth_limiter)),
        );
        Connection {
            framer: Framer::new(limits),
            phase: Phase::Login(Box::new(LoginPhase {
                login,
                exp_cmd_sn: None,
                cid: 0,
            })),
            events: VecDeque::new(),
            out: VecDeque::new(),
            closed: None,
            login_failure: None,
            stat_sn: 0,
            tsih: tsih.max(1),
            tx_digests: Digests::default(),
            next_ttt: 0,
            arena: BytesMut::new(),
            config,
            started: now,
            last_rx: now,
            ping: None,
            data_out: DataOutTotals::default(),
            data_out_allowance: usize::MAX,
            task_set_full: 0,
            r2ts_withheld: false,
            target_reset_allowed: false,
            local_addr: None,
        }
    }

    /// Consume whole PDUs from the front of `buf`. Partial PDUs stay in `buf` for the next call.
    /// `now` is the time the bytes were read (one clock read per batch suffices): it restarts
    /// the idle timers.
    pub fn receive(&mut self, buf: &mut BytesMut, now: Instant) {
        self.last_rx = now;
        while self.closed.is_none() {
            match self.framer.next_pdu(buf) {
                Ok(None) => break,
                Ok(Some(Framed::Pdu(pdu))) => {
                    tracing::trace!(header = ?pdu.header, data = pdu.data.len(), "rx");
                    self.handle_pdu(pdu);
                }
                Ok(Some(Framed::Bad { error, header })) => match (error.action(), &self.phase) {
                    (ErrorAction::Reject(reason), Phase::FullFeature(_)) => {
                        tracing::debug!(%error, "rejecting PDU");
                        let data_out =
                            header.first().map(|b| b & 0x3f) == Some(Opcode::DataOut as u8);
                        self.send_reject(reason, header);
                        if reason == RejectReason::DataDigestError && data_out {
                            // §7.8 / §7.1.5: at ErrorRecoveryLevel 0 a lost Data-Out cannot be
                            // re-requested (no recovery R2T): the task is lost, so is the session.
                            self.close(CloseReason::ProtocolError(
                                "data digest error on Data-Out at ErrorRecoveryLevel 0".to_string(),
                            ));
                        }
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
        self.poll_transmit_into(&mut pieces);
        Some(Transmit { pieces })
    }

    /// As [`Connection::poll_transmit`], appending the pieces to `pieces` (a vector the owner
    /// reuses). Headers share one reused arena, payload `Bytes` are passed through: once the
    /// previous batch's pieces are dropped this allocates nothing. Returns whether anything
    /// was added.
    pub fn poll_transmit_into(&mut self, pieces: &mut Vec<Bytes>) -> bool {
        let any = !self.out.is_empty();
        while let Some((pdu, digests)) = self.out.pop_front() {
            framer::encode_pdu_into(&pdu, digests, &mut self.arena, pieces);
        }
        any
    }

    /// Answer a [`Event::Command`]. Unknown or aborted ITTs are ignored.
    pub fn complete_command(&mut self, itt: u32, completion: ScsiCompletion) {
        self.finish_command(itt, completion, None);
    }

    /// End a [`Event::Command`] without any response: the SCSI layer terminated it without
    /// status (SAM-5 §5.6: aborted by another I_T nexus's task management function or
    /// PREEMPT AND ABORT while the control mode page's TAS is zero). Its ITT is forgotten and
    /// nothing is sent; the initiator learns from a unit attention on its next command and
    /// may reuse the ITT. The CmdSN window it held opens with the next response. Unknown or
    /// aborted ITTs are ignored.
    pub fn end_command_without_response(&mut self, itt: u32) {
        let Phase::FullFeature(ffp) = &mut self.phase else {
            return;
        };
        if ffp
            .tasks
            .get(&itt)
            .is_some_and(|t| matches!(t.state, TaskState::Running { .. }))
        {
            ffp.tasks.remove(&itt);
        }
    }

    /// Answer a [`Event::Command`] that wrote, also reporting `spdtl_out`: the number of bytes
    /// the CDB asked the initiator to send (SPDTL). When it differs from the initiator's
    /// ExpectedDataTransferLength the response carries the write residual (§11.4.5: overflow
    /// when the CDB wanted more, underflow when less).
    pub fn complete_command_with_spdtl(
        &mut self,
        itt: u32,
        completion: ScsiCompletion,
        spdtl_out: u32,
    ) {
        self.finish_command(itt, completion, Some(spdtl_out));
    }

    /// The local address of the connection's socket (the address the initiator reached the
    /// portal on). SendTargets names wildcard portals (`0.0.0.0`, `[::]`) with it
    /// ([`crate::discovery::TargetPortal::reported`]); unset, they are left out of the answer.
    pub fn set_local_addr(&mut self, addr: std::net::SocketAddr) {
        self.local_addr = Some(addr);
    }

    /// Whether this session may send TARGET WARM RESET and TARGET COLD RESET (the owner's
    /// authorization policy, decided once it saw [`Event::LoggedIn`]). Refused requests are
    /// answered "Function authorization failed" (§11.6.1 response 6) here, before any task
    /// is aborted, and never reach the owner. Default: refused.
    pub fn set_target_reset_allowed(&mut self, allowed: bool) {
        self.target_reset_allowed = allowed;
    }

    /// Answer a [`Event::TaskMgmt`].
    pub fn complete_tmf(&mut self, itt: u32, response: TmfResponse) {
        if self.closed.is_some() {
            return;
        }
        let Phase::FullFeature(ffp) = &mut self.phase else {
            return;
        };
        let Some(function) = ffp.tmfs.remove(&itt) else {
            return;
        };
        self.send_tmf_response(itt, response);
        if function == TmfFunction::TargetColdReset && response == TmfResponse::FunctionComplete {
            // §11.5.1: after a cold reset the target drops all its connections.
            self.close(CloseReason::ProtocolError("target cold reset".to_string()));
        }
    }

    /// When [`Connection::handle_timeout`] wants to be called next: the login deadline during
    /// login; in full feature phase the next NOP-In ping (idle for `nop_interval`) or the
    /// deadline of the outstanding one, and for discovery sessions the idle deadline. `None`
    /// once closed or with every timer disabled. Calling `handle_timeout` earlier is harmless.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.closed.is_some() {
            return None;
        }
        let t = &self.config.timeouts;
        match &self.phase {
            Phase::Login(_) => deadline(self.started, t.login),
            Phase::FullFeature(ffp) => {
                let ping = match self.ping {
                    Some((_, sent)) => deadline(sent, t.nop_timeout),
                    None => deadline(self.last_rx, t.nop_interval),
                };
                let idle = if ffp.discovery {
                    deadline(self.last_rx, t.discovery_idle)
                } else {
                    None
                };
                match (ping, idle) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            }
        }
    }

    /// Run the timers that are due at `now`: close on an expired login, an unanswered NOP-In or
    /// an idle discovery session ([`CloseReason::Timeout`]); send a NOP-In ping after
    /// `nop_interval` without a received PDU.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.closed.is_some() {
            return;
        }
        let t = self.config.timeouts;
        let due = |at: Instant, d: Duration| deadline(at, d).is_some_and(|when| now >= when);
        let discovery = match &self.phase {
            Phase::Login(_) => {
                if due(self.started, t.login) {
                    tracing::debug!("login timeout");
                    self.close(CloseReason::Timeout("login"));
                }
                return;
            }
            Phase::FullFeature(ffp) => ffp.discovery,
        };
        if discovery && due(self.last_rx, t.discovery_idle) {
            self.close(CloseReason::Timeout("idle discovery session"));
            return;
        }
        match self.ping {
            Some((_, sent)) => {
                if due(sent, t.nop_timeout) {
                    tracing::debug!("NOP-In ping unanswered");
                    self.close(CloseReason::Timeout("NOP-In unanswered"));
                }
            }
            None => {
                if due(self.last_rx, t.nop_interval) {
                    self.send_ping(now);
                }
            }
        }
    }

    /// Ask the initiator to log out within `within_secs` seconds (graceful shutdown): an Async
    /// Message with AsyncEvent 1, Parameter3 = the time to logout (RFC 7143 §11.9.1). Only in
    /// full feature phase of a normal session; returns whether the message was queued. The
    /// owner closes the connection itself if no Logout arrives in time.
    pub fn request_logout(&mut self, within_secs: u16) -> bool {
        if self.closed.is_some() {
            return false;
        }
        match &self.phase {
            Phase::FullFeature(ffp) if !ffp.discovery => {}
            _ => return false,
        }
        let (exp_cmd_sn, max_cmd_sn) = self.window_sns();
        let stat_sn = self.next_stat_sn();
        self.push(
            Header::AsyncMessage(AsyncMessage {
                lun: 0,
                stat_sn,
                exp_cmd_sn,
                max_cmd_sn,
                async_event: ASYNC_EVENT_LOGOUT_REQUEST,
                async_vcode: 0,
                parameter1: 0,
                parameter2: 0,
                parameter3: within_secs,
            }),
            Bytes::new(),
        );
        true
    }

    /// Close at the owner's request (e.g. session reinstatement, RFC 7143 §6.3.5): running
    /// commands are reported [`Event::Aborted`], nothing more is sent.
    pub fn close_by_owner(&mut self, why: &'static str) {
        self.close(CloseReason::Closed(why));
    }

    /// True once the connection must be closed (after its last transmit is written).
    pub fn is_closed(&self) -> Option<&CloseReason> {
        self.closed.as_ref()
    }

    /// The login status class and detail (RFC 7143 §11.13.5) that failed the login, if a
    /// login response with a non-success status was sent.
    pub fn login_failure(&self) -> Option<LoginStatus> {
        self.login_failure
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

    /// Bytes of memory this connection holds for the write data of commands still receiving
    /// Data-Out (immediate, unsolicited and solicited data not yet handed on as an
    /// [`Event::Command`]). O(1): maintained as data arrives and tasks leave that state.
    ///
    /// Contract: it grows only with payload actually received — at most twice the bytes
    /// received for those commands plus [`crate::r2t::RUN_OVERHEAD`] per separate stretch of
    /// data, never their ExpectedDataTransferLength up front — and
    /// drops when a command's data is handed on (the owner then holds it in
    /// [`ScsiCommandEvent::data_out`]), when a TMF or close removes the command, and to 0 once
    /// the connection is closed. Read it after [`Connection::receive`] to budget memory
    /// across connections; [`Connection::set_data_out_allowance`] bounds it before the data
    /// is sent.
    pub fn held_data_out_bytes(&self) -> usize {
        self.data_out.held
    }

    /// [`Connection::held_data_out_bytes`] plus the Data-Out the open sequences still expect:
    /// the unsolicited data announced by WRITEs already taken, and the rest of each R2T sent.
    /// A well-behaved initiator sends that data without being asked again, so this is what
    /// the connection is committed to hold; it is what the allowance bounds. Reserve it (not
    /// just what is held) in a budget across connections, so that another connection does not
    /// plan with room this one already promised. O(1).
    pub fn committed_data_out_bytes(&self) -> usize {
        self.data_out.committed()
    }

    /// Set how much Data-Out ([`Connection::committed_data_out_bytes`]) the connection may
    /// commit to; unlimited by default. Call it whenever the owner's room changes (before
    /// [`Connection::receive`], after releasing memory): when the allowance grows, R2Ts held
    /// back go out now (drain [`Connection::poll_transmit`] afterwards). Lowering it never
    /// cancels an R2T already sent.
    ///
    /// Contract (RFC 7143 §4.2.2.3, §11.8: the target decides when to solicit):
    /// - R2Ts are issued for the commands receiving data in their arrival order (an earlier
    ///   command is never overtaken), each R2T for the rest of its command up to
    ///   MaxBurstLength and within MaxOutstandingR2T, while committed + its length ≤ the
    ///   allowance;
    /// - progress: when no R2T sequence is open on the connection, the oldest command still
    ///   receiving data gets its next R2T whatever the allowance, so a well-behaved initiator
    ///   always finishes its oldest write, whose data then leaves the connection as
    ///   [`Event::Command`] and frees room;
    /// - a WRITE whose immediate and unsolicited data (up to FirstBurstLength) would take the
    ///   committed bytes over the allowance, while some are already committed, is answered at
    ///   once with status TASK SET FULL (SAM-5 §5.3.1) and its data is not kept; its later
    ///   unsolicited Data-Out PDUs are dropped as data of a finished task. The CmdSN window
    ///   advances as for any completed command.
    ///
    /// Bound: committed ≤ max(allowance, one WRITE's unsolicited data) + what the oldest
    /// receiving command takes past it by the progress rule — at most that command's
    /// ExpectedDataTransferLength ([`crate::Limits::max_transfer`]).
    pub fn set_data_out_allowance(&mut self, bytes: usize) {
        let grew = bytes > self.data_out_allowance;
        self.data_out_allowance = bytes;
        // Every other change that can admit an R2T solicits on the spot; here only more room
        // can, and only when some R2T waits for it (so an unchanged allowance costs nothing).
        if grew && self.r2ts_withheld {
            self.solicit_paced();
        }
    }

    /// The allowance in force ([`Connection::set_data_out_allowance`]).
    pub fn data_out_allowance(&self) -> usize {
        self.data_out_allowance
    }

    /// How many WRITEs were answered with TASK SET FULL for lack of Data-Out allowance.
    pub fn task_set_full_count(&self) -> u64 {
        self.task_set_full
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

    /// ExpCmdSN and MaxCmdSN to stamp on a response, granting new credit as commands finish.
    /// Every task (immediate ones included) and every TMF awaiting its answer holds a slot, so
    /// MaxCmdSN stays put while they fill the window (§4.2.2.1).
    fn window_sns(&mut self) -> (u32, u32) {
        match &mut self.phase {
            Phase::FullFeature(ffp) => {
                let outstanding = ffp.tasks.len().saturating_add(ffp.tmfs.len());
                let max = ffp.window.grant(outstanding);
                (ffp.window.exp_cmd_sn(), max)
            }
            Phase::Login(lp) => {
                let exp = lp.exp_cmd_sn.unwrap_or(0);
                (
                    exp,
                    exp.wrapping_add(self.config.cmd_window.max(1))
                        .wrapping_sub(1),
                )
            }
        }
    }

    /// A target ping: NOP-In with ITT 0xffffffff and a fresh TTT the initiator must echo; its
    /// StatSN is the next one, not advanced (RFC 7143 §11.19.2).
    fn send_ping(&mut self, now: Instant) {
        let ttt = Self::alloc_ttt(&mut self.next_ttt);
        let (exp_cmd_sn, max_cmd_sn) = self.window_sns();
        let stat_sn = self.stat_sn;
        self.push(
            Header::NopIn(NopIn {
                lun: 0,
                itt: RESERVED_TAG,
                ttt,
                stat_sn,
                exp_cmd_sn,
                max_cmd_sn,
            }),
            Bytes::new(),
        );
        self.ping = Some((ttt, now));
    }

    fn push(&mut self, header: Header, data: Bytes) {
        self.out.push_back((
            Pdu {
                header,
                ahs: Vec::new(),
                data,
            },
            self.tx_digests,
        ));
    }

    /// Close (idempotent): commands already handed to the owner are reported aborted.
    fn close(&mut self, reason: CloseReason) {
        if self.closed.is_some() {
            return;
        }
        tracing::debug!(?reason, "closing connection");
        self.data_out = DataOutTotals::default();
        if let Phase::FullFeature(ffp) = &mut self.phase {
            ffp.slot = None;
            ffp.receiving.clear();
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
            Header::Reject(Reject {
                reason,
                stat_sn,
                exp_cmd_sn,
                max_cmd_sn,
                data_sn_or_r2t_sn: 0,
            }),
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
                _ => self.close(CloseReason::ProtocolError(
                    "non-login PDU during login".to_string(),
                )),
            }
            return;
        }
        let (immediate, cmd_sn) = match &pdu.header {
            Header::DataOut(_) => {
                self.on_data_out(pdu);
                return;
            }
            Header::NopOut(h) if h.ttt != RESERVED_TAG => {
                // The answer to our ping (§11.18: TTT echoed, CmdSN not advanced); one that
                // matches no outstanding ping is ignored.
                if self.ping.is_some_and(|(ttt, _)| ttt == h.ttt) {
                    self.ping = None;
                }
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
            if let Some(reason) = self.refuse_immediate(&pdu.header) {
                tracing::debug!(?reason, "immediate command refused");
                self.reject_pdu(reason, &pdu);
                return;
            }
            self.execute(pdu);
            return;
        }
        let Phase::FullFeature(ffp) = &mut self.phase else {
            return;
        };
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

    /// Whether an immediate command must be refused. Immediate commands take no CmdSN slot
    /// (RFC 7143 §3.2.2.1, §4.2.2.1), so without a bound a peer could start any number of them;
    /// the target may refuse them with Reject reason 0x06, "too many immediate commands"
    /// (§11.17.1). A SCSI command is refused while the tasks already outstanding (receiving
    /// data or running, immediate ones included) fill the CmdSN window depth; a TMF while as
    /// many TMFs await the owner's answer — counted apart, so that stuck commands never block
    /// the ABORT TASK meant for them. NOP-Out, Text and Logout are answered at once and hold
    /// nothing (a NOP-In echoes at most the NOP-Out's own data; one Text exchange at a time).
    fn refuse_immediate(&self, header: &Header) -> Option<RejectReason> {
        let Phase::FullFeature(ffp) = &self.phase else {
            return None;
        };
        let depth = usize::try_from(ffp.window.window()).unwrap_or(usize::MAX);
        let full = match header {
            Header::ScsiCommand(_) => ffp.tasks.len() >= depth,
            Header::TaskMgmtRequest(_) => ffp.tmfs.len() >= depth,
            _ => false,
        };
        full.then_some(RejectReason::ImmediateCommandReject)
    }

    fn drain_window(&mut self) {
        loop {
            if self.closed.is_some() {
                return;
            }
            let Phase::FullFeature(ffp) = &mut self.phase else {
                return;
            };
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
        let Phase::Login(lp) = &mut self.phase else {
            return;
        };
        if lp.exp_cmd_sn.is_none() {
            // §11.13.4: the first response's StatSN starts the connection's StatSN.
            lp.exp_cmd_sn = Some(req.cmd_sn);
            lp.cid = req.cid;
            self.stat_sn = req.exp_stat_sn;
        }
        lp.login.set_now(self.last_rx);
        let mut reply: LoginReply = lp.login.on_request(
            req,
            data,
            &self.config.targets,
            self.config.portal_group_tag,
        );
        let mut slot = None;
        if reply.complete && reply.status == LoginStatus::SUCCESS {
            // Admission happens before the final response, so a refused session never exists.
            let target = lp.login.identity().and_then(|i| i.target).map(|t| t.name);
            match self.config.sessions.acquire(target.as_deref()) {
                Ok(s) => slot = Some(s),
                Err(limit) => {
                    tracing::debug!(?limit, target, "login refused: session limit reached");
                    reply = LoginReply {
                        transit: false,
                        continue_: false,
                        nsg: reply.csg,
                        status: LoginStatus::OUT_OF_RESOURCES,
                        data: Bytes::new(),
                        complete: false,
                        ..reply
                    };
                }
            }
        }
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
            Pdu {
                header: Header::LoginResponse(header),
                ahs: Vec::new(),
                data: reply.data,
            },
            Digests::default(),
        ));
        if failed {
            tracing::debug!(?reply.status, "login failed");
            self.closed = Some(CloseReason::LoginFailed);
            self.login_failure = Some(reply.status);
            return;
        }
        if reply.complete {
            self.enter_full_feature(exp_cmd_sn, slot);
        }
    }

    fn enter_full_feature(&mut self, exp_cmd_sn: u32, slot: Option<SessionSlot>) {
        let Phase::Login(lp) = &mut self.phase else {
            return;
        };
        let Some(identity) = lp.login.identity() else {
            self.close(CloseReason::ProtocolError(
                "login completed without identity".to_string(),
            ));
            return;
        };
        let cid = lp.cid;
        let neg = &lp.login.negotiation;
        let conn_params = neg.connection.clone();
        let params = neg.session.clone();
        let discovery = identity.session_type == SessionType::Discovery;
        let portal_group_tag = identity
            .target
            .as_ref()
            .map_or(self.config.portal_group_tag, |t| t.portal_group_tag);
        let session = SessionInfo {
            initiator_name: identity.initiator_name,
            initiator_alias: identity.initiator_alias,
            isid: identity.isid,
            tsih: self.tsih,
            target_name: identity.target.map(|t| t.name),
            portal_group_tag,
            chap: identity.chap,
        };
        self.tx_digests = Digests {
            header: conn_params.header_digest == DigestKind::Crc32c,
            data: conn_params.data_digest == DigestKind::Crc32c,
        };
        self.framer.digests = self.tx_digests;
        // PDUs larger than what we declared now end the connection in the framer (§13.12).
        self.framer.limits.max_data_segment = self
            .config
            .limits
            .max_data_segment
            .min(conn_params.max_recv_data_segment_length);
        self.events.push_back(Event::LoggedIn(session.clone()));
        self.phase = Phase::FullFeature(Box::new(Ffp {
            session,
            discovery,
            cid,
            window: CmdWindow::new(exp_cmd_sn, self.config.cmd_window),
            params,
            conn_params,
            tasks: HashMap::new(),
            receiving: VecDeque::with_capacity(
                usize::try_from(self.config.cmd_window)
                    .unwrap_or(0)
                    .min(4096),
            ),
            tmfs: HashMap::new(),
            text: None,
            slot,
        }));
    }

    // ----- SCSI commands and data -----------------------------------------------------------

    fn on_command(&mut self, pdu: Pdu) {
        let Header::ScsiCommand(h) = &pdu.header else {
            return;
        };
        let h: ScsiCommand = h.clone();
        let Phase::FullFeature(ffp) = &mut self.phase else {
            return;
        };
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
        if imm_len > 0
            && (!h.write
                || !params.immediate_data
                || imm_len > expected_out
                || imm_len > params.first_burst_length)
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
            arrived: self.last_rx,
        };
        if expected_in > self.config.limits.max_transfer
            || expected_out > self.config.limits.max_transfer
        {
            // Too large to buffer: fail the command before allocating (DESIGN.md §3 rule 2).
            let sense = Bytes::from_static(&SENSE_TRANSFER_TOO_LONG);
            let task = (h.itt, h.lun, expected_in, expected_out);
            self.answer_at_once(task, STATUS_CHECK_CONDITION, sense);
            return;
        }
        if expected_out == 0 {
            ffp.tasks.insert(
                h.itt,
                Task {
                    lun: h.lun,
                    expected_in,
                    expected_out,
                    state: TaskState::Running { r2t_count: 0 },
                },
            );
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
            data_sequence_in_order: params.data_sequence_in_order,
        };
        let committed = self.data_out.committed();
        let unsolicited = usize::try_from(unsolicited_end).unwrap_or(usize::MAX);
        if unsolicited > 0
            && committed > 0
            && committed
                .checked_add(unsolicited)
                .is_none_or(|c| c > self.data_out_allowance)
        {
            // Not kept: refused before its data is buffered (see `set_data_out_allowance`).
            tracing::debug!(
                itt = h.itt,
                committed,
                unsolicited,
                allowance = self.data_out_allowance,
                "WRITE refused with TASK SET FULL: no Data-Out allowance left"
            );
            self.task_set_full = self.task_set_full.saturating_add(1);
            let task = (h.itt, h.lun, expected_in, expected_out);
            self.answer_at_once(task, STATUS_TASK_SET_FULL, Bytes::new());
            return;
        }
        let buffer = WriteBuffer::new(expected_out, &pdu.data, unsolicited_end, wparams);
        self.data_out.add(Usage::of(&buffer));
        ffp.tasks.insert(
            h.itt,
            Task {
                lun: h.lun,
                expected_in,
                expected_out,
                state: TaskState::Receiving { cmd, buffer },
            },
        );
        ffp.receiving.push_back(h.itt);
        if self.advance_write(h.itt) {
            self.solicit_paced();
        }
    }

    /// Issue the R2Ts the allowance admits, for the tasks receiving data in arrival order
    /// (the rules are [`Connection::set_data_out_allowance`]'s).
    fn solicit_paced(&mut self) {
        self.r2ts_withheld = false;
        if self.closed.is_some() {
            return;
        }
        let Phase::FullFeature(ffp) = &self.phase else {
            return;
        };
        if ffp.receiving.is_empty() {
            return;
        }
        let (exp_cmd_sn, max_cmd_sn) = self.window_sns();
        let stat_sn = self.stat_sn;
        let Phase::FullFeature(ffp) = &mut self.phase else {
            return;
        };
        for (i, itt) in ffp.receiving.iter().enumerate() {
            let Some(task) = ffp.tasks.get_mut(itt) else {
                continue;
            };
            let lun = task.lun;
            let TaskState::Receiving { buffer, .. } = &mut task.state else {
                continue;
            };
            while let Some(len) = buffer.next_r2t_len() {
                let len = usize::try_from(len).unwrap_or(usize::MAX);
                let fits = self
                    .data_out
                    .committed()
                    .checked_add(len)
                    .is_some_and(|c| c <= self.data_out_allowance);
                // Progress: the oldest receiving task may have one sequence when none is open.
                let progress = i == 0 && self.data_out.r2ts == 0;
                if !fits && !progress {
                    // Later tasks wait too: R2Ts go out in arrival order.
                    self.r2ts_withheld = true;
                    return;
                }
                let before = Usage::of(buffer);
                let next_ttt = &mut self.next_ttt;
                let Some(r) = buffer.solicit_one(|| Self::alloc_ttt(next_ttt)) else {
                    break;
                };
                self.data_out.change(before, Usage::of(buffer));
                let header = R2t {
                    lun,
                    itt: *itt,
                    ttt: r.ttt,
                    stat_sn,
                    exp_cmd_sn,
                    max_cmd_sn,
                    r2t_sn: r.r2t_sn,
                    buffer_offset: r.buffer_offset,
                    desired_data_transfer_length: r.desired_length,
                };
                self.out.push_back((
                    Pdu {
                        header: Header::R2t(header),
                        ahs: Vec::new(),
                        data: Bytes::new(),
                    },
                    self.tx_digests,
                ));
            }
        }
    }

    /// Answer a command with `status` and `sense` before any of its data is kept or it reaches
    /// the owner: it enters the task set as running and completes at once. `task` is
    /// (ITT, LUN, expected Data-In length, expected Data-Out length).
    fn answer_at_once(&mut self, task: (u32, u64, u32, u32), status: u8, sense: Bytes) {
        let (itt, lun, expected_in, expected_out) = task;
        let Phase::FullFeature(ffp) = &mut self.phase else {
            return;
        };
        ffp.tasks.insert(
            itt,
            Task {
                lun,
                expected_in,
                expected_out,
                state: TaskState::Running { r2t_count: 0 },
            },
        );
        let completion = ScsiCompletion {
            status,
            sense,
            data_in: Bytes::new(),
        };
        self.finish_command(itt, completion, None);
    }

    /// Hand the task to the owner once all its data is in. Returns whether it still receives
    /// data (then it may want R2Ts: [`Connection::solicit_paced`]); `false` once it left that
    /// state, its room freed.
    fn advance_write(&mut self, itt: u32) -> bool {
        let Phase::FullFeature(ffp) = &mut self.phase else {
            return false;
        };
        let Some(task) = ffp.tasks.get_mut(&itt) else {
            return false;
        };
        let TaskState::Receiving { buffer, .. } = &task.state else {
            return false;
        };
        if !buffer.is_complete() {
            return true;
        }
        let state = std::mem::replace(&mut task.state, TaskState::Running { r2t_count: 0 });
        if let Some(at) = ffp.receiving.iter().position(|t| *t == itt) {
            ffp.receiving.remove(at);
        }
        if let TaskState::Receiving { mut cmd, buffer } = state {
            self.data_out.sub(Usage::of(&buffer));
            task.state = TaskState::Running {
                r2t_count: buffer.r2t_count(),
            };
            if buffer.data_sn_error() {
                // ERL 0: no recovery R2T; fail the command, keep the session (RFC 7143 §7.1.5).
                let completion = ScsiCompletion {
                    status: STATUS_CHECK_CONDITION,
                    sense: Bytes::from_static(&SENSE_DATA_PHASE_ERROR),
                    data_in: Bytes::new(),
                };
                self.finish_command(itt, completion, None);
                return false;
            }
            let Some(data) = buffer.into_data() else {
                // Unreachable: `is_complete` held. Fail the command rather than run it on
                // anything but the data received.
                let completion = ScsiCompletion {
                    status: STATUS_CHECK_CONDITION,
                    sense: Bytes::from_static(&SENSE_DATA_PHASE_ERROR),
                    data_in: Bytes::new(),
                };
                self.finish_command(itt, completion, None);
                return false;
            };
            cmd.data_out = data;
            self.events.push_back(Event::Command(cmd));
        }
        false
    }

    fn on_data_out(&mut self, pdu: Pdu) {
        let Header::DataOut(h) = &pdu.header else {
            return;
        };
        let Phase::FullFeature(ffp) = &mut self.phase else {
            return;
        };
        let Some(task) = ffp.tasks.get_mut(&h.itt) else {
            // Data for a task that is gone (aborted, failed, or refused with TASK SET FULL
            // while its unsolicited data was on the way): dropped (§11.5.1). The initiator
            // reuses an ITT only after the response, so on this one TCP stream such PDUs come
            // before any new command with that ITT and cannot be taken for its data.
            tracing::debug!(itt = h.itt, "Data-Out for unknown task dropped");
            return;
        };
        let TaskState::Receiving { buffer, .. } = &mut task.state else {
            tracing::debug!(itt = h.itt, "Data-Out for a task not awaiting data dropped");
            return;
        };
        let before = Usage::of(buffer);
        let sequences = buffer.open_sequences();
        let result = buffer.data_out(h, &pdu.data);
        let sequence_done = buffer.open_sequences() < sequences;
        self.data_out.change(before, Usage::of(buffer));
        if let Err(e) = result {
            // ErrorRecoveryLevel 0: sequence errors are recovered by session recovery (§7.1.5).
            tracing::debug!(itt = h.itt, error = %e, "Data-Out refused");
            self.close(CloseReason::ProtocolError(e.to_string()));
            return;
        }
        let itt = h.itt;
        let receiving = self.advance_write(itt);
        // Room or an R2T slot may have freed only when a sequence closed or the task left.
        if sequence_done || !receiving {
            self.solicit_paced();
        }
    }

    fn finish_command(&mut self, itt: u32, completion: ScsiCompletion, spdtl_out: Option<u32>) {
        if self.closed.is_some() {
            return;
        }
        let Phase::FullFeature(ffp) = &mut self.phase else {
            return;
        };
        let Some(task) = ffp.tasks.get(&itt) else {
            return;
        };
        let TaskState::Running { r2t_count } = task.state else {
            return;
        };
        let Some(task) = ffp.tasks.remove(&itt) else {
            return;
        };
        let max_segment = ffp.conn_params.max_xmit_data_segment_length;
        let (exp_cmd_sn, max_cmd_sn) = self.window_sns();
        let out_residual = spdtl_out.map_or(Residual::default(), |s| {
            Residual::of(task.expected_out, u64::from(s))
        });
        let c = data_in::Completion {
            itt,
            lun: task.lun,
            status: completion.status,
            sense: &completion.sense,
            data_in: &completion.data_in,
            expected_in: task.expected_in,
            out_residual,
            max_segment,
            r2t_count,
        };
        let stat_sn = self.stat_sn;
        self.stat_sn = self.stat_sn.wrapping_add(1);
        let digests = self.tx_digests;
        let out = &mut self.out;
        data_in::complete_each(
            &c,
            Stamps {
                stat_sn,
                exp_cmd_sn,
                max_cmd_sn,
            },
            |pdu| out.push_back((pdu, digests)),
        );
    }

    // ----- task management ------------------------------------------------------------------

    fn on_tmf(&mut self, pdu: Pdu) {
        let Header::TaskMgmtRequest(h) = &pdu.header else {
            return;
        };
        let Phase::FullFeature(ffp) = &mut self.phase else {
            return;
        };
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
                    let response =
                        if ffp.window.in_window(h.ref_cmd_sn) && sn_lt(h.ref_cmd_sn, h.cmd_sn) {
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
            TmfFunction::AbortTaskSet
            | TmfFunction::ClearTaskSet
            | TmfFunction::LogicalUnitReset => ffp
                .tasks
                .iter()
                .filter(|(_, t)| t.lun == lun)
                .map(|(itt, _)| *itt)
                .collect(),
            TmfFunction::TargetWarmReset | TmfFunction::TargetColdReset => {
                if !self.target_reset_allowed {
                    // §11.6.1 response 6: refused before any task is touched.
                    tracing::debug!(function = ?h.function, "target reset not authorized");
                    self.send_tmf_response(h.itt, TmfResponse::AuthorizationFailed);
                    return;
                }
                ffp.tasks.keys().copied().collect()
            }
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
        let mut freed = false;
        for itt in affected {
            if let Some(task) = ffp.tasks.remove(&itt) {
                match &task.state {
                    TaskState::Running { .. } => aborted.push(itt),
                    TaskState::Receiving { buffer, .. } => {
                        self.data_out.sub(Usage::of(buffer));
                        if let Some(at) = ffp.receiving.iter().position(|t| *t == itt) {
                            ffp.receiving.remove(at);
                        }
                        freed = true;
                    }
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
            arrived: self.last_rx,
        }));
        if freed {
            self.solicit_paced();
        }
    }

    fn send_tmf_response(&mut self, itt: u32, response: TmfResponse) {
        let (exp_cmd_sn, max_cmd_sn) = self.window_sns();
        let stat_sn = self.next_stat_sn();
        self.push(
            Header::TaskMgmtResponse(TaskMgmtResponse {
                response,
                itt,
                stat_sn,
                exp_cmd_sn,
                max_cmd_sn,
            }),
            Bytes::new(),
        );
    }

    // ----- text, NOP, logout ----------------------------------------------------------------

    fn on_text(&mut self, pdu: Pdu) {
        let Header::TextRequest(h) = &pdu.header else {
            return;
        };
        let Phase::FullFeature(ffp) = &mut self.phase else {
            return;
        };
        let max_text = usize::try_from(self.config.limits.max_text).unwrap_or(usize::MAX);
        let seg =
            usize::try_from(ffp.conn_params.max_xmit_data_segment_length.max(1)).unwrap_or(8192);
        // A reserved TTT starts a new exchange (§11.10.4); otherwise it continues ours.
        let continuing = h.ttt != RESERVED_TAG
            && ffp
                .text
                .as_ref()
                .is_some_and(|t| t.itt == h.itt && t.ttt == h.ttt);
        if !continuing {
            ffp.text = Some(TextExchange {
                itt: h.itt,
                ttt: RESERVED_TAG,
                rx: Vec::new(),
                tx_rest: Bytes::new(),
            });
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
            let own = if ffp.discovery {
                None
            } else {
                ffp.session.target_name.as_deref()
            };
            let mut reply = Vec::new();
            for (key, value) in &pairs {
                if key == "SendTargets" {
                    reply.extend(discovery::send_targets_for(
                        &ffp.session.initiator_name,
                        value,
                        &self.config.targets,
                        own,
                        self.local_addr,
                    ));
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

    fn send_text_response(
        &mut self,
        itt: u32,
        lun: u64,
        ttt: u32,
        final_: bool,
        continue_: bool,
        data: Bytes,
    ) {
        let (exp_cmd_sn, max_cmd_sn) = self.window_sns();
        let stat_sn = self.next_stat_sn();
        self.push(
            Header::TextResponse(TextResponse {
                final_,
                continue_,
                lun,
                itt,
                ttt,
                stat_sn,
                exp_cmd_sn,
                max_cmd_sn,
            }),
            data,
        );
    }

    fn on_nop(&mut self, pdu: Pdu) {
        let Header::NopOut(h) = &pdu.header else {
            return;
        };
        if h.ttt != RESERVED_TAG || h.itt == RESERVED_TAG {
            // An answer to our NOP-In, or a ping that wants no answer (§11.18).
            return;
        }
        let Phase::FullFeature(ffp) = &self.phase else {
            return;
        };
        let max = usize::try_from(ffp.conn_params.max_xmit_data_segment_length).unwrap_or(8192);
        let data = pdu.data.slice(..pdu.data.len().min(max));
        let (exp_cmd_sn, max_cmd_sn) = self.window_sns();
        let stat_sn = self.next_stat_sn();
        self.push(
            Header::NopIn(NopIn {
                lun: h.lun,
                itt: h.itt,
                ttt: RESERVED_TAG,
                stat_sn,
                exp_cmd_sn,
                max_cmd_sn,
            }),
            data,
        );
    }

    fn on_logout(&mut self, pdu: Pdu) {
        let Header::LogoutRequest(h) = &pdu.header else {
            return;
        };
        let Phase::FullFeature(ffp) = &self.phase else {
            return;
        };
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
        let time2wait = if response == 0 {
            0
        } else {
            ffp.params.default_time2wait
        };
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
            self.close(CloseReason::Logout(h.reason));
        }
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::too_many_arguments,
    clippy::type_complexity
)]
mod tests {
    use super::*;
    use crate::pdu::{DataOut, LogoutRequest, NopOut, Stage, TaskMgmtRequest, TextRequest};

    const TARGET: &str = "iqn.2026-11.io.ironlun:lab";
    const INITIATOR: &str = "iqn.2026-11.io.test:host";

    fn config() -> PortalConfig {
        PortalConfig {
            targets: vec![TargetInfo {
                name: TARGET.to_string(),
                alias: Some("lab".to_string()),
                addresses: vec![TargetPortal::new(([127, 0, 0, 1], 3260).into(), 1)],
                portal_group_tag: 1,
                acl: Acl::allow_all(),
                chap: None,
            }],
            offers: Offers::default(),
            limits: Limits {
                max_transfer: 1024 * 1024,
                ..Limits::default()
            },
            portal_group_tag: 1,
            cmd_window: 8,
            timeouts: Timeouts::default(),
            sessions: Arc::default(),
            discovery_chap: None,
            auth_limiter: Arc::default(),
        }
    }

    /// In-memory driver: encodes what the "initiator" sends, feeds it in, decodes what comes out.
    struct Pair {
        conn: Connection,
        now: Instant,
        /// Digests in force from the initiator's side.
        digests: Digests,
        cmd_sn: u32,
    }

    fn kv(pairs: &[(&str, &str)]) -> Bytes {
        let owned: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Bytes::from(text::encode(&owned))
    }

    fn keys(data: &[u8]) -> Vec<(String, String)> {
        text::parse(data).unwrap()
    }

    fn key<'a>(pairs: &'a [(String, String)], k: &str) -> Option<&'a str> {
        pairs
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    }

    fn pdu(header: Header, data: Bytes) -> Pdu {
        Pdu {
            header,
            ahs: Vec::new(),
            data,
        }
    }

    fn login_req(csg: Stage, nsg: Stage, transit: bool) -> LoginRequest {
        LoginRequest {
            transit,
            csg,
            nsg,
            isid: [0x80, 0, 0, 0, 0, 1],
            itt: 0x1000,
            cmd_sn: 1,
            exp_stat_sn: 100,
            ..Default::default()
        }
    }

    impl Pair {
        fn new(config: PortalConfig) -> Self {
            let now = Instant::now();
            Pair {
                conn: Connection::new_with_tsih(Arc::new(config), 7, now),
                now,
                digests: Digests::default(),
                cmd_sn: 1,
            }
        }

        fn send(&mut self, p: Pdu) {
            let mut buf = BytesMut::new();
            for piece in framer::encode_pdu(&p, self.digests) {
                buf.extend_from_slice(&piece);
            }
            self.conn.receive(&mut buf, self.now);
        }

        fn send_raw(&mut self, bytes: &[u8]) {
            let mut buf = BytesMut::from(bytes);
            self.conn.receive(&mut buf, self.now);
        }

        /// Everything the target sent since the last call, decoded.
        fn recv(&mut self) -> Vec<Pdu> {
            let mut wire = BytesMut::new();
            while let Some(t) = self.conn.poll_transmit() {
                for p in t.pieces {
                    wire.extend_from_slice(&p);
                }
            }
            let mut out = Vec::new();
            // Login responses are digest-free; later PDUs carry the negotiated digests.
            let mut f = Framer::new(Limits::default());
            loop {
                f.digests = if wire.first().map(|b| b & 0x3f) == Some(0x23) {
                    Digests::default()
                } else {
                    self.digests
                };
                match f.next_pdu(&mut wire).unwrap() {
                    Some(Framed::Pdu(p)) => out.push(p),
                    Some(Framed::Bad { error, .. }) => panic!("target sent a bad PDU: {error}"),
                    None => break,
                }
            }
            assert!(wire.is_empty(), "trailing bytes from target");
            out
        }

        fn events(&mut self) -> Vec<Event> {
            std::iter::from_fn(|| self.conn.poll_event()).collect()
        }

        fn login_with(&mut self, pairs: &[(&str, &str)]) -> Vec<(String, String)> {
            self.send(pdu(
                Header::LoginRequest(login_req(Stage::Operational, Stage::FullFeature, true)),
                kv(pairs),
            ));
            let out = self.recv();
            assert_eq!(out.len(), 1);
            let Header::LoginResponse(r) = &out[0].header else {
                panic!("not a login response")
            };
            assert_eq!((r.status_class, r.status_detail), (0, 0));
            assert!(r.transit);
            assert_eq!(r.nsg, Stage::FullFeature);
            keys(&out[0].data)
        }

        fn login_normal(&mut self, extra: &[(&str, &str)]) -> Vec<(String, String)> {
            let mut pairs = vec![
                ("InitiatorName", INITIATOR),
                ("TargetName", TARGET),
                ("SessionType", "Normal"),
            ];
            pairs.extend_from_slice(extra);
            let reply = self.login_with(&pairs);
            assert!(matches!(self.events().as_slice(), [Event::LoggedIn(_)]));
            reply
        }

        fn next_cmd_sn(&mut self) -> u32 {
            let sn = self.cmd_sn;
            self.cmd_sn = self.cmd_sn.wrapping_add(1);
            sn
        }

        fn command(
            &mut self,
            itt: u32,
            cdb0: u8,
            read: bool,
            write: bool,
            edtl: u32,
            final_: bool,
            imm: Bytes,
        ) {
            let cmd_sn = self.next_cmd_sn();
            let mut cdb = [0u8; 16];
            cdb[0] = cdb0;
            let h = ScsiCommand {
                final_,
                read,
                write,
                itt,
                expected_data_transfer_length: edtl,
                cmd_sn,
                cdb,
                ..Default::default()
            };
            self.send(pdu(Header::ScsiCommand(h), imm));
        }

        fn data_out(
            &mut self,
            itt: u32,
            ttt: u32,
            data_sn: u32,
            offset: u32,
            final_: bool,
            data: &'static [u8],
        ) {
            let h = DataOut {
                final_,
                itt,
                ttt,
                data_sn,
                buffer_offset: offset,
                ..Default::default()
            };
            self.send(pdu(Header::DataOut(h), Bytes::from_static(data)));
        }

        fn command_event(&mut self) -> ScsiCommandEvent {
            match self.events().as_slice() {
                [Event::Command(c)] => c.clone(),
                other => panic!("expected one command event, got {other:?}"),
            }
        }
    }

    fn login_status(p: &Pdu) -> LoginStatus {
        let Header::LoginResponse(r) = &p.header else {
            panic!("not a login response: {p:?}")
        };
        LoginStatus {
            class: r.status_class,
            detail: r.status_detail,
        }
    }

    fn good(data: &'static [u8]) -> ScsiCompletion {
        ScsiCompletion {
            status: 0,
            sense: Bytes::new(),
            data_in: Bytes::from_static(data),
        }
    }

    // ----- login ------------------------------------------------------------------------------

    #[test]
    fn accepts_normal_login_through_security_and_operational_stages() {
        let mut p = Pair::new(config());
        let sec = kv(&[
            ("InitiatorName", INITIATOR),
            ("TargetName", TARGET),
            ("AuthMethod", "None"),
        ]);
        p.send(pdu(
            Header::LoginRequest(login_req(Stage::Security, Stage::Operational, true)),
            sec,
        ));
        let out = p.recv();
        let Header::LoginResponse(r) = &out[0].header else {
            panic!()
        };
        assert_eq!(login_status(&out[0]), LoginStatus::SUCCESS);
        assert!(r.transit);
        assert_eq!((r.csg, r.nsg), (Stage::Security, Stage::Operational));
        assert_eq!(
            r.stat_sn, 100,
            "first StatSN follows the initiator's ExpStatSN"
        );
        assert_eq!(r.tsih, 0);
        let k = keys(&out[0].data);
        assert_eq!(key(&k, "AuthMethod"), Some("None"));
        assert_eq!(key(&k, "TargetPortalGroupTag"), Some("1"));
        assert_eq!(key(&k, "TargetAlias"), Some("lab"));

        let op = kv(&[
            ("HeaderDigest", "None"),
            ("MaxRecvDataSegmentLength", "4096"),
            ("ImmediateData", "Yes"),
        ]);
        p.send(pdu(
            Header::LoginRequest(login_req(Stage::Operational, Stage::FullFeature, true)),
            op,
        ));
        let out = p.recv();
        let Header::LoginResponse(r) = &out[0].header else {
            panic!()
        };
        assert!(r.transit);
        assert_eq!(r.nsg, Stage::FullFeature);
        assert_eq!(r.tsih, 7);
        assert_eq!(r.stat_sn, 101);
        assert_eq!((r.exp_cmd_sn, r.max_cmd_sn), (1, 8));
        let k = keys(&out[0].data);
        assert_eq!(key(&k, "HeaderDigest"), Some("None"));
        assert_eq!(key(&k, "ImmediateData"), Some("Yes"));
        assert_eq!(
            key(&k, "MaxRecvDataSegmentLength"),
            Some("262144"),
            "we always declare ours"
        );
        let events = p.events();
        let [Event::LoggedIn(s)] = events.as_slice() else {
            panic!("{events:?}")
        };
        assert_eq!(s.initiator_name, INITIATOR);
        assert_eq!(s.target_name.as_deref(), Some(TARGET));
        assert_eq!(s.tsih, 7);
        assert_eq!(
            p.conn
                .connection_params()
                .unwrap()
                .max_xmit_data_segment_length,
            4096
        );
    }

    #[test]
    fn accepts_discovery_login_and_send_targets() {
        let mut p = Pair::new(config());
        let k = p.login_with(&[
            ("InitiatorName", INITIATOR),
            ("SessionType", "Discovery"),
            ("InitialR2T", "No"),
        ]);
        assert_eq!(key(&k, "InitialR2T"), Some("Irrelevant"));
        assert_eq!(key(&k, "TargetPortalGroupTag"), None);
        let s = match p.events().as_slice() {
            [Event::LoggedIn(s)] => s.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(s.target_name, None);
        let h = TextRequest {
            final_: true,
            itt: 5,
            ttt: RESERVED_TAG,
            cmd_sn: 1,
            ..Default::default()
        };
        p.send(pdu(Header::TextRequest(h), kv(&[("SendTargets", "All")])));
        let out = p.recv();
        let Header::TextResponse(r) = &out[0].header else {
            panic!()
        };
        assert!(r.final_ && !r.continue_);
        assert_eq!(r.ttt, RESERVED_TAG);
        assert_eq!(r.exp_cmd_sn, 2);
        let k = keys(&out[0].data);
        assert_eq!(key(&k, "TargetName"), Some(TARGET));
        assert_eq!(key(&k, "TargetAddress"), Some("127.0.0.1:3260,1"));
    }

    #[test]
    fn send_targets_lists_every_portal_and_names_wildcards_by_the_local_address() {
        let mut cfg = config();
        cfg.targets[0].addresses = vec![
            TargetPortal::new("0.0.0.0:3260".parse().unwrap(), 1),
            TargetPortal::new("127.0.0.2:3261".parse().unwrap(), 2),
        ];
        let mut p = Pair::new(cfg);
        p.conn.set_local_addr("127.0.0.1:3260".parse().unwrap());
        p.login_with(&[("InitiatorName", INITIATOR), ("SessionType", "Discovery")]);
        let h = TextRequest {
            final_: true,
            itt: 5,
            ttt: RESERVED_TAG,
            cmd_sn: 1,
            ..Default::default()
        };
        p.send(pdu(Header::TextRequest(h), kv(&[("SendTargets", "All")])));
        let out = p.recv();
        let addrs: Vec<String> = keys(&out[0].data)
            .into_iter()
            .filter(|(k, _)| k == "TargetAddress")
            .map(|(_, v)| v)
            .collect();
        assert_eq!(addrs, vec!["127.0.0.1:3260,1", "127.0.0.2:3261,2"]);
    }

    #[test]
    fn rejects_login_failures_with_their_status() {
        let cases: Vec<(LoginRequest, Vec<(&str, &str)>, LoginStatus)> = vec![
            (
                LoginRequest {
                    version_min: 1,
                    version_max: 2,
                    ..login_req(Stage::Operational, Stage::FullFeature, true)
                },
                vec![("InitiatorName", INITIATOR), ("TargetName", TARGET)],
                LoginStatus::UNSUPPORTED_VERSION,
            ),
            (
                login_req(Stage::Security, Stage::Operational, true),
                vec![("TargetName", TARGET)],
                LoginStatus::MISSING_PARAMETER,
            ),
            (
                login_req(Stage::Security, Stage::Operational, true),
                vec![("InitiatorName", INITIATOR)],
                LoginStatus::MISSING_PARAMETER,
            ),
            (
                login_req(Stage::Security, Stage::Operational, true),
                vec![
                    ("InitiatorName", INITIATOR),
                    ("TargetName", "iqn.2026-11.io.ironlun:nope"),
                ],
                LoginStatus::NOT_FOUND,
            ),
            (
                login_req(Stage::Security, Stage::Operational, true),
                vec![
                    ("InitiatorName", INITIATOR),
                    ("TargetName", TARGET),
                    ("AuthMethod", "CHAP"),
                ],
                LoginStatus::AUTHENTICATION_FAILURE,
            ),
            (
                login_req(Stage::Operational, Stage::Security, true),
                vec![("InitiatorName", INITIATOR), ("TargetName", TARGET)],
                LoginStatus::INITIATOR_ERROR,
            ),
            (
                login_req(Stage::FullFeature, Stage::FullFeature, true),
                vec![("InitiatorName", INITIATOR), ("TargetName", TARGET)],
                LoginStatus::INITIATOR_ERROR,
            ),
            (
                login_req(Stage::Security, Stage::Operational, true),
                vec![("InitiatorName", INITIATOR), ("SessionType", "Bogus")],
                LoginStatus::SESSION_TYPE_NOT_SUPPORTED,
            ),
            (
                LoginRequest {
                    tsih: 9,
                    ..login_req(Stage::Security, Stage::Operational, true)
                },
                vec![("InitiatorName", INITIATOR), ("TargetName", TARGET)],
                LoginStatus::SESSION_DOES_NOT_EXIST,
            ),
        ];
        for (req, pairs, status) in cases {
            let mut p = Pair::new(config());
            p.send(pdu(Header::LoginRequest(req.clone()), kv(&pairs)));
            let out = p.recv();
            assert_eq!(out.len(), 1, "{req:?}");
            assert_eq!(login_status(&out[0]), status, "{pairs:?}");
            assert_eq!(p.conn.is_closed(), Some(&CloseReason::LoginFailed));
            assert_eq!(p.conn.login_failure(), Some(status));
            assert!(p.events().is_empty());
        }
    }

    #[test]
    fn accepts_security_stage_straight_to_full_feature() {
        let mut p = Pair::new(config());
        let sec = kv(&[
            ("InitiatorName", INITIATOR),
            ("TargetName", TARGET),
            ("AuthMethod", "CHAP,None"),
        ]);
        p.send(pdu(
            Header::LoginRequest(login_req(Stage::Security, Stage::FullFeature, true)),
            sec,
        ));
        let out = p.recv();
        let Header::LoginResponse(r) = &out[0].header else {
            panic!()
        };
        assert!(r.transit);
        assert_eq!(
            (r.csg, r.nsg, r.tsih),
            (Stage::Security, Stage::FullFeature, 7)
        );
        assert_eq!(key(&keys(&out[0].data), "AuthMethod"), Some("None"));
        assert!(matches!(p.events().as_slice(), [Event::LoggedIn(_)]));
        // No operational stage: both directions keep the 8192-byte default (§13.12).
        let cp = p.conn.connection_params().unwrap();
        assert_eq!(
            (
                cp.max_recv_data_segment_length,
                cp.max_xmit_data_segment_length
            ),
            (8192, 8192)
        );
    }

    #[test]
    fn rejects_non_login_pdu_before_login() {
        let mut p = Pair::new(config());
        p.send(pdu(
            Header::NopOut(NopOut {
                itt: 1,
                ttt: RESERVED_TAG,
                immediate: true,
                ..Default::default()
            }),
            Bytes::new(),
        ));
        assert!(matches!(
            p.conn.is_closed(),
            Some(CloseReason::ProtocolError(_))
        ));
        assert!(p.recv().is_empty());
    }

    #[test]
    fn accepts_login_text_in_continuations_and_answers_in_pieces() {
        let mut p = Pair::new(config());
        // Enough unknown keys that both the request and our answer exceed 8192 bytes.
        let names: Vec<String> = (0..260)
            .map(|i| format!("X-com.example.key-{i:04}-padding-padding"))
            .collect();
        let mut pairs: Vec<(&str, &str)> =
            vec![("InitiatorName", INITIATOR), ("TargetName", TARGET)];
        pairs.extend(names.iter().map(|n| (n.as_str(), "1")));
        let all = kv(&pairs);
        assert!(all.len() > 8192);
        let (a, b) = (all.slice(..8000), all.slice(8000..));
        let req = login_req(Stage::Operational, Stage::FullFeature, false);
        p.send(pdu(
            Header::LoginRequest(LoginRequest {
                continue_: true,
                ..req.clone()
            }),
            a,
        ));
        let out = p.recv();
        assert_eq!(out.len(), 1);
        assert!(out[0].data.is_empty());
        assert_eq!(login_status(&out[0]), LoginStatus::SUCCESS);
        p.send(pdu(
            Header::LoginRequest(LoginRequest {
                transit: true,
                ..req.clone()
            }),
            b,
        ));
        let mut text = Vec::new();
        let mut rounds = 0;
        loop {
            let out = p.recv();
            assert_eq!(out.len(), 1);
            let Header::LoginResponse(r) = &out[0].header else {
                panic!()
            };
            assert!(out[0].data.len() <= 8192);
            text.extend_from_slice(&out[0].data);
            rounds += 1;
            if !r.continue_ {
                assert!(r.transit);
                break;
            }
            assert!(!r.transit, "no transition while pieces remain");
            p.send(pdu(
                Header::LoginRequest(LoginRequest {
                    transit: true,
                    ..req.clone()
                }),
                Bytes::new(),
            ));
        }
        assert!(rounds >= 2);
        let k = keys(&text);
        assert_eq!(key(&k, names[259].as_str()), Some("NotUnderstood"));
        let ev = p.events();
        assert!(
            matches!(ev.as_slice(), [Event::LoggedIn(_)]),
            "{ev:?} {:?}",
            p.conn.is_closed()
        );
    }

    #[test]
    fn holds_transition_until_target_offers_are_answered() {
        let mut cfg = config();
        cfg.offers.immediate_data = false;
        let mut p = Pair::new(cfg);
        let req = login_req(Stage::Operational, Stage::FullFeature, true);
        p.send(pdu(
            Header::LoginRequest(req.clone()),
            kv(&[("InitiatorName", INITIATOR), ("TargetName", TARGET)]),
        ));
        let out = p.recv();
        let Header::LoginResponse(r) = &out[0].header else {
            panic!()
        };
        assert!(!r.transit);
        assert_eq!(key(&keys(&out[0].data), "ImmediateData"), Some("No"));
        p.send(pdu(
            Header::LoginRequest(req),
            kv(&[("ImmediateData", "No")]),
        ));
        let out = p.recv();
        let Header::LoginResponse(r) = &out[0].header else {
            panic!()
        };
        assert!(r.transit);
        assert!(out[0].data.is_empty() || key(&keys(&out[0].data), "ImmediateData").is_none());
        assert!(!p.conn.session_params().unwrap().immediate_data);
    }

    // ----- reads and writes ---------------------------------------------------------------

    #[test]
    fn read_puts_status_in_final_data_in() {
        let mut p = Pair::new(config());
        p.login_normal(&[("MaxRecvDataSegmentLength", "512")]);
        p.command(0x10, 0x28, true, false, 1024, true, Bytes::new());
        let c = p.command_event();
        assert_eq!(
            (c.itt, c.expected_in_len, c.expected_out_len),
            (0x10, 1024, 0)
        );
        assert_eq!(c.cdb.len(), 16);
        p.conn.complete_command(0x10, good(&[0x5a; 1024]));
        let out = p.recv();
        assert_eq!(out.len(), 2);
        let Header::DataIn(d0) = &out[0].header else {
            panic!()
        };
        let Header::DataIn(d1) = &out[1].header else {
            panic!()
        };
        assert!(!d0.final_ && !d0.status_present);
        assert!(d1.final_ && d1.status_present);
        assert_eq!((d0.data_sn, d1.data_sn, d1.buffer_offset), (0, 1, 512));
        assert_eq!(d1.stat_sn, 101);
        assert_eq!(d1.exp_cmd_sn, 2);
        assert_eq!(d1.max_cmd_sn, 9);
        // Aborted/unknown completions are ignored.
        p.conn.complete_command(0x10, good(b"x"));
        assert!(p.recv().is_empty());
    }

    #[test]
    fn read_residuals_overflow_and_underflow() {
        let mut p = Pair::new(config());
        p.login_normal(&[]);
        p.command(1, 0x28, true, false, 200, true, Bytes::new());
        p.command_event();
        p.conn.complete_command(1, good(&[1; 512]));
        let out = p.recv();
        let Header::DataIn(d) = &out[0].header else {
            panic!()
        };
        assert_eq!(out[0].data.len(), 200);
        assert!(d.overflow && !d.underflow);
        assert_eq!(d.residual_count, 312);

        p.command(2, 0x28, true, false, 10000, true, Bytes::new());
        p.command_event();
        p.conn.complete_command(2, good(&[1; 512]));
        let out = p.recv();
        let Header::DataIn(d) = &out[0].header else {
            panic!()
        };
        assert!(d.underflow && !d.overflow);
        assert_eq!(d.residual_count, 10000 - 512);
    }

    #[test]
    fn write_with_immediate_unsolicited_and_solicited_data() {
        let mut p = Pair::new(config());
        p.login_normal(&[
            ("InitialR2T", "No"),
            ("ImmediateData", "Yes"),
            ("FirstBurstLength", "4096"),
            ("MaxBurstLength", "4096"),
            ("MaxOutstandingR2T", "1"),
        ]);
        static IMM: [u8; 1024] = [1; 1024];
        static UNSOL: [u8; 3072] = [2; 3072];
        static SOL: [u8; 4096] = [3; 4096];
        // EDTL 12288: 1024 immediate + 3072 unsolicited (FirstBurst 4096) + 2 R2Ts of 4096.
        p.command(
            0x20,
            0x2a,
            false,
            true,
            12288,
            false,
            Bytes::from_static(&IMM),
        );
        let r2ts = p.recv();
        assert_eq!(r2ts.len(), 1, "MaxOutstandingR2T=1");
        let Header::R2t(r) = &r2ts[0].header else {
            panic!()
        };
        assert_eq!(
            (r.r2t_sn, r.buffer_offset, r.desired_data_transfer_length),
            (0, 4096, 4096)
        );
        let ttt0 = r.ttt;
        assert_ne!(ttt0, RESERVED_TAG);
        p.data_out(0x20, RESERVED_TAG, 0, 1024, true, &UNSOL);
        assert!(p.events().is_empty());
        p.data_out(0x20, ttt0, 0, 4096, true, &SOL);
        let r2ts = p.recv();
        let Header::R2t(r) = &r2ts[0].header else {
            panic!()
        };
        assert_eq!((r.r2t_sn, r.buffer_offset), (1, 8192));
        assert_ne!(r.ttt, ttt0);
        let ttt1 = r.ttt;
        p.data_out(0x20, ttt1, 0, 8192, true, &SOL);
        let c = p.command_event();
        assert_eq!(c.expected_out_len, 12288);
        assert_eq!(c.data_out.len(), 12288);
        assert_eq!(c.data_out[0], 1);
        assert_eq!(c.data_out[1024], 2);
        assert_eq!(c.data_out[4096], 3);
        assert_eq!(c.data_out[12287], 3);
        p.conn.complete_command(0x20, good(b""));
        let out = p.recv();
        let Header::ScsiResponse(r) = &out[0].header else {
            panic!()
        };
        assert_eq!(r.status, 0);
        assert_eq!(r.exp_data_sn, 2, "two R2Ts");
        assert!(!r.overflow && !r.underflow);
    }

    #[test]
    fn write_residual_from_spdtl() {
        let mut p = Pair::new(config());
        p.login_normal(&[("ImmediateData", "Yes")]);
        p.command(
            3,
            0x2a,
            false,
            true,
            512,
            true,
            Bytes::from_static(&[9; 512]),
        );
        let c = p.command_event();
        assert_eq!(c.data_out.len(), 512);
        p.conn.complete_command_with_spdtl(3, good(b""), 1024);
        let out = p.recv();
        let Header::ScsiResponse(r) = &out[0].header else {
            panic!()
        };
        assert!(r.overflow);
        assert_eq!(r.residual_count, 512);
    }

    #[test]
    fn fails_command_with_bad_data_sn_and_keeps_session() {
        let mut p = Pair::new(config());
        p.login_normal(&[("ImmediateData", "No"), ("InitialR2T", "Yes")]);
        p.command(4, 0x2a, false, true, 1024, true, Bytes::new());
        let out = p.recv();
        let Header::R2t(r) = &out[0].header else {
            panic!()
        };
        p.data_out(4, r.ttt, 0, 0, false, &[0; 512]);
        p.data_out(4, r.ttt, 0, 512, true, &[0; 512]);
        assert!(p.conn.is_closed().is_none(), "the session survives");
        assert!(p.events().is_empty(), "nothing was handed to the owner");
        let out = p.recv();
        let Header::ScsiResponse(r) = &out[0].header else {
            panic!("{out:?}")
        };
        assert_eq!(r.status, STATUS_CHECK_CONDITION);
        // SenseLength, then fixed sense: ABORTED COMMAND, DATA PHASE ERROR.
        assert_eq!((out[0].data[4], out[0].data[14]), (0x0b, 0x4b));
    }

    #[test]
    fn rejects_transfer_beyond_limit_with_check_condition() {
        let mut p = Pair::new(config());
        p.login_normal(&[]);
        p.command(5, 0x28, true, false, 2 * 1024 * 1024, true, Bytes::new());
        assert!(p.events().is_empty());
        let out = p.recv();
        let Header::ScsiResponse(r) = &out[0].header else {
            panic!()
        };
        assert_eq!(r.status, STATUS_CHECK_CONDITION);
        assert_eq!(&out[0].data[..2], &[0, 18]);
        assert_eq!(out[0].data[4], 0x05);
    }

    #[test]
    fn rejects_immediate_data_when_not_negotiated() {
        let mut p = Pair::new(config());
        p.login_normal(&[("ImmediateData", "No")]);
        p.command(
            6,
            0x2a,
            false,
            true,
            512,
            true,
            Bytes::from_static(&[0; 512]),
        );
        let out = p.recv();
        let Header::Reject(r) = &out[0].header else {
            panic!()
        };
        assert_eq!(r.reason, RejectReason::ProtocolError);
        assert_eq!(out[0].data.len(), 48);
        assert_eq!(out[0].data[0] & 0x3f, 0x01);
    }

    // ----- CmdSN window ----------------------------------------------------------------------

    #[test]
    fn drops_commands_outside_the_cmd_sn_window() {
        let mut p = Pair::new(config());
        p.login_normal(&[]);
        // MaxCmdSN = 8: CmdSN 9 is too high, CmdSN 0 too low.
        for sn in [9u32, 0, 0xffff_ffff] {
            p.cmd_sn = sn;
            p.command(7, 0x00, false, false, 0, true, Bytes::new());
            assert!(p.events().is_empty(), "CmdSN {sn}");
            assert!(p.recv().is_empty());
        }
        p.cmd_sn = 1;
        p.command(7, 0x00, false, false, 0, true, Bytes::new());
        assert_eq!(p.command_event().itt, 7);
    }

    #[test]
    fn reorders_commands_within_the_window() {
        let mut p = Pair::new(config());
        p.login_normal(&[]);
        p.cmd_sn = 3;
        p.command(30, 0x00, false, false, 0, true, Bytes::new());
        p.cmd_sn = 2;
        p.command(20, 0x00, false, false, 0, true, Bytes::new());
        assert!(p.events().is_empty());
        p.cmd_sn = 1;
        p.command(10, 0x00, false, false, 0, true, Bytes::new());
        let itts: Vec<u32> = p
            .events()
            .into_iter()
            .map(|e| match e {
                Event::Command(c) => c.itt,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(itts, [10, 20, 30]);
        p.conn.complete_command(30, good(b""));
        let out = p.recv();
        let Header::ScsiResponse(r) = &out[0].header else {
            panic!()
        };
        // Two commands still run: the window grants 8 - 2 slots past ExpCmdSN.
        assert_eq!((r.exp_cmd_sn, r.max_cmd_sn), (4, 9));
    }

    /// An immediate READ(10) of `len` bytes: its CmdSN is the next one but does not advance it.
    fn immediate_read(p: &mut Pair, itt: u32, len: u32) {
        let mut cdb = [0u8; 16];
        cdb[0] = 0x28;
        let h = ScsiCommand {
            immediate: true,
            final_: true,
            read: true,
            itt,
            expected_data_transfer_length: len,
            cmd_sn: p.cmd_sn,
            cdb,
            ..Default::default()
        };
        p.send(pdu(Header::ScsiCommand(h), Bytes::new()));
    }

    /// ExpCmdSN and MaxCmdSN as a NOP-In answering an immediate ping reports them.
    fn window_by_ping(p: &mut Pair) -> (u32, u32) {
        let h = NopOut {
            immediate: true,
            itt: 0x7777,
            ttt: RESERVED_TAG,
            cmd_sn: p.cmd_sn,
            ..Default::default()
        };
        p.send(pdu(Header::NopOut(h), Bytes::new()));
        let out = p.recv();
        let [Pdu {
            header: Header::NopIn(n),
            ..
        }] = out.as_slice()
        else {
            panic!("{out:?}")
        };
        (n.exp_cmd_sn, n.max_cmd_sn)
    }

    #[test]
    fn rejects_immediate_commands_past_the_window_with_reason_6() {
        let mut p = Pair::new(config());
        p.login_normal(&[]);
        // cmd_window 8: eight immediate 1 MiB READs run…
        for itt in 0..8 {
            immediate_read(&mut p, itt, 1024 * 1024);
            assert_eq!(p.command_event().itt, itt);
        }
        assert!(p.recv().is_empty());
        // …the next ones are refused, and nothing more is handed to the owner.
        for itt in 8..12 {
            immediate_read(&mut p, itt, 1024 * 1024);
            assert!(p.events().is_empty(), "itt {itt}");
            let out = p.recv();
            let [Pdu {
                header: Header::Reject(r),
                data,
                ..
            }] = out.as_slice()
            else {
                panic!("{out:?}")
            };
            assert_eq!(r.reason, RejectReason::ImmediateCommandReject);
            assert_eq!(r.reason as u8, 0x06);
            assert_eq!(data.len(), 48, "the rejected header");
            assert_eq!(u32::from_be_bytes(data[16..20].try_into().unwrap()), itt);
        }
        // The window stays shut: MaxCmdSN is ExpCmdSN + 7 from login, not advanced.
        assert_eq!(window_by_ping(&mut p), (1, 8));
        // One completes: one immediate command is accepted again, the next refused.
        p.conn.complete_command(3, good(b""));
        let out = p.recv();
        let Header::ScsiResponse(r) = &out[0].header else {
            panic!("{out:?}")
        };
        assert_eq!(
            (r.exp_cmd_sn, r.max_cmd_sn),
            (1, 8),
            "seven still outstanding"
        );
        immediate_read(&mut p, 20, 512);
        assert_eq!(p.command_event().itt, 20);
        immediate_read(&mut p, 21, 512);
        assert!(p.events().is_empty());
        assert!(matches!(
            p.recv().as_slice(),
            [Pdu {
                header: Header::Reject(_),
                ..
            }]
        ));
        // TMFs are counted apart: ABORT TASK still reaches a stuck command.
        tmf(&mut p, 0x90, TmfFunction::AbortTask, 0, 1);
        assert!(
            matches!(p.events().as_slice(), [Event::Aborted(a), Event::TaskMgmt(_)] if a == &[0])
        );
        assert!(p.conn.is_closed().is_none());
    }

    #[test]
    fn max_cmd_sn_holds_while_outstanding_tasks_fill_the_window() {
        let mut p = Pair::new(config());
        p.login_normal(&[]);
        // Four immediate and four ordinary commands: eight outstanding, window 8.
        for itt in 0..4 {
            immediate_read(&mut p, itt, 512);
            p.command_event();
        }
        assert_eq!(window_by_ping(&mut p), (1, 8));
        for itt in 4..8 {
            p.command(itt, 0x28, true, false, 512, true, Bytes::new());
            p.command_event();
        }
        assert_eq!(
            window_by_ping(&mut p),
            (5, 8),
            "closed: MaxCmdSN = ExpCmdSN - 1 + 4"
        );
        // Commands granted before the window closed are still taken; nothing new is granted.
        for itt in 8..12 {
            p.command(itt, 0x28, true, false, 512, true, Bytes::new());
            p.command_event();
        }
        assert_eq!(
            window_by_ping(&mut p),
            (9, 8),
            "MaxCmdSN = ExpCmdSN - 1: shut"
        );
        p.command(12, 0x28, true, false, 512, true, Bytes::new());
        assert!(p.events().is_empty(), "CmdSN 9 is outside the window");
        p.cmd_sn = 9;
        // Completions give credit back only once fewer than eight are outstanding.
        let mut max = Vec::new();
        for itt in 0..12 {
            p.conn.complete_command(itt, good(b""));
            let out = p.recv();
            let Header::ScsiResponse(r) = &out[0].header else {
                panic!("{out:?}")
            };
            max.push(r.max_cmd_sn);
        }
        assert_eq!(max, [8, 8, 8, 8, 9, 10, 11, 12, 13, 14, 15, 16]);
    }

    #[test]
    fn refuses_immediate_tmfs_past_the_window() {
        let mut p = Pair::new(config());
        p.login_normal(&[]);
        for itt in 0..8 {
            tmf(&mut p, 0x100 + itt, TmfFunction::ClearAca, 0, 1);
            assert!(matches!(p.events().as_slice(), [Event::TaskMgmt(_)]));
        }
        tmf(&mut p, 0x200, TmfFunction::ClearAca, 0, 1);
        assert!(p.events().is_empty());
        let out = p.recv();
        let Header::Reject(r) = &out[0].header else {
            panic!("{out:?}")
        };
        assert_eq!(r.reason, RejectReason::ImmediateCommandReject);
        p.conn.complete_tmf(0x100, TmfResponse::FunctionComplete);
        p.recv();
        tmf(&mut p, 0x201, TmfFunction::ClearAca, 0, 1);
        assert!(matches!(p.events().as_slice(), [Event::TaskMgmt(_)]));
    }

    // ----- write memory -----------------------------------------------------------------------

    /// A portal that accepts 64 MiB writes and lets sequences come in any order.
    fn big_write_config(sequence_in_order: bool) -> PortalConfig {
        let mut cfg = config();
        cfg.limits.max_transfer = 64 * 1024 * 1024;
        cfg.offers.data_sequence_in_order = sequence_in_order;
        cfg
    }

    /// Login for big writes, then a 64 MiB WRITE(16); returns the R2Ts it drew.
    fn start_64_mib_write(p: &mut Pair, sequence_in_order: &str) -> Vec<R2t> {
        p.login_normal(&[
            ("InitialR2T", "Yes"),
            ("ImmediateData", "No"),
            ("MaxBurstLength", "16777215"),
            ("MaxOutstandingR2T", "8"),
            ("DataSequenceInOrder", sequence_in_order),
        ]);
        p.command(
            0x40,
            0x8a,
            false,
            true,
            64 * 1024 * 1024,
            true,
            Bytes::new(),
        );
        p.recv()
            .into_iter()
            .map(|pdu| match pdu.header {
                Header::R2t(r) => r,
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn holds_only_the_data_received_of_a_64_mib_write() {
        static PIECE: [u8; 512] = [7; 512];
        let mut p = Pair::new(big_write_config(false));
        let r2ts = start_64_mib_write(&mut p, "No");
        assert_eq!(r2ts.len(), 5, "64 MiB in bursts of 2^24 - 1");
        assert_eq!(p.conn.held_data_out_bytes(), 0);
        let last = r2ts[4].clone();
        p.data_out(0x40, last.ttt, 0, last.buffer_offset, false, &PIECE);
        assert!(p.conn.is_closed().is_none());
        let held = p.conn.held_data_out_bytes();
        assert!((512..=1024).contains(&held), "held {held}");
        // The first sequence's data in order: held grows with it, within twice what arrived.
        let first = r2ts[0].clone();
        for i in 0..64u32 {
            p.data_out(0x40, first.ttt, i, i * 512, false, &PIECE);
            let held = p.conn.held_data_out_bytes();
            let received = (i as usize + 2) * 512;
            assert!(
                held >= received && held <= 2 * received + 2 * crate::r2t::RUN_OVERHEAD,
                "{held} for {received}"
            );
        }
        // A TMF that removes the command gives the memory back.
        tmf(&mut p, 0x41, TmfFunction::AbortTask, 0x40, 1);
        assert_eq!(p.conn.held_data_out_bytes(), 0);
    }

    #[test]
    fn closes_on_data_out_for_a_later_sequence_when_sequences_in_order() {
        static PIECE: [u8; 512] = [7; 512];
        let mut p = Pair::new(big_write_config(true));
        let r2ts = start_64_mib_write(&mut p, "No");
        assert!(p.conn.session_params().unwrap().data_sequence_in_order);
        p.data_out(0x40, r2ts[0].ttt, 0, 0, false, &PIECE);
        assert!(p.conn.is_closed().is_none());
        p.data_out(0x40, r2ts[1].ttt, 0, r2ts[1].buffer_offset, false, &PIECE);
        let Some(CloseReason::ProtocolError(why)) = p.conn.is_closed() else {
            panic!("{:?}", p.conn.is_closed())
        };
        assert!(why.contains("DataSequenceInOrder"), "{why}");
        assert_eq!(p.conn.held_data_out_bytes(), 0);
    }

    #[test]
    fn held_data_out_bytes_drop_when_the_command_runs() {
        static A: [u8; 1024] = [1; 1024];
        let mut p = Pair::new(config());
        p.login_normal(&[("InitialR2T", "No"), ("ImmediateData", "Yes")]);
        p.command(0x60, 0x2a, false, true, 2048, false, Bytes::from_static(&A));
        assert!(p.conn.held_data_out_bytes() >= 1024);
        p.data_out(0x60, RESERVED_TAG, 0, 1024, true, &A);
        let c = p.command_event();
        assert_eq!(c.data_out.len(), 2048);
        assert_eq!(p.conn.held_data_out_bytes(), 0);
    }

    // ----- Data-Out pacing ----------------------------------------------------------------

    static D4K: [u8; 4096] = [4; 4096];

    /// The R2Ts of `out`, as (ITT, offset, length, TTT).
    fn r2ts_of(out: &[Pdu]) -> Vec<(u32, u32, u32, u32)> {
        out.iter()
            .map(|pdu| match &pdu.header {
                Header::R2t(r) => (
                    r.itt,
                    r.buffer_offset,
                    r.desired_data_transfer_length,
                    r.ttt,
                ),
                other => panic!("expected R2T, got {other:?}"),
            })
            .collect()
    }

    fn paced_login(p: &mut Pair, initial_r2t: &str, max_r2t: &str) {
        p.login_normal(&[
            ("InitialR2T", initial_r2t),
            ("ImmediateData", "Yes"),
            ("FirstBurstLength", "4096"),
            ("MaxBurstLength", "4096"),
            ("MaxOutstandingR2T", max_r2t),
        ]);
    }

    #[test]
    fn r2ts_wait_for_the_allowance_and_go_out_in_arrival_order() {
        let mut p = Pair::new(config());
        paced_login(&mut p, "Yes", "1");
        p.conn.set_data_out_allowance(6000);
        p.command(1, 0x2a, false, true, 8192, true, Bytes::new());
        let a = r2ts_of(&p.recv());
        assert_eq!(
            a.iter().map(|r| (r.0, r.1, r.2)).collect::<Vec<_>>(),
            [(1, 0, 4096)]
        );
        assert_eq!(p.conn.committed_data_out_bytes(), 4096);
        // B does not fit beside A's sequence; C would, but does not overtake B.
        p.command(2, 0x2a, false, true, 4096, true, Bytes::new());
        p.command(3, 0x2a, false, true, 1024, true, Bytes::new());
        assert!(p.recv().is_empty(), "R2Ts withheld beyond the allowance");
        // A's first burst arrives: held 4096 + run overhead, over the allowance with A's
        // next burst, but A is the oldest and no sequence is open: it gets one.
        p.data_out(1, a[0].3, 0, 0, true, &D4K);
        let a2 = r2ts_of(&p.recv());
        assert_eq!(
            a2.iter().map(|r| (r.0, r.1)).collect::<Vec<_>>(),
            [(1, 4096)]
        );
        assert!(p.conn.committed_data_out_bytes() > 6000);
        // A completes: its data leaves the connection, B then C are solicited.
        p.data_out(1, a2[0].3, 0, 4096, true, &D4K);
        assert_eq!(p.command_event().data_out.len(), 8192);
        let bc = r2ts_of(&p.recv());
        assert_eq!(
            bc.iter().map(|r| (r.0, r.1, r.2)).collect::<Vec<_>>(),
            [(2, 0, 4096), (3, 0, 1024)]
        );
        assert_eq!(p.conn.committed_data_out_bytes(), 4096 + 1024);
        p.data_out(3, bc[1].3, 0, 0, true, &D4K[..1024]);
        assert_eq!(p.command_event().itt, 3);
        p.data_out(2, bc[0].3, 0, 0, true, &D4K);
        assert_eq!(p.command_event().itt, 2);
        assert_eq!(p.conn.committed_data_out_bytes(), 0);
        assert_eq!(p.conn.task_set_full_count(), 0);
    }

    #[test]
    fn one_sequence_at_a_time_when_the_allowance_is_zero() {
        let mut p = Pair::new(config());
        paced_login(&mut p, "Yes", "4");
        p.conn.set_data_out_allowance(0);
        p.command(1, 0x2a, false, true, 3 * 4096, true, Bytes::new());
        p.command(2, 0x2a, false, true, 4096, true, Bytes::new());
        for (i, offset) in [0u32, 4096, 8192].into_iter().enumerate() {
            let r = r2ts_of(&p.recv());
            assert_eq!(
                r.iter().map(|r| (r.0, r.1)).collect::<Vec<_>>(),
                [(1, offset)],
                "MaxOutstandingR2T=4, yet one sequence of the oldest command at a time"
            );
            assert!(p.events().is_empty());
            p.data_out(1, r[0].3, 0, offset, true, &D4K);
            if i < 2 {
                assert!(p.events().is_empty());
            }
        }
        assert_eq!(p.command_event().data_out.len(), 3 * 4096);
        // The next command is now the oldest.
        let r = r2ts_of(&p.recv());
        assert_eq!(r.iter().map(|r| (r.0, r.1)).collect::<Vec<_>>(), [(2, 0)]);
        // Raising the allowance sends nothing more here: everything is solicited.
        p.conn.set_data_out_allowance(usize::MAX);
        assert!(p.recv().is_empty());
    }

    #[test]
    fn raising_the_allowance_releases_withheld_r2ts() {
        let mut p = Pair::new(config());
        paced_login(&mut p, "Yes", "4");
        p.conn.set_data_out_allowance(4096);
        p.command(1, 0x2a, false, true, 3 * 4096, true, Bytes::new());
        assert_eq!(r2ts_of(&p.recv()).len(), 1);
        p.conn.set_data_out_allowance(3 * 4096);
        let r = r2ts_of(&p.recv());
        assert_eq!(r.iter().map(|r| r.1).collect::<Vec<_>>(), [4096, 8192]);
        // An abort frees the room; the next command is solicited at once.
        p.conn.set_data_out_allowance(4096);
        p.command(2, 0x2a, false, true, 4096, true, Bytes::new());
        assert!(p.recv().is_empty());
        tmf(&mut p, 0x50, TmfFunction::AbortTask, 1, 0);
        let out = p.recv();
        assert_eq!(r2ts_of(&out[..1]).first().map(|r| r.0), Some(2));
        assert_eq!(p.conn.committed_data_out_bytes(), 4096);
    }

    #[test]
    fn unsolicited_data_past_the_allowance_gets_task_set_full() {
        static IMM: [u8; 1024] = [1; 1024];
        let mut p = Pair::new(config());
        paced_login(&mut p, "No", "1");
        p.conn.set_data_out_allowance(3000);
        // Nothing committed: taken whatever the allowance (1024 immediate + 3072 unsolicited),
        // and as the oldest it gets its R2T.
        p.command(1, 0x2a, false, true, 8192, false, Bytes::from_static(&IMM));
        let a = r2ts_of(&p.recv());
        assert_eq!(
            a.iter().map(|r| (r.0, r.1)).collect::<Vec<_>>(),
            [(1, 4096)]
        );
        let committed = p.conn.committed_data_out_bytes();
        assert!(committed >= 8192, "{committed}");
        // B's 2048 bytes of immediate + unsolicited data do not fit: TASK SET FULL at once.
        let b_sn = p.cmd_sn;
        p.command(
            2,
            0x2a,
            false,
            true,
            2048,
            false,
            Bytes::from_static(&IMM[..512]),
        );
        let out = p.recv();
        let [Pdu {
            header: Header::ScsiResponse(r),
            ..
        }] = out.as_slice()
        else {
            panic!("expected one SCSI Response, got {out:?}")
        };
        assert_eq!((r.itt, r.status), (2, STATUS_TASK_SET_FULL));
        assert!(sn_lt(b_sn, r.exp_cmd_sn), "B's CmdSN is consumed");
        assert_eq!(p.conn.task_set_full_count(), 1);
        assert_eq!(
            p.conn.committed_data_out_bytes(),
            committed,
            "B's data not kept"
        );
        assert!(p.events().is_empty());
        // B's unsolicited Data-Out, already on its way, is dropped without closing.
        p.data_out(2, RESERVED_TAG, 0, 512, true, &D4K[..1536]);
        assert!(p.conn.is_closed().is_none());
        assert!(p.recv().is_empty() && p.events().is_empty());
        assert_eq!(p.conn.committed_data_out_bytes(), committed);
        // A finishes; then B retried with the same ITT is taken and completes.
        p.data_out(1, RESERVED_TAG, 0, 1024, true, &D4K[..3072]);
        p.data_out(1, a[0].3, 0, 4096, true, &D4K);
        assert_eq!(p.command_event().itt, 1);
        assert_eq!(p.conn.committed_data_out_bytes(), 0);
        p.command(
            2,
            0x2a,
            false,
            true,
            2048,
            false,
            Bytes::from_static(&IMM[..512]),
        );
        assert!(p.recv().is_empty());
        p.data_out(2, RESERVED_TAG, 0, 512, true, &D4K[..1536]);
        let c = p.command_event();
        assert_eq!((c.itt, c.data_out.len()), (2, 2048));
        assert_eq!(c.data_out[0], 1);
        assert_eq!(c.data_out[512], 4);
        assert_eq!(p.conn.task_set_full_count(), 1);
    }

    // ----- NOP, text, logout, TMF, errors ------------------------------------------------

    #[test]
    fn echoes_nop_out_ping() {
        let mut p = Pair::new(config());
        p.login_normal(&[]);
        let h = NopOut {
            immediate: true,
            itt: 0x77,
            ttt: RESERVED_TAG,
            lun: 0,
            cmd_sn: 1,
            exp_stat_sn: 102,
        };
        p.send(pdu(Header::NopOut(h), Bytes::from_static(b"ping")));
        let out = p.recv();
        let Header::NopIn(n) = &out[0].header else {
            panic!()
        };
        assert_eq!((n.itt, n.ttt, n.stat_sn), (0x77, RESERVED_TAG, 101));
        assert_eq!(&out[0].data[..], b"ping");
        // ITT 0xffffffff: no answer wanted.
        let h = NopOut {
            immediate: true,
            itt: RESERVED_TAG,
            ttt: RESERVED_TAG,
            cmd_sn: 1,
            ..Default::default()
        };
        p.send(pdu(Header::NopOut(h), Bytes::new()));
        assert!(p.recv().is_empty());
    }

    // ----- liveness: timers with simulated time ----------------------------------------------

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    /// The NOP-In ping the target sent, if that is all it sent.
    fn ping_of(out: &[Pdu]) -> NopIn {
        match out {
            [Pdu {
                header: Header::NopIn(n),
                data,
                ..
            }] if data.is_empty() => n.clone(),
            other => panic!("expected one NOP-In ping, got {other:?}"),
        }
    }

    fn answer_ping(p: &mut Pair, ttt: u32) {
        let h = NopOut {
            immediate: true,
            itt: RESERVED_TAG,
            ttt,
            cmd_sn: p.cmd_sn,
            ..Default::default()
        };
        p.send(pdu(Header::NopOut(h), Bytes::new()));
    }

    #[test]
    fn pings_after_idle_and_an_answer_keeps_the_session() {
        let mut p = Pair::new(config());
        p.login_normal(&[]);
        let t0 = p.now;
        assert_eq!(p.conn.poll_timeout(), Some(t0 + secs(5)));
        p.conn.handle_timeout(t0 + secs(4));
        assert!(p.recv().is_empty(), "not idle long enough");
        p.conn.handle_timeout(t0 + secs(5));
        let ping = ping_of(&p.recv());
        assert_eq!(ping.itt, RESERVED_TAG);
        assert_ne!(ping.ttt, RESERVED_TAG);
        assert_eq!(
            p.conn.poll_timeout(),
            Some(t0 + secs(15)),
            "answer deadline"
        );
        // A NOP-Out with some other TTT does not count as the answer.
        p.now = t0 + secs(6);
        answer_ping(&mut p, ping.ttt.wrapping_add(1));
        assert!(p.recv().is_empty());
        assert_eq!(p.conn.poll_timeout(), Some(t0 + secs(15)));
        answer_ping(&mut p, ping.ttt);
        assert!(p.recv().is_empty(), "the answer is not answered");
        assert_eq!(
            p.conn.poll_timeout(),
            Some(t0 + secs(11)),
            "next ping after idle"
        );
        p.conn.handle_timeout(t0 + secs(15));
        assert!(p.conn.is_closed().is_none());
        // The ping did not advance StatSN (§11.19.2): the next response carries the same one.
        let next = ping_of(&p.recv());
        assert_eq!(next.stat_sn, ping.stat_sn);
        assert_ne!(next.ttt, ping.ttt);
        p.command(1, 0x00, false, false, 0, true, Bytes::new());
        p.command_event();
        p.conn.complete_command(1, good(b""));
        let Header::ScsiResponse(r) = &p.recv()[0].header else {
            panic!()
        };
        assert_eq!(r.stat_sn, ping.stat_sn);
    }

    #[test]
    fn closes_when_a_ping_goes_unanswered() {
        let mut p = Pair::new(config());
        p.login_normal(&[]);
        p.command(1, 0x28, true, false, 512, true, Bytes::new());
        p.command_event();
        let t0 = p.now;
        p.conn.handle_timeout(t0 + secs(5));
        ping_of(&p.recv());
        p.conn.handle_timeout(t0 + secs(14));
        assert!(p.conn.is_closed().is_none());
        p.conn.handle_timeout(t0 + secs(15));
        assert_eq!(
            p.conn.is_closed(),
            Some(&CloseReason::Timeout("NOP-In unanswered"))
        );
        assert_eq!(p.events(), vec![Event::Aborted(vec![1])]);
        assert_eq!(p.conn.poll_timeout(), None);
    }

    #[test]
    fn received_pdus_postpone_the_ping() {
        let mut p = Pair::new(config());
        p.login_normal(&[]);
        let t0 = p.now;
        p.now = t0 + secs(3);
        p.command(1, 0x00, false, false, 0, true, Bytes::new());
        p.command_event();
        assert_eq!(p.conn.poll_timeout(), Some(t0 + secs(8)));
        // An early wake-up (the owner's timer still at the old deadline) does nothing.
        p.conn.handle_timeout(t0 + secs(5));
        assert!(p.recv().is_empty());
        assert!(p.conn.is_closed().is_none());
    }

    #[test]
    fn login_must_finish_within_the_login_timeout() {
        let mut p = Pair::new(config());
        let t0 = p.now;
        assert_eq!(p.conn.poll_timeout(), Some(t0 + secs(15)));
        // Half a login request: bytes arrive, the deadline stays.
        p.now = t0 + secs(10);
        let mut half = BytesMut::from(&[0x43u8, 0x81, 0, 0, 0, 0, 0, 0][..]);
        p.conn.receive(&mut half, p.now);
        assert_eq!(p.conn.poll_timeout(), Some(t0 + secs(15)));
        p.conn.handle_timeout(t0 + secs(14));
        assert!(p.conn.is_closed().is_none());
        p.conn.handle_timeout(t0 + secs(15));
        assert_eq!(p.conn.is_closed(), Some(&CloseReason::Timeout("login")));
        assert!(p.recv().is_empty());
    }

    #[test]
    fn idle_discovery_session_closes() {
        let mut cfg = config();
        cfg.timeouts.nop_interval = Duration::ZERO;
        let mut p = Pair::new(cfg);
        p.login_with(&[("InitiatorName", INITIATOR), ("SessionType", "Discovery")]);
        let t0 = p.now;
        assert_eq!(p.conn.poll_timeout(), Some(t0 + secs(60)));
        p.conn.handle_timeout(t0 + secs(59));
        assert!(p.conn.is_closed().is_none());
        p.conn.handle_timeout(t0 + secs(60));
        assert_eq!(
            p.conn.is_closed(),
            Some(&CloseReason::Timeout("idle discovery session"))
        );
    }

    #[test]
    fn disabled_timers_arm_nothing() {
        let mut cfg = config();
        cfg.timeouts = Timeouts::DISABLED;
        let mut p = Pair::new(cfg);
        assert_eq!(p.conn.poll_timeout(), None);
        p.login_normal(&[]);
        assert_eq!(p.conn.poll_timeout(), None);
        p.conn.handle_timeout(p.now + secs(100_000));
        assert!(p.conn.is_closed().is_none());
        assert!(p.recv().is_empty());
    }

    #[test]
    fn request_logout_sends_async_event_1() {
        let mut p = Pair::new(config());
        assert!(!p.conn.request_logout(2), "not before login");
        p.login_normal(&[]);
        assert!(p.conn.request_logout(2));
        let out = p.recv();
        let Header::AsyncMessage(m) = &out[0].header else {
            panic!("{out:?}")
        };
        assert_eq!((m.async_event, m.parameter3), (1, 2));
        assert!(
            p.conn.is_closed().is_none(),
            "the initiator logs out itself"
        );
        let mut d = Pair::new(config());
        d.login_with(&[("InitiatorName", INITIATOR), ("SessionType", "Discovery")]);
        assert!(
            !d.conn.request_logout(2),
            "discovery sessions are just closed"
        );
    }

    #[test]
    fn close_by_owner_aborts_running_tasks() {
        let mut p = Pair::new(config());
        p.login_normal(&[]);
        p.command(9, 0x28, true, false, 512, true, Bytes::new());
        p.command_event();
        p.conn.close_by_owner("session reinstated");
        assert_eq!(
            p.conn.is_closed(),
            Some(&CloseReason::Closed("session reinstated"))
        );
        assert_eq!(p.events(), vec![Event::Aborted(vec![9])]);
        p.conn.complete_command(9, good(&[0; 512]));
        assert!(p.recv().is_empty());
    }

    #[test]
    fn rejects_data_digest_error_on_data_out_and_closes() {
        let mut p = Pair::new(config());
        p.login_normal(&[("HeaderDigest", "CRC32C"), ("DataDigest", "CRC32C")]);
        p.digests = Digests {
            header: true,
            data: true,
        };
        p.command(3, 0x2a, false, true, 512, true, Bytes::new());
        let out = p.recv();
        let Header::R2t(r) = &out[0].header else {
            panic!("{out:?}")
        };
        let h = DataOut {
            final_: true,
            itt: 3,
            ttt: r.ttt,
            ..Default::default()
        };
        let mut wire = BytesMut::new();
        for piece in framer::encode_pdu(
            &pdu(Header::DataOut(h), Bytes::from_static(&[7; 512])),
            p.digests,
        ) {
            wire.extend_from_slice(&piece);
        }
        let last = wire.len() - 1;
        wire[last] ^= 0xff;
        p.conn.receive(&mut wire, p.now);
        let out = p.recv();
        let Header::Reject(r) = &out[0].header else {
            panic!("{out:?}")
        };
        assert_eq!(r.reason, RejectReason::DataDigestError);
        assert_eq!(out[0].data[0] & 0x3f, 0x05, "the Data-Out's BHS comes back");
        assert!(matches!(
            p.conn.is_closed(),
            Some(CloseReason::ProtocolError(_))
        ));
        assert!(p.events().is_empty(), "the write never reaches the owner");
    }

    #[test]
    fn logout_answers_then_closes_and_aborts_in_flight() {
        let mut p = Pair::new(config());
        p.login_normal(&[]);
        p.command(0x40, 0x28, true, false, 512, true, Bytes::new());
        p.command_event();
        let cmd_sn = p.next_cmd_sn();
        let h = LogoutRequest {
            immediate: true,
            reason: LogoutReason::CloseSession,
            itt: 0x41,
            cid: 0,
            cmd_sn,
            exp_stat_sn: 0,
        };
        p.send(pdu(Header::LogoutRequest(h), Bytes::new()));
        let out = p.recv();
        let Header::LogoutResponse(r) = &out[0].header else {
            panic!()
        };
        assert_eq!((r.response, r.itt), (0, 0x41));
        assert_eq!(
            p.conn.is_closed(),
            Some(&CloseReason::Logout(LogoutReason::CloseSession))
        );
        assert_eq!(p.events(), vec![Event::Aborted(vec![0x40])]);
        p.conn.complete_command(0x40, good(&[0; 512]));
        assert!(p.recv().is_empty());
    }

    /// Send one login request straight to full feature phase; the response's status.
    fn acl_login_status(p: &mut Pair, pairs: &[(&str, &str)]) -> (u8, u8) {
        p.send(pdu(
            Header::LoginRequest(login_req(Stage::Operational, Stage::FullFeature, true)),
            kv(pairs),
        ));
        let out = p.recv();
        let Header::LoginResponse(r) = &out[0].header else {
            panic!("not a login response")
        };
        (r.status_class, r.status_detail)
    }

    const ACL_OUTSIDER: &str = "iqn.2026-11.io.other:host";
    const ACL_PROTECTED: &str = "iqn.2026-11.io.ironlun:protected";

    /// `config()` plus a target only `iqn.2026-11.io.test:*` may use.
    fn acl_config() -> PortalConfig {
        let mut cfg = config();
        cfg.targets.push(TargetInfo {
            name: ACL_PROTECTED.to_string(),
            alias: None,
            addresses: vec![TargetPortal::new(([127, 0, 0, 1], 3260).into(), 1)],
            portal_group_tag: 1,
            acl: Acl::allow_only(vec![crate::acl::NamePattern::parse(
                "iqn.2026-11.io.test:*",
            )
            .unwrap()]),
            chap: None,
        });
        cfg
    }

    #[test]
    fn rejects_login_outside_acl_with_authorization_failure() {
        let mut p = Pair::new(acl_config());
        let status = acl_login_status(
            &mut p,
            &[
                ("InitiatorName", ACL_OUTSIDER),
                ("TargetName", ACL_PROTECTED),
            ],
        );
        assert_eq!(status, (2, 2));
        assert_eq!(p.conn.is_closed(), Some(&CloseReason::LoginFailed));
        assert_eq!(
            p.conn.login_failure(),
            Some(LoginStatus::AUTHORIZATION_FAILURE)
        );
        assert!(p.events().is_empty());
        assert_eq!(p.conn.config.sessions.live(), 0);
    }

    #[test]
    fn accepts_login_inside_acl_case_insensitively() {
        let mut p = Pair::new(acl_config());
        p.login_with(&[
            ("InitiatorName", "IQN.2026-11.IO.TEST:Host"),
            ("TargetName", ACL_PROTECTED),
        ]);
        assert!(matches!(p.events().as_slice(), [Event::LoggedIn(_)]));
        // The outsider may still use the open target.
        let mut q = Pair::new(acl_config());
        q.login_with(&[("InitiatorName", ACL_OUTSIDER), ("TargetName", TARGET)]);
    }

    fn acl_send_targets(p: &mut Pair, value: &str) -> Vec<String> {
        let h = TextRequest {
            final_: true,
            itt: 5,
            ttt: RESERVED_TAG,
            cmd_sn: p.next_cmd_sn(),
            ..Default::default()
        };
        p.send(pdu(Header::TextRequest(h), kv(&[("SendTargets", value)])));
        let out = p.recv();
        keys(&out[0].data)
            .into_iter()
            .filter(|(k, _)| k == "TargetName")
            .map(|(_, v)| v)
            .collect()
    }

    #[test]
    fn send_targets_hides_targets_outside_the_acl() {
        let mut p = Pair::new(acl_config());
        p.login_with(&[
            ("InitiatorName", ACL_OUTSIDER),
            ("SessionType", "Discovery"),
        ]);
        assert_eq!(acl_send_targets(&mut p, "All"), vec![TARGET.to_string()]);
        assert!(acl_send_targets(&mut p, ACL_PROTECTED).is_empty());

        let mut q = Pair::new(acl_config());
        q.login_with(&[("InitiatorName", INITIATOR), ("SessionType", "Discovery")]);
        assert_eq!(
            acl_send_targets(&mut q, "All"),
            vec![TARGET.to_string(), ACL_PROTECTED.to_string()]
        );
        assert_eq!(
            acl_send_targets(&mut q, ACL_PROTECTED),
            vec![ACL_PROTECTED.to_string()]
        );
    }

    fn acl_logout(p: &mut Pair) {
        let cmd_sn = p.next_cmd_sn();
        let h = LogoutRequest {
            immediate: true,
            reason: LogoutReason::CloseSession,
            itt: 0x99,
            cid: 0,
            cmd_sn,
            exp_stat_sn: 0,
        };
        p.send(pdu(Header::LogoutRequest(h), Bytes::new()));
        assert!(matches!(&p.recv()[0].header, Header::LogoutResponse(_)));
    }

    #[test]
    fn session_limits_refuse_with_out_of_resources_and_release() {
        let limits = Arc::new(crate::acl::SessionLimits::new(2).with_target(TARGET, 1));
        let cfg = || PortalConfig {
            sessions: limits.clone(),
            ..acl_config()
        };
        let normal = [("InitiatorName", INITIATOR), ("TargetName", TARGET)];
        let mut a = Pair::new(cfg());
        a.login_with(&normal);
        // The target's limit (1) is reached.
        let mut b = Pair::new(cfg());
        assert_eq!(acl_login_status(&mut b, &normal), (3, 2));
        assert_eq!(b.conn.is_closed(), Some(&CloseReason::LoginFailed));
        assert!(b.events().iter().all(|e| !matches!(e, Event::LoggedIn(_))));
        // Another target still fits the total (2), then the total is reached.
        let mut c = Pair::new(cfg());
        c.login_with(&[("InitiatorName", INITIATOR), ("TargetName", ACL_PROTECTED)]);
        let mut d = Pair::new(cfg());
        let status = acl_login_status(
            &mut d,
            &[("InitiatorName", INITIATOR), ("SessionType", "Discovery")],
        );
        assert_eq!(status, (3, 2));
        assert_eq!(limits.live(), 2);
        // Logout gives the slot back at once; a dropped connection gives it back too.
        acl_logout(&mut a);
        assert_eq!(limits.live_for(TARGET), Some(0));
        let mut e = Pair::new(cfg());
        e.login_with(&normal);
        drop(c);
        drop(e);
        assert_eq!(limits.live(), 0);
    }

    fn tmf(p: &mut Pair, itt: u32, function: TmfFunction, rtt: u32, ref_cmd_sn: u32) {
        let cmd_sn = p.cmd_sn;
        let h = TaskMgmtRequest {
            immediate: true,
            function,
            lun: 0,
            itt,
            referenced_task_tag: rtt,
            cmd_sn,
            exp_stat_sn: 0,
            ref_cmd_sn,
            exp_data_sn: 0,
        };
        p.send(pdu(Header::TaskMgmtRequest(h), Bytes::new()));
    }

    #[test]
    fn abort_task_drops_the_task_and_answers_on_completion() {
        let mut p = Pair::new(config());
        p.login_normal(&[]);
        p.command(0x50, 0x28, true, false, 512, true, Bytes::new());
        p.command_event();
        tmf(&mut p, 0x51, TmfFunction::AbortTask, 0x50, 1);
        let ev = p.events();
        assert_eq!(ev.len(), 2);
        assert_eq!(ev[0], Event::Aborted(vec![0x50]));
        let Event::TaskMgmt(t) = &ev[1] else { panic!() };
        assert_eq!(
            (t.itt, t.function, t.referenced_task_tag),
            (0x51, TmfFunction::AbortTask, 0x50)
        );
        // The owner's late completion is dropped; the TMF response follows the owner's answer.
        p.conn.complete_command(0x50, good(&[0; 512]));
        assert!(p.recv().is_empty());
        p.conn.complete_tmf(0x51, TmfResponse::FunctionComplete);
        let out = p.recv();
        let Header::TaskMgmtResponse(r) = &out[0].header else {
            panic!()
        };
        assert_eq!((r.itt, r.response), (0x51, TmfResponse::FunctionComplete));
    }

    #[test]
    fn a_command_ended_without_response_sends_nothing_and_frees_its_itt() {
        let mut p = Pair::new(config());
        p.login_normal(&[]);
        p.command(0x31, 0x28, true, false, 512, true, Bytes::new());
        p.command_event();
        p.conn.end_command_without_response(0x31);
        assert!(p.recv().is_empty());
        // A late completion is ignored; the ITT is free for a new command.
        p.conn.complete_command(0x31, good(b"x"));
        assert!(p.recv().is_empty());
        p.command(0x31, 0x28, true, false, 512, true, Bytes::new());
        assert_eq!(p.command_event().itt, 0x31);
        p.conn.complete_command(0x31, good(&[7; 512]));
        let out = p.recv();
        let Header::DataIn(d) = &out[0].header else {
            panic!()
        };
        assert!(d.status_present);
    }

    #[test]
    fn abort_task_of_unknown_task_answers_directly() {
        let mut p = Pair::new(config());
        p.login_normal(&[]);
        // RefCmdSN already past (outside the window): task does not exist.
        p.cmd_sn = 1;
        tmf(&mut p, 0x60, TmfFunction::AbortTask, 0x99, 0);
        let out = p.recv();
        let Header::TaskMgmtResponse(r) = &out[0].header else {
            panic!()
        };
        assert_eq!(r.response, TmfResponse::TaskDoesNotExist);
        // RefCmdSN in the window and before the TMF's CmdSN: considered received, complete.
        p.cmd_sn = 3;
        tmf(&mut p, 0x61, TmfFunction::AbortTask, 0x98, 1);
        let out = p.recv();
        let Header::TaskMgmtResponse(r) = &out[0].header else {
            panic!()
        };
        assert_eq!(r.response, TmfResponse::FunctionComplete);
        assert_eq!(r.exp_cmd_sn, 2, "CmdSN 1 now counts as received");
        // The skipped command, arriving late, is not executed.
        p.cmd_sn = 1;
        p.command(0x98, 0x00, false, false, 0, true, Bytes::new());
        assert!(p.events().is_empty());
        assert!(p.events().is_empty());
    }

    #[test]
    fn answers_unsupported_tmf_functions() {
        let mut p = Pair::new(config());
        p.login_normal(&[]);
        tmf(&mut p, 0x70, TmfFunction::Other(0x0e), 0, 1);
        tmf(&mut p, 0x71, TmfFunction::TaskReassign, 0, 1);
        let out = p.recv();
        let responses: Vec<TmfResponse> = out
            .iter()
            .map(|o| match &o.header {
                Header::TaskMgmtResponse(r) => r.response,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            responses,
            [
                TmfResponse::FunctionNotSupported,
                TmfResponse::ReassignmentNotSupported
            ]
        );
        assert!(p.events().is_empty());
    }

    #[test]
    fn lun_reset_aborts_tasks_of_that_lun() {
        let mut p = Pair::new(config());
        p.login_normal(&[]);
        p.command(1, 0x28, true, false, 512, true, Bytes::new());
        p.command(2, 0x2a, false, true, 4096, true, Bytes::new());
        let _ = p.recv();
        let _ = p.events();
        tmf(&mut p, 3, TmfFunction::LogicalUnitReset, 0, 0);
        let ev = p.events();
        assert_eq!(
            ev[0],
            Event::Aborted(vec![1]),
            "only tasks already handed over are reported"
        );
        assert!(matches!(ev[1], Event::TaskMgmt(_)));
        // Data-Out for the dropped write is ignored.
        p.data_out(2, 1, 0, 0, true, &[0; 16]);
        assert!(p.conn.is_closed().is_none());
    }

    #[test]
    fn target_reset_is_refused_untouched_unless_the_owner_allows_it() {
        let mut p = Pair::new(config());
        p.login_normal(&[]);
        p.command(1, 0x28, true, false, 512, true, Bytes::new());
        p.command_event();
        for function in [TmfFunction::TargetWarmReset, TmfFunction::TargetColdReset] {
            tmf(&mut p, 2, function, 0, 0);
            let out = p.recv();
            let Header::TaskMgmtResponse(r) = &out[0].header else {
                panic!()
            };
            assert_eq!((r.itt, r.response), (2, TmfResponse::AuthorizationFailed));
            assert!(
                p.events().is_empty(),
                "no task aborted, nothing for the owner"
            );
        }
        // The running command still gets its response; the connection stays open.
        p.conn.complete_command(1, good(&[0; 512]));
        assert!(!p.recv().is_empty());
        assert!(p.conn.is_closed().is_none());

        p.command(3, 0x28, true, false, 512, true, Bytes::new());
        p.command_event();
        p.conn.set_target_reset_allowed(true);
        tmf(&mut p, 4, TmfFunction::TargetColdReset, 0, 0);
        let ev = p.events();
        assert_eq!(ev[0], Event::Aborted(vec![3]));
        assert!(matches!(ev[1], Event::TaskMgmt(_)));
        p.conn.complete_tmf(4, TmfResponse::FunctionComplete);
        let out = p.recv();
        let Header::TaskMgmtResponse(r) = &out[0].header else {
            panic!()
        };
        assert_eq!(r.response, TmfResponse::FunctionComplete);
        assert!(
            p.conn.is_closed().is_some(),
            "§11.5.1: closed after the response"
        );
    }

    #[test]
    fn rejects_unexpected_opcodes_in_full_feature_phase() {
        let mut p = Pair::new(config());
        p.login_normal(&[]);
        p.send(pdu(
            Header::LoginRequest(login_req(Stage::Operational, Stage::FullFeature, true)),
            Bytes::new(),
        ));
        p.send(pdu(
            Header::NopIn(NopIn {
                itt: 1,
                ttt: RESERVED_TAG,
                ..Default::default()
            }),
            Bytes::new(),
        ));
        let mut raw = [0u8; 48];
        raw[0] = 0x1c; // an initiator opcode nobody defines
        raw[16..20].copy_from_slice(&[0, 0, 0, 9]);
        p.send_raw(&raw);
        let out = p.recv();
        assert_eq!(out.len(), 3);
        let reasons: Vec<RejectReason> = out
            .iter()
            .map(|o| match &o.header {
                Header::Reject(r) => r.reason,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            reasons,
            [
                RejectReason::ProtocolError,
                RejectReason::ProtocolError,
                RejectReason::CommandNotSupported
            ]
        );
        assert_eq!(out[0].data[0] & 0x3f, 0x03);
        assert_eq!(out[2].data[..], raw[..]);
        assert!(p.conn.is_closed().is_none());
    }

    #[test]
    fn rejects_bad_data_digest_and_goes_on() {
        let mut p = Pair::new(config());
        p.login_normal(&[("HeaderDigest", "CRC32C"), ("DataDigest", "CRC32C")]);
        p.digests = Digests {
            header: true,
            data: true,
        };
        let h = NopOut {
            immediate: true,
            itt: 0x80,
            ttt: RESERVED_TAG,
            cmd_sn: 1,
            ..Default::default()
        };
        let mut wire = BytesMut::new();
        for piece in framer::encode_pdu(
            &pdu(Header::NopOut(h.clone()), Bytes::from_static(b"abcd")),
            p.digests,
        ) {
            wire.extend_from_slice(&piece);
        }
        let last = wire.len() - 1;
        wire[last] ^= 0xff;
        p.conn.receive(&mut wire, p.now);
        let out = p.recv();
        let Header::Reject(r) = &out[0].header else {
            panic!("{out:?}")
        };
        assert_eq!(r.reason, RejectReason::DataDigestError);
        // The connection still works, with digests.
        p.send(pdu(Header::NopOut(h), Bytes::from_static(b"abcd")));
        let out = p.recv();
        assert!(matches!(out[0].header, Header::NopIn(_)));
    }

    #[test]
    fn drops_connection_on_segment_larger_than_declared() {
        let mut cfg = config();
        cfg.offers.max_recv_data_segment_length = 4096;
        let mut p = Pair::new(cfg);
        p.login_normal(&[]);
        static BIG: [u8; 8192] = [0; 8192];
        let h = NopOut {
            immediate: true,
            itt: 1,
            ttt: RESERVED_TAG,
            cmd_sn: 1,
            ..Default::default()
        };
        p.send(pdu(Header::NopOut(h), Bytes::from_static(&BIG)));
        assert!(matches!(
            p.conn.is_closed(),
            Some(CloseReason::ProtocolError(_))
        ));
    }

    #[test]
    fn discovery_session_rejects_scsi_commands() {
        let mut p = Pair::new(config());
        p.login_with(&[("InitiatorName", INITIATOR), ("SessionType", "Discovery")]);
        let _ = p.events();
        p.command(1, 0x00, false, false, 0, true, Bytes::new());
        let out = p.recv();
        assert!(
            matches!(&out[0].header, Header::Reject(r) if r.reason == RejectReason::ProtocolError)
        );
        assert!(p.events().is_empty());
    }

    #[test]
    fn text_request_answers_extension_and_unknown_keys_not_understood() {
        let mut p = Pair::new(config());
        p.login_normal(&[]);
        let h = TextRequest {
            final_: true,
            itt: 0x30,
            ttt: RESERVED_TAG,
            cmd_sn: p.next_cmd_sn(),
            ..Default::default()
        };
        let asked = [
            ("X#NodeArchitecture", "ExampleOS/1.0"),
            ("X-com.example.Knob", "1"),
            ("NoSuchKey", "2"),
        ];
        p.send(pdu(Header::TextRequest(h), kv(&asked)));
        let out = p.recv();
        let Header::TextResponse(r) = &out[0].header else {
            panic!("{out:?}")
        };
        assert!(r.final_);
        let k = keys(&out[0].data);
        for (name, _) in asked {
            assert_eq!(key(&k, name), Some("NotUnderstood"), "{name}");
        }
        assert!(p.conn.is_closed().is_none());
    }

    #[test]
    fn long_text_response_comes_in_pieces() {
        let mut cfg = config();
        for i in 0..40 {
            cfg.targets.push(TargetInfo {
                name: format!("iqn.2026-11.io.ironlun:disk-{i:03}"),
                alias: None,
                addresses: vec![
                    TargetPortal::new("192.0.2.1:3260".parse().unwrap(), 1),
                    TargetPortal::new("[2001:db8::1]:3260".parse().unwrap(), 1),
                ],
                portal_group_tag: 1,
                acl: Acl::allow_all(),
                chap: None,
            });
        }
        let mut p = Pair::new(cfg);
        p.login_with(&[
            ("InitiatorName", INITIATOR),
            ("SessionType", "Discovery"),
            ("MaxRecvDataSegmentLength", "512"),
        ]);
        let mut h = TextRequest {
            final_: true,
            itt: 9,
            ttt: RESERVED_TAG,
            cmd_sn: 1,
            ..Default::default()
        };
        p.send(pdu(
            Header::TextRequest(h.clone()),
            kv(&[("SendTargets", "All")]),
        ));
        let mut text = Vec::new();
        loop {
            let out = p.recv();
            assert_eq!(out.len(), 1);
            let Header::TextResponse(r) = &out[0].header else {
                panic!()
            };
            assert!(out[0].data.len() <= 512);
            text.extend_from_slice(&out[0].data);
            if r.final_ {
                assert_eq!(r.ttt, RESERVED_TAG);
                break;
            }
            assert!(r.continue_);
            h.ttt = r.ttt;
            h.cmd_sn = h.cmd_sn.wrapping_add(1);
            p.send(pdu(Header::TextRequest(h.clone()), Bytes::new()));
        }
        let k = keys(&text);
        assert_eq!(k.iter().filter(|(key, _)| key == "TargetName").count(), 41);
    }

    /// `config()` with CHAP on the lab target (user `alice`, secret `alice-secret-1`).
    fn chap_config() -> PortalConfig {
        use crate::chap::{Credentials, Secret};
        let mut cfg = config();
        cfg.targets[0].chap = Some(ChapConfig {
            initiator: Credentials {
                user: "alice".into(),
                secret: Secret::new("alice-secret-1"),
            },
            target: None,
        });
        cfg
    }

    /// Through the security stage with CHAP MD5 answering with `secret`; the final response.
    fn chap_login(p: &mut Pair, secret: &str) -> Pdu {
        use crate::chap::{decode_binary, encode_binary, ChapAlgorithm, Secret};
        let sec =
            |transit| Header::LoginRequest(login_req(Stage::Security, Stage::Operational, transit));
        p.send(pdu(
            sec(true),
            kv(&[
                ("InitiatorName", INITIATOR),
                ("TargetName", TARGET),
                ("AuthMethod", "CHAP,None"),
            ]),
        ));
        let out = p.recv();
        assert_eq!(key(&keys(&out[0].data), "AuthMethod"), Some("CHAP"));
        p.send(pdu(sec(true), kv(&[("CHAP_A", "5")])));
        let out = p.recv();
        let k = keys(&out[0].data);
        let id: u8 = key(&k, "CHAP_I").unwrap().parse().unwrap();
        let c = decode_binary(key(&k, "CHAP_C").unwrap()).unwrap();
        let r = encode_binary(&ChapAlgorithm::Md5.response(id, &Secret::new(secret), &c));
        p.send(pdu(sec(true), kv(&[("CHAP_N", "alice"), ("CHAP_R", &r)])));
        let mut out = p.recv();
        assert_eq!(out.len(), 1);
        out.remove(0)
    }

    #[test]
    fn accepts_chap_then_operational_stage() {
        let mut p = Pair::new(chap_config());
        let r = chap_login(&mut p, "alice-secret-1");
        assert_eq!(login_status(&r), LoginStatus::SUCCESS);
        let Header::LoginResponse(h) = &r.header else {
            unreachable!()
        };
        assert!(h.transit && h.nsg == Stage::Operational);
        p.send(pdu(
            Header::LoginRequest(login_req(Stage::Operational, Stage::FullFeature, true)),
            kv(&[]),
        ));
        let out = p.recv();
        assert_eq!(login_status(&out[0]), LoginStatus::SUCCESS);
        assert_eq!(p.conn.login_failure(), None);
        assert!(matches!(p.events().as_slice(), [Event::LoggedIn(_)]));
    }

    #[test]
    fn rejects_wrong_chap_secret_and_closes() {
        let mut p = Pair::new(chap_config());
        let r = chap_login(&mut p, "wrong-secret-1");
        assert_eq!(login_status(&r), LoginStatus::AUTHENTICATION_FAILURE);
        assert_eq!(p.conn.is_closed(), Some(&CloseReason::LoginFailed));
        assert_eq!(
            p.conn.login_failure(),
            Some(LoginStatus::AUTHENTICATION_FAILURE)
        );
        assert!(p.events().is_empty());
    }

    #[test]
    fn chap_failures_back_off_per_initiator_across_connections() {
        let cfg = Arc::new(chap_config());
        for _ in 0..4 {
            // Each Pair is a new connection; the clone shares the limiter.
            let mut p = Pair::new((*cfg).clone());
            let r = chap_login(&mut p, "wrong-secret-1");
            assert_eq!(login_status(&r), LoginStatus::AUTHENTICATION_FAILURE);
        }
        // The shared limiter now refuses this initiator before any challenge.
        let mut p = Pair::new((*cfg).clone());
        p.send(pdu(
            Header::LoginRequest(login_req(Stage::Security, Stage::Operational, true)),
            kv(&[
                ("InitiatorName", INITIATOR),
                ("TargetName", TARGET),
                ("AuthMethod", "CHAP"),
            ]),
        ));
        let out = p.recv();
        assert_eq!(login_status(&out[0]), LoginStatus::AUTHENTICATION_FAILURE);
        // After the backoff (under a second of simulated time) the right secret gets in.
        let mut p = Pair::new((*cfg).clone());
        p.now += std::time::Duration::from_secs(1);
        let r = chap_login(&mut p, "alice-secret-1");
        assert_eq!(login_status(&r), LoginStatus::SUCCESS);
    }
}
