//! An etcd v3 client over etcd's JSON gateway (`POST /v3/<service>/<method>` on the client
//! URL, HTTP/1.1; etcd ≥ 3.4), for the cluster mode's state (`../shared/reference/scale-out.md`
//! §2): leases, single-key compare-and-swap transactions, prefix reads and watches.
//!
//! Why the gateway and not the gRPC crate (`etcd-client`): it needs `protoc` at build time
//! and ~60 more crates (tonic, prost, h2), and the README's first command (`cargo run --release
//! -- serve`) must build on a fresh machine. The gateway carries the same messages as JSON
//! (keys and values base64, 64-bit numbers as decimal strings) and has served the v3 API
//! since etcd 3.4.
//!
//! Contract:
//! - Every call has a deadline ([`Etcd::timeout`]); none waits forever on a dead or stalled
//!   member.
//! - Unary calls reuse kept-alive connections (a few per endpoint); a watch has its own.
//! - A call that fails to connect moves on to the next endpoint. Reads, lease grants,
//!   keep-alives and revokes are also retried on the next endpoint after a timeout or a
//!   server error; a transaction or put is not (its outcome is unknown: [`EtcdError::Unknown`];
//!   the caller finds out by reading, scale-out.md §2.2 step 2).
//! - Every request asks for a member with a leader (`hasleader` metadata), so a member cut
//!   off from its quorum answers with an error instead of stale data.
//! - A watch reads one newline-delimited JSON message at a time, each at most
//!   [`MAX_MESSAGE`] bytes; a larger one ends the watch with an error (no unbounded buffer).

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::PoisonError;
use std::time::Duration;
use tokio::net::TcpStream;

/// Largest JSON message read from etcd (a response, or one watch message): etcd's own request
/// limit is 1.5 MiB, and a range over a prefix can hold several values.
pub const MAX_MESSAGE: usize = 8 << 20;

/// A key-value pair as etcd stores it (mvccpb.KeyValue).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    /// Revision of the put that created the key (0: absent).
    pub create_revision: i64,
    /// Revision of the last put to the key.
    pub mod_revision: i64,
    /// The lease the key is attached to (0: none).
    pub lease: i64,
}

/// One condition of a transaction (etcdserverpb.Compare), always "equal".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// The key's last put was at this revision (0: the key is absent).
    ModRevision(Vec<u8>, i64),
    /// The key was created at this revision (0: the key is absent).
    CreateRevision(Vec<u8>, i64),
    /// The key is attached to this lease: it exists and the lease is alive.
    Lease(Vec<u8>, i64),
}

/// One operation of a transaction branch (etcdserverpb.RequestOp).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Put `value` at `key`, attached to `lease` (0: none).
    Put {
        key: Vec<u8>,
        value: Vec<u8>,
        lease: i64,
    },
    /// Read one key.
    Get(Vec<u8>),
    /// Delete one key.
    Delete(Vec<u8>),
}

/// What a transaction did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnOutcome {
    /// Whether every comparison held (the success branch ran).
    pub succeeded: bool,
    /// The store's revision after the transaction (the put's revision when it wrote).
    pub revision: i64,
    /// For each [`Op::Get`] of the branch that ran, in order: the key, if present.
    pub gets: Vec<Option<Kv>>,
}

/// A lease (etcdserverpb.LeaseGrantResponse).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub id: i64,
    /// Time to live granted, seconds.
    pub ttl: i64,
}

/// A change seen by a watch (mvccpb.Event).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Put(Kv),
    /// The key was deleted (or its lease expired) at `mod_revision`.
    Delete {
        key: Vec<u8>,
        mod_revision: i64,
    },
}

