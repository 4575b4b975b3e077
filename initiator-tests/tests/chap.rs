//! Tier 6: CHAP with libiscsi's tools (`iscsi://user%secret@…`, mutual CHAP with
//! `?target_user=…&target_password=…`), discovery with CHAP, and a bad-secret login storm that
//! must not hurt another session's IOPS or its logins (issue #4 acceptance 1 and 3).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use ironlun_initiator::{ChapAlgorithm, ChapCredentials, Error, LoginOptions, Session};
use ironlun_testkit::{require_tool, run, Daemon};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const ONE_WAY: &str = "iqn.2026-11.io.ironlun:oneway";
const MUTUAL: &str = "iqn.2026-11.io.ironlun:mutual";

const CONFIG: &str = r#"
[discovery]
chap = { user = "disco", secret = "discovery-secret" }

[[target]]
name = "iqn.2026-11.io.ironlun:oneway"
chap = { user = "alice", secret = "alice-secret-1" }
[[target.lun]]
id = 0
backstore = "ram"
size = "64MiB"

[[target]]
name = "iqn.2026-11.io.ironlun:mutual"
chap = { user = "bob", secret = "bob-secret-123", mutual_user = "mtarget", mutual_secret = "target-secret-9" }
[[target.lun]]
id = 0
backstore = "ram"
size = "64MiB"
"#;

fn url(d: &Daemon, creds: &str, target: &str, query: &str) -> String {
    format!("iscsi://{creds}@{}/{target}/0{query}", d.addr)
}

#[test]
fn libiscsi_one_way_and_mutual_chap() {
    require_tool("iscsi-inq");
    let d = Daemon::release().config(CONFIG).start();
    let inq = |u: &str| run(Command::new("iscsi-inq").arg(u));

    let (ok, out) = inq(&url(&d, "alice%alice-secret-1", ONE_WAY, ""));
    assert!(ok && out.contains("Vendor:IRONLUN"), "{out}");
    let (ok, out) = inq(&url(&d, "alice%wrong-secret-1", ONE_WAY, ""));
    assert!(!ok, "wrong secret logged in: {out}");
    let (ok, out) = inq(&format!("iscsi://{}/{ONE_WAY}/0", d.addr));
    assert!(!ok, "no CHAP logged in: {out}");

    let good = "?target_user=mtarget&target_password=target-secret-9";
    let (ok, out) = inq(&url(&d, "bob%bob-secret-123", MUTUAL, good));
    assert!(ok && out.contains("Vendor:IRONLUN"), "{out}");
    // libiscsi checks the target's CHAP_R against the password it was given.
    let bad = "?target_user=mtarget&target_password=not-the-secret";
    let (ok, out) = inq(&url(&d, "bob%bob-secret-123", MUTUAL, bad));
    assert!(!ok, "wrong target password accepted: {out}");
    let (ok, out) = inq(&url(&d, "bob%wrong-secret-12", MUTUAL, good));
    assert!(
        !ok,
        "wrong initiator secret with mutual CHAP logged in: {out}"
    );
    d.stop();
}

#[test]
fn libiscsi_discovery_needs_chap() {
    require_tool("iscsi-ls");
    let d = Daemon::release().config(CONFIG).start();
    let (ok, out) =
        run(Command::new("iscsi-ls").arg(format!("iscsi://disco%discovery-secret@{}", d.addr)));
    assert!(ok, "{out}");
    assert!(out.contains(ONE_WAY) && out.contains(MUTUAL), "{out}");
    let (ok, out) =
        run(Command::new("iscsi-ls").arg(format!("iscsi://disco%wrong-secret-x@{}", d.addr)));
    assert!(!ok && !out.contains(ONE_WAY), "{out}");
    let (ok, out) = run(Command::new("iscsi-ls").arg(d.portal()));
    assert!(!ok && !out.contains(ONE_WAY), "{out}");
    d.stop();
}

/// `iscsi-perf` 4 KiB random reads at QD 8 for `secs` seconds as `initiator` against the
/// one-way CHAP target at `addr`: average IOPS.
fn perf(addr: &str, initiator: &str, secs: u32) -> u64 {
    let (ok, out) = run(Command::new("iscsi-perf")
        .args([
            "-i",
            initiator,
            "-m",
            "8",
            "-b",
            "8",
            "-r",
            "-t",
            &secs.to_string(),
        ])
        .arg(format!("iscsi://alice%alice-secret-1@{addr}/{ONE_WAY}/0")));
    assert!(ok, "{out}");
    let tail = out.rsplit("iops average ").next().unwrap();
    tail.split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("{out}"))
}

