//! `ironlun ctl`: the admin API's command-line client (the server is `ironlun::admin`; the bodies are `ironlun_api`).
//!
//! A small blocking client: each call runs one HTTP/1.1 exchange with hyper's client
//! connection on a current-thread runtime, over the daemon's Unix socket (the default) or TCP
//! (`http://HOST:PORT`), with a connect and a whole-response timeout and a bounded response.
//! Output is a table for people ([`crate::table`]: a header row in capitals, columns separated
//! by two spaces, `-` for an empty cell) or, with `--json` (before or after the subcommand),
//! the API's JSON unchanged.

use crate::table;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use ironlun_api::{
    CommitJson, ErrorJson, EventsJson, FailoverAllJson, FailoverJson, LuReservations, OwnerJson,
    OwnershipJson, ReservationsList, Token,
};
use std::io::Write;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The admin sockets `ironlun ctl` tries, in order, without `--admin` / `IRONLUN_ADMIN`:
/// the systemd unit's (`RuntimeDirectory=ironlun`) and that of `ironlun serve` started in the
/// current directory with no arguments (data directory `./ironlun-data`).
pub const DEFAULT_SOCKETS: &[&str] = &["/run/ironlun/admin.sock", "ironlun-data/admin.sock"];
/// The port of an `http://HOST` URL without one.
pub const DEFAULT_PORT: u16 = 3262;
/// Connect timeout (per address).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// The whole response must arrive within this.
pub(crate) const RESPONSE_TIMEOUT: Duration = Duration::from_secs(15);
/// Largest response read (the JSON of many LUs with many registrations).
const MAX_RESPONSE: usize = 64 << 20;

/// Why a `ctl` command failed (exit status 1, the message on stderr).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CtlError(pub String);

impl std::fmt::Display for CtlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CtlError {}

fn err<T>(m: impl Into<String>) -> Result<T, CtlError> {
    Err(CtlError(m.into()))
}

/// The admin URL to use: `arg` (`--admin`), else `$IRONLUN_ADMIN`, else the first of
/// [`DEFAULT_SOCKETS`] that exists (the first one when none does, so that the error names it).
pub fn admin_url(arg: Option<String>) -> String {
    if let Some(a) = arg.filter(|s| !s.is_empty()).or_else(|| {
        std::env::var("IRONLUN_ADMIN")
            .ok()
            .filter(|s| !s.is_empty())
    }) {
        return a;
    }
    let found = DEFAULT_SOCKETS
        .iter()
        .find(|p| Path::new(p).exists())
        .or(DEFAULT_SOCKETS.first())
        .copied()
        .unwrap_or_default();
    format!("unix:{found}")
}

/// Where the admin API is: a Unix socket or an `http://host:port[/prefix]` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp {
        /// As written (for messages and the `Host` field), e.g. `127.0.0.1:3262` or `[::1]:3262`.
        authority: String,
        host: String,
        port: u16,
        /// Path prefix without a trailing slash (usually empty).
        prefix: String,
    },
}

impl Endpoint {
    /// Parse an admin address: `unix:PATH`, a socket path (starting with `/` or `.`), or an
    /// `http://HOST[:PORT][/prefix]` URL (plain HTTP: TCP is only served with a token; the
    /// port defaults to 3262).
    pub fn parse(url: &str) -> Result<Endpoint, CtlError> {
        if let Some(p) = url.strip_prefix("unix:") {
            if p.is_empty() {
                return err(format!("admin address {url:?}: no socket path after unix:"));
            }
            return Ok(Endpoint::Unix(PathBuf::from(p)));
        }
        if url.starts_with('/') || url.starts_with('.') {
            return Ok(Endpoint::Unix(PathBuf::from(url)));
        }
        let Some(rest) = url.strip_prefix("http://") else {
            return err(format!(
                "admin address {url:?}: expected unix:PATH or http://HOST:PORT"
            ));
        };
        let (authority, prefix) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let Some((h, tail)) = v6.split_once(']') else {
                return err(format!("admin URL {url:?}: unterminated [IPv6] host"));
            };
            (h, tail.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return err(format!("admin URL {url:?}: no host"));
        }
        let port = match port {
            Some(p) => p
                .parse::<u16>()
                .map_err(|_| CtlError(format!("admin URL {url:?}: bad port {p:?}")))?,
            None => DEFAULT_PORT,
        };
        Ok(Endpoint::Tcp {
            authority: authority.to_string(),
            host: host.to_string(),
            port,
            prefix: prefix.trim_end_matches('/').to_string(),
        })
    }

    /// The address again, for messages.
    pub fn url(&self) -> String {
        match self {
            Endpoint::Unix(p) => format!("unix:{}", p.display()),
            Endpoint::Tcp {
                authority, prefix, ..
            } => format!("http://{authority}{prefix}"),
        }
    }
}

