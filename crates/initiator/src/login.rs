//! Initiator side of login (RFC 7143 §6): security stage with AuthMethod=None or CHAP (one-way
//! or mutual, §12.1.3), operational negotiation (§13), continuation of long answers (§11.13.2).

use crate::error::{Error, Result};
use crate::options::{ChapCredentials, LoginOptions, Negotiated};
use crate::transport::{write_pdu, PduReader};
use bytes::Bytes;
use ironlun_iscsi::chap::{self, ChapAlgorithm};
use ironlun_iscsi::framer::Digests;
use ironlun_iscsi::pdu::{Header, LoginRequest, LoginResponse, Stage};
use ironlun_iscsi::{text, Pdu};
use tokio::io::{AsyncRead, AsyncWrite};

/// ITT of every PDU of the login exchange; full-feature tags start above it.
pub const LOGIN_ITT: u32 = 0;
/// CmdSN we start the session with (any value is allowed, §3.2.2.1).
pub const INITIAL_CMD_SN: u32 = 1;
/// Bound on login rounds: a target that never transits is broken.
const MAX_ROUNDS: usize = 16;
/// Bound on one login answer across continuations (we never need more).
const MAX_LOGIN_TEXT: usize = 64 * 1024;

/// Default MaxRecvDataSegmentLength when a side declares none (§13.12).
pub const DEFAULT_MRDSL: u32 = 8192;

/// Keys a target declares or answers that never need an answer from us.
const NO_ANSWER_KEYS: &[&str] = &[
    "TargetAlias",
    "TargetPortalGroupTag",
    "TargetAddress",
    "MaxRecvDataSegmentLength",
    "AuthMethod",
    "HeaderDigest",
    "DataDigest",
    "InitialR2T",
    "ImmediateData",
    "FirstBurstLength",
    "MaxBurstLength",
    "MaxOutstandingR2T",
    "MaxConnections",
    "ErrorRecoveryLevel",
    "DefaultTime2Wait",
    "DefaultTime2Retain",
    "DataPDUInOrder",
    "DataSequenceInOrder",
    "TargetName",
    "SessionType",
];

/// Build a Login Request PDU with `keys` as its data segment (also used by raw tests).
pub fn login_request_pdu(req: LoginRequest, keys: &[(String, String)]) -> Pdu {
    Pdu {
        header: Header::LoginRequest(req),
        ahs: Vec::new(),
        data: Bytes::from(text::encode(keys)),
    }
}

fn kv(k: &str, v: impl Into<String>) -> (String, String) {
    (k.to_owned(), v.into())
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "Yes"
    } else {
        "No"
    }
}

/// Security-stage keys (§6.3.1, §13.4–13.6, §13.21).
fn security_keys(opts: &LoginOptions) -> Vec<(String, String)> {
    let mut keys = vec![kv("InitiatorName", opts.initiator_name.clone())];
    match &opts.target_name {
        Some(t) => {
            keys.push(kv("SessionType", "Normal"));
            keys.push(kv("TargetName", t.clone()));
        }
        None => keys.push(kv("SessionType", "Discovery")),
    }
    let method = if opts.chap.is_some() { "CHAP" } else { "None" };
    keys.push(kv("AuthMethod", method));
    keys
}

