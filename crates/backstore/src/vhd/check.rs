//! `ironlun vhd check`: a read-only consistency check of a VHD image (semantics.md §4.1-§4.4).
//!
//! [`check_store`] reads the trailing footer, the footer copy, the dynamic header, the parent
//! locators and the BAT, and reports every problem it finds rather than stopping at the first
//! one as opening does. Findings fall in three classes, as `qemu-img check` reports them:
//!
//! - **errors**: corruptions. The image is unusable or would be served wrongly: a footer or
//!   header that fails its cookie/checksum/field checks, a footer copy at 0 that differs from
//!   the trailing footer, a BAT entry whose block (bitmap + data) runs past the file or overlaps
//!   another block or the metadata, a truncated data area.
//! - **warnings**: deviations readers tolerate (reserved feature bit clear, size not matching
//!   the geometry, a block allocated past the disk size, ...).
//! - **leaks**: file space no structure owns: between two blocks, or between the end of the
//!   last block (or of the metadata) and the trailing footer. A crash during block allocation
//!   leaves such space (ours after step 1 of the order in [`super::image`]; QEMU's after it
//!   overwrote the footer with the new bitmap). Space between the metadata and the first block
//!   is alignment padding some writers leave, not a leak.
//!
//! Every finding names its place: `footer.checksum`, `footer_copy.timestamp`,
//! `header.block_size`, `header.parent_locator[2]`, `bat[17]`, `file`.
//!
//! Only an I/O failure ends the check early (`Err`, "check could not be completed"). The check
//! never panics on any input: every offset from the file goes through checked arithmetic and
//! nothing is read past the length the store reports.

use std::fmt;
use std::fs::File;
use std::path::Path;

use super::bat::{self, MAX_BAT_ENTRIES, UNALLOCATED};
use super::footer::{DiskType, Footer, FEATURE_RESERVED, FOOTER_LEN, FOOTER_SIZE, NO_DATA_OFFSET};
use super::header::{DynamicHeader, HEADER_LEN, HEADER_SIZE};
use super::locator;
use super::store::Store;
use super::VhdError;

const SECTOR: u64 = 512;

/// One finding: where, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The structure and field or entry: `footer.checksum`, `bat[17]`, `file`, ...
    pub location: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.location, self.message)
    }
}

/// A run of file bytes no structure owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leak {
    pub offset: u64,
    pub len: u64,
}

/// Which footer the rest of the check trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FooterSource {
    /// The last 512 bytes of the file (the normal case).
    Trailing,
    /// The copy at offset 0: the trailing footer is invalid (dynamic/differencing disks only).
    Copy,
}

/// What [`check_store`] found. `errors`, `warnings` and `leaks` are in discovery order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CheckReport {
    pub file_size: u64,
    /// `None` when no valid footer was found.
    pub disk_type: Option<DiskType>,
    pub footer_source: Option<FooterSource>,
    /// The footer trusted (see `footer_source`).
    pub footer: Option<Footer>,
    /// The dynamic header, when it parsed.
    pub header: Option<DynamicHeader>,
    /// Size served by QEMU's rule (§4.5), when the footer allows one.
    pub virtual_size: Option<u64>,
    /// Dynamic and differencing disks, once the header parsed.
    pub block_size: Option<u32>,
    /// BAT entries (0 for fixed disks).
    pub total_blocks: u32,
    /// BAT entries other than unallocated, valid or not.
    pub allocated_blocks: u32,
    pub errors: Vec<Problem>,
    pub warnings: Vec<Problem>,
    pub leaks: Vec<Leak>,
}

impl CheckReport {
    /// Total bytes of `leaks`.
    pub fn leaked_bytes(&self) -> u64 {
        self.leaks
            .iter()
            .fold(0u64, |acc, l| acc.saturating_add(l.len))
    }

    /// No errors and no leaks (warnings allowed).
    pub fn is_clean(&self) -> bool {
        self.errors.is_empty() && self.leaks.is_empty()
    }

    fn error(&mut self, location: impl Into<String>, message: impl Into<String>) {
        self.errors.push(Problem {
            location: location.into(),
            message: message.into(),
        });
    }

    fn warning(&mut self, location: impl Into<String>, message: impl Into<String>) {
        self.warnings.push(Problem {
            location: location.into(),
            message: message.into(),
        });
    }

    fn leak(&mut self, offset: u64, len: u64) {
        if len > 0 {
            self.leaks.push(Leak { offset, len });
        }
    }
}

/// Check the image at `path`, opened read-only. `Err` only when it cannot be opened or read.
pub fn check_path(path: impl AsRef<Path>) -> Result<CheckReport, VhdError> {
    let file = File::open(path).map_err(|source| VhdError::Io {
        op: "open",
        offset: 0,
        source,
    })?;
    check_store(&file)
}

/// Check the image held by `store` without writing to it (module documentation).
/// `Err` only when the store fails a read (the check could not be completed).
pub fn check_store<S: Store + ?Sized>(store: &S) -> Result<CheckReport, VhdError> {
    let len = store.len().map_err(|source| VhdError::Io {
        op: "length",
        offset: 0,
        source,
    })?;
    let mut c = Checker {
        store,
        len,
        report: CheckReport {
            file_size: len,
            ..CheckReport::default()
        },
    };
    c.run()?;
    Ok(c.report)
}

