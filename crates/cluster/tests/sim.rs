//! Scripted scenarios (scale-out.md §5 S1, S4, S6, a kill, a restart) and the seeded sweep
//! with its negative controls, over `ironlun_cluster::sim`.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

use ironlun_cluster::gateway::Answer;
use ironlun_cluster::kv::{Change, Key};
use ironlun_cluster::lease::{LeaseSettings, Timing};
use ironlun_cluster::sim::{sweep, sweep_with, SimConfig, Workload, World, A, B, C};
use ironlun_cluster::{GatewayId, Time};
use ironlun_scsi::sense::SenseReason;
use std::time::Duration;

fn ms(v: u64) -> Time {
    Time::from_micros(v * 1000)
}

fn timing() -> Timing {
    Timing::new(LeaseSettings::default()).unwrap()
}

fn run(seed: u64, cfg: SimConfig) -> World {
    let mut w = World::new(seed, cfg);
    w.run();
    assert!(w.violations.is_empty(), "seed {seed}: {:#?}", w.violations);
    w
}

#[test]
fn s1_preempt_and_abort_waits_for_a_to_drain() {
    let mut cfg = SimConfig::quiet(timing());
    cfg.write_latency_max = Duration::from_millis(400);
    let w = run(1, cfg);
    assert!(
        w.answers().iter().all(|a| *a == Some(Answer::Good)),
        "{:?}",
        w.answers()
    );
    let good = w.preempt_good.unwrap();
    // A aborted H1's writes and its drain (last aborted write landing) preceded C's GOOD.
    let (_, rev, drained) = *w.aborts.iter().find(|(g, _, _)| *g == A).unwrap();
    assert!(
        drained <= good && drained > ms(2000),
        "drained {drained:?} good {good:?}"
    );
    assert!(w.landed.iter().all(|(t, _)| *t <= good));
    // 2Ah/05h for H1's ALL_TG_PT registration on every gateway, never for H2.
    for g in [A, B, C] {
        assert!(
            w.uas
                .contains(&(g, 0x1111, SenseReason::RegistrationsPreempted)),
            "no UA on {g}"
        );
    }
    assert!(w.uas.iter().all(|(_, key, _)| *key == 0x1111));
    // Replicas agree everywhere.
    let gen = w.gateway(A).state().generation();
    for g in [B, C] {
        assert_eq!(w.gateway(g).pr_revision(), rev);
        assert_eq!(w.gateway(g).state().generation(), gen);
    }
    assert!(w.stats.conflicts > 0 && w.stats.landed > 10);
}

#[test]
fn s4_partitioned_a_delays_the_good_until_its_delete_plus_delta() {
    let mut cfg = SimConfig::quiet(timing());
    cfg.faults.partitions.push((A, ms(1500), ms(60_000)));
    cfg.faults.skew_ppm = [-10_000, 0, 10_000];
    let w = run(4, cfg);
    let good = w.preempt_good.unwrap();
    let fenced = w.fenced_at[A].unwrap();
    // A fenced before its lease could expire; C answered only after the DELETE + Δ.
    let gone_a = |e: &ironlun_cluster::kv::Event| {
        e.key == Key::Member(GatewayId(0)) && e.change == Change::Delete
    };
    let delete =
        w.kv.history()
            .iter()
            .find(|(_, e)| gone_a(e))
            .map(|(t, _)| *t)
            .unwrap();
    assert!(fenced < delete, "fenced {fenced:?} delete {delete:?}");
    assert!(
        good.as_micros() >= delete.as_micros() + 2_000_000,
        "good {good:?} delete {delete:?}"
    );
    assert!(w.landed.iter().all(|(t, _)| *t <= good));
    assert!(w.stats.fenced_writes > 0);
    assert!(w.gateway(A).is_fenced());
}

#[test]
fn killed_gateway_is_waited_for_then_recorded_gone() {
    let mut cfg = SimConfig::quiet(timing());
    cfg.faults.kills.push((B, ms(1000)));
    let w = run(7, cfg);
    let good = w.preempt_good.unwrap();
    assert!(
        good > ms(6000 + 2000),
        "GOOD at {good:?} before B's expiry + Δ"
    );
    // The lowest-id survivor (A) recorded B's departure in the log.
    let gone = w.kv.history().iter().any(|(_, e)| {
        matches!(&e.change, ironlun_cluster::kv::Change::Put { value: ironlun_cluster::kv::Value::Record(r), .. }
            if r.op == ironlun_cluster::op::Op::GatewayGone { gateway: ironlun_cluster::GatewayId(1) })
    });
    assert!(gone);
}

