//! The admin API: HTTP/1.1 with JSON bodies, served by the daemon on `[admin] listen`
//! (loopback by default; `ironlun ctl` is its client, [`crate::ctl`]).
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
//!   ([`crate::port_groups`]).
//!
//! Errors are `{"error":"…","code":"…"}` with a 4xx/5xx status; refused ownership steps are
//! 409 with the code naming the reason ([`op_error`]), malformed bodies 400. With
//! `[admin] token_file` every request needs `Authorization: Bearer <token>` (RFC 6750 §2.1),
//! else 401.
//!
//! The HTTP layer is a deliberately small, strict HTTP/1.1 subset (RFC 9112): one request per
//! connection (`Connection: close`), a request head of at most [`MAX_HEAD`] bytes and
//! [`MAX_HEADERS`] fields, a body only with `Content-Length` up to [`MAX_BODY`], no
//! `Transfer-Encoding`, a deadline for receiving the whole request (a handover commit then
//! runs for up to its own `deadline_ms` plus the flush), and a bounded number of connections.
//! The parser ([`parse_head`]) is pure and never panics on any input.

use crate::config;
use crate::target::{CommitSteps, Event, LunHandle, OnDeadline, OwnershipOpError, Registry};
use ironlun_scsi::pr::ownership::{Handover, OwnershipError};
use ironlun_scsi::pr::{PrSnapshot, ReservationType};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

/// Largest request head (request line and header fields) accepted; beyond: 431.
pub const MAX_HEAD: usize = 16 * 1024;
/// Most header fields in a request; beyond: 431 (RFC 6585 §5).
pub const MAX_HEADERS: usize = 64;
/// Largest request body (`Content-Length`); beyond: 413.
pub const MAX_BODY: u64 = 64 * 1024;
/// The whole request must arrive within this (slow clients get 408).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Writing the response must finish within this.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more are answered 503 and closed.
pub const MAX_CONNECTIONS: usize = 64;
/// After the response, unread request bytes are drained (so that closing does not reset the
/// connection before the client reads the response) for at most this long / this much.
const LINGER: Duration = Duration::from_millis(500);
const LINGER_BYTES: usize = 1 << 20;
/// How long shutdown lets connections in progress finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);
/// Token files larger than this are refused (a token is a short line).
const MAX_TOKEN_FILE: u64 = 4096;
/// Shortest bearer token accepted (128 bits of hex or base64 are 22 characters or more).
pub const MIN_TOKEN_LEN: usize = 16;

// ---------------------------------------------------------------------------------------------
// JSON shapes (shared with the client, `ironlun ctl`).

/// `GET /v1/health`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    pub status: String,
    pub version: String,
}

/// `GET /v1/reservations`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReservationsList {
    pub luns: Vec<LuReservations>,
}

/// The reservation state of one LU (SPC-4 §5.13; what PERSISTENT RESERVE IN READ FULL STATUS
/// reports, plus the SPC-2 holder and APTPL).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LuReservations {
    pub target: String,
    pub lun: u64,
    /// PRgeneration (SPC-4 §6.15.2).
    pub generation: u32,
    /// Activate Persist Through Power Loss (SPC-4 §5.13.5).
    pub aptpl: bool,
    pub reservation: Option<ReservationJson>,
    pub registrations: Vec<RegistrationJson>,
    /// Initiator port holding an SPC-2 RESERVE(6/10) reservation.
    pub spc2_holder: Option<String>,
    /// Host owning the LU under target-managed ownership (semantics.md §3).
    #[serde(default)]
    pub owner: Option<String>,
    /// Epoch of the last ownership decision (0: never owned).
    #[serde(default)]
    pub epoch: u64,
    /// The handover in progress.
    #[serde(default)]
    pub handover: Option<HandoverJson>,
}

/// A handover in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoverJson {
    /// `"prepared"` or `"fenced"`.
    pub state: String,
    pub from: String,
    pub to: String,
    pub epoch: u64,
}

