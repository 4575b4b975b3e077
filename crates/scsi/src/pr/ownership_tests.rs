//! Ownership and handover scenarios through the LU (semantics.md §3.2-§3.5): one test per
//! rule of [`crate::pr::ownership`], and a proptest that random interleavings of handover
//! steps, logins and in-flight writes never leave two hosts able to write.
#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::cast_possible_truncation
)]

use bytes::Bytes;
use proptest::prelude::*;

use super::ownership::{owner_key, Handover, OwnershipError};
use super::tests::{it, A, A2, B, C, F};
use crate::lu::{Completion, Continuation, IoResult, LogicalUnit, NexusId, PrCommit, Step};
use crate::pr::{sa, InitiatorPort, ItNexus, Persist};
use crate::status;

const HA: &str = "iqn.test:a";
const HB: &str = "iqn.test:b";
const HC: &str = "iqn.test:c";
const GOOD: u8 = status::GOOD;
const CONFLICT: u8 = status::RESERVATION_CONFLICT;
const WRITE10: [u8; 10] = [0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0];
const SYNC10: [u8; 10] = [0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0];

/// Carry out an ownership step's commit as the daemon would (no abort left undrained is
/// checked by the caller), remembering the state file.
fn commit(
    f: &mut F,
    step: impl FnOnce(&mut LogicalUnit) -> Result<PrCommit, OwnershipError>,
) -> PrCommit {
    let c = step(&mut f.lu).unwrap();
    assert_eq!(c.completion.status, GOOD);
    if c.persist.is_some() {
        f.last_persist = c.persist.clone();
    }
    c
}

fn owned_by_a() -> F {
    let mut f = F::new();
    let c = commit(&mut f, |lu| lu.set_owner(HA, 1));
    assert_eq!(c.abort, None);
    f
}

/// Start a WRITE(10) and leave it in flight.
fn start_write(f: &mut F, n: NexusId) -> Continuation {
    while f.ua(n).is_some() {}
    match f.lu.execute(n, &WRITE10, Bytes::from(vec![0u8; 512])) {
        Step::Io(_, cont) => cont,
        other => panic!("write did not start: {other:?}"),
    }
}

fn finish(f: &mut F, n: NexusId, cont: Continuation) -> Completion {
    match f.lu.resume(n, cont, IoResult::Done) {
        Step::Done(c) => c,
        other => panic!("{other:?}"),
    }
}

fn written_state(f: &F) -> Vec<u8> {
    match &f.last_persist {
        Some(Persist::Write(b)) => b.clone(),
        other => panic!("no state file written: {other:?}"),
    }
}

fn fenced_a_to_b(f: &mut F, epoch: u64) {
    f.lu.handover_prepare(HA, HB, epoch).unwrap();
    let t = f.lu.handover_fence(HA, epoch).unwrap();
    assert!(f.lu.drained(&t));
}

#[test]
fn set_owner_holds_wero_for_every_nexus_of_the_host() {
    let mut f = F::new();
    let (gen, _) = f.keys();
    commit(&mut f, |lu| lu.set_owner("IQN.TEST:A", 1));
    for n in [A, A2] {
        assert_eq!(f.write(n), GOOD, "owner nexus {n}");
    }
    for n in [B, C] {
        assert_eq!(f.write(n), CONFLICT, "other host {n}");
        assert_eq!(f.read(n), GOOD, "other host {n} reads");
    }
    assert_eq!(f.keys(), (gen + 1, vec![owner_key(HA)]));
    assert_eq!(f.reservation(), Some((owner_key(HA), 5)));
    let s = f.lu.pr_snapshot();
    assert_eq!((s.owner.as_deref(), s.epoch), (Some(HA), 1));
    assert_eq!(s.handover, Handover::Idle);
    assert_eq!(s.registrations.len(), 1);
    assert_eq!(s.registrations[0].initiator_port, HA);
    assert_eq!(s.registrations[0].rtpi, None);
    assert!(s.registrations[0].holder);
    // No unit attention for anyone: a reservation appearing is no event (SPC-4 §5.13.11).
    for n in [A, A2, B, C] {
        assert_eq!(f.uas(n), vec![], "nexus {n}");
    }
}

#[test]
fn later_login_of_the_owner_with_a_new_isid_writes() {
    let mut f = owned_by_a();
    let late = ItNexus {
        initiator: InitiatorPort::new("IQN.test:A", [0x40, 0, 0, 0, 0, 9]),
        rtpi: 2,
    };
    f.lu.add_nexus(50, late);
    assert_eq!(f.write(50), GOOD);
    f.lu.add_nexus(
        51,
        ItNexus {
            initiator: InitiatorPort::new(HC, [0x40, 0, 0, 0, 0, 9]),
            rtpi: 2,
        },
    );
    assert_eq!(f.write(51), CONFLICT);
}

