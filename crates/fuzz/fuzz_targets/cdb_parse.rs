//! CDB parsing (SPC-4 §4.2) on arbitrary bytes: never panics and is deterministic.
//! Skeleton for the SCSI side to extend with its own invariants.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let first = ironlun_scsi::cdb::parse(data);
    assert_eq!(first, ironlun_scsi::cdb::parse(data));
});