impl HandoverJson {
    pub fn of(h: &Handover) -> Option<HandoverJson> {
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

/// `POST …/handover/{prepare,commit,abort}` body; `deadline_ms` and `on_deadline` only for
/// commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoverRequest {
    pub from: String,
    pub to: String,
    pub epoch: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
    /// `"abort"` (default) or `"refuse"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_deadline: Option<String>,
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

/// `GET /v1/events`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventsJson {
    pub events: Vec<Event>,
}

/// The persistent reservation of an LU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReservationJson {
    /// Type code (SPC-4 §6.16.2 Table 213).
    #[serde(rename = "type")]
    pub type_code: u8,
    pub type_name: String,
    /// `"LU_SCOPE"` (the only scope SPC-4 defines).
    pub scope: String,
    /// The reservation key as `0x` and 16 hex digits; 0 for the all-registrants types.
    pub key: String,
    /// Initiator port of the holder; `null` for the all-registrants types (every registrant
    /// holds it).
    pub holder: Option<String>,
}

/// One registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistrationJson {
    /// `name,i,0x<ISID>`, or the bare name for an initiator-device registration.
    pub initiator_port: String,
    pub key: String,
    /// `<target>,t,0x<RTPI as 4 hex digits>` (SPC-4 §7.6.4.6), or `"all"` (ALL_TG_PT=1).
    pub target_port: String,
    pub rtpi: Option<u16>,
    pub holder: bool,
}

/// `{"error": "…", "code": "…"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorJson {
    pub error: String,
    /// Machine-readable reason (e.g. `not_owner`, `stale_epoch`, `not_found`).
    #[serde(default)]
    pub code: String,
}

/// A reservation key as the API prints it.
pub fn fmt_key(key: u64) -> String {
    format!("0x{key:016x}")
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
        handover: HandoverJson::of(&s.handover),
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP/1.1 subset (RFC 9112), pure.

/// A parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The path of the origin-form request target, still percent-encoded, without the query.
    pub path: String,
    /// The query (after `?`, before any `#`), still percent-encoded.
    pub query: Option<String>,
    /// `Authorization` field value, if present.
    pub authorization: Option<String>,
    /// Body length (`Content-Length`, 0 without it).
    pub content_length: u64,
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

/// Offset just past the blank line that ends a request head (`CRLF CRLF`), if `buf` holds it.
pub fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .and_then(|p| p.checked_add(4))
}

/// `tchar` (RFC 9110 §5.6.2).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Parse a request head: everything up to and including the blank line (RFC 9112 §2.1).
/// Lines end in CRLF; a bare CR or LF, obsolete line folding, whitespace before a field's
/// colon, a missing or repeated `Host` in HTTP/1.1, conflicting `Content-Length`s and
/// `Transfer-Encoding` are refused.
pub fn parse_head(head: &[u8]) -> Result<Request, HttpError> {
    if head.len() > MAX_HEAD {
        return Err(HttpError::new(431, "request head too large"));
    }
    if !head.ends_with(b"\r\n\r\n") {
        return Err(HttpError::new(
            400,
            "request head does not end with CRLF CRLF",
        ));
    }
    // Every line, the last field's too, keeps its CR: each must end with CR LF.
    let text = head.strip_suffix(b"\n\r\n").unwrap_or_default();
    let mut lines = text.split(|b| *b == b'\n').map(|l| {
        l.strip_suffix(b"\r")
            .ok_or_else(|| HttpError::new(400, "bare LF in request head"))
    });
    let request_line = lines
        .next()
        .ok_or_else(|| HttpError::new(400, "empty request"))??;
    let (method, path, query, minor) = parse_request_line(request_line)?;
    let mut authorization = None;
    let mut content_length: Option<u64> = None;
    let mut hosts = 0usize;
    let mut fields = 0usize;
    for line in lines {
        let line = line?;
        fields = fields.saturating_add(1);
        if fields > MAX_HEADERS {
            return Err(HttpError::new(431, "too many header fields"));
        }
        if line.contains(&b'\r') {
            return Err(HttpError::new(400, "bare CR in request head"));
        }
        let colon = line
            .iter()
            .position(|b| *b == b':')
            .ok_or_else(|| HttpError::new(400, "header field without a colon"))?;
        let (name, rest) = line.split_at(colon);
        if name.is_empty() || !name.iter().all(|b| is_tchar(*b)) {
            // Includes obs-fold (a line starting with whitespace) and "Name :" (RFC 9112 §5.1).
            return Err(HttpError::new(400, "malformed header field name"));
        }
        let value = rest.get(1..).unwrap_or_default();
        if value
            .iter()
            .any(|b| (*b < 0x20 && *b != b'\t') || *b == 0x7f)
        {
            return Err(HttpError::new(400, "control character in a header field"));
        }
        let value = String::from_utf8_lossy(value)
            .trim_matches([' ', '\t'])
            .to_string();
        let name = String::from_utf8_lossy(name).to_ascii_lowercase();
        match name.as_str() {
            "host" => hosts = hosts.saturating_add(1),
            "authorization" if authorization.is_some() => {
                return Err(HttpError::new(400, "repeated Authorization"));
            }
            "authorization" => authorization = Some(value),
            "content-length" => {
                if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(HttpError::new(400, "malformed Content-Length"));
                }
                let n = value
                    .parse::<u64>()
                    .map_err(|_| HttpError::new(413, "request body too large"))?;
                if content_length.is_some_and(|c| c != n) {
                    return Err(HttpError::new(400, "conflicting Content-Length"));
                }
                content_length = Some(n);
            }
            "transfer-encoding" => {
                return Err(HttpError::new(
                    501,
                    "Transfer-Encoding is not supported; send Content-Length",
                ))
            }
            _ => {}
        }
    }
    // RFC 9112 §3.2: an HTTP/1.1 request without exactly one Host field is refused.
    if minor == 1 && hosts != 1 {
        return Err(HttpError::new(400, "HTTP/1.1 needs exactly one Host field"));
    }
    let content_length = content_length.unwrap_or(0);
    if content_length > MAX_BODY {
        return Err(HttpError::new(413, "request body too large"));
    }
    Ok(Request {
        method,
        path,
        query,
        authorization,
        content_length,
    })
}

