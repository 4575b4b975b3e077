//! Data-In splitting, status delivery and residuals for a completed SCSI command
//! (RFC 7143 §11.4, §11.7).

use crate::pdu::{DataIn, Header, Pdu, ScsiResponse, RESERVED_TAG};
use bytes::{BufMut, Bytes, BytesMut};

/// SCSI status GOOD (SAM-5 §5.3).
pub const STATUS_GOOD: u8 = 0x00;

/// Residual of one direction (§11.4.5): `overflow` when the command wanted to move more than
/// the initiator's ExpectedDataTransferLength, `underflow` when it moved less.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Residual {
    pub overflow: bool,
    pub underflow: bool,
    pub count: u32,
}

impl Residual {
    /// Residual of a transfer of `wanted` bytes against an allocation of `expected` bytes.
    pub fn of(expected: u32, wanted: u64) -> Self {
        let expected64 = u64::from(expected);
        if wanted > expected64 {
            let count = u32::try_from(wanted.saturating_sub(expected64)).unwrap_or(u32::MAX);
            Residual {
                overflow: true,
                underflow: false,
                count,
            }
        } else if wanted < expected64 {
            let count = u32::try_from(expected64.saturating_sub(wanted)).unwrap_or(u32::MAX);
            Residual {
                overflow: false,
                underflow: true,
                count,
            }
        } else {
            Residual::default()
        }
    }
}

/// Sequence numbers the target stamps on a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamps {
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
}

/// Everything needed to answer one SCSI command.
#[derive(Debug, Clone)]
pub struct Completion<'a> {
    pub itt: u32,
    pub lun: u64,
    pub status: u8,
    pub sense: &'a Bytes,
    /// Data-In as the logical unit produced it (possibly longer than `expected_in`).
    pub data_in: &'a Bytes,
    /// The initiator's read allocation (EDTL with the R bit, else 0).
    pub expected_in: u32,
    /// Residual of the write direction, when the command wrote.
    pub out_residual: Residual,
    /// Largest data segment the initiator accepts (its MaxRecvDataSegmentLength).
    pub max_segment: u32,
    /// R2Ts sent for this command (counted into ExpDataSN of the SCSI Response).
    pub r2t_count: u32,
}

/// Build the PDUs that complete a command: Data-In PDUs of at most `max_segment` bytes
/// (DataSN from 0, increasing buffer offsets, F on the last), with status in the final Data-In
/// when the status is GOOD without sense (§11.7.4 S bit); otherwise a SCSI Response carrying the
/// sense prefixed by its 2-byte SenseLength (§11.4.7). The read residual is computed from the
/// length of `data_in` against `expected_in`; data beyond `expected_in` is never sent.
pub fn complete(c: &Completion<'_>, stamps: Stamps) -> Vec<Pdu> {
    let mut pdus = Vec::new();
    complete_each(c, stamps, |p| pdus.push(p));
    pdus
}

