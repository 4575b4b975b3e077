//! Raw mode for negative tests: a TCP connection where the test writes whatever bytes or PDUs
//! it wants and reads back what the target sends, framed by our own [`Framer`].
//!
//! [`RawConnection::login`] performs a normal login first and hands back the negotiated state
//! (next CmdSN, ExpStatSN, digests) so that crafted PDUs can be sent in full feature phase.
//!
//! [`Framer`]: ironlun_iscsi::framer::Framer

use crate::error::{Error, Result};
use crate::login;
use crate::options::{LoginOptions, Negotiated};
use crate::session::{receive_limits, tcp_connect, Session};
use crate::transport::{write_pdu, write_pieces, PduReader};
use bytes::Bytes;
use ironlun_iscsi::framer::{encode_pdu, Digests};
use ironlun_iscsi::Pdu;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::ToSocketAddrs;

/// A connection driven PDU by PDU by the caller.
#[derive(Debug)]
pub struct RawConnection {
    reader: PduReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    digests: Digests,
}

impl RawConnection {
    /// TCP connect only: the caller sends the login itself.
    pub async fn connect(addr: impl ToSocketAddrs) -> Result<RawConnection> {
        let opts = LoginOptions::default();
        let stream = tcp_connect(addr, &opts).await?;
        let (rd, writer) = stream.into_split();
        Ok(RawConnection {
            reader: PduReader::new(rd, receive_limits(&opts)),
            writer,
            digests: Digests::default(),
        })
    }

    /// TCP connect and a normal login; afterwards the connection uses the negotiated digests
    /// both ways. The returned [`Negotiated`] has the next CmdSN, ExpStatSN and next free ITT.
    pub async fn login(
        addr: impl ToSocketAddrs,
        opts: &LoginOptions,
    ) -> Result<(RawConnection, Negotiated)> {
        let stream = tcp_connect(addr, opts).await?;
        let (rd, mut writer) = stream.into_split();
        let mut reader = PduReader::new(rd, receive_limits(opts));
        let negotiated = login::login(&mut reader, &mut writer, opts).await?;
        let digests = Digests {
            header: negotiated.header_digest,
            data: negotiated.data_digest,
        };
        reader.framer.digests = digests;
        Ok((
            RawConnection {
                reader,
                writer,
                digests,
            },
            negotiated,
        ))
    }

    /// Turn a raw connection that completed login into a [`Session`].
    pub fn into_session(self, negotiated: Negotiated) -> Session {
        Session::start(self.reader, self.writer, negotiated)
    }

    /// Digests in force (both directions).
    pub fn digests(&self) -> Digests {
        self.digests
    }

    /// Encode `pdu` as it would go on the wire now (with digests), for tests that corrupt it.
    pub fn encode(&self, pdu: &Pdu) -> Vec<u8> {
        encode_pdu(pdu, self.digests)
            .iter()
            .flat_map(|b| b.iter().copied())
            .collect()
    }

    /// Write `bytes` as they are.
    pub async fn send_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        write_pieces(&mut self.writer, &[Bytes::copy_from_slice(bytes)]).await
    }

    /// Encode and write `pdu` with the digests in force.
    pub async fn send_pdu(&mut self, pdu: &Pdu) -> Result<()> {
        write_pdu(&mut self.writer, pdu, self.digests).await
    }

    /// Close our sending side (FIN); we can still read.
    pub async fn shutdown_write(&mut self) -> Result<()> {
        self.writer.shutdown().await?;
        Ok(())
    }

    /// The next PDU from the target: `Ok(None)` on a clean EOF, [`Error::Timeout`] if none
    /// arrives within `timeout`.
    pub async fn recv_pdu(&mut self, timeout: Duration) -> Result<Option<Pdu>> {
        tokio::time::timeout(timeout, self.reader.recv())
            .await
            .map_err(|_| Error::Timeout)?
    }

    /// Whether the target closes the connection within `timeout` (EOF or reset). Anything it
    /// sends before closing is read and discarded.
    pub async fn is_closed(&mut self, timeout: Duration) -> bool {
        let reader = &mut self.reader;
        let drain = async {
            reader.buf.clear();
            let mut scratch = vec![0u8; 64 * 1024];
            loop {
                match reader.io.read(&mut scratch).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        };
        tokio::time::timeout(timeout, drain).await.is_ok()
    }
}
