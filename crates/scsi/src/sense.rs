//! The one sense table (SPC-4 §4.5): every [`SenseReason`] maps to key / ASC / ASCQ here, and
//! [`SenseReason::to_bytes`] encodes fixed (70h, SPC-4 §4.5.3) or descriptor (72h, SPC-4 §4.5.2)
//! sense data.

use bytes::Bytes;

/// Sense keys (SPC-4 §4.5.6, table 27).
pub mod key {
    pub const NO_SENSE: u8 = 0x0;
    pub const NOT_READY: u8 = 0x2;
    pub const MEDIUM_ERROR: u8 = 0x3;
    pub const HARDWARE_ERROR: u8 = 0x4;
    pub const ILLEGAL_REQUEST: u8 = 0x5;
    pub const UNIT_ATTENTION: u8 = 0x6;
    pub const DATA_PROTECT: u8 = 0x7;
    pub const COPY_ABORTED: u8 = 0xA;
    pub const ABORTED_COMMAND: u8 = 0xB;
    pub const MISCOMPARE: u8 = 0xE;
}

/// Points at the offending field for INVALID FIELD IN CDB / PARAMETER LIST
/// (sense-key specific field pointer, SPC-4 §4.5.2.4.2): `byte` is the field pointer, `bit`
/// the bit pointer (BPV=1) when one bit is at fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldPointer {
    pub byte: u16,
    pub bit: Option<u8>,
}

impl FieldPointer {
    /// The whole byte `byte` is at fault.
    pub const fn byte(byte: u16) -> Self {
        FieldPointer { byte, bit: None }
    }

    /// Bit `bit` (0..=7) of byte `byte` is at fault.
    pub const fn bit(byte: u16, bit: u8) -> Self {
        FieldPointer {
            byte,
            bit: Some(bit),
        }
    }
}

