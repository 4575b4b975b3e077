//! Write data assembly (RFC 7143 §4.2.2.3, §11.7, §11.8): immediate data, the unsolicited
//! Data-Out sequence, and solicited sequences opened by R2T.

use crate::pdu::{DataOut, RESERVED_TAG};
use bytes::{Bytes, BytesMut};

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
    pub data_pdu_in_order: bool,
}

/// Where the data received so far lives (DESIGN.md §3 rule 7: no payload copy where the layout
/// allows it).
#[derive(Debug)]
enum Assembly {
    /// Nothing received yet.
    Empty,
    /// One piece starting at offset 0, kept as the received frame's slice (not copied).
    Single(Bytes),
    /// Several pieces: copied once into a buffer of at most ExpectedDataTransferLength bytes.
    Assembled(BytesMut),
}

/// The write buffer of one command, bounded by its ExpectedDataTransferLength (which the caller
/// has checked against [`crate::Limits::max_transfer`] before creating it).
///
/// A transfer whose data arrives as one piece at offset 0 (all immediate, or one Data-Out) is
/// handed on as that piece's `Bytes`; only multi-PDU transfers are assembled, by one copy each.
#[derive(Debug)]
pub struct WriteBuffer {
    data: Assembly,
    edtl: u32,
    received: u32,
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
    /// `immediate.len() <= unsolicited_end <= edtl` is the caller's check.
    pub fn new(edtl: u32, immediate: &Bytes, unsolicited_end: u32, params: WriteParams) -> Self {
        let len = usize::try_from(edtl).unwrap_or(0);
        let imm = immediate.len().min(len);
        let data = if imm == 0 {
            Assembly::Empty
        } else {
            Assembly::Single(immediate.slice(..imm))
        };
        let imm32 = u32::try_from(imm).unwrap_or(0);
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

    /// Open as many R2T sequences as MaxOutstandingR2T allows, each at most MaxBurstLength
    /// (§11.8); `next_ttt` hands out target transfer tags.
    pub fn solicit(&mut self, mut next_ttt: impl FnMut() -> u32) -> Vec<R2tRequest> {
        let mut out = Vec::new();
        let max_out = usize::from(self.params.max_outstanding_r2t.max(1));
        while self.next_solicit < self.edtl
            && self
                .sequences
                .iter()
                .filter(|s| s.ttt != RESERVED_TAG)
                .count()
                < max_out
        {
            let len = (self.edtl - self.next_solicit).min(self.params.max_burst.max(1));
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
            out.push(R2tRequest {
                ttt,
                r2t_sn: self.r2t_sn,
                buffer_offset: start,
                desired_length: len,
            });
            self.r2t_sn = self.r2t_sn.wrapping_add(1);
            self.next_solicit = end;
        }
        out
    }

    /// Take one Data-Out: check its sequence (TTT), DataSN, offset and length, then copy it.
    pub fn data_out(&mut self, h: &DataOut, data: &Bytes) -> Result<(), DataOutError> {
        let idx = self
            .sequences
            .iter()
            .position(|s| s.ttt == h.ttt)
            .ok_or(DataOutError::UnknownTtt)?;
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
        let from = usize::try_from(h.buffer_offset).map_err(|_| DataOutError::OutOfBounds)?;
        let edtl = usize::try_from(self.edtl).map_err(|_| DataOutError::OutOfBounds)?;
        place(&mut self.data, edtl, from, data)?;
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

    /// The assembled data (call once [`WriteBuffer::is_complete`]): exactly
    /// ExpectedDataTransferLength bytes, zero-filled where nothing arrived.
    pub fn into_data(self) -> Bytes {
        let len = usize::try_from(self.edtl).unwrap_or(0);
        match self.data {
            Assembly::Single(b) if b.len() == len => b,
            Assembly::Empty if len == 0 => Bytes::new(),
            Assembly::Empty => BytesMut::zeroed(len).freeze(),
            Assembly::Single(b) => {
                let mut buf = BytesMut::with_capacity(len);
                buf.extend_from_slice(&b);
                buf.resize(len, 0);
                buf.freeze()
            }
            Assembly::Assembled(mut buf) => {
                buf.resize(len, 0);
                buf.freeze()
            }
        }
    }
}

/// Put `data` at byte `from` of a transfer of `edtl` bytes. The caller has checked
/// `from + data.len() <= edtl`. The first piece at offset 0 is kept without copying; a second
/// piece switches to one buffer of capacity `edtl`, filled by appending when the pieces come
/// in order (no zero-fill) and zero-extended for the gap when they do not.
fn place(asm: &mut Assembly, edtl: usize, from: usize, data: &Bytes) -> Result<(), DataOutError> {
    let to = from
        .checked_add(data.len())
        .filter(|&t| t <= edtl)
        .ok_or(DataOutError::OutOfBounds)?;
    if from == 0 && matches!(asm, Assembly::Empty) {
        *asm = Assembly::Single(data.clone());
        return Ok(());
    }
    let mut buf = match std::mem::replace(asm, Assembly::Empty) {
        Assembly::Assembled(buf) => buf,
        Assembly::Empty => BytesMut::with_capacity(edtl),
        Assembly::Single(first) => {
            let mut buf = BytesMut::with_capacity(edtl);
            buf.extend_from_slice(&first);
            buf
        }
    };
    if from >= buf.len() {
        buf.resize(from, 0);
        buf.extend_from_slice(data);
    } else {
        if to > buf.len() {
            buf.resize(to, 0);
        }
        // In bounds: `buf.len() >= to` after the resize.
        if let Some(dst) = buf.get_mut(from..to) {
            dst.copy_from_slice(data);
        }
    }
    *asm = Assembly::Assembled(buf);
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    const PARAMS: WriteParams = WriteParams {
        max_burst: 4,
        max_outstanding_r2t: 1,
        data_pdu_in_order: true,
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
        assert_eq!(&w.into_data()[..], b"abcdefghijkl");
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
        let out = w.into_data();
        assert_eq!(out.as_ptr(), imm.as_ptr());
    }

    #[test]
    fn accepts_one_data_out_without_copy() {
        let mut w = WriteBuffer::new(4, &Bytes::new(), 0, PARAMS);
        assert_eq!(w.solicit(|| 9).len(), 1);
        let d = Bytes::from_static(b"wxyz");
        w.data_out(&dout(9, 0, 0, true), &d).unwrap();
        assert!(w.is_complete());
        let out = w.into_data();
        assert_eq!(out.as_ptr(), d.as_ptr());
    }

    #[test]
    fn accepts_out_of_order_pieces_when_not_in_order() {
        let params = WriteParams {
            max_burst: 8,
            max_outstanding_r2t: 1,
            data_pdu_in_order: false,
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
        assert_eq!(&w.into_data()[..], b"abcdefgh");
    }
}
