//! `ironlun vhd create|info|check` run as the built binary, against `qemu-img` (a missing
//! qemu-img fails these tests).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::cast_possible_truncation
)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_ironlun");

/// Footer fields that differ between any two creations: timestamp, checksum, unique id.
const VOLATILE: [std::ops::Range<usize>; 3] = [24..28, 64..68, 68..84];

fn ironlun_p(args: &[&str], path: &Path) -> Output {
    Command::new(BIN).args(args).arg(path).output().unwrap()
}

/// `ironlun ARGS PATH SIZE`.
fn ironlun_ps(args: &[&str], path: &Path, size: &str) -> Output {
    Command::new(BIN)
        .args(args)
        .arg(path)
        .arg(size)
        .output()
        .unwrap()
}

fn qemu_img(args: &[&str]) -> Output {
    Command::new("qemu-img")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("qemu-img is required (scripts/install-deps.sh): {e}"))
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Exit status, with stdout/stderr in the panic message otherwise; never a panic inside.
fn status(o: &Output) -> i32 {
    let (out, err) = text(o);
    assert!(!err.contains("panicked"), "ironlun panicked:\n{err}");
    o.status
        .code()
        .unwrap_or_else(|| panic!("killed:\n{out}\n{err}"))
}

/// Assert success and return stdout.
fn ok(o: &Output) -> String {
    let (out, err) = text(o);
    assert_eq!(status(o), 0, "stdout:\n{out}\nstderr:\n{err}");
    out
}

/// Assert exit `code` with exactly one line on stderr containing `needle`.
fn fails_with(o: &Output, code: i32, needle: &str) {
    let (out, err) = text(o);
    assert_eq!(status(o), code, "stdout:\n{out}\nstderr:\n{err}");
    assert_eq!(err.lines().count(), 1, "one-line message wanted:\n{err}");
    assert!(err.contains(needle), "{needle:?} not in:\n{err}");
}

/// `qemu-img convert` `src` (raw) into the existing VHD `img`, skipping zero ranges (the
/// image reads zeroes there already).
fn qemu_write(src: &Path, img: &Path) -> Output {
    qemu_img(&[
        "convert",
        "-n",
        "--target-is-zero",
        "-f",
        "raw",
        "-O",
        "vpc",
        src.to_str().unwrap(),
        img.to_str().unwrap(),
    ])
}

fn qemu_info(p: &Path) -> Value {
    let o = qemu_img(&["info", "--output=json", "-f", "vpc", p.to_str().unwrap()]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "qemu-img info {}: {err}", p.display());
    serde_json::from_str(&out).unwrap()
}

fn json(o: &Output) -> Value {
    serde_json::from_str(&text(o).0).unwrap()
}

/// Mask the volatile footer fields of the footer at `at`.
fn mask_footer(b: &mut [u8], at: usize) {
    for r in VOLATILE {
        b[at + r.start..at + r.end].fill(0);
    }
}

struct Dir(tempfile::TempDir);

impl Dir {
    fn new() -> Self {
        Self(tempfile::tempdir().unwrap())
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.path().join(name)
    }
}

