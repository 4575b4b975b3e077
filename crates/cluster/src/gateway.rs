//! The sans-IO gateway protocol for ONE logical unit (scale-out.md §2.2–§2.5).
//!
//! One [`Gateway`] per (gateway process, LU); several LUs mean several instances fed by the
//! same watch. It performs no I/O and reads no clock.
//!
//! # Driving contract (the shape of quinn-proto's `Connection`)
//!
//! - Feed inputs: [`Gateway::prout`] for each PERSISTENT RESERVE OUT, [`Gateway::handle`] for
//!   everything the store or the host daemon reports, [`Gateway::handle_timeout`] when the
//!   instant of [`Gateway::poll_timeout`] is reached. Every input carries the gateway's local
//!   monotonic `now`.
//! - After each input, drain [`Gateway::poll_request`] (send to the store) and
//!   [`Gateway::poll_output`] (answer initiators, raise UAs, abort tasks, change the ALUA
//!   group), then re-arm the timer from [`Gateway::poll_timeout`].
//! - Before every backend submit call [`Gateway::may_submit`] (the self-fence check, §0.3b),
//!   and answer commands from [`Gateway::state`] (the local replica, applied in revision order).
//!
//! # Decisions that differ from the brief
//!
//! - A gateway applies records **only from the watch**, its own included: the transaction's
//!   answer just says at which revision to wait. Applying an own commit early would advance the
//!   watch position past events (member puts, acks) not yet seen.
//! - The outcome of a transaction is also decided by the watch: a record with my op id at `r`
//!   means committed, a foreign record above my compare revision means lost. So a lost answer
//!   needs no extra read; after [`GatewayConfig::rpc_timeout`] the same transaction (same op
//!   id, same compare revision) is sent again, which can commit at most once.
//! - The completion rule also waits for members deleted **before** `r` until Δ has passed
//!   since their DELETE: such a gateway's last writes may still be in flight for up to the
//!   in-flight budget, whether or not it was a member at `r`. The wait is measured as
//!   `Δ(1+ρ)` on the local clock so that a fast clock cannot shorten it.
//! - An own-lease loss ("lease not found" or the DELETE of our member key) fences for good:
//!   rejoining needs a new lease, member key and snapshot, i.e. a new [`Gateway`].

use crate::kv::{self, Change, Key, LeaseId, Value};
use crate::lease::Timing;
use crate::op::{Applied, Op, OpError, OpId, Record};
use crate::{GatewayId, Revision, Time};
use ironlun_scsi::pr::ownership::{OwnershipError, OwnershipOp, TaskPick};
use ironlun_scsi::pr::{ItNexus, OutRequest, PrContext, PrError, PrState, Registration};
use ironlun_scsi::sense::SenseReason;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

/// Identifies one PERSISTENT RESERVE OUT command to its answer.
pub type Token = u64;

/// Static configuration of a gateway.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// This gateway.
    pub id: GatewayId,
    /// The relative target port identifiers (TPGTs) this gateway serves.
    pub ports: Vec<u16>,
    /// Every gateway's ports: `PrContext::relative_ports` must be cluster-wide (§2.2).
    pub cluster_ports: Vec<u16>,
    /// The lease bound (§2.4).
    pub timing: Timing,
    /// How long a transaction may stay unanswered before it is sent again (§2.5: 0.8 s calls).
    pub rpc_timeout: Duration,
    /// Lost compare-and-swap races tolerated before answering BUSY (§2.2 step 2: 16).
    pub max_tries: u32,
}

/// How a PERSISTENT RESERVE OUT (or an ownership step) ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// GOOD status.
    Good,
    /// RESERVATION CONFLICT or CHECK CONDITION, as `PrState::prout` decided.
    Failed(PrError),
    /// The ownership step was refused, as `PrState::ownership` decided.
    Refused(OwnershipError),
    /// CHECK CONDITION, NOT READY, 04h/0Ah (asymmetric access state transition): the gateway
    /// is fenced; the initiator retries on another path. The op may or may not be committed.
    NotReady,
    /// BUSY status: too many lost races for the record.
    Busy,
}

impl Answer {
    /// The sense of [`Answer::NotReady`].
    pub const NOT_READY_SENSE: SenseReason = SenseReason::AluaTransitioning;
}

/// What [`Gateway::prout`] decided without the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Submit {
    /// Answer now (error, no change, or fenced).
    Immediate(Answer),
    /// A [`Output::Respond`] with this token will follow.
    Pending,
}

/// An input from the store or the host daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Watch events on the LU's and the members' keys, in revision order (duplicates of
    /// already seen revisions are ignored).
    Watch(Vec<kv::Event>),
    /// The answer to [`Request::Txn`] `attempt`.
    Txn {
        /// The attempt answered.
        attempt: u64,
        /// The store's answer.
        result: kv::TxnResult,
    },
    /// The answer to [`Request::KeepAlive`] sent at local `sent_at`: `ok` = TTL > 0.
    KeepAlive {
        /// Local instant the keepalive was sent.
        sent_at: Time,
        /// The lease was still alive.
        ok: bool,
    },
    /// The answer to [`Request::ReadHead`]: the store's head revision (linearizable read).
    Head(Revision),
    /// The host daemon: every local task aborted by revisions ≤ this one has finished its
    /// backend I/O.
    Drained(Revision),
}

