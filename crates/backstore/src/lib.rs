//! The `BlockBackend` contract and the RAM, file, block-device and Ceph RBD backstores.
//!
//! Backends are byte-addressed. Synchronous backends run on the daemon's bounded blocking pool;
//! asynchronous ones ([`BlockBackend::is_async`], e.g. [`UringBackend`]) complete an
//! [`IoFuture`] from their own thread. Offsets and lengths are checked here too
//! (`checked_add`), whatever the caller checked.

pub mod blockdev;
pub mod buffers;
pub mod file;
pub mod ram;
pub mod rbd;
pub mod uring;
pub mod vhd;

pub use blockdev::{BlockDevBackend, BlockDevOptions};
pub use file::{FileBackend, FileOptions};
pub use ram::RamBackend;
pub use rbd::{rbd_available, RbdBackend, RbdOptions};
pub use uring::{io_uring_available, UringBackend, UringOptions};
#[cfg(any(test, feature = "conformance"))]
pub mod conformance;

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Wake, Waker};

use bytes::Bytes;

/// Errors of a backstore; the daemon maps them into sense data in one `From`.
#[derive(Debug, thiserror::Error)]
pub enum BackstoreError {
    #[error("range {offset}+{len} is outside the {size}-byte backstore")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("{op} at {offset}: {source}")]
    Io {
        op: &'static str,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("no space left for {op} at {offset}")]
    NoSpace { op: &'static str, offset: u64 },
    /// The storage refused this client because another one took the medium over and fenced
    /// this one off ([`BlockBackend::take_exclusive`]; RBD: blocklisted or lock lost). Nothing
    /// this client sends reaches the medium any more.
    #[error("{op} at {offset}: fenced by the storage, another client holds the medium ({source})")]
    Fenced {
        op: &'static str,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is not supported by this backstore")]
    Unsupported(&'static str),
    /// A modifying operation on a read-only backstore (SBC-3 §4.13: DATA PROTECT, WRITE PROTECTED).
    #[error("{op} refused: the backstore is read-only")]
    ReadOnly { op: &'static str },
    /// [`BlockBackend::resize`] to a smaller size: the data past it would be lost.
    #[error(
        "cannot shrink the backstore from {size} to {new_size} bytes (only growing is supported)"
    )]
    Shrink { size: u64, new_size: u64 },
}

pub type Result<T> = std::result::Result<T, BackstoreError>;

/// Largest backstore size accepted by the constructors: byte offsets must fit an `off_t`.
pub const MAX_SIZE: u64 = u64::MAX >> 1;

/// Check that `offset..offset + len` lies within `size` bytes; returns the exclusive end.
///
/// A zero-length range is valid anywhere up to and including `size`.
pub fn check_range(offset: u64, len: u64, size: u64) -> Result<u64> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(end),
        _ => Err(BackstoreError::OutOfRange { offset, len, size }),
    }
}

/// The checks every [`BlockBackend::resize`] starts with: `Ok(false)` for the same size,
/// `Ok(true)` to grow, an error to shrink or to pass [`MAX_SIZE`].
pub fn check_resize(size: u64, new_size: u64) -> Result<bool> {
    if new_size < size {
        return Err(BackstoreError::Shrink { size, new_size });
    }
    check_range(0, new_size, MAX_SIZE)?;
    Ok(new_size > size)
}

/// A run of the backstore that is either mapped (holds data) or deallocated (reads as zeroes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
    pub mapped: bool,
}

