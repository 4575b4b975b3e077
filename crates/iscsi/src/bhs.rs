//! Basic Header Segment codec (RFC 7143 §11.2.1) for every opcode, and the Additional Header
//! Segments (§11.2.2).
//!
//! `decode_header` parses exactly 48 bytes; `encode_header` writes exactly 48. The PDU-level
//! functions add AHSs and the data segment (see [`crate::framer`] for digests and padding).
//!
//! Reserved bits and fields are ignored on decode and written as zero on encode. Fields whose
//! value the RFC fixes (the F bit of single-PDU opcodes, the I bit of a Login Request, the
//! 0xffffffff ITT of Async Message and Reject) are written as the RFC says and not checked on
//! decode; whether a PDU's lengths or tags suit its opcode is the connection's business.

use crate::error::PduError;
use crate::pdu::{
    Ahs, AsyncMessage, DataIn, DataOut, Header, LoginRequest, LoginResponse, LogoutReason,
    LogoutRequest, LogoutResponse, NopIn, NopOut, Opcode, Pdu, R2t, Reject, RejectReason,
    ScsiCommand, ScsiResponse, SnackRequest, Stage, TaskAttr, TaskMgmtRequest, TaskMgmtResponse,
    TextRequest, TextResponse, TmfFunction, TmfResponse, RESERVED_TAG,
};
use bytes::{Bytes, BytesMut};

pub use crate::framer::decode_pdu;

/// BHS length, §11.2.1.
pub const BHS_LEN: usize = 48;
/// Largest TotalAHSLength in bytes: a one-byte count of 4-byte words, §11.2.1.5.
pub const MAX_TOTAL_AHS_LEN: u32 = 255 * 4;
/// Largest DataSegmentLength: a 24-bit field, §11.2.1.6.
pub const MAX_DATA_SEGMENT_LEN: u32 = 0x00ff_ffff;
/// AHSType code of the Extended CDB AHS, §11.2.2.1.
pub const AHS_TYPE_EXTENDED_CDB: u8 = 1;
/// AHSType code of the Bidirectional Read Expected Data Transfer Length AHS, §11.2.2.1.
pub const AHS_TYPE_BIDI_READ_LENGTH: u8 = 2;
/// AHSLength of the bidirectional AHS: the reserved AHS-Specific byte plus 4 bytes, §11.2.2.4.
pub const AHS_BIDI_READ_LENGTH_LEN: u16 = 5;
/// The AHS code is the low six bits of AHSType; the top two are reserved (§11.2.2.1).
const AHS_CODE_MASK: u8 = 0x3f;
/// Fixed part of an AHS: AHSLength (2), AHSType (1), AHS-Specific (1), §11.2.2.
const AHS_HEADER_LEN: usize = 4;

/// Byte 0: I bit (§11.2.1.1) and the six opcode bits (§11.2.1.2); bit 7 is reserved.
const IMMEDIATE_BIT: u8 = 0x40;
const OPCODE_MASK: u8 = 0x3f;
/// Byte 1: F bit (§11.2.1.3) and, per opcode, the bits below.
const FINAL_BIT: u8 = 0x80;
/// SCSI Command R, W bits and ATTR (§11.3).
const READ_BIT: u8 = 0x40;
const WRITE_BIT: u8 = 0x20;
const ATTR_MASK: u8 = 0x07;
/// Text and Login C bit (§11.10.2, §11.12.2); Login T bit (§11.12.1) is the F position.
const CONTINUE_BIT: u8 = 0x40;
const TRANSIT_BIT: u8 = 0x80;
/// SCSI Response o, u, O, U bits (§11.4.5).
const BIDI_OVERFLOW_BIT: u8 = 0x10;
const BIDI_UNDERFLOW_BIT: u8 = 0x08;
const OVERFLOW_BIT: u8 = 0x04;
const UNDERFLOW_BIT: u8 = 0x02;
/// Data-In A and S bits (§11.7.2, §11.7.3); O and U as in the SCSI Response.
const ACK_BIT: u8 = 0x40;
const STATUS_BIT: u8 = 0x01;
/// TMF Function and Logout Reason Code: the low seven bits of byte 1 (§11.5.1, §11.14.1).
const LOW7_MASK: u8 = 0x7f;
/// SNACK Type: the low four bits of byte 1 (§11.16.1).
const SNACK_TYPE_MASK: u8 = 0x0f;

