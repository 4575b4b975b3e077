//! Command descriptor blocks (SPC-4 §4.2, SBC-3 §5): the one command table and the parser.
//!
//! [`COMMANDS`] lists every supported operation code / service action with its CDB usage
//! bitmap (SPC-4 §6.35.3). The same table decides what [`parse`] accepts, which bits are
//! reserved (any bit set outside the usage mask is INVALID FIELD IN CDB with a field
//! pointer), and what REPORT SUPPORTED OPERATION CODES returns. Protection fields
//! (RDPROTECT/WRPROTECT/VRPROTECT/ORPROTECT) and ANCHOR are outside the masks: this LU
//! has no protection information and no anchored state.

use crate::sense::{FieldPointer, SenseReason};

/// Operation codes (SPC-4 annex D / SBC-3 table 13).
pub mod op {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const READ_6: u8 = 0x08;
    pub const WRITE_6: u8 = 0x0A;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SELECT_6: u8 = 0x15;
    pub const RESERVE_6: u8 = 0x16;
    pub const RELEASE_6: u8 = 0x17;
    pub const MODE_SENSE_6: u8 = 0x1A;
    pub const START_STOP_UNIT: u8 = 0x1B;
    pub const PREVENT_ALLOW_MEDIUM_REMOVAL: u8 = 0x1E;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const WRITE_10: u8 = 0x2A;
    pub const WRITE_AND_VERIFY_10: u8 = 0x2E;
    pub const VERIFY_10: u8 = 0x2F;
    pub const PRE_FETCH_10: u8 = 0x34;
    pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
    pub const READ_DEFECT_DATA_10: u8 = 0x37;
    pub const WRITE_SAME_10: u8 = 0x41;
    pub const UNMAP: u8 = 0x42;
    pub const SANITIZE: u8 = 0x48;
    pub const MODE_SELECT_10: u8 = 0x55;
    pub const RESERVE_10: u8 = 0x56;
    pub const RELEASE_10: u8 = 0x57;
    pub const MODE_SENSE_10: u8 = 0x5A;
    pub const PERSISTENT_RESERVE_IN: u8 = 0x5E;
    pub const PERSISTENT_RESERVE_OUT: u8 = 0x5F;
    pub const EXTENDED_COPY: u8 = 0x83;
    pub const RECEIVE_COPY_RESULTS: u8 = 0x84;
    pub const READ_16: u8 = 0x88;
    pub const COMPARE_AND_WRITE: u8 = 0x89;
    pub const WRITE_16: u8 = 0x8A;
    pub const ORWRITE_16: u8 = 0x8B;
    pub const WRITE_AND_VERIFY_16: u8 = 0x8E;
    pub const VERIFY_16: u8 = 0x8F;
    pub const PRE_FETCH_16: u8 = 0x90;
    pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
    pub const WRITE_SAME_16: u8 = 0x93;
    pub const WRITE_ATOMIC_16: u8 = 0x9C;
    pub const SERVICE_ACTION_IN_16: u8 = 0x9E;
    pub const REPORT_LUNS: u8 = 0xA0;
    pub const MAINTENANCE_IN: u8 = 0xA3;
    pub const READ_12: u8 = 0xA8;
    pub const WRITE_12: u8 = 0xAA;
    pub const WRITE_AND_VERIFY_12: u8 = 0xAE;
    pub const VERIFY_12: u8 = 0xAF;
    pub const READ_DEFECT_DATA_12: u8 = 0xB7;

    /// SERVICE ACTION IN(16) service actions (SBC-3 §5.16, §5.5).
    pub const SA_READ_CAPACITY_16: u16 = 0x10;
    pub const SA_GET_LBA_STATUS: u16 = 0x12;
    /// RECEIVE COPY RESULTS service actions (SPC-4 §6.18): COPY STATUS, OPERATING PARAMETERS.
    pub const SA_COPY_STATUS: u16 = 0x00;
    pub const SA_OPERATING_PARAMETERS: u16 = 0x03;
    /// MAINTENANCE IN service action REPORT SUPPORTED OPERATION CODES (SPC-4 §6.35).
    pub const SA_REPORT_SUPPORTED_OPCODES: u16 = 0x0C;
}

/// One row of the command table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandInfo {
    pub opcode: u8,
    /// Service action (in byte 1 bits 4:0) for opcodes that have them.
    pub service_action: Option<u16>,
    /// CDB usage bitmap: its length is the CDB length; byte 0 is the opcode.
    pub usage: &'static [u8],
    pub name: &'static str,
    /// Nominal / recommended timeouts in seconds for the RCTD descriptor.
    pub timeout_secs: u32,
}

impl CommandInfo {
    pub fn cdb_len(&self) -> usize {
        self.usage.len()
    }
}

const fn row(opcode: u8, usage: &'static [u8], name: &'static str) -> CommandInfo {
    CommandInfo {
        opcode,
        service_action: None,
        usage,
        name,
        timeout_secs: 30,
    }
}

const fn row_sa(opcode: u8, sa: u16, usage: &'static [u8], name: &'static str) -> CommandInfo {
    CommandInfo {
        opcode,
        service_action: Some(sa),
        usage,
        name,
        timeout_secs: 30,
    }
}

const F: u8 = 0xFF;

