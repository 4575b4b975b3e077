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

use crate::connection::TargetInfo;
use crate::negotiation::{Negotiation, Offers, IRRELEVANT};
use crate::pdu::{LoginRequest, Stage};
use crate::text;
use bytes::Bytes;

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
        let mut out = Vec::new();
        for (key, value) in pairs {
            match key.as_str() {
                "InitiatorName" | "TargetName" | "SessionType" => {}
                "InitiatorAlias" => self.initiator_alias = Some(value.clone()),
                "AuthMethod" => {
                    if req.csg != Stage::Security {
                        out.push((key.clone(), IRRELEVANT.to_string()));
                    } else if value.split(',').any(|m| m == "None") {
                        out.push((key.clone(), "None".to_string()));
                    } else {
                        // Only methods we do not implement (e.g. CHAP) were offered.
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
        let transit = (req.transit && !self.negotiation.awaiting_answers()).then_some(req.nsg);
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

/// A valid NSG for a transition out of `csg` (§6.3): strictly later, not the reserved stage.
fn stage_after(csg: Stage, nsg: Stage) -> bool {
    matches!(
        (csg, nsg),
        (Stage::Security, Stage::Operational)
            | (Stage::Security, Stage::FullFeature)
            | (Stage::Operational, Stage::FullFeature)
    )
}
