//! Recycled read buffers for large transfers.
//!
//! A fresh 1 MiB `Vec` per read costs a zero-fill and, above malloc's mmap threshold, 256 page
//! faults and an `munmap` when it is freed: measured at about a third of the daemon's CPU on
//! 1 MiB sequential reads. [`BufferPool::read_with`] hands out a buffer that returns to the pool
//! when the last `Bytes` referring to it is dropped, so steady-state reads allocate nothing and
//! touch no fresh pages. Small reads (below [`POOLED_MIN`]) are cheaper to allocate.
//!
//! What a pool keeps is bounded three ways, so that a burst of large reads (or Data-In the
//! initiator never collects) does not pin memory for good:
//!
//! - per size class, a number of buffers that shrinks as the class grows
//!   ([`retained_per_class`]: 64 of 64 KiB, 16 of 1 MiB, 2 of 4 or 8 MiB, 1 of 16 MiB);
//! - process-wide, the bytes parked in all pools together (every LU has its own pool) stay
//!   within [`retained_limit`] ([`DEFAULT_RETAINED_LIMIT`] unless the daemon calls
//!   [`set_retained_limit`]); a returning buffer that would pass it is freed;
//! - in time: a buffer parked for longer than [`IDLE_AFTER`] is freed. There is no timer
//!   thread. A pool drops its own stale buffers whenever a buffer comes back to it, and at most
//!   once per [`IDLE_AFTER`] a returning buffer also sweeps every other pool (an LU that went
//!   quiet), so stale buffers go as long as any LU reads. A process where no LU reads at all
//!   keeps at most the limit; [`trim_idle`] sweeps on demand (e.g. from a periodic task).
//!
//! The hot path adds a few uncontended atomic operations to a pooled read. The clock is read
//! on one return in [`CLOCK_EVERY`] (a clock read costs more than the rest of the pool's
//! work); the others reuse that reading. So a buffer's parking time may be early by a few
//! returns: under load that is microseconds, and after a quiet spell it only makes the first
//! buffers back look stale, and be freed, a little early.

use bytes::Bytes;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak};
use std::time::{Duration, Instant};

/// Reads shorter than this are plain allocations.
pub const POOLED_MIN: usize = 64 * 1024;
/// Largest buffer kept (bigger reads are plain allocations).
pub const POOLED_MAX: usize = 16 * 1024 * 1024;
/// Most buffers kept in one size class (the small classes).
const PER_CLASS_MAX: usize = 64;
/// Bytes one size class may keep, before the process-wide limit; decides the count of the
/// classes from 512 KiB up.
const CLASS_BYTES: usize = 16 * 1024 * 1024;
/// Classes from this size up keep at most [`LARGE_CLASS_MAX`] buffers.
const LARGE_CLASS: usize = 4 * 1024 * 1024;
const LARGE_CLASS_MAX: usize = 2;
/// Size classes: powers of two from `POOLED_MIN` to `POOLED_MAX`.
const CLASSES: usize = (POOLED_MAX / POOLED_MIN).trailing_zeros() as usize + 1;
/// Default of the process-wide limit on parked bytes ([`set_retained_limit`]).
pub const DEFAULT_RETAINED_LIMIT: usize = 32 * 1024 * 1024;
/// A buffer parked for this long is freed (lazily: see the module documentation).
pub const IDLE_AFTER: Duration = Duration::from_secs(5);
/// A pool reads the clock on one buffer return in this many.
pub const CLOCK_EVERY: u32 = 8;

/// Most buffers of `size` bytes one pool keeps: `CLASS_BYTES / size`, at least 1 and at most
/// 64, and at most 2 from 4 MiB up.
pub fn retained_per_class(size: usize) -> usize {
    let n = CLASS_BYTES
        .checked_div(size)
        .unwrap_or(0)
        .clamp(1, PER_CLASS_MAX);
    if size >= LARGE_CLASS {
        n.min(LARGE_CLASS_MAX)
    } else {
        n
    }
}

/// Bytes parked in a set of pools, against a limit. Every pool of the daemon shares
/// [`Budget::global`]; tests make their own.
#[derive(Debug)]
pub(crate) struct Budget {
    retained: AtomicUsize,
    limit: AtomicUsize,
}

