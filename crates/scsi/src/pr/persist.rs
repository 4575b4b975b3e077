//! The APTPL state file (SPC-4 §5.13.5.1: what must survive power loss): a versioned,
//! line-oriented UTF-8 text file, readable with `cat`, with a CRC32C over everything before
//! its last line.
//!
//! ```text
//! ironlun-pr-state 1
//! serial <unit serial number, hex of its bytes>
//! generation <PRgeneration, decimal>
//! aptpl 1
//! registration <key, 16 hex> <rtpi decimal | all> <ISID, 12 hex | any> <initiator name>
//! reservation <index of the holder's registration line, from 0> <type code>
//! ownership <epoch, decimal> <owner host | ->
//! crc32c <8 hex>
//! ```
//!
//! Registration and reservation lines are optional and repeatable/at most once respectively;
//! the ownership line ([`super::ownership`]) is optional and written only once the LU has had
//! an owner, so files without it are exactly those of earlier versions and still readable
//! (an earlier version refuses a file with it as corrupt rather than lose the owner); all
//! others appear exactly once, in this order. The file names the LU's serial so that a
//! file copied to another LU is refused ([`PersistError::Foreign`]), never silently used.

use super::{
    PersistError, PrState, Registration, Reservation, ReservationType, MAX_NAME_LEN,
    MAX_REGISTRATIONS,
};

/// First line of every state file; the number is the format version.
pub const MAGIC: &str = "ironlun-pr-state 1";

/// Upper bound on a state file we parse (bytes): MAX_REGISTRATIONS lines of at most ~280.
pub const MAX_FILE_LEN: usize = 512 * 1024;

/// Lower-case hex of `bytes` (the file's encoding of ISIDs and the serial; also used by the
/// cluster record, which embeds this format).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes of [`hex`]'s output; `None` for an odd length or any non-hex character.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i.checked_add(2)?)?, 16).ok())
        .collect()
}

/// Serialize `state` for the LU with unit serial number `serial`.
pub fn encode(state: &PrState, serial: &str) -> Vec<u8> {
    let mut s = String::new();
    s.push_str(MAGIC);
    s.push('\n');
    s.push_str(&format!("serial {}\n", hex(serial.as_bytes())));
    s.push_str(&format!("generation {}\n", state.generation));
    s.push_str(&format!("aptpl {}\n", u8::from(state.aptpl)));
    for r in &state.regs {
        let rtpi = r.rtpi.map_or("all".to_string(), |p| p.to_string());
        let isid = r.isid.map_or("any".to_string(), |i| hex(&i));
        s.push_str(&format!(
            "registration {:016x} {rtpi} {isid} {}\n",
            r.key, r.name
        ));
    }
    if let Some(res) = state.res {
        // An all-registrants reservation outlives the registration that created it (SPC-4
        // §5.13.10: every registrant holds it); its holder reference may name a registration
        // that is gone, so any remaining registrant stands for it.
        let holder = state.regs.iter().position(|r| r.id == res.holder);
        let holder =
            holder.or_else(|| (res.ty.all_registrants() && !state.regs.is_empty()).then_some(0));
        if let Some(i) = holder {
            s.push_str(&format!("reservation {i} {}\n", res.ty.code()));
        }
    }
    if state.has_ownership() {
        let owner = state.owner.as_deref().unwrap_or("-");
        s.push_str(&format!("ownership {} {owner}\n", state.epoch));
    }
    let crc = crc32c::crc32c(s.as_bytes());
    s.push_str(&format!("crc32c {crc:08x}\n"));
    s.into_bytes()
}

fn corrupt(line: usize, what: &str) -> PersistError {
    PersistError::Corrupt(format!("line {}: {what}", line.saturating_add(1)))
}