/// A decoded BHS with the lengths the framer needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedBhs {
    pub header: Header,
    /// TotalAHSLength in bytes (the wire field × 4).
    pub total_ahs_len: u32,
    pub data_segment_len: u32,
}

/// Read fields of a BHS at fixed offsets (all in bounds: offsets are constants below 48).
struct Reader<'a>(&'a [u8; BHS_LEN]);

impl Reader<'_> {
    fn u8(&self, off: usize) -> u8 {
        self.0.get(off).copied().unwrap_or(0)
    }
    fn array<const N: usize>(&self, off: usize) -> [u8; N] {
        let mut a = [0u8; N];
        if let Some(s) = self.0.get(off..off + N) {
            a.copy_from_slice(s);
        }
        a
    }
    fn u16(&self, off: usize) -> u16 {
        u16::from_be_bytes(self.array(off))
    }
    fn u32(&self, off: usize) -> u32 {
        u32::from_be_bytes(self.array(off))
    }
    fn u64(&self, off: usize) -> u64 {
        u64::from_be_bytes(self.array(off))
    }
    fn bit(&self, off: usize, mask: u8) -> bool {
        self.u8(off) & mask != 0
    }
}

/// Write fields of a BHS at fixed offsets; everything not written stays zero (reserved).
struct Writer([u8; BHS_LEN]);

impl Writer {
    fn put(&mut self, off: usize, v: &[u8]) {
        if let Some(d) = self.0.get_mut(off..off + v.len()) {
            d.copy_from_slice(v);
        }
    }
    fn u8(&mut self, off: usize, v: u8) {
        self.put(off, &[v]);
    }
    fn u16(&mut self, off: usize, v: u16) {
        self.put(off, &v.to_be_bytes());
    }
    fn u32(&mut self, off: usize, v: u32) {
        self.put(off, &v.to_be_bytes());
    }
    fn u64(&mut self, off: usize, v: u64) {
        self.put(off, &v.to_be_bytes());
    }
}

fn flag(set: bool, mask: u8) -> u8 {
    if set {
        mask
    } else {
        0
    }
}

/// TotalAHSLength (bytes) and DataSegmentLength of a BHS, read without looking at the opcode,
/// so that a PDU with an unknown opcode can still be skipped (§11.2.1.5, §11.2.1.6).
pub fn lengths(bhs: &[u8; BHS_LEN]) -> (u32, u32) {
    let r = Reader(bhs);
    let total_ahs_len = u32::from(r.u8(4)) * 4;
    let data_segment_len = u32::from_be_bytes([0, r.u8(5), r.u8(6), r.u8(7)]);
    (total_ahs_len, data_segment_len)
}

