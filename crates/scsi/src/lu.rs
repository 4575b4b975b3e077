//! The logical unit: unit attention → CDB dispatch (SPC-4 §5, SBC-3 §5).
//!
//! Driving contract: call [`LogicalUnit::execute`] with the CDB and the complete Data-Out. It
//! returns [`Step::Done`] or [`Step::Io`]; perform the [`IoOp`] outside the LU lock and hand
//! its [`IoResult`] with the [`Continuation`] to [`LogicalUnit::resume`], repeating until
//! `Done`. Data-In in a [`Completion`] is already cut to the CDB's allocation length.
//! [`Step::Wait`]: the I/O may not start yet (a COMPARE AND WRITE's range lock, see
//! `caw.rs`); hand the continuation to [`LogicalUnit::proceed`] once
//! [`LogicalUnit::take_wakeup`] said so, and go on with what that returns.

use std::collections::HashMap;

use bytes::{Bytes, BytesMut};

use crate::cdb::{self, Command, Extent};
use crate::mode::{MediumInfo, ModePages, SenseRequest};
use crate::pr::ownership::{
    self, Checks, DrainTicket, Handover, OwnershipError, OwnershipOp, TaskPick,
};
use crate::pr::{access, ItNexus, Persist, PrError, PrState, Registration};
use crate::sanitize;
use crate::sense::{FieldPointer, SenseReason};
use crate::status;
use crate::ua::UnitAttentions;
use crate::vpd;

/// Identifies a session's I_T nexus. The daemon allocates one per session; the LU learns its
/// [`ItNexus`] identity via [`LogicalUnit::add_nexus`] (several sessions may briefly share
/// one identity, during session reinstatement).
pub type NexusId = u64;

/// Upper bound on I_T nexus identities the LU remembers without a session. Identities with no
/// session, no registration and no pending unit attention are forgotten beyond it (the next
/// login of such a port counts as first: 29h/00h); beyond twice it, session-less unregistered
/// identities are forgotten even with conditions pending.
pub const MAX_IDENTITIES: usize = 4096;

/// Static description of a logical unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LuConfig {
    /// LUN as seen in REPORT LUNS (single-level, peripheral addressing for < 256).
    pub lun: u64,
    /// 512 or 4096.
    pub block_size: u32,
    pub num_blocks: u64,
    /// T10 vendor id (8), product id (16), revision (4); space-padded on the wire.
    pub vendor: String,
    pub product: String,
    pub revision: String,
    /// Unit serial number (VPD 80h), stable across restarts.
    pub serial: String,
    /// NAA IEEE Registered Extended identifier (VPD 83h, type 6, 16 bytes), stable across restarts.
    pub naa: [u8; 16],
    /// SCSI target name for the VPD 83h SCSI name string and target-port descriptors.
    pub target_name: String,
    /// Relative target port identifier (VPD 83h association 1).
    pub relative_port: u16,
    /// Target port group (VPD 83h, type 5).
    pub target_port_group: u16,
    /// Thin provisioning: UNMAP / WRITE SAME with UNMAP / GET LBA STATUS supported (LBPME=1).
    pub thin: bool,
    pub read_only: bool,
    /// Write-back cache enabled (caching mode page WCE).
    pub write_cache: bool,
    /// Maximum transfer length in blocks (VPD B0h) and UNMAP limits.
    pub max_transfer_blocks: u32,
    pub max_unmap_blocks: u32,
    pub max_unmap_descriptors: u32,
    /// Relative target port identifiers of the target's ports (the portal group tags of its
    /// portal groups): the valid RTPIs for ALL_TG_PT, REGISTER AND MOVE and READ FULL STATUS.
    pub relative_ports: Vec<u16>,
    /// PR state can be persisted (the daemon has a state directory): PTPL_C=1 and APTPL=1 is
    /// accepted; otherwise APTPL=1 is INVALID FIELD IN PARAMETER LIST (SPC-4 §6.16.3).
    pub ptpl_capable: bool,
    /// When the PR state is persisted (with `ptpl_capable`): while APTPL is one (SPC-4
    /// §5.13.5.1, the default) or always. Changed at run time through
    /// [`LogicalUnit::set_pr_persistence`].
    pub pr_persistence: crate::pr::PrPersistence,
    /// LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT (SBC-3 §5.16.2, READ CAPACITY 16 byte 13).
    /// Default 0. An exponent > 0 is valid SCSI, but libiscsi's GetLBAStatus.UnmapSingle
    /// (1.19) then queries LBA i+1 and expects the first descriptor at i+lbppb, which no
    /// target can satisfy, so the default keeps one logical block per physical block.
    pub physical_block_exponent: u8,
    /// Target port groups and their asymmetric access states (SPC-4 §5.16); default: group 1
    /// active/optimized holding `relative_ports`. Changed at run time through
    /// [`LogicalUnit::set_port_group_state`].
    pub port_groups: crate::alua::PortGroups,
    /// The PR state is replicated across gateways (issue 18): a PERSISTENT RESERVE OUT that
    /// passes the LU's checks comes back as [`Step::Replicate`] instead of being applied
    /// here, and the state arrives through [`LogicalUnit::install_pr`].
    pub replicated: bool,
}

impl LuConfig {
    /// A configuration with the usual defaults: vendor "IRONLUN", product "ironlun disk",
    /// revision "0001", serial derived from `naa`, thin provisioning and write-back cache on,
    /// read-write, 16 MiB maximum transfer, UNMAP limits of 1 Mi blocks / 256 descriptors.
    /// `naa` defaults to zero; set it (and `serial` with [`LuConfig::with_naa`]) for stable ids.
    pub fn new(lun: u64, block_size: u32, num_blocks: u64, target_name: &str) -> Self {
        let max_transfer_blocks = (16 * 1024 * 1024u32).checked_div(block_size).unwrap_or(0);
        let mut config = LuConfig {
            lun,
            block_size,
            num_blocks,
            vendor: "IRONLUN".to_string(),
            product: "ironlun disk".to_string(),
            revision: "0001".to_string(),
            serial: String::new(),
            naa: [0; 16],
            target_name: target_name.to_string(),
            relative_port: 1,
            target_port_group: 0,
            thin: true,
            read_only: false,
            write_cache: true,
            max_transfer_blocks,
            max_unmap_blocks: 0x10_0000,
            max_unmap_descriptors: 256,
            relative_ports: vec![1],
            ptpl_capable: false,
            pr_persistence: crate::pr::PrPersistence::Aptpl,
            physical_block_exponent: 0,
            port_groups: crate::alua::PortGroups::new(Vec::new(), &[1]),
            replicated: false,
        };
        config.serial = serial_from_naa(&config.naa);
        config
    }

    /// Set the NAA identifier and derive the unit serial number (VPD 80h) from it.
    pub fn with_naa(mut self, naa: [u8; 16]) -> Self {
        self.naa = naa;
        self.serial = serial_from_naa(&naa);
        self
    }
}

/// Hex of the NAA identifier's vendor-specific part: stable, printable ASCII (SPC-4 §7.8.15).
fn serial_from_naa(naa: &[u8; 16]) -> String {
    naa.iter().skip(4).map(|b| format!("{b:02x}")).collect()
}

/// A finished command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    pub status: u8,
    /// Sense data (fixed or descriptor format per D_SENSE); empty unless CHECK CONDITION.
    pub sense: Bytes,
    /// Data-In, already cut to the CDB allocation length (SPC-4 §4.2.5.6); the transport
    /// cuts further to its Expected Data Transfer Length and reports residuals.
    pub data: Bytes,
}

/// One backstore operation, in bytes (the LU has already checked the range against capacity).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IoOp {
    Read {
        offset: u64,
        len: u64,
    },
    /// `fua`: durable before completion (FUA bit, or write-through cache).
    Write {
        offset: u64,
        data: Bytes,
        fua: bool,
    },
    Flush,
    WriteZeroes {
        offset: u64,
        len: u64,
        unmap: bool,
    },
    Unmap {
        ranges: Vec<(u64, u64)>,
    },
    /// Mapped/deallocated status of extents starting at `offset` (GET LBA STATUS).
    MapStatus {
        offset: u64,
        len: u64,
    },
    /// EXTENDED COPY: the daemon resolves the copy targets among the target's logical units,
    /// moves the data and answers [`IoResult::Copy`] (see [`crate::xcopy`]).
    ExtendedCopy(Box<crate::xcopy::CopyJob>),
}

/// Outcome of an [`IoOp`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IoResult {
    Done,
    Data(Bytes),
    /// `(offset, len, mapped)` runs covering the queried range from its start.
    Extents(Vec<(u64, u64, bool)>),
    /// The backstore failed: maps to MEDIUM ERROR / HARDWARE ERROR sense.
    Error(IoErrorKind),
    /// How an [`IoOp::ExtendedCopy`] ended.
    Copy(crate::xcopy::CopyOutcome),
}

/// Backstore failure kinds as the SCSI layer sees them (one `From` in the daemon).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoErrorKind {
    ReadError,
    WriteError,
    NoSpace,
    Unsupported,
    Other,
    /// Not submitted: the gateway is self-fenced (issue 18, scale-out.md §2.4): NOT READY,
    /// ASYMMETRIC ACCESS STATE TRANSITION, so the initiator retries on another path.
    Fenced,
}

/// What the LU needs to finish a command after its I/O. It names the command's entry in
/// the LU's task set: hand it back to [`LogicalUnit::resume`] or [`LogicalUnit::abandon`]
/// exactly once; a task aborted by PREEMPT AND ABORT resumes to TASK ABORTED without
/// starting another I/O.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Continuation {
    state: Pending,
    task: u64,
    /// The I/O a [`Step::Wait`] holds back until [`LogicalUnit::proceed`] starts it.
    parked: Option<Box<IoOp>>,
}

/// One task of the task set (a command between [`Step::Io`] and its final resume).
#[derive(Debug, Clone)]
struct Task {
    identity: Option<u64>,
    /// The I_T nexus (session) it came from, for ABORT TASK SET.
    nexus: NexusId,
    /// Tickets of the PREEMPT AND ABORTs and task management functions that aborted it.
    aborted: Vec<u64>,
    /// One of them came from another I_T nexus while TAS was zero: it ends without status.
    silent: bool,
    /// Byte ranges of its current I/O (in flight, or the one it waits to start while
    /// `waiting`), and whether it is a WRITE ATOMIC (see [`LogicalUnit::atomic_conflict`]).
    range: Option<caw::Ranges>,
    atomic: bool,
    /// A COMPARE AND WRITE: once started it locks its range until it ends ([`caw`]).
    caw: bool,
    /// An EXTENDED COPY chunk's I/O ([`LogicalUnit::copy_io`]).
    copy: bool,
    /// Waits to start its I/O ([`Step::Wait`]).
    waiting: bool,
    /// A SANITIZE: not aborted by task management functions (SBC-3 §4.32).
    sanitize: bool,
}

impl Task {
    /// Mark the task aborted by `ticket`; 1 when this is its first abort (for
    /// `LogicalUnit::aborted_tasks`), else 0.
    fn abort(&mut self, ticket: u64) -> usize {
        let first = usize::from(self.aborted.is_empty());
        self.aborted.push(ticket);
        first
    }
}

/// An I_T nexus identity the LU knows (SAM-5 §3.1.47): an initiator port on a target port.
#[derive(Debug, Clone)]
struct Identity {
    it: ItNexus,
    /// Sessions currently mapped to it.
    sessions: u32,
    /// [`Registration`] id covering it, refreshed on every PR state change.
    reg: Option<u64>,
}

/// Per-command state carried across an [`IoOp`].
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pending {
    /// READ: the data is the Data-In.
    Read,
    /// WRITE / WRITE AND VERIFY / UNMAP / WRITE SAME (last chunk) / SYNCHRONIZE CACHE: GOOD.
    Good,
    /// VERIFY with BYTCHK=1: compare the medium with the Data-Out.
    Compare { expected: Bytes },
    /// ORWRITE: OR the Data-Out into what was read, then write it back.
    OrWrite { offset: u64, data: Bytes, fua: bool },
    /// WRITE SAME with a non-zero pattern: `remaining` more bytes to write from `offset`.
    WriteSame {
        offset: u64,
        remaining: u64,
        block: Bytes,
        fua: bool,
    },
    /// GET LBA STATUS: build descriptors from the extents.
    LbaStatus { lba: u64, alloc_len: u32 },
    /// COMPARE AND WRITE: compare what was read with `verify`; if equal, write `write`.
    CompareAndWrite {
        offset: u64,
        verify: Bytes,
        write: Bytes,
        fua: bool,
    },
    /// EXTENDED COPY: record the outcome under `list_id` (when `retain`) for `identity`.
    ExtendedCopy {
        identity: Option<u64>,
        list_id: u8,
        retain: bool,
    },
    /// WRITE ATOMIC (16): one backstore write; GOOD.
    Atomic,
    /// SANITIZE: the next chunk of the job.
    Sanitize { job: sanitize::Job },
    /// One I/O of an EXTENDED COPY chunk ([`LogicalUnit::copy_io`]): abandoned after it.
    CopyIo,
}

impl Continuation {
    /// Whether this is a SANITIZE step: it outlives task management functions and the
    /// session that started it, and is not run inline on a connection's task.
    pub fn is_sanitize(&self) -> bool {
        matches!(self.state, Pending::Sanitize { .. })
    }
}

/// Upper bound on one Data-In / Data-Out buffer the LU asks the backstore for (bytes), so a
/// CDB cannot make the daemon allocate without bound. Above the advertised maximum transfer
/// length, which initiators may exceed (SBC-3 §6.5.3 makes rejection optional).
pub const MAX_IO_BYTES: u64 = 128 * 1024 * 1024;

