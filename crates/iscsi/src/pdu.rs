//! iSCSI PDUs (RFC 7143 §11): one struct per opcode, with typed fields.
//!
//! A [`Pdu`] is a Basic Header Segment decoded into a [`Header`], its Additional Header
//! Segments, and its data segment (without padding or digest). Encoding and decoding live in
//! [`crate::bhs`]; the framer ([`crate::framer`]) cuts a byte stream into exact PDU slices first.
//!
//! Field names follow the RFC's names; offsets are in the codec.

use bytes::Bytes;

/// Opcodes, RFC 7143 §11.2.1.2 (initiator 0x00–0x1f, target 0x20–0x3f).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Opcode {
    NopOut = 0x00,
    ScsiCommand = 0x01,
    TaskMgmtRequest = 0x02,
    LoginRequest = 0x03,
    TextRequest = 0x04,
    DataOut = 0x05,
    LogoutRequest = 0x06,
    SnackRequest = 0x10,
    NopIn = 0x20,
    ScsiResponse = 0x21,
    TaskMgmtResponse = 0x22,
    LoginResponse = 0x23,
    TextResponse = 0x24,
    DataIn = 0x25,
    LogoutResponse = 0x26,
    R2t = 0x31,
    AsyncMessage = 0x32,
    Reject = 0x3f,
}

/// A whole PDU: header, AHSs and data segment (RFC 7143 §11.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pdu {
    pub header: Header,
    /// Additional Header Segments in wire order (§11.2.2).
    pub ahs: Vec<Ahs>,
    /// Data segment, without padding and digest.
    pub data: Bytes,
}

/// Additional Header Segment (RFC 7143 §11.2.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ahs {
    /// AHSType 1: CDB bytes beyond the first 16 (§11.2.2.3).
    ExtendedCdb(Bytes),
    /// AHSType 2: Expected Bidirectional Read Data Length (§11.2.2.4).
    BidiReadLength(u32),
    /// Any other type: kept verbatim (type, specific byte, payload without padding).
    Other {
        ahs_type: u8,
        specific: u8,
        payload: Bytes,
    },
}

/// The typed Basic Header Segment of each opcode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Header {
    NopOut(NopOut),
    ScsiCommand(ScsiCommand),
    TaskMgmtRequest(TaskMgmtRequest),
    LoginRequest(LoginRequest),
    TextRequest(TextRequest),
    DataOut(DataOut),
    LogoutRequest(LogoutRequest),
    SnackRequest(SnackRequest),
    NopIn(NopIn),
    ScsiResponse(ScsiResponse),
    TaskMgmtResponse(TaskMgmtResponse),
    LoginResponse(LoginResponse),
    TextResponse(TextResponse),
    DataIn(DataIn),
    LogoutResponse(LogoutResponse),
    R2t(R2t),
    AsyncMessage(AsyncMessage),
    Reject(Reject),
}

/// Reserved value of the Initiator/Target Task Tag (§11.1, §11.18.4).
pub const RESERVED_TAG: u32 = 0xffff_ffff;

/// NOP-Out, §11.18.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NopOut {
    pub immediate: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

/// Task attribute of a SCSI Command, §11.3.1 (ATTR field).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TaskAttr {
    Untagged = 0,
    #[default]
    Simple = 1,
    Ordered = 2,
    HeadOfQueue = 3,
    Aca = 4,
    /// Values 5..7 are reserved; kept so that decode never fails on them.
    Reserved5 = 5,
    Reserved6 = 6,
    Reserved7 = 7,
}

/// SCSI Command, §11.3. `cdb` holds the 16 header bytes; an extended CDB arrives as an AHS.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ScsiCommand {
    pub immediate: bool,
    pub final_: bool,
    pub read: bool,
    pub write: bool,
    pub attr: TaskAttr,
    pub lun: u64,
    pub itt: u32,
    pub expected_data_transfer_length: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub cdb: [u8; 16],
}

/// Task management functions, §11.5.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TmfFunction {
    AbortTask,
    AbortTaskSet,
    ClearAca,
    ClearTaskSet,
    LogicalUnitReset,
    TargetWarmReset,
    TargetColdReset,
    TaskReassign,
    /// Any other value (answered "function not supported").
    Other(u8),
}

/// Task Management Function Request, §11.5.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskMgmtRequest {
    pub immediate: bool,
    pub function: TmfFunction,
    pub lun: u64,
    pub itt: u32,
    pub referenced_task_tag: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub ref_cmd_sn: u32,
    pub exp_data_sn: u32,
}

/// Login stages, §11.12.3 (CSG/NSG).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Stage {
    #[default]
    Security = 0,
    Operational = 1,
    /// Value 2 is reserved.
    Reserved = 2,
    FullFeature = 3,
}

