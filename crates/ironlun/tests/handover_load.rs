//! Issue 6 acceptance 3: 100 handovers back and forth (host-a → host-b → host-a …) by
//! `ironlun migrate --json` against the real daemon, under load: the current owner writes at
//! QD16 all the time, also while its LU is handed away (semantics.md §3). Afterwards every block
//! of the region holds the last write acknowledged GOOD to it (nothing lost), and no write of a
//! former owner started after `ironlun migrate` returned was acknowledged (nothing stray). The
//! storage switch and blackout times of the runs are printed (median, p90, max).
//!
//! The hooks are `true`: the blackout is the commit plus the hooks' process overhead.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use bytes::Bytes;
use ironlun_initiator::{CommandResult, Session};
use ironlun_testkit::{session, tagged, Daemon, BLOCK_SIZE, PROMPT, TARGET};
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

const IRONLUN: &str = env!("CARGO_BIN_EXE_ironlun");

const HOSTS: [&str; 2] = ["iqn.2026-01.test:host-a", "iqn.2026-01.test:host-b"];
/// Writer ids in the tags, per host.
const WRITER: [u64; 2] = [0xA0A0_A0A0_0000_000A, 0xB0B0_B0B0_0000_000B];
const GOOD: u8 = 0x00;
const CHECK_CONDITION: u8 = 0x02;
const RESERVATION_CONFLICT: u8 = 0x18;
const TASK_ABORTED: u8 = 0x40;
/// Handovers in the run.
const HANDOVERS: usize = 100;
/// Writers per host (commands in flight).
const QUEUE_DEPTH: usize = 16;
/// The region: 32 slots of 4 KiB (8 blocks), rewritten by both hosts over and over.
const SLOTS: u64 = 32;
const BLOCKS_PER_SLOT: u32 = 8;
/// GOOD writes the new owner completes before the next handover starts.
const WRITES_BETWEEN: u64 = 48;

fn is_unit_attention(r: &CommandResult) -> bool {
    r.status == CHECK_CONDITION && r.sense_key().is_some_and(|k| k.key == 0x6)
}

/// One write to a slot, in the order the slot's lock was taken.
#[derive(Debug, Clone, Copy)]
struct Entry {
    host: usize,
    seq: u64,
    status: u8,
    /// Sense key 6 (the command was not executed).
    ua: bool,
    started: Instant,
}

/// Per host: whether its writer runs, and when (if ever) the test handed its LU away.
struct HostState {
    running: AtomicBool,
    /// Set once `ironlun migrate` away from this host returned; cleared when the host is the
    /// owner again. A RESERVATION CONFLICT on a write started after it stops the writer.
    handed_away: std::sync::Mutex<Option<Instant>>,
    in_flight: AtomicUsize,
    good: AtomicU64,
}

struct Shared {
    slots: Vec<Mutex<Vec<Entry>>>,
    next_seq: AtomicU64,
    stop: AtomicBool,
    hosts: [HostState; 2],
    /// Anything the writers saw that fails the test.
    errors: std::sync::Mutex<Vec<String>>,
}

impl Shared {
    fn error(&self, e: String) {
        self.errors.lock().unwrap().push(e);
    }
}

