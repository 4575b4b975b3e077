//! Write data assembly (RFC 7143 §4.2.2.3, §11.7, §11.8): immediate data, the unsolicited
//! Data-Out sequence, and solicited sequences opened by R2T.
//!
//! Memory follows the data that actually arrived, never ExpectedDataTransferLength: a peer
//! that announces a 64 MiB write and sends 512 bytes makes us hold about 512 bytes
//! (DESIGN.md §3 rule 2). Received bytes are copied into runs of contiguous data keyed by
//! offset; the run that starts at offset 0 swallows every run it reaches, so a complete
//! transfer is exactly one run, handed on without a second copy. A transfer that arrives as one
//! piece at offset 0 is handed on as the received slice, without any copy.
//!
//! R2Ts are opened one at a time ([`WriteBuffer::solicit_one`]) so that the connection can pace
//! them by memory; [`WriteBuffer::awaited_bytes`] is the data open sequences still expect.

use crate::pdu::{DataOut, RESERVED_TAG};
use bytes::Bytes;
use std::collections::BTreeMap;
use std::ops::Bound;

/// Most separate runs (stretches of contiguous data with gaps between them) one command may
/// hold. Only DataPDUInOrder=No can produce more than MaxOutstandingR2T + 2 of them; past this
/// the peer is fragmenting on purpose and the Data-Out is refused.
pub const MAX_RUNS: usize = 4096;

/// Bytes [`WriteBuffer::footprint`] counts for each run besides its data: an estimate of its
/// map entry and allocation header, so that a peer scattering one-byte pieces is charged for
/// the bookkeeping it costs.
pub const RUN_OVERHEAD: usize = 64;

/// Why a Data-Out is refused. At ErrorRecoveryLevel 0 each of these ends the connection
/// (§7.1.5: only session recovery exists at level 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DataOutError {
    #[error("Data-Out names no open sequence (TTT)")]
    UnknownTtt,
    #[error("Data-Out outside its sequence or the expected data transfer length")]
    OutOfBounds,
    #[error("Data-Out DataSN out of order")]
    DataSn,
    #[error("Data-Out buffer offset out of order (DataPDUInOrder=Yes)")]
    Order,
    #[error("F bit set before the sequence was complete")]
    EarlyFinal,
    #[error(
        "Data-Out for a later sequence while an earlier one is open (DataSequenceInOrder=Yes)"
    )]
    SequenceOrder,
    #[error("Data-Out overlaps data already received")]
    Overlap,
    #[error("Data-Out leaves the write data in more than {MAX_RUNS} separate pieces")]
    TooFragmented,
}

/// One Data-Out sequence the initiator may fill: the unsolicited one (TTT 0xffffffff) or
/// the one answering an R2T.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Sequence {
    ttt: u32,
    start: u32,
    end: u32,
    /// Next offset expected when PDUs come in order.
    next: u32,
    received: u32,
    next_data_sn: u32,
}

/// An R2T the connection must send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct R2tRequest {
    pub ttt: u32,
    pub r2t_sn: u32,
    pub buffer_offset: u32,
    pub desired_length: u32,
}

/// Negotiated values that bound write sequences.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteParams {
    pub max_burst: u32,
    pub max_outstanding_r2t: u16,
    /// DataPDUInOrder (§13.18): within a sequence, offsets only increase, without gaps.
    pub data_pdu_in_order: bool,
    /// DataSequenceInOrder (§13.19): sequences are sent in offset order, so a Data-Out must
    /// belong to the earliest sequence still open.
    pub data_sequence_in_order: bool,
}

/// Where the data received so far lives.
#[derive(Debug)]
enum Assembly {
    /// The whole transfer arrived as one piece at offset 0 (all immediate data, or one
    /// Data-Out): kept as the received frame's slice, not copied (DESIGN.md §3 rule 7).
    Whole(Bytes),
    /// Copies of what arrived, in runs of contiguous bytes keyed by their first offset. No two
    /// runs overlap or touch the run at offset 0 (it absorbs whatever it reaches).
    Runs(Runs),
}

