//! COMPARE AND WRITE atomicity end to end (issue 8 acceptance 2): two initiators on two
//! portals of one daemon race COMPARE AND WRITE on the same block 10,000 times; each round
//! exactly one wins (GOOD) and the other gets MISCOMPARE, and a third session reading the
//! block all along never sees a mix of two values. Also: no range stays locked after a LUN
//! RESET and after a session carrying pipelined COMPARE AND WRITEs drops its connection.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::cast_possible_truncation
)]

use bytes::Bytes;
use ironlun_initiator::{CommandResult, Session, TmfFunction, TmfResponse};
use ironlun_testkit::{Daemon, Login, PROMPT};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const IRONLUN: &str = env!("CARGO_BIN_EXE_ironlun");

const TARGET: &str = "iqn.2026-11.io.ironlun:caw";
const LUN0: u64 = 0;
const BS: u32 = 512;
const LBA: u64 = 77;
const ROUNDS: u32 = 10_000;

const GOOD: u8 = 0x00;
const CHECK_CONDITION: u8 = 0x02;
/// Sense key MISCOMPARE, ASC/ASCQ MISCOMPARE DURING VERIFY OPERATION (SBC-3 §5.2).
const MISCOMPARE: (u8, u8, u8) = (0x0E, 0x1D, 0x00);

/// Two portal groups (tpgt 1 and 2) on 127.0.0.1, one RAM LUN.
fn config() -> String {
    let mut c = String::new();
    for t in [1, 2] {
        c.push_str(&format!(
            "[[portal]]\nlisten = \"127.0.0.1:0\"\ntpgt = {t}\n"
        ));
    }
    c.push_str(&format!(
        "[[target]]\nname = \"{TARGET}\"\n[[target.lun]]\nid = 0\nbackstore = \"ram\"\nsize = \"16MiB\"\nserial = \"caw0\"\n"
    ));
    c
}

/// Log in as `name` through `addr`, past the power-on unit attention.
async fn login(addr: SocketAddr, name: &str) -> Session {
    Login::new(name)
        .target(TARGET)
        .ready(&[LUN0], 8)
        .connect(addr)
        .await
}

/// The block holding value `v`: the 8-byte word `v` repeated, so that a block made of parts
/// of two values is recognisable.
fn block(v: u64) -> Vec<u8> {
    v.to_be_bytes().repeat(BS as usize / 8)
}

/// The value a block holds, or `None` if it is a mix (torn).
fn value(b: &[u8]) -> Option<u64> {
    let first: [u8; 8] = b.get(..8)?.try_into().ok()?;
    b.chunks_exact(8)
        .all(|w| w == first)
        .then(|| u64::from_be_bytes(first))
}

fn is_miscompare(r: &CommandResult) -> bool {
    r.status == CHECK_CONDITION
        && r.sense_key()
            .is_some_and(|k| (k.key, k.asc, k.ascq) == MISCOMPARE)
}

