//! The initiator against a scripted target on loopback: what a well-behaved target does
//! (out-of-order Data-In, sense in a SCSI Response) and what a broken one does (R2T outside
//! the buffer, closing mid-command, login refusal) must give results or typed errors, never a
//! panic or a hang.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use bytes::{Bytes, BytesMut};
use ironlun_initiator::{Error, LoginOptions, Residual, Session};
use ironlun_iscsi::framer::{encode_pdu, Digests, Framed, Framer};
use ironlun_iscsi::pdu::{DataIn, Header, LoginResponse, R2t, ScsiCommand, ScsiResponse};
use ironlun_iscsi::{text, Limits, Pdu};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

struct Peer {
    io: TcpStream,
    buf: BytesMut,
    framer: Framer,
    stat_sn: u32,
}

impl Peer {
    async fn recv(&mut self) -> Option<Pdu> {
        loop {
            if let Some(Framed::Pdu(p)) = self.framer.next_pdu(&mut self.buf).expect("frame") {
                return Some(p);
            }
            if self.io.read_buf(&mut self.buf).await.expect("read") == 0 {
                return None;
            }
        }
    }

    async fn send(&mut self, header: Header, data: Bytes) {
        let pdu = Pdu {
            header,
            ahs: Vec::new(),
            data,
        };
        for piece in encode_pdu(&pdu, Digests::default()) {
            self.io.write_all(&piece).await.expect("write");
        }
    }

    fn next_stat_sn(&mut self) -> u32 {
        self.stat_sn += 1;
        self.stat_sn
    }

    /// Answer login requests until the initiator reaches full feature phase, or refuse the
    /// first one with `refuse` = (class, detail).
    async fn login(&mut self, refuse: Option<(u8, u8)>) {
        loop {
            let pdu = self.recv().await.expect("login request");
            let Header::LoginRequest(req) = pdu.header else {
                panic!("not a login request")
            };
            let keys = text::parse(&pdu.data).expect("keys");
            let mut answer: Vec<(String, String)> = Vec::new();
            for (k, _) in &keys {
                let v = match k.as_str() {
                    "HeaderDigest" | "DataDigest" => "None",
                    "AuthMethod" => "None",
                    "InitialR2T" => "Yes",
                    "ImmediateData" => "No",
                    "MaxBurstLength" | "FirstBurstLength" => "65536",
                    "MaxOutstandingR2T" => "1",
                    _ => continue,
                };
                answer.push((k.clone(), v.to_owned()));
            }
            if req.csg == ironlun_iscsi::pdu::Stage::Operational {
                answer.push(("MaxRecvDataSegmentLength".into(), "8192".into()));
            }
            let (status_class, status_detail) = refuse.unwrap_or((0, 0));
            let resp = LoginResponse {
                transit: refuse.is_none(),
                continue_: false,
                csg: req.csg,
                nsg: req.nsg,
                version_max: 0,
                version_active: 0,
                isid: req.isid,
                tsih: 1,
                itt: req.itt,
                stat_sn: self.next_stat_sn(),
                exp_cmd_sn: 1,
                max_cmd_sn: 64,
                status_class,
                status_detail,
            };
            let done = req.nsg == ironlun_iscsi::pdu::Stage::FullFeature || refuse.is_some();
            self.send(
                Header::LoginResponse(resp),
                Bytes::from(text::encode(&answer)),
            )
            .await;
            if done {
                return;
            }
        }
    }

    async fn command(&mut self) -> ScsiCommand {
        match self.recv().await.expect("command").header {
            Header::ScsiCommand(c) => c,
            other => panic!("expected a SCSI command, got {other:?}"),
        }
    }
}

async fn listen() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    (l, a)
}

async fn accept(l: &TcpListener) -> Peer {
    let (io, _) = l.accept().await.unwrap();
    Peer {
        io,
        buf: BytesMut::new(),
        framer: Framer::new(Limits::default()),
        stat_sn: 100,
    }
}

fn opts() -> LoginOptions {
    LoginOptions {
        timeout: Duration::from_secs(10),
        ..LoginOptions::new("iqn.test:i", Some("iqn.test:t".into()))
    }
}

