//! Deterministic simulation of three gateways over the fake store (scale-out.md §0.7, §5).
//!
//! A [`World`] holds the [`Kv`], gateways A, B, C (relative target ports 1, 2, 3), two hosts and
//! a model medium, in virtual time driven by one event queue. Each gateway has its own link to
//! the store, which can be partitioned (messages either way are dropped; the watch resumes
//! from the gateway's position when the link heals), its own clock running at `1 + skew` with
//! `|skew| ≤ ρ`, and can be stalled (it processes nothing; its clock runs on) or killed (its
//! lease then expires), and a killed one restarted: a new process that joins from a snapshot
//! once its old member key is gone and knows nothing of its old incarnation's writes. Backend
//! I/O already submitted completes even on a killed gateway.
//!
//! The workload ([`Workload::PreemptAndAbort`]): H1 and H2 register with ALL_TG_PT through A
//! and C, H1 takes Write Exclusive – Registrants Only through A and writes through A; H2 sends
//! PREEMPT AND ABORT through C. Or ([`Workload::Handover`], scale-out.md §2.7): H1 is made the
//! owner through A and writes through A; a coordinator hands the LU to H2 through C (prepare,
//! fence, commit, each retried on the next gateway like a PR OUT); or ([`Workload::Switch`])
//! the same with the fence and the commit as one record (prepare, switch).
//! A write is submitted only if A's replica admits it and `may_submit(now)`, and lands after a
//! latency up to [`SimConfig::write_latency_max`]. Hosts retry NOT READY, BUSY and silence on
//! the next gateway.
//!
//! Invariants, checked as the run goes and collected in [`World::violations`]:
//! - I1 every gateway's replica equals the record at its revision, and replay never diverges;
//! - I2 a GOOD for an op committed at `r` comes only when every member at `r` has applied `r`
//!   (and drained it if the op aborts tasks) or its member key was deleted ≥ Δ ago;
//! - I3 no write of a preempted nexus lands after the PREEMPT AND ABORT's GOOD (of H1 after
//!   the handover commit's GOOD); no ownership step is refused;
//! - I4 a submit happens only before the gateway's deadline, while its lease is alive, and
//!   with the deadline (in real time) before the store's expiry of that lease;
//! - I5 a GOOD that needed the store names a committed record of that very op, and an
//!   immediate answer comes from a replica at least as new as every op already answered GOOD.
#![allow(clippy::indexing_slicing)] // gateway indexes are 0..3, fixed at construction

use crate::gateway::{Answer, Event, Gateway, GatewayConfig, Output, Request, Submit, Token};
use crate::kv::{Change, Key, Kv, Value};
use crate::lease::Timing;
use crate::op::{param_list, Op, Record};
use crate::{GatewayId, Revision, Time};
use ironlun_scsi::pr::access::{allowed, Class, Standing};
use ironlun_scsi::pr::ownership::{OwnershipOp, TaskPick};
use ironlun_scsi::pr::{sa, InitiatorPort, ItNexus, OutRequest, PrContext, PrState};
use std::collections::BTreeMap;
use std::time::Duration;

/// The unit serial number of the simulated LU (the codec checks it).
const SIM_SERIAL: &str = "sim-lu-0";

/// Index of gateway A (port 1).
pub const A: usize = 0;
/// Index of gateway B (port 2).
pub const B: usize = 1;
/// Index of gateway C (port 3).
pub const C: usize = 2;
const N: usize = 3;
const PORTS: [u16; N] = [1, 2, 3];
const KEY1: u64 = 0x1111;
const KEY2: u64 = 0x2222;
/// Write Exclusive – Registrants Only (SPC-4 Table 213).
const WERO: u8 = 5;

/// A xorshift64* generator: small, seedable, and the same on every platform.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed` (any value, 0 included).
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `lo..=hi` (`lo` if `hi < lo`).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        lo + self.next_u64() % (hi - lo + 1)
    }

    /// True with probability `per_mille / 1000`.
    pub fn chance(&mut self, per_mille: u64) -> bool {
        self.next_u64() % 1000 < per_mille
    }
}

fn ms(v: u64) -> Time {
    Time::from_micros(v * 1000)
}

/// The faults of one run. Windows are `[start, end)` in real time.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// `(gateway, start, end)`: the gateway's store link drops everything.
    pub partitions: Vec<(usize, Time, Time)>,
    /// `(gateway, start, end)`: the gateway process runs nothing.
    pub stalls: Vec<(usize, Time, Time)>,
    /// `(gateway, at)`: the gateway process dies.
    pub kills: Vec<(usize, Time)>,
    /// `(gateway, at)`: a killed gateway starts again: once its old member key is gone (it
    /// retries every 500 ms until then) it registers a new lease and member key and joins
    /// from a snapshot of the store (`Gateway::join`). Messages to the dead process are lost.
    pub restarts: Vec<(usize, Time)>,
    /// Clock rate error of each gateway, parts per million (negative: slow).
    pub skew_ppm: [i64; N],
}

/// What the hosts do (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Workload {
    /// H2 preempts H1 with PREEMPT AND ABORT through C.
    #[default]
    PreemptAndAbort,
    /// The LU is handed from owner H1 to H2 through C.
    Handover,
    /// As `Handover`, with the fence and the commit as one record ([`OwnershipOp::Switch`]).
    Switch,
}

