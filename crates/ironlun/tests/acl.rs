//! Tier 4: ACLs, LUN masking and session limits, through our initiator against the daemon.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use bytes::Bytes;
use ironlun_initiator::{discover, Error, LoginOptions, Session, TmfFunction, TmfResponse};
use ironlun_testkit::{Daemon, Login, PROMPT, TARGET};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const IRONLUN: &str = env!("CARGO_BIN_EXE_ironlun");

const PROTECTED: &str = "iqn.2026-11.io.ironlun:protected";
const INSIDER: &str = "iqn.2026-11.io.test:insider";
const OUTSIDER: &str = "iqn.2026-11.io.test:outsider";
const MASKED: &str = "iqn.2026-11.io.test:masked";

/// The lab target is open, has LUNs 0-2, masks LUN 1 from `MASKED`, and admits 2 sessions;
/// the protected target admits only the insider and the `group-*` initiators.
const CONFIG: &str = r#"
[limits]
max_sessions = 64

[[target]]
name = "iqn.2026-11.io.ironlun:lab"
max_sessions = 2
[[target.lun]]
id = 0
backstore = "ram"
size = "1MiB"
[[target.lun]]
id = 1
backstore = "ram"
size = "1MiB"
[[target.lun]]
id = 2
backstore = "ram"
size = "1MiB"
[[target.initiator]]
name = "iqn.2026-11.io.test:masked"
luns = [0, 2]

[[target]]
name = "iqn.2026-11.io.ironlun:protected"
allowed_initiators = ["iqn.2026-11.io.test:insider", "iqn.2026-11.io.test:group-*"]
[[target.lun]]
id = 0
backstore = "ram"
size = "1MiB"
"#;

/// The 8-byte LUN field for a single-level peripheral LUN (SAM-5 §4.7).
fn lun(n: u64) -> u64 {
    n << 48
}

