//! Targets and their logical units at run time: nexus registration, command execution
//! (the SCSI step loop), task management effects.
//!
//! Locking: each LU sits behind a `std::sync::Mutex` held only for `execute` / `resume` — the
//! pure decision — and never across an `.await` or a backend call (DESIGN.md §3 rule 7).
//!
//! Where I/O runs: a hop to the blocking pool costs more (two thread wake-ups, ~5-10 µs) than
//! a page-cached 4 KiB `pread` (~1-2 µs). So cheap operations run inline on the calling task
//! (see [`runs_inline`]): every read and write of a RAM LUN, and reads and non-FUA writes of at
//! most [`INLINE_MAX`] bytes on a file LUN. Flushes, FUA writes, large transfers and
//! unmap/zeroing go to the blocking pool. Worst case of the inline choice: a page-cache miss
//! (or dirty-page throttling on a write) blocks one runtime worker for one disk I/O of at most
//! `INLINE_MAX` bytes.
//!
//! Persistent reservations: a PERSISTENT RESERVE OUT that changed the state comes back from the
//! LU as [`Step::PrCommit`] and is finished on a task of its own ([`PendingCommand`]): it waits
//! until the tasks a PREEMPT AND ABORT aborted have drained (SPC-4 §5.13.11.2.6), then writes
//! the APTPL state file durably (SPC-4 §5.13.5.1; DESIGN.md §3 rule 10) before the completion
//! goes out. Every continuation the LU handed out is either resumed or abandoned, also when
//! its task is dropped (runtime shutdown), so such a wait always ends.
//!
//! COMPARE AND WRITE: its atomicity is a range lock in the LU's task set (SBC-3 §5.2,
//! `ironlun_scsi::lu::caw`). A command whose I/O must wait for it comes back as
//! [`Step::Wait`]; it waits off the connection's task (`LunHandle::wait_turn`) until the LU
//! says a task ended or was aborted (`LuGuard`), and is then driven on like any other.

pub mod cluster;
pub mod xcopy;

use crate::backend;
use crate::config::{self, Config};
use bytes::Bytes;
use ironlun_api::{CommitSteps, Event, OnDeadline, ABORT_WAIT};
use ironlun_backstore::BlockBackend;
use ironlun_iscsi::acl::LunMasking;
use ironlun_iscsi::connection::ScsiCompletion;
use ironlun_iscsi::pdu::{TmfFunction, TmfResponse};
use ironlun_scsi::lu::{
    self, Continuation, IoOp, IoResult, LogicalUnit, LuConfig, NexusId, PrCommit, ResetKind, Step,
};
use ironlun_scsi::pr::ownership::{OwnershipError, OwnershipOp};
use ironlun_scsi::pr::{InitiatorPort, ItNexus, Persist, PrPersistence};
use ironlun_scsi::sense::SenseReason;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

/// One logical unit with its backend.
pub struct LunHandle {
    lu: Mutex<LogicalUnit>,
    pub backend: Arc<dyn BlockBackend>,
    /// Test hook on EXTENDED COPYs into this LU ([`xcopy::CopyHook`]); never set when served.
    pub copy_hook: std::sync::OnceLock<Arc<xcopy::CopyHook>>,
    /// The backend is memory (every read and write is a memcpy): see [`runs_inline`].
    ram: bool,
    /// The backend completes reads, writes and flushes asynchronously (io_uring): those are
    /// awaited, never run inline or on the blocking pool.
    async_io: bool,
    /// Woken after a task's continuation is resumed or abandoned while a PREEMPT AND ABORT
    /// waits for its aborted tasks to drain (see [`LunHandle::wait_drained`]).
    drained: tokio::sync::Notify,
    /// How many PR OUT tasks are waiting on `drained`: the resume path touches the `Notify`
    /// (which takes a lock) only when this is non-zero, so READ/WRITE pay one atomic load.
    drain_waiters: AtomicUsize,
    /// Woken when the LU says tasks waiting for a COMPARE AND WRITE's range lock may go on
    /// ([`LogicalUnit::take_wakeup`], checked whenever the LU lock is released: [`LuGuard`]).
    unblocked: tokio::sync::Notify,
    /// The APTPL state file, `<data_dir>/pr/aptpl_<serial>`.
    state_file: PathBuf,
    /// Order of the state changes that asked for a [`Persist`], taken under the LU lock.
    persist_seq: AtomicU64,
    /// Serialises state-file writes; holds the sequence number of the last durable one, so an
    /// older state never overwrites a newer one when two PR OUTs persist concurrently.
    persisted: Mutex<u64>,
    /// `TARGET/LUN`, as events name the LU.
    label: String,
    /// Where PR OUT, ownership and handover events of this LU go.
    events: Arc<EventLog>,
    /// Ownership and handover steps of the admin API run one at a time per LU (a commit's
    /// drain wait is not interleaved with an abort of the same LU); never held with `lu`.
    admin_op: tokio::sync::Mutex<()>,
    /// Upper bound on the bytes per second a SANITIZE writes or deallocates (the LUN's
    /// `sanitize_rate`), so that it does not starve the backstore; `None`: unpaced.
    sanitize_rate: Option<u64>,
    /// Commands, latency, errors, PR and handover counts ([`crate::metrics`]).
    pub(crate) metrics: Arc<crate::metrics::LuMetrics>,
    /// Cluster mode (issue 18): the LU's replicated reservation state and the gateway's
    /// self-fencing gate ([`crate::target::cluster`]); unset for one node.
    pub(crate) cluster: std::sync::OnceLock<crate::target::cluster::ClusterLu>,
    /// A prepared handover to commit at the destination's first write (issue 19, for
    /// hypervisors that give no hook between the source's pause and the destination's
    /// resume); one node only. `armed_flag` lets the command path check it with one load.
    armed: Mutex<Option<Armed>>,
    armed_flag: std::sync::atomic::AtomicBool,
    /// Held while the armed handover commits: the destination's other commands waiting for
    /// it find it disarmed afterwards, instead of each retrying the commit (and its state write).
    armed_commit: tokio::sync::Mutex<()>,
}

/// Largest file-backend read or (non-FUA) write run inline on the calling task.
pub const INLINE_MAX: u64 = 64 * 1024;

/// Whether `op` on a LUN (RAM or not) runs inline instead of on the blocking pool
/// (module doc: where I/O runs).
pub fn runs_inline(op: &IoOp, ram: bool) -> bool {
    match op {
        IoOp::Read { len, .. } => ram || *len <= INLINE_MAX,
        IoOp::Write { data, fua, .. } => {
            ram || (!*fua && u64::try_from(data.len()).is_ok_and(|l| l <= INLINE_MAX))
        }
        IoOp::Flush => ram,
        IoOp::WriteZeroes { .. } | IoOp::Unmap { .. } | IoOp::MapStatus { .. } => false,
        IoOp::ExtendedCopy(_) => false,
    }
}

impl LunHandle {
    /// The LU's reservation state (for the admin API and `ironlun ctl reservations`).
    pub fn pr_snapshot(&self) -> ironlun_scsi::pr::PrSnapshot {
        self.lu().pr_snapshot()
    }

    fn new(
        lu: LogicalUnit,
        backend: Arc<dyn BlockBackend>,
        ram: bool,
        state_file: PathBuf,
    ) -> Self {
        let async_io = backend.is_async();
        LunHandle {
            lu: Mutex::new(lu),
            backend,
            copy_hook: std::sync::OnceLock::new(),
            ram,
            async_io,
            drained: tokio::sync::Notify::new(),
            drain_waiters: AtomicUsize::new(0),
            unblocked: tokio::sync::Notify::new(),
            state_file,
            persist_seq: AtomicU64::new(0),
            persisted: Mutex::new(0),
            label: String::new(),
            events: Arc::new(EventLog::new(EVENT_CAPACITY)),
            admin_op: tokio::sync::Mutex::new(()),
            sanitize_rate: None,
            metrics: Arc::default(),
            cluster: std::sync::OnceLock::new(),
            armed: Mutex::new(None),
            armed_flag: std::sync::atomic::AtomicBool::new(false),
            armed_commit: tokio::sync::Mutex::new(()),
        }
    }

    /// Whether backend I/O must not be submitted now: this gateway is self-fenced
    /// (scale-out.md §2.4). One atomic load for one node.
    fn fenced(&self) -> bool {
        self.cluster.get().is_some_and(|c| !c.may_submit())
    }

    /// Perform `op` on the backend, unless fenced ([`IoErrorKind::Fenced`]).
    fn perform(&self, op: &IoOp) -> IoResult {
        if self.fenced() {
            return IoResult::Error(lu::IoErrorKind::Fenced);
        }
        backend::perform(&*self.backend, op)
    }

    /// Perform `op` on an async backend, unless fenced.
    async fn perform_async(&self, op: IoOp) -> IoResult {
        if self.fenced() {
            return IoResult::Error(lu::IoErrorKind::Fenced);
        }
        backend::perform_async(&self.backend, op).await
    }

    /// A handle over `backend` run like a file LUN (FUA and large I/O on the blocking pool),
    /// for tests in other modules of the crate that need a backstore of their own.
    #[cfg(test)]
    pub(crate) fn for_tests(
        lu: LogicalUnit,
        backend: Arc<dyn BlockBackend>,
        state_file: PathBuf,
    ) -> Self {
        Self::new(lu, backend, false, state_file)
    }

    /// How long one SANITIZE step of `op` takes at the LUN's `sanitize_rate`.
    fn sanitize_pace(&self, op: &IoOp) -> Option<std::time::Duration> {
        let rate = self.sanitize_rate.filter(|r| *r > 0)?;
        let len = match op {
            IoOp::Write { data, .. } => u64::try_from(data.len()).ok()?,
            IoOp::WriteZeroes { len, .. } => *len,
            _ => return None,
        };
        let nanos = u128::from(len).saturating_mul(1_000_000_000) / u128::from(rate);
        Some(std::time::Duration::from_nanos(
            u64::try_from(nanos).unwrap_or(u64::MAX),
        ))
    }

    /// Name the LU `TARGET/LUN` in events and record them in `events`.
    fn with_events(mut self, label: String, events: Arc<EventLog>) -> Self {
        self.label = label;
        self.events = events;
        self
    }

    /// Start a command under the LU lock; also the CDB's Data-Out length (for residuals).
    /// Execute a command under the LU lock. `arrived`: when its header arrived; if a LUN
    /// RESET, target reset or CLEAR TASK SET arrived after it and has been carried out (its
    /// Data-Out came later, or it waited for a range lock), it was in the task set that function
    /// cleared and ends without starting: TASK ABORTED, or no status under TAS=0
    /// ([`LogicalUnit::aborted_before_start`]). Checked under the
    /// lock that enters it in the task set, which the function holds while it aborts.
    fn execute_since(
        &self,
        nexus: NexusId,
        cdb: &[u8],
        data_out: Bytes,
        arrived: Option<Instant>,
    ) -> (Sequenced, Option<u32>) {
        let mut lu = self.lu();
        let spdtl = lu.data_out_len(cdb).and_then(|n| u32::try_from(n).ok());
        if arrived.is_some_and(|a| lu.arrived_before_abort(a)) {
            let end = lu.aborted_before_start(nexus);
            return (self.sequenced(Step::Done(end)), spdtl);
        }
        (self.sequenced(lu.execute(nexus, cdb, data_out)), spdtl)
    }

    /// Resume `cont` under the LU lock, then wake a waiting PREEMPT AND ABORT.
    fn resume(&self, nexus: NexusId, cont: Continuation, result: IoResult) -> Sequenced {
        let step = {
            let mut lu = self.lu();
            let step = lu.resume(nexus, cont, result);
            self.sequenced(step)
        };
        self.wake_drain_waiters();
        step
    }

    /// Number `step` if it is a [`Step::PrCommit`] with a [`Persist`], in the order the LU
    /// made its state changes. Call with the LU lock held, right after `execute`/`resume`.
    fn sequenced(&self, step: Step) -> Sequenced {
        let seq = match &step {
            Step::PrCommit(PrCommit {
                persist: Some(_), ..
            }) => self
                .persist_seq
                .fetch_add(1, Ordering::Relaxed)
                .wrapping_add(1),
            _ => 0,
        };
        Sequenced { step, seq }
    }

    /// Forget `cont` (its task will not resume it), then wake a waiting PREEMPT AND ABORT.
    fn abandon(&self, cont: Continuation) {
        self.lu().abandon(cont);
        self.wake_drain_waiters();
    }

    fn wake_drain_waiters(&self) {
        // Pairs with the increment in `wait_drained`: that happens before the waiter checks
        // `abort_drained` under the LU lock, and our resume/abandon took the same lock, so
        // either the waiter saw our change or we see its count here.
        if self.drain_waiters.load(Ordering::SeqCst) > 0 {
            self.drained.notify_waiters();
        }
    }

    /// Wait until every task aborted under `ticket` has drained (SPC-4 §5.13.11.2.6: no write
    /// of a preempted nexus may land after the PREEMPT AND ABORT completes). The wake-up is
    /// registered before the check, so one that comes between the two is not lost.
    pub(crate) async fn wait_drained(&self, ticket: lu::AbortTicket) {
        self.wait_until(|lu| lu.abort_drained(ticket)).await;
    }

    /// Wait until `done` holds for the LU, checked under the LU lock after every resume or
    /// abandon (the same wake-up as [`LunHandle::wait_drained`]).
    pub(crate) async fn wait_until(&self, done: impl Fn(&LogicalUnit) -> bool) {
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        self.drain_waiters.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(&self.drain_waiters);
        loop {
            let notified = self.drained.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            if done(&self.lu()) {
                return;
            }
            notified.await;
        }
    }

