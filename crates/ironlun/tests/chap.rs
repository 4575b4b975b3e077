//! Tier 4: CHAP (RFC 7143 §12.1.3) through our initiator against the daemon: one-way and mutual
//! with MD5 and SHA-256, wrong secrets in both directions, discovery with CHAP, the limiter.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use ironlun_initiator::{
    discover, discover_with, ChapAlgorithm, ChapCredentials, Error, LoginOptions,
};
use ironlun_testkit::{Daemon, Login, PROMPT};
use std::time::Duration;

const IRONLUN: &str = env!("CARGO_BIN_EXE_ironlun");

const ONE_WAY: &str = "iqn.2026-11.io.ironlun:oneway";
const MUTUAL: &str = "iqn.2026-11.io.ironlun:mutual";
const OPEN: &str = "iqn.2026-11.io.ironlun:open";
const HOST: &str = "iqn.2026-11.io.test:host";

const CONFIG: &str = r#"
[discovery]
chap = { user = "disco", secret = "discovery-secret" }

[[target]]
name = "iqn.2026-11.io.ironlun:oneway"
chap = { user = "alice", secret = "alice-secret-1" }
[[target.lun]]
id = 0
backstore = "ram"
size = "1MiB"

[[target]]
name = "iqn.2026-11.io.ironlun:mutual"
[target.chap]
user = "bob"
secret = "bob-secret-123"
mutual_user = "mutual-target"
mutual_secret = "target-secret-9"
[[target.lun]]
id = 0
backstore = "ram"
size = "1MiB"

[[target]]
name = "iqn.2026-11.io.ironlun:open"
[[target.lun]]
id = 0
backstore = "ram"
size = "1MiB"
"#;

/// A login to `target` as `initiator`, with CHAP if `chap`, each round trip within `PROMPT`.
fn login(initiator: &str, target: &str, chap: Option<ChapCredentials>) -> Login {
    let l = Login::new(initiator).target(target).timeout(PROMPT);
    match chap {
        Some(c) => l.chap(c),
        None => l,
    }
}

fn auth_failure(r: Result<ironlun_initiator::Session, Error>) {
    match r {
        Err(Error::LoginFailed { class, detail }) => assert_eq!((class, detail), (2, 1)),
        Err(e) => panic!("expected 0201, got {e}"),
        Ok(_) => panic!("login succeeded"),
    }
}