/// Chunk size for WRITE SAME with a non-zero pattern.
pub const WRITE_SAME_CHUNK_BYTES: u64 = 1024 * 1024;

/// Upper bound on GET LBA STATUS descriptors returned (beyond any allocation length).
const MAX_LBA_STATUS_DESCRIPTORS: usize = 4096;

/// The result of `execute` / `resume`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Done(Completion),
    Io(IoOp, Continuation),
    /// The command's next I/O overlaps a COMPARE AND WRITE in progress, or this is a COMPARE
    /// AND WRITE that overlaps I/O in progress (SBC-3 §5.2, see `caw.rs`): it waits, in the
    /// task set, without starting. Hand it to [`LogicalUnit::proceed`] after
    /// [`LogicalUnit::take_wakeup`] returned true (or [`LogicalUnit::abandon`] it).
    Wait(Continuation),
    /// A PERSISTENT RESERVE OUT changed the reservation state (already in effect for every
    /// command that starts from now on). Before reporting `completion` the caller must
    /// (1) when `abort` is set (PREEMPT AND ABORT, SPC-4 §5.13.11.2.6), wait until
    /// [`LogicalUnit::abort_drained`] says every aborted task's I/O has finished, so that no
    /// write of a preempted nexus can land after GOOD; then (2) carry out `persist`; if that
    /// fails, report [`Completion::persist_failed`] instead of `completion`.
    PrCommit(PrCommit),
    /// A PERSISTENT RESERVE OUT on a replicated LU ([`LuConfig::replicated`]), checked as far
    /// as the LU can (unit attention, CDB, parameter list length, nexus identity): the daemon
    /// decides it through the cluster and reports the answer; the state change comes back
    /// through [`LogicalUnit::install_pr`] on every gateway.
    Replicate(Replicate),
}

/// See [`Step::Replicate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replicate {
    /// The requesting I_T nexus.
    pub it: ItNexus,
    /// SERVICE ACTION, SCOPE and TYPE from the CDB.
    pub service_action: u8,
    pub scope: u8,
    pub ty: u8,
    /// The parameter list, exactly PARAMETER LIST LENGTH bytes.
    pub param: Bytes,
}

/// See [`Step::PrCommit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrCommit {
    pub abort: Option<AbortTicket>,
    pub persist: Option<crate::pr::Persist>,
    pub completion: Completion,
    /// The PR OUT that made it, for the daemon's event log (`None` for ownership changes,
    /// which the daemon records itself).
    pub origin: Option<PrOrigin>,
}

/// Which PERSISTENT RESERVE OUT changed the state, and from which initiator port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrOrigin {
    /// The service action's name (SPC-4 §6.16.2), e.g. `PREEMPT AND ABORT`.
    pub action: &'static str,
    /// The initiator port, `NAME,i,0xISID`.
    pub initiator: String,
}

/// Identifies one PREEMPT AND ABORT's set of aborted tasks (see [`LogicalUnit::abort_drained`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AbortTicket(pub(crate) u64);

/// What a task management function did, so the transport can drop affected tasks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TmfEffect {
    /// Nothing to abort beyond the named task (ABORT TASK).
    None,
    /// Abort every task of this nexus on this LU (ABORT TASK SET).
    AbortNexusTasks,
    /// Abort every task of every nexus on this LU (CLEAR TASK SET, LUN RESET).
    AbortAllTasks,
}

/// One logical unit's state: mode pages, unit attentions per I_T nexus identity, reservations,
/// the task set of commands with I/O outstanding, medium state.
pub struct LogicalUnit {
    config: LuConfig,
    mode: ModePages,
    /// Keyed by identity id (see [`Identity`]).
    ua: UnitAttentions,
    /// PREVENT ALLOW MEDIUM REMOVAL state per nexus (recorded; the medium is not removable).
    prevent: HashMap<NexusId, u8>,
    pr: PrState,
    /// Identity id holding an SPC-2 RESERVE(6/10) reservation.
    spc2: Option<u64>,
    identities: HashMap<u64, Identity>,
    by_it: HashMap<ItNexus, u64>,
    sessions: HashMap<NexusId, u64>,
    next_identity: u64,
    tasks: HashMap<u64, Task>,
    /// How many of `tasks` are WRITE ATOMICs: while none is, ordinary I/O skips the overlap
    /// scan of [`Self::atomic_conflict`].
    atomic_tasks: usize,
    /// How many of `tasks` are COMPARE AND WRITEs: while none is, ordinary I/O skips the
    /// range lock's overlap scan ([`caw`]).
    caw_tasks: usize,
    /// Tasks in the task set that were aborted (their I/O may still be in flight).
    aborted_tasks: usize,
    /// How many of `tasks` wait to start their I/O ([`Step::Wait`]).
    waiting_tasks: usize,
    /// A task ended or was aborted while others waited ([`LogicalUnit::take_wakeup`]).
    wakeup: bool,
    next_task: u64,
    next_ticket: u64,
    /// Recent EXTENDED COPY operations for RECEIVE COPY RESULTS ([`crate::xcopy`]).
    copies: crate::xcopy::CopyTable,
    /// Counts LUN RESETs and CLEAR TASK SETs: a copy touching this LU stops when it changes.
    abort_epoch: u64,
    /// When the last LUN RESET, target reset or CLEAR TASK SET arrived (see
    /// [`LogicalUnit::set_aborted_at`]).
    aborted_at: Option<std::time::Instant>,
    /// How the commands that function cleared end when they try to start late.
    late_abort: LateAbort,
    /// A sanitize operation in progress: its progress indication (SBC-3 §4.32).
    sanitizing: Option<u16>,
    /// Taken offline by the administrator ([`LogicalUnit::set_offline`]).
    offline: bool,
    /// The last sanitize failed (SBC-3 §4.32: sanitize failure mode); its AUSE bit.
    sanitize_failed: Option<bool>,
}

impl Completion {
    /// GOOD with Data-In `data`.
    pub fn good(data: Bytes) -> Self {
        Completion {
            status: status::GOOD,
            sense: Bytes::new(),
            data,
        }
    }

    /// The completion of a PR OUT whose APTPL state could not be written durably: HARDWARE
    /// ERROR, INTERNAL TARGET FAILURE (the in-memory state has changed; the initiator must not
    /// assume it survives power loss).
    pub fn persist_failed(descriptor: bool) -> Self {
        Self::check_condition(SenseReason::InternalTargetFailure, descriptor)
    }

    /// RESERVATION CONFLICT (18h): no sense data (SAM-5 §5.3.1).
    pub fn reservation_conflict() -> Self {
        Completion {
            status: status::RESERVATION_CONFLICT,
            sense: Bytes::new(),
            data: Bytes::new(),
        }
    }

    /// BUSY (08h): the command could not start now (a WRITE ATOMIC overlap); no sense data
    /// (SAM-5 §5.3.1).
    pub fn busy() -> Self {
        Completion {
            status: status::BUSY,
            sense: Bytes::new(),
            data: Bytes::new(),
        }
    }

    /// TASK ABORTED (40h): a task aborted by another I_T nexus with TAS=1 (SAM-5 §5.3.1).
    pub fn task_aborted() -> Self {
        Completion {
            status: status::TASK_ABORTED,
            sense: Bytes::new(),
            data: Bytes::new(),
        }
    }

    /// No status at all ([`status::NO_STATUS`]): a task aborted by another I_T nexus with
    /// TAS=0 (SAM-5 §5.6). The transport sends nothing and forgets the task.
    pub fn no_status() -> Self {
        Completion {
            status: status::NO_STATUS,
            sense: Bytes::new(),
            data: Bytes::new(),
        }
    }

    /// Whether this is [`Completion::no_status`].
    pub fn has_status(&self) -> bool {
        self.status != status::NO_STATUS
    }

    /// CHECK CONDITION with `reason` in fixed (`descriptor == false`) or descriptor format.
    pub fn check_condition(reason: SenseReason, descriptor: bool) -> Self {
        Completion {
            status: status::CHECK_CONDITION,
            sense: reason.to_bytes(descriptor),
            data: Bytes::new(),
        }
    }
}

/// Data-In cut to the allocation length (SPC-4 §4.2.5.6).
fn cut(mut data: Vec<u8>, alloc_len: u32) -> Bytes {
    data.truncate(usize::try_from(alloc_len).unwrap_or(usize::MAX));
    Bytes::from(data)
}

impl LogicalUnit {
    pub fn new(config: LuConfig) -> Self {
        let mode = ModePages::new(config.write_cache);
        LogicalUnit {
            config,
            mode,
            ua: UnitAttentions::new(),
            prevent: HashMap::new(),
            pr: PrState::new(),
            spc2: None,
            identities: HashMap::new(),
            by_it: HashMap::new(),
            sessions: HashMap::new(),
            next_identity: 0,
            tasks: HashMap::new(),
            atomic_tasks: 0,
            caw_tasks: 0,
            aborted_tasks: 0,
            waiting_tasks: 0,
            wakeup: false,
            next_task: 0,
            next_ticket: 0,
            copies: crate::xcopy::CopyTable::default(),
            abort_epoch: 0,
            aborted_at: None,
            late_abort: LateAbort::default(),
            sanitizing: None,
            sanitize_failed: None,
            offline: false,
        }
    }

    pub fn config(&self) -> &LuConfig {
        &self.config
    }

    /// Current mode values (WCE, D_SENSE).
    pub fn mode_values(&self) -> crate::mode::ModeValues {
        self.mode.current
    }

    /// The oldest unit attention pending for `nexus`, if any (not cleared).
    pub fn pending_unit_attention(&self, nexus: NexusId) -> Option<SenseReason> {
        self.ua.peek(*self.sessions.get(&nexus)?)
    }

    /// How many Data-Out bytes `cdb` asks the initiator to send (the SPDTL of RFC 7143
    /// §11.4.5.1), for write residuals; `None` when the CDB cannot be parsed.
    pub fn data_out_len(&self, cdb: &[u8]) -> Option<u64> {
        use crate::cdb::Command as C;
        let bs = self.block_size();
        let blocks = |e: crate::cdb::Extent| u64::from(e.blocks).checked_mul(bs);
        match crate::cdb::parse(cdb).ok()? {
            C::Write { ext, .. } | C::OrWrite { ext, .. } => blocks(ext),
            C::WriteAndVerify { ext, .. } | C::WriteAtomic { ext, .. } => blocks(ext),
            C::CompareAndWrite { ext, .. } => blocks(ext)?.checked_mul(2),
            C::Verify { ext, bytchk } => match bytchk {
                0 => Some(0),
                // BYTCHK 11b: one block compared against every block of the range (SBC-3 §5.30).
                3 => Some(bs),
                _ => blocks(ext),
            },
            C::WriteSame { ndob, .. } => Some(if ndob { 0 } else { bs }),
            C::ModeSelect { param_len, .. }
            | C::Sanitize { param_len, .. }
            | C::Unmap { param_len }
            | C::PersistentReserveOut { param_len, .. } => Some(u64::from(param_len)),
            C::ExtendedCopy { param_len } => Some(u64::from(param_len)),
            _ => Some(0),
        }
    }

    /// Whether sense data is currently reported in descriptor format (control page D_SENSE).
    pub fn d_sense(&self) -> bool {
        self.mode.current.d_sense
    }

    /// A new session's I_T nexus `it`, known from now on as `nexus`. A first-seen identity
    /// receives POWER ON, RESET, OR BUS DEVICE RESET OCCURRED (29h/00h); one that returns
    /// after an I_T nexus loss receives I_T NEXUS LOSS OCCURRED (29h/07h) followed by any
    /// reservation unit attentions queued for it meanwhile. The identity is looked up here
    /// once; every later command maps `nexus` to a small id.
    pub fn add_nexus(&mut self, nexus: NexusId, it: ItNexus) {
        if self.sessions.contains_key(&nexus) {
            self.remove_nexus(nexus);
        }
        let id = match self.by_it.get(&it).copied() {
            Some(id) => {
                if let Some(x) = self.identities.get_mut(&id) {
                    x.sessions = x.sessions.saturating_add(1);
                }
                self.ua.returned(id);
                id
            }
            None => {
                let id = self.new_identity(it, 1);
                self.ua.add_nexus(id, SenseReason::PowerOnOrReset);
                id
            }
        };
        self.sessions.insert(nexus, id);
        self.prune();
    }

    fn new_identity(&mut self, it: ItNexus, sessions: u32) -> u64 {
        let id = self.next_identity;
        self.next_identity = self.next_identity.wrapping_add(1);
        let reg = self.pr.registration_id(&it);
        self.by_it.insert(it.clone(), id);
        self.identities.insert(id, Identity { it, sessions, reg });
        id
    }

    /// Forget idle identities beyond [`MAX_IDENTITIES`] (see there).
    fn prune(&mut self) {
        if self.identities.len() <= MAX_IDENTITIES {
            return;
        }
        let hard = self.identities.len() > MAX_IDENTITIES.saturating_mul(2);
        let idle: Vec<u64> = self
            .identities
            .iter()
            .filter(|(id, x)| {
                x.sessions == 0 && x.reg.is_none() && (hard || self.ua.is_empty(**id))
            })
            .map(|(id, _)| *id)
            .collect();
        for id in idle {
            if let Some(x) = self.identities.remove(&id) {
                self.by_it.remove(&x.it);
            }
            self.ua.remove_nexus(id);
        }
    }

    /// The LU's reservation state, for `ironlun ctl reservations`.
    pub fn pr_snapshot(&self) -> crate::pr::PrSnapshot {
        let mut snap = self.pr.snapshot();
        snap.handover = self.pr.handover.clone();
        snap.spc2_holder = self
            .spc2
            .and_then(|id| self.identities.get(&id))
            .map(|x| x.it.initiator.to_string());
        snap
    }

