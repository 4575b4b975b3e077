//! One daemon-wide memory budget for payload held on behalf of peers (`[limits] max_buffered`).
//!
//! Two kinds of bytes are charged:
//!
//! - **in flight**: the Data-In a started command will produce, charged *before* the command
//!   starts ([`Account::try_charge`]) and released once its response has been written to the
//!   socket (so Data-In waiting on a slow reader stays counted). A connection whose next command
//!   finds no room stops reading its socket until a release wakes it ([`MemoryBudget::notified`]).
//! - **received**: bytes already read off a socket and held for a command (Data-Out assembly,
//!   write data of a command waiting to start). They exist whatever we decide, so they are
//!   charged unconditionally ([`Account::hold_received`], [`Charge::resize`]); the connection
//!   throttles its reading on them, but they never make another command *wait*. That keeps the
//!   waits acyclic: a command waits only for in-flight charges, and every in-flight charge is
//!   released once its command completes and is written (or its connection fails the write
//!   after the stall bound and closes). Waiting for received bytes could deadlock two
//!   connections each holding the other's room in Data-Out that needs more reading to finish.
//!   Instead, received write data is bounded *before* it is sent: each connection may commit
//!   to at most [`Account::data_out_allowance`] of Data-Out (its share, within what the budget
//!   has left and within half of the limit for received data daemon-wide); the iSCSI
//!   connection paces its R2Ts by it and refuses unsolicited data past it with TASK SET FULL,
//!   and always lets its oldest write progress, so waiting for room never forms a cycle.
//!
//! Fairness: one connection ([`Account`]) may hold at most a quarter of the budget in flight
//! ([`SHARE_DIVISOR`]), so a peer that stops reading its socket (keeping its Data-In charged
//! until the write stall bound closes it) leaves room for other sessions. It takes four such
//! peers to make bystanders wait, and then only until the stall bound.
//!
//! A single command larger than what its connection or the daemon may hold (for example a
//! 64 MiB READ with `max_buffered = "32MiB"`) is not capped and not refused: it is admitted
//! when its connection has nothing in flight and, if it exceeds the whole budget, only when
//! nothing is in flight daemon-wide. It then runs alone, so the excess over the limit is at most
//! one command, whose length the iSCSI layer bounds (`Limits::max_transfer`, 64 MiB).
//! Under constant load from others such a command can wait long; configure `max_buffered` at
//! least as large as the largest transfer the initiators use.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use tokio::sync::Notify;

/// One connection may hold at most `limit / SHARE_DIVISOR` bytes in flight (see the module doc).
pub const SHARE_DIVISOR: u64 = 4;

/// Write data received from peers may take at most `limit / RECEIVED_DIVISOR` daemon-wide
/// before connections stop soliciting more ([`Account::data_out_allowance`]).
pub const RECEIVED_DIVISOR: u64 = 2;

/// Default `[limits] max_buffered`: 256 MiB.
pub const DEFAULT_MAX_BUFFERED: u64 = 256 << 20;

/// The daemon-wide budget. Shared by every connection as an `Arc`.
#[derive(Debug)]
pub struct MemoryBudget {
    limit: u64,
    share: u64,
    state: Mutex<Totals>,
    /// Woken (all waiters) when a charge is released while some connection waits for room.
    room: Notify,
}

#[derive(Debug, Default)]
struct Totals {
    /// Every charged byte, in flight and received.
    used: u64,
    /// The received part of `used`.
    received: u64,
    /// Connections that wait for room ([`Account::set_waiting`]); releases notify only then.
    waiting: u64,
    /// Charges made so far (every growth of `used`): whether payload moved at all.
    charges: u64,
}

impl Totals {
    fn in_flight(&self) -> u64 {
        self.used.saturating_sub(self.received)
    }
}

impl MemoryBudget {
    /// A budget of `limit` bytes (at least 1).
    pub fn new(limit: u64) -> Arc<MemoryBudget> {
        let limit = limit.max(1);
        Arc::new(MemoryBudget {
            limit,
            share: (limit / SHARE_DIVISOR).max(1),
            state: Mutex::new(Totals::default()),
            room: Notify::new(),
        })
    }

    fn totals(&self) -> std::sync::MutexGuard<'_, Totals> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The configured limit in bytes.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// What one connection may hold in flight (`limit / SHARE_DIVISOR`).
    pub fn share(&self) -> u64 {
        self.share
    }

    /// Bytes charged now (in flight and received).
    pub fn used(&self) -> u64 {
        self.totals().used
    }

