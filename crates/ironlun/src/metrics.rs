//! Prometheus metrics (`GET /metrics` on the admin endpoint), in the text exposition format
//! 0.0.4: counters, gauges and histograms on relaxed atomics, and the renderer.
//!
//! Where the numbers live:
//! - per LU: a [`LuMetrics`] in each [`crate::target::LunHandle`]; the exposition walks the live
//!   registry at scrape time, so LUs added or removed at run time appear and go with it;
//! - per session: a [`SessionMetrics`] the connection task's nexus holds, listed in a table
//!   keyed by a session id from login to session end ([`register_session`]; the entry is
//!   removed when its [`SessionEntry`] drops, and the series with it);
//! - daemon-wide: logins, login failures, connections per portal ([`DAEMON`]).
//!
//! What is counted (the contract the tests check): every SCSI command an initiator sent that
//! reached the SCSI layer ([`crate::target::Nexus::start`]) and completed there, once, when its
//! completion is produced, whether it finished inline or through the pending path. Commands
//! the daemon issues itself (EXTENDED COPY's own reads and writes, handover flushes) are not
//! initiator commands and are not counted. A command whose future is dropped before it
//! completes (an aborted EXTENDED COPY, shutdown) leaves the queue depth and is not counted.
//!
//! Direction: `write` when the command carried Data-Out bytes, else `read` when it returned
//! Data-In bytes, else `none` (so a READ that ends in CHECK CONDITION counts as `none`). Bytes
//! are the Data-Out bytes received and the Data-In bytes produced (before the initiator's
//! allocation length cuts them). Latency runs from [`crate::target::Nexus::start`] to the
//! completion.
//!
//! Hot path: a command costs one `Instant::now()` pair and a handful of relaxed atomic adds;
//! no lock, no allocation, no map lookup.

use ironlun_iscsi::connection::ScsiCompletion;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

/// `Content-Type` of the exposition (text format 0.0.4).
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

// ---------------------------------------------------------------------------------------------
// Primitive types.

/// Upper bounds (ns) of the command latency buckets: 25 µs to 10 s.
pub const LATENCY_BOUNDS_NS: &[u64] = &[
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// Upper bounds (ns) of the handover switch-time buckets: 1 ms to 60 s.
pub const SWITCH_BOUNDS_NS: &[u64] = &[
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
    30_000_000_000,
    60_000_000_000,
];

/// A histogram with fixed bucket bounds; each observation lands in exactly one bucket (the
/// last one catches everything above the highest bound), made cumulative when rendered.
pub struct Histogram {
    bounds: &'static [u64],
    /// `bounds.len() + 1` counts.
    buckets: Box<[AtomicU64]>,
    sum_ns: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [u64]) -> Self {
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_ns: AtomicU64::new(0),
        }
    }

    /// Record one observation of `ns` nanoseconds.
    pub fn observe(&self, ns: u64) {
        let i = self
            .bounds
            .iter()
            .position(|b| ns <= *b)
            .unwrap_or(self.bounds.len());
        if let Some(b) = self.buckets.get(i) {
            b.fetch_add(1, Relaxed);
        }
        self.sum_ns.fetch_add(ns, Relaxed);
    }

    /// Number of observations (the `_count` sample).
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Relaxed)).sum()
    }
}

fn nanos(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

// ---------------------------------------------------------------------------------------------
// Per LU and per session.

/// Data transfer direction of a command (module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Read = 0,
    Write = 1,
    None = 2,
}

/// The `direction` label values, indexed by [`Direction`].
pub const DIRECTIONS: [&str; 3] = ["read", "write", "none"];

/// Sense key names (SPC-4 §4.5.6, table 28), indexed by the key.
pub const SENSE_KEYS: [&str; 16] = [
    "no_sense",
    "recovered_error",
    "not_ready",
    "medium_error",
    "hardware_error",
    "illegal_request",
    "unit_attention",
    "data_protect",
    "blank_check",
    "vendor_specific",
    "copy_aborted",
    "aborted_command",
    "reserved_0c",
    "volume_overflow",
    "miscompare",
    "completed",
];

/// PERSISTENT RESERVE OUT service action names (SPC-4 §6.16.1, table 170), by code.
pub const PR_OUT_ACTIONS: [&str; 8] = [
    "register",
    "reserve",
    "release",
    "clear",
    "preempt",
    "preempt_and_abort",
    "register_and_ignore",
    "register_and_move",
];

/// Handover result label values, indexed by [`HandoverResult`].
pub const HANDOVER_RESULTS: [&str; 3] = ["committed", "aborted", "refused"];

/// Failover result label values: index 0 done, 1 refused ([`LuMetrics::failover`]).
pub const FAILOVER_RESULTS: [&str; 2] = ["done", "refused"];

/// How a handover step ended (`POST …/handover/commit` or `…/abort`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandoverResult {
    /// A commit that moved the write access (not an idempotent retry).
    Committed = 0,
    /// An abort through the admin API (a repeated abort of the same epoch counts again).
    Aborted = 1,
    /// A commit that failed (drain timeout with `refuse`, aborted epoch, flush or state error…).
    Refused = 2,
}

const PERSISTENT_RESERVE_OUT: u8 = 0x5f;
const STATUS_GOOD: u8 = 0x00;
const STATUS_CHECK_CONDITION: u8 = 0x02;
const STATUS_RESERVATION_CONFLICT: u8 = 0x18;

/// Commands, bytes and queue depth: what an LU and a session both count.
pub struct Io {
    commands: [AtomicU64; 3],
    /// Read, write.
    bytes: [AtomicU64; 2],
    in_flight: AtomicI64,
}

