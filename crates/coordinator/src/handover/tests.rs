use super::*;
use crate::journal::{self, replay, ResumeAt};
use crate::sim::{self, Fate, Host, Run, World};
use proptest::prelude::*;

const E: u64 = 8;
const T0: Time = Time::from_micros(1_000_000);

fn hooks() -> Hooks {
    Hooks {
        precopy: Some("precopy.sh".into()),
        pause: Some("pause.sh".into()),
        resume: Some("resume.sh".into()),
        rollback: Some("rollback.sh".into()),
        announce: Some("announce.sh".into()),
    }
}

fn plan() -> Plan {
    Plan::new(E, hooks())
}

fn run_plan(plan: Plan, mut fate: impl FnMut(&Action) -> Fate) -> (Handover, World, Run) {
    let mut h = Handover::new(plan).unwrap();
    let mut w = World::new(E - 1);
    let mut now = T0;
    let mut run = Run::default();
    run.snapshots.push((0, w.clone()));
    h.start(now);
    sim::drive(&mut h, &mut w, &mut fate, &mut now, &mut run);
    (h, w, run)
}

/// The hooks and admin calls of a run, compactly.
fn calls(run: &Run) -> Vec<String> {
    run.actions
        .iter()
        .filter_map(|a| match a {
            Action::WriteJournal(_) => None,
            Action::RunHook { name, .. } => Some((*name).to_owned()),
            Action::Cancel { step } => Some(format!("cancel:{step}")),
            Action::Admin { call, .. } => Some(match call {
                AdminCall::Prepare { epoch } => format!("prepare({epoch})"),
                AdminCall::Commit { epoch } => format!("commit({epoch})"),
                AdminCall::Abort { epoch } => format!("abort({epoch})"),
                AdminCall::QueryState => "query".to_owned(),
                AdminCall::HandBack { epoch } => format!("handback({epoch})"),
            }),
        })
        .collect()
}

fn kind(o: &Outcome) -> String {
    match o {
        Outcome::Migrated {
            announce_failed: None,
        } => "migrated".into(),
        Outcome::Migrated {
            announce_failed: Some(_),
        } => "migrated, announce failed".into(),
        Outcome::RolledBack {
            cause,
            handed_back,
            abort_confirmed,
            ..
        } => format!(
            "rolled back: {cause} handed_back={handed_back} abort_confirmed={abort_confirmed}"
        ),
        Outcome::Stuck { .. } => "stuck".into(),
    }
}

use Fate::{Fail, TimeoutApplied, TimeoutLost, UnknownApplied, UnknownLost};

type Script = &'static [(Step, &'static [Fate])];