/// `method SP request-target SP HTTP-version` (RFC 9112 §3); the target in origin form.
fn parse_request_line(line: &[u8]) -> Result<(String, String, Option<String>, u8), HttpError> {
    let bad = || HttpError::new(400, "malformed request line");
    let mut parts = line.split(|b| *b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    if method.is_empty() || !method.iter().all(|b| is_tchar(*b)) {
        return Err(bad());
    }
    if target.first() != Some(&b'/') || !target.iter().all(|b| (0x21..0x7f).contains(b)) {
        return Err(HttpError::new(
            400,
            "request target must be an absolute path (origin form)",
        ));
    }
    let minor = match version {
        b"HTTP/1.1" => 1,
        b"HTTP/1.0" => 0,
        v if v.starts_with(b"HTTP/") => {
            return Err(HttpError::new(505, "only HTTP/1.0 and HTTP/1.1 are served"))
        }
        _ => return Err(bad()),
    };
    let target = target.split(|b| *b == b'#').next().unwrap_or_default();
    let mut halves = target.splitn(2, |b| *b == b'?');
    let path = halves.next().unwrap_or_default();
    let query = halves
        .next()
        .map(|q| String::from_utf8_lossy(q).into_owned());
    Ok((
        String::from_utf8_lossy(method).into_owned(),
        String::from_utf8_lossy(path).into_owned(),
        query,
        minor,
    ))
}

/// Decode `%XX` escapes of one path segment; `None` for a bad escape or non-UTF-8 result.
pub fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0usize;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hex = bytes.get(i.checked_add(1)?..i.checked_add(3)?)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i = i.checked_add(3)?;
        } else {
            out.push(b);
            i = i.checked_add(1)?;
        }
    }
    String::from_utf8(out).ok()
}

/// Percent-encode a path segment: everything but unreserved characters and `:` (RFC 3986
/// §3.3 allows `:` in a segment; iSCSI names are full of it).
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~:".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
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
    Events,
    PortGroups,
    PortGroup(String),
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

/// `Content-Type` of every response but `/metrics`.
pub const JSON: &str = "application/json";