/// Parse a state file written by [`encode`] for the LU with unit serial `serial`.
pub fn decode(bytes: &[u8], serial: &str) -> Result<PrState, PersistError> {
    if bytes.len() > MAX_FILE_LEN {
        return Err(PersistError::Corrupt(format!(
            "{} bytes, more than the {MAX_FILE_LEN} a state file can have",
            bytes.len()
        )));
    }
    let text = std::str::from_utf8(bytes).map_err(|_| PersistError::NotPrState)?;
    if !text.starts_with(MAGIC) || text.as_bytes().get(MAGIC.len()) != Some(&b'\n') {
        return Err(PersistError::NotPrState);
    }
    let body = text
        .strip_suffix('\n')
        .ok_or_else(|| PersistError::Corrupt("truncated: no final newline".into()))?;
    let (signed, last) = match body.rfind('\n') {
        Some(i) => (
            text.get(..i.saturating_add(1)).unwrap_or_default(),
            body.get(i.saturating_add(1)..).unwrap_or_default(),
        ),
        None => return Err(PersistError::Corrupt("truncated: no checksum line".into())),
    };
    let want = last
        .strip_prefix("crc32c ")
        .filter(|h| h.len() == 8)
        .and_then(|h| u32::from_str_radix(h, 16).ok())
        .ok_or_else(|| PersistError::Corrupt("truncated or missing crc32c line".into()))?;
    if crc32c::crc32c(signed.as_bytes()) != want {
        return Err(PersistError::Corrupt("checksum mismatch".into()));
    }
    let lines: Vec<&str> = signed.lines().collect();
    let field = |i: usize, key: &str| -> Result<&str, PersistError> {
        lines
            .get(i)
            .and_then(|l| l.strip_prefix(key))
            .and_then(|l| l.strip_prefix(' '))
            .ok_or_else(|| corrupt(i, &format!("expected `{key} …`")))
    };
    let found = unhex(field(1, "serial")?)
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| corrupt(1, "serial is not hex of UTF-8"))?;
    if found != serial {
        return Err(PersistError::Foreign {
            found,
            expected: serial.to_string(),
        });
    }
    let mut state = PrState {
        generation: field(2, "generation")?
            .parse()
            .map_err(|_| corrupt(2, "generation is not a 32-bit number"))?,
        aptpl: match field(3, "aptpl")? {
            "0" => false,
            "1" => true,
            _ => return Err(corrupt(3, "aptpl is not 0 or 1")),
        },
        ..PrState::default()
    };
    let mut i = 4;
    while let Some(rest) = lines.get(i).and_then(|l| l.strip_prefix("registration ")) {
        if state.regs.len() >= MAX_REGISTRATIONS {
            return Err(corrupt(i, "too many registrations"));
        }
        state.regs.push(registration(rest, i, state.next_id)?);
        state.next_id = state.next_id.saturating_add(1);
        i = i.saturating_add(1);
    }
    if let Some(rest) = lines.get(i).and_then(|l| l.strip_prefix("reservation ")) {
        let mut parts = rest.split(' ');
        let idx: usize = parts
            .next()
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| corrupt(i, "reservation holder is not a number"))?;
        let holder = state
            .regs
            .get(idx)
            .map(|r| r.id)
            .ok_or_else(|| corrupt(i, "reservation holder names no registration"))?;
        let ty = parts
            .next()
            .and_then(|p| p.parse().ok())
            .and_then(ReservationType::from_code)
            .ok_or_else(|| corrupt(i, "reservation type is not 1, 3, 5, 6, 7 or 8"))?;
        if parts.next().is_some() {
            return Err(corrupt(i, "trailing fields"));
        }
        state.res = Some(Reservation { holder, ty });
        i = i.saturating_add(1);
    }
    if let Some(rest) = lines.get(i).and_then(|l| l.strip_prefix("ownership ")) {
        let parts: Vec<&str> = rest.split(' ').collect();
        let [epoch, owner] = parts.as_slice() else {
            return Err(corrupt(i, "ownership needs epoch and owner"));
        };
        state.epoch = epoch
            .parse()
            .map_err(|_| corrupt(i, "ownership epoch is not a 64-bit number"))?;
        state.owner = match *owner {
            "-" => None,
            name => {
                if super::ownership::host_name(name).ok().as_deref() != Some(name) {
                    return Err(corrupt(i, "ownership owner is not a lower-case iSCSI name"));
                }
                Some(name.to_string())
            }
        };
        i = i.saturating_add(1);
    }
    if i != lines.len() {
        return Err(corrupt(i, "unexpected line"));
    }
    Ok(state)
}

