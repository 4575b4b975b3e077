//! io_uring backstore.
//!
//! A file or block device served through one io_uring (Linux 5.6+: `IORING_OP_READ`/`WRITE`).
//! Threads, per backend: one, named `ironlun-uring`, which owns the ring; it is joined when the
//! backend is dropped. Nothing else here starts a thread. The kernel adds threads of its own
//! to the process: up to [`UringOptions::io_workers`] io-wq workers (`iou-wrk-*`, started on
//! demand for requests that cannot complete without blocking, such as buffered writes on many
//! filesystems and flushes, and gone after a few idle seconds), and with
//! [`UringOptions::sqpoll`] one SQ polling thread (`iou-sqp-*`).
//!
//! Submitters ([`BlockBackend::read_async`] and friends) range-check the request, take a place
//! in a bounded queue, allocate the request's buffer, push it and write an eventfd; the ring
//! thread keeps a `POLL_ADD` armed on that eventfd, so one blocking `io_uring_enter` waits for
//! either new requests or completions.
//!
//! Back-pressure never blocks a submitter's thread (the daemon submits from tasks on
//! current-thread runtimes, where a blocked thread would stall every connection on it). At
//! most `ring_depth` requests are in flight and `ring_depth` more queued. When the queue is
//! full, `*_async` returns at once a future that holds the request, without its read buffer,
//! and waits, like any pending future, for a place: the ring thread grants the places it frees
//! to waiting futures in the order they first polled, and wakes them. Such a future hands its
//! request over when next polled; dropped before that, it cancels the request, which the
//! kernel never sees, and passes its place on.
//!
//! Ownership (DESIGN.md §3 rule 6): a request's buffer moves into the queue and then into a
//! slot of a bounded in-flight slab, keyed by the SQE's `user_data`, and leaves it only when
//! the last CQE of the request has been reaped. The kernel therefore never holds a pointer into
//! memory owned by an [`IoFuture`]: dropping a future only discards its result. If the ring
//! itself fails, in-flight buffers are leaked rather than freed.
//!
//! Transfers: short reads and writes (and transfers longer than one SQE allows) are resubmitted
//! for the remainder; `EINTR`/`EAGAIN` are retried. FUA (SBC-3 §5.40) sets `RWF_DSYNC` on the
//! write SQE; flush (SBC-3 §5.34 SYNCHRONIZE CACHE) is `IORING_OP_FSYNC` with `DATASYNC`.
//!
//! `O_DIRECT` ([`UringOptions::direct`]): requests whose offset and length are multiples of the
//! file's direct-I/O alignment (`statx` `STATX_DIOALIGN`, else 4096) go through an `O_DIRECT`
//! descriptor from 4096-aligned buffers (writes from unaligned memory are copied once); other
//! requests use a buffered descriptor on the same file, whose coherence with direct I/O the
//! kernel maintains. A filesystem that refuses `O_DIRECT` (`EINVAL` at open or on the first
//! direct transfer) is served buffered, with a warning.
//!
//! Deallocation and extents (`unmap`, `write_zeroes`, `extents`) reuse [`FileBackend`]
//! synchronously on the same file.
//!
//! Availability: where `io_uring_setup` is refused (`ENOSYS`, `EPERM` under seccomp or
//! `kernel.io_uring_disabled`), [`UringBackend::open`] fails with
//! `BackstoreError::Unsupported("io_uring")` so the caller can fall back to [`FileBackend`];
//! [`io_uring_available`] asks the same question up front.
#![allow(unsafe_code)]

use std::collections::{BTreeMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::task::{Context, Poll, Waker};
use std::thread::JoinHandle;

use bytes::Bytes;
use io_uring::{opcode, squeue, types, IoUring, Probe};
use rustix::event::EventfdFlags;
use rustix::fs::{AtFlags, StatxFlags};

use crate::{
    check_range, BackstoreError, BlockBackend, Extent, FileBackend, FileOptions, IoCompleter,
    IoFuture, Result, Submit,
};

/// Default number of requests in flight (and SQ entries).
pub const DEFAULT_RING_DEPTH: u32 = 128;
/// Largest accepted ring depth; larger requests are clamped.
pub const MAX_RING_DEPTH: u32 = 4096;
/// Default of [`UringOptions::io_workers`]: the kernel's own limit on a 2-CPU machine, and a
/// bound on larger ones (where the kernel's would be 4 × CPUs per ring).
pub const DEFAULT_IO_WORKERS: u32 = 8;
/// Memory alignment of buffers for `O_DIRECT`, and the offset/length alignment used when the
/// kernel does not report one.
pub const DIRECT_ALIGN: usize = 4096;
/// Longest transfer of one SQE; longer requests continue like short transfers.
const MAX_SQE_LEN: usize = 1 << 30;
/// `user_data` of the eventfd poll; slab slots use their index (`< MAX_RING_DEPTH`).
const WAKE: u64 = u64::MAX;

/// How to open a [`UringBackend`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UringOptions {
    /// Size in bytes, as [`FileOptions::size`].
    pub size: Option<u64>,
    /// Create the file if it does not exist, as [`FileOptions::create`].
    pub create: bool,
    /// Open read-only: modifying operations fail with [`BackstoreError::ReadOnly`].
    pub read_only: bool,
    /// Use `O_DIRECT` for aligned requests (see the module documentation).
    pub direct: bool,
    /// Most requests in flight; clamped to `1..=MAX_RING_DEPTH`.
    pub ring_depth: u32,
    /// Let a kernel thread poll the submission queue (`IORING_SETUP_SQPOLL`).
    pub sqpoll: bool,
    /// Most io-wq worker threads the kernel may start for this ring
    /// (`IORING_REGISTER_IOWQ_MAX_WORKERS`, Linux 5.15+; ignored by older kernels, whose
    /// limit is min(ring depth, 4 × CPUs)). 0 keeps the kernel's limit.
    pub io_workers: u32,
}

impl Default for UringOptions {
    fn default() -> Self {
        Self {
            size: None,
            create: false,
            read_only: false,
            direct: false,
            ring_depth: DEFAULT_RING_DEPTH,
            sqpoll: false,
            io_workers: DEFAULT_IO_WORKERS,
        }
    }
}

/// Whether this process may create an io_uring with the opcodes this backstore uses.
/// The answer is computed once.
pub fn io_uring_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        IoUring::new(2)
            .and_then(|ring| check_opcodes(&ring))
            .is_ok()
    })
}

/// Fail unless the kernel supports every opcode used here (the probe itself needs 5.6).
fn check_opcodes(ring: &IoUring) -> io::Result<()> {
    let mut probe = Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    let codes = [
        opcode::Read::CODE,
        opcode::Write::CODE,
        opcode::Fsync::CODE,
        opcode::PollAdd::CODE,
    ];
    if codes.iter().all(|&c| probe.is_supported(c)) {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(libc::ENOSYS))
    }
}

fn len64(len: usize) -> u64 {
    u64::try_from(len).unwrap_or(u64::MAX)
}