/// Something to send to the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `If(mod(Pr) == expect, lease(Member(me)) == lease) Then(put Pr = record)` (§2.2 step 2).
    Txn {
        /// Matches the answer.
        attempt: u64,
        /// The compare revision `r0`.
        expect: Revision,
        /// This gateway's lease.
        lease: LeaseId,
        /// The new record.
        record: Box<Record>,
    },
    /// Put `applied/<me>` = revision under the lease.
    PutApplied(Revision),
    /// Put `drained/<me>` = revision under the lease.
    PutDrained(Revision),
    /// Refresh the lease; answer with [`Event::KeepAlive`] carrying `sent_at`.
    KeepAlive {
        /// Local send instant (the `s` of §2.4).
        sent_at: Time,
    },
    /// Read the head revision (rejoin after a fence, §2.5).
    ReadHead,
}

/// Something for the host daemon to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Complete PERSISTENT RESERVE OUT `token`; `revision` is its commit revision if it was
    /// committed.
    Respond {
        /// The command.
        token: Token,
        /// Its status.
        answer: Answer,
        /// Commit revision, for a GOOD that needed the store.
        revision: Option<Revision>,
    },
    /// The record at `revision` is the local replica now: install `state` in the LU before
    /// the [`Output::Ua`] and [`Output::AbortTasks`] of the same record, which follow it.
    State {
        /// The record's revision.
        revision: Revision,
        /// The PR state after it.
        state: PrState,
    },
    /// Queue `reason` for the I_T nexuses of `registration` on this gateway's ports (an
    /// ALL_TG_PT registration is raised by every gateway for its own ports), except the
    /// nexus that sent the PR OUT (SPC-4 §5.13.11: "other" I_T nexuses).
    Ua {
        /// The registration whose nexuses get the condition.
        registration: Registration,
        /// The additional sense.
        reason: SenseReason,
        /// The requesting I_T nexus, which gets no condition.
        except: Option<ItNexus>,
    },
    /// Abort the tasks these hosts' nexuses have here (an ownership step, §2.7: set_owner
    /// aborts every other host's, a handover commit the source's), then report
    /// [`Event::Drained`] for `revision` once their backend I/O has finished.
    AbortHost {
        /// Whose tasks.
        pick: TaskPick,
        /// The revision that aborted them.
        revision: Revision,
    },
    /// A handover fence (§2.7): report [`Event::Drained`] for `revision` once the tasks of
    /// `host` in the task set now have finished (they are not aborted).
    DrainHost {
        /// The fenced host.
        host: String,
        /// The fence's revision.
        revision: Revision,
    },
    /// Abort the local tasks of these registrations' nexuses (PREEMPT AND ABORT, §2.3), then
    /// report [`Event::Drained`] for `revision` once their backend I/O has finished.
    AbortTasks {
        /// Preempted registrations with nexuses on this gateway.
        registrations: Vec<Registration>,
        /// The revision that aborted them.
        revision: Revision,
        /// The I_T nexus that sent the PREEMPT AND ABORT (its own tasks keep their status;
        /// others' end without one when TAS=0, SAM-5 §5.6).
        from: Option<ItNexus>,
    },
    /// Deadline passed or lease lost: stop submitting, fail queued commands with 02/04/0A,
    /// set the port group to transitioning (§2.5).
    Fenced,
    /// Lease valid and replica caught up again: restore the port group.
    Unfenced,
    /// The lease is gone; this instance stays fenced (rejoin with a new instance).
    LeaseLost,
    /// Replaying the record at `revision` did not give its stored state; the stored state was
    /// installed. The daemon drops local sessions (hosts re-read PR, §2.2 apply step 1).
    Diverged {
        /// The record's revision.
        revision: Revision,
    },
}

#[derive(Debug, Clone, Default)]
struct Member {
    create: Revision,
    applied: Revision,
    drained: Revision,
    /// Local instant the DELETE of the member key was seen.
    gone_at: Option<Time>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Dry run and send the transaction.
    Ready,
    /// Transaction sent.
    Txn {
        attempt: u64,
        expect: Revision,
        sent_at: Time,
    },
    /// Lost the compare: wait until the replica reaches `until`.
    CatchUp { until: Revision },
    /// Committed at `revision`: the completion rule (§2.2 step 4).
    Wait { revision: Revision },
}

#[derive(Debug, Clone)]
struct Work {
    token: Option<Token>,
    op: Op,
    id: OpId,
    tries: u32,
    aborts: bool,
    record: Option<Record>,
    phase: Phase,
}

/// One gateway's protocol state for one LU. See the module documentation for the contract.
#[derive(Debug, Clone)]
pub struct Gateway {
    cfg: GatewayConfig,
    lease: LeaseId,
    state: PrState,
    /// Revision of the record `state` equals (0: none yet).
    pr_rev: Revision,
    /// Watch position: every event up to here has been applied.
    applied: Revision,
    acked_applied: Revision,
    acked_drained: Revision,
    members: BTreeMap<GatewayId, Member>,
    deadline: Time,
    next_keepalive: Time,
    fenced: bool,
    lease_lost: bool,
    /// After a fence: unfence once the replica reaches this head revision.
    rejoin: Option<Option<Revision>>,
    work: VecDeque<Work>,
    seq: u64,
    attempts: u64,
    pending_drains: BTreeSet<Revision>,
    /// Revisions whose op aborted tasks somewhere, not yet covered by `drained`.
    abort_revs: BTreeSet<Revision>,
    drained: Revision,
    gone_recorded: BTreeSet<GatewayId>,
    requests: VecDeque<Request>,
    outputs: VecDeque<Output>,
    /// The latest `now` of any input (time never runs backwards on one clock).
    last_now: Time,
    /// The revision that created our member key: member events before it are history.
    create_revision: Revision,
    /// No operation completes before this instant (a join from a snapshot, see
    /// [`Gateway::join`]).
    hold_until: Time,
}

