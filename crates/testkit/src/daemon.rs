//! `ironlun serve` as a child process: started on a data directory (a temp dir of its own, or
//! one the test owns for restarts), its bound addresses read from stdout, stopped with SIGTERM
//! on drop, asserting that it never died on its own and never printed "panicked".

use crate::admin::{admin_connect, AdminStream};
use crate::tools::repo_root;
use crate::{PROMPT, TARGET};
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// `--listen 127.0.0.1:0`: one portal on a free port instead of the configured ones.
pub const LISTEN_ANY: &[&str] = &["--listen", "127.0.0.1:0"];

/// How long the daemon may take to print its addresses, or to exit after a signal.
const START_STOP: Duration = Duration::from_secs(30);

/// An `ironlun` executable.
#[derive(Clone, Debug)]
pub struct Binary(PathBuf);

impl Binary {
    /// The executable at `path` (in a daemon test: `env!("CARGO_BIN_EXE_ironlun")`).
    pub fn new(path: impl Into<PathBuf>) -> Binary {
        Binary(path.into())
    }

    /// The release build: `$IRONLUN_BIN`, else `release/ironlun` under `$CARGO_TARGET_DIR` or
    /// the workspace's `target/`. Panics if that file is missing (`scripts/test.sh` builds it).
    pub fn release() -> Binary {
        if let Ok(p) = std::env::var("IRONLUN_BIN") {
            return Binary(PathBuf::from(p));
        }
        let target = std::env::var("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| repo_root().join("target"));
        let p = target.join("release/ironlun");
        assert!(
            p.exists(),
            "{} missing: run `cargo build --release -p ironlun` (scripts/test.sh does)",
            p.display()
        );
        Binary(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// A command running this executable.
    pub fn command(&self) -> Command {
        Command::new(&self.0)
    }

    /// `ironlun ctl ARGS`, with no admin address or token taken from the environment; its
    /// output, whatever the exit status.
    pub fn ctl(&self, args: &[&str]) -> Output {
        self.command()
            .arg("ctl")
            .args(args)
            .env_remove("IRONLUN_ADMIN")
            .env_remove("IRONLUN_ADMIN_TOKEN_FILE")
            .output()
            .expect("run ironlun ctl")
    }

    /// `ironlun ctl --admin ADMIN ARGS` ([`Binary::ctl`] against the admin API at `admin`, as
    /// [`Daemon::admin`] prints it); its output, whatever the exit status.
    pub fn ctl_at(&self, admin: &str, args: &[&str]) -> Output {
        self.ctl(&[["--admin", admin].as_slice(), args].concat())
    }
}

impl From<&str> for Binary {
    fn from(p: &str) -> Binary {
        Binary::new(p)
    }
}

/// What to start: binary, config, extra files, arguments, environment. Made by
/// [`Daemon::builder`] or [`Daemon::release`].
#[derive(Clone, Debug)]
pub struct DaemonBuilder {
    bin: Binary,
    config: Option<String>,
    files: Vec<(String, String)>,
    args: Vec<String>,
    listen_any: bool,
    /// Variables to set (`Some`) or remove (`None`), in order.
    env: Vec<(String, Option<String>)>,
}

impl DaemonBuilder {
    /// `text` (TOML) as the config file, `DIR/ironlun.toml`.
    pub fn config(mut self, text: &str) -> Self {
        self.config = Some(text.to_owned());
        self
    }

    /// Write `text` to `DIR/name` before the first start (token files, LUN images).
    pub fn file(mut self, name: &str, text: &str) -> Self {
        self.files.push((name.to_owned(), text.to_owned()));
        self
    }

    /// Extra `serve` arguments.
    pub fn args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|a| (*a).to_owned()));
        self
    }

    /// Serve the configured portals; without this, [`LISTEN_ANY`] replaces them.
    pub fn portals(mut self) -> Self {
        self.listen_any = false;
        self
    }