fn io_error(op: &'static str, offset: u64, source: io::Error) -> BackstoreError {
    if source.raw_os_error() == Some(libc::ENOSPC) {
        BackstoreError::NoSpace { op, offset }
    } else {
        BackstoreError::Io { op, offset, source }
    }
}

/// Map a refused `io_uring_setup` to `Unsupported` (fall back) and anything else to `Io`.
fn setup_error(source: io::Error) -> BackstoreError {
    match source.raw_os_error() {
        Some(libc::ENOSYS | libc::EPERM | libc::EACCES | libc::EINVAL) => {
            tracing::warn!(error = %source, "io_uring is unavailable");
            BackstoreError::Unsupported("io_uring")
        }
        _ => BackstoreError::Io {
            op: "io_uring_setup",
            offset: 0,
            source,
        },
    }
}

/// A zeroed buffer whose first byte is [`DIRECT_ALIGN`]-aligned: an over-allocated `Vec` and
/// the aligned window into it. The heap block never moves while the value lives.
struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    fn zeroed(len: usize) -> Option<Self> {
        let storage = vec![0u8; len.checked_add(DIRECT_ALIGN)?];
        let start = storage.as_ptr().align_offset(DIRECT_ALIGN);
        (start < DIRECT_ALIGN).then_some(Self {
            storage,
            start,
            len,
        })
    }

    fn copy_of(data: &[u8]) -> Option<Self> {
        let mut buf = Self::zeroed(data.len())?;
        buf.as_mut_slice().copy_from_slice(data);
        Some(buf)
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        let (start, len) = (self.start, self.len);
        self.storage
            .get_mut(start..)
            .and_then(|s| s.get_mut(..len))
            .unwrap_or_default()
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self.storage
            .get(self.start..)
            .and_then(|s| s.get(..self.len))
            .unwrap_or_default()
    }
}

/// A write's payload: the caller's bytes, or an aligned copy for `O_DIRECT`.
enum WriteBuf {
    Shared(Bytes),
    Aligned(AlignedBuf),
}

impl WriteBuf {
    fn as_slice(&self) -> &[u8] {
        match self {
            Self::Shared(b) => b,
            Self::Aligned(b) => b.as_ref(),
        }
    }
}

/// A request before it has a place in the queue: a read has no buffer yet.
enum Planned {
    Read {
        offset: u64,
        len: usize,
        done: IoCompleter<Bytes>,
    },
    Write {
        offset: u64,
        buf: WriteBuf,
        fua: bool,
        done: IoCompleter<()>,
    },
    Flush {
        done: IoCompleter<()>,
    },
}

impl Planned {
    /// The request to queue, with its read buffer allocated; `None` (and the future failed) if
    /// the buffer cannot be had.
    fn into_request(self) -> Option<Request> {
        Some(match self {
            Self::Read { offset, len, done } => match AlignedBuf::zeroed(len) {
                Some(buf) => Request::Read { offset, buf, done },
                None => {
                    done.complete(Err(io_error(
                        "read",
                        offset,
                        io::ErrorKind::OutOfMemory.into(),
                    )));
                    return None;
                }
            },
            Self::Write {
                offset,
                buf,
                fua,
                done,
            } => Request::Write {
                offset,
                buf,
                fua,
                done,
            },
            Self::Flush { done } => Request::Flush { done },
        })
    }
}

/// One request as queued by a submitter; its buffer travels with it.
enum Request {
    Read {
        offset: u64,
        buf: AlignedBuf,
        done: IoCompleter<Bytes>,
    },
    Write {
        offset: u64,
        buf: WriteBuf,
        fua: bool,
        done: IoCompleter<()>,
    },
    Flush {
        done: IoCompleter<()>,
    },
}

/// What the submitters and the ring thread share.
struct Shared {
    buffered: File,
    direct: Option<File>,
    /// Offset and length alignment required by `direct`.
    direct_align: AtomicU64,
    /// Memory alignment required by `direct` (divides [`DIRECT_ALIGN`]).
    direct_mem_align: usize,
    /// The filesystem has not refused a direct transfer yet.
    direct_ok: AtomicBool,
    /// Written by submitters, polled by the ring thread.
    wake: OwnedFd,
    /// Requests on their way to the ring thread.
    queue: Queue,
    /// Tests: the ring thread takes nothing from the queue while set.
    #[cfg(test)]
    stalled: AtomicBool,
}

impl Shared {
    fn notify(&self) {
        // Can fail only if the counter would overflow, and then the ring thread is awake anyway.
        let _ = rustix::io::write(&self.wake, &1u64.to_ne_bytes());
    }

    /// Queue `planned` in a place taken from the queue, and wake the ring thread. If the queue
    /// has closed meanwhile, the request is dropped, which fails its future.
    fn enqueue(&self, planned: Planned) {
        let Some(request) = planned.into_request() else {
            self.queue.release();
            return;
        };
        if self.queue.push(request).is_ok() {
            self.notify();
        }
    }

    /// Whether a transfer of `len` bytes at `pos` is aligned for the direct descriptor.
    fn direct_range(&self, pos: u64, len: usize) -> bool {
        let align = self.direct_align.load(Ordering::Relaxed);
        self.direct.is_some()
            && self.direct_ok.load(Ordering::Relaxed)
            && pos.checked_rem(align) == Some(0)
            && len64(len).checked_rem(align) == Some(0)
    }

    /// Whether a transfer of `len` bytes at `pos` from `ptr` may use the direct descriptor.
    fn direct_fits(&self, pos: u64, len: usize, ptr: *const u8) -> bool {
        self.direct_range(pos, len) && (ptr as usize).checked_rem(self.direct_mem_align) == Some(0)
    }
}

