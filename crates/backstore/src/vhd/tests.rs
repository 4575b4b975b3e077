//! Tests of the VHD format against QEMU (`qemu-img` must be installed: a missing tool fails
//! the test), the conformance suite, crash ordering and corrupt images.
#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::cast_possible_truncation
)]

use std::path::Path;
use std::process::Command;
use std::sync::Mutex;

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

/// Every state a crash can leave: all operations before some sync, plus any subset (in order)
/// of the operations between that sync and the next. Each state must open, keep a footer in
/// its last 512 bytes, and show each write either entirely or not at all; FUA writes whose
/// sync completed must be there.
#[test]
fn every_crash_state_opens_and_reads_consistently() {
    let block = 4096u32;
    let size = 8 * u64::from(block);
    let base = image::format_dynamic(MemStore::default(), size, &opts(true, block)).unwrap();
    base.write(0, &[0x11; 4096], true).unwrap();
    // Leaked space from an "earlier crash" past the footer: stale bytes that must not show.
    let mut base_bytes = base.store().bytes();
    let footer: Vec<u8> = base_bytes[base_bytes.len() - 512..].to_vec();
    base_bytes.extend_from_slice(&[0xEE; 6000]);
    base_bytes.extend_from_slice(&footer);

    let rec = Recorder {
        inner: MemStore::new(base_bytes.clone()),
        log: Mutex::new(Vec::new()),
    };
    let b = VhdBackend::open_store(rec, false).unwrap();
    // (offset, data, fua), and the log length after each write.
    let writes: Vec<(u64, Vec<u8>, bool)> = vec![
        (2 * 4096 + 100, vec![0x22; 1000], false), // allocates block 2
        (512, vec![0x33; 700], true),              // allocated block 0
        (5 * 4096, vec![0x44; 4096 + 512], true),  // allocates blocks 5 and 6
        (2 * 4096 + 3000, vec![0x55; 200], false), // allocated block 2
    ];
    let mut ends = Vec::new();
    for (at, data, fua) in &writes {
        b.write(*at, data, *fua).unwrap();
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
            let img = MemStore::new(base_bytes.clone());
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
            let v = VhdBackend::open_store(img, true)
                .unwrap_or_else(|e| panic!("crash state {k}/{mask:b}: {e}"));
            let disk = v.read(0, size as usize).unwrap();
            // Expected: base, then each write's piece in each block either absent or present
            // (later writes win); a write spanning blocks may land in some blocks only.
            let mut covered = vec![false; size as usize];
            for (w, (at, data, fua)) in writes.iter().enumerate().rev() {
                let durable = *fua && start >= ends[w];
                let end = *at as usize + data.len();
                let mut piece = *at as usize;
                while piece < end {
                    let piece_end = ((piece / block as usize + 1) * block as usize).min(end);
                    let r = piece..piece_end;
                    let fresh: Vec<usize> = r.clone().filter(|&i| !covered[i]).collect();
                    let all_new = fresh.iter().all(|&i| disk[i] == data[i - *at as usize]);
                    let all_old = fresh.iter().all(|&i| {
                        let old = if i < 4096 { 0x11 } else { 0 };
                        disk[i] == old
                    });
                    assert!(
                        all_new || (all_old && !durable),
                        "crash state {k}/{mask:b}: write {w} torn or lost in {r:?} (durable {durable})"
                    );
                    for i in r {
                        covered[i] = true;
                    }
                    piece = piece_end;
                }
            }
            for (i, &c) in covered.iter().enumerate() {
                if !c {
                    let old = if i < 4096 { 0x11 } else { 0 };
                    assert_eq!(disk[i], old, "crash state {k}/{mask:b}: byte {i}");
                }
            }
            states += 1;
        }
    }
    assert!(states > writes.len());
}
