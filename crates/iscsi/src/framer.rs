//! Cuts a received byte stream into PDUs and encodes PDUs for sending (RFC 7143 §11.2).
//!
//! Every length (TotalAHSLength, DataSegmentLength) is checked against [`Limits`] as soon as
//! the BHS is in, before any payload is buffered. Digests are checked when negotiated.
//!
//! On the wire a PDU is BHS (48) · AHSs (TotalAHSLength × 4) · [HeaderDigest 4] · data ·
//! padding to 4 · [DataDigest 4] (§11.2). The header digest covers BHS and AHSs; the data digest
//! covers data and padding and is present only when DataSegmentLength > 0 (§11.2.3, §12.1).

use crate::bhs::{self, BHS_LEN};
use crate::digest::{self, DIGEST_LEN};
use crate::error::PduError;
use crate::limits::Limits;
use crate::pdu::Pdu;
use bytes::{Bytes, BytesMut};

/// Which digests are in force on a connection (CRC32C or None per direction is symmetric in iSCSI).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Digests {
    pub header: bool,
    pub data: bool,
}

/// Stateful stream framer. Feed it the receive buffer; it splits whole PDUs off the front
/// (`split_to().freeze()`, no payload copy).
#[derive(Debug, Default)]
pub struct Framer {
    pub limits: Limits,
    pub digests: Digests,
}

/// One framed PDU, or an error that names how far the stream is still usable.
#[derive(Debug)]
pub enum Framed {
    Pdu(Pdu),
    /// The PDU was consumed from the buffer but is bad (e.g. data digest, unknown opcode):
    /// `header` is the raw 48-byte BHS for a Reject's data segment.
    Bad {
        error: PduError,
        header: Bytes,
    },
}

/// Where the parts of one PDU lie, computed from its BHS and the digests in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameLayout {
    /// TotalAHSLength in bytes.
    pub ahs_len: usize,
    pub header_digest: bool,
    /// DataSegmentLength (without padding).
    pub data_len: usize,
    /// Whether a data digest follows the padded data (digest on and data non-empty).
    pub data_digest: bool,
    /// Bytes of the whole PDU on the wire.
    pub total_len: usize,
}

fn too_long(field: &'static str, value: u32, limit: u32) -> PduError {
    PduError::TooLong {
        field,
        value,
        limit,
    }
}

fn to_usize(field: &'static str, v: u32) -> Result<usize, PduError> {
    usize::try_from(v).map_err(|_| too_long(field, v, u32::MAX))
}

impl FrameLayout {
    /// Lay out the PDU whose BHS is `bhs`, checking TotalAHSLength against `limits.max_ahs` and
    /// DataSegmentLength against `limits.max_data_segment` (both `TooLong`: drop the connection).
    pub fn from_bhs(
        bhs: &[u8; BHS_LEN],
        limits: &Limits,
        digests: Digests,
    ) -> Result<Self, PduError> {
        let (ahs, dsl) = bhs::lengths(bhs);
        if ahs > limits.max_ahs {
            return Err(too_long("TotalAHSLength", ahs, limits.max_ahs));
        }
        if dsl > limits.max_data_segment {
            return Err(too_long("DataSegmentLength", dsl, limits.max_data_segment));
        }
        let ahs_len = to_usize("TotalAHSLength", ahs)?;
        let data_len = to_usize("DataSegmentLength", dsl)?;
        let data_digest = digests.data && data_len > 0;
        let total_len = [
            ahs_len,
            if digests.header { DIGEST_LEN } else { 0 },
            data_len,
            bhs::padding(data_len),
            if data_digest { DIGEST_LEN } else { 0 },
        ]
        .into_iter()
        .try_fold(BHS_LEN, usize::checked_add)
        .ok_or_else(|| too_long("DataSegmentLength", dsl, limits.max_data_segment))?;
        Ok(FrameLayout {
            ahs_len,
            header_digest: digests.header,
            data_len,
            data_digest,
            total_len,
        })
    }

    /// Offset of the data segment.
    fn data_start(&self) -> usize {
        let hd = if self.header_digest { DIGEST_LEN } else { 0 };
        BHS_LEN.saturating_add(self.ahs_len).saturating_add(hd)
    }
}

/// `len` bytes of `b` from `start`, without panicking.
fn sub(b: &Bytes, start: usize, len: usize) -> Result<Bytes, PduError> {
    let end = start.checked_add(len);
    match end {
        Some(end) if end <= b.len() => Ok(b.slice(start..end)),
        _ => Err(PduError::Truncated {
            need: end.unwrap_or(usize::MAX),
            have: b.len(),
        }),
    }
}

