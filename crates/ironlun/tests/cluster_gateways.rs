//! Cluster mode end to end (issue 18, acceptance 1 and 3): three real etcd members and three
//! `ironlun serve` gateways on loopback (gw-a, gw-b, gw-c: TPGTs 1, 2, 3) serving one LUN on
//! one shared image (uring, `O_DIRECT`), driven by our own initiator.
//!
//! - Registrations through A, the reservation through B, PREEMPT AND ABORT through C while
//!   the victim's writes are in flight on A: GOOD only after A drained them, none of them
//!   lands later (read back), the victim's nexus on B gets REGISTRATIONS
//!   PREEMPTED from B itself, the preemptor's none, and every gateway reports the same state
//!   (READ FULL STATUS with the relative target port of each registration).
//! - A gateway cut off from etcd (its proxy black-holed) stops submitting writes: NOT READY,
//!   ASYMMETRIC ACCESS STATE TRANSITION, from its deadline on, and a write it refuses is not
//!   on the medium; another takes over as the active gateway once its lease is gone plus Δ.
//!   Healed, it rejoins from a snapshot. An etcd follower lost: nothing visible changes. Two
//!   of three members lost: every gateway fences, none fails open; back, they serve again.
//! - ALUA: one active/optimized gateway per LU, the others standby (media access NOT READY
//!   04/0B, PR commands pass), the same RTPG through every gateway; moved by
//!   `ironlun ctl cluster move`, and by the lowest live gateway when the active one dies.
//! - Restarts: a gateway restarted right after `kill -9` waits for its old lease, then joins
//!   with the state; every gateway restarted: the state is kept. A replica whose watch falls
//!   behind a compaction joins anew from a snapshot.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::cast_possible_truncation
)]

use bytes::Bytes;
use ironlun_initiator::pr;
use ironlun_initiator::{CommandResult, SenseKey, Session};
use ironlun_testkit::preempt::{preempt_ua, Victims, PREEMPTOR};
use ironlun_testkit::{wait_rtpg, Daemon, EtcdCluster, Gateways, Proxy, AO, PROMPT, STANDBY};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const IRONLUN: &str = env!("CARGO_BIN_EXE_ironlun");
const TARGET: &str = "iqn.2026-11.io.ironlun:cluster";
const LUN0: u64 = 0;
const BS: u32 = 512;

const INIT_V: &str = "iqn.2026-11.io.ironlun:victim";
const INIT_P: &str = "iqn.2026-11.io.ironlun:preemptor";
const ISID_V: [u8; 6] = [0x80, 0x49, 0x4c, 0x4e, 0x00, 0x0a];
const ISID_P: [u8; 6] = [0x80, 0x49, 0x4c, 0x4e, 0x00, 0x0b];

const GOOD: u8 = 0x00;
const CHECK_CONDITION: u8 = 0x02;

const REGISTER: u8 = 0x00;
const RESERVE: u8 = 0x01;
const PREEMPT_AND_ABORT: u8 = 0x05;
const ALL_TG_PT: u8 = 0x04;
/// Write Exclusive – Registrants Only.
const WERO: u8 = 5;

fn gateways<'a>(image: &'a std::path::Path, cluster: &'a str, extra: &'a str) -> Gateways<'a> {
    Gateways {
        n: 3,
        target: TARGET,
        image,
        size: "64MiB",
        cluster,
        extra,
    }
}

fn builder() -> ironlun_testkit::DaemonBuilder {
    Daemon::builder(IRONLUN).env("RUST_LOG", "info,ironlun::cluster=debug")
}

/// Log in to LUN 0 of the cluster's target and clear the new nexus's unit attentions.
async fn login(addr: SocketAddr, name: &str, isid: [u8; 6]) -> Session {
    ironlun_testkit::login_cleared(addr, TARGET, name, isid).await
}

async fn past_ua(s: &Session, cdb: &[u8], data: Bytes, alloc: u32) -> CommandResult {
    ironlun_testkit::past_ua(s, LUN0, cdb, data, alloc).await.0
}

async fn prout(s: &Session, sa: u8, ty: u8, rk: u64, sark: u64, flags: u8) -> CommandResult {
    let mut p = pr::OutParams::keys(rk, sark).encode();
    p[20] = flags;
    let mut cdb = pr::out_cdb(pr::OutAction::Register, ty, 24);
    cdb[1] = sa;
    past_ua(s, &cdb, Bytes::from(p), 0).await
}

async fn prout_good(s: &Session, sa: u8, ty: u8, rk: u64, sark: u64, flags: u8) {
    let r = prout(s, sa, ty, rk, sark, flags).await;
    assert_eq!(
        (r.response, r.status),
        (0, GOOD),
        "PR OUT sa {sa:#x} type {ty}: sense {:?}",
        r.sense_key()
    );
}

// ---------------------------------------------------------------------------------------------
// PREEMPT AND ABORT across gateways

/// Victim writers on A, each overwriting its own 64 KiB chunk.
const VICTIMS: Victims = Victims {
    writers: 16,
    chunk_blocks: 128,
    magic: b"CLTAG\0\0\x01",
};

