//! The initiator-driven handover (semantics.md §3.3 steps 0-5, issue 6 "standard alternative")
//! against the real daemon, with standard PR commands only: the source S holds Write Exclusive
//! (type 1) with key K_src on its nexus (APTPL=1); the destination D registers with REGISTER
//! AND IGNORE EXISTING KEY, checks READ FULL STATUS, and takes the reservation with PREEMPT AND
//! ABORT (RK=K_dst, SARK=K_src, TYPE=WE) while S keeps writing at QD8. Then the §3.4 recovery
//! rows the target can show (dst dies before / after the PREEMPT AND ABORT), and a comparison
//! with the target-managed handover of the admin API: both end with D the only writer and S
//! fenced, with differently shaped PR state.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use bytes::Bytes;
use ironlun_cli::ctl::Client;
use ironlun_initiator::pr::{kind, OutAction, OutParams};
use ironlun_initiator::{CommandResult, Session};
use ironlun_scsi::pr::ownership::owner_key;
use ironlun_testkit::{
    opts, past_ua, session, tagged, unit_attention, Daemon, BLOCK_SIZE, PROMPT, TARGET,
};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const IRONLUN: &str = env!("CARGO_BIN_EXE_ironlun");

const HOST_S: &str = "iqn.2026-01.test:host-s";
const HOST_D: &str = "iqn.2026-01.test:host-d";
/// One key per host (semantics.md §3.3: host id || constant).
const K_SRC: u64 = 0x0000_0005_4b53_5243;
const K_DST: u64 = 0x0000_000d_4b44_5354;
const LUN: u64 = 0;
const GOOD: u8 = 0x00;
const RESERVATION_CONFLICT: u8 = 0x18;
const TASK_ABORTED: u8 = 0x40;
/// Writers of the source (tagged SIMPLE tasks in flight at once).
const QD: usize = 8;
/// 4 KiB = 8 blocks per tagged write; write `seq` goes to LBA `seq * 8`.
const BLOCKS_PER_WRITE: u32 = 8;
const WRITER_S: u64 = 0x5555_5555_0000_0005;
const WRITER_D: u64 = 0xDDDD_DDDD_0000_000D;

/// REGISTRATIONS PREEMPTED (SPC-4 §5.13.11.2.4, 2Ah/05h).
fn is_preempted_ua(r: &CommandResult) -> bool {
    unit_attention(r) == Some((0x2a, 0x05))
}

/// PERSISTENT RESERVE OUT (LU_SCOPE) with a basic parameter list, past unit attentions.
async fn prout(
    s: &Session,
    action: OutAction,
    ty: u8,
    params: &OutParams,
) -> (CommandResult, Vec<(u8, u8)>) {
    let p = params.encode();
    let len = u32::try_from(p.len()).unwrap();
    past_ua(
        s,
        LUN,
        &ironlun_initiator::pr::out_cdb(action, ty, len),
        Bytes::from(p),
        0,
    )
    .await
}

async fn prout_good(s: &Session, action: OutAction, ty: u8, params: &OutParams) {
    let (r, _) = prout(s, action, ty, params).await;
    assert_eq!(r.status, GOOD, "{action:?}: {:?}", r.sense_key());
}

fn aptpl(key: u64, sa_key: u64) -> OutParams {
    OutParams {
        aptpl: true,
        ..OutParams::keys(key, sa_key)
    }
}

async fn write(s: &Session, lba: u64, data: Bytes) -> (CommandResult, Vec<(u8, u8)>) {
    let blocks = u32::try_from(data.len()).unwrap() / BLOCK_SIZE;
    past_ua(
        s,
        LUN,
        &ironlun_initiator::scsi::write16_cdb(lba, blocks, false),
        data,
        0,
    )
    .await
}

async fn read(s: &Session, lba: u64, blocks: u32) -> Bytes {
    let (r, _) = past_ua(
        s,
        LUN,
        &ironlun_initiator::scsi::read16_cdb(lba, blocks),
        Bytes::new(),
        blocks * BLOCK_SIZE,
    )
    .await;
    assert_eq!(r.status, GOOD, "read at {lba}: {:?}", r.sense_key());
    r.data
}