#[derive(Debug, Default)]
struct Runs {
    map: BTreeMap<u32, Vec<u8>>,
    /// Sum of the runs' capacities.
    capacity: usize,
}

impl Runs {
    /// Copy `data` to offset `from` of a transfer of `edtl` bytes. The caller has checked
    /// `0 < data.len()` and `from + data.len() <= edtl`.
    fn insert(&mut self, edtl: u32, from: u32, data: &[u8]) -> Result<(), DataOutError> {
        let len = u32::try_from(data.len()).map_err(|_| DataOutError::OutOfBounds)?;
        let end = from.checked_add(len).ok_or(DataOutError::OutOfBounds)?;
        // The run at or before `from` must end by `from`; the next one must start at or after `end`.
        let before = self
            .map
            .range(..=from)
            .next_back()
            .map(|(&k, v)| (k, run_end(k, v)));
        if let Some((_, b_end)) = before {
            // `None`: a run whose end overflows, which `append` never builds.
            if b_end.is_none_or(|e| e > from) {
                return Err(DataOutError::Overlap);
            }
        }
        if let Some((&after, _)) = self
            .map
            .range((Bound::Excluded(from), Bound::Unbounded))
            .next()
        {
            if after < end {
                return Err(DataOutError::Overlap);
            }
        }
        let key = match before {
            Some((k, Some(b_end))) if b_end == from => {
                self.append(k, edtl, data)?;
                k
            }
            _ => {
                if self.map.len() >= MAX_RUNS {
                    return Err(DataOutError::TooFragmented);
                }
                self.map.insert(from, data.to_vec());
                self.capacity = self.capacity.saturating_add(data.len());
                from
            }
        };
        if key == 0 {
            // The data from offset 0 swallows each run it now reaches: a complete transfer ends
            // as one run.
            while let Some(head_end) = self.map.get(&0).and_then(|h| run_end(0, h)) {
                let Some(next) = self.map.remove(&head_end) else {
                    break;
                };
                self.capacity = self.capacity.saturating_sub(next.capacity());
                self.append(0, edtl, &next)?;
            }
        }
        Ok(())
    }

    /// Append `data` to the run at `key`, growing it at most to twice its new length (and
    /// never past the end of the transfer), so capacity stays within twice the data held.
    fn append(&mut self, key: u32, edtl: u32, data: &[u8]) -> Result<(), DataOutError> {
        let limit =
            usize::try_from(edtl.saturating_sub(key)).map_err(|_| DataOutError::OutOfBounds)?;
        let run = self.map.get_mut(&key).ok_or(DataOutError::OutOfBounds)?;
        let needed = run
            .len()
            .checked_add(data.len())
            .filter(|&n| n <= limit)
            .ok_or(DataOutError::OutOfBounds)?;
        let before = run.capacity();
        if needed > before {
            let target = needed.saturating_mul(2).min(limit).max(needed);
            run.reserve_exact(target.saturating_sub(run.len()));
        }
        run.extend_from_slice(data);
        self.capacity = self
            .capacity
            .saturating_sub(before)
            .saturating_add(run.capacity());
        Ok(())
    }
}

/// One past the last offset of a run at `key`.
fn run_end(key: u32, run: &[u8]) -> Option<u32> {
    key.checked_add(u32::try_from(run.len()).ok()?)
}

/// The write buffer of one command, bounded by its ExpectedDataTransferLength (which the caller
/// has checked against [`crate::Limits::max_transfer`] before creating it).
///
/// Memory grows with the data received (at most twice it plus [`RUN_OVERHEAD`] per run, see
/// [`WriteBuffer::footprint`]), never with the announced length; a byte range is accepted once only, so a complete buffer
/// holds every byte of the transfer and nothing is ever zero-filled.
#[derive(Debug)]
pub struct WriteBuffer {
    data: Assembly,
    edtl: u32,
    /// Payload bytes accepted (immediate data included); ranges never overlap.
    received: u32,
    /// Open sequences in offset order: the unsolicited one first, then one per R2T.
    sequences: Vec<Sequence>,
    next_solicit: u32,
    r2t_sn: u32,
    params: WriteParams,
    /// A Data-Out arrived with an unexpected DataSN. At ErrorRecoveryLevel 0 there is no
    /// recovery R2T (RFC 7143 §7.1.5), so the data is still placed by its buffer offset but
    /// the command is failed once its transfer ends, and the connection stays up.
    data_sn_error: bool,
}