impl Event {
    /// The revision of the change.
    pub fn revision(&self) -> i64 {
        match self {
            Event::Put(kv) => kv.mod_revision,
            Event::Delete { mod_revision, .. } => *mod_revision,
        }
    }
}

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EtcdError {
    /// No endpoint answered (each one's error, last first).
    #[error("etcd unreachable: {0}")]
    Unreachable(String),
    /// A transaction or put was sent but no answer came: it may or may not have been applied.
    #[error("etcd: outcome unknown: {0}")]
    Unknown(String),
    /// etcd answered with an error (gRPC code and message), e.g. `etcdserver: no leader`,
    /// `etcdserver: requested lease not found`.
    #[error("etcd: {message} (code {code})")]
    Server { code: i64, message: String },
    /// A watch asked for history etcd has compacted; the oldest revision still kept.
    #[error("etcd: revision compacted; history starts after {0}")]
    Compacted(i64),
    /// The watch ended (etcd closed the stream or cancelled the watch).
    #[error("etcd: watch ended: {0}")]
    WatchEnded(String),
    /// An answer that is not what the API defines.
    #[error("etcd: malformed answer: {0}")]
    Malformed(String),
}

/// An etcd client on a list of `host:port` client endpoints (plain HTTP on loopback or a
/// trusted network; TLS is not supported yet).
#[derive(Debug)]
pub struct Etcd {
    endpoints: Vec<String>,
    /// The endpoint to try first (the last one that answered).
    next: AtomicUsize,
    timeout: Duration,
    /// Kept-alive connections of finished unary calls, per endpoint (at most [`IDLE_MAX`]
    /// each), so that a call does not pay for a new connection. Watches have their own.
    idle: std::sync::Mutex<Vec<(String, Sender)>>,
}

/// The sending half of one HTTP/1.1 connection to an endpoint.
type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// Idle connections kept per endpoint.
const IDLE_MAX: usize = 8;

/// Whether a failed call may go to the next endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retry {
    /// Only if the request was never sent (connect failed).
    IfUnsent,
    /// Also after a timeout or a server error (the call changes nothing, or changing it twice
    /// is harmless).
    Always,
}