/// Block storage behind a logical unit.
///
/// Contract: after `write(.., fua = true)` returns, or after `flush` returns, the written data
/// survives a crash of the process (and, for file backstores, of the machine). `unmap` and
/// `write_zeroes` leave the range reading as zeroes.
pub trait BlockBackend: Send + Sync + 'static {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Read exactly `len` bytes at `offset`.
    fn read(&self, offset: u64, len: usize) -> Result<Bytes>;
    /// Write all of `data` at `offset`; `fua`: durable before returning.
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()>;
    /// Make every completed write durable.
    fn flush(&self) -> Result<()>;
    /// Zero a range; `unmap`: deallocate it where the backstore can.
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()>;
    /// Deallocate a range (reads as zeroes afterwards).
    fn unmap(&self, offset: u64, len: u64) -> Result<()>;
    /// Mapped/deallocated runs from `offset` covering at least the first byte, at most `len`.
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>>;

    /// Whether `unmap` really deallocates (thin provisioning, SBC-3 §4.7): the LU then reports
    /// LBPME/LBPRZ in READ CAPACITY (16) and LBPU/LBPWS/LBPWS10 in VPD B2h, and GET LBA STATUS
    /// asks [`extents`](Self::extents). `false` (the default): the backstore is fully
    /// provisioned; `unmap` and `write_zeroes` still leave zeroes behind.
    fn thin_provisioning(&self) -> bool {
        false
    }

    /// Grow the backstore to `new_size` bytes (online resize; the LU then reports CAPACITY
    /// DATA HAS CHANGED, 2Ah/09h, to its nexuses). Existing data is unchanged and the new range
    /// reads as zeroes; afterwards [`size`](Self::size) returns `new_size`. The same size is a
    /// no-op; a smaller one fails with [`BackstoreError::Shrink`]. Must not run concurrently with
    /// another `resize` of the same backstore (the daemon serialises them); I/O may run
    /// meanwhile, checked against the old or the new size. Default:
    /// [`BackstoreError::Unsupported`].
    fn resize(&self, new_size: u64) -> Result<()> {
        let _ = new_size;
        Err(BackstoreError::Unsupported("resize"))
    }

    /// The storage-side fence: make this client the medium's only writer, fencing off any
    /// previous one so that none of its later writes reaches the medium (they fail with
    /// [`BackstoreError::Fenced`] there). Called when this daemon becomes the active gateway
    /// for the LU (cluster mode) and when it opens the LU on one node. Blocks for network
    /// round trips; returns once the fence is up. Idempotent. Default: `Ok(())`, no fence (a
    /// local file or block device has none; cluster mode then relies on timing alone).
    fn take_exclusive(&self) -> Result<()> {
        Ok(())
    }
    /// Give the fence up (this daemon is no longer the LU's active gateway): from now on
    /// [`holds_exclusive`](Self::holds_exclusive) is `false`, and once this returns the next
    /// holder can take the fence without fencing this client off, every write of this client
    /// having completed. Blocks for network round trips. Default: `Ok(())`.
    fn release_exclusive(&self) -> Result<()> {
        Ok(())
    }
    /// Whether the fence [`take_exclusive`](Self::take_exclusive) took is still this
    /// client's, as last seen (no round trip): `false` before it was taken and once the
    /// storage answered [`BackstoreError::Fenced`]. A gateway serves media access as the
    /// active one only while this holds. Default: `true` (no fence to hold).
    fn holds_exclusive(&self) -> bool {
        true
    }

    /// Whether the `*_async` methods complete from the backend's own thread without blocking
    /// the caller. When `true` the daemon `.await`s them on its async workers; when `false` it
    /// calls the synchronous methods on its blocking pool (the defaults below would block).
    fn is_async(&self) -> bool {
        false
    }
    /// [`read`](Self::read), as a future. Never blocks the caller. The request is under way
    /// once this returns, unless the backend is saturated: then it waits, without a thread,
    /// until the future is polled and the backend has room ([`IoFuture`]). Dropping the future
    /// of a request under way discards the result, never the I/O's buffer (DESIGN.md §3 rule
    /// 6); dropping it while the request still waits cancels the request. The default runs
    /// `read` inline and returns a ready future.
    fn read_async(&self, offset: u64, len: usize) -> IoFuture<Bytes> {
        IoFuture::ready(self.read(offset, len))
    }
    /// [`write`](Self::write), as a future, under way or waiting as for
    /// [`read_async`](Self::read_async); `data` is owned by the request until it completes, so
    /// the write of a future dropped while under way may still land (one dropped while waiting
    /// does not). Durability as for `write` once it resolves.
    fn write_async(&self, offset: u64, data: Bytes, fua: bool) -> IoFuture<()> {
        IoFuture::ready(self.write(offset, &data, fua))
    }
    /// [`flush`](Self::flush), as a future (under way or waiting as for
    /// [`read_async`](Self::read_async)): on `Ok`, every write completed before this call was
    /// made is durable.
    fn flush_async(&self) -> IoFuture<()> {
        IoFuture::ready(self.flush())
    }
}

