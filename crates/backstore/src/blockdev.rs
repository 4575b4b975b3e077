//! Block-device backstore (`backstore = "block"`): a whole disk, partition, LVM volume or loop
//! device under `/dev`, served as one LU.
//!
//! - Opening: the path must name a block device (a regular file is refused: that is the `file`
//!   backstore's job). It is opened with `O_EXCL`, so a device that is mounted, a member of an
//!   md/LVM/dm stack, or held exclusively by another program is refused (`EBUSY`). The size is
//!   the device's (`lseek(SEEK_END)`; `stat` reports 0 for devices) and cannot be configured;
//!   [`BlockDevBackend::logical_block_size`] is the device's `BLKSSZGET`, which the LU's block
//!   size must be a multiple of (checked by the daemon when it opens the LUN).
//! - I/O: `pread`/`pwrite` through the page cache (any byte alignment). FUA (as for the file
//!   backstore: SBC-3 §5.40) is `pwritev2(RWF_DSYNC)`, or `pwrite` + `fdatasync` where the
//!   kernel lacks it; `flush` (SYNCHRONIZE CACHE, SBC-3 §5.34) is `fdatasync`, which on a block
//!   device also flushes the device's volatile cache.
//! - Zeroing (SBC-3 §4.7, UNMAP and WRITE SAME): the part of the range aligned to the logical
//!   block size goes to the kernel, the unaligned head and tail are written as zeroes. With
//!   deallocation allowed the kernel is asked for `fallocate(PUNCH_HOLE | KEEP_SIZE)`, which on a
//!   block device is a write-zeroes request the device may satisfy by deallocating and which
//!   fails with `EOPNOTSUPP` rather than leave anything but zeroes behind. Then, and for zeroing
//!   without deallocation, `fallocate(ZERO_RANGE | KEEP_SIZE)`, then the `BLKZEROOUT` ioctl
//!   (kernels before 4.9), then zeroes written in bounded buffers. Whichever path runs, the
//!   range reads as zeroes afterwards.
//! - Thin provisioning: see [`BlockDevBackend::thin_provisioning`]. A block device cannot say
//!   which of its blocks are allocated, so [`extents`](BlockBackend::extents) reports
//!   everything mapped: GET LBA STATUS answers "mapped" even right after an UNMAP. UNMAP only
//!   *requests* deallocation, so an LBA still reported mapped is allowed; it reads as zeroes
//!   either way (LBPRZ). libiscsi's GetLBAStatus suite passes against a loop device with
//!   thin provisioning on (initiator-tests/tests/blockdev.rs).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use rustix::fs::{FallocateFlags, SeekFrom};
use rustix::io::Errno;

use crate::buffers::BufferPool;
use crate::file::{errno_error, io_error, len64, try_fallocate, unsupported, write_at};
use crate::{check_range, BackstoreError, BlockBackend, Extent, Result, MAX_SIZE};

/// Largest buffer used to write zeroes where the kernel cannot zero a range itself.
const ZERO_BUFFER: u64 = 1 << 20;

/// How to open a [`BlockDevBackend`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockDevOptions {
    /// Open read-only: every modifying operation fails with [`BackstoreError::ReadOnly`].
    pub read_only: bool,
}

/// The kernel interfaces a [`BlockDevBackend`] uses before its fallbacks (a test hook).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FastPaths {
    /// FUA writes with `pwritev2(RWF_DSYNC)` (else `pwrite` + `fdatasync`).
    pub dsync: bool,
    /// `fallocate(PUNCH_HOLE)` for deallocating zeroing.
    pub punch_hole: bool,
    /// `fallocate(ZERO_RANGE)`.
    pub zero_range: bool,
    /// `ioctl(BLKZEROOUT)`.
    pub zeroout: bool,
}

/// A backstore over a block device. See the module documentation.
#[derive(Debug)]
pub struct BlockDevBackend {
    file: File,
    path: PathBuf,
    /// Size in bytes: the device's at open, grown by [`BlockBackend::resize`].
    size: AtomicU64,
    logical_block_size: u32,
    read_only: bool,
    /// The device can deallocate (see [`BlockDevBackend::thin_provisioning`]).
    thin: bool,
    /// `pwritev2(RWF_DSYNC)` still believed supported.
    dsync: AtomicBool,
    /// `fallocate(PUNCH_HOLE)` still believed supported.
    punch_hole: AtomicBool,
    /// `fallocate(ZERO_RANGE)` still believed supported.
    zero_range: AtomicBool,
    /// `ioctl(BLKZEROOUT)` still believed supported.
    zeroout: AtomicBool,
    /// Recycled buffers for large reads (see [`crate::buffers`]).
    buffers: Arc<BufferPool>,
}

