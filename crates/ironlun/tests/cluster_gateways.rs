//! Cluster mode end to end (issue 18, acceptance 1 and 3): three real etcd members and three
//! `ironlun serve` gateways on loopback (gw-a, gw-b, gw-c: TPGTs 1, 2, 3) serving one LUN on
//! one shared image (uring, `O_DIRECT`), driven by our own initiator.
//!
//! - Registrations through A, the reservation through B, PREEMPT AND ABORT through C while
//!   the victim's writes are in flight on A: GOOD only after A drained them, none of them
//!   lands later (read back through B), the victim's nexus on B gets REGISTRATIONS
//!   PREEMPTED from B itself, the preemptor's none, and every gateway reports the same state
//!   (READ FULL STATUS with the relative target port of each registration).
//! - A gateway cut off from etcd (its proxy black-holed) stops submitting writes: NOT READY,
//!   ASYMMETRIC ACCESS STATE TRANSITION, from its deadline on, and a write it refuses is not
//!   on the medium; the others go on. Healed, it serves again.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::cast_possible_truncation
)]

use bytes::Bytes;
use ironlun_initiator::pr;
use ironlun_initiator::{CommandResult, SenseKey, Session};
use ironlun_testkit::{Daemon, EtcdCluster, Gateways, Login, Proxy, PROMPT};
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
const RESERVATION_CONFLICT: u8 = 0x18;
const TASK_ABORTED: u8 = 0x40;

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