#[test]
fn set_owner_replaces_the_hosts_own_registrations() {
    let mut f = F::new();
    f.reg(A, 0x11);
    f.reg(A2, 0x12);
    commit(&mut f, |lu| lu.set_owner(HA, 1));
    assert_eq!(f.keys().1, vec![owner_key(HA)]);
}

#[test]
fn rejects_set_owner_with_foreign_registrations_or_spc2_reservation() {
    let mut f = F::new();
    f.reg(B, 0x22);
    let before = f.lu.pr_snapshot();
    assert_eq!(
        f.lu.set_owner(HA, 1).unwrap_err(),
        OwnershipError::ForeignRegistrations(vec![HB.to_string()])
    );
    assert_eq!(f.lu.pr_snapshot(), before);

    let mut f = F::new();
    assert_eq!(f.run(C, &[0x16, 0, 0, 0, 0, 0], &[]).status, GOOD);
    assert_eq!(
        f.lu.set_owner(HA, 1).unwrap_err(),
        OwnershipError::Spc2Reserved
    );
    assert_eq!(
        f.lu.set_owner("", 1).unwrap_err(),
        OwnershipError::InvalidHost(String::new())
    );
}

#[test]
fn owned_lu_refuses_every_pr_out_and_answers_pr_in() {
    let mut f = owned_by_a();
    for n in [A, B] {
        let c = f.out(n, sa::REGISTER_AND_IGNORE_EXISTING_KEY, 0, 0, 0x99, 0);
        assert_eq!(c.status, CONFLICT, "nexus {n}");
    }
    let k = owner_key(HA);
    assert_eq!(f.out(A, sa::RELEASE, 5, k, 0, 0).status, CONFLICT);
    assert_eq!(f.out(A, sa::CLEAR, 0, k, 0, 0).status, CONFLICT);
    assert_eq!(f.prin(B, sa::READ_KEYS, 64).status, GOOD);
    assert_eq!(f.keys().1, vec![k]);
}

#[test]
fn set_owner_epochs_retry_and_stale() {
    let mut f = F::new();
    assert_eq!(
        f.lu.set_owner(HA, 0).unwrap_err(),
        OwnershipError::StaleEpoch {
            epoch: 0,
            current: 0
        }
    );
    commit(&mut f, |lu| lu.set_owner(HA, 3));
    let snap = f.lu.pr_snapshot();
    let retry = commit(&mut f, |lu| lu.set_owner(HA, 3));
    assert!(
        matches!(retry.persist, Some(Persist::Write(_))),
        "a retry persists again"
    );
    assert_eq!(f.lu.pr_snapshot(), snap, "a retry changes nothing");
    for (host, epoch) in [(HA, 2), (HB, 3), (HB, 1)] {
        assert!(
            matches!(
                f.lu.set_owner(host, epoch),
                Err(OwnershipError::StaleEpoch { current: 3, .. })
            ),
            "{host} {epoch}"
        );
    }
    assert_eq!(f.lu.pr_snapshot(), snap);
}

#[test]
fn forced_set_owner_aborts_other_hosts_writes_and_preempts_the_old_owner() {
    let mut f = owned_by_a();
    let w = start_write(&mut f, A);
    let c = commit(&mut f, |lu| lu.set_owner(HB, 2));
    let t = c.abort.expect("A's write is aborted");
    assert!(!f.lu.abort_drained(t));
    assert_eq!(finish(&mut f, A, w).status, status::TASK_ABORTED);
    assert!(f.lu.abort_drained(t));
    assert_eq!(f.uas(A), vec![(0x2A, 0x05)]);
    assert_eq!(f.uas(B), vec![]);
    assert_eq!(f.write(B), GOOD);
    assert_eq!(f.write(A), CONFLICT);
}

#[test]
fn set_owner_aborts_writes_in_flight_from_other_hosts_of_an_unowned_lu() {
    let mut f = F::new();
    let wb = start_write(&mut f, B);
    let wa = start_write(&mut f, A);
    let c = commit(&mut f, |lu| lu.set_owner(HA, 1));
    let t = c.abort.unwrap();
    assert_eq!(
        finish(&mut f, A, wa).status,
        GOOD,
        "the owner's own write runs on"
    );
    assert!(!f.lu.abort_drained(t));
    assert_eq!(finish(&mut f, B, wb).status, status::TASK_ABORTED);
    assert!(f.lu.abort_drained(t));
}

#[test]
fn clear_owner_hands_pr_back_to_the_initiators() {
    let mut f = owned_by_a();
    assert!(matches!(
        f.lu.clear_owner(HB, 2),
        Err(OwnershipError::NotOwner { .. })
    ));
    assert!(matches!(
        f.lu.clear_owner(HA, 1),
        Err(OwnershipError::StaleEpoch { .. })
    ));
    commit(&mut f, |lu| lu.clear_owner(HA, 2));
    assert_eq!(f.uas(A), vec![(0x2A, 0x05)]);
    assert_eq!(f.uas(A2), vec![(0x2A, 0x05)]);
    assert_eq!(f.uas(B), vec![]);
    for n in [A, B, C] {
        assert_eq!(f.write(n), GOOD);
    }
    let s = f.lu.pr_snapshot();
    assert_eq!((s.owner, s.epoch, s.reservation), (None, 2, None));
    commit(&mut f, |lu| lu.clear_owner(HA, 2));
    f.reg(B, 0x22);
    assert_eq!(f.keys().1, vec![0x22]);
}

