//! EXTENDED COPY in the daemon: the copy manager's data movement (SPC-4 §6.4).
//!
//! The LU has parsed and bounded the parameter list ([`ironlun_scsi::xcopy`]); here each
//! identification CSCD descriptor is resolved to a logical unit of the target that the issuing
//! nexus sees (by its NAA designator, association logical unit), and each block → block
//! segment is copied backstore to backstore in chunks of [`CHUNK_BYTES`], the next chunk read
//! while the previous one is written, never through the initiator.
//!
//! Access: before each segment the issuing nexus must be allowed to READ the source and
//! WRITE the destination under their reservations (else RESERVATION CONFLICT). Bounds:
//! between chunks the copy stops with TASK ABORTED when a LUN RESET, target reset or CLEAR
//! TASK SET reached the source or destination ([`LogicalUnit::abort_epoch`]), and with COPY
//! ABORTED once it has run for [`COPY_TIME_LIMIT`] ([`CopyHook`] stands in for time in tests). ABORT TASK / ABORT TASK SET drop the
//! command's future (see `server.rs`); a chunk already on the blocking pool finishes first.
//!
//! COMPARE AND WRITE (SBC-3 §5.2): every chunk read and chunk write enters the task set of
//! its own LU, source or destination, for as long as its I/O runs
//! (`LunHandle::copy_io`, `LogicalUnit::copy_io`). So it takes that LU's range lock like a
//! command's I/O: it does not start while it overlaps a COMPARE AND WRITE of that LU, and a
//! COMPARE AND WRITE does not start its read while a chunk overlaps it. No chunk I/O lands
//! between the read and the write of a COMPARE AND WRITE on either LU. The copy's own task
//! (on the issuing LU) holds no range, so a long copy blocks only what its current chunks
//! overlap. A chunk that task management aborts ends the copy (TASK ABORTED after a LUN
//! RESET or CLEAR TASK SET).
//!
//! [`LogicalUnit::abort_epoch`]: ironlun_scsi::LogicalUnit::abort_epoch

use super::LunHandle;
use bytes::Bytes;
use ironlun_scsi::lu::{IoErrorKind, IoOp, IoResult, NexusId};
use ironlun_scsi::sense::SenseReason;
use ironlun_scsi::xcopy::{CopyEnd, CopyJob, CopyOutcome, CopyTarget, Segment};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bytes moved per read / write.
pub const CHUNK_BYTES: u64 = 8 * 1024 * 1024;

/// Longest an EXTENDED COPY may run before it ends in COPY ABORTED (default).
pub const COPY_TIME_LIMIT: Duration = Duration::from_secs(120);

/// A test hook on the copy manager, in place of pauses and short limits on the wall clock: a
/// copy whose destination LU carries one ([`LunHandle::copy_hook`]) waits before each chunk
/// until the hook lets it pass, and counts as past its time limit once the hook says so.
/// Tests install it on an in-process daemon; the served binary never has one.
pub struct CopyHook {
    /// Chunks allowed to start.
    passes: tokio::sync::Semaphore,
    /// Chunk boundaries reached so far (each before its chunk's wait).
    reached: tokio::sync::watch::Sender<u64>,
    /// Copies waiting here now (a copy dropped while it waits, as by ABORT TASK, leaves).
    waiting: tokio::sync::watch::Sender<usize>,
    /// The time limit counts as passed.
    expired: std::sync::atomic::AtomicBool,
}

