//! Real tools for tier 6: find them, run them, run libiscsi's conformance suites.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root (for `scripts/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Fail (not skip) when the tool `name` is not on `PATH`.
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

/// Run a command; (success, stdout followed by stderr). Panics if it cannot be started.
pub fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), s)
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

/// `s` without terminal control sequences (CSI: ESC `[` parameters, a final letter), such as
/// the colours of the daemon's text log.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// 64 MiB of deterministic pseudo-random data from `seed`, zero in MiB 8..12 (a hole a
/// sparse-aware copy may skip); what [`qemu_img_round_trip`] writes.
pub fn image_with_hole(seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; 64 << 20];
    let mut x = seed | 1;
    for (i, chunk) in data.chunks_mut(8).enumerate() {
        if (8 << 20..12 << 20).contains(&(i * 8)) {
            continue;
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    data
}

/// `qemu-img` against a 64 MiB LUN at `url` (`iscsi://…`): `info` shows 64 MiB, then
/// [`image_with_hole`]`(seed)` is converted into the LUN from a file in `dir`, converted out
/// to another, and the two files compare identical. Returns the data written. Panics with
/// qemu-img's output on any failure.
pub fn qemu_img_round_trip(url: &str, dir: &Path, seed: u64) -> Vec<u8> {
    let (src, back) = (dir.join("src.raw"), dir.join("back.raw"));
    let data = image_with_hole(seed);
    std::fs::write(&src, &data).unwrap();
    let qemu_img =
        |args: &[&str], a: &dyn AsRef<std::ffi::OsStr>, b: &dyn AsRef<std::ffi::OsStr>| {
            run(Command::new("qemu-img").args(args).arg(a).arg(b))
        };
    let (ok, out) = run(Command::new("qemu-img").arg("info").arg(url));
    assert!(
        ok && out.contains("virtual size: 64 MiB"),
        "qemu-img info: {out}"
    );
    let (ok, out) = qemu_img(&["convert", "-n", "-f", "raw", "-O", "raw"], &src, &url);
    assert!(ok, "convert into the LUN: {out}");
    let (ok, out) = qemu_img(&["convert", "-f", "raw", "-O", "raw"], &url, &back);
    assert!(ok, "convert out of the LUN: {out}");
    let (ok, out) = qemu_img(&["compare", "-f", "raw", "-F", "raw"], &src, &back);
    assert!(ok && out.contains("Images are identical"), "compare: {out}");
    data
}
