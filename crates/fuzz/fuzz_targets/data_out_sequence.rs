//! Write data assembly (RFC 7143 §4.2.2.3, §11.7, §11.8) driven by arbitrary R2T solicitations
//! and Data-Out headers: a `WriteBuffer` with fuzz-chosen ExpectedDataTransferLength (up to
//! 64 MiB), burst sizes, immediate data and DataPDUInOrder / DataSequenceInOrder, fed until
//! its first refusal (at ErrorRecoveryLevel 0 a refused Data-Out ends the connection).
//!
//! Each Data-Out carries the bytes `pattern(offset)` for its offsets, so the assembled data
//! can be checked byte by byte. A small model of the sequences the harness was offered
//! (immediate, unsolicited, and one per R2T) judges every accepted Data-Out.
//!
//! Invariants: no panic; a Data-Out is accepted only inside an open sequence it names, after
//! the earlier open sequences when DataSequenceInOrder=Yes, at the next offset when
//! DataPDUInOrder=Yes, and without overlapping data already taken; held bytes are exactly the
//! bytes accepted and the memory kept is at most twice that plus a per-run overhead (never
//! the announced length); the buffer is complete exactly when every byte arrived, and then
//! yields exactly EDTL bytes equal to what was sent at each offset; an incomplete buffer
//! yields nothing.
#![no_main]

use bytes::Bytes;
use ironlun_iscsi::pdu::{DataOut, RESERVED_TAG};
use ironlun_iscsi::r2t::{WriteBuffer, WriteParams, RUN_OVERHEAD};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use std::collections::BTreeMap;

/// Largest payload one fuzzed Data-Out carries.
const MAX_PIECE: u32 = 1 << 20;
/// The target's default `Limits::max_transfer`.
const MAX_EDTL: u32 = 64 * 1024 * 1024;

#[derive(Arbitrary, Debug)]
struct Input {
    edtl: u32,
    /// Draw EDTL up to 64 MiB instead of up to 64 KiB.
    big: bool,
    immediate: u16,
    unsolicited_end: u32,
    max_burst: u16,
    max_outstanding_r2t: u8,
    data_pdu_in_order: bool,
    data_sequence_in_order: bool,
    steps: Vec<Step>,
}

#[derive(Arbitrary, Debug)]
enum Step {
    /// Let the buffer open the R2T sequences it may.
    Solicit,
    DataOut {
        /// Index into the sequences offered so far; one past the end names an unknown TTT.
        seq: u8,
        offset: Offset,
        len: Len,
        final_: Final,
        /// `None`: the DataSN the sequence expects.
        data_sn: Option<u32>,
    },
}

#[derive(Arbitrary, Debug)]
enum Offset {
    Next,
    Start,
    Back(u16),
    Ahead(u16),
    Raw(u32),
}

#[derive(Arbitrary, Debug)]
enum Len {
    /// To the end of the sequence (at most `MAX_PIECE`).
    Rest,
    Raw(u16),
}

#[derive(Arbitrary, Debug)]
enum Final {
    /// Set exactly when this piece completes the sequence.
    Auto,
    Set,
    Clear,
}

/// The byte the harness sends at `offset`.
fn pattern(offset: u32) -> u8 {
    offset.wrapping_mul(0x9E37_79B1).to_be_bytes()[0] ^ offset.to_le_bytes()[0]
}

fn payload(offset: u32, len: u32) -> Bytes {
    (0..len)
        .map(|i| pattern(offset.wrapping_add(i)))
        .collect::<Vec<u8>>()
        .into()
}

/// A sequence the harness was offered.
struct Seq {
    ttt: u32,
    start: u32,
    end: u32,
    next: u32,
    received: u32,
    next_data_sn: u32,
    open: bool,
}

