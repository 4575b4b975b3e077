//! A VHD image served as a [`BlockBackend`]: fixed, dynamic and differencing disks
//! (semantics.md §4.2-§4.5).
//!
//! # Opening
//! The footer at the end of the file is authoritative. When it is unreadable and the copy at
//! offset 0 is a valid dynamic footer, the copy is used (QEMU does the same; a crash inside
//! QEMU's own allocation order leaves no trailing footer). Every offset is checked against the
//! file length with checked arithmetic; BAT entries must point at blocks inside the file that
//! overlap neither each other nor the metadata (parent locator data included). A differencing
//! disk is served only with its parent: [`VhdBackend::open`] resolves it from the locators,
//! [`VhdBackend::open_store_with_parent`] takes it from the caller.
//!
//! # Allocating a block (dynamic and differencing disks)
//! The next block goes at `free`, the end of the last block (QEMU's `free_data_block_offset`),
//! where the trailing footer usually sits. With `new_end = free + bitmap + block`:
//!
//! 1. write the footer at `new_end` (the file now ends in a footer past the new block), **sync**.
//!    When `new_end + 512` is below the end of the file (space leaked past `free`), this step
//!    is skipped: a footer at `new_end` would not be the file's last 512 bytes and could
//!    overwrite part of them, while the block ends at or before them, so they stay a footer;
//! 2. zero `free..new_end` where it lies inside the old file (the old footer, or space leaked by
//!    an earlier crash, must not show through unwritten sectors: QEMU ignores bitmap bits);
//! 3. write the bitmap and the guest data into the block. Dynamic disks: the bitmap is all
//!    ones, as QEMU writes it. Differencing disks: only the bits of the written sectors'
//!    granules are set (the other sectors keep reading from the parent), and the sectors of
//!    those granules the write does not fully cover are first filled with the parent's bytes;
//! 4. **sync**;
//! 5. write the 4-byte BAT entry; it is durable at the next sync (FUA write or `flush`).
//!
//! A crash anywhere before step 5 reaches the disk leaves the old image, with the file's last
//! 512 bytes still a footer (step 1 is durable before anything else changes; footers are
//! identical bytes) and the space past `free` leaked: QEMU's `free_data_block_offset` and ours
//! are recomputed from the BAT and stay within the file. After step 5 the entry points at a
//! block whose bitmap, zeroes and data were made durable by step 4, so no stale bytes are ever
//! exposed. The single 4-byte entry lies within one sector. The lost guest write was never
//! acknowledged. Cost: two syncs per allocation; writes to present sectors of allocated blocks
//! are plain pwrites.
//!
//! # Granules (differencing disks)
//! A differencing disk sets bitmap bits a whole bitmap byte (8 sectors, 4 KiB) at a time: a
//! write's sectors are widened to the bytes of the bitmap covering them, and the widened
//! sectors it does not cover get the parent's bytes, so they read the same as before. Every
//! bitmap byte written is thus 0x00 or 0xFF. libvhdi (20210425, the independent reader of the
//! tests) misreads any 0 bit that follows a 1 bit inside one bitmap byte (it shifts the byte
//! without masking), which sector-granular bits would expose; whole-byte bits read the same
//! everywhere. Writes aligned to 4 KiB copy nothing.
//!
//! # Writing to an allocated block
//! Sectors whose bit is set are overwritten in place. A write touching sectors whose bit is 0
//! first fills the bit-0 sectors of its granules that it does not fully cover with their
//! absent content (zeroes on a dynamic disk, whose granule is one sector; the parent's bytes
//! on a differencing disk), writes the data, then writes the bitmap with the new bits. On a
//! differencing disk a set bit over unwritten data would expose stale bytes instead of the
//! parent's, so the data is **synced** before the bitmap is written (one sync per write that
//! claims new granules of an allocated block); the bitmap itself is durable at the next sync
//! (FUA or `flush`), like the BAT entry. (On a dynamic disk a bit-0 sector holds zeroes, which
//! is what it reads as anyway, so no sync is needed.)
//! Every sector thus reads old or new after a crash; a write over both present and absent
//! sectors of a block may be torn at sector granularity before it is acknowledged, as on a
//! disk (present sectors are overwritten in place, absent ones claimed after the sync).
//!
//! # Bitmaps, unmap and extents
//! Bitmap bit = 1: the sector's data is in the block (MSB of byte 0 = first sector). Reads
//! honour the bits: bit 0 (or an unallocated block) reads zeroes on a dynamic disk and the
//! parent's bytes at the same offset on a differencing disk. On a dynamic disk `unmap` and
//! `write_zeroes` zero the data in allocated blocks (punching holes in the file) and `unmap`
//! clears the bits of fully covered sectors; blocks are never returned to the BAT (the file
//! does not shrink); `extents` reports unallocated blocks and bit-0 sectors as deallocated. On
//! a differencing disk both write zero sectors into the child with their bits set (clearing a
//! bit would show the parent again), `extents` reports everything mapped and the disk is not
//! thin provisioned.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;

use super::bat::{self, Layout, MAX_BAT_ENTRIES, UNALLOCATED};
use super::footer::{
    DiskType, Footer, Geometry, FEATURE_RESERVED, FOOTER_LEN, FOOTER_SIZE, FORMAT_VERSION,
    MAX_GEOMETRY, MAX_SECTORS, NO_DATA_OFFSET, VHD_EPOCH_UNIX,
};
use super::header::{DynamicHeader, ParentLocator, DEFAULT_BLOCK_SIZE, HEADER_LEN, HEADER_SIZE};
use super::locator::{self, Locator};
use super::store::Store;
use super::VhdError;
use crate::buffers::BufferPool;
use crate::{check_range, BackstoreError, BlockBackend, Extent, Result};

/// Sector size of VHD addressing.
const SECTOR: u64 = 512;
/// Most extents returned by one `extents` call.
const MAX_EXTENTS: usize = 4096;
/// Where `create_dynamic` puts the dynamic header and the BAT (as QEMU, §4.5).
const CREATE_HEADER_AT: u64 = 512;
const CREATE_BAT_AT: u64 = 1536;
/// Sectors per bitmap byte: a differencing disk sets its bits a whole byte at a time.
const BIT_GRANULE: u64 = 8;
/// Longest chain [`VhdBackend::open`] follows: the image and up to 31 ancestors.
pub const MAX_CHAIN_DEPTH: usize = 32;

/// What `open` found, for `info`-style reporting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhdInfo {
    pub disk_type: DiskType,
    /// Size served, by QEMU's rule (§4.5).
    pub size: u64,
    pub footer: Footer,
    pub header: Option<DynamicHeader>,
    pub allocated_blocks: u32,
    /// Differencing disks: the parent name stored in the header (UTF-16BE, decoded).
    pub parent_name: Option<String>,
    /// Differencing disks: the unique id the parent's footer must carry.
    pub parent_unique_id: Option<[u8; 16]>,
    /// Differencing disks opened by path: the parent file found (canonical path).
    pub parent_path: Option<PathBuf>,
    /// Differencing disks: the used parent locators, decoded.
    pub parent_locators: Vec<Locator>,
}

