//! A real one-node Ceph for tests: one monitor and one memstore OSD on 127.0.0.1 (the
//! monitor on a free port picked at start, messenger v2 only, no authentication, pool size 1,
//! no manager), each a foreground process this harness started, stopped by its PID (SIGKILL on
//! drop), everything in a temporary directory. Pool `rbd` is created and initialised. Needs
//! `ceph-mon`, `ceph-osd`, `ceph`, `monmaptool` and `rbd` (Debian `ceph-mon`, `ceph-osd`,
//! `ceph-common`; `scripts/install-deps.sh` installs them); a missing one fails the test.
//! Starts in about 10 s on 2 cores; the OSD's memory grows with what is written.

use crate::tools::require_tool;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The pool every image of a [`Ceph`] lives in.
pub const POOL: &str = "rbd";

/// A running one-node Ceph ([module docs](self)).
#[derive(Debug)]
pub struct Ceph {
    mon: Option<Child>,
    osd: Option<Child>,
    dir: tempfile::TempDir,
    mon_addr: String,
}

impl Ceph {
    /// Bring the cluster up and create pool [`POOL`] (hang guard 120 s).
    pub fn start() -> Ceph {
        for tool in [
            "ceph-mon",
            "ceph-osd",
            "ceph",
            "monmaptool",
            "rbd",
            "uuidgen",
        ] {
            require_tool(tool);
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let mon_addr = format!("127.0.0.1:{port}");
        let d = dir.path();
        let fsid = uuid();
        for sub in ["mon", "osd/ceph-0", "run"] {
            std::fs::create_dir_all(d.join(sub)).expect("ceph dirs");
        }
        let conf = format!(
            "[global]\n\
             fsid = {fsid}\n\
             mon host = v2:{mon_addr}\n\
             auth cluster required = none\n\
             auth service required = none\n\
             auth client required = none\n\
             ms bind msgr1 = false\n\
             osd objectstore = memstore\n\
             memstore device bytes = 4294967296\n\
             osd pool default size = 1\n\
             osd pool default min size = 1\n\
             mon allow pool size one = true\n\
             mon warn on pool no redundancy = false\n\
             run dir = {d}/run\n\
             admin socket = {d}/run/$name.$pid.$cctid.asok\n\
             log file = {d}/$name.log\n\
             mon data = {d}/mon/$name\n\
             osd data = {d}/osd/ceph-$id\n\
             keyring = {d}/keyring\n",
            d = d.display()
        );
        std::fs::write(d.join("ceph.conf"), conf).expect("ceph.conf");
        let mut c = Ceph {
            mon: None,
            osd: None,
            dir,
            mon_addr,
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        c.tool(
            "monmaptool",
            &[
                "--create",
                "--addv",
                "a",
                &format!("[v2:{}]", c.mon_addr),
                "--fsid",
                &fsid,
                &c.path("monmap"),
            ],
        );
        c.tool(
            "ceph-mon",
            &[
                "-c",
                &c.path("ceph.conf"),
                "--mkfs",
                "-i",
                "a",
                "--monmap",
                &c.path("monmap"),
            ],
        );
        c.mon = Some(c.daemon("ceph-mon", &["-i", "a"]));
        let osd_uuid = uuid();
        c.wait(deadline, &["osd", "new", &osd_uuid]);
        c.tool(
            "ceph-osd",
            &[
                "-c",
                &c.path("ceph.conf"),
                "-i",
                "0",
                "--mkfs",
                "--osd-uuid",
                &osd_uuid,
            ],
        );
        c.osd = Some(c.daemon("ceph-osd", &["-i", "0"]));
        loop {
            let out = c.ceph(&["osd", "stat"]);
            if out.contains("1 up") {
                break;
            }
            assert!(Instant::now() < deadline, "the OSD did not come up: {out}");
            std::thread::sleep(Duration::from_millis(200));
        }
        c.wait(deadline, &["osd", "pool", "create", POOL, "8", "8"]);
        let (ok, out) = crate::run(
            Command::new("rbd")
                .args(["-c", &c.path("ceph.conf")])
                .args(["pool", "init", POOL]),
        );
        assert!(ok, "rbd pool init: {out}");
        c
    }

    /// A file in the cluster's directory.
    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// The `ceph.conf` clients use.
    pub fn conf(&self) -> PathBuf {
        self.dir.path().join("ceph.conf")
    }

    /// The monitor's `IP:PORT`.
    pub fn mon_addr(&self) -> &str {
        &self.mon_addr
    }

    /// Run a setup tool; panics with its output on failure.
    fn tool(&self, name: &str, args: &[&str]) {
        let (ok, out) = crate::run(Command::new(name).args(args));
        assert!(ok, "{name} {args:?}: {out}");
    }

    /// Start a daemon in the foreground, its output in `<name>.out`.
    fn daemon(&self, name: &str, args: &[&str]) -> Child {
        let out = std::fs::File::create(self.dir.path().join(format!("{name}.out"))).expect("log");
        Command::new(name)
            .args(["-f", "-c", &self.path("ceph.conf")])
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"))
    }

    /// `ceph ARGS` (10 s connect timeout): stdout and stderr; never panics on failure.
    pub fn ceph(&self, args: &[&str]) -> String {
        crate::run(
            Command::new("ceph")
                .args(["-c", &self.path("ceph.conf"), "--connect-timeout", "10"])
                .args(args),
        )
        .1
    }

    /// Retry `ceph ARGS` until it succeeds (the monitor may still be starting).
    fn wait(&self, deadline: Instant, args: &[&str]) {
        loop {
            let (ok, out) = crate::run(
                Command::new("ceph")
                    .args(["-c", &self.path("ceph.conf"), "--connect-timeout", "5"])
                    .args(args),
            );
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "ceph {args:?}: {out}\nmon log:\n{}",
                self.log("mon.a")
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// A daemon's log (`mon.a`, `osd.0`) so far.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }

    /// `rbd ARGS` against this cluster: (success, output).
    pub fn rbd(&self, args: &[&str]) -> (bool, String) {
        crate::run(
            Command::new("rbd")
                .args(["-c", &self.path("ceph.conf")])
                .args(args),
        )
    }

    /// Create image `POOL/name` of `size` bytes (a multiple of 1 MiB is not needed).
    pub fn create_image(&self, name: &str, size: u64) {
        let (ok, out) = self.rbd(&["create", "--size", &format!("{size}B"), &image(name)]);
        assert!(ok, "rbd create {name}: {out}");
    }

    /// The client addresses on the OSD blocklist (`ceph osd blocklist ls`).
    pub fn blocklist(&self) -> Vec<String> {
        self.ceph(&["osd", "blocklist", "ls"])
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|a| a.contains(':') && a.contains('/'))
            .map(str::to_owned)
            .collect()
    }

    /// The cluster's directory (logs, `ceph.conf`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

fn image(name: &str) -> String {
    format!("{POOL}/{name}")
}

/// A random UUID from the kernel.
fn uuid() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .expect("/proc/sys/kernel/random/uuid")
        .trim()
        .to_owned()
}

impl Drop for Ceph {
    fn drop(&mut self) {
        for c in [self.osd.take(), self.mon.take()].into_iter().flatten() {
            let mut c = c;
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