/// Everything that defines a run besides the seed.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// What the hosts do.
    pub workload: Workload,
    /// Negative control: gateways report an abort drained at once instead of when the
    /// aborted writes land (the protocol must then be caught by I3).
    pub broken_abort_drain: bool,
    /// Every gateway's lease bound.
    pub timing: Timing,
    /// Largest backend write latency.
    pub write_latency_max: Duration,
    /// Per-mille chance that a store message is delayed 50–600 ms instead of 0.2–3 ms.
    pub spike_per_mille: u64,
    /// When H2 sends PREEMPT AND ABORT (if its setup is done).
    pub preempt_at: Time,
    /// End of the run.
    pub end: Time,
    /// Injected faults.
    pub faults: Faults,
}

impl SimConfig {
    /// No faults, no skew; latency just under the in-flight budget; preempt at 2 s.
    pub fn quiet(timing: Timing) -> Self {
        let budget = timing.in_flight_budget();
        Self {
            workload: Workload::PreemptAndAbort,
            broken_abort_drain: false,
            timing,
            write_latency_max: budget.mul_f64(0.9).max(Duration::from_millis(1)),
            spike_per_mille: 0,
            preempt_at: ms(2000),
            end: ms(20_000),
            faults: Faults::default(),
        }
    }

    /// Random faults drawn from `seed`: skew up to ρ on every gateway, message delay spikes,
    /// and with some probability a partition, a stall and a kill.
    pub fn random(seed: u64, timing: Timing) -> Self {
        let mut rng = Rng::new(seed ^ 0xFA17);
        let mut cfg = Self::quiet(timing);
        let rho = i64::from(timing.settings().rho_ppm);
        for s in &mut cfg.faults.skew_ppm {
            let span = u64::try_from(2 * rho).unwrap_or(0);
            *s = i64::try_from(rng.range(0, span)).unwrap_or(0) - rho;
        }
        cfg.spike_per_mille = rng.range(0, 30);
        cfg.preempt_at = ms(rng.range(300, 8000));
        if rng.chance(500) {
            let g = if rng.chance(600) {
                A
            } else {
                usize::try_from(rng.range(0, 2)).unwrap_or(A)
            };
            let start = rng.range(100, 7000);
            let len = match rng.range(0, 2) {
                0 => rng.range(100, 2000),
                1 => rng.range(4000, 12_000),
                _ => 100_000,
            };
            cfg.faults.partitions.push((g, ms(start), ms(start + len)));
        }
        if rng.chance(250) {
            let g = usize::try_from(rng.range(0, 2)).unwrap_or(A);
            let start = rng.range(100, 8000);
            cfg.faults
                .stalls
                .push((g, ms(start), ms(start + rng.range(100, 12_000))));
        }
        if rng.chance(200) {
            let g = usize::try_from(rng.range(0, 2)).unwrap_or(A);
            let at = rng.range(200, 10_000);
            cfg.faults.kills.push((g, ms(at)));
            if rng.chance(600) {
                cfg.faults.restarts.push((g, ms(at + rng.range(100, 9000))));
            }
        }
        cfg
    }
}

#[derive(Debug, Clone)]
enum Msg {
    ToKv(usize, Request),
    ToGw(usize, Event),
    Resync(usize),
    Timer(usize),
    Prout { g: usize, op: usize, token: Token },
    HostIssue(usize),
    HostTimeout { op: usize, token: Token },
    Write,
    Land(u64),
    Drained(usize, Revision),
    Kill(usize),
    Restart(usize),
    Unstall(usize),
    Wake,
}