/// Where our side of CHAP stands (§12.1.3).
enum ChapClient<'a> {
    /// AuthMethod=CHAP offered, waiting for the target to agree.
    Offered(&'a ChapCredentials),
    /// CHAP_A sent, waiting for CHAP_A/CHAP_I/CHAP_C.
    SentAlgorithms(&'a ChapCredentials),
    /// CHAP_N/CHAP_R sent; for mutual CHAP, the challenge the target must answer.
    SentResponse(Option<(&'a ChapCredentials, ChapAlgorithm, u8, Vec<u8>)>),
    Done,
}

impl<'a> ChapClient<'a> {
    /// Take the target's security-stage keys; returns the CHAP keys to send next.
    fn on_target_keys(&mut self, pairs: &[(String, String)]) -> Result<Vec<(String, String)>> {
        let get = |k: &str| {
            pairs
                .iter()
                .rev()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        let bad = |what: &str| Error::Protocol(format!("CHAP: {what}"));
        match self {
            ChapClient::Offered(creds) => match get("AuthMethod") {
                Some("CHAP") => {
                    let list: Vec<String> = creds
                        .algorithms
                        .iter()
                        .map(|a| a.code().to_string())
                        .collect();
                    let creds = *creds;
                    *self = ChapClient::SentAlgorithms(creds);
                    Ok(vec![kv("CHAP_A", list.join(","))])
                }
                Some(other) => Err(bad(&format!("target answered AuthMethod={other}"))),
                None => Ok(Vec::new()),
            },
            ChapClient::SentAlgorithms(creds) => {
                let algorithm = get("CHAP_A")
                    .and_then(chap::decode_number)
                    .and_then(ChapAlgorithm::from_code)
                    .filter(|a| creds.algorithms.contains(a))
                    .ok_or_else(|| bad("no acceptable CHAP_A"))?;
                let id = get("CHAP_I")
                    .and_then(chap::decode_number)
                    .and_then(|i| u8::try_from(i).ok())
                    .ok_or_else(|| bad("bad CHAP_I"))?;
                let challenge = get("CHAP_C")
                    .and_then(chap::decode_binary)
                    .ok_or_else(|| bad("bad CHAP_C"))?;
                let response = algorithm.response(id, &creds.secret, &challenge);
                let mut keys = vec![
                    kv("CHAP_N", creds.user.clone()),
                    kv("CHAP_R", chap::encode_binary(&response)),
                ];
                let creds = *creds;
                let mutual = if creds.mutual.is_some() {
                    let mut id = [0u8; 1];
                    let mut ours = vec![0u8; chap::CHALLENGE_LEN];
                    chap::random(&mut id).map_err(|_| bad("no randomness"))?;
                    chap::random(&mut ours).map_err(|_| bad("no randomness"))?;
                    let [id] = id;
                    keys.push(kv("CHAP_I", id.to_string()));
                    keys.push(kv("CHAP_C", chap::encode_binary(&ours)));
                    Some((creds, algorithm, id, ours))
                } else {
                    None
                };
                *self = ChapClient::SentResponse(mutual);
                Ok(keys)
            }
            ChapClient::SentResponse(mutual) => {
                if let Some((creds, algorithm, id, ours)) = mutual {
                    let (user, secret) =
                        creds.mutual.as_ref().ok_or(Error::TargetAuthentication)?;
                    let name_ok = get("CHAP_N") == Some(user.as_str());
                    let response = get("CHAP_R").and_then(chap::decode_binary);
                    let ok =
                        response.is_some_and(|r| chap::verify(*algorithm, *id, secret, ours, &r));
                    if !(name_ok && ok) {
                        return Err(Error::TargetAuthentication);
                    }
                }
                *self = ChapClient::Done;
                Ok(Vec::new())
            }
            ChapClient::Done => Ok(Vec::new()),
        }
    }

    /// The target may end the security stage now (our side has nothing left to check).
    fn finished(&self) -> bool {
        matches!(self, ChapClient::Done)
    }
}

/// Operational-stage offers (§13), then `extra_keys` replacing or appending.
fn operational_keys(opts: &LoginOptions) -> Vec<(String, String)> {
    let digest = |b: bool| if b { "CRC32C,None" } else { "None" };
    let mut keys = vec![
        kv("HeaderDigest", digest(opts.header_digest)),
        kv("DataDigest", digest(opts.data_digest)),
        kv(
            "MaxRecvDataSegmentLength",
            opts.max_recv_data_segment_length.to_string(),
        ),
    ];
    if opts.target_name.is_some() {
        keys.push(kv("InitialR2T", yes_no(opts.initial_r2t)));
        keys.push(kv("ImmediateData", yes_no(opts.immediate_data)));
        keys.push(kv("FirstBurstLength", opts.first_burst_length.to_string()));
        keys.push(kv("MaxBurstLength", opts.max_burst_length.to_string()));
        keys.push(kv("MaxOutstandingR2T", "16"));
        keys.push(kv("MaxConnections", "1"));
        keys.push(kv("ErrorRecoveryLevel", "0"));
        keys.push(kv("DataPDUInOrder", "Yes"));
        keys.push(kv("DataSequenceInOrder", "Yes"));
    }
    for (k, v) in &opts.extra_keys {
        match keys.iter_mut().find(|(kk, _)| kk == k) {
            Some(slot) => slot.1 = v.clone(),
            None => keys.push((k.clone(), v.clone())),
        }
    }
    keys
}

/// The connection and counters a login runs on.
struct LoginIo<'a, R, W> {
    reader: &'a mut PduReader<R>,
    writer: &'a mut W,
    opts: &'a LoginOptions,
    exp_stat_sn: u32,
}

/// One login round: send `keys` at `csg` (asking to go to `nsg` when `transit`), collect the
/// answer across continuations (§11.13.2: we send empty requests while the target sets C).
async fn round<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    io: &mut LoginIo<'_, R, W>,
    keys: &[(String, String)],
    csg: Stage,
    nsg: Stage,
    transit: bool,
) -> Result<(LoginResponse, Vec<(String, String)>)> {
    let LoginIo {
        reader,
        writer,
        opts,
        exp_stat_sn,
    } = io;
    let mut req = LoginRequest {
        transit,
        continue_: false,
        csg,
        nsg: if transit { nsg } else { Stage::Security },
        version_max: 0,
        version_min: 0,
        isid: opts.isid,
        tsih: 0,
        itt: LOGIN_ITT,
        cid: 0,
        cmd_sn: INITIAL_CMD_SN,
        exp_stat_sn: *exp_stat_sn,
    };
    let mut data = Vec::new();
    let mut first = true;
    loop {
        let pdu = login_request_pdu(req.clone(), if first { keys } else { &[] });
        first = false;
        write_pdu(writer, &pdu, Digests::default()).await?;
        let pdu = tokio::time::timeout(opts.timeout, reader.recv_some())
            .await
            .map_err(|_| Error::Timeout)??;
        let Header::LoginResponse(resp) = pdu.header else {
            return Err(Error::Protocol(format!(
                "expected Login Response, got {:?}",
                pdu.header
            )));
        };
        if resp.status_class != 0 {
            return Err(Error::LoginFailed {
                class: resp.status_class,
                detail: resp.status_detail,
            });
        }
        if resp.itt != LOGIN_ITT {
            return Err(Error::Protocol(format!(
                "Login Response ITT {:#x}",
                resp.itt
            )));
        }
        if resp.version_active != 0 {
            return Err(Error::Protocol(format!(
                "VersionActive {}",
                resp.version_active
            )));
        }
        *exp_stat_sn = resp.stat_sn.wrapping_add(1);
        req.exp_stat_sn = *exp_stat_sn;
        if data.len().saturating_add(pdu.data.len()) > MAX_LOGIN_TEXT {
            return Err(Error::Protocol("login answer too long".to_owned()));
        }
        data.extend_from_slice(&pdu.data);
        if resp.continue_ {
            // §11.13.2: C and T are never both set; ask for the rest with an empty request.
            req.transit = false;
            req.nsg = Stage::Security;
            continue;
        }
        let pairs = text::parse(&data)?;
        return Ok((resp, pairs));
    }
}

/// Log in on a fresh connection. On success the connection is in full feature phase and the
/// returned [`Negotiated`] holds the agreed values and the sequence numbers to go on with.
pub(crate) async fn login<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    reader: &mut PduReader<R>,
    writer: &mut W,
    opts: &LoginOptions,
) -> Result<Negotiated> {
    let mut io = LoginIo {
        reader,
        writer,
        opts,
        exp_stat_sn: 0,
    };
    let mut target_keys: Vec<(String, String)> = Vec::new();
    let mut csg = Stage::Security;
    let mut keys = security_keys(opts);
    let mut sent_operational = false;
    let mut chap_client = opts.chap.as_ref().map(ChapClient::Offered);
    for _ in 0..MAX_ROUNDS {
        let nsg = match csg {
            Stage::Security => Stage::Operational,
            _ => Stage::FullFeature,
        };
        let (resp, pairs) = round(&mut io, &keys, csg, nsg, true).await?;
        let offered: Vec<String> = keys.iter().map(|(k, _)| k.clone()).collect();
        // Keys the target proposed on its own need an answer in our next request (§6.2).
        let mut answers = Vec::new();
        if csg == Stage::Security {
            if let Some(c) = chap_client.as_mut() {
                answers.extend(c.on_target_keys(&pairs)?);
                if resp.transit && !c.finished() {
                    // Leaving the security stage before CHAP completed.
                    return Err(Error::TargetAuthentication);
                }
            }
        }
        for (k, v) in &pairs {
            if !offered.contains(k)
                && !NO_ANSWER_KEYS.contains(&k.as_str())
                && !chap::is_chap_key(k)
            {
                answers.push((k.clone(), "NotUnderstood".to_owned()));
            }
            let _ = v;
        }
        target_keys.extend(pairs);
        if resp.transit {
            match resp.nsg {
                Stage::FullFeature => {
                    return Ok(finish(opts, &resp, target_keys, io.exp_stat_sn));
                }
                Stage::Operational if csg == Stage::Security => {
                    csg = Stage::Operational;
                    keys = operational_keys(opts);
                    keys.extend(answers);
                    sent_operational = true;
                    continue;
                }
                other => {
                    return Err(Error::Protocol(format!(
                        "login transit to {other:?} from {csg:?}"
                    )));
                }
            }
        }
        // No transit: another round at this stage with our answers (and offers not yet sent).
        keys = answers;
        if csg == Stage::Operational && !sent_operational {
            keys.extend(operational_keys(opts));
            sent_operational = true;
        }
    }
    Err(Error::Protocol("target never completed login".to_owned()))
}

fn answer<'a>(keys: &'a [(String, String)], key: &str) -> Option<&'a str> {
    keys.iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .filter(|v| !matches!(*v, "Reject" | "NotUnderstood" | "Irrelevant"))
}

