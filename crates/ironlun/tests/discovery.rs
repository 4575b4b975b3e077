//! Daemon test of SendTargets (RFC 7143 §13.3, Appendix C; issue 16 finding 1): a target served
//! on several portals in several portal groups is reported, through any of its portals, with
//! every portal as `TargetAddress=ip:port,tpgt`, so that `iscsiadm -m discovery -t st -p A`
//! followed by a login finds every path. Also asked for by name (`SendTargets=<iqn>`), in a
//! normal session, and after a portal is added and removed while running.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use ironlun_cli::ctl::Client;
use ironlun_initiator::{discover, LoginOptions, Session};
use ironlun_testkit::{Daemon, PROMPT};
use std::net::SocketAddr;
use std::time::Duration;

const IRONLUN: &str = env!("CARGO_BIN_EXE_ironlun");

const TARGET: &str = "iqn.2026-11.io.ironlun:mp";
const OTHER: &str = "iqn.2026-11.io.ironlun:mp-other";
const HOST: &str = "iqn.2026-11.io.test:discovery";

/// Three portals: two in group 1 (127.0.0.1 and 127.0.0.2), one in group 2 (127.0.0.2), each
/// on a free port; two targets, both served on every portal.
fn config() -> String {
    let mut c = String::from(
        "[[portal]]\nlisten = \"127.0.0.1:0\"\ntpgt = 1\n\
         [[portal]]\nlisten = \"127.0.0.2:0\"\ntpgt = 2\n\
         [[portal]]\nlisten = \"127.0.0.2:0\"\ntpgt = 1\n\
         [[port_group]]\nid = 2\nstate = \"active_non_optimized\"\ntpgts = [2]\n",
    );
    for t in [TARGET, OTHER] {
        c.push_str(&format!(
            "[[target]]\nname = \"{t}\"\n[[target.lun]]\nid = 0\nbackstore = \"ram\"\nsize = \"1MiB\"\n"
        ));
    }
    c
}

/// `ip:port,tpgt` for each (portal, tag).
fn expected(portals: &[(SocketAddr, u16)]) -> Vec<String> {
    portals.iter().map(|(a, t)| format!("{a},{t}")).collect()
}

/// The addresses SendTargets=All reports for `target` through `via`, in a discovery session.
async fn addresses_of(via: SocketAddr, target: &str) -> Vec<String> {
    let all = tokio::time::timeout(PROMPT, discover(via, HOST))
        .await
        .expect("discovery hung")
        .expect("discovery");
    all.into_iter()
        .find(|(n, _)| n == target)
        .unwrap_or_else(|| panic!("{target} not reported through {via}"))
        .1
}

/// `SendTargets=<value>` in a session logged in to `target` (`None`: a discovery session).
async fn send_targets(via: SocketAddr, target: Option<&str>, value: &str) -> Vec<(String, String)> {
    let s = Session::connect(via, LoginOptions::new(HOST, target.map(str::to_owned)))
        .await
        .expect("login");
    let pairs = s
        .text(&[("SendTargets".to_owned(), value.to_owned())])
        .await
        .expect("text");
    s.logout().await.expect("logout");
    pairs
}

fn target_addresses(pairs: &[(String, String)]) -> Vec<String> {
    pairs
        .iter()
        .filter(|(k, _)| k == "TargetAddress")
        .map(|(_, v)| v.clone())
        .collect()
}

async fn admin(base: &str, method: &str, path: &str, body: Option<serde_json::Value>) -> u16 {
    let (base, method, path) = (base.to_owned(), method.to_owned(), path.to_owned());
    tokio::task::spawn_blocking(move || {
        let c = Client::new(&base, None).unwrap();
        let bytes = body.map(|b| serde_json::to_vec(&b).unwrap());
        c.request(&method, &path, bytes.as_deref(), Duration::from_secs(30))
            .unwrap()
            .status
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_targets_reports_every_portal_of_every_group_through_any_portal() {
    let d = Daemon::builder(IRONLUN).config(&config()).portals().start();
    assert_eq!(d.addrs.len(), 3, "{:?}", d.addrs);
    let portals = vec![(d.addrs[0], 1), (d.addrs[1], 2), (d.addrs[2], 1)];
    let want = expected(&portals);

    // SendTargets=All through each portal: both targets, each with all three portals.
    for via in &d.addrs {
        for t in [TARGET, OTHER] {
            assert_eq!(addresses_of(*via, t).await, want, "{t} through {via}");
        }
    }

    // Asked for by name in a discovery session: that target only, every portal.
    let pairs = send_targets(d.addrs[1], None, TARGET).await;
    assert_eq!(pairs[0], ("TargetName".to_owned(), TARGET.to_owned()));
    assert_eq!(
        pairs.iter().filter(|(k, _)| k == "TargetName").count(),
        1,
        "{pairs:?}"
    );
    assert_eq!(target_addresses(&pairs), want);
    // In a normal session, SendTargets=All reports the session's target, every portal.
    let pairs = send_targets(d.addrs[0], Some(OTHER), "All").await;
    assert_eq!(pairs[0], ("TargetName".to_owned(), OTHER.to_owned()));
    assert_eq!(target_addresses(&pairs), want);
    // An unknown name: nothing.
    assert!(
        send_targets(d.addrs[0], None, "iqn.2026-11.io.ironlun:nope")
            .await
            .is_empty()
    );

    // A portal added while running (group 2) is reported through the others at once; removed,
    // it is no longer reported.
    let status = admin(
        &d.admin,
        "POST",
        "/v1/portals",
        Some(serde_json::json!({ "listen": "127.0.0.3:0", "tpgt": 2 })),
    )
    .await;
    assert_eq!(status, 200);
    let via = d.addrs[0];
    let now = addresses_of(via, TARGET).await;
    assert_eq!(now.len(), 4, "{now:?}");
    assert_eq!(now[..3], want[..]);
    assert!(
        now[3].starts_with("127.0.0.3:") && now[3].ends_with(",2"),
        "{now:?}"
    );
    let added = now[3].trim_end_matches(",2").to_owned();
    assert_eq!(
        addresses_of(added.parse().unwrap(), OTHER).await,
        now,
        "through the new portal"
    );
    let status = admin(
        &d.admin,
        "DELETE",
        &format!("/v1/portals/{}", "127.0.0.3:0"),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(addresses_of(via, TARGET).await, want);
}
