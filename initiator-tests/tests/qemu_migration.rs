//! Issue 6, acceptance 2: a real QEMU guest writing sequence-numbered records to an ironlun LUN
//! is live-migrated between two QEMU processes on loopback by `ironlun migrate`, driving the QMP
//! hooks of `conf/qemu/` (prepare → precopy → pause → storage commit → resume → announce); and
//! when a hook before the commit fails, `ironlun migrate` aborts the handover and runs the
//! rollback hook, which leaves the source running, writing and owning the LUN.
//!
//! The LUN is target-managed (`ironlun ctl own`): host-a (the source QEMU's initiator name)
//! owns it before the migration, so host-b (the destination QEMU, logged in from its start) can
//! read but not write until the commit, and host-a is fenced after it (RESERVATION CONFLICT,
//! SPC-4 §5.13). The test checks the fence with sessions of its own under both names, and by
//! letting the migrated-away source run again: its guest must report write errors, not write.
//!
//! The guest (scripts/guest/build-guest.sh) writes record i = "SEQ <i> <boot-id>" to 512-byte
//! block i with O_DIRECT, one at a time, and prints "guest: WROTE <n> boot=<id>" on its serial
//! console, or "guest: WRITE-ERROR seq=<i>" when a write fails (QEMU reports write errors to the
//! guest: `werror=report`). Read back afterwards, records 0..n-1 must all be present, each at its
//! own block, all from the same boot (the guest was migrated, not restarted), and nothing beyond.
//!
//! QEMU runs under TCG (no KVM here). A missing qemu-system-x86_64 or qemu-img is a failure.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use bytes::Bytes;
use ironlun_initiator::Session;
use ironlun_testkit::{repo_root, require_tool, run, Binary, Daemon, Login};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const TARGET: &str = "iqn.2026-11.io.ironlun:lab";
const HOST_A: &str = "iqn.2026-11.test:host-a";
const HOST_B: &str = "iqn.2026-11.test:host-b";

/// The LU `ironlun migrate` and `ironlun ctl` name.
const LUN: &str = "iqn.2026-11.io.ironlun:lab/0";
/// The last block of the 16 MiB LUN: the guests never get there, so the test's own writes go
/// here (zeros where a write must succeed, a marker where it must be refused: a marker that
/// landed would show up as a stray record).
const LAST_LBA: u64 = 16 * 1024 * 1024 / 512 - 1;
const GOOD: u8 = 0x00;
const RESERVATION_CONFLICT: u8 = 0x18;

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
            // Errors go to the guest (which prints WRITE-ERROR), never a silent stop or retry.
            .args([
                "-device",
                "virtio-blk-pci,drive=disk0,werror=report,rerror=report",
            ]);
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
        last_written(&std::fs::read_to_string(&self.serial).ok()?)
    }

    /// The serial console so far.
    fn console(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
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

/// The last "guest: WROTE <n> boot=<id>" line of a console text: (n, id).
fn last_written(console: &str) -> Option<(u64, String)> {
    console.lines().rev().find_map(|l| {
        let rest = l.trim().strip_prefix("guest: WROTE ")?;
        let (n, boot) = rest.split_once(" boot=")?;
        Some((n.parse().ok()?, boot.trim().to_string()))
    })
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

/// The `sh -c` command of hook `name` of conf/qemu.
fn hook(name: &str) -> String {
    format!(
        "'{}'",
        repo_root().join(format!("conf/qemu/{name}.sh")).display()
    )
}

/// The five hooks of conf/qemu as `ironlun migrate` options; `pause` replaces the pause hook.
fn hooks(pause: String) -> Vec<String> {
    let mut v = Vec::new();
    for (step, cmd) in [
        ("precopy", hook("precopy")),
        ("pause", pause),
        ("resume", hook("resume")),
        ("rollback", hook("rollback")),
        ("announce", hook("announce")),
    ] {
        v.push(format!("--{step}"));
        v.push(cmd);
    }
    v
}

/// `ironlun migrate` of [`LUN`] from host-a to host-b on `d` with `hooks`, the hook environment
/// `env` and the journal `journal`; (exit code, stdout+stderr). The output is printed.
fn migrate(
    d: &Daemon,
    env: &[(String, String)],
    journal: &Path,
    hooks: &[String],
) -> (Option<i32>, String) {
    let admin = d.admin_url();
    let t = Instant::now();
    let out = Binary::release()
        .command()
        .args(["migrate", "--admin", admin, "--lun", LUN])
        .args(["--from", HOST_A, "--to", HOST_B])
        .arg("--journal")
        .arg(journal)
        .args(hooks)
        .env_remove("IRONLUN_ADMIN_TOKEN_FILE")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .output()
        .expect("cannot run ironlun migrate");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    println!(
        "[ironlun migrate: {} after {:.2?}]\n{text}",
        out.status,
        t.elapsed()
    );
    (out.status.code(), text)
}

/// The timeline of `ironlun migrate`'s output (lines "+<t> ms  <step> <phase> <took>"):
/// (step, phase) in order.
fn timeline(out: &str) -> Vec<(String, String)> {
    out.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            w.next()?.strip_prefix('+')?.parse::<f64>().ok()?;
            (w.next()? == "ms").then_some(())?;
            Some((w.next()?.to_string(), w.next()?.to_string()))
        })
        .collect()
}