impl Msg {
    /// The gateway process that must run to handle this, if any.
    fn target(&self) -> Option<usize> {
        match self {
            Msg::ToGw(g, _) | Msg::Resync(g) | Msg::Timer(g) | Msg::Drained(g, _) => Some(*g),
            Msg::Prout { g, .. } => Some(*g),
            Msg::Write => Some(A),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
struct Node {
    gw: Gateway,
    killed: bool,
    timer: Option<Time>,
    last_to_gw: Time,
    last_to_kv: Time,
    /// Messages that reached the gateway while it was stalled, in arrival order.
    backlog: Vec<Msg>,
    /// Which process this is (0, then one more per restart).
    incarnation: u64,
}

#[derive(Debug, Clone)]
struct HostOp {
    /// An ownership step instead of a PR OUT.
    own: Option<OwnershipOp>,
    host: usize,
    service_action: u8,
    ty: u8,
    param: Vec<u8>,
    path: usize,
    token: Option<Token>,
    tries: u32,
    result: Option<Answer>,
}

/// An in-flight backend write.
#[derive(Debug, Clone)]
struct Write {
    gw: usize,
    /// The gateway process that submitted it (a restart starts a new one, which does not
    /// know the old one's writes).
    incarnation: u64,
    nexus: ItNexus,
    land: Time,
}

/// Counters of one run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Writes that reached the medium.
    pub landed: u64,
    /// Writes refused by the replica's access check (RESERVATION CONFLICT).
    pub conflicts: u64,
    /// Writes refused by `may_submit` (02/04/0A).
    pub fenced_writes: u64,
    /// GOOD answers that needed the store.
    pub committed_goods: u64,
    /// `Output::Fenced` seen.
    pub fences: u64,
    /// `Output::Unfenced` seen.
    pub unfences: u64,
    /// Invariant checks performed.
    pub checks: u64,
    /// Gateways started again after a kill.
    pub restarts: u64,
}

/// The simulated cluster. See the module documentation.
#[derive(Debug)]
pub struct World {
    /// Real (store) time.
    pub now: Time,
    /// The store.
    pub kv: Kv,
    /// Violated invariants, in the order found.
    pub violations: Vec<String>,
    /// Real time of the first GOOD of H2's PREEMPT AND ABORT.
    pub preempt_good: Option<Time>,
    /// `(gateway, registration key, reason)` of every UA raised.
    pub uas: Vec<(usize, u64, ironlun_scsi::sense::SenseReason)>,
    /// `(gateway, revision, land time of the last aborted write)` of every abort.
    pub aborts: Vec<(usize, Revision, Time)>,
    /// Real time each gateway last fenced.
    pub fenced_at: [Option<Time>; N],
    /// `(real time, nexus)` of each landed write.
    pub landed: Vec<(Time, ItNexus)>,
    /// Run counters.
    pub stats: Stats,
    cfg: SimConfig,
    rng: Rng,
    nodes: Vec<Node>,
    queue: BTreeMap<(Time, u64), Msg>,
    seq: u64,
    broadcast_rev: Revision,
    records: BTreeMap<Revision, Record>,
    hist_seen: usize,
    ops: Vec<HostOp>,
    tokens: BTreeMap<Token, usize>,
    next_token: Token,
    writes: BTreeMap<u64, Write>,
    writing: bool,
    max_good_rev: Revision,
}

fn gateway_config(i: usize, timing: Timing) -> GatewayConfig {
    GatewayConfig {
        id: GatewayId(u32::try_from(i).unwrap_or(0)),
        ports: vec![PORTS[i]],
        cluster_ports: PORTS.to_vec(),
        timing,
        rpc_timeout: Duration::from_millis(800),
        max_tries: 16,
    }
}

fn name(host: usize) -> &'static str {
    if host == 0 {
        "iqn.2026-01.test:h1"
    } else {
        "iqn.2026-01.test:h2"
    }
}

fn nexus(host: usize, g: usize) -> ItNexus {
    ItNexus {
        initiator: InitiatorPort::new(name(host), [0x02, 0x3d, 0, 0, 0, 1]),
        rtpi: PORTS[g],
    }
}

impl World {
    /// A world for `seed` and `cfg`, at time 0, every gateway joined.
    pub fn new(seed: u64, cfg: SimConfig) -> Self {
        let mut kv = Kv::new();
        let mut nodes = Vec::new();
        for i in 0..N {
            let id = GatewayId(u32::try_from(i).unwrap_or(0));
            let lease = kv.grant(Time::default(), cfg.timing.settings().ttl);
            let rev = kv
                .put(Time::default(), Key::Member(id), Value::Member, Some(lease))
                .unwrap_or(0);
            let gw = Gateway::new(gateway_config(i, cfg.timing), lease, Time::default(), rev);
            nodes.push(Node {
                gw,
                killed: false,
                timer: None,
                last_to_gw: Time::default(),
                last_to_kv: Time::default(),
                backlog: Vec::new(),
                incarnation: 0,
            });
        }
        let op = |host, service_action, ty, param, path| HostOp {
            own: None,
            host,
            service_action,
            ty,
            param,
            path,
            token: None,
            tries: 0,
            result: None,
        };
        let own = |host, step, path| HostOp {
            own: Some(step),
            ..op(host, 0, 0, Vec::new(), path)
        };
        let (h1, h2) = (name(0).to_string(), name(1).to_string());
        let ops = if cfg.workload == Workload::PreemptAndAbort {
            vec![
                op(
                    0,
                    sa::REGISTER_AND_IGNORE_EXISTING_KEY,
                    0,
                    param_list(0, KEY1, 0x04),
                    A,
                ),
                op(
                    1,
                    sa::REGISTER_AND_IGNORE_EXISTING_KEY,
                    0,
                    param_list(0, KEY2, 0x04),
                    C,
                ),
                op(0, sa::RESERVE, WERO, param_list(KEY1, 0, 0), A),
                op(1, sa::PREEMPT_AND_ABORT, WERO, param_list(KEY2, KEY1, 0), C),
            ]
        } else {
            // Owner H1, prepared for H2; then fence and commit, or the switch.
            let mut steps = vec![
                own(
                    0,
                    OwnershipOp::SetOwner {
                        host: h1.clone(),
                        epoch: 1,
                    },
                    A,
                ),
                own(
                    1,
                    OwnershipOp::Prepare {
                        from: h1.clone(),
                        to: h2.clone(),
                        epoch: 2,
                    },
                    C,
                ),
            ];
            let (from, to, epoch) = (h1.clone(), h2.clone(), 2);
            if cfg.workload == Workload::Switch {
                steps.push(own(1, OwnershipOp::Switch { from, to, epoch }, C));
            } else {
                steps.push(own(
                    1,
                    OwnershipOp::Fence {
                        from: from.clone(),
                        epoch,
                    },
                    C,
                ));
                steps.push(own(1, OwnershipOp::Commit { from, to, epoch }, C));
            }
            steps
        };
        let mut w = Self {
            now: Time::default(),
            kv,
            violations: Vec::new(),
            preempt_good: None,
            uas: Vec::new(),
            aborts: Vec::new(),
            fenced_at: [None; N],
            landed: Vec::new(),
            stats: Stats::default(),
            rng: Rng::new(seed),
            nodes,
            queue: BTreeMap::new(),
            seq: 0,
            broadcast_rev: 0,
            records: BTreeMap::new(),
            hist_seen: 0,
            ops,
            tokens: BTreeMap::new(),
            next_token: 0,
            writes: BTreeMap::new(),
            writing: false,
            max_good_rev: 0,
            cfg,
        };
        for g in 0..N {
            w.arm(g);
        }
        for (g, _, end) in w.cfg.faults.partitions.clone() {
            w.push(end, Msg::Resync(g));
        }
        // Pushed first, so at its instant the backlog runs before anything newer.
        for (g, _, end) in w.cfg.faults.stalls.clone() {
            w.push(end, Msg::Unstall(g));
        }
        for (g, at) in w.cfg.faults.kills.clone() {
            w.push(at, Msg::Kill(g));
        }
        for (g, at) in w.cfg.faults.restarts.clone() {
            w.push(at, Msg::Restart(g));
        }
        w.push(ms(10), Msg::HostIssue(0));
        if w.cfg.workload == Workload::PreemptAndAbort {
            w.push(ms(10), Msg::HostIssue(1));
        }
        w.broadcast();
        w
    }