/// The command table (sorted by opcode, then service action).
pub const COMMANDS: &[CommandInfo] = &[
    row(
        op::TEST_UNIT_READY,
        &[0x00, 0, 0, 0, 0, 0],
        "TEST UNIT READY",
    ),
    row(
        op::REQUEST_SENSE,
        &[0x03, 0x01, 0, 0, F, 0],
        "REQUEST SENSE",
    ),
    row(op::READ_6, &[0x08, 0x1F, F, F, F, 0], "READ(6)"),
    row(op::WRITE_6, &[0x0A, 0x1F, F, F, F, 0], "WRITE(6)"),
    row(op::INQUIRY, &[0x12, 0x01, F, F, F, 0], "INQUIRY"),
    row(
        op::MODE_SELECT_6,
        &[0x15, 0x11, 0, 0, F, 0],
        "MODE SELECT(6)",
    ),
    // SPC-2 §7.21 / §7.24: no third-party reservations, no extents (bits reserved here).
    row(op::RESERVE_6, &[0x16, 0, 0, 0, 0, 0], "RESERVE(6)"),
    row(op::RELEASE_6, &[0x17, 0, 0, 0, 0, 0], "RELEASE(6)"),
    row(op::MODE_SENSE_6, &[0x1A, 0x08, F, F, F, 0], "MODE SENSE(6)"),
    row(
        op::START_STOP_UNIT,
        &[0x1B, 0x01, 0, 0x0F, 0xF7, 0],
        "START STOP UNIT",
    ),
    row(
        op::PREVENT_ALLOW_MEDIUM_REMOVAL,
        &[0x1E, 0, 0, 0, 0x03, 0],
        "PREVENT ALLOW MEDIUM REMOVAL",
    ),
    row(
        op::READ_CAPACITY_10,
        &[0x25, 0, F, F, F, F, 0, 0, 0x01, 0],
        "READ CAPACITY(10)",
    ),
    row(
        op::READ_10,
        &[0x28, 0x18, F, F, F, F, 0x3F, F, F, 0],
        "READ(10)",
    ),
    row(
        op::WRITE_10,
        &[0x2A, 0x18, F, F, F, F, 0x3F, F, F, 0],
        "WRITE(10)",
    ),
    row(
        op::WRITE_AND_VERIFY_10,
        &[0x2E, 0x16, F, F, F, F, 0x3F, F, F, 0],
        "WRITE AND VERIFY(10)",
    ),
    row(
        op::VERIFY_10,
        &[0x2F, 0x16, F, F, F, F, 0x3F, F, F, 0],
        "VERIFY(10)",
    ),
    row(
        op::PRE_FETCH_10,
        &[0x34, 0x02, F, F, F, F, 0x3F, F, F, 0],
        "PRE-FETCH(10)",
    ),
    row(
        op::SYNCHRONIZE_CACHE_10,
        &[0x35, 0x06, F, F, F, F, 0x3F, F, F, 0],
        "SYNCHRONIZE CACHE(10)",
    ),
    row(
        op::READ_DEFECT_DATA_10,
        &[0x37, 0, 0x1F, 0, 0, 0, 0, F, F, 0],
        "READ DEFECT DATA(10)",
    ),
    row(
        op::WRITE_SAME_10,
        &[0x41, 0x08, F, F, F, F, 0x3F, F, F, 0],
        "WRITE SAME(10)",
    ),
    row(op::UNMAP, &[0x42, 0, 0, 0, 0, 0, 0x3F, F, F, 0], "UNMAP"),
    // SBC-3 §5.30: AUSE; IMMED is not supported (reserved here). CRYPTOGRAPHIC ERASE (03h)
    // is absent: no backstore encrypts its medium.
    row_sa(
        op::SANITIZE,
        crate::sanitize::SA_OVERWRITE,
        &[0x48, 0x21, 0, 0, 0, 0, 0, F, F, 0],
        "SANITIZE / OVERWRITE",
    ),
    row_sa(
        op::SANITIZE,
        crate::sanitize::SA_BLOCK_ERASE,
        &[0x48, 0x22, 0, 0, 0, 0, 0, F, F, 0],
        "SANITIZE / BLOCK ERASE",
    ),
    row_sa(
        op::SANITIZE,
        crate::sanitize::SA_EXIT_FAILURE_MODE,
        &[0x48, 0x3F, 0, 0, 0, 0, 0, F, F, 0],
        "SANITIZE / EXIT FAILURE MODE",
    ),
    row(
        op::MODE_SELECT_10,
        &[0x55, 0x11, 0, 0, 0, 0, 0, F, F, 0],
        "MODE SELECT(10)",
    ),
    // SPC-2 §7.22 / §7.25: 3RDPTY and LONGID reserved here (INVALID FIELD IN CDB).
    row(
        op::RESERVE_10,
        &[0x56, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        "RESERVE(10)",
    ),
    row(
        op::RELEASE_10,
        &[0x57, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        "RELEASE(10)",
    ),
    row(
        op::MODE_SENSE_10,
        &[0x5A, 0x18, F, F, 0, 0, 0, F, F, 0],
        "MODE SENSE(10)",
    ),
    // SPC-4 §6.15 / §6.16. REPLACE LOST RESERVATION (08h) is not implemented (RLR_C=0).
    row_sa(
        op::PERSISTENT_RESERVE_IN,
        0,
        &[0x5E, 0, 0, 0, 0, 0, 0, F, F, 0],
        "PERSISTENT RESERVE IN / READ KEYS",
    ),
    row_sa(
        op::PERSISTENT_RESERVE_IN,
        1,
        &[0x5E, 1, 0, 0, 0, 0, 0, F, F, 0],
        "PERSISTENT RESERVE IN / READ RESERVATION",
    ),
    row_sa(
        op::PERSISTENT_RESERVE_IN,
        2,
        &[0x5E, 2, 0, 0, 0, 0, 0, F, F, 0],
        "PERSISTENT RESERVE IN / REPORT CAPABILITIES",
    ),
    row_sa(
        op::PERSISTENT_RESERVE_IN,
        3,
        &[0x5E, 3, 0, 0, 0, 0, 0, F, F, 0],
        "PERSISTENT RESERVE IN / READ FULL STATUS",
    ),
    row_sa(
        op::PERSISTENT_RESERVE_OUT,
        0,
        &[0x5F, 0, F, 0, 0, F, F, F, F, 0],
        "PERSISTENT RESERVE OUT / REGISTER",
    ),
    row_sa(
        op::PERSISTENT_RESERVE_OUT,
        1,
        &[0x5F, 1, F, 0, 0, F, F, F, F, 0],
        "PERSISTENT RESERVE OUT / RESERVE",
    ),
    row_sa(
        op::PERSISTENT_RESERVE_OUT,
        2,
        &[0x5F, 2, F, 0, 0, F, F, F, F, 0],
        "PERSISTENT RESERVE OUT / RELEASE",
    ),
    row_sa(
        op::PERSISTENT_RESERVE_OUT,
        3,
        &[0x5F, 3, F, 0, 0, F, F, F, F, 0],
        "PERSISTENT RESERVE OUT / CLEAR",
    ),
    row_sa(
        op::PERSISTENT_RESERVE_OUT,
        4,
        &[0x5F, 4, F, 0, 0, F, F, F, F, 0],
        "PERSISTENT RESERVE OUT / PREEMPT",
    ),
    row_sa(
        op::PERSISTENT_RESERVE_OUT,
        5,
        &[0x5F, 5, F, 0, 0, F, F, F, F, 0],
        "PERSISTENT RESERVE OUT / PREEMPT AND ABORT",
    ),
    row_sa(
        op::PERSISTENT_RESERVE_OUT,
        6,
        &[0x5F, 6, F, 0, 0, F, F, F, F, 0],
        "PERSISTENT RESERVE OUT / REGISTER AND IGNORE EXISTING KEY",
    ),
    row_sa(
        op::PERSISTENT_RESERVE_OUT,
        7,
        &[0x5F, 7, F, 0, 0, F, F, F, F, 0],
        "PERSISTENT RESERVE OUT / REGISTER AND MOVE",
    ),
    // EXTENDED COPY (LID1) is service action 00h of 83h (SPC-4 §6.4).
    row_sa(
        op::EXTENDED_COPY,
        0,
        &[0x83, 0, 0, 0, 0, 0, 0, 0, 0, 0, F, F, F, F, 0, 0],
        "EXTENDED COPY(LID1)",
    ),
    row_sa(
        op::RECEIVE_COPY_RESULTS,
        op::SA_COPY_STATUS,
        &[0x84, 0, F, 0, 0, 0, 0, 0, 0, 0, F, F, F, F, 0, 0],
        "RECEIVE COPY RESULTS / COPY STATUS",
    ),
    row_sa(
        op::RECEIVE_COPY_RESULTS,
        op::SA_OPERATING_PARAMETERS,
        &[0x84, 3, 0, 0, 0, 0, 0, 0, 0, 0, F, F, F, F, 0, 0],
        "RECEIVE COPY RESULTS / OPERATING PARAMETERS",
    ),
    row(
        op::READ_16,
        &[0x88, 0x18, F, F, F, F, F, F, F, F, F, F, F, F, 0x3F, 0],
        "READ(16)",
    ),
    // SBC-3 §5.2: DPO, FUA; LBA; NUMBER OF LOGICAL BLOCKS (byte 13); GROUP NUMBER.
    row(
        op::COMPARE_AND_WRITE,
        &[0x89, 0x18, F, F, F, F, F, F, F, F, 0, 0, 0, F, 0x3F, 0],
        "COMPARE AND WRITE",
    ),
    row(
        op::WRITE_16,
        &[0x8A, 0x18, F, F, F, F, F, F, F, F, F, F, F, F, 0x3F, 0],
        "WRITE(16)",
    ),
    row(
        op::ORWRITE_16,
        &[0x8B, 0x18, F, F, F, F, F, F, F, F, F, F, F, F, 0x3F, 0],
        "ORWRITE(16)",
    ),
    row(
        op::WRITE_AND_VERIFY_16,
        &[0x8E, 0x16, F, F, F, F, F, F, F, F, F, F, F, F, 0x3F, 0],
        "WRITE AND VERIFY(16)",
    ),
    row(
        op::VERIFY_16,
        &[0x8F, 0x16, F, F, F, F, F, F, F, F, F, F, F, F, 0x3F, 0],
        "VERIFY(16)",
    ),
    row(
        op::PRE_FETCH_16,
        &[0x90, 0x02, F, F, F, F, F, F, F, F, F, F, F, F, 0x3F, 0],
        "PRE-FETCH(16)",
    ),
    row(
        op::SYNCHRONIZE_CACHE_16,
        &[0x91, 0x06, F, F, F, F, F, F, F, F, F, F, F, F, 0x3F, 0],
        "SYNCHRONIZE CACHE(16)",
    ),
    row(
        op::WRITE_SAME_16,
        &[0x93, 0x09, F, F, F, F, F, F, F, F, F, F, F, F, 0x3F, 0],
        "WRITE SAME(16)",
    ),
    row(
        op::WRITE_ATOMIC_16,
        &[0x9C, 0x18, F, F, F, F, F, F, F, F, 0, 0, F, F, 0x3F, 0],
        "WRITE ATOMIC(16)",
    ),
    row_sa(
        op::SERVICE_ACTION_IN_16,
        op::SA_READ_CAPACITY_16,
        &[0x9E, 0x10, F, F, F, F, F, F, F, F, F, F, F, F, 0x01, 0],
        "READ CAPACITY(16)",
    ),
    row_sa(
        op::SERVICE_ACTION_IN_16,
        op::SA_GET_LBA_STATUS,
        &[0x9E, 0x12, F, F, F, F, F, F, F, F, F, F, F, F, 0, 0],
        "GET LBA STATUS",
    ),
    row(
        op::REPORT_LUNS,
        &[0xA0, 0, F, 0, 0, 0, F, F, F, F, 0, 0],
        "REPORT LUNS",
    ),
    // SPC-4 §6.27: PARAMETER DATA FORMAT in byte 1 bits 7:5.
    row_sa(
        op::MAINTENANCE_IN,
        crate::alua::SA_REPORT_TARGET_PORT_GROUPS,
        &[0xA3, 0xEA, 0, 0, 0, 0, F, F, F, F, 0, 0],
        "REPORT TARGET PORT GROUPS",
    ),
    row_sa(
        op::MAINTENANCE_IN,
        op::SA_REPORT_SUPPORTED_OPCODES,
        &[0xA3, 0x0C, 0x87, F, F, F, F, F, F, F, 0, 0],
        "REPORT SUPPORTED OPERATION CODES",
    ),
    row(
        op::READ_12,
        &[0xA8, 0x18, F, F, F, F, F, F, F, F, 0x3F, 0],
        "READ(12)",
    ),
    row(
        op::WRITE_12,
        &[0xAA, 0x18, F, F, F, F, F, F, F, F, 0x3F, 0],
        "WRITE(12)",
    ),
    row(
        op::WRITE_AND_VERIFY_12,
        &[0xAE, 0x16, F, F, F, F, F, F, F, F, 0x3F, 0],
        "WRITE AND VERIFY(12)",
    ),
    row(
        op::VERIFY_12,
        &[0xAF, 0x16, F, F, F, F, F, F, F, F, 0x3F, 0],
        "VERIFY(12)",
    ),
    row(
        op::READ_DEFECT_DATA_12,
        &[0xB7, 0x1F, F, F, F, F, F, F, F, F, 0, 0],
        "READ DEFECT DATA(12)",
    ),
];

/// Whether `opcode` carries a service action in byte 1.
pub fn has_service_actions(opcode: u8) -> bool {
    COMMANDS
        .iter()
        .any(|c| c.opcode == opcode && c.service_action.is_some())
}

/// Whether `opcode` is in the table at all.
pub fn opcode_known(opcode: u8) -> bool {
    COMMANDS.iter().any(|c| c.opcode == opcode)
}

/// The table row for `opcode` / `service_action` (ignored for opcodes without them).
pub fn lookup(opcode: u8, service_action: u16) -> Option<&'static CommandInfo> {
    COMMANDS.iter().find(|c| {
        c.opcode == opcode && !matches!(c.service_action, Some(sa) if sa != service_action)
    })
}

/// Read / write style addressing common to the block commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub lba: u64,
    /// Number of logical blocks (already expanded: READ(6)/WRITE(6) 0 means 256).
    pub blocks: u32,
}