/// A response: status and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
}

/// A client of one daemon's admin API.
#[derive(Debug, Clone)]
pub struct Client {
    pub endpoint: Endpoint,
    token: Option<Token>,
}

/// A connected stream of either kind.
enum Stream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

impl Client {
    pub fn new(url: &str, token_file: Option<&Path>) -> Result<Client, CtlError> {
        let endpoint = Endpoint::parse(url)?;
        let token = match token_file {
            Some(p) => Some(Token::load(p).map_err(CtlError)?),
            None => None,
        };
        Ok(Client { endpoint, token })
    }

    /// `GET path` (an absolute path below the endpoint's prefix).
    pub fn get(&self, path: &str) -> Result<Reply, CtlError> {
        self.request("GET", path, None, RESPONSE_TIMEOUT)
    }

    /// `method path` with an optional JSON `body`; the whole response must arrive within
    /// `timeout` (used by `ironlun migrate` for the handover calls). Every failure to get a
    /// complete response (unreachable, refused, timed out, cut off) is an `Err`, so that a
    /// caller can tell "no answer" from any status.
    ///
    /// Blocking: runs its own current-thread runtime (on a scoped thread when called from
    /// inside a tokio runtime, where blocking in place is not allowed).
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<Reply, CtlError> {
        // Small enough to add to an Instant.
        let timeout = timeout.clamp(Duration::from_millis(1), Duration::from_secs(86_400));
        let run = || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| CtlError(format!("cannot start a runtime: {e}")))?;
            rt.block_on(async {
                match tokio::time::timeout(timeout, self.exchange(method, path, body)).await {
                    Ok(r) => r,
                    Err(_) => err(format!(
                        "admin API {}: no complete response in time",
                        self.endpoint.url()
                    )),
                }
            })
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            std::thread::scope(|s| {
                s.spawn(run)
                    .join()
                    .unwrap_or_else(|_| err("admin client thread panicked"))
            })
        } else {
            run()
        }
    }

    async fn connect(&self) -> Result<Stream, CtlError> {
        let e = &self.endpoint;
        let unreachable = |why: String| {
            CtlError(format!(
                "cannot reach the ironlun admin API at {} ({why}); is `ironlun serve` running with the admin API there? (set it with --admin unix:PATH|http://HOST:PORT or IRONLUN_ADMIN)",
                e.url()
            ))
        };
        match e {
            Endpoint::Unix(p) => {
                match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::UnixStream::connect(p))
                    .await
                {
                    Ok(Ok(s)) => Ok(Stream::Unix(s)),
                    Ok(Err(x)) => Err(unreachable(x.to_string())),
                    Err(_) => Err(unreachable("connect timed out".into())),
                }
            }
            Endpoint::Tcp { host, port, .. } => {
                let addrs: Vec<SocketAddr> = (host.as_str(), *port)
                    .to_socket_addrs()
                    .map_err(|x| CtlError(format!("admin API {}: cannot resolve: {x}", e.url())))?
                    .collect();
                let mut last = "no address".to_string();
                for a in addrs {
                    match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(a))
                        .await
                    {
                        Ok(Ok(s)) => {
                            let _ = s.set_nodelay(true);
                            return Ok(Stream::Tcp(s));
                        }
                        Ok(Err(x)) => last = x.to_string(),
                        Err(_) => last = "connect timed out".into(),
                    }
                }
                Err(unreachable(last))
            }
        }
    }

    /// One exchange on a fresh connection.
    async fn exchange(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<Reply, CtlError> {
        let e = &self.endpoint;
        let io = |x: hyper::Error| CtlError(format!("admin API {}: {x}", e.url()));
        let (host, prefix) = match e {
            Endpoint::Unix(_) => ("localhost", ""),
            Endpoint::Tcp {
                authority, prefix, ..
            } => (authority.as_str(), prefix.as_str()),
        };
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(format!("{prefix}{path}"))
            .header(hyper::header::HOST, host)
            .header(hyper::header::ACCEPT, "application/json")
            .header(
                hyper::header::USER_AGENT,
                concat!("ironlun-ctl/", env!("CARGO_PKG_VERSION")),
            );
        if let Some(t) = &self.token {
            let mut v = b"Bearer ".to_vec();
            v.extend_from_slice(t.expose());
            req = req.header(hyper::header::AUTHORIZATION, v);
        }
        if body.is_some() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::copy_from_slice(body.unwrap_or_default())))
            .map_err(|x| CtlError(format!("admin API {}: bad request: {x}", e.url())))?;
        let mut sender = match self.connect().await? {
            Stream::Tcp(s) => handshake(s).await.map_err(io)?,
            Stream::Unix(s) => handshake(s).await.map_err(io)?,
        };
        let resp = sender.send_request(req).await.map_err(io)?;
        let status = resp.status().as_u16();
        let body = Limited::new(resp.into_body(), MAX_RESPONSE)
            .collect()
            .await
            .map_err(|x| CtlError(format!("admin API {}: response body: {x}", e.url())))?
            .to_bytes()
            .to_vec();
        Ok(Reply { status, body })
    }

    /// `GET path` expecting 200 and JSON of type `T`; other statuses become the API's
    /// `{"error"}` message.
    pub fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, CtlError> {
        let r = self.get(path)?;
        if r.status != 200 {
            let msg = serde_json::from_slice::<ErrorJson>(&r.body)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&r.body).trim().to_string());
            let hint = if r.status == 401 {
                if self.token.is_some() {
                    " (the token in --token-file is not the daemon's)"
                } else {
                    " (the daemon wants a token: --token-file FILE)"
                }
            } else {
                ""
            };
            return err(format!("{msg} (HTTP {}){hint}", r.status));
        }
        serde_json::from_slice(&r.body).map_err(|x| {
            CtlError(format!(
                "admin API {}: unexpected JSON: {x}",
                self.endpoint.url()
            ))
        })
    }
}