/// Per-block sector bitmap, cached after first use.
#[derive(Debug, Clone)]
enum Bitmap {
    /// Every sector of the block is present.
    Full,
    Bits(Box<[u8]>),
}

#[derive(Debug)]
struct Meta {
    bat: Vec<u32>,
    /// Where the next block goes.
    free: u64,
    bitmaps: HashMap<u32, Bitmap>,
}

#[derive(Debug)]
struct Dynamic {
    header: DynamicHeader,
    layout: Layout,
    meta: Mutex<Meta>,
    /// Differencing disks: the used locators and the decoded parent name.
    locators: Vec<Locator>,
    parent_name: String,
}

#[derive(Debug)]
enum Format {
    Fixed,
    Dynamic(Box<Dynamic>),
}

/// The image a differencing disk reads its absent sectors from.
struct Parent {
    backend: Arc<dyn BlockBackend>,
    /// Where it was found, when opened by path.
    path: Option<PathBuf>,
}

impl std::fmt::Debug for Parent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parent")
            .field("size", &self.backend.size())
            .field("path", &self.path)
            .finish()
    }
}

/// A fixed, dynamic or differencing VHD over a [`Store`]. See the module documentation.
#[derive(Debug)]
pub struct VhdBackend<S: Store = File> {
    store: S,
    size: u64,
    read_only: bool,
    footer: Footer,
    footer_bytes: [u8; FOOTER_SIZE],
    format: Format,
    /// Set exactly for differencing disks (the constructors refuse one without it).
    parent: Option<Parent>,
    /// Recycled buffers for large reads (see [`crate::buffers`]): every byte of a read is
    /// written by `read_dynamic`/`read_exact_at`, so reused buffers never leak old data.
    buffers: Arc<BufferPool>,
}

/// Where the bytes of a write come from.
#[derive(Clone, Copy)]
enum Src<'a> {
    Data(&'a [u8]),
    /// Zeroes (differencing `write_zeroes`/`unmap`).
    Zero,
}

fn io_err(op: &'static str, offset: u64) -> impl FnOnce(std::io::Error) -> VhdError {
    move |source| VhdError::Io { op, offset, source }
}

fn bio(op: &'static str, offset: u64) -> impl FnOnce(std::io::Error) -> BackstoreError {
    move |source| BackstoreError::Io { op, offset, source }
}

fn file_err(reason: impl Into<String>) -> VhdError {
    VhdError::File {
        reason: reason.into(),
    }
}

fn header_err(field: &'static str, reason: impl Into<String>) -> VhdError {
    VhdError::Header {
        field,
        reason: reason.into(),
    }
}

fn parent_err(reason: impl Into<String>) -> VhdError {
    VhdError::Parent {
        reason: reason.into(),
    }
}

fn to_usize(n: u64) -> Result<usize> {
    usize::try_from(n).map_err(|_| BackstoreError::OutOfRange {
        offset: 0,
        len: n,
        size: 0,
    })
}

fn len64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

fn bit(bits: &[u8], sector: u64) -> bool {
    let byte = usize::try_from(sector / 8).ok().and_then(|i| bits.get(i));
    byte.is_some_and(|b| b & (0x80 >> (sector % 8)) != 0)
}

fn set_bit(bits: &mut [u8], sector: u64, on: bool) {
    if let Some(b) = usize::try_from(sector / 8)
        .ok()
        .and_then(|i| bits.get_mut(i))
    {
        let mask = 0x80u8 >> (sector % 8);
        if on {
            *b |= mask;
        } else {
            *b &= !mask;
        }
    }
}

/// Runs of equal bits over byte range `start..start + n` of a block: `(start, len, present)`.
fn sector_runs(bits: &[u8], start: u64, n: u64) -> Vec<(u64, u64, bool)> {
    let mut runs: Vec<(u64, u64, bool)> = Vec::new();
    let end = start.saturating_add(n);
    let mut at = start;
    while at < end {
        let sector = at / SECTOR;
        let next = ((sector + 1) * SECTOR).min(end);
        let present = bit(bits, sector);
        match runs.last_mut() {
            Some(last) if last.2 == present => last.1 += next - at,
            _ => runs.push((at, next - at, present)),
        }
        at = next;
    }
    runs
}

/// One piece of a request inside one block.
struct Chunk {
    block: u32,
    in_block: u64,
    len: u64,
    /// Offset of the piece within the request.
    pos: u64,
}

impl Chunk {
    /// First and last sector (within the block) the piece touches; `len` is never 0.
    fn sectors(&self) -> (u64, u64) {
        let last = (self.in_block + self.len).saturating_sub(1) / SECTOR;
        (self.in_block / SECTOR, last)
    }

    /// The touched sectors widened to whole groups of `granule` sectors (clipped to the
    /// `block_sectors` of a block): `(lo, hi, uncovered)`, the sectors of `lo..=hi` the piece
    /// does not fully cover being `uncovered`, in order.
    fn widened(&self, granule: u64, block_sectors: u64) -> (u64, u64, Vec<u64>) {
        let (first, last) = self.sectors();
        let granule = granule.max(1);
        let lo = first / granule * granule;
        let hi = ((last / granule + 1) * granule)
            .min(block_sectors)
            .saturating_sub(1)
            .max(last);
        let end = self.in_block + self.len;
        let uncovered = (lo..=hi)
            .filter(|&s| !(self.in_block <= s * SECTOR && end >= (s + 1) * SECTOR))
            .collect();
        (lo, hi, uncovered)
    }
}

fn chunks(offset: u64, len: u64, block_size: u64) -> Vec<Chunk> {
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < len {
        let at = offset.saturating_add(pos);
        let in_block = at % block_size;
        let n = (block_size - in_block).min(len - pos);
        out.push(Chunk {
            block: u32::try_from(at / block_size).unwrap_or(u32::MAX),
            in_block,
            len: n,
            pos,
        });
        pos += n;
    }
    out
}

/// The footer of the image in `store`: the last 512 bytes, or the copy at offset 0 of a
/// dynamic or differencing disk when those are unreadable (module documentation).
fn read_footer<S: Store + ?Sized>(
    store: &S,
) -> std::result::Result<(Footer, [u8; FOOTER_SIZE], u64), VhdError> {
    let len = store.len().map_err(io_err("open", 0))?;
    if len < FOOTER_LEN {
        return Err(file_err(format!("{len} bytes, shorter than a footer")));
    }
    let mut tail = [0u8; FOOTER_SIZE];
    store
        .read_exact_at(&mut tail, len - FOOTER_LEN)
        .map_err(io_err("read footer", len - FOOTER_LEN))?;
    match Footer::parse(&tail) {
        Ok(f) => Ok((f, tail, len)),
        Err(tail_err) => {
            let mut head = [0u8; FOOTER_SIZE];
            store
                .read_exact_at(&mut head, 0)
                .map_err(io_err("read footer copy", 0))?;
            match Footer::parse(&head) {
                Ok(f) if f.disk_type != DiskType::Fixed => Ok((f, head, len)),
                _ => Err(tail_err),
            }
        }
    }
}

