//! `ironlun vhd create|info|check`: make, describe and check VHD images without a daemon
//! (semantics.md §4).
//!
//! - `create [--type dynamic|fixed] [--force-size] [--block-size SIZE] [--parent PARENT] PATH
//!   [SIZE]` writes the image `qemu-img create -f vpc -o subformat=…,force_size=…` writes
//!   (same bytes apart from unique id, timestamp and checksum); SIZE takes qemu-img's suffixes
//!   (K, M, G, T, P, E, powers of 1024; also KiB, MiB, …) and is rounded up to a sector as
//!   qemu-img does. `--parent` makes a differencing child of PARENT (no SIZE: the child has
//!   its parent's).
//! - `info [--json] PATH` describes an image from its own metadata; a differencing child is
//!   described even when its parent cannot be found.
//! - `check [--json] PATH` runs [`ironlun_backstore::vhd::check`].
//!
//! Exit status: `create`/`info`: 0 done, 1 failed. `check`, as `qemu-img check`: 0 clean,
//! 2 corruptions, 3 leaked space only, 1 the check could not be completed. Argument errors
//! caught by the parser exit 2, as for every subcommand.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand, ValueEnum};
use ironlun_backstore::vhd::check::{self, CheckReport, FooterSource};
use ironlun_backstore::vhd::{
    self, locator, CreateOptions, DiskType, DynamicHeader, Footer, VhdError,
};
use serde_json::{json, Value};

/// `check`: no corruption, no leak.
pub const CHECK_CLEAN: u8 = 0;
/// `check`: the image could not be read to the end (or `create`/`info` failed).
pub const EXIT_FAILED: u8 = 1;
/// `check`: corruptions found.
pub const CHECK_CORRUPT: u8 = 2;
/// `check`: leaked space but no corruption.
pub const CHECK_LEAKS: u8 = 3;

/// Seconds between the Unix epoch and the VHD epoch, 2000-01-01 UTC.
const VHD_EPOCH_UNIX: u64 = 946_684_800;

/// Subformat of a new image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ImageType {
    /// Blocks allocated on first write (qemu-img's default).
    Dynamic,
    /// The whole data area written up front.
    Fixed,
}

#[derive(Debug, Clone, Subcommand)]
pub enum VhdCommand {
    /// Create an image as `qemu-img create -f vpc` does, or a differencing child (--parent).
    Create(CreateArgs),
    /// Describe an image: type, sizes, creator, geometry, blocks, ids, parent.
    Info {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        path: PathBuf,
    },
    /// Check an image read-only: exit 0 clean, 2 corruptions, 3 leaks only, 1 not completed.
    Check {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        path: PathBuf,
    },
}

/// `ironlun vhd create` arguments.
#[derive(Debug, Clone, Args)]
pub struct CreateArgs {
    /// Image subformat [default: dynamic].
    #[arg(long = "type", value_enum)]
    pub kind: Option<ImageType>,
    /// Store SIZE exactly (qemu-img's force_size=on) instead of rounding it up to a CHS size.
    #[arg(long)]
    pub force_size: bool,
    /// Bytes per block of a dynamic image: a power of two, 512 bytes to 256 MiB [default: 2M].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub block_size: Option<u64>,
    /// Make a differencing child of this image (omit SIZE).
    #[arg(long, value_name = "PARENT")]
    pub parent: Option<PathBuf>,
    /// The new image; it must not exist.
    pub path: PathBuf,
    /// Virtual size, e.g. 64M, 10G, 1.5T, 512KiB.
    #[arg(value_parser = parse_size)]
    pub size: Option<u64>,
}

