//! In-memory command flows: a RAM medium performs the LU's [`IoOp`]s.
#![allow(
    clippy::indexing_slicing,
    clippy::unwrap_used,
    clippy::cast_possible_truncation
)]

use super::*;
use crate::sense::key;

/// A test I_T nexus for session id `n`: initiator `iqn.test:n<n>`, ISID n, target port 1.
fn it(n: crate::lu::NexusId) -> crate::pr::ItNexus {
    let b = n.to_be_bytes();
    crate::pr::ItNexus {
        initiator: crate::pr::InitiatorPort::new(
            &format!("iqn.test:n{n}"),
            [0x80, 0, b[4], b[5], b[6], b[7]],
        ),
        rtpi: 1,
    }
}

const BS: u32 = 512;
const BLOCKS: u64 = 2048;
const N: NexusId = 1;
const OTHER: NexusId = 2;

/// A RAM medium with a per-block mapped flag, performing [`IoOp`]s.
struct Ram {
    bytes: Vec<u8>,
    mapped: Vec<bool>,
    ops: Vec<IoOp>,
}

impl Ram {
    fn new(blocks: u64) -> Self {
        Ram {
            bytes: vec![0; (blocks * u64::from(BS)) as usize],
            mapped: vec![false; blocks as usize],
            ops: Vec::new(),
        }
    }

    fn set_mapped(&mut self, offset: u64, len: u64, mapped: bool) {
        let bs = u64::from(BS);
        for b in offset / bs..(offset + len).div_ceil(bs) {
            self.mapped[b as usize] = mapped;
        }
    }

    fn perform(&mut self, op: &IoOp) -> IoResult {
        self.ops.push(op.clone());
        match op {
            IoOp::Read { offset, len } => IoResult::Data(Bytes::copy_from_slice(
                &self.bytes[*offset as usize..(*offset + *len) as usize],
            )),
            IoOp::Write { offset, data, .. } => {
                self.bytes[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
                self.set_mapped(*offset, data.len() as u64, true);
                IoResult::Done
            }
            IoOp::Flush => IoResult::Done,
            IoOp::WriteZeroes { offset, len, unmap } => {
                self.bytes[*offset as usize..(*offset + *len) as usize].fill(0);
                self.set_mapped(*offset, *len, !*unmap);
                IoResult::Done
            }
            IoOp::Unmap { ranges } => {
                for (o, l) in ranges {
                    self.bytes[*o as usize..(*o + *l) as usize].fill(0);
                    self.set_mapped(*o, *l, false);
                }
                IoResult::Done
            }
            IoOp::MapStatus { offset, len } => {
                let bs = u64::from(BS);
                let mut out: Vec<(u64, u64, bool)> = Vec::new();
                for b in offset / bs..(offset + len) / bs {
                    let m = self.mapped[b as usize];
                    match out.last_mut() {
                        Some(last) if last.2 == m => last.1 += bs,
                        _ => out.push((b * bs, bs, m)),
                    }
                }
                IoResult::Extents(out)
            }
            // The LU tests stand in for the daemon: a copy moves nothing here.
            IoOp::ExtendedCopy(job) => IoResult::Copy(crate::xcopy::CopyOutcome {
                segments: u16::try_from(job.segments.len()).unwrap(),
                bytes: 0,
                end: crate::xcopy::CopyEnd::Good,
            }),
        }
    }
}

struct Fixture {
    lu: LogicalUnit,
    ram: Ram,
}

impl Fixture {
    fn new() -> Self {
        Self::with(LuConfig::new(0, BS, BLOCKS, "iqn.2026-01.test:disk"))
    }

    fn with(config: LuConfig) -> Self {
        let ram = Ram::new(config.num_blocks);
        let mut lu = LogicalUnit::new(config);
        lu.add_nexus(N, it(N));
        lu.add_nexus(OTHER, it(OTHER));
        let mut f = Fixture { lu, ram };
        // Consume the power-on unit attentions.
        f.run_on(N, &[0, 0, 0, 0, 0, 0], &[]);
        f.run_on(OTHER, &[0, 0, 0, 0, 0, 0], &[]);
        f
    }

    fn run_on(&mut self, nexus: NexusId, cdb: &[u8], data: &[u8]) -> Completion {
        let mut step = self.lu.execute(nexus, cdb, Bytes::copy_from_slice(data));
        for _ in 0..100_000 {
            match step {
                Step::Done(c) => return c,
                Step::PrCommit(p) => return p.completion,
                Step::Wait(_) => panic!("waits with nothing in flight"),
                Step::Replicate(_) => panic!("not a replicated LU"),
                Step::Io(op, cont) => {
                    let r = self.ram.perform(&op);
                    step = self.lu.resume(nexus, cont, r);
                }
            }
        }
        panic!("command did not finish");
    }

