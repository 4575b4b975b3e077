//! `ironlun migrate`: the driver of one live-migration storage handover (issue 6; semantics.md §3).
//!
//! It feeds the sans-IO [`Handover`] of `ironlun-coordinator` and executes its actions:
//!
//! - journal records are appended to the journal file and fsynced before the next action runs
//!   (the commit's `started` record is the write-ahead decision of semantics.md §3.3 step 3);
//! - hooks run as `sh -c CMD` in their own process group, with `IRONLUN_LUN`, `IRONLUN_FROM`,
//!   `IRONLUN_TO`, `IRONLUN_EPOCH` and `IRONLUN_STEP` in the environment and stdout/stderr passed
//!   through (stdout goes to stderr under `--json`); a hook still running at its step deadline
//!   is killed with its whole group;
//! - admin calls go to the daemon's handover endpoints (`POST /v1/luns/T/L/handover/...`,
//!   `GET /v1/luns/T/L/ownership`). A transport error or a 5xx is an unknown outcome, 409
//!   `committed` means the epoch is committed, any other refusal means no effect.
//!
//! Time comes from a monotonic clock whose origin is the Unix time at start, so the records of a
//! resumed run stay comparable with those of the killed one.
//!
//! A journal that exists and is not closed is resumed ([`journal::replay`], [`Handover::recover`])
//! with the same LUN, hosts and epoch (kept in the `<journal>.plan` file beside it); a closed
//! journal is rotated to `<journal>.<unix ms>.closed` and a fresh handover starts. Without
//! `--epoch` the epoch is one above both the LU's and the rotated journal's, and at least the
//! ownership GET's `next_epoch` when the daemon reports it (the target refuses an aborted epoch
//! for good, and an aborted handover leaves the LU's epoch unchanged).
//!
//! Exit status: 0 migrated, 1 rolled back or stuck (the message says which and what to do),
//! 2 usage.

use crate::ctl::{self, Client, CtlError, Reply};
use ironlun_api as admin;
use ironlun_api::OnDeadline;
use ironlun_coordinator::handover::{
    Action, AdminCall, Failure, Handover, Hooks, Outcome, Owner, Plan, PlanError, TargetView,
    Timeline,
};
use ironlun_coordinator::journal::{self, Record, ResumeAt, MAX_JOURNAL_BYTES};
use ironlun_coordinator::{Step, Time};
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Exit status: the handover is done, the destination owns the LU.
pub const EXIT_MIGRATED: u8 = 0;
/// Exit status: rolled back (the source owns the LU) or stuck (re-run to resume).
pub const EXIT_NOT_MIGRATED: u8 = 1;
/// Exit status: bad arguments, or a journal of another handover.
pub const EXIT_USAGE: u8 = 2;

/// Margin added to `--deadline-ms` for the commit call's own deadline: the target answers
/// within the drain deadline plus the flush and the PR transition.
const COMMIT_MARGIN: Duration = Duration::from_secs(10);

/// `ironlun migrate` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct MigrateArgs {
    /// Admin API: `unix:PATH` or `http://HOST:PORT` [env: IRONLUN_ADMIN] [default: as
    /// `ironlun ctl`, the local daemon's Unix socket].
    #[arg(long, value_name = "URL")]
    pub admin: Option<String>,
    /// File holding the bearer token [env: IRONLUN_ADMIN_TOKEN_FILE].
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// The LU to hand over, as TARGET/LUN.
    #[arg(long, value_parser = ctl::parse_selector, value_name = "TARGET/LUN")]
    pub lun: (String, u64),
    /// The source host (initiator name), the LU's current owner.
    #[arg(long, value_name = "HOST_S")]
    pub from: String,
    /// The destination host (initiator name), logged in to the LU.
    #[arg(long, value_name = "HOST_D")]
    pub to: String,
    /// Epoch to commit [default: the LU's current epoch + 1].
    #[arg(long)]
    pub epoch: Option<u64>,
    /// Journal file [default: ./ironlun-migrate-<TARGET_LUN>.journal].
    #[arg(long, value_name = "FILE")]
    pub journal: Option<PathBuf>,
    /// How long the target waits for the source's in-flight commands at commit.
    #[arg(long, value_name = "MS", default_value_t = 5000)]
    pub deadline_ms: u64,
    /// What the target does when that deadline passes.
    #[arg(long, value_name = "abort|refuse", default_value_t = OnDeadline::Abort)]
    pub on_deadline: OnDeadline,
    /// Hook: pre-copy (the hypervisor copies memory).
    #[arg(long, value_name = "CMD")]
    pub precopy: Option<String>,
    /// Hook: pause the guest on the source and drain its I/O.
    #[arg(long, value_name = "CMD")]
    pub pause: Option<String>,
    /// Hook: resume the guest on the destination.
    #[arg(long, value_name = "CMD")]
    pub resume: Option<String>,
    /// Hook: resume the guest on the source (after a failure). Required with --pause.
    #[arg(long, value_name = "CMD")]
    pub rollback: Option<String>,
    /// Hook: announce the guest's addresses from the destination.
    #[arg(long, value_name = "CMD")]
    pub announce: Option<String>,
    /// Deadline of every step, hooks and admin calls alike [default: per step, e.g. 30 s for
    /// the commit, 1 h for pre-copy]. The commit always gets at least --deadline-ms + 10 s.
    #[arg(long, value_name = "SECS")]
    pub step_timeout: Option<u64>,
    /// Print a JSON summary on stdout instead of the timeline (hook stdout goes to stderr).
    #[arg(long)]
    pub json: bool,
}