/// A parsed CDB. Fields are typed; LBA/length range checks against capacity happen in the LU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    TestUnitReady,
    RequestSense {
        desc: bool,
        alloc_len: u32,
    },
    Inquiry {
        evpd: bool,
        page: u8,
        alloc_len: u32,
    },
    ModeSelect {
        ten: bool,
        pf: bool,
        sp: bool,
        param_len: u32,
    },
    ModeSense {
        ten: bool,
        dbd: bool,
        llbaa: bool,
        pc: u8,
        page: u8,
        subpage: u8,
        alloc_len: u32,
    },
    StartStopUnit {
        immed: bool,
        power_condition: u8,
        loej: bool,
        start: bool,
    },
    PreventAllow {
        prevent: u8,
    },
    ReadCapacity10,
    ReadCapacity16 {
        alloc_len: u32,
    },
    Read {
        ext: Extent,
        fua: bool,
    },
    Write {
        ext: Extent,
        fua: bool,
    },
    /// VERIFY: `bytchk` 0 = medium check only, 1 = compare Data-Out with the medium.
    Verify {
        ext: Extent,
        bytchk: u8,
    },
    WriteAndVerify {
        ext: Extent,
        bytchk: u8,
    },
    OrWrite {
        ext: Extent,
        fua: bool,
    },
    /// COMPARE AND WRITE (SBC-3 §5.2): `ext.blocks` is NUMBER OF LOGICAL BLOCKS (0..=255).
    CompareAndWrite {
        ext: Extent,
        fua: bool,
    },
    SynchronizeCache {
        ext: Extent,
    },
    PreFetch {
        ext: Extent,
        immed: bool,
    },
    /// WRITE SAME (10/16); `blocks == 0` means "to the end of the medium" (rejected, WSNZ=1).
    WriteSame {
        ext: Extent,
        unmap: bool,
        ndob: bool,
    },
    Unmap {
        param_len: u32,
    },
    /// SANITIZE (SBC-3 §5.30): service action, AUSE, PARAMETER LIST LENGTH.
    Sanitize {
        service_action: u8,
        ause: bool,
        param_len: u32,
    },
    /// WRITE ATOMIC (16) (SBC-4 §5.48).
    WriteAtomic {
        ext: Extent,
        fua: bool,
    },
    /// READ DEFECT DATA (10/12) (SBC-3 §5.12, §5.13): `twelve` selects the 12-byte format.
    ReadDefectData {
        twelve: bool,
        plist: bool,
        glist: bool,
        format: u8,
        alloc_len: u32,
    },
    GetLbaStatus {
        lba: u64,
        alloc_len: u32,
    },
    ReportSupportedOpcodes {
        rctd: bool,
        options: u8,
        opcode: u8,
        service_action: u16,
        alloc_len: u32,
    },
    ReportLuns {
        select: u8,
        alloc_len: u32,
    },
    /// REPORT TARGET PORT GROUPS (SPC-4 §6.27): `extended` = PARAMETER DATA FORMAT 001b.
    ReportTargetPortGroups {
        extended: bool,
        alloc_len: u32,
    },
    /// RESERVE(6/10), SPC-2 §7.21/§7.22 (logical unit, no third party).
    Reserve,
    /// RELEASE(6/10), SPC-2 §7.24/§7.25.
    Release,
    /// PERSISTENT RESERVE IN (SPC-4 §6.15).
    PersistentReserveIn {
        service_action: u8,
        alloc_len: u32,
    },
    /// PERSISTENT RESERVE OUT (SPC-4 §6.16.1): SCOPE and TYPE as sent, checked per service
    /// action.
    PersistentReserveOut {
        service_action: u8,
        scope: u8,
        ty: u8,
        param_len: u32,
    },
    /// EXTENDED COPY (LID1), SPC-4 §6.4.
    ExtendedCopy {
        param_len: u32,
    },
    /// RECEIVE COPY RESULTS, SPC-4 §6.18 (service actions COPY STATUS, OPERATING PARAMETERS).
    ReceiveCopyResults {
        service_action: u16,
        list_id: u8,
        alloc_len: u32,
    },
}

