//! Text log lines (issue 16 finding 2), read from the daemon's stderr, which is a pipe here:
//! no ANSI colour codes; a login line names the target (or `discovery`) and the digests in
//! plain words; a logout and a connection dropped without logout each get an INFO line saying
//! who (initiator, target, TSIH, peer) and why.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use ironlun_initiator::{discover, Session};
use ironlun_testkit::{Daemon, Login, PROMPT};
use std::time::{Duration, Instant};

const IRONLUN: &str = env!("CARGO_BIN_EXE_ironlun");

const TARGET: &str = "iqn.2026-11.io.ironlun:logs";
const CALM: &str = "iqn.2026-11.io.test:logs-calm";
const DIGESTS: &str = "iqn.2026-11.io.test:logs-digests";
const ABRUPT: &str = "iqn.2026-11.io.test:logs-abrupt";
const FINDER: &str = "iqn.2026-11.io.test:logs-finder";

fn config() -> String {
    format!(
        "[[target]]\nname = \"{TARGET}\"\n[[target.lun]]\nid = 0\nbackstore = \"ram\"\nsize = \"1MiB\"\n"
    )
}

async fn login(d: &Daemon, initiator: &str, digests: bool) -> Session {
    let s = Login::new(initiator)
        .target(TARGET)
        .digests(digests)
        .timeout(PROMPT)
        .try_connect(d.addr)
        .await
        .expect("login");
    let _ = s.test_unit_ready(0).await.expect("TUR");
    s
}

/// The INFO line with message `message` that names `initiator` (panics with the log if none).
fn info_line<'a>(log: &'a str, message: &str, initiator: &str) -> &'a str {
    log.lines()
        .find(|l| {
            l.contains(" INFO ")
                && l.contains(&format!(": {message} "))
                && l.contains(&format!("initiator={initiator} "))
        })
        .unwrap_or_else(|| panic!("no INFO {message:?} line for {initiator}:\n{log}"))
}

/// Wait until stderr has a line containing every one of `parts`.
async fn wait_for(d: &Daemon, parts: &[&str]) {
    let deadline = Instant::now() + PROMPT;
    while !d
        .stderr()
        .lines()
        .any(|l| parts.iter().all(|p| l.contains(p)))
    {
        assert!(
            Instant::now() < deadline,
            "no line with {parts:?}:\n{}",
            d.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_logs_are_plain_and_name_logins_logouts_and_drops() {
    let mut d = Daemon::builder(IRONLUN).config(&config()).start();

    let calm = login(&d, CALM, false).await;
    let digests = login(&d, DIGESTS, true).await;
    assert!(digests.negotiated().header_digest && digests.negotiated().data_digest);
    calm.logout().await.expect("logout");
    digests.logout().await.expect("logout");
    // Dropped without a logout: the TCP connection is closed under the session.
    let abrupt = login(&d, ABRUPT, false).await;
    drop(abrupt);
    let _ = discover(d.addr, FINDER).await.expect("discovery");
    wait_for(&d, &["connection dropped", ABRUPT]).await;
    wait_for(&d, &["logout", FINDER]).await;
    d.sigterm();
    assert!(d.wait_exit(PROMPT).success());
    let log = d.stderr();

    assert!(
        !log.contains("\x1b["),
        "ANSI escapes in a piped log:\n{log}"
    );
    for bad in ["target=None", "target=Some", "digests=Some", "(None, None)"] {
        assert!(!log.contains(bad), "{bad:?} in the log:\n{log}");
    }

    // Login lines: target by name (or `discovery`), digests as words, the peer from the span.
    let l = info_line(&log, "login", CALM);
    assert!(l.contains(&format!("target={TARGET} ")), "{l}");
    assert!(l.contains("header_digest=None data_digest=None"), "{l}");
    assert!(l.contains("peer=127.0.0.1:"), "{l}");
    assert!(l.contains("tsih="), "{l}");
    let l = info_line(&log, "login", DIGESTS);
    assert!(l.contains("header_digest=CRC32C data_digest=CRC32C"), "{l}");
    let l = info_line(&log, "login", FINDER);
    assert!(l.contains("target=discovery "), "{l}");

    // Logouts: who and the initiator's reason.
    for who in [CALM, DIGESTS, FINDER] {
        let l = info_line(&log, "logout", who);
        assert!(l.contains("reason=logout (close the session)"), "{l}");
        assert!(l.contains("peer=127.0.0.1:") && l.contains("tsih="), "{l}");
    }
    assert!(info_line(&log, "logout", CALM).contains(&format!("target={TARGET} ")));

    // The dropped connection: who and why.
    let l = info_line(&log, "connection dropped", ABRUPT);
    assert!(l.contains(&format!("target={TARGET} ")), "{l}");
    assert!(l.contains("reason=EOF"), "{l}");
    assert!(l.contains("peer=127.0.0.1:") && l.contains("tsih="), "{l}");
}