/// Parse a size as qemu-img does: a number, possibly with a fraction, and an optional suffix
/// B, K, M, G, T, P, E (any case; powers of 1024), or KiB … EiB. A fraction needs a suffix.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bad = || {
        format!(
            "invalid size {s:?}: want a number with an optional suffix K, M, G, T, P, E \
             (powers of 1024) or KiB, MiB, GiB, TiB, PiB, EiB"
        )
    };
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    let shift: u32 = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        "p" | "pib" => 50,
        "e" | "eib" => 60,
        _ => return Err(bad()),
    };
    let (int, frac) = match num.split_once('.') {
        Some((i, f)) => (i, f),
        None => (num, ""),
    };
    if int.is_empty() && frac.is_empty() {
        return Err(bad());
    }
    if (num.contains('.') && shift == 0) || frac.contains('.') || frac.len() > 18 {
        return Err(bad());
    }
    let unit = 1u128 << shift;
    let whole: u128 = if int.is_empty() {
        0
    } else {
        int.parse::<u128>().map_err(|_| bad())?
    };
    let mut bytes = whole.checked_mul(unit).ok_or_else(bad)?;
    if !frac.is_empty() {
        let digits = u32::try_from(frac.len()).map_err(|_| bad())?;
        let f: u128 = frac.parse().map_err(|_| bad())?;
        let part = f.checked_mul(unit).ok_or_else(bad)? / 10u128.pow(digits);
        bytes = bytes.checked_add(part).ok_or_else(bad)?;
    }
    u64::try_from(bytes).map_err(|_| format!("invalid size {s:?}: too large"))
}

/// Run one `vhd` subcommand; report on `out`, errors on stderr. Returns the exit status.
pub fn main(cmd: &VhdCommand, out: &mut dyn Write) -> u8 {
    let (name, result) = match cmd {
        VhdCommand::Create(a) => ("create", create(a, out).map(|()| 0)),
        VhdCommand::Info { json, path } => ("info", info(path, *json, out).map(|()| 0)),
        VhdCommand::Check { json, path } => ("check", check_cmd(path, *json, out)),
    };
    match result {
        Ok(status) => status,
        Err(msg) => {
            let _ = out.flush();
            // One line, whatever the error text holds.
            let msg = msg.lines().collect::<Vec<_>>().join("; ");
            eprintln!("ironlun vhd {name}: {msg}");
            EXIT_FAILED
        }
    }
}

fn io_msg(e: std::io::Error) -> String {
    format!("cannot write the report: {e}")
}

/// A one-line message for a VHD error about `path`.
fn vhd_msg(path: &Path, e: &VhdError) -> String {
    match e {
        VhdError::Io { source, .. } if source.kind() == std::io::ErrorKind::AlreadyExists => {
            format!("{}: already exists", path.display())
        }
        VhdError::Io { op, source, .. } => format!("{}: {op}: {source}", path.display()),
        other => format!("{}: {other}", path.display()),
    }
}

fn create(a: &CreateArgs, out: &mut dyn Write) -> Result<(), String> {
    let block_size = match a.block_size {
        None => None,
        Some(b) => Some(u32::try_from(b).map_err(|_| {
            format!("--block-size {b}: not a power of two between 512 bytes and 256 MiB")
        })?),
    };
    let mut opts = CreateOptions::new();
    opts.force_size = a.force_size;
    if let Some(b) = block_size {
        opts.block_size = b;
    }
    if a.path.symlink_metadata().is_ok() {
        return Err(format!("{}: already exists", a.path.display()));
    }
    let made = make_image(a, &opts);
    if made.is_err() {
        // Creation opens the file first: leave nothing behind (the path did not exist).
        let _ = std::fs::remove_file(&a.path);
    }
    let backend = made?;
    let info = backend.info();
    let kind = type_name(info.disk_type);
    let mut line = format!(
        "created {}: {kind} VHD, virtual size {}",
        a.path.display(),
        info.size
    );
    if let Some(h) = &info.header {
        line.push_str(&format!(", block size {}", h.block_size));
    }
    if let Some(parent) = &a.parent {
        line.push_str(&format!(", parent {}", parent.display()));
    }
    writeln!(out, "{line}").map_err(io_msg)
}

/// Check the arguments and write the image `a` asks for.
fn make_image(a: &CreateArgs, opts: &CreateOptions) -> Result<vhd::VhdBackend, String> {
    let backend = if let Some(parent) = &a.parent {
        if a.size.is_some() {
            return Err("SIZE must be omitted with --parent: a child has its parent's size".into());
        }
        if a.kind == Some(ImageType::Fixed) {
            return Err("--parent makes a differencing image; --type fixed does not apply".into());
        }
        if a.force_size {
            return Err(
                "--force-size does not apply to a differencing image (the child takes \
                        its parent's size and geometry)"
                    .into(),
            );
        }
        std::fs::metadata(parent).map_err(|e| format!("parent {}: {e}", parent.display()))?;
        vhd::create_differencing(&a.path, parent, opts).map_err(|e| vhd_msg(&a.path, &e))?
    } else {
        let size = a
            .size
            .ok_or("SIZE is required (or --parent for a differencing child)")?;
        // qemu-img rounds the requested size up to a whole sector.
        let size = size
            .checked_next_multiple_of(512)
            .ok_or("SIZE is too large")?;
        match a.kind.unwrap_or(ImageType::Dynamic) {
            ImageType::Fixed => {
                if a.block_size.is_some() {
                    return Err("--block-size applies to dynamic images only".into());
                }
                vhd::create_fixed(&a.path, size, opts).map_err(|e| vhd_msg(&a.path, &e))?
            }
            ImageType::Dynamic => {
                vhd::create_dynamic(&a.path, size, opts).map_err(|e| vhd_msg(&a.path, &e))?
            }
        }
    };
    Ok(backend)
}