/// The state shared by an [`IoFuture`] and its [`IoCompleter`].
struct Pending<T> {
    result: Option<Result<T>>,
    waker: Option<Waker>,
}

type SharedPending<T> = Arc<Mutex<Pending<T>>>;

fn lock<T>(shared: &Mutex<Pending<T>>) -> std::sync::MutexGuard<'_, Pending<T>> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

fn lost(op: &'static str, what: &str) -> BackstoreError {
    BackstoreError::Io {
        op,
        offset: 0,
        source: std::io::Error::other(what.to_owned()),
    }
}

/// The result of one backstore operation, delivered once, possibly from another thread.
///
/// A std-only future (no runtime): `.await` it from any executor, or block on it with
/// [`wait`](Self::wait). Dropping it before completion is safe and discards the result; the
/// operation itself keeps its buffers until it completes. If the completing side goes away
/// without a result, the future resolves to a [`BackstoreError::Io`].
///
/// Back-pressure: a future made with [`submitting`](Self::submitting) first hands its request
/// to the backend, from `poll`, when the backend has room; until then it waits like any
/// pending future (its waker is woken when room frees up) and occupies no thread. Dropped
/// while waiting, it cancels the request: the device never sees it.
pub struct IoFuture<T>(Slot<T>);

enum Slot<T> {
    Ready(Option<Result<T>>),
    Pending(SharedPending<T>),
    /// The request is not with the backend yet; `submit` hands it over.
    Waiting {
        submit: Box<dyn Submit>,
        shared: SharedPending<T>,
    },
}

/// A request that its backend has not accepted yet because it is saturated; see
/// [`IoFuture::submitting`].
///
/// Contract: `poll_submit` either hands the request over (or gives up on it, dropping its
/// [`IoCompleter`], which fails the future) and returns `Ready`, or registers `cx`'s waker to be
/// woken when it is worth polling again and returns `Pending`. Dropping the value before
/// `Ready` cancels the request and gives up any room it was promised, to the next waiter.
pub trait Submit: Send + Sync {
    /// Hand the request to the backend if it has room (see the trait documentation).
    fn poll_submit(&mut self, cx: &mut Context<'_>) -> Poll<()>;
}

/// The completing half of a pending [`IoFuture`]; dropping it uncompleted fails the future.
pub struct IoCompleter<T>(Option<SharedPending<T>>);

// The future never pins its contents: the result is moved out by value.
impl<T> Unpin for IoFuture<T> {}

impl<T> IoFuture<T> {
    /// A future that is already resolved.
    pub fn ready(result: Result<T>) -> Self {
        Self(Slot::Ready(Some(result)))
    }

    /// A pending future and the completer that resolves it.
    pub fn pending() -> (Self, IoCompleter<T>) {
        let shared = Arc::new(Mutex::new(Pending {
            result: None,
            waker: None,
        }));
        (
            Self(Slot::Pending(Arc::clone(&shared))),
            IoCompleter(Some(shared)),
        )
    }

    /// Make a pending future wait for `submit` to hand its request to the backend before it
    /// waits for the result (see [`Submit`]). The request must hold the completer of `self`.
    /// A future that is not pending is returned unchanged (and `submit` dropped).
    pub fn submitting(self, submit: Box<dyn Submit>) -> Self {
        match self.0 {
            Slot::Pending(shared) => Self(Slot::Waiting { submit, shared }),
            other => Self(other),
        }
    }

    /// Whether the result is available (polling would return `Ready`).
    pub fn is_ready(&self) -> bool {
        match &self.0 {
            Slot::Ready(r) => r.is_some(),
            Slot::Pending(shared) => lock(shared).result.is_some(),
            Slot::Waiting { .. } => false,
        }
    }

    /// Whether the request still waits for room in its backend (see
    /// [`submitting`](Self::submitting)); `false` once it is under way or resolved.
    pub fn is_waiting(&self) -> bool {
        matches!(self.0, Slot::Waiting { .. })
    }

