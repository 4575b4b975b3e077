//! The victim side of a PREEMPT AND ABORT test (SPC-4 §5.13.11.2.6): writers that keep
//! overwriting their own chunk of tagged blocks through one session until a while after the
//! preemption, the record of every command, and the checks that hold for them. Used by the
//! one-node test (`crates/ironlun/tests/pr_daemon.rs`) and the cluster test
//! (`crates/ironlun/tests/cluster_gateways.rs`).

use crate::{BLOCK_SIZE, PROMPT};
use bytes::Bytes;
use ironlun_initiator::{SenseKey, Session};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

const GOOD: u8 = 0x00;
const CHECK_CONDITION: u8 = 0x02;
const RESERVATION_CONFLICT: u8 = 0x18;
const TASK_ABORTED: u8 = 0x40;

/// The writer id the preemptor tags its overwrite with.
pub const PREEMPTOR: u16 = 0xffff;

/// `writers` writers, each on its own chunk of `chunk_blocks` 512-byte blocks of LUN 0,
/// every block tagged with `magic`, the writer id, the sequence number and its LBA.
#[derive(Debug, Clone, Copy)]
pub struct Victims {
    pub writers: u16,
    pub chunk_blocks: u32,
    pub magic: &'static [u8; 8],
}

/// One victim command as the victim saw it.
#[derive(Debug)]
pub struct Rec {
    pub writer: u16,
    pub seq: u32,
    /// Sent after the PREEMPT AND ABORT had returned GOOD.
    pub after_good: bool,
    pub sent: Instant,
    pub done: Instant,
    pub status: u8,
    pub sense: Option<SenseKey>,
}

/// Unit attentions a preempted nexus may see first (SPC-4 §5.13.11.2.4-6): REGISTRATIONS
/// PREEMPTED, RESERVATIONS PREEMPTED, COMMANDS CLEARED BY ANOTHER INITIATOR.
pub fn preempt_ua(status: u8, sense: Option<SenseKey>) -> bool {
    status == CHECK_CONDITION
        && sense.is_some_and(|k| {
            k.key == 0x06 && matches!((k.asc, k.ascq), (0x2a, 0x03) | (0x2a, 0x05) | (0x2f, 0x00))
        })
}

impl Victims {
    /// The first LBA of `writer`'s chunk.
    pub fn chunk_lba(&self, writer: u16) -> u64 {
        u64::from(writer) * u64::from(self.chunk_blocks)
    }

    /// `writer`'s chunk as written by its command `seq`.
    pub fn tagged(&self, writer: u16, seq: u32) -> Bytes {
        let bs = BLOCK_SIZE as usize;
        let mut v = Vec::with_capacity(self.chunk_blocks as usize * bs);
        for i in 0..u64::from(self.chunk_blocks) {
            let mut block = vec![writer as u8; bs];
            block[..8].copy_from_slice(self.magic);
            block[8..10].copy_from_slice(&writer.to_be_bytes());
            block[10..14].copy_from_slice(&seq.to_be_bytes());
            block[14..22].copy_from_slice(&(self.chunk_lba(writer) + i).to_be_bytes());
            v.extend_from_slice(&block);
        }
        Bytes::from(v)
    }

    /// Start the writers on `s` (LUN 0). Each writes its chunk again and again (FUA on every
    /// other command), and once `preempted` is set stops at its first RESERVATION CONFLICT or
    /// after 4 more commands. Each task returns its writer's records.
    pub fn spawn(
        &self,
        s: &Session,
        preempted: &Arc<AtomicBool>,
    ) -> Vec<tokio::task::JoinHandle<Vec<Rec>>> {
        (0..self.writers)
            .map(|w| {
                let (s, preempted, v) = (s.clone(), preempted.clone(), *self);
                tokio::spawn(async move {
                    let mut recs = Vec::new();
                    let mut seq = 0u32;
                    let mut tries_after = 0;
                    loop {
                        let after_good = preempted.load(Ordering::SeqCst);
                        let sent = Instant::now();
                        let cdb = ironlun_initiator::scsi::write16_cdb(
                            v.chunk_lba(w),
                            v.chunk_blocks,
                            seq.is_multiple_of(2),
                        );
                        let r =
                            tokio::time::timeout(PROMPT, s.command(0, &cdb, v.tagged(w, seq), 0))
                                .await
                                .unwrap_or_else(|_| panic!("writer {w} seq {seq} hung"))
                                .unwrap_or_else(|e| panic!("writer {w} seq {seq}: {e}"));
                        let rec = Rec {
                            writer: w,
                            seq,
                            after_good,
                            sent,
                            done: Instant::now(),
                            status: r.status,
                            sense: r.sense_key(),
                        };
                        let conflict = rec.status == RESERVATION_CONFLICT;
                        recs.push(rec);
                        seq += 1;
                        if after_good {
                            tries_after += 1;
                            if conflict || tries_after >= 4 {
                                return recs;
                            }
                        }
                    }
                })
            })
            .collect()
    }

    /// Every record ended as SPC-4 allows for a PREEMPT AND ABORT sent at `sent`: in flight
    /// GOOD, TASK ABORTED, RESERVATION CONFLICT or a preemption unit attention; after its
    /// GOOD never GOOD; each writer's last command RESERVATION CONFLICT. Returns how many
    /// commands were outstanding when it was sent, and how many ended TASK ABORTED.
    pub fn check(&self, recs: &[Rec], sent: Instant) -> (usize, usize) {
        let mut outstanding = 0;
        let mut aborted = 0;
        for r in recs {
            if r.sent < sent && r.done > sent {
                outstanding += 1;
            }
            if r.status == TASK_ABORTED {
                aborted += 1;
            }
            if r.after_good {
                assert!(
                    r.status == RESERVATION_CONFLICT || preempt_ua(r.status, r.sense),
                    "victim command after GOOD: {r:?}"
                );
            } else {
                assert!(
                    matches!(r.status, GOOD | TASK_ABORTED | RESERVATION_CONFLICT)
                        || preempt_ua(r.status, r.sense),
                    "victim command in flight: {r:?}"
                );
            }
        }
        for w in 0..self.writers {
            let last = recs
                .iter()
                .rfind(|r| r.writer == w)
                .expect("writer records");
            assert!(
                last.after_good && last.status == RESERVATION_CONFLICT,
                "writer {w} did not end in RESERVATION CONFLICT: {last:?}"
            );
        }
        (outstanding, aborted)
    }

    /// `data`, read back from writer `w`'s chunk, holds the preemptor's overwrite in every
    /// block: no victim write landed after it.
    pub fn check_read_back(&self, w: u16, data: &[u8], recs: &[Rec]) {
        for (i, block) in data.chunks(BLOCK_SIZE as usize).enumerate() {
            let writer = u16::from_be_bytes([block[8], block[9]]);
            let seq = u32::from_be_bytes([block[10], block[11], block[12], block[13]]);
            assert!(
                &block[..8] == self.magic && writer == PREEMPTOR,
                "LBA {}: a write of victim writer {writer} seq {seq} landed after the PREEMPT AND ABORT ({:?})",
                self.chunk_lba(w) + i as u64,
                recs.iter().find(|r| r.writer == writer && r.seq == seq)
            );
        }
    }
}