fuzz_target!(|input: Input| {
    let edtl = if input.big {
        input.edtl % (MAX_EDTL + 1)
    } else {
        input.edtl % (64 * 1024 + 1)
    };
    let params = WriteParams {
        max_burst: u32::from(input.max_burst),
        max_outstanding_r2t: u16::from(input.max_outstanding_r2t),
        data_pdu_in_order: input.data_pdu_in_order,
        data_sequence_in_order: input.data_sequence_in_order,
    };
    let imm_len = u32::from(input.immediate).min(edtl);
    let immediate = payload(0, u32::from(input.immediate));
    let mut w = WriteBuffer::new(edtl, &immediate, input.unsolicited_end, params);

    // The model: the sequences offered, in offset order, and the ranges taken.
    let mut seqs: Vec<Seq> = Vec::new();
    let unsolicited_end = input.unsolicited_end.clamp(imm_len, edtl);
    if unsolicited_end > imm_len {
        seqs.push(Seq {
            ttt: RESERVED_TAG,
            start: imm_len,
            end: unsolicited_end,
            next: imm_len,
            received: 0,
            next_data_sn: 0,
            open: true,
        });
    }
    let mut next_solicit = unsolicited_end;
    let mut taken: BTreeMap<u32, u32> = BTreeMap::new();
    let mut received = u64::from(imm_len);
    let mut sn_error = false;
    let mut next_ttt = 0u32;
    let mut r2t_sn = 0u32;

    for step in input.steps {
        match step {
            Step::Solicit => {
                let r2ts = w.solicit(|| {
                    next_ttt += 1;
                    next_ttt
                });
                for r in r2ts {
                    assert_eq!(
                        r.buffer_offset, next_solicit,
                        "R2Ts cover the transfer in order"
                    );
                    assert_eq!(r.r2t_sn, r2t_sn);
                    assert!(r.desired_length > 0 && r.desired_length <= params.max_burst.max(1));
                    let end = r.buffer_offset.checked_add(r.desired_length).unwrap();
                    assert!(end <= edtl);
                    assert_ne!(r.ttt, RESERVED_TAG);
                    seqs.push(Seq {
                        ttt: r.ttt,
                        start: r.buffer_offset,
                        end,
                        next: r.buffer_offset,
                        received: 0,
                        next_data_sn: 0,
                        open: true,
                    });
                    next_solicit = end;
                    r2t_sn += 1;
                }
                let open_r2ts = seqs
                    .iter()
                    .filter(|s| s.open && s.ttt != RESERVED_TAG)
                    .count();
                assert!(open_r2ts <= usize::from(params.max_outstanding_r2t.max(1)));
            }
            Step::DataOut {
                seq,
                offset,
                len,
                final_,
                data_sn,
            } => {
                let idx = usize::from(seq) % (seqs.len() + 1);
                let (ttt, start, end, next, got, want_sn) = match seqs.get(idx) {
                    Some(s) => (s.ttt, s.start, s.end, s.next, s.received, s.next_data_sn),
                    None => (0x8000_0000 | u32::from(seq), 0, 0, 0, 0, 0),
                };
                let off = match offset {
                    Offset::Next => next,
                    Offset::Start => start,
                    Offset::Back(d) => next.saturating_sub(u32::from(d)),
                    Offset::Ahead(d) => next.saturating_add(u32::from(d)),
                    Offset::Raw(v) => v,
                };
                let len = match len {
                    Len::Rest => end.saturating_sub(off).min(MAX_PIECE),
                    Len::Raw(n) => u32::from(n),
                };
                let completes = got.checked_add(len) == Some(end - start);
                let final_ = match final_ {
                    Final::Auto => completes,
                    Final::Set => true,
                    Final::Clear => false,
                };
                let data_sn = data_sn.unwrap_or(want_sn);
                let h = DataOut {
                    final_,
                    ttt,
                    data_sn,
                    buffer_offset: off,
                    ..Default::default()
                };
                if w.data_out(&h, &payload(off, len)).is_err() {
                    // ErrorRecoveryLevel 0: the connection closes, nothing more arrives.
                    break;
                }
                // Accepted: it must fit the model.
                let s = seqs
                    .get(idx)
                    .expect("accepted a Data-Out naming no offered sequence");
                assert!(s.open, "accepted a Data-Out for a closed sequence");
                if params.data_sequence_in_order {
                    let earliest = seqs.iter().position(|s| s.open);
                    assert_eq!(earliest, Some(idx), "accepted a later sequence first");
                }
                let piece_end = off.checked_add(len).expect("accepted an offset overflow");
                assert!(
                    off >= s.start && piece_end <= s.end,
                    "accepted outside its sequence"
                );
                if params.data_pdu_in_order {
                    assert_eq!(off, s.next, "accepted out of order");
                }
                assert!(!final_ || completes, "accepted an early F bit");
                if len > 0 {
                    if let Some((_, &e)) = taken.range(..=off).next_back() {
                        assert!(e <= off, "accepted an overlap");
                    }
                    if let Some((&b, _)) = taken.range(off..).next() {
                        assert!(b >= piece_end, "accepted an overlap");
                    }
                    taken.insert(off, piece_end);
                }
                sn_error |= data_sn != s.next_data_sn;
                let s = &mut seqs[idx];
                s.received += len;
                s.next = piece_end;
                s.next_data_sn = data_sn.wrapping_add(1);
                if s.received == s.end - s.start {
                    s.open = false;
                }
                received += u64::from(len);
            }
        }
        assert_eq!(
            w.held_bytes() as u64,
            received,
            "held bytes are the bytes accepted"
        );
        // Runs grow by doubling; each run (at most one per piece taken, plus the immediate
        // data) is charged RUN_OVERHEAD.
        let overhead = (RUN_OVERHEAD * (taken.len() + 1)) as u64;
        assert!(
            w.footprint() as u64 <= 2 * received + overhead,
            "footprint {} for {received} bytes received",
            w.footprint()
        );
        assert_eq!(w.data_sn_error(), sn_error);
        assert_eq!(w.is_complete(), received == u64::from(edtl));
    }

    if w.is_complete() {
        let data = w.into_data().expect("a complete buffer yields its data");
        assert_eq!(data.len() as u64, u64::from(edtl));
        for (i, b) in data.iter().enumerate() {
            assert_eq!(*b, pattern(i as u32), "byte {i}");
        }
    } else {
        assert!(
            w.into_data().is_none(),
            "an incomplete buffer yields nothing"
        );
    }
});
