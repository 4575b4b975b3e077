//! Parent locators and the parent name of a differencing disk (semantics.md §4.2): decoding,
//! validation against the file, encoding, and the candidate paths of the parent.
//!
//! Encodings: "W2ku" (absolute path) and "W2ru" (relative path) hold UTF-16 **little**-endian
//! text, as Windows writes them and libvhdi reads them; "MacX" holds a UTF-8 `file://` URL;
//! the header's parent name is UTF-16 **big**-endian (512 bytes, NUL padded). Everything here
//! is sans-IO except [`read_locators`], which reads the locator data through a [`Store`].

use std::path::{Path, PathBuf};

use super::header::{DynamicHeader, ParentLocator};
use super::store::Store;
use super::VhdError;

/// Platform code of a relative Windows path, UTF-16LE.
pub const W2RU: [u8; 4] = *b"W2ru";
/// Platform code of an absolute Windows path, UTF-16LE.
pub const W2KU: [u8; 4] = *b"W2ku";
/// Platform code of a Mac OS X file URL, UTF-8.
pub const MACX: [u8; 4] = *b"MacX";
/// Most bytes of locator data read: 32 Ki UTF-16 units, the longest Windows path. A local
/// bound so that a hostile length cannot make `open` allocate without limit.
pub const MAX_DATA_LEN: u32 = 64 << 10;
/// Bytes of the parent name field (§4.2 offset 64).
pub const NAME_LEN: usize = 512;

const SECTOR: u64 = 512;

/// One used locator entry, its data decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Locator {
    /// Entry number, 0..8.
    pub index: usize,
    pub entry: ParentLocator,
    /// The path or URL the data holds: W2ru, W2ku and MacX entries; `None` for other
    /// platforms (deprecated "Wi2r"/"Wi2k", "Mac " aliases), which are not followed.
    pub text: Option<String>,
}

impl Locator {
    /// The platform code as text ("W2ru", ...), for messages.
    pub fn platform(&self) -> String {
        String::from_utf8_lossy(&self.entry.platform_code).into_owned()
    }
}

fn err(index: usize, field: &'static str, reason: impl Into<String>) -> VhdError {
    VhdError::Locator {
        index,
        field,
        reason: reason.into(),
    }
}

/// Bytes reserved for the data of `entry`. The spec counts `data_space` in sectors, but some
/// Microsoft writers store bytes: values below 512 are taken as sectors, larger multiples of
/// 512 as bytes, anything else is refused (`None`).
pub fn space_bytes(entry: &ParentLocator) -> Option<u64> {
    let space = u64::from(entry.data_space);
    if space < SECTOR {
        Some(space * SECTOR)
    } else if space.is_multiple_of(SECTOR) {
        Some(space)
    } else {
        None
    }
}

/// Check one entry against a `file_len`-byte file. Returns the byte range its data occupies,
/// or `None` for an unused entry (platform code 0). Errors name the locator and the field.
pub fn check_entry(
    index: usize,
    entry: &ParentLocator,
    file_len: u64,
) -> Result<Option<std::ops::Range<u64>>, VhdError> {
    if entry.platform_code == [0; 4] {
        return Ok(None);
    }
    let space = space_bytes(entry).ok_or_else(|| {
        err(
            index,
            "data space",
            format!(
                "{} is neither a sector count below 512 nor a multiple of 512 bytes",
                entry.data_space
            ),
        )
    })?;
    let len = u64::from(entry.data_length);
    if entry.data_length > MAX_DATA_LEN {
        return Err(err(
            index,
            "data length",
            format!("{len} bytes exceed the limit of {MAX_DATA_LEN}"),
        ));
    }
    if len > space {
        return Err(err(
            index,
            "data length",
            format!("{len} bytes exceed the {space}-byte data space"),
        ));
    }
    let start = entry.data_offset;
    if start < SECTOR || !start.is_multiple_of(SECTOR) || start >= file_len {
        return Err(err(
            index,
            "data offset",
            format!("{start} is not a sector inside the {file_len}-byte file past the footer copy"),
        ));
    }
    let end = start
        .checked_add(len)
        .filter(|&e| e <= file_len)
        .ok_or_else(|| {
            err(
                index,
                "data length",
                format!("{len} bytes at {start} run past the {file_len}-byte file"),
            )
        })?;
    Ok(Some(start..end))
}

