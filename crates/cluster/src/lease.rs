//! The self-fencing bound of a gateway's etcd lease (scale-out.md §2.4).
//!
//! A gateway holds a lease with TTL `T`. Let `s` be the gateway's local instant at which it sent
//! the last keepalive that came back with TTL > 0. The store cannot expire the lease before
//! `s_real + T`, because it renews on receipt, after the send. A local clock that runs slow by
//! at most ρ measures `T(1−ρ)` in no more than `T` real time, so the local deadline
//!
//! ```text
//! D = s + T(1−ρ) − m
//! ```
//!
//! is reached at least `m` before the store's expiry `E`. Other gateways act on this one only
//! at `E + Δ` (its member key's DELETE plus the lock delay), so every backend I/O submitted
//! before `D` is safe if it completes within the in-flight budget `m + Δ`.
//!
//! ρ is kept in parts per million so the arithmetic stays integral and deterministic.

use crate::Time;
use std::fmt;
use std::time::Duration;

/// The timing parameters of §2.4, unvalidated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseSettings {
    /// Lease TTL `T` granted by the store.
    pub ttl: Duration,
    /// Worst-case rate error ρ of a gateway's monotonic clock, in parts per million.
    pub rho_ppm: u32,
    /// Safety margin `m` between the local deadline and the store's expiry.
    pub margin: Duration,
    /// Lock delay `Δ`: how long others wait after a member key's DELETE before acting.
    pub lock_delay: Duration,
    /// How often a keepalive is sent (scale-out.md: `T/5`).
    pub keepalive_interval: Duration,
}

impl Default for LeaseSettings {
    /// `T = 5 s`, `ρ = 0.01`, `m = 0.5 s`, `Δ = 2 s`, keepalive every `T/5` (§2.4 defaults).
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(5),
            rho_ppm: 10_000,
            margin: Duration::from_millis(500),
            lock_delay: Duration::from_secs(2),
            keepalive_interval: Duration::from_secs(1),
        }
    }
}

/// Why a [`LeaseSettings`] cannot give a safe deadline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseError(String);

impl fmt::Display for LeaseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LeaseError {}

const PPM: u128 = 1_000_000;

/// `d · (1 − ρ)`, rounded down (a shorter local wait is the safe side).
fn shrink(d: Duration, rho_ppm: u32) -> Duration {
    let us = d.as_micros() * (PPM - u128::from(rho_ppm).min(PPM)) / PPM;
    Duration::from_micros(u64::try_from(us).unwrap_or(u64::MAX))
}

/// `d · (1 + ρ)`, rounded up (a longer local wait is the safe side).
fn stretch(d: Duration, rho_ppm: u32) -> Duration {
    let us = (d.as_micros() * (PPM + u128::from(rho_ppm))).div_ceil(PPM);
    Duration::from_micros(u64::try_from(us).unwrap_or(u64::MAX))
}

/// Validated timing: every gateway computes its deadline and waits through this.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    settings: LeaseSettings,
}

impl Timing {
    /// Checks that the bound can hold: `T`, `m`, `Δ` and the keepalive interval positive,
    /// `ρ < 1/2`, and `keepalive interval + m < T(1−ρ)` so that a gateway whose keepalives
    /// all succeed never reaches its deadline.
    pub fn new(settings: LeaseSettings) -> Result<Self, LeaseError> {
        let s = settings;
        let err = |m: String| Err(LeaseError(m));
        if s.ttl.is_zero() {
            return err("lease TTL must be positive".into());
        }
        if s.margin.is_zero() {
            return err(
                "safety margin m must be positive (it absorbs the lessor check delay)".into(),
            );
        }
        if s.lock_delay.is_zero() {
            return err(
                "lock delay must be positive: it bounds in-flight I/O of a fenced gateway".into(),
            );
        }
        if s.keepalive_interval.is_zero() {
            return err("keepalive interval must be positive".into());
        }
        if s.rho_ppm >= 500_000 {
            return err(format!(
                "clock rate error {} ppm must be below 500000",
                s.rho_ppm
            ));
        }
        let usable = shrink(s.ttl, s.rho_ppm);
        if s.keepalive_interval + s.margin >= usable {
            return err(format!(
                "keepalive interval {:?} + margin {:?} must be below T(1-rho) = {:?}: \
                 a healthy gateway would fence itself",
                s.keepalive_interval, s.margin, usable
            ));
        }
        Ok(Self { settings })
    }