/// One `secs`-second iscsi-perf run as `worker`; with `storm`, one thread meanwhile makes 500
/// bad-secret logins, one after another, spread over the run. Meanwhile `worker` logs in every
/// 100 ms. Returns (IOPS, slowest good login).
fn measured_run(d: &Daemon, worker: &'static str, secs: u32, storm: bool) -> (u64, Duration) {
    let addr: std::net::SocketAddr = d.addr;
    let opts = |name: &str, secret: &str| LoginOptions {
        chap: Some(ChapCredentials::new("alice", secret, ChapAlgorithm::Md5)),
        timeout: Duration::from_secs(10),
        ..LoginOptions::new(name, Some(ONE_WAY.to_owned()))
    };
    let done = Arc::new(AtomicBool::new(false));
    let storm = storm.then(|| {
        let opts = opts("iqn.2026-11.io.test:attacker", "wrong-secret-1");
        let done = Arc::clone(&done);
        // 500 attempts over the middle 60 % of the run.
        let spacing = Duration::from_secs(u64::from(secs)) * 3 / 5 / 500;
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            // Let the I/O reach its pace first.
            std::thread::sleep(Duration::from_secs(u64::from(secs)) / 10);
            let started = Instant::now();
            for i in 1..=500u32 {
                match rt.block_on(Session::connect(addr, opts.clone())) {
                    Err(Error::LoginFailed {
                        class: 2,
                        detail: 1,
                    }) => {}
                    other => panic!("bad secret: {:?}", other.map(|_| ())),
                }
                let due = started + spacing * i;
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
            }
            assert!(
                !done.load(Ordering::Relaxed),
                "the storm outlasted the I/O run"
            );
        })
    });
    let io = std::thread::spawn({
        let a = d.addr.to_string();
        let done = Arc::clone(&done);
        move || {
            let iops = perf(&a, worker, secs);
            done.store(true, Ordering::Relaxed);
            iops
        }
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut slowest = Duration::ZERO;
    let mut logins = 0;
    while !done.load(Ordering::Relaxed) {
        let t = Instant::now();
        let s = rt
            .block_on(Session::connect(addr, opts(worker, "alice-secret-1")))
            .expect("good login");
        slowest = slowest.max(t.elapsed());
        rt.block_on(s.logout()).unwrap();
        logins += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(logins >= 3, "only {logins} good logins during the run");
    if let Some(s) = storm {
        s.join().unwrap();
    }
    (io.join().unwrap(), slowest)
}

/// utime + stime of process `pid` in clock ticks (/proc/PID/stat fields 14 and 15).
fn cpu_ticks(pid: u32) -> i64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the parenthesised command name, which may contain spaces.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): utime is field 14, stime field 15.
    f[11].parse::<i64>().unwrap() + f[12].parse::<i64>().unwrap()
}

/// Issue #4 acceptance 3: 500 bad-secret logins from one process while another session runs
/// I/O leave its IOPS within 20 % and its logins under 1 s. Runs alternate quiet / storm three
/// times (A B A B A B) and the best of each side is compared: load from other processes on a
/// shared machine only ever lowers a run, so the best run is the least disturbed one.
///
/// The daemon runs with `busy_poll_us = 0`. With the poll on, the worker's connection keeps a
/// core busy between commands, so on this 2-core machine, where the attacker's own process
/// also runs, any third process costs the worker IOPS whatever the daemon does with the bad
/// logins (CI 2026-12-06: quiet 98.1k vs storm 76.2k IOPS with the poll, at equal daemon CPU,
/// 476–483 ticks per run). What this test measures is the daemon's cost of a login storm;
/// the poll's trade-off is measured by `scripts/bench.sh`.
#[test]
fn bad_secret_storm_leaves_other_sessions_alone() {
    require_tool("iscsi-perf");
    let config = format!("{CONFIG}\n[runtime]\nbusy_poll_us = 0\n");
    let d = Daemon::release().config(&config).start();
    let worker = "iqn.2026-11.io.test:worker";
    let (mut quiet, mut stormy) = (0u64, 0u64);
    for storm in [false, true, false, true, false, true] {
        let cpu = cpu_ticks(d.pid());
        let (iops, slowest) = measured_run(&d, worker, 5, storm);
        let cpu = cpu_ticks(d.pid()) - cpu;
        eprintln!(
            "storm={storm}: {iops} IOPS, daemon CPU {cpu} ticks, slowest good login {slowest:?}"
        );
        assert!(
            slowest < Duration::from_secs(1),
            "a good login took {slowest:?}"
        );
        if storm {
            stormy = stormy.max(iops);
        } else {
            quiet = quiet.max(iops);
        }
    }
    eprintln!("quiet {quiet} vs storm {stormy} IOPS (best of three runs each)");
    assert!(
        stormy * 10 >= quiet * 8,
        "IOPS under the storm {stormy} < 80% of {quiet}"
    );
    d.stop();
}
