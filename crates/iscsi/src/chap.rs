//! CHAP authentication for the login security stage (RFC 7143 §12.1.3, RFC 1994), sans-IO.
//!
//! The response to a challenge is `H(CHAP_I as one byte ‖ secret ‖ challenge)` (RFC 1994 §4.1)
//! with H chosen by CHAP_A. The target side is [`ChapTarget`]; the initiator side uses
//! [`ChapAlgorithm::response`] and [`verify`]. Secrets live in [`Secret`], which never prints.
//! [`AuthLimiter`] slows down guessing per initiator name while leaving other names alone.

use md5::Md5;
use sha1::Sha1;
use sha2::{Digest, Sha256};
use sha3::Sha3_256;
use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;

/// A CHAP digest algorithm, by its CHAP_A number (IANA "PPP Authentication Algorithms", as
/// used by RFC 7143 §12.1.3 and the Linux target / open-iscsi).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChapAlgorithm {
    /// 5: MD5, the one RFC 7143 §12.1.3 requires.
    Md5,
    /// 6: SHA-1.
    Sha1,
    /// 7: SHA-256.
    Sha256,
    /// 8: SHA3-256.
    Sha3_256,
}

impl ChapAlgorithm {
    /// Every algorithm we implement, strongest first (what an initiator offers by default).
    pub const ALL: [ChapAlgorithm; 4] = [
        ChapAlgorithm::Sha3_256,
        ChapAlgorithm::Sha256,
        ChapAlgorithm::Sha1,
        ChapAlgorithm::Md5,
    ];

    /// The CHAP_A value.
    pub fn code(self) -> u8 {
        match self {
            ChapAlgorithm::Md5 => 5,
            ChapAlgorithm::Sha1 => 6,
            ChapAlgorithm::Sha256 => 7,
            ChapAlgorithm::Sha3_256 => 8,
        }
    }

    /// The algorithm with CHAP_A value `code`, if we implement it.
    pub fn from_code(code: u32) -> Option<Self> {
        match code {
            5 => Some(ChapAlgorithm::Md5),
            6 => Some(ChapAlgorithm::Sha1),
            7 => Some(ChapAlgorithm::Sha256),
            8 => Some(ChapAlgorithm::Sha3_256),
            _ => None,
        }
    }

    /// Length of a response (the digest) in bytes.
    pub fn digest_len(self) -> usize {
        match self {
            ChapAlgorithm::Md5 => 16,
            ChapAlgorithm::Sha1 => 20,
            ChapAlgorithm::Sha256 | ChapAlgorithm::Sha3_256 => 32,
        }
    }

    /// `H(id ‖ secret ‖ challenge)` (RFC 1994 §4.1).
    pub fn response(self, id: u8, secret: &Secret, challenge: &[u8]) -> Vec<u8> {
        fn run<D: Digest>(id: u8, secret: &[u8], challenge: &[u8]) -> Vec<u8> {
            let mut h = D::new();
            h.update([id]);
            h.update(secret);
            h.update(challenge);
            h.finalize().to_vec()
        }
        let s = secret.expose();
        match self {
            ChapAlgorithm::Md5 => run::<Md5>(id, s, challenge),
            ChapAlgorithm::Sha1 => run::<Sha1>(id, s, challenge),
            ChapAlgorithm::Sha256 => run::<Sha256>(id, s, challenge),
            ChapAlgorithm::Sha3_256 => run::<Sha3_256>(id, s, challenge),
        }
    }
}

/// A CHAP secret. Its bytes are reachable only through [`Secret::expose`]; `Debug` prints a
/// placeholder and there is no `Display`, so a secret cannot end up in a log by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Secret(bytes.into())
    }

    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Shortest secret accepted: RFC 7143 §12.1.3 wants at least 96 bits of randomness.
pub const MIN_SECRET_LEN: usize = 12;

/// A CHAP name and secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    pub secret: Secret,
}