    /// Load APTPL state written earlier from a [`crate::pr::Persist::Write`] (at start, before
    /// any nexus is added). A file of another LU or a corrupt one is refused, never dropped;
    /// on error the state is unchanged.
    ///
    /// A file written without APTPL under [`PrPersistence::Always`](crate::pr::PrPersistence)
    /// restored while the LU persists only with APTPL keeps what SPC-4 keeps (the ownership
    /// image, see [`crate::pr::ownership`]): `Ok(true)` then says the file holds more than was
    /// restored and should be rewritten from [`LogicalUnit::pr_state_file`], so that a later
    /// switch back to `Always` does not resurrect it.
    pub fn restore_pr(&mut self, bytes: &[u8]) -> Result<bool, crate::pr::PersistError> {
        let state = crate::pr::persist::decode(bytes, &self.config.serial)?;
        let keep_all =
            state.aptpl() || self.config.pr_persistence == crate::pr::PrPersistence::Always;
        let (state, trimmed) = if keep_all {
            (state, false)
        } else {
            let owned = state.owned_image();
            let trimmed = owned != state;
            (owned, trimmed)
        };
        self.pr = state;
        self.refresh_registrations();
        Ok(trimmed)
    }

    /// The PR state survives a restart now (REPORT CAPABILITIES PTPL_A, SPC-4 §6.15.4): the
    /// daemon can persist it, and APTPL is one or the LU persists always.
    pub fn ptpl_active(&self) -> bool {
        self.config.ptpl_capable
            && (self.pr.aptpl() || self.config.pr_persistence == crate::pr::PrPersistence::Always)
    }

    /// What the LU's state file must hold for the current state: all of it while
    /// [`LogicalUnit::ptpl_active`], else the ownership image or nothing (removed); `None`
    /// when the LU cannot persist.
    pub fn pr_state_file(&self) -> Option<Persist> {
        if !self.config.ptpl_capable {
            None
        } else if self.ptpl_active() {
            Some(Persist::Write(crate::pr::persist::encode(
                &self.pr,
                &self.config.serial,
            )))
        } else {
            Some(self.image_without_aptpl())
        }
    }

    /// Change when the PR state is persisted (the daemon's `persist_reservations`, live). When
    /// that changes whether the state survives a restart, the state file to write now: all of
    /// the state when it starts to, the ownership image (or a removal) when it stops.
    pub fn set_pr_persistence(&mut self, p: crate::pr::PrPersistence) -> Option<Persist> {
        let before = self.ptpl_active();
        self.config.pr_persistence = p;
        if before == self.ptpl_active() {
            None
        } else {
            self.pr_state_file()
        }
    }

    /// The reservation state now.
    pub fn pr_state(&self) -> &crate::pr::PrState {
        &self.pr
    }

    /// Replicated PR (issue 18): the cluster's state after a committed record replaces the
    /// local one; every command that starts from now on is checked against it.
    pub fn install_pr(&mut self, state: crate::pr::PrState) {
        self.pr = state;
        self.refresh_registrations();
    }

    /// Replicated PR: queue `reason` for the local I_T nexuses of `reg` except `except` (the
    /// nexus that sent the PR OUT), as a local PR OUT's [`crate::pr::Effects::ua`] are.
    pub fn raise_replicated(
        &mut self,
        reg: &Registration,
        reason: SenseReason,
        except: Option<&ItNexus>,
    ) {
        let except = except
            .and_then(|it| self.by_it.get(it).copied())
            .unwrap_or(NO_IDENTITY);
        self.notify(reg, reason, except);
    }

    /// Replicated PR: abort the tasks of `regs`' local nexuses for a PREEMPT AND ABORT sent by
    /// `from` (here or through another gateway). Its ticket says when they have drained
    /// ([`LogicalUnit::abort_drained`]). With TAS=0 the tasks of nexuses other than `from`
    /// end without status and those nexuses get COMMANDS CLEARED BY ANOTHER INITIATOR.
    pub fn abort_replicated(
        &mut self,
        regs: &[Registration],
        from: Option<&ItNexus>,
    ) -> AbortTicket {
        // A session of the requesting nexus here, or none (`NexusId::MAX` matches no task).
        let from_nexus = from
            .and_then(|it| self.by_it.get(it).copied())
            .and_then(|id| {
                self.sessions
                    .iter()
                    .find(|(_, x)| **x == id)
                    .map(|(n, _)| *n)
            })
            .unwrap_or(NexusId::MAX);
        let (ticket, silenced) = self.abort_tasks(regs, Some(from_nexus));
        for other in silenced {
            self.ua
                .raise(other, SenseReason::CommandsClearedByAnotherInitiator);
        }
        ticket
    }

    /// Whether every task aborted under `ticket` has finished (resumed for the last time or
    /// been abandoned). Tasks of a preempted nexus never start another I/O once aborted.
    pub fn abort_drained(&self, ticket: AbortTicket) -> bool {
        !self.tasks.values().any(|t| t.aborted.contains(&ticket.0))
    }

    /// A task that got [`Step::Io`] is dropped without being resumed (its I/O did not run or
    /// has finished): forget it, so PREEMPT AND ABORT does not wait for it.
    pub fn abandon(&mut self, cont: Continuation) {
        self.end_task(cont.task);
        self.copy_failed(&cont.state);
    }

    /// An EXTENDED COPY ends without an outcome (abandoned or aborted): its status is failed.
    fn copy_failed(&mut self, state: &Pending) {
        if let Pending::ExtendedCopy {
            identity: Some(id),
            list_id,
            retain: true,
        } = *state
        {
            self.copies.finish(id, list_id, false, 0, 0);
        }
    }

    /// A session ended (I_T nexus loss for its identity once its last session goes): an
    /// SPC-2 reservation of that identity is released (SPC-2 §5.5.1); persistent
    /// reservations and registrations stay (SPC-4 §5.13.1). Its tasks stay in the task set
    /// until resumed or abandoned.
    pub fn remove_nexus(&mut self, nexus: NexusId) {
        self.prevent.remove(&nexus);
        let Some(id) = self.sessions.remove(&nexus) else {
            return;
        };
        let last = match self.identities.get_mut(&id) {
            Some(x) => {
                x.sessions = x.sessions.saturating_sub(1);
                x.sessions == 0
            }
            None => false,
        };
        if last && self.spc2 == Some(id) {
            self.spc2 = None;
        }
        if last {
            // Copy status is kept per I_T nexus (SPC-4 §6.18.3); it ends with the nexus.
            self.copies.forget(id);
        }
        self.prune();
    }

    fn refresh_registrations(&mut self) {
        for x in self.identities.values_mut() {
            x.reg = self.pr.registration_id(&x.it);
        }
    }

    /// The reservation check at command start (SPC-4 §5.13.1; semantics §1.6, §1.8).
    /// Without any reservation it is two branches.
    fn conflicts(&self, ident: Option<u64>, raw: &[u8]) -> bool {
        if let Some(holder) = self.spc2 {
            return !access::spc2_allowed(raw, ident == Some(holder));
        }
        let Some(res) = self.pr.reservation() else {
            return false;
        };
        let reg = ident
            .and_then(|id| self.identities.get(&id))
            .and_then(|x| x.reg);
        let standing = access::Standing {
            reservation: Some(res.ty),
            registered: reg.is_some(),
            holder: reg.is_some_and(|r| self.pr.is_holder(r)),
        };
        !access::allowed(access::classify(raw), standing)
    }

    /// Under registrations (CRH=1, SPC-4 §5.13.3): RESERVE/RELEASE(6/10) do nothing and
    /// complete with GOOD from a holder, or from a registrant under a registrants-only /
    /// all-registrants reservation; otherwise they conflict.
    fn crh_no_op(&self, ident: Option<u64>) -> bool {
        let reg = ident
            .and_then(|id| self.identities.get(&id))
            .and_then(|x| x.reg);
        match (reg, self.pr.reservation()) {
            (Some(r), Some(res)) => self.pr.is_holder(r) || res.ty.registrants_have_access(),
            _ => false,
        }
    }

    /// RESERVE(6/10) (SPC-2 §7.21): the requesting I_T nexus holds the logical unit.
    fn spc2_reserve(&mut self, ident: Option<u64>) -> Step {
        if let Some(holder) = self.spc2 {
            return if ident == Some(holder) {
                Step::Done(Completion::good(Bytes::new()))
            } else {
                Step::Done(Completion::reservation_conflict())
            };
        }
        if !self.pr.registrations().is_empty() {
            return if self.crh_no_op(ident) {
                Step::Done(Completion::good(Bytes::new()))
            } else {
                Step::Done(Completion::reservation_conflict())
            };
        }
        match ident {
            Some(id) => {
                self.spc2 = Some(id);
                Step::Done(Completion::good(Bytes::new()))
            }
            None => Step::Done(Completion::reservation_conflict()),
        }
    }

    /// RELEASE(6/10) (SPC-2 §7.24): the holder releases; anyone else gets GOOD, no effect.
    fn spc2_release(&mut self, ident: Option<u64>) -> Step {
        if let Some(holder) = self.spc2 {
            if ident == Some(holder) {
                self.spc2 = None;
            }
            return Step::Done(Completion::good(Bytes::new()));
        }
        if !self.pr.registrations().is_empty() && !self.crh_no_op(ident) {
            return Step::Done(Completion::reservation_conflict());
        }
        Step::Done(Completion::good(Bytes::new()))
    }

    /// PERSISTENT RESERVE OUT (SPC-4 §6.16): run the decision tables, then deliver unit
    /// attentions, mark aborted tasks and build the APTPL write.
    #[allow(clippy::too_many_arguments)]
    fn prout(
        &mut self,
        nexus: NexusId,
        ident: Option<u64>,
        service_action: u8,
        scope: u8,
        ty: u8,
        param_len: u32,
        data_out: &Bytes,
    ) -> Result<Step, SenseReason> {
        if param_len > crate::pr::MAX_PROUT_PARAM_LEN {
            return Err(SenseReason::InvalidFieldInCdb(FieldPointer::byte(5)));
        }
        let n = usize::try_from(param_len).map_err(|_| SenseReason::ParameterListLengthError)?;
        let param = data_out
            .get(..n)
            .ok_or(SenseReason::ParameterListLengthError)?;
        let Some((id, it)) = ident.and_then(|id| Some((id, self.identities.get(&id)?.it.clone())))
        else {
            // A session the daemon never announced has no I_T nexus identity.
            return Ok(Step::Done(Completion::reservation_conflict()));
        };
        if self.config.replicated {
            return Ok(Step::Replicate(Replicate {
                it,
                service_action,
                scope,
                ty,
                param: data_out.slice(..n),
            }));
        }
        let kept_before = self.ptpl_active();
        let aptpl_before = self.pr.aptpl();
        let req = crate::pr::OutRequest {
            service_action,
            scope,
            ty,
            param,
        };
        let ctx = crate::pr::PrContext {
            relative_ports: &self.config.relative_ports,
            ptpl_capable: self.config.ptpl_capable,
        };
        let fx = match self.pr.prout(&it, req, ctx) {
            Ok(fx) => fx,
            Err(PrError::Conflict) => return Ok(Step::Done(Completion::reservation_conflict())),
            Err(PrError::Sense(reason)) => return Err(reason),
        };
        self.refresh_registrations();
        for (reg, reason) in &fx.ua {
            self.notify(reg, *reason, id);
        }
        let abort = if fx.aborted.is_empty() {
            None
        } else {
            let (ticket, silenced) = self.abort_tasks(&fx.aborted, Some(nexus));
            // SPC-4 §5.13.11.2.6, SAM-5 §5.6: with TAS=0 the preempted nexuses learn of
            // their commands' end from a unit attention.
            for other in silenced {
                self.ua
                    .raise(other, SenseReason::CommandsClearedByAnotherInitiator);
            }
            Some(ticket)
        };
        // The file records APTPL too: under `Always` a change of APTPL alone is written, so
        // that the file says what survives if the LU goes back to APTPL-only persistence.
        let kept = self.ptpl_active();
        let persist = if kept && (fx.changed || !kept_before || aptpl_before != self.pr.aptpl()) {
            Some(Persist::Write(crate::pr::persist::encode(
                &self.pr,
                &self.config.serial,
            )))
        } else if kept_before && !kept {
            Some(self.image_without_aptpl())
        } else {
            None
        };
        let completion = Completion::good(Bytes::new());
        if !fx.changed && abort.is_none() && persist.is_none() {
            return Ok(Step::Done(completion));
        }
        Ok(Step::PrCommit(PrCommit {
            abort,
            persist,
            completion,
            origin: Some(PrOrigin {
                action: crate::pr::out_action_name(service_action),
                initiator: it.initiator.to_string(),
            }),
        }))
    }

