//! Failover of an LU away from a failed host through `ironlun ctl failover` against the real
//! daemon (issue 19 acceptance 1): refused while the host still has a session unless forced;
//! forced, the answer comes after the host's command in flight has ended (a long WRITE SAME,
//! aborted), nothing of the host's lands afterwards (read back twice), its acknowledged writes
//! are on the LU, it gets 2Ah/05h then RESERVATION CONFLICT and the survivor writes; a retry
//! with the same epoch changes nothing; `--all-of` moves every LU of a host; release hands
//! the LU back; events and metrics count it. (The same rule with a gated backstore, where the
//! write in flight is held by the test: `target::tests::failover_waits_for_the_failed_hosts_write_in_flight`.)

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use bytes::Bytes;
use ironlun_initiator::Session;
use ironlun_testkit::{session, tagged, Binary, Daemon, BLOCK_SIZE, PROMPT, TARGET};
use serde_json::Value;
use std::process::Output;
use std::sync::Arc;
use std::time::{Duration, Instant};

const IRONLUN: &str = env!("CARGO_BIN_EXE_ironlun");

const HOST_A: &str = "iqn.2026-01.test:host-a";
const HOST_B: &str = "iqn.2026-01.test:host-b";
const GOOD: u8 = 0x00;
const CHECK_CONDITION: u8 = 0x02;
const RESERVATION_CONFLICT: u8 = 0x18;
const TASK_ABORTED: u8 = 0x40;

/// WRITE SAME (16) of this many blocks from LBA 0 (512 MiB): on a file LUN it runs as 1 MiB
/// writes one after another, long enough to be in flight when the failover comes.
const WS_BLOCKS: u32 = 0x10_0000;
/// Blocks per MiB: the read-back samples one block per MiB of the WRITE SAME's range.
const MIB_BLOCKS: u64 = (1 << 20) / BLOCK_SIZE as u64;
/// host-a's acknowledged writes go past the WRITE SAME's range.
const ACKED_LBA: u64 = WS_BLOCKS as u64 + 1024;

