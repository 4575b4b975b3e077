//! `ironlun migrate` against an in-test admin server that implements the issue 6 handover
//! contract (ownership, prepare, commit, abort, epochs) with injectable faults.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use ironlun_testkit::{pattern, session, Daemon, Scratch};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const IRONLUN: &str = env!("CARGO_BIN_EXE_ironlun");

const LUN: &str = "iqn.2026-11.io.ironlun:lab/0";
const A: &str = "iqn.2026-11.io.host:a";
const B: &str = "iqn.2026-11.io.host:b";

/// How the fake answers a commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    /// Close the connection without applying or answering.
    DropBeforeApply,
    /// Apply, then close the connection without answering.
    DropAfterApply,
}

#[derive(Debug)]
struct Target {
    owner: Option<String>,
    epoch: u64,
    generation: u64,
    logged_in: BTreeSet<String>,
    aborted: BTreeSet<u64>,
    /// (epoch, from, to) of the last commit.
    last_commit: Option<(u64, String, String)>,
    /// (epoch, from, to) of the prepared handover; the daemon commits only a prepared one.
    prepared: Option<(u64, String, String)>,
    commit_faults: Vec<Fault>,
    requests: Vec<(String, String, Value)>,
}

enum Answer {
    Json(u16, Value),
    Drop,
}

fn refuse(code: &str) -> Answer {
    Answer::Json(
        409,
        json!({"error": format!("refused: {code}"), "code": code}),
    )
}

impl Target {
    fn new() -> Self {
        Self {
            owner: Some(A.into()),
            epoch: 4,
            generation: 10,
            logged_in: [A.to_owned(), B.to_owned()].into_iter().collect(),
            aborted: BTreeSet::new(),
            last_commit: None,
            prepared: None,
            commit_faults: Vec::new(),
            requests: Vec::new(),
        }
    }

    fn handle(&mut self, method: &str, path: &str, body: &Value) -> Answer {
        self.requests
            .push((method.to_owned(), path.to_owned(), body.clone()));
        let base = "/v1/luns/iqn.2026-11.io.ironlun:lab/0";
        let Some(rest) = path.strip_prefix(base) else {
            return Answer::Json(404, json!({"error": "no such LU", "code": "not_found"}));
        };
        let s = |k: &str| body.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
        let epoch = body.get("epoch").and_then(Value::as_u64).unwrap_or(0);
        match (method, rest) {
            ("GET", "/ownership") => Answer::Json(
                200,
                json!({"owner": self.owner, "epoch": self.epoch, "generation": self.generation, "handover": null}),
            ),
            ("POST", "/handover/prepare") => {
                if self.aborted.contains(&epoch) {
                    // The daemon refuses an aborted epoch for good.
                    refuse("aborted")
                } else if self.owner.as_deref() != Some(&s("from")) {
                    refuse("not_owner")
                } else if epoch <= self.epoch {
                    refuse("stale_epoch")
                } else if !self.logged_in.contains(&s("to")) {
                    refuse("destination_not_logged_in")
                } else {
                    self.prepared = Some((epoch, s("from"), s("to")));
                    Answer::Json(200, json!({"epoch": epoch, "generation": self.generation}))
                }
            }
            ("POST", "/handover/commit") => {
                let fault = if self.commit_faults.is_empty() {
                    Fault::None
                } else {
                    self.commit_faults.remove(0)
                };
                if fault == Fault::DropBeforeApply {
                    return Answer::Drop;
                }
                let (from, to) = (s("from"), s("to"));
                let ok = |t: &Target, idempotent: bool| {
                    Answer::Json(
                        200,
                        json!({"epoch": t.epoch, "generation": t.generation, "owner": t.owner,
                               "steps_us": {"fence": 3, "drain": 40, "flush": 500, "transfer": 7, "total": 550},
                               "aborted_tasks": 0, "idempotent": idempotent}),
                    )
                };
                let answer = if self.last_commit == Some((epoch, from.clone(), to.clone())) {
                    ok(self, true)
                } else if epoch <= self.epoch {
                    refuse("stale_epoch")
                } else if self.aborted.contains(&epoch) {
                    refuse("aborted")
                } else if self.owner.as_deref() != Some(&from) {
                    refuse("not_owner")
                } else if self.prepared != Some((epoch, from.clone(), to.clone())) {
                    refuse("not_prepared")
                } else {
                    self.prepared = None;
                    self.owner = Some(to.clone());
                    self.epoch = epoch;
                    self.generation += 1;
                    self.last_commit = Some((epoch, from, to));
                    ok(self, false)
                };
                if fault == Fault::DropAfterApply {
                    Answer::Drop
                } else {
                    answer
                }
            }
            ("POST", "/handover/abort") => {
                if self.last_commit.as_ref().is_some_and(|c| c.0 == epoch) {
                    refuse("committed")
                } else {
                    self.aborted.insert(epoch);
                    self.prepared = None;
                    Answer::Json(200, json!({"epoch": self.epoch}))
                }
            }
            _ => Answer::Json(404, json!({"error": "no route", "code": "not_found"})),
        }
    }

