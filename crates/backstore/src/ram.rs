//! RAM backstore.
//!
//! Storage is sparse: the byte range is cut into [`CHUNK_SIZE`] chunks, and a chunk is allocated
//! (zero-filled) the first time a write touches it, so a large RAM LU costs nothing until written.
//! Chunks live in [`SHARDS`] independently locked maps, so writers to different chunks rarely
//! contend. `unmap` and `write_zeroes` drop every chunk they cover completely and zero the partly
//! covered ones in place; an absent chunk reads as zeroes and is reported deallocated by
//! `extents` (SBC-3 §4.7.3, "deallocated" state).
//!
//! Nothing here is durable: `flush` and FUA writes succeed trivially, as the data never outlives
//! the process anyway.

use std::collections::btree_map::{BTreeMap, Entry};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use bytes::Bytes;

use crate::buffers::BufferPool;
use crate::{check_range, BackstoreError, BlockBackend, Extent, Result, MAX_SIZE};

/// Allocation unit of the RAM backstore, in bytes (also the granularity of `extents`).
pub const CHUNK_SIZE: usize = 64 * 1024;
/// [`CHUNK_SIZE`] as a byte offset.
const CHUNK: u64 = 64 * 1024;
/// Number of independently locked chunk maps.
pub const SHARDS: usize = 16;
/// Most chunks inspected by one `extents` call; the answer stops early past that.
const MAX_EXTENT_CHUNKS: u64 = 1 << 16;

type Chunk = Box<[u8]>;
type Shard = BTreeMap<u64, Chunk>;

/// A sparse in-memory block store. See the module documentation.
#[derive(Debug)]
pub struct RamBackend {
    /// Size in bytes (grows with [`BlockBackend::resize`]).
    size: AtomicU64,
    /// Most chunks that may be resident at once, if bounded.
    max_chunks: Option<u64>,
    resident: AtomicU64,
    shards: [RwLock<Shard>; SHARDS],
    /// Recycled buffers for large reads (see [`crate::buffers`]).
    buffers: Arc<BufferPool>,
}

/// One chunk-local piece of a byte range.
#[derive(Debug, Clone, Copy)]
struct Piece {
    index: u64,
    /// Offset within the chunk, `< CHUNK_SIZE`.
    start: usize,
    /// Length, `1..=CHUNK_SIZE - start`.
    len: usize,
}

impl Piece {
    fn whole(&self) -> bool {
        self.len == CHUNK_SIZE
    }
}

/// Cut `offset..offset + len` into chunk-local pieces. The caller has range-checked it.
fn pieces(offset: u64, len: u64) -> impl Iterator<Item = Piece> {
    let mut pos = offset;
    let mut left = len;
    std::iter::from_fn(move || {
        if left == 0 {
            return None;
        }
        let within = pos % CHUNK;
        let n = left.min(CHUNK - within);
        let piece = Piece {
            index: pos / CHUNK,
            start: small(within),
            len: small(n),
        };
        pos = pos.saturating_add(n);
        left -= n;
        Some(piece)
    })
}

/// Convert a value known to be `<= CHUNK_SIZE` to `usize`.
fn small(x: u64) -> usize {
    usize::try_from(x.min(CHUNK)).unwrap_or(CHUNK_SIZE)
}

/// Byte count of a buffer as a `u64` (lossless on every supported target).
fn len64(len: usize) -> u64 {
    u64::try_from(len).unwrap_or(u64::MAX)
}

impl RamBackend {
    /// A RAM backstore of `size` bytes, all deallocated. Fails only for sizes past [`MAX_SIZE`].
    pub fn new(size: u64) -> Result<Self> {
        Self::build(size, None)
    }

    /// Like [`RamBackend::new`], but writes that would make more than `max_resident` bytes
    /// resident fail with [`BackstoreError::NoSpace`] (a thin-provisioning soft limit). Such a
    /// write may have landed in part: the chunks before the first refused one are written.
    pub fn with_limit(size: u64, max_resident: u64) -> Result<Self> {
        Self::build(size, Some(max_resident / CHUNK))
    }

    fn build(size: u64, max_chunks: Option<u64>) -> Result<Self> {
        if size > MAX_SIZE {
            return Err(BackstoreError::OutOfRange {
                offset: 0,
                len: size,
                size: MAX_SIZE,
            });
        }
        let shards = std::array::from_fn(|_| RwLock::new(BTreeMap::new()));
        Ok(Self {
            size: AtomicU64::new(size),
            max_chunks,
            resident: AtomicU64::new(0),
            shards,
            buffers: BufferPool::new(),
        })
    }