/// The steps of `ironlun migrate`'s timeline that ended in `phase`.
fn steps_in(out: &str, phase: &str) -> Vec<String> {
    timeline(out)
        .into_iter()
        .filter(|(_, p)| p == phase)
        .map(|(s, _)| s)
        .collect()
}

/// The line of `out` starting with `prefix` and its first number after it (milliseconds).
fn ms_line<'a>(out: &'a str, prefix: &str) -> (&'a str, f64) {
    let line = out
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no `{prefix}` line in:\n{out}"));
    let ms = line[prefix.len()..]
        .split_whitespace()
        .next()
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("no milliseconds in {line:?}"));
    (line, ms)
}

/// The owner of [`LUN`] as the admin API's ownership GET reports it (`ctl ownership --json`).
fn owner(d: &Daemon) -> String {
    let json = d.ctl(&["ownership", LUN, "--json"]);
    let at = json
        .find("\"owner\"")
        .unwrap_or_else(|| panic!("no owner in {json}"));
    let rest = json[at + "\"owner\"".len()..].trim_start();
    let rest = rest.strip_prefix(':').unwrap_or(rest).trim_start();
    rest.strip_prefix('"')
        .and_then(|r| r.split('"').next())
        .unwrap_or_else(|| panic!("owner is not a string in {json}"))
        .to_string()
}

/// iSCSI sessions of the test's own beside the guests, on a runtime that keeps serving them
/// between calls.
struct Probe {
    rt: tokio::runtime::Runtime,
    addr: String,
}

impl Probe {
    fn new(addr: &str) -> Probe {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        Probe {
            rt,
            addr: addr.into(),
        }
    }

    /// A session as initiator `host` with ISID qualifier `n` (distinct per session).
    fn login(&self, host: &str, n: u8) -> Session {
        self.rt
            .block_on(
                Login::new(host)
                    .target(TARGET)
                    .isid_qualifier(n)
                    .try_connect(self.addr.as_str()),
            )
            .unwrap_or_else(|e| panic!("login as {host}: {e}"))
    }

    /// WRITE (16) of one block at [`LAST_LBA`] (zeros, or a marker record), past the unit
    /// attentions logins and ownership changes queue; the final status byte.
    fn write(&self, s: &Session, marker: bool) -> u8 {
        let mut block = vec![0u8; 512];
        if marker {
            block[..14].copy_from_slice(b"FENCED-MARKER\n");
        }
        let cdb = ironlun_initiator::scsi::write16_cdb(LAST_LBA, 1, false);
        let data = Bytes::from(block);
        self.rt
            .block_on(ironlun_testkit::past_ua(s, 0, &cdb, data, 0))
            .0
            .status
    }

    fn logout(&self, s: Session) {
        let _ = self.rt.block_on(s.logout());
    }
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
    let d = Daemon::release().config(CONFIG).start();
    let url = format!("{}/{TARGET}/0", d.portal());
    let dir = tempfile::tempdir().unwrap();
    print!("{}", d.ctl(&["own", LUN, HOST_A]));
    assert_eq!(owner(&d), HOST_A);

    let a = Qemu::start("a", dir.path(), &images, &d.addr.to_string(), HOST_A, false);
    let b = Qemu::start("b", dir.path(), &images, &d.addr.to_string(), HOST_B, true);
    let (n0, boot) = a.wait_written(64, Duration::from_secs(120));
    let t_writing = t0.elapsed();

    // Before: host-a writes, host-b (logged in, like the waiting destination QEMU) reads only.
    let probe = Probe::new(&d.addr.to_string());
    let pa = probe.login(HOST_A, 0x11);
    let pb = probe.login(HOST_B, 0x12);
    assert_eq!(probe.write(&pa, false), GOOD, "host-a owns the LUN");
    assert_eq!(
        probe.write(&pb, true),
        RESERVATION_CONFLICT,
        "host-b is not the owner yet"
    );