/// The location and message of a parse error, with `prefix` for footer fields.
fn problem_of(prefix: &str, e: &VhdError) -> (String, String) {
    match e {
        VhdError::Footer { field, reason } => (format!("{prefix}.{field}"), reason.clone()),
        VhdError::Header { field, reason } => (format!("header.{field}"), reason.clone()),
        VhdError::Bat { index, reason } => (format!("bat[{index}]"), reason.clone()),
        VhdError::Locator {
            index,
            field,
            reason,
        } => (
            format!("header.parent_locator[{index}].{}", field.replace(' ', "_")),
            reason.clone(),
        ),
        other => ("file".to_owned(), other.to_string()),
    }
}

/// Names of the fields in which two footers differ.
fn footer_diff(a: &Footer, b: &Footer) -> Vec<&'static str> {
    let fields: [(&'static str, bool); 13] = [
        ("features", a.features == b.features),
        ("format_version", a.format_version == b.format_version),
        ("data_offset", a.data_offset == b.data_offset),
        ("timestamp", a.timestamp == b.timestamp),
        ("creator_app", a.creator_app == b.creator_app),
        ("creator_version", a.creator_version == b.creator_version),
        ("creator_os", a.creator_os == b.creator_os),
        ("original_size", a.original_size == b.original_size),
        ("current_size", a.current_size == b.current_size),
        ("geometry", a.geometry == b.geometry),
        ("disk_type", a.disk_type == b.disk_type),
        ("unique_id", a.unique_id == b.unique_id),
        ("saved_state", a.saved_state == b.saved_state),
    ];
    fields
        .iter()
        .filter(|(_, same)| !same)
        .map(|(name, _)| *name)
        .collect()
}

fn round_up_sector(n: u64) -> Option<u64> {
    n.checked_add(SECTOR - 1).map(|x| x / SECTOR * SECTOR)
}

/// A metadata range blocks must not overlap.
struct Range {
    start: u64,
    end: u64,
    name: String,
}

struct Checker<'s, S: ?Sized> {
    store: &'s S,
    len: u64,
    report: CheckReport,
}

