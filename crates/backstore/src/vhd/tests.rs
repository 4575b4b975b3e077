//! Tests of the VHD format against QEMU (`qemu-img` must be installed: a missing tool fails
//! the test), the conformance suite, crash ordering and corrupt images.
#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::cast_possible_truncation
)]

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};

use proptest::prelude::*;

use super::footer::{checksum, FOOTER_SIZE};
use super::*;
use crate::{BackstoreError, BlockBackend};

/// Options with fixed time and id, so images are reproducible.
fn opts(force_size: bool, block_size: u32) -> CreateOptions {
    CreateOptions {
        force_size,
        block_size,
        timestamp: 0x329b_10ad,
        unique_id: [7; 16],
    }
}

fn mem_dynamic(size: u64, block: u32) -> VhdBackend<MemStore> {
    image::format_dynamic(MemStore::default(), size, &opts(true, block)).unwrap()
}

fn file_dynamic(size: u64) -> VhdBackend {
    let dir = tempfile::tempdir().unwrap();
    create_dynamic(dir.path().join("d.vhd"), size, &opts(true, 64 << 10)).unwrap()
}

fn file_fixed(size: u64) -> VhdBackend {
    let dir = tempfile::tempdir().unwrap();
    create_fixed(dir.path().join("f.vhd"), size, &opts(true, 0)).unwrap()
}

crate::backstore_conformance!(conformance_dynamic_file, super::file_dynamic);
crate::backstore_conformance!(conformance_dynamic_mem_2m, |size| super::mem_dynamic(
    size,
    2 << 20
));
crate::backstore_conformance!(conformance_dynamic_mem_512, |size| super::mem_dynamic(
    size, 512
));
crate::backstore_conformance!(conformance_fixed_file, super::file_fixed);

// ---------------------------------------------------------------------------------------------
// qemu-img

fn qemu_img(args: &[&str]) -> std::process::Output {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("qemu-img is required for these tests: {e}"));
    out
}