    // The pause hook also keeps a copy of the source's console at the pause.
    let env = hook_env(
        &a,
        &b,
        &format!("unix:{}", dir.path().join("mig.sock").display()),
    );
    let at_pause = dir.path().join("a.serial.at-pause");
    let pause = format!(
        "{} && cp '{}' '{}'",
        hook("pause"),
        a.serial.display(),
        at_pause.display()
    );
    let t_mig = Instant::now();
    let (code, out) = migrate(&d, &env, &dir.path().join("m.journal"), &hooks(pause));
    let t_mig = t_mig.elapsed();
    assert_eq!(code, Some(0), "ironlun migrate failed:\n{out}");
    assert_eq!(
        steps_in(&out, "done"),
        ["prepare", "precopy", "pause", "commit", "resume", "announce"],
        "timeline:\n{out}"
    );
    let (blackout_line, blackout) = ms_line(&out, "blackout ");
    let (switch_line, switch) = ms_line(&out, "storage switch ");
    assert!(
        out.lines().any(|l| l.starts_with("migrated: ")),
        "no `migrated:` line:\n{out}"
    );
    println!("timeline:");
    for l in out.lines().filter(|l| !timeline(l).is_empty()) {
        println!("{l}");
    }
    println!("{blackout_line}\n{switch_line}");
    let (n_paused, _) = last_written(&std::fs::read_to_string(&at_pause).unwrap())
        .expect("no progress line at the pause");

    // After the commit: host-a is fenced (its old nexus and a new one), host-b writes.
    assert_eq!(owner(&d), HOST_B);
    assert_eq!(
        probe.write(&pa, true),
        RESERVATION_CONFLICT,
        "host-a's session from before the commit still writes"
    );
    let pa2 = probe.login(HOST_A, 0x13);
    assert_eq!(
        probe.write(&pa2, true),
        RESERVATION_CONFLICT,
        "a new host-a session writes after the commit"
    );
    assert_eq!(probe.write(&pb, false), GOOD, "host-b does not own the LUN");

    // The destination continues the same guest: same boot id, counting on from the source.
    let (n_dst, boot_dst) = b.wait_written(n_paused + 64, Duration::from_secs(120));
    assert_eq!(
        boot_dst, boot,
        "the destination runs a different boot of the guest"
    );
    a.assert_alive(); // the source stays (postmigrate) until it is stopped
    assert_eq!(
        a.written().unwrap().0,
        n_paused,
        "the source wrote after it was paused"
    );
    assert!(
        !a.console().contains("WRITE-ERROR"),
        "the source's guest saw a write error:\n{}",
        a.diagnostics()
    );

