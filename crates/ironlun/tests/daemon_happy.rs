//! Tier 4 happy path: login, unit attention, INQUIRY, READ CAPACITY (16), 1 MiB FUA write and
//! read-back, discovery, NOP echo, logout — against the real daemon binary.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use bytes::Bytes;
use ironlun_initiator::{discover, Capacity, Residual, SenseKey, Session};
use ironlun_testkit::{opts, pattern, Daemon, BLOCKS, BLOCK_SIZE, TARGET};

const IRONLUN: &str = env!("CARGO_BIN_EXE_ironlun");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_path() {
    let mut d = Daemon::builder(IRONLUN).start();
    let s = Session::connect(d.addr, opts("iqn.2026-11.io.ironlun:test-happy"))
        .await
        .expect("login");

    // SAM-5 §6.3: the first command of a new I_T nexus reports POWER ON, RESET, OR BUS DEVICE
    // RESET OCCURRED (29h/00h) as UNIT ATTENTION; the next one is GOOD.
    let r = s.test_unit_ready(0).await.expect("TUR 1");
    assert_eq!((r.response, r.status), (0, 0x02), "first TUR: {r:?}");
    assert_eq!(
        r.sense_key(),
        Some(SenseKey {
            key: 0x06,
            asc: 0x29,
            ascq: 0x00
        }),
        "sense {:02x?}",
        r.sense
    );
    let r = s.test_unit_ready(0).await.expect("TUR 2");
    assert_eq!((r.response, r.status), (0, 0x00), "second TUR: {r:?}");

    // Standard INQUIRY: connected direct-access block device, at least 36 bytes.
    let r = s
        .inquiry(0, 96)
        .await
        .expect("INQUIRY")
        .good()
        .expect("INQUIRY status");
    assert!(r.data.len() >= 36, "INQUIRY data {} bytes", r.data.len());
    assert_eq!(r.data[0], 0x00, "peripheral qualifier/device type");
    // SPC-4 §6.6.2: ADDITIONAL LENGTH covers at least the 36-byte standard data.
    assert!(
        usize::from(r.data[4]) + 5 >= 36,
        "ADDITIONAL LENGTH {}",
        r.data[4]
    );

    let cap = s.read_capacity16(0).await.expect("READ CAPACITY 16");
    assert_eq!(
        cap,
        Capacity {
            blocks: BLOCKS,
            block_size: BLOCK_SIZE
        }
    );

    // 1 MiB with FUA, then read it back byte for byte.
    let data = pattern(1, 1 << 20);
    let lba = 4096;
    let w = s
        .write16(0, lba, BLOCK_SIZE, data.clone(), true)
        .await
        .expect("WRITE 16");
    assert_eq!(
        (w.response, w.status, w.residual),
        (0, 0, Residual::None),
        "write: {w:?}"
    );
    let r = s.read16(0, lba, 2048, BLOCK_SIZE).await.expect("READ 16");
    assert_eq!((r.response, r.status, r.residual), (0, 0, Residual::None));
    assert_eq!(r.data.len(), 1 << 20);
    assert!(r.data == data, "read-back differs from what was written");

    // Discovery lists the target on this portal.
    let targets = discover(d.addr, "iqn.2026-11.io.ironlun:test-happy-disc")
        .await
        .expect("discovery");
    let (_, addrs) = targets
        .iter()
        .find(|(n, _)| n == TARGET)
        .unwrap_or_else(|| panic!("{TARGET} missing from {targets:?}"));
    let portal = d.addr.to_string();
    assert!(
        addrs
            .iter()
            .any(|a| a.split(',').next() == Some(portal.as_str())),
        "addresses {addrs:?} lack {portal}"
    );

    // NOP-Out ping data comes back in the NOP-In (RFC 7143 §11.19).
    let ping = Bytes::from_static(b"ironlun ping 0123456789");
    assert_eq!(s.nop(ping.clone()).await.expect("NOP"), ping);
    assert_eq!(s.nop(Bytes::new()).await.expect("empty NOP"), Bytes::new());

    s.logout().await.expect("logout");
    assert!(s.is_closed());
    d.assert_healthy();
}
