//! Test tier 7: a Linux guest (Debian's generic kernel, open-iscsi, dm-multipath, sg3-utils,
//! fio, fence-agents, Pacemaker) in QEMU, driven step by step against the daemon on the host.
//!
//! The guest is built by `scripts/guest/linux/build.sh` (cached under `target/linux-guest`). It
//! boots with slirp user networking (the host's loopback is 10.0.2.2 inside; the guest has no
//! default route, so nothing beyond the host is reachable) and a virtio-9p share of a host
//! directory at `/host`. Its `/init` runs an agent that executes `/host/steps/NNN-NAME.sh` in
//! order and writes `NNN-NAME.out` (stdout and stderr, with `set -x`) and `NNN-NAME.rc`.
//!
//! Artefacts: `target/tier7/<group>/<guest>/` holds the share (every step's script and output),
//! `console.log` (the serial console: kernel and agent messages) and `qemu.log`; the group
//! directory also gets the daemon's stderr. It is emptied when the group starts and kept
//! afterwards, so a failure leaves everything there; the panic message names the step, shows
//! the tail of its output and of the console, and the directory.
//!
//! Every step runs under `set -euo pipefail` with the helpers of `initiator-tests/guest/lib.sh`
//! loaded, so a failing command fails the step; steps also assert with `fail "why"`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use ironlun_testkit::{repo_root, require_tool, run};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The helpers every step sources (`/host/lib.sh` in the guest).
const LIB_SH: &str = include_str!("../guest/lib.sh");

fn target_dir() -> PathBuf {
    std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo_root().join("target"))
}

/// Build (or reuse) the guest; (kernel, initrd). Once per test process.
pub fn images() -> (PathBuf, PathBuf) {
    static IMAGES: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    IMAGES
        .get_or_init(|| {
            require_tool("mmdebstrap");
            require_tool("qemu-system-x86_64");
            let t0 = Instant::now();
            let (ok, out) = run(Command::new("bash")
                .arg(repo_root().join("scripts/guest/linux/build.sh"))
                .arg(target_dir().join("linux-guest")));
            assert!(ok, "scripts/guest/linux/build.sh failed:\n{out}");
            eprintln!(
                "tier7: guest images ready in {:.1} s",
                t0.elapsed().as_secs_f64()
            );
            let field = |key: &str| {
                out.lines()
                    .find_map(|l| l.strip_prefix(key))
                    .map(PathBuf::from)
                    .unwrap_or_else(|| panic!("build.sh printed no `{key}` line:\n{out}"))
            };
            (field("kernel "), field("initrd "))
        })
        .clone()
}

