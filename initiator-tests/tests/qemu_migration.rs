//! Issue 6, acceptance 2 (QEMU side): a real QEMU guest writing sequence-numbered records to an
//! ironlun LUN is live-migrated between two QEMU processes on loopback by the QMP hooks of
//! `conf/qemu/` (precopy → pause → storage commit → resume → announce), and the rollback hook
//! leaves the source running and writing when a step before the commit fails.
//!
//! The guest (scripts/guest/build-guest.sh) writes record i = "SEQ <i> <boot-id>" to 512-byte
//! block i with O_DIRECT, one at a time, and prints "guest: WROTE <n> boot=<id>" on its serial
//! console. Read back afterwards, records 0..n-1 must all be present, each at its own block, all
//! from the same boot (the guest was migrated, not restarted), and nothing beyond them.
//!
//! QEMU runs under TCG (no KVM here). A missing qemu-system-x86_64 or qemu-img is a failure.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use ironlun_initiator_tests::{repo_root, require_tool, run, Daemon};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const TARGET: &str = "iqn.2026-11.io.ironlun:lab";
const HOST_A: &str = "iqn.2026-11.test:host-a";
const HOST_B: &str = "iqn.2026-11.test:host-b";

/// A small RAM LUN: quick to read back, far more blocks than the guest writes in a test.
const CONFIG: &str = r#"
[[target]]
name = "iqn.2026-11.io.ironlun:lab"

[[target.lun]]
id = 0
backstore = "ram"
size = "16MiB"
"#;

/// Two TCG guests per test already fill the two cores: run the tests one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// Build (or reuse) the guest images; (kernel, initrd).
fn guest_images() -> (PathBuf, PathBuf) {
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo_root().join("target"));
    let (ok, out) = run(Command::new("bash")
        .arg(repo_root().join("scripts/guest/build-guest.sh"))
        .arg(target.join("guest")));
    assert!(ok, "build-guest.sh failed:\n{out}");
    let field = |key: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(key))
            .map(PathBuf::from)
            .unwrap_or_else(|| panic!("build-guest.sh printed no `{key}` line:\n{out}"))
    };
    (field("kernel "), field("initrd "))
}

/// One QEMU process: the guest on an iSCSI disk, serial console and QMP on files in `dir`.
struct Qemu {
    name: String,
    child: Child,
    qmp: PathBuf,
    serial: PathBuf,
    log: PathBuf,
}

