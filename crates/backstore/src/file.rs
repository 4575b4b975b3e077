//! File backstore.
//!
//! A regular file (sparse where the filesystem allows) or a block device, accessed with positioned
//! I/O (`pread`/`pwrite`) only, so one open file serves any number of concurrent callers; the
//! daemon runs these blocking calls on a bounded pool.
//!
//! Durability (DESIGN.md §3 rule 10, SBC-3 §5.34 SYNCHRONIZE CACHE, FUA in SBC-3 §5.40):
//! - FUA writes use `pwritev2(.., RWF_DSYNC)`, which is durable on return; on kernels or
//!   filesystems without it, `pwrite` followed by `fdatasync`.
//! - `flush` is `fdatasync`.
//!
//! Deallocation (SBC-3 §4.7 logical block provisioning): `unmap` and `write_zeroes(unmap = true)`
//! punch holes (`fallocate(PUNCH_HOLE | KEEP_SIZE)`); `write_zeroes(unmap = false)` uses
//! `fallocate(ZERO_RANGE | KEEP_SIZE)`, which leaves the range allocated. Where the filesystem
//! refuses either, zeroes are written in bounded buffers instead. `extents` asks the filesystem
//! with `SEEK_DATA`/`SEEK_HOLE`; where that is unsupported (block devices), all is mapped.

use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use rustix::fs::{FallocateFlags, SeekFrom};
use rustix::io::{Errno, ReadWriteFlags};

use crate::buffers::BufferPool;
use crate::{check_range, BackstoreError, BlockBackend, Extent, Result, MAX_SIZE};

/// Largest buffer used to write zeroes where the filesystem cannot zero a range itself.
const ZERO_BUFFER: u64 = 1 << 20;
/// Most extents returned by one `extents` call; the answer stops early past that.
const MAX_EXTENTS: usize = 4096;

/// How to open a [`FileBackend`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FileOptions {
    /// Size of the backstore in bytes. A shorter file is extended (sparsely); a longer file or
    /// device is served up to this size and never truncated. `None`: the current length.
    pub size: Option<u64>,
    /// Create the file if it does not exist (needs `size`, or the backstore is empty).
    pub create: bool,
    /// Open read-only: every modifying operation fails with [`BackstoreError::ReadOnly`].
    pub read_only: bool,
}

/// A backstore over a file or block device. See the module documentation.
#[derive(Debug)]
pub struct FileBackend {
    file: File,
    /// Size in bytes (grows with [`BlockBackend::resize`]).
    size: AtomicU64,
    read_only: bool,
    /// `pwritev2(RWF_DSYNC)` still believed supported.
    dsync: AtomicBool,
    /// `fallocate(PUNCH_HOLE)` still believed supported.
    punch_hole: AtomicBool,
    /// `fallocate(ZERO_RANGE)` still believed supported.
    zero_range: AtomicBool,
    /// Recycled buffers for large reads (see [`crate::buffers`]).
    buffers: Arc<BufferPool>,
}

pub(crate) fn io_error(op: &'static str, offset: u64, source: io::Error) -> BackstoreError {
    if Errno::from_io_error(&source) == Some(Errno::NOSPC) {
        BackstoreError::NoSpace { op, offset }
    } else {
        BackstoreError::Io { op, offset, source }
    }
}

pub(crate) fn errno_error(op: &'static str, offset: u64, errno: Errno) -> BackstoreError {
    io_error(op, offset, io::Error::from(errno))
}

/// The operation is not available on this kernel, filesystem or device (fall back, don't
/// fail); ENOTTY: an ioctl the device lacks.
pub(crate) fn unsupported(errno: Errno) -> bool {
    errno == Errno::OPNOTSUPP || errno == Errno::NOSYS || errno == Errno::NOTTY
}

pub(crate) fn len64(len: usize) -> u64 {
    u64::try_from(len).unwrap_or(u64::MAX)
}

