//! One handover of a logical unit L from source host S to destination host D (issue 6;
//! semantics.md §3.3), as a sans-IO state machine.
//!
//! # Driving contract
//!
//! Build a [`Handover`] from a [`Plan`] ([`Handover::new`], or [`Handover::recover`] after a
//! [`crate::journal::replay`]), call [`Handover::start`], then loop:
//!
//! 1. take every [`Action`] from [`Handover::poll_action`] and execute them **in order**: a
//!    [`Action::WriteJournal`] record is appended durably before the next action runs (this makes
//!    the commit's `started` record the write-ahead ownership decision of §3.3 step 3); a
//!    [`Action::Cancel`] stops the hook or call of that step, whose result is then never reported;
//! 2. report the end of the hook or admin call with [`Handover::on_result`] (or, for the state
//!    query, [`Handover::on_query`]);
//! 3. when [`Handover::poll_timeout`]'s instant passes, call [`Handover::on_timeout`].
//!
//! At most one hook or admin call is outstanding at a time. The machine is finished when
//! [`Handover::outcome`] is `Some`.
//!
//! # Failure rules (semantics.md §3.4)
//!
//! - Any failure before the commit: abort on the target, then the rollback hook (resume S).
//! - Commit refused: abort, which the target answers [`Failure::Committed`] if the epoch was
//!   committed after all (then the handover goes on), else rollback.
//! - Commit outcome unknown (timeout, lost connection): never retried blindly; the target's state
//!   is queried first. Owner D at the epoch: go on. Owner S before the epoch: retry the commit
//!   with the same epoch (idempotent on the target) up to [`Plan::max_attempts`], then abort.
//!   Anything else (a newer epoch, another owner): [`Outcome::Stuck`], since another authority
//!   acted (§3.2 guarantee 6).
//! - Destination fails after the commit (resume hook failed): hand the LU back to S with a reverse
//!   commit at epoch + 1, then rollback. An unknown hand-back outcome is queried like a commit.
//! - Announce failing leaves the guest running on D: [`Outcome::Migrated`] with the reason.
//!
//! Hooks must be idempotent: a resumed coordinator re-runs the hook it was killed in.
//!
//! # Target contract assumed
//!
//! Epochs per LU: `commit(E)` is idempotent once applied and refused when stale; `abort(E)` is
//! refused with "committed" once `E` is committed and makes every later `commit(E)` fail, so a
//! confirmed abort rules out a late commit.

use crate::journal::{Record, Recovery, ResumeAt};
use crate::{Phase, Step, Time};
use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::time::Duration;

/// The hook commands (run by the driver, e.g. through `sh -c`). `None` makes the step a no-op
/// that succeeds at once (e.g. no `precopy` when the hypervisor drives pre-copy by itself and the
/// `pause` hook waits for it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hooks {
    pub precopy: Option<String>,
    pub pause: Option<String>,
    pub resume: Option<String>,
    pub rollback: Option<String>,
    pub announce: Option<String>,
}

impl Hooks {
    fn command(&self, step: Step) -> Option<&str> {
        match step {
            Step::PreCopy => self.precopy.as_deref(),
            Step::Pause => self.pause.as_deref(),
            Step::Resume => self.resume.as_deref(),
            Step::Rollback => self.rollback.as_deref(),
            Step::Announce => self.announce.as_deref(),
            _ => None,
        }
    }
}

/// Per-step deadlines; a step still running at its deadline is cancelled and counts as failed
/// with an unknown outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deadlines {
    pub prepare: Duration,
    pub precopy: Duration,
    pub pause: Duration,
    pub commit: Duration,
    pub query: Duration,
    pub abort: Duration,
    pub rollback: Duration,
    pub resume: Duration,
    pub announce: Duration,
    pub handback: Duration,
}

