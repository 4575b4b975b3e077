//! An in-memory model of the etcd features the protocol relies on, in virtual time.
//!
//! Modelled: one store-wide revision counter incremented by every write (a lease revocation
//! deletes all its keys at one revision, as etcd's lessor does); per key the value,
//! `create_revision`, `mod_revision` and lease; leases with a TTL that a keepalive refreshes
//! to `now + T` on receipt and that expire at that instant; the single-key compare-and-swap
//! transaction of scale-out.md §2.2 step 2; and the ordered event log a watch streams from.
//! Not modelled: compaction, multiple LUs, quorum loss (the simulation models unreachability
//! per link instead).

use crate::op::Record;
use crate::{GatewayId, Revision, Time};
use std::collections::BTreeMap;
use std::time::Duration;

/// A lease id as the store grants it; 0 is never granted.
pub type LeaseId = u64;

/// The keys of one LU's cluster state (scale-out.md §2.1, without the prefix).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Key {
    /// `P/lu/<naa>/pr`: the [`Record`].
    Pr,
    /// `P/gw/<gw>`: existence = member; under the gateway's lease.
    Member(GatewayId),
    /// `P/lu/<naa>/applied/<gw>`: highest record revision applied; under the gateway's lease.
    Applied(GatewayId),
    /// `P/lu/<naa>/drained/<gw>`: highest revision whose aborted local tasks finished their
    /// backend I/O; under the gateway's lease.
    Drained(GatewayId),
}

/// A stored value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// The LU's reservation record.
    Record(Box<Record>),
    /// A member key's value (the address and ports are not needed by the protocol).
    Member,
    /// An `applied` or `drained` acknowledgement.
    Revision(Revision),
}

/// A key's current version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The value.
    pub value: Value,
    /// Revision of the put that created the key.
    pub create_revision: Revision,
    /// Revision of the last put.
    pub mod_revision: Revision,
    /// The lease the key is attached to, if any.
    pub lease: Option<LeaseId>,
}

/// What happened to a key at a revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The key was written; `create_revision` is that of the key's current life.
    Put {
        /// The new value.
        value: Value,
        /// Revision that created the key.
        create_revision: Revision,
    },
    /// The key was deleted (in this model: only by lease expiry).
    Delete,
}

/// One watch event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The revision of the write.
    pub revision: Revision,
    /// The key written.
    pub key: Key,
    /// What was written.
    pub change: Change,
}

/// Answer to [`Kv::txn`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxnResult {
    /// Both compares held; the put is at this revision.
    Committed(Revision),
    /// A compare failed: the key's current `mod_revision`, and whether the caller's member
    /// key still exists under the caller's lease (etcd's `Else(get …)` of both keys).
    Failed {
        /// `mod_revision` of the LU key (0 if absent).
        current: Revision,
        /// The caller's member key exists under the given lease.
        member_alive: bool,
    },
}

#[derive(Debug, Clone, Copy)]
struct Lease {
    ttl: Duration,
    expiry: Time,
}

/// The store. Times passed in are the store's own (real) clock.
#[derive(Debug, Clone, Default)]
pub struct Kv {
    revision: Revision,
    keys: BTreeMap<Key, KeyValue>,
    leases: BTreeMap<LeaseId, Lease>,
    next_lease: LeaseId,
    log: Vec<(Time, Event)>,
}

impl Kv {
    /// An empty store at revision 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// The head revision.
    pub fn head(&self) -> Revision {
        self.revision
    }

    /// The current version of `key`.
    pub fn get(&self, key: Key) -> Option<&KeyValue> {
        self.keys.get(&key)
    }

    /// Grants a lease with TTL `ttl`, expiring at `now + ttl`.
    pub fn grant(&mut self, now: Time, ttl: Duration) -> LeaseId {
        self.next_lease += 1;
        let id = self.next_lease;
        self.leases.insert(
            id,
            Lease {
                ttl,
                expiry: now.saturating_add(ttl),
            },
        );
        id
    }

    /// Refreshes lease `id` to expire at `now + T`; `None` if it no longer exists (the
    /// keepalive answers TTL 0, "lease not found"). Call [`Kv::expire`] first.
    pub fn keepalive(&mut self, now: Time, id: LeaseId) -> Option<Duration> {
        let lease = self.leases.get_mut(&id)?;
        lease.expiry = now.saturating_add(lease.ttl);
        Some(lease.ttl)
    }

    /// The instant the store will revoke lease `id`, if it is alive.
    pub fn lease_expiry(&self, id: LeaseId) -> Option<Time> {
        self.leases.get(&id).map(|l| l.expiry)
    }

    /// The earliest lease expiry.
    pub fn next_expiry(&self) -> Option<Time> {
        self.leases.values().map(|l| l.expiry).min()
    }