impl WriteBuffer {
    /// A buffer of `edtl` bytes holding `immediate` at offset 0, expecting unsolicited Data-Out
    /// for `[immediate.len(), unsolicited_end)` and solicitation (R2T) for the rest.
    /// `immediate.len() <= unsolicited_end <= edtl` is the caller's check (immediate data past
    /// `edtl` is ignored).
    pub fn new(edtl: u32, immediate: &Bytes, unsolicited_end: u32, params: WriteParams) -> Self {
        let len = usize::try_from(edtl).unwrap_or(0);
        let imm = immediate.len().min(len);
        let imm32 = u32::try_from(imm).unwrap_or(0);
        let data = if imm == len && imm > 0 {
            Assembly::Whole(immediate.slice(..imm))
        } else {
            let mut runs = Runs::default();
            if let Some(piece) = immediate.get(..imm).filter(|p| !p.is_empty()) {
                // Cannot fail: one piece at offset 0, inside the transfer.
                let _ = runs.insert(edtl, 0, piece);
            }
            Assembly::Runs(runs)
        };
        let mut sequences = Vec::new();
        let unsolicited_end = unsolicited_end.clamp(imm32, edtl);
        if unsolicited_end > imm32 {
            sequences.push(Sequence {
                ttt: RESERVED_TAG,
                start: imm32,
                end: unsolicited_end,
                next: imm32,
                received: 0,
                next_data_sn: 0,
            });
        }
        WriteBuffer {
            data,
            edtl,
            received: imm32,
            sequences,
            next_solicit: unsolicited_end,
            r2t_sn: 0,
            params,
            data_sn_error: false,
        }
    }

    /// True once every byte of the transfer has arrived.
    pub fn is_complete(&self) -> bool {
        self.received >= self.edtl && self.sequences.is_empty() && self.next_solicit >= self.edtl
    }

    /// True when some Data-Out of this command carried an unexpected DataSN: the command must
    /// be failed instead of executed.
    pub fn data_sn_error(&self) -> bool {
        self.data_sn_error
    }

    /// Number of R2Ts sent so far.
    pub fn r2t_count(&self) -> u32 {
        self.r2t_sn
    }

    /// Payload bytes accepted so far (immediate data included): exactly the data received,
    /// since overlapping pieces are refused.
    pub fn held_bytes(&self) -> usize {
        usize::try_from(self.received).unwrap_or(usize::MAX)
    }

    /// Bytes of memory this buffer keeps for its data: the runs' capacities plus
    /// [`RUN_OVERHEAD`] per run, or the length of the one received slice it hands on. At most
    /// twice [`WriteBuffer::held_bytes`] (runs grow by doubling, capped at the transfer's end)
    /// plus that overhead, and never ExpectedDataTransferLength up front.
    pub fn footprint(&self) -> usize {
        match &self.data {
            Assembly::Whole(b) => b.len(),
            Assembly::Runs(r) => r
                .capacity
                .saturating_add(r.map.len().saturating_mul(RUN_OVERHEAD)),
        }
    }

    /// Bytes the open sequences (unsolicited and solicited) still expect: data the initiator
    /// will send without being asked again, so memory this buffer is committed to take.
    pub fn awaited_bytes(&self) -> usize {
        self.sequences
            .iter()
            .map(|s| {
                let len = s.end.saturating_sub(s.start).saturating_sub(s.received);
                usize::try_from(len).unwrap_or(usize::MAX)
            })
            .fold(0usize, usize::saturating_add)
    }

