//! The admin API: HTTP/1.1 with JSON bodies, served by the daemon on `[admin] listen`
//! (loopback by default; `ironlun ctl` is its client, [`crate::ctl`]).
//!
//! Endpoints (all `GET`, all answering `application/json`):
//! - `/v1/health` → `{"status":"ok","version":"…"}`;
//! - `/v1/reservations` → `{"luns":[…]}`, the reservation state of every LU of every target;
//! - `/v1/reservations/<target>/<lun>` → one LU ([`LuReservations`]); 404 when unknown.
//!
//! Errors are `{"error":"…"}` with a 4xx/5xx status. With `[admin] token_file` every request
//! needs `Authorization: Bearer <token>` (RFC 6750 §2.1), else 401.
//!
//! The HTTP layer is a deliberately small, strict HTTP/1.1 subset (RFC 9112): one request per
//! connection (`Connection: close`), a request head of at most [`MAX_HEAD`] bytes and
//! [`MAX_HEADERS`] fields, a body only with `Content-Length` up to [`MAX_BODY`] (read and
//! ignored), no `Transfer-Encoding`, a deadline for the whole request, and a bounded number of
//! connections. The parser ([`parse_head`]) is pure and never panics on any input.

use crate::config;
use crate::target::Registry;
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

/// `{"error": "…"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorJson {
    pub error: String,
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
}

impl HttpError {
    fn new(status: u16, message: impl Into<String>) -> Self {
        HttpError {
            status,
            message: message.into(),
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
    let (method, path, minor) = parse_request_line(request_line)?;
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
        authorization,
        content_length,
    })
}