/// An HTTP/1.1 client connection on `s`, its driver spawned on the current runtime.
async fn handshake<S>(
    s: S,
) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, hyper::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(s)).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "admin client connection");
        }
    });
    Ok(sender)
}

/// A `TARGET/LUN` argument: the LUN after the last `/`.
pub fn parse_selector(s: &str) -> Result<(String, u64), String> {
    let Some((t, l)) = s.rsplit_once('/') else {
        return Err(format!(
            "{s:?}: expected TARGET/LUN, e.g. iqn.2026-11.io.ironlun:lab/0"
        ));
    };
    if t.is_empty() {
        return Err(format!("{s:?}: no target name before the /"));
    }
    let lun = l
        .parse::<u64>()
        .map_err(|_| format!("{s:?}: LUN {l:?} is not a number"))?;
    Ok((t.to_string(), lun))
}

/// `ironlun ctl reservations [TARGET/LUN] [--json]`: write the output to `out`.
pub fn reservations(
    client: &Client,
    selector: Option<&(String, u64)>,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), CtlError> {
    let luns = match selector {
        Some((t, l)) => {
            let path = format!("/v1/reservations/{}/{l}", ironlun_api::percent_encode(t));
            if json {
                let one: serde_json::Value = client.get_json(&path)?;
                return write_json(out, &one);
            }
            vec![client.get_json::<LuReservations>(&path)?]
        }
        None => {
            if json {
                let all: serde_json::Value = client.get_json("/v1/reservations")?;
                return write_json(out, &all);
            }
            client
                .get_json::<ReservationsList>("/v1/reservations")?
                .luns
        }
    };
    out.write_all(render_reservations(&luns).as_bytes())
        .map_err(|e| CtlError(format!("cannot write output: {e}")))
}

fn write_json(out: &mut dyn Write, v: &serde_json::Value) -> Result<(), CtlError> {
    let text =
        serde_json::to_string_pretty(v).map_err(|e| CtlError(format!("cannot print JSON: {e}")))?;
    writeln!(out, "{text}").map_err(|e| CtlError(format!("cannot write output: {e}")))
}

/// The human view: per LU a header line, the reservation, and a table of registrations.
pub fn render_reservations(luns: &[LuReservations]) -> String {
    let mut s = String::new();
    if luns.is_empty() {
        s.push_str("no logical units\n");
    }
    for (i, lu) in luns.iter().enumerate() {
        if i > 0 {
            s.push('\n');
        }
        s.push_str(&format!(
            "{} LUN {}  generation {}  APTPL {}\n",
            lu.target,
            lu.lun,
            lu.generation,
            if lu.aptpl { "on" } else { "off" }
        ));
        match &lu.reservation {
            Some(r) => s.push_str(&format!(
                "  reservation: {} (type {}), holder {}, key {}\n",
                r.type_name,
                r.type_code,
                r.holder.as_deref().unwrap_or("every registrant"),
                r.key
            )),
            None => s.push_str("  no reservation\n"),
        }
        if let Some(h) = &lu.spc2_holder {
            s.push_str(&format!("  SPC-2 reservation held by {h}\n"));
        }
        if lu.owner.is_some() || lu.epoch != 0 || lu.handover.is_some() {
            s.push_str(&format!(
                "  owner: {}, epoch {}",
                lu.owner.as_deref().unwrap_or("none"),
                lu.epoch
            ));
            match &lu.handover {
                Some(h) => s.push_str(&format!(
                    ", handover {} {} -> {} (epoch {})\n",
                    h.state, h.from, h.to, h.epoch
                )),
                None => s.push('\n'),
            }
        }
        if lu.registrations.is_empty() {
            s.push_str("  no registrations\n");
            continue;
        }
        let rows: Vec<Vec<String>> = lu
            .registrations
            .iter()
            .map(|g| {
                vec![
                    g.initiator_port.clone(),
                    g.key.clone(),
                    g.target_port.clone(),
                    yes_no(g.holder),
                ]
            })
            .collect();
        s.push_str(&table::render(
            2,
            &["INITIATOR PORT", "KEY", "TARGET PORT", "HOLDER"],
            &rows,
        ));
    }
    s
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_string()
}