/// Big-endian field of `n` bytes at `start` (caller has checked the CDB length).
fn be(cdb: &[u8], start: usize, n: usize) -> u64 {
    (0..n).fold(0u64, |acc, i| {
        let b = start
            .checked_add(i)
            .and_then(|j| cdb.get(j))
            .copied()
            .unwrap_or(0);
        (acc << 8) | u64::from(b)
    })
}

fn be32(cdb: &[u8], start: usize, n: usize) -> u32 {
    u32::try_from(be(cdb, start, n)).unwrap_or(u32::MAX)
}

fn byte(cdb: &[u8], i: usize) -> u8 {
    cdb.get(i).copied().unwrap_or(0)
}

fn bit(cdb: &[u8], i: usize, b: u8) -> bool {
    byte(cdb, i) & (1 << b) != 0
}

fn invalid(byte: u16, bit: u8) -> SenseReason {
    SenseReason::InvalidFieldInCdb(FieldPointer::bit(byte, bit))
}

/// Check `cdb` against `info`'s usage mask: the first reserved bit set is reported. The
/// service action field (byte 1 bits 4:0) holds the service action value in the usage data,
/// so it is not treated as a mask.
pub fn check_reserved(cdb: &[u8], info: &CommandInfo) -> Result<(), SenseReason> {
    for (i, (c, u)) in cdb.iter().zip(info.usage.iter()).enumerate().skip(1) {
        let u = if i == 1 && info.service_action.is_some() {
            u | 0x1F
        } else {
            *u
        };
        let bad = c & !u;
        if bad != 0 {
            let top = u8::try_from(7u32.saturating_sub(bad.leading_zeros())).unwrap_or(7);
            return Err(invalid(u16::try_from(i).unwrap_or(u16::MAX), top));
        }
    }
    Ok(())
}