/// The arguments a resumed run must repeat, stored beside the journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanFile {
    pub target: String,
    pub lun: u64,
    pub from: String,
    pub to: String,
    pub epoch: u64,
}

/// `./ironlun-migrate-<TARGET_LUN>.journal`, every byte outside `[A-Za-z0-9._-]` made `_`.
pub fn default_journal(target: &str, lun: u64) -> PathBuf {
    let name: String = format!("{target}_{lun}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    PathBuf::from(format!("ironlun-migrate-{name}.journal"))
}

/// The `<journal>.plan` file.
fn plan_path(journal: &Path) -> PathBuf {
    let mut p = journal.as_os_str().to_owned();
    p.push(".plan");
    PathBuf::from(p)
}

/// Maps an admin API reply to the coordinator's failure kinds (issue 6 admin contract):
/// no reply or a server error → [`Failure::Unknown`]; 409 `committed` → [`Failure::Committed`];
/// any other 4xx → [`Failure::Failed`]. Success gives the body.
pub fn classify(reply: Result<Reply, CtlError>) -> Result<Vec<u8>, Failure> {
    classify_coded(reply).map_err(|(f, _)| f)
}

/// [`classify`], keeping the API's error `code` beside the failure.
fn classify_coded(reply: Result<Reply, CtlError>) -> Result<Vec<u8>, (Failure, Option<String>)> {
    let r = reply.map_err(|e| (Failure::Unknown(e.0), None))?;
    if (200..300).contains(&r.status) {
        return Ok(r.body);
    }
    let (msg, code) = error_fields(&r.body);
    let what = match &code {
        Some(c) => format!("{msg} (HTTP {}, {c})", r.status),
        None => format!("{msg} (HTTP {})", r.status),
    };
    let failure = match r.status {
        409 if code.as_deref() == Some("committed") => Failure::Committed,
        400..=499 => Failure::Failed(what),
        _ => Failure::Unknown(what),
    };
    Err((failure, code))
}

/// `error` and `code` of an error body (the body's text when it is not the API's JSON).
fn error_fields(body: &[u8]) -> (String, Option<String>) {
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(v) => {
            let msg = v
                .get("error")
                .and_then(serde_json::Value::as_str)
                .unwrap_or("refused")
                .to_owned();
            let code = v
                .get("code")
                .and_then(serde_json::Value::as_str)
                .map(str::to_owned);
            (msg, code)
        }
        Err(_) => (String::from_utf8_lossy(body).trim().to_owned(), None),
    }
}

/// `GET ownership`'s answer, the fields the driver uses.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Ownership {
    pub owner: Option<String>,
    pub epoch: u64,
    /// The lowest epoch the target accepts for a new handover (above the LU's epoch and every
    /// epoch aborted on it); absent from older daemons.
    #[serde(default)]
    pub next_epoch: Option<u64>,
}

/// Parses an ownership body.
pub fn parse_ownership(body: &[u8]) -> Result<Ownership, String> {
    serde_json::from_slice(body).map_err(|e| format!("unexpected ownership JSON: {e}"))
}

/// The coordinator's view of an ownership answer for a handover from `from` to `to`.
pub fn target_view(o: &Ownership, from: &str, to: &str) -> TargetView {
    let owner = match o.owner.as_deref() {
        Some(h) if h == from => Owner::Source,
        Some(h) if h == to => Owner::Destination,
        _ => Owner::Neither,
    };
    TargetView {
        epoch: o.epoch,
        owner,
    }
}

/// The handover endpoints of one LU.
#[derive(Debug, Clone)]
struct Api {
    client: Client,
    base: String,
    from: String,
    to: String,
    deadline_ms: u64,
    on_deadline: OnDeadline,
}

/// The result of one admin call, as the coordinator takes it.
enum CallResult {
    Step(Result<(), Failure>),
    Query(Result<TargetView, Failure>),
}

impl Api {
    fn ownership(&self, timeout: Duration) -> Result<Ownership, Failure> {
        let body = classify(self.client.request(
            "GET",
            &format!("{}/ownership", self.base),
            None,
            timeout,
        ))?;
        parse_ownership(&body).map_err(Failure::Unknown)
    }