/// `-` for an absent value in a table cell.
fn or_dash(v: Option<&str>) -> String {
    v.unwrap_or("-").to_string()
}

// ---------------------------------------------------------------------------------------------
// Ownership and handover (issue 6): `ctl own`, `ctl ownership`, `ctl handover`, `ctl events`.

/// `method path` with a JSON body, expecting 200 and JSON of type `T` (other statuses become
/// the API's `{"error","code"}` message).
pub(crate) fn call_json<T: serde::de::DeserializeOwned>(
    client: &Client,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
    timeout: Duration,
) -> Result<T, CtlError> {
    let bytes = match body {
        Some(v) => {
            Some(serde_json::to_vec(v).map_err(|e| CtlError(format!("cannot encode JSON: {e}")))?)
        }
        None => None,
    };
    let r = client.request(method, path, bytes.as_deref(), timeout)?;
    if r.status != 200 {
        let msg = match serde_json::from_slice::<ErrorJson>(&r.body) {
            Ok(e) if !e.code.is_empty() => format!("{} [{}]", e.error, e.code),
            Ok(e) => e.error,
            Err(_) => String::from_utf8_lossy(&r.body).trim().to_string(),
        };
        return err(format!("{msg} (HTTP {})", r.status));
    }
    serde_json::from_slice(&r.body).map_err(|x| {
        CtlError(format!(
            "admin API {}: unexpected JSON: {x}",
            client.endpoint.url()
        ))
    })
}

/// `/v1/luns/<target>/<lun>/<rest>`.
fn lu_path((t, l): &(String, u64), rest: &str) -> String {
    format!("/v1/luns/{}/{l}/{rest}", ironlun_api::percent_encode(t))
}

fn write_text(out: &mut dyn Write, text: &str) -> Result<(), CtlError> {
    out.write_all(text.as_bytes())
        .map_err(|e| CtlError(format!("cannot write output: {e}")))
}

/// The handover cell: `STATE FROM -> TO (epoch N)`, or `-`.
fn handover_cell(h: Option<&ironlun_api::HandoverJson>) -> String {
    h.map_or_else(
        || "-".to_string(),
        |h| format!("{} {} -> {} (epoch {})", h.state, h.from, h.to, h.epoch),
    )
}

/// The ownership table: one row per LU (`TARGET/LUN`).
pub fn render_ownership(luns: &[(String, OwnershipJson)]) -> String {
    if luns.is_empty() {
        return "no logical units\n".to_string();
    }
    let rows: Vec<Vec<String>> = luns
        .iter()
        .map(|(lu, o)| {
            vec![
                lu.clone(),
                or_dash(o.owner.as_deref()),
                o.epoch.to_string(),
                o.generation.to_string(),
                handover_cell(o.handover.as_ref()),
            ]
        })
        .collect();
    table::render(
        0,
        &["LUN", "OWNER", "EPOCH", "GENERATION", "HANDOVER"],
        &rows,
    )
}

/// `ironlun ctl own TARGET/LUN HOST [--epoch N]`: without `--epoch`, one above the LU's.
pub fn own(
    client: &Client,
    lu: &(String, u64),
    host: &str,
    epoch: Option<u64>,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), CtlError> {
    let epoch = match epoch {
        Some(e) => e,
        None => {
            let o: OwnershipJson = client.get_json(&lu_path(lu, "ownership"))?;
            o.epoch.saturating_add(1)
        }
    };
    let body = serde_json::json!({"host": host, "epoch": epoch});
    post_owner(client, lu, "owner", &body, json, out)
}

/// POST `body` to the LU's `rest` (`owner`, `release`) and print the [`OwnerJson`] answer.
fn post_owner(
    client: &Client,
    lu: &(String, u64),
    rest: &str,
    body: &serde_json::Value,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), CtlError> {
    let r: serde_json::Value = call_json(
        client,
        "POST",
        &lu_path(lu, rest),
        Some(body),
        RESPONSE_TIMEOUT,
    )?;
    if json {
        return write_json(out, &r);
    }
    let o: OwnerJson =
        serde_json::from_value(r).map_err(|e| CtlError(format!("unexpected JSON: {e}")))?;
    let row = vec![
        format!("{}/{}", lu.0, lu.1),
        or_dash(o.owner.as_deref()),
        o.epoch.to_string(),
        o.generation.to_string(),
    ];
    write_text(
        out,
        &table::render(0, &["LUN", "OWNER", "EPOCH", "GENERATION"], &[row]),
    )
}