/// Decode one BHS. `total_ahs_len` and `data_segment_len` are returned beside the typed header.
///
/// Errors: `UnknownOpcode` for an opcode outside §11.2.1.2's list; `InvalidField` for a TMF
/// Response code or Reject reason that §11.6.1 / §11.17.1 do not assign.
pub fn decode_header(bhs: &[u8; BHS_LEN]) -> Result<DecodedBhs, PduError> {
    let r = Reader(bhs);
    let code = r.u8(0) & OPCODE_MASK;
    let opcode = Opcode::from_u8(code).ok_or(PduError::UnknownOpcode(code))?;
    let immediate = r.bit(0, IMMEDIATE_BIT);
    let b1 = r.u8(1);
    let final_ = b1 & FINAL_BIT != 0;
    let lun = r.u64(8);
    let itt = r.u32(16);
    let header = match opcode {
        // §11.18
        Opcode::NopOut => Header::NopOut(NopOut {
            immediate,
            lun,
            itt,
            ttt: r.u32(20),
            cmd_sn: r.u32(24),
            exp_stat_sn: r.u32(28),
        }),
        // §11.3
        Opcode::ScsiCommand => Header::ScsiCommand(ScsiCommand {
            immediate,
            final_,
            read: b1 & READ_BIT != 0,
            write: b1 & WRITE_BIT != 0,
            attr: TaskAttr::from_bits(b1 & ATTR_MASK),
            lun,
            itt,
            expected_data_transfer_length: r.u32(20),
            cmd_sn: r.u32(24),
            exp_stat_sn: r.u32(28),
            cdb: r.array(32),
        }),
        // §11.5
        Opcode::TaskMgmtRequest => Header::TaskMgmtRequest(TaskMgmtRequest {
            immediate,
            function: TmfFunction::from_u8(b1 & LOW7_MASK),
            lun,
            itt,
            referenced_task_tag: r.u32(20),
            cmd_sn: r.u32(24),
            exp_stat_sn: r.u32(28),
            ref_cmd_sn: r.u32(32),
            exp_data_sn: r.u32(36),
        }),
        // §11.12
        Opcode::LoginRequest => Header::LoginRequest(LoginRequest {
            transit: b1 & TRANSIT_BIT != 0,
            continue_: b1 & CONTINUE_BIT != 0,
            csg: Stage::from_bits(b1 >> 2),
            nsg: Stage::from_bits(b1),
            version_max: r.u8(2),
            version_min: r.u8(3),
            isid: r.array(8),
            tsih: r.u16(14),
            itt,
            cid: r.u16(20),
            cmd_sn: r.u32(24),
            exp_stat_sn: r.u32(28),
        }),
        // §11.10
        Opcode::TextRequest => Header::TextRequest(TextRequest {
            immediate,
            final_,
            continue_: b1 & CONTINUE_BIT != 0,
            lun,
            itt,
            ttt: r.u32(20),
            cmd_sn: r.u32(24),
            exp_stat_sn: r.u32(28),
        }),
        // §11.7
        Opcode::DataOut => Header::DataOut(DataOut {
            final_,
            lun,
            itt,
            ttt: r.u32(20),
            exp_stat_sn: r.u32(28),
            data_sn: r.u32(36),
            buffer_offset: r.u32(40),
        }),
        // §11.14
        Opcode::LogoutRequest => Header::LogoutRequest(LogoutRequest {
            immediate,
            reason: LogoutReason::from_u8(b1 & LOW7_MASK),
            itt,
            cid: r.u16(20),
            cmd_sn: r.u32(24),
            exp_stat_sn: r.u32(28),
        }),
        // §11.16
        Opcode::SnackRequest => Header::SnackRequest(SnackRequest {
            snack_type: b1 & SNACK_TYPE_MASK,
            lun,
            itt,
            ttt: r.u32(20),
            exp_stat_sn: r.u32(28),
            beg_run: r.u32(40),
            run_length: r.u32(44),
        }),
        // §11.19
        Opcode::NopIn => Header::NopIn(NopIn {
            lun,
            itt,
            ttt: r.u32(20),
            stat_sn: r.u32(24),
            exp_cmd_sn: r.u32(28),
            max_cmd_sn: r.u32(32),
        }),
        // §11.4
        Opcode::ScsiResponse => Header::ScsiResponse(ScsiResponse {
            bidi_overflow: b1 & BIDI_OVERFLOW_BIT != 0,
            bidi_underflow: b1 & BIDI_UNDERFLOW_BIT != 0,
            overflow: b1 & OVERFLOW_BIT != 0,
            underflow: b1 & UNDERFLOW_BIT != 0,
            response: r.u8(2),
            status: r.u8(3),
            itt,
            snack_tag: r.u32(20),
            stat_sn: r.u32(24),
            exp_cmd_sn: r.u32(28),
            max_cmd_sn: r.u32(32),
            exp_data_sn: r.u32(36),
            bidi_residual_count: r.u32(40),
            residual_count: r.u32(44),
        }),
        // §11.6
        Opcode::TaskMgmtResponse => Header::TaskMgmtResponse(TaskMgmtResponse {
            response: TmfResponse::from_u8(r.u8(2))
                .ok_or(PduError::InvalidField("TMF response"))?,
            itt,
            stat_sn: r.u32(24),
            exp_cmd_sn: r.u32(28),
            max_cmd_sn: r.u32(32),
        }),
        // §11.13
        Opcode::LoginResponse => Header::LoginResponse(LoginResponse {
            transit: b1 & TRANSIT_BIT != 0,
            continue_: b1 & CONTINUE_BIT != 0,
            csg: Stage::from_bits(b1 >> 2),
            nsg: Stage::from_bits(b1),
            version_max: r.u8(2),
            version_active: r.u8(3),
            isid: r.array(8),
            tsih: r.u16(14),
            itt,
            stat_sn: r.u32(24),
            exp_cmd_sn: r.u32(28),
            max_cmd_sn: r.u32(32),
            status_class: r.u8(36),
            status_detail: r.u8(37),
        }),
        // §11.11
        Opcode::TextResponse => Header::TextResponse(TextResponse {
            final_,
            continue_: b1 & CONTINUE_BIT != 0,
            lun,
            itt,
            ttt: r.u32(20),
            stat_sn: r.u32(24),
            exp_cmd_sn: r.u32(28),
            max_cmd_sn: r.u32(32),
        }),
        // §11.7
        Opcode::DataIn => Header::DataIn(DataIn {
            final_,
            acknowledge: b1 & ACK_BIT != 0,
            overflow: b1 & OVERFLOW_BIT != 0,
            underflow: b1 & UNDERFLOW_BIT != 0,
            status_present: b1 & STATUS_BIT != 0,
            status: r.u8(3),
            lun,
            itt,
            ttt: r.u32(20),
            stat_sn: r.u32(24),
            exp_cmd_sn: r.u32(28),
            max_cmd_sn: r.u32(32),
            data_sn: r.u32(36),
            buffer_offset: r.u32(40),
            residual_count: r.u32(44),
        }),
        // §11.15
        Opcode::LogoutResponse => Header::LogoutResponse(LogoutResponse {
            response: r.u8(2),
            itt,
            stat_sn: r.u32(24),
            exp_cmd_sn: r.u32(28),
            max_cmd_sn: r.u32(32),
            time2wait: r.u16(40),
            time2retain: r.u16(42),
        }),
        // §11.8
        Opcode::R2t => Header::R2t(R2t {
            lun,
            itt,
            ttt: r.u32(20),
            stat_sn: r.u32(24),
            exp_cmd_sn: r.u32(28),
            max_cmd_sn: r.u32(32),
            r2t_sn: r.u32(36),
            buffer_offset: r.u32(40),
            desired_data_transfer_length: r.u32(44),
        }),
        // §11.9
        Opcode::AsyncMessage => Header::AsyncMessage(AsyncMessage {
            lun,
            stat_sn: r.u32(24),
            exp_cmd_sn: r.u32(28),
            max_cmd_sn: r.u32(32),
            async_event: r.u8(36),
            async_vcode: r.u8(37),
            parameter1: r.u16(38),
            parameter2: r.u16(40),
            parameter3: r.u16(42),
        }),
        // §11.17
        Opcode::Reject => Header::Reject(Reject {
            reason: RejectReason::from_u8(r.u8(2))
                .ok_or(PduError::InvalidField("Reject reason"))?,
            stat_sn: r.u32(24),
            exp_cmd_sn: r.u32(28),
            max_cmd_sn: r.u32(32),
            data_sn_or_r2t_sn: r.u32(36),
        }),
    };
    let (total_ahs_len, data_segment_len) = lengths(bhs);
    Ok(DecodedBhs {
        header,
        total_ahs_len,
        data_segment_len,
    })
}

