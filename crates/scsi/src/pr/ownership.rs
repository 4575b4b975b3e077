//! Target-managed ownership of a logical unit and the target-side handover of that ownership
//! from one host to another (semantics.md §3.2 guarantees, §3.4 multipath variant (c)).
//!
//! A *host* is an iSCSI initiator name: every initiator port (ISID) of that name on every
//! target port. The owner of an LU holds, through the target, one registration that covers
//! the whole host (`isid: None`, `rtpi: None`, as a TransportID of format 00b registered with
//! ALL_TG_PT=1 would, SPC-4 §5.13.7) with the key [`owner_key`], and a Write Exclusive –
//! Registrants Only reservation (SPC-4 §5.13.1 Table 65) held by that registration. Since the
//! owner's registration is the only one, only the owner's nexuses may write; every other
//! nexus may still read (class R) and ask (class A). A nexus of the owner that logs in later,
//! with any ISID, is covered by the same registration and writes at once.
//!
//! On an owned LU the target owns the PR state: every PERSISTENT RESERVE OUT gets RESERVATION
//! CONFLICT (PR IN still reports the state), so no initiator can register itself into write
//! access under WERO or release the owner's reservation. [`crate::lu::LogicalUnit::clear_owner`]
//! hands the LU back to initiator-managed PR. LUs that were never owned are untouched.
//!
//! Every ownership decision carries an *epoch* (semantics.md §3.2 item 6): the LU keeps the
//! epoch of the last decision. A decision with a lower epoch is refused
//! ([`OwnershipError::StaleEpoch`]); a retry of the last decision (same epoch, same outcome)
//! succeeds without changing anything; a different decision with the same epoch is stale too.
//! Owner and epoch are persisted with the PR state ([`super::persist`]); the handover state
//! ([`Handover`]) is not: after a restart the handover is [`Handover::Idle`] and the
//! coordinator repeats prepare and fence with the same epoch.
//!
//! Handover of the LU from host S to host D, each step one call on the LU:
//! 1. prepare: D is logged in, S is the owner; nothing changes (D reads, S writes);
//! 2. fence: every command from S except classes A and R (SPC-4 Table 65: reads, INQUIRY,
//!    TEST UNIT READY, PR IN, …) gets RESERVATION CONFLICT at its start — writes, SYNCHRONIZE
//!    CACHE, PR OUT, RESERVE/RELEASE(6/10); S's tasks already in the task set run on, and a
//!    [`DrainTicket`] tells when they have finished (or they are aborted, TASK ABORTED);
//! 3. commit: in one PR transition S's registration goes, D's host registration comes and
//!    holds WERO, D is the owner, PRgeneration + 1, 2Ah/05h REGISTRATIONS PREEMPTED to S's
//!    nexuses (SPC-4 §5.13.11.2.4 as PREEMPT would), S's still-running tasks aborted like
//!    PREEMPT AND ABORT (SPC-4 §5.13.11.2.6);
//! 4. abort (before commit): the fence goes, S stays the only writer.

use super::{PrState, Registration, Reservation, ReservationType, MAX_NAME_LEN};

/// Low half of every [`owner_key`]: ASCII "ILOW" (ironlun owner), so a target-chosen key is
/// recognisable in READ KEYS and never zero (a zero key is no registration, SPC-4 §6.16.3).
pub const OWNER_KEY_TAG: u32 = 0x494C_4F57;

/// The reservation key the target registers for `host` (semantics.md §3.3: one key per host,
/// `host_id (4 B) || constant (4 B)`): CRC32C of the lower-cased initiator name in the high
/// four bytes, [`OWNER_KEY_TAG`] in the low four. Stable across restarts and epochs; two hosts
/// may share a key (probability 2^-32), which is harmless because the target removes and
/// checks registrations by initiator name, never by key.
pub fn owner_key(host: &str) -> u64 {
    let crc = crc32c::crc32c(host.to_ascii_lowercase().as_bytes());
    u64::from(crc) << 32 | u64::from(OWNER_KEY_TAG)
}