    /// Bytes currently held in memory.
    pub fn resident_bytes(&self) -> u64 {
        self.resident.load(Ordering::Relaxed).saturating_mul(CHUNK)
    }

    fn shard_of(&self, index: u64) -> &RwLock<Shard> {
        // The remainder is below `SHARDS`, so `get` always succeeds; the fallback is never taken.
        let slot = usize::try_from(index % len64(SHARDS)).unwrap_or(0);
        let [first, ..] = &self.shards;
        self.shards.get(slot).unwrap_or(first)
    }

    fn read_shard(&self, index: u64) -> RwLockReadGuard<'_, Shard> {
        // A panic while holding the lock can at worst leave torn bytes in a chunk; keep serving.
        self.shard_of(index)
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn write_shard(&self, index: u64) -> RwLockWriteGuard<'_, Shard> {
        self.shard_of(index)
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Reserve one more resident chunk against the limit.
    fn reserve_chunk(&self, offset: u64) -> Result<()> {
        let Some(max) = self.max_chunks else {
            self.resident.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        };
        self.resident
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .map(|_| ())
            .map_err(|_| BackstoreError::NoSpace {
                op: "write",
                offset,
            })
    }

    fn release_chunks(&self, n: u64) {
        self.resident.fetch_sub(n, Ordering::Relaxed);
    }

    /// Zero or drop every chunk in a checked range.
    fn zero_range(&self, offset: u64, len: u64) {
        for piece in pieces(offset, len) {
            let mut shard = self.write_shard(piece.index);
            if piece.whole() {
                if shard.remove(&piece.index).is_some() {
                    self.release_chunks(1);
                }
            } else if let Some(dst) = shard
                .get_mut(&piece.index)
                .and_then(|chunk| chunk.get_mut(piece.start..piece.start + piece.len))
            {
                dst.fill(0);
            }
        }
    }
}

impl BlockBackend for RamBackend {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    /// Chunks past the old size were never written (writes are range-checked), so the new
    /// range reads as zeroes without touching memory.
    fn resize(&self, new_size: u64) -> Result<()> {
        if crate::check_resize(self.size(), new_size)? {
            self.size.store(new_size, Ordering::Relaxed);
        }
        Ok(())
    }

    fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        check_range(offset, len64(len), self.size())?;
        self.buffers.read_with(len, |out| {
            let mut rest: &mut [u8] = out;
            for piece in pieces(offset, len64(len)) {
                let (dst, tail) = rest.split_at_mut(piece.len.min(rest.len()));
                let shard = self.read_shard(piece.index);
                match shard
                    .get(&piece.index)
                    .and_then(|c| c.get(piece.start..piece.start + piece.len))
                {
                    Some(src) => dst.copy_from_slice(src),
                    // Deallocated: reads as zeroes (the buffer may be a recycled one).
                    None => dst.fill(0),
                }
                rest = tail;
            }
            Ok(())
        })
    }

    fn write(&self, offset: u64, data: &[u8], _fua: bool) -> Result<()> {
        check_range(offset, len64(data.len()), self.size())?;
        let mut rest = data;
        for piece in pieces(offset, len64(data.len())) {
            let (src, tail) = rest.split_at(piece.len.min(rest.len()));
            let mut shard = self.write_shard(piece.index);
            let chunk = match shard.entry(piece.index) {
                Entry::Occupied(e) => e.into_mut(),
                Entry::Vacant(e) => {
                    self.reserve_chunk(piece.index.saturating_mul(CHUNK))?;
                    e.insert(vec![0u8; CHUNK_SIZE].into_boxed_slice())
                }
            };
            if let Some(dst) = chunk.get_mut(piece.start..piece.start + piece.len) {
                dst.copy_from_slice(src);
            }
            rest = tail;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    /// Zeroes the range; whole chunks are dropped whatever `unmap` says, as an absent chunk is
    /// indistinguishable from a zeroed one except through `extents`.
    fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> Result<()> {
        check_range(offset, len, self.size())?;
        self.zero_range(offset, len);
        Ok(())
    }

    fn unmap(&self, offset: u64, len: u64) -> Result<()> {
        check_range(offset, len, self.size())?;
        self.zero_range(offset, len);
        Ok(())
    }

    /// Unmapped chunks are freed.
    fn thin_provisioning(&self) -> bool {
        true
    }

    /// Reports chunk presence; the answer stops after `MAX_EXTENT_CHUNKS` chunks.
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(offset, len, self.size())?;
        let mut out: Vec<Extent> = Vec::new();
        for piece in pieces(offset, len).take(small_count(MAX_EXTENT_CHUNKS)) {
            let mapped = self.read_shard(piece.index).contains_key(&piece.index);
            let at = piece
                .index
                .saturating_mul(CHUNK)
                .saturating_add(len64(piece.start));
            match out.last_mut() {
                Some(last) if last.mapped == mapped => last.len += len64(piece.len),
                _ => out.push(Extent {
                    offset: at,
                    len: len64(piece.len),
                    mapped,
                }),
            }
        }
        Ok(out)
    }
}