impl Default for Deadlines {
    fn default() -> Self {
        Self {
            prepare: Duration::from_secs(10),
            precopy: Duration::from_secs(3600),
            pause: Duration::from_secs(60),
            commit: Duration::from_secs(30),
            query: Duration::from_secs(5),
            abort: Duration::from_secs(10),
            rollback: Duration::from_secs(60),
            resume: Duration::from_secs(30),
            announce: Duration::from_secs(10),
            handback: Duration::from_secs(30),
        }
    }
}

impl Deadlines {
    /// The deadline of `step` (the whole handover has none).
    pub fn of(&self, step: Step) -> Duration {
        match step {
            Step::Prepare => self.prepare,
            Step::PreCopy => self.precopy,
            Step::Pause => self.pause,
            Step::Commit => self.commit,
            Step::Query => self.query,
            Step::Abort => self.abort,
            Step::Rollback => self.rollback,
            Step::Resume => self.resume,
            Step::Announce => self.announce,
            Step::HandBack => self.handback,
            Step::Handover => Duration::MAX,
        }
    }
}

/// What one handover does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The ownership epoch this handover commits: the LU's current epoch + 1 (the hand-back
    /// uses `epoch + 1`). At least 1 and below `u64::MAX`.
    pub epoch: u64,
    pub hooks: Hooks,
    pub deadlines: Deadlines,
    /// How often a commit, query, abort, resume, rollback or hand-back is tried in all (≥ 1).
    pub max_attempts: u32,
}

impl Plan {
    /// A plan with default deadlines and 3 attempts.
    pub fn new(epoch: u64, hooks: Hooks) -> Self {
        Self {
            epoch,
            hooks,
            deadlines: Deadlines::default(),
            max_attempts: 3,
        }
    }
}

/// Why a [`Plan`] or a [`Recovery`] cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("epoch {0} out of range (1..u64::MAX)")]
    Epoch(u64),
    #[error("max_attempts must be at least 1")]
    Attempts,
    /// Pausing the source without a way to resume it could leave the guest stopped everywhere.
    #[error("a pause hook needs a rollback hook")]
    RollbackRequired,
    #[error("journal epoch {journal} differs from the plan's {plan}")]
    EpochMismatch { journal: u64, plan: u64 },
}

/// An admin API call on the daemon serving L (issue 6 "target-side handover").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminCall {
    /// D is logged in to L; nothing else changes.
    Prepare { epoch: u64 },
    /// Fence S, drain or abort its commands, flush, make D the owner at `epoch`.
    Commit { epoch: u64 },
    /// Before the commit: drop the prepared epoch, leaving S the only writer.
    Abort { epoch: u64 },
    /// Report L's epoch and owner ([`Handover::on_query`]).
    QueryState,
    /// The reverse commit: fence D, make S the owner at `epoch` (the handover's epoch + 1).
    HandBack { epoch: u64 },
}

/// An output for the driver to execute, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Append this record durably before executing the next action.
    WriteJournal(Record),
    /// Run a hook; report its end with [`Handover::on_result`]`(step, …)`.
    RunHook {
        step: Step,
        name: &'static str,
        cmd: String,
    },
    /// Call the admin API; report with [`Handover::on_result`]`(step, …)`, or
    /// [`Handover::on_query`] for [`AdminCall::QueryState`].
    Admin { step: Step, call: AdminCall },
    /// The step missed its deadline: stop it; its result is not reported.
    Cancel { step: Step },
}

/// How a hook or admin call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// It definitely had no effect (hook exit status ≠ 0, admin API refusal).
    Failed(String),
    /// Its effect is unknown (timeout, lost connection, server error).
    Unknown(String),
    /// Admin API: refused because the epoch is already committed.
    Committed,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Failed(r) => write!(f, "failed: {r}"),
            Failure::Unknown(r) => write!(f, "outcome unknown: {r}"),
            Failure::Committed => f.write_str("epoch already committed"),
        }
    }
}

