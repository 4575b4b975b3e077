//! Text key=value data (RFC 7143 §6.1): NUL-separated pairs, bounded, in order.
//!
//! A Login or Text exchange may split its text across PDUs (C bit, §11.10.2, §11.12.2), even in
//! the middle of a pair, so [`TextAccumulator`] gathers the pieces under a byte limit and parses
//! once the last piece is in; [`parse`] handles one complete segment.

use crate::error::PduError;

/// Longest key name, §6.1 ("a maximum length of 63 bytes").
pub const MAX_KEY_LEN: usize = 63;
/// Longest value accepted. §6.1 bounds most values at 255 bytes but lets keys define longer
/// ones (CHAP challenges and responses in hex or base64, §12.1.3); one generous bound serves all.
pub const MAX_VALUE_LEN: usize = 8192;

const INVALID: PduError = PduError::InvalidField("text");

/// Key-name characters, §6.1: letters, digits, '.', '-', '+', '@', '_'.
fn is_key_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b'+' | b'@' | b'_')
}

/// A well-formed key name: §6.1 characters, except that a public extension key starts with
/// `X#` (§13.22; e.g. X#NodeArchitecture, §13.26). Whether we understand the key is for
/// negotiation to say (`NotUnderstood`, §6.2), not a format error.
fn is_key_name(key: &[u8]) -> bool {
    let rest = key.strip_prefix(b"X#").unwrap_or(key);
    !rest.is_empty() && key.len() <= MAX_KEY_LEN && rest.iter().all(|&c| is_key_char(c))
}

/// Parse one `key=value` item (without its NUL).
fn parse_pair(item: &[u8]) -> Result<(String, String), PduError> {
    let eq = item.iter().position(|&c| c == b'=').ok_or(INVALID)?;
    let (key, rest) = item.split_at(eq);
    let value = rest.get(1..).ok_or(INVALID)?;
    if !is_key_name(key) {
        return Err(INVALID);
    }
    if value.len() > MAX_VALUE_LEN {
        return Err(INVALID);
    }
    let key = std::str::from_utf8(key).map_err(|_| INVALID)?;
    let value = std::str::from_utf8(value).map_err(|_| INVALID)?;
    Ok((key.to_owned(), value.to_owned()))
}

/// Parse a text data segment into ordered (key, value) pairs. Keys ≤ 63 bytes, values ≤ 255 (or
/// 8192 for the long-value keys); a missing '=' or non-UTF-8 is an error.
///
/// Every pair must end in NUL: bytes after the last NUL (a pair cut off) are
/// `InvalidField("text")`; use [`TextAccumulator`] for text continued across PDUs. Empty items
/// (consecutive NULs, e.g. NUL padding inside DataSegmentLength) are skipped. The caller bounds
/// the input size. Duplicate keys are kept in order for negotiation to judge.
pub fn parse(data: &[u8]) -> Result<Vec<(String, String)>, PduError> {
    let Some((&last, _)) = data.split_last() else {
        return Ok(Vec::new());
    };
    if last != 0 {
        return Err(INVALID);
    }
    data.split(|&c| c == 0)
        .filter(|item| !item.is_empty())
        .map(parse_pair)
        .collect()
}

/// Gathers the text of a Login or Text exchange across PDUs (C bit) under a byte limit.
///
/// `push` each data segment as it arrives; the limit is checked before the buffer grows. Call
/// `finish` after the PDU with C = 0 to parse the whole text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextAccumulator {
    buf: Vec<u8>,
    limit: usize,
}

impl TextAccumulator {
    /// An empty accumulator that holds at most `limit` bytes (e.g. `Limits::max_text`).
    pub fn new(limit: usize) -> Self {
        TextAccumulator {
            buf: Vec::new(),
            limit,
        }
    }

    /// Append one data segment. `TooLong { field: "text" }` if the total would pass the limit;
    /// the buffer is then left as it was.
    pub fn push(&mut self, piece: &[u8]) -> Result<(), PduError> {
        let total = self.buf.len().checked_add(piece.len());
        match total {
            Some(total) if total <= self.limit => {
                self.buf.extend_from_slice(piece);
                Ok(())
            }
            _ => Err(PduError::TooLong {
                field: "text",
                value: total
                    .and_then(|t| u32::try_from(t).ok())
                    .unwrap_or(u32::MAX),
                limit: u32::try_from(self.limit).unwrap_or(u32::MAX),
            }),
        }
    }

    /// Bytes gathered so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether nothing has been gathered.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Drop what was gathered (keeps the limit), e.g. when a new exchange starts.
    pub fn clear(&mut self) {
        self.buf.clear();
    }

    /// Parse everything gathered, as [`parse`], and empty the accumulator.
    pub fn finish(&mut self) -> Result<Vec<(String, String)>, PduError> {
        let buf = std::mem::take(&mut self.buf);
        parse(&buf)
    }
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;
    use proptest::prelude::*;

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn accepts_empty_segment() {
        assert_eq!(parse(b"").unwrap(), vec![]);
    }

    #[test]
    fn accepts_login_keys_in_order() {
        let got = parse(b"InitiatorName=iqn.2005-03.org.open-iscsi:abc\0SessionType=Normal\0AuthMethod=None,CHAP\0").unwrap();
        assert_eq!(
            got,
            pairs(&[
                ("InitiatorName", "iqn.2005-03.org.open-iscsi:abc"),
                ("SessionType", "Normal"),
                ("AuthMethod", "None,CHAP"),
            ])
        );
    }