impl<S: Store + ?Sized> Checker<'_, S> {
    /// Read `n` bytes at `at`; callers have checked `at + n <= len`.
    fn read(&self, at: u64, n: usize, op: &'static str) -> Result<Vec<u8>, VhdError> {
        let mut buf = vec![0u8; n];
        self.store
            .read_exact_at(&mut buf, at)
            .map_err(|source| VhdError::Io {
                op,
                offset: at,
                source,
            })?;
        Ok(buf)
    }

    fn run(&mut self) -> Result<(), VhdError> {
        let len = self.len;
        if len < FOOTER_LEN {
            self.report
                .error("file", format!("{len} bytes, shorter than a footer"));
            return Ok(());
        }
        if !len.is_multiple_of(SECTOR) {
            self.report
                .warning("file", format!("length {len} is not a multiple of 512"));
        }
        let tail = self.read(len - FOOTER_LEN, FOOTER_SIZE, "read footer")?;
        let head = self.read(0, FOOTER_SIZE, "read footer copy")?;
        let head_footer = Footer::parse(&head);
        let (footer, source) = match Footer::parse(&tail) {
            Ok(f) => (f, FooterSource::Trailing),
            Err(e) => {
                let (loc, msg) = problem_of("footer", &e);
                match &head_footer {
                    Ok(f) if f.disk_type != DiskType::Fixed => {
                        self.report.error(
                            loc,
                            format!("{msg} (trailing footer; continuing with the copy at 0)"),
                        );
                        (f.clone(), FooterSource::Copy)
                    }
                    _ => {
                        self.report.error(loc, msg);
                        return Ok(());
                    }
                }
            }
        };
        self.report.disk_type = Some(footer.disk_type);
        self.report.footer_source = Some(source);
        self.report.footer = Some(footer.clone());
        self.footer_fields(&footer);
        let size = match footer.disk_size() {
            Ok(s) => {
                self.report.virtual_size = Some(s);
                Some(s)
            }
            Err(e) => {
                let (loc, msg) = problem_of("footer", &e);
                self.report.error(loc, msg);
                None
            }
        };
        match footer.disk_type {
            DiskType::Fixed => {
                self.fixed(&footer, size);
                Ok(())
            }
            DiskType::Dynamic | DiskType::Differencing => {
                if source == FooterSource::Trailing && head != tail {
                    match &head_footer {
                        Err(e) => {
                            let (loc, msg) = problem_of("footer_copy", e);
                            self.report.error(loc, msg);
                        }
                        Ok(h) => {
                            let diff = footer_diff(h, &footer);
                            let what = if diff.is_empty() {
                                "reserved bytes".to_owned()
                            } else {
                                diff.join(", ")
                            };
                            self.report.error(
                                "footer_copy",
                                format!("differs from the trailing footer in {what}"),
                            );
                        }
                    }
                }
                self.dynamic(&footer, size, source)
            }
        }
    }

    /// Footer checks past parsing (§4.1, §4.5).
    fn footer_fields(&mut self, f: &Footer) {
        if f.features & FEATURE_RESERVED == 0 {
            self.report
                .warning("footer.features", "reserved bit 0x2 is not set");
        }
        if f.saved_state {
            self.report
                .warning("footer.saved_state", "set: the image holds a saved state");
        }
        if !f.current_size.is_multiple_of(SECTOR) {
            self.report.warning(
                "footer.current_size",
                format!("{} is not a multiple of 512", f.current_size),
            );
        }
        if !f.sized_by_current_size() {
            let chs = f.geometry.total_sectors().saturating_mul(SECTOR);
            if chs != f.current_size {
                self.report.warning(
                    "footer.geometry",
                    format!(
                        "{}/{}/{} addresses {chs} bytes but current_size is {}; \
                         the disk is served with {chs}",
                        f.geometry.cylinders, f.geometry.heads, f.geometry.sectors, f.current_size
                    ),
                );
            }
        }
        if f.unique_id == [0; 16] {
            self.report.warning("footer.unique_id", "all zero");
        }
        if f.disk_size().is_ok_and(|s| s == 0) {
            self.report
                .warning("footer.current_size", "the disk has no sector");
        }
    }

    /// Fixed disk: the data area and the footer (§4.3).
    fn fixed(&mut self, f: &Footer, size: Option<u64>) {
        if f.data_offset != NO_DATA_OFFSET {
            self.report.warning(
                "footer.data_offset",
                format!("{:#x} on a fixed disk, want all ones", f.data_offset),
            );
        }
        let data_end = self.len - FOOTER_LEN;
        if let Some(size) = size {
            if size > data_end {
                self.report.error(
                    "file",
                    format!(
                        "fixed data area of {size} bytes does not fit the {data_end} bytes \
                         before the footer (truncated)"
                    ),
                );
                return;
            }
        }
        if data_end != f.current_size && f.current_size.is_multiple_of(SECTOR) {
            self.report.warning(
                "file",
                format!(
                    "{data_end} bytes before the footer, current_size is {}",
                    f.current_size
                ),
            );
        }
    }

    /// Dynamic and differencing disks: header, locators, BAT, blocks, leaks (§4.2-§4.4).
    fn dynamic(
        &mut self,
        f: &Footer,
        size: Option<u64>,
        source: FooterSource,
    ) -> Result<(), VhdError> {
        let len = self.len;
        let header_at = f.data_offset;
        let Some(header_end) = header_at
            .checked_add(HEADER_LEN)
            .filter(|&end| end <= len && header_at >= FOOTER_LEN)
        else {
            self.report.error(
                "footer.data_offset",
                format!("dynamic header at {header_at} is outside the {len}-byte file"),
            );
            return Ok(());
        };
        if !header_at.is_multiple_of(SECTOR) {
            self.report.warning(
                "footer.data_offset",
                format!("{header_at} is not sector aligned"),
            );
        }
        let hb = self.read(header_at, HEADER_SIZE, "read dynamic header")?;
        if super::field::<8>(&hb, 8) != Some([0xff; 8]) {
            self.report
                .warning("header.data_offset", "not all ones (unused field)");
        }
        let header = match DynamicHeader::parse(&hb) {
            Ok(h) => h,
            Err(e) => {
                let (loc, msg) = problem_of("header", &e);
                self.report.error(loc, msg);
                return Ok(());
            }
        };
        self.report.header = Some(header.clone());
        let entries = header.max_table_entries;
        self.report.block_size = Some(header.block_size);
        self.report.total_blocks = entries;
        if entries > MAX_BAT_ENTRIES {
            self.report.error(
                "header.max_table_entries",
                format!("{entries} exceeds the limit of {MAX_BAT_ENTRIES}"),
            );
            return Ok(());
        }
        let block_size = u64::from(header.block_size);
        if let Some(size) = size {
            if u64::from(entries).saturating_mul(block_size) < size {
                self.report.error(
                    "header.max_table_entries",
                    format!("{entries} blocks of {block_size} bytes cannot hold {size} bytes"),
                );
            }
        }
        let table_at = header.table_offset;
        let table_len = u64::from(entries) * bat::ENTRY_LEN;
        let Some(table_end) = table_at.checked_add(table_len).filter(|&e| e <= len) else {
            self.report.error(
                "header.table_offset",
                format!("BAT of {table_len} bytes at {table_at} runs past the {len}-byte file"),
            );
            return Ok(());
        };
        if !table_at.is_multiple_of(SECTOR) {
            self.report.warning(
                "header.table_offset",
                format!("{table_at} is not sector aligned"),
            );
        }
        let table_padded = round_up_sector(table_end).unwrap_or(table_end);
        if table_at < header_end && header_at < table_end {
            self.report
                .error("header.table_offset", "BAT overlaps the dynamic header");
        }
        if table_at < FOOTER_LEN {
            self.report
                .error("header.table_offset", "BAT overlaps the footer copy at 0");
        }
        let mut meta = vec![
            Range {
                start: 0,
                end: FOOTER_LEN,
                name: "footer copy".to_owned(),
            },
            Range {
                start: header_at,
                end: header_end,
                name: "dynamic header".to_owned(),
            },
            Range {
                start: table_at,
                end: table_padded,
                name: "BAT".to_owned(),
            },
        ];
        self.locators(f, &header, &mut meta)?;
        let meta_end = meta.iter().map(|r| r.end).max().unwrap_or(0);
        if source == FooterSource::Trailing {
            meta.push(Range {
                start: len - FOOTER_LEN,
                end: len,
                name: "trailing footer".to_owned(),
            });
        }
        let raw_len = usize::try_from(table_len).map_err(|_| VhdError::File {
            reason: "BAT does not fit memory".to_owned(),
        })?;
        let raw = self.read(table_at, raw_len, "read BAT")?;
        let table = bat::decode(&raw);
        self.blocks(&table, &header, size, &meta, meta_end, source);
        Ok(())
    }

    /// Parent locators (§4.2 offset 576): in the file, clear of the other metadata; their
    /// data ranges join `meta`.
    fn locators(
        &mut self,
        f: &Footer,
        h: &DynamicHeader,
        meta: &mut Vec<Range>,
    ) -> Result<(), VhdError> {
        let len = self.len;
        let differencing = f.disk_type == DiskType::Differencing;
        let mut used = 0usize;
        for (i, entry) in h.parent_locators.iter().enumerate() {
            let at = format!("header.parent_locator[{i}]");
            let range = match locator::check_entry(i, entry, len) {
                Ok(None) => continue,
                Ok(Some(r)) => r,
                Err(e) => {
                    used += 1;
                    let (loc, msg) = problem_of("footer", &e);
                    self.report.error(loc, msg);
                    continue;
                }
            };
            used += 1;
            if !differencing {
                self.report
                    .warning(at.clone(), "set on a disk that is not differencing");
            }
            let code = entry.platform_code;
            if !matches!(
                &code,
                b"W2ru" | b"W2ku" | b"MacX" | b"Mac " | b"Wi2r" | b"Wi2k"
            ) {
                self.report.warning(
                    at.clone(),
                    format!("unknown platform code {:?}", String::from_utf8_lossy(&code)),
                );
            }
            let (start, end) = (range.start, range.end);
            if start == end {
                self.report.warning(at.clone(), "empty locator data");
            }
            // check_entry bounds the length (64 KiB) and keeps it inside the file.
            let n = usize::try_from(end - start).unwrap_or(0);
            let data = self.read(start, n, "read parent locator")?;
            if let Err(e) = locator::decode_data(i, code, &data) {
                let (loc, msg) = problem_of("footer", &e);
                self.report.error(loc, msg);
            }
            for r in meta.iter() {
                if start < r.end && r.start < end {
                    self.report.error(
                        at.clone(),
                        format!("data {start}..{end} overlaps the {}", r.name),
                    );
                }
            }
            // As opening does: the data rounded up to a sector, at least one.
            let reserved_end = round_up_sector(end)
                .unwrap_or(end)
                .max(start.saturating_add(SECTOR));
            meta.push(Range {
                start,
                end: reserved_end,
                name: format!("parent locator {i}"),
            });
        }
        if differencing {
            if h.parent_unique_id == [0; 16] {
                self.report.warning("header.parent_unique_id", "all zero");
            }
            if h.parent_name.iter().all(|&b| b == 0) {
                self.report.warning("header.parent_name", "empty");
            }
            if used == 0 {
                self.report.warning(
                    "header.parent_locator",
                    "no locator names the parent's path",
                );
            }
        }
        Ok(())
    }

    /// BAT entries: inside the file, clear of the metadata and of each other; then leaks.
    fn blocks(
        &mut self,
        table: &[u32],
        h: &DynamicHeader,
        size: Option<u64>,
        meta: &[Range],
        meta_end: u64,
        source: FooterSource,
    ) {
        let len = self.len;
        let block_size = u64::from(h.block_size);
        let span = h.bitmap_size().saturating_add(block_size);
        let mut blocks: Vec<(u64, u64, usize)> = Vec::new();
        let mut allocated = 0u32;
        for (i, &entry) in table.iter().enumerate() {
            if entry == UNALLOCATED {
                continue;
            }
            allocated = allocated.saturating_add(1);
            let at = format!("bat[{i}]");
            let start = u64::from(entry) * SECTOR;
            let Some(end) = start.checked_add(span) else {
                self.report.error(at, "block end overflows");
                continue;
            };
            if let Some(size) = size {
                let first_byte = u64::try_from(i)
                    .unwrap_or(u64::MAX)
                    .saturating_mul(block_size);
                if first_byte >= size {
                    self.report.warning(
                        at.clone(),
                        format!("allocated block lies past the {size}-byte disk"),
                    );
                }
            }
            if end > len {
                self.report.error(
                    at,
                    format!(
                        "block {start}..{end} (bitmap {} + data {block_size} bytes) runs past \
                         the {len}-byte file (truncated)",
                        h.bitmap_size()
                    ),
                );
                continue;
            }
            let mut clear = true;
            for r in meta {
                if start < r.end && r.start < end {
                    self.report.error(
                        at.clone(),
                        format!("block {start}..{end} overlaps the {}", r.name),
                    );
                    clear = false;
                }
            }
            if clear {
                blocks.push((start, end, i));
            }
        }
        self.report.allocated_blocks = allocated;
        blocks.sort_unstable();
        // Overlaps: each block against the furthest-reaching block before it.
        let mut reach: Option<(u64, usize)> = None;
        for &(start, end, i) in &blocks {
            if let Some((r_end, j)) = reach {
                if start < r_end {
                    self.report.error(
                        format!("bat[{i}]"),
                        format!("block {start}..{end} overlaps the block of bat[{j}]"),
                    );
                }
            }
            if reach.is_none_or(|(r_end, _)| end > r_end) {
                reach = Some((end, i));
            }
        }
        // Leaks: gaps between blocks, then the tail up to the trailing footer.
        let mut cursor: Option<u64> = None;
        for &(start, end, _) in &blocks {
            if let Some(c) = cursor {
                if start > c {
                    self.report.leak(c, start - c);
                }
            }
            cursor = Some(cursor.map_or(end, |c| c.max(end)));
        }
        let data_end = cursor.map_or(meta_end, |c| c.max(meta_end));
        let file_data_end = match source {
            FooterSource::Trailing => len - FOOTER_LEN,
            FooterSource::Copy => len,
        };
        if data_end < file_data_end {
            self.report.leak(data_end, file_data_end - data_end);
        }
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::cast_possible_truncation
)]
mod tests {
    use super::super::footer::checksum;
    use super::super::image::{format_differencing, format_dynamic, format_fixed, CreateOptions};
    use super::super::store::MemStore;
    use super::*;
    use crate::BlockBackend;
    use proptest::prelude::*;
    use std::sync::Arc;