impl Budget {
    pub(crate) fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            retained: AtomicUsize::new(0),
            limit: AtomicUsize::new(limit),
        })
    }

    fn global() -> &'static Arc<Self> {
        static GLOBAL: OnceLock<Arc<Budget>> = OnceLock::new();
        GLOBAL.get_or_init(|| Self::new(DEFAULT_RETAINED_LIMIT))
    }

    /// Count `size` more parked bytes if that stays within the limit.
    fn try_reserve(&self, size: usize) -> bool {
        let limit = self.limit.load(Ordering::Relaxed);
        self.retained
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| {
                r.checked_add(size).filter(|&n| n <= limit)
            })
            .is_ok()
    }

    /// Count `size` fewer parked bytes. Only bytes counted by `try_reserve` are released, so
    /// this never goes below zero; if it would (a bug), it stops at zero and says so.
    fn release(&self, size: usize) {
        let r = self
            .retained
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| r.checked_sub(size));
        if r.is_err() {
            tracing::error!(size, "buffer pool accounting would go below zero");
            self.retained.store(0, Ordering::Release);
        }
    }

    pub(crate) fn retained(&self) -> usize {
        self.retained.load(Ordering::Acquire)
    }
}

/// Set the process-wide limit on bytes parked in all buffer pools together (default
/// [`DEFAULT_RETAINED_LIMIT`]). Takes effect for buffers returned from now on; buffers already
/// parked above a lowered limit are freed as they are reused or go stale. 0 disables pooling.
pub fn set_retained_limit(bytes: usize) {
    Budget::global().limit.store(bytes, Ordering::Relaxed);
}

/// The process-wide limit on parked bytes.
pub fn retained_limit() -> usize {
    Budget::global().limit.load(Ordering::Relaxed)
}

/// Bytes parked in all buffer pools of the process (for metrics).
pub fn retained_bytes() -> usize {
    Budget::global().retained()
}

/// Free every buffer parked for longer than [`IDLE_AFTER`], in every pool of the process.
/// Cheap when there is nothing to free; safe to call from any thread at any time.
pub fn trim_idle() {
    sweep(Instant::now());
}

/// Every pool, so that a sweep reaches pools that see no traffic.
fn registry() -> &'static Mutex<Vec<Weak<BufferPool>>> {
    static POOLS: OnceLock<Mutex<Vec<Weak<BufferPool>>>> = OnceLock::new();
    POOLS.get_or_init(|| Mutex::new(Vec::new()))
}

/// Reference point of [`NEXT_SWEEP`].
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// When the next sweep of every pool is due, in nanoseconds since [`epoch`].
static NEXT_SWEEP: AtomicU64 = AtomicU64::new(0);

fn nanos_since_epoch(now: Instant) -> u64 {
    u64::try_from(now.saturating_duration_since(epoch()).as_nanos()).unwrap_or(u64::MAX)
}

/// Sweep every pool if a sweep is due; one caller wins each period.
fn sweep_if_due(now: Instant) {
    let t = nanos_since_epoch(now);
    let due = NEXT_SWEEP.load(Ordering::Relaxed);
    if t < due {
        return;
    }
    let next = t.saturating_add(u64::try_from(IDLE_AFTER.as_nanos()).unwrap_or(u64::MAX));
    if NEXT_SWEEP
        .compare_exchange(due, next, Ordering::Relaxed, Ordering::Relaxed)
        .is_ok()
    {
        sweep(now);
    }
}

