//! The io_uring backstore under load: random op sequences against the RAM backstore,
//! concurrent submitters, and futures (and the backend itself) dropped while their I/O is in
//! flight. Under AddressSanitizer:
//! `RUSTFLAGS=-Zsanitizer=address RUSTC_BOOTSTRAP=1 cargo test -p ironlun-backstore
//! --target x86_64-unknown-linux-gnu --test uring`. (Miri cannot run io_uring syscalls.)
#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::cast_possible_truncation
)]

use std::path::Path;

use bytes::Bytes;
use ironlun_backstore::{
    BackstoreError, BlockBackend, FileBackend, FileOptions, IoFuture, RamBackend, UringBackend,
    UringOptions,
};
use proptest::prelude::*;

/// A position-dependent pattern, so misplaced bytes are noticed.
fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i % 251) as u8).wrapping_mul(13) | 1)
        .collect()
}

fn open(path: &Path, size: u64, direct: bool, ring_depth: u32) -> UringBackend {
    UringBackend::open(
        path,
        UringOptions {
            size: Some(size),
            create: true,
            direct,
            ring_depth,
            ..UringOptions::default()
        },
    )
    .unwrap()
}

const PROP_SIZE: u64 = 1 << 20;

#[derive(Debug, Clone)]
enum Op {
    Write {
        offset: u64,
        len: u64,
        seed: u8,
        fua: bool,
    },
    /// Several writes submitted together, then awaited in reverse order.
    Batch(Vec<(u64, u64, u8)>),
    Unmap {
        offset: u64,
        len: u64,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        unmap: bool,
    },
    Read {
        offset: u64,
        len: u64,
    },
    Flush,
}

/// Offsets mostly inside, sometimes past the end; lengths small, block-sized or large.
fn range() -> impl Strategy<Value = (u64, u64)> {
    (
        prop_oneof![0..PROP_SIZE + 4096, (0..256u64).prop_map(|b| b * 4096)],
        prop_oneof![0..600u64, (1..32u64).prop_map(|b| b * 4096), 0..300_000u64],
    )
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (range(), any::<u8>(), any::<bool>())
            .prop_map(|((offset, len), seed, fua)| Op::Write { offset, len, seed, fua }),
        2 => prop::collection::vec((range(), any::<u8>()), 1..8)
            .prop_map(|v| Op::Batch(v.into_iter().map(|((o, l), s)| (o, l, s)).collect())),
        1 => range().prop_map(|(offset, len)| Op::Unmap { offset, len }),
        1 => (range(), any::<bool>())
            .prop_map(|((offset, len), unmap)| Op::WriteZeroes { offset, len, unmap }),
        3 => range().prop_map(|(offset, len)| Op::Read { offset, len }),
        1 => Just(Op::Flush),
    ]
}

/// Outcome of one op: bytes read, or which sub-operations failed with `OutOfRange`.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Read(Vec<u8>),
    Done(Vec<bool>),
}

fn range_error<T>(r: ironlun_backstore::Result<T>, what: &Op) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(BackstoreError::OutOfRange { .. }) => None,
        Err(e) => panic!("{what:?}: {e}"),
    }
}

fn apply<B: BlockBackend>(b: &B, op: &Op) -> Outcome {
    match op {
        Op::Write {
            offset,
            len,
            seed,
            fua,
        } => {
            let data = Bytes::from(pattern(*seed, *len as usize));
            Outcome::Done(vec![range_error(
                b.write_async(*offset, data, *fua).wait(),
                op,
            )
            .is_none()])
        }
        Op::Batch(writes) => {
            // Overlapping writes in one batch may land in any order: keep them disjoint by
            // applying only the ones that do not overlap an earlier one in the batch.
            let futures: Vec<IoFuture<()>> = disjoint(writes)
                .iter()
                .map(|&(o, l, s)| b.write_async(o, Bytes::from(pattern(s, l as usize)), false))
                .collect();
            Outcome::Done(
                futures
                    .into_iter()
                    .rev()
                    .map(|f| range_error(f.wait(), op).is_none())
                    .collect(),
            )
        }
        Op::Unmap { offset, len } => {
            Outcome::Done(vec![range_error(b.unmap(*offset, *len), op).is_none()])
        }
        Op::WriteZeroes { offset, len, unmap } => {
            Outcome::Done(vec![
                range_error(b.write_zeroes(*offset, *len, *unmap), op).is_none()
            ])
        }
        Op::Read { offset, len } => {
            match range_error(b.read_async(*offset, *len as usize).wait(), op) {
                Some(d) => Outcome::Read(d.to_vec()),
                None => Outcome::Done(vec![true]),
            }
        }
        Op::Flush => Outcome::Done(vec![range_error(b.flush_async().wait(), op).is_none()]),
    }
}

