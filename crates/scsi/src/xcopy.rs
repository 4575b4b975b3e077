//! EXTENDED COPY (LID1) parameter lists and RECEIVE COPY RESULTS (SPC-4 §6.4, §6.18).
//!
//! The LU parses and bounds the parameter list ([`parse`]) into a [`CopyJob`]: identification
//! CSCD descriptors (E4h, SPC-4 §6.4.5.6) and block → block segment descriptors (02h, SPC-4
//! §6.4.6.5). It cannot see other logical units, so resolving a descriptor's designator to a
//! logical unit and moving the data is the daemon's part; it reports a [`CopyOutcome`]. The
//! LU keeps a small bounded table of recent copies per I_T nexus ([`CopyTable`]) for
//! RECEIVE COPY RESULTS: COPY STATUS (§6.18.3) and OPERATING PARAMETERS (§6.18.4).

use std::collections::VecDeque;

use crate::sense::{FieldPointer, SenseReason};

/// Parameter list header length (SPC-4 §6.4.3, table 107).
pub const HEADER_LEN: usize = 16;
/// Length of an identification CSCD descriptor (SPC-4 §6.4.5.6).
pub const CSCD_LEN: usize = 32;
/// Length of a block → block segment descriptor, header included (SPC-4 §6.4.6.5).
pub const B2B_LEN: usize = 28;

/// CSCD descriptor type code: identification descriptor (SPC-4 table 110).
pub const CSCD_IDENTIFICATION: u8 = 0xE4;
/// Segment descriptor type code: block device to block device (SPC-4 table 109).
pub const SEG_BLOCK_TO_BLOCK: u8 = 0x02;

/// What this copy manager supports (reported in OPERATING PARAMETERS and enforced by
/// [`parse`]).
pub const MAX_CSCD_DESCRIPTORS: u16 = 8;
pub const MAX_SEGMENT_DESCRIPTORS: u16 = 64;
/// Maximum CSCD + segment descriptor list length: the two maxima together.
pub const MAX_DESCRIPTOR_LIST_LEN: u32 = 8 * 32 + 64 * 28;
/// Copies one I_T nexus may have in progress and the target in total.
pub const MAX_CONCURRENT_COPIES: u8 = 16;
/// Copy records the LU keeps for COPY STATUS (oldest completed first out).
pub const MAX_COPY_RECORDS: usize = 64;

/// A designation descriptor naming a copy target (SPC-4 §7.8.6.1 layout).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Designator {
    pub code_set: u8,
    /// ASSOCIATION (0: logical unit).
    pub association: u8,
    /// DESIGNATOR TYPE (3: NAA).
    pub kind: u8,
    pub id: Vec<u8>,
}

impl Designator {
    /// The 16-byte NAA identifier of a logical unit, if this designator is one.
    pub fn lu_naa(&self) -> Option<[u8; 16]> {
        if self.kind != 3 || self.association != 0 {
            return None;
        }
        <[u8; 16]>::try_from(self.id.as_slice()).ok()
    }
}

/// One copy target (CSCD descriptor E4h, peripheral device type 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyTarget {
    pub designator: Designator,
    /// DISK BLOCK LENGTH (device type specific parameters); 0 when not given.
    pub block_len: u32,
}

/// One block → block segment: `blocks` logical blocks from `src_lba` of target `src` to
/// `dst_lba` of target `dst` (indices into [`CopyJob::targets`], already checked).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub src: u16,
    pub dst: u16,
    pub blocks: u16,
    pub src_lba: u64,
    pub dst_lba: u64,
}

/// A parsed EXTENDED COPY parameter list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyJob {
    pub list_id: u8,
    /// LIST ID USAGE 11b: no status is kept (the list identifier is not used).
    pub retain_status: bool,
    pub targets: Vec<CopyTarget>,
    pub segments: Vec<Segment>,
}

/// How a copy performed by the daemon ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyOutcome {
    /// Segments completed.
    pub segments: u16,
    /// Bytes written to destinations.
    pub bytes: u64,
    pub end: CopyEnd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyEnd {
    Good,
    /// CHECK CONDITION with this sense.
    Failed(SenseReason),
    /// A copy target refused the issuing nexus's access (persistent reservation).
    Conflict,
    /// Aborted by a task management function (TASK ABORTED, TAS=1).
    Aborted,
}

