//! The live-migration storage handover coordinator (semantics.md §3).
//!
//! Write access to a logical unit L moves from a source host S to a destination host D at the
//! switchover of a live migration: never two writers, no acknowledged write lost, the source fenced
//! by the target even if it misbehaves (semantics.md §3.2). This crate holds the pure core:
//!
//! - [`handover`]: a sans-IO state machine for one migration (prepare → pre-copy → pause → commit
//!   → resume → announce), with the failure rules of semantics.md §3.4. It performs no I/O and
//!   reads no clock: the caller passes `now` and executes the [`handover::Action`]s it polls.
//! - [`journal`]: the write-ahead journal of that machine (one checksummed line per record) and
//!   [`journal::replay`], which decides how a coordinator killed at any point resumes so that the
//!   LU ends with exactly one owner and the VM running on it.
//!
//! The driver that talks to the daemon's admin API and runs the hooks lives elsewhere.

pub mod handover;
pub mod journal;

#[cfg(test)]
mod sim;

use std::fmt;
use std::time::Duration;

/// An instant, in microseconds since an origin the driver chooses (the Unix epoch when the
/// journal is shared between runs, so that a resumed coordinator's times stay comparable).
///
/// The core never reads a clock; every input carries the caller's `now`.
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

    /// `self - earlier`, or zero when `earlier` is later.
    pub fn saturating_duration_since(self, earlier: Time) -> Duration {
        Duration::from_micros(self.0.saturating_sub(earlier.0))
    }
}

/// A step of the handover (issue 6; semantics.md §3.3 steps 0-6 and the recoveries of §3.4).
///
/// The names are those of the journal ([`Step::name`]) and of the hooks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Step {
    /// Admin API `prepare`: D is logged in to L and may read, not write (§3.3 step 0).
    Prepare,
    /// Hook `--precopy`: the hypervisor copies memory (§3.3 step 1).
    PreCopy,
    /// Hook `--pause`: the source guest is stopped and its I/O drained (§3.3 step 2).
    Pause,
    /// Admin API `commit`: fence S, drain or abort its commands, flush, make D the owner
    /// (§3.3 steps 3-5). Its `started` record is the write-ahead decision of step 3.
    Commit,
    /// Admin API state query, after an unknown commit or hand-back outcome (§3.4 row 2).
    Query,
    /// Admin API `abort`: before commit, leaves S the only writer (§3.4 row 1).
    Abort,
    /// Hook `--rollback`: resume the guest on the source (§3.2 guarantee 4).
    Rollback,
    /// Hook `--resume`: resume the guest on the destination (§3.3 step 6).
    Resume,
    /// Hook `--announce`: the destination announces the guest's addresses (ARP).
    Announce,
    /// Admin API reverse commit D → S with the next epoch, after the destination failed
    /// (§3.4 row 3).
    HandBack,
    /// The whole handover; its `done`/`failed` record closes the journal.
    Handover,
}

impl Step {
    /// Every step, in journal order of first use.
    pub const ALL: [Step; 11] = [
        Step::Prepare,
        Step::PreCopy,
        Step::Pause,
        Step::Commit,
        Step::Query,
        Step::Abort,
        Step::Rollback,
        Step::Resume,
        Step::Announce,
        Step::HandBack,
        Step::Handover,
    ];

    /// The journal and hook name of the step.
    pub const fn name(self) -> &'static str {
        match self {
            Step::Prepare => "prepare",
            Step::PreCopy => "precopy",
            Step::Pause => "pause",
            Step::Commit => "commit",
            Step::Query => "query",
            Step::Abort => "abort",
            Step::Rollback => "rollback",
            Step::Resume => "resume",
            Step::Announce => "announce",
            Step::HandBack => "handback",
            Step::Handover => "handover",
        }
    }

    /// The step named `name` ([`Step::name`]).
    pub fn from_name(name: &str) -> Option<Step> {
        Step::ALL.into_iter().find(|s| s.name() == name)
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where a step stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Begun; its effect may or may not have happened yet.
    Started,
    /// Finished and known to have taken effect.
    Done,
    /// Finished without effect, or with an unknown effect (a timeout).
    Failed,
}

impl Phase {
    /// The journal name of the phase.
    pub const fn name(self) -> &'static str {
        match self {
            Phase::Started => "started",
            Phase::Done => "done",
            Phase::Failed => "failed",
        }
    }

    /// The phase named `name`.
    pub fn from_name(name: &str) -> Option<Phase> {
        [Phase::Started, Phase::Done, Phase::Failed]
            .into_iter()
            .find(|p| p.name() == name)
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_names_round_trip() {
        for s in Step::ALL {
            assert_eq!(Step::from_name(s.name()), Some(s));
        }
        assert_eq!(Step::from_name("Commit"), None);
        for p in [Phase::Started, Phase::Done, Phase::Failed] {
            assert_eq!(Phase::from_name(p.name()), Some(p));
        }
    }

    #[test]
    fn time_saturates() {
        let t = Time::from_micros(u64::MAX - 1);
        assert_eq!(
            t.saturating_add(Duration::from_secs(1)).as_micros(),
            u64::MAX
        );
        assert_eq!(
            Time::from_micros(5).saturating_duration_since(Time::from_micros(9)),
            Duration::ZERO
        );
        assert_eq!(
            Time::from_micros(9).saturating_duration_since(Time::from_micros(5)),
            Duration::from_micros(4)
        );
    }
}
