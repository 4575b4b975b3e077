//! Login phase (RFC 7143 §6, §11.12–11.13): stages, status classes, the target's login state machine.

/// Login status class and detail (§11.13.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginStatus {
    pub class: u8,
    pub detail: u8,
}

impl LoginStatus {
    pub const SUCCESS: Self = Self {
        class: 0,
        detail: 0,
    };
    pub const TARGET_MOVED_TEMPORARILY: Self = Self {
        class: 1,
        detail: 1,
    };
    pub const INITIATOR_ERROR: Self = Self {
        class: 2,
        detail: 0,
    };
    pub const AUTHENTICATION_FAILURE: Self = Self {
        class: 2,
        detail: 1,
    };
    pub const AUTHORIZATION_FAILURE: Self = Self {
        class: 2,
        detail: 2,
    };
    pub const NOT_FOUND: Self = Self {
        class: 2,
        detail: 3,
    };
    pub const TARGET_REMOVED: Self = Self {
        class: 2,
        detail: 4,
    };
    pub const UNSUPPORTED_VERSION: Self = Self {
        class: 2,
        detail: 5,
    };
    pub const TOO_MANY_CONNECTIONS: Self = Self {
        class: 2,
        detail: 6,
    };
    pub const MISSING_PARAMETER: Self = Self {
        class: 2,
        detail: 7,
    };
    pub const CANT_INCLUDE_IN_SESSION: Self = Self {
        class: 2,
        detail: 8,
    };
    pub const SESSION_TYPE_NOT_SUPPORTED: Self = Self {
        class: 2,
        detail: 9,
    };
    pub const SESSION_DOES_NOT_EXIST: Self = Self {
        class: 2,
        detail: 0x0a,
    };
    pub const INVALID_DURING_LOGIN: Self = Self {
        class: 2,
        detail: 0x0b,
    };
    pub const TARGET_ERROR: Self = Self {
        class: 3,
        detail: 0,
    };
    pub const SERVICE_UNAVAILABLE: Self = Self {
        class: 3,
        detail: 1,
    };
    pub const OUT_OF_RESOURCES: Self = Self {
        class: 3,
        detail: 2,
    };
}

use crate::chap::{self, AuthLimiter, ChapConfig, ChapTarget};
use crate::connection::TargetInfo;
use crate::negotiation::{Negotiation, Offers, IRRELEVANT};
use crate::pdu::{LoginRequest, Stage};
use crate::text;
use bytes::Bytes;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Largest data segment either side may send during login (§13.12: the default 8192 applies
/// until login completes).
pub const LOGIN_MAX_SEGMENT: usize = 8192;

/// The type of session being logged in (§13.21).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionType {
    Discovery,
    Normal,
}

/// What the target answers one Login Request with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginReply {
    pub transit: bool,
    pub continue_: bool,
    pub csg: Stage,
    pub nsg: Stage,
    pub status: LoginStatus,
    pub data: Bytes,
    /// This reply ends the login successfully: the connection enters full feature phase.
    pub complete: bool,
}

/// The identity the login established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginIdentity {
    pub initiator_name: String,
    pub initiator_alias: Option<String>,
    pub isid: [u8; 6],
    pub session_type: SessionType,
    pub target: Option<TargetInfo>,
    /// The initiator proved its CHAP secret in the security stage (§12.1.3); `false` after
    /// AuthMethod=None.
    pub chap: bool,
}

/// The target's login state machine (§6): one per connection, from the first Login Request
/// until full feature phase or failure.
#[derive(Debug)]
pub struct Login {
    /// Stage the next request must be in (CSG), once the first request fixed it.
    stage: Option<Stage>,
    isid: [u8; 6],
    initiator_name: Option<String>,
    initiator_alias: Option<String>,
    session_type: Option<SessionType>,
    target: Option<TargetInfo>,
    /// Text of a request arriving in pieces (C bit), bounded by `max_text`.
    rx_text: Vec<u8>,
    max_text: usize,
    /// The rest of a response too long for one PDU, and the transition it ends with.
    tx_rest: Bytes,
    tx_transit: Option<Stage>,
    first_response_sent: bool,
    /// Operational negotiation of this login.
    pub negotiation: Negotiation,
    /// Security-stage authentication (§6.2, §12.1).
    auth: Auth,
    /// CHAP a discovery session must pass, if any.
    discovery_chap: Option<ChapConfig>,
    /// Per-initiator CHAP failure limiter shared by the portal's connections.
    limiter: Option<Arc<Mutex<AuthLimiter>>>,
    /// Time of the request being handled (for the limiter), set by the owner.
    now: Option<Instant>,
}