    fn post(
        &self,
        what: &str,
        body: &admin::HandoverRequest,
        timeout: Duration,
    ) -> Result<Vec<u8>, (Failure, Option<String>)> {
        let body = serde_json::to_string(body)
            .map_err(|e| (Failure::Unknown(format!("cannot encode JSON: {e}")), None))?;
        classify_coded(self.client.request(
            "POST",
            &format!("{}/handover/{what}", self.base),
            Some(body.as_bytes()),
            timeout,
        ))
    }

    /// `commit` of `from` → `to` at `epoch`. The daemon commits only a prepared handover, and
    /// a prepared state does not survive a daemon restart, so a `not_prepared` refusal is
    /// answered with `prepare` (no write access changes) and one more `commit`. This also
    /// makes the hand-back (`to` → `from`, never prepared by the coordinator) a prepare plus
    /// a commit.
    fn commit(
        &self,
        from: &str,
        to: &str,
        epoch: u64,
        on: OnDeadline,
        timeout: Duration,
    ) -> Result<Vec<u8>, Failure> {
        let body = admin::HandoverRequest {
            deadline_ms: Some(self.deadline_ms),
            on_deadline: Some(on),
            ..handover_request(from, to, epoch)
        };
        match self.post("commit", &body, timeout) {
            Err((_, Some(code))) if code == "not_prepared" => {
                let pair = handover_request(from, to, epoch);
                self.post("prepare", &pair, timeout).map_err(|(f, _)| f)?;
                self.post("commit", &body, timeout).map_err(|(f, _)| f)
            }
            r => r.map_err(|(f, _)| f),
        }
    }

    /// Executes `call`; a commit's reply body is returned for the report.
    fn call(&self, call: AdminCall, timeout: Duration) -> (CallResult, Option<serde_json::Value>) {
        let (from, to) = (self.from.as_str(), self.to.as_str());
        let pair = |epoch: u64| handover_request(from, to, epoch);
        let step = |r: Result<Vec<u8>, Failure>| CallResult::Step(r.map(|_| ()));
        let plain = |r: Result<Vec<u8>, (Failure, Option<String>)>| step(r.map_err(|(f, _)| f));
        match call {
            AdminCall::Prepare { epoch } => {
                (plain(self.post("prepare", &pair(epoch), timeout)), None)
            }
            AdminCall::Abort { epoch } => (plain(self.post("abort", &pair(epoch), timeout)), None),
            AdminCall::Commit { epoch } => {
                let r = self.commit(from, to, epoch, self.on_deadline, timeout);
                let info = r.as_ref().ok().and_then(|b| serde_json::from_slice(b).ok());
                (step(r), info)
            }
            // The reverse commit always aborts a stuck destination: refusing would leave the
            // guest running nowhere.
            AdminCall::HandBack { epoch } => (
                step(self.commit(to, from, epoch, OnDeadline::Abort, timeout)),
                None,
            ),
            AdminCall::QueryState => (
                CallResult::Query(self.ownership(timeout).map(|o| target_view(&o, from, to))),
                None,
            ),
        }
    }
}

/// A monotonic clock whose origin is the Unix epoch (read once at start).
struct Clock {
    base_us: u64,
    start: Instant,
}

impl Clock {
    fn new() -> Self {
        let base_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        Self {
            base_us,
            start: Instant::now(),
        }
    }

    fn now(&self) -> Time {
        Time::from_micros(self.base_us).saturating_add(self.start.elapsed())
    }
}

/// The journal file, appended with an fsync per record.
struct JournalFile {
    file: File,
}

impl JournalFile {
    fn append(&mut self, r: &Record) -> std::io::Result<()> {
        self.file.write_all(r.encode().as_bytes())?;
        self.file.sync_data()
    }
}

/// fsync the directory holding `path` (so a created or renamed file survives a crash).
fn sync_dir(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

/// Writes `bytes` to `path` durably (temp file, fsync, rename, fsync directory).
fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    sync_dir(path)
}

/// How the run starts.
enum Start {
    /// `after`: the highest epoch of the closed journal just rotated away. The target refuses
    /// an aborted epoch for good, so the next handover must use a higher one.
    Fresh { after: Option<u64> },
    Resume {
        recovery: journal::Recovery,
        valid_len: usize,
    },
}

/// A failure that ends the run before or outside the handover, with its exit status.
#[derive(Debug)]
struct Fatal {
    status: u8,
    msg: String,
}

fn usage(msg: impl Into<String>) -> Fatal {
    Fatal {
        status: EXIT_USAGE,
        msg: msg.into(),
    }
}

fn stuck(msg: impl Into<String>) -> Fatal {
    Fatal {
        status: EXIT_NOT_MIGRATED,
        msg: msg.into(),
    }
}