    /// Carry out a PR OUT's [`Persist`] on the blocking pool: the state file is written
    /// durably (temp file, fsync, rename, fsync of the directory) or removed durably.
    async fn persist(self: &Arc<Self>, seq: u64, what: Persist) -> Result<(), String> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.persist_now(seq, &what))
            .await
            .unwrap_or_else(|e| Err(format!("state file writer failed: {e}")))
    }

    /// [`LunHandle::persist`] on the calling (blocking) thread: the state change numbered
    /// `seq` ([`LunHandle::sequenced`]) is made durable unless a later one already is.
    fn persist_now(&self, seq: u64, what: &Persist) -> Result<(), String> {
        let mut last = self
            .persisted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *last > seq {
            // A later state change is already durable; it includes this one's effects.
            return Ok(());
        }
        let r = match what {
            Persist::Write(bytes) => write_durably(&self.state_file, bytes),
            Persist::Remove => remove_durably(&self.state_file),
        };
        if r.is_ok() {
            *last = seq;
        }
        r.map_err(|e| format!("{}: {e}", self.state_file.display()))
    }

    /// Change the LU's `persist_reservations` (live reconfiguration; blocks on the state file,
    /// so call it off the async workers). When the change decides differently whether the PR
    /// state survives a restart, the state file is rewritten (or removed) durably before this
    /// returns; if that fails the LU keeps its old mode. `Ok(false)`: the mode was already `p`.
    pub(crate) fn set_pr_persistence(&self, p: PrPersistence) -> Result<bool, String> {
        let (old, numbered) = {
            let mut lu = self.lu();
            let old = lu.config().pr_persistence;
            if old == p {
                return Ok(false);
            }
            let numbered = lu.set_pr_persistence(p).map(|what| {
                let seq = self
                    .persist_seq
                    .fetch_add(1, Ordering::Relaxed)
                    .wrapping_add(1);
                (seq, what)
            });
            (old, numbered)
        };
        if let Some((seq, what)) = numbered {
            if let Err(e) = self.persist_now(seq, &what) {
                self.lu().set_pr_persistence(old);
                return Err(e);
            }
        }
        Ok(true)
    }

    /// Counts LUN RESETs, target resets and CLEAR TASK SETs that reached this LU
    /// ([`LogicalUnit::abort_epoch`]).
    pub fn abort_epoch(&self) -> u64 {
        self.lu().abort_epoch()
    }

    pub(crate) fn lu(&self) -> LuGuard<'_> {
        // A poisoned lock means a panic elsewhere; the LU state itself is still consistent
        // (each mutation is a single call), so keep serving.
        LuGuard {
            lu: self
                .lu
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            unblocked: &self.unblocked,
        }
    }

    /// Proceed with `cont` (it got [`Step::Wait`]) under the LU lock, then wake a waiting
    /// PREEMPT AND ABORT or task management function (it may have ended TASK ABORTED).
    fn proceed(&self, nexus: NexusId, cont: Continuation) -> Sequenced {
        let step = {
            let mut lu = self.lu();
            let step = lu.proceed(nexus, cont);
            self.sequenced(step)
        };
        self.wake_drain_waiters();
        step
    }

    /// Wait for the turn of a task that got [`Step::Wait`] (a COMPARE AND WRITE's range lock,
    /// SBC-3 §5.2), then its next step: its I/O, or TASK ABORTED if task management aborted
    /// it meanwhile. Woken through [`LuGuard`]; the wake-up is registered before each try,
    /// so one between the try and the wait is not lost. Dropped while waiting, the task is
    /// abandoned (session loss, shutdown), and what waited behind it is woken.
    async fn wait_turn(&self, nexus: NexusId, cont: Continuation) -> Sequenced {
        let mut task = Task::new(self, nexus, cont);
        loop {
            let notified = self.unblocked.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            let Some(cont) = task.cont.take() else {
                let d_sense = self.lu().d_sense();
                return Sequenced {
                    step: Step::Done(lu::Completion::check_condition(
                        SenseReason::InternalTargetFailure,
                        d_sense,
                    )),
                    seq: 0,
                };
            };
            let step = self.proceed(nexus, cont);
            match step.step {
                Step::Wait(cont) => {
                    task.cont = Some(cont);
                    notified.await;
                }
                other => {
                    return Sequenced {
                        step: other,
                        seq: step.seq,
                    }
                }
            }
        }
    }
}

impl LunHandle {
    /// One I/O of an EXTENDED COPY chunk on this LU for `nexus` ([`xcopy`]), under the
    /// LU's range lock ([`LogicalUnit::copy_io`]): it waits while it overlaps a COMPARE AND
    /// WRITE of this LU, runs off the runtime's workers, and leaves the task set once it has
    /// run (also when this future is dropped meanwhile). `None`: task management aborted it
    /// before it started.
    pub(crate) async fn copy_io(self: &Arc<Self>, nexus: NexusId, op: IoOp) -> Option<IoResult> {
        let step = self.lu().copy_io(nexus, op);
        let step = match step {
            Step::Wait(cont) => self.wait_turn(nexus, cont).await.step,
            other => other,
        };
        let Step::Io(op, cont) = step else {
            return None;
        };
        // Abandoned when dropped: after the I/O (the LU wants no result from a chunk).
        let task = Task::new(self.clone(), nexus, cont);
        if self.async_io {
            let result = self.perform_async(op).await;
            drop(task);
            return Some(result);
        }
        tokio::task::spawn_blocking(move || {
            let result = task.handle.perform(&op);
            drop(task);
            result
        })
        .await
        .ok()
    }
}

/// The LU lock. Released, it wakes the tasks waiting for a COMPARE AND WRITE's range lock
/// when the LU says one may go on ([`LogicalUnit::take_wakeup`]: a task ended or was aborted
/// while others waited), whatever the call was: a resume, an abandon, a task management
/// function, a PREEMPT AND ABORT, a handover abort. One load of a flag otherwise.
pub(crate) struct LuGuard<'a> {
    lu: MutexGuard<'a, LogicalUnit>,
    unblocked: &'a tokio::sync::Notify,
}

impl std::ops::Deref for LuGuard<'_> {
    type Target = LogicalUnit;
    fn deref(&self) -> &LogicalUnit {
        &self.lu
    }
}

impl std::ops::DerefMut for LuGuard<'_> {
    fn deref_mut(&mut self) -> &mut LogicalUnit {
        &mut self.lu
    }
}

impl Drop for LuGuard<'_> {
    fn drop(&mut self) {
        // Under the lock: a waiter registers before it locks to try, so it cannot miss this.
        if self.lu.take_wakeup() {
            self.unblocked.notify_waiters();
        }
    }
}

/// LUN number → logical unit.
pub type LunMap = BTreeMap<u64, Arc<LunHandle>>;

/// One target: its name and LUNs.
///
/// The LUN set can change while sessions run ([`crate::reconfig`]): it is swapped whole under
/// a lock, and `epoch` counts the swaps, so a [`Nexus`] notices a change with one atomic load
/// per command and rebuilds its view only then.
pub struct TargetState {
    pub name: String,
    pub alias: Option<String>,
    luns: std::sync::RwLock<Arc<LunMap>>,
    /// Bumped after every change of `luns` or `masking`.
    epoch: AtomicU64,
    /// Which of `luns` each initiator sees.
    masking: std::sync::RwLock<LunMasking>,
    /// Who may send TARGET WARM/COLD RESET (`allow_target_reset`).
    reset_policy: std::sync::RwLock<config::TargetResetPolicy>,
}

impl TargetState {
    pub fn new(name: String, alias: Option<String>, luns: LunMap, masking: LunMasking) -> Self {
        TargetState {
            name,
            alias,
            luns: std::sync::RwLock::new(Arc::new(luns)),
            epoch: AtomicU64::new(0),
            masking: std::sync::RwLock::new(masking),
            reset_policy: std::sync::RwLock::new(config::TargetResetPolicy::default()),
        }
    }

    /// The same target with `allow_target_reset` = `policy`.
    pub fn with_reset_policy(self, policy: config::TargetResetPolicy) -> Self {
        self.set_reset_policy(policy);
        self
    }

    /// Who may reset the target now (`allow_target_reset`).
    pub fn reset_policy(&self) -> config::TargetResetPolicy {
        *self
            .reset_policy
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Replace `allow_target_reset`; sessions that log in afterwards are decided by it
    /// ([`Nexus::may_reset_target`]).
    pub(crate) fn set_reset_policy(&self, policy: config::TargetResetPolicy) {
        *self
            .reset_policy
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = policy;
    }

    /// The LUN masking now.
    pub fn masking(&self) -> LunMasking {
        self.masking
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Replace the LUN masking; sessions pick it up at their next command.
    pub(crate) fn set_masking(&self, masking: LunMasking) {
        *self
            .masking
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = masking;
        self.epoch.fetch_add(1, Ordering::Release);
    }

    /// The LUNs now.
    pub fn luns(&self) -> Arc<LunMap> {
        self.luns
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Replace the LUN set; sessions pick it up at their next command.
    pub(crate) fn set_luns(&self, luns: LunMap) {
        *self
            .luns
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(luns);
        self.epoch.fetch_add(1, Ordering::Release);
    }
}

/// Everything the daemon serves.
pub struct Registry {
    /// Swapped whole when targets are added or removed while running ([`crate::reconfig`]).
    targets: std::sync::RwLock<Arc<Vec<Arc<TargetState>>>>,
    /// PR OUT, ownership and handover events of every LU (the admin API's `/v1/events`).
    pub events: Arc<EventLog>,
    /// ALUA target port groups (SPC-4 §5.16), the same for every LU; changed through
    /// [`Registry::set_port_group_state`].
    port_groups: Mutex<ironlun_scsi::alua::PortGroups>,
    next_nexus: AtomicU64,
    next_tsih: AtomicU16,
    /// Cluster mode: this gateway's place in the cluster ([`cluster::attach`]).
    pub(crate) cluster: std::sync::OnceLock<Arc<cluster::Cluster>>,
}

impl Registry {
    /// Open every LUN's backend and build its logical unit, restoring the APTPL state of those
    /// that have a state file (SPC-4 §5.13.5.1). A state file that cannot be read, is corrupt
    /// or belongs to another LU refuses the start with a message naming the file.
    pub fn build(cfg: &Config) -> Result<Registry, String> {
        let pr_dir = cfg.data_dir.join(PR_DIR);
        let ports = relative_ports(cfg);
        let port_groups = ironlun_scsi::alua::PortGroups::new(cfg.port_groups.clone(), &ports);
        let mut state_files: BTreeMap<PathBuf, (String, u64)> = BTreeMap::new();
        let mut targets = Vec::new();
        let events = Arc::new(EventLog::new(EVENT_CAPACITY));
        for t in &cfg.targets {
            let mut luns = BTreeMap::new();
            for l in &t.luns {
                let state_file = pr_dir.join(state_file_name(&l.serial));
                if let Some((other, id)) =
                    state_files.insert(state_file.clone(), (t.name.clone(), l.id))
                {
                    return Err(format!(
                        "{} LUN {} and {other} LUN {id} have the same serial {:?}: their persistent reservation state would share {}",
                        t.name,
                        l.id,
                        l.serial,
                        state_file.display()
                    ));
                }
                let handle = open_lun(
                    &t.name,
                    l,
                    &ports,
                    &port_groups,
                    state_file,
                    &events,
                    cfg.cluster.is_some(),
                )?;
                luns.insert(l.id, Arc::new(handle));
            }
            targets.push(Arc::new(
                TargetState::new(t.name.clone(), t.alias.clone(), luns, t.masking.clone())
                    .with_reset_policy(t.allow_target_reset),
            ));
        }
        Ok(Registry {
            targets: std::sync::RwLock::new(Arc::new(targets)),
            events,
            port_groups: Mutex::new(port_groups),
            next_nexus: AtomicU64::new(1),
            next_tsih: AtomicU16::new(1),
            cluster: std::sync::OnceLock::new(),
        })
    }

    /// Open LUN `l` of target `target` as [`Registry::build`] does (for a LUN added while
    /// running): its backend, its LU with the daemon's ports and current port group states,
    /// its APTPL state if a state file exists.
    pub fn open_lun(
        &self,
        cfg: &Config,
        target: &str,
        l: &config::Lun,
    ) -> Result<LunHandle, String> {
        let state_file = cfg.data_dir.join(PR_DIR).join(state_file_name(&l.serial));
        open_lun(
            target,
            l,
            &relative_ports(cfg),
            &self.port_groups(),
            state_file,
            &self.events,
            cfg.cluster.is_some(),
        )
    }

    /// The targets now.
    pub fn targets(&self) -> Arc<Vec<Arc<TargetState>>> {
        self.targets
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Replace the target set: new logins find the new set; running sessions keep theirs.
    pub(crate) fn set_targets(&self, targets: Vec<Arc<TargetState>>) {
        *self
            .targets
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(targets);
    }

    /// Open target `t` of `cfg` with its LUNs, as [`Registry::build`] does.
    pub fn open_target(&self, cfg: &Config, t: &config::Target) -> Result<TargetState, String> {
        let mut luns = BTreeMap::new();
        for l in &t.luns {
            luns.insert(l.id, Arc::new(self.open_lun(cfg, &t.name, l)?));
        }
        Ok(
            TargetState::new(t.name.clone(), t.alias.clone(), luns, t.masking.clone())
                .with_reset_policy(t.allow_target_reset),
        )
    }

    pub fn target(&self, name: &str) -> Option<Arc<TargetState>> {
        self.targets()
            .iter()
            .find(|t| t.name.eq_ignore_ascii_case(name))
            .cloned()
    }

    /// The target port groups and their current states.
    pub fn port_groups(&self) -> ironlun_scsi::alua::PortGroups {
        self.port_groups
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Set target port group `id` to `state` on every LU of every target (implicit ALUA:
    /// each raises 2Ah/06h on its nexuses when the state changes). `Ok(true)` when it changed.
    pub fn set_port_group_state(
        &self,
        id: u16,
        state: ironlun_scsi::alua::AccessState,
    ) -> Result<bool, ironlun_scsi::alua::AluaError> {
        let mut groups = self
            .port_groups
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let changed = groups.set_state(id, state)?;
        for t in self.targets().iter() {
            for l in t.luns().values() {
                l.lu().set_port_group_state(id, state)?;
            }
        }
        if changed {
            tracing::info!(
                group = id,
                state = state.name(),
                "target port group state changed"
            );
        }
        Ok(changed)
    }

    /// A fresh I_T nexus id.
    pub fn new_nexus(&self) -> NexusId {
        self.next_nexus.fetch_add(1, Ordering::Relaxed)
    }

    /// A non-zero TSIH (RFC 7143 §11.12.6), unique among live sessions in practice (wraps at 65535).
    pub fn new_tsih(&self) -> u16 {
        loop {
            let t = self.next_tsih.fetch_add(1, Ordering::Relaxed);
            if t != 0 {
                return t;
            }
        }
    }

    /// Flush every backend (graceful shutdown).
    pub fn flush_all(&self) {
        for t in self.targets().iter() {
            for (id, l) in t.luns().iter() {
                if let Err(e) = l.backend.flush() {
                    tracing::error!(target = %t.name, lun = id, error = %e, "flush at shutdown failed");
                }
            }
        }
    }
}

/// Open one LUN: backend, logical unit, APTPL state (see [`Registry::build`]).
fn open_lun(
    target: &str,
    l: &config::Lun,
    ports: &[u16],
    port_groups: &ironlun_scsi::alua::PortGroups,
    state_file: PathBuf,
    events: &Arc<EventLog>,
    replicated: bool,
) -> Result<LunHandle, String> {
    let backend = backend::open(l)?;
    // One node is the medium's only writer: take the storage fence now (RBD's exclusive
    // lock). In cluster mode the gateway that becomes active for the LU takes it
    // (target::cluster::alua).
    if !replicated {
        backend
            .take_exclusive()
            .map_err(|e| format!("{target} LUN {}: {e}", l.id))?;
    }
    let num_blocks = backend.size() / u64::from(l.block_size);
    let mut lc = lu_config(target, l, num_blocks, ports, backend.thin_provisioning());
    lc.port_groups = port_groups.clone();
    // Cluster mode: the state lives in etcd, always persistent (README "Cluster mode").
    lc.replicated = replicated;
    let mut lu = LogicalUnit::new(lc);
    lu.set_offline(l.offline);
    if !replicated && restore_state(&mut lu, &state_file)? {
        tracing::info!(
            target,
            lun = l.id,
            file = %state_file.display(),
            persist_reservations = l.persist_reservations.name(),
            aptpl = lu.pr_snapshot().aptpl,
            "persistent reservations restored"
        );
    }
    tracing::info!(
        target,
        lun = l.id,
        blocks = num_blocks,
        block_size = l.block_size,
        "LUN ready"
    );
    let ram = matches!(l.backstore, config::BackstoreKind::Ram);
    let mut handle = LunHandle::new(lu, backend, ram, state_file)
        .with_events(format!("{target}/{}", l.id), events.clone());
    handle.sanitize_rate = l.sanitize_rate;
    Ok(handle)
}

/// Subdirectory of the data directory that holds the APTPL state files.
const PR_DIR: &str = "pr";

/// The relative target port identifiers of every target: the sorted, distinct portal group
/// tags of the portals (each target is served on every portal; RFC 7143 §4.4.1, SPC-4 §3.1.124);
/// in cluster mode every gateway's (scale-out.md §2.2).
fn relative_ports(cfg: &Config) -> Vec<u16> {
    if let Some(c) = &cfg.cluster {
        return c.cluster_ports();
    }
    cfg.portals
        .iter()
        .map(|p| p.tpgt)
        .collect::<BTreeSet<u16>>()
        .into_iter()
        .collect()
}

/// The LU's configuration; thin provisioning is reported only where the config allows it and
/// the backstore can deallocate (`thin`).
fn lu_config(
    target: &str,
    l: &config::Lun,
    num_blocks: u64,
    ports: &[u16],
    thin: bool,
) -> LuConfig {
    let mut c = LuConfig::new(l.id, l.block_size, num_blocks, target);
    c.serial = l.serial.clone();
    c.naa = l.naa;
    c.thin = l.thin && thin;
    c.read_only = l.read_only;
    c.write_cache = l.write_cache;
    c.physical_block_exponent = l.physical_block_exponent;
    if let Some(first) = ports.first() {
        c.relative_port = *first;
        c.relative_ports = ports.to_vec();
    }
    // The daemon always has a data directory to keep the state in.
    c.ptpl_capable = true;
    c.pr_persistence = l.persist_reservations;
    c
}

/// `aptpl_<serial>`, with every byte outside `[A-Za-z0-9._-]` as `%XX`, so that a configured
/// serial (any ASCII) cannot name another path.
fn state_file_name(serial: &str) -> String {
    use std::fmt::Write;
    let mut name = String::from("aptpl_");
    for b in serial.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-') {
            name.push(char::from(b));
        } else {
            let _ = write!(name, "%{b:02X}");
        }
    }
    name
}

/// `path` with `.tmp` appended (the temp file of a durable write).
fn tmp_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".tmp");
    PathBuf::from(p)
}

/// Load `path` into `lu` if it exists; a leftover temp file (a write interrupted before its
/// rename, so never the durable state) is removed. `Ok(true)` when state was restored. A file
/// that holds registrations made without APTPL (written under `persist_reservations =
/// "always"`) restored by an LU that persists only with APTPL loses them (SPC-4 §5.13.5.1),
/// and the file is rewritten at once, so that they do not come back later.
fn restore_state(lu: &mut LogicalUnit, path: &Path) -> Result<bool, String> {
    let tmp = tmp_path(path);
    match std::fs::remove_file(&tmp) {
        Ok(()) => tracing::warn!(file = %tmp.display(), "removed an unfinished PR state file"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("{}: {e}", tmp.display())),
    }
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => {
            return Err(format!(
                "persistent reservation state {}: {e}",
                path.display()
            ))
        }
    };
    let trimmed = lu
        .restore_pr(&bytes)
        .map_err(|e| format!("persistent reservation state {}: {e}", path.display()))?;
    if trimmed {
        tracing::info!(file = %path.display(), "persistent reservations registered without APTPL dropped: persist_reservations is \"aptpl\"");
        let r = match lu.pr_state_file() {
            Some(Persist::Write(b)) => write_durably(path, &b),
            Some(Persist::Remove) => remove_durably(path),
            None => Ok(()),
        };
        r.map_err(|e| format!("persistent reservation state {}: {e}", path.display()))?;
    }
    Ok(true)
}

/// Write `bytes` as `path` so that after a crash the file holds either the old or the new
/// content: temp file, fsync, rename, fsync of the directory (DESIGN.md §3 rule 10).
pub(crate) fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().ok_or(std::io::ErrorKind::InvalidInput)?;
    std::fs::create_dir_all(dir)?;
    let tmp = tmp_path(path);
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    sync_dir(dir)
}