    #[test]
    fn accepts_empty_value_and_value_with_equals() {
        assert_eq!(
            parse(b"X-a=\0K=a=b\0").unwrap(),
            pairs(&[("X-a", ""), ("K", "a=b")])
        );
    }

    #[test]
    fn accepts_nul_padding() {
        assert_eq!(parse(b"A=1\0\0\0\0").unwrap(), pairs(&[("A", "1")]));
    }

    #[test]
    fn accepts_public_and_private_extension_keys() {
        assert_eq!(
            parse(b"X#NodeArchitecture=ExampleOS/v1.0,Example Co.\0X-com.example.Opt=1\0").unwrap(),
            pairs(&[
                ("X#NodeArchitecture", "ExampleOS/v1.0,Example Co."),
                ("X-com.example.Opt", "1")
            ])
        );
        for bad in [
            &b"X#=1\0"[..],
            b"X##A=1\0",
            b"A#B=1\0",
            b"#X=1\0",
            b"Y#A=1\0",
        ] {
            assert_eq!(parse(bad), Err(PduError::InvalidField("text")), "{bad:?}");
        }
    }

    #[test]
    fn accepts_longest_key_and_value() {
        let mut seg = vec![b'K'; MAX_KEY_LEN];
        seg.push(b'=');
        seg.resize(seg.len() + MAX_VALUE_LEN, b'v');
        seg.push(0);
        let got = parse(&seg).unwrap();
        assert_eq!(got[0].0.len(), MAX_KEY_LEN);
        assert_eq!(got[0].1.len(), MAX_VALUE_LEN);
    }

    #[test]
    fn rejects_table() {
        let long_key = [vec![b'K'; MAX_KEY_LEN + 1], b"=v\0".to_vec()].concat();
        let long_value = [b"K=".to_vec(), vec![b'v'; MAX_VALUE_LEN + 1], vec![0]].concat();
        let cases: [(&str, &[u8]); 8] = [
            ("missing '='", b"NoEquals\0"),
            ("empty key", b"=value\0"),
            ("bad key char", b"Key Name=v\0"),
            ("no final NUL", b"A=1\0B=2"),
            ("invalid UTF-8 value", b"A=\xff\xfe\0"),
            ("only a partial pair", b"Max"),
            ("key too long", &long_key),
            ("value too long", &long_value),
        ];
        for (what, seg) in cases {
            assert_eq!(parse(seg), Err(PduError::InvalidField("text")), "{what}");
        }
    }

    #[test]
    fn accepts_pair_split_across_pdus() {
        let mut acc = TextAccumulator::new(64);
        acc.push(b"MaxRecvDataSeg").unwrap();
        acc.push(b"mentLength=2621").unwrap();
        acc.push(b"44\0A=").unwrap();
        acc.push(b"").unwrap();
        acc.push(b"b\0").unwrap();
        assert_eq!(
            acc.finish().unwrap(),
            pairs(&[("MaxRecvDataSegmentLength", "262144"), ("A", "b")])
        );
        assert!(acc.is_empty());
    }

    #[test]
    fn rejects_accumulator_over_limit_before_growing() {
        let mut acc = TextAccumulator::new(8);
        acc.push(b"A=1\0").unwrap();
        assert_eq!(
            acc.push(b"B=22\0"),
            Err(PduError::TooLong {
                field: "text",
                value: 9,
                limit: 8
            })
        );
        assert_eq!(acc.len(), 4);
        acc.push(b"B=2\0").unwrap();
        assert_eq!(acc.finish().unwrap(), pairs(&[("A", "1"), ("B", "2")]));
    }

    #[test]
    fn rejects_accumulated_partial_pair() {
        let mut acc = TextAccumulator::new(64);
        acc.push(b"A=1\0B=").unwrap();
        assert_eq!(acc.finish(), Err(PduError::InvalidField("text")));
    }

    proptest! {
        #[test]
        fn parse_inverts_encode(
            kv in proptest::collection::vec(("[A-Za-z][A-Za-z0-9.+@_-]{0,62}", "[ -~]{0,300}"), 0..8)
        ) {
            let enc = encode(&kv);
            prop_assert_eq!(parse(&enc).unwrap(), kv);
        }

        #[test]
        fn accumulator_is_chunking_invariant(
            kv in proptest::collection::vec(("[A-Z][a-z]{0,10}", "[a-z0-9]{0,20}"), 0..6),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..6),
        ) {
            let enc = encode(&kv);
            let mut points: Vec<usize> = cuts.iter().map(|i| i.index(enc.len() + 1)).collect();
            points.sort_unstable();
            let mut acc = TextAccumulator::new(enc.len());
            let mut start = 0;
            for p in points.into_iter().chain(std::iter::once(enc.len())) {
                acc.push(&enc[start..p]).unwrap();
                start = p;
            }
            prop_assert_eq!(acc.finish().unwrap(), kv);
        }

        #[test]
        fn parse_of_any_bytes_is_bounded_and_stable(
            data in proptest::collection::vec(prop_oneof![Just(0u8), Just(b'='), Just(b'A'), any::<u8>()], 0..512)
        ) {
            if let Ok(kv) = parse(&data) {
                for (k, v) in &kv {
                    prop_assert!(!k.is_empty() && k.len() <= MAX_KEY_LEN && v.len() <= MAX_VALUE_LEN);
                }
                prop_assert_eq!(parse(&encode(&kv)).unwrap(), kv);
            }
        }
    }
}