/// The writes of a batch that overlap no earlier write of it.
fn disjoint(writes: &[(u64, u64, u8)]) -> Vec<(u64, u64, u8)> {
    let mut kept: Vec<(u64, u64, u8)> = Vec::new();
    for &(o, l, s) in writes {
        let end = o.saturating_add(l);
        if kept
            .iter()
            .all(|&(ko, kl, _)| end <= ko || o >= ko.saturating_add(kl))
        {
            kept.push((o, l, s));
        }
    }
    kept
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// The io_uring backstore (buffered and O_DIRECT) and the RAM backstore agree on every
    /// read and every range error, whatever the order of submission.
    #[test]
    fn random_ops_agree_with_ram(ops in prop::collection::vec(op(), 1..24), direct in any::<bool>()) {
        let dir = tempfile::tempdir().unwrap();
        let uring = open(&dir.path().join("lu.img"), PROP_SIZE, direct, 4);
        let ram = RamBackend::new(PROP_SIZE).unwrap();
        for (i, op) in ops.iter().enumerate() {
            let want = apply(&ram, op);
            prop_assert_eq!(apply(&uring, op), want, "op {} {:?}", i, op);
        }
        prop_assert!(uring.read(0, PROP_SIZE as usize).unwrap() == ram.read(0, PROP_SIZE as usize).unwrap());
    }
}

/// Eight threads each keep many async reads and writes in flight through a small ring
/// (back-pressure on the queue), then check their own region.
#[test]
fn concurrent_submitters_from_8_threads() {
    const THREADS: u64 = 8;
    const REGION: u64 = 128 << 10;
    const ROUNDS: u8 = 6;
    for direct in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let b = open(&dir.path().join("lu.img"), THREADS * REGION, direct, 8);
        std::thread::scope(|s| {
            for t in 0..THREADS {
                let b = &b;
                s.spawn(move || {
                    let base = t * REGION;
                    for round in 0..ROUNDS {
                        let seed = (t as u8).wrapping_mul(40).wrapping_add(round);
                        // 32 block writes of 4 KiB, odd-sized reads in between, all in flight.
                        let writes: Vec<_> = (0..32u64)
                            .map(|i| {
                                let data = pattern(seed.wrapping_add(i as u8), 4096);
                                b.write_async(base + i * 4096, Bytes::from(data), i % 7 == 0)
                            })
                            .collect();
                        let reads: Vec<_> = (0..8u64)
                            .map(|i| b.read_async(base + i * 1000 + 3, 777))
                            .collect();
                        for w in writes {
                            w.wait().unwrap();
                        }
                        for r in reads {
                            assert_eq!(r.wait().unwrap().len(), 777);
                        }
                        if round % 3 == 0 {
                            b.flush_async().wait().unwrap();
                        }
                        for i in 0..32u64 {
                            let got = b.read(base + i * 4096, 4096).unwrap();
                            assert_eq!(got, pattern(seed.wrapping_add(i as u8), 4096));
                        }
                    }
                });
            }
        });
    }
}

/// Each 512-byte sector of `got` equals the same sector of one of `candidates`.
fn sectors_from(got: &[u8], candidates: &[Vec<u8>]) -> bool {
    got.chunks(512).enumerate().all(|(i, sector)| {
        candidates
            .iter()
            .any(|c| c.get(i * 512..i * 512 + sector.len()) == Some(sector))
    })
}

