//! A VHD image served as a [`BlockBackend`]: fixed and dynamic disks (semantics.md §4.3-§4.5).
//!
//! # Opening
//! The footer at the end of the file is authoritative. When it is unreadable and the copy at
//! offset 0 is a valid dynamic footer, the copy is used (QEMU does the same; a crash inside
//! QEMU's own allocation order leaves no trailing footer). Every offset is checked against the
//! file length with checked arithmetic; BAT entries must point at blocks inside the file that
//! overlap neither each other nor the metadata.
//!
//! # Allocating a block (dynamic disks)
//! The next block goes at `free`, the end of the last block (QEMU's `free_data_block_offset`),
//! where the trailing footer usually sits. With `new_end = free + bitmap + block`:
//!
//! 1. write the footer at `new_end` (the file now ends in a footer past the new block), **sync**;
//! 2. zero `free..new_end` where it lies inside the old file (the old footer, or space leaked by
//!    an earlier crash, must not show through unwritten sectors: QEMU ignores bitmap bits);
//! 3. write the bitmap (all ones, as QEMU) and the guest data into the block;
//! 4. **sync**;
//! 5. write the 4-byte BAT entry; it is durable at the next sync (FUA write or `flush`).
//!
//! A crash anywhere before step 5 reaches the disk leaves the old image, with the file's last
//! 512 bytes still a footer (step 1 is durable before anything else changes; footers are
//! identical bytes) and the space past `free` leaked: QEMU's `free_data_block_offset` and ours
//! are recomputed from the BAT and stay within the file. After step 5 the entry points at a
//! block whose bitmap, zeroes and data were made durable by step 4, so no stale bytes are ever
//! exposed. The single 4-byte entry lies within one sector. The lost guest write was never
//! acknowledged. Cost: two syncs per allocation; writes to allocated blocks are plain pwrites.
//!
//! # Bitmaps, unmap and extents
//! Bitmap bit = 1: the sector's data is in the block (MSB of byte 0 = first sector). Reads
//! honour the bits (bit 0 reads zeroes). `unmap` and `write_zeroes` zero the data in allocated
//! blocks (punching holes in the file) and clear the bits of fully covered sectors; blocks are
//! never returned to the BAT (the file does not shrink). `extents` reports unallocated blocks
//! and bit-0 sectors as deallocated.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::path::Path;
use std::sync::{Mutex, MutexGuard, PoisonError};

use bytes::Bytes;

use super::bat::{self, Layout, MAX_BAT_ENTRIES, UNALLOCATED};
use super::footer::{
    DiskType, Footer, Geometry, FEATURE_RESERVED, FOOTER_LEN, FOOTER_SIZE, FORMAT_VERSION,
    MAX_GEOMETRY, MAX_SECTORS, NO_DATA_OFFSET, VHD_EPOCH_UNIX,
};
use super::header::{DynamicHeader, DEFAULT_BLOCK_SIZE, HEADER_LEN, HEADER_SIZE};
use super::store::Store;
use super::VhdError;
use crate::{check_range, BackstoreError, BlockBackend, Extent, Result};

/// Sector size of VHD addressing.
const SECTOR: u64 = 512;
/// Most extents returned by one `extents` call.
const MAX_EXTENTS: usize = 4096;
/// Where `create_dynamic` puts the dynamic header and the BAT (as QEMU, §4.5).
const CREATE_HEADER_AT: u64 = 512;
const CREATE_BAT_AT: u64 = 1536;

/// What `open` found, for `info`-style reporting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhdInfo {
    pub disk_type: DiskType,
    /// Size served, by QEMU's rule (§4.5).
    pub size: u64,
    pub footer: Footer,
    pub header: Option<DynamicHeader>,
    pub allocated_blocks: u32,
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
}

#[derive(Debug)]
enum Format {
    Fixed,
    Dynamic(Box<Dynamic>),
}

/// A fixed or dynamic VHD over a [`Store`]. See the module documentation.
#[derive(Debug)]
pub struct VhdBackend<S: Store = File> {
    store: S,
    size: u64,
    read_only: bool,
    footer: Footer,
    footer_bytes: [u8; FOOTER_SIZE],
    format: Format,
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

impl VhdBackend<File> {
    /// Open the VHD at `path` (read-write unless `read_only`).
    pub fn open(path: impl AsRef<Path>, read_only: bool) -> std::result::Result<Self, VhdError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(io_err("open", 0))?;
        Self::open_store(file, read_only)
    }
}

