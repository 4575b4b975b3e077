//! Live reconfiguration against the real daemon: `ironlun ctl lun add|remove|resize`, SIGHUP
//! with an edited file while another session runs I/O, a broken file, bad ctl input.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use bytes::Bytes;
use ironlun::config::Config;
use ironlun_initiator::{LoginOptions, Session};
use ironlun_testkit::{BackgroundIo, Binary, Daemon, Login, PROMPT, TARGET};
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const IRONLUN: &str = env!("CARGO_BIN_EXE_ironlun");

const X: &str = "iqn.2026-11.io.ironlun:x";
/// LUN 1 as the 8-byte LUN field (SAM-5 §4.7, peripheral addressing).
const LUN1: u64 = 1 << 48;

fn config() -> String {
    format!(
        "# operator's comment, kept across saves\n[[target]]\nname = \"{TARGET}\"\n\n[[target.lun]]\nid = 0\nbackstore = \"ram\"\nsize = \"16MiB\"\n\n[[target]]\nname = \"{X}\"\n\n[[target.lun]]\nid = 0\nbackstore = \"ram\"\nsize = \"1MiB\"\n"
    )
}

fn ctl(admin: &str, args: &[&str]) -> Output {
    Binary::new(IRONLUN).ctl_at(admin, args)
}

async fn ctl_async(admin: &str, args: &[&str]) -> Output {
    let admin = admin.to_owned();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        ctl(&admin, &a)
    })
    .await
    .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// REPORT LUNS (SPC-4 §6.33): the LUN numbers (peripheral addressing).
async fn report_luns(s: &Session) -> (u8, Vec<u64>, Bytes) {
    let cdb = [0xa0, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0];
    let r = s
        .command(0, &cdb, Bytes::new(), 1024)
        .await
        .expect("REPORT LUNS");
    let mut luns = Vec::new();
    if r.status == 0 {
        for e in r.data.get(8..).unwrap_or_default().chunks_exact(8) {
            luns.push(u64::from(u16::from_be_bytes([e[0], e[1]]) & 0x3fff));
        }
    }
    (r.status, luns, r.sense)
}

/// Sense key, ASC, ASCQ of fixed or descriptor sense data.
fn sense(s: &[u8]) -> (u8, u8, u8) {
    match s.first().map(|b| b & 0x7f) {
        Some(0x72 | 0x73) => (s[1] & 0x0f, s[2], s[3]),
        _ => (s[2] & 0x0f, s[12], s[13]),
    }
}

async fn session_to(addr: std::net::SocketAddr, target: &str, initiator: &str) -> Session {
    Login::new(initiator).target(target).connect(addr).await
}

