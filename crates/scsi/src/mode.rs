//! Mode parameters (SPC-4 §7.5): caching (08h, SBC-3 §6.4.5), control (0Ah, SPC-4 §7.5.8)
//! and informational exceptions control (1Ch, SPC-4 §7.5.13) pages; MODE SENSE(6/10)
//! (SPC-4 §6.13/§6.14) and MODE SELECT(6/10) (SPC-4 §6.11/§6.12).
//!
//! Changeable: WCE (caching), D_SENSE, SWP and TAS (control). Saved values are not implemented:
//! page control 11b answers SAVING PARAMETERS NOT SUPPORTED and MODE SELECT with SP=1 is
//! rejected. The values are per logical unit, shared by every I_T nexus, and kept in memory only:
//! a restart, LOGICAL UNIT RESET or target reset brings back the defaults (SAM-5 §6.3.3).

use crate::sense::{FieldPointer, SenseReason};
use crate::vpd::put;

/// Page codes.
pub const CACHING: u8 = 0x08;
pub const CONTROL: u8 = 0x0A;
pub const INFORMATIONAL_EXCEPTIONS: u8 = 0x1C;
pub const ALL_PAGES: u8 = 0x3F;

/// Pages in the order MODE SENSE returns them for 3Fh (ascending page code).
pub const PAGES: &[u8] = &[CACHING, CONTROL, INFORMATIONAL_EXCEPTIONS];

/// Page control field values (SPC-4 §6.13, table 155).
pub const PC_CURRENT: u8 = 0;
pub const PC_CHANGEABLE: u8 = 1;
pub const PC_DEFAULT: u8 = 2;
pub const PC_SAVED: u8 = 3;

/// The changeable mode parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModeValues {
    /// Caching page WCE: write-back cache enabled.
    pub wce: bool,
    /// Control page D_SENSE: report sense in descriptor format.
    pub d_sense: bool,
    /// Control page SWP: software write protect (SPC-4 §7.5.8): every command that writes
    /// the medium ends in DATA PROTECT, WRITE PROTECTED, and MODE SENSE reports WP=1.
    pub swp: bool,
    /// Control page TAS (SPC-4 §7.5.8): tasks aborted by another I_T nexus's task management
    /// function or PREEMPT AND ABORT end with TASK ABORTED status; zero: without any status
    /// (SAM-5 §5.6). Default one.
    pub tas: bool,
}

/// What the block descriptor and device-specific parameter describe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MediumInfo {
    pub num_blocks: u64,
    pub block_size: u32,
    pub read_only: bool,
}

/// A MODE SENSE request (fields of the CDB).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SenseRequest {
    pub ten: bool,
    pub dbd: bool,
    pub llbaa: bool,
    pub pc: u8,
    pub page: u8,
    pub subpage: u8,
}

/// Current and default mode parameters of one LU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModePages {
    pub current: ModeValues,
    pub default: ModeValues,
}

impl ModePages {
    pub fn new(write_cache: bool) -> Self {
        let v = ModeValues {
            wce: write_cache,
            d_sense: false,
            swp: false,
            tas: true,
        };
        ModePages {
            current: v,
            default: v,
        }
    }

    /// Back to defaults (LOGICAL UNIT RESET / power on: saved = default here).
    pub fn reset(&mut self) {
        self.current = self.default;
    }

    /// The page `code` as seen with page control `pc` (0, 1 or 2).
    fn page_bytes(&self, code: u8, pc: u8) -> Option<Vec<u8>> {
        let v = match pc {
            PC_DEFAULT => self.default,
            _ => self.current,
        };
        let changeable = pc == PC_CHANGEABLE;
        let flag = |on: bool, bit: u8| if on { 1u8 << bit } else { 0 };
        let page = match code {
            CACHING => {
                let mut p = vec![0u8; 0x14];
                put(&mut p, 0, &[CACHING, 0x12]);
                put(&mut p, 2, &[if changeable { 0x04 } else { flag(v.wce, 2) }]);
                p
            }
            CONTROL => {
                let mut p = vec![0u8; 0x0C];
                put(&mut p, 0, &[CONTROL, 0x0A]);
                if changeable {
                    put(&mut p, 2, &[0x04, 0, 0x08, 0x40]);
                } else {
                    // D_SENSE; QUEUE ALGORITHM MODIFIER 1 (unrestricted); SWP; TAS; BUSY
                    // TIMEOUT.
                    put(
                        &mut p,
                        2,
                        &[flag(v.d_sense, 2), 0x10, flag(v.swp, 3), flag(v.tas, 6)],
                    );
                    put(&mut p, 8, &[0xFF, 0xFF]);
                }
                p
            }
            INFORMATIONAL_EXCEPTIONS => {
                let mut p = vec![0u8; 0x0C];
                put(&mut p, 0, &[INFORMATIONAL_EXCEPTIONS, 0x0A]);
                if !changeable {
                    // DEXCPT=1: informational exception operations disabled.
                    put(&mut p, 2, &[0x08]);
                }
                p
            }
            _ => return None,
        };
        Some(page)
    }

