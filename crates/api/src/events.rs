//! The event log: `GET /v1/events?since=SEQ`, a bounded ring of PR OUT, ownership and
//! handover events.

use serde::{Deserialize, Serialize};

/// `GET /v1/events`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventsJson {
    pub events: Vec<Event>,
}

/// One PR OUT, ownership or handover event (`GET /v1/events`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Increases by one per event, from 1, across all LUs.
    pub seq: u64,
    pub time_unix_ms: u64,
    /// `TARGET/LUN`.
    pub lun: String,
    /// `pr_out`, `ownership`, `release`, `failover`, `handover_prepare`, `handover_commit`
    /// or `handover_abort`.
    pub kind: String,
    pub detail: serde_json::Value,
}
