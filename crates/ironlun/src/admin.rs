//! The admin API: HTTP/1.1 with JSON bodies, served by the daemon with hyper on an owner-only
//! Unix socket by default (`<data_dir>/admin.sock`, or `$RUNTIME_DIRECTORY/admin.sock` under
//! systemd), or on TCP when `[admin] listen = "IP:PORT"` and a token are configured.
//! `ironlun ctl` (`ironlun-cli`) is its client; the bodies are `ironlun-api` types.
//!
//! Endpoints (all answering `application/json`):
//! - `GET /v1/health` → `{"status":"ok","version":"…"}`;
//! - `GET /v1/reservations` → `{"luns":[…]}`, the reservation state of every LU of every target;
//! - `GET /v1/reservations/<target>/<lun>` → one LU ([`LuReservations`]); 404 when unknown;
//! - `GET /v1/luns/<target>/<lun>/ownership` → [`OwnershipJson`] (target-managed owner, epoch,
//!   PRgeneration, handover in progress, `next_epoch` for the next handover; semantics.md §3);
//! - `POST /v1/luns/<target>/<lun>/owner` `{"host","epoch"}` → [`OwnerJson`];
//! - `POST /v1/luns/<target>/<lun>/handover/prepare|commit|abort` [`HandoverRequest`] →
//!   [`PrepareJson`], [`CommitJson`] (per-step µs timings), [`OwnerJson`];
//! - `GET /v1/events?since=SEQ` → [`EventsJson`] (bounded ring buffer of PR OUT, ownership and
//!   handover events);
//! - `GET /v1/port-groups`, `PUT /v1/port-groups/<id>` `{"state"}` → ALUA target port groups
//!   (`admin/port_groups.rs`);
//! - the live reconfiguration routes of `admin/reconfig.rs`.
//!
//! Errors are `{"error":"…","code":"…"}` with a 4xx/5xx status; refused ownership steps are
//! 409 with the code naming the reason ([`op_error`]), malformed bodies 400. With
//! `[admin] token_file` every request needs `Authorization: Bearer <token>` (RFC 6750 §2.1),
//! else 401; the token is compared in constant time ([`Token::admits`]).
//!
//! Transport contract ([`AdminServer::run`]): HTTP/1.1 with keep-alive; a request head must
//! arrive within [`HEADER_READ_TIMEOUT`] (an idle keep-alive connection is closed after it too)
//! and fit in [`MAX_HEAD`] bytes and [`MAX_HEADERS`] fields; a body is at most [`MAX_BODY`]
//! bytes and must arrive within [`BODY_TIMEOUT`]; a connection serves at most
//! [`MAX_REQUESTS_PER_CONNECTION`] requests. At most [`MAX_CONNECTIONS`] connections are kept:
//! a new one beyond that closes the oldest connection that has no request in a handler, so
//! slow or idle clients never lock out a new one (a handover commit in progress is never cut).

mod port_groups;
mod reconfig;

use crate::config::{self, AdminListen};
use crate::reconfig::Live;
use crate::target::{LunHandle, OwnershipOpError, Registry};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use ironlun_api::{
    fmt_key, percent_decode, CommitJson, ErrorJson, EventsJson, FailoverAllJson,
    FailoverAllRequest, FailoverJson, FailoverRefusedJson, FailoverRequest, HandoverJson,
    HandoverRequest, Health, LuReservations, OwnerJson, OwnerRequest, OwnershipJson, PrepareJson,
    RegistrationJson, ReleaseRequest, ReservationJson, ReservationsList, Token,
    DEFAULT_DEADLINE_MS, MAX_DEADLINE_MS,
};
use ironlun_scsi::pr::ownership::{Handover, OwnershipError};
use ironlun_scsi::pr::{PrSnapshot, ReservationType};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;

/// Largest request head (request line and header fields) accepted; beyond: 431. (hyper's
/// read buffer; its minimum is 8 KiB.)
pub const MAX_HEAD: usize = 16 * 1024;
/// Most header fields in a request; beyond: 431 (RFC 6585 §5).
pub const MAX_HEADERS: usize = 64;
/// Largest request body; beyond: 413.
pub const MAX_BODY: u64 = 64 * 1024;
/// A request head (or, on a kept-alive connection, the next one) must arrive within this;
/// then the connection is closed.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// A request body must arrive within this once its head is read (else 408).
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections kept at once. Beyond it, each new connection closes the oldest one that is
/// not running a handler ([`AdminServer::run`]).
pub const MAX_CONNECTIONS: usize = 256;
/// Requests served on one connection; the last answer carries `Connection: close`.
pub const MAX_REQUESTS_PER_CONNECTION: u64 = 1000;
/// How long shutdown lets connections in progress finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

// ---------------------------------------------------------------------------------------------
// The JSON views (`ironlun_api`) of the SCSI core's state.

/// The JSON view of a handover in progress; `None` when idle.
pub fn handover_json(h: &Handover) -> Option<HandoverJson> {
    let (state, (from, to, epoch)) = match h {
        Handover::Idle => return None,
        Handover::Prepared { .. } => ("prepared", h.parts()?),
        Handover::Fenced { .. } => ("fenced", h.parts()?),
    };
    Some(HandoverJson {
        state: state.into(),
        from: from.into(),
        to: to.into(),
        epoch,
    })
}

/// The JSON view of one LU's [`PrSnapshot`].
pub fn lu_reservations(target: &str, lun: u64, s: &PrSnapshot) -> LuReservations {
    let all_registrants = s.reservation.as_ref().is_some_and(|r| {
        matches!(
            r.ty,
            ReservationType::WriteExclusiveAllRegistrants
                | ReservationType::ExclusiveAccessAllRegistrants
        )
    });
    let reservation = s.reservation.as_ref().map(|r| ReservationJson {
        type_code: r.ty.code(),
        type_name: r.ty.name().to_string(),
        scope: if r.scope == 0 {
            "LU_SCOPE".to_string()
        } else {
            format!("0x{:x}", r.scope)
        },
        key: fmt_key(r.key),
        holder: if all_registrants {
            None
        } else {
            s.registrations
                .iter()
                .find(|g| g.holder)
                .map(|g| g.initiator_port.clone())
        },
    });
    LuReservations {
        target: target.to_string(),
        lun,
        generation: s.generation,
        aptpl: s.aptpl,
        reservation,
        registrations: s
            .registrations
            .iter()
            .map(|g| RegistrationJson {
                initiator_port: g.initiator_port.clone(),
                key: fmt_key(g.key),
                target_port: match g.rtpi {
                    Some(r) => format!("{target},t,0x{r:04x}"),
                    None => "all".to_string(),
                },
                rtpi: g.rtpi,
                holder: g.holder,
            })
            .collect(),
        spc2_holder: s.spc2_holder.clone(),
        owner: s.owner.clone(),
        epoch: s.epoch,
        handover: handover_json(&s.handover),
    }
}

// ---------------------------------------------------------------------------------------------
// Requests as the handlers see them.

/// The parts of a request the handlers read (built from hyper's request head by the server,
/// or directly by tests and the fuzz target).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The path of the origin-form request target, still percent-encoded, without the query.
    pub path: String,
    /// The query (after `?`), still percent-encoded.
    pub query: Option<String>,
    /// `Authorization` field value, if present.
    pub authorization: Option<String>,
}