/// Why a command ends in CHECK CONDITION (or what REQUEST SENSE reports). One variant per
/// distinct sense code the LU reports; [`SenseReason::code`] is the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SenseReason {
    /// NO SENSE, NO ADDITIONAL SENSE INFORMATION (00h/00h): REQUEST SENSE with nothing pending.
    NoSense,
    /// ILLEGAL REQUEST, INVALID COMMAND OPERATION CODE (20h/00h).
    InvalidOpcode,
    /// ILLEGAL REQUEST, INVALID FIELD IN CDB (24h/00h), with the field pointer (C/D=1).
    InvalidFieldInCdb(FieldPointer),
    /// ILLEGAL REQUEST, INVALID FIELD IN PARAMETER LIST (26h/00h), field pointer (C/D=0).
    InvalidFieldInParameterList(FieldPointer),
    /// ILLEGAL REQUEST, PARAMETER LIST LENGTH ERROR (1Ah/00h).
    ParameterListLengthError,
    /// ILLEGAL REQUEST, INVALID FIELD IN COMMAND INFORMATION UNIT (0Eh/03h): Data-Out shorter
    /// than one logical block of what the CDB asked for.
    InvalidFieldInCommandIu,
    /// ILLEGAL REQUEST, LOGICAL BLOCK ADDRESS OUT OF RANGE (21h/00h).
    LbaOutOfRange,
    /// ILLEGAL REQUEST, LOGICAL UNIT NOT SUPPORTED (25h/00h).
    LogicalUnitNotSupported,
    /// ILLEGAL REQUEST, SAVING PARAMETERS NOT SUPPORTED (39h/00h).
    SavingParametersNotSupported,
    /// NOT READY, MEDIUM NOT PRESENT (3Ah/00h).
    MediumNotPresent,
    /// DATA PROTECT, WRITE PROTECTED (27h/00h).
    WriteProtected,
    /// DATA PROTECT, SPACE ALLOCATION FAILED WRITE PROTECT (27h/07h): thin backing full.
    SpaceAllocationFailed,
    /// MISCOMPARE, MISCOMPARE DURING VERIFY OPERATION (1Dh/00h); INFORMATION = byte offset
    /// of the first miscompare within the Data-Out (SBC-3 §5.28).
    Miscompare { offset: u64 },
    /// MEDIUM ERROR, UNRECOVERED READ ERROR (11h/00h).
    UnrecoveredReadError,
    /// MEDIUM ERROR, WRITE ERROR (0Ch/00h).
    WriteError,
    /// HARDWARE ERROR, INTERNAL TARGET FAILURE (44h/00h).
    InternalTargetFailure,
    /// UNIT ATTENTION, POWER ON, RESET, OR BUS DEVICE RESET OCCURRED (29h/00h).
    PowerOnOrReset,
    /// UNIT ATTENTION, POWER ON OCCURRED (29h/01h).
    PowerOnOccurred,
    /// UNIT ATTENTION, SCSI BUS RESET OCCURRED (29h/02h): target warm reset.
    BusResetOccurred,
    /// UNIT ATTENTION, BUS DEVICE RESET FUNCTION OCCURRED (29h/03h): LOGICAL UNIT RESET.
    BusDeviceResetOccurred,
    /// UNIT ATTENTION, I_T NEXUS LOSS OCCURRED (29h/07h).
    ItNexusLossOccurred,
    /// UNIT ATTENTION, MODE PARAMETERS CHANGED (2Ah/01h).
    ModeParametersChanged,
    /// UNIT ATTENTION, RESERVATIONS PREEMPTED (2Ah/03h): CLEAR (SPC-4 §5.13.11.2.7).
    ReservationsPreempted,
    /// UNIT ATTENTION, RESERVATIONS RELEASED (2Ah/04h): a registrants-only or all-registrants
    /// reservation released, or its type changed by PREEMPT (SPC-4 §5.13.11.2.2).
    ReservationsReleased,
    /// UNIT ATTENTION, REGISTRATIONS PREEMPTED (2Ah/05h): PREEMPT (SPC-4 §5.13.11.2.4).
    RegistrationsPreempted,
    /// UNIT ATTENTION, COMMANDS CLEARED BY ANOTHER INITIATOR (2Fh/00h): another I_T nexus's
    /// CLEAR TASK SET or PREEMPT AND ABORT ended this nexus's commands without status (TAS=0,
    /// SAM-5 §5.6, SPC-4 §7.5.8).
    CommandsClearedByAnotherInitiator,
    /// ILLEGAL REQUEST, INVALID RELEASE OF PERSISTENT RESERVATION (26h/04h).
    InvalidReleaseOfPersistentReservation,
    /// ILLEGAL REQUEST, INSUFFICIENT REGISTRATION RESOURCES (55h/04h).
    InsufficientRegistrationResources,
    /// UNIT ATTENTION, CAPACITY DATA HAS CHANGED (2Ah/09h).
    CapacityDataChanged,
    /// UNIT ATTENTION, REPORTED LUNS DATA HAS CHANGED (3Fh/0Eh).
    ReportedLunsDataChanged,
    /// NOT READY, LOGICAL UNIT NOT READY, OFFLINE (04h/12h): an administrator took the LU
    /// offline.
    LogicalUnitOffline,
    /// UNIT ATTENTION, NOT READY TO READY CHANGE, MEDIUM MAY HAVE CHANGED (28h/00h): the LU
    /// came back online.
    NotReadyToReadyChange,
    /// UNIT ATTENTION, ASYMMETRIC ACCESS STATE CHANGED (2Ah/06h): a target port group's
    /// ALUA state changed (SPC-4 §5.16.2.5).
    AsymmetricAccessStateChanged,
    /// NOT READY, LOGICAL UNIT NOT ACCESSIBLE, ASYMMETRIC ACCESS STATE TRANSITION (04h/0Ah).
    AluaTransitioning,
    /// NOT READY, LOGICAL UNIT NOT ACCESSIBLE, TARGET PORT IN STANDBY STATE (04h/0Bh).
    AluaStandby,
    /// NOT READY, LOGICAL UNIT NOT ACCESSIBLE, TARGET PORT IN UNAVAILABLE STATE (04h/0Ch).
    AluaUnavailable,
    /// ILLEGAL REQUEST, TOO MANY TARGET DESCRIPTORS (26h/06h): EXTENDED COPY (SPC-4 §6.4.3).
    TooManyTargetDescriptors,
    /// ILLEGAL REQUEST, UNSUPPORTED TARGET DESCRIPTOR TYPE CODE (26h/07h).
    UnsupportedTargetDescriptorType,
    /// ILLEGAL REQUEST, TOO MANY SEGMENT DESCRIPTORS (26h/08h).
    TooManySegmentDescriptors,
    /// ILLEGAL REQUEST, UNSUPPORTED SEGMENT DESCRIPTOR TYPE CODE (26h/09h).
    UnsupportedSegmentDescriptorType,
    /// ILLEGAL REQUEST, INLINE DATA LENGTH EXCEEDED (26h/0Bh).
    InlineDataLengthExceeded,
    /// ILLEGAL REQUEST, INVALID OPERATION FOR COPY SOURCE OR DESTINATION (26h/0Ch): e.g.
    /// source and destination block lengths differ.
    InvalidCopyOperation,
    /// ILLEGAL REQUEST, OPERATION IN PROGRESS (00h/16h): an EXTENDED COPY reuses the list
    /// identifier of a copy still running for the same I_T nexus (SPC-4 §6.4.1).
    OperationInProgress,
    /// ILLEGAL REQUEST, INSUFFICIENT RESOURCES (55h/03h): too many copies in progress.
    InsufficientResources,
    /// COPY ABORTED, COPY TARGET DEVICE NOT REACHABLE (0Dh/02h): a CSCD descriptor names no
    /// logical unit of this target visible to the nexus, or a segment an absent descriptor.
    CopyTargetNotReachable,
    /// COPY ABORTED, NO ADDITIONAL SENSE INFORMATION (00h/00h): a copy target refused its part
    /// (range beyond capacity, medium error) or the copy ran past its time bound.
    CopyAborted,
    /// NOT READY, LOGICAL UNIT NOT READY, SANITIZE IN PROGRESS (04h/1Bh), with the progress
    /// indication (fraction of 65536 done) in the sense-key specific field (SBC-3 §4.32,
    /// SPC-4 §4.5.2.4.4).
    SanitizeInProgress { progress: u16 },
    /// MEDIUM ERROR, SANITIZE COMMAND FAILED (31h/03h): the last sanitize operation failed
    /// (SBC-3 §4.32).
    SanitizeFailed,
}