/// One row per transition and failure path: (fates, hooks and calls, outcome).
const SCENARIOS: &[(Script, &str, &str)] = &[
    (&[], "prepare(8) precopy pause commit(8) resume announce", "migrated"),
    (&[(Step::Prepare, &[Fail])], "prepare(8) abort(8) rollback", "rolled back: prepare handed_back=false abort_confirmed=true"),
    (&[(Step::Prepare, &[TimeoutApplied])], "prepare(8) cancel:prepare abort(8) rollback", "rolled back: prepare handed_back=false abort_confirmed=true"),
    (&[(Step::PreCopy, &[Fail])], "prepare(8) precopy abort(8) rollback", "rolled back: precopy handed_back=false abort_confirmed=true"),
    (&[(Step::Pause, &[UnknownApplied])], "prepare(8) precopy pause abort(8) rollback", "rolled back: pause handed_back=false abort_confirmed=true"),
    (&[(Step::Pause, &[TimeoutLost])], "prepare(8) precopy pause cancel:pause abort(8) rollback", "rolled back: pause handed_back=false abort_confirmed=true"),
    (&[(Step::Commit, &[Fail])], "prepare(8) precopy pause commit(8) abort(8) rollback", "rolled back: commit handed_back=false abort_confirmed=true"),
    (&[(Step::Commit, &[UnknownApplied])], "prepare(8) precopy pause commit(8) query resume announce", "migrated"),
    (&[(Step::Commit, &[UnknownLost])], "prepare(8) precopy pause commit(8) query commit(8) resume announce", "migrated"),
    (&[(Step::Commit, &[TimeoutApplied])], "prepare(8) precopy pause commit(8) cancel:commit query resume announce", "migrated"),
    (&[(Step::Commit, &[UnknownLost, UnknownLost, TimeoutLost])], "prepare(8) precopy pause commit(8) query commit(8) query commit(8) cancel:commit query abort(8) rollback", "rolled back: commit handed_back=false abort_confirmed=true"),
    (&[(Step::Commit, &[UnknownLost]), (Step::Query, &[Fail, Fail, UnknownLost])], "prepare(8) precopy pause commit(8) query query query abort(8) rollback", "rolled back: commit handed_back=false abort_confirmed=true"),
    (&[(Step::Commit, &[UnknownApplied]), (Step::Query, &[Fail, Fail, Fail])], "prepare(8) precopy pause commit(8) query query query abort(8) resume announce", "migrated"),
    (&[(Step::Commit, &[UnknownLost]), (Step::Query, &[Fail, Fail, Fail]), (Step::Abort, &[UnknownLost, Fail, TimeoutLost])], "prepare(8) precopy pause commit(8) query query query abort(8) abort(8) abort(8) cancel:abort", "stuck"),
    (&[(Step::Resume, &[Fail])], "prepare(8) precopy pause commit(8) resume handback(9) rollback", "rolled back: resume handed_back=true abort_confirmed=true"),
    (&[(Step::Resume, &[UnknownLost])], "prepare(8) precopy pause commit(8) resume resume announce", "migrated"),
    (&[(Step::Resume, &[UnknownApplied, UnknownLost, UnknownApplied])], "prepare(8) precopy pause commit(8) resume resume resume handback(9) rollback", "rolled back: resume handed_back=true abort_confirmed=true"),
    (&[(Step::Resume, &[Fail]), (Step::HandBack, &[UnknownApplied])], "prepare(8) precopy pause commit(8) resume handback(9) query rollback", "rolled back: resume handed_back=true abort_confirmed=true"),
    (&[(Step::Resume, &[Fail]), (Step::HandBack, &[UnknownLost])], "prepare(8) precopy pause commit(8) resume handback(9) query handback(9) rollback", "rolled back: resume handed_back=true abort_confirmed=true"),
    (&[(Step::Resume, &[Fail]), (Step::HandBack, &[Fail, Fail, Fail])], "prepare(8) precopy pause commit(8) resume handback(9) query handback(9) query handback(9) query", "stuck"),
    (&[(Step::Resume, &[Fail]), (Step::HandBack, &[UnknownLost]), (Step::Query, &[Fail, Fail, Fail])], "prepare(8) precopy pause commit(8) resume handback(9) query query query", "stuck"),
    (&[(Step::Announce, &[Fail])], "prepare(8) precopy pause commit(8) resume announce", "migrated, announce failed"),
    (&[(Step::Prepare, &[Fail]), (Step::Abort, &[Fail, UnknownLost, Fail])], "prepare(8) abort(8) abort(8) abort(8) rollback", "rolled back: prepare handed_back=false abort_confirmed=false"),
    (&[(Step::Pause, &[Fail]), (Step::Rollback, &[Fail, UnknownApplied])], "prepare(8) precopy pause abort(8) rollback rollback rollback", "rolled back: pause handed_back=false abort_confirmed=true"),
    (&[(Step::Pause, &[Fail]), (Step::Rollback, &[Fail, Fail, Fail])], "prepare(8) precopy pause abort(8) rollback rollback rollback", "stuck"),
];