/// Login Request, §11.12.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LoginRequest {
    pub transit: bool,
    pub continue_: bool,
    pub csg: Stage,
    pub nsg: Stage,
    pub version_max: u8,
    pub version_min: u8,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub itt: u32,
    pub cid: u16,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

/// Text Request, §11.10.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TextRequest {
    pub immediate: bool,
    pub final_: bool,
    pub continue_: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

/// SCSI Data-Out, §11.7.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DataOut {
    pub final_: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub exp_stat_sn: u32,
    pub data_sn: u32,
    pub buffer_offset: u32,
}

/// Logout reason codes, §11.14.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogoutReason {
    CloseSession,
    CloseConnection,
    RemoveConnectionForRecovery,
    Other(u8),
}

/// Logout Request, §11.14.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogoutRequest {
    pub immediate: bool,
    pub reason: LogoutReason,
    pub itt: u32,
    pub cid: u16,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

/// SNACK Request, §11.16.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SnackRequest {
    pub snack_type: u8,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub exp_stat_sn: u32,
    pub beg_run: u32,
    pub run_length: u32,
}

/// NOP-In, §11.19.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NopIn {
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
}

/// SCSI Response, §11.4. `response` is the iSCSI Response field (0 = command completed at target).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ScsiResponse {
    pub bidi_overflow: bool,
    pub bidi_underflow: bool,
    pub overflow: bool,
    pub underflow: bool,
    pub response: u8,
    pub status: u8,
    pub itt: u32,
    pub snack_tag: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub exp_data_sn: u32,
    pub bidi_residual_count: u32,
    pub residual_count: u32,
}

/// Task Management Function Response codes, §11.6.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TmfResponse {
    FunctionComplete = 0,
    TaskDoesNotExist = 1,
    LunDoesNotExist = 2,
    TaskStillAllegiant = 3,
    ReassignmentNotSupported = 4,
    FunctionNotSupported = 5,
    AuthorizationFailed = 6,
    FunctionRejected = 255,
}

/// Task Management Function Response, §11.6.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskMgmtResponse {
    pub response: TmfResponse,
    pub itt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
}

/// Login Response, §11.13.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LoginResponse {
    pub transit: bool,
    pub continue_: bool,
    pub csg: Stage,
    pub nsg: Stage,
    pub version_max: u8,
    pub version_active: u8,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub itt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub status_class: u8,
    pub status_detail: u8,
}

/// Text Response, §11.11.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TextResponse {
    pub final_: bool,
    pub continue_: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
}

/// SCSI Data-In, §11.7. `status` is meaningful only when `status_present` (S bit).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DataIn {
    pub final_: bool,
    pub acknowledge: bool,
    pub overflow: bool,
    pub underflow: bool,
    pub status_present: bool,
    pub status: u8,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub data_sn: u32,
    pub buffer_offset: u32,
    pub residual_count: u32,
}

/// Logout Response, §11.15.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LogoutResponse {
    pub response: u8,
    pub itt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub time2wait: u16,
    pub time2retain: u16,
}

/// Ready To Transfer, §11.8.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct R2t {
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub r2t_sn: u32,
    pub buffer_offset: u32,
    pub desired_data_transfer_length: u32,
}

/// Asynchronous Message, §11.9.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AsyncMessage {
    pub lun: u64,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub async_event: u8,
    pub async_vcode: u8,
    pub parameter1: u16,
    pub parameter2: u16,
    pub parameter3: u16,
}

/// Reject reasons, §11.17.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    DataDigestError = 0x02,
    SnackReject = 0x03,
    ProtocolError = 0x04,
    CommandNotSupported = 0x05,
    ImmediateCommandReject = 0x06,
    TaskInProgress = 0x07,
    InvalidDataAck = 0x08,
    InvalidPduField = 0x09,
    LongOperationReject = 0x0a,
    DeprecatedNegotiationReset = 0x0b,
    WaitingForLogout = 0x0c,
}

/// Reject, §11.17. The data segment carries the rejected PDU's 48-byte header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    pub reason: RejectReason,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub data_sn_or_r2t_sn: u32,
}