/// Futures dropped at once, and the backend dropped with requests queued and in flight: no
/// crash; every write that was under way when its future was dropped completes (dropping only
/// discards results), every write still waiting for room in the small ring is cancelled and
/// never lands; overlapping writes leave each sector from one of them (or untouched).
#[test]
fn dropped_futures_and_backend_in_flight() {
    const SIZE: u64 = 4 << 20;
    for direct in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lu.img");
        let b = open(&path, SIZE, direct, 4);
        // Disjoint writes, futures dropped immediately; reads dropped too.
        let mut under_way = Vec::new();
        for i in 0..256u64 {
            let w = b.write_async(i * 8192, Bytes::from(pattern(i as u8, 8192)), i % 5 == 0);
            under_way.push(!w.is_waiting());
            drop(w);
            drop(b.read_async(SIZE - 65_536, 65_536));
        }
        assert!(under_way[0], "the first write finds room");
        // Overlapping writes to one 64 KiB range, dropped.
        let mut overlapping: Vec<Vec<u8>> = (0..16u8).map(|s| pattern(200 + s, 65_536)).collect();
        for data in &overlapping {
            drop(b.write_async(3 << 20, Bytes::from(data.clone()), false));
        }
        overlapping.push(vec![0; 65_536]);
        drop(b.flush_async());
        // Drop the backend with more requests queued and in flight.
        let mut late_under_way = Vec::new();
        for i in 0..64u64 {
            let w = b.write_async(
                (2 << 20) + i * 4096,
                Bytes::from(pattern(100 + i as u8, 4096)),
                false,
            );
            late_under_way.push(!w.is_waiting());
            drop(w);
        }
        let pending_read = b.read_async(0, 1 << 20);
        let read_under_way = !pending_read.is_waiting();
        drop(b);
        // A future outliving its backend resolves: with the data if its request was under way
        // (dropping drained the ring), with an error if it was still waiting for room.
        match pending_read.wait() {
            Ok(data) => {
                assert!(read_under_way);
                assert_eq!(data.len(), 1 << 20);
            }
            Err(e) => assert!(!read_under_way, "{e}"),
        }

        let f = FileBackend::open(&path, FileOptions::default()).unwrap();
        for i in 0..256u64 {
            let want = if under_way[i as usize] {
                pattern(i as u8, 8192)
            } else {
                vec![0; 8192]
            };
            assert!(f.read(i * 8192, 8192).unwrap() == want, "write {i}");
        }
        for i in 0..64u64 {
            let want = if late_under_way[i as usize] {
                pattern(100 + i as u8, 4096)
            } else {
                vec![0; 4096]
            };
            assert!(
                f.read((2 << 20) + i * 4096, 4096).unwrap() == want,
                "late write {i}"
            );
        }
        assert!(sectors_from(
            &f.read(3 << 20, 65_536).unwrap(),
            &overlapping
        ));
    }
}

/// Many tasks of one current-thread runtime (as the daemon's shards run them) keep reads and
/// writes in flight through a 2-deep ring: all complete, with the right data, while another
/// task on the same thread keeps running (a submitter waiting for room never blocks it).
#[test]
fn a_tiny_ring_does_not_block_a_current_thread_runtime() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    const TASKS: u64 = 48;
    const BLOCKS: u64 = 8;
    for direct in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let b = Arc::new(open(
            &dir.path().join("lu.img"),
            TASKS * BLOCKS * 4096,
            direct,
            2,
        ));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let ticks = Arc::new(AtomicUsize::new(0));
            let ticker = {
                let ticks = Arc::clone(&ticks);
                tokio::spawn(async move {
                    loop {
                        ticks.fetch_add(1, Ordering::Relaxed);
                        tokio::task::yield_now().await;
                    }
                })
            };
            let tasks: Vec<_> = (0..TASKS)
                .map(|t| {
                    let b = Arc::clone(&b);
                    let ticks = Arc::clone(&ticks);
                    tokio::spawn(async move {
                        let base = t * BLOCKS * 4096;
                        let mut progress = 0;
                        for round in 0..4u8 {
                            let seed = (t as u8).wrapping_mul(7).wrapping_add(round);
                            let writes: Vec<_> = (0..BLOCKS)
                                .map(|i| {
                                    let data =
                                        Bytes::from(pattern(seed.wrapping_add(i as u8), 4096));
                                    b.write_async(base + i * 4096, data, i == 0)
                                })
                                .collect();
                            for w in writes {
                                w.await.unwrap();
                            }
                            let reads: Vec<_> = (0..BLOCKS)
                                .map(|i| b.read_async(base + i * 4096, 4096))
                                .collect();
                            for (i, r) in reads.into_iter().enumerate() {
                                let want = pattern(seed.wrapping_add(i as u8), 4096);
                                assert!(r.await.unwrap() == want, "task {t} block {i}");
                            }
                            progress = ticks.load(Ordering::Relaxed);
                        }
                        progress
                    })
                })
                .collect();
            let mut last = 0;
            for t in tasks {
                last = last.max(t.await.unwrap());
            }
            // The ticker ran between the submissions (it yields after every tick).
            assert!(last > 10, "the ticker made {last} ticks");
            ticker.abort();
        });
    }
}

/// Backends opened and dropped repeatedly with I/O in flight leave no thread or ring behind
/// that breaks the next one.
#[test]
fn open_drop_cycles_with_io_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lu.img");
    for cycle in 0..50u8 {
        let b = open(&path, 1 << 20, cycle % 2 == 0, 2);
        let _kept: Vec<_> = (0..16u64)
            .map(|i| b.write_async(i * 4096, Bytes::from(pattern(cycle, 4096)), false))
            .collect();
        drop(b);
    }
    let f = FileBackend::open(&path, FileOptions::default()).unwrap();
    assert_eq!(f.read(0, 4096).unwrap(), pattern(49, 4096));
}