#[test]
fn s6_stall_past_the_deadline_submits_nothing_after_resume() {
    let mut cfg = SimConfig::quiet(timing());
    cfg.faults.stalls.push((A, ms(1200), ms(11_200)));
    cfg.preempt_at = ms(3000);
    let w = run(6, cfg);
    // Writes issued during the stall are refused after resume: nothing lands after it
    // except what was submitted before the stall.
    let budget = timing().in_flight_budget();
    assert!(w
        .landed
        .iter()
        .all(|(t, _)| *t <= ms(1200).saturating_add(budget)));
    assert!(w.stats.fenced_writes > 0);
    assert!(w.preempt_good.is_some());
}

#[test]
fn sweep_of_seeded_faults_finds_no_violation() {
    let (violations, stats) = sweep(0..2000, timing());
    println!("2000 seeds: {stats:?}");
    assert!(
        violations.is_empty(),
        "{:#?}",
        &violations[..violations.len().min(10)]
    );
    assert!(stats.committed_goods > 4000 && stats.fences > 0 && stats.checks > 100_000);
}

#[test]
fn negative_control_zero_margins_are_caught() {
    let zero = LeaseSettings {
        rho_ppm: 0,
        margin: Duration::ZERO,
        lock_delay: Duration::ZERO,
        ..LeaseSettings::default()
    };
    let timing = Timing::unchecked(zero);
    let mut found = Vec::new();
    for seed in 0..400 {
        let mut cfg = SimConfig::random(seed, timing);
        cfg.write_latency_max = Duration::from_millis(400);
        cfg.faults.partitions = vec![(A, ms(1000), ms(60_000))];
        let mut w = World::new(seed, cfg);
        w.run();
        found.extend(w.violations.iter().cloned());
    }
    println!(
        "negative control: {} violations, first: {:?}",
        found.len(),
        found.first()
    );
    assert!(
        found.iter().any(|v| v.contains("I3")),
        "the checker saw no violation"
    );
}

#[test]
fn negative_control_latency_beyond_the_budget_is_caught() {
    let mut found = 0;
    for seed in 0..200 {
        let mut cfg = SimConfig::random(seed, timing());
        cfg.write_latency_max = Duration::from_millis(6000);
        cfg.faults.partitions = vec![(A, ms(1000), ms(60_000))];
        let mut w = World::new(seed, cfg);
        w.run();
        found += w.violations.len();
    }
    assert!(found > 0);
}

/// A writer gateway cut off from the store keeps writing until its deadline, dies just
/// before it and is restarted at once: its new incarnation joins as soon as the old lease has
/// expired. The old incarnation's last writes can land up to Δ after that expiry, so the
/// newcomer's acknowledgements must not let a PREEMPT AND ABORT through C complete before
/// then (`Gateway::join` withholds them for Δ(1+ρ)). I2/I3 would report such a write.
#[test]
fn a_restarted_gateway_does_not_shorten_the_wait_for_its_old_incarnations_writes() {
    let mut cfg = SimConfig::quiet(timing());
    // A: last renewal sent at 0 (the next, at 1 s, is lost), deadline 4.45 s.
    cfg.faults.partitions.push((A, ms(999), ms(4400)));
    cfg.faults.kills.push((A, ms(4400)));
    cfg.faults.restarts.push((A, ms(4400)));
    cfg.preempt_at = ms(5600);
    cfg.end = ms(20_000);
    let w = run(11, cfg);
    assert_eq!(w.stats.restarts, 1, "A did not restart");
    let good = w.preempt_good.expect("PREEMPT AND ABORT answered");
    let last = w.landed.iter().map(|(t, _)| *t).max().unwrap();
    assert!(
        last > ms(5000),
        "no write of the old A landed after its lease expired: {last:?}"
    );
    assert!(
        good > last,
        "GOOD at {good:?}, a write of A landed at {last:?}"
    );
}

