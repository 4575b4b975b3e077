//! COMPARE AND WRITE (SBC-3 §5.2; VMware's "ATS").
//!
//! The Data-Out carries 2×N logical blocks: first the verify data, then the write data. The
//! LU reads the N blocks, compares them with the verify data and, only if every byte is
//! equal, writes the write data; otherwise it ends with CHECK CONDITION, MISCOMPARE,
//! MISCOMPARE DURING VERIFY OPERATION (1Dh/00h) with VALID=1 and INFORMATION = the offset of
//! the first differing byte from the start of the Data-Out, and nothing is written.
//!
//! Atomicity (SBC-3 §5.2: the read, compare and write are one indivisible operation with
//! respect to every other command) is a range lock in the LU's task set. A COMPARE AND
//! WRITE holds its byte range from the start of its read until its write has finished (or it
//! ended in MISCOMPARE, a backstore error, an abort or was abandoned). Rules, checked before
//! every I/O a task starts ([`LogicalUnit::admit`]):
//!
//! - an I/O of any kind (read, write, WRITE SAME, UNMAP, ..., an EXTENDED COPY chunk through
//!   [`LogicalUnit::copy_io`]) does not start while it overlaps a COMPARE AND WRITE in the
//!   task set; a COMPARE AND WRITE does not start while it overlaps any I/O in flight. The
//!   task waits in the task set ([`Step::Wait`]), not BUSY: initiators queue COMPARE AND
//!   WRITEs (VMware ATS, libiscsi MultipathIO) and expect them to complete.
//! - fairness: a waiting task blocks the tasks that entered the task set after it wherever
//!   one of the two is a COMPARE AND WRITE, so a stream of reads cannot starve a COMPARE AND
//!   WRITE. Waits point only at tasks in flight or at waiting tasks that came earlier, and a
//!   COMPARE AND WRITE that holds its range never waits again, so no wait is circular.
//! - I/O that overlaps no COMPARE AND WRITE (nor an aborted task's I/O, below) never waits,
//!   and while none is in the task set the check is one comparison (as for WRITE ATOMIC).
//!
//! When a task ends (resumed for the last time, abandoned) or is aborted while others wait,
//! [`LogicalUnit::take_wakeup`] says so; the caller then hands each waiting task to
//! [`LogicalUnit::proceed`], which starts its I/O, keeps it waiting, or ends it TASK ABORTED
//! when task management (LUN RESET, ABORT TASK SET, CLEAR TASK SET) or PREEMPT AND ABORT
//! aborted it meanwhile (SAM-5 §7, SPC-4 §5.13.11.2.6). A task aborted between the read and
//! the write resumes to TASK ABORTED without the write, as every task of the LU does.
//!
//! Aborted tasks (PREEMPT AND ABORT, task management, an ownership step that aborts a host's
//! tasks, locally or replicated from another gateway) end without further I/O, but the I/O
//! they had started is still in flight. Any I/O that overlaps such an I/O waits until the
//! aborted task has ended ([`Step::Wait`], woken like the range lock's waiters), so an
//! aborted write never lands after a later command's write or changes what a later read
//! saw: a new owner's write sent before the step's GOOD reached it waits, it is not
//! reordered. While no aborted task is in the task set the check costs one comparison.
//!
//! WRITE ATOMIC keeps its own rule, checked first (BUSY, [`LogicalUnit::atomic_conflict`]): it
//! ends BUSY over any task in the task set, waiting ones included, and a command over a WRITE
//! ATOMIC in flight ends BUSY, a COMPARE AND WRITE too (SBC-4 §4.29; initiators retry BUSY).
//! Only EXTENDED COPY chunks wait for a WRITE ATOMIC instead (a copy has no one to retry).
//!
//! Access control: the reservation check classes COMPARE AND WRITE as a write (SBC-3 §4.17
//! table 13, [`crate::pr::access::Class::Modify`]); a read-only LU answers DATA PROTECT,
//! WRITE PROTECTED; WRPROTECT other than 0 is INVALID FIELD IN CDB (no protection
//! information, as for WRITE).

use bytes::Bytes;

use super::{Continuation, IoOp, LogicalUnit, LuConfig, NexusId, Pending, Step, Task};
use crate::cdb::Extent;
use crate::sense::{FieldPointer, SenseReason};

/// The byte ranges one I/O touches (for the range lock and the WRITE ATOMIC check).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Ranges {
    One((u64, u64)),
    /// UNMAP's block descriptors.
    Many(Box<[(u64, u64)]>),
}

impl Ranges {
    /// The ranges of `op`; `None` for operations that touch no data (flush, GET LBA STATUS,
    /// the EXTENDED COPY job itself, whose chunks lock for themselves).
    pub(super) fn of(op: &IoOp) -> Option<Ranges> {
        match op {
            IoOp::Read { offset, len } | IoOp::WriteZeroes { offset, len, .. } => {
                Some(Ranges::One((*offset, *len)))
            }
            IoOp::Write { offset, data, .. } => {
                Some(Ranges::One((*offset, u64::try_from(data.len()).ok()?)))
            }
            IoOp::Unmap { ranges } => Some(Ranges::Many(ranges.clone().into_boxed_slice())),
            IoOp::Flush | IoOp::MapStatus { .. } | IoOp::ExtendedCopy(_) => None,
        }
    }

    fn as_slice(&self) -> &[(u64, u64)] {
        match self {
            Ranges::One(r) => std::slice::from_ref(r),
            Ranges::Many(v) => v,
        }
    }