    /// Queue `reason` for every I_T nexus `reg` covers except the identity `except`: the
    /// known identities, and, for a registration of one initiator port, that port's
    /// identities on its target port(s) even when it is not logged in (created here, so the
    /// condition waits for its return).
    fn notify(&mut self, reg: &Registration, reason: SenseReason, except: u64) {
        if let Some(isid) = reg.isid {
            let ports: Vec<u16> = match reg.rtpi {
                Some(p) => vec![p],
                None => self.config.relative_ports.clone(),
            };
            for rtpi in ports {
                let it = ItNexus {
                    initiator: crate::pr::InitiatorPort::new(&reg.name, isid),
                    rtpi,
                };
                if !self.by_it.contains_key(&it) {
                    let id = self.new_identity(it, 0);
                    self.ua.ensure(id);
                }
            }
        }
        let ids: Vec<u64> = self
            .identities
            .iter()
            .filter(|(id, x)| **id != except && reg.matches(&x.it))
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.ua.ensure(id);
            self.ua.raise(id, reason);
        }
        self.prune();
    }

    /// Mark every task of every I_T nexus covered by `regs` aborted under a new ticket, on
    /// behalf of session `from` (see [`LogicalUnit::silences`]; `None`: the target itself,
    /// whose aborts always end TASK ABORTED). Also returns the identities whose tasks will
    /// end without status.
    fn abort_tasks(
        &mut self,
        regs: &[Registration],
        from: Option<NexusId>,
    ) -> (AbortTicket, Vec<u64>) {
        let ticket = self.next_ticket;
        self.next_ticket = self.next_ticket.wrapping_add(1);
        let tas = self.mode.current.tas;
        let mut silenced = Vec::new();
        let mut newly = 0;
        for task in self.tasks.values_mut() {
            let hit = task
                .identity
                .and_then(|id| self.identities.get(&id))
                .is_some_and(|x| regs.iter().any(|r| r.matches(&x.it)));
            if hit {
                newly += task.abort(ticket);
                if Self::silences(tas, from, task) {
                    task.silent = true;
                    silenced.extend(task.identity);
                }
            }
        }
        self.aborted_tasks += newly;
        self.wake_waiters();
        silenced.sort_unstable();
        silenced.dedup();
        (AbortTicket(ticket), silenced)
    }

    /// Whether aborting `task` on behalf of session `from` ends it without status: TAS=0 and
    /// another I_T nexus's task (SAM-5 §5.6, SPC-4 §7.5.8). The issuing session's own tasks
    /// keep their status: the transport has dropped them already when a task management
    /// function aborted them, and answers them after a PREEMPT AND ABORT of its own key.
    fn silences(tas: bool, from: Option<NexusId>, task: &Task) -> bool {
        !tas && from.is_some_and(|f| f != task.nexus)
    }

    /// Start a command. Data-In in the completion is cut to the CDB's allocation length.
    /// Order (SAM-5 §5.14, SPC-4 §5.13.1): unit attention, reservation check, CDB.
    pub fn execute(&mut self, nexus: NexusId, cdb: &[u8], data_out: Bytes) -> Step {
        let ident = self.sessions.get(&nexus).copied();
        let opcode = cdb.first().copied().unwrap_or(0);
        // SPC-4 §5.14 / SAM-5 §5.14: INQUIRY, REPORT LUNS and REQUEST SENSE do not report
        // (or clear) a pending unit attention; every other command reports one and ends.
        let bypass = matches!(
            opcode,
            cdb::op::INQUIRY | cdb::op::REPORT_LUNS | cdb::op::REQUEST_SENSE
        );
        if let Some(reason) = self.sanitize_gate(opcode, bypass) {
            return self.fail(reason);
        }
        if let (false, Some(id)) = (bypass, ident) {
            if let Some(ua) = self.ua.take(id) {
                return self.fail(ua);
            }
        }
        // An offline LU answers only the commands that report its state (SPC-4 §4.5.6:
        // LOGICAL UNIT NOT READY, OFFLINE), after any unit attention, as ALUA states below.
        if self.offline && !bypass {
            return self.fail(SenseReason::LogicalUnitOffline);
        }
        // SPC-4 §5.16.2.4: the access state of the port the command came through.
        if let Err(reason) = self
            .config
            .port_groups
            .state_of(self.rtpi(ident))
            .check(cdb)
        {
            return self.fail(reason);
        }
        if self.conflicts(ident, cdb) || self.ownership_conflicts(ident, cdb) {
            return Step::Done(Completion::reservation_conflict());
        }
        let step = match self.dispatch(nexus, ident, cdb, data_out) {
            Ok(step) => step,
            Err(reason) => self.fail(reason),
        };
        match step {
            Step::Io(op, mut cont) => {
                let range = caw::Ranges::of(&op);
                let atomic = cont.state == Pending::Atomic;
                if self.atomic_conflict(range.as_ref(), atomic) {
                    return Step::Done(Completion::busy());
                }
                let task = Task {
                    identity: ident,
                    nexus,
                    aborted: Vec::new(),
                    silent: false,
                    range: None,
                    atomic,
                    caw: matches!(cont.state, Pending::CompareAndWrite { .. }),
                    copy: false,
                    waiting: false,
                    sanitize: cont.is_sanitize(),
                };
                cont.task = self.insert_task(task);
                self.admit(op, cont, true)
            }
            other => other,
        }
    }

    /// Enter `task` in the task set (keeping the counts in step); its id.
    fn insert_task(&mut self, task: Task) -> u64 {
        let id = self.next_task;
        self.next_task = self.next_task.wrapping_add(1);
        self.atomic_tasks += usize::from(task.atomic);
        self.caw_tasks += usize::from(task.caw);
        self.tasks.insert(id, task);
        id
    }

    /// Forget a finished task (keeping the counts in step); tasks waiting for it may start.
    fn end_task(&mut self, task: u64) {
        if let Some(t) = self.tasks.remove(&task) {
            self.atomic_tasks = self.atomic_tasks.saturating_sub(usize::from(t.atomic));
            self.caw_tasks = self.caw_tasks.saturating_sub(usize::from(t.caw));
            self.aborted_tasks = self
                .aborted_tasks
                .saturating_sub(usize::from(!t.aborted.is_empty()));
            self.waiting_tasks = self.waiting_tasks.saturating_sub(usize::from(t.waiting));
            self.wake_waiters();
        }
    }

    /// Tell the caller to wake the waiting tasks ([`LogicalUnit::take_wakeup`]), if any.
    fn wake_waiters(&mut self) {
        self.wakeup |= self.waiting_tasks > 0;
    }

    /// WRITE ATOMIC (SBC-4 §4.29) against concurrency: a WRITE ATOMIC never runs while
    /// another task's I/O overlaps its range, and no I/O starts over a WRITE ATOMIC in
    /// flight; the command that would overlap ends in BUSY (SAM-5 §5.3.1), to be retried.
    /// So no read sees part of an atomic write and no write interleaves with one.
    /// Tasks waiting to start count as in flight: a WRITE ATOMIC never starts under them.
    fn atomic_conflict(&self, range: Option<&caw::Ranges>, atomic: bool) -> bool {
        let Some(range) = range else {
            return false;
        };
        if !atomic && self.atomic_tasks == 0 {
            return false;
        }
        self.tasks
            .values()
            .any(|t| (atomic || t.atomic) && t.range.as_ref().is_some_and(|r| r.overlaps(range)))
    }

    /// SBC-3 §4.32: while a sanitize runs, every command but INQUIRY, REPORT LUNS and
    /// REQUEST SENSE ends in NOT READY, SANITIZE IN PROGRESS (checked before unit
    /// attentions, which wait until it ends); after a failed sanitize, every command but
    /// those and SANITIZE ends in MEDIUM ERROR, SANITIZE COMMAND FAILED.
    fn sanitize_gate(&self, opcode: u8, bypass: bool) -> Option<SenseReason> {
        if bypass {
            return None;
        }
        if let Some(progress) = self.sanitizing {
            return Some(SenseReason::SanitizeInProgress { progress });
        }
        if self.sanitize_failed.is_some() && opcode != cdb::op::SANITIZE {
            return Some(SenseReason::SanitizeFailed);
        }
        None
    }

    /// End an aborted task without further I/O: TASK ABORTED, or no status when another I_T
    /// nexus aborted it while TAS was zero (SAM-5 §5.6, SPC-4 §7.5.8).
    fn end_aborted(&mut self, task: u64, state: &Pending) -> Step {
        let silent = self.tasks.get(&task).is_some_and(|t| t.silent);
        self.end_task(task);
        self.copy_failed(state);
        Step::Done(if silent {
            Completion::no_status()
        } else {
            Completion::task_aborted()
        })
    }

    /// Continue a command after its [`IoOp`].
    pub fn resume(&mut self, nexus: NexusId, cont: Continuation, result: IoResult) -> Step {
        let _ = nexus;
        let task = cont.task;
        // A sanitize is not aborted (SBC-3 §4.32); a PREEMPT AND ABORT waits for its end.
        let aborted = self.tasks.get(&task).is_some_and(|t| !t.aborted.is_empty());
        if aborted && !cont.is_sanitize() {
            // Aborted by PREEMPT AND ABORT (SPC-4 §5.13.11.2.6) or a task management function
            // (SAM-5 §7): no further I/O.
            return self.end_aborted(task, &cont.state);
        }
        let step = match self.finish(cont.state, result) {
            Ok(step) => step,
            Err(reason) => self.fail(reason),
        };
        match step {
            Step::Io(op, mut next) => {
                next.task = task;
                // A COMPARE AND WRITE holds its range from its read on: its write never waits.
                let check = !self.tasks.get(&task).is_some_and(|t| t.caw);
                self.admit(op, next, check)
            }
            other => {
                self.end_task(task);
                other
            }
        }
    }

    /// LUN RESET / TARGET WARM/COLD RESET from session `from`: every task of every nexus
    /// aborted (SAM-5 §6.3; those of other nexuses end TASK ABORTED with TAS=1, without status
    /// with TAS=0, as the control page said when the reset arrived), unit attention 29h/xx to
    /// every nexus, mode pages back to their defaults (no saved pages), PREVENT state cleared
    /// (SAM-5 §6.3, SPC-4 §6.15). The caller sends the function's response only once
    /// [`LogicalUnit::abort_drained`] holds for the returned ticket, so no aborted write lands
    /// after it.
    #[must_use = "the TMF response waits until the ticket's tasks have drained"]
    pub fn reset(&mut self, from: NexusId, kind: ResetKind) -> Option<AbortTicket> {
        let reason = match kind {
            ResetKind::LogicalUnit => SenseReason::BusDeviceResetOccurred,
            ResetKind::TargetWarm => SenseReason::BusResetOccurred,
            ResetKind::TargetCold => SenseReason::PowerOnOccurred,
        };
        // Aborted under the TAS in effect before the reset restores the default.
        self.late_abort = LateAbort {
            from,
            silent: !self.mode.current.tas,
            ua: None,
        };
        let (ticket, _) = self.abort_tasks_matching(Some(from), |_| true);
        // SAM-5 §6.3.3 / §6.3.4: the unit attention goes to every I_T nexus, the one that
        // requested the reset included (libiscsi MultipathIO.Reset checks each path); under
        // TAS=0 it is also how other nexuses learn that their commands ended.
        self.ua.raise_others(None, reason);
        self.mode.reset();
        self.prevent.clear();
        // SPC-2 reservations end with every reset; persistent ones survive (SPC-4 §5.13.1).
        self.spc2 = None;
        self.abort_epoch = self.abort_epoch.wrapping_add(1);
        ticket
    }

    /// CLEAR TASK SET from session `from` (SAM-5 §7.4): every task of every nexus aborted,
    /// copies in progress on this LU stopped (see [`LogicalUnit::abort_epoch`]); the response
    /// waits for the ticket as for [`LogicalUnit::reset`]. With TAS=0 the tasks of other
    /// nexuses end without status, and each of those nexuses gets COMMANDS CLEARED BY ANOTHER
    /// INITIATOR (2Fh/00h; SAM-5 §5.6, §7.4).
    #[must_use = "the TMF response waits until the ticket's tasks have drained"]
    pub fn clear_task_set(&mut self, from: NexusId) -> Option<AbortTicket> {
        self.abort_epoch = self.abort_epoch.wrapping_add(1);
        let silent = !self.mode.current.tas;
        self.late_abort = LateAbort {
            from,
            silent,
            ua: silent.then_some(SenseReason::CommandsClearedByAnotherInitiator),
        };
        let (ticket, silenced) = self.abort_tasks_matching(Some(from), |_| true);
        for id in silenced {
            self.ua
                .raise(id, SenseReason::CommandsClearedByAnotherInitiator);
        }
        ticket
    }

    /// How a command of session `nexus` ends that arrived before the last LUN RESET, target
    /// reset or CLEAR TASK SET but starts only now ([`LogicalUnit::arrived_before_abort`]): it
    /// was in the task set that function cleared. TASK ABORTED; with TAS=0 at the time and
    /// another session's function, no status (and after CLEAR TASK SET the unit attention
    /// 2Fh/00h for its nexus, as for the tasks the function found running).
    pub fn aborted_before_start(&mut self, nexus: NexusId) -> Completion {
        let l = self.late_abort;
        if !l.silent || l.from == nexus {
            return Completion::task_aborted();
        }
        if let (Some(reason), Some(id)) = (l.ua, self.sessions.get(&nexus).copied()) {
            self.ua.raise(id, reason);
        }
        Completion::no_status()
    }

    /// Record that a LUN RESET, target reset or CLEAR TASK SET that arrived at `at` was just
    /// carried out (with [`LogicalUnit::reset`] or [`LogicalUnit::clear_task_set`], under the
    /// same lock): a command that arrived before it but starts only now was in the task set
    /// it cleared (see [`LogicalUnit::arrived_before_abort`]).
    pub fn set_aborted_at(&mut self, at: std::time::Instant) {
        if self.aborted_at.is_none_or(|t| t < at) {
            self.aborted_at = Some(at);
        }
    }

    /// Whether a command that arrived at `arrived` predates the last task-set-clearing
    /// function: it must end without starting (SAM-5 §7), as
    /// [`LogicalUnit::aborted_before_start`] says.
    pub fn arrived_before_abort(&self, arrived: std::time::Instant) -> bool {
        self.aborted_at.is_some_and(|t| arrived < t)
    }

    /// ABORT TASK SET (SAM-5 §7.3): every task of `nexus` aborted (the transport drops their
    /// responses); the response waits for the ticket as for [`LogicalUnit::reset`].
    #[must_use = "the TMF response waits until the ticket's tasks have drained"]
    pub fn abort_task_set(&mut self, nexus: NexusId) -> Option<AbortTicket> {
        self.abort_tasks_matching(Some(nexus), |t| t.nexus == nexus)
            .0
    }

    /// Abort the tasks `pick` selects under a new ticket, if there are any, on behalf of
    /// session `from` (see [`LogicalUnit::silences`]). A SANITIZE is never picked: it survives
    /// resets and task set clearing (SBC-3 §4.32), and the function's response must not wait
    /// for it. Also returns the identities whose tasks will end without status.
    fn abort_tasks_matching(
        &mut self,
        from: Option<NexusId>,
        pick: impl Fn(&Task) -> bool,
    ) -> (Option<AbortTicket>, Vec<u64>) {
        let pick = |t: &Task| !t.sanitize && pick(t);
        if !self.tasks.values().any(&pick) {
            return (None, Vec::new());
        }
        let ticket = self.next_ticket;
        self.next_ticket = self.next_ticket.wrapping_add(1);
        let tas = self.mode.current.tas;
        let mut silenced = Vec::new();
        let mut newly = 0;
        for t in self.tasks.values_mut().filter(|t| pick(t)) {
            newly += t.abort(ticket);
            if Self::silences(tas, from, t) {
                t.silent = true;
                silenced.extend(t.identity);
            }
        }
        self.aborted_tasks += newly;
        self.wake_waiters();
        silenced.sort_unstable();
        silenced.dedup();
        (Some(AbortTicket(ticket)), silenced)
    }

    /// Changes with every LUN RESET, target reset and CLEAR TASK SET: a copy that saw another
    /// value when it started ends with TASK ABORTED between chunks.
    pub fn abort_epoch(&self) -> u64 {
        self.abort_epoch
    }

    /// Whether a READ (`write == false`) or WRITE by `nexus` would meet a reservation
    /// conflict now: the EXTENDED COPY check on its source and destination logical units.
    pub fn copy_access_conflicts(&self, nexus: NexusId, write: bool) -> bool {
        let ident = self.sessions.get(&nexus).copied();
        let probe = if write {
            [cdb::op::WRITE_16; 1]
        } else {
            [cdb::op::READ_16; 1]
        };
        self.conflicts(ident, &probe) || self.ownership_conflicts(ident, &probe)
    }

    /// The effect of a task management function on this LU's task set (SAM-5 §7).
    pub fn tmf_effect(kind: ResetKind) -> TmfEffect {
        let _ = kind;
        TmfEffect::AbortAllTasks
    }

    /// Set target port group `id` to `state` (implicit ALUA, SPC-4 §5.16.2.5): on a change,
    /// ASYMMETRIC ACCESS STATE CHANGED (2Ah/06h) to every nexus. `Ok(true)` when it changed.
    pub fn set_port_group_state(
        &mut self,
        id: u16,
        state: crate::alua::AccessState,
    ) -> Result<bool, crate::alua::AluaError> {
        let changed = self.config.port_groups.set_state(id, state)?;
        if changed {
            self.ua
                .raise_others(None, SenseReason::AsymmetricAccessStateChanged);
        }
        Ok(changed)
    }

    /// The relative target port of identity `ident` (the configured port if unknown).
    fn rtpi(&self, ident: Option<u64>) -> u16 {
        ident
            .and_then(|id| self.identities.get(&id))
            .map_or(self.config.relative_port, |x| x.it.rtpi)
    }

    /// The backing size changed: CAPACITY DATA HAS CHANGED (2Ah/09h) to every nexus.
    pub fn set_num_blocks(&mut self, num_blocks: u64) {
        if num_blocks != self.config.num_blocks {
            self.config.num_blocks = num_blocks;
            self.ua.raise_others(None, SenseReason::CapacityDataChanged);
        }
    }

    /// Take the LU offline or bring it back (administrator action). Offline, every command
    /// but INQUIRY, REPORT LUNS and REQUEST SENSE ends in NOT READY, LOGICAL UNIT NOT READY,
    /// OFFLINE (04h/12h), which REQUEST SENSE also reports; commands already started finish.
    /// Back online, every nexus gets NOT READY TO READY CHANGE, MEDIUM MAY HAVE CHANGED
    /// (28h/00h; SPC-4 §4.5.6), as after a medium change. Returns whether the state changed.
    pub fn set_offline(&mut self, offline: bool) -> bool {
        if self.offline == offline {
            return false;
        }
        self.offline = offline;
        if !offline {
            self.ua
                .raise_others(None, SenseReason::NotReadyToReadyChange);
        }
        true
    }

    /// Whether the LU is offline ([`LogicalUnit::set_offline`]).
    pub fn is_offline(&self) -> bool {
        self.offline
    }

    /// The target's LUN inventory changed (a LUN added or removed): REPORTED LUNS DATA HAS
    /// CHANGED (3Fh/0Eh) to every nexus of this LU (SPC-4 §6.33).
    pub fn luns_changed(&mut self) {
        self.ua
            .raise_others(None, SenseReason::ReportedLunsDataChanged);
    }

    /// `nexus` ran REPORT LUNS (answered above the LU, by the target): it clears REPORTED LUNS
    /// DATA HAS CHANGED on every LU of the I_T nexus (SPC-4 §6.33).
    pub fn report_luns_seen(&mut self, nexus: NexusId) {
        if let Some(id) = self.sessions.get(&nexus).copied() {
            self.ua.clear(id, SenseReason::ReportedLunsDataChanged);
        }
    }

    fn fail(&self, reason: SenseReason) -> Step {
        Step::Done(Completion::check_condition(
            reason,
            self.mode.current.d_sense,
        ))
    }

    fn good(data: Bytes) -> Result<Step, SenseReason> {
        Ok(Step::Done(Completion::good(data)))
    }

    fn io(op: IoOp, state: Pending) -> Result<Step, SenseReason> {
        Ok(Step::Io(
            op,
            Continuation {
                state,
                task: 0,
                parked: None,
            },
        ))
    }

    fn block_size(&self) -> u64 {
        u64::from(self.config.block_size)
    }

    /// Check `ext` against capacity (SBC-3 §4.5: LBA + blocks ≤ capacity) and convert it to a
    /// byte range.
    fn range(&self, ext: Extent) -> Result<(u64, u64), SenseReason> {
        let end = ext
            .lba
            .checked_add(u64::from(ext.blocks))
            .ok_or(SenseReason::LbaOutOfRange)?;
        if end > self.config.num_blocks {
            return Err(SenseReason::LbaOutOfRange);
        }
        let offset = ext
            .lba
            .checked_mul(self.block_size())
            .ok_or(SenseReason::LbaOutOfRange)?;
        let len = u64::from(ext.blocks)
            .checked_mul(self.block_size())
            .ok_or(SenseReason::LbaOutOfRange)?;
        Ok((offset, len))
    }

    /// Whether the medium is write-protected: a read-only LU, or SWP set in the control mode
    /// page (SPC-4 §7.5.8; both report WP=1 in MODE SENSE).
    pub fn write_protected(&self) -> bool {
        self.config.read_only || self.mode.current.swp
    }

    fn check_writable(&self) -> Result<(), SenseReason> {
        if self.write_protected() {
            Err(SenseReason::WriteProtected)
        } else {
            Ok(())
        }
    }

    /// The Data-Out a block command uses: `len` bytes, or, when the initiator sent less
    /// (Expected Data Transfer Length below the CDB's transfer length, RFC 7143 §11.4.5),
    /// the whole blocks that arrived — libiscsi's *_residuals tests expect GOOD here. A
    /// trailing partial block is INVALID FIELD IN COMMAND INFORMATION UNIT.
    fn data_for(&self, data_out: &Bytes, len: u64) -> Result<Bytes, SenseReason> {
        let have = u64::try_from(data_out.len()).unwrap_or(u64::MAX);
        let used = if have >= len {
            len
        } else if have % self.block_size().max(1) == 0 {
            have
        } else {
            return Err(SenseReason::InvalidFieldInCommandIu);
        };
        let used = usize::try_from(used).map_err(|_| SenseReason::InvalidFieldInCommandIu)?;
        Ok(data_out.slice(..used))
    }

    fn dispatch(
        &mut self,
        nexus: NexusId,
        ident: Option<u64>,
        raw: &[u8],
        data_out: Bytes,
    ) -> Result<Step, SenseReason> {
        let cmd = cdb::parse(raw)?;
        let medium = MediumInfo {
            num_blocks: self.config.num_blocks,
            block_size: self.config.block_size,
            read_only: self.write_protected(),
        };
        match cmd {
            Command::TestUnitReady => Self::good(Bytes::new()),
            Command::RequestSense { desc, alloc_len } => {
                let reason = ident
                    .and_then(|id| self.ua.take(id))
                    .or(self
                        .sanitizing
                        .map(|progress| SenseReason::SanitizeInProgress { progress }))
                    .or(self.offline.then_some(SenseReason::LogicalUnitOffline))
                    .unwrap_or(SenseReason::NoSense);
                Self::good(cut(reason.to_bytes(desc).to_vec(), alloc_len))
            }
            Command::Inquiry {
                evpd,
                page,
                alloc_len,
            } => {
                let data = if evpd {
                    let rtpi = ident
                        .and_then(|id| self.identities.get(&id))
                        .map_or(self.config.relative_port, |x| x.it.rtpi);
                    vpd::page_at(&self.config, page, rtpi)?
                } else {
                    vpd::standard(&self.config)
                };
                Self::good(cut(data, alloc_len))
            }
            Command::ModeSense {
                ten,
                dbd,
                llbaa,
                pc,
                page,
                subpage,
                alloc_len,
            } => {
                let req = SenseRequest {
                    ten,
                    dbd,
                    llbaa,
                    pc,
                    page,
                    subpage,
                };
                Self::good(cut(self.mode.sense(req, medium)?, alloc_len))
            }
            Command::ModeSelect {
                ten,
                pf,
                sp,
                param_len,
            } => {
                let n = usize::try_from(param_len)
                    .unwrap_or(usize::MAX)
                    .min(data_out.len());
                let data = data_out
                    .get(..n)
                    .ok_or(SenseReason::ParameterListLengthError)?;
                if self
                    .mode
                    .select(ten, pf, sp, data, self.config.block_size)?
                {
                    self.ua
                        .raise_others(ident, SenseReason::ModeParametersChanged);
                }
                Self::good(Bytes::new())
            }
            Command::StartStopUnit { .. } => {
                // The medium is always present and the LU always ready (RMB=0): accept.
                Self::good(Bytes::new())
            }
            Command::PreventAllow { prevent } => {
                self.prevent.insert(nexus, prevent);
                Self::good(Bytes::new())
            }
            Command::ReadCapacity10 => {
                let last = self.config.num_blocks.saturating_sub(1);
                let last32 = u32::try_from(last).unwrap_or(u32::MAX);
                let mut d = last32.to_be_bytes().to_vec();
                d.extend_from_slice(&self.config.block_size.to_be_bytes());
                Self::good(Bytes::from(d))
            }
            Command::ReadCapacity16 { alloc_len } => {
                let mut d = vec![0u8; 32];
                vpd::put(
                    &mut d,
                    0,
                    &self.config.num_blocks.saturating_sub(1).to_be_bytes(),
                );
                vpd::put(&mut d, 8, &self.config.block_size.to_be_bytes());
                // [13] LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT; [14] LBPME, LBPRZ.
                vpd::put(&mut d, 13, &[self.config.physical_block_exponent & 0x0f]);
                if self.config.thin {
                    vpd::put(&mut d, 14, &[0xC0]);
                }
                Self::good(cut(d, alloc_len))
            }
            Command::Read { ext, fua: _ } => {
                let (offset, len) = self.range(ext)?;
                if len == 0 {
                    return Self::good(Bytes::new());
                }
                if len > MAX_IO_BYTES {
                    return Err(transfer_length_field(raw));
                }
                Self::io(IoOp::Read { offset, len }, Pending::Read)
            }
            Command::Write { ext, fua } | Command::OrWrite { ext, fua } => {
                self.check_writable()?;
                let (offset, len) = self.range(ext)?;
                let data = self.data_for(&data_out, len)?;
                if data.is_empty() {
                    return Self::good(Bytes::new());
                }
                let fua = fua || !self.mode.current.wce;
                if matches!(cmd, Command::OrWrite { .. }) {
                    let len = u64::try_from(data.len()).unwrap_or(u64::MAX);
                    return Self::io(
                        IoOp::Read { offset, len },
                        Pending::OrWrite { offset, data, fua },
                    );
                }
                Self::io(IoOp::Write { offset, data, fua }, Pending::Good)
            }
            Command::WriteAndVerify { ext, bytchk: _ } => {
                // The write is made durable before GOOD; the medium holds what was sent.
                self.check_writable()?;
                let (offset, len) = self.range(ext)?;
                let data = self.data_for(&data_out, len)?;
                if data.is_empty() {
                    return Self::good(Bytes::new());
                }
                Self::io(
                    IoOp::Write {
                        offset,
                        data,
                        fua: true,
                    },
                    Pending::Good,
                )
            }
            Command::Verify { ext, bytchk } => {
                let (offset, len) = self.range(ext)?;
                if bytchk == 0 || len == 0 {
                    // BYTCHK=0: medium verification; a RAM/file medium has no latent errors.
                    return Self::good(Bytes::new());
                }
                let expected = self.data_for(&data_out, len)?;
                if expected.is_empty() {
                    return Self::good(Bytes::new());
                }
                if len > MAX_IO_BYTES {
                    return Err(transfer_length_field(raw));
                }
                let len = u64::try_from(expected.len()).unwrap_or(u64::MAX);
                Self::io(IoOp::Read { offset, len }, Pending::Compare { expected })
            }
            Command::CompareAndWrite { ext, fua } => self.compare_and_write(ext, fua, &data_out),
            Command::SynchronizeCache { ext } => {
                // NUMBER OF LOGICAL BLOCKS 0 means "to the end of the medium" (SBC-3 §5.22).
                self.range(ext)?;
                Self::io(IoOp::Flush, Pending::Good)
            }
            Command::PreFetch { ext, immed: _ } => {
                // No cache to populate: GOOD ("not all blocks fit the cache"), SBC-3 §5.11.
                self.range(ext)?;
                Self::good(Bytes::new())
            }
            Command::WriteSame { ext, unmap, ndob } => {
                self.write_same(raw, ext, unmap, ndob, &data_out)
            }
            Command::Unmap { param_len } => self.unmap(param_len, &data_out),
            Command::Sanitize {
                service_action,
                ause,
                param_len,
            } => self.sanitize(service_action, ause, param_len, &data_out),
            Command::WriteAtomic { ext, fua } => {
                self.check_writable()?;
                if ext.blocks > vpd::max_atomic_blocks(&self.config) {
                    return Err(SenseReason::InvalidFieldInCdb(FieldPointer::byte(12)));
                }
                let (offset, len) = self.range(ext)?;
                if len == 0 {
                    return Self::good(Bytes::new());
                }
                // All or nothing: a short Data-Out is not written in part.
                let data = data_out
                    .get(..usize::try_from(len).unwrap_or(usize::MAX))
                    .map(|_| data_out.slice(..usize::try_from(len).unwrap_or(0)))
                    .ok_or(SenseReason::InvalidFieldInCommandIu)?;
                let fua = fua || !self.mode.current.wce;
                Self::io(IoOp::Write { offset, data, fua }, Pending::Atomic)
            }
            Command::ReadDefectData {
                twelve,
                plist,
                glist,
                format,
                alloc_len,
            } => Self::good(cut(
                read_defect_data(twelve, plist, glist, format)?,
                alloc_len,
            )),
            Command::GetLbaStatus { lba, alloc_len } => {
                if lba >= self.config.num_blocks {
                    return Err(SenseReason::LbaOutOfRange);
                }
                let offset = lba
                    .checked_mul(self.block_size())
                    .ok_or(SenseReason::LbaOutOfRange)?;
                let len = self
                    .config
                    .num_blocks
                    .saturating_sub(lba)
                    .checked_mul(self.block_size())
                    .ok_or(SenseReason::LbaOutOfRange)?;
                if !self.config.thin {
                    // Fully provisioned: every block is mapped, no need to ask the backstore.
                    return Self::good(self.lba_status(lba, alloc_len, &[(offset, len, true)]));
                }
                Self::io(
                    IoOp::MapStatus { offset, len },
                    Pending::LbaStatus { lba, alloc_len },
                )
            }
            Command::ReportSupportedOpcodes {
                rctd,
                options,
                opcode,
                service_action,
                alloc_len,
            } => {
                let data = self.report_supported_opcodes(rctd, options, opcode, service_action)?;
                Self::good(cut(data, alloc_len))
            }
            Command::ReportLuns { .. } => {
                if let Some(id) = ident {
                    self.ua.clear(id, SenseReason::ReportedLunsDataChanged);
                }
                Ok(Step::Done(report_luns(raw, &[self.config.lun])))
            }
            Command::ReportTargetPortGroups {
                extended,
                alloc_len,
            } => Self::good(cut(self.config.port_groups.report(extended), alloc_len)),
            Command::Reserve => Ok(self.spc2_reserve(ident)),
            Command::Release => Ok(self.spc2_release(ident)),
            Command::PersistentReserveIn {
                service_action,
                alloc_len,
            } => {
                let data =
                    self.pr
                        .prin(service_action, self.config.ptpl_capable, self.ptpl_active())?;
                Self::good(cut(data, alloc_len))
            }
            Command::PersistentReserveOut {
                service_action,
                scope,
                ty,
                param_len,
            } => self.prout(
                nexus,
                ident,
                service_action,
                scope,
                ty,
                param_len,
                &data_out,
            ),
            Command::ExtendedCopy { param_len } => self.extended_copy(ident, param_len, &data_out),
            Command::ReceiveCopyResults {
                service_action,
                list_id,
                alloc_len,
            } => {
                let data = if service_action == cdb::op::SA_OPERATING_PARAMETERS {
                    crate::xcopy::operating_parameters(self.config.block_size)
                } else {
                    let id = ident.ok_or(SenseReason::InvalidFieldInCdb(FieldPointer::byte(2)))?;
                    self.copies.status(id, list_id)?
                };
                Self::good(cut(data, alloc_len))
            }
        }
    }

    /// EXTENDED COPY (LID1), SPC-4 §6.4: parse and bound the list here; the daemon copies.
    fn extended_copy(
        &mut self,
        ident: Option<u64>,
        param_len: u32,
        data_out: &Bytes,
    ) -> Result<Step, SenseReason> {
        let Some(job) = crate::xcopy::parse(param_len, data_out)? else {
            return Self::good(Bytes::new());
        };
        let retain = job.retain_status && ident.is_some();
        let list_id = job.list_id;
        if let (true, Some(id)) = (retain, ident) {
            if self.copies.in_progress(id, list_id) {
                return Err(SenseReason::OperationInProgress);
            }
            self.copies.start(id, list_id)?;
        }
        Self::io(
            IoOp::ExtendedCopy(Box::new(job)),
            Pending::ExtendedCopy {
                identity: ident,
                list_id,
                retain,
            },
        )
    }

    /// WRITE SAME (10/16), SBC-3 §5.41/§5.42.
    fn write_same(
        &self,
        raw: &[u8],
        ext: Extent,
        unmap: bool,
        ndob: bool,
        data_out: &Bytes,
    ) -> Result<Step, SenseReason> {
        self.check_writable()?;
        let blocks_field = transfer_length_field(raw);
        // WSNZ=1 (VPD B0h): zero blocks is rejected, as are requests above the maximum.
        if ext.blocks == 0 || ext.blocks > vpd::max_write_same_blocks(&self.config) {
            return Err(blocks_field);
        }
        if unmap && !self.config.thin {
            return Err(SenseReason::InvalidFieldInCdb(FieldPointer::bit(1, 3)));
        }
        let (offset, len) = self.range(ext)?;
        let bs = usize::try_from(self.config.block_size).unwrap_or(0);
        let block = if ndob {
            if !data_out.is_empty() {
                return Err(SenseReason::InvalidFieldInCommandIu);
            }
            Bytes::from(vec![0u8; bs])
        } else {
            if data_out.len() != bs {
                return Err(SenseReason::InvalidFieldInCommandIu);
            }
            data_out.clone()
        };
        let zero = block.iter().all(|b| *b == 0);
        if zero {
            // UNMAP=1 on a thin LU deallocates (LBPRZ: reads return zeros); otherwise zeros
            // are written (the backstore may still punch holes).
            return Self::io(
                IoOp::WriteZeroes {
                    offset,
                    len,
                    unmap: unmap && self.config.thin,
                },
                Pending::Good,
            );
        }
        let fua = !self.mode.current.wce;
        self.write_same_chunk(offset, len, block, fua)
    }

    fn write_same_chunk(
        &self,
        offset: u64,
        remaining: u64,
        block: Bytes,
        fua: bool,
    ) -> Result<Step, SenseReason> {
        let bs = u64::try_from(block.len()).unwrap_or(0).max(1);
        let chunk_blocks = (WRITE_SAME_CHUNK_BYTES / bs).max(1);
        let n = remaining.min(chunk_blocks.saturating_mul(bs));
        let count = usize::try_from(n / bs).map_err(|_| SenseReason::InternalTargetFailure)?;
        let mut buf = BytesMut::with_capacity(usize::try_from(n).unwrap_or(0));
        for _ in 0..count {
            buf.extend_from_slice(&block);
        }
        let next = offset.checked_add(n).ok_or(SenseReason::LbaOutOfRange)?;
        let rest = remaining.saturating_sub(n);
        let state = if rest == 0 {
            Pending::Good
        } else {
            Pending::WriteSame {
                offset: next,
                remaining: rest,
                block,
                fua,
            }
        };
        Self::io(
            IoOp::Write {
                offset,
                data: buf.freeze(),
                fua,
            },
            state,
        )
    }

    /// SANITIZE (SBC-3 §5.30): validate, then run the job chunk by chunk (see
    /// [`crate::sanitize`]). EXIT FAILURE MODE leaves the failure mode of a sanitize that
    /// failed with AUSE=1; after one with AUSE=0 it is INVALID FIELD IN CDB (only a new
    /// sanitize that completes leaves that failure mode).
    fn sanitize(
        &mut self,
        service_action: u8,
        ause: bool,
        param_len: u32,
        data_out: &Bytes,
    ) -> Result<Step, SenseReason> {
        let request = sanitize::parse(service_action, param_len, data_out, self.config.block_size)?;
        let work = match request {
            sanitize::Request::ExitFailureMode => {
                if self.sanitize_failed == Some(false) {
                    return Err(SenseReason::InvalidFieldInCdb(FieldPointer::bit(1, 4)));
                }
                self.sanitize_failed = None;
                return Self::good(Bytes::new());
            }
            sanitize::Request::BlockErase => {
                if !self.config.thin {
                    return Err(SenseReason::InvalidFieldInCdb(FieldPointer::bit(1, 4)));
                }
                sanitize::Work::Erase
            }
            sanitize::Request::Overwrite {
                block,
                passes,
                invert,
            } => sanitize::Work::Overwrite {
                block,
                passes,
                invert,
            },
        };
        self.check_writable()?;
        let capacity = self
            .config
            .num_blocks
            .checked_mul(self.block_size())
            .ok_or(SenseReason::InternalTargetFailure)?;
        self.sanitize_step(sanitize::Job::new(work, ause, capacity))
    }

    /// The next chunk of a sanitize job, or its end: GOOD, and the failure mode left.
    fn sanitize_step(&mut self, mut job: sanitize::Job) -> Result<Step, SenseReason> {
        let progress = job.progress();
        let op = match job.next_chunk() {
            sanitize::Chunk::Write { offset, data } => IoOp::Write {
                offset,
                data,
                fua: false,
            },
            sanitize::Chunk::Erase { offset, len } => IoOp::WriteZeroes {
                offset,
                len,
                unmap: true,
            },
            sanitize::Chunk::Flush => IoOp::Flush,
            sanitize::Chunk::Done => {
                self.sanitizing = None;
                self.sanitize_failed = None;
                return Self::good(Bytes::new());
            }
        };
        self.sanitizing = Some(progress);
        Self::io(op, Pending::Sanitize { job })
    }

    /// UNMAP parameter list (SBC-3 §5.28): 8-byte header, 16-byte block descriptors.
    fn unmap(&self, param_len: u32, data_out: &Bytes) -> Result<Step, SenseReason> {
        if !self.config.thin {
            return Err(SenseReason::InvalidOpcode);
        }
        self.check_writable()?;
        if param_len == 0 {
            return Self::good(Bytes::new());
        }
        let n = usize::try_from(param_len)
            .unwrap_or(usize::MAX)
            .min(data_out.len());
        let list = data_out
            .get(..n)
            .ok_or(SenseReason::ParameterListLengthError)?;
        let header = list.get(..8).ok_or(SenseReason::ParameterListLengthError)?;
        let bd_len = usize::from(u16::from_be_bytes([
            header.get(2).copied().unwrap_or(0),
            header.get(3).copied().unwrap_or(0),
        ]));
        let descs = list.get(8..).unwrap_or_default();
        if bd_len > descs.len() {
            return Err(SenseReason::ParameterListLengthError);
        }
        let count = bd_len / 16;
        if count > usize::try_from(self.config.max_unmap_descriptors).unwrap_or(usize::MAX) {
            return Err(SenseReason::InvalidFieldInParameterList(
                FieldPointer::byte(2),
            ));
        }
        let mut ranges = Vec::with_capacity(count);
        let mut total: u64 = 0;
        for (i, d) in descs.chunks_exact(16).take(count).enumerate() {
            let at = u16::try_from(8usize.saturating_add(i.saturating_mul(16))).unwrap_or(u16::MAX);
            let lba = d
                .get(..8)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_be_bytes)
                .unwrap_or(0);
            let blocks = d
                .get(8..12)
                .and_then(|b| <[u8; 4]>::try_from(b).ok())
                .map(u32::from_be_bytes)
                .unwrap_or(0);
            let (offset, len) = self.range(Extent { lba, blocks })?;
            total = total.saturating_add(u64::from(blocks));
            if total > u64::from(self.config.max_unmap_blocks) {
                return Err(SenseReason::InvalidFieldInParameterList(
                    FieldPointer::byte(at.saturating_add(8)),
                ));
            }
            if len > 0 {
                ranges.push((offset, len));
            }
        }
        if ranges.is_empty() {
            return Self::good(Bytes::new());
        }
        Self::io(IoOp::Unmap { ranges }, Pending::Good)
    }

    /// REPORT SUPPORTED OPERATION CODES (SPC-4 §6.35), from the command table.
    fn report_supported_opcodes(
        &self,
        rctd: bool,
        options: u8,
        opcode: u8,
        service_action: u16,
    ) -> Result<Vec<u8>, SenseReason> {
        // UNMAP and SANITIZE BLOCK ERASE exist only on thin-provisioned LUs (LBPU, VPD B2h).
        let supported = |c: &cdb::CommandInfo| {
            self.config.thin
                || !(c.opcode == cdb::op::UNMAP
                    || (c.opcode == cdb::op::SANITIZE
                        && c.service_action == Some(sanitize::SA_BLOCK_ERASE)))
        };
        let timeouts = |c: &cdb::CommandInfo, out: &mut Vec<u8>| {
            out.extend_from_slice(&[0x00, 0x0A, 0x00, 0x00]);
            out.extend_from_slice(&c.timeout_secs.to_be_bytes());
            out.extend_from_slice(&c.timeout_secs.to_be_bytes());
        };
        if options == 0 {
            let mut out = vec![0u8; 4];
            for c in cdb::COMMANDS.iter().filter(|c| supported(c)) {
                let sa = c.service_action.unwrap_or(0);
                let flags = u8::from(rctd) << 1 | u8::from(c.service_action.is_some());
                let len = u16::try_from(c.cdb_len()).unwrap_or(0);
                out.push(c.opcode);
                out.push(0);
                out.extend_from_slice(&sa.to_be_bytes());
                out.extend_from_slice(&[0, flags]);
                out.extend_from_slice(&len.to_be_bytes());
                if rctd {
                    timeouts(c, &mut out);
                }
            }
            let n = u32::try_from(out.len().saturating_sub(4)).unwrap_or(u32::MAX);
            vpd::put(&mut out, 0, &n.to_be_bytes());
            return Ok(out);
        }
        // One command: option 1 for opcodes without service actions, 2 for those with.
        let has_sa = cdb::has_service_actions(opcode);
        if (options == 1 && has_sa) || (options == 2 && !has_sa && cdb::opcode_known(opcode)) {
            return Err(SenseReason::InvalidFieldInCdb(FieldPointer::bit(2, 2)));
        }
        let found = cdb::lookup(opcode, service_action)
            .filter(|c| supported(c))
            .filter(|c| options == 1 || c.service_action == Some(service_action));
        let mut out = vec![0u8; 4];
        match found {
            Some(c) => {
                let len = u16::try_from(c.cdb_len()).unwrap_or(0);
                vpd::put(&mut out, 1, &[u8::from(rctd) << 7 | 0x03]);
                vpd::put(&mut out, 2, &len.to_be_bytes());
                out.extend_from_slice(c.usage);
                if rctd {
                    timeouts(c, &mut out);
                }
            }
            // SUPPORT 001b: not supported; no usage data.
            None => vpd::put(&mut out, 1, &[0x01]),
        }
        Ok(out)
    }

    fn finish(&mut self, state: Pending, result: IoResult) -> Result<Step, SenseReason> {
        if let Pending::ExtendedCopy {
            identity,
            list_id,
            retain,
        } = state
        {
            let outcome = match result {
                IoResult::Copy(o) => o,
                _ => crate::xcopy::CopyOutcome {
                    segments: 0,
                    bytes: 0,
                    end: crate::xcopy::CopyEnd::Failed(SenseReason::CopyAborted),
                },
            };
            let good = outcome.end == crate::xcopy::CopyEnd::Good;
            if let (true, Some(id)) = (retain, identity) {
                self.copies
                    .finish(id, list_id, good, outcome.segments, outcome.bytes);
            }
            return match outcome.end {
                crate::xcopy::CopyEnd::Good => Self::good(Bytes::new()),
                crate::xcopy::CopyEnd::Failed(reason) => Err(reason),
                crate::xcopy::CopyEnd::Conflict => {
                    Ok(Step::Done(Completion::reservation_conflict()))
                }
                crate::xcopy::CopyEnd::Aborted => Ok(Step::Done(Completion::task_aborted())),
            };
        }
        if let Pending::Sanitize { job } = state {
            if let IoResult::Error(_) = result {
                self.sanitizing = None;
                self.sanitize_failed = Some(job.ause);
                return Err(SenseReason::SanitizeFailed);
            }
            return self.sanitize_step(job);
        }
        let result = match result {
            IoResult::Error(kind) => return Err(io_error_reason(kind, &state)),
            other => other,
        };
        match (state, result) {
            (Pending::Read, IoResult::Data(data)) => Self::good(data),
            (Pending::Good | Pending::Atomic, _) => Self::good(Bytes::new()),
            (Pending::Compare { expected }, IoResult::Data(actual)) => {
                compare(&expected, &actual)?;
                Self::good(Bytes::new())
            }
            (Pending::OrWrite { offset, data, fua }, IoResult::Data(old)) => {
                if old.len() < data.len() {
                    return Err(SenseReason::UnrecoveredReadError);
                }
                let merged: Vec<u8> = data.iter().zip(old.iter()).map(|(a, b)| a | b).collect();
                Self::io(
                    IoOp::Write {
                        offset,
                        data: Bytes::from(merged),
                        fua,
                    },
                    Pending::Good,
                )
            }
            (
                Pending::WriteSame {
                    offset,
                    remaining,
                    block,
                    fua,
                },
                _,
            ) => self.write_same_chunk(offset, remaining, block, fua),
            (Pending::LbaStatus { lba, alloc_len }, IoResult::Extents(extents)) => {
                Self::good(self.lba_status(lba, alloc_len, &extents))
            }
            (
                Pending::CompareAndWrite {
                    offset,
                    verify,
                    write,
                    fua,
                },
                IoResult::Data(actual),
            ) => caw::after_read(offset, &verify, write, fua, &actual),
            _ => Err(SenseReason::InternalTargetFailure),
        }
    }

    /// GET LBA STATUS parameter data (SBC-3 §5.6): descriptors from `lba` onward, adjacent
    /// extents of the same state merged, mapped = 0 / deallocated = 1.
    fn lba_status(&self, lba: u64, alloc_len: u32, extents: &[(u64, u64, bool)]) -> Bytes {
        let bs = self.block_size().max(1);
        let mut runs: Vec<(u64, u64, bool)> = Vec::new();
        let mut next = lba;
        for &(off, len, mapped) in extents {
            let end = off
                .saturating_add(len)
                .div_ceil(bs)
                .min(self.config.num_blocks);
            if end <= next {
                continue;
            }
            let start = (off / bs).max(next);
            if start > next {
                // A gap the backstore did not describe: report it as mapped.
                push_run(&mut runs, next, start, true);
            }
            push_run(&mut runs, start, end, mapped);
            next = end;
        }
        if runs.is_empty() {
            runs.push((lba, self.config.num_blocks.saturating_sub(lba), true));
        }
        let max = usize::try_from(alloc_len.saturating_sub(8) / 16)
            .unwrap_or(0)
            .clamp(1, MAX_LBA_STATUS_DESCRIPTORS);
        let mut out = vec![0u8; 8];
        for (start, count, mapped) in runs.into_iter().take(max) {
            out.extend_from_slice(&start.to_be_bytes());
            out.extend_from_slice(&u32::try_from(count).unwrap_or(u32::MAX).to_be_bytes());
            out.extend_from_slice(&[u8::from(!mapped), 0, 0, 0]);
        }
        let n = u32::try_from(out.len().saturating_sub(4)).unwrap_or(u32::MAX);
        vpd::put(&mut out, 0, &n.to_be_bytes());
        cut(out, alloc_len)
    }
}