#[test]
fn scenarios_take_the_documented_path() {
    for (script, want_calls, want_kind) in SCENARIOS {
        let (h, w, run) = run_plan(plan(), sim::per_step(script));
        assert_eq!(calls(&run).join(" "), *want_calls, "{script:?}");
        let outcome = h.outcome().unwrap();
        assert_eq!(kind(outcome), *want_kind, "{script:?}");
        assert!(w.violations.is_empty(), "{script:?}: {:?}", w.violations);
        match outcome {
            Outcome::Stuck { .. } => {}
            Outcome::Migrated { .. } => assert!(w.consistent() && w.owner == Host::D),
            Outcome::RolledBack { .. } => assert!(w.consistent() && w.owner == Host::S),
        }
        // The journal closes exactly when the outcome is final.
        let rec = replay(&run.journal).unwrap();
        let want = match outcome {
            Outcome::Migrated { .. } => Some(true),
            Outcome::RolledBack { .. } => Some(false),
            Outcome::Stuck { .. } => None,
        };
        let got = match rec.resume_at {
            ResumeAt::Finished { migrated } => Some(migrated),
            _ => None,
        };
        assert_eq!(got, want, "{script:?}");
    }
}

#[test]
fn happy_path_journal_and_timeline() {
    let (h, _, run) = run_plan(plan(), sim::all_ok);
    let got: Vec<(u64, &str, &str)> = run
        .journal
        .iter()
        .map(|r| (r.epoch, r.step.name(), r.phase.name()))
        .collect();
    let mut want = Vec::new();
    for s in [
        "prepare", "precopy", "pause", "commit", "resume", "announce",
    ] {
        want.push((E, s, "started"));
        want.push((E, s, "done"));
    }
    want.push((E, "handover", "done"));
    assert_eq!(got, want);
    // The driver advances 1 ms per call: pause, commit and resume lie inside the blackout.
    let t = h.timeline();
    assert_eq!(t.spans().len(), 6);
    assert_eq!(t.blackout(), Some(Duration::from_millis(3)));
    assert_eq!(t.storage_switch(), Some(Duration::from_millis(1)));
    assert_eq!(t.handback(), None);
    let text = t.to_string();
    assert!(
        text.contains("blackout (pause -> resume): 3.000 ms"),
        "{text}"
    );
    assert!(text.contains("storage switch (commit): 1.000 ms"), "{text}");
}

#[test]
fn handback_records_carry_the_next_epoch() {
    let (h, _, run) = run_plan(plan(), sim::per_step(&[(Step::Resume, &[Fail])]));
    let hb: Vec<u64> = run
        .journal
        .iter()
        .filter(|r| r.step == Step::HandBack)
        .map(|r| r.epoch)
        .collect();
    assert_eq!(hb, [E + 1, E + 1]);
    assert_eq!(h.timeline().handback(), Some(Duration::from_millis(1)));
    // Blackout ends when the rollback resumed the source.
    assert_eq!(h.timeline().blackout(), Some(Duration::from_millis(5)));
}

#[test]
fn missing_hooks_succeed_at_once() {
    let hooks = Hooks {
        precopy: None,
        announce: None,
        ..hooks()
    };
    let (h, w, run) = run_plan(Plan::new(E, hooks), sim::all_ok);
    assert_eq!(calls(&run).join(" "), "prepare(8) pause commit(8) resume");
    assert_eq!(kind(h.outcome().unwrap()), "migrated");
    assert!(w.consistent());
    // Their steps are still journaled, so replay sees them.
    assert!(run
        .journal
        .iter()
        .any(|r| r.step == Step::PreCopy && r.phase == Phase::Done));
}

