//! The handover workload of issue 6 acceptance 3, shared by the one-node test
//! (`crates/ironlun/tests/handover_load.rs`) and the cluster test (issue 18 acceptance 5,
//! `crates/ironlun/tests/cluster_gateways.rs`): two hosts, the current owner writing at
//! QD16 all the time, `ironlun migrate --json` handing the LU back and forth, then the checks:
//! every block of the region holds the last write acknowledged GOOD to it (nothing lost), and
//! no write of a former owner started after `ironlun migrate` returned was acknowledged
//! (nothing stray).

use crate::{tagged, BLOCK_SIZE, PROMPT};
use bytes::Bytes;
use ironlun_initiator::{CommandResult, Session};
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

/// Writer ids in the tags, per host.
const WRITER: [u64; 2] = [0xA0A0_A0A0_0000_000A, 0xB0B0_B0B0_0000_000B];
const GOOD: u8 = 0x00;
const CHECK_CONDITION: u8 = 0x02;
const RESERVATION_CONFLICT: u8 = 0x18;
const TASK_ABORTED: u8 = 0x40;
/// Writers per host (commands in flight).
pub const QUEUE_DEPTH: usize = 16;
/// The region: 32 slots of 4 KiB (8 blocks), rewritten by both hosts over and over.
const SLOTS: u64 = 32;
const BLOCKS_PER_SLOT: u32 = 8;
/// GOOD writes the new owner completes before the next handover starts.
const WRITES_BETWEEN: u64 = 48;