/// Append blocks `start..end` with state `mapped`, merging with an adjacent equal run.
fn push_run(runs: &mut Vec<(u64, u64, bool)>, start: u64, end: u64, mapped: bool) {
    let count = end.saturating_sub(start);
    match runs.last_mut() {
        Some(last) if last.2 == mapped && last.0.saturating_add(last.1) == start => {
            last.1 = last.1.saturating_add(count);
        }
        _ => runs.push((start, count, mapped)),
    }
}

/// Compare what was read with what the initiator sent (VERIFY with BYTCHK, COMPARE AND
/// WRITE): MISCOMPARE with the offset of the first differing byte (SBC-3 §5.2, §5.30); a
/// short read is UNRECOVERED READ ERROR.
pub(crate) fn compare(expected: &[u8], actual: &[u8]) -> Result<(), SenseReason> {
    if let Some(i) = expected.iter().zip(actual.iter()).position(|(a, b)| a != b) {
        return Err(SenseReason::Miscompare {
            offset: u64::try_from(i).unwrap_or(u64::MAX),
        });
    }
    if actual.len() < expected.len() {
        return Err(SenseReason::UnrecoveredReadError);
    }
    Ok(())
}

/// READ DEFECT DATA (10/12) parameter data (SBC-3 §5.12, §5.13): the medium has no defect
/// lists to report, so the header says the requested lists are valid and empty, in the
/// requested format (short/long block, bytes from index, physical sector, vendor specific).
fn read_defect_data(
    twelve: bool,
    plist: bool,
    glist: bool,
    format: u8,
) -> Result<Vec<u8>, SenseReason> {
    if !matches!(format, 0 | 3 | 4 | 5 | 6) {
        let byte = if twelve { 1 } else { 2 };
        return Err(SenseReason::InvalidFieldInCdb(FieldPointer::bit(byte, 2)));
    }
    let flags = u8::from(plist) << 4 | u8::from(glist) << 3 | format;
    // (10): reserved, flags, DEFECT LIST LENGTH (2). (12): reserved, flags, GENERATION CODE
    // (2), DEFECT LIST LENGTH (4).
    let mut d = vec![0u8; if twelve { 8 } else { 4 }];
    vpd::put(&mut d, 1, &[flags]);
    Ok(d)
}

