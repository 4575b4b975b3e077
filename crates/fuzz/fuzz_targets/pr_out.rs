//! PERSISTENT RESERVE OUT parameter lists and sequences (SPC-4 §6.16) from three I_T nexuses
//! (two of them one initiator name with different ISIDs) on one logical unit. Invariants:
//! no panic; every command completes (PR OUT never asks for backstore I/O); READ KEYS is
//! consistent with the ADDITIONAL LENGTH it reports; every APTPL state image the LU asks to
//! persist restores, in a fresh LU, to exactly the state it was taken from.
#![no_main]

use bytes::Bytes;
use ironlun_scsi::pr::{InitiatorPort, ItNexus, Persist};
use ironlun_scsi::{LogicalUnit, LuConfig, Step};
use libfuzzer_sys::fuzz_target;

fn config() -> LuConfig {
    let mut c = LuConfig::new(0, 512, 1024, "iqn.2026-11.io.ironlun:fuzz");
    c.relative_ports = vec![1, 2];
    c.ptpl_capable = true;
    c
}

fn nexus(i: u8) -> ItNexus {
    let name = if i == 2 { "iqn.fuzz:b" } else { "iqn.fuzz:a" };
    ItNexus {
        initiator: InitiatorPort::new(name, [0x80, 0, 0, 0, 0, i]),
        rtpi: 1 + u16::from(i & 1),
    }
}

fuzz_target!(|data: &[u8]| {
    let mut lu = LogicalUnit::new(config());
    for i in 0..3u8 {
        lu.add_nexus(u64::from(i), nexus(i));
    }
    // Each record: [nexus, service action, scope/type, parameter length, parameters...].
    let mut rest = data;
    while let [who, sa, st, len, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        let (params, next) = tail.split_at(n);
        rest = next;
        let who = u64::from(who % 3);
        let l = u32::try_from(params.len()).unwrap_or(0).to_be_bytes();
        let cdb = [0x5F, sa & 0x1f, *st, 0, 0, l[0], l[1], l[2], l[3], 0];
        let step = lu.execute(who, &cdb, Bytes::copy_from_slice(params));
        match step {
            Step::Done(_) => {}
            Step::PrCommit(c) => {
                if let Some(t) = c.abort {
                    assert!(lu.abort_drained(t), "no task was in flight to abort");
                }
                if let Some(Persist::Write(image)) = c.persist {
                    let mut fresh = LogicalUnit::new(config());
                    fresh.restore_pr(&image).expect("own state image restores");
                    assert_eq!(fresh.pr_snapshot(), {
                        let mut s = lu.pr_snapshot();
                        s.spc2_holder = None;
                        s
                    });
                }
            }
            Step::Io(..) | Step::Wait(_) => panic!("PR OUT asked for backstore I/O"),
            Step::Replicate(_) => panic!("a local LU replicated a PR OUT"),
        }
        // READ KEYS from the same nexus, after any unit attention it has pending.
        for _ in 0..4 {
            let cdb = [0x5E, 0, 0, 0, 0, 0, 0, 0x20, 0, 0];
            let Step::Done(c) = lu.execute(who, &cdb, Bytes::new()) else {
                panic!("PR IN did not complete");
            };
            if c.status == 0x02 {
                continue; // unit attention reported (and cleared)
            }
            if c.status == 0 {
                let d = &c.data;
                assert!(d.len() >= 8);
                let add = u32::from_be_bytes([d[4], d[5], d[6], d[7]]) as usize;
                assert_eq!(add % 8, 0);
                assert_eq!(d.len(), 8 + add.min(0x2000 - 8));
            }
            break;
        }
    }
});
