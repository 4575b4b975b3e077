//! The `BlockBackend` contract and the RAM and file backstores.
//!
//! Backends are byte-addressed and synchronous; the daemon runs them on a bounded blocking
//! pool. Offsets and lengths are checked here too (`checked_add`), whatever the caller checked.

pub mod file;
pub mod pool;
pub mod ram;

pub use file::{FileBackend, FileOptions};
pub use pool::IoPool;
pub use ram::RamBackend;
#[cfg(any(test, feature = "conformance"))]
pub mod conformance;

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
    #[error("{0} is not supported by this backstore")]
    Unsupported(&'static str),
    /// A modifying operation on a read-only backstore (SBC-3 §4.13: DATA PROTECT, WRITE PROTECTED).
    #[error("{op} refused: the backstore is read-only")]
    ReadOnly { op: &'static str },
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
}