    /// Whether some byte lies in both.
    pub(super) fn overlaps(&self, other: &Ranges) -> bool {
        self.as_slice().iter().any(|&(a, al)| {
            other
                .as_slice()
                .iter()
                .any(|&(b, bl)| a < b.saturating_add(bl) && b < a.saturating_add(al))
        })
    }
}

impl LogicalUnit {
    /// Start `op` of task `cont.task` now ([`Step::Io`]) or make it wait ([`Step::Wait`]),
    /// per the range lock (module doc). `check: false` for a COMPARE AND WRITE that already
    /// holds its range.
    pub(super) fn admit(&mut self, op: IoOp, mut cont: Continuation, check: bool) -> Step {
        let id = cont.task;
        let range = Ranges::of(&op);
        let wait = check && range.as_ref().is_some_and(|r| self.must_wait(id, r));
        if let Some(t) = self.tasks.get_mut(&id) {
            match (t.waiting, wait) {
                (false, true) => self.waiting_tasks += 1,
                (true, false) => self.waiting_tasks = self.waiting_tasks.saturating_sub(1),
                _ => {}
            }
            t.waiting = wait;
            t.range = range;
        }
        if wait {
            cont.parked = Some(Box::new(op));
            Step::Wait(cont)
        } else {
            Step::Io(op, cont)
        }
    }

    /// Whether task `id` must wait before its I/O over `range` starts: another task overlaps
    /// it that is in flight or waits ahead of it (entered the task set earlier), and one of
    /// the two is a COMPARE AND WRITE. An EXTENDED COPY chunk also waits for a WRITE ATOMIC
    /// in flight (a command would get BUSY; a copy has no one to retry). And any I/O waits
    /// for an aborted task's I/O in flight over its range (module documentation).
    fn must_wait(&self, id: u64, range: &Ranges) -> bool {
        // The common case, before any lookup: no COMPARE AND WRITE, no WRITE ATOMIC and no
        // aborted task.
        if self.caw_tasks == 0 && self.atomic_tasks == 0 && self.aborted_tasks == 0 {
            return false;
        }
        let Some(me) = self.tasks.get(&id) else {
            return false;
        };
        let (caw, copy) = (me.caw, me.copy);
        let lock = caw || self.caw_tasks > 0 || (copy && self.atomic_tasks > 0);
        let after_abort = self.aborted_tasks > 0 && me.aborted.is_empty();
        if !lock && !after_abort {
            return false;
        }
        self.tasks.iter().any(|(&other, t)| {
            other != id
                && t.range.as_ref().is_some_and(|r| r.overlaps(range))
                && ((lock && (!t.waiting || other < id) && (caw || t.caw || (copy && t.atomic)))
                    || (after_abort && !t.waiting && !t.aborted.is_empty()))
        })
    }

    /// Try again to start the I/O of a task that got [`Step::Wait`]: [`Step::Io`], another
    /// [`Step::Wait`], or, when it was aborted meanwhile, TASK ABORTED or no status under
    /// TAS=0 (SAM-5 §7, SPC-4 §7.5.8; it never started, so no I/O of it reaches the medium).
    pub fn proceed(&mut self, nexus: NexusId, mut cont: Continuation) -> Step {
        let _ = nexus;
        let id = cont.task;
        let Some(op) = cont.parked.take() else {
            // Not a waiting task's continuation: a caller error; end it rather than hang.
            self.end_task(id);
            return self.fail(SenseReason::InternalTargetFailure);
        };
        let aborted = self.tasks.get(&id).is_some_and(|t| !t.aborted.is_empty());
        if aborted && !cont.is_sanitize() {
            return self.end_aborted(id, &cont.state);
        }
        self.admit(*op, cont, true)
    }

    /// Whether a task ended or was aborted while tasks wait ([`Step::Wait`]) since the last
    /// call: then every waiting task should be handed to [`LogicalUnit::proceed`] again.
    /// The caller checks it after each call that changes the LU (one load while none waits).
    pub fn take_wakeup(&mut self) -> bool {
        std::mem::take(&mut self.wakeup)
    }

    /// How many tasks wait to start their I/O (diagnostics and tests).
    pub fn waiting_tasks(&self) -> usize {
        self.waiting_tasks
    }

    /// One I/O of an EXTENDED COPY chunk (SPC-4 §6.4) that the daemon carries out on this LU
    /// for `nexus`: entered in the task set like a command's I/O, so that it never lands
    /// inside a COMPARE AND WRITE of this LU, and task management waits for it. [`Step::Io`]:
    /// perform it, then [`LogicalUnit::abandon`] the continuation (the LU needs no result);
    /// [`Step::Wait`]: as for a command, [`LogicalUnit::proceed`] may end it TASK ABORTED.
    pub fn copy_io(&mut self, nexus: NexusId, op: IoOp) -> Step {
        let task = Task {
            identity: self.sessions.get(&nexus).copied(),
            nexus,
            aborted: Vec::new(),
            silent: false,
            range: None,
            atomic: false,
            caw: false,
            copy: true,
            waiting: false,
            sanitize: false,
        };
        let task = self.insert_task(task);
        let cont = Continuation {
            state: Pending::CopyIo,
            task,
            parked: None,
        };
        self.admit(op, cont, true)
    }
}

/// Largest NUMBER OF LOGICAL BLOCKS accepted, advertised as MAXIMUM COMPARE AND WRITE LENGTH
/// (VPD B0h byte 5, SBC-3 §6.5.3): the one-byte field's maximum, 255, but never above the
/// maximum transfer length, and at least 1 (VMware reads ≥ 1 as "ATS supported").
pub fn max_blocks(config: &LuConfig) -> u8 {
    u8::try_from(config.max_transfer_blocks.min(255))
        .unwrap_or(u8::MAX)
        .max(1)
}

