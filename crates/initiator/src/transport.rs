//! Framing over a byte stream: the receive side (buffer + [`Framer`]) and the send side
//! (encoded pieces written in order). Shared by the login, session and raw paths.

use crate::error::{Error, Result};
use bytes::{Bytes, BytesMut};
use ironlun_iscsi::framer::{encode_pdu, Digests, Framed, Framer};
use ironlun_iscsi::limits::Limits;
use ironlun_iscsi::Pdu;
use std::io::IoSlice;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Bytes read per `read` call at most.
const READ_CHUNK: usize = 64 * 1024;

/// The receive half: frames PDUs off a stream. Digests in `framer.digests`.
#[derive(Debug)]
pub(crate) struct PduReader<R> {
    pub(crate) io: R,
    pub(crate) buf: BytesMut,
    pub(crate) framer: Framer,
}

impl<R: AsyncRead + Unpin> PduReader<R> {
    pub(crate) fn new(io: R, limits: Limits) -> Self {
        PduReader {
            io,
            buf: BytesMut::with_capacity(READ_CHUNK),
            framer: Framer::new(limits),
        }
    }

    /// The next PDU, `Ok(None)` on a clean EOF between PDUs. EOF inside a PDU is an error.
    pub(crate) async fn recv(&mut self) -> Result<Option<Pdu>> {
        loop {
            match self.framer.next_pdu(&mut self.buf)? {
                Some(Framed::Pdu(pdu)) => return Ok(Some(pdu)),
                Some(Framed::Bad { error, .. }) => return Err(Error::Pdu(error)),
                None => {}
            }
            self.buf.reserve(READ_CHUNK);
            let n = self.io.read_buf(&mut self.buf).await?;
            if n == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(Error::Io(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "connection closed inside a PDU",
                    )))
                };
            }
        }
    }

    /// Like [`PduReader::recv`] but EOF is [`Error::Closed`].
    pub(crate) async fn recv_some(&mut self) -> Result<Pdu> {
        self.recv().await?.ok_or(Error::Closed)
    }
}

/// Encode `pdu` with `digests` and write it whole.
pub(crate) async fn write_pdu<W: AsyncWrite + Unpin>(
    io: &mut W,
    pdu: &Pdu,
    digests: Digests,
) -> Result<()> {
    let pieces = encode_pdu(pdu, digests);
    write_pieces(io, &pieces).await
}

/// Write every piece in order, vectored where the stream allows it.
pub(crate) async fn write_pieces<W: AsyncWrite + Unpin>(
    io: &mut W,
    pieces: &[Bytes],
) -> Result<()> {
    let mut idx = 0usize;
    let mut off = 0usize;
    while let Some(first) = pieces.get(idx) {
        let head = first.get(off..).unwrap_or_default();
        let mut slices = Vec::with_capacity(pieces.len().saturating_sub(idx));
        slices.push(IoSlice::new(head));
        for p in pieces.iter().skip(idx.saturating_add(1)) {
            slices.push(IoSlice::new(p));
        }
        let mut n = io.write_vectored(&slices).await?;
        if n == 0 {
            return Err(Error::Io(std::io::ErrorKind::WriteZero.into()));
        }
        // Advance (idx, off) by n bytes.
        while n > 0 {
            let Some(p) = pieces.get(idx) else { break };
            let left = p.len().saturating_sub(off);
            if n >= left {
                n -= left;
                idx = idx.saturating_add(1);
                off = 0;
            } else {
                off = off.saturating_add(n);
                n = 0;
            }
        }
        // Skip empty pieces so the loop ends.
        while pieces.get(idx).is_some_and(|p| p.len() <= off) {
            idx = idx.saturating_add(1);
            off = 0;
        }
    }
    io.flush().await?;
    Ok(())
}
