//! SCSI side of a command: the result type and CDB builders for the convenience helpers
//! (SPC-4, SBC-3).

use crate::error::{Error, Result};
use bytes::Bytes;

/// SCSI status GOOD (SAM-5 §5.3).
pub const STATUS_GOOD: u8 = 0x00;
/// SCSI status CHECK CONDITION.
pub const STATUS_CHECK_CONDITION: u8 = 0x02;
/// SCSI status BUSY.
pub const STATUS_BUSY: u8 = 0x08;
/// SCSI status RESERVATION CONFLICT.
pub const STATUS_RESERVATION_CONFLICT: u8 = 0x18;

/// Residual of a command (RFC 7143 §11.4.5 U/O bits and Residual Count).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Residual {
    #[default]
    None,
    /// Fewer bytes than expected were transferred; this many were not.
    Underflow(u32),
    /// The target wanted to transfer this many bytes more than expected.
    Overflow(u32),
}

impl Residual {
    pub(crate) fn from_flags(underflow: bool, overflow: bool, count: u32) -> Residual {
        if underflow {
            Residual::Underflow(count)
        } else if overflow {
            Residual::Overflow(count)
        } else {
            Residual::None
        }
    }
}

/// Outcome of one SCSI command.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CommandResult {
    /// SCSI status (valid when `response` is 0).
    pub status: u8,
    /// Sense data without the 2-byte SenseLength prefix (§11.4.7.2); empty if none.
    pub sense: Bytes,
    /// Data-In, reassembled by buffer offset.
    pub data: Bytes,
    pub residual: Residual,
    /// iSCSI Response field (§11.4.3): 0 = command completed at target.
    pub response: u8,
}

/// Fixed or descriptor sense reduced to key / ASC / ASCQ (SPC-4 §4.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SenseKey {
    pub key: u8,
    pub asc: u8,
    pub ascq: u8,
}

impl SenseKey {
    /// Parse response codes 70h/71h (fixed) and 72h/73h (descriptor); `None` otherwise.
    pub fn parse(sense: &[u8]) -> Option<SenseKey> {
        let code = sense.first()? & 0x7f;
        match code {
            0x70 | 0x71 => Some(SenseKey {
                key: sense.get(2)? & 0x0f,
                asc: *sense.get(12)?,
                ascq: *sense.get(13)?,
            }),
            0x72 | 0x73 => Some(SenseKey {
                key: sense.get(1)? & 0x0f,
                asc: *sense.get(2)?,
                ascq: *sense.get(3)?,
            }),
            _ => None,
        }
    }
}

impl CommandResult {
    /// Key / ASC / ASCQ of the sense data, if any parses.
    pub fn sense_key(&self) -> Option<SenseKey> {
        SenseKey::parse(&self.sense)
    }

    /// `Ok(self)` when response is 0 and status GOOD, else the matching [`Error`].
    pub fn good(self) -> Result<CommandResult> {
        if self.response != 0 {
            return Err(Error::Response(self.response));
        }
        if self.status != STATUS_GOOD {
            return Err(Error::Status {
                status: self.status,
                sense: self.sense,
            });
        }
        Ok(self)
    }
}

/// What READ CAPACITY (16) reports (SBC-3 §5.16).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// Number of logical blocks (RETURNED LOGICAL BLOCK ADDRESS + 1).
    pub blocks: u64,
    pub block_size: u32,
}

impl Capacity {
    /// Parse READ CAPACITY (16) parameter data (at least 12 bytes).
    pub fn parse(data: &[u8]) -> Option<Capacity> {
        let lba = u64::from_be_bytes(data.get(0..8)?.try_into().ok()?);
        let block_size = u32::from_be_bytes(data.get(8..12)?.try_into().ok()?);
        Some(Capacity {
            blocks: lba.checked_add(1)?,
            block_size,
        })
    }

    /// Capacity in bytes, `None` on overflow.
    pub fn bytes(&self) -> Option<u64> {
        self.blocks.checked_mul(u64::from(self.block_size))
    }
}

/// TEST UNIT READY (SPC-4 §6.47).
pub fn test_unit_ready_cdb() -> [u8; 6] {
    [0; 6]
}

/// INQUIRY (SPC-4 §6.6), standard data or VPD `page` when `Some`.
pub fn inquiry_cdb(page: Option<u8>, alloc: u16) -> [u8; 6] {
    let [hi, lo] = alloc.to_be_bytes();
    let (evpd, code) = match page {
        Some(p) => (1, p),
        None => (0, 0),
    };
    [0x12, evpd, code, hi, lo, 0]
}

/// READ CAPACITY (16): SERVICE ACTION IN (16) 9Eh / 10h (SBC-3 §5.16).
pub fn read_capacity16_cdb(alloc: u32) -> [u8; 16] {
    let mut cdb = [0u8; 16];
    cdb[0] = 0x9e;
    cdb[1] = 0x10;
    cdb[10..14].copy_from_slice(&alloc.to_be_bytes());
    cdb
}