fn be(d: &[u8], at: usize, n: usize) -> u64 {
    (0..n).fold(0u64, |acc, i| {
        acc << 8 | u64::from(d.get(at.wrapping_add(i)).copied().unwrap_or(0))
    })
}

fn field(byte: usize) -> FieldPointer {
    FieldPointer::byte(u16::try_from(byte).unwrap_or(u16::MAX))
}

/// Parse an EXTENDED COPY (LID1) parameter list of `param_len` bytes (the CDB's PARAMETER LIST
/// LENGTH) from `data` (the Data-Out). `Ok(None)`: PARAMETER LIST LENGTH zero, nothing to do
/// (SPC-4 §6.4.1). Checks, in order: lengths (PARAMETER LIST LENGTH ERROR), LIST ID USAGE,
/// inline data (none supported), descriptor counts (TOO MANY ...), descriptor types
/// (UNSUPPORTED ... TYPE CODE), then segment fields; a segment naming an absent CSCD
/// descriptor is COPY ABORTED, COPY TARGET DEVICE NOT REACHABLE.
pub fn parse(param_len: u32, data: &[u8]) -> Result<Option<CopyJob>, SenseReason> {
    if param_len == 0 {
        return Ok(None);
    }
    let n = usize::try_from(param_len).map_err(|_| SenseReason::ParameterListLengthError)?;
    let list = data.get(..n).ok_or(SenseReason::ParameterListLengthError)?;
    let header = list
        .get(..HEADER_LEN)
        .ok_or(SenseReason::ParameterListLengthError)?;
    let list_id = header.first().copied().unwrap_or(0);
    let flags = header.get(1).copied().unwrap_or(0);
    let usage = (flags >> 3) & 0x03;
    if usage == 0x01 {
        return Err(SenseReason::InvalidFieldInParameterList(FieldPointer::bit(
            1, 3,
        )));
    }
    let cscd_len = be(header, 2, 2);
    let seg_len = be(header, 8, 4);
    let inline_len = be(header, 12, 4);
    let total = cscd_len
        .checked_add(seg_len)
        .and_then(|x| x.checked_add(inline_len))
        .and_then(|x| x.checked_add(HEADER_LEN as u64))
        .ok_or(SenseReason::ParameterListLengthError)?;
    if total > u64::from(param_len) {
        return Err(SenseReason::ParameterListLengthError);
    }
    if cscd_len.saturating_add(seg_len) > u64::from(MAX_DESCRIPTOR_LIST_LEN) {
        return Err(SenseReason::ParameterListLengthError);
    }
    if inline_len != 0 {
        return Err(SenseReason::InlineDataLengthExceeded);
    }
    // Both lengths are now bounded by MAX_DESCRIPTOR_LIST_LEN.
    let cscd_len = usize::try_from(cscd_len).map_err(|_| SenseReason::ParameterListLengthError)?;
    let seg_len = usize::try_from(seg_len).map_err(|_| SenseReason::ParameterListLengthError)?;
    if cscd_len.div_ceil(CSCD_LEN) > usize::from(MAX_CSCD_DESCRIPTORS) {
        return Err(SenseReason::TooManyTargetDescriptors);
    }
    let cscds = list
        .get(HEADER_LEN..HEADER_LEN + cscd_len)
        .ok_or(SenseReason::ParameterListLengthError)?;
    let segs = list
        .get(HEADER_LEN + cscd_len..HEADER_LEN + cscd_len + seg_len)
        .ok_or(SenseReason::ParameterListLengthError)?;
    let targets = parse_targets(cscds)?;
    let segments = parse_segments(segs, HEADER_LEN + cscd_len, targets.len())?;
    Ok(Some(CopyJob {
        list_id,
        retain_status: usage != 0x03,
        targets,
        segments,
    }))
}