/// `ironlun ctl release TARGET/LUN HOST [--epoch N]`: end HOST's target-managed ownership
/// (the daemon picks the LU's next epoch without `--epoch`).
pub fn release(
    client: &Client,
    lu: &(String, u64),
    host: &str,
    epoch: Option<u64>,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), CtlError> {
    let body = serde_json::to_value(ironlun_api::ReleaseRequest {
        host: host.to_string(),
        epoch,
    })
    .map_err(|e| CtlError(format!("cannot encode JSON: {e}")))?;
    post_owner(client, lu, "release", &body, json, out)
}

/// What `ironlun ctl failover` moves: one LU away from `from` (at `epoch`, default the
/// LU's next), or every LU a host owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailoverScope {
    Lu {
        lu: (String, u64),
        from: String,
        epoch: Option<u64>,
    },
    AllOf(String),
}

/// How long a failover may take: its drain has no deadline of its own (as PREEMPT AND
/// ABORT's), so the client waits longer than for other calls.
const FAILOVER_TIMEOUT: Duration = Duration::from_secs(120);

/// `ironlun ctl failover (TARGET/LUN --from DEAD | --all-of DEAD) --to HOST [--epoch N]
/// [--force]`: DEAD's registrations go, its commands are aborted and drained, HOST owns the
/// LU. Fails (non-zero exit) when any LU was refused.
pub fn failover(
    client: &Client,
    scope: &FailoverScope,
    to: &str,
    force: bool,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), CtlError> {
    let all = match scope {
        FailoverScope::Lu { lu, from, epoch } => {
            let body = serde_json::to_value(ironlun_api::FailoverRequest {
                from: from.clone(),
                to: to.to_string(),
                epoch: *epoch,
                force,
            })
            .map_err(|e| CtlError(format!("cannot encode JSON: {e}")))?;
            let one: FailoverJson = call_json(
                client,
                "POST",
                &lu_path(lu, "failover"),
                Some(&body),
                FAILOVER_TIMEOUT,
            )?;
            FailoverAllJson {
                luns: vec![one],
                refused: Vec::new(),
            }
        }
        FailoverScope::AllOf(dead) => {
            let body = serde_json::to_vec(&ironlun_api::FailoverAllRequest {
                all_of: dead.clone(),
                to: to.to_string(),
                force,
            })
            .map_err(|e| CtlError(format!("cannot encode JSON: {e}")))?;
            let r = client.request("POST", "/v1/failover", Some(&body), FAILOVER_TIMEOUT)?;
            match (r.status, serde_json::from_slice::<FailoverAllJson>(&r.body)) {
                (200 | 409, Ok(all)) => all,
                _ => {
                    let msg = match serde_json::from_slice::<ErrorJson>(&r.body) {
                        Ok(e) if !e.code.is_empty() => format!("{} [{}]", e.error, e.code),
                        Ok(e) => e.error,
                        Err(_) => String::from_utf8_lossy(&r.body).trim().to_string(),
                    };
                    return err(format!("{msg} (HTTP {})", r.status));
                }
            }
        }
    };
    if json {
        let v =
            serde_json::to_value(&all).map_err(|e| CtlError(format!("cannot encode JSON: {e}")))?;
        write_json(out, &v)?;
    } else {
        write_text(out, &render_failovers(&all.luns))?;
    }
    if all.refused.is_empty() {
        return Ok(());
    }
    let lines: Vec<String> = all
        .refused
        .iter()
        .map(|r| format!("{}/{}: {} [{}]", r.target, r.lun, r.error, r.code))
        .collect();
    err(format!("refused: {}", lines.join("; ")))
}

/// The table of `ironlun ctl failover`.
pub fn render_failovers(luns: &[FailoverJson]) -> String {
    let rows: Vec<Vec<String>> = luns
        .iter()
        .map(|f| {
            vec![
                format!("{}/{}", f.target, f.lun),
                or_dash(f.owner.as_deref()),
                f.epoch.to_string(),
                f.generation.to_string(),
                yes_no(f.aborted),
                if f.idempotent {
                    "retry (no change)".to_string()
                } else {
                    format!("{:.3} ms", f.took_us as f64 / 1000.0)
                },
            ]
        })
        .collect();
    table::render(
        0,
        &["LUN", "OWNER", "EPOCH", "GENERATION", "ABORTED", "TOOK"],
        &rows,
    )
}