async fn caw(s: &Session, expected: u64, new: u64) -> CommandResult {
    tokio::time::timeout(
        PROMPT * 2,
        s.compare_and_write(LUN0, LBA, BS, &block(expected), &block(new), false),
    )
    .await
    .expect("COMPARE AND WRITE hung")
    .expect("COMPARE AND WRITE")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn two_portals_race_compare_and_write_one_winner_per_round_no_torn_reads() {
    let d = Daemon::builder(IRONLUN).portals().config(&config()).start();
    assert_eq!(d.addrs.len(), 2, "two portals: {:?}", d.addrs);
    let a = login(d.addrs[0], "iqn.2026-11.io.ironlun:caw-a").await;
    let b = login(d.addrs[1], "iqn.2026-11.io.ironlun:caw-b").await;
    let r = login(d.addrs[0], "iqn.2026-11.io.ironlun:caw-r").await;
    a.write16(LUN0, LBA, BS, Bytes::from(block(0)), false)
        .await
        .unwrap()
        .good()
        .unwrap();

    // The reader: every read is one whole value, never a mix.
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let reader = {
        let (stop, reads) = (stop.clone(), reads.clone());
        tokio::spawn(async move {
            let mut last = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let got = r.read16(LUN0, LBA, 1, BS).await.unwrap().good().unwrap();
                let v = value(&got.data)
                    .unwrap_or_else(|| panic!("torn block read: {:02x?}", &got.data[..]));
                // Values only grow: each round's winner writes a larger one.
                assert!(v >= last, "read {v:#x} after {last:#x}");
                last = v;
                reads.fetch_add(1, Ordering::Relaxed);
            }
        })
    };

    let started = Instant::now();
    let mut current = 0u64;
    let mut wins = [0u32; 2];
    for round in 1..=u64::from(ROUNDS) {
        // Distinct new values per side, both above every earlier value.
        let (va, vb) = (round << 8 | 0xA, round << 8 | 0xB);
        let both = async { tokio::join!(caw(&a, current, va), caw(&b, current, vb)) };
        let Ok((ra, rb)) = tokio::time::timeout(PROMPT, both).await else {
            let e = d.stderr();
            panic!(
                "round {round} hung; daemon stderr ends:\n{}",
                &e[e.len().saturating_sub(6000)..]
            );
        };
        match (ra.status, rb.status) {
            (GOOD, CHECK_CONDITION) if is_miscompare(&rb) => {
                current = va;
                wins[0] += 1;
            }
            (CHECK_CONDITION, GOOD) if is_miscompare(&ra) => {
                current = vb;
                wins[1] += 1;
            }
            _ => panic!("round {round}: not exactly one winner: A {ra:?} B {rb:?}"),
        }
    }
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    tokio::time::timeout(PROMPT, reader)
        .await
        .expect("reader hung")
        .expect("reader");
    let got = a.read16(LUN0, LBA, 1, BS).await.unwrap().good().unwrap();
    assert_eq!(value(&got.data), Some(current));
    eprintln!(
        "{ROUNDS} rounds in {elapsed:?}: A won {}, B won {}; {} concurrent reads, none torn",
        wins[0],
        wins[1],
        reads.load(Ordering::Relaxed)
    );
    assert!(reads.load(Ordering::Relaxed) > 0);
}

/// Pipelined COMPARE AND WRITEs from one session, then a LUN RESET from another, then the first
/// session's connection dropped mid-stream: the LU's range lock is never left held — the other
/// session's COMPARE AND WRITE, WRITE and READ complete promptly afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lun_reset_and_a_dropped_session_leave_no_range_locked() {
    let d = Daemon::builder(IRONLUN).portals().config(&config()).start();
    let a = login(d.addrs[0], "iqn.2026-11.io.ironlun:caw-a").await;
    let b = login(d.addrs[1], "iqn.2026-11.io.ironlun:caw-b").await;
    b.write16(LUN0, LBA, BS, Bytes::from(block(1)), false)
        .await
        .unwrap()
        .good()
        .unwrap();
    let cdb = ironlun_initiator::scsi::compare_and_write_cdb(LBA, 1, false);
    let mut data = block(1);
    data.extend(block(1));
    let data = Bytes::from(data);
    let mut pending = Vec::new();
    for _ in 0..64 {
        pending.push(a.start_command(LUN0, &cdb, data.clone(), 0).await.unwrap());
    }
    let reset = b
        .task_mgmt(TmfFunction::LogicalUnitReset, LUN0, 0)
        .await
        .unwrap();
    assert_eq!(reset, TmfResponse::FunctionComplete);
    // More in flight, then the connection goes without waiting for any of them.
    for _ in 0..64 {
        pending.push(a.start_command(LUN0, &cdb, data.clone(), 0).await.unwrap());
    }
    drop(pending);
    drop(a);
    tokio::time::sleep(Duration::from_millis(50)).await;
    // B: past the reset's unit attention, then every kind of command goes through.
    let mut r = caw(&b, 1, 2).await;
    for _ in 0..4 {
        if r.sense_key().is_some_and(|k| k.key == 0x06) {
            r = caw(&b, 1, 2).await;
        }
    }
    assert_eq!(r.status, GOOD, "{r:?}");
    let w = tokio::time::timeout(
        PROMPT,
        b.write16(LUN0, LBA + 1, BS, Bytes::from(block(3)), false),
    )
    .await
    .expect("WRITE hung")
    .unwrap();
    assert_eq!(w.status, GOOD);
    let got = tokio::time::timeout(PROMPT, b.read16(LUN0, LBA, 2, BS))
        .await
        .expect("READ hung")
        .unwrap()
        .good()
        .unwrap();
    assert_eq!(value(&got.data[..BS as usize]), Some(2));
    assert_eq!(value(&got.data[BS as usize..]), Some(3));
}