/// A host name as the LU compares it: an iSCSI name (RFC 7143 §4.2.7.1), lower-cased
/// (RFC 3722: names compare case-insensitively); not empty, at most [`MAX_NAME_LEN`] bytes,
/// printable ASCII without spaces or commas (a comma would make it an initiator port).
pub fn host_name(host: &str) -> Result<String, OwnershipError> {
    let ok = !host.is_empty()
        && host.len() <= MAX_NAME_LEN
        && host.bytes().all(|b| b.is_ascii_graphic() && b != b',');
    if ok {
        Ok(host.to_ascii_lowercase())
    } else {
        Err(OwnershipError::InvalidHost(host.chars().take(64).collect()))
    }
}

/// Where a handover of the LU stands (not persisted; see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Handover {
    /// No handover in progress.
    #[default]
    Idle,
    /// `to` is logged in and `from` owns the LU; nothing is fenced yet.
    Prepared {
        from: String,
        to: String,
        epoch: u64,
    },
    /// `from`'s new commands other than classes A and R get RESERVATION CONFLICT.
    Fenced {
        from: String,
        to: String,
        epoch: u64,
    },
}

impl Handover {
    /// `(from, to, epoch)` of a handover in progress.
    pub fn parts(&self) -> Option<(&str, &str, u64)> {
        match self {
            Handover::Idle => None,
            Handover::Prepared { from, to, epoch } | Handover::Fenced { from, to, epoch } => {
                Some((from, to, *epoch))
            }
        }
    }

    /// The host whose commands are fenced, if any.
    pub fn fenced(&self) -> Option<&str> {
        match self {
            Handover::Fenced { from, .. } => Some(from),
            _ => None,
        }
    }
}

/// Why an ownership or handover step was refused; on error nothing has changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OwnershipError {
    #[error("not an iSCSI initiator name: {0:?}")]
    InvalidHost(String),
    #[error("epoch {epoch} is stale: the logical unit is at epoch {current}")]
    StaleEpoch { epoch: u64, current: u64 },
    #[error("{host} does not own the logical unit (owner: {owner:?})")]
    NotOwner { host: String, owner: Option<String> },
    #[error("{0} has no session on the logical unit")]
    DestinationNotLoggedIn(String),
    #[error("source and destination are the same host")]
    SameHost,
    #[error("another handover is in progress: {0:?}")]
    HandoverInProgress(Handover),
    #[error("no handover from {0} has been prepared with this epoch")]
    NotPrepared(String),
    #[error("the handover from {0} is not fenced")]
    NotFenced(String),
    #[error("the handover with epoch {0} has already been committed")]
    AlreadyCommitted(u64),
    #[error("hosts that manage persistent reservations themselves are registered: {0:?}")]
    ForeignRegistrations(Vec<String>),
    #[error("an SPC-2 RESERVE(6/10) reservation is held")]
    Spc2Reserved,
    #[error("the handover with epoch {0} was aborted")]
    Aborted(u64),
    #[error("{0} still has a session on the logical unit (a failover of a live host needs force)")]
    SourceLoggedIn(String),
}

/// At most this many aborted handover epochs are remembered (the lowest go first).
pub const MAX_ABORTED: usize = 64;