    /// Runs until the configured end; returns the violations found.
    pub fn run(&mut self) -> &[String] {
        while let Some((&(at, seq), _)) = self.queue.first_key_value() {
            if at > self.cfg.end {
                break;
            }
            let Some(msg) = self.queue.remove(&(at, seq)) else {
                break;
            };
            self.now = at;
            self.kv.expire(at);
            self.broadcast();
            self.dispatch(msg);
            self.broadcast();
        }
        &self.violations
    }

    /// The gateway at index `g`.
    pub fn gateway(&self, g: usize) -> &Gateway {
        &self.nodes[g].gw
    }

    /// H1's and H2's PR OUT answers: register H1, register H2, reserve, preempt-and-abort.
    pub fn answers(&self) -> Vec<Option<Answer>> {
        self.ops.iter().map(|o| o.result.clone()).collect()
    }

    fn push(&mut self, at: Time, msg: Msg) {
        self.seq += 1;
        self.queue.insert((at, self.seq), msg);
    }

    fn local(&self, g: usize, real: Time) -> Time {
        let skew = i128::from(self.cfg.faults.skew_ppm[g]);
        let t = i128::from(real.as_micros());
        Time::from_micros(u64::try_from(t + t * skew / 1_000_000).unwrap_or(0))
    }

    /// The earliest real time at which gateway `g`'s clock shows `local`.
    fn real(&self, g: usize, local: Time) -> Time {
        let rate = 1_000_000 + i128::from(self.cfg.faults.skew_ppm[g]);
        let t = i128::from(local.as_micros());
        let real = (t * 1_000_000 + rate - 1) / rate;
        Time::from_micros(u64::try_from(real).unwrap_or(u64::MAX))
    }

    fn link_down(&self, g: usize, at: Time) -> bool {
        self.cfg
            .faults
            .partitions
            .iter()
            .any(|&(p, s, e)| p == g && s <= at && at < e)
    }

    fn stalled(&self, g: usize, at: Time) -> bool {
        let stalls = &self.cfg.faults.stalls;
        stalls.iter().any(|&(p, s, e)| p == g && s <= at && at < e)
    }

    fn delay(&mut self) -> Duration {
        if self.rng.chance(self.cfg.spike_per_mille) {
            Duration::from_millis(self.rng.range(50, 600))
        } else {
            Duration::from_micros(self.rng.range(200, 3000))
        }
    }

    fn send_to_gw(&mut self, g: usize, ev: Event) {
        if self.nodes[g].killed || self.link_down(g, self.now) {
            return;
        }
        let d = self.delay();
        let at = self.now.saturating_add(d).max(self.nodes[g].last_to_gw);
        self.nodes[g].last_to_gw = at;
        self.push(at, Msg::ToGw(g, ev));
    }

    fn send_to_kv(&mut self, g: usize, req: Request) {
        if self.link_down(g, self.now) {
            return;
        }
        let d = self.delay();
        let at = self.now.saturating_add(d).max(self.nodes[g].last_to_kv);
        self.nodes[g].last_to_kv = at;
        self.push(at, Msg::ToKv(g, req));
    }

