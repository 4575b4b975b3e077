//! Shared conformance suite.
//!
//! Every [`BlockBackend`] must pass these checks; each takes a constructor `make(size)` returning
//! a fresh, all-zero backstore of `size` bytes and reports the first violation as `Err`. Use
//! [`run_all`] for one call, or the [`backstore_conformance!`](crate::backstore_conformance)
//! macro for one named `#[test]` per check. Other crates reach this module with the
//! `conformance` feature.

use std::fmt::Debug;

use crate::{BackstoreError, BlockBackend, Extent};

/// Outcome of one check: the first contract violation, described.
pub type CheckResult = std::result::Result<(), String>;

/// Size of the backstore every check asks for.
pub const SIZE: u64 = 1 << 20;

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

/// Turn a backstore result into a check result that names the operation.
fn ok<T, E: Debug>(what: &str, r: std::result::Result<T, E>) -> std::result::Result<T, String> {
    r.map_err(|e| format!("{what}: unexpected error {e:?}"))
}

/// A reproducible, position-dependent pattern so misplaced bytes are noticed.
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            seed.wrapping_add(u8::try_from(i % 251).unwrap_or(0))
                .wrapping_mul(7)
                | 1
        })
        .collect()
}

fn len64(len: usize) -> u64 {
    u64::try_from(len).unwrap_or(u64::MAX)
}

fn check_bytes<B: BlockBackend>(b: &B, offset: u64, want: &[u8], what: &str) -> CheckResult {
    let got = ok(what, b.read(offset, want.len()))?;
    ensure!(
        got.len() == want.len(),
        "{what}: read returned {} bytes",
        got.len()
    );
    if let Some(i) = got.iter().zip(want).position(|(g, w)| g != w) {
        return Err(format!(
            "{what}: byte {} differs: got {:?}, want {:?}",
            offset.saturating_add(len64(i)),
            got.get(i),
            want.get(i)
        ));
    }
    Ok(())
}

fn check_zero<B: BlockBackend>(b: &B, offset: u64, len: u64, what: &str) -> CheckResult {
    let len = usize::try_from(len).map_err(|e| e.to_string())?;
    check_bytes(b, offset, &vec![0u8; len], what)
}

fn out_of_range<T: Debug>(what: &str, r: crate::Result<T>) -> CheckResult {
    match r {
        Err(BackstoreError::OutOfRange { .. }) => Ok(()),
        other => Err(format!("{what}: want OutOfRange, got {other:?}")),
    }
}

/// Extents must start at `offset`, be contiguous and non-empty, and stay within `len`.
fn check_extent_shape(ext: &[Extent], offset: u64, len: u64) -> CheckResult {
    ensure!(
        len == 0 || !ext.is_empty(),
        "extents({offset}, {len}) is empty"
    );
    let mut at = offset;
    for e in ext {
        ensure!(e.offset == at, "extent {e:?} does not start at {at}");
        ensure!(e.len > 0, "empty extent {e:?}");
        at = e.offset.checked_add(e.len).ok_or("extent end overflows")?;
    }
    ensure!(
        at <= offset.saturating_add(len),
        "extents run past {offset}+{len}"
    );
    Ok(())
}

/// Whether every byte of `offset..offset + len` that the extents cover is reported mapped.
fn mapped_in(ext: &[Extent], offset: u64, len: u64) -> bool {
    let end = offset.saturating_add(len);
    ext.iter()
        .all(|e| e.mapped || e.offset.saturating_add(e.len) <= offset || e.offset >= end)
}

/// A fresh backstore reads as zeroes, whole and at odd offsets; its size is as asked.
pub fn fresh_reads_zero<B: BlockBackend>(make: &dyn Fn(u64) -> B) -> CheckResult {
    let b = make(SIZE);
    ensure!(b.size() == SIZE, "size() = {}, want {SIZE}", b.size());
    check_zero(&b, 0, SIZE, "whole read")?;
    check_zero(&b, 12_345, 4_097, "odd read")?;
    check_zero(&b, SIZE - 1, 1, "last byte")?;
    let empty = ok("zero-length read at end", b.read(SIZE, 0))?;
    ensure!(
        empty.is_empty(),
        "zero-length read returned {} bytes",
        empty.len()
    );
    Ok(())
}