#[test]
fn rejects_bad_plans() {
    assert_eq!(
        Handover::new(Plan::new(0, hooks())).err(),
        Some(PlanError::Epoch(0))
    );
    assert_eq!(
        Handover::new(Plan::new(u64::MAX, hooks())).err(),
        Some(PlanError::Epoch(u64::MAX))
    );
    let mut p = plan();
    p.max_attempts = 0;
    assert_eq!(Handover::new(p).err(), Some(PlanError::Attempts));
    let p = Plan::new(
        E,
        Hooks {
            rollback: None,
            ..hooks()
        },
    );
    assert_eq!(Handover::new(p).err(), Some(PlanError::RollbackRequired));
    let rec = replay(&[Record {
        epoch: E + 3,
        step: Step::Prepare,
        phase: Phase::Started,
        time: T0,
    }])
    .unwrap();
    assert_eq!(
        Handover::recover(plan(), &rec).err(),
        Some(PlanError::EpochMismatch {
            journal: E + 3,
            plan: E
        })
    );
}

/// Drains actions up to the first hook or admin call.
fn next_call(h: &mut Handover) -> Option<Action> {
    std::iter::from_fn(|| h.poll_action()).find(|a| !matches!(a, Action::WriteJournal(_)))
}

#[test]
fn ignores_stale_and_foreign_results() {
    let mut h = Handover::new(plan()).unwrap();
    h.start(T0);
    h.start(T0); // a second start does nothing
    assert!(matches!(
        next_call(&mut h),
        Some(Action::Admin {
            call: AdminCall::Prepare { epoch: E },
            ..
        })
    ));
    assert_eq!(next_call(&mut h), None);
    assert!(!h.on_result(Step::Commit, Ok(()), T0));
    assert!(!h.on_result(Step::Query, Ok(()), T0));
    assert!(!h.on_query(
        Ok(TargetView {
            epoch: E,
            owner: Owner::Destination
        }),
        T0
    ));
    // Before the deadline a timeout does nothing; after it, the step is cancelled.
    let deadline = h.poll_timeout().unwrap();
    assert_eq!(deadline, T0.saturating_add(Deadlines::default().prepare));
    h.on_timeout(Time::from_micros(deadline.as_micros() - 1));
    assert_eq!(next_call(&mut h), None);
    h.on_timeout(deadline);
    assert_eq!(
        next_call(&mut h),
        Some(Action::Cancel {
            step: Step::Prepare
        })
    );
    // The cancelled prepare's late result is refused.
    assert!(!h.on_result(Step::Prepare, Ok(()), deadline));
    assert!(matches!(
        next_call(&mut h),
        Some(Action::Admin {
            call: AdminCall::Abort { epoch: E },
            ..
        })
    ));
}

#[test]
fn query_showing_another_authority_is_stuck() {
    for view in [
        TargetView {
            epoch: E + 1,
            owner: Owner::Destination,
        },
        TargetView {
            epoch: E,
            owner: Owner::Neither,
        },
        TargetView {
            epoch: E,
            owner: Owner::Source,
        },
    ] {
        let mut h = Handover::new(Plan::new(E, Hooks::default())).unwrap();
        h.start(T0);
        assert!(h.on_result(Step::Prepare, Ok(()), T0));
        assert!(h.on_result(Step::Commit, Err(Failure::Unknown("reset".into())), T0));
        assert!(h.on_query(Ok(view), T0));
        assert!(
            matches!(h.outcome(), Some(Outcome::Stuck { .. })),
            "{view:?}"
        );
        // No commit after the first, no abort: another authority acted.
        let commits = std::iter::from_fn(|| h.poll_action())
            .filter(|a| {
                matches!(
                    a,
                    Action::Admin {
                        call: AdminCall::Commit { .. } | AdminCall::Abort { .. },
                        ..
                    }
                )
            })
            .count();
        assert_eq!(commits, 1);
    }
}

#[test]
fn abort_reporting_a_foreign_commit_is_stuck() {
    let mut h = Handover::new(plan()).unwrap();
    h.start(T0);
    assert!(h.on_result(
        Step::Prepare,
        Err(Failure::Failed("not logged in".into())),
        T0
    ));
    assert!(h.on_result(Step::Abort, Err(Failure::Committed), T0));
    assert!(matches!(h.outcome(), Some(Outcome::Stuck { .. })));
}