    /// Streams new store events to every watch and indexes new records.
    fn broadcast(&mut self) {
        let hist = self.kv.history();
        for (_, ev) in hist.iter().skip(self.hist_seen) {
            if let (
                Key::Pr,
                Change::Put {
                    value: Value::Record(r),
                    ..
                },
            ) = (&ev.key, &ev.change)
            {
                self.records.insert(ev.revision, (**r).clone());
            }
        }
        self.hist_seen = hist.len();
        if self.kv.head() == self.broadcast_rev {
            return;
        }
        let evs = self.kv.events_since(self.broadcast_rev);
        self.broadcast_rev = self.kv.head();
        for g in 0..N {
            self.send_to_gw(g, Event::Watch(evs.clone()));
        }
    }

    fn dispatch(&mut self, msg: Msg) {
        if let Some(g) = msg.target() {
            if self.nodes[g].killed {
                return;
            }
            if self.stalled(g, self.now) {
                self.nodes[g].backlog.push(msg);
                return;
            }
        }
        match msg {
            Msg::ToKv(g, req) => self.at_kv(g, req),
            Msg::ToGw(g, ev) => {
                if self.link_down(g, self.now) {
                    return;
                }
                let local = self.local(g, self.now);
                self.nodes[g].gw.handle(local, ev);
                self.after(g);
            }
            Msg::Resync(g) => {
                // The gateway re-watches from its position: the catch-up comes before anything
                // the broken stream still had queued for it.
                if !self.link_down(g, self.now) {
                    let evs = self.kv.events_since(self.nodes[g].gw.watch_revision());
                    let local = self.local(g, self.now);
                    self.nodes[g].gw.handle(local, Event::Watch(evs));
                    self.after(g);
                }
            }
            Msg::Timer(g) => {
                self.nodes[g].timer = None;
                let local = self.local(g, self.now);
                self.nodes[g].gw.handle_timeout(local);
                self.after(g);
            }
            Msg::Drained(g, rev) => {
                let local = self.local(g, self.now);
                self.nodes[g].gw.handle(local, Event::Drained(rev));
                self.after(g);
            }
            Msg::Prout { g, op, token } => self.prout(g, op, token),
            Msg::HostIssue(op) => self.issue(op),
            Msg::HostTimeout { op, token } => {
                if self.ops[op].result.is_none() && self.ops[op].token == Some(token) {
                    self.retry(op);
                }
            }
            Msg::Write => self.write(),
            Msg::Land(id) => self.land(id),
            Msg::Kill(g) => self.nodes[g].killed = true,
            Msg::Restart(g) => self.restart(g),
            Msg::Unstall(g) => {
                for msg in std::mem::take(&mut self.nodes[g].backlog) {
                    self.dispatch(msg);
                }
            }
            Msg::Wake => {}
        }
    }

    /// A killed gateway starts again (see [`Faults::restarts`]).
    fn restart(&mut self, g: usize) {
        if !self.nodes[g].killed {
            return;
        }
        let id = GatewayId(u32::try_from(g).unwrap_or(0));
        if self.kv.get(Key::Member(id)).is_some() {
            self.push(
                self.now.saturating_add(Duration::from_millis(500)),
                Msg::Restart(g),
            );
            return;
        }
        // Whatever was on its way to the dead process died with it. The end of a partition
        // (`Resync`) is the link's: the new process's watch resumes from its join then.
        self.queue.retain(|_, m| match m {
            Msg::ToGw(x, _) | Msg::Timer(x) | Msg::Drained(x, _) => *x != g,
            Msg::Prout { g: x, .. } => *x != g,
            _ => true,
        });
        let ttl = self.cfg.timing.settings().ttl;
        let granted_at = self.local(g, self.now);
        let lease = self.kv.grant(self.now, ttl);
        let created = self
            .kv
            .put(self.now, Key::Member(id), Value::Member, Some(lease))
            .unwrap_or(0);
        let mut keys = vec![Key::Pr];
        for h in 0..N {
            let hid = GatewayId(u32::try_from(h).unwrap_or(0));
            keys.extend([Key::Member(hid), Key::Applied(hid), Key::Drained(hid)]);
        }
        let snapshot: Vec<crate::kv::Event> = keys
            .into_iter()
            .filter_map(|k| {
                self.kv.get(k).map(|kv| crate::kv::Event {
                    revision: kv.mod_revision,
                    key: k,
                    change: Change::Put {
                        value: kv.value.clone(),
                        create_revision: kv.create_revision,
                    },
                })
            })
            .collect();
        let head = self.kv.head();
        let gw = Gateway::join(
            gateway_config(g, self.cfg.timing),
            lease,
            granted_at,
            created,
            head,
            &snapshot,
        );
        let incarnation = self.nodes[g].incarnation + 1;
        self.nodes[g] = Node {
            gw,
            killed: false,
            timer: None,
            last_to_gw: self.now,
            last_to_kv: self.now,
            backlog: Vec::new(),
            incarnation,
        };
        self.stats.restarts += 1;
        self.after(g);
    }

