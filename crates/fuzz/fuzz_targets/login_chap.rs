//! The target Connection through login with CHAP configured (RFC 7143 §6, §12.1.3), then text
//! negotiation in full feature phase (§11.10), driven by arbitrary key/value steps.
//!
//! Each step is one Login Request (or, once logged in, one Text Request) whose text is built
//! from a key dictionary plus arbitrary values and raw bytes; a step may ask the harness to
//! append the correct CHAP_N/CHAP_R for the last challenge the target sent, so the fuzzer
//! reaches the operational stage, mutual CHAP and text negotiation.
//!
//! Invariants: no panic; output per step bounded; a closed connection stays closed; a login to
//! the CHAP target never completes unless the harness answered a challenge correctly.
#![no_main]

use bytes::{Bytes, BytesMut};
use ironlun_iscsi::acl::Acl;
use ironlun_iscsi::chap::{
    decode_binary, decode_number, encode_binary, AuthLimiter, ChapAlgorithm, ChapConfig,
    Credentials, Secret,
};
use ironlun_iscsi::connection::{Connection, Event, PortalConfig, TargetInfo};
use ironlun_iscsi::discovery::TargetPortal;
use ironlun_iscsi::framer::{self, Digests, Framed, Framer};
use ironlun_iscsi::pdu::{Header, LoginRequest, Stage, TextRequest};
use ironlun_iscsi::{text, Limits, Pdu};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TARGET: &str = "iqn.2026-11.io.ironlun:chap";
const SECRET: &str = "initiator-secret";

const KEYS: &[&str] = &[
    "InitiatorName",
    "TargetName",
    "SessionType",
    "AuthMethod",
    "CHAP_A",
    "CHAP_I",
    "CHAP_C",
    "CHAP_N",
    "CHAP_R",
    "HeaderDigest",
    "DataDigest",
    "MaxRecvDataSegmentLength",
    "MaxBurstLength",
    "FirstBurstLength",
    "InitialR2T",
    "ImmediateData",
    "ErrorRecoveryLevel",
    "MaxConnections",
    "SendTargets",
    "X-Vendor-Key",
];

const VALUES: &[&str] = &[
    "iqn.2026-11.io.test:host",
    TARGET,
    "Normal",
    "Discovery",
    "CHAP",
    "None",
    "CHAP,None",
    "5",
    "7,5",
    "8,7,6,5",
    "0x",
    "0x00",
    "0b",
    "alice",
    "All",
    "Yes",
    "No",
    "512",
    "CRC32C,None",
];

#[derive(Debug, Arbitrary)]
enum Value {
    Known(u8),
    Text(String),
    Hex(Vec<u8>),
    Base64(Vec<u8>),
}

#[derive(Debug, Arbitrary)]
struct Step {
    /// bit 0 transit, bit 1 continue, bit 2 CSG operational, bit 3 answer the challenge right,
    /// bit 4 ask for mutual CHAP along with it, bit 5 NSG full feature
    flags: u8,
    keys: Vec<(u8, Value)>,
    raw: Option<Vec<u8>>,
    /// Milliseconds that pass before this step.
    delay_ms: u16,
}

fn value_text(v: &Value) -> String {
    match v {
        Value::Known(i) => VALUES[usize::from(*i) % VALUES.len()].to_string(),
        Value::Text(s) => s.clone(),
        Value::Hex(b) => encode_binary(b),
        Value::Base64(b) => {
            // Not canonical base64 on purpose: just 0b plus bytes mapped into the alphabet.
            const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=";
            let body: String = b.iter().map(|x| char::from(A[usize::from(*x) % A.len()])).collect();
            format!("0b{body}")
        }
    }
}

fn config() -> PortalConfig {
    let chap = ChapConfig {
        initiator: Credentials { user: "alice".into(), secret: Secret::new(SECRET) },
        target: Some(Credentials { user: "tgt".into(), secret: Secret::new("target-secret-x") }),
    };
    PortalConfig {
        targets: vec![TargetInfo {
            name: TARGET.into(),
            alias: None,
            addresses: vec![TargetPortal::new(([127, 0, 0, 1], 3260).into(), 1)],
            portal_group_tag: 1,
            acl: Acl::allow_all(),
            chap: Some(chap.clone()),
        }],
        offers: Default::default(),
        limits: Limits::default(),
        portal_group_tag: 1,
        cmd_window: 8,
        sessions: Arc::default(),
        timeouts: Default::default(),
        discovery_chap: Some(chap),
        auth_limiter: Arc::new(Mutex::new(AuthLimiter::default())),
    }
}

