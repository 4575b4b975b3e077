//! Session sequence numbers (RFC 7143 §4.2.2): the CmdSN window and StatSN.
//!
//! Sequence numbers compare with serial number arithmetic (RFC 1982, 32 bits), as §4.2.2.1 asks.

use std::collections::HashMap;

/// `a < b` in 32-bit serial number arithmetic (RFC 1982 §3.2).
pub fn sn_lt(a: u32, b: u32) -> bool {
    a != b && b.wrapping_sub(a) < 0x8000_0000
}

/// `a <= b` in serial number arithmetic.
pub fn sn_le(a: u32, b: u32) -> bool {
    a == b || sn_lt(a, b)
}

/// What to do with a received non-immediate command's CmdSN (§4.2.2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// CmdSN == ExpCmdSN: deliver now (ExpCmdSN has advanced).
    Deliver,
    /// Inside the window but ahead of ExpCmdSN: hold until the gap closes.
    Hold,
    /// Outside [ExpCmdSN, MaxCmdSN], or a duplicate: silently dropped.
    Drop,
}

/// The CmdSN window the target grants, with commands held for in-order delivery.
///
/// Holds at most `window` entries (one per CmdSN in the window), so its size is bounded.
#[derive(Debug)]
pub struct CmdWindow<T> {
    exp_cmd_sn: u32,
    /// The largest MaxCmdSN advertised so far: never lowered, so commands sent under an
    /// earlier advertisement stay admissible.
    max_cmd_sn: u32,
    window: u32,
    held: HashMap<u32, T>,
}

impl<T> CmdWindow<T> {
    /// Start at `exp_cmd_sn` (the CmdSN of the leading Login Request) with a window of
    /// `window` commands (at least 1).
    pub fn new(exp_cmd_sn: u32, window: u32) -> Self {
        let window = window.max(1);
        CmdWindow {
            exp_cmd_sn,
            max_cmd_sn: exp_cmd_sn.wrapping_add(window).wrapping_sub(1),
            window,
            held: HashMap::new(),
        }
    }

    pub fn exp_cmd_sn(&self) -> u32 {
        self.exp_cmd_sn
    }

    /// The window depth: at most this many commands outstanding (MaxCmdSN - ExpCmdSN + 1 when
    /// nothing runs).
    pub fn window(&self) -> u32 {
        self.window
    }

    /// MaxCmdSN as last granted (§4.2.2.1).
    pub fn max_cmd_sn(&self) -> u32 {
        self.max_cmd_sn
    }

    /// Recompute MaxCmdSN = ExpCmdSN + window - 1 - `outstanding` (commands still running),
    /// so that at most `window` commands are in flight, never below what was already granted
    /// (a grant cannot be taken back). With `window` or more outstanding the candidate is
    /// ExpCmdSN - 1, which closes the window (§4.2.2.1): MaxCmdSN then stays where it is until
    /// commands finish. Returns the new MaxCmdSN.
    pub fn grant(&mut self, outstanding: usize) -> u32 {
        let busy = u32::try_from(outstanding)
            .unwrap_or(u32::MAX)
            .min(self.window);
        let candidate = self
            .exp_cmd_sn
            .wrapping_add(self.window - busy)
            .wrapping_sub(1);
        if sn_lt(self.max_cmd_sn, candidate) {
            self.max_cmd_sn = candidate;
        }
        self.max_cmd_sn
    }

    /// True when `sn` is within [ExpCmdSN, MaxCmdSN].
    pub fn in_window(&self, sn: u32) -> bool {
        sn_le(self.exp_cmd_sn, sn) && sn_le(sn, self.max_cmd_sn())
    }

    /// Admit a non-immediate command. On [`Admission::Deliver`] the caller processes `item`
    /// and then drains [`CmdWindow::next_ready`]; on `Hold` the item is kept here.
    pub fn admit(&mut self, sn: u32, item: T) -> (Admission, Option<T>) {
        if !self.in_window(sn) || self.held.contains_key(&sn) {
            return (Admission::Drop, None);
        }
        if sn == self.exp_cmd_sn {
            self.exp_cmd_sn = self.exp_cmd_sn.wrapping_add(1);
            return (Admission::Deliver, Some(item));
        }
        self.held.insert(sn, item);
        (Admission::Hold, None)
    }