/// CSCD descriptors: identification (E4h) of a block device only.
fn parse_targets(list: &[u8]) -> Result<Vec<CopyTarget>, SenseReason> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while at < list.len() {
        let d = list.get(at..).unwrap_or_default();
        if d.first().copied() != Some(CSCD_IDENTIFICATION) {
            return Err(SenseReason::UnsupportedTargetDescriptorType);
        }
        let d = d
            .get(..CSCD_LEN)
            .ok_or(SenseReason::ParameterListLengthError)?;
        let base = HEADER_LEN.saturating_add(at);
        // [1] LU ID TYPE (7:6, ignored by SPC-4), NUL (5, obsolete), PERIPHERAL DEVICE TYPE.
        if d.get(1).copied().unwrap_or(0) & 0x1F != 0 {
            return Err(SenseReason::InvalidCopyOperation);
        }
        // [4..24] designation descriptor: code set, association/type, length, designator.
        let id_len = usize::from(d.get(7).copied().unwrap_or(0));
        let id = d
            .get(8..8usize.saturating_add(id_len))
            .filter(|_| id_len <= 16)
            .ok_or(SenseReason::InvalidFieldInParameterList(field(base + 7)))?;
        let b5 = d.get(5).copied().unwrap_or(0);
        out.push(CopyTarget {
            designator: Designator {
                code_set: d.get(4).copied().unwrap_or(0) & 0x0F,
                association: (b5 >> 4) & 0x03,
                kind: b5 & 0x0F,
                id: id.to_vec(),
            },
            // [28] PAD, [29..32] DISK BLOCK LENGTH.
            block_len: u32::try_from(be(d, 29, 3)).unwrap_or(0),
        });
        at = at.saturating_add(CSCD_LEN);
    }
    Ok(out)
}

/// Segment descriptors: block → block (02h) only. `base` is the list's offset in the
/// parameter list (for field pointers).
fn parse_segments(list: &[u8], base: usize, targets: usize) -> Result<Vec<Segment>, SenseReason> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while at < list.len() {
        if out.len() >= usize::from(MAX_SEGMENT_DESCRIPTORS) {
            return Err(SenseReason::TooManySegmentDescriptors);
        }
        let d = list.get(at..).unwrap_or_default();
        let head = d.get(..4).ok_or(SenseReason::ParameterListLengthError)?;
        if head.first().copied() != Some(SEG_BLOCK_TO_BLOCK) {
            return Err(SenseReason::UnsupportedSegmentDescriptorType);
        }
        let len = usize::try_from(be(head, 2, 2)).unwrap_or(usize::MAX);
        if len != B2B_LEN - 4 {
            return Err(SenseReason::InvalidFieldInParameterList(field(
                base.saturating_add(at).saturating_add(2),
            )));
        }
        let d = d
            .get(..B2B_LEN)
            .ok_or(SenseReason::ParameterListLengthError)?;
        let seg = Segment {
            src: u16::try_from(be(d, 4, 2)).unwrap_or(u16::MAX),
            dst: u16::try_from(be(d, 6, 2)).unwrap_or(u16::MAX),
            blocks: u16::try_from(be(d, 10, 2)).unwrap_or(u16::MAX),
            src_lba: be(d, 12, 8),
            dst_lba: be(d, 20, 8),
        };
        if usize::from(seg.src) >= targets || usize::from(seg.dst) >= targets {
            return Err(SenseReason::CopyTargetNotReachable);
        }
        out.push(seg);
        at = at.saturating_add(B2B_LEN);
    }
    Ok(out)
}

/// RECEIVE COPY RESULTS, OPERATING PARAMETERS data (SPC-4 §6.18.4, table 127) for a logical
/// unit with `block_size`-byte blocks.
pub fn operating_parameters(block_size: u32) -> Vec<u8> {
    let codes = [SEG_BLOCK_TO_BLOCK, CSCD_IDENTIFICATION];
    let mut d = vec![0u8; 44];
    let max_segment = u32::from(u16::MAX).saturating_mul(block_size);
    let granularity = u8::try_from(block_size.max(1).trailing_zeros()).unwrap_or(0);
    crate::vpd::put(&mut d, 4, &[0x01]); // SNLID: LIST ID USAGE 11b supported.
    crate::vpd::put(&mut d, 8, &MAX_CSCD_DESCRIPTORS.to_be_bytes());
    crate::vpd::put(&mut d, 10, &MAX_SEGMENT_DESCRIPTORS.to_be_bytes());
    crate::vpd::put(&mut d, 12, &MAX_DESCRIPTOR_LIST_LEN.to_be_bytes());
    crate::vpd::put(&mut d, 16, &max_segment.to_be_bytes());
    // [20] MAXIMUM INLINE DATA LENGTH 0, [24] HELD DATA LIMIT 0, [28] stream size 0.
    crate::vpd::put(&mut d, 34, &u16::from(MAX_CONCURRENT_COPIES).to_be_bytes());
    crate::vpd::put(&mut d, 36, &[MAX_CONCURRENT_COPIES, granularity, 0, 0]);
    crate::vpd::put(&mut d, 43, &[u8::try_from(codes.len()).unwrap_or(0)]);
    d.extend_from_slice(&codes);
    let avail = u32::try_from(d.len().saturating_sub(4)).unwrap_or(0);
    crate::vpd::put(&mut d, 0, &avail.to_be_bytes());
    d
}