impl Io {
    fn new() -> Self {
        Io {
            commands: Default::default(),
            bytes: Default::default(),
            in_flight: AtomicI64::new(0),
        }
    }

    /// Commands completed in direction `d`.
    pub fn commands(&self, d: Direction) -> u64 {
        self.commands.get(d as usize).map_or(0, |c| c.load(Relaxed))
    }

    fn record(&self, d: Direction, bytes_in: u64, bytes_out: u64) {
        if let Some(c) = self.commands.get(d as usize) {
            c.fetch_add(1, Relaxed);
        }
        if bytes_in > 0 {
            if let Some(b) = self.bytes.first() {
                b.fetch_add(bytes_in, Relaxed);
            }
        }
        if bytes_out > 0 {
            if let Some(b) = self.bytes.get(1) {
                b.fetch_add(bytes_out, Relaxed);
            }
        }
    }
}

/// The metrics of one logical unit (labels `target`, `lun` come from the registry).
pub struct LuMetrics {
    pub io: Io,
    latency: [Histogram; 3],
    check_conditions: [AtomicU64; 16],
    reservation_conflicts: AtomicU64,
    pr_out: [AtomicU64; 8],
    handovers: [AtomicU64; 3],
    failovers: [AtomicU64; 2],
    switch_time: Histogram,
}

impl Default for LuMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl LuMetrics {
    pub fn new() -> Self {
        LuMetrics {
            io: Io::new(),
            latency: [
                Histogram::new(LATENCY_BOUNDS_NS),
                Histogram::new(LATENCY_BOUNDS_NS),
                Histogram::new(LATENCY_BOUNDS_NS),
            ],
            check_conditions: Default::default(),
            reservation_conflicts: AtomicU64::new(0),
            pr_out: Default::default(),
            handovers: Default::default(),
            failovers: Default::default(),
            switch_time: Histogram::new(SWITCH_BOUNDS_NS),
        }
    }

    /// Record the end of a handover step; `switch` is a committed handover's total time.
    pub fn handover(&self, result: HandoverResult, switch: Option<std::time::Duration>) {
        if let Some(c) = self.handovers.get(result as usize) {
            c.fetch_add(1, Relaxed);
        }
        if let Some(d) = switch {
            self.switch_time.observe(nanos(d));
        }
    }

    /// Record a failover's result (issue 19): `true` when it moved the LU (an idempotent
    /// retry is not counted), `false` when it was refused or failed.
    pub fn failover(&self, done: bool) {
        if let Some(c) = self.failovers.get(usize::from(!done)) {
            c.fetch_add(1, Relaxed);
        }
    }

    /// Record a handover commit's result: the steps of a commit, `None` for a refusal (the
    /// caller leaves out an idempotent retry, which changes nothing).
    pub fn handover_commit(&self, committed: Option<&ironlun_api::CommitSteps>) {
        match committed {
            Some(steps) => self.handover(
                HandoverResult::Committed,
                Some(std::time::Duration::from_micros(steps.total)),
            ),
            None => self.handover(HandoverResult::Refused, None),
        }
    }
}

/// The metrics of one session (its labels are fixed at login).
pub struct SessionMetrics {
    pub io: Io,
    target: String,
    initiator: String,
    isid: String,
    tpgt: u16,
}

impl SessionMetrics {
    /// Counters of a session that is not listed (nexuses built outside a connection).
    pub fn unlisted() -> Arc<SessionMetrics> {
        Arc::new(SessionMetrics::new("", "", [0; 6], 0))
    }

    fn new(target: &str, initiator: &str, isid: [u8; 6], tpgt: u16) -> Self {
        let mut hex = String::with_capacity(12);
        for b in isid {
            let _ = write!(hex, "{b:02x}");
        }
        SessionMetrics {
            io: Io::new(),
            target: target.to_string(),
            initiator: initiator.to_string(),
            isid: hex,
            tpgt,
        }
    }
}

/// One command from [`crate::target::Nexus::start`] to its completion: started with
/// [`Probe::begin`], ended with exactly one of [`Probe::end`] or [`Probe::abandon`] against
/// the same metrics (or handed to a [`PendingProbe`], which does that itself).
#[must_use]
pub struct Probe {
    start: Instant,
    opcode: u8,
    service_action: u8,
    bytes_out: u64,
}

impl Probe {
    /// A command with `cdb` and `bytes_out` Data-Out bytes arrived; it is in flight.
    pub fn begin(
        lu: Option<&LuMetrics>,
        s: &SessionMetrics,
        cdb: &[u8],
        bytes_out: usize,
    ) -> Probe {
        if let Some(lu) = lu {
            lu.io.in_flight.fetch_add(1, Relaxed);
        }
        s.io.in_flight.fetch_add(1, Relaxed);
        Probe {
            start: Instant::now(),
            opcode: cdb.first().copied().unwrap_or(0),
            service_action: cdb.get(1).map_or(0, |b| b & 0x1f),
            bytes_out: u64::try_from(bytes_out).unwrap_or(u64::MAX),
        }
    }

