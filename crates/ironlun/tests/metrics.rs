//! `GET /metrics` against the real daemon (issue 9 acceptance 1): scrape, run a known amount of
//! I/O, PR OUT, errors, a failed login and handover steps through ironlun-initiator and the
//! admin API, scrape again and check that each counter moved by exactly that amount; session
//! series appear at login and go at logout; `promtool check metrics` accepts the exposition.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use bytes::Bytes;
use ironlun_cli::ctl::Client;
use ironlun_initiator::pr::{OutAction, OutParams};
use ironlun_initiator::{LoginOptions, Session};
use ironlun_testkit::{session, Daemon, PROMPT, TARGET};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

const IRONLUN: &str = env!("CARGO_BIN_EXE_ironlun");

const HOST_A: &str = "iqn.2026-01.test:metrics-a";
const HOST_B: &str = "iqn.2026-01.test:metrics-b";
const GOOD: u8 = 0x00;
const CHECK_CONDITION: u8 = 0x02;
const RESERVATION_CONFLICT: u8 = 0x18;
const EXCLUSIVE_ACCESS: u8 = 3;

/// One scrape: the `Content-Type` and every sample by `name{labels}` as rendered.
struct Scrape {
    content_type: String,
    text: String,
    samples: BTreeMap<String, f64>,
}

impl Scrape {
    /// The value of `name{labels}` (labels as rendered, in order); 0 when absent.
    fn get(&self, series: &str) -> f64 {
        self.samples.get(series).copied().unwrap_or(0.0)
    }

    fn has(&self, series_prefix: &str) -> bool {
        self.samples.keys().any(|k| k.starts_with(series_prefix))
    }
}

/// `GET /metrics` (with `Authorization: Bearer TOKEN`) over a raw connection (the client
/// library reads JSON only): the status line, and the head and body.
fn get_metrics(admin: &str, token: Option<&str>) -> (String, String) {
    let mut s = ironlun_testkit::admin_connect(admin);
    s.set_read_timeout(Some(PROMPT));
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    (head.to_owned(), body.to_owned())
}

fn scrape(admin: &str) -> Scrape {
    let (head, body) = get_metrics(admin, None);
    let body = body.as_str();
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    let content_type = head
        .lines()
        .find_map(|l| {
            l.split_once(':')
                .filter(|(n, _)| n.eq_ignore_ascii_case("content-type"))
                .map(|(_, v)| v.trim())
        })
        .unwrap()
        .to_owned();
    let mut samples = BTreeMap::new();
    for line in body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = line.rsplit_once(' ').unwrap();
        let v: f64 = value.parse().unwrap();
        assert!(
            samples.insert(series.to_owned(), v).is_none(),
            "duplicate {series}"
        );
    }
    Scrape {
        content_type,
        text: body.to_owned(),
        samples,
    }
}

fn lu(extra: &str) -> String {
    if extra.is_empty() {
        format!("{{target=\"{TARGET}\",lun=\"0\"}}")
    } else {
        format!("{{target=\"{TARGET}\",lun=\"0\",{extra}}}")
    }
}

fn session_labels(initiator: &str, extra: &str) -> String {
    format!(
        "{{target=\"{TARGET}\",initiator=\"{initiator}\",isid=\"{}\",tpgt=\"1\",{extra}}}",
        isid_hex()
    )
}

/// The ISID ironlun-initiator logs in with, as the daemon renders it.
fn isid_hex() -> String {
    LoginOptions::default()
        .isid
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn delta(a: &Scrape, b: &Scrape, series: &str) -> f64 {
    b.get(series) - a.get(series)
}

fn cdb10(op: u8, lba: u32, blocks: u16) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = op;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&blocks.to_be_bytes());
    c
}

async fn admin(base: &str, rest: &str, body: Value) -> (u16, Value) {
    let base = base.to_owned();
    let path = format!("/v1/luns/{TARGET}/0/{rest}");
    tokio::task::spawn_blocking(move || {
        let c = Client::new(&base, None).unwrap();
        let bytes = serde_json::to_vec(&body).unwrap();
        let r = c
            .request("POST", &path, Some(&bytes), Duration::from_secs(60))
            .unwrap();
        (
            r.status,
            serde_json::from_slice(&r.body).unwrap_or(Value::Null),
        )
    })
    .await
    .unwrap()
}