/// Write with `RWF_DSYNC`; `Ok(false)` when the kernel lacks it and nothing was written (then
/// `flag` is cleared, so later FUA writes go straight to write + `fdatasync`).
pub(crate) fn write_dsync(
    file: &File,
    flag: &AtomicBool,
    offset: u64,
    data: &[u8],
) -> Result<bool> {
    let mut done = 0usize;
    while let Some(rest) = data.get(done..).filter(|r| !r.is_empty()) {
        let at = offset.saturating_add(len64(done));
        match rustix::io::pwritev2(file, &[IoSlice::new(rest)], at, ReadWriteFlags::DSYNC) {
            Ok(0) => return Err(io_error("write", at, io::ErrorKind::WriteZero.into())),
            Ok(n) => done = done.saturating_add(n),
            Err(Errno::INTR) => {}
            Err(e) if done == 0 && (unsupported(e) || e == Errno::INVAL) => {
                flag.store(false, Ordering::Relaxed);
                return Ok(false);
            }
            Err(e) => return Err(errno_error("write", at, e)),
        }
    }
    Ok(true)
}

/// Write all of `data` at `offset`; `fua`: durable before returning — with `RWF_DSYNC` while
/// `dsync` says the kernel takes it, else write then `fdatasync`.
pub(crate) fn write_at(
    file: &File,
    dsync: &AtomicBool,
    offset: u64,
    data: &[u8],
    fua: bool,
) -> Result<()> {
    if fua && dsync.load(Ordering::Relaxed) && write_dsync(file, dsync, offset, data)? {
        return Ok(());
    }
    file.write_all_at(data, offset)
        .map_err(|e| io_error("write", offset, e))?;
    if fua {
        file.sync_data().map_err(|e| io_error("write", offset, e))?;
    }
    Ok(())
}

/// `fallocate(mode)` over a checked, non-empty range; `Ok(false)` when the filesystem or
/// device does not support `mode` (remembered by clearing `flag`; a clear flag skips the call).
pub(crate) fn try_fallocate(
    file: &File,
    op: &'static str,
    mode: FallocateFlags,
    flag: &AtomicBool,
    offset: u64,
    len: u64,
) -> Result<bool> {
    if !flag.load(Ordering::Relaxed) {
        return Ok(false);
    }
    loop {
        match rustix::fs::fallocate(file, mode, offset, len) {
            Ok(()) => return Ok(true),
            Err(Errno::INTR) => {}
            Err(e) if unsupported(e) => {
                flag.store(false, Ordering::Relaxed);
                return Ok(false);
            }
            Err(e) => return Err(errno_error(op, offset, e)),
        }
    }
}

