//! Text key=value data (RFC 7143 §6.1): NUL-separated pairs, bounded, in order.

use crate::error::PduError;

/// Parse a text data segment into ordered (key, value) pairs. Keys ≤ 63 bytes, values ≤ 255 (or
/// 8192 for the long-value keys); a missing '=' or non-UTF-8 is an error.
pub fn parse(data: &[u8]) -> Result<Vec<(String, String)>, PduError> {
    let _ = data;
    todo!("text parse")
}

/// Encode pairs as `key=value\0...`.
pub fn encode(pairs: &[(String, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(b'=');
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}
