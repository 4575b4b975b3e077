//! The byte store under a VHD: a file (positioned I/O) or memory (tests, fuzzing).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Mutex, PoisonError};

use rustix::fs::FallocateFlags;

/// Largest zero buffer written where a store cannot deallocate a range itself.
const ZERO_CHUNK: u64 = 1 << 20;

/// Positioned byte I/O with an explicit durability barrier.
///
/// Contract: `read_exact_at` fails (`UnexpectedEof`) rather than return short data;
/// `sync` makes every completed `write_at`, `zero_range` and `set_len` durable.
pub trait Store: Send + Sync + 'static {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn write_all_at(&self, data: &[u8], offset: u64) -> io::Result<()>;
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Whether the store is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Truncate or extend (extension reads as zeroes).
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Make `offset..offset + len` read as zeroes, deallocating where possible; the length of
    /// the store does not change (the range must lie within it).
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Durability barrier (`fdatasync` for files).
    fn sync(&self) -> io::Result<()>;
}

fn write_zero_chunks<S: Store + ?Sized>(s: &S, offset: u64, len: u64) -> io::Result<()> {
    let chunk = vec![0u8; usize::try_from(len.min(ZERO_CHUNK)).unwrap_or(0)];
    let mut at = offset;
    let end = offset
        .checked_add(len)
        .ok_or_else(|| io::Error::other("zero range overflows"))?;
    while at < end {
        let n = (end - at).min(ZERO_CHUNK);
        let buf = chunk
            .get(..usize::try_from(n).unwrap_or(0))
            .ok_or_else(|| io::Error::other("zero chunk"))?;
        s.write_all_at(buf, at)?;
        at += n;
    }
    Ok(())
}

impl Store for File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }

    fn write_all_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(self, data, offset)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        File::set_len(self, len)
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let mode = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        match rustix::fs::fallocate(self, mode, offset, len) {
            Ok(()) => Ok(()),
            Err(_) => write_zero_chunks(self, offset, len),
        }
    }

    fn sync(&self) -> io::Result<()> {
        self.sync_data()
    }
}

/// A store in memory. Clones of the bytes are taken with [`MemStore::bytes`].
#[derive(Debug, Default)]
pub struct MemStore(Mutex<Vec<u8>>);

impl MemStore {
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(Mutex::new(bytes))
    }

    /// A copy of the current contents.
    pub fn bytes(&self) -> Vec<u8> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn range(len: usize, offset: u64, n: usize) -> io::Result<std::ops::Range<usize>> {
        let start = usize::try_from(offset).map_err(|_| eof())?;
        let end = start.checked_add(n).ok_or_else(eof)?;
        if end > len {
            return Err(eof());
        }
        Ok(start..end)
    }
}

fn eof() -> io::Error {
    io::Error::from(io::ErrorKind::UnexpectedEof)
}

impl Store for MemStore {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let v = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let r = Self::range(v.len(), offset, buf.len())?;
        buf.copy_from_slice(v.get(r).ok_or_else(eof)?);
        Ok(())
    }

    fn write_all_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        let mut v = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let start = usize::try_from(offset).map_err(|_| eof())?;
        let end = start.checked_add(data.len()).ok_or_else(eof)?;
        if end > v.len() {
            v.resize(end, 0);
        }
        v.get_mut(start..end).ok_or_else(eof)?.copy_from_slice(data);
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        let v = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        u64::try_from(v.len()).map_err(io::Error::other)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut v = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        v.resize(usize::try_from(len).map_err(io::Error::other)?, 0);
        Ok(())
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut v = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let n = usize::try_from(len).map_err(|_| eof())?;
        let r = Self::range(v.len(), offset, n)?;
        v.get_mut(r).ok_or_else(eof)?.fill(0);
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
}