/// The LU's owner as the admin API reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    Source,
    Destination,
    /// No owner, or a host other than S and D.
    Neither,
}

/// The answer of [`AdminCall::QueryState`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TargetView {
    /// The LU's last committed epoch.
    pub epoch: u64,
    pub owner: Owner,
}

/// How a handover ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// D owns L and runs the guest. `announce_failed` holds the announce hook's failure.
    Migrated { announce_failed: Option<String> },
    /// S owns L and runs the guest again (the rollback hook succeeded).
    RolledBack {
        /// The step whose failure caused the rollback ([`Step::Handover`] after a restart).
        cause: Step,
        reason: String,
        /// Whether D had been made owner and the LU was handed back.
        handed_back: bool,
        /// Whether the target confirmed the abort (false only when no commit was ever sent).
        abort_confirmed: bool,
    },
    /// The coordinator cannot decide safely (target unreachable, another authority acted, or the
    /// rollback hook keeps failing); the journal stays open, so [`crate::journal::replay`] resumes it.
    /// The target still guarantees a single writer.
    Stuck { reason: String },
}

/// One attempt of one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub step: Step,
    pub start: Time,
    /// `None` while running.
    pub end: Option<Time>,
    pub phase: Phase,
}

/// Start and end of every step attempt, for the report `ironlun migrate` prints.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Timeline {
    spans: Vec<Span>,
    commit_confirmed: Option<Time>,
    handback_confirmed: Option<Time>,
}

impl Timeline {
    /// Every attempt, in start order.
    pub fn spans(&self) -> &[Span] {
        &self.spans
    }

    /// The guest's blackout: from the start of the pause to the end of the resume on D, or of
    /// the rollback on S, whichever succeeded last. With QEMU's `pause-before-switchover` the
    /// `precopy` hook returns at the `pre-switchover` state, so pre-copy is not counted.
    pub fn blackout(&self) -> Option<Duration> {
        let paused = self.spans.iter().find(|s| s.step == Step::Pause)?.start;
        let resumed = self
            .spans
            .iter()
            .rev()
            .find(|s| matches!(s.step, Step::Resume | Step::Rollback) && s.phase == Phase::Done)?
            .end?;
        Some(resumed.saturating_duration_since(paused))
    }

    /// The storage switch time: from the start of the first commit attempt to the instant the
    /// commit was known done.
    pub fn storage_switch(&self) -> Option<Duration> {
        let start = self.spans.iter().find(|s| s.step == Step::Commit)?.start;
        Some(self.commit_confirmed?.saturating_duration_since(start))
    }

    /// The hand-back time, likewise.
    pub fn handback(&self) -> Option<Duration> {
        let start = self.spans.iter().find(|s| s.step == Step::HandBack)?.start;
        Some(self.handback_confirmed?.saturating_duration_since(start))
    }

    fn begin(&mut self, step: Step, now: Time) {
        self.spans.push(Span {
            step,
            start: now,
            end: None,
            phase: Phase::Started,
        });
    }

    fn end(&mut self, step: Step, phase: Phase, now: Time) {
        if let Some(s) = self
            .spans
            .iter_mut()
            .rev()
            .find(|s| s.step == step && s.end.is_none())
        {
            s.end = Some(now);
            s.phase = phase;
        }
    }
}

impl fmt::Display for Timeline {
    /// One line per attempt, offsets from the first start, then blackout and switch time.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let origin = self.spans.first().map(|s| s.start).unwrap_or_default();
        for s in &self.spans {
            let at = s.start.saturating_duration_since(origin);
            let took = s
                .end
                .map(|e| format!("{:.3} ms", ms(e.saturating_duration_since(s.start))))
                .unwrap_or_else(|| "running".to_owned());
            writeln!(
                f,
                "{:>12.3} ms  {:<9} {:<7} {took}",
                ms(at),
                s.step.name(),
                s.phase.name()
            )?;
        }
        if let Some(b) = self.blackout() {
            writeln!(f, "blackout (pause -> resume): {:.3} ms", ms(b))?;
        }
        if let Some(c) = self.storage_switch() {
            writeln!(f, "storage switch (commit): {:.3} ms", ms(c))?;
        }
        Ok(())
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Which ownership change an unknown outcome concerns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    Commit,
    HandBack,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Not started; `start` enters at this point.
    Ready(ResumeAt),
    /// Waiting for the result of `step`.
    Awaiting {
        step: Step,
        deadline: Time,
    },
    /// Between a result and the next step (transient).
    Idle,
    Finished(Outcome),
}

