//! Tier 4 negative tests: what real initiators never send, each while another session keeps
//! writing and reading (and must see every round succeed). The daemon must answer each exactly
//! as RFC 7143 says, and stay healthy.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use bytes::{Bytes, BytesMut};
use ironlun_initiator::login::login_request_pdu;
use ironlun_initiator::{Error, LoginOptions, Negotiated, RawConnection, Session};
use ironlun_iscsi::bhs::encode_header;
use ironlun_iscsi::pdu::{
    Header, LoginRequest, NopOut, RejectReason, ScsiCommand, Stage, TaskAttr, RESERVED_TAG,
};
use ironlun_iscsi::Pdu;
use ironlun_testkit::{opts, BackgroundIo, Daemon, PROMPT, TARGET};
use std::time::Duration;

const IRONLUN: &str = env!("CARGO_BIN_EXE_ironlun");

/// How long "no answer" is awaited.
const SILENCE: Duration = Duration::from_secs(1);

async fn raw_login(d: &Daemon, name: &str) -> (RawConnection, Negotiated) {
    RawConnection::login(d.addr, &opts(name))
        .await
        .expect("raw login")
}

fn nop_out(itt: u32, cmd_sn: u32, exp_stat_sn: u32, immediate: bool, data: Bytes) -> Pdu {
    let h = NopOut {
        immediate,
        lun: 0,
        itt,
        ttt: RESERVED_TAG,
        cmd_sn,
        exp_stat_sn,
    };
    Pdu {
        header: Header::NopOut(h),
        ahs: Vec::new(),
        data,
    }
}

fn tur(itt: u32, cmd_sn: u32, exp_stat_sn: u32) -> Pdu {
    let h = ScsiCommand {
        immediate: false,
        final_: true,
        read: false,
        write: false,
        attr: TaskAttr::Simple,
        lun: 0,
        itt,
        expected_data_transfer_length: 0,
        cmd_sn,
        exp_stat_sn,
        cdb: [0; 16],
    };
    Pdu {
        header: Header::ScsiCommand(h),
        ahs: Vec::new(),
        data: Bytes::new(),
    }
}

/// Send an immediate NOP-Out ping on a raw connection and expect its NOP-In echo.
async fn raw_ping(raw: &mut RawConnection, itt: u32, cmd_sn: u32, exp_stat_sn: u32) {
    let ping = Bytes::from_static(b"still alive?");
    raw.send_pdu(&nop_out(itt, cmd_sn, exp_stat_sn, true, ping.clone()))
        .await
        .expect("send NOP");
    let pdu = raw
        .recv_pdu(PROMPT)
        .await
        .expect("NOP-In")
        .expect("EOF instead of NOP-In");
    match pdu.header {
        Header::NopIn(h) => {
            assert_eq!(h.itt, itt);
            assert_eq!(h.ttt, RESERVED_TAG);
            assert_eq!(pdu.data, ping);
        }
        other => panic!("expected NOP-In, got {other:?}"),
    }
}

fn login_req(version_min: u8, version_max: u8) -> LoginRequest {
    LoginRequest {
        transit: true,
        continue_: false,
        csg: Stage::Security,
        nsg: Stage::Operational,
        version_max,
        version_min,
        isid: [0x80, 0, 0, 0, 0, 9],
        tsih: 0,
        itt: 0,
        cid: 0,
        cmd_sn: 1,
        exp_stat_sn: 0,
    }
}

