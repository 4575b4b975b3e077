//! Tier 4, issue 15: what a hostile or buggy peer sends to make the daemon allocate, reproduced
//! against the real daemon with a raw connection, each while a bystander session keeps doing
//! I/O. Findings covered here: sparse Data-Out answering a huge write (finding 2), `X#`/`X-`
//! and unknown login keys (finding 7), GET LBA STATUS on a LUN whose physical block holds
//! several logical blocks (finding 9).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::cast_possible_truncation
)]

use bytes::Bytes;
use ironlun_initiator::{Negotiated, RawConnection};
use ironlun_iscsi::pdu::{DataOut, Header, NopOut, ScsiCommand, TaskAttr, RESERVED_TAG};
use ironlun_iscsi::Pdu;
use ironlun_testkit::{opts, BackgroundIo, Daemon, PROMPT};
use std::time::Duration;

const IRONLUN: &str = env!("CARGO_BIN_EXE_ironlun");

/// VmRSS of `pid` in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS");
    kib * 1024
}

const MIB: u64 = 1024 * 1024;

fn write16(itt: u32, cmd_sn: u32, exp_stat_sn: u32, lba: u64, blocks: u32) -> Pdu {
    let mut cdb = [0u8; 16];
    cdb[0] = 0x8a;
    cdb[2..10].copy_from_slice(&lba.to_be_bytes());
    cdb[10..14].copy_from_slice(&blocks.to_be_bytes());
    Pdu {
        header: Header::ScsiCommand(ScsiCommand {
            immediate: false,
            final_: true,
            read: false,
            write: true,
            attr: TaskAttr::Simple,
            lun: 0,
            itt,
            expected_data_transfer_length: blocks * 512,
            cmd_sn,
            exp_stat_sn,
            cdb,
        }),
        ahs: Vec::new(),
        data: Bytes::new(),
    }
}

fn ping(itt: u32, cmd_sn: u32, exp_stat_sn: u32) -> Pdu {
    Pdu {
        header: Header::NopOut(NopOut {
            immediate: true,
            lun: 0,
            itt,
            ttt: RESERVED_TAG,
            cmd_sn,
            exp_stat_sn,
        }),
        ahs: Vec::new(),
        data: Bytes::from_static(b"ping"),
    }
}

/// Finding 2: WRITE(16) of 64 MiB (EDTL) answered by a single 512-byte Data-Out at the offset
/// of the last R2T. Before issue 15 each such command made the daemon allocate and zero-fill
/// the whole transfer (about 110,000 times the bytes sent). Now held memory follows the bytes
/// received, or the out-of-sequence Data-Out (DataSequenceInOrder=Yes, RFC 7143 §13.20) ends
/// the connection; either way the daemon's RSS stays flat and a bystander is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sparse_data_out_does_not_allocate_the_transfer() {
    let d = Daemon::builder(IRONLUN).start();
    let bg = BackgroundIo::start(d.addr, "iqn.2026-12.test:bystander", 1 << 20).await;
    bg.progress(2).await;
    let before = rss(d.pid());

    let mut o = opts("iqn.2026-12.test:sparse");
    o.initial_r2t = true;
    o.immediate_data = false;
    o.max_burst_length = 16 * 1024 * 1024 - 1024;
    let (mut raw, n): (RawConnection, Negotiated) =
        RawConnection::login(d.addr, &o).await.expect("raw login");
    let mut cmd_sn = n.cmd_sn;
    let mut exp_stat_sn = n.exp_stat_sn;
    let commands = 16u32;
    let blocks = 64 * 1024 * 1024 / 512;
    for i in 0..commands {
        let itt = 0x100 + i;
        raw.send_pdu(&write16(itt, cmd_sn, exp_stat_sn, 0, blocks))
            .await
            .expect("send WRITE(16)");
        cmd_sn = cmd_sn.wrapping_add(1);
    }
    // Collect the R2Ts until the target goes quiet, then answer each solicited command's last
    // R2T with 512 bytes. The target paces its R2Ts by the memory budget (issue 15): what it
    // solicits at once stays within a connection's share (a quarter of the default 256 MiB),
    // so only the first commands are solicited.
    let mut last: std::collections::HashMap<u32, (u32, u32)> = Default::default();
    let mut solicited = 0u64;
    let mut closed = false;
    loop {
        match tokio::time::timeout(Duration::from_millis(500), raw.recv_pdu(PROMPT)).await {
            Ok(Ok(Some(p))) => {
                if let Header::R2t(r) = p.header {
                    exp_stat_sn = r.stat_sn;
                    solicited += u64::from(r.desired_data_transfer_length);
                    let e = last.entry(r.itt).or_insert((r.ttt, r.buffer_offset));
                    if r.buffer_offset > e.1 {
                        *e = (r.ttt, r.buffer_offset);
                    }
                }
            }
            Ok(Ok(None)) => {
                closed = true;
                break;
            }
            Ok(Err(e)) => panic!("waiting for R2Ts: {e}"),
            Err(_) => break,
        }
    }
    assert!(!closed, "the target closed before soliciting data");
    assert!(
        last.values().any(|(_, off)| *off >= 32 * 1024 * 1024),
        "R2Ts reach deep into the transfer: {last:?}"
    );
    eprintln!(
        "sparse Data-Out: {} of {commands} commands solicited, {} MiB in all",
        last.len(),
        solicited / MIB
    );
    assert!(
        solicited <= 64 * MIB,
        "{} MiB solicited at once, beyond a connection's share",
        solicited / MIB
    );
    let mut sent = 0u64;
    for (itt, (ttt, off)) in &last {
        let pdu = Pdu {
            header: Header::DataOut(DataOut {
                final_: false,
                lun: 0,
                itt: *itt,
                ttt: *ttt,
                exp_stat_sn,
                data_sn: 0,
                buffer_offset: *off,
            }),
            ahs: Vec::new(),
            data: Bytes::from(vec![0xa5u8; 512]),
        };
        if raw.send_pdu(&pdu).await.is_err() {
            break;
        }
        sent += 512;
    }
    // An immediate ping orders after the Data-Outs: once it is echoed (or the connection is
    // gone) the target has taken every Data-Out.
    let echoed = match raw.send_pdu(&ping(0x9000, cmd_sn, exp_stat_sn)).await {
        Err(_) => false,
        Ok(()) => loop {
            match raw.recv_pdu(PROMPT).await {
                Ok(Some(p)) if matches!(p.header, Header::NopIn(ref h) if h.itt == 0x9000) => {
                    break true
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break false,
            }
        },
    };
    let after = rss(d.pid());
    eprintln!(
        "sparse Data-Out: {sent} bytes sent; RSS {} -> {} MiB; connection {}",
        before / MIB,
        after / MIB,
        if echoed { "kept" } else { "closed" }
    );
    assert!(
        after < before + 64 * MIB,
        "RSS grew by {} MiB for {sent} bytes of Data-Out",
        (after.saturating_sub(before)) / MIB
    );
    drop(raw);
    bg.progress(3).await;
    bg.finish().await;
}