/// Writes at aligned and unaligned offsets read back exactly and disturb nothing else.
pub fn write_read_back<B: BlockBackend>(make: &dyn Fn(u64) -> B) -> CheckResult {
    let b = make(SIZE);
    let cases: [(u64, usize, u8); 6] = [
        (0, 512, 1),
        (8192, 4096, 2),
        (12_345, 70_001, 3),
        (131_071, 2, 4),
        (SIZE - 4096, 4096, 5),
        (300_000, 1, 6),
    ];
    for &(offset, len, seed) in &cases {
        ok("write", b.write(offset, &pattern(seed, len), false))?;
    }
    for &(offset, len, seed) in &cases {
        check_bytes(
            &b,
            offset,
            &pattern(seed, len),
            &format!("read back {offset}+{len}"),
        )?;
    }
    check_zero(&b, 512, 8192 - 512, "gap after first write")?;
    check_zero(&b, 300_001, 1000, "gap after one-byte write")?;
    // Overwrite part of an earlier write.
    ok("overwrite", b.write(12_400, &pattern(9, 100), false))?;
    let mut want = pattern(3, 70_001);
    if let Some(dst) = want.get_mut(55..155) {
        dst.copy_from_slice(&pattern(9, 100));
    }
    check_bytes(&b, 12_345, &want, "partial overwrite")?;
    ok("empty write", b.write(SIZE, &[], false))?;
    // A 1 MiB read of the whole store.
    let all = ok("whole read", b.read(0, 1 << 20))?;
    ensure!(all.len() == 1 << 20, "whole read length {}", all.len());
    Ok(())
}

/// Every operation past the end, or whose end overflows `u64`, fails with `OutOfRange`.
pub fn rejects_out_of_range<B: BlockBackend>(make: &dyn Fn(u64) -> B) -> CheckResult {
    let b = make(SIZE);
    out_of_range("read across end", b.read(SIZE - 1, 2))?;
    out_of_range("read at end", b.read(SIZE, 1))?;
    out_of_range("read past end, empty", b.read(SIZE + 1, 0))?;
    out_of_range("read overflowing", b.read(u64::MAX, 1))?;
    out_of_range("write across end", b.write(SIZE - 1, &[1, 2], false))?;
    out_of_range("fua write across end", b.write(SIZE - 1, &[1, 2], true))?;
    out_of_range(
        "write overflowing",
        b.write(u64::MAX - 1, &[1, 2, 3], false),
    )?;
    out_of_range("unmap across end", b.unmap(SIZE - 1, 2))?;
    out_of_range("unmap overflowing", b.unmap(1, u64::MAX))?;
    out_of_range(
        "write zeroes across end",
        b.write_zeroes(0, SIZE + 1, false),
    )?;
    out_of_range(
        "write zeroes overflowing",
        b.write_zeroes(u64::MAX, 2, true),
    )?;
    out_of_range("extents past end", b.extents(SIZE, 1))?;
    out_of_range("extents overflowing", b.extents(u64::MAX, u64::MAX))?;
    // Nothing was written by the failed operations.
    check_zero(&b, SIZE - 4096, 4096, "tail after rejected writes")
}

/// Unmapped ranges, aligned or not, read as zeroes; data around them survives.
pub fn unmap_reads_zero<B: BlockBackend>(make: &dyn Fn(u64) -> B) -> CheckResult {
    let b = make(SIZE);
    let data = pattern(11, 512 << 10);
    ok("write", b.write(0, &data, false))?;
    ok("unaligned unmap", b.unmap(1_000, 200_000))?;
    ok("aligned unmap", b.unmap(256 << 10, 128 << 10))?;
    ok("empty unmap", b.unmap(SIZE, 0))?;
    check_bytes(
        &b,
        0,
        data.get(..1_000).unwrap_or_default(),
        "before unaligned unmap",
    )?;
    check_zero(&b, 1_000, 200_000, "unaligned unmap")?;
    check_bytes(
        &b,
        201_000,
        data.get(201_000..256 << 10).unwrap_or_default(),
        "between",
    )?;
    check_zero(&b, 256 << 10, 128 << 10, "aligned unmap")?;
    check_bytes(
        &b,
        384 << 10,
        data.get(384 << 10..).unwrap_or_default(),
        "after",
    )?;
    // Writing again after unmap works.
    ok("rewrite", b.write(2_000, &pattern(12, 10), false))?;
    check_bytes(&b, 2_000, &pattern(12, 10), "rewrite after unmap")
}