/// Generation and (key, relative target port or ALL_TG_PT) of every registration, and the
/// reservation's key and type, as READ FULL STATUS reports them.
async fn full_status(s: &Session) -> (u32, Vec<(u64, bool, u16)>, Option<(u64, u8)>) {
    let cdb = pr::in_cdb(pr::InAction::ReadFullStatus, 8192);
    let r = past_ua(s, &cdb, Bytes::new(), 8192).await;
    assert_eq!(r.status, GOOD, "READ FULL STATUS: {:?}", r.sense_key());
    let f = pr::FullStatus::parse(&r.data).expect("READ FULL STATUS parses");
    let mut regs: Vec<(u64, bool, u16)> = f
        .descriptors
        .iter()
        .map(|d| (d.key, d.all_tg_pt, d.rtpi))
        .collect();
    regs.sort_unstable();
    let res = f
        .descriptors
        .iter()
        .find(|d| d.holder)
        .map(|d| (d.key, d.kind));
    (f.generation, regs, res)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preempt_and_abort_through_c_drains_the_writes_in_flight_on_a() {
    const KV: u64 = 0x7600_0000_0000_0001;
    const KP: u64 = 0x5000_0000_0000_0002;
    let etcd = EtcdCluster::start(3);
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("lun0.img");
    let gws = gateways(&image, "s1", "").start(builder, &etcd);
    let (a, b, c) = (gws[0].addrs[0], gws[1].addrs[0], gws[2].addrs[0]);

    let victim_a = login(a, INIT_V, ISID_V).await;
    let victim_b = login(b, INIT_V, ISID_V).await;
    let preemptor_c = login(c, INIT_P, ISID_P).await;
    // Registrations through A (for every port of the cluster), the reservation through B.
    let preemptor_a = login(a, INIT_P, ISID_P).await;
    prout_good(&victim_a, REGISTER, 0, 0, KV, ALL_TG_PT).await;
    prout_good(&preemptor_a, REGISTER, 0, 0, KP, ALL_TG_PT).await;
    prout_good(&victim_b, RESERVE, WERO, KV, 0, 0).await;
    // Every gateway has the same state (generation 2: two registrations).
    let expect = (2, vec![(KP, true, 0), (KV, true, 0)], Some((KV, WERO)));
    for (gw, s) in [("A", &victim_a), ("B", &victim_b), ("C", &preemptor_c)] {
        let got = full_status(s).await;
        assert_eq!(
            (got.0, got.2),
            (expect.0, expect.2),
            "state through {gw}: {got:?}"
        );
        assert_eq!(got.1.len(), 2, "registrations through {gw}: {got:?}");
    }

    let preempted = Arc::new(AtomicBool::new(false));
    let writers = VICTIMS.spawn(&victim_a, &preempted);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let sent = Instant::now();
    let r = tokio::time::timeout(
        PROMPT,
        prout(&preemptor_c, PREEMPT_AND_ABORT, WERO, KP, KV, 0),
    )
    .await
    .expect("PREEMPT AND ABORT hung");
    let good_at = Instant::now();
    preempted.store(true, Ordering::SeqCst);
    assert_eq!(
        r.status,
        GOOD,
        "PREEMPT AND ABORT via C: {:?}",
        r.sense_key()
    );

    // At once: the preemptor overwrites every block the victim writes, through A (the
    // active gateway; B and C are standby).
    for w in 0..VICTIMS.writers {
        let cdb =
            ironlun_initiator::scsi::write16_cdb(VICTIMS.chunk_lba(w), VICTIMS.chunk_blocks, true);
        let r = past_ua(
            &preemptor_a,
            &cdb,
            VICTIMS.tagged(PREEMPTOR, u32::from(w)),
            0,
        )
        .await;
        assert_eq!(
            r.status,
            GOOD,
            "preemptor write {w} via A: {:?}",
            r.sense_key()
        );
    }

    let mut recs = Vec::new();
    for t in writers {
        recs.extend(
            tokio::time::timeout(PROMPT * 2, t)
                .await
                .expect("victim writer hung")
                .expect("victim writer panicked"),
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    let (outstanding, aborted) = VICTIMS.check(&recs, sent);
    eprintln!(
        "victim on A: {} commands, {outstanding} outstanding at the PREEMPT AND ABORT on C, {aborted} TASK ABORTED; PREEMPT AND ABORT took {:?}",
        recs.len(),
        good_at - sent
    );
    assert!(
        outstanding > 0,
        "no victim write was in flight: the test proves nothing"
    );

    // Read back: no victim write landed after the preemptor's overwrite.
    let reader_b = login(b, INIT_P, ISID_P).await;
    for w in 0..VICTIMS.writers {
        let r = past_ua(
            &preemptor_a,
            &ironlun_initiator::scsi::read16_cdb(VICTIMS.chunk_lba(w), VICTIMS.chunk_blocks),
            Bytes::new(),
            VICTIMS.chunk_blocks * BS,
        )
        .await;
        assert_eq!(r.status, GOOD);
        VICTIMS.check_read_back(w, &r.data, &recs);
    }

    // Unit attentions: the victim's nexus on B learns of the preemption from B; the
    // preemptor's nexus on C gets none.
    let tur = ironlun_initiator::scsi::test_unit_ready_cdb();
    let r = victim_b.command(LUN0, &tur, Bytes::new(), 0).await.unwrap();
    assert!(
        preempt_ua(r.status, r.sense_key()),
        "victim's nexus on B: {:?} {:?}",
        r.status,
        r.sense_key()
    );
    let r = preemptor_c
        .command(LUN0, &tur, Bytes::new(), 0)
        .await
        .unwrap();
    assert_eq!(
        ironlun_testkit::unit_attention(&r),
        None,
        "preemptor's nexus on C: {:?}",
        r.sense_key()
    );

    // One state everywhere: only the preemptor's key, reserved WERO by it.
    let mut seen = Vec::new();
    for (gw, s) in [("A", &preemptor_a), ("B", &reader_b), ("C", &preemptor_c)] {
        let got = full_status(s).await;
        assert_eq!(got.2, Some((KP, WERO)), "reservation through {gw}: {got:?}");
        assert!(
            got.1.iter().all(|r| r.0 == KP),
            "registrations through {gw}: {got:?}"
        );
        seen.push(got);
    }
    assert!(seen.windows(2).all(|w| w[0] == w[1]), "{seen:?}");
    drop(gws);
}

// ---------------------------------------------------------------------------------------------
// Self-fencing of a gateway cut off from etcd

/// T = 3 s, renewals every 500 ms, m = 0.3 s, Δ = 0.5 s, ρ = 1 %: a cut-off gateway submits
/// nothing from `s + T(1−ρ) − m` = `s + 2.67 s` on (`s`: when its last renewal was sent).
const FAST: &str = "lease_ttl_ms = 3000\nkeepalive_interval_ms = 500\nmargin_ms = 300\n\
lock_delay_ms = 500\netcd_timeout_ms = 400\n";
const BOUND: Duration = Duration::from_millis(2670);
const KEEPALIVE: Duration = Duration::from_millis(500);

/// One QD1 write of the fencing test: 8 blocks at LBA 0 tagged with `seq`.
#[derive(Debug)]
struct Write {
    seq: u32,
    sent: Instant,
    status: u8,
    sense: Option<SenseKey>,
}

/// Write 8 tagged blocks at LBA 0 through `s` until `stop`, one at a time.
fn writer(s: Session, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Vec<Write>> {
    tokio::spawn(async move {
        let mut out = Vec::new();
        let mut seq = 0u32;
        while !stop.load(Ordering::SeqCst) {
            let sent = Instant::now();
            let cdb = ironlun_initiator::scsi::write16_cdb(0, 8, true);
            let data = Bytes::from(
                (0..8u32)
                    .flat_map(|_| {
                        let mut b = vec![0u8; BS as usize];
                        b[..8].copy_from_slice(VICTIMS.magic);
                        b[10..14].copy_from_slice(&seq.to_be_bytes());
                        b
                    })
                    .collect::<Vec<u8>>(),
            );
            let r = tokio::time::timeout(PROMPT, s.command(LUN0, &cdb, data, 0))
                .await
                .unwrap_or_else(|_| panic!("write {seq} hung"))
                .unwrap_or_else(|e| panic!("write {seq}: {e}"));
            out.push(Write {
                seq,
                sent,
                status: r.status,
                sense: r.sense_key(),
            });
            seq += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        out
    })
}

/// The tag of LBA 0 as read through `s`.
async fn tag_at_0(s: &Session) -> u32 {
    let r = past_ua(
        s,
        &ironlun_initiator::scsi::read16_cdb(0, 8),
        Bytes::new(),
        8 * BS,
    )
    .await;
    assert_eq!(r.status, GOOD, "read: {:?}", r.sense_key());
    assert_eq!(&r.data[..8], VICTIMS.magic);
    u32::from_be_bytes([r.data[10], r.data[11], r.data[12], r.data[13]])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_cut_off_from_etcd_stops_writing_within_its_bound_then_rejoins() {
    const K1: u64 = 0x1111;
    const K2: u64 = 0x2222;
    let mut etcd = EtcdCluster::start(3);
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("lun0.img");
    let spec = Gateways {
        n: 2,
        ..gateways(&image, "s4", FAST)
    };
    // A reaches etcd through proxies the test black-holes; B directly.
    let proxies: Vec<Proxy> = etcd
        .endpoints()
        .iter()
        .map(|e| Proxy::start(e.parse().unwrap()))
        .collect();
    let via_proxies: Vec<String> = proxies.iter().map(|p| p.addr().to_string()).collect();
    let gw_a = builder()
        .config(&spec.config(0, &via_proxies))
        .portals()
        .start();
    let gw_b = builder()
        .config(&spec.config(1, &etcd.endpoints()))
        .portals()
        .start();
    let on_a = login(gw_a.addrs[0], INIT_V, ISID_V).await;
    let on_b = login(gw_b.addrs[0], INIT_V, ISID_V).await;
    prout_good(&on_a, REGISTER, 0, 0, K1, ALL_TG_PT).await;

    // Writes through A, then A loses etcd.
    let stop = Arc::new(AtomicBool::new(false));
    let writes = writer(on_a.clone(), stop.clone());
    tokio::time::sleep(Duration::from_millis(800)).await;
    let cut = Instant::now();
    for p in &proxies {
        p.block();
    }
    // A PR OUT through B meanwhile: committed at once, but GOOD only once A is known gone
    // (its lease expired, plus Δ): A cannot acknowledge it.
    let pr_b = {
        let s = on_b.clone();
        tokio::spawn(async move {
            let r = prout(&s, REGISTER, 0, K1, K2, ALL_TG_PT).await;
            (r, Instant::now())
        })
    };
    tokio::time::sleep(BOUND + Duration::from_secs(2)).await;
    stop.store(true, Ordering::SeqCst);
    let writes = writes.await.unwrap();
    let (r, pr_done) = tokio::time::timeout(PROMPT, pr_b)
        .await
        .expect("PR OUT through B hung")
        .unwrap();
    assert_eq!(r.status, GOOD, "PR OUT through B: {:?}", r.sense_key());

    // Every GOOD write through A was sent before A's deadline; later ones were refused with
    // 02/04/0A; none of those is on the medium.
    let last_good = writes
        .iter()
        .rfind(|w| w.status == GOOD)
        .expect("a write before the cut");
    let refused: Vec<&Write> = writes.iter().filter(|w| w.status != GOOD).collect();
    eprintln!(
        "through A: {} writes, last GOOD sent {:?} after the cut (bound {BOUND:?}), {} refused, first refusal sent {:?} after the cut; PR OUT through B took {:?} from the cut",
        writes.len(),
        last_good.sent.saturating_duration_since(cut),
        refused.len(),
        refused.first().map(|w| w.sent.saturating_duration_since(cut)),
        pr_done - cut,
    );
    assert!(
        last_good.sent < cut + BOUND,
        "a write sent {:?} after the cut was submitted: {last_good:?}",
        last_good.sent - cut
    );
    let code = |w: &Write| w.sense.map(|k| (k.key, k.asc, k.ascq));
    assert!(
        refused.iter().any(|w| code(w) == Some((0x02, 0x04, 0x0a))),
        "A never refused a write with 02/04/0A: it did not fence"
    );
    for w in &refused {
        // NOT READY 04/0A; or the unit attention of A's own group turning transitioning.
        assert!(
            w.status == CHECK_CONDITION
                && matches!(code(w), Some((0x02, 0x04, 0x0a) | (0x06, 0x2a, 0x06))),
            "refused write not NOT READY 04/0A: {w:?}"
        );
        assert!(
            w.seq > last_good.seq,
            "a refusal before a later GOOD: {w:?}"
        );
    }
    // B took over as the active gateway once A's lease was gone (plus Δ).
    wait_rtpg(&on_b, &[(1, STANDBY), (2, AO)], PROMPT).await;
    assert_eq!(
        tag_at_0(&on_b).await,
        last_good.seq,
        "the medium holds a write A refused (or lost one it acknowledged)"
    );
    // B's GOOD waited for A's lease to expire (at the earliest T after its last renewal,
    // sent at most one keep-alive interval before the cut) and Δ.
    assert!(
        pr_done - cut >= Duration::from_millis(3000 + 500) - KEEPALIVE - Duration::from_millis(100),
        "B answered GOOD {:?} after the cut, before A could be gone",
        pr_done - cut
    );

    // Healed: A registers a new lease, rejoins from a snapshot (it sees B's change) and,
    // made active again by ctl, serves again.
    for p in &proxies {
        p.unblock();
    }
    let healed = Instant::now();
    loop {
        let c = ctl_cluster(&gw_a, &[]);
        if c.luns[0].serving {
            break;
        }
        if healed.elapsed() > PROMPT * 2 {
            let log = gw_a.stderr();
            let tail: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("cluster") || l.contains("etcd"))
                .rev()
                .take(60)
                .collect();
            panic!(
                "A did not rejoin: {c:?}; A's last cluster log lines, newest first:\n{}",
                tail.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("A rejoined {:?} after healing", healed.elapsed());
    ctl_cluster(&gw_b, &["move", TARGET, "0", "gw-a"]);
    wait_rtpg(&on_a, &[(1, AO), (2, STANDBY)], PROMPT).await;
    let cdb = ironlun_initiator::scsi::write16_cdb(0, 8, true);
    let r = past_ua(&on_a, &cdb, Bytes::from(vec![0u8; 8 * BS as usize]), 0).await;
    assert_eq!(r.status, GOOD, "A after healing: {:?}", r.sense_key());
    let keys = |s: &Session| {
        let s = s.clone();
        async move {
            let cdb = pr::in_cdb(pr::InAction::ReadKeys, 4096);
            let r = past_ua(&s, &cdb, Bytes::new(), 4096).await;
            pr::Keys::parse(&r.data).unwrap()
        }
    };
    let (ka, kb) = (keys(&on_a).await, keys(&on_b).await);
    assert_eq!(ka, kb, "A and B after the rejoin");
    assert_eq!(ka.keys, vec![K2], "B's change seen through A");

    // A follower of etcd dies (quorum kept): nothing an initiator sees changes.
    let follower = (0..3).find(|i| !etcd.is_leader(*i)).unwrap();
    etcd.kill9(follower);
    let stop = Arc::new(AtomicBool::new(false));
    let wa = writer(on_a.clone(), stop.clone());
    prout_good(&on_a, REGISTER, 0, K2, K1, ALL_TG_PT).await;
    prout_good(&on_b, REGISTER, 0, K1, K2, ALL_TG_PT).await;
    tokio::time::sleep(BOUND + KEEPALIVE).await;
    stop.store(true, Ordering::SeqCst);
    let w = wa.await.unwrap();
    assert!(!w.is_empty());
    assert!(
        w.iter().all(|w| w.status == GOOD),
        "a write through A (active) failed after the member loss: {:?}",
        w.iter().find(|w| w.status != GOOD)
    );
    drop((gw_a, gw_b));
}

// ---------------------------------------------------------------------------------------------
// ALUA across gateways

async fn write_status(s: &Session) -> CommandResult {
    let cdb = ironlun_initiator::scsi::write16_cdb(64, 8, false);
    s.command(LUN0, &cdb, Bytes::from(vec![7u8; 8 * BS as usize]), 0)
        .await
        .unwrap()
}

/// The state one would see in `ironlun ctl cluster --json` through `d`.
fn ctl_cluster(d: &Daemon, args: &[&str]) -> ironlun_api::ClusterJson {
    let mut all = vec!["cluster", "--json"];
    all.extend_from_slice(args);
    serde_json::from_str(&d.ctl(&all)).expect("ctl cluster --json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_active_gateway_per_lu_moved_by_ctl_and_on_failure() {
    let etcd = EtcdCluster::start(3);
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("lun0.img");
    let spec = Gateways {
        n: 2,
        ..gateways(&image, "alua", FAST)
    };
    let mut gws = spec.start(builder, &etcd);
    let (a, b) = (
        login(gws[0].addrs[0], INIT_V, ISID_V).await,
        login(gws[1].addrs[0], INIT_V, ISID_V).await,
    );
    // A made the key (lowest live member): A active/optimized, B standby, the same through
    // both gateways.
    let a_active = [(1, AO), (2, STANDBY)];
    wait_rtpg(&a, &a_active, PROMPT).await;
    wait_rtpg(&b, &a_active, PROMPT).await;
    assert_eq!(write_status(&a).await.status, GOOD);
    let r = write_status(&b).await;
    assert!(
        r.status == CHECK_CONDITION
            && r.sense_key()
                .is_some_and(|k| (k.key, k.asc, k.ascq) == (0x02, 0x04, 0x0b)),
        "WRITE through the standby gateway: {:?}",
        r.sense_key()
    );
    // PR commands pass in standby (SPC-4 §5.16.2.4.4).
    prout_good(&b, REGISTER, 0, 0, 0xb0b, 0).await;
    let c = ctl_cluster(&gws[0], &[]);
    assert_eq!(c.gateway, "gw-a");
    assert!(
        c.gateways.iter().all(|g| g.live && g.ttl_seconds.is_some()),
        "{c:?}"
    );
    assert_eq!(c.luns[0].active.as_deref(), Some("gw-a"), "{c:?}");
    assert!(c.luns[0].serving);

    // Moved by ctl (through A's admin API) to B: both gateways follow.
    let b_active = [(1, STANDBY), (2, AO)];
    let c = ctl_cluster(&gws[0], &["move", TARGET, "0", "gw-b"]);
    assert_eq!(c.luns[0].active.as_deref(), Some("gw-b"), "{c:?}");
    wait_rtpg(&a, &b_active, PROMPT).await;
    wait_rtpg(&b, &b_active, PROMPT).await;
    assert_eq!(write_status(&b).await.status, GOOD);
    let out = gws[0]
        .binary()
        .ctl_at(&gws[0].admin, &["cluster", "move", TARGET, "0", "gw-z"]);
    assert!(!out.status.success(), "unknown gateway accepted");

    // B dies: after its lease expires and Δ, A (the lowest live gateway) takes over.
    let dead = gws.remove(1);
    let killed = Instant::now();
    dead.kill9();
    let a_again = [(1, AO), (2, STANDBY)];
    let took = wait_rtpg(&a, &a_again, PROMPT * 2).await;
    eprintln!(
        "A active {:?} after B's kill -9 (T 3 s + Δ(1+ρ) 0.505 s bound from B's last renewal)",
        killed.elapsed()
    );
    assert!(
        killed.elapsed()
            >= Duration::from_millis(3000 + 500) - KEEPALIVE - Duration::from_millis(100),
        "A took over {took:?} after the kill: before B's writes could have ended"
    );
    let c = ctl_cluster(&gws[0], &[]);
    assert!(!c.gateways[1].live, "{c:?}");
    assert_eq!(c.luns[0].active.as_deref(), Some("gw-a"), "{c:?}");
    // A's nexus learned of the changes; then it writes.
    let r = write_status(&a).await;
    assert!(
        r.status == GOOD
            || r.sense_key()
                .is_some_and(|k| (k.key, k.asc, k.ascq) == (0x06, 0x2a, 0x06)),
        "{:?}",
        r.sense_key()
    );
    assert_eq!(
        past_ua(
            &a,
            &ironlun_initiator::scsi::write16_cdb(64, 8, false),
            Bytes::from(vec![7u8; 8 * BS as usize]),
            0
        )
        .await
        .status,
        GOOD
    );
}

// ---------------------------------------------------------------------------------------------
// Restarts

async fn read_keys(s: &Session) -> pr::Keys {
    let cdb = pr::in_cdb(pr::InAction::ReadKeys, 4096);
    let r = past_ua(s, &cdb, Bytes::new(), 4096).await;
    assert_eq!(r.status, GOOD, "READ KEYS: {:?}", r.sense_key());
    pr::Keys::parse(&r.data).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_gateway_restarts_into_the_same_state_and_a_full_restart_keeps_it() {
    const K1: u64 = 0xabc1;
    const K2: u64 = 0xabc2;
    let etcd = EtcdCluster::start(3);
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("lun0.img");
    let spec = Gateways {
        n: 2,
        ..gateways(&image, "restart", FAST)
    };
    let mut gws = spec.start(builder, &etcd);
    let a = login(gws[0].addrs[0], INIT_V, ISID_V).await;
    prout_good(&a, REGISTER, 0, 0, K1, ALL_TG_PT).await;
    drop(a);

    // kill -9 of A, restarted at once: its old member key lives until the lease expires, so
    // it waits for that, then joins from a snapshot with the state B kept.
    gws[0].signal_and_wait("KILL");
    let t = Instant::now();
    gws[0].respawn(None);
    eprintln!("A restarted after kill -9 in {:?}", t.elapsed());
    let a = login(gws[0].addrs[0], INIT_V, ISID_V).await;
    let b = login(gws[1].addrs[0], INIT_V, ISID_V).await;
    let before = read_keys(&a).await;
    assert_eq!(before.keys, vec![K1], "A after its restart: {before:?}");
    assert_eq!(read_keys(&b).await, before);
    // It takes part again: a change through it reaches B.
    prout_good(&a, REGISTER, 0, K1, K2, ALL_TG_PT).await;
    let after = read_keys(&b).await;
    assert_eq!(after.keys, vec![K2], "{after:?}");

    // Every gateway stops, then starts again: the state (registered without APTPL) is kept,
    // as the README says for cluster mode.
    drop((a, b));
    for g in &mut gws {
        g.signal_and_wait("TERM");
    }
    for g in &mut gws {
        g.respawn(None);
    }
    let a = login(gws[0].addrs[0], INIT_V, ISID_V).await;
    let b = login(gws[1].addrs[0], INIT_V, ISID_V).await;
    assert_eq!(read_keys(&a).await, after, "after a full restart");
    assert_eq!(read_keys(&b).await, after, "after a full restart");
}

// ---------------------------------------------------------------------------------------------
// Compaction

/// B loses its etcd connections (its proxy is gone) while A commits a change, and the store's
/// history is compacted past B's watch position meanwhile. When B reaches etcd again its
/// watch is refused for compaction: its LU stops serving and joins anew from a snapshot
/// (scale-out.md §5 S9), with A's change, and takes part again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_behind_a_compaction_joins_anew_from_a_snapshot() {
    const K1: u64 = 0xc0c1;
    const K2: u64 = 0xc0c2;
    let etcd = EtcdCluster::start(3);
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("lun0.img");
    let spec = Gateways {
        n: 2,
        ..gateways(&image, "compact", FAST)
    };
    let upstream: std::net::SocketAddr = etcd.endpoints()[0].parse().unwrap();
    let proxy = Proxy::start(upstream);
    let via = proxy.addr();
    let gw_a = builder()
        .config(&spec.config(0, &etcd.endpoints()))
        .portals()
        .start();
    let gw_b = builder()
        .config(&spec.config(1, &[via.to_string()]))
        .portals()
        .start();
    let a = login(gw_a.addrs[0], INIT_V, ISID_V).await;
    let b = login(gw_b.addrs[0], INIT_P, ISID_P).await;
    prout_good(&a, REGISTER, 0, 0, K1, ALL_TG_PT).await;
    assert_eq!(read_keys(&b).await.keys, vec![K1]);

    // B's connections to etcd die, A changes the state (its GOOD waits for B), and the
    // history is compacted to the head.
    drop(proxy);
    let change = {
        let a = a.clone();
        tokio::spawn(async move { prout(&a, REGISTER, 0, K1, K2, ALL_TG_PT).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let client = ironlun::etcd::Etcd::new(&etcd.endpoints(), Duration::from_secs(2)).unwrap();
    let (head, _) = client.get_prefix(b"/").await.unwrap();
    client.compact(head).await.unwrap();
    // Back well within B's lease (T 3 s): the same address, a new proxy.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let _proxy = Proxy::start_at(via, upstream);
    let r = tokio::time::timeout(PROMPT, change)
        .await
        .expect("A's change hung")
        .unwrap();
    assert_eq!(r.status, GOOD, "A's change: {:?}", r.sense_key());
    let t = Instant::now();
    loop {
        let keys = read_keys(&b).await;
        if keys.keys == vec![K2] {
            break;
        }
        assert!(t.elapsed() < PROMPT, "B never saw A's change: {keys:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = gw_b.stderr();
    assert!(
        log.contains("history compacted past this replica"),
        "B did not take the compaction path:\n{log}"
    );
    assert!(log.contains("rejoined from a snapshot"), "{log}");
    // B takes part again: a change through it reaches A.
    prout_good(&b, REGISTER, 0, 0, 0x0b0b, ALL_TG_PT).await;
    let keys = read_keys(&a).await;
    assert!(keys.keys.contains(&0x0b0b), "{keys:?}");
}

// ---------------------------------------------------------------------------------------------
// Quorum loss

/// Two of the three etcd members die: no gateway can renew, so every one stops submitting
/// within its bound and PR OUT answers NOT READY (never fails open, never hangs). The members
/// come back: the gateways serve again, and the medium holds exactly the writes acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_etcd_quorum_fences_every_gateway_then_they_serve_again() {
    const K1: u64 = 0xd1;
    let mut etcd = EtcdCluster::start(3);
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("lun0.img");
    let spec = Gateways {
        n: 2,
        ..gateways(&image, "quorum", FAST)
    };
    let gws = spec.start(builder, &etcd);
    let a = login(gws[0].addrs[0], INIT_V, ISID_V).await;
    let b = login(gws[1].addrs[0], INIT_V, ISID_V).await;
    prout_good(&a, REGISTER, 0, 0, K1, ALL_TG_PT).await;

    let stop = Arc::new(AtomicBool::new(false));
    let writes = writer(a.clone(), stop.clone());
    tokio::time::sleep(Duration::from_millis(800)).await;
    let cut = Instant::now();
    etcd.kill9(1);
    etcd.kill9(2);
    tokio::time::sleep(BOUND + Duration::from_millis(3500)).await;
    // B is fenced too: its PR OUT is refused at once, not left waiting.
    let t = Instant::now();
    let r = tokio::time::timeout(PROMPT, prout(&b, REGISTER, 0, K1, 0xd2, ALL_TG_PT))
        .await
        .expect("PR OUT through B hung without quorum");
    assert!(
        r.status == CHECK_CONDITION
            && r.sense_key()
                .is_some_and(|k| (k.key, k.asc, k.ascq) == (0x02, 0x04, 0x0a)),
        "PR OUT through B without quorum: {:?} {:?} after {:?}",
        r.status,
        r.sense_key(),
        t.elapsed()
    );
    stop.store(true, Ordering::SeqCst);
    let writes = writes.await.unwrap();
    let last_good = writes.iter().rfind(|w| w.status == GOOD).unwrap();
    let refused = writes.iter().filter(|w| w.status != GOOD).count();
    eprintln!(
        "without quorum: last GOOD write sent {:?} after the cut (bound {BOUND:?} from the last answered renewal), {refused} refused",
        last_good.sent.saturating_duration_since(cut)
    );
    // The bound counts from the last renewal etcd answered. A leader that lost its quorum
    // still answers renewals until its quorum check steps it down, up to two election
    // timeouts (1 s each here) later (seen: 1.2 and 1.7 s). That is safe: without a quorum
    // nobody can act on an expiry, and a new leader extends every lease by its TTL when it
    // is promoted. So: cut + that + one keep-alive interval + the bound.
    let bound = BOUND + Duration::from_millis(2000) + KEEPALIVE;
    assert!(last_good.sent < cut + bound, "{last_good:?}");
    assert!(refused > 0, "A never refused a write without quorum");

    // Quorum back: both gateways serve again (A still the active one).
    etcd.restart(1);
    etcd.restart(2);
    let back = Instant::now();
    let cdb = ironlun_initiator::scsi::write16_cdb(64, 8, false);
    loop {
        let r = past_ua(&a, &cdb, Bytes::from(vec![5u8; 8 * BS as usize]), 0).await;
        if r.status == GOOD {
            break;
        }
        assert!(
            back.elapsed() < PROMPT * 2,
            "A does not serve again: {:?}",
            r.sense_key()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "A serves again {:?} after the quorum returned",
        back.elapsed()
    );
    assert_eq!(
        tag_at_0(&a).await,
        last_good.seq,
        "the medium vs the acknowledged writes"
    );
    let t = Instant::now();
    loop {
        let r = prout(&b, REGISTER, 0, K1, 0xd2, ALL_TG_PT).await;
        if r.status == GOOD {
            break;
        }
        assert!(
            t.elapsed() < PROMPT * 2,
            "B does not serve again: {:?}",
            r.sense_key()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(read_keys(&a).await.keys, vec![0xd2]);
}

// ---------------------------------------------------------------------------------------------
// Handovers between hosts attached to different gateways (acceptance 5)

/// 100 handovers of the LU between host A, logged in to gw-a only, and host B, logged in to
/// gw-b only, by `ironlun migrate` through gw-a, gw-b and gw-c in turn, while the owner
/// writes at QD16 (`ironlun_testkit::handover_load`). Each step is a record in etcd; the
/// commit (migrate's default on-deadline abort) is one switch record, which makes the
/// destination owner and aborts the source's tasks everywhere, answered once every gateway
/// has drained them. The resume hook moves
/// the LU's active gateway to the destination's (`ironlun ctl cluster move`), as a cluster
/// whose hosts reach one gateway each needs. Every fifth handover runs with `--on-deadline
/// refuse` instead: a fence record, the drain, the flush, then a commit record. Nothing lost,
/// nothing stray; the storage switch time of each form is reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_handovers_between_hosts_on_different_gateways_lose_nothing() {
    use ironlun_testkit::handover_load::{stats, HandoverLoad};
    const HOSTS: [&str; 2] = ["iqn.2026-12.test:host-a", "iqn.2026-12.test:host-b"];
    const HANDOVERS: usize = 100;
    /// Every fifth handover runs with `--on-deadline refuse`: a fence record, then a commit.
    const REFUSE_EVERY: usize = 5;
    let etcd = EtcdCluster::start(3);
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("lun0.img");
    let gws = gateways(&image, "handover", "").start(builder, &etcd);
    let admins: Vec<String> = gws.iter().map(|g| g.admin_url().to_owned()).collect();
    let (a, b) = (gws[0].addrs[0], gws[1].addrs[0]);
    let sessions = [
        Arc::new(login(a, HOSTS[0], ISID_V).await),
        Arc::new(login(b, HOSTS[1], ISID_P).await),
    ];
    // gw-a is the active gateway (the lowest live one made the key).
    let c = ctl_cluster(&gws[0], &[]);
    assert_eq!(c.luns[0].active.as_deref(), Some("gw-a"), "{c:?}");
    // Host A owns the LU, set through gw-c.
    let client = ironlun_cli::ctl::Client::new(&admins[2], None).unwrap();
    let lu = format!("/v1/luns/{TARGET}/0");
    let r = client
        .request(
            "POST",
            &format!("{lu}/owner"),
            Some(format!(r#"{{"host": "{}", "epoch": 1}}"#, HOSTS[0]).as_bytes()),
            PROMPT,
        )
        .unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));

    let hook_admins = admins.clone();
    let mut out = HandoverLoad {
        ironlun: IRONLUN.to_string(),
        lun: format!("{TARGET}/0"),
        hosts: HOSTS.map(str::to_string),
        sessions: sessions.clone(),
        admins: admins.clone(),
        resume: Box::new(move |i, to| {
            format!(
                "{IRONLUN} ctl --admin {} cluster move {TARGET} 0 {}",
                hook_admins[i % hook_admins.len()],
                ironlun_testkit::gateway_name(to)
            )
        }),
        not_accessible_ok: true,
        handovers: HANDOVERS,
        refuse_every: REFUSE_EVERY,
    }
    .run()
    .await;

    // Every gateway reports the final owner and epoch, and no handover in progress.
    for (i, admin) in admins.iter().enumerate() {
        let c = ironlun_cli::ctl::Client::new(admin, None).unwrap();
        let o: serde_json::Value =
            serde_json::from_slice(&c.get(&format!("{lu}/ownership")).unwrap().body).unwrap();
        assert_eq!(
            (o["owner"].as_str(), o["epoch"].as_u64()),
            (Some(HOSTS[out.owner]), Some(HANDOVERS as u64 + 1)),
            "through gateway {i}: {o}"
        );
        assert!(o["handover"].is_null(), "through gateway {i}: {o}");
    }
    // One switch record, or (refuse) a fence record and a commit record: the target's steps
    // say which ran.
    let (mut one, mut two) = (Vec::new(), Vec::new());
    for (k, refused) in out.refused_mode.iter().enumerate() {
        let [fence, _, _, transfer] = out.steps_us[k];
        if *refused {
            assert!(
                fence > 0 && transfer > 0,
                "handover {k}: {:?}",
                out.steps_us[k]
            );
            two.push(out.switch_ms[k]);
        } else {
            assert_eq!(fence, 0, "handover {k} fenced: {:?}", out.steps_us[k]);
            one.push(out.switch_ms[k]);
        }
    }
    assert_eq!(two.len(), HANDOVERS / REFUSE_EVERY);
    let (s50, s90, smax) = stats(&mut one);
    let (t50, t90, tmax) = stats(&mut two);
    let (b50, b90, bmax) = stats(&mut out.blackout_ms);
    println!(
        "across gateways: storage switch (one switch record, {} handovers) median {s50:.3} ms, \
         p90 {s90:.3} ms, max {smax:.3} ms; with --on-deadline refuse (fence and commit \
         records, {} handovers) median {t50:.3} ms, p90 {t90:.3} ms, max {tmax:.3} ms; blackout \
         median {b50:.3} ms, p90 {b90:.3} ms, max {bmax:.3} ms (resume hook: ironlun ctl \
         cluster move); {}",
        one.len(),
        two.len(),
        out.summary
    );
    // Failover (issue 19): refused through the owner's own gateway, which sees its session;
    // forced through gw-c, every gateway reports the survivor at the next epoch.
    let (dead, to) = (HOSTS[out.owner], HOSTS[1 - out.owner]);
    let failover = |admin: &str, force: bool| {
        let c = ironlun_cli::ctl::Client::new(admin, None).unwrap();
        let body = format!(r#"{{"from": "{dead}", "to": "{to}", "force": {force}}}"#);
        c.request(
            "POST",
            &format!("{lu}/failover"),
            Some(body.as_bytes()),
            PROMPT,
        )
        .unwrap()
    };
    let r = failover(&admins[out.owner], false);
    assert_eq!(r.status, 409, "{}", String::from_utf8_lossy(&r.body));
    assert!(String::from_utf8_lossy(&r.body).contains("live_session"));
    let r = failover(&admins[2], true);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    for (i, admin) in admins.iter().enumerate() {
        let c = ironlun_cli::ctl::Client::new(admin, None).unwrap();
        let o: serde_json::Value =
            serde_json::from_slice(&c.get(&format!("{lu}/ownership")).unwrap().body).unwrap();
        assert_eq!(
            (o["owner"].as_str(), o["epoch"].as_u64()),
            (Some(to), Some(HANDOVERS as u64 + 2)),
            "after the failover, through gateway {i}: {o}"
        );
    }
    for s in &sessions {
        s.logout().await.unwrap();
    }
}
