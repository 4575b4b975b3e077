//! EXTENDED COPY (LID1) and RECEIVE COPY RESULTS against the daemon, driven by our initiator:
//! copies within one LU and across LUs verified by read-back, copy status afterwards, a copy
//! stopped mid-way by ABORT TASK and by a LUN RESET from another session, a reservation
//! conflict on the destination, a copy target the nexus does not see (LUN masking), a copy
//! past its time limit.
//!
//! The daemon runs in this process (the real server on 127.0.0.1), so that a test can hold a
//! copy between its 8 MiB chunks with the copy manager's test hook ([`CopyHook`]) and act
//! while it is held: no pause or limit on the wall clock.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::cast_possible_truncation
)]

use bytes::Bytes;
use ironlun::config::{Config, Portal};
use ironlun::server::{Server, ThreadPlan};
use ironlun::target::xcopy::CopyHook;
use ironlun::target::{LunHandle, Registry};
use ironlun_initiator::xcopy::{parameter_list, split, BlockSegment};
use ironlun_initiator::{pr, SenseKey, Session, TmfFunction, TmfResponse};
use ironlun_testkit::{clear_ua, pattern, Login, TARGET};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

const BS: u32 = 512;
/// Blocks per LU (32 MiB).
const BLOCKS: u64 = 64 * 1024;

const CONFIG: &str = r#"
[[target]]
name = "iqn.2026-11.io.ironlun:lab"
[[target.lun]]
id = 0
backstore = "ram"
size = "32MiB"
[[target.lun]]
id = 1
backstore = "ram"
size = "32MiB"
[[target.lun]]
id = 2
backstore = "ram"
size = "1MiB"
[[target.initiator]]
name = "iqn.2026-11.io.test:masked"
luns = [0, 1]
"#;

/// The 8-byte LUN field of single-level LUN `n` (SAM-5 §4.7).
fn l(n: u64) -> u64 {
    n << 48
}

/// The daemon's server in this process, on an ephemeral port of 127.0.0.1.
struct Daemon {
    addr: SocketAddr,
    registry: Arc<Registry>,
    _stop: tokio::sync::watch::Sender<bool>,
    _dir: tempfile::TempDir,
}

async fn daemon() -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::parse("xcopy.toml", CONFIG, None, Some(dir.path())).unwrap();
    cfg.portals = vec![Portal {
        listen: "127.0.0.1:0".parse().unwrap(),
        tpgt: 1,
    }];
    let server = Server::bind(&cfg, ThreadPlan::new(1, None, &cfg))
        .await
        .unwrap();
    let (addr, registry) = (server.local_addrs()[0], server.registry());
    let (stop, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(server.run(rx));
    Daemon {
        addr,
        registry,
        _stop: stop,
        _dir: dir,
    }
}

impl Daemon {
    fn lu(&self, lun: u64) -> Arc<LunHandle> {
        self.registry.target(TARGET).unwrap().luns()[&lun].clone()
    }

    /// Hold every copy into LU `lun` before each chunk until the test lets it pass.
    fn hook(&self, lun: u64) -> Arc<CopyHook> {
        let hook = Arc::new(CopyHook::default());
        assert!(self.lu(lun).copy_hook.set(hook.clone()).is_ok());
        hook
    }
}

/// Poll `check` (after a yield each time) until it holds; a hang guard of 2000 polls.
async fn until(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..2000 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("never: {what}");
}

/// Log in as `initiator` and clear the power-on unit attention on every LU it sees.
async fn login(d: &Daemon, initiator: &str, luns: &[u64]) -> Session {
    let fields: Vec<u64> = luns.iter().map(|&n| l(n)).collect();
    Login::new(initiator)
        .ready(&fields, 4)
        .connect(d.addr)
        .await
}

async fn write(s: &Session, lun: u64, lba: u64, data: Bytes) {
    let r = s.write16(l(lun), lba, BS, data, false).await.unwrap();
    assert_eq!(r.status, 0, "WRITE(16) LUN {lun} LBA {lba}");
}

async fn read(s: &Session, lun: u64, lba: u64, blocks: u32) -> Bytes {
    let r = s.read16(l(lun), lba, blocks, BS).await.unwrap();
    assert_eq!(r.status, 0, "READ(16) LUN {lun} LBA {lba}");
    r.data
}

