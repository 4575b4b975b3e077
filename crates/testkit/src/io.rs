//! Data for tests to write, and I/O that goes on while a test does something else.

use crate::{session, BLOCK_SIZE, PROMPT};
use bytes::Bytes;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A deterministic block pattern: every byte depends on `seed` and its offset.
pub fn pattern(seed: u64, len: usize) -> Bytes {
    let mut v = Vec::with_capacity(len);
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for _ in 0..len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.push((x >> 24) as u8);
    }
    Bytes::from(v)
}

/// 4 KiB tagged with (`writer`, `seq`): the two numbers big-endian, repeated.
pub fn tagged(writer: u64, seq: u64) -> Bytes {
    let mut v = Vec::with_capacity(4096);
    while v.len() < 4096 {
        v.extend_from_slice(&writer.to_be_bytes());
        v.extend_from_slice(&seq.to_be_bytes());
    }
    Bytes::from(v)
}

/// Another session doing write + read-back rounds for as long as a test runs.
pub struct BackgroundIo {
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<Result<u64, String>>,
}

impl BackgroundIo {
    /// Log in as `initiator` and loop over 64 KiB writes (alternating FUA) and reads at `lba`.
    pub async fn start(addr: SocketAddr, initiator: &str, lba: u64) -> BackgroundIo {
        let s = session(addr, initiator).await;
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicU64::new(0));
        let (stop2, rounds2) = (stop.clone(), rounds.clone());
        let task = tokio::spawn(async move {
            let mut n = 0u64;
            loop {
                let data = pattern(n ^ lba, 64 * 1024);
                let blocks = 128u32;
                let w = tokio::time::timeout(
                    PROMPT,
                    s.write16(0, lba, BLOCK_SIZE, data.clone(), n & 1 == 0),
                )
                .await
                .map_err(|_| format!("round {n}: write timed out"))?
                .map_err(|e| format!("round {n}: write: {e}"))?;
                if w.status != 0 || w.response != 0 {
                    return Err(format!(
                        "round {n}: write status {:#x} response {}",
                        w.status, w.response
                    ));
                }
                let r = tokio::time::timeout(PROMPT, s.read16(0, lba, blocks, BLOCK_SIZE))
                    .await
                    .map_err(|_| format!("round {n}: read timed out"))?
                    .map_err(|e| format!("round {n}: read: {e}"))?;
                if r.status != 0 || r.data != data {
                    return Err(format!(
                        "round {n}: read status {:#x}, data equal: {}",
                        r.status,
                        r.data == data
                    ));
                }
                n += 1;
                rounds2.store(n, Ordering::SeqCst);
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
            }
            s.logout().await.map_err(|e| format!("logout: {e}"))?;
            Ok(n)
        });
        BackgroundIo { stop, rounds, task }
    }

    /// Rounds completed so far.
    pub fn rounds(&self) -> u64 {
        self.rounds.load(Ordering::SeqCst)
    }

    /// Wait until at least `more` further rounds complete (proof that I/O goes on now).
    pub async fn progress(&self, more: u64) {
        let target = self.rounds() + more;
        let deadline = Instant::now() + PROMPT;
        while self.rounds() < target {
            assert!(
                Instant::now() < deadline,
                "background I/O stalled at {} rounds",
                self.rounds()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stop after the current round and assert every round succeeded.
    pub async fn finish(self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        let n = tokio::time::timeout(PROMPT * 2, self.task)
            .await
            .expect("background I/O did not stop")
            .expect("background task panicked")
            .unwrap_or_else(|e| panic!("background I/O failed: {e}"));
        assert!(n >= 1, "no background round completed");
        n
    }
}
