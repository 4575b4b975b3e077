//! The admin API's request path after hyper: the head checks (`admin::request_of`: Host,
//! Authorization, Content-Length), the constant-time token check, both routers (percent-decoded
//! targets, LUN numbers, methods) and the JSON bodies of every handler, against an in-memory
//! registry with one RAM LUN (no live reconfiguration, so nothing touches the disk).
//!
//! Invariants: no panic; every request is answered promptly (no I/O is in flight, so no
//! handover step may wait); the status is 200..=599; with a token configured, a request
//! without it is 401; every error carries the API's JSON body `{"error": "…", "code": "…"}`
//! with a non-empty message and code.
#![no_main]

use ironlun::admin::{self, Services};
use ironlun::target::Registry;
use ironlun_api::{percent_encode, Token};
use std::sync::Arc;
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use std::time::Duration;

const TARGET: &str = "iqn.2026-11.io.ironlun:fuzz";
const TOKEN: &str = "fuzz-token-0123456789abcdef";

/// A path built from the routes' shapes, with fuzzed segments (some percent-encoded).
#[derive(Arbitrary, Debug)]
enum PathShape {
    Raw(String),
    Segments(Vec<Segment>),
}

#[derive(Arbitrary, Debug)]
enum Segment {
    Known(u8),
    Target,
    Lun(u64),
    Text(String),
    Encoded(String),
}

const KNOWN: &[&str] = &[
    "v1", "health", "metrics", "reservations", "events", "port-groups", "luns", "ownership",
    "owner", "handover", "prepare", "commit", "abort", "targets", "config", "reload", "resize",
    "portals", "acl", "offline", "online", "1", "0", "..", "", "%", "%3A", "%zz",
];

#[derive(Arbitrary, Debug)]
struct Input {
    method: u8,
    custom_method: String,
    path: PathShape,
    query: Option<String>,
    headers: Vec<(u8, Vec<u8>)>,
    token_configured: bool,
    send_token: bool,
    body: Body,
}

#[derive(Arbitrary, Debug)]
enum Body {
    Bytes(Vec<u8>),
    Owner { host: String, epoch: u64 },
    Handover {
        from: String,
        to: String,
        epoch: u64,
        deadline_ms: Option<u16>,
        refuse: Option<bool>,
    },
    State(String),
}

const METHODS: &[&str] = &["GET", "POST", "PUT", "DELETE", "HEAD", "PATCH", "OPTIONS"];
const HEADER_NAMES: &[&str] = &[
    "host",
    "authorization",
    "content-length",
    "content-type",
    "x-other",
];

fn path_of(p: &PathShape) -> String {
    match p {
        PathShape::Raw(s) => format!("/{s}"),
        PathShape::Segments(segs) => {
            let mut out = String::new();
            for s in segs.iter().take(12) {
                out.push('/');
                match s {
                    Segment::Known(i) => out.push_str(KNOWN[usize::from(*i) % KNOWN.len()]),
                    Segment::Target => out.push_str(&percent_encode(TARGET)),
                    Segment::Lun(n) => out.push_str(&(n % 4).to_string()),
                    Segment::Text(t) => out.push_str(t),
                    Segment::Encoded(t) => out.push_str(&percent_encode(t)),
                }
            }
            if out.is_empty() {
                out.push('/');
            }
            out
        }
    }
}

fn body_of(b: &Body) -> Vec<u8> {
    let v = match b {
        Body::Bytes(b) => return b.clone(),
        Body::Owner { host, epoch } => serde_json::json!({"host": host, "epoch": epoch}),
        Body::Handover {
            from,
            to,
            epoch,
            deadline_ms,
            refuse,
        } => serde_json::json!({
            "from": from, "to": to, "epoch": epoch,
            // Short deadlines: nothing is in flight, so none is waited for anyway.
            "deadline_ms": deadline_ms.map(|d| d % 50),
            "on_deadline": refuse.map(|r| if r { "refuse" } else { "abort" }),
        }),
        Body::State(s) => serde_json::json!({ "state": s }),
    };
    v.to_string().into_bytes()
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    })
}

/// One registry for every input: ownership state carries over, as in a long-running daemon.
fn services() -> &'static Services {
    static REG: OnceLock<Services> = OnceLock::new();
    REG.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("ironlun-fuzz-admin-{}", std::process::id()));
        let text = format!(
            "[[target]]\nname = \"{TARGET}\"\n[[target.lun]]\nid = 0\nbackstore = \"ram\"\nsize = \"64KiB\"\n[[target.lun]]\nid = 1\nbackstore = \"ram\"\nsize = \"64KiB\"\n"
        );
        let cfg = ironlun::config::Config::parse("fuzz.toml", &text, None, Some(&dir))
            .expect("fuzz config");
        Services {
            registry: Arc::new(Registry::build(&cfg).expect("registry")),
            live: None,
        }
    })
}

fuzz_target!(|input: Input| {
    let method = if usize::from(input.method) < METHODS.len() {
        METHODS[usize::from(input.method)].to_string()
    } else {
        input.custom_method.clone()
    };
    let mut uri = path_of(&input.path);
    if let Some(q) = &input.query {
        uri.push('?');
        uri.push_str(q);
    }
    let mut builder = hyper::Request::builder().method(method.as_str()).uri(uri);
    for (n, v) in input.headers.iter().take(8) {
        let name = HEADER_NAMES[usize::from(*n) % HEADER_NAMES.len()];
        builder = builder.header(name, v.as_slice());
    }
    if input.send_token {
        builder = builder.header("authorization", format!("Bearer {TOKEN}"));
    }
    // What hyper itself would refuse (bad method, URI or header bytes) never reaches us.
    let Ok(req) = builder.body(()) else { return };
    let (parts, ()) = req.into_parts();
    let token = Token::new(TOKEN).expect("token");
    let token = input.token_configured.then_some(&token);
    let body = body_of(&input.body);
    let response = match admin::request_of(&parts) {
        Err(e) => admin::Response::from(e),
        Ok((request, _declared)) => {
            let fut = admin::respond(&request, &body, token, services());
            runtime()
                .block_on(async { tokio::time::timeout(Duration::from_secs(5), fut).await })
                .expect("a request with nothing in flight answered within 5 s")
        }
    };
    assert!((200..=599).contains(&response.status), "{}", response.status);
    let authorized = parts
        .headers
        .get_all("authorization")
        .iter()
        .any(|v| v.as_bytes() == format!("Bearer {TOKEN}").as_bytes());
    if token.is_some() && !authorized {
        assert!(
            matches!(response.status, 400 | 401),
            "no token but {}",
            response.status
        );
    }
    if response.status >= 400 {
        let v: serde_json::Value =
            serde_json::from_slice(&response.body).expect("error bodies are JSON");
        let error = v.get("error").and_then(|e| e.as_str()).unwrap_or_default();
        let code = v.get("code").and_then(|e| e.as_str()).unwrap_or_default();
        assert!(!error.is_empty() && !code.is_empty(), "{v}");
    }
    // The HTTP form of it is always valid.
    let _ = response.into_http();
});