/// The state machine of one handover. See the module documentation for the driving contract.
#[derive(Debug, Clone)]
pub struct Handover {
    plan: Plan,
    state: State,
    actions: VecDeque<Action>,
    timeline: Timeline,
    /// The latest `now` seen; earlier inputs are clamped to it so the timeline is monotonic.
    clock: Time,
    attempts: BTreeMap<Step, u32>,
    /// Whether the last commit failure left its outcome unknown (only then is a retry useful).
    commit_unknown: bool,
    pending: Pending,
    commit_sent: bool,
    handback_sent: bool,
    abort_confirmed: bool,
    cause: Option<(Step, String)>,
}

impl Handover {
    /// A handover that starts with the prepare step.
    pub fn new(plan: Plan) -> Result<Self, PlanError> {
        if plan.epoch == 0 || plan.epoch == u64::MAX {
            return Err(PlanError::Epoch(plan.epoch));
        }
        if plan.max_attempts == 0 {
            return Err(PlanError::Attempts);
        }
        if plan.hooks.pause.is_some() && plan.hooks.rollback.is_none() {
            return Err(PlanError::RollbackRequired);
        }
        Ok(Self {
            plan,
            state: State::Ready(ResumeAt::Fresh),
            actions: VecDeque::new(),
            timeline: Timeline::default(),
            clock: Time::default(),
            attempts: BTreeMap::new(),
            commit_unknown: false,
            pending: Pending::Commit,
            commit_sent: false,
            handback_sent: false,
            abort_confirmed: false,
            cause: None,
        })
    }

    /// A handover that continues where a killed coordinator's journal ends
    /// ([`crate::journal::replay`]); it appends to the same journal.
    pub fn recover(plan: Plan, recovery: &Recovery) -> Result<Self, PlanError> {
        if let Some(journal) = recovery.epoch {
            if journal != plan.epoch {
                return Err(PlanError::EpochMismatch {
                    journal,
                    plan: plan.epoch,
                });
            }
        }
        let mut h = Self::new(plan)?;
        h.state = State::Ready(recovery.resume_at);
        h.commit_sent = recovery.commit_started;
        h.handback_sent = recovery.handback_started;
        // Never commit after an abort was sent (§3.2 guarantee 6).
        h.commit_unknown = !recovery.abort_started;
        if recovery.commit_started {
            h.attempts.insert(Step::Commit, 1);
        }
        if recovery.handback_started {
            h.attempts.insert(Step::HandBack, 1);
        }
        h.abort_confirmed = recovery.resume_at == ResumeAt::Rollback;
        if recovery.resume_at != ResumeAt::Fresh {
            h.cause = Some((Step::Handover, "coordinator restarted".to_owned()));
        }
        Ok(h)
    }

