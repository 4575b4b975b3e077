//! Portals, connections and graceful shutdown: the only place that knows sockets.
//!
//! Each accepted connection gets one task that owns the sans-IO [`Connection`], reads into a
//! `BytesMut`, and writes transmits with vectored writes. A SCSI command whose I/O is cheap
//! (see [`crate::target`]: RAM, small page-cached transfers) runs to completion on the
//! connection's task as soon as it is framed; the others get one task each, so commands of a
//! connection run concurrently and complete in any order. Everything that completed while a
//! batch of received PDUs was handled goes out in one vectored write.
//!
//! Connections live on I/O threads ([`Shard`]s), each a current-thread runtime, assigned round
//! robin at accept: a connection's task never migrates, so a wake-up touches one thread. (On the
//! work-stealing runtime every wake-up also unparked an idle worker to look for work; on
//! loopback with two cores that halved 4 KiB QD32 IOPS.) There are as many shards as the
//! calling runtime has workers.
//!
//! # Memory and threads
//! Payload held for peers is charged to one [`MemoryBudget`] (`[limits] max_buffered`): a
//! command's expected Data-In is charged before it starts, and the charge is held until its
//! response PDUs have been written to the socket. A command that finds no room waits in its
//! connection (in order, behind any earlier one), and the connection stops reading its socket
//! until a release wakes it: back-pressure on the peer instead of allocation. At most
//! `cmd_window` commands of a connection are in flight off its task. Received write data is
//! charged as it is held ([`crate::budget`]), and bounded before it arrives: each connection's
//! Data-Out allowance is set from the budget before every read ([`Commands::pace`]), so the
//! target solicits write data (R2T) only as there is room and answers WRITEs whose unsolicited
//! data does not fit with TASK SET FULL (see `Connection::set_data_out_allowance`). The receive buffer itself is bounded by the
//! framer: one frame is at most MaxRecvDataSegmentLength plus headers and digests, so the buffer
//! stays below [`READ_CHUNK`] plus about twice the largest frame.
//!
//! Every thread pool is bounded by configuration ([`ThreadPlan`]): the main runtime's workers and
//! blocking pool, and per shard one I/O thread and its blocking pool.

use crate::budget::{Account, Charge, MemoryBudget};
use crate::config::{BackstoreKind, Config};
use crate::logging::ConnectionEnd;
use crate::target::{Nexus, Registry, Started, TmfOutcome};
use bytes::{Bytes, BytesMut};
use ironlun_iscsi::acl::SessionLimits;
use ironlun_iscsi::connection::{
    Connection, Event, PortalConfig, ScsiCommandEvent, ScsiCompletion, TargetInfo,
};
use ironlun_iscsi::discovery::TargetPortal;
use ironlun_iscsi::pdu::{TmfFunction, TmfResponse};
use std::collections::{HashMap, HashSet, VecDeque};
use std::io::IoSlice;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tracing::Instrument;

/// How long shutdown waits for in-flight commands before closing connections anyway.
const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How often idle read buffers parked in the LUs' pools are looked at (they are freed once
/// idle for `ironlun_backstore::buffers::IDLE_AFTER`).
const POOL_TRIM_EVERY: Duration = Duration::from_secs(5);
/// Receive buffer growth step.
const READ_CHUNK: usize = 256 * 1024;
/// Most iovecs handed to one `writev` (Linux IOV_MAX is 1024).
const MAX_IOV: usize = 512;
/// Seconds a logged-in initiator is given to log out at shutdown (Async Message Parameter3).
const LOGOUT_GRACE_SECS: u16 = 2;
/// Longest a write may make no progress when NOP-In pings are off (with pings: `nop_timeout`).
const WRITE_STALL_DEFAULT: Duration = Duration::from_secs(30);

/// A bound, not yet serving, daemon.
pub struct Server {
    listeners: Vec<(TcpListener, PortalCell, watch::Receiver<bool>)>,
    registry: Arc<Registry>,
    live: Arc<SessionTable>,
    control: Control,
    added: mpsc::UnboundedReceiver<NewPortal>,
    /// Payload held for peers, daemon-wide.
    budget: Arc<MemoryBudget>,
    /// The threads the shards may use.
    threads: ThreadPlan,
    /// Cluster mode: this gateway's membership (renewed while serving, left at the end).
    cluster: Option<(Arc<crate::cluster::Membership>, String)>,
}

/// The daemon's threads, every pool bounded and counted together: the main runtime's
/// `workers` and its blocking pool, `io_threads` shards (one thread and one blocking pool
/// each), and the `uring` LUNs' driver threads. `[runtime] blocking_threads` is the total of the
/// blocking pools ([`blocking_split`]).
///
/// Everything the daemon runs off an async task goes through one of these blocking pools:
/// file-backstore I/O, EXTENDED COPY chunks and PR state-file writes of commands (the shard's
/// pool), reloads, handover flushes and the final flush (the main runtime's pool). The only
/// `std::thread::spawn`s of the crate are in `migrate.rs`, the `ironlun migrate` client process,
/// which runs one step at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThreadPlan {
    /// Async workers of the main runtime.
    pub workers: usize,
    /// Shards: one per worker.
    pub io_threads: usize,
    /// Most blocking threads of the main runtime.
    pub blocking_main: usize,
    /// Most blocking threads of each shard.
    pub blocking_per_io_thread: usize,
    /// One driver thread per configured `uring` LUN (LUNs added later add theirs).
    pub uring_threads: usize,
    /// `[runtime] busy_poll_us` (not a thread, but how the shards' connections wait).
    pub busy_poll: Duration,
}

impl ThreadPlan {
    /// The plan for `workers` workers (at least 1) and `blocking_total` blocking threads across
    /// all runtimes (`None`: [`default_blocking_threads`]), for the LUNs of `cfg`.
    pub fn new(workers: usize, blocking_total: Option<usize>, cfg: &Config) -> ThreadPlan {
        let workers = workers.max(1);
        let total = blocking_total.unwrap_or_else(|| default_blocking_threads(workers));
        let (blocking_main, blocking_per_io_thread) = blocking_split(total, workers);
        let uring_threads = cfg
            .targets
            .iter()
            .flat_map(|t| &t.luns)
            .filter(|l| matches!(l.backstore, BackstoreKind::Uring { .. }))
            .count();
        ThreadPlan {
            workers,
            io_threads: workers,
            blocking_main,
            blocking_per_io_thread,
            uring_threads,
            busy_poll: cfg.runtime.busy_poll,
        }
    }

    /// The most threads the process runs: the main thread, the workers, the shards, every
    /// blocking pool at its bound and the `uring` drivers.
    pub fn max_threads(&self) -> usize {
        1usize
            .saturating_add(self.workers)
            .saturating_add(self.io_threads)
            .saturating_add(self.blocking_main)
            .saturating_add(self.io_threads.saturating_mul(self.blocking_per_io_thread))
            .saturating_add(self.uring_threads)
    }
}

/// `[runtime] blocking_threads` when not configured: 16 per runtime (the main one and one per
/// worker), at least [`crate::config::DEFAULT_BLOCKING_THREADS`].
pub fn default_blocking_threads(workers: usize) -> usize {
    workers
        .saturating_add(1)
        .saturating_mul(16)
        .max(crate::config::DEFAULT_BLOCKING_THREADS)
}

/// Split `total` blocking threads between the main runtime and `io_threads` shards: each shard
/// gets `total / (io_threads + 1)`, the main runtime the rest; each at least 1 (so the sum
/// exceeds `total` only when `total` is below `io_threads + 1`). Returns (main, per shard).
pub fn blocking_split(total: usize, io_threads: usize) -> (usize, usize) {
    let runtimes = io_threads.saturating_add(1);
    let per_shard = (total / runtimes).max(1);
    let main = total
        .saturating_sub(per_shard.saturating_mul(io_threads))
        .max(1);
    (main, per_shard)
}

/// A portal's current configuration: new connections take the `Arc` inside, so a change
/// applies to the next login without touching running connections.
pub type PortalCell = Arc<std::sync::RwLock<Arc<PortalConfig>>>;

/// A portal bound while running, handed to [`Server::run`] to accept on.
type NewPortal = (std::net::TcpListener, PortalCell, watch::Receiver<bool>);

/// One served portal, as [`Control`] sees it.
struct PortalSlot {
    /// As configured (`127.0.0.1:0` stays `:0`), and its tag.
    listen: SocketAddr,
    tpgt: u16,
    /// The bound address.
    bound: SocketAddr,
    cell: PortalCell,
    /// `true` stops its accept loop (its connections keep running).
    stop: watch::Sender<bool>,
}