impl FileBackend {
    /// Open (or create) the file at `path`. See [`FileOptions`].
    pub fn open(path: impl AsRef<Path>, options: FileOptions) -> Result<Self> {
        let path = path.as_ref();
        let open_err = |e| io_error("open", 0, e);
        if let Some(size) = options.size {
            check_range(0, size, MAX_SIZE)?;
        }
        let created = options.create && !options.read_only && !path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(!options.read_only)
            .create(options.create && !options.read_only)
            .open(path)
            .map_err(open_err)?;
        // The end offset, not the metadata length, so that block devices report their size.
        let current =
            rustix::fs::seek(&file, SeekFrom::End(0)).map_err(|e| errno_error("open", 0, e))?;
        let size = match options.size {
            None => current,
            Some(size) if size <= current => size,
            Some(size) if options.read_only => {
                return Err(BackstoreError::OutOfRange {
                    offset: 0,
                    len: size,
                    size: current,
                });
            }
            Some(size) => {
                file.set_len(size)
                    .map_err(|e| io_error("extend", current, e))?;
                file.sync_all()
                    .map_err(|e| io_error("extend", current, e))?;
                size
            }
        };
        check_range(0, size, MAX_SIZE)?;
        if created {
            // Make the new directory entry durable too.
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(open_err)?;
            }
        }
        Ok(Self {
            buffers: BufferPool::new(),
            file,
            size: AtomicU64::new(size),
            read_only: options.read_only,
            dsync: AtomicBool::new(true),
            punch_hole: AtomicBool::new(true),
            zero_range: AtomicBool::new(true),
        })
    }

    /// Behave as on a kernel/filesystem without `RWF_DSYNC` and `fallocate` modes, so tests
    /// exercise the fallback paths.
    #[cfg(test)]
    pub(crate) fn without_fast_paths(self) -> Self {
        self.dsync.store(false, Ordering::Relaxed);
        self.punch_hole.store(false, Ordering::Relaxed);
        self.zero_range.store(false, Ordering::Relaxed);
        self
    }

    /// Whether the backstore was opened read-only.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn writable(&self, op: &'static str) -> Result<()> {
        if self.read_only {
            Err(BackstoreError::ReadOnly { op })
        } else {
            Ok(())
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

    fn deallocate(&self, op: &'static str, offset: u64, len: u64) -> Result<()> {
        let mode = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        if try_fallocate(&self.file, op, mode, &self.punch_hole, offset, len)? {
            return Ok(());
        }
        self.zero(op, offset, len)
    }

    fn zero(&self, op: &'static str, offset: u64, len: u64) -> Result<()> {
        let mode = FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE;
        if try_fallocate(&self.file, op, mode, &self.zero_range, offset, len)? {
            return Ok(());
        }
        self.write_zero_buffers(offset, len)
    }

    /// `lseek(SEEK_DATA | SEEK_HOLE)`: `Ok(None)` when there is no such position before EOF.
    fn seek(&self, whence: SeekFrom) -> std::result::Result<Option<u64>, Errno> {
        match rustix::fs::seek(&self.file, whence) {
            Ok(pos) => Ok(Some(pos)),
            Err(Errno::NXIO) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

impl BlockBackend for FileBackend {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    /// A file served below its length (or a block device) has old bytes past the served
    /// size: the part of them the new size exposes is zeroed first. The file is extended
    /// sparsely to at least `new_size`, and its length made durable, before the size changes.
    fn resize(&self, new_size: u64) -> Result<()> {
        let size = self.size();
        if !crate::check_resize(size, new_size)? {
            return Ok(());
        }
        self.writable("resize")?;
        let current = rustix::fs::seek(&self.file, SeekFrom::End(0))
            .map_err(|e| errno_error("resize", size, e))?;
        let stale_end = current.min(new_size);
        if stale_end > size {
            self.zero("resize", size, stale_end - size)?;
        }
        if current < new_size {
            self.file
                .set_len(new_size)
                .map_err(|e| io_error("resize", current, e))?;
        }
        self.file
            .sync_all()
            .map_err(|e| io_error("resize", size, e))?;
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
        if unmap {
            self.deallocate("write zeroes", offset, len)
        } else {
            self.zero("write zeroes", offset, len)
        }
    }

    fn unmap(&self, offset: u64, len: u64) -> Result<()> {
        self.writable("unmap")?;
        check_range(offset, len, self.size())?;
        if len == 0 {
            return Ok(());
        }
        self.deallocate("unmap", offset, len)
    }

    /// Deallocation punches holes in the file.
    fn thin_provisioning(&self) -> bool {
        true
    }

    /// Filesystem-block granularity; the answer stops after `MAX_EXTENTS` extents.
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let end = check_range(offset, len, self.size())?;
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end && out.len() < MAX_EXTENTS {
            let data = match self.seek(SeekFrom::Data(pos)) {
                Ok(data) => data.unwrap_or(end).min(end),
                // No SEEK_DATA here (block devices, old filesystems): report the rest mapped.
                Err(e) if e == Errno::INVAL || unsupported(e) => {
                    out.push(Extent {
                        offset: pos,
                        len: end - pos,
                        mapped: true,
                    });
                    break;
                }
                Err(e) => return Err(errno_error("extents", pos, e)),
            };
            if data > pos {
                out.push(Extent {
                    offset: pos,
                    len: data - pos,
                    mapped: false,
                });
                pos = data;
                continue;
            }
            let hole = self
                .seek(SeekFrom::Hole(pos))
                .map_err(|e| errno_error("extents", pos, e))?
                .unwrap_or(end)
                .clamp(pos.saturating_add(1), end);
            out.push(Extent {
                offset: pos,
                len: hole - pos,
                mapped: true,
            });
            pos = hole;
        }
        Ok(out)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn opts(size: u64) -> FileOptions {
        FileOptions {
            size: Some(size),
            create: true,
            read_only: false,
        }
    }

    #[test]
    fn accepts_create_sparse_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lu.img");
        let f = FileBackend::open(&path, opts(1 << 30)).unwrap();
        assert_eq!(f.size(), 1 << 30);
        f.write(4096, b"hello", false).unwrap();
        drop(f);
        let f = FileBackend::open(&path, FileOptions::default()).unwrap();
        assert_eq!(f.size(), 1 << 30);
        assert_eq!(&f.read(4096, 5).unwrap()[..], b"hello");
        // Sparse: far less than the size is allocated.
        let meta = std::fs::metadata(&path).unwrap();
        assert!(std::os::unix::fs::MetadataExt::blocks(&meta) * 512 < 1 << 20);
    }

    #[test]
    fn resize_zeroes_stale_bytes_of_a_longer_file_and_extends_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lu.img");
        std::fs::write(&path, vec![9u8; 8192]).unwrap();
        let f = FileBackend::open(
            &path,
            FileOptions {
                size: Some(4096),
                ..Default::default()
            },
        )
        .unwrap()
        .without_fast_paths();
        f.resize(16384).unwrap();
        assert_eq!(f.size(), 16384);
        assert_eq!(&f.read(0, 4096).unwrap()[..], &[9u8; 4096][..]);
        assert_eq!(&f.read(4096, 12288).unwrap()[..], &[0u8; 12288][..]);
        drop(f);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 16384);
        let ro = FileBackend::open(
            &path,
            FileOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(matches!(
            ro.resize(32768),
            Err(BackstoreError::ReadOnly { op: "resize" })
        ));
    }

    #[test]
    fn rejects_missing_file_without_create() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent.img");
        let err = FileBackend::open(
            &path,
            FileOptions {
                size: Some(4096),
                ..Default::default()
            },
        );
        assert!(matches!(err, Err(BackstoreError::Io { op: "open", .. })));
    }

    #[test]
    fn longer_file_is_served_up_to_size_and_not_truncated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lu.img");
        std::fs::write(&path, vec![9u8; 8192]).unwrap();
        let f = FileBackend::open(
            &path,
            FileOptions {
                size: Some(4096),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(f.size(), 4096);
        assert!(matches!(
            f.read(4096, 1),
            Err(BackstoreError::OutOfRange { .. })
        ));
        drop(f);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 8192);
    }

    #[test]
    fn rejects_modification_when_read_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lu.img");
        std::fs::write(&path, vec![3u8; 8192]).unwrap();
        let ro = FileOptions {
            read_only: true,
            ..Default::default()
        };
        let f = FileBackend::open(&path, ro).unwrap();
        assert!(f.is_read_only());
        assert_eq!(&f.read(0, 2).unwrap()[..], &[3, 3]);
        assert!(matches!(
            f.write(0, &[1], false),
            Err(BackstoreError::ReadOnly { .. })
        ));
        assert!(matches!(
            f.write(0, &[1], true),
            Err(BackstoreError::ReadOnly { .. })
        ));
        assert!(matches!(
            f.unmap(0, 4096),
            Err(BackstoreError::ReadOnly { .. })
        ));
        assert!(matches!(
            f.write_zeroes(0, 1, false),
            Err(BackstoreError::ReadOnly { .. })
        ));
        f.flush().unwrap();
        // Read-only cannot grow the file.
        let grow = FileOptions {
            size: Some(1 << 20),
            read_only: true,
            create: false,
        };
        assert!(matches!(
            FileBackend::open(&path, grow),
            Err(BackstoreError::OutOfRange { .. })
        ));
    }

    #[test]
    fn punched_range_is_reported_unmapped() {
        let dir = tempfile::tempdir().unwrap();
        let f = FileBackend::open(dir.path().join("lu.img"), opts(1 << 20)).unwrap();
        f.write(0, &[1u8; 1 << 20], false).unwrap();
        f.unmap(256 << 10, 256 << 10).unwrap();
        let ext = f.extents(0, 1 << 20).unwrap();
        // ext4/xfs/tmpfs all punch at 4 KiB granularity; a 256 KiB aligned hole is exact.
        assert_eq!(
            ext,
            vec![
                Extent {
                    offset: 0,
                    len: 256 << 10,
                    mapped: true
                },
                Extent {
                    offset: 256 << 10,
                    len: 256 << 10,
                    mapped: false
                },
                Extent {
                    offset: 512 << 10,
                    len: 512 << 10,
                    mapped: true
                },
            ]
        );
        assert!(f
            .read(256 << 10, 256 << 10)
            .unwrap()
            .iter()
            .all(|&b| b == 0));
    }

    #[test]
    fn zero_buffers_fallback_zeroes_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let f = FileBackend::open(dir.path().join("lu.img"), opts(3 << 20)).unwrap();
        f.write(0, &vec![5u8; 3 << 20], false).unwrap();
        f.write_zero_buffers(1, (2 << 20) + 5).unwrap();
        let got = f.read(0, 3 << 20).unwrap();
        assert_eq!(got[0], 5);
        assert!(got[1..(2 << 20) + 6].iter().all(|&b| b == 0));
        assert!(got[(2 << 20) + 6..].iter().all(|&b| b == 5));
    }

    const DURABILITY_ENV: &str = "IRONLUN_BACKSTORE_DURABILITY_FILE";
    const READY: &str = "IRONLUN-DURABILITY-READY";

    /// Child half of `fua_and_flush_survive_sigkill`: writes, reports, then waits to be killed.
    #[test]
    #[ignore = "run only as the child of fua_and_flush_survive_sigkill"]
    fn durability_child() {
        let Some(path) = std::env::var_os(DURABILITY_ENV) else {
            return;
        };
        let f = FileBackend::open(path, FileOptions::default()).unwrap();
        f.write(4096, &crate::conformance::pattern(61, 65_536), true)
            .unwrap();
        f.write(1 << 20, &crate::conformance::pattern(62, 10_000), false)
            .unwrap();
        f.flush().unwrap();
        println!("{READY}");
        std::io::Write::flush(&mut std::io::stdout()).unwrap();
        loop {
            std::thread::sleep(std::time::Duration::from_secs(60));
        }
    }

    /// DESIGN.md §3 rule 10: a FUA write, or a write followed by flush, survives `kill -9`.
    /// (The page cache outlives the process, so this proves no userspace buffering only.)
    #[test]
    fn fua_and_flush_survive_sigkill() {
        use std::io::BufRead;
        use std::os::unix::process::ExitStatusExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lu.img");
        drop(FileBackend::open(&path, opts(2 << 20)).unwrap());
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "file::tests::durability_child",
                "--ignored",
                "--nocapture",
            ])
            .env(DURABILITY_ENV, &path)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let ready = std::io::BufReader::new(stdout)
            .lines()
            .map_while(std::result::Result::ok)
            .any(|line| line.contains(READY));
        child.kill().unwrap();
        let status = child.wait().unwrap();
        assert!(ready, "child exited before writing: {status:?}");
        assert_eq!(status.signal(), Some(9), "child was not killed: {status:?}");
        let f = FileBackend::open(&path, FileOptions::default()).unwrap();
        assert_eq!(
            f.read(4096, 65_536).unwrap(),
            crate::conformance::pattern(61, 65_536)
        );
        assert_eq!(
            f.read(1 << 20, 10_000).unwrap(),
            crate::conformance::pattern(62, 10_000)
        );
    }
}
