//! The hard disk footer (VHD spec v1.0 "Hard Disk Footer Format"; semantics.md §4.1) and the
//! size and geometry rules QEMU's `vpc` driver applies to it (§4.5).
//!
//! The footer is 512 big-endian bytes at the end of every VHD, with a copy at offset 0 of
//! dynamic and differencing disks.

use super::{be_u16, be_u32, be_u64, field, VhdError};

/// Size of the footer, and of a VHD sector.
pub const FOOTER_SIZE: usize = 512;
/// `FOOTER_SIZE` as a file offset.
pub const FOOTER_LEN: u64 = 512;
/// Footer cookie (§4.1 offset 0).
pub const COOKIE: &[u8; 8] = b"conectix";
/// Features bit 0: temporary disk (§4.1 offset 8).
pub const FEATURE_TEMPORARY: u32 = 0x1;
/// Features bit 1: reserved, always set by conforming writers (§4.1 offset 8).
pub const FEATURE_RESERVED: u32 = 0x2;
/// File format version 1.0 (§4.1 offset 12); only the major half is checked on read.
pub const FORMAT_VERSION: u32 = 0x0001_0000;
/// Data offset of a fixed disk: no further structure (§4.1 offset 16).
pub const NO_DATA_OFFSET: u64 = u64::MAX;
/// Seconds between the Unix epoch and 2000-01-01 00:00:00 UTC, the VHD epoch (§4).
pub const VHD_EPOCH_UNIX: u64 = 946_684_800;
/// Geometry QEMU stores with `force_size=on`: 65535 cylinders, 16 heads, 255 sectors (§4.5).
pub const MAX_GEOMETRY: Geometry = Geometry {
    cylinders: 65_535,
    heads: 16,
    sectors: 255,
};
/// Largest disk QEMU accepts: 2040 GiB in sectors (`VHD_MAX_SECTORS`, §4.5).
pub const MAX_SECTORS: u64 = 0xff00_0000;

/// Disk type (§4.1 offset 60).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskType {
    /// 2: the data area is the first `current_size` bytes of the file.
    Fixed,
    /// 3: blocks allocated on demand through the BAT.
    Dynamic,
    /// 4: a dynamic disk whose unallocated sectors read from a parent.
    Differencing,
}

impl DiskType {
    /// The on-disk code.
    pub fn code(self) -> u32 {
        match self {
            Self::Fixed => 2,
            Self::Dynamic => 3,
            Self::Differencing => 4,
        }
    }

    fn from_code(code: u32) -> Option<Self> {
        match code {
            2 => Some(Self::Fixed),
            3 => Some(Self::Dynamic),
            4 => Some(Self::Differencing),
            _ => None,
        }
    }
}

/// Cylinders, heads, sectors per track (§4.1 offset 56).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub cylinders: u16,
    pub heads: u8,
    pub sectors: u8,
}

impl Geometry {
    /// Number of 512-byte sectors the geometry addresses.
    pub fn total_sectors(self) -> u64 {
        u64::from(self.cylinders) * u64::from(self.heads) * u64::from(self.sectors)
    }

    /// The geometry algorithm of the VHD spec appendix as QEMU implements it
    /// (`calculate_geometry`, §4.5) for `total` sectors; `None` when it would need more than
    /// 65535 cylinders.
    pub fn for_sectors(total: u64) -> Option<Self> {
        let max_chs = MAX_GEOMETRY.total_sectors();
        let total = total.min(max_chs);
        let (sectors, heads, cyl_times_heads): (u64, u64, u64) = if total >= 65_535 * 16 * 63 {
            (255, 16, total / 255)
        } else {
            let mut s = 17;
            let mut cth = total / s;
            let mut h = cth.div_ceil(1024).max(4);
            if cth >= h * 1024 || h > 16 {
                s = 31;
                h = 16;
                cth = total / s;
            }
            if cth >= h * 1024 {
                s = 63;
                h = 16;
                cth = total / s;
            }
            (s, h, cth)
        };
        Some(Self {
            cylinders: u16::try_from(cyl_times_heads / heads).ok()?,
            heads: u8::try_from(heads).ok()?,
            sectors: u8::try_from(sectors).ok()?,
        })
    }

