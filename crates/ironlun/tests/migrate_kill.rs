//! Issue 6 acceptance 4 through `ironlun migrate` against the real daemon: the coordinator
//! killed (`kill -9`) at every step boundary and re-run with the same command resumes from its
//! journal into a consistent state (exactly one host writes, the ownership API and
//! `ironlun ctl reservations` agree, exit 0 or 1 as the journal dictates, the rollback hook ran
//! when the source kept the LU after a pause); a source with a command stuck in flight
//! (`--on-deadline refuse` rolls back, `abort` migrates); a destination not logged in.
//!
//! Hooks run as `sh -c` in their own process group with the driver as parent, so `$PPID` in a
//! hook is the `ironlun migrate` process itself.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use bytes::Bytes;
use ironlun_initiator::Session;
use ironlun_testkit::{session, Daemon, Scratch, BLOCK_SIZE, PROMPT, TARGET};
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

const IRONLUN: &str = env!("CARGO_BIN_EXE_ironlun");

const A: &str = "iqn.2026-01.test:host-a";
const B: &str = "iqn.2026-01.test:host-b";
const GOOD: u8 = 0x00;
const RESERVATION_CONFLICT: u8 = 0x18;

/// The hook commands; `None` keeps the default (log and succeed).
#[derive(Default, Clone)]
struct Hooks {
    precopy: Option<String>,
    pause: Option<String>,
    resume: Option<String>,
    rollback: Option<String>,
    announce: Option<String>,
}

impl Hooks {
    fn args(&self, s: &Scratch) -> Vec<String> {
        let h = |name: &str, cmd: &Option<String>| {
            [
                format!("--{name}"),
                s.hook(cmd.as_deref().unwrap_or("true")),
            ]
        };
        [
            h("precopy", &self.precopy),
            h("pause", &self.pause),
            h("resume", &self.resume),
            h("rollback", &self.rollback),
            h("announce", &self.announce),
        ]
        .concat()
    }
}