/// Log in, run one command, log out.
async fn use_session(d: &Daemon, l: Login) {
    let s = l.try_connect(d.addr).await.expect("login");
    // The first command reports the power-on unit attention; the second is GOOD.
    let _ = s.test_unit_ready(0).await.unwrap();
    assert_eq!(s.test_unit_ready(0).await.unwrap().status, 0);
    s.logout().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_way_chap_md5_and_sha256() {
    let mut d = Daemon::builder(IRONLUN).config(CONFIG).start();
    for alg in [ChapAlgorithm::Md5, ChapAlgorithm::Sha256] {
        let chap = ChapCredentials::new("alice", "alice-secret-1", alg);
        use_session(&d, login(HOST, ONE_WAY, Some(chap))).await;
    }
    // Every algorithm we implement, offered as the initiator's preference list.
    let mut chap = ChapCredentials::new("alice", "alice-secret-1", ChapAlgorithm::Md5);
    chap.algorithms = ChapAlgorithm::ALL.to_vec();
    use_session(&d, login(HOST, ONE_WAY, Some(chap))).await;
    d.assert_healthy();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_way_chap_refuses_wrong_secret_name_and_no_chap() {
    let mut d = Daemon::builder(IRONLUN).config(CONFIG).start();
    let host = |i: usize| format!("iqn.2026-11.io.test:bad{i}");
    let cases = [
        Some(ChapCredentials::new(
            "alice",
            "wrong-secret-1",
            ChapAlgorithm::Md5,
        )),
        Some(ChapCredentials::new(
            "mallory",
            "alice-secret-1",
            ChapAlgorithm::Sha256,
        )),
        None,
    ];
    for (i, chap) in cases.into_iter().enumerate() {
        let l = login(&host(i), ONE_WAY, chap);
        auth_failure(l.try_connect(d.addr).await);
    }
    // The open target still logs in with AuthMethod=None.
    use_session(&d, login(HOST, OPEN, None)).await;
    d.assert_healthy();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_chap_both_directions() {
    let mut d = Daemon::builder(IRONLUN).config(CONFIG).start();
    for alg in [ChapAlgorithm::Md5, ChapAlgorithm::Sha256] {
        let chap = ChapCredentials::new("bob", "bob-secret-123", alg)
            .with_mutual("mutual-target", "target-secret-9");
        use_session(&d, login(HOST, MUTUAL, Some(chap))).await;
    }
    // The target does not know our idea of its secret: we refuse it.
    let chap = ChapCredentials::new("bob", "bob-secret-123", ChapAlgorithm::Md5)
        .with_mutual("mutual-target", "not-the-target-secret");
    match login(HOST, MUTUAL, Some(chap)).try_connect(d.addr).await {
        Err(Error::TargetAuthentication) => {}
        Err(e) => panic!("expected a mutual CHAP failure, got {e}"),
        Ok(_) => panic!("login succeeded"),
    }
    // Wrong initiator secret with mutual asked: the target answers 0201.
    let chap = ChapCredentials::new("bob", "wrong-secret-12", ChapAlgorithm::Md5)
        .with_mutual("mutual-target", "target-secret-9");
    auth_failure(
        login("iqn.2026-11.io.test:m2", MUTUAL, Some(chap))
            .try_connect(d.addr)
            .await,
    );
    // A target without mutual credentials refuses a mutual request.
    let chap = ChapCredentials::new("alice", "alice-secret-1", ChapAlgorithm::Md5)
        .with_mutual("whoever", "whatever-secret");
    auth_failure(
        login("iqn.2026-11.io.test:m3", ONE_WAY, Some(chap))
            .try_connect(d.addr)
            .await,
    );
    d.assert_healthy();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_with_chap_requires_it() {
    let mut d = Daemon::builder(IRONLUN).config(CONFIG).start();
    match discover(d.addr, HOST).await {
        Err(Error::LoginFailed { class, detail }) => assert_eq!((class, detail), (2, 1)),
        other => panic!("discovery without CHAP: {other:?}"),
    }
    let bad = LoginOptions {
        chap: Some(ChapCredentials::new(
            "disco",
            "wrong-secret-xx",
            ChapAlgorithm::Md5,
        )),
        ..LoginOptions::new("iqn.2026-11.io.test:d2", None)
    };
    match discover_with(d.addr, bad).await {
        Err(Error::LoginFailed { class, detail }) => assert_eq!((class, detail), (2, 1)),
        other => panic!("discovery with a wrong secret: {other:?}"),
    }
    let good = LoginOptions {
        chap: Some(ChapCredentials::new(
            "disco",
            "discovery-secret",
            ChapAlgorithm::Sha256,
        )),
        ..LoginOptions::new(HOST, None)
    };
    let targets = discover_with(d.addr, good).await.unwrap();
    let names: Vec<&str> = targets.iter().map(|(n, _)| n.as_str()).collect();
    for t in [ONE_WAY, MUTUAL, OPEN] {
        assert!(names.contains(&t), "{names:?}");
    }
    d.assert_healthy();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guessing_is_slowed_per_initiator_and_good_logins_stay_fast() {
    let mut d = Daemon::builder(IRONLUN).config(CONFIG).start();
    let guesser = "iqn.2026-11.io.test:guesser";
    let bad = || {
        Some(ChapCredentials::new(
            "alice",
            "wrong-secret-1",
            ChapAlgorithm::Md5,
        ))
    };
    // 40 wrong guesses as fast as the target answers: each is refused with 0201 (none is
    // held open as a tarpit: each answer comes, or the session helper's timeout fails it).
    for _ in 0..40 {
        auth_failure(login(guesser, ONE_WAY, bad()).try_connect(d.addr).await);
    }
    // Another initiator logs in at once.
    let good = || {
        Some(ChapCredentials::new(
            "alice",
            "alice-secret-1",
            ChapAlgorithm::Md5,
        ))
    };
    // Its first attempt succeeds: the guesser's backoff is its own.
    use_session(&d, login(HOST, ONE_WAY, good())).await;
    // The guesser itself, now with the right secret, gets in once its backoff (< 1 s, unit
    // tested with explicit times in chap.rs and login.rs) has run out: refused meanwhile,
    // retried every 50 ms, at most 200 times (a hang guard).
    let mut tries = 0;
    loop {
        match login(guesser, ONE_WAY, good()).try_connect(d.addr).await {
            Ok(s) => {
                s.logout().await.unwrap();
                break;
            }
            Err(Error::LoginFailed {
                class: 2,
                detail: 1,
            }) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{e}"),
        }
        tries += 1;
        assert!(tries < 200, "still refused after 200 tries");
    }
    d.assert_healthy();
}
