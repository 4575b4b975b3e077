//! Issue 6 acceptance 3: 100 handovers back and forth (host-a → host-b → host-a …) by
//! `ironlun migrate --json` against the real daemon, under load: the current owner writes at
//! QD16 all the time, also while its LU is handed away (semantics.md §3). Afterwards every block
//! of the region holds the last write acknowledged GOOD to it (nothing lost), and no write of a
//! former owner started after `ironlun migrate` returned was acknowledged (nothing stray). The
//! storage switch and blackout times of the runs are printed (median, p90, max).
//!
//! The hooks are `true`: the blackout is the commit plus the hooks' process overhead.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use ironlun_testkit::handover_load::{stats, HandoverLoad};
use ironlun_testkit::{session, Daemon, PROMPT, TARGET};
use serde_json::{json, Value};
use std::sync::Arc;

const IRONLUN: &str = env!("CARGO_BIN_EXE_ironlun");

const HOSTS: [&str; 2] = ["iqn.2026-01.test:host-a", "iqn.2026-01.test:host-b"];
/// Handovers in the run.
const HANDOVERS: usize = 100;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_handovers_back_and_forth_under_qd16_load_lose_nothing() {
    let d = Daemon::builder(IRONLUN).start();
    let base = d.admin_url().to_owned();
    let sessions = [
        Arc::new(session(d.addr, HOSTS[0]).await),
        Arc::new(session(d.addr, HOSTS[1]).await),
    ];
    let client = ironlun_cli::ctl::Client::new(&base, None).unwrap();
    let lu = format!("/v1/luns/{TARGET}/0");
    let r = client
        .request(
            "POST",
            &format!("{lu}/owner"),
            Some(json!({"host": HOSTS[0], "epoch": 1}).to_string().as_bytes()),
            PROMPT,
        )
        .unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));

    let mut out = HandoverLoad {
        ironlun: IRONLUN.to_string(),
        lun: format!("{TARGET}/0"),
        hosts: HOSTS.map(str::to_string),
        sessions: sessions.clone(),
        admins: vec![base.clone()],
        resume: Box::new(|_, _| "true".to_string()),
        not_accessible_ok: false,
        handovers: HANDOVERS,
        refuse_every: 0,
    }
    .run()
    .await;

    // The final state is what the API says.
    let o: Value =
        serde_json::from_slice(&client.get(&format!("{lu}/ownership")).unwrap().body).unwrap();
    assert_eq!(
        (o["owner"].as_str(), o["epoch"].as_u64()),
        (
            Some(HOSTS[out.owner]),
            Some(u64::try_from(HANDOVERS).unwrap() + 1)
        ),
        "{o}"
    );
    assert!(o["handover"].is_null(), "{o}");
    let (s50, s90, smax) = stats(&mut out.switch_ms);
    let (b50, b90, bmax) = stats(&mut out.blackout_ms);
    println!(
        "storage switch median {s50:.3} ms, p90 {s90:.3} ms, max {smax:.3} ms; blackout median \
         {b50:.3} ms, p90 {b90:.3} ms, max {bmax:.3} ms (hooks `true`); {}",
        out.summary
    );
    for s in &sessions {
        s.logout().await.unwrap();
    }
}