    /// Timing without validation. Only for fault-injection tests that must show the
    /// invariant checker catches an unsafe bound (e.g. ρ = m = Δ = 0).
    pub fn unchecked(settings: LeaseSettings) -> Self {
        Self { settings }
    }

    /// The settings this timing was built from.
    pub fn settings(&self) -> LeaseSettings {
        self.settings
    }

    /// The local deadline `D = s + T(1−ρ) − m` for a keepalive (or grant) sent at local `s`
    /// and answered with TTL > 0. Submitting backend I/O is allowed only strictly before it.
    pub fn deadline(&self, s: Time) -> Time {
        let usable = shrink(self.settings.ttl, self.settings.rho_ppm);
        s.saturating_add(usable.saturating_sub(self.settings.margin))
    }

    /// The in-flight budget `m + Δ`: every I/O submitted before the deadline must complete
    /// within it, or storage fencing must cover it (§2.4).
    pub fn in_flight_budget(&self) -> Duration {
        self.settings.margin + self.settings.lock_delay
    }

    /// The lock delay as measured on a local clock that may run fast by ρ: `Δ(1+ρ)`, so that
    /// at least `Δ` real time passes. (§2.2 step 4 states Δ; a fast waiter would shorten it.)
    pub fn local_lock_delay(&self) -> Duration {
        stretch(self.settings.lock_delay, self.settings.rho_ppm)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn defaults_give_the_documented_bound() {
        let t = Timing::new(LeaseSettings::default()).unwrap();
        // 5 s · 0.99 − 0.5 s = 4.45 s.
        assert_eq!(
            t.deadline(Time::from_micros(1_000_000)),
            Time::from_micros(5_450_000)
        );
        assert_eq!(t.in_flight_budget(), Duration::from_millis(2500));
        assert_eq!(t.local_lock_delay(), Duration::from_millis(2020));
    }

    #[test]
    fn deadline_precedes_expiry_under_a_slow_clock() {
        // A clock slow by ρ reaches D after (T(1−ρ) − m)/(1−ρ) real time, still ≤ T − m.
        let s = LeaseSettings::default();
        let t = Timing::new(s).unwrap();
        let local = t.deadline(Time::default()).as_micros() as f64;
        let real = local / (1.0 - f64::from(s.rho_ppm) / 1e6);
        assert!(real <= (s.ttl - s.margin).as_micros() as f64);
    }

    #[test]
    fn rounding_is_on_the_safe_side() {
        let s = LeaseSettings {
            ttl: Duration::from_micros(3),
            rho_ppm: 1,
            margin: Duration::ZERO,
            ..LeaseSettings::default()
        };
        assert_eq!(
            Timing::unchecked(s).deadline(Time::default()),
            Time::from_micros(2)
        );
        let s = LeaseSettings {
            lock_delay: Duration::from_micros(1),
            rho_ppm: 1,
            ..s
        };
        assert_eq!(
            Timing::unchecked(s).local_lock_delay(),
            Duration::from_micros(2)
        );
    }

    #[test]
    fn validation_names_the_problem() {
        let bad = |f: fn(&mut LeaseSettings)| {
            let mut s = LeaseSettings::default();
            f(&mut s);
            Timing::new(s).unwrap_err().to_string()
        };
        assert!(bad(|s| s.ttl = Duration::ZERO).contains("TTL"));
        assert!(bad(|s| s.margin = Duration::ZERO).contains("margin"));
        assert!(bad(|s| s.lock_delay = Duration::ZERO).contains("lock delay"));
        assert!(bad(|s| s.keepalive_interval = Duration::ZERO).contains("keepalive"));
        assert!(bad(|s| s.rho_ppm = 600_000).contains("ppm"));
        assert!(
            bad(|s| s.keepalive_interval = Duration::from_millis(4500)).contains("fence itself")
        );
        // Unchecked keeps the zero bound for negative controls: D = s + T.
        let zero = LeaseSettings {
            rho_ppm: 0,
            margin: Duration::ZERO,
            lock_delay: Duration::ZERO,
            ..LeaseSettings::default()
        };
        assert_eq!(
            Timing::unchecked(zero).deadline(Time::default()),
            Time::from_micros(5_000_000)
        );
        assert_eq!(Timing::unchecked(zero).in_flight_budget(), Duration::ZERO);
    }
}