/// Decode the data of a locator with platform `code`: `Ok(None)` for platforms not followed.
pub fn decode_data(index: usize, code: [u8; 4], data: &[u8]) -> Result<Option<String>, VhdError> {
    match code {
        W2RU | W2KU => {
            if !data.len().is_multiple_of(2) {
                return Err(err(index, "data length", "odd length for UTF-16 text"));
            }
            let units: Vec<u16> = data
                .chunks_exact(2)
                .map(|c| {
                    u16::from_le_bytes([
                        c.first().copied().unwrap_or(0),
                        c.get(1).copied().unwrap_or(0),
                    ])
                })
                .collect();
            let text = utf16_text(&units).map_err(|r| err(index, "path", r))?;
            non_empty(index, text).map(Some)
        }
        MACX => {
            let text = std::str::from_utf8(data)
                .map_err(|e| err(index, "path", format!("not UTF-8: {e}")))?
                .trim_end_matches('\0');
            non_empty(index, text.to_owned()).map(Some)
        }
        _ => Ok(None),
    }
}

fn non_empty(index: usize, text: String) -> Result<String, VhdError> {
    if text.is_empty() {
        Err(err(index, "path", "empty"))
    } else {
        Ok(text)
    }
}

/// UTF-16 units up to the first NUL, as a string.
fn utf16_text(units: &[u16]) -> Result<String, String> {
    let end = units.iter().position(|&u| u == 0).unwrap_or(units.len());
    String::from_utf16(units.get(..end).unwrap_or_default())
        .map_err(|_| "invalid UTF-16 (unpaired surrogate)".to_owned())
}

/// The locator data for `text` on platform `code` (W2ru/W2ku: UTF-16LE without a
/// terminator; MacX: the bytes of the URL). Other platforms get UTF-8 bytes.
pub fn encode_data(code: [u8; 4], text: &str) -> Vec<u8> {
    match code {
        W2RU | W2KU => text.encode_utf16().flat_map(u16::to_le_bytes).collect(),
        _ => text.as_bytes().to_vec(),
    }
}

/// The parent name of the header (UTF-16BE, NUL padded); an empty name is `Ok("")`.
pub fn decode_name(name: &[u8; NAME_LEN]) -> Result<String, VhdError> {
    let units: Vec<u16> = name
        .chunks_exact(2)
        .map(|c| {
            u16::from_be_bytes([
                c.first().copied().unwrap_or(0),
                c.get(1).copied().unwrap_or(0),
            ])
        })
        .collect();
    utf16_text(&units).map_err(|reason| VhdError::Header {
        field: "parent_name",
        reason,
    })
}

/// The 512-byte parent name field for `name`: at most 256 UTF-16 units, no NUL.
pub fn encode_name(name: &str) -> Result<[u8; NAME_LEN], VhdError> {
    let mut out = [0u8; NAME_LEN];
    let units: Vec<u16> = name.encode_utf16().collect();
    if units.len() > NAME_LEN / 2 || units.contains(&0) {
        return Err(VhdError::Create {
            field: "parent name",
            reason: format!("{name:?} needs at most 256 UTF-16 units and no NUL"),
        });
    }
    for (dst, u) in out.chunks_exact_mut(2).zip(units) {
        dst.copy_from_slice(&u.to_be_bytes());
    }
    Ok(out)
}

/// A `file://` URL for an absolute path: bytes outside `A-Za-z0-9-._~/` percent-encoded.
pub fn file_url(path: &str) -> String {
    let mut url = String::from("file://");
    for b in path.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            url.push(char::from(b));
        } else {
            url.push_str(&format!("%{b:02X}"));
        }
    }
    url
}