#[test]
fn prepare_checks_and_changes_nothing_else() {
    let mut f = owned_by_a();
    let before = f.lu.pr_snapshot();
    f.lu.remove_nexus(B);
    assert_eq!(
        f.lu.handover_prepare(HA, HB, 2).unwrap_err(),
        OwnershipError::DestinationNotLoggedIn(HB.to_string())
    );
    assert!(matches!(
        f.lu.handover_prepare(HC, HB, 2),
        Err(OwnershipError::NotOwner { .. })
    ));
    assert_eq!(
        f.lu.handover_prepare(HA, HA, 2).unwrap_err(),
        OwnershipError::SameHost
    );
    assert!(matches!(
        f.lu.handover_prepare(HA, HC, 1),
        Err(OwnershipError::StaleEpoch {
            epoch: 1,
            current: 1
        })
    ));
    assert_eq!(f.lu.pr_snapshot(), before);
    f.lu.add_nexus(B, it(B));
    f.lu.handover_prepare(HA, HB, 2).unwrap();
    f.lu.handover_prepare(HA, HB, 2).unwrap();
    assert!(matches!(
        f.lu.handover_prepare(HA, HC, 3),
        Err(OwnershipError::HandoverInProgress(_))
    ));
    let s = f.lu.pr_snapshot();
    assert_eq!(
        s.handover,
        Handover::Prepared {
            from: HA.into(),
            to: HB.into(),
            epoch: 2
        }
    );
    assert_eq!(
        (s.generation, s.registrations),
        (before.generation, before.registrations)
    );
    assert_eq!(f.write(A), GOOD, "the source still writes");
    assert_eq!(f.write(B), CONFLICT, "the destination cannot write yet");
    assert_eq!(f.read(B), GOOD, "but reads");
    assert!(matches!(
        f.lu.set_owner(HC, 9),
        Err(OwnershipError::HandoverInProgress(_))
    ));
}

#[test]
fn fenced_source_write_conflicts_but_its_inflight_write_drains() {
    let mut f = owned_by_a();
    let w = start_write(&mut f, A);
    f.lu.handover_prepare(HA, HB, 2).unwrap();
    assert!(matches!(
        f.lu.handover_fence(HA, 3),
        Err(OwnershipError::NotPrepared(_))
    ));
    let t = f.lu.handover_fence(HA, 2).unwrap();
    assert!(!f.lu.drained(&t));
    for n in [A, A2] {
        assert_eq!(f.write(n), CONFLICT, "fenced nexus {n} writes");
        assert_eq!(
            f.run(n, &SYNC10, &[]).status,
            CONFLICT,
            "fenced nexus {n} flushes"
        );
        assert_eq!(f.read(n), GOOD, "fenced nexus {n} reads");
        assert_eq!(f.tur(n).status, GOOD);
    }
    assert_eq!(
        f.write(B),
        CONFLICT,
        "the destination cannot write before commit"
    );
    assert_eq!(
        finish(&mut f, A, w).status,
        GOOD,
        "the in-flight write completes"
    );
    assert!(f.lu.drained(&t));
    let again = f.lu.handover_fence(HA, 2).unwrap();
    assert!(f.lu.drained(&again));
    assert!(matches!(
        f.lu.pr_snapshot().handover,
        Handover::Fenced { .. }
    ));
    let c = commit(&mut f, |lu| lu.handover_commit(HA, HB, 2));
    assert_eq!(c.abort, None, "nothing left to abort");
}

#[test]
fn abort_inflight_ends_the_source_tasks_with_task_aborted() {
    let mut f = owned_by_a();
    let w = start_write(&mut f, A2);
    assert!(matches!(
        f.lu.handover_abort_inflight(HA),
        Err(OwnershipError::NotFenced(_))
    ));
    f.lu.handover_prepare(HA, HB, 2).unwrap();
    let d = f.lu.handover_fence(HA, 2).unwrap();
    let t = f.lu.handover_abort_inflight(HA).unwrap();
    assert!(!f.lu.abort_drained(t) && !f.lu.drained(&d));
    assert_eq!(finish(&mut f, A2, w).status, status::TASK_ABORTED);
    assert!(f.lu.abort_drained(t) && f.lu.drained(&d));
}