/// `kvm` when /dev/kvm works for this guest, else `tcg`. `IRONLUN_GUEST_ACCEL=kvm|tcg` forces
/// one. /dev/kvm can exist and open yet not run a guest (nested setups where a guest stalls
/// in its real-mode setup code), so the probe boots the kernel without an initrd: a working
/// KVM reaches its "VFS: Unable to mount root fs" panic within seconds.
pub fn accel(kernel: &Path) -> &'static str {
    static ACCEL: OnceLock<&'static str> = OnceLock::new();
    ACCEL.get_or_init(|| {
        match std::env::var("IRONLUN_GUEST_ACCEL").as_deref() {
            Ok("kvm") => return "kvm",
            Ok("tcg") => return "tcg",
            _ => {}
        }
        if std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_err()
        {
            return "tcg";
        }
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("probe.log");
        let mut child = Command::new("qemu-system-x86_64")
            .args(["-accel", "kvm", "-cpu", "host", "-m", "256", "-nodefaults"])
            .args(["-no-reboot", "-display", "none", "-kernel"])
            .arg(kernel)
            .args(["-append", "console=ttyS0 panic=-1", "-serial"])
            .arg(format!("file:{}", log.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let t0 = Instant::now();
        let mut ok = false;
        while t0.elapsed() < Duration::from_secs(10) {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("Kernel panic") || text.contains("VFS:") {
                ok = true;
                break;
            }
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
        let a = if ok { "kvm" } else { "tcg" };
        eprintln!(
            "tier7: accelerator {a} (KVM probe {:.1} s)",
            t0.elapsed().as_secs_f64()
        );
        a
    })
}

/// Where a group keeps its artefacts: `target/tier7/<group>`, emptied now.
pub fn artefact_dir(group: &str) -> PathBuf {
    let d = target_dir().join("tier7").join(group);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    eprintln!("tier7: artefacts in {}", d.display());
    d
}

/// How to boot one guest.
pub struct GuestSpec<'a> {
    /// Host name, also the artefact subdirectory.
    pub name: &'a str,
    /// open-iscsi's default initiator name (`/etc/iscsi/initiatorname.iscsi`).
    pub initiator: &'a str,
    /// Guest memory, MiB (the rootfs lives in it: at least 1536).
    pub mem_mib: u32,
    /// Extra QEMU arguments (e.g. a second NIC for a cluster link) and the address for eth1.
    pub extra: Vec<String>,
    pub eth1: Option<&'a str>,
}

/// One running guest.
pub struct Guest {
    pub name: String,
    child: Child,
    pub dir: PathBuf,
    share: PathBuf,
    next: u32,
    started: Instant,
    accel: &'static str,
}

impl Guest {
    /// Boot the guest and wait for its agent (at most `boot_timeout`).
    pub fn boot(group_dir: &Path, spec: &GuestSpec, boot_timeout: Duration) -> Guest {
        let mut g = Guest::start(group_dir, spec);
        g.wait_ready(boot_timeout);
        g
    }

    /// Start QEMU for the guest without waiting (several guests then boot side by side);
    /// `wait_ready` waits for its agent.
    pub fn start(group_dir: &Path, spec: &GuestSpec) -> Guest {
        let (kernel, initrd) = images();
        let accel = accel(&kernel);
        let dir = group_dir.join(spec.name);
        let share = dir.join("share");
        std::fs::create_dir_all(share.join("steps")).unwrap();
        std::fs::write(share.join("lib.sh"), LIB_SH).unwrap();
        let mut append = format!(
            "console=ttyS0 panic=-1 net.ifnames=0 ironlun.name={} ironlun.initiator={}",
            spec.name, spec.initiator
        );
        if let Some(ip) = spec.eth1 {
            append.push_str(&format!(" ironlun.ip={ip}"));
        }
        let cpu = if accel == "kvm" { "host" } else { "max" };
        let qemu_log = std::fs::File::create(dir.join("qemu.log")).unwrap();
        let child = Command::new("qemu-system-x86_64")
            .args(["-accel", accel, "-cpu", cpu, "-smp", "2", "-m"])
            .arg(spec.mem_mib.to_string())
            .args(["-nodefaults", "-no-reboot", "-display", "none", "-kernel"])
            .arg(&kernel)
            .arg("-initrd")
            .arg(&initrd)
            .arg("-append")
            .arg(&append)
            .arg("-serial")
            .arg(format!("file:{}", dir.join("console.log").display()))
            .args([
                "-netdev",
                "user,id=n0",
                "-device",
                "virtio-net-pci,netdev=n0",
            ])
            .arg("-virtfs")
            .arg(format!(
                "local,path={},mount_tag=host,security_model=none,id=host",
                share.display()
            ))
            .args(&spec.extra)
            .stdin(Stdio::null())
            .stdout(qemu_log.try_clone().unwrap())
            .stderr(qemu_log)
            .spawn()
            .expect("cannot start qemu-system-x86_64");
        Guest {
            name: spec.name.to_string(),
            child,
            dir,
            share,
            next: 1,
            started: Instant::now(),
            accel,
        }
    }

    /// Wait until the guest's agent is ready, at most `boot_timeout` after `start`.
    pub fn wait_ready(&mut self, boot_timeout: Duration) {
        let g = self;
        while !g.share.join("ready").exists() {
            if let Ok(Some(st)) = g.child.try_wait() {
                g.fail(
                    "boot",
                    &format!("QEMU exited ({st}) before the guest was ready"),
                    "",
                );
            }
            if g.started.elapsed() > boot_timeout {
                g.fail("boot", &format!("not ready within {boot_timeout:?}"), "");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!(
            "tier7: {} booted ({}) in {:.1} s",
            g.name,
            g.accel,
            g.started.elapsed().as_secs_f64()
        );
    }

    /// Run `script` in the guest as step `name`; panic unless it exits 0 within `timeout`.
    /// Returns its output.
    pub fn step(&mut self, name: &str, timeout: Duration, script: &str) -> String {
        let (rc, out) = self.step_rc(name, timeout, script);
        if rc != 0 {
            self.fail(name, &format!("exit status {rc}"), &out);
        }
        out
    }

    /// Run `script` as step `name`; (exit status, output). Panics only on a timeout or a dead
    /// guest.
    pub fn step_rc(&mut self, name: &str, timeout: Duration, script: &str) -> (i32, String) {
        let id = format!("{:03}-{name}", self.next);
        self.next += 1;
        let steps = self.share.join("steps");
        let body = format!(
            "# step {id} of guest {}\nset -euo pipefail\n. /host/lib.sh\nset -x\n{script}\n",
            self.name
        );
        let tmp = steps.join(format!(".{id}.tmp"));
        std::fs::write(&tmp, body).unwrap();
        std::fs::rename(&tmp, steps.join(format!("{id}.sh"))).unwrap();
        let t0 = Instant::now();
        let rc_path = steps.join(format!("{id}.rc"));
        loop {
            if let Ok(s) = std::fs::read_to_string(&rc_path) {
                let rc: i32 = s.trim().parse().unwrap_or(-1);
                let out =
                    std::fs::read_to_string(steps.join(format!("{id}.out"))).unwrap_or_default();
                eprintln!(
                    "tier7: {} step {id}: rc={rc} in {:.1} s",
                    self.name,
                    t0.elapsed().as_secs_f64()
                );
                return (rc, out);
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                let out = self.output_of(&id);
                self.fail(&id, &format!("QEMU exited ({st}) during the step"), &out);
            }
            if t0.elapsed() > timeout {
                let out = self.output_of(&id);
                self.fail(&id, &format!("no result within {timeout:?}"), &out);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn output_of(&self, id: &str) -> String {
        std::fs::read_to_string(self.share.join("steps").join(format!("{id}.out")))
            .unwrap_or_default()
    }

    /// The serial console so far.
    pub fn console(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(self.dir.join("console.log")).unwrap_or_default())
            .into_owned()
    }

    /// Panic with the step, the reason, the tails of its output and of the console, and where
    /// the artefacts are. QEMU is killed (by Drop) as the panic unwinds.
    pub fn fail(&self, step: &str, why: &str, out: &str) -> ! {
        panic!(
            "tier7: guest {} step {step} FAILED: {why}\n--- step output (last 60 lines)\n{}\n\
             --- console (last 40 lines)\n{}\n--- artefacts: {}",
            self.name,
            tail(out, 60),
            tail(&self.console(), 40),
            self.dir.display()
        );
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The last `n` lines of `s`.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A free TCP port on 127.0.0.1 (bound and released; the daemon binds it right after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Keep the daemon's stderr with the group's artefacts.
pub fn save_daemon_log(group_dir: &Path, label: &str, stderr: &str) {
    std::fs::write(group_dir.join(format!("daemon-{label}.log")), stderr).unwrap();
}