impl Etcd {
    /// A client on `endpoints` (`host:port` or `http://host:port`); each call gives up after
    /// `timeout`. Errors if the list is empty or names an `https://` endpoint.
    pub fn new(endpoints: &[String], timeout: Duration) -> Result<Etcd, String> {
        if endpoints.is_empty() {
            return Err("no etcd endpoint".into());
        }
        let mut list = Vec::new();
        for e in endpoints {
            if e.starts_with("https://") {
                return Err(format!("{e}: TLS to etcd is not supported yet"));
            }
            let hp = e.strip_prefix("http://").unwrap_or(e).trim_end_matches('/');
            if hp.is_empty() || hp.contains('/') || !hp.contains(':') {
                return Err(format!("{e:?}: expected host:port"));
            }
            list.push(hp.to_string());
        }
        Ok(Etcd {
            endpoints: list,
            next: AtomicUsize::new(0),
            timeout,
            idle: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// The per-call deadline.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Grant a lease of `ttl` seconds (LeaseGrant).
    pub async fn grant(&self, ttl: i64) -> Result<Lease, EtcdError> {
        let v = self
            .call("/v3/lease/grant", &json!({"TTL": ttl}), Retry::IfUnsent)
            .await?;
        Ok(Lease {
            id: num(&v, "ID")?,
            ttl: num(&v, "TTL")?,
        })
    }

    /// Renew `lease` once (LeaseKeepAlive with one request). `Ok(None)`: the lease is gone
    /// (expired or revoked); `Ok(Some(ttl))`: renewed for `ttl` seconds from when the leader
    /// received it.
    pub async fn keep_alive(&self, lease: i64) -> Result<Option<i64>, EtcdError> {
        let v = self
            .call(
                "/v3/lease/keepalive",
                &json!({"ID": lease.to_string()}),
                Retry::Always,
            )
            .await?;
        let r = v.get("result").unwrap_or(&v);
        let ttl = opt_num(r, "TTL")?.unwrap_or(0);
        Ok((ttl > 0).then_some(ttl))
    }

    /// Seconds left on `lease` (LeaseTimeToLive); `None` when it is gone.
    pub async fn time_to_live(&self, lease: i64) -> Result<Option<i64>, EtcdError> {
        let v = self
            .call(
                "/v3/lease/timetolive",
                &json!({"ID": lease.to_string()}),
                Retry::Always,
            )
            .await?;
        let ttl = opt_num(&v, "TTL")?.unwrap_or(-1);
        Ok((ttl > 0).then_some(ttl))
    }

    /// Revoke `lease`: its keys are deleted now (LeaseRevoke).
    pub async fn revoke(&self, lease: i64) -> Result<(), EtcdError> {
        self.call(
            "/v3/lease/revoke",
            &json!({"ID": lease.to_string()}),
            Retry::Always,
        )
        .await
        .map(|_| ())
    }

    /// Read one key (a linearizable Range).
    pub async fn get(&self, key: &[u8]) -> Result<Option<Kv>, EtcdError> {
        let v = self
            .call(
                "/v3/kv/range",
                &json!({"key": B64.encode(key)}),
                Retry::Always,
            )
            .await?;
        Ok(kvs(&v)?.into_iter().next())
    }

    /// Every key under `prefix`, and the store's revision they were read at.
    pub async fn get_prefix(&self, prefix: &[u8]) -> Result<(i64, Vec<Kv>), EtcdError> {
        let body = json!({"key": B64.encode(prefix), "range_end": B64.encode(prefix_end(prefix))});
        let v = self.call("/v3/kv/range", &body, Retry::Always).await?;
        Ok((header_revision(&v)?, kvs(&v)?))
    }

    /// Put `value` at `key`, attached to `lease` (0: none); the revision of the put.
    pub async fn put(&self, key: &[u8], value: &[u8], lease: i64) -> Result<i64, EtcdError> {
        let v = self
            .call(
                "/v3/kv/put",
                &json!({"key": B64.encode(key), "value": B64.encode(value), "lease": lease.to_string()}),
                Retry::IfUnsent,
            )
            .await?;
        header_revision(&v)
    }

    /// If every comparison holds run `success`, else `failure`, as one atomic step (Txn).
    pub async fn txn(
        &self,
        compare: &[Compare],
        success: &[Op],
        failure: &[Op],
    ) -> Result<TxnOutcome, EtcdError> {
        let body = json!({
            "compare": compare.iter().map(compare_json).collect::<Vec<_>>(),
            "success": success.iter().map(op_json).collect::<Vec<_>>(),
            "failure": failure.iter().map(op_json).collect::<Vec<_>>(),
        });
        let v = self.call("/v3/kv/txn", &body, Retry::IfUnsent).await?;
        let succeeded = v.get("succeeded").and_then(Value::as_bool).unwrap_or(false);
        let mut gets = Vec::new();
        if let Some(rs) = v.get("responses").and_then(Value::as_array) {
            for r in rs {
                if let Some(range) = r.get("response_range") {
                    gets.push(kvs(range)?.into_iter().next());
                }
            }
        }
        Ok(TxnOutcome {
            succeeded,
            revision: header_revision(&v)?,
            gets,
        })
    }

    /// Compact the history up to `revision` (physically, so a watch from before it fails).
    pub async fn compact(&self, revision: i64) -> Result<(), EtcdError> {
        self.call(
            "/v3/kv/compaction",
            &json!({"revision": revision.to_string(), "physical": true}),
            Retry::Always,
        )
        .await
        .map(|_| ())
    }

    /// Watch every key under `prefix` from `start_revision` on (history first, then live
    /// changes, in revision order). Connecting and the creation message are bounded by the
    /// timeout; the stream itself is not (a quiet store sends nothing). A watch from
    /// compacted history is confirmed, then its first [`Watch::next`] is
    /// [`EtcdError::Compacted`].
    pub async fn watch(&self, prefix: &[u8], start_revision: i64) -> Result<Watch, EtcdError> {
        let body = json!({"create_request": {
            "key": B64.encode(prefix),
            "range_end": B64.encode(prefix_end(prefix)),
            "start_revision": start_revision.to_string(),
        }});
        let mut errors = Vec::new();
        for endpoint in self.rotation() {
            let started = tokio::time::timeout(self.timeout, async {
                let resp = request(&endpoint, "/v3/watch", &body).await?;
                let mut w = Watch {
                    body: resp.into_body(),
                    buf: Vec::new(),
                };
                // The first message confirms the watch (created: true) or refuses it.
                let first = w.message().await?;
                if first.get("created").and_then(Value::as_bool) != Some(true) {
                    return Err(Attempt::Answered(w.check(&first).err().unwrap_or_else(
                        || EtcdError::Malformed(format!("first watch message: {first}")),
                    )));
                }
                Ok(w)
            })
            .await;
            match started {
                Ok(Ok(w)) => return Ok(w),
                Ok(Err(Attempt::Answered(e))) => return Err(e),
                Ok(Err(Attempt::Unsent(e) | Attempt::Lost(e))) => {
                    errors.push(format!("{endpoint}: {e}"))
                }
                Err(_) => errors.push(format!("{endpoint}: no answer in {:?}", self.timeout)),
            }
        }
        Err(EtcdError::Unreachable(errors.join("; ")))
    }

    /// A connection to `endpoint` ready to send: an idle one that is still open, else a new
    /// one.
    async fn sender(&self, endpoint: &str) -> Result<Sender, Attempt> {
        loop {
            let pooled = {
                let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
                idle.iter()
                    .rposition(|(e, _)| e == endpoint)
                    .map(|i| idle.swap_remove(i).1)
            };
            let Some(mut s) = pooled else {
                return connect(endpoint).await;
            };
            // A connection the server closed meanwhile is dropped; nothing was sent on it.
            if !s.is_closed() && s.ready().await.is_ok() {
                return Ok(s);
            }
        }
    }

    /// Keep `sender` for the next call to `endpoint`, if it is open and there is room.
    fn keep(&self, endpoint: &str, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.iter().filter(|(e, _)| e == endpoint).count() < IDLE_MAX {
            idle.push((endpoint.to_string(), sender));
        }
    }

    /// The endpoints in the order to try them: the last one that answered first.
    fn rotation(&self) -> Vec<String> {
        let n = self.endpoints.len();
        let first = self.next.load(Ordering::Relaxed) % n;
        (0..n)
            .filter_map(|i| self.endpoints.get((first + i) % n).cloned())
            .collect()
    }

    /// POST `body` to `path` on the endpoints in turn (as `retry` allows); the answer's JSON.
    async fn call(&self, path: &str, body: &Value, retry: Retry) -> Result<Value, EtcdError> {
        let mut errors = Vec::new();
        let rotation = self.rotation();
        let n = self.endpoints.len();
        for (i, endpoint) in rotation.iter().enumerate() {
            let attempt = tokio::time::timeout(self.timeout, async {
                let mut sender = self.sender(endpoint).await?;
                let resp = send(&mut sender, endpoint, path, body).await?;
                let status = resp.status().as_u16();
                let bytes = Limited::new(resp.into_body(), MAX_MESSAGE)
                    .collect()
                    .await
                    .map_err(|e| Attempt::Lost(format!("reading the answer: {e}")))?
                    .to_bytes();
                // The whole answer is read: the connection can carry the next call.
                self.keep(endpoint, sender);
                let v: Value = serde_json::from_slice(&bytes).map_err(|e| {
                    Attempt::Answered(EtcdError::Malformed(format!(
                        "HTTP {status}: {e}: {}",
                        String::from_utf8_lossy(bytes.get(..200).unwrap_or(&bytes))
                    )))
                })?;
                server_error(&v).map_err(Attempt::Answered)?;
                if status != 200 {
                    return Err(Attempt::Answered(EtcdError::Malformed(format!(
                        "HTTP {status}: {v}"
                    ))));
                }
                Ok(v)
            })
            .await;
            let (error, sent) = match attempt {
                Ok(Ok(v)) => {
                    let at = self.endpoints.iter().position(|e| e == endpoint);
                    self.next.store(at.unwrap_or(0), Ordering::Relaxed);
                    return Ok(v);
                }
                Ok(Err(Attempt::Unsent(e))) => (format!("{endpoint}: {e}"), None),
                Ok(Err(Attempt::Answered(e))) => (format!("{endpoint}: {e}"), Some(e)),
                Ok(Err(Attempt::Lost(e))) => (
                    format!("{endpoint}: {e}"),
                    Some(EtcdError::Unknown(format!("{endpoint}: {e}"))),
                ),
                Err(_) => {
                    let e = format!("{endpoint}: no answer in {:?}", self.timeout);
                    (e.clone(), Some(EtcdError::Unknown(e)))
                }
            };
            errors.push(error);
            match sent {
                // Never sent: the next member may take it.
                None => {}
                // Sent and failed: a change is not sent twice; its error (or unknown outcome)
                // is the caller's.
                Some(e) if retry == Retry::IfUnsent => return Err(e),
                // A read or a lease call: the next member, while there is one.
                Some(EtcdError::Server { code, message }) if i + 1 == n => {
                    return Err(EtcdError::Server { code, message })
                }
                Some(_) => {}
            }
        }
        Err(EtcdError::Unreachable(errors.join("; ")))
    }
}

/// How one attempt on one endpoint failed.
enum Attempt {
    /// Connecting failed: the request never left.
    Unsent(String),
    /// Sent; the connection failed before a whole answer.
    Lost(String),
    /// etcd answered, with an error.
    Answered(EtcdError),
}

/// One request on a new connection to `endpoint` (a watch: the connection is its own).
async fn request(
    endpoint: &str,
    path: &str,
    body: &Value,
) -> Result<hyper::Response<Incoming>, Attempt> {
    let mut sender = connect(endpoint).await?;
    send(&mut sender, endpoint, path, body).await
}

/// A new HTTP/1.1 connection to `endpoint`; its connection task ends when the sender is
/// dropped or the server closes it.
async fn connect(endpoint: &str) -> Result<Sender, Attempt> {
    let stream = TcpStream::connect(endpoint)
        .await
        .map_err(|e| Attempt::Unsent(format!("connect: {e}")))?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| Attempt::Unsent(format!("HTTP handshake: {e}")))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "etcd connection");
        }
    });
    Ok(sender)
}