    /// MODE SENSE(6/10) parameter data (header, optional block descriptor, pages).
    pub fn sense(&self, req: SenseRequest, medium: MediumInfo) -> Result<Vec<u8>, SenseReason> {
        if req.pc == PC_SAVED {
            return Err(SenseReason::SavingParametersNotSupported);
        }
        let codes: Vec<u8> = if req.page == ALL_PAGES {
            PAGES.to_vec()
        } else if PAGES.contains(&req.page) {
            vec![req.page]
        } else {
            return Err(SenseReason::InvalidFieldInCdb(FieldPointer::bit(2, 5)));
        };
        // No page has subpages: only subpage 00h, or FFh ("all subpages").
        if req.subpage != 0x00 && req.subpage != 0xFF {
            return Err(SenseReason::InvalidFieldInCdb(FieldPointer::byte(3)));
        }
        let mut pages = Vec::new();
        for code in codes {
            pages.extend(self.page_bytes(code, req.pc).unwrap_or_default());
        }
        let long = req.ten && req.llbaa;
        let bd: Vec<u8> = if req.dbd {
            Vec::new()
        } else if req.pc == PC_CHANGEABLE {
            vec![0u8; if long { 16 } else { 8 }]
        } else if long {
            let mut b = vec![0u8; 16];
            put(&mut b, 0, &medium.num_blocks.to_be_bytes());
            put(&mut b, 12, &medium.block_size.to_be_bytes());
            b
        } else {
            let mut b = vec![0u8; 8];
            let n = u32::try_from(medium.num_blocks).unwrap_or(u32::MAX);
            put(&mut b, 0, &n.to_be_bytes());
            put(&mut b, 4, &(medium.block_size & 0x00FF_FFFF).to_be_bytes());
            b
        };
        // Device-specific parameter (SBC-3 §6.4.2): WP (read-only LU or SWP), DPOFUA=1.
        let dsp = if medium.read_only || self.current.swp {
            0x90
        } else {
            0x10
        };
        let mut out = Vec::new();
        let body_len = bd.len().saturating_add(pages.len());
        if req.ten {
            let total = u16::try_from(body_len.saturating_add(6)).unwrap_or(u16::MAX);
            out.extend_from_slice(&total.to_be_bytes());
            let bdl = u16::try_from(bd.len()).unwrap_or(0);
            out.extend_from_slice(&[0, dsp, u8::from(long), 0]);
            out.extend_from_slice(&bdl.to_be_bytes());
        } else {
            let total = u8::try_from(body_len.saturating_add(3)).unwrap_or(u8::MAX);
            out.extend_from_slice(&[total, 0, dsp, u8::try_from(bd.len()).unwrap_or(0)]);
        }
        out.extend(bd);
        out.extend(pages);
        Ok(out)
    }