fn login_status<T>(r: Result<T, Error>) -> (u8, u8) {
    match r {
        Err(Error::LoginFailed { class, detail }) => (class, detail),
        Err(e) => panic!("expected a login failure, got {e}"),
        Ok(_) => panic!("expected a login failure, login succeeded"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_allowed_and_refused_by_acl() {
    let mut d = Daemon::builder(IRONLUN).config(CONFIG).start();
    let s = Login::new(INSIDER)
        .target(PROTECTED)
        .try_connect(d.addr)
        .await
        .expect("insider login");
    s.logout().await.unwrap();
    // Patterns, compared case-insensitively (RFC 3722).
    let s = Login::new("IQN.2026-11.io.test:Group-7")
        .target(PROTECTED)
        .try_connect(d.addr)
        .await
        .expect("pattern login");
    s.logout().await.unwrap();
    // RFC 7143 §11.13.5: 0202 AUTHORIZATION FAILURE.
    let r = Login::new(OUTSIDER)
        .target(PROTECTED)
        .try_connect(d.addr)
        .await;
    assert_eq!(login_status(r), (2, 2));
    // The outsider may still use the open target.
    let s = Login::new(OUTSIDER)
        .try_connect(d.addr)
        .await
        .expect("outsider login to the open target");
    s.logout().await.unwrap();
    d.assert_healthy();
    assert!(d.stderr().contains("login refused by the target's ACL"));
}

async fn send_targets(addr: SocketAddr, initiator: &str, value: &str) -> Vec<String> {
    let s = Session::connect(addr, LoginOptions::new(initiator, None))
        .await
        .expect("discovery login");
    let pairs = s
        .text(&[("SendTargets".to_owned(), value.to_owned())])
        .await
        .expect("SendTargets");
    s.logout().await.unwrap();
    pairs
        .into_iter()
        .filter(|(k, _)| k == "TargetName")
        .map(|(_, v)| v)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_lists_only_allowed_targets() {
    let d = Daemon::builder(IRONLUN).config(CONFIG).start();
    let names = |t: Vec<(String, Vec<String>)>| t.into_iter().map(|(n, _)| n).collect::<Vec<_>>();
    assert_eq!(
        names(discover(d.addr, INSIDER).await.unwrap()),
        vec![TARGET, PROTECTED]
    );
    assert_eq!(
        names(discover(d.addr, OUTSIDER).await.unwrap()),
        vec![TARGET]
    );
    // Asking for the hidden target by name reveals nothing either.
    assert!(send_targets(d.addr, OUTSIDER, PROTECTED).await.is_empty());
    assert_eq!(
        send_targets(d.addr, INSIDER, PROTECTED).await,
        vec![PROTECTED]
    );
}

/// REPORT LUNS (SPC-4 §6.33): the LUN numbers listed.
async fn report_luns(s: &Session) -> Vec<u64> {
    let cdb = [0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0];
    let r = s.command(0, &cdb, Bytes::new(), 256).await.unwrap();
    assert_eq!(r.status, 0, "REPORT LUNS status");
    let len = u32::from_be_bytes(r.data[0..4].try_into().unwrap()) as usize;
    r.data[8..8 + len]
        .chunks(8)
        .map(|e| u64::from(u16::from_be_bytes([e[0], e[1]]) & 0x3fff))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lun_masking_hides_luns() {
    let d = Daemon::builder(IRONLUN).config(CONFIG).start();
    let open = ironlun_testkit::session(d.addr, "iqn.2026-11.io.test:unmasked").await;
    assert_eq!(report_luns(&open).await, vec![0, 1, 2]);
    open.logout().await.unwrap();

    let s = ironlun_testkit::session(d.addr, MASKED).await;
    assert_eq!(report_luns(&s).await, vec![0, 2]);
    // INQUIRY to a masked LUN: peripheral qualifier 011b, device type 1Fh (SPC-4 §6.6.2).
    let r = s.inquiry(lun(1), 96).await.unwrap();
    assert_eq!((r.status, r.data[0]), (0, 0x7f));
    // Other commands: CHECK CONDITION, ILLEGAL REQUEST, LOGICAL UNIT NOT SUPPORTED (25h/00h).
    let r = s.read16(lun(1), 0, 1, 512).await.unwrap();
    assert_eq!(r.status, 0x02);
    let k = r.sense_key().expect("sense");
    assert_eq!((k.key, k.asc, k.ascq), (0x05, 0x25, 0x00));
    // TMFs to it: LUN DOES NOT EXIST (RFC 7143 §11.6.1).
    let t = s
        .task_mgmt(TmfFunction::LogicalUnitReset, lun(1), 0)
        .await
        .unwrap();
    assert_eq!(t, TmfResponse::LunDoesNotExist);
    // A visible LUN works (its first command reports the power-on unit attention).
    let mut status = 0xff;
    for _ in 0..3 {
        status = s.read16(lun(2), 0, 1, 512).await.unwrap().status;
        if status == 0 {
            break;
        }
    }
    assert_eq!(status, 0);
    s.logout().await.unwrap();
}

/// Retry a login until it succeeds (a session released by a dropped connection is given
/// back when the daemon notices the close).
async fn login_eventually(addr: SocketAddr, l: Login) -> Session {
    let deadline = Instant::now() + PROMPT;
    loop {
        match l.clone().try_connect(addr).await {
            Ok(s) => return s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("login never succeeded: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_session_limit_refuses_and_releases() {
    let d = Daemon::builder(IRONLUN).config(CONFIG).start();
    let a = Login::new("iqn.2026-11.io.test:a")
        .try_connect(d.addr)
        .await
        .unwrap();
    let b = Login::new("iqn.2026-11.io.test:b")
        .try_connect(d.addr)
        .await
        .unwrap();
    // RFC 7143 §11.13.5: 0302 OUT OF RESOURCES.
    let r = Login::new("iqn.2026-11.io.test:c")
        .try_connect(d.addr)
        .await;
    assert_eq!(login_status(r), (3, 2));
    // Other targets are not affected by this target's limit.
    let p = Login::new(INSIDER)
        .target(PROTECTED)
        .try_connect(d.addr)
        .await
        .unwrap();
    // Logout gives the slot back at once.
    a.logout().await.unwrap();
    let c = Login::new("iqn.2026-11.io.test:c")
        .try_connect(d.addr)
        .await
        .expect("login after a logout");
    // A connection that just goes away gives it back too.
    drop(b);
    let e = login_eventually(d.addr, Login::new("iqn.2026-11.io.test:e")).await;
    for s in [c, e, p] {
        s.logout().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn total_session_limit_counts_discovery_sessions() {
    let config = CONFIG.replace("max_sessions = 64", "max_sessions = 1");
    let d = Daemon::builder(IRONLUN).config(&config).start();
    let a = Login::new(INSIDER)
        .target(PROTECTED)
        .try_connect(d.addr)
        .await
        .unwrap();
    let r = Session::connect(d.addr, LoginOptions::new(OUTSIDER, None)).await;
    assert_eq!(login_status(r), (3, 2));
    let r = Login::new(OUTSIDER).try_connect(d.addr).await;
    assert_eq!(login_status(r), (3, 2));
    a.logout().await.unwrap();
    assert_eq!(discover(d.addr, OUTSIDER).await.unwrap().len(), 1);
    assert!(d.stderr().contains("session limit reached"));
}