/// POST `body` to `path` on `sender`'s connection.
async fn send(
    sender: &mut Sender,
    endpoint: &str,
    path: &str,
    body: &Value,
) -> Result<hyper::Response<Incoming>, Attempt> {
    let req = hyper::Request::post(path)
        .header(hyper::header::HOST, endpoint)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        // gRPC metadata through the gateway: refuse to answer without a leader.
        .header("grpc-metadata-hasleader", "true")
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| Attempt::Unsent(format!("request: {e}")))?;
    sender.send_request(req).await.map_err(|e| {
        // Canceled: the connection closed before the request was written (a kept-alive
        // connection to a member that went away), so it may go to the next endpoint.
        if e.is_canceled() {
            Attempt::Unsent(format!("connection closed before the request: {e}"))
        } else {
            Attempt::Lost(format!("request: {e}"))
        }
    })
}

/// A watch's stream of changes ([`Etcd::watch`]).
#[derive(Debug)]
pub struct Watch {
    body: Incoming,
    /// Bytes received and not yet parsed (at most one partial message).
    buf: Vec<u8>,
}

impl Watch {
    /// The next batch of changes, in revision order, and the store's revision when it was sent.
    /// A batch may be empty (a progress notification).
    pub async fn next(&mut self) -> Result<(i64, Vec<Event>), EtcdError> {
        let v = self.message().await.map_err(|a| match a {
            Attempt::Answered(e) => e,
            Attempt::Unsent(e) | Attempt::Lost(e) => EtcdError::WatchEnded(e),
        })?;
        self.check(&v)?;
        let revision = header_revision(&v)?;
        let mut events = Vec::new();
        for e in v
            .get("events")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let kv = e
                .get("kv")
                .ok_or_else(|| EtcdError::Malformed(format!("event without kv: {e}")))?;
            let kv = parse_kv(kv)?;
            events.push(if e.get("type").and_then(Value::as_str) == Some("DELETE") {
                Event::Delete {
                    key: kv.key,
                    mod_revision: kv.mod_revision,
                }
            } else {
                Event::Put(kv)
            });
        }
        Ok((revision, events))
    }

    /// A watch response's own error conditions: compaction, cancellation.
    fn check(&self, v: &Value) -> Result<(), EtcdError> {
        let compact = opt_num(v, "compact_revision").unwrap_or(None).unwrap_or(0);
        if compact > 0 {
            return Err(EtcdError::Compacted(compact));
        }
        if v.get("canceled").and_then(Value::as_bool) == Some(true) {
            let why = v
                .get("cancel_reason")
                .and_then(Value::as_str)
                .unwrap_or("cancelled");
            return Err(EtcdError::WatchEnded(why.to_string()));
        }
        Ok(())
    }

    /// The next newline-delimited JSON message, unwrapped from its `result`.
    async fn message(&mut self) -> Result<Value, Attempt> {
        loop {
            if let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=nl).collect();
                let text = line.trim_ascii();
                if text.is_empty() {
                    continue;
                }
                let v: Value = serde_json::from_slice(text).map_err(|e| {
                    Attempt::Answered(EtcdError::Malformed(format!("watch message: {e}")))
                })?;
                server_error(&v).map_err(Attempt::Answered)?;
                return Ok(v.get("result").cloned().unwrap_or(v));
            }
            if self.buf.len() > MAX_MESSAGE {
                return Err(Attempt::Answered(EtcdError::Malformed(format!(
                    "watch message over {MAX_MESSAGE} bytes"
                ))));
            }
            match self.body.frame().await {
                None => return Err(Attempt::Lost("etcd closed the watch stream".into())),
                Some(Err(e)) => return Err(Attempt::Lost(format!("watch stream: {e}"))),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
            }
        }
    }
}