    const MIB: u64 = 1 << 20;

    fn opts(force_size: bool, block_size: u32) -> CreateOptions {
        CreateOptions {
            force_size,
            block_size,
            timestamp: 0x329b_10ad,
            unique_id: [7; 16],
        }
    }

    /// A dynamic image of `size` with `block` blocks and blocks 0 and 2 written.
    fn dynamic_bytes(size: u64, block: u32) -> Vec<u8> {
        let b = format_dynamic(MemStore::default(), size, &opts(true, block)).unwrap();
        b.write(0, &[0xAB; 4096], false).unwrap();
        b.write(2 * u64::from(block) + 512, &[0xCD; 512], false)
            .unwrap();
        b.store().bytes()
    }

    fn check(bytes: Vec<u8>) -> CheckReport {
        check_store(&MemStore::new(bytes)).unwrap()
    }

    fn locations(p: &[Problem]) -> Vec<&str> {
        p.iter().map(|p| p.location.as_str()).collect()
    }

    fn has(p: &[Problem], location: &str, needle: &str) -> bool {
        p.iter()
            .any(|p| p.location == location && p.message.contains(needle))
    }

    /// Put `v` at `at` of the BAT at 1536 (where `format_dynamic` puts it).
    fn set_bat(b: &mut [u8], index: usize, v: u32) {
        let at = 1536 + 4 * index;
        b[at..at + 4].copy_from_slice(&v.to_be_bytes());
    }