/// Reads the journal at `path` (absent: fresh) and decides how to start. A closed journal is
/// rotated away.
fn open_journal(path: &Path, clock: &Clock) -> Result<Start, Fatal> {
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Start::Fresh { after: None })
        }
        Err(e) => {
            return Err(stuck(format!(
                "cannot read journal {}: {e}",
                path.display()
            )))
        }
    };
    let mut bytes = Vec::new();
    let cap = u64::try_from(MAX_JOURNAL_BYTES)
        .unwrap_or(u64::MAX)
        .saturating_add(1);
    (&mut f)
        .take(cap)
        .read_to_end(&mut bytes)
        .map_err(|e| stuck(format!("cannot read journal {}: {e}", path.display())))?;
    let operator = |e: journal::JournalError| {
        stuck(format!(
            "journal {} cannot be used ({e}); the target still allows a single writer: check the \
             owner with `ironlun ctl reservations`, finish by hand, then move the journal away",
            path.display()
        ))
    };
    let parsed = journal::parse(&bytes).map_err(operator)?;
    let recovery = journal::replay(&parsed.records).map_err(operator)?;
    match recovery.resume_at {
        ResumeAt::Fresh => Ok(Start::Fresh { after: None }),
        ResumeAt::Finished { .. } => {
            let ms = clock.now().as_micros() / 1000;
            let mut to = path.as_os_str().to_owned();
            to.push(format!(".{ms}.closed"));
            let to = PathBuf::from(to);
            std::fs::rename(path, &to)
                .and_then(|()| sync_dir(path))
                .map_err(|e| {
                    stuck(format!(
                        "cannot rotate closed journal {}: {e}",
                        path.display()
                    ))
                })?;
            let _ = std::fs::remove_file(plan_path(path));
            Ok(Start::Fresh {
                after: parsed.records.iter().map(|r| r.epoch).max(),
            })
        }
        _ => Ok(Start::Resume {
            recovery,
            valid_len: parsed.valid_len,
        }),
    }
}

/// Where hook stdout goes.
#[derive(Debug, Clone, Copy)]
enum HookStdout {
    Inherit,
    Stderr,
}

/// Everything a hook is told.
#[derive(Debug, Clone)]
struct HookEnv {
    lun: String,
    from: String,
    to: String,
    epoch: u64,
    stdout: HookStdout,
}

/// A hook or admin call in flight.
#[derive(Debug, Clone, Copy)]
struct Running {
    seq: u64,
    step: Step,
    /// The hook's process group.
    pgid: Option<u32>,
}

enum Done {
    Step(Step, Result<(), Failure>),
    Query(Result<TargetView, Failure>),
}

/// The loop that executes the coordinator's actions.
struct Driver {
    h: Handover,
    api: Api,
    env: HookEnv,
    journal: JournalFile,
    clock: Clock,
    tx: mpsc::Sender<(u64, Done, Option<serde_json::Value>)>,
    rx: mpsc::Receiver<(u64, Done, Option<serde_json::Value>)>,
    seq: u64,
    running: Option<Running>,
    commit_info: Option<serde_json::Value>,
}