/// Parse one CDB (any trailing bytes past the opcode's CDB length are ignored: iSCSI carries
/// CDBs in a 16-byte field). Errors: unknown opcode → INVALID COMMAND OPERATION CODE; unknown
/// service action, reserved bit or invalid field value → INVALID FIELD IN CDB with pointer;
/// CDB shorter than the opcode's length → INVALID FIELD IN CDB pointing at the opcode.
pub fn parse(cdb: &[u8]) -> Result<Command, SenseReason> {
    let opcode = *cdb.first().ok_or(SenseReason::InvalidOpcode)?;
    if !opcode_known(opcode) {
        return Err(SenseReason::InvalidOpcode);
    }
    let sa = u16::from(byte(cdb, 1) & 0x1F);
    let info = lookup(opcode, sa).ok_or(invalid(1, 4))?;
    if cdb.len() < info.cdb_len() {
        return Err(SenseReason::InvalidFieldInCdb(FieldPointer::byte(0)));
    }
    let cdb = cdb
        .get(..info.cdb_len())
        .ok_or(SenseReason::InvalidOpcode)?;
    check_reserved(cdb, info)?;
    let ext10 = || Extent {
        lba: be(cdb, 2, 4),
        blocks: be32(cdb, 7, 2),
    };
    let ext12 = || Extent {
        lba: be(cdb, 2, 4),
        blocks: be32(cdb, 6, 4),
    };
    let ext16 = || Extent {
        lba: be(cdb, 2, 8),
        blocks: be32(cdb, 10, 4),
    };
    let ext6 = || {
        let blocks = match byte(cdb, 4) {
            0 => 256,
            n => u32::from(n),
        };
        Extent {
            lba: be(cdb, 1, 3) & 0x1F_FFFF,
            blocks,
        }
    };
    let fua = bit(cdb, 1, 3);
    let bytchk = || -> Result<u8, SenseReason> {
        match (byte(cdb, 1) >> 1) & 0x03 {
            v @ (0 | 1) => Ok(v),
            _ => Err(invalid(1, 2)),
        }
    };
    use op::*;
    let cmd = match opcode {
        TEST_UNIT_READY => Command::TestUnitReady,
        REQUEST_SENSE => Command::RequestSense {
            desc: bit(cdb, 1, 0),
            alloc_len: be32(cdb, 4, 1),
        },
        READ_6 => Command::Read {
            ext: ext6(),
            fua: false,
        },
        WRITE_6 => Command::Write {
            ext: ext6(),
            fua: false,
        },
        INQUIRY => {
            let evpd = bit(cdb, 1, 0);
            let page = byte(cdb, 2);
            if !evpd && page != 0 {
                return Err(SenseReason::InvalidFieldInCdb(FieldPointer::byte(2)));
            }
            Command::Inquiry {
                evpd,
                page,
                alloc_len: be32(cdb, 3, 2),
            }
        }
        MODE_SELECT_6 | MODE_SELECT_10 => {
            let ten = opcode == MODE_SELECT_10;
            let param_len = if ten {
                be32(cdb, 7, 2)
            } else {
                be32(cdb, 4, 1)
            };
            Command::ModeSelect {
                ten,
                pf: bit(cdb, 1, 4),
                sp: bit(cdb, 1, 0),
                param_len,
            }
        }
        MODE_SENSE_6 | MODE_SENSE_10 => {
            let ten = opcode == MODE_SENSE_10;
            Command::ModeSense {
                ten,
                dbd: bit(cdb, 1, 3),
                llbaa: ten && bit(cdb, 1, 4),
                pc: byte(cdb, 2) >> 6,
                page: byte(cdb, 2) & 0x3F,
                subpage: byte(cdb, 3),
                alloc_len: if ten {
                    be32(cdb, 7, 2)
                } else {
                    be32(cdb, 4, 1)
                },
            }
        }
        START_STOP_UNIT => Command::StartStopUnit {
            immed: bit(cdb, 1, 0),
            power_condition: byte(cdb, 4) >> 4,
            loej: bit(cdb, 4, 1),
            start: bit(cdb, 4, 0),
        },
        PREVENT_ALLOW_MEDIUM_REMOVAL => Command::PreventAllow {
            prevent: byte(cdb, 4) & 0x03,
        },
        READ_CAPACITY_10 => {
            // SBC-3 §5.15: with PMI=0 the LOGICAL BLOCK ADDRESS field shall be zero.
            if !bit(cdb, 8, 0) && be(cdb, 2, 4) != 0 {
                return Err(SenseReason::InvalidFieldInCdb(FieldPointer::byte(2)));
            }
            Command::ReadCapacity10
        }
        READ_10 => Command::Read { ext: ext10(), fua },
        WRITE_10 => Command::Write { ext: ext10(), fua },
        READ_12 => Command::Read { ext: ext12(), fua },
        WRITE_12 => Command::Write { ext: ext12(), fua },
        READ_16 => Command::Read { ext: ext16(), fua },
        WRITE_16 => Command::Write { ext: ext16(), fua },
        VERIFY_10 => Command::Verify {
            ext: ext10(),
            bytchk: bytchk()?,
        },
        VERIFY_12 => Command::Verify {
            ext: ext12(),
            bytchk: bytchk()?,
        },
        VERIFY_16 => Command::Verify {
            ext: ext16(),
            bytchk: bytchk()?,
        },
        WRITE_AND_VERIFY_10 => Command::WriteAndVerify {
            ext: ext10(),
            bytchk: bytchk()?,
        },
        WRITE_AND_VERIFY_12 => Command::WriteAndVerify {
            ext: ext12(),
            bytchk: bytchk()?,
        },
        WRITE_AND_VERIFY_16 => Command::WriteAndVerify {
            ext: ext16(),
            bytchk: bytchk()?,
        },
        ORWRITE_16 => Command::OrWrite { ext: ext16(), fua },
        COMPARE_AND_WRITE => Command::CompareAndWrite {
            ext: Extent {
                lba: be(cdb, 2, 8),
                blocks: u32::from(byte(cdb, 13)),
            },
            fua,
        },
        SYNCHRONIZE_CACHE_10 => Command::SynchronizeCache { ext: ext10() },
        SYNCHRONIZE_CACHE_16 => Command::SynchronizeCache { ext: ext16() },
        PRE_FETCH_10 => Command::PreFetch {
            ext: ext10(),
            immed: bit(cdb, 1, 1),
        },
        PRE_FETCH_16 => Command::PreFetch {
            ext: ext16(),
            immed: bit(cdb, 1, 1),
        },
        WRITE_SAME_10 => Command::WriteSame {
            ext: ext10(),
            unmap: bit(cdb, 1, 3),
            ndob: false,
        },
        WRITE_SAME_16 => Command::WriteSame {
            ext: ext16(),
            unmap: bit(cdb, 1, 3),
            ndob: bit(cdb, 1, 0),
        },
        UNMAP => Command::Unmap {
            param_len: be32(cdb, 7, 2),
        },
        SANITIZE => Command::Sanitize {
            service_action: byte(cdb, 1) & 0x1F,
            ause: bit(cdb, 1, 5),
            param_len: be32(cdb, 7, 2),
        },
        WRITE_ATOMIC_16 => Command::WriteAtomic {
            ext: Extent {
                lba: be(cdb, 2, 8),
                blocks: be32(cdb, 12, 2),
            },
            fua,
        },
        READ_DEFECT_DATA_10 => Command::ReadDefectData {
            twelve: false,
            plist: bit(cdb, 2, 4),
            glist: bit(cdb, 2, 3),
            format: byte(cdb, 2) & 0x07,
            alloc_len: be32(cdb, 7, 2),
        },
        READ_DEFECT_DATA_12 => Command::ReadDefectData {
            twelve: true,
            plist: bit(cdb, 1, 4),
            glist: bit(cdb, 1, 3),
            format: byte(cdb, 1) & 0x07,
            alloc_len: be32(cdb, 6, 4),
        },
        SERVICE_ACTION_IN_16 if sa == SA_READ_CAPACITY_16 => {
            if !bit(cdb, 14, 0) && be(cdb, 2, 8) != 0 {
                return Err(SenseReason::InvalidFieldInCdb(FieldPointer::byte(2)));
            }
            Command::ReadCapacity16 {
                alloc_len: be32(cdb, 10, 4),
            }
        }
        SERVICE_ACTION_IN_16 => Command::GetLbaStatus {
            lba: be(cdb, 2, 8),
            alloc_len: be32(cdb, 10, 4),
        },
        REPORT_LUNS => Command::ReportLuns {
            select: byte(cdb, 2),
            alloc_len: be32(cdb, 6, 4),
        },
        MAINTENANCE_IN if sa == crate::alua::SA_REPORT_TARGET_PORT_GROUPS => {
            // PARAMETER DATA FORMAT: 000b length only, 001b extended header; others reserved.
            let format = byte(cdb, 1) >> 5;
            if format > 1 {
                return Err(invalid(1, if format > 3 { 7 } else { 6 }));
            }
            Command::ReportTargetPortGroups {
                extended: format == 1,
                alloc_len: be32(cdb, 6, 4),
            }
        }
        MAINTENANCE_IN => {
            let options = byte(cdb, 2) & 0x07;
            if options > 2 {
                return Err(invalid(2, 2));
            }
            Command::ReportSupportedOpcodes {
                rctd: bit(cdb, 2, 7),
                options,
                opcode: byte(cdb, 3),
                service_action: u16::try_from(be(cdb, 4, 2)).unwrap_or(u16::MAX),
                alloc_len: be32(cdb, 6, 4),
            }
        }
        RESERVE_6 | RESERVE_10 => Command::Reserve,
        RELEASE_6 | RELEASE_10 => Command::Release,
        PERSISTENT_RESERVE_IN => Command::PersistentReserveIn {
            service_action: byte(cdb, 1) & 0x1F,
            alloc_len: be32(cdb, 7, 2),
        },
        PERSISTENT_RESERVE_OUT => Command::PersistentReserveOut {
            service_action: byte(cdb, 1) & 0x1F,
            scope: byte(cdb, 2) >> 4,
            ty: byte(cdb, 2) & 0x0F,
            param_len: be32(cdb, 5, 4),
        },
        EXTENDED_COPY => Command::ExtendedCopy {
            param_len: be32(cdb, 10, 4),
        },
        RECEIVE_COPY_RESULTS => Command::ReceiveCopyResults {
            service_action: sa,
            list_id: byte(cdb, 2),
            alloc_len: be32(cdb, 10, 4),
        },
        _ => return Err(SenseReason::InvalidOpcode),
    };
    Ok(cmd)
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::unwrap_used)]
mod tests {
    use super::*;

