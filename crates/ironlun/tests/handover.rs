//! Target-managed ownership and the target-side handover through the admin API, against the
//! real daemon (issue 6 acceptance 1 and the daemon side of 4; semantics.md §3): a handover
//! under QD16 load from the source (no acknowledged write lost, no source write after commit,
//! source fenced), prepare without the destination, a source with I/O stuck in flight (refuse
//! or abort per `on_deadline`), `kill -9` right after commit, and the epoch rules (idempotent
//! retry, stale, abort after commit, commit after abort) and the token.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use bytes::Bytes;
use ironlun_cli::ctl::Client;
use ironlun_initiator::Session;
use ironlun_testkit::{session, tagged, Binary, Daemon, BLOCK_SIZE, PROMPT, TARGET};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const IRONLUN: &str = env!("CARGO_BIN_EXE_ironlun");

const HOST_A: &str = "iqn.2026-01.test:host-a";
const HOST_B: &str = "iqn.2026-01.test:host-b";
const GOOD: u8 = 0x00;
const CHECK_CONDITION: u8 = 0x02;
const RESERVATION_CONFLICT: u8 = 0x18;
const TASK_ABORTED: u8 = 0x40;
const TOKEN: &str = "handover-token-0123456789abcdef";

/// `method path` with an optional JSON body through the library client; status and JSON.
async fn call(
    base: &str,
    method: &str,
    path: &str,
    body: Option<Value>,
    token: Option<PathBuf>,
) -> (u16, Value) {
    let (base, method, path) = (base.to_owned(), method.to_owned(), path.to_owned());
    tokio::task::spawn_blocking(move || {
        let c = Client::new(&base, token.as_deref()).unwrap();
        let bytes = body.map(|b| serde_json::to_vec(&b).unwrap());
        let r = c
            .request(&method, &path, bytes.as_deref(), Duration::from_secs(60))
            .unwrap();
        let v = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
        (r.status, v)
    })
    .await
    .unwrap()
}

fn lu_path(rest: &str) -> String {
    format!("/v1/luns/{TARGET}/0/{rest}")
}

async fn post(base: &str, rest: &str, body: Value) -> (u16, Value) {
    call(base, "POST", &lu_path(rest), Some(body), None).await
}

async fn ownership(base: &str) -> Value {
    let (s, v) = call(base, "GET", &lu_path("ownership"), None, None).await;
    assert_eq!(s, 200, "{v}");
    v
}

async fn own(base: &str, host: &str, epoch: u64) {
    let (s, v) = post(base, "owner", json!({"host": host, "epoch": epoch})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["owner"], host);
    assert_eq!(v["epoch"], epoch);
}

fn hand(from: &str, to: &str, epoch: u64) -> Value {
    json!({"from": from, "to": to, "epoch": epoch})
}

async fn prepare(base: &str, from: &str, to: &str, epoch: u64) {
    let (s, v) = post(base, "handover/prepare", hand(from, to, epoch)).await;
    assert_eq!(s, 200, "{v}");
}

/// Commit with `deadline_ms` and `on_deadline`; status and body.
async fn commit(base: &str, from: &str, to: &str, epoch: u64, extra: Value) -> (u16, Value) {
    let mut body = hand(from, to, epoch);
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    post(base, "handover/commit", body).await
}

const WRITER_A: u64 = 0xA0A0_A0A0_0000_000A;
const WRITER_B: u64 = 0xB0B0_B0B0_0000_000B;
/// 4 KiB = 8 blocks per tagged write; write `i` goes to LBA `i * 8` (each block once).
const BLOCKS_PER_WRITE: u32 = 8;

fn is_ua_preempted(r: &ironlun_initiator::CommandResult) -> bool {
    r.status == CHECK_CONDITION
        && r.sense_key()
            .is_some_and(|k| (k.key, k.asc, k.ascq) == (0x6, 0x2a, 0x05))
}

/// One host-a write: its sequence number, when it started and returned, and its status.
#[derive(Debug, Clone, Copy)]
struct Record {
    seq: u64,
    started: Instant,
    returned: Instant,
    status: u8,
}