/// The absolute path of a `file://` URL (optionally with host `localhost`), percent-decoded.
pub fn url_path(url: &str) -> Option<String> {
    let rest = url.strip_prefix("file://")?;
    let rest = rest.strip_prefix("localhost").unwrap_or(rest);
    if !rest.starts_with('/') {
        return None;
    }
    let bytes = rest.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let s = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(s, 16).ok()?);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Read, check and decode every used locator of `header` in a `file_len`-byte `store`.
/// Errors name the locator and field (a differencing disk with a corrupt locator is refused).
pub fn read_locators<S: Store + ?Sized>(
    store: &S,
    header: &DynamicHeader,
    file_len: u64,
) -> Result<Vec<Locator>, VhdError> {
    let mut out = Vec::new();
    for (index, entry) in header.parent_locators.iter().enumerate() {
        let Some(range) = check_entry(index, entry, file_len)? else {
            continue;
        };
        let n = usize::try_from(range.end - range.start)
            .map_err(|_| err(index, "data length", "too large"))?;
        let mut data = vec![0u8; n];
        store
            .read_exact_at(&mut data, range.start)
            .map_err(|source| VhdError::Io {
                op: "read parent locator",
                offset: range.start,
                source,
            })?;
        out.push(Locator {
            index,
            entry: *entry,
            text: decode_data(index, entry.platform_code, &data)?,
        });
    }
    Ok(out)
}

/// Byte ranges the used locators occupy (their data length, rounded up to a sector), for
/// keeping blocks off them. Entries must have passed [`check_entry`].
pub fn reserved_ranges(locators: &[Locator]) -> Vec<(u64, u64)> {
    locators
        .iter()
        .map(|l| {
            let start = l.entry.data_offset;
            let len = u64::from(l.entry.data_length).div_ceil(SECTOR) * SECTOR;
            (start, start.saturating_add(len.max(SECTOR)))
        })
        .collect()
}

/// A Windows or Unix path with `\` separators turned into `/`.
fn slashes(text: &str) -> String {
    text.replace('\\', "/")
}

/// Where to look for the parent, in order: each W2ru path relative to `child_dir` (either
/// separator, leading `.\` allowed), each W2ku path that is absolute here, each MacX URL, then
/// the parent `name` in `child_dir`. Each candidate is `(description, path)`; the description
/// names the locator for "not found" messages.
pub fn candidates(child_dir: &Path, locators: &[Locator], name: &str) -> Vec<(String, PathBuf)> {
    let mut out: Vec<(String, PathBuf)> = Vec::new();
    // A path named twice is tried once, under both descriptions.
    let mut push = |what: String, p: PathBuf| match out.iter_mut().find(|(_, q)| *q == p) {
        Some((w, _)) => {
            w.push_str(", ");
            w.push_str(&what);
        }
        None => out.push((what, p)),
    };
    let by = |code: [u8; 4]| {
        locators
            .iter()
            .filter(move |l| l.entry.platform_code == code)
    };
    for l in by(W2RU) {
        if let Some(t) = &l.text {
            let rel = slashes(t);
            let p = Path::new(&rel);
            let p = if p.is_absolute() {
                p.to_path_buf()
            } else {
                child_dir.join(p)
            };
            push(format!("locator {} W2ru {t:?}", l.index), p);
        }
    }
    for l in by(W2KU) {
        if let Some(t) = &l.text {
            for variant in [t.clone(), slashes(t)] {
                let p = PathBuf::from(&variant);
                if p.is_absolute() {
                    push(format!("locator {} W2ku {t:?}", l.index), p);
                }
            }
        }
    }
    for l in by(MACX) {
        if let Some(p) = l.text.as_deref().and_then(url_path) {
            push(
                format!(
                    "locator {} MacX {:?}",
                    l.index,
                    l.text.as_deref().unwrap_or("")
                ),
                PathBuf::from(p),
            );
        }
    }
    let base = slashes(name);
    if let Some(file) = Path::new(&base).file_name() {
        push(format!("parent name {name:?}"), child_dir.join(file));
    }
    out
}

