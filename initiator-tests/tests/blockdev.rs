//! Tier 6 (DESIGN.md §4): a loop device served as a LUN with `backstore = "block"`, driven by
//! libiscsi's conformance suites for reads, writes and thin provisioning (no failures; skips
//! only those the README's conformance table explains) and by `qemu-img convert` in and out;
//! what the initiator wrote is on the device.
//!
//! Needs root and `/dev/loop-control`; where the machine offers no loop device the test prints
//! "SKIPPED: no loop device on this machine" and passes (the documented exception to "a missing
//! tool fails"). `losetup` missing fails when loop devices are offered or when `CI` is set.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use ironlun_testkit::{conformance_of, qemu_img_round_trip, repo_root, require_tool, run, Daemon};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "iqn.2026-11.io.ironlun:blockdev";
const SIZE: u64 = 128 << 20;

/// A loop device over a sparse file; detached on drop.
struct LoopDevice {
    dev: PathBuf,
    _dir: tempfile::TempDir,
}

impl LoopDevice {
    fn new(size: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let backing = dir.path().join("backing.img");
        std::fs::File::create(&backing)
            .unwrap()
            .set_len(size)
            .unwrap();
        let (ok, out) = run(Command::new("losetup").args(["-f", "--show"]).arg(&backing));
        assert!(ok, "losetup -f --show: {out}");
        let printed = out.trim().to_owned();
        let guard = Self {
            dev: PathBuf::from(&printed),
            _dir: dir,
        };
        assert!(
            printed.starts_with("/dev/loop"),
            "losetup printed {printed:?}"
        );
        guard
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let (ok, out) = run(Command::new("losetup").arg("-d").arg(&self.dev));
        if !ok {
            eprintln!("losetup -d {}: {out}", self.dev.display());
        }
    }
}

/// See the module documentation.
fn loop_devices() -> bool {
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    let offered = root && Path::new("/dev/loop-control").exists();
    if offered || std::env::var_os("CI").is_some() {
        require_tool("losetup");
    }
    if !offered {
        eprintln!("SKIPPED: no loop device on this machine (needs root and /dev/loop-control)");
    }
    offered
}

fn start(dev: &Path) -> Daemon {
    let cfg = format!(
        "[[target]]\nname = \"{TARGET}\"\n[[target.lun]]\nid = 0\nbackstore = \"block\"\npath = \"{}\"\n",
        dev.display()
    );
    Daemon::release().config(&cfg).start()
}

#[test]
fn loop_device_lun_passes_libiscsi_suites() {
    if !loop_devices() {
        return;
    }
    for t in ["iscsi-test-cu", "iscsi-readcapacity16"] {
        require_tool(t);
    }
    let dev = LoopDevice::new(SIZE);
    let d = start(&dev.dev);
    let url = format!("{}/{TARGET}/0", d.portal());
    let (ok, out) = run(Command::new("iscsi-readcapacity16").arg(&url));
    assert!(ok, "{out}");
    assert!(out.contains(&format!("Total size:{SIZE}")), "{out}");
    // The loop device deallocates (punches holes in its backing file): thin provisioning.
    assert!(out.contains("LBPME:1") && out.contains("LBPRZ:1"), "{out}");
    let suites = "Read16 Write16 Unmap WriteSame16 GetLBAStatus";
    let (ok, out) = conformance_of(
        suites,
        false,
        &url,
        &repo_root().join("target/conformance-blockdev"),
    );
    println!("{out}");
    assert!(ok, "suites on a block-device LUN failed:\n{out}");
    assert!(out.contains("conformance: required suites clean"), "{out}");
    // Skips only where the README's conformance table explains them (the same as for file LUNs).
    let skips = skipped(&out);
    let counted: usize = out
        .lines()
        .filter(|l| l.starts_with("SCSI."))
        .filter_map(|l| l.split_whitespace().nth(4)?.parse::<usize>().ok())
        .sum();
    assert_eq!(
        skips.len(),
        counted,
        "skip reasons do not match the table:\n{out}"
    );
    for (suite, test) in skips {
        assert!(
            suite == "SCSI.WriteSame16"
                && ["ZeroBlocks", "UnmapUnaligned", "InvalidDataOutSize"].contains(&test.as_str()),
            "unexplained skip {suite}.{test}:\n{out}"
        );
    }
    d.stop();
}

/// (suite, test) of every skip in conformance.sh's "skip reasons:" section
/// (`  SUITE: Test: reason | Test: reason`).
fn skipped(out: &str) -> Vec<(String, String)> {
    let Some((_, reasons)) = out.split_once("skip reasons:") else {
        return Vec::new();
    };
    reasons
        .lines()
        .skip(1) // the rest of the "skip reasons:" line
        .map_while(|l| l.strip_prefix("  "))
        .filter_map(|l| l.split_once(": "))
        .flat_map(|(suite, tests)| {
            tests.split(" | ").filter_map(move |t| {
                t.split_once(':')
                    .map(|(name, _)| (suite.to_owned(), name.trim().to_owned()))
            })
        })
        .collect()
}

#[test]
fn qemu_img_convert_through_a_loop_device_lun() {
    if !loop_devices() {
        return;
    }
    require_tool("qemu-img");
    let size = 64u64 << 20;
    let dev = LoopDevice::new(size);
    let d = start(&dev.dev);
    let url = format!("{}/{TARGET}/0", d.portal());
    let data = qemu_img_round_trip(&url, d.dir(), 0x2545_f491_4f6c_dd1d);
    d.stop();
    // The data is on the device itself (read past the daemon, which has exited).
    let on_device = std::fs::read(&dev.dev).unwrap();
    assert_eq!(on_device.len(), data.len());
    assert!(on_device == data, "the loop device holds other data");
}

/// The daemon refuses to start on a regular file configured as a block backstore, and on a
/// device another LUN (or program) already holds, naming the path.
#[test]
fn daemon_refuses_non_devices_and_busy_devices() {
    if !loop_devices() {
        return;
    }
    let dev = LoopDevice::new(8 << 20);
    // Held exclusively, as the daemon holds its devices: O_EXCL (0o200 on Linux) without
    // O_CREAT claims a block device.
    let held = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(0o200)
        .open(&dev.dev)
        .unwrap();
    let bin = ironlun_testkit::Binary::release().path().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plain.img");
    std::fs::write(&file, vec![0u8; 1 << 20]).unwrap();
    for (path, want) in [
        (file.as_path(), "not a block device"),
        (dev.dev.as_path(), "in use"),
    ] {
        let cfg = dir.path().join("ironlun.toml");
        std::fs::write(
            &cfg,
            format!(
                "[[target]]\nname = \"{TARGET}\"\n[[target.lun]]\nid = 0\nbackstore = \"block\"\npath = \"{}\"\n",
                path.display()
            ),
        )
        .unwrap();
        let (ok, out) = run(Command::new(&bin)
            .arg("serve")
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path())
            .arg("-c")
            .arg(&cfg));
        assert!(!ok, "daemon started on {}: {out}", path.display());
        assert!(
            out.contains(want) && out.contains(&path.display().to_string()),
            "{out}"
        );
    }
    drop(held);
}