/// Issue 6 acceptance 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handover_under_qd16_load_loses_nothing_and_fences_the_source() {
    let d = Daemon::builder(IRONLUN).start();
    let base = d.admin_url().to_owned();
    let a = Arc::new(session(d.addr, HOST_A).await);
    let b = session(d.addr, HOST_B).await;
    own(&base, HOST_A, 1).await;
    // host-b reads, cannot write.
    let w = b
        .write16(0, 1 << 20, BLOCK_SIZE, tagged(WRITER_B, 0), false)
        .await
        .unwrap();
    assert_eq!(w.status, RESERVATION_CONFLICT, "{w:?}");
    assert_eq!(b.read16(0, 0, 8, BLOCK_SIZE).await.unwrap().status, GOOD);

    // host-a writes at QD16, every write to blocks of its own: write `seq` to block `seq`
    // until the commit; after it (when `limit` is set) to block `seq % limit`, so that every
    // block host-a ever writes is below `limit` and host-b can overwrite them all.
    let next = Arc::new(AtomicU64::new(0));
    let limit = Arc::new(AtomicU64::new(u64::MAX));
    let stop = Arc::new(AtomicBool::new(false));
    let records = Arc::new(Mutex::new(Vec::<Record>::new()));
    let mut writers = Vec::new();
    for _ in 0..16 {
        let (a, next, stop, records) = (a.clone(), next.clone(), stop.clone(), records.clone());
        let limit = limit.clone();
        writers.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let seq = next.fetch_add(1, Ordering::SeqCst);
                let block = seq % limit.load(Ordering::SeqCst);
                let lba = block * u64::from(BLOCKS_PER_WRITE);
                let started = Instant::now();
                let r = tokio::time::timeout(
                    PROMPT,
                    a.write16(0, lba, BLOCK_SIZE, tagged(WRITER_A, seq), false),
                )
                .await
                .expect("host-a write timed out")
                .expect("host-a write");
                assert_eq!(r.response, 0);
                let rec = Record {
                    seq,
                    started,
                    returned: Instant::now(),
                    status: r.status,
                };
                let ua = is_ua_preempted(&r);
                assert!(
                    matches!(r.status, GOOD | RESERVATION_CONFLICT | TASK_ABORTED) || ua,
                    "host-a write {seq}: {r:?}"
                );
                records.lock().unwrap().push(rec);
                if r.status != GOOD {
                    // Refused: keep trying, without spinning.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }));
    }
    // The handover starts once host-a has had more than 16 writes answered (a poll, with a
    // hang guard; no bound on how long they take).
    let mut polls = 0;
    while records.lock().unwrap().len() <= 16 {
        polls += 1;
        assert!(polls < 10_000, "host-a's writes are not answered");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }

    prepare(&base, HOST_A, HOST_B, 2).await;
    let (s, c) = commit(&base, HOST_A, HOST_B, 2, json!({"deadline_ms": 5000})).await;
    let committed = Instant::now();
    // At most 16 writes are between fetching a sequence number and reading `limit`.
    let tried = next.load(Ordering::SeqCst) + 1000;
    limit.store(tried, Ordering::SeqCst);
    assert_eq!(s, 200, "{c}");
    assert_eq!(c["owner"], HOST_B);
    assert_eq!(c["idempotent"], false);
    let steps = &c["steps_us"];
    println!(
        "commit under QD16 load: fence {} µs, drain {} µs, flush {} µs, transfer {} µs, total {} µs, aborted_tasks {}",
        steps["fence"], steps["drain"], steps["flush"], steps["transfer"], steps["total"], c["aborted_tasks"]
    );
    for k in ["fence", "drain", "flush", "transfer", "total"] {
        assert!(steps[k].is_u64(), "{k}: {c}");
    }

    // Every write host-a acknowledged is on the LU (read as host-b, right after commit).
    let acked: Vec<Record> = records
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.status == GOOD)
        .copied()
        .collect();
    assert!(!acked.is_empty());
    for r in &acked {
        assert!(
            r.started < committed,
            "host-a write {} GOOD after commit",
            r.seq
        );
        let lba = r.seq * u64::from(BLOCKS_PER_WRITE);
        let got = b
            .read16(0, lba, BLOCKS_PER_WRITE, BLOCK_SIZE)
            .await
            .unwrap();
        assert_eq!(got.status, GOOD);
        assert!(
            got.data == tagged(WRITER_A, r.seq),
            "acknowledged host-a write {} is not on the LU",
            r.seq
        );
    }

    // host-b overwrites every block host-a ever tried, while host-a keeps trying.
    for seq in 0..tried {
        let lba = seq * u64::from(BLOCKS_PER_WRITE);
        let w = b
            .write16(0, lba, BLOCK_SIZE, tagged(WRITER_B, seq), false)
            .await
            .unwrap();
        assert_eq!(w.status, GOOD, "host-b write {seq}: {w:?}");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for seq in 0..tried {
        let lba = seq * u64::from(BLOCKS_PER_WRITE);
        let got = b
            .read16(0, lba, BLOCKS_PER_WRITE, BLOCK_SIZE)
            .await
            .unwrap();
        assert_eq!(got.status, GOOD);
        assert!(
            got.data == tagged(WRITER_B, seq),
            "a host-a write landed on block {seq} after commit returned"
        );
    }

    // Every host-a write started after commit returned got RESERVATION CONFLICT (one may
    // carry the REGISTRATIONS PREEMPTED unit attention instead, SAM-5 §5.14).
    let all = records.lock().unwrap().clone();
    let after: Vec<&Record> = all.iter().filter(|r| r.started > committed).collect();
    assert!(!after.is_empty(), "host-a wrote nothing after the commit");
    let conflicts = after
        .iter()
        .filter(|r| r.status == RESERVATION_CONFLICT)
        .count();
    assert!(
        conflicts + 1 >= after.len() && after.iter().all(|r| r.status != GOOD),
        "host-a after commit: {:?}",
        after.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    assert!(all.iter().all(|r| r.returned >= r.started));
    println!(
        "host-a writes: {} total, {} acknowledged, {} after commit (all refused)",
        all.len(),
        acked.len(),
        after.len()
    );

    // host-b writes and reads normally; the state is what the API says.
    let o = ownership(&base).await;
    assert_eq!(o["owner"], HOST_B);
    assert_eq!(o["epoch"], 2);
    assert!(o["handover"].is_null());
    let (s, ev) = call(&base, "GET", "/v1/events?since=0", None, None).await;
    assert_eq!(s, 200);
    let kinds: Vec<&str> = ev["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["ownership", "handover_prepare", "handover_commit"]);
    a.logout().await.unwrap();
    b.logout().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepare_without_the_destination_logged_in_changes_nothing() {
    let d = Daemon::builder(IRONLUN).start();
    let base = d.admin_url().to_owned();
    let a = session(d.addr, HOST_A).await;
    own(&base, HOST_A, 1).await;
    let before = ownership(&base).await;
    let (s, v) = post(&base, "handover/prepare", hand(HOST_A, HOST_B, 2)).await;
    assert_eq!(
        (s, v["code"].as_str()),
        (409, Some("destination_not_logged_in")),
        "{v}"
    );
    assert_eq!(ownership(&base).await, before);
    let w = a
        .write16(0, 0, BLOCK_SIZE, tagged(WRITER_A, 0), false)
        .await
        .unwrap();
    assert_eq!(w.status, GOOD);
    // Not the owner, same host, bad input.
    let _b = session(d.addr, HOST_B).await;
    let (s, v) = post(&base, "handover/prepare", hand(HOST_B, HOST_A, 2)).await;
    assert_eq!((s, v["code"].as_str()), (409, Some("not_owner")), "{v}");
    let (s, v) = post(&base, "handover/prepare", hand(HOST_A, HOST_A, 2)).await;
    assert_eq!((s, v["code"].as_str()), (400, Some("same_host")), "{v}");
    let (s, v) = post(&base, "handover/prepare", json!({"from": HOST_A})).await;
    assert_eq!((s, v["code"].as_str()), (400, Some("bad_request")), "{v}");
    let (s, v) = post(&base, "handover/prepare", hand(HOST_A, HOST_B, 1)).await;
    assert_eq!((s, v["code"].as_str()), (409, Some("stale_epoch")), "{v}");
    let (s, v) = post(&base, "handover/commit", hand(HOST_A, HOST_B, 2)).await;
    assert_eq!((s, v["code"].as_str()), (409, Some("not_prepared")), "{v}");
    assert_eq!(ownership(&base).await, before);
}

/// WRITE SAME(16) (SBC-3 §5.42) of `blocks` non-zero blocks from LBA 0: on a file LUN it runs
/// as 1 MiB writes, one after another, for a long time.
async fn start_write_same(s: Arc<Session>, blocks: u32) -> tokio::task::JoinHandle<u8> {
    let mut cdb = [0u8; 16];
    cdb[0] = 0x93;
    cdb[10..14].copy_from_slice(&blocks.to_be_bytes());
    let block = Bytes::from(vec![0x5a; BLOCK_SIZE as usize]);
    tokio::spawn(async move {
        let r = s.command(0, &cdb, block, 0).await.unwrap();
        assert_eq!(r.response, 0);
        r.status
    })
}

/// The largest WRITE SAME the LU takes (VPD B0h MAXIMUM WRITE SAME LENGTH): 512 MiB.
const WS_BLOCKS: u32 = 0x10_0000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stuck_source_io_is_refused_or_aborted_per_flag() {
    let d = Daemon::builder(IRONLUN).start();
    let base = d.admin_url().to_owned();
    let a = Arc::new(session(d.addr, HOST_A).await);
    let _b = session(d.addr, HOST_B).await;
    own(&base, HOST_A, 1).await;

    // refuse: the source's long WRITE SAME does not drain in 20 ms; the fence goes again and
    // the source keeps writing.
    let ws = start_write_same(a.clone(), WS_BLOCKS).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !ws.is_finished(),
        "WRITE SAME finished too fast to be stuck"
    );
    prepare(&base, HOST_A, HOST_B, 2).await;
    let t = Instant::now();
    let (s, v) = commit(
        &base,
        HOST_A,
        HOST_B,
        2,
        json!({"deadline_ms": 20, "on_deadline": "refuse"}),
    )
    .await;
    println!("refused commit answered in {:?}", t.elapsed());
    assert_eq!((s, v["code"].as_str()), (409, Some("drain_timeout")), "{v}");
    let o = ownership(&base).await;
    assert_eq!(
        (o["owner"].as_str(), o["epoch"].as_u64()),
        (Some(HOST_A), Some(1))
    );
    assert!(o["handover"].is_null(), "{o}");
    let w = a
        .write16(0, (1 << 20) + 8, BLOCK_SIZE, tagged(WRITER_A, 1), false)
        .await
        .unwrap();
    assert_eq!(w.status, GOOD, "the source writes after a refused handover");
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(120), ws)
            .await
            .unwrap()
            .unwrap(),
        GOOD
    );

    // abort: the stuck WRITE SAME is aborted at the deadline and the commit completes.
    let ws = start_write_same(a.clone(), WS_BLOCKS).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !ws.is_finished(),
        "WRITE SAME finished too fast to be stuck"
    );
    prepare(&base, HOST_A, HOST_B, 3).await;
    let (s, v) = commit(
        &base,
        HOST_A,
        HOST_B,
        3,
        json!({"deadline_ms": 20, "on_deadline": "abort"}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    println!(
        "commit with an aborted WRITE SAME: steps_us {}",
        v["steps_us"]
    );
    assert_eq!(v["aborted_tasks"], 1);
    assert_eq!(v["owner"], HOST_B);
    // Aborted before its end: never GOOD.
    let st = tokio::time::timeout(PROMPT, ws).await.unwrap().unwrap();
    assert_ne!(st, GOOD, "the aborted WRITE SAME completed GOOD");
    assert!(v["steps_us"]["total"].as_u64().unwrap() < 10_000_000, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_new_owner_survives_kill_9_right_after_commit() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::builder(IRONLUN).start_in(dir.path());
    let base = d.admin_url().to_owned();
    let a = session(d.addr, HOST_A).await;
    let b = session(d.addr, HOST_B).await;
    own(&base, HOST_A, 1).await;
    prepare(&base, HOST_A, HOST_B, 2).await;
    let (s, v) = commit(&base, HOST_A, HOST_B, 2, json!({})).await;
    assert_eq!(s, 200, "{v}");
    drop((a, b));
    d.kill9();

    let d = Daemon::builder(IRONLUN).start_in(dir.path());
    let base = d.admin_url().to_owned();
    let o = ownership(&base).await;
    assert_eq!(
        (o["owner"].as_str(), o["epoch"].as_u64()),
        (Some(HOST_B), Some(2)),
        "{o}"
    );
    let a = session(d.addr, HOST_A).await;
    let b = session(d.addr, HOST_B).await;
    let w = b
        .write16(0, 0, BLOCK_SIZE, tagged(WRITER_B, 0), true)
        .await
        .unwrap();
    assert_eq!(w.status, GOOD, "{w:?}");
    let w = a
        .write16(0, 0, BLOCK_SIZE, tagged(WRITER_A, 0), true)
        .await
        .unwrap();
    assert_eq!(w.status, RESERVATION_CONFLICT, "{w:?}");
    // The retried commit after the restart is still idempotent.
    let (s, v) = commit(&base, HOST_A, HOST_B, 2, json!({})).await;
    assert_eq!((s, v["idempotent"].as_bool()), (200, Some(true)), "{v}");
    a.logout().await.unwrap();
    b.logout().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn epochs_retry_stale_committed_and_aborted() {
    let d = Daemon::builder(IRONLUN).start();
    let base = d.admin_url().to_owned();
    let _a = session(d.addr, HOST_A).await;
    let _b = session(d.addr, HOST_B).await;
    own(&base, HOST_A, 1).await;
    prepare(&base, HOST_A, HOST_B, 2).await;
    let (s, first) = commit(&base, HOST_A, HOST_B, 2, json!({})).await;
    assert_eq!(s, 200, "{first}");
    let generation = first["generation"].clone();
    // Retried commit: idempotent, nothing changes.
    let (s, v) = commit(&base, HOST_A, HOST_B, 2, json!({})).await;
    assert_eq!((s, v["idempotent"].as_bool()), (200, Some(true)), "{v}");
    assert_eq!(v["generation"], generation);
    assert_eq!(v["owner"], HOST_B);
    // Lower epoch.
    let (s, v) = commit(&base, HOST_B, HOST_A, 1, json!({})).await;
    assert_eq!((s, v["code"].as_str()), (409, Some("stale_epoch")), "{v}");
    // Abort of the committed epoch.
    let (s, v) = post(&base, "handover/abort", hand(HOST_A, HOST_B, 2)).await;
    assert_eq!((s, v["code"].as_str()), (409, Some("committed")), "{v}");
    // Hand-back prepared, aborted (twice: idempotent), then its commit is refused.
    prepare(&base, HOST_B, HOST_A, 3).await;
    assert_eq!(ownership(&base).await["handover"]["state"], "prepared");
    for _ in 0..2 {
        let (s, v) = post(&base, "handover/abort", hand(HOST_B, HOST_A, 3)).await;
        assert_eq!(s, 200, "{v}");
    }
    let (s, v) = commit(&base, HOST_B, HOST_A, 3, json!({})).await;
    assert_eq!((s, v["code"].as_str()), (409, Some("aborted")), "{v}");
    let (s, v) = post(&base, "handover/prepare", hand(HOST_B, HOST_A, 3)).await;
    assert_eq!((s, v["code"].as_str()), (409, Some("aborted")), "{v}");
    // Hand-back at the next epoch works.
    prepare(&base, HOST_B, HOST_A, 4).await;
    let (s, v) = commit(&base, HOST_B, HOST_A, 4, json!({})).await;
    assert_eq!((s, v["owner"].as_str()), (200, Some(HOST_A)), "{v}");
    let (s, v) = commit(&base, HOST_A, HOST_B, 4, json!({"on_deadline": "never"})).await;
    assert_eq!((s, v["code"].as_str()), (400, Some("bad_request")), "{v}");
    // The reservations view shows the owner too.
    let (s, r) = call(
        &base,
        "GET",
        &format!("/v1/reservations/{TARGET}/0"),
        None,
        None,
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(
        (r["owner"].as_str(), r["epoch"].as_u64()),
        (Some(HOST_A), Some(4)),
        "{r}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ownership_endpoints_require_the_token() {
    let config = format!(
        "[admin]\ntoken_file = \"admin.token\"\n[[target]]\nname = \"{TARGET}\"\n[[target.lun]]\nid = 0\nbackstore = \"ram\"\nsize = \"1MiB\"\n"
    );
    let d = Daemon::builder(IRONLUN)
        .config(&config)
        .file("admin.token", &format!("{TOKEN}\n"))
        .start();
    let base = d.admin_url().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good");
    std::fs::write(&good, TOKEN).unwrap();
    let _a = session(d.addr, HOST_A).await;
    let body = json!({"host": HOST_A, "epoch": 1});
    let requests: [(&str, String, Option<Value>); 6] = [
        ("GET", lu_path("ownership"), None),
        ("GET", "/v1/events".to_owned(), None),
        ("POST", lu_path("owner"), Some(body.clone())),
        (
            "POST",
            lu_path("handover/prepare"),
            Some(hand(HOST_A, HOST_B, 2)),
        ),
        (
            "POST",
            lu_path("handover/commit"),
            Some(hand(HOST_A, HOST_B, 2)),
        ),
        (
            "POST",
            lu_path("handover/abort"),
            Some(hand(HOST_A, HOST_B, 2)),
        ),
    ];
    for (m, p, b) in &requests {
        let (s, v) = call(&base, m, p, b.clone(), None).await;
        assert_eq!(
            (s, v["code"].as_str()),
            (401, Some("unauthorized")),
            "{m} {p}"
        );
    }
    assert!(ownership_with(&base, &good).await["owner"].is_null());
    let (s, v) = call(
        &base,
        "POST",
        &lu_path("owner"),
        Some(body),
        Some(good.clone()),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(ownership_with(&base, &good).await["owner"], HOST_A);
}

async fn ownership_with(base: &str, token: &std::path::Path) -> Value {
    let (s, v) = call(
        base,
        "GET",
        &lu_path("ownership"),
        None,
        Some(token.to_owned()),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    v
}

fn ctl(base: &str, args: &[&str]) -> std::process::Output {
    Binary::new(IRONLUN).ctl_at(base, args)
}

fn stdout_of(o: &std::process::Output) -> String {
    assert!(
        o.status.success(),
        "{:?}: {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_own_ownership_handover_and_events() {
    let d = Daemon::builder(IRONLUN).start();
    let base = d.admin_url().to_owned();
    let _a = session(d.addr, HOST_A).await;
    let _b = session(d.addr, HOST_B).await;
    let lu = format!("{TARGET}/0");
    let out = stdout_of(&ctl(&base, &["own", &lu, HOST_A]));
    let cells = |out: &str, n: usize| -> Vec<Vec<String>> {
        out.lines()
            .map(|l| l.split_whitespace().take(n).map(str::to_owned).collect())
            .collect()
    };
    assert_eq!(
        cells(&out, 4),
        [
            ["LUN", "OWNER", "EPOCH", "GENERATION"].map(str::to_owned),
            [lu.as_str(), HOST_A, "1", "1"].map(str::to_owned)
        ],
        "{out}"
    );
    let out = stdout_of(&ctl(&base, &["ownership"]));
    assert_eq!(
        cells(&out, 5),
        [
            ["LUN", "OWNER", "EPOCH", "GENERATION", "HANDOVER"].map(str::to_owned),
            [lu.as_str(), HOST_A, "1", "1", "-"].map(str::to_owned)
        ],
        "{out}"
    );
    // `ctl --json` before the subcommand: the API's JSON, as with the subcommand's own flag.
    let o = ctl(&base, &["--json", "ownership", &lu]);
    let v: Value = serde_json::from_str(&stdout_of(&o)).unwrap();
    assert_eq!(v["owner"], HOST_A);
    let step = |s: &str| {
        vec![
            "handover".to_owned(),
            s.to_owned(),
            lu.clone(),
            "--from".into(),
            HOST_A.into(),
            "--to".into(),
            HOST_B.into(),
            "--epoch".into(),
            "2".into(),
        ]
    };
    let args = step("prepare");
    let out = stdout_of(&ctl(
        &base,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    ));
    assert!(out.contains("prepared"), "{out}");
    let out = stdout_of(&ctl(&base, &["reservations", &lu]));
    assert!(
        out.contains(&format!(
            "owner: {HOST_A}, epoch 1, handover prepared {HOST_A} -> {HOST_B} (epoch 2)"
        )),
        "{out}"
    );
    let mut args = step("commit");
    args.extend(["--deadline-ms".into(), "1000".into(), "--json".into()]);
    let out = stdout_of(&ctl(
        &base,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    ));
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["owner"], HOST_B);
    assert!(v["steps_us"]["total"].is_u64(), "{v}");
    // A refused step: exit status 1 and the code on stderr.
    let args = step("abort");
    let o = ctl(&base, &args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("[committed] (HTTP 409)"));
    let out = stdout_of(&ctl(&base, &["ownership", &lu, "--json"]));
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (v["owner"].as_str(), v["epoch"].as_u64()),
        (Some(HOST_B), Some(2))
    );
    let out = stdout_of(&ctl(&base, &["events"]));
    let kinds: Vec<&str> = out
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3))
        .collect();
    assert_eq!(
        kinds,
        ["KIND", "ownership", "handover_prepare", "handover_commit"],
        "{out}"
    );
    let out = stdout_of(&ctl(&base, &["events", "--since", "2", "--json"]));
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["events"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["events"][0]["seq"], 3);
}

/// A `pr_out` event names the service action and the initiator port that sent it: host-b's
/// PREEMPT AND ABORT of host-a shows as such in `/v1/events` (who fenced whom).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pr_out_events_name_the_action_and_the_initiator() {
    use ironlun_initiator::pr::{OutAction, OutParams};
    let d = Daemon::builder(IRONLUN).start();
    let base = d.admin_url().to_owned();
    let a = session(d.addr, HOST_A).await;
    let b = session(d.addr, HOST_B).await;
    let ok = |r: ironlun_initiator::CommandResult| assert_eq!(r.status, GOOD, "{r:?}");
    ok(
        a.pr_out(0, OutAction::Register, 0, &OutParams::keys(0, 0xa))
            .await
            .unwrap(),
    );
    ok(
        b.pr_out(0, OutAction::Register, 0, &OutParams::keys(0, 0xb))
            .await
            .unwrap(),
    );
    ok(a.pr_out(0, OutAction::Reserve, 5, &OutParams::keys(0xa, 0))
        .await
        .unwrap());
    ok(
        b.pr_out(0, OutAction::PreemptAndAbort, 5, &OutParams::keys(0xb, 0xa))
            .await
            .unwrap(),
    );
    let (s, ev) = call(&base, "GET", "/v1/events?since=0", None, None).await;
    assert_eq!(s, 200);
    let got: Vec<(String, String)> = ev["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "pr_out")
        .map(|e| {
            let d = &e["detail"];
            let who = d["initiator"]
                .as_str()
                .unwrap_or("")
                .split(',')
                .next()
                .unwrap_or("");
            (
                d["action"].as_str().unwrap_or("").to_owned(),
                who.to_owned(),
            )
        })
        .collect();
    let want: Vec<(String, String)> = [
        ("REGISTER", HOST_A),
        ("REGISTER", HOST_B),
        ("RESERVE", HOST_A),
        ("PREEMPT AND ABORT", HOST_B),
    ]
    .iter()
    .map(|(a, h)| (a.to_string(), h.to_string()))
    .collect();
    assert_eq!(got, want, "{ev}");
    let last = &ev["events"].as_array().unwrap().last().unwrap()["detail"];
    assert_eq!(last["registrations"], 1, "{last}");
}

/// Issue 19 (the libvirt hook's switchover): a handover prepared with `commit_on_write`
/// changes nothing until the destination's first write, which waits while the commit runs:
/// the source's WRITE SAME still in flight is aborted at the deadline and ends before the
/// destination's write does; from then on the destination owns the LU. An abort disarms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_on_write_commits_at_the_destinations_first_write() {
    let d = Daemon::builder(IRONLUN).start();
    let base = d.admin_url().to_owned();
    let a = Arc::new(session(d.addr, HOST_A).await);
    let b = session(d.addr, HOST_B).await;
    own(&base, HOST_A, 1).await;
    let armed = |epoch: u64| json!({"from": HOST_A, "to": HOST_B, "epoch": epoch, "commit_on_write": true, "deadline_ms": 50});

    // Armed, then aborted: nothing changes, and a later write of B triggers nothing.
    let (s, v) = post(&base, "handover/prepare", armed(2)).await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = post(&base, "handover/abort", hand(HOST_A, HOST_B, 2)).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        write(&b, 0, WRITER_B, 0).await.unwrap().status,
        RESERVATION_CONFLICT
    );
    assert_eq!(ownership(&base).await["owner"], HOST_A);

    // Armed: the source keeps writing and the destination reads until its first write.
    let (s, v) = post(&base, "handover/prepare", armed(3)).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(write(&a, 8, WRITER_A, 1).await.unwrap().status, GOOD);
    assert_eq!(b.read16(0, 0, 8, BLOCK_SIZE).await.unwrap().status, GOOD);
    assert_eq!(ownership(&base).await["owner"], HOST_A);
    // The source's WRITE SAME in flight at the switchover.
    let ws = start_write_same(a.clone(), WS_BLOCKS).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !ws.is_finished(),
        "WRITE SAME finished too fast to be in flight"
    );
    let t = Instant::now();
    let w = write(&b, 16, WRITER_B, 1).await.unwrap();
    let took = t.elapsed();
    assert_eq!(w.status, GOOD, "the destination's first write: {w:?}");
    let ws = tokio::time::timeout(PROMPT, ws).await.unwrap().unwrap();
    assert_eq!(ws, TASK_ABORTED);
    // Its I/O ended before the destination's write did: nothing of it lands afterwards.
    let sample = || async {
        let mut v = Vec::new();
        for i in 0..64u64 {
            v.push(b.read16(0, i * 8192, 1, BLOCK_SIZE).await.unwrap().data[0]);
        }
        v
    };
    let first = sample().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        sample().await,
        first,
        "a write of the source landed after the switchover"
    );
    println!("the destination's first write, with the handover, took {took:?}");
    let o = ownership(&base).await;
    assert_eq!(
        (o["owner"].as_str(), o["epoch"].as_u64()),
        (Some(HOST_B), Some(3))
    );
    assert!(o["handover"].is_null(), "{o}");
    // The source: 2Ah/05h, then RESERVATION CONFLICT; its acknowledged write is there.
    assert!(is_ua_preempted(&write(&a, 24, WRITER_A, 2).await.unwrap()));
    assert_eq!(
        write(&a, 24, WRITER_A, 2).await.unwrap().status,
        RESERVATION_CONFLICT
    );
    let r = b.read16(0, (1 << 20) + 8, 8, BLOCK_SIZE).await.unwrap();
    assert_eq!(r.data, tagged(WRITER_A, 1));
    let (_, ev) = call(&base, "GET", "/v1/events", None, None).await;
    let commits = ev["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "handover_commit")
        .count();
    assert_eq!(commits, 1, "{ev}");
}

/// A tagged 4 KiB write at 512 MiB + `lba` blocks.
async fn write(
    s: &Session,
    lba: u64,
    w: u64,
    seq: u64,
) -> ironlun_initiator::Result<ironlun_initiator::CommandResult> {
    s.write16(0, (1 << 20) + lba, BLOCK_SIZE, tagged(w, seq), false)
        .await
}