/// CHAP as a target (or the discovery portal) requires it: what the initiator must prove, and
/// optionally what the target answers with when the initiator asks for mutual CHAP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChapConfig {
    /// The initiator's CHAP_N and secret.
    pub initiator: Credentials,
    /// The target's CHAP_N and secret for mutual CHAP; `None`: mutual requests fail.
    pub target: Option<Credentials>,
}

/// Largest binary value (challenge or response) accepted, in bytes.
pub const MAX_BINARY_LEN: usize = 1024;

/// Length of the challenges we generate (≥ 16 bytes; libiscsi accepts up to 1024).
pub const CHALLENGE_LEN: usize = 32;

/// Encode bytes as a hex binary value `0x…` (RFC 7143 §6.1 binary-value).
pub fn encode_binary(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len().saturating_mul(2).saturating_add(2));
    s.push_str("0x");
    for &b in bytes {
        for nibble in [b >> 4, b & 0x0f] {
            if let Some(&c) = HEX.get(usize::from(nibble)) {
                s.push(char::from(c));
            }
        }
    }
    s
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

fn b64_val(c: u8) -> Option<u8> {
    match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    }
}

/// Decode a binary value (RFC 7143 §6.1): `0x`/`0X` hex (an odd digit count has an implied
/// leading zero) or `0b`/`0B` base64 (RFC 4648, `=` padding optional). Empty, malformed or longer
/// than [`MAX_BINARY_LEN`] bytes → `None`.
pub fn decode_binary(value: &str) -> Option<Vec<u8>> {
    let bytes = value.as_bytes();
    let (prefix, body) = (bytes.get(..2)?, bytes.get(2..)?);
    if body.is_empty() {
        return None;
    }
    match prefix {
        b"0x" | b"0X" => {
            let out_len = body.len().div_ceil(2);
            if out_len > MAX_BINARY_LEN {
                return None;
            }
            let mut out = Vec::with_capacity(out_len);
            let mut digits = body.iter().map(|&c| hex_val(c));
            if body.len() % 2 == 1 {
                out.push(digits.next()??);
            }
            while let Some(hi) = digits.next() {
                let lo = digits.next()??;
                out.push((hi? << 4) | lo);
            }
            Some(out)
        }
        b"0b" | b"0B" => {
            let trimmed = body.strip_suffix(b"==").or_else(|| body.strip_suffix(b"="));
            let body = trimmed.unwrap_or(body);
            if body.len() % 4 == 1 || body.len() / 4 * 3 > MAX_BINARY_LEN {
                return None;
            }
            let mut out = Vec::with_capacity(body.len() / 4 * 3 + 2);
            let mut acc: u32 = 0;
            let mut bits = 0u32;
            for &c in body {
                acc = (acc << 6) | u32::from(b64_val(c)?);
                bits += 6;
                if bits >= 8 {
                    bits -= 8;
                    out.push(u8::try_from((acc >> bits) & 0xff).ok()?);
                }
            }
            // Leftover bits must be zero (canonical encoding).
            if acc & ((1 << bits) - 1) != 0 || out.len() > MAX_BINARY_LEN {
                return None;
            }
            Some(out)
        }
        _ => None,
    }
}

/// Decode a number value (RFC 7143 §6.1 decimal-constant or hex-constant) within `u32`: the
/// one number parser of the text layer, shared with operational negotiation.
pub use crate::negotiation::parse_number as decode_number;

/// Constant-time check that `response` is the right answer for (`id`, `challenge`) under
/// `secret`.
pub fn verify(
    algorithm: ChapAlgorithm,
    id: u8,
    secret: &Secret,
    challenge: &[u8],
    response: &[u8],
) -> bool {
    let expected = algorithm.response(id, secret, challenge);
    expected.len() == response.len() && bool::from(expected.ct_eq(response))
}

/// Why CHAP failed; every variant answers the login with 0201 AUTHENTICATION FAILURE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChapError {
    /// CHAP_A listed nothing we implement.
    NoCommonAlgorithm,
    /// A CHAP key is missing, malformed, repeated or out of order.
    Protocol,
    /// Wrong CHAP_N or CHAP_R.
    BadResponse,
    /// Mutual CHAP asked for but no target credentials are configured.
    MutualNotConfigured,
    /// The initiator's challenge equals ours (a reflection attack).
    Reflection,
    /// The initiator name is in its backoff after recent failures ([`AuthLimiter`]).
    RateLimited,
    /// The CSPRNG failed.
    Random,
}