/// Changes to the running server's portals and sessions ([`crate::reconfig`]).
#[derive(Clone)]
pub struct Control {
    portals: Arc<Mutex<Vec<PortalSlot>>>,
    add: mpsc::UnboundedSender<NewPortal>,
    sessions: Arc<SessionLimits>,
    auth_limiter: Arc<Mutex<ironlun_iscsi::chap::AuthLimiter>>,
    live: Arc<SessionTable>,
}

impl Control {
    fn slots(&self) -> std::sync::MutexGuard<'_, Vec<PortalSlot>> {
        self.portals
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The served portals: configured address, tag, bound address.
    pub fn portals(&self) -> Vec<(SocketAddr, u16, SocketAddr)> {
        self.slots()
            .iter()
            .map(|p| (p.listen, p.tpgt, p.bound))
            .collect()
    }

    /// Bind `listen` as a portal of group `tpgt` serving `cfg`'s targets; it accepts once
    /// [`Server::run`] picks it up.
    pub fn add_portal(
        &self,
        cfg: &Config,
        listen: SocketAddr,
        tpgt: u16,
    ) -> Result<SocketAddr, String> {
        let l = std::net::TcpListener::bind(listen).map_err(|e| format!("bind {listen}: {e}"))?;
        l.set_nonblocking(true)
            .map_err(|e| format!("bind {listen}: {e}"))?;
        let bound = l.local_addr().map_err(|e| e.to_string())?;
        let mut slots = self.slots();
        let mut portals = target_portals(&slots);
        portals.push(TargetPortal::new(bound, tpgt));
        let pc = portal_config(cfg, &portals, tpgt, &self.sessions, &self.auth_limiter);
        let cell: PortalCell = Arc::new(std::sync::RwLock::new(Arc::new(pc)));
        let (stop, stop_rx) = watch::channel(false);
        self.add
            .send((l, cell.clone(), stop_rx))
            .map_err(|_| "the server is shutting down".to_string())?;
        slots.push(PortalSlot {
            listen,
            tpgt,
            bound,
            cell,
            stop,
        });
        // SendTargets on every other portal lists the new one too.
        readdress(&slots);
        tracing::info!(%listen, %bound, tpgt, "portal added");
        Ok(bound)
    }

    /// Stop accepting on the portal configured as `listen`/`tpgt`; its connections keep
    /// running until they end. `false` when there is no such portal.
    pub fn remove_portal(&self, listen: SocketAddr, tpgt: u16) -> bool {
        let mut slots = self.slots();
        let Some(i) = slots
            .iter()
            .position(|p| p.listen == listen && p.tpgt == tpgt)
        else {
            return false;
        };
        let p = slots.remove(i);
        let _ = p.stop.send(true);
        readdress(&slots);
        tracing::info!(%listen, bound = %p.bound, tpgt, "portal removed; its connections keep running");
        true
    }

    /// Rebuild every portal's configuration from `cfg` (targets, ACLs, CHAP): the next
    /// login on each portal uses it.
    pub fn refresh(&self, cfg: &Config) {
        let slots = self.slots();
        let portals = target_portals(&slots);
        for p in slots.iter() {
            let pc = portal_config(cfg, &portals, p.tpgt, &self.sessions, &self.auth_limiter);
            *p.cell
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(pc);
        }
    }

    /// Close the sessions to `target` of initiators `keep` refuses (an ACL entry or the
    /// target removed); returns how many were told to close.
    pub fn close_sessions(&self, target: &str, keep: impl Fn(&str) -> bool) -> usize {
        let mut live = self.live.lock();
        let doomed: Vec<SessionKey> = live
            .keys()
            .filter(|k| k.2.eq_ignore_ascii_case(target) && !keep(&k.0))
            .cloned()
            .collect();
        for k in &doomed {
            if let Some((_, tx)) = live.remove(k) {
                tracing::info!(initiator = %k.0, target = %k.2, "closing the session: target removed or initiator no longer allowed");
                let _ = tx.send("target removed or initiator no longer allowed");
            }
        }
        doomed.len()
    }
}

/// Every served portal as SendTargets reports it: bound address (port 0 resolved) and tag, in
/// the order the portals were configured. Every target is served on every portal, so this is
/// each target's address list (RFC 7143 §13.3: all its portals in all its portal groups).
fn target_portals(slots: &[PortalSlot]) -> Vec<TargetPortal> {
    slots
        .iter()
        .map(|p| TargetPortal::new(p.bound, p.tpgt))
        .collect()
}

/// After a portal was added or removed: every portal's configuration lists the portals now
/// served, for the next connection's SendTargets (running connections keep theirs).
fn readdress(slots: &[PortalSlot]) {
    let portals = target_portals(slots);
    for p in slots {
        let mut cell = p
            .cell
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut pc = PortalConfig::clone(&cell);
        for t in &mut pc.targets {
            t.addresses.clone_from(&portals);
        }
        *cell = Arc::new(pc);
    }
}

/// The configuration of a portal of group `tpgt` serving `cfg`'s targets, which SendTargets
/// reports on `portals` (every portal the daemon serves, [`target_portals`]).
fn portal_config(
    cfg: &Config,
    portals: &[TargetPortal],
    tpgt: u16,
    sessions: &Arc<SessionLimits>,
    auth_limiter: &Arc<Mutex<ironlun_iscsi::chap::AuthLimiter>>,
) -> PortalConfig {
    let targets = cfg
        .targets
        .iter()
        .map(|t| TargetInfo {
            name: t.name.clone(),
            alias: t.alias.clone(),
            addresses: portals.to_vec(),
            portal_group_tag: tpgt,
            acl: t.acl.clone(),
            chap: t.chap.clone(),
        })
        .collect();
    PortalConfig {
        targets,
        offers: cfg.negotiation.offers.clone(),
        limits: Default::default(),
        portal_group_tag: tpgt,
        cmd_window: cfg.negotiation.cmd_window,
        sessions: sessions.clone(),
        timeouts: cfg.timeouts,
        discovery_chap: cfg.discovery_chap.clone(),
        auth_limiter: auth_limiter.clone(),
    }
}

/// Key of a live normal session: initiator name (lowercase), ISID, target name (lowercase),
/// target portal group tag (RFC 7143 §4.4.1: a session is identified by the initiator port
/// (name + ISID) and the target port (name + TPGT); the same ISID through another portal group
/// is another session, e.g. one path of a multipath setup, not a reinstatement).
type SessionKey = (String, [u8; 6], String, u16);