    /// Set an environment variable of the daemon.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), Some(value.to_owned())));
        self
    }

    /// Remove an environment variable the test process would pass on.
    pub fn env_remove(mut self, key: &str) -> Self {
        self.env.push((key.to_owned(), None));
        self
    }

    /// Start in a fresh temp dir that the daemon owns; panics if it refuses to start. With
    /// [`LISTEN_ANY`] it asserts one portal, and with the default config the default URL.
    pub fn start(self) -> Daemon {
        let dir = tempfile::tempdir().expect("temp dir");
        let (listen_any, default_config) = (self.listen_any, self.config.is_none());
        let mut d = self.start_in(dir.path());
        d.temp = Some(dir);
        if listen_any {
            assert_eq!(d.addrs.len(), 1, "one portal with --listen: {:?}", d.addrs);
            if default_config {
                assert_eq!(d.url, format!("iscsi://{}/{TARGET}/0", d.addr));
            }
        }
        d
    }

    /// [`DaemonBuilder::spawn_in`], panicking with the exit status and stderr if the daemon
    /// refuses to start.
    pub fn start_in(self, dir: &Path) -> Daemon {
        self.spawn_in(dir).unwrap_or_else(|r| {
            panic!(
                "daemon exited at start ({}); stderr:\n{}",
                r.status, r.stderr
            )
        })
    }

    /// Run `ironlun serve --data-dir DIR [--config DIR/ironlun.toml] [--listen 127.0.0.1:0]
    /// ARGS` on `dir`, which the caller owns (a restart on the same `dir` sees what the last
    /// run left there). The admin API is on `DIR/admin.sock` unless the args or the config
    /// say otherwise.
    ///
    /// Waits for the `listening`, `url` and `admin` lines; `Err` with the exit status and the
    /// whole stderr if the daemon exits first. Panics if it does neither within 30 s.
    pub fn spawn_in(self, dir: &Path) -> Result<Daemon, Refused> {
        for (name, text) in &self.files {
            std::fs::write(dir.join(name), text).expect("write file");
        }
        let run = launch(&self, dir)?;
        Ok(Daemon {
            addr: run.addr,
            addrs: run.addrs,
            url: run.url,
            urls: run.urls,
            admin: run.admin,
            child: run.child,
            stderr: run.stderr,
            stderr_reader: Some(run.stderr_reader),
            exited: false,
            spec: self,
            dir: dir.to_owned(),
            temp: None,
        })
    }
}

/// A running daemon. Dropping it stops it with SIGTERM and asserts a clean exit (unless the
/// test is already panicking).
pub struct Daemon {
    /// The first `listening` address.
    pub addr: SocketAddr,
    /// Every `listening` address, one per portal, in the order printed.
    pub addrs: Vec<SocketAddr>,
    /// The first `url` line.
    pub url: String,
    /// Every `url` line.
    pub urls: Vec<String>,
    /// The admin API as printed: `unix:<data_dir>/admin.sock` (an `--admin IP:PORT` gives
    /// `http://IP:PORT`), as `ironlun ctl --admin` takes it.
    pub admin: String,
    child: Child,
    stderr: Arc<Mutex<String>>,
    /// The thread draining stderr; joined once the process is gone so that `stderr` is complete.
    stderr_reader: Option<JoinHandle<()>>,
    /// The process is gone (waited for): `Drop` has nothing to stop.
    exited: bool,
    /// How it was started, for [`Daemon::ctl`] and [`Daemon::respawn`].
    spec: DaemonBuilder,
    dir: PathBuf,
    /// The data directory when the harness made it.
    temp: Option<tempfile::TempDir>,
}

/// A daemon that exited before printing its `admin` line (it refused to start).
#[derive(Debug)]
pub struct Refused {
    pub status: ExitStatus,
    /// Everything it wrote to stderr.
    pub stderr: String,
}

impl Daemon {
    /// Run `bin` with `RUST_LOG=debug` (tier 4: the debug log is in [`Daemon::stderr`]).
    pub fn builder(bin: impl Into<Binary>) -> DaemonBuilder {
        DaemonBuilder {
            bin: bin.into(),
            config: None,
            files: Vec::new(),
            args: Vec::new(),
            listen_any: true,
            env: vec![("RUST_LOG".to_owned(), Some("debug".to_owned()))],
        }
    }

