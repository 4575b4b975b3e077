//! INQUIRY data: standard data (SPC-4 §6.6.2) and vital product data pages (SPC-4 §7.8,
//! SBC-3 §6.5).

use crate::lu::LuConfig;
use crate::sense::{FieldPointer, SenseReason};

/// VPD page codes this LU supports, ascending (SPC-4 §7.8.14 requires ascending order).
pub const SUPPORTED_PAGES: &[u8] = &[0x00, 0x80, 0x83, 0x8F, 0xB0, 0xB1, 0xB2];

/// Version descriptors (SPC-4 table 144): SAM-5, iSCSI, SPC-4, SBC-3.
pub const VERSION_DESCRIPTORS: [u16; 4] = [0x00A0, 0x0960, 0x0460, 0x04C0];

/// Length of the standard INQUIRY data we return.
pub const STANDARD_LEN: usize = 96;

/// Standard INQUIRY data for a direct-access block device (SPC-4 §6.6.2, table 142).
pub fn standard(config: &LuConfig) -> Vec<u8> {
    let mut d = vec![0u8; STANDARD_LEN];
    let additional = u8::try_from(STANDARD_LEN - 5).unwrap_or(u8::MAX);
    // [0] qualifier 000b, type 00h; [1] RMB=0; [2] VERSION=06h (SPC-4);
    // [3] HISUP=1, RESPONSE DATA FORMAT=2; [4] ADDITIONAL LENGTH; [5] TPGS=01b (implicit
    // ALUA, SPC-4 §5.16); [7] CMDQUE=1.
    let tpgs = crate::alua::TPGS_IMPLICIT;
    let head = [0x00, 0x00, 0x06, 0x12, additional, tpgs, 0x00, 0x02];
    put(&mut d, 0, &head);
    // [5] 3PC=1: EXTENDED COPY and RECEIVE COPY RESULTS (SPC-4 §6.4, crate::xcopy).
    if let Some(b) = d.get_mut(5) {
        *b |= 0x08;
    }
    put(&mut d, 8, &ascii_field(&config.vendor, 8));
    put(&mut d, 16, &ascii_field(&config.product, 16));
    put(&mut d, 32, &ascii_field(&config.revision, 4));
    for (i, v) in VERSION_DESCRIPTORS.iter().enumerate() {
        put(&mut d, 58 + 2 * i, &v.to_be_bytes());
    }
    d
}

/// Standard INQUIRY data for a LUN that does not exist: peripheral qualifier 011b, device type
/// 1Fh (SPC-4 §6.6.2).
pub fn standard_no_lun() -> Vec<u8> {
    let mut d = vec![0u8; 36];
    put(&mut d, 0, &[0x7F, 0x00, 0x06, 0x12, 31]);
    d
}

/// The VPD page `page` (SPC-4 §7.8), or INVALID FIELD IN CDB (byte 2) if unsupported, as
/// seen through the configured relative target port.
pub fn page(config: &LuConfig, page: u8) -> Result<Vec<u8>, SenseReason> {
    page_at(config, page, config.relative_port)
}