impl Gateway {
    /// A gateway that joined with lease `lease`, granted by a request sent at local
    /// `granted_at`, and member key created at `create_revision`. It starts from the empty
    /// PR state at revision 0 and must be fed the watch from revision 1 (a later joiner would
    /// start from a snapshot; §2.5 "Join").
    pub fn new(
        cfg: GatewayConfig,
        lease: LeaseId,
        granted_at: Time,
        create_revision: Revision,
    ) -> Self {
        let deadline = cfg.timing.deadline(granted_at);
        let next_keepalive = granted_at.saturating_add(cfg.timing.settings().keepalive_interval);
        Self {
            cfg,
            lease,
            state: PrState::new(),
            pr_rev: 0,
            applied: 0,
            acked_applied: 0,
            acked_drained: 0,
            members: BTreeMap::new(),
            deadline,
            next_keepalive,
            fenced: false,
            lease_lost: false,
            rejoin: None,
            work: VecDeque::new(),
            seq: create_revision << 32,
            attempts: 0,
            pending_drains: BTreeSet::new(),
            abort_revs: BTreeSet::new(),
            drained: 0,
            gone_recorded: BTreeSet::new(),
            requests: VecDeque::new(),
            outputs: VecDeque::new(),
            last_now: granted_at,
            create_revision,
            hold_until: Time::default(),
        }
    }

    /// A gateway that joins from a snapshot of the store read at `revision` (scale-out.md
    /// §2.5 "Join"): `snapshot` holds every live key of the LU and of the members as a PUT at
    /// its mod revision. Feed it the watch from `revision + 1`. Its first output installs the
    /// record's state.
    ///
    /// For `Δ(1+ρ)` after `granted_at` it completes no operation and acknowledges nothing
    /// (no `applied`, no `drained`). A member deleted just before the snapshot, this
    /// gateway's own earlier incarnation included, may still have writes in flight for up to
    /// Δ after its DELETE, and a joined member with its id resets the others' wait for it.
    /// Withholding the acknowledgements makes every operation committed meanwhile wait at least
    /// that long anywhere. The simulation's restarts check this (`sim.rs`, I2).
    pub fn join(
        cfg: GatewayConfig,
        lease: LeaseId,
        granted_at: Time,
        create_revision: Revision,
        revision: Revision,
        snapshot: &[kv::Event],
    ) -> Self {
        let mut g = Self::new(cfg, lease, granted_at, create_revision);
        for ev in snapshot {
            let Change::Put {
                value,
                create_revision,
            } = &ev.change
            else {
                continue;
            };
            match (&ev.key, value) {
                (Key::Pr, Value::Record(rec)) => {
                    g.state = rec.state.clone();
                    g.pr_rev = ev.revision;
                    if let Op::GatewayGone { gateway } = rec.op {
                        g.gone_recorded.insert(gateway);
                    }
                }
                (Key::Member(id), _) => {
                    g.members.entry(*id).or_default().create = *create_revision;
                }
                (Key::Applied(id), Value::Revision(v)) => {
                    let m = g.members.entry(*id).or_default();
                    m.applied = m.applied.max(*v);
                }
                (Key::Drained(id), Value::Revision(v)) => {
                    let m = g.members.entry(*id).or_default();
                    m.drained = m.drained.max(*v);
                }
                _ => {}
            }
        }
        g.applied = revision;
        g.hold_until = granted_at.saturating_add(g.cfg.timing.local_lock_delay());
        g.outputs.push_back(Output::State {
            revision: g.pr_rev,
            state: g.state.clone(),
        });
        // No local task predates the join, so everything up to the record is drained here.
        // Both acknowledgements wait until `hold_until` (see `flush_acks`).
        g.drained = g.pr_rev;
        g
    }

    /// This gateway's id.
    pub fn id(&self) -> GatewayId {
        self.cfg.id
    }

    /// This gateway's lease.
    pub fn lease(&self) -> LeaseId {
        self.lease
    }

    /// The local replica of the PR state, equal to the record at [`Gateway::pr_revision`].
    pub fn state(&self) -> &PrState {
        &self.state
    }

    /// Revision of the last applied record.
    pub fn pr_revision(&self) -> Revision {
        self.pr_rev
    }

    /// The watch position: resume a broken watch from the revision after it.
    pub fn watch_revision(&self) -> Revision {
        self.applied
    }

    /// The local self-fencing deadline `D` (§2.4).
    pub fn deadline(&self) -> Time {
        self.deadline
    }

    /// Whether the gateway is fenced (deadline passed, lease lost, or catching up).
    pub fn is_fenced(&self) -> bool {
        self.fenced
    }

    /// The self-fence check before every backend submit (§0.3b): `now < D` and not fenced.
    pub fn may_submit(&self, now: Time) -> bool {
        !self.fenced && now < self.deadline
    }

