//! Recycled read buffers for large transfers.
//!
//! A fresh 1 MiB `Vec` per read costs a zero-fill and, above malloc's mmap threshold, 256 page
//! faults and an `munmap` when it is freed: measured at about a third of the daemon's CPU on
//! 1 MiB sequential reads. [`BufferPool::take`] hands out a buffer that returns to the pool
//! when the last `Bytes` referring to it is dropped, so steady-state reads allocate nothing and
//! touch no fresh pages. Small reads (below [`POOLED_MIN`]) are cheaper to allocate.

use bytes::Bytes;
use std::sync::{Arc, Mutex, PoisonError};

/// Reads shorter than this are plain allocations.
pub const POOLED_MIN: usize = 64 * 1024;
/// Largest buffer kept (bigger reads are plain allocations).
pub const POOLED_MAX: usize = 16 * 1024 * 1024;
/// Buffers kept per size class.
const PER_CLASS: usize = 64;
/// Size classes: powers of two from `POOLED_MIN` to `POOLED_MAX`.
const CLASSES: usize = (POOLED_MAX / POOLED_MIN).trailing_zeros() as usize + 1;

/// A pool of zero-initialised buffers in power-of-two size classes.
#[derive(Debug, Default)]
pub struct BufferPool {
    classes: [Mutex<Vec<Vec<u8>>>; CLASSES],
}

/// A length-limited view of a pooled buffer; gives the buffer back on drop.
struct Pooled {
    buf: Vec<u8>,
    len: usize,
    pool: Arc<BufferPool>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        self.buf.get(..self.len).unwrap_or(&[])
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        if let Some(slot) = class_of(buf.len()).and_then(|c| self.pool.classes.get(c)) {
            let mut free = slot.lock().unwrap_or_else(PoisonError::into_inner);
            if free.len() < PER_CLASS {
                free.push(buf);
            }
        }
    }
}

/// The class whose size is exactly `cap`, if `cap` is a pooled size.
fn class_of(cap: usize) -> Option<usize> {
    if cap.is_power_of_two() && (POOLED_MIN..=POOLED_MAX).contains(&cap) {
        Some((cap / POOLED_MIN).trailing_zeros() as usize)
    } else {
        None
    }
}

impl BufferPool {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Fill a buffer of exactly `len` bytes with `fill` and return it as `Bytes`. The buffer's
    /// previous contents are overwritten by `fill` (which must fill all of it or fail).
    pub fn read_with<E>(
        self: &Arc<Self>,
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Result<Bytes, E> {
        let cap = len.max(1).next_power_of_two();
        let Some(class) = class_of(cap) else {
            let mut v = vec![0u8; len];
            fill(&mut v)?;
            return Ok(Bytes::from(v));
        };
        let reused = self
            .classes
            .get(class)
            .and_then(|slot| slot.lock().unwrap_or_else(PoisonError::into_inner).pop());
        let mut buf = reused.unwrap_or_else(|| vec![0u8; cap]);
        match buf.get_mut(..len) {
            Some(dst) => fill(dst)?,
            None => {
                // Unreachable: every buffer in `class` is `cap >= len` bytes long.
                let mut v = vec![0u8; len];
                fill(&mut v)?;
                return Ok(Bytes::from(v));
            }
        }
        Ok(Bytes::from_owner(Pooled {
            buf,
            len,
            pool: self.clone(),
        }))
    }

    /// Buffers currently parked in the pool (for tests and metrics).
    pub fn parked(&self) -> usize {
        self.classes
            .iter()
            .map(|c| c.lock().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn large_buffers_come_back_and_are_reused() {
        let pool = BufferPool::new();
        let a = pool
            .read_with(1 << 20, |b| {
                b.fill(7);
                Ok::<_, ()>(())
            })
            .unwrap();
        assert_eq!(a.len(), 1 << 20);
        assert!(a.iter().all(|&x| x == 7));
        let slice = a.slice(10..20);
        drop(a);
        assert_eq!(pool.parked(), 0, "a slice still refers to the buffer");
        drop(slice);
        assert_eq!(pool.parked(), 1);
        let b = pool
            .read_with(700_000, |b| {
                b.fill(9);
                Ok::<_, ()>(())
            })
            .unwrap();
        assert_eq!(pool.parked(), 0, "reused from the 1 MiB class");
        assert_eq!(b.len(), 700_000);
        assert!(b.iter().all(|&x| x == 9));
    }

    #[test]
    fn small_and_huge_reads_are_not_pooled_and_errors_propagate() {
        let pool = BufferPool::new();
        let s = pool.read_with(4096, |_| Ok::<_, ()>(())).unwrap();
        drop(s);
        assert_eq!(pool.parked(), 0);
        let h = pool.read_with(POOLED_MAX + 1, |_| Ok::<_, ()>(())).unwrap();
        assert_eq!(h.len(), POOLED_MAX + 1);
        drop(h);
        assert_eq!(pool.parked(), 0);
        assert_eq!(pool.read_with(1 << 20, |_| Err::<(), _>("eio")), Err("eio"));
    }
}