/// Read `dst.len()` bytes of `parent` at `offset`; bytes past its end read as zeroes.
fn read_parent(parent: &dyn BlockBackend, offset: u64, dst: &mut [u8]) -> Result<()> {
    let avail = parent.size().saturating_sub(offset).min(len64(dst.len()));
    let (head, tail) = dst.split_at_mut(to_usize(avail)?);
    if !head.is_empty() {
        let bytes = parent.read(offset, head.len())?;
        if bytes.len() != head.len() {
            return Err(BackstoreError::Io {
                op: "read parent",
                offset,
                source: std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
            });
        }
        head.copy_from_slice(&bytes);
    }
    tail.fill(0);
    Ok(())
}

impl VhdBackend<File> {
    /// Open the VHD at `path` (read-write unless `read_only`).
    ///
    /// A differencing disk's parent is looked for, in order, at each W2ru locator (relative to
    /// the child's directory, `\` or `/` separators), each W2ku locator, each MacX locator,
    /// then under the header's parent name in the child's directory. The first candidate
    /// whose footer unique id equals the child's parent unique id is opened read-only, the
    /// same way (so chains of fixed, dynamic and differencing disks work), up to
    /// [`MAX_CHAIN_DEPTH`] images and refusing loops. Errors: [`VhdError::ParentMismatch`]
    /// when only images with another id were found, [`VhdError::Parent`] listing every place
    /// tried when none was, [`VhdError::ParentOpen`] when the parent itself is refused.
    pub fn open(path: impl AsRef<Path>, read_only: bool) -> std::result::Result<Self, VhdError> {
        Self::open_in_chain(path.as_ref(), read_only, &mut Vec::new())
    }

    fn open_in_chain(
        path: &Path,
        read_only: bool,
        chain: &mut Vec<PathBuf>,
    ) -> std::result::Result<Self, VhdError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(io_err("open", 0))?;
        let mut image = Self::open_image(file, read_only)?;
        let Format::Dynamic(d) = &image.format else {
            return Ok(image);
        };
        if image.footer.disk_type != DiskType::Differencing {
            return Ok(image);
        }
        let real = std::fs::canonicalize(path).map_err(io_err("canonicalize", 0))?;
        if chain.contains(&real) {
            return Err(parent_err(format!(
                "loop: {} is its own ancestor",
                real.display()
            )));
        }
        chain.push(real.clone());
        // `chain` holds this image and its differencing descendants; the parent would be
        // one more image.
        if chain.len() >= MAX_CHAIN_DEPTH {
            return Err(parent_err(format!(
                "the chain is longer than {MAX_CHAIN_DEPTH} images at {}",
                real.display()
            )));
        }
        let dir = real.parent().unwrap_or(Path::new("/"));
        let want = d.header.parent_unique_id;
        let mut tried = Vec::new();
        let mut mismatch = None;
        for (what, candidate) in locator::candidates(dir, &d.locators, &d.parent_name) {
            let found = File::open(&candidate)
                .map_err(io_err("open", 0))
                .and_then(|f| read_footer(&f));
            match found {
                Err(e) => tried.push(format!("{what} -> {}: {e}", candidate.display())),
                Ok((f, _, _)) if f.unique_id != want => {
                    tried.push(format!(
                        "{what} -> {}: unique id {}",
                        candidate.display(),
                        super::uuid(&f.unique_id)
                    ));
                    mismatch.get_or_insert((candidate, f.unique_id));
                }
                Ok(_) => {
                    let parent = Self::open_in_chain(&candidate, true, chain).map_err(|e| {
                        VhdError::ParentOpen {
                            path: candidate.clone(),
                            source: Box::new(e),
                        }
                    })?;
                    let path = std::fs::canonicalize(&candidate).unwrap_or(candidate);
                    image.parent = Some(Parent {
                        backend: Arc::new(parent),
                        path: Some(path),
                    });
                    return Ok(image);
                }
            }
        }
        if let Some((path, found)) = mismatch {
            return Err(VhdError::ParentMismatch { path, want, found });
        }
        Err(parent_err(format!(
            "the parent of {} was not found; tried: {}",
            real.display(),
            if tried.is_empty() {
                "nothing (no usable locator and no parent name)".to_owned()
            } else {
                tried.join("; ")
            }
        )))
    }
}

impl<S: Store> VhdBackend<S> {
    /// Open a fixed or dynamic VHD held by `store`, validating footer, header and BAT (module
    /// documentation). A differencing disk is refused: it needs
    /// [`open_store_with_parent`](Self::open_store_with_parent).
    pub fn open_store(store: S, read_only: bool) -> std::result::Result<Self, VhdError> {
        Self::open_store_with_parent(store, read_only, None)
    }

    /// As [`open_store`](Self::open_store), with the parent of a differencing disk given by
    /// the caller (`Some` exactly for differencing disks). The caller vouches that `parent` is
    /// the image the child was made from (no unique id is compared); parent bytes past its
    /// size read as zeroes.
    pub fn open_store_with_parent(
        store: S,
        read_only: bool,
        parent: Option<Arc<dyn BlockBackend>>,
    ) -> std::result::Result<Self, VhdError> {
        let mut image = Self::open_image(store, read_only)?;
        match (image.footer.disk_type, parent) {
            (DiskType::Differencing, Some(backend)) => {
                image.parent = Some(Parent {
                    backend,
                    path: None,
                });
            }
            (DiskType::Differencing, None) => {
                return Err(parent_err(
                    "a differencing disk needs its parent: open it by path, or give the parent",
                ))
            }
            (kind, Some(_)) => {
                return Err(parent_err(format!("a {kind:?} disk has no parent")));
            }
            (_, None) => {}
        }
        Ok(image)
    }

    /// Parse and validate the image; a differencing disk comes back without its parent.
    fn open_image(store: S, read_only: bool) -> std::result::Result<Self, VhdError> {
        let (footer, footer_bytes, len) = read_footer(&store)?;
        let size = footer.disk_size()?;
        let format = match footer.disk_type {
            DiskType::Fixed => {
                if size > len - FOOTER_LEN {
                    return Err(file_err(format!(
                        "fixed data area of {size} bytes does not fit the {len}-byte file"
                    )));
                }
                Format::Fixed
            }
            DiskType::Dynamic | DiskType::Differencing => {
                Format::Dynamic(Box::new(Self::open_dynamic(&store, &footer, size, len)?))
            }
        };
        Ok(Self {
            store,
            size,
            read_only,
            footer,
            footer_bytes,
            format,
            parent: None,
            buffers: BufferPool::new(),
        })
    }

