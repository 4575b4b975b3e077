//! Tier 6, issue #4 acceptance 4: 10,000 connect/login/disconnect cycles, half of them aborted
//! at random points (after the TCP connect, inside a login PDU, after login without logout,
//! inside a command's data), leave the release daemon's open fds and RSS where they were after
//! a warm-up of 100 cycles.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::cast_possible_truncation
)]

use bytes::Bytes;
use ironlun_initiator::login::login_request_pdu;
use ironlun_initiator::{LoginOptions, RawConnection, Session};
use ironlun_iscsi::pdu::{Header, LoginRequest, ScsiCommand, Stage, TaskAttr};
use ironlun_iscsi::Pdu;
use ironlun_testkit::Daemon;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const TARGET: &str = "iqn.2026-11.io.ironlun:lab";
const CONFIG: &str = "[[target]]\nname = \"iqn.2026-11.io.ironlun:lab\"\n[[target.lun]]\nid = 0\nbackstore = \"ram\"\nsize = \"64MiB\"\n";
const WORKERS: u32 = 8;

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn opts(worker: u32) -> LoginOptions {
    let mut o = LoginOptions::new("iqn.2026-11.io.test:churn", Some(TARGET.to_owned()));
    // One ISID per worker: a worker's next login may reinstate its own aborted session.
    o.isid[4..6].copy_from_slice(&(worker as u16).to_be_bytes());
    o.timeout = Duration::from_secs(20);
    o
}

fn write_cmd(itt: u32, cmd_sn: u32, exp_stat_sn: u32) -> Pdu {
    let mut cdb = [0u8; 16];
    cdb[0] = 0x8a; // WRITE(16), 128 blocks at LBA 0
    cdb[13] = 128;
    Pdu {
        header: Header::ScsiCommand(ScsiCommand {
            immediate: false,
            final_: false,
            read: false,
            write: true,
            attr: TaskAttr::Simple,
            lun: 0,
            itt,
            expected_data_transfer_length: 128 * 512,
            cmd_sn,
            exp_stat_sn,
            cdb,
        }),
        ahs: Vec::new(),
        // Part of the data as immediate data; the rest never comes.
        data: Bytes::from(vec![0xa5; 8192]),
    }
}

/// One cycle; `kind` 0..=4 completes, 5..=9 aborts at a different point.
async fn cycle(addr: SocketAddr, worker: u32, kind: u64, cut: usize) {
    match kind {
        0..=4 => {
            let s = Session::connect(addr, opts(worker)).await.expect("login");
            s.logout().await.expect("logout");
        }
        5 => drop(RawConnection::connect(addr).await.unwrap()),
        6 => {
            let o = opts(worker);
            let keys = vec![
                ("InitiatorName".to_owned(), o.initiator_name.clone()),
                ("TargetName".to_owned(), TARGET.to_owned()),
                ("SessionType".to_owned(), "Normal".to_owned()),
            ];
            let req = LoginRequest {
                transit: true,
                csg: Stage::Operational,
                nsg: Stage::FullFeature,
                isid: o.isid,
                itt: 1,
                cmd_sn: 1,
                ..Default::default()
            };
            let wire = ironlun_iscsi::bhs::encode_pdu_plain(&login_request_pdu(req, &keys));
            let mut raw = RawConnection::connect(addr).await.unwrap();
            let _ = raw.send_bytes(&wire[..cut % wire.len()]).await;
        }
        7 => {
            let (raw, _) = RawConnection::login(addr, &opts(worker))
                .await
                .expect("raw login");
            drop(raw);
        }
        _ => {
            let (mut raw, n) = RawConnection::login(addr, &opts(worker))
                .await
                .expect("raw login");
            let wire = raw.encode(&write_cmd(n.next_itt, n.cmd_sn, n.exp_stat_sn));
            let _ = raw.send_bytes(&wire[..48 + cut % (wire.len() - 48)]).await;
        }
    }
}

async fn run_cycles(addr: SocketAddr, total: u64, seed: u64) {
    let mut tasks = Vec::new();
    for w in 0..WORKERS {
        tasks.push(tokio::spawn(async move {
            let mut x = seed ^ (u64::from(w) + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let mut i = u64::from(w);
            while i < total {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                // Half complete, half abort: the abort point is random.
                let kind = if i % 2 == 0 { x % 5 } else { 5 + x % 5 };
                cycle(addr, w, kind, (x >> 8) as usize).await;
                i += u64::from(WORKERS);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_cycles_half_aborted_leak_nothing() {
    let d = Daemon::release().config(CONFIG).start();
    let addr: SocketAddr = d.addr;
    let pid = d.pid();
    run_cycles(addr, 100, 1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (fds0, rss0) = (open_fds(pid), rss_kib(pid));
    let t0 = Instant::now();
    run_cycles(addr, 10_000, 2).await;
    let took = t0.elapsed();
    // Connections the daemon has not yet seen end are closed promptly (EOF).
    let deadline = Instant::now() + Duration::from_secs(10);
    while open_fds(pid) > fds0 + 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (fds1, rss1) = (open_fds(pid), rss_kib(pid));
    println!("10,000 cycles in {took:?}; fds {fds0} -> {fds1}; RSS {rss0} KiB -> {rss1} KiB");
    assert!(fds1.abs_diff(fds0) <= 2, "open fds {fds0} -> {fds1}");
    assert!(rss1 <= rss0 + 8 * 1024, "RSS grew {rss0} KiB -> {rss1} KiB");
    // Still serving.
    let s = Session::connect(addr, opts(99))
        .await
        .expect("login after churn");
    assert_eq!(s.test_unit_ready(0).await.unwrap().response, 0);
    s.logout().await.unwrap();
    d.stop();
}
