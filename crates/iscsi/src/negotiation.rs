//! Operational parameter negotiation (RFC 7143 §6.2, §13): each key with its result function.
//!
//! The target declares its offers in [`Offers`]; after login the agreed values are in
//! [`SessionParams`] (and per-direction MaxRecvDataSegmentLength in [`ConnectionParams`]).

/// What the target offers or accepts (the config's `[negotiation]` table). Defaults do not
/// throttle throughput: large bursts, ImmediateData=Yes, InitialR2T=No, MaxOutstandingR2T > 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offers {
    pub header_digest: Vec<DigestKind>,
    pub data_digest: Vec<DigestKind>,
    pub max_connections: u16,
    pub initial_r2t: bool,
    pub immediate_data: bool,
    /// Our receive limit, declared to the initiator (§13.12).
    pub max_recv_data_segment_length: u32,
    pub max_burst_length: u32,
    pub first_burst_length: u32,
    pub default_time2wait: u16,
    pub default_time2retain: u16,
    pub max_outstanding_r2t: u16,
    pub data_pdu_in_order: bool,
    pub data_sequence_in_order: bool,
    pub error_recovery_level: u8,
}

/// Digest choice for HeaderDigest / DataDigest (§13.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DigestKind {
    None,
    Crc32c,
}

impl Default for Offers {
    fn default() -> Self {
        Offers {
            header_digest: vec![DigestKind::None, DigestKind::Crc32c],
            data_digest: vec![DigestKind::None, DigestKind::Crc32c],
            max_connections: 1,
            initial_r2t: false,
            immediate_data: true,
            max_recv_data_segment_length: 256 * 1024,
            max_burst_length: 16_776_192, // 2^24 - 1024: the largest multiple of 1 KiB under the §13.13 limit
            first_burst_length: 256 * 1024,
            default_time2wait: 2,
            default_time2retain: 20,
            max_outstanding_r2t: 16,
            data_pdu_in_order: true,
            data_sequence_in_order: true,
            error_recovery_level: 0,
        }
    }
}

/// Session-wide values agreed at login (RFC 7143 defaults until negotiated).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionParams {
    pub max_connections: u16,
    pub initial_r2t: bool,
    pub immediate_data: bool,
    pub max_burst_length: u32,
    pub first_burst_length: u32,
    pub default_time2wait: u16,
    pub default_time2retain: u16,
    pub max_outstanding_r2t: u16,
    pub data_pdu_in_order: bool,
    pub data_sequence_in_order: bool,
    pub error_recovery_level: u8,
}

impl Default for SessionParams {
    /// RFC 7143 §13 defaults.
    fn default() -> Self {
        SessionParams {
            max_connections: 1,
            initial_r2t: true,
            immediate_data: true,
            max_burst_length: 262_144,
            first_burst_length: 65_536,
            default_time2wait: 2,
            default_time2retain: 20,
            max_outstanding_r2t: 1,
            data_pdu_in_order: true,
            data_sequence_in_order: true,
            error_recovery_level: 0,
        }
    }
}

/// Connection-only values agreed at login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionParams {
    pub header_digest: DigestKind,
    pub data_digest: DigestKind,
    /// What the initiator declared: our Data-In / text segments must not exceed it.
    pub max_xmit_data_segment_length: u32,
    /// What we declared: the largest data segment we accept.
    pub max_recv_data_segment_length: u32,
}

impl Default for ConnectionParams {
    fn default() -> Self {
        ConnectionParams {
            header_digest: DigestKind::None,
            data_digest: DigestKind::None,
            max_xmit_data_segment_length: 8192,
            max_recv_data_segment_length: 8192,
        }
    }
}

/// Numeric range of the 24-bit length keys (RFC 7143 §13.12–§13.14: 512 to 2^24-1).
const LEN_RANGE: (u32, u32) = (512, 16_777_215);
/// DefaultTime2Wait / DefaultTime2Retain range (§13.15, §13.16).
const TIME_RANGE: (u32, u32) = (0, 3600);