    /// MODE SELECT(6/10) (SPC-4 §6.11, §6.12) with parameter list `data`: validates everything
    /// first, then applies. An empty list changes nothing; otherwise PF must be one (the pages
    /// follow SPC-4, not a vendor format: INVALID FIELD IN CDB). A list that cuts a header,
    /// block descriptor or page short is PARAMETER LIST LENGTH ERROR (SPC-4 §6.11); a wrong
    /// page length, an unknown page or a change to a bit MODE SENSE does not report
    /// changeable is INVALID FIELD IN PARAMETER LIST, pointing at the byte (and bit).
    /// Returns whether any current value changed (the caller raises MODE PARAMETERS CHANGED
    /// to the other nexuses).
    pub fn select(
        &mut self,
        ten: bool,
        pf: bool,
        sp: bool,
        data: &[u8],
        block_size: u32,
    ) -> Result<bool, SenseReason> {
        if sp {
            return Err(SenseReason::InvalidFieldInCdb(FieldPointer::bit(1, 0)));
        }
        if data.is_empty() {
            return Ok(false);
        }
        if !pf {
            return Err(SenseReason::InvalidFieldInCdb(FieldPointer::bit(1, 4)));
        }
        let hdr_len = if ten { 8 } else { 4 };
        let hdr = data
            .get(..hdr_len)
            .ok_or(SenseReason::ParameterListLengthError)?;
        let at = |i: usize| hdr.get(i).copied().unwrap_or(0);
        let (medium_type, bd_len, long) = if ten {
            (
                at(2),
                usize::from(u16::from_be_bytes([at(6), at(7)])),
                at(4) & 1 != 0,
            )
        } else {
            (at(1), usize::from(at(3)), false)
        };
        if medium_type != 0 {
            return Err(SenseReason::InvalidFieldInParameterList(
                FieldPointer::byte(if ten { 2 } else { 1 }),
            ));
        }
        let bd_ok = bd_len == 0 || (bd_len == 8 && !long) || (bd_len == 16 && long);
        if !bd_ok {
            let b = if ten { 6 } else { 3 };
            return Err(SenseReason::InvalidFieldInParameterList(
                FieldPointer::byte(b),
            ));
        }
        let pages_at = hdr_len
            .checked_add(bd_len)
            .ok_or(SenseReason::ParameterListLengthError)?;
        let bd = data
            .get(hdr_len..pages_at)
            .ok_or(SenseReason::ParameterListLengthError)?;
        if !bd.is_empty() {
            // Only the current block length may be "selected".
            let (bl_at, bl) = if long {
                (12usize, bd.get(12..16).map(be_u32))
            } else {
                (5usize, bd.get(5..8).map(be_u32))
            };
            if bl.is_some_and(|bl| bl != block_size) {
                let ptr = u16::try_from(hdr_len + bl_at).unwrap_or(0);
                return Err(SenseReason::InvalidFieldInParameterList(
                    FieldPointer::byte(ptr),
                ));
            }
        }
        let mut next = self.current;
        let mut off = pages_at;
        while off < data.len() {
            let ptr = |o: usize| u16::try_from(o).unwrap_or(u16::MAX);
            let b0 = *data.get(off).ok_or(SenseReason::ParameterListLengthError)?;
            if b0 & 0x40 != 0 {
                return Err(SenseReason::InvalidFieldInParameterList(FieldPointer::bit(
                    ptr(off),
                    6,
                )));
            }
            let code = b0 & 0x3F;
            let len_at = off
                .checked_add(1)
                .ok_or(SenseReason::ParameterListLengthError)?;
            let plen = usize::from(
                *data
                    .get(len_at)
                    .ok_or(SenseReason::ParameterListLengthError)?,
            );
            let end = off
                .checked_add(2)
                .and_then(|x| x.checked_add(plen))
                .ok_or(SenseReason::ParameterListLengthError)?;
            let page = data
                .get(off..end)
                .ok_or(SenseReason::ParameterListLengthError)?;
            let cur = self.page_bytes(code, PC_CURRENT).ok_or(
                SenseReason::InvalidFieldInParameterList(FieldPointer::bit(ptr(off), 5)),
            )?;
            let mask = self.page_bytes(code, PC_CHANGEABLE).unwrap_or_default();
            if cur.len() != page.len() {
                return Err(SenseReason::InvalidFieldInParameterList(
                    FieldPointer::byte(ptr(len_at)),
                ));
            }
            for (j, ((new, old), m)) in page
                .iter()
                .zip(cur.iter())
                .zip(mask.iter())
                .enumerate()
                .skip(2)
            {
                let bad = (new ^ old) & !m;
                if bad != 0 {
                    let bit = u8::try_from(7u32.saturating_sub(bad.leading_zeros())).unwrap_or(7);
                    let p = off.checked_add(j).map(ptr).unwrap_or(u16::MAX);
                    return Err(SenseReason::InvalidFieldInParameterList(FieldPointer::bit(
                        p, bit,
                    )));
                }
            }
            let b2 = page.get(2).copied().unwrap_or(0);
            match code {
                CACHING => next.wce = b2 & 0x04 != 0,
                CONTROL => {
                    next.d_sense = b2 & 0x04 != 0;
                    next.swp = page.get(4).is_some_and(|b| b & 0x08 != 0);
                    next.tas = page.get(5).is_some_and(|b| b & 0x40 != 0);
                }
                _ => {}
            }
            off = end;
        }
        let changed = next != self.current;
        self.current = next;
        Ok(changed)
    }
}

fn be_u32(b: &[u8]) -> u32 {
    b.iter().fold(0u32, |a, x| (a << 8) | u32::from(*x))
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::unwrap_used)]
mod tests {
    use super::*;