    /// Revokes every lease whose expiry is at or before `now`, deleting its keys at one new
    /// revision per lease.
    pub fn expire(&mut self, now: Time) {
        let dead: Vec<LeaseId> = self
            .leases
            .iter()
            .filter(|(_, l)| l.expiry <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in dead {
            self.leases.remove(&id);
            let keys: Vec<Key> = self
                .keys
                .iter()
                .filter(|(_, kv)| kv.lease == Some(id))
                .map(|(k, _)| *k)
                .collect();
            if keys.is_empty() {
                continue;
            }
            self.revision += 1;
            for key in keys {
                self.keys.remove(&key);
                let ev = Event {
                    revision: self.revision,
                    key,
                    change: Change::Delete,
                };
                self.log.push((now, ev));
            }
        }
    }

    /// Puts `value` at `key` under `lease` at a new revision. `None` (nothing written) if the
    /// lease is not alive.
    pub fn put(
        &mut self,
        now: Time,
        key: Key,
        value: Value,
        lease: Option<LeaseId>,
    ) -> Option<Revision> {
        if lease.is_some_and(|l| !self.leases.contains_key(&l)) {
            return None;
        }
        self.revision += 1;
        let rev = self.revision;
        let create_revision = self.keys.get(&key).map_or(rev, |kv| kv.create_revision);
        self.keys.insert(
            key,
            KeyValue {
                value: value.clone(),
                create_revision,
                mod_revision: rev,
                lease,
            },
        );
        self.log.push((
            now,
            Event {
                revision: rev,
                key,
                change: Change::Put {
                    value,
                    create_revision,
                },
            },
        ));
        Some(rev)
    }

    /// `If(mod(key) == expect, lease(Member(gw)) == lease) Then(put key = value) Else(get)`
    /// (§2.2 step 2). An absent key has `mod_revision` 0.
    pub fn txn(
        &mut self,
        now: Time,
        key: Key,
        expect: Revision,
        gw: GatewayId,
        lease: LeaseId,
        value: Value,
    ) -> TxnResult {
        let current = self.keys.get(&key).map_or(0, |kv| kv.mod_revision);
        let member_alive = self
            .keys
            .get(&Key::Member(gw))
            .is_some_and(|kv| kv.lease == Some(lease))
            && self.leases.contains_key(&lease);
        if current != expect || !member_alive {
            return TxnResult::Failed {
                current,
                member_alive,
            };
        }
        match self.put(now, key, value, None) {
            Some(rev) => TxnResult::Committed(rev),
            None => TxnResult::Failed {
                current,
                member_alive,
            },
        }
    }

    /// Every event with a revision above `rev`, in revision order (a watch from `rev + 1`).
    pub fn events_since(&self, rev: Revision) -> Vec<Event> {
        let start = self.log.partition_point(|(_, e)| e.revision <= rev);
        self.log
            .iter()
            .skip(start)
            .map(|(_, e)| e.clone())
            .collect()
    }

    /// Every event with the store time it happened at (for invariant checks).
    pub fn history(&self) -> &[(Time, Event)] {
        &self.log
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(ms: u64) -> Time {
        Time::from_micros(ms * 1000)
    }

    #[test]
    fn cas_on_mod_revision_and_lease() {
        let mut kv = Kv::new();
        let g = GatewayId(1);
        let l = kv.grant(t(0), Duration::from_secs(5));
        assert_eq!(
            kv.put(t(0), Key::Member(g), Value::Member, Some(l)),
            Some(1)
        );
        let v = Value::Revision(9);
        assert_eq!(
            kv.txn(t(1), Key::Pr, 0, g, l, v.clone()),
            TxnResult::Committed(2)
        );
        assert_eq!(
            kv.txn(t(2), Key::Pr, 0, g, l, v.clone()),
            TxnResult::Failed {
                current: 2,
                member_alive: true
            }
        );
        assert_eq!(
            kv.txn(t(2), Key::Pr, 2, g, l + 1, v.clone()),
            TxnResult::Failed {
                current: 2,
                member_alive: false
            }
        );
        assert_eq!(
            kv.get(Key::Pr).map(|k| (k.create_revision, k.mod_revision)),
            Some((2, 2))
        );
        assert_eq!(kv.events_since(1).len(), 1);
    }

    #[test]
    fn leases_expire_unless_kept_alive_and_delete_their_keys_at_one_revision() {
        let mut kv = Kv::new();
        let g = GatewayId(1);
        let l = kv.grant(t(0), Duration::from_secs(5));
        kv.put(t(0), Key::Member(g), Value::Member, Some(l));
        kv.put(t(0), Key::Applied(g), Value::Revision(0), Some(l));
        assert_eq!(kv.keepalive(t(4000), l), Some(Duration::from_secs(5)));
        kv.expire(t(8999));
        assert_eq!(kv.lease_expiry(l), Some(t(9000)));
        kv.expire(t(9000));
        assert_eq!(kv.keepalive(t(9000), l), None);
        assert_eq!(kv.head(), 3);
        let evs = kv.events_since(2);
        assert_eq!(evs.len(), 2);
        assert!(evs
            .iter()
            .all(|e| e.revision == 3 && e.change == Change::Delete));
        assert_eq!(
            kv.put(t(9001), Key::Applied(g), Value::Revision(1), Some(l)),
            None
        );
    }
}
