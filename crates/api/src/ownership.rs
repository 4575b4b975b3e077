//! Target-managed ownership and the handover of an LU's write access between hosts
//! (semantics.md §3): `GET /v1/luns/<t>/<l>/ownership`, `POST …/owner`, `POST …/release`,
//! `POST …/handover/{prepare,commit,abort}`; failover away from a failed host (issue 19):
//! `POST …/failover`, `POST /v1/failover`.

use serde::{Deserialize, Serialize};

/// A handover in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoverJson {
    /// `"prepared"` or `"fenced"`.
    pub state: String,
    pub from: String,
    pub to: String,
    pub epoch: u64,
}

/// `GET /v1/luns/<t>/<l>/ownership`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnershipJson {
    pub owner: Option<String>,
    pub epoch: u64,
    pub generation: u32,
    pub handover: Option<HandoverJson>,
    /// The epoch the next handover should use: one above `epoch` and above every epoch
    /// aborted on this LU (prepare and commit refuse those for good).
    #[serde(default)]
    pub next_epoch: u64,
}

/// `POST …/owner` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerRequest {
    pub host: String,
    pub epoch: u64,
}

/// `POST …/owner` and `…/handover/abort` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerJson {
    pub owner: Option<String>,
    pub epoch: u64,
    pub generation: u32,
}

/// `POST …/handover/{prepare,commit,abort}` body; `deadline_ms` for commit (and an armed
/// prepare), `on_deadline` for commit, `commit_on_write` for prepare.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoverRequest {
    pub from: String,
    pub to: String,
    pub epoch: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
    /// `"abort"` (the default) or `"refuse"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_deadline: Option<OnDeadline>,
    /// Prepare only (one node): commit the handover when the destination first writes, with
    /// `deadline_ms` as the drain deadline and the source's late tasks aborted.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub commit_on_write: bool,
}

/// Drain deadline of a commit without `deadline_ms`.
pub const DEFAULT_DEADLINE_MS: u64 = 5000;

/// Largest `deadline_ms` accepted (400 beyond).
pub const MAX_DEADLINE_MS: u64 = 600_000;

/// `POST …/handover/prepare` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrepareJson {
    pub epoch: u64,
    pub generation: u32,
}

/// `POST …/handover/commit` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitJson {
    pub epoch: u64,
    pub generation: u32,
    pub owner: Option<String>,
    pub steps_us: CommitSteps,
    pub aborted_tasks: u64,
    pub idempotent: bool,
}

/// What a handover commit does when the source's tasks have not finished by the deadline.
/// On the wire and on the command line: `"abort"` or `"refuse"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnDeadline {
    /// Abort them (TASK ABORTED, as PREEMPT AND ABORT, SPC-4 §5.13.11.2.6) and commit.
    #[default]
    Abort,
    /// Lift the fence and refuse the commit; the source stays the only writer.
    Refuse,
}

impl OnDeadline {
    /// The wire name.
    pub fn name(self) -> &'static str {
        match self {
            OnDeadline::Abort => "abort",
            OnDeadline::Refuse => "refuse",
        }
    }
}

impl std::str::FromStr for OnDeadline {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "abort" => Ok(OnDeadline::Abort),
            "refuse" => Ok(OnDeadline::Refuse),
            other => Err(format!(
                "on_deadline {other:?}: expected \"abort\" or \"refuse\""
            )),
        }
    }
}

impl std::fmt::Display for OnDeadline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Durations of a handover commit's steps, in µs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitSteps {
    /// Raising the fence (under the LU lock).
    pub fence: u64,
    /// Waiting for the source's in-flight tasks (and aborting them after the deadline).
    pub drain: u64,
    /// Flushing the backstore, data and metadata.
    pub flush: u64,
    /// The PR transition and its durable state-file write.
    pub transfer: u64,
    pub total: u64,
}

/// How long a commit waits for tasks it aborted to finish their backend I/O (an I/O cannot be
/// recalled once submitted); past it the commit fails with the fence still up.
pub const ABORT_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// `POST …/release` body: end `host`'s target-managed ownership; `epoch` defaults to the
/// LU's next one (pass it to make a retry idempotent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseRequest {
    pub host: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
}

/// `POST /v1/luns/<t>/<l>/failover` body: `from` failed, `to` takes the LU. `epoch` defaults
/// to the LU's next one (pass it to make a retry idempotent); without `force` the failover
/// is refused while `from` still has a session on the LU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverRequest {
    pub from: String,
    pub to: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    #[serde(default)]
    pub force: bool,
}

/// `POST /v1/failover` body: fail over every LU `all_of` owns to `to`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverAllRequest {
    pub all_of: String,
    pub to: String,
    #[serde(default)]
    pub force: bool,
}

/// One LU's failover: the state afterwards, whether tasks of the failed host were aborted
/// (and drained before the answer), and how long it took.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverJson {
    pub target: String,
    pub lun: u64,
    pub owner: Option<String>,
    pub epoch: u64,
    pub generation: u32,
    /// Tasks were aborted and drained (TASK ABORTED to their nexuses).
    pub aborted: bool,
    /// A retry of the same decision: nothing changed.
    pub idempotent: bool,
    pub took_us: u64,
}

/// One LU a `POST /v1/failover` could not move.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverRefusedJson {
    pub target: String,
    pub lun: u64,
    pub code: String,
    pub error: String,
}

/// `POST /v1/failover` answer (200 when every LU moved, 409 otherwise, with both lists).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverAllJson {
    pub luns: Vec<FailoverJson>,
    #[serde(default)]
    pub refused: Vec<FailoverRefusedJson>,
}