/// Every gateway's replica: H2 owns the LU at epoch 2, no handover in progress.
fn owned_by_h2_everywhere(w: &World) {
    for g in [A, B, C] {
        let s = w.gateway(g).state();
        assert_eq!(
            (s.owner(), s.epoch()),
            (Some("iqn.2026-01.test:h2"), 2),
            "gateway {g}"
        );
        assert!(s.handover().parts().is_none(), "gateway {g}");
    }
}

/// A handover from owner H1 (writing through A) to H2, taken through C (scale-out.md §2.7):
/// every step is answered GOOD; the commit's GOOD comes only after A drained H1's writes, none
/// lands later (I3); H2 owns the LU on every replica, H1's registration got 2Ah/05h.
#[test]
fn handover_through_c_waits_for_a_to_drain_the_source() {
    let mut cfg = SimConfig::quiet(timing());
    cfg.workload = Workload::Handover;
    cfg.write_latency_max = Duration::from_millis(400);
    let w = run(3, cfg);
    assert!(
        w.answers().iter().all(|a| *a == Some(Answer::Good)),
        "{:?}",
        w.answers()
    );
    let good = w.preempt_good.unwrap();
    assert!(good > ms(2000), "commit GOOD at {good:?}");
    assert!(w.landed.iter().all(|(t, _)| *t <= good));
    assert!(
        w.stats.landed > 10 && w.stats.conflicts > 0,
        "{:?}",
        w.stats
    );
    owned_by_h2_everywhere(&w);
    // The fence's drain and the commit's abort, reported by every gateway.
    assert!(w.aborts.iter().filter(|(g, _, _)| *g == A).count() >= 2);
    assert!(w
        .uas
        .iter()
        .any(|(_, _, r)| *r == SenseReason::RegistrationsPreempted));
}

/// 1000 seeded runs of `workload` with faults: no violation, and at least `goods` GOODs
/// that needed the store.
fn clean_sweep(workload: Workload, goods: u64) {
    let (violations, stats) = sweep_with(0..1000, timing(), workload);
    println!("1000 {workload:?} seeds: {stats:?}");
    assert!(
        violations.is_empty(),
        "{:#?}",
        &violations[..violations.len().min(10)]
    );
    assert!(
        stats.committed_goods > goods && stats.landed > 10_000,
        "{stats:?}"
    );
}

#[test]
fn handover_sweep_of_seeded_faults_finds_no_violation() {
    clean_sweep(Workload::Handover, 2000);
}

/// The one-record handover (prepare, then switch through C): the switch's GOOD comes only
/// after A drained H1's writes, none lands later (I3), every replica ends with H2 as owner.
#[test]
fn switch_through_c_waits_for_a_to_drain_the_source() {
    let mut cfg = SimConfig::quiet(timing());
    cfg.workload = Workload::Switch;
    cfg.write_latency_max = Duration::from_millis(400);
    let w = run(3, cfg);
    assert_eq!(w.answers().len(), 3);
    assert!(
        w.answers().iter().all(|a| *a == Some(Answer::Good)),
        "{:?}",
        w.answers()
    );
    let good = w.preempt_good.unwrap();
    assert!(w.landed.iter().all(|(t, _)| *t <= good));
    assert!(w.stats.landed > 10, "{:?}", w.stats);
    owned_by_h2_everywhere(&w);
    // The switch's abort, drained by A (where H1 writes).
    assert!(w.aborts.iter().any(|(g, _, _)| *g == A));
}

#[test]
fn switch_sweep_of_seeded_faults_finds_no_violation() {
    clean_sweep(Workload::Switch, 1500);
}

/// Negative control: gateways that report an abort drained before the aborted writes land
/// let the commit's GOOD come too early, and I3 sees H1's late writes.
#[test]
fn negative_control_an_early_drain_report_is_caught_in_a_handover() {
    let mut found = Vec::new();
    for seed in 0..100 {
        let mut cfg = SimConfig::random(seed, timing());
        cfg.workload = if seed % 2 == 0 {
            Workload::Handover
        } else {
            Workload::Switch
        };
        cfg.broken_abort_drain = true;
        cfg.write_latency_max = Duration::from_millis(400);
        let mut w = World::new(seed, cfg);
        w.run();
        found.extend(w.violations.iter().cloned());
    }
    println!(
        "negative control: {} violations, first: {:?}",
        found.len(),
        found.first()
    );
    assert!(
        found.iter().any(|v| v.contains("I3")),
        "the checker saw no violation"
    );
}