/// The 48 BHS bytes of `header` with the given AHS length (bytes) and data length.
///
/// Contract: `total_ahs_len` is a multiple of 4 and at most [`MAX_TOTAL_AHS_LEN`];
/// `data_segment_len` is at most [`MAX_DATA_SEGMENT_LEN`]. Larger values are a caller bug
/// (checked in debug builds); release builds write the field truncated to its width.
pub fn header_bytes(header: &Header, total_ahs_len: u32, data_segment_len: u32) -> [u8; BHS_LEN] {
    debug_assert!(total_ahs_len & 3 == 0 && total_ahs_len <= MAX_TOTAL_AHS_LEN);
    debug_assert!(data_segment_len <= MAX_DATA_SEGMENT_LEN);
    let mut w = Writer([0u8; BHS_LEN]);
    w.u8(
        0,
        header.opcode().code() | flag(header.immediate(), IMMEDIATE_BIT),
    );
    w.u8(4, u8::try_from(total_ahs_len / 4).unwrap_or(u8::MAX));
    let [_, d0, d1, d2] = data_segment_len.to_be_bytes();
    w.put(5, &[d0, d1, d2]);
    match header {
        Header::NopOut(h) => {
            w.u8(1, FINAL_BIT);
            w.u64(8, h.lun);
            w.u32(16, h.itt);
            w.u32(20, h.ttt);
            w.u32(24, h.cmd_sn);
            w.u32(28, h.exp_stat_sn);
        }
        Header::ScsiCommand(h) => {
            w.u8(
                1,
                flag(h.final_, FINAL_BIT)
                    | flag(h.read, READ_BIT)
                    | flag(h.write, WRITE_BIT)
                    | h.attr.bits(),
            );
            w.u64(8, h.lun);
            w.u32(16, h.itt);
            w.u32(20, h.expected_data_transfer_length);
            w.u32(24, h.cmd_sn);
            w.u32(28, h.exp_stat_sn);
            w.put(32, &h.cdb);
        }
        Header::TaskMgmtRequest(h) => {
            w.u8(1, FINAL_BIT | (h.function.to_u8() & LOW7_MASK));
            w.u64(8, h.lun);
            w.u32(16, h.itt);
            w.u32(20, h.referenced_task_tag);
            w.u32(24, h.cmd_sn);
            w.u32(28, h.exp_stat_sn);
            w.u32(32, h.ref_cmd_sn);
            w.u32(36, h.exp_data_sn);
        }
        Header::LoginRequest(h) => {
            w.u8(
                1,
                flag(h.transit, TRANSIT_BIT)
                    | flag(h.continue_, CONTINUE_BIT)
                    | (h.csg.bits() << 2)
                    | h.nsg.bits(),
            );
            w.u8(2, h.version_max);
            w.u8(3, h.version_min);
            w.put(8, &h.isid);
            w.u16(14, h.tsih);
            w.u32(16, h.itt);
            w.u16(20, h.cid);
            w.u32(24, h.cmd_sn);
            w.u32(28, h.exp_stat_sn);
        }
        Header::TextRequest(h) => {
            w.u8(
                1,
                flag(h.final_, FINAL_BIT) | flag(h.continue_, CONTINUE_BIT),
            );
            w.u64(8, h.lun);
            w.u32(16, h.itt);
            w.u32(20, h.ttt);
            w.u32(24, h.cmd_sn);
            w.u32(28, h.exp_stat_sn);
        }
        Header::DataOut(h) => {
            w.u8(1, flag(h.final_, FINAL_BIT));
            w.u64(8, h.lun);
            w.u32(16, h.itt);
            w.u32(20, h.ttt);
            w.u32(28, h.exp_stat_sn);
            w.u32(36, h.data_sn);
            w.u32(40, h.buffer_offset);
        }
        Header::LogoutRequest(h) => {
            w.u8(1, FINAL_BIT | (h.reason.to_u8() & LOW7_MASK));
            w.u32(16, h.itt);
            w.u16(20, h.cid);
            w.u32(24, h.cmd_sn);
            w.u32(28, h.exp_stat_sn);
        }
        Header::SnackRequest(h) => {
            w.u8(1, FINAL_BIT | (h.snack_type & SNACK_TYPE_MASK));
            w.u64(8, h.lun);
            w.u32(16, h.itt);
            w.u32(20, h.ttt);
            w.u32(28, h.exp_stat_sn);
            w.u32(40, h.beg_run);
            w.u32(44, h.run_length);
        }
        Header::NopIn(h) => {
            w.u8(1, FINAL_BIT);
            w.u64(8, h.lun);
            w.u32(16, h.itt);
            w.u32(20, h.ttt);
            w.u32(24, h.stat_sn);
            w.u32(28, h.exp_cmd_sn);
            w.u32(32, h.max_cmd_sn);
        }
        Header::ScsiResponse(h) => {
            w.u8(
                1,
                FINAL_BIT
                    | flag(h.bidi_overflow, BIDI_OVERFLOW_BIT)
                    | flag(h.bidi_underflow, BIDI_UNDERFLOW_BIT)
                    | flag(h.overflow, OVERFLOW_BIT)
                    | flag(h.underflow, UNDERFLOW_BIT),
            );
            w.u8(2, h.response);
            w.u8(3, h.status);
            w.u32(16, h.itt);
            w.u32(20, h.snack_tag);
            w.u32(24, h.stat_sn);
            w.u32(28, h.exp_cmd_sn);
            w.u32(32, h.max_cmd_sn);
            w.u32(36, h.exp_data_sn);
            w.u32(40, h.bidi_residual_count);
            w.u32(44, h.residual_count);
        }
        Header::TaskMgmtResponse(h) => {
            w.u8(1, FINAL_BIT);
            w.u8(2, h.response.to_u8());
            w.u32(16, h.itt);
            w.u32(24, h.stat_sn);
            w.u32(28, h.exp_cmd_sn);
            w.u32(32, h.max_cmd_sn);
        }
        Header::LoginResponse(h) => {
            w.u8(
                1,
                flag(h.transit, TRANSIT_BIT)
                    | flag(h.continue_, CONTINUE_BIT)
                    | (h.csg.bits() << 2)
                    | h.nsg.bits(),
            );
            w.u8(2, h.version_max);
            w.u8(3, h.version_active);
            w.put(8, &h.isid);
            w.u16(14, h.tsih);
            w.u32(16, h.itt);
            w.u32(24, h.stat_sn);
            w.u32(28, h.exp_cmd_sn);
            w.u32(32, h.max_cmd_sn);
            w.u8(36, h.status_class);
            w.u8(37, h.status_detail);
        }
        Header::TextResponse(h) => {
            w.u8(
                1,
                flag(h.final_, FINAL_BIT) | flag(h.continue_, CONTINUE_BIT),
            );
            w.u64(8, h.lun);
            w.u32(16, h.itt);
            w.u32(20, h.ttt);
            w.u32(24, h.stat_sn);
            w.u32(28, h.exp_cmd_sn);
            w.u32(32, h.max_cmd_sn);
        }
        Header::DataIn(h) => {
            w.u8(
                1,
                flag(h.final_, FINAL_BIT)
                    | flag(h.acknowledge, ACK_BIT)
                    | flag(h.overflow, OVERFLOW_BIT)
                    | flag(h.underflow, UNDERFLOW_BIT)
                    | flag(h.status_present, STATUS_BIT),
            );
            w.u8(3, h.status);
            w.u64(8, h.lun);
            w.u32(16, h.itt);
            w.u32(20, h.ttt);
            w.u32(24, h.stat_sn);
            w.u32(28, h.exp_cmd_sn);
            w.u32(32, h.max_cmd_sn);
            w.u32(36, h.data_sn);
            w.u32(40, h.buffer_offset);
            w.u32(44, h.residual_count);
        }
        Header::LogoutResponse(h) => {
            w.u8(1, FINAL_BIT);
            w.u8(2, h.response);
            w.u32(16, h.itt);
            w.u32(24, h.stat_sn);
            w.u32(28, h.exp_cmd_sn);
            w.u32(32, h.max_cmd_sn);
            w.u16(40, h.time2wait);
            w.u16(42, h.time2retain);
        }
        Header::R2t(h) => {
            w.u8(1, FINAL_BIT);
            w.u64(8, h.lun);
            w.u32(16, h.itt);
            w.u32(20, h.ttt);
            w.u32(24, h.stat_sn);
            w.u32(28, h.exp_cmd_sn);
            w.u32(32, h.max_cmd_sn);
            w.u32(36, h.r2t_sn);
            w.u32(40, h.buffer_offset);
            w.u32(44, h.desired_data_transfer_length);
        }
        Header::AsyncMessage(h) => {
            w.u8(1, FINAL_BIT);
            w.u64(8, h.lun);
            w.u32(16, RESERVED_TAG);
            w.u32(24, h.stat_sn);
            w.u32(28, h.exp_cmd_sn);
            w.u32(32, h.max_cmd_sn);
            w.u8(36, h.async_event);
            w.u8(37, h.async_vcode);
            w.u16(38, h.parameter1);
            w.u16(40, h.parameter2);
            w.u16(42, h.parameter3);
        }
        Header::Reject(h) => {
            w.u8(1, FINAL_BIT);
            w.u8(2, h.reason.to_u8());
            w.u32(16, RESERVED_TAG);
            w.u32(24, h.stat_sn);
            w.u32(28, h.exp_cmd_sn);
            w.u32(32, h.max_cmd_sn);
            w.u32(36, h.data_sn_or_r2t_sn);
        }
    }
    w.0
}