/// Live normal sessions, for session reinstatement (RFC 7143 §6.3.5): a login with the key of
/// a live session (TSIH 0) closes the old one, whose tasks are aborted and whose nexus is
/// dropped (an I_T nexus loss for its LUs). Touched once per login and once per session end,
/// never per command.
#[derive(Default)]
struct SessionTable {
    next_id: AtomicU64,
    live: Mutex<HashMap<SessionKey, (u64, oneshot::Sender<&'static str>)>>,
}

/// A session's entry in the [`SessionTable`]; removed on drop unless a newer login replaced it.
struct LiveSession {
    table: Arc<SessionTable>,
    key: SessionKey,
    id: u64,
}

impl SessionTable {
    #[allow(clippy::type_complexity)]
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<SessionKey, (u64, oneshot::Sender<&'static str>)>> {
        self.live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Register a session that just logged in, telling the session with the same key (if any)
    /// to close. The receiver fires (with the reason) when a later login reinstates this one or
    /// an ACL change removes its initiator ([`Control::close_sessions`]).
    fn register(
        self: &Arc<Self>,
        key: SessionKey,
    ) -> (LiveSession, oneshot::Receiver<&'static str>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        if let Some((_, old)) = self.lock().insert(key.clone(), (id, tx)) {
            tracing::info!(initiator = %key.0, target = %key.2, "session reinstatement: closing the previous session");
            let _ = old.send("session reinstated by a new login");
        }
        (
            LiveSession {
                table: self.clone(),
                key,
                id,
            },
            rx,
        )
    }
}

impl SessionTable {
    /// Tell every live session to target `target` (any initiator, any portal group) to close
    /// with `why`; returns how many. For TARGET COLD RESET (RFC 7143 §11.5.1: the target
    /// drops all its connections after the response); sessions to other targets of the
    /// daemon are separate SCSI target devices and keep running.
    fn close_target(&self, target: &str, why: &'static str) -> usize {
        let mut live = self.lock();
        let doomed: Vec<SessionKey> = live
            .keys()
            .filter(|k| k.2.eq_ignore_ascii_case(target))
            .cloned()
            .collect();
        for k in &doomed {
            if let Some((_, tx)) = live.remove(k) {
                let _ = tx.send(why);
            }
        }
        doomed.len()
    }
}

impl Drop for LiveSession {
    fn drop(&mut self) {
        let mut live = self.table.lock();
        if live.get(&self.key).is_some_and(|(id, _)| *id == self.id) {
            live.remove(&self.key);
        }
    }
}

impl Server {
    /// Open every backend and bind every portal; the shards [`Server::run`] starts use
    /// `threads`.
    pub async fn bind(cfg: &Config, threads: ThreadPlan) -> Result<Server, String> {
        crate::metrics::DAEMON.started();
        let registry = Arc::new(Registry::build(cfg)?);
        // Cluster mode: join before any portal accepts, so no command meets an LU that is
        // not yet under its replicated state.
        let cluster = match &cfg.cluster {
            Some(c) => Some((
                crate::target::cluster::attach(cfg, &registry).await?,
                c.name.clone(),
            )),
            None => None,
        };
        let mut bound = Vec::new();
        for p in &cfg.portals {
            let l = TcpListener::bind(p.listen)
                .await
                .map_err(|e| format!("bind {}: {e}", p.listen))?;
            let addr = l.local_addr().map_err(|e| e.to_string())?;
            bound.push((l, addr, p.tpgt));
        }
        // One set of session counters for every portal: limits are per target and daemon-wide.
        let sessions = Arc::new(
            cfg.targets
                .iter()
                .fold(SessionLimits::new(cfg.limits.max_sessions), |limits, t| {
                    limits.with_target(&t.name, t.max_sessions)
                }),
        );
        // CHAP failures are counted per initiator name across every portal.
        let auth_limiter = Arc::new(std::sync::Mutex::new(
            ironlun_iscsi::chap::AuthLimiter::default(),
        ));
        let mut listeners = Vec::new();
        let mut slots = Vec::new();
        let portals: Vec<TargetPortal> = bound
            .iter()
            .map(|(_, addr, tpgt)| TargetPortal::new(*addr, *tpgt))
            .collect();
        for ((l, addr, tpgt), p) in bound.into_iter().zip(&cfg.portals) {
            let pc = portal_config(cfg, &portals, tpgt, &sessions, &auth_limiter);
            let cell: PortalCell = Arc::new(std::sync::RwLock::new(Arc::new(pc)));
            let (stop, stop_rx) = watch::channel(false);
            listeners.push((l, cell.clone(), stop_rx));
            slots.push(PortalSlot {
                listen: p.listen,
                tpgt,
                bound: addr,
                cell,
                stop,
            });
        }
        let live: Arc<SessionTable> = Arc::default();
        let (add, added) = mpsc::unbounded_channel();
        let control = Control {
            portals: Arc::new(Mutex::new(slots)),
            add,
            sessions,
            auth_limiter,
            live: live.clone(),
        };
        // Idle read buffers the LUs' pools keep are payload memory too: at most an eighth of
        // the budget (and never more than the pool's own default), freed after seconds idle.
        let pooled = usize::try_from(cfg.limits.max_buffered / 8)
            .unwrap_or(usize::MAX)
            .min(ironlun_backstore::buffers::DEFAULT_RETAINED_LIMIT);
        ironlun_backstore::buffers::set_retained_limit(pooled);
        let budget = MemoryBudget::new(cfg.limits.max_buffered);
        crate::metrics::DAEMON.set_budget(budget.clone());
        Ok(Server {
            listeners,
            registry,
            live,
            control,
            added,
            budget,
            threads,
            cluster,
        })
    }

    /// Portal and session changes while running ([`crate::reconfig`]).
    pub fn control(&self) -> Control {
        self.control.clone()
    }

    /// The targets and LUs being served (read by the admin API).
    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    /// The addresses actually bound (port 0 resolved).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|(l, _, _)| l.local_addr().ok())
            .collect()
    }

    /// Serve until `shutdown` flips to true; then stop accepting, let in-flight commands finish,
    /// close connections and flush every backend.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        if let Some((m, name)) = &self.cluster {
            let (m, name, mut stop) = (m.clone(), name.clone(), shutdown.clone());
            tokio::spawn(async move {
                m.run(&name, async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await;
            });
        }
        let mut conns = JoinSet::new();
        let mut accepts = JoinSet::new();
        let (conn_tx, mut conn_rx) = mpsc::unbounded_channel::<Accepted>();
        for (l, cell, stop) in self.listeners {
            accepts.spawn(accept_loop(
                l,
                cell,
                stop,
                conn_tx.clone(),
                shutdown.clone(),
            ));
        }
        let mut added = self.added;
        let shards =
            Shard::start_many(self.threads.io_threads, self.threads.blocking_per_io_thread);
        let mut next_shard = 0usize;
        // Idle read buffers are also freed when nothing reads any more (a pool trims itself
        // only when a buffer comes back to it).
        // Once no payload has moved for a while, free heap memory goes back too (crate::heap).
        let mut trim = tokio::time::interval(POOL_TRIM_EVERY);
        trim.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut idle = crate::heap::IdleRelease::default();
        loop {
            tokio::select! {
                _ = trim.tick() => {
                    ironlun_backstore::buffers::trim_idle();
                    let pools_empty = ironlun_backstore::buffers::retained_bytes() == 0;
                    if idle.tick(self.budget.activity(), pools_empty) {
                        let released = crate::heap::release();
                        tracing::debug!(released, "idle: free heap memory given back");
                    }
                }
                Some((s, peer, pc, open)) = conn_rx.recv() => {
                    let reg = self.registry.clone();
                    let live = self.live.clone();
                    let sd = shutdown.clone();
                    let account = self.budget.account();
                    let busy = self.threads.busy_poll;
                    // initiator, target and tsih are recorded at login (`crate::logging`).
                    let span = tracing::info_span!(
                        "conn",
                        %peer,
                        initiator = tracing::field::Empty,
                        target = tracing::field::Empty,
                        tsih = tracing::field::Empty
                    );
                    let serve = move |s: TcpStream| async move {
                        let _open = open;
                        if let Err(e) = serve_connection(s, pc, reg, live, account, busy, sd).await {
                            tracing::debug!(error = %e, "connection ended with error");
                        }
                    };
                    next_shard = next_shard.wrapping_add(1);
                    match shards.get(next_shard % shards.len().max(1)) {
                        Some(shard) => match s.into_std() {
                            // Re-registered with the shard's reactor inside the task.
                            Ok(std) => {
                                conns.spawn_on(
                                    async move {
                                        match TcpStream::from_std(std) {
                                            Ok(s) => serve(s).await,
                                            Err(e) => tracing::warn!(error = %e, "cannot move connection to its I/O thread"),
                                        }
                                    }
                                    .instrument(span),
                                    &shard.handle,
                                );
                            }
                            Err(e) => tracing::warn!(error = %e, "cannot move connection to its I/O thread"),
                        },
                        None => {
                            conns.spawn(serve(s).instrument(span));
                        }
                    }
                }
                Some((l, cell, stop)) = added.recv() => match TcpListener::from_std(l) {
                    Ok(l) => {
                        accepts.spawn(accept_loop(l, cell, stop, conn_tx.clone(), shutdown.clone()));
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot accept on an added portal"),
                },
                Some(_) = accepts.join_next(), if !accepts.is_empty() => {}
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
                _ = shutdown.changed() => break,
            }
        }
        tracing::info!("shutting down: draining {} connection(s)", conns.len());
        accepts.shutdown().await;
        let drain = async { while conns.join_next().await.is_some() {} };
        if tokio::time::timeout(DRAIN_TIMEOUT + std::time::Duration::from_secs(2), drain)
            .await
            .is_err()
        {
            tracing::warn!("connections did not close in time; aborting them");
            conns.shutdown().await;
        }
        for shard in shards {
            shard.stop();
        }
        let reg = self.registry.clone();
        let _ = tokio::task::spawn_blocking(move || reg.flush_all()).await;
        if let Some((m, _)) = &self.cluster {
            // The lease goes now rather than at expiry: the others need not wait T + Δ.
            match tokio::time::timeout(crate::target::cluster::LEAVE_TIMEOUT, m.leave()).await {
                Ok(Ok(())) => tracing::info!("left the cluster"),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cluster: cannot revoke the lease; it expires on its own")
                }
                Err(_) => {
                    tracing::warn!("cluster: lease revocation timed out; it expires on its own")
                }
            }
        }
        tracing::info!("stopped");
    }
}

