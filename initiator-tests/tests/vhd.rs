//! Tier 6 (DESIGN.md §4), issue 7: VHD images served as LUNs by the release daemon and
//! written through iSCSI by qemu-img; the images are then judged by qemu-img and by
//! `ironlun vhd check`. qemu-img and qemu-io are required (a missing tool fails).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use ironlun_testkit::{require_tool, run, Binary, Daemon};
use std::path::Path;
use std::process::Command;

const TARGET: &str = "iqn.2026-11.io.ironlun:vhd";
const MIB: u64 = 1 << 20;

/// A one-LUN config serving the VHD at `image` (absolute path).
fn config(image: &Path) -> String {
    format!(
        "[[target]]\nname = \"{TARGET}\"\n[[target.lun]]\nid = 0\nbackstore = \"vhd\"\n\
         path = \"{}\"\n",
        image.display()
    )
}

/// `len` pseudo-random bytes from `seed`, with zeroes in `hole` (byte range).
fn random(len: u64, seed: u64, hole: std::ops::Range<u64>) -> Vec<u8> {
    let mut data = vec![0u8; usize::try_from(len).unwrap()];
    let mut x = seed | 1;
    for (i, chunk) in data.chunks_mut(8).enumerate() {
        if hole.contains(&(i as u64 * 8)) {
            continue;
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let n = chunk.len();
        chunk.copy_from_slice(&x.to_le_bytes()[..n]);
    }
    data
}

fn qemu(args: &[&str], what: &str) -> String {
    let (ok, out) = run(Command::new("qemu-img").args(args));
    assert!(ok, "qemu-img {what}: {out}");
    out
}

/// The top-level `"virtual-size"` qemu-img reports for a VHD (the least indented one; the
/// protocol layer's own entry is nested deeper).
fn virtual_size(img: &Path) -> u64 {
    let out = qemu(
        &["info", "--output=json", "-f", "vpc", img.to_str().unwrap()],
        "info",
    );
    let line = out
        .lines()
        .filter(|l| l.trim_start().starts_with("\"virtual-size\":"))
        .min_by_key(|l| l.len() - l.trim_start().len())
        .expect(&out);
    let digits: String = line.chars().filter(char::is_ascii_digit).collect();
    digits.parse().expect(&out)
}

/// `ironlun vhd check PATH`: (exit code, output).
fn vhd_check(img: &Path) -> (i32, String) {
    let o = Binary::release()
        .command()
        .args(["vhd", "check"])
        .arg(img)
        .output()
        .unwrap();
    let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&o.stderr));
    (o.status.code().unwrap_or(-1), s)
}

/// `qemu-img check -f vpc`: clean, or (QEMU 10.0) "does not support checks" (exit 63). A newer
/// QEMU that gains VHD checks must find no error.
fn qemu_check_accepts(img: &Path) {
    let o = Command::new("qemu-img")
        .args(["check", "-f", "vpc"])
        .arg(img)
        .output()
        .unwrap();
    let mut out = String::from_utf8_lossy(&o.stdout).into_owned();
    out.push_str(&String::from_utf8_lossy(&o.stderr));
    let unsupported = o.status.code() == Some(63) && out.contains("does not support checks");
    let clean = o.status.success() && out.contains("No errors were found");
    assert!(
        unsupported || clean,
        "qemu-img check: {:?}\n{out}",
        o.status
    );
}

/// Acceptance item 1: a qemu-img-created VHD served as a LUN takes 64 MiB written by
/// `qemu-img convert` over iSCSI; after the daemon stops, qemu-img finds the same bytes in
/// the image and both checkers accept it.
fn qemu_image_written_over_iscsi(subformat: &str, force_size: bool) {
    require_tool("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.vhd");
    let force = if force_size { "on" } else { "off" };
    qemu(
        &[
            "create",
            "-q",
            "-f",
            "vpc",
            "-o",
            &format!("subformat={subformat},force_size={force}"),
            img.to_str().unwrap(),
            "64M",
        ],
        "create",
    );
    // Without force_size the size is rounded up to a CHS size: the source fills the LUN.
    let size = virtual_size(&img);
    if force_size {
        assert_eq!(size, 64 * MIB);
    } else {
        assert!(size >= 64 * MIB, "{size}");
    }
    let src = dir.path().join("src.raw");
    let seed = u64::from(force_size) << 8 | subformat.len() as u64;
    std::fs::write(&src, random(size, seed, 8 * MIB..12 * MIB)).unwrap();

    let d = Daemon::release().config(&config(&img)).start();
    let url = format!("{}/{TARGET}/0", d.portal());
    assert_eq!(d.urls, vec![url.clone()]);
    let out = qemu(&["info", &url], "info on the LUN");
    assert!(out.contains(&format!("({size} bytes)")), "{out}");
    qemu(
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            src.to_str().unwrap(),
            &url,
        ],
        "convert into the LUN",
    );
    d.stop();

    let out = qemu(
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "vpc",
            src.to_str().unwrap(),
            img.to_str().unwrap(),
        ],
        "compare",
    );
    assert!(out.contains("Images are identical"), "{out}");
    assert_eq!(virtual_size(&img), size);
    let (code, out) = vhd_check(&img);
    println!("{subformat} force_size={force}: ironlun vhd check:\n{out}");
    assert_eq!(code, 0, "ironlun vhd check:\n{out}");
    assert!(out.contains("No errors were found on the image."), "{out}");
    qemu_check_accepts(&img);
}

