//! Tier 4: TARGET WARM RESET and TARGET COLD RESET against the daemon (issue 15, findings 8
//! and 9). Both act on the whole target node the session logged in to: every LU, and for a
//! cold reset every session of every initiator to that target, dropped after the response
//! (RFC 7143 §11.5.1); the daemon's other targets are untouched. Who may send them is the
//! target's `allow_target_reset` (default "chap": only sessions that passed CHAP); a refused
//! request is answered "Function authorization failed" (6, RFC 7143 §11.6.1) and changes
//! nothing.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use ironlun_initiator::{
    ChapAlgorithm, ChapCredentials, SenseKey, Session, TmfFunction, TmfResponse,
};
use ironlun_testkit::{Daemon, Login, PROMPT};
use std::net::SocketAddr;
use std::process::Command;
use std::time::Instant;

const IRONLUN: &str = env!("CARGO_BIN_EXE_ironlun");

/// The target that gets reset; CHAP is turned on for it while sessions run.
const A: &str = "iqn.2026-11.io.ironlun:reset-a";
/// Another target of the same daemon, `allow_target_reset = "all"`.
const B: &str = "iqn.2026-11.io.ironlun:reset-b";
const HOST_X: &str = "iqn.2026-11.io.test:host-x";
const HOST_Y: &str = "iqn.2026-11.io.test:host-y";
/// LUN 1 in the 8-byte LUN field (SAM-5 §4.7, peripheral addressing).
const LUN1: u64 = 1 << 48;
const CHAP_LINE: &str = "chap = { user = \"alice\", secret = \"alice-secret-1\" }\n";

/// Target A (with `a_extra` lines in its table) and target B, one RAM LUN each.
fn config(a_extra: &str) -> String {
    format!(
        "[[target]]\nname = \"{A}\"\n{a_extra}\n[[target.lun]]\nid = 0\nbackstore = \"ram\"\nsize = \"1MiB\"\n\
         [[target.lun]]\nid = 1\nbackstore = \"ram\"\nsize = \"1MiB\"\n\
         [[target.initiator]]\nname = \"{HOST_X}\"\nluns = [0]\n\n\
         [[target]]\nname = \"{B}\"\nallow_target_reset = \"all\"\n\
         [[target.lun]]\nid = 0\nbackstore = \"ram\"\nsize = \"1MiB\"\n"
    )
}

/// Log in to `target` as `initiator` with ISID qualifier `q` (CHAP when `chap`) and clear
/// the power-on unit attention.
async fn login(addr: SocketAddr, initiator: &str, target: &str, q: u8, chap: bool) -> Session {
    let l = Login::new(initiator)
        .target(target)
        .isid_qualifier(q)
        .timeout(PROMPT);
    let l = if chap {
        l.chap(ChapCredentials::new(
            "alice",
            "alice-secret-1",
            ChapAlgorithm::Sha256,
        ))
    } else {
        l
    };
    l.connect(addr).await
}

/// Clear the unit attentions LUN `lun` holds for `s` (power on, a new nexus).
async fn settle(s: &Session, lun: u64) {
    for _ in 0..3 {
        if s.test_unit_ready(lun).await.expect("TUR").status == 0 {
            return;
        }
    }
    panic!("TEST UNIT READY never GOOD");
}

/// TEST UNIT READY on LUN `lun` is GOOD: no unit attention, the session lives.
async fn ready(s: &Session, lun: u64, who: &str) {
    let r = s.test_unit_ready(lun).await.expect(who);
    assert_eq!(r.status, 0, "{who}: sense {:?}", r.sense_key());
}

/// The next command on LUN `lun` reports unit attention 29h/`ascq`, the one after is GOOD.
async fn reset_reported(s: &Session, lun: u64, ascq: u8, who: &str) {
    let r = s.test_unit_ready(lun).await.expect(who);
    assert_eq!(r.status, 2, "{who}: CHECK CONDITION expected");
    assert_eq!(
        r.sense_key(),
        Some(SenseKey {
            key: 6,
            asc: 0x29,
            ascq
        }),
        "{who}"
    );
    ready(s, lun, who).await;
}

/// The target closed `s`'s connection: the session notices within [`PROMPT`].
async fn dropped(s: &Session, who: &str) {
    let deadline = Instant::now() + PROMPT;
    while !s.is_closed() {
        assert!(Instant::now() < deadline, "{who}: still open");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        s.test_unit_ready(0).await.is_err(),
        "{who}: a closed session"
    );
}