    fn open_dynamic(
        store: &S,
        footer: &Footer,
        size: u64,
        len: u64,
    ) -> std::result::Result<Dynamic, VhdError> {
        let header_at = footer.data_offset;
        let header_end = header_at
            .checked_add(HEADER_LEN)
            .filter(|&end| end <= len && header_at >= FOOTER_LEN)
            .ok_or_else(|| VhdError::Footer {
                field: "data_offset",
                reason: format!("dynamic header at {header_at} is outside the {len}-byte file"),
            })?;
        let mut hb = [0u8; HEADER_SIZE];
        store
            .read_exact_at(&mut hb, header_at)
            .map_err(io_err("read dynamic header", header_at))?;
        let header = DynamicHeader::parse(&hb)?;
        let entries = header.max_table_entries;
        if entries > MAX_BAT_ENTRIES {
            return Err(header_err(
                "max_table_entries",
                format!("{entries} exceeds the limit of {MAX_BAT_ENTRIES}"),
            ));
        }
        let layout = Layout {
            table_offset: header.table_offset,
            entries,
            block_size: u64::from(header.block_size),
            bitmap_size: header.bitmap_size(),
        };
        if u64::from(entries).saturating_mul(layout.block_size) < size {
            return Err(header_err(
                "max_table_entries",
                format!("{entries} blocks cannot hold {size} bytes"),
            ));
        }
        let table_end = layout
            .table_offset
            .checked_add(layout.table_len())
            .filter(|&end| end <= len)
            .ok_or_else(|| {
                header_err(
                    "table_offset",
                    format!(
                        "BAT at {} runs past the {len}-byte file",
                        layout.table_offset
                    ),
                )
            })?;
        let table_padded = table_end.div_ceil(SECTOR).saturating_mul(SECTOR);
        if layout.table_offset < header_end && header_at < table_end {
            return Err(header_err(
                "table_offset",
                "BAT overlaps the dynamic header",
            ));
        }
        if layout.table_offset < FOOTER_LEN {
            return Err(header_err("table_offset", "BAT overlaps the footer copy"));
        }
        // Locators matter only for differencing disks (dynamic disks leave them unused).
        let (locators, parent_name) = if footer.disk_type == DiskType::Differencing {
            (
                locator::read_locators(store, &header, len)?,
                locator::decode_name(&header.parent_name)?,
            )
        } else {
            (Vec::new(), String::new())
        };
        let mut raw = vec![0u8; to_usize(layout.table_len()).map_err(|_| file_err("BAT size"))?];
        store
            .read_exact_at(&mut raw, layout.table_offset)
            .map_err(io_err("read BAT", layout.table_offset))?;
        let table = bat::decode(&raw);
        let mut reserved = vec![
            (0, FOOTER_LEN, "footer copy"),
            (header_at, header_end, "dynamic header"),
            (layout.table_offset, table_padded, "BAT"),
        ];
        for (start, end) in locator::reserved_ranges(&locators) {
            reserved.push((start, end, "parent locator data"));
        }
        let free = bat::validate(&table, &layout, &reserved, len)?;
        Ok(Dynamic {
            header,
            layout,
            meta: Mutex::new(Meta {
                bat: table,
                free,
                bitmaps: HashMap::new(),
            }),
            locators,
            parent_name,
        })
    }

    /// Footer, header, allocation and parent summary.
    pub fn info(&self) -> VhdInfo {
        let (header, allocated_blocks) = match &self.format {
            Format::Fixed => (None, 0),
            Format::Dynamic(d) => {
                let meta = lock(&d.meta);
                let n = meta.bat.iter().filter(|&&e| e != UNALLOCATED).count();
                (Some(d.header.clone()), u32::try_from(n).unwrap_or(u32::MAX))
            }
        };
        let diff = match &self.format {
            Format::Dynamic(d) if self.is_differencing() => Some(d),
            _ => None,
        };
        VhdInfo {
            disk_type: self.footer.disk_type,
            size: self.size,
            footer: self.footer.clone(),
            header,
            allocated_blocks,
            parent_name: diff.map(|d| d.parent_name.clone()),
            parent_unique_id: diff.map(|d| d.header.parent_unique_id),
            parent_path: self.parent_path().map(Path::to_path_buf),
            parent_locators: diff.map(|d| d.locators.clone()).unwrap_or_default(),
        }
    }

    /// The store underneath (tests inspect it).
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Differencing disks: the parent image.
    pub fn parent(&self) -> Option<&Arc<dyn BlockBackend>> {
        self.parent.as_ref().map(|p| &p.backend)
    }

    /// Differencing disks opened by path: where the parent was found.
    pub fn parent_path(&self) -> Option<&Path> {
        self.parent.as_ref().and_then(|p| p.path.as_deref())
    }

    fn is_differencing(&self) -> bool {
        self.footer.disk_type == DiskType::Differencing
    }

    fn writable(&self, op: &'static str) -> Result<()> {
        if self.read_only {
            Err(BackstoreError::ReadOnly { op })
        } else {
            Ok(())
        }
    }

    /// What a sector whose bit is 0 reads as, for `dst` at disk offset `offset`: zeroes, or
    /// the parent's bytes.
    fn absent(&self, offset: u64, dst: &mut [u8]) -> Result<()> {
        match &self.parent {
            Some(p) => read_parent(p.backend.as_ref(), offset, dst),
            None => {
                dst.fill(0);
                Ok(())
            }
        }
    }