    fn bat_entry(b: &[u8], index: usize) -> u32 {
        let at = 1536 + 4 * index;
        u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
    }

    fn refresh_checksum(b: &mut [u8], start: usize, len: usize, at: usize) {
        let sum = checksum(&b[start..start + len], at);
        b[start + at..start + at + 4].copy_from_slice(&sum.to_be_bytes());
    }

    #[test]
    fn clean_dynamic_image() {
        for block in [512u32, 64 << 10, 2 << 20, 4 << 20] {
            let size = 16 * MIB;
            let r = check(dynamic_bytes(size, block));
            assert!(r.errors.is_empty(), "{block}: {:?}", r.errors);
            assert!(r.warnings.is_empty(), "{block}: {:?}", r.warnings);
            assert!(r.leaks.is_empty(), "{block}: {:?}", r.leaks);
            assert!(r.is_clean());
            assert_eq!(r.disk_type, Some(DiskType::Dynamic));
            assert_eq!(r.footer_source, Some(FooterSource::Trailing));
            assert_eq!(r.virtual_size, Some(size));
            assert_eq!(r.block_size, Some(block));
            assert_eq!(u64::from(r.total_blocks), size / u64::from(block));
            // 4096 bytes at 0 span 8 blocks of 512 bytes (the second write lands in one of
            // them), else one block, plus block 2.
            let want = if block == 512 { 8 } else { 2 };
            assert_eq!(r.allocated_blocks, want, "{block}");
        }
    }

    #[test]
    fn clean_fixed_image_and_chs_rounded_sizes() {
        for (force, size) in [(true, 8 * MIB), (false, 8 * MIB), (false, 64 * MIB)] {
            let b = format_fixed(MemStore::default(), size, &opts(force, 0)).unwrap();
            b.write(4096, &[1; 512], true).unwrap();
            let served = b.size();
            let r = check(b.store().bytes());
            assert!(r.is_clean() && r.warnings.is_empty(), "{r:?}");
            assert_eq!(r.disk_type, Some(DiskType::Fixed));
            assert_eq!(r.virtual_size, Some(served));
            assert_eq!((r.total_blocks, r.allocated_blocks), (0, 0));
        }
        let r = check(dynamic_bytes_chs());
        assert!(r.is_clean() && r.warnings.is_empty(), "{r:?}");
    }

    fn dynamic_bytes_chs() -> Vec<u8> {
        let b = format_dynamic(MemStore::default(), 64 * MIB, &opts(false, 2 << 20)).unwrap();
        b.write(MIB, &[9; 512], false).unwrap();
        b.store().bytes()
    }

