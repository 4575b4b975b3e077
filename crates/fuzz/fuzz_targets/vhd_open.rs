//! VHD images (crate `backstore`, `vhd`; semantics.md §4) from arbitrary bytes held in a
//! `MemStore`:
//! - `vhd::check::check_store` never panics;
//! - `VhdBackend::open_store` never panics; when it accepts the image, a few bounded reads,
//!   an `extents` call, writes (allocating blocks of a dynamic disk), a `write_zeroes`, an
//!   `unmap` and a flush never panic;
//! - an image whose writes all succeeded opens again, serves what was written, and, if the
//!   checker found no error in the input, the checker finds none in the result either.
//!
//! I/O per input is bounded: reads and writes of at most 8 KiB, `extents` over at most 64
//! blocks, and no writes to dynamic disks whose blocks exceed 1 MiB (each allocation
//! appends a whole block to the store).
#![no_main]

use ironlun_backstore::vhd::{check::check_store, DiskType, MemStore, VhdBackend};
use ironlun_backstore::BlockBackend;
use libfuzzer_sys::fuzz_target;

/// Largest read or write per call.
const MAX_IO: u64 = 8 << 10;
/// Largest block size of a dynamic disk the target writes to.
const MAX_WRITE_BLOCK: u64 = 1 << 20;

/// FNV-1a of the input: offsets vary with the image without costing input bytes.
fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn pattern(seed: u64, len: u64) -> Vec<u8> {
    (0..len)
        .map(|i| (seed.wrapping_add(i).wrapping_mul(31) >> 3) as u8 | 1)
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let checked = check_store(&MemStore::new(data.to_vec()));
    let Ok(vhd) = VhdBackend::open_store(MemStore::new(data.to_vec()), false) else {
        return;
    };
    let size = vhd.size();
    if size == 0 {
        return;
    }
    let info = vhd.info();
    let block = info
        .header
        .as_ref()
        .map_or(MAX_IO, |h| u64::from(h.block_size));
    let h = fnv(data);
    let at = |k: u64| h.rotate_left((k * 13) as u32) % size;
    let io_len = |offset: u64, k: u64| (size - offset).min(1 + (h >> (k * 7)) % MAX_IO);

    // Reads: the start, the end, and somewhere in between.
    let _ = vhd.read(0, io_len(0, 0) as usize);
    let tail = size.saturating_sub(MAX_IO);
    let _ = vhd.read(tail, (size - tail) as usize);
    let r = at(1);
    let _ = vhd.read(r, io_len(r, 1) as usize);
    let e = at(2);
    let _ = vhd.extents(e, (size - e).min(block.saturating_mul(64)));

    if info.disk_type == DiskType::Dynamic && block > MAX_WRITE_BLOCK {
        return;
    }
    // Writes: one at an aligned offset, one anywhere (possibly across blocks), then zeroing.
    let w1 = at(3) / 512 * 512;
    let d1 = pattern(h, io_len(w1, 2));
    let w2 = at(4);
    let d2 = pattern(h >> 1, io_len(w2, 3));
    let z = at(5);
    let zlen = io_len(z, 4);
    let u = at(6);
    let ulen = io_len(u, 5);
    let wrote = vhd.write(w1, &d1, false).is_ok()
        && vhd.write(w2, &d2, true).is_ok()
        && vhd.write_zeroes(z, zlen, false).is_ok()
        && vhd.unmap(u, ulen).is_ok()
        && vhd.flush().is_ok();
    if !wrote {
        return;
    }
    // What the written ranges must read: d2 over d1 where they overlap, then the zeroed ones.
    let expect = |offset: u64, len: u64| -> Vec<u8> {
        (offset..offset + len)
            .map(|p| {
                let inside = |start: u64, n: u64| p >= start && p - start < n;
                if inside(u, ulen) || inside(z, zlen) {
                    0
                } else if inside(w2, d2.len() as u64) {
                    d2[(p - w2) as usize]
                } else if inside(w1, d1.len() as u64) {
                    d1[(p - w1) as usize]
                } else {
                    unreachable!()
                }
            })
            .collect()
    };
    let bytes = vhd.store().bytes();
    let again = VhdBackend::open_store(MemStore::new(bytes.clone()), true)
        .expect("an image this backend wrote opens again");
    assert_eq!(again.size(), size, "size changed by writing");
    for (offset, len) in [
        (w1, d1.len() as u64),
        (w2, d2.len() as u64),
        (z, zlen),
        (u, ulen),
    ] {
        let got = again.read(offset, len as usize).expect("read after reopen");
        assert!(
            got[..] == expect(offset, len)[..],
            "reopened image reads back other data at {offset}+{len}"
        );
    }
    if checked.is_ok_and(|r| r.errors.is_empty()) {
        let after = check_store(&MemStore::new(bytes)).expect("check of an in-memory image");
        assert!(
            after.errors.is_empty(),
            "check found errors after writing a clean image: {:?}",
            after.errors
        );
    }
});