/// A backstore served through io_uring. See the module documentation.
pub struct UringBackend {
    file: FileBackend,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// The bounded queue between submitters and the ring thread, with asynchronous back-pressure:
/// a submitter takes a place before it pushes a request; one that finds none waits, as a
/// [`Submit`] in its future, for the ring thread to grant it one.
///
/// Invariant: `free` + queued requests + places taken or granted but not yet used = capacity.
/// As with any fair async semaphore, a future granted a place keeps it until it is polled
/// again (and hands its request over) or dropped. Tasks poll what wakes them, so this only
/// matters to a caller that polls several futures once and then blocks
/// ([`IoFuture::wait`]) on a later one: it must wait for them in the order it first polled
/// them.
struct Queue {
    state: Mutex<QueueState>,
}

struct QueueState {
    requests: VecDeque<Request>,
    /// Places nobody holds.
    free: usize,
    /// Submitters waiting for a place, by ticket (the order in which they first polled). A
    /// ticket leaves the map when it is granted a place, or when the queue closes.
    waiters: BTreeMap<u64, Waker>,
    next_ticket: u64,
    /// No request is accepted any more (the backend, or its ring thread, is gone).
    closed: bool,
}

/// Outcome of [`Queue::try_acquire`].
enum Acquire {
    Granted,
    Full,
    Closed,
}

impl Queue {
    fn new(capacity: usize) -> Self {
        Self {
            state: Mutex::new(QueueState {
                requests: VecDeque::with_capacity(capacity),
                free: capacity,
                waiters: BTreeMap::new(),
                next_ticket: 0,
                closed: false,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Take a place now, if one is free and no one waits for one.
    fn try_acquire(&self) -> Acquire {
        let mut st = self.lock();
        if st.closed {
            Acquire::Closed
        } else if st.waiters.is_empty() && st.free > 0 {
            st.free = st.free.saturating_sub(1);
            Acquire::Granted
        } else {
            Acquire::Full
        }
    }

    /// For the submitter holding `ticket` (`None` before its first wait): `Ready(true)` when
    /// it has a place (granted to its ticket, or free with no one waiting), `Ready(false)` when
    /// the queue has closed, else `Pending` with its waker registered under its ticket.
    fn poll_acquire(&self, ticket: &mut Option<u64>, cx: &mut Context<'_>) -> Poll<bool> {
        let mut st = self.lock();
        if st.closed {
            if let Some(t) = ticket.take() {
                st.waiters.remove(&t);
            }
            return Poll::Ready(false);
        }
        match *ticket {
            Some(t) => match st.waiters.get_mut(&t) {
                // Granted by `grant`: the place is ours.
                None => {
                    *ticket = None;
                    return Poll::Ready(true);
                }
                Some(w) => {
                    if !w.will_wake(cx.waker()) {
                        *w = cx.waker().clone();
                    }
                }
            },
            None => {
                if st.waiters.is_empty() && st.free > 0 {
                    st.free = st.free.saturating_sub(1);
                    return Poll::Ready(true);
                }
                let t = st.next_ticket;
                st.next_ticket = t.wrapping_add(1);
                st.waiters.insert(t, cx.waker().clone());
                *ticket = Some(t);
            }
        }
        Poll::Pending
    }

    /// Put `request` in a place taken by [`try_acquire`](Self::try_acquire) or
    /// [`poll_acquire`](Self::poll_acquire); it comes back if the queue has closed.
    fn push(&self, request: Request) -> std::result::Result<(), Request> {
        let mut st = self.lock();
        if st.closed {
            return Err(request);
        }
        st.requests.push_back(request);
        Ok(())
    }

    /// Give back a place taken but not used.
    fn release(&self) {
        let wakers = {
            let mut st = self.lock();
            st.free = st.free.saturating_add(1);
            st.grant()
        };
        wakers.into_iter().for_each(Waker::wake);
    }

    /// The submitter holding `ticket` is gone: forget it, and pass on a place it was granted.
    fn cancel(&self, ticket: u64) {
        let wakers = {
            let mut st = self.lock();
            if st.waiters.remove(&ticket).is_some() || st.closed {
                return;
            }
            st.free = st.free.saturating_add(1);
            st.grant()
        };
        wakers.into_iter().for_each(Waker::wake);
    }

    /// Ring thread: move up to `max` requests into `out` and grant their places to waiters.
    /// Returns whether the queue is closed and empty (no request will come any more).
    fn take_into(&self, max: usize, out: &mut Vec<Request>) -> bool {
        let (wakers, finished) = {
            let mut st = self.lock();
            let n = max.min(st.requests.len());
            out.extend(st.requests.drain(..n));
            st.free = st.free.saturating_add(n);
            let wakers = st.grant();
            (wakers, st.closed && st.requests.is_empty())
        };
        wakers.into_iter().for_each(Waker::wake);
        finished
    }

    /// Accept no more requests and wake every waiter (their futures then fail). `drain`: also
    /// hand back the queued requests (the ring thread will not run them).
    fn close(&self, drain: bool) -> Vec<Request> {
        let (waiters, requests) = {
            let mut st = self.lock();
            st.closed = true;
            let requests = if drain {
                st.requests.drain(..).collect()
            } else {
                Vec::new()
            };
            (std::mem::take(&mut st.waiters), requests)
        };
        waiters.into_values().for_each(Waker::wake);
        requests
    }

    #[cfg(test)]
    fn counts(&self) -> (usize, usize) {
        let st = self.lock();
        (st.requests.len(), st.waiters.len())
    }
}

impl QueueState {
    /// Grant free places to the longest waiters; returns their wakers, to wake once the lock
    /// is released.
    fn grant(&mut self) -> Vec<Waker> {
        let mut wakers = Vec::new();
        while self.free > 0 {
            let Some((_, waker)) = self.waiters.pop_first() else {
                break;
            };
            self.free = self.free.saturating_sub(1);
            wakers.push(waker);
        }
        wakers
    }
}

/// A request waiting for a place in the queue, inside its [`IoFuture`].
struct Waiting {
    shared: Arc<Shared>,
    ticket: Option<u64>,
    planned: Option<Planned>,
}

impl Submit for Waiting {
    fn poll_submit(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match self.shared.queue.poll_acquire(&mut self.ticket, cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(granted) => {
                match self.planned.take() {
                    Some(planned) if granted => self.shared.enqueue(planned),
                    Some(_closed) => {} // Dropped: its future fails.
                    None if granted => self.shared.queue.release(),
                    None => {}
                }
                Poll::Ready(())
            }
        }
    }
}

impl Drop for Waiting {
    /// Cancelled before it was handed over: the request is dropped with this value, and a
    /// place granted to it goes to the next waiter.
    fn drop(&mut self) {
        if let Some(ticket) = self.ticket.take() {
            self.shared.queue.cancel(ticket);
        }
    }
}

impl std::fmt::Debug for UringBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringBackend")
            .field("size", &self.file.size())
            .field("read_only", &self.file.is_read_only())
            .field("direct", &self.is_direct())
            .finish_non_exhaustive()
    }
}

/// Direct-I/O alignment of `file` as (offset/length, memory); `None` if it refuses direct I/O.
fn direct_alignment(file: &File) -> Option<(u64, usize)> {
    let Ok(stx) = rustix::fs::statx(file, "", AtFlags::EMPTY_PATH, StatxFlags::DIOALIGN) else {
        return Some((len64(DIRECT_ALIGN), DIRECT_ALIGN));
    };
    if stx.stx_mask & StatxFlags::DIOALIGN.bits() == 0 {
        // Kernel older than 6.1: assume the largest common logical block size.
        return Some((len64(DIRECT_ALIGN), DIRECT_ALIGN));
    }
    let offset = u64::from(stx.stx_dio_offset_align);
    let mem = usize::try_from(stx.stx_dio_mem_align).ok()?;
    let usable = offset > 0 && mem > 0 && DIRECT_ALIGN.checked_rem(mem) == Some(0);
    usable.then_some((offset, mem))
}

impl UringBackend {
    /// Open (or create) the file at `path` and start the ring thread. See [`UringOptions`].
    ///
    /// Fails with `BackstoreError::Unsupported("io_uring")` when this process may not use
    /// io_uring; the caller should then open a [`FileBackend`] instead.
    pub fn open(path: impl AsRef<Path>, options: UringOptions) -> Result<Self> {
        let path = path.as_ref();
        let depth = options.ring_depth.clamp(1, MAX_RING_DEPTH);
        let mut builder = IoUring::builder();
        if options.sqpoll {
            builder.setup_sqpoll(1000);
        }
        // One SQ entry more than the slab, for the eventfd poll.
        let ring = builder
            .build(depth.saturating_add(1))
            .map_err(setup_error)?;
        check_opcodes(&ring).map_err(setup_error)?;
        let file = FileBackend::open(
            path,
            FileOptions {
                size: options.size,
                create: options.create,
                read_only: options.read_only,
            },
        )?;
        let open_err = |e| io_error("open", 0, e);
        let buffered = OpenOptions::new()
            .read(true)
            .write(!options.read_only)
            .open(path)
            .map_err(open_err)?;
        let mut direct = None;
        let mut direct_align = (len64(DIRECT_ALIGN), DIRECT_ALIGN);
        if options.direct {
            match OpenOptions::new()
                .read(true)
                .write(!options.read_only)
                .custom_flags(libc::O_DIRECT)
                .open(path)
            {
                Ok(f) => match direct_alignment(&f) {
                    Some(align) => {
                        direct_align = align;
                        direct = Some(f);
                    }
                    None => tracing::warn!(
                        path = %path.display(),
                        "the filesystem does not support O_DIRECT here; serving buffered"
                    ),
                },
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => tracing::warn!(
                    path = %path.display(),
                    "the filesystem refused O_DIRECT; serving buffered"
                ),
                Err(e) => return Err(open_err(e)),
            }
        }
        let wake = rustix::event::eventfd(0, EventfdFlags::NONBLOCK | EventfdFlags::CLOEXEC)
            .map_err(|e| io_error("eventfd", 0, e.into()))?;
        let slots = usize::try_from(depth).unwrap_or(1);
        let shared = Arc::new(Shared {
            buffered,
            direct,
            direct_align: AtomicU64::new(direct_align.0),
            direct_mem_align: direct_align.1,
            direct_ok: AtomicBool::new(true),
            wake,
            // Queue up to one more ring's worth of requests before submitters wait.
            queue: Queue::new(slots),
            #[cfg(test)]
            stalled: AtomicBool::new(false),
        });
        let driver = Driver {
            ring,
            shared: Arc::clone(&shared),
            slab: Slab::new(slots),
            batch: Vec::with_capacity(slots),
            closing: false,
            io_workers: options.io_workers,
        };
        let thread = std::thread::Builder::new()
            .name("ironlun-uring".into())
            .spawn(move || driver.run())
            .map_err(|e| io_error("spawn", 0, e))?;
        Ok(Self {
            file,
            shared,
            thread: Some(thread),
        })
    }

    /// Whether the backstore was opened read-only.
    pub fn is_read_only(&self) -> bool {
        self.file.is_read_only()
    }

    /// Send every request to the `O_DIRECT` descriptor, aligned or not, so that the kernel
    /// refuses one with `EINVAL` and the buffered fallback is exercised.
    #[cfg(test)]
    fn misalign_direct(self) -> Self {
        self.shared.direct_align.store(1, Ordering::Relaxed);
        self
    }

    /// Whether aligned requests currently use `O_DIRECT`.
    pub fn is_direct(&self) -> bool {
        self.shared.direct.is_some() && self.shared.direct_ok.load(Ordering::Relaxed)
    }

    /// Hand `planned` to the ring thread if the queue has room, else make `future` (whose
    /// completer `planned` holds) wait for a place; never blocks. If the ring thread is gone,
    /// the request is dropped and the future fails.
    fn submit<T>(&self, planned: Planned, future: IoFuture<T>) -> IoFuture<T> {
        match self.shared.queue.try_acquire() {
            Acquire::Granted => {
                self.shared.enqueue(planned);
                future
            }
            Acquire::Closed => {
                drop(planned);
                future
            }
            Acquire::Full => future.submitting(Box::new(Waiting {
                shared: Arc::clone(&self.shared),
                ticket: None,
                planned: Some(planned),
            })),
        }
    }

    /// Tests: stop (or resume) the ring thread taking requests from the queue.
    #[cfg(test)]
    fn stall(&self, stalled: bool) {
        self.shared.stalled.store(stalled, Ordering::SeqCst);
        self.shared.notify();
    }
}

impl BlockBackend for UringBackend {
    fn size(&self) -> u64 {
        self.file.size()
    }

    /// As the file backstore's (the ring's requests are checked against `size` first).
    fn resize(&self, new_size: u64) -> Result<()> {
        self.file.resize(new_size)
    }

    fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        self.read_async(offset, len).wait()
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        if self.is_read_only() {
            return Err(BackstoreError::ReadOnly { op: "write" });
        }
        check_range(offset, len64(data.len()), self.size())?;
        self.write_async(offset, Bytes::copy_from_slice(data), fua)
            .wait()
    }

    fn flush(&self) -> Result<()> {
        self.flush_async().wait()
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.file.write_zeroes(offset, len, unmap)
    }

    fn unmap(&self, offset: u64, len: u64) -> Result<()> {
        self.file.unmap(offset, len)
    }

    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.file.extents(offset, len)
    }

