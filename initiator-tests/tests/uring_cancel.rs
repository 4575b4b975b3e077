//! Connections dropped with I/O in flight on io_uring LUNs (issue #3 acceptance 3): the kernel
//! may still be reading into or writing from a request's buffer when its command is abandoned;
//! the buffer must stay owned by the ring until its completion (DESIGN.md §3 rule 6).
//! `scripts/test.sh` also runs this test against a daemon built with AddressSanitizer.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::cast_possible_truncation
)]

use bytes::Bytes;
use ironlun_initiator::Session;
use ironlun_testkit::{Daemon, Login};
use std::net::SocketAddr;

const TARGET: &str = "iqn.2026-11.io.ironlun:lab";

/// The 8-byte LUN field for a single-level LUN < 256 (SAM-5 §4.7, peripheral addressing).
fn lun(n: u64) -> u64 {
    n << 48
}

fn pattern(seed: u64, len: usize) -> Bytes {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect::<Vec<u8>>()
        .into()
}

async fn session(addr: SocketAddr, name: &str) -> Session {
    // Clear the power-on unit attention of each LUN.
    Login::new(name)
        .target(TARGET)
        .ready(&[lun(0), lun(1)], 3)
        .connect(addr)
        .await
}

#[test]
fn dropping_connections_with_uring_io_in_flight_is_safe() {
    let cfg = format!(
        "[[target]]\nname = \"{TARGET}\"\n\
         [[target.lun]]\nid = 0\nbackstore = \"uring\"\npath = \"direct.img\"\nsize = \"64MiB\"\ndirect = true\nring_depth = 16\n\
         [[target.lun]]\nid = 1\nbackstore = \"uring\"\npath = \"buffered.img\"\nsize = \"64MiB\"\n"
    );
    let d = Daemon::release().config(&cfg).start();
    let addr: SocketAddr = d.addr;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        for round in 0..40u64 {
            let s = session(addr, &format!("iqn.2026-11.io.ironlun:cancel-{round}")).await;
            let mut pending = Vec::new();
            for i in 0..24u64 {
                let l = lun(i % 2);
                let lba = (round * 24 + i) % 256 * 512;
                if i % 3 == 0 {
                    let cdb = read16(lba, 512);
                    pending.push(
                        s.start_command(l, &cdb, Bytes::new(), 512 * 512)
                            .await
                            .unwrap(),
                    );
                } else {
                    let data = pattern(round * 100 + i, 256 * 1024);
                    let cdb = write16(lba, 512, i % 4 == 1);
                    pending.push(s.start_command(l, &cdb, data, 0).await.unwrap());
                }
            }
            // Abandon everything: the socket closes with commands in the ring.
            drop(pending);
            drop(s);
        }
        // The daemon still serves both LUNs correctly.
        let s = session(addr, "iqn.2026-11.io.ironlun:cancel-check").await;
        for n in [0, 1] {
            let data = pattern(7 + n, 1 << 20);
            let w = s
                .write16(lun(n), 4096, 512, data.clone(), true)
                .await
                .unwrap();
            assert_eq!(w.status, 0, "write on LUN {n}: sense {:02x?}", &w.sense[..]);
            let r = s.read16(lun(n), 4096, 2048, 512).await.unwrap();
            assert_eq!(r.status, 0, "read on LUN {n}");
            assert!(r.data == data, "LUN {n} reads back what was written");
        }
        s.logout().await.unwrap();
    });
    let err = d.stop();
    assert!(!err.contains("AddressSanitizer"), "{err}");
}

fn read16(lba: u64, blocks: u32) -> Vec<u8> {
    let mut c = vec![0x88, 0];
    c.extend(lba.to_be_bytes());
    c.extend(blocks.to_be_bytes());
    c.extend([0, 0]);
    c
}

fn write16(lba: u64, blocks: u32, fua: bool) -> Vec<u8> {
    let mut c = read16(lba, blocks);
    c[0] = 0x8a;
    if fua {
        c[1] = 0x08;
    }
    c
}