    /// Open sequences answering an R2T (the unsolicited sequence is not counted).
    pub fn open_r2ts(&self) -> usize {
        self.sequences
            .iter()
            .filter(|s| s.ttt != RESERVED_TAG)
            .count()
    }

    /// Open sequences of any kind; it drops when one is complete.
    pub fn open_sequences(&self) -> usize {
        self.sequences.len()
    }

    /// The desired length of the R2T [`WriteBuffer::solicit_one`] would send now: the rest
    /// of the transfer up to MaxBurstLength (§11.8.4), or `None` when everything is solicited
    /// or MaxOutstandingR2T sequences are open (§13.17).
    pub fn next_r2t_len(&self) -> Option<u32> {
        let max_out = usize::from(self.params.max_outstanding_r2t.max(1));
        (self.next_solicit < self.edtl && self.open_r2ts() < max_out)
            .then(|| (self.edtl - self.next_solicit).min(self.params.max_burst.max(1)))
    }

    /// Open one R2T sequence of [`WriteBuffer::next_r2t_len`] bytes, if that is `Some`;
    /// `next_ttt` hands out its target transfer tag.
    pub fn solicit_one(&mut self, next_ttt: impl FnOnce() -> u32) -> Option<R2tRequest> {
        let len = self.next_r2t_len()?;
        let ttt = next_ttt();
        let start = self.next_solicit;
        let end = start.saturating_add(len);
        self.sequences.push(Sequence {
            ttt,
            start,
            end,
            next: start,
            received: 0,
            next_data_sn: 0,
        });
        let r = R2tRequest {
            ttt,
            r2t_sn: self.r2t_sn,
            buffer_offset: start,
            desired_length: len,
        };
        self.r2t_sn = self.r2t_sn.wrapping_add(1);
        self.next_solicit = end;
        Some(r)
    }

    /// Open as many R2T sequences as MaxOutstandingR2T allows, each at most MaxBurstLength
    /// (§11.8), with no regard to memory (the connection paces with
    /// [`WriteBuffer::solicit_one`]); `next_ttt` hands out target transfer tags.
    pub fn solicit(&mut self, mut next_ttt: impl FnMut() -> u32) -> Vec<R2tRequest> {
        let mut out = Vec::new();
        while let Some(r) = self.solicit_one(&mut next_ttt) {
            out.push(r);
        }
        out
    }

    /// Take one Data-Out: check its sequence (TTT, and with DataSequenceInOrder=Yes that it is
    /// the earliest open one), DataSN, offset and length, then copy its payload (§4.2.2.3,
    /// §11.7). Nothing is kept when an error is returned.
    pub fn data_out(&mut self, h: &DataOut, data: &Bytes) -> Result<(), DataOutError> {
        let idx = self
            .sequences
            .iter()
            .position(|s| s.ttt == h.ttt)
            .ok_or(DataOutError::UnknownTtt)?;
        if self.params.data_sequence_in_order && idx != 0 {
            // §13.19: sequences arrive in offset order; `sequences` is kept in that order.
            return Err(DataOutError::SequenceOrder);
        }
        let seq = self
            .sequences
            .get_mut(idx)
            .ok_or(DataOutError::UnknownTtt)?;
        // DataSN is checked after the bounds: a PDU that cannot be placed is fatal, one that
        // only carries a wrong DataSN fails its command (see `data_sn_error`).
        let data_sn_ok = h.data_sn == seq.next_data_sn;
        let len = u32::try_from(data.len()).map_err(|_| DataOutError::OutOfBounds)?;
        let end = h
            .buffer_offset
            .checked_add(len)
            .ok_or(DataOutError::OutOfBounds)?;
        if h.buffer_offset < seq.start || end > seq.end {
            return Err(DataOutError::OutOfBounds);
        }
        if self.params.data_pdu_in_order && h.buffer_offset != seq.next {
            return Err(DataOutError::Order);
        }
        let received = seq
            .received
            .checked_add(len)
            .ok_or(DataOutError::OutOfBounds)?;
        let seq_len = seq.end - seq.start;
        if received > seq_len {
            return Err(DataOutError::OutOfBounds);
        }
        if h.final_ && received < seq_len {
            return Err(DataOutError::EarlyFinal);
        }
        if len > 0 {
            match &mut self.data {
                Assembly::Runs(runs)
                    if runs.map.is_empty() && h.buffer_offset == 0 && len == self.edtl =>
                {
                    self.data = Assembly::Whole(data.clone());
                }
                Assembly::Runs(runs) => runs.insert(self.edtl, h.buffer_offset, data)?,
                // Already complete: any further byte overlaps.
                Assembly::Whole(_) => return Err(DataOutError::Overlap),
            }
        }
        seq.received = received;
        seq.next = end;
        seq.next_data_sn = h.data_sn.wrapping_add(1);
        self.data_sn_error |= !data_sn_ok;
        self.received = self.received.saturating_add(len);
        if received == seq_len {
            self.sequences.remove(idx);
        }
        Ok(())
    }

