//! Cuts a received byte stream into PDUs and encodes PDUs for sending (RFC 7143 §11.2).
//!
//! Every length (TotalAHSLength, DataSegmentLength) is checked against [`Limits`] as soon as
//! the BHS is in, before any payload is buffered. Digests are checked when negotiated.

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
    Bad { error: PduError, header: Bytes },
}

impl Framer {
    pub fn new(limits: Limits) -> Self {
        Framer { limits, digests: Digests::default() }
    }

    /// Take one PDU off the front of `buf` if a whole one is there. `Ok(None)`: need more bytes.
    /// `Err`: the stream cannot be framed any more (oversized length, header digest): drop.
    pub fn next_pdu(&mut self, buf: &mut BytesMut) -> Result<Option<Framed>, PduError> {
        let _ = buf;
        todo!("framer")
    }
}

/// Encode `pdu` for sending as vectored pieces: [BHS+AHS(+header digest)], [data], [padding(+data digest)].
/// Empty pieces are omitted. The data `Bytes` is passed through without copying.
pub fn encode_pdu(pdu: &Pdu, digests: Digests) -> Vec<Bytes> {
    let _ = (pdu, digests);
    todo!("encode")
}