/// NOT READY, LOGICAL UNIT NOT ACCESSIBLE (04h/0Ah transitioning, 0Bh standby): a cluster
/// gateway that is not the LU's active one refuses the command; the host retries it.
fn is_not_accessible(r: &CommandResult) -> bool {
    r.status == CHECK_CONDITION
        && r.sense_key()
            .is_some_and(|k| k.key == 0x2 && k.asc == 0x04 && matches!(k.ascq, 0x0A | 0x0B))
}

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
    /// NOT READY 04h/0Ah or 0Bh: sent to a gateway that is not the LU's active one.
    not_accessible: bool,
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
    /// NOT READY 04h/0Ah or 0Bh is an expected refusal (cluster mode).
    not_accessible_ok: bool,
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
            not_accessible: is_not_accessible(&r),
            started,
        });
        drop(log);
        let not_accessible = is_not_accessible(&r);
        if r.response != 0
            || !(matches!(r.status, GOOD | RESERVATION_CONFLICT | TASK_ABORTED)
                || ua
                || (not_accessible && s.not_accessible_ok))
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
            RESERVATION_CONFLICT | CHECK_CONDITION
                if away.is_some_and(|t| started > t) && (!ua || not_accessible) =>
            {
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

/// `ironlun migrate --json` from `from` to `to` through `admin`, with trivial hooks but
/// `resume`; exit code and summary.
fn migrate(
    run: &HandoverLoad,
    admin: &str,
    journal: &Path,
    (from, to): (&str, &str),
    resume: &str,
    refuse: bool,
) -> (Option<i32>, Value) {
    let o = Command::new(&run.ironlun)
        .env_remove("IRONLUN_ADMIN")
        .env_remove("IRONLUN_ADMIN_TOKEN_FILE")
        .args(["migrate", "--admin", admin, "--lun", &run.lun])
        .args(["--from", from, "--to", to, "--json", "--journal"])
        .arg(journal)
        .args(["--precopy", "true", "--pause", "true", "--resume", resume])
        .args(["--rollback", "true", "--announce", "true"])
        .args(if refuse {
            &["--on-deadline", "refuse"][..]
        } else {
            &[]
        })
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
pub fn stats(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let at = |pct: usize| v[(v.len() - 1) * pct / 100];
    (at(50), at(90), at(100))
}

pub async fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// One run of the workload. The caller has logged in both hosts' sessions and made
/// `hosts[0]` the owner at epoch 1.
pub struct HandoverLoad {
    /// The `ironlun` binary (`ironlun migrate`).
    pub ironlun: String,
    /// `TARGET/LUN` (LUN 0 of the sessions).
    pub lun: String,
    pub hosts: [String; 2],
    /// One session per host.
    pub sessions: [Arc<Session>; 2],
    /// The admin APIs the handovers go through, in turn (handover `i`: `admins[i % len]`).
    pub admins: Vec<String>,
    /// The `--resume` hook of handover `i` to host `to` (`sh -c`): `resume(i, to)`.
    pub resume: Box<dyn Fn(usize, usize) -> String + Send + Sync>,
    /// NOT READY 04h/0Ah or 0Bh (a gateway that is not the LU's active one) is an expected
    /// refusal for both hosts, retried (cluster mode); otherwise it fails the run.
    pub not_accessible_ok: bool,
    pub handovers: usize,
    /// Every `refuse_every`-th handover (0: none) runs with `--on-deadline refuse` (in
    /// cluster mode: a fence record and a commit record instead of one switch record).
    pub refuse_every: usize,
}

/// What a run measured.
#[derive(Debug)]
pub struct Outcome {
    /// Index of the host owning the LU at the end.
    pub owner: usize,
    /// `storage_switch_ms` and `blackout_ms` of each handover, as `ironlun migrate` reported.
    pub switch_ms: Vec<f64>,
    pub blackout_ms: Vec<f64>,
    /// The target's commit steps of each handover in µs: fence, drain, flush, transfer.
    pub steps_us: Vec<[u64; 4]>,
    /// Whether each handover ran with `--on-deadline refuse` ([`HandoverLoad::refuse_every`]).
    pub refused_mode: Vec<bool>,
    /// Write counts, for the report.
    pub summary: String,
}

impl HandoverLoad {
    /// Run the handovers under load and check that nothing was lost or stray (panics on a
    /// violation, naming it).
    pub async fn run(self) -> Outcome {
        let begun = Instant::now();
        let host_state = || HostState {
            running: AtomicBool::new(false),
            handed_away: std::sync::Mutex::new(None),
            in_flight: AtomicUsize::new(0),
            good: AtomicU64::new(0),
        };
        let shared = Arc::new(Shared {
            not_accessible_ok: self.not_accessible_ok,
            slots: (0..SLOTS).map(|_| Mutex::new(Vec::new())).collect(),
            next_seq: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            hosts: [host_state(), host_state()],
            errors: std::sync::Mutex::new(Vec::new()),
        });
        let mut tasks = Vec::new();
        for (host, session) in self.sessions.iter().enumerate() {
            for _ in 0..QUEUE_DEPTH {
                tasks.push(tokio::spawn(writer(shared.clone(), session.clone(), host)));
            }
        }
        shared.hosts[0].running.store(true, Ordering::SeqCst);

        let dir = tempfile::tempdir().unwrap();
        let journal = dir.path().join("m.journal");
        let (mut switch, mut blackout, mut steps) = (Vec::new(), Vec::new(), Vec::new());
        let mut refused_mode = Vec::new();
        let mut returned = Vec::new();
        let mut owner = 0usize;
        let run = Arc::new(self);
        for i in 0..run.handovers {
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

            let start = Instant::now();
            let (r, j) = (run.clone(), journal.clone());
            let ((code, v), refuse) = tokio::task::spawn_blocking(move || {
                let admin = &r.admins[i % r.admins.len()];
                let hosts = (r.hosts[owner].as_str(), r.hosts[1 - owner].as_str());
                let refuse = r.refuse_every > 0 && i % r.refuse_every == r.refuse_every - 1;
                let out = migrate(&r, admin, &j, hosts, &(r.resume)(i, 1 - owner), refuse);
                (out, refuse)
            })
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
            let us = |k: &str| v["commit"]["steps_us"][k].as_u64().unwrap_or(0);
            steps.push([us("fence"), us("drain"), us("flush"), us("transfer")]);
            refused_mode.push(refuse);
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
        // former owner is acknowledged (zero stray), and the new owner is never refused
        // (but for NOT READY from a gateway that is not active yet, where allowed).
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
                        e.status == GOOD || e.ua || (e.not_accessible && run.not_accessible_ok),
                        "the owner after handover {k} was refused: {e:?}"
                    );
                }
            }
        }
        assert!(stray.is_empty(), "stray writes (handover, seq): {stray:?}");
        assert!(
            probed >= run.handovers,
            "every former owner tried after the handover"
        );

        // Zero lost: every slot holds the last write acknowledged GOOD to it, read through
        // the last owner's session.
        let reader = &run.sessions[owner];
        let (mut rewritten_by_both, mut checked) = (0, 0);
        for (slot, log) in shared.slots.iter().enumerate() {
            let log = log.lock().await;
            let last = log.iter().rev().find(|e| e.status == GOOD);
            let lba = u64::try_from(slot).unwrap() * u64::from(BLOCKS_PER_SLOT);
            let got = crate::past_ua(
                reader,
                0,
                &read16_cdb(lba, BLOCKS_PER_SLOT),
                Bytes::new(),
                4096,
            )
            .await
            .0;
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

        let count = |f: &dyn Fn(&Entry) -> bool| all.iter().filter(|e| f(e)).count();
        let good = count(&|e| e.status == GOOD);
        let conflicts = count(&|e| e.status == RESERVATION_CONFLICT);
        let aborted = count(&|e| e.status == TASK_ABORTED);
        let uas = count(&|e| e.ua);
        let not_accessible = count(&|e| e.not_accessible);
        assert_eq!(switch.len(), run.handovers);
        assert!(
            conflicts + not_accessible >= run.handovers,
            "every former owner is refused at least once"
        );
        let summary = format!(
            "{} handovers in {:.1} s; writes: {} total, {good} GOOD, {conflicts} RESERVATION \
             CONFLICT (expected, from the fenced or former owner), {not_accessible} NOT READY \
             (a gateway not active for the LU), {uas} unit attentions, {aborted} TASK ABORTED; \
             {probed} writes of former owners after migrate returned, all refused; 0 lost, 0 stray",
            run.handovers,
            begun.elapsed().as_secs_f64(),
            all.len()
        );
        Outcome {
            owner,
            switch_ms: switch,
            blackout_ms: blackout,
            steps_us: steps,
            refused_mode,
            summary,
        }
    }
}

impl Outcome {
    /// The median of each commit step, as "fence F ms, drain D ms, flush L ms, transfer T ms".
    pub fn step_medians(&self) -> String {
        let median = |i: usize| {
            let mut v: Vec<u64> = self.steps_us.iter().map(|s| s[i]).collect();
            v.sort_unstable();
            v.get(v.len() / 2).copied().unwrap_or(0) as f64 / 1000.0
        };
        format!(
            "fence {:.3} ms, drain {:.3} ms, flush {:.3} ms, transfer {:.3} ms",
            median(0),
            median(1),
            median(2),
            median(3)
        )
    }
}

/// READ (16) of `blocks` at `lba`.
fn read16_cdb(lba: u64, blocks: u32) -> [u8; 16] {
    let mut cdb = [0u8; 16];
    cdb[0] = 0x88;
    cdb[2..10].copy_from_slice(&lba.to_be_bytes());
    cdb[10..14].copy_from_slice(&blocks.to_be_bytes());
    cdb
}