/// `write_zeroes` zeroes exactly its range, with and without `unmap`.
pub fn write_zeroes_both_modes<B: BlockBackend>(make: &dyn Fn(u64) -> B) -> CheckResult {
    for unmap in [false, true] {
        let b = make(SIZE);
        let data = pattern(21, 1 << 20);
        ok("write", b.write(0, &data, false))?;
        ok("write zeroes", b.write_zeroes(777, 300_000, unmap))?;
        ok(
            "write zeroes aligned",
            b.write_zeroes(512 << 10, 256 << 10, unmap),
        )?;
        ok("empty write zeroes", b.write_zeroes(0, 0, unmap))?;
        let what = |s: &str| format!("{s} (unmap = {unmap})");
        check_bytes(&b, 0, data.get(..777).unwrap_or_default(), &what("before"))?;
        check_zero(&b, 777, 300_000, &what("zeroed"))?;
        check_bytes(
            &b,
            300_777,
            data.get(300_777..512 << 10).unwrap_or_default(),
            &what("mid"),
        )?;
        check_zero(&b, 512 << 10, 256 << 10, &what("zeroed aligned"))?;
        check_bytes(
            &b,
            768 << 10,
            data.get(768 << 10..).unwrap_or_default(),
            &what("after"),
        )?;
    }
    Ok(())
}

/// Extents are well formed and report written data as mapped (coarser mapping is allowed).
pub fn extents_cover_written<B: BlockBackend>(make: &dyn Fn(u64) -> B) -> CheckResult {
    let b = make(SIZE);
    let fresh = ok("extents on fresh store", b.extents(0, SIZE))?;
    check_extent_shape(&fresh, 0, SIZE)?;
    let writes: [(u64, usize); 3] = [(0, 4096), (200_000, 10_000), (SIZE - 1, 1)];
    for &(offset, len) in &writes {
        ok("write", b.write(offset, &pattern(31, len), false))?;
    }
    for &(start, len) in &[(0, SIZE), (1, SIZE - 1), (199_999, 20_000), (SIZE - 1, 1)] {
        let ext = ok("extents", b.extents(start, len))?;
        check_extent_shape(&ext, start, len)?;
        for &(offset, wlen) in &writes {
            ensure!(
                mapped_in(&ext, offset, len64(wlen)),
                "written {offset}+{wlen} not reported mapped by extents({start}, {len}): {ext:?}"
            );
        }
    }
    ok("unmap", b.unmap(0, SIZE))?;
    let after = ok("extents after unmap", b.extents(0, SIZE))?;
    check_extent_shape(&after, 0, SIZE)?;
    ensure!(
        ok("extents(x, 0)", b.extents(5, 0))?.is_empty(),
        "extents of an empty range"
    );
    Ok(())
}

/// `flush` succeeds, before and after writes.
pub fn flush_succeeds<B: BlockBackend>(make: &dyn Fn(u64) -> B) -> CheckResult {
    let b = make(SIZE);
    ok("flush on fresh store", b.flush())?;
    ok("write", b.write(4096, &pattern(41, 8192), false))?;
    ok("flush", b.flush())?;
    check_bytes(&b, 4096, &pattern(41, 8192), "read after flush")
}

/// FUA writes, aligned and not, read back.
pub fn fua_write_readable<B: BlockBackend>(make: &dyn Fn(u64) -> B) -> CheckResult {
    let b = make(SIZE);
    ok("fua write", b.write(65_536, &pattern(51, 65_536), true))?;
    ok("unaligned fua write", b.write(3, &pattern(52, 1_000), true))?;
    check_bytes(&b, 65_536, &pattern(51, 65_536), "fua read back")?;
    check_bytes(&b, 3, &pattern(52, 1_000), "unaligned fua read back")
}

/// Writers on several threads to disjoint (but chunk-sharing) ranges all land.
pub fn concurrent_writers<B: BlockBackend>(make: &dyn Fn(u64) -> B) -> CheckResult {
    const THREADS: u8 = 8;
    const SPAN: usize = 10_007; // odd, so neighbouring spans share chunks and blocks
    const ROUNDS: u8 = 20;
    let b = make(SIZE);
    let span_at = |t: u8| u64::from(t) * len64(SPAN) * 3;
    let results: Vec<CheckResult> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let b = &b;
                s.spawn(move || -> CheckResult {
                    for round in 0..ROUNDS {
                        let seed = t.wrapping_mul(31).wrapping_add(round);
                        let data = pattern(seed, SPAN * 3);
                        ok(
                            "concurrent write",
                            b.write(span_at(t), &data, round % 5 == 0),
                        )?;
                    }
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("thread panicked".into())))
            .collect()
    });
    for r in results {
        r?;
    }
    for t in 0..THREADS {
        let seed = t.wrapping_mul(31).wrapping_add(ROUNDS - 1);
        check_bytes(
            &b,
            span_at(t),
            &pattern(seed, SPAN * 3),
            &format!("thread {t}"),
        )?;
    }
    Ok(())
}