/// Every variant once, for table tests.
pub const ALL_REASONS: &[SenseReason] = &[
    SenseReason::NoSense,
    SenseReason::InvalidOpcode,
    SenseReason::InvalidFieldInCdb(FieldPointer::byte(0)),
    SenseReason::InvalidFieldInParameterList(FieldPointer::byte(0)),
    SenseReason::ParameterListLengthError,
    SenseReason::InvalidFieldInCommandIu,
    SenseReason::LbaOutOfRange,
    SenseReason::LogicalUnitNotSupported,
    SenseReason::SavingParametersNotSupported,
    SenseReason::MediumNotPresent,
    SenseReason::WriteProtected,
    SenseReason::SpaceAllocationFailed,
    SenseReason::Miscompare { offset: 0 },
    SenseReason::UnrecoveredReadError,
    SenseReason::WriteError,
    SenseReason::InternalTargetFailure,
    SenseReason::PowerOnOrReset,
    SenseReason::PowerOnOccurred,
    SenseReason::BusResetOccurred,
    SenseReason::BusDeviceResetOccurred,
    SenseReason::ItNexusLossOccurred,
    SenseReason::ModeParametersChanged,
    SenseReason::ReservationsPreempted,
    SenseReason::ReservationsReleased,
    SenseReason::RegistrationsPreempted,
    SenseReason::CommandsClearedByAnotherInitiator,
    SenseReason::InvalidReleaseOfPersistentReservation,
    SenseReason::InsufficientRegistrationResources,
    SenseReason::CapacityDataChanged,
    SenseReason::ReportedLunsDataChanged,
    SenseReason::LogicalUnitOffline,
    SenseReason::NotReadyToReadyChange,
    SenseReason::AsymmetricAccessStateChanged,
    SenseReason::AluaTransitioning,
    SenseReason::AluaStandby,
    SenseReason::AluaUnavailable,
    SenseReason::TooManyTargetDescriptors,
    SenseReason::UnsupportedTargetDescriptorType,
    SenseReason::TooManySegmentDescriptors,
    SenseReason::UnsupportedSegmentDescriptorType,
    SenseReason::InlineDataLengthExceeded,
    SenseReason::InvalidCopyOperation,
    SenseReason::OperationInProgress,
    SenseReason::CopyTargetNotReachable,
    SenseReason::CopyAborted,
    SenseReason::SanitizeInProgress { progress: 0 },
    SenseReason::SanitizeFailed,
];