/// The Third-party Copy VPD page body (SPC-4 §7.8.17): one Supported Commands descriptor
/// (0001h) listing EXTENDED COPY (LID1) and RECEIVE COPY RESULTS (COPY STATUS, OPERATING
/// PARAMETERS).
pub fn third_party_copy_page() -> Vec<u8> {
    let commands: [u8; 7] = [
        crate::cdb::op::EXTENDED_COPY,
        1,
        0x00,
        crate::cdb::op::RECEIVE_COPY_RESULTS,
        2,
        0x00,
        0x03,
    ];
    let mut body = vec![u8::try_from(commands.len()).unwrap_or(0)];
    body.extend_from_slice(&commands);
    while body.len() % 4 != 0 {
        body.push(0);
    }
    let mut d = vec![0x00, 0x01];
    d.extend_from_slice(&u16::try_from(body.len()).unwrap_or(0).to_be_bytes());
    d.extend_from_slice(&body);
    d
}

/// Copy manager status (SPC-4 table 125).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyState {
    InProgress,
    Good,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    identity: u64,
    list_id: u8,
    state: CopyState,
    segments: u16,
    bytes: u64,
}

/// Recent copies per I_T nexus identity, bounded by [`MAX_COPY_RECORDS`]: a new record
/// pushes out the oldest finished one; when every record is a copy in progress the new copy
/// is refused (the daemon also bounds concurrent copies by this).
#[derive(Debug, Clone, Default)]
pub struct CopyTable {
    records: VecDeque<Record>,
}

impl CopyTable {
    /// Whether `identity` has copy `list_id` in progress.
    pub fn in_progress(&self, identity: u64, list_id: u8) -> bool {
        self.records.iter().any(|r| {
            r.identity == identity && r.list_id == list_id && r.state == CopyState::InProgress
        })
    }

    /// Record copy `list_id` of `identity` as started (replacing a finished one of the same
    /// list identifier). Err when the table is full of copies in progress.
    pub fn start(&mut self, identity: u64, list_id: u8) -> Result<(), SenseReason> {
        self.records
            .retain(|r| !(r.identity == identity && r.list_id == list_id));
        if self.records.len() >= MAX_COPY_RECORDS {
            let done = self
                .records
                .iter()
                .position(|r| r.state != CopyState::InProgress)
                .ok_or(SenseReason::InsufficientResources)?;
            self.records.remove(done);
        }
        self.records.push_back(Record {
            identity,
            list_id,
            state: CopyState::InProgress,
            segments: 0,
            bytes: 0,
        });
        Ok(())
    }

    /// The copy ended (`good` or not) after `segments` segments and `bytes` bytes.
    pub fn finish(&mut self, identity: u64, list_id: u8, good: bool, segments: u16, bytes: u64) {
        if let Some(r) = self.records.iter_mut().find(|r| {
            r.identity == identity && r.list_id == list_id && r.state == CopyState::InProgress
        }) {
            r.state = if good {
                CopyState::Good
            } else {
                CopyState::Failed
            };
            r.segments = segments;
            r.bytes = bytes;
        }
    }

    /// Forget every record of `identity` (its I_T nexus is gone).
    pub fn forget(&mut self, identity: u64) {
        self.records.retain(|r| r.identity != identity);
    }