fn digest_at(b: &[u8], at: usize) -> Result<u32, PduError> {
    let bytes = at
        .checked_add(DIGEST_LEN)
        .and_then(|end| b.get(at..end))
        .and_then(|s| <[u8; DIGEST_LEN]>::try_from(s).ok())
        .ok_or(PduError::Truncated {
            need: at.saturating_add(DIGEST_LEN),
            have: b.len(),
        })?;
    Ok(digest::from_wire(bytes))
}

/// Decode one whole frame (exactly `layout.total_len` bytes). A bad header digest is `Err`;
/// a bad data digest, an unknown opcode or a bad field is `Ok(Framed::Bad)`.
fn decode_frame(frame: Bytes, layout: &FrameLayout) -> Result<Framed, PduError> {
    let header = sub(&frame, 0, BHS_LEN)?;
    let ahs_end = BHS_LEN.saturating_add(layout.ahs_len);
    if layout.header_digest {
        let covered = frame.get(..ahs_end).unwrap_or_default();
        if digest::crc32c(covered) != digest_at(&frame, ahs_end)? {
            return Err(PduError::HeaderDigest);
        }
    }
    let data_start = layout.data_start();
    let padded = layout
        .data_len
        .saturating_add(bhs::padding(layout.data_len));
    if layout.data_digest {
        let covered = sub(&frame, data_start, padded)?;
        if digest::crc32c(&covered) != digest_at(&frame, data_start.saturating_add(padded))? {
            return Ok(Framed::Bad {
                error: PduError::DataDigest,
                header,
            });
        }
    }
    let bad = |error: PduError| Framed::Bad {
        error,
        header: header.clone(),
    };
    let Some(raw) = header.first_chunk::<BHS_LEN>() else {
        return Err(PduError::Truncated {
            need: BHS_LEN,
            have: header.len(),
        });
    };
    let decoded = match bhs::decode_header(raw) {
        Ok(d) => d,
        Err(e) => return Ok(bad(e)),
    };
    let ahs = match bhs::decode_ahs(frame.get(BHS_LEN..ahs_end).unwrap_or_default()) {
        Ok(a) => a,
        Err(e) => return Ok(bad(e)),
    };
    let data = sub(&frame, data_start, layout.data_len)?;
    Ok(Framed::Pdu(Pdu {
        header: decoded.header,
        ahs,
        data,
    }))
}

impl Framer {
    pub fn new(limits: Limits) -> Self {
        Framer {
            limits,
            digests: Digests::default(),
        }
    }

    /// Take one PDU off the front of `buf` if a whole one is there. `Ok(None)`: need more bytes.
    /// `Err`: the stream cannot be framed any more (oversized length, header digest): drop.
    ///
    /// The lengths are checked as soon as 48 bytes are in; while waiting for the rest, `buf` is
    /// reserved up to the whole PDU (bounded by the limits). A bad data digest, an unknown opcode
    /// or an invalid field consumes the PDU and yields [`Framed::Bad`].
    pub fn next_pdu(&mut self, buf: &mut BytesMut) -> Result<Option<Framed>, PduError> {
        let Some(len) = self.frame_len(buf)? else {
            return Ok(None);
        };
        if buf.len() < len {
            buf.reserve(len.saturating_sub(buf.len()));
            return Ok(None);
        }
        let frame = buf.split_to(len).freeze();
        let layout = self.layout(&frame)?;
        decode_frame(frame, &layout).map(Some)
    }

    /// Length on the wire of the PDU at the front of `buf`, once its BHS is in (`None` before).
    /// Checks the limits like [`Framer::next_pdu`].
    pub fn frame_len(&self, buf: &[u8]) -> Result<Option<usize>, PduError> {
        match buf.first_chunk::<BHS_LEN>() {
            None => Ok(None),
            Some(bhs) => Ok(Some(
                FrameLayout::from_bhs(bhs, &self.limits, self.digests)?.total_len,
            )),
        }
    }

    fn layout(&self, frame: &[u8]) -> Result<FrameLayout, PduError> {
        let bhs = frame.first_chunk::<BHS_LEN>().ok_or(PduError::Truncated {
            need: BHS_LEN,
            have: frame.len(),
        })?;
        FrameLayout::from_bhs(bhs, &self.limits, self.digests)
    }