#[test]
fn timeline_is_monotonic_when_now_goes_back() {
    let mut h = Handover::new(Plan::new(E, Hooks::default())).unwrap();
    h.start(Time::from_micros(100));
    assert!(h.on_result(Step::Prepare, Ok(()), Time::from_micros(50)));
    assert!(h.on_result(Step::Commit, Ok(()), Time::from_micros(10)));
    assert!(matches!(h.outcome(), Some(Outcome::Migrated { .. })));
    let mut last = Time::default();
    for s in h.timeline().spans() {
        assert!(s.start >= last && s.end.unwrap() >= s.start);
        last = s.start;
    }
    let times: Vec<Time> = std::iter::from_fn(|| h.poll_action())
        .filter_map(|a| match a {
            Action::WriteJournal(r) => Some(r.time),
            _ => None,
        })
        .collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]));
    assert_eq!(times.first(), Some(&Time::from_micros(100)));
}

/// Recovers from `prefix` of a journal (with half of the next record appended as a torn line)
/// against `world`, drives to the end with every call succeeding, and checks the LU ends with
/// one owner running the guest. Returns the recovery decision.
fn recover_and_finish(plan: Plan, journal: &[Record], k: usize, world: &World) -> ResumeAt {
    let prefix = &journal[..k];
    let mut bytes: Vec<u8> = prefix
        .iter()
        .map(Record::encode)
        .collect::<String>()
        .into_bytes();
    if let Some(next) = journal.get(k) {
        let line = next.encode();
        bytes.extend_from_slice(&line.as_bytes()[..line.len() / 2]);
    }
    let parsed = journal::parse(&bytes).unwrap();
    assert_eq!(parsed.records, prefix);
    let rec = replay(&parsed.records).unwrap();
    let mut h = Handover::recover(plan, &rec).unwrap();
    let mut w = world.clone();
    let mut now = prefix.last().map_or(T0, |r| r.time);
    let mut run = Run::default();
    h.start(now);
    sim::drive(&mut h, &mut w, &mut sim::all_ok, &mut now, &mut run);
    let outcome = h.outcome().unwrap();
    let ctx = format!(
        "kill after record {k} ({:?}), world {world:?}, outcome {outcome:?}",
        rec.resume_at
    );
    assert!(!matches!(outcome, Outcome::Stuck { .. }), "{ctx}");
    assert!(w.violations.is_empty(), "{ctx}: {:?}", w.violations);
    assert!(w.consistent(), "{ctx}: {w:?}");
    // Never commit after abort, also across the restart.
    if rec.abort_started {
        assert!(
            !calls(&run).iter().any(|c| c.starts_with("commit")),
            "{ctx}"
        );
    }
    // The continued journal closes the way the LU ended.
    let mut all = prefix.to_vec();
    all.extend(run.journal);
    let closed = replay(&all).unwrap().resume_at;
    assert_eq!(
        closed,
        ResumeAt::Finished {
            migrated: w.owner == Host::D
        },
        "{ctx}"
    );
    rec.resume_at
}

/// The coordinator is killed at every point of every scenario: after each journal append and
/// after each effect (before its `done`); resuming from the journal always ends consistent, and
/// the decision matches the kill point (semantics.md §3.4).
#[test]
fn killed_between_every_pair_of_steps_recovers_consistently() {
    let mut points = 0;
    for (script, _, _) in SCENARIOS {
        let (_, _, run) = run_plan(plan(), sim::per_step(script));
        for (k, world) in &run.snapshots {
            points += 1;
            let prefix = &run.journal[..*k];
            let began = |s: Step| prefix.iter().any(|r| r.step == s);
            let at = recover_and_finish(plan(), &run.journal, *k, world);
            let committed = world.decisions.get(&E) == Some(&Host::D);
            // Write-ahead: the target never sees a commit the journal does not announce.
            if !began(Step::Commit) {
                assert!(!committed);
                assert!(
                    matches!(
                        at,
                        ResumeAt::Fresh
                            | ResumeAt::AbortThenRollback
                            | ResumeAt::Rollback
                            | ResumeAt::Finished { migrated: false }
                    ),
                    "{script:?} k={k}: {at:?}"
                );
            }
            if *k == 0 {
                assert_eq!(at, ResumeAt::Fresh);
            }
            match at {
                ResumeAt::Resume | ResumeAt::Announce | ResumeAt::Finished { migrated: true } => {
                    assert!(committed, "{script:?} k={k}");
                }
                ResumeAt::QueryCommit => assert!(began(Step::Commit)),
                ResumeAt::QueryHandBack => assert!(began(Step::HandBack)),
                _ => {}
            }
        }
    }
    assert!(points > 300, "{points}");
}

