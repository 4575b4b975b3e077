//! The COMPARE AND WRITE gate of a logical unit: what makes the read, compare and write of
//! COMPARE AND WRITE one indivisible operation with respect to every other command on the
//! LU, from every session and portal (SBC-3 §5.2).
//!
//! Mechanism: a per-LU gate that every command of the LU passes from before its SCSI decision
//! until its completion. Ordinary commands pass it shared — many at once, so reads and
//! writes never wait for each other; the cost is one compare-and-swap to enter and one
//! atomic subtraction to leave. A COMPARE AND WRITE passes it exclusively: it first closes
//! the gate (new commands wait outside), waits until the commands inside have left, then
//! runs its read, compare and write alone, and reopens the gate when it completes. So no
//! other write lands between its read and its write, and no read sees half of its write.
//! COMPARE AND WRITEs pass one at a time; a closed gate is also the fairness rule (a stream
//! of reads cannot starve a COMPARE AND WRITE).
//!
//! Release: an [`Entry`] leaves the gate when dropped — when its command completes, and
//! also when the command's future is dropped while it waits to enter or during its I/O
//! (session teardown, runtime shutdown). Task management does not cancel commands in
//! flight: ABORT TASK, LUN RESET and the like drop the responses and the command finishes its
//! current I/O and leaves; a COMPARE AND WRITE aborted by PREEMPT AND ABORT between its read
//! and write resumes to TASK ABORTED without writing (the LU's task set) and leaves. A PR OUT
//! leaves before it waits for aborted tasks to drain, so that wait never holds the gate.

use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::Notify;

/// Bit set while a COMPARE AND WRITE holds the gate or waits for it to drain.
const CLOSED: u64 = 1 << 63;
/// The count of commands inside (shared).
const COUNT: u64 = CLOSED - 1;

/// How a command passes the gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Every command but COMPARE AND WRITE.
    Shared,
    /// COMPARE AND WRITE.
    Exclusive,
}

impl Access {
    /// The access `cdb` needs: exclusive for COMPARE AND WRITE (opcode 89h).
    pub fn of(cdb: &[u8]) -> Access {
        if cdb.first() == Some(&ironlun_scsi::cdb::op::COMPARE_AND_WRITE) {
            Access::Exclusive
        } else {
            Access::Shared
        }
    }
}

/// One LU's gate (see the module doc).
#[derive(Debug, Default)]
pub struct Gate {
    /// [`CLOSED`] | number of shared entries inside.
    state: AtomicU64,
    /// Woken when the last shared entry leaves a closed gate (one waiter: the closer).
    drained: Notify,
    /// Woken when an exclusive entry leaves (the gate opens).
    opened: Notify,
}

/// A command inside a [`Gate`]; it leaves when this is dropped. `G` is a reference to the
/// gate: borrowed on the inline path, an `Arc` once the command waits off its connection.
#[derive(Debug)]
pub struct Entry<G: Deref<Target = Gate>> {
    gate: G,
    /// `None` once moved to another [`Entry`] ([`Entry::into_owned`]).
    access: Option<Access>,
}

impl Gate {
    pub fn new() -> Self {
        Self::default()
    }

    /// Enter without waiting, if the gate lets `access` in now: shared while no COMPARE AND
    /// WRITE holds or waits for it; exclusive while nothing is inside.
    pub fn try_enter(&self, access: Access) -> Option<Entry<&Gate>> {
        // Built only on success: an `Entry` leaves the gate when dropped.
        self.try_raw(access).then(|| Entry {
            gate: self,
            access: Some(access),
        })
    }

    fn try_raw(&self, access: Access) -> bool {
        match access {
            Access::Shared => {
                let mut s = self.state.load(Ordering::Relaxed);
                loop {
                    if s & CLOSED != 0 {
                        return false;
                    }
                    match self.state.compare_exchange_weak(
                        s,
                        s.wrapping_add(1),
                        Ordering::Acquire,
                        Ordering::Relaxed,
                    ) {
                        Ok(_) => return true,
                        Err(now) => s = now,
                    }
                }
            }
            Access::Exclusive => self
                .state
                .compare_exchange(0, CLOSED, Ordering::Acquire, Ordering::Relaxed)
                .is_ok(),
        }
    }

    /// Enter, waiting as long as it takes. Cancel-safe: dropping the future before it
    /// returns leaves the gate as it was (a half-closed gate is reopened).
    pub async fn enter(gate: Arc<Gate>, access: Access) -> Entry<Arc<Gate>> {
        match access {
            Access::Shared => {
                loop {
                    let opened = gate.opened.notified();
                    let mut opened = std::pin::pin!(opened);
                    opened.as_mut().enable();
                    if gate.try_raw(Access::Shared) {
                        break;
                    }
                    opened.await;
                }
                Entry {
                    gate,
                    access: Some(access),
                }
            }
            Access::Exclusive => {
                loop {
                    let opened = gate.opened.notified();
                    let mut opened = std::pin::pin!(opened);
                    opened.as_mut().enable();
                    if gate.state.fetch_or(CLOSED, Ordering::Acquire) & CLOSED == 0 {
                        break;
                    }
                    opened.await;
                }
                // Closed by us: from here a drop reopens the gate.
                let entry = Entry {
                    gate,
                    access: Some(access),
                };
                while entry.gate.state.load(Ordering::Acquire) & COUNT != 0 {
                    // `notify_one` keeps a permit when nobody waits yet, so a leave
                    // between the check and this wait is not lost.
                    entry.gate.drained.notified().await;
                }
                entry
            }
        }
    }