impl Default for CopyHook {
    fn default() -> Self {
        CopyHook {
            passes: tokio::sync::Semaphore::new(0),
            reached: tokio::sync::watch::Sender::new(0),
            waiting: tokio::sync::watch::Sender::new(0),
            expired: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

impl CopyHook {
    /// Let `chunks` more chunks start.
    pub fn allow(&self, chunks: usize) {
        self.passes.add_permits(chunks);
    }

    /// Wait until copies have reached `n` chunk boundaries in all (the `n`-th chunk is about
    /// to wait or has passed).
    pub async fn reached(&self, n: u64) {
        let mut rx = self.reached.subscribe();
        let _ = rx.wait_for(|r| *r >= n).await;
    }

    /// Wait until no copy waits here (every one passed, ended or was dropped).
    pub async fn idle(&self) {
        let mut rx = self.waiting.subscribe();
        let _ = rx.wait_for(|w| *w == 0).await;
    }

    /// From now on copies through this hook find their time limit passed.
    pub fn expire(&self) {
        self.expired
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    async fn before_chunk(&self) {
        /// Counts the copy out of `waiting` however its wait ends.
        struct Waiting<'a>(&'a tokio::sync::watch::Sender<usize>);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.send_modify(|w| *w = w.saturating_sub(1));
            }
        }
        self.waiting.send_modify(|w| *w = w.saturating_add(1));
        let _waiting = Waiting(&self.waiting);
        self.reached.send_modify(|r| *r = r.saturating_add(1));
        if let Ok(permit) = self.passes.acquire().await {
            permit.forget();
        }
    }

    fn is_expired(&self) -> bool {
        self.expired.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Carry out `job` for `nexus` over the logical units it sees (`luns`), for at most
/// [`COPY_TIME_LIMIT`].
pub async fn run(
    luns: &BTreeMap<u64, Arc<LunHandle>>,
    nexus: NexusId,
    job: &CopyJob,
) -> CopyOutcome {
    run_until(luns, nexus, job, Instant::now() + COPY_TIME_LIMIT).await
}

/// [`run`] with an explicit deadline.
pub async fn run_until(
    luns: &BTreeMap<u64, Arc<LunHandle>>,
    nexus: NexusId,
    job: &CopyJob,
    deadline: Instant,
) -> CopyOutcome {
    let mut out = CopyOutcome {
        segments: 0,
        bytes: 0,
        end: CopyEnd::Good,
    };
    let mut targets = Vec::with_capacity(job.targets.len());
    for t in &job.targets {
        match resolve(luns, t) {
            Ok(h) => targets.push(h),
            Err(reason) => {
                out.end = CopyEnd::Failed(reason);
                return out;
            }
        }
    }
    for seg in &job.segments {
        let (moved, end) = copy_segment(&targets, nexus, seg, deadline).await;
        out.bytes = out.bytes.saturating_add(moved);
        if let Some(end) = end {
            tracing::debug!(?end, segment = out.segments, "EXTENDED COPY ended early");
            out.end = end;
            return out;
        }
        out.segments = out.segments.saturating_add(1);
    }
    out
}

/// The logical unit a CSCD descriptor names: NAA designator, association logical unit, among
/// the LUs the nexus sees; its DISK BLOCK LENGTH, when given, must be the LU's.
fn resolve(
    luns: &BTreeMap<u64, Arc<LunHandle>>,
    target: &CopyTarget,
) -> Result<Arc<LunHandle>, SenseReason> {
    let naa = target
        .designator
        .lu_naa()
        .ok_or(SenseReason::CopyTargetNotReachable)?;
    let h = luns
        .values()
        .find(|h| h.lu().config().naa == naa)
        .ok_or(SenseReason::CopyTargetNotReachable)?;
    let bs = h.lu().config().block_size;
    if target.block_len != 0 && target.block_len != bs {
        return Err(SenseReason::InvalidCopyOperation);
    }
    Ok(h.clone())
}

/// What a copy needs to know of one side, read under its LU lock.
struct Side {
    block_size: u32,
    num_blocks: u64,
    epoch: u64,
    conflict: bool,
    read_only: bool,
    fua: bool,
}

fn side(h: &LunHandle, nexus: NexusId, write: bool) -> Side {
    let lu = h.lu();
    Side {
        block_size: lu.config().block_size,
        num_blocks: lu.config().num_blocks,
        epoch: lu.abort_epoch(),
        conflict: lu.copy_access_conflicts(nexus, write),
        read_only: lu.write_protected(),
        fua: !lu.mode_values().wce,
    }
}

/// Byte offset and length of `blocks` blocks at `lba`, inside a `num_blocks` medium.
fn extent(lba: u64, blocks: u16, bs: u32, num_blocks: u64) -> Option<(u64, u64)> {
    let end = lba.checked_add(u64::from(blocks))?;
    if end > num_blocks {
        return None;
    }
    Some((
        lba.checked_mul(u64::from(bs))?,
        u64::from(blocks).checked_mul(u64::from(bs))?,
    ))
}

/// Copy one segment; the bytes written, and how it ended if not well.
async fn copy_segment(
    targets: &[Arc<LunHandle>],
    nexus: NexusId,
    seg: &Segment,
    deadline: Instant,
) -> (u64, Option<CopyEnd>) {
    let fail = |r| (0, Some(CopyEnd::Failed(r)));
    let (Some(src), Some(dst)) = (
        targets.get(usize::from(seg.src)),
        targets.get(usize::from(seg.dst)),
    ) else {
        return fail(SenseReason::CopyTargetNotReachable);
    };
    let s = side(src, nexus, false);
    let d = side(dst, nexus, true);
    if s.conflict || d.conflict {
        return (0, Some(CopyEnd::Conflict));
    }
    if d.read_only {
        return fail(SenseReason::WriteProtected);
    }
    if s.block_size != d.block_size {
        return fail(SenseReason::InvalidCopyOperation);
    }
    let (Some((src_off, len)), Some((dst_off, _))) = (
        extent(seg.src_lba, seg.blocks, s.block_size, s.num_blocks),
        extent(seg.dst_lba, seg.blocks, d.block_size, d.num_blocks),
    ) else {
        return fail(SenseReason::CopyAborted);
    };
    if len == 0 {
        return (0, None);
    }
    // Chunks in the order that never reads what this segment already wrote: backwards when
    // the destination overlaps the source from above.
    let mut chunks: Vec<(u64, u64)> = Vec::new();
    let mut pos = 0u64;
    while pos < len {
        let n = CHUNK_BYTES.min(len - pos);
        chunks.push((pos, n));
        pos += n;
    }
    if Arc::ptr_eq(src, dst) && dst_off > src_off && dst_off < src_off.saturating_add(len) {
        chunks.reverse();
    }
    let read = |(pos, n): (u64, u64)| {
        io(
            src,
            nexus,
            IoOp::Read {
                offset: src_off + pos,
                len: n,
            },
        )
    };
    let mut moved = 0u64;
    let Some(&first) = chunks.first() else {
        return (0, None);
    };
    let mut data = read(first).await;
    let hook = dst.copy_hook.get();
    for (i, &(pos, n)) in chunks.iter().enumerate() {
        if let Some(h) = hook {
            h.before_chunk().await;
        }
        if Instant::now() >= deadline || hook.is_some_and(|h| h.is_expired()) {
            return (moved, Some(CopyEnd::Failed(SenseReason::CopyAborted)));
        }
        // One LU lock at a time (source and destination may be the same LU).
        let src_epoch = src.lu().abort_epoch();
        let dst_epoch = dst.lu().abort_epoch();
        if src_epoch != s.epoch || dst_epoch != d.epoch {
            return (moved, Some(CopyEnd::Aborted));
        }
        let bytes = match data {
            IoResult::Data(b) if u64::try_from(b.len()).is_ok_and(|l| l == n) => b,
            _ => return (moved, Some(failed(src, dst, &s, &d))),
        };
        let write = io(
            dst,
            nexus,
            IoOp::Write {
                offset: dst_off + pos,
                data: bytes,
                fua: d.fua,
            },
        );
        let written = match chunks.get(i + 1) {
            Some(&next) => {
                let (w, r) = tokio::join!(write, read(next));
                data = r;
                w
            }
            None => {
                data = IoResult::Data(Bytes::new());
                write.await
            }
        };
        if written != IoResult::Done {
            return (moved, Some(failed(src, dst, &s, &d)));
        }
        moved += n;
    }
    (moved, None)
}

/// How a copy ends after a chunk failed: TASK ABORTED when a LUN RESET, target reset or
/// CLEAR TASK SET reached either side meanwhile (it aborted the chunk), else COPY ABORTED.
fn failed(src: &LunHandle, dst: &LunHandle, s: &Side, d: &Side) -> CopyEnd {
    let src_epoch = src.lu().abort_epoch();
    let dst_epoch = dst.lu().abort_epoch();
    if src_epoch != s.epoch || dst_epoch != d.epoch {
        CopyEnd::Aborted
    } else {
        CopyEnd::Failed(SenseReason::CopyAborted)
    }
}

/// One backstore operation of the copy on `h`, under `h`'s COMPARE AND WRITE range lock (module
/// doc), off the runtime's workers (awaited directly on async backends).
async fn io(h: &Arc<LunHandle>, nexus: NexusId, op: IoOp) -> IoResult {
    h.copy_io(nexus, op)
        .await
        .unwrap_or(IoResult::Error(IoErrorKind::Other))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn extents_stay_inside_the_medium() {
        assert_eq!(extent(0, 8, 512, 8), Some((0, 4096)));
        assert_eq!(extent(1, 8, 512, 8), None);
        assert_eq!(extent(u64::MAX, 1, 512, u64::MAX), None);
        assert_eq!(extent(u64::MAX / 2, 1, 512, u64::MAX), None);
    }
}