/// INVALID FIELD IN CDB pointing at the TRANSFER LENGTH / NUMBER OF LOGICAL BLOCKS field.
fn transfer_length_field(raw: &[u8]) -> SenseReason {
    let byte = match raw.first().copied().unwrap_or(0) >> 5 {
        0 => 4,
        1 | 2 => 7,
        4 => 10,
        _ => 6,
    };
    SenseReason::InvalidFieldInCdb(FieldPointer::byte(byte))
}

/// The one mapping from backstore failures to sense (DESIGN §3 rule 4).
impl From<IoErrorKind> for SenseReason {
    fn from(kind: IoErrorKind) -> Self {
        match kind {
            IoErrorKind::ReadError => SenseReason::UnrecoveredReadError,
            IoErrorKind::WriteError => SenseReason::WriteError,
            IoErrorKind::NoSpace => SenseReason::SpaceAllocationFailed,
            IoErrorKind::Unsupported => SenseReason::InvalidOpcode,
            IoErrorKind::Other => SenseReason::InternalTargetFailure,
            IoErrorKind::Fenced => SenseReason::AluaTransitioning,
        }
    }
}

/// [`From<IoErrorKind>`], except that an unspecified failure while reading is a read error.
fn io_error_reason(kind: IoErrorKind, state: &Pending) -> SenseReason {
    match (kind, state) {
        (
            IoErrorKind::Other,
            Pending::Read | Pending::Compare { .. } | Pending::CompareAndWrite { .. },
        ) => SenseReason::UnrecoveredReadError,
        _ => kind.into(),
    }
}