/// A second nexus of `host`: same name, another ISID (a second path of a multipath host).
async fn second_path(d: &Daemon, host: &str) -> Session {
    let mut o = opts(host);
    o.isid = [0x80, 0x49, 0x4c, 0x4e, 0x00, 0x02];
    let s = Session::connect(d.addr, o).await.expect("login");
    let _ = past_ua(&s, LUN, &[0; 6], Bytes::new(), 0).await;
    s
}

/// §3.3 setup and step 0: S registered with K_src (APTPL=1) and holding WE; D registered with
/// K_dst by REGISTER AND IGNORE EXISTING KEY (APTPL=1), confirmed with READ FULL STATUS.
async fn setup_step0(d: &Daemon) -> (Session, Session) {
    let s = session(d.addr, HOST_S).await;
    prout_good(&s, OutAction::Register, 0, &aptpl(0, K_SRC)).await;
    prout_good(
        &s,
        OutAction::Reserve,
        kind::WRITE_EXCLUSIVE,
        &aptpl(K_SRC, 0),
    )
    .await;
    let dst = session(d.addr, HOST_D).await;
    let g0 = dst.read_reservation(LUN).await.unwrap().generation;
    prout_good(
        &dst,
        OutAction::RegisterAndIgnoreExistingKey,
        0,
        &aptpl(0, K_DST),
    )
    .await;
    let fs = dst.read_full_status(LUN).await.unwrap();
    assert_eq!(fs.generation, g0 + 1, "step 0 bumps PRgeneration once");
    let mut rows: Vec<(String, u64, bool, u8)> = fs
        .descriptors
        .iter()
        .map(|e| (e.initiator(), e.key, e.holder, e.kind))
        .collect();
    rows.sort();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert!(rows[0].0.starts_with(&format!("{HOST_D},i,0x")), "{rows:?}");
    assert_eq!((rows[0].1, rows[0].2), (K_DST, false), "{rows:?}");
    assert!(rows[1].0.starts_with(&format!("{HOST_S},i,0x")), "{rows:?}");
    assert_eq!(
        (rows[1].1, rows[1].2, rows[1].3),
        (K_SRC, true, kind::WRITE_EXCLUSIVE),
        "{rows:?}"
    );
    // Under WE the registered non-holder D reads (class R) and cannot write.
    read(&dst, 0, 8).await;
    let (w, _) = write(&dst, 1 << 20, tagged(WRITER_D, 0)).await;
    assert_eq!(w.status, RESERVATION_CONFLICT, "D wrote before step 4");
    (s, dst)
}

/// The reservation as D sees it: (key, type) and PRgeneration.
async fn reservation(s: &Session) -> (Option<(u64, u8)>, u32) {
    let r = s.read_reservation(LUN).await.unwrap();
    (r.reservation.map(|(k, _, t)| (k, t)), r.generation)
}

/// One source write: sequence number, when it was sent and returned, status, sense.
#[derive(Debug, Clone, Copy)]
struct Rec {
    seq: u64,
    sent: Instant,
    returned: Instant,
    status: u8,
    preempted_ua: bool,
}

