//! EXTENDED COPY against the release daemon with real tools (issue 8).
//!
//! - Acceptance 1 (this part): libiscsi's SCSI.ExtendedCopy and SCSI.ReceiveCopyResults
//!   families pass with 0 failures and 0 skips.
//! - Acceptance 3: two 256 MiB file LUNs; LUN 0 is filled with random data by
//!   `qemu-img convert`; an EXTENDED COPY of all 256 MiB into LUN 1 (our initiator) is timed
//!   against `qemu-img convert` of LUN 0 into LUN 2 (every byte read and written through the
//!   initiator); LUN 1 must then compare equal to the source (`qemu-img compare`) and the
//!   copy must be the faster. Both times are printed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use ironlun_initiator::xcopy::{parameter_list, split};
use ironlun_initiator::{LoginOptions, Session};
use ironlun_testkit::{conformance_of, repo_root, require_tool, run, Daemon};
use std::io::Write;
use std::process::Command;
use std::time::{Duration, Instant};

const TARGET: &str = "iqn.2026-11.io.ironlun:xcopy";
const SIZE: u64 = 256 << 20;
const BS: u32 = 512;

fn config(luns: u64, size: &str) -> String {
    let mut c = format!("[[target]]\nname = \"{TARGET}\"\n");
    for id in 0..luns {
        c.push_str(&format!(
            "[[target.lun]]\nid = {id}\nbackstore = \"file\"\npath = \"lun{id}.img\"\nsize = \"{size}\"\n"
        ));
    }
    c
}

#[test]
fn libiscsi_extended_copy_and_receive_copy_results_pass_without_skips() {
    require_tool("iscsi-test-cu");
    let d = Daemon::release().config(&config(1, "64MiB")).start();
    let url = format!("{}/{TARGET}/0", d.portal());
    let (ok, out) = conformance_of(
        "ExtendedCopy ReceiveCopyResults",
        true,
        &url,
        &repo_root().join("target/conformance-xcopy"),
    );
    println!("{out}");
    assert!(ok, "ExtendedCopy / ReceiveCopyResults:\n{out}");
    assert!(out.contains("conformance: required suites clean"), "{out}");
    d.stop();
}

/// Deterministic pseudo-random bytes (xorshift), `len` bytes.
fn random_bytes(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

#[test]
fn extended_copy_of_256_mib_matches_and_beats_read_and_write_through_the_initiator() {
    require_tool("qemu-img");
    let d = Daemon::release().config(&config(3, "256MiB")).start();
    let lun_url = |n: u64| format!("{}/{TARGET}/{n}", d.portal());
    let src = d.dir().join("source.raw");
    std::fs::File::create(&src)
        .unwrap()
        .write_all(&random_bytes(usize::try_from(SIZE).unwrap()))
        .unwrap();
    let (ok, out) = run(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&src)
        .arg(lun_url(0)));
    assert!(ok, "fill LUN 0: {out}");

    // Through the initiator: qemu-img reads LUN 0 and writes LUN 2.
    let t = Instant::now();
    let (ok, out) = run(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(lun_url(0))
        .arg(lun_url(2)));
    let through_initiator = t.elapsed();
    assert!(ok, "qemu-img convert LUN 0 → LUN 2: {out}");

    // EXTENDED COPY LUN 0 → LUN 1, all 256 MiB, issued by our initiator on LUN 1.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let addr: std::net::SocketAddr = d.addr;
    let copy_time: Duration = rt.block_on(async move {
        let s = Session::connect(
            addr,
            LoginOptions::new("iqn.2026-11.io.test:xcopy", Some(TARGET.into())),
        )
        .await
        .unwrap();
        let lun = |n: u64| n << 48;
        for n in 0..2 {
            while s.test_unit_ready(lun(n)).await.unwrap().status != 0 {}
        }
        let naa0 = s.lu_naa(lun(0)).await.unwrap().unwrap();
        let naa1 = s.lu_naa(lun(1)).await.unwrap().unwrap();
        let blocks = SIZE / u64::from(BS);
        let list = parameter_list(1, &[naa0, naa1], BS, &split(0, 1, 0, 0, blocks));
        let t = Instant::now();
        let r = s.extended_copy(lun(1), list).await.unwrap();
        let took = t.elapsed();
        assert_eq!(r.status, 0, "EXTENDED COPY: sense {:?}", r.sense);
        assert_eq!(s.synchronize_cache(lun(1)).await.unwrap().status, 0);
        s.logout().await.unwrap();
        took
    });
    println!(
        "256 MiB LUN 0 → LUN 1: EXTENDED COPY {:.3} s; qemu-img convert through the initiator {:.3} s",
        copy_time.as_secs_f64(),
        through_initiator.as_secs_f64()
    );

    let (ok, out) = run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&src)
        .arg(lun_url(1)));
    assert!(
        ok,
        "LUN 1 differs from the source after EXTENDED COPY: {out}"
    );
    assert!(
        copy_time < through_initiator,
        "EXTENDED COPY ({copy_time:?}) is not faster than qemu-img convert ({through_initiator:?})"
    );
    d.stop();
}