impl Response {
    /// The Prometheus exposition of `registry` ([`crate::metrics`]).
    pub fn metrics(registry: &Registry) -> Response {
        Response {
            status: 200,
            body: crate::metrics::render(registry).into_bytes(),
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

    /// The bytes on the wire: status line, fields, body.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n",
            self.status,
            reason(self.status),
            self.content_type,
            self.body.len()
        );
        match self.status {
            401 => out.push_str("WWW-Authenticate: Bearer realm=\"ironlun\"\r\n"),
            405 => out.push_str(&format!("Allow: {}\r\n", self.allow)),
            _ => {}
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        bytes.extend_from_slice(&self.body);
        bytes
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

/// The `code` of an error that has no more specific one.
pub fn status_code(status: u16) -> &'static str {
    match status {
        400 => "bad_request",
        401 => "unauthorized",
        404 => "not_found",
        405 => "method_not_allowed",
        408 => "request_timeout",
        409 => "conflict",
        413 => "body_too_large",
        431 => "head_too_large",
        501 => "not_implemented",
        503 => "unavailable",
        505 => "http_version",
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
        },
        OwnershipOpError::Aborted(_) => (409, "aborted"),
        OwnershipOpError::DrainTimeout(_) => (409, "drain_timeout"),
        OwnershipOpError::AbortTimeout(_) => (503, "abort_timeout"),
        OwnershipOpError::Flush(_) => (500, "flush_failed"),
        OwnershipOpError::Persist(_) => (500, "persist_failed"),
    }
}

/// Reason phrases of the statuses this server sends (RFC 9110 §15).
fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

// ---------------------------------------------------------------------------------------------
// Bearer token.

/// The bearer token. Never printed.
#[derive(Clone)]
pub struct Token(Vec<u8>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

impl Token {
    /// A token from text: surrounding whitespace removed; at least [`MIN_TOKEN_LEN`] visible
    /// ASCII characters (it travels in a header field).
    pub fn new(text: &str) -> Result<Token, String> {
        let t = text.trim();
        if t.len() < MIN_TOKEN_LEN {
            return Err(format!(
                "token too short: at least {MIN_TOKEN_LEN} characters"
            ));
        }
        if !t.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("token must be visible ASCII without spaces".into());
        }
        Ok(Token(t.as_bytes().to_vec()))
    }

    /// Read the token file (at most 4 KiB).
    pub fn load(path: &Path) -> Result<Token, String> {
        use std::io::Read;
        let f = std::fs::File::open(path)
            .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        let mut text = String::new();
        f.take(MAX_TOKEN_FILE.saturating_add(1))
            .read_to_string(&mut text)
            .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        if u64::try_from(text.len()).map_or(true, |n| n > MAX_TOKEN_FILE) {
            return Err(format!(
                "{}: larger than {MAX_TOKEN_FILE} bytes",
                path.display()
            ));
        }
        Token::new(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The token as the `Authorization` field carries it after `Bearer `.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// Whether an `Authorization` field value is `Bearer <this token>` (scheme
    /// case-insensitive, RFC 9110 §11.1); constant time in the token's bytes.
    pub fn admits(&self, authorization: Option<&str>) -> bool {
        let Some(v) = authorization else {
            return false;
        };
        let Some((scheme, cred)) = v.split_once(' ') else {
            return false;
        };
        if !scheme.eq_ignore_ascii_case("bearer") {
            return false;
        }
        let cred = cred.trim_start_matches(' ').as_bytes();
        if cred.len() != self.0.len() {
            return false;
        }
        cred.iter()
            .zip(&self.0)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
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
    registry: &Registry,
) -> Response {
    if let Some(t) = token {
        if !t.admits(req.authorization.as_deref()) {
            return Response::error(401, "missing or wrong bearer token");
        }
    }
    // Live reconfiguration (LUNs, reload, config): its own routing table.
    if let Some(r) = crate::reconfig::route(&req.method, &req.path, body, registry).await {
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
        Route::PortGroups => crate::port_groups::get(registry),
        Route::PortGroup(id) => crate::port_groups::put(registry, &id, body),
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
                        handover: HandoverJson::of(&s.handover),
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
            match l.set_owner(&req.host, req.epoch).await {
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

/// One handover step on `l`.
async fn handover(l: &Arc<LunHandle>, step: HandoverStep, req: &HandoverRequest) -> Response {
    let (from, to, epoch) = (req.from.as_str(), req.to.as_str(), req.epoch);
    match step {
        HandoverStep::Prepare => match l.handover_prepare(from, to, epoch).await {
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
            let on_deadline = match req.on_deadline.as_deref() {
                None | Some("abort") => OnDeadline::Abort,
                Some("refuse") => OnDeadline::Refuse,
                Some(other) => {
                    return Response::error_code(
                        400,
                        "bad_request",
                        &format!("on_deadline {other:?}: expected \"abort\" or \"refuse\""),
                    )
                }
            };
            let deadline = Duration::from_millis(deadline_ms);
            let r = l
                .handover_commit(from, to, epoch, deadline, on_deadline)
                .await;
            l.metrics.handover_commit(&r);
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

/// Read one request (head and body) from `s`; `Err` with the response for a request that
/// cannot be served, `Ok(None)` when the peer went away without sending anything worth an
/// answer.
async fn read_request(s: &mut TcpStream) -> Result<Option<(Request, Vec<u8>)>, Response> {
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    // Where the blank line may start: bytes before it were searched already (a client sending
    // one byte per packet costs linear, not quadratic, work).
    let mut searched = 0usize;
    let head_len = loop {
        if let Some(end) = buf
            .get(searched..)
            .and_then(head_end)
            .and_then(|e| e.checked_add(searched))
        {
            break end;
        }
        searched = buf.len().saturating_sub(3);
        if buf.len() >= MAX_HEAD {
            return Err(Response::error(431, "request head too large"));
        }
        let Ok(n) = s.read(&mut chunk).await else {
            return Ok(None);
        };
        if n == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(Response::error(400, "incomplete request head"))
            };
        }
        buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
    };
    let req = parse_head(buf.get(..head_len).unwrap_or_default()).map_err(Response::from)?;
    // The body: bounded by parse_head (at most MAX_BODY); bytes beyond it are ignored.
    let want = usize::try_from(req.content_length)
        .map_err(|_| Response::error(413, "request body too large"))?;
    let mut body: Vec<u8> = buf.get(head_len..).unwrap_or_default().to_vec();
    while body.len() < want {
        let Ok(n) = s.read(&mut chunk).await else {
            return Ok(None);
        };
        if n == 0 {
            return Err(Response::error(400, "incomplete request body"));
        }
        body.extend_from_slice(chunk.get(..n).unwrap_or_default());
    }
    body.truncate(want);
    Ok(Some((req, body)))
}

async fn serve_connection(mut s: TcpStream, token: Option<Arc<Token>>, registry: Arc<Registry>) {
    let response = match tokio::time::timeout(REQUEST_TIMEOUT, read_request(&mut s)).await {
        Ok(Ok(Some((req, body)))) => respond(&req, &body, token.as_deref(), &registry).await,
        Ok(Ok(None)) => return,
        Ok(Err(r)) => r,
        Err(_) => Response::error(408, "request not received in time"),
    };
    if response.status >= 400 {
        tracing::debug!(status = response.status, "admin request refused");
    }
    write_and_close(s, &response).await;
}

/// Write the response, half-close, and drain what the client still sends (bounded) so the
/// close does not reset the connection before the response is read.
async fn write_and_close(mut s: TcpStream, response: &Response) {
    let wire = response.encode();
    if !matches!(
        tokio::time::timeout(WRITE_TIMEOUT, s.write_all(&wire)).await,
        Ok(Ok(()))
    ) {
        return;
    }
    let _ = s.shutdown().await;
    let drain = async {
        let mut chunk = [0u8; 4096];
        let mut total = 0usize;
        while let Ok(n) = s.read(&mut chunk).await {
            total = total.saturating_add(n);
            if n == 0 || total > LINGER_BYTES {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
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

/// The admin API, bound and ready to serve.
pub struct AdminServer {
    listener: TcpListener,
    registry: Arc<Registry>,
    token: Option<Arc<Token>>,
}

impl AdminServer {
    /// Load the token and bind `[admin] listen`. `Ok(None)` when the API is disabled, or when
    /// the default address (not configured explicitly) is taken: then the daemon serves iSCSI
    /// without an admin API and says so. A configured address that cannot be bound, or an
    /// unreadable token file, is an error.
    pub async fn bind(
        cfg: &config::Admin,
        registry: Arc<Registry>,
    ) -> Result<Option<AdminServer>, String> {
        if !cfg.enabled {
            return Ok(None);
        }
        if !cfg.listen.ip().is_loopback() && cfg.token_file.is_none() {
            return Err(format!(
                "admin API on {} (not loopback) needs [admin] token_file",
                cfg.listen
            ));
        }
        let token = match &cfg.token_file {
            Some(p) => {
                let t = Token::load(p).map_err(|e| format!("{}: {e}", cfg.token_origin))?;
                warn_if_shared(p);
                Some(Arc::new(t))
            }
            None => None,
        };
        let listener = match TcpListener::bind(cfg.listen).await {
            Ok(l) => l,
            Err(e) if !cfg.listen_explicit => {
                tracing::warn!(addr = %cfg.listen, error = %e, "admin API disabled: cannot bind its default address (set [admin] listen or --admin)");
                return Ok(None);
            }
            Err(e) => return Err(format!("admin API: bind {}: {e}", cfg.listen)),
        };
        Ok(Some(AdminServer {
            listener,
            registry,
            token,
        }))
    }

    /// The bound address (port 0 resolved).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serve until `shutdown` flips to true; connections in progress get a short grace.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let mut conns = JoinSet::new();
        if *shutdown.borrow() {
            return;
        }
        loop {
            tokio::select! {
                r = self.listener.accept() => match r {
                    Ok((s, peer)) => {
                        let _ = s.set_nodelay(true);
                        match slots.clone().try_acquire_owned() {
                            Ok(permit) => {
                                let (token, reg) = (self.token.clone(), self.registry.clone());
                                conns.spawn(async move {
                                    serve_connection(s, token, reg).await;
                                    drop(permit);
                                });
                            }
                            Err(_) => {
                                tracing::debug!(%peer, "admin API busy");
                                conns.spawn(async move {
                                    write_and_close(s, &Response::error(503, "too many admin connections")).await;
                                });
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "admin accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
                _ = shutdown.changed() => break,
            }
        }
        drop(self.listener);
        let drain = async { while conns.join_next().await.is_some() {} };
        if tokio::time::timeout(SHUTDOWN_GRACE, drain).await.is_err() {
            conns.shutdown().await;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use ironlun_scsi::pr::{RegistrationView, ReservationView};

    fn status(head: &[u8]) -> u16 {
        match parse_head(head) {
            Ok(_) => 200,
            Err(e) => e.status,
        }
    }

    #[test]
    fn accepts_minimal_get() {
        let r = parse_head(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        assert_eq!(
            r,
            Request {
                method: "GET".into(),
                path: "/v1/health".into(),
                query: None,
                authorization: None,
                content_length: 0,
            }
        );
    }

    #[test]
    fn accepts_http10_without_host_and_strips_query() {
        let r = parse_head(b"GET /v1/reservations?x=1 HTTP/1.0\r\n\r\n").unwrap();
        assert_eq!(r.path, "/v1/reservations");
        assert_eq!(r.query.as_deref(), Some("x=1"));
        let r = parse_head(b"GET /v1/events?since=4#f HTTP/1.0\r\n\r\n").unwrap();
        assert_eq!(
            (r.path.as_str(), r.query.as_deref()),
            ("/v1/events", Some("since=4"))
        );
    }

    #[test]
    fn accepts_fields_case_insensitively_with_ows() {
        let r = parse_head(
            b"GET / HTTP/1.1\r\nhOST: a\r\nAUTHORIZATION: \t Bearer abc \r\nContent-Length: 5\r\nContent-Length: 5\r\nX-Other: \xff\r\n\r\n",
        )
        .unwrap();
        assert_eq!(r.authorization.as_deref(), Some("Bearer abc"));
        assert_eq!(r.content_length, 5);
    }

    #[test]
    fn rejects_malformed_heads() {
        let cases: &[(&[u8], u16)] = &[
            (b"\r\n\r\n", 400),
            (b"GET /v1/health HTTP/1.1\r\n\r\n", 400), // no Host
            (b"GET /v1/health HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
            (b"GET  /v1/health HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            (b"GET /v1/health\r\nHost: a\r\n\r\n", 400),
            (b"GET v1/health HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            (b"GET http://x/v1/health HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            (b"GET /v1/health HTTP/2.0\r\nHost: a\r\n\r\n", 505),
            (b"GET /v1/health FTP/1.1\r\nHost: a\r\n\r\n", 400),
            (b"G(T /v1/health HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            (b"GET /v1/health HTTP/1.1\nHost: a\r\n\r\n", 400),
            (b"GET /v1/health HTTP/1.1\r\nHost: a\rb\r\n\r\n", 400),
            (b"GET /v1/health HTTP/1.1\r\nHost : a\r\n\r\n", 400),
            (b"GET /v1/health HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n", 400),
            (b"GET /v1/health HTTP/1.1\r\nHost: a\r\nNoColon\r\n\r\n", 400),
            (b"GET /v1/health HTTP/1.1\r\nHost: a\r\nX: \x01\r\n\r\n", 400),
            (b"GET /v1/health HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", 400),
            (b"GET /v1/health HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
            (b"GET /v1/health HTTP/1.1\r\nHost: a\r\nContent-Length: 65537\r\n\r\n", 413),
            (b"GET /v1/health HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999999\r\n\r\n", 413),
            (b"GET /v1/health HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n", 501),
            (b"GET /v1/health HTTP/1.1\r\nHost: a\r\nAuthorization: a\r\nAuthorization: b\r\n\r\n", 400),
            (b"GET /v1/health HTTP/1.1\r\nHost: a\r\n", 400),
        ];
        for (head, want) in cases {
            assert_eq!(status(head), *want, "{}", String::from_utf8_lossy(head));
        }
    }

    #[test]
    fn rejects_too_many_fields_and_oversized_heads() {
        let mut h = b"GET / HTTP/1.1\r\nHost: a\r\n".to_vec();
        for i in 0..MAX_HEADERS {
            h.extend_from_slice(format!("X-{i}: 1\r\n").as_bytes());
        }
        h.extend_from_slice(b"\r\n");
        assert_eq!(status(&h), 431);
        let mut h = b"GET / HTTP/1.1\r\nHost: a\r\nX: ".to_vec();
        h.resize(MAX_HEAD, b'a');
        h.extend_from_slice(b"\r\n\r\n");
        assert_eq!(status(&h), 431);
    }

    #[test]
    fn head_end_finds_the_blank_line() {
        assert_eq!(head_end(b"GET / HTTP/1.0\r\n\r\nbody"), Some(18));
        assert_eq!(head_end(b"GET / HTTP/1.0\r\n"), None);
        assert_eq!(head_end(b""), None);
    }

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
    fn percent_coding_round_trips() {
        for s in ["iqn.2026-11.io.ironlun:lab", "a b/c%d", "é"] {
            assert_eq!(percent_decode(&percent_encode(s)).as_deref(), Some(s));
        }
        assert_eq!(percent_encode("a b/c"), "a%20b%2Fc");
        assert_eq!(percent_decode("%"), None);
        assert_eq!(percent_decode("%4"), None);
        assert_eq!(percent_decode("%ff"), None); // not UTF-8
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
    fn responses_carry_length_and_json() {
        let r = Response::error(404, "no \"x\"");
        let wire = String::from_utf8(r.encode()).unwrap();
        assert!(wire.starts_with("HTTP/1.1 404 Not Found\r\n"), "{wire}");
        assert!(wire.contains("Content-Length: 40\r\n"), "{wire}");
        assert!(
            wire.ends_with("\r\n\r\n{\"error\":\"no \\\"x\\\"\",\"code\":\"not_found\"}\n"),
            "{wire}"
        );
        let wire = String::from_utf8(Response::error(401, "x").encode()).unwrap();
        assert!(wire.contains("WWW-Authenticate: Bearer"), "{wire}");
        let wire = String::from_utf8(Response::error(405, "x").encode()).unwrap();
        assert!(wire.contains("Allow: GET\r\n"), "{wire}");
        let post: Response = route("GET", "/v1/luns/t/0/owner").unwrap_err().into();
        let wire = String::from_utf8(post.encode()).unwrap();
        assert!(wire.contains("Allow: POST\r\n"), "{wire}");
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
            (OwnershipOpError::Aborted(3), 409, "aborted"),
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
        assert_eq!(HandoverJson::of(&Handover::Idle), None);
        let p = Handover::Prepared {
            from: "a".into(),
            to: "b".into(),
            epoch: 4,
        };
        let j = HandoverJson::of(&p).unwrap();
        assert_eq!(
            (j.state.as_str(), j.from.as_str(), j.to.as_str(), j.epoch),
            ("prepared", "a", "b", 4)
        );
        let f = Handover::Fenced {
            from: "a".into(),
            to: "b".into(),
            epoch: 4,
        };
        assert_eq!(HandoverJson::of(&f).unwrap().state, "fenced");
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
            (ok.epoch, ok.deadline_ms, ok.on_deadline.as_deref()),
            (2, Some(10), Some("refuse"))
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
