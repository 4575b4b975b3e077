//! The logical unit: unit attention → reservation check → CDB dispatch (SPC-4 §5, SBC-3 §5).

use bytes::Bytes;

/// Identifies an I_T nexus (initiator port × target port) for unit attentions and reservations.
/// The daemon allocates one per session; the LU learns of it via [`LogicalUnit::add_nexus`].
pub type NexusId = u64;

/// Static description of a logical unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LuConfig {
    /// LUN as seen in REPORT LUNS (single-level, peripheral addressing for < 256).
    pub lun: u64,
    /// 512 or 4096.
    pub block_size: u32,
    pub num_blocks: u64,
    /// T10 vendor id (8), product id (16), revision (4); space-padded on the wire.
    pub vendor: String,
    pub product: String,
    pub revision: String,
    /// Unit serial number (VPD 80h), stable across restarts.
    pub serial: String,
    /// NAA IEEE Registered Extended identifier (VPD 83h, type 6, 16 bytes), stable across restarts.
    pub naa: [u8; 16],
    /// SCSI target name for the VPD 83h SCSI name string and target-port descriptors.
    pub target_name: String,
    /// Relative target port identifier (VPD 83h association 1).
    pub relative_port: u16,
    /// Target port group (VPD 83h, type 5).
    pub target_port_group: u16,
    /// Thin provisioning: UNMAP / WRITE SAME with UNMAP / GET LBA STATUS supported (LBPME=1).
    pub thin: bool,
    pub read_only: bool,
    /// Write-back cache enabled (caching mode page WCE).
    pub write_cache: bool,
    /// Maximum transfer length in blocks (VPD B0h) and UNMAP limits.
    pub max_transfer_blocks: u32,
    pub max_unmap_blocks: u32,
    pub max_unmap_descriptors: u32,
}

impl LuConfig {
    /// A configuration with the usual defaults: vendor "IRONLUN", product "ironlun disk",
    /// revision "0001", serial derived from `naa`, thin provisioning and write-back cache on,
    /// read-write, 16 MiB maximum transfer, UNMAP limits of 1 Mi blocks / 256 descriptors.
    /// `naa` defaults to zero; set it (and `serial` with [`LuConfig::with_naa`]) for stable ids.
    pub fn new(lun: u64, block_size: u32, num_blocks: u64, target_name: &str) -> Self {
        let max_transfer_blocks = (16 * 1024 * 1024u32).checked_div(block_size).unwrap_or(0);
        let mut config = LuConfig {
            lun,
            block_size,
            num_blocks,
            vendor: "IRONLUN".to_string(),
            product: "ironlun disk".to_string(),
            revision: "0001".to_string(),
            serial: String::new(),
            naa: [0; 16],
            target_name: target_name.to_string(),
            relative_port: 1,
            target_port_group: 0,
            thin: true,
            read_only: false,
            write_cache: true,
            max_transfer_blocks,
            max_unmap_blocks: 0x10_0000,
            max_unmap_descriptors: 256,
        };
        config.serial = serial_from_naa(&config.naa);
        config
    }

    /// Set the NAA identifier and derive the unit serial number (VPD 80h) from it.
    pub fn with_naa(mut self, naa: [u8; 16]) -> Self {
        self.naa = naa;
        self.serial = serial_from_naa(&naa);
        self
    }
}

/// Hex of the NAA identifier's vendor-specific part: stable, printable ASCII (SPC-4 §7.8.15).
fn serial_from_naa(naa: &[u8; 16]) -> String {
    naa.iter().skip(4).map(|b| format!("{b:02x}")).collect()
}

/// A finished command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    pub status: u8,
    /// Sense data (fixed or descriptor format per D_SENSE); empty unless CHECK CONDITION.
    pub sense: Bytes,
    /// Data-In (may exceed the allocation; the transport cuts and reports residuals).
    pub data: Bytes,
}