fn open_error(path: &Path, kind: io::ErrorKind, what: impl std::fmt::Display) -> BackstoreError {
    BackstoreError::Io {
        op: "open",
        offset: 0,
        source: io::Error::new(kind, format!("{}: {what}", path.display())),
    }
}

/// `ioctl(fd, BLKZEROOUT, [start, len])`: zero a 512-byte aligned range on the device, writing
/// zeroes if the device has no zeroing command; the page cache over it is dropped.
#[allow(unsafe_code)]
fn blkzeroout(file: &File, start: u64, len: u64) -> std::result::Result<(), Errno> {
    /// `_IO(0x12, 127)` in `<linux/fs.h>`; the argument is a pointer to `u64[2]`.
    const BLKZEROOUT: rustix::ioctl::Opcode = rustix::ioctl::opcode::none(0x12, 127);
    // SAFETY: BLKZEROOUT reads exactly a `[u64; 2]` (start, length in bytes) through the
    // pointer the `Setter` passes, which points at its own `input` field for the whole call;
    // the kernel writes nothing back.
    unsafe {
        let ctl = rustix::ioctl::Setter::<BLKZEROOUT, [u64; 2]>::new([start, len]);
        rustix::ioctl::ioctl(file, ctl)
    }
}

/// Whether `/sys/dev/block/MAJ:MIN` says the device can deallocate: it accepts discards and
/// write-zeroes requests (what `fallocate(PUNCH_HOLE)` sends). Partitions keep their queue
/// limits in the parent disk's directory. `false` when sysfs is not there to ask.
fn device_can_deallocate(rdev: u64) -> bool {
    let dev = format!(
        "/sys/dev/block/{}:{}",
        rustix::fs::major(rdev),
        rustix::fs::minor(rdev)
    );
    let limit = |name: &str| -> Option<u64> {
        [
            format!("{dev}/queue/{name}"),
            format!("{dev}/../queue/{name}"),
        ]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .and_then(|s| s.trim().parse().ok())
    };
    limit("discard_max_bytes").is_some_and(|n| n > 0)
        && limit("write_zeroes_max_bytes").is_some_and(|n| n > 0)
}