fn answer_bool(keys: &[(String, String)], key: &str) -> Option<bool> {
    match answer(keys, key)? {
        "Yes" => Some(true),
        "No" => Some(false),
        _ => None,
    }
}

fn answer_u32(keys: &[(String, String)], key: &str) -> Option<u32> {
    answer(keys, key)?.parse().ok()
}

/// Agreed values from the target's answers (§13: missing answers leave the RFC default,
/// combined with our offer by the key's result function).
fn finish(
    opts: &LoginOptions,
    resp: &LoginResponse,
    target_keys: Vec<(String, String)>,
    exp_stat_sn: u32,
) -> Negotiated {
    let digest = |key: &str, wanted: bool| wanted && answer(&target_keys, key) == Some("CRC32C");
    // §13.12: legal range 512..2^24-1; anything else and we keep to the default.
    let target_mrdsl = answer_u32(&target_keys, "MaxRecvDataSegmentLength")
        .filter(|v| (512..=0x00ff_ffff).contains(v))
        .unwrap_or(DEFAULT_MRDSL);
    let initial_r2t = answer_bool(&target_keys, "InitialR2T").unwrap_or(true) || opts.initial_r2t;
    let immediate_data = answer_bool(&target_keys, "ImmediateData").unwrap_or(opts.immediate_data)
        && opts.immediate_data;
    let max_burst = answer_u32(&target_keys, "MaxBurstLength")
        .unwrap_or(262_144)
        .min(opts.max_burst_length)
        .max(512);
    let first_burst = answer_u32(&target_keys, "FirstBurstLength")
        .unwrap_or(65_536)
        .min(opts.first_burst_length)
        .min(max_burst)
        .max(512);
    let max_outstanding_r2t = answer_u32(&target_keys, "MaxOutstandingR2T")
        .unwrap_or(1)
        .clamp(1, 16);
    Negotiated {
        header_digest: digest("HeaderDigest", opts.header_digest),
        data_digest: digest("DataDigest", opts.data_digest),
        target_max_recv_data_segment_length: target_mrdsl,
        our_max_recv_data_segment_length: opts.max_recv_data_segment_length,
        immediate_data,
        initial_r2t,
        first_burst_length: first_burst,
        max_burst_length: max_burst,
        max_outstanding_r2t,
        target_keys,
        tsih: resp.tsih,
        cmd_sn: resp.exp_cmd_sn,
        max_cmd_sn: resp.max_cmd_sn,
        exp_stat_sn,
        next_itt: LOGIN_ITT.wrapping_add(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn operational_keys_extra_replaces_and_appends() {
        let opts = LoginOptions {
            target_name: Some("iqn.x".into()),
            extra_keys: pairs(&[("MaxBurstLength", "4096"), ("X-Foo", "1")]),
            ..LoginOptions::default()
        };
        let keys = operational_keys(&opts);
        assert_eq!(answer(&keys, "MaxBurstLength"), Some("4096"));
        assert_eq!(
            keys.iter().filter(|(k, _)| k == "MaxBurstLength").count(),
            1
        );
        assert_eq!(keys.last(), Some(&("X-Foo".to_owned(), "1".to_owned())));
    }

    #[test]
    fn discovery_sends_no_session_keys() {
        let opts = LoginOptions::default();
        let sec = security_keys(&opts);
        assert_eq!(answer(&sec, "SessionType"), Some("Discovery"));
        assert_eq!(answer(&sec, "TargetName"), None);
        let op = operational_keys(&opts);
        assert_eq!(op.len(), 3);
        assert_eq!(answer(&op, "InitialR2T"), None);
    }

    #[test]
    fn finish_takes_target_answers() {
        let opts = LoginOptions {
            header_digest: true,
            target_name: Some("t".into()),
            ..LoginOptions::default()
        };
        let resp = LoginResponse {
            tsih: 7,
            exp_cmd_sn: 5,
            max_cmd_sn: 36,
            ..LoginResponse::default()
        };
        let keys = pairs(&[
            ("HeaderDigest", "CRC32C"),
            ("DataDigest", "None"),
            ("MaxRecvDataSegmentLength", "65536"),
            ("InitialR2T", "No"),
            ("ImmediateData", "Yes"),
            ("FirstBurstLength", "131072"),
            ("MaxBurstLength", "1048576"),
            ("MaxOutstandingR2T", "4"),
        ]);
        let n = finish(&opts, &resp, keys, 3);
        assert!(n.header_digest);
        assert!(!n.data_digest);
        assert_eq!(n.target_max_recv_data_segment_length, 65536);
        assert!(!n.initial_r2t);
        assert!(n.immediate_data);
        assert_eq!(n.first_burst_length, 131_072);
        assert_eq!(n.max_burst_length, 1_048_576);
        assert_eq!(n.max_outstanding_r2t, 4);
        assert_eq!(
            (n.tsih, n.cmd_sn, n.max_cmd_sn, n.exp_stat_sn),
            (7, 5, 36, 3)
        );
    }

    #[test]
    fn finish_defaults_when_target_is_silent_or_rejects() {
        let opts = LoginOptions {
            target_name: Some("t".into()),
            ..LoginOptions::default()
        };
        let keys = pairs(&[
            ("MaxRecvDataSegmentLength", "100"),
            ("ImmediateData", "Reject"),
        ]);
        let n = finish(&opts, &LoginResponse::default(), keys, 0);
        assert_eq!(n.target_max_recv_data_segment_length, DEFAULT_MRDSL);
        assert!(n.initial_r2t);
        assert!(n.immediate_data);
        assert_eq!(n.first_burst_length, 65_536);
        assert_eq!(n.max_burst_length, 262_144);
        assert!(!n.header_digest);
    }
}