    /// COPY STATUS data (SPC-4 §6.18.3, table 124) for copy `list_id` of `identity`; a
    /// finished copy's record is discarded once reported. INVALID FIELD IN CDB (LIST
    /// IDENTIFIER, byte 2) when there is none.
    pub fn status(&mut self, identity: u64, list_id: u8) -> Result<Vec<u8>, SenseReason> {
        let at = self
            .records
            .iter()
            .position(|r| r.identity == identity && r.list_id == list_id)
            .ok_or(SenseReason::InvalidFieldInCdb(FieldPointer::byte(2)))?;
        let r = self
            .records
            .get(at)
            .cloned()
            .ok_or(SenseReason::InvalidFieldInCdb(FieldPointer::byte(2)))?;
        if r.state != CopyState::InProgress {
            self.records.remove(at);
        }
        let status = match r.state {
            CopyState::InProgress => 0x00,
            CopyState::Good => 0x01,
            CopyState::Failed => 0x02,
        };
        // TRANSFER COUNT UNITS: bytes (00h), or KiB / MiB / GiB when the count needs them.
        let (units, count) = [0u8, 1, 2, 3, 4]
            .iter()
            .map(|u| (*u, r.bytes >> (10 * u32::from(*u))))
            .find(|(_, c)| *c <= u64::from(u32::MAX))
            .unwrap_or((4, u64::from(u32::MAX)));
        let mut d = vec![0u8; 12];
        crate::vpd::put(&mut d, 0, &8u32.to_be_bytes());
        crate::vpd::put(&mut d, 4, &[status]);
        crate::vpd::put(&mut d, 5, &r.segments.to_be_bytes());
        crate::vpd::put(&mut d, 7, &[units]);
        crate::vpd::put(
            &mut d,
            8,
            &u32::try_from(count).unwrap_or(u32::MAX).to_be_bytes(),
        );
        Ok(d)
    }
}

#[cfg(test)]
#[allow(
    clippy::indexing_slicing,
    clippy::unwrap_used,
    clippy::cast_possible_truncation
)]
mod tests {
    use super::*;

    const NAA: [u8; 16] = [0x60, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];

    fn cscd(naa: &[u8; 16]) -> Vec<u8> {
        let mut d = vec![0u8; CSCD_LEN];
        d[0] = CSCD_IDENTIFICATION;
        d[4] = 0x01;
        d[5] = 0x03;
        d[7] = 16;
        d[8..24].copy_from_slice(naa);
        d[29..32].copy_from_slice(&[0, 2, 0]);
        d
    }

    fn b2b(src: u16, dst: u16, blocks: u16, src_lba: u64, dst_lba: u64) -> Vec<u8> {
        let mut d = vec![0u8; B2B_LEN];
        d[0] = SEG_BLOCK_TO_BLOCK;
        d[3] = 0x18;
        d[4..6].copy_from_slice(&src.to_be_bytes());
        d[6..8].copy_from_slice(&dst.to_be_bytes());
        d[10..12].copy_from_slice(&blocks.to_be_bytes());
        d[12..20].copy_from_slice(&src_lba.to_be_bytes());
        d[20..28].copy_from_slice(&dst_lba.to_be_bytes());
        d
    }

    fn list(usage: u8, cscds: &[Vec<u8>], segs: &[Vec<u8>]) -> Vec<u8> {
        let c: Vec<u8> = cscds.concat();
        let s: Vec<u8> = segs.concat();
        let mut d = vec![0u8; HEADER_LEN];
        d[0] = 7;
        d[1] = usage << 3;
        d[2..4].copy_from_slice(&(c.len() as u16).to_be_bytes());
        d[8..12].copy_from_slice(&(s.len() as u32).to_be_bytes());
        d.extend(c);
        d.extend(s);
        d
    }

    fn run(d: &[u8]) -> Result<Option<CopyJob>, SenseReason> {
        parse(d.len() as u32, d)
    }

    #[test]
    fn accepts_one_block_to_block_segment() {
        let d = list(0, &[cscd(&NAA)], &[b2b(0, 0, 2048, 0, 4096)]);
        let job = run(&d).unwrap().unwrap();
        assert_eq!(job.list_id, 7);
        assert!(job.retain_status);
        assert_eq!(job.targets[0].designator.lu_naa(), Some(NAA));
        assert_eq!(job.targets[0].block_len, 512);
        assert_eq!(
            job.segments,
            vec![Segment {
                src: 0,
                dst: 0,
                blocks: 2048,
                src_lba: 0,
                dst_lba: 4096
            }]
        );
        let d = list(3, &[cscd(&NAA)], &[]);
        assert!(!run(&d).unwrap().unwrap().retain_status);
    }

    #[test]
    fn zero_parameter_list_length_does_nothing() {
        assert_eq!(parse(0, &[]), Ok(None));
    }