    fn thin_provisioning(&self) -> bool {
        self.file.thin_provisioning()
    }

    fn is_async(&self) -> bool {
        true
    }

    fn read_async(&self, offset: u64, len: usize) -> IoFuture<Bytes> {
        if let Err(e) = check_range(offset, len64(len), self.size()) {
            return IoFuture::ready(Err(e));
        }
        if len == 0 {
            return IoFuture::ready(Ok(Bytes::new()));
        }
        if len.checked_add(DIRECT_ALIGN).is_none() {
            return IoFuture::ready(Err(BackstoreError::OutOfRange {
                offset,
                len: len64(len),
                size: self.size(),
            }));
        }
        let (future, done) = IoFuture::pending();
        self.submit(Planned::Read { offset, len, done }, future)
    }

    fn write_async(&self, offset: u64, data: Bytes, fua: bool) -> IoFuture<()> {
        if self.is_read_only() {
            return IoFuture::ready(Err(BackstoreError::ReadOnly { op: "write" }));
        }
        if let Err(e) = check_range(offset, len64(data.len()), self.size()) {
            return IoFuture::ready(Err(e));
        }
        if data.is_empty() {
            return IoFuture::ready(Ok(()));
        }
        // An aligned request from unaligned memory is copied once so it can go direct.
        let copy = self.shared.direct_range(offset, data.len())
            && !self.shared.direct_fits(offset, data.len(), data.as_ptr());
        let buf = if copy {
            AlignedBuf::copy_of(&data).map_or(WriteBuf::Shared(data), WriteBuf::Aligned)
        } else {
            WriteBuf::Shared(data)
        };
        let (future, done) = IoFuture::pending();
        self.submit(
            Planned::Write {
                offset,
                buf,
                fua,
                done,
            },
            future,
        )
    }

