//! SANITIZE (SBC-3 §5.30, §4.32): the request, its parameter list, and the job that writes
//! the whole medium through the backstore one chunk at a time.
//!
//! Service actions: OVERWRITE (01h) writes the initialization pattern over every logical
//! block, OVERWRITE COUNT times (alternately inverted when INVERT is set, so that the last
//! pass writes the pattern as given); BLOCK ERASE (02h, thin-provisioned LUs only) deallocates
//! every logical block (LBPRZ=1: they read back as zeros); EXIT FAILURE MODE (1Fh) leaves the
//! failure mode a failed sanitize with AUSE=1 entered. CRYPTOGRAPHIC ERASE (03h) is not in
//! the command table: no backstore encrypts its medium, so there is no key to change.
//! IMMED is not supported (reserved in the CDB usage data).

use bytes::{Bytes, BytesMut};

use crate::sense::{FieldPointer, SenseReason};

/// Service actions (SBC-3 table 43).
pub const SA_OVERWRITE: u16 = 0x01;
pub const SA_BLOCK_ERASE: u16 = 0x02;
pub const SA_CRYPTOGRAPHIC_ERASE: u16 = 0x03;
pub const SA_EXIT_FAILURE_MODE: u16 = 0x1F;

/// Bytes one OVERWRITE step writes (one backstore write).
pub const OVERWRITE_CHUNK_BYTES: u64 = 1024 * 1024;
/// Bytes one BLOCK ERASE step deallocates.
pub const ERASE_CHUNK_BYTES: u64 = 64 * 1024 * 1024;

/// A validated SANITIZE request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `block`: one logical block filled with the initialization pattern.
    Overwrite {
        block: Bytes,
        passes: u8,
        invert: bool,
    },
    BlockErase,
    ExitFailureMode,
}

fn cdb_param_len() -> SenseReason {
    SenseReason::InvalidFieldInCdb(FieldPointer::byte(7))
}

fn param(byte: u16) -> SenseReason {
    SenseReason::InvalidFieldInParameterList(FieldPointer::byte(byte))
}

/// Validate a SANITIZE CDB's service action and parameter list (`data`: the Data-Out).
/// OVERWRITE needs a PARAMETER LIST LENGTH of 5 ..= block size + 4 (else INVALID FIELD IN
/// CDB); the other service actions need 0. Parameter list errors (OVERWRITE COUNT 0, TEST
/// non-zero, INITIALIZATION PATTERN LENGTH 0, above the block size or beyond the list) are
/// INVALID FIELD IN PARAMETER LIST with a pointer.
pub fn parse(
    service_action: u8,
    param_len: u32,
    data: &[u8],
    block_size: u32,
) -> Result<Request, SenseReason> {
    match u16::from(service_action) {
        SA_OVERWRITE => {}
        SA_BLOCK_ERASE | SA_EXIT_FAILURE_MODE => {
            if param_len != 0 {
                return Err(cdb_param_len());
            }
            return Ok(if u16::from(service_action) == SA_BLOCK_ERASE {
                Request::BlockErase
            } else {
                Request::ExitFailureMode
            });
        }
        _ => return Err(SenseReason::InvalidFieldInCdb(FieldPointer::bit(1, 4))),
    }
    let max = block_size.checked_add(4).ok_or_else(cdb_param_len)?;
    if param_len < 5 || param_len > max {
        return Err(cdb_param_len());
    }
    let n = usize::try_from(param_len).map_err(|_| cdb_param_len())?;
    let list = data.get(..n).ok_or(SenseReason::ParameterListLengthError)?;
    let b0 = list.first().copied().unwrap_or(0);
    let invert = b0 & 0x80 != 0;
    if b0 & 0x60 != 0 {
        // TEST: vendor specific; none defined here.
        return Err(SenseReason::InvalidFieldInParameterList(FieldPointer::bit(
            0, 6,
        )));
    }
    let passes = b0 & 0x1F;
    if passes == 0 {
        return Err(param(0));
    }
    if list.get(1).copied().unwrap_or(0) != 0 {
        return Err(param(1));
    }
    let plen = usize::from(u16::from_be_bytes([
        list.get(2).copied().unwrap_or(0),
        list.get(3).copied().unwrap_or(0),
    ]));
    let bs = usize::try_from(block_size).map_err(|_| param(2))?;
    if plen == 0 || plen > bs || plen > n.saturating_sub(4) {
        return Err(param(2));
    }
    let pattern = list.get(4..4 + plen).ok_or(param(2))?;
    let block: Vec<u8> = pattern.iter().copied().cycle().take(bs).collect();
    Ok(Request::Overwrite {
        block: Bytes::from(block),
        passes,
        invert,
    })
}