/// `ironlun migrate --json` from A to B with `journal`, `hooks` and `extra` arguments.
async fn migrate(admin: &str, journal: &Path, hooks: Vec<String>, extra: &[&str]) -> Output {
    let (admin, journal) = (admin.to_owned(), journal.to_owned());
    let extra: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        Command::new(IRONLUN)
            .env_remove("IRONLUN_ADMIN")
            .env_remove("IRONLUN_ADMIN_TOKEN_FILE")
            .args([
                "migrate",
                "--admin",
                &admin,
                "--lun",
                &format!("{TARGET}/0"),
            ])
            .args(["--from", A, "--to", B, "--json", "--journal"])
            .arg(journal)
            .args(extra)
            .args(hooks)
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

fn summary(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|_| {
        panic!(
            "no JSON summary ({:?}): {}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    })
}

/// WRITE (16) of one block at `lba` from `s`, past unit attentions (an ownership change queues
/// 2Ah/05h to the preempted host, SPC-4 §5.13.11.2.4); the final status byte.
async fn write_status(s: &Session, lba: u64) -> u8 {
    let cdb = ironlun_initiator::scsi::write16_cdb(lba, 1, false);
    ironlun_testkit::past_ua(s, 0, &cdb, ironlun_testkit::pattern(lba, 512), 0)
        .await
        .0
        .status
}

fn get(admin: &str, path: &str) -> Value {
    let c = ironlun_cli::ctl::Client::new(admin, None).unwrap();
    let r = c.get(path).unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    serde_json::from_slice(&r.body).unwrap()
}

fn ownership(admin: &str) -> Value {
    get(admin, &format!("/v1/luns/{TARGET}/0/ownership"))
}

/// `ironlun ctl reservations TARGET/0 --json`.
fn ctl_reservations(admin: &str) -> Value {
    let o = Command::new(IRONLUN)
        .env_remove("IRONLUN_ADMIN")
        .env_remove("IRONLUN_ADMIN_TOKEN_FILE")
        .args([
            "ctl",
            "--admin",
            admin,
            "reservations",
            &format!("{TARGET}/0"),
        ])
        .arg("--json")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// The LU is consistent with `owner` owning it at `epoch`: the ownership API and
/// `ctl reservations` say so, only `owner`'s nexuses are registered, no handover is open, and
/// of the two hosts exactly the owner writes. `lba` is where the probes write.
async fn assert_consistent(
    admin: &str,
    a: &Session,
    b: &Session,
    owner: &str,
    epoch: u64,
    lba: u64,
) {
    let o = ownership(admin);
    assert_eq!(
        (o["owner"].as_str(), o["epoch"].as_u64()),
        (Some(owner), Some(epoch)),
        "{o}"
    );
    assert!(o["handover"].is_null(), "a handover is still open: {o}");
    let r = ctl_reservations(admin);
    assert_eq!(
        (r["owner"].as_str(), r["epoch"].as_u64(), &r["generation"]),
        (Some(owner), Some(epoch), &o["generation"]),
        "ctl reservations disagrees with the ownership API: {r} vs {o}"
    );
    let regs = r["registrations"].as_array().unwrap();
    assert!(!regs.is_empty(), "{r}");
    for g in regs {
        let port = g["initiator_port"].as_str().unwrap();
        // Target-managed ownership registers the host (every nexus of it).
        assert!(
            port == owner || port.starts_with(&format!("{owner},i,0x")),
            "{port} in {r}"
        );
    }
    let (sa, sb) = (write_status(a, lba).await, write_status(b, lba + 1).await);
    let want = if owner == A {
        (GOOD, RESERVATION_CONFLICT)
    } else {
        (RESERVATION_CONFLICT, GOOD)
    };
    assert_eq!(
        (sa, sb),
        want,
        "(host-a, host-b) writes with {owner} the owner"
    );
}

/// A daemon with host-a (the owner at epoch 1) and host-b logged in.
async fn setup() -> (Daemon, Arc<Session>, Arc<Session>) {
    let d = Daemon::builder(IRONLUN).start();
    let a = Arc::new(session(d.addr, A).await);
    let b = Arc::new(session(d.addr, B).await);
    let c = ironlun_cli::ctl::Client::new(d.admin_url(), None).unwrap();
    let r = c
        .request(
            "POST",
            &format!("/v1/luns/{TARGET}/0/owner"),
            Some(json!({"host": A, "epoch": 1}).to_string().as_bytes()),
            PROMPT,
        )
        .unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    (d, a, b)
}

/// WRITE SAME(16) (SBC-3 §5.42) of `blocks` non-zero blocks from LBA 0 by `s`: busy for a long
/// time; its status byte.
fn start_write_same(s: Arc<Session>, blocks: u32) -> tokio::task::JoinHandle<u8> {
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

/// 512 MiB, the largest WRITE SAME the LU takes.
const WS_BLOCKS: u32 = 0x10_0000;

/// Where the driver is killed.
#[derive(Debug, Clone, Copy)]
enum Kill {
    /// In the pre-copy hook: prepare is done.
    Precopy,
    /// In the pause hook.
    Pause,
    /// While the commit call is in flight (a stuck source write keeps it busy).
    CommitStarted,
    /// Once the commit is journaled done.
    CommitDone,
    /// In the resume hook.
    Resume,
    /// In the announce hook.
    Announce,
    /// In the rollback hook, after a failing pre-copy.
    Rollback,
}

impl Kill {
    fn hooks(self, s: &Scratch) -> Hooks {
        let k = Some(s.kill_once());
        match self {
            Kill::Precopy => Hooks {
                precopy: k,
                ..Hooks::default()
            },
            Kill::Pause => Hooks {
                pause: k,
                ..Hooks::default()
            },
            Kill::CommitStarted => Hooks {
                pause: Some(s.kill_at_record("commit", "started")),
                ..Hooks::default()
            },
            Kill::CommitDone => Hooks {
                pause: Some(s.kill_at_record("commit", "done")),
                resume: Some(s.slow_once()),
                ..Hooks::default()
            },
            Kill::Resume => Hooks {
                resume: k,
                ..Hooks::default()
            },
            Kill::Announce => Hooks {
                announce: k,
                ..Hooks::default()
            },
            Kill::Rollback => Hooks {
                precopy: Some("false".into()),
                rollback: k,
                ..Hooks::default()
            },
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_at_every_step_boundary_the_rerun_ends_consistent() {
    let cases = [
        Kill::Precopy,
        Kill::Pause,
        Kill::CommitStarted,
        Kill::CommitDone,
        Kill::Resume,
        Kill::Announce,
        Kill::Rollback,
    ];
    for (i, kill) in cases.into_iter().enumerate() {
        let (d, a, b) = setup().await;
        let s = Scratch::new();
        let hooks = kill.hooks(&s).args(&s);
        let lba = (1 << 20) + 64;
        // The commit-started kill needs a commit that takes a while: a source command stuck
        // in flight that the target waits for up to --deadline-ms, then aborts.
        let mut extra: Vec<&str> = Vec::new();
        let ws = if matches!(kill, Kill::CommitStarted) {
            extra.extend(["--deadline-ms", "1500"]);
            let ws = start_write_same(a.clone(), WS_BLOCKS);
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert!(!ws.is_finished(), "WRITE SAME too fast to be stuck");
            Some(ws)
        } else {
            None
        };
        let first = migrate(d.admin_url(), &s.journal(), hooks.clone(), &extra).await;
        assert_eq!(
            first.status.code(),
            None,
            "{kill:?}: the driver was not killed: {}{}",
            String::from_utf8_lossy(&first.stdout),
            String::from_utf8_lossy(&first.stderr)
        );
        let journal = std::fs::read_to_string(s.journal()).unwrap();
        assert!(!journal.contains(" handover "), "{kill:?}: {journal}");
        let ran_first = s.ran();
        if let Some(ws) = ws {
            // Killed with the commit call in flight.
            assert!(
                journal.contains(" commit started ") && !journal.contains(" commit done "),
                "{kill:?}: {journal}"
            );
            // The target drained it (GOOD) or aborted it at the deadline, whether or not the
            // coordinator is still there to hear the answer.
            let st = tokio::time::timeout(PROMPT, ws).await.unwrap().unwrap();
            println!("{kill:?}: the source's WRITE SAME ended with status {st:#04x}");
            // Without its coordinator the LU has at most one writer: fenced (nobody writes)
            // or committed (host-b writes).
            let o = ownership(d.admin_url());
            println!("{kill:?}: after the kill: {o}");
            let (sa, sb) = (write_status(&a, lba).await, write_status(&b, lba + 1).await);
            let fenced = o["handover"]["state"] == "fenced";
            let want = match o["owner"].as_str() {
                Some(B) => (RESERVATION_CONFLICT, GOOD),
                _ if fenced => (RESERVATION_CONFLICT, RESERVATION_CONFLICT),
                _ => (GOOD, RESERVATION_CONFLICT),
            };
            assert_eq!(
                (sa, sb),
                want,
                "{kill:?}: (host-a, host-b) writes after the kill: {o}"
            );
        }

        let second = migrate(d.admin_url(), &s.journal(), hooks, &extra).await;
        let v = summary(&second);
        let ran = s.ran();
        let code = second.status.code();
        assert_eq!(v["resumed"], true, "{kill:?}: {v}");
        assert_eq!(v["epoch"], 2, "{kill:?}: {v}");
        let journal = std::fs::read_to_string(s.journal()).unwrap();
        // Closed: `handover done` (migrated) or `handover failed` (rolled back).
        let last = journal.lines().last().unwrap();
        let closed = if code == Some(0) {
            " handover done "
        } else {
            " handover failed "
        };
        assert!(
            last.contains(closed),
            "{kill:?}: the journal is not closed as {closed:?}: {journal}"
        );
        let paused = ran.iter().any(|h| h == "pause");
        match code {
            Some(0) => {
                assert_eq!(v["outcome"], "migrated", "{kill:?}: {v}");
                assert_consistent(d.admin_url(), &a, &b, B, 2, lba).await;
                assert!(!ran.contains(&"rollback".to_owned()), "{kill:?}: {ran:?}");
                assert_eq!(ran.last().map(String::as_str), Some("announce"), "{kill:?}");
            }
            Some(1) => {
                assert_eq!(v["outcome"], "rolled_back", "{kill:?}: {v}");
                assert_consistent(d.admin_url(), &a, &b, A, 1, lba).await;
                if paused {
                    assert_eq!(
                        ran.last().map(String::as_str),
                        Some("rollback"),
                        "{kill:?}: the source kept the LU after a pause: {ran:?}"
                    );
                }
                // The aborted epoch is refused for good: the ownership API points above it
                // and a fresh run (new journal) takes that epoch and migrates.
                assert_eq!(ownership(d.admin_url())["next_epoch"], 3, "{kill:?}");
                let fresh = Scratch::new();
                let o = migrate(
                    d.admin_url(),
                    &fresh.journal(),
                    Hooks::default().args(&fresh),
                    &[],
                )
                .await;
                let w = summary(&o);
                assert_eq!(
                    (o.status.code(), w["outcome"].as_str(), w["epoch"].as_u64()),
                    (Some(0), Some("migrated"), Some(3)),
                    "{kill:?}: {w}"
                );
                assert_consistent(d.admin_url(), &a, &b, B, 3, lba + 8).await;
            }
            other => panic!(
                "{kill:?}: exit {other:?}: {}{}",
                String::from_utf8_lossy(&second.stdout),
                String::from_utf8_lossy(&second.stderr)
            ),
        }
        // What the journal dictates.
        let want = match kill {
            Kill::Precopy | Kill::Pause | Kill::Rollback => Some(1),
            Kill::CommitDone | Kill::Resume | Kill::Announce => Some(0),
            // The target finishes the commit it was asked for, or the re-run retries it.
            Kill::CommitStarted => Some(0),
        };
        assert_eq!(code, want, "{kill:?}: {v}");
        println!(
            "case {i} {kill:?}: hooks before the kill {ran_first:?}, after the re-run {ran:?}, exit {code:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stuck_source_io_rolls_back_with_refuse_and_migrates_with_abort() {
    let (d, a, b) = setup().await;
    let s = Scratch::new();
    let hooks = Hooks::default().args(&s);
    let lba = (1 << 20) + 64;

    // refuse: the stuck WRITE SAME outlives 20 ms, the handover rolls back, host-a writes.
    let ws = start_write_same(a.clone(), WS_BLOCKS);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!ws.is_finished(), "WRITE SAME too fast to be stuck");
    let o = migrate(
        d.admin_url(),
        &s.journal(),
        hooks.clone(),
        &["--deadline-ms", "20", "--on-deadline", "refuse"],
    )
    .await;
    let v = summary(&o);
    assert_eq!(
        (o.status.code(), v["outcome"].as_str()),
        (Some(1), Some("rolled_back")),
        "{v}"
    );
    assert!(
        v["message"].as_str().unwrap().contains("drain_timeout"),
        "{v}"
    );
    assert_eq!(
        s.ran(),
        ["precopy", "pause", "rollback"],
        "the source was resumed"
    );
    assert_consistent(d.admin_url(), &a, &b, A, 1, lba).await;
    let st = tokio::time::timeout(Duration::from_secs(120), ws)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        st, GOOD,
        "the refused handover left the source's command alone"
    );

    // abort: the stuck WRITE SAME is aborted at the deadline and the handover completes.
    std::fs::remove_file(s.path("hooks.log")).unwrap();
    let ws = start_write_same(a.clone(), WS_BLOCKS);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!ws.is_finished(), "WRITE SAME too fast to be stuck");
    let o = migrate(
        d.admin_url(),
        &s.journal(),
        hooks,
        &["--deadline-ms", "20", "--on-deadline", "abort"],
    )
    .await;
    let v = summary(&o);
    assert_eq!(
        (o.status.code(), v["outcome"].as_str(), v["epoch"].as_u64()),
        (Some(0), Some("migrated"), Some(3)),
        "{v}"
    );
    assert_eq!(v["commit"]["aborted_tasks"], 1, "{v}");
    assert_eq!(s.ran(), ["precopy", "pause", "resume", "announce"]);
    let st = tokio::time::timeout(PROMPT, ws).await.unwrap().unwrap();
    assert_ne!(st, GOOD, "the aborted WRITE SAME completed GOOD");
    assert_consistent(d.admin_url(), &a, &b, B, 3, lba).await;
    println!(
        "stuck source, abort: storage switch {} ms, commit steps_us {}",
        v["storage_switch_ms"], v["commit"]["steps_us"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_not_logged_in_fails_prepare_and_changes_nothing() {
    let d = Daemon::builder(IRONLUN).start();
    let a = session(d.addr, A).await;
    let c = ironlun_cli::ctl::Client::new(d.admin_url(), None).unwrap();
    let r = c
        .request(
            "POST",
            &format!("/v1/luns/{TARGET}/0/owner"),
            Some(json!({"host": A, "epoch": 1}).to_string().as_bytes()),
            PROMPT,
        )
        .unwrap();
    assert_eq!(r.status, 200);
    let before = ownership(d.admin_url());
    let s = Scratch::new();
    let o = migrate(d.admin_url(), &s.journal(), Hooks::default().args(&s), &[]).await;
    let v = summary(&o);
    assert_eq!(
        (o.status.code(), v["outcome"].as_str()),
        (Some(1), Some("rolled_back")),
        "{v}"
    );
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("destination_not_logged_in"),
        "{v}"
    );
    assert!(!s.ran().iter().any(|h| h == "pause"), "{:?}", s.ran());
    let after = ownership(d.admin_url());
    assert_eq!(
        (&after["owner"], &after["epoch"], &after["generation"]),
        (&before["owner"], &before["epoch"], &before["generation"]),
        "{before} -> {after}"
    );
    assert!(after["handover"].is_null());
    assert_eq!(write_status(&a, 0).await, GOOD);
    // Once host-b logs in, the same handover migrates.
    let b = session(d.addr, B).await;
    let o = migrate(d.admin_url(), &s.journal(), Hooks::default().args(&s), &[]).await;
    assert_eq!(o.status.code(), Some(0), "{}", summary(&o));
    assert_consistent(
        d.admin_url(),
        &a,
        &b,
        B,
        summary(&o)["epoch"].as_u64().unwrap(),
        8,
    )
    .await;
}
