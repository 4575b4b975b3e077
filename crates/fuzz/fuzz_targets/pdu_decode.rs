//! BHS and AHS decode on arbitrary bytes (RFC 7143 §11.2): never panics, and whatever decodes
//! encodes to bytes that decode to the same value.
#![no_main]

use bytes::BytesMut;
use ironlun_iscsi::bhs::{decode_ahs, decode_header, encode_ahs, header_bytes, BHS_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((bhs, rest)) = data.split_first_chunk::<BHS_LEN>() else {
        return;
    };
    if let Ok(decoded) = decode_header(bhs) {
        let again = header_bytes(&decoded.header, decoded.total_ahs_len, decoded.data_segment_len);
        assert_eq!(decode_header(&again).as_ref(), Ok(&decoded));
        // Encoding is canonical: a second round gives the same bytes.
        assert_eq!(
            header_bytes(&decoded.header, decoded.total_ahs_len, decoded.data_segment_len),
            again
        );
    }
    if let Ok(ahs) = decode_ahs(rest) {
        let mut out = BytesMut::new();
        encode_ahs(&ahs, &mut out);
        assert_eq!(out.len() % 4, 0);
        assert_eq!(decode_ahs(&out), Ok(ahs));
    }
});