impl SenseReason {
    /// The table: (sense key, ASC, ASCQ) per SPC-4 §4.5.6 and annex D.
    pub const fn code(self) -> (u8, u8, u8) {
        use SenseReason::*;
        match self {
            NoSense => (key::NO_SENSE, 0x00, 0x00),
            InvalidOpcode => (key::ILLEGAL_REQUEST, 0x20, 0x00),
            InvalidFieldInCdb(_) => (key::ILLEGAL_REQUEST, 0x24, 0x00),
            InvalidFieldInParameterList(_) => (key::ILLEGAL_REQUEST, 0x26, 0x00),
            ParameterListLengthError => (key::ILLEGAL_REQUEST, 0x1A, 0x00),
            InvalidFieldInCommandIu => (key::ILLEGAL_REQUEST, 0x0E, 0x03),
            LbaOutOfRange => (key::ILLEGAL_REQUEST, 0x21, 0x00),
            LogicalUnitNotSupported => (key::ILLEGAL_REQUEST, 0x25, 0x00),
            SavingParametersNotSupported => (key::ILLEGAL_REQUEST, 0x39, 0x00),
            MediumNotPresent => (key::NOT_READY, 0x3A, 0x00),
            WriteProtected => (key::DATA_PROTECT, 0x27, 0x00),
            SpaceAllocationFailed => (key::DATA_PROTECT, 0x27, 0x07),
            Miscompare { .. } => (key::MISCOMPARE, 0x1D, 0x00),
            UnrecoveredReadError => (key::MEDIUM_ERROR, 0x11, 0x00),
            WriteError => (key::MEDIUM_ERROR, 0x0C, 0x00),
            InternalTargetFailure => (key::HARDWARE_ERROR, 0x44, 0x00),
            PowerOnOrReset => (key::UNIT_ATTENTION, 0x29, 0x00),
            PowerOnOccurred => (key::UNIT_ATTENTION, 0x29, 0x01),
            BusResetOccurred => (key::UNIT_ATTENTION, 0x29, 0x02),
            BusDeviceResetOccurred => (key::UNIT_ATTENTION, 0x29, 0x03),
            ItNexusLossOccurred => (key::UNIT_ATTENTION, 0x29, 0x07),
            ModeParametersChanged => (key::UNIT_ATTENTION, 0x2A, 0x01),
            ReservationsPreempted => (key::UNIT_ATTENTION, 0x2A, 0x03),
            ReservationsReleased => (key::UNIT_ATTENTION, 0x2A, 0x04),
            RegistrationsPreempted => (key::UNIT_ATTENTION, 0x2A, 0x05),
            CommandsClearedByAnotherInitiator => (key::UNIT_ATTENTION, 0x2F, 0x00),
            InvalidReleaseOfPersistentReservation => (key::ILLEGAL_REQUEST, 0x26, 0x04),
            InsufficientRegistrationResources => (key::ILLEGAL_REQUEST, 0x55, 0x04),
            CapacityDataChanged => (key::UNIT_ATTENTION, 0x2A, 0x09),
            ReportedLunsDataChanged => (key::UNIT_ATTENTION, 0x3F, 0x0E),
            LogicalUnitOffline => (key::NOT_READY, 0x04, 0x12),
            NotReadyToReadyChange => (key::UNIT_ATTENTION, 0x28, 0x00),
            AsymmetricAccessStateChanged => (key::UNIT_ATTENTION, 0x2A, 0x06),
            AluaTransitioning => (key::NOT_READY, 0x04, 0x0A),
            AluaStandby => (key::NOT_READY, 0x04, 0x0B),
            AluaUnavailable => (key::NOT_READY, 0x04, 0x0C),
            TooManyTargetDescriptors => (key::ILLEGAL_REQUEST, 0x26, 0x06),
            UnsupportedTargetDescriptorType => (key::ILLEGAL_REQUEST, 0x26, 0x07),
            TooManySegmentDescriptors => (key::ILLEGAL_REQUEST, 0x26, 0x08),
            UnsupportedSegmentDescriptorType => (key::ILLEGAL_REQUEST, 0x26, 0x09),
            InlineDataLengthExceeded => (key::ILLEGAL_REQUEST, 0x26, 0x0B),
            InvalidCopyOperation => (key::ILLEGAL_REQUEST, 0x26, 0x0C),
            OperationInProgress => (key::ILLEGAL_REQUEST, 0x00, 0x16),
            InsufficientResources => (key::ILLEGAL_REQUEST, 0x55, 0x03),
            CopyTargetNotReachable => (key::COPY_ABORTED, 0x0D, 0x02),
            CopyAborted => (key::COPY_ABORTED, 0x00, 0x00),
            SanitizeInProgress { .. } => (key::NOT_READY, 0x04, 0x1B),
            SanitizeFailed => (key::MEDIUM_ERROR, 0x31, 0x03),
        }
    }