/// The NUMBER OF LOGICAL BLOCKS field (byte 13), for INVALID FIELD IN CDB.
const BLOCKS_FIELD: u16 = 13;

impl LogicalUnit {
    /// Start COMPARE AND WRITE of `ext` (SBC-3 §5.2): checks, then the read of the range.
    /// NUMBER OF LOGICAL BLOCKS 0 transfers nothing and is GOOD. A Data-Out of any size but
    /// exactly 2×N blocks is INVALID FIELD IN CDB pointing at NUMBER OF LOGICAL BLOCKS, the
    /// field the data contradicts: half a verify buffer cannot be compared, and extra data
    /// has no place (libiscsi CompareAndWrite.InvalidDataOutSize sends 4 blocks with N = 1
    /// and N = 3; CompareAndWrite.Simple sends 512 blocks with N = 256, which the one-byte
    /// field carries as 0, and expects INVALID FIELD IN CDB).
    pub(super) fn compare_and_write(
        &self,
        ext: Extent,
        fua: bool,
        data_out: &Bytes,
    ) -> Result<Step, SenseReason> {
        self.check_writable()?;
        if ext.blocks > u32::from(max_blocks(&self.config)) {
            return Err(SenseReason::InvalidFieldInCdb(FieldPointer::byte(
                BLOCKS_FIELD,
            )));
        }
        let (offset, len) = self.range(ext)?;
        let want = len.checked_mul(2).ok_or(SenseReason::LbaOutOfRange)?;
        if u64::try_from(data_out.len()).ok() != Some(want) {
            return Err(SenseReason::InvalidFieldInCdb(FieldPointer::byte(
                BLOCKS_FIELD,
            )));
        }
        if len == 0 {
            return Self::good(Bytes::new());
        }
        let half = usize::try_from(len).map_err(|_| SenseReason::LbaOutOfRange)?;
        let verify = data_out.slice(..half);
        let write = data_out.slice(half..);
        let fua = fua || !self.mode.current.wce;
        Self::io(
            IoOp::Read { offset, len },
            Pending::CompareAndWrite {
                offset,
                verify,
                write,
                fua,
            },
        )
    }
}

/// After the read: MISCOMPARE at the first differing byte, or the write of the write data.
pub(super) fn after_read(
    offset: u64,
    verify: &Bytes,
    write: Bytes,
    fua: bool,
    actual: &Bytes,
) -> Result<Step, SenseReason> {
    super::compare(verify, actual)?;
    LogicalUnit::io(
        IoOp::Write {
            offset,
            data: write,
            fua,
        },
        Pending::Good,
    )
}

#[cfg(test)]
#[allow(
    clippy::indexing_slicing,
    clippy::unwrap_used,
    clippy::cast_possible_truncation
)]
mod tests {
    use super::*;
    use crate::lu::{Completion, IoResult, NexusId};
    use crate::pr::{InitiatorPort, ItNexus};
    use crate::sense::key;
    use crate::status;

    const BS: u32 = 512;
    const BLOCKS: u64 = 1024;
    const A: NexusId = 1;
    const B: NexusId = 2;

    fn it(n: NexusId) -> ItNexus {
        ItNexus {
            initiator: InitiatorPort::new(&format!("iqn.test:caw{n}"), [0x80, 0, 0, 0, 0, n as u8]),
            rtpi: 1,
        }
    }

    /// An LU over a RAM medium; records every write.
    struct Disk {
        lu: LogicalUnit,
        medium: Vec<u8>,
        writes: Vec<(u64, usize, bool)>,
    }

    impl Disk {
        fn new(config: LuConfig) -> Self {
            let medium = vec![0u8; (config.num_blocks * u64::from(config.block_size)) as usize];
            let mut lu = LogicalUnit::new(config);
            lu.add_nexus(A, it(A));
            lu.add_nexus(B, it(B));
            let mut d = Disk {
                lu,
                medium,
                writes: Vec::new(),
            };
            // Consume the power-on unit attentions.
            d.run(A, &[0; 6], &[]);
            d.run(B, &[0; 6], &[]);
            d
        }

        fn ram() -> Self {
            Self::new(LuConfig::new(0, BS, BLOCKS, "iqn.2026-01.test:caw"))
        }

        fn run(&mut self, nexus: NexusId, cdb: &[u8], data: &[u8]) -> Completion {
            let mut step = self.lu.execute(nexus, cdb, Bytes::copy_from_slice(data));
            loop {
                match step {
                    Step::Done(c) => return c,
                    Step::PrCommit(p) => return p.completion,
                    Step::Wait(_) => panic!("waits with nothing in flight"),
                    Step::Replicate(_) => panic!("not a replicated LU"),
                    Step::Io(op, cont) => {
                        let r = self.perform(op);
                        step = self.lu.resume(nexus, cont, r);
                    }
                }
            }
        }

        fn perform(&mut self, op: IoOp) -> IoResult {
            match op {
                IoOp::Read { offset, len } => IoResult::Data(Bytes::copy_from_slice(
                    &self.medium[offset as usize..(offset + len) as usize],
                )),
                IoOp::Write { offset, data, fua } => {
                    let o = offset as usize;
                    self.medium[o..o + data.len()].copy_from_slice(&data);
                    self.writes.push((offset, data.len(), fua));
                    IoResult::Done
                }
                other => panic!("unexpected {other:?}"),
            }
        }

