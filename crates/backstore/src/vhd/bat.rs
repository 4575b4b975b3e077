//! The block allocation table (semantics.md §4.3): one big-endian u32 per block, the sector
//! number of the block's bitmap, or [`UNALLOCATED`].

use super::VhdError;

/// BAT entry of a block that is not allocated (reads as zeroes on a dynamic disk).
pub const UNALLOCATED: u32 = u32::MAX;
/// Most BAT entries accepted (64 MiB of table): a local bound so that a hostile
/// `max_table_entries` cannot make `open` allocate without limit.
pub const MAX_BAT_ENTRIES: u32 = 1 << 24;
/// Bytes per BAT entry.
pub const ENTRY_LEN: u64 = 4;

/// Where the BAT and the blocks are, from the dynamic header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub table_offset: u64,
    pub entries: u32,
    pub block_size: u64,
    pub bitmap_size: u64,
}

impl Layout {
    /// Bytes of the table on disk, unpadded.
    pub fn table_len(&self) -> u64 {
        u64::from(self.entries) * ENTRY_LEN
    }

    /// Bytes one allocated block takes in the file: bitmap then data.
    pub fn block_span(&self) -> u64 {
        self.bitmap_size.saturating_add(self.block_size)
    }
}

fn err(index: u32, reason: impl Into<String>) -> VhdError {
    VhdError::Bat {
        index,
        reason: reason.into(),
    }
}

/// Decode `bytes` (a whole number of entries) into entries.
pub fn decode(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks_exact(4)
        .map(|c| {
            let mut e = [0u8; 4];
            e.copy_from_slice(c);
            u32::from_be_bytes(e)
        })
        .collect()
}

/// Check every allocated entry: its bitmap and data lie within `file_len`, overlap no other
/// block and none of the `reserved` metadata ranges (`(start, end, name)`). Returns the first
/// free byte after the metadata and all blocks, rounded up to a sector: where the next block
/// goes (QEMU's `free_data_block_offset`, §4.4).
pub fn validate(
    bat: &[u32],
    layout: &Layout,
    reserved: &[(u64, u64, &'static str)],
    file_len: u64,
) -> Result<u64, VhdError> {
    let mut blocks: Vec<(u64, u64, u32)> = Vec::new();
    let mut free = reserved.iter().map(|r| r.1).max().unwrap_or(0);
    for (i, &entry) in bat.iter().enumerate() {
        let index = u32::try_from(i).unwrap_or(u32::MAX);
        if entry == UNALLOCATED {
            continue;
        }
        let start = u64::from(entry) * 512;
        let end = start
            .checked_add(layout.block_span())
            .ok_or_else(|| err(index, "block end overflows"))?;
        if end > file_len {
            return Err(err(
                index,
                format!("block {start}..{end} runs past the {file_len}-byte file (truncated?)"),
            ));
        }
        for &(r_start, r_end, name) in reserved {
            if start < r_end && r_start < end {
                return Err(err(
                    index,
                    format!("block {start}..{end} overlaps the {name}"),
                ));
            }
        }
        free = free.max(end);
        blocks.push((start, end, index));
    }
    blocks.sort_unstable();
    for pair in blocks.windows(2) {
        if let [(_, a_end, a), (b_start, _, b)] = pair {
            if b_start < a_end {
                return Err(err(*b, format!("block overlaps the block of entry {a}")));
            }
        }
    }
    Ok(free.div_ceil(512).saturating_mul(512))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    const LAYOUT: Layout = Layout {
        table_offset: 1536,
        entries: 4,
        block_size: 4096,
        bitmap_size: 512,
    };
    const META: [(u64, u64, &str); 3] = [
        (0, 512, "footer copy"),
        (512, 1536, "dynamic header"),
        (1536, 2048, "BAT"),
    ];

    #[test]
    fn accepts_disjoint_blocks_and_reports_the_free_offset() {
        let bat = [UNALLOCATED, 4, 4 + 9, UNALLOCATED];
        let free = validate(&bat, &LAYOUT, &META, 2048 + 2 * 4608 + 512).unwrap();
        assert_eq!(free, 2048 + 2 * 4608);
        assert_eq!(
            validate(&[UNALLOCATED; 4], &LAYOUT, &META, 2560).unwrap(),
            2048
        );
    }

    #[test]
    fn rejects_overlapping_blocks() {
        let bat = [4, 5, UNALLOCATED, UNALLOCATED];
        assert!(matches!(
            validate(&bat, &LAYOUT, &META, 1 << 20),
            Err(VhdError::Bat { index: 1, .. }) | Err(VhdError::Bat { index: 0, .. })
        ));
    }

    #[test]
    fn rejects_blocks_over_metadata_or_past_eof() {
        for (bat, len) in [
            ([0u32, UNALLOCATED, UNALLOCATED, UNALLOCATED], 1 << 20),
            ([UNALLOCATED, 3, UNALLOCATED, UNALLOCATED], 1 << 20),
            ([UNALLOCATED, UNALLOCATED, 4, UNALLOCATED], 2048 + 4608 - 1),
            (
                [UNALLOCATED, UNALLOCATED, UNALLOCATED, 0xFFFF_FFFE],
                1 << 20,
            ),
        ] {
            assert!(
                matches!(
                    validate(&bat, &LAYOUT, &META, len),
                    Err(VhdError::Bat { .. })
                ),
                "{bat:?}"
            );
        }
    }

    #[test]
    fn decodes_big_endian_entries() {
        assert_eq!(
            decode(&[0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff, 1, 2]),
            vec![4, UNALLOCATED]
        );
    }
}