/// What [`ChapTarget::on_keys`] answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChapReply {
    pub keys: Vec<(String, String)>,
    /// Authentication succeeded: the security stage may end.
    pub done: bool,
}

/// Fill `buf` from the operating system's CSPRNG.
pub fn random(buf: &mut [u8]) -> Result<(), ChapError> {
    getrandom::fill(buf).map_err(|_| ChapError::Random)
}

enum TargetState {
    /// AuthMethod=CHAP was agreed; waiting for CHAP_A.
    AwaitAlgorithm,
    /// We sent CHAP_A/CHAP_I/CHAP_C; waiting for CHAP_N/CHAP_R.
    AwaitResponse {
        algorithm: ChapAlgorithm,
        id: u8,
        challenge: Vec<u8>,
    },
    Done,
    Failed,
}

/// The target side of CHAP (RFC 7143 §12.1.3) after AuthMethod=CHAP was agreed.
///
/// Exchange: initiator `CHAP_A=<list>` → target `CHAP_A=<a>, CHAP_I, CHAP_C`; initiator
/// `CHAP_N, CHAP_R [, CHAP_I, CHAP_C]` → target (mutual only) `CHAP_N, CHAP_R`. Any error ends
/// the machine in a failed state.
pub struct ChapTarget {
    config: ChapConfig,
    state: TargetState,
}

impl fmt::Debug for ChapTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChapTarget")
            .field("done", &self.is_done())
            .finish_non_exhaustive()
    }
}

/// CHAP keys an initiator may send (§12.1.3).
pub fn is_chap_key(key: &str) -> bool {
    matches!(key, "CHAP_A" | "CHAP_I" | "CHAP_C" | "CHAP_N" | "CHAP_R")
}

impl ChapTarget {
    pub fn new(config: ChapConfig) -> Self {
        ChapTarget {
            config,
            state: TargetState::AwaitAlgorithm,
        }
    }

    /// Authentication succeeded.
    pub fn is_done(&self) -> bool {
        matches!(self.state, TargetState::Done)
    }

    /// Handle the CHAP keys of one complete login text (`chap` holds only CHAP_* pairs, in
    /// order). `verify_gate` runs just before CHAP_R is checked: it returns `false` to refuse the
    /// attempt unchecked (rate limit) and is told the outcome through the returned value.
    pub fn on_keys(
        &mut self,
        chap: &[(String, String)],
        admit: &mut dyn FnMut() -> bool,
    ) -> Result<ChapReply, ChapError> {
        let result = self.step(chap, admit);
        if result.is_err() {
            self.state = TargetState::Failed;
        }
        result
    }