/// One ownership or handover decision ([`PrState::ownership`]): what the LU takes as one
/// step and what a cluster replicates as one record (issue 18, scale-out.md §2.7). Host
/// names are as [`host_name`] returns them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnershipOp {
    /// Make `host` the owner at `epoch`.
    SetOwner { host: String, epoch: u64 },
    /// End target-managed ownership of `host` at `epoch`.
    ClearOwner { host: String, epoch: u64 },
    /// Handover step 1.
    Prepare {
        from: String,
        to: String,
        epoch: u64,
    },
    /// Handover step 2: gate `from`'s commands other than classes A and R.
    Fence { from: String, epoch: u64 },
    /// Handover step 3: `to` owns the LU at `epoch`.
    Commit {
        from: String,
        to: String,
        epoch: u64,
    },
    /// Handover steps 2 and 3 as one transition, for a replicated LU whose every step is a
    /// record in the shared store (scale-out.md §2.7): from `Prepared` (or `Fenced`) of the
    /// same `(from, to, epoch)`, `to` owns the LU at `epoch` and `from`'s tasks are aborted, as
    /// [`OwnershipOp::Commit`] aborts what is left of them. The caller's GOOD waits until they
    /// have drained on every gateway; until then, I/O overlapping theirs waits for them (the
    /// LU's rule for aborted tasks, `caw.rs`).
    Switch {
        from: String,
        to: String,
        epoch: u64,
    },
    /// Handover step 4 (before commit): the fence goes and `epoch` is refused from now on.
    Abort {
        from: String,
        to: String,
        epoch: u64,
    },
    /// A commit gave up (drain deadline, failed flush): the fence goes, `epoch` is not
    /// remembered as aborted.
    Unfence {
        from: String,
        to: String,
        epoch: u64,
    },
    /// Failover (issue 19): `from` failed; every registration of its nexuses goes and its
    /// tasks are aborted, as PREEMPT AND ABORT would (SPC-4 §5.13.11.2.6), and `to` owns the
    /// LU at `epoch`, in one transition. A handover away from `from` is superseded.
    Failover {
        from: String,
        to: String,
        epoch: u64,
    },
}

impl OwnershipOp {
    /// The op with every host name checked and lower-cased ([`host_name`]).
    pub fn normalized(self) -> Result<Self, OwnershipError> {
        use OwnershipOp::*;
        Ok(match self {
            SetOwner { host, epoch } => SetOwner {
                host: host_name(&host)?,
                epoch,
            },
            ClearOwner { host, epoch } => ClearOwner {
                host: host_name(&host)?,
                epoch,
            },
            Prepare { from, to, epoch } => Prepare {
                from: host_name(&from)?,
                to: host_name(&to)?,
                epoch,
            },
            Fence { from, epoch } => Fence {
                from: host_name(&from)?,
                epoch,
            },
            Commit { from, to, epoch } => Commit {
                from: host_name(&from)?,
                to: host_name(&to)?,
                epoch,
            },
            Switch { from, to, epoch } => Switch {
                from: host_name(&from)?,
                to: host_name(&to)?,
                epoch,
            },
            Abort { from, to, epoch } => Abort {
                from: host_name(&from)?,
                to: host_name(&to)?,
                epoch,
            },
            Unfence { from, to, epoch } => Unfence {
                from: host_name(&from)?,
                to: host_name(&to)?,
                epoch,
            },
            Failover { from, to, epoch } => Failover {
                from: host_name(&from)?,
                to: host_name(&to)?,
                epoch,
            },
        })
    }
}

/// What [`PrState::ownership`] cannot know from the state: facts of the LU taking the step.
/// A replica replaying a step another gateway took passes [`Checks::REPLAY`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checks {
    /// An SPC-2 RESERVE(6/10) reservation is held (set_owner is refused).
    pub spc2_reserved: bool,
    /// Whether the host the step checks has a session on the LU (the destination of a
    /// prepare, the failed host of a failover); `None`: not checked (or a forced failover).
    pub logged_in: Option<bool>,
}

impl Checks {
    /// Nothing checked beyond the state (the gateway that took the step checked its part).
    pub const REPLAY: Checks = Checks {
        spc2_reserved: false,
        logged_in: None,
    };
}

/// Whose tasks a step aborts (as PREEMPT AND ABORT does, SPC-4 §5.13.11.2.6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskPick {
    /// The tasks of this host's nexuses.
    Host(String),
    /// The tasks of every named nexus of another host.
    AllBut(String),
}