/// One backstore operation, in bytes (the LU has already checked the range against capacity).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IoOp {
    Read { offset: u64, len: u64 },
    /// `fua`: durable before completion (FUA bit, or write-through cache).
    Write { offset: u64, data: Bytes, fua: bool },
    Flush,
    WriteZeroes { offset: u64, len: u64, unmap: bool },
    Unmap { ranges: Vec<(u64, u64)> },
    /// Mapped/deallocated status of extents starting at `offset` (GET LBA STATUS).
    MapStatus { offset: u64, len: u64 },
}

/// Outcome of an [`IoOp`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IoResult {
    Done,
    Data(Bytes),
    /// `(offset, len, mapped)` runs covering the queried range from its start.
    Extents(Vec<(u64, u64, bool)>),
    /// The backstore failed: maps to MEDIUM ERROR / HARDWARE ERROR sense.
    Error(IoErrorKind),
}

/// Backstore failure kinds as the SCSI layer sees them (one `From` in the daemon).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoErrorKind {
    ReadError,
    WriteError,
    NoSpace,
    Unsupported,
    Other,
}

/// What the LU needs to finish a command after its I/O.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Continuation {
    _private: (),
}

/// The result of `execute` / `resume`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Done(Completion),
    Io(IoOp, Continuation),
}

/// What a task management function did, so the transport can drop affected tasks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TmfEffect {
    /// Nothing to abort beyond the named task (ABORT TASK).
    None,
    /// Abort every task of this nexus on this LU (ABORT TASK SET).
    AbortNexusTasks,
    /// Abort every task of every nexus on this LU (CLEAR TASK SET, LUN RESET).
    AbortAllTasks,
}

/// One logical unit's state: mode pages, unit attentions per nexus, medium state.
pub struct LogicalUnit {
    _private: (),
}

impl LogicalUnit {
    pub fn new(config: LuConfig) -> Self {
        let _ = config;
        todo!()
    }

    pub fn config(&self) -> &LuConfig {
        todo!()
    }

    /// A new I_T nexus: it receives POWER ON, RESET, OR BUS DEVICE RESET OCCURRED (29h/00h).
    pub fn add_nexus(&mut self, nexus: NexusId) {
        let _ = nexus;
        todo!()
    }

    pub fn remove_nexus(&mut self, nexus: NexusId) {
        let _ = nexus;
        todo!()
    }

    /// Start a command. `alloc_len` is the transport's expected Data-In length.
    pub fn execute(&mut self, nexus: NexusId, cdb: &[u8], data_out: Bytes) -> Step {
        let _ = (nexus, cdb, data_out);
        todo!()
    }

    /// Continue a command after its [`IoOp`].
    pub fn resume(&mut self, nexus: NexusId, cont: Continuation, result: IoResult) -> Step {
        let _ = (nexus, cont, result);
        todo!()
    }

    /// LUN RESET / TARGET WARM/COLD RESET: unit attention 29h/xx to every other nexus, mode
    /// pages back to saved values where the standard says so.
    pub fn reset(&mut self, from: NexusId, kind: ResetKind) {
        let _ = (from, kind);
        todo!()
    }

    /// The backing size changed: CAPACITY DATA HAS CHANGED (2Ah/09h) to every nexus.
    pub fn set_num_blocks(&mut self, num_blocks: u64) {
        let _ = num_blocks;
        todo!()
    }
}

/// Which reset happened (SAM-5 §6.3), for the unit attention's ASCQ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetKind {
    LogicalUnit,
    TargetWarm,
    TargetCold,
}

/// REPORT LUNS (SPC-4 §6.33), answered at the target level for the LUNs the nexus may see.
pub fn report_luns(cdb: &[u8], luns: &[u64]) -> Completion {
    let _ = (cdb, luns);
    todo!()
}

/// A command addressed to a LUN that does not exist (SPC-4 §6.6.2: INQUIRY answers with
/// peripheral qualifier 011b; REQUEST SENSE answers LOGICAL UNIT NOT SUPPORTED as data; others
/// get CHECK CONDITION, ILLEGAL REQUEST, LOGICAL UNIT NOT SUPPORTED 25h/00h).
pub fn no_such_lun(cdb: &[u8]) -> Completion {
    let _ = cdb;
    todo!()
}