/// Issue 6 "standard alternative", semantics.md §3.3 steps 0-5 under QD8 load from S.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initiator_driven_handover_under_qd8_load_fences_the_source() {
    let d = Daemon::builder(IRONLUN).start();
    let (s, dst) = setup_step0(&d).await;
    let s = Arc::new(s);

    // Step 1-2 stand-in: S writes continuously, each write to blocks of its own until the
    // PREEMPT AND ABORT; afterwards (once `limit` is set) into blocks below `limit`, so that D
    // can overwrite every block S ever tried.
    let next = Arc::new(AtomicU64::new(0));
    let limit = Arc::new(AtomicU64::new(u64::MAX));
    let stop = Arc::new(AtomicBool::new(false));
    let recs = Arc::new(Mutex::new(Vec::<Rec>::new()));
    let mut writers = Vec::new();
    for _ in 0..QD {
        let (s, next, limit, stop, recs) = (
            s.clone(),
            next.clone(),
            limit.clone(),
            stop.clone(),
            recs.clone(),
        );
        writers.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let seq = next.fetch_add(1, Ordering::SeqCst);
                let lba = (seq % limit.load(Ordering::SeqCst)) * u64::from(BLOCKS_PER_WRITE);
                let sent = Instant::now();
                let r = tokio::time::timeout(
                    PROMPT,
                    s.write16(LUN, lba, BLOCK_SIZE, tagged(WRITER_S, seq), false),
                )
                .await
                .expect("S write hung")
                .expect("S write");
                assert_eq!(r.response, 0);
                assert!(
                    matches!(r.status, GOOD | RESERVATION_CONFLICT | TASK_ABORTED)
                        || is_preempted_ua(&r),
                    "S write {seq}: {r:?}"
                );
                recs.lock().unwrap().push(Rec {
                    seq,
                    sent,
                    returned: Instant::now(),
                    status: r.status,
                    preempted_ua: is_preempted_ua(&r),
                });
                if r.status != GOOD {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    // Step 2: S flushes (class W: only the holder may). A real source has drained its I/O
    // here; this one keeps writing, as a zombie source would.
    let sync = s.synchronize_cache(LUN).await.unwrap();
    assert_eq!(
        sync.status,
        GOOD,
        "S SYNCHRONIZE CACHE: {:?}",
        sync.sense_key()
    );
    let (_, g) = reservation(&dst).await;
    assert!(
        recs.lock().unwrap().len() > QD,
        "S wrote too little before the handover"
    );

    // Step 4: D preempts S and aborts its tasks.
    let sent = Instant::now();
    let (r, uas) = prout(
        &dst,
        OutAction::PreemptAndAbort,
        kind::WRITE_EXCLUSIVE,
        &OutParams::keys(K_DST, K_SRC),
    )
    .await;
    let good = Instant::now();
    let tried = next.load(Ordering::SeqCst) + 1000;
    limit.store(tried, Ordering::SeqCst);
    assert_eq!(r.status, GOOD, "PREEMPT AND ABORT: {:?}", r.sense_key());
    assert!(uas.is_empty(), "D saw {uas:?}");
    println!("PREEMPT AND ABORT under QD{QD}: {:?}", good - sent);

    // Step 5: D holds WE with K_dst; PRgeneration + 1; S's registration is gone.
    assert_eq!(
        reservation(&dst).await,
        (Some((K_DST, kind::WRITE_EXCLUSIVE)), g + 1)
    );
    let keys = dst.read_keys(LUN).await.unwrap();
    assert_eq!(keys.keys, [K_DST]);

    // Right after GOOD, D reads every block S may have written (snapshot, 1 MiB at a time).
    let mut snapshot = Vec::new();
    let total = u32::try_from(tried).unwrap() * BLOCKS_PER_WRITE;
    let mut lba = 0u32;
    while lba < total {
        let n = (total - lba).min(2048);
        snapshot.extend_from_slice(&read(&dst, u64::from(lba), n).await);
        lba += n;
    }
    // D (the only writer now) overwrites every block S ever tried, while S keeps trying.
    for seq in 0..tried {
        let (w, _) = write(
            &dst,
            seq * u64::from(BLOCKS_PER_WRITE),
            tagged(WRITER_D, seq),
        )
        .await;
        assert_eq!(w.status, GOOD, "D write {seq}: {:?}", w.sense_key());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        tokio::time::timeout(PROMPT * 2, w)
            .await
            .expect("S writer hung")
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // No S write landed after GOOD: D's data everywhere.
    for seq in 0..tried {
        let got = read(&dst, seq * u64::from(BLOCKS_PER_WRITE), BLOCKS_PER_WRITE).await;
        assert!(
            got == tagged(WRITER_D, seq),
            "an S write landed on block {seq} after the PREEMPT AND ABORT's GOOD"
        );
    }
    let all = recs.lock().unwrap().clone();
    // Every write S saw acknowledged was on the LU when the PREEMPT AND ABORT returned.
    let acked: Vec<&Rec> = all.iter().filter(|r| r.status == GOOD).collect();
    assert!(!acked.is_empty());
    let chunk = usize::try_from(BLOCKS_PER_WRITE * BLOCK_SIZE).unwrap();
    for r in &acked {
        assert!(r.sent < good, "S write {} sent after GOOD got GOOD", r.seq);
        let at = usize::try_from(r.seq).unwrap() * chunk;
        assert!(
            snapshot.get(at..at + chunk) == Some(&tagged(WRITER_S, r.seq)[..]),
            "acknowledged S write {} is not on the LU",
            r.seq
        );
    }
    // Every S write sent after GOOD: RESERVATION CONFLICT, except the one that carries the
    // REGISTRATIONS PREEMPTED unit attention.
    let after: Vec<&Rec> = all.iter().filter(|r| r.sent > good).collect();
    assert!(!after.is_empty(), "S wrote nothing after the handover");
    assert!(
        after
            .iter()
            .all(|r| r.status == RESERVATION_CONFLICT || r.preempted_ua),
        "S after GOOD: {:?}",
        after.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    let aborted = all.iter().filter(|r| r.status == TASK_ABORTED).count();
    // S had writes outstanding when D sent the PREEMPT AND ABORT (else the drain is untested).
    let outstanding = all
        .iter()
        .filter(|r| r.sent < sent && r.returned > sent)
        .count();
    assert!(
        outstanding > 0,
        "no S write was in flight at the PREEMPT AND ABORT"
    );
    // S gets 2Ah/05h exactly once (on a write, or else on its next command).
    let mut uas = all.iter().filter(|r| r.preempted_ua).count();
    if uas == 0 {
        let (_, seen) = past_ua(&s, LUN, &[0; 6], Bytes::new(), 0).await;
        uas = seen.iter().filter(|u| **u == (0x2a, 0x05)).count();
    }
    assert_eq!(uas, 1, "REGISTRATIONS PREEMPTED to S");
    assert!(all.iter().all(|r| r.returned >= r.sent));
    println!(
        "S writes: {} total, {} acknowledged, {outstanding} outstanding at the PREEMPT AND ABORT, {aborted} TASK ABORTED, {} after GOOD (all refused)",
        all.len(),
        acked.len(),
        after.len()
    );
    // Afterwards S is still fenced; D writes and reads normally.
    let (w, _) = write(&s, 0, tagged(WRITER_S, 0)).await;
    assert_eq!(w.status, RESERVATION_CONFLICT);
    let (w, _) = write(&dst, 0, tagged(WRITER_D, u64::MAX)).await;
    assert_eq!(w.status, GOOD);
    assert!(read(&dst, 0, BLOCKS_PER_WRITE).await == tagged(WRITER_D, u64::MAX));
    s.logout().await.unwrap();
    dst.logout().await.unwrap();
}

/// §3.4 row 1: D dies before step 4; S removes D's registration with PREEMPT (RK=K_src,
/// SARK=K_dst, TYPE=WE): SARK names no holder, so only D's registrations go (SPC-4
/// §5.13.11.2.4) and the reservation stays as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dst_dying_before_the_preempt_is_removed_by_the_source() {
    let d = Daemon::builder(IRONLUN).start();
    let (s, dst) = setup_step0(&d).await;
    drop(dst); // D dies: its connection is gone, its registration stays.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (before, g) = reservation(&s).await;
    assert_eq!(before, Some((K_SRC, kind::WRITE_EXCLUSIVE)));
    prout_good(
        &s,
        OutAction::Preempt,
        kind::WRITE_EXCLUSIVE,
        &OutParams::keys(K_SRC, K_DST),
    )
    .await;
    assert_eq!(reservation(&s).await, (before, g + 1));
    assert_eq!(s.read_keys(LUN).await.unwrap().keys, [K_SRC]);
    let (w, uas) = write(&s, 0, tagged(WRITER_S, 1)).await;
    assert_eq!((w.status, uas.len()), (GOOD, 0), "S writes on");
    // D comes back: 2Ah/05h, unregistered, still cannot write.
    let dst = Session::connect(d.addr, opts(HOST_D)).await.unwrap();
    let (w, uas) = write(&dst, 0, tagged(WRITER_D, 1)).await;
    assert!(uas.contains(&(0x2a, 0x05)), "{uas:?}");
    assert_eq!(w.status, RESERVATION_CONFLICT);
    s.logout().await.unwrap();
    dst.logout().await.unwrap();
}

/// §3.4 row 3: D dies after step 4 (it holds WE, the VM runs nowhere); S takes the LU back
/// with REGISTER AND IGNORE EXISTING KEY (it was unregistered) and PREEMPT AND ABORT
/// (RK=K_src, SARK=K_dst, TYPE=WE), which fences D at the target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dst_dying_after_the_preempt_is_preempted_back_by_the_source() {
    let d = Daemon::builder(IRONLUN).start();
    let (s, dst) = setup_step0(&d).await;
    prout_good(
        &dst,
        OutAction::PreemptAndAbort,
        kind::WRITE_EXCLUSIVE,
        &OutParams::keys(K_DST, K_SRC),
    )
    .await;
    let (w, _) = write(&dst, 0, tagged(WRITER_D, 0)).await;
    assert_eq!(w.status, GOOD);
    drop(dst);
    tokio::time::sleep(Duration::from_millis(200)).await;

    // S's first command reports the preemption; its write is refused.
    let (w, uas) = write(&s, 0, tagged(WRITER_S, 0)).await;
    assert!(uas.contains(&(0x2a, 0x05)), "{uas:?}");
    assert_eq!(w.status, RESERVATION_CONFLICT);
    let (_, g) = reservation(&s).await;
    prout_good(
        &s,
        OutAction::RegisterAndIgnoreExistingKey,
        0,
        &aptpl(0, K_SRC),
    )
    .await;
    prout_good(
        &s,
        OutAction::PreemptAndAbort,
        kind::WRITE_EXCLUSIVE,
        &OutParams::keys(K_SRC, K_DST),
    )
    .await;
    assert_eq!(
        reservation(&s).await,
        (Some((K_SRC, kind::WRITE_EXCLUSIVE)), g + 2)
    );
    assert_eq!(s.read_keys(LUN).await.unwrap().keys, [K_SRC]);
    let (w, _) = write(&s, 0, tagged(WRITER_S, 1)).await;
    assert_eq!(w.status, GOOD);
    // D is fenced when it comes back.
    let dst = Session::connect(d.addr, opts(HOST_D)).await.unwrap();
    let (w, uas) = write(&dst, 8, tagged(WRITER_D, 1)).await;
    assert!(uas.contains(&(0x2a, 0x05)), "{uas:?}");
    assert_eq!(w.status, RESERVATION_CONFLICT);
    assert!(read(&s, 0, BLOCKS_PER_WRITE).await == tagged(WRITER_S, 1));
    s.logout().await.unwrap();
    dst.logout().await.unwrap();
}

async fn admin(base: &str, method: &str, path: &str, body: Option<Value>) -> Value {
    let (base, method, path) = (base.to_owned(), method.to_owned(), path.to_owned());
    tokio::task::spawn_blocking(move || {
        let c = Client::new(&base, None).unwrap();
        let bytes = body.map(|b| serde_json::to_vec(&b).unwrap());
        let r = c
            .request(&method, &path, bytes.as_deref(), Duration::from_secs(60))
            .unwrap();
        let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
        assert_eq!(r.status, 200, "{method} {path}: {v}");
        v
    })
    .await
    .unwrap()
}

/// What both handovers must end in, as seen from the wire: D writes (on the path it used),
/// S is fenced (2Ah/05h, then RESERVATION CONFLICT), a third host reads and cannot write.
async fn assert_d_only_writer(d: &Daemon, s: &Session, dst: &Session) {
    let (w, uas) = write(s, 0, tagged(WRITER_S, 9)).await;
    assert!(uas.contains(&(0x2a, 0x05)), "S: {uas:?}");
    assert_eq!(w.status, RESERVATION_CONFLICT, "S is fenced");
    let (w, _) = write(dst, 0, tagged(WRITER_D, 9)).await;
    assert_eq!(w.status, GOOD, "D writes");
    let other = session(d.addr, "iqn.2026-01.test:host-x").await;
    assert!(read(&other, 0, BLOCKS_PER_WRITE).await == tagged(WRITER_D, 9));
    let (w, _) = write(&other, 0, tagged(0, 0)).await;
    assert_eq!(w.status, RESERVATION_CONFLICT, "a third host writes");
    other.logout().await.unwrap();
}

/// The target-managed handover (admin API: prepare, commit) and the initiator-driven one end
/// alike for I/O: D the only writer, S fenced. They differ in the PR state that does it:
///
/// - target-managed: one host-wide registration of D (key `owner_key(D)`, TransportID format
///   00b = the initiator name, ALL_TG_PT) holding Write Exclusive – Registrants Only, so every
///   nexus of D, on every path and with any ISID, writes; PR OUT from initiators is refused
///   while the LU is owned; the admin API shows D as owner with an epoch;
/// - initiator-driven: D's one nexus (format 01b, `name,i,0x<ISID>`) holds Write Exclusive
///   with K_dst; another path of D is not the holder and cannot write until D re-arranges
///   the reservation itself (semantics.md §3.4 multipath variant); the LU has no owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_managed_and_initiator_driven_handovers_end_alike_with_different_pr_shapes() {
    // Target-managed.
    let d = Daemon::builder(IRONLUN).start();
    let base = d.admin_url().to_owned();
    let lu = |rest: &str| format!("/v1/luns/{TARGET}/0/{rest}");
    let s = session(d.addr, HOST_S).await;
    let dst = session(d.addr, HOST_D).await;
    admin(
        &base,
        "POST",
        &lu("owner"),
        Some(json!({"host": HOST_S, "epoch": 1})),
    )
    .await;
    let hand = json!({"from": HOST_S, "to": HOST_D, "epoch": 2});
    admin(&base, "POST", &lu("handover/prepare"), Some(hand.clone())).await;
    let c = admin(&base, "POST", &lu("handover/commit"), Some(hand)).await;
    assert_eq!(c["owner"], HOST_D);
    assert_d_only_writer(&d, &s, &dst).await;
    let (res, _) = reservation(&dst).await;
    assert_eq!(
        res,
        Some((owner_key(HOST_D), kind::WRITE_EXCLUSIVE_REGISTRANTS_ONLY))
    );
    let fs = dst.read_full_status(LUN).await.unwrap();
    assert_eq!(fs.descriptors.len(), 1, "{fs:?}");
    let e = &fs.descriptors[0];
    assert_eq!(
        (e.initiator(), e.key, e.holder, e.all_tg_pt),
        (HOST_D.to_owned(), owner_key(HOST_D), true, true)
    );
    // A second path of D writes at once; D's own PR OUT is refused while the LU is owned.
    let dst2 = second_path(&d, HOST_D).await;
    let (w, _) = write(&dst2, 8, tagged(WRITER_D, 10)).await;
    assert_eq!(w.status, GOOD, "second path of the owner");
    let (r, _) = prout(&dst, OutAction::Register, 0, &OutParams::keys(0, K_DST)).await;
    assert_eq!(r.status, RESERVATION_CONFLICT, "PR OUT on an owned LU");
    let o = admin(&base, "GET", &lu("ownership"), None).await;
    assert_eq!(
        (o["owner"].as_str(), o["epoch"].as_u64()),
        (Some(HOST_D), Some(2))
    );
    for x in [s, dst, dst2] {
        x.logout().await.unwrap();
    }
    drop(d);

    // Initiator-driven.
    let d = Daemon::builder(IRONLUN).start();
    let base = d.admin_url().to_owned();
    let (s, dst) = setup_step0(&d).await;
    prout_good(
        &dst,
        OutAction::PreemptAndAbort,
        kind::WRITE_EXCLUSIVE,
        &OutParams::keys(K_DST, K_SRC),
    )
    .await;
    assert_d_only_writer(&d, &s, &dst).await;
    let (res, _) = reservation(&dst).await;
    assert_eq!(res, Some((K_DST, kind::WRITE_EXCLUSIVE)));
    let fs = dst.read_full_status(LUN).await.unwrap();
    assert_eq!(fs.descriptors.len(), 1, "{fs:?}");
    let e = &fs.descriptors[0];
    assert!(
        e.initiator().starts_with(&format!("{HOST_D},i,0x")),
        "{e:?}"
    );
    assert_eq!((e.key, e.holder, e.all_tg_pt), (K_DST, true, false));
    // A second path of D is no holder: under WE it cannot write.
    let dst2 = second_path(&d, HOST_D).await;
    let (w, _) = write(&dst2, 8, tagged(WRITER_D, 10)).await;
    assert_eq!(w.status, RESERVATION_CONFLICT, "second path under WE");
    let o = admin(&base, "GET", &lu("ownership"), None).await;
    assert!(o["owner"].is_null(), "{o}");
    let r = admin(&base, "GET", &format!("/v1/reservations/{TARGET}/0"), None).await;
    assert_eq!(r["reservation"]["type"], 1, "{r}");
    assert!(
        r["reservation"]["holder"]
            .as_str()
            .is_some_and(|h| h.starts_with(&format!("{HOST_D},i,0x"))),
        "{r}"
    );
    for x in [s, dst, dst2] {
        x.logout().await.unwrap();
    }
}
