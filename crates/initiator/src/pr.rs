//! PERSISTENT RESERVE IN / OUT from the initiator side (SPC-4 §6.15, §6.16): CDB and
//! parameter-list builders, response parsers, and [`Session`] helpers that return the raw
//! [`CommandResult`] (RESERVATION CONFLICT is an answer a test wants to see, not an error).
//!
//! Used by the end-to-end PR tests and by anything that drives reservations from outside
//! (the migration coordinator's initiator-driven handover).

use crate::error::{Error, Result};
use crate::scsi::CommandResult;
use crate::session::Session;
use bytes::Bytes;

/// PERSISTENT RESERVE OUT service actions (SPC-4 §6.16.1 Table 211).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutAction {
    Register = 0,
    Reserve = 1,
    Release = 2,
    Clear = 3,
    Preempt = 4,
    PreemptAndAbort = 5,
    RegisterAndIgnoreExistingKey = 6,
    RegisterAndMove = 7,
}

/// PERSISTENT RESERVE IN service actions (SPC-4 §6.15.1 Table 201).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InAction {
    ReadKeys = 0,
    ReadReservation = 1,
    ReportCapabilities = 2,
    ReadFullStatus = 3,
}

/// Reservation type codes (SPC-4 §6.16.2 Table 213).
pub mod kind {
    pub const WRITE_EXCLUSIVE: u8 = 1;
    pub const EXCLUSIVE_ACCESS: u8 = 3;
    pub const WRITE_EXCLUSIVE_REGISTRANTS_ONLY: u8 = 5;
    pub const EXCLUSIVE_ACCESS_REGISTRANTS_ONLY: u8 = 6;
    pub const WRITE_EXCLUSIVE_ALL_REGISTRANTS: u8 = 7;
    pub const EXCLUSIVE_ACCESS_ALL_REGISTRANTS: u8 = 8;
}

/// PERSISTENT RESERVE OUT CDB (5Fh): LU_SCOPE, `kind` in bits 3-0 of byte 2.
pub fn out_cdb(action: OutAction, kind: u8, param_len: u32) -> [u8; 10] {
    let l = param_len.to_be_bytes();
    [
        0x5F,
        action as u8,
        kind & 0x0f,
        0,
        0,
        l[0],
        l[1],
        l[2],
        l[3],
        0,
    ]
}

/// PERSISTENT RESERVE IN CDB (5Eh).
pub fn in_cdb(action: InAction, alloc: u16) -> [u8; 10] {
    let a = alloc.to_be_bytes();
    [0x5E, action as u8, 0, 0, 0, 0, 0, a[0], a[1], 0]
}

/// The basic PR OUT parameter list (SPC-4 §6.16.3): 24 bytes, plus the TransportIDs when
/// SPEC_I_PT is set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutParams {
    pub key: u64,
    pub service_action_key: u64,
    pub all_tg_pt: bool,
    pub aptpl: bool,
    /// Non-empty: SPEC_I_PT=1 with these TransportIDs (see [`iscsi_transport_id`]).
    pub transport_ids: Vec<Vec<u8>>,
}

impl OutParams {
    /// RESERVATION KEY `key`, SERVICE ACTION RESERVATION KEY `sa_key`, no flags.
    pub fn keys(key: u64, sa_key: u64) -> Self {
        OutParams {
            key,
            service_action_key: sa_key,
            ..OutParams::default()
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut p = Vec::with_capacity(24);
        p.extend_from_slice(&self.key.to_be_bytes());
        p.extend_from_slice(&self.service_action_key.to_be_bytes());
        p.extend_from_slice(&[0; 4]);
        let spec_i_pt = !self.transport_ids.is_empty();
        p.push(u8::from(spec_i_pt) << 3 | u8::from(self.all_tg_pt) << 2 | u8::from(self.aptpl));
        p.extend_from_slice(&[0; 3]);
        if spec_i_pt {
            let ids: Vec<u8> = self.transport_ids.concat();
            let len = u32::try_from(ids.len()).unwrap_or(u32::MAX);
            p.extend_from_slice(&len.to_be_bytes());
            p.extend_from_slice(&ids);
        }
        p
    }
}

/// The REGISTER AND MOVE parameter list (SPC-4 §6.16.4): the destination's key, its
/// relative target port and one TransportID.
pub fn register_and_move_params(
    key: u64,
    sa_key: u64,
    unreg: bool,
    aptpl: bool,
    rtpi: u16,
    transport_id: &[u8],
) -> Vec<u8> {
    let mut p = Vec::with_capacity(24 + transport_id.len());
    p.extend_from_slice(&key.to_be_bytes());
    p.extend_from_slice(&sa_key.to_be_bytes());
    p.push(0);
    p.push(u8::from(unreg) << 1 | u8::from(aptpl));
    p.extend_from_slice(&rtpi.to_be_bytes());
    let len = u32::try_from(transport_id.len()).unwrap_or(u32::MAX);
    p.extend_from_slice(&len.to_be_bytes());
    p.extend_from_slice(transport_id);
    p
}

/// An iSCSI TransportID (SPC-4 §7.6.4.6, protocol identifier 5h): format 01b (initiator port,
/// `name,i,0x<ISID>`) when `isid` is given, else format 00b (initiator device, the name).
/// Null-terminated and padded to a multiple of 4.
pub fn iscsi_transport_id(name: &str, isid: Option<[u8; 6]>) -> Vec<u8> {
    let mut body = name.as_bytes().to_vec();
    if let Some(isid) = isid {
        body.extend_from_slice(b",i,0x");
        for b in isid {
            body.extend_from_slice(format!("{b:02x}").as_bytes());
        }
    }
    body.push(0);
    while body.len() & 3 != 0 || body.len() < 20 {
        body.push(0);
    }
    let len = u16::try_from(body.len()).unwrap_or(u16::MAX).to_be_bytes();
    let format = if isid.is_some() { 0x40 } else { 0x00 };
    let mut t = vec![format | 0x05, 0, len[0], len[1]];
    t.extend_from_slice(&body);
    t
}

fn be32(d: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(d.get(at..at + 4)?.try_into().ok()?))
}