    /// Block the calling thread until the result is available.
    pub fn wait(mut self) -> Result<T> {
        let waker = Waker::from(Arc::new(ThreadWaker(std::thread::current())));
        let mut cx = Context::from_waker(&waker);
        loop {
            if let Poll::Ready(r) = Pin::new(&mut self).poll(&mut cx) {
                return r;
            }
            std::thread::park();
        }
    }
}

impl<T> Future for IoFuture<T> {
    type Output = Result<T>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<T>> {
        let this = self.get_mut();
        if let Slot::Waiting { submit, shared } = &mut this.0 {
            if submit.poll_submit(cx).is_pending() {
                return Poll::Pending;
            }
            // Handed over (or given up, which resolved `shared`): wait for the result.
            let shared = Arc::clone(shared);
            this.0 = Slot::Pending(shared);
        }
        let taken = match &mut this.0 {
            Slot::Ready(r) => r.take(),
            Slot::Pending(shared) => {
                let mut state = lock(shared);
                match state.result.take() {
                    Some(r) => Some(r),
                    None => {
                        match &mut state.waker {
                            Some(w) if w.will_wake(cx.waker()) => {}
                            w => *w = Some(cx.waker().clone()),
                        }
                        return Poll::Pending;
                    }
                }
            }
            Slot::Waiting { .. } => None,
        };
        // Resolved once: a later poll reports misuse instead of waiting forever.
        this.0 = Slot::Ready(None);
        Poll::Ready(taken.unwrap_or_else(|| Err(lost("poll", "IoFuture polled after completion"))))
    }
}

impl<T> IoCompleter<T> {
    /// Resolve the future (a no-op if it was dropped) and wake its task.
    pub fn complete(mut self, result: Result<T>) {
        self.resolve(result);
    }

    fn resolve(&mut self, result: Result<T>) {
        let Some(shared) = self.0.take() else { return };
        let waker = {
            let mut state = lock(&shared);
            state.result = Some(result);
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

impl<T> Drop for IoCompleter<T> {
    fn drop(&mut self) {
        if self.0.is_some() {
            self.resolve(Err(lost("complete", "the backstore dropped the request")));
        }
    }
}

impl<T> std::fmt::Debug for IoFuture<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoFuture")
            .field("ready", &self.is_ready())
            .finish()
    }
}

impl<T> std::fmt::Debug for IoCompleter<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoCompleter")
            .field("pending", &self.0.is_some())
            .finish()
    }
}

/// Wakes a thread blocked in [`IoFuture::wait`].
struct ThreadWaker(std::thread::Thread);