fn registration(rest: &str, line: usize, id: u64) -> Result<Registration, PersistError> {
    let parts: Vec<&str> = rest.split(' ').collect();
    let [key, rtpi, isid, name] = parts.as_slice() else {
        return Err(corrupt(line, "registration needs key, rtpi, isid, name"));
    };
    let key = Some(key)
        .filter(|k| k.len() == 16)
        .and_then(|k| u64::from_str_radix(k, 16).ok())
        .filter(|k| *k != 0)
        .ok_or_else(|| corrupt(line, "registration key is not 16 hex digits, non-zero"))?;
    let rtpi = match *rtpi {
        "all" => None,
        p => Some(
            p.parse::<u16>()
                .map_err(|_| corrupt(line, "rtpi is not `all` or a 16-bit number"))?,
        ),
    };
    let isid = match *isid {
        "any" => None,
        h => Some(
            unhex(h)
                .and_then(|b| <[u8; 6]>::try_from(b).ok())
                .ok_or_else(|| corrupt(line, "isid is not `any` or 12 hex digits"))?,
        ),
    };
    if name.is_empty()
        || name.len() > MAX_NAME_LEN
        || !name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b',' && !b.is_ascii_uppercase())
    {
        return Err(corrupt(
            line,
            "initiator name is not a lower-case iSCSI name",
        ));
    }
    Ok(Registration {
        id,
        name: (*name).to_string(),
        isid,
        rtpi,
        key,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn sample() -> PrState {
        let mut s = PrState {
            generation: 42,
            aptpl: true,
            ..PrState::default()
        };
        for (i, (name, isid, rtpi, key)) in [
            ("iqn.test:a", Some([0x80, 0, 0, 0, 0, 1]), Some(1), 0x11),
            ("iqn.test:b", None, None, 0x22),
        ]
        .into_iter()
        .enumerate()
        {
            s.regs.push(Registration {
                id: i as u64,
                name: name.to_string(),
                isid,
                rtpi,
                key,
            });
        }
        s.next_id = 2;
        s.res = Some(Reservation {
            holder: 1,
            ty: ReservationType::ExclusiveAccessRegistrantsOnly,
        });
        s
    }

    /// Re-sign `text` after editing it, so only the edited field is at fault.
    fn resign(text: &str) -> Vec<u8> {
        let body = text.rsplit_once("crc32c ").unwrap().0;
        let crc = crc32c::crc32c(body.as_bytes());
        format!("{body}crc32c {crc:08x}\n").into_bytes()
    }

    #[test]
    fn round_trips() {
        let bytes = encode(&sample(), "serial-1");
        assert_eq!(decode(&bytes, "serial-1").unwrap(), sample());
        let empty = PrState::default();
        assert_eq!(decode(&encode(&empty, "s"), "s").unwrap(), empty);
    }

    #[test]
    fn rejects_foreign_magic_checksum_truncation() {
        let bytes = encode(&sample(), "serial-1");
        assert!(matches!(
            decode(&bytes, "serial-2"),
            Err(PersistError::Foreign { .. })
        ));
        assert_eq!(decode(b"hello\n", "s"), Err(PersistError::NotPrState));
        assert_eq!(
            decode(b"ironlun-pr-state 2\n", "s"),
            Err(PersistError::NotPrState)
        );
        let mut flipped = bytes.clone();
        flipped[30] ^= 1;
        assert!(
            matches!(decode(&flipped, "serial-1"), Err(PersistError::Corrupt(m)) if m.contains("checksum"))
        );
        for cut in [bytes.len() - 1, bytes.len() - 5, 25] {
            assert!(
                matches!(
                    decode(&bytes[..cut], "serial-1"),
                    Err(PersistError::Corrupt(_))
                ),
                "cut at {cut}"
            );
        }
        assert!(decode(&vec![b'x'; MAX_FILE_LEN + 1], "s").is_err());
    }

    /// PR OUT with a basic parameter list from `it` (name, ISID byte, port).
    fn out(s: &mut PrState, it: (&str, u8, u16), sa: u8, ty: u8, rk: u64, sark: u64) {
        let mut p = vec![0u8; 24];
        p[..8].copy_from_slice(&rk.to_be_bytes());
        p[8..16].copy_from_slice(&sark.to_be_bytes());
        let nexus = crate::pr::ItNexus {
            initiator: crate::pr::InitiatorPort::new(it.0, [0x40, 0, 0, 0, 0, it.1]),
            rtpi: it.2,
        };
        let req = crate::pr::OutRequest {
            service_action: sa,
            scope: 0,
            ty,
            param: &p,
        };
        let ctx = crate::pr::PrContext {
            relative_ports: &[1, 2],
            ptpl_capable: true,
        };
        s.prout(&nexus, req, ctx).unwrap();
    }

    #[test]
    fn an_all_registrants_reservation_outlives_its_creator_on_disk() {
        use crate::pr::sa;
        let mut s = PrState::default();
        let (a, b) = (("iqn.test:a", 1, 1), ("iqn.test:b", 2, 2));
        out(&mut s, a, sa::REGISTER, 0, 0, 0xa);
        out(&mut s, b, sa::REGISTER, 0, 0, 0xb);
        out(&mut s, a, sa::RESERVE, 7, 0xa, 0);
        // A unregisters: the Write Exclusive – All Registrants reservation stays with B.
        out(&mut s, a, sa::REGISTER, 0, 0xa, 0);
        assert_eq!(s.regs.len(), 1);
        assert!(s.res.is_some());
        let back = decode(&encode(&s, "x"), "x").unwrap();
        assert_eq!(
            back.reservation().map(|r| r.ty),
            Some(ReservationType::WriteExclusiveAllRegistrants),
            "the reservation was lost on the way through the file"
        );
        // `renumber` gives exactly what decode returns (issue 18's replicas compare states).
        s.renumber();
        assert_eq!(back, s);
    }

    #[test]
    fn renumber_is_the_decoded_form_after_changes() {
        use crate::pr::sa;
        let mut s = PrState::default();
        let hosts = [
            ("iqn.test:a", 1, 1),
            ("iqn.test:b", 2, 2),
            ("iqn.test:c", 3, 1),
        ];
        for (i, h) in hosts.iter().enumerate() {
            out(&mut s, *h, sa::REGISTER, 0, 0, 0x10 + i as u64);
        }
        out(&mut s, hosts[1], sa::RESERVE, 1, 0x11, 0);
        out(&mut s, hosts[0], sa::REGISTER, 0, 0x10, 0);
        out(&mut s, hosts[0], sa::REGISTER, 0, 0, 0x20);
        out(&mut s, hosts[2], sa::PREEMPT, 3, 0x12, 0x11);
        let mut n = s.clone();
        n.renumber();
        assert_eq!(decode(&encode(&s, "x"), "x").unwrap(), n);
        assert_eq!(decode(&encode(&n, "x"), "x").unwrap(), n);
        // Renumbering changes no observable answer.
        assert_eq!(n.snapshot(), s.snapshot());
    }

    #[test]
    fn round_trips_ownership_line() {
        let mut s = sample();
        s.owner = Some("iqn.test:b".into());
        s.epoch = 9;
        let bytes = encode(&s, "serial-1");
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(text.contains("\nownership 9 iqn.test:b\ncrc32c "), "{text}");
        assert_eq!(decode(&bytes, "serial-1").unwrap(), s);
        s.owner = None;
        let bytes = encode(&s, "serial-1");
        assert!(String::from_utf8(bytes.clone())
            .unwrap()
            .contains("\nownership 9 -\n"));
        assert_eq!(decode(&bytes, "serial-1").unwrap(), s);
    }

    #[test]
    fn accepts_files_without_ownership_line() {
        // A file as the first version wrote it, byte for byte.
        let mut text = String::from(
            "ironlun-pr-state 1\nserial 73\ngeneration 3\naptpl 1\n\
             registration 00000000000000ab 1 800000000001 iqn.test:a\nreservation 0 1\n",
        );
        let crc = crc32c::crc32c(text.as_bytes());
        text.push_str(&format!("crc32c {crc:08x}\n"));
        let s = decode(text.as_bytes(), "s").unwrap();
        assert_eq!((s.owner(), s.epoch(), s.generation), (None, 0, 3));
        assert_eq!(s.regs.len(), 1);
        // And the encoder writes no ownership line for a never-owned state.
        assert_eq!(encode(&s, "s"), text.into_bytes());
    }

    #[test]
    fn rejects_bad_ownership_lines() {
        let mut s = sample();
        s.owner = Some("iqn.test:b".into());
        s.epoch = 9;
        let good = String::from_utf8(encode(&s, "serial-1")).unwrap();
        for (to, what) in [
            ("ownership x iqn.test:b", "epoch"),
            ("ownership 9 IQN.test:b", "owner"),
            ("ownership 9", "needs"),
            ("ownership 9 iqn.test:b extra", "needs"),
            ("ownership 9 iqn.test:b\nownership 9 -", "unexpected"),
        ] {
            let text = good.replacen("ownership 9 iqn.test:b", to, 1);
            let err = decode(&resign(&text), "serial-1").unwrap_err();
            let PersistError::Corrupt(msg) = err else {
                panic!("{what}: {err:?}")
            };
            assert!(msg.contains(what), "{what}: {msg}");
        }
    }

    #[test]
    fn rejects_each_bad_field() {
        let good = String::from_utf8(encode(&sample(), "serial-1")).unwrap();
        let cases = [
            ("generation 42", "generation x", "generation"),
            ("aptpl 1", "aptpl 2", "aptpl"),
            (
                "registration 0000000000000011",
                "registration 00000000000000zz",
                "key",
            ),
            (
                "registration 0000000000000011",
                "registration 0000000000000000",
                "key",
            ),
            (" 1 800000000001 ", " 70000 800000000001 ", "rtpi"),
            ("800000000001", "8000000001", "isid"),
            ("iqn.test:a", "IQN.test:a", "name"),
            ("reservation 1 6", "reservation 5 6", "holder"),
            ("reservation 1 6", "reservation 1 2", "type"),
            ("reservation 1 6", "reservation 1 6 9", "trailing"),
            ("aptpl 1\n", "aptpl 1\nbogus\n", "unexpected"),
        ];
        for (from, to, what) in cases {
            let text = good.replacen(from, to, 1);
            assert_ne!(text, good, "{what}");
            let err = decode(&resign(&text), "serial-1").unwrap_err();
            let PersistError::Corrupt(msg) = err else {
                panic!("{what}: {err:?}")
            };
            assert!(msg.contains(what), "{what}: {msg}");
        }
    }
}