    /// Begins (or, after [`Handover::recover`], resumes) the handover. Later calls do nothing.
    pub fn start(&mut self, now: Time) {
        let now = self.tick(now);
        let State::Ready(at) = self.state else {
            return;
        };
        self.state = State::Idle;
        match at {
            ResumeAt::Fresh => self.launch(Step::Prepare, now),
            ResumeAt::AbortThenRollback => self.launch(Step::Abort, now),
            ResumeAt::QueryCommit => self.query(Pending::Commit, now),
            ResumeAt::Resume => self.launch(Step::Resume, now),
            ResumeAt::Announce => self.launch(Step::Announce, now),
            ResumeAt::QueryHandBack => self.query(Pending::HandBack, now),
            ResumeAt::Rollback => self.launch(Step::Rollback, now),
            ResumeAt::Finished { migrated } => {
                // The journal is closed already: finish without writing to it.
                self.state = State::Finished(if migrated {
                    Outcome::Migrated {
                        announce_failed: None,
                    }
                } else {
                    Outcome::RolledBack {
                        cause: Step::Handover,
                        reason: "finished before the restart".to_owned(),
                        handed_back: self.handback_sent,
                        abort_confirmed: true,
                    }
                });
            }
        }
    }

    /// Reports the end of `step`'s hook or admin call. Returns false (and does nothing) when
    /// `step` is not the one awaited, e.g. a late result after [`Action::Cancel`].
    pub fn on_result(&mut self, step: Step, result: Result<(), Failure>, now: Time) -> bool {
        if step == Step::Query || !self.awaiting(step) {
            return false;
        }
        let now = self.tick(now);
        self.finish(step, result, now);
        true
    }

    /// Reports the answer of [`AdminCall::QueryState`]. Returns false when no query is awaited.
    pub fn on_query(&mut self, result: Result<TargetView, Failure>, now: Time) -> bool {
        if !self.awaiting(Step::Query) {
            return false;
        }
        let now = self.tick(now);
        match result {
            Ok(view) => {
                self.close(Step::Query, Phase::Done, now);
                self.decide(view, now);
            }
            Err(f) => self.finish(Step::Query, Err(f), now),
        }
        true
    }

    /// Fails the awaited step with an unknown outcome if its deadline has passed.
    pub fn on_timeout(&mut self, now: Time) {
        let now = self.tick(now);
        let State::Awaiting { step, deadline } = self.state else {
            return;
        };
        if now < deadline {
            return;
        }
        self.actions.push_back(Action::Cancel { step });
        let after = self.plan.deadlines.of(step);
        let failure = Failure::Unknown(format!("no result within {after:?}"));
        self.finish(step, Err(failure), now);
    }