    // A misbehaving source: run the migrated-away guest again. It is fenced, and says so.
    let (ok, qout) = run(Command::new("python3")
        .arg("-S")
        .arg(repo_root().join("conf/qemu/qmp.py"))
        .args(["--timeout", "20"])
        .arg(&a.qmp)
        .arg("cont"));
    assert!(ok, "cont on the migrated-away source: {qout}");
    let t = Instant::now();
    while !a.console().contains("WRITE-ERROR") {
        a.assert_alive();
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the resumed source's guest reports no write error:\n{}",
            a.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let fenced_line = a
        .console()
        .lines()
        .find(|l| l.contains("WRITE-ERROR"))
        .unwrap_or("")
        .trim()
        .to_string();
    // The guest prints a progress line every 8 records, so the pause can catch it with up to
    // 8 records written (before the commit) but not yet reported. The resumed source then
    // reports that batch first, as the destination did from the same migrated state; anything
    // beyond the destination's first report would be a write after the commit.
    let first_dst = b
        .console()
        .lines()
        .find_map(last_written)
        .map(|(n, _)| n)
        .expect("the destination reports progress");
    assert!(
        first_dst <= n_paused + 8,
        "the destination's first report {first_dst} is past the batch the pause caught ({n_paused})"
    );
    let resumed = a.written().unwrap().0;
    assert!(
        resumed == n_paused || resumed <= first_dst,
        "the resumed source wrote a record: it reports {resumed} records, {n_paused} at the \
         pause, the destination first reported {first_dst}"
    );
    let (n_dst, _) = b.wait_written(n_dst + 16, Duration::from_secs(60));
    probe.logout(pa);
    probe.logout(pa2);
    probe.logout(pb);
    b.stop();
    a.stop();

    let n = check_records(&url, dir.path(), &boot);
    assert!(
        n >= n_dst,
        "{n} records on the LUN, the destination reported {n_dst}"
    );
    println!(
        "qemu migration: guest writing after {t_writing:.1?} ({n0} records); ironlun migrate \
         {t_mig:.2?}: blackout {blackout:.3} ms, storage switch {switch:.3} ms; {n_paused} \
         records before the pause; resumed source fenced ({fenced_line}); {n} contiguous \
         records read back; total {:.1?}",
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
    let d = Daemon::release().config(CONFIG).start();
    let url = format!("{}/{TARGET}/0", d.portal());
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("m.journal");
    print!("{}", d.ctl(&["own", LUN, HOST_A]));

    let a = Qemu::start("a", dir.path(), &images, &d.addr.to_string(), HOST_A, false);
    let b = Qemu::start("b", dir.path(), &images, &d.addr.to_string(), HOST_B, true);
    let (_, boot) = a.wait_written(32, Duration::from_secs(120));
    let probe = Probe::new(&d.addr.to_string());
    let pa = probe.login(HOST_A, 0x11);
    let pb = probe.login(HOST_B, 0x12);

    // Still host-a's LUN after a rollback: the owner, its writes succeed, host-b's do not.
    let host_a_still_owns = |when: &str| {
        assert_eq!(owner(&d), HOST_A, "{when}");
        assert_eq!(probe.write(&pa, false), GOOD, "{when}: host-a cannot write");
        assert_eq!(
            probe.write(&pb, true),
            RESERVATION_CONFLICT,
            "{when}: host-b writes"
        );
    };

    // 1. precopy fails at once: the destination cannot listen on this URI.
    let t1 = Instant::now();
    let bad = hook_env(&a, &b, "unix:/nonexistent-ironlun-dir/mig.sock");
    let (code, out) = migrate(&d, &bad, &journal, &hooks(hook("pause")));
    let t1 = t1.elapsed();
    assert_eq!(
        code,
        Some(1),
        "ironlun migrate with a failing precopy:\n{out}"
    );
    assert_eq!(steps_in(&out, "failed"), ["precopy"], "{out}");
    assert_eq!(
        steps_in(&out, "done"),
        ["prepare", "abort", "rollback"],
        "{out}"
    );
    assert!(
        out.contains("rollback: source running"),
        "rollback hook did not run:\n{out}"
    );
    assert!(
        out.lines().any(|l| l.starts_with("rolled back: ")),
        "no `rolled back:` line:\n{out}"
    );
    host_a_still_owns("after the failed precopy");
    let (n1, _) = a.written().unwrap();
    a.wait_written(n1 + 32, Duration::from_secs(60));
    // A destination whose migrate-incoming failed cannot be reused.
    b.stop();

    // 2. precopy reaches pre-switchover (source paused), then the pause hook fails.
    let b2 = Qemu::start("b2", dir.path(), &images, &d.addr.to_string(), HOST_B, true);
    let env = hook_env(
        &a,
        &b2,
        &format!("unix:{}", dir.path().join("mig.sock").display()),
    );
    let failing_pause = format!(
        "{} && echo 'pause: simulated failure after the pause' && false",
        hook("pause")
    );
    let t2 = Instant::now();
    let (code, out) = migrate(&d, &env, &journal, &hooks(failing_pause));
    let t2 = t2.elapsed();
    assert_eq!(
        code,
        Some(1),
        "ironlun migrate with a failing pause:\n{out}"
    );
    assert_eq!(steps_in(&out, "failed"), ["pause"], "{out}");
    assert_eq!(
        steps_in(&out, "done"),
        ["prepare", "precopy", "abort", "rollback"],
        "{out}"
    );
    assert!(
        out.contains("rollback: source: migrate_cancel"),
        "the rollback hook did not cancel the migration:\n{out}"
    );
    host_a_still_owns("after the failed pause");
    let (n2, _) = a.written().unwrap();
    let (n3, boot3) = a.wait_written(n2 + 32, Duration::from_secs(60));
    assert_eq!(boot3, boot);
    a.assert_alive();
    probe.logout(pa);
    probe.logout(pb);
    b2.stop();
    a.stop();

    let n = check_records(&url, dir.path(), &boot);
    assert!(n >= n3, "{n} records on the LUN, the source reported {n3}");
    println!(
        "qemu rollback: failed precopy rolled back by ironlun migrate in {t1:.2?}; failed pause \
         (source at pre-switchover) rolled back in {t2:.2?}; host-a still the owner; {n} \
         contiguous records; total {:.1?}",
        t0.elapsed()
    );
    d.stop();
}