/// A request refused before routing: the status to answer and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpError {
    pub status: u16,
    pub message: String,
    /// For 405: the method the resource allows.
    pub allow: Option<&'static str>,
}

impl HttpError {
    fn new(status: u16, message: impl Into<String>) -> Self {
        HttpError {
            status,
            message: message.into(),
            allow: None,
        }
    }
}

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Health,
    Reservations,
    Reservation {
        target: String,
        lun: u64,
    },
    Ownership {
        target: String,
        lun: u64,
    },
    Owner {
        target: String,
        lun: u64,
    },
    Handover {
        target: String,
        lun: u64,
        step: HandoverStep,
    },
    /// `POST /v1/luns/<t>/<l>/release`.
    Release {
        target: String,
        lun: u64,
    },
    /// `POST /v1/luns/<t>/<l>/failover` (issue 19).
    Failover {
        target: String,
        lun: u64,
    },
    /// `POST /v1/failover`: every LU a failed host owns.
    FailoverAll,
    Events,
    PortGroups,
    PortGroup(String),
    /// `GET /v1/cluster` (cluster mode).
    Cluster,
    /// `PUT /v1/cluster/luns/<t>/<l>/active` (cluster mode).
    ClusterActive {
        target: String,
        lun: u64,
    },
    /// `GET /metrics` (Prometheus text format, [`crate::metrics`]).
    Metrics,
}

/// A handover step of `POST /v1/luns/<t>/<l>/handover/<step>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandoverStep {
    Prepare,
    Commit,
    Abort,
}

/// The target name and LUN of a path.
fn lu_of(t: &str, l: &str) -> Result<(String, u64), HttpError> {
    let target = percent_decode(t)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| HttpError::new(400, "bad target name in path"))?;
    let lun = l
        .parse::<u64>()
        .map_err(|_| HttpError::new(404, format!("no such LUN: {l:?}")))?;
    Ok((target, lun))
}

/// Map a path to a [`Route`] (404 when none matches) and check the method (405).
pub fn route(method: &str, path: &str) -> Result<Route, HttpError> {
    let not_found = || HttpError::new(404, format!("no such resource: {path}"));
    let segs: Vec<&str> = path
        .strip_prefix('/')
        .ok_or_else(not_found)?
        .split('/')
        .collect();
    let (r, allowed) = match segs.as_slice() {
        ["v1", "health"] => (Route::Health, "GET"),
        ["metrics"] => (Route::Metrics, "GET"),
        ["v1", "reservations"] => (Route::Reservations, "GET"),
        ["v1", "events"] => (Route::Events, "GET"),
        ["v1", "port-groups"] => (Route::PortGroups, "GET"),
        ["v1", "port-groups", id] => (Route::PortGroup((*id).to_string()), "PUT"),
        ["v1", "cluster"] => (Route::Cluster, "GET"),
        ["v1", "cluster", "luns", t, l, "active"] => {
            let (target, lun) = lu_of(t, l)?;
            (Route::ClusterActive { target, lun }, "PUT")
        }
        ["v1", "reservations", t, l] => {
            let (target, lun) = lu_of(t, l)?;
            (Route::Reservation { target, lun }, "GET")
        }
        ["v1", "luns", t, l, "ownership"] => {
            let (target, lun) = lu_of(t, l)?;
            (Route::Ownership { target, lun }, "GET")
        }
        ["v1", "luns", t, l, "owner"] => {
            let (target, lun) = lu_of(t, l)?;
            (Route::Owner { target, lun }, "POST")
        }
        ["v1", "failover"] => (Route::FailoverAll, "POST"),
        ["v1", "luns", t, l, "release"] => {
            let (target, lun) = lu_of(t, l)?;
            (Route::Release { target, lun }, "POST")
        }
        ["v1", "luns", t, l, "failover"] => {
            let (target, lun) = lu_of(t, l)?;
            (Route::Failover { target, lun }, "POST")
        }
        ["v1", "luns", t, l, "handover", step] => {
            let step = match *step {
                "prepare" => HandoverStep::Prepare,
                "commit" => HandoverStep::Commit,
                "abort" => HandoverStep::Abort,
                _ => return Err(not_found()),
            };
            let (target, lun) = lu_of(t, l)?;
            (Route::Handover { target, lun, step }, "POST")
        }
        _ => return Err(not_found()),
    };
    if method != allowed {
        let mut e = HttpError::new(
            405,
            format!("method {method} not allowed here ({allowed} only)"),
        );
        e.allow = Some(allowed);
        return Err(e);
    }
    Ok(r)
}

/// A response ready to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
    /// The `Allow` field of a 405 (RFC 9110 §10.2.1).
    pub allow: &'static str,
    /// The `Content-Type` field.
    pub content_type: &'static str,
}

/// The exposition of the live registry and the daemon-wide metrics.
fn render_metrics(registry: &Registry) -> String {
    let targets = registry.targets();
    let lun_sets: Vec<(&str, Arc<crate::target::LunMap>)> = targets
        .iter()
        .map(|t| (t.name.as_str(), t.luns()))
        .collect();
    let luns: Vec<(&str, u64, &crate::metrics::LuMetrics)> = lun_sets
        .iter()
        .flat_map(|(name, luns)| luns.iter().map(|(id, l)| (*name, *id, &*l.metrics)))
        .collect();
    crate::metrics::render_parts(&luns, &crate::metrics::DAEMON)
}

/// `Content-Type` of every response but `/metrics`.
pub const JSON: &str = "application/json";

impl Response {
    /// The Prometheus exposition of `registry` ([`crate::metrics`]).
    pub fn metrics(registry: &Registry) -> Response {
        Response {
            status: 200,
            body: render_metrics(registry).into_bytes(),
            allow: "GET",
            content_type: crate::metrics::CONTENT_TYPE,
        }
    }

    /// `v` as pretty JSON with `status` (500 if it cannot be encoded).
    pub(crate) fn json<T: Serialize>(status: u16, v: &T) -> Response {
        match serde_json::to_vec_pretty(v) {
            Ok(mut body) => {
                body.push(b'\n');
                Response {
                    status,
                    body,
                    allow: "GET",
                    content_type: JSON,
                }
            }
            Err(e) => Response::error(500, &format!("cannot encode JSON: {e}")),
        }
    }

    /// An error with the generic code of its status ([`status_code`]).
    pub fn error(status: u16, message: &str) -> Response {
        Response::error_code(status, status_code(status), message)
    }

    /// `{"error": message, "code": code}`.
    pub fn error_code(status: u16, code: &str, message: &str) -> Response {
        let mut body = serde_json::to_vec(&ErrorJson {
            error: message.to_string(),
            code: code.to_string(),
        })
        .unwrap_or_else(|_| b"{\"error\":\"?\"}".to_vec());
        body.push(b'\n');
        Response {
            status,
            body,
            allow: "GET",
            content_type: JSON,
        }
    }