    fn step(
        &mut self,
        chap: &[(String, String)],
        admit: &mut dyn FnMut() -> bool,
    ) -> Result<ChapReply, ChapError> {
        let one = |k: &str| -> Result<Option<&str>, ChapError> {
            let mut it = chap.iter().filter(|(key, _)| key == k);
            let first = it.next().map(|(_, v)| v.as_str());
            if it.next().is_some() {
                return Err(ChapError::Protocol);
            }
            Ok(first)
        };
        match &self.state {
            TargetState::AwaitAlgorithm => {
                if chap.iter().any(|(k, _)| k != "CHAP_A") {
                    return Err(ChapError::Protocol);
                }
                let Some(list) = one("CHAP_A")? else {
                    // Nothing yet (AuthMethod alone): wait for CHAP_A.
                    return Ok(ChapReply {
                        keys: Vec::new(),
                        done: false,
                    });
                };
                // §12.1.3: the first algorithm of the initiator's list that we support.
                let algorithm = list
                    .split(',')
                    .filter_map(decode_number)
                    .find_map(ChapAlgorithm::from_code)
                    .ok_or(ChapError::NoCommonAlgorithm)?;
                let mut id = [0u8; 1];
                random(&mut id)?;
                let mut challenge = vec![0u8; CHALLENGE_LEN];
                random(&mut challenge)?;
                let [id] = id;
                let keys = vec![
                    ("CHAP_A".to_string(), algorithm.code().to_string()),
                    ("CHAP_I".to_string(), id.to_string()),
                    ("CHAP_C".to_string(), encode_binary(&challenge)),
                ];
                self.state = TargetState::AwaitResponse {
                    algorithm,
                    id,
                    challenge,
                };
                Ok(ChapReply { keys, done: false })
            }
            TargetState::AwaitResponse {
                algorithm,
                id,
                challenge,
            } => {
                if chap.iter().any(|(k, _)| k == "CHAP_A") {
                    return Err(ChapError::Protocol);
                }
                let name = one("CHAP_N")?.ok_or(ChapError::Protocol)?;
                let response = one("CHAP_R")?
                    .and_then(decode_binary)
                    .ok_or(ChapError::Protocol)?;
                let mutual = match (one("CHAP_I")?, one("CHAP_C")?) {
                    (None, None) => None,
                    (Some(i), Some(c)) => {
                        let i = decode_number(i)
                            .and_then(|i| u8::try_from(i).ok())
                            .ok_or(ChapError::Protocol)?;
                        let c = decode_binary(c).ok_or(ChapError::Protocol)?;
                        Some((i, c))
                    }
                    _ => return Err(ChapError::Protocol),
                };
                if !admit() {
                    return Err(ChapError::RateLimited);
                }
                let expected = &self.config.initiator;
                // Check both name and response without an early exit on the name.
                let name_ok = bool::from(name.as_bytes().ct_eq(expected.user.as_bytes()));
                let response_ok = verify(*algorithm, *id, &expected.secret, challenge, &response);
                if !(name_ok & response_ok) {
                    return Err(ChapError::BadResponse);
                }
                let mut keys = Vec::new();
                if let Some((their_id, their_challenge)) = mutual {
                    // §12.1.3: a challenge equal to ours would let the initiator reflect it.
                    if bool::from(their_challenge.ct_eq(challenge)) {
                        return Err(ChapError::Reflection);
                    }
                    let ours = self
                        .config
                        .target
                        .as_ref()
                        .ok_or(ChapError::MutualNotConfigured)?;
                    let r = algorithm.response(their_id, &ours.secret, &their_challenge);
                    keys.push(("CHAP_N".to_string(), ours.user.clone()));
                    keys.push(("CHAP_R".to_string(), encode_binary(&r)));
                }
                self.state = TargetState::Done;
                Ok(ChapReply { keys, done: true })
            }
            TargetState::Done | TargetState::Failed => {
                if chap.is_empty() {
                    Ok(ChapReply {
                        keys: Vec::new(),
                        done: self.is_done(),
                    })
                } else {
                    Err(ChapError::Protocol)
                }
            }
        }
    }
}

/// Backoff policy of [`AuthLimiter`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimiterPolicy {
    /// Failures counted within this window of the last failure; older ones are forgotten.
    pub window: Duration,
    /// Failures in the window that cost nothing (typos).
    pub free_failures: u32,
    /// Backoff after the first failure beyond the free ones; doubles with each further one…
    pub base_backoff: Duration,
    /// …up to this. Keep it under a second: a correct login after the backoff goes through.
    pub max_backoff: Duration,
    /// Initiator names tracked at once (memory bound).
    pub max_entries: usize,
}