impl Opcode {
    /// The opcode named by the low six bits of BHS byte 0 (§11.2.1.2), if this codec knows it.
    pub fn from_u8(code: u8) -> Option<Self> {
        Some(match code {
            0x00 => Opcode::NopOut,
            0x01 => Opcode::ScsiCommand,
            0x02 => Opcode::TaskMgmtRequest,
            0x03 => Opcode::LoginRequest,
            0x04 => Opcode::TextRequest,
            0x05 => Opcode::DataOut,
            0x06 => Opcode::LogoutRequest,
            0x10 => Opcode::SnackRequest,
            0x20 => Opcode::NopIn,
            0x21 => Opcode::ScsiResponse,
            0x22 => Opcode::TaskMgmtResponse,
            0x23 => Opcode::LoginResponse,
            0x24 => Opcode::TextResponse,
            0x25 => Opcode::DataIn,
            0x26 => Opcode::LogoutResponse,
            0x31 => Opcode::R2t,
            0x32 => Opcode::AsyncMessage,
            0x3f => Opcode::Reject,
            _ => return None,
        })
    }

    /// The wire value (§11.2.1.2).
    pub fn code(self) -> u8 {
        self as u8
    }

    /// Initiator opcodes are 0x00–0x1f (§11.2.1.2).
    pub fn is_initiator(self) -> bool {
        self.code() < 0x20
    }
}

impl TaskAttr {
    /// From the three ATTR bits of a SCSI Command (§11.3.1); every value maps.
    pub fn from_bits(bits: u8) -> Self {
        match bits & 0x07 {
            0 => TaskAttr::Untagged,
            1 => TaskAttr::Simple,
            2 => TaskAttr::Ordered,
            3 => TaskAttr::HeadOfQueue,
            4 => TaskAttr::Aca,
            5 => TaskAttr::Reserved5,
            6 => TaskAttr::Reserved6,
            _ => TaskAttr::Reserved7,
        }
    }

    /// The three ATTR bits.
    pub fn bits(self) -> u8 {
        self as u8
    }
}

impl TmfFunction {
    /// From the 7-bit Function field (§11.5.1); unassigned values become `Other`.
    pub fn from_u8(v: u8) -> Self {
        match v {
            1 => TmfFunction::AbortTask,
            2 => TmfFunction::AbortTaskSet,
            3 => TmfFunction::ClearAca,
            4 => TmfFunction::ClearTaskSet,
            5 => TmfFunction::LogicalUnitReset,
            6 => TmfFunction::TargetWarmReset,
            7 => TmfFunction::TargetColdReset,
            8 => TmfFunction::TaskReassign,
            other => TmfFunction::Other(other),
        }
    }

    /// The Function field value. `Other(v)` must hold an unassigned 7-bit value to round-trip.
    pub fn to_u8(self) -> u8 {
        match self {
            TmfFunction::AbortTask => 1,
            TmfFunction::AbortTaskSet => 2,
            TmfFunction::ClearAca => 3,
            TmfFunction::ClearTaskSet => 4,
            TmfFunction::LogicalUnitReset => 5,
            TmfFunction::TargetWarmReset => 6,
            TmfFunction::TargetColdReset => 7,
            TmfFunction::TaskReassign => 8,
            TmfFunction::Other(v) => v,
        }
    }
}

impl Stage {
    /// From a 2-bit CSG/NSG field (§11.12.3); every value maps.
    pub fn from_bits(bits: u8) -> Self {
        match bits & 0x03 {
            0 => Stage::Security,
            1 => Stage::Operational,
            2 => Stage::Reserved,
            _ => Stage::FullFeature,
        }
    }

    /// The 2-bit field value.
    pub fn bits(self) -> u8 {
        self as u8
    }
}

impl LogoutReason {
    /// From the 7-bit Reason Code (§11.14.1); unassigned values become `Other`.
    pub fn from_u8(v: u8) -> Self {
        match v {
            0 => LogoutReason::CloseSession,
            1 => LogoutReason::CloseConnection,
            2 => LogoutReason::RemoveConnectionForRecovery,
            other => LogoutReason::Other(other),
        }
    }

    /// The Reason Code. `Other(v)` must hold an unassigned 7-bit value to round-trip.
    pub fn to_u8(self) -> u8 {
        match self {
            LogoutReason::CloseSession => 0,
            LogoutReason::CloseConnection => 1,
            LogoutReason::RemoveConnectionForRecovery => 2,
            LogoutReason::Other(v) => v,
        }
    }
}

/// The reason in words, for logs: `close the session`, `close the connection`, `remove the
/// connection for recovery` (§11.14.1 Table), or `reason code N`.
impl std::fmt::Display for LogoutReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LogoutReason::CloseSession => f.write_str("close the session"),
            LogoutReason::CloseConnection => f.write_str("close the connection"),
            LogoutReason::RemoveConnectionForRecovery => {
                f.write_str("remove the connection for recovery")
            }
            LogoutReason::Other(v) => write!(f, "reason code {v}"),
        }
    }
}