/// Encode the BHS of `header` with the given AHS length (bytes, multiple of 4) and data length.
/// Same contract as [`header_bytes`].
pub fn encode_header(
    header: &Header,
    total_ahs_len: u32,
    data_segment_len: u32,
    out: &mut BytesMut,
) {
    out.extend_from_slice(&header_bytes(header, total_ahs_len, data_segment_len));
}

/// Parse the AHS area (`total_ahs_len` bytes) into AHSs, §11.2.2.
///
/// Each AHS is AHSLength (2 bytes), AHSType (1), AHS-Specific (1), then AHSLength − 1 more
/// bytes: AHSLength counts the AHS-Specific byte and what follows it, not the first three
/// bytes nor the padding (§11.2.2.2; e.g. the bidirectional AHS has AHSLength 5, §11.2.2.4,
/// and a 32-byte CDB's extended-CDB AHS has AHSLength 17, §11.2.2.3). Each AHS is padded to a
/// multiple of 4 bytes. AHSLength 0, an AHS running past the area, and a bidirectional AHS of
/// another length are `InvalidField("AHSLength")`.
pub fn decode_ahs(area: &[u8]) -> Result<Vec<Ahs>, PduError> {
    const BAD: PduError = PduError::InvalidField("AHSLength");
    let mut out = Vec::new();
    let mut rest = area;
    while !rest.is_empty() {
        let (&[l0, l1, ahs_type, specific], after) =
            rest.split_first_chunk::<AHS_HEADER_LEN>().ok_or(BAD)?;
        let ahs_len = usize::from(u16::from_be_bytes([l0, l1]));
        // The AHS-Specific byte is already in the fixed part.
        let payload_len = ahs_len.checked_sub(1).ok_or(BAD)?;
        let padded_len = payload_len.checked_next_multiple_of(4).ok_or(BAD)?;
        let payload = after.get(..payload_len).ok_or(BAD)?;
        rest = after.get(padded_len..).ok_or(BAD)?;
        out.push(match ahs_type & AHS_CODE_MASK {
            AHS_TYPE_EXTENDED_CDB => Ahs::ExtendedCdb(Bytes::copy_from_slice(payload)),
            AHS_TYPE_BIDI_READ_LENGTH => {
                let len: [u8; 4] = payload.try_into().map_err(|_| BAD)?;
                Ahs::BidiReadLength(u32::from_be_bytes(len))
            }
            code => Ahs::Other {
                ahs_type: code,
                specific,
                payload: Bytes::copy_from_slice(payload),
            },
        });
    }
    Ok(out)
}