/// The answer a key gets in a Login or Text Response.
pub const NOT_UNDERSTOOD: &str = "NotUnderstood";
/// Answer for a value outside the key's domain (§6.2.1).
pub const REJECT: &str = "Reject";
/// Answer for a key that does not apply to this session type (§6.2.1).
pub const IRRELEVANT: &str = "Irrelevant";

/// How a key's outcome is computed (RFC 7143 §6.2 and the "Result function" of each key in §13).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// List negotiation: the first value of the initiator's list that we accept.
    Digest,
    /// Boolean, result is OR of both sides.
    Or,
    /// Boolean, result is AND of both sides.
    And,
    /// Numerical in `[min, max]`, result is the smaller value.
    Min(u32, u32),
    /// Numerical in `[min, max]`, result is the larger value.
    Max(u32, u32),
    /// Declarative numerical in `[min, max]`: each side states its own value, no answer needed.
    Declare(u32, u32),
    /// Declarative string, no answer (InitiatorAlias).
    DeclareText,
    /// Keys the login phase interprets itself (names, SessionType, AuthMethod, …).
    Login,
    /// Keys only the target may send (TargetAlias, TargetAddress, TargetPortalGroupTag): an
    /// initiator sending them is answered `Reject`.
    TargetOnly,
    /// Obsolete marker keys (RFC 7143 §13.25 / RFC 3720 Appendix A): we always answer this value.
    Fixed(&'static str),
}

/// Every key RFC 7143 §13 defines (plus the obsolete marker keys and iSER's RDMAExtensions),
/// with its result rule and whether it is irrelevant in a discovery session.
pub const KEYS: &[(&str, Rule, bool)] = &[
    ("HeaderDigest", Rule::Digest, false),
    ("DataDigest", Rule::Digest, false),
    ("MaxConnections", Rule::Min(1, 65535), true),
    ("SendTargets", Rule::Login, false),
    ("TargetName", Rule::Login, false),
    ("InitiatorName", Rule::Login, false),
    ("TargetAlias", Rule::TargetOnly, false),
    ("InitiatorAlias", Rule::DeclareText, false),
    ("TargetAddress", Rule::TargetOnly, false),
    ("TargetPortalGroupTag", Rule::TargetOnly, false),
    ("InitialR2T", Rule::Or, true),
    ("ImmediateData", Rule::And, true),
    (
        "MaxRecvDataSegmentLength",
        Rule::Declare(LEN_RANGE.0, LEN_RANGE.1),
        false,
    ),
    ("MaxBurstLength", Rule::Min(LEN_RANGE.0, LEN_RANGE.1), true),
    (
        "FirstBurstLength",
        Rule::Min(LEN_RANGE.0, LEN_RANGE.1),
        true,
    ),
    (
        "DefaultTime2Wait",
        Rule::Max(TIME_RANGE.0, TIME_RANGE.1),
        false,
    ),
    (
        "DefaultTime2Retain",
        Rule::Min(TIME_RANGE.0, TIME_RANGE.1),
        false,
    ),
    ("MaxOutstandingR2T", Rule::Min(1, 65535), true),
    ("DataPDUInOrder", Rule::Or, true),
    ("DataSequenceInOrder", Rule::Or, true),
    ("ErrorRecoveryLevel", Rule::Min(0, 2), false),
    ("SessionType", Rule::Login, false),
    ("AuthMethod", Rule::Login, false),
    ("TaskReporting", Rule::Fixed("RFC3720"), false),
    ("iSCSIProtocolLevel", Rule::Min(0, 31), false),
    ("IFMarker", Rule::Fixed("No"), false),
    ("OFMarker", Rule::Fixed("No"), false),
    ("IFMarkInt", Rule::Fixed(IRRELEVANT), false),
    ("OFMarkInt", Rule::Fixed(IRRELEVANT), false),
    ("RDMAExtensions", Rule::Fixed("No"), false),
];