/// READ (16) 88h (SBC-3 §5.9).
pub fn read16_cdb(lba: u64, blocks: u32) -> [u8; 16] {
    let mut cdb = [0u8; 16];
    cdb[0] = 0x88;
    cdb[2..10].copy_from_slice(&lba.to_be_bytes());
    cdb[10..14].copy_from_slice(&blocks.to_be_bytes());
    cdb
}

/// WRITE (16) 8Ah (SBC-3 §5.37); `fua` sets the FUA bit (byte 1 bit 3).
pub fn write16_cdb(lba: u64, blocks: u32, fua: bool) -> [u8; 16] {
    let mut cdb = [0u8; 16];
    cdb[0] = 0x8a;
    cdb[1] = if fua { 0x08 } else { 0 };
    cdb[2..10].copy_from_slice(&lba.to_be_bytes());
    cdb[10..14].copy_from_slice(&blocks.to_be_bytes());
    cdb
}

/// COMPARE AND WRITE 89h (SBC-3 §5.2): `blocks` in byte 13; `fua` sets FUA (byte 1 bit 3).
/// The Data-Out is `blocks` blocks of verify data followed by `blocks` blocks of write data.
pub fn compare_and_write_cdb(lba: u64, blocks: u8, fua: bool) -> [u8; 16] {
    let mut cdb = [0u8; 16];
    cdb[0] = 0x89;
    cdb[1] = if fua { 0x08 } else { 0 };
    cdb[2..10].copy_from_slice(&lba.to_be_bytes());
    cdb[13] = blocks;
    cdb
}

/// SYNCHRONIZE CACHE (16) 91h (SBC-3 §5.23): whole medium when `blocks` is 0.
pub fn synchronize_cache16_cdb(lba: u64, blocks: u32) -> [u8; 16] {
    let mut cdb = [0u8; 16];
    cdb[0] = 0x91;
    cdb[2..10].copy_from_slice(&lba.to_be_bytes());
    cdb[10..14].copy_from_slice(&blocks.to_be_bytes());
    cdb
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn cdb_bytes() {
        assert_eq!(inquiry_cdb(None, 96), [0x12, 0, 0, 0, 96, 0]);
        assert_eq!(inquiry_cdb(Some(0x83), 0x1000), [0x12, 1, 0x83, 0x10, 0, 0]);
        assert_eq!(
            read16_cdb(0x0102_0304_0506_0708, 0x10),
            [0x88, 0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0x10, 0, 0]
        );
        assert_eq!(
            write16_cdb(1, 2, true),
            [0x8a, 0x08, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0]
        );
        assert_eq!(
            read_capacity16_cdb(32),
            [0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0]
        );
        assert_eq!(synchronize_cache16_cdb(0, 0)[0], 0x91);
    }

    #[test]
    fn accepts_read_capacity16_data() {
        let mut d = [0u8; 32];
        d[0..8].copy_from_slice(&(2_097_151u64).to_be_bytes());
        d[8..12].copy_from_slice(&512u32.to_be_bytes());
        let c = Capacity::parse(&d).unwrap();
        assert_eq!(
            c,
            Capacity {
                blocks: 2_097_152,
                block_size: 512
            }
        );
        assert_eq!(c.bytes(), Some(1 << 30));
    }

    #[test]
    fn rejects_short_or_overflowing_capacity() {
        assert_eq!(Capacity::parse(&[0u8; 11]), None);
        assert_eq!(Capacity::parse(&[0xff; 12]), None);
    }

    #[test]
    fn sense_fixed_and_descriptor() {
        let mut fixed = [0u8; 18];
        fixed[0] = 0x70;
        fixed[2] = 0x06;
        fixed[12] = 0x29;
        fixed[13] = 0x00;
        assert_eq!(
            SenseKey::parse(&fixed),
            Some(SenseKey {
                key: 6,
                asc: 0x29,
                ascq: 0
            })
        );
        assert_eq!(
            SenseKey::parse(&[0x72, 0x05, 0x24, 0x00]),
            Some(SenseKey {
                key: 5,
                asc: 0x24,
                ascq: 0
            })
        );
        assert_eq!(SenseKey::parse(&[0x70, 0, 6]), None);
        assert_eq!(SenseKey::parse(&[]), None);
    }

    #[test]
    fn good_maps_status_and_response() {
        assert!(CommandResult::default().good().is_ok());
        let cc = CommandResult {
            status: STATUS_CHECK_CONDITION,
            ..CommandResult::default()
        };
        assert!(matches!(cc.good(), Err(Error::Status { status: 2, .. })));
        let resp = CommandResult {
            response: 1,
            ..CommandResult::default()
        };
        assert!(matches!(resp.good(), Err(Error::Response(1))));
    }

    #[test]
    fn residual_flags() {
        assert_eq!(Residual::from_flags(true, false, 5), Residual::Underflow(5));
        assert_eq!(Residual::from_flags(false, true, 5), Residual::Overflow(5));
        assert_eq!(Residual::from_flags(false, false, 5), Residual::None);
    }
}