    /// The HTTP response: status, `Content-Type`, `Cache-Control: no-store`, and
    /// `WWW-Authenticate` on 401 (RFC 6750 §3) / `Allow` on 405 (RFC 9110 §10.2.1). A status
    /// outside 100..=999 (never built here) becomes 500.
    pub fn into_http(self) -> hyper::Response<Full<Bytes>> {
        use hyper::header::{HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_TYPE, WWW_AUTHENTICATE};
        let status = hyper::StatusCode::from_u16(self.status)
            .unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
        let mut r = hyper::Response::new(Full::new(Bytes::from(self.body)));
        *r.status_mut() = status;
        let h = r.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static(self.content_type));
        h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        match self.status {
            401 => {
                h.insert(
                    WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"ironlun\""),
                );
            }
            405 => {
                h.insert(ALLOW, HeaderValue::from_static(self.allow));
            }
            _ => {}
        }
        r
    }
}

impl From<HttpError> for Response {
    fn from(e: HttpError) -> Self {
        let mut r = Response::error(e.status, &e.message);
        if let Some(a) = e.allow {
            r.allow = a;
        }
        r
    }
}

/// The `code` of an error that has no more specific one (hyper answers malformed heads,
/// 431 and 505 itself, with no body).
pub fn status_code(status: u16) -> &'static str {
    match status {
        400 => "bad_request",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "not_found",
        405 => "method_not_allowed",
        408 => "request_timeout",
        409 => "conflict",
        413 => "body_too_large",
        503 => "unavailable",
        _ => "internal",
    }
}

/// The status and code of a refused ownership or handover step: bad input is 400, a step
/// the LU's state refuses is 409, a local failure 500/503.
pub fn op_error(e: &OwnershipOpError) -> (u16, &'static str) {
    match e {
        OwnershipOpError::Ownership(o) => match o {
            OwnershipError::InvalidHost(_) => (400, "invalid_host"),
            OwnershipError::SameHost => (400, "same_host"),
            OwnershipError::StaleEpoch { .. } => (409, "stale_epoch"),
            OwnershipError::NotOwner { .. } => (409, "not_owner"),
            OwnershipError::DestinationNotLoggedIn(_) => (409, "destination_not_logged_in"),
            OwnershipError::HandoverInProgress(_) => (409, "handover_in_progress"),
            OwnershipError::NotPrepared(_) => (409, "not_prepared"),
            OwnershipError::NotFenced(_) => (409, "not_fenced"),
            OwnershipError::AlreadyCommitted(_) => (409, "committed"),
            OwnershipError::ForeignRegistrations(_) => (409, "foreign_registrations"),
            OwnershipError::Spc2Reserved => (409, "spc2_reserved"),
            OwnershipError::Aborted(_) => (409, "aborted"),
            OwnershipError::SourceLoggedIn(_) => (409, "live_session"),
        },
        OwnershipOpError::Cluster(_) => (503, "cluster_unavailable"),
        OwnershipOpError::DrainTimeout(_) => (409, "drain_timeout"),
        OwnershipOpError::AbortTimeout(_) => (503, "abort_timeout"),
        OwnershipOpError::Flush(_) => (500, "flush_failed"),
        OwnershipOpError::Persist(_) => (500, "persist_failed"),
        OwnershipOpError::Unsupported(_) => (400, "unsupported"),
    }
}

// ---------------------------------------------------------------------------------------------
// Bearer token.

