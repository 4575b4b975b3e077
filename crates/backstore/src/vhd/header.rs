//! The dynamic disk header (VHD spec v1.0 "Dynamic Disk Header Format"; semantics.md §4.2):
//! 1024 big-endian bytes at the footer's data offset of dynamic and differencing disks.

use super::footer::{check_structure, checksum};
use super::{be_u32, be_u64, field, VhdError};

/// Size of the dynamic header.
pub const HEADER_SIZE: usize = 1024;
/// `HEADER_SIZE` as a file offset.
pub const HEADER_LEN: u64 = 1024;
/// Header cookie (§4.2 offset 0).
pub const COOKIE: &[u8; 8] = b"cxsparse";
/// Header version 1.0 (§4.2 offset 24).
pub const HEADER_VERSION: u32 = 0x0001_0000;
/// Default block size, 2 MiB (§4.2 offset 32).
pub const DEFAULT_BLOCK_SIZE: u32 = 0x0020_0000;
/// Smallest block size accepted: one sector (QEMU's lower bound).
pub const MIN_BLOCK_SIZE: u32 = 512;
/// Largest block size accepted: 256 MiB (a local bound; the spec allows any power of two).
pub const MAX_BLOCK_SIZE: u32 = 1 << 28;
/// Offset of the checksum field.
const CHECKSUM_AT: usize = 36;

/// One parent locator entry (§4.2 offset 576, 24 bytes each, 8 entries).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ParentLocator {
    /// Platform code: "W2ru", "W2ku", "MacX", ... or 0 (unused).
    pub platform_code: [u8; 4],
    /// Sectors reserved for the locator data.
    pub data_space: u32,
    /// Bytes of locator data.
    pub data_length: u32,
    /// Absolute offset of the locator data.
    pub data_offset: u64,
}

/// A parsed, checksum-verified dynamic header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynamicHeader {
    /// Absolute offset of the BAT.
    pub table_offset: u64,
    pub header_version: u32,
    /// Number of BAT entries.
    pub max_table_entries: u32,
    /// Bytes of data per block (bitmap excluded): a power of two in
    /// [`MIN_BLOCK_SIZE`]..=[`MAX_BLOCK_SIZE`].
    pub block_size: u32,
    pub parent_unique_id: [u8; 16],
    pub parent_timestamp: u32,
    /// Parent name, UTF-16 big-endian, as stored (512 bytes).
    pub parent_name: [u8; 512],
    pub parent_locators: [ParentLocator; 8],
}

fn err(field: &'static str, reason: impl Into<String>) -> VhdError {
    VhdError::Header {
        field,
        reason: reason.into(),
    }
}

impl DynamicHeader {
    /// A header for a new dynamic disk with `entries` BAT entries at `table_offset`.
    pub fn new(table_offset: u64, entries: u32, block_size: u32) -> Self {
        Self {
            table_offset,
            header_version: HEADER_VERSION,
            max_table_entries: entries,
            block_size,
            parent_unique_id: [0; 16],
            parent_timestamp: 0,
            parent_name: [0; 512],
            parent_locators: [ParentLocator::default(); 8],
        }
    }

