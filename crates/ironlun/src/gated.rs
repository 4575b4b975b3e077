//! A test backstore (unit tests only): RAM whose writes wait while a gate is closed, as a
//! backstore I/O still in flight, with the writes that started, reached it and landed counted.

use bytes::Bytes;
use ironlun_backstore::ram::RamBackend;
use ironlun_backstore::BlockBackend;
use std::sync::{Arc, Condvar, Mutex};
use tokio::sync::watch;

pub(crate) struct Gated {
    ram: RamBackend,
    open: Mutex<bool>,
    cv: Condvar,
    /// `(offset, len)` of every write, logged when it starts (before it waits).
    started: Mutex<Vec<(u64, usize)>>,
    /// Writes that reached the backstore / landed.
    entered: watch::Sender<usize>,
    landed: watch::Sender<usize>,
}

impl Gated {
    /// `size` bytes of RAM, the gate open.
    pub(crate) fn new(size: u64) -> Gated {
        Gated {
            ram: RamBackend::new(size).expect("RAM backstore"),
            open: Mutex::new(true),
            cv: Condvar::new(),
            started: Mutex::new(Vec::new()),
            entered: watch::channel(0).0,
            landed: watch::channel(0).0,
        }
    }

    pub(crate) fn set(&self, open: bool) {
        *self
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = open;
        self.cv.notify_all();
    }

    /// Wait until `n` writes have reached the backstore.
    pub(crate) async fn entered(&self, n: usize) {
        let mut rx = self.entered.subscribe();
        let _ = rx.wait_for(|e| *e >= n).await;
    }

    pub(crate) fn landed(&self) -> usize {
        *self.landed.borrow()
    }

    /// The writes started so far, in order.
    pub(crate) fn started(&self) -> Vec<(u64, usize)> {
        self.started
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// Opens the gate when dropped, so a failing test does not leave a blocking-pool thread
/// waiting (the runtime's shutdown would wait for it forever).
pub(crate) struct GateGuard(pub(crate) Arc<Gated>);

impl Drop for GateGuard {
    fn drop(&mut self) {
        self.0.set(true);
    }
}

impl std::ops::Deref for GateGuard {
    type Target = Gated;
    fn deref(&self) -> &Gated {
        &self.0
    }
}

impl BlockBackend for Gated {
    fn size(&self) -> u64 {
        self.ram.size()
    }
    fn read(&self, offset: u64, len: usize) -> ironlun_backstore::Result<Bytes> {
        self.ram.read(offset, len)
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> ironlun_backstore::Result<()> {
        self.started
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push((offset, data.len()));
        self.entered.send_modify(|n| *n += 1);
        let mut open = self
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while !*open {
            open = self
                .cv
                .wait(open)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        drop(open);
        let r = self.ram.write(offset, data, fua);
        self.landed.send_modify(|n| *n += 1);
        r
    }
    fn flush(&self) -> ironlun_backstore::Result<()> {
        self.ram.flush()
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> ironlun_backstore::Result<()> {
        self.ram.write_zeroes(offset, len, unmap)
    }
    fn unmap(&self, offset: u64, len: u64) -> ironlun_backstore::Result<()> {
        self.ram.unmap(offset, len)
    }
    fn extents(
        &self,
        offset: u64,
        len: u64,
    ) -> ironlun_backstore::Result<Vec<ironlun_backstore::Extent>> {
        self.ram.extents(offset, len)
    }
}