        fn fill(&mut self, lba: u64, blocks: u64, byte: u8) {
            let bs = u64::from(BS);
            self.medium[(lba * bs) as usize..((lba + blocks) * bs) as usize].fill(byte);
        }
    }

    fn caw_cdb(lba: u64, blocks: u8, flags: u8) -> Vec<u8> {
        let mut c = vec![0u8; 16];
        c[0] = 0x89;
        c[1] = flags;
        c[2..10].copy_from_slice(&lba.to_be_bytes());
        c[13] = blocks;
        c
    }

    /// Verify data of `blocks` blocks of `old`, then write data of `new`.
    fn caw_data(blocks: usize, old: u8, new: u8) -> Vec<u8> {
        let n = blocks * BS as usize;
        let mut d = vec![old; n];
        d.extend(std::iter::repeat_n(new, n));
        d
    }

    fn sense(c: &Completion) -> (u8, u8, u8) {
        assert_eq!(c.status, status::CHECK_CONDITION, "{c:?}");
        (c.sense[2] & 0x0F, c.sense[12], c.sense[13])
    }

    #[test]
    fn equal_data_is_written_with_good() {
        let mut d = Disk::ram();
        d.fill(10, 3, b'A');
        let c = d.run(A, &caw_cdb(10, 3, 0), &caw_data(3, b'A', b'B'));
        assert_eq!(c.status, status::GOOD);
        let bs = BS as usize;
        assert!(d.medium[10 * bs..13 * bs].iter().all(|b| *b == b'B'));
        assert_eq!(d.medium[13 * bs], 0);
        assert_eq!(d.medium[10 * bs - 1], 0);
        // Write-back cache on: no FUA unless asked.
        assert_eq!(d.writes, vec![(10 * 512, 3 * bs, false)]);
        let c = d.run(A, &caw_cdb(10, 1, 0x08), &caw_data(1, b'B', b'C'));
        assert_eq!(c.status, status::GOOD);
        assert_eq!(d.writes[1], (10 * 512, bs, true));
        // DPO is accepted (DPOFUA=1 in MODE SENSE).
        let c = d.run(A, &caw_cdb(10, 1, 0x10), &caw_data(1, b'C', b'D'));
        assert_eq!(c.status, status::GOOD);
    }

    #[test]
    fn miscompare_reports_first_differing_byte_and_writes_nothing() {
        let mut d = Disk::ram();
        d.fill(0, 2, b'A');
        for at in [0usize, 1, 511, 512, 1000, 1023] {
            let mut data = caw_data(2, b'A', b'B');
            data[at] = b'Z';
            data[1023] = b'Y';
            let c = d.run(B, &caw_cdb(0, 2, 0), &data);
            assert_eq!(sense(&c), (key::MISCOMPARE, 0x1D, 0x00));
            // Fixed format: VALID=1, INFORMATION = byte offset in the Data-Out.
            assert_eq!(c.sense[0], 0xF0);
            assert_eq!(&c.sense[3..7], &(at as u32).to_be_bytes());
        }
        assert!(d.writes.is_empty());
        assert!(d.medium[..1024].iter().all(|b| *b == b'A'));
    }

    #[test]
    fn limits_are_advertised_and_enforced() {
        let mut d = Disk::ram();
        let b0 = crate::vpd::page(d.lu.config(), 0xB0).unwrap();
        assert_eq!(b0[5], 255);
        // 255 blocks: accepted.
        let c = d.run(A, &caw_cdb(0, 255, 0), &caw_data(255, 0, 7));
        assert_eq!(c.status, status::GOOD);
        // A smaller maximum transfer length lowers the limit, and 0 is still at least 1.
        let mut config = LuConfig::new(0, BS, BLOCKS, "iqn.2026-01.test:caw");
        config.max_transfer_blocks = 8;
        let mut small = Disk::new(config.clone());
        assert_eq!(crate::vpd::page(&config, 0xB0).unwrap()[5], 8);
        let c = small.run(A, &caw_cdb(0, 9, 0), &caw_data(9, 0, 1));
        assert_eq!(sense(&c), (key::ILLEGAL_REQUEST, 0x24, 0x00));
        assert_eq!(&c.sense[15..18], &[0xC0, 0, 13]);
        config.max_transfer_blocks = 0;
        assert_eq!(max_blocks(&config), 1);
        // Past the end of the medium.
        let c = d.run(A, &caw_cdb(BLOCKS - 1, 2, 0), &caw_data(2, 0, 1));
        assert_eq!(sense(&c), (key::ILLEGAL_REQUEST, 0x21, 0x00));
        let c = d.run(A, &caw_cdb(u64::MAX, 1, 0), &caw_data(1, 0, 1));
        assert_eq!(sense(&c), (key::ILLEGAL_REQUEST, 0x21, 0x00));
        // NUMBER OF LOGICAL BLOCKS 0: nothing transferred, GOOD.
        let c = d.run(A, &caw_cdb(0, 0, 0), &[]);
        assert_eq!(c.status, status::GOOD);
    }

    #[test]
    fn data_out_of_the_wrong_size_is_rejected() {
        let mut d = Disk::ram();
        let four = vec![0u8; 4 * BS as usize];
        for (blocks, data) in [
            (1u8, &four[..]),
            (3, &four[..]),
            (1, &four[..BS as usize]),
            (1, &four[..2 * BS as usize - 1]),
            (0, &four[..1]),
        ] {
            let c = d.run(A, &caw_cdb(0, blocks, 0), data);
            assert_eq!(sense(&c), (key::ILLEGAL_REQUEST, 0x24, 0x00), "{blocks}");
            assert_eq!(&c.sense[15..18], &[0xC0, 0, 13]);
        }
        assert!(d.writes.is_empty());
    }