    fn ctx(&self) -> PrContext<'_> {
        PrContext {
            relative_ports: &self.cfg.cluster_ports,
            ptpl_capable: true,
        }
    }

    fn serves(&self, r: &Registration) -> bool {
        r.rtpi.is_none_or(|p| self.cfg.ports.contains(&p))
    }

    /// A PERSISTENT RESERVE OUT from `it` (§2.2). Errors and no-op requests are answered from
    /// the local replica at once (linearizable: every op that completed anywhere has been
    /// applied here, by the completion rule); a change is committed through the store.
    pub fn prout(&mut self, now: Time, token: Token, it: &ItNexus, req: OutRequest<'_>) -> Submit {
        self.last_now = self.last_now.max(now);
        self.check_deadline(now);
        if self.fenced {
            return Submit::Immediate(Answer::NotReady);
        }
        self.submit_op(now, token, Op::prout(it, req))
    }

    /// A target-managed ownership or handover step (§2.7), decided as a PR OUT is: refusals
    /// and retries of the last decision from the local replica, changes through the store.
    /// `op`'s host names must be normalized (`OwnershipOp::normalized`).
    pub fn ownership(&mut self, now: Time, token: Token, op: OwnershipOp) -> Submit {
        self.last_now = self.last_now.max(now);
        self.check_deadline(now);
        if self.fenced {
            return Submit::Immediate(Answer::NotReady);
        }
        self.submit_op(now, token, Op::Ownership(op))
    }

    fn submit_op(&mut self, now: Time, token: Token, op: Op) -> Submit {
        if self.work.is_empty() {
            let mut next = self.state.clone();
            match op.apply(&mut next, self.ctx()) {
                Err(e) => return Submit::Immediate(answer(e)),
                Ok(fx) if no_change(&self.state, &next, &fx) => {
                    return Submit::Immediate(Answer::Good)
                }
                Ok(_) => {}
            }
        }
        self.enqueue(Some(token), op);
        self.step(now);
        Submit::Pending
    }

    /// Whether every gateway has drained what the revision `r` asked of it (a fence's tasks,
    /// an abort's), or is gone and Δ has passed: [`Output::DrainHost`]'s completion, waited
    /// for by a handover within its deadline.
    pub fn drained_everywhere(&self, now: Time, r: Revision) -> bool {
        self.complete(now, r, true)
    }

    fn enqueue(&mut self, token: Option<Token>, op: Op) {
        self.seq += 1;
        let id = OpId {
            gateway: self.cfg.id,
            seq: self.seq,
        };
        self.work.push_back(Work {
            token,
            op,
            id,
            tries: 0,
            aborts: false,
            record: None,
            phase: Phase::Ready,
        });
    }

    /// An input from the store or the host daemon.
    pub fn handle(&mut self, now: Time, event: Event) {
        self.last_now = self.last_now.max(now);
        match event {
            Event::Watch(events) => {
                for ev in &events {
                    self.apply_event(now, ev);
                }
            }
            Event::Txn { attempt, result } => self.txn_result(attempt, result),
            Event::KeepAlive { sent_at, ok } => {
                if !ok {
                    self.lose_lease();
                } else if !self.lease_lost {
                    self.deadline = self.deadline.max(self.cfg.timing.deadline(sent_at));
                    if self.fenced && self.rejoin.is_none() && now < self.deadline {
                        self.rejoin = Some(None);
                        self.requests.push_back(Request::ReadHead);
                    }
                }
            }
            Event::Head(head) => {
                if self.rejoin == Some(None) {
                    self.rejoin = Some(Some(head));
                }
            }
            Event::Drained(rev) => {
                while self.pending_drains.first().is_some_and(|r| *r <= rev) {
                    self.pending_drains.pop_first();
                }
                self.update_drained();
            }
        }
        self.flush_acks(now);
        self.check_deadline(now);
        self.try_unfence(now);
        self.step(now);
    }

    /// Acknowledge what is applied and drained, once per change and not before `hold_until`
    /// (once per watch batch: `handle` calls it after the whole batch).
    fn flush_acks(&mut self, now: Time) {
        if self.lease_lost || now < self.hold_until {
            return;
        }
        if self.pr_rev > self.acked_applied {
            self.acked_applied = self.pr_rev;
            self.requests.push_back(Request::PutApplied(self.pr_rev));
        }
        if self.drained > self.acked_drained {
            self.acked_drained = self.drained;
            self.requests.push_back(Request::PutDrained(self.drained));
        }
    }

    /// The instant [`Gateway::handle_timeout`] must be called at, if any.
    pub fn poll_timeout(&self) -> Option<Time> {
        if self.lease_lost {
            return None;
        }
        let mut t = self.next_keepalive;
        if !self.fenced {
            t = t.min(self.deadline);
        }
        if self.hold_until > self.last_now {
            t = t.min(self.hold_until);
        }
        if let Some(w) = self.work.front() {
            match w.phase {
                Phase::Txn { sent_at, .. } => {
                    t = t.min(sent_at.saturating_add(self.cfg.rpc_timeout))
                }
                Phase::Wait { .. } => {
                    let delta = self.cfg.timing.local_lock_delay();
                    let ends = self.members.values().filter_map(|m| m.gone_at);
                    for end in ends.map(|at| at.saturating_add(delta)) {
                        if end > self.last_now {
                            t = t.min(end);
                        }
                    }
                }
                _ => {}
            }
        }
        Some(t)
    }

    /// The timer fired: send due keepalives, fence at the deadline, resend an unanswered
    /// transaction, re-check the completion rule.
    pub fn handle_timeout(&mut self, now: Time) {
        self.last_now = self.last_now.max(now);
        if self.lease_lost {
            return;
        }
        if now >= self.next_keepalive {
            self.requests.push_back(Request::KeepAlive { sent_at: now });
            self.next_keepalive = now.saturating_add(self.cfg.timing.settings().keepalive_interval);
        }
        self.flush_acks(now);
        self.check_deadline(now);
        if let Some(w) = self.work.front() {
            if let Phase::Txn {
                expect, sent_at, ..
            } = w.phase
            {
                if now >= sent_at.saturating_add(self.cfg.rpc_timeout) {
                    if let Some(record) = w.record.clone() {
                        // The same record and compare revision: it can commit at most once.
                        self.push_txn(expect, record, now);
                    }
                }
            }
        }
        self.step(now);
    }

    /// The next request for the store.
    pub fn poll_request(&mut self) -> Option<Request> {
        self.requests.pop_front()
    }

    /// The next output for the host daemon.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    fn check_deadline(&mut self, now: Time) {
        if !self.fenced && now >= self.deadline {
            self.fence();
        }
    }

    fn fence(&mut self) {
        if !self.fenced {
            self.fenced = true;
            self.outputs.push_back(Output::Fenced);
        }
        self.rejoin = None;
        for w in std::mem::take(&mut self.work) {
            if let Some(token) = w.token {
                self.outputs.push_back(Output::Respond {
                    token,
                    answer: Answer::NotReady,
                    revision: None,
                });
            }
        }
    }

    fn lose_lease(&mut self) {
        if !self.lease_lost {
            self.lease_lost = true;
            self.fence();
            self.outputs.push_back(Output::LeaseLost);
        }
    }

    fn try_unfence(&mut self, now: Time) {
        if let Some(Some(head)) = self.rejoin {
            if self.applied >= head && now < self.deadline && !self.lease_lost {
                self.rejoin = None;
                self.fenced = false;
                self.outputs.push_back(Output::Unfenced);
            }
        }
    }

    fn apply_event(&mut self, now: Time, ev: &kv::Event) {
        if ev.revision <= self.applied {
            return;
        }
        self.applied = ev.revision;
        match (&ev.key, &ev.change) {
            (
                Key::Pr,
                Change::Put {
                    value: Value::Record(rec),
                    ..
                },
            ) => self.apply_record(ev.revision, rec),
            (
                Key::Member(g),
                Change::Put {
                    create_revision, ..
                },
            ) => {
                let m = self.members.entry(*g).or_default();
                m.create = *create_revision;
                m.gone_at = None;
            }
            // An earlier incarnation's key (replayed history from before this join) is not
            // ours: only a DELETE after our create revision means our lease is gone.
            (Key::Member(g), Change::Delete)
                if *g == self.cfg.id && ev.revision > self.create_revision =>
            {
                self.lose_lease()
            }
            (Key::Member(g), Change::Delete) if *g == self.cfg.id => {}
            (Key::Member(g), Change::Delete) => {
                self.members.entry(*g).or_default().gone_at = Some(now);
                let lowest = self
                    .members
                    .iter()
                    .find(|(_, m)| m.gone_at.is_none())
                    .map(|(id, _)| *id);
                // History replayed from before our join was someone else's to record.
                if lowest == Some(self.cfg.id)
                    && ev.revision > self.create_revision
                    && !self.gone_recorded.contains(g)
                    && !self.fenced
                {
                    self.enqueue(None, Op::GatewayGone { gateway: *g });
                }
            }
            (
                Key::Applied(g),
                Change::Put {
                    value: Value::Revision(v),
                    ..
                },
            ) => {
                let m = self.members.entry(*g).or_default();
                m.applied = m.applied.max(*v);
            }
            (
                Key::Drained(g),
                Change::Put {
                    value: Value::Revision(v),
                    ..
                },
            ) => {
                let m = self.members.entry(*g).or_default();
                m.drained = m.drained.max(*v);
            }
            _ => {}
        }
    }

    /// `apply(r)` (§2.2): replay, compare, raise local UAs, abort local tasks.
    fn apply_record(&mut self, r: Revision, rec: &Record) {
        let mut next = self.state.clone();
        let applied = rec.op.apply(&mut next, self.ctx());
        let Applied { fx, abort, drain } = match applied {
            Ok(a) if next == rec.state => a,
            _ => {
                self.outputs.push_back(Output::Diverged { revision: r });
                Applied::default()
            }
        };
        self.state = rec.state.clone();
        self.pr_rev = r;
        self.outputs.push_back(Output::State {
            revision: r,
            state: rec.state.clone(),
        });
        let requester = match &rec.op {
            Op::Prout { it, .. } => Some(it.clone()),
            Op::GatewayGone { gateway } => {
                self.gone_recorded.insert(*gateway);
                None
            }
            Op::Ownership(_) => None,
        };
        for (registration, reason) in fx.ua {
            if self.serves(&registration) {
                self.outputs.push_back(Output::Ua {
                    registration,
                    reason,
                    except: requester.clone(),
                });
            }
        }
        if !fx.aborted.is_empty() {
            self.abort_revs.insert(r);
            let local: Vec<Registration> = fx
                .aborted
                .into_iter()
                .filter(|reg| self.serves(reg))
                .collect();
            if !local.is_empty() {
                self.pending_drains.insert(r);
                self.outputs.push_back(Output::AbortTasks {
                    registrations: local,
                    revision: r,
                    from: requester,
                });
            }
            self.update_drained();
        }
        // Ownership steps name hosts, which may have nexuses on any gateway: every gateway
        // looks for their tasks.
        if abort.is_some() || drain.is_some() {
            self.abort_revs.insert(r);
            self.pending_drains.insert(r);
            if let Some(pick) = abort {
                self.outputs
                    .push_back(Output::AbortHost { pick, revision: r });
            } else if let Some(host) = drain {
                self.outputs
                    .push_back(Output::DrainHost { host, revision: r });
            }
            self.update_drained();
        }
        if let Some(w) = self.work.front_mut() {
            if let Phase::Txn { expect, .. } = w.phase {
                if rec.id == w.id {
                    w.phase = Phase::Wait { revision: r };
                } else if r > expect {
                    w.phase = Phase::Ready;
                }
            }
        }
    }

    fn update_drained(&mut self) {
        // The highest aborting revision below the first one still draining.
        let limit = self
            .pending_drains
            .first()
            .map_or(Revision::MAX, |f| f.saturating_sub(1));
        let claim = self
            .abort_revs
            .range(..=limit)
            .next_back()
            .copied()
            .unwrap_or(0);
        if claim > self.drained {
            self.abort_revs = self.abort_revs.split_off(&claim.saturating_add(1));
            self.drained = claim;
        }
    }

    fn txn_result(&mut self, attempt: u64, result: kv::TxnResult) {
        let Some(w) = self.work.front_mut() else {
            return;
        };
        let Phase::Txn {
            attempt: current, ..
        } = w.phase
        else {
            return;
        };
        if attempt != current {
            return;
        }
        match result {
            kv::TxnResult::Committed(revision) => w.phase = Phase::Wait { revision },
            kv::TxnResult::Failed {
                member_alive: false,
                ..
            } => self.lose_lease(),
            kv::TxnResult::Failed { current, .. } => w.phase = Phase::CatchUp { until: current },
        }
    }

    /// Advances the front operation as far as possible.
    fn step(&mut self, now: Time) {
        while let Some(w) = self.work.front() {
            if self.fenced {
                self.fence();
                return;
            }
            match w.phase {
                Phase::Ready => self.send_txn(now),
                Phase::CatchUp { until } => {
                    if self.pr_rev < until {
                        return;
                    }
                    if let Some(w) = self.work.front_mut() {
                        w.phase = Phase::Ready;
                    }
                }
                Phase::Txn { .. } => return,
                Phase::Wait { revision } => {
                    if !self.complete(now, revision, w.aborts) {
                        return;
                    }
                    if let Some(w) = self.work.pop_front() {
                        if let Some(token) = w.token {
                            self.outputs.push_back(Output::Respond {
                                token,
                                answer: Answer::Good,
                                revision: Some(revision),
                            });
                        }
                    }
                }
            }
        }
    }

    fn finish(&mut self, answer: Answer) {
        if let Some(w) = self.work.pop_front() {
            if let Some(token) = w.token {
                self.outputs.push_back(Output::Respond {
                    token,
                    answer,
                    revision: None,
                });
            }
        }
    }

    /// §2.2 steps 1–2 for the front operation.
    fn send_txn(&mut self, now: Time) {
        let Some(w) = self.work.front() else { return };
        let internal = w.token.is_none();
        if let Op::GatewayGone { gateway } = w.op {
            if self.gone_recorded.contains(&gateway) {
                self.finish(Answer::Good);
                return;
            }
        }
        if w.tries >= self.cfg.max_tries {
            self.finish(Answer::Busy);
            return;
        }
        let mut next = self.state.clone();
        let fx = match w.op.apply(&mut next, self.ctx()) {
            Err(e) => return self.finish(answer(e)),
            Ok(fx) => fx,
        };
        if !internal && no_change(&self.state, &next, &fx) {
            return self.finish(Answer::Good);
        }
        let expect = self.pr_rev;
        if let Some(w) = self.work.front_mut() {
            let record = Record {
                state: next,
                op: w.op.clone(),
                id: w.id,
            };
            w.tries += 1;
            w.aborts = fx.aborts();
            w.record = Some(record.clone());
            self.push_txn(expect, record, now);
        }
    }

    /// Send (or send again) the front operation's transaction as a new attempt, comparing
    /// against `expect`.
    fn push_txn(&mut self, expect: Revision, record: Record, now: Time) {
        self.attempts += 1;
        let attempt = self.attempts;
        if let Some(w) = self.work.front_mut() {
            w.phase = Phase::Txn {
                attempt,
                expect,
                sent_at: now,
            };
        }
        self.requests.push_back(Request::Txn {
            attempt,
            expect,
            lease: self.lease,
            record: Box::new(record),
        });
    }

    /// The completion rule (§2.2 step 4) for an op committed at `r`.
    fn complete(&self, now: Time, r: Revision, aborts: bool) -> bool {
        if self.pr_rev < r || (aborts && self.drained < r) || now < self.hold_until {
            return false;
        }
        let delta = self.cfg.timing.local_lock_delay();
        self.members
            .iter()
            .filter(|(id, m)| **id != self.cfg.id && m.create < r)
            .all(|(_, m)| {
                let acked = m.applied >= r && (!aborts || m.drained >= r);
                let gone = m.gone_at.is_some_and(|at| now >= at.saturating_add(delta));
                acked || gone
            })
    }
}