/// An accepted connection on its way to an I/O thread, with its portal's configuration and
/// its open-connection count ([`crate::metrics`]).
type Accepted = (
    TcpStream,
    SocketAddr,
    Arc<PortalConfig>,
    crate::metrics::OpenConnection,
);

/// Accept on `l` until `stop` or `shutdown`; each connection takes the portal's current
/// configuration.
async fn accept_loop(
    l: TcpListener,
    cell: PortalCell,
    mut stop: watch::Receiver<bool>,
    tx: mpsc::UnboundedSender<Accepted>,
    mut sd: watch::Receiver<bool>,
) {
    let portal = l.local_addr().map(fmt_addr).unwrap_or_default();
    let counts = crate::metrics::DAEMON.portal(&portal);
    loop {
        tokio::select! {
            r = l.accept() => match r {
                Ok((s, peer)) => {
                    let pc = cell.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
                    if tx.send((s, peer, pc, counts.accept())).is_err() { return; }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            r = stop.changed() => if r.is_err() || *stop.borrow() { return },
            _ = sd.changed() => return,
        }
    }
}

/// One I/O thread: a current-thread runtime running the connections placed on it (and its own
/// blocking pool for their large I/O).
struct Shard {
    handle: tokio::runtime::Handle,
    stop: tokio::sync::oneshot::Sender<()>,
}

impl Shard {
    /// Start `n` shards, each with at most `blocking` blocking threads (fewer shards if threads
    /// cannot be created; none means connections stay on the calling runtime).
    fn start_many(n: usize, blocking: usize) -> Vec<Shard> {
        (0..n.max(1))
            .filter_map(|i| match Shard::start(i, blocking) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start I/O thread");
                    None
                }
            })
            .collect()
    }

    fn start(index: usize, blocking: usize) -> std::io::Result<Shard> {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        // The runtime is built and dropped on its own thread (dropping one inside async code panics).
        std::thread::Builder::new()
            .name(format!("ironlun-io-{index}"))
            .spawn(move || {
                IO_THREAD.with(|t| t.set(true));
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .max_blocking_threads(blocking.max(1))
                    .build()
                {
                    Ok(rt) => {
                        let _ = ready_tx.send(Ok(rt.handle().clone()));
                        // Runs until stopped; dropping the runtime then cancels what is left on it.
                        rt.block_on(async {
                            let _ = stopped.await;
                        });
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })?;
        // Waits only for the runtime to be built (microseconds, once per shard at start).
        let handle = ready_rx
            .recv()
            .map_err(|_| std::io::Error::other("I/O thread exited"))??;
        Ok(Shard { handle, stop })
    }

    /// Let the thread end (its connections are already closed or abandoned).
    fn stop(self) {
        let _ = self.stop.send(());
    }
}

fn fmt_addr(a: SocketAddr) -> String {
    match a {
        SocketAddr::V4(v) => v.to_string(),
        SocketAddr::V6(v) => format!("[{}]:{}", v.ip(), v.port()),
    }
}

/// `fut`'s output, or `None` if it is still pending `bound` after its first poll. A timer is
/// armed only when the first poll is pending, so a write that goes straight into the socket
/// buffer costs no timer.
async fn within<F: std::future::Future>(bound: Duration, fut: F) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    if let Poll::Ready(v) = std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await {
        return Some(v);
    }
    tokio::time::timeout(bound, fut).await.ok()
}

/// Write every piece, using vectored writes (header and payload `Bytes` are not copied). A
/// peer that stops reading fails the write once no byte was taken for `stall` (a full send
/// buffer must not keep the connection, and its buffers, forever).
async fn write_all_vectored<W: AsyncWrite + Unpin>(
    w: &mut W,
    pieces: &mut Vec<Bytes>,
    stall: Duration,
) -> std::io::Result<()> {
    let mut start = 0;
    while start < pieces.len() {
        let slices: Vec<IoSlice<'_>> = pieces
            .get(start..)
            .unwrap_or(&[])
            .iter()
            .take(MAX_IOV)
            .map(|b| IoSlice::new(b))
            .collect();
        let Some(written) = within(stall, w.write_vectored(&slices)).await else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "peer stopped reading",
            ));
        };
        let mut n = written?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        drop(slices);
        while n > 0 {
            let Some(p) = pieces.get_mut(start) else {
                break;
            };
            if n >= p.len() {
                n -= p.len();
                start += 1;
            } else {
                let _ = p.split_to(n);
                n = 0;
            }
        }
        while pieces.get(start).is_some_and(Bytes::is_empty) {
            start += 1;
        }
    }
    pieces.clear();
    Ok(())
}

/// Data-Out the connection holds or awaits while assembling writes
/// ([`Connection::committed_data_out_bytes`]: grows with the bytes received and with what it
/// solicited within its allowance, never with ExpectedDataTransferLength up front).
fn committed_data_out_bytes(conn: &Connection) -> u64 {
    u64::try_from(conn.committed_data_out_bytes()).unwrap_or(u64::MAX)
}

/// Largest READ the LUs run: `LuConfig::max_transfer_blocks` is 16 MiB of blocks
/// (Block Limits VPD, SBC-3 §6.6.4); longer READs fail before any I/O.
const MAX_READ_BYTES: u64 = 16 * 1024 * 1024;
/// Smallest and largest block sizes a LUN may have (`config::Lun::block_size`).
const MIN_BLOCK: u64 = 512;
const MAX_BLOCK: u64 = 4096;

/// The Data-In to charge for `cmd` before it starts: its ExpectedDataTransferLength, unless
/// it is a READ whose CDB asks for more than that. The LU reads what the CDB asks (the transport
/// cuts the Data-In to the expected length afterwards, RFC 7143 §11.4.5.1), so a READ of
/// 16 MiB sent with an expected length of 0 must be charged its buffer. The LUN's block size is
/// not known here: a CDB that asks for more than the expected length even at 512-byte blocks
/// is charged at 4096-byte blocks (at most [`MAX_READ_BYTES`]); honest initiators send the
/// CDB's length and pay nothing extra.
fn data_in_bound(cmd: &ScsiCommandEvent) -> u64 {
    use ironlun_scsi::cdb::{op, Command};
    let expected = u64::from(cmd.expected_in_len);
    let is_read = matches!(
        cmd.cdb.first().copied(),
        Some(op::READ_6 | op::READ_10 | op::READ_12 | op::READ_16)
    );
    if !is_read {
        return expected;
    }
    let Ok(Command::Read { ext, .. }) = ironlun_scsi::cdb::parse(&cmd.cdb) else {
        return expected;
    };
    let blocks = u64::from(ext.blocks);
    if blocks.saturating_mul(MIN_BLOCK) <= expected {
        return expected;
    }
    blocks
        .saturating_mul(MAX_BLOCK)
        .min(MAX_READ_BYTES)
        .max(expected)
}

/// What a started command holds of the budget until its response is on the socket.
struct Held {
    /// Its expected Data-In (charged before it started).
    data_in: Charge,
    /// Its received write data.
    _data_out: Charge,
    /// Data-In beyond the expected length (a CDB asking for more than the
    /// ExpectedDataTransferLength): charged once it exists.
    extra: Option<Charge>,
}

/// A finished command on its way back to the connection's task.
struct Done {
    itt: u32,
    completion: ScsiCompletion,
    spdtl: Option<u32>,
    held: Held,
}

/// A command that waits to start: for budget room, or for a free place among the connection's
/// commands in flight.
struct Waiting {
    cmd: ScsiCommandEvent,
    data_out: Charge,
}