/// How the commands a task-set-clearing function cleared end when they try to start after it
/// (see [`LogicalUnit::aborted_before_start`]).
#[derive(Debug, Clone, Copy, Default)]
struct LateAbort {
    /// The session that sent the function.
    from: NexusId,
    /// TAS was zero: other sessions' commands end without status.
    silent: bool,
    /// The unit attention those sessions then get, if the function raised none for everyone.
    ua: Option<SenseReason>,
}

/// Which reset happened (SAM-5 §6.3), for the unit attention's ASCQ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetKind {
    LogicalUnit,
    TargetWarm,
    TargetCold,
}

/// REPORT LUNS (SPC-4 §6.33), answered at the target level for the LUNs the nexus may see.
/// SELECT REPORT 00h/02h list every LUN, 01h only well-known LUNs (none); others and an
/// allocation length below 16 are INVALID FIELD IN CDB. LUNs are encoded by
/// [`crate::lun::encode`] (peripheral below 256, flat below 16384); larger ones are not
/// reported.
pub fn report_luns(cdb: &[u8], luns: &[u64]) -> Completion {
    match report_luns_data(cdb, luns) {
        Ok(data) => Completion::good(data),
        Err(reason) => Completion::check_condition(reason, false),
    }
}

fn report_luns_data(raw: &[u8], luns: &[u64]) -> Result<Bytes, SenseReason> {
    let (select, alloc_len) = match cdb::parse(raw)? {
        Command::ReportLuns { select, alloc_len } => (select, alloc_len),
        _ => return Err(SenseReason::InvalidOpcode),
    };
    if alloc_len < 16 {
        return Err(SenseReason::InvalidFieldInCdb(FieldPointer::byte(6)));
    }
    let listed: Vec<u64> = match select {
        0x00 | 0x02 => {
            let mut v: Vec<u64> = luns
                .iter()
                .copied()
                .filter_map(crate::lun::encode)
                .collect();
            v.sort_unstable();
            v.dedup();
            v
        }
        0x01 => Vec::new(),
        _ => return Err(SenseReason::InvalidFieldInCdb(FieldPointer::byte(2))),
    };
    let mut out = Vec::with_capacity(listed.len().saturating_mul(8).saturating_add(8));
    let n = u32::try_from(listed.len().saturating_mul(8)).unwrap_or(u32::MAX);
    out.extend_from_slice(&n.to_be_bytes());
    out.extend_from_slice(&[0; 4]);
    for field in listed {
        out.extend_from_slice(&field.to_be_bytes());
    }
    Ok(cut(out, alloc_len))
}