    const MEDIUM: MediumInfo = MediumInfo {
        num_blocks: 1000,
        block_size: 512,
        read_only: false,
    };

    fn req(ten: bool, pc: u8, page: u8) -> SenseRequest {
        SenseRequest {
            ten,
            dbd: false,
            llbaa: false,
            pc,
            page,
            subpage: 0,
        }
    }

    #[test]
    fn sense6_all_pages_layout() {
        let m = ModePages::new(true);
        let d = m.sense(req(false, PC_CURRENT, ALL_PAGES), MEDIUM).unwrap();
        assert_eq!(usize::from(d[0]) + 1, d.len());
        assert_eq!(&d[1..4], &[0, 0x10, 8]);
        assert_eq!(&d[4..12], &[0, 0, 0x03, 0xE8, 0, 0, 0x02, 0x00]);
        // caching, control, informational exceptions in order
        assert_eq!(d[12], CACHING);
        assert_eq!(d[14] & 0x04, 0x04);
        assert_eq!(d[12 + 20], CONTROL);
        assert_eq!(d[12 + 20 + 12], INFORMATIONAL_EXCEPTIONS);
        assert_eq!(d.len(), 12 + 20 + 12 + 12);
    }

    #[test]
    fn sense10_long_lba_and_dbd() {
        let m = ModePages::new(false);
        let r = SenseRequest {
            ten: true,
            dbd: false,
            llbaa: true,
            pc: PC_CURRENT,
            page: CONTROL,
            subpage: 0,
        };
        let d = m
            .sense(
                r,
                MediumInfo {
                    num_blocks: 1 << 33,
                    block_size: 4096,
                    read_only: true,
                },
            )
            .unwrap();
        assert_eq!(usize::from(u16::from_be_bytes([d[0], d[1]])) + 2, d.len());
        assert_eq!(&d[2..8], &[0, 0x90, 1, 0, 0, 16]);
        assert_eq!(&d[8..16], &(1u64 << 33).to_be_bytes());
        assert_eq!(&d[20..24], &4096u32.to_be_bytes());
        assert_eq!(d[24], CONTROL);
        let r = SenseRequest { dbd: true, ..r };
        let d = m.sense(r, MEDIUM).unwrap();
        assert_eq!(&d[6..8], &[0, 0]);
        assert_eq!(d[8], CONTROL);
    }

    #[test]
    fn rejects_saved_unknown_page_and_subpage() {
        let m = ModePages::new(true);
        assert_eq!(
            m.sense(req(false, PC_SAVED, CACHING), MEDIUM),
            Err(SenseReason::SavingParametersNotSupported)
        );
        assert_eq!(
            m.sense(req(false, PC_CURRENT, 0x19), MEDIUM),
            Err(SenseReason::InvalidFieldInCdb(FieldPointer::bit(2, 5)))
        );
        let r = SenseRequest {
            subpage: 1,
            ..req(false, PC_CURRENT, CACHING)
        };
        assert_eq!(
            m.sense(r, MEDIUM),
            Err(SenseReason::InvalidFieldInCdb(FieldPointer::byte(3)))
        );
        let r = SenseRequest {
            subpage: 0xFF,
            ..req(false, PC_CURRENT, ALL_PAGES)
        };
        assert!(m.sense(r, MEDIUM).is_ok());
    }

    #[test]
    fn changeable_masks() {
        let m = ModePages::new(true);
        let d = m
            .sense(
                SenseRequest {
                    dbd: true,
                    ..req(false, PC_CHANGEABLE, ALL_PAGES)
                },
                MEDIUM,
            )
            .unwrap();
        assert_eq!(d[4 + 2], 0x04); // WCE
        assert_eq!(d[4 + 20 + 2], 0x04); // D_SENSE
        assert_eq!(d[4 + 20 + 3], 0x00);
        assert_eq!(d[4 + 20 + 4], 0x08); // SWP
        assert_eq!(d[4 + 20 + 5], 0x40); // TAS
                                         // Nothing else of the control page is changeable.
        let control = &d[4 + 20..4 + 32];
        let ones: u32 = control[2..].iter().map(|b| b.count_ones()).sum();
        assert_eq!(ones, 3);
        assert_eq!(d[4 + 32 + 2], 0x00);
    }