    fn at_kv(&mut self, g: usize, req: Request) {
        if self.link_down(g, self.now) {
            return;
        }
        let id = self.nodes[g].gw.id();
        let lease = self.nodes[g].gw.lease();
        match req {
            Request::Txn {
                attempt,
                expect,
                lease,
                record,
            } => {
                // The record travels as the bytes etcd would store (crate::codec), so every
                // replica and the checker see what a real store gives back.
                let bytes = crate::codec::encode_record(&record, SIM_SERIAL);
                let record = crate::codec::decode_record(&bytes, SIM_SERIAL)
                    .expect("a record the codec wrote decodes");
                let result = self.kv.txn(
                    self.now,
                    Key::Pr,
                    expect,
                    id,
                    lease,
                    Value::Record(Box::new(record)),
                );
                self.send_to_gw(g, Event::Txn { attempt, result });
            }
            Request::PutApplied(r) => {
                self.kv
                    .put(self.now, Key::Applied(id), Value::Revision(r), Some(lease));
            }
            Request::PutDrained(r) => {
                self.kv
                    .put(self.now, Key::Drained(id), Value::Revision(r), Some(lease));
            }
            Request::KeepAlive { sent_at } => {
                let ok = self.kv.keepalive(self.now, lease).is_some();
                if let Some(e) = self.kv.next_expiry() {
                    self.push(e, Msg::Wake);
                }
                self.send_to_gw(g, Event::KeepAlive { sent_at, ok });
            }
            Request::ReadHead => {
                let head = self.kv.head();
                self.send_to_gw(g, Event::Head(head));
            }
        }
    }

    /// Drains a gateway's requests and outputs, checks I1, re-arms its timer.
    fn after(&mut self, g: usize) {
        while let Some(req) = self.nodes[g].gw.poll_request() {
            self.send_to_kv(g, req);
        }
        while let Some(out) = self.nodes[g].gw.poll_output() {
            self.output(g, out);
        }
        self.check_replica(g);
        self.arm(g);
    }

    fn arm(&mut self, g: usize) {
        if let Some(local) = self.nodes[g].gw.poll_timeout() {
            let at = self.real(g, local).max(self.now);
            if self.nodes[g].timer.is_none_or(|t| at < t || t < self.now) {
                self.nodes[g].timer = Some(at);
                self.push(at, Msg::Timer(g));
            }
        }
    }

    fn violation(&mut self, what: String) {
        self.violations
            .push(format!("t={}us: {what}", self.now.as_micros()));
    }

    /// I1: the replica equals the record at its revision.
    fn check_replica(&mut self, g: usize) {
        self.stats.checks += 1;
        let gw = &self.nodes[g].gw;
        let rev = gw.pr_revision();
        let ok = match self.records.get(&rev) {
            Some(rec) => rec.state == *gw.state(),
            None => rev == 0 && *gw.state() == PrState::new(),
        };
        if !ok {
            self.violation(format!(
                "I1: gateway {g} state differs from the record at {rev}"
            ));
        }
    }

    fn output(&mut self, g: usize, out: Output) {
        match out {
            Output::Respond {
                token,
                answer,
                revision,
            } => self.respond(g, token, answer, revision),
            Output::State { .. } => {}
            Output::AbortHost { pick, revision } => {
                let pick = move |it: &ItNexus| match &pick {
                    TaskPick::Host(h) => it.initiator.name() == h,
                    TaskPick::AllBut(h) => it.initiator.name() != h,
                };
                self.drain_writes(g, revision, pick);
            }
            Output::DrainHost { host, revision } => {
                self.drain_writes(g, revision, move |it| it.initiator.name() == host);
            }
            Output::Ua {
                registration,
                reason,
                ..
            } => self.uas.push((g, registration.key, reason)),
            Output::AbortTasks {
                registrations,
                revision,
                ..
            } => self.drain_writes(g, revision, move |it| {
                registrations.iter().any(|r| r.matches(it))
            }),
            Output::Fenced => {
                self.stats.fences += 1;
                self.fenced_at[g] = Some(self.now);
            }
            Output::Unfenced => self.stats.unfences += 1,
            Output::LeaseLost => {}
            Output::Diverged { revision } => {
                self.violation(format!("I1: gateway {g} diverged at {revision}"))
            }
        }
    }

    /// Gateway `g` reports `revision` drained once the writes of the nexuses `pick` names
    /// that it has in flight have landed. Only this process's own writes: a restarted gateway
    /// knows nothing of the ones its previous incarnation left in flight.
    fn drain_writes(&mut self, g: usize, revision: Revision, pick: impl Fn(&ItNexus) -> bool) {
        let incarnation = self.nodes[g].incarnation;
        let land = self
            .writes
            .values()
            .filter(|w| w.gw == g && w.incarnation == incarnation && pick(&w.nexus))
            .map(|w| w.land)
            .max()
            .unwrap_or(self.now)
            .max(self.now);
        let at = if self.cfg.broken_abort_drain {
            self.now
        } else {
            land
        };
        self.aborts.push((g, revision, land));
        self.push(at, Msg::Drained(g, revision));
    }

    fn issue(&mut self, op: usize) {
        if self.ops[op].result.is_some() {
            return;
        }
        self.next_token += 1;
        let token = self.next_token;
        self.tokens.insert(token, op);
        self.ops[op].token = Some(token);
        self.ops[op].tries += 1;
        let g = self.ops[op].path;
        self.push(self.now, Msg::Prout { g, op, token });
        self.push(
            self.now.saturating_add(Duration::from_secs(3)),
            Msg::HostTimeout { op, token },
        );
    }

