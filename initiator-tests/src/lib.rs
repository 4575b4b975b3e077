//! Harness for the end-to-end tests in `tests/`: start the release daemon on a free loopback
//! port with a given config, find the real initiator tools, and stop the daemon cleanly.
//!
//! The daemon binary is `$IRONLUN_BIN`, else `target/release/ironlun` of this workspace
//! (`scripts/test.sh` builds it first). A missing binary or tool is a test failure, never a skip.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

pub mod linux_guest;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Path of the daemon binary under test.
pub fn daemon_bin() -> PathBuf {
    if let Ok(p) = std::env::var("IRONLUN_BIN") {
        return PathBuf::from(p);
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let p = target.join("release/ironlun");
    assert!(
        p.exists(),
        "{} missing: run `cargo build --release -p ironlun` (scripts/test.sh does)",
        p.display()
    );
    p
}

/// The workspace root (for scripts/).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Fail (not skip) when a tool is missing.
pub fn require_tool(name: &str) {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        ok,
        "{name} is not installed: run scripts/install-deps.sh (scripts/test.sh does)"
    );
}

/// A running daemon; SIGTERM and wait on drop.
pub struct Daemon {
    child: Option<Child>,
    pub addr: String,
    /// Every `listening` address, one per portal, in the order printed.
    pub addrs: Vec<String>,
    pub urls: Vec<String>,
    /// The admin API as printed (`unix:<dir>/admin.sock`, the daemon's default socket in its
    /// data directory), for `ironlun ctl --admin` and `ironlun migrate --admin`.
    pub admin: Option<String>,
    pub dir: tempfile::TempDir,
    stderr: mpsc::Receiver<String>,
    /// What it was started with, for [`Daemon::respawn`].
    config: Option<String>,
    listen_any: bool,
}

impl Daemon {
    /// Start with `config` (TOML text, LUN paths relative to a fresh temp dir), or the embedded
    /// default when `None`.
    pub fn start(config: Option<&str>) -> Daemon {
        Self::start_listening(config, true)
    }

    /// Start with `config` serving its configured portals (no `--listen`): give each
    /// `listen = "127.0.0.1:0"`; their addresses are in [`Daemon::addrs`].
    pub fn start_portals(config: &str) -> Daemon {
        Self::start_listening(Some(config), false)
    }

    fn start_listening(config: Option<&str>, listen_any: bool) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let (child, addr, addrs, urls, admin, stderr) = spawn(dir.path(), config, listen_any);
        Daemon {
            child: Some(child),
            addr,
            addrs,
            urls,
            admin,
            dir,
            stderr,
            config: config.map(str::to_string),
            listen_any,
        }
    }

    /// Stop the daemon with `signal` ("KILL", "TERM", ...) and wait for it to exit; returns its
    /// stderr. No check of the exit status: a `kill -9` is the point of some tests.
    pub fn signal_and_wait(&mut self, signal: &str) -> String {
        let mut child = self.child.take().expect("daemon not running");
        Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(child.id().to_string())
            .status()
            .unwrap();
        let status = wait_timeout(&mut child, Duration::from_secs(30));
        let err = self
            .stderr
            .recv_timeout(Duration::from_secs(5))
            .unwrap_or_default();
        assert!(!err.contains("panicked"), "daemon panicked:\n{err}");
        if signal == "TERM" {
            assert_eq!(
                status,
                Some(0),
                "daemon exit status after SIGTERM; stderr:\n{err}"
            );
        }
        err
    }

    /// Start the daemon again after [`Daemon::signal_and_wait`], in the same data directory
    /// (backstore files, PR state) with `config` (`None`: the config it had). Give portals
    /// fixed ports in the config, so initiators find it where it was.
    pub fn respawn(&mut self, config: Option<&str>) {
        assert!(self.child.is_none(), "respawn of a running daemon");
        if let Some(c) = config {
            self.config = Some(c.to_string());
        }
        let (child, addr, addrs, urls, admin, stderr) =
            spawn(self.dir.path(), self.config.as_deref(), self.listen_any);
        self.child = Some(child);
        self.addr = addr;
        self.addrs = addrs;
        self.urls = urls;
        self.admin = admin;
        self.stderr = stderr;
    }

    /// The daemon's process id (for /proc/PID/status and /proc/PID/fd).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn portal(&self) -> String {
        format!("iscsi://{}", self.addr)
    }

    /// `ironlun ctl ARGS` against this daemon's admin API; panics unless it succeeds. Returns
    /// its output.
    pub fn ctl(&self, args: &[&str]) -> String {
        let admin = self.admin.as_deref().expect("admin API line");
        let (ok, out) = run(Command::new(daemon_bin())
            .args(["ctl", "--admin", admin])
            .args(args));
        assert!(ok, "ironlun ctl {args:?}:\n{out}");
        out
    }

    /// Stop with SIGTERM; assert a clean exit (status 0, no panic in the log). Returns stderr.
    pub fn stop(mut self) -> String {
        let child = self.child.as_mut().expect("daemon not running");
        assert!(
            child.try_wait().unwrap().is_none(),
            "daemon exited during the test"
        );
        // SIGTERM: no panic in the log and exit status 0 are asserted there.
        self.signal_and_wait("TERM")
    }
}