    /// QEMU's `vpc_create` rounding: the smallest geometry of at least `total` sectors the
    /// algorithm yields (it retries with `total + i` until the product covers `total`).
    pub fn covering(total: u64) -> Option<Self> {
        let mut i = 0u64;
        loop {
            let g = Self::for_sectors(total.checked_add(i)?)?;
            if g.total_sectors() >= total || g == MAX_GEOMETRY {
                return Some(g);
            }
            i = i.checked_add(1)?;
            if i > 1 << 20 {
                return None;
            }
        }
    }
}

/// A parsed, checksum-verified footer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footer {
    pub features: u32,
    pub format_version: u32,
    /// Absolute offset of the dynamic header, or [`NO_DATA_OFFSET`] (fixed disks).
    pub data_offset: u64,
    /// Seconds since 2000-01-01 UTC.
    pub timestamp: u32,
    pub creator_app: [u8; 4],
    pub creator_version: u32,
    pub creator_os: [u8; 4],
    pub original_size: u64,
    pub current_size: u64,
    pub geometry: Geometry,
    pub disk_type: DiskType,
    pub unique_id: [u8; 16],
    pub saved_state: bool,
}

/// One's complement of the byte sum of `bytes`, skipping the four bytes at `skip`
/// (the checksum rule of the footer and of the dynamic header, §4.1/§4.2).
pub fn checksum(bytes: &[u8], skip: usize) -> u32 {
    let sum = bytes
        .iter()
        .enumerate()
        .filter(|(i, _)| !(skip..skip.saturating_add(4)).contains(i))
        .fold(0u32, |acc, (_, b)| acc.wrapping_add(u32::from(*b)));
    !sum
}

/// The checks the footer and the dynamic header share (§4.1/§4.2): exactly `size` bytes, the
/// `cookie` at offset 0, and the checksum at `checksum_at`. On failure, the field and reason.
pub(crate) fn check_structure(
    b: &[u8],
    size: usize,
    cookie: &[u8; 8],
    checksum_at: usize,
) -> Result<(), (&'static str, String)> {
    if b.len() != size {
        return Err(("length", format!("{} bytes, want {size}", b.len())));
    }
    if field::<8>(b, 0) != Some(*cookie) {
        let name = String::from_utf8_lossy(cookie);
        return Err(("cookie", format!("not \"{name}\"")));
    }
    let stored = be_u32(b, checksum_at).ok_or(("checksum", "missing".to_owned()))?;
    let computed = checksum(b, checksum_at);
    if stored != computed {
        return Err((
            "checksum",
            format!("stored {stored:#010x}, computed {computed:#010x}"),
        ));
    }
    Ok(())
}

/// Offset of the footer checksum field.
const CHECKSUM_AT: usize = 64;

fn err(field: &'static str, reason: impl Into<String>) -> VhdError {
    VhdError::Footer {
        field,
        reason: reason.into(),
    }
}

impl Footer {
    /// Parse and verify exactly one 512-byte footer. Reserved bytes (85..512) are ignored.
    pub fn parse(b: &[u8]) -> Result<Self, VhdError> {
        check_structure(b, FOOTER_SIZE, COOKIE, CHECKSUM_AT).map_err(|(f, r)| err(f, r))?;
        let features = be_u32(b, 8).ok_or_else(|| err("features", "missing"))?;
        if features & !(FEATURE_TEMPORARY | FEATURE_RESERVED) != 0 {
            return Err(err("features", format!("unknown bits in {features:#x}")));
        }
        let format_version = be_u32(b, 12).ok_or_else(|| err("format_version", "missing"))?;
        if format_version >> 16 != 1 {
            return Err(err(
                "format_version",
                format!("{format_version:#010x}, want major version 1"),
            ));
        }
        let code = be_u32(b, 60).ok_or_else(|| err("disk_type", "missing"))?;
        let disk_type = DiskType::from_code(code).ok_or_else(|| {
            err(
                "disk_type",
                format!("{code} is not fixed, dynamic or differencing"),
            )
        })?;
        let geometry = Geometry {
            cylinders: be_u16(b, 56).ok_or_else(|| err("geometry", "missing"))?,
            heads: *b.get(58).ok_or_else(|| err("geometry", "missing"))?,
            sectors: *b.get(59).ok_or_else(|| err("geometry", "missing"))?,
        };
        let saved_state = match b.get(84) {
            Some(0) => false,
            Some(1) => true,
            other => return Err(err("saved_state", format!("{other:?}, want 0 or 1"))),
        };
        Ok(Self {
            features,
            format_version,
            data_offset: be_u64(b, 16).ok_or_else(|| err("data_offset", "missing"))?,
            timestamp: be_u32(b, 24).ok_or_else(|| err("timestamp", "missing"))?,
            creator_app: field::<4>(b, 28).ok_or_else(|| err("creator_app", "missing"))?,
            creator_version: be_u32(b, 32).ok_or_else(|| err("creator_version", "missing"))?,
            creator_os: field::<4>(b, 36).ok_or_else(|| err("creator_os", "missing"))?,
            original_size: be_u64(b, 40).ok_or_else(|| err("original_size", "missing"))?,
            current_size: be_u64(b, 48).ok_or_else(|| err("current_size", "missing"))?,
            geometry,
            disk_type,
            unique_id: field::<16>(b, 68).ok_or_else(|| err("unique_id", "missing"))?,
            saved_state,
        })
    }

