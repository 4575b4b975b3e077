//! Tier 4 liveness and fault tests: session reinstatement (RFC 7143 §6.3.5), target NOP-In
//! pings and their timeout (§11.19), the login timeout, slow and vanishing clients, and the
//! Async Message asking for logout on SIGTERM (§11.9.1). The daemon runs with short timers
//! (`[timeouts]` in its config); every test checks it stays healthy.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::cast_possible_truncation
)]

use bytes::Bytes;
use ironlun_initiator::{LoginOptions, Negotiated, RawConnection, Session};
use ironlun_iscsi::pdu::{DataOut, Header, ScsiCommand, TaskAttr, RESERVED_TAG};
use ironlun_iscsi::Pdu;
use std::time::Duration;

use ironlun_testkit::{opts, Daemon, PROMPT, TARGET};

const IRONLUN: &str = env!("CARGO_BIN_EXE_ironlun");

/// Pings after 1 s idle, 2 s to answer, 2 s to log in, discovery idle 2 s.
const SHORT: &str = r#"
[timeouts]
nop_interval = 1
nop_timeout = 2
login_timeout = 2
discovery_idle = 2

[[target]]
name = "iqn.2026-11.io.ironlun:lab"
[[target.lun]]
id = 0
backstore = "ram"
size = "64MiB"
"#;

/// [`SHORT`] without pings, so that only reinstatement can close a connection.
fn no_pings() -> String {
    SHORT
        .replace("nop_interval = 1", "nop_interval = 0")
        .replace("login_timeout = 2", "login_timeout = 15")
}

fn scsi(itt: u32, cmd_sn: u32, n: &Negotiated, cdb: [u8; 16], read: u32, write: u32) -> Pdu {
    let h = ScsiCommand {
        immediate: false,
        final_: true,
        read: read > 0,
        write: write > 0,
        attr: TaskAttr::Simple,
        lun: 0,
        itt,
        expected_data_transfer_length: read.max(write),
        cmd_sn,
        exp_stat_sn: n.exp_stat_sn,
        cdb,
    };
    Pdu {
        header: Header::ScsiCommand(h),
        ahs: Vec::new(),
        data: Bytes::new(),
    }
}

/// READ(16) / WRITE(16) CDB for `blocks` 512-byte blocks at LBA 0.
fn rw16(op: u8, blocks: u32) -> [u8; 16] {
    let mut cdb = [0u8; 16];
    cdb[0] = op;
    cdb[10..14].copy_from_slice(&blocks.to_be_bytes());
    cdb
}

#[tokio::test]
async fn a_new_login_with_the_same_isid_reinstates_the_session() {
    let mut d = Daemon::builder(IRONLUN).config(&no_pings()).start();
    let name = "iqn.2026-11.io.test:reinstate";
    let (mut first, _) = RawConnection::login(d.addr, &opts(name))
        .await
        .expect("first login");
    // Another ISID of the same initiator is a separate session and must survive.
    let mut other_isid = opts(name);
    other_isid.isid[5] = 2;
    let other = Session::connect(d.addr, other_isid).await.expect("login");
    let second = Session::connect(d.addr, opts(name))
        .await
        .expect("reinstating login");
    // No pings, no timeouts: only the reinstatement can close it.
    assert!(
        first.is_closed(PROMPT).await,
        "the old connection stays open"
    );
    assert!(!other.is_closed());
    assert_eq!(second.test_unit_ready(0).await.unwrap().response, 0);
    assert_eq!(other.test_unit_ready(0).await.unwrap().response, 0);
    // The same ISID to another target name would be another session: not tested here (one
    // target). A discovery session never reinstates a normal one.
    let disc = Session::connect(d.addr, LoginOptions::new(name, None))
        .await
        .expect("discovery login");
    assert_eq!(second.test_unit_ready(0).await.unwrap().response, 0);
    disc.logout().await.unwrap();
    second.logout().await.unwrap();
    other.logout().await.unwrap();
    d.assert_healthy();
}

#[tokio::test]
async fn target_pings_and_our_initiator_keeps_the_session() {
    let mut d = Daemon::builder(IRONLUN).config(SHORT).start();
    let s = Session::connect(d.addr, opts("iqn.2026-11.io.test:pinged"))
        .await
        .expect("login");
    // Idle far longer than nop_interval + nop_timeout: the answered pings keep it open.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!s.is_closed());
    assert_eq!(s.test_unit_ready(0).await.unwrap().response, 0);
    s.logout().await.unwrap();
    d.assert_healthy();
}

#[tokio::test]
async fn a_silent_client_gets_pinged_then_closed() {
    let mut d = Daemon::builder(IRONLUN).config(SHORT).start();
    let (mut raw, _) = RawConnection::login(d.addr, &opts("iqn.2026-11.io.test:silent"))
        .await
        .expect("login");
    let pdu = raw
        .recv_pdu(PROMPT)
        .await
        .expect("a ping")
        .expect("EOF instead of a ping");
    let Header::NopIn(h) = &pdu.header else {
        panic!("{pdu:?}")
    };
    assert_eq!(h.itt, RESERVED_TAG);
    assert_ne!(h.ttt, RESERVED_TAG);
    // In this order: the ping, the connection still open (the ping's answer is awaited for
    // nop_timeout), then closed for want of an answer.
    assert!(!raw.is_closed(Duration::ZERO).await, "closed with the ping");
    assert!(raw.is_closed(PROMPT).await, "unanswered ping must close");
    d.assert_healthy();
}