    /// Commands inside, and whether the gate is closed (for tests and diagnostics).
    pub fn occupancy(&self) -> (u64, bool) {
        let s = self.state.load(Ordering::Relaxed);
        (s & COUNT, s & CLOSED != 0)
    }
}

impl<G: Deref<Target = Gate>> Entry<G> {
    /// The same entry, now referring to its gate through `gate` (which must be the same
    /// gate), so that it can outlive the borrow it was entered with.
    pub fn into_owned(mut self, gate: Arc<Gate>) -> Entry<Arc<Gate>> {
        debug_assert!(std::ptr::eq(&*self.gate, &*gate));
        Entry {
            gate,
            access: self.access.take(),
        }
    }

    pub fn access(&self) -> Option<Access> {
        self.access
    }
}

impl<G: Deref<Target = Gate>> Drop for Entry<G> {
    fn drop(&mut self) {
        match self.access.take() {
            None => {}
            Some(Access::Shared) => {
                let prev = self.gate.state.fetch_sub(1, Ordering::Release);
                if prev == CLOSED | 1 {
                    self.gate.drained.notify_one();
                }
            }
            Some(Access::Exclusive) => {
                self.gate.state.fetch_and(!CLOSED, Ordering::Release);
                self.gate.opened.notify_waiters();
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn shared_entries_coexist_and_exclusive_needs_an_empty_gate() {
        let g = Gate::new();
        let a = g.try_enter(Access::Shared).unwrap();
        let b = g.try_enter(Access::Shared).unwrap();
        assert_eq!(g.occupancy(), (2, false));
        assert!(g.try_enter(Access::Exclusive).is_none());
        drop((a, b));
        let x = g.try_enter(Access::Exclusive).unwrap();
        assert_eq!(g.occupancy(), (0, true));
        assert!(g.try_enter(Access::Shared).is_none());
        assert!(g.try_enter(Access::Exclusive).is_none());
        drop(x);
        assert_eq!(g.occupancy(), (0, false));
    }

    #[test]
    fn a_refused_entry_changes_nothing() {
        let g = Gate::new();
        let x = g.try_enter(Access::Exclusive).unwrap();
        for _ in 0..3 {
            assert!(g.try_enter(Access::Shared).is_none());
            assert!(g.try_enter(Access::Exclusive).is_none());
        }
        assert_eq!(g.occupancy(), (0, true));
        drop(x);
        let s = g.try_enter(Access::Shared).unwrap();
        assert!(g.try_enter(Access::Exclusive).is_none());
        assert_eq!(g.occupancy(), (1, false));
        drop(s);
        assert_eq!(g.occupancy(), (0, false));
    }

    #[tokio::test]
    async fn exclusive_closes_then_waits_for_the_inside_to_leave() {
        let g = Arc::new(Gate::new());
        let inside = Gate::enter(g.clone(), Access::Shared).await;
        let closer = tokio::spawn(Gate::enter(g.clone(), Access::Exclusive));
        tokio::time::sleep(Duration::from_millis(20)).await;
        // Closed: a newcomer waits, the one inside keeps going.
        assert_eq!(g.occupancy(), (1, true));
        assert!(g.try_enter(Access::Shared).is_none());
        let late = tokio::spawn(Gate::enter(g.clone(), Access::Shared));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!closer.is_finished() && !late.is_finished());
        drop(inside);
        let x = closer.await.unwrap();
        assert_eq!(x.access(), Some(Access::Exclusive));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!late.is_finished());
        drop(x);
        let s = late.await.unwrap();
        assert_eq!(g.occupancy(), (1, false));
        drop(s);
        assert_eq!(g.occupancy(), (0, false));
    }

    #[tokio::test]
    async fn a_cancelled_closer_reopens_the_gate() {
        let g = Arc::new(Gate::new());
        let inside = g.try_enter(Access::Shared).unwrap();
        let closer = tokio::spawn(Gate::enter(g.clone(), Access::Exclusive));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(g.occupancy(), (1, true));
        closer.abort();
        let _ = closer.await;
        assert_eq!(g.occupancy(), (1, false));
        assert!(g.try_enter(Access::Shared).is_some());
        drop(inside);
        assert!(g.try_enter(Access::Exclusive).is_some());
    }

    #[tokio::test]
    async fn an_owned_entry_leaves_once() {
        let g = Arc::new(Gate::new());
        let borrowed = g.try_enter(Access::Exclusive).unwrap();
        let owned = borrowed.into_owned(g.clone());
        assert_eq!(g.occupancy(), (0, true));
        drop(owned);
        assert_eq!(g.occupancy(), (0, false));
    }

    /// Many tasks, a few exclusive: an exclusive entry never overlaps any other entry.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn exclusive_entries_are_alone() {
        let g = Arc::new(Gate::new());
        let inside = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for t in 0..8u64 {
            let (g, inside) = (g.clone(), inside.clone());
            tasks.push(tokio::spawn(async move {
                for i in 0..300u64 {
                    let access = if (t + i) % 7 == 0 {
                        Access::Exclusive
                    } else {
                        Access::Shared
                    };
                    let e = Gate::enter(g.clone(), access).await;
                    let bump = if access == Access::Exclusive { 1000 } else { 1 };
                    let before = inside.fetch_add(bump, Ordering::SeqCst);
                    if access == Access::Exclusive {
                        assert_eq!(before, 0);
                    } else {
                        assert!(before < 1000);
                    }
                    tokio::task::yield_now().await;
                    inside.fetch_sub(bump, Ordering::SeqCst);
                    drop(e);
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(g.occupancy(), (0, false));
    }
}