/// `ironlun ctl ownership [TARGET/LUN] [--json]`: every LU without a selector.
pub fn ownership(
    client: &Client,
    selector: Option<&(String, u64)>,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), CtlError> {
    let luns: Vec<(String, u64)> = match selector {
        Some(s) => vec![s.clone()],
        None => client
            .get_json::<ReservationsList>("/v1/reservations")?
            .luns
            .into_iter()
            .map(|l| (l.target, l.lun))
            .collect(),
    };
    let mut all = Vec::new();
    for lu in &luns {
        let v: serde_json::Value = client.get_json(&lu_path(lu, "ownership"))?;
        all.push((lu, v));
    }
    if json {
        let v = match (selector, all.as_slice()) {
            (Some(_), [(_, one)]) => one.clone(),
            _ => serde_json::Value::Array(
                all.iter()
                    .map(|((t, l), v)| serde_json::json!({"target": t, "lun": l, "ownership": v}))
                    .collect(),
            ),
        };
        return write_json(out, &v);
    }
    let mut rows = Vec::new();
    for ((t, l), v) in &all {
        let o: OwnershipJson = serde_json::from_value(v.clone())
            .map_err(|e| CtlError(format!("unexpected JSON: {e}")))?;
        rows.push((format!("{t}/{l}"), o));
    }
    write_text(out, &render_ownership(&rows))
}

/// A handover step for `ironlun ctl handover`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandoverArgs {
    pub lu: (String, u64),
    pub from: String,
    pub to: String,
    pub epoch: u64,
    /// Commit only.
    pub deadline_ms: Option<u64>,
    /// Commit only.
    pub on_deadline: Option<ironlun_api::OnDeadline>,
    /// Prepare only: commit at the destination's first write.
    pub commit_on_write: bool,
}

/// `ironlun ctl handover prepare|commit|abort TARGET/LUN --from S --to D --epoch N …`.
pub fn handover(
    client: &Client,
    step: &str,
    a: &HandoverArgs,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), CtlError> {
    let body = ironlun_api::HandoverRequest {
        from: a.from.clone(),
        to: a.to.clone(),
        epoch: a.epoch,
        deadline_ms: a.deadline_ms,
        on_deadline: a.on_deadline,
        commit_on_write: a.commit_on_write,
    };
    let body =
        serde_json::to_value(&body).map_err(|e| CtlError(format!("cannot encode JSON: {e}")))?;
    // A commit may wait for its drain deadline, an abort of stuck I/O and the flush.
    let timeout = RESPONSE_TIMEOUT
        .saturating_add(Duration::from_millis(
            a.deadline_ms.unwrap_or(ironlun_api::DEFAULT_DEADLINE_MS),
        ))
        .saturating_add(ironlun_api::ABORT_WAIT);
    let r: serde_json::Value = call_json(
        client,
        "POST",
        &lu_path(&a.lu, &format!("handover/{step}")),
        Some(&body),
        timeout,
    )?;
    if json {
        return write_json(out, &r);
    }
    let lu = format!("{}/{}", a.lu.0, a.lu.1);
    let text = match step {
        "commit" => {
            let c: CommitJson =
                serde_json::from_value(r).map_err(|e| CtlError(format!("unexpected JSON: {e}")))?;
            render_commit(&lu, &c)
        }
        _ => {
            let state = if step == "prepare" {
                "prepared"
            } else {
                "aborted"
            };
            let row = vec![
                lu,
                state.to_string(),
                a.from.clone(),
                a.to.clone(),
                a.epoch.to_string(),
            ];
            table::render(0, &["LUN", "HANDOVER", "FROM", "TO", "EPOCH"], &[row])
        }
    };
    write_text(out, &text)
}

/// The human view of a commit: the new owner, then each step's time.
pub fn render_commit(lu: &str, c: &CommitJson) -> String {
    let ms = |us: u64| format!("{}.{:03} ms", us / 1000, us % 1000);
    let row = vec![
        lu.to_string(),
        or_dash(c.owner.as_deref()),
        c.epoch.to_string(),
        c.generation.to_string(),
        if c.idempotent {
            "already committed"
        } else {
            "committed"
        }
        .to_string(),
    ];
    let mut s = table::render(
        0,
        &["LUN", "OWNER", "EPOCH", "GENERATION", "HANDOVER"],
        &[row],
    );
    let st = &c.steps_us;
    let steps = vec![
        ms(st.fence),
        ms(st.drain),
        ms(st.flush),
        ms(st.transfer),
        ms(st.total),
    ];
    s.push_str(&table::render(
        2,
        &["FENCE", "DRAIN", "FLUSH", "TRANSFER", "TOTAL"],
        &[steps],
    ));
    if c.aborted_tasks > 0 {
        s.push_str(&format!(
            "  {} command(s) of the source still running at the deadline were aborted\n",
            c.aborted_tasks
        ));
    }
    s
}