    /// The command completed with `c`.
    pub fn end(self, lu: Option<&LuMetrics>, s: &SessionMetrics, c: &ScsiCompletion) {
        let bytes_in = u64::try_from(c.data_in.len()).unwrap_or(u64::MAX);
        let d = if self.bytes_out > 0 {
            Direction::Write
        } else if bytes_in > 0 {
            Direction::Read
        } else {
            Direction::None
        };
        s.io.record(d, bytes_in, self.bytes_out);
        s.io.in_flight.fetch_sub(1, Relaxed);
        let Some(lu) = lu else {
            return;
        };
        lu.io.record(d, bytes_in, self.bytes_out);
        if let Some(h) = lu.latency.get(d as usize) {
            h.observe(nanos(self.start.elapsed()));
        }
        match c.status {
            STATUS_GOOD if self.opcode == PERSISTENT_RESERVE_OUT => {
                if let Some(n) = lu.pr_out.get(usize::from(self.service_action)) {
                    n.fetch_add(1, Relaxed);
                }
            }
            STATUS_CHECK_CONDITION => {
                if let Some(n) = sense_key(&c.sense).and_then(|k| lu.check_conditions.get(k)) {
                    n.fetch_add(1, Relaxed);
                }
            }
            STATUS_RESERVATION_CONFLICT => {
                lu.reservation_conflicts.fetch_add(1, Relaxed);
            }
            _ => {}
        }
        lu.io.in_flight.fetch_sub(1, Relaxed);
    }

    /// The command will not complete (its future was dropped): it leaves the queue only.
    pub fn abandon(self, lu: Option<&LuMetrics>, s: &SessionMetrics) {
        if let Some(lu) = lu {
            lu.io.in_flight.fetch_sub(1, Relaxed);
        }
        s.io.in_flight.fetch_sub(1, Relaxed);
    }

    /// Carry the probe into a command that finishes on a task of its own.
    pub fn pending(self, lu: Option<&Arc<LuMetrics>>, s: &Arc<SessionMetrics>) -> PendingProbe {
        PendingProbe {
            probe: Some(self),
            lu: lu.cloned(),
            session: s.clone(),
        }
    }
}

/// A [`Probe`] that owns its metrics; dropped without [`PendingProbe::end`] it abandons.
pub struct PendingProbe {
    probe: Option<Probe>,
    lu: Option<Arc<LuMetrics>>,
    session: Arc<SessionMetrics>,
}

impl PendingProbe {
    pub fn end(mut self, c: &ScsiCompletion) {
        if let Some(p) = self.probe.take() {
            p.end(self.lu.as_deref(), &self.session, c);
        }
    }
}

impl Drop for PendingProbe {
    fn drop(&mut self) {
        if let Some(p) = self.probe.take() {
            p.abandon(self.lu.as_deref(), &self.session);
        }
    }
}

/// The sense key of fixed (70h/71h) or descriptor (72h/73h) format sense data (SPC-4 §4.5).
pub fn sense_key(sense: &[u8]) -> Option<usize> {
    let code = sense.first()? & 0x7f;
    let byte = match code {
        0x70 | 0x71 => sense.get(2)?,
        0x72 | 0x73 => sense.get(1)?,
        _ => return None,
    };
    Some(usize::from(byte & 0x0f))
}

// ---------------------------------------------------------------------------------------------
// Daemon-wide.

/// Login failure reasons by status class and detail (RFC 7143 §11.13.5).
pub const LOGIN_FAILURES: [&str; 17] = [
    "target_moved",
    "initiator_error",
    "authentication_failed",
    "authorization_failure",
    "target_not_found",
    "target_removed",
    "unsupported_version",
    "too_many_connections",
    "missing_parameter",
    "cannot_include_in_session",
    "session_type_not_supported",
    "session_does_not_exist",
    "invalid_during_login",
    "target_error",
    "service_unavailable",
    "out_of_resources",
    "other",
];

/// The [`LOGIN_FAILURES`] index of a failed login's status class and detail.
pub fn login_failure_index(class: u8, detail: u8) -> usize {
    match (class, detail) {
        (1, _) => 0,
        (2, d @ 0..=11) => 1 + usize::from(d),
        (3, d @ 0..=2) => 13 + usize::from(d),
        _ => 16,
    }
}

/// One listening portal's connection counts.
pub struct PortalMetrics {
    portal: String,
    accepted: AtomicU64,
    open: AtomicI64,
}

impl PortalMetrics {
    /// A connection was accepted; it counts as open until the returned guard drops.
    pub fn accept(self: &Arc<Self>) -> OpenConnection {
        self.accepted.fetch_add(1, Relaxed);
        self.open.fetch_add(1, Relaxed);
        OpenConnection(self.clone())
    }
}

/// An open connection of a portal (see [`PortalMetrics::accept`]).
pub struct OpenConnection(Arc<PortalMetrics>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Relaxed);
    }
}

/// Daemon-wide counters and the session table; touched per login or connection, never per
/// command.
pub struct Daemon {
    logins: Mutex<BTreeMap<String, u64>>,
    discovery_logins: AtomicU64,
    login_failures: [AtomicU64; 17],
    portals: Mutex<Vec<Arc<PortalMetrics>>>,
    sessions: Mutex<BTreeMap<u64, Arc<SessionMetrics>>>,
    next_session: AtomicU64,
    started: OnceLock<f64>,
    /// WRITEs answered TASK SET FULL for lack of Data-Out room, all connections.
    task_set_full: AtomicU64,
    /// The payload budget of the running server (`[limits] max_buffered`).
    budget: OnceLock<Arc<crate::budget::MemoryBudget>>,
}

/// The daemon's metrics (one daemon per process).
pub static DAEMON: Daemon = Daemon::new();

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Default for Daemon {
    fn default() -> Self {
        Self::new()
    }
}

