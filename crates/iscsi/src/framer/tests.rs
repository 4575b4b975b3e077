//! Framer tests: byte-literal frames, each reject case, zero-copy, and the property that any
//! chunking of a concatenated stream yields the same PDUs, with and without digests.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

use super::*;
use crate::bhs::encode_pdu_plain;
use crate::bhs::tests::{arb_pdu, hex, hex48};
use crate::pdu::{Header, NopOut, Opcode};
use proptest::prelude::*;

/// The RFC 3720 B.4 Read (10) PDU: its header digest is `56 3a 96 d9` on the wire.
const READ10: &str = "01c00000 00000000 0000000000000000 14000000 00000400 00000014 00000018
                      28000000 00000000 02000000 00000000";

fn nop_out(itt: u32, data: &'static [u8]) -> Pdu {
    Pdu::with_data(
        Header::NopOut(NopOut {
            itt,
            ttt: crate::pdu::RESERVED_TAG,
            ..NopOut::default()
        }),
        Bytes::from_static(data),
    )
}

fn wire(pdu: &Pdu, digests: Digests) -> Vec<u8> {
    encode_pdu(pdu, digests).concat()
}

fn framer(digests: Digests) -> Framer {
    Framer {
        limits: Limits::default(),
        digests,
    }
}

fn expect_pdu(f: Option<Framed>) -> Pdu {
    match f {
        Some(Framed::Pdu(p)) => p,
        other => panic!("expected a PDU, got {other:?}"),
    }
}

const BOTH: Digests = Digests {
    header: true,
    data: true,
};

#[test]
fn accepts_rfc3720_read10_with_header_digest() {
    let mut buf = BytesMut::from(&hex(&format!("{READ10} 563a96d9"))[..]);
    let pdu = expect_pdu(framer(BOTH).next_pdu(&mut buf).unwrap());
    assert_eq!(pdu.header.opcode(), Opcode::ScsiCommand);
    assert!(
        pdu.data.is_empty(),
        "no data segment, so no data digest either"
    );
    assert!(buf.is_empty());
    assert_eq!(
        encode_pdu(&pdu, BOTH).concat(),
        hex(&format!("{READ10} 563a96d9"))
    );
}

#[test]
fn rejects_bad_header_digest() {
    let mut buf = BytesMut::from(&hex(&format!("{READ10} 563a96d8"))[..]);
    assert_eq!(
        framer(BOTH).next_pdu(&mut buf).unwrap_err(),
        PduError::HeaderDigest
    );
}

#[test]
fn accepts_truncated_bhs_as_need_more() {
    let full = hex(READ10);
    let mut f = framer(Digests::default());
    for n in 0..BHS_LEN {
        let mut buf = BytesMut::from(&full[..n]);
        assert!(f.next_pdu(&mut buf).unwrap().is_none());
        assert_eq!(buf.len(), n, "nothing consumed");
    }
}

#[test]
fn accepts_partial_payload_as_need_more_and_reserves_the_rest() {
    let bytes = wire(&nop_out(1, b"0123456789"), BOTH);
    assert_eq!(bytes.len(), 48 + 4 + 12 + 4);
    let mut f = framer(BOTH);
    let mut buf = BytesMut::from(&bytes[..60]);
    assert!(f.next_pdu(&mut buf).unwrap().is_none());
    assert!(buf.capacity() >= bytes.len());
    buf.extend_from_slice(&bytes[60..]);
    assert_eq!(
        expect_pdu(f.next_pdu(&mut buf).unwrap()).data,
        &b"0123456789"[..]
    );
    assert!(buf.is_empty());
}

#[test]
fn rejects_oversized_data_segment_before_payload() {
    // NOP-Out announcing DataSegmentLength 0x010000 with a 0x8000 limit; only the BHS is here.
    let bhs = hex48(
        "00800000 00010000 0000000000000000 00000001 ffffffff 00000000 00000000
         00000000 00000000 00000000 00000000",
    );
    let mut f = Framer::new(Limits {
        max_data_segment: 0x8000,
        ..Limits::default()
    });
    let mut buf = BytesMut::from(&bhs[..]);
    let cap = buf.capacity();
    assert_eq!(
        f.next_pdu(&mut buf).unwrap_err(),
        PduError::TooLong {
            field: "DataSegmentLength",
            value: 0x10000,
            limit: 0x8000
        }
    );
    assert_eq!(buf.capacity(), cap, "nothing reserved for the payload");
}