    fn run(&mut self, cdb: &[u8], data: &[u8]) -> Completion {
        self.run_on(N, cdb, data)
    }
}

fn good(c: &Completion) {
    assert_eq!(c.status, status::GOOD, "sense {:02x?}", &c.sense[..]);
}

/// (key, asc, ascq) of fixed-format sense.
fn sense(c: &Completion) -> (u8, u8, u8) {
    assert_eq!(c.status, status::CHECK_CONDITION);
    assert_eq!(c.sense[0] & 0x7F, 0x70);
    (c.sense[2] & 0x0F, c.sense[12], c.sense[13])
}

fn expect(c: &Completion, reason: SenseReason) {
    assert_eq!(sense(c), reason.code(), "sense {:02x?}", &c.sense[..]);
}

fn read10(lba: u32, blocks: u16) -> Vec<u8> {
    let mut c = vec![0x28, 0];
    c.extend(lba.to_be_bytes());
    c.push(0);
    c.extend(blocks.to_be_bytes());
    c.push(0);
    c
}

fn with_op(mut cdb: Vec<u8>, op: u8) -> Vec<u8> {
    cdb[0] = op;
    cdb
}

fn cdb16(op: u8, flags: u8, lba: u64, blocks: u32) -> Vec<u8> {
    let mut c = vec![op, flags];
    c.extend(lba.to_be_bytes());
    c.extend(blocks.to_be_bytes());
    c.extend([0, 0]);
    c
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

const TUR: [u8; 6] = [0, 0, 0, 0, 0, 0];

#[test]
fn new_nexus_gets_power_on_unit_attention_once() {
    let mut f = Fixture::new();
    f.lu.add_nexus(7, it(7));
    // INQUIRY and REPORT LUNS pass without clearing it.
    good(&f.run_on(7, &[0x12, 0, 0, 0, 36, 0], &[]));
    good(&f.run_on(7, &[0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[]));
    expect(&f.run_on(7, &TUR, &[]), SenseReason::PowerOnOrReset);
    good(&f.run_on(7, &TUR, &[]));
}

#[test]
fn unit_attention_precedes_cdb_checks() {
    let mut f = Fixture::new();
    f.lu.add_nexus(7, it(7));
    expect(
        &f.run_on(7, &[0xC0, 0, 0, 0, 0, 0], &[]),
        SenseReason::PowerOnOrReset,
    );
    expect(
        &f.run_on(7, &[0xC0, 0, 0, 0, 0, 0], &[]),
        SenseReason::InvalidOpcode,
    );
    // REPORT LUNS through the LU lists its own LUN.
    let c = f.run_on(7, &[0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[]);
    good(&c);
    assert_eq!(
        &c.data[..16],
        &[0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    );
}

#[test]
fn request_sense_reports_and_clears_unit_attention() {
    let mut f = Fixture::new();
    f.lu.add_nexus(7, it(7));
    let c = f.run_on(7, &[0x03, 0, 0, 0, 252, 0], &[]);
    good(&c);
    assert_eq!(
        (c.data[2], c.data[12], c.data[13]),
        (key::UNIT_ATTENTION, 0x29, 0x00)
    );
    let c = f.run_on(7, &[0x03, 0x01, 0, 0, 252, 0], &[]);
    good(&c);
    assert_eq!(&c.data[..4], &[0x72, 0, 0, 0]);
    good(&f.run_on(7, &TUR, &[]));
}

#[test]
fn lun_reset_raises_unit_attention_on_every_nexus() {
    let mut f = Fixture::new();
    let _ = f.lu.reset(N, ResetKind::LogicalUnit);
    // SAM-5 §6.3.3: the requesting nexus gets the unit attention too.
    expect(&f.run_on(N, &TUR, &[]), SenseReason::BusDeviceResetOccurred);
    good(&f.run_on(N, &TUR, &[]));
    expect(
        &f.run_on(OTHER, &TUR, &[]),
        SenseReason::BusDeviceResetOccurred,
    );
    let _ = f.lu.reset(N, ResetKind::TargetWarm);
    expect(&f.run_on(OTHER, &TUR, &[]), SenseReason::BusResetOccurred);
    let _ = f.lu.reset(N, ResetKind::TargetCold);
    expect(&f.run_on(OTHER, &TUR, &[]), SenseReason::PowerOnOccurred);
    good(&f.run_on(OTHER, &TUR, &[]));
}

#[test]
fn capacity_change_raises_unit_attention_everywhere() {
    let mut f = Fixture::new();
    f.lu.set_num_blocks(BLOCKS * 2);
    expect(
        &f.run_on(N, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]),
        SenseReason::CapacityDataChanged,
    );
    expect(
        &f.run_on(OTHER, &TUR, &[]),
        SenseReason::CapacityDataChanged,
    );
    let c = f.run_on(N, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]);
    assert_eq!(&c.data[..4], &(BLOCKS as u32 * 2 - 1).to_be_bytes());
}

#[test]
fn mode_select_changes_d_sense_and_notifies_others() {
    let mut f = Fixture::new();
    // MODE SENSE(6) control page, DBD.
    let c = f.run(&[0x1A, 0x08, 0x0A, 0, 255, 0], &[]);
    good(&c);
    let mut params = c.data.to_vec();
    params[0] = 0;
    params[4 + 2] |= 0x04; // D_SENSE
    let len = params.len() as u8;
    good(&f.run(&[0x15, 0x10, 0, 0, len, 0], &params));
    assert!(f.lu.d_sense());
    // The other nexus sees MODE PARAMETERS CHANGED, in descriptor format now.
    let c = f.run_on(OTHER, &TUR, &[]);
    assert_eq!(&c.sense[..4], &[0x72, key::UNIT_ATTENTION, 0x2A, 0x01]);
    good(&f.run_on(N, &TUR, &[]));
    // Invalid field in CDB carries its field pointer in descriptor format.
    let c = f.run(&[0x12, 0, 0x80, 0, 255, 0], &[]);
    assert_eq!(&c.sense[..4], &[0x72, key::ILLEGAL_REQUEST, 0x24, 0]);
    assert_eq!(&c.sense[8..15], &[0x02, 0x06, 0, 0, 0xC0, 0, 2]);
    // A LUN reset restores the default (fixed format).
    let _ = f.lu.reset(OTHER, ResetKind::LogicalUnit);
    assert!(!f.lu.d_sense());
    expect(
        &f.run_on(OTHER, &TUR, &[]),
        SenseReason::BusDeviceResetOccurred,
    );
    // Changing an unchangeable bit is INVALID FIELD IN PARAMETER LIST.
    params[4 + 3] ^= 0x10;
    let c = f.run_on(OTHER, &[0x15, 0x10, 0, 0, len, 0], &params);
    expect(
        &c,
        SenseReason::InvalidFieldInParameterList(FieldPointer::byte(0)),
    );
    assert_eq!(&c.sense[15..18], &[0x80 | 0x08 | 4, 0, 7]);
}

#[test]
fn mode_sense6_is_cut_to_allocation_length() {
    let mut f = Fixture::new();
    let c = f.run(&[0x1A, 0, 0x3F, 0, 4, 0], &[]);
    good(&c);
    assert_eq!(c.data.len(), 4);
    let full = f.run(&[0x1A, 0, 0x3F, 0, 255, 0], &[]);
    assert_eq!(usize::from(full.data[0]) + 1, full.data.len());
    assert_eq!(&c.data[..], &full.data[..4]);
    expect(
        &f.run(&[0x1A, 0, 0xFF, 0, 255, 0], &[]),
        SenseReason::SavingParametersNotSupported,
    );
}

#[test]
fn write_then_read_back_all_sizes() {
    let mut f = Fixture::new();
    let data = pattern(4 * BS as usize, 1);
    good(&f.run(&with_op(read10(10, 4), 0x2A), &data));
    let c = f.run(&read10(10, 4), &[]);
    good(&c);
    assert_eq!(&c.data[..], &data[..]);
    let c = f.run(&cdb16(0x88, 0, 10, 4), &[]);
    assert_eq!(&c.data[..], &data[..]);
    let c = f.run(&[0xA8, 0, 0, 0, 0, 10, 0, 0, 0, 4, 0, 0], &[]);
    assert_eq!(&c.data[..], &data[..]);
    // READ(6)/WRITE(6): transfer length 0 means 256 blocks.
    let big = pattern(256 * BS as usize, 9);
    good(&f.run(&[0x0A, 0, 0, 0, 0, 0], &big));
    let c = f.run(&[0x08, 0, 0, 0, 0, 0], &[]);
    assert_eq!(c.data.len(), big.len());
    assert_eq!(&c.data[..], &big[..]);
    // FUA reaches the backstore; with WCE on, a plain write is not FUA.
    good(&f.run(&cdb16(0x8A, 0x08, 0, 1), &data[..BS as usize]));
    assert!(matches!(
        f.ram.ops.last(),
        Some(IoOp::Write { fua: true, .. })
    ));
    good(&f.run(&cdb16(0x8A, 0x10, 0, 1), &data[..BS as usize]));
    assert!(matches!(
        f.ram.ops.last(),
        Some(IoOp::Write { fua: false, .. })
    ));
}

#[test]
fn zero_length_and_out_of_range() {
    let mut f = Fixture::new();
    let end = BLOCKS as u32;
    good(&f.run(&read10(0, 0), &[]));
    good(&f.run(&read10(end, 0), &[]));
    expect(&f.run(&read10(end + 1, 0), &[]), SenseReason::LbaOutOfRange);
    expect(&f.run(&read10(end - 1, 2), &[]), SenseReason::LbaOutOfRange);
    expect(
        &f.run(&read10(u32::MAX, 1), &[]),
        SenseReason::LbaOutOfRange,
    );
    expect(
        &f.run(&cdb16(0x88, 0, u64::MAX, 1), &[]),
        SenseReason::LbaOutOfRange,
    );
    expect(
        &f.run(&cdb16(0x8A, 0, u64::MAX - 1, 2), &[0; 1024]),
        SenseReason::LbaOutOfRange,
    );
    good(&f.run(&read10(end - 1, 1), &[]));
    assert!(f.ram.ops.iter().all(|op| matches!(op, IoOp::Read { .. })));
}

#[test]
fn short_data_out_writes_whole_blocks_that_arrived() {
    let mut f = Fixture::new();
    good(&f.run(&with_op(read10(0, 2), 0x2A), &[b'a'; 1024]));
    // WRITE AND VERIFY(10) BYTCHK=1, 2 blocks, one block of Data-Out.
    good(&f.run(&[0x2E, 0x02, 0, 0, 0, 0, 0, 0, 2, 0], &[b'b'; 512]));
    let c = f.run(&read10(0, 2), &[]);
    assert!(c.data[..512].iter().all(|b| *b == b'b'));
    assert!(c.data[512..].iter().all(|b| *b == b'a'));
    // No Data-Out at all: nothing written, GOOD.
    let before = f.ram.ops.len();
    good(&f.run(&[0x2E, 0x02, 0, 0, 0, 0, 0, 0, 1, 0], &[]));
    assert_eq!(f.ram.ops.len(), before);
    // A partial block is rejected.
    expect(
        &f.run(&with_op(read10(0, 1), 0x2A), &[0; 200]),
        SenseReason::InvalidFieldInCommandIu,
    );
    // Extra Data-Out is ignored.
    good(&f.run(&with_op(read10(0, 1), 0x2A), &[b'c'; 1000]));
    assert!(matches!(f.ram.ops.last(), Some(IoOp::Write { data, .. }) if data.len() == 512));
}

#[test]
fn read_only_lu_rejects_writes() {
    let mut cfg = LuConfig::new(0, BS, BLOCKS, "t");
    cfg.read_only = true;
    let mut f = Fixture::with(cfg);
    let c = f.run(&with_op(read10(0, 1), 0x2A), &[0; 512]);
    assert_eq!(sense(&c), (key::DATA_PROTECT, 0x27, 0));
    expect(
        &f.run(&cdb16(0x93, 0x08, 0, 1), &[0; 512]),
        SenseReason::WriteProtected,
    );
    expect(
        &f.run(&cdb16(0x8B, 0, 0, 1), &[0; 512]),
        SenseReason::WriteProtected,
    );
    good(&f.run(&read10(0, 1), &[]));
    let c = f.run(&[0x1A, 0x08, 0x3F, 0, 255, 0], &[]);
    assert_eq!(c.data[2] & 0x80, 0x80);
}

#[test]
fn orwrite_reads_ors_and_writes() {
    let mut f = Fixture::new();
    good(&f.run(&with_op(read10(5, 1), 0x2A), &[0x0F; 512]));
    good(&f.run(&cdb16(0x8B, 0, 5, 1), &[0xF0; 512]));
    let c = f.run(&read10(5, 1), &[]);
    assert!(c.data.iter().all(|b| *b == 0xFF));
    let n = f.ram.ops.len();
    assert!(matches!(
        f.ram.ops[n - 3],
        IoOp::Read {
            offset: 2560,
            len: 512
        }
    ));
    assert!(matches!(f.ram.ops[n - 2], IoOp::Write { offset: 2560, .. }));
    good(&f.run(&cdb16(0x8B, 0, 5, 0), &[]));
    expect(
        &f.run(&cdb16(0x8B, 0, BLOCKS, 1), &[0; 512]),
        SenseReason::LbaOutOfRange,
    );
}

#[test]
fn verify_compares_and_reports_first_miscompare() {
    let mut f = Fixture::new();
    let data = pattern(3 * 512, 3);
    good(&f.run(&with_op(read10(100, 3), 0x2A), &data));
    good(&f.run(&[0x2F, 0x02, 0, 0, 0, 100, 0, 0, 3, 0], &data));
    let mut bad = data.clone();
    bad[700] ^= b'X';
    let c = f.run(&[0x2F, 0x02, 0, 0, 0, 100, 0, 0, 3, 0], &bad);
    assert_eq!(sense(&c), (key::MISCOMPARE, 0x1D, 0));
    assert_eq!(c.sense[0], 0xF0);
    assert_eq!(&c.sense[3..7], &700u32.to_be_bytes());
    // BYTCHK=0: only the range check.
    good(&f.run(&[0x2F, 0, 0, 0, 0, 100, 0, 0, 3, 0], &bad));
    good(&f.run(&cdb16(0x8F, 0x10, 100, 3), &[]));
    expect(
        &f.run(&cdb16(0x8F, 0, BLOCKS, 1), &[]),
        SenseReason::LbaOutOfRange,
    );
    // VRPROTECT without protection information.
    let c = f.run(&[0x2F, 0x22, 0, 0, 0, 100, 0, 0, 1, 0], &data[..512]);
    expect(&c, SenseReason::InvalidFieldInCdb(FieldPointer::byte(1)));
}

#[test]
fn write_same_pattern_zero_and_unmap() {
    let mut f = Fixture::with(LuConfig::new(0, BS, 4 * BLOCKS, "t"));
    let blocks_lu = 4 * BLOCKS;
    // Non-zero pattern across several chunks.
    let blocks = (WRITE_SAME_CHUNK_BYTES / 512) as u32 + 3;
    let block = pattern(512, 7);
    let mut c = vec![0x41, 0, 0, 0, 0, 0, 0];
    c.extend((blocks as u16).to_be_bytes());
    c.push(0);
    good(&f.run(&c, &block));
    let writes = f
        .ram
        .ops
        .iter()
        .filter(|o| matches!(o, IoOp::Write { .. }))
        .count();
    assert_eq!(writes, 2);
    let r = f.run(&read10(blocks - 1, 1), &[]);
    assert_eq!(&r.data[..], &block[..]);
    // All-zero block → WriteZeroes; UNMAP → WriteZeroes{unmap}.
    good(&f.run(&cdb16(0x93, 0, 0, 4), &[0; 512]));
    assert!(matches!(
        f.ram.ops.last(),
        Some(IoOp::WriteZeroes {
            offset: 0,
            len: 2048,
            unmap: false
        })
    ));
    good(&f.run(&cdb16(0x93, 0x08, 0, 4), &[0; 512]));
    assert!(matches!(
        f.ram.ops.last(),
        Some(IoOp::WriteZeroes { unmap: true, .. })
    ));
    // NDOB: no Data-Out, zeros.
    good(&f.run(&cdb16(0x93, 0x09, 8, 4), &[]));
    expect(
        &f.run(&cdb16(0x93, 0x09, 8, 4), &[0; 512]),
        SenseReason::InvalidFieldInCommandIu,
    );
    // WSNZ: zero blocks rejected; ANCHOR rejected; wrong Data-Out size rejected.
    expect(
        &f.run(&cdb16(0x93, 0x08, 0, 0), &[0; 512]),
        SenseReason::InvalidFieldInCdb(FieldPointer::byte(0)),
    );
    expect(
        &f.run(&cdb16(0x93, 0x10, 0, 1), &[0; 512]),
        SenseReason::InvalidFieldInCdb(FieldPointer::byte(0)),
    );
    expect(
        &f.run(&cdb16(0x93, 0x08, 0, 1), &[0; 256]),
        SenseReason::InvalidFieldInCommandIu,
    );
    expect(
        &f.run(&cdb16(0x93, 0x08, 0, 1), &[0; 1024]),
        SenseReason::InvalidFieldInCommandIu,
    );
    expect(
        &f.run(&cdb16(0x93, 0, blocks_lu, 1), &[1; 512]),
        SenseReason::LbaOutOfRange,
    );
    let mut thick = LuConfig::new(0, BS, BLOCKS, "t");
    thick.thin = false;
    let mut g = Fixture::with(thick);
    expect(
        &g.run(&cdb16(0x93, 0x08, 0, 1), &[0; 512]),
        SenseReason::InvalidFieldInCdb(FieldPointer::byte(0)),
    );
    expect(
        &g.run(&[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], &[0; 24]),
        SenseReason::InvalidOpcode,
    );
    // GET LBA STATUS on a fully provisioned LU: all mapped, without backstore I/O.
    let before = g.ram.ops.len();
    let c = g.run(&get_lba_status(5, 24), &[]);
    good(&c);
    assert_eq!(&c.data[8..16], &5u64.to_be_bytes());
    assert_eq!(&c.data[16..20], &(BLOCKS as u32 - 5).to_be_bytes());
    assert_eq!(c.data[20], 0);
    assert_eq!(g.ram.ops.len(), before);
    // RSOC does not list UNMAP there.
    let c = g.run(&rsoc(false, 0, 0, 0), &[]);
    assert!(c.data[4..].chunks(8).all(|d| d[0] != 0x42));
}

fn unmap_list(descs: &[(u64, u32)]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend(((6 + 16 * descs.len()) as u16).to_be_bytes());
    v.extend(((16 * descs.len()) as u16).to_be_bytes());
    v.extend([0; 4]);
    for (lba, n) in descs {
        v.extend(lba.to_be_bytes());
        v.extend(n.to_be_bytes());
        v.extend([0; 4]);
    }
    v
}

fn unmap_cdb(len: usize) -> Vec<u8> {
    let mut c = vec![0x42, 0, 0, 0, 0, 0, 0];
    c.extend((len as u16).to_be_bytes());
    c.push(0);
    c
}

fn get_lba_status(lba: u64, alloc: u32) -> Vec<u8> {
    let mut c = vec![0x9E, 0x12];
    c.extend(lba.to_be_bytes());
    c.extend(alloc.to_be_bytes());
    c.extend([0, 0]);
    c
}

#[test]
fn unmap_then_get_lba_status() {
    let mut f = Fixture::new();
    good(&f.run(&with_op(read10(0, 300), 0x2A), &vec![b'A'; 300 * 512]));
    let list = unmap_list(&[(0, 10)]);
    good(&f.run(&unmap_cdb(list.len()), &list));
    // Deallocated run at 0..10, then mapped 10..300.
    let c = f.run(&get_lba_status(0, 1024), &[]);
    good(&c);
    assert_eq!(&c.data[8..16], &0u64.to_be_bytes());
    assert_eq!(&c.data[16..20], &10u32.to_be_bytes());
    assert_eq!(c.data[20], 1);
    assert_eq!(&c.data[24..32], &10u64.to_be_bytes());
    assert_eq!(&c.data[32..36], &290u32.to_be_bytes());
    assert_eq!(c.data[36], 0);
    // The first descriptor starts at the requested LBA; 24 bytes = one descriptor.
    let c = f.run(&get_lba_status(11, 24), &[]);
    assert_eq!(c.data.len(), 24);
    assert_eq!(&c.data[8..16], &11u64.to_be_bytes());
    assert_eq!(c.data[20], 0);
    assert_eq!(u32::from_be_bytes(c.data[0..4].try_into().unwrap()), 20);
    expect(
        &f.run(&get_lba_status(BLOCKS, 24), &[]),
        SenseReason::LbaOutOfRange,
    );
    // Reads of deallocated blocks return zeros (LBPRZ).
    let c = f.run(&read10(0, 1), &[]);
    assert!(c.data.iter().all(|b| *b == 0));
}

/// The LBA status descriptors of GET LBA STATUS parameter data: (LBA, blocks, deallocated).
fn lba_descriptors(data: &[u8]) -> Vec<(u64, u32, bool)> {
    data[8..]
        .chunks_exact(16)
        .map(|d| {
            (
                u64::from_be_bytes(d[..8].try_into().unwrap()),
                u32::from_be_bytes(d[8..12].try_into().unwrap()),
                d[12] & 0x0f == 1,
            )
        })
        .collect()
}

/// A LUN of 512-byte logical blocks in 4 KiB physical blocks (LBPPB = 8).
fn lbppb8() -> Fixture {
    let mut c = LuConfig::new(0, BS, BLOCKS, "iqn.2026-01.test:disk");
    c.physical_block_exponent = 3;
    Fixture::with(c)
}

/// SBC-4 §5.8.2: the first descriptor's LBA is the STARTING LOGICAL BLOCK ADDRESS field,
/// also when it is not the first logical block of a physical block.
#[test]
fn get_lba_status_starts_at_an_unaligned_lba_with_eight_blocks_per_physical_block() {
    let mut f = lbppb8();
    good(&f.run(&with_op(read10(0, 264), 0x2A), &vec![b'A'; 264 * 512]));
    // Deallocate the physical block holding LBAs 8..16.
    let list = unmap_list(&[(8, 8)]);
    good(&f.run(&unmap_cdb(list.len()), &list));
    for (lba, want) in [
        (0u64, vec![(0, 8, false), (8, 8, true), (16, 248, false)]),
        (3, vec![(3, 5, false), (8, 8, true), (16, 248, false)]),
        (9, vec![(9, 7, true), (16, 248, false)]),
        (15, vec![(15, 1, true), (16, 248, false)]),
        (16, vec![(16, 248, false)]),
        (17, vec![(17, 247, false)]),
    ] {
        let c = f.run(&get_lba_status(lba, 1024), &[]);
        good(&c);
        let d = lba_descriptors(&c.data);
        assert_eq!(d[..want.len()], want[..], "GET LBA STATUS at {lba}");
        // The rest of the medium was never written: deallocated to the end.
        assert_eq!(d.get(want.len()), Some(&(264, (BLOCKS - 264) as u32, true)));
    }
    // libiscsi GetLBAStatus.UnmapSingle's first loop: unmap physical block i, ask for i + 8.
    for i in (0..256u64).step_by(8) {
        let list = unmap_list(&[(i, 8)]);
        good(&f.run(&unmap_cdb(list.len()), &list));
        let c = f.run(&get_lba_status(i + 8, 24), &[]);
        good(&c);
        assert_eq!(lba_descriptors(&c.data)[0].0, i + 8);
    }
}

/// Deallocated ranges that cross physical block boundaries, and a backstore that reports
/// extents at a coarser granularity than the request (starting before it): the descriptors
/// still start at the requested LBA and are cut at the extents' block boundaries.
#[test]
fn get_lba_status_ranges_crossing_physical_blocks() {
    let mut f = lbppb8();
    good(&f.run(&with_op(read10(0, 64), 0x2A), &vec![b'A'; 64 * 512]));
    // LBAs 4..20: the second half of physical block 0, all of 1, half of 2.
    let list = unmap_list(&[(4, 16)]);
    good(&f.run(&unmap_cdb(list.len()), &list));
    let c = f.run(&get_lba_status(4, 1024), &[]);
    assert_eq!(
        lba_descriptors(&c.data)[..2],
        [(4, 16, true), (20, 44, false)]
    );
    let c = f.run(&get_lba_status(7, 1024), &[]);
    assert_eq!(
        lba_descriptors(&c.data)[..2],
        [(7, 13, true), (20, 44, false)]
    );
    let c = f.run(&get_lba_status(2, 1024), &[]);
    assert_eq!(
        lba_descriptors(&c.data)[..3],
        [(2, 2, false), (4, 16, true), (20, 44, false)]
    );

    // Extents in whole 4 KiB blocks from the start of the medium, as a file system reports
    // holes: block 0 mapped, blocks 1..3 deallocated, the rest mapped.
    let extents = vec![
        (0u64, 4096u64, true),
        (4096, 3 * 4096, false),
        (4 * 4096, (BLOCKS - 32) * 512, true),
    ];
    for (lba, want) in [
        (
            5u64,
            vec![
                (5, 3, false),
                (8, 24, true),
                (32, BLOCKS as u32 - 32, false),
            ],
        ),
        (13, vec![(13, 19, true), (32, BLOCKS as u32 - 32, false)]),
        (33, vec![(33, BLOCKS as u32 - 33, false)]),
    ] {
        let Step::Io(IoOp::MapStatus { offset, .. }, cont) =
            f.lu.execute(N, &get_lba_status(lba, 1024), Bytes::new())
        else {
            panic!("GET LBA STATUS asks the backstore")
        };
        assert_eq!(offset, lba * 512);
        let Step::Done(c) = f.lu.resume(N, cont, IoResult::Extents(extents.clone())) else {
            panic!()
        };
        good(&c);
        assert_eq!(lba_descriptors(&c.data), want, "GET LBA STATUS at {lba}");
    }
}

#[test]
fn unmap_parameter_list_checks() {
    let mut f = Fixture::new();
    // Zero blocks at end of LU, empty list, zero parameter length: GOOD, no I/O.
    let list = unmap_list(&[(BLOCKS, 0)]);
    good(&f.run(&unmap_cdb(list.len()), &list));
    let list = unmap_list(&[]);
    good(&f.run(&unmap_cdb(list.len()), &list));
    good(&f.run(&unmap_cdb(0), &[]));
    assert!(f.ram.ops.is_empty());
    // 256 overlapping zero-block descriptors are fine; 257 exceed the VPD limit.
    let descs: Vec<(u64, u32)> = (0..256).map(|i| (i / 2, 0)).collect();
    let list = unmap_list(&descs);
    good(&f.run(&unmap_cdb(list.len()), &list));
    let descs: Vec<(u64, u32)> = (0..257).map(|i| (i, 0)).collect();
    let list = unmap_list(&descs);
    expect(
        &f.run(&unmap_cdb(list.len()), &list),
        SenseReason::InvalidFieldInParameterList(FieldPointer::byte(0)),
    );
    // Range beyond the end; header shorter than 8; descriptor length beyond the list.
    let list = unmap_list(&[(BLOCKS - 1, 2)]);
    expect(
        &f.run(&unmap_cdb(list.len()), &list),
        SenseReason::LbaOutOfRange,
    );
    expect(
        &f.run(&unmap_cdb(4), &[0, 2, 0, 0]),
        SenseReason::ParameterListLengthError,
    );
    let mut list = unmap_list(&[(0, 1)]);
    list[3] = 32;
    expect(
        &f.run(&unmap_cdb(list.len()), &list),
        SenseReason::ParameterListLengthError,
    );
    // More blocks than MAXIMUM UNMAP LBA COUNT.
    let mut cfg = LuConfig::new(0, BS, BLOCKS, "t");
    cfg.max_unmap_blocks = 8;
    let mut g = Fixture::with(cfg);
    let list = unmap_list(&[(0, 4), (100, 5)]);
    expect(
        &g.run(&unmap_cdb(list.len()), &list),
        SenseReason::InvalidFieldInParameterList(FieldPointer::byte(0)),
    );
}

#[test]
fn read_capacity_10_and_16() {
    let mut f = Fixture::new();
    let c = f.run(&[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]);
    assert_eq!(&c.data[..], &[0, 0, 0x07, 0xFF, 0, 0, 0x02, 0x00]);
    let c = f.run(&cdb16(0x9E, 0x10, 0, 32), &[]);
    good(&c);
    assert_eq!(c.data.len(), 32);
    assert_eq!(&c.data[..8], &(BLOCKS - 1).to_be_bytes());
    assert_eq!(&c.data[8..12], &BS.to_be_bytes());
    assert_eq!(c.data[13] & 0x0F, 0);
    let mut phys = LuConfig::new(0, 512, BLOCKS, "t");
    phys.physical_block_exponent = 3;
    let mut g = LogicalUnit::new(phys);
    let Step::Done(c) = g.execute(N, &cdb16(0x9E, 0x10, 0, 32), Bytes::new()) else {
        panic!()
    };
    assert_eq!(c.data[13] & 0x0F, 3, "4 KiB physical blocks");
    assert_eq!(c.data[14] & 0xC0, 0xC0);
    let mut big = LuConfig::new(0, 4096, 1 << 33, "t");
    big.thin = false;
    let mut g = LogicalUnit::new(big);
    let Step::Done(c) = g.execute(N, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], Bytes::new()) else {
        panic!()
    };
    assert_eq!(&c.data[..], &[0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0x10, 0]);
    let Step::Done(c) = g.execute(N, &cdb16(0x9E, 0x10, 0, 32), Bytes::new()) else {
        panic!()
    };
    assert_eq!(&c.data[..8], &((1u64 << 33) - 1).to_be_bytes());
    assert_eq!(c.data[14], 0);
}

#[test]
fn inquiry_standard_vpd_and_allocation_length() {
    let mut f = Fixture::new();
    for alloc in [5u8, 36, 95, 255] {
        let c = f.run(&[0x12, 0, 0, 0, alloc, 0], &[]);
        good(&c);
        assert_eq!(c.data.len(), usize::from(alloc).min(vpd::STANDARD_LEN));
    }
    let a = f.run(&[0x12, 0, 0, 0x01, 0xFF, 0], &[]);
    let b = f.run(&[0x12, 0, 0, 0x02, 0x00, 0], &[]);
    assert_eq!(a.data, b.data);
    expect(
        &f.run(&[0x12, 0, 0x83, 0, 255, 0], &[]),
        SenseReason::InvalidFieldInCdb(FieldPointer::byte(0)),
    );
    expect(
        &f.run(&[0x12, 1, 0x42, 0, 255, 0], &[]),
        SenseReason::InvalidFieldInCdb(FieldPointer::byte(0)),
    );
    let c = f.run(&[0x12, 1, 0x00, 0, 255, 0], &[]);
    assert_eq!(&c.data[4..], vpd::SUPPORTED_PAGES);
    let c = f.run(&[0x12, 1, 0xB0, 0, 255, 0], &[]);
    assert_eq!(usize::from(c.data[3]) + 4, c.data.len());
}

fn rsoc(rctd: bool, options: u8, opcode: u8, sa: u16) -> Vec<u8> {
    let mut c = vec![0xA3, 0x0C, u8::from(rctd) << 7 | options, opcode];
    c.extend(sa.to_be_bytes());
    c.extend(65535u32.to_be_bytes());
    c.extend([0, 0]);
    c
}

#[test]
fn report_supported_opcodes_all_and_one() {
    let mut f = Fixture::new();
    let c = f.run(&rsoc(false, 0, 0, 0), &[]);
    good(&c);
    let len = u32::from_be_bytes(c.data[..4].try_into().unwrap()) as usize;
    assert_eq!(len, c.data.len() - 4);
    assert_eq!(len, 8 * cdb::COMMANDS.len());
    let descs: Vec<&[u8]> = c.data[4..].chunks(8).collect();
    for (d, info) in descs.iter().zip(cdb::COMMANDS) {
        assert_eq!(d[0], info.opcode);
        let servactv = d[5] & 1 == 1;
        assert_eq!(servactv, info.service_action.is_some());
        if !servactv {
            assert_eq!(&d[2..4], &[0, 0]);
        }
        assert_eq!(d[5] & 2, 0);
        // Reporting options 1 for plain opcodes, 2 for those with service actions.
        let sa = u16::from_be_bytes([d[2], d[3]]);
        let (ok, bad) = if servactv { (2, 1) } else { (1, 2) };
        let one = f.run(&rsoc(false, ok, d[0], sa), &[]);
        good(&one);
        assert_eq!(one.data[1] & 0x07, 3);
        assert_eq!(
            usize::from(u16::from_be_bytes([one.data[2], one.data[3]])),
            info.cdb_len()
        );
        assert_eq!(&one.data[4..], info.usage);
        expect(
            &f.run(&rsoc(false, bad, d[0], sa), &[]),
            SenseReason::InvalidFieldInCdb(FieldPointer::byte(0)),
        );
    }
    // RCTD: every descriptor has CTDP and a 0Ah-long timeouts descriptor.
    let c = f.run(&rsoc(true, 0, 0, 0), &[]);
    for d in c.data[4..].chunks(20) {
        assert_eq!(d[5] & 2, 2);
        assert_eq!(&d[8..10], &[0, 0x0A]);
    }
    let one = f.run(&rsoc(true, 1, 0x28, 0), &[]);
    assert_eq!(one.data[1], 0x83);
    assert_eq!(one.data.len(), 4 + 10 + 12);
    // Unsupported opcode: SUPPORT 001b.
    let one = f.run(&rsoc(false, 1, 0xC0, 0), &[]);
    assert_eq!(&one.data[..], &[0, 1, 0, 0]);
}

#[test]
fn report_luns_formats_and_checks() {
    let cdb = |select: u8, alloc: u32| {
        let mut c = vec![0xA0, 0, select, 0, 0, 0];
        c.extend(alloc.to_be_bytes());
        c.extend([0, 0]);
        c
    };
    let c = report_luns(&cdb(0, 256), &[300, 0, 5, 20000]);
    good(&c);
    assert_eq!(&c.data[..8], &[0, 0, 0, 24, 0, 0, 0, 0]);
    assert_eq!(&c.data[8..16], &[0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(&c.data[16..24], &[0, 5, 0, 0, 0, 0, 0, 0]);
    assert_eq!(&c.data[24..32], &[0x41, 0x2C, 0, 0, 0, 0, 0, 0]);
    let c = report_luns(&cdb(0, 16), &[0, 1, 2]);
    assert_eq!(c.data.len(), 16);
    assert_eq!(&c.data[..4], &[0, 0, 0, 24]);
    let c = report_luns(&cdb(1, 16), &[0, 1]);
    assert_eq!(&c.data[..], &[0; 8]);
    let c = report_luns(&cdb(0, 15), &[0]);
    assert_eq!(
        sense(&c),
        SenseReason::InvalidFieldInCdb(FieldPointer::byte(0)).code()
    );
    assert_eq!(&c.sense[15..18], &[0xC0, 0, 6]);
    let c = report_luns(&cdb(3, 256), &[0]);
    assert_eq!(&c.sense[15..18], &[0xC0, 0, 2]);
}

#[test]
fn no_such_lun_answers() {
    let c = no_such_lun(&[0x12, 0, 0, 0, 36, 0]);
    good(&c);
    assert_eq!(c.data[0], 0x7F);
    let c = no_such_lun(&[0x03, 0, 0, 0, 18, 0]);
    good(&c);
    assert_eq!((c.data[2], c.data[12]), (key::ILLEGAL_REQUEST, 0x25));
    expect(&no_such_lun(&TUR), SenseReason::LogicalUnitNotSupported);
    expect(
        &no_such_lun(&[0xFF; 16]),
        SenseReason::LogicalUnitNotSupported,
    );
}

#[test]
fn misc_commands() {
    let mut f = Fixture::new();
    // SYNCHRONIZE CACHE → Flush; PRE-FETCH GOOD; range checks.
    good(&f.run(&[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]));
    assert!(matches!(f.ram.ops.last(), Some(IoOp::Flush)));
    expect(
        &f.run(&cdb16(0x91, 0, BLOCKS, 1), &[]),
        SenseReason::LbaOutOfRange,
    );
    good(&f.run(&[0x34, 0x02, 0, 0, 0x07, 0xFF, 0x03, 0, 1, 0], &[]));
    good(&f.run(&cdb16(0x90, 0, BLOCKS - 256, 256), &[]));
    expect(
        &f.run(&cdb16(0x90, 0, BLOCKS, 1), &[]),
        SenseReason::LbaOutOfRange,
    );
    // START STOP UNIT and PREVENT ALLOW MEDIUM REMOVAL are accepted; medium stays ready.
    good(&f.run(&[0x1B, 1, 0, 0, 0x02, 0], &[]));
    good(&f.run(&[0x1E, 0, 0, 0, 1, 0], &[]));
    good(&f.run(&TUR, &[]));
    good(&f.run(&[0x1E, 0, 0, 0, 0, 0], &[]));
    // Unknown opcode; unknown service action.
    expect(
        &f.run(&[0xC0, 0, 0, 0, 0, 0], &[]),
        SenseReason::InvalidOpcode,
    );
    expect(
        &f.run(&cdb16(0x9E, 0x1F, 0, 0), &[]),
        SenseReason::InvalidFieldInCdb(FieldPointer::byte(0)),
    );
}

#[test]
fn backstore_errors_map_to_sense() {
    let mut f = Fixture::new();
    let Step::Io(_, cont) = f.lu.execute(N, &read10(0, 1), Bytes::new()) else {
        panic!()
    };
    let Step::Done(c) =
        f.lu.resume(N, cont, IoResult::Error(IoErrorKind::ReadError))
    else {
        panic!()
    };
    expect(&c, SenseReason::UnrecoveredReadError);
    let Step::Io(_, cont) =
        f.lu.execute(N, &with_op(read10(0, 1), 0x2A), Bytes::from(vec![0; 512]))
    else {
        panic!()
    };
    let Step::Done(c) = f.lu.resume(N, cont, IoResult::Error(IoErrorKind::NoSpace)) else {
        panic!()
    };
    expect(&c, SenseReason::SpaceAllocationFailed);
    // A result of the wrong shape is an internal failure, not a panic.
    let Step::Io(_, cont) = f.lu.execute(N, &read10(0, 1), Bytes::new()) else {
        panic!()
    };
    let Step::Done(c) = f.lu.resume(N, cont, IoResult::Done) else {
        panic!()
    };
    expect(&c, SenseReason::InternalTargetFailure);
}

#[test]
fn four_k_blocks() {
    let mut f = Fixture::with(LuConfig::new(3, 4096, 256, "t"));
    let data = pattern(8192, 5);
    good(&f.run(&with_op(read10(2, 2), 0x2A), &data));
    let c = f.run(&read10(2, 2), &[]);
    assert_eq!(&c.data[..], &data[..]);
    assert!(matches!(f.ram.ops[0], IoOp::Write { offset: 8192, .. }));
}

mod prop {
    use super::*;
    use proptest::prelude::*;

    fn cdb_strategy() -> impl Strategy<Value = Vec<u8>> {
        let opcodes: Vec<u8> = cdb::COMMANDS.iter().map(|c| c.opcode).collect();
        (
            proptest::sample::select(opcodes),
            proptest::collection::vec(any::<u8>(), 0..20),
        )
            .prop_map(|(op, mut rest)| {
                rest.insert(0, op);
                rest
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Any byte string: parse never panics.
        #[test]
        fn parse_never_panics(cdb in proptest::collection::vec(any::<u8>(), 0..32)) {
            let _ = cdb::parse(&cdb);
            let _ = no_such_lun(&cdb);
            let _ = report_luns(&cdb, &[0, 1, 300]);
        }

        /// Any CDB of a known opcode with any Data-Out: the LU finishes with GOOD or CHECK
        /// CONDITION (with sense), and every I/O it issues lies within the medium (the RAM
        /// model would panic otherwise).
        #[test]
        fn execute_is_total(cdb in cdb_strategy(), data in proptest::collection::vec(any::<u8>(), 0..1200)) {
            let mut f = Fixture::with(LuConfig::new(0, BS, 64, "t"));
            let c = f.run(&cdb, &data);
            prop_assert!(c.status == status::GOOD || c.status == status::CHECK_CONDITION);
            prop_assert_eq!(c.status == status::CHECK_CONDITION, !c.sense.is_empty());
        }
    }
}

/// Implicit ALUA (SPC-4 §5.16): nexus `N` on port 1 (group 1), `OTHER` on port 2 (group 2).
/// Putting group 2 in standby raises 2Ah/06h on every nexus; then port 2 gets 04h/0Bh for
/// media access while INQUIRY, REPORT TARGET PORT GROUPS and MODE SENSE still work there,
/// and port 1 keeps reading and writing. VPD 83h names each port's group.
#[test]
fn alua_standby_and_unavailable_per_port_group() {
    use crate::alua::{AccessState, PortGroup, PortGroups};
    let mut c = LuConfig::new(0, BS, BLOCKS, "iqn.2026-01.test:disk");
    c.relative_ports = vec![1, 2];
    let g2 = PortGroup {
        id: 2,
        state: AccessState::ActiveOptimized,
        ports: vec![2],
        changed: false,
    };
    c.port_groups = PortGroups::new(vec![g2], &[1, 2]);
    let ram = Ram::new(BLOCKS);
    let mut lu = LogicalUnit::new(c);
    let mut other = it(OTHER);
    other.rtpi = 2;
    lu.add_nexus(N, it(N));
    lu.add_nexus(OTHER, other);
    let mut f = Fixture { lu, ram };
    f.run_on(N, &[0; 6], &[]);
    f.run_on(OTHER, &[0; 6], &[]);
    good(&f.run_on(OTHER, &read10(0, 1), &[]));

    assert_eq!(f.lu.set_port_group_state(2, AccessState::Standby), Ok(true));
    assert_eq!(
        f.lu.set_port_group_state(2, AccessState::Standby),
        Ok(false)
    );
    assert!(f.lu.set_port_group_state(9, AccessState::Standby).is_err());
    for n in [N, OTHER] {
        expect(
            &f.run_on(n, &read10(0, 1), &[]),
            SenseReason::AsymmetricAccessStateChanged,
        );
    }
    expect(
        &f.run_on(OTHER, &read10(0, 1), &[]),
        SenseReason::AluaStandby,
    );
    expect(&f.run_on(OTHER, &[0; 6], &[]), SenseReason::AluaStandby);
    good(&f.run_on(OTHER, &[0x1A, 0, 0x3F, 0, 255, 0], &[]));
    let inq = f.run_on(OTHER, &[0x12, 0, 0, 0, 96, 0], &[]);
    good(&inq);
    assert_eq!(inq.data[5] & 0x30, 0x10, "TPGS = implicit");
    let rtpg = f.run_on(OTHER, &[0xA3, 0x0A, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[]);
    good(&rtpg);
    assert_eq!(rtpg.data[4] & 0x0F, 0x0, "group 1 active/optimized");
    assert_eq!(&rtpg.data[6..8], &[0, 1]);
    assert_eq!(rtpg.data[16] & 0x0F, 0x2, "group 2 standby");
    assert_eq!(&rtpg.data[18..20], &[0, 2]);
    assert_eq!(rtpg.data[21], 0x02, "status: implicit change");
    // Port 1 serves I/O.
    let data = pattern(512, 3);
    good(&f.run_on(N, &with_op(read10(0, 1), 0x2A), &data));
    assert_eq!(f.run_on(N, &read10(0, 1), &[]).data.as_ref(), &data[..]);
    // VPD 83h: each port's target port group designator (type 5).
    let tpg_of = |f: &mut Fixture, n| {
        let d = f.run_on(n, &[0x12, 1, 0x83, 0, 255, 0], &[]).data;
        let mut at = 4;
        while at + 4 <= d.len() {
            let len = usize::from(d[at + 3]);
            if d[at + 1] & 0x3F == 0x15 {
                return u16::from_be_bytes([d[at + 6], d[at + 7]]);
            }
            at += 4 + len;
        }
        panic!("no target port group designator");
    };
    assert_eq!(tpg_of(&mut f, N), 1);
    assert_eq!(tpg_of(&mut f, OTHER), 2);

    f.lu.set_port_group_state(2, AccessState::Unavailable)
        .unwrap();
    expect(
        &f.run_on(OTHER, &[0; 6], &[]),
        SenseReason::AsymmetricAccessStateChanged,
    );
    expect(
        &f.run_on(OTHER, &[0x1A, 0, 0x3F, 0, 255, 0], &[]),
        SenseReason::AluaUnavailable,
    );
    f.lu.set_port_group_state(2, AccessState::ActiveNonOptimized)
        .unwrap();
    expect(
        &f.run_on(OTHER, &[0; 6], &[]),
        SenseReason::AsymmetricAccessStateChanged,
    );
    good(&f.run_on(OTHER, &read10(0, 1), &[]));
}
#[path = "lu_misc_tests.rs"]
mod misc;

/// MODE SELECT(10) of the control page from `nexus` with TAS `on` (the current page, as
/// MODE SENSE(10) gives it).
fn set_tas(f: &mut Fixture, nexus: NexusId, on: bool) -> Completion {
    let ms = f.run_on(nexus, &[0x5A, 0x08, 0x0A, 0, 0, 0, 0, 0, 0xFF, 0], &[]);
    good(&ms);
    let mut list = ms.data.to_vec();
    list[..2].fill(0); // MODE DATA LENGTH is reserved in MODE SELECT
    list[3] = 0;
    if on {
        list[8 + 5] |= 0x40;
    } else {
        list[8 + 5] &= !0x40;
    }
    let mut cdb = vec![0x55, 0x10, 0, 0, 0, 0, 0];
    cdb.extend((list.len() as u16).to_be_bytes());
    cdb.push(0);
    f.run_on(nexus, &cdb, &list)
}

/// A WRITE (10) of one block by `nexus` that got its I/O (a task in the task set).
fn start_write(f: &mut Fixture, nexus: NexusId) -> Continuation {
    match f.lu.execute(
        nexus,
        &[0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0],
        Bytes::from(vec![0x5Au8; BS as usize]),
    ) {
        Step::Io(_, cont) => cont,
        other => panic!("{other:?}"),
    }
}

/// SPC-4 §6.12, §7.5.8: TAS is changeable through MODE SELECT(10); the change is the LU's,
/// MODE SENSE shows it (changeable mask included) and the other nexus gets MODE PARAMETERS
/// CHANGED. An empty list is no change; SP=1 and PF=0 are INVALID FIELD IN CDB.
#[test]
fn mode_select_10_changes_tas() {
    let mut f = Fixture::new();
    let mask = f.run(&[0x5A, 0x08, 0x4A, 0, 0, 0, 0, 0, 0xFF, 0], &[]);
    assert_eq!(mask.data[8 + 5], 0x40);
    good(&set_tas(&mut f, N, false));
    assert!(!f.lu.mode_values().tas);
    let cur = f.run_on(N, &[0x1A, 0x08, 0x0A, 0, 0xFF, 0], &[]);
    assert_eq!(cur.data[4 + 5] & 0x40, 0);
    expect(
        &f.run_on(OTHER, &TUR, &[]),
        SenseReason::ModeParametersChanged,
    );
    good(&f.run_on(OTHER, &TUR, &[]));
    // Setting the same value again changes nothing: no unit attention.
    good(&set_tas(&mut f, OTHER, false));
    good(&f.run_on(N, &TUR, &[]));
    // Parameter list length 0: GOOD, nothing changes (PF and SP aside).
    good(&f.run(&[0x55, 0x00, 0, 0, 0, 0, 0, 0, 0, 0], &[]));
    good(&f.run_on(OTHER, &TUR, &[]));
    expect(
        &f.run(&[0x55, 0x11, 0, 0, 0, 0, 0, 0, 0, 0], &[]),
        SenseReason::InvalidFieldInCdb(FieldPointer::bit(1, 0)),
    );
    let ms = f.run(&[0x5A, 0x08, 0x0A, 0, 0, 0, 0, 0, 0xFF, 0], &[]);
    let mut list = ms.data.to_vec();
    list[..2].fill(0);
    let c = f.run(&[0x55, 0x00, 0, 0, 0, 0, 0, 0, list.len() as u8, 0], &list);
    expect(&c, SenseReason::InvalidFieldInCdb(FieldPointer::bit(1, 4)));
    assert_eq!(&c.sense[15..18], &[0x80 | 0x40 | 0x08 | 4, 0, 1]);
    // A page length that does not match: INVALID FIELD IN PARAMETER LIST at that byte.
    list[8 + 1] = 0x0B;
    list.push(0);
    let c = f.run(&[0x55, 0x10, 0, 0, 0, 0, 0, 0, list.len() as u8, 0], &list);
    expect(
        &c,
        SenseReason::InvalidFieldInParameterList(FieldPointer::byte(9)),
    );
    assert_eq!(&c.sense[15..18], &[0x80, 0, 9]);
}

/// SAM-5 §5.6, §7.4, SPC-4 §7.5.8: with TAS=0 the tasks of other nexuses that CLEAR TASK SET
/// or a LUN RESET abort end without status, and the nexus learns it from a unit attention
/// (2Fh/00h after CLEAR TASK SET, the reset's 29h/03h after a LUN RESET); with TAS=1 they end
/// TASK ABORTED and CLEAR TASK SET raises nothing. The issuer's own tasks keep TASK ABORTED
/// (its transport drops them). A reset restores TAS=1.
#[test]
fn tas_zero_ends_other_nexus_tasks_without_status() {
    let mut f = Fixture::new();
    // TAS=1: TASK ABORTED, no unit attention.
    let o = start_write(&mut f, OTHER);
    let t = f.lu.clear_task_set(N).unwrap();
    assert_eq!(
        f.lu.resume(OTHER, o, IoResult::Done),
        Step::Done(Completion::task_aborted())
    );
    assert!(f.lu.abort_drained(t));
    good(&f.run_on(OTHER, &TUR, &[]));

    good(&set_tas(&mut f, OTHER, false));
    expect(&f.run_on(N, &TUR, &[]), SenseReason::ModeParametersChanged);
    let o = start_write(&mut f, OTHER);
    let n = start_write(&mut f, N);
    let t = f.lu.clear_task_set(N).unwrap();
    assert!(!f.lu.abort_drained(t));
    let end = f.lu.resume(OTHER, o, IoResult::Done);
    assert_eq!(end, Step::Done(Completion::no_status()));
    let Step::Done(c) = end else { unreachable!() };
    assert!(!c.has_status());
    assert_eq!(
        f.lu.resume(N, n, IoResult::Done),
        Step::Done(Completion::task_aborted())
    );
    assert!(f.lu.abort_drained(t));
    expect(
        &f.run_on(OTHER, &TUR, &[]),
        SenseReason::CommandsClearedByAnotherInitiator,
    );
    good(&f.run_on(OTHER, &TUR, &[]));
    good(&f.run_on(N, &TUR, &[]));
    // A command that arrived before the function but starts only now: the same.
    assert_eq!(f.lu.aborted_before_start(OTHER), Completion::no_status());
    assert_eq!(f.lu.aborted_before_start(N), Completion::task_aborted());
    expect(
        &f.run_on(OTHER, &TUR, &[]),
        SenseReason::CommandsClearedByAnotherInitiator,
    );

    // LUN RESET under TAS=0: no status, the reset's unit attention only.
    let o = start_write(&mut f, OTHER);
    let t = f.lu.reset(N, ResetKind::LogicalUnit).unwrap();
    assert_eq!(
        f.lu.resume(OTHER, o, IoResult::Done),
        Step::Done(Completion::no_status())
    );
    assert!(f.lu.abort_drained(t));
    assert_eq!(f.lu.aborted_before_start(OTHER), Completion::no_status());
    expect(
        &f.run_on(OTHER, &TUR, &[]),
        SenseReason::BusDeviceResetOccurred,
    );
    good(&f.run_on(OTHER, &TUR, &[]));
    // The reset brought back the default TAS=1.
    assert!(f.lu.mode_values().tas);
    expect(&f.run_on(N, &TUR, &[]), SenseReason::BusDeviceResetOccurred);
    let o = start_write(&mut f, OTHER);
    let _ = f.lu.reset(N, ResetKind::TargetWarm).unwrap();
    assert_eq!(
        f.lu.resume(OTHER, o, IoResult::Done),
        Step::Done(Completion::task_aborted())
    );
    assert_eq!(f.lu.aborted_before_start(OTHER), Completion::task_aborted());
}