#[test]
fn commit_moves_ownership_in_one_transition() {
    let mut f = owned_by_a();
    fenced_a_to_b(&mut f, 2);
    let (gen, _) = f.keys();
    let c = commit(&mut f, |lu| lu.handover_commit(HA, HB, 2));
    assert!(matches!(c.persist, Some(Persist::Write(_))));
    assert_eq!(f.keys(), (gen + 1, vec![owner_key(HB)]));
    assert_eq!(f.reservation(), Some((owner_key(HB), 5)));
    // 2Ah/05h to the source's nexuses, exactly.
    assert_eq!(f.uas(A), vec![(0x2A, 0x05)]);
    assert_eq!(f.uas(A2), vec![(0x2A, 0x05)]);
    assert_eq!(f.uas(B), vec![]);
    assert_eq!(f.uas(C), vec![]);
    assert_eq!(f.write(B), GOOD, "the destination writes after commit");
    for n in [A, A2, C] {
        assert_eq!(f.write(n), CONFLICT, "nexus {n}");
    }
    assert_eq!(f.read(A), GOOD);
    let s = f.lu.pr_snapshot();
    assert_eq!((s.owner.as_deref(), s.epoch), (Some(HB), 2));
    assert_eq!(s.handover, Handover::Idle);
}

#[test]
fn commit_aborts_source_tasks_still_running() {
    let mut f = owned_by_a();
    let w = start_write(&mut f, A);
    f.lu.handover_prepare(HA, HB, 2).unwrap();
    let d = f.lu.handover_fence(HA, 2).unwrap();
    let c = commit(&mut f, |lu| lu.handover_commit(HA, HB, 2));
    let t = c.abort.expect("the running write is aborted");
    assert!(!f.lu.abort_drained(t) && !f.lu.drained(&d));
    assert_eq!(finish(&mut f, A, w).status, status::TASK_ABORTED);
    assert!(f.lu.abort_drained(t));
}

/// The replicated one-record handover ([`OwnershipOp::Switch`]): from `Prepared` it makes the
/// destination owner and aborts the source's tasks, as a commit after a fence does; it needs
/// the handover prepared with the same arguments; a retry changes nothing.
#[test]
fn switch_commits_from_prepared_and_aborts_the_source_tasks() {
    use super::ownership::{Checks, OwnershipOp, TaskPick};
    let op = |from: &str, to: &str, epoch| OwnershipOp::Switch {
        from: from.to_string(),
        to: to.to_string(),
        epoch,
    };
    let mut f = owned_by_a();
    let mut idle = f.lu.pr_state().clone();
    assert!(matches!(
        idle.ownership(&op(HA, HB, 2), Checks::REPLAY),
        Err(OwnershipError::NotPrepared(_))
    ));
    f.lu.handover_prepare(HA, HB, 2).unwrap();
    let mut s = f.lu.pr_state().clone();
    assert!(matches!(
        s.clone().ownership(&op(HA, HC, 2), Checks::REPLAY),
        Err(OwnershipError::HandoverInProgress(_))
    ));
    let fx = s.ownership(&op(HA, HB, 2), Checks::REPLAY).unwrap();
    assert!(fx.changed);
    assert_eq!(fx.abort, Some(TaskPick::Host(HA.to_string())));
    assert_eq!(fx.removed.len(), 1, "the source's registration goes");
    assert_eq!((s.owner(), s.epoch()), (Some(HB), 2));
    assert_eq!(*s.handover(), Handover::Idle);
    // A retry of the same decision changes nothing but aborts the source's tasks again (so a
    // replicated retry waits for their drain everywhere); a stale epoch is refused.
    let before = s.clone();
    let again = s.ownership(&op(HA, HB, 2), Checks::REPLAY).unwrap();
    assert!(!again.changed);
    assert_eq!(again.abort, Some(TaskPick::Host(HA.to_string())));
    assert_eq!(s, before);
    assert!(matches!(
        s.ownership(&op(HA, HB, 1), Checks::REPLAY),
        Err(OwnershipError::StaleEpoch { .. })
    ));
    // From `Fenced` too (a fence recorded before).
    let mut g = owned_by_a();
    fenced_a_to_b(&mut g, 2);
    let mut s = g.lu.pr_state().clone();
    s.ownership(&op(HA, HB, 2), Checks::REPLAY).unwrap();
    assert_eq!(s.owner(), Some(HB));
}

/// A write of the new owner that overlaps a write of the source still in flight after the
/// commit aborted it waits until that write has ended (it never lands after the new one);
/// a write elsewhere starts at once.
#[test]
fn a_write_over_an_aborted_write_in_flight_waits_for_it() {
    let mut f = owned_by_a();
    let w = start_write(&mut f, A);
    f.lu.handover_prepare(HA, HB, 2).unwrap();
    f.lu.handover_fence(HA, 2).unwrap();
    let c = commit(&mut f, |lu| lu.handover_commit(HA, HB, 2));
    assert!(c.abort.is_some());
    while f.ua(B).is_some() {}
    let over = match f.lu.execute(B, &WRITE10, Bytes::from(vec![1u8; 512])) {
        Step::Wait(cont) => cont,
        other => panic!("the overlapping write did not wait: {other:?}"),
    };
    let elsewhere = [0x2A, 0, 0, 0, 0, 8, 0, 0, 1, 0];
    let Step::Io(_, other) = f.lu.execute(B, &elsewhere, Bytes::from(vec![2u8; 512])) else {
        panic!("a write elsewhere waited");
    };
    assert_eq!(f.lu.waiting_tasks(), 1);
    assert!(!f.lu.take_wakeup());
    assert_eq!(finish(&mut f, A, w).status, status::TASK_ABORTED);
    assert!(
        f.lu.take_wakeup(),
        "the aborted write's end wakes the waiter"
    );
    let Step::Io(_, over) = f.lu.proceed(B, over) else {
        panic!("the waiting write did not start");
    };
    assert_eq!(finish(&mut f, B, over).status, GOOD);
    assert_eq!(finish(&mut f, B, other).status, GOOD);
    assert_eq!(f.lu.waiting_tasks(), 0);
}