/// `ironlun vhd create` and `qemu-img create -f vpc` make the same image, byte for byte
/// apart from timestamp, checksum and unique id; qemu-img reports the same virtual size for
/// both, and `ironlun vhd check` finds both clean.
#[test]
fn create_matches_qemu_img() {
    let d = Dir::new();
    let cases: &[(&str, &str)] = &[
        ("dynamic", "64M"),
        ("dynamic", "1000"),
        ("dynamic", "1.5M"),
        ("dynamic", "10G"),
        ("dynamic", "1T"),
        ("dynamic", "2040G"),
        ("fixed", "64M"),
        ("fixed", "1000"),
        ("fixed", "1.5M"),
        ("fixed", "10G"),
    ];
    for &(kind, size) in cases {
        for force in [false, true] {
            let name = format!("{kind}-{size}-{force}");
            let ours = d.path(&format!("{name}-ours.vhd"));
            let theirs = d.path(&format!("{name}-qemu.vhd"));
            let mut args = vec!["vhd", "create", "--type", kind];
            if force {
                args.push("--force-size");
            }
            let out = ok(&Command::new(BIN)
                .args(&args)
                .arg(&ours)
                .arg(size)
                .output()
                .unwrap());
            assert!(out.contains(&format!("{kind} VHD")), "{out}");
            let o = qemu_img(&[
                "create",
                "-q",
                "-f",
                "vpc",
                "-o",
                &format!(
                    "subformat={kind},force_size={}",
                    if force { "on" } else { "off" }
                ),
                theirs.to_str().unwrap(),
                size,
            ]);
            assert!(o.status.success(), "{name}: {}", text(&o).1);

            let (qi_ours, qi_theirs) = (qemu_info(&ours), qemu_info(&theirs));
            assert_eq!(
                qi_ours["virtual-size"], qi_theirs["virtual-size"],
                "{name}: virtual size"
            );
            let ours_len = std::fs::metadata(&ours).unwrap().len();
            let theirs_len = std::fs::metadata(&theirs).unwrap().len();
            assert_eq!(ours_len, theirs_len, "{name}: file length");

            // Fixed images above 64 MiB: the footers only (the data areas are sparse zeroes).
            let whole = kind == "dynamic" || ours_len <= 64 << 20;
            let read = |p: &Path| -> Vec<u8> {
                if whole {
                    std::fs::read(p).unwrap()
                } else {
                    use std::os::unix::fs::FileExt;
                    let mut b = vec![0u8; 512];
                    let f = std::fs::File::open(p).unwrap();
                    f.read_exact_at(&mut b, ours_len - 512).unwrap();
                    b
                }
            };
            let (mut a, mut b) = (read(&ours), read(&theirs));
            let n = a.len();
            let mut footers = vec![n - 512];
            if kind == "dynamic" {
                footers.push(0);
            }
            for at in footers {
                mask_footer(&mut a, at);
                mask_footer(&mut b, at);
            }
            if let Some(i) = a.iter().zip(&b).position(|(x, y)| x != y) {
                panic!("{name}: first difference at byte {i} of the compared bytes");
            }

            // Our info agrees with qemu-img on the virtual size; our check finds both clean.
            for p in [&ours, &theirs] {
                let v = json(&ironlun_p(&["vhd", "info", "--json"], p));
                assert_eq!(v["virtual_size"], qi_theirs["virtual-size"], "{name}");
                assert_eq!(v["type"], kind);
                let out = ok(&ironlun_p(&["vhd", "check"], p));
                assert!(out.contains("No errors were found"), "{name}: {out}");
            }
        }
    }
}

#[test]
fn info_reports_the_fields() {
    let d = Dir::new();
    let p = d.path("d.vhd");
    ok(&ironlun_ps(&["vhd", "create", "--force-size"], &p, "64M"));
    let out = ok(&ironlun_p(&["vhd", "info"], &p));
    for want in [
        "type: dynamic",
        "virtual size: 67108864 bytes",
        "file size: 2560 bytes",
        "creator: qem2 5.3 on Wi2k",
        "geometry: 65535/16/255",
        "block size: 2097152 bytes",
        "blocks: 0 allocated of 32",
        "uuid: ",
        "created: 20",
    ] {
        assert!(out.contains(want), "{want:?} not in:\n{out}");
    }
    assert!(!out.contains("parent"), "{out}");

    // qemu writes into our image; info counts the blocks it allocated.
    let src = d.path("src.raw");
    let mut data = vec![0u8; 64 << 20];
    for (i, c) in data.chunks_mut(4096).enumerate() {
        // Blocks 0, 5 and 31 (2 MiB each) get data; the rest stays zero.
        if [0, 5, 31].contains(&((i * 4096) >> 21)) {
            c.fill((i % 251) as u8 | 1);
        }
    }
    std::fs::write(&src, &data).unwrap();
    let o = qemu_write(&src, &p);
    assert!(o.status.success(), "{}", text(&o).1);
    let v = json(&ironlun_p(&["vhd", "info", "--json"], &p));
    assert_eq!(v["allocated_blocks"], 3, "{v}");
    assert_eq!(v["total_blocks"], 32);
    assert_eq!(v["block_size"], 2 << 20);
    assert_eq!(v["creator_app"], "qem2");
    assert_eq!(v["creator_version"], "5.3");
    assert_eq!(v["creator_os"], "Wi2k");
    assert_eq!(v["geometry"]["cylinders"], 65535);
    assert_eq!(v["file_size"], 2560 + 3 * (512 + (2 << 20)));
    assert_eq!(v["uuid"].as_str().unwrap().len(), 36);
    // What QEMU allocated leaves no leak and no corruption.
    assert!(ok(&ironlun_p(&["vhd", "check"], &p)).contains("3/32 = 9.38% allocated"));
    let o = qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "vpc",
        src.to_str().unwrap(),
        p.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o).0);

    // Fixed: no block lines.
    let f = d.path("f.vhd");
    ok(&ironlun_ps(&["vhd", "create", "--type", "fixed"], &f, "1M"));
    let out = ok(&ironlun_p(&["vhd", "info"], &f));
    assert!(
        out.contains("type: fixed") && !out.contains("block size"),
        "{out}"
    );
    assert!(out.contains("creator: qemu 5.3 on Wi2k"), "{out}");
}