/// Remove `path` (absent is fine) and make the removal durable.
fn remove_durably(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    match path.parent() {
        Some(dir) => match sync_dir(dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            r => r,
        },
        None => Ok(()),
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// A session's view of its target (one I_T nexus).
pub struct Nexus {
    pub id: NexusId,
    pub target: Arc<TargetState>,
    /// The LUNs this nexus sees (LUN masking): the others behave as nonexistent (SPC-4
    /// §4.6.1: REPORT LUNS omits them, INQUIRY reports peripheral qualifier 011b, other
    /// commands fail with LOGICAL UNIT NOT SUPPORTED, TMFs with LUN DOES NOT EXIST).
    /// Follows the target's LUN set: rebuilt when `seen` falls behind the target's epoch.
    luns: std::sync::RwLock<Arc<LunMap>>,
    /// The target epoch `luns` was built from.
    seen: AtomicU64,
    /// The I_T nexus, registered on every LU of `luns`.
    it: ItNexus,
    /// The initiator name for LUN masking; `None`: sees every LUN.
    initiator: Option<String>,
    /// The session's command counts ([`crate::metrics`]).
    metrics: Arc<crate::metrics::SessionMetrics>,
    /// The session authenticated with CHAP at login (for `allow_target_reset`).
    chap: bool,
}

impl Nexus {
    /// A nexus `it` that sees every LUN of `target`.
    pub fn attach(target: Arc<TargetState>, id: NexusId, it: ItNexus) -> Nexus {
        Self::attach_luns(target, id, it, None)
    }

    /// The LUNs of `target` that `initiator` sees (all when `None`).
    fn view_of(target: &TargetState, initiator: Option<&str>) -> LunMap {
        let all = target.luns();
        let masking = target.masking();
        match initiator.and_then(|i| masking.visible(i)) {
            None => (*all).clone(),
            Some(ids) => ids
                .iter()
                .filter_map(|id| Some((*id, all.get(id)?.clone())))
                .collect(),
        }
    }

    /// The current LUN view, rebuilt first if the target's LUN set changed since: LUs new to
    /// the view get this nexus registered, LUs that left it have it removed. Commands already
    /// started on a removed LU keep their handle and finish.
    fn view(&self) -> std::sync::RwLockReadGuard<'_, Arc<LunMap>> {
        let epoch = self.target.epoch.load(Ordering::Acquire);
        if self.seen.load(Ordering::Acquire) != epoch {
            let mut cur = self
                .luns
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            // Another command of this session may have rebuilt it meanwhile.
            let epoch = self.target.epoch.load(Ordering::Acquire);
            if self.seen.load(Ordering::Acquire) != epoch {
                let new = Self::view_of(&self.target, self.initiator.as_deref());
                for (id, l) in &new {
                    if !cur.get(id).is_some_and(|o| Arc::ptr_eq(o, l)) {
                        l.lu().add_nexus(self.id, self.it.clone());
                    }
                }
                for (id, l) in cur.iter() {
                    if !new.get(id).is_some_and(|n| Arc::ptr_eq(n, l)) {
                        l.lu().remove_nexus(self.id);
                    }
                }
                *cur = Arc::new(new);
                self.seen.store(epoch, Ordering::Release);
            }
        }
        self.luns
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The nexus of a session that logged in as `initiator` with `isid` through a portal of
    /// portal group `tpgt`, seeing the LUNs its target's masking grants it. Its persistent
    /// reservation identity is the initiator port `initiator,i,0x<isid>` and the relative
    /// target port `tpgt` (SPC-4 §7.6.4.6, RFC 7143 §4.4.1).
    pub fn attach_for(
        target: Arc<TargetState>,
        id: NexusId,
        initiator: &str,
        isid: [u8; 6],
        tpgt: u16,
    ) -> Nexus {
        if target.masking().visible(initiator).is_some() {
            tracing::debug!(initiator, target = %target.name, "LUN masking applies");
        }
        let it = ItNexus {
            initiator: InitiatorPort::new(initiator, isid),
            rtpi: tpgt,
        };
        Self::attach_luns(target, id, it, Some(initiator.to_string()))
    }

    fn attach_luns(
        target: Arc<TargetState>,
        id: NexusId,
        it: ItNexus,
        initiator: Option<String>,
    ) -> Nexus {
        // Read the epoch before the LUN set: a change in between is picked up again later.
        let seen = target.epoch.load(Ordering::Acquire);
        let luns = Self::view_of(&target, initiator.as_deref());
        for l in luns.values() {
            l.lu().add_nexus(id, it.clone());
        }
        Nexus {
            id,
            target,
            luns: std::sync::RwLock::new(Arc::new(luns)),
            seen: AtomicU64::new(seen),
            it,
            initiator,
            metrics: crate::metrics::SessionMetrics::unlisted(),
            chap: false,
        }
    }

    /// Record that the session authenticated with CHAP at login (RFC 7143 §12.1.3).
    pub fn with_chap(mut self, chap: bool) -> Self {
        self.chap = chap;
        self
    }

    /// Whether this session may send TARGET WARM RESET and TARGET COLD RESET: the target's
    /// `allow_target_reset` ([`config::TargetResetPolicy`]) applied to how the session
    /// authenticated. A refused request is answered "Function authorization failed" (RFC 7143
    /// §11.6.1, response 6).
    pub fn may_reset_target(&self) -> bool {
        self.target.reset_policy().allows(self.chap)
    }

    /// Count this nexus's commands in `m` (a listed session's metrics).
    pub fn with_metrics(mut self, m: Arc<crate::metrics::SessionMetrics>) -> Self {
        self.metrics = m;
        self
    }

    /// The LUNs this nexus sees, in order.
    pub fn visible_luns(&self) -> Vec<u64> {
        self.view().keys().copied().collect()
    }

    /// Run one SCSI command to completion. Returns the completion and, for commands with
    /// Data-Out, the byte count the CDB asked for (for write residuals).
    pub async fn execute(
        &self,
        lun_raw: u64,
        cdb: Bytes,
        data_out: Bytes,
    ) -> (ScsiCompletion, Option<u32>) {
        match self.start(lun_raw, cdb, data_out) {
            Started::Done(c, spdtl) => (c, spdtl),
            Started::Pending(p) => p.finish().await,
        }
    }

    /// Run one SCSI command as far as it goes without waiting: the SCSI decision and any I/O
    /// that [`runs_inline`]. A command that needs the blocking pool comes back as
    /// [`Started::Pending`], to be finished on a task of its own.
    /// Counted in the session's and the LU's metrics (REPORT LUNS and commands to a LUN the
    /// nexus does not see: the session's only), see [`crate::metrics`].
    pub fn start(&self, lun_raw: u64, cdb: Bytes, data_out: Bytes) -> Started {
        self.start_at(lun_raw, cdb, data_out, None)
    }

    /// [`Nexus::start`] for a command whose header arrived at `arrived`: if a LUN RESET,
    /// target reset or CLEAR TASK SET arrived after it (on any connection) and was carried
    /// out before the command could start, it ends without starting (TASK ABORTED, or no
    /// status under TAS=0).
    pub fn start_at(
        &self,
        lun_raw: u64,
        cdb: Bytes,
        data_out: Bytes,
        arrived: Option<Instant>,
    ) -> Started {
        let view = self.view();
        use crate::metrics::Probe;
        let session = &self.metrics;
        if cdb.first() == Some(&ironlun_scsi::cdb::op::REPORT_LUNS) {
            // It clears REPORTED LUNS DATA HAS CHANGED on every LU of the nexus (SPC-4 §6.33).
            for l in view.values() {
                l.lu().report_luns_seen(self.id);
            }
            let probe = Probe::begin(None, session, &cdb, data_out.len());
            let luns: Vec<u64> = view.keys().copied().collect();
            let c = to_wire(lu::report_luns(&cdb, &luns));
            probe.end(None, session, &c);
            return Started::Done(c, None);
        }
        let Some(handle) = ironlun_scsi::lun::decode(lun_raw).and_then(|l| view.get(&l)) else {
            let probe = Probe::begin(None, session, &cdb, data_out.len());
            let c = to_wire(lu::no_such_lun(&cdb));
            probe.end(None, session, &c);
            return Started::Done(c, None);
        };
        let probe = Probe::begin(Some(&handle.metrics), session, &cdb, data_out.len());
        let started = self.start_on(handle, &view, cdb, data_out, arrived);
        match started {
            Started::Done(c, spdtl) => {
                probe.end(Some(&handle.metrics), session, &c);
                Started::Done(c, spdtl)
            }
            Started::Pending(mut p) => {
                p.probe = Some(probe.pending(Some(&handle.metrics), session));
                Started::Pending(p)
            }
        }
    }

    /// [`Nexus::start`] on the LU `handle` of the LUN view `view`, not counted.
    fn start_on(
        &self,
        handle: &Arc<LunHandle>,
        view: &LunMap,
        cdb: Bytes,
        data_out: Bytes,
        arrived: Option<Instant>,
    ) -> Started {
        let nexus = self.id;
        if handle.awaits_handover(self.it.initiator.name(), &cdb) {
            return Started::Pending(PendingCommand {
                probe: None,
                spdtl: None,
                next: Next::Handover {
                    handle: handle.clone(),
                    nexus,
                    cdb,
                    data_out,
                    arrived,
                    luns: view.clone(),
                },
            });
        }
        let (step, spdtl) = handle.execute_since(nexus, &cdb, data_out, arrived);
        match split_copy(step) {
            Split::Copy(job, cont) => Started::Pending(PendingCommand {
                probe: None,
                spdtl,
                next: Next::Copy {
                    job,
                    task: Task::new(handle.clone(), nexus, cont),
                    luns: view.clone(),
                },
            }),
            Split::Other(step) => drive_inline(handle, nexus, step, spdtl),
        }
    }

    /// Carry out a task management function's SCSI effects (SAM-5 §7); the connection has
    /// already dropped the affected tasks' responses. The response goes out only after
    /// [`TmfOutcome::drained`]: every task the function aborted, of any nexus, has finished
    /// its backstore I/O. (ABORT TASK's one task is the connection's to wait for.)
    ///
    /// `arrived`: when the request was received; commands that arrived earlier and have not
    /// started yet end when they try (LUN RESET, CLEAR TASK SET, target resets): TASK ABORTED,
    /// or without status for other sessions under TAS=0 (SAM-5 §5.6).
    pub fn task_mgmt(
        &self,
        function: TmfFunction,
        lun_raw: u64,
        arrived: Option<Instant>,
    ) -> TmfOutcome {
        let view = self.view();
        let lun = ironlun_scsi::lun::decode(lun_raw).and_then(|l| view.get(&l));
        let mut out = TmfOutcome::now(TmfResponse::FunctionComplete);
        match function {
            TmfFunction::AbortTaskSet
            | TmfFunction::ClearTaskSet
            | TmfFunction::LogicalUnitReset => {
                let Some(l) = lun else {
                    return TmfOutcome::now(TmfResponse::LunDoesNotExist);
                };
                let mut lu = l.lu();
                let ticket = match function {
                    TmfFunction::AbortTaskSet => lu.abort_task_set(self.id),
                    // Also stops copies of other nexuses touching this LU (crate::target::xcopy).
                    TmfFunction::ClearTaskSet => lu.clear_task_set(self.id),
                    _ => lu.reset(self.id, ResetKind::LogicalUnit),
                };
                if let (Some(at), false) = (arrived, function == TmfFunction::AbortTaskSet) {
                    lu.set_aborted_at(at);
                }
                drop(lu);
                out.drains.extend(ticket.map(|t| (l.clone(), t)));
                out
            }
            TmfFunction::AbortTask => {
                if lun.is_some() {
                    out
                } else {
                    TmfOutcome::now(TmfResponse::LunDoesNotExist)
                }
            }
            TmfFunction::TargetWarmReset | TmfFunction::TargetColdReset => {
                // The connection already refuses an unauthorized session
                // (`Connection::set_target_reset_allowed`); checked again here so that no
                // other caller resets a target without the policy's consent.
                if !self.may_reset_target() {
                    return TmfOutcome::now(TmfResponse::AuthorizationFailed);
                }
                let kind = if function == TmfFunction::TargetWarmReset {
                    ResetKind::TargetWarm
                } else {
                    ResetKind::TargetCold
                };
                // SAM-5 §6.3: a target reset resets every LU of the SCSI target device, also
                // those LUN masking hides from this initiator. Each LU aborts its copies and
                // raises 29h/02h (warm) or 29h/01h (cold) for every I_T nexus. For a cold reset
                // the daemon then drops every session of the target (RFC 7143 §11.5.1, see
                // `crate::server`).
                tracing::info!(
                    target = %self.target.name,
                    initiator = self.initiator.as_deref().unwrap_or(""),
                    ?function,
                    "target reset"
                );
                for l in self.target.luns().values() {
                    let mut lu = l.lu();
                    let ticket = lu.reset(self.id, kind);
                    if let Some(at) = arrived {
                        lu.set_aborted_at(at);
                    }
                    drop(lu);
                    out.drains.extend(ticket.map(|t| (l.clone(), t)));
                }
                out
            }
            TmfFunction::TaskReassign => TmfOutcome::now(TmfResponse::ReassignmentNotSupported),
            TmfFunction::ClearAca | TmfFunction::Other(_) => {
                TmfOutcome::now(TmfResponse::FunctionNotSupported)
            }
        }
    }
}

/// A task management function's response and the aborted tasks it must wait for (SAM-5 §7:
/// the function completes once the tasks it aborted have ended, so that no aborted write
/// reaches the medium after the response).
#[must_use = "the response goes out only after `drained`"]
pub struct TmfOutcome {
    pub response: TmfResponse,
    drains: Vec<(Arc<LunHandle>, lu::AbortTicket)>,
}

impl TmfOutcome {
    pub fn now(response: TmfResponse) -> Self {
        TmfOutcome {
            response,
            drains: Vec::new(),
        }
    }

    /// No aborted task is still running: the response can go out at once.
    pub fn is_ready(&self) -> bool {
        self.drains.is_empty()
    }

    /// Wait until every aborted task has finished its backstore I/O; then the response.
    pub async fn drained(self) -> TmfResponse {
        for (handle, ticket) in &self.drains {
            handle.wait_drained(*ticket).await;
        }
        self.response
    }
}

impl Nexus {
    /// The I_T nexus is gone (session closed, logged out, dropped; SAM-5 §6.3.4): leave every
    /// LU, which releases what the nexus held there (an SPC-2 reservation, PREVENT, copy
    /// status). Idempotent; also run on drop. Call it before the Logout Response goes out, so
    /// that the initiator's next command on another session sees the loss.
    pub fn lose(&self) {
        let luns = self
            .luns
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        for l in luns.values() {
            l.lu().remove_nexus(self.id);
        }
    }
}

impl Drop for Nexus {
    fn drop(&mut self) {
        self.lose();
    }
}

/// A command after [`Nexus::start`].
pub enum Started {
    /// Finished: the completion and the CDB's Data-Out length (see [`Nexus::execute`]).
    Done(ScsiCompletion, Option<u32>),
    /// Waiting for an operation that runs on the blocking pool.
    Pending(PendingCommand),
}

/// A command that waits for something off the connection's task: an I/O on the blocking pool
/// (or an async backend), or a PR OUT's abort drain and state-file write.
pub struct PendingCommand {
    /// Ends the command's count at completion ([`crate::metrics`]).
    probe: Option<crate::metrics::PendingProbe>,
    spdtl: Option<u32>,
    next: Next,
}

/// What a [`PendingCommand`] waits for.
enum Next {
    /// Waiting for a COMPARE AND WRITE's range lock ([`Step::Wait`]).
    Wait(Task<Arc<LunHandle>>),
    Io(IoOp, Task<Arc<LunHandle>>),
    Commit {
        handle: Arc<LunHandle>,
        commit: PrCommit,
        /// Order of the state change (see [`LunHandle::persist`]).
        seq: u64,
    },
    /// A PERSISTENT RESERVE OUT decided through the cluster ([`Step::Replicate`]).
    Replicate {
        handle: Arc<LunHandle>,
        req: lu::Replicate,
    },
    /// A write of an armed handover's destination, not started yet: it starts once the
    /// handover is committed ([`LunHandle::handover_prepare`] with `commit_on_write`).
    Handover {
        handle: Arc<LunHandle>,
        nexus: NexusId,
        cdb: Bytes,
        data_out: Bytes,
        arrived: Option<Instant>,
        luns: LunMap,
    },
    /// An EXTENDED COPY over the LUs the nexus sees.
    Copy {
        job: Box<ironlun_scsi::xcopy::CopyJob>,
        task: Task<Arc<LunHandle>>,
        luns: BTreeMap<u64, Arc<LunHandle>>,
    },
}

/// A continuation the LU handed out, with what it takes to resume it. Dropped unresumed
/// (its task was cancelled, or a backend call panicked) it is abandoned, so a PREEMPT AND
/// ABORT waiting for it does not wait forever (see [`LogicalUnit::abandon`]).
struct Task<H: std::ops::Deref<Target = LunHandle>> {
    handle: H,
    nexus: NexusId,
    cont: Option<Continuation>,
}

impl<H: std::ops::Deref<Target = LunHandle>> Task<H> {
    fn new(handle: H, nexus: NexusId, cont: Continuation) -> Self {
        Task {
            handle,
            nexus,
            cont: Some(cont),
        }
    }

    /// Whether this is a SANITIZE step (see [`Continuation::is_sanitize`]).
    fn is_sanitize(&self) -> bool {
        self.cont.as_ref().is_some_and(Continuation::is_sanitize)
    }

    /// Resume with `result`; `None` only if already resumed (never: `resume` consumes).
    fn resume(mut self, result: IoResult) -> Option<Sequenced> {
        let cont = self.cont.take()?;
        Some(self.handle.resume(self.nexus, cont, result))
    }

    /// The continuation, no longer abandoned on drop; `None` only if already taken.
    fn take(mut self) -> Option<Continuation> {
        self.cont.take()
    }
}

impl<H: std::ops::Deref<Target = LunHandle>> Drop for Task<H> {
    fn drop(&mut self) {
        if let Some(cont) = self.cont.take() {
            self.handle.abandon(cont);
        }
    }
}

impl PendingCommand {
    /// Whether this is an EXTENDED COPY (which ABORT TASK stops by dropping its future).
    pub fn is_copy(&self) -> bool {
        matches!(self.next, Next::Copy { .. })
    }

    /// Whether this is a SANITIZE, which no task management function aborts or waits for
    /// (SBC-3 §4.32): it runs on after ABORT TASK and resets, the LU answering NOT READY.
    pub fn is_sanitize(&self) -> bool {
        matches!(&self.next, Next::Io(_, task) | Next::Wait(task) if task.is_sanitize())
    }

    /// Finish the command: run the pending operation on the blocking pool (or await the async
    /// backend), then the rest of the command (further cheap I/O inline, the rest on the pool
    /// again); or carry out a PR OUT's commit (see [`Step::PrCommit`]).
    pub async fn finish(mut self) -> (ScsiCompletion, Option<u32>) {
        let probe = self.probe.take();
        let done = self.run().await;
        if let Some(p) = probe {
            p.end(&done.0);
        }
        done
    }

    async fn run(self) -> (ScsiCompletion, Option<u32>) {
        let mut spdtl = self.spdtl;
        let mut next = self.next;
        loop {
            let (handle, nexus, step) = match next {
                Next::Handover {
                    handle,
                    nexus,
                    cdb,
                    data_out,
                    arrived,
                    luns,
                } => {
                    handle.commit_armed().await;
                    let (step, s) = handle.execute_since(nexus, &cdb, data_out, arrived);
                    spdtl = s;
                    match split_copy(step) {
                        Split::Copy(job, cont) => {
                            next = Next::Copy {
                                job,
                                task: Task::new(handle.clone(), nexus, cont),
                                luns,
                            };
                            continue;
                        }
                        Split::Other(step) => (handle, nexus, step),
                    }
                }
                Next::Wait(task) => {
                    let handle = task.handle.clone();
                    let nexus = task.nexus;
                    let step = match task.take() {
                        Some(cont) => handle.wait_turn(nexus, cont).await,
                        None => internal_error(&handle),
                    };
                    (handle, nexus, step)
                }
                Next::Io(op, task) => {
                    let handle = task.handle.clone();
                    let nexus = task.nexus;
                    // A SANITIZE runs at the LUN's pace; it is a task of its own that ends
                    // even when its session does (the LU answers NOT READY meanwhile).
                    if let Some(pause) = task
                        .is_sanitize()
                        .then(|| handle.sanitize_pace(&op))
                        .flatten()
                    {
                        tokio::time::sleep(pause).await;
                    }
                    let resumed = if handle.async_io {
                        let result = handle.perform_async(op).await;
                        task.resume(result)
                    } else {
                        // The task travels with the I/O: if this future is dropped, it is
                        // abandoned only once the I/O has run (or was never started).
                        tokio::task::spawn_blocking(move || {
                            let result = task.handle.perform(&op);
                            task.resume(result)
                        })
                        .await
                        .ok()
                        .flatten()
                    };
                    let step = match resumed {
                        Some(step) => step,
                        None => {
                            // The backend call panicked; its task was abandoned on unwind.
                            tracing::error!("backstore operation panicked");
                            internal_error(&handle)
                        }
                    };
                    (handle, nexus, step)
                }
                Next::Copy { job, task, luns } => {
                    let handle = task.handle.clone();
                    let nexus = task.nexus;
                    // Each chunk takes the range lock of its own LU ([`xcopy`]); the
                    // copy's own task holds no range, so it blocks no one meanwhile.
                    let outcome = crate::target::xcopy::run(&luns, nexus, &job).await;
                    let step = task
                        .resume(IoResult::Copy(outcome))
                        .unwrap_or_else(|| internal_error(&handle));
                    (handle, nexus, step)
                }
                Next::Replicate { handle, req } => {
                    let origin = lu::PrOrigin {
                        action: ironlun_scsi::pr::out_action_name(req.service_action),
                        initiator: req.it.initiator.to_string(),
                    };
                    let c = crate::target::cluster::prout(&handle, req).await;
                    if c.status == 0 {
                        handle.record_pr_out(true, Some(&origin));
                    }
                    return (to_wire(c), spdtl);
                }
                Next::Commit {
                    handle,
                    commit,
                    seq,
                } => {
                    let origin = commit.origin.clone();
                    let c = commit_pr(&handle, commit, seq).await;
                    handle.record_pr_out(c.status == 0, origin.as_ref());
                    return (to_wire(c), spdtl);
                }
            };
            match drive_inline(&handle, nexus, step, spdtl) {
                Started::Done(c, spdtl) => return (c, spdtl),
                Started::Pending(p) => next = p.next,
            }
        }
    }
}

/// Carry out a PR OUT's effects before its completion goes out (SPC-4 §5.13.11.2.6,
/// §5.13.5.1): wait for the aborted tasks to drain, then write or remove the state file.
async fn commit_pr(handle: &Arc<LunHandle>, commit: PrCommit, seq: u64) -> lu::Completion {
    let PrCommit {
        abort,
        persist,
        completion,
        origin: _,
    } = commit;
    if let Some(ticket) = abort {
        handle.wait_drained(ticket).await;
    }
    if let Some(what) = persist {
        if let Err(e) = handle.persist(seq, what).await {
            tracing::error!(error = %e, "cannot write the persistent reservation state; the PR OUT fails");
            return lu::Completion::persist_failed(handle.lu().d_sense());
        }
    }
    completion
}

/// An EXTENDED COPY spans the LUs the nexus sees ([`crate::target::xcopy`]), so it leaves the LU's
/// I/O path: its job and continuation, or the step unchanged.
fn split_copy(step: Sequenced) -> Split {
    match step.step {
        Step::Io(IoOp::ExtendedCopy(job), cont) => Split::Copy(job, cont),
        other => Split::Other(Sequenced {
            step: other,
            seq: step.seq,
        }),
    }
}

/// What [`split_copy`] found.
enum Split {
    Copy(Box<ironlun_scsi::xcopy::CopyJob>, Continuation),
    Other(Sequenced),
}

/// A step and, for a [`Step::PrCommit`] with a [`Persist`], the order number of its state
/// change (see [`LunHandle::sequenced`]); 0 otherwise.
struct Sequenced {
    step: Step,
    seq: u64,
}

/// CHECK CONDITION, INTERNAL TARGET FAILURE (a backend call panicked).
fn internal_error(handle: &LunHandle) -> Sequenced {
    let d_sense = handle.lu().d_sense();
    Sequenced {
        step: Step::Done(lu::Completion::check_condition(
            SenseReason::InternalTargetFailure,
            d_sense,
        )),
        seq: 0,
    }
}

/// Step a command through its inline I/O until it is done or must wait off the connection's
/// task (blocking-pool or async I/O, a COMPARE AND WRITE's range lock, or a PR OUT commit).
fn drive_inline(
    handle: &Arc<LunHandle>,
    nexus: NexusId,
    mut step: Sequenced,
    spdtl: Option<u32>,
) -> Started {
    loop {
        match step.step {
            Step::Done(c) => return Started::Done(to_wire(c), spdtl),
            Step::Io(op, cont)
                if !handle.async_io && runs_inline(&op, handle.ram) && !cont.is_sanitize() =>
            {
                // Borrowed: no reference count touched on the inline path.
                let task = Task::new(&**handle, nexus, cont);
                let result = handle.perform(&op);
                match task.resume(result) {
                    Some(s) => step = s,
                    None => {
                        let d_sense = handle.lu().d_sense();
                        let c = lu::Completion::check_condition(
                            SenseReason::InternalTargetFailure,
                            d_sense,
                        );
                        return Started::Done(to_wire(c), spdtl);
                    }
                }
            }
            Step::Io(op, cont) => {
                return Started::Pending(PendingCommand {
                    probe: None,
                    spdtl,
                    next: Next::Io(op, Task::new(handle.clone(), nexus, cont)),
                })
            }
            Step::Wait(cont) => {
                return Started::Pending(PendingCommand {
                    probe: None,
                    spdtl,
                    next: Next::Wait(Task::new(handle.clone(), nexus, cont)),
                })
            }
            Step::Replicate(req) => {
                return Started::Pending(PendingCommand {
                    probe: None,
                    spdtl,
                    next: Next::Replicate {
                        handle: handle.clone(),
                        req,
                    },
                });
            }
            Step::PrCommit(commit) => {
                return Started::Pending(PendingCommand {
                    probe: None,
                    spdtl,
                    next: Next::Commit {
                        handle: handle.clone(),
                        commit,
                        seq: step.seq,
                    },
                });
            }
        }
    }
}
fn to_wire(c: lu::Completion) -> ScsiCompletion {
    ScsiCompletion {
        status: c.status,
        sense: c.sense,
        data_in: c.data,
    }
}

// ---------------------------------------------------------------------------------------------
// Events, target-managed ownership and the target-side handover (issue 6; semantics.md §3).

/// How many events the log keeps; older ones are dropped first.
pub const EVENT_CAPACITY: usize = 1024;

/// A bounded ring buffer of [`Event`]s.
pub struct EventLog {
    inner: Mutex<(u64, std::collections::VecDeque<Event>)>,
    capacity: usize,
}

impl EventLog {
    pub fn new(capacity: usize) -> Self {
        EventLog {
            inner: Mutex::new((0, std::collections::VecDeque::new())),
            capacity: capacity.max(1),
        }
    }

    /// Append an event stamped with the wall clock; returns its sequence number.
    pub fn record(&self, lun: &str, kind: &str, detail: serde_json::Value) -> u64 {
        let time_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let mut g = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        g.0 = g.0.saturating_add(1);
        let seq = g.0;
        if g.1.len() >= self.capacity {
            g.1.pop_front();
        }
        g.1.push_back(Event {
            seq,
            time_unix_ms,
            lun: lun.to_string(),
            kind: kind.to_string(),
            detail,
        });
        seq
    }

    /// The events with a sequence number above `since` that are still in the buffer.
    pub fn since(&self, since: u64) -> Vec<Event> {
        let g = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        g.1.iter().filter(|e| e.seq > since).cloned().collect()
    }
}

/// A committed handover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitOutcome {
    pub epoch: u64,
    pub generation: u32,
    pub owner: Option<String>,
    pub steps: CommitSteps,
    /// Whether the deadline passed and the source's remaining tasks were aborted. The SCSI
    /// core does not say how many tasks a ticket covers, so this counts 1 for "some".
    pub aborted_tasks: u64,
    /// A retry of an epoch already committed: nothing changed.
    pub idempotent: bool,
}

/// A handover prepared with `commit_on_write` ([`LunHandle::handover_prepare`]).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Armed {
    from: String,
    to: String,
    epoch: u64,
    /// The commit's drain deadline (then the source's tasks are aborted).
    deadline: std::time::Duration,
}