#[test]
fn qemu_fixed_image_written_over_iscsi() {
    qemu_image_written_over_iscsi("fixed", false);
}

#[test]
fn qemu_fixed_force_size_image_written_over_iscsi() {
    qemu_image_written_over_iscsi("fixed", true);
}

#[test]
fn qemu_dynamic_image_written_over_iscsi() {
    qemu_image_written_over_iscsi("dynamic", false);
}

#[test]
fn qemu_dynamic_force_size_image_written_over_iscsi() {
    qemu_image_written_over_iscsi("dynamic", true);
}

/// Read the whole LUN at `url` into a file and return its bytes.
fn read_lun(url: &str, out: &Path) -> Vec<u8> {
    let _ = std::fs::remove_file(out);
    qemu(
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            url,
            out.to_str().unwrap(),
        ],
        "convert out of the LUN",
    );
    std::fs::read(out).unwrap()
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// An `ironlun vhd create --parent` child over a qemu-img dynamic parent, served as a LUN:
/// reads show the parent's data overlaid with the writes made through the LUN (unaligned,
/// inside one block, across blocks, over parent holes), before and after a daemon restart;
/// the parent is unchanged and both images check clean.
#[test]
fn differencing_child_over_qemu_parent() {
    require_tool("qemu-img");
    require_tool("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let parent = dir.path().join("parent.vhd");
    let size = 64 * MIB;
    qemu(
        &[
            "create",
            "-q",
            "-f",
            "vpc",
            "-o",
            "subformat=dynamic,force_size=on",
            parent.to_str().unwrap(),
            "64M",
        ],
        "create parent",
    );
    // Parent data with a 6 MiB hole (unallocated blocks in the parent).
    let base = random(size, 0xfeed, 20 * MIB..26 * MIB);
    let base_raw = dir.path().join("base.raw");
    std::fs::write(&base_raw, &base).unwrap();
    qemu(
        &[
            "convert",
            "-n",
            "--target-is-zero",
            "-f",
            "raw",
            "-O",
            "vpc",
            base_raw.to_str().unwrap(),
            parent.to_str().unwrap(),
        ],
        "write the parent",
    );
    let parent_before = std::fs::read(&parent).unwrap();

    let child = dir.path().join("child.vhd");
    let (ok, out) = run(Binary::release()
        .command()
        .args(["vhd", "create", "--parent"])
        .arg(&parent)
        .arg(&child));
    assert!(ok, "ironlun vhd create --parent: {out}");

    let d = Daemon::release().config(&config(&child)).start();
    let url = format!("{}/{TARGET}/0", d.portal());
    let back = dir.path().join("back.raw");
    assert!(
        first_difference(&read_lun(&url, &back), &base).is_none(),
        "a fresh child must read as its parent"
    );

    // (offset, length, pattern byte): one sector inside a block, 64 KiB, 3 MiB across block
    // boundaries, a write into the parent's hole, and the last sector of the disk.
    let writes: [(u64, u64, u8); 5] = [
        (MIB + 512, 512, 0x11),
        (10 * MIB, 64 << 10, 0x22),
        (31 * MIB + 4096, 3 * MIB, 0x33),
        (21 * MIB, 8192, 0x44),
        (size - 512, 512, 0x55),
    ];
    let mut expect = base.clone();
    for (off, len, pat) in writes {
        let (ok, out) = run(Command::new("qemu-io")
            .args(["-f", "raw", "-c"])
            .arg(format!("write -P {pat:#x} {off} {len}"))
            .arg(&url));
        assert!(
            ok && !out.contains("error"),
            "qemu-io write {off}+{len}: {out}"
        );
        let (o, l) = (usize::try_from(off).unwrap(), usize::try_from(len).unwrap());
        expect[o..o + l].fill(pat);
    }
    let got = read_lun(&url, &back);
    if let Some(i) = first_difference(&got, &expect) {
        panic!("LUN differs from parent + writes at byte {i}");
    }
    d.stop();

    let (code, out) = vhd_check(&child);
    assert_eq!(code, 0, "ironlun vhd check child:\n{out}");
    let (code, out) = vhd_check(&parent);
    assert_eq!(code, 0, "ironlun vhd check parent:\n{out}");
    assert!(
        std::fs::read(&parent).unwrap() == parent_before,
        "the parent changed"
    );

    // After a restart the child still reads as parent + writes.
    let d = Daemon::release().config(&config(&child)).start();
    let url = format!("{}/{TARGET}/0", d.portal());
    let got = read_lun(&url, &back);
    if let Some(i) = first_difference(&got, &expect) {
        panic!("after restart: LUN differs from parent + writes at byte {i}");
    }
    d.stop();
}