fn hand(epoch: u64) -> Value {
    json!({"from": HOST_A, "to": HOST_B, "epoch": epoch})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_move_by_exactly_the_io_done() {
    let d = Daemon::builder(IRONLUN).start();
    let base = d.admin_url().to_owned();
    let s0 = scrape(&base);
    assert_eq!(s0.content_type, "text/plain; version=0.0.4; charset=utf-8");
    assert_eq!(s0.get(&format!("ironlun_lu_queue_depth{}", lu(""))), 0.0);
    assert!(!s0.has("ironlun_session_"), "no session yet:\n{}", s0.text);

    let a = session(d.addr, HOST_A).await;
    let b = session(d.addr, HOST_B).await;
    // A login to a target that does not exist fails with 0203h.
    let wrong = Session::connect(
        d.addr,
        LoginOptions::new(HOST_A, Some("iqn.2026-11.io.ironlun:nope".to_owned())),
    )
    .await;
    assert!(wrong.is_err(), "login to a wrong target name succeeded");
    // The refused connection's task ends (and leaves the open-connection gauge) just after
    // the initiator has read the refusal: wait for it.
    let open = format!("ironlun_connections_open{{portal=\"{}\"}}", d.addr);
    let mut s1 = scrape(&base);
    for _ in 0..200 {
        if s1.get(&open) == 2.0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
        s1 = scrape(&base);
    }
    let sa = |extra: &str| session_labels(HOST_A, extra);
    let sb = |extra: &str| session_labels(HOST_B, extra);
    for l in [sa("direction=\"none\""), sb("direction=\"none\"")] {
        let series = format!("ironlun_session_commands_total{l}");
        assert!(s1.samples.contains_key(&series), "{series}\n{}", s1.text);
    }
    assert_eq!(
        delta(
            &s0,
            &s1,
            &format!("ironlun_logins_total{{target=\"{TARGET}\"}}")
        ),
        2.0
    );
    assert_eq!(
        delta(
            &s0,
            &s1,
            "ironlun_login_failures_total{reason=\"target_not_found\"}"
        ),
        1.0
    );
    let portal = format!("{{portal=\"{}\"}}", d.addr);
    assert!(
        delta(
            &s0,
            &s1,
            &format!("ironlun_connections_accepted_total{portal}")
        ) >= 3.0
    );
    assert_eq!(s1.get(&format!("ironlun_connections_open{portal}")), 2.0);

    // The known workload.
    for i in 0..37u32 {
        let r = a
            .command(
                0,
                &cdb10(0x2a, i * 8, 8),
                Bytes::from(vec![0x5a; 8 * 512]),
                0,
            )
            .await
            .unwrap();
        assert_eq!(r.status, GOOD);
    }
    for i in 0..21u32 {
        let r = a
            .command(0, &cdb10(0x28, i * 4, 4), Bytes::new(), 4 * 512)
            .await
            .unwrap();
        assert_eq!(r.status, GOOD);
        assert_eq!(r.data.len(), 4 * 512);
    }
    for _ in 0..5 {
        assert_eq!(a.test_unit_ready(0).await.unwrap().status, GOOD);
    }
    // An operation code no LU supports: ILLEGAL REQUEST.
    let r = a
        .command(0, &[0xff, 0, 0, 0, 0, 0], Bytes::new(), 0)
        .await
        .unwrap();
    assert_eq!(r.status, CHECK_CONDITION);
    assert_eq!(r.sense_key().unwrap().key, 0x5);
    // Persistent reservations: A registers and reserves exclusive access; B's read conflicts;
    // A clears.
    let key = OutParams::keys(0, 0xa1);
    let r = a.pr_out(0, OutAction::Register, 0, &key).await.unwrap();
    assert_eq!(r.status, GOOD);
    let held = OutParams::keys(0xa1, 0);
    let r = a
        .pr_out(0, OutAction::Reserve, EXCLUSIVE_ACCESS, &held)
        .await
        .unwrap();
    assert_eq!(r.status, GOOD);
    let r = b
        .command(0, &cdb10(0x28, 0, 1), Bytes::new(), 512)
        .await
        .unwrap();
    assert_eq!(r.status, RESERVATION_CONFLICT);
    let r = a.pr_out(0, OutAction::Clear, 0, &held).await.unwrap();
    assert_eq!(r.status, GOOD);
    let s2 = scrape(&base);

    let writes = 37.0 + 3.0; // WRITE (10) and the three PR OUT parameter lists
    let reads = 21.0;
    let nones = 5.0 + 1.0 + 1.0; // TUR, the illegal request, the conflicting read
    let pr_bytes = 3.0 * 24.0;
    for (series, want) in [
        (
            format!("ironlun_lu_commands_total{}", lu("direction=\"write\"")),
            writes,
        ),
        (
            format!("ironlun_lu_commands_total{}", lu("direction=\"read\"")),
            reads,
        ),
        (
            format!("ironlun_lu_commands_total{}", lu("direction=\"none\"")),
            nones,
        ),
        (
            format!("ironlun_lu_bytes_total{}", lu("direction=\"write\"")),
            37.0 * 8.0 * 512.0 + pr_bytes,
        ),
        (
            format!("ironlun_lu_bytes_total{}", lu("direction=\"read\"")),
            21.0 * 4.0 * 512.0,
        ),
        (
            format!(
                "ironlun_lu_command_duration_seconds_count{}",
                lu("direction=\"write\"")
            ),
            writes,
        ),
        (
            format!(
                "ironlun_lu_command_duration_seconds_count{}",
                lu("direction=\"read\"")
            ),
            reads,
        ),
        (
            format!(
                "ironlun_lu_command_duration_seconds_count{}",
                lu("direction=\"none\"")
            ),
            nones,
        ),
        (
            format!(
                "ironlun_lu_command_duration_seconds_bucket{}",
                lu("direction=\"read\",le=\"+Inf\"")
            ),
            reads,
        ),
        (
            format!(
                "ironlun_lu_check_conditions_total{}",
                lu("sense_key=\"illegal_request\"")
            ),
            1.0,
        ),
        (
            format!(
                "ironlun_lu_check_conditions_total{}",
                lu("sense_key=\"unit_attention\"")
            ),
            0.0,
        ),
        (
            format!("ironlun_lu_reservation_conflicts_total{}", lu("")),
            1.0,
        ),
        (
            format!(
                "ironlun_lu_pr_out_total{}",
                lu("service_action=\"register\"")
            ),
            1.0,
        ),
        (
            format!(
                "ironlun_lu_pr_out_total{}",
                lu("service_action=\"reserve\"")
            ),
            1.0,
        ),
        (
            format!("ironlun_lu_pr_out_total{}", lu("service_action=\"clear\"")),
            1.0,
        ),
        (
            format!(
                "ironlun_lu_pr_out_total{}",
                lu("service_action=\"preempt\"")
            ),
            0.0,
        ),
        (
            format!(
                "ironlun_session_commands_total{}",
                sa("direction=\"write\"")
            ),
            writes,
        ),
        (
            format!("ironlun_session_commands_total{}", sa("direction=\"read\"")),
            reads,
        ),
        (
            format!("ironlun_session_commands_total{}", sa("direction=\"none\"")),
            nones - 1.0,
        ),
        (
            format!("ironlun_session_bytes_total{}", sa("direction=\"read\"")),
            21.0 * 4.0 * 512.0,
        ),
        (
            format!("ironlun_session_commands_total{}", sb("direction=\"none\"")),
            1.0,
        ),
        (
            format!(
                "ironlun_session_commands_total{}",
                sb("direction=\"write\"")
            ),
            0.0,
        ),
    ] {
        assert_eq!(delta(&s1, &s2, &series), want, "{series}\n{}", s2.text);
    }
    assert_eq!(s2.get(&format!("ironlun_lu_queue_depth{}", lu(""))), 0.0);
    // Every read took at least some time and at most the test's length.
    let sum = delta(
        &s1,
        &s2,
        &format!(
            "ironlun_lu_command_duration_seconds_sum{}",
            lu("direction=\"read\"")
        ),
    );
    assert!(sum > 0.0 && sum < 60.0, "{sum}");

    // Handover steps: a commit, an abort, a refused commit (of the aborted epoch).
    let (st, v) = admin(&base, "owner", json!({"host": HOST_A, "epoch": 1})).await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = admin(&base, "handover/prepare", hand(2)).await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = admin(&base, "handover/commit", hand(2)).await;
    assert_eq!(st, 200, "{v}");
    let back = json!({"from": HOST_B, "to": HOST_A, "epoch": 3});
    let (st, v) = admin(&base, "handover/prepare", back.clone()).await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = admin(&base, "handover/abort", back.clone()).await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = admin(&base, "handover/commit", back).await;
    assert_ne!(st, 200, "{v}");
    let s3 = scrape(&base);
    for (series, want) in [
        (
            format!("ironlun_lu_handovers_total{}", lu("result=\"committed\"")),
            1.0,
        ),
        (
            format!("ironlun_lu_handovers_total{}", lu("result=\"aborted\"")),
            1.0,
        ),
        (
            format!("ironlun_lu_handovers_total{}", lu("result=\"refused\"")),
            1.0,
        ),
        (
            format!("ironlun_lu_handover_switch_seconds_count{}", lu("")),
            1.0,
        ),
        // Handover steps are not initiator commands.
        (
            format!("ironlun_lu_commands_total{}", lu("direction=\"write\"")),
            0.0,
        ),
    ] {
        assert_eq!(delta(&s2, &s3, &series), want, "{series}\n{}", s3.text);
    }
    promtool_accepts(&s3.text);

    // B's session ends: its series go, A's stay.
    b.logout().await.unwrap();
    drop(b);
    let deadline = Instant::now() + PROMPT;
    loop {
        let s = scrape(&base);
        if !s.text.contains(HOST_B) {
            assert!(s.text.contains(HOST_A));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "B's session series stayed:\n{}",
            s.text
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(a);
}

/// `promtool check metrics` (Debian package prometheus; a missing promtool fails the test).
fn promtool_accepts(text: &str) {
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (scripts/install-deps.sh installs the prometheus package)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Commands that finish on a task of their own (file LUN: FUA writes, transfers above the
/// inline limit, SYNCHRONIZE CACHE) run concurrently and are counted once each, like inline ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_commands_are_counted_once_at_queue_depth_eight() {
    let config = format!(
        "[[target]]\nname = \"{TARGET}\"\n[[target.lun]]\nid = 0\nbackstore = \"file\"\npath = \"lun0.img\"\nsize = \"64MiB\"\n"
    );
    let d = Daemon::builder(IRONLUN).config(&config).start();
    let base = d.admin_url().to_owned();
    let a = std::sync::Arc::new(session(d.addr, HOST_A).await);
    let s1 = scrape(&base);
    const LEN: usize = 256 * 1024; // 512 blocks, above the inline limit
    let mut tasks = Vec::new();
    for w in 0..8u32 {
        let a = a.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..6u32 {
                let lba = u64::from(w * 6 + i) * 512;
                let r = a
                    .write16(0, lba, 512, Bytes::from(vec![7u8; LEN]), i % 2 == 0)
                    .await
                    .unwrap();
                assert_eq!(r.status, GOOD);
                let r = a.read16(0, lba, 512, 512).await.unwrap();
                assert_eq!((r.status, r.data.len()), (GOOD, LEN));
            }
            let r = a
                .command(0, &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], Bytes::new(), 0)
                .await
                .unwrap();
            assert_eq!(r.status, GOOD);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let s2 = scrape(&base);
    for (series, want) in [
        (
            format!("ironlun_lu_commands_total{}", lu("direction=\"write\"")),
            48.0,
        ),
        (
            format!("ironlun_lu_commands_total{}", lu("direction=\"read\"")),
            48.0,
        ),
        (
            format!("ironlun_lu_commands_total{}", lu("direction=\"none\"")),
            8.0,
        ),
        (
            format!("ironlun_lu_bytes_total{}", lu("direction=\"write\"")),
            48.0 * LEN as f64,
        ),
        (
            format!("ironlun_lu_bytes_total{}", lu("direction=\"read\"")),
            48.0 * LEN as f64,
        ),
        (
            format!(
                "ironlun_lu_command_duration_seconds_count{}",
                lu("direction=\"write\"")
            ),
            48.0,
        ),
        (
            format!(
                "ironlun_lu_command_duration_seconds_count{}",
                lu("direction=\"read\"")
            ),
            48.0,
        ),
        (
            format!(
                "ironlun_session_commands_total{}",
                session_labels(HOST_A, "direction=\"write\"")
            ),
            48.0,
        ),
    ] {
        assert_eq!(delta(&s1, &s2, &series), want, "{series}\n{}", s2.text);
    }
    let lu_depth = format!("ironlun_lu_queue_depth{}", lu(""));
    let session_depth = format!(
        "ironlun_session_queue_depth{}",
        session_labels(HOST_A, "").replace(",}", "}")
    );
    for series in [lu_depth, session_depth] {
        assert_eq!(s2.samples.get(&series), Some(&0.0), "{series}\n{}", s2.text);
    }
}

/// `/metrics` is behind the admin API's bearer token when one is configured.
#[test]
fn metrics_need_the_admin_token() {
    const TOKEN: &str = "metrics-token-0123456789abcdef";
    let config = format!(
        "[admin]\ntoken_file = \"admin.token\"\n[[target]]\nname = \"{TARGET}\"\n[[target.lun]]\nid = 0\nbackstore = \"ram\"\nsize = \"1MiB\"\n"
    );
    let d = Daemon::builder(IRONLUN)
        .config(&config)
        .file("admin.token", &format!("{TOKEN}\n"))
        .start();
    let (head, _) = get_metrics(d.admin_url(), None);
    assert!(head.starts_with("HTTP/1.1 401 "), "{head}");
    let (head, _) = get_metrics(d.admin_url(), Some("wrong-token-0123456789abcdef"));
    assert!(head.starts_with("HTTP/1.1 401 "), "{head}");
    let (head, body) = get_metrics(d.admin_url(), Some(TOKEN));
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
        "{head}"
    );
    assert!(
        body.contains(&format!(
            "ironlun_lu_queue_depth{{target=\"{TARGET}\",lun=\"0\"}} 0\n"
        )),
        "{body}"
    );
}

/// The PromQL of every dashboard panel parses: each `expr`, with Grafana's variables replaced
/// by values, as a recording rule that `promtool check rules` accepts.
#[test]
fn dashboard_queries_are_valid_promql() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../conf/grafana/ironlun-dashboard.json"
    ))
    .unwrap();
    let dash: Value = serde_json::from_str(&text).unwrap();
    let mut exprs = Vec::new();
    collect_exprs(&dash, &mut exprs);
    assert!(exprs.len() > 20);
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, e) in exprs.iter().enumerate() {
        let e = e
            .replace("$__rate_interval", "5m")
            .replace("$__range", "1h")
            .replace("$job", ".*")
            .replace("$target", ".*")
            .replace("$lun", ".*");
        assert!(!e.contains('$'), "unreplaced variable in {e}");
        rules.push_str(&format!(
            "      - record: dashboard:expr_{i}\n        expr: '{}'\n",
            e.replace('\'', "''")
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dashboard-rules.yml");
    std::fs::write(&path, &rules).unwrap();
    let out = std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(&path)
        .output()
        .expect("promtool (scripts/install-deps.sh installs the prometheus package)");
    assert!(
        out.status.success(),
        "promtool check rules failed:\n{}{}\n{rules}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn collect_exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("expr", Value::String(e)) => out.push(e.clone()),
                    _ => collect_exprs(x, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| collect_exprs(x, out)),
        _ => {}
    }
}
