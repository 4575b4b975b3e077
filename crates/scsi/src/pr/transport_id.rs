//! iSCSI TransportIDs (SPC-4 §7.6.4.6, PROTOCOL IDENTIFIER 5h): format 00b names an initiator
//! device (`name`, every ISID), format 01b an initiator port (`name,i,0x<ISID>`).

use super::MAX_NAME_LEN;

/// PROTOCOL IDENTIFIER for iSCSI (SPC-4 Table 362).
pub const PROTOCOL_ISCSI: u8 = 0x5;

/// A parsed TransportID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportId {
    /// iSCSI name, lower-cased (names compare case-insensitively, RFC 3722).
    pub name: String,
    /// `None` for format 00b.
    pub isid: Option<[u8; 6]>,
}

/// Why a TransportID was refused; `offset` is the byte (within the TransportID) at fault, for
/// the INVALID FIELD IN PARAMETER LIST field pointer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TidError {
    pub offset: u16,
}

fn err(offset: u16) -> TidError {
    TidError { offset }
}

/// Parse one TransportID at the start of `buf`; returns it and its length in bytes. Checks:
/// protocol iSCSI, format 00b or 01b, reserved bits zero, ADDITIONAL LENGTH ≥ 20, a multiple
/// of 4 and inside `buf`, a NUL-terminated name of 1..=223 printable bytes without spaces,
/// NUL padding, and for 01b the separator `,i,0x` and 1..=12 hex digits of ISID.
pub fn parse(buf: &[u8]) -> Result<(TransportId, usize), TidError> {
    let b0 = *buf.first().ok_or(err(0))?;
    let format = b0 >> 6;
    if b0 & 0x0F != PROTOCOL_ISCSI || b0 & 0x30 != 0 || format > 1 {
        return Err(err(0));
    }
    if buf.get(1).copied().ok_or(err(1))? != 0 {
        return Err(err(1));
    }
    let len = usize::from(u16::from_be_bytes([
        buf.get(2).copied().ok_or(err(2))?,
        buf.get(3).copied().ok_or(err(2))?,
    ]));
    if len < 20 || len % 4 != 0 {
        return Err(err(2));
    }
    let total = len.checked_add(4).ok_or(err(2))?;
    let body = buf.get(4..total).ok_or(err(2))?;
    let nul = body.iter().position(|b| *b == 0).ok_or(err(4))?;
    if body.get(nul..).unwrap_or_default().iter().any(|b| *b != 0) {
        return Err(err(4));
    }
    let text = std::str::from_utf8(body.get(..nul).unwrap_or_default()).map_err(|_| err(4))?;
    let (name, isid) = if format == 0 {
        (text, None)
    } else {
        let sep = text.find(",i,0x").ok_or(err(4))?;
        let name = text.get(..sep).ok_or(err(4))?;
        let hex = text.get(sep.saturating_add(5)..).ok_or(err(4))?;
        let at = u16::try_from(sep.saturating_add(9)).unwrap_or(u16::MAX);
        (name, Some(parse_isid(hex).ok_or(err(at))?))
    };
    if name.is_empty()
        || name.len() > MAX_NAME_LEN
        || !name.bytes().all(|b| b.is_ascii_graphic() && b != b',')
    {
        return Err(err(4));
    }
    Ok((
        TransportId {
            name: name.to_ascii_lowercase(),
            isid,
        },
        total,
    ))
}

fn parse_isid(hex: &str) -> Option<[u8; 6]> {
    if hex.is_empty() || hex.len() > 12 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let v = u64::from_str_radix(hex, 16).ok()?;
    let b = v.to_be_bytes();
    Some([b[2], b[3], b[4], b[5], b[6], b[7]])
}

