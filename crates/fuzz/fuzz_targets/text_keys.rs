//! Text key=value parsing (RFC 7143 §6.1) across continuation pieces: never panics, never holds
//! more than its limit, agrees with parsing the concatenation, and what parses re-encodes to
//! itself.
#![no_main]

use ironlun_iscsi::text::{encode, parse, TextAccumulator, MAX_KEY_LEN, MAX_VALUE_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (u16, Vec<Vec<u8>>)| {
    let (limit, pieces) = input;
    let limit = usize::from(limit);
    let mut acc = TextAccumulator::new(limit);
    let mut accepted = Vec::new();
    for piece in &pieces {
        if acc.push(piece).is_ok() {
            accepted.extend_from_slice(piece);
        }
        assert!(acc.len() <= limit);
    }
    assert_eq!(acc.len(), accepted.len());
    let result = acc.finish();
    assert!(acc.is_empty());
    assert_eq!(result, parse(&accepted));
    if let Ok(pairs) = result {
        for (k, v) in &pairs {
            assert!(!k.is_empty() && k.len() <= MAX_KEY_LEN && v.len() <= MAX_VALUE_LEN);
        }
        assert_eq!(parse(&encode(&pairs)), Ok(pairs));
    }
});