impl Default for LimiterPolicy {
    fn default() -> Self {
        LimiterPolicy {
            window: Duration::from_secs(60),
            free_failures: 3,
            base_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(800),
            max_entries: 4096,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    last: Instant,
    locked_until: Instant,
}

/// Per-initiator-name CHAP failure limiter, shared by all connections of a portal.
///
/// After `free_failures` failures within `window`, each further failure locks the name for a
/// backoff (doubling, capped at `max_backoff`). While locked, CHAP responses from that name are
/// refused without being checked, so a guesser gets at most one checked guess per backoff
/// whatever its number of connections; a success clears the name. Other names are unaffected.
/// Sans-IO: every call takes `now`.
///
/// Names are kept as keyed 64-bit hashes of their lowercase form (RFC 3722 names compare
/// case-insensitively), so a tracked name costs a few dozen bytes however long the peer made it.
#[derive(Debug, Default)]
pub struct AuthLimiter {
    policy: LimiterPolicy,
    hasher: RandomState,
    names: HashMap<u64, Failures>,
}

impl AuthLimiter {
    pub fn new(policy: LimiterPolicy) -> Self {
        AuthLimiter {
            policy,
            hasher: RandomState::new(),
            names: HashMap::new(),
        }
    }

    fn key(&self, initiator: &str) -> u64 {
        self.hasher.hash_one(initiator.to_ascii_lowercase())
    }

    /// May a CHAP response from `initiator` be checked now?
    pub fn admit(&self, initiator: &str, now: Instant) -> bool {
        !matches!(
            self.names.get(&self.key(initiator)),
            Some(f) if now < f.locked_until
        )
    }

    /// A checked response from `initiator` was wrong.
    pub fn record_failure(&mut self, initiator: &str, now: Instant) {
        let key = self.key(initiator);
        let policy = self.policy;
        if !self.names.contains_key(&key) && self.names.len() >= policy.max_entries {
            self.names.retain(|_, f| {
                now.saturating_duration_since(f.last) < policy.window || now < f.locked_until
            });
            if self.names.len() >= policy.max_entries {
                // Still full: forget the oldest entry.
                let oldest = self
                    .names
                    .iter()
                    .min_by_key(|(_, f)| f.last)
                    .map(|(k, _)| *k);
                if let Some(k) = oldest {
                    self.names.remove(&k);
                }
            }
        }
        let entry = self.names.entry(key).or_insert(Failures {
            count: 0,
            last: now,
            locked_until: now,
        });
        if now.saturating_duration_since(entry.last) >= policy.window {
            entry.count = 0;
        }
        entry.count = entry.count.saturating_add(1);
        entry.last = now;
        if let Some(extra) = entry
            .count
            .checked_sub(policy.free_failures.saturating_add(1))
        {
            let factor = 1u32.checked_shl(extra.min(16)).unwrap_or(u32::MAX);
            let backoff = policy
                .base_backoff
                .saturating_mul(factor)
                .min(policy.max_backoff);
            entry.locked_until = now.checked_add(backoff).unwrap_or(now);
        }
    }

    /// `initiator` authenticated: forget its failures.
    pub fn record_success(&mut self, initiator: &str) {
        let key = self.key(initiator);
        self.names.remove(&key);
    }

    /// Names currently tracked.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn secret(s: &str) -> Secret {
        Secret::new(s.as_bytes())
    }

    fn kv(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn get<'a>(keys: &'a [(String, String)], k: &str) -> &'a str {
        keys.iter().find(|(key, _)| key == k).unwrap().1.as_str()
    }

    // Expected values from python3:
    //   import hashlib
    //   m = bytes([0x2a]) + b"secretsecret" + bytes(range(16))
    //   for h in ("md5", "sha1", "sha256", "sha3_256"): print(hashlib.new(h, m).hexdigest())
    #[test]
    fn accepts_known_vectors_for_every_algorithm() {
        let challenge: Vec<u8> = (0u8..16).collect();
        let s = secret("secretsecret");
        let table = [
            (ChapAlgorithm::Md5, VECTOR_MD5),
            (ChapAlgorithm::Sha1, VECTOR_SHA1),
            (ChapAlgorithm::Sha256, VECTOR_SHA256),
            (ChapAlgorithm::Sha3_256, VECTOR_SHA3_256),
        ];
        for (alg, hex) in table {
            let r = alg.response(0x2a, &s, &challenge);
            assert_eq!(r.len(), alg.digest_len());
            assert_eq!(encode_binary(&r), format!("0x{hex}"), "{alg:?}");
            assert!(verify(alg, 0x2a, &s, &challenge, &r));
            assert!(!verify(alg, 0x2b, &s, &challenge, &r));
        }
    }