impl Driver {
    fn run(&mut self) -> Result<(), Fatal> {
        self.h.start(self.clock.now());
        loop {
            while let Some(a) = self.h.poll_action() {
                self.execute(a)?;
            }
            if self.h.outcome().is_some() {
                return Ok(());
            }
            let Some(running) = self.running else {
                return Err(stuck("internal: the coordinator waits but nothing runs"));
            };
            let now = self.clock.now();
            let wait = self
                .h
                .poll_timeout()
                .map(|t| t.saturating_duration_since(now));
            let got = match wait {
                Some(w) => self.rx.recv_timeout(w),
                None => self
                    .rx
                    .recv()
                    .map_err(|_| mpsc::RecvTimeoutError::Disconnected),
            };
            match got {
                Ok((seq, done, info)) if seq == running.seq => {
                    self.running = None;
                    let now = self.clock.now();
                    if info.is_some() {
                        self.commit_info = info;
                    }
                    match &done {
                        Done::Step(step, Err(f)) => eprintln!("ironlun migrate: {step} {f}"),
                        Done::Query(Err(f)) => eprintln!("ironlun migrate: query {f}"),
                        _ => {}
                    }
                    match done {
                        Done::Step(step, r) => {
                            self.h.on_result(step, r, now);
                        }
                        Done::Query(r) => {
                            self.h.on_query(r, now);
                        }
                    }
                }
                // A late result of a cancelled attempt.
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => self.h.on_timeout(self.clock.now()),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(stuck("internal: result channel closed"))
                }
            }
        }
    }

    fn execute(&mut self, a: Action) -> Result<(), Fatal> {
        match a {
            Action::WriteJournal(r) => self.journal.append(&r).map_err(|e| {
                stuck(format!(
                    "cannot write the journal ({e}); stopped before the step it announces; the \
                     target still allows a single writer; fix the journal's file system and \
                     re-run the same command to resume"
                ))
            }),
            Action::RunHook { step, cmd, .. } => {
                self.spawn_hook(step, &cmd);
                Ok(())
            }
            Action::Admin { step, call } => {
                let seq = self.next_seq();
                self.running = Some(Running {
                    seq,
                    step,
                    pgid: None,
                });
                let api = self.api.clone();
                let tx = self.tx.clone();
                let timeout = self
                    .h
                    .plan()
                    .deadlines
                    .of(step)
                    .saturating_add(Duration::from_secs(1));
                std::thread::spawn(move || {
                    let (r, info) = api.call(call, timeout);
                    let done = match r {
                        CallResult::Step(r) => Done::Step(step, r),
                        CallResult::Query(r) => Done::Query(r),
                    };
                    let _ = tx.send((seq, done, info));
                });
                Ok(())
            }
            Action::Cancel { step } => {
                if let Some(r) = self.running.filter(|r| r.step == step) {
                    if let Some(pgid) = r.pgid {
                        kill_group(pgid);
                    }
                    self.running = None;
                }
                Ok(())
            }
        }
    }

    fn next_seq(&mut self) -> u64 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    fn spawn_hook(&mut self, step: Step, cmd: &str) {
        let seq = self.next_seq();
        let tx = self.tx.clone();
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(cmd)
            .env("IRONLUN_LUN", &self.env.lun)
            .env("IRONLUN_FROM", &self.env.from)
            .env("IRONLUN_TO", &self.env.to)
            .env("IRONLUN_EPOCH", self.hook_epoch(step).to_string())
            .env("IRONLUN_STEP", step.name())
            .stdin(Stdio::null())
            .process_group(0);
        if let HookStdout::Stderr = self.env.stdout {
            if let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() {
                c.stdout(Stdio::from(fd));
            }
        }
        let mut running = Running {
            seq,
            step,
            pgid: None,
        };
        match c.spawn() {
            Ok(mut child) => {
                running.pgid = Some(child.id());
                std::thread::spawn(move || {
                    let r = match child.wait() {
                        Ok(s) if s.success() => Ok(()),
                        Ok(s) => Err(Failure::Failed(format!("hook {step} {s}"))),
                        Err(e) => Err(Failure::Unknown(format!("hook {step}: {e}"))),
                    };
                    let _ = tx.send((seq, Done::Step(step, r), None));
                });
            }
            Err(e) => {
                let r = Err(Failure::Failed(format!("cannot run hook {step}: {e}")));
                let _ = tx.send((seq, Done::Step(step, r), None));
            }
        }
        self.running = Some(running);
    }

    fn hook_epoch(&self, step: Step) -> u64 {
        if step == Step::HandBack {
            self.env.epoch.saturating_add(1)
        } else {
            self.env.epoch
        }
    }
}