/// Where authentication stands.
#[derive(Debug)]
enum Auth {
    /// No AuthMethod agreed yet.
    Open,
    /// AuthMethod=None agreed (only when no CHAP is configured).
    None,
    /// AuthMethod=CHAP agreed; the exchange runs (or has succeeded).
    Chap(Box<ChapTarget>),
}

impl Login {
    pub fn new(offers: Offers, max_data_segment: u32, max_text: u32) -> Self {
        Login {
            stage: None,
            isid: [0; 6],
            initiator_name: None,
            initiator_alias: None,
            session_type: None,
            target: None,
            rx_text: Vec::new(),
            max_text: usize::try_from(max_text).unwrap_or(usize::MAX),
            tx_rest: Bytes::new(),
            tx_transit: None,
            first_response_sent: false,
            negotiation: Negotiation::new(offers, max_data_segment),
            auth: Auth::Open,
            discovery_chap: None,
            limiter: None,
            now: None,
        }
    }

    /// Require CHAP for discovery sessions (`discovery`) and rate-limit CHAP failures through
    /// `limiter`. Normal sessions use their target's [`TargetInfo::chap`].
    pub fn with_auth(
        mut self,
        discovery: Option<ChapConfig>,
        limiter: Option<Arc<Mutex<AuthLimiter>>>,
    ) -> Self {
        self.discovery_chap = discovery;
        self.limiter = limiter;
        self
    }

    /// The time the next request arrives at (the owner's `now`; used by the CHAP limiter).
    pub fn set_now(&mut self, now: Instant) {
        self.now = Some(now);
    }

    /// The CHAP configuration this login must pass, once the session type and target are known.
    fn chap_config(&self) -> Option<&ChapConfig> {
        match self.session_type? {
            SessionType::Discovery => self.discovery_chap.as_ref(),
            SessionType::Normal => self.target.as_ref()?.chap.as_ref(),
        }
    }

    /// Authentication is complete, or none is required.
    fn authenticated(&self) -> bool {
        match &self.auth {
            Auth::Chap(t) => t.is_done(),
            Auth::Open | Auth::None => self.chap_config().is_none(),
        }
    }

    /// Who logged in (meaningful once a reply had `complete`).
    pub fn identity(&self) -> Option<LoginIdentity> {
        Some(LoginIdentity {
            initiator_name: self.initiator_name.clone()?,
            initiator_alias: self.initiator_alias.clone(),
            isid: self.isid,
            session_type: self.session_type?,
            target: self.target.clone(),
            chap: matches!(&self.auth, Auth::Chap(t) if t.is_done()),
        })
    }

    fn fail(&self, csg: Stage, status: LoginStatus) -> LoginReply {
        LoginReply {
            transit: false,
            continue_: false,
            csg,
            nsg: csg,
            status,
            data: Bytes::new(),
            complete: false,
        }
    }