impl Wake for ThreadWaker {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod io_future_tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    struct CountingWaker(AtomicUsize);

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn futures_and_completers_cross_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<IoFuture<Bytes>>();
        send_sync::<IoCompleter<Bytes>>();
        send_sync::<IoFuture<()>>();
    }

    #[test]
    fn ready_future_resolves_at_once() {
        let fut = IoFuture::ready(Ok(7u8));
        assert!(fut.is_ready());
        assert_eq!(fut.wait().unwrap(), 7);
    }

    #[test]
    fn completes_from_another_thread() {
        let (fut, done) = IoFuture::<Bytes>::pending();
        assert!(!fut.is_ready());
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            done.complete(Ok(Bytes::from_static(b"abc")));
        });
        assert_eq!(&fut.wait().unwrap()[..], b"abc");
        t.join().unwrap();
    }

    #[test]
    fn poll_registers_waker_and_completion_wakes_it() {
        let counter = Arc::new(CountingWaker(AtomicUsize::new(0)));
        let waker = Waker::from(Arc::clone(&counter));
        let mut cx = Context::from_waker(&waker);
        let (mut fut, done) = IoFuture::<u32>::pending();
        assert!(Pin::new(&mut fut).poll(&mut cx).is_pending());
        assert!(Pin::new(&mut fut).poll(&mut cx).is_pending());
        assert_eq!(counter.0.load(Ordering::SeqCst), 0);
        done.complete(Ok(5));
        assert_eq!(counter.0.load(Ordering::SeqCst), 1);
        assert!(matches!(
            Pin::new(&mut fut).poll(&mut cx),
            Poll::Ready(Ok(5))
        ));
        // A second poll is a caller bug; it is reported, not a panic.
        assert!(matches!(
            Pin::new(&mut fut).poll(&mut cx),
            Poll::Ready(Err(BackstoreError::Io { op: "poll", .. }))
        ));
    }

    #[test]
    fn dropped_completer_fails_the_future() {
        let (fut, done) = IoFuture::<()>::pending();
        drop(done);
        assert!(matches!(
            fut.wait(),
            Err(BackstoreError::Io { op: "complete", .. })
        ));
    }

    #[test]
    fn completing_a_dropped_future_is_harmless() {
        let (fut, done) = IoFuture::<Vec<u8>>::pending();
        drop(fut);
        done.complete(Ok(vec![1; 1024]));
    }

    /// A request that gets room on the third poll; counts its polls and whether it was
    /// dropped unsubmitted.
    struct Later {
        polls: Arc<AtomicUsize>,
        cancelled: Arc<AtomicUsize>,
        done: Option<IoCompleter<u32>>,
    }

    impl Submit for Later {
        fn poll_submit(&mut self, cx: &mut Context<'_>) -> Poll<()> {
            if self.polls.fetch_add(1, Ordering::SeqCst) < 2 {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            // "Submitted": the backend completes it at once.
            if let Some(done) = self.done.take() {
                done.complete(Ok(11));
            }
            Poll::Ready(())
        }
    }

    impl Drop for Later {
        fn drop(&mut self) {
            if self.done.is_some() {
                self.cancelled.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    fn later() -> (IoFuture<u32>, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let (fut, done) = IoFuture::pending();
        let polls = Arc::new(AtomicUsize::new(0));
        let cancelled = Arc::new(AtomicUsize::new(0));
        let fut = fut.submitting(Box::new(Later {
            polls: Arc::clone(&polls),
            cancelled: Arc::clone(&cancelled),
            done: Some(done),
        }));
        (fut, polls, cancelled)
    }

    #[test]
    fn a_submitting_future_hands_over_then_resolves() {
        let (fut, polls, cancelled) = later();
        assert!(fut.is_waiting());
        assert!(!fut.is_ready());
        assert_eq!(fut.wait().unwrap(), 11);
        assert_eq!(polls.load(Ordering::SeqCst), 3);
        assert_eq!(cancelled.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn dropping_a_waiting_future_cancels_its_request() {
        let (mut fut, polls, cancelled) = later();
        let counter = Arc::new(CountingWaker(AtomicUsize::new(0)));
        let waker = Waker::from(Arc::clone(&counter));
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(&mut fut).poll(&mut cx).is_pending());
        assert!(fut.is_waiting());
        drop(fut);
        assert_eq!(polls.load(Ordering::SeqCst), 1);
        assert_eq!(cancelled.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn submitting_leaves_a_ready_future_alone() {
        let polls = Arc::new(AtomicUsize::new(0));
        let cancelled = Arc::new(AtomicUsize::new(0));
        let (_, done) = IoFuture::<u32>::pending();
        let fut = IoFuture::ready(Ok(3)).submitting(Box::new(Later {
            polls: Arc::clone(&polls),
            cancelled: Arc::clone(&cancelled),
            done: Some(done),
        }));
        assert!(!fut.is_waiting());
        assert_eq!(fut.wait().unwrap(), 3);
        assert_eq!(
            cancelled.load(Ordering::SeqCst),
            1,
            "the unused request was dropped"
        );
    }

    #[test]
    fn default_async_methods_run_inline() {
        let ram = RamBackend::new(1 << 16).unwrap();
        assert!(!ram.is_async());
        let w = ram.write_async(10, Bytes::from_static(b"xyz"), true);
        assert!(w.is_ready());
        w.wait().unwrap();
        assert_eq!(&ram.read_async(10, 3).wait().unwrap()[..], b"xyz");
        ram.flush_async().wait().unwrap();
        assert!(matches!(
            ram.read_async(1 << 16, 1).wait(),
            Err(BackstoreError::OutOfRange { .. })
        ));
    }
}