    const VECTOR_MD5: &str = "54d49338a27b0c1dd5e935c21ab005a3";
    const VECTOR_SHA1: &str = "b060c80c0e004a388193dd4b911b5a400ca2b931";
    const VECTOR_SHA256: &str = "2076dab09b25dfe7f89cdb79aa854cf8af88246b80126a0856a426662b39d903";
    const VECTOR_SHA3_256: &str =
        "1e1bc4b940a438823a7ab5862e223043f6f65ee8148abe3310f5b7de30b8aa95";

    #[test]
    fn algorithm_codes_round_trip() {
        for alg in ChapAlgorithm::ALL {
            assert_eq!(ChapAlgorithm::from_code(u32::from(alg.code())), Some(alg));
        }
        assert_eq!(ChapAlgorithm::Md5.code(), 5);
        assert_eq!(ChapAlgorithm::Sha3_256.code(), 8);
        assert_eq!(ChapAlgorithm::from_code(4), None);
        assert_eq!(ChapAlgorithm::from_code(9), None);
    }

    #[test]
    fn secrets_never_print() {
        let c = ChapConfig {
            initiator: Credentials {
                user: "alice".into(),
                secret: secret("hunter2hunter2"),
            },
            target: None,
        };
        let shown = format!("{c:?} {:?}", ChapTarget::new(c.clone()));
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("alice"));
    }

    #[test]
    fn binary_values_table() {
        let table: &[(&str, Option<&[u8]>)] = &[
            ("0x00ff10", Some(&[0x00, 0xff, 0x10])),
            ("0XABc", Some(&[0x0a, 0xbc])),
            ("0bAAEC", Some(&[0x00, 0x01, 0x02])),
            ("0bAAE=", Some(&[0x00, 0x01])),
            ("0BAA==", Some(&[0x00])),
            ("0x", None),
            ("0b", None),
            ("0xg0", None),
            ("0bA", None),
            ("0bAB==", None),
            ("1234", None),
            ("", None),
            ("0b!!!!", None),
        ];
        for (text, expected) in table {
            assert_eq!(decode_binary(text).as_deref(), *expected, "{text}");
        }
        let long = format!("0x{}", "00".repeat(MAX_BINARY_LEN + 1));
        assert_eq!(decode_binary(&long), None);
        let max = format!("0x{}", "01".repeat(MAX_BINARY_LEN));
        assert_eq!(decode_binary(&max).map(|v| v.len()), Some(MAX_BINARY_LEN));
        let b = [1u8, 2, 250];
        assert_eq!(decode_binary(&encode_binary(&b)).unwrap(), b);
    }

    #[test]
    fn number_values_table() {
        let table = [
            ("5", Some(5)),
            ("0x07", Some(7)),
            ("4294967295", Some(u32::MAX)),
            ("4294967296", None),
            ("", None),
            ("-1", None),
            ("0x", None),
            ("12a", None),
        ];
        for (text, expected) in table {
            assert_eq!(decode_number(text), expected, "{text}");
        }
    }

    fn config(mutual: bool) -> ChapConfig {
        ChapConfig {
            initiator: Credentials {
                user: "alice".into(),
                secret: secret("initiator-secret"),
            },
            target: mutual.then(|| Credentials {
                user: "tgt".into(),
                secret: secret("target-secret-x"),
            }),
        }
    }

    /// Runs CHAP_A and returns (algorithm, id, challenge) the target chose.
    fn start(t: &mut ChapTarget, list: &str) -> (ChapAlgorithm, u8, Vec<u8>) {
        let r = t.on_keys(&kv(&[("CHAP_A", list)]), &mut || true).unwrap();
        assert!(!r.done);
        let alg = ChapAlgorithm::from_code(get(&r.keys, "CHAP_A").parse().unwrap()).unwrap();
        let id: u8 = get(&r.keys, "CHAP_I").parse().unwrap();
        let c = decode_binary(get(&r.keys, "CHAP_C")).unwrap();
        assert!(c.len() >= 16);
        (alg, id, c)
    }

    #[test]
    fn accepts_good_response_for_each_algorithm() {
        for alg in ChapAlgorithm::ALL {
            let mut t = ChapTarget::new(config(false));
            let (chosen, id, c) = start(&mut t, &format!("{},5", alg.code()));
            assert_eq!(chosen, alg);
            let r = alg.response(id, &secret("initiator-secret"), &c);
            let reply = t
                .on_keys(
                    &kv(&[("CHAP_N", "alice"), ("CHAP_R", &encode_binary(&r))]),
                    &mut || true,
                )
                .unwrap();
            assert!(reply.done && reply.keys.is_empty() && t.is_done());
        }
    }

    #[test]
    fn picks_first_supported_algorithm_of_initiators_list() {
        let mut t = ChapTarget::new(config(false));
        assert_eq!(start(&mut t, "99,0x7,5").0, ChapAlgorithm::Sha256);
    }

    #[test]
    fn rejects_unknown_algorithms() {
        let mut t = ChapTarget::new(config(false));
        assert_eq!(
            t.on_keys(&kv(&[("CHAP_A", "4,99,x")]), &mut || true),
            Err(ChapError::NoCommonAlgorithm)
        );
    }

    #[test]
    fn rejects_wrong_secret_and_wrong_name() {
        for (name, pw) in [("alice", "wrong-secret-1"), ("bob", "initiator-secret")] {
            let mut t = ChapTarget::new(config(false));
            let (alg, id, c) = start(&mut t, "5");
            let r = alg.response(id, &secret(pw), &c);
            assert_eq!(
                t.on_keys(
                    &kv(&[("CHAP_N", name), ("CHAP_R", &encode_binary(&r))]),
                    &mut || true
                ),
                Err(ChapError::BadResponse)
            );
            assert!(!t.is_done());
            // A failed machine stays failed.
            assert!(t.on_keys(&kv(&[("CHAP_N", name)]), &mut || true).is_err());
        }
    }

    #[test]
    fn rejects_missing_duplicate_and_malformed_keys() {
        let cases: &[&[(&str, &str)]] = &[
            &[("CHAP_N", "alice")],
            &[("CHAP_R", "0x00")],
            &[("CHAP_N", "alice"), ("CHAP_R", "zz")],
            &[("CHAP_N", "alice"), ("CHAP_N", "alice"), ("CHAP_R", "0x00")],
            &[("CHAP_N", "alice"), ("CHAP_R", "0x00"), ("CHAP_I", "1")],
            &[
                ("CHAP_N", "alice"),
                ("CHAP_R", "0x00"),
                ("CHAP_I", "256"),
                ("CHAP_C", "0x01"),
            ],
            &[("CHAP_A", "5"), ("CHAP_N", "alice"), ("CHAP_R", "0x00")],
        ];
        for case in cases {
            let mut t = ChapTarget::new(config(true));
            start(&mut t, "5");
            assert_eq!(
                t.on_keys(&kv(case), &mut || true),
                Err(ChapError::Protocol),
                "{case:?}"
            );
        }
        // CHAP_N before CHAP_A.
        let mut t = ChapTarget::new(config(false));
        assert_eq!(
            t.on_keys(&kv(&[("CHAP_N", "alice")]), &mut || true),
            Err(ChapError::Protocol)
        );
    }

    #[test]
    fn mutual_answers_with_target_secret() {
        let mut t = ChapTarget::new(config(true));
        let (alg, id, c) = start(&mut t, "7");
        let r = alg.response(id, &secret("initiator-secret"), &c);
        let their_c = [9u8; 24];
        let reply = t
            .on_keys(
                &kv(&[
                    ("CHAP_N", "alice"),
                    ("CHAP_R", &encode_binary(&r)),
                    ("CHAP_I", "77"),
                    ("CHAP_C", &encode_binary(&their_c)),
                ]),
                &mut || true,
            )
            .unwrap();
        assert!(reply.done);
        assert_eq!(get(&reply.keys, "CHAP_N"), "tgt");
        let tr = decode_binary(get(&reply.keys, "CHAP_R")).unwrap();
        assert!(verify(alg, 77, &secret("target-secret-x"), &their_c, &tr));
        assert!(!verify(alg, 77, &secret("wrong-target-x"), &their_c, &tr));
    }

    #[test]
    fn rejects_mutual_without_target_credentials_and_reflection() {
        let mut t = ChapTarget::new(config(false));
        let (alg, id, c) = start(&mut t, "5");
        let r = encode_binary(&alg.response(id, &secret("initiator-secret"), &c));
        let pairs = kv(&[
            ("CHAP_N", "alice"),
            ("CHAP_R", &r),
            ("CHAP_I", "1"),
            ("CHAP_C", "0x0102"),
        ]);
        assert_eq!(
            t.on_keys(&pairs, &mut || true),
            Err(ChapError::MutualNotConfigured)
        );

        let mut t = ChapTarget::new(config(true));
        let (alg, id, c) = start(&mut t, "5");
        let r = encode_binary(&alg.response(id, &secret("initiator-secret"), &c));
        let pairs = kv(&[
            ("CHAP_N", "alice"),
            ("CHAP_R", &r),
            ("CHAP_I", &id.to_string()),
            ("CHAP_C", &encode_binary(&c)),
        ]);
        assert_eq!(t.on_keys(&pairs, &mut || true), Err(ChapError::Reflection));
    }

    #[test]
    fn refuses_unchecked_when_gate_closed() {
        let mut t = ChapTarget::new(config(false));
        let (alg, id, c) = start(&mut t, "5");
        let r = encode_binary(&alg.response(id, &secret("initiator-secret"), &c));
        assert_eq!(
            t.on_keys(&kv(&[("CHAP_N", "alice"), ("CHAP_R", &r)]), &mut || false),
            Err(ChapError::RateLimited)
        );
    }

    #[test]
    fn challenges_differ_between_logins() {
        let (_, _, a) = start(&mut ChapTarget::new(config(false)), "5");
        let (_, _, b) = start(&mut ChapTarget::new(config(false)), "5");
        assert_ne!(a, b);
    }

    #[test]
    fn limiter_backs_off_only_the_failing_name() {
        let policy = LimiterPolicy::default();
        let mut l = AuthLimiter::new(policy);
        let t0 = Instant::now();
        for _ in 0..policy.free_failures {
            assert!(l.admit("iqn.bad", t0));
            l.record_failure("iqn.bad", t0);
        }
        assert!(l.admit("iqn.bad", t0), "free failures cost nothing");
        l.record_failure("IQN.BAD", t0);
        assert!(!l.admit("iqn.bad", t0), "names compare case-insensitively");
        assert!(l.admit("iqn.good", t0));
        assert!(l.admit("iqn.bad", t0 + policy.base_backoff));
        // Backoff doubles, capped below a second.
        for _ in 0..20 {
            l.record_failure("iqn.bad", t0);
        }
        assert!(!l.admit(
            "iqn.bad",
            t0 + policy.max_backoff - Duration::from_millis(1)
        ));
        assert!(l.admit("iqn.bad", t0 + policy.max_backoff));
        assert!(policy.max_backoff < Duration::from_secs(1));
        l.record_success("iqn.bad");
        assert!(l.admit("iqn.bad", t0));
        assert!(l.is_empty());
    }

    #[test]
    fn limiter_forgets_old_failures_and_stays_bounded() {
        let policy = LimiterPolicy {
            max_entries: 8,
            ..LimiterPolicy::default()
        };
        let mut l = AuthLimiter::new(policy);
        let t0 = Instant::now();
        for _ in 0..=policy.free_failures {
            l.record_failure("a", t0);
        }
        assert!(!l.admit("a", t0));
        let later = t0 + policy.window;
        l.record_failure("a", later);
        assert!(l.admit("a", later), "count restarted after the window");
        for i in 0..100 {
            l.record_failure(&format!("n{i}"), later);
            assert!(l.len() <= policy.max_entries);
        }
    }
}