#[test]
fn commit_is_idempotent_for_its_epoch_and_refuses_stale_ones() {
    let mut f = owned_by_a();
    assert!(matches!(
        f.lu.handover_commit(HA, HB, 2),
        Err(OwnershipError::NotFenced(_))
    ));
    fenced_a_to_b(&mut f, 2);
    assert!(matches!(
        f.lu.handover_commit(HA, HC, 2),
        Err(OwnershipError::HandoverInProgress(_))
    ));
    commit(&mut f, |lu| lu.handover_commit(HA, HB, 2));
    assert_eq!(f.uas(A), vec![(0x2A, 0x05)]);
    let snap = f.lu.pr_snapshot();
    let retry = commit(&mut f, |lu| lu.handover_commit(HA, HB, 2));
    assert_eq!(retry.abort, None);
    assert_eq!(f.lu.pr_snapshot(), snap, "no change");
    assert_eq!(f.uas(A), vec![], "no second unit attention");
    assert!(matches!(
        f.lu.handover_commit(HA, HB, 1),
        Err(OwnershipError::StaleEpoch {
            epoch: 1,
            current: 2
        })
    ));
    assert!(matches!(
        f.lu.handover_commit(HC, HA, 2),
        Err(OwnershipError::StaleEpoch { .. })
    ));
    assert_eq!(
        f.lu.handover_prepare(HA, HB, 2).unwrap_err(),
        OwnershipError::AlreadyCommitted(2)
    );
    assert_eq!(f.lu.pr_snapshot(), snap);
}

#[test]
fn abort_before_commit_restores_the_source_as_only_writer() {
    let mut f = owned_by_a();
    fenced_a_to_b(&mut f, 2);
    assert_eq!(f.write(A), CONFLICT);
    assert!(matches!(
        f.lu.handover_abort(HA, HC, 2),
        Err(OwnershipError::HandoverInProgress(_))
    ));
    f.lu.handover_abort(HA, HB, 2).unwrap();
    assert_eq!(f.lu.pr_snapshot().handover, Handover::Idle);
    assert_eq!(f.write(A), GOOD);
    assert_eq!(f.write(A2), GOOD);
    assert_eq!(f.write(B), CONFLICT);
    f.lu.handover_abort(HA, HB, 2).unwrap();
    // A new attempt with a newer epoch, committed: now abort is too late.
    fenced_a_to_b(&mut f, 3);
    commit(&mut f, |lu| lu.handover_commit(HA, HB, 3));
    assert_eq!(
        f.lu.handover_abort(HA, HB, 3).unwrap_err(),
        OwnershipError::AlreadyCommitted(3)
    );
}

#[test]
fn owner_and_epoch_survive_a_restart() {
    let mut f = owned_by_a();
    fenced_a_to_b(&mut f, 7);
    commit(&mut f, |lu| lu.handover_commit(HA, HB, 7));
    let bytes = written_state(&f);
    let text = String::from_utf8(bytes.clone()).unwrap();
    assert!(text.contains("\nownership 7 iqn.test:b\n"), "{text}");
    assert!(text.contains("\naptpl 0\n"), "{text}");
    let mut g = LogicalUnit::new(super::tests::config());
    g.restore_pr(&bytes).unwrap();
    let (s, t) = (f.lu.pr_snapshot(), g.pr_snapshot());
    assert_eq!(
        (t.owner, t.epoch, t.generation),
        (s.owner, s.epoch, s.generation)
    );
    assert_eq!(t.registrations, s.registrations);
    let mut g = F {
        lu: g,
        last_persist: None,
    };
    for n in [A, B] {
        g.lu.add_nexus(n, it(n));
    }
    assert_eq!(g.write(B), GOOD);
    assert_eq!(g.write(A), CONFLICT);
    assert!(matches!(
        g.lu.handover_commit(HA, HB, 6),
        Err(OwnershipError::StaleEpoch { .. })
    ));
}