    #[test]
    fn data_out_length_is_two_ranges() {
        let d = Disk::ram();
        assert_eq!(d.lu.data_out_len(&caw_cdb(0, 3, 0)), Some(3 * 2 * 512));
        assert_eq!(d.lu.data_out_len(&caw_cdb(0, 0, 0)), Some(0));
    }

    #[test]
    fn protection_and_reserved_fields_are_invalid() {
        let mut d = Disk::ram();
        for (byte, bit) in [(1usize, 5u8), (1, 2), (1, 1), (10, 0), (12, 7), (14, 6)] {
            let mut cdb = caw_cdb(0, 1, 0);
            cdb[byte] |= 1 << bit;
            let c = d.run(A, &cdb, &caw_data(1, 0, 1));
            assert_eq!(
                sense(&c),
                (key::ILLEGAL_REQUEST, 0x24, 0x00),
                "{byte}/{bit}"
            );
        }
        assert!(d.writes.is_empty());
    }

    #[test]
    fn read_only_lu_is_data_protect() {
        let mut config = LuConfig::new(0, BS, BLOCKS, "iqn.2026-01.test:caw");
        config.read_only = true;
        let mut d = Disk::new(config);
        let c = d.run(A, &caw_cdb(0, 1, 0), &caw_data(1, 0, 1));
        assert_eq!(sense(&c), (key::DATA_PROTECT, 0x27, 0x00));
        assert!(d.writes.is_empty());
    }

    /// PR OUT with a 24-byte parameter list (reservation key, service action key).
    fn prout(d: &mut Disk, nexus: NexusId, sa: u8, ty: u8, key: u64, sark: u64) -> Completion {
        let cdb = [0x5F, sa, ty, 0, 0, 0, 0, 0, 24, 0];
        let mut p = vec![0u8; 24];
        p[..8].copy_from_slice(&key.to_be_bytes());
        p[8..16].copy_from_slice(&sark.to_be_bytes());
        d.run(nexus, &cdb, &p)
    }

    #[test]
    fn reservation_conflicts_like_a_write() {
        let mut d = Disk::ram();
        assert_eq!(prout(&mut d, A, 0, 0, 0, 0xA).status, status::GOOD);
        // Write Exclusive held by A: B (unregistered) may read but not compare-and-write.
        assert_eq!(prout(&mut d, A, 1, 1, 0xA, 0).status, status::GOOD);
        let c = d.run(B, &caw_cdb(0, 1, 0), &caw_data(1, 0, 1));
        assert_eq!(c.status, status::RESERVATION_CONFLICT);
        assert!(d.writes.is_empty());
        let c = d.run(A, &caw_cdb(0, 1, 0), &caw_data(1, 0, 1));
        assert_eq!(c.status, status::GOOD);
        assert_eq!(d.writes.len(), 1);
    }

    /// PREEMPT AND ABORT between the read and the write: the write never happens.
    #[test]
    fn preempt_and_abort_between_read_and_write_stops_the_write() {
        let mut d = Disk::ram();
        assert_eq!(prout(&mut d, A, 0, 0, 0, 0xA).status, status::GOOD);
        assert_eq!(prout(&mut d, B, 0, 0, 0, 0xB).status, status::GOOD);
        assert_eq!(prout(&mut d, A, 1, 1, 0xA, 0).status, status::GOOD);
        let data = Bytes::from(caw_data(1, 0, 9));
        let Step::Io(IoOp::Read { offset, len }, cont) = d.lu.execute(A, &caw_cdb(4, 1, 0), data)
        else {
            panic!("expected the read");
        };
        assert_eq!((offset, len), (4 * 512, 512));
        let c = prout(&mut d, B, 5, 1, 0xB, 0xA);
        assert_eq!(c.status, status::GOOD);
        let read = IoResult::Data(Bytes::from(vec![0u8; 512]));
        match d.lu.resume(A, cont, read) {
            Step::Done(c) => assert_eq!(c.status, status::TASK_ABORTED),
            other => panic!("expected TASK ABORTED, got {other:?}"),
        }
        assert!(d.writes.is_empty());
    }

    #[test]
    fn listed_in_report_supported_operation_codes() {
        let mut d = Disk::ram();
        let rsoc = [0xA3, 0x0C, 0x01, 0x89, 0, 0, 0, 0, 1, 0, 0, 0];
        let c = d.run(A, &rsoc, &[]);
        assert_eq!(c.status, status::GOOD);
        assert_eq!(c.data[1] & 0x07, 0x03);
        assert_eq!(&c.data[2..4], &[0, 16]);
        let usage = &c.data[4..20];
        assert_eq!(usage[0], 0x89);
        // DPO and FUA usable (libiscsi CompareAndWrite.DpoFua), NUMBER OF LOGICAL BLOCKS.
        assert_eq!(usage[1], 0x18);
        assert_eq!(usage[13], 0xFF);
    }
    // ---- The range lock (module doc; SBC-3 §5.2).

    fn rw_cdb(op: u8, lba: u64, blocks: u32) -> Vec<u8> {
        let mut c = vec![0u8; 16];
        c[0] = op;
        c[2..10].copy_from_slice(&lba.to_be_bytes());
        c[10..14].copy_from_slice(&blocks.to_be_bytes());
        c
    }

    const READ16: u8 = 0x88;
    const WRITE16: u8 = 0x8A;

    fn io(step: Step) -> (IoOp, Continuation) {
        match step {
            Step::Io(op, cont) => (op, cont),
            other => panic!("expected I/O, got {other:?}"),
        }
    }