    /// Answer one Login Request (§6.1–§6.3, §11.12, §11.13). `targets` are the portal's targets,
    /// `portal_group_tag` the tag reported for normal sessions.
    pub fn on_request(
        &mut self,
        req: &LoginRequest,
        data: &Bytes,
        targets: &[TargetInfo],
        portal_group_tag: u16,
    ) -> LoginReply {
        let first = self.stage.is_none();
        if first {
            // §11.12.4/§11.13.3: we speak version 0x00 only.
            if req.version_min > 0 {
                return self.fail(req.csg, LoginStatus::UNSUPPORTED_VERSION);
            }
            if req.tsih != 0 {
                // Adding a connection to / reinstating an existing session needs MC/S or ERL 2.
                return self.fail(req.csg, LoginStatus::SESSION_DOES_NOT_EXIST);
            }
            self.isid = req.isid;
        } else if req.isid != self.isid {
            return self.fail(req.csg, LoginStatus::INITIATOR_ERROR);
        }
        let expected = self.stage.unwrap_or(req.csg);
        if !matches!(req.csg, Stage::Security | Stage::Operational) || req.csg != expected {
            return self.fail(req.csg, LoginStatus::INITIATOR_ERROR);
        }
        if req.transit && (req.continue_ || !stage_after(req.csg, req.nsg)) {
            return self.fail(req.csg, LoginStatus::INITIATOR_ERROR);
        }
        self.stage = Some(req.csg);

        // Our previous response is still being delivered in pieces: the initiator sends empty
        // requests to fetch each piece (§6.3 / §11.13.2 C bit).
        if !self.tx_rest.is_empty() {
            return self.next_piece(req.csg);
        }

        // The initiator's text arrives in pieces: collect, answer each with an empty response.
        if self.rx_text.len().saturating_add(data.len()) > self.max_text {
            return self.fail(req.csg, LoginStatus::INITIATOR_ERROR);
        }
        self.rx_text.extend_from_slice(data);
        if req.continue_ {
            return LoginReply {
                transit: false,
                continue_: false,
                csg: req.csg,
                nsg: req.csg,
                status: LoginStatus::SUCCESS,
                data: Bytes::new(),
                complete: false,
            };
        }
        let whole = std::mem::take(&mut self.rx_text);
        let Ok(pairs) = text::parse(&whole) else {
            return self.fail(req.csg, LoginStatus::INITIATOR_ERROR);
        };
        // The identity keys come with the first complete text (which may have spanned PDUs).
        let first_text = self.initiator_name.is_none();
        match self.process_keys(req, &pairs, first_text, targets, portal_group_tag) {
            Ok(reply_pairs) => self.respond(req, reply_pairs),
            Err(status) => self.fail(req.csg, status),
        }
    }