    /// The assembled data, exactly ExpectedDataTransferLength bytes, once
    /// [`WriteBuffer::is_complete`]; `None` before (nothing is ever zero-filled).
    pub fn into_data(self) -> Option<Bytes> {
        if !self.is_complete() {
            return None;
        }
        let len = usize::try_from(self.edtl).ok()?;
        match self.data {
            Assembly::Whole(b) => (b.len() == len).then_some(b),
            Assembly::Runs(mut runs) => {
                if len == 0 {
                    return Some(Bytes::new());
                }
                let head = runs.map.remove(&0)?;
                (head.len() == len && runs.map.is_empty()).then(|| Bytes::from(head))
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    const PARAMS: WriteParams = WriteParams {
        max_burst: 4,
        max_outstanding_r2t: 1,
        data_pdu_in_order: true,
        data_sequence_in_order: true,
    };

    fn dout(ttt: u32, data_sn: u32, offset: u32, final_: bool) -> DataOut {
        DataOut {
            final_,
            ttt,
            data_sn,
            buffer_offset: offset,
            ..Default::default()
        }
    }

    #[test]
    fn accepts_immediate_unsolicited_and_solicited_data() {
        let mut w = WriteBuffer::new(12, &Bytes::from_static(b"ab"), 4, PARAMS);
        let mut ttt = 100;
        let r2ts = w.solicit(|| {
            ttt += 1;
            ttt
        });
        assert_eq!(
            r2ts,
            vec![R2tRequest {
                ttt: 101,
                r2t_sn: 0,
                buffer_offset: 4,
                desired_length: 4
            }]
        );
        w.data_out(&dout(RESERVED_TAG, 0, 2, true), &Bytes::from_static(b"cd"))
            .unwrap();
        w.data_out(&dout(101, 0, 4, false), &Bytes::from_static(b"ef"))
            .unwrap();
        w.data_out(&dout(101, 1, 6, true), &Bytes::from_static(b"gh"))
            .unwrap();
        assert!(!w.is_complete());
        let r2ts = w.solicit(|| 7);
        assert_eq!(
            r2ts,
            vec![R2tRequest {
                ttt: 7,
                r2t_sn: 1,
                buffer_offset: 8,
                desired_length: 4
            }]
        );
        w.data_out(&dout(7, 0, 8, true), &Bytes::from_static(b"ijkl"))
            .unwrap();
        assert!(w.is_complete());
        assert_eq!(w.r2t_count(), 2);
        assert_eq!(&w.into_data().unwrap()[..], b"abcdefghijkl");
    }

    #[test]
    fn flags_bad_data_sn_but_places_data() {
        let mut w = WriteBuffer::new(4, &Bytes::new(), 0, PARAMS);
        let r = w.solicit(|| 1);
        assert_eq!(r.len(), 1);
        w.data_out(&dout(1, 0, 0, false), &Bytes::from_static(b"ab"))
            .unwrap();
        assert!(!w.data_sn_error());
        w.data_out(&dout(1, 0, 2, true), &Bytes::from_static(b"cd"))
            .unwrap();
        assert!(w.data_sn_error());
        assert!(w.is_complete());

        let mut w = WriteBuffer::new(2, &Bytes::new(), 2, PARAMS);
        w.data_out(&dout(RESERVED_TAG, 27, 0, true), &Bytes::from_static(b"ab"))
            .unwrap();
        assert!(w.data_sn_error() && w.is_complete());
    }

    #[test]
    fn rejects_out_of_bounds_unknown_ttt_and_early_final() {
        let mut w = WriteBuffer::new(8, &Bytes::new(), 4, PARAMS);
        assert_eq!(
            w.data_out(
                &dout(RESERVED_TAG, 0, 2, false),
                &Bytes::from_static(b"abcd")
            ),
            Err(DataOutError::OutOfBounds)
        );
        assert_eq!(
            w.data_out(&dout(RESERVED_TAG, 0, 2, false), &Bytes::from_static(b"a")),
            Err(DataOutError::Order)
        );
        assert_eq!(
            w.data_out(&dout(5, 0, 4, false), &Bytes::from_static(b"a")),
            Err(DataOutError::UnknownTtt)
        );
        assert_eq!(
            w.data_out(&dout(RESERVED_TAG, 0, 0, true), &Bytes::from_static(b"a")),
            Err(DataOutError::EarlyFinal)
        );
        assert_eq!(
            w.data_out(
                &dout(RESERVED_TAG, 0, u32::MAX, false),
                &Bytes::from_static(b"a")
            ),
            Err(DataOutError::OutOfBounds)
        );
    }

    #[test]
    fn accepts_whole_immediate_data_without_copy() {
        let imm = Bytes::from_static(b"abcd");
        let w = WriteBuffer::new(4, &imm, 4, PARAMS);
        assert!(w.is_complete());
        let out = w.into_data().unwrap();
        assert_eq!(out.as_ptr(), imm.as_ptr());
    }

    #[test]
    fn accepts_one_data_out_without_copy() {
        let mut w = WriteBuffer::new(4, &Bytes::new(), 0, PARAMS);
        assert_eq!(w.solicit(|| 9).len(), 1);
        let d = Bytes::from_static(b"wxyz");
        w.data_out(&dout(9, 0, 0, true), &d).unwrap();
        assert!(w.is_complete());
        let out = w.into_data().unwrap();
        assert_eq!(out.as_ptr(), d.as_ptr());
    }

    #[test]
    fn accepts_out_of_order_pieces_when_not_in_order() {
        let params = WriteParams {
            max_burst: 8,
            max_outstanding_r2t: 1,
            data_pdu_in_order: false,
            data_sequence_in_order: true,
        };
        let mut w = WriteBuffer::new(8, &Bytes::new(), 0, params);
        assert_eq!(w.solicit(|| 3).len(), 1);
        w.data_out(&dout(3, 0, 4, false), &Bytes::from_static(b"efgh"))
            .unwrap();
        w.data_out(&dout(3, 1, 2, false), &Bytes::from_static(b"cd"))
            .unwrap();
        w.data_out(&dout(3, 2, 0, true), &Bytes::from_static(b"ab"))
            .unwrap();
        assert!(w.is_complete());
        assert_eq!(&w.into_data().unwrap()[..], b"abcdefgh");
    }

    fn params(in_order: bool, seq_in_order: bool, max_burst: u32, max_r2t: u16) -> WriteParams {
        WriteParams {
            max_burst,
            max_outstanding_r2t: max_r2t,
            data_pdu_in_order: in_order,
            data_sequence_in_order: seq_in_order,
        }
    }

    /// The byte a test writes at `offset`.
    fn pattern(offset: usize) -> u8 {
        (offset ^ (offset >> 8) ^ 0x5a).to_le_bytes()[0]
    }

    fn piece(offset: u32, len: usize) -> Bytes {
        let o = offset as usize;
        (o..o + len).map(pattern).collect::<Vec<u8>>().into()
    }

    #[test]
    fn holds_only_what_arrived_of_a_64_mib_write() {
        const MIB: u32 = 1024 * 1024;
        let mut w = WriteBuffer::new(64 * MIB, &Bytes::new(), 0, params(true, false, MIB, 64));
        let mut ttt = 0;
        let r2ts = w.solicit(|| {
            ttt += 1;
            ttt
        });
        assert_eq!(r2ts.len(), 64);
        let last = r2ts[63];
        assert_eq!(last.buffer_offset, 63 * MIB);
        w.data_out(
            &dout(last.ttt, 0, last.buffer_offset, false),
            &piece(0, 512),
        )
        .unwrap();
        assert_eq!(w.held_bytes(), 512);
        assert!(w.footprint() <= 1024, "footprint {}", w.footprint());
        assert!(!w.is_complete());
        assert!(
            w.into_data().is_none(),
            "an incomplete transfer is never zero-filled"
        );
    }

    #[test]
    fn grows_in_order_data_with_the_data_not_the_transfer_length() {
        let edtl = 1024 * 1024;
        let imm = piece(0, 1000);
        let mut w = WriteBuffer::new(edtl, &imm, edtl, params(true, true, edtl, 1));
        assert_eq!(w.footprint(), 1000 + RUN_OVERHEAD);
        let mut off = 1000;
        let mut sn = 0;
        while off < edtl {
            let len = (edtl - off).min(8192);
            let d = piece(off, len as usize);
            w.data_out(&dout(RESERVED_TAG, sn, off, off + len == edtl), &d)
                .unwrap();
            off += len;
            sn += 1;
            assert_eq!(w.held_bytes(), off as usize);
            assert!(
                w.footprint() <= 2 * w.held_bytes() + RUN_OVERHEAD,
                "{} > 2 x {off}",
                w.footprint()
            );
        }
        assert!(w.is_complete());
        let out = w.into_data().unwrap();
        assert_eq!(out.len(), edtl as usize);
        assert!(out.iter().enumerate().all(|(i, b)| *b == pattern(i)));
    }

    #[test]
    fn rejects_data_out_for_a_later_sequence_when_sequences_in_order() {
        // Unsolicited [2, 4), then R2T sequences [4, 8) and [8, 12).
        let mut w = WriteBuffer::new(12, &piece(0, 2), 4, params(true, true, 4, 2));
        let mut ttt = 0;
        let r2ts = w.solicit(|| {
            ttt += 1;
            ttt
        });
        assert_eq!(r2ts.len(), 2);
        assert_eq!(
            w.data_out(&dout(1, 0, 4, true), &piece(4, 4)),
            Err(DataOutError::SequenceOrder)
        );
        w.data_out(&dout(RESERVED_TAG, 0, 2, true), &piece(2, 2))
            .unwrap();
        assert_eq!(
            w.data_out(&dout(2, 0, 8, true), &piece(8, 4)),
            Err(DataOutError::SequenceOrder)
        );
        w.data_out(&dout(1, 0, 4, true), &piece(4, 4)).unwrap();
        w.data_out(&dout(2, 0, 8, true), &piece(8, 4)).unwrap();
        assert!(w.is_complete());
        assert_eq!(&w.into_data().unwrap()[..], &piece(0, 12)[..]);

        // DataSequenceInOrder=No: the later sequence may come first.
        let mut w = WriteBuffer::new(12, &piece(0, 2), 4, params(true, false, 4, 2));
        let mut ttt = 0;
        w.solicit(|| {
            ttt += 1;
            ttt
        });
        w.data_out(&dout(2, 0, 8, true), &piece(8, 4)).unwrap();
        w.data_out(&dout(1, 0, 4, true), &piece(4, 4)).unwrap();
        w.data_out(&dout(RESERVED_TAG, 0, 2, true), &piece(2, 2))
            .unwrap();
        assert!(w.is_complete());
        assert_eq!(&w.into_data().unwrap()[..], &piece(0, 12)[..]);
    }

    #[test]
    fn assembles_pieces_in_any_order_when_not_in_order() {
        // 64 pieces of 16 bytes over 4 sequences, sent in a scrambled order.
        let edtl = 1024u32;
        let mut w = WriteBuffer::new(edtl, &Bytes::new(), 0, params(false, false, 256, 4));
        let mut ttt = 0;
        let r2ts = w.solicit(|| {
            ttt += 1;
            ttt
        });
        assert_eq!(r2ts.len(), 4);
        let mut order: Vec<u32> = (0..64).collect();
        order.sort_by_key(|i| (i * 37) % 64);
        let mut sns = [0u32; 4];
        for (n, i) in order.iter().enumerate() {
            let off = i * 16;
            let s = (off / 256) as usize;
            let t = r2ts[s].ttt;
            w.data_out(&dout(t, sns[s], off, false), &piece(off, 16))
                .unwrap();
            sns[s] += 1;
            assert_eq!(w.held_bytes(), (n + 1) * 16);
            assert!(w.footprint() <= (n + 1) * (2 * 16 + RUN_OVERHEAD));
        }
        assert!(w.is_complete());
        assert!(!w.data_sn_error());
        let out = w.into_data().unwrap();
        assert_eq!(&out[..], &piece(0, edtl as usize)[..]);
    }

    #[test]
    fn rejects_overlapping_pieces() {
        let mut w = WriteBuffer::new(8, &Bytes::new(), 0, params(false, true, 8, 1));
        w.solicit(|| 1);
        w.data_out(&dout(1, 0, 4, false), &piece(4, 2)).unwrap();
        for (off, len) in [(4, 1), (3, 2), (5, 2), (2, 4), (1, 5)] {
            assert_eq!(
                w.data_out(&dout(1, 1, off, false), &piece(off, len)),
                Err(DataOutError::Overlap),
                "{off}+{len}"
            );
        }
        assert_eq!(w.held_bytes(), 2);
        // The same bytes twice would have counted towards completion without filling the gap.
        w.data_out(&dout(1, 1, 0, false), &piece(0, 4)).unwrap();
        assert_eq!(
            w.data_out(&dout(1, 2, 0, false), &piece(0, 2)),
            Err(DataOutError::Overlap)
        );
        w.data_out(&dout(1, 2, 6, true), &piece(6, 2)).unwrap();
        assert_eq!(&w.into_data().unwrap()[..], &piece(0, 8)[..]);
    }

    #[test]
    fn rejects_data_fragmented_past_the_run_limit() {
        let runs = u32::try_from(MAX_RUNS).unwrap();
        let edtl = 2 * (runs + 1);
        let mut w = WriteBuffer::new(edtl, &Bytes::new(), 0, params(false, true, edtl, 1));
        w.solicit(|| 1);
        // One byte at every odd offset: each is its own run.
        for i in 0..runs {
            w.data_out(&dout(1, i, 2 * i + 1, false), &piece(2 * i + 1, 1))
                .unwrap();
        }
        assert_eq!(
            w.data_out(&dout(1, runs, 2 * runs + 1, false), &piece(2 * runs + 1, 1)),
            Err(DataOutError::TooFragmented)
        );
        // A byte that joins existing runs is still taken.
        w.data_out(&dout(1, runs, 2, false), &piece(2, 1)).unwrap();
        assert_eq!(w.held_bytes(), MAX_RUNS + 1);
    }

    #[test]
    fn accepts_empty_data_out_without_holding_anything() {
        let mut w = WriteBuffer::new(4, &Bytes::new(), 0, params(true, true, 4, 1));
        w.solicit(|| 1);
        w.data_out(&dout(1, 0, 0, false), &Bytes::new()).unwrap();
        assert_eq!((w.held_bytes(), w.footprint()), (0, 0));
        w.data_out(&dout(1, 1, 0, true), &piece(0, 4)).unwrap();
        assert!(w.is_complete());
    }
}