    fn waits(step: Step) -> Continuation {
        match step {
            Step::Wait(cont) => cont,
            other => panic!("expected a wait, got {other:?}"),
        }
    }

    fn done(step: Step) -> Completion {
        match step {
            Step::Done(c) => c,
            other => panic!("expected the end, got {other:?}"),
        }
    }

    impl Disk {
        fn start(&mut self, nexus: NexusId, cdb: &[u8], data: &[u8]) -> Step {
            self.lu.execute(nexus, cdb, Bytes::copy_from_slice(data))
        }

        /// A COMPARE AND WRITE of one block at `lba` expecting `old`, writing `new`: its read.
        fn caw_read(&mut self, nexus: NexusId, lba: u64, old: u8, new: u8) -> Continuation {
            let (op, cont) = io(self.start(nexus, &caw_cdb(lba, 1, 0), &caw_data(1, old, new)));
            assert_eq!(
                op,
                IoOp::Read {
                    offset: lba * 512,
                    len: 512
                }
            );
            cont
        }

        /// Finish the read of a COMPARE AND WRITE: its write must start at once (it holds
        /// its range).
        fn caw_write(&mut self, nexus: NexusId, cont: Continuation, lba: u64) -> Continuation {
            let r = self.perform(IoOp::Read {
                offset: lba * 512,
                len: 512,
            });
            let (op, cont) = io(self.lu.resume(nexus, cont, r));
            assert!(matches!(op, IoOp::Write { offset, .. } if offset == lba * 512));
            self.perform(op);
            cont
        }
    }

    #[test]
    fn overlapping_io_waits_for_a_compare_and_write_and_other_io_does_not() {
        let mut d = Disk::ram();
        let c = d.caw_read(A, 10, 0, 7);
        // Reads, writes and another COMPARE AND WRITE over block 10 wait, from any nexus.
        let r = waits(d.start(B, &rw_cdb(READ16, 8, 4), &[]));
        let w = waits(d.start(B, &rw_cdb(WRITE16, 10, 1), &[9; 512]));
        let c2 = waits(d.start(A, &caw_cdb(10, 1, 0), &caw_data(1, 7, 8)));
        assert_eq!(d.lu.waiting_tasks(), 3);
        // Elsewhere nothing waits: a read and a write around it, a COMPARE AND WRITE next door.
        let (_, r2) = io(d.start(B, &rw_cdb(READ16, 0, 10), &[]));
        let (_, w2) = io(d.start(B, &rw_cdb(WRITE16, 11, 4), &[1; 2048]));
        let c3 = d.caw_read(B, 20, 0, 2);
        for cont in [r2, w2, c3] {
            d.lu.abandon(cont);
        }
        // Nothing the waiters wait for has ended.
        d.lu.take_wakeup();
        let c = d.caw_write(A, c, 10);
        assert!(!d.lu.take_wakeup());
        assert_eq!(done(d.lu.resume(A, c, IoResult::Done)).status, status::GOOD);
        assert!(d.lu.take_wakeup());
        // In order: the read and the write start (they do not exclude each other); the
        // second COMPARE AND WRITE waits for them.
        let (op, r) = io(d.lu.proceed(B, r));
        let data = d.perform(op);
        let r = d.lu.resume(B, r, data);
        assert_eq!(
            done(r).data[2 * 512],
            7,
            "the read saw the compare and write"
        );
        let (op, w) = io(d.lu.proceed(B, w));
        let c2 = waits(d.lu.proceed(A, c2));
        d.perform(op);
        assert_eq!(done(d.lu.resume(B, w, IoResult::Done)).status, status::GOOD);
        assert!(d.lu.take_wakeup());
        // The write came after the first COMPARE AND WRITE: the second one miscompares.
        let (op, c2) = io(d.lu.proceed(A, c2));
        let r = d.perform(op);
        let c = done(d.lu.resume(A, c2, r));
        assert_eq!(sense(&c), (key::MISCOMPARE, 0x1D, 0x00));
        assert_eq!(d.lu.waiting_tasks(), 0);
        assert!(d.lu.tasks.is_empty());
    }

    #[test]
    fn a_compare_and_write_waits_for_io_in_flight_over_its_range() {
        let mut d = Disk::ram();
        let (op, w) = io(d.start(B, &rw_cdb(WRITE16, 4, 8), &[5; 8 * 512]));
        let c = waits(d.start(A, &caw_cdb(6, 1, 0), &caw_data(1, 5, 6)));
        // Its waiting is not a conflict for WRITE ATOMIC elsewhere, but is over its range.
        d.perform(op);
        assert_eq!(done(d.lu.resume(B, w, IoResult::Done)).status, status::GOOD);
        assert!(d.lu.take_wakeup());
        let (op, c) = io(d.lu.proceed(A, c));
        let r = d.perform(op);
        let (op, c) = io(d.lu.resume(A, c, r));
        d.perform(op);
        assert_eq!(done(d.lu.resume(A, c, IoResult::Done)).status, status::GOOD);
        assert_eq!(d.medium[6 * 512], 6);
    }