/// The SCSI commands of one connection: waiting to start, in flight off its task, and finished
/// but not yet written (their charges).
///
/// Contract: every [`Event::Command`] goes through [`Commands::arrive`], which starts it when its
/// Data-In fits the budget and nothing started earlier waits, else queues it; the connection
/// stops reading while [`Commands::pause_reading`], calls [`Commands::start_ready`] when room may
/// have freed, and [`Commands::written`] after each successful socket write.
struct Commands {
    account: Account,
    waiting: VecDeque<Waiting>,
    /// Commands started off the connection's task and not yet back through `done_tx`.
    inflight: usize,
    /// Most commands in flight off the task (the session's CmdSN window).
    max_inflight: usize,
    /// Charges of commands whose responses are queued in the connection, released once the
    /// batch that carries them is written.
    unsent: Vec<Held>,
    done_tx: mpsc::UnboundedSender<Done>,
    /// EXTENDED COPYs in flight by ITT: ABORT TASK / ABORT TASK SET / LUN RESET / CLEAR TASK
    /// SET drop the sender, which stops the copy between chunks (crate::target::xcopy).
    copies: HashMap<u32, oneshot::Sender<()>>,
    /// Received Data-Out held by the connection while it assembles writes.
    assembling: Charge,
    /// ITTs of the commands started off the task and not yet back (a SANITIZE excepted: no
    /// task management function waits for it).
    running: HashSet<u32>,
    /// Of those, the ones the connection just reported aborted: the next task management
    /// response waits for them.
    aborted_running: Vec<u32>,
    /// Task management responses waiting for aborted tasks (SAM-5 §7), oldest first.
    tmfs: Vec<PendingTmf>,
}

/// At most this many task management responses wait for aborted tasks per connection; a
/// further function is answered FUNCTION REJECTED at once (it still aborts its tasks), so a
/// peer cannot make the connection hold state per TMF it sends while the backstore is slow.
const MAX_PENDING_TMFS: usize = 16;

/// A task management response held until the tasks it aborted have ended: those of this
/// connection (`tasks`, by ITT) and, through the LU's abort tickets, those of every nexus
/// (`drained`, set when [`TmfOutcome::drained`] resolves).
struct PendingTmf {
    itt: u32,
    function: TmfFunction,
    response: TmfResponse,
    drained: bool,
    tasks: Vec<u32>,
}

impl Commands {
    fn new(account: Account, max_inflight: usize, done_tx: mpsc::UnboundedSender<Done>) -> Self {
        let assembling = account.hold_received(0);
        Commands {
            account,
            waiting: VecDeque::new(),
            inflight: 0,
            max_inflight: max_inflight.max(1),
            unsent: Vec::new(),
            done_tx,
            copies: HashMap::new(),
            assembling,
            running: HashSet::new(),
            aborted_running: Vec::new(),
            tmfs: Vec::new(),
        }
    }

    /// A task management function arrived, with its outcome: its response now, or held
    /// until the tasks it aborted have ended (a task that waits on the LU is woken through
    /// `tmf_tx` with the function's ITT). Returns a response to send at once, if any.
    fn task_mgmt(
        &mut self,
        itt: u32,
        function: TmfFunction,
        outcome: TmfOutcome,
        tmf_tx: &mpsc::UnboundedSender<u32>,
    ) -> Option<(u32, TmfFunction, TmfResponse)> {
        let tasks = std::mem::take(&mut self.aborted_running);
        if outcome.is_ready() && tasks.is_empty() {
            return Some((itt, function, outcome.response));
        }
        if self.tmfs.len() >= MAX_PENDING_TMFS {
            tracing::debug!(
                itt,
                ?function,
                "too many task management functions waiting; rejected"
            );
            return Some((itt, function, TmfResponse::FunctionRejected));
        }
        let drained = outcome.is_ready();
        self.tmfs.push(PendingTmf {
            itt,
            function,
            response: outcome.response,
            drained,
            tasks,
        });
        if !drained {
            let tx = tmf_tx.clone();
            tokio::spawn(async move {
                outcome.drained().await;
                let _ = tx.send(itt);
            });
        }
        None
    }

    /// The command `itt` started off the task is back: no task management response waits for
    /// it any more.
    fn task_ended(&mut self, itt: u32) {
        self.running.remove(&itt);
        self.aborted_running.retain(|i| *i != itt);
        for t in &mut self.tmfs {
            t.tasks.retain(|i| *i != itt);
        }
    }

    /// The LU-side tasks of the function `itt` have drained.
    fn tmf_drained(&mut self, itt: u32) {
        if let Some(t) = self.tmfs.iter_mut().find(|t| t.itt == itt && !t.drained) {
            t.drained = true;
        }
    }

    /// Responses whose aborted tasks have all ended, in arrival order.
    fn ready_tmfs(&mut self) -> Vec<(u32, TmfFunction, TmfResponse)> {
        let mut ready = Vec::new();
        self.tmfs.retain(|t| {
            let done = t.drained && t.tasks.is_empty();
            if done {
                ready.push((t.itt, t.function, t.response));
            }
            !done
        });
        ready
    }

    /// A command whose data has all arrived: charge its write data (it exists), then start it
    /// or queue it behind the earlier ones.
    fn arrive(&mut self, conn: &mut Connection, nexus: Option<&Arc<Nexus>>, cmd: ScsiCommandEvent) {
        let len = u64::try_from(cmd.data_out.len()).unwrap_or(u64::MAX);
        let data_out = self.account.hold_received(len);
        self.waiting.push_back(Waiting { cmd, data_out });
        self.start_ready(conn, nexus);
    }

    /// Start waiting commands in order while the budget admits the next one's Data-In and
    /// fewer than `max_inflight` are in flight. Returns whether some still wait.
    fn start_ready(&mut self, conn: &mut Connection, nexus: Option<&Arc<Nexus>>) -> bool {
        while let Some(next) = self.waiting.front() {
            if self.inflight >= self.max_inflight {
                break;
            }
            let Some(data_in) = self.account.try_charge(data_in_bound(&next.cmd)) else {
                break;
            };
            let Some(w) = self.waiting.pop_front() else {
                break;
            };
            let held = Held {
                data_in,
                _data_out: w.data_out,
                extra: None,
            };
            self.start(conn, nexus, w.cmd, held);
        }
        let waits = !self.waiting.is_empty();
        if waits && !self.account.is_waiting() {
            let budget = self.account.budget();
            tracing::debug!(
                waiting = self.waiting.len(),
                inflight = self.inflight,
                used = budget.used(),
                limit = budget.limit(),
                "commands wait for memory budget or a free place in flight; not reading the socket"
            );
        }
        self.account.set_waiting(waits);
        waits
    }

    fn start(
        &mut self,
        conn: &mut Connection,
        nexus: Option<&Arc<Nexus>>,
        cmd: ScsiCommandEvent,
        held: Held,
    ) {
        let Some(n) = nexus else {
            let c = ironlun_scsi::lu::no_such_lun(&cmd.cdb);
            let completion = ScsiCompletion {
                status: c.status,
                sense: c.sense,
                data_in: c.data,
            };
            self.complete(
                conn,
                Done {
                    itt: cmd.itt,
                    completion,
                    spdtl: None,
                    held,
                },
            );
            return;
        };
        match n.start_at(cmd.lun, cmd.cdb, cmd.data_out, Some(cmd.arrived)) {
            Started::Done(completion, spdtl) => self.complete(
                conn,
                Done {
                    itt: cmd.itt,
                    completion,
                    spdtl,
                    held,
                },
            ),
            Started::Pending(p) => {
                let tx = self.done_tx.clone();
                self.inflight = self.inflight.saturating_add(1);
                let cancel = p.is_copy().then(|| {
                    self.copies.retain(|_, c| !c.is_closed());
                    let (ctx, crx) = oneshot::channel::<()>();
                    self.copies.insert(cmd.itt, ctx);
                    crx
                });
                let itt = cmd.itt;
                if !p.is_sanitize() {
                    self.running.insert(itt);
                }
                tokio::spawn(async move {
                    let (completion, spdtl) = match cancel {
                        Some(crx) => tokio::select! {
                            r = p.finish() => r,
                            // Aborted: the connection ignores this completion.
                            _ = crx => (ScsiCompletion {
                                status: ironlun_scsi::status::TASK_ABORTED,
                                sense: Bytes::new(),
                                data_in: Bytes::new(),
                            }, None),
                        },
                        None => p.finish().await,
                    };
                    // When the connection is gone the charges are released right here.
                    let _ = tx.send(Done {
                        itt,
                        completion,
                        spdtl,
                        held,
                    });
                });
            }
        }
    }

    /// Hand a finished command to the connection; its charges stay until the write. A
    /// command the SCSI layer ended without status (aborted by another I_T nexus under TAS=0,
    /// SAM-5 §5.6) gets no response: the connection forgets its ITT, the charges go at once.
    fn complete(&mut self, conn: &mut Connection, mut done: Done) {
        if done.completion.status == ironlun_scsi::status::NO_STATUS {
            tracing::debug!(
                itt = done.itt,
                "aborted by another I_T nexus with TAS=0: no response"
            );
            conn.end_command_without_response(done.itt);
            return;
        }
        let produced = u64::try_from(done.completion.data_in.len()).unwrap_or(u64::MAX);
        let expected = done.held.data_in.bytes();
        if produced > expected {
            done.held.extra = Some(self.account.hold_received(produced - expected));
        }
        match done.spdtl {
            Some(n) if n > 0 => conn.complete_command_with_spdtl(done.itt, done.completion, n),
            _ => conn.complete_command(done.itt, done.completion),
        }
        self.unsent.push(done.held);
    }