    fn process_keys(
        &mut self,
        req: &LoginRequest,
        pairs: &[(String, String)],
        first: bool,
        targets: &[TargetInfo],
        portal_group_tag: u16,
    ) -> Result<Vec<(String, String)>, LoginStatus> {
        let find = |k: &str| {
            pairs
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        if first {
            let name = find("InitiatorName").ok_or(LoginStatus::MISSING_PARAMETER)?;
            if name.is_empty() {
                return Err(LoginStatus::MISSING_PARAMETER);
            }
            self.initiator_name = Some(name.to_string());
            let session_type = match find("SessionType") {
                None | Some("Normal") => SessionType::Normal,
                Some("Discovery") => SessionType::Discovery,
                Some(_) => return Err(LoginStatus::SESSION_TYPE_NOT_SUPPORTED),
            };
            self.session_type = Some(session_type);
            if session_type == SessionType::Normal {
                let name = find("TargetName").ok_or(LoginStatus::MISSING_PARAMETER)?;
                let target = targets
                    .iter()
                    .find(|t| t.name == name)
                    .ok_or(LoginStatus::NOT_FOUND)?;
                let initiator = self.initiator_name.as_deref().unwrap_or_default();
                if !target.acl.allows(initiator) {
                    // §11.13.5 status 0202: this initiator may not use this target.
                    tracing::debug!(initiator, target = %target.name, "login refused by the target's ACL");
                    return Err(LoginStatus::AUTHORIZATION_FAILURE);
                }
                self.target = Some(target.clone());
            }
        }
        let discovery = self.session_type == Some(SessionType::Discovery);
        if req.csg != Stage::Security && !self.authenticated() {
            // §6.2: with CHAP configured, the operational stage is reached only through it.
            tracing::debug!(initiator = ?self.initiator_name, "login skipped required CHAP");
            return Err(LoginStatus::AUTHENTICATION_FAILURE);
        }
        let mut out = Vec::new();
        for (key, value) in pairs {
            match key.as_str() {
                "InitiatorName" | "TargetName" | "SessionType" => {}
                "InitiatorAlias" => self.initiator_alias = Some(value.clone()),
                "AuthMethod" => {
                    if req.csg != Stage::Security {
                        out.push((key.clone(), IRRELEVANT.to_string()));
                    } else {
                        out.push((key.clone(), self.select_auth_method(value)?.to_string()));
                    }
                }
                k if chap::is_chap_key(k) => {
                    // Handled together below, once AuthMethod (possibly in this text) is settled.
                    if req.csg != Stage::Security || !matches!(self.auth, Auth::Chap(_)) {
                        return Err(LoginStatus::AUTHENTICATION_FAILURE);
                    }
                }
                "SendTargets" => out.push((key.clone(), IRRELEVANT.to_string())),
                _ => {
                    if let Some(reply) = self.negotiation.respond(key, value, discovery) {
                        out.push((key.clone(), reply));
                    }
                }
            }
        }
        if req.csg == Stage::Security {
            out.extend(self.run_chap(pairs)?);
            if req.transit && matches!(self.auth, Auth::Open) && self.chap_config().is_some() {
                // Leaving the security stage without even choosing CHAP.
                tracing::debug!(initiator = ?self.initiator_name, "login without AuthMethod=CHAP");
                return Err(LoginStatus::AUTHENTICATION_FAILURE);
            }
        }
        if !self.first_response_sent && !discovery {
            // §13.9: TargetPortalGroupTag in the first Login Response of a normal session.
            out.push((
                "TargetPortalGroupTag".to_string(),
                portal_group_tag.to_string(),
            ));
            if let Some(alias) = self.target.as_ref().and_then(|t| t.alias.clone()) {
                out.push(("TargetAlias".to_string(), alias));
            }
        }
        if req.csg == Stage::Operational {
            out.extend(self.negotiation.target_offers(discovery));
        }
        Ok(out)
    }

    fn respond(&mut self, req: &LoginRequest, pairs: Vec<(String, String)>) -> LoginReply {
        self.first_response_sent = true;
        // §12.1.3: the security stage ends only once CHAP (if required) has succeeded.
        let transit = (req.transit && !self.negotiation.awaiting_answers() && self.authenticated())
            .then_some(req.nsg);
        self.tx_rest = Bytes::from(text::encode(&pairs));
        self.tx_transit = transit;
        self.next_piece(req.csg)
    }

    fn next_piece(&mut self, csg: Stage) -> LoginReply {
        let take = self.tx_rest.len().min(LOGIN_MAX_SEGMENT);
        let data = self.tx_rest.split_to(take);
        let more = !self.tx_rest.is_empty();
        let transit = if more { None } else { self.tx_transit.take() };
        if let Some(nsg) = transit {
            self.stage = Some(nsg);
        }
        let complete = transit == Some(Stage::FullFeature);
        if complete {
            self.negotiation.finish();
        }
        LoginReply {
            transit: transit.is_some(),
            continue_: more,
            csg,
            nsg: transit.unwrap_or(csg),
            status: LoginStatus::SUCCESS,
            data,
            complete,
        }
    }
}

impl Login {
    /// Answer an AuthMethod offer (§12.1): CHAP when it is configured for this session, else
    /// None; a list without the method we need fails with 0201.
    fn select_auth_method(&mut self, offered: &str) -> Result<&'static str, LoginStatus> {
        if !matches!(self.auth, Auth::Open) {
            // AuthMethod is negotiated once (§6.2).
            return Err(LoginStatus::INITIATOR_ERROR);
        }
        let offers = |m: &str| offered.split(',').any(|o| o == m);
        if self.chap_config().is_some() && self.locked_out() {
            // Its answer would be refused unchecked anyway: refuse before issuing a challenge,
            // which keeps a guessing storm cheap for the target.
            tracing::debug!(initiator = ?self.initiator_name, "CHAP refused during backoff");
            return Err(LoginStatus::AUTHENTICATION_FAILURE);
        }
        match self.chap_config() {
            Some(config) if offers("CHAP") => {
                self.auth = Auth::Chap(Box::new(ChapTarget::new(config.clone())));
                Ok("CHAP")
            }
            None if offers("None") => {
                self.auth = Auth::None;
                Ok("None")
            }
            required => {
                tracing::debug!(
                    initiator = ?self.initiator_name,
                    chap_required = required.is_some(),
                    "no acceptable AuthMethod offered"
                );
                Err(LoginStatus::AUTHENTICATION_FAILURE)
            }
        }
    }