/// What a successful ownership step did, for the LU (or every gateway) to carry out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OwnershipFx {
    /// The state changed (a retry of the last decision changes nothing).
    pub changed: bool,
    /// Registrations removed: REGISTRATIONS PREEMPTED (2Ah/05h) to every nexus they cover.
    pub removed: Vec<Registration>,
    /// Tasks to abort before the step is reported.
    pub abort: Option<TaskPick>,
    /// Fence: this host's tasks in the task set must finish before the commit.
    pub drain: Option<String>,
}

impl PrState {
    /// The handover in progress.
    pub fn handover(&self) -> &Handover {
        &self.handover
    }

    /// The aborted handover epochs above [`PrState::epoch`], which are refused for good.
    pub fn aborted_epochs(&self) -> &std::collections::BTreeSet<u64> {
        &self.aborted
    }

    /// Set the handover and the aborted epochs (a decoder of a stored form that carries
    /// them); at most [`MAX_ABORTED`] epochs are kept, the highest.
    pub fn set_handover(&mut self, handover: Handover, aborted: std::collections::BTreeSet<u64>) {
        self.handover = handover;
        self.aborted = aborted;
        while self.aborted.len() > MAX_ABORTED {
            self.aborted.pop_first();
        }
    }

    /// The lowest epoch a new handover can use: above the LU's epoch and every aborted one.
    /// Saturates at `u64::MAX`, which no step accepts.
    pub fn next_epoch(&self) -> u64 {
        let aborted = self.aborted.last().copied().unwrap_or(0);
        self.epoch.max(aborted).saturating_add(1)
    }