#[test]
fn old_state_files_restore_without_owner() {
    let mut f = F::new();
    f.out(A, sa::REGISTER, 0, 0, 0x11, 0x01);
    let bytes = written_state(&f);
    assert!(!String::from_utf8(bytes.clone())
        .unwrap()
        .contains("ownership"));
    let mut g = LogicalUnit::new(super::tests::config());
    g.restore_pr(&bytes).unwrap();
    let s = g.pr_snapshot();
    assert_eq!((s.owner, s.epoch, s.registrations.len()), (None, 0, 1));
}

#[test]
fn ownership_file_keeps_only_the_owner_without_aptpl_and_is_never_removed() {
    let mut f = owned_by_a();
    commit(&mut f, |lu| lu.clear_owner(HA, 2));
    // APTPL on, then off: the file keeps the epoch instead of being removed.
    f.out(B, sa::REGISTER, 0, 0, 0x22, 0x01);
    assert!(String::from_utf8(written_state(&f))
        .unwrap()
        .contains("registration 0000000000000022"));
    f.out(B, sa::REGISTER, 0, 0x22, 0x23, 0x00);
    let text = String::from_utf8(written_state(&f)).unwrap();
    assert!(text.contains("\nownership 2 -\n"), "{text}");
    assert!(!text.contains("registration"), "{text}");
}

#[test]
fn without_ptpl_capable_nothing_is_persisted() {
    let mut c = super::tests::config();
    c.ptpl_capable = false;
    let mut lu = LogicalUnit::new(c);
    lu.add_nexus(A, it(A));
    let c = lu.set_owner(HA, 1).unwrap();
    assert_eq!(c.persist, None);
    assert_eq!(lu.pr_snapshot().owner.as_deref(), Some(HA));
}

// ---- proptest: at most one host can write while the LU is owned ----

#[derive(Debug, Clone)]
enum Op {
    Login(usize, u8),
    Logout(usize, u8),
    SetOwner(usize, u64),
    Prepare(usize, usize, u64),
    Fence(usize, u64),
    Commit(usize, usize, u64),
    Abort(usize, usize, u64),
    AbortInflight(usize),
    /// Failover from `.0` to `.1` at `.2`, forced if `.3`.
    Failover(usize, usize, u64, bool),
    StartWrite(usize, u8),
    FinishWrite(usize),
    /// A handover step from the current owner to host `.0` (biases towards real handovers):
    /// 0 prepare, 1 fence, 2 commit, 3 abort, 4 abort in-flight tasks; see its use.
    OwnerStep(usize, u64, u8),
}

const HOSTS: [&str; 3] = [HA, HB, HC];

fn op() -> impl Strategy<Value = Op> {
    let h = 0..3usize;
    let e = 0..8u64;
    prop_oneof![
        1 => (h.clone(), 0..3u8).prop_map(|(h, i)| Op::Login(h, i)),
        1 => (h.clone(), 0..3u8).prop_map(|(h, i)| Op::Logout(h, i)),
        1 => (h.clone(), e.clone()).prop_map(|(h, e)| Op::SetOwner(h, e)),
        1 => (h.clone(), h.clone(), e.clone()).prop_map(|(a, b, e)| Op::Prepare(a, b, e)),
        1 => (h.clone(), e.clone()).prop_map(|(a, e)| Op::Fence(a, e)),
        1 => (h.clone(), h.clone(), e.clone()).prop_map(|(a, b, e)| Op::Commit(a, b, e)),
        1 => (h.clone(), h.clone(), e.clone()).prop_map(|(a, b, e)| Op::Abort(a, b, e)),
        1 => h.clone().prop_map(Op::AbortInflight),
        1 => (h.clone(), h.clone(), e, any::<bool>())
            .prop_map(|(a, b, e, f)| Op::Failover(a, b, e, f)),
        3 => (h, 0..3u8).prop_map(|(h, i)| Op::StartWrite(h, i)),
        1 => (0..8usize).prop_map(Op::FinishWrite),
        8 => (0..3usize, 0..8u64, 0..5u8).prop_map(|(b, e, k)| Op::OwnerStep(b, e, k)),
    ]
}

fn nexus(host: usize, isid: u8) -> NexusId {
    (host as u64) * 10 + u64::from(isid) + 100
}

fn login(lu: &mut LogicalUnit, host: usize, isid: u8) {
    let id = nexus(host, isid);
    lu.add_nexus(
        id,
        ItNexus {
            initiator: InitiatorPort::new(HOSTS[host], [0x80, 0, 0, 0, 0, isid]),
            rtpi: 1 + u16::from(isid % 2),
        },
    );
}