    /// Every way a COMPARE AND WRITE ends wakes what waits for it: completion (above),
    /// MISCOMPARE, a backstore error on the read or the write, abandon, abort by a LUN RESET.
    #[test]
    fn waiters_wake_on_every_end_of_a_compare_and_write() {
        type End = fn(&mut Disk, Continuation);
        let ends: [(&str, End); 5] = [
            ("miscompare", |d, c| {
                let r = IoResult::Data(Bytes::from(vec![0xEE; 512]));
                let c = done(d.lu.resume(A, c, r));
                assert_eq!(sense(&c), (key::MISCOMPARE, 0x1D, 0x00));
            }),
            ("read error", |d, c| {
                let r = IoResult::Error(crate::lu::IoErrorKind::ReadError);
                assert_eq!(done(d.lu.resume(A, c, r)).status, status::CHECK_CONDITION);
            }),
            ("write error", |d, c| {
                let c = d.caw_write(A, c, 3);
                let r = IoResult::Error(crate::lu::IoErrorKind::WriteError);
                assert_eq!(done(d.lu.resume(A, c, r)).status, status::CHECK_CONDITION);
            }),
            ("abandon", |d, c| d.lu.abandon(c)),
            ("abort", |d, c| {
                let c = d.caw_write(A, c, 3);
                let t = d.lu.reset(B, crate::lu::ResetKind::LogicalUnit).unwrap();
                assert!(!d.lu.abort_drained(t));
                assert_eq!(
                    done(d.lu.resume(A, c, IoResult::Done)).status,
                    status::TASK_ABORTED
                );
            }),
        ];
        for (what, end) in ends {
            let mut d = Disk::ram();
            let c = d.caw_read(A, 3, 0, 1);
            let r = waits(d.start(B, &rw_cdb(READ16, 3, 1), &[]));
            d.lu.take_wakeup();
            end(&mut d, c);
            assert!(d.lu.take_wakeup(), "{what}: no wake-up");
            if what == "abort" {
                // The waiting read was in the task set the reset aborted: it ends without I/O.
                assert_eq!(done(d.lu.proceed(B, r)).status, status::TASK_ABORTED);
                assert!(d.lu.tasks.is_empty());
                continue;
            }
            let (op, r) = io(d.lu.proceed(B, r));
            assert_eq!(
                op,
                IoOp::Read {
                    offset: 3 * 512,
                    len: 512
                },
                "{what}"
            );
            d.lu.abandon(r);
            assert!(d.lu.tasks.is_empty(), "{what}");
        }
    }

    /// With TAS=0 a waiting command of another I_T nexus that a LUN RESET aborts ends without
    /// status (SPC-4 §7.5.8), still without starting its I/O.
    #[test]
    fn a_waiting_command_aborted_under_tas_zero_ends_without_status() {
        let mut d = Disk::ram();
        d.lu.mode.current.tas = false;
        let c = d.caw_read(A, 0, 0, 1);
        let w = waits(d.start(B, &rw_cdb(WRITE16, 0, 1), &[9; 512]));
        let ticket =
            d.lu.reset(A, crate::lu::ResetKind::LogicalUnit)
                .expect("ticket");
        assert_eq!(done(d.lu.proceed(B, w)).status, status::NO_STATUS);
        let r = d.perform(IoOp::Read {
            offset: 0,
            len: 512,
        });
        assert_eq!(
            done(d.lu.resume(A, c, r)).status,
            status::TASK_ABORTED,
            "A issued it"
        );
        assert!(d.lu.abort_drained(ticket));
        assert!(d.lu.tasks.is_empty());
    }

    /// Task management aborts waiting commands too: they end TASK ABORTED when next handed
    /// to `proceed`, the function's ticket drains only then, and nothing of them is written.
    #[test]
    fn task_management_and_preempt_and_abort_abort_waiting_commands() {
        for function in [
            "abort task set",
            "clear task set",
            "lun reset",
            "preempt and abort",
        ] {
            let mut d = Disk::ram();
            if function == "preempt and abort" {
                assert_eq!(prout(&mut d, A, 0, 0, 0, 0xA).status, status::GOOD);
                assert_eq!(prout(&mut d, B, 0, 0, 0, 0xB).status, status::GOOD);
                assert_eq!(prout(&mut d, B, 1, 5, 0xB, 0).status, status::GOOD);
            }
            let c = d.caw_read(A, 0, 0, 1);
            let w = waits(d.start(B, &rw_cdb(WRITE16, 0, 1), &[9; 512]));
            d.lu.take_wakeup();
            let ticket = match function {
                "abort task set" => d.lu.abort_task_set(B),
                "clear task set" => d.lu.clear_task_set(A),
                "lun reset" => d.lu.reset(A, crate::lu::ResetKind::LogicalUnit),
                _ => {
                    // A preempts B (registrants only, PREEMPT AND ABORT): only B's tasks.
                    let cdb = [0x5F, 5, 5, 0, 0, 0, 0, 0, 24, 0];
                    let mut p = vec![0u8; 24];
                    p[..8].copy_from_slice(&0xAu64.to_be_bytes());
                    p[8..16].copy_from_slice(&0xBu64.to_be_bytes());
                    match d.start(A, &cdb, &p) {
                        Step::PrCommit(commit) => commit.abort,
                        other => panic!("{other:?}"),
                    }
                }
            };
            let ticket = ticket.expect(function);
            assert!(d.lu.take_wakeup(), "{function}");
            assert!(!d.lu.abort_drained(ticket), "{function}");
            // The COMPARE AND WRITE writes on when the function spares A's tasks, or ends
            // TASK ABORTED without its write...
            let spared = matches!(function, "abort task set" | "preempt and abort");
            if spared {
                let c = d.caw_write(A, c, 0);
                assert_eq!(done(d.lu.resume(A, c, IoResult::Done)).status, status::GOOD);
            } else {
                let r = d.perform(IoOp::Read {
                    offset: 0,
                    len: 512,
                });
                let c = done(d.lu.resume(A, c, r));
                assert_eq!(c.status, status::TASK_ABORTED, "{function}");
            }
            // ... and the waiting write never starts.
            assert_eq!(
                done(d.lu.proceed(B, w)).status,
                status::TASK_ABORTED,
                "{function}"
            );
            assert!(d.lu.abort_drained(ticket), "{function}");
            let expect = u8::from(spared);
            assert!(d.medium[..512].iter().all(|b| *b == expect), "{function}");
            assert!(d.lu.tasks.is_empty());
        }
    }