    fn bitmap<'m>(
        &self,
        d: &Dynamic,
        meta: &'m mut Meta,
        block: u32,
        at: u64,
    ) -> Result<&'m mut Bitmap> {
        match meta.bitmaps.entry(block) {
            std::collections::hash_map::Entry::Occupied(e) => Ok(e.into_mut()),
            std::collections::hash_map::Entry::Vacant(e) => {
                let mut bits = vec![0u8; to_usize(d.layout.bitmap_size)?].into_boxed_slice();
                self.store
                    .read_exact_at(&mut bits, at)
                    .map_err(bio("read bitmap", at))?;
                Ok(e.insert(if all_set(d, &bits) {
                    Bitmap::Full
                } else {
                    Bitmap::Bits(bits)
                }))
            }
        }
    }

    fn entry(meta: &Meta, block: u32) -> Result<u32> {
        meta.bat
            .get(usize::try_from(block).unwrap_or(usize::MAX))
            .copied()
            .ok_or(BackstoreError::OutOfRange {
                offset: u64::from(block),
                len: 1,
                size: len64(meta.bat.len()),
            })
    }

    fn read_dynamic(&self, d: &Dynamic, offset: u64, buf: &mut [u8]) -> Result<()> {
        for c in chunks(offset, len64(buf.len()), d.layout.block_size) {
            let pos = to_usize(c.pos)?;
            let dst = buf
                .get_mut(pos..pos.saturating_add(to_usize(c.len)?))
                .ok_or(BackstoreError::Unsupported("chunk"))?;
            let disk_at = offset + c.pos;
            let mut meta = lock(&d.meta);
            let entry = Self::entry(&meta, c.block)?;
            if entry == UNALLOCATED {
                drop(meta);
                self.absent(disk_at, dst)?;
                continue;
            }
            let block_at = u64::from(entry) * SECTOR;
            let data_at = block_at + d.layout.bitmap_size;
            let runs = match self.bitmap(d, &mut meta, c.block, block_at)? {
                Bitmap::Full => vec![(c.in_block, c.len, true)],
                Bitmap::Bits(bits) => sector_runs(bits, c.in_block, c.len),
            };
            drop(meta);
            for (start, n, present) in runs {
                let from = to_usize(start - c.in_block)?;
                let part = dst
                    .get_mut(from..from.saturating_add(to_usize(n)?))
                    .ok_or(BackstoreError::Unsupported("run"))?;
                if present {
                    let at = data_at + start;
                    self.store
                        .read_exact_at(part, at)
                        .map_err(bio("read", at))?;
                } else {
                    self.absent(disk_at + (start - c.in_block), part)?;
                }
            }
        }
        Ok(())
    }

    /// Store `src` (`len` bytes) at file offset `at`.
    fn put(&self, src: Src<'_>, at: u64, len: u64) -> Result<()> {
        match src {
            Src::Data(b) => self.store.write_all_at(b, at).map_err(bio("write", at)),
            Src::Zero => self.store.zero_range(at, len).map_err(bio("zero", at)),
        }
    }

    /// Sectors whose bits are set together: one sector on a dynamic disk; a bitmap byte on a
    /// differencing disk (module documentation, "libvhdi").
    fn granule(&self) -> u64 {
        if self.parent.is_some() {
            BIT_GRANULE
        } else {
            1
        }
    }

    /// Give the bit-0 `sectors` (ascending) of block `block` (data at file offset `data_at`)
    /// the content they read as before their bits are set: zeroes, or the parent's bytes.
    fn fill_absent(&self, d: &Dynamic, block: u32, data_at: u64, sectors: &[u64]) -> Result<()> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for &s in sectors {
            match runs.last_mut() {
                Some((start, n)) if *start + *n == s => *n += 1,
                _ => runs.push((s, 1)),
            }
        }
        for (s, n) in runs {
            let at = data_at + s * SECTOR;
            if self.parent.is_none() {
                self.store
                    .zero_range(at, n * SECTOR)
                    .map_err(bio("write", at))?;
                continue;
            }
            let disk_at = u64::from(block) * d.layout.block_size + s * SECTOR;
            let mut buf = vec![0u8; to_usize(n * SECTOR)?];
            self.absent(disk_at, &mut buf)?;
            self.store
                .write_all_at(&buf, at)
                .map_err(bio("write", at))?;
        }
        Ok(())
    }

    /// Write `src` over `offset..offset + len` (module documentation: allocation order and
    /// writes to allocated blocks).
    fn write_dynamic(&self, d: &Dynamic, offset: u64, len: u64, src: Src<'_>) -> Result<()> {
        for c in chunks(offset, len, d.layout.block_size) {
            let piece = match src {
                Src::Data(data) => {
                    let pos = to_usize(c.pos)?;
                    Src::Data(
                        data.get(pos..pos.saturating_add(to_usize(c.len)?))
                            .ok_or(BackstoreError::Unsupported("chunk"))?,
                    )
                }
                Src::Zero => Src::Zero,
            };
            let mut meta = lock(&d.meta);
            let entry = Self::entry(&meta, c.block)?;
            if entry == UNALLOCATED {
                self.allocate(d, &mut meta, &c, piece)?;
                continue;
            }
            let block_at = u64::from(entry) * SECTOR;
            let data_at = block_at + d.layout.bitmap_size;
            let at = data_at + c.in_block;
            let now_full = match self.bitmap(d, &mut meta, c.block, block_at)? {
                Bitmap::Full => None,
                Bitmap::Bits(bits) => {
                    let (first, last) = c.sectors();
                    if (first..=last).all(|s| bit(bits, s)) {
                        // Every sector is present: a plain data write, outside the lock.
                        None
                    } else {
                        let block_sectors = d.layout.block_size / SECTOR;
                        let (lo, hi, uncovered) = c.widened(self.granule(), block_sectors);
                        let absent: Vec<u64> =
                            uncovered.into_iter().filter(|&s| !bit(bits, s)).collect();
                        self.fill_absent(d, c.block, data_at, &absent)?;
                        self.put(piece, at, c.len)?;
                        if self.parent.is_some() {
                            // The data must be durable before a bit claims it.
                            self.store.sync().map_err(bio("sync", at))?;
                        }
                        for s in lo..=hi {
                            set_bit(bits, s, true);
                        }
                        self.store
                            .write_all_at(bits, block_at)
                            .map_err(bio("write bitmap", block_at))?;
                        Some(all_set(d, bits))
                    }
                }
            };
            match now_full {
                None => {
                    drop(meta);
                    self.put(piece, at, c.len)?;
                }
                Some(true) => {
                    meta.bitmaps.insert(c.block, Bitmap::Full);
                }
                Some(false) => {}
            }
        }
        Ok(())
    }

    /// Append a block for `c` holding `src` (the order is in the module documentation).
    fn allocate(&self, d: &Dynamic, meta: &mut Meta, c: &Chunk, src: Src<'_>) -> Result<()> {
        let old_end = meta.free;
        let no_space = BackstoreError::NoSpace {
            op: "allocate",
            offset: old_end,
        };
        let sector = u32::try_from(old_end / SECTOR)
            .ok()
            .filter(|&s| s != UNALLOCATED)
            .ok_or(BackstoreError::NoSpace {
                op: "allocate",
                offset: old_end,
            })?;
        let new_end = old_end
            .checked_add(d.layout.block_span())
            .filter(|e| {
                e.checked_add(FOOTER_LEN)
                    .is_some_and(|x| x <= crate::MAX_SIZE)
            })
            .ok_or(no_space)?;
        let file_len = self.store.len().map_err(bio("allocate", old_end))?;
        // 1. A footer past the new block, durable before anything else moves; unless the
        //    block and that footer fit below the file's last 512 bytes (leaked space), which
        //    then stay the trailing footer, untouched.
        if new_end.saturating_add(FOOTER_LEN) >= file_len {
            self.store
                .write_all_at(&self.footer_bytes, new_end)
                .map_err(bio("write footer", new_end))?;
            self.store.sync().map_err(bio("sync", new_end))?;
        }
        // 2. No stale bytes inside the new block.
        if file_len > old_end {
            let n = file_len.min(new_end) - old_end;
            self.store
                .zero_range(old_end, n)
                .map_err(bio("zero block", old_end))?;
        }
        // 3. Bitmap and data: all ones on a dynamic disk; on a differencing disk the bytes of
        //    the bitmap covering the written sectors, the rest of their sectors copied from the
        //    parent.
        let mut bits = vec![0xFFu8; to_usize(d.layout.bitmap_size)?];
        let data_at = old_end + d.layout.bitmap_size;
        if self.parent.is_some() {
            bits.fill(0);
            let (lo, hi, uncovered) = c.widened(BIT_GRANULE, d.layout.block_size / SECTOR);
            for s in lo..=hi {
                set_bit(&mut bits, s, true);
            }
            self.fill_absent(d, c.block, data_at, &uncovered)?;
        }
        self.store
            .write_all_at(&bits, old_end)
            .map_err(bio("write bitmap", old_end))?;
        self.put(src, data_at + c.in_block, c.len)?;
        // 4. Block durable before the BAT can point at it.
        self.store.sync().map_err(bio("sync", old_end))?;
        // 5. The BAT entry.
        let bat_at = d.layout.table_offset + u64::from(c.block) * bat::ENTRY_LEN;
        self.store
            .write_all_at(&sector.to_be_bytes(), bat_at)
            .map_err(bio("write BAT", bat_at))?;
        if let Some(e) = meta
            .bat
            .get_mut(usize::try_from(c.block).unwrap_or(usize::MAX))
        {
            *e = sector;
        }
        meta.free = new_end;
        let cached = if all_set(d, &bits) {
            Bitmap::Full
        } else {
            Bitmap::Bits(bits.into_boxed_slice())
        };
        meta.bitmaps.insert(c.block, cached);
        Ok(())
    }

    fn zero_dynamic(&self, d: &Dynamic, offset: u64, len: u64, unmap: bool) -> Result<()> {
        for c in chunks(offset, len, d.layout.block_size) {
            let mut meta = lock(&d.meta);
            let entry = Self::entry(&meta, c.block)?;
            if entry == UNALLOCATED {
                continue;
            }
            let block_at = u64::from(entry) * SECTOR;
            let at = block_at + d.layout.bitmap_size + c.in_block;
            self.store.zero_range(at, c.len).map_err(bio("zero", at))?;
            if !unmap {
                continue;
            }
            // Clear the bits of fully covered sectors.
            let first = c.in_block.div_ceil(SECTOR);
            let end = (c.in_block + c.len) / SECTOR;
            if first >= end {
                continue;
            }
            let bitmap_len = to_usize(d.layout.bitmap_size)?;
            let bm = self.bitmap(d, &mut meta, c.block, block_at)?;
            if let Bitmap::Full = bm {
                *bm = Bitmap::Bits(vec![0xFFu8; bitmap_len].into_boxed_slice());
            }
            if let Bitmap::Bits(bits) = bm {
                for s in first..end {
                    set_bit(bits, s, false);
                }
                self.store
                    .write_all_at(bits, block_at)
                    .map_err(bio("write bitmap", block_at))?;
            }
        }
        Ok(())
    }

    fn extents_dynamic(&self, d: &Dynamic, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let mut out: Vec<Extent> = Vec::new();
        let push = |out: &mut Vec<Extent>, at: u64, n: u64, mapped: bool| match out.last_mut() {
            Some(last) if last.mapped == mapped => last.len += n,
            _ => out.push(Extent {
                offset: at,
                len: n,
                mapped,
            }),
        };
        for c in chunks(offset, len, d.layout.block_size) {
            if out.len() >= MAX_EXTENTS {
                break;
            }
            let at = offset + c.pos;
            let mut meta = lock(&d.meta);
            let entry = Self::entry(&meta, c.block)?;
            if entry == UNALLOCATED {
                push(&mut out, at, c.len, false);
                continue;
            }
            let block_at = u64::from(entry) * SECTOR;
            match self.bitmap(d, &mut meta, c.block, block_at)? {
                Bitmap::Full => push(&mut out, at, c.len, true),
                Bitmap::Bits(bits) => {
                    for (start, n, present) in sector_runs(bits, c.in_block, c.len) {
                        push(&mut out, at + (start - c.in_block), n, present);
                    }
                }
            }
        }
        Ok(out)
    }
}

