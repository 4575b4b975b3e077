//! EXTENDED COPY (LID1) and RECEIVE COPY RESULTS from the initiator side (SPC-4 §6.4, §6.18):
//! CDBs, a parameter list builder (identification CSCD descriptors by NAA, block → block
//! segments) and the NAA of a logical unit from VPD 83h.

use crate::error::Result;
use crate::scsi::CommandResult;
use crate::session::Session;
use bytes::Bytes;

/// EXTENDED COPY (LID1) 83h / 00h with PARAMETER LIST LENGTH `param_len`.
pub fn extended_copy_cdb(param_len: u32) -> [u8; 16] {
    let mut cdb = [0u8; 16];
    cdb[0] = 0x83;
    cdb[10..14].copy_from_slice(&param_len.to_be_bytes());
    cdb
}

/// RECEIVE COPY RESULTS 84h with service action `sa` (00h COPY STATUS, 03h OPERATING
/// PARAMETERS) for `list_id`.
pub fn receive_copy_results_cdb(sa: u8, list_id: u8, alloc: u32) -> [u8; 16] {
    let mut cdb = [0u8; 16];
    cdb[0] = 0x84;
    cdb[1] = sa & 0x1f;
    cdb[2] = list_id;
    cdb[10..14].copy_from_slice(&alloc.to_be_bytes());
    cdb
}

/// One block → block segment: `blocks` blocks from `src_lba` of copy target `src` (index into
/// the targets) to `dst_lba` of target `dst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSegment {
    pub src: u16,
    pub dst: u16,
    pub blocks: u16,
    pub src_lba: u64,
    pub dst_lba: u64,
}

/// An EXTENDED COPY (LID1) parameter list: header (list identifier `list_id`, LIST ID USAGE
/// 00b), one identification CSCD descriptor (E4h, NAA, association logical unit, block
/// device of `block_size`-byte blocks) per entry of `naas`, the segments; no inline data.
pub fn parameter_list(
    list_id: u8,
    naas: &[[u8; 16]],
    block_size: u32,
    segments: &[BlockSegment],
) -> Vec<u8> {
    let mut cscds = Vec::with_capacity(naas.len() * 32);
    for naa in naas {
        let mut d = [0u8; 32];
        d[0] = 0xE4;
        d[4] = 0x01; // code set binary
        d[5] = 0x03; // association logical unit, designator type NAA
        d[7] = 16;
        d[8..24].copy_from_slice(naa);
        d[28..32].copy_from_slice(&(block_size & 0x00ff_ffff).to_be_bytes());
        cscds.extend_from_slice(&d);
    }
    let mut segs = Vec::with_capacity(segments.len() * 28);
    for s in segments {
        let mut d = [0u8; 28];
        d[0] = 0x02;
        d[2..4].copy_from_slice(&0x18u16.to_be_bytes());
        d[4..6].copy_from_slice(&s.src.to_be_bytes());
        d[6..8].copy_from_slice(&s.dst.to_be_bytes());
        d[10..12].copy_from_slice(&s.blocks.to_be_bytes());
        d[12..20].copy_from_slice(&s.src_lba.to_be_bytes());
        d[20..28].copy_from_slice(&s.dst_lba.to_be_bytes());
        segs.extend_from_slice(&d);
    }
    let mut out = [0u8; 16];
    out[0] = list_id;
    out[2..4].copy_from_slice(&u16::try_from(cscds.len()).unwrap_or(u16::MAX).to_be_bytes());
    out[8..12].copy_from_slice(&u32::try_from(segs.len()).unwrap_or(u32::MAX).to_be_bytes());
    let mut out = out.to_vec();
    out.extend_from_slice(&cscds);
    out.extend_from_slice(&segs);
    out
}

/// Segments copying `blocks` blocks from `src_lba` of target `src` to `dst_lba` of `dst`, at
/// most 65535 blocks each.
pub fn split(src: u16, dst: u16, src_lba: u64, dst_lba: u64, blocks: u64) -> Vec<BlockSegment> {
    let mut out = Vec::new();
    let mut done = 0u64;
    while done < blocks {
        let n = (blocks - done).min(u64::from(u16::MAX));
        out.push(BlockSegment {
            src,
            dst,
            blocks: u16::try_from(n).unwrap_or(u16::MAX),
            src_lba: src_lba.saturating_add(done),
            dst_lba: dst_lba.saturating_add(done),
        });
        done += n;
    }
    out
}

/// The 16-byte NAA designator associated with the logical unit in a VPD 83h page.
pub fn naa_from_vpd83(page: &[u8]) -> Option<[u8; 16]> {
    let mut at = 4usize;
    while let (Some(b1), Some(b3)) = (page.get(at + 1), page.get(at + 3)) {
        let len = usize::from(*b3);
        let id = page.get(at + 4..at + 4 + len)?;
        // Association (bits 5:4) 0, designator type 3.
        if b1 & 0x3f == 0x03 && len == 16 {
            return <[u8; 16]>::try_from(id).ok();
        }
        at += 4 + len;
    }
    None
}

impl Session {
    /// EXTENDED COPY (LID1) with `list` as the parameter list.
    pub async fn extended_copy(&self, lun: u64, list: Vec<u8>) -> Result<CommandResult> {
        let n = u32::try_from(list.len()).unwrap_or(u32::MAX);
        self.command(lun, &extended_copy_cdb(n), Bytes::from(list), 0)
            .await
    }

    /// RECEIVE COPY RESULTS with service action `sa` for `list_id`.
    pub async fn receive_copy_results(
        &self,
        lun: u64,
        sa: u8,
        list_id: u8,
    ) -> Result<CommandResult> {
        self.command(
            lun,
            &receive_copy_results_cdb(sa, list_id, 1024),
            Bytes::new(),
            1024,
        )
        .await
    }

    /// The NAA designator of `lun` (INQUIRY VPD 83h), for CSCD descriptors.
    pub async fn lu_naa(&self, lun: u64) -> Result<Option<[u8; 16]>> {
        let r = self.inquiry_vpd(lun, 0x83, 1024).await?;
        Ok(naa_from_vpd83(&r.data))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn builds_a_list_the_target_parses() {
        let segs = split(0, 1, 0, 8, 70_000);
        assert_eq!(segs.len(), 2);
        assert_eq!(u32::from(segs[1].blocks), 70_000 - 65_535);
        assert_eq!(segs[1].dst_lba, 8 + 65_535);
        let l = parameter_list(3, &[[1; 16], [2; 16]], 512, &segs);
        assert_eq!(l.len(), 16 + 64 + 56);
        assert_eq!(&l[2..4], &[0, 64]);
        assert_eq!(&l[8..12], &[0, 0, 0, 56]);
        assert_eq!(&l[16 + 28..16 + 32], &[0, 0, 2, 0]);
    }

    #[test]
    fn finds_the_lu_naa() {
        let mut p = vec![0, 0x83, 0, 0];
        p.extend_from_slice(&[0x02, 0x01, 0, 4, b'a', b'b', b'c', b'd']);
        p.extend_from_slice(&[0x01, 0x03, 0, 16]);
        p.extend_from_slice(&[7; 16]);
        assert_eq!(naa_from_vpd83(&p), Some([7; 16]));
        assert_eq!(naa_from_vpd83(&p[..20]), None);
    }
}