fn luns_in_file(path: &Path, target: &str) -> Vec<u64> {
    let c = Config::load(path, None).unwrap_or_else(|e| panic!("{e}"));
    let t = c.targets.iter().find(|t| t.name == target).expect("target");
    t.luns.iter().map(|l| l.id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_lun_add_and_remove_live_and_saved() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::builder(IRONLUN)
        .config(&config())
        .start_in(dir.path());
    let file = dir.path().join("ironlun.toml");
    let s = session_to(d.addr, X, "iqn.2026-11.io.ironlun:rc-a").await;
    assert_eq!(report_luns(&s).await.1, vec![0]);

    let out = ctl_async(
        &d.admin,
        &[
            "lun",
            "add",
            &format!("{X}/1"),
            "--backstore",
            "ram",
            "--size",
            "2M",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let o = text(&out.stdout);
    assert!(
        o.contains(&format!("applied: target {X} LUN 1: added")),
        "{o}"
    );
    assert!(o.contains("saved to"), "{o}");
    // Saved durably, comments kept, and it parses to the new LUN set.
    let saved = std::fs::read_to_string(&file).unwrap();
    assert!(saved.starts_with("# operator's comment"), "{saved}");
    assert_eq!(luns_in_file(&file, X), vec![0, 1]);
    assert_eq!(luns_in_file(&file, TARGET), vec![0]);
    assert!(!dir.path().join("ironlun.toml.tmp").exists());

    // The running session sees the new LUN: REPORTED LUNS DATA HAS CHANGED on LUN 0 first.
    let r = s.test_unit_ready(0).await.unwrap();
    assert_eq!((r.status, sense(&r.sense)), (2, (6, 0x3f, 0x0e)));
    assert_eq!(s.test_unit_ready(0).await.unwrap().status, 0);
    assert_eq!(report_luns(&s).await.1, vec![0, 1]);
    // A new LU greets the nexus with its power-on unit attention first.
    for _ in 0..3 {
        if s.test_unit_ready(LUN1).await.unwrap().status == 0 {
            break;
        }
    }
    let cap = s
        .read_capacity16(LUN1)
        .await
        .expect("READ CAPACITY on the new LUN");
    assert_eq!(cap.blocks * u64::from(cap.block_size), 2 << 20);

    // `ctl lun list` shows it.
    let out = ctl_async(&d.admin, &["lun", "list"]).await;
    let o = text(&out.stdout);
    assert!(o.starts_with("TARGET"), "{o}");
    assert!(
        o.lines()
            .any(|l| l.starts_with(X) && l.contains(" 1 ") && l.contains("2 MiB")),
        "{o}"
    );

    // Removed: gone from the file and the session; commands to it: LOGICAL UNIT NOT SUPPORTED.
    let out = ctl_async(&d.admin, &["lun", "remove", &format!("{X}/1")]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(luns_in_file(&file, X), vec![0]);
    let r = s.test_unit_ready(LUN1).await.unwrap();
    assert_eq!(r.status, 2);
    assert_eq!(sense(&r.sense), (5, 0x25, 0x00));
    // REPORT LUNS clears REPORTED LUNS DATA HAS CHANGED (SPC-4 §6.33): LUN 0 is GOOD at once.
    assert_eq!(report_luns(&s).await.1, vec![0]);
    assert_eq!(s.test_unit_ready(0).await.unwrap().status, 0);

    // Bad input: exit 1 with a clear message, the file unchanged.
    let before = std::fs::read_to_string(&file).unwrap();
    let out = ctl_async(
        &d.admin,
        &[
            "lun",
            "add",
            &format!("{X}/2"),
            "--backstore",
            "ram",
            "--size",
            "12Q",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("size \"12Q\""),
        "{}",
        text(&out.stderr)
    );
    let out = ctl_async(
        &d.admin,
        &[
            "lun",
            "add",
            "iqn.2026-11.io.ironlun:none/2",
            "--backstore",
            "ram",
            "--size",
            "1M",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("no target iqn.2026-11.io.ironlun:none"),
        "{}",
        text(&out.stderr)
    );
    let out = ctl_async(
        &d.admin,
        &[
            "lun",
            "add",
            &format!("{X}/0"),
            "--backstore",
            "ram",
            "--size",
            "1M",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("duplicate LUN 0"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), before);
    s.logout().await.unwrap();
}

/// Wait until `ctl lun list --json` satisfies `f`.
async fn until_luns(admin: &str, f: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + PROMPT;
    loop {
        let out = ctl_async(admin, &["lun", "list", "--json"]).await;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        if f(&v) {
            return;
        }
        assert!(Instant::now() < deadline, "LUNs never changed: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn has(v: &serde_json::Value, target: &str, lun: u64) -> bool {
    v["luns"]
        .as_array()
        .unwrap()
        .iter()
        .any(|l| l["target"] == target && l["lun"] == lun)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_the_file_while_other_sessions_run() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::builder(IRONLUN)
        .config(&config())
        .start_in(dir.path());
    let file = dir.path().join("ironlun.toml");
    let io = BackgroundIo::start(d.addr, "iqn.2026-11.io.ironlun:rc-io", 0).await;
    io.progress(3).await;

    // Add LUN 1 to X and restrict X's initiators (both applied live), while the I/O session
    // to the other target runs on.
    let edited = config().replace(
        &format!("name = \"{X}\"\n"),
        &format!("name = \"{X}\"\nallowed_initiators = [\"iqn.2026-11.io.ironlun:*\"]\n"),
    ) + "\n[[target.lun]]\nid = 1\nbackstore = \"ram\"\nsize = \"1MiB\"\n";
    std::fs::write(&file, &edited).unwrap();
    nix_kill(d.pid(), "HUP");
    until_luns(&d.admin, |v| has(v, X, 1)).await;
    io.progress(3).await;

    // A broken file: logged with line and key, nothing changes, I/O goes on.
    std::fs::write(
        &file,
        edited.replace("size = \"16MiB\"\n", "size = \"16MiB\"\nbogus = 1\n"),
    )
    .unwrap();
    nix_kill(d.pid(), "HUP");
    let deadline = Instant::now() + PROMPT;
    while !d.stderr().contains("config not reloaded") {
        assert!(
            Instant::now() < deadline,
            "no reload error logged: {}",
            d.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let err = d.stderr();
    assert!(
        err.contains("ironlun.toml:") && err.contains("bogus"),
        "{err}"
    );
    // `ctl reload` reports the same error and exits 1.
    let out = ctl_async(&d.admin, &["reload"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("bogus"), "{}", text(&out.stderr));
    until_luns(&d.admin, |v| has(v, X, 1) && has(v, TARGET, 0)).await;

    // Fixed again, LUN 1 removed and the ACL lifted: applied.
    std::fs::write(&file, config()).unwrap();
    let out = ctl_async(&d.admin, &["reload"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let o = text(&out.stdout);
    assert!(
        o.contains(&format!("applied: target {X} LUN 1: removed")),
        "{o}"
    );
    io.progress(3).await;
    let rounds = io.finish().await;
    assert!(rounds >= 9);
    d.assert_healthy();
}

fn nix_kill(pid: u32, sig: &str) {
    let st = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resize_grows_and_offline_online() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::builder(IRONLUN)
        .config(&config())
        .start_in(dir.path());
    let file = dir.path().join("ironlun.toml");
    let s = session_to(d.addr, X, "iqn.2026-11.io.ironlun:rc-r").await;
    assert_eq!(s.read_capacity16(0).await.unwrap().blocks, 2048);

    let out = ctl_async(&d.admin, &["lun", "resize", &format!("{X}/0"), "4M"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("resized from 1048576 to 4194304 bytes"));
    // The running session: CAPACITY DATA HAS CHANGED, then the new size.
    let r = s.test_unit_ready(0).await.unwrap();
    assert_eq!(r.status, 2);
    assert_eq!(sense(&r.sense), (6, 0x2a, 0x09));
    assert_eq!(s.read_capacity16(0).await.unwrap().blocks, 8192);
    let c = Config::load(&file, None).unwrap();
    assert_eq!(c.targets[1].luns[0].size, Some(4 << 20));

    // Shrinking and bad sizes are refused (exit 1), nothing changes.
    let before = std::fs::read_to_string(&file).unwrap();
    let out = ctl_async(&d.admin, &["lun", "resize", &format!("{X}/0"), "2M"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("cannot shrink"),
        "{}",
        text(&out.stderr)
    );
    let out = ctl_async(&d.admin, &["lun", "resize", &format!("{X}/0"), "lots"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("size \"lots\""),
        "{}",
        text(&out.stderr)
    );
    let out = ctl_async(&d.admin, &["lun", "resize", &format!("{X}/7"), "8M"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("no LUN 7"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), before);
    assert_eq!(s.read_capacity16(0).await.unwrap().blocks, 8192);

    // Offline: NOT READY, LOGICAL UNIT NOT READY, OFFLINE; INQUIRY still answers.
    let out = ctl_async(&d.admin, &["lun", "offline", &format!("{X}/0")]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let r = s.test_unit_ready(0).await.unwrap();
    assert_eq!((r.status, sense(&r.sense)), (2, (2, 0x04, 0x12)));
    assert_eq!(s.inquiry(0, 96).await.unwrap().status, 0);
    let out = ctl_async(&d.admin, &["lun", "list"]).await;
    assert!(
        text(&out.stdout).contains("offline"),
        "{}",
        text(&out.stdout)
    );
    // Saved: `offline = true` in the file, and a daemon started from it (a restart) serves the
    // LUN offline from the start (after the power-on unit attention).
    let saved = std::fs::read_to_string(&file).unwrap();
    assert!(Config::load(&file, None).unwrap().targets[1].luns[0].offline);
    assert!(saved.contains("# operator's comment"), "{saved}");
    let dir2 = tempfile::tempdir().unwrap();
    let d2 = Daemon::builder(IRONLUN)
        .config(&saved)
        .start_in(dir2.path());
    let s2 = Session::connect(
        d2.addr,
        LoginOptions::new("iqn.2026-11.io.ironlun:rc-r2", Some(X.to_owned())),
    )
    .await
    .expect("login");
    let r = s2.test_unit_ready(0).await.unwrap();
    assert_eq!(
        (r.status, sense(&r.sense).0),
        (2, 6),
        "power-on unit attention first"
    );
    let r = s2.test_unit_ready(0).await.unwrap();
    assert_eq!((r.status, sense(&r.sense)), (2, (2, 0x04, 0x12)));
    s2.logout().await.unwrap();
    drop(d2);
    // Online: NOT READY TO READY CHANGE once, then GOOD.
    let out = ctl_async(&d.admin, &["lun", "online", &format!("{X}/0")]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let r = s.test_unit_ready(0).await.unwrap();
    assert_eq!((r.status, sense(&r.sense)), (2, (6, 0x28, 0x00)));
    assert_eq!(s.test_unit_ready(0).await.unwrap().status, 0);
    assert!(!Config::load(&file, None).unwrap().targets[1].luns[0].offline);
    assert!(!std::fs::read_to_string(&file).unwrap().contains("offline"));
    s.logout().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_removes_a_portal_and_an_acl_entry() {
    let dir = tempfile::tempdir().unwrap();
    let portals =
        "[[portal]]\nlisten = \"127.0.0.1:0\"\n\n[[portal]]\nlisten = \"127.0.0.1:0\"\ntpgt = 2\n\n";
    let acl = format!("name = \"{X}\"\nallowed_initiators = [\"iqn.2026-11.io.ironlun:rc-*\"]\n");
    let start = format!(
        "{portals}{}",
        config().replace(&format!("name = \"{X}\"\n"), &acl)
    );
    let mut d = Daemon::builder(IRONLUN)
        .config(&start)
        .portals()
        .start_in(dir.path());
    assert_eq!(d.addrs.len(), 2, "{:?}", d.addrs);
    let (keep, gone) = (d.addrs[0], d.addrs[1]);
    let file = dir.path().join("ironlun.toml");
    let io = BackgroundIo::start(keep, "iqn.2026-11.io.ironlun:rc-io", 0).await;
    let sx = session_to(keep, X, "iqn.2026-11.io.ironlun:rc-x").await;
    io.progress(3).await;

    // Portal group 2 removed, rc-x no longer allowed to X, LUN 1 added to X.
    let edited = config().replace(
        &format!("name = \"{X}\"\n"),
        &format!("name = \"{X}\"\nallowed_initiators = [\"iqn.2026-11.io.ironlun:rc-io\"]\n"),
    ) + "\n[[target.lun]]\nid = 1\nbackstore = \"ram\"\nsize = \"1MiB\"\n";
    std::fs::write(
        &file,
        format!("[[portal]]\nlisten = \"127.0.0.1:0\"\n\n{edited}"),
    )
    .unwrap();
    nix_kill(d.pid(), "HUP");
    until_luns(&d.admin, |v| has(v, X, 1)).await;

    // The removed portal stops accepting.
    let deadline = Instant::now() + PROMPT;
    while tokio::net::TcpStream::connect(gone).await.is_ok() {
        assert!(Instant::now() < deadline, "portal {gone} still accepts");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // rc-x's session to X was closed, and it cannot log in again.
    let deadline = Instant::now() + PROMPT;
    while let Ok(Ok(_)) = tokio::time::timeout(PROMPT, sx.test_unit_ready(0)).await {
        assert!(
            Instant::now() < deadline,
            "session of a removed initiator still served"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let again = Session::connect(
        keep,
        LoginOptions::new("iqn.2026-11.io.ironlun:rc-x", Some(X.to_owned())),
    )
    .await;
    assert!(again.is_err(), "a removed initiator logged in again");
    // The unrelated session ran throughout without an error.
    io.progress(3).await;
    let rounds = io.finish().await;
    assert!(rounds >= 6);
    let err = d.stderr();
    assert!(err.contains("portal removed"), "{err}");
    d.assert_healthy();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_portal_and_acl() {
    let dir = tempfile::tempdir().unwrap();
    let start = format!("[[portal]]\nlisten = \"127.0.0.1:0\"\n\n{}", config());
    let d = Daemon::builder(IRONLUN)
        .config(&start)
        .portals()
        .start_in(dir.path());
    let file = dir.path().join("ironlun.toml");

    // A portal added on 127.0.0.3 accepts logins at once; removed, it stops accepting.
    let out = ctl_async(&d.admin, &["portal", "add", "127.0.0.3:0"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("applied: portal 127.0.0.3:0 tpgt 1: added"));
    let out = ctl_async(&d.admin, &["portal", "list", "--json"]).await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let bound: std::net::SocketAddr = v["portals"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["listen"] == "127.0.0.3:0")
        .expect("new portal listed")["bound"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let s3 = session_to(bound, X, "iqn.2026-11.io.ironlun:rc-p").await;
    assert_eq!(Config::load(&file, None).unwrap().portals.len(), 2);
    let out = ctl_async(&d.admin, &["portal", "remove", "127.0.0.3:0"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(tokio::net::TcpStream::connect(bound).await.is_err());
    // Its connection keeps running.
    assert_eq!(s3.test_unit_ready(0).await.unwrap().status, 0);
    assert_eq!(Config::load(&file, None).unwrap().portals.len(), 1);
    s3.logout().await.unwrap();

    // ACL: X admits everyone; adding rc-b closes rc-a's session; removing rc-b admits nobody.
    let out = ctl_async(&d.admin, &["acl", "list", X]).await;
    assert!(
        text(&out.stdout).contains("no ACL"),
        "{}",
        text(&out.stdout)
    );
    let sa = session_to(d.addr, X, "iqn.2026-11.io.ironlun:rc-a").await;
    let out = ctl_async(&d.admin, &["acl", "add", X, "iqn.2026-11.io.ironlun:rc-b"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let o = text(&out.stdout);
    assert!(
        o.contains("session(s) of initiators no longer allowed closed"),
        "{o}"
    );
    let deadline = Instant::now() + PROMPT;
    while let Ok(Ok(_)) = tokio::time::timeout(PROMPT, sa.test_unit_ready(0)).await {
        assert!(Instant::now() < deadline, "rc-a still served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let login =
        |name: &'static str| Session::connect(d.addr, LoginOptions::new(name, Some(X.to_owned())));
    assert!(login("iqn.2026-11.io.ironlun:rc-a").await.is_err());
    login("iqn.2026-11.io.ironlun:rc-b")
        .await
        .expect("rc-b allowed")
        .logout()
        .await
        .unwrap();
    let out = ctl_async(&d.admin, &["acl", "list", X]).await;
    assert!(text(&out.stdout).contains("iqn.2026-11.io.ironlun:rc-b"));
    let out = ctl_async(
        &d.admin,
        &["acl", "remove", X, "iqn.2026-11.io.ironlun:rc-b"],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(login("iqn.2026-11.io.ironlun:rc-b").await.is_err());
    let c = Config::load(&file, None).unwrap();
    assert!(!c.targets[1].acl.allows("iqn.2026-11.io.ironlun:rc-b"));
    let out = ctl_async(
        &d.admin,
        &["acl", "remove", "iqn.2026-11.io.ironlun:none", "x"],
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("no target"),
        "{}",
        text(&out.stderr)
    );
    // The sessions of another target are untouched.
    let out = ctl_async(&d.admin, &["target", "list"]).await;
    assert!(
        text(&out.stdout).starts_with("TARGET"),
        "{}",
        text(&out.stdout)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_target_add_and_remove() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::builder(IRONLUN)
        .config(&config())
        .start_in(dir.path());
    let file = dir.path().join("ironlun.toml");
    let io = BackgroundIo::start(d.addr, "iqn.2026-11.io.ironlun:rc-io", 0).await;
    const NEW: &str = "iqn.2026-11.io.ironlun:new";

    let out = ctl_async(&d.admin, &["target", "add", NEW]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains(&format!("applied: target {NEW}: added")));
    let out = ctl_async(
        &d.admin,
        &[
            "lun",
            "add",
            &format!("{NEW}/0"),
            "--backstore",
            "ram",
            "--size",
            "1M",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let sn = session_to(d.addr, NEW, "iqn.2026-11.io.ironlun:rc-n").await;
    assert_eq!(report_luns(&sn).await.1, vec![0]);
    let out = ctl_async(&d.admin, &["target", "add", NEW]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("exists"),
        "{}",
        text(&out.stderr)
    );

    // Removing X closes its sessions and refuses new logins; other targets keep running.
    let sx = session_to(d.addr, X, "iqn.2026-11.io.ironlun:rc-x").await;
    let out = ctl_async(&d.admin, &["target", "remove", X]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let o = text(&out.stdout);
    assert!(o.contains(&format!("applied: target {X}: removed")), "{o}");
    let deadline = Instant::now() + PROMPT;
    while let Ok(Ok(_)) = tokio::time::timeout(PROMPT, sx.test_unit_ready(0)).await {
        assert!(
            Instant::now() < deadline,
            "session to a removed target still served"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(Session::connect(
        d.addr,
        LoginOptions::new("iqn.2026-11.io.ironlun:rc-x", Some(X.to_owned()))
    )
    .await
    .is_err());
    let c = Config::load(&file, None).unwrap();
    let names: Vec<&str> = c.targets.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, vec![TARGET, NEW]);
    assert_eq!(sn.test_unit_ready(0).await.unwrap().status, 0);
    sn.logout().await.unwrap();
    io.progress(3).await;
    io.finish().await;
}