#[test]
fn non_default_block_size_works_with_qemu() {
    let d = Dir::new();
    let p = d.path("b.vhd");
    let out = ok(&Command::new(BIN)
        .args(["vhd", "create", "--block-size", "512K"])
        .arg(&p)
        .arg("8M")
        .output()
        .unwrap());
    assert!(out.contains("block size 524288"), "{out}");
    // CHS rounding makes the disk 8390656 bytes: 17 blocks, the last one partly used.
    let v = json(&ironlun_p(&["vhd", "info", "--json"], &p));
    let size = v["virtual_size"].as_u64().unwrap();
    assert_eq!((size, v["total_blocks"].as_u64()), (8_390_656, Some(17)));
    let src = d.path("src.raw");
    let data: Vec<u8> = (0..size).map(|i| (i % 253) as u8 | 1).collect();
    std::fs::write(&src, &data).unwrap();
    let o = qemu_write(&src, &p);
    assert!(o.status.success(), "{}", text(&o).1);
    let o = qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "vpc",
        src.to_str().unwrap(),
        p.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o).0);
    let v = json(&ironlun_p(&["vhd", "check", "--json"], &p));
    assert_eq!(v["clean"], true, "{v}");
    assert_eq!(v["block_size"], 524_288);
    assert_eq!(v["allocated_blocks"], v["total_blocks"], "{v}");
}

fn dynamic_with_block(d: &Dir, name: &str) -> PathBuf {
    let p = d.path(name);
    let o = qemu_img(&[
        "create",
        "-q",
        "-f",
        "vpc",
        "-o",
        "subformat=dynamic,force_size=on",
        p.to_str().unwrap(),
        "8M",
    ]);
    assert!(o.status.success());
    let src = d.path(&format!("{name}.raw"));
    let mut data = vec![0u8; 8 << 20];
    data[..4096].fill(0x5a);
    std::fs::write(&src, &data).unwrap();
    let o = qemu_write(&src, &p);
    assert!(o.status.success());
    p
}