fn type_name(t: DiskType) -> &'static str {
    match t {
        DiskType::Fixed => "fixed",
        DiskType::Dynamic => "dynamic",
        DiskType::Differencing => "differencing",
    }
}

/// Four bytes of text (creator app/OS), trailing NULs and spaces dropped.
fn four_cc(b: &[u8; 4]) -> String {
    String::from_utf8_lossy(b)
        .trim_end_matches(['\0', ' '])
        .to_owned()
}

/// `YYYY-MM-DD hh:mm:ss UTC` for seconds since the VHD epoch (civil-from-days, proleptic
/// Gregorian calendar).
fn vhd_time(stamp: u32) -> String {
    let secs = VHD_EPOCH_UNIX + u64::from(stamp);
    let rem = secs % 86_400;
    let (year, month, day) = crate::ctl::civil_date(secs / 86_400);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// What `info` knows about the parent of a differencing disk.
struct ParentInfo {
    name: Result<String, String>,
    unique_id: [u8; 16],
    timestamp: u32,
    /// `(platform, path or URL)` of each used locator; errors as text.
    locators: Result<Vec<(String, Option<String>)>, String>,
    /// The first candidate that exists, canonical.
    found: Option<PathBuf>,
}

fn parent_info(path: &Path, h: &DynamicHeader, file_len: u64) -> ParentInfo {
    let name = locator::decode_name(&h.parent_name).map_err(|e| e.to_string());
    let read = std::fs::File::open(path)
        .map_err(|e| e.to_string())
        .and_then(|f| locator::read_locators(&f, h, file_len).map_err(|e| e.to_string()));
    let found = match &read {
        Ok(locs) => {
            let dir = path.parent().unwrap_or(Path::new("."));
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            let n = name.as_deref().unwrap_or("");
            locator::candidates(dir, locs, n)
                .into_iter()
                .map(|(_, p)| p)
                .find(|p| p.is_file())
                .map(|p| std::fs::canonicalize(&p).unwrap_or(p))
        }
        Err(_) => None,
    };
    ParentInfo {
        name,
        unique_id: h.parent_unique_id,
        timestamp: h.parent_timestamp,
        locators: read.map(|locs| {
            locs.iter()
                .map(|l| (l.platform(), l.text.clone()))
                .collect()
        }),
        found,
    }
}

fn info(path: &Path, json: bool, out: &mut dyn Write) -> Result<(), String> {
    let report = check::check_path(path).map_err(|e| vhd_msg(path, &e))?;
    let Some(footer) = report.footer.clone() else {
        let why = report
            .errors
            .first()
            .map_or_else(|| "no valid footer".to_owned(), ToString::to_string);
        return Err(format!("{}: not a usable VHD image: {why}", path.display()));
    };
    let header = report.header.clone();
    let parent = match (&header, footer.disk_type) {
        (Some(h), DiskType::Differencing) => Some(parent_info(path, h, report.file_size)),
        _ => None,
    };
    if json {
        let v = info_json(path, &report, &footer, header.as_ref(), parent.as_ref());
        writeln!(out, "{v:#}").map_err(io_msg)?;
    } else {
        info_text(
            path,
            &report,
            &footer,
            header.as_ref(),
            parent.as_ref(),
            out,
        )
        .map_err(io_msg)?;
    }
    if !report.errors.is_empty() {
        let _ = out.flush();
        eprintln!(
            "ironlun vhd info: {}: {} corruption(s); run `ironlun vhd check`",
            path.display(),
            report.errors.len()
        );
    }
    Ok(())
}

fn info_json(
    path: &Path,
    r: &CheckReport,
    f: &Footer,
    h: Option<&DynamicHeader>,
    parent: Option<&ParentInfo>,
) -> Value {
    let mut v = json!({
        "filename": path.display().to_string(),
        "format": "vpc",
        "type": type_name(f.disk_type),
        "virtual_size": r.virtual_size,
        "file_size": r.file_size,
        "current_size": f.current_size,
        "original_size": f.original_size,
        "creator_app": four_cc(&f.creator_app),
        "creator_version": format!("{}.{}", f.creator_version >> 16, f.creator_version & 0xffff),
        "creator_os": four_cc(&f.creator_os),
        "geometry": {
            "cylinders": f.geometry.cylinders,
            "heads": f.geometry.heads,
            "sectors": f.geometry.sectors,
        },
        "uuid": vhd::uuid(&f.unique_id),
        "timestamp": f.timestamp,
        "time": vhd_time(f.timestamp),
        "saved_state": f.saved_state,
        "footer": match r.footer_source {
            Some(FooterSource::Copy) => "copy at 0",
            _ => "trailing",
        },
        "corruptions": r.errors.len(),
    });
    if let (Some(h), Value::Object(m)) = (h, &mut v) {
        m.insert("block_size".into(), json!(h.block_size));
        m.insert("total_blocks".into(), json!(r.total_blocks));
        m.insert("allocated_blocks".into(), json!(r.allocated_blocks));
    }
    if let (Some(p), Value::Object(m)) = (parent, &mut v) {
        let locators = match &p.locators {
            Ok(l) => json!(l
                .iter()
                .map(|(code, text)| json!({"platform": code, "path": text}))
                .collect::<Vec<_>>()),
            Err(e) => json!({ "error": e }),
        };
        m.insert(
            "parent".into(),
            json!({
                "name": p.name.as_ref().ok(),
                "uuid": vhd::uuid(&p.unique_id),
                "timestamp": p.timestamp,
                "locators": locators,
                "path": p.found.as_ref().map(|x| x.display().to_string()),
            }),
        );
    }
    v
}

fn info_text(
    path: &Path,
    r: &CheckReport,
    f: &Footer,
    h: Option<&DynamicHeader>,
    parent: Option<&ParentInfo>,
    out: &mut dyn Write,
) -> std::io::Result<()> {
    writeln!(out, "image: {}", path.display())?;
    writeln!(out, "type: {}", type_name(f.disk_type))?;
    match r.virtual_size {
        Some(s) => writeln!(out, "virtual size: {s} bytes")?,
        None => writeln!(out, "virtual size: invalid")?,
    }
    writeln!(out, "file size: {} bytes", r.file_size)?;
    writeln!(
        out,
        "creator: {} {}.{} on {}",
        four_cc(&f.creator_app),
        f.creator_version >> 16,
        f.creator_version & 0xffff,
        four_cc(&f.creator_os)
    )?;
    writeln!(
        out,
        "geometry: {}/{}/{} (cylinders/heads/sectors)",
        f.geometry.cylinders, f.geometry.heads, f.geometry.sectors
    )?;
    if let Some(h) = h {
        writeln!(out, "block size: {} bytes", h.block_size)?;
        writeln!(
            out,
            "blocks: {} allocated of {}",
            r.allocated_blocks, r.total_blocks
        )?;
    }
    writeln!(out, "uuid: {}", vhd::uuid(&f.unique_id))?;
    writeln!(out, "created: {}", vhd_time(f.timestamp))?;
    if r.footer_source == Some(FooterSource::Copy) {
        writeln!(
            out,
            "footer: trailing footer invalid, using the copy at offset 0"
        )?;
    }
    if let Some(p) = parent {
        match &p.name {
            Ok(n) => writeln!(out, "parent name: {n}")?,
            Err(e) => writeln!(out, "parent name: invalid ({e})")?,
        }
        writeln!(out, "parent uuid: {}", vhd::uuid(&p.unique_id))?;
        writeln!(out, "parent time: {}", vhd_time(p.timestamp))?;
        match &p.locators {
            Ok(l) => {
                for (code, text) in l {
                    writeln!(
                        out,
                        "parent locator {code}: {}",
                        text.as_deref().unwrap_or("(not decoded)")
                    )?;
                }
            }
            Err(e) => writeln!(out, "parent locators: invalid ({e})")?,
        }
        match &p.found {
            Some(x) => writeln!(out, "parent path: {}", x.display())?,
            None => writeln!(out, "parent path: not found")?,
        }
    }
    Ok(())
}

fn check_cmd(path: &Path, json: bool, out: &mut dyn Write) -> Result<u8, String> {
    let r = check::check_path(path)
        .map_err(|e| format!("check could not be completed: {}", vhd_msg(path, &e)))?;
    let status = if !r.errors.is_empty() {
        CHECK_CORRUPT
    } else if !r.leaks.is_empty() {
        CHECK_LEAKS
    } else {
        CHECK_CLEAN
    };
    if json {
        let problems = |p: &[check::Problem]| {
            p.iter()
                .map(|p| json!({"location": p.location, "message": p.message}))
                .collect::<Vec<_>>()
        };
        let v = json!({
            "filename": path.display().to_string(),
            "format": "vpc",
            "type": r.disk_type.map(type_name),
            "virtual_size": r.virtual_size,
            "file_size": r.file_size,
            "block_size": r.block_size,
            "total_blocks": r.total_blocks,
            "allocated_blocks": r.allocated_blocks,
            "clean": r.is_clean(),
            "corruptions": r.errors.len(),
            "leaked_bytes": r.leaked_bytes(),
            "errors": problems(&r.errors),
            "warnings": problems(&r.warnings),
            "leaks": r.leaks.iter()
                .map(|l| json!({"offset": l.offset, "length": l.len}))
                .collect::<Vec<_>>(),
        });
        writeln!(out, "{v:#}").map_err(io_msg)?;
        return Ok(status);
    }
    check_text(&r, out).map_err(io_msg)?;
    Ok(status)
}

fn check_text(r: &CheckReport, out: &mut dyn Write) -> std::io::Result<()> {
    for p in &r.errors {
        writeln!(out, "ERROR {p}")?;
    }
    for p in &r.warnings {
        writeln!(out, "Warning {p}")?;
    }
    for l in &r.leaks {
        writeln!(
            out,
            "Leaked space: {} bytes at offset {} (owned by no BAT entry)",
            l.len, l.offset
        )?;
    }
    if r.errors.is_empty() && r.leaks.is_empty() {
        writeln!(out, "No errors were found on the image.")?;
    }
    if !r.errors.is_empty() {
        writeln!(
            out,
            "\n{} errors were found on the image.\nData may be corrupted, or further writes to \
             the image may corrupt it.",
            r.errors.len()
        )?;
    }
    if !r.leaks.is_empty() {
        writeln!(
            out,
            "\n{} leaked bytes were found on the image.\nThis means waste of disk space, but no \
             harm to data.",
            r.leaked_bytes()
        )?;
    }
    if r.block_size.is_some() {
        let pct = if r.total_blocks == 0 {
            0.0
        } else {
            f64::from(r.allocated_blocks) * 100.0 / f64::from(r.total_blocks)
        };
        writeln!(
            out,
            "{}/{} = {pct:.2}% allocated blocks",
            r.allocated_blocks, r.total_blocks
        )?;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn sizes_as_qemu_img() {
        for (s, want) in [
            ("0", 0u64),
            ("1000", 1000),
            ("1000b", 1000),
            ("1k", 1024),
            ("1K", 1024),
            ("1KiB", 1024),
            ("64M", 64 << 20),
            ("64MiB", 64 << 20),
            ("1.5M", 3 << 19),
            ("10G", 10 << 30),
            ("2gib", 2 << 30),
            ("1T", 1 << 40),
            (".5K", 512),
            ("1P", 1 << 50),
            ("15E", 15 << 60),
        ] {
            assert_eq!(parse_size(s), Ok(want), "{s}");
        }
        for bad in [
            "", "K", "1.5", "1KB", "1x", "-1", "1.2.3M", "16E", "1 M", "1e3", "0x10",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn vhd_epoch_dates() {
        assert_eq!(vhd_time(0), "2000-01-01 00:00:00 UTC");
        // Expected values from Python's datetime (2000-01-01 + timedelta(seconds=…)).
        assert_eq!(vhd_time(0x329b_10ad), "2026-11-26 15:45:49 UTC");
        assert_eq!(vhd_time(u32::MAX), "2136-02-07 06:28:15 UTC");
        assert_eq!(vhd_time(5_097_600), "2000-02-29 00:00:00 UTC");
    }
}