async fn login(addr: SocketAddr, name: &str, isid: [u8; 6]) -> Session {
    Login::new(name)
        .target(TARGET)
        .isid(isid)
        .ready(&[LUN0], 8)
        .connect(addr)
        .await
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

const WRITERS: u16 = 16;
const CHUNK_BLOCKS: u32 = 128; // 64 KiB
const PREEMPTOR: u16 = 0xffff;
const MAGIC: &[u8; 8] = b"CLTAG\0\0\x01";

fn chunk_lba(writer: u16) -> u64 {
    u64::from(writer) * u64::from(CHUNK_BLOCKS)
}

fn tagged(writer: u16, seq: u32) -> Bytes {
    let mut v = Vec::with_capacity((CHUNK_BLOCKS * BS) as usize);
    for i in 0..u64::from(CHUNK_BLOCKS) {
        let mut block = vec![writer as u8; BS as usize];
        block[..8].copy_from_slice(MAGIC);
        block[8..10].copy_from_slice(&writer.to_be_bytes());
        block[10..14].copy_from_slice(&seq.to_be_bytes());
        block[14..22].copy_from_slice(&(chunk_lba(writer) + i).to_be_bytes());
        v.extend_from_slice(&block);
    }
    Bytes::from(v)
}

#[derive(Debug)]
struct Rec {
    writer: u16,
    seq: u32,
    after_good: bool,
    sent: Instant,
    done: Instant,
    status: u8,
    sense: Option<SenseKey>,
}

/// REGISTRATIONS PREEMPTED, RESERVATIONS PREEMPTED, COMMANDS CLEARED BY ANOTHER INITIATOR.
fn preempt_ua(status: u8, sense: Option<SenseKey>) -> bool {
    status == CHECK_CONDITION
        && sense.is_some_and(|k| {
            k.key == 0x06 && matches!((k.asc, k.ascq), (0x2a, 0x03) | (0x2a, 0x05) | (0x2f, 0x00))
        })
}

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
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let s = victim_a.clone();
        let preempted = preempted.clone();
        writers.push(tokio::spawn(async move {
            let mut recs = Vec::new();
            let mut seq = 0u32;
            let mut tries_after = 0;
            loop {
                let after_good = preempted.load(Ordering::SeqCst);
                let sent = Instant::now();
                let cdb = ironlun_initiator::scsi::write16_cdb(
                    chunk_lba(w),
                    CHUNK_BLOCKS,
                    seq.is_multiple_of(2),
                );
                let r = tokio::time::timeout(PROMPT, s.command(LUN0, &cdb, tagged(w, seq), 0))
                    .await
                    .unwrap_or_else(|_| panic!("writer {w} seq {seq} hung"))
                    .unwrap_or_else(|e| panic!("writer {w} seq {seq}: {e}"));
                let rec = Rec {
                    writer: w,
                    seq,
                    after_good,
                    sent,
                    done: Instant::now(),
                    status: r.status,
                    sense: r.sense_key(),
                };
                let conflict = rec.status == RESERVATION_CONFLICT;
                recs.push(rec);
                seq += 1;
                if after_good {
                    tries_after += 1;
                    if conflict || tries_after >= 4 {
                        return recs;
                    }
                }
            }
        }));
    }
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

    // At once, through C: the preemptor overwrites every block the victim writes on A.
    for w in 0..WRITERS {
        let cdb = ironlun_initiator::scsi::write16_cdb(chunk_lba(w), CHUNK_BLOCKS, true);
        let r = past_ua(&preemptor_c, &cdb, tagged(PREEMPTOR, u32::from(w)), 0).await;
        assert_eq!(
            r.status,
            GOOD,
            "preemptor write {w} via C: {:?}",
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

    let (mut outstanding, mut aborted) = (0, 0);
    for r in &recs {
        if r.sent < sent && r.done > sent {
            outstanding += 1;
        }
        if r.status == TASK_ABORTED {
            aborted += 1;
        }
        if r.after_good {
            assert!(
                r.status == RESERVATION_CONFLICT || preempt_ua(r.status, r.sense),
                "victim command on A after GOOD on C: {r:?}"
            );
        } else {
            assert!(
                matches!(r.status, GOOD | TASK_ABORTED | RESERVATION_CONFLICT)
                    || preempt_ua(r.status, r.sense),
                "victim command in flight on A: {r:?}"
            );
        }
    }
    for w in 0..WRITERS {
        let last = recs.iter().rfind(|r| r.writer == w).unwrap();
        assert!(
            last.after_good && last.status == RESERVATION_CONFLICT,
            "writer {w} did not end in RESERVATION CONFLICT: {last:?}"
        );
    }
    eprintln!(
        "victim on A: {} commands, {outstanding} outstanding at the PREEMPT AND ABORT on C, {aborted} TASK ABORTED; PREEMPT AND ABORT took {:?}",
        recs.len(),
        good_at - sent
    );
    assert!(
        outstanding > 0,
        "no victim write was in flight: the test proves nothing"
    );

    // Read back through B: no victim write landed after the preemptor's overwrite.
    let reader_b = login(b, INIT_P, ISID_P).await;
    for w in 0..WRITERS {
        let r = past_ua(
            &reader_b,
            &ironlun_initiator::scsi::read16_cdb(chunk_lba(w), CHUNK_BLOCKS),
            Bytes::new(),
            CHUNK_BLOCKS * BS,
        )
        .await;
        assert_eq!(r.status, GOOD);
        for (i, block) in r.data.chunks(BS as usize).enumerate() {
            let writer = u16::from_be_bytes([block[8], block[9]]);
            let seq = u32::from_be_bytes([block[10], block[11], block[12], block[13]]);
            assert!(
                &block[..8] == MAGIC && writer == PREEMPTOR,
                "LBA {}: victim writer {writer} seq {seq} landed after the PREEMPT AND ABORT ({:?})",
                chunk_lba(w) + i as u64,
                recs.iter().find(|r| r.writer == writer && r.seq == seq)
            );
        }
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
        r.status,
        GOOD,
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

/// 02/04/0A: NOT READY, ASYMMETRIC ACCESS STATE TRANSITION.
fn transitioning(r: &CommandResult) -> bool {
    r.status == CHECK_CONDITION
        && r.sense_key()
            .is_some_and(|k| (k.key, k.asc, k.ascq) == (0x02, 0x04, 0x0a))
}

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
                        b[..8].copy_from_slice(MAGIC);
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
    assert_eq!(&r.data[..8], MAGIC);
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
    assert!(
        !refused.is_empty(),
        "A never refused a write: it did not fence"
    );
    for w in &refused {
        assert!(
            w.status == CHECK_CONDITION
                && w.sense
                    .is_some_and(|k| (k.key, k.asc, k.ascq) == (0x02, 0x04, 0x0a)),
            "refused write not NOT READY 04/0A: {w:?}"
        );
        assert!(
            w.seq > last_good.seq,
            "a refusal before a later GOOD: {w:?}"
        );
    }
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

    // Healed: A registers a new lease, rejoins from a snapshot (it sees B's change) and
    // serves again.
    for p in &proxies {
        p.unblock();
    }
    let healed = Instant::now();
    let cdb = ironlun_initiator::scsi::write16_cdb(0, 8, true);
    let data = Bytes::from(vec![0u8; 8 * BS as usize]);
    loop {
        let r = on_a.command(LUN0, &cdb, data.clone(), 0).await.unwrap();
        if r.status == GOOD {
            break;
        }
        assert!(
            transitioning(&r) || r.sense_key().is_some_and(|k| k.key == 0x06),
            "A after healing: {:?}",
            r.sense_key()
        );
        assert!(healed.elapsed() < PROMPT * 2, "A did not serve again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("A serves again {:?} after healing", healed.elapsed());
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
    let (wa, wb) = (
        writer(on_a.clone(), stop.clone()),
        writer(on_b.clone(), stop.clone()),
    );
    prout_good(&on_a, REGISTER, 0, K2, K1, ALL_TG_PT).await;
    prout_good(&on_b, REGISTER, 0, K1, K2, ALL_TG_PT).await;
    tokio::time::sleep(BOUND + KEEPALIVE).await;
    stop.store(true, Ordering::SeqCst);
    for (gw, w) in [("A", wa.await.unwrap()), ("B", wb.await.unwrap())] {
        assert!(!w.is_empty());
        assert!(
            w.iter().all(|w| w.status == GOOD),
            "a write through {gw} failed after the member loss: {:?}",
            w.iter().find(|w| w.status != GOOD)
        );
    }
    drop((gw_a, gw_b));
}