    /// A command that ran off the task came back.
    fn returned(&mut self, conn: &mut Connection, done: Done) {
        self.inflight = self.inflight.saturating_sub(1);
        self.task_ended(done.itt);
        self.complete(conn, done);
    }

    /// Commands the connection dropped (aborted, or it is closing).
    fn aborted(&mut self, itts: &[u32]) {
        for itt in itts {
            self.copies.remove(itt);
            if self.running.contains(itt) {
                self.aborted_running.push(*itt);
            }
        }
        self.waiting.retain(|w| !itts.contains(&w.cmd.itt));
        self.account.set_waiting(!self.waiting.is_empty());
    }

    /// Everything queued in the connection so far is on the socket.
    fn written(&mut self) {
        self.unsent.clear();
    }

    /// Re-charge the Data-Out the connection holds or has committed to while assembling
    /// writes ([`Connection::committed_data_out_bytes`]: held, plus what open sequences still
    /// expect, so that other connections do not plan with room this one promised).
    fn received(&mut self, conn: &Connection) {
        self.assembling.resize(committed_data_out_bytes(conn));
    }

    /// Set the connection's Data-Out allowance from the budget
    /// ([`Account::data_out_allowance`]), then re-charge what it committed to. The connection issues R2Ts
    /// and takes unsolicited data only within it, apart from its progress rules
    /// ([`Connection::set_data_out_allowance`]), so received Data-Out stays bounded without
    /// ever stopping the socket for it: reading on is always safe for a well-behaved
    /// initiator. Costs one budget lock; called before each `receive` and once per loop
    /// (after releases).
    fn pace(&mut self, conn: &mut Connection) {
        let allowance = self.account.data_out_allowance(self.assembling.bytes());
        conn.set_data_out_allowance(usize::try_from(allowance).unwrap_or(usize::MAX));
        self.received(conn);
    }

    /// Whether the socket must not be read now: a command waits for room, or received data
    /// is over this connection's share or the daemon's limit while something of this
    /// connection is in flight (its release will wake the task; with nothing in flight, reading
    /// on is the only way the held writes can complete). Write data being assembled needs no
    /// pause: the Data-Out allowance ([`Commands::pace`]) bounds what the connection solicits
    /// and takes, so reading on never lets it grow past that (plus the connection's progress
    /// exceptions and one read chunk).
    fn pause_reading(&self) -> bool {
        if !self.waiting.is_empty() {
            return true;
        }
        let received = self.account.received();
        let flying = self.account.in_flight();
        received > 0
            && (flying > 0 || self.inflight > 0)
            && (received.saturating_add(flying) > self.account.budget().share()
                || self.account.budget().over_limit())
    }

    /// No command is waiting or running.
    fn idle(&self) -> bool {
        self.inflight == 0 && self.waiting.is_empty()
    }
}

thread_local! {
    /// This thread is an I/O thread ([`Shard`]): its tasks never move to another thread.
    static IO_THREAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// Logged-in connections served by this I/O thread.
    static SHARD_CONNECTIONS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Counts a logged-in session's connection on its I/O thread while it lives there: a busy
/// poll holds the thread, so a connection polls only while no other session shares it
/// ([`OnShard::alone`]); with company, the others' commands would wait behind the poll.
/// Connections still logging in (or failing to) are not counted: they are brief.
struct OnShard;

impl OnShard {
    fn enter() -> OnShard {
        SHARD_CONNECTIONS.with(|c| c.set(c.get().saturating_add(1)));
        OnShard
    }

    /// On an I/O thread with no other logged-in connection (never on the main runtime,
    /// whose tasks move between workers).
    fn alone(&self) -> bool {
        IO_THREAD.with(std::cell::Cell::get) && SHARD_CONNECTIONS.with(|c| c.get() <= 1)
    }
}

impl Drop for OnShard {
    fn drop(&mut self) {
        SHARD_CONNECTIONS.with(|c| c.set(c.get().saturating_sub(1)));
    }
}

/// When a connection busy-polls its socket after a response: while polls catch the next
/// command, except that after [`BusyPoll::MAX_HITS`] catches in a row it sleeps in the reactor
/// once (where shutdown, timers and session reinstatement are seen; the command already
/// waiting wakes it at once); after [`BusyPoll::GIVE_UP`] misses in a row (an idle or slow
/// initiator) only every [`BusyPoll::PROBE_EVERY`]-th time, so an idle session costs no CPU and
/// a slow one at most one window per that many responses.
#[derive(Default)]
struct BusyPoll {
    misses: u32,
    hits: u32,
    skipped: u32,
}

impl BusyPoll {
    const GIVE_UP: u32 = 8;
    const PROBE_EVERY: u32 = 64;
    const MAX_HITS: u32 = 32;

    fn wanted(&mut self) -> bool {
        if self.hits >= Self::MAX_HITS {
            self.hits = 0;
            return false;
        }
        if self.misses < Self::GIVE_UP {
            return true;
        }
        self.skipped = self.skipped.wrapping_add(1);
        self.skipped.is_multiple_of(Self::PROBE_EVERY)
    }

    fn caught(&mut self, hit: bool) {
        if hit {
            self.misses = 0;
            self.hits = self.hits.saturating_add(1);
        } else {
            self.misses = self.misses.saturating_add(1);
            self.hits = 0;
        }
    }
}

/// Poll the socket `fd` without blocking for up to `window`: `Some(n)` bytes appended to `buf`
/// (0: end of stream), `None` when nothing came. Reads the descriptor directly, beside tokio:
/// its readiness flag may stay set, which costs the next `read_buf` one `WouldBlock`.
#[allow(unsafe_code)]
fn poll_socket(
    fd: std::os::fd::RawFd,
    buf: &mut BytesMut,
    window: Duration,
) -> std::io::Result<Option<usize>> {
    use bytes::BufMut;
    let until = Instant::now() + window;
    loop {
        let spare = buf.chunk_mut();
        let len = spare.len();
        // SAFETY: `spare` is `len` writable bytes of `buf`'s allocation (possibly
        // uninitialised); recv(2) writes at most `len` bytes there and returns how many.
        let n = unsafe {
            libc::recv(
                fd,
                spare.as_mut_ptr().cast::<libc::c_void>(),
                len,
                libc::MSG_DONTWAIT,
            )
        };
        if let Ok(n) = usize::try_from(n) {
            // SAFETY: recv(2) initialised the first `n` bytes of the spare capacity.
            unsafe { buf.advance_mut(n) };
            return Ok(Some(n));
        }
        let e = std::io::Error::last_os_error();
        match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => {}
            _ => return Err(e),
        }
        if Instant::now() >= until {
            return Ok(None);
        }
        std::hint::spin_loop();
    }
}