#[test]
fn check_exit_codes() {
    let d = Dir::new();
    // Clean.
    let p = dynamic_with_block(&d, "clean.vhd");
    let out = ok(&ironlun_p(&["vhd", "check"], &p));
    assert!(out.contains("No errors were found on the image."), "{out}");
    let v = json(&ironlun_p(&["vhd", "check", "--json"], &p));
    assert_eq!(v["clean"], true);
    assert_eq!(v["allocated_blocks"], 1);
    assert_eq!(v["errors"].as_array().unwrap().len(), 0);

    // Corruption: the trailing footer's checksum; named in both outputs, exit 2.
    let bytes = std::fs::read(&p).unwrap();
    let n = bytes.len();
    let mut b = bytes.clone();
    b[n - 512 + 100] ^= 1;
    let c = d.path("corrupt.vhd");
    std::fs::write(&c, &b).unwrap();
    let o = ironlun_p(&["vhd", "check"], &c);
    assert_eq!(status(&o), 2);
    let out = text(&o).0;
    assert!(out.contains("ERROR footer.checksum"), "{out}");
    assert!(out.contains("1 errors were found"), "{out}");
    let o = ironlun_p(&["vhd", "check", "--json"], &c);
    assert_eq!(status(&o), 2);
    let v = json(&o);
    assert_eq!(v["clean"], false);
    assert_eq!(v["errors"][0]["location"], "footer.checksum", "{v}");

    // Corruption: a BAT entry past the end of the file.
    let mut b = bytes.clone();
    b[1536 + 8..1536 + 12].copy_from_slice(&0x0100_0000u32.to_be_bytes());
    let c = d.path("bat.vhd");
    std::fs::write(&c, &b).unwrap();
    let o = ironlun_p(&["vhd", "check"], &c);
    assert_eq!(status(&o), 2);
    assert!(text(&o).0.contains("ERROR bat[2]: "), "{}", text(&o).0);

    // Leak only: 64 KiB no BAT entry owns before the trailing footer, exit 3.
    let mut b = bytes[..n - 512].to_vec();
    b.extend_from_slice(&[0u8; 65536]);
    b.extend_from_slice(&bytes[n - 512..]);
    let l = d.path("leak.vhd");
    std::fs::write(&l, &b).unwrap();
    let o = ironlun_p(&["vhd", "check"], &l);
    assert_eq!(status(&o), 3, "{}", text(&o).0);
    let out = text(&o).0;
    assert!(
        out.contains(&format!("Leaked space: 65536 bytes at offset {}", n - 512)),
        "{out}"
    );
    let v = json(&ironlun_p(&["vhd", "check", "--json"], &l));
    assert_eq!(v["leaked_bytes"], 65536);
    assert_eq!(v["corruptions"], 0);
    // qemu-img still reads the leaky image.
    qemu_info(&l);

    // Not completed: missing file, a directory. Exit 1 with one line.
    fails_with(
        &ironlun_p(&["vhd", "check"], &d.path("missing.vhd")),
        1,
        "check could not be completed",
    );
    fails_with(
        &ironlun_p(&["vhd", "check"], d.0.path()),
        1,
        "check could not be completed",
    );
    // Not a VHD at all: a corruption report, not a crash.
    let junk = d.path("junk.bin");
    std::fs::write(&junk, vec![0x11u8; 5000]).unwrap();
    let o = ironlun_p(&["vhd", "check"], &junk);
    assert_eq!(status(&o), 2);
    assert!(text(&o).0.contains("footer.cookie"), "{}", text(&o).0);
    let empty = d.path("empty.bin");
    std::fs::write(&empty, b"").unwrap();
    assert_eq!(status(&ironlun_p(&["vhd", "check"], &empty)), 2);
}

#[test]
fn errors_are_one_line() {
    let d = Dir::new();
    let p = d.path("x.vhd");
    fails_with(&ironlun_p(&["vhd", "create"], &p), 1, "SIZE is required");
    assert!(!p.exists());
    fails_with(
        &Command::new(BIN)
            .args(["vhd", "create", "--type", "fixed", "--block-size", "1M"])
            .arg(&p)
            .arg("8M")
            .output()
            .unwrap(),
        1,
        "--block-size applies to dynamic images only",
    );
    fails_with(
        &Command::new(BIN)
            .args(["vhd", "create", "--block-size", "3000"])
            .arg(&p)
            .arg("8M")
            .output()
            .unwrap(),
        1,
        "block_size",
    );
    assert!(!p.exists(), "a failed create left a file behind");
    fails_with(
        &Command::new(BIN)
            .args(["vhd", "create"])
            .arg(&p)
            .arg("2041G")
            .output()
            .unwrap(),
        1,
        "2040 GiB",
    );
    assert!(!p.exists(), "a failed create left a file behind");
    fails_with(
        &Command::new(BIN)
            .args(["vhd", "create"])
            .arg(&p)
            .arg("0")
            .output()
            .unwrap(),
        1,
        "size",
    );
    // Parser errors (clap): exit 2.
    let o = Command::new(BIN)
        .args(["vhd", "create"])
        .arg(&p)
        .arg("12Q")
        .output()
        .unwrap();
    assert_eq!(status(&o), 2);
    assert!(
        text(&o).1.contains("invalid size \"12Q\""),
        "{}",
        text(&o).1
    );
    // An existing file is never overwritten.
    std::fs::write(&p, b"keep").unwrap();
    fails_with(
        &Command::new(BIN)
            .args(["vhd", "create"])
            .arg(&p)
            .arg("8M")
            .output()
            .unwrap(),
        1,
        "already exists",
    );
    assert_eq!(std::fs::read(&p).unwrap(), b"keep");
    // --parent takes no SIZE.
    let child = d.path("child.vhd");
    fails_with(
        &Command::new(BIN)
            .args(["vhd", "create", "--parent"])
            .arg(&p)
            .arg(&child)
            .arg("8M")
            .output()
            .unwrap(),
        1,
        "SIZE must be omitted with --parent",
    );
    // info on something that is not a VHD, or missing.
    fails_with(
        &ironlun_p(&["vhd", "info"], &p),
        1,
        "not a usable VHD image",
    );
    fails_with(
        &ironlun_p(&["vhd", "info"], &d.path("nope.vhd")),
        1,
        "nope.vhd",
    );
}