    /// The 512 on-disk bytes, checksum included.
    pub fn encode(&self) -> [u8; FOOTER_SIZE] {
        let mut b = [0u8; FOOTER_SIZE];
        let mut put = |at: usize, bytes: &[u8]| {
            if let Some(dst) = b.get_mut(at..at.saturating_add(bytes.len())) {
                dst.copy_from_slice(bytes);
            }
        };
        put(0, COOKIE);
        put(8, &self.features.to_be_bytes());
        put(12, &self.format_version.to_be_bytes());
        put(16, &self.data_offset.to_be_bytes());
        put(24, &self.timestamp.to_be_bytes());
        put(28, &self.creator_app);
        put(32, &self.creator_version.to_be_bytes());
        put(36, &self.creator_os);
        put(40, &self.original_size.to_be_bytes());
        put(48, &self.current_size.to_be_bytes());
        put(56, &self.geometry.cylinders.to_be_bytes());
        put(58, &[self.geometry.heads, self.geometry.sectors]);
        put(60, &self.disk_type.code().to_be_bytes());
        put(68, &self.unique_id);
        put(84, &[u8::from(self.saved_state)]);
        let sum = checksum(&b, CHECKSUM_AT);
        if let Some(dst) = b.get_mut(CHECKSUM_AT..CHECKSUM_AT + 4) {
            dst.copy_from_slice(&sum.to_be_bytes());
        }
        b
    }

    /// Whether QEMU sizes this disk by `current_size` rather than by CHS geometry (§4.5):
    /// creator apps "win ", "qem2", "d2v ", "CTXS", "tap\0", or the maximum geometry.
    pub fn sized_by_current_size(&self) -> bool {
        let by_creator = matches!(
            &self.creator_app,
            b"win " | b"qem2" | b"d2v " | b"CTXS" | b"tap\0"
        );
        by_creator || self.geometry == MAX_GEOMETRY
    }