/// The smallest key after every key that starts with `prefix` (etcd's `range_end` for a
/// prefix; `[0]` = to the end of the key space when the prefix is all 0xFF).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// An error answer from the gateway: `{"error": …, "code": N, "message": …}`, at the top
/// level or inside a stream's `error` member.
fn server_error(v: &Value) -> Result<(), EtcdError> {
    let e = match v.get("error") {
        Some(Value::Object(_)) => v.get("error").unwrap_or(v),
        Some(_) => v,
        None => return Ok(()),
    };
    let code = e.get("code").and_then(Value::as_i64).unwrap_or(0);
    let message = e
        .get("message")
        .or_else(|| e.get("error"))
        .and_then(Value::as_str)
        .unwrap_or("unknown error")
        .to_string();
    Err(EtcdError::Server { code, message })
}

fn compare_json(c: &Compare) -> Value {
    match c {
        Compare::ModRevision(k, r) => {
            json!({"target": "MOD", "key": B64.encode(k), "mod_revision": r.to_string(), "result": "EQUAL"})
        }
        Compare::CreateRevision(k, r) => {
            json!({"target": "CREATE", "key": B64.encode(k), "create_revision": r.to_string(), "result": "EQUAL"})
        }
        Compare::Lease(k, l) => {
            json!({"target": "LEASE", "key": B64.encode(k), "lease": l.to_string(), "result": "EQUAL"})
        }
    }
}