/// [`page`] as seen through the target port `rtpi` (the requesting I_T nexus's): VPD 83h
/// names that port (SPC-4 §7.8.6.1: target port designators describe the port the command
/// came through).
pub fn page_at(config: &LuConfig, page: u8, rtpi: u16) -> Result<Vec<u8>, SenseReason> {
    let body = match page {
        0x00 => SUPPORTED_PAGES.to_vec(),
        0x80 => config
            .serial
            .as_bytes()
            .iter()
            .copied()
            .filter(|b| (0x20..0x7F).contains(b))
            .collect(),
        0x83 => device_identification(config, rtpi),
        0x8F => crate::xcopy::third_party_copy_page(),
        0xB0 => block_limits(config),
        0xB1 => block_device_characteristics(config),
        0xB2 => logical_block_provisioning(config),
        _ => return Err(SenseReason::InvalidFieldInCdb(FieldPointer::byte(2))),
    };
    let len = u16::try_from(body.len()).unwrap_or(u16::MAX);
    let mut out = Vec::with_capacity(body.len().saturating_add(4));
    out.extend_from_slice(&[0x00, page]);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Maximum WRITE SAME length advertised (VPD B0h) and enforced, in blocks.
pub fn max_write_same_blocks(config: &LuConfig) -> u32 {
    config
        .max_unmap_blocks
        .max(config.max_transfer_blocks)
        .max(1)
}

/// MAXIMUM ATOMIC TRANSFER LENGTH (SBC-4 §6.6.4) advertised and enforced by WRITE ATOMIC
/// (16), in blocks: the maximum transfer length (atomicity comes from the LU's overlap check,
/// not from the backstore's write size).
pub fn max_atomic_blocks(config: &LuConfig) -> u32 {
    config.max_transfer_blocks
}

/// Device Identification (SPC-4 §7.8.6): NAA, T10 vendor ID, relative target port, target
/// port group, SCSI name string of the target device.
fn device_identification(config: &LuConfig, rtpi: u16) -> Vec<u8> {
    let mut d = Vec::new();
    // NAA (type 3), binary, associated with the logical unit.
    designator(&mut d, 0x01, 0x03, &config.naa);
    // T10 vendor ID (type 1), ASCII: vendor (8) + serial.
    let mut t10 = ascii_field(&config.vendor, 8);
    t10.extend(
        config
            .serial
            .bytes()
            .filter(|b| (0x20..0x7F).contains(b))
            .take(64),
    );
    designator(&mut d, 0x02, 0x01, &t10);
    // Relative target port (type 4), PIV=1, association 01b (target port), protocol iSCSI (5).
    let mut rel = [0u8; 4];
    put(&mut rel, 2, &rtpi.to_be_bytes());
    designator(&mut d, 0x51, 0x80 | 0x10 | 0x04, &rel);
    // SCSI name string (type 8) of the target port, `<name>,t,0x<TPGT>` (RFC 7143 §4.2.7.1).
    let port = format!("{},t,0x{rtpi:04x}", config.target_name);
    designator(&mut d, 0x53, 0x80 | 0x10 | 0x08, &name_string(&port));
    // Target port group (type 5), association 01b: the group `rtpi` belongs to (SPC-4
    // §7.8.6.7), else the configured one.
    let group = config
        .port_groups
        .group_of(rtpi)
        .map_or(config.target_port_group, |g| g.id);
    let mut tpg = [0u8; 4];
    put(&mut tpg, 2, &group.to_be_bytes());
    designator(&mut d, 0x51, 0x80 | 0x10 | 0x05, &tpg);
    // SCSI name string (type 8), UTF-8, association 10b (target device): NUL-terminated,
    // NUL-padded to a multiple of 4, at most 252 bytes.
    designator(
        &mut d,
        0x53,
        0x80 | 0x20 | 0x08,
        &name_string(&config.target_name),
    );
    d
}

/// A SCSI name string designator value: UTF-8, NUL-terminated, NUL-padded to a multiple of 4,
/// at most 252 bytes (SPC-4 §7.8.6.11).
fn name_string(s: &str) -> Vec<u8> {
    let mut name: Vec<u8> = s.bytes().filter(|b| *b != 0).take(251).collect();
    name.push(0);
    while name.len() & 3 != 0 {
        name.push(0);
    }
    name
}

fn designator(out: &mut Vec<u8>, proto_codeset: u8, piv_assoc_type: u8, id: &[u8]) {
    let len = u8::try_from(id.len()).unwrap_or(u8::MAX);
    out.extend_from_slice(&[proto_codeset, piv_assoc_type, 0, len]);
    out.extend(id.iter().take(usize::from(len)));
}

/// Block Limits (SBC-3 §6.5.3): page length 3Ch.
fn block_limits(config: &LuConfig) -> Vec<u8> {
    let mut d = vec![0u8; 0x3C];
    // [0] WSNZ=1: WRITE SAME with NUMBER OF LOGICAL BLOCKS zero is rejected.
    put(&mut d, 0, &[0x01]);
    // [2..4] OPTIMAL TRANSFER LENGTH GRANULARITY = one physical block.
    let physical_blocks = 1u16 << (config.physical_block_exponent & 0x0f).min(15);
    put(&mut d, 2, &physical_blocks.to_be_bytes());
    // [1] MAXIMUM COMPARE AND WRITE LENGTH (page byte 5).
    put(&mut d, 1, &[crate::lu::caw::max_blocks(config)]);
    put(&mut d, 4, &config.max_transfer_blocks.to_be_bytes());
    put(&mut d, 8, &config.max_transfer_blocks.to_be_bytes());
    if config.thin {
        put(&mut d, 16, &config.max_unmap_blocks.to_be_bytes());
        put(&mut d, 20, &config.max_unmap_descriptors.to_be_bytes());
        // OPTIMAL UNMAP GRANULARITY = one physical block; UNMAP GRANULARITY ALIGNMENT not
        // valid (any range is accepted; partial physical blocks are zeroed).
        put(&mut d, 24, &u32::from(physical_blocks).to_be_bytes());
    }
    put(
        &mut d,
        32,
        &u64::from(max_write_same_blocks(config)).to_be_bytes(),
    );
    // [40..44] MAXIMUM ATOMIC TRANSFER LENGTH; [44..48] ATOMIC ALIGNMENT and [48..52] ATOMIC
    // TRANSFER LENGTH GRANULARITY: any LBA, any length (SBC-4 §6.6.4).
    put(&mut d, 40, &max_atomic_blocks(config).to_be_bytes());
    put(&mut d, 44, &1u32.to_be_bytes());
    put(&mut d, 48, &1u32.to_be_bytes());
    d
}

/// Block Device Characteristics (SBC-3 §6.5.2): non-rotating medium. On a thin LU, which
/// supports SANITIZE BLOCK ERASE, WABEREQ=01b: reads after a block erase succeed (zeros).
/// WACEREQ=00b: no CRYPTOGRAPHIC ERASE.
fn block_device_characteristics(config: &LuConfig) -> Vec<u8> {
    let mut d = vec![0u8; 0x3C];
    put(&mut d, 0, &1u16.to_be_bytes());
    if config.thin {
        put(&mut d, 3, &[0x40]);
    }
    d
}

/// Logical Block Provisioning (SBC-3 §6.5.4).
fn logical_block_provisioning(config: &LuConfig) -> Vec<u8> {
    // [0] threshold exponent; [1] LBPU LBPWS LBPWS10 .. LBPRZ ANC_SUP DP; [2] type.
    if config.thin {
        vec![0x00, 0x80 | 0x40 | 0x20 | 0x04, 0x02, 0x00]
    } else {
        vec![0x00, 0x00, 0x00, 0x00]
    }
}

/// `s` as a space-padded printable-ASCII field of exactly `n` bytes.
pub fn ascii_field(s: &str, n: usize) -> Vec<u8> {
    let mut v: Vec<u8> = s
        .bytes()
        .map(|b| if (0x20..0x7F).contains(&b) { b } else { b' ' })
        .take(n)
        .collect();
    v.resize(n, b' ');
    v
}

/// Copy `src` into `dst` at `at`, ignoring anything out of bounds.
pub(crate) fn put(dst: &mut [u8], at: usize, src: &[u8]) {
    for (i, b) in src.iter().enumerate() {
        if let Some(slot) = at.checked_add(i).and_then(|j| dst.get_mut(j)) {
            *slot = *b;
        }
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::unwrap_used)]
mod tests {
    use super::*;

    fn cfg() -> LuConfig {
        LuConfig::new(0, 512, 1000, "iqn.2026-01.test:t1")
            .with_naa([0x60, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15])
    }

    #[test]
    fn standard_inquiry_fields() {
        let d = standard(&cfg());
        // [5] TPGS=01b (implicit ALUA) and 3PC=1 (EXTENDED COPY).
        assert_eq!(&d[..8], &[0, 0, 6, 0x12, 91, 0x18, 0, 2]);
        assert_eq!(&d[8..16], b"IRONLUN ");
        assert_eq!(&d[16..32], b"ironlun disk    ");
        assert_eq!(&d[32..36], b"0001");
        assert_eq!(
            &d[58..66],
            &[0x00, 0xA0, 0x09, 0x60, 0x04, 0x60, 0x04, 0xC0]
        );
        assert_eq!(usize::from(d[4]) + 5, d.len());
    }

    #[test]
    fn supported_pages_sorted_and_all_answer() {
        let p = page(&cfg(), 0).unwrap();
        let list = &p[4..];
        assert!(list.windows(2).all(|w| w[0] < w[1]));
        for code in list {
            let d = page(&cfg(), *code).unwrap();
            assert_eq!(d[1], *code);
            assert_eq!(usize::from(u16::from_be_bytes([d[2], d[3]])) + 4, d.len());
        }
        assert_eq!(
            page(&cfg(), 0x81),
            Err(SenseReason::InvalidFieldInCdb(FieldPointer::byte(2)))
        );
    }

    #[test]
    fn device_identification_descriptors() {
        let d = page(&cfg(), 0x83).unwrap();
        let mut at = 4;
        let mut types = Vec::new();
        while at < d.len() {
            let (cs, t, len) = (d[at], d[at + 1], usize::from(d[at + 3]));
            types.push((cs, t));
            if t & 0x0F == 8 {
                assert_eq!(len % 4, 0);
                assert_eq!(&d[at + 4..at + 4 + 19], b"iqn.2026-01.test:t1");
                assert_eq!(d[at + 4 + len - 1], 0);
                if t & 0x30 == 0x10 {
                    assert_eq!(&d[at + 4..at + 4 + 29], b"iqn.2026-01.test:t1,t,0x0001\0");
                }
            }
            if t & 0x0F == 3 {
                assert_eq!(len, 16);
                assert_eq!(d[at + 4], 0x60);
            }
            at += 4 + len;
        }
        assert_eq!(at, d.len());
        assert_eq!(
            types,
            vec![
                (0x01, 0x03),
                (0x02, 0x01),
                (0x51, 0x94),
                (0x53, 0x98),
                (0x51, 0x95),
                (0x53, 0xA8)
            ]
        );
    }

    #[test]
    fn block_limits_and_provisioning() {
        let c = cfg();
        let b0 = page(&c, 0xB0).unwrap();
        assert_eq!(b0.len(), 0x40);
        assert_eq!(b0[4] & 1, 1);
        assert_eq!(u32::from_be_bytes(b0[8..12].try_into().unwrap()), 32768);
        assert_eq!(
            u32::from_be_bytes(b0[20..24].try_into().unwrap()),
            0x10_0000
        );
        assert_eq!(u32::from_be_bytes(b0[24..28].try_into().unwrap()), 256);
        let b2 = page(&c, 0xB2).unwrap();
        assert_eq!(b2[5], 0xE4);
        let mut thick = c.clone();
        thick.thin = false;
        let b0 = page(&thick, 0xB0).unwrap();
        assert_eq!(&b0[20..28], &[0; 8]);
        assert_eq!(page(&thick, 0xB2).unwrap()[5], 0);
        let b1 = page(&c, 0xB1).unwrap();
        assert_eq!(&b1[4..6], &[0, 1]);
        assert_eq!(b1[7], 0x40, "WABEREQ=01b");
        assert_eq!(page(&thick, 0xB1).unwrap()[7], 0);
        // Atomic limits: maximum = maximum transfer length, alignment and granularity 1.
        assert_eq!(&b0[44..56], &[0, 0, 0x80, 0, 0, 0, 0, 1, 0, 0, 0, 1]);
    }
}