    #[test]
    fn trailing_footer_checksum_and_cookie() {
        let clean = dynamic_bytes(4 * MIB, 64 << 10);
        let n = clean.len();
        let mut b = clean.clone();
        b[n - 512 + 100] ^= 1;
        let r = check(b);
        assert!(has(&r.errors, "footer.checksum", "copy at 0"), "{r:?}");
        assert_eq!(r.footer_source, Some(FooterSource::Copy));
        // The rest of the image was still checked through the copy.
        assert_eq!(r.allocated_blocks, 2);

        let mut b = clean.clone();
        b[n - 512..n - 504].copy_from_slice(b"conectiy");
        let r = check(b);
        assert!(has(&r.errors, "footer.cookie", ""), "{r:?}");

        // A fixed disk has no copy to fall back on.
        let f = format_fixed(MemStore::default(), MIB, &opts(true, 0)).unwrap();
        let mut b = f.store().bytes();
        let n = b.len();
        b[n - 512 + 64] ^= 0xff;
        let r = check(b);
        assert_eq!(locations(&r.errors), vec!["footer.checksum"]);
        assert_eq!(r.disk_type, None);
    }

    #[test]
    fn footer_copy_must_match() {
        let clean = dynamic_bytes(4 * MIB, 64 << 10);
        let mut b = clean.clone();
        b[3] ^= 1;
        let r = check(b);
        assert_eq!(locations(&r.errors), vec!["footer_copy.cookie"], "{r:?}");

        let mut b = clean.clone();
        b[24..28].copy_from_slice(&1u32.to_be_bytes());
        refresh_checksum(&mut b, 0, 512, 64);
        let r = check(b);
        assert!(has(&r.errors, "footer_copy", "timestamp"), "{r:?}");
        assert_eq!(r.errors.len(), 1);

        let mut b = clean;
        b[300] = 1;
        refresh_checksum(&mut b, 0, 512, 64);
        let r = check(b);
        assert!(has(&r.errors, "footer_copy", "reserved bytes"), "{r:?}");
    }

    #[test]
    fn header_problems() {
        let clean = dynamic_bytes(4 * MIB, 64 << 10);
        let mut b = clean.clone();
        b[512 + 200] ^= 1;
        let r = check(b);
        assert_eq!(locations(&r.errors), vec!["header.checksum"], "{r:?}");

        // Block size not a power of two, checksum refreshed.
        let mut b = clean.clone();
        b[512 + 32..512 + 36].copy_from_slice(&3000u32.to_be_bytes());
        refresh_checksum(&mut b, 512, 1024, 36);
        let r = check(b);
        assert_eq!(locations(&r.errors), vec!["header.block_size"], "{r:?}");

        // Too few entries for the disk.
        let mut b = clean.clone();
        b[512 + 28..512 + 32].copy_from_slice(&2u32.to_be_bytes());
        refresh_checksum(&mut b, 512, 1024, 36);
        let r = check(b);
        assert!(
            has(&r.errors, "header.max_table_entries", "cannot hold"),
            "{r:?}"
        );

        // BAT past the end of the file.
        let mut b = clean.clone();
        b[512 + 16..512 + 24].copy_from_slice(&(u64::MAX - 3).to_be_bytes());
        refresh_checksum(&mut b, 512, 1024, 36);
        let r = check(b);
        assert!(has(&r.errors, "header.table_offset", "runs past"), "{r:?}");

        // BAT over the header.
        let mut b = clean.clone();
        b[512 + 16..512 + 24].copy_from_slice(&1024u64.to_be_bytes());
        refresh_checksum(&mut b, 512, 1024, 36);
        let r = check(b);
        assert!(
            has(&r.errors, "header.table_offset", "dynamic header"),
            "{r:?}"
        );

        // Header outside the file (same change in both footers).
        let mut b = clean;
        let n = b.len();
        for at in [0, n - 512] {
            b[at + 16..at + 24].copy_from_slice(&(n as u64).to_be_bytes());
            refresh_checksum(&mut b, at, 512, 64);
        }
        let r = check(b);
        assert_eq!(locations(&r.errors), vec!["footer.data_offset"], "{r:?}");
    }

    #[test]
    fn bat_entry_past_the_file() {
        let mut b = dynamic_bytes(4 * MIB, 64 << 10);
        set_bat(&mut b, 5, 0x00FF_0000);
        let r = check(b);
        assert!(has(&r.errors, "bat[5]", "runs past"), "{r:?}");
        assert_eq!(r.allocated_blocks, 3);
    }

    #[test]
    fn overlapping_blocks() {
        let mut b = dynamic_bytes(4 * MIB, 64 << 10);
        let first = bat_entry(&b, 0);
        set_bat(&mut b, 7, first + 1);
        let r = check(b);
        assert!(
            has(&r.errors, "bat[7]", "overlaps the block of bat[0]"),
            "{r:?}"
        );
        // A block contained in a bigger one's range after another block.
        let mut b = dynamic_bytes(4 * MIB, 64 << 10);
        let second = bat_entry(&b, 2);
        set_bat(&mut b, 9, second);
        let r = check(b);
        assert!(
            has(&r.errors, "bat[9]", "bat[2]") || has(&r.errors, "bat[2]", "bat[9]"),
            "{r:?}"
        );
    }