/// A failover ([`LunHandle::failover`]): the state afterwards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailoverOutcome {
    pub owner: Option<String>,
    pub epoch: u64,
    pub generation: u32,
    /// Tasks were aborted on this node and drained before the answer (one node only: in
    /// cluster mode every gateway aborts and drains, but does not report it here).
    pub aborted: bool,
    /// A retry of the same decision: nothing changed.
    pub idempotent: bool,
    pub took_us: u64,
}

/// Why an admin ownership or handover step failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OwnershipOpError {
    #[error(transparent)]
    Ownership(#[from] ironlun_scsi::pr::ownership::OwnershipError),
    #[error("cluster: {0}")]
    Cluster(String),
    #[error("the source's commands did not finish within {0} ms; the fence is lifted and the source keeps writing")]
    DrainTimeout(u64),
    #[error("aborted commands of the source did not finish their I/O within {0} s; the source stays fenced")]
    AbortTimeout(u64),
    #[error(
        "flushing the backstore failed ({0}); the fence is lifted and the source keeps writing"
    )]
    Flush(String),
    #[error("the new state is in effect but could not be written durably: {0}; retry the commit")]
    Persist(String),
    #[error("{0}")]
    Unsupported(&'static str),
}

/// A std mutex's guard; a poisoned lock (a panic while held) is taken over as is.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn micros(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl LunHandle {
    /// `TARGET/LUN`.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Record a PR OUT that changed the reservation state (after its effects were carried out).
    /// `origin`: the service action and the initiator port that sent it.
    fn record_pr_out(&self, ok: bool, origin: Option<&lu::PrOrigin>) {
        let s = self.pr_snapshot();
        let mut detail = serde_json::json!({
            "generation": s.generation,
            "reservation": s.reservation.as_ref().map(|r| r.ty.name()),
            "registrations": s.registrations.len(),
            "persisted": ok,
        });
        if let (Some(o), Some(m)) = (origin, detail.as_object_mut()) {
            m.insert("action".into(), o.action.into());
            m.insert("initiator".into(), o.initiator.clone().into());
        }
        self.events.record(&self.label, "pr_out", detail);
    }

    /// The lowest epoch a new handover can use: one above both the LU's epoch and every epoch
    /// aborted on this LU (an aborted epoch is refused for good; `PrState::next_epoch`).
    pub fn next_epoch(&self) -> u64 {
        self.lu().pr_state().next_epoch()
    }

    /// Whether the LU's PR state is replicated across gateways (cluster mode, issue 18).
    fn replicated(&self) -> bool {
        self.cluster.get().is_some()
    }

    /// Carry out an ownership step's [`PrCommit`] exactly as a PR OUT's: the persist sequence
    /// number was taken under the LU lock by the caller ([`LunHandle::sequenced`]).
    async fn carry_out(self: &Arc<Self>, step: Sequenced) -> Result<(), OwnershipOpError> {
        let Sequenced {
            step: Step::PrCommit(commit),
            seq,
        } = step
        else {
            return Ok(());
        };
        let c = commit_pr(self, commit, seq).await;
        if c.status == 0 {
            Ok(())
        } else {
            Err(OwnershipOpError::Persist(format!(
                "state file {}",
                self.state_file.display()
            )))
        }
    }

    /// One ownership step that needs no drain wait of its own: in cluster mode `op` as one
    /// record (`cluster::ownership`, which waits for every gateway), else `local` on the LU
    /// and its commit carried out here (aborted tasks drained, state durable).
    async fn owner_step(
        self: &Arc<Self>,
        op: OwnershipOp,
        local: impl FnOnce(&mut LogicalUnit) -> Result<PrCommit, OwnershipError>,
    ) -> Result<(), OwnershipOpError> {
        if self.replicated() {
            return cluster::ownership(self, op.normalized()?).await.map(|_| ());
        }
        let step = {
            let mut lu = self.lu();
            let commit = local(&mut lu)?;
            self.sequenced(Step::PrCommit(commit))
        };
        self.carry_out(step).await
    }

    /// Make `host` the target-managed owner at `epoch` (`POST …/owner`;
    /// [`LogicalUnit::set_owner`]): other hosts' tasks are aborted and drained and the state
    /// is durable before this returns. Returns the snapshot afterwards.
    pub async fn set_owner(
        self: &Arc<Self>,
        host: &str,
        epoch: u64,
    ) -> Result<ironlun_scsi::pr::PrSnapshot, OwnershipOpError> {
        let _op = self.admin_op.lock().await;
        self.disarm();
        if self.replicated() && self.pr_snapshot().spc2_holder.is_some() {
            return Err(OwnershipError::Spc2Reserved.into());
        }
        let op = OwnershipOp::SetOwner {
            host: host.to_string(),
            epoch,
        };
        let r = self.owner_step(op, |lu| lu.set_owner(host, epoch)).await;
        let s = self.pr_snapshot();
        self.events.record(
            &self.label,
            "ownership",
            serde_json::json!({"owner": s.owner, "epoch": s.epoch, "generation": s.generation, "persisted": r.is_ok()}),
        );
        r.map(|()| s)
    }

    /// End `host`'s target-managed ownership at `epoch` (`POST …/release`;
    /// [`LogicalUnit::clear_owner`]): its registration and reservation go and PR OUT is
    /// accepted again; durable (or in etcd) before this returns.
    pub async fn release(
        self: &Arc<Self>,
        host: &str,
        epoch: u64,
    ) -> Result<ironlun_scsi::pr::PrSnapshot, OwnershipOpError> {
        let _op = self.admin_op.lock().await;
        self.disarm();
        let op = OwnershipOp::ClearOwner {
            host: host.to_string(),
            epoch,
        };
        let r = self.owner_step(op, |lu| lu.clear_owner(host, epoch)).await;
        let s = self.pr_snapshot();
        self.events.record(
            &self.label,
            "release",
            serde_json::json!({"host": host, "epoch": epoch, "generation": s.generation, "persisted": r.is_ok()}),
        );
        r.map(|()| s)
    }

    /// Failover (issue 19, `POST …/failover`; [`LogicalUnit::failover`]): `from` failed and
    /// `to` owns the LU at `epoch`, in one PR transition. `from`'s registrations go
    /// (2Ah/05h to its nexuses) and its tasks are aborted; the answer comes after they have
    /// drained (on every gateway in cluster mode) and the state is durable. Refused while
    /// `from` has a session on the LU unless `force` (in cluster mode only this gateway's
    /// sessions are seen). A retry of the same decision succeeds without change.
    pub async fn failover(
        self: &Arc<Self>,
        from: &str,
        to: &str,
        epoch: u64,
        force: bool,
    ) -> Result<FailoverOutcome, OwnershipOpError> {
        let _op = self.admin_op.lock().await;
        self.disarm();
        let start = std::time::Instant::now();
        let before = self.pr_snapshot();
        let mut aborted = false;
        // The LU checks these itself; a replicated step is checked here, on this gateway.
        let from_n = ironlun_scsi::pr::ownership::host_name(from)?;
        let r = if self.replicated() && !force && self.lu().host_logged_in(&from_n) {
            Err(OwnershipError::SourceLoggedIn(from_n).into())
        } else if self.replicated() && before.spc2_holder.is_some() {
            Err(OwnershipError::Spc2Reserved.into())
        } else {
            let op = OwnershipOp::Failover {
                from: from_n,
                to: to.to_string(),
                epoch,
            };
            self.owner_step(op, |lu| {
                let commit = lu.failover(from, to, epoch, force)?;
                aborted = commit.abort.is_some();
                Ok(commit)
            })
            .await
        };
        let s = self.pr_snapshot();
        let idempotent = r.is_ok() && s.generation == before.generation;
        match &r {
            Err(_) => self.metrics.failover(false),
            Ok(()) if !idempotent => self.metrics.failover(true),
            Ok(()) => {}
        }
        let took_us = micros(start.elapsed());
        let mut detail = serde_json::json!({
            "from": from, "to": to, "epoch": epoch, "force": force,
            "aborted": aborted, "idempotent": idempotent, "took_us": took_us,
        });
        if let (Err(e), Some(m)) = (&r, detail.as_object_mut()) {
            m.insert("refused".into(), e.to_string().into());
        }
        self.events.record(&self.label, "failover", detail);
        r.map(|()| FailoverOutcome {
            owner: s.owner,
            epoch: s.epoch,
            generation: s.generation,
            aborted,
            idempotent,
            took_us,
        })
    }

    /// Handover step 1 (`POST …/handover/prepare`; [`LogicalUnit::handover_prepare`]). With
    /// `commit_on_write` (one node only) the handover is also armed: the first command of
    /// `to` that needs write access ([`access::Class::Modify`]) waits while the commit runs
    /// (fence `from`, drain up to the deadline then abort, flush, transfer), then runs as the
    /// owner's. For hypervisors whose hooks cannot run between the source's pause and the
    /// destination's resume (libvirt): the destination's guest writes only after the source's
    /// has stopped, so its first write marks the switchover.
    pub async fn handover_prepare(
        &self,
        from: &str,
        to: &str,
        epoch: u64,
        commit_on_write: Option<std::time::Duration>,
    ) -> Result<ironlun_scsi::pr::PrSnapshot, OwnershipOpError> {
        let _op = self.admin_op.lock().await;
        let s = if self.replicated() {
            if commit_on_write.is_some() {
                return Err(OwnershipOpError::Unsupported(
                    "commit_on_write is not supported in cluster mode: commit the handover explicitly",
                ));
            }
            // The destination's sessions may be on any gateway: not checked here.
            let op = OwnershipOp::Prepare {
                from: from.to_string(),
                to: to.to_string(),
                epoch,
            }
            .normalized()?;
            cluster::ownership(self, op).await?;
            self.pr_snapshot()
        } else {
            let mut lu = self.lu();
            lu.handover_prepare(from, to, epoch)?;
            lu.pr_snapshot()
        };
        if let Some(deadline) = commit_on_write {
            let (from, to) = (
                ironlun_scsi::pr::ownership::host_name(from)?,
                ironlun_scsi::pr::ownership::host_name(to)?,
            );
            *lock(&self.armed) = Some(Armed {
                from,
                to,
                epoch,
                deadline,
            });
            self.armed_flag.store(true, Ordering::Release);
        }
        self.events.record(
            &self.label,
            "handover_prepare",
            serde_json::json!({"from": from, "to": to, "epoch": epoch, "commit_on_write": commit_on_write.is_some()}),
        );
        Ok(s)
    }

    /// Forget an armed handover (any step that decides the LU's ownership does).
    fn disarm(&self) {
        if self.armed_flag.swap(false, Ordering::AcqRel) {
            *lock(&self.armed) = None;
        }
    }

    /// Whether a command `cdb` of initiator `name` must wait for an armed handover's commit:
    /// `name` is its destination and the command needs write access.
    fn awaits_handover(&self, name: &str, cdb: &[u8]) -> bool {
        if !self.armed_flag.load(Ordering::Acquire) {
            return false;
        }
        lock(&self.armed).as_ref().is_some_and(|a| {
            a.to.eq_ignore_ascii_case(name)
                && ironlun_scsi::pr::access::classify(cdb)
                    == ironlun_scsi::pr::access::Class::Modify
        })
    }

    /// Commit the armed handover (a command of its destination waits for this). One caller
    /// commits; the others wait for it and then find the handover disarmed. A failed commit
    /// is logged and disarms too: the command then runs against the unchanged state
    /// (RESERVATION CONFLICT).
    async fn commit_armed(self: &Arc<Self>) {
        let _one = self.armed_commit.lock().await;
        let Some(a) = lock(&self.armed).clone() else {
            return;
        };
        match self
            .handover_commit(&a.from, &a.to, a.epoch, a.deadline, OnDeadline::Abort)
            .await
        {
            Ok(o) => tracing::info!(
                lu = %self.label, from = %a.from, to = %a.to, epoch = a.epoch,
                total_us = o.steps.total, "handover committed at the destination's first write"
            ),
            Err(e) => tracing::warn!(
                lu = %self.label, from = %a.from, to = %a.to, epoch = a.epoch, error = %e,
                "the handover armed for the destination's first write failed"
            ),
        }
        let mut armed = lock(&self.armed);
        if armed.as_ref().is_some_and(|x| x.epoch == a.epoch) {
            *armed = None;
            self.armed_flag.store(false, Ordering::Release);
        }
    }

    /// Handover step 4 (`POST …/handover/abort`; [`LogicalUnit::handover_abort`]): the fence
    /// goes, `from` stays the only writer, and `epoch` can no longer be prepared or committed.
    /// Idempotent for an epoch already aborted.
    pub async fn handover_abort(
        &self,
        from: &str,
        to: &str,
        epoch: u64,
    ) -> Result<(), OwnershipOpError> {
        let _op = self.admin_op.lock().await;
        self.disarm();
        if self.lu().pr_state().aborted_epochs().contains(&epoch) {
            return Ok(());
        }
        if self.replicated() {
            let op = OwnershipOp::Abort {
                from: from.to_string(),
                to: to.to_string(),
                epoch,
            }
            .normalized()?;
            cluster::ownership(self, op).await?;
        } else {
            self.lu().handover_abort(from, to, epoch)?;
        }
        self.events.record(
            &self.label,
            "handover_abort",
            serde_json::json!({"from": from, "to": to, "epoch": epoch}),
        );
        Ok(())
    }

    /// Handover steps 2 and 3 (`POST …/handover/commit`): fence `from`, wait for its tasks up
    /// to `deadline` (then abort them, or refuse per `on_deadline`), flush the backstore, then
    /// the one PR transition ([`LogicalUnit::handover_commit`]), its abort drain and its
    /// durable state write. The LU lock is taken only for each pure step, never across a wait.
    /// A retry of the committed epoch succeeds without change (`idempotent`).
    pub async fn handover_commit(
        self: &Arc<Self>,
        from: &str,
        to: &str,
        epoch: u64,
        deadline: std::time::Duration,
        on_deadline: OnDeadline,
    ) -> Result<CommitOutcome, OwnershipOpError> {
        use ironlun_scsi::pr::ownership::{host_name, Handover};
        let _op = self.admin_op.lock().await;
        if self.lu().pr_state().aborted_epochs().contains(&epoch) {
            return Err(OwnershipError::Aborted(epoch).into());
        }
        if self.replicated() {
            return self
                .replicated_commit(from, to, epoch, deadline, on_deadline)
                .await;
        }
        let start = std::time::Instant::now();
        let to_host = host_name(to)?;
        // A retry of the committed epoch: the LU asks to persist again, nothing else changes.
        let retry = {
            let mut lu = self.lu();
            let s = lu.pr_snapshot();
            let in_progress = matches!(lu.handover_state().parts(),
                Some((_, t, e)) if t == to_host && e == epoch);
            if !in_progress && s.owner.as_deref() == Some(to_host.as_str()) && s.epoch == epoch {
                let commit = lu.handover_commit(from, to, epoch)?;
                Some(self.sequenced(Step::PrCommit(commit)))
            } else {
                None
            }
        };
        if let Some(step) = retry {
            self.carry_out(step).await?;
            return Ok(self.retried(epoch, start));
        }
        let ticket = self.lu().handover_fence(from, epoch)?;
        let fence = micros(start.elapsed());
        let t = std::time::Instant::now();
        let mut aborted_tasks = 0;
        let in_time = tokio::time::timeout(deadline, self.wait_until(|lu| lu.drained(&ticket)))
            .await
            .is_ok();
        if !in_time {
            match on_deadline {
                OnDeadline::Refuse => {
                    self.lu().handover_unfence(from, to, epoch)?;
                    return Err(self.drain_timed_out(from, to, epoch, deadline));
                }
                OnDeadline::Abort => {
                    let abort = self.lu().handover_abort_inflight(from)?;
                    aborted_tasks = 1;
                    let waited = tokio::time::timeout(ABORT_WAIT, self.wait_drained(abort)).await;
                    if waited.is_err() {
                        return Err(OwnershipOpError::AbortTimeout(ABORT_WAIT.as_secs()));
                    }
                }
            }
        }
        let drain = micros(t.elapsed());
        let t = std::time::Instant::now();
        if let Err(e) = self.flush().await {
            self.lu().handover_unfence(from, to, epoch)?;
            return Err(OwnershipOpError::Flush(e));
        }
        let flush = micros(t.elapsed());
        let t = std::time::Instant::now();
        let step = {
            let mut lu = self.lu();
            let commit = lu.handover_commit(from, to, epoch)?;
            debug_assert_eq!(*lu.handover_state(), Handover::Idle);
            self.sequenced(Step::PrCommit(commit))
        };
        let persisted = self.carry_out(step).await;
        let steps = CommitSteps {
            fence,
            drain,
            flush,
            transfer: micros(t.elapsed()),
            total: micros(start.elapsed()),
        };
        let outcome = self.committed((from, to, epoch), steps, aborted_tasks, persisted.is_ok());
        persisted.map(|()| outcome)
    }

    /// [`LunHandle::handover_commit`] on a replicated LU (scale-out.md §2.7), each step one
    /// record through etcd: the fence (in effect on every gateway), the wait until every
    /// gateway's tasks of `from` have finished (up to `deadline`, then `on_deadline`), the
    /// flush of the shared backstore through this gateway, the commit (whose GOOD waits until
    /// every gateway has applied it and drained `from`'s aborted tasks). The state is durable
    /// in etcd; there is no state file.
    async fn replicated_commit(
        self: &Arc<Self>,
        from: &str,
        to: &str,
        epoch: u64,
        deadline: std::time::Duration,
        on_deadline: OnDeadline,
    ) -> Result<CommitOutcome, OwnershipOpError> {
        let start = std::time::Instant::now();
        let (from_host, to_host) = (
            ironlun_scsi::pr::ownership::host_name(from)?,
            ironlun_scsi::pr::ownership::host_name(to)?,
        );
        let s = self.pr_snapshot();
        let in_progress = s
            .handover
            .parts()
            .is_some_and(|(_, t, e)| t == to_host && e == epoch);
        let retry =
            !in_progress && s.owner.as_deref() == Some(to_host.as_str()) && s.epoch == epoch;
        if on_deadline == OnDeadline::Abort {
            return self
                .replicated_switch((from, to, epoch), (from_host, to_host), retry, start)
                .await;
        }
        if retry {
            return Ok(self.retried(epoch, start));
        }
        let step = |op: OwnershipOp| async move { cluster::ownership(self, op).await };
        let fenced = step(OwnershipOp::Fence {
            from: from_host.clone(),
            epoch,
        })
        .await?;
        let fence = micros(start.elapsed());
        let t = std::time::Instant::now();
        let mut aborted_tasks = 0;
        // A repeated fence (`None`) was drained or is aborted by the commit below.
        if let Some(r) = fenced {
            let in_time = tokio::time::timeout(deadline, cluster::fence_drained(self, r))
                .await
                .is_ok();
            if !in_time {
                match on_deadline {
                    OnDeadline::Refuse => {
                        step(OwnershipOp::Unfence {
                            from: from_host.clone(),
                            to: to_host.clone(),
                            epoch,
                        })
                        .await?;
                        return Err(self.drain_timed_out(from, to, epoch, deadline));
                    }
                    // The commit aborts `from`'s tasks on every gateway and waits for them.
                    OnDeadline::Abort => aborted_tasks = 1,
                }
            }
        }
        let drain = micros(t.elapsed());
        let t = std::time::Instant::now();
        if let Err(e) = self.flush().await {
            step(OwnershipOp::Unfence {
                from: from_host.clone(),
                to: to_host.clone(),
                epoch,
            })
            .await?;
            return Err(OwnershipOpError::Flush(e));
        }
        let flush = micros(t.elapsed());
        let t = std::time::Instant::now();
        step(OwnershipOp::Commit {
            from: from_host,
            to: to_host,
            epoch,
        })
        .await?;
        let steps = CommitSteps {
            fence,
            drain,
            flush,
            transfer: micros(t.elapsed()),
            total: micros(start.elapsed()),
        };
        Ok(self.committed((from, to, epoch), steps, aborted_tasks, true))
    }

    /// [`LunHandle::replicated_commit`] with `on_deadline` abort: the fence and the commit as
    /// one record ([`OwnershipOp::Switch`]), whose GOOD waits until every gateway has applied
    /// it and drained `from`'s tasks it aborted; then the flush of the shared backstore. One
    /// round through etcd instead of two; `from`'s writes still in flight end TASK ABORTED
    /// rather than being waited for up to the deadline. A destination that writes only after
    /// this returns (as `ironlun migrate` resumes it) never overlaps them. A `retry` of a
    /// committed switch is recorded again (it aborts `from`'s tasks again), so its GOOD too
    /// waits for the drain everywhere; it is reported idempotent.
    async fn replicated_switch(
        self: &Arc<Self>,
        (from, to, epoch): (&str, &str, u64),
        (from_host, to_host): (String, String),
        retry: bool,
        start: std::time::Instant,
    ) -> Result<CommitOutcome, OwnershipOpError> {
        cluster::ownership(
            self,
            OwnershipOp::Switch {
                from: from_host,
                to: to_host,
                epoch,
            },
        )
        .await?;
        let transfer = micros(start.elapsed());
        let t = std::time::Instant::now();
        // The source's acknowledged writes are durable before the destination is resumed.
        self.flush().await.map_err(OwnershipOpError::Flush)?;
        if retry {
            return Ok(self.retried(epoch, start));
        }
        let steps = CommitSteps {
            fence: 0,
            drain: 0,
            flush: micros(t.elapsed()),
            transfer,
            total: micros(start.elapsed()),
        };
        Ok(self.committed((from, to, epoch), steps, 0, true))
    }

    /// The outcome of a retried commit of `epoch` (nothing changed), timed from `start`.
    fn retried(&self, epoch: u64, start: std::time::Instant) -> CommitOutcome {
        let s = self.pr_snapshot();
        CommitOutcome {
            epoch,
            generation: s.generation,
            owner: s.owner,
            steps: CommitSteps {
                total: micros(start.elapsed()),
                ..CommitSteps::default()
            },
            aborted_tasks: 0,
            idempotent: true,
        }
    }

    /// A commit gave up on its drain deadline (the fence is already lifted): the event and
    /// the error.
    fn drain_timed_out(
        &self,
        from: &str,
        to: &str,
        epoch: u64,
        deadline: std::time::Duration,
    ) -> OwnershipOpError {
        self.events.record(
            &self.label,
            "handover_abort",
            serde_json::json!({"from": from, "to": to, "epoch": epoch, "reason": "drain_timeout"}),
        );
        OwnershipOpError::DrainTimeout(u64::try_from(deadline.as_millis()).unwrap_or(u64::MAX))
    }

    /// A commit of `(from, to, epoch)` took effect: its event, and its outcome.
    fn committed(
        &self,
        (from, to, epoch): (&str, &str, u64),
        steps: CommitSteps,
        aborted_tasks: u64,
        persisted: bool,
    ) -> CommitOutcome {
        let s = self.pr_snapshot();
        self.events.record(
            &self.label,
            "handover_commit",
            serde_json::json!({
                "from": from, "to": to, "epoch": epoch, "generation": s.generation,
                "steps_us": steps, "aborted_tasks": aborted_tasks, "persisted": persisted,
            }),
        );
        CommitOutcome {
            epoch,
            generation: s.generation,
            owner: s.owner,
            steps,
            aborted_tasks,
            idempotent: false,
        }
    }

    /// Flush the backstore (data and metadata, [`BlockBackend::flush`]) off the async workers.
    async fn flush(self: &Arc<Self>) -> Result<(), String> {
        let backend = self.backend.clone();
        if self.async_io {
            return backend.flush_async().await.map_err(|e| e.to_string());
        }
        tokio::task::spawn_blocking(move || backend.flush().map_err(|e| e.to_string()))
            .await
            .unwrap_or_else(|e| Err(format!("flush task failed: {e}")))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn state_file_names_keep_safe_bytes_and_escape_the_rest() {
        assert_eq!(state_file_name("0123abcdef"), "aptpl_0123abcdef");
        assert_eq!(state_file_name("A.b_c-9"), "aptpl_A.b_c-9");
        assert_eq!(state_file_name("../x"), "aptpl_..%2Fx");
        assert_eq!(state_file_name("a b/%"), "aptpl_a%20b%2F%25");
    }

    #[test]
    fn relative_ports_are_the_sorted_distinct_tpgts() {
        let mut cfg = Config::embedded_default(PathBuf::from("/nonexistent"));
        let portal = |port, tpgt| config::Portal {
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            tpgt,
        };
        cfg.portals = vec![portal(1, 7), portal(2, 2), portal(3, 7), portal(4, 3)];
        assert_eq!(relative_ports(&cfg), vec![2, 3, 7]);
        let lc = lu_config(
            "iqn.x:t",
            &cfg.targets[0].luns[0],
            8,
            &relative_ports(&cfg),
            true,
        );
        assert_eq!(lc.relative_ports, vec![2, 3, 7]);
        assert_eq!(lc.relative_port, 2);
        assert!(lc.ptpl_capable);
    }

    #[test]
    fn durable_write_replaces_and_removal_tolerates_absence() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pr").join("aptpl_x");
        write_durably(&path, b"one").unwrap();
        write_durably(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert!(!tmp_path(&path).exists());
        remove_durably(&path).unwrap();
        assert!(!path.exists());
        remove_durably(&path).unwrap();
        // Neither the file nor its directory exists: still fine.
        remove_durably(&dir.path().join("none").join("aptpl_y")).unwrap();
    }

    #[test]
    fn restore_ignores_absent_state_and_removes_a_leftover_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("aptpl_x");
        std::fs::write(tmp_path(&path), b"half written").unwrap();
        let mut lu = LogicalUnit::new(LuConfig::new(0, 512, 8, "iqn.x:t"));
        assert_eq!(restore_state(&mut lu, &path), Ok(false));
        assert!(!tmp_path(&path).exists());
    }

    #[test]
    fn rejects_a_corrupt_state_file_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("aptpl_x");
        std::fs::write(&path, b"\x00garbage").unwrap();
        let mut lu = LogicalUnit::new(LuConfig::new(0, 512, 8, "iqn.x:t"));
        let e = restore_state(&mut lu, &path).unwrap_err();
        assert!(e.contains(&path.display().to_string()), "{e}");
        // Refused, never dropped.
        assert!(path.exists());
    }

    fn ram_handle(dir: &Path) -> Arc<LunHandle> {
        let backend: Arc<dyn BlockBackend> =
            Arc::new(ironlun_backstore::ram::RamBackend::new(4096).unwrap());
        let lu = LogicalUnit::new(LuConfig::new(0, 512, 8, "iqn.x:t"));
        Arc::new(LunHandle::new(
            lu,
            backend,
            true,
            dir.join("pr").join("aptpl_t"),
        ))
    }

    #[tokio::test]
    async fn a_nexus_follows_its_targets_lun_set_and_masking() {
        let dir = tempfile::tempdir().unwrap();
        let (h0, h1) = (ram_handle(dir.path()), ram_handle(dir.path()));
        let target = Arc::new(TargetState::new(
            "iqn.x:t".into(),
            None,
            BTreeMap::from([(0, h0.clone())]),
            LunMasking::default(),
        ));
        let n = Nexus::attach_for(target.clone(), 7, "iqn.x:i", [0, 0, 0, 0, 0, 1], 1);
        assert_eq!(n.visible_luns(), vec![0]);
        target.set_luns(BTreeMap::from([(0, h0.clone()), (1, h1.clone())]));
        assert_eq!(n.visible_luns(), vec![0, 1]);
        // Registered on the new LU: its power-on unit attention is pending for this nexus.
        assert!(h1.lu().pending_unit_attention(7).is_some());
        let pattern = ironlun_iscsi::acl::NamePattern::parse("iqn.x:i").unwrap();
        target.set_masking(LunMasking::new(vec![(pattern, vec![1])]));
        assert_eq!(n.visible_luns(), vec![1]);
        // Masked or removed LUNs answer LOGICAL UNIT NOT SUPPORTED.
        let (c, _) = n
            .execute(0, Bytes::from_static(&[0; 6]), Bytes::new())
            .await;
        assert_eq!(c.status, 2);
        assert_eq!(c.sense.get(12).copied(), Some(0x25));
        target.set_luns(BTreeMap::from([(0, h0)]));
        assert!(n.visible_luns().is_empty());
        assert!(h1.lu().pending_unit_attention(7).is_none());
    }

    #[test]
    fn target_resets_follow_allow_target_reset_and_reach_masked_lus() {
        use crate::config::TargetResetPolicy;
        let dir = tempfile::tempdir().unwrap();
        let (h0, h1) = (ram_handle(dir.path()), ram_handle(dir.path()));
        let pattern = ironlun_iscsi::acl::NamePattern::parse("iqn.x:masked").unwrap();
        let target = Arc::new(TargetState::new(
            "iqn.x:t".into(),
            None,
            BTreeMap::from([(0, h0.clone()), (1, h1.clone())]),
            LunMasking::new(vec![(pattern, vec![0])]),
        ));
        let masked = Nexus::attach_for(target.clone(), 1, "iqn.x:masked", [0; 6], 1);
        let other = Nexus::attach_for(target.clone(), 2, "iqn.x:other", [0; 6], 1);
        let chap = Nexus::attach_for(target.clone(), 3, "iqn.x:masked", [1; 6], 1).with_chap(true);
        let reset = |n: &Nexus| n.task_mgmt(TmfFunction::TargetWarmReset, 0, None).response;
        // Default "chap": only the session that passed CHAP; a refusal resets nothing.
        assert!(!masked.may_reset_target() && chap.may_reset_target());
        assert_eq!(reset(&other), TmfResponse::AuthorizationFailed);
        assert_eq!(
            h1.lu().pending_unit_attention(2),
            Some(SenseReason::PowerOnOrReset)
        );
        // Allowed: every LU of the target, LUN 1 too although the requester cannot see it.
        assert_eq!(reset(&chap), TmfResponse::FunctionComplete);
        for h in [&h0, &h1] {
            assert_eq!(
                h.lu().pending_unit_attention(2),
                Some(SenseReason::BusResetOccurred)
            );
        }
        target.set_reset_policy(TargetResetPolicy::All);
        assert!(masked.may_reset_target());
        target.set_reset_policy(TargetResetPolicy::None);
        assert_eq!(reset(&chap), TmfResponse::AuthorizationFailed);
    }

    #[tokio::test]
    async fn an_older_state_never_overwrites_a_newer_one() {
        let dir = tempfile::tempdir().unwrap();
        let h = ram_handle(dir.path());
        h.persist(2, Persist::Write(b"new".to_vec())).await.unwrap();
        h.persist(1, Persist::Write(b"old".to_vec())).await.unwrap();
        assert_eq!(std::fs::read(&h.state_file).unwrap(), b"new");
        h.persist(3, Persist::Remove).await.unwrap();
        assert!(!h.state_file.exists());
        h.persist(2, Persist::Write(b"stale".to_vec()))
            .await
            .unwrap();
        assert!(!h.state_file.exists());
    }

    #[tokio::test]
    async fn a_failed_state_write_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        // `pr` is a file, so the state directory cannot be created.
        std::fs::write(dir.path().join("pr"), b"").unwrap();
        let h = ram_handle(dir.path());
        let e = h
            .persist(1, Persist::Write(b"x".to_vec()))
            .await
            .unwrap_err();
        assert!(e.contains("aptpl_t"), "{e}");
        let commit = PrCommit {
            abort: None,
            persist: Some(Persist::Write(b"x".to_vec())),
            completion: lu::Completion::good(Bytes::new()),
            origin: None,
        };
        let c = commit_pr(&h, commit, 2).await;
        assert_eq!(c, lu::Completion::persist_failed(false));
    }

    use crate::gated::{GateGuard, Gated};

    const KV: u64 = 0x76;
    const KP: u64 = 0x50;

    /// A victim nexus V holding a WERO reservation and a registered preemptor P on one LU
    /// whose writes pass through `gate` (treated as a file LUN: 128 KiB writes go to the pool).
    async fn preempt_setup() -> (GateGuard, Nexus, Nexus) {
        let dir = tempfile::tempdir().unwrap();
        let gate = Arc::new(Gated::new(1 << 20));
        let mut lc = LuConfig::new(0, 512, 2048, "iqn.x:t");
        lc.ptpl_capable = true;
        let handle = Arc::new(LunHandle::new(
            LogicalUnit::new(lc),
            gate.clone(),
            false,
            dir.path().join("aptpl_t"),
        ));
        let target = Arc::new(TargetState::new(
            "iqn.x:t".into(),
            None,
            BTreeMap::from([(0, handle)]),
            LunMasking::default(),
        ));
        let it = |name: &str| ItNexus {
            initiator: InitiatorPort::new(name, [0, 0, 0, 0, 0, 1]),
            rtpi: 1,
        };
        let v = Nexus::attach(target.clone(), 1, it("iqn.x:v"));
        let p = Nexus::attach(target, 2, it("iqn.x:p"));
        for n in [&v, &p] {
            // The power-on unit attention first.
            n.execute(0, Bytes::from_static(&[0; 6]), Bytes::new())
                .await;
        }
        assert_eq!(prout(&v, 0, 0, 0, KV).await.status, 0);
        assert_eq!(prout(&p, 0, 0, 0, KP).await.status, 0);
        assert_eq!(prout(&v, 1, 5, KV, 0).await.status, 0);
        (GateGuard(gate), v, p)
    }

    async fn prout(n: &Nexus, sa: u8, ty: u8, rk: u64, sark: u64) -> ScsiCompletion {
        let mut cdb = vec![0x5f, sa, ty, 0, 0, 0, 0, 0, 24, 0];
        cdb.truncate(10);
        let mut p = vec![0u8; 24];
        p[..8].copy_from_slice(&rk.to_be_bytes());
        p[8..16].copy_from_slice(&sark.to_be_bytes());
        n.execute(0, Bytes::from(cdb), Bytes::from(p)).await.0
    }

    fn write_128k(n: &Nexus) -> PendingCommand {
        write_128k_at(n, None)
    }

    /// WRITE (16) of 128 KiB at LBA 0 whose header arrived at `arrived`.
    fn write_128k_at(n: &Nexus, arrived: Option<Instant>) -> PendingCommand {
        let mut cdb = vec![0x8a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0];
        cdb[10..14].copy_from_slice(&256u32.to_be_bytes());
        match n.start_at(
            0,
            Bytes::from(cdb),
            Bytes::from(vec![0xab; 128 * 1024]),
            arrived,
        ) {
            Started::Pending(p) => p,
            Started::Done(c, _) => panic!("write finished inline: {c:?}"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn preempt_and_abort_waits_for_the_aborted_write_in_flight() {
        let (gate, v, p) = preempt_setup().await;
        gate.set(false);
        let write = tokio::spawn(write_128k(&v).finish());
        tokio::time::sleep(Duration::from_millis(50)).await;
        let p = Arc::new(p);
        let p2 = p.clone();
        let mut preempt = tokio::spawn(async move { prout(&p2, 5, 5, KP, KV).await });
        // The victim's write is still on the blocking pool: no GOOD yet.
        assert!(
            tokio::time::timeout(Duration::from_millis(300), &mut preempt)
                .await
                .is_err(),
            "PREEMPT AND ABORT completed while a write of the preempted nexus was in flight"
        );
        gate.set(true);
        let c = tokio::time::timeout(Duration::from_secs(5), preempt)
            .await
            .expect("PREEMPT AND ABORT never completed")
            .unwrap();
        assert_eq!(c.status, 0, "{c:?}");
        let (w, _) = write.await.unwrap();
        assert!(matches!(w.status, 0x00 | 0x40), "{w:?}");
    }

    async fn tur(n: &Nexus) -> ScsiCompletion {
        n.execute(0, Bytes::from_static(&[0; 6]), Bytes::new())
            .await
            .0
    }

    /// WRITE (16) of one block at LBA 1024.
    async fn write_one(n: &Nexus) -> ScsiCompletion {
        let cdb = [0x8a, 0, 0, 0, 0, 0, 0, 0, 0x04, 0, 0, 0, 0, 1, 0, 0];
        n.execute(
            0,
            Bytes::copy_from_slice(&cdb),
            Bytes::from(vec![0xcd; 512]),
        )
        .await
        .0
    }

    /// Issue 19 acceptance 1: a failover away from host V, whose write is in flight in the
    /// backstore, is refused while V is logged in; forced, it answers only after that write
    /// has ended, and none of V's writes reaches the backstore afterwards.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn failover_waits_for_the_failed_hosts_write_in_flight() {
        let (gate, v, p) = preempt_setup().await;
        let handle = v.target.luns().get(&0).unwrap().clone();
        // Initiator-managed PR with V's reservation and P's key: a failover from P makes
        // V the owning host (P's key goes).
        let o = handle
            .failover("iqn.x:p", "iqn.x:v", 1, true)
            .await
            .unwrap();
        assert_eq!(o.owner.as_deref(), Some("iqn.x:v"));
        assert_eq!(tur(&v).await.status, 0);
        assert_eq!(tur(&p).await.status, 2, "P's key was preempted (2Ah/05h)");
        gate.set(false);
        let write = tokio::spawn(write_128k(&v).finish());
        gate.0.entered(1).await;
        assert!(matches!(
            handle.failover("iqn.x:v", "iqn.x:p", 2, false).await,
            Err(OwnershipOpError::Ownership(OwnershipError::SourceLoggedIn(
                _
            )))
        ));
        let h = handle.clone();
        let mut failover =
            tokio::spawn(async move { h.failover("iqn.x:v", "iqn.x:p", 2, true).await });
        assert!(
            tokio::time::timeout(Duration::from_millis(300), &mut failover)
                .await
                .is_err(),
            "the failover answered while the failed host's write was in flight"
        );
        assert_eq!(gate.0.landed(), 0);
        gate.set(true);
        let o = tokio::time::timeout(Duration::from_secs(5), failover)
            .await
            .expect("the failover never answered")
            .unwrap()
            .unwrap();
        assert_eq!(gate.0.landed(), 1, "V's write ended before the answer");
        assert_eq!((o.owner.as_deref(), o.epoch), (Some("iqn.x:p"), 2));
        assert!(o.aborted && !o.idempotent, "{o:?}");
        let (w, _) = write.await.unwrap();
        assert_eq!(w.status, 0x40, "V's write ends TASK ABORTED: {w:?}");
        // From now on V conflicts and nothing of V's reaches the backstore.
        let started = gate.0.started().len();
        let w = write_one(&v).await;
        assert_eq!(w.status, 0x02, "the unit attention first: {w:?}");
        assert_eq!(&w.sense[12..14], &[0x2a, 0x05], "{w:?}");
        assert_eq!(write_one(&v).await.status, 0x18);
        assert_eq!(
            gate.0.started().len(),
            started,
            "a write of V reached the backstore"
        );
        assert_eq!(write_one(&p).await.status, 0, "the new owner writes");
        // A retry changes nothing.
        let again = handle
            .failover("iqn.x:v", "iqn.x:p", 2, true)
            .await
            .unwrap();
        assert!(again.idempotent && !again.aborted);
        assert_eq!(again.generation, o.generation);
    }

    /// SAM-5 §7: LUN RESET, CLEAR TASK SET and TARGET WARM RESET from P abort V's write in
    /// flight; P's response waits until that write's I/O has ended, and the write ends
    /// TASK ABORTED (TAS=1).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reset_from_one_nexus_waits_for_the_aborted_write_of_another() {
        for function in [
            TmfFunction::LogicalUnitReset,
            TmfFunction::ClearTaskSet,
            TmfFunction::TargetWarmReset,
        ] {
            let (gate, v, p) = preempt_setup().await;
            p.target.set_reset_policy(config::TargetResetPolicy::All);
            gate.set(false);
            let write = tokio::spawn(write_128k(&v).finish());
            tokio::time::sleep(Duration::from_millis(50)).await;
            let outcome = p.task_mgmt(function, 0, Some(Instant::now()));
            assert!(!outcome.is_ready(), "{function:?} had nothing to wait for");
            let mut response = tokio::spawn(outcome.drained());
            assert!(
                tokio::time::timeout(Duration::from_millis(300), &mut response)
                    .await
                    .is_err(),
                "{function:?} completed while an aborted write was in flight"
            );
            gate.set(true);
            assert_eq!(response.await.unwrap(), TmfResponse::FunctionComplete);
            let (w, _) = write.await.unwrap();
            assert_eq!(
                w.status,
                ironlun_scsi::status::TASK_ABORTED,
                "{function:?}: {w:?}"
            );
        }
    }

    /// ABORT TASK SET: the response waits for the nexus's own write in flight.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn abort_task_set_waits_for_its_own_write_in_flight() {
        let (gate, v, p) = preempt_setup().await;
        gate.set(false);
        let write = tokio::spawn(write_128k(&v).finish());
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Another nexus's ABORT TASK SET has nothing of V's to abort.
        assert!(p.task_mgmt(TmfFunction::AbortTaskSet, 0, None).is_ready());
        let outcome = v.task_mgmt(TmfFunction::AbortTaskSet, 0, None);
        assert!(!outcome.is_ready());
        let mut response = tokio::spawn(outcome.drained());
        assert!(
            tokio::time::timeout(Duration::from_millis(300), &mut response)
                .await
                .is_err()
        );
        gate.set(true);
        assert_eq!(response.await.unwrap(), TmfResponse::FunctionComplete);
        assert_eq!(
            write.await.unwrap().0.status,
            ironlun_scsi::status::TASK_ABORTED
        );
    }

    /// COMPARE AND WRITE (FUA, so its write goes to the blocking pool) of block 8 from `n`:
    /// zeros expected, 0xcd written.
    fn caw_block_8(n: &Nexus) -> PendingCommand {
        let mut cdb = vec![0x89, 0x08, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 1, 0, 0];
        cdb.truncate(16);
        let mut data = vec![0u8; 512];
        data.extend([0xcd; 512]);
        match n.start(0, Bytes::from(cdb), Bytes::from(data)) {
            Started::Pending(p) => p,
            Started::Done(c, _) => panic!("compare and write finished inline: {c:?}"),
        }
    }

    fn read_16(lba: u64, blocks: u32) -> Bytes {
        let mut cdb = vec![0x88, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        cdb[2..10].copy_from_slice(&lba.to_be_bytes());
        cdb[10..14].copy_from_slice(&blocks.to_be_bytes());
        Bytes::from(cdb)
    }

    /// SBC-3 §5.2 as a range lock: while a COMPARE AND WRITE's write is held in the backstore,
    /// a READ elsewhere and an EXTENDED COPY chunk elsewhere complete; a WRITE and a copy
    /// chunk over its block do not start until it has ended, and land after it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_compare_and_write_holds_its_range_and_nothing_else() {
        let (gate, v, p) = preempt_setup().await;
        let p = Arc::new(p);
        let handle = v.view().get(&0).unwrap().clone();
        gate.set(false);
        let caw = tokio::spawn(caw_block_8(&v).finish());
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(gate.started(), vec![(8 * 512, 512)]);
        // Elsewhere nothing waits.
        let (r, _) = tokio::time::timeout(
            Duration::from_secs(5),
            p.execute(0, read_16(100, 8), Bytes::new()),
        )
        .await
        .expect("a READ of another range waited for the COMPARE AND WRITE");
        assert_eq!((r.status, r.data_in.len()), (0, 4096), "{r:?}");
        let chunk = tokio::time::timeout(
            Duration::from_secs(5),
            handle.copy_io(
                p.id,
                IoOp::Read {
                    offset: 64 * 512,
                    len: 4096,
                },
            ),
        )
        .await
        .expect("a copy chunk of another range waited");
        assert!(matches!(chunk, Some(IoResult::Data(d)) if d.len() == 4096));
        // Over block 8: a WRITE (blocks 0-255) and a copy chunk write wait, without starting.
        let write = tokio::spawn(write_128k(&p).finish());
        let h = handle.clone();
        let id = p.id;
        let copy = tokio::spawn(async move {
            let data = Bytes::from(vec![0xee; 512]);
            h.copy_io(
                id,
                IoOp::Write {
                    offset: 8 * 512,
                    data,
                    fua: false,
                },
            )
            .await
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!write.is_finished() && !copy.is_finished());
        assert_eq!(handle.lu().waiting_tasks(), 2);
        assert_eq!(gate.started(), vec![(8 * 512, 512)]);
        gate.set(true);
        let (c, _) = caw.await.unwrap();
        assert_eq!(c.status, 0, "{c:?}");
        let (w, _) = write.await.unwrap();
        assert_eq!(w.status, 0, "{w:?}");
        assert_eq!(copy.await.unwrap(), Some(IoResult::Done));
        let log = gate.started();
        assert_eq!(log[0], (8 * 512, 512), "{log:?}");
        assert_eq!(log.len(), 3, "{log:?}");
        // The COMPARE AND WRITE's 0xcd was overwritten by whichever came later.
        let b8 = gate.read(8 * 512, 512).unwrap();
        assert!(b8.iter().all(|b| *b == 0xab) || b8.iter().all(|b| *b == 0xee));
        assert_eq!(handle.lu().waiting_tasks(), 0);
    }

    /// A write that waits for a COMPARE AND WRITE's range lock when the LU is reset was in the
    /// task set: it ends TASK ABORTED at once and never reaches the medium, and the reset's
    /// response waits only for the COMPARE AND WRITE's write in flight. One that arrives
    /// after the reset runs.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_waiting_for_a_compare_and_write_during_a_reset_never_lands() {
        let (gate, v, p) = preempt_setup().await;
        let handle = v.view().get(&0).unwrap().clone();
        gate.set(false);
        let caw = tokio::spawn(caw_block_8(&v).finish());
        tokio::time::sleep(Duration::from_millis(50)).await;
        let write = tokio::spawn(write_128k_at(&p, Some(Instant::now())).finish());
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(handle.lu().waiting_tasks(), 1);
        let outcome = p.task_mgmt(TmfFunction::LogicalUnitReset, 0, Some(Instant::now()));
        let mut response = tokio::spawn(outcome.drained());
        let (w, _) = tokio::time::timeout(Duration::from_secs(5), write)
            .await
            .expect("the aborted waiting write was not woken")
            .unwrap();
        assert_eq!(w.status, ironlun_scsi::status::TASK_ABORTED, "{w:?}");
        assert!(
            tokio::time::timeout(Duration::from_millis(300), &mut response)
                .await
                .is_err(),
            "LUN RESET completed while the COMPARE AND WRITE's write was in flight"
        );
        gate.set(true);
        assert_eq!(response.await.unwrap(), TmfResponse::FunctionComplete);
        let (c, _) = caw.await.unwrap();
        assert_eq!(c.status, ironlun_scsi::status::TASK_ABORTED, "{c:?}");
        let medium = gate.read(0, 128 * 1024).unwrap();
        assert!(
            medium.iter().all(|b| *b == 0 || *b == 0xcd),
            "the aborted write reached the medium"
        );
        // The reset's unit attention (29h/03h) first.
        let ua = p
            .execute(0, Bytes::from_static(&[0; 6]), Bytes::new())
            .await
            .0;
        assert_eq!(ua.status, 2, "{ua:?}");
        let (w, _) = write_128k_at(&p, Some(Instant::now())).finish().await;
        assert_eq!(w.status, 0, "{w:?}");
        assert!(gate.read(0, 128 * 1024).unwrap().iter().all(|b| *b == 0xab));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cancelled_task_is_abandoned_only_after_its_io() {
        let (gate, v, p) = preempt_setup().await;
        gate.set(false);
        let write = tokio::spawn(write_128k(&v).finish());
        tokio::time::sleep(Duration::from_millis(50)).await;
        // The connection's task goes away (runtime shutdown); the I/O itself still runs.
        write.abort();
        let p = Arc::new(p);
        let p2 = p.clone();
        let mut preempt = tokio::spawn(async move { prout(&p2, 5, 5, KP, KV).await });
        assert!(
            tokio::time::timeout(Duration::from_millis(300), &mut preempt)
                .await
                .is_err(),
            "PREEMPT AND ABORT did not wait for the cancelled task's I/O"
        );
        gate.set(true);
        let c = tokio::time::timeout(Duration::from_secs(5), preempt)
            .await
            .expect("PREEMPT AND ABORT never completed")
            .unwrap();
        assert_eq!(c.status, 0, "{c:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pending_command_dropped_before_its_io_is_abandoned() {
        let (_gate, v, p) = preempt_setup().await;
        let pending = write_128k(&v);
        let p = Arc::new(p);
        let p2 = p.clone();
        let mut preempt = tokio::spawn(async move { prout(&p2, 5, 5, KP, KV).await });
        assert!(
            tokio::time::timeout(Duration::from_millis(200), &mut preempt)
                .await
                .is_err(),
            "PREEMPT AND ABORT did not wait for the task that had its I/O handed out"
        );
        drop(pending);
        let c = tokio::time::timeout(Duration::from_secs(5), preempt)
            .await
            .expect("PREEMPT AND ABORT waits for a dropped task")
            .unwrap();
        assert_eq!(c.status, 0, "{c:?}");
    }

    #[tokio::test]
    async fn a_commit_without_effects_reports_its_completion() {
        let dir = tempfile::tempdir().unwrap();
        let h = ram_handle(dir.path());
        let good = lu::Completion::good(Bytes::new());
        let commit = PrCommit {
            abort: None,
            persist: None,
            completion: good.clone(),
            origin: None,
        };
        assert_eq!(commit_pr(&h, commit, 0).await, good);
        assert!(!h.state_file.exists());
    }

    #[test]
    fn event_log_is_a_bounded_ring_with_increasing_seq() {
        let log = EventLog::new(3);
        for i in 0..5u64 {
            assert_eq!(
                log.record("t/0", "pr_out", serde_json::json!({ "i": i })),
                i + 1
            );
        }
        let all = log.since(0);
        assert_eq!(all.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![3, 4, 5]);
        assert_eq!(all[0].detail["i"], 2);
        assert!(all.iter().all(|e| e.time_unix_ms > 0 && e.lun == "t/0"));
        assert_eq!(log.since(4).len(), 1);
        assert!(log.since(5).is_empty());
    }
}