/// `method SP request-target SP HTTP-version` (RFC 9112 §3); the target in origin form.
fn parse_request_line(line: &[u8]) -> Result<(String, String, u8), HttpError> {
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
    let path = target
        .split(|b| *b == b'?' || *b == b'#')
        .next()
        .unwrap_or_default();
    Ok((
        String::from_utf8_lossy(method).into_owned(),
        String::from_utf8_lossy(path).into_owned(),
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
    Reservation { target: String, lun: u64 },
}

/// Map a path to a [`Route`] (404 when none matches) and check the method (405).
pub fn route(method: &str, path: &str) -> Result<Route, HttpError> {
    let not_found = || HttpError::new(404, format!("no such resource: {path}"));
    let mut segs = path.strip_prefix('/').ok_or_else(not_found)?.split('/');
    let r = match (
        segs.next(),
        segs.next(),
        segs.next(),
        segs.next(),
        segs.next(),
    ) {
        (Some("v1"), Some("health"), None, None, None) => Route::Health,
        (Some("v1"), Some("reservations"), None, None, None) => Route::Reservations,
        (Some("v1"), Some("reservations"), Some(t), Some(l), None) => {
            let target = percent_decode(t)
                .filter(|t| !t.is_empty())
                .ok_or_else(|| HttpError::new(400, "bad target name in path"))?;
            let lun = l
                .parse::<u64>()
                .map_err(|_| HttpError::new(404, format!("no such LUN: {l:?}")))?;
            Route::Reservation { target, lun }
        }
        _ => return Err(not_found()),
    };
    if method != "GET" {
        return Err(HttpError::new(
            405,
            format!("method {method} not allowed here (GET only)"),
        ));
    }
    Ok(r)
}

/// A response ready to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Response {
    fn json<T: Serialize>(status: u16, v: &T) -> Response {
        match serde_json::to_vec_pretty(v) {
            Ok(mut body) => {
                body.push(b'\n');
                Response { status, body }
            }
            Err(e) => Response::error(500, &format!("cannot encode JSON: {e}")),
        }
    }

    pub fn error(status: u16, message: &str) -> Response {
        let mut body = serde_json::to_vec(&ErrorJson {
            error: message.to_string(),
        })
        .unwrap_or_else(|_| b"{\"error\":\"?\"}".to_vec());
        body.push(b'\n');
        Response { status, body }
    }

    /// The bytes on the wire: status line, fields, body.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n",
            self.status,
            reason(self.status),
            self.body.len()
        );
        match self.status {
            401 => out.push_str("WWW-Authenticate: Bearer realm=\"ironlun\"\r\n"),
            405 => out.push_str("Allow: GET\r\n"),
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
        Response::error(e.status, &e.message)
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

/// Answer a parsed request against the registry.
pub fn respond(req: &Request, token: Option<&Token>, registry: &Registry) -> Response {
    if let Some(t) = token {
        if !t.admits(req.authorization.as_deref()) {
            return Response::error(401, "missing or wrong bearer token");
        }
    }
    match route(&req.method, &req.path) {
        Err(e) => e.into(),
        Ok(Route::Health) => Response::json(
            200,
            &Health {
                status: "ok".into(),
                version: env!("CARGO_PKG_VERSION").into(),
            },
        ),
        Ok(Route::Reservations) => {
            let mut luns = Vec::new();
            for t in &registry.targets {
                for (id, l) in &t.luns {
                    luns.push(lu_reservations(&t.name, *id, &l.pr_snapshot()));
                }
            }
            Response::json(200, &ReservationsList { luns })
        }
        Ok(Route::Reservation { target, lun }) => {
            let Some(t) = registry.target(&target) else {
                return Response::error(404, &format!("no target {target}"));
            };
            match t.luns.get(&lun) {
                Some(l) => Response::json(200, &lu_reservations(&t.name, lun, &l.pr_snapshot())),
                None => Response::error(404, &format!("no LUN {lun} in target {}", t.name)),
            }
        }
    }
}

/// Read one request from `s` and answer it; `None` when the peer went away without sending
/// anything worth an answer.
async fn read_and_respond(
    s: &mut TcpStream,
    token: Option<&Token>,
    registry: &Registry,
) -> Option<Response> {
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
            return Some(Response::error(431, "request head too large"));
        }
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return if buf.is_empty() {
                None
            } else {
                Some(Response::error(400, "incomplete request head"))
            };
        }
        buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
    };
    let head = buf.get(..head_len).unwrap_or_default();
    let req = match parse_head(head) {
        Ok(r) => r,
        Err(e) => return Some(e.into()),
    };
    // Read (and ignore) the body: bounded by parse_head.
    let have = u64::try_from(buf.len().saturating_sub(head_len)).unwrap_or(u64::MAX);
    let mut left = req.content_length.saturating_sub(have);
    while left > 0 {
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return Some(Response::error(400, "incomplete request body"));
        }
        left = left.saturating_sub(u64::try_from(n).unwrap_or(u64::MAX));
    }
    Some(respond(&req, token, registry))
}

async fn serve_connection(mut s: TcpStream, token: Option<Arc<Token>>, registry: Arc<Registry>) {
    let response = match tokio::time::timeout(
        REQUEST_TIMEOUT,
        read_and_respond(&mut s, token.as_deref(), &registry),
    )
    .await
    {
        Ok(Some(r)) => r,
        Ok(None) => return,
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
                authorization: None,
                content_length: 0,
            }
        );
    }

    #[test]
    fn accepts_http10_without_host_and_strips_query() {
        let r = parse_head(b"GET /v1/reservations?x=1 HTTP/1.0\r\n\r\n").unwrap();
        assert_eq!(r.path, "/v1/reservations");
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
        assert!(wire.contains("Content-Length: 21\r\n"), "{wire}");
        assert!(
            wire.ends_with("\r\n\r\n{\"error\":\"no \\\"x\\\"\"}\n"),
            "{wire}"
        );
        let wire = String::from_utf8(Response::error(401, "x").encode()).unwrap();
        assert!(wire.contains("WWW-Authenticate: Bearer"), "{wire}");
        let wire = String::from_utf8(Response::error(405, "x").encode()).unwrap();
        assert!(wire.contains("Allow: GET\r\n"), "{wire}");
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
                "spc2_holder": null
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
