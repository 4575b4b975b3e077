//! Test harness: an in-memory model of the target's handover endpoints and of the two
//! hypervisors, and a driver that feeds a [`Handover`] scripted fates (the `Pair` idea of
//! quinn-proto's tests, for one machine).
#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::expect_used)]

use crate::handover::{Action, AdminCall, Failure, Handover, Owner, TargetView};
use crate::journal::Record;
use crate::{Step, Time};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Host {
    S,
    D,
}

/// Where the guest is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vm {
    SourceRunning,
    SourcePaused,
    DestRunning,
    /// D ran the guest and was fenced by a hand-back.
    DestFenced,
}

/// What the target or hook answers when an action takes effect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Done,
    Refused(String),
    Committed,
    View(TargetView),
}

/// The target's LU ownership plus the guest's location; records rule violations.
#[derive(Debug, Clone)]
pub struct World {
    pub owner: Host,
    pub epoch: u64,
    pub prepared: Option<u64>,
    pub aborted: BTreeSet<u64>,
    /// Every ownership decision: epoch → owner. Two decisions for one epoch is a violation.
    pub decisions: BTreeMap<u64, Host>,
    pub vm: Vm,
    pub violations: Vec<String>,
}

impl World {
    /// S owns the LU at `epoch` and runs the guest.
    pub fn new(epoch: u64) -> Self {
        Self {
            owner: Host::S,
            epoch,
            prepared: None,
            aborted: BTreeSet::new(),
            decisions: BTreeMap::new(),
            vm: Vm::SourceRunning,
            violations: Vec::new(),
        }
    }

    /// Exactly one owner, and the guest runs there.
    pub fn consistent(&self) -> bool {
        matches!(
            (self.owner, self.vm),
            (Host::S, Vm::SourceRunning) | (Host::D, Vm::DestRunning)
        )
    }

    fn decide(&mut self, epoch: u64, owner: Host) {
        if let Some(prev) = self.decisions.insert(epoch, owner) {
            self.violations
                .push(format!("epoch {epoch} decided twice ({prev:?}, {owner:?})"));
        }
        self.owner = owner;
        self.epoch = epoch;
    }

    pub fn apply(&mut self, action: &Action) -> Answer {
        match action {
            Action::Admin { call, .. } => self.admin(*call),
            Action::RunHook { step, .. } => {
                self.hook(*step);
                Answer::Done
            }
            Action::WriteJournal(_) | Action::Cancel { .. } => Answer::Done,
        }
    }

    fn admin(&mut self, call: AdminCall) -> Answer {
        match call {
            AdminCall::Prepare { epoch } => {
                if self.aborted.contains(&epoch) || epoch != self.epoch + 1 {
                    return Answer::Refused("stale".into());
                }
                self.prepared = Some(epoch);
                Answer::Done
            }
            AdminCall::Commit { epoch } => {
                if self.aborted.contains(&epoch) {
                    Answer::Refused("aborted".into())
                } else if self.decisions.get(&epoch) == Some(&Host::D) {
                    Answer::Done
                } else if epoch == self.epoch + 1
                    && self.prepared == Some(epoch)
                    && self.owner == Host::S
                {
                    if self.vm == Vm::SourceRunning {
                        self.violations.push("commit while the source runs".into());
                    }
                    self.decide(epoch, Host::D);
                    Answer::Done
                } else {
                    Answer::Refused("stale".into())
                }
            }
            AdminCall::Abort { epoch } => {
                if self.decisions.get(&epoch) == Some(&Host::D) {
                    Answer::Committed
                } else {
                    self.aborted.insert(epoch);
                    self.prepared = None;
                    Answer::Done
                }
            }
            AdminCall::HandBack { epoch } => {
                if self.decisions.get(&epoch) == Some(&Host::S) {
                    Answer::Done
                } else if epoch == self.epoch + 1 && self.owner == Host::D {
                    self.decide(epoch, Host::S);
                    if self.vm == Vm::DestRunning {
                        self.vm = Vm::DestFenced;
                    }
                    Answer::Done
                } else {
                    Answer::Refused("stale".into())
                }
            }
            AdminCall::QueryState => Answer::View(TargetView {
                epoch: self.epoch,
                owner: match self.owner {
                    Host::S => Owner::Source,
                    Host::D => Owner::Destination,
                },
            }),
        }
    }

