//! libiscsi's persistent-reservation suites through one gateway of three (issue 18,
//! acceptance 1): three real etcd members and three release `ironlun serve` gateways on
//! loopback share LUN 0's image and its reservation state; `iscsi-test-cu` runs every PR
//! family through gateway A (active/optimized) while B and C (standby) serve the same LUN to
//! sessions of their own that read its PR state throughout. Expected: the single-node result (`pr_conformance.rs`), 0 failures and 0
//! skips. Afterwards the state the suites left is the same through A, B and C.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use bytes::Bytes;
use ironlun_initiator::pr;
use ironlun_testkit::{
    conformance_of, repo_root, require_tool, Daemon, EtcdCluster, Gateways, Login,
};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

const TARGET: &str = "iqn.2026-11.io.ironlun:cluster";

/// The PR families of `pr_conformance.rs` (every one iscsi-test-cu 1.19 has, and Reserve6).
const PR_SUITES: &str = "PrinReadKeys PrinServiceactionRange PrinReportCapabilities ProutRegister \
ProutReserve ProutClear ProutPreempt Reserve6";

#[test]
fn libiscsi_pr_suites_pass_through_one_gateway_of_three() {
    require_tool("iscsi-test-cu");
    let etcd = EtcdCluster::start(3);
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("lun0.img");
    let gws = Gateways {
        n: 3,
        target: TARGET,
        image: &image,
        size: "1GiB",
        cluster: "conformance",
        extra: "",
    }
    .start(Daemon::release, &etcd);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    // Sessions on B and C for the whole run, reading the PR state (B and C are standby for
    // media access; PR commands pass there, SPC-4 §5.16.2.4.4): they serve the LU meanwhile.
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    for (i, g) in gws.iter().enumerate().skip(1) {
        let (addr, stop, reads) = (g.addrs[0], stop.clone(), reads.clone());
        readers.push(rt.spawn(async move {
            let s = Login::new(&format!("iqn.2026-11.io.ironlun:reader-{i}"))
                .target(TARGET)
                .ready(&[], 0)
                .connect(addr)
                .await;
            let cdb = pr::in_cdb(pr::InAction::ReadKeys, 4096);
            while !stop.load(Ordering::SeqCst) {
                let (r, _) = ironlun_testkit::past_ua(&s, 0, &cdb, Bytes::new(), 4096).await;
                assert_eq!(
                    r.status,
                    0,
                    "READ KEYS through gateway {i}: {:?}",
                    r.sense_key()
                );
                reads.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            s
        }));
    }

    let url = format!("iscsi://{}/{TARGET}/0", gws[0].addrs[0]);
    let out_dir = repo_root().join("target/conformance-cluster-pr");
    let (ok, out) = conformance_of(PR_SUITES, true, &url, &out_dir);
    println!("{out}");
    stop.store(true, Ordering::SeqCst);
    let sessions: Vec<_> = readers
        .into_iter()
        .map(|h| rt.block_on(h).expect("reader"))
        .collect();
    let reads = reads.load(Ordering::Relaxed);
    println!("READ KEYS through B and C meanwhile: {reads}");
    assert!(ok, "PR suites through gateway A failed or skipped:\n{out}");
    assert!(out.contains("conformance: required suites clean"), "{out}");
    assert!(reads > 0, "B and C served nothing during the run");

    // The state the suites left: the same generation and keys through every gateway.
    let mut seen = Vec::new();
    for (g, s) in gws
        .iter()
        .zip([None, Some(&sessions[0]), Some(&sessions[1])])
    {
        let keys = rt.block_on(async {
            let own;
            let s = match s {
                Some(s) => s,
                None => {
                    own = Login::new("iqn.2026-11.io.ironlun:reader-0")
                        .target(TARGET)
                        .ready(&[], 0)
                        .connect(g.addrs[0])
                        .await;
                    &own
                }
            };
            let cdb = pr::in_cdb(pr::InAction::ReadKeys, 4096);
            let (r, _) = ironlun_testkit::past_ua(s, 0, &cdb, Bytes::new(), 4096).await;
            assert_eq!(r.status, 0, "READ KEYS");
            pr::Keys::parse(&r.data).expect("READ KEYS parses")
        });
        seen.push(keys);
    }
    println!("READ KEYS through A, B, C: {seen:?}");
    assert!(seen.windows(2).all(|w| w[0] == w[1]), "{seen:?}");
    drop(sessions);
    for g in gws {
        g.stop();
    }
}