impl Qemu {
    /// Start QEMU `name` logging in as `initiator`; `incoming` adds `-incoming defer -S`.
    fn start(
        name: &str,
        dir: &Path,
        images: &(PathBuf, PathBuf),
        portal: &str,
        initiator: &str,
        incoming: bool,
    ) -> Qemu {
        let qmp = dir.join(format!("{name}.qmp"));
        let serial = dir.join(format!("{name}.serial"));
        let log = dir.join(format!("{name}.log"));
        let _ = std::fs::remove_file(&qmp);
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-name", name, "-accel", "tcg,tb-size=64", "-machine", "pc"])
            .args(["-m", "256M", "-smp", "1", "-nodefaults", "-no-user-config"])
            .args(["-display", "none", "-no-reboot"])
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .arg("-kernel")
            .arg(&images.0)
            .arg("-initrd")
            .arg(&images.1)
            .args(["-append", "console=ttyS0 panic=-1 quiet"])
            .arg("-blockdev")
            .arg(format!(
                "driver=iscsi,node-name=disk0,transport=tcp,portal={portal},target={TARGET},\
                 lun=0,initiator-name={initiator},cache.direct=on"
            ))
            .args(["-device", "virtio-blk-pci,drive=disk0"]);
        if incoming {
            cmd.args(["-incoming", "defer", "-S"]);
        }
        let logf = std::fs::File::create(&log).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(logf.try_clone().unwrap())
            .stderr(logf)
            .spawn()
            .expect("cannot start qemu-system-x86_64");
        let q = Qemu {
            name: name.into(),
            child,
            qmp,
            serial,
            log,
        };
        let t = Instant::now();
        while !q.qmp.exists() {
            q.assert_alive();
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "{name}: no QMP socket"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        q
    }

    fn assert_alive(&self) {
        let pid = self.child.id();
        assert!(
            Path::new(&format!("/proc/{pid}/stat")).exists()
                && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .unwrap_or_default()
                    .contains(") Z "),
            "{} exited:\n{}",
            self.name,
            self.diagnostics()
        );
    }

    fn diagnostics(&self) -> String {
        let serial = std::fs::read_to_string(&self.serial).unwrap_or_default();
        let tail: Vec<&str> = serial.lines().rev().take(15).collect();
        format!(
            "--- {} log:\n{}\n--- serial (last lines, newest first):\n{}",
            self.name,
            std::fs::read_to_string(&self.log).unwrap_or_default(),
            tail.join("\n")
        )
    }

    /// The last progress line on the serial console: (records written, boot id).
    fn written(&self) -> Option<(u64, String)> {
        let s = std::fs::read_to_string(&self.serial).ok()?;
        s.lines().rev().find_map(|l| {
            let rest = l.trim().strip_prefix("guest: WROTE ")?;
            let (n, boot) = rest.split_once(" boot=")?;
            Some((n.parse().ok()?, boot.trim().to_string()))
        })
    }

    /// Wait until the guest reports at least `min` records; returns (records, boot id).
    fn wait_written(&self, min: u64, timeout: Duration) -> (u64, String) {
        let t = Instant::now();
        loop {
            if let Some((n, boot)) = self.written() {
                if n >= min {
                    return (n, boot);
                }
            }
            let s = std::fs::read_to_string(&self.serial).unwrap_or_default();
            assert!(
                !s.contains("WRITE-ERROR") && !s.contains("FATAL"),
                "{}: guest error:\n{}",
                self.name,
                self.diagnostics()
            );
            self.assert_alive();
            assert!(
                t.elapsed() < timeout,
                "{}: fewer than {min} records after {timeout:?}:\n{}",
                self.name,
                self.diagnostics()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// SIGKILL and reap (the guest's disk is on the target; nothing to flush in QEMU).
    fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The hook environment of conf/qemu/hooks-common.sh.
fn hook_env(src: &Qemu, dst: &Qemu, uri: &str) -> Vec<(String, String)> {
    vec![
        ("IRONLUN_QMP_SRC".into(), src.qmp.display().to_string()),
        ("IRONLUN_QMP_DST".into(), dst.qmp.display().to_string()),
        ("IRONLUN_MIGRATE_URI".into(), uri.into()),
        ("IRONLUN_HOOK_TIMEOUT".into(), "120".into()),
    ]
}

/// Run a hook the way `ironlun migrate` does (`sh -c CMD`); (success, output, duration).
fn hook(name: &str, env: &[(String, String)]) -> (bool, String, Duration) {
    let path = repo_root().join(format!("conf/qemu/{name}.sh"));
    let t = Instant::now();
    let (ok, out) = run(Command::new("sh")
        .arg("-c")
        .arg(path.display().to_string())
        .envs(env.iter().map(|(k, v)| (k, v))));
    let d = t.elapsed();
    println!(
        "[{name}.sh {} in {d:.2?}]\n{out}",
        if ok { "ok" } else { "FAILED" }
    );
    (ok, out, d)
}

fn must_hook(name: &str, env: &[(String, String)]) -> Duration {
    let (ok, out, d) = hook(name, env);
    assert!(ok, "{name}.sh failed:\n{out}");
    d
}

/// The storage commit between the pause and resume hooks. Placeholder until `ironlun migrate`
/// exists: it only records when the commit would run. The real step fences HOST_A (its nexuses
/// get RESERVATION CONFLICT) and gives HOST_B write access; then the test must also check that
/// the source's initiator is fenced.
fn commit_storage_handover_placeholder(from: &str, to: &str) -> Instant {
    println!("[storage commit placeholder: {from} -> {to}; no fencing yet]");
    Instant::now()
}

/// Read the LUN back with qemu-img and check the guest's records: blocks 0..n-1 hold
/// "SEQ <i> <boot>" (each index once, at its own block), every later block is zero. Returns n.
fn check_records(url: &str, dir: &Path, boot: &str) -> u64 {
    let img = dir.join("readback.img");
    let (ok, out) = run(Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(url)
        .arg(&img));
    assert!(ok, "qemu-img convert {url}: {out}");
    let data = std::fs::read(&img).unwrap();
    let mut n = 0u64;
    let mut strays = Vec::new();
    for (i, block) in data.chunks(512).enumerate() {
        let i = u64::try_from(i).unwrap();
        if block.iter().all(|&b| b == 0) {
            continue;
        }
        let text = String::from_utf8_lossy(block);
        let line = text.split('\n').next().unwrap_or("");
        if i == n && line == format!("SEQ {i} {boot}") {
            n += 1;
        } else {
            strays.push(format!("block {i}: {line:?}"));
        }
    }
    assert!(
        strays.is_empty(),
        "records not contiguous from 0 (first {n} good); unexpected blocks: {:?}",
        &strays[..strays.len().min(10)]
    );
    n
}

#[test]
fn live_migration_keeps_the_guest_records_contiguous() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    require_tool("qemu-system-x86_64");
    require_tool("qemu-img");
    let t0 = Instant::now();
    let images = guest_images();
    let d = Daemon::start(Some(CONFIG));
    let url = format!("{}/{TARGET}/0", d.portal());
    let dir = tempfile::tempdir().unwrap();

    let a = Qemu::start("a", dir.path(), &images, &d.addr, HOST_A, false);
    let b = Qemu::start("b", dir.path(), &images, &d.addr, HOST_B, true);
    let (n0, boot) = a.wait_written(64, Duration::from_secs(120));
    let t_writing = t0.elapsed();

    let env = hook_env(
        &a,
        &b,
        &format!("unix:{}", dir.path().join("mig.sock").display()),
    );
    let precopy = must_hook("precopy", &env);
    let pause = must_hook("pause", &env);
    let paused_at = Instant::now();
    let (n_paused, _) = a.written().unwrap();
    let commit = commit_storage_handover_placeholder(HOST_A, HOST_B);
    let resume = must_hook("resume", &env);
    let blackout = paused_at.elapsed();
    let storage = commit.duration_since(paused_at);
    let announce = must_hook("announce", &env);

    // The destination continues the same guest: same boot id, counting on from the source.
    let (n_dst, boot_dst) = b.wait_written(n_paused + 64, Duration::from_secs(120));
    assert_eq!(
        boot_dst, boot,
        "the destination runs a different boot of the guest"
    );
    a.assert_alive(); // the source stays (postmigrate) until it is stopped
    let (n_src_after, _) = a.written().unwrap();
    assert_eq!(
        n_src_after, n_paused,
        "the source wrote after it was paused"
    );
    b.stop();
    a.stop();

    let n = check_records(&url, dir.path(), &boot);
    assert!(
        n >= n_dst,
        "{n} records on the LUN, the destination reported {n_dst}"
    );
    println!(
        "qemu migration: guest writing after {t_writing:.1?} ({n0} records); precopy {precopy:.2?}, \
         pause {pause:.2?}, storage commit (placeholder) at +{storage:.2?}, resume {resume:.2?}, \
         blackout (paused -> destination running) {blackout:.2?}, announce {announce:.2?}; \
         {n_paused} records before the pause, {n} contiguous records read back; total {:.1?}",
        t0.elapsed()
    );
    d.stop();
}

#[test]
fn rollback_before_commit_leaves_the_source_running_and_writing() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    require_tool("qemu-system-x86_64");
    require_tool("qemu-img");
    let t0 = Instant::now();
    let images = guest_images();
    let d = Daemon::start(Some(CONFIG));
    let url = format!("{}/{TARGET}/0", d.portal());
    let dir = tempfile::tempdir().unwrap();

    let a = Qemu::start("a", dir.path(), &images, &d.addr, HOST_A, false);
    let b = Qemu::start("b", dir.path(), &images, &d.addr, HOST_B, true);
    let (_, boot) = a.wait_written(32, Duration::from_secs(120));

    // 1. precopy fails at once: the destination cannot listen on this URI.
    let bad = hook_env(&a, &b, "unix:/nonexistent-ironlun-dir/mig.sock");
    let (ok, out, _) = hook("precopy", &bad);
    assert!(!ok, "precopy to an impossible URI succeeded:\n{out}");
    let rb1 = must_hook("rollback", &bad);
    let (n1, _) = a.written().unwrap();
    a.wait_written(n1 + 32, Duration::from_secs(60));
    // A destination whose migrate-incoming failed cannot be reused.
    b.stop();

    // 2. precopy reaches pre-switchover (source paused), then the storage commit fails.
    let b2 = Qemu::start("b2", dir.path(), &images, &d.addr, HOST_B, true);
    let env = hook_env(
        &a,
        &b2,
        &format!("unix:{}", dir.path().join("mig.sock").display()),
    );
    must_hook("precopy", &env);
    must_hook("pause", &env);
    let paused_at = Instant::now();
    let (n2, _) = a.written().unwrap();
    println!("[storage commit: simulated failure; rolling back]");
    let rb2 = must_hook("rollback", &env);
    let outage = paused_at.elapsed();
    let (n3, boot3) = a.wait_written(n2 + 32, Duration::from_secs(60));
    assert_eq!(boot3, boot);
    a.assert_alive();
    b2.stop();
    a.stop();

    let n = check_records(&url, dir.path(), &boot);
    assert!(n >= n3, "{n} records on the LUN, the source reported {n3}");
    println!(
        "qemu rollback: failed precopy rolled back in {rb1:.2?}; rollback from pre-switchover \
         {rb2:.2?} (source paused {outage:.2?}); {n} contiguous records; total {:.1?}",
        t0.elapsed()
    );
    d.stop();
}