/// `ironlun ctl reload`: the daemon re-reads its config file.
async fn reload(d: &Daemon) {
    let admin = d.admin.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_ironlun"))
            .args(["ctl", "--admin", &admin, "reload"])
            .env_remove("IRONLUN_ADMIN")
            .env_remove("IRONLUN_ADMIN_TOKEN_FILE")
            .output()
            .expect("run ironlun ctl")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_reset_needs_chap_and_drops_every_session_of_the_target_only() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::builder(IRONLUN)
        .config(&config(""))
        .start_in(dir.path());
    // Two sessions to A without CHAP (A has none yet), then CHAP turned on for A: a third
    // session of host Y (another ISID) logs in with it; the first two keep running.
    let x = login(d.addr, HOST_X, A, 1, false).await;
    let y = login(d.addr, HOST_Y, A, 2, false).await;
    std::fs::write(dir.path().join("ironlun.toml"), config(CHAP_LINE)).unwrap();
    reload(&d).await;
    let y_chap = login(d.addr, HOST_Y, A, 3, true).await;
    let b = login(d.addr, HOST_X, B, 4, false).await;
    let b2 = login(d.addr, HOST_Y, B, 5, false).await;

    // A session without CHAP: refused (default "chap"), nothing reset, nothing dropped.
    for f in [TmfFunction::TargetColdReset, TmfFunction::TargetWarmReset] {
        let r = x.task_mgmt(f, 0, 0).await.unwrap();
        assert_eq!(r, TmfResponse::AuthorizationFailed, "{f:?} without CHAP");
    }
    settle(&y, LUN1).await;
    let r = y
        .task_mgmt(TmfFunction::TargetColdReset, 0, 0)
        .await
        .unwrap();
    assert_eq!(r, TmfResponse::AuthorizationFailed);
    for (s, who) in [
        (&x, "x"),
        (&y, "y"),
        (&y_chap, "y-chap"),
        (&b, "b"),
        (&b2, "b2"),
    ] {
        ready(s, 0, who).await;
    }
    ready(&y, LUN1, "y LUN 1").await;

    // The CHAP session: complete, then every session of A is dropped (its own too); B's
    // sessions live on, without a unit attention.
    let r = y_chap
        .task_mgmt(TmfFunction::TargetColdReset, 0, 0)
        .await
        .unwrap();
    assert_eq!(r, TmfResponse::FunctionComplete);
    for (s, who) in [(&x, "x"), (&y, "y"), (&y_chap, "y-chap")] {
        dropped(s, who).await;
    }
    ready(&b, 0, "b after A's cold reset").await;
    ready(&b2, 0, "b2 after A's cold reset").await;
    // A serves new logins again (with CHAP, now required).
    let again = login(d.addr, HOST_X, A, 6, true).await;
    ready(&again, 0, "x again").await;

    // B allows every session ("all"): one without CHAP resets it and both of B's go.
    let r = b
        .task_mgmt(TmfFunction::TargetColdReset, 0, 0)
        .await
        .unwrap();
    assert_eq!(r, TmfResponse::FunctionComplete);
    dropped(&b, "b").await;
    dropped(&b2, "b2").await;
    ready(&again, 0, "A after B's cold reset").await;
    d.assert_healthy();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_reset_resets_every_lu_of_the_target_and_keeps_the_sessions() {
    let mut d = Daemon::builder(IRONLUN).config(&config(
        "allow_target_reset = \"chap\"\nchap = { user = \"alice\", secret = \"alice-secret-1\" }\n",
    )).start();
    let y = login(d.addr, HOST_Y, A, 1, true).await;
    let y2 = login(d.addr, HOST_Y, A, 2, true).await;
    // Host X sees only LUN 0 of A (LUN masking).
    let x = login(d.addr, HOST_X, A, 3, true).await;
    let b = login(d.addr, HOST_X, B, 4, false).await;
    settle(&y, LUN1).await;
    settle(&y2, LUN1).await;

    let r = x
        .task_mgmt(TmfFunction::TargetWarmReset, 0, 0)
        .await
        .unwrap();
    assert_eq!(r, TmfResponse::FunctionComplete);
    // Every LU of A, also LUN 1 that X does not see, reports 29h/02h (SCSI BUS RESET
    // OCCURRED) to every nexus, the requester's included; the sessions stay.
    reset_reported(&x, 0, 0x02, "x LUN 0").await;
    reset_reported(&y, 0, 0x02, "y LUN 0").await;
    reset_reported(&y, LUN1, 0x02, "y LUN 1").await;
    reset_reported(&y2, LUN1, 0x02, "y2 LUN 1").await;
    reset_reported(&y2, 0, 0x02, "y2 LUN 0").await;
    assert!(!x.is_closed() && !y.is_closed() && !y2.is_closed());
    // The other target saw nothing.
    ready(&b, 0, "b").await;
    drop((x, y, y2, b));
    d.assert_healthy();
}