    /// Take one ownership step (semantics.md §3.2–§3.5; the module documentation): pure and
    /// deterministic, so every replica of a replicated LU that applies `op` to the same state
    /// gets the same state and effects. On error the state is unchanged. `op`'s host names
    /// must be normalized ([`OwnershipOp::normalized`]).
    pub fn ownership(
        &mut self,
        op: &OwnershipOp,
        checks: Checks,
    ) -> Result<OwnershipFx, OwnershipError> {
        let unchanged = OwnershipFx::default();
        match op {
            OwnershipOp::SetOwner { host, epoch } => {
                if self.handover != Handover::Idle {
                    return Err(OwnershipError::HandoverInProgress(self.handover.clone()));
                }
                if self.decide(*epoch, Some(host))? == Decision::Retry {
                    return Ok(unchanged);
                }
                let foreign = self.foreign_hosts(host);
                if !foreign.is_empty() {
                    return Err(OwnershipError::ForeignRegistrations(foreign));
                }
                if checks.spc2_reserved {
                    return Err(OwnershipError::Spc2Reserved);
                }
                let removed = self.install_owner(host, *epoch);
                self.forget_aborted();
                Ok(OwnershipFx {
                    changed: true,
                    removed,
                    abort: Some(TaskPick::AllBut(host.clone())),
                    drain: None,
                })
            }
            OwnershipOp::ClearOwner { host, epoch } => {
                if self.handover != Handover::Idle {
                    return Err(OwnershipError::HandoverInProgress(self.handover.clone()));
                }
                if self.owner().is_some_and(|o| o != host) {
                    return Err(self.not_owner(host));
                }
                match self.decide(*epoch, None)? {
                    Decision::Retry => return Ok(unchanged),
                    Decision::Apply if self.owner().is_none() => return Err(self.not_owner(host)),
                    Decision::Apply => {}
                }
                let removed = self.drop_owner(*epoch);
                self.forget_aborted();
                Ok(OwnershipFx {
                    changed: true,
                    removed,
                    ..OwnershipFx::default()
                })
            }
            OwnershipOp::Prepare { from, to, epoch } => {
                if self.aborted.contains(epoch) {
                    return Err(OwnershipError::Aborted(*epoch));
                }
                if from == to {
                    return Err(OwnershipError::SameHost);
                }
                if let Some(parts) = self.handover.parts() {
                    return if parts == (from.as_str(), to.as_str(), *epoch) {
                        Ok(unchanged)
                    } else {
                        Err(OwnershipError::HandoverInProgress(self.handover.clone()))
                    };
                }
                if self.decide(*epoch, Some(to))? == Decision::Retry {
                    return Err(OwnershipError::AlreadyCommitted(*epoch));
                }
                if self.owner() != Some(from.as_str()) {
                    return Err(self.not_owner(from));
                }
                if checks.logged_in == Some(false) {
                    return Err(OwnershipError::DestinationNotLoggedIn(to.clone()));
                }
                self.handover = Handover::Prepared {
                    from: from.clone(),
                    to: to.clone(),
                    epoch: *epoch,
                };
                Ok(OwnershipFx {
                    changed: true,
                    ..OwnershipFx::default()
                })
            }
            OwnershipOp::Fence { from, epoch } => {
                if self.aborted.contains(epoch) {
                    return Err(OwnershipError::Aborted(*epoch));
                }
                let changed = match self.handover.clone() {
                    Handover::Prepared {
                        from: f,
                        to,
                        epoch: e,
                    } if f == *from && e == *epoch => {
                        self.handover = Handover::Fenced {
                            from: f,
                            to,
                            epoch: e,
                        };
                        true
                    }
                    Handover::Fenced {
                        from: f, epoch: e, ..
                    } if f == *from && e == *epoch => false,
                    Handover::Idle if *epoch <= self.epoch => {
                        return Err(OwnershipError::StaleEpoch {
                            epoch: *epoch,
                            current: self.epoch,
                        })
                    }
                    _ => return Err(OwnershipError::NotPrepared(from.clone())),
                };
                Ok(OwnershipFx {
                    changed,
                    drain: Some(from.clone()),
                    ..OwnershipFx::default()
                })
            }
            OwnershipOp::Commit { from, to, epoch } | OwnershipOp::Switch { from, to, epoch } => {
                if self.aborted.contains(epoch) {
                    return Err(OwnershipError::Aborted(*epoch));
                }
                let fenced = matches!(&self.handover,
                    Handover::Fenced { from: f, to: t, epoch: e } if f == from && t == to && e == epoch);
                let prepared = matches!(&self.handover,
                    Handover::Prepared { from: f, to: t, epoch: e } if f == from && t == to && e == epoch);
                let switch = matches!(op, OwnershipOp::Switch { .. });
                if !(fenced || switch && prepared) {
                    if self.decide(*epoch, Some(to))? == Decision::Retry {
                        // A retried switch aborts `from`'s tasks again: recorded once more, its
                        // GOOD waits until every gateway has drained them (and, in revision
                        // order, the first switch's), even one that joined since from a
                        // snapshot and never saw the first.
                        return Ok(if switch && self.owner() != Some(from.as_str()) {
                            OwnershipFx {
                                abort: Some(TaskPick::Host(from.clone())),
                                ..unchanged
                            }
                        } else {
                            unchanged
                        });
                    }
                    return Err(match self.handover.parts() {
                        Some((f, t, e)) if (f, t, e) != (from.as_str(), to.as_str(), *epoch) => {
                            OwnershipError::HandoverInProgress(self.handover.clone())
                        }
                        _ if switch => OwnershipError::NotPrepared(from.clone()),
                        _ => OwnershipError::NotFenced(from.clone()),
                    });
                }
                if self.owner() != Some(from.as_str()) {
                    // Only a restore or a forced set_owner can get here; refuse rather than guess.
                    return Err(self.not_owner(from));
                }
                let removed = self.install_owner(to, *epoch);
                self.handover = Handover::Idle;
                self.forget_aborted();
                Ok(OwnershipFx {
                    changed: true,
                    removed,
                    abort: Some(TaskPick::Host(from.clone())),
                    drain: None,
                })
            }
            OwnershipOp::Abort { from, to, epoch } => {
                if self.aborted.contains(epoch) {
                    return Ok(unchanged);
                }
                let before = self.handover.clone();
                self.unfence(from, to, *epoch)?;
                let remembered = self.remember_aborted(*epoch);
                let changed = remembered || before != self.handover;
                Ok(OwnershipFx {
                    changed,
                    ..OwnershipFx::default()
                })
            }
            OwnershipOp::Failover { from, to, epoch } => self.failover(from, to, *epoch, checks),
            OwnershipOp::Unfence { from, to, epoch } => {
                let before = self.handover.clone();
                self.unfence(from, to, *epoch)?;
                Ok(OwnershipFx {
                    changed: before != self.handover,
                    ..OwnershipFx::default()
                })
            }
        }
    }

