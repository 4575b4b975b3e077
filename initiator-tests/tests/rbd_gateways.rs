//! Two release gateways in cluster mode serving one RBD LUN (issue 18, acceptance 4): a
//! one-node Ceph, three etcd members and gw-a, gw-b on loopback, started by the test.
//!
//! A (the lowest gateway) is active and holds the image's exclusive lock; writers run on it.
//! A is stalled (SIGSTOP) with writes in flight. Once its lease is gone plus Δ, B takes over:
//! it breaks A's RBD lock, which blocklists A's client (checked on `ceph osd blocklist ls`
//! against the address A logged when it opened the image), and only then reports itself
//! active/optimized. B overwrites the writers' blocks. A is resumed: every write it still
//! completes fails (never GOOD), and reading through B shows B's data everywhere, so none of
//! A's late writes reached the medium. The lock-break time is B's own measure, from its log.
//!
//! Planned moves (`ironlun ctl cluster move`) take the lock each way: B's take blocklists
//! A's client, and A, moved back, connects as a new client and fences B.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::cast_possible_truncation
)]

use bytes::Bytes;
use ironlun_initiator::{CommandResult, Session};
use ironlun_testkit::{
    strip_ansi, wait_rtpg, Ceph, Daemon, EtcdCluster, Gateways, AO, PROMPT, STANDBY,
};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const TARGET: &str = "iqn.2026-11.io.ironlun:rbd";
const LUN0: u64 = 0;
const BS: usize = 512;
/// T = 3 s, Δ = 0.5 s, as the daemon tests' fast timing.
const FAST: &str = "lease_ttl_ms = 3000\nkeepalive_interval_ms = 500\nmargin_ms = 300\n\
lock_delay_ms = 500\netcd_timeout_ms = 400\n";
const WRITERS: u64 = 8;
/// Each writer's chunk: 8 blocks at LBA `w * CHUNK`.
const CHUNK: u64 = 64;
const BLOCKS: u32 = 8;

async fn login(addr: SocketAddr, isid: u8) -> Session {
    let isid = [0x80, 0x49, 0x4c, 0x4e, 0x00, isid];
    ironlun_testkit::login_cleared(addr, TARGET, "iqn.2026-11.io.ironlun:host", isid).await
}

async fn write(s: &Session, lba: u64, fill: u8) -> CommandResult {
    let cdb = ironlun_initiator::scsi::write16_cdb(lba, BLOCKS, false);
    let data = Bytes::from(vec![fill; BLOCKS as usize * BS]);
    match s.command(LUN0, &cdb, data, 0).await {
        Ok(r) => r,
        // The connection ended: not GOOD either.
        Err(_) => CommandResult {
            response: 1,
            ..CommandResult::default()
        },
    }
}

async fn read(s: &Session, lba: u64) -> Bytes {
    let cdb = ironlun_initiator::scsi::read16_cdb(lba, BLOCKS);
    let r = ironlun_testkit::past_ua(s, LUN0, &cdb, Bytes::new(), BLOCKS * BS as u32)
        .await
        .0;
    assert_eq!(r.status, 0, "READ at {lba}: {:?}", r.sense_key());
    r.data
}

/// What one writer saw: (fill byte, GOOD, when it was sent, when it completed).
type Outcomes = Vec<(u8, bool, Instant, Instant)>;