async fn serve_connection(
    stream: TcpStream,
    portal: Arc<PortalConfig>,
    registry: Arc<Registry>,
    live: Arc<SessionTable>,
    account: Account,
    busy_window: Duration,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let local = stream.local_addr()?;
    let (mut rd, mut wr) = stream.into_split();
    let stall = match portal.timeouts.nop_timeout {
        d if d.is_zero() => WRITE_STALL_DEFAULT,
        d => d,
    };
    let max_inflight = usize::try_from(portal.cmd_window).unwrap_or(usize::MAX);
    let mut conn = Connection::new_with_tsih(portal, registry.new_tsih(), Instant::now());
    conn.set_local_addr(local);
    // Session reinstatement: our entry in the live-session table, and its close signal.
    let mut registered: Option<LiveSession> = None;
    let mut reinstated: Option<oneshot::Receiver<&'static str>> = None;
    // The connection's timer: re-armed only when the wanted deadline moves earlier; a later
    // deadline costs one early wake-up (handle_timeout re-checks), not a timer reset per read.
    let timer = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(timer);
    let mut armed: Option<Instant> = None;
    // Graceful shutdown: the initiator was asked to log out; read until it does or time is up.
    let mut logout_deadline: Option<tokio::time::Instant> = None;
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    // Unbounded, but never longer than the commands in flight (`Commands::max_inflight`).
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Done>();
    let budget = account.budget().clone();
    let mut cmds = Commands::new(account, max_inflight, done_tx);
    // Task management functions whose aborted tasks on the LU have drained, by ITT.
    let (tmf_tx, mut tmf_rx) = mpsc::unbounded_channel::<u32>();
    let mut nexus: Option<Arc<Nexus>> = None;
    // The session's entry in the metrics' session table, from login to the end.
    let mut listed: Option<crate::metrics::SessionEntry> = None;
    let mut draining = *shutdown.borrow();
    let mut drain_deadline: Option<tokio::time::Instant> = None;
    let mut out: Vec<Bytes> = Vec::new();
    // Why the loop ended, for the connection's last line (`crate::logging`).
    let end: ConnectionEnd;
    // TASK SET FULL answers already added to the daemon's counter.
    let mut refused_seen = 0u64;

    // Task management responses ready to go out (their aborted tasks have ended).
    let mut ready_tmfs: Vec<(u32, TmfFunction, TmfResponse)> = Vec::new();
    let mut busy_poll = BusyPoll::default();
    let fd = rd.as_ref().as_raw_fd();
    // Counted once logged in.
    let mut on_shard: Option<OnShard> = None;
    loop {
        while let Some(ev) = conn.poll_event() {
            match ev {
                Event::LoggedIn(info) => {
                    on_shard.get_or_insert_with(OnShard::enter);
                    let span = tracing::Span::current();
                    span.record("initiator", info.initiator_name.as_str());
                    span.record("target", crate::logging::session_target(&info));
                    span.record("tsih", info.tsih);
                    crate::logging::logged_in(&info, conn.connection_params());
                    crate::metrics::DAEMON.login(info.target_name.as_deref());
                    if let Some(target) = &info.target_name {
                        let key = (
                            info.initiator_name.to_ascii_lowercase(),
                            info.isid,
                            target.to_ascii_lowercase(),
                            info.portal_group_tag,
                        );
                        let (entry, rx) = live.register(key);
                        registered = Some(entry);
                        reinstated = Some(rx);
                    }
                    if let Some(t) = info.target_name.as_deref().and_then(|n| registry.target(n)) {
                        // The PR identity of this I_T nexus: initiator port (name + ISID) and
                        // the portal group it came in through (SPC-4 §7.6.4.6, RFC 7143 §4.4.1).
                        let entry = crate::metrics::DAEMON.register_session(
                            &t.name,
                            &info.initiator_name,
                            info.isid,
                            info.portal_group_tag,
                        );
                        nexus = Some(Arc::new(
                            Nexus::attach_for(
                                t,
                                registry.new_nexus(),
                                &info.initiator_name,
                                info.isid,
                                info.portal_group_tag,
                            )
                            .with_metrics(entry.metrics.clone())
                            .with_chap(info.chap),
                        ));
                        if let Some(n) = &nexus {
                            conn.set_target_reset_allowed(n.may_reset_target());
                        }
                        listed = Some(entry);
                    }
                }
                Event::Command(cmd) => cmds.arrive(&mut conn, nexus.as_ref(), cmd),
                Event::TaskMgmt(t) => {
                    let outcome = match &nexus {
                        Some(n) => n.task_mgmt(t.function, t.lun, Some(t.arrived)),
                        None => TmfOutcome::now(TmfResponse::FunctionRejected),
                    };
                    if let Some(now) = cmds.task_mgmt(t.itt, t.function, outcome, &tmf_tx) {
                        ready_tmfs.push(now);
                    }
                }
                Event::Aborted(itts) => {
                    tracing::debug!(?itts, "tasks aborted");
                    cmds.aborted(&itts);
                }
            }
        }
        ready_tmfs.extend(cmds.ready_tmfs());
        for (itt, function, resp) in ready_tmfs.drain(..) {
            conn.complete_tmf(itt, resp);
            if let (Some(n), TmfFunction::TargetColdReset, TmfResponse::FunctionComplete) =
                (&nexus, function, resp)
            {
                // RFC 7143 §11.5.1: the response goes out first, then every connection of
                // every session to this target is dropped (this one closes itself).
                conn.poll_transmit_into(&mut out);
                if let Err(e) = write_all_vectored(&mut wr, &mut out, stall).await {
                    tracing::debug!(error = %e, "cold reset response not written");
                }
                let closed = live.close_target(&n.target.name, "target cold reset");
                tracing::info!(target = %n.target.name, sessions = closed, "target cold reset: sessions closed");
            }
        }
        // Waiting for budget room: listen for releases before retrying. The failed attempt
        // that queued the first waiting command marked the account waiting, so a release after
        // it either wakes this enabled future or is seen by the retry below.
        let room = budget.notified();
        tokio::pin!(room);
        let waits = !cmds.waiting.is_empty() && {
            room.as_mut().enable();
            cmds.start_ready(&mut conn, nexus.as_ref())
        };
        cmds.pace(&mut conn);
        // Coalesce everything ready into one vectored write; the charges of the responses in
        // it are released once it is on the socket.
        conn.poll_transmit_into(&mut out);
        // A closed session is an I_T nexus loss; its effects (an SPC-2 reservation released)
        // take place before the last PDU (the Logout Response) reaches the initiator, whose
        // next command on another session must see them.
        if conn.is_closed().is_some() {
            if let Some(n) = &nexus {
                n.lose();
            }
        }
        let responded = !out.is_empty();
        if responded {
            if let Err(e) = write_all_vectored(&mut wr, &mut out, stall).await {
                end = ConnectionEnd::WriteError(e);
                break;
            }
        }
        cmds.written();
        if let Some(why) = conn.is_closed() {
            end = ConnectionEnd::Closed(why.clone());
            break;
        }
        if draining && cmds.idle() && logout_deadline.is_none() {
            end = ConnectionEnd::Shutdown;
            break;
        }
        let paused = cmds.pause_reading();
        match (conn.poll_timeout(), armed) {
            (Some(want), Some(at)) if at <= want => {}
            (Some(want), _) => {
                timer.as_mut().reset(tokio::time::Instant::from_std(want));
                armed = Some(want);
            }
            (None, _) => armed = None,
        }
        if buf.capacity() - buf.len() < READ_CHUNK / 4 {
            buf.reserve(READ_CHUNK);
        }
        // A response went out and nothing else is in flight: the initiator's next command
        // (QD1) usually follows within microseconds; catching it here spares a sleep and a
        // wake-up in the reactor on each side.
        if responded
            && !paused
            && !draining
            && cmds.inflight == 0
            && cmds.waiting.is_empty()
            && !busy_window.is_zero()
            && on_shard.as_ref().is_some_and(OnShard::alone)
            && busy_poll.wanted()
        {
            match poll_socket(fd, &mut buf, busy_window) {
                Ok(Some(0)) => {
                    end = ConnectionEnd::Eof;
                    break;
                }
                Ok(Some(_)) => {
                    busy_poll.caught(true);
                    cmds.pace(&mut conn);
                    conn.receive(&mut buf, Instant::now());
                    continue;
                }
                Ok(None) => busy_poll.caught(false),
                Err(e) => {
                    end = ConnectionEnd::ReadError(e);
                    break;
                }
            }
        }
        tokio::select! {
            r = rd.read_buf(&mut buf), if !paused && (!draining || logout_deadline.is_some()) => {
                match r {
                    Ok(0) => {
                        end = ConnectionEnd::Eof;
                        break;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        end = ConnectionEnd::ReadError(e);
                        break;
                    }
                }
                cmds.pace(&mut conn);
                conn.receive(&mut buf, Instant::now());
                let refused = conn.task_set_full_count();
                if refused != refused_seen {
                    crate::metrics::DAEMON.task_set_full(refused.saturating_sub(refused_seen));
                    refused_seen = refused;
                }
            }
            Some(done) = done_rx.recv() => {
                cmds.returned(&mut conn, done);
                // Coalesce: every completion already waiting goes out in the same write.
                while let Ok(done) = done_rx.try_recv() {
                    cmds.returned(&mut conn, done);
                }
                cmds.start_ready(&mut conn, nexus.as_ref());
            }
            Some(itt) = tmf_rx.recv() => {
                cmds.tmf_drained(itt);
            }
            () = &mut room, if waits => {
                cmds.start_ready(&mut conn, nexus.as_ref());
            }
            () = &mut timer, if armed.is_some() => {
                armed = None;
                conn.handle_timeout(Instant::now());
            }
            r = async { match reinstated.as_mut() { Some(rx) => rx.await, None => std::future::pending().await } } => {
                reinstated = None;
                if let Ok(why) = r {
                    conn.close_by_owner(why);
                }
            }
            _ = shutdown.changed(), if !draining => {
                draining = true;
                let now = tokio::time::Instant::now();
                drain_deadline = Some(now + DRAIN_TIMEOUT);
                // RFC 7143 §11.9.1: ask a logged-in initiator to log out, and give it the time.
                if conn.request_logout(LOGOUT_GRACE_SECS) {
                    logout_deadline = Some(now + Duration::from_secs(LOGOUT_GRACE_SECS.into()));
                }
            }
            _ = async { match logout_deadline { Some(t) => tokio::time::sleep_until(t).await, None => std::future::pending().await } } => {
                tracing::debug!("no logout within the grace time; closing");
                logout_deadline = None;
            }
            _ = async { match drain_deadline { Some(t) => tokio::time::sleep_until(t).await, None => std::future::pending().await } } => {
                tracing::warn!(inflight = cmds.inflight, waiting = cmds.waiting.len(), "drain timeout; closing connection with commands in flight");
                end = ConnectionEnd::DrainTimeout;
                break;
            }
        }
    }
    crate::logging::connection_ended(conn.session(), &end);
    // Commands still running finish on their own; their results are dropped with `done_rx`.
    let _ = within(stall, wr.shutdown()).await;
    if let Some(s) = conn.login_failure() {
        crate::metrics::DAEMON.login_failed(s.class, s.detail);
    }
    let refused = conn.task_set_full_count();
    if refused > 0 {
        tracing::debug!(
            refused,
            "WRITEs answered TASK SET FULL on this connection for lack of Data-Out room"
        );
    }
    drop(nexus);
    drop(listed);
    drop(registered);
    Ok(())
}