    #[test]
    fn blocks_over_metadata() {
        for (sector, what) in [(0u32, "footer copy"), (1, "dynamic header"), (3, "BAT")] {
            let mut b = dynamic_bytes(4 * MIB, 64 << 10);
            set_bat(&mut b, 4, sector);
            let r = check(b);
            assert!(has(&r.errors, "bat[4]", what), "{what}: {r:?}");
        }
        // The last block over the trailing footer.
        let mut b = dynamic_bytes(4 * MIB, 64 << 10);
        let n = b.len() as u64;
        let sector = u32::try_from((n - 512 - (64 << 10)) / 512).unwrap();
        set_bat(&mut b, 4, sector);
        let r = check(b);
        assert!(has(&r.errors, "bat[4]", "trailing footer"), "{r:?}");
    }

    #[test]
    fn truncated_file() {
        let clean = dynamic_bytes(4 * MIB, 64 << 10);
        let mut b = clean.clone();
        b.truncate(clean.len() - 4096);
        let r = check(b);
        // The trailing footer went with the cut; the copy at 0 finds the block cut short.
        assert!(has(&r.errors, "footer.cookie", "") || has(&r.errors, "footer.checksum", ""));
        assert!(
            r.errors.iter().any(|p| p.message.contains("truncated")),
            "{r:?}"
        );

        // Cut and the footer re-appended: only the block is reported.
        let mut b = clean.clone();
        let footer = clean[clean.len() - 512..].to_vec();
        b.truncate(clean.len() - 4096);
        b.extend_from_slice(&footer);
        let r = check(b);
        assert_eq!(r.errors.len(), 1, "{r:?}");
        assert!(r.errors[0].location.starts_with("bat["), "{r:?}");

        // Fixed: the data area no longer fits.
        let f = format_fixed(MemStore::default(), MIB, &opts(true, 0)).unwrap();
        let whole = f.store().bytes();
        let mut b = whole[..whole.len() - 512 - 4096].to_vec();
        b.extend_from_slice(&whole[whole.len() - 512..]);
        let r = check(b);
        assert!(has(&r.errors, "file", "does not fit"), "{r:?}");

        let r = check(vec![0; 100]);
        assert!(has(&r.errors, "file", "shorter than a footer"), "{r:?}");
    }

    /// Our allocation order interrupted after step 1: a footer past the new block, nothing else.
    #[test]
    fn leak_after_interrupted_allocation() {
        let clean = dynamic_bytes(4 * MIB, 64 << 10);
        let n = clean.len();
        let footer = clean[n - 512..].to_vec();
        let span = 512 + (64 << 10);
        let mut b = clean.clone();
        b.resize(n - 512 + span, 0);
        b.extend_from_slice(&footer);
        let r = check(b);
        assert!(r.errors.is_empty(), "{r:?}");
        assert_eq!(
            r.leaks,
            vec![Leak {
                offset: (n - 512) as u64,
                len: span as u64
            }]
        );
        assert_eq!(r.leaked_bytes(), span as u64);
        assert!(!r.is_clean());

        // QEMU's order interrupted: the new bitmap overwrote the footer, no footer at the end.
        let mut b = clean.clone();
        b[n - 512..].fill(0xff);
        let r = check(b);
        assert_eq!(locations(&r.errors), vec!["footer.cookie"], "{r:?}");
        assert_eq!(r.footer_source, Some(FooterSource::Copy));
        assert_eq!(r.leaked_bytes(), 512);

        // A gap between blocks nobody owns: move the block of entry 2 one span further.
        let mut b = clean;
        let e2 = bat_entry(&b, 2);
        let start = e2 as usize * 512;
        let block = b[start..start + span].to_vec();
        let tail = b[start + span..].to_vec();
        b.truncate(start);
        b.resize(start + span, 0);
        b.extend_from_slice(&block);
        b.extend_from_slice(&tail);
        set_bat(&mut b, 2, e2 + (span / 512) as u32);
        let r = check(b);
        assert!(r.errors.is_empty(), "{r:?}");
        assert_eq!(
            r.leaks,
            vec![Leak {
                offset: start as u64,
                len: span as u64
            }]
        );
    }

    #[test]
    fn footer_warnings() {
        let mut b = dynamic_bytes(4 * MIB, 64 << 10);
        let n = b.len();
        for at in [0, n - 512] {
            b[at + 11] = 0; // features: reserved bit clear
            b[at + 68..at + 84].fill(0); // unique id
            refresh_checksum(&mut b, at, 512, 64);
        }
        let r = check(b);
        assert!(r.errors.is_empty(), "{r:?}");
        assert_eq!(
            locations(&r.warnings),
            vec!["footer.features", "footer.unique_id"]
        );

        // CHS-sized creator whose geometry disagrees with current_size.
        let mut b = dynamic_bytes_chs();
        let n = b.len();
        for at in [0, n - 512] {
            b[at + 48..at + 56].copy_from_slice(&(80 * MIB).to_be_bytes());
            refresh_checksum(&mut b, at, 512, 64);
        }
        let r = check(b);
        assert!(r.errors.is_empty(), "{r:?}");
        assert!(has(&r.warnings, "footer.geometry", "served with"), "{r:?}");
    }

