//! The cluster record decoder (crate `cluster`, `codec`: what a gateway reads from etcd, which
//! anyone with write access to the store controls) on arbitrary bytes: never panics, whatever
//! it accepts re-encodes to bytes that decode to the same record, and replaying its operation
//! on the state it carries never panics either.
#![no_main]

use ironlun_cluster::codec::{decode_record, encode_record};
use ironlun_scsi::pr::PrContext;
use libfuzzer_sys::fuzz_target;

const SERIAL: &str = "0123456789abcdef";

fuzz_target!(|data: &[u8]| {
    if let Ok(rec) = decode_record(data, SERIAL) {
        let bytes = encode_record(&rec, SERIAL);
        let again = decode_record(&bytes, SERIAL).expect("own encoding decodes");
        assert_eq!(again, rec);
        let mut state = rec.state.clone();
        let ctx = PrContext {
            relative_ports: &[1, 2, 3],
            ptpl_capable: true,
        };
        let _ = rec.op.apply(&mut state, ctx);
    }
});