    fn fp(byte: u16, bit: u8) -> SenseReason {
        SenseReason::InvalidFieldInCdb(FieldPointer::bit(byte, bit))
    }

    #[test]
    fn table_is_sorted_and_masks_carry_opcode() {
        for w in COMMANDS.windows(2) {
            let a = (w[0].opcode, w[0].service_action);
            let b = (w[1].opcode, w[1].service_action);
            assert!(a < b, "{a:?} !< {b:?}");
        }
        for c in COMMANDS {
            assert_eq!(c.usage[0], c.opcode, "{}", c.name);
            assert!(matches!(c.cdb_len(), 6 | 10 | 12 | 16), "{}", c.name);
            if let Some(sa) = c.service_action {
                assert_eq!(u16::from(c.usage[1] & 0x1F), sa, "{}", c.name);
            }
        }
    }

    /// Every opcode of the table parses from its minimal all-zero CDB (with required fields).
    #[test]
    fn accepts_every_opcode_minimal() {
        for c in COMMANDS {
            let mut cdb = vec![0u8; c.cdb_len()];
            cdb[0] = c.opcode;
            if let Some(sa) = c.service_action {
                cdb[1] = u8::try_from(sa).unwrap();
            }
            assert!(parse(&cdb).is_ok(), "{}: {:?}", c.name, parse(&cdb));
        }
    }