fn sense(r: &ironlun_initiator::CommandResult) -> (u8, u8, u8) {
    let k = SenseKey::parse(&r.sense).expect("sense data");
    (k.key, k.asc, k.ascq)
}

/// COPY STATUS of `list_id`: (copy manager status, segments processed, transfer count in
/// bytes).
async fn copy_status(s: &Session, lun: u64, list_id: u8) -> Option<(u8, u16, u64)> {
    let r = s.receive_copy_results(l(lun), 0, list_id).await.unwrap();
    if r.status != 0 {
        assert_eq!(
            sense(&r),
            (0x05, 0x24, 0x00),
            "no such copy: INVALID FIELD IN CDB"
        );
        return None;
    }
    let d = &r.data;
    let units = u32::from(d[7]) * 10;
    let count = u64::from(u32::from_be_bytes(d[8..12].try_into().unwrap())) << units;
    Some((d[4] & 0x7f, u16::from_be_bytes([d[5], d[6]]), count))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_within_and_across_logical_units() {
    let d = daemon().await;
    let s = login(&d, "iqn.2026-11.io.test:copier", &[0, 1]).await;
    let naa0 = s.lu_naa(l(0)).await.unwrap().unwrap();
    let naa1 = s.lu_naa(l(1)).await.unwrap().unwrap();
    assert_ne!(naa0, naa1);
    // 20 MiB of pattern at LBA 0 of LU 0.
    let n: u64 = 40 * 1024;
    let data = pattern(7, (n * u64::from(BS)) as usize);
    for (i, chunk) in data.chunks(1 << 20).enumerate() {
        write(&s, 0, i as u64 * 2048, data.slice_ref(chunk)).await;
    }

    // Across LUs: LU 0 [0, n) → LU 1 [100, 100 + n), issued on LU 1, two segments.
    let list = parameter_list(5, &[naa0, naa1], BS, &split(0, 1, 0, 100, n));
    let r = s.extended_copy(l(1), list).await.unwrap();
    assert_eq!(r.status, 0, "EXTENDED COPY across LUs: {:?}", r.sense);
    for off in (0..n).step_by(2048) {
        let got = read(&s, 1, 100 + off, 2048).await;
        let want = data.slice((off * 512) as usize..((off + 2048) * 512) as usize);
        assert!(got == want, "LU 1 at {} differs from the source", 100 + off);
    }
    assert_eq!(read(&s, 1, 0, 100).await, Bytes::from(vec![0u8; 100 * 512]));
    assert_eq!(
        copy_status(&s, 1, 5).await,
        Some((0x01, 1, n * u64::from(BS))),
        "COPY STATUS: completed good, one segment"
    );
    // A finished copy's status is reported once.
    assert_eq!(copy_status(&s, 1, 5).await, None);

    // Within LU 0, overlapping forwards by 1000 blocks (copied from the end backwards).
    let list = parameter_list(6, &[naa0], BS, &split(0, 0, 0, 1000, n));
    let r = s.extended_copy(l(0), list).await.unwrap();
    assert_eq!(r.status, 0, "EXTENDED COPY within LU 0: {:?}", r.sense);
    for off in (0..n).step_by(2048) {
        let got = read(&s, 0, 1000 + off, 2048).await;
        let want = data.slice((off * 512) as usize..((off + 2048) * 512) as usize);
        assert!(got == want, "LU 0 at {} differs", 1000 + off);
    }

    // Beyond the destination's capacity: COPY ABORTED, nothing written.
    let list = parameter_list(
        7,
        &[naa0, naa1],
        BS,
        &[BlockSegment {
            src: 0,
            dst: 1,
            blocks: 16,
            src_lba: 0,
            dst_lba: BLOCKS - 8,
        }],
    );
    let r = s.extended_copy(l(0), list).await.unwrap();
    assert_eq!(r.status, 2);
    assert_eq!(sense(&r).0, 0x0A, "COPY ABORTED");
    assert_eq!(copy_status(&s, 0, 7).await.map(|x| x.0), Some(0x02));

    // A zero-length parameter list does nothing.
    let r = s.extended_copy(l(0), Vec::new()).await.unwrap();
    assert_eq!(r.status, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operating_parameters_and_vpd() {
    let d = daemon().await;
    let s = login(&d, "iqn.2026-11.io.test:params", &[0]).await;
    let r = s.receive_copy_results(l(0), 3, 0).await.unwrap();
    assert_eq!(r.status, 0);
    let p = &r.data;
    assert!(p.len() >= 46);
    assert_eq!(
        u16::from_be_bytes([p[8], p[9]]),
        8,
        "MAXIMUM CSCD DESCRIPTOR COUNT"
    );
    assert_eq!(&p[44..46], &[0x02, 0xE4]);
    let std = s.inquiry(l(0), 96).await.unwrap();
    assert_eq!(std.data[5] & 0x08, 0x08, "3PC");
    let vpd = s.inquiry_vpd(l(0), 0x00, 255).await.unwrap();
    assert!(vpd.data[4..].contains(&0x8F));
    let tpc = s.inquiry_vpd(l(0), 0x8F, 255).await.unwrap();
    assert_eq!(tpc.status, 0);
    assert_eq!(
        &tpc.data[4..6],
        &[0x00, 0x01],
        "Supported Commands descriptor"
    );
}

/// A copy of `blocks` blocks from LU 0 to LU 1 in the background on `s`; returns its task.
async fn start_copy(s: &Session, list_id: u8, blocks: u64) -> ironlun_initiator::PendingCommand {
    let naa0 = s.lu_naa(l(0)).await.unwrap().unwrap();
    let naa1 = s.lu_naa(l(1)).await.unwrap().unwrap();
    let list = parameter_list(list_id, &[naa0, naa1], BS, &split(0, 1, 0, 0, blocks));
    let cdb = ironlun_initiator::xcopy::extended_copy_cdb(list.len() as u32);
    s.start_command(l(1), &cdb, Bytes::from(list), 0)
        .await
        .unwrap()
}

/// Fill LU 0 with a non-zero pattern over the first `blocks` blocks.
async fn fill_source(s: &Session, blocks: u64) {
    let data = pattern(11, (blocks * u64::from(BS)) as usize);
    for (i, chunk) in data.chunks(1 << 20).enumerate() {
        write(s, 0, i as u64 * 2048, data.slice_ref(chunk)).await;
    }
}

/// How many of LU 1's first `blocks` blocks (in 1 MiB steps) are still zero.
async fn zero_mib(s: &Session, blocks: u64) -> usize {
    let mut zero = 0;
    for lba in (0..blocks).step_by(2048) {
        if read(s, 1, lba, 2048).await.iter().all(|b| *b == 0) {
            zero += 1;
        }
    }
    zero
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_task_stops_a_copy_between_chunks() {
    let d = daemon().await;
    let hook = d.hook(1);
    let s = login(&d, "iqn.2026-11.io.test:abort", &[0, 1]).await;
    // 32 MiB: four 8 MiB chunks. The first one passes; the copy is held before the second.
    fill_source(&s, BLOCKS).await;
    let cmd = start_copy(&s, 9, BLOCKS).await;
    let itt = cmd.itt();
    hook.allow(1);
    hook.reached(2).await;
    let resp = s
        .task_mgmt(TmfFunction::AbortTask, l(1), itt)
        .await
        .unwrap();
    assert_eq!(resp, TmfResponse::FunctionComplete);
    // The copy is gone from the hook without being let through: it writes nothing more.
    hook.idle().await;
    assert_eq!(
        copy_status(&s, 1, 9).await.map(|x| x.0),
        Some(0x02),
        "completed with error"
    );
    assert_eq!(
        zero_mib(&s, BLOCKS).await,
        24,
        "exactly the first 8 MiB chunk landed"
    );
    drop(cmd);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lun_reset_from_another_session_aborts_the_copy() {
    let d = daemon().await;
    let hook = d.hook(1);
    let a = login(&d, "iqn.2026-11.io.test:copy-a", &[0, 1]).await;
    let b = login(&d, "iqn.2026-11.io.test:reset-b", &[0, 1]).await;
    fill_source(&a, BLOCKS).await;
    let cmd = start_copy(&a, 4, BLOCKS).await;
    hook.allow(1);
    hook.reached(2).await;
    // The reset reaches LU 1 while the copy is held; its response waits for the copy.
    let epoch = d.lu(1).abort_epoch();
    let reset = tokio::spawn(async move {
        let r = b.task_mgmt(TmfFunction::LogicalUnitReset, l(1), 0).await;
        (b, r)
    });
    until("the LUN RESET reached LU 1", || {
        d.lu(1).abort_epoch() != epoch
    })
    .await;
    hook.allow(3);
    let (_b, resp) = reset.await.unwrap();
    assert_eq!(resp.unwrap(), TmfResponse::FunctionComplete);
    let r = cmd.wait().await.unwrap();
    assert_eq!(r.status, 0x40, "TASK ABORTED (TAS=1)");
    clear_ua(&a, l(1), 4).await;
    assert_eq!(copy_status(&a, 1, 4).await.map(|x| x.0), Some(0x02));
    assert_eq!(
        zero_mib(&a, BLOCKS).await,
        24,
        "the copy stopped at the chunk after the reset"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_past_its_time_limit_is_copy_aborted() {
    let d = daemon().await;
    let hook = d.hook(1);
    let s = login(&d, "iqn.2026-11.io.test:slow", &[0, 1]).await;
    fill_source(&s, BLOCKS).await;
    let cmd = start_copy(&s, 3, BLOCKS).await;
    // Two chunks pass; before the third the time limit has run out.
    hook.allow(2);
    hook.reached(3).await;
    hook.expire();
    hook.allow(1);
    let r = cmd.wait().await.unwrap();
    assert_eq!(r.status, 2, "CHECK CONDITION");
    assert_eq!(sense(&r), (0x0A, 0x00, 0x00), "COPY ABORTED");
    let (state, _, moved) = copy_status(&s, 1, 3).await.unwrap();
    assert_eq!(state, 0x02, "completed with error");
    assert_eq!(moved, 16 << 20, "the two chunks done before the limit");
    assert_eq!(zero_mib(&s, BLOCKS).await, 16);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reserved_destination_conflicts() {
    let d = daemon().await;
    let a = login(&d, "iqn.2026-11.io.test:copy-a", &[0, 1]).await;
    let b = login(&d, "iqn.2026-11.io.test:owner-b", &[0, 1]).await;
    let prout = |action, kind, key| {
        let params = pr::OutParams::keys(0, key).encode();
        (pr::out_cdb(action, kind, params.len() as u32), params)
    };
    let (cdb, p) = prout(pr::OutAction::Register, 0, 0xB);
    assert_eq!(
        b.command(l(1), &cdb, Bytes::from(p), 0)
            .await
            .unwrap()
            .status,
        0
    );
    let params = pr::OutParams::keys(0xB, 0).encode();
    let cdb = pr::out_cdb(
        pr::OutAction::Reserve,
        pr::kind::WRITE_EXCLUSIVE,
        params.len() as u32,
    );
    assert_eq!(
        b.command(l(1), &cdb, Bytes::from(params), 0)
            .await
            .unwrap()
            .status,
        0
    );
    // A copies LU 0 → LU 1, issuing on LU 0 (no reservation there): conflict on LU 1.
    let naa0 = a.lu_naa(l(0)).await.unwrap().unwrap();
    let naa1 = a.lu_naa(l(1)).await.unwrap().unwrap();
    let list = parameter_list(2, &[naa0, naa1], BS, &split(0, 1, 0, 0, 16));
    let r = a.extended_copy(l(0), list.clone()).await.unwrap();
    assert_eq!(r.status, 0x18, "RESERVATION CONFLICT");
    // Reading LU 1 is still allowed under Write Exclusive: LU 1 → LU 0 copies.
    let back = parameter_list(3, &[naa0, naa1], BS, &split(1, 0, 0, 0, 16));
    assert_eq!(a.extended_copy(l(0), back).await.unwrap().status, 0);
    // The holder itself may copy into LU 1.
    assert_eq!(b.extended_copy(l(0), list).await.unwrap().status, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_target_outside_the_nexus_view_is_unreachable() {
    let d = daemon().await;
    let full = login(&d, "iqn.2026-11.io.test:full", &[0, 2]).await;
    let naa2 = full.lu_naa(l(2)).await.unwrap().unwrap();
    let masked = login(&d, "iqn.2026-11.io.test:masked", &[0]).await;
    let naa0 = masked.lu_naa(l(0)).await.unwrap().unwrap();
    let list = parameter_list(1, &[naa0, naa2], BS, &split(0, 1, 0, 0, 8));
    let r = masked.extended_copy(l(0), list.clone()).await.unwrap();
    assert_eq!(r.status, 2);
    assert_eq!(
        sense(&r),
        (0x0A, 0x0D, 0x02),
        "COPY TARGET DEVICE NOT REACHABLE"
    );
    // The same list from a nexus that sees LU 2 copies.
    assert_eq!(full.extended_copy(l(0), list).await.unwrap().status, 0);
}