/// SIGKILL to the hook's process group (the shell and whatever it started).
fn kill_group(pgid: u32) {
    let _ = Command::new("kill")
        .args(["-s", "KILL", "--", &format!("-{pgid}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Entry point: runs the handover and prints the report on `out`. Returns the exit status.
pub fn main(args: &MigrateArgs, out: &mut dyn Write) -> u8 {
    match run(args, out) {
        Ok(status) => status,
        Err(f) => {
            eprintln!("ironlun migrate: {}", f.msg);
            f.status
        }
    }
}

fn run(args: &MigrateArgs, out: &mut dyn Write) -> Result<u8, Fatal> {
    let (target, lun) = (&args.lun.0, args.lun.1);
    if args.from.is_empty() || args.to.is_empty() {
        return Err(usage("--from and --to must name hosts"));
    }
    if args.from == args.to {
        return Err(usage("--from and --to name the same host"));
    }
    if args.epoch.is_some_and(|e| e == 0 || e == u64::MAX) {
        return Err(usage("--epoch must be at least 1 and below 2^64-1"));
    }
    if args.pause.is_some() && args.rollback.is_none() {
        return Err(usage(
            "--pause needs --rollback (a paused source must be resumable)",
        ));
    }
    let url = ctl::admin_url(args.admin.clone());
    let token_file = args.token_file.clone().or_else(|| {
        std::env::var_os("IRONLUN_ADMIN_TOKEN_FILE")
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
    });
    let client = Client::new(&url, token_file.as_deref()).map_err(|e| usage(e.0))?;
    let journal_path = args
        .journal
        .clone()
        .unwrap_or_else(|| default_journal(target, lun));
    let clock = Clock::new();
    let api = Api {
        client,
        base: format!("/v1/luns/{}/{lun}", admin::percent_encode(target)),
        from: args.from.clone(),
        to: args.to.clone(),
        deadline_ms: args.deadline_ms,
        on_deadline: args.on_deadline,
    };
    let start = open_journal(&journal_path, &clock)?;
    let plan_file = |epoch| PlanFile {
        target: target.clone(),
        lun,
        from: args.from.clone(),
        to: args.to.clone(),
        epoch,
    };
    let (epoch, recovery) = match start {
        Start::Resume {
            recovery,
            valid_len,
        } => {
            let epoch = recovery.epoch.unwrap_or_default();
            let want = plan_file(args.epoch.unwrap_or(epoch));
            let stored = std::fs::read(plan_path(&journal_path))
                .ok()
                .and_then(|b| serde_json::from_slice::<PlanFile>(&b).ok());
            let mismatch = match &stored {
                Some(s) => *s != want || s.epoch != epoch,
                None => want.epoch != epoch,
            };
            if mismatch {
                let was = stored.map_or_else(
                    || format!("epoch {epoch}"),
                    |s| {
                        format!(
                            "{}/{} from {} to {} at epoch {}",
                            s.target, s.lun, s.from, s.to, s.epoch
                        )
                    },
                );
                return Err(usage(format!(
                    "journal {} holds an unfinished handover of {was}; re-run with the same \
                     --lun, --from, --to (and --epoch) to resume it, or use another --journal",
                    journal_path.display()
                )));
            }
            // Drop a torn last line before appending.
            let f = OpenOptions::new()
                .write(true)
                .open(&journal_path)
                .map_err(|e| {
                    stuck(format!(
                        "cannot open journal {}: {e}",
                        journal_path.display()
                    ))
                })?;
            f.set_len(u64::try_from(valid_len).unwrap_or(u64::MAX))
                .and_then(|()| f.sync_all())
                .map_err(|e| {
                    stuck(format!(
                        "cannot repair journal {}: {e}",
                        journal_path.display()
                    ))
                })?;
            (epoch, Some(recovery))
        }
        Start::Fresh { after } => {
            let epoch = match args.epoch {
                Some(e) => e,
                None => {
                    let o = api.ownership(Duration::from_secs(15)).map_err(|f| {
                        stuck(format!("cannot read the ownership of {target}/{lun}: {f}"))
                    })?;
                    let next = o.epoch.max(after.unwrap_or(0)).checked_add(1);
                    next.map(|n| n.max(o.next_epoch.unwrap_or(0)))
                        .filter(|e| *e < u64::MAX)
                        .ok_or_else(|| stuck("the LU's epoch is at its maximum"))?
                }
            };
            let json = serde_json::to_vec(&plan_file(epoch)).unwrap_or_default();
            write_durably(&plan_path(&journal_path), &json).map_err(|e| {
                stuck(format!(
                    "cannot write {}: {e}",
                    plan_path(&journal_path).display()
                ))
            })?;
            (epoch, None)
        }
    };
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&journal_path)
        .and_then(|f| sync_dir(&journal_path).map(|()| f))
        .map_err(|e| {
            stuck(format!(
                "cannot open journal {}: {e}",
                journal_path.display()
            ))
        })?;
    let mut plan = Plan::new(
        epoch,
        Hooks {
            precopy: args.precopy.clone(),
            pause: args.pause.clone(),
            resume: args.resume.clone(),
            rollback: args.rollback.clone(),
            announce: args.announce.clone(),
        },
    );
    if let Some(s) = args.step_timeout {
        let d = Duration::from_secs(s.max(1));
        let dl = &mut plan.deadlines;
        for slot in [
            &mut dl.prepare,
            &mut dl.precopy,
            &mut dl.pause,
            &mut dl.commit,
            &mut dl.query,
            &mut dl.abort,
            &mut dl.rollback,
            &mut dl.resume,
            &mut dl.announce,
            &mut dl.handback,
        ] {
            *slot = d;
        }
    }
    let floor = Duration::from_millis(args.deadline_ms).saturating_add(COMMIT_MARGIN);
    plan.deadlines.commit = plan.deadlines.commit.max(floor);
    plan.deadlines.handback = plan.deadlines.handback.max(floor);
    let resumed = recovery.is_some();
    let h = match &recovery {
        Some(r) => Handover::recover(plan, r),
        None => Handover::new(plan),
    }
    .map_err(|e| match e {
        PlanError::RollbackRequired => {
            usage("--pause needs --rollback (a paused source must be resumable)")
        }
        e => usage(e.to_string()),
    })?;
    let (tx, rx) = mpsc::channel();
    let mut d = Driver {
        h,
        api,
        env: HookEnv {
            lun: format!("{target}/{lun}"),
            from: args.from.clone(),
            to: args.to.clone(),
            epoch,
            stdout: if args.json {
                HookStdout::Stderr
            } else {
                HookStdout::Inherit
            },
        },
        journal: JournalFile { file },
        clock,
        tx,
        rx,
        seq: 0,
        running: None,
        commit_info: None,
    };
    if !args.json {
        let how = if resumed { "resuming" } else { "handover" };
        let _ = writeln!(
            out,
            "{how} {target}/{lun}: {} -> {} at epoch {epoch} (journal {})",
            args.from,
            args.to,
            journal_path.display()
        );
        let _ = out.flush();
    }
    let ran = d.run();
    let report = Report {
        lun: format!("{target}/{lun}"),
        from: &args.from,
        to: &args.to,
        epoch,
        journal: &journal_path,
        resumed,
        timeline: d.h.timeline(),
        outcome: d.h.outcome(),
        commit: d.commit_info.as_ref(),
    };
    if let Err(f) = ran {
        report.print(out, args.json, Some(&f.msg));
        return Ok(f.status);
    }
    report.print(out, args.json, None);
    Ok(match d.h.outcome() {
        Some(Outcome::Migrated { .. }) => EXIT_MIGRATED,
        _ => EXIT_NOT_MIGRATED,
    })
}

/// What `ironlun migrate` prints at the end.
struct Report<'a> {
    lun: String,
    from: &'a str,
    to: &'a str,
    epoch: u64,
    journal: &'a Path,
    resumed: bool,
    timeline: &'a Timeline,
    outcome: Option<&'a Outcome>,
    commit: Option<&'a serde_json::Value>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl Report<'_> {
    /// The outcome's name, its one-line message and what the operator should do.
    fn verdict(&self, fatal: Option<&str>) -> (&'static str, String) {
        let (lun, from, to, j) = (&self.lun, self.from, self.to, self.journal.display());
        match (self.outcome, fatal) {
            (Some(Outcome::Migrated { announce_failed }), _) => {
                let warn = announce_failed
                    .as_ref()
                    .map(|a| format!(" (announce {a}: announce the guest's addresses by hand)"))
                    .unwrap_or_default();
                (
                    "migrated",
                    format!(
                        "{to} owns {lun} at epoch {} and runs the guest{warn}",
                        self.epoch
                    ),
                )
            }
            (
                Some(Outcome::RolledBack {
                    cause,
                    reason,
                    handed_back,
                    ..
                }),
                _,
            ) => {
                let how = if *handed_back {
                    "the LU was handed back and "
                } else {
                    ""
                };
                (
                    "rolled_back",
                    format!(
                        "{how}{from} owns {lun} again and runs the guest; {cause} {reason}; fix \
                         the cause and run the handover again"
                    ),
                )
            }
            (Some(Outcome::Stuck { reason }), _) => (
                "stuck",
                format!(
                    "{reason}; the journal {j} stays open and the target still allows a single \
                     writer: check `ironlun ctl reservations`, fix the cause and re-run the same \
                     command to resume"
                ),
            ),
            (None, Some(f)) => ("stuck", f.to_owned()),
            (None, None) => (
                "stuck",
                format!("unfinished; re-run the same command to resume from {j}"),
            ),
        }
    }

    fn print(&self, out: &mut dyn Write, json: bool, fatal: Option<&str>) {
        let (name, msg) = self.verdict(fatal);
        let origin = self
            .timeline
            .spans()
            .first()
            .map(|s| s.start)
            .unwrap_or_default();
        if json {
            let spans: Vec<serde_json::Value> = self
                .timeline
                .spans()
                .iter()
                .map(|s| {
                    serde_json::json!({
                        "step": s.step.name(),
                        "phase": s.phase.name(),
                        "start_ms": ms(s.start.saturating_duration_since(origin)),
                        "duration_ms": s.end.map(|e| ms(e.saturating_duration_since(s.start))),
                    })
                })
                .collect();
            let v = serde_json::json!({
                "outcome": name,
                "message": msg,
                "lun": self.lun,
                "from": self.from,
                "to": self.to,
                "epoch": self.epoch,
                "resumed": self.resumed,
                "journal": self.journal.display().to_string(),
                "blackout_ms": self.timeline.blackout().map(ms),
                "storage_switch_ms": self.timeline.storage_switch().map(ms),
                "handback_ms": self.timeline.handback().map(ms),
                "commit": self.commit,
                "timeline": spans,
            });
            let _ = writeln!(out, "{v}");
            let _ = out.flush();
            return;
        }
        for s in self.timeline.spans() {
            let took = s.end.map_or_else(
                || "running".to_owned(),
                |e| format!("{:.3} ms", ms(e.saturating_duration_since(s.start))),
            );
            let _ = writeln!(
                out,
                "{:>14} ms  {:<9} {:<7} {took}",
                format!("+{:.3}", ms(s.start.saturating_duration_since(origin))),
                s.step.name(),
                s.phase.name()
            );
        }
        let opt = |d: Option<Duration>| {
            d.map_or_else(|| "n/a".to_owned(), |d| format!("{:.3} ms", ms(d)))
        };
        let _ = writeln!(out, "blackout {}", opt(self.timeline.blackout()));
        let mut switch = format!("storage switch {}", opt(self.timeline.storage_switch()));
        if let Some(steps) = self.commit.and_then(|c| c.get("steps_us")) {
            let us = |k: &str| {
                steps
                    .get(k)
                    .and_then(serde_json::Value::as_u64)
                    .unwrap_or(0)
            };
            switch.push_str(&format!(
                " (target: fence {} us, drain {} us, flush {} us, transfer {} us; {} tasks aborted)",
                us("fence"),
                us("drain"),
                us("flush"),
                us("transfer"),
                self.commit
                    .and_then(|c| c.get("aborted_tasks"))
                    .and_then(serde_json::Value::as_u64)
                    .unwrap_or(0)
            ));
        }
        let _ = writeln!(out, "{switch}");
        if let Some(h) = self.timeline.handback() {
            let _ = writeln!(out, "hand-back {:.3} ms", ms(h));
        }
        let _ = writeln!(out, "{}: {msg}", name.replace('_', " "));
        let _ = out.flush();
    }
}

/// The body of a prepare or abort (and the base of a commit's).
fn handover_request(from: &str, to: &str, epoch: u64) -> admin::HandoverRequest {
    admin::HandoverRequest {
        from: from.to_string(),
        to: to.to_string(),
        epoch,
        deadline_ms: None,
        on_deadline: None,
        commit_on_write: false,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn reply(status: u16, body: &str) -> Result<Reply, CtlError> {
        Ok(Reply {
            status,
            body: body.as_bytes().to_vec(),
        })
    }

    #[test]
    fn classify_table() {
        let unknown = |r| matches!(r, Err(Failure::Unknown(_)));
        let failed = |r| matches!(r, Err(Failure::Failed(_)));
        assert_eq!(classify(reply(200, "{}")), Ok(b"{}".to_vec()));
        assert_eq!(
            classify(reply(409, r#"{"error":"x","code":"committed"}"#)),
            Err(Failure::Committed)
        );
        assert!(failed(classify(reply(
            409,
            r#"{"error":"x","code":"stale_epoch"}"#
        ))));
        assert!(failed(classify(reply(
            409,
            r#"{"error":"x","code":"aborted"}"#
        ))));
        assert!(failed(classify(reply(404, "not json"))));
        assert!(failed(classify(reply(401, r#"{"error":"token"}"#))));
        assert!(unknown(classify(reply(500, r#"{"error":"x"}"#))));
        assert!(unknown(classify(reply(503, ""))));
        assert!(unknown(classify(Err(CtlError(
            "connection refused".into()
        )))));
        // `committed` only counts as such on a 409.
        assert!(unknown(classify(reply(
            500,
            r#"{"error":"x","code":"committed"}"#
        ))));
    }

    #[test]
    fn refusal_message_names_code_and_status() {
        let Err(Failure::Failed(m)) = classify(reply(
            409,
            r#"{"error":"not logged in","code":"destination_not_logged_in"}"#,
        )) else {
            panic!("expected a refusal");
        };
        assert_eq!(m, "not logged in (HTTP 409, destination_not_logged_in)");
    }

    #[test]
    fn ownership_maps_to_view() {
        let o = parse_ownership(br#"{"owner":"iqn.b","epoch":7,"generation":3,"handover":null}"#)
            .unwrap();
        assert_eq!(
            target_view(&o, "iqn.a", "iqn.b"),
            TargetView {
                epoch: 7,
                owner: Owner::Destination
            }
        );
        assert_eq!(target_view(&o, "iqn.b", "iqn.c").owner, Owner::Source);
        assert_eq!(target_view(&o, "iqn.x", "iqn.y").owner, Owner::Neither);
        let none = parse_ownership(br#"{"owner":null,"epoch":0}"#).unwrap();
        assert_eq!(target_view(&none, "a", "b").owner, Owner::Neither);
        assert_eq!(o.next_epoch, None);
        let n = parse_ownership(br#"{"owner":"a","epoch":7,"next_epoch":9}"#).unwrap();
        assert_eq!(n.next_epoch, Some(9));
        assert!(parse_ownership(br#"{"owner":"a"}"#).is_err());
        assert!(parse_ownership(br#"{"owner":"a","epoch":-1}"#).is_err());
    }

    #[test]
    fn default_journal_is_sanitised() {
        assert_eq!(
            default_journal("iqn.2026-11.io.ironlun:lab", 3),
            PathBuf::from("ironlun-migrate-iqn.2026-11.io.ironlun_lab_3.journal")
        );
        assert_eq!(
            default_journal("../a b/c", 0),
            PathBuf::from("ironlun-migrate-.._a_b_c_0.journal")
        );
    }

    #[test]
    fn plan_path_appends_suffix() {
        assert_eq!(
            plan_path(Path::new("/x/j.journal")),
            PathBuf::from("/x/j.journal.plan")
        );
    }
}