/// Run `cdb` from `n` to completion after clearing its unit attentions.
fn probe_write(lu: &mut LogicalUnit, n: NexusId) -> u8 {
    loop {
        let s = match lu.execute(n, &WRITE10, Bytes::from(vec![0u8; 512])) {
            Step::Done(c) => c.status,
            Step::Io(_, cont) => match lu.resume(n, cont, IoResult::Done) {
                Step::Done(c) => c.status,
                other => panic!("{other:?}"),
            },
            // Waits behind an aborted write still in flight: it would write once that ends.
            Step::Wait(cont) => {
                lu.abandon(cont);
                status::GOOD
            }
            Step::PrCommit(_) | Step::Replicate(_) => panic!("a write made a PR commit"),
        };
        if s != status::CHECK_CONDITION {
            return s;
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn never_two_writers(ops in proptest::collection::vec(op(), 1..60)) {
        let mut lu = LogicalUnit::new(super::tests::config());
        login(&mut lu, 0, 0);
        login(&mut lu, 1, 0);
        lu.set_owner(HA, 1).unwrap();
        let mut online: std::collections::BTreeSet<(usize, u8)> = [(0, 0), (1, 0)].into();
        // In-flight writes: (host, nexus, continuation).
        let mut inflight: Vec<(usize, NexusId, Continuation)> = Vec::new();
        let mut commits = 0u32;
        for op in ops {
            match op {
                Op::Login(h, i) => { login(&mut lu, h, i); online.insert((h, i)); }
                Op::Logout(h, i) => { lu.remove_nexus(nexus(h, i)); online.remove(&(h, i)); }
                Op::SetOwner(h, e) => { let _ = lu.set_owner(HOSTS[h], e); }
                Op::Prepare(a, b, e) => { let _ = lu.handover_prepare(HOSTS[a], HOSTS[b], e); }
                Op::Fence(a, e) => { let _ = lu.handover_fence(HOSTS[a], e); }
                Op::Commit(a, b, e) => { let _ = lu.handover_commit(HOSTS[a], HOSTS[b], e); }
                Op::Abort(a, b, e) => { let _ = lu.handover_abort(HOSTS[a], HOSTS[b], e); }
                Op::AbortInflight(a) => { let _ = lu.handover_abort_inflight(HOSTS[a]); }
                Op::Failover(a, b, e, f) => { let _ = lu.failover(HOSTS[a], HOSTS[b], e, f); }
                Op::StartWrite(h, i) => {
                    if online.contains(&(h, i)) {
                        let n = nexus(h, i);
                        while lu.pending_unit_attention(n).is_some() {
                            let _ = lu.execute(n, &[0, 0, 0, 0, 0, 0], Bytes::new());
                        }
                        if let Step::Io(_, cont) =
                            lu.execute(n, &WRITE10, Bytes::from(vec![0u8; 512]))
                        {
                            inflight.push((h, n, cont));
                        }
                    }
                }
                Op::OwnerStep(b, e, k) => {
                    // Mostly the arguments of the handover in progress (or a fresh epoch),
                    // sometimes (e == 0) random ones.
                    let snap = lu.pr_snapshot();
                    let from = snap.owner.clone().unwrap_or_default();
                    let (to, epoch) = match snap.handover.parts() {
                        Some((_, t, ep)) if e != 0 => (t.to_string(), ep),
                        _ => (HOSTS[b].to_string(), snap.epoch + e % 3),
                    };
                    // Mostly the next step of the handover; k picks among commit, abort and
                    // abort in-flight once fenced.
                    let k = match (&snap.handover, e) {
                        (_, 0) => k,
                        (Handover::Idle, _) => 0,
                        (Handover::Prepared { .. }, _) => 1,
                        (Handover::Fenced { .. }, _) => [2, 2, 3, 4, 2][usize::from(k)],
                    };
                    let r = match k {
                        0 => lu.handover_prepare(&from, &to, epoch).map(|_| ()),
                        1 => lu.handover_fence(&from, epoch).map(|_| ()),
                        2 => lu.handover_commit(&from, &to, epoch).map(|_| ()),
                        3 => lu.handover_abort(&from, &to, epoch),
                        _ => lu.handover_abort_inflight(&from).map(|_| ()),
                    };
                    if k == 2 && r.is_ok() && from != to {
                        commits += 1;
                    }
                }
                Op::FinishWrite(k) => {
                    if !inflight.is_empty() {
                        let (h, n, cont) = inflight.remove(k % inflight.len());
                        let Step::Done(c) = lu.resume(n, cont, IoResult::Done) else {
                            panic!("write did not finish");
                        };
                        // A write lands only while its host still owns the LU.
                        if c.status == GOOD {
                            let owner = lu.pr_snapshot().owner;
                            prop_assert_eq!(owner.as_deref(), Some(HOSTS[h]));
                        }
                    }
                }
            }
            let snap = lu.pr_snapshot();
            let owner = snap.owner.clone();
            prop_assert!(owner.is_some(), "ownership never ends without clear_owner");
            let mut writers = std::collections::BTreeSet::new();
            for &(h, i) in &online {
                if probe_write(&mut lu, nexus(h, i)) == GOOD {
                    writers.insert(HOSTS[h]);
                }
            }
            prop_assert!(writers.len() <= 1, "writers {:?} in {:?}", writers, snap);
            if let Some(w) = writers.first() {
                prop_assert_eq!(Some(*w), owner.as_deref());
                prop_assert_ne!(snap.handover.fenced(), Some(*w), "a fenced host wrote");
            }
            // Every registration belongs to the owner (no second registrant under WERO).
            prop_assert!(snap.registrations.iter().all(|r| Some(r.initiator_port.as_str()) == owner.as_deref()));
        }
        if std::env::var_os("OWNERSHIP_PROPTEST_STATS").is_some() {
            eprintln!("commits {commits}");
        }
    }
}

#[test]
fn failover_aborts_the_failed_owners_writes_and_makes_the_survivor_owner() {
    let mut f = owned_by_a();
    let w = start_write(&mut f, A);
    assert_eq!(
        f.lu.failover(HA, HB, 2, false).unwrap_err(),
        OwnershipError::SourceLoggedIn(HA.into()),
        "A still has sessions"
    );
    let c = commit(&mut f, |lu| lu.failover("IQN.TEST:A", HB, 2, true));
    let t = c.abort.expect("A's write is aborted");
    assert!(!f.lu.abort_drained(t), "not drained while A's write runs");
    assert_eq!(finish(&mut f, A, w).status, status::TASK_ABORTED);
    assert!(f.lu.abort_drained(t));
    assert_eq!(f.uas(A), vec![(0x2A, 0x05)]);
    assert_eq!(f.uas(A2), vec![(0x2A, 0x05)]);
    assert_eq!(f.uas(B), vec![]);
    assert_eq!(f.write(B), GOOD);
    for n in [A, A2, C] {
        assert_eq!(f.write(n), CONFLICT, "nexus {n}");
    }
    let s = f.lu.pr_snapshot();
    assert_eq!((s.owner.as_deref(), s.epoch), (Some(HB), 2));
    assert_eq!(f.keys().1, vec![owner_key(HB)]);
    assert!(!written_state(&f).is_empty());
    // The same decision again changes nothing; another one at that epoch is stale.
    let again = commit(&mut f, |lu| lu.failover(HA, HB, 2, true));
    assert_eq!(again.abort, None);
    assert_eq!(f.lu.pr_snapshot().generation, s.generation);
    assert!(matches!(
        f.lu.failover(HA, HC, 2, true),
        Err(OwnershipError::StaleEpoch { .. })
    ));
    assert_eq!(
        f.lu.failover(HB, HB, 3, true).unwrap_err(),
        OwnershipError::SameHost
    );
}

#[test]
fn failover_needs_no_force_once_the_failed_host_is_gone() {
    let mut f = owned_by_a();
    f.lu.remove_nexus(A);
    assert_eq!(
        f.lu.failover(HA, HB, 2, false).unwrap_err(),
        OwnershipError::SourceLoggedIn(HA.into()),
        "A2 is still logged in"
    );
    f.lu.remove_nexus(A2);
    let c = commit(&mut f, |lu| lu.failover(HA, HB, 2, false));
    assert_eq!(c.abort, None, "nothing of A's was running");
    assert_eq!(f.lu.pr_snapshot().owner.as_deref(), Some(HB));
    // An owner other than the failed host and the survivor is refused.
    assert!(matches!(
        f.lu.failover(HC, HA, 3, true),
        Err(OwnershipError::NotOwner { .. })
    ));
}

#[test]
fn failover_of_an_initiator_managed_lu_removes_the_failed_hosts_keys() {
    let mut f = F::new();
    f.reg(A, 0xA1);
    f.reg(A2, 0xA1);
    f.reg(B, 0xB1);
    let wc = start_write(&mut f, C);
    let c = commit(&mut f, |lu| lu.failover(HA, HB, 1, true));
    assert_eq!(f.keys().1, vec![owner_key(HB)]);
    assert_eq!(f.uas(A), vec![(0x2A, 0x05)]);
    let t = c
        .abort
        .expect("anyone could write an unowned LU: C's write is aborted");
    assert_eq!(finish(&mut f, C, wc).status, status::TASK_ABORTED);
    assert!(f.lu.abort_drained(t));
    // A third host's registration is not ours to remove.
    let mut g = F::new();
    g.reg(A, 0xA1);
    g.reg(C, 0xC1);
    assert_eq!(
        g.lu.failover(HA, HB, 1, true).unwrap_err(),
        OwnershipError::ForeignRegistrations(vec![HC.into()])
    );
}

#[test]
fn failover_supersedes_a_handover_away_from_the_failed_host_only() {
    let mut f = owned_by_a();
    fenced_a_to_b(&mut f, 2);
    assert!(matches!(
        f.lu.failover(HB, HC, 3, true),
        Err(OwnershipError::HandoverInProgress(_))
    ));
    commit(&mut f, |lu| lu.failover(HA, HC, 3, true));
    let s = f.lu.pr_snapshot();
    assert_eq!((s.owner.as_deref(), s.epoch), (Some(HC), 3));
    assert_eq!(s.handover, Handover::Idle);
    assert_eq!(
        f.write(A),
        CONFLICT,
        "the fence is gone, and so is A's registration"
    );
    assert_eq!(f.write(C), GOOD);
}