/// `ironlun ctl events [--since N] [--json]`.
pub fn events(
    client: &Client,
    since: u64,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), CtlError> {
    let path = format!("/v1/events?since={since}");
    if json {
        let v: serde_json::Value = client.get_json(&path)?;
        return write_json(out, &v);
    }
    let ev: EventsJson = client.get_json(&path)?;
    write_text(out, &render_events(&ev.events))
}

/// The event table: sequence number, UTC time, LU, kind, detail (`key=value` pairs).
pub fn render_events(events: &[ironlun_api::Event]) -> String {
    if events.is_empty() {
        return "no events\n".to_string();
    }
    let rows: Vec<Vec<String>> = events
        .iter()
        .map(|e| {
            vec![
                e.seq.to_string(),
                utc(e.time_unix_ms),
                e.lun.clone(),
                e.kind.clone(),
                detail_cell(&e.detail),
            ]
        })
        .collect();
    table::render(0, &["SEQ", "TIME", "LUN", "KIND", "DETAIL"], &rows)
}

/// An event's detail in one cell: an object as `key=value` pairs (strings unquoted), anything
/// else as compact JSON.
fn detail_cell(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Object(m) if !m.is_empty() => m
            .iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => format!("{k}={s}"),
                other => format!("{k}={other}"),
            })
            .collect::<Vec<_>>()
            .join(" "),
        serde_json::Value::Object(_) | serde_json::Value::Null => "-".to_string(),
        other => other.to_string(),
    }
}

/// Milliseconds since the Unix epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ` (proleptic Gregorian, UTC).
pub fn utc(unix_ms: u64) -> String {
    let ms = unix_ms % 1000;
    let secs = unix_ms / 1000;
    let rem = secs % 86_400;
    let (h, m, sec) = (rem / 3600, rem % 3600 / 60, rem % 60);
    let (y, mo, d) = civil_date(secs / 86_400);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{sec:02}.{ms:03}Z")
}

