//! The APTPL state file decoder (crate `scsi`, `pr::persist`) on arbitrary bytes: never
//! panics, and whatever it accepts re-encodes to an image that decodes to the same state.
#![no_main]

use ironlun_scsi::pr::persist;
use libfuzzer_sys::fuzz_target;

const SERIAL: &str = "0123456789abcdef";

fuzz_target!(|data: &[u8]| {
    if let Ok(state) = persist::decode(data, SERIAL) {
        let image = persist::encode(&state, SERIAL);
        let again = persist::decode(&image, SERIAL).expect("own encoding decodes");
        assert_eq!(persist::encode(&again, SERIAL), image);
    }
});