/// As [`complete`], handing each PDU to `emit` in send order instead of collecting them
/// (no allocation per command on the hot path).
pub fn complete_each(c: &Completion<'_>, stamps: Stamps, mut emit: impl FnMut(Pdu)) {
    let wanted = u64::try_from(c.data_in.len()).unwrap_or(u64::MAX);
    let in_residual = Residual::of(c.expected_in, wanted);
    let send_len = usize::try_from(u64::from(c.expected_in).min(wanted)).unwrap_or(0);
    let payload = c.data_in.slice(..send_len.min(c.data_in.len()));
    let seg = usize::try_from(c.max_segment.max(1)).unwrap_or(8192);
    let status_in_data = c.status == STATUS_GOOD
        && c.sense.is_empty()
        && !payload.is_empty()
        && !c.out_residual.overflow
        && !c.out_residual.underflow;

    let mut offset = 0usize;
    let mut data_sn: u32 = 0;
    while offset < payload.len() {
        let end = offset.saturating_add(seg).min(payload.len());
        let last = end == payload.len();
        let with_status = last && status_in_data;
        let header = DataIn {
            final_: last,
            acknowledge: false,
            overflow: with_status && in_residual.overflow,
            underflow: with_status && in_residual.underflow,
            status_present: with_status,
            status: if with_status { c.status } else { 0 },
            lun: c.lun,
            itt: c.itt,
            ttt: RESERVED_TAG,
            stat_sn: if with_status { stamps.stat_sn } else { 0 },
            exp_cmd_sn: stamps.exp_cmd_sn,
            max_cmd_sn: stamps.max_cmd_sn,
            data_sn,
            buffer_offset: u32::try_from(offset).unwrap_or(u32::MAX),
            residual_count: if with_status { in_residual.count } else { 0 },
        };
        emit(Pdu {
            header: Header::DataIn(header),
            ahs: Vec::new(),
            data: payload.slice(offset..end),
        });
        data_sn = data_sn.wrapping_add(1);
        offset = end;
    }
    if status_in_data {
        return;
    }
    // Reads report the read residual; pure writes report the write residual.
    let residual = if c.expected_in > 0 || wanted > 0 {
        in_residual
    } else {
        c.out_residual
    };
    let data = if c.sense.is_empty() {
        Bytes::new()
    } else {
        let len = u16::try_from(c.sense.len()).unwrap_or(u16::MAX);
        let mut b = BytesMut::with_capacity(c.sense.len().saturating_add(2));
        b.put_u16(len);
        b.extend_from_slice(c.sense.get(..usize::from(len)).unwrap_or(&[]));
        b.freeze()
    };
    let header = ScsiResponse {
        bidi_overflow: false,
        bidi_underflow: false,
        overflow: residual.overflow,
        underflow: residual.underflow,
        response: 0,
        status: c.status,
        itt: c.itt,
        snack_tag: 0,
        stat_sn: stamps.stat_sn,
        exp_cmd_sn: stamps.exp_cmd_sn,
        max_cmd_sn: stamps.max_cmd_sn,
        exp_data_sn: data_sn.wrapping_add(c.r2t_count),
        bidi_residual_count: 0,
        residual_count: residual.count,
    };
    emit(Pdu {
        header: Header::ScsiResponse(header),
        ahs: Vec::new(),
        data,
    });
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    const STAMPS: Stamps = Stamps {
        stat_sn: 7,
        exp_cmd_sn: 3,
        max_cmd_sn: 34,
    };

    fn run(data: &[u8], expected_in: u32, status: u8, sense: &[u8], seg: u32) -> Vec<Pdu> {
        let data = Bytes::copy_from_slice(data);
        let sense = Bytes::copy_from_slice(sense);
        let c = Completion {
            itt: 9,
            lun: 0,
            status,
            sense: &sense,
            data_in: &data,
            expected_in,
            out_residual: Residual::default(),
            max_segment: seg,
            r2t_count: 0,
        };
        complete(&c, STAMPS)
    }

    fn data_in(p: &Pdu) -> &DataIn {
        match &p.header {
            Header::DataIn(d) => d,
            other => panic!("expected Data-In, got {other:?}"),
        }
    }

    #[test]
    fn residual_table() {
        let table = [
            (512u32, 512u64, Residual::default()),
            (
                0,
                512,
                Residual {
                    overflow: true,
                    underflow: false,
                    count: 512,
                },
            ),
            (
                10000,
                512,
                Residual {
                    overflow: false,
                    underflow: true,
                    count: 9488,
                },
            ),
            (
                200,
                512,
                Residual {
                    overflow: true,
                    underflow: false,
                    count: 312,
                },
            ),
        ];
        for (expected, wanted, r) in table {
            assert_eq!(Residual::of(expected, wanted), r, "{expected} vs {wanted}");
        }
    }

    #[test]
    fn splits_and_puts_status_in_final_data_in() {
        let pdus = run(&[0xab; 20], 20, 0, &[], 8);
        assert_eq!(pdus.len(), 3);
        for (i, p) in pdus.iter().enumerate() {
            let d = data_in(p);
            assert_eq!(d.data_sn, u32::try_from(i).unwrap());
            assert_eq!(d.buffer_offset, u32::try_from(i * 8).unwrap());
            assert_eq!(d.final_, i == 2);
            assert_eq!(d.status_present, i == 2);
        }
        assert_eq!(data_in(&pdus[2]).stat_sn, 7);
        assert_eq!(pdus[2].data.len(), 4);
    }

    #[test]
    fn overflow_cuts_data_and_flags_o_bit() {
        let pdus = run(&[1; 512], 200, 0, &[], 8192);
        assert_eq!(pdus.len(), 1);
        assert_eq!(pdus[0].data.len(), 200);
        let d = data_in(&pdus[0]);
        assert!(d.overflow && !d.underflow);
        assert_eq!(d.residual_count, 312);
    }

    #[test]
    fn zero_allocation_gives_scsi_response_with_overflow() {
        let pdus = run(&[1; 512], 0, 0, &[], 8192);
        assert_eq!(pdus.len(), 1);
        let Header::ScsiResponse(r) = &pdus[0].header else {
            panic!("no response")
        };
        assert!(r.overflow);
        assert_eq!(r.residual_count, 512);
    }

    #[test]
    fn check_condition_sends_sense_with_length_prefix() {
        let pdus = run(&[], 0, 0x02, &[0x70, 0, 5], 8192);
        assert_eq!(pdus.len(), 1);
        let Header::ScsiResponse(r) = &pdus[0].header else {
            panic!("no response")
        };
        assert_eq!(r.status, 0x02);
        assert_eq!(r.stat_sn, 7);
        assert_eq!(&pdus[0].data[..], &[0, 3, 0x70, 0, 5]);
    }
}