/// The bearer-token check every request passes first: `Ok` without a configured token or
/// with the right `Authorization` value, else the 401 answer.
pub fn authorize(token: Option<&Token>, authorization: Option<&str>) -> Result<(), Response> {
    match token {
        Some(t) if !t.admits(authorization) => {
            Err(Response::error(401, "missing or wrong bearer token"))
        }
        _ => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------------
// Handling.

/// Answer a parsed request (with its body) against the registry. Ownership steps wait for
/// their effects (drain, flush, durable state) before answering.
pub async fn respond(
    req: &Request,
    body: &[u8],
    token: Option<&Token>,
    services: &Services,
) -> Response {
    if let Err(r) = authorize(token, req.authorization.as_deref()) {
        return r;
    }
    let registry = &*services.registry;
    // Live reconfiguration (LUNs, reload, config): its own routing table.
    if let Some(r) = reconfig::route(
        &req.method,
        &req.path,
        body,
        registry,
        services.live.as_ref(),
    )
    .await
    {
        return r;
    }
    let route = match route(&req.method, &req.path) {
        Ok(r) => r,
        Err(e) => return e.into(),
    };
    match route {
        Route::Metrics => Response::metrics(registry),
        Route::Health => Response::json(
            200,
            &Health {
                status: "ok".into(),
                version: env!("CARGO_PKG_VERSION").into(),
            },
        ),
        Route::Reservations => {
            let mut luns = Vec::new();
            for t in registry.targets().iter() {
                for (id, l) in t.luns().iter() {
                    luns.push(lu_reservations(&t.name, *id, &l.pr_snapshot()));
                }
            }
            Response::json(200, &ReservationsList { luns })
        }
        Route::Reservation { target, lun } => match find_lu(registry, &target, lun) {
            Ok((name, l)) => Response::json(200, &lu_reservations(&name, lun, &l.pr_snapshot())),
            Err(r) => r,
        },
        Route::PortGroups => port_groups::get(registry),
        Route::PortGroup(_) if registry.cluster.get().is_some() => Response::error_code(
            409,
            "cluster_mode",
            "in cluster mode the ALUA states follow the active gateway kept in etcd: use ironlun ctl cluster move",
        ),
        Route::PortGroup(id) => port_groups::put(registry, &id, body),
        Route::Cluster => match registry.cluster.get() {
            None => Response::error(404, "not in cluster mode (no [cluster] in the config)"),
            Some(c) => match c.status(registry).await {
                Ok(j) => Response::json(200, &j),
                Err(e) => Response::error_code(503, "etcd", &format!("etcd: {e}")),
            },
        },
        Route::ClusterActive { target, lun } => {
            let Some(c) = registry.cluster.get() else {
                return Response::error(404, "not in cluster mode (no [cluster] in the config)");
            };
            let l = match find_lu(registry, &target, lun) {
                Ok((_, l)) => l,
                Err(r) => return r,
            };
            let req: ironlun_api::ActiveRequest = match parse_body(body) {
                Ok(r) => r,
                Err(r) => return r,
            };
            use crate::target::cluster::MoveError;
            match c.move_active(&l, &req.gateway).await {
                Ok(()) => match c.status(registry).await {
                    Ok(j) => match j.luns.into_iter().find(|x| x.target == target && x.lun == lun) {
                        Some(x) => Response::json(200, &x),
                        None => Response::error(404, "LU gone"),
                    },
                    Err(e) => Response::error_code(503, "etcd", &format!("etcd: {e}")),
                },
                Err(e @ MoveError::UnknownGateway(_)) => {
                    Response::error_code(400, "unknown_gateway", &e.to_string())
                }
                Err(e @ (MoveError::NotLive(_) | MoveError::Raced)) => {
                    Response::error_code(409, "conflict", &e.to_string())
                }
                Err(e @ MoveError::Etcd(_)) => Response::error_code(503, "etcd", &e.to_string()),
            }
        }
        Route::Events => match since(req.query.as_deref()) {
            Ok(since) => Response::json(
                200,
                &EventsJson {
                    events: registry.events.since(since),
                },
            ),
            Err(r) => r,
        },
        Route::Ownership { target, lun } => match find_lu(registry, &target, lun) {
            Ok((_, l)) => {
                let s = l.pr_snapshot();
                Response::json(
                    200,
                    &OwnershipJson {
                        owner: s.owner,
                        epoch: s.epoch,
                        generation: s.generation,
                        handover: handover_json(&s.handover),
                        next_epoch: l.next_epoch(),
                    },
                )
            }
            Err(r) => r,
        },
        Route::Owner { target, lun } => {
            let (l, req) = match (
                find_lu(registry, &target, lun),
                parse_body::<OwnerRequest>(body),
            ) {
                (Ok((_, l)), Ok(req)) => (l, req),
                (Err(r), _) | (_, Err(r)) => return r,
            };
            owner_answer(l.set_owner(&req.host, req.epoch).await)
        }
        Route::Release { target, lun } => {
            let (l, req) = match (
                find_lu(registry, &target, lun),
                parse_body::<ReleaseRequest>(body),
            ) {
                (Ok((_, l)), Ok(req)) => (l, req),
                (Err(r), _) | (_, Err(r)) => return r,
            };
            let epoch = req.epoch.unwrap_or_else(|| l.next_epoch());
            owner_answer(l.release(&req.host, epoch).await)
        }
        Route::Failover { target, lun } => {
            let (name, l, req) = match (
                find_lu(registry, &target, lun),
                parse_body::<FailoverRequest>(body),
            ) {
                (Ok((name, l)), Ok(req)) => (name, l, req),
                (Err(r), _) | (_, Err(r)) => return r,
            };
            let epoch = req.epoch.unwrap_or_else(|| l.next_epoch());
            match l.failover(&req.from, &req.to, epoch, req.force).await {
                Ok(o) => Response::json(200, &failover_json(&name, lun, o)),
                Err(e) => refused(&e),
            }
        }
        Route::FailoverAll => match parse_body::<FailoverAllRequest>(body) {
            Ok(req) => failover_all(registry, &req).await,
            Err(r) => r,
        },
        Route::Handover { target, lun, step } => {
            let (l, req) = match (
                find_lu(registry, &target, lun),
                parse_body::<HandoverRequest>(body),
            ) {
                (Ok((_, l)), Ok(req)) => (l, req),
                (Err(r), _) | (_, Err(r)) => return r,
            };
            handover(&l, step, &req).await
        }
    }
}

/// The answer of `POST …/owner` and `…/release`: the state afterwards, or the refusal.
fn owner_answer(r: Result<PrSnapshot, OwnershipOpError>) -> Response {
    match r {
        Ok(s) => Response::json(
            200,
            &OwnerJson {
                owner: s.owner,
                epoch: s.epoch,
                generation: s.generation,
            },
        ),
        Err(e) => refused(&e),
    }
}

/// The answer for one LU's failover.
fn failover_json(target: &str, lun: u64, o: crate::target::FailoverOutcome) -> FailoverJson {
    FailoverJson {
        target: target.to_string(),
        lun,
        owner: o.owner,
        epoch: o.epoch,
        generation: o.generation,
        aborted: o.aborted,
        idempotent: o.idempotent,
        took_us: o.took_us,
    }
}

/// `POST /v1/failover`: fail over every LU `all_of` owns to `to`, one after another, each at
/// its own next epoch; 200 when all moved, 409 when any was refused (both lists given), 404
/// when the host owns none.
async fn failover_all(registry: &Registry, req: &FailoverAllRequest) -> Response {
    let dead = match ironlun_scsi::pr::ownership::host_name(&req.all_of) {
        Ok(h) => h,
        Err(e) => return refused(&e.into()),
    };
    let mut owned = Vec::new();
    for t in registry.targets().iter() {
        for (id, l) in t.luns().iter() {
            if l.pr_snapshot().owner.as_deref() == Some(dead.as_str()) {
                owned.push((t.name.clone(), *id, l.clone()));
            }
        }
    }
    if owned.is_empty() {
        return Response::error_code(404, "not_owner", &format!("{dead} owns no LU"));
    }
    let mut out = FailoverAllJson {
        luns: Vec::new(),
        refused: Vec::new(),
    };
    for (target, lun, l) in owned {
        match l.failover(&dead, &req.to, l.next_epoch(), req.force).await {
            Ok(o) => out.luns.push(failover_json(&target, lun, o)),
            Err(e) => {
                let (_, code) = op_error(&e);
                out.refused.push(FailoverRefusedJson {
                    target,
                    lun,
                    code: code.to_string(),
                    error: e.to_string(),
                });
            }
        }
    }
    let status = if out.refused.is_empty() { 200 } else { 409 };
    Response::json(status, &out)
}

/// The drain deadline of a prepare with `commit_on_write` (`None` without it).
fn armed_deadline(req: &HandoverRequest) -> Option<std::time::Duration> {
    req.commit_on_write.then(|| {
        std::time::Duration::from_millis(
            req.deadline_ms
                .unwrap_or(DEFAULT_DEADLINE_MS)
                .min(MAX_DEADLINE_MS),
        )
    })
}

/// One handover step on `l`.
async fn handover(l: &Arc<LunHandle>, step: HandoverStep, req: &HandoverRequest) -> Response {
    let (from, to, epoch) = (req.from.as_str(), req.to.as_str(), req.epoch);
    match step {
        HandoverStep::Prepare => match l
            .handover_prepare(from, to, epoch, armed_deadline(req))
            .await
        {
            Ok(s) => Response::json(
                200,
                &PrepareJson {
                    epoch,
                    generation: s.generation,
                },
            ),
            Err(e) => refused(&e),
        },
        HandoverStep::Abort => match l.handover_abort(from, to, epoch).await {
            Ok(()) => {
                l.metrics
                    .handover(crate::metrics::HandoverResult::Aborted, None);
                let s = l.pr_snapshot();
                Response::json(
                    200,
                    &OwnerJson {
                        owner: s.owner,
                        epoch,
                        generation: s.generation,
                    },
                )
            }
            Err(e) => refused(&e),
        },
        HandoverStep::Commit => {
            let deadline_ms = req.deadline_ms.unwrap_or(DEFAULT_DEADLINE_MS);
            if deadline_ms > MAX_DEADLINE_MS {
                return Response::error_code(
                    400,
                    "bad_request",
                    &format!("deadline_ms above {MAX_DEADLINE_MS}"),
                );
            }
            let on_deadline = req.on_deadline.unwrap_or_default();
            let deadline = Duration::from_millis(deadline_ms);
            let r = l
                .handover_commit(from, to, epoch, deadline, on_deadline)
                .await;
            match &r {
                Ok(c) if c.idempotent => {}
                Ok(c) => l.metrics.handover_commit(Some(&c.steps)),
                Err(_) => l.metrics.handover_commit(None),
            }
            match r {
                Ok(c) => Response::json(
                    200,
                    &CommitJson {
                        epoch: c.epoch,
                        generation: c.generation,
                        owner: c.owner,
                        steps_us: c.steps,
                        aborted_tasks: c.aborted_tasks,
                        idempotent: c.idempotent,
                    },
                ),
                Err(e) => refused(&e),
            }
        }
    }
}

/// The response to a refused ownership step.
fn refused(e: &OwnershipOpError) -> Response {
    let (status, code) = op_error(e);
    tracing::info!(status, code, error = %e, "ownership step refused");
    Response::error_code(status, code, &e.to_string())
}

/// The LU `lun` of `target` (and the target's configured name), or a 404 response.
fn find_lu(
    registry: &Registry,
    target: &str,
    lun: u64,
) -> Result<(String, Arc<LunHandle>), Response> {
    let Some(t) = registry.target(target) else {
        return Err(Response::error(404, &format!("no target {target}")));
    };
    match t.luns().get(&lun) {
        Some(l) => Ok((t.name.clone(), l.clone())),
        None => Err(Response::error(
            404,
            &format!("no LUN {lun} in target {}", t.name),
        )),
    }
}

/// A JSON body of type `T`, or a 400 response.
fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Response> {
    serde_json::from_slice(body)
        .map_err(|e| Response::error_code(400, "bad_request", &format!("request body: {e}")))
}

/// `since=N` of a query (0 without it), or a 400 response.
pub fn since(query: Option<&str>) -> Result<u64, Response> {
    let mut since = 0;
    for pair in query.unwrap_or_default().split('&') {
        if let Some(v) = pair.strip_prefix("since=") {
            since = v.parse::<u64>().map_err(|_| {
                Response::error_code(400, "bad_request", &format!("since={v:?}: not a number"))
            })?;
        }
    }
    Ok(since)
}

// ---------------------------------------------------------------------------------------------
// Serving (hyper).

/// Answer one hyper request: the head checks hyper leaves to us (exactly one `Host` in
/// HTTP/1.1, RFC 9112 §3.2; at most one `Authorization`), the token before any body byte is
/// read, then the body (bounded by [`MAX_BODY`] and [`BODY_TIMEOUT`]) and [`respond`].
pub async fn handle(
    req: hyper::Request<Incoming>,
    token: Option<&Token>,
    services: &Services,
) -> Response {
    let (parts, body) = req.into_parts();
    let (request, declared) = match request_of(&parts) {
        Ok(r) => r,
        Err(e) => return e.into(),
    };
    if let Err(r) = authorize(token, request.authorization.as_deref()) {
        return r;
    }
    if declared.is_some_and(|n| n > MAX_BODY) {
        return Response::error(413, "request body too large");
    }
    let body = match tokio::time::timeout(BODY_TIMEOUT, Limited::new(body, limit()).collect()).await
    {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return Response::error(413, "request body too large")
        }
        Ok(Err(e)) => return Response::error(400, &format!("request body: {e}")),
        Err(_) => return Response::error(408, "request body not received in time"),
    };
    respond(&request, &body, token, services).await
}

/// [`MAX_BODY`] as the `usize` that [`Limited`] takes.
fn limit() -> usize {
    usize::try_from(MAX_BODY).unwrap_or(usize::MAX)
}

/// The handlers' view of a request head, and its declared `Content-Length` (hyper has
/// already refused malformed or conflicting ones).
pub fn request_of(
    parts: &hyper::http::request::Parts,
) -> Result<(Request, Option<u64>), HttpError> {
    use hyper::header::{AUTHORIZATION, CONTENT_LENGTH, HOST};
    if parts.version == hyper::Version::HTTP_11 && parts.headers.get_all(HOST).iter().count() != 1 {
        return Err(HttpError::new(400, "HTTP/1.1 needs exactly one Host field"));
    }
    let mut auth = parts.headers.get_all(AUTHORIZATION).iter();
    let authorization = match (auth.next(), auth.next()) {
        (_, Some(_)) => return Err(HttpError::new(400, "repeated Authorization")),
        // A value that is not visible ASCII can never be the token: treated as absent (401).
        (Some(v), None) => v.to_str().ok().map(str::to_owned),
        (None, None) => None,
    };
    let declared = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    Ok((
        Request {
            method: parts.method.as_str().to_owned(),
            path: parts.uri.path().to_owned(),
            query: parts.uri.query().map(str::to_owned),
            authorization,
        },
        declared,
    ))
}

/// Warn when the token file is readable by group or others (the token is a password).
fn warn_if_shared(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = std::fs::metadata(path) {
        let mode = m.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(file = %path.display(), mode = format!("{:o}", mode & 0o777), "admin token file is accessible to group or others; chmod 600 it");
        }
    }
}

