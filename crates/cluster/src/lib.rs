//! Several gateways serving one logical unit with one persistent-reservation state kept in an
//! etcd-like store (issue 18; `reference/scale-out.md` §0 and §2).
//!
//! This crate is the protocol as sans-IO code plus the deterministic simulation that checks it
//! before any real etcd client exists (scale-out.md §0.7):
//!
//! - [`lease`]: the self-fencing bound `D = s + T(1−ρ) − m` and its settings (§2.4).
//! - [`op`]: the replicated operation and the record stored at the LU key (§2.1); [`codec`]:
//!   that record and the acknowledgements as the bytes etcd stores.
//! - [`kv`]: an in-memory model of the etcd features the protocol uses: revisions, leases with
//!   expiry in virtual time, a compare-and-swap transaction and an ordered watch log.
//! - [`gateway`]: the per-gateway state machine for one LU (§2.2, §2.3): it performs no I/O and
//!   reads no clock; the caller passes `now` and carries out the requests and outputs it polls.
//! - [`sim`]: three gateways, hosts and a medium over the fake store, with seeded partitions,
//!   stalls, kills, delays and clock skew, and the invariant checker.

#![forbid(unsafe_code)]

pub mod codec;
pub mod gateway;
pub mod kv;
pub mod lease;
pub mod op;
pub mod sim;

use std::fmt;
use std::time::Duration;

/// An instant on one clock, in microseconds since an origin the driver chooses.
///
/// Each gateway passes its own monotonic clock (`CLOCK_MONOTONIC`); instants of different
/// gateways are not comparable. The protocol code never reads a clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Time(u64);

impl Time {
    /// The instant `micros` microseconds after the origin.
    pub const fn from_micros(micros: u64) -> Self {
        Self(micros)
    }

    /// Microseconds since the origin.
    pub const fn as_micros(self) -> u64 {
        self.0
    }

    /// `self + d`, saturating at the largest representable instant.
    pub fn saturating_add(self, d: Duration) -> Self {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        Self(self.0.saturating_add(us))
    }

    /// `self - d`, saturating at the origin.
    pub fn saturating_sub(self, d: Duration) -> Self {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        Self(self.0.saturating_sub(us))
    }

    /// `self - earlier`, or zero when `earlier` is later.
    pub fn saturating_duration_since(self, earlier: Time) -> Duration {
        Duration::from_micros(self.0.saturating_sub(earlier.0))
    }
}

/// A gateway of the cluster: the `<gw>` of the keys `P/gw/<gw>`, `applied/<gw>`, `drained/<gw>`
/// (scale-out.md §2.1). The daemon maps its configured gateway names to these indexes; lower
/// indexes win the "lowest-id survivor" duties of §2.5.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GatewayId(pub u32);

impl fmt::Display for GatewayId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "gw{}", self.0)
    }
}

/// An etcd revision: the store-wide counter every write increments; 0 means "never written".
pub type Revision = u64;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_saturates() {
        let t = Time::from_micros(u64::MAX - 1);
        assert_eq!(
            t.saturating_add(Duration::from_secs(1)).as_micros(),
            u64::MAX
        );
        assert_eq!(
            Time::from_micros(3).saturating_sub(Duration::from_micros(9)),
            Time::default()
        );
        assert_eq!(
            Time::from_micros(9).saturating_duration_since(Time::from_micros(5)),
            Duration::from_micros(4)
        );
    }
}