    /// The disk size in bytes as QEMU reports it (§4.5): `current_size` rounded down to a
    /// sector, or the CHS product; refused above 2040 GiB.
    pub fn disk_size(&self) -> Result<u64, VhdError> {
        let sectors = if self.sized_by_current_size() {
            self.current_size / FOOTER_LEN
        } else {
            self.geometry.total_sectors()
        };
        if sectors > MAX_SECTORS {
            return Err(err(
                "current_size",
                format!("{sectors} sectors exceed the 2040 GiB limit"),
            ));
        }
        Ok(sectors * FOOTER_LEN)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    /// The footer `qemu-img create -f vpc -o subformat=dynamic d.vhd 10M` wrote (QEMU 10.0),
    /// first 96 bytes; the rest is zero.
    const QEMU_DYNAMIC_10M: [u8; 96] = [
        0x63, 0x6f, 0x6e, 0x65, 0x63, 0x74, 0x69, 0x78, 0x00, 0x00, 0x00, 0x02, 0x00, 0x01, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0x00, 0x32, 0x9b, 0x10, 0xad, 0x71, 0x65,
        0x6d, 0x75, 0x00, 0x05, 0x00, 0x03, 0x57, 0x69, 0x32, 0x6b, 0x00, 0x00, 0x00, 0x00, 0x00,
        0xa0, 0x70, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xa0, 0x70, 0x00, 0x01, 0x2e, 0x04, 0x11,
        0x00, 0x00, 0x00, 0x03, 0xff, 0xff, 0xeb, 0xe2, 0x18, 0xf2, 0xc6, 0x51, 0xb8, 0xfc, 0x46,
        0xad, 0xa6, 0xe6, 0xa6, 0x79, 0x9e, 0x97, 0xb0, 0x55, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    ];

    fn qemu_footer() -> [u8; 512] {
        let mut b = [0u8; 512];
        b[..96].copy_from_slice(&QEMU_DYNAMIC_10M);
        b
    }

    #[test]
    fn accepts_qemu_dynamic_footer() {
        let f = Footer::parse(&qemu_footer()).unwrap();
        assert_eq!(f.disk_type, DiskType::Dynamic);
        assert_eq!(f.data_offset, 512);
        assert_eq!(&f.creator_app, b"qemu");
        assert_eq!(f.creator_version, 0x0005_0003);
        assert_eq!(f.current_size, 10_514_432);
        assert_eq!(
            f.geometry,
            Geometry {
                cylinders: 302,
                heads: 4,
                sectors: 17
            }
        );
        assert!(!f.sized_by_current_size());
        assert_eq!(f.disk_size().unwrap(), 10_514_432);
        // Re-encoding gives the same bytes, checksum included.
        assert_eq!(f.encode(), qemu_footer());
    }

    #[test]
    fn rejects_each_corruption_naming_the_field() {
        let cases: &[(usize, u8, &str)] = &[
            (0, b'C', "cookie"),
            (70, 0x55, "checksum"),
            (64, 0x00, "checksum"),
        ];
        for &(at, val, want) in cases {
            let mut b = qemu_footer();
            b[at] = val;
            match Footer::parse(&b) {
                Err(VhdError::Footer { field, .. }) => assert_eq!(field, want, "byte {at}"),
                other => panic!("byte {at}: {other:?}"),
            }
        }
        // Field errors behind a valid checksum.
        let fields: &[(usize, u8, &str)] = &[
            (11, 0x06, "features"),
            (13, 0x02, "format_version"),
            (63, 0x05, "disk_type"),
            (63, 0x01, "disk_type"),
            (84, 0x02, "saved_state"),
        ];
        for &(at, val, want) in fields {
            let mut b = qemu_footer();
            b[at] = val;
            let sum = checksum(&b, CHECKSUM_AT);
            b[64..68].copy_from_slice(&sum.to_be_bytes());
            match Footer::parse(&b) {
                Err(VhdError::Footer { field, .. }) => assert_eq!(field, want, "byte {at}"),
                other => panic!("byte {at}: {other:?}"),
            }
        }
        assert!(matches!(
            Footer::parse(&qemu_footer()[..511]),
            Err(VhdError::Footer {
                field: "length",
                ..
            })
        ));
    }

    #[test]
    fn size_rules_follow_qemu() {
        let mut f = Footer::parse(&qemu_footer()).unwrap();
        f.current_size = 10 << 20;
        // "qemu": CHS wins.
        assert_eq!(f.disk_size().unwrap(), 10_514_432);
        for app in [b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0"] {
            f.creator_app = *app;
            assert_eq!(f.disk_size().unwrap(), 10 << 20, "{app:?}");
        }
        f.creator_app = *b"vpc ";
        f.geometry = MAX_GEOMETRY;
        f.current_size = (10 << 20) + 100;
        assert_eq!(f.disk_size().unwrap(), 10 << 20);
        f.current_size = (MAX_SECTORS + 1) * 512;
        assert!(matches!(
            f.disk_size(),
            Err(VhdError::Footer {
                field: "current_size",
                ..
            })
        ));
    }

    #[test]
    fn geometry_table() {
        // (requested sectors, geometry qemu-img picked, as seen in `qemu-img info`)
        let table: &[(u64, (u16, u8, u8))] = &[
            (20_480, (302, 4, 17)),  // 10 MiB -> 10514432 bytes
            (2_048, (31, 4, 17)),    // 1 MiB -> 1079296 bytes (31*4*17*512)
            (131_072, (964, 8, 17)), // 64 MiB -> 67125248 bytes
        ];
        for &(total, (c, h, s)) in table {
            let g = Geometry::covering(total).unwrap();
            assert_eq!((g.cylinders, g.heads, g.sectors), (c, h, s), "{total}");
            assert!(g.total_sectors() >= total);
        }
        assert_eq!(Geometry::for_sectors(u64::MAX).unwrap().heads, 16);
    }
}
