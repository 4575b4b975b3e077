//! Unit attention conditions per I_T nexus (SAM-5 §5.14, SPC-4 §5.14 / §4.5.3.2 in r37).
//!
//! Keyed by I_T nexus *identity* (the LU maps sessions to a small identity id, see
//! [`crate::lu::LogicalUnit::add_nexus`]), so conditions raised while an initiator port is
//! logged out wait for its return. Each identity has a FIFO of pending conditions. A reset-class condition (ASC 29h) supersedes
//! every condition queued before it; duplicates are not queued twice. One condition is
//! reported per command (UA_INTLCK_CTRL = 00b: reporting clears it).

use std::collections::{HashMap, VecDeque};

use crate::lu::NexusId;
use crate::sense::SenseReason;

/// Upper bound on pending conditions per nexus, so a silent initiator cannot grow memory.
pub const MAX_PENDING: usize = 16;

/// Pending unit attentions, keyed by nexus.
#[derive(Debug, Default, Clone)]
pub struct UnitAttentions {
    pending: HashMap<NexusId, VecDeque<SenseReason>>,
}

impl UnitAttentions {
    pub fn new() -> Self {
        Self::default()
    }

    /// A nexus appeared: it starts with `initial` pending (29h/00h for a new nexus).
    pub fn add_nexus(&mut self, nexus: NexusId, initial: SenseReason) {
        let q = self.pending.entry(nexus).or_default();
        q.clear();
        q.push_back(initial);
    }

    /// An identity returns after an I_T nexus loss (SAM-5 §6.3.4): I_T NEXUS LOSS OCCURRED
    /// (29h/07h) goes first; conditions queued meanwhile (reservation UAs) are kept, older
    /// reset-class conditions are superseded by it.
    pub fn returned(&mut self, nexus: NexusId) {
        let q = self.pending.entry(nexus).or_default();
        q.retain(|r| r.code().1 != 0x29);
        q.push_front(SenseReason::ItNexusLossOccurred);
        q.truncate(MAX_PENDING);
    }

    /// Make sure `nexus` has a (possibly empty) queue, so conditions raised for a registrant
    /// that is not logged in are kept for its return.
    pub fn ensure(&mut self, nexus: NexusId) {
        self.pending.entry(nexus).or_default();
    }

    /// Whether nothing is pending for `nexus`.
    pub fn is_empty(&self, nexus: NexusId) -> bool {
        self.pending.get(&nexus).is_none_or(VecDeque::is_empty)
    }

    pub fn remove_nexus(&mut self, nexus: NexusId) {
        self.pending.remove(&nexus);
    }

    pub fn contains_nexus(&self, nexus: NexusId) -> bool {
        self.pending.contains_key(&nexus)
    }

    /// Queue `reason` for one nexus (ignored for unknown nexuses).
    pub fn raise(&mut self, nexus: NexusId, reason: SenseReason) {
        if let Some(q) = self.pending.get_mut(&nexus) {
            push(q, reason);
        }
    }

    /// Queue `reason` for every nexus except `except`.
    pub fn raise_others(&mut self, except: Option<NexusId>, reason: SenseReason) {
        for (n, q) in self.pending.iter_mut() {
            if Some(*n) != except {
                push(q, reason);
            }
        }
    }

    /// The oldest pending condition for `nexus`, without clearing it.
    pub fn peek(&self, nexus: NexusId) -> Option<SenseReason> {
        self.pending.get(&nexus).and_then(|q| q.front().copied())
    }

    /// Report and clear the oldest pending condition for `nexus`.
    pub fn take(&mut self, nexus: NexusId) -> Option<SenseReason> {
        self.pending.get_mut(&nexus).and_then(VecDeque::pop_front)
    }

    /// Clear one specific condition (REPORT LUNS clears REPORTED LUNS DATA HAS CHANGED).
    pub fn clear(&mut self, nexus: NexusId, reason: SenseReason) {
        if let Some(q) = self.pending.get_mut(&nexus) {
            q.retain(|r| *r != reason);
        }
    }
}

fn push(q: &mut VecDeque<SenseReason>, reason: SenseReason) {
    let (_, asc, _) = reason.code();
    if asc == 0x29 {
        // A reset supersedes everything reported before it (SAM-5 §5.14).
        q.clear();
    }
    if q.contains(&reason) || q.len() >= MAX_PENDING {
        return;
    }
    q.push_back(reason);
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn reports_in_order_once_each() {
        let mut ua = UnitAttentions::new();
        ua.add_nexus(1, SenseReason::PowerOnOrReset);
        ua.raise(1, SenseReason::ModeParametersChanged);
        ua.raise(1, SenseReason::ModeParametersChanged);
        ua.raise(1, SenseReason::CapacityDataChanged);
        assert_eq!(ua.take(1), Some(SenseReason::PowerOnOrReset));
        assert_eq!(ua.take(1), Some(SenseReason::ModeParametersChanged));
        assert_eq!(ua.take(1), Some(SenseReason::CapacityDataChanged));
        assert_eq!(ua.take(1), None);
    }

    #[test]
    fn reset_supersedes_earlier_conditions() {
        let mut ua = UnitAttentions::new();
        ua.add_nexus(1, SenseReason::PowerOnOrReset);
        ua.raise(1, SenseReason::CapacityDataChanged);
        ua.raise(1, SenseReason::BusDeviceResetOccurred);
        assert_eq!(ua.take(1), Some(SenseReason::BusDeviceResetOccurred));
        assert_eq!(ua.take(1), None);
    }

    #[test]
    fn raise_others_skips_origin_and_unknown() {
        let mut ua = UnitAttentions::new();
        ua.add_nexus(1, SenseReason::PowerOnOrReset);
        ua.add_nexus(2, SenseReason::PowerOnOrReset);
        ua.take(1);
        ua.take(2);
        ua.raise_others(Some(1), SenseReason::ModeParametersChanged);
        ua.raise(9, SenseReason::ModeParametersChanged);
        assert_eq!(ua.peek(1), None);
        assert_eq!(ua.peek(2), Some(SenseReason::ModeParametersChanged));
        assert!(!ua.contains_nexus(9));
    }

    #[test]
    fn returning_identity_keeps_reservation_conditions() {
        let mut ua = UnitAttentions::new();
        ua.add_nexus(1, SenseReason::PowerOnOrReset);
        ua.raise(1, SenseReason::RegistrationsPreempted);
        ua.returned(1);
        assert_eq!(ua.take(1), Some(SenseReason::ItNexusLossOccurred));
        assert_eq!(ua.take(1), Some(SenseReason::RegistrationsPreempted));
        assert_eq!(ua.take(1), None);
        assert!(ua.is_empty(1));
    }

    #[test]
    fn bounded_queue() {
        let mut ua = UnitAttentions::new();
        ua.add_nexus(1, SenseReason::PowerOnOrReset);
        for r in crate::sense::ALL_REASONS {
            if r.is_unit_attention() && r.code().1 != 0x29 {
                ua.raise(1, *r);
            }
        }
        let mut n = 0;
        while ua.take(1).is_some() {
            n += 1;
        }
        let expected = crate::sense::ALL_REASONS
            .iter()
            .filter(|r| r.is_unit_attention() && r.code().1 != 0x29)
            .count();
        assert!(n <= MAX_PENDING);
        // The initial 29h/00h stays ahead of them.
        assert_eq!(n, (expected + 1).min(MAX_PENDING));
    }
}