    /// The initiator is in its CHAP failure backoff ([`AuthLimiter`]).
    fn locked_out(&self) -> bool {
        let (Some(limiter), Some(now), Some(name)) =
            (&self.limiter, self.now, &self.initiator_name)
        else {
            return false;
        };
        !limiter
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .admit(name, now)
    }

    /// Feed this text's CHAP keys to the CHAP exchange, under the failure limiter.
    fn run_chap(
        &mut self,
        pairs: &[(String, String)],
    ) -> Result<Vec<(String, String)>, LoginStatus> {
        let Auth::Chap(target) = &mut self.auth else {
            return Ok(Vec::new());
        };
        let chap_pairs: Vec<(String, String)> = pairs
            .iter()
            .filter(|(k, _)| chap::is_chap_key(k))
            .cloned()
            .collect();
        let initiator = self.initiator_name.as_deref().unwrap_or_default();
        // One lock across admission, check and bookkeeping: parallel connections of one name
        // cannot slip extra guesses in between.
        let mut guard = match (&self.limiter, self.now) {
            (Some(l), Some(now)) => Some((l.lock().unwrap_or_else(|e| e.into_inner()), now)),
            _ => None,
        };
        let mut checked = false;
        let result = target.on_keys(&chap_pairs, &mut || {
            checked = true;
            match &guard {
                Some((g, now)) => g.admit(initiator, *now),
                None => true,
            }
        });
        match result {
            Ok(reply) => {
                if reply.done && checked {
                    if let Some((g, _)) = guard.as_mut() {
                        g.record_success(initiator);
                    }
                }
                Ok(reply.keys)
            }
            Err(e) => {
                if let Some((g, now)) = guard.as_mut() {
                    if checked && e != chap::ChapError::RateLimited {
                        g.record_failure(initiator, *now);
                    }
                }
                tracing::debug!(initiator, error = ?e, "CHAP authentication failed");
                Err(LoginStatus::AUTHENTICATION_FAILURE)
            }
        }
    }
}