/// The TransportID of `name` (format 01b with `isid`, 00b without), NUL-terminated and
/// NUL-padded to a multiple of 4 (and at least 24 bytes in all).
pub fn encode(name: &str, isid: Option<[u8; 6]>) -> Vec<u8> {
    let mut text = name.as_bytes().to_vec();
    let format = match isid {
        Some(isid) => {
            text.extend_from_slice(b",i,0x");
            for b in isid {
                text.extend_from_slice(format!("{b:02x}").as_bytes());
            }
            0x40
        }
        None => 0x00,
    };
    text.push(0);
    while !text.len().is_multiple_of(4) || text.len() < 20 {
        text.push(0);
    }
    let len = u16::try_from(text.len()).unwrap_or(u16::MAX);
    let mut out = vec![format | PROTOCOL_ISCSI, 0];
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&text);
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn tid(b0: u8, text: &[u8], len: u16) -> Vec<u8> {
        let mut v = vec![b0, 0];
        v.extend_from_slice(&len.to_be_bytes());
        v.extend_from_slice(text);
        v.resize(4 + usize::from(len), 0);
        v
    }

    #[test]
    fn accepts_format_00_device() {
        let b = tid(0x05, b"iqn.2026-01.test:host", 24);
        let (t, n) = parse(&b).unwrap();
        assert_eq!(n, 28);
        assert_eq!(t.name, "iqn.2026-01.test:host");
        assert_eq!(t.isid, None);
    }

    #[test]
    fn accepts_format_01_port_case_insensitive() {
        let b = tid(0x45, b"IQN.2026-01.Test:H,i,0x023D00000001", 36);
        let (t, n) = parse(&b).unwrap();
        assert_eq!(n, 40);
        assert_eq!(t.name, "iqn.2026-01.test:h");
        assert_eq!(t.isid, Some([0x02, 0x3d, 0, 0, 0, 1]));
    }

    #[test]
    fn accepts_trailing_bytes_after_the_tid() {
        let mut b = tid(0x05, b"iqn.x:y", 20);
        b.extend_from_slice(&[0xAA; 8]);
        assert_eq!(parse(&b).unwrap().1, 24);
    }

    #[test]
    fn round_trips_encode() {
        for isid in [None, Some([0x80, 0, 0, 0, 0, 7])] {
            let e = encode("iqn.a:b", isid);
            assert_eq!(e.len() % 4, 0);
            let (t, n) = parse(&e).unwrap();
            assert_eq!(n, e.len());
            assert_eq!((t.name.as_str(), t.isid), ("iqn.a:b", isid));
        }
        assert_eq!(
            &encode("iqn.a:b", Some([0x80, 0, 0, 0, 0, 7]))[..8],
            &[0x45, 0, 0, 28, b'i', b'q', b'n', b'.']
        );
    }

    #[test]
    fn rejects_table() {
        let long = vec![b'a'; 224];
        let cases: Vec<(&str, Vec<u8>, u16)> = vec![
            ("empty", vec![], 0),
            ("fc protocol", tid(0x00, b"iqn.x:y", 20), 0),
            ("format 10b", tid(0x85, b"iqn.x:y", 20), 0),
            ("reserved bits", tid(0x15, b"iqn.x:y", 20), 0),
            (
                "reserved byte 1",
                {
                    let mut v = tid(0x05, b"iqn.x:y", 20);
                    v[1] = 1;
                    v
                },
                1,
            ),
            ("length < 20", tid(0x05, b"iqn.x:y", 16), 2),
            ("length not x4", tid(0x05, b"iqn.x:y", 22), 2),
            (
                "length beyond buffer",
                {
                    let mut v = tid(0x05, b"iqn.x:y", 20);
                    v.truncate(20);
                    v
                },
                2,
            ),
            ("no NUL", tid(0x05, &[b'a'; 20], 20), 4),
            ("garbage after NUL", tid(0x05, b"iqn.x:y\0z", 20), 4),
            ("empty name", tid(0x05, b"\0", 20), 4),
            ("space in name", tid(0x05, b"iqn x:y", 20), 4),
            ("name too long", tid(0x05, &long, 228), 4),
            ("01b without separator", tid(0x45, b"iqn.x:y", 20), 4),
            ("01b bad hex", tid(0x45, b"iqn.x:y,i,0xzz", 20), 16),
            (
                "01b 13 digits",
                tid(0x45, b"iqn.x:y,i,0x1234567890123", 28),
                16,
            ),
            ("01b no digits", tid(0x45, b"iqn.x:y,i,0x", 20), 16),
            ("00b with comma", tid(0x05, b"iqn.x:y,i", 20), 4),
        ];
        for (what, bytes, offset) in cases {
            assert_eq!(parse(&bytes), Err(TidError { offset }), "{what}");
        }
    }
}