/// Whether a dry run changed nothing that anyone else must see (§2.2 step 1 "no change").
/// A repeated fence changes nothing: its drain was asked for when it was recorded.
fn no_change(before: &PrState, after: &PrState, a: &Applied) -> bool {
    before == after && a.fx.ua.is_empty() && a.fx.aborted.is_empty() && a.abort.is_none()
}

/// The answer to an operation that failed.
fn answer(e: OpError) -> Answer {
    match e {
        OpError::Pr(e) => Answer::Failed(e),
        OpError::Ownership(e) => Answer::Refused(e),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::lease::LeaseSettings;
    use crate::op::param_list;
    use ironlun_scsi::pr::{sa, InitiatorPort};

    fn it(name: &str, rtpi: u16) -> ItNexus {
        ItNexus {
            initiator: InitiatorPort::new(name, [0x80, 0, 0, 0, 0, 1]),
            rtpi,
        }
    }

    fn cfg() -> GatewayConfig {
        GatewayConfig {
            id: GatewayId(1),
            ports: vec![1],
            cluster_ports: vec![1, 2],
            timing: Timing::new(LeaseSettings::default()).unwrap(),
            rpc_timeout: Duration::from_millis(800),
            max_tries: 16,
        }
    }

    fn put(revision: Revision, key: Key, value: Value, create_revision: Revision) -> kv::Event {
        kv::Event {
            revision,
            key,
            change: Change::Put {
                value,
                create_revision,
            },
        }
    }

    /// A gateway joining from a snapshot installs the record's state first, acknowledges it,
    /// treats older member events as history, and completes nothing for Δ(1+ρ).
    #[test]
    fn join_from_a_snapshot() {
        let h1 = it("iqn.h1", 2);
        let op = Op::prout(
            &h1,
            OutRequest {
                service_action: sa::REGISTER,
                scope: 0,
                ty: 0,
                param: &param_list(0, 7, 0),
            },
        );
        let mut state = PrState::new();
        let ctx = PrContext {
            relative_ports: &[1, 2],
            ptpl_capable: true,
        };
        op.apply(&mut state, ctx).unwrap();
        let id = OpId {
            gateway: GatewayId(2),
            seq: 1,
        };
        let record = Record {
            state: state.clone(),
            op,
            id,
        };
        let snapshot = [
            put(3, Key::Member(GatewayId(2)), Value::Member, 3),
            put(5, Key::Pr, Value::Record(Box::new(record)), 4),
            put(5, Key::Applied(GatewayId(2)), Value::Revision(5), 4),
            put(6, Key::Member(GatewayId(1)), Value::Member, 6),
        ];
        let t0 = Time::from_micros(1_000_000);
        let mut g = Gateway::join(cfg(), 9, t0, 6, 7, &snapshot);
        assert_eq!(
            g.poll_output(),
            Some(Output::State {
                revision: 5,
                state: state.clone()
            })
        );
        // Nothing is acknowledged before Δ(1+ρ) has passed since the grant.
        assert_eq!(g.poll_request(), None);
        assert_eq!((g.pr_revision(), g.watch_revision()), (5, 7));

        // An earlier incarnation's member key deleted at revision 2 is history.
        g.handle(
            t0,
            Event::Watch(vec![kv::Event {
                revision: 2,
                key: Key::Member(GatewayId(1)),
                change: Change::Delete,
            }]),
        );
        assert!(!g.is_fenced());

        // A change commits, is applied and acknowledged by gateway 2, yet is answered only
        // once Δ(1+ρ) has passed since the join.
        let h2 = it("iqn.h2", 1);
        let req = OutRequest {
            service_action: sa::REGISTER,
            scope: 0,
            ty: 0,
            param: &param_list(0, 8, 0),
        };
        assert_eq!(g.prout(t0, 1, &h2, req), Submit::Pending);
        let Some(Request::Txn {
            attempt,
            expect: 5,
            record,
            ..
        }) = g.poll_request()
        else {
            panic!("no transaction");
        };
        g.handle(
            t0,
            Event::Txn {
                attempt,
                result: kv::TxnResult::Committed(8),
            },
        );
        g.handle(
            t0,
            Event::Watch(vec![
                put(8, Key::Pr, Value::Record(record), 4),
                put(9, Key::Applied(GatewayId(2)), Value::Revision(8), 4),
            ]),
        );
        let answered = |g: &mut Gateway| {
            std::iter::from_fn(|| g.poll_output()).any(|o| {
                matches!(
                    o,
                    Output::Respond {
                        token: 1,
                        answer: Answer::Good,
                        ..
                    }
                )
            })
        };
        assert!(!answered(&mut g), "answered before Δ(1+ρ) after the join");
        let acks = |g: &mut Gateway| {
            std::iter::from_fn(|| g.poll_request())
                .filter(|r| matches!(r, Request::PutApplied(_) | Request::PutDrained(_)))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            acks(&mut g),
            vec![],
            "acknowledged before Δ(1+ρ) after the join"
        );
        let hold = cfg().timing.local_lock_delay();
        let at = g.poll_timeout().unwrap();
        assert!(at <= t0.saturating_add(hold), "no timer for the hold");
        g.handle_timeout(t0.saturating_add(hold));
        assert!(answered(&mut g));
        assert_eq!(
            acks(&mut g),
            vec![Request::PutApplied(8), Request::PutDrained(5)]
        );
    }

    /// Commit `op` through the store at `r` (gateway 2, a member since revision 2, applies it
    /// at `r + 1`) and return what the gateway output on the way.
    fn commit_op(
        g: &mut Gateway,
        now: Time,
        token: Token,
        op: OwnershipOp,
        r: Revision,
    ) -> Vec<Output> {
        assert_eq!(g.ownership(now, token, op), Submit::Pending);
        let Some(Request::Txn {
            attempt, record, ..
        }) = std::iter::from_fn(|| g.poll_request()).find(|q| matches!(q, Request::Txn { .. }))
        else {
            panic!("no transaction");
        };
        g.handle(
            now,
            Event::Txn {
                attempt,
                result: kv::TxnResult::Committed(r),
            },
        );
        g.handle(
            now,
            Event::Watch(vec![put(r, Key::Pr, Value::Record(record), 4)]),
        );
        std::iter::from_fn(|| g.poll_output()).collect()
    }

    fn good(outs: &[Output], token: Token) -> bool {
        outs.iter().any(
            |o| matches!(o, Output::Respond { token: t, answer: Answer::Good, .. } if *t == token),
        )
    }

    /// Ownership steps through the store (scale-out.md §2.7): a fence is in the state every
    /// gateway installs and asks each to drain the source's tasks, answered once applied
    /// everywhere; its drain completes separately (`drained_everywhere`); the commit aborts the
    /// source's tasks on every gateway and is answered only once every gateway drained them.
    /// Refusals and retries are answered from the replica.
    #[test]
    fn ownership_steps_fence_drain_and_commit_across_gateways() {
        let t0 = Time::from_micros(1_000_000);
        let mut g = Gateway::new(cfg(), 9, t0, 1);
        g.handle(
            t0,
            Event::Watch(vec![
                put(1, Key::Member(GatewayId(1)), Value::Member, 1),
                put(2, Key::Member(GatewayId(2)), Value::Member, 2),
            ]),
        );
        let (s, d) = ("iqn.h:src".to_string(), "iqn.h:dst".to_string());
        let mut r = 10;
        let mut step = |g: &mut Gateway, token, op, acks: &[(Key, Revision)]| {
            let outs = commit_op(g, t0, token, op, r);
            let at = r;
            let events = acks
                .iter()
                .enumerate()
                .map(|(i, (k, _))| put(at + 1 + i as u64, *k, Value::Revision(at), 4))
                .collect();
            r += 10;
            (outs, at, events)
        };
        let (outs, _, acks) = step(
            &mut g,
            1,
            OwnershipOp::SetOwner {
                host: s.clone(),
                epoch: 1,
            },
            &[
                (Key::Applied(GatewayId(2)), 0),
                (Key::Drained(GatewayId(2)), 0),
            ],
        );
        assert!(
            outs.iter().any(
                |o| matches!(o, Output::AbortHost { pick: TaskPick::AllBut(h), .. } if *h == s)
            ),
            "{outs:?}"
        );
        assert!(
            !good(&outs, 1),
            "set_owner answered before the acknowledgements"
        );
        g.handle(t0, Event::Drained(10));
        g.handle(t0, Event::Watch(acks));
        assert!(good(
            &std::iter::from_fn(|| g.poll_output()).collect::<Vec<_>>(),
            1
        ));
        assert_eq!(g.state().owner(), Some("iqn.h:src"));

        // Refused and repeated steps are answered at once from the replica.
        assert!(matches!(
            g.ownership(
                t0,
                2,
                OwnershipOp::Commit {
                    from: s.clone(),
                    to: d.clone(),
                    epoch: 2
                }
            ),
            Submit::Immediate(Answer::Refused(OwnershipError::NotFenced(_)))
        ));
        assert_eq!(
            g.ownership(
                t0,
                3,
                OwnershipOp::SetOwner {
                    host: s.clone(),
                    epoch: 1
                }
            ),
            Submit::Immediate(Answer::Good)
        );

        let prepare = OwnershipOp::Prepare {
            from: s.clone(),
            to: d.clone(),
            epoch: 2,
        };
        let (outs, _, acks) = step(&mut g, 4, prepare, &[(Key::Applied(GatewayId(2)), 0)]);
        assert!(!good(&outs, 4));
        g.handle(t0, Event::Watch(acks));
        assert!(good(
            &std::iter::from_fn(|| g.poll_output()).collect::<Vec<_>>(),
            4
        ));

        // The fence: the state every gateway installs holds it; answered once applied.
        let fence = OwnershipOp::Fence {
            from: s.clone(),
            epoch: 2,
        };
        let (outs, rf, acks) = step(&mut g, 5, fence.clone(), &[(Key::Applied(GatewayId(2)), 0)]);
        assert!(outs.iter().any(|o| matches!(o,
            Output::State { state, .. } if state.handover().fenced() == Some("iqn.h:src"))));
        assert!(outs.iter().any(
            |o| matches!(o, Output::DrainHost { host, revision } if *host == s && *revision == rf)
        ));
        g.handle(t0, Event::Watch(acks));
        assert!(good(
            &std::iter::from_fn(|| g.poll_output()).collect::<Vec<_>>(),
            5
        ));
        // Its drain: this gateway's, then gateway 2's.
        assert!(!g.drained_everywhere(t0, rf));
        g.handle(t0, Event::Drained(rf));
        assert!(!g.drained_everywhere(t0, rf), "gateway 2 has not drained");
        g.handle(
            t0,
            Event::Watch(vec![put(
                rf + 5,
                Key::Drained(GatewayId(2)),
                Value::Revision(rf),
                4,
            )]),
        );
        assert!(g.drained_everywhere(t0, rf));
        // A repeated fence changes nothing.
        assert_eq!(g.ownership(t0, 6, fence), Submit::Immediate(Answer::Good));

        // The commit aborts the source's tasks everywhere; answered once all drained.
        let commit = OwnershipOp::Commit {
            from: s.clone(),
            to: d.clone(),
            epoch: 2,
        };
        let (outs, rc, _) = step(&mut g, 7, commit, &[]);
        assert!(
            outs.iter().any(|o| matches!(o,
            Output::AbortHost { pick: TaskPick::Host(h), revision } if *h == s && *revision == rc))
        );
        assert!(outs.iter().any(|o| matches!(o,
            Output::Ua { registration, reason: SenseReason::RegistrationsPreempted, except: None }
                if registration.name == "iqn.h:src")));
        g.handle(t0, Event::Drained(rc));
        g.handle(
            t0,
            Event::Watch(vec![put(
                rc + 1,
                Key::Applied(GatewayId(2)),
                Value::Revision(rc),
                4,
            )]),
        );
        assert!(
            !good(
                &std::iter::from_fn(|| g.poll_output()).collect::<Vec<_>>(),
                7
            ),
            "commit answered before gateway 2 drained the source's tasks"
        );
        g.handle(
            t0,
            Event::Watch(vec![put(
                rc + 2,
                Key::Drained(GatewayId(2)),
                Value::Revision(rc),
                4,
            )]),
        );
        assert!(good(
            &std::iter::from_fn(|| g.poll_output()).collect::<Vec<_>>(),
            7
        ));
        assert_eq!(
            (g.state().owner(), g.state().epoch()),
            (Some("iqn.h:dst"), 2)
        );
        assert_eq!(
            *g.state().handover(),
            ironlun_scsi::pr::ownership::Handover::Idle
        );
    }
}