    /// The sense-key specific field (SKSV set), if this reason carries one: field pointer
    /// bytes for INVALID FIELD IN CDB (C/D=1) / PARAMETER LIST (C/D=0), SPC-4 §4.5.2.4.2.
    pub fn sense_key_specific(self) -> Option<[u8; 3]> {
        let (cd, fp) = match self {
            SenseReason::InvalidFieldInCdb(fp) => (0x40u8, fp),
            SenseReason::InvalidFieldInParameterList(fp) => (0x00u8, fp),
            SenseReason::SanitizeInProgress { progress } => {
                let [hi, lo] = progress.to_be_bytes();
                return Some([0x80, hi, lo]);
            }
            _ => return None,
        };
        let bits = match fp.bit {
            Some(bit) => 0x08 | (bit & 0x07),
            None => 0,
        };
        let [hi, lo] = fp.byte.to_be_bytes();
        Some([0x80 | cd | bits, hi, lo])
    }

    /// The INFORMATION field, if valid for this reason.
    pub fn information(self) -> Option<u64> {
        match self {
            SenseReason::Miscompare { offset } => Some(offset),
            _ => None,
        }
    }

    /// Whether this is a unit attention condition (sense key 6).
    pub fn is_unit_attention(self) -> bool {
        self.code().0 == key::UNIT_ATTENTION
    }