    fn flush_async(&self) -> IoFuture<()> {
        if self.is_read_only() {
            return IoFuture::ready(Ok(()));
        }
        let (future, done) = IoFuture::pending();
        self.submit(Planned::Flush { done }, future)
    }
}

impl Drop for UringBackend {
    /// Stop accepting requests (futures still waiting for a place fail), let the ring thread
    /// finish every queued and in-flight request, and join it.
    fn drop(&mut self) {
        #[cfg(test)]
        self.shared.stalled.store(false, Ordering::SeqCst);
        drop(self.shared.queue.close(false));
        self.shared.notify();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("the io_uring thread panicked");
            }
        }
    }
}

/// The operation of an in-flight request and the buffer it owns until its last CQE.
enum Op {
    Read {
        buf: AlignedBuf,
        done: IoCompleter<Bytes>,
    },
    Write {
        buf: WriteBuf,
        fua: bool,
        done: IoCompleter<()>,
    },
    Flush {
        done: IoCompleter<()>,
    },
}

/// One slab entry: a request between its first SQE and its last CQE.
struct InFlight {
    op: Op,
    offset: u64,
    /// Bytes transferred so far.
    done: usize,
    /// The last SQE went to the direct descriptor.
    direct: bool,
}

impl InFlight {
    fn name(&self) -> &'static str {
        match self.op {
            Op::Read { .. } => "read",
            Op::Write { .. } => "write",
            Op::Flush { .. } => "flush",
        }
    }

    fn len(&self) -> usize {
        match &self.op {
            Op::Read { buf, .. } => buf.len,
            Op::Write { buf, .. } => buf.as_slice().len(),
            Op::Flush { .. } => 0,
        }
    }

    fn position(&self) -> u64 {
        self.offset.saturating_add(len64(self.done))
    }

    /// The SQE for the rest of this request, tagged with `user_data`.
    fn entry(&mut self, shared: &Shared, user_data: u64) -> squeue::Entry {
        let pos = self.position();
        let done = self.done;
        let fd = |direct: bool| {
            let file = match (&shared.direct, direct) {
                (Some(f), true) => f,
                _ => &shared.buffered,
            };
            types::Fd(file.as_raw_fd())
        };
        let entry = match &mut self.op {
            Op::Read { buf, .. } => {
                let rest = buf.as_mut_slice().get_mut(done..).unwrap_or_default();
                let n = rest.len().min(MAX_SQE_LEN);
                let ptr = rest.as_mut_ptr();
                self.direct = shared.direct_fits(pos, n, ptr);
                opcode::Read::new(fd(self.direct), ptr, u32::try_from(n).unwrap_or(0))
                    .offset(pos)
                    .build()
            }
            Op::Write { buf, fua, .. } => {
                let rest = buf.as_slice().get(done..).unwrap_or_default();
                let n = rest.len().min(MAX_SQE_LEN);
                let ptr = rest.as_ptr();
                self.direct = shared.direct_fits(pos, n, ptr);
                opcode::Write::new(fd(self.direct), ptr, u32::try_from(n).unwrap_or(0))
                    .offset(pos)
                    .rw_flags(if *fua { libc::RWF_DSYNC } else { 0 })
                    .build()
            }
            Op::Flush { .. } => {
                self.direct = false;
                opcode::Fsync::new(fd(false))
                    .flags(types::FsyncFlags::DATASYNC)
                    .build()
            }
        };
        entry.user_data(user_data)
    }

    /// Resolve the request's future, releasing its buffer (its last CQE has been reaped).
    fn finish(self, result: std::result::Result<(), BackstoreError>) {
        match self.op {
            Op::Read { buf, done } => done.complete(result.map(|()| Bytes::from_owner(buf))),
            Op::Write { done, .. } | Op::Flush { done } => done.complete(result),
        }
    }
}

/// The bounded in-flight table: slot index = `user_data`.
struct Slab {
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
}

impl Slab {
    fn new(capacity: usize) -> Self {
        Self {
            slots: (0..capacity).map(|_| None).collect(),
            free: (0..capacity).rev().collect(),
        }
    }

    fn room(&self) -> usize {
        self.free.len()
    }

    fn is_empty(&self) -> bool {
        self.free.len() == self.slots.len()
    }

    fn insert(&mut self, request: InFlight) -> std::result::Result<usize, InFlight> {
        let Some(index) = self.free.pop() else {
            return Err(request);
        };
        match self.slots.get_mut(index) {
            Some(slot) => {
                *slot = Some(request);
                Ok(index)
            }
            None => Err(request),
        }
    }

    fn get_mut(&mut self, index: usize) -> Option<&mut InFlight> {
        self.slots.get_mut(index).and_then(Option::as_mut)
    }

    fn remove(&mut self, index: usize) -> Option<InFlight> {
        let request = self.slots.get_mut(index).and_then(Option::take)?;
        self.free.push(index);
        Some(request)
    }
}

/// The ring thread's state.
struct Driver {
    ring: IoUring,
    shared: Arc<Shared>,
    slab: Slab,
    /// Requests taken from the queue by `admit` (kept for its allocation).
    batch: Vec<Request>,
    /// The queue is closed and empty: finish in-flight requests, then exit.
    closing: bool,
    /// [`UringOptions::io_workers`].
    io_workers: u32,
}

/// What to do with a request after one of its CQEs.
enum Next {
    Resubmit,
    Finish(std::result::Result<(), BackstoreError>),
}

fn retryable(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
    )
}

impl Driver {
    fn run(mut self) {
        if self.io_workers > 0 {
            // Registered from this thread, the one that submits: the limit applies to the io-wq
            // the kernel gives it (bounded: file I/O; unbounded: unused here).
            let mut max = [self.io_workers, self.io_workers];
            if let Err(e) = self.ring.submitter().register_iowq_max_workers(&mut max) {
                tracing::debug!(error = %e, "cannot limit the io_uring workers (Linux < 5.15?)");
            }
        }
        if let Err(e) = self.push(self.wake_entry()) {
            self.fail(e);
            return;
        }
        loop {
            self.admit();
            if self.closing && self.slab.is_empty() {
                return;
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if retryable(&e) => {}
                Err(e) => {
                    self.fail(e);
                    return;
                }
            }
            self.reap();
        }
    }

    fn wake_entry(&self) -> squeue::Entry {
        let pollin = u32::try_from(libc::POLLIN).unwrap_or(1);
        opcode::PollAdd::new(types::Fd(self.shared.wake.as_raw_fd()), pollin)
            .build()
            .user_data(WAKE)
    }