#[tokio::test]
async fn half_a_login_is_closed_by_the_login_timeout() {
    let mut d = Daemon::builder(IRONLUN).config(SHORT).start();
    let mut raw = RawConnection::connect(d.addr).await.unwrap();
    raw.send_bytes(&[0x43, 0x87, 0, 0, 0, 0, 0, 0x40])
        .await
        .unwrap();
    // Open while the rest of the login may still come, closed by the login timeout.
    assert!(!raw.is_closed(Duration::ZERO).await, "closed at once");
    assert!(raw.is_closed(PROMPT).await);
    // A connection that sends nothing at all goes the same way.
    let mut mute = RawConnection::connect(d.addr).await.unwrap();
    assert!(mute.is_closed(PROMPT).await);
    d.assert_healthy();
}

#[tokio::test]
async fn a_one_byte_per_second_client_times_out() {
    let mut d = Daemon::builder(IRONLUN).config(SHORT).start();
    let login = ironlun_iscsi::bhs::encode_pdu_plain(&ironlun_initiator::login::login_request_pdu(
        ironlun_iscsi::pdu::LoginRequest {
            transit: true,
            csg: ironlun_iscsi::pdu::Stage::Operational,
            nsg: ironlun_iscsi::pdu::Stage::FullFeature,
            isid: [0x80, 0, 0, 0, 0, 9],
            itt: 1,
            cmd_sn: 1,
            ..Default::default()
        },
        &[
            (
                "InitiatorName".to_owned(),
                "iqn.2026-11.io.test:slow".to_owned(),
            ),
            ("TargetName".to_owned(), TARGET.to_owned()),
        ],
    ));
    // A byte a second, well within the login PDU's 48-byte header: if each byte restarted
    // the 2 s login timeout the connection would stay open all along; it must close while
    // the bytes still come.
    let mut raw = RawConnection::connect(d.addr).await.unwrap();
    let mut closed = false;
    for b in login.iter().take(20) {
        if raw.send_bytes(&[*b]).await.is_err() || raw.is_closed(Duration::ZERO).await {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(closed, "still open after 20 bytes at one a second");
    d.assert_healthy();
}

#[tokio::test]
async fn clients_vanishing_mid_login_data_out_and_data_in_free_everything() {
    let mut d = Daemon::builder(IRONLUN).config(SHORT).start();
    // Warm up (runtime threads, first session) before taking the baseline.
    let s = Session::connect(d.addr, opts("iqn.2026-11.io.test:warm"))
        .await
        .unwrap();
    s.logout().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let baseline = d.open_fds();
    for i in 0..10u32 {
        let name = format!("iqn.2026-11.io.test:vanish-{i}");
        // Mid login: half a Login Request, then gone.
        let mut raw = RawConnection::connect(d.addr).await.unwrap();
        raw.send_bytes(&[0x43, 0x87, 0, 0, 0, 0, 0, 0x40, 0, 0])
            .await
            .unwrap();
        drop(raw);
        // Mid Data-Out: a 1 MiB write, its R2T answered with half a Data-Out PDU.
        let (mut raw, n) = RawConnection::login(d.addr, &opts(&name)).await.unwrap();
        let blocks = 2048u32;
        raw.send_pdu(&scsi(
            n.next_itt,
            n.cmd_sn,
            &n,
            rw16(0x8a, blocks),
            0,
            blocks * 512,
        ))
        .await
        .unwrap();
        let mut ttt = None;
        while ttt.is_none() {
            let pdu = raw.recv_pdu(PROMPT).await.unwrap().expect("R2T");
            if let Header::R2t(r) = pdu.header {
                ttt = Some(r.ttt);
            }
        }
        let data_out = Pdu {
            header: Header::DataOut(DataOut {
                final_: false,
                itt: n.next_itt,
                ttt: ttt.unwrap(),
                data_sn: 0,
                buffer_offset: 0,
                exp_stat_sn: n.exp_stat_sn,
                ..Default::default()
            }),
            ahs: Vec::new(),
            data: Bytes::from(vec![0x5a; 64 * 1024]),
        };
        let wire = raw.encode(&data_out);
        raw.send_bytes(&wire[..wire.len() / 2]).await.unwrap();
        drop(raw);
        // Mid Data-In: a 32 MiB read nobody reads.
        let (mut raw, n) = RawConnection::login(d.addr, &opts(&format!("{name}-r")))
            .await
            .unwrap();
        let blocks = 65536u32;
        raw.send_pdu(&scsi(
            n.next_itt,
            n.cmd_sn,
            &n,
            rw16(0x88, blocks),
            blocks * 512,
            0,
        ))
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(raw);
    }
    d.settle_fds(baseline).await;
    // Everything still works, and sessions were counted down: log in again with every name.
    let s = Session::connect(d.addr, opts("iqn.2026-11.io.test:after"))
        .await
        .unwrap();
    assert_eq!(s.test_unit_ready(0).await.unwrap().response, 0);
    s.logout().await.unwrap();
    d.assert_healthy();
}

/// A session that keeps a command in flight back to back (queue depth 1) is caught by the
/// connection's busy poll after every response; the connection still lets the reactor run
/// now and then, so SIGTERM reaches it: the daemon closes it and exits cleanly, while the
/// initiator is still sending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_reaches_a_session_streaming_at_queue_depth_one() {
    let mut d = Daemon::builder(IRONLUN).config(&no_pings()).start();
    let s = Session::connect(d.addr, opts("iqn.2026-11.io.test:stream"))
        .await
        .expect("login");
    while s.test_unit_ready(0).await.unwrap().status != 0 {}
    let reads = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let stream = tokio::spawn({
        let reads = reads.clone();
        async move {
            // Until the daemon closes the session (a hang guard of 10^6 reads).
            for _ in 0..1_000_000u32 {
                match s.read16(0, 0, 8, 512).await {
                    Ok(r) if r.status == 0 => {
                        reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    _ => return true,
                }
            }
            false
        }
    });
    let mut polls = 0;
    while reads.load(std::sync::atomic::Ordering::Relaxed) < 1000 {
        polls += 1;
        assert!(polls < 10_000, "the reads do not run");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    d.sigterm();
    assert!(stream.await.unwrap(), "the session outlived SIGTERM");
    let status = d.wait_exit(PROMPT);
    assert!(status.success(), "{status:?}; stderr:\n{}", d.stderr());
}

#[tokio::test]
async fn sigterm_asks_logged_in_initiators_to_log_out() {
    let mut d = Daemon::builder(IRONLUN).config(SHORT).start();
    let (mut raw, _) = RawConnection::login(d.addr, &opts("iqn.2026-11.io.test:shutdown"))
        .await
        .expect("login");
    // Keep the pings away from the assertion: answer whatever comes first only by reading.
    d.sigterm();
    let mut pings = 0;
    let msg = loop {
        let pdu = raw
            .recv_pdu(PROMPT)
            .await
            .expect("a PDU")
            .expect("EOF before the Async Message");
        match pdu.header {
            Header::AsyncMessage(m) => break m,
            Header::NopIn(_) => {
                pings += 1;
                assert!(pings < 10, "pings but no Async Message after SIGTERM");
            }
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(msg.async_event, 1, "AsyncEvent 1: target requests Logout");
    assert!(msg.parameter3 >= 1, "time to logout");
    // We do not log out: the daemon closes after Parameter3 seconds and exits cleanly.
    assert!(raw.is_closed(PROMPT).await);
    let status = d.wait_exit(PROMPT);
    assert!(status.success(), "{status:?}; stderr:\n{}", d.stderr());
    assert!(!d.stderr().contains("panicked"));
}

#[tokio::test]
async fn a_data_out_with_a_bad_data_digest_is_rejected_and_the_connection_dropped() {
    let mut d = Daemon::builder(IRONLUN).config(&no_pings()).start();
    let o = LoginOptions {
        header_digest: true,
        data_digest: true,
        ..opts("iqn.2026-11.io.test:data-digest")
    };
    let (mut raw, n) = RawConnection::login(d.addr, &o).await.expect("login");
    assert!(n.header_digest && n.data_digest, "{:?}", n.target_keys);
    raw.send_pdu(&scsi(n.next_itt, n.cmd_sn, &n, rw16(0x8a, 1), 0, 512))
        .await
        .unwrap();
    let r2t = loop {
        let pdu = raw.recv_pdu(PROMPT).await.unwrap().expect("R2T");
        if let Header::R2t(r) = pdu.header {
            break r;
        }
    };
    let data_out = Pdu {
        header: Header::DataOut(DataOut {
            final_: true,
            itt: n.next_itt,
            ttt: r2t.ttt,
            exp_stat_sn: n.exp_stat_sn,
            ..Default::default()
        }),
        ahs: Vec::new(),
        data: Bytes::from(vec![0x11; 512]),
    };
    let mut wire = raw.encode(&data_out);
    let last = wire.len() - 1;
    wire[last] ^= 0xff; // the data digest
    raw.send_bytes(&wire).await.unwrap();
    let pdu = raw.recv_pdu(PROMPT).await.unwrap().expect("Reject");
    let Header::Reject(r) = &pdu.header else {
        panic!("{pdu:?}")
    };
    assert_eq!(r.reason as u8, 0x02, "Data Digest Error");
    assert_eq!(pdu.data[0] & 0x3f, 0x05, "the rejected Data-Out's BHS");
    assert!(raw.is_closed(PROMPT).await, "ERL 0: the connection goes");
    d.assert_healthy();
}