    /// [`OwnershipOp::Failover`]. Refused for the same host, an aborted or stale epoch, a
    /// handover in progress that is not away from `from`, an owner other than `from` and
    /// `to`, registrations of other hosts, an SPC-2 reservation, and a `from` with a session
    /// (`checks.logged_in`). A retry of the same decision changes nothing. On an owned LU
    /// only `from`'s tasks are aborted; on an unowned one, every task of another host than
    /// `to` (anyone could write there), as [`OwnershipOp::SetOwner`] does.
    fn failover(
        &mut self,
        from: &str,
        to: &str,
        epoch: u64,
        checks: Checks,
    ) -> Result<OwnershipFx, OwnershipError> {
        if from == to {
            return Err(OwnershipError::SameHost);
        }
        if self.aborted.contains(&epoch) {
            return Err(OwnershipError::Aborted(epoch));
        }
        if self.decide(epoch, Some(to))? == Decision::Retry {
            return Ok(OwnershipFx::default());
        }
        if let Some((f, _, _)) = self.handover.parts() {
            if f != from {
                return Err(OwnershipError::HandoverInProgress(self.handover.clone()));
            }
        }
        if let Some(o) = self.owner() {
            if o != from && o != to {
                return Err(self.not_owner(from));
            }
        }
        let foreign: Vec<String> = self
            .foreign_hosts(to)
            .into_iter()
            .filter(|h| h != from)
            .collect();
        if !foreign.is_empty() {
            return Err(OwnershipError::ForeignRegistrations(foreign));
        }
        if checks.spc2_reserved {
            return Err(OwnershipError::Spc2Reserved);
        }
        if checks.logged_in == Some(true) {
            return Err(OwnershipError::SourceLoggedIn(from.to_string()));
        }
        let abort = if self.owner().is_some() {
            TaskPick::Host(from.to_string())
        } else {
            TaskPick::AllBut(to.to_string())
        };
        self.handover = Handover::Idle;
        let removed = self.install_owner(to, epoch);
        self.forget_aborted();
        Ok(OwnershipFx {
            changed: true,
            removed,
            abort: Some(abort),
            drain: None,
        })
    }

    /// Handover step 4 without remembering the epoch (a commit that gave up on its drain
    /// deadline): the fence goes and `from` stays the only writer. Without a handover in
    /// progress it succeeds while `from` owns the LU, and is refused once `to` owns it at
    /// `epoch`.
    pub(crate) fn unfence(
        &mut self,
        from: &str,
        to: &str,
        epoch: u64,
    ) -> Result<(), OwnershipError> {
        match self.handover.parts() {
            Some(parts) if parts == (from, to, epoch) => {
                self.handover = Handover::Idle;
                Ok(())
            }
            Some(_) => Err(OwnershipError::HandoverInProgress(self.handover.clone())),
            None if self.owner() == Some(to) && self.epoch == epoch => {
                Err(OwnershipError::AlreadyCommitted(epoch))
            }
            None if self.owner() == Some(from) => Ok(()),
            None => Err(self.not_owner(from)),
        }
    }

    /// Remember that `epoch` was aborted (epochs at or below the LU's are stale anyway);
    /// whether the state changed.
    fn remember_aborted(&mut self, epoch: u64) -> bool {
        if epoch <= self.epoch {
            return false;
        }
        self.aborted.insert(epoch);
        while self.aborted.len() > MAX_ABORTED {
            self.aborted.pop_first();
        }
        true
    }