    #[test]
    fn rejects_truncated_lists_with_parameter_list_length_error() {
        let d = list(0, &[cscd(&NAA)], &[b2b(0, 0, 1, 0, 0)]);
        for n in [1, HEADER_LEN - 1, HEADER_LEN + CSCD_LEN - 1, d.len() - 1] {
            assert_eq!(
                parse(n as u32, &d[..n]),
                Err(SenseReason::ParameterListLengthError),
                "{n}"
            );
        }
        // Data-Out shorter than the CDB's PARAMETER LIST LENGTH.
        assert_eq!(
            parse(d.len() as u32 + 1, &d),
            Err(SenseReason::ParameterListLengthError)
        );
    }

    #[test]
    fn rejects_descriptor_lists_beyond_the_maximum_length() {
        let segs: Vec<Vec<u8>> = (0..70).map(|_| b2b(0, 0, 1, 0, 0)).collect();
        let cscds: Vec<Vec<u8>> = (0..9).map(|_| cscd(&NAA)).collect();
        let d = list(0, &cscds, &segs);
        assert_eq!(run(&d), Err(SenseReason::ParameterListLengthError));
    }

    #[test]
    fn rejects_too_many_descriptors() {
        let cscds: Vec<Vec<u8>> = (0..=MAX_CSCD_DESCRIPTORS).map(|_| cscd(&NAA)).collect();
        let d = list(0, &cscds, &[b2b(0, 0, 1, 0, 0)]);
        assert_eq!(run(&d), Err(SenseReason::TooManyTargetDescriptors));
        let segs: Vec<Vec<u8>> = (0..=MAX_SEGMENT_DESCRIPTORS)
            .map(|_| b2b(0, 0, 1, 0, 0))
            .collect();
        let d = list(0, &[cscd(&NAA)], &segs);
        assert_eq!(run(&d), Err(SenseReason::TooManySegmentDescriptors));
    }

    #[test]
    fn rejects_unsupported_descriptor_types() {
        let mut fc = cscd(&NAA);
        fc[0] = 0xE0;
        let d = list(0, &[fc], &[b2b(0, 0, 1, 0, 0)]);
        assert_eq!(run(&d), Err(SenseReason::UnsupportedTargetDescriptorType));
        let mut stream = b2b(0, 0, 1, 0, 0);
        stream[0] = 0x03;
        stream[3] = 0x10;
        let d = list(0, &[cscd(&NAA)], &[stream[..20].to_vec()]);
        assert_eq!(run(&d), Err(SenseReason::UnsupportedSegmentDescriptorType));
    }

    #[test]
    fn a_segment_naming_an_absent_target_is_copy_aborted() {
        let d = list(0, &[cscd(&NAA)], &[b2b(0, 1, 1, 0, 0)]);
        assert_eq!(run(&d), Err(SenseReason::CopyTargetNotReachable));
    }

    #[test]
    fn rejects_inline_data_and_reserved_list_id_usage() {
        let mut d = list(0, &[cscd(&NAA)], &[]);
        d[15] = 4;
        d.extend([0u8; 4]);
        assert_eq!(run(&d), Err(SenseReason::InlineDataLengthExceeded));
        let d = list(1, &[cscd(&NAA)], &[]);
        assert!(matches!(
            run(&d),
            Err(SenseReason::InvalidFieldInParameterList(_))
        ));
    }

    #[test]
    fn operating_parameters_report_the_limits_parse_enforces() {
        let d = operating_parameters(512);
        assert_eq!(
            u32::from_be_bytes(d[0..4].try_into().unwrap()) as usize,
            d.len() - 4
        );
        assert_eq!(u16::from_be_bytes([d[8], d[9]]), MAX_CSCD_DESCRIPTORS);
        assert_eq!(u16::from_be_bytes([d[10], d[11]]), MAX_SEGMENT_DESCRIPTORS);
        assert_eq!(
            u32::from_be_bytes(d[12..16].try_into().unwrap()),
            MAX_DESCRIPTOR_LIST_LEN
        );
        assert_eq!(
            u32::from_be_bytes(d[16..20].try_into().unwrap()),
            65535 * 512
        );
        assert_eq!(d[43], 2);
        assert_eq!(&d[44..], &[SEG_BLOCK_TO_BLOCK, CSCD_IDENTIFICATION]);
    }

    #[test]
    fn third_party_copy_page_lists_both_commands() {
        let d = third_party_copy_page();
        assert_eq!(&d[..4], &[0x00, 0x01, 0x00, 0x08]);
        assert_eq!(&d[4..12], &[7, 0x83, 1, 0, 0x84, 2, 0, 3]);
    }