/// The relative locator text for `target` seen from directory `from` (both absolute and
/// canonical), Windows style: `.\name` in the same directory, else `..\dir\name`. `None` when
/// a component is not UTF-8 or the paths share no root.
pub fn relative_text(from: &Path, target: &Path) -> Option<String> {
    use std::path::Component;
    let a: Vec<Component<'_>> = from.components().collect();
    let b: Vec<Component<'_>> = target.components().collect();
    if a.first() != b.first() {
        return None;
    }
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut parts: Vec<String> = Vec::new();
    for _ in common..a.len() {
        parts.push("..".to_owned());
    }
    for c in b.get(common..)? {
        match c {
            Component::Normal(s) => parts.push(s.to_str()?.to_owned()),
            _ => return None,
        }
    }
    if parts.is_empty() {
        return None;
    }
    let joined = parts.join("\\");
    Some(if joined.starts_with("..") {
        joined
    } else {
        format!(".\\{joined}")
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn loc(index: usize, code: [u8; 4], text: &str) -> Locator {
        Locator {
            index,
            entry: ParentLocator {
                platform_code: code,
                data_space: 1,
                data_length: 0,
                data_offset: 0,
            },
            text: Some(text.to_owned()),
        }
    }

    #[test]
    fn path_encodings_round_trip() {
        for code in [W2RU, W2KU, MACX] {
            for text in [
                ".\\base.vhd",
                "/tmp/dir/ü ñ/base.vhd",
                "C:\\VMs\\日本\\p.vhd",
            ] {
                let bytes = encode_data(code, text);
                assert_eq!(decode_data(3, code, &bytes).unwrap().as_deref(), Some(text));
            }
        }
        // UTF-16 little-endian, unterminated; a trailing NUL pad is tolerated.
        assert_eq!(encode_data(W2RU, ".\\a"), b".\0\\\0a\0");
        assert_eq!(
            decode_data(0, W2KU, b"/\0x\0\0\0\0\0").unwrap().as_deref(),
            Some("/x")
        );
        assert_eq!(decode_data(0, *b"Wi2r", b"x").unwrap(), None);
    }

    #[test]
    fn names_round_trip_big_endian() {
        let n = encode_name("bäse.vhd").unwrap();
        assert_eq!(&n[..4], &[0, b'b', 0, 0xe4]);
        assert_eq!(decode_name(&n).unwrap(), "bäse.vhd");
        assert_eq!(decode_name(&[0; NAME_LEN]).unwrap(), "");
        assert!(encode_name(&"x".repeat(257)).is_err());
        assert_eq!(
            decode_name(&encode_name(&"y".repeat(256)).unwrap())
                .unwrap()
                .len(),
            256
        );
        let mut bad = [0u8; NAME_LEN];
        bad[..2].copy_from_slice(&0xdc00u16.to_be_bytes());
        assert!(matches!(
            decode_name(&bad),
            Err(VhdError::Header {
                field: "parent_name",
                ..
            })
        ));
    }

    #[test]
    fn urls_round_trip() {
        let p = "/Users/a b/ü%.vhd";
        let url = file_url(p);
        assert_eq!(url, "file:///Users/a%20b/%C3%BC%25.vhd");
        assert_eq!(url_path(&url).as_deref(), Some(p));
        assert_eq!(
            url_path("file://localhost/x/y.vhd").as_deref(),
            Some("/x/y.vhd")
        );
        for bad in [
            "http://x/y",
            "file://host/x",
            "file:///x%4",
            "file:///%zz",
            "file:///%ff",
        ] {
            assert_eq!(url_path(bad), None, "{bad}");
        }
    }

    fn entry(space: u32, len: u32, offset: u64) -> ParentLocator {
        ParentLocator {
            platform_code: W2KU,
            data_space: space,
            data_length: len,
            data_offset: offset,
        }
    }

    #[test]
    fn entries_are_checked_against_the_file() {
        let len = 8192;
        assert_eq!(
            check_entry(0, &entry(1, 100, 4096), len).unwrap(),
            Some(4096..4196)
        );
        // data space in bytes (Microsoft) and in sectors (spec)
        assert_eq!(space_bytes(&entry(512, 0, 0)), Some(512));
        assert_eq!(space_bytes(&entry(2, 0, 0)), Some(1024));
        assert_eq!(space_bytes(&entry(1000, 0, 0)), None);
        let unused = ParentLocator::default();
        assert_eq!(check_entry(5, &unused, len).unwrap(), None);
        let cases = [
            (entry(1, 100, 8192), "data offset"),
            (entry(1, 100, 100), "data offset"),
            (entry(1, 100, 0), "data offset"),
            (entry(1, 100, u64::MAX - 511), "data offset"),
            (entry(1, 600, 4096), "data length"),
            (entry(16, 600, 7680), "data length"),
            (entry(511, MAX_DATA_LEN + 2, 512), "data length"),
            (entry(1000, 10, 512), "data space"),
        ];
        for (e, want) in cases {
            match check_entry(2, &e, len) {
                Err(VhdError::Locator {
                    index: 2, field, ..
                }) => assert_eq!(field, want, "{e:?}"),
                other => panic!("{e:?}: {other:?}"),
            }
        }
        let msg = check_entry(2, &entry(1, 10, 9000), len)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("parent locator 2 data offset"), "{msg}");
    }

    #[test]
    fn corrupt_data_is_refused_naming_the_field() {
        for (code, data, want) in [
            (W2RU, &b"a\0b"[..], "data length"),
            (W2KU, &[0x00, 0xd8, b'a', 0][..], "path"),
            (W2RU, &[0, 0][..], "path"),
            (MACX, &[0xff, 0xfe][..], "path"),
        ] {
            match decode_data(6, code, data) {
                Err(VhdError::Locator {
                    index: 6, field, ..
                }) => assert_eq!(field, want),
                other => panic!("{data:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn candidates_follow_the_resolution_order() {
        let dir = Path::new("/img/child");
        let locs = vec![
            loc(0, W2KU, "/abs/base.vhd"),
            loc(1, MACX, "file://localhost/mac/base.vhd"),
            loc(2, W2RU, ".\\..\\up\\base.vhd"),
            loc(3, W2KU, "C:\\win\\base.vhd"),
        ];
        let c: Vec<PathBuf> = candidates(dir, &locs, "base.vhd")
            .into_iter()
            .map(|(_, p)| p)
            .collect();
        assert_eq!(
            c,
            vec![
                PathBuf::from("/img/child/./../up/base.vhd"),
                PathBuf::from("/abs/base.vhd"),
                PathBuf::from("/mac/base.vhd"),
                PathBuf::from("/img/child/base.vhd"),
            ]
        );
        let only_name = candidates(dir, &[], "C:\\x\\p.vhd");
        assert_eq!(only_name.len(), 1);
        assert_eq!(only_name[0].1, PathBuf::from("/img/child/p.vhd"));
        assert!(candidates(dir, &[], "").is_empty());
    }

    #[test]
    fn relative_texts() {
        let r = |a: &str, b: &str| relative_text(Path::new(a), Path::new(b));
        assert_eq!(r("/a/b", "/a/b/p.vhd").as_deref(), Some(".\\p.vhd"));
        assert_eq!(r("/a/b", "/a/c/p.vhd").as_deref(), Some("..\\c\\p.vhd"));
        assert_eq!(r("/a/b", "/a/b/c/p.vhd").as_deref(), Some(".\\c\\p.vhd"));
        assert_eq!(r("/", "/p.vhd").as_deref(), Some(".\\p.vhd"));
        assert_eq!(r("/a/b/c", "/p.vhd").as_deref(), Some("..\\..\\..\\p.vhd"));
    }
}