/// One writer of `host`: while the host's writer runs, write the next sequence number to the
/// next slot (the slot's lock is held across the write, so the writes to a slot are ordered).
async fn writer(s: Arc<Shared>, session: Arc<Session>, host: usize) {
    let h = &s.hosts[host];
    while !s.stop.load(Ordering::SeqCst) {
        // Counted in flight before looking at `running`, so that once the test saw the writer
        // stopped with nothing in flight, no write of this host starts.
        h.in_flight.fetch_add(1, Ordering::SeqCst);
        if !h.running.load(Ordering::SeqCst) {
            h.in_flight.fetch_sub(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        }
        let seq = s.next_seq.fetch_add(1, Ordering::SeqCst);
        let slot = seq % SLOTS;
        let mut log = s.slots[usize::try_from(slot).unwrap()].lock().await;
        let started = Instant::now();
        let lba = slot * u64::from(BLOCKS_PER_SLOT);
        let r = tokio::time::timeout(
            PROMPT,
            session.write16(0, lba, BLOCK_SIZE, tagged(WRITER[host], seq), false),
        )
        .await;
        let r = match r {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                s.error(format!("host {host} write {seq}: {e}"));
                h.in_flight.fetch_sub(1, Ordering::SeqCst);
                return;
            }
            Err(_) => {
                s.error(format!("host {host} write {seq} timed out"));
                h.in_flight.fetch_sub(1, Ordering::SeqCst);
                return;
            }
        };
        let ua = is_unit_attention(&r);
        log.push(Entry {
            host,
            seq,
            status: r.status,
            ua,
            started,
        });
        drop(log);
        if r.response != 0
            || !(matches!(r.status, GOOD | RESERVATION_CONFLICT | TASK_ABORTED) || ua)
        {
            s.error(format!("host {host} write {seq}: {r:?}"));
        }
        // A refusal is expected while (and after) the LU is handed away. The writer stops at
        // the first refusal of a write started after `migrate` returned.
        let away = *h.handed_away.lock().unwrap();
        match r.status {
            GOOD => {
                h.good.fetch_add(1, Ordering::SeqCst);
            }
            RESERVATION_CONFLICT if away.is_some_and(|t| started > t) => {
                h.running.store(false, Ordering::SeqCst);
            }
            _ => {}
        }
        h.in_flight.fetch_sub(1, Ordering::SeqCst);
        if r.status != GOOD {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

/// `ironlun migrate --json` from `from` to `to` with trivial hooks; exit code and summary.
fn migrate(admin: &str, journal: &Path, from: &str, to: &str) -> (Option<i32>, Value) {
    let o = Command::new(env!("CARGO_BIN_EXE_ironlun"))
        .env_remove("IRONLUN_ADMIN")
        .env_remove("IRONLUN_ADMIN_TOKEN_FILE")
        .args(["migrate", "--admin", admin, "--lun", &format!("{TARGET}/0")])
        .args(["--from", from, "--to", to, "--json", "--journal"])
        .arg(journal)
        .args(["--precopy", "true", "--pause", "true", "--resume", "true"])
        .args(["--rollback", "true", "--announce", "true"])
        .output()
        .expect("run ironlun migrate");
    let v = serde_json::from_slice(&o.stdout).unwrap_or_else(|_| {
        panic!(
            "migrate printed no JSON: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    });
    (o.status.code(), v)
}

/// (median, p90, max) of `v` (nearest rank below).
fn stats(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let at = |pct: usize| v[(v.len() - 1) * pct / 100];
    (at(50), at(90), at(100))
}

async fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_handovers_back_and_forth_under_qd16_load_lose_nothing() {
    let begun = Instant::now();
    let d = Daemon::builder(IRONLUN).start();
    let base = d.admin_url().to_owned();
    let sessions = [
        Arc::new(session(d.addr, HOSTS[0]).await),
        Arc::new(session(d.addr, HOSTS[1]).await),
    ];
    let client = ironlun_cli::ctl::Client::new(&base, None).unwrap();
    let lu = format!("/v1/luns/{TARGET}/0");
    let r = client
        .request(
            "POST",
            &format!("{lu}/owner"),
            Some(json!({"host": HOSTS[0], "epoch": 1}).to_string().as_bytes()),
            PROMPT,
        )
        .unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));

    let host_state = || HostState {
        running: AtomicBool::new(false),
        handed_away: std::sync::Mutex::new(None),
        in_flight: AtomicUsize::new(0),
        good: AtomicU64::new(0),
    };
    let shared = Arc::new(Shared {
        slots: (0..SLOTS).map(|_| Mutex::new(Vec::new())).collect(),
        next_seq: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        hosts: [host_state(), host_state()],
        errors: std::sync::Mutex::new(Vec::new()),
    });
    let mut tasks = Vec::new();
    for (host, session) in sessions.iter().enumerate() {
        for _ in 0..QUEUE_DEPTH {
            tasks.push(tokio::spawn(writer(shared.clone(), session.clone(), host)));
        }
    }
    shared.hosts[0].running.store(true, Ordering::SeqCst);

    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("m.journal");
    let (mut switch, mut blackout) = (Vec::new(), Vec::new());
    let mut returned = Vec::new();
    let mut owner = 0usize;
    for i in 0..HANDOVERS {
        // The owner has written enough since it became the owner.
        let h = &shared.hosts[owner];
        let floor = h.good.load(Ordering::SeqCst) + WRITES_BETWEEN;
        wait_for("the owner's writes", PROMPT, || {
            h.good.load(Ordering::SeqCst) >= floor
        })
        .await;
        // The former owner's writer has stopped and has nothing in flight.
        let old = &shared.hosts[1 - owner];
        wait_for("the former owner's writer to stop", PROMPT, || {
            !old.running.load(Ordering::SeqCst) && old.in_flight.load(Ordering::SeqCst) == 0
        })
        .await;

        let (from, to) = (HOSTS[owner], HOSTS[1 - owner]);
        let start = Instant::now();
        let (admin, j) = (base.clone(), journal.clone());
        let (code, v) = tokio::task::spawn_blocking(move || migrate(&admin, &j, from, to))
            .await
            .unwrap();
        let at = Instant::now();
        assert_eq!(
            (code, v["outcome"].as_str(), v["epoch"].as_u64()),
            (
                Some(0),
                Some("migrated"),
                Some(u64::try_from(i).unwrap() + 2)
            ),
            "handover {i}: {v}"
        );
        switch.push(v["storage_switch_ms"].as_f64().expect("storage_switch_ms"));
        blackout.push(v["blackout_ms"].as_f64().expect("blackout_ms"));
        returned.push((owner, start, at));
        // Switch the active writer: the old one runs on until it is refused.
        *shared.hosts[owner].handed_away.lock().unwrap() = Some(at);
        owner = 1 - owner;
        *shared.hosts[owner].handed_away.lock().unwrap() = None;
        shared.hosts[owner].running.store(true, Ordering::SeqCst);
    }
    // Let the last owner write a little more, then stop everything.
    let h = &shared.hosts[owner];
    let floor = h.good.load(Ordering::SeqCst) + WRITES_BETWEEN;
    wait_for("the last owner's writes", PROMPT, || {
        h.good.load(Ordering::SeqCst) >= floor
    })
    .await;
    let old = &shared.hosts[1 - owner];
    wait_for("the former owner's writer to stop", PROMPT, || {
        !old.running.load(Ordering::SeqCst)
    })
    .await;
    shared.stop.store(true, Ordering::SeqCst);
    for t in tasks {
        tokio::time::timeout(PROMPT, t).await.unwrap().unwrap();
    }
    let errors = shared.errors.lock().unwrap().clone();
    assert!(errors.is_empty(), "writers failed: {errors:?}");

    // Between the return of handover `k` and the start of the next one: no write of the
    // former owner is acknowledged (zero stray), and the new owner is never refused.
    let mut all: Vec<Entry> = Vec::new();
    for s in &shared.slots {
        all.extend(s.lock().await.iter().copied());
    }
    let mut stray = Vec::new();
    let mut probed = 0;
    for (k, (from, _, at)) in returned.iter().enumerate() {
        let until = returned.get(k + 1).map(|(_, t, _)| *t);
        for e in all
            .iter()
            .filter(|e| e.started > *at && until.is_none_or(|t| e.started < t))
        {
            if e.host == *from {
                probed += 1;
                if e.status == GOOD {
                    stray.push((k, e.seq));
                }
            } else {
                assert!(
                    e.status == GOOD || e.ua,
                    "the owner after handover {k} was refused: {e:?}"
                );
            }
        }
    }
    assert!(stray.is_empty(), "stray writes (handover, seq): {stray:?}");
    assert!(
        probed >= HANDOVERS,
        "every former owner tried after the handover"
    );

    // Zero lost: every slot holds the last write acknowledged GOOD to it.
    let reader = &sessions[owner];
    let (mut rewritten_by_both, mut checked) = (0, 0);
    for (slot, log) in shared.slots.iter().enumerate() {
        let log = log.lock().await;
        let last = log.iter().rev().find(|e| e.status == GOOD);
        let lba = u64::try_from(slot).unwrap() * u64::from(BLOCKS_PER_SLOT);
        let got = reader
            .read16(0, lba, BLOCKS_PER_SLOT, BLOCK_SIZE)
            .await
            .unwrap();
        assert_eq!(got.status, GOOD, "{got:?}");
        let want = last.map_or_else(
            || Bytes::from(vec![0u8; 4096]),
            |e| tagged(WRITER[e.host], e.seq),
        );
        // A write aborted after the last GOOD one may have reached the medium (SAM-5 §5.6).
        let aborted_later: Vec<Bytes> = log
            .iter()
            .rev()
            .take_while(|e| e.status != GOOD)
            .filter(|e| e.status == TASK_ABORTED)
            .map(|e| tagged(WRITER[e.host], e.seq))
            .collect();
        assert!(
            got.data == want || aborted_later.contains(&got.data),
            "slot {slot}: not the last acknowledged write {last:?} (lost or stray); got {:02x?}",
            &got.data[..16]
        );
        checked += 1;
        let good_hosts: std::collections::BTreeSet<usize> = log
            .iter()
            .filter(|e| e.status == GOOD)
            .map(|e| e.host)
            .collect();
        if good_hosts.len() == 2 {
            rewritten_by_both += 1;
        }
    }
    assert_eq!(checked, SLOTS);
    assert_eq!(
        rewritten_by_both, SLOTS,
        "every slot is rewritten by both hosts"
    );

    // The final state is what the API says.
    let o: Value =
        serde_json::from_slice(&client.get(&format!("{lu}/ownership")).unwrap().body).unwrap();
    assert_eq!(
        (o["owner"].as_str(), o["epoch"].as_u64()),
        (
            Some(HOSTS[owner]),
            Some(u64::try_from(HANDOVERS).unwrap() + 1)
        ),
        "{o}"
    );
    assert!(o["handover"].is_null(), "{o}");

    let count = |f: &dyn Fn(&Entry) -> bool| all.iter().filter(|e| f(e)).count();
    let good = count(&|e| e.status == GOOD);
    let conflicts = count(&|e| e.status == RESERVATION_CONFLICT);
    let aborted = count(&|e| e.status == TASK_ABORTED);
    let uas = count(&|e| e.ua);
    let n = switch.len();
    let (s50, s90, smax) = stats(&mut switch);
    let (b50, b90, bmax) = stats(&mut blackout);
    println!(
        "{n} handovers migrated under QD16 load in {:.1} s: storage switch median {s50:.3} ms, \
         p90 {s90:.3} ms, max {smax:.3} ms; blackout median {b50:.3} ms, p90 {b90:.3} ms, max \
         {bmax:.3} ms (hooks `true`)",
        begun.elapsed().as_secs_f64()
    );
    println!(
        "writes: {} total, {good} GOOD, {conflicts} RESERVATION CONFLICT (expected, from the \
         fenced or former owner), {uas} unit attentions, {aborted} TASK ABORTED; {probed} writes \
         of former owners after migrate returned, all refused; 0 lost, 0 stray",
        all.len()
    );
    assert_eq!(n, HANDOVERS);
    assert!(
        conflicts >= HANDOVERS,
        "every former owner is refused at least once"
    );
    for s in &sessions {
        s.logout().await.unwrap();
    }
}