    /// A CDB one byte short of its opcode's length is rejected.
    #[test]
    fn rejects_short_cdbs() {
        for c in COMMANDS {
            let mut cdb = vec![0u8; c.cdb_len() - 1];
            cdb[0] = c.opcode;
            if let Some(sa) = c.service_action {
                cdb[1] = u8::try_from(sa).unwrap();
            }
            assert_eq!(
                parse(&cdb),
                Err(SenseReason::InvalidFieldInCdb(FieldPointer::byte(0))),
                "{}",
                c.name
            );
        }
        assert_eq!(parse(&[]), Err(SenseReason::InvalidOpcode));
    }

    /// Every reserved bit of every CDB is rejected with a pointer at that bit.
    #[test]
    fn rejects_every_reserved_bit() {
        for c in COMMANDS {
            for i in 1..c.cdb_len() {
                for b in 0..8u8 {
                    let sa_bit = i == 1 && c.service_action.is_some() && b < 5;
                    if c.usage[i] & (1 << b) != 0 || sa_bit {
                        continue;
                    }
                    let mut cdb = vec![0u8; c.cdb_len()];
                    cdb[0] = c.opcode;
                    if let Some(sa) = c.service_action {
                        cdb[1] = u8::try_from(sa).unwrap();
                    }
                    cdb[i] |= 1 << b;
                    let got = parse(&cdb);
                    let want = fp(u16::try_from(i).unwrap(), b);
                    assert_eq!(got, Err(want), "{} byte {i} bit {b}", c.name);
                }
            }
        }
    }

    #[test]
    fn rejects_unknown_opcodes() {
        for opcode in 0..=255u8 {
            if !opcode_known(opcode) {
                assert_eq!(parse(&[opcode; 16]), Err(SenseReason::InvalidOpcode));
            }
        }
    }