/// `--parent`: a differencing child of a qemu-img dynamic image; info names the parent (and
/// still works when the parent is gone), check needs only the child.
#[test]
fn differencing_child() {
    let d = Dir::new();
    let parent = dynamic_with_block(&d, "parent.vhd");
    let child = d.path("child.vhd");
    let o = Command::new(BIN)
        .args(["vhd", "create", "--parent"])
        .arg(&parent)
        .arg(&child)
        .output()
        .unwrap();
    let out = ok(&o);
    assert!(
        out.contains("differencing VHD, virtual size 8388608"),
        "{out}"
    );

    let pv = json(&ironlun_p(&["vhd", "info", "--json"], &parent));
    let v = json(&ironlun_p(&["vhd", "info", "--json"], &child));
    assert_eq!(v["type"], "differencing", "{v}");
    assert_eq!(v["virtual_size"], pv["virtual_size"]);
    assert_eq!(v["allocated_blocks"], 0);
    assert_ne!(v["uuid"], pv["uuid"]);
    assert_eq!(v["parent"]["uuid"], pv["uuid"], "{v}");
    assert_eq!(v["parent"]["name"], "parent.vhd");
    let canon = std::fs::canonicalize(&parent).unwrap();
    assert_eq!(v["parent"]["path"], canon.display().to_string());
    let locators = v["parent"]["locators"].as_array().unwrap();
    assert!(!locators.is_empty(), "{v}");
    assert!(
        locators.iter().any(|l| l["path"]
            .as_str()
            .is_some_and(|p| p.ends_with("parent.vhd"))),
        "{v}"
    );
    let out = ok(&ironlun_p(&["vhd", "info"], &child));
    assert!(out.contains("type: differencing"), "{out}");
    assert!(out.contains("parent name: parent.vhd"), "{out}");
    assert!(
        out.contains(&format!("parent path: {}", canon.display())),
        "{out}"
    );
    assert!(out.contains(&format!("parent uuid: {}", pv["uuid"].as_str().unwrap())));
    let out = ok(&ironlun_p(&["vhd", "check"], &child));
    assert!(out.contains("No errors were found"), "{out}");

    // The parent gone: info still describes the child, check still passes.
    let moved = d.path("moved.vhd.bak");
    std::fs::rename(&parent, &moved).unwrap();
    let out = ok(&ironlun_p(&["vhd", "info"], &child));
    assert!(out.contains("parent path: not found"), "{out}");
    ok(&ironlun_p(&["vhd", "check"], &child));

    // Errors: a missing parent, a fixed child.
    fails_with(
        &Command::new(BIN)
            .args(["vhd", "create", "--parent"])
            .arg(&parent)
            .arg(d.path("c2.vhd"))
            .output()
            .unwrap(),
        1,
        "parent.vhd",
    );
    assert!(!d.path("c2.vhd").exists());
    fails_with(
        &Command::new(BIN)
            .args(["vhd", "create", "--type", "fixed", "--parent"])
            .arg(&moved)
            .arg(d.path("c3.vhd"))
            .output()
            .unwrap(),
        1,
        "--type fixed",
    );
}