fn op_json(op: &Op) -> Value {
    match op {
        Op::Put { key, value, lease } => json!({"request_put": {
            "key": B64.encode(key), "value": B64.encode(value), "lease": lease.to_string()
        }}),
        Op::Get(key) => json!({"request_range": {"key": B64.encode(key)}}),
        Op::Delete(key) => json!({"request_delete_range": {"key": B64.encode(key)}}),
    }
}

/// A 64-bit number the gateway may send as a decimal string or a JSON number; absent → `None`
/// (proto3 leaves out zero values).
fn opt_num(v: &Value, field: &str) -> Result<Option<i64>, EtcdError> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => s
            .parse()
            .map(Some)
            .map_err(|_| EtcdError::Malformed(format!("{field}: {s:?} is not a number"))),
        Some(n) => n
            .as_i64()
            .map(Some)
            .ok_or_else(|| EtcdError::Malformed(format!("{field}: {n} is not a number"))),
    }
}

/// As [`opt_num`], absent = 0.
fn num(v: &Value, field: &str) -> Result<i64, EtcdError> {
    Ok(opt_num(v, field)?.unwrap_or(0))
}

fn header_revision(v: &Value) -> Result<i64, EtcdError> {
    let h = v
        .get("header")
        .ok_or_else(|| EtcdError::Malformed(format!("no header: {v}")))?;
    num(h, "revision")
}