/// A valid NSG for a transition out of `csg` (§6.3): strictly later, not the reserved stage.
fn stage_after(csg: Stage, nsg: Stage) -> bool {
    matches!(
        (csg, nsg),
        (Stage::Security, Stage::Operational)
            | (Stage::Security, Stage::FullFeature)
            | (Stage::Operational, Stage::FullFeature)
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::acl::Acl;
    use crate::chap::{decode_binary, encode_binary, ChapAlgorithm, Credentials, Secret};

    const TARGET: &str = "iqn.2026-11.io.ironlun:chap";
    const OPEN: &str = "iqn.2026-11.io.ironlun:open";
    const INITIATOR: &str = "iqn.2026-11.io.test:host";
    const SECRET: &str = "initiator-secret";
    const TARGET_SECRET: &str = "target-secret-x";

    fn chap_config() -> ChapConfig {
        ChapConfig {
            initiator: Credentials {
                user: "alice".into(),
                secret: Secret::new(SECRET),
            },
            target: Some(Credentials {
                user: "tgt".into(),
                secret: Secret::new(TARGET_SECRET),
            }),
        }
    }

    fn targets() -> Vec<TargetInfo> {
        let t = |name: &str, chap| TargetInfo {
            name: name.into(),
            alias: None,
            addresses: Vec::new(),
            portal_group_tag: 1,
            acl: Acl::allow_all(),
            chap,
        };
        vec![t(TARGET, Some(chap_config())), t(OPEN, None)]
    }

    struct Driver {
        login: Login,
        targets: Vec<TargetInfo>,
        now: Instant,
    }

    impl Driver {
        fn new(limiter: &Arc<Mutex<AuthLimiter>>, discovery: Option<ChapConfig>) -> Self {
            Driver {
                login: Login::new(Offers::default(), 8192, 65536)
                    .with_auth(discovery, Some(Arc::clone(limiter))),
                targets: targets(),
                now: Instant::now(),
            }
        }

        fn send(&mut self, csg: Stage, transit: bool, pairs: &[(&str, &str)]) -> LoginReply {
            let nsg = if csg == Stage::Security {
                Stage::Operational
            } else {
                Stage::FullFeature
            };
            let req = LoginRequest {
                transit,
                csg,
                nsg,
                isid: [0x80, 0, 0, 0, 0, 1],
                ..Default::default()
            };
            let owned: Vec<(String, String)> = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let data = Bytes::from(text::encode(&owned));
            self.login.set_now(self.now);
            self.login.on_request(&req, &data, &self.targets, 1)
        }
    }

    fn keys(r: &LoginReply) -> Vec<(String, String)> {
        text::parse(&r.data).unwrap()
    }

    fn key(r: &LoginReply, k: &str) -> Option<String> {
        keys(r)
            .into_iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v)
    }

    fn first(target: &str) -> Vec<(&str, &str)> {
        vec![
            ("InitiatorName", INITIATOR),
            ("TargetName", target),
            ("AuthMethod", "CHAP,None"),
        ]
    }

    /// AuthMethod + CHAP_A; returns (algorithm, id, challenge).
    fn start(d: &mut Driver, list: &str) -> (ChapAlgorithm, u8, Vec<u8>) {
        let r = d.send(Stage::Security, false, &first(TARGET));
        assert_eq!(r.status, LoginStatus::SUCCESS);
        assert_eq!(key(&r, "AuthMethod").as_deref(), Some("CHAP"));
        let r = d.send(Stage::Security, false, &[("CHAP_A", list)]);
        assert_eq!(r.status, LoginStatus::SUCCESS);
        let alg = ChapAlgorithm::from_code(key(&r, "CHAP_A").unwrap().parse().unwrap()).unwrap();
        let id = key(&r, "CHAP_I").unwrap().parse().unwrap();
        let c = decode_binary(&key(&r, "CHAP_C").unwrap()).unwrap();
        (alg, id, c)
    }

    fn answer(alg: ChapAlgorithm, id: u8, c: &[u8], secret: &str) -> String {
        encode_binary(&alg.response(id, &Secret::new(secret), c))
    }

    #[test]
    fn accepts_chap_login_and_transits_only_after_success() {
        let limiter = Arc::default();
        let mut d = Driver::new(&limiter, None);
        let r = d.send(Stage::Security, true, &first(TARGET));
        assert!(!r.transit, "no transit before CHAP");
        let r = d.send(Stage::Security, true, &[("CHAP_A", "7,5")]);
        assert!(!r.transit);
        assert_eq!(key(&r, "CHAP_A").as_deref(), Some("7"));
        let id: u8 = key(&r, "CHAP_I").unwrap().parse().unwrap();
        let c = decode_binary(&key(&r, "CHAP_C").unwrap()).unwrap();
        let resp = answer(ChapAlgorithm::Sha256, id, &c, SECRET);
        let r = d.send(
            Stage::Security,
            true,
            &[("CHAP_N", "alice"), ("CHAP_R", &resp)],
        );
        assert_eq!(r.status, LoginStatus::SUCCESS);
        assert!(r.transit && r.nsg == Stage::Operational);
        let r = d.send(Stage::Operational, true, &[]);
        assert_eq!(r.status, LoginStatus::SUCCESS);
        assert!(r.complete);
    }

    #[test]
    fn accepts_mutual_chap() {
        let limiter = Arc::default();
        let mut d = Driver::new(&limiter, None);
        let (alg, id, c) = start(&mut d, "5");
        let their_c = [0x55u8; 16];
        let r = d.send(
            Stage::Security,
            true,
            &[
                ("CHAP_N", "alice"),
                ("CHAP_R", &answer(alg, id, &c, SECRET)),
                ("CHAP_I", "3"),
                ("CHAP_C", &encode_binary(&their_c)),
            ],
        );
        assert_eq!(r.status, LoginStatus::SUCCESS);
        assert!(r.transit);
        assert_eq!(key(&r, "CHAP_N").as_deref(), Some("tgt"));
        assert_eq!(
            key(&r, "CHAP_R").unwrap(),
            answer(alg, 3, &their_c, TARGET_SECRET)
        );
    }

    #[test]
    fn rejects_wrong_secret_with_authentication_failure() {
        let limiter = Arc::default();
        let mut d = Driver::new(&limiter, None);
        let (alg, id, c) = start(&mut d, "5");
        let r = d.send(
            Stage::Security,
            true,
            &[
                ("CHAP_N", "alice"),
                ("CHAP_R", &answer(alg, id, &c, "not-the-secret")),
            ],
        );
        assert_eq!(r.status, LoginStatus::AUTHENTICATION_FAILURE);
    }

    #[test]
    fn rejects_login_without_chap_when_configured() {
        let limiter = Arc::default();
        let cases: &[(Stage, &[(&str, &str)])] = &[
            // Only None offered.
            (
                Stage::Security,
                &[
                    ("InitiatorName", INITIATOR),
                    ("TargetName", TARGET),
                    ("AuthMethod", "None"),
                ],
            ),
            // No AuthMethod, straight out of the security stage.
            (
                Stage::Security,
                &[("InitiatorName", INITIATOR), ("TargetName", TARGET)],
            ),
            // Starting in the operational stage.
            (
                Stage::Operational,
                &[("InitiatorName", INITIATOR), ("TargetName", TARGET)],
            ),
        ];
        for (csg, pairs) in cases {
            let mut d = Driver::new(&limiter, None);
            let r = d.send(*csg, true, pairs);
            assert_eq!(r.status, LoginStatus::AUTHENTICATION_FAILURE, "{pairs:?}");
        }
    }

    #[test]
    fn rejects_chap_keys_without_chap_and_unknown_algorithms() {
        let limiter = Arc::default();
        let mut d = Driver::new(&limiter, None);
        let r = d.send(
            Stage::Security,
            false,
            &[
                ("InitiatorName", INITIATOR),
                ("TargetName", OPEN),
                ("AuthMethod", "None"),
                ("CHAP_A", "5"),
            ],
        );
        assert_eq!(r.status, LoginStatus::AUTHENTICATION_FAILURE);

        let mut d = Driver::new(&limiter, None);
        d.send(Stage::Security, false, &first(TARGET));
        let r = d.send(Stage::Security, false, &[("CHAP_A", "4,99")]);
        assert_eq!(r.status, LoginStatus::AUTHENTICATION_FAILURE);
    }

    #[test]
    fn answers_unknown_and_extension_keys_not_understood() {
        let limiter = Arc::default();
        let mut d = Driver::new(&limiter, None);
        let unknown = [
            ("X#NodeArchitecture", "ExampleOS/1.0"),
            ("X-com.example.Tuning", "7"),
            ("NoSuchKey", "1"),
        ];
        let mut sec = first(OPEN);
        sec.extend_from_slice(&unknown);
        let r = d.send(Stage::Security, true, &sec);
        assert_eq!(r.status, LoginStatus::SUCCESS);
        for (k, _) in unknown {
            assert_eq!(key(&r, k).as_deref(), Some("NotUnderstood"), "{k}");
        }
        // The same in the operational stage, and the login completes.
        let r = d.send(Stage::Operational, true, &unknown);
        assert_eq!(r.status, LoginStatus::SUCCESS);
        for (k, _) in unknown {
            assert_eq!(key(&r, k).as_deref(), Some("NotUnderstood"), "{k}");
        }
        assert!(r.complete);
    }

    #[test]
    fn open_target_still_negotiates_none() {
        let limiter = Arc::default();
        let mut d = Driver::new(&limiter, None);
        let r = d.send(Stage::Security, true, &first(OPEN));
        assert_eq!(key(&r, "AuthMethod").as_deref(), Some("None"));
        assert!(r.transit);
    }

    #[test]
    fn discovery_chap_is_required_when_configured() {
        let limiter = Arc::default();
        let disc = [
            ("InitiatorName", INITIATOR),
            ("SessionType", "Discovery"),
            ("AuthMethod", "None"),
        ];
        let mut d = Driver::new(&limiter, Some(chap_config()));
        assert_eq!(
            d.send(Stage::Security, true, &disc).status,
            LoginStatus::AUTHENTICATION_FAILURE
        );
        let mut d = Driver::new(&limiter, None);
        assert_eq!(
            d.send(Stage::Security, true, &disc).status,
            LoginStatus::SUCCESS
        );

        let mut d = Driver::new(&limiter, Some(chap_config()));
        let r = d.send(
            Stage::Security,
            false,
            &[
                ("InitiatorName", INITIATOR),
                ("SessionType", "Discovery"),
                ("AuthMethod", "CHAP"),
                ("CHAP_A", "5"),
            ],
        );
        assert_eq!(key(&r, "AuthMethod").as_deref(), Some("CHAP"));
        let id: u8 = key(&r, "CHAP_I").unwrap().parse().unwrap();
        let c = decode_binary(&key(&r, "CHAP_C").unwrap()).unwrap();
        let r = d.send(
            Stage::Security,
            true,
            &[
                ("CHAP_N", "alice"),
                ("CHAP_R", &answer(ChapAlgorithm::Md5, id, &c, SECRET)),
            ],
        );
        assert_eq!(r.status, LoginStatus::SUCCESS);
        assert!(r.transit);
    }

    #[test]
    fn limiter_refuses_guesses_during_backoff_but_not_other_initiators() {
        let limiter: Arc<Mutex<AuthLimiter>> = Arc::default();
        let t0 = Instant::now();
        // Login up to the challenge; the driver and the challenge, or the refusal.
        let begin = |name: &str, now: Instant| {
            let mut d = Driver::new(&limiter, None);
            d.now = now;
            let r = d.send(
                Stage::Security,
                false,
                &[
                    ("InitiatorName", name),
                    ("TargetName", TARGET),
                    ("AuthMethod", "CHAP"),
                    ("CHAP_A", "5"),
                ],
            );
            if r.status != LoginStatus::SUCCESS {
                return Err(r.status);
            }
            let id: u8 = key(&r, "CHAP_I").unwrap().parse().unwrap();
            let c = decode_binary(&key(&r, "CHAP_C").unwrap()).unwrap();
            Ok((d, id, c))
        };
        let finish = |(mut d, id, c): (Driver, u8, Vec<u8>), secret: &str| {
            let resp = answer(ChapAlgorithm::Md5, id, &c, secret);
            d.send(
                Stage::Security,
                true,
                &[("CHAP_N", "alice"), ("CHAP_R", &resp)],
            )
            .status
        };
        let attempt = |secret: &str, name: &str, now: Instant| match begin(name, now) {
            Ok(started) => finish(started, secret),
            Err(status) => status,
        };
        // An exchange that got its challenge before the backoff began.
        let early = begin(INITIATOR, t0).unwrap();
        for _ in 0..4 {
            assert_eq!(
                attempt("bad-secret-xx", INITIATOR, t0),
                LoginStatus::AUTHENTICATION_FAILURE
            );
        }
        // In backoff: even the right secret is refused unchecked, at its answer…
        assert_eq!(finish(early, SECRET), LoginStatus::AUTHENTICATION_FAILURE);
        // …or before a challenge is even issued…
        assert_eq!(
            begin(INITIATOR, t0).err(),
            Some(LoginStatus::AUTHENTICATION_FAILURE)
        );
        assert_eq!(
            attempt(SECRET, INITIATOR, t0),
            LoginStatus::AUTHENTICATION_FAILURE
        );
        // …another initiator is not affected…
        assert_eq!(
            attempt(SECRET, "iqn.2026-11.io.test:other", t0),
            LoginStatus::SUCCESS
        );
        // …and after the backoff (under a second) the right secret works again.
        let later = t0 + std::time::Duration::from_secs(1);
        assert_eq!(attempt(SECRET, INITIATOR, later), LoginStatus::SUCCESS);
        assert!(limiter.lock().unwrap().is_empty());
    }
}