impl<S: Store> VhdBackend<S> {
    /// Open a VHD held by `store`, validating footer, header and BAT (module documentation).
    pub fn open_store(store: S, read_only: bool) -> std::result::Result<Self, VhdError> {
        let len = store.len().map_err(io_err("open", 0))?;
        if len < FOOTER_LEN {
            return Err(file_err(format!("{len} bytes, shorter than a footer")));
        }
        let mut tail = [0u8; FOOTER_SIZE];
        store
            .read_exact_at(&mut tail, len - FOOTER_LEN)
            .map_err(io_err("read footer", len - FOOTER_LEN))?;
        let (footer, footer_bytes) = match Footer::parse(&tail) {
            Ok(f) => (f, tail),
            Err(tail_err) => {
                let mut head = [0u8; FOOTER_SIZE];
                store
                    .read_exact_at(&mut head, 0)
                    .map_err(io_err("read footer copy", 0))?;
                match Footer::parse(&head) {
                    Ok(f) if f.disk_type != DiskType::Fixed => (f, head),
                    _ => return Err(tail_err),
                }
            }
        };
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
                let d = Self::open_dynamic(&store, &footer, size, len)?;
                if footer.disk_type == DiskType::Differencing {
                    return Err(VhdError::Unsupported("differencing"));
                }
                Format::Dynamic(Box::new(d))
            }
        };
        Ok(Self {
            store,
            size,
            read_only,
            footer,
            footer_bytes,
            format,
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
        let mut raw = vec![0u8; to_usize(layout.table_len()).map_err(|_| file_err("BAT size"))?];
        store
            .read_exact_at(&mut raw, layout.table_offset)
            .map_err(io_err("read BAT", layout.table_offset))?;
        let table = bat::decode(&raw);
        let reserved = [
            (0, FOOTER_LEN, "footer copy"),
            (header_at, header_end, "dynamic header"),
            (layout.table_offset, table_padded, "BAT"),
        ];
        let free = bat::validate(&table, &layout, &reserved, len)?;
        Ok(Dynamic {
            header,
            layout,
            meta: Mutex::new(Meta {
                bat: table,
                free,
                bitmaps: HashMap::new(),
            }),
        })
    }

    /// Footer, header and allocation summary.
    pub fn info(&self) -> VhdInfo {
        let (header, allocated_blocks) = match &self.format {
            Format::Fixed => (None, 0),
            Format::Dynamic(d) => {
                let meta = lock(&d.meta);
                let n = meta.bat.iter().filter(|&&e| e != UNALLOCATED).count();
                (Some(d.header.clone()), u32::try_from(n).unwrap_or(u32::MAX))
            }
        };
        VhdInfo {
            disk_type: self.footer.disk_type,
            size: self.size,
            footer: self.footer.clone(),
            header,
            allocated_blocks,
        }
    }

    /// The store underneath (tests inspect it).
    pub fn store(&self) -> &S {
        &self.store
    }

    fn writable(&self, op: &'static str) -> Result<()> {
        if self.read_only {
            Err(BackstoreError::ReadOnly { op })
        } else {
            Ok(())
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
                let sectors = d.layout.block_size / SECTOR;
                let full = (0..sectors).all(|s| bit(&bits, s));
                Ok(e.insert(if full {
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
            let mut meta = lock(&d.meta);
            let entry = Self::entry(&meta, c.block)?;
            if entry == UNALLOCATED {
                continue;
            }
            let block_at = u64::from(entry) * SECTOR;
            let data_at = block_at + d.layout.bitmap_size;
            match self.bitmap(d, &mut meta, c.block, block_at)? {
                Bitmap::Full => {
                    drop(meta);
                    let at = data_at + c.in_block;
                    self.store.read_exact_at(dst, at).map_err(bio("read", at))?;
                }
                Bitmap::Bits(bits) => {
                    for (start, n, present) in sector_runs(bits, c.in_block, c.len) {
                        if !present {
                            continue;
                        }
                        let from = to_usize(start - c.in_block)?;
                        let part = dst
                            .get_mut(from..from.saturating_add(to_usize(n)?))
                            .ok_or(BackstoreError::Unsupported("run"))?;
                        let at = data_at + start;
                        self.store
                            .read_exact_at(part, at)
                            .map_err(bio("read", at))?;
                    }
                }
            }
        }
        Ok(())
    }

    fn write_dynamic(&self, d: &Dynamic, offset: u64, data: &[u8]) -> Result<()> {
        for c in chunks(offset, len64(data.len()), d.layout.block_size) {
            let pos = to_usize(c.pos)?;
            let src = data
                .get(pos..pos.saturating_add(to_usize(c.len)?))
                .ok_or(BackstoreError::Unsupported("chunk"))?;
            let mut meta = lock(&d.meta);
            let entry = Self::entry(&meta, c.block)?;
            if entry == UNALLOCATED {
                self.allocate(d, &mut meta, &c, src)?;
                continue;
            }
            let block_at = u64::from(entry) * SECTOR;
            let data_at = block_at + d.layout.bitmap_size;
            let at = data_at + c.in_block;
            let now_full = match self.bitmap(d, &mut meta, c.block, block_at)? {
                Bitmap::Full => None,
                Bitmap::Bits(bits) => {
                    // Absent sectors may hold stale bytes in foreign images: zero the partially
                    // written ones first, write, then mark them present.
                    let first = c.in_block / SECTOR;
                    let last = (c.in_block + c.len - 1) / SECTOR;
                    for s in [first, last] {
                        if !bit(bits, s) {
                            let s_at = data_at + s * SECTOR;
                            self.store
                                .zero_range(s_at, SECTOR)
                                .map_err(bio("write", s_at))?;
                        }
                    }
                    self.store.write_all_at(src, at).map_err(bio("write", at))?;
                    for s in first..=last {
                        set_bit(bits, s, true);
                    }
                    self.store
                        .write_all_at(bits, block_at)
                        .map_err(bio("write bitmap", block_at))?;
                    let sectors = d.layout.block_size / SECTOR;
                    Some((0..sectors).all(|s| bit(bits, s)))
                }
            };
            match now_full {
                None => {
                    drop(meta);
                    self.store.write_all_at(src, at).map_err(bio("write", at))?;
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
    fn allocate(&self, d: &Dynamic, meta: &mut Meta, c: &Chunk, src: &[u8]) -> Result<()> {
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
        // 1. A footer past the new block, durable before anything else moves.
        self.store
            .write_all_at(&self.footer_bytes, new_end)
            .map_err(bio("write footer", new_end))?;
        self.store.sync().map_err(bio("sync", new_end))?;
        // 2. No stale bytes inside the new block.
        if file_len > old_end {
            let n = file_len.min(new_end) - old_end;
            self.store
                .zero_range(old_end, n)
                .map_err(bio("zero block", old_end))?;
        }
        // 3. Bitmap and data.
        let bits = vec![0xFFu8; to_usize(d.layout.bitmap_size)?];
        self.store
            .write_all_at(&bits, old_end)
            .map_err(bio("write bitmap", old_end))?;
        let at = old_end + d.layout.bitmap_size + c.in_block;
        self.store.write_all_at(src, at).map_err(bio("write", at))?;
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
        meta.bitmaps.insert(c.block, Bitmap::Full);
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

fn lock(m: &Mutex<Meta>) -> MutexGuard<'_, Meta> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<S: Store> BlockBackend for VhdBackend<S> {
    fn size(&self) -> u64 {
        self.size
    }

    fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        check_range(offset, len64(len), self.size)?;
        let mut buf = vec![0u8; len];
        if len == 0 {
            return Ok(Bytes::new());
        }
        match &self.format {
            Format::Fixed => self
                .store
                .read_exact_at(&mut buf, offset)
                .map_err(bio("read", offset))?,
            Format::Dynamic(d) => self.read_dynamic(d, offset, &mut buf)?,
        }
        Ok(Bytes::from(buf))
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
            Format::Dynamic(d) => self.write_dynamic(d, offset, data)?,
        }
        if fua {
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
            Format::Dynamic(d) => self.zero_dynamic(d, offset, len, unmap),
        }
    }

    fn unmap(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len, true)
    }

    /// Dynamic disks: unmapped sectors lose their bitmap bits. Fixed disks are fully
    /// provisioned (their data area is the disk).
    fn thin_provisioning(&self) -> bool {
        matches!(self.format, Format::Dynamic(_))
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
            Format::Fixed => Ok(vec![Extent {
                offset,
                len: end - offset,
                mapped: true,
            }]),
            Format::Dynamic(d) => self.extents_dynamic(d, offset, len),
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

/// Write a new dynamic disk into the empty `store` and open it: footer copy at 0, header at
/// 512, BAT at 1536 padded with unallocated entries to a sector, footer after it (§4.5).
pub fn format_dynamic<S: Store>(
    store: S,
    size: u64,
    opts: &CreateOptions,
) -> std::result::Result<VhdBackend<S>, VhdError> {
    let block = opts.block_size;
    if !block.is_power_of_two()
        || !(super::header::MIN_BLOCK_SIZE..=super::header::MAX_BLOCK_SIZE).contains(&block)
    {
        return Err(create_err(
            "block_size",
            format!("{block} is not a power of two in 512..=256 MiB"),
        ));
    }
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