/// Finding 7: extension keys (`X#…`, IANA-registered; `X-…`, private) and keys we do not know
/// are answered `NotUnderstood`, and the login goes on (RFC 7143 §6.2, §13.26).
#[tokio::test]
async fn extension_and_unknown_keys_are_not_understood() {
    let d = Daemon::builder(IRONLUN).start();
    let mut o = opts("iqn.2026-12.test:keys");
    o.extra_keys = vec![
        ("X#com.example.feature".into(), "1".into()),
        ("X-com.example.private".into(), "Yes".into()),
        ("FutureStandardKey".into(), "Yes".into()),
    ];
    let (raw, n) = RawConnection::login(d.addr, &o)
        .await
        .expect("login with extension keys succeeds");
    for k in [
        "X#com.example.feature",
        "X-com.example.private",
        "FutureStandardKey",
    ] {
        assert_eq!(n.target_key(k), Some("NotUnderstood"), "answer to {k}");
    }
    // The session works afterwards.
    let s = raw.into_session(n);
    assert_eq!(
        s.nop(Bytes::from_static(b"ok")).await.expect("NOP"),
        Bytes::from_static(b"ok")
    );
}

/// Finding 9: GET LBA STATUS (SBC-4 §5.8) on a LUN of 512-byte logical blocks in 4096-byte
/// physical blocks: the first descriptor starts at the requested LBA even when that LBA is not
/// aligned to a physical block.
#[tokio::test]
async fn get_lba_status_starts_at_the_requested_lba_on_4k_physical_blocks() {
    let config = r#"
[[target]]
name = "iqn.2026-11.io.ironlun:lab"

[[target.lun]]
id = 0
backstore = "ram"
size = "64MiB"
block_size = 512
physical_block_size = 4096
thin = true
"#;
    let d = Daemon::builder(IRONLUN).config(config).start();
    let s = ironlun_testkit::session(d.addr, "iqn.2026-12.test:lbastatus").await;
    // Map the first 256 blocks, then UNMAP single blocks and one whole physical block, as
    // libiscsi's GetLBAStatus.UnmapSingle does.
    let w = s
        .write16(0, 0, 512, ironlun_testkit::pattern(9, 256 * 512), false)
        .await
        .expect("WRITE(16)");
    assert_eq!(w.status, 0);
    for (lba, n) in [(3u64, 1u32), (8, 8), (13, 1), (64, 1)] {
        let mut param = vec![0u8; 24];
        param[1] = 22;
        param[3] = 16;
        param[8..16].copy_from_slice(&lba.to_be_bytes());
        param[16..20].copy_from_slice(&n.to_be_bytes());
        let mut cdb = [0u8; 10];
        cdb[0] = 0x42;
        cdb[8] = 24;
        let r = s
            .command(0, &cdb, Bytes::from(param), 0)
            .await
            .expect("UNMAP");
        assert_eq!(r.status, 0, "UNMAP {lba}+{n}: sense {:?}", r.sense);
    }
    for start in [0u64, 3, 7, 8, 9, 13, 14, 63, 64, 65, 4095] {
        let mut cdb = [0u8; 16];
        cdb[0] = 0x9e;
        cdb[1] = 0x12;
        cdb[2..10].copy_from_slice(&start.to_be_bytes());
        cdb[10..14].copy_from_slice(&4096u32.to_be_bytes());
        let r = s
            .command(0, &cdb, Bytes::new(), 4096)
            .await
            .expect("GET LBA STATUS");
        assert_eq!(r.status, 0, "status for start {start}: sense {:?}", r.sense);
        let data = &r.data;
        assert!(data.len() >= 24, "one descriptor at least: {data:?}");
        let first = u64::from_be_bytes(data[8..16].try_into().unwrap());
        assert_eq!(first, start, "first descriptor's LBA for start {start}");
    }
}