impl Daemon {
    pub const fn new() -> Daemon {
        Daemon {
            logins: Mutex::new(BTreeMap::new()),
            discovery_logins: AtomicU64::new(0),
            login_failures: [const { AtomicU64::new(0) }; 17],
            portals: Mutex::new(Vec::new()),
            sessions: Mutex::new(BTreeMap::new()),
            next_session: AtomicU64::new(1),
            started: OnceLock::new(),
            task_set_full: AtomicU64::new(0),
            budget: OnceLock::new(),
        }
    }

    /// Note the process start time (the first call wins).
    pub fn started(&self) {
        self.started.get_or_init(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64())
        });
    }

    /// A successful login to `target` (`None`: a discovery session).
    pub fn login(&self, target: Option<&str>) {
        match target {
            Some(t) => *lock(&self.logins).entry(t.to_string()).or_insert(0) += 1,
            None => {
                self.discovery_logins.fetch_add(1, Relaxed);
            }
        }
    }

    /// The server's payload budget, shown by the memory gauges (the first call wins).
    pub fn set_budget(&self, budget: Arc<crate::budget::MemoryBudget>) {
        let _ = self.budget.set(budget);
    }

    /// `n` more WRITEs were answered TASK SET FULL.
    pub fn task_set_full(&self, n: u64) {
        self.task_set_full.fetch_add(n, Relaxed);
    }

    /// A login refused with status `class`/`detail`.
    pub fn login_failed(&self, class: u8, detail: u8) {
        if let Some(c) = self.login_failures.get(login_failure_index(class, detail)) {
            c.fetch_add(1, Relaxed);
        }
    }

    /// The counters of the portal listening on `portal` (`host:port`).
    pub fn portal(&self, portal: &str) -> Arc<PortalMetrics> {
        let mut ps = lock(&self.portals);
        if let Some(p) = ps.iter().find(|p| p.portal == portal) {
            return p.clone();
        }
        let p = Arc::new(PortalMetrics {
            portal: portal.to_string(),
            accepted: AtomicU64::new(0),
            open: AtomicI64::new(0),
        });
        ps.push(p.clone());
        p
    }

    /// List a session that just logged in; its series go when the entry drops.
    pub fn register_session(
        &'static self,
        target: &str,
        initiator: &str,
        isid: [u8; 6],
        tpgt: u16,
    ) -> SessionEntry {
        let id = self.next_session.fetch_add(1, Relaxed);
        let m = Arc::new(SessionMetrics::new(target, initiator, isid, tpgt));
        lock(&self.sessions).insert(id, m.clone());
        SessionEntry {
            daemon: self,
            id,
            metrics: m,
        }
    }
}

/// A listed session (see [`Daemon::register_session`]).
pub struct SessionEntry {
    daemon: &'static Daemon,
    id: u64,
    pub metrics: Arc<SessionMetrics>,
}

impl Drop for SessionEntry {
    fn drop(&mut self) {
        lock(&self.daemon.sessions).remove(&self.id);
    }
}

// ---------------------------------------------------------------------------------------------
// Exposition (text format 0.0.4).

/// A label value with `\`, `"` and newline escaped.
pub fn escape(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// `name="value",…` with values escaped.
fn labels(pairs: &[(&str, &str)]) -> String {
    let mut s = String::new();
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        let _ = write!(s, "{k}=\"{}\"", escape(v));
    }
    s
}

/// Every metric family: name, type, help.
pub const FAMILIES: &[(&str, &str, &str)] = &[
    (
        "ironlun_build_info",
        "gauge",
        "Always 1; the version label names the build.",
    ),
    (
        "ironlun_process_start_time_seconds",
        "gauge",
        "Start time of the daemon since the Unix epoch in seconds.",
    ),
    (
        "ironlun_lu_commands_total",
        "counter",
        "SCSI commands completed by the LU, by data direction.",
    ),
    (
        "ironlun_lu_bytes_total",
        "counter",
        "Bytes transferred by the LU's commands, by direction.",
    ),
    (
        "ironlun_lu_command_duration_seconds",
        "histogram",
        "Time from a command's arrival at the LU to its completion.",
    ),
    (
        "ironlun_lu_queue_depth",
        "gauge",
        "Commands in flight on the LU.",
    ),
    (
        "ironlun_lu_check_conditions_total",
        "counter",
        "Commands that ended in CHECK CONDITION, by sense key.",
    ),
    (
        "ironlun_lu_reservation_conflicts_total",
        "counter",
        "Commands that ended in RESERVATION CONFLICT.",
    ),
    (
        "ironlun_lu_pr_out_total",
        "counter",
        "Successful PERSISTENT RESERVE OUT commands, by service action.",
    ),
    (
        "ironlun_lu_handovers_total",
        "counter",
        "Handover steps by result (committed, aborted, refused).",
    ),
    (
        "ironlun_lu_failovers_total",
        "counter",
        "Failovers of the LU away from a failed host, by result (done, refused).",
    ),
    (
        "ironlun_lu_handover_switch_seconds",
        "histogram",
        "Total time of committed handovers (fence, drain, flush, transfer).",
    ),
    (
        "ironlun_session_commands_total",
        "counter",
        "SCSI commands completed for the session, by data direction.",
    ),
    (
        "ironlun_session_bytes_total",
        "counter",
        "Bytes transferred by the session's commands, by direction.",
    ),
    (
        "ironlun_session_queue_depth",
        "gauge",
        "Commands of the session in flight.",
    ),
    (
        "ironlun_logins_total",
        "counter",
        "Successful logins of normal sessions, by target.",
    ),
    (
        "ironlun_discovery_logins_total",
        "counter",
        "Successful logins of discovery sessions.",
    ),
    (
        "ironlun_login_failures_total",
        "counter",
        "Refused logins, by reason (login status class and detail).",
    ),
    (
        "ironlun_connections_accepted_total",
        "counter",
        "TCP connections accepted, by portal.",
    ),
    (
        "ironlun_connections_open",
        "gauge",
        "TCP connections open, by portal.",
    ),
    (
        "ironlun_payload_buffered_bytes",
        "gauge",
        "Payload held for peers now (Data-In charged, Data-Out received), against [limits] max_buffered.",
    ),
    (
        "ironlun_payload_buffered_limit_bytes",
        "gauge",
        "The payload budget, [limits] max_buffered.",
    ),
    (
        "ironlun_read_buffers_parked_bytes",
        "gauge",
        "Idle read buffers kept by the LUs' pools for reuse.",
    ),
    (
        "ironlun_task_set_full_total",
        "counter",
        "WRITEs answered TASK SET FULL for lack of Data-Out room (the initiator retries them).",
    ),
];