#[tokio::test]
async fn reassembles_out_of_order_data_in_and_strips_sense_length() {
    let (l, addr) = listen().await;
    let target = tokio::spawn(async move {
        let mut p = accept(&l).await;
        p.login(None).await;
        // READ of 8 bytes: second half first, status in the last Data-In, residual 0.
        let c = p.command().await;
        assert!(c.read && c.final_);
        let di = |off: u32, s: bool, stat_sn: u32| DataIn {
            final_: s,
            status_present: s,
            itt: c.itt,
            ttt: u32::MAX,
            stat_sn,
            exp_cmd_sn: c.cmd_sn + 1,
            max_cmd_sn: c.cmd_sn + 64,
            data_sn: u32::from(s),
            buffer_offset: off,
            ..DataIn::default()
        };
        p.send(Header::DataIn(di(4, false, 0)), Bytes::from_static(b"EFGH"))
            .await;
        let sn = p.next_stat_sn();
        p.send(Header::DataIn(di(0, true, sn)), Bytes::from_static(b"ABCD"))
            .await;
        // Next command: CHECK CONDITION with 3 sense bytes behind SenseLength, underflow 5.
        let c = p.command().await;
        let r = ScsiResponse {
            underflow: true,
            status: 0x02,
            itt: c.itt,
            stat_sn: p.next_stat_sn(),
            exp_cmd_sn: c.cmd_sn + 1,
            max_cmd_sn: c.cmd_sn + 64,
            residual_count: 5,
            ..ScsiResponse::default()
        };
        p.send(
            Header::ScsiResponse(r),
            Bytes::from_static(&[0, 3, 0x70, 0, 0x05]),
        )
        .await;
        // Keep the socket open until the initiator is done.
        let _ = p.recv().await;
    });
    let s = Session::connect(addr, opts()).await.expect("login");
    assert_eq!(s.negotiated().target_max_recv_data_segment_length, 8192);
    assert!(s.negotiated().initial_r2t && !s.negotiated().immediate_data);
    let r = s.read16(0, 0, 1, 8).await.expect("read");
    assert_eq!((r.status, r.residual), (0, Residual::None));
    assert_eq!(r.data, Bytes::from_static(b"ABCDEFGH"));
    let r = s.inquiry(0, 5).await.expect("inquiry");
    assert_eq!((r.status, r.residual), (0x02, Residual::Underflow(5)));
    assert_eq!(r.sense, Bytes::from_static(&[0x70, 0, 0x05]));
    drop(s);
    target.await.unwrap();
}

#[tokio::test]
async fn r2t_outside_buffer_and_close_are_errors() {
    let (l, addr) = listen().await;
    let target = tokio::spawn(async move {
        let mut p = accept(&l).await;
        p.login(None).await;
        let c = p.command().await;
        assert!(
            c.write && c.final_,
            "InitialR2T=Yes, ImmediateData=No: no unsolicited data"
        );
        let r2t = R2t {
            itt: c.itt,
            ttt: 9,
            stat_sn: p.stat_sn + 1,
            exp_cmd_sn: c.cmd_sn + 1,
            max_cmd_sn: c.cmd_sn + 64,
            buffer_offset: 1024,
            desired_data_transfer_length: 1024,
            ..R2t::default()
        };
        p.send(Header::R2t(r2t), Bytes::new()).await;
        // Second command: the target just goes away.
        let _ = p.command().await;
    });
    let s = Session::connect(addr, opts()).await.expect("login");
    let cdb = ironlun_initiator::scsi::write16_cdb(0, 2, false);
    match s.command(0, &cdb, Bytes::from(vec![0u8; 1024]), 0).await {
        Err(Error::Protocol(m)) => assert!(m.contains("R2T"), "{m}"),
        other => panic!("expected a protocol error, got {other:?}"),
    }
    let got = tokio::time::timeout(Duration::from_secs(10), s.test_unit_ready(0))
        .await
        .expect("no hang");
    assert!(matches!(got, Err(Error::Closed)), "{got:?}");
    assert!(s.is_closed());
    target.await.unwrap();
}

#[tokio::test]
async fn login_refusal_is_typed() {
    let (l, addr) = listen().await;
    let target = tokio::spawn(async move {
        let mut p = accept(&l).await;
        p.login(Some((2, 1))).await;
    });
    match Session::connect(addr, opts()).await {
        Err(Error::LoginFailed { class, detail }) => assert_eq!((class, detail), (2, 1)),
        other => panic!("expected LoginFailed, got {other:?}"),
    }
    target.await.unwrap();
}
