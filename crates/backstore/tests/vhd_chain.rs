//! Differencing VHD chains against independent tools: parents made and filled by QEMU
//! (`qemu-img create -f vpc`, `qemu-io`), children made and written by us, the whole child
//! read back by libvhdi (`/usr/bin/python3` with `pyvhdi`) with its parents attached. QEMU's
//! `vpc` driver neither creates nor follows differencing disks, hence libvhdi as the reader.
//! A missing tool fails the test: run `scripts/install-deps.sh`.
#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::cast_possible_truncation
)]

use std::path::Path;
use std::process::Command;

use ironlun_backstore::vhd::{
    create_differencing, create_dynamic, uuid, CreateOptions, DiskType, DynamicHeader, VhdBackend,
    VhdError, MAX_CHAIN_DEPTH,
};
use ironlun_backstore::BlockBackend;

const INSTALL: &str = "run scripts/install-deps.sh";

fn run(tool: &str, args: &[&str]) -> Vec<u8> {
    let out = Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool} is required for these tests ({INSTALL}): {e}"));
    assert!(
        out.status.success(),
        "{tool} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A QEMU-made parent of `size` bytes (`subformat` fixed or dynamic) with `writes`
/// (`qemu-io` patterns at offsets) applied, and the disk as QEMU reads it.
fn qemu_parent(path: &Path, subformat: &str, size: &str, writes: &[(u8, &str, &str)]) -> Vec<u8> {
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vpc",
            "-o",
            &format!("subformat={subformat}"),
            s(path),
            size,
        ],
    );
    for (pattern, at, len) in writes {
        run(
            "qemu-io",
            &[
                "-f",
                "vpc",
                "-c",
                &format!("write -P {pattern:#x} {at} {len}"),
                s(path),
            ],
        );
    }
    let raw = path.with_extension("raw");
    run(
        "qemu-img",
        &["convert", "-f", "vpc", "-O", "raw", s(path), s(&raw)],
    );
    let bytes = std::fs::read(&raw).unwrap();
    std::fs::remove_file(&raw).unwrap();
    bytes
}

/// The whole of `chain[0]` as libvhdi reads it, each image given the next as its parent.
fn libvhdi_read(chain: &[&Path]) -> Vec<u8> {
    let script = r#"
import sys, pyvhdi
files = []
for path in reversed(sys.argv[1:]):
    f = pyvhdi.file()
    f.open(path)
    if files:
        f.set_parent(files[-1])
    files.append(f)
top = files[-1]
size = top.get_media_size()
out = sys.stdout.buffer
at = 0
while at < size:
    n = min(1 << 20, size - at)
    data = top.read_buffer_at_offset(n, at)
    if len(data) != n:
        raise SystemExit("short read at %d" % at)
    out.write(data)
    at += n
"#;
    let mut args = vec!["-c", script];
    args.extend(chain.iter().map(|p| s(p)));
    run_python(&args)
}