#[test]
fn rejects_oversized_ahs_before_payload() {
    let bhs = hex48(
        "01c00000 05000000 0000000000000000 00000001 00000000 00000000 00000000
         28000000 00000000 02000000 00000000",
    );
    let mut f = Framer::new(Limits {
        max_ahs: 16,
        ..Limits::default()
    });
    assert_eq!(
        f.next_pdu(&mut BytesMut::from(&bhs[..])).unwrap_err(),
        PduError::TooLong {
            field: "TotalAHSLength",
            value: 20,
            limit: 16
        }
    );
}

#[test]
fn rejects_bad_data_digest_and_goes_on() {
    let mut bytes = wire(&nop_out(1, b"abcde"), BOTH);
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    bytes.extend(wire(&nop_out(2, b""), BOTH));
    let mut f = framer(BOTH);
    let mut buf = BytesMut::from(&bytes[..]);
    match f.next_pdu(&mut buf).unwrap() {
        Some(Framed::Bad {
            error: PduError::DataDigest,
            header,
        }) => {
            assert_eq!(&header[..], &bytes[..48]);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(expect_pdu(f.next_pdu(&mut buf).unwrap()).header.itt(), 2);
    assert!(buf.is_empty());
}

#[test]
fn rejects_unknown_opcode_consuming_its_data() {
    // Opcode 0x1c (vendor specific), DataSegmentLength 5, then a good NOP-Out.
    let mut bytes = hex(
        "1c800000 00000005 0000000000000000 00000001 00000000 00000000 00000000
         00000000 00000000 00000000 00000000 6869686968000000",
    );
    bytes.extend(wire(&nop_out(2, b"x"), Digests::default()));
    let mut f = framer(Digests::default());
    let mut buf = BytesMut::from(&bytes[..]);
    match f.next_pdu(&mut buf).unwrap() {
        Some(Framed::Bad {
            error: PduError::UnknownOpcode(0x1c),
            header,
        }) => {
            assert_eq!(&header[..], &bytes[..48]);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(expect_pdu(f.next_pdu(&mut buf).unwrap()).data, &b"x"[..]);
}

#[test]
fn rejects_bad_ahs_as_bad_pdu() {
    // TotalAHSLength 1 word holding AHSLength 0.
    let bytes = hex(
        "01c00000 01000000 0000000000000000 00000001 00000000 00000000 00000000
         28000000 00000000 02000000 00000000 00000100",
    );
    let mut buf = BytesMut::from(&bytes[..]);
    match framer(Digests::default()).next_pdu(&mut buf).unwrap() {
        Some(Framed::Bad {
            error: PduError::InvalidField("AHSLength"),
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    assert!(buf.is_empty());
}

#[test]
fn accepts_data_without_copy() {
    let bytes = wire(&nop_out(1, b"payload!"), Digests::default());
    let mut buf = BytesMut::from(&bytes[..]);
    let base = buf.as_ptr() as usize;
    let pdu = expect_pdu(framer(Digests::default()).next_pdu(&mut buf).unwrap());
    assert_eq!(pdu.data.as_ptr() as usize, base + BHS_LEN);
}

#[test]
fn accepts_encode_pieces_with_digests() {
    let pdu = nop_out(1, b"hello");
    let pieces = encode_pdu(&pdu, BOTH);
    let lens: Vec<usize> = pieces.iter().map(Bytes::len).collect();
    assert_eq!(lens, vec![52, 5, 7]);
    assert_eq!(pieces[1].as_ptr(), pdu.data.as_ptr(), "data passed through");
    assert_eq!(&pieces[2][..3], &[0, 0, 0]);
    let crc = digest::crc32c(b"hello\0\0\0");
    assert_eq!(&pieces[2][3..], &digest::to_wire(crc));
    // Without digests: header, data, padding.
    let plain: Vec<usize> = encode_pdu(&pdu, Digests::default())
        .iter()
        .map(Bytes::len)
        .collect();
    assert_eq!(plain, vec![48, 5, 3]);
    assert_eq!(
        encode_pdu(&pdu, Digests::default()).concat(),
        encode_pdu_plain(&pdu)
    );
    // Aligned data and no digest: no tail piece.
    assert_eq!(
        encode_pdu(&nop_out(1, b"four"), Digests::default()).len(),
        2
    );
}

#[test]
fn accepts_and_rejects_decode_pdu() {
    let bytes = wire(&nop_out(7, b"abc"), BOTH);
    let limits = Limits::default();
    let (pdu, used) = decode_pdu(&bytes, &limits, BOTH).unwrap();
    assert_eq!((pdu, used), (nop_out(7, b"abc"), bytes.len()));
    assert_eq!(
        decode_pdu(&bytes[..bytes.len() - 1], &limits, BOTH),
        Err(PduError::Truncated {
            need: bytes.len(),
            have: bytes.len() - 1
        })
    );
    assert_eq!(
        decode_pdu(&bytes[..10], &limits, BOTH),
        Err(PduError::Truncated {
            need: BHS_LEN,
            have: 10
        })
    );
}

#[test]
fn accepts_frame_len_bounded_by_max_frame_len() {
    let f = Framer {
        limits: Limits {
            max_data_segment: 100,
            max_ahs: 8,
            ..Limits::default()
        },
        digests: BOTH,
    };
    let bhs = hex48(
        "00800000 02000064 0000000000000000 00000001 ffffffff 00000000 00000000
         00000000 00000000 00000000 00000000",
    );
    assert_eq!(f.frame_len(&bhs).unwrap(), Some(48 + 8 + 4 + 100 + 4));
    assert!(f.max_frame_len() >= 48 + 8 + 4 + 100 + 4);
    assert_eq!(f.frame_len(&bhs[..47]).unwrap(), None);
}

fn digests() -> impl Strategy<Value = Digests> {
    (any::<bool>(), any::<bool>()).prop_map(|(header, data)| Digests { header, data })
}

proptest! {
    #[test]
    fn pdu_decode_inverts_encode(pdu in arb_pdu(64), d in digests()) {
        let bytes = wire(&pdu, d);
        let (got, used) = decode_pdu(&bytes, &Limits::default(), d).unwrap();
        prop_assert_eq!(used, bytes.len());
        prop_assert_eq!(got, pdu);
    }

    #[test]
    fn framer_is_chunking_invariant(
        pdus in proptest::collection::vec(arb_pdu(300), 1..6),
        d in digests(),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..20),
    ) {
        let stream: Vec<u8> = pdus.iter().flat_map(|p| wire(p, d)).collect();
        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
        points.sort_unstable();
        points.push(stream.len());
        let mut f = framer(d);
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        let mut start = 0;
        for p in points {
            buf.extend_from_slice(&stream[start..p]);
            start = p;
            while let Some(framed) = f.next_pdu(&mut buf).unwrap() {
                got.push(expect_pdu(Some(framed)));
            }
            prop_assert!(buf.len() < f.max_frame_len());
        }
        prop_assert!(buf.is_empty());
        prop_assert_eq!(got, pdus);
    }

    #[test]
    fn framer_never_panics_and_consumes_whole_frames(
        bytes in proptest::collection::vec(any::<u8>(), 0..400), d in digests()
    ) {
        let mut f = Framer {
            limits: Limits { max_data_segment: 256, ..Limits::default() },
            digests: d,
        };
        let mut buf = BytesMut::from(&bytes[..]);
        loop {
            let before = buf.len();
            match f.next_pdu(&mut buf) {
                Ok(Some(_)) => prop_assert!(buf.len() < before),
                Ok(None) => {
                    prop_assert_eq!(buf.len(), before);
                    break;
                }
                Err(e) => {
                    prop_assert_eq!(e.action(), crate::error::ErrorAction::Drop);
                    break;
                }
            }
        }
    }
}