    /// A stream of reads cannot starve a COMPARE AND WRITE: once it waits, later reads over
    /// its range wait behind it; reads elsewhere do not.
    #[test]
    fn a_waiting_compare_and_write_is_not_starved_by_later_reads() {
        let mut d = Disk::ram();
        let (_, r1) = io(d.start(B, &rw_cdb(READ16, 20, 4), &[]));
        let c = waits(d.start(A, &caw_cdb(22, 1, 0), &caw_data(1, 0, 1)));
        let r2 = waits(d.start(B, &rw_cdb(READ16, 21, 4), &[]));
        let (_, r3) = io(d.start(B, &rw_cdb(READ16, 23, 4), &[]));
        d.lu.abandon(r3);
        d.lu.abandon(r1);
        assert!(d.lu.take_wakeup());
        // The later read still waits: the COMPARE AND WRITE goes first.
        let r2 = waits(d.lu.proceed(B, r2));
        let (_, c) = io(d.lu.proceed(A, c));
        let r2 = waits(d.lu.proceed(B, r2));
        d.lu.abandon(c);
        assert!(d.lu.take_wakeup());
        let (_, r2) = io(d.lu.proceed(B, r2));
        d.lu.abandon(r2);
        assert!(d.lu.tasks.is_empty());
        assert_eq!(d.lu.waiting_tasks(), 0);
    }

    /// A multi-chunk WRITE SAME whose next chunk meets a COMPARE AND WRITE waits for it, and
    /// the COMPARE AND WRITE's write does not wait for that earlier command (no circular
    /// wait).
    #[test]
    fn a_holding_compare_and_write_never_waits_again() {
        let mut d = Disk::new(LuConfig::new(0, BS, 4096, "iqn.2026-01.test:caw"));
        let mut ws = rw_cdb(0x93, 0, 4096);
        ws[1] = 0;
        let (op, ws) = io(d.start(B, &ws, &[3; 512]));
        assert!(matches!(&op, IoOp::Write { offset: 0, data, .. } if data.len() == 1 << 20));
        let c = d.caw_read(A, 3000, 0, 1);
        let r = d.perform(op);
        let ws = waits(d.lu.resume(B, ws, r));
        let c = d.caw_write(A, c, 3000);
        assert_eq!(done(d.lu.resume(A, c, IoResult::Done)).status, status::GOOD);
        assert!(d.lu.take_wakeup());
        let (op, ws) = io(d.lu.proceed(B, ws));
        let r = d.perform(op);
        assert_eq!(done(d.lu.resume(B, ws, r)).status, status::GOOD);
        // The WRITE SAME came second over block 3000.
        assert_eq!(d.medium[3000 * 512], 3);
    }

    /// WRITE ATOMIC keeps BUSY: over a COMPARE AND WRITE in the task set it ends BUSY, and
    /// so does a COMPARE AND WRITE over a WRITE ATOMIC in flight (SBC-4 §4.29).
    #[test]
    fn write_atomic_stays_busy_against_compare_and_write() {
        let mut d = Disk::ram();
        let c = d.caw_read(A, 5, 0, 1);
        let busy = done(d.start(B, &rw_cdb(0x9C, 5, 1), &[1; 512]));
        assert_eq!(busy.status, status::BUSY);
        d.lu.abandon(c);
        let (_, wa) = io(d.start(B, &rw_cdb(0x9C, 5, 1), &[1; 512]));
        let busy = done(d.start(A, &caw_cdb(5, 1, 0), &caw_data(1, 0, 1)));
        assert_eq!(busy.status, status::BUSY);
        d.lu.abandon(wa);
        assert!(d.lu.tasks.is_empty());
    }

    /// EXTENDED COPY chunk I/O takes the range lock through `copy_io`: it waits for a
    /// COMPARE AND WRITE over its range, and one waits for it.
    #[test]
    fn copy_chunks_take_the_range_lock() {
        let mut d = Disk::ram();
        let c = d.caw_read(A, 0, 0, 1);
        let chunk = waits(d.lu.copy_io(
            B,
            IoOp::Write {
                offset: 0,
                data: Bytes::from(vec![2; 4096]),
                fua: false,
            },
        ));
        let (_, other) = io(d.lu.copy_io(
            B,
            IoOp::Read {
                offset: 4096,
                len: 4096,
            },
        ));
        let c2 = waits(d.start(A, &caw_cdb(8, 1, 0), &caw_data(1, 0, 1)));
        d.lu.abandon(other);
        let (_, c2) = io(d.lu.proceed(A, c2));
        d.lu.abandon(c2);
        d.lu.abandon(c);
        let (_, chunk) = io(d.lu.proceed(B, chunk));
        d.lu.abandon(chunk);
        assert!(d.lu.tasks.is_empty());
    }

    #[test]
    fn unmap_ranges_overlap_per_descriptor() {
        let many = Ranges::Many(vec![(0, 512), (4096, 512)].into_boxed_slice());
        assert!(many.overlaps(&Ranges::One((4096 + 511, 1))));
        assert!(!many.overlaps(&Ranges::One((512, 3584))));
        assert!(!Ranges::One((0, 0)).overlaps(&Ranges::One((0, 512))));
    }
}