    /// Encode as fixed (70h, current error, 18 bytes) or descriptor (72h) sense data.
    pub fn to_bytes(self, descriptor: bool) -> Bytes {
        let (sk, asc, ascq) = self.code();
        let sks = self.sense_key_specific();
        let info = self.information();
        if descriptor {
            let mut out = vec![0x72, sk, asc, ascq, 0, 0, 0, 0];
            if let Some(info) = info {
                // Information sense data descriptor (SPC-4 §4.5.2.2).
                out.extend_from_slice(&[0x00, 0x0A, 0x80, 0x00]);
                out.extend_from_slice(&info.to_be_bytes());
            }
            if let Some(sks) = sks {
                // Sense key specific sense data descriptor (SPC-4 §4.5.2.3).
                out.extend_from_slice(&[0x02, 0x06, 0x00, 0x00]);
                out.extend_from_slice(&sks);
                out.push(0);
            }
            let additional = u8::try_from(out.len().saturating_sub(8)).unwrap_or(0);
            if let Some(b) = out.get_mut(7) {
                *b = additional;
            }
            Bytes::from(out)
        } else {
            let mut out = [0u8; 18];
            out[0] = 0x70;
            out[2] = sk;
            // INFORMATION is 4 bytes in fixed format; VALID only if the value fits.
            if let Some(info32) = info.and_then(|i| u32::try_from(i).ok()) {
                out[0] |= 0x80;
                out[3..7].copy_from_slice(&info32.to_be_bytes());
            }
            out[7] = 10;
            out[12] = asc;
            out[13] = ascq;
            if let Some(sks) = sks {
                out[15..18].copy_from_slice(&sks);
            }
            Bytes::copy_from_slice(&out)
        }
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Every variant maps to a distinct (key, ASC, ASCQ), and encodes both ways.
    #[test]
    fn table_covers_every_variant() {
        let mut seen = std::collections::HashSet::new();
        for r in ALL_REASONS {
            let (sk, asc, ascq) = r.code();
            assert!(seen.insert((sk, asc, ascq)), "duplicate code for {r:?}");
            let f = r.to_bytes(false);
            assert_eq!(f.len(), 18);
            assert_eq!((f[2] & 0x0F, f[12], f[13]), (sk, asc, ascq));
            let d = r.to_bytes(true);
            assert_eq!(d[0], 0x72);
            assert_eq!((d[1], d[2], d[3]), (sk, asc, ascq));
            assert_eq!(usize::from(d[7]) + 8, d.len());
        }
        assert_eq!(seen.len(), ALL_REASONS.len());
    }

    #[test]
    fn encodes_field_pointer_fixed() {
        let s = SenseReason::InvalidFieldInCdb(FieldPointer::bit(1, 4)).to_bytes(false);
        assert_eq!(&s[15..18], &[0x80 | 0x40 | 0x08 | 4, 0x00, 0x01]);
        let s = SenseReason::InvalidFieldInParameterList(FieldPointer::byte(0x123)).to_bytes(false);
        assert_eq!(&s[15..18], &[0x80, 0x01, 0x23]);
    }

    #[test]
    fn encodes_progress_indication() {
        let s = SenseReason::SanitizeInProgress { progress: 0x8000 }.to_bytes(false);
        assert_eq!((s[2], s[12], s[13]), (key::NOT_READY, 0x04, 0x1B));
        assert_eq!(&s[15..18], &[0x80, 0x80, 0x00]);
        let d = SenseReason::SanitizeInProgress { progress: 1 }.to_bytes(true);
        assert_eq!(&d[8..16], &[0x02, 0x06, 0, 0, 0x80, 0x00, 0x01, 0]);
    }

    #[test]
    fn encodes_field_pointer_descriptor() {
        let s = SenseReason::InvalidFieldInCdb(FieldPointer::byte(2)).to_bytes(true);
        assert_eq!(&s[8..16], &[0x02, 0x06, 0, 0, 0xC0, 0x00, 0x02, 0]);
    }

    #[test]
    fn encodes_miscompare_information() {
        let s = SenseReason::Miscompare { offset: 0x1234 }.to_bytes(false);
        assert_eq!(s[0], 0xF0);
        assert_eq!(&s[3..7], &[0, 0, 0x12, 0x34]);
        let d = SenseReason::Miscompare { offset: 0x1234 }.to_bytes(true);
        assert_eq!(&d[8..20], &[0, 0x0A, 0x80, 0, 0, 0, 0, 0, 0, 0, 0x12, 0x34]);
        // Too big for the fixed 4-byte INFORMATION: VALID stays clear.
        let s = SenseReason::Miscompare { offset: 1 << 33 }.to_bytes(false);
        assert_eq!(s[0], 0x70);
    }
}
