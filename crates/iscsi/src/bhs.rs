//! Basic Header Segment codec (RFC 7143 §11.2.1) for every opcode.
//!
//! `decode_header` parses exactly 48 bytes; `encode_header` writes exactly 48. The PDU-level
//! functions add AHSs and the data segment (see [`crate::framer`] for digests and padding).

use crate::error::PduError;
use crate::pdu::{Ahs, Header, Pdu};
use bytes::{Bytes, BytesMut};

/// BHS length, §11.2.1.
pub const BHS_LEN: usize = 48;

/// Decode one BHS. `total_ahs_len` and `data_segment_len` are returned beside the typed header.
pub fn decode_header(bhs: &[u8; BHS_LEN]) -> Result<DecodedBhs, PduError> {
    let _ = bhs;
    todo!("bhs decode")
}

/// A decoded BHS with the lengths the framer needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedBhs {
    pub header: Header,
    /// TotalAHSLength in bytes (the wire field × 4).
    pub total_ahs_len: u32,
    pub data_segment_len: u32,
}

/// Encode the BHS of `header` with the given AHS length (bytes, multiple of 4) and data length.
pub fn encode_header(header: &Header, total_ahs_len: u32, data_segment_len: u32, out: &mut BytesMut) {
    let _ = (header, total_ahs_len, data_segment_len, out);
    todo!("bhs encode")
}

/// Parse the AHS area (`total_ahs_len` bytes) into AHSs, §11.2.2.
pub fn decode_ahs(area: &[u8]) -> Result<Vec<Ahs>, PduError> {
    let _ = area;
    todo!("ahs decode")
}

/// Encode AHSs, each padded to 4 bytes.
pub fn encode_ahs(ahs: &[Ahs], out: &mut BytesMut) {
    let _ = (ahs, out);
    todo!("ahs encode")
}

/// Encode a whole PDU without digests: BHS, AHSs, data and its padding. Test and initiator helper;
/// the target's send path uses [`crate::framer::encode_pdu`] to get vectored pieces.
pub fn encode_pdu_plain(pdu: &Pdu) -> Bytes {
    let _ = pdu;
    todo!("pdu encode")
}