    /// How many charges were made since the start: unchanged between two looks means no
    /// payload moved in between (the daemon is idle for [`crate::heap`]).
    pub fn activity(&self) -> u64 {
        self.totals().charges
    }

    /// Whether more is charged than the limit (received bytes can push it over).
    pub fn over_limit(&self) -> bool {
        self.totals().used > self.limit
    }

    /// A new holder (one per connection).
    pub fn account(self: &Arc<Self>) -> Account {
        Account {
            budget: self.clone(),
            mine: Arc::new(Mine::default()),
            waiting: false,
        }
    }

    /// A future that completes at the next release after it is enabled
    /// (`Notified::enable`) or first polled. To not miss a release: create it, enable it, retry
    /// the charge, and only then await it; and mark the account waiting
    /// ([`Account::set_waiting`]) before the retry, since releases notify only while someone
    /// waits.
    pub fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.room.notified()
    }

    fn release(&self, n: u64, received: bool) {
        if n == 0 {
            return;
        }
        let wake = {
            let mut t = self.totals();
            t.used = t.used.saturating_sub(n);
            if received {
                t.received = t.received.saturating_sub(n);
            }
            t.waiting > 0
        };
        if wake {
            self.room.notify_waiters();
        }
    }
}

/// One connection's part of the budget.
#[derive(Debug, Default)]
struct Mine {
    in_flight: AtomicU64,
    received: AtomicU64,
}

/// One connection's holder of charges: enforces the per-connection share and counts what the
/// connection holds. Dropping it while it waits withdraws the wait.
#[derive(Debug)]
pub struct Account {
    budget: Arc<MemoryBudget>,
    mine: Arc<Mine>,
    waiting: bool,
}

impl Account {
    /// The budget this account draws on.
    pub fn budget(&self) -> &Arc<MemoryBudget> {
        &self.budget
    }

    /// Bytes this connection holds in flight.
    pub fn in_flight(&self) -> u64 {
        self.mine.in_flight.load(Ordering::Relaxed)
    }

    /// Bytes this connection holds as received data.
    pub fn received(&self) -> u64 {
        self.mine.received.load(Ordering::Relaxed)
    }

    /// Charge `n` bytes of Data-In for a command about to start, or `None` when there is no
    /// room: this connection already holds its share in flight, or the daemon its limit (see the
    /// module doc for a command larger than either). `n == 0` always succeeds.
    pub fn try_charge(&self, n: u64) -> Option<Charge> {
        if n == 0 {
            return Some(self.charge_of(0, false));
        }
        let mine = self.in_flight();
        let fits_mine = mine == 0 || mine.checked_add(n).is_some_and(|m| m <= self.budget.share);
        if !fits_mine {
            return None;
        }
        {
            let mut t = self.budget.totals();
            let flying = t.in_flight();
            let fits_all = flying == 0
                || flying
                    .checked_add(n)
                    .is_some_and(|u| u <= self.budget.limit);
            if !fits_all {
                return None;
            }
            t.used = t.used.saturating_add(n);
            t.charges = t.charges.wrapping_add(1);
        }
        self.mine.in_flight.fetch_add(n, Ordering::Relaxed);
        Some(self.charge_of(n, false))
    }

    /// The Data-Out this connection may commit to while assembling writes, given that it
    /// has `committed` bytes charged for that already (the iSCSI connection's allowance,
    /// `Connection::set_data_out_allowance`): at most its share, no more than the budget has
    /// left, and no more than leaves received payload daemon-wide (write data assembled or
    /// held by commands) within [`RECEIVED_DIVISOR`]⁻¹ of the limit. The rest stays for the
    /// Data-In of reads: writers that never finish cannot take the whole budget, and what
    /// they make the process hold (and malloc keep afterwards) stays well below the limit.
    pub fn data_out_allowance(&self, committed: u64) -> u64 {
        let t = self.budget.totals();
        let left = self
            .budget
            .limit
            .saturating_sub(t.used)
            .saturating_add(committed);
        let others = t.received.saturating_sub(committed);
        let received_room = (self.budget.limit / RECEIVED_DIVISOR).saturating_sub(others);
        self.budget.share.min(left).min(received_room)
    }

    /// Charge `n` bytes already received and held (never refused: the bytes exist).
    pub fn hold_received(&self, n: u64) -> Charge {
        if n > 0 {
            let mut t = self.budget.totals();
            t.used = t.used.saturating_add(n);
            t.received = t.received.saturating_add(n);
            t.charges = t.charges.wrapping_add(1);
        }
        self.mine.received.fetch_add(n, Ordering::Relaxed);
        self.charge_of(n, true)
    }