    fn hook(&mut self, step: Step) {
        match step {
            Step::Pause if self.vm == Vm::SourceRunning => self.vm = Vm::SourcePaused,
            Step::Resume => {
                if self.owner != Host::D {
                    self.violations
                        .push("destination resumed without ownership".into());
                }
                if self.vm == Vm::SourceRunning {
                    self.violations.push("guest runs on both hosts".into());
                }
                self.vm = Vm::DestRunning;
            }
            Step::Rollback => {
                if self.owner != Host::S {
                    self.violations
                        .push("source resumed without ownership".into());
                }
                if self.vm == Vm::DestRunning {
                    self.violations.push("guest runs on both hosts".into());
                }
                self.vm = Vm::SourceRunning;
            }
            _ => {}
        }
    }
}

/// What happens to one hook or admin call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Takes effect; the answer is reported.
    Ok,
    /// No effect; reported as failed.
    Fail,
    /// Takes effect; reported as unknown.
    UnknownApplied,
    /// No effect; reported as unknown.
    UnknownLost,
    /// Takes effect; no report, the deadline passes.
    TimeoutApplied,
    /// No effect; no report, the deadline passes.
    TimeoutLost,
}

/// Everything a drive observed.
#[derive(Debug, Default, Clone)]
pub struct Run {
    pub journal: Vec<Record>,
    pub actions: Vec<Action>,
    /// (journal length, world) after every journal append and every applied effect: the points
    /// where a coordinator can be killed.
    pub snapshots: Vec<(usize, World)>,
}

/// Executes the machine's actions against `world` until it has none left.
pub fn drive(
    h: &mut Handover,
    world: &mut World,
    fate: &mut dyn FnMut(&Action) -> Fate,
    now: &mut Time,
    run: &mut Run,
) {
    let mut guard = 0;
    while let Some(a) = h.poll_action() {
        guard += 1;
        assert!(guard < 10_000, "handover does not terminate");
        run.actions.push(a.clone());
        let step = match &a {
            Action::WriteJournal(r) => {
                run.journal.push(*r);
                run.snapshots.push((run.journal.len(), world.clone()));
                continue;
            }
            Action::Cancel { .. } => continue,
            Action::RunHook { step, .. } | Action::Admin { step, .. } => *step,
        };
        let f = fate(&a);
        let applied = matches!(f, Fate::Ok | Fate::UnknownApplied | Fate::TimeoutApplied);
        let answer = applied.then(|| world.apply(&a));
        if applied {
            run.snapshots.push((run.journal.len(), world.clone()));
        }
        *now = now.saturating_add(Duration::from_millis(1));
        let result: Result<Option<TargetView>, Failure> = match (f, answer) {
            (Fate::TimeoutApplied | Fate::TimeoutLost, _) => {
                let deadline = h.poll_timeout().expect("a step is awaited");
                *now = (*now).max(deadline);
                h.on_timeout(*now);
                continue;
            }
            (Fate::Fail, _) => Err(Failure::Failed("scripted".into())),
            (Fate::UnknownApplied | Fate::UnknownLost, _) => {
                Err(Failure::Unknown("scripted".into()))
            }
            (Fate::Ok, Some(Answer::Done)) => Ok(None),
            (Fate::Ok, Some(Answer::View(v))) => Ok(Some(v)),
            (Fate::Ok, Some(Answer::Committed)) => Err(Failure::Committed),
            (Fate::Ok, Some(Answer::Refused(r))) => Err(Failure::Failed(r)),
            (Fate::Ok, None) => unreachable!(),
        };
        let accepted = if step == Step::Query {
            h.on_query(result.map(|v| v.expect("a query answers a view")), *now)
        } else {
            h.on_result(step, result.map(|_| ()), *now)
        };
        assert!(accepted, "result for {step} not accepted");
    }
    assert!(h.outcome().is_some(), "no action left but not finished");
}

/// Every call succeeds.
pub fn all_ok(_: &Action) -> Fate {
    Fate::Ok
}

/// The n-th call of a step gets the n-th fate listed for it, later calls succeed.
pub fn per_step(script: &[(Step, &[Fate])]) -> impl FnMut(&Action) -> Fate {
    let mut script: BTreeMap<Step, Vec<Fate>> = script
        .iter()
        .map(|(s, f)| (*s, f.iter().rev().copied().collect()))
        .collect();
    move |a: &Action| {
        let step = match a {
            Action::RunHook { step, .. } | Action::Admin { step, .. } => *step,
            _ => return Fate::Ok,
        };
        script.get_mut(&step).and_then(Vec::pop).unwrap_or(Fate::Ok)
    }
}