/// The rule of `key`, and whether it is irrelevant for discovery; `None` for unknown keys
/// (including every `X-` and `X#` extension key, which we do not implement).
pub fn rule_of(key: &str) -> Option<(Rule, bool)> {
    KEYS.iter()
        .find(|(k, _, _)| *k == key)
        .map(|(_, r, d)| (*r, *d))
}

/// Parse a numerical value (§6.1: decimal, or hexadecimal with `0x`), bounded to `u32`.
pub fn parse_number(value: &str) -> Option<u32> {
    if let Some(hex) = value
        .strip_prefix("0x")
        .or_else(|| value.strip_prefix("0X"))
    {
        if hex.is_empty() || hex.len() > 8 {
            return None;
        }
        return u32::from_str_radix(hex, 16).ok();
    }
    if value.is_empty() || value.len() > 10 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok()
}

/// Parse a boolean value (§6.1: `Yes` or `No`).
pub fn parse_bool(value: &str) -> Option<bool> {
    match value {
        "Yes" => Some(true),
        "No" => Some(false),
        _ => None,
    }
}

fn yes_no(b: bool) -> String {
    if b { "Yes" } else { "No" }.to_string()
}

impl DigestKind {
    /// The wire name (§13.1).
    pub fn name(self) -> &'static str {
        match self {
            DigestKind::None => "None",
            DigestKind::Crc32c => "CRC32C",
        }
    }

    fn parse(value: &str) -> Option<Self> {
        match value {
            "None" => Some(DigestKind::None),
            "CRC32C" => Some(DigestKind::Crc32c),
            _ => None,
        }
    }
}

/// Operational negotiation state of one login (RFC 7143 §6.2, §13).
///
/// Feed each received operational key to [`Negotiation::respond`]; it records the outcome and
/// returns the answer to send (if any). Keys the target starts itself come from
/// [`Negotiation::target_offers`]; the initiator's answers to them arrive through `respond` too
/// and are then taken as answers, not as new offers.
#[derive(Debug, Clone)]
pub struct Negotiation {
    offers: Offers,
    /// Values agreed so far (RFC defaults until negotiated).
    pub session: SessionParams,
    /// Per-connection values agreed so far.
    pub connection: ConnectionParams,
    /// Keys already negotiated (initiator offered and we answered, or answered our offer).
    done: Vec<&'static str>,
    /// Keys we offered that still await the initiator's answer.
    awaiting: Vec<&'static str>,
    /// We have declared our MaxRecvDataSegmentLength.
    declared_mrdsl: bool,
}

impl Negotiation {
    /// Start negotiating with `offers`; our receive limit is additionally bounded by
    /// `max_data_segment` (the [`crate::Limits`] the framer enforces).
    pub fn new(offers: Offers, max_data_segment: u32) -> Self {
        let ours = offers
            .max_recv_data_segment_length
            .clamp(LEN_RANGE.0, LEN_RANGE.1)
            .min(max_data_segment.max(LEN_RANGE.0));
        let connection = ConnectionParams {
            max_recv_data_segment_length: ours,
            ..Default::default()
        };
        Negotiation {
            offers,
            session: SessionParams::default(),
            connection,
            done: Vec::new(),
            awaiting: Vec::new(),
            declared_mrdsl: false,
        }
    }

    /// True while keys we offered have not been answered: the login must not leave the
    /// operational stage yet (§6.2).
    pub fn awaiting_answers(&self) -> bool {
        !self.awaiting.is_empty()
    }