impl BlockDevBackend {
    /// Open the block device at `path` (symlinks such as `/dev/disk/by-id/...` are followed).
    ///
    /// Fails, naming the path, when it is not a block device, when the device is in use
    /// (mounted or opened with `O_EXCL` elsewhere: `EBUSY`), or when it cannot be opened.
    pub fn open(path: impl AsRef<Path>, options: BlockDevOptions) -> Result<Self> {
        let path = path.as_ref();
        // Refuse before opening: opening a FIFO would block, a regular file is the wrong backstore.
        let meta = std::fs::metadata(path).map_err(|e| open_error(path, e.kind(), e))?;
        if !meta.file_type().is_block_device() {
            let what = if meta.is_file() {
                "is a regular file, not a block device (use backstore = \"file\" for files)"
            } else {
                "is not a block device"
            };
            return Err(open_error(path, io::ErrorKind::InvalidInput, what));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(!options.read_only)
            // On a block device, O_EXCL without O_CREAT claims the device exclusively.
            .custom_flags(libc::O_EXCL)
            .open(path)
            .map_err(|e| {
                if Errno::from_io_error(&e) == Some(Errno::BUSY) {
                    open_error(
                        path,
                        e.kind(),
                        "the device is in use (mounted, part of a RAID/LVM/dm stack, or opened \
                         exclusively by another program)",
                    )
                } else {
                    open_error(path, e.kind(), e)
                }
            })?;
        // The path may have been replaced between the check and the open.
        let meta = file.metadata().map_err(|e| open_error(path, e.kind(), e))?;
        if !meta.file_type().is_block_device() {
            return Err(open_error(
                path,
                io::ErrorKind::InvalidInput,
                "is not a block device",
            ));
        }
        let size =
            rustix::fs::seek(&file, SeekFrom::End(0)).map_err(|e| errno_error("open", 0, e))?;
        check_range(0, size, MAX_SIZE)?;
        let logical_block_size =
            rustix::fs::ioctl_blksszget(&file).map_err(|e| errno_error("open", 0, e))?;
        if !logical_block_size.is_power_of_two() || logical_block_size < 512 {
            return Err(open_error(
                path,
                io::ErrorKind::InvalidData,
                format!("the device reports a logical block size of {logical_block_size}"),
            ));
        }
        Ok(Self {
            thin: device_can_deallocate(meta.rdev()),
            buffers: BufferPool::new(),
            file,
            path: path.to_owned(),
            size: AtomicU64::new(size),
            logical_block_size,
            read_only: options.read_only,
            dsync: AtomicBool::new(true),
            punch_hole: AtomicBool::new(true),
            zero_range: AtomicBool::new(true),
            zeroout: AtomicBool::new(true),
        })
    }

    /// The device's logical block size (`BLKSSZGET`): the unit it reads, writes and zeroes.
    pub fn logical_block_size(&self) -> u32 {
        self.logical_block_size
    }

    /// The path the device was opened by.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the backstore was opened read-only.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Which kernel paths are still in use (each is dropped after its first `EOPNOTSUPP`).
    #[doc(hidden)]
    pub fn fast_paths(&self) -> FastPaths {
        FastPaths {
            dsync: self.dsync.load(Ordering::Relaxed),
            punch_hole: self.punch_hole.load(Ordering::Relaxed),
            zero_range: self.zero_range.load(Ordering::Relaxed),
            zeroout: self.zeroout.load(Ordering::Relaxed),
        }
    }

    /// Behave as on a kernel that lacks the paths set to `false`, so tests exercise each
    /// fallback (down to zeroes written by hand and `pwrite` + `fdatasync` for FUA).
    #[doc(hidden)]
    pub fn with_fast_paths(self, paths: FastPaths) -> Self {
        self.dsync.store(paths.dsync, Ordering::Relaxed);
        self.punch_hole.store(paths.punch_hole, Ordering::Relaxed);
        self.zero_range.store(paths.zero_range, Ordering::Relaxed);
        self.zeroout.store(paths.zeroout, Ordering::Relaxed);
        self
    }

    fn writable(&self, op: &'static str) -> Result<()> {
        if self.read_only {
            Err(BackstoreError::ReadOnly { op })
        } else {
            Ok(())
        }
    }

    /// `BLKZEROOUT` over a checked, non-empty, block-aligned range; `Ok(false)` if unsupported.
    fn try_zeroout(&self, op: &'static str, offset: u64, len: u64) -> Result<bool> {
        if !self.zeroout.load(Ordering::Relaxed) {
            return Ok(false);
        }
        loop {
            match blkzeroout(&self.file, offset, len) {
                Ok(()) => return Ok(true),
                Err(Errno::INTR) => {}
                Err(e) if unsupported(e) => {
                    self.zeroout.store(false, Ordering::Relaxed);
                    return Ok(false);
                }
                Err(e) => return Err(errno_error(op, offset, e)),
            }
        }
    }

    /// Write zeroes over a checked range in buffers of at most [`ZERO_BUFFER`] bytes.
    fn write_zero_buffers(&self, offset: u64, len: u64) -> Result<()> {
        let zeroes = vec![0u8; usize::try_from(len.min(ZERO_BUFFER)).unwrap_or(0)];
        let step = len64(zeroes.len());
        let mut at = offset;
        let end = offset.saturating_add(len);
        while at < end {
            let n = (end - at).min(step);
            let chunk = zeroes
                .get(..usize::try_from(n).unwrap_or(0))
                .unwrap_or_default();
            self.file
                .write_all_at(chunk, at)
                .map_err(|e| io_error("write zeroes", at, e))?;
            at = at.saturating_add(n);
        }
        Ok(())
    }

    /// Zero a checked range: the block-aligned middle through the kernel (deallocating when
    /// `unmap` and the device can), the unaligned head and tail by hand.
    fn zero(&self, op: &'static str, offset: u64, len: u64, unmap: bool) -> Result<()> {
        let end = offset.saturating_add(len);
        let block = u64::from(self.logical_block_size);
        // Round inwards; `block` is a power of two >= 512 (checked at open).
        let first = offset.div_ceil(block).saturating_mul(block).min(end);
        let last = (end / block).saturating_mul(block).max(first);
        if first > offset {
            self.write_zero_buffers(offset, first - offset)?;
        }
        if last > first {
            self.zero_aligned(op, first, last - first, unmap)?;
        }
        if end > last {
            self.write_zero_buffers(last, end - last)?;
        }
        Ok(())
    }

    fn zero_aligned(&self, op: &'static str, offset: u64, len: u64, unmap: bool) -> Result<()> {
        let keep = FallocateFlags::KEEP_SIZE;
        if unmap
            && try_fallocate(
                &self.file,
                op,
                FallocateFlags::PUNCH_HOLE | keep,
                &self.punch_hole,
                offset,
                len,
            )?
        {
            return Ok(());
        }
        if try_fallocate(
            &self.file,
            op,
            FallocateFlags::ZERO_RANGE | keep,
            &self.zero_range,
            offset,
            len,
        )? {
            return Ok(());
        }
        if self.try_zeroout(op, offset, len)? {
            return Ok(());
        }
        self.write_zero_buffers(offset, len)
    }
}

impl BlockBackend for BlockDevBackend {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    /// After the device itself grew (`lvextend`, `losetup -c`, a grown SAN volume): serve up to
    /// `new_size`, which must not pass the device's size as the kernel now reports it.
    fn resize(&self, new_size: u64) -> Result<()> {
        if !crate::check_resize(self.size(), new_size)? {
            return Ok(());
        }
        let device = rustix::fs::seek(&self.file, SeekFrom::End(0))
            .map_err(|e| errno_error("resize", 0, e))?;
        check_range(0, new_size, device)?;
        self.size.store(new_size, Ordering::Relaxed);
        Ok(())
    }

    fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        check_range(offset, len64(len), self.size())?;
        self.buffers.read_with(len, |buf| {
            self.file
                .read_exact_at(buf, offset)
                .map_err(|e| io_error("read", offset, e))
        })
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        self.writable("write")?;
        check_range(offset, len64(data.len()), self.size())?;
        write_at(&self.file, &self.dsync, offset, data, fua)
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data().map_err(|e| io_error("flush", 0, e))
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.writable("write zeroes")?;
        check_range(offset, len, self.size())?;
        if len == 0 {
            return Ok(());
        }
        self.zero("write zeroes", offset, len, unmap)
    }

    fn unmap(&self, offset: u64, len: u64) -> Result<()> {
        self.writable("unmap")?;
        check_range(offset, len, self.size())?;
        if len == 0 {
            return Ok(());
        }
        self.zero("unmap", offset, len, true)
    }

    /// `true` when sysfs reports that the device accepts both discards and write-zeroes
    /// requests (`queue/discard_max_bytes` and `queue/write_zeroes_max_bytes` non-zero): then
    /// `unmap` sends a write-zeroes request that allows deallocation, which such devices honour
    /// (a loop device punches a hole in its backing file, NVMe sets DEAC, SCSI disks use
    /// WRITE SAME with UNMAP). Otherwise `false`: the LU reports
    /// full provisioning. Zeroes are guaranteed after `unmap` in both cases. Decided once, at
    /// open.
    fn thin_provisioning(&self) -> bool {
        self.thin
    }

    /// Always one mapped extent: a block device does not report which blocks it allocated.
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(offset, len, self.size())?;
        if len == 0 {
            return Ok(Vec::new());
        }
        Ok(vec![Extent {
            offset,
            len,
            mapped: true,
        }])
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn refuses_a_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lu.img");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let err = BlockDevBackend::open(&path, BlockDevOptions::default()).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("not a block device"), "{msg}");
        assert!(msg.contains("backstore = \"file\""), "{msg}");
        assert!(msg.contains("lu.img"), "{msg}");
    }

    #[test]
    fn refuses_directories_char_devices_and_missing_paths() {
        let dir = tempfile::tempdir().unwrap();
        let err = BlockDevBackend::open(dir.path(), BlockDevOptions::default()).unwrap_err();
        assert!(err.to_string().contains("is not a block device"), "{err}");
        let missing = dir.path().join("absent");
        let err = BlockDevBackend::open(&missing, BlockDevOptions::default()).unwrap_err();
        assert!(
            matches!(&err, BackstoreError::Io { op: "open", source, .. }
                if source.kind() == io::ErrorKind::NotFound),
            "{err:?}"
        );
        // A character device is not a block device either.
        let err = BlockDevBackend::open("/dev/null", BlockDevOptions::default()).unwrap_err();
        assert!(err.to_string().contains("is not a block device"), "{err}");
    }
}