fn run_python(args: &[&str]) -> Vec<u8> {
    let out = Command::new("/usr/bin/python3")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("/usr/bin/python3 is required ({INSTALL}): {e}"));
    assert!(
        out.status.success(),
        "pyvhdi ({INSTALL} installs python3-libvhdi): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// libvhdi's view of one image: (identifier, parent identifier, parent file name, disk type).
fn libvhdi_meta(path: &Path) -> (String, String, String, u32) {
    let script = r#"
import sys, pyvhdi
f = pyvhdi.file()
f.open(sys.argv[1])
print(f.get_identifier())
print(f.get_parent_identifier())
print(f.get_parent_filename())
print(f.get_disk_type())
"#;
    let out = String::from_utf8(run_python(&["-c", script, s(path)])).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    (
        lines[0].to_owned(),
        lines[1].to_owned(),
        lines[2].to_owned(),
        lines[3].parse().unwrap(),
    )
}

fn opts(id: u8) -> CreateOptions {
    CreateOptions {
        unique_id: [id; 16],
        ..CreateOptions::new()
    }
}

/// Write `data` at `at` through `b` and into `model`.
fn write(b: &dyn BlockBackend, model: &mut [u8], at: u64, data: &[u8], fua: bool) {
    b.write(at, data, fua).unwrap();
    model[at as usize..at as usize + data.len()].copy_from_slice(data);
}

fn zero(b: &dyn BlockBackend, model: &mut [u8], at: u64, len: u64) {
    b.write_zeroes(at, len, true).unwrap();
    model[at as usize..(at + len) as usize].fill(0);
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

/// Partial blocks, unaligned pieces, writes across blocks, zeroes over parent data.
fn child_writes(b: &dyn BlockBackend, model: &mut [u8], seed: u8) {
    const M: u64 = 1 << 20;
    write(b, model, 1000, &pattern(seed, 3000), false);
    write(b, model, 2 * M - 700, &pattern(seed + 1, 5000), true);
    write(b, model, M / 2 + 0x123, &pattern(seed + 2, 777), false);
    write(b, model, 3 * M + 4096, &pattern(seed + 3, 65_536), false);
    write(b, model, 5 * M + 511, &pattern(seed + 4, 2), false);
    zero(b, model, 3 * M + 512 * 1024 + 100, 100_000);
    write(b, model, 1000 + 512, &pattern(seed + 5, 10), false);
    b.flush().unwrap();
}

fn check_against_libvhdi(chain: &[&Path], model: &[u8]) {
    let theirs = libvhdi_read(chain);
    assert_eq!(theirs.len(), model.len(), "libvhdi media size");
    if let Some(i) = theirs.iter().zip(model).position(|(a, b)| a != b) {
        panic!(
            "libvhdi reads {:#x} at byte {i}, expected {:#x}",
            theirs[i], model[i]
        );
    }
    // And we read the same after reopening by path.
    let ours = VhdBackend::open(chain[0], true).unwrap();
    assert!(ours.read(0, model.len()).unwrap()[..] == model[..]);
}

#[test]
fn children_of_qemu_parents_read_the_same_in_libvhdi() {
    for subformat in ["dynamic", "fixed"] {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.vhd");
        let mut model = qemu_parent(
            &base,
            subformat,
            "8M",
            &[(0xab, "0", "1M"), (0xcd, "3M", "1536k"), (0x5e, "7M", "4k")],
        );
        let child_path = dir.path().join("child.vhd");
        let child = create_differencing(&child_path, &base, &opts(1)).unwrap();
        assert_eq!(child.size() as usize, model.len(), "{subformat}");
        assert!(child.read(0, model.len()).unwrap()[..] == model[..]);
        child_writes(&child, &mut model, 0x10);
        let info = child.info();
        assert_eq!(info.disk_type, DiskType::Differencing);
        assert_eq!(info.parent_name.as_deref(), Some("base.vhd"));
        assert_eq!(
            info.parent_path.as_deref(),
            Some(std::fs::canonicalize(&base).unwrap().as_path())
        );
        let codes: Vec<String> = info.parent_locators.iter().map(|l| l.platform()).collect();
        assert_eq!(codes, ["W2ku", "W2ru"]);
        assert_eq!(info.parent_locators[1].text.as_deref(), Some(".\\base.vhd"));
        drop(child);
        check_against_libvhdi(&[&child_path, &base], &model);

        let (base_id, ..) = libvhdi_meta(&base);
        let (child_id, parent_id, parent_name, disk_type) = libvhdi_meta(&child_path);
        assert_eq!(child_id, uuid(&[1; 16]));
        assert_eq!(parent_id, base_id, "{subformat}");
        assert_eq!(parent_id, uuid(&info.parent_unique_id.unwrap()));
        assert_eq!(parent_name, "base.vhd");
        assert_eq!(disk_type, 4);
    }
}

#[test]
fn three_level_chain_reads_the_same_in_libvhdi() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhd");
    let mut model = qemu_parent(
        &base,
        "dynamic",
        "6M",
        &[(0xab, "0", "1M"), (0x3c, "4M", "2M")],
    );
    let mid_path = dir.path().join("mid.vhd");
    let mid = create_differencing(&mid_path, &base, &opts(2)).unwrap();
    child_writes(&mid, &mut model, 0x20);
    drop(mid);
    let mid_model = model.clone();
    // The top sits in a subdirectory: its relative locator goes up a level.
    std::fs::create_dir(dir.path().join("top")).unwrap();
    let top_path = dir.path().join("top/top.vhd");
    let top = create_differencing(&top_path, &mid_path, &opts(3)).unwrap();
    assert_eq!(
        top.info().parent_locators[1].text.as_deref(),
        Some("..\\mid.vhd")
    );
    assert!(top.read(0, model.len()).unwrap()[..] == model[..]);
    write(&top, &mut model, 1 << 20, &pattern(0x30, 300_000), false);
    write(&top, &mut model, 2100, &pattern(0x31, 100), true);
    zero(&top, &mut model, 4 << 20, 4096 * 3 + 7);
    drop(top);
    check_against_libvhdi(&[&top_path, &mid_path, &base], &model);
    // The middle image did not change.
    check_against_libvhdi(&[&mid_path, &base], &mid_model);
    let (mid_id, ..) = libvhdi_meta(&mid_path);
    assert_eq!(libvhdi_meta(&top_path).1, mid_id);
}

#[test]
fn a_moved_chain_is_found_through_the_relative_locator() {
    let root = tempfile::tempdir().unwrap();
    let old = root.path().join("old");
    std::fs::create_dir_all(old.join("disks")).unwrap();
    let base = old.join("base.vhd");
    let mut model = qemu_parent(&base, "dynamic", "8M", &[(0x77, "1M", "1M")]);
    let child_path = old.join("disks/child.vhd");
    let child = create_differencing(&child_path, &base, &opts(4)).unwrap();
    child_writes(&child, &mut model, 0x40);
    drop(child);
    let new = root.path().join("new");
    std::fs::rename(&old, &new).unwrap();
    let moved = new.join("disks/child.vhd");
    let b = VhdBackend::open(&moved, false).unwrap();
    assert_eq!(
        b.info().parent_path,
        Some(std::fs::canonicalize(new.join("base.vhd")).unwrap())
    );
    assert!(b.read(0, model.len()).unwrap()[..] == model[..]);
    drop(b);
    check_against_libvhdi(&[&moved, &new.join("base.vhd")], &model);
}

#[test]
fn a_parent_found_by_its_absolute_locator_or_its_name() {
    let root = tempfile::tempdir().unwrap();
    let base = root.path().join("base.vhd");
    let model = qemu_parent(&base, "dynamic", "2M", &[(0x42, "0", "64k")]);
    // Child elsewhere, then moved alone: the relative locator breaks, the absolute one holds.
    std::fs::create_dir(root.path().join("a")).unwrap();
    std::fs::create_dir(root.path().join("b")).unwrap();
    let child = root.path().join("a/child.vhd");
    drop(create_differencing(&child, &base, &opts(5)).unwrap());
    let moved = root.path().join("b/child.vhd");
    std::fs::rename(&child, &moved).unwrap();
    let b = VhdBackend::open(&moved, true).unwrap();
    assert!(b.read(0, model.len()).unwrap()[..] == model[..]);
    drop(b);
    // Parent moved next to the child: only the parent name finds it.
    std::fs::rename(&base, root.path().join("b/base.vhd")).unwrap();
    let b = VhdBackend::open(&moved, true).unwrap();
    assert_eq!(
        b.parent_path(),
        Some(
            std::fs::canonicalize(root.path().join("b/base.vhd"))
                .unwrap()
                .as_path()
        )
    );
    assert!(b.read(0, model.len()).unwrap()[..] == model[..]);
}

#[test]
fn a_replaced_or_missing_parent_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhd");
    qemu_parent(&base, "dynamic", "2M", &[]);
    let child = dir.path().join("child.vhd");
    let want = create_differencing(&child, &base, &opts(6))
        .unwrap()
        .info()
        .parent_unique_id
        .unwrap();
    // A new image under the same name has a new unique id.
    std::fs::remove_file(&base).unwrap();
    qemu_parent(&base, "dynamic", "2M", &[]);
    let (found, ..) = libvhdi_meta(&base);
    match VhdBackend::open(&child, false) {
        Err(e @ VhdError::ParentMismatch { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(&uuid(&want)), "{msg}");
            assert!(msg.contains(&found), "{msg}");
        }
        other => panic!("{other:?}"),
    }
    // No parent at all: every place tried is named.
    std::fs::remove_file(&base).unwrap();
    match VhdBackend::open(&child, false) {
        Err(e @ VhdError::Parent { .. }) => {
            let msg = e.to_string();
            for what in ["W2ru", "W2ku", "parent name"] {
                assert!(msg.contains(what), "{what}: {msg}");
            }
        }
        other => panic!("{other:?}"),
    }
}