fn fate() -> impl Strategy<Value = Fate> {
    prop_oneof![
        8 => Just(Fate::Ok),
        1 => Just(Fate::Fail),
        1 => Just(Fate::UnknownApplied),
        1 => Just(Fate::UnknownLost),
        1 => Just(Fate::TimeoutApplied),
        1 => Just(Fate::TimeoutLost),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Random outcomes for every hook and call keep the invariants of semantics.md §3.2.
    #[test]
    fn random_outcomes_keep_the_invariants(
        fates in proptest::collection::vec(fate(), 0..40),
        precopy in any::<bool>(),
        announce in any::<bool>(),
        kill in any::<proptest::sample::Index>(),
    ) {
        let hooks = Hooks {
            precopy: precopy.then(|| "precopy.sh".to_owned()),
            announce: announce.then(|| "announce.sh".to_owned()),
            ..hooks()
        };
        let plan = Plan::new(E, hooks);
        let mut script = fates.into_iter();
        let (h, w, run) = run_plan(plan.clone(), move |_| script.next().unwrap_or(Fate::Ok));
        let outcome = h.outcome().unwrap().clone();
        prop_assert!(w.violations.is_empty(), "{:?}", w.violations);

        // At most one owner decision per epoch: commits only at E (towards D), hand-backs only
        // at E + 1 (towards S).
        for a in &run.actions {
            if let Action::Admin { call, .. } = a {
                match call {
                    AdminCall::Commit { epoch } => prop_assert_eq!(*epoch, E),
                    AdminCall::HandBack { epoch } => prop_assert_eq!(*epoch, E + 1),
                    _ => {}
                }
            }
        }
        // Never commit after abort.
        let c = calls(&run);
        if let Some(first_abort) = c.iter().position(|x| x.starts_with("abort")) {
            prop_assert!(!c[first_abort..].iter().any(|x| x.starts_with("commit")), "{c:?}");
        }
        // Rollback runs whenever the source stays owner after a pause.
        let paused = c.iter().any(|x| x == "pause");
        if paused && w.owner == Host::S && !matches!(outcome, Outcome::Stuck { .. }) {
            prop_assert_eq!(c.iter().rev().find(|x| !x.starts_with("cancel")).map(String::as_str), Some("rollback"), "{:?}", c);
        }
        match &outcome {
            Outcome::Stuck { .. } => {}
            Outcome::Migrated { .. } => prop_assert!(w.consistent() && w.owner == Host::D),
            Outcome::RolledBack { .. } => prop_assert!(w.consistent() && w.owner == Host::S),
        }
        // The timeline and the journal are monotonic.
        let spans = h.timeline().spans();
        prop_assert!(spans.windows(2).all(|p| p[0].start <= p[1].start));
        prop_assert!(spans.iter().all(|s| s.end.is_some_and(|e| e >= s.start)));
        prop_assert!(run.journal.windows(2).all(|p| p[0].time <= p[1].time));
        // A kill at a random point recovers consistently.
        let (k, world) = &run.snapshots[kill.index(run.snapshots.len())];
        recover_and_finish(plan, &run.journal, *k, world);
    }
}