    /// Parse and verify exactly 1024 bytes. The data offset field (unused, all ones) and the
    /// reserved bytes are ignored.
    pub fn parse(b: &[u8]) -> Result<Self, VhdError> {
        check_structure(b, HEADER_SIZE, COOKIE, CHECKSUM_AT).map_err(|(f, r)| err(f, r))?;
        let header_version = be_u32(b, 24).ok_or_else(|| err("header_version", "missing"))?;
        if header_version >> 16 != 1 {
            return Err(err(
                "header_version",
                format!("{header_version:#010x}, want major version 1"),
            ));
        }
        let block_size = be_u32(b, 32).ok_or_else(|| err("block_size", "missing"))?;
        if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size)
        {
            return Err(err(
                "block_size",
                format!("{block_size} is not a power of two in 512..=256 MiB"),
            ));
        }
        let mut parent_locators = [ParentLocator::default(); 8];
        for (i, loc) in parent_locators.iter_mut().enumerate() {
            let at = 576 + 24 * i;
            let missing = || err("parent_locator", "missing");
            *loc = ParentLocator {
                platform_code: field::<4>(b, at).ok_or_else(missing)?,
                data_space: be_u32(b, at + 4).ok_or_else(missing)?,
                data_length: be_u32(b, at + 8).ok_or_else(missing)?,
                data_offset: be_u64(b, at + 16).ok_or_else(missing)?,
            };
        }
        Ok(Self {
            table_offset: be_u64(b, 16).ok_or_else(|| err("table_offset", "missing"))?,
            header_version,
            max_table_entries: be_u32(b, 28).ok_or_else(|| err("max_table_entries", "missing"))?,
            block_size,
            parent_unique_id: field::<16>(b, 40)
                .ok_or_else(|| err("parent_unique_id", "missing"))?,
            parent_timestamp: be_u32(b, 56).ok_or_else(|| err("parent_timestamp", "missing"))?,
            parent_name: field::<512>(b, 64).ok_or_else(|| err("parent_name", "missing"))?,
            parent_locators,
        })
    }

    /// The 1024 on-disk bytes, checksum included (data offset all ones, as QEMU and MS tools).
    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        let mut put = |at: usize, bytes: &[u8]| {
            if let Some(dst) = b.get_mut(at..at.saturating_add(bytes.len())) {
                dst.copy_from_slice(bytes);
            }
        };
        put(0, COOKIE);
        put(8, &u64::MAX.to_be_bytes());
        put(16, &self.table_offset.to_be_bytes());
        put(24, &self.header_version.to_be_bytes());
        put(28, &self.max_table_entries.to_be_bytes());
        put(32, &self.block_size.to_be_bytes());
        put(40, &self.parent_unique_id);
        put(56, &self.parent_timestamp.to_be_bytes());
        put(64, &self.parent_name);
        for (i, loc) in self.parent_locators.iter().enumerate() {
            let at = 576 + 24 * i;
            put(at, &loc.platform_code);
            put(at + 4, &loc.data_space.to_be_bytes());
            put(at + 8, &loc.data_length.to_be_bytes());
            put(at + 16, &loc.data_offset.to_be_bytes());
        }
        let sum = checksum(&b, CHECKSUM_AT);
        if let Some(dst) = b.get_mut(CHECKSUM_AT..CHECKSUM_AT + 4) {
            dst.copy_from_slice(&sum.to_be_bytes());
        }
        b
    }

    /// Bytes of the per-block sector bitmap: one bit per sector, rounded up to a sector (§4.3).
    pub fn bitmap_size(&self) -> u64 {
        (u64::from(self.block_size) / 512).div_ceil(8).div_ceil(512) * 512
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    /// The first 40 bytes of the header `qemu-img create -f vpc -o subformat=dynamic` wrote
    /// for 10 MiB (QEMU 10.0); the rest is zero.
    const QEMU_HEADER_10M: [u8; 40] = [
        0x63, 0x78, 0x73, 0x70, 0x61, 0x72, 0x73, 0x65, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x06, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x06, 0x00, 0x20, 0x00, 0x00, 0xff, 0xff, 0xf4, 0x71,
    ];

    fn qemu_header() -> [u8; 1024] {
        let mut b = [0u8; 1024];
        b[..40].copy_from_slice(&QEMU_HEADER_10M);
        b
    }

    #[test]
    fn accepts_qemu_header_and_reencodes_it() {
        let h = DynamicHeader::parse(&qemu_header()).unwrap();
        assert_eq!(h.table_offset, 1536);
        assert_eq!(h.max_table_entries, 6);
        assert_eq!(h.block_size, DEFAULT_BLOCK_SIZE);
        assert_eq!(h.bitmap_size(), 512);
        assert_eq!(h.encode(), qemu_header());
        assert_eq!(
            DynamicHeader::new(1536, 6, DEFAULT_BLOCK_SIZE).encode(),
            qemu_header()
        );
    }

    fn with_field(at: usize, bytes: &[u8]) -> [u8; 1024] {
        let mut b = qemu_header();
        b[at..at + bytes.len()].copy_from_slice(bytes);
        let sum = checksum(&b, CHECKSUM_AT);
        b[36..40].copy_from_slice(&sum.to_be_bytes());
        b
    }

    #[test]
    fn rejects_bad_fields() {
        let mut bad_sum = qemu_header();
        bad_sum[100] = 1;
        let cases: Vec<([u8; 1024], &str)> = vec![
            (bad_sum, "checksum"),
            (with_field(0, b"cxsparsf"), "cookie"),
            (
                with_field(24, &0x0002_0000u32.to_be_bytes()),
                "header_version",
            ),
            (with_field(32, &0u32.to_be_bytes()), "block_size"),
            (with_field(32, &256u32.to_be_bytes()), "block_size"),
            (with_field(32, &3_000u32.to_be_bytes()), "block_size"),
            (with_field(32, &(1u32 << 29).to_be_bytes()), "block_size"),
        ];
        for (bytes, want) in cases {
            match DynamicHeader::parse(&bytes) {
                Err(VhdError::Header { field, .. }) => assert_eq!(field, want),
                other => panic!("{want}: {other:?}"),
            }
        }
        assert!(matches!(
            DynamicHeader::parse(&[0u8; 512]),
            Err(VhdError::Header {
                field: "length",
                ..
            })
        ));
    }

    #[test]
    fn bitmap_sizes() {
        for (block, bitmap) in [
            (512u32, 512u64),
            (1 << 21, 512),
            (1 << 22, 1024),
            (1 << 24, 4096),
        ] {
            assert_eq!(
                DynamicHeader::new(1536, 1, block).bitmap_size(),
                bitmap,
                "{block}"
            );
        }
    }

    #[test]
    fn parent_locators_round_trip() {
        let mut h = DynamicHeader::new(1536, 6, DEFAULT_BLOCK_SIZE);
        h.parent_locators[2] = ParentLocator {
            platform_code: *b"W2ru",
            data_space: 1,
            data_length: 24,
            data_offset: 0x1234_5600,
        };
        h.parent_name[1] = b'p';
        assert_eq!(DynamicHeader::parse(&h.encode()).unwrap(), h);
    }
}