fuzz_target!(|steps: Vec<Step>| {
    let mut now = Instant::now();
    let cfg = Arc::new(config());
    let mut conn = Connection::new(Arc::clone(&cfg), now);
    let mut framer = Framer::new(Limits::default());
    let mut challenge: Option<(u8, Vec<u8>)> = None;
    let mut answered_right = false;
    let mut logged_in = false;
    let mut was_closed = false;
    for (n, step) in steps.iter().take(32).enumerate() {
        now += Duration::from_millis(u64::from(step.delay_ms));
        let mut pairs: Vec<(String, String)> = step
            .keys
            .iter()
            .take(16)
            .map(|(k, v)| (KEYS[usize::from(*k) % KEYS.len()].to_string(), value_text(v)))
            .collect();
        if step.flags & 8 != 0 {
            if let Some((id, c)) = &challenge {
                let r = ChapAlgorithm::Md5.response(*id, &Secret::new(SECRET), c);
                pairs.push(("CHAP_N".into(), "alice".into()));
                pairs.push(("CHAP_R".into(), encode_binary(&r)));
                if step.flags & 16 != 0 {
                    pairs.push(("CHAP_I".into(), "9".into()));
                    pairs.push(("CHAP_C".into(), encode_binary(&[7u8; 16])));
                }
                answered_right = true;
            }
        }
        let mut data = text::encode(&pairs);
        if let Some(raw) = &step.raw {
            data.extend_from_slice(raw);
        }
        let header = if logged_in {
            Header::TextRequest(TextRequest {
                final_: step.flags & 1 != 0,
                continue_: step.flags & 2 != 0,
                itt: u32::try_from(n).unwrap_or(0),
                ttt: 0xffff_ffff,
                cmd_sn: u32::try_from(n).unwrap_or(0),
                ..Default::default()
            })
        } else {
            Header::LoginRequest(LoginRequest {
                transit: step.flags & 1 != 0,
                continue_: step.flags & 2 != 0,
                csg: if step.flags & 4 != 0 { Stage::Operational } else { Stage::Security },
                nsg: if step.flags & 32 != 0 { Stage::FullFeature } else { Stage::Operational },
                isid: [0x80, 0, 0, 0, 0, 1],
                cmd_sn: 1,
                ..Default::default()
            })
        };
        let pdu = Pdu { header, ahs: Vec::new(), data: Bytes::from(data) };
        let mut buf = BytesMut::new();
        for piece in framer::encode_pdu(&pdu, Digests::default()) {
            buf.extend_from_slice(&piece);
        }
        conn.receive(&mut buf, now);
        if let Some(t) = conn.poll_timeout() {
            if t <= now {
                conn.handle_timeout(now);
            }
        }
        while let Some(ev) = conn.poll_event() {
            if let Event::LoggedIn(info) = ev {
                assert!(
                    answered_right,
                    "logged in ({:?}) without a correct CHAP answer",
                    info.target_name
                );
                logged_in = true;
            }
        }
        let mut out = BytesMut::new();
        while let Some(t) = conn.poll_transmit() {
            for p in t.pieces {
                out.extend_from_slice(&p);
            }
            assert!(out.len() <= 1 << 20, "unbounded output");
        }
        while let Ok(Some(Framed::Pdu(p))) = framer.next_pdu(&mut out) {
            if let Ok(keys) = text::parse(&p.data) {
                let get = |k: &str| keys.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
                if let (Some(i), Some(c)) = (get("CHAP_I"), get("CHAP_C")) {
                    let id = decode_number(&i).and_then(|i| u8::try_from(i).ok());
                    if let (Some(id), Some(c)) = (id, decode_binary(&c)) {
                        challenge = Some((id, c));
                    }
                }
            }
        }
        if was_closed {
            assert!(conn.is_closed().is_some(), "a closed connection reopened");
        }
        was_closed = conn.is_closed().is_some();
    }
});