    #[test]
    fn copy_status_is_reported_and_then_discarded() {
        let mut t = CopyTable::default();
        assert!(t.status(1, 5).is_err());
        t.start(1, 5).unwrap();
        assert!(t.in_progress(1, 5));
        assert!(!t.in_progress(2, 5));
        assert_eq!(t.status(1, 5).unwrap()[4], 0x00);
        t.finish(1, 5, true, 1, 1 << 20);
        let d = t.status(1, 5).unwrap();
        assert_eq!(d[4], 0x01);
        assert_eq!(u16::from_be_bytes([d[5], d[6]]), 1);
        assert_eq!(d[7], 0);
        assert_eq!(u32::from_be_bytes(d[8..12].try_into().unwrap()), 1 << 20);
        assert!(t.status(1, 5).is_err());
        t.start(1, 6).unwrap();
        t.finish(1, 6, false, 0, 8u64 << 32);
        let d = t.status(1, 6).unwrap();
        assert_eq!((d[4], d[7]), (0x02, 1));
    }

    /// The LU side: a started copy is IoOp::ExtendedCopy; its list identifier is busy until
    /// the outcome comes back; COPY STATUS follows it; an abandoned copy reads as failed.
    #[test]
    fn the_lu_tracks_a_copy_from_start_to_status() {
        use crate::lu::{LogicalUnit, LuConfig, Step};
        use bytes::Bytes;
        let mut lu = LogicalUnit::new(LuConfig::new(0, 512, 4096, "iqn.t").with_naa(NAA));
        let it = crate::pr::ItNexus {
            initiator: crate::pr::InitiatorPort::new("iqn.test:x", [0x80, 0, 0, 0, 0, 1]),
            rtpi: 1,
        };
        lu.add_nexus(1, it);
        let tur = [0u8; 6];
        let _ = lu.execute(1, &tur, Bytes::new()); // power-on unit attention
        let list = list(0, &[cscd(&NAA)], &[b2b(0, 0, 8, 0, 100)]);
        let mut cdb = [0u8; 16];
        cdb[0] = 0x83;
        cdb[10..14].copy_from_slice(&(list.len() as u32).to_be_bytes());
        let status = |lu: &mut LogicalUnit| {
            let mut c = [0u8; 16];
            c[0] = 0x84;
            c[2] = 7;
            c[13] = 0xff;
            match lu.execute(1, &c, Bytes::new()) {
                Step::Done(c) if c.status == 0 => Some(c.data[4]),
                Step::Done(c) => {
                    assert_eq!((c.sense[2], c.sense[12]), (0x05, 0x24));
                    None
                }
                other => panic!("{other:?}"),
            }
        };
        let Step::Io(crate::lu::IoOp::ExtendedCopy(job), cont) =
            lu.execute(1, &cdb, Bytes::from(list.clone()))
        else {
            panic!("no copy step");
        };
        assert_eq!(job.segments.len(), 1);
        assert_eq!(status(&mut lu), Some(0x00));
        match lu.execute(1, &cdb, Bytes::from(list.clone())) {
            Step::Done(c) => assert_eq!((c.sense[2], c.sense[12], c.sense[13]), (5, 0, 0x16)),
            other => panic!("{other:?}"),
        }
        let outcome = CopyOutcome {
            segments: 1,
            bytes: 4096,
            end: CopyEnd::Good,
        };
        let done = lu.resume(1, cont, crate::lu::IoResult::Copy(outcome));
        assert!(
            matches!(done, Step::Done(ref c) if c.status == 0),
            "{done:?}"
        );
        assert_eq!(status(&mut lu), Some(0x01));
        assert_eq!(status(&mut lu), None);
        // Abandoned (the daemon dropped it, e.g. ABORT TASK): completed with error.
        let Step::Io(_, cont) = lu.execute(1, &cdb, Bytes::from(list)) else {
            panic!("no copy step");
        };
        lu.abandon(cont);
        assert_eq!(status(&mut lu), Some(0x02));
    }

    #[test]
    fn copy_table_is_bounded() {
        let mut t = CopyTable::default();
        for i in 0..MAX_COPY_RECORDS {
            t.start(9, i as u8).unwrap();
        }
        assert!(t.start(9, 200).is_err());
        t.finish(9, 3, true, 0, 0);
        t.start(9, 200).unwrap();
        assert!(t.status(9, 3).is_err());
        t.forget(9);
        assert!(t.status(9, 200).is_err());
    }
}