fn be64(d: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(d.get(at..at + 8)?.try_into().ok()?))
}

/// READ KEYS data (SPC-4 §6.15.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    pub generation: u32,
    /// ADDITIONAL LENGTH as reported (not reduced by truncation).
    pub additional_length: u32,
    pub keys: Vec<u64>,
}

impl Keys {
    pub fn parse(d: &[u8]) -> Option<Keys> {
        let generation = be32(d, 0)?;
        let additional_length = be32(d, 4)?;
        let avail = d.len().saturating_sub(8);
        let n = usize::try_from(additional_length).ok()?.min(avail) / 8;
        let keys = (0..n).map(|i| be64(d, 8 + i * 8)).collect::<Option<_>>()?;
        Some(Keys {
            generation,
            additional_length,
            keys,
        })
    }
}

/// READ RESERVATION data (SPC-4 §6.15.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReservationData {
    pub generation: u32,
    /// `(key, scope, kind)` of the reservation, if one exists.
    pub reservation: Option<(u64, u8, u8)>,
}

impl ReservationData {
    pub fn parse(d: &[u8]) -> Option<ReservationData> {
        let generation = be32(d, 0)?;
        let reservation = match be32(d, 4)? {
            0 => None,
            _ => {
                let st = *d.get(21)?;
                Some((be64(d, 8)?, st >> 4, st & 0x0f))
            }
        };
        Some(ReservationData {
            generation,
            reservation,
        })
    }
}

/// One READ FULL STATUS descriptor (SPC-4 §6.15.5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusDescriptor {
    pub key: u64,
    pub all_tg_pt: bool,
    pub holder: bool,
    pub scope: u8,
    pub kind: u8,
    pub rtpi: u16,
    pub transport_id: Vec<u8>,
}

impl StatusDescriptor {
    /// The TransportID's iSCSI name (and `,i,0x<ISID>` part for format 01b), without padding.
    pub fn initiator(&self) -> String {
        let body = self.transport_id.get(4..).unwrap_or_default();
        let end = body.iter().position(|b| *b == 0).unwrap_or(body.len());
        String::from_utf8_lossy(body.get(..end).unwrap_or_default()).into_owned()
    }
}

/// READ FULL STATUS data (SPC-4 §6.15.5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FullStatus {
    pub generation: u32,
    pub additional_length: u32,
    pub descriptors: Vec<StatusDescriptor>,
}

impl FullStatus {
    pub fn parse(d: &[u8]) -> Option<FullStatus> {
        let generation = be32(d, 0)?;
        let additional_length = be32(d, 4)?;
        let end = 8usize
            .checked_add(usize::try_from(additional_length).ok()?)?
            .min(d.len());
        let mut at = 8usize;
        let mut descriptors = Vec::new();
        while at.checked_add(24)? <= end {
            let tid_len = usize::try_from(be32(d, at + 20)?).ok()?;
            let tid_end = (at + 24).checked_add(tid_len)?;
            let flags = *d.get(at + 12)?;
            let st = *d.get(at + 13)?;
            descriptors.push(StatusDescriptor {
                key: be64(d, at)?,
                all_tg_pt: flags & 0x02 != 0,
                holder: flags & 0x01 != 0,
                scope: st >> 4,
                kind: st & 0x0f,
                rtpi: u16::from_be_bytes(d.get(at + 18..at + 20)?.try_into().ok()?),
                transport_id: d.get(at + 24..tid_end.min(end))?.to_vec(),
            });
            at = tid_end;
        }
        Some(FullStatus {
            generation,
            additional_length,
            descriptors,
        })
    }
}