/// Start the daemon in `dir`; (child, first address, every address, urls, admin, stderr).
#[allow(clippy::type_complexity)]
fn spawn(
    dir: &Path,
    config: Option<&str>,
    listen_any: bool,
) -> (
    Child,
    String,
    Vec<String>,
    Vec<String>,
    Option<String>,
    mpsc::Receiver<String>,
) {
    let mut cmd = Command::new(daemon_bin());
    cmd.arg("serve");
    if listen_any {
        cmd.arg("--listen").arg("127.0.0.1:0");
    }
    // The admin API on its default socket, DIR/admin.sock: parallel daemons never collide.
    cmd.arg("--data-dir")
        .arg(dir)
        .env_remove("RUNTIME_DIRECTORY");
    if let Some(text) = config {
        let p = dir.join("ironlun.toml");
        std::fs::write(&p, text).unwrap();
        cmd.arg("-c").arg(&p);
    }
    cmd.env(
        "IRONLUN_LOG",
        std::env::var("IRONLUN_LOG").unwrap_or_else(|_| "info".into()),
    );
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let (etx, erx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        let _ = etx.send(s);
    });
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut addr = None;
    let mut addrs = Vec::new();
    let mut urls = Vec::new();
    let mut admin = None;
    loop {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(l) if l.starts_with("listening ") => {
                let a = l["listening ".len()..].to_string();
                addrs.push(a.clone());
                addr.get_or_insert(a);
            }
            Ok(l) if l.starts_with("url ") => {
                urls.push(l["url ".len()..].to_string());
            }
            Ok(_) => {}
            Err(_) => break,
        }
        if addr.is_some() && !urls.is_empty() {
            // Collect the remaining url lines and the admin line printed in the same burst.
            while let Ok(l) = rx.recv_timeout(Duration::from_millis(200)) {
                if let Some(u) = l.strip_prefix("url ") {
                    urls.push(u.to_string());
                } else if let Some(a) = l.strip_prefix("admin ") {
                    admin = Some(a.to_string());
                    break;
                }
            }
            break;
        }
    }
    let Some(addr) = addr else {
        let _ = child.kill();
        let err = erx.recv_timeout(Duration::from_secs(5)).unwrap_or_default();
        panic!("daemon did not report its address; stderr:\n{err}");
    };
    (child, addr, addrs, urls, admin, erx)
}

fn wait_timeout(child: &mut Child, t: Duration) -> Option<i32> {
    let start = std::time::Instant::now();
    while start.elapsed() < t {
        if let Ok(Some(s)) = child.try_wait() {
            return s.code();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    None
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The libiscsi suites issue #2 covers; each must show 0 failures. Skips are listed in the README.
pub const REQUIRED_SUITES: &str = "Inquiry Mandatory ModeSense6 NoMedia OrWrite Prefetch10 Prefetch16 PreventAllow \
Read6 Read10 Read12 Read16 ReadCapacity10 ReadCapacity16 ReportSupportedOpcodes StartStopUnit \
TestUnitReady Unmap GetLBAStatus Verify10 Verify12 Verify16 Write10 Write12 Write16 WriteSame10 \
WriteSame16 WriteVerify10 WriteVerify12 WriteVerify16 iSCSIcmdsn iSCSIdatasn iSCSIResiduals iSCSITMF";

/// Run scripts/conformance.sh on [`REQUIRED_SUITES`] against `url` (which may carry libiscsi
/// URL options such as `?header_digest=crc32c`); (success, output).
pub fn conformance(url: &str, out_dir: &Path) -> (bool, String) {
    conformance_of(REQUIRED_SUITES, false, url, out_dir)
}

/// Run scripts/conformance.sh on `suites` (short names, space separated) against `url`:
/// each must show 0 failures, and with `no_skip` also 0 skips; (success, output).
pub fn conformance_of(suites: &str, no_skip: bool, url: &str, out_dir: &Path) -> (bool, String) {
    conformance_paths(suites, no_skip, &[url], out_dir)
}

/// [`conformance_of`] with the second path given separately: `urls` is `[url]` (used for
/// both paths) or `[url1, url2]` (two portals, for the MultipathIO suite).
pub fn conformance_paths(
    suites: &str,
    no_skip: bool,
    urls: &[&str],
    out_dir: &Path,
) -> (bool, String) {
    let full: Vec<String> = suites
        .split_whitespace()
        .map(|s| {
            if s.starts_with("iSCSI") {
                format!("iSCSI.{s}")
            } else {
                format!("SCSI.{s}")
            }
        })
        .collect();
    run(Command::new("bash")
        .arg(repo_root().join("scripts/conformance.sh"))
        .arg("--suites")
        .arg(full.join(" "))
        .arg(if no_skip { "--no-skip" } else { "--require" })
        .arg(suites)
        .arg("--out")
        .arg(out_dir)
        .args(urls))
}

/// Run a command, return (success, stdout+stderr).
pub fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), s)
}