    fn charge_of(&self, n: u64, received: bool) -> Charge {
        Charge {
            budget: self.budget.clone(),
            mine: self.mine.clone(),
            bytes: n,
            received,
        }
    }

    /// Whether this connection is marked as waiting for room.
    pub fn is_waiting(&self) -> bool {
        self.waiting
    }

    /// Mark this connection as waiting for room (releases then wake [`MemoryBudget::notified`]
    /// futures) or as no longer waiting. Idempotent.
    pub fn set_waiting(&mut self, waiting: bool) {
        if self.waiting == waiting {
            return;
        }
        self.waiting = waiting;
        let mut t = self.budget.totals();
        t.waiting = if waiting {
            t.waiting.saturating_add(1)
        } else {
            t.waiting.saturating_sub(1)
        };
    }
}

impl Drop for Account {
    fn drop(&mut self) {
        self.set_waiting(false);
    }
}

/// Bytes charged to the budget; released (and waiters woken) on drop.
#[derive(Debug)]
#[must_use = "a charge is released when dropped"]
pub struct Charge {
    budget: Arc<MemoryBudget>,
    mine: Arc<Mine>,
    bytes: u64,
    received: bool,
}

impl Charge {
    /// The charged bytes.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Set a *received* charge to `n` bytes (growing is never refused; shrinking releases).
    /// An in-flight charge only shrinks: growing it would bypass admission, so that is ignored.
    pub fn resize(&mut self, n: u64) {
        if n > self.bytes {
            if !self.received {
                return;
            }
            let more = n.saturating_sub(self.bytes);
            {
                let mut t = self.budget.totals();
                t.used = t.used.saturating_add(more);
                t.received = t.received.saturating_add(more);
                t.charges = t.charges.wrapping_add(1);
            }
            self.mine.received.fetch_add(more, Ordering::Relaxed);
        } else {
            let less = self.bytes.saturating_sub(n);
            self.give_back(less);
        }
        self.bytes = n;
    }