    /// Answer one key the initiator sent. Returns the value to send back, or `None` when no
    /// answer is due (declaratives, or the initiator answering our own offer).
    pub fn respond(&mut self, key: &str, value: &str, discovery: bool) -> Option<String> {
        let Some((rule, irrelevant_in_discovery)) = rule_of(key) else {
            return Some(NOT_UNDERSTOOD.to_string());
        };
        let Some(name) = KEYS.iter().map(|(k, _, _)| *k).find(|k| *k == key) else {
            return Some(NOT_UNDERSTOOD.to_string());
        };
        let answering = if let Some(pos) = self.awaiting.iter().position(|k| *k == name) {
            self.awaiting.remove(pos);
            true
        } else {
            false
        };
        if discovery && irrelevant_in_discovery {
            return (!answering).then(|| IRRELEVANT.to_string());
        }
        if !answering && self.done.contains(&name) && !matches!(rule, Rule::Declare(..)) {
            // Renegotiating a key within one login is a protocol error (§6.2); refuse it.
            return Some(REJECT.to_string());
        }
        self.done.push(name);
        let reply = self.apply(name, rule, value);
        if answering {
            None
        } else {
            reply
        }
    }

    fn apply(&mut self, key: &'static str, rule: Rule, value: &str) -> Option<String> {
        match rule {
            Rule::Digest => {
                let ours = if key == "HeaderDigest" {
                    &self.offers.header_digest
                } else {
                    &self.offers.data_digest
                };
                let mut chosen = None;
                for v in value.split(',') {
                    if let Some(kind) = DigestKind::parse(v) {
                        if ours.contains(&kind) {
                            chosen = Some(kind);
                            break;
                        }
                    }
                }
                let Some(kind) = chosen else {
                    return Some(REJECT.to_string());
                };
                if key == "HeaderDigest" {
                    self.connection.header_digest = kind;
                } else {
                    self.connection.data_digest = kind;
                }
                Some(kind.name().to_string())
            }
            Rule::Or | Rule::And => {
                let Some(theirs) = parse_bool(value) else {
                    return Some(REJECT.to_string());
                };
                let (ours, slot) = match key {
                    "InitialR2T" => (self.offers.initial_r2t, &mut self.session.initial_r2t),
                    "ImmediateData" => {
                        (self.offers.immediate_data, &mut self.session.immediate_data)
                    }
                    "DataPDUInOrder" => (
                        self.offers.data_pdu_in_order,
                        &mut self.session.data_pdu_in_order,
                    ),
                    _ => (
                        self.offers.data_sequence_in_order,
                        &mut self.session.data_sequence_in_order,
                    ),
                };
                let result = if rule == Rule::Or {
                    ours || theirs
                } else {
                    ours && theirs
                };
                *slot = result;
                Some(yes_no(result))
            }
            Rule::Min(lo, hi) | Rule::Max(lo, hi) => {
                let Some(theirs) = parse_number(value).filter(|v| (lo..=hi).contains(v)) else {
                    return Some(REJECT.to_string());
                };
                let ours = self.our_number(key);
                let result = if matches!(rule, Rule::Min(..)) {
                    theirs.min(ours)
                } else {
                    theirs.max(ours)
                };
                self.store_number(key, result);
                Some(result.to_string())
            }
            Rule::Declare(lo, hi) => {
                let Some(theirs) = parse_number(value).filter(|v| (lo..=hi).contains(v)) else {
                    return Some(REJECT.to_string());
                };
                self.connection.max_xmit_data_segment_length = theirs;
                None
            }
            Rule::DeclareText | Rule::Login => None,
            Rule::TargetOnly => Some(REJECT.to_string()),
            Rule::Fixed(answer) => Some(answer.to_string()),
        }
    }

