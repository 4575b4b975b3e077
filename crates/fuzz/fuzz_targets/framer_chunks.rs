//! The framer over an arbitrary stream cut into arbitrary chunks: never panics, never holds more
//! than one (bounded) partial PDU, and yields exactly what it yields when fed all at once.
#![no_main]

use bytes::{Bytes, BytesMut};
use ironlun_iscsi::framer::{Digests, Framed, Framer};
use ironlun_iscsi::{Limits, Pdu, PduError};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, PartialEq)]
enum Event {
    Pdu(Pdu),
    Bad(PduError, Bytes),
    Fatal(PduError),
}

fn framer(flags: u8) -> Framer {
    Framer {
        // Small limits so the fuzzer reaches them.
        limits: Limits { max_data_segment: 4096, max_ahs: 64, ..Limits::default() },
        digests: Digests { header: flags & 1 != 0, data: flags & 2 != 0 },
    }
}

/// Drain every whole PDU from `buf`; returns false once the stream is dead.
fn drain(f: &mut Framer, buf: &mut BytesMut, out: &mut Vec<Event>) -> bool {
    loop {
        let before = buf.len();
        match f.next_pdu(buf) {
            Ok(Some(Framed::Pdu(p))) => out.push(Event::Pdu(p)),
            Ok(Some(Framed::Bad { error, header })) => {
                assert_eq!(header.len(), 48);
                out.push(Event::Bad(error, header));
            }
            Ok(None) => {
                assert_eq!(buf.len(), before, "need-more consumes nothing");
                assert!(buf.len() < f.max_frame_len(), "buffered past the limits");
                return true;
            }
            Err(e) => {
                out.push(Event::Fatal(e));
                return false;
            }
        }
        assert!(buf.len() < before, "a framed PDU consumes bytes");
    }
}

fuzz_target!(|input: (u8, Vec<u16>, Vec<u8>)| {
    let (flags, cuts, stream) = input;

    let mut whole = Vec::new();
    let mut f = framer(flags);
    let mut buf = BytesMut::from(&stream[..]);
    drain(&mut f, &mut buf, &mut whole);

    let mut chunked = Vec::new();
    let mut f = framer(flags);
    let mut buf = BytesMut::new();
    let mut rest = &stream[..];
    let mut cuts = cuts.iter();
    while !rest.is_empty() {
        let n = cuts.next().map_or(rest.len(), |c| usize::from(*c)).min(rest.len());
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        buf.extend_from_slice(chunk);
        if !drain(&mut f, &mut buf, &mut chunked) {
            break;
        }
    }
    assert_eq!(whole, chunked);
});