fn ctl(admin: &str, args: &[&str]) -> Output {
    Binary::new(IRONLUN).ctl_at(admin, args)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `ironlun ctl ... --json`, expected to succeed.
fn ctl_json(admin: &str, args: &[&str]) -> Value {
    let o = ctl(admin, &[args, &["--json"]].concat());
    assert!(o.status.success(), "ctl {args:?}: {}", text(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn lu() -> String {
    format!("{TARGET}/0")
}

fn ownership(admin: &str) -> Value {
    ctl_json(admin, &["ownership", &lu()])
}

/// The first byte of one block per MiB of the WRITE SAME's range, as host `s` reads it.
async fn sample(s: &Session) -> Vec<u8> {
    let mut v = Vec::new();
    for i in 0..u64::from(WS_BLOCKS) / MIB_BLOCKS {
        let r = s.read16(0, i * MIB_BLOCKS, 1, BLOCK_SIZE).await.unwrap();
        assert_eq!(r.status, GOOD, "{r:?}");
        v.push(r.data[0]);
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_from_a_host_with_a_command_in_flight() {
    let d = Daemon::builder(IRONLUN).start();
    let admin = d.admin_url().to_owned();
    let a = Arc::new(session(d.addr, HOST_A).await);
    let b = session(d.addr, HOST_B).await;
    let o = ctl_json(&admin, &["own", &lu(), HOST_A]);
    assert_eq!(o["owner"], HOST_A);

    // host-a's acknowledged writes.
    for i in 0..8u64 {
        let w = a
            .write16(0, ACKED_LBA + i * 8, BLOCK_SIZE, tagged(0xA, i), false)
            .await
            .unwrap();
        assert_eq!(w.status, GOOD);
    }
    // A long WRITE SAME in flight.
    let mut cdb = [0u8; 16];
    cdb[0] = 0x93;
    cdb[10..14].copy_from_slice(&WS_BLOCKS.to_be_bytes());
    let block = Bytes::from(vec![0x5a; BLOCK_SIZE as usize]);
    let a2 = a.clone();
    let ws = tokio::spawn(async move { a2.command(0, &cdb, block, 0).await.unwrap() });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !ws.is_finished(),
        "WRITE SAME finished too fast to be in flight"
    );

    // Refused while host-a is logged in; nothing changes.
    let out = ctl(
        &admin,
        &["failover", &lu(), "--from", HOST_A, "--to", HOST_B],
    );
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("live_session") && err.contains("409"), "{err}");
    let o = ownership(&admin);
    assert_eq!(
        (o["owner"].as_str(), o["epoch"].as_u64()),
        (Some(HOST_A), Some(1))
    );
    assert!(
        !ws.is_finished(),
        "the refused failover touched the WRITE SAME"
    );

    // Forced: the answer comes once the WRITE SAME has ended, aborted.
    let admin2 = admin.clone();
    let t = Instant::now();
    let f = tokio::task::spawn_blocking(move || {
        let lu = lu();
        let args = [
            "failover", &lu, "--from", HOST_A, "--to", HOST_B, "--force", "--epoch", "2",
        ];
        ctl_json(&admin2, &args)
    })
    .await
    .unwrap();
    println!("forced failover answered in {:?}: {f}", t.elapsed());
    let f = &f["luns"][0];
    assert_eq!(
        (f["owner"].as_str(), f["epoch"].as_u64()),
        (Some(HOST_B), Some(2))
    );
    assert_eq!(f["aborted"], true, "{f}");
    assert_eq!(f["idempotent"], false, "{f}");
    let ws = tokio::time::timeout(PROMPT, ws).await.unwrap().unwrap();
    assert_eq!(ws.status, TASK_ABORTED, "{ws:?}");

    // Nothing of host-a's lands after the answer: the range reads the same twice.
    let first = sample(&b).await;
    let written = first.iter().filter(|x| **x == 0x5a).count();
    println!(
        "the aborted WRITE SAME wrote {written} of {} sampled MiB before the failover",
        first.len()
    );
    assert!(written < first.len(), "the WRITE SAME was not cut short");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        sample(&b).await,
        first,
        "a write of host-a landed after the failover"
    );
    // host-a's acknowledged writes are there.
    for i in 0..8u64 {
        let r = b.read16(0, ACKED_LBA + i * 8, 8, BLOCK_SIZE).await.unwrap();
        assert_eq!(r.data, tagged(0xA, i), "acknowledged write {i}");
    }

    // host-a: 2Ah/05h once, then RESERVATION CONFLICT; host-b writes.
    let w = a
        .write16(0, ACKED_LBA, BLOCK_SIZE, tagged(0xA, 99), false)
        .await
        .unwrap();
    assert_eq!(w.status, CHECK_CONDITION, "{w:?}");
    let k = w.sense_key().unwrap();
    assert_eq!((k.key, k.asc, k.ascq), (0x6, 0x2a, 0x05));
    let w = a
        .write16(0, ACKED_LBA, BLOCK_SIZE, tagged(0xA, 99), false)
        .await
        .unwrap();
    assert_eq!(w.status, RESERVATION_CONFLICT);
    let w = b
        .write16(0, ACKED_LBA, BLOCK_SIZE, tagged(0xB, 0), false)
        .await
        .unwrap();
    assert_eq!(w.status, GOOD);

    // The same decision again changes nothing; a stale one is refused.
    let again = ctl_json(
        &admin,
        &[
            "failover",
            &lu(),
            "--from",
            HOST_A,
            "--to",
            HOST_B,
            "--force",
            "--epoch",
            "2",
        ],
    );
    assert_eq!(again["luns"][0]["idempotent"], true, "{again}");
    assert_eq!(again["luns"][0]["generation"], f["generation"]);
    let out = ctl(
        &admin,
        &[
            "failover",
            &lu(),
            "--from",
            HOST_B,
            "--to",
            HOST_A,
            "--force",
            "--epoch",
            "2",
        ],
    );
    assert!(
        text(&out.stderr).contains("stale_epoch"),
        "{}",
        text(&out.stderr)
    );

    // --all-of: every LU host-b owns goes to host-a (host-b is logged in: forced).
    let out = ctl(&admin, &["failover", "--all-of", HOST_B, "--to", HOST_A]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("live_session"),
        "{}",
        text(&out.stderr)
    );
    let all = ctl_json(
        &admin,
        &["failover", "--all-of", HOST_B, "--to", HOST_A, "--force"],
    );
    assert_eq!(all["luns"].as_array().unwrap().len(), 1, "{all}");
    assert_eq!(all["luns"][0]["owner"], HOST_A);
    assert_eq!(all["luns"][0]["epoch"], 3);
    let out = ctl(&admin, &["failover", "--all-of", HOST_B, "--to", HOST_A]);
    assert!(
        text(&out.stderr).contains("owns no LU"),
        "{}",
        text(&out.stderr)
    );

    // Release: no owner, PR OUT accepted again.
    let out = ctl(&admin, &["release", &lu(), HOST_B]);
    assert!(!out.status.success(), "only the owner releases");
    let r = ctl_json(&admin, &["release", &lu(), HOST_A]);
    assert!(r["owner"].is_null(), "{r}");
    assert_eq!(r["epoch"], 4);

    // Events and metrics.
    let ev = ctl_json(&admin, &["events"]);
    let failovers: Vec<&Value> = ev["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "failover")
        .collect();
    assert!(failovers.len() >= 4, "{ev}");
    assert!(
        failovers.iter().any(|e| e["detail"]["refused"].is_string()),
        "{failovers:?}"
    );
    assert!(ev["events"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["kind"] == "release"));
    let m = reqwest_metrics(&d).await;
    let line = |r: &str| {
        m.lines()
            .find(|l| {
                l.starts_with("ironlun_lu_failovers_total{")
                    && l.contains(&format!("result=\"{r}\""))
            })
            .unwrap_or_else(|| panic!("no {r} line in\n{m}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    assert_eq!(line("done"), 2);
    assert!(line("refused") >= 3);
}

/// The daemon's `/metrics` text.
async fn reqwest_metrics(d: &Daemon) -> String {
    let admin = d.admin_url().to_owned();
    tokio::task::spawn_blocking(move || {
        let c = ironlun_cli::ctl::Client::new(&admin, None).unwrap();
        let r = c.get("/metrics").unwrap();
        assert_eq!(r.status, 200);
        String::from_utf8(r.body).unwrap()
    })
    .await
    .unwrap()
}