    /// Our side's value of a numerical key, within its range.
    fn our_number(&self, key: &str) -> u32 {
        let o = &self.offers;
        match key {
            "MaxConnections" => u32::from(o.max_connections.max(1)),
            "MaxBurstLength" => o.max_burst_length.clamp(LEN_RANGE.0, LEN_RANGE.1),
            // FirstBurstLength must not exceed MaxBurstLength (§13.14).
            "FirstBurstLength" => o
                .first_burst_length
                .min(o.max_burst_length)
                .min(self.session.max_burst_length.max(LEN_RANGE.0))
                .clamp(LEN_RANGE.0, LEN_RANGE.1),
            "DefaultTime2Wait" => u32::from(o.default_time2wait).min(TIME_RANGE.1),
            "DefaultTime2Retain" => u32::from(o.default_time2retain).min(TIME_RANGE.1),
            "MaxOutstandingR2T" => u32::from(o.max_outstanding_r2t.max(1)),
            "ErrorRecoveryLevel" => u32::from(o.error_recovery_level.min(2)),
            // We implement RFC 7143 (level 1, RFC 7144 §2).
            "iSCSIProtocolLevel" => 1,
            _ => 0,
        }
    }

    fn store_number(&mut self, key: &str, v: u32) {
        let s = &mut self.session;
        let to16 = |v: u32| u16::try_from(v).unwrap_or(u16::MAX);
        match key {
            "MaxConnections" => s.max_connections = to16(v),
            "MaxBurstLength" => {
                s.max_burst_length = v;
                s.first_burst_length = s.first_burst_length.min(v);
            }
            "FirstBurstLength" => s.first_burst_length = v.min(s.max_burst_length),
            "DefaultTime2Wait" => s.default_time2wait = to16(v),
            "DefaultTime2Retain" => s.default_time2retain = to16(v),
            "MaxOutstandingR2T" => s.max_outstanding_r2t = to16(v),
            "ErrorRecoveryLevel" => s.error_recovery_level = u8::try_from(v).unwrap_or(0),
            _ => {}
        }
    }

    /// Keys the target sends without being asked in the operational stage: our declared
    /// MaxRecvDataSegmentLength (once), and every negotiated key the initiator has not sent
    /// whose RFC default is more permissive than our offer (those await an answer).
    pub fn target_offers(&mut self, discovery: bool) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if !self.declared_mrdsl {
            self.declared_mrdsl = true;
            out.push((
                "MaxRecvDataSegmentLength".to_string(),
                self.connection.max_recv_data_segment_length.to_string(),
            ));
        }
        if discovery {
            return out;
        }
        let d = SessionParams::default();
        let o = &self.offers;
        let candidates: [(&'static str, bool, String); 6] = [
            ("InitialR2T", o.initial_r2t && !d.initial_r2t, yes_no(true)),
            (
                "ImmediateData",
                !o.immediate_data && d.immediate_data,
                yes_no(false),
            ),
            (
                "MaxBurstLength",
                o.max_burst_length < d.max_burst_length,
                self.our_number("MaxBurstLength").to_string(),
            ),
            (
                "FirstBurstLength",
                self.our_number("FirstBurstLength") < d.first_burst_length,
                self.our_number("FirstBurstLength").to_string(),
            ),
            (
                "DefaultTime2Wait",
                o.default_time2wait > d.default_time2wait,
                o.default_time2wait.to_string(),
            ),
            (
                "DefaultTime2Retain",
                o.default_time2retain < d.default_time2retain,
                o.default_time2retain.to_string(),
            ),
        ];
        for (key, needed, value) in candidates {
            if needed && !self.done.contains(&key) && !self.awaiting.contains(&key) {
                self.awaiting.push(key);
                self.apply_offer(key, &value);
                out.push((key.to_string(), value));
            }
        }
        out
    }

    /// Record the outcome of a key we offered: the result function applied to the RFC default
    /// (what the initiator holds) and our value equals our value for these keys.
    fn apply_offer(&mut self, key: &'static str, value: &str) {
        if let Some((rule, _)) = rule_of(key) {
            let _ = self.apply(key, rule, value);
        }
    }