    /// Push one SQE, submitting queued ones first if the SQ is full.
    fn push(&mut self, entry: squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: every buffer an SQE points to is owned by a slab slot (or, for the
            // eventfd poll, no buffer is involved), and a slot is emptied only after the CQE
            // of its last SQE has been reaped, or leaked if the ring fails; the descriptors
            // live in `self.shared`, which outlives the ring (the Arc is held by this
            // driver, and the ring is torn down first).
            let pushed = unsafe { self.ring.submission().push(&entry) };
            if pushed.is_ok() {
                return Ok(());
            }
            match self.ring.submit() {
                Ok(_) => {}
                Err(e) if retryable(&e) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Move queued requests into the slab while it has room (their places in the queue go to
    /// waiting submitters), and push their SQEs.
    fn admit(&mut self) {
        if self.closing {
            return;
        }
        #[cfg(test)]
        if self.shared.stalled.load(Ordering::SeqCst) {
            return;
        }
        let mut batch = std::mem::take(&mut self.batch);
        if self.shared.queue.take_into(self.slab.room(), &mut batch) {
            self.closing = true;
        }
        for request in batch.drain(..) {
            let (op, offset) = match request {
                Request::Read { offset, buf, done } => (Op::Read { buf, done }, offset),
                Request::Write {
                    offset,
                    buf,
                    fua,
                    done,
                } => (Op::Write { buf, fua, done }, offset),
                Request::Flush { done } => (Op::Flush { done }, 0),
            };
            let request = InFlight {
                op,
                offset,
                done: 0,
                direct: false,
            };
            match self.slab.insert(request) {
                Ok(index) => self.start(index),
                Err(request) => {
                    request.finish(Err(io_error("submit", offset, io::Error::other("no slot"))));
                }
            }
        }
        self.batch = batch;
    }

    /// Push the SQE for the rest of the request in slot `index`; fail it if that is impossible
    /// (the SQE was then never seen by the kernel, so its buffer may be released).
    fn start(&mut self, index: usize) {
        let user_data = len64(index);
        let shared = Arc::clone(&self.shared);
        let Some(request) = self.slab.get_mut(index) else {
            return;
        };
        let entry = request.entry(&shared, user_data);
        if let Err(e) = self.push(entry) {
            if let Some(request) = self.slab.remove(index) {
                let (name, pos) = (request.name(), request.position());
                request.finish(Err(io_error(name, pos, e)));
            }
        }
    }

    /// Handle every available CQE.
    fn reap(&mut self) {
        let completions: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|cqe| (cqe.user_data(), cqe.result()))
            .collect();
        for (user_data, result) in completions {
            if user_data == WAKE {
                self.rearm_wake();
                continue;
            }
            let Ok(index) = usize::try_from(user_data) else {
                continue;
            };
            let next = match self.slab.get_mut(index) {
                Some(request) => advance(&self.shared, request, result),
                None => {
                    tracing::error!(user_data, "io_uring completion for an empty slot");
                    continue;
                }
            };
            match next {
                Next::Resubmit => self.start(index),
                Next::Finish(r) => {
                    if let Some(request) = self.slab.remove(index) {
                        request.finish(r);
                    }
                }
            }
        }
    }

    /// Clear the eventfd and poll it again (new requests are picked up by `admit` next).
    fn rearm_wake(&mut self) {
        let mut counter = [0u8; 8];
        let _ = rustix::io::read(&self.shared.wake, &mut counter);
        if let Err(e) = self.push(self.wake_entry()) {
            tracing::error!(error = %e, "cannot re-arm the io_uring wake poll");
        }
    }
}

/// Account one CQE of `request`.
fn advance(shared: &Shared, request: &mut InFlight, result: i32) -> Next {
    let pos = request.position();
    let name = request.name();
    let n = match usize::try_from(result) {
        Ok(n) => n,
        Err(_) => {
            let errno = result.checked_neg().unwrap_or(libc::EIO);
            return match errno {
                libc::EINTR | libc::EAGAIN => Next::Resubmit,
                libc::EINVAL if request.direct => {
                    if shared.direct_ok.swap(false, Ordering::Relaxed) {
                        tracing::warn!(
                            offset = pos,
                            "the filesystem refused an O_DIRECT transfer; serving buffered"
                        );
                    }
                    Next::Resubmit
                }
                _ => Next::Finish(Err(io_error(
                    name,
                    pos,
                    io::Error::from_raw_os_error(errno),
                ))),
            };
        }
    };
    if matches!(request.op, Op::Flush { .. }) {
        return Next::Finish(Ok(()));
    }
    if n == 0 {
        let kind = match request.op {
            Op::Read { .. } => io::ErrorKind::UnexpectedEof,
            _ => io::ErrorKind::WriteZero,
        };
        return Next::Finish(Err(io_error(name, pos, kind.into())));
    }
    request.done = request.done.saturating_add(n).min(request.len());
    if request.done < request.len() {
        Next::Resubmit
    } else {
        Next::Finish(Ok(()))
    }
}

impl Drop for Driver {
    /// Normally the slab and the queue are empty here. If the ring failed or the thread is
    /// unwinding, leak what is in flight, and fail what is queued or waiting (the kernel never
    /// saw those buffers).
    fn drop(&mut self) {
        if !self.slab.is_empty() {
            self.fail(io::Error::other("the io_uring thread stopped"));
        }
        drop(self.shared.queue.close(true));
    }
}

impl Driver {
    /// The ring is unusable: fail every request, and leak in-flight buffers, which the kernel
    /// may still be using.
    fn fail(&mut self, e: io::Error) {
        tracing::error!(error = %e, "the io_uring failed; failing in-flight requests");
        for slot in &mut self.slab.slots {
            if let Some(request) = slot.take() {
                let (name, pos) = (request.name(), request.position());
                let InFlight { op, .. } = request;
                let err = io_error(name, pos, io::Error::other("the io_uring failed"));
                match op {
                    Op::Read { buf, done } => {
                        std::mem::forget(buf);
                        done.complete(Err(err));
                    }
                    Op::Write { buf, done, .. } => {
                        std::mem::forget(buf);
                        done.complete(Err(err));
                    }
                    Op::Flush { done } => done.complete(Err(err)),
                }
            }
        }
        // Requests still queued or waiting fail when `Drop` closes the queue.
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::cast_possible_truncation
)]
mod tests {
    use super::*;
    use crate::conformance::pattern;

    fn options(size: u64, direct: bool) -> UringOptions {
        UringOptions {
            size: Some(size),
            create: true,
            direct,
            ring_depth: 16,
            ..UringOptions::default()
        }
    }

    /// A uring backend in a temporary directory that is removed at once.
    fn make(size: u64, direct: bool) -> UringBackend {
        let dir = tempfile::tempdir().unwrap();
        UringBackend::open(dir.path().join("lu.img"), options(size, direct)).unwrap()
    }

    fn make_buffered(size: u64) -> UringBackend {
        make(size, false)
    }

    fn make_direct(size: u64) -> UringBackend {
        make(size, true)
    }

    crate::backstore_conformance!(buffered, super::make_buffered);
    crate::backstore_conformance!(direct, super::make_direct);

    #[test]
    fn io_uring_is_available_here() {
        // The machines this project runs on allow io_uring; if this fails, every test here
        // would too, so say why.
        assert!(
            io_uring_available(),
            "io_uring_setup is refused on this machine"
        );
    }

    #[test]
    fn accepts_direct_on_this_filesystem() {
        let b = make_direct(1 << 20);
        // ext4/xfs/tmpfs (6.6+) all take O_DIRECT; either way, I/O works.
        b.write(0, &pattern(1, 8192), false).unwrap();
        assert_eq!(b.read(0, 8192).unwrap(), pattern(1, 8192));
        assert!(b.is_async());
        eprintln!("O_DIRECT in use on the temp filesystem: {}", b.is_direct());
    }

    #[test]
    fn direct_write_from_unaligned_memory_is_copied() {
        let b = make_direct(1 << 20);
        let data = Bytes::from(pattern(2, 4096 + 1)).slice(1..);
        assert_ne!(data.as_ptr() as usize % DIRECT_ALIGN, 0);
        b.write_async(4096, data.clone(), true).wait().unwrap();
        assert_eq!(b.read(4096, 4096).unwrap(), data);
    }

    #[test]
    fn refused_direct_transfer_falls_back_to_buffered() {
        let b = make_direct(1 << 20);
        if !b.is_direct() {
            return; // Already buffered: the fallback is what every other test runs.
        }
        let b = b.misalign_direct();
        b.write(3, &pattern(6, 1000), false).unwrap();
        assert!(
            !b.is_direct(),
            "an unaligned O_DIRECT write was not refused"
        );
        assert_eq!(b.read(3, 1000).unwrap(), pattern(6, 1000));
        b.write(8192, &pattern(7, 4096), true).unwrap();
        assert_eq!(b.read(8192, 4096).unwrap(), pattern(7, 4096));
    }

    crate::backstore_conformance!(direct_refused, |size| super::make_direct(size)
        .misalign_direct());

    #[test]
    fn read_buffers_are_aligned() {
        let b = make_direct(1 << 20);
        let r = b.read(8192, 4096).unwrap();
        assert_eq!(r.as_ptr() as usize % DIRECT_ALIGN, 0);
    }

    #[test]
    fn transfers_longer_than_the_ring_continue() {
        // 8 MiB in one request through a 1-deep ring: more than a single read(2) may return.
        let dir = tempfile::tempdir().unwrap();
        let b = UringBackend::open(
            dir.path().join("lu.img"),
            UringOptions {
                ring_depth: 1,
                ..options(8 << 20, false)
            },
        )
        .unwrap();
        let data = pattern(3, 8 << 20);
        b.write(0, &data, false).unwrap();
        assert_eq!(b.read(0, 8 << 20).unwrap(), data);
    }

    #[test]
    fn rejects_modification_when_read_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lu.img");
        std::fs::write(&path, vec![3u8; 8192]).unwrap();
        let b = UringBackend::open(
            &path,
            UringOptions {
                read_only: true,
                ..UringOptions::default()
            },
        )
        .unwrap();
        assert!(b.is_read_only());
        assert_eq!(b.size(), 8192);
        assert_eq!(&b.read(0, 2).unwrap()[..], &[3, 3]);
        assert!(matches!(
            b.write_async(0, Bytes::from_static(&[1]), true).wait(),
            Err(BackstoreError::ReadOnly { .. })
        ));
        assert!(matches!(
            b.write(0, &[1], false),
            Err(BackstoreError::ReadOnly { .. })
        ));
        b.flush().unwrap();
    }

    #[test]
    fn rejects_missing_file_without_create() {
        let dir = tempfile::tempdir().unwrap();
        let err = UringBackend::open(dir.path().join("absent.img"), UringOptions::default());
        assert!(matches!(err, Err(BackstoreError::Io { op: "open", .. })));
    }

    #[test]
    fn data_survives_reopen_as_file_backend() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lu.img");
        let b = UringBackend::open(&path, options(1 << 20, true)).unwrap();
        b.write(12_345, &pattern(4, 70_000), true).unwrap();
        b.write(65_536, &pattern(5, 65_536), false).unwrap();
        b.flush().unwrap();
        drop(b);
        let f = FileBackend::open(&path, FileOptions::default()).unwrap();
        assert_eq!(
            f.read(12_345, 65_536 - 12_345).unwrap(),
            pattern(4, 65_536 - 12_345)
        );
        assert_eq!(f.read(65_536, 65_536).unwrap(), pattern(5, 65_536));
    }

    #[test]
    fn accepts_sqpoll_ring() {
        let dir = tempfile::tempdir().unwrap();
        let b = UringBackend::open(
            dir.path().join("lu.img"),
            UringOptions {
                sqpoll: true,
                ..options(1 << 20, false)
            },
        )
        .unwrap();
        let writes: Vec<_> = (0..64u64)
            .map(|i| b.write_async(i * 512, Bytes::from(pattern(i as u8, 512)), false))
            .collect();
        for w in writes {
            w.wait().unwrap();
        }
        for i in 0..64u64 {
            assert_eq!(b.read(i * 512, 512).unwrap(), pattern(i as u8, 512));
        }
        b.flush().unwrap();
    }

    #[test]
    fn accepts_one_io_worker() {
        // Buffered FUA writes and flushes need io-wq workers; one is enough to finish them.
        let dir = tempfile::tempdir().unwrap();
        let b = UringBackend::open(
            dir.path().join("lu.img"),
            UringOptions {
                io_workers: 1,
                ..options(1 << 20, false)
            },
        )
        .unwrap();
        let writes: Vec<_> = (0..32u64)
            .map(|i| b.write_async(i * 4096, Bytes::from(pattern(i as u8, 4096)), true))
            .collect();
        let flush = b.flush_async();
        for w in writes {
            w.wait().unwrap();
        }
        flush.wait().unwrap();
        for i in 0..32u64 {
            assert_eq!(b.read(i * 4096, 4096).unwrap(), pattern(i as u8, 4096));
        }
    }

    #[test]
    fn refused_setup_maps_to_unsupported() {
        // ENOSYS: no io_uring in the kernel; EPERM: seccomp or kernel.io_uring_disabled = 2.
        for errno in [libc::ENOSYS, libc::EPERM, libc::EACCES, libc::EINVAL] {
            assert!(matches!(
                setup_error(io::Error::from_raw_os_error(errno)),
                BackstoreError::Unsupported("io_uring")
            ));
        }
        assert!(matches!(
            setup_error(io::Error::from_raw_os_error(libc::ENOMEM)),
            BackstoreError::Io {
                op: "io_uring_setup",
                ..
            }
        ));
    }

    #[test]
    fn rejects_empty_and_out_of_range_without_the_ring() {
        let b = make_buffered(4096);
        assert!(b.write_async(4096, Bytes::new(), false).is_ready());
        assert!(b.read_async(0, 0).is_ready());
        let past = b.read_async(4000, 97);
        assert!(past.is_ready());
        assert!(matches!(
            past.wait(),
            Err(BackstoreError::OutOfRange { .. })
        ));
    }

    fn tiny_ring(size: u64, depth: u32) -> UringBackend {
        let dir = tempfile::tempdir().unwrap();
        UringBackend::open(
            dir.path().join("lu.img"),
            UringOptions {
                ring_depth: depth,
                ..options(size, false)
            },
        )
        .unwrap()
    }

    /// Run `f` on a current-thread runtime in a thread of its own; fail (instead of hanging)
    /// if it does not finish within a minute, e.g. because a submitter blocked the thread.
    fn on_current_thread<F>(f: impl FnOnce() -> F + Send + 'static)
    where
        F: std::future::Future<Output = ()>,
    {
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            rt.block_on(f());
            let _ = tx.send(());
        });
        match rx.recv_timeout(std::time::Duration::from_secs(60)) {
            Ok(()) => t.join().unwrap(),
            Err(_) if t.is_finished() => std::panic::resume_unwind(t.join().unwrap_err()),
            Err(_) => panic!("the runtime's thread is stuck"),
        }
    }