/// What a running sanitize writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Work {
    Overwrite {
        block: Bytes,
        passes: u8,
        invert: bool,
    },
    Erase,
}

/// One step of a sanitize: what to do next to the medium.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk {
    Write {
        offset: u64,
        data: Bytes,
    },
    Erase {
        offset: u64,
        len: u64,
    },
    /// Everything is written: make it durable.
    Flush,
    Done,
}

/// A sanitize operation over `capacity` bytes: the position of the next chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub work: Work,
    pub ause: bool,
    capacity: u64,
    pass: u8,
    offset: u64,
    flushed: bool,
}

impl Job {
    pub fn new(work: Work, ause: bool, capacity: u64) -> Self {
        Job {
            work,
            ause,
            capacity,
            pass: 0,
            offset: 0,
            flushed: false,
        }
    }

    fn passes(&self) -> u8 {
        match &self.work {
            Work::Overwrite { passes, .. } => *passes,
            Work::Erase => 1,
        }
    }

    /// Bytes the whole operation writes or deallocates.
    pub fn total(&self) -> u64 {
        self.capacity.saturating_mul(u64::from(self.passes()))
    }

    /// Bytes done so far.
    pub fn done(&self) -> u64 {
        self.capacity
            .saturating_mul(u64::from(self.pass))
            .saturating_add(self.offset)
            .min(self.total())
    }

    /// Progress indication: the fraction done, in 65536ths (SPC-4 §4.5.2.4.4).
    pub fn progress(&self) -> u16 {
        let total = u128::from(self.total().max(1));
        let done = u128::from(self.done()).saturating_mul(65536) / total;
        u16::try_from(done).unwrap_or(u16::MAX)
    }

    /// The next chunk, advancing the position past it.
    pub fn next_chunk(&mut self) -> Chunk {
        if self.pass >= self.passes() || self.capacity == 0 {
            if self.flushed {
                return Chunk::Done;
            }
            self.flushed = true;
            return Chunk::Flush;
        }
        let offset = self.offset;
        let chunk = match &self.work {
            Work::Overwrite {
                block,
                passes,
                invert,
            } => {
                let bs = u64::try_from(block.len()).unwrap_or(1).max(1);
                let per = (OVERWRITE_CHUNK_BYTES / bs).max(1).saturating_mul(bs);
                let len = per.min(self.capacity.saturating_sub(offset));
                // Passes before the last alternate so that the last one writes the pattern
                // as given.
                let flip = *invert && (passes.saturating_sub(1).saturating_sub(self.pass)) % 2 == 1;
                let count = usize::try_from(len / bs).unwrap_or(0);
                let mut buf = BytesMut::with_capacity(usize::try_from(len).unwrap_or(0));
                for _ in 0..count {
                    if flip {
                        buf.extend(block.iter().map(|b| !b));
                    } else {
                        buf.extend_from_slice(block);
                    }
                }
                self.offset = offset.saturating_add(len);
                Chunk::Write {
                    offset,
                    data: buf.freeze(),
                }
            }
            Work::Erase => {
                let len = ERASE_CHUNK_BYTES.min(self.capacity.saturating_sub(offset));
                self.offset = offset.saturating_add(len);
                Chunk::Erase { offset, len }
            }
        };
        if self.offset >= self.capacity {
            self.offset = 0;
            self.pass = self.pass.saturating_add(1);
        }
        chunk
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::unwrap_used)]
mod tests {
    use super::*;

    fn overwrite_list(b0: u8, pattern: &[u8]) -> Vec<u8> {
        let mut v = vec![b0, 0];
        v.extend_from_slice(&u16::try_from(pattern.len()).unwrap().to_be_bytes());
        v.extend_from_slice(pattern);
        v
    }