    /// Drop the aborted epochs a new decision made stale.
    fn forget_aborted(&mut self) {
        let epoch = self.epoch;
        self.aborted.retain(|e| *e > epoch);
    }

    fn not_owner(&self, host: &str) -> OwnershipError {
        OwnershipError::NotOwner {
            host: host.to_string(),
            owner: self.owner().map(str::to_string),
        }
    }
}

/// Identifies the tasks of a fenced host that were in the task set when the fence went up
/// (see [`crate::lu::LogicalUnit::drained`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DrainTicket {
    pub(crate) tasks: Vec<u64>,
}

/// How an epoch compares with the LU's last ownership decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    /// A new decision: carry it out.
    Apply,
    /// The last decision again: succeed without change.
    Retry,
}

impl PrState {
    /// The host owning the LU (lower-cased initiator name), if the target manages its PR.
    pub fn owner(&self) -> Option<&str> {
        self.owner.as_deref()
    }

    /// Epoch of the last ownership decision (0: never owned).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Whether any ownership state must survive a restart.
    pub(crate) fn has_ownership(&self) -> bool {
        self.owner.is_some() || self.epoch != 0
    }

    /// Classify `epoch` for a decision whose outcome is `owner` (see the module docs).
    pub(crate) fn decide(
        &self,
        epoch: u64,
        owner: Option<&str>,
    ) -> Result<Decision, OwnershipError> {
        if epoch > self.epoch {
            Ok(Decision::Apply)
        } else if epoch == self.epoch && self.owner.as_deref() == owner && epoch != 0 {
            Ok(Decision::Retry)
        } else {
            Err(OwnershipError::StaleEpoch {
                epoch,
                current: self.epoch,
            })
        }
    }

