//! `serve --log-format json`: every stderr line is one JSON object; the lines of a session
//! carry the `conn` span with `peer` and, from the login on, `initiator`, `target` and `tsih`;
//! CHAP secrets never appear.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use ironlun_initiator::{ChapAlgorithm, ChapCredentials, LoginOptions, Session};
use ironlun_testkit::{Daemon, PROMPT};
use serde_json::Value;
use std::time::Duration;

const IRONLUN: &str = env!("CARGO_BIN_EXE_ironlun");

const TARGET: &str = "iqn.2026-11.io.ironlun:logs";
const HOST: &str = "iqn.2026-11.io.test:json-logs";
const SECRET: &str = "never-logged-secret-42";

fn config() -> String {
    format!(
        "[[target]]\nname = \"{TARGET}\"\nchap = {{ user = \"alice\", secret = \"{SECRET}\" }}\n[[target.lun]]\nid = 0\nbackstore = \"ram\"\nsize = \"1MiB\"\n"
    )
}

/// The `conn` span's fields of a JSON line, from `span` (the current span).
fn conn_span(v: &Value) -> Option<&Value> {
    v.get("span").filter(|s| s["name"] == "conn")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_lines_carry_the_session_span() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::builder(IRONLUN)
        .config(&config())
        .args(&["--log-format", "json"])
        .start_in(dir.path());
    let opts = LoginOptions {
        chap: Some(ChapCredentials::new("alice", SECRET, ChapAlgorithm::Sha256)),
        timeout: PROMPT,
        ..LoginOptions::new(HOST, Some(TARGET.to_owned()))
    };
    let s = Session::connect(d.addr, opts).await.expect("login");
    let _ = s.test_unit_ready(0).await.unwrap();
    assert_eq!(s.test_unit_ready(0).await.unwrap().status, 0);
    s.logout().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    d.sigterm();
    assert!(d.wait_exit(PROMPT).success());
    let err = d.stderr();
    assert!(!err.contains(SECRET), "a CHAP secret in the log:\n{err}");

    let lines: Vec<Value> = err
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}\n{err}")))
        .collect();
    for v in &lines {
        for k in ["timestamp", "level", "fields", "target"] {
            assert!(v.get(k).is_some(), "no {k}: {v}");
        }
    }
    let login = lines
        .iter()
        .find(|v| v["fields"]["message"] == "login")
        .unwrap_or_else(|| panic!("no login line:\n{err}"));
    let span = conn_span(login).unwrap_or_else(|| panic!("no conn span: {login}"));
    assert_eq!(span["initiator"], HOST, "{login}");
    assert_eq!(span["target"], TARGET, "{login}");
    assert!(span["tsih"].as_u64().is_some_and(|t| t != 0), "{login}");
    assert!(
        span["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with("127.0.0.1:")),
        "{login}"
    );
    assert_eq!(login["spans"][0]["name"], "conn", "{login}");
    // Lines after the login in the same connection carry the same fields.
    let peer = span["peer"].clone();
    let later: Vec<&Value> = lines
        .iter()
        .skip_while(|v| v["fields"]["message"] != "login")
        .skip(1)
        .filter(|v| conn_span(v).is_some_and(|s| s["peer"] == peer))
        .collect();
    assert!(!later.is_empty(), "no later line of the session:\n{err}");
    for v in later {
        let s = conn_span(v).unwrap();
        assert_eq!(
            (&s["initiator"], &s["target"]),
            (&span["initiator"], &span["target"]),
            "{v}"
        );
    }
}

#[test]
fn env_selects_json_and_rejects_unknown_formats() {
    let dir = tempfile::tempdir().unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_ironlun"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "off",
            "--data-dir",
        ])
        .arg(dir.path())
        .env("IRONLUN_LOG_FORMAT", "yaml")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("IRONLUN_LOG_FORMAT"));
    // The variable alone selects JSON: the shutdown lines are JSON objects.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ironlun"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "off",
            "--data-dir",
        ])
        .arg(dir.path())
        .env("IRONLUN_LOG_FORMAT", "json")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    std::io::BufRead::read_line(&mut out, &mut first).unwrap();
    assert!(first.starts_with("listening "), "{first:?}");
    let ok = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    let messages: Vec<String> = err
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}"));
            v["fields"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    assert!(messages.iter().any(|m| m == "stopped"), "{err}");
}
