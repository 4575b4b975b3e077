//! Daemon test harness (DESIGN.md §4 tier 4): run `ironlun serve` on 127.0.0.1:0 (iSCSI) with
//! the admin API on its default Unix socket `<data_dir>/admin.sock` (so parallel daemons never
//! collide) in a temp dir (`Daemon::start*`) or on a data
//! directory the test owns (`Daemon::spawn`: restarts, refused starts, configured portals), read
//! the bound addresses from its stdout, and stop it with SIGTERM on drop (or `kill9`), asserting
//! it never died on its own and never printed "panicked".

#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::cast_possible_truncation
)]

use bytes::Bytes;
use ironlun_initiator::{LoginOptions, Session};
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// The embedded default target.
pub const TARGET: &str = "iqn.2026-11.io.ironlun:lab";
/// Its LUN 0: 1 GiB of 512-byte blocks.
pub const BLOCK_SIZE: u32 = 512;
pub const BLOCKS: u64 = (1 << 30) / 512;
/// Upper bound for anything the daemon should do "promptly" (generous: 2 loaded cores).
pub const PROMPT: Duration = Duration::from_secs(10);

/// A running daemon. Dropping it stops it with SIGTERM and asserts a clean exit.
pub struct Daemon {
    child: Child,
    /// The first `listening` address.
    pub addr: SocketAddr,
    /// Every `listening` address, one per portal, in the order printed.
    pub addrs: Vec<SocketAddr>,
    /// The first `url` line.
    pub url: String,
    /// Every `url` line.
    pub urls: Vec<String>,
    /// The admin API as printed: `unix:<data_dir>/admin.sock` (an `--admin IP:PORT` in the
    /// args gives `http://IP:PORT`).
    pub admin: String,
    stderr: Arc<Mutex<String>>,
    /// The thread draining stderr; joined once the process is gone so that `stderr` is complete.
    stderr_reader: Option<std::thread::JoinHandle<()>>,
    /// Set by [`Daemon::wait_exit`] and [`Daemon::kill9`]: the daemon is gone, `Drop` has
    /// nothing to stop.
    exited: bool,
    /// The data directory when the harness made it (the `start*` functions); `None` when the
    /// caller owns it ([`Daemon::spawn`]).
    _dir: Option<tempfile::TempDir>,
}

/// A daemon that exited before printing its `admin` line (it refused to start).
#[derive(Debug)]
pub struct Refused {
    pub status: ExitStatus,
    /// Everything it wrote to stderr.
    pub stderr: String,
}

/// `--listen 127.0.0.1:0`: one portal on a free port instead of the configured ones.
pub const LISTEN_ANY: &[&str] = &["--listen", "127.0.0.1:0"];

impl Daemon {
    pub fn start() -> Daemon {
        Self::start_with(None)
    }

    /// The daemon with `config` (TOML text) as its config file; `--listen 127.0.0.1:0` still
    /// replaces the configured portals.
    pub fn start_with_config(config: &str) -> Daemon {
        Self::start_with(Some(config))
    }

    /// Like [`Daemon::start_with_config`], with more files (name, contents) written beside the
    /// config first (token files, LUN images).
    pub fn start_with_config_files(config: &str, files: &[(&str, &str)]) -> Daemon {
        Self::start_in(Some(config), files)
    }

    fn start_with(config: Option<&str>) -> Daemon {
        Self::start_in(config, &[])
    }