    /// Initiator names with registrations other than `host` and the current owner, sorted.
    pub(crate) fn foreign_hosts(&self, host: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .regs
            .iter()
            .filter(|r| r.name != host && Some(r.name.as_str()) != self.owner.as_deref())
            .map(|r| r.name.clone())
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// Make `host` the owner at `epoch` in one transition: every registration goes (the
    /// caller has checked that only `host`'s and the previous owner's exist), `host`'s
    /// host-wide registration with [`owner_key`] holds WERO, PRgeneration + 1. Returns the
    /// removed registrations of other hosts (the previous owner's), for their unit attentions.
    pub(crate) fn install_owner(&mut self, host: &str, epoch: u64) -> Vec<Registration> {
        let removed: Vec<Registration> = self.regs.drain(..).filter(|r| r.name != host).collect();
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        self.regs.push(Registration {
            id,
            name: host.to_string(),
            isid: None,
            rtpi: None,
            key: owner_key(host),
        });
        self.res = Some(Reservation {
            holder: id,
            ty: ReservationType::WriteExclusiveRegistrantsOnly,
        });
        self.owner = Some(host.to_string());
        self.epoch = epoch;
        self.bump();
        removed
    }

    /// End target-managed ownership at `epoch`: the owner's registrations and its reservation
    /// go, PRgeneration + 1. Returns the removed registrations.
    pub(crate) fn drop_owner(&mut self, epoch: u64) -> Vec<Registration> {
        let owner = self.owner.take();
        let (removed, kept): (Vec<Registration>, Vec<Registration>) = self
            .regs
            .drain(..)
            .partition(|r| Some(r.name.as_str()) == owner.as_deref());
        self.regs = kept;
        if let Some(res) = self.res {
            if !self.regs.iter().any(|r| r.id == res.holder) || res.ty.all_registrants() {
                self.res = None;
            }
        }
        self.epoch = epoch;
        self.bump();
        removed
    }

    /// What survives a restart when APTPL is off: owner, epoch, the owner's registrations
    /// and the reservation if the owner holds it (SPC-4 §5.13.5.1 drops the rest).
    pub(crate) fn owned_image(&self) -> PrState {
        let regs: Vec<Registration> = self
            .regs
            .iter()
            .filter(|r| Some(r.name.as_str()) == self.owner.as_deref())
            .cloned()
            .collect();
        let res = self
            .res
            .filter(|res| !res.ty.all_registrants() && regs.iter().any(|r| r.id == res.holder));
        PrState {
            regs,
            res,
            generation: self.generation,
            aptpl: false,
            next_id: self.next_id,
            owner: self.owner.clone(),
            epoch: self.epoch,
            ..PrState::default()
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn owner_key_is_stable_tagged_and_case_insensitive() {
        let k = owner_key("iqn.2026-01.test:host-a");
        assert_eq!(k, owner_key("IQN.2026-01.TEST:HOST-A"));
        assert_eq!(k & 0xFFFF_FFFF, 0x494C_4F57);
        assert_eq!(
            k >> 32,
            u64::from(crc32c::crc32c(b"iqn.2026-01.test:host-a"))
        );
        assert_ne!(k, owner_key("iqn.2026-01.test:host-b"));
        assert_ne!(owner_key(""), 0);
    }

    #[test]
    fn accepts_and_rejects_host_names() {
        assert_eq!(host_name("IQN.x:A").unwrap(), "iqn.x:a");
        for bad in ["", "iqn.x:a,i,0x1", "iqn x", "iqn.\u{e9}"] {
            assert!(
                matches!(host_name(bad), Err(OwnershipError::InvalidHost(_))),
                "{bad:?}"
            );
        }
        assert!(host_name(&"a".repeat(MAX_NAME_LEN)).is_ok());
        assert!(host_name(&"a".repeat(MAX_NAME_LEN + 1)).is_err());
    }

    #[test]
    fn epoch_decisions() {
        let mut s = PrState::new();
        assert_eq!(
            s.decide(0, Some("h")),
            Err(OwnershipError::StaleEpoch {
                epoch: 0,
                current: 0
            })
        );
        assert_eq!(s.decide(1, Some("h")), Ok(Decision::Apply));
        s.install_owner("h", 5);
        assert_eq!(s.decide(5, Some("h")), Ok(Decision::Retry));
        assert!(s.decide(5, Some("g")).is_err());
        assert!(s.decide(4, Some("h")).is_err());
        assert_eq!(s.decide(6, Some("g")), Ok(Decision::Apply));
    }

    #[test]
    fn install_replaces_registrations_and_holds_wero() {
        let mut s = PrState::new();
        s.add("h", Some([1; 6]), Some(1), 7).unwrap();
        s.install_owner("h", 1);
        let removed = s.install_owner("g", 2);
        assert_eq!(removed.len(), 1);
        assert_eq!(removed[0].name, "h");
        assert_eq!(s.regs.len(), 1);
        let r = &s.regs[0];
        assert_eq!((r.name.as_str(), r.isid, r.rtpi), ("g", None, None));
        assert_eq!(r.key, owner_key("g"));
        let res = s.res.unwrap();
        assert_eq!(res.holder, r.id);
        assert_eq!(res.ty, ReservationType::WriteExclusiveRegistrantsOnly);
        assert_eq!((s.owner(), s.epoch(), s.generation), (Some("g"), 2, 2));
    }

    #[test]
    fn drop_owner_and_owned_image() {
        let mut s = PrState::new();
        s.install_owner("h", 3);
        s.aptpl = true;
        let image = s.owned_image();
        assert!(!image.aptpl);
        assert_eq!(image.regs, s.regs);
        assert_eq!(image.res, s.res);
        let removed = s.drop_owner(4);
        assert_eq!(removed.len(), 1);
        assert!(s.regs.is_empty() && s.res.is_none() && s.owner.is_none());
        assert_eq!(s.epoch, 4);
        assert!(s.has_ownership());
        assert!(!PrState::new().has_ownership());
    }
}