    #[test]
    fn parent_locators() {
        let clean = dynamic_bytes(4 * MIB, 64 << 10);
        let header_of = |b: &[u8]| DynamicHeader::parse(&b[512..1536]).unwrap();
        let with = |index: usize, space: u32, len: u32, offset: u64| {
            let mut b = clean.clone();
            let mut h = header_of(&b);
            h.parent_locators[index].platform_code = *b"W2ku";
            h.parent_locators[index].data_space = space;
            h.parent_locators[index].data_length = len;
            h.parent_locators[index].data_offset = offset;
            b[512..1536].copy_from_slice(&h.encode());
            check(b)
        };

        // Data past the end of the file, on a dynamic disk.
        let r = with(2, 1, 40, clean.len() as u64);
        assert!(
            has(&r.errors, "header.parent_locator[2].data_offset", "inside"),
            "{r:?}"
        );
        // More data than the reserved space.
        let r = with(0, 1, 1000, 2048);
        assert!(
            has(
                &r.errors,
                "header.parent_locator[0].data_length",
                "data space"
            ),
            "{r:?}"
        );
        // Over the BAT (and its data, all ones, is no UTF-16 path).
        let r = with(0, 2, 1000, 1536);
        assert!(
            has(&r.errors, "header.parent_locator[0]", "overlaps the BAT"),
            "{r:?}"
        );
        assert!(
            has(&r.warnings, "header.parent_locator[0]", "not differencing"),
            "{r:?}"
        );
    }

    /// A child made by `format_differencing`, written to, checks clean; its locator data
    /// (between the BAT and the blocks) is metadata, not a leak, and blocks may not cover it.
    #[test]
    fn clean_differencing_image() {
        let parent =
            Arc::new(format_dynamic(MemStore::default(), 4 * MIB, &opts(true, 64 << 10)).unwrap());
        parent.write(0, &[1; 8192], false).unwrap();
        let locators = [
            (locator::W2RU, ".\\p.vhd".to_owned()),
            (locator::W2KU, "C:\\images\\p.vhd".to_owned()),
            (locator::MACX, "file:///images/p.vhd".to_owned()),
        ];
        let child_opts = CreateOptions {
            unique_id: [9; 16],
            ..opts(true, 64 << 10)
        };
        let child =
            format_differencing(MemStore::default(), parent, "p.vhd", &locators, &child_opts)
                .unwrap();
        child.write(512, &[2; 512], false).unwrap();
        child.write(3 * MIB, &[3; 4096], false).unwrap();
        let bytes = child.store().bytes();
        let r = check(bytes.clone());
        assert!(r.is_clean() && r.warnings.is_empty(), "{r:?}");
        assert_eq!(r.disk_type, Some(DiskType::Differencing));
        assert_eq!(r.allocated_blocks, 2);

        // A block moved over the first locator's data.
        let h = r.header.unwrap();
        let loc = h
            .parent_locators
            .iter()
            .position(|l| l.platform_code != [0; 4])
            .unwrap();
        let sector = u32::try_from(h.parent_locators[loc].data_offset / 512).unwrap();
        let mut b = bytes;
        let used = (0..64).find(|&i| bat_entry(&b, i) != UNALLOCATED).unwrap();
        set_bat(&mut b, used, sector);
        let r = check(b);
        assert!(
            has(
                &r.errors,
                &format!("bat[{used}]"),
                &format!("parent locator {loc}")
            ),
            "{r:?}"
        );
    }

    #[test]
    fn differencing_without_parent_fields_warns() {
        let mut b = dynamic_bytes(4 * MIB, 64 << 10);
        let n = b.len();
        for at in [0, n - 512] {
            b[at + 60..at + 64].copy_from_slice(&4u32.to_be_bytes());
            refresh_checksum(&mut b, at, 512, 64);
        }
        let r = check(b);
        assert!(r.errors.is_empty(), "{r:?}");
        assert_eq!(r.disk_type, Some(DiskType::Differencing));
        assert_eq!(
            locations(&r.warnings),
            vec![
                "header.parent_unique_id",
                "header.parent_name",
                "header.parent_locator"
            ]
        );
    }

    #[test]
    fn every_single_byte_flip_and_cut_is_reported_without_panic() {
        let clean = dynamic_bytes(MIB, 64 << 10);
        let n = clean.len();
        // Metadata at the front, the trailing footer, and the first bytes of a block.
        let spots = (0..2048).chain(n - 512..n);
        for i in spots {
            let mut b = clean.clone();
            b[i] ^= 0x5a;
            let r = check(b);
            // Footer copy, header and the 16 BAT entries, or the trailing footer: all covered
            // by a checksum, a comparison or the BAT checks. (The BAT padding is not.)
            if i < 1536 + 16 * 4 || i >= n - 512 {
                assert!(!r.errors.is_empty(), "flip at {i} not reported: {r:?}");
            }
        }
        for cut in (0..n).step_by(512).chain([1, 511, 513, n - 1]) {
            let r = check(clean[..cut].to_vec());
            assert!(!r.errors.is_empty(), "cut at {cut} not reported: {r:?}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn never_panics(
            flips in proptest::collection::vec((0usize..200_000, any::<u8>()), 0..16),
            cut in proptest::option::of(0usize..200_000),
            raw in proptest::collection::vec(any::<u8>(), 0..4096),
        ) {
            let mut b = dynamic_bytes(MIB, 64 << 10);
            for (at, v) in flips {
                let i = at % b.len();
                b[i] = v;
            }
            if let Some(c) = cut {
                b.truncate(c % (b.len() + 1));
            }
            let _ = check(b);
            let _ = check(raw);
        }
    }
}
