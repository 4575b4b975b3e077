//! Tier 4: every data path of RFC 7143 (immediate data, unsolicited Data-Out, R2T-solicited
//! Data-Out, Data-In split by MaxRecvDataSegmentLength, digests), several commands in flight,
//! and ABORT TASK of a command stalled waiting for its Data-Out.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use ironlun_initiator::{LoginOptions, Residual, Session, TmfFunction, TmfResponse};
use ironlun_testkit::{opts, pattern, Daemon, BLOCK_SIZE, PROMPT};

const IRONLUN: &str = env!("CARGO_BIN_EXE_ironlun");

async fn write_read(s: &Session, lba: u64, len: usize, seed: u64) {
    let data = pattern(seed, len);
    let w = s
        .write16(0, lba, BLOCK_SIZE, data.clone(), false)
        .await
        .expect("write");
    assert_eq!(
        (w.response, w.status, w.residual),
        (0, 0, Residual::None),
        "write {w:?}"
    );
    let blocks = u32::try_from(len / 512).unwrap();
    let r = s.read16(0, lba, blocks, BLOCK_SIZE).await.expect("read");
    assert_eq!((r.response, r.status, r.residual), (0, 0, Residual::None));
    assert!(r.data == data, "read-back differs (lba {lba}, {len} bytes)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_data_out_mode_and_digest_combination() {
    let d = Daemon::builder(IRONLUN).start();
    let mut i = 0u64;
    for immediate_data in [false, true] {
        for initial_r2t in [false, true] {
            for digests in [false, true] {
                i += 1;
                let o = LoginOptions {
                    immediate_data,
                    initial_r2t,
                    header_digest: digests,
                    data_digest: digests,
                    // Small bursts and segments so that every path splits into several PDUs.
                    max_recv_data_segment_length: 4096,
                    first_burst_length: 8192,
                    max_burst_length: 16384,
                    ..opts(&format!("iqn.2026-11.io.ironlun:modes-{i}"))
                };
                let s = Session::connect(d.addr, o.clone()).await.expect("login");
                let n = s.negotiated();
                assert_eq!(
                    (n.immediate_data, n.initial_r2t),
                    (immediate_data, initial_r2t),
                    "{o:?} -> {n:?}"
                );
                assert_eq!((n.header_digest, n.data_digest), (digests, digests));
                assert!(n.first_burst_length <= 8192 && n.max_burst_length <= 16384);
                let ua = s.test_unit_ready(0).await.expect("TUR");
                assert_eq!(
                    ua.status, 0x02,
                    "first command should report the power-on UA"
                );
                // Sizes below, at and well above FirstBurstLength / MaxBurstLength.
                for (k, len) in [512usize, 8192, 12288, 100 * 1024].into_iter().enumerate() {
                    write_read(&s, i * 1024 + 256 * k as u64, len, i * 10 + k as u64).await;
                }
                s.logout().await.expect("logout");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_commands_in_flight() {
    let d = Daemon::builder(IRONLUN).start();
    let s = ironlun_testkit::session(d.addr, "iqn.2026-11.io.ironlun:inflight").await;
    let mut writes = Vec::new();
    for k in 0..32u64 {
        let s = s.clone();
        writes.push(tokio::spawn(async move {
            let data = pattern(100 + k, 32 * 1024);
            let r = s
                .write16(0, 10_000 + k * 64, BLOCK_SIZE, data, false)
                .await
                .expect("write");
            assert_eq!((r.response, r.status), (0, 0));
        }));
    }
    for w in writes {
        w.await.expect("write task");
    }
    let mut reads = Vec::new();
    for k in 0..32u64 {
        let s = s.clone();
        reads.push(tokio::spawn(async move {
            let r = s
                .read16(0, 10_000 + k * 64, 64, BLOCK_SIZE)
                .await
                .expect("read");
            assert_eq!((r.response, r.status), (0, 0));
            assert!(r.data == pattern(100 + k, 32 * 1024), "read {k} differs");
        }));
    }
    for r in reads {
        r.await.expect("read task");
    }
    s.logout().await.expect("logout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_task_waiting_for_data_out() {
    let d = Daemon::builder(IRONLUN).start();
    // InitialR2T=Yes, ImmediateData=No: a write waits for an R2T-solicited Data-Out, which we
    // never send (we do not call wait()), so the task stays in the target's task set.
    let o = LoginOptions {
        immediate_data: false,
        initial_r2t: true,
        ..opts("iqn.2026-11.io.ironlun:abort")
    };
    let s = Session::connect(d.addr, o).await.expect("login");
    assert_eq!(s.test_unit_ready(0).await.expect("TUR").status, 0x02);
    let cdb = ironlun_initiator::scsi::write16_cdb(500, 8, false);
    let pending = s
        .start_command(0, &cdb, pattern(7, 4096), 0)
        .await
        .expect("start write");
    let itt = pending.itt();
    // RFC 7143 §11.5.1 / SAM-5: the task exists, so ABORT TASK completes.
    let resp = tokio::time::timeout(PROMPT, s.task_mgmt(TmfFunction::AbortTask, 0, itt))
        .await
        .expect("TMF response in time")
        .expect("TMF");
    assert_eq!(resp, TmfResponse::FunctionComplete);
    drop(pending);
    // The session goes on: the next command completes normally.
    let r = s.test_unit_ready(0).await.expect("TUR after abort");
    assert_eq!((r.response, r.status), (0, 0));
    write_read(&s, 600, 4096, 8).await;
    // LOGICAL UNIT RESET completes too.
    assert_eq!(
        s.task_mgmt(TmfFunction::LogicalUnitReset, 0, 0)
            .await
            .expect("LU reset"),
        TmfResponse::FunctionComplete
    );
    s.logout().await.expect("logout");
}