    fn give_back(&self, n: u64) {
        if n == 0 {
            return;
        }
        let mine = if self.received {
            &self.mine.received
        } else {
            &self.mine.in_flight
        };
        // Never below zero: the account's counters are sums of live charges.
        let _ = mine.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
            Some(v.saturating_sub(n))
        });
        self.budget.release(n, self.received);
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.give_back(self.bytes);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
    use super::*;
    use std::time::Duration;

    const MIB: u64 = 1 << 20;

    #[test]
    fn charges_until_the_share_then_refuses_and_drop_releases() {
        let b = MemoryBudget::new(64 * MIB);
        let a = b.account();
        let c1 = a.try_charge(10 * MIB).expect("room");
        let c2 = a.try_charge(6 * MIB).expect("room up to the 16 MiB share");
        assert_eq!((b.used(), a.in_flight()), (16 * MIB, 16 * MIB));
        assert!(a.try_charge(1).is_none(), "over the connection's share");
        // Another connection still has room.
        let other = b.account();
        let c3 = other.try_charge(MIB).expect("bystander has room");
        drop(c1);
        assert_eq!(b.used(), 7 * MIB);
        assert!(a.try_charge(10 * MIB).is_some());
        drop((c2, c3));
        assert_eq!(b.used(), 0);
        assert_eq!((a.in_flight(), other.in_flight()), (0, 0));
    }

    #[test]
    fn the_daemon_limit_binds_across_connections() {
        let b = MemoryBudget::new(8 * MIB);
        let accounts: Vec<Account> = (0..5).map(|_| b.account()).collect();
        let held: Vec<Charge> = accounts
            .iter()
            .take(4)
            .map(|a| a.try_charge(2 * MIB).expect("share is 2 MiB"))
            .collect();
        assert_eq!(b.used(), 8 * MIB);
        assert!(accounts[4].try_charge(1).is_none(), "the daemon is full");
        drop(held);
        assert!(accounts[4].try_charge(2 * MIB).is_some());
    }

    #[test]
    fn data_out_allowance_is_the_share_within_the_room_and_the_received_half() {
        let b = MemoryBudget::new(64 * MIB);
        let (a, c) = (b.account(), b.account());
        assert_eq!(a.data_out_allowance(0), 16 * MIB, "the share");
        // Others' received write data: the received half binds.
        let theirs = c.hold_received(24 * MIB);
        assert_eq!(a.data_out_allowance(0), 8 * MIB);
        // What this connection already committed counts as its own room.
        let mut mine = a.hold_received(6 * MIB);
        assert_eq!(a.data_out_allowance(6 * MIB), 8 * MIB);
        mine.resize(0);
        // In-flight Data-In elsewhere: what the budget has left binds.
        drop(theirs);
        let flying: Vec<Charge> = (0..4)
            .map(|_| b.account().try_charge(15 * MIB).unwrap())
            .collect();
        assert_eq!(a.data_out_allowance(0), 4 * MIB);
        drop(flying);
        assert_eq!(a.data_out_allowance(0), 16 * MIB);
    }

    #[test]
    fn zero_is_always_admitted_and_costs_nothing() {
        let b = MemoryBudget::new(MIB);
        let a = b.account();
        let _full = a.try_charge(MIB).expect("room");
        let z = a.try_charge(0).expect("zero fits");
        assert_eq!((z.bytes(), b.used()), (0, MIB));
    }

    #[test]
    fn an_oversized_command_runs_alone() {
        let b = MemoryBudget::new(4 * MIB);
        let a = b.account();
        let other = b.account();
        let small = other.try_charge(MIB).expect("room");
        assert!(
            a.try_charge(16 * MIB).is_none(),
            "waits while anything flies"
        );
        drop(small);
        let big = a
            .try_charge(16 * MIB)
            .expect("nothing in flight: runs alone");
        assert_eq!(b.used(), 16 * MIB);
        assert!(other.try_charge(1).is_none(), "everyone waits for it");
        drop(big);
        assert!(other.try_charge(MIB).is_some());
    }

    #[test]
    fn a_command_over_the_share_runs_when_its_connection_holds_nothing() {
        let b = MemoryBudget::new(16 * MIB);
        let a = b.account();
        let c = a
            .try_charge(8 * MIB)
            .expect("share 4 MiB, but nothing held yet");
        assert!(a.try_charge(MIB).is_none());
        drop(c);
        assert_eq!(b.used(), 0);
    }

    #[test]
    fn received_bytes_are_counted_but_never_make_a_command_wait() {
        let b = MemoryBudget::new(4 * MIB);
        let a = b.account();
        let other = b.account();
        let mut rx = other.hold_received(6 * MIB);
        assert!(b.over_limit());
        assert_eq!((b.used(), other.received()), (6 * MIB, 6 * MIB));
        let c = a
            .try_charge(MIB)
            .expect("received bytes do not block admission");
        rx.resize(2 * MIB);
        assert_eq!((b.used(), other.received()), (3 * MIB, 2 * MIB));
        rx.resize(5 * MIB);
        assert_eq!(b.used(), 6 * MIB);
        drop((c, rx));
        assert_eq!(b.used(), 0);
        assert_eq!(other.received(), 0);
    }

    #[test]
    fn an_in_flight_charge_only_shrinks() {
        let b = MemoryBudget::new(4 * MIB);
        let a = b.account();
        let mut c = a.try_charge(MIB).expect("room");
        c.resize(8 * MIB);
        assert_eq!((c.bytes(), b.used()), (MIB, MIB));
        c.resize(0);
        assert_eq!((b.used(), a.in_flight()), (0, 0));
    }

    #[tokio::test]
    async fn a_release_wakes_a_waiting_connection() {
        let b = MemoryBudget::new(2 * MIB);
        let holder = b.account();
        let full = holder.try_charge(MIB).expect("room");
        let full2 = b.account().try_charge(MIB).expect("room");
        let mut waiter = b.account();
        let b2 = b.clone();
        let task = tokio::spawn(async move {
            loop {
                let room = b2.notified();
                tokio::pin!(room);
                room.as_mut().enable();
                waiter.set_waiting(true);
                if let Some(c) = waiter.try_charge(MIB) {
                    waiter.set_waiting(false);
                    return c.bytes();
                }
                room.await;
            }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!task.is_finished(), "no room yet");
        drop(full);
        let got = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("woken by the release")
            .expect("task");
        assert_eq!(got, MIB);
        drop(full2);
        assert_eq!(b.totals().waiting, 0);
    }

    #[test]
    fn dropping_a_waiting_account_withdraws_its_wait() {
        let b = MemoryBudget::new(MIB);
        let mut a = b.account();
        a.set_waiting(true);
        a.set_waiting(true);
        assert_eq!(b.totals().waiting, 1);
        drop(a);
        assert_eq!(b.totals().waiting, 0);
    }
}