/// Writer `w` on its own session: its chunk over and over with fill bytes 1, 2, … until
/// `stop` or until its connection ends.
fn writer(s: Session, w: u64, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Outcomes> {
    tokio::spawn(async move {
        let mut out = Vec::new();
        let mut fill = 0u8;
        while !stop.load(Ordering::Acquire) {
            fill = fill.wrapping_add(1).max(1);
            let sent = Instant::now();
            let r = write(&s, w * CHUNK, fill).await;
            out.push((fill, r.response == 0 && r.status == 0, sent, Instant::now()));
            if r.response != 0 {
                break; // the connection is gone
            }
        }
        out
    })
}

/// The log lines about the RBD image and the ALUA state, for failure reports.
fn rbd_lines(log: &str) -> String {
    log.lines()
        .filter(|l| l.contains("rbd") || l.contains("ALUA") || l.contains("fence"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The value of `key=` on the last line of `log` containing `what`.
fn field(log: &str, what: &str, key: &str) -> Option<String> {
    let line = log.lines().rev().find(|l| l.contains(what))?;
    let at = line.find(&format!("{key}="))? + key.len() + 1;
    let v = line[at..].split_whitespace().next()?;
    Some(v.trim_matches('"').to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_gateway_is_fenced_by_the_rbd_lock_when_another_takes_over() {
    let ceph = Ceph::start();
    let etcd = EtcdCluster::start(3);
    let medium = format!(
        "backstore = \"rbd\"\nimage = \"lun0\"\nceph_conf = \"{}\"",
        ceph.conf().display()
    );
    let spec = Gateways {
        n: 2,
        target: TARGET,
        image: Path::new("rbd/lun0"),
        size: "64MiB",
        cluster: "rbd",
        extra: FAST,
    };
    let builder = || Daemon::release().env("RUST_LOG", "info");
    let mut gws = spec.start_on(builder, &etcd, &medium);
    let (a, b) = (
        login(gws[0].addrs[0], 1).await,
        login(gws[1].addrs[0], 2).await,
    );
    let a_active = [(1, AO), (2, STANDBY)];
    wait_rtpg(&a, &a_active, PROMPT).await;
    wait_rtpg(&b, &a_active, PROMPT).await;
    assert!(
        ceph.blocklist().is_empty(),
        "blocklist before: {:?}",
        ceph.blocklist()
    );
    let a_log = strip_ansi(&gws[0].stderr());
    let a_addrs = field(&a_log, "rbd image open", "addrs").expect("A logs its rbd client");

    // Writers on A, then A stalls with writes in flight.
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let s = login(gws[0].addrs[0], 0x10 + w as u8).await;
        writers.push(writer(s, w, Arc::clone(&stop)));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    gws[0].signal("STOP");
    let stalled = Instant::now();

    // B takes over: A's lease expires (T 3 s), Δ passes, B breaks A's lock, then serves.
    let b_active = [(1, STANDBY), (2, AO)];
    wait_rtpg(&b, &b_active, Duration::from_secs(30)).await;
    let took_over = stalled.elapsed();
    let listed = ceph.blocklist();
    assert!(
        listed
            .iter()
            .any(|l| a_addrs.contains(l.as_str()) || l.contains(a_addrs.as_str())),
        "A's client {a_addrs} is not on the blocklist {listed:?} ({})\nA: {}\nB: {}",
        ceph.ceph(&["osd", "blocklist", "ls"]),
        rbd_lines(&strip_ansi(&gws[0].stderr())),
        rbd_lines(&strip_ansi(&gws[1].stderr()))
    );
    let b_log = strip_ansi(&gws[1].stderr());
    let broke =
        field(&b_log, "broke the exclusive lock", "took").expect("B logs breaking A's lock");
    eprintln!(
        "B active {took_over:?} after A's SIGSTOP; its lock break and acquire took {broke}; \
         blocklist {listed:?}"
    );

    // B writes every writer's chunk.
    for w in 0..WRITERS {
        let r = ironlun_testkit::past_ua(
            &b,
            LUN0,
            &ironlun_initiator::scsi::write16_cdb(w * CHUNK, BLOCKS, true),
            Bytes::from(vec![0xB0; BLOCKS as usize * BS]),
            0,
        )
        .await
        .0;
        assert_eq!(r.status, 0, "WRITE through B: {:?}", r.sense_key());
    }
    let b_wrote = Instant::now();

    // A resumes. A write sent before the stall and answered after it may be GOOD only if it
    // landed before the fence (then B's write covers it: checked below); one sent after the
    // resume must fail.
    stop.store(true, Ordering::Release);
    let resumed = Instant::now();
    gws[0].signal("CONT");
    let (mut stalled_writes, mut stalled_good, mut after) = (0, 0, 0);
    for (w, h) in writers.into_iter().enumerate() {
        let outcomes = tokio::time::timeout(Duration::from_secs(60), h)
            .await
            .expect("A's writers end")
            .unwrap();
        for (fill, good, sent, done) in outcomes {
            if sent > resumed {
                after += 1;
                assert!(
                    !good,
                    "writer {w}: fill {fill}, sent after the resume, acknowledged GOOD"
                );
            } else if done > b_wrote {
                stalled_writes += 1;
                stalled_good += usize::from(good);
            }
        }
    }
    // A write sent to A now, after the resume, fails too.
    let r = write(&a, 0, 0xA5).await;
    assert!(
        !(r.response == 0 && r.status == 0),
        "a write through A after the resume was acknowledged"
    );
    after += 1;
    for w in 0..WRITERS {
        let got = read(&b, w * CHUNK).await;
        assert!(
            got.iter().all(|&x| x == 0xB0),
            "writer {w}'s chunk changed after B wrote it: {:?}",
            &got[..16]
        );
    }
    let a_log = strip_ansi(&gws[0].stderr());
    let fenced = a_log.matches("fenced by the storage").count();
    eprintln!(
        "A after the resume: {stalled_writes} writes in flight across the stall answered \
         ({stalled_good} GOOD, answered late; B's write covers them), {after} sent after it, none \
         GOOD; {fenced} refused by the storage (blocklisted) rather than by A's own deadline; \
         B's data intact"
    );
    assert_eq!(write(&b, 0, 0xB1).await.status, 0);
    gws.remove(0).kill9();
}

fn good(r: &CommandResult) -> bool {
    r.response == 0 && r.status == 0
}

/// `ironlun ctl cluster move` to B, then back to A: each time the old active gateway releases
/// the lock (or, if the new one gets there first, has it broken), the new one takes it and
/// serves, and the old one's writes fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moves_by_ctl_hand_the_lock_over_each_way() {
    let ceph = Ceph::start();
    let etcd = EtcdCluster::start(3);
    let medium = format!(
        "backstore = \"rbd\"\nimage = \"lun0\"\nceph_conf = \"{}\"",
        ceph.conf().display()
    );
    let spec = Gateways {
        n: 2,
        target: TARGET,
        image: Path::new("rbd/lun0"),
        size: "64MiB",
        cluster: "rbdmove",
        extra: FAST,
    };
    let builder = || Daemon::release().env("RUST_LOG", "info");
    let gws = spec.start_on(builder, &etcd, &medium);
    let (a, b) = (
        login(gws[0].addrs[0], 1).await,
        login(gws[1].addrs[0], 2).await,
    );
    let a_active = [(1, AO), (2, STANDBY)];
    let b_active = [(1, STANDBY), (2, AO)];
    wait_rtpg(&a, &a_active, PROMPT).await;
    assert!(good(&write(&a, 0, 1).await));
    let sessions = [&a, &b];
    for (round, (to, from, want)) in [(1, 0, &b_active), (0, 1, &a_active)]
        .into_iter()
        .enumerate()
    {
        let fill = 2 + round as u8;
        gws[0].ctl(&[
            "cluster",
            "move",
            TARGET,
            "0",
            &ironlun_testkit::gateway_name(to),
        ]);
        wait_rtpg(sessions[to], want, PROMPT).await;
        let r = ironlun_testkit::past_ua(
            sessions[to],
            LUN0,
            &ironlun_initiator::scsi::write16_cdb(0, BLOCKS, true),
            Bytes::from(vec![fill; BLOCKS as usize * BS]),
            0,
        )
        .await
        .0;
        assert!(
            good(&r),
            "round {round}: WRITE through the new active gateway: {:?}",
            r.sense_key()
        );
        assert!(
            !good(&write(sessions[from], 0, 9).await),
            "round {round}: the old active gateway wrote"
        );
        assert_eq!(
            &read(sessions[to], 0).await[..],
            &vec![fill; BLOCKS as usize * BS][..]
        );
    }
    let broken = gws
        .iter()
        .map(|g| {
            strip_ansi(&g.stderr())
                .matches("broke the exclusive lock")
                .count()
        })
        .sum::<usize>();
    eprintln!(
        "two moves: {broken} lock(s) broken, the rest released; blocklist {:?}",
        ceph.blocklist()
    );
}