/// The bound listener.
enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, SocketFile),
}

/// The socket file this daemon created; removed at shutdown if it is still the same file.
struct SocketFile {
    path: PathBuf,
    dev_ino: (u64, u64),
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        use std::os::unix::fs::MetadataExt;
        if let Ok(m) = std::fs::symlink_metadata(&self.path) {
            if (m.dev(), m.ino()) == self.dev_ino {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// Bind the admin socket at `path`, owner-only from its first moment: the socket is created
/// in a fresh 0700 directory beside `path`, set to 0600, then renamed into place (so nobody
/// else can connect in between, whatever the umask). A stale socket (nobody accepting) is
/// replaced; a socket a live process accepts on, or any other kind of file, is an error.
fn bind_unix(path: &Path) -> Result<(UnixListener, SocketFile), String> {
    use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
    let fail =
        |what: &str, e: std::io::Error| format!("admin socket {}: {what}: {e}", path.display());
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&parent)
        .map_err(|e| fail("cannot create its directory", e))?;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => {
                return Err(format!(
                    "admin socket {}: another process (an ironlun daemon?) is serving on it; stop it or set [admin] listen / --admin unix:PATH",
                    path.display()
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                tracing::info!(path = %path.display(), "removing a stale admin socket");
                std::fs::remove_file(path).map_err(|e| fail("cannot remove the stale socket", e))?;
            }
            Err(e) => return Err(fail("exists and cannot be checked", e)),
        },
        Ok(_) => {
            return Err(format!(
                "admin socket {}: exists and is not a socket; not replacing it",
                path.display()
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(fail("cannot check", e)),
    }
    let staging = parent.join(format!(".admin-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&staging)
        .map_err(|e| fail("cannot create a private directory beside it", e))?;
    let tmp = staging.join("s");
    let bound = (|| {
        let l = std::os::unix::net::UnixListener::bind(&tmp).map_err(|e| fail("bind", e))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| fail("chmod 600", e))?;
        std::fs::rename(&tmp, path).map_err(|e| fail("cannot move it into place", e))?;
        Ok::<_, String>(l)
    })();
    let _ = std::fs::remove_file(&tmp);
    let _ = std::fs::remove_dir(&staging);
    let l = bound?;
    let m = std::fs::symlink_metadata(path).map_err(|e| fail("cannot check", e))?;
    l.set_nonblocking(true)
        .map_err(|e| fail("nonblocking", e))?;
    let l = UnixListener::from_std(l).map_err(|e| fail("register", e))?;
    Ok((
        l,
        SocketFile {
            path: path.to_path_buf(),
            dev_ino: (m.dev(), m.ino()),
        },
    ))
}

/// What the admin API's handlers act on.
pub struct Services {
    /// Targets, LUs, reservations, ownership, events, port groups.
    pub registry: Arc<Registry>,
    /// Live reconfiguration; `None` answers its routes 503.
    pub live: Option<Arc<Live>>,
}

/// The admin API, bound and ready to serve.
pub struct AdminServer {
    listener: Listener,
    services: Arc<Services>,
    token: Option<Arc<Token>>,
}

impl AdminServer {
    /// Load the token and bind `[admin] listen` (the default Unix socket under `data_dir`
    /// or `$RUNTIME_DIRECTORY`, [`config::default_admin_socket`]). `Ok(None)` when the API is
    /// disabled. TCP without a token, an unreadable token file, or an address that cannot
    /// be bound is an error.
    pub async fn bind(
        cfg: &config::Admin,
        data_dir: &Path,
        services: Services,
    ) -> Result<Option<AdminServer>, String> {
        if !cfg.enabled {
            return Ok(None);
        }
        let token = match &cfg.token_file {
            Some(p) => {
                let t = Token::load(p).map_err(|e| format!("{}: {e}", cfg.token_origin))?;
                warn_if_shared(p);
                Some(Arc::new(t))
            }
            None => None,
        };
        let listener = match &cfg.listen {
            AdminListen::Tcp(addr) => {
                if token.is_none() {
                    return Err(format!(
                        "admin API on TCP {addr} needs a bearer token: set [admin] token_file"
                    ));
                }
                Listener::Tcp(
                    TcpListener::bind(addr)
                        .await
                        .map_err(|e| format!("admin API: bind {addr}: {e}"))?,
                )
            }
            AdminListen::Unix(path) => {
                let path = path
                    .clone()
                    .unwrap_or_else(|| config::default_admin_socket(data_dir));
                let (l, f) = bind_unix(&path)?;
                Listener::Unix(l, f)
            }
        };
        Ok(Some(AdminServer {
            listener,
            services: Arc::new(services),
            token,
        }))
    }

    /// Where clients reach it: `http://IP:PORT` (port 0 resolved) or `unix:PATH`.
    pub fn endpoint(&self) -> Option<String> {
        match &self.listener {
            Listener::Tcp(l) => l.local_addr().ok().map(|a| format!("http://{a}")),
            Listener::Unix(_, f) => Some(format!("unix:{}", f.path.display())),
        }
    }

    /// Serve until `shutdown` flips to true; connections in progress get a short grace.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let conns = Arc::new(Conns::default());
        let mut tasks = JoinSet::new();
        if *shutdown.borrow() {
            return;
        }
        loop {
            let accepted = tokio::select! {
                r = accept(&self.listener) => r,
                Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
                _ = shutdown.changed() => break,
            };
            let io = match accepted {
                Ok(io) => io,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Some(slot) = conns.admit() else {
                tracing::debug!("admin API: every connection is running a request; refusing one");
                continue;
            };
            let (token, services, rx) =
                (self.token.clone(), self.services.clone(), shutdown.clone());
            match io {
                Io::Tcp(s) => tasks.spawn(serve_connection(s, slot, token, services, rx)),
                Io::Unix(s) => tasks.spawn(serve_connection(s, slot, token, services, rx)),
            };
        }
        drop(self.listener);
        let drain = async { while tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(SHUTDOWN_GRACE, drain).await.is_err() {
            tasks.shutdown().await;
        }
    }
}

/// An accepted connection.
enum Io {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn accept(l: &Listener) -> std::io::Result<Io> {
    match l {
        Listener::Tcp(l) => {
            let (s, _) = l.accept().await?;
            let _ = s.set_nodelay(true);
            Ok(Io::Tcp(s))
        }
        Listener::Unix(l, _) => Ok(Io::Unix(l.accept().await?.0)),
    }
}

/// The connections kept, oldest first, and whether each is running a handler.
#[derive(Default)]
struct Conns {
    next: AtomicU64,
    live: Mutex<BTreeMap<u64, Entry>>,
}

struct Entry {
    /// Requests of this connection inside a handler now.
    busy: Arc<AtomicUsize>,
    /// Closes the connection when sent (or dropped).
    close: oneshot::Sender<()>,
}

/// A kept connection's place in [`Conns`]; leaving it (the task ending) frees the place.
struct Slot {
    conns: Arc<Conns>,
    id: u64,
    busy: Arc<AtomicUsize>,
    closed: oneshot::Receiver<()>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut m) = self.conns.live.lock() {
            m.remove(&self.id);
        }
    }
}

impl Conns {
    /// A place for a new connection. At [`MAX_CONNECTIONS`], the oldest connection not
    /// inside a handler is closed to make room; `None` only when every connection is.
    fn admit(self: &Arc<Self>) -> Option<Slot> {
        let mut m = self.live.lock().ok()?;
        if m.len() >= MAX_CONNECTIONS {
            let victim = m
                .iter()
                .find(|(_, e)| e.busy.load(Ordering::Acquire) == 0)
                .map(|(id, _)| *id)?;
            if let Some(e) = m.remove(&victim) {
                tracing::debug!(
                    connection = victim,
                    "admin API full: closing the oldest idle connection"
                );
                let _ = e.close.send(());
            }
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let busy = Arc::new(AtomicUsize::new(0));
        let (close, closed) = oneshot::channel();
        m.insert(
            id,
            Entry {
                busy: busy.clone(),
                close,
            },
        );
        Some(Slot {
            conns: self.clone(),
            id,
            busy,
            closed,
        })
    }
}

/// Counts a request as inside its handler while alive.
struct Busy(Arc<AtomicUsize>);

impl Busy {
    fn enter(n: &Arc<AtomicUsize>) -> Busy {
        n.fetch_add(1, Ordering::AcqRel);
        Busy(n.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Serve one connection with hyper until the client closes it, a limit closes it, it is
/// evicted ([`Conns::admit`]) or the daemon shuts down (then in-flight requests finish).
async fn serve_connection<S>(
    io: S,
    mut slot: Slot,
    token: Option<Arc<Token>>,
    services: Arc<Services>,
    mut shutdown: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let served = Arc::new(AtomicU64::new(0));
    let busy = slot.busy.clone();
    let service = hyper::service::service_fn(move |req| {
        let (token, services, served, busy) = (
            token.clone(),
            services.clone(),
            served.clone(),
            busy.clone(),
        );
        async move {
            let _busy = Busy::enter(&busy);
            let r = handle(req, token.as_deref(), &services).await;
            if r.status >= 400 {
                tracing::debug!(status = r.status, "admin request refused");
            }
            let mut r = r.into_http();
            let n = served.fetch_add(1, Ordering::Relaxed).saturating_add(1);
            if n >= MAX_REQUESTS_PER_CONNECTION {
                r.headers_mut().insert(
                    hyper::header::CONNECTION,
                    hyper::header::HeaderValue::from_static("close"),
                );
            }
            Ok::<_, std::convert::Infallible>(r)
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEAD)
        .max_headers(MAX_HEADERS)
        .half_close(true);
    let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "admin connection ended");
            }
            return;
        }
        _ = &mut slot.closed => return,
        _ = shutdown.wait_for(|s| *s) => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, conn).await;
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use ironlun_scsi::pr::{RegistrationView, ReservationView};

    #[test]
    fn routes_table() {
        let lab = "iqn.2026-11.io.ironlun:lab";
        let cases: &[(&str, &str, Result<Route, u16>)] = &[
            ("GET", "/v1/health", Ok(Route::Health)),
            ("GET", "/v1/reservations", Ok(Route::Reservations)),
            (
                "GET",
                "/v1/reservations/iqn.2026-11.io.ironlun:lab/3",
                Ok(Route::Reservation {
                    target: lab.into(),
                    lun: 3,
                }),
            ),
            (
                "GET",
                "/v1/reservations/iqn.2026-11.io.ironlun%3Alab/0",
                Ok(Route::Reservation {
                    target: lab.into(),
                    lun: 0,
                }),
            ),
            ("GET", "/v1/reservations/x/y", Err(404)),
            ("GET", "/v1/reservations/x/-1", Err(404)),
            ("GET", "/v1/reservations/%zz/0", Err(400)),
            ("GET", "/v1/reservations//0", Err(400)),
            ("GET", "/v1/reservations/", Err(404)),
            ("GET", "/v1/reservations/a/0/extra", Err(404)),
            ("GET", "/v1", Err(404)),
            ("GET", "/", Err(404)),
            ("GET", "/v2/health", Err(404)),
            ("POST", "/v1/health", Err(405)),
            ("GET", "/v1/events", Ok(Route::Events)),
            (
                "GET",
                "/v1/luns/iqn.2026-11.io.ironlun:lab/3/ownership",
                Ok(Route::Ownership {
                    target: lab.into(),
                    lun: 3,
                }),
            ),
            (
                "POST",
                "/v1/luns/iqn.2026-11.io.ironlun:lab/0/owner",
                Ok(Route::Owner {
                    target: lab.into(),
                    lun: 0,
                }),
            ),
            (
                "POST",
                "/v1/luns/iqn.2026-11.io.ironlun:lab/0/handover/commit",
                Ok(Route::Handover {
                    target: lab.into(),
                    lun: 0,
                    step: HandoverStep::Commit,
                }),
            ),
            ("GET", "/v1/luns/x/0/handover/commit", Err(405)),
            (
                "POST",
                "/v1/luns/x/0/failover",
                Ok(Route::Failover {
                    target: "x".into(),
                    lun: 0,
                }),
            ),
            (
                "POST",
                "/v1/luns/x/1/release",
                Ok(Route::Release {
                    target: "x".into(),
                    lun: 1,
                }),
            ),
            ("POST", "/v1/failover", Ok(Route::FailoverAll)),
            ("GET", "/v1/failover", Err(405)),
            ("GET", "/v1/luns/x/0/failover", Err(405)),
            ("POST", "/v1/luns/x/0/ownership", Err(405)),
            ("GET", "/v1/luns/x/0/owner", Err(405)),
            ("POST", "/v1/luns/x/0/handover/finish", Err(404)),
            ("POST", "/v1/luns/x/y/handover/abort", Err(404)),
            ("POST", "/v1/events", Err(405)),
            ("DELETE", "/v1/reservations", Err(405)),
            ("BREW", "/coffee", Err(404)),
        ];
        for (m, p, want) in cases {
            let got = route(m, p).map_err(|e| e.status);
            assert_eq!(&got, want, "{m} {p}");
        }
    }

    #[test]
    fn token_rules() {
        let t = Token::new("  0123456789abcdef\n").unwrap();
        assert!(t.admits(Some("Bearer 0123456789abcdef")));
        assert!(t.admits(Some("bearer 0123456789abcdef")));
        assert!(!t.admits(Some("Bearer 0123456789abcdeF")));
        assert!(!t.admits(Some("Bearer 0123456789abcde")));
        assert!(!t.admits(Some("Basic 0123456789abcdef")));
        assert!(!t.admits(Some("Bearer")));
        assert!(!t.admits(None));
        assert!(Token::new("short").is_err());
        assert!(Token::new("0123456789 abcdef").is_err());
        assert_eq!(format!("{t:?}"), "Token(..)");
    }

    #[test]
    fn responses_carry_json_and_auth_fields() {
        let r = Response::error(404, "no \"x\"").into_http();
        assert_eq!(r.status(), 404);
        assert_eq!(r.headers()["content-type"], "application/json");
        assert_eq!(r.headers()["cache-control"], "no-store");
        let r = Response::error(401, "x").into_http();
        assert_eq!(r.headers()["www-authenticate"], "Bearer realm=\"ironlun\"");
        let post: Response = route("GET", "/v1/luns/t/0/owner").unwrap_err().into();
        assert_eq!(post.clone().into_http().headers()["allow"], "POST");
        let j: ErrorJson = serde_json::from_slice(&post.body).unwrap();
        assert_eq!(j.code, "method_not_allowed");
        assert_eq!(
            Response::error(403, "x").into_http().status(),
            hyper::StatusCode::FORBIDDEN
        );
    }

    #[test]
    fn a_full_table_closes_the_oldest_idle_connection() {
        let conns = Arc::new(Conns::default());
        let mut slots: Vec<Slot> = (0..MAX_CONNECTIONS)
            .map(|_| conns.admit().unwrap())
            .collect();
        // The oldest is inside a handler: it is kept, the next oldest is closed.
        let busy = Busy::enter(&slots[0].busy);
        let mut newest = conns.admit().unwrap();
        assert!(
            slots[0].closed.try_recv().is_err(),
            "a busy connection was closed"
        );
        assert!(
            slots[1].closed.try_recv().is_ok(),
            "the oldest idle one stays"
        );
        assert!(newest.closed.try_recv().is_err());
        assert_eq!(conns.live.lock().unwrap().len(), MAX_CONNECTIONS);
        // The closed connection's task ending changes nothing more; another one ending
        // frees its place.
        drop(slots.remove(1));
        assert_eq!(conns.live.lock().unwrap().len(), MAX_CONNECTIONS);
        drop(slots.pop());
        assert_eq!(conns.live.lock().unwrap().len(), MAX_CONNECTIONS - 1);
        drop(busy);
        let mut refill = conns.admit().unwrap();
        // Every connection busy: nothing to close, the new one is refused.
        let guards: Vec<Busy> = slots
            .iter()
            .chain([&newest, &refill])
            .map(|s| Busy::enter(&s.busy))
            .collect();
        assert!(conns.admit().is_none());
        assert!(newest.closed.try_recv().is_err() && refill.closed.try_recv().is_err());
        drop(guards);
    }

    #[test]
    fn authorize_without_and_with_a_token() {
        assert!(authorize(None, None).is_ok());
        let t = Token::new("0123456789abcdef").unwrap();
        assert_eq!(authorize(Some(&t), None).unwrap_err().status, 401);
        assert!(authorize(Some(&t), Some("Bearer 0123456789abcdef")).is_ok());
    }

    fn parts(req: hyper::Request<()>) -> hyper::http::request::Parts {
        req.into_parts().0
    }

    #[test]
    fn request_head_checks() {
        let ok = parts(
            hyper::Request::get("/v1/events?since=3")
                .header("host", "x")
                .header("authorization", "Bearer abc")
                .header("content-length", "12")
                .body(())
                .unwrap(),
        );
        let (r, len) = request_of(&ok).unwrap();
        assert_eq!(
            r,
            Request {
                method: "GET".into(),
                path: "/v1/events".into(),
                query: Some("since=3".into()),
                authorization: Some("Bearer abc".into()),
            }
        );
        assert_eq!(len, Some(12));
        let no_host = parts(hyper::Request::get("/v1/health").body(()).unwrap());
        assert_eq!(request_of(&no_host).unwrap_err().status, 400);
        let two_auth = parts(
            hyper::Request::get("/v1/health")
                .header("host", "x")
                .header("authorization", "a")
                .header("authorization", "b")
                .body(())
                .unwrap(),
        );
        assert_eq!(request_of(&two_auth).unwrap_err().status, 400);
        let http10 = parts(
            hyper::Request::get("/v1/health")
                .version(hyper::Version::HTTP_10)
                .body(())
                .unwrap(),
        );
        assert!(request_of(&http10).is_ok());
    }

    #[test]
    fn ownership_errors_map_to_codes() {
        use OwnershipError as O;
        let cases: Vec<(OwnershipOpError, u16, &str)> = vec![
            (O::InvalidHost("a b".into()).into(), 400, "invalid_host"),
            (O::SameHost.into(), 400, "same_host"),
            (
                O::StaleEpoch {
                    epoch: 1,
                    current: 2,
                }
                .into(),
                409,
                "stale_epoch",
            ),
            (
                O::NotOwner {
                    host: "h".into(),
                    owner: None,
                }
                .into(),
                409,
                "not_owner",
            ),
            (
                O::DestinationNotLoggedIn("d".into()).into(),
                409,
                "destination_not_logged_in",
            ),
            (
                O::HandoverInProgress(Handover::Idle).into(),
                409,
                "handover_in_progress",
            ),
            (O::NotPrepared("s".into()).into(), 409, "not_prepared"),
            (O::NotFenced("s".into()).into(), 409, "not_fenced"),
            (O::AlreadyCommitted(3).into(), 409, "committed"),
            (
                O::ForeignRegistrations(vec![]).into(),
                409,
                "foreign_registrations",
            ),
            (O::Spc2Reserved.into(), 409, "spc2_reserved"),
            (
                OwnershipOpError::Ownership(OwnershipError::Aborted(3)),
                409,
                "aborted",
            ),
            (
                OwnershipOpError::Cluster("x".into()),
                503,
                "cluster_unavailable",
            ),
            (OwnershipOpError::DrainTimeout(5), 409, "drain_timeout"),
            (OwnershipOpError::AbortTimeout(30), 503, "abort_timeout"),
            (OwnershipOpError::Flush("x".into()), 500, "flush_failed"),
            (OwnershipOpError::Persist("x".into()), 500, "persist_failed"),
        ];
        for (e, status, code) in cases {
            assert_eq!(op_error(&e), (status, code), "{e}");
            let r = refused(&e);
            let j: ErrorJson = serde_json::from_slice(&r.body).unwrap();
            assert_eq!((r.status, j.code.as_str()), (status, code));
            assert_eq!(j.error, e.to_string());
        }
    }

    #[test]
    fn accepts_and_rejects_since() {
        assert_eq!(since(None).unwrap(), 0);
        assert_eq!(since(Some("since=17")).unwrap(), 17);
        assert_eq!(since(Some("x=1&since=3")).unwrap(), 3);
        for bad in [
            "since=",
            "since=-1",
            "since=x",
            "since=99999999999999999999",
        ] {
            assert_eq!(since(Some(bad)).unwrap_err().status, 400, "{bad}");
        }
    }

    #[test]
    fn handover_json_states() {
        assert_eq!(handover_json(&Handover::Idle), None);
        let p = Handover::Prepared {
            from: "a".into(),
            to: "b".into(),
            epoch: 4,
        };
        let j = handover_json(&p).unwrap();
        assert_eq!(
            (j.state.as_str(), j.from.as_str(), j.to.as_str(), j.epoch),
            ("prepared", "a", "b", 4)
        );
        let f = Handover::Fenced {
            from: "a".into(),
            to: "b".into(),
            epoch: 4,
        };
        assert_eq!(handover_json(&f).unwrap().state, "fenced");
    }

    #[test]
    fn rejects_bad_handover_bodies() {
        for bad in [
            &b""[..],
            b"{}",
            b"{\"from\":\"a\",\"to\":\"b\"}",
            b"{\"from\":\"a\",\"to\":\"b\",\"epoch\":-1}",
            b"[1]",
        ] {
            let r = parse_body::<HandoverRequest>(bad).unwrap_err();
            assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(bad));
        }
        let ok: HandoverRequest = parse_body(
            br#"{"from":"a","to":"b","epoch":2,"deadline_ms":10,"on_deadline":"refuse"}"#,
        )
        .unwrap();
        assert_eq!(
            (ok.epoch, ok.deadline_ms, ok.on_deadline),
            (2, Some(10), Some(ironlun_api::OnDeadline::Refuse))
        );
    }

    #[test]
    fn lu_json_from_snapshot() {
        let s = PrSnapshot {
            generation: 7,
            aptpl: true,
            registrations: vec![
                RegistrationView {
                    initiator_port: "iqn.a:h1,i,0x023d00000001".into(),
                    key: 0xabc,
                    rtpi: Some(1),
                    holder: true,
                },
                RegistrationView {
                    initiator_port: "iqn.a:h2".into(),
                    key: 0xdef,
                    rtpi: None,
                    holder: false,
                },
            ],
            reservation: Some(ReservationView {
                ty: ReservationType::WriteExclusiveRegistrantsOnly,
                scope: 0,
                key: 0xabc,
            }),
            spc2_holder: None,
            ..PrSnapshot::default()
        };
        let j = serde_json::to_value(lu_reservations("iqn.x:t", 2, &s)).unwrap();
        assert_eq!(
            j,
            serde_json::json!({
                "target": "iqn.x:t", "lun": 2, "generation": 7, "aptpl": true,
                "reservation": {
                    "type": 5, "type_name": "Write Exclusive, Registrants Only",
                    "scope": "LU_SCOPE", "key": "0x0000000000000abc",
                    "holder": "iqn.a:h1,i,0x023d00000001"
                },
                "registrations": [
                    {"initiator_port": "iqn.a:h1,i,0x023d00000001", "key": "0x0000000000000abc",
                     "target_port": "iqn.x:t,t,0x0001", "rtpi": 1, "holder": true},
                    {"initiator_port": "iqn.a:h2", "key": "0x0000000000000def",
                     "target_port": "all", "rtpi": null, "holder": false}
                ],
                "spc2_holder": null, "owner": null, "epoch": 0, "handover": null
            })
        );
        let mut all = s.clone();
        all.reservation = Some(ReservationView {
            ty: ReservationType::ExclusiveAccessAllRegistrants,
            scope: 0,
            key: 0,
        });
        let j = lu_reservations("iqn.x:t", 2, &all);
        assert_eq!(j.reservation.unwrap().holder, None);
        let empty = lu_reservations("iqn.x:t", 0, &PrSnapshot::default());
        assert_eq!(
            (
                empty.reservation,
                empty.registrations.len(),
                empty.generation
            ),
            (None, 0, 0)
        );
    }
}