    /// A ring 2 deep whose thread takes nothing: 64 tasks of one current-thread runtime submit
    /// reads and writes; 2 are queued, 62 wait in their futures, and a task on the same thread
    /// keeps running. Once the ring resumes, every request completes.
    #[test]
    fn full_ring_never_blocks_a_current_thread_runtime() {
        use std::sync::atomic::AtomicUsize;
        const N: u64 = 64;
        let b = Arc::new(tiny_ring(1 << 20, 2));
        for i in 0..N {
            b.write(i * 4096, &pattern(i as u8, 4096), false).unwrap();
        }
        let b2 = Arc::clone(&b);
        on_current_thread(move || async move {
            let b = b2;
            b.stall(true);
            let ticks = Arc::new(AtomicUsize::new(0));
            let ticker = {
                let ticks = Arc::clone(&ticks);
                tokio::spawn(async move {
                    loop {
                        ticks.fetch_add(1, Ordering::SeqCst);
                        tokio::task::yield_now().await;
                    }
                })
            };
            let tasks: Vec<_> = (0..N)
                .map(|i| {
                    let b = Arc::clone(&b);
                    tokio::spawn(async move {
                        if i % 2 == 0 {
                            let got = b.read_async(i * 4096, 4096).await.unwrap();
                            assert_eq!(got, pattern(i as u8, 4096), "read {i}");
                        } else {
                            let data = Bytes::from(pattern(100 + i as u8, 4096));
                            b.write_async((512 << 10) + i * 4096, data, i % 4 == 1)
                                .await
                                .unwrap();
                        }
                    })
                })
                .collect();
            for _ in 0..20 {
                tokio::task::yield_now().await;
            }
            assert_eq!(b.shared.queue.counts(), (2, N as usize - 2));
            let before = ticks.load(Ordering::SeqCst);
            for _ in 0..100 {
                tokio::task::yield_now().await;
            }
            assert!(
                ticks.load(Ordering::SeqCst) >= before + 50,
                "the ticker stalled"
            );
            assert!(tasks.iter().all(|t| !t.is_finished()));
            b.stall(false);
            for t in tasks {
                t.await.unwrap();
            }
            assert_eq!(b.shared.queue.counts(), (0, 0));
            assert!(ticks.load(Ordering::SeqCst) > before + 100);
            ticker.abort();
        });
        for i in (1..N).step_by(2) {
            let got = b.read((512 << 10) + i * 4096, 4096).unwrap();
            assert_eq!(got, pattern(100 + i as u8, 4096), "write {i}");
        }
    }