/// Whether every sector of a block is present.
fn all_set(d: &Dynamic, bits: &[u8]) -> bool {
    (0..d.layout.block_size / SECTOR).all(|s| bit(bits, s))
}

fn lock(m: &Mutex<Meta>) -> MutexGuard<'_, Meta> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<S: Store> BlockBackend for VhdBackend<S> {
    fn size(&self) -> u64 {
        self.size
    }

    fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        check_range(offset, len64(len), self.size)?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        self.buffers.read_with(len, |buf| match &self.format {
            Format::Fixed => self
                .store
                .read_exact_at(buf, offset)
                .map_err(bio("read", offset)),
            Format::Dynamic(d) => self.read_dynamic(d, offset, buf),
        })
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        check_range(offset, len64(data.len()), self.size)?;
        self.writable("write")?;
        if data.is_empty() {
            return Ok(());
        }
        match &self.format {
            Format::Fixed => self
                .store
                .write_all_at(data, offset)
                .map_err(bio("write", offset))?,
            Format::Dynamic(d) => {
                self.write_dynamic(d, offset, len64(data.len()), Src::Data(data))?;
            }
        }
        if fua {
            // One barrier for data, bitmaps and BAT entries alike.
            self.store.sync().map_err(bio("fua sync", offset))?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.store.sync().map_err(bio("flush", 0))
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        check_range(offset, len, self.size)?;
        self.writable("write zeroes")?;
        if len == 0 {
            return Ok(());
        }
        match &self.format {
            Format::Fixed => self
                .store
                .zero_range(offset, len)
                .map_err(bio("write zeroes", offset)),
            Format::Dynamic(d) if self.is_differencing() => {
                self.write_dynamic(d, offset, len, Src::Zero)
            }
            Format::Dynamic(d) => self.zero_dynamic(d, offset, len, unmap),
        }
    }

    fn unmap(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len, true)
    }

    /// Dynamic disks: unmapped sectors lose their bitmap bits. Fixed disks are fully
    /// provisioned (their data area is the disk); so are differencing disks, whose unmapped
    /// sectors are written as zeroes (a cleared bit would show the parent).
    fn thin_provisioning(&self) -> bool {
        matches!(self.format, Format::Dynamic(_)) && !self.is_differencing()
    }

    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let end = check_range(offset, len, self.size)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        if offset >= self.size {
            return Err(BackstoreError::OutOfRange {
                offset,
                len,
                size: self.size,
            });
        }
        match &self.format {
            Format::Dynamic(d) if !self.is_differencing() => self.extents_dynamic(d, offset, len),
            _ => Ok(vec![Extent {
                offset,
                len: end - offset,
                mapped: true,
            }]),
        }
    }
}