/// Point `child`'s header at the parent `name` with unique id `id`, dropping its locators.
fn repoint(child: &Path, name: &str, id: [u8; 16]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(child)
        .unwrap();
    let mut hb = [0u8; 1024];
    f.read_exact_at(&mut hb, 512).unwrap();
    let mut h = DynamicHeader::parse(&hb).unwrap();
    h.parent_unique_id = id;
    h.parent_name = ironlun_backstore::vhd::locator::encode_name(name).unwrap();
    h.parent_locators = Default::default();
    f.write_all_at(&h.encode(), 512).unwrap();
}

#[test]
fn loops_and_overlong_chains_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhd");
    drop(create_dynamic(&base, 1 << 20, &opts(7)).unwrap());
    let a = dir.path().join("a.vhd");
    let b = dir.path().join("b.vhd");
    drop(create_differencing(&a, &base, &opts(8)).unwrap());
    drop(create_differencing(&b, &a, &opts(9)).unwrap());
    repoint(&a, "b.vhd", [9; 16]);
    let e = VhdBackend::open(&b, true).unwrap_err().to_string();
    assert!(e.contains("loop"), "{e}");

    // base + 31 children: 32 images open; one more is refused.
    let mut parent = base.clone();
    for i in 0..MAX_CHAIN_DEPTH - 1 {
        let c = dir.path().join(format!("c{i}.vhd"));
        drop(create_differencing(&c, &parent, &opts(20 + i as u8)).unwrap());
        parent = c;
    }
    let last = VhdBackend::open(&parent, false).unwrap();
    last.write(0, &[5; 512], true).unwrap();
    drop(last);
    let over = dir.path().join("over.vhd");
    let e = create_differencing(&over, &parent, &opts(99))
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!("longer than {MAX_CHAIN_DEPTH} images")),
        "{e}"
    );
    assert!(
        !over.exists(),
        "a child that cannot be opened is not left behind"
    );
}