const ALLOC: u16 = 8192;

impl Session {
    /// PERSISTENT RESERVE OUT with a basic parameter list; the raw result.
    pub async fn pr_out(
        &self,
        lun: u64,
        action: OutAction,
        kind: u8,
        params: &OutParams,
    ) -> Result<CommandResult> {
        let p = params.encode();
        self.pr_out_raw(lun, action, kind, p).await
    }

    /// PERSISTENT RESERVE OUT with `params` exactly as given (REGISTER AND MOVE, malformed
    /// lists); the raw result.
    pub async fn pr_out_raw(
        &self,
        lun: u64,
        action: OutAction,
        kind: u8,
        params: Vec<u8>,
    ) -> Result<CommandResult> {
        let len = u32::try_from(params.len())
            .map_err(|_| Error::InvalidArgument("parameter list over 4 GiB"))?;
        self.command(lun, &out_cdb(action, kind, len), Bytes::from(params), 0)
            .await
    }

    /// PERSISTENT RESERVE IN with allocation length `alloc`; the raw result.
    pub async fn pr_in(&self, lun: u64, action: InAction, alloc: u16) -> Result<CommandResult> {
        self.command(lun, &in_cdb(action, alloc), Bytes::new(), u32::from(alloc))
            .await
    }

    async fn pr_in_good(&self, lun: u64, action: InAction) -> Result<Bytes> {
        Ok(self.pr_in(lun, action, ALLOC).await?.good()?.data)
    }

    /// READ KEYS; a status other than GOOD is [`Error::Status`].
    pub async fn read_keys(&self, lun: u64) -> Result<Keys> {
        let d = self.pr_in_good(lun, InAction::ReadKeys).await?;
        Keys::parse(&d).ok_or_else(|| Error::Protocol("short READ KEYS data".to_owned()))
    }

    /// READ RESERVATION; a status other than GOOD is [`Error::Status`].
    pub async fn read_reservation(&self, lun: u64) -> Result<ReservationData> {
        let d = self.pr_in_good(lun, InAction::ReadReservation).await?;
        ReservationData::parse(&d)
            .ok_or_else(|| Error::Protocol("short READ RESERVATION data".to_owned()))
    }

    /// READ FULL STATUS; a status other than GOOD is [`Error::Status`].
    pub async fn read_full_status(&self, lun: u64) -> Result<FullStatus> {
        let d = self.pr_in_good(lun, InAction::ReadFullStatus).await?;
        FullStatus::parse(&d)
            .ok_or_else(|| Error::Protocol("malformed READ FULL STATUS data".to_owned()))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    #[test]
    fn transport_id_formats() {
        let dev = iscsi_transport_id("iqn.a", None);
        // 4-byte header + "iqn.a\0" padded to the 20-byte minimum.
        assert_eq!(dev.len(), 24);
        assert_eq!(&dev[..4], &[0x05, 0, 0, 20]);
        assert_eq!(&dev[4..10], b"iqn.a\0");
        let port = iscsi_transport_id("iqn.a", Some([0x80, 0, 0, 0, 0, 1]));
        assert_eq!(port[0], 0x45);
        assert_eq!(&port[4..27], b"iqn.a,i,0x800000000001\0");
        assert_eq!(port.len() % 4, 0);
    }

    #[test]
    fn basic_params_layout() {
        let p = OutParams {
            key: 1,
            service_action_key: 2,
            all_tg_pt: true,
            aptpl: true,
            transport_ids: vec![],
        }
        .encode();
        assert_eq!(p.len(), 24);
        assert_eq!(p[7], 1);
        assert_eq!(p[15], 2);
        assert_eq!(p[20], 0x05);
    }

    #[test]
    fn parses_full_status() {
        let tid = iscsi_transport_id("iqn.a", Some([0x80, 0, 0, 0, 0, 1]));
        let mut d = vec![0, 0, 0, 7];
        let desc_len = 24 + tid.len();
        d.extend_from_slice(&u32::try_from(desc_len).unwrap().to_be_bytes());
        d.extend_from_slice(&0xabu64.to_be_bytes());
        d.extend_from_slice(&[0; 4]);
        d.extend_from_slice(&[0x01, 0x05, 0, 0, 0, 0, 0, 2]);
        d.extend_from_slice(&u32::try_from(tid.len()).unwrap().to_be_bytes());
        d.extend_from_slice(&tid);
        let s = FullStatus::parse(&d).unwrap();
        assert_eq!(s.generation, 7);
        assert_eq!(s.descriptors.len(), 1);
        let e = &s.descriptors[0];
        assert_eq!((e.key, e.holder, e.kind, e.rtpi), (0xab, true, 5, 2));
        assert_eq!(e.initiator(), "iqn.a,i,0x800000000001");
    }
}