    /// The longest PDU these limits and digests let a peer make us buffer.
    pub fn max_frame_len(&self) -> usize {
        let ahs = usize::try_from(self.limits.max_ahs).unwrap_or(usize::MAX);
        let data = usize::try_from(self.limits.max_data_segment).unwrap_or(usize::MAX);
        [ahs, DIGEST_LEN, data, 3, DIGEST_LEN]
            .into_iter()
            .fold(BHS_LEN, usize::saturating_add)
    }
}

/// Decode the PDU at the start of `bytes` (initiator and test helper; copies the PDU once).
/// Returns the PDU and the number of bytes it took.
///
/// Errors: `Truncated` when `bytes` holds less than the whole PDU; the limit and digest errors
/// of [`Framer::next_pdu`]; what [`Framed::Bad`] would carry.
pub fn decode_pdu(
    bytes: &[u8],
    limits: &Limits,
    digests: Digests,
) -> Result<(Pdu, usize), PduError> {
    let bhs = bytes.first_chunk::<BHS_LEN>().ok_or(PduError::Truncated {
        need: BHS_LEN,
        have: bytes.len(),
    })?;
    let layout = FrameLayout::from_bhs(bhs, limits, digests)?;
    let frame = bytes.get(..layout.total_len).ok_or(PduError::Truncated {
        need: layout.total_len,
        have: bytes.len(),
    })?;
    match decode_frame(Bytes::copy_from_slice(frame), &layout)? {
        Framed::Pdu(pdu) => Ok((pdu, layout.total_len)),
        Framed::Bad { error, .. } => Err(error),
    }
}

/// Encode `pdu` for sending as vectored pieces: [BHS+AHS(+header digest)], [data], [padding(+data digest)].
/// Empty pieces are omitted. The data `Bytes` is passed through without copying.
///
/// Contract: as [`bhs::encode_pdu_plain`] (AHSs and data fit their length fields).
pub fn encode_pdu(pdu: &Pdu, digests: Digests) -> Vec<Bytes> {
    let mut pieces = Vec::with_capacity(3);
    let len = BHS_LEN
        .saturating_add(bhs::ahs_encoded_len(&pdu.ahs))
        .saturating_add(2 * DIGEST_LEN + 3);
    encode_pdu_into(pdu, digests, &mut BytesMut::with_capacity(len), &mut pieces);
    pieces
}

/// Bytes reserved in a header arena at a time: room for many BHSs, so that a batch of
/// responses shares one allocation (which `reserve` reclaims once the batch is written).
const ARENA_CHUNK: usize = 16 * 1024;

/// As [`encode_pdu`], appending the pieces to `out`. Headers and padding are written into
/// `arena` and split off it, so a reused arena costs no allocation per PDU once the pieces of
/// the previous batch are dropped (DESIGN.md §3 rule 7). `arena` is scratch space: bytes in it
/// that were not split off are discarded.
pub fn encode_pdu_into(pdu: &Pdu, digests: Digests, arena: &mut BytesMut, out: &mut Vec<Bytes>) {
    let ahs_len = bhs::ahs_encoded_len(&pdu.ahs);
    let head_len = BHS_LEN.saturating_add(ahs_len).saturating_add(DIGEST_LEN);
    // Room for the header and for padding plus data digest.
    let need = head_len.saturating_add(3 + DIGEST_LEN);
    if arena.capacity().saturating_sub(arena.len()) < need {
        arena.reserve(need.max(ARENA_CHUNK));
    }
    arena.clear();
    bhs::encode_header(
        &pdu.header,
        u32::try_from(ahs_len).unwrap_or(u32::MAX),
        u32::try_from(pdu.data.len()).unwrap_or(u32::MAX),
        arena,
    );
    bhs::encode_ahs(&pdu.ahs, arena);
    if digests.header {
        let crc = digest::crc32c(arena);
        arena.extend_from_slice(&digest::to_wire(crc));
    }
    out.push(arena.split().freeze());
    if !pdu.data.is_empty() {
        out.push(pdu.data.clone());
        let pad = bhs::pad_bytes(pdu.data.len());
        arena.extend_from_slice(pad);
        if digests.data {
            let crc = digest::crc32c_append(digest::crc32c(&pdu.data), pad);
            arena.extend_from_slice(&digest::to_wire(crc));
        }
        if !arena.is_empty() {
            out.push(arena.split().freeze());
        }
    }
}

#[cfg(test)]
mod tests;