    #[test]
    fn rejects_unknown_service_action() {
        assert_eq!(
            parse(&[0x9E, 0x11, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            Err(fp(1, 4))
        );
        assert_eq!(
            parse(&[0xA3, 0x0B, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            Err(fp(1, 4))
        );
    }

    /// Table of byte-literal CDBs and what they parse to.
    #[test]
    fn accepts_cdb_table() {
        let e = |lba, blocks| Extent { lba, blocks };
        let cases: &[(&[u8], Command)] = &[
            (
                &[0x08, 0x1F, 0xFF, 0xFF, 0x00, 0],
                Command::Read {
                    ext: e(0x1F_FFFF, 256),
                    fua: false,
                },
            ),
            (
                &[0x0A, 0x00, 0x01, 0x02, 0x03, 0],
                Command::Write {
                    ext: e(0x102, 3),
                    fua: false,
                },
            ),
            (
                &[0x28, 0x08, 0x12, 0x34, 0x56, 0x78, 0x03, 0x01, 0x00, 0],
                Command::Read {
                    ext: e(0x1234_5678, 256),
                    fua: true,
                },
            ),
            (
                &[0xAA, 0x10, 0, 0, 0, 1, 0, 1, 0, 0, 0, 0],
                Command::Write {
                    ext: e(1, 0x1_0000),
                    fua: false,
                },
            ),
            (
                &[
                    0x8A, 0x18, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
                    0xFF, 0, 0,
                ],
                Command::Write {
                    ext: e(u64::MAX, u32::MAX),
                    fua: true,
                },
            ),
            (
                &[0x2F, 0x02, 0, 0, 0, 9, 0, 0, 2, 0],
                Command::Verify {
                    ext: e(9, 2),
                    bytchk: 1,
                },
            ),
            (
                &[0x93, 0x09, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 1, 0, 0],
                Command::WriteSame {
                    ext: e(5, 1),
                    unmap: true,
                    ndob: true,
                },
            ),
            (
                &[0x12, 0x01, 0x83, 0x01, 0x00, 0],
                Command::Inquiry {
                    evpd: true,
                    page: 0x83,
                    alloc_len: 256,
                },
            ),
            (
                &[0x1A, 0x08, 0x7F, 0xFF, 0xC0, 0],
                Command::ModeSense {
                    ten: false,
                    dbd: true,
                    llbaa: false,
                    pc: 1,
                    page: 0x3F,
                    subpage: 0xFF,
                    alloc_len: 0xC0,
                },
            ),
            (
                &[0xA3, 0x0C, 0x82, 0x9E, 0x00, 0x10, 0, 0, 1, 0, 0, 0],
                Command::ReportSupportedOpcodes {
                    rctd: true,
                    options: 2,
                    opcode: 0x9E,
                    service_action: 0x10,
                    alloc_len: 256,
                },
            ),
            (
                &[0xA0, 0, 2, 0, 0, 0, 0, 0, 0, 16, 0, 0],
                Command::ReportLuns {
                    select: 2,
                    alloc_len: 16,
                },
            ),
            (
                &[0x9E, 0x12, 0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, 24, 0, 0],
                Command::GetLbaStatus {
                    lba: 7,
                    alloc_len: 24,
                },
            ),
        ];
        for (cdb, want) in cases {
            assert_eq!(parse(cdb), Ok(*want), "{cdb:02x?}");
            // Trailing padding (iSCSI's 16-byte CDB field) is ignored.
            let mut padded = cdb.to_vec();
            padded.resize(16, 0);
            assert_eq!(parse(&padded), Ok(*want), "{cdb:02x?} padded");
        }
    }

    #[test]
    fn accepts_and_rejects_reservation_cdbs() {
        assert_eq!(
            parse(&[0x5F, 0x01, 0x05, 0, 0, 0, 0, 0, 24, 0]),
            Ok(Command::PersistentReserveOut {
                service_action: 1,
                scope: 0,
                ty: 5,
                param_len: 24
            })
        );
        assert_eq!(
            parse(&[0x5E, 0x03, 0, 0, 0, 0, 0, 0x10, 0x00, 0]),
            Ok(Command::PersistentReserveIn {
                service_action: 3,
                alloc_len: 0x1000
            })
        );
        // PR IN 04h-1Fh and PR OUT REPLACE LOST RESERVATION (08h): INVALID FIELD IN CDB.
        for sa in 4..0x20u8 {
            assert_eq!(parse(&[0x5E, sa, 0, 0, 0, 0, 0, 0, 8, 0]), Err(fp(1, 4)));
        }
        assert_eq!(parse(&[0x5F, 0x08, 0, 0, 0, 0, 0, 0, 24, 0]), Err(fp(1, 4)));
        assert_eq!(parse(&[0x16, 0, 0, 0, 0, 0]), Ok(Command::Reserve));
        assert_eq!(
            parse(&[0x57, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            Ok(Command::Release)
        );
        // Third-party RESERVE(6), 3RDPTY / LONGID in RESERVE(10).
        assert_eq!(parse(&[0x16, 0x10, 0, 0, 0, 0]), Err(fp(1, 4)));
        assert_eq!(parse(&[0x56, 0x10, 0, 0, 0, 0, 0, 0, 0, 0]), Err(fp(1, 4)));
        assert_eq!(parse(&[0x56, 0x02, 0, 0, 0, 0, 0, 0, 0, 0]), Err(fp(1, 1)));
    }

    #[test]
    fn rejects_invalid_field_values() {
        // INQUIRY EVPD=0 with a page code.
        assert_eq!(
            parse(&[0x12, 0, 0x80, 0, 0xFF, 0]),
            Err(SenseReason::InvalidFieldInCdb(FieldPointer::byte(2)))
        );
        // VERIFY BYTCHK=2, VRPROTECT set.
        assert_eq!(parse(&[0x2F, 0x04, 0, 0, 0, 0, 0, 0, 1, 0]), Err(fp(1, 2)));
        assert_eq!(parse(&[0x2F, 0x20, 0, 0, 0, 0, 0, 0, 1, 0]), Err(fp(1, 5)));
        // WRITE SAME ANCHOR; WRITE(10) WRPROTECT.
        assert_eq!(parse(&[0x41, 0x10, 0, 0, 0, 0, 0, 0, 1, 0]), Err(fp(1, 4)));
        assert_eq!(parse(&[0x2A, 0xE0, 0, 0, 0, 0, 0, 0, 1, 0]), Err(fp(1, 7)));
        // READ CAPACITY(10) LBA without PMI.
        assert_eq!(
            parse(&[0x25, 0, 0, 0, 0, 1, 0, 0, 0, 0]),
            Err(SenseReason::InvalidFieldInCdb(FieldPointer::byte(2)))
        );
        // RSOC reporting options 3..7.
        assert_eq!(
            parse(&[0xA3, 0x0C, 0x03, 0, 0, 0, 0, 0, 1, 0, 0, 0]),
            Err(fp(2, 2))
        );
        // NACA in the control byte.
        assert_eq!(parse(&[0x00, 0, 0, 0, 0, 0x04]), Err(fp(5, 2)));
    }
}