    fn start_in(config: Option<&str>, files: &[(&str, &str)]) -> Daemon {
        let dir = tempfile::tempdir().expect("temp dir");
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).expect("write file");
        }
        let mut d = Self::spawn_ok(dir.path(), config, LISTEN_ANY);
        d._dir = Some(dir);
        assert_eq!(d.addrs.len(), 1, "one portal with --listen: {:?}", d.addrs);
        if config.is_none() {
            assert_eq!(d.url, format!("iscsi://{}/{TARGET}/0", d.addr));
        }
        d
    }

    /// [`Daemon::spawn`], panicking with the exit status and stderr if the daemon refuses to
    /// start.
    pub fn spawn_ok(dir: &Path, config: Option<&str>, args: &[&str]) -> Daemon {
        Self::spawn(dir, config, args).unwrap_or_else(|r| {
            panic!(
                "daemon exited at start ({}); stderr:\n{}",
                r.status, r.stderr
            )
        })
    }

    /// Run `ironlun serve --data-dir DIR [--config DIR/ironlun.toml] ARGS` (the admin API on
    /// `DIR/admin.sock` unless `ARGS` or the config say otherwise)
    /// on `dir`, which the caller owns (a restart on the same `dir` sees what the last run left
    /// there). `config` (TOML text) is written to `DIR/ironlun.toml` first. Without
    /// [`LISTEN_ANY`] in `args` the daemon serves the configured portals.
    ///
    /// Waits for the `listening`, `url` and `admin` lines; `Err` with the exit status and the
    /// whole stderr if the daemon exits first. Panics if it does neither within 30 s.
    pub fn spawn(dir: &Path, config: Option<&str>, args: &[&str]) -> Result<Daemon, Refused> {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ironlun"));
        cmd.args(["serve", "--data-dir"]).arg(dir);
        if let Some(text) = config {
            let path = dir.join("ironlun.toml");
            std::fs::write(&path, text).expect("write config");
            cmd.arg("--config").arg(path);
        }
        let mut child = cmd
            .args(args)
            .env("RUST_LOG", "debug")
            // The default socket is in the data directory, not systemd's runtime directory.
            .env_remove("RUNTIME_DIRECTORY")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ironlun");
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
        let deadline = Instant::now() + Duration::from_secs(30);
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
        Ok(Daemon {
            child,
            addr,
            addrs,
            url,
            urls,
            admin,
            stderr,
            stderr_reader: Some(stderr_reader),
            exited: false,
            _dir: None,
        })
    }

    /// SIGKILL: no shutdown code runs (what survives is what was durable). Asserts the daemon
    /// had not exited on its own and never printed "panicked".
    pub fn kill9(mut self) {
        self.assert_healthy();
        self.child.kill().expect("kill -9");
        self.child.wait().expect("wait");
        self.exited = true;
        self.join_stderr();
        assert!(
            !self.stderr().contains("panicked"),
            "daemon panicked; stderr:\n{}",
            self.stderr()
        );
    }

    /// The admin API's address as `ironlun ctl --admin` and `Client::new` take it
    /// (`unix:PATH`, or `http://127.0.0.1:PORT`).
    pub fn admin_url(&self) -> &str {
        &self.admin
    }

    /// The admin socket's path (panics when the admin API is on TCP).
    pub fn admin_socket(&self) -> std::path::PathBuf {
        std::path::PathBuf::from(
            self.admin
                .strip_prefix("unix:")
                .unwrap_or_else(|| panic!("admin API not on a Unix socket: {}", self.admin)),
        )
    }

    /// A raw connection to the admin API (Unix socket or TCP), for hand-written requests.
    pub fn admin_connect(&self) -> AdminStream {
        admin_connect(&self.admin)
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

    pub fn sigterm(&self) {
        let ok = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status()
            .expect("kill");
        assert!(ok.success());
    }

    /// Wait for the daemon to exit (after [`Daemon::sigterm`]); its exit status.
    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let Some(s) = wait_until(&mut self.child, Instant::now() + within) else {
            panic!("daemon did not exit; stderr:\n{}", self.stderr());
        };
        self.exited = true;
        self.join_stderr();
        s
    }

    /// Once the process is gone: wait until its stderr is read to the end.
    fn join_stderr(&mut self) {
        if let Some(t) = self.stderr_reader.take() {
            let _ = t.join();
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
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let status = wait_until(&mut self.child, Instant::now() + PROMPT);
        if status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        self.join_stderr();
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

/// Login options for a normal session to the lab target as `initiator`.
pub fn opts(initiator: &str) -> LoginOptions {
    LoginOptions::new(initiator, Some(TARGET.to_owned()))
}

/// Log in and clear the power-on unit attention (the first command's CHECK CONDITION).
pub async fn session(addr: SocketAddr, initiator: &str) -> Session {
    let s = Session::connect(addr, opts(initiator))
        .await
        .expect("login");
    for _ in 0..3 {
        let r = s.test_unit_ready(0).await.expect("TUR");
        if r.status == 0 {
            return s;
        }
    }
    panic!("TEST UNIT READY never GOOD");
}

/// A deterministic block pattern: every byte depends on `seed` and its offset.
pub fn pattern(seed: u64, len: usize) -> Bytes {
    let mut v = Vec::with_capacity(len);
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for _ in 0..len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.push((x >> 24) as u8);
    }
    Bytes::from(v)
}

/// Another session doing write + read-back rounds for as long as a test runs.
pub struct BackgroundIo {
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<Result<u64, String>>,
}

impl BackgroundIo {
    /// Log in as `initiator` and loop over 64 KiB writes (alternating FUA) and reads at `lba`.
    pub async fn start(addr: SocketAddr, initiator: &str, lba: u64) -> BackgroundIo {
        let s = session(addr, initiator).await;
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicU64::new(0));
        let (stop2, rounds2) = (stop.clone(), rounds.clone());
        let task = tokio::spawn(async move {
            let mut n = 0u64;
            loop {
                let data = pattern(n ^ lba, 64 * 1024);
                let blocks = 128u32;
                let w = tokio::time::timeout(
                    PROMPT,
                    s.write16(0, lba, BLOCK_SIZE, data.clone(), n & 1 == 0),
                )
                .await
                .map_err(|_| format!("round {n}: write timed out"))?
                .map_err(|e| format!("round {n}: write: {e}"))?;
                if w.status != 0 || w.response != 0 {
                    return Err(format!(
                        "round {n}: write status {:#x} response {}",
                        w.status, w.response
                    ));
                }
                let r = tokio::time::timeout(PROMPT, s.read16(0, lba, blocks, BLOCK_SIZE))
                    .await
                    .map_err(|_| format!("round {n}: read timed out"))?
                    .map_err(|e| format!("round {n}: read: {e}"))?;
                if r.status != 0 || r.data != data {
                    return Err(format!(
                        "round {n}: read status {:#x}, data equal: {}",
                        r.status,
                        r.data == data
                    ));
                }
                n += 1;
                rounds2.store(n, Ordering::SeqCst);
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
            }
            s.logout().await.map_err(|e| format!("logout: {e}"))?;
            Ok(n)
        });
        BackgroundIo { stop, rounds, task }
    }

    /// Rounds completed so far.
    pub fn rounds(&self) -> u64 {
        self.rounds.load(Ordering::SeqCst)
    }

    /// Wait until at least `more` further rounds complete (proof that I/O goes on now).
    pub async fn progress(&self, more: u64) {
        let target = self.rounds() + more;
        let deadline = Instant::now() + PROMPT;
        while self.rounds() < target {
            assert!(
                Instant::now() < deadline,
                "background I/O stalled at {} rounds",
                self.rounds()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stop after the current round and assert every round succeeded.
    pub async fn finish(self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        let n = tokio::time::timeout(PROMPT * 2, self.task)
            .await
            .expect("background I/O did not stop")
            .expect("background task panicked")
            .unwrap_or_else(|e| panic!("background I/O failed: {e}"));
        assert!(n >= 1, "no background round completed");
        n
    }
}

/// A raw admin connection of either kind.
pub enum AdminStream {
    Unix(std::os::unix::net::UnixStream),
    Tcp(std::net::TcpStream),
}

/// Connect to the admin API at `url` (`unix:PATH` or `http://ADDR`).
pub fn admin_connect(url: &str) -> AdminStream {
    match url.strip_prefix("unix:") {
        Some(p) => AdminStream::Unix(
            std::os::unix::net::UnixStream::connect(p).expect("connect admin socket"),
        ),
        None => AdminStream::Tcp(
            std::net::TcpStream::connect(url.trim_start_matches("http://"))
                .expect("connect admin TCP"),
        ),
    }
}

impl AdminStream {
    pub fn set_read_timeout(&self, t: Option<Duration>) {
        match self {
            AdminStream::Unix(s) => s.set_read_timeout(t).unwrap(),
            AdminStream::Tcp(s) => s.set_read_timeout(t).unwrap(),
        }
    }

    /// Half-close: no more request bytes.
    pub fn shutdown_write(&self) {
        let _ = match self {
            AdminStream::Unix(s) => s.shutdown(std::net::Shutdown::Write),
            AdminStream::Tcp(s) => s.shutdown(std::net::Shutdown::Write),
        };
    }
}

impl Read for AdminStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            AdminStream::Unix(s) => s.read(buf),
            AdminStream::Tcp(s) => s.read(buf),
        }
    }
}

impl std::io::Write for AdminStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            AdminStream::Unix(s) => s.write(buf),
            AdminStream::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A raw HTTP/1.1 response: status and body (by `Content-Length`, else to end of stream).
/// `None` when `buf` holds no complete status line and head.
pub fn parse_http_response(buf: &[u8]) -> Option<(u16, Vec<u8>)> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let status: u16 = head.split(' ').nth(1)?.parse().ok()?;
    let len = head.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse::<usize>().ok())
            .flatten()
    });
    let body = &buf[end..];
    let body = match len {
        Some(n) => body.get(..n)?.to_vec(),
        None => body.to_vec(),
    };
    Some((status, body))
}