/// Days since 1970-01-01 as the (year, month, day) of the proleptic Gregorian calendar: the
/// era-based algorithm, 400-year eras of 146097 days, shifted so that years start on 1 March.
pub fn civil_date(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(mo <= 2);
    (y, mo, d)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use ironlun_api::{RegistrationJson, ReservationJson};

    #[test]
    fn accepts_admin_urls() {
        let tcp = |u: &str| match Endpoint::parse(u).unwrap() {
            Endpoint::Tcp {
                host, port, prefix, ..
            } => (host, port, prefix),
            other => panic!("{u}: {other:?}"),
        };
        assert_eq!(
            tcp("http://127.0.0.1:3262"),
            ("127.0.0.1".into(), 3262, "".into())
        );
        assert_eq!(tcp("http://[::1]:9/api/"), ("::1".into(), 9, "/api".into()));
        assert_eq!(
            Endpoint::parse("http://[::1]:9/api/").unwrap().url(),
            "http://[::1]:9/api"
        );
        assert_eq!(tcp("http://localhost").1, 3262);
        for (u, p) in [
            ("unix:/run/ironlun/admin.sock", "/run/ironlun/admin.sock"),
            ("/tmp/a.sock", "/tmp/a.sock"),
            ("./ironlun-data/admin.sock", "./ironlun-data/admin.sock"),
        ] {
            let e = Endpoint::parse(u).unwrap();
            assert_eq!(e, Endpoint::Unix(PathBuf::from(p)));
            assert_eq!(e.url(), format!("unix:{p}"));
        }
    }

    #[test]
    fn rejects_bad_admin_urls() {
        for u in [
            "https://127.0.0.1:3262",
            "127.0.0.1:3262",
            "http://:3262",
            "http://h:99999",
            "http://[::1",
            "http://h:x",
            "unix:",
        ] {
            assert!(Endpoint::parse(u).is_err(), "{u}");
        }
    }

    #[test]
    fn explicit_admin_address_wins() {
        assert_eq!(admin_url(Some("unix:/x.sock".into())), "unix:/x.sock");
    }

    #[test]
    fn selectors() {
        assert_eq!(
            parse_selector("iqn.2026-11.io.ironlun:lab/3"),
            Ok(("iqn.2026-11.io.ironlun:lab".to_string(), 3))
        );
        for bad in ["iqn.x", "/0", "iqn.x/", "iqn.x/-1", "iqn.x/a"] {
            assert!(parse_selector(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn renders_table() {
        let lu = LuReservations {
            target: "iqn.x:t".into(),
            lun: 0,
            generation: 4,
            aptpl: false,
            reservation: Some(ReservationJson {
                type_code: 5,
                type_name: "Write Exclusive, Registrants Only".into(),
                scope: "LU_SCOPE".into(),
                key: "0x0000000000000001".into(),
                holder: Some("iqn.a:h1,i,0x000000000001".into()),
            }),
            registrations: vec![RegistrationJson {
                initiator_port: "iqn.a:h1,i,0x000000000001".into(),
                key: "0x0000000000000001".into(),
                target_port: "iqn.x:t,t,0x0001".into(),
                rtpi: Some(1),
                holder: true,
            }],
            spc2_holder: None,
            owner: None,
            epoch: 0,
            handover: None,
        };
        let owned = LuReservations {
            lun: 2,
            owner: Some("iqn.h:a".into()),
            epoch: 3,
            handover: Some(ironlun_api::HandoverJson {
                state: "fenced".into(),
                from: "iqn.h:a".into(),
                to: "iqn.h:b".into(),
                epoch: 4,
            }),
            registrations: vec![],
            ..lu.clone()
        };
        let text = render_reservations(&[owned]);
        assert!(
            text.contains(
                "\n  owner: iqn.h:a, epoch 3, handover fenced iqn.h:a -> iqn.h:b (epoch 4)\n"
            ),
            "{text}"
        );
        let empty = LuReservations {
            lun: 1,
            generation: 0,
            reservation: None,
            registrations: vec![],
            ..lu.clone()
        };
        let text = render_reservations(&[lu, empty]);
        assert_eq!(
            text,
            "iqn.x:t LUN 0  generation 4  APTPL off\n\
             \x20 reservation: Write Exclusive, Registrants Only (type 5), holder iqn.a:h1,i,0x000000000001, key 0x0000000000000001\n\
             \x20 INITIATOR PORT             KEY                 TARGET PORT       HOLDER\n\
             \x20 iqn.a:h1,i,0x000000000001  0x0000000000000001  iqn.x:t,t,0x0001  yes\n\
             \n\
             iqn.x:t LUN 1  generation 0  APTPL off\n\
             \x20 no reservation\n\
             \x20 no registrations\n"
        );
        assert_eq!(render_reservations(&[]), "no logical units\n");
    }

    #[test]
    fn renders_ownership_table() {
        let o = |owner: Option<&str>, epoch, handover| OwnershipJson {
            owner: owner.map(str::to_string),
            epoch,
            generation: 7,
            handover,
            next_epoch: epoch + 1,
        };
        let rows = vec![
            ("iqn.x:t/0".to_string(), o(Some("iqn.h:a"), 1, None)),
            (
                "iqn.x:t/1".to_string(),
                o(
                    None,
                    0,
                    Some(ironlun_api::HandoverJson {
                        state: "prepared".into(),
                        from: "iqn.h:a".into(),
                        to: "iqn.h:b".into(),
                        epoch: 2,
                    }),
                ),
            ),
        ];
        assert_eq!(
            render_ownership(&rows),
            "LUN        OWNER    EPOCH  GENERATION  HANDOVER\n\
             iqn.x:t/0  iqn.h:a  1      7           -\n\
             iqn.x:t/1  -        0      7           prepared iqn.h:a -> iqn.h:b (epoch 2)\n"
        );
        assert_eq!(render_ownership(&[]), "no logical units\n");
    }

    #[test]
    fn renders_commit_with_step_times() {
        let c = CommitJson {
            epoch: 2,
            generation: 9,
            owner: Some("iqn.h:b".into()),
            steps_us: ironlun_api::CommitSteps {
                fence: 120,
                drain: 3_400,
                flush: 15,
                transfer: 7,
                total: 3_542,
            },
            aborted_tasks: 0,
            idempotent: false,
        };
        assert_eq!(
            render_commit("iqn.x:t/0", &c),
            "LUN        OWNER    EPOCH  GENERATION  HANDOVER\n\
             iqn.x:t/0  iqn.h:b  2      9           committed\n\
             \x20 FENCE     DRAIN     FLUSH     TRANSFER  TOTAL\n\
             \x20 0.120 ms  3.400 ms  0.015 ms  0.007 ms  3.542 ms\n"
        );
    }

    #[test]
    fn renders_events_table() {
        let e = ironlun_api::Event {
            seq: 12,
            time_unix_ms: 1_795_651_200_123,
            lun: "iqn.x:t/0".into(),
            kind: "ownership".into(),
            detail: serde_json::json!({"host": "iqn.h:a", "epoch": 1}),
        };
        let text = render_events(&[e]);
        assert_eq!(
            text,
            "SEQ  TIME                      LUN        KIND       DETAIL\n\
             12   2026-11-26T00:00:00.123Z  iqn.x:t/0  ownership  epoch=1 host=iqn.h:a\n"
        );
        assert_eq!(render_events(&[]), "no events\n");
    }

    #[test]
    fn utc_times() {
        assert_eq!(utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(utc(1_709_251_199_999), "2024-02-29T23:59:59.999Z");
        assert_eq!(utc(4_102_444_800_000), "2100-01-01T00:00:00.000Z");
    }
}