fn small_count(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn accepts_large_sparse_size_without_allocating() {
        let ram = RamBackend::new(1 << 40).unwrap();
        assert_eq!(ram.size(), 1 << 40);
        assert_eq!(ram.resident_bytes(), 0);
        assert!(ram
            .read((1 << 40) - 4096, 4096)
            .unwrap()
            .iter()
            .all(|&b| b == 0));
        assert_eq!(ram.resident_bytes(), 0);
    }

    #[test]
    fn rejects_size_past_max() {
        assert!(matches!(
            RamBackend::new(MAX_SIZE + 1),
            Err(BackstoreError::OutOfRange { .. })
        ));
    }

    #[test]
    fn write_allocates_only_touched_chunks() {
        let ram = RamBackend::new(1 << 30).unwrap();
        ram.write(CHUNK - 1, &[1, 2], false).unwrap();
        assert_eq!(ram.resident_bytes(), 2 * CHUNK);
        ram.unmap(0, 2 * CHUNK).unwrap();
        assert_eq!(ram.resident_bytes(), 0);
    }

    #[test]
    fn partial_unmap_zeroes_in_place() {
        let ram = RamBackend::new(4 * CHUNK).unwrap();
        ram.write(0, &[7u8; 100], false).unwrap();
        ram.unmap(10, 20).unwrap();
        let got = ram.read(0, 100).unwrap();
        assert!(got[..10].iter().all(|&b| b == 7));
        assert!(got[10..30].iter().all(|&b| b == 0));
        assert!(got[30..].iter().all(|&b| b == 7));
        assert_eq!(ram.resident_bytes(), CHUNK);
    }

    #[test]
    fn rejects_write_past_limit() {
        let ram = RamBackend::with_limit(1 << 20, CHUNK).unwrap();
        ram.write(0, &[1], false).unwrap();
        ram.write(5, &[1], false).unwrap();
        assert!(matches!(
            ram.write(CHUNK, &[1], false),
            Err(BackstoreError::NoSpace { .. })
        ));
        ram.unmap(0, CHUNK).unwrap();
        ram.write(CHUNK, &[1], false).unwrap();
    }

    #[test]
    fn extents_coalesce_and_start_at_offset() {
        let ram = RamBackend::new(8 * CHUNK).unwrap();
        ram.write(2 * CHUNK, &[1u8; 2 * CHUNK_SIZE], false).unwrap();
        let ext = ram.extents(100, 8 * CHUNK - 100).unwrap();
        assert_eq!(
            ext,
            vec![
                Extent {
                    offset: 100,
                    len: 2 * CHUNK - 100,
                    mapped: false
                },
                Extent {
                    offset: 2 * CHUNK,
                    len: 2 * CHUNK,
                    mapped: true
                },
                Extent {
                    offset: 4 * CHUNK,
                    len: 4 * CHUNK,
                    mapped: false
                },
            ]
        );
    }

    #[test]
    fn pieces_table() {
        type Row = (u64, u64, &'static [(u64, usize, usize)]);
        let table: &[Row] = &[
            (0, 0, &[]),
            (0, 1, &[(0, 0, 1)]),
            (CHUNK - 1, 2, &[(0, CHUNK_SIZE - 1, 1), (1, 0, 1)]),
            (CHUNK, CHUNK, &[(1, 0, CHUNK_SIZE)]),
            (
                5,
                2 * CHUNK,
                &[(0, 5, CHUNK_SIZE - 5), (1, 0, CHUNK_SIZE), (2, 0, 5)],
            ),
        ];
        for &(offset, len, want) in table {
            let got: Vec<_> = pieces(offset, len)
                .map(|p| (p.index, p.start, p.len))
                .collect();
            assert_eq!(got, want, "offset {offset} len {len}");
        }
    }
}