/// A command addressed to a LUN that does not exist (SPC-4 §6.6.2: INQUIRY answers with
/// peripheral qualifier 011b; REQUEST SENSE answers LOGICAL UNIT NOT SUPPORTED as data; others
/// get CHECK CONDITION, ILLEGAL REQUEST, LOGICAL UNIT NOT SUPPORTED 25h/00h).
pub fn no_such_lun(cdb: &[u8]) -> Completion {
    match cdb::parse(cdb) {
        Ok(Command::Inquiry {
            evpd: false,
            alloc_len,
            ..
        }) => Completion::good(cut(vpd::standard_no_lun(), alloc_len)),
        Ok(Command::RequestSense { desc, alloc_len }) => Completion::good(cut(
            SenseReason::LogicalUnitNotSupported.to_bytes(desc).to_vec(),
            alloc_len,
        )),
        Ok(Command::ReportLuns { .. }) => report_luns(cdb, &[]),
        _ => Completion::check_condition(SenseReason::LogicalUnitNotSupported, false),
    }
}

/// No identity has this id: unit attentions raised with it as the exception reach everyone.
const NO_IDENTITY: u64 = u64::MAX;

/// Target-managed ownership and the target-side handover ([`crate::pr::ownership`];
/// semantics.md §3.2-§3.5). Each call is one pure step under the LU lock. Steps that change
/// the PR state return a [`PrCommit`] that the daemon carries out exactly as for a PERSISTENT
/// RESERVE OUT: wait for `abort` to drain ([`LogicalUnit::abort_drained`]), then perform
/// `persist`; `completion` is GOOD (or [`Completion::persist_failed`] if the write failed).
/// The state is in effect for every command that starts after the call returns.
impl LogicalUnit {
    /// Make `host` (an initiator name: all its ISIDs and target ports) the owner at `epoch`:
    /// one host-wide registration with [`ownership::owner_key`] holding Write Exclusive –
    /// Registrants Only, so only `host` writes and every other host reads; nexuses of `host`
    /// that log in later are covered at once. Tasks of every other host are aborted as by
    /// PREEMPT AND ABORT, so none of their writes lands after the commit is reported; a
    /// previous owner's registration goes (2Ah/05h to its nexuses). Refused while a handover
    /// is in progress, while hosts that manage PR themselves are registered, or under an
    /// SPC-2 reservation. A retry of the same decision succeeds without change (and asks to
    /// persist the state again, in case the first write failed).
    pub fn set_owner(&mut self, host: &str, epoch: u64) -> Result<PrCommit, OwnershipError> {
        let op = OwnershipOp::SetOwner {
            host: host.to_string(),
            epoch,
        };
        self.ownership_step(op, None)
    }

    /// End target-managed ownership of `host` at `epoch`: its registration and reservation
    /// go (2Ah/05h to its nexuses), PR OUT is accepted again, and with no reservation every
    /// host may write. A retry succeeds without change.
    pub fn clear_owner(&mut self, host: &str, epoch: u64) -> Result<PrCommit, OwnershipError> {
        let op = OwnershipOp::ClearOwner {
            host: host.to_string(),
            epoch,
        };
        self.ownership_step(op, None)
    }

    /// Handover step 1: check that `from` owns the LU, that `to` has a session on it and that
    /// `epoch` is newer than the LU's (and was never aborted); nothing else changes (`to`
    /// reads, `from` writes). Repeating the prepared (or fenced) handover succeeds without
    /// change.
    pub fn handover_prepare(
        &mut self,
        from: &str,
        to: &str,
        epoch: u64,
    ) -> Result<(), OwnershipError> {
        let op = OwnershipOp::Prepare {
            from: from.to_string(),
            to: to.to_string(),
            epoch,
        }
        .normalized()?;
        let OwnershipOp::Prepare { to, .. } = &op else {
            return Ok(());
        };
        let logged_in = self.host_logged_in(to);
        self.ownership_step(op, Some(logged_in)).map(|_| ())
    }

    /// Whether `host` (a lower-cased initiator name) has a session on the LU now.
    pub fn host_logged_in(&self, host: &str) -> bool {
        self.identities
            .values()
            .any(|x| x.sessions > 0 && x.it.initiator.name() == host)
    }

    /// Failover (issue 19, [`OwnershipOp::Failover`]): `from` failed, `to` owns the LU at
    /// `epoch`; `from`'s registrations go (2Ah/05h to its nexuses) and its tasks are aborted
    /// (the commit's ticket: wait until drained before reporting). Refused while `from` has
    /// a session on the LU unless `force`. A retry of the same decision changes nothing.
    pub fn failover(
        &mut self,
        from: &str,
        to: &str,
        epoch: u64,
        force: bool,
    ) -> Result<PrCommit, OwnershipError> {
        let from = crate::pr::ownership::host_name(from)?;
        let logged_in = (!force).then(|| self.host_logged_in(&from));
        let op = OwnershipOp::Failover {
            from,
            to: to.to_string(),
            epoch,
        };
        self.ownership_step(op, logged_in)
    }

    /// Handover step 2: from now on every command of `from` except classes A and R gets
    /// RESERVATION CONFLICT at its start; its tasks already in the task set continue. The
    /// ticket names them: wait until [`LogicalUnit::drained`], or abort them with
    /// [`LogicalUnit::handover_abort_inflight`]. Repeating the fence returns a ticket for
    /// the tasks still running.
    pub fn handover_fence(
        &mut self,
        from: &str,
        epoch: u64,
    ) -> Result<DrainTicket, OwnershipError> {
        let op = OwnershipOp::Fence {
            from: from.to_string(),
            epoch,
        }
        .normalized()?;
        let fx = self.pr.ownership(&op, Checks::REPLAY)?;
        Ok(self.drain_ticket(fx.drain.as_deref()))
    }

    /// The tasks of `host` in the task set now (an empty ticket for `None`).
    pub fn drain_ticket(&self, host: Option<&str>) -> DrainTicket {
        DrainTicket {
            tasks: host.map(|h| self.host_tasks(h)).unwrap_or_default(),
        }
    }

    /// Whether every task named by `ticket` has finished (resumed for the last time or been
    /// abandoned).
    pub fn drained(&self, ticket: &DrainTicket) -> bool {
        !ticket.tasks.iter().any(|t| self.tasks.contains_key(t))
    }

    /// After the drain deadline: abort every task of the fenced host `from` (TASK ABORTED, no
    /// further I/O, as PREEMPT AND ABORT does); wait for the ticket with
    /// [`LogicalUnit::abort_drained`] before committing.
    pub fn handover_abort_inflight(&mut self, from: &str) -> Result<AbortTicket, OwnershipError> {
        let from = ownership::host_name(from)?;
        if self.pr.handover.fenced() != Some(from.as_str()) {
            return Err(OwnershipError::NotFenced(from));
        }
        let host = Self::host_registration(&from);
        Ok(self.abort_tasks(std::slice::from_ref(&host), None).0)
    }

    /// Handover step 3, one PR transition: `from`'s registration goes, `to`'s host-wide
    /// registration holds WERO, `to` owns the LU at `epoch`, PRgeneration + 1, 2Ah/05h
    /// REGISTRATIONS PREEMPTED to `from`'s nexuses (to no one else). Tasks of `from` still
    /// running are aborted under the returned `abort` ticket, which the daemon drains before
    /// it reports the commit (SPC-4 §5.13.11.2.6). Requires the fenced handover; a retry of
    /// a committed epoch succeeds without change, an older or aborted epoch is refused.
    pub fn handover_commit(
        &mut self,
        from: &str,
        to: &str,
        epoch: u64,
    ) -> Result<PrCommit, OwnershipError> {
        let op = OwnershipOp::Commit {
            from: from.to_string(),
            to: to.to_string(),
            epoch,
        };
        self.ownership_step(op, None)
    }

    /// Handover step 4, before commit: the fence goes, `from` stays the only writer, and
    /// `epoch` is refused from now on. Succeeds again for an aborted epoch and, without a
    /// handover in progress, while `from` owns the LU; refused once `to` owns it at `epoch`.
    pub fn handover_abort(
        &mut self,
        from: &str,
        to: &str,
        epoch: u64,
    ) -> Result<(), OwnershipError> {
        let op = OwnershipOp::Abort {
            from: from.to_string(),
            to: to.to_string(),
            epoch,
        };
        self.ownership_step(op, None).map(|_| ())
    }

    /// Handover step 4 for a commit that gave up (drain deadline, failed flush): the fence
    /// goes and `from` stays the only writer, but the epoch is not remembered as aborted (the
    /// coordinator decides whether to abort or retry).
    pub fn handover_unfence(
        &mut self,
        from: &str,
        to: &str,
        epoch: u64,
    ) -> Result<(), OwnershipError> {
        let op = OwnershipOp::Unfence {
            from: from.to_string(),
            to: to.to_string(),
            epoch,
        };
        self.ownership_step(op, None).map(|_| ())
    }

    /// Replicated ownership step (issue 18): abort the tasks `pick` names here, as a step
    /// taken on this LU would ([`LogicalUnit::ownership_step`]); `None` when there are none.
    pub fn abort_host_tasks(&mut self, pick: &TaskPick) -> Option<AbortTicket> {
        match pick {
            TaskPick::Host(h) => self.abort_tasks_where(|name| name == h),
            TaskPick::AllBut(h) => self.abort_tasks_where(|name| name != h),
        }
    }

    /// Take one ownership step ([`PrState::ownership`]) with this LU's own checks (its SPC-2
    /// reservation; `logged_in` for a prepare or a failover) and carry out its effects here: tasks
    /// aborted, 2Ah/05h to the removed registrations' nexuses.
    pub fn ownership_step(
        &mut self,
        op: OwnershipOp,
        logged_in: Option<bool>,
    ) -> Result<PrCommit, OwnershipError> {
        let op = op.normalized()?;
        let checks = Checks {
            spc2_reserved: self.spc2.is_some(),
            logged_in,
        };
        let fx = self.pr.ownership(&op, checks)?;
        if !fx.changed {
            return Ok(self.ownership_commit(None));
        }
        let abort = fx.abort.as_ref().and_then(|p| self.abort_host_tasks(p));
        Ok(self.after_ownership_change(&fx.removed, abort))
    }

    /// The handover in progress.
    pub fn handover_state(&self) -> &Handover {
        &self.pr.handover
    }

    /// Ownership's part of the reservation check at command start: on an owned LU every PR
    /// OUT conflicts; a fenced host's commands other than classes A and R conflict.
    fn ownership_conflicts(&self, ident: Option<u64>, raw: &[u8]) -> bool {
        let fenced = self.pr.handover.fenced();
        if self.pr.owner().is_none() && fenced.is_none() {
            return false;
        }
        let class = access::classify(raw);
        if self.pr.owner().is_some() && class == access::Class::PrOut {
            return true;
        }
        let Some(from) = fenced else {
            return false;
        };
        let is_from = ident
            .and_then(|id| self.identities.get(&id))
            .is_some_and(|x| x.it.initiator.name() == from);
        is_from && !matches!(class, access::Class::Always | access::Class::ReadLike)
    }

    /// The state file when APTPL is off: removed, unless ownership must survive a restart.
    fn image_without_aptpl(&self) -> Persist {
        if self.config.ptpl_capable && self.pr.has_ownership() {
            Persist::Write(crate::pr::persist::encode(
                &self.pr.owned_image(),
                &self.config.serial,
            ))
        } else {
            Persist::Remove
        }
    }

    /// A [`PrCommit`] for an ownership step: the state file is rewritten whenever the daemon
    /// can persist (ownership always persists when `ptpl_capable`).
    fn ownership_commit(&self, abort: Option<AbortTicket>) -> PrCommit {
        let persist = self.pr_state_file();
        PrCommit {
            abort,
            persist,
            completion: Completion::good(Bytes::new()),
            origin: None,
        }
    }

    fn after_ownership_change(
        &mut self,
        removed: &[Registration],
        abort: Option<AbortTicket>,
    ) -> PrCommit {
        self.refresh_registrations();
        for r in removed {
            self.notify(r, SenseReason::RegistrationsPreempted, NO_IDENTITY);
        }
        self.ownership_commit(abort)
    }

    /// A registration covering every nexus of `host` (for matching only).
    fn host_registration(host: &str) -> Registration {
        Registration {
            id: u64::MAX,
            name: host.to_string(),
            isid: None,
            rtpi: None,
            key: 0,
        }
    }

    /// Ids of the tasks in the task set whose initiator name satisfies `pick` (tasks of an
    /// unannounced session have no name and are never picked).
    fn tasks_where(&self, pick: impl Fn(&str) -> bool) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .tasks
            .iter()
            .filter(|(_, t)| {
                t.identity
                    .and_then(|id| self.identities.get(&id))
                    .is_some_and(|x| pick(x.it.initiator.name()))
            })
            .map(|(id, _)| *id)
            .collect();
        v.sort_unstable();
        v
    }

    fn host_tasks(&self, host: &str) -> Vec<u64> {
        self.tasks_where(|name| name == host)
    }

    /// Abort the tasks [`Self::tasks_where`] picks under a new ticket, if there are any.
    fn abort_tasks_where(&mut self, pick: impl Fn(&str) -> bool) -> Option<AbortTicket> {
        let hit = self.tasks_where(pick);
        if hit.is_empty() {
            return None;
        }
        let ticket = self.next_ticket;
        self.next_ticket = self.next_ticket.wrapping_add(1);
        for id in hit {
            if let Some(t) = self.tasks.get_mut(&id) {
                self.aborted_tasks += t.abort(ticket);
            }
        }
        self.wake_waiters();
        Some(AbortTicket(ticket))
    }
}

#[path = "caw.rs"]
pub(crate) mod caw;

#[cfg(test)]
#[path = "lu_tests.rs"]
mod tests;