    /// MODE SENSE current, flip the changeable bits, MODE SELECT it back, sense again.
    #[test]
    fn select_sense_round_trip() {
        let mut m = ModePages::new(true);
        let mut d = m
            .sense(
                SenseRequest {
                    dbd: true,
                    ..req(false, PC_CURRENT, ALL_PAGES)
                },
                MEDIUM,
            )
            .unwrap();
        d[0] = 0; // MODE DATA LENGTH is reserved in MODE SELECT
        d[2] = 0;
        d[4 + 2] &= !0x04; // WCE off
        d[4 + 20 + 2] |= 0x04; // D_SENSE on
        d[4 + 20 + 4] |= 0x08; // SWP on
        assert_eq!(d[4 + 20 + 5], 0x40, "TAS=1 by default");
        d[4 + 20 + 5] &= !0x40; // TAS off
        assert_eq!(m.select(false, true, false, &d, 512), Ok(true));
        assert_eq!(
            m.current,
            ModeValues {
                wce: false,
                d_sense: true,
                swp: true,
                tas: false,
            }
        );
        assert_eq!(m.select(false, true, false, &d, 512), Ok(false));
        let again = m
            .sense(
                SenseRequest {
                    dbd: true,
                    ..req(false, PC_CURRENT, ALL_PAGES)
                },
                MEDIUM,
            )
            .unwrap();
        assert_eq!(&again[4..], &d[4..]);
        // SWP shows as WP in the device-specific parameter.
        assert_eq!(again[2], 0x90);
        assert!(m.default.wce);
        m.reset();
        assert_eq!(m.current, m.default);
    }

    #[test]
    fn rejects_unchangeable_bits_and_bad_lists() {
        let mut m = ModePages::new(true);
        // Control page with QERR changed: not changeable → pointer at byte 4+3, bit 4.
        let mut p = vec![0, 0, 0, 0];
        p.extend(m.page_bytes(CONTROL, PC_CURRENT).unwrap());
        p[4 + 3] ^= 0x10;
        assert_eq!(
            m.select(false, true, false, &p, 512),
            Err(SenseReason::InvalidFieldInParameterList(FieldPointer::bit(
                7, 4
            )))
        );
        // Truncated page.
        let mut t = vec![0, 0, 0, 0];
        t.extend(&m.page_bytes(CACHING, PC_CURRENT).unwrap()[..10]);
        assert_eq!(
            m.select(false, true, false, &t, 512),
            Err(SenseReason::ParameterListLengthError)
        );
        // Wrong page length.
        let mut w = vec![0, 0, 0, 0, CACHING, 0x02, 0, 0];
        assert_eq!(
            m.select(false, true, false, &w, 512),
            Err(SenseReason::InvalidFieldInParameterList(
                FieldPointer::byte(5)
            ))
        );
        // Unknown page, subpage format.
        w[4] = 0x19;
        assert_eq!(
            m.select(false, true, false, &w, 512),
            Err(SenseReason::InvalidFieldInParameterList(FieldPointer::bit(
                4, 5
            )))
        );
        w[4] = 0x48;
        assert_eq!(
            m.select(false, true, false, &w, 512),
            Err(SenseReason::InvalidFieldInParameterList(FieldPointer::bit(
                4, 6
            )))
        );
        // PF=0 with a parameter list: vendor-specific pages are not supported; an empty list
        // is no change whatever PF says.
        let mut c = vec![0, 0, 0, 0];
        c.extend(m.page_bytes(CONTROL, PC_CURRENT).unwrap());
        assert_eq!(
            m.select(false, false, false, &c, 512),
            Err(SenseReason::InvalidFieldInCdb(FieldPointer::bit(1, 4)))
        );
        assert_eq!(m.select(true, false, false, &[], 512), Ok(false));
        // A non-changeable bit of byte 5 (ATO) next to TAS.
        c[4 + 5] |= 0x80;
        assert_eq!(
            m.select(false, true, false, &c, 512),
            Err(SenseReason::InvalidFieldInParameterList(FieldPointer::bit(
                9, 7
            )))
        );
        // SP=1, short header, block descriptor with another block length.
        assert_eq!(
            m.select(false, true, true, &[], 512),
            Err(SenseReason::InvalidFieldInCdb(FieldPointer::bit(1, 0)))
        );
        assert_eq!(
            m.select(true, true, false, &[0, 0, 0], 512),
            Err(SenseReason::ParameterListLengthError)
        );
        let bd = [0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0x10, 0];
        assert_eq!(
            m.select(false, true, false, &bd, 512),
            Err(SenseReason::InvalidFieldInParameterList(
                FieldPointer::byte(9)
            ))
        );
        let bd = [0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0x02, 0];
        assert_eq!(m.select(false, true, false, &bd, 512), Ok(false));
        assert_eq!(m.current, m.default);
    }
}