    #[test]
    fn accepts_overwrite_and_repeats_the_pattern() {
        let l = overwrite_list(0x81, &[1, 2, 3]);
        let r = parse(1, 7, &l, 8).unwrap();
        assert_eq!(
            r,
            Request::Overwrite {
                block: Bytes::from_static(&[1, 2, 3, 1, 2, 3, 1, 2]),
                passes: 1,
                invert: true
            }
        );
        assert_eq!(parse(2, 0, &[], 512), Ok(Request::BlockErase));
        assert_eq!(parse(0x1F, 0, &[], 512), Ok(Request::ExitFailureMode));
    }

    #[test]
    fn rejects_bad_lengths_and_fields() {
        let cdb7 = SenseReason::InvalidFieldInCdb(FieldPointer::byte(7));
        let l = overwrite_list(1, &[0xAA; 512]);
        for n in 0..5 {
            assert_eq!(parse(1, n, &l, 512), Err(cdb7));
        }
        assert_eq!(parse(1, 517, &l, 512), Err(cdb7));
        assert_eq!(parse(2, 8, &[0; 8], 512), Err(cdb7));
        assert_eq!(parse(0x1F, 8, &[0; 8], 512), Err(cdb7));
        assert_eq!(
            parse(1, 516, &overwrite_list(0, &[0xAA; 512]), 512),
            Err(param(0))
        );
        let mut zero_len = l.clone();
        zero_len[2] = 0;
        zero_len[3] = 0;
        assert_eq!(parse(1, 516, &zero_len, 512), Err(param(2)));
        let mut long = l.clone();
        long[2] = 0x02;
        long[3] = 0x04;
        assert_eq!(parse(1, 516, &long, 512), Err(param(2)));
        assert_eq!(
            parse(1, 516, &l[..100], 512),
            Err(SenseReason::ParameterListLengthError)
        );
        for sa in [0u8, 3, 4, 0x1E] {
            assert_eq!(
                parse(sa, 0, &[], 512),
                Err(SenseReason::InvalidFieldInCdb(FieldPointer::bit(1, 4)))
            );
        }
    }

    #[test]
    fn overwrite_job_covers_every_byte_each_pass_and_ends_with_the_pattern() {
        let block = Bytes::from_static(&[0x0F; 4]);
        let cap = OVERWRITE_CHUNK_BYTES * 2 + 8;
        let work = Work::Overwrite {
            block,
            passes: 2,
            invert: true,
        };
        let mut job = Job::new(work, false, cap);
        assert_eq!(job.total(), cap * 2);
        let mut image = vec![0u8; usize::try_from(cap).unwrap()];
        let mut writes = 0;
        loop {
            match job.next_chunk() {
                Chunk::Write { offset, data } => {
                    let o = usize::try_from(offset).unwrap();
                    image[o..o + data.len()].copy_from_slice(&data);
                    writes += 1;
                    if writes == 1 {
                        assert_eq!(data[0], 0xF0, "first of two passes is inverted");
                    }
                }
                Chunk::Flush => assert_eq!(job.progress(), u16::MAX),
                Chunk::Done => break,
                Chunk::Erase { .. } => unreachable!(),
            }
        }
        assert_eq!(writes, 6);
        assert!(image.iter().all(|b| *b == 0x0F));
    }

    #[test]
    fn erase_job_and_progress() {
        let cap = ERASE_CHUNK_BYTES + 512;
        let mut job = Job::new(Work::Erase, true, cap);
        assert_eq!(job.progress(), 0);
        assert_eq!(
            job.next_chunk(),
            Chunk::Erase {
                offset: 0,
                len: ERASE_CHUNK_BYTES
            }
        );
        assert!(job.progress() > 60000);
        assert_eq!(
            job.next_chunk(),
            Chunk::Erase {
                offset: ERASE_CHUNK_BYTES,
                len: 512
            }
        );
        assert_eq!(job.next_chunk(), Chunk::Flush);
        assert_eq!(job.next_chunk(), Chunk::Done);
    }
}