    fn retry(&mut self, op: usize) {
        if self.ops[op].tries >= 8 {
            self.ops[op].result = Some(Answer::NotReady);
            return;
        }
        self.ops[op].path = (self.ops[op].path + 1) % N;
        self.ops[op].token = None;
        self.push(
            self.now.saturating_add(Duration::from_millis(50)),
            Msg::HostIssue(op),
        );
    }

    fn prout(&mut self, g: usize, op: usize, token: Token) {
        let o = &self.ops[op];
        if let Some(step) = o.own.clone() {
            let local = self.local(g, self.now);
            let submit = self.nodes[g].gw.ownership(local, token, step);
            if let Submit::Immediate(answer) = submit {
                self.respond(g, token, answer, None);
            }
            return self.after(g);
        }
        let it = nexus(o.host, g);
        let param = o.param.clone();
        let req = OutRequest {
            service_action: o.service_action,
            scope: 0,
            ty: o.ty,
            param: &param,
        };
        let local = self.local(g, self.now);
        let submit = self.nodes[g].gw.prout(local, token, &it, req);
        if let Submit::Immediate(answer) = submit {
            self.respond(g, token, answer, None);
        }
        self.after(g);
    }

    /// A PR OUT answer: checks I2 and I5, then moves the host script on.
    fn respond(&mut self, g: usize, token: Token, answer: Answer, revision: Option<Revision>) {
        let Some(&op) = self.tokens.get(&token) else {
            return;
        };
        self.stats.checks += 1;
        match (&answer, revision) {
            (Answer::Good, Some(r)) => {
                self.stats.committed_goods += 1;
                self.check_committed(g, op, r);
                self.max_good_rev = self.max_good_rev.max(r);
            }
            (Answer::Good | Answer::Failed(_) | Answer::Refused(_), None) => {
                let rev = self.nodes[g].gw.pr_revision();
                if rev < self.max_good_rev {
                    self.violation(format!(
                        "I5: immediate answer on {g} from revision {rev} < GOOD at {}",
                        self.max_good_rev
                    ));
                }
            }
            _ => {}
        }
        // The last op is the preemption, the commit or the switch.
        if answer == Answer::Good && op + 1 == self.ops.len() && self.preempt_good.is_none() {
            self.preempt_good = Some(self.now);
        }
        if self.ops[op].result.is_some() || self.ops[op].token != Some(token) {
            return;
        }
        if matches!(answer, Answer::NotReady | Answer::Busy) {
            return self.retry(op);
        }
        if let Answer::Refused(e) = &answer {
            self.violation(format!("ownership step {op} refused on {g}: {e}"));
        }
        self.ops[op].result = Some(answer);
        let good = |w: &Self, i: usize| w.ops[i].result == Some(Answer::Good);
        if self.cfg.workload != Workload::PreemptAndAbort {
            // Owner, then writes and prepare; fence (or switch) at `preempt_at`; commit at once.
            match op {
                0 if good(self, 0) => {
                    self.writing = true;
                    self.push(self.now, Msg::Write);
                    self.push(self.now, Msg::HostIssue(1));
                }
                1 if good(self, 1) => {
                    let at = self.cfg.preempt_at.max(self.now);
                    self.push(at, Msg::HostIssue(2));
                }
                2 if good(self, 2) && self.ops.len() > 3 => self.push(self.now, Msg::HostIssue(3)),
                _ => {}
            }
            return;
        }
        if op == 0 && good(self, 0) {
            self.push(self.now, Msg::HostIssue(2));
        }
        if op == 2 && good(self, 2) && !self.writing {
            self.writing = true;
            self.push(self.now, Msg::Write);
        }
        if (op == 1 || op == 2) && good(self, 1) && good(self, 2) {
            let at = self.cfg.preempt_at.max(self.now);
            self.push(at, Msg::HostIssue(3));
        }
    }