#[cfg(test)]
mod tmf_tests;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// The busy poll lets the reactor run once per 32 catches in a row, backs off after 8
    /// misses in a row to one poll per 64 responses, and comes back on a catch.
    #[test]
    fn busy_poll_yields_to_the_reactor_and_backs_off() {
        let mut b = BusyPoll::default();
        for _ in 0..BusyPoll::MAX_HITS {
            assert!(b.wanted());
            b.caught(true);
        }
        assert!(!b.wanted(), "the reactor runs once after 32 catches");
        assert!(b.wanted());
        for _ in 0..BusyPoll::GIVE_UP {
            assert!(b.wanted());
            b.caught(false);
        }
        let polls = (0..128).filter(|_| b.wanted()).count();
        assert_eq!(polls, 2, "one poll per 64 responses while it misses");
        b.caught(true);
        assert!(b.wanted());
    }
    use ironlun_iscsi::pdu::TaskAttr;

    fn cmd(cdb: &[u8], expected_in_len: u32) -> ScsiCommandEvent {
        ScsiCommandEvent {
            itt: 1,
            lun: 0,
            cdb: Bytes::copy_from_slice(cdb),
            attr: TaskAttr::Simple,
            data_out: Bytes::new(),
            expected_in_len,
            expected_out_len: 0,
            arrived: Instant::now(),
        }
    }

    fn read16(blocks: u32) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[0] = 0x88;
        c[10..14].copy_from_slice(&blocks.to_be_bytes());
        c
    }

    #[test]
    fn an_honest_read_is_charged_its_expected_length() {
        assert_eq!(data_in_bound(&cmd(&read16(2048), 1 << 20)), 1 << 20);
        // 4096-byte blocks: the expected length is the CDB's.
        assert_eq!(data_in_bound(&cmd(&read16(256), 1 << 20)), 1 << 20);
        // INQUIRY and other non-READs: the expected length.
        assert_eq!(data_in_bound(&cmd(&[0x12, 0, 0, 0, 96, 0], 96)), 96);
        assert_eq!(data_in_bound(&cmd(&[0x00; 6], 0)), 0);
    }

    #[test]
    fn a_read_asking_more_than_expected_is_charged_its_buffer() {
        // 16 MiB of 512-byte blocks with an expected length of 0.
        assert_eq!(data_in_bound(&cmd(&read16(32 * 1024), 0)), 16 << 20);
        // 8 blocks: at most 32 KiB at 4096-byte blocks.
        assert_eq!(data_in_bound(&cmd(&read16(8), 512)), 8 * 4096);
        // READ(10) of 0xFFFF blocks: capped at what an LU runs.
        let r10 = [0x28, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0];
        assert_eq!(data_in_bound(&cmd(&r10, 0)), 16 << 20);
        // A CDB that does not parse: the expected length.
        assert_eq!(data_in_bound(&cmd(&[0x88, 0], 7)), 7);
    }

    #[test]
    fn reading_pauses_while_commands_wait_or_received_data_is_over_and_something_will_free() {
        const MIB: u64 = 1 << 20;
        let budget = MemoryBudget::new(64 * MIB);
        let (tx, _rx) = mpsc::unbounded_channel();
        let mut c = Commands::new(budget.account(), 8, tx);
        assert!(!c.pause_reading());
        let received = c.account.hold_received(20 * MIB);
        assert!(
            !c.pause_reading(),
            "nothing in flight: reading on is the only way the held writes can finish"
        );
        let flying = c.account.try_charge(MIB).expect("room");
        assert!(
            c.pause_reading(),
            "over the 16 MiB share with a release to wait for"
        );
        drop(received);
        assert!(!c.pause_reading());
        drop(flying);
        let data_out = c.account.hold_received(0);
        c.waiting.push_back(Waiting {
            cmd: cmd(&read16(8), 4096),
            data_out,
        });
        assert!(c.pause_reading(), "a command waits for room");
        c.aborted(&[1]);
        assert!(!c.pause_reading());
        assert!(c.idle());
    }

    /// ABORT TASK of a command still running off the task: the response waits until the
    /// command is back; one of a command already back goes out at once; beyond
    /// `MAX_PENDING_TMFS` waiting responses a function is rejected.
    #[tokio::test]
    async fn an_abort_task_response_waits_for_the_running_command() {
        let budget = MemoryBudget::new(1 << 20);
        let (tx, _rx) = mpsc::unbounded_channel();
        let (tmf_tx, _tmf_rx) = mpsc::unbounded_channel();
        let mut c = Commands::new(budget.account(), 8, tx);
        let complete = || TmfOutcome::now(TmfResponse::FunctionComplete);
        c.running.insert(7);
        c.aborted(&[7]);
        assert_eq!(
            c.task_mgmt(100, TmfFunction::AbortTask, complete(), &tmf_tx),
            None
        );
        assert!(
            c.ready_tmfs().is_empty(),
            "answered while the task's I/O runs"
        );
        c.task_ended(7);
        assert_eq!(
            c.ready_tmfs(),
            vec![(100, TmfFunction::AbortTask, TmfResponse::FunctionComplete)]
        );
        // A task already back: nothing to wait for.
        c.aborted(&[7]);
        assert_eq!(
            c.task_mgmt(101, TmfFunction::AbortTask, complete(), &tmf_tx),
            Some((101, TmfFunction::AbortTask, TmfResponse::FunctionComplete))
        );
        for itt in 0..u32::try_from(MAX_PENDING_TMFS).unwrap() {
            c.running.insert(itt);
            c.aborted(&[itt]);
            assert_eq!(
                c.task_mgmt(200 + itt, TmfFunction::AbortTask, complete(), &tmf_tx),
                None
            );
        }
        c.running.insert(99);
        c.aborted(&[99]);
        assert_eq!(
            c.task_mgmt(300, TmfFunction::AbortTask, complete(), &tmf_tx),
            Some((300, TmfFunction::AbortTask, TmfResponse::FunctionRejected))
        );
    }

    #[test]
    fn blocking_threads_are_split_without_exceeding_the_total() {
        assert_eq!(blocking_split(64, 2), (22, 21));
        assert_eq!(blocking_split(8, 2), (4, 2));
        assert_eq!(blocking_split(3, 2), (1, 1));
        // Fewer than one per runtime: one each (documented excess).
        assert_eq!(blocking_split(1, 4), (1, 1));
        assert_eq!(default_blocking_threads(2), 64);
        assert_eq!(default_blocking_threads(7), 128);
        for total in 1..100 {
            for shards in 1..9 {
                let (main, per) = blocking_split(total, shards);
                assert!(main >= 1 && per >= 1);
                if total > shards {
                    assert!(main + per * shards <= total, "{total} over {shards}");
                }
            }
        }
    }
}