    /// Waiting futures get places in the order they first polled; one dropped while waiting,
    /// or after being granted a place, cancels its request and passes the place on.
    #[test]
    fn dropped_waiters_cancel_and_pass_their_place_on() {
        use std::task::Wake;
        struct Flag(AtomicBool);
        impl Wake for Flag {
            fn wake(self: Arc<Self>) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let b = tiny_ring(1 << 20, 1);
        b.stall(true);
        let write = |i: u64| b.write_async(i * 4096, Bytes::from(pattern(i as u8, 4096)), false);
        let f0 = write(0);
        assert!(!f0.is_waiting(), "a free place is taken at once");
        let mut waiting: Vec<_> = (1..6).map(write).collect();
        assert!(waiting.iter().all(IoFuture::is_waiting));
        let flags: Vec<_> = (0..5)
            .map(|_| Arc::new(Flag(AtomicBool::new(false))))
            .collect();
        for (f, flag) in waiting.iter_mut().zip(&flags) {
            let waker = Waker::from(Arc::clone(flag));
            let mut cx = Context::from_waker(&waker);
            assert!(std::future::Future::poll(std::pin::Pin::new(f), &mut cx).is_pending());
        }
        assert_eq!(b.shared.queue.counts(), (1, 5));
        b.stall(false);
        f0.wait().unwrap();
        // The ring took f0's request: its place went to the first waiter, which was woken.
        assert!(flags[0].0.load(Ordering::SeqCst));
        assert!(!flags[1].0.load(Ordering::SeqCst));
        let mut waiting = waiting.into_iter();
        let (f1, f2, f3, f4, f5) = (
            waiting.next().unwrap(),
            waiting.next().unwrap(),
            waiting.next().unwrap(),
            waiting.next().unwrap(),
            waiting.next().unwrap(),
        );
        drop(f1); // Granted, never handed over: the place goes to f2.
        assert!(flags[1].0.load(Ordering::SeqCst));
        drop(f3); // Still waiting.
        assert_eq!(b.shared.queue.counts(), (0, 2));
        // f2 holds the only place; then f4, then f5 get it in turn.
        f2.wait().unwrap();
        f4.wait().unwrap();
        f5.wait().unwrap();
        assert_eq!(b.shared.queue.counts(), (0, 0));
        for i in 0..6u64 {
            let want = if i == 1 || i == 3 {
                vec![0; 4096]
            } else {
                pattern(i as u8, 4096)
            };
            assert_eq!(b.read(i * 4096, 4096).unwrap(), want, "block {i}");
        }
    }

    /// Dropping the backend fails the futures still waiting for a place (they do not hang)
    /// and finishes the queued request.
    #[test]
    fn waiting_futures_fail_when_the_backend_goes() {
        let b = tiny_ring(1 << 20, 1);
        b.stall(true);
        let queued = b.write_async(0, Bytes::from(pattern(1, 4096)), false);
        let waiting: Vec<_> = (1..4u64).map(|i| b.read_async(i * 4096, 4096)).collect();
        assert!(waiting.iter().all(IoFuture::is_waiting));
        b.stall(false);
        drop(b);
        queued.wait().unwrap();
        for f in waiting {
            assert!(matches!(f.wait(), Err(BackstoreError::Io { .. })));
        }
    }

    #[test]
    fn aligned_buf_is_aligned_and_sized() {
        for len in [1usize, 511, 4096, 70_001] {
            let mut b = AlignedBuf::zeroed(len).unwrap();
            assert_eq!(b.as_mut_slice().len(), len);
            assert_eq!(b.as_ref().as_ptr() as usize % DIRECT_ALIGN, 0);
            assert!(b.as_ref().iter().all(|&x| x == 0));
        }
        assert!(AlignedBuf::zeroed(usize::MAX).is_none());
    }
}