fn sweep(now: Instant) {
    let pools: Vec<Arc<BufferPool>> = {
        let mut all = lock(registry());
        all.retain(|w| w.strong_count() > 0);
        all.iter().filter_map(Weak::upgrade).collect()
    };
    for pool in pools {
        pool.trim(now, false);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A parked buffer and when it came back.
#[derive(Debug)]
struct Parked {
    buf: Vec<u8>,
    since: Instant,
}

/// A pool of zero-initialised buffers in power-of-two size classes. See the module
/// documentation for what it keeps and for how long.
#[derive(Debug)]
pub struct BufferPool {
    /// Per class, the parked buffers, oldest first.
    classes: [Mutex<Vec<Parked>>; CLASSES],
    budget: Arc<Budget>,
    idle: Duration,
    /// Buffer returns counted, to read the clock on one in [`CLOCK_EVERY`].
    returns: AtomicU32,
    /// The last clock reading, in nanoseconds since [`epoch`].
    clock: AtomicU64,
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
        let now = self.pool.coarse_now();
        self.pool.put(buf, now);
        sweep_if_due(now);
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
    /// A pool that counts against the process-wide limit and frees buffers idle for
    /// [`IDLE_AFTER`].
    pub fn new() -> Arc<Self> {
        Self::with_budget(Arc::clone(Budget::global()), IDLE_AFTER)
    }

    /// A pool counting against `budget`, freeing buffers parked for `idle`.
    pub(crate) fn with_budget(budget: Arc<Budget>, idle: Duration) -> Arc<Self> {
        let pool = Arc::new(Self {
            classes: Default::default(),
            budget,
            idle,
            returns: AtomicU32::new(0),
            clock: AtomicU64::new(nanos_since_epoch(Instant::now())),
        });
        let mut all = lock(registry());
        all.retain(|w| w.strong_count() > 0);
        all.push(Arc::downgrade(&pool));
        pool
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
            .and_then(|slot| lock(slot).pop())
            .map(|p| {
                self.budget.release(p.buf.len());
                p.buf
            });
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

    /// The time, read from the clock on one call in [`CLOCK_EVERY`], else the last reading.
    fn coarse_now(&self) -> Instant {
        if self
            .returns
            .fetch_add(1, Ordering::Relaxed)
            .checked_rem(CLOCK_EVERY)
            == Some(0)
        {
            let now = Instant::now();
            self.clock.store(nanos_since_epoch(now), Ordering::Relaxed);
            return now;
        }
        let nanos = self.clock.load(Ordering::Relaxed);
        epoch()
            .checked_add(Duration::from_nanos(nanos))
            .unwrap_or_else(Instant::now)
    }

    /// Take back `buf` at `now`: drop this class's stale buffers, then park `buf` if its class
    /// and the budget have room (else free it).
    fn put(&self, buf: Vec<u8>, now: Instant) {
        let size = buf.len();
        let mut freed = Vec::new();
        if let Some(slot) = class_of(size).and_then(|c| self.classes.get(c)) {
            let mut parked = lock(slot);
            self.drain_stale(&mut parked, now, &mut freed);
            if parked.len() < retained_per_class(size) && self.budget.try_reserve(size) {
                parked.push(Parked { buf, since: now });
            } else {
                freed.push(buf);
            }
        }
        // The stale buffers (and `buf` if it was not kept) are freed here, outside the lock.
        drop(freed);
    }

    /// Move the buffers of `parked` that have been parked for at least `self.idle` at `now`
    /// into `freed`, releasing their bytes.
    fn drain_stale(&self, parked: &mut Vec<Parked>, now: Instant, freed: &mut Vec<Vec<u8>>) {
        let stale = parked
            .iter()
            .take_while(|p| now.saturating_duration_since(p.since) >= self.idle)
            .count();
        for p in parked.drain(..stale) {
            self.budget.release(p.buf.len());
            freed.push(p.buf);
        }
    }

    /// Free the buffers parked for at least the idle time at `now`. `wait`: block on a class
    /// in use rather than skip it.
    fn trim(&self, now: Instant, wait: bool) {
        for slot in &self.classes {
            let mut freed = Vec::new();
            let guard = if wait {
                Some(lock(slot))
            } else {
                match slot.try_lock() {
                    Ok(g) => Some(g),
                    Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
                    Err(std::sync::TryLockError::WouldBlock) => None,
                }
            };
            if let Some(mut parked) = guard {
                self.drain_stale(&mut parked, now, &mut freed);
            }
        }
    }

    /// Buffers currently parked in the pool (for tests and metrics).
    pub fn parked(&self) -> usize {
        self.classes.iter().map(|c| lock(c).len()).sum()
    }

    /// Bytes currently parked in the pool (for tests and metrics).
    pub fn parked_bytes(&self) -> usize {
        self.classes
            .iter()
            .map(|c| lock(c).iter().map(|p| p.buf.len()).sum::<usize>())
            .sum()
    }
}

impl Drop for BufferPool {
    /// The pool's parked buffers are freed with it: release their bytes from the budget.
    fn drop(&mut self) {
        for slot in &mut self.classes {
            let parked = slot.get_mut().unwrap_or_else(PoisonError::into_inner);
            for p in parked.drain(..) {
                self.budget.release(p.buf.len());
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MIB: usize = 1 << 20;

    /// A pool with a budget of its own (other tests' pools share the global one).
    fn pool(limit: usize) -> (Arc<BufferPool>, Arc<Budget>) {
        let budget = Budget::new(limit);
        let pool = BufferPool::with_budget(Arc::clone(&budget), Duration::from_secs(3600));
        (pool, budget)
    }

    fn read(pool: &Arc<BufferPool>, len: usize) -> Bytes {
        pool.read_with(len, |b| {
            b.fill(1);
            Ok::<_, ()>(())
        })
        .unwrap()
    }

    #[test]
    fn large_buffers_come_back_and_are_reused() {
        let (pool, budget) = pool(DEFAULT_RETAINED_LIMIT);
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
        assert_eq!(budget.retained(), MIB);
        let b = pool
            .read_with(700_000, |b| {
                b.fill(9);
                Ok::<_, ()>(())
            })
            .unwrap();
        assert_eq!(pool.parked(), 0, "reused from the 1 MiB class");
        assert_eq!(budget.retained(), 0);
        assert_eq!(b.len(), 700_000);
        assert!(b.iter().all(|&x| x == 9));
    }

    #[test]
    fn small_and_huge_reads_are_not_pooled_and_errors_propagate() {
        let (pool, budget) = pool(DEFAULT_RETAINED_LIMIT);
        let s = pool.read_with(4096, |_| Ok::<_, ()>(())).unwrap();
        drop(s);
        assert_eq!(pool.parked(), 0);
        let h = pool.read_with(POOLED_MAX + 1, |_| Ok::<_, ()>(())).unwrap();
        assert_eq!(h.len(), POOLED_MAX + 1);
        drop(h);
        assert_eq!(pool.parked(), 0);
        assert_eq!(pool.read_with(1 << 20, |_| Err::<(), _>("eio")), Err("eio"));
        // The failed read's buffer was freed, not parked.
        assert_eq!(budget.retained(), 0);
    }

    #[test]
    fn per_class_counts_shrink_with_size() {
        assert_eq!(retained_per_class(64 << 10), 64);
        assert_eq!(retained_per_class(MIB), 16);
        assert_eq!(retained_per_class(4 * MIB), 2);
        assert_eq!(retained_per_class(8 * MIB), 2);
        assert_eq!(retained_per_class(16 * MIB), 1);
    }

    #[test]
    fn a_burst_of_large_reads_keeps_at_most_the_limit() {
        // The finding: 64 reads of 8 MiB left unread, then returned, were all kept (512 MiB).
        let (pool, budget) = pool(32 * MIB);
        let burst: Vec<Bytes> = (0..64).map(|_| read(&pool, 8 * MIB)).collect();
        assert_eq!(budget.retained(), 0, "nothing is parked while in use");
        drop(burst);
        assert_eq!(pool.parked(), retained_per_class(8 * MIB));
        assert!(pool.parked_bytes() <= 16 * MIB);
        assert_eq!(budget.retained(), pool.parked_bytes());

        // Many 1 MiB reads: the class allows 16, the budget allows 32 MiB − the 16 MiB above.
        let burst: Vec<Bytes> = (0..100).map(|_| read(&pool, MIB)).collect();
        drop(burst);
        assert!(budget.retained() <= 32 * MIB);
        assert_eq!(budget.retained(), pool.parked_bytes());
        assert_eq!(pool.parked(), 2 + 16);
    }

    #[test]
    fn the_limit_is_shared_by_every_pool_of_a_budget() {
        let budget = Budget::new(4 * MIB);
        let pools: Vec<_> = (0..8)
            .map(|_| BufferPool::with_budget(Arc::clone(&budget), Duration::from_secs(3600)))
            .collect();
        let held: Vec<Bytes> = pools
            .iter()
            .flat_map(|p| (0..4).map(|_| read(p, MIB)).collect::<Vec<_>>())
            .collect();
        drop(held);
        assert_eq!(budget.retained(), 4 * MIB);
        let parked: usize = pools.iter().map(|p| p.parked_bytes()).sum();
        assert_eq!(parked, 4 * MIB);
        // A pool dropped with parked buffers gives their bytes back.
        drop(pools);
        assert_eq!(budget.retained(), 0);
    }

    #[test]
    fn a_zero_limit_disables_pooling() {
        let (pool, budget) = pool(0);
        drop(read(&pool, MIB));
        assert_eq!(pool.parked(), 0);
        assert_eq!(budget.retained(), 0);
    }

    #[test]
    fn idle_buffers_are_freed() {
        let budget = Budget::new(64 * MIB);
        let idle = Duration::from_secs(5);
        let pool = BufferPool::with_budget(Arc::clone(&budget), idle);
        let t0 = Instant::now();
        // A burst returned at t0.
        let burst: Vec<Bytes> = (0..16).map(|_| read(&pool, MIB)).collect();
        drop(burst);
        assert_eq!(pool.parked(), 16);
        // Nothing is stale yet.
        pool.trim(t0 + Duration::from_secs(1), true);
        assert_eq!(pool.parked(), 16);
        // A sweep after the idle time frees them all.
        pool.trim(t0 + idle + Duration::from_secs(1), true);
        assert_eq!(pool.parked(), 0);
        assert_eq!(budget.retained(), 0);
    }

    #[test]
    fn a_returning_buffer_frees_the_stale_ones_of_its_class() {
        let budget = Budget::new(64 * MIB);
        let idle = Duration::from_secs(5);
        let pool = BufferPool::with_budget(Arc::clone(&budget), idle);
        let t0 = Instant::now();
        for _ in 0..8 {
            pool.put(vec![0u8; MIB], t0);
        }
        pool.put(vec![0u8; 2 * MIB], t0);
        assert_eq!(budget.retained(), 10 * MIB);
        // Traffic resumes at QD1 much later: the first buffer back frees the old burst of its
        // class; the other class goes at the next sweep.
        let later = t0 + idle * 3;
        pool.put(vec![0u8; MIB], later);
        assert_eq!(pool.parked(), 2);
        assert_eq!(budget.retained(), 3 * MIB);
        pool.trim(later, true);
        assert_eq!(pool.parked(), 1);
        assert_eq!(budget.retained(), MIB);
    }

    #[test]
    fn a_sweep_reaches_quiet_pools() {
        let budget = Budget::new(64 * MIB);
        let quiet = BufferPool::with_budget(Arc::clone(&budget), Duration::ZERO);
        drop(read(&quiet, MIB));
        // Zero idle time: anything parked is stale; any sweep frees it.
        sweep(Instant::now() + Duration::from_millis(1));
        assert_eq!(quiet.parked(), 0);
        assert_eq!(budget.retained(), 0);
    }

    #[derive(Debug, Clone)]
    enum Step {
        Take(usize),
        Drop(usize),
        Trim(u64),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            3 => prop_oneof![1usize..70_000, 60_000usize..3 * MIB, Just(8 * MIB)]
                .prop_map(Step::Take),
            3 => any::<usize>().prop_map(Step::Drop),
            1 => (0u64..20).prop_map(Step::Trim),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// Whatever the order of takes, returns and sweeps: the budget's count equals the bytes
        /// parked, never passes the limit, and returns to zero when the pool goes.
        #[test]
        fn accounting_matches_what_is_parked(
            steps in prop::collection::vec(step(), 1..60),
            limit in prop_oneof![Just(0usize), Just(3 * MIB), Just(32 * MIB)],
        ) {
            let budget = Budget::new(limit);
            let pool = BufferPool::with_budget(Arc::clone(&budget), Duration::from_secs(5));
            let t0 = Instant::now();
            let mut held: Vec<Bytes> = Vec::new();
            for s in steps {
                match s {
                    Step::Take(len) => {
                        // Bound the memory a case holds.
                        if held.len() >= 6 {
                            drop(held.remove(0));
                        }
                        held.push(read(&pool, len));
                    }
                    Step::Drop(i) if !held.is_empty() => {
                        let i = i % held.len();
                        drop(held.swap_remove(i));
                    }
                    Step::Drop(_) => {}
                    Step::Trim(secs) => pool.trim(t0 + Duration::from_secs(secs), true),
                }
                prop_assert_eq!(budget.retained(), pool.parked_bytes());
                prop_assert!(budget.retained() <= limit);
            }
            drop(held);
            prop_assert_eq!(budget.retained(), pool.parked_bytes());
            drop(pool);
            prop_assert_eq!(budget.retained(), 0);
        }
    }
}