fn bytes_field(v: &Value, field: &str) -> Result<Vec<u8>, EtcdError> {
    match v.get(field).and_then(Value::as_str) {
        None => Ok(Vec::new()),
        Some(s) => B64
            .decode(s)
            .map_err(|e| EtcdError::Malformed(format!("{field}: not base64: {e}"))),
    }
}

fn parse_kv(v: &Value) -> Result<Kv, EtcdError> {
    Ok(Kv {
        key: bytes_field(v, "key")?,
        value: bytes_field(v, "value")?,
        create_revision: num(v, "create_revision")?,
        mod_revision: num(v, "mod_revision")?,
        lease: num(v, "lease")?,
    })
}

/// The `kvs` of a range answer.
fn kvs(v: &Value) -> Result<Vec<Kv>, EtcdError> {
    v.get("kvs")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(parse_kv)
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_is_the_next_key_after_the_prefix() {
        assert_eq!(prefix_end(b"/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }

    #[test]
    fn numbers_come_as_strings_or_numbers_and_zero_is_left_out() {
        let v = json!({"a": "12", "b": 7, "c": "x"});
        assert_eq!(opt_num(&v, "a"), Ok(Some(12)));
        assert_eq!(opt_num(&v, "b"), Ok(Some(7)));
        assert_eq!(opt_num(&v, "z"), Ok(None));
        assert!(matches!(opt_num(&v, "c"), Err(EtcdError::Malformed(_))));
    }

    #[test]
    fn gateway_errors_are_recognised_at_top_level_and_in_streams() {
        let top = json!({"error": "etcdserver: no leader", "code": 14, "message": "etcdserver: no leader"});
        assert_eq!(
            server_error(&top),
            Err(EtcdError::Server {
                code: 14,
                message: "etcdserver: no leader".into()
            })
        );
        let stream = json!({"error": {"grpc_code": 5, "http_code": 404, "message": "etcdserver: requested lease not found", "code": 5}});
        assert!(matches!(
            server_error(&stream),
            Err(EtcdError::Server { code: 5, .. })
        ));
        assert_eq!(server_error(&json!({"result": {}})), Ok(()));
    }

    #[test]
    fn endpoints_are_host_port_and_plain_http() {
        let ok = Etcd::new(
            &["127.0.0.1:2379".into(), "http://127.0.0.1:22379/".into()],
            Duration::from_secs(1),
        )
        .unwrap();
        assert_eq!(ok.endpoints, vec!["127.0.0.1:2379", "127.0.0.1:22379"]);
        assert!(Etcd::new(&[], Duration::from_secs(1)).is_err());
        assert!(Etcd::new(&["https://x:1".into()], Duration::from_secs(1)).is_err());
        assert!(Etcd::new(&["x".into()], Duration::from_secs(1)).is_err());
    }

    #[test]
    fn a_kv_decodes_from_gateway_json() {
        let v = json!({"key": "L2E=", "value": "aGk=", "create_revision": "2", "mod_revision": "5", "lease": "77"});
        assert_eq!(
            parse_kv(&v).unwrap(),
            Kv {
                key: b"/a".to_vec(),
                value: b"hi".to_vec(),
                create_revision: 2,
                mod_revision: 5,
                lease: 77
            }
        );
    }
}
