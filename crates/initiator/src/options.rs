//! What we ask for at login, and what was agreed (RFC 7143 §6, §13).

use ironlun_iscsi::chap::{ChapAlgorithm, Secret};
use std::time::Duration;

/// CHAP credentials for login (RFC 7143 §12.1.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChapCredentials {
    /// Our CHAP_N.
    pub user: String,
    pub secret: Secret,
    /// CHAP_A offer, in order of preference (the target picks the first it supports).
    pub algorithms: Vec<ChapAlgorithm>,
    /// Mutual CHAP: the name and secret the target must answer our challenge with.
    pub mutual: Option<(String, Secret)>,
}

impl ChapCredentials {
    /// One-way CHAP offering only `algorithm`.
    pub fn new(user: impl Into<String>, secret: &str, algorithm: ChapAlgorithm) -> Self {
        ChapCredentials {
            user: user.into(),
            secret: Secret::new(secret),
            algorithms: vec![algorithm],
            mutual: None,
        }
    }

    /// The same, also asking the target to prove it knows `secret` as `user`.
    pub fn with_mutual(mut self, user: impl Into<String>, secret: &str) -> Self {
        self.mutual = Some((user.into(), Secret::new(secret)));
        self
    }
}

/// Login wishes. `target_name: None` makes a discovery session (SessionType=Discovery, §13.21).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginOptions {
    /// InitiatorName (§13.5), required by every target.
    pub initiator_name: String,
    /// ISID (§11.12.5): with the initiator name it names the session.
    pub isid: [u8; 6],
    /// TargetName (§13.4); `None` = discovery session.
    pub target_name: Option<String>,
    /// HeaderDigest: ask for CRC32C (§13.1). We offer "CRC32C,None" when true, "None" otherwise.
    pub header_digest: bool,
    /// DataDigest: ask for CRC32C (§13.1).
    pub data_digest: bool,
    /// Our receive limit, declared to the target (§13.12): its Data-In segments stay below it.
    pub max_recv_data_segment_length: u32,
    /// ImmediateData wish (§13.11).
    pub immediate_data: bool,
    /// InitialR2T wish (§13.10).
    pub initial_r2t: bool,
    /// FirstBurstLength wish (§13.14).
    pub first_burst_length: u32,
    /// MaxBurstLength wish (§13.13).
    pub max_burst_length: u32,
    /// Extra keys sent in the operational stage, after ours (a key given here replaces ours).
    pub extra_keys: Vec<(String, String)>,
    /// Upper bound on each login round trip and on the TCP connect.
    pub timeout: Duration,
    /// Authenticate with CHAP (AuthMethod=CHAP); `None` offers AuthMethod=None.
    pub chap: Option<ChapCredentials>,
}

impl LoginOptions {
    /// Defaults for a normal session to `target_name`.
    pub fn new(initiator_name: impl Into<String>, target_name: Option<String>) -> Self {
        LoginOptions {
            initiator_name: initiator_name.into(),
            target_name,
            ..LoginOptions::default()
        }
    }
}

impl Default for LoginOptions {
    fn default() -> Self {
        LoginOptions {
            initiator_name: "iqn.2026-11.io.ironlun:initiator".to_owned(),
            // Type 10b (random, §10.12.5 of RFC 3720 / §11.12.5), qualifier 1.
            isid: [0x80, 0x49, 0x4c, 0x4e, 0x00, 0x01],
            target_name: None,
            header_digest: false,
            data_digest: false,
            max_recv_data_segment_length: 256 * 1024,
            immediate_data: true,
            initial_r2t: false,
            first_burst_length: 256 * 1024,
            max_burst_length: 16 * 1024 * 1024,
            extra_keys: Vec::new(),
            timeout: Duration::from_secs(10),
            chap: None,
        }
    }
}

/// What login agreed, and the sequence numbers to go on with in full feature phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub header_digest: bool,
    pub data_digest: bool,
    /// The target's declared MaxRecvDataSegmentLength: our Data-Out/immediate segments stay ≤ it.
    pub target_max_recv_data_segment_length: u32,
    /// What we declared (the target's Data-In segments stay ≤ it).
    pub our_max_recv_data_segment_length: u32,
    pub immediate_data: bool,
    pub initial_r2t: bool,
    pub first_burst_length: u32,
    pub max_burst_length: u32,
    pub max_outstanding_r2t: u32,
    /// Every key the target sent during login, in order (declaratives like TargetPortalGroupTag too).
    pub target_keys: Vec<(String, String)>,
    /// TSIH the target gave the session (§11.13.4).
    pub tsih: u16,
    /// CmdSN of our next non-immediate command (the target's ExpCmdSN at login end).
    pub cmd_sn: u32,
    /// MaxCmdSN the target granted last.
    pub max_cmd_sn: u32,
    /// ExpStatSN for our next PDU (last StatSN + 1).
    pub exp_stat_sn: u32,
    /// Next free initiator task tag (login used the ones below it).
    pub next_itt: u32,
}

impl Negotiated {
    /// Value of a key the target sent during login, if any (last one wins).
    pub fn target_key(&self, key: &str) -> Option<&str> {
        self.target_keys
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}