impl TmfResponse {
    /// From the Response field (§11.6.1); `None` for unassigned values.
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => TmfResponse::FunctionComplete,
            1 => TmfResponse::TaskDoesNotExist,
            2 => TmfResponse::LunDoesNotExist,
            3 => TmfResponse::TaskStillAllegiant,
            4 => TmfResponse::ReassignmentNotSupported,
            5 => TmfResponse::FunctionNotSupported,
            6 => TmfResponse::AuthorizationFailed,
            255 => TmfResponse::FunctionRejected,
            _ => return None,
        })
    }

    /// The Response field value.
    pub fn to_u8(self) -> u8 {
        self as u8
    }
}

impl RejectReason {
    /// From the Reason field (§11.17.1); `None` for reserved values.
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0x02 => RejectReason::DataDigestError,
            0x03 => RejectReason::SnackReject,
            0x04 => RejectReason::ProtocolError,
            0x05 => RejectReason::CommandNotSupported,
            0x06 => RejectReason::ImmediateCommandReject,
            0x07 => RejectReason::TaskInProgress,
            0x08 => RejectReason::InvalidDataAck,
            0x09 => RejectReason::InvalidPduField,
            0x0a => RejectReason::LongOperationReject,
            0x0b => RejectReason::DeprecatedNegotiationReset,
            0x0c => RejectReason::WaitingForLogout,
            _ => return None,
        })
    }

    /// The Reason field value.
    pub fn to_u8(self) -> u8 {
        self as u8
    }
}

impl Header {
    /// The opcode of this header.
    pub fn opcode(&self) -> Opcode {
        match self {
            Header::NopOut(_) => Opcode::NopOut,
            Header::ScsiCommand(_) => Opcode::ScsiCommand,
            Header::TaskMgmtRequest(_) => Opcode::TaskMgmtRequest,
            Header::LoginRequest(_) => Opcode::LoginRequest,
            Header::TextRequest(_) => Opcode::TextRequest,
            Header::DataOut(_) => Opcode::DataOut,
            Header::LogoutRequest(_) => Opcode::LogoutRequest,
            Header::SnackRequest(_) => Opcode::SnackRequest,
            Header::NopIn(_) => Opcode::NopIn,
            Header::ScsiResponse(_) => Opcode::ScsiResponse,
            Header::TaskMgmtResponse(_) => Opcode::TaskMgmtResponse,
            Header::LoginResponse(_) => Opcode::LoginResponse,
            Header::TextResponse(_) => Opcode::TextResponse,
            Header::DataIn(_) => Opcode::DataIn,
            Header::LogoutResponse(_) => Opcode::LogoutResponse,
            Header::R2t(_) => Opcode::R2t,
            Header::AsyncMessage(_) => Opcode::AsyncMessage,
            Header::Reject(_) => Opcode::Reject,
        }
    }

    /// The Initiator Task Tag (§11.2.1.8); [`RESERVED_TAG`] for Async Message and Reject.
    pub fn itt(&self) -> u32 {
        match self {
            Header::NopOut(h) => h.itt,
            Header::ScsiCommand(h) => h.itt,
            Header::TaskMgmtRequest(h) => h.itt,
            Header::LoginRequest(h) => h.itt,
            Header::TextRequest(h) => h.itt,
            Header::DataOut(h) => h.itt,
            Header::LogoutRequest(h) => h.itt,
            Header::SnackRequest(h) => h.itt,
            Header::NopIn(h) => h.itt,
            Header::ScsiResponse(h) => h.itt,
            Header::TaskMgmtResponse(h) => h.itt,
            Header::LoginResponse(h) => h.itt,
            Header::TextResponse(h) => h.itt,
            Header::DataIn(h) => h.itt,
            Header::LogoutResponse(h) => h.itt,
            Header::R2t(h) => h.itt,
            Header::AsyncMessage(_) | Header::Reject(_) => RESERVED_TAG,
        }
    }

    /// The I bit (§11.2.1.1): set only on immediate initiator PDUs (always on a Login Request).
    pub fn immediate(&self) -> bool {
        match self {
            Header::NopOut(h) => h.immediate,
            Header::ScsiCommand(h) => h.immediate,
            Header::TaskMgmtRequest(h) => h.immediate,
            Header::LoginRequest(_) => true,
            Header::TextRequest(h) => h.immediate,
            Header::LogoutRequest(h) => h.immediate,
            _ => false,
        }
    }
}

impl Pdu {
    /// A PDU with no AHS and no data segment.
    pub fn new(header: Header) -> Self {
        Pdu {
            header,
            ahs: Vec::new(),
            data: Bytes::new(),
        }
    }

    /// A PDU with no AHS and the given data segment.
    pub fn with_data(header: Header, data: Bytes) -> Self {
        Pdu {
            header,
            ahs: Vec::new(),
            data,
        }
    }
}