fn qemu_ok(args: &[&str]) -> String {
    let out = qemu_img(args);
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `virtual-size` from `qemu-img info --output=json`.
fn qemu_virtual_size(path: &Path) -> u64 {
    let json = qemu_ok(&["info", "-f", "vpc", "--output=json", path.to_str().unwrap()]);
    // The format node's size follows its children (the file node's size comes first).
    let at = json.rfind("\"virtual-size\":").unwrap() + "\"virtual-size\":".len();
    json[at..]
        .trim_start()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// `qemu-img check -f vpc`: QEMU's vpc driver implements no check, so qemu-img exits 63 with
/// "This image format does not support checks"; anything else but success is a failure.
fn qemu_check(path: &Path) {
    let out = qemu_img(&["check", "-f", "vpc", path.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success()
            || (out.status.code() == Some(63) && stderr.contains("does not support checks")),
        "qemu-img check: {:?} {stderr}",
        out.status
    );
}

/// The disk as QEMU reads it.
fn qemu_raw(path: &Path) -> Vec<u8> {
    let raw = path.with_extension("raw");
    qemu_ok(&[
        "convert",
        "-f",
        "vpc",
        "-O",
        "raw",
        path.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    let bytes = std::fs::read(&raw).unwrap();
    std::fs::remove_file(&raw).unwrap();
    bytes
}

/// A small deterministic generator (xorshift).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Random writes, FUA writes and unmaps through `b`, mirrored in the returned model.
fn random_io<S: Store>(b: &VhdBackend<S>, seed: u64, ops: usize) -> Vec<u8> {
    let size = b.size();
    let mut model = b.read(0, size as usize).unwrap().to_vec();
    let mut rng = Rng(seed);
    for i in 0..ops {
        let len = 1 + rng.below(300_000.min(size));
        let off = rng.below(size - len + 1);
        if i % 7 == 6 {
            b.unmap(off, len).unwrap();
            model[off as usize..(off + len) as usize].fill(0);
        } else {
            let data = rng.bytes(len as usize);
            b.write(off, &data, i % 3 == 0).unwrap();
            model[off as usize..(off + len) as usize].copy_from_slice(&data);
        }
    }
    b.flush().unwrap();
    assert_eq!(&b.read(0, size as usize).unwrap()[..], &model[..]);
    model
}

#[test]
fn qemu_created_images_are_served_and_qemu_reads_our_writes() {
    let dir = tempfile::tempdir().unwrap();
    for (n, sub) in ["fixed", "dynamic"].iter().enumerate() {
        for force in [false, true] {
            let path = dir.path().join(format!("{sub}-{force}.vhd"));
            let o = format!(
                "subformat={sub}{}",
                if force { ",force_size=on" } else { "" }
            );
            qemu_ok(&[
                "create",
                "-q",
                "-f",
                "vpc",
                "-o",
                &o,
                path.to_str().unwrap(),
                "5M",
            ]);
            let want_size = qemu_virtual_size(&path);
            let b = VhdBackend::open(&path, false).unwrap();
            assert_eq!(b.size(), want_size, "{o}");
            let model = random_io(&b, 0x9e37_79b9 + n as u64 * 2 + u64::from(force), 40);
            drop(b);
            assert!(qemu_raw(&path) == model, "{o}: qemu reads other data");
            qemu_check(&path);
            assert_eq!(qemu_virtual_size(&path), want_size);
            let again = VhdBackend::open(&path, true).unwrap();
            assert!(again.read(0, model.len()).unwrap()[..] == model[..]);
        }
    }
}

#[test]
fn qemu_accepts_our_images() {
    let dir = tempfile::tempdir().unwrap();
    for (i, force) in [false, true].into_iter().enumerate() {
        for fixed in [false, true] {
            let path = dir.path().join(format!("ours-{force}-{fixed}.vhd"));
            let size = 3 << 20;
            let o = opts(force, 1 << 20);
            let b = if fixed {
                create_fixed(&path, size, &o).unwrap()
            } else {
                create_dynamic(&path, size, &o).unwrap()
            };
            assert!(b.size() >= size);
            assert_eq!(qemu_virtual_size(&path), b.size());
            let model = random_io(&b, 77 + i as u64, 25);
            drop(b);
            qemu_check(&path);
            assert!(qemu_raw(&path) == model);
        }
    }
}

/// Our dynamic and fixed images equal qemu-img's byte for byte, apart from timestamp, UUID
/// and the checksums that cover them.
#[test]
fn created_images_match_qemu_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    for (sub, force) in [("dynamic", false), ("dynamic", true), ("fixed", false)] {
        let theirs = dir.path().join(format!("q-{sub}-{force}.vhd"));
        let ours = dir.path().join(format!("o-{sub}-{force}.vhd"));
        let o = format!(
            "subformat={sub}{}",
            if force { ",force_size=on" } else { "" }
        );
        qemu_ok(&[
            "create",
            "-q",
            "-f",
            "vpc",
            "-o",
            &o,
            theirs.to_str().unwrap(),
            "10M",
        ]);
        if sub == "fixed" {
            create_fixed(&ours, 10 << 20, &opts(force, 0)).unwrap();
        } else {
            create_dynamic(&ours, 10 << 20, &opts(force, 2 << 20)).unwrap();
        }
        let mask = |mut b: Vec<u8>| {
            let len = b.len();
            let mut footers = vec![len - FOOTER_SIZE];
            if sub == "dynamic" {
                footers.push(0);
            }
            for at in footers {
                b[at + 24..at + 28].fill(0);
                b[at + 64..at + 84].fill(0);
            }
            b
        };
        let (q, w) = (
            std::fs::read(&theirs).unwrap(),
            std::fs::read(&ours).unwrap(),
        );
        assert_eq!(q.len(), w.len(), "{o}");
        assert!(mask(q) == mask(w), "{o}");
    }
}

// ---------------------------------------------------------------------------------------------
// Corrupt images

/// A dynamic image of 4 blocks of 4 KiB with blocks 1 and 3 allocated.
fn small_dynamic() -> Vec<u8> {
    let b = image::format_dynamic(MemStore::default(), 16 << 10, &opts(true, 4096)).unwrap();
    b.write(4096, &[1; 4096], false).unwrap();
    b.write(3 * 4096 + 10, &[3; 100], false).unwrap();
    b.store().bytes()
}

fn open_bytes(bytes: Vec<u8>) -> std::result::Result<VhdBackend<MemStore>, VhdError> {
    VhdBackend::open_store(MemStore::new(bytes), false)
}

fn set_bat(img: &mut [u8], index: usize, value: u32) {
    let at = 1536 + 4 * index;
    img[at..at + 4].copy_from_slice(&value.to_be_bytes());
}

#[test]
fn accepts_the_small_image() {
    let b = open_bytes(small_dynamic()).unwrap();
    assert_eq!(b.info().allocated_blocks, 2);
    assert_eq!(&b.read(4096, 4).unwrap()[..], &[1; 4][..]);
    assert_eq!(&b.read(3 * 4096 + 9, 2).unwrap()[..], &[0, 3][..]);
}

#[test]
fn rejects_corrupt_images_naming_the_field() {
    let good = small_dynamic();
    let len = good.len();
    let bat0 = u32::from_be_bytes(good[1536 + 4..1540 + 4].try_into().unwrap());

    let mut both_footers = good.clone();
    both_footers[70] ^= 1;
    both_footers[len - FOOTER_SIZE + 70] ^= 1;
    assert!(matches!(
        open_bytes(both_footers),
        Err(VhdError::Footer {
            field: "checksum",
            ..
        })
    ));

    let mut header = good.clone();
    header[512 + 100] = 1;
    assert!(matches!(
        open_bytes(header),
        Err(VhdError::Header {
            field: "checksum",
            ..
        })
    ));

    let mut beyond = good.clone();
    set_bat(&mut beyond, 0, (len / 512) as u32 + 8);
    assert!(matches!(
        open_bytes(beyond),
        Err(VhdError::Bat { index: 0, .. })
    ));

    let mut overlap = good.clone();
    set_bat(&mut overlap, 2, bat0 + 1);
    assert!(matches!(open_bytes(overlap), Err(VhdError::Bat { .. })));

    let mut over_meta = good.clone();
    set_bat(&mut over_meta, 0, 2);
    assert!(matches!(
        open_bytes(over_meta),
        Err(VhdError::Bat { index: 0, .. })
    ));

    // Truncated: the last block is cut (the footer copy at 0 is then used, and the BAT
    // refuses the short block).
    let truncated = good[..len - 1024].to_vec();
    assert!(matches!(
        open_bytes(truncated),
        Err(VhdError::Bat { index: 3, .. })
    ));
    assert!(matches!(
        open_bytes(good[..100].to_vec()),
        Err(VhdError::File { .. })
    ));

    // Header and BAT offsets outside the file.
    let mut far_header = good.clone();
    for at in [0, len - FOOTER_SIZE] {
        far_header[at + 16..at + 24].copy_from_slice(&(len as u64).to_be_bytes());
        let sum = checksum(&far_header[at..at + 512], 64);
        far_header[at + 64..at + 68].copy_from_slice(&sum.to_be_bytes());
    }
    assert!(matches!(
        open_bytes(far_header),
        Err(VhdError::Footer {
            field: "data_offset",
            ..
        })
    ));
    let mut far_bat = good.clone();
    far_bat[512 + 16..512 + 24].copy_from_slice(&(len as u64 - 8).to_be_bytes());
    let sum = checksum(&far_bat[512..1536], 36);
    far_bat[512 + 36..512 + 40].copy_from_slice(&sum.to_be_bytes());
    assert!(matches!(
        open_bytes(far_bat),
        Err(VhdError::Header {
            field: "table_offset",
            ..
        })
    ));

    // A fixed image whose data area is cut short.
    let fixed = image::format_fixed(MemStore::default(), 8192, &opts(true, 0)).unwrap();
    let mut bytes = fixed.store().bytes();
    bytes.drain(..512);
    assert!(matches!(open_bytes(bytes), Err(VhdError::File { .. })));
}

#[test]
fn rejects_writes_when_read_only() {
    let b = VhdBackend::open_store(MemStore::new(small_dynamic()), true).unwrap();
    assert!(matches!(
        b.write(0, &[1], false),
        Err(BackstoreError::ReadOnly { .. })
    ));
    assert!(matches!(
        b.unmap(0, 512),
        Err(BackstoreError::ReadOnly { .. })
    ));
}

#[test]
fn extents_report_blocks_and_bitmap_holes() {
    let b = open_bytes(small_dynamic()).unwrap();
    let e = b.extents(0, 16 << 10).unwrap();
    let runs: Vec<(u64, u64, bool)> = e.iter().map(|e| (e.offset, e.len, e.mapped)).collect();
    assert_eq!(
        runs,
        vec![
            (0, 4096, false),
            (4096, 4096, true),
            (8192, 4096, false),
            (12288, 4096, true)
        ]
    );
    b.unmap(4096 + 512, 1024).unwrap();
    let runs: Vec<(u64, u64, bool)> = b
        .extents(4096, 4096)
        .unwrap()
        .iter()
        .map(|e| (e.offset, e.len, e.mapped))
        .collect();
    assert_eq!(
        runs,
        vec![(4096, 512, true), (4608, 1024, false), (5632, 2560, true)]
    );
    // The cleared bits are on disk: a reopened image agrees.
    let again = open_bytes(b.store().bytes()).unwrap();
    assert_eq!(
        again.extents(4096, 4096).unwrap(),
        b.extents(4096, 4096).unwrap()
    );
    assert_eq!(
        &again.read(4096, 4096).unwrap()[..1536],
        &[[1u8; 512], [0; 512], [0; 512]].concat()[..]
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]

    /// Mutated and truncated images never panic `open`, nor reads and extents after it.
    #[test]
    fn open_never_panics_on_mutated_images(
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..12),
        cut in any::<prop::sample::Index>(),
        cut_it in any::<bool>(),
        fix_sums in any::<bool>(),
    ) {
        let mut img = small_dynamic();
        for (at, v) in edits {
            let i = at.index(img.len());
            img[i] = v;
        }
        if fix_sums {
            for at in [0, img.len() - 512] {
                let sum = checksum(&img[at..at + 512], 64);
                img[at + 64..at + 68].copy_from_slice(&sum.to_be_bytes());
            }
            let sum = checksum(&img[512..1536], 36);
            img[512 + 36..512 + 40].copy_from_slice(&sum.to_be_bytes());
        }
        if cut_it {
            let n = cut.index(img.len());
            img.truncate(n);
        }
        if let Ok(b) = open_bytes(img) {
            let size = b.size().min(1 << 20);
            let _ = b.read(0, size as usize);
            let _ = b.extents(0, size);
            let _ = b.write(0, &[9; 700], false);
        }
    }

    /// Random bytes never panic `open`.
    #[test]
    fn open_never_panics_on_random_bytes(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
        let _ = open_bytes(bytes);
    }
}

// ---------------------------------------------------------------------------------------------
// Crash ordering

#[derive(Debug, Clone)]
enum Op {
    Write(u64, Vec<u8>),
    SetLen(u64),
    Zero(u64, u64),
    Sync,
}

/// A memory store that logs every modifying call.
#[derive(Debug)]
struct Recorder {
    inner: MemStore,
    log: Mutex<Vec<Op>>,
}

impl Recorder {
    fn record(&self, op: Op) {
        self.log.lock().unwrap().push(op);
    }
}

impl Store for Recorder {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_exact_at(buf, offset)
    }
    fn write_all_at(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        self.record(Op::Write(offset, data.to_vec()));
        self.inner.write_all_at(data, offset)
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.record(Op::SetLen(len));
        self.inner.set_len(len)
    }
    fn zero_range(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.record(Op::Zero(offset, len));
        self.inner.zero_range(offset, len)
    }
    fn sync(&self) -> std::io::Result<()> {
        self.record(Op::Sync);
        self.inner.sync()
    }
}

fn apply(img: &MemStore, op: &Op) {
    match op {
        Op::Write(at, d) => img.write_all_at(d, *at).unwrap(),
        Op::SetLen(n) => img.set_len(*n).unwrap(),
        Op::Zero(at, n) => img.zero_range(*at, *n).unwrap(),
        Op::Sync => {}
    }
}

/// A write of a crash scenario: `(offset, data, fua, zero)`; `zero` writes with
/// `write_zeroes(.., unmap = true)` instead (then `data` is all zeroes).
type CrashWrite = (u64, Vec<u8>, bool, bool);

/// Every state a crash can leave: all operations before some sync, plus any subset (in order)
/// of the operations between that sync and the next. Each state must open, keep a footer in
/// its last 512 bytes, and show each write either entirely or not at all; FUA writes whose
/// sync completed must be there. The image starts as `base_bytes` (opened with `parent` when
/// it is a differencing disk); `writes` must not overlap; each `piece`-byte aligned piece of a
/// write is all or nothing.
fn check_crash_states(
    base_bytes: &[u8],
    parent: Option<Arc<dyn BlockBackend>>,
    piece_len: u64,
    writes: &[CrashWrite],
) {
    let open = |img: MemStore| VhdBackend::open_store_with_parent(img, true, parent.clone());
    let before = open(MemStore::new(base_bytes.to_vec())).unwrap();
    let size = before.size();
    let old = before.read(0, size as usize).unwrap().to_vec();
    let rec = Recorder {
        inner: MemStore::new(base_bytes.to_vec()),
        log: Mutex::new(Vec::new()),
    };
    let b = VhdBackend::open_store_with_parent(rec, false, parent.clone()).unwrap();
    // The log length after each write.
    let mut ends = Vec::new();
    for (at, data, fua, zero) in writes {
        if *zero {
            b.write_zeroes(*at, data.len() as u64, true).unwrap();
            if *fua {
                b.flush().unwrap();
            }
        } else {
            b.write(*at, data, *fua).unwrap();
        }
        ends.push(b.store().log.lock().unwrap().len());
    }
    let log = b.store().log.lock().unwrap().clone();
    let syncs: Vec<usize> = log
        .iter()
        .enumerate()
        .filter(|(_, op)| matches!(op, Op::Sync))
        .map(|(i, _)| i)
        .collect();
    let mut barriers = vec![0usize];
    barriers.extend(syncs.iter().map(|i| i + 1));
    let mut states = 0;
    for (k, &start) in barriers.iter().enumerate() {
        let next = barriers.get(k + 1).copied().unwrap_or(log.len());
        let epoch: Vec<usize> = (start..next)
            .filter(|&i| !matches!(log[i], Op::Sync))
            .collect();
        assert!(epoch.len() <= 12, "epoch too long to enumerate");
        for mask in 0u32..(1 << epoch.len()) {
            let img = MemStore::new(base_bytes.to_vec());
            for op in &log[..start] {
                apply(&img, op);
            }
            for (j, &i) in epoch.iter().enumerate() {
                if mask & (1 << j) != 0 {
                    apply(&img, &log[i]);
                }
            }
            let bytes = img.bytes();
            assert!(
                Footer::parse(&bytes[bytes.len() - 512..]).is_ok(),
                "crash state {k}/{mask:b}: no trailing footer"
            );
            let v = open(img).unwrap_or_else(|e| panic!("crash state {k}/{mask:b}: {e}"));
            let disk = v.read(0, size as usize).unwrap();
            // Expected: the old disk, then each write's piece in each block either absent or
            // present; a write spanning pieces may land in some pieces only.
            let mut covered = vec![false; size as usize];
            for (w, (at, data, fua, _)) in writes.iter().enumerate() {
                let durable = *fua && start >= ends[w];
                let end = *at as usize + data.len();
                let mut piece = *at as usize;
                while piece < end {
                    let piece_end =
                        ((piece / piece_len as usize + 1) * piece_len as usize).min(end);
                    let r = piece..piece_end;
                    let all_new = r.clone().all(|i| disk[i] == data[i - *at as usize]);
                    let all_old = r.clone().all(|i| disk[i] == old[i]);
                    assert!(
                        all_new || (all_old && !durable),
                        "crash state {k}/{mask:b}: write {w} torn or lost in {r:?} (durable {durable})"
                    );
                    for i in r {
                        assert!(!covered[i], "crash writes overlap at {i}");
                        covered[i] = true;
                    }
                    piece = piece_end;
                }
            }
            for (i, &c) in covered.iter().enumerate() {
                if !c {
                    assert_eq!(disk[i], old[i], "crash state {k}/{mask:b}: byte {i}");
                }
            }
            states += 1;
        }
    }
    assert!(states > writes.len());
}

/// `bytes` with 6000 stale bytes ("leaked by an earlier crash") and a footer copy appended.
fn with_leaked_tail(bytes: Vec<u8>) -> Vec<u8> {
    with_leaked(bytes, 6000)
}

/// `bytes` with `leak` stale bytes and a footer copy appended.
fn with_leaked(mut bytes: Vec<u8>, leak: usize) -> Vec<u8> {
    let footer: Vec<u8> = bytes[bytes.len() - 512..].to_vec();
    bytes.extend(std::iter::repeat_n(0xEE, leak));
    bytes.extend_from_slice(&footer);
    bytes
}

/// Leaked space that ends between `new_end` and `new_end + 512` of the next allocation: a
/// footer written at `new_end` would overwrite the start of the file's trailing footer without
/// becoming the file's last 512 bytes (found by the `vhd_open` fuzz target, whose image then
/// reopened from a different footer copy). Blocks of 4 KiB span 4608 bytes with their bitmap;
/// the old trailing footer sits at `free`, so a leak of 4096 < k < 4608 bytes does it.
#[test]
fn allocation_past_leaked_space_keeps_the_trailing_footer() {
    let block = 4096u32;
    let base = image::format_dynamic(MemStore::default(), 8 * 4096, &opts(true, block)).unwrap();
    for leak in [4200, 4500, 4097, 4607, 700, 4608, 4609] {
        let mut bytes = with_leaked(base.store().bytes(), leak);
        // No footer copy to fall back on: the trailing footer alone must carry the image.
        bytes[0] ^= 0xFF;
        let b = open_bytes(bytes).unwrap();
        for (n, (at, byte)) in [(2 * 4096 + 10u64, 0x5Au8), (6 * 4096, 0x6B)]
            .into_iter()
            .enumerate()
        {
            b.write(at, &[byte; 100], true).unwrap();
            let after = b.store().bytes();
            assert!(
                Footer::parse(&after[after.len() - 512..]).is_ok(),
                "leak {leak}: no trailing footer after allocation {n}"
            );
            let again = VhdBackend::open_store(MemStore::new(after), true)
                .unwrap_or_else(|e| panic!("leak {leak}: reopen after allocation {n}: {e}"));
            assert_eq!(&again.read(at - 1, 3).unwrap()[..], &[0, byte, byte][..]);
            assert_eq!(again.info().allocated_blocks, n as u32 + 1, "leak {leak}");
        }
    }
    // And every crash state of the overlapping case keeps the trailing footer.
    let writes: Vec<CrashWrite> = vec![
        (2 * 4096 + 100, vec![0x22; 1000], false, false),
        (5 * 4096, vec![0x44; 4096 + 512], true, false),
    ];
    check_crash_states(
        &with_leaked(base.store().bytes(), 4200),
        None,
        u64::from(block),
        &writes,
    );
}

#[test]
fn every_crash_state_opens_and_reads_consistently() {
    let block = 4096u32;
    let size = 8 * u64::from(block);
    let base = image::format_dynamic(MemStore::default(), size, &opts(true, block)).unwrap();
    base.write(0, &[0x11; 4096], true).unwrap();
    let base_bytes = with_leaked_tail(base.store().bytes());
    let writes: Vec<CrashWrite> = vec![
        (2 * 4096 + 100, vec![0x22; 1000], false, false), // allocates block 2
        (512, vec![0x33; 700], true, false),              // allocated block 0
        (5 * 4096, vec![0x44; 4096 + 512], true, false),  // allocates blocks 5 and 6
        (2 * 4096 + 3000, vec![0x55; 200], false, false), // allocated block 2
    ];
    check_crash_states(&base_bytes, None, u64::from(block), &writes);
}

/// The same enumeration for a differencing disk: no crash state shows a sector whose bit is
/// set over data that was not written (it would hide the parent's bytes), nor a torn sector.
/// Writes are all or nothing per block except the last, which overwrites present sectors in
/// place and sets the bits of absent ones afterwards: like a disk, it may be torn at sector
/// granularity by a crash before it is acknowledged.
#[test]
fn every_differencing_crash_state_opens_and_reads_consistently() {
    // 4 KiB blocks: one granule per block; 64 KiB blocks: the writes share block 0 and widen
    // to granules inside it.
    for block in [4096u32, 64 << 10] {
        differencing_crash_states(block);
    }
}

fn differencing_crash_states(block: u32) {
    let parent = mem_parent(8 * u64::from(block), block);
    let child = mem_child(&parent);
    // Sectors 1..4 only (a partial bitmap in the first block).
    child.write(512, &[0x11; 1536], true).unwrap();
    let base_bytes = with_leaked_tail(child.store().bytes());
    let writes: Vec<CrashWrite> = vec![
        (2 * 4096 + 100, vec![0x22; 1000], false, false), // partial sectors
        (5 * 512 + 10, vec![0x33; 700], true, false),     // block 0, new bits
        (600, vec![0x66; 100], false, false),             // block 0, bits already set
        (5 * 4096 + 300, vec![0x44; 4096 + 512], true, false), // across 4 KiB
        (2 * 4096 + 3000, vec![0x55; 200], false, false),
        (4 * 4096 + 1000, vec![0; 2000], false, true), // zeroes
        (2 * 4096 + 1500, vec![0; 1000], true, true),  // zeroes over the parent
    ];
    let parent: Arc<dyn BlockBackend> = parent;
    check_crash_states(&base_bytes, Some(parent.clone()), 512, &writes);
    if block == 4096 {
        // Without the write over present and absent sectors, each block is all or nothing.
        check_crash_states(
            &base_bytes,
            Some(parent),
            u64::from(block),
            &writes[..writes.len() - 1],
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Differencing disks in memory

/// Byte `i` of the parents below: position dependent, never zero.
fn parent_byte(i: u64) -> u8 {
    ((i % 251) as u8 ^ 0x5a) | 1
}

/// A dynamic parent in memory with `block`-byte blocks, every block but block 1 filled with
/// [`parent_byte`] (block 1 stays unallocated and reads as zeroes).
fn mem_parent(size: u64, block: u32) -> Arc<VhdBackend<MemStore>> {
    let p = image::format_dynamic(MemStore::default(), size, &opts(true, block)).unwrap();
    let data: Vec<u8> = (0..size).map(parent_byte).collect();
    let b = u64::from(block);
    p.write(0, &data[..b as usize], false).unwrap();
    p.write(2 * b, &data[2 * b as usize..], false).unwrap();
    Arc::new(p)
}

fn parent_bytes(parent: &VhdBackend<MemStore>) -> Vec<u8> {
    parent.read(0, parent.size() as usize).unwrap().to_vec()
}

/// Options of a child: another unique id than its parent's.
fn child_opts() -> CreateOptions {
    CreateOptions {
        unique_id: [9; 16],
        ..opts(true, 4096)
    }
}

fn mem_child<P: Store>(parent: &Arc<VhdBackend<P>>) -> VhdBackend<MemStore> {
    let locators = [
        (locator::W2RU, ".\\p.vhd".to_owned()),
        (locator::W2KU, "/nonexistent/p.vhd".to_owned()),
    ];
    image::format_differencing(
        MemStore::default(),
        Arc::clone(parent),
        "p.vhd",
        &locators,
        &child_opts(),
    )
    .unwrap()
}

/// A fresh differencing disk over an empty (all-zero) dynamic parent.
fn mem_differencing(size: u64, block: u32) -> VhdBackend<MemStore> {
    let parent = Arc::new(mem_dynamic(size, block));
    mem_child(&parent)
}

/// A differencing disk over a differencing disk over an empty dynamic disk.
fn mem_differencing_chain(size: u64) -> VhdBackend<MemStore> {
    let mid = Arc::new(mem_differencing(size, 8192));
    mem_child(&mid)
}

fn file_differencing(size: u64) -> VhdBackend {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhd");
    drop(create_dynamic(&base, size, &opts(true, 64 << 10)).unwrap());
    create_differencing(dir.path().join("child.vhd"), &base, &child_opts()).unwrap()
}

crate::backstore_conformance!(conformance_differencing_mem_4k, |size| {
    super::mem_differencing(size, 4096)
});
crate::backstore_conformance!(conformance_differencing_mem_2m, |size| {
    super::mem_differencing(size, 2 << 20)
});
crate::backstore_conformance!(
    conformance_differencing_chain,
    super::mem_differencing_chain
);
crate::backstore_conformance!(conformance_differencing_file, super::file_differencing);

/// The bitmap bits of `block` in a differencing image, or `None` if it is unallocated.
fn bits_on_disk(img: &[u8], block: usize, block_size: u64) -> Option<Vec<bool>> {
    let at = 1536 + 4 * block;
    let entry = u32::from_be_bytes(img[at..at + 4].try_into().unwrap());
    if entry == u32::MAX {
        return None;
    }
    let bitmap = &img[entry as usize * 512..];
    Some(
        (0..(block_size / 512) as usize)
            .map(|s| bitmap[s / 8] & (0x80 >> (s % 8)) != 0)
            .collect(),
    )
}

#[test]
fn differencing_reads_fall_through_to_the_parent() {
    let parent = mem_parent(64 << 10, 4096);
    let child = mem_child(&parent);
    let want = parent_bytes(&parent);
    assert_eq!(
        want[4096..8192],
        [0u8; 4096][..],
        "block 1 of the parent is a hole"
    );
    assert_eq!(child.read(0, want.len()).unwrap()[..], want[..]);
    assert_eq!(child.size(), parent.size());
    assert!(!child.thin_provisioning());
    assert_eq!(
        child.extents(100, 50_000).unwrap(),
        vec![crate::Extent {
            offset: 100,
            len: 50_000,
            mapped: true
        }]
    );
    let info = child.info();
    assert_eq!(info.disk_type, DiskType::Differencing);
    assert_eq!(info.parent_name.as_deref(), Some("p.vhd"));
    assert_eq!(info.parent_unique_id, Some(parent.info().footer.unique_id));
    assert_eq!(info.parent_path, None);
    let texts: Vec<(String, Option<String>)> = info
        .parent_locators
        .iter()
        .map(|l| (l.platform(), l.text.clone()))
        .collect();
    assert_eq!(
        texts,
        vec![
            ("W2ru".to_owned(), Some(".\\p.vhd".to_owned())),
            ("W2ku".to_owned(), Some("/nonexistent/p.vhd".to_owned()))
        ]
    );
    assert_eq!(
        info.footer.original_size,
        parent.info().footer.original_size
    );
    assert_eq!(info.header.unwrap().block_size, 4096);
    // The child file holds no block yet.
    assert_eq!(info.allocated_blocks, 0);
}

/// Set bits of `block` (64 KiB blocks: 128 sectors) as ranges of sectors.
fn set_runs(img: &[u8], block: usize) -> Option<Vec<(usize, usize)>> {
    let bits = bits_on_disk(img, block, 64 << 10)?;
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (s, _) in bits.iter().enumerate().filter(|(_, b)| **b) {
        match runs.last_mut() {
            Some(r) if r.1 + 1 == s => r.1 = s,
            _ => runs.push((s, s)),
        }
    }
    Some(runs)
}

/// Bits are set for the bitmap bytes (8-sector granules) the written sectors fall in, and
/// nowhere else; the granules' unwritten sectors still read the parent's bytes.
#[test]
fn differencing_writes_set_only_the_written_granules() {
    const B: u64 = 64 << 10;
    let parent = mem_parent(16 * B, B as u32);
    let child = mem_child(&parent);
    let mut model = parent_bytes(&parent);
    let mut write = |at: u64, data: &[u8], fua: bool| {
        child.write(at, data, fua).unwrap();
        model[at as usize..at as usize + data.len()].copy_from_slice(data);
    };
    // Unaligned, inside block 2: sectors 1..=3, granule 0.
    write(2 * B + 700, &[0xC3; 1000], false);
    assert_eq!(set_runs(&child.store().bytes(), 2).unwrap(), vec![(0, 7)]);
    // Sectors 9..=25: granules 1..=3.
    write(2 * B + 5000, &[0xA1; 8192], false);
    // Across blocks 3 and 4, ending mid-sector, FUA.
    let data: Vec<u8> = (0..9000u32).map(|i| i as u8).collect();
    write(4 * B - 1000, &data, true);
    // Into the parent's hole (block 1).
    write(B + 10, &[0x77; 20], false);
    // An allocated block: bits already set, then a new granule (sectors 40..=47).
    write(2 * B + 800, &[0x44; 5], false);
    write(2 * B + 40 * 512 + 5, &[0x99; 10], false);
    // Aligned to granules: nothing widened.
    write(5 * B + 8 * 4096, &[0x55; 4096], false);
    assert_eq!(child.read(0, model.len()).unwrap()[..], model[..]);

    let img = child.store().bytes();
    assert_eq!(set_runs(&img, 2).unwrap(), vec![(0, 31), (40, 47)]);
    assert_eq!(set_runs(&img, 3).unwrap(), vec![(120, 127)]);
    assert_eq!(set_runs(&img, 4).unwrap(), vec![(0, 15)]);
    assert_eq!(set_runs(&img, 1).unwrap(), vec![(0, 7)]);
    assert_eq!(set_runs(&img, 5).unwrap(), vec![(64, 71)]);
    assert_eq!(set_runs(&img, 6), None);
    // Every bitmap byte written is 0x00 or 0xFF (module documentation: libvhdi).
    for block in 1..=5 {
        let at = 1536 + 4 * block;
        let entry = u32::from_be_bytes(img[at..at + 4].try_into().unwrap()) as usize;
        assert!(img[entry * 512..entry * 512 + 16]
            .iter()
            .all(|&b| b == 0 || b == 0xFF));
    }
    // The same bytes after reopening (bitmaps and BAT on disk, not only cached).
    let again = VhdBackend::open_store_with_parent(
        MemStore::new(img),
        true,
        Some(parent.clone() as Arc<dyn BlockBackend>),
    )
    .unwrap();
    assert_eq!(again.read(0, model.len()).unwrap()[..], model[..]);
}

#[test]
fn differencing_write_zeroes_and_unmap_hide_the_parent() {
    for unmap in [false, true] {
        let parent = mem_parent(64 << 10, 4096);
        let child = mem_child(&parent);
        let mut model = parent_bytes(&parent);
        child.write(3 * 4096, &[0x12; 4096], false).unwrap();
        model[3 * 4096..4 * 4096].fill(0x12);
        // Unallocated block, partial sectors at both ends; an allocated one; a whole one.
        for (at, len) in [(100u64, 3000u64), (3 * 4096 + 10, 1000), (5 * 4096, 4096)] {
            child.write_zeroes(at, len, unmap).unwrap();
            model[at as usize..(at + len) as usize].fill(0);
        }
        child.unmap(8 * 4096 + 511, 2).unwrap();
        model[8 * 4096 + 511..8 * 4096 + 513].fill(0);
        assert_eq!(
            child.read(0, model.len()).unwrap()[..],
            model[..],
            "{unmap}"
        );
        let img = child.store().bytes();
        let bits = bits_on_disk(&img, 0, 4096).unwrap();
        // 100..3100: sectors 0..=6, widened to the granule of sectors 0..=7.
        assert_eq!(bits, vec![true; 8]);
        let again = VhdBackend::open_store_with_parent(
            MemStore::new(img),
            true,
            Some(parent.clone() as Arc<dyn BlockBackend>),
        )
        .unwrap();
        assert_eq!(again.read(0, model.len()).unwrap()[..], model[..]);
    }
}

#[test]
fn differencing_random_io_matches_a_model() {
    for (n, block) in [512u32, 4096, 1 << 16].into_iter().enumerate() {
        let parent = mem_parent(512 << 10, block);
        let child = mem_child(&parent);
        let model = random_io(&child, 0x5eed + n as u64, 60);
        let again = VhdBackend::open_store_with_parent(
            MemStore::new(child.store().bytes()),
            true,
            Some(parent.clone() as Arc<dyn BlockBackend>),
        )
        .unwrap();
        assert!(
            again.read(0, model.len()).unwrap()[..] == model[..],
            "{block}"
        );
        // A grandchild sees the same disk, and its own writes only.
        let mid = Arc::new(again);
        let top = mem_child(&mid);
        assert!(top.read(0, model.len()).unwrap()[..] == model[..]);
        top.write(1000, &[0xEF; 5000], false).unwrap();
        assert!(mid.read(0, model.len()).unwrap()[..] == model[..]);
        assert_eq!(top.read(1000, 5000).unwrap()[..], [0xEF; 5000][..]);
    }
}

#[test]
fn differencing_parent_rules_when_opening_a_store() {
    let parent = mem_parent(64 << 10, 4096);
    let child = mem_child(&parent);
    let img = child.store().bytes();
    assert!(matches!(
        VhdBackend::open_store(MemStore::new(img.clone()), false),
        Err(VhdError::Parent { .. })
    ));
    let dynamic = parent.store().bytes();
    assert!(matches!(
        VhdBackend::open_store_with_parent(
            MemStore::new(dynamic),
            false,
            Some(parent.clone() as Arc<dyn BlockBackend>)
        ),
        Err(VhdError::Parent { .. })
    ));
    // A parent smaller than the child: the bytes past its end read as zeroes.
    let small: Arc<dyn BlockBackend> = Arc::new(crate::RamBackend::new(8192).unwrap());
    small.write(0, &[0x31; 8192], false).unwrap();
    let c = VhdBackend::open_store_with_parent(MemStore::new(img), false, Some(small)).unwrap();
    assert_eq!(
        c.read(8000, 300).unwrap()[..],
        [vec![0x31; 192], vec![0; 108]].concat()[..]
    );
    c.write(8190, &[7; 4], false).unwrap();
    assert_eq!(
        c.read(8188, 8).unwrap()[..],
        [0x31, 0x31, 7, 7, 7, 7, 0, 0][..]
    );
    // Read-only children refuse writes.
    let ro = VhdBackend::open_store_with_parent(
        MemStore::new(child.store().bytes()),
        true,
        Some(parent.clone() as Arc<dyn BlockBackend>),
    )
    .unwrap();
    assert!(matches!(
        ro.write_zeroes(0, 512, true),
        Err(BackstoreError::ReadOnly { .. })
    ));
}

/// Rewrite locator `i` of the header at 512 (fixing the header checksum).
fn set_locator(img: &mut [u8], i: usize, edit: impl FnOnce(&mut header::ParentLocator)) {
    let mut h = header::DynamicHeader::parse(&img[512..1536]).unwrap();
    edit(&mut h.parent_locators[i]);
    img[512..1536].copy_from_slice(&h.encode());
}

#[test]
fn corrupt_locators_are_refused_naming_the_field() {
    let parent = mem_parent(64 << 10, 4096);
    let good = mem_child(&parent).store().bytes();
    let len = good.len() as u64;
    let open = |img: Vec<u8>| {
        VhdBackend::open_store_with_parent(
            MemStore::new(img),
            false,
            Some(parent.clone() as Arc<dyn BlockBackend>),
        )
    };
    let w2ru_at = header::DynamicHeader::parse(&good[512..1536])
        .unwrap()
        .parent_locators[0]
        .data_offset as usize;
    let cases: Vec<(Vec<u8>, usize, &str)> = vec![
        (
            {
                let mut b = good.clone();
                set_locator(&mut b, 1, |l| l.data_offset = len + 512);
                b
            },
            1,
            "data offset",
        ),
        (
            {
                let mut b = good.clone();
                set_locator(&mut b, 0, |l| l.data_offset = 3);
                b
            },
            0,
            "data offset",
        ),
        (
            {
                let mut b = good.clone();
                set_locator(&mut b, 1, |l| l.data_length = 1 << 30);
                b
            },
            1,
            "data length",
        ),
        (
            {
                let mut b = good.clone();
                set_locator(&mut b, 0, |l| l.data_length = 7);
                b
            },
            0,
            "data length",
        ),
        (
            {
                let mut b = good.clone();
                set_locator(&mut b, 2, |l| {
                    *l = header::ParentLocator {
                        platform_code: *b"Wi2r",
                        data_space: 700,
                        data_length: 4,
                        data_offset: 1024,
                    }
                });
                b
            },
            2,
            "data space",
        ),
        (
            {
                let mut b = good.clone();
                b[w2ru_at..w2ru_at + 2].copy_from_slice(&0xdc01u16.to_le_bytes());
                b
            },
            0,
            "path",
        ),
    ];
    for (img, index, field) in cases {
        match open(img) {
            Err(e @ VhdError::Locator { .. }) => {
                let VhdError::Locator {
                    index: i, field: f, ..
                } = &e
                else {
                    unreachable!()
                };
                assert_eq!((*i, *f), (index, field), "{e}");
                assert!(
                    e.to_string()
                        .contains(&format!("parent locator {index} {field}")),
                    "{e}"
                );
            }
            other => panic!("{index} {field}: {other:?}"),
        }
    }
    // A block may not overlap the locator data.
    let mut over = good.clone();
    let footer = over[over.len() - 512..].to_vec();
    over.extend_from_slice(&[0; 8192]);
    over.extend_from_slice(&footer);
    set_bat(&mut over, 0, (w2ru_at / 512) as u32);
    match open(over) {
        Err(VhdError::Bat { index: 0, reason }) => {
            assert!(reason.contains("parent locator data"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    // The parent name must be UTF-16.
    let mut name = good.clone();
    name[512 + 64..512 + 66].copy_from_slice(&0xd800u16.to_be_bytes());
    let sum = checksum(&name[512..1536], 36);
    name[512 + 36..512 + 40].copy_from_slice(&sum.to_be_bytes());
    assert!(matches!(
        open(name),
        Err(VhdError::Header {
            field: "parent_name",
            ..
        })
    ));
    assert!(open(good).is_ok());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    /// Mutated differencing images never panic `open_store_with_parent`, reads or writes.
    #[test]
    fn differencing_open_never_panics_on_mutated_images(
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..12),
        header_only in any::<bool>(),
    ) {
        let parent = mem_parent(16 << 10, 4096);
        let child = mem_child(&parent);
        child.write(4096 + 100, &[3; 700], false).unwrap();
        let mut img = child.store().bytes();
        for (at, v) in edits {
            let i = if header_only { 512 + at.index(1024) } else { at.index(img.len()) };
            img[i] = v;
        }
        let sum = checksum(&img[512..1536], 36);
        img[512 + 36..512 + 40].copy_from_slice(&sum.to_be_bytes());
        let p: Arc<dyn BlockBackend> = parent;
        if let Ok(b) = VhdBackend::open_store_with_parent(MemStore::new(img), false, Some(p)) {
            let size = b.size().min(1 << 20);
            let _ = b.read(0, size as usize);
            let _ = b.write(100, &[9; 700], false);
            let _ = b.write_zeroes(3000, 5000, true);
            let _ = b.info();
        }
    }
}

/// Reads use recycled buffers: a large read of unallocated space after a large read of data
/// must still return zeroes (nothing of the earlier buffer shows through).
#[test]
fn recycled_read_buffers_never_show_old_data() {
    let b = mem_dynamic(8 << 20, 1 << 20);
    b.write(0, &vec![0xa5u8; 1 << 20], false).unwrap();
    for _ in 0..3 {
        let data = b.read(0, 1 << 20).unwrap();
        assert!(data.iter().all(|&x| x == 0xa5));
        drop(data);
        let hole = b.read(4 << 20, 1 << 20).unwrap();
        assert!(
            hole.iter().all(|&x| x == 0),
            "an unallocated block read non-zero"
        );
    }
}