/// `resize`: a backstore that supports it keeps its data, reads zeroes in the new range,
/// accepts I/O there, refuses to shrink and treats the same size as a no-op; one that does
/// not answers `Unsupported` (or, where the size is set outside, e.g. a block device that did
/// not grow, `OutOfRange`) and keeps its size.
pub fn resize_grows_or_refuses<B: BlockBackend>(make: &dyn Fn(u64) -> B) -> CheckResult {
    let b = make(SIZE);
    let data = pattern(41, 4096);
    let tail = SIZE - 4096;
    ok("write", b.write(tail, &data, false))?;
    match b.resize(2 * SIZE) {
        Err(BackstoreError::Unsupported(_) | BackstoreError::OutOfRange { .. }) => {
            ensure!(b.size() == SIZE, "refused resize changed the size");
            check_bytes(&b, tail, &data, "data after a refused resize")?;
            return Ok(());
        }
        r => ok("resize", r)?,
    }
    ensure!(b.size() == 2 * SIZE, "size after growing: {}", b.size());
    check_bytes(&b, tail, &data, "data before the old end")?;
    check_bytes(&b, SIZE, &[0; 8192], "new range")?;
    check_bytes(&b, 2 * SIZE - 4096, &[0; 4096], "end of the new range")?;
    let more = pattern(42, 4096);
    ok("write past the old end", b.write(SIZE + 4096, &more, true))?;
    check_bytes(&b, SIZE + 4096, &more, "write past the old end")?;
    ensure!(
        b.read(2 * SIZE - 512, 1024).is_err(),
        "read past the new end succeeded"
    );
    ok("same size", b.resize(2 * SIZE))?;
    ensure!(
        matches!(b.resize(SIZE), Err(BackstoreError::Shrink { .. })),
        "shrinking was not refused"
    );
    ensure!(b.size() == 2 * SIZE, "refused shrink changed the size");
    Ok(())
}

/// One conformance check over a backend constructor.
pub type Check<B> = fn(&dyn Fn(u64) -> B) -> CheckResult;

/// Named checks, in order.
pub fn checks<B: BlockBackend>() -> Vec<(&'static str, Check<B>)> {
    vec![
        ("fresh_reads_zero", fresh_reads_zero::<B>),
        ("write_read_back", write_read_back::<B>),
        ("rejects_out_of_range", rejects_out_of_range::<B>),
        ("unmap_reads_zero", unmap_reads_zero::<B>),
        ("write_zeroes_both_modes", write_zeroes_both_modes::<B>),
        ("extents_cover_written", extents_cover_written::<B>),
        ("flush_succeeds", flush_succeeds::<B>),
        ("fua_write_readable", fua_write_readable::<B>),
        ("concurrent_writers", concurrent_writers::<B>),
        ("resize_grows_or_refuses", resize_grows_or_refuses::<B>),
    ]
}

/// Run every check; the error lists each failing check with its reason.
pub fn run_all<B: BlockBackend>(make: &dyn Fn(u64) -> B) -> CheckResult {
    let failures: Vec<String> = checks::<B>()
        .into_iter()
        .filter_map(|(name, check)| check(make).err().map(|e| format!("{name}: {e}")))
        .collect();
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("\n"))
    }
}

/// Instantiate one `#[test]` per conformance check in a module named `$module`, for the
/// backend built by `$make` (an expression of type `impl Fn(u64) -> B`).
#[macro_export]
macro_rules! backstore_conformance {
    ($module:ident, $make:expr) => {
        mod $module {
            #[allow(unused_imports)]
            use super::*;
            $crate::backstore_conformance!(@tests $make;
                fresh_reads_zero, write_read_back, rejects_out_of_range, unmap_reads_zero,
                write_zeroes_both_modes, extents_cover_written, flush_succeeds,
                fua_write_readable, concurrent_writers, resize_grows_or_refuses);
        }
    };
    (@tests $make:expr; $($check:ident),+) => {
        $(
            #[test]
            fn $check() {
                if let Err(e) = $crate::conformance::$check(&$make) {
                    panic!("{}", e);
                }
            }
        )+
    };
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::cast_possible_truncation
)]
mod tests {
    use super::*;
    use crate::{FileBackend, FileOptions, RamBackend};
    use proptest::prelude::*;

    /// A file backend in a temporary directory; the directory is removed at once, the open
    /// file lives on until the backend is dropped.
    fn make_file(size: u64) -> FileBackend {
        let dir = tempfile::tempdir().unwrap();
        let opts = FileOptions {
            size: Some(size),
            create: true,
            read_only: false,
        };
        FileBackend::open(dir.path().join("lu.img"), opts).unwrap()
    }

    fn make_ram(size: u64) -> RamBackend {
        RamBackend::new(size).unwrap()
    }