/// Parameters of a new image; [`CreateOptions::new`] stamps the time and a random UUID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreateOptions {
    /// Store the size exactly (creator "qem2", maximum CHS), as `qemu-img -o force_size=on`;
    /// otherwise round it up to a CHS-representable size (creator "qemu"), as `qemu-img`.
    pub force_size: bool,
    /// Dynamic disks: bytes per block, a power of two (default 2 MiB).
    pub block_size: u32,
    /// Seconds since 2000-01-01 UTC.
    pub timestamp: u32,
    pub unique_id: [u8; 16],
}

impl CreateOptions {
    /// Defaults with the current time and a random (version 4) UUID.
    pub fn new() -> Self {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut id = [0u8; 16];
        for half in id.chunks_mut(8) {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(now);
            half.copy_from_slice(&h.finish().to_be_bytes());
        }
        if let Some(b) = id.get_mut(6) {
            *b = (*b & 0x0f) | 0x40;
        }
        if let Some(b) = id.get_mut(8) {
            *b = (*b & 0x3f) | 0x80;
        }
        Self {
            force_size: false,
            block_size: DEFAULT_BLOCK_SIZE,
            timestamp: u32::try_from(now.saturating_sub(VHD_EPOCH_UNIX)).unwrap_or(u32::MAX),
            unique_id: id,
        }
    }
}

impl Default for CreateOptions {
    fn default() -> Self {
        Self::new()
    }
}

fn create_err(field: &'static str, reason: impl Into<String>) -> VhdError {
    VhdError::Create {
        field,
        reason: reason.into(),
    }
}

/// The footer for a new disk of (at least) `size` bytes, by QEMU's `vpc_create` rules.
fn new_footer(
    size: u64,
    disk_type: DiskType,
    opts: &CreateOptions,
) -> std::result::Result<Footer, VhdError> {
    if size == 0 || !size.is_multiple_of(SECTOR) {
        return Err(create_err(
            "size",
            format!("{size} is not a positive multiple of 512"),
        ));
    }
    let sectors = size / SECTOR;
    if sectors > MAX_SECTORS {
        return Err(create_err("size", "larger than 2040 GiB"));
    }
    let (geometry, current, app) = if opts.force_size {
        (MAX_GEOMETRY, size, *b"qem2")
    } else {
        let g = Geometry::covering(sectors).ok_or_else(|| create_err("size", "no geometry"))?;
        let current = if g == MAX_GEOMETRY {
            size
        } else {
            g.total_sectors() * SECTOR
        };
        (g, current, *b"qemu")
    };
    Ok(Footer {
        features: FEATURE_RESERVED,
        format_version: FORMAT_VERSION,
        data_offset: if disk_type == DiskType::Fixed {
            NO_DATA_OFFSET
        } else {
            CREATE_HEADER_AT
        },
        timestamp: opts.timestamp,
        creator_app: app,
        creator_version: 0x0005_0003,
        creator_os: *b"Wi2k",
        original_size: current,
        current_size: current,
        geometry,
        disk_type,
        unique_id: opts.unique_id,
        saved_state: false,
    })
}

/// Write a new fixed disk into the empty `store` and open it.
pub fn format_fixed<S: Store>(
    store: S,
    size: u64,
    opts: &CreateOptions,
) -> std::result::Result<VhdBackend<S>, VhdError> {
    let footer = new_footer(size, DiskType::Fixed, opts)?;
    let data = footer.current_size;
    store.set_len(data).map_err(io_err("create", 0))?;
    store
        .write_all_at(&footer.encode(), data)
        .map_err(io_err("create", data))?;
    store.sync().map_err(io_err("create", 0))?;
    VhdBackend::open_store(store, false)
}

fn check_block_size(block: u32) -> std::result::Result<(), VhdError> {
    if !block.is_power_of_two()
        || !(super::header::MIN_BLOCK_SIZE..=super::header::MAX_BLOCK_SIZE).contains(&block)
    {
        return Err(create_err(
            "block_size",
            format!("{block} is not a power of two in 512..=256 MiB"),
        ));
    }
    Ok(())
}

/// Write a new dynamic disk into the empty `store` and open it: footer copy at 0, header at
/// 512, BAT at 1536 padded with unallocated entries to a sector, footer after it (§4.5).
pub fn format_dynamic<S: Store>(
    store: S,
    size: u64,
    opts: &CreateOptions,
) -> std::result::Result<VhdBackend<S>, VhdError> {
    let block = opts.block_size;
    check_block_size(block)?;
    let footer = new_footer(size, DiskType::Dynamic, opts)?;
    let entries = u32::try_from(footer.current_size.div_ceil(u64::from(block)))
        .ok()
        .filter(|&e| e <= MAX_BAT_ENTRIES)
        .ok_or_else(|| create_err("size", "too many blocks"))?;
    let header = DynamicHeader::new(CREATE_BAT_AT, entries, block);
    let bat_len = (u64::from(entries) * bat::ENTRY_LEN).div_ceil(SECTOR) * SECTOR;
    let footer_at = CREATE_BAT_AT + bat_len;
    let fb = footer.encode();
    store.set_len(0).map_err(io_err("create", 0))?;
    store.write_all_at(&fb, 0).map_err(io_err("create", 0))?;
    store
        .write_all_at(&header.encode(), CREATE_HEADER_AT)
        .map_err(io_err("create", CREATE_HEADER_AT))?;
    let table = vec![0xFFu8; usize::try_from(bat_len).map_err(|_| create_err("size", "BAT"))?];
    store
        .write_all_at(&table, CREATE_BAT_AT)
        .map_err(io_err("create", CREATE_BAT_AT))?;
    store
        .write_all_at(&fb, footer_at)
        .map_err(io_err("create", footer_at))?;
    store.sync().map_err(io_err("create", 0))?;
    VhdBackend::open_store(store, false)
}

fn create_file(path: &Path) -> std::result::Result<File, VhdError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io_err("create", 0))
}

/// Create a fixed VHD at `path` (which must not exist) and open it.
pub fn create_fixed(
    path: impl AsRef<Path>,
    size: u64,
    opts: &CreateOptions,
) -> std::result::Result<VhdBackend<File>, VhdError> {
    format_fixed(create_file(path.as_ref())?, size, opts)
}