    /// Run [`Binary::release`] with `IRONLUN_LOG` as the test's environment has it, else
    /// `info` (tier 6).
    pub fn release() -> DaemonBuilder {
        let log = std::env::var("IRONLUN_LOG").unwrap_or_else(|_| "info".into());
        DaemonBuilder {
            env: vec![("IRONLUN_LOG".to_owned(), Some(log))],
            ..Daemon::builder(Binary::release())
        }
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The binary it runs.
    pub fn binary(&self) -> &Binary {
        &self.spec.bin
    }

    /// `iscsi://ADDR` of the first portal.
    pub fn portal(&self) -> String {
        format!("iscsi://{}", self.addr)
    }

    /// The admin API's address as `ironlun ctl --admin` and `Client::new` take it.
    pub fn admin_url(&self) -> &str {
        &self.admin
    }

    /// The admin socket's path (panics when the admin API is on TCP).
    pub fn admin_socket(&self) -> PathBuf {
        PathBuf::from(
            self.admin
                .strip_prefix("unix:")
                .unwrap_or_else(|| panic!("admin API not on a Unix socket: {}", self.admin)),
        )
    }

    /// A raw connection to the admin API, for hand-written requests.
    pub fn admin_connect(&self) -> AdminStream {
        admin_connect(&self.admin)
    }

    /// `ironlun ctl --admin ADMIN ARGS` with this daemon's binary (no admin address or token
    /// taken from the environment); panics unless it succeeds. Its stdout and stderr.
    pub fn ctl(&self, args: &[&str]) -> String {
        let o = self.spec.bin.ctl_at(&self.admin, args);
        let mut out = String::from_utf8_lossy(&o.stdout).into_owned();
        out.push_str(&String::from_utf8_lossy(&o.stderr));
        assert!(o.status.success(), "ironlun ctl {args:?}:\n{out}");
        out
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Open file descriptors of the daemon process.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .expect("/proc/PID/fd")
            .count()
    }

    /// Wait until the daemon's open fds drop back to `n` (connections are closed).
    pub async fn settle_fds(&self, n: usize) {
        let deadline = Instant::now() + PROMPT;
        while self.open_fds() > n {
            assert!(
                Instant::now() < deadline,
                "fds stay at {} (baseline {n}); stderr:\n{}",
                self.open_fds(),
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Everything the daemon wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Panics unless the daemon is still running and has not reported a panic.
    pub fn assert_healthy(&mut self) {
        let status = self.child.try_wait().expect("try_wait");
        assert!(
            status.is_none(),
            "daemon exited on its own: {status:?}; stderr:\n{}",
            self.stderr()
        );
        assert!(
            !self.stderr().contains("panicked"),
            "daemon panicked; stderr:\n{}",
            self.stderr()
        );
    }

    /// Send SIGTERM (see [`Daemon::wait_exit`]).
    pub fn sigterm(&self) {
        self.signal("TERM");
    }

    /// Send `sig` ("HUP", "TERM", ...); panics unless `kill` succeeds.
    pub fn signal(&self, sig: &str) {
        assert!(signal(self.pid(), sig), "kill -{sig}");
    }

    /// Wait for the daemon to exit (after [`Daemon::sigterm`]); its exit status.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let Some(s) = wait_until(&mut self.child, Instant::now() + within) else {
            panic!("daemon did not exit; stderr:\n{}", self.stderr());
        };
        self.gone();
        s
    }

    /// SIGKILL: no shutdown code runs (what survives is what was durable). Asserts the daemon
    /// had not exited on its own and never printed "panicked".
    pub fn kill9(mut self) {
        self.assert_healthy();
        self.child.kill().expect("kill -9");
        self.child.wait().expect("wait");
        self.gone();
        assert!(
            !self.stderr().contains("panicked"),
            "daemon panicked; stderr:\n{}",
            self.stderr()
        );
    }

    /// Send `signal` ("KILL", "TERM", ...) and wait (30 s at most, then SIGKILL) for the exit;
    /// its whole stderr. Asserts no "panicked" in it, and after "TERM" exit status 0.
    /// [`Daemon::respawn`] starts it again.
    pub fn signal_and_wait(&mut self, sig: &str) -> String {
        assert!(!self.exited, "daemon not running");
        assert!(signal(self.pid(), sig), "kill -{sig}");
        let status = wait_until(&mut self.child, Instant::now() + START_STOP);
        if status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        self.gone();
        let err = self.stderr();
        assert!(!err.contains("panicked"), "daemon panicked:\n{err}");
        if sig == "TERM" {
            assert_eq!(
                status.and_then(|s| s.code()),
                Some(0),
                "daemon exit status after SIGTERM; stderr:\n{err}"
            );
        }
        err
    }

    /// Stop with SIGTERM after asserting it is healthy; asserts exit status 0 and no panic.
    /// Its whole stderr.
    pub fn stop(mut self) -> String {
        self.assert_healthy();
        self.signal_and_wait("TERM")
    }

    /// Start the daemon again after it exited, in the same data directory (backstore files,
    /// PR state), with `config` (`None`: the config it had). Give portals fixed ports in the
    /// config, so initiators find it where it was.
    pub fn respawn(&mut self, config: Option<&str>) {
        assert!(self.exited, "respawn of a running daemon");
        if let Some(c) = config {
            self.spec.config = Some(c.to_owned());
        }
        let run = launch(&self.spec, &self.dir).unwrap_or_else(|r| {
            panic!(
                "daemon exited at restart ({}); stderr:\n{}",
                r.status, r.stderr
            )
        });
        self.addr = run.addr;
        self.addrs = run.addrs;
        self.url = run.url;
        self.urls = run.urls;
        self.admin = run.admin;
        self.child = run.child;
        self.stderr = run.stderr;
        self.stderr_reader = Some(run.stderr_reader);
        self.exited = false;
    }

    /// The process is gone: wait until its stderr is read to the end.
    fn gone(&mut self) {
        self.exited = true;
        if let Some(t) = self.stderr_reader.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.exited {
            return;
        }
        let panicking = std::thread::panicking();
        if !panicking {
            self.assert_healthy();
        }
        let _ = signal(self.child.id(), "TERM");
        let status = wait_until(&mut self.child, Instant::now() + PROMPT);
        if status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        self.gone();
        if !panicking {
            assert!(
                status.is_some_and(|s| s.success()),
                "no clean exit on SIGTERM: {status:?}; stderr:\n{}",
                self.stderr()
            );
            assert!(
                !self.stderr().contains("panicked"),
                "daemon panicked; stderr:\n{}",
                self.stderr()
            );
        }
    }
}

/// One started process and what it printed.
struct Launched {
    child: Child,
    addr: SocketAddr,
    addrs: Vec<SocketAddr>,
    url: String,
    urls: Vec<String>,
    admin: String,
    stderr: Arc<Mutex<String>>,
    stderr_reader: JoinHandle<()>,
}

/// Start `spec` on `dir` and read its `listening`, `url` and `admin` lines.
fn launch(spec: &DaemonBuilder, dir: &Path) -> Result<Launched, Refused> {
    let mut cmd = spec.bin.command();
    cmd.args(["serve", "--data-dir"]).arg(dir);
    if let Some(text) = &spec.config {
        let path = dir.join("ironlun.toml");
        std::fs::write(&path, text).expect("write config");
        cmd.arg("--config").arg(path);
    }
    if spec.listen_any {
        cmd.args(LISTEN_ANY);
    }
    // The default socket is in the data directory, not systemd's runtime directory.
    cmd.env_remove("RUNTIME_DIRECTORY");
    for (k, v) in &spec.env {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    let mut child = cmd
        .args(&spec.args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", spec.bin.path().display()));
    // Drain both pipes on threads so that the daemon never blocks on a full pipe.
    let stderr = Arc::new(Mutex::new(String::new()));
    let stderr_reader = {
        let mut err = child.stderr.take().expect("stderr");
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(n) = err.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&chunk[..n]));
            }
        })
    };
    let (tx, rx) = mpsc::channel();
    {
        let out = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                // Once nobody listens, go on reading anyway.
                let _ = tx.send(line);
            }
        });
    }
    // `listening ADDR` lines, `url …` lines, and last `admin unix:PATH` (or http://ADDR).
    let deadline = Instant::now() + START_STOP;
    let mut lines: Vec<String> = Vec::new();
    while !lines.last().is_some_and(|l| l.starts_with("admin ")) {
        let exited = match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(l) => {
                lines.push(l);
                continue;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => child.try_wait().expect("try_wait"),
            // stdout closed: the daemon is on its way out.
            Err(mpsc::RecvTimeoutError::Disconnected) => wait_until(&mut child, deadline),
        };
        if let Some(status) = exited {
            let _ = stderr_reader.join();
            let stderr = stderr.lock().unwrap().clone();
            return Err(Refused { status, stderr });
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "daemon did not print its listening, url and admin lines; got {lines:?}; stderr:\n{}",
                stderr.lock().unwrap()
            );
        }
    }
    let mut addrs: Vec<SocketAddr> = Vec::new();
    let mut urls: Vec<String> = Vec::new();
    for l in &lines[..lines.len() - 1] {
        if let Some(a) = l.strip_prefix("listening ") {
            assert!(urls.is_empty(), "listening after url: {lines:?}");
            let a: SocketAddr = a.parse().expect("listen address");
            // Test traffic stays on loopback (127.0.0.0/8).
            assert!(a.ip().is_loopback(), "{a} is not a loopback address");
            assert_ne!(a.port(), 0);
            addrs.push(a);
        } else if let Some(u) = l.strip_prefix("url ") {
            urls.push(u.to_owned());
        } else {
            panic!("unexpected line {l:?}; got {lines:?}");
        }
    }
    let addr = *addrs
        .first()
        .unwrap_or_else(|| panic!("no listening line: {lines:?}"));
    let url = urls
        .first()
        .unwrap_or_else(|| panic!("no url line: {lines:?}"))
        .clone();
    let admin = lines
        .last()
        .and_then(|l| l.strip_prefix("admin "))
        .expect("admin line")
        .to_owned();
    assert!(
        admin.starts_with("unix:/") || admin.starts_with("http://127.0.0.1:"),
        "{admin}"
    );
    assert!(!admin.ends_with(":0"), "{admin}");
    Ok(Launched {
        child,
        addr,
        addrs,
        url,
        urls,
        admin,
        stderr,
        stderr_reader,
    })
}

/// `kill -SIG PID`; whether `kill` succeeded.
fn signal(pid: u32, sig: &str) -> bool {
    Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .is_ok_and(|s| s.success())
}

/// Wait for `child` to exit, at the latest by `deadline`; `None` if it is still running then
/// (or cannot be asked).
fn wait_until(child: &mut Child, deadline: Instant) -> Option<ExitStatus> {
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Some(s),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => return None,
        }
    }
}