    /// The next action to execute, in order.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When [`Handover::on_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Option<Time> {
        match self.state {
            State::Awaiting { deadline, .. } => Some(deadline),
            _ => None,
        }
    }

    /// How the handover ended; `None` while it runs.
    pub fn outcome(&self) -> Option<&Outcome> {
        match &self.state {
            State::Finished(o) => Some(o),
            _ => None,
        }
    }

    /// Every step attempt so far.
    pub fn timeline(&self) -> &Timeline {
        &self.timeline
    }

    /// The epoch this handover commits.
    pub fn epoch(&self) -> u64 {
        self.plan.epoch
    }

    /// The plan it runs.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    fn awaiting(&self, step: Step) -> bool {
        matches!(self.state, State::Awaiting { step: s, .. } if s == step)
    }

    fn tick(&mut self, now: Time) -> Time {
        self.clock = self.clock.max(now);
        self.clock
    }

    fn epoch_of(&self, step: Step) -> u64 {
        if step == Step::HandBack {
            self.plan.epoch.saturating_add(1)
        } else {
            self.plan.epoch
        }
    }

    fn journal(&mut self, step: Step, phase: Phase, now: Time) {
        self.actions.push_back(Action::WriteJournal(Record {
            epoch: self.epoch_of(step),
            step,
            phase,
            time: now,
        }));
    }

    fn attempts(&self, step: Step) -> u32 {
        self.attempts.get(&step).copied().unwrap_or(0)
    }

    fn may_retry(&self, step: Step) -> bool {
        self.attempts(step) < self.plan.max_attempts
    }

    /// Journals and begins one attempt of `step`.
    fn launch(&mut self, step: Step, now: Time) {
        let n = self.attempts(step).saturating_add(1);
        self.attempts.insert(step, n);
        self.journal(step, Phase::Started, now);
        self.timeline.begin(step, now);
        self.state = State::Awaiting {
            step,
            deadline: now.saturating_add(self.plan.deadlines.of(step)),
        };
        let epoch = self.epoch_of(step);
        let call = match step {
            Step::Prepare => Some(AdminCall::Prepare { epoch }),
            Step::Commit => {
                self.commit_sent = true;
                Some(AdminCall::Commit { epoch })
            }
            Step::Abort => Some(AdminCall::Abort { epoch }),
            Step::Query => Some(AdminCall::QueryState),
            Step::HandBack => {
                self.handback_sent = true;
                Some(AdminCall::HandBack { epoch })
            }
            _ => None,
        };
        if let Some(call) = call {
            self.actions.push_back(Action::Admin { step, call });
            return;
        }
        match self.plan.hooks.command(step).map(str::to_owned) {
            Some(cmd) => self.actions.push_back(Action::RunHook {
                step,
                name: step.name(),
                cmd,
            }),
            // No hook configured: the step succeeds at once.
            None => self.finish(step, Ok(()), now),
        }
    }

    fn query(&mut self, pending: Pending, now: Time) {
        self.pending = pending;
        self.attempts.insert(Step::Query, 0);
        self.launch(Step::Query, now);
    }

    /// Journals and closes the awaited attempt of `step`.
    fn close(&mut self, step: Step, phase: Phase, now: Time) {
        self.journal(step, phase, now);
        self.timeline.end(step, phase, now);
        self.state = State::Idle;
    }

    fn set_cause(&mut self, step: Step, failure: &Failure) {
        if self.cause.is_none() {
            self.cause = Some((step, failure.to_string()));
        }
    }

    fn finish(&mut self, step: Step, result: Result<(), Failure>, now: Time) {
        let phase = if result.is_ok() {
            Phase::Done
        } else {
            Phase::Failed
        };
        self.close(step, phase, now);
        match (step, result) {
            (Step::Prepare, Ok(())) => self.launch(Step::PreCopy, now),
            (Step::PreCopy, Ok(())) => self.launch(Step::Pause, now),
            (Step::Pause, Ok(())) => self.launch(Step::Commit, now),
            (Step::Prepare | Step::PreCopy | Step::Pause, Err(f)) => {
                // §3.4 row 1: before the commit S still owns L.
                self.set_cause(step, &f);
                self.launch(Step::Abort, now);
            }
            (Step::Commit, Ok(()) | Err(Failure::Committed)) => self.committed(now),
            (Step::Commit, Err(f @ Failure::Failed(_))) => {
                self.set_cause(step, &f);
                self.commit_unknown = false;
                self.launch(Step::Abort, now);
            }
            (Step::Commit, Err(f @ Failure::Unknown(_))) => {
                // §3.4 row 2: never retry blindly; ask the target first.
                self.set_cause(step, &f);
                self.commit_unknown = true;
                self.query(Pending::Commit, now);
            }
            (Step::Query, Ok(())) => {}
            (Step::Query, Err(_)) => {
                if self.may_retry(Step::Query) {
                    self.launch(Step::Query, now);
                } else if self.pending == Pending::Commit {
                    // The abort settles it: confirmed means never committed.
                    self.launch(Step::Abort, now);
                } else {
                    self.stuck(
                        "the target's state cannot be queried after a hand-back",
                        now,
                    );
                }
            }
            (Step::Abort, Ok(())) => {
                self.abort_confirmed = true;
                self.launch(Step::Rollback, now);
            }
            (Step::Abort, Err(Failure::Committed)) => {
                if self.commit_sent {
                    self.journal(Step::Commit, Phase::Done, now);
                    self.committed(now);
                } else {
                    self.stuck("the epoch was committed by another coordinator", now);
                }
            }
            (Step::Abort, Err(_)) => {
                if self.may_retry(Step::Abort) {
                    self.launch(Step::Abort, now);
                } else if self.commit_sent {
                    self.stuck("the commit's outcome cannot be settled", now);
                } else {
                    // No commit of this epoch was ever sent: S is still the owner.
                    self.launch(Step::Rollback, now);
                }
            }
            (Step::Rollback, Ok(())) => {
                let (cause, reason) = self
                    .cause
                    .take()
                    .unwrap_or((Step::Handover, "unknown".to_owned()));
                self.end(
                    Phase::Failed,
                    Outcome::RolledBack {
                        cause,
                        reason,
                        handed_back: self.handback_sent,
                        abort_confirmed: self.abort_confirmed || self.handback_sent,
                    },
                    now,
                );
            }
            (Step::Rollback, Err(_)) => {
                if self.may_retry(Step::Rollback) {
                    self.launch(Step::Rollback, now);
                } else {
                    self.stuck("the rollback hook keeps failing", now);
                }
            }
            (Step::Resume, Ok(())) => self.launch(Step::Announce, now),
            (Step::Resume, Err(f)) => {
                let unknown = matches!(f, Failure::Unknown(_));
                if unknown && self.may_retry(Step::Resume) {
                    self.launch(Step::Resume, now);
                } else {
                    // §3.4 row 3: the destination failed after the commit.
                    self.set_cause(step, &f);
                    self.launch(Step::HandBack, now);
                }
            }
            (Step::Announce, result) => {
                let announce_failed = result.err().map(|f| f.to_string());
                self.end(Phase::Done, Outcome::Migrated { announce_failed }, now);
            }
            (Step::HandBack, Ok(()) | Err(Failure::Committed)) => self.handed_back(now),
            (Step::HandBack, Err(_)) => self.query(Pending::HandBack, now),
            (Step::Handover, _) => {}
        }
    }

    /// Decides after a successful state query (semantics.md §3.4 row 2).
    fn decide(&mut self, view: TargetView, now: Time) {
        let e = self.plan.epoch;
        match self.pending {
            Pending::Commit => match view.owner {
                Owner::Destination if view.epoch == e => {
                    self.journal(Step::Commit, Phase::Done, now);
                    self.committed(now);
                }
                Owner::Source if view.epoch < e => {
                    if self.commit_unknown && self.may_retry(Step::Commit) {
                        self.launch(Step::Commit, now);
                    } else {
                        self.launch(Step::Abort, now);
                    }
                }
                _ => self.stuck("the target's state shows another authority acted", now),
            },
            Pending::HandBack => match view.owner {
                Owner::Source if Some(view.epoch) == e.checked_add(1) => {
                    self.journal(Step::HandBack, Phase::Done, now);
                    self.handed_back(now);
                }
                Owner::Destination if view.epoch == e => {
                    if self.may_retry(Step::HandBack) {
                        self.launch(Step::HandBack, now);
                    } else {
                        self.stuck("the hand-back keeps failing", now);
                    }
                }
                _ => self.stuck("the target's state shows another authority acted", now),
            },
        }
    }

    fn committed(&mut self, now: Time) {
        self.timeline.commit_confirmed = Some(now);
        self.launch(Step::Resume, now);
    }

    fn handed_back(&mut self, now: Time) {
        self.timeline.handback_confirmed = Some(now);
        self.launch(Step::Rollback, now);
    }

    /// Closes the journal with `phase` (done: migrated; failed: rolled back).
    fn end(&mut self, phase: Phase, outcome: Outcome, now: Time) {
        self.journal(Step::Handover, phase, now);
        self.state = State::Finished(outcome);
    }

    /// Stops without closing the journal, so that a later run resumes from it.
    fn stuck(&mut self, reason: &str, _now: Time) {
        self.state = State::Finished(Outcome::Stuck {
            reason: reason.to_owned(),
        });
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests;