/// Create a dynamic VHD at `path` (which must not exist) and open it.
pub fn create_dynamic(
    path: impl AsRef<Path>,
    size: u64,
    opts: &CreateOptions,
) -> std::result::Result<VhdBackend<File>, VhdError> {
    format_dynamic(create_file(path.as_ref())?, size, opts)
}

/// The writes (offset, bytes) that make an empty store a differencing disk whose parent is
/// `p`, with parent name `name` and the locators `texts` (platform code, text) stored after
/// the BAT, in that order.
///
/// The child copies the parent footer's size fields (original and current size, CHS
/// geometry; creator "qem2" when the parent is sized by its current size, so that the child
/// has the parent's size by QEMU's rule), has disk type 4 and the block size of a dynamic or
/// differencing parent (`opts.block_size` under a fixed parent, 2 MiB by default). The header
/// records the parent's footer unique id and time stamp and `name` (UTF-16BE).
fn differencing_image<P: Store>(
    p: &VhdBackend<P>,
    name: &str,
    texts: &[([u8; 4], String)],
    opts: &CreateOptions,
) -> std::result::Result<Vec<(u64, Vec<u8>)>, VhdError> {
    let block = match &p.format {
        Format::Dynamic(d) => d.header.block_size,
        Format::Fixed => opts.block_size,
    };
    check_block_size(block)?;
    let pf = &p.footer;
    let footer = Footer {
        features: FEATURE_RESERVED,
        format_version: FORMAT_VERSION,
        data_offset: CREATE_HEADER_AT,
        timestamp: opts.timestamp,
        creator_app: if pf.sized_by_current_size() {
            *b"qem2"
        } else {
            *b"qemu"
        },
        creator_version: 0x0005_0003,
        creator_os: *b"Wi2k",
        original_size: pf.original_size,
        current_size: pf.current_size,
        geometry: pf.geometry,
        disk_type: DiskType::Differencing,
        unique_id: opts.unique_id,
        saved_state: false,
    };
    if footer.disk_size()? != p.size {
        return Err(create_err(
            "size",
            format!("the child would not have the parent's {} bytes", p.size),
        ));
    }
    let covered = p.size.max(footer.current_size);
    let entries = u32::try_from(covered.div_ceil(u64::from(block)))
        .ok()
        .filter(|&e| e <= MAX_BAT_ENTRIES)
        .ok_or_else(|| create_err("size", "too many blocks"))?;
    let mut header = DynamicHeader::new(CREATE_BAT_AT, entries, block);
    header.parent_unique_id = pf.unique_id;
    header.parent_timestamp = pf.timestamp;
    header.parent_name = locator::encode_name(name)?;
    if texts.len() > header.parent_locators.len() {
        return Err(create_err("parent", "more than 8 locators"));
    }
    let bat_len = (u64::from(entries) * bat::ENTRY_LEN).div_ceil(SECTOR) * SECTOR;
    let fb = footer.encode();
    let mut writes = vec![
        (0, fb.to_vec()),
        (
            CREATE_BAT_AT,
            vec![0xFFu8; to_usize(bat_len).map_err(|_| create_err("size", "BAT"))?],
        ),
    ];
    let mut at = CREATE_BAT_AT + bat_len;
    for ((code, text), slot) in texts.iter().zip(header.parent_locators.iter_mut()) {
        let data = locator::encode_data(*code, text);
        let space = len64(data.len()).div_ceil(SECTOR).max(1);
        *slot = ParentLocator {
            platform_code: *code,
            data_space: u32::try_from(space).map_err(|_| create_err("parent", "path too long"))?,
            data_length: u32::try_from(data.len())
                .ok()
                .filter(|&n| n <= locator::MAX_DATA_LEN)
                .ok_or_else(|| create_err("parent", "path too long"))?,
            data_offset: at,
        };
        writes.push((at, data));
        at += space * SECTOR;
    }
    writes.push((CREATE_HEADER_AT, header.encode().to_vec()));
    writes.push((at, fb.to_vec()));
    Ok(writes)
}

fn apply_writes<S: Store + ?Sized>(
    store: &S,
    writes: &[(u64, Vec<u8>)],
) -> std::result::Result<(), VhdError> {
    for (at, data) in writes {
        store
            .write_all_at(data, *at)
            .map_err(io_err("create", *at))?;
    }
    store.sync().map_err(io_err("create", 0))
}

/// Write a differencing disk whose parent is `parent` into the empty `store` and open it with
/// that parent (tests, fuzzing). `name` is the parent name recorded; `locators` are
/// (platform code, text) pairs stored after the BAT, e.g. `(locator::W2RU, ".\\p.vhd")`.
/// Layout and copied fields as [`create_differencing`].
pub fn format_differencing<S: Store, P: Store>(
    store: S,
    parent: Arc<VhdBackend<P>>,
    name: &str,
    locators: &[([u8; 4], String)],
    opts: &CreateOptions,
) -> std::result::Result<VhdBackend<S>, VhdError> {
    let writes = differencing_image(&parent, name, locators, opts)?;
    store.set_len(0).map_err(io_err("create", 0))?;
    apply_writes(&store, &writes)?;
    VhdBackend::open_store_with_parent(store, false, Some(parent))
}

/// Create a differencing VHD at `path` (which must not exist) whose parent is the image at
/// `parent`, and open it with that parent (resolved through the new locators).
///
/// Fields are copied as described on [`format_differencing`]; the parent name is the parent's
/// file name, and two locators follow the BAT: W2ku with the canonical absolute path and
/// W2ru with the path relative to the child's directory (`.\name` in the same directory),
/// both UTF-16LE.
pub fn create_differencing(
    path: impl AsRef<Path>,
    parent: &Path,
    opts: &CreateOptions,
) -> std::result::Result<VhdBackend<File>, VhdError> {
    let path = path.as_ref();
    let parent_real = std::fs::canonicalize(parent).map_err(io_err("canonicalize parent", 0))?;
    let p = VhdBackend::open(&parent_real, true)?;
    let name = parent_real
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| create_err("parent", "the parent's file name is not UTF-8"))?;
    let abs = parent_real
        .to_str()
        .ok_or_else(|| create_err("parent", "the parent's path is not UTF-8"))?;
    let child_dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let child_dir = std::fs::canonicalize(child_dir).map_err(io_err("canonicalize", 0))?;
    let mut texts = vec![(locator::W2KU, abs.to_owned())];
    if let Some(rel) = locator::relative_text(&child_dir, &parent_real) {
        texts.push((locator::W2RU, rel));
    }
    let writes = differencing_image(&p, name, &texts, opts)?;
    drop(p);
    let file = create_file(path)?;
    let opened = apply_writes(&file, &writes).and_then(|()| {
        drop(file);
        VhdBackend::open(path, false)
    });
    if opened.is_err() {
        // The file is ours (created above): do not leave an unusable child behind.
        let _ = std::fs::remove_file(path);
    }
    opened
}