    /// The held command whose turn has come, if any (advances ExpCmdSN).
    pub fn next_ready(&mut self) -> Option<T> {
        let item = self.held.remove(&self.exp_cmd_sn)?;
        self.exp_cmd_sn = self.exp_cmd_sn.wrapping_add(1);
        Some(item)
    }

    /// Consider `sn` received without delivering anything (§11.5.1 b: an ABORT TASK whose
    /// RefCmdSN names a command not yet arrived). Returns false when `sn` is outside the window.
    pub fn skip(&mut self, sn: u32) -> bool
    where
        T: Default,
    {
        if !self.in_window(sn) {
            return false;
        }
        if sn == self.exp_cmd_sn {
            self.exp_cmd_sn = self.exp_cmd_sn.wrapping_add(1);
        } else {
            self.held.insert(sn, T::default());
        }
        true
    }

    /// Number of commands held for ordering.
    pub fn held(&self) -> usize {
        self.held.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_arithmetic_wraps() {
        assert!(sn_lt(0xffff_fffe, 1));
        assert!(!sn_lt(1, 0xffff_fffe));
        assert!(sn_le(5, 5));
        assert!(!sn_lt(5, 5));
    }

    #[test]
    fn accepts_in_order_and_reorders_held() {
        let mut w: CmdWindow<u32> = CmdWindow::new(10, 4);
        assert_eq!(w.max_cmd_sn(), 13);
        assert_eq!(w.admit(12, 12).0, Admission::Hold);
        assert_eq!(w.admit(11, 11).0, Admission::Hold);
        assert_eq!(w.admit(10, 10), (Admission::Deliver, Some(10)));
        assert_eq!(w.next_ready(), Some(11));
        assert_eq!(w.next_ready(), Some(12));
        assert_eq!(w.next_ready(), None);
        assert_eq!(w.exp_cmd_sn(), 13);
        assert_eq!(w.held(), 0);
    }

    #[test]
    fn rejects_outside_window_and_duplicates() {
        let mut w: CmdWindow<u32> = CmdWindow::new(0xffff_fffe, 4);
        assert_eq!(w.max_cmd_sn(), 1);
        assert_eq!(w.admit(2, 0).0, Admission::Drop, "MaxCmdSN + 1");
        assert_eq!(w.admit(0xffff_fffd, 0).0, Admission::Drop, "ExpCmdSN - 1");
        assert_eq!(w.admit(1, 0).0, Admission::Hold);
        assert_eq!(w.admit(1, 0).0, Admission::Drop, "duplicate");
    }

    #[test]
    fn grant_shrinks_with_outstanding_but_never_lowers() {
        let mut w: CmdWindow<u32> = CmdWindow::new(1, 4);
        assert_eq!(w.max_cmd_sn(), 4);
        assert_eq!(w.admit(1, 1).0, Admission::Deliver);
        assert_eq!(w.grant(3), 4, "3 running: no new credit, old grant kept");
        assert_eq!(w.grant(0), 5);
        assert_eq!(w.grant(10), 5);
    }

    #[test]
    fn grant_holds_max_cmd_sn_while_the_window_is_full() {
        let mut w: CmdWindow<u32> = CmdWindow::new(1, 4);
        for sn in 1..=4 {
            assert_eq!(w.admit(sn, sn).0, Admission::Deliver);
        }
        // Four running: ExpCmdSN 5, MaxCmdSN stays 4 (= ExpCmdSN - 1, window closed).
        assert_eq!(w.grant(4), 4);
        assert_eq!(w.grant(9), 4);
        assert!(!w.in_window(5));
        assert_eq!(w.grant(3), 5, "one finished: one slot");
        assert_eq!(w.grant(0), 8);
    }

    #[test]
    fn skip_closes_a_gap() {
        let mut w: CmdWindow<u32> = CmdWindow::new(0, 8);
        assert_eq!(w.admit(1, 1).0, Admission::Hold);
        assert!(w.skip(0));
        assert_eq!(w.next_ready(), Some(1));
        assert!(!w.skip(100));
    }
}