fn kv(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// Send a crafted login request on a fresh connection and return the Login Response status.
async fn login_status(
    d: &Daemon,
    req: LoginRequest,
    keys: &[(&str, &str)],
) -> (u8, u8, RawConnection) {
    let mut raw = RawConnection::connect(d.addr).await.expect("connect");
    raw.send_pdu(&login_request_pdu(req, &kv(keys)))
        .await
        .expect("send login");
    let pdu = raw
        .recv_pdu(PROMPT)
        .await
        .expect("login response")
        .expect("EOF instead of login response");
    match pdu.header {
        Header::LoginResponse(r) => (r.status_class, r.status_detail, raw),
        other => panic!("expected Login Response, got {other:?}"),
    }
}

/// After the malformed input: a brand-new session logs in and works, and the background I/O
/// keeps making progress.
async fn still_serving(d: &mut Daemon, bg: &BackgroundIo, name: &str) {
    bg.progress(2).await;
    let s = ironlun_testkit::session(d.addr, name).await;
    assert_eq!(
        s.nop(Bytes::from_static(b"x")).await.expect("NOP"),
        Bytes::from_static(b"x")
    );
    s.logout().await.expect("logout");
    d.assert_healthy();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_data_segment_drops_connection() {
    let mut d = Daemon::builder(IRONLUN).start();
    let bg = BackgroundIo::start(d.addr, "iqn.2026-11.io.ironlun:bg-oversized", 0).await;
    let (mut raw, n) = raw_login(&d, "iqn.2026-11.io.ironlun:oversized").await;
    // A NOP-Out header announcing DataSegmentLength 0xFFFFFF (16 MiB - 1), and no data: the
    // target must refuse it from the header alone (RFC 7143 §13.12), not wait to buffer it.
    let mut hdr = BytesMut::new();
    encode_header(
        &nop_out(0x10, n.cmd_sn, n.exp_stat_sn, true, Bytes::new()).header,
        0,
        0x00ff_ffff,
        &mut hdr,
    );
    assert_eq!(hdr.len(), 48);
    raw.send_bytes(&hdr).await.expect("send header");
    assert!(
        raw.is_closed(PROMPT).await,
        "target kept the connection after a 16 MiB DataSegmentLength"
    );
    still_serving(&mut d, &bg, "iqn.2026-11.io.ironlun:after-oversized").await;
    bg.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_opcode_is_rejected_and_session_goes_on() {
    let mut d = Daemon::builder(IRONLUN).start();
    let bg = BackgroundIo::start(d.addr, "iqn.2026-11.io.ironlun:bg-opcode", 0).await;
    let (mut raw, n) = raw_login(&d, "iqn.2026-11.io.ironlun:opcode").await;
    // Opcode 0x0a is unassigned for initiators (RFC 7143 §11.2.1.2); immediate, F, ITT 0x55.
    let mut hdr = [0u8; 48];
    hdr[0] = 0x40 | 0x0a;
    hdr[1] = 0x80;
    hdr[16..20].copy_from_slice(&0x55u32.to_be_bytes());
    hdr[20..24].copy_from_slice(&RESERVED_TAG.to_be_bytes());
    hdr[24..28].copy_from_slice(&n.cmd_sn.to_be_bytes());
    hdr[28..32].copy_from_slice(&n.exp_stat_sn.to_be_bytes());
    raw.send_bytes(&hdr).await.expect("send");
    let pdu = raw
        .recv_pdu(PROMPT)
        .await
        .expect("Reject")
        .expect("EOF instead of Reject");
    let stat_sn = match pdu.header {
        Header::Reject(r) => {
            assert_eq!(r.reason, RejectReason::CommandNotSupported);
            r.stat_sn
        }
        other => panic!("expected Reject, got {other:?}"),
    };
    assert_eq!(
        &pdu.data[..],
        &hdr[..],
        "Reject must carry the rejected 48-byte header (§11.17)"
    );
    raw_ping(&mut raw, 0x56, n.cmd_sn, stat_sn.wrapping_add(1)).await;
    still_serving(&mut d, &bg, "iqn.2026-11.io.ironlun:after-opcode").await;
    bg.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cmd_sn_outside_window_is_dropped() {
    let mut d = Daemon::builder(IRONLUN).start();
    let bg = BackgroundIo::start(d.addr, "iqn.2026-11.io.ironlun:bg-cmdsn", 0).await;
    let (mut raw, n) = raw_login(&d, "iqn.2026-11.io.ironlun:cmdsn").await;
    assert!(
        n.max_cmd_sn.wrapping_sub(n.cmd_sn) < 1000,
        "window {}..{} too wide for this test",
        n.cmd_sn,
        n.max_cmd_sn
    );
    // RFC 7143 §4.2.2.1: a non-immediate command outside [ExpCmdSN, MaxCmdSN] is silently ignored.
    raw.send_pdu(&tur(0x20, n.cmd_sn.wrapping_add(1000), n.exp_stat_sn))
        .await
        .expect("send high");
    match raw.recv_pdu(SILENCE).await {
        Err(Error::Timeout) => {}
        other => panic!("CmdSN far above MaxCmdSN got an answer: {other:?}"),
    }
    raw.send_pdu(&tur(0x21, n.cmd_sn.wrapping_sub(1), n.exp_stat_sn))
        .await
        .expect("send low");
    match raw.recv_pdu(SILENCE).await {
        Err(Error::Timeout) => {}
        other => panic!("CmdSN below ExpCmdSN got an answer: {other:?}"),
    }
    // The right CmdSN still works: the first command of the nexus sees the power-on UA.
    raw.send_pdu(&tur(0x22, n.cmd_sn, n.exp_stat_sn))
        .await
        .expect("send in window");
    let pdu = raw
        .recv_pdu(PROMPT)
        .await
        .expect("SCSI Response")
        .expect("EOF instead of SCSI Response");
    match pdu.header {
        Header::ScsiResponse(r) => {
            assert_eq!(r.itt, 0x22);
            assert_eq!(r.response, 0);
            assert_eq!(r.status, 0x02, "first command: UNIT ATTENTION expected");
            assert_eq!(r.exp_cmd_sn, n.cmd_sn.wrapping_add(1));
        }
        other => panic!("expected SCSI Response, got {other:?}"),
    }
    still_serving(&mut d, &bg, "iqn.2026-11.io.ironlun:after-cmdsn").await;
    bg.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_header_digest_drops_connection() {
    let mut d = Daemon::builder(IRONLUN).start();
    let bg = BackgroundIo::start(d.addr, "iqn.2026-11.io.ironlun:bg-digest", 0).await;
    let o = LoginOptions {
        header_digest: true,
        ..opts("iqn.2026-11.io.ironlun:digest")
    };
    let (mut raw, n) = RawConnection::login(d.addr, &o)
        .await
        .expect("login with HeaderDigest");
    assert!(
        n.header_digest,
        "target did not agree to HeaderDigest=CRC32C: {:?}",
        n.target_keys
    );
    // A good PDU first, to prove digests work both ways.
    raw_ping(&mut raw, 0x30, n.cmd_sn, n.exp_stat_sn).await;
    let mut bytes = raw.encode(&nop_out(
        0x31,
        n.cmd_sn,
        n.exp_stat_sn.wrapping_add(1),
        true,
        Bytes::new(),
    ));
    assert_eq!(bytes.len(), 52);
    bytes[50] ^= 0x5a; // corrupt the CRC32C after the BHS
    raw.send_bytes(&bytes).await.expect("send");
    assert!(
        raw.is_closed(PROMPT).await,
        "target kept the connection after a header digest error"
    );
    still_serving(&mut d, &bg, "iqn.2026-11.io.ironlun:after-digest").await;
    bg.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_errors_have_exact_status() {
    let mut d = Daemon::builder(IRONLUN).start();
    let bg = BackgroundIo::start(d.addr, "iqn.2026-11.io.ironlun:bg-login", 0).await;

    // No InitiatorName: 02/07 "missing parameter" (RFC 7143 §11.13.5), then the target closes.
    let keys = [
        ("SessionType", "Normal"),
        ("TargetName", TARGET),
        ("AuthMethod", "None"),
    ];
    let (class, detail, mut raw) = login_status(&d, login_req(0, 0), &keys).await;
    assert_eq!((class, detail), (0x02, 0x07));
    assert!(
        raw.is_closed(PROMPT).await,
        "connection still open after failed login"
    );

    // Unknown TargetName: 02/03 "not found".
    let bad = LoginOptions::new(
        "iqn.2026-11.io.ironlun:login",
        Some("iqn.2026-11.io.ironlun:nope".to_owned()),
    );
    match Session::connect(d.addr, bad).await {
        Err(Error::LoginFailed { class, detail }) => assert_eq!((class, detail), (0x02, 0x03)),
        other => panic!("unknown target: {other:?}"),
    }

    // VersionMin above what any target speaks (0): 02/05 "unsupported version".
    let keys = [
        ("InitiatorName", "iqn.2026-11.io.ironlun:login"),
        ("SessionType", "Normal"),
        ("TargetName", TARGET),
        ("AuthMethod", "None"),
    ];
    let (class, detail, mut raw) = login_status(&d, login_req(1, 1), &keys).await;
    assert_eq!((class, detail), (0x02, 0x05));
    assert!(
        raw.is_closed(PROMPT).await,
        "connection still open after failed login"
    );

    still_serving(&mut d, &bg, "iqn.2026-11.io.ironlun:after-login").await;
    bg.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_pdus_leave_daemon_healthy() {
    let mut d = Daemon::builder(IRONLUN).start();
    let bg = BackgroundIo::start(d.addr, "iqn.2026-11.io.ironlun:bg-trunc", 0).await;

    // 20 bytes of a BHS, then close.
    let mut raw = RawConnection::connect(d.addr).await.expect("connect");
    let full = ironlun_iscsi::bhs::encode_pdu_plain(&login_request_pdu(
        login_req(0, 0),
        &kv(&[("InitiatorName", "iqn.x")]),
    ));
    raw.send_bytes(&full[..20]).await.expect("send 20 bytes");
    raw.shutdown_write().await.expect("FIN");
    assert!(
        raw.is_closed(PROMPT).await,
        "target kept a half-closed connection with a partial BHS"
    );
    drop(raw);

    // A login BHS announcing 4 KiB of data, then only 100 bytes, then close.
    let mut raw = RawConnection::connect(d.addr).await.expect("connect");
    let mut hdr = BytesMut::new();
    encode_header(&Header::LoginRequest(login_req(0, 0)), 0, 4096, &mut hdr);
    raw.send_bytes(&hdr).await.expect("send BHS");
    raw.send_bytes(&[b'A'; 100]).await.expect("send 100 bytes");
    raw.shutdown_write().await.expect("FIN");
    assert!(
        raw.is_closed(PROMPT).await,
        "target kept a half-closed connection with a partial PDU"
    );
    drop(raw);

    // The same in full feature phase.
    let (mut raw, n) = raw_login(&d, "iqn.2026-11.io.ironlun:trunc-ffp").await;
    let mut hdr = BytesMut::new();
    encode_header(
        &nop_out(0x40, n.cmd_sn, n.exp_stat_sn, true, Bytes::new()).header,
        0,
        4096,
        &mut hdr,
    );
    raw.send_bytes(&hdr).await.expect("send BHS");
    raw.send_bytes(&[b'B'; 100]).await.expect("send 100 bytes");
    drop(raw);

    still_serving(&mut d, &bg, "iqn.2026-11.io.ironlun:after-trunc").await;
    bg.finish().await;
}
