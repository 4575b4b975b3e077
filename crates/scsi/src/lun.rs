//! The 8-byte LUN field (SAM-5 §4.7), single level: peripheral device addressing (00b, bus
//! identifier 0, LUNs 0–255) and flat space addressing (01b, LUNs 0–16383). What the target
//! reports (REPORT LUNS) it encodes with [`encode`]; what an initiator sends it reads with
//! [`decode`], which accepts both methods for any LUN they can carry.

/// The LUN a single-level LUN field addresses; `None` for another method, a bus identifier
/// other than 0, or a second level (no such LUN).
pub fn decode(raw: u64) -> Option<u64> {
    if raw & 0x0000_ffff_ffff_ffff != 0 {
        return None;
    }
    let top = (raw >> 48) as u16;
    match top >> 14 {
        0 if top >> 8 == 0 => Some(u64::from(top & 0xff)),
        1 => Some(u64::from(top & 0x3fff)),
        _ => None,
    }
}

/// The LUN field for `lun`: peripheral addressing below 256, flat below 16384; `None` above.
pub fn encode(lun: u64) -> Option<u64> {
    match lun {
        0..=255 => Some(lun << 48),
        256..=16383 => Some((0x4000 | lun) << 48),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_peripheral_and_flat_luns() {
        assert_eq!(decode(0), Some(0));
        assert_eq!(decode(0x0005_0000_0000_0000), Some(5));
        assert_eq!(decode(0x4105_0000_0000_0000), Some(0x105));
        assert_eq!(
            decode(0x4005_0000_0000_0000),
            Some(5),
            "flat for a small LUN too"
        );
        // Bus id ≠ 0, extended/logical-unit addressing, and second-level LUNs: not ours.
        assert_eq!(decode(0x0105_0000_0000_0000), None);
        assert_eq!(decode(0x8005_0000_0000_0000), None);
        assert_eq!(decode(0x0005_0001_0000_0000), None);
    }

    #[test]
    fn encode_round_trips_and_stops_at_16383() {
        for lun in [0, 1, 255, 256, 300, 16383] {
            assert_eq!(encode(lun).and_then(decode), Some(lun), "{lun}");
        }
        assert_eq!(encode(255), Some(0x00ff_0000_0000_0000));
        assert_eq!(encode(256), Some(0x4100_0000_0000_0000));
        assert_eq!(encode(16384), None);
    }
}