/// The exposition, built while samples are added family by family.
struct Exposition {
    out: String,
}

impl Exposition {
    fn family(&mut self, name: &str) {
        if let Some((_, ty, help)) = FAMILIES.iter().find(|f| f.0 == name) {
            let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {ty}");
        }
    }

    fn sample(&mut self, name: &str, labels: &str, value: impl std::fmt::Display) {
        if labels.is_empty() {
            let _ = writeln!(self.out, "{name} {value}");
        } else {
            let _ = writeln!(self.out, "{name}{{{labels}}} {value}");
        }
    }

    fn histogram(&mut self, name: &str, labels: &str, h: &Histogram) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0u64;
        for (i, b) in h.buckets.iter().enumerate() {
            cumulative = cumulative.saturating_add(b.load(Relaxed));
            let le = match h.bounds.get(i) {
                Some(ns) => seconds(*ns).to_string(),
                None => "+Inf".to_string(),
            };
            let _ = writeln!(
                self.out,
                "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}"
            );
        }
        let l = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let sum = seconds(h.sum_ns.load(Relaxed));
        let _ = writeln!(
            self.out,
            "{name}_sum{l} {sum}\n{name}_count{l} {cumulative}"
        );
    }
}

#[allow(clippy::cast_precision_loss)]
fn seconds(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// Render every family from the LUs `luns` (target, LUN, metrics) and the daemon-wide `d`.
pub fn render_parts<'a>(luns: &[(&'a str, u64, &'a LuMetrics)], d: &Daemon) -> String {
    let mut e = Exposition { out: String::new() };
    e.family("ironlun_build_info");
    e.sample(
        "ironlun_build_info",
        &labels(&[("version", env!("CARGO_PKG_VERSION"))]),
        1,
    );
    if let Some(t) = d.started.get() {
        e.family("ironlun_process_start_time_seconds");
        e.sample("ironlun_process_start_time_seconds", "", t);
    }
    let lu_labels: Vec<String> = luns
        .iter()
        .map(|(t, l, _)| labels(&[("target", t), ("lun", &l.to_string())]))
        .collect();
    let each = || lu_labels.iter().zip(luns.iter().map(|x| x.2));

    e.family("ironlun_lu_commands_total");
    for (l, m) in each() {
        for (i, dir) in DIRECTIONS.iter().enumerate() {
            let v = m.io.commands.get(i).map_or(0, |c| c.load(Relaxed));
            e.sample(
                "ironlun_lu_commands_total",
                &format!("{l},direction=\"{dir}\""),
                v,
            );
        }
    }
    e.family("ironlun_lu_bytes_total");
    for (l, m) in each() {
        for (b, dir) in m.io.bytes.iter().zip(DIRECTIONS) {
            e.sample(
                "ironlun_lu_bytes_total",
                &format!("{l},direction=\"{dir}\""),
                b.load(Relaxed),
            );
        }
    }
    e.family("ironlun_lu_command_duration_seconds");
    for (l, m) in each() {
        for (h, dir) in m.latency.iter().zip(DIRECTIONS) {
            e.histogram(
                "ironlun_lu_command_duration_seconds",
                &format!("{l},direction=\"{dir}\""),
                h,
            );
        }
    }
    e.family("ironlun_lu_queue_depth");
    for (l, m) in each() {
        e.sample(
            "ironlun_lu_queue_depth",
            l,
            m.io.in_flight.load(Relaxed).max(0),
        );
    }
    e.family("ironlun_lu_check_conditions_total");
    for (l, m) in each() {
        for (c, key) in m.check_conditions.iter().zip(SENSE_KEYS) {
            e.sample(
                "ironlun_lu_check_conditions_total",
                &format!("{l},sense_key=\"{key}\""),
                c.load(Relaxed),
            );
        }
    }
    e.family("ironlun_lu_reservation_conflicts_total");
    for (l, m) in each() {
        e.sample(
            "ironlun_lu_reservation_conflicts_total",
            l,
            m.reservation_conflicts.load(Relaxed),
        );
    }
    e.family("ironlun_lu_pr_out_total");
    for (l, m) in each() {
        for (c, sa) in m.pr_out.iter().zip(PR_OUT_ACTIONS) {
            e.sample(
                "ironlun_lu_pr_out_total",
                &format!("{l},service_action=\"{sa}\""),
                c.load(Relaxed),
            );
        }
    }
    e.family("ironlun_lu_handovers_total");
    for (l, m) in each() {
        for (c, r) in m.handovers.iter().zip(HANDOVER_RESULTS) {
            e.sample(
                "ironlun_lu_handovers_total",
                &format!("{l},result=\"{r}\""),
                c.load(Relaxed),
            );
        }
    }
    e.family("ironlun_lu_failovers_total");
    for (l, m) in each() {
        for (c, r) in m.failovers.iter().zip(FAILOVER_RESULTS) {
            e.sample(
                "ironlun_lu_failovers_total",
                &format!("{l},result=\"{r}\""),
                c.load(Relaxed),
            );
        }
    }
    e.family("ironlun_lu_handover_switch_seconds");
    for (l, m) in each() {
        e.histogram("ironlun_lu_handover_switch_seconds", l, &m.switch_time);
    }

    let sessions: Vec<(String, Arc<SessionMetrics>)> = lock(&d.sessions)
        .values()
        .map(|s| {
            let tpgt = s.tpgt.to_string();
            let l = labels(&[
                ("target", &s.target),
                ("initiator", &s.initiator),
                ("isid", &s.isid),
                ("tpgt", &tpgt),
            ]);
            (l, s.clone())
        })
        .collect();
    e.family("ironlun_session_commands_total");
    for (l, s) in &sessions {
        for (i, dir) in DIRECTIONS.iter().enumerate() {
            let v = s.io.commands.get(i).map_or(0, |c| c.load(Relaxed));
            e.sample(
                "ironlun_session_commands_total",
                &format!("{l},direction=\"{dir}\""),
                v,
            );
        }
    }
    e.family("ironlun_session_bytes_total");
    for (l, s) in &sessions {
        for (b, dir) in s.io.bytes.iter().zip(DIRECTIONS) {
            e.sample(
                "ironlun_session_bytes_total",
                &format!("{l},direction=\"{dir}\""),
                b.load(Relaxed),
            );
        }
    }
    e.family("ironlun_session_queue_depth");
    for (l, s) in &sessions {
        e.sample(
            "ironlun_session_queue_depth",
            l,
            s.io.in_flight.load(Relaxed).max(0),
        );
    }

    e.family("ironlun_logins_total");
    for (t, n) in lock(&d.logins).iter() {
        e.sample("ironlun_logins_total", &labels(&[("target", t)]), n);
    }
    e.family("ironlun_discovery_logins_total");
    e.sample(
        "ironlun_discovery_logins_total",
        "",
        d.discovery_logins.load(Relaxed),
    );
    e.family("ironlun_login_failures_total");
    for (c, r) in d.login_failures.iter().zip(LOGIN_FAILURES) {
        e.sample(
            "ironlun_login_failures_total",
            &labels(&[("reason", r)]),
            c.load(Relaxed),
        );
    }
    let portals: Vec<Arc<PortalMetrics>> = lock(&d.portals).clone();
    e.family("ironlun_connections_accepted_total");
    for p in &portals {
        e.sample(
            "ironlun_connections_accepted_total",
            &labels(&[("portal", &p.portal)]),
            p.accepted.load(Relaxed),
        );
    }
    e.family("ironlun_connections_open");
    for p in &portals {
        e.sample(
            "ironlun_connections_open",
            &labels(&[("portal", &p.portal)]),
            p.open.load(Relaxed).max(0),
        );
    }
    if let Some(b) = d.budget.get() {
        e.family("ironlun_payload_buffered_bytes");
        e.sample("ironlun_payload_buffered_bytes", "", b.used());
        e.family("ironlun_payload_buffered_limit_bytes");
        e.sample("ironlun_payload_buffered_limit_bytes", "", b.limit());
    }
    e.family("ironlun_read_buffers_parked_bytes");
    e.sample(
        "ironlun_read_buffers_parked_bytes",
        "",
        ironlun_backstore::buffers::retained_bytes(),
    );
    e.family("ironlun_task_set_full_total");
    e.sample(
        "ironlun_task_set_full_total",
        "",
        d.task_set_full.load(Relaxed),
    );
    e.out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;
    use bytes::Bytes;

    fn completion(status: u8, sense: &[u8], data_in: usize) -> ScsiCompletion {
        ScsiCompletion {
            status,
            sense: Bytes::copy_from_slice(sense),
            data_in: Bytes::from(vec![0; data_in]),
        }
    }

    /// The lines of `text` that start with `prefix`.
    fn lines<'a>(text: &'a str, prefix: &str) -> Vec<&'a str> {
        text.lines().filter(|l| l.starts_with(prefix)).collect()
    }

    #[test]
    fn histogram_buckets_are_cumulative_with_inf_sum_and_count() {
        static BOUNDS: &[u64] = &[1_000, 1_000_000];
        let h = Histogram::new(BOUNDS);
        h.observe(500);
        h.observe(1_000);
        h.observe(2_000);
        h.observe(5_000_000_000);
        let mut e = Exposition { out: String::new() };
        e.histogram("x_seconds", "a=\"1\"", &h);
        assert_eq!(
            e.out,
            "x_seconds_bucket{a=\"1\",le=\"0.000001\"} 2\n\
             x_seconds_bucket{a=\"1\",le=\"0.001\"} 3\n\
             x_seconds_bucket{a=\"1\",le=\"+Inf\"} 4\n\
             x_seconds_sum{a=\"1\"} 5.0000035\n\
             x_seconds_count{a=\"1\"} 4\n"
        );
        assert_eq!(h.count(), 4);
        let mut e = Exposition { out: String::new() };
        e.histogram("y", "", &Histogram::new(BOUNDS));
        assert_eq!(
            e.out,
            "y_bucket{le=\"0.000001\"} 0\ny_bucket{le=\"0.001\"} 0\ny_bucket{le=\"+Inf\"} 0\ny_sum 0\ny_count 0\n"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
        assert_eq!(
            labels(&[("target", "iqn.x:\"t\""), ("lun", "0")]),
            "target=\"iqn.x:\\\"t\\\"\",lun=\"0\""
        );
    }

    #[test]
    fn sense_keys_of_fixed_and_descriptor_format() {
        assert_eq!(sense_key(&[0x70, 0, 0x05, 0, 0, 0, 0, 10]), Some(5));
        assert_eq!(sense_key(&[0xf1, 0, 0x26]), Some(6));
        assert_eq!(sense_key(&[0x72, 0x02, 0x3a, 0]), Some(2));
        assert_eq!(sense_key(&[0x73, 0x0b]), Some(11));
        assert_eq!(sense_key(&[]), None);
        assert_eq!(sense_key(&[0x70]), None);
        assert_eq!(sense_key(&[0x7f, 0x05, 0x05]), None);
    }

    #[test]
    fn login_failure_reasons_follow_the_status_table() {
        let name = |c, d| LOGIN_FAILURES[login_failure_index(c, d)];
        assert_eq!(name(1, 1), "target_moved");
        assert_eq!(name(2, 0), "initiator_error");
        assert_eq!(name(2, 1), "authentication_failed");
        assert_eq!(name(2, 2), "authorization_failure");
        assert_eq!(name(2, 3), "target_not_found");
        assert_eq!(name(2, 5), "unsupported_version");
        assert_eq!(name(2, 6), "too_many_connections");
        assert_eq!(name(2, 7), "missing_parameter");
        assert_eq!(name(2, 11), "invalid_during_login");
        assert_eq!(name(3, 0), "target_error");
        assert_eq!(name(3, 2), "out_of_resources");
        assert_eq!(name(2, 12), "other");
        assert_eq!(name(3, 3), "other");
        assert_eq!(name(0, 0), "other");
    }

    #[test]
    fn a_probe_counts_each_command_once_by_direction_and_outcome() {
        let lu = Arc::new(LuMetrics::new());
        let s = Arc::new(SessionMetrics::new("t", "i", [0x80, 0, 0, 0, 0, 1], 1));
        // A write of 4 KiB, a read returning 512 bytes, a TUR.
        let p = Probe::begin(Some(&lu), &s, &[0x2a], 4096);
        assert_eq!(lu.io.in_flight.load(Relaxed), 1);
        p.end(Some(&lu), &s, &completion(0, &[], 0));
        Probe::begin(Some(&lu), &s, &[0x28], 0).end(Some(&lu), &s, &completion(0, &[], 512));
        Probe::begin(Some(&lu), &s, &[0x00], 0).end(Some(&lu), &s, &completion(0, &[], 0));
        // A failed command, a conflict, a PR OUT PREEMPT, a PR OUT that failed.
        let illegal = [0x70, 0, 0x05, 0, 0, 0, 0, 0];
        Probe::begin(Some(&lu), &s, &[0xff], 0).end(Some(&lu), &s, &completion(2, &illegal, 0));
        Probe::begin(Some(&lu), &s, &[0x28], 0).end(Some(&lu), &s, &completion(0x18, &[], 0));
        Probe::begin(Some(&lu), &s, &[0x5f, 0x04], 24).end(Some(&lu), &s, &completion(0, &[], 0));
        Probe::begin(Some(&lu), &s, &[0x5f, 0x01], 24).end(
            Some(&lu),
            &s,
            &completion(0x18, &[], 0),
        );
        // Dropped before completion: leaves the queue, not counted.
        let pending = Probe::begin(Some(&lu), &s, &[0x2a], 512).pending(Some(&lu), &s);
        assert_eq!(lu.io.in_flight.load(Relaxed), 1);
        drop(pending);
        // Without an LU (REPORT LUNS, a LUN not seen): the session's only.
        Probe::begin(None, &s, &[0xa0], 0).end(None, &s, &completion(0, &[], 16));

        assert_eq!(lu.io.commands(Direction::Write), 3);
        assert_eq!(lu.io.commands(Direction::Read), 1);
        assert_eq!(lu.io.commands(Direction::None), 3);
        assert_eq!(s.io.commands(Direction::Read), 2);
        assert_eq!(lu.io.in_flight.load(Relaxed), 0);
        assert_eq!(s.io.in_flight.load(Relaxed), 0);
        assert_eq!(lu.io.bytes[0].load(Relaxed), 512);
        assert_eq!(lu.io.bytes[1].load(Relaxed), 4096 + 48);
        assert_eq!(lu.latency[1].count(), 3);
        assert_eq!(lu.check_conditions[5].load(Relaxed), 1);
        assert_eq!(lu.reservation_conflicts.load(Relaxed), 2);
        assert_eq!(lu.pr_out[4].load(Relaxed), 1);
        assert_eq!(lu.pr_out[1].load(Relaxed), 0);
    }

    #[test]
    fn renders_every_family_with_help_and_type_and_lu_samples() {
        let d: &'static Daemon = Box::leak(Box::new(Daemon::new()));
        d.set_budget(crate::budget::MemoryBudget::new(64 << 20));
        d.started();
        d.login(Some("iqn.x:t"));
        d.login(None);
        d.login_failed(2, 3);
        let open = d.portal("127.0.0.1:3260").accept();
        let entry = d.register_session("iqn.x:t", "iqn.x:i", [0x80, 0x12, 0, 0, 0, 1], 1);
        let lu = LuMetrics::new();
        Probe::begin(Some(&lu), &entry.metrics, &[0x28], 0).end(
            Some(&lu),
            &entry.metrics,
            &completion(0, &[], 4096),
        );
        lu.handover(
            HandoverResult::Committed,
            Some(std::time::Duration::from_millis(3)),
        );
        let text = render_parts(&[("iqn.x:t", 7, &lu)], d);
        for (name, ty, help) in FAMILIES {
            assert!(
                text.contains(&format!("# HELP {name} {help}\n# TYPE {name} {ty}\n")),
                "{name} missing:\n{text}"
            );
        }
        let l = "target=\"iqn.x:t\",lun=\"7\"";
        assert_eq!(
            lines(&text, "ironlun_lu_commands_total"),
            [
                format!("ironlun_lu_commands_total{{{l},direction=\"read\"}} 1"),
                format!("ironlun_lu_commands_total{{{l},direction=\"write\"}} 0"),
                format!("ironlun_lu_commands_total{{{l},direction=\"none\"}} 0"),
            ]
        );
        assert_eq!(
            lines(&text, "ironlun_lu_bytes_total"),
            [
                format!("ironlun_lu_bytes_total{{{l},direction=\"read\"}} 4096"),
                format!("ironlun_lu_bytes_total{{{l},direction=\"write\"}} 0"),
            ]
        );
        assert!(text.contains(&format!(
            "ironlun_lu_handovers_total{{{l},result=\"committed\"}} 1\n"
        )));
        assert!(text.contains(&format!(
            "ironlun_lu_handover_switch_seconds_bucket{{{l},le=\"0.0025\"}} 0\nironlun_lu_handover_switch_seconds_bucket{{{l},le=\"0.005\"}} 1\n"
        )));
        assert!(text.contains(&format!("ironlun_lu_queue_depth{{{l}}} 0\n")));
        let sl = "target=\"iqn.x:t\",initiator=\"iqn.x:i\",isid=\"801200000001\",tpgt=\"1\"";
        assert!(text.contains(&format!(
            "ironlun_session_bytes_total{{{sl},direction=\"read\"}} 4096\n"
        )));
        assert!(text.contains("ironlun_logins_total{target=\"iqn.x:t\"} 1\n"));
        assert!(text.contains("ironlun_discovery_logins_total 1\n"));
        assert!(text.contains("ironlun_login_failures_total{reason=\"target_not_found\"} 1\n"));
        assert!(text.contains("ironlun_login_failures_total{reason=\"authentication_failed\"} 0\n"));
        assert!(text.contains("ironlun_connections_accepted_total{portal=\"127.0.0.1:3260\"} 1\n"));
        assert!(text.contains("ironlun_connections_open{portal=\"127.0.0.1:3260\"} 1\n"));
        assert!(text.contains(&format!(
            "ironlun_build_info{{version=\"{}\"}} 1\n",
            env!("CARGO_PKG_VERSION")
        )));
        // The session's series go with its entry; the connection leaves the open gauge.
        drop(entry);
        drop(open);
        let text = render_parts(&[], d);
        assert!(!text.contains("iqn.x:i"), "{text}");
        assert!(text.contains("ironlun_connections_open{portal=\"127.0.0.1:3260\"} 0\n"));
        assert!(text.contains("# TYPE ironlun_lu_commands_total counter\n"));
    }

    /// Every PromQL expression of a Grafana dashboard (panel targets and template queries).
    pub(crate) fn dashboard_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, x) in m {
                    match (k.as_str(), x) {
                        ("expr" | "definition", serde_json::Value::String(e)) => {
                            out.push(e.clone())
                        }
                        _ => dashboard_exprs(x, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| dashboard_exprs(x, out)),
            _ => {}
        }
    }

    #[test]
    fn dashboard_uses_only_rendered_families() {
        let text = include_str!("../../../conf/grafana/ironlun-dashboard.json");
        let dash: serde_json::Value = serde_json::from_str(text).unwrap();
        assert_eq!(dash["__inputs"][0]["name"], "DS_PROMETHEUS");
        let mut exprs = Vec::new();
        dashboard_exprs(&dash, &mut exprs);
        assert!(exprs.len() > 20, "{exprs:?}");
        let mut used = std::collections::BTreeSet::new();
        for e in &exprs {
            let mut rest = e.as_str();
            while let Some(at) = rest.find("ironlun_") {
                let tail = &rest[at..];
                let end = tail
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(tail.len());
                let name = &tail[..end];
                let family = FAMILIES.iter().find(|(f, ty, _)| {
                    *f == name
                        || (*ty == "histogram"
                            && ["_bucket", "_sum", "_count"]
                                .iter()
                                .any(|s| name.strip_suffix(s) == Some(f)))
                });
                assert!(family.is_some(), "{name} (in {e}) is not rendered");
                used.insert(family.unwrap().0);
                rest = &tail[end..];
            }
        }
        // Every family is on the dashboard.
        for (f, _, _) in FAMILIES {
            assert!(used.contains(f), "{f} is not on the dashboard");
        }
        // Every panel queries the dashboard's Prometheus input.
        for p in dash["panels"].as_array().unwrap() {
            if p["type"] != "row" {
                assert_eq!(p["datasource"]["uid"], "${DS_PROMETHEUS}", "{}", p["title"]);
            }
        }
    }
}