    /// I5 (the GOOD names a committed record of this op) and I2 (completion rule).
    fn check_committed(&mut self, g: usize, op: usize, r: Revision) {
        let o = &self.ops[op];
        let matches = match self.records.get(&r).map(|rec| &rec.op) {
            Some(Op::Ownership(step)) => o.own.as_ref() == Some(step),
            Some(Op::Prout {
                it,
                service_action,
                param,
                ..
            }) => {
                it.initiator == nexus(o.host, g).initiator
                    && *service_action == o.service_action
                    && *param == o.param
            }
            _ => false,
        };
        if !matches {
            self.violation(format!(
                "I5: GOOD on {g} for op {op} at {r}, which is not its commit"
            ));
            return;
        }
        let prev = self
            .records
            .range(..r)
            .next_back()
            .map(|(_, rec)| rec.state.clone())
            .unwrap_or_default();
        let mut state = prev;
        let ctx = PrContext {
            relative_ports: &PORTS,
            ptpl_capable: true,
        };
        let applied = self
            .records
            .get(&r)
            .and_then(|rec| rec.op.apply(&mut state, ctx).ok())
            .unwrap_or_default();
        let aborted = |it: &ItNexus| {
            applied.fx.aborted.iter().any(|a| a.matches(it))
                || match &applied.abort {
                    Some(TaskPick::Host(h)) => it.initiator.name() == h,
                    Some(TaskPick::AllBut(h)) => it.initiator.name() != h,
                    None => false,
                }
        };
        let delta = self.cfg.timing.settings().lock_delay;
        for h in 0..N {
            let id = GatewayId(u32::try_from(h).unwrap_or(0));
            let hist = self.kv.history();
            // The incarnation of `h` created last before `r` (a restart makes a new one).
            let Some(created) = hist
                .iter()
                .rev()
                .find(|(_, e)| {
                    e.key == Key::Member(id)
                        && e.revision < r
                        && matches!(e.change, Change::Put { .. })
                })
                .map(|(_, e)| e.revision)
            else {
                continue;
            };
            // Gone: that incarnation's member key was deleted at least Δ ago. A later one,
            // created after `r`, owes nothing for `r`; writes of an earlier one still in
            // flight count as `undrained` below.
            let gone = hist
                .iter()
                .find(|(_, e)| {
                    e.key == Key::Member(id) && e.revision > created && e.change == Change::Delete
                })
                .is_some_and(|(at, _)| self.now >= at.saturating_add(delta));
            if gone {
                continue;
            }
            let applied = self.nodes[h].gw.pr_revision() >= r;
            let busy = self
                .writes
                .values()
                .any(|w| w.gw == h && w.land > self.now && aborted(&w.nexus));
            if !applied || busy {
                self.violation(format!(
                    "I2: GOOD on {g} at {r} while gateway {h} applied={applied} undrained={busy}"
                ));
            }
        }
    }

    /// H1 writes through A: access check on A's replica, then the self-fence check.
    fn write(&mut self) {
        let gap = self.rng.range(20, 80);
        self.push(
            self.now.saturating_add(Duration::from_millis(gap)),
            Msg::Write,
        );
        let it = nexus(0, A);
        let gw = &self.nodes[A].gw;
        let state = gw.state();
        let id = state.registration_id(&it);
        let standing = Standing {
            reservation: state.reservation().map(|r| r.ty),
            registered: id.is_some(),
            holder: id.is_some_and(|i| state.is_holder(i)),
        };
        let fenced = state.handover().fenced() == Some(it.initiator.name());
        if fenced || !allowed(Class::Modify, standing) {
            self.stats.conflicts += 1;
            return;
        }
        let local = self.local(A, self.now);
        if !gw.may_submit(local) {
            self.stats.fenced_writes += 1;
            return;
        }
        // I4: lease alive at the store and the deadline before its expiry.
        self.stats.checks += 1;
        let deadline = self.real(A, gw.deadline());
        match self.kv.lease_expiry(gw.lease()) {
            Some(e) if deadline <= e => {}
            e => self.violation(format!(
                "I4: submit on A with deadline {deadline:?} and store expiry {e:?}"
            )),
        }
        let max = u64::try_from(self.cfg.write_latency_max.as_micros()).unwrap_or(u64::MAX);
        let lat = if self.rng.chance(200) {
            max
        } else {
            self.rng.range(100, max)
        };
        let land = self.now.saturating_add(Duration::from_micros(lat));
        self.seq += 1;
        let wid = self.seq;
        self.writes.insert(
            wid,
            Write {
                gw: A,
                incarnation: self.nodes[A].incarnation,
                nexus: it,
                land,
            },
        );
        self.push(land, Msg::Land(wid));
    }

    fn land(&mut self, id: u64) {
        let Some(w) = self.writes.remove(&id) else {
            return;
        };
        self.stats.landed += 1;
        self.stats.checks += 1;
        if let Some(good) = self.preempt_good {
            if self.now > good && w.nexus.initiator == nexus(0, A).initiator {
                self.violation(format!(
                    "I3: H1 write landed {}us after the PREEMPT AND ABORT GOOD",
                    self.now.as_micros() - good.as_micros()
                ));
            }
        }
        self.landed.push((self.now, w.nexus));
    }
}

/// Runs `seeds` random runs with `timing`; returns the violations found, each prefixed with its
/// seed, and the summed counters.
pub fn sweep(seeds: std::ops::Range<u64>, timing: Timing) -> (Vec<String>, Stats) {
    sweep_with(seeds, timing, Workload::PreemptAndAbort)
}

/// [`sweep`] with `workload`.
pub fn sweep_with(
    seeds: std::ops::Range<u64>,
    timing: Timing,
    workload: Workload,
) -> (Vec<String>, Stats) {
    let mut all = Vec::new();
    let mut total = Stats::default();
    for seed in seeds {
        let mut cfg = SimConfig::random(seed, timing);
        cfg.workload = workload;
        let mut w = World::new(seed, cfg);
        w.run();
        all.extend(w.violations.iter().map(|v| format!("seed {seed}: {v}")));
        let s = &w.stats;
        total.landed += s.landed;
        total.conflicts += s.conflicts;
        total.fenced_writes += s.fenced_writes;
        total.committed_goods += s.committed_goods;
        total.fences += s.fences;
        total.unfences += s.unfences;
        total.checks += s.checks;
        total.restarts += s.restarts;
    }
    (all, total)
}