    crate::backstore_conformance!(ram, super::make_ram);
    crate::backstore_conformance!(file, super::make_file);
    crate::backstore_conformance!(file_fallback, |size| super::make_file(size)
        .without_fast_paths());

    #[test]
    fn run_all_passes_for_ram() {
        run_all(&make_ram).unwrap();
    }

    /// A byte-vector model of a backstore.
    #[derive(Debug, Clone)]
    enum Op {
        Write {
            offset: u64,
            len: u64,
            seed: u8,
            fua: bool,
        },
        Unmap {
            offset: u64,
            len: u64,
        },
        WriteZeroes {
            offset: u64,
            len: u64,
            unmap: bool,
        },
        Read {
            offset: u64,
            len: u64,
        },
        Flush,
    }

    const PROP_SIZE: u64 = 1 << 20;

    /// Offsets mostly inside, sometimes just past the end, so range errors are exercised too.
    fn range() -> impl Strategy<Value = (u64, u64)> {
        (
            0..PROP_SIZE + 4096,
            prop_oneof![0..600u64, 0..70_000u64, 0..300_000u64],
        )
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (range(), any::<u8>(), any::<bool>())
                .prop_map(|((offset, len), seed, fua)| Op::Write { offset, len, seed, fua }),
            2 => range().prop_map(|(offset, len)| Op::Unmap { offset, len }),
            2 => (range(), any::<bool>())
                .prop_map(|((offset, len), unmap)| Op::WriteZeroes { offset, len, unmap }),
            3 => range().prop_map(|(offset, len)| Op::Read { offset, len }),
            1 => Just(Op::Flush),
        ]
    }

    fn in_model(model: &[u8], offset: u64, len: u64) -> Option<std::ops::Range<usize>> {
        let end = offset.checked_add(len)?;
        (end <= model.len() as u64).then_some(offset as usize..end as usize)
    }

    /// Apply `op` to `b`; returns the bytes read (for reads) or `None`, and whether it failed.
    fn apply<B: BlockBackend>(b: &B, op: &Op) -> (Option<Vec<u8>>, bool) {
        let r = match *op {
            Op::Write {
                offset,
                len,
                seed,
                fua,
            } => b
                .write(offset, &pattern(seed, len as usize), fua)
                .map(|()| None),
            Op::Unmap { offset, len } => b.unmap(offset, len).map(|()| None),
            Op::WriteZeroes { offset, len, unmap } => {
                b.write_zeroes(offset, len, unmap).map(|()| None)
            }
            Op::Read { offset, len } => b.read(offset, len as usize).map(|d| Some(d.to_vec())),
            Op::Flush => b.flush().map(|()| None),
        };
        match r {
            Ok(read) => (read, false),
            Err(BackstoreError::OutOfRange { .. }) => (None, true),
            Err(e) => panic!("{op:?}: {e}"),
        }
    }

    fn apply_model(model: &mut [u8], op: &Op) -> (Option<Vec<u8>>, bool) {
        let (offset, len) = match *op {
            Op::Flush => return (None, false),
            Op::Write { offset, len, .. }
            | Op::Unmap { offset, len }
            | Op::WriteZeroes { offset, len, .. }
            | Op::Read { offset, len } => (offset, len),
        };
        let Some(r) = in_model(model, offset, len) else {
            return (None, true);
        };
        match *op {
            Op::Write { seed, len, .. } => {
                model[r].copy_from_slice(&pattern(seed, len as usize));
                (None, false)
            }
            Op::Unmap { .. } | Op::WriteZeroes { .. } => {
                model[r].fill(0);
                (None, false)
            }
            Op::Read { .. } => (Some(model[r].to_vec()), false),
            Op::Flush => (None, false),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        /// RAM, file and a byte vector agree on every read and every range error.
        #[test]
        fn random_ops_agree_with_model(ops in prop::collection::vec(op(), 1..24)) {
            let ram = make_ram(PROP_SIZE);
            let file = make_file(PROP_SIZE);
            let mut model = vec![0u8; PROP_SIZE as usize];
            for (i, op) in ops.iter().enumerate() {
                let want = apply_model(&mut model, op);
                prop_assert_eq!(&apply(&ram, op), &want, "ram, op {} {:?}", i, op);
                prop_assert_eq!(&apply(&file, op), &want, "file, op {} {:?}", i, op);
            }
            prop_assert!(ram.read(0, PROP_SIZE as usize).unwrap()[..] == model[..]);
            prop_assert!(file.read(0, PROP_SIZE as usize).unwrap()[..] == model[..]);
        }
    }
}