    fn count(&self, suffix: &str) -> usize {
        self.requests
            .iter()
            .filter(|(_, p, _)| p.ends_with(suffix))
            .count()
    }
}

/// A tiny HTTP/1.1 server thread around a [`Target`].
struct Fake {
    url: String,
    target: Arc<Mutex<Target>>,
}

impl Fake {
    fn start(target: Target) -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let target = Arc::new(Mutex::new(target));
        let t = target.clone();
        std::thread::spawn(move || {
            for s in listener.incoming() {
                let Ok(s) = s else { continue };
                serve_one(s, &t);
            }
        });
        Fake { url, target }
    }

    fn t(&self) -> std::sync::MutexGuard<'_, Target> {
        self.target.lock().unwrap()
    }
}

fn serve_one(mut s: TcpStream, t: &Mutex<Target>) {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut first = head.lines().next().unwrap_or("").split(' ');
    let method = first.next().unwrap_or("").to_owned();
    let path = first.next().unwrap_or("").to_owned();
    let len = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    while buf.len() < head_end + len {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let body: Value = serde_json::from_slice(&buf[head_end..head_end + len]).unwrap_or(Value::Null);
    let answer = t.lock().unwrap().handle(&method, &path, &body);
    if let Answer::Json(status, v) = answer {
        let b = v.to_string();
        let _ = write!(
            s,
            "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b}",
            b.len()
        );
    }
}

fn migrate(fake: &Fake, dir: &Path, args: &[&str]) -> Output {
    let mut c = Command::new(IRONLUN);
    c.current_dir(dir)
        .env_remove("IRONLUN_ADMIN")
        .env_remove("IRONLUN_ADMIN_TOKEN_FILE")
        .args(["migrate", "--admin", &fake.url, "--lun", LUN]);
    c.args(args);
    c.output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn all_hooks(s: &Scratch, precopy: &str, pause: &str, resume: &str) -> Vec<String> {
    vec![
        "--precopy".into(),
        s.hook(precopy),
        "--pause".into(),
        s.hook(pause),
        "--resume".into(),
        s.hook(resume),
        "--rollback".into(),
        s.hook("true"),
        "--announce".into(),
        s.hook("true"),
    ]
}

fn run(fake: &Fake, s: &Scratch, extra: &[&str], hooks: &[String]) -> Output {
    let journal = s.journal();
    let mut args: Vec<&str> = vec![
        "--from",
        A,
        "--to",
        B,
        "--journal",
        journal.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    args.extend(hooks.iter().map(String::as_str));
    migrate(fake, s.dir(), &args)
}

#[test]
fn happy_path_runs_hooks_in_order_and_prints_the_timeline() {
    let fake = Fake::start(Target::new());
    let s = Scratch::new();
    let o = run(&fake, &s, &[], &all_hooks(&s, "true", "true", "true"));
    let out = stdout(&o);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(s.ran(), ["precopy", "pause", "resume", "announce"]);
    let log = std::fs::read_to_string(s.path("hooks.log")).unwrap();
    assert!(
        log.starts_with(&format!("precopy 5 {LUN} {A} {B}\n")),
        "{log}"
    );
    for needle in [
        "prepare", "precopy", "pause", "commit", "resume", "announce",
    ] {
        assert!(
            out.lines()
                .any(|l| l.contains(needle) && l.contains("done")),
            "{needle}: {out}"
        );
    }
    assert!(out.contains("blackout "), "{out}");
    assert!(out.contains("storage switch "), "{out}");
    assert!(out.contains("fence 3 us"), "{out}");
    assert!(
        out.lines().last().unwrap().starts_with("migrated: "),
        "{out}"
    );
    let t = fake.t();
    assert_eq!((t.owner.as_deref(), t.epoch), (Some(B), 5));
    let calls: Vec<_> = t
        .requests
        .iter()
        .map(|r| (r.0.as_str(), r.1.rsplit('/').next().unwrap()))
        .collect();
    assert_eq!(
        calls,
        [
            ("GET", "ownership"),
            ("POST", "prepare"),
            ("POST", "commit")
        ]
    );
    let commit = &t.requests[2].2;
    assert_eq!(commit["epoch"], 5);
    assert_eq!(commit["from"], A);
    assert_eq!(commit["to"], B);
    assert_eq!(commit["deadline_ms"], 5000);
    assert_eq!(commit["on_deadline"], "abort");
    // The journal is closed with a `handover done` record.
    let j = std::fs::read_to_string(s.journal()).unwrap();
    assert!(j.lines().last().unwrap().contains(" handover done "), "{j}");
}

#[test]
fn json_summary_is_machine_readable_and_keeps_hook_output_off_stdout() {
    let fake = Fake::start(Target::new());
    let s = Scratch::new();
    let o = run(
        &fake,
        &s,
        &["--json", "--deadline-ms", "250", "--on-deadline", "refuse"],
        &all_hooks(&s, "echo precopy-noise", "true", "true"),
    );
    assert_eq!(o.status.code(), Some(0));
    let v: Value = serde_json::from_slice(&o.stdout).expect("stdout is one JSON document");
    assert_eq!(v["outcome"], "migrated");
    assert_eq!(v["epoch"], 5);
    assert!(v["blackout_ms"].as_f64().unwrap() >= 0.0);
    assert!(v["storage_switch_ms"].as_f64().unwrap() >= 0.0);
    assert_eq!(v["commit"]["steps_us"]["flush"], 500);
    let steps: Vec<&str> = v["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap())
        .collect();
    assert_eq!(
        steps,
        ["prepare", "precopy", "pause", "commit", "resume", "announce"]
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("precopy-noise"));
    let t = fake.t();
    let commit = &t
        .requests
        .iter()
        .find(|r| r.1.ends_with("/commit"))
        .unwrap()
        .2;
    assert_eq!(
        (
            commit["deadline_ms"].as_u64(),
            commit["on_deadline"].as_str()
        ),
        (Some(250), Some("refuse"))
    );
}

#[test]
fn failing_precopy_aborts_and_rolls_back() {
    let fake = Fake::start(Target::new());
    let s = Scratch::new();
    let o = run(&fake, &s, &[], &all_hooks(&s, "exit 3", "true", "true"));
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert_eq!(s.ran(), ["precopy", "rollback"]);
    assert!(out.contains("rolled back: "), "{out}");
    assert!(out.contains("precopy"), "{out}");
    let t = fake.t();
    assert_eq!(t.count("/commit"), 0);
    assert_eq!(t.count("/abort"), 1);
    assert!(t.aborted.contains(&5));
    assert_eq!((t.owner.as_deref(), t.epoch), (Some(A), 4));
}

#[test]
fn refused_prepare_rolls_back_without_pausing() {
    let mut target = Target::new();
    target.logged_in.remove(B);
    let fake = Fake::start(target);
    let s = Scratch::new();
    let o = run(&fake, &s, &[], &all_hooks(&s, "true", "true", "true"));
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(s.ran(), ["rollback"]);
    assert!(
        stdout(&o).contains("destination_not_logged_in"),
        "{}",
        stdout(&o)
    );
    assert_eq!(fake.t().owner.as_deref(), Some(A));
}

#[test]
fn unknown_commit_outcome_is_settled_by_a_query() {
    // (fault, commits sent): applied but unanswered → the query shows B, no retry;
    // never applied → the query shows A at the old epoch, the commit is retried.
    for (fault, commits) in [(Fault::DropAfterApply, 1), (Fault::DropBeforeApply, 2)] {
        let mut target = Target::new();
        target.commit_faults = vec![fault];
        let fake = Fake::start(target);
        let s = Scratch::new();
        let o = run(&fake, &s, &[], &all_hooks(&s, "true", "true", "true"));
        assert_eq!(o.status.code(), Some(0), "{fault:?}: {}", stdout(&o));
        assert_eq!(
            s.ran(),
            ["precopy", "pause", "resume", "announce"],
            "{fault:?}"
        );
        let t = fake.t();
        assert_eq!(t.count("/commit"), commits, "{fault:?}");
        assert!(
            stdout(&o)
                .lines()
                .any(|l| l.contains("query") && l.contains("done")),
            "{fault:?}"
        );
        // The first GET is the epoch lookup, the second the query.
        assert_eq!(t.count("/ownership"), 2, "{fault:?}");
        assert_eq!((t.owner.as_deref(), t.epoch), (Some(B), 5), "{fault:?}");
    }
}

#[test]
fn failing_resume_hands_the_lun_back_at_the_next_epoch() {
    let fake = Fake::start(Target::new());
    let s = Scratch::new();
    let o = run(&fake, &s, &[], &all_hooks(&s, "true", "true", "exit 1"));
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert_eq!(s.ran(), ["precopy", "pause", "resume", "rollback"]);
    assert!(out.contains("hand-back "), "{out}");
    assert!(out.contains("handed back"), "{out}");
    let t = fake.t();
    assert_eq!((t.owner.as_deref(), t.epoch), (Some(A), 6));
    // The hand-back is B → A at 6: refused unprepared, prepared, committed.
    let back: Vec<_> = t
        .requests
        .iter()
        .filter(|r| r.2["from"] == B)
        .map(|r| (r.1.rsplit('/').next().unwrap(), r.2["epoch"].as_u64()))
        .collect();
    assert_eq!(
        back,
        [
            ("commit", Some(6)),
            ("prepare", Some(6)),
            ("commit", Some(6))
        ]
    );
}

#[test]
fn killed_before_commit_resumes_into_abort_and_rollback() {
    let fake = Fake::start(Target::new());
    let s = Scratch::new();
    let hooks = all_hooks(&s, "true", &s.kill_once(), "true");
    let o = run(&fake, &s, &[], &hooks);
    assert_eq!(o.status.code(), None, "killed by a signal: {}", stdout(&o));
    assert!(!std::fs::read_to_string(s.journal())
        .unwrap()
        .contains("handover"));
    let o = run(&fake, &s, &[], &hooks);
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(out.starts_with("resuming "), "{out}");
    assert!(out.contains("rolled back: "), "{out}");
    assert_eq!(s.ran(), ["precopy", "pause", "rollback"]);
    let t = fake.t();
    assert_eq!(t.count("/commit"), 0);
    assert_eq!((t.owner.as_deref(), t.epoch), (Some(A), 4));
    assert!(t.aborted.contains(&5));
    // The resumed run did not look the epoch up again: it came from the journal.
    assert_eq!(t.count("/ownership"), 1);
}

#[test]
fn killed_after_commit_resumes_into_resume_and_announce() {
    let fake = Fake::start(Target::new());
    let s = Scratch::new();
    let hooks = all_hooks(&s, "true", "true", &s.kill_once());
    let o = run(&fake, &s, &[], &hooks);
    assert_eq!(o.status.code(), None);
    let o = run(&fake, &s, &[], &hooks);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    // The resume hook is re-run (hooks are idempotent); the commit is not sent again.
    assert_eq!(
        s.ran(),
        ["precopy", "pause", "resume", "resume", "announce"]
    );
    let t = fake.t();
    assert_eq!(t.count("/commit"), 1);
    assert_eq!((t.owner.as_deref(), t.epoch), (Some(B), 5));
}

#[test]
fn resume_with_other_arguments_is_refused_and_a_closed_journal_is_rotated() {
    let fake = Fake::start(Target::new());
    let s = Scratch::new();
    let hooks = all_hooks(&s, "true", &s.kill_once(), "true");
    assert_eq!(run(&fake, &s, &[], &hooks).status.code(), None);
    // Another destination against the open journal: usage error, nothing sent.
    let journal = s.journal();
    let o = migrate(
        &fake,
        s.dir(),
        &[
            "--from",
            A,
            "--to",
            "iqn.2026-11.io.host:c",
            "--journal",
            journal.to_str().unwrap(),
        ],
    );
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("same") && err.contains(B), "{err}");
    assert_eq!(fake.t().requests.len(), 2, "only the first run's calls");
    // Finish it, then start the next handover (B → A) on the same journal path.
    assert_eq!(run(&fake, &s, &[], &hooks).status.code(), Some(1));
    fake.t().owner = Some(B.into());
    let o = migrate(
        &fake,
        s.dir(),
        &[
            "--from",
            B,
            "--to",
            A,
            "--journal",
            journal.to_str().unwrap(),
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    // Epoch 5 was aborted: the next handover takes 6, above the rotated journal's.
    assert!(stdout(&o).contains("at epoch 6"), "{}", stdout(&o));
    let rotated = std::fs::read_dir(s.dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".closed"))
        .count();
    assert_eq!(rotated, 1);
}

#[test]
fn default_journal_lives_in_the_working_directory() {
    let fake = Fake::start(Target::new());
    let s = Scratch::new();
    let o = migrate(&fake, s.dir(), &["--from", A, "--to", B]);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    assert!(s
        .path("ironlun-migrate-iqn.2026-11.io.ironlun_lab_0.journal")
        .exists());
}

#[test]
fn a_hook_past_its_deadline_is_killed_with_its_children() {
    let fake = Fake::start(Target::new());
    let s = Scratch::new();
    let late = s.path("late");
    let slow = format!("sleep 3; touch '{}'", late.display());
    let o = run(
        &fake,
        &s,
        &["--step-timeout", "1"],
        &all_hooks(&s, &slow, "true", "true"),
    );
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    // The driver gave up on the hook before the hook's own 3 s were over.
    assert!(!late.exists(), "the driver waited for the hook to finish");
    assert_eq!(s.ran(), ["precopy", "rollback"]);
    std::thread::sleep(Duration::from_millis(3500));
    assert!(!late.exists(), "the hook's children outlived the cancel");
}

#[test]
fn usage_errors_exit_2() {
    let fake = Fake::start(Target::new());
    let s = Scratch::new();
    let cases: [&[&str]; 4] = [
        &["--from", A, "--to", A],
        &["--from", A, "--to", B, "--pause", "true"],
        &["--from", A, "--to", B, "--epoch", "0"],
        &["--from", A],
    ];
    for args in cases {
        let o = migrate(&fake, s.dir(), args);
        assert_eq!(
            o.status.code(),
            Some(2),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    assert!(fake.t().requests.is_empty());
}

// ---------------------------------------------------------------------------------------------
// Against the real daemon

/// WRITE (16) of one block at LBA 0 from `s`, past the unit attentions an ownership change
/// queues (SPC-4 §5.13.11.2.4: 2Ah/05h to the preempted host); the final status byte.
async fn write_status(s: &ironlun_initiator::Session) -> u8 {
    let cdb = ironlun_initiator::scsi::write16_cdb(0, 1, false);
    ironlun_testkit::past_ua(s, 0, &cdb, pattern(7, 512), 0)
        .await
        .0
        .status
}

const GOOD: u8 = 0x00;
const RESERVATION_CONFLICT: u8 = 0x18;

/// `ironlun migrate --json` from A to B on the daemon at `admin`, journal in `dir`.
async fn migrate_real(admin: &str, dir: &Path, hooks: &[&str]) -> (Option<i32>, Value) {
    let (admin, dir) = (admin.to_owned(), dir.to_owned());
    let hooks: Vec<String> = hooks.iter().map(|h| (*h).to_owned()).collect();
    let o = tokio::task::spawn_blocking(move || {
        Command::new(IRONLUN)
            .current_dir(dir)
            .args([
                "migrate", "--admin", &admin, "--lun", LUN, "--from", A, "--to", B,
            ])
            .args(["--json"])
            .args(hooks)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let v = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|_| panic!("{}{}", stdout(&o), String::from_utf8_lossy(&o.stderr)));
    (o.status.code(), v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_daemon_rollback_and_hand_back_leave_host_a_the_writer_and_a_retry_migrates() {
    let d = Daemon::builder(IRONLUN).start();
    let a = session(d.addr, A).await;
    let b = session(d.addr, B).await;
    let client = ironlun_cli::ctl::Client::new(&d.admin, None).unwrap();
    let owner = client
        .request(
            "POST",
            "/v1/luns/iqn.2026-11.io.ironlun:lab/0/owner",
            Some(json!({"host": A, "epoch": 1}).to_string().as_bytes()),
            Duration::from_secs(10),
        )
        .unwrap();
    assert_eq!(owner.status, 200);
    let s = Scratch::new();
    // A failing pre-copy: aborted before commit (epoch 2 is now refused for good).
    let (code, v) = migrate_real(&d.admin, s.dir(), &["--precopy", "false"]).await;
    assert_eq!(
        (code, v["outcome"].as_str(), v["epoch"].as_u64()),
        (Some(1), Some("rolled_back"), Some(2))
    );
    assert_eq!(write_status(&a).await, GOOD);
    assert_eq!(write_status(&b).await, RESERVATION_CONFLICT);
    // A failing resume on the destination: committed at 3, handed back at 4.
    let (code, v) = migrate_real(&d.admin, s.dir(), &["--resume", "false"]).await;
    assert_eq!(
        (code, v["outcome"].as_str(), v["epoch"].as_u64()),
        (Some(1), Some("rolled_back"), Some(3)),
        "{v}"
    );
    assert!(v["handback_ms"].as_f64().is_some(), "{v}");
    assert_eq!(write_status(&a).await, GOOD);
    assert_eq!(write_status(&b).await, RESERVATION_CONFLICT);
    // The retry takes the epoch above the hand-back's and migrates.
    let (code, v) = migrate_real(&d.admin, s.dir(), &[]).await;
    assert_eq!(
        (code, v["outcome"].as_str(), v["epoch"].as_u64()),
        (Some(0), Some("migrated"), Some(5)),
        "{v}"
    );
    assert_eq!(write_status(&a).await, RESERVATION_CONFLICT);
    assert_eq!(write_status(&b).await, GOOD);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_daemon_hands_the_lun_from_host_a_to_host_b() {
    let d = Daemon::builder(IRONLUN).start();
    let a = session(d.addr, A).await;
    let b = session(d.addr, B).await;
    let client = ironlun_cli::ctl::Client::new(&d.admin, None).unwrap();
    let owner = client
        .request(
            "POST",
            "/v1/luns/iqn.2026-11.io.ironlun:lab/0/owner",
            Some(json!({"host": A, "epoch": 1}).to_string().as_bytes()),
            Duration::from_secs(10),
        )
        .unwrap();
    assert_eq!(
        owner.status,
        200,
        "{}",
        String::from_utf8_lossy(&owner.body)
    );
    assert_eq!(write_status(&a).await, GOOD);
    assert_eq!(write_status(&b).await, RESERVATION_CONFLICT);

    let s = Scratch::new();
    let (admin, dir) = (d.admin.clone(), s.dir().to_owned());
    let o = tokio::task::spawn_blocking(move || {
        Command::new(IRONLUN)
            .current_dir(dir)
            .args([
                "migrate", "--admin", &admin, "--lun", LUN, "--from", A, "--to", B,
            ])
            .args(["--precopy", "true", "--pause", "true", "--rollback", "true"])
            .args(["--resume", "true", "--announce", "true", "--json"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}{}",
        stdout(&o),
        String::from_utf8_lossy(&o.stderr)
    );
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (v["outcome"].as_str(), v["epoch"].as_u64()),
        (Some("migrated"), Some(2))
    );
    assert!(v["storage_switch_ms"].as_f64().is_some());

    assert_eq!(write_status(&a).await, RESERVATION_CONFLICT);
    assert_eq!(write_status(&b).await, GOOD);
    let own: Value = serde_json::from_slice(
        &client
            .get("/v1/luns/iqn.2026-11.io.ironlun:lab/0/ownership")
            .unwrap()
            .body,
    )
    .unwrap();
    assert_eq!(
        (own["owner"].as_str(), own["epoch"].as_u64()),
        (Some(B), Some(2))
    );
}