    /// Enforce cross-key constraints once the login completes (FirstBurstLength ≤ MaxBurstLength).
    pub fn finish(&mut self) {
        if !self.declared_mrdsl {
            // Never declared (login skipped the operational stage): the default applies (§13.12).
            self.connection.max_recv_data_segment_length =
                ConnectionParams::default().max_recv_data_segment_length;
        }
        self.session.first_burst_length = self
            .session
            .first_burst_length
            .min(self.session.max_burst_length);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    /// (key, their value, expected answer) against the default [`Offers`] in a normal session.
    const TABLE: &[(&str, &str, Option<&str>)] = &[
        ("HeaderDigest", "CRC32C,None", Some("CRC32C")),
        ("HeaderDigest", "None", Some("None")),
        ("DataDigest", "MD5,CRC32C", Some("CRC32C")),
        ("DataDigest", "MD5", Some(REJECT)),
        ("MaxConnections", "4", Some("1")),
        ("MaxConnections", "0", Some(REJECT)),
        ("InitialR2T", "No", Some("No")),
        ("InitialR2T", "Yes", Some("Yes")),
        ("InitialR2T", "Maybe", Some(REJECT)),
        ("ImmediateData", "Yes", Some("Yes")),
        ("ImmediateData", "No", Some("No")),
        ("MaxRecvDataSegmentLength", "65536", None),
        ("MaxRecvDataSegmentLength", "511", Some(REJECT)),
        ("MaxRecvDataSegmentLength", "16777216", Some(REJECT)),
        ("MaxBurstLength", "262144", Some("262144")),
        ("MaxBurstLength", "0x1000000", Some(REJECT)),
        ("MaxBurstLength", "0x400", Some("1024")),
        ("FirstBurstLength", "1048576", Some("262144")),
        ("FirstBurstLength", "65536", Some("65536")),
        ("DefaultTime2Wait", "0", Some("2")),
        ("DefaultTime2Wait", "3601", Some(REJECT)),
        ("DefaultTime2Retain", "0", Some("0")),
        ("DefaultTime2Retain", "3600", Some("20")),
        ("MaxOutstandingR2T", "1", Some("1")),
        ("MaxOutstandingR2T", "100", Some("16")),
        ("DataPDUInOrder", "No", Some("Yes")),
        ("DataSequenceInOrder", "No", Some("Yes")),
        ("ErrorRecoveryLevel", "2", Some("0")),
        ("ErrorRecoveryLevel", "3", Some(REJECT)),
        ("IFMarker", "Yes", Some("No")),
        ("OFMarker", "No", Some("No")),
        ("IFMarkInt", "2048~8192", Some(IRRELEVANT)),
        ("OFMarkInt", "2048", Some(IRRELEVANT)),
        ("TaskReporting", "FastAbort", Some("RFC3720")),
        ("iSCSIProtocolLevel", "2", Some("1")),
        ("RDMAExtensions", "Yes", Some("No")),
        ("InitiatorAlias", "host1", None),
        ("TargetAlias", "x", Some(REJECT)),
        ("TargetAddress", "1.2.3.4:3260,1", Some(REJECT)),
        ("TargetPortalGroupTag", "1", Some(REJECT)),
        ("X-com.example.Foo", "1", Some(NOT_UNDERSTOOD)),
        ("X#org.example.Bar", "1", Some(NOT_UNDERSTOOD)),
        ("NoSuchKey", "1", Some(NOT_UNDERSTOOD)),
    ];

    #[test]
    fn negotiation_table() {
        for (key, theirs, expected) in TABLE {
            let mut n = Negotiation::new(Offers::default(), 16 * 1024 * 1024);
            let got = n.respond(key, theirs, false);
            assert_eq!(got.as_deref(), *expected, "{key}={theirs}");
        }
    }

    #[test]
    fn results_are_recorded() {
        let mut n = Negotiation::new(Offers::default(), 16 * 1024 * 1024);
        for (k, v) in [
            ("HeaderDigest", "CRC32C"),
            ("InitialR2T", "No"),
            ("ImmediateData", "No"),
            ("MaxRecvDataSegmentLength", "4096"),
            ("MaxBurstLength", "131072"),
            ("FirstBurstLength", "262144"),
            ("MaxOutstandingR2T", "4"),
        ] {
            n.respond(k, v, false);
        }
        n.target_offers(false);
        n.finish();
        assert_eq!(n.connection.header_digest, DigestKind::Crc32c);
        assert_eq!(n.connection.max_xmit_data_segment_length, 4096);
        assert_eq!(n.connection.max_recv_data_segment_length, 256 * 1024);
        assert!(!n.session.initial_r2t);
        assert!(!n.session.immediate_data);
        assert_eq!(n.session.max_burst_length, 131_072);
        assert_eq!(
            n.session.first_burst_length, 131_072,
            "FirstBurstLength <= MaxBurstLength"
        );
        assert_eq!(n.session.max_outstanding_r2t, 4);
    }

    #[test]
    fn discovery_answers_irrelevant_for_session_keys() {
        let mut n = Negotiation::new(Offers::default(), 8192);
        assert_eq!(
            n.respond("InitialR2T", "No", true).as_deref(),
            Some(IRRELEVANT)
        );
        assert_eq!(
            n.respond("MaxBurstLength", "512", true).as_deref(),
            Some(IRRELEVANT)
        );
        assert_eq!(
            n.respond("HeaderDigest", "None", true).as_deref(),
            Some("None")
        );
    }

    #[test]
    fn declares_our_mrdsl_once_bounded_by_limits() {
        let mut n = Negotiation::new(Offers::default(), 65536);
        assert_eq!(
            n.target_offers(false),
            vec![("MaxRecvDataSegmentLength".to_string(), "65536".to_string())]
        );
        assert!(n.target_offers(false).is_empty());
        assert!(!n.awaiting_answers());
    }

    #[test]
    fn restrictive_offers_are_sent_and_answers_not_answered() {
        let offers = Offers {
            immediate_data: false,
            max_burst_length: 4096,
            first_burst_length: 4096,
            ..Offers::default()
        };
        let mut n = Negotiation::new(offers, 65536);
        let sent = n.target_offers(false);
        let keys: Vec<&str> = sent.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "MaxRecvDataSegmentLength",
                "ImmediateData",
                "MaxBurstLength",
                "FirstBurstLength"
            ]
        );
        assert!(n.awaiting_answers());
        assert_eq!(n.respond("ImmediateData", "No", false), None);
        assert_eq!(n.respond("MaxBurstLength", "4096", false), None);
        assert_eq!(n.respond("FirstBurstLength", "4096", false), None);
        assert!(!n.awaiting_answers());
        assert!(!n.session.immediate_data);
        assert_eq!(n.session.max_burst_length, 4096);
    }

    #[test]
    fn rejects_renegotiation_of_a_key() {
        let mut n = Negotiation::new(Offers::default(), 65536);
        assert_eq!(
            n.respond("MaxBurstLength", "4096", false).as_deref(),
            Some("4096")
        );
        assert_eq!(
            n.respond("MaxBurstLength", "8192", false).as_deref(),
            Some(REJECT)
        );
        assert_eq!(n.session.max_burst_length, 4096);
    }

    #[test]
    fn skipped_operational_stage_keeps_default_mrdsl() {
        let mut n = Negotiation::new(Offers::default(), 65536);
        n.finish();
        assert_eq!(n.connection.max_recv_data_segment_length, 8192);
    }

    #[test]
    fn parses_numbers() {
        assert_eq!(parse_number("0x10"), Some(16));
        assert_eq!(parse_number("4294967295"), Some(u32::MAX));
        assert_eq!(parse_number("4294967296"), None);
        assert_eq!(parse_number("-1"), None);
        assert_eq!(parse_number(""), None);
        assert_eq!(parse_number("0x"), None);
    }
}