/// Bytes `payload_len` needs to reach a multiple of 4 (§11.2.2, §11.2.4).
pub fn padding(payload_len: usize) -> usize {
    (4 - payload_len % 4) % 4
}

/// The zero bytes that pad `payload_len` bytes to a multiple of 4.
pub fn pad_bytes(payload_len: usize) -> &'static [u8] {
    const ZEROS: [u8; 3] = [0; 3];
    ZEROS.get(..padding(payload_len)).unwrap_or(&[])
}

/// Encoded length of one AHS (fixed part, payload, padding).
fn one_ahs_len(ahs: &Ahs) -> usize {
    let payload = match ahs {
        Ahs::ExtendedCdb(b) => b.len(),
        Ahs::BidiReadLength(_) => 4,
        Ahs::Other { payload, .. } => payload.len(),
    };
    AHS_HEADER_LEN
        .saturating_add(payload)
        .saturating_add(padding(payload))
}

/// Encoded length in bytes of `ahs` (what goes into TotalAHSLength × 4).
pub fn ahs_encoded_len(ahs: &[Ahs]) -> usize {
    ahs.iter().map(one_ahs_len).fold(0, usize::saturating_add)
}

/// Encode AHSs, each padded to 4 bytes (§11.2.2). `Other` keeps its six-bit code.
///
/// Contract: each payload is at most 65534 bytes and the total fits TotalAHSLength
/// ([`MAX_TOTAL_AHS_LEN`]); larger is a caller bug (checked in debug builds).
pub fn encode_ahs(ahs: &[Ahs], out: &mut BytesMut) {
    for a in ahs {
        let bidi;
        let (code, specific, payload): (u8, u8, &[u8]) = match a {
            Ahs::ExtendedCdb(b) => (AHS_TYPE_EXTENDED_CDB, 0, b),
            Ahs::BidiReadLength(len) => {
                bidi = len.to_be_bytes();
                (AHS_TYPE_BIDI_READ_LENGTH, 0, &bidi)
            }
            Ahs::Other {
                ahs_type,
                specific,
                payload,
            } => (*ahs_type & AHS_CODE_MASK, *specific, payload),
        };
        let ahs_len = payload
            .len()
            .checked_add(1)
            .and_then(|l| u16::try_from(l).ok());
        debug_assert!(ahs_len.is_some(), "AHS payload too long");
        out.extend_from_slice(&ahs_len.unwrap_or(u16::MAX).to_be_bytes());
        out.extend_from_slice(&[code, specific]);
        out.extend_from_slice(payload);
        out.extend_from_slice(pad_bytes(payload.len()));
    }
}

/// Encode a whole PDU without digests: BHS, AHSs, data and its padding. Test and initiator helper;
/// the target's send path uses [`crate::framer::encode_pdu`] to get vectored pieces.
///
/// Contract: the AHSs fit TotalAHSLength and the data fits DataSegmentLength (see
/// [`header_bytes`]).
pub fn encode_pdu_plain(pdu: &Pdu) -> Bytes {
    let ahs_len = ahs_encoded_len(&pdu.ahs);
    let pad = padding(pdu.data.len());
    let mut out = BytesMut::with_capacity(
        BHS_LEN
            .saturating_add(ahs_len)
            .saturating_add(pdu.data.len())
            .saturating_add(pad),
    );
    encode_header(
        &pdu.header,
        u32::try_from(ahs_len).unwrap_or(u32::MAX),
        u32::try_from(pdu.data.len()).unwrap_or(u32::MAX),
        &mut out,
    );
    encode_ahs(&pdu.ahs, &mut out);
    out.extend_from_slice(&pdu.data);
    out.extend_from_slice(pad_bytes(pdu.data.len()));
    out.freeze()
}

#[cfg(test)]
pub(crate) mod tests;
