//! Persistent reservations (SPC-4 §5.13, PERSISTENT RESERVE IN §6.15, OUT §6.16) and SPC-2
//! RESERVE/RELEASE (SPC-2 §5.5.1, §7.21, §7.24), for one logical unit.
//!
//! Pure and deterministic: the state machine takes the requesting I_T nexus, the CDB fields and
//! the parameter list, and returns the new state's effects (unit attentions to queue, nexuses
//! whose tasks must be aborted, whether the APTPL file must be rewritten). The LU
//! ([`crate::lu::LogicalUnit`]) owns one [`PrState`] shared by every session, portal and
//! portal group; the daemon performs the aborts and the durable write.
//!
//! Layout: [`PrState`] holds registrations and the reservation and runs the PERSISTENT
//! RESERVE OUT decision tables ([`PrState::prout`]) and the PERSISTENT RESERVE IN reports
//! ([`PrState::prin`]); [`access`] is the command access table (SPC-4 Table 65/66, SBC-3
//! Table 13); [`transport_id`] parses and builds iSCSI TransportIDs (SPC-4 §7.6.4.6);
//! [`persist`] is the APTPL state file format. SPC-2 reservations and unit-attention delivery
//! live in the LU, which knows the sessions.

use std::fmt;

use crate::sense::{FieldPointer, SenseReason};

pub mod access;
pub mod ownership;
pub mod persist;
pub mod transport_id;

#[cfg(test)]
mod model_tests;
#[cfg(test)]
mod ownership_tests;
#[cfg(test)]
mod tests;

/// An iSCSI initiator port, `<initiator name>,i,0x<ISID>` (SPC-4 §7.6.4.6; RFC 7143 §4.2.7.1).
/// The name is stored lower-cased: iSCSI names compare case-insensitively (RFC 3722).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InitiatorPort {
    name: String,
    isid: [u8; 6],
}

impl InitiatorPort {
    pub fn new(name: &str, isid: [u8; 6]) -> Self {
        InitiatorPort {
            name: name.to_ascii_lowercase(),
            isid,
        }
    }

    /// The iSCSI initiator name (lower-cased).
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn isid(&self) -> [u8; 6] {
        self.isid
    }
}

impl fmt::Display for InitiatorPort {
    /// `iqn.example:host,i,0x023d00000001`: 12 lower-case hex digits, as LIO prints it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{},i,0x", self.name)?;
        for b in self.isid {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// An I_T nexus as persistent reservations see it: the initiator port and the relative target
/// port identifier of the target port (the portal group tag of the portal group the session
/// logged in through; SPC-4 §3.1.124, RFC 7143 §4.4.1).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ItNexus {
    pub initiator: InitiatorPort,
    pub rtpi: u16,
}

/// Reservation types (SPC-4 §6.16.2 Table 213); 0, 2 and 4 are obsolete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReservationType {
    WriteExclusive = 1,
    ExclusiveAccess = 3,
    WriteExclusiveRegistrantsOnly = 5,
    ExclusiveAccessRegistrantsOnly = 6,
    WriteExclusiveAllRegistrants = 7,
    ExclusiveAccessAllRegistrants = 8,
}

impl ReservationType {
    pub fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            1 => Self::WriteExclusive,
            3 => Self::ExclusiveAccess,
            5 => Self::WriteExclusiveRegistrantsOnly,
            6 => Self::ExclusiveAccessRegistrantsOnly,
            7 => Self::WriteExclusiveAllRegistrants,
            8 => Self::ExclusiveAccessAllRegistrants,
            _ => return None,
        })
    }

    pub fn code(self) -> u8 {
        self as u8
    }

    /// Short name as sg_persist and targetcli print it.
    pub fn name(self) -> &'static str {
        match self {
            Self::WriteExclusive => "Write Exclusive",
            Self::ExclusiveAccess => "Exclusive Access",
            Self::WriteExclusiveRegistrantsOnly => "Write Exclusive, Registrants Only",
            Self::ExclusiveAccessRegistrantsOnly => "Exclusive Access, Registrants Only",
            Self::WriteExclusiveAllRegistrants => "Write Exclusive, All Registrants",
            Self::ExclusiveAccessAllRegistrants => "Exclusive Access, All Registrants",
        }
    }
}

/// A read-only view of one LU's reservation state, for `ironlun ctl reservations` and the
/// admin API.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PrSnapshot {
    /// PRgeneration (SPC-4 §6.15.2).
    pub generation: u32,
    /// The APTPL value of the last successful REGISTER / REGISTER AND IGNORE / REGISTER AND MOVE.
    pub aptpl: bool,
    pub registrations: Vec<RegistrationView>,
    pub reservation: Option<ReservationView>,
    /// Initiator port holding an SPC-2 RESERVE(6/10) reservation, if any.
    pub spc2_holder: Option<String>,
    /// Host (initiator name) owning the LU under target-managed ownership ([`ownership`]).
    pub owner: Option<String>,
    /// Epoch of the last ownership decision (0: never owned).
    pub epoch: u64,
    /// The handover in progress, if any.
    pub handover: ownership::Handover,
}

/// One registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistrationView {
    /// `name,i,0x<ISID>`, or just `name` for a registration of the initiator device (a
    /// SPEC_I_PT / REGISTER AND MOVE TransportID in format 00b: every ISID of that name).
    pub initiator_port: String,
    pub key: u64,
    /// Relative target port identifier; `None` when registered with ALL_TG_PT=1.
    pub rtpi: Option<u16>,
    /// This registration holds the reservation (every registrant for the all-registrants types).
    pub holder: bool,
}

/// The persistent reservation, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReservationView {
    pub ty: ReservationType,
    /// Always 0 (LU_SCOPE).
    pub scope: u8,
    /// The holder's current key; 0 for the all-registrants types (SPC-4 §6.15.3).
    pub key: u64,
}

/// When an LU's persistent-reservation state is kept on stable storage and restored at start.
///
/// SPC-4 §5.13.5.1 ties it to APTPL: registrations and the reservation survive a power loss
/// (for a target: a restart) only while the APTPL bit of the last successful REGISTER,
/// REGISTER AND IGNORE EXISTING KEY or REGISTER AND MOVE was one. A cluster whose fencing
/// registers without APTPL (fence_scsi without `aptpl=1`) then loses its keys, and with them
/// its fencing, when the target restarts. [`PrPersistence::Always`] keeps them anyway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PrPersistence {
    /// As SPC-4 says: kept while APTPL is one; PTPL_A reports APTPL.
    #[default]
    Aptpl,
    /// Kept whatever APTPL says (beyond SPC-4, as if every REGISTER had set it): every change
    /// is written before the PR OUT completes and restored at start; PTPL_A is one. The
    /// APTPL value itself is kept and reported as the initiator set it.
    Always,
}

impl PrPersistence {
    /// The names of the daemon's `persist_reservations` key: `aptpl`, `always`.
    pub fn name(self) -> &'static str {
        match self {
            PrPersistence::Aptpl => "aptpl",
            PrPersistence::Always => "always",
        }
    }

    /// From [`PrPersistence::name`].
    pub fn from_name(s: &str) -> Option<Self> {
        match s {
            "aptpl" => Some(PrPersistence::Aptpl),
            "always" => Some(PrPersistence::Always),
            _ => None,
        }
    }
}

/// Effects of a PR OUT that the daemon must carry out before it reports the completion
/// (see [`crate::lu::Step::PrCommit`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Persist {
    /// APTPL (or [`PrPersistence::Always`]) is in effect: write these bytes durably (temp
    /// file, fsync, rename, fsync dir) as the LU's state file before the PR OUT completes
    /// (SPC-4 §5.13.5.1). Also the ownership image when APTPL is off.
    Write(Vec<u8>),
    /// APTPL was turned off: remove the LU's state file (durably) before the PR OUT completes.
    Remove,
}

/// Why a persisted state file was refused at start ([`crate::lu::LogicalUnit::restore_pr`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PersistError {
    #[error("not an ironlun PR state file (bad magic or version)")]
    NotPrState,
    #[error(
        "state file belongs to another logical unit (serial {found:?}, expected {expected:?})"
    )]
    Foreign { found: String, expected: String },
    #[error("corrupt PR state file: {0}")]
    Corrupt(String),
}

impl ReservationType {
    /// WEAR / EAAR: every registrant is a reservation holder (SPC-4 §5.13.10).
    pub fn all_registrants(self) -> bool {
        matches!(
            self,
            Self::WriteExclusiveAllRegistrants | Self::ExclusiveAccessAllRegistrants
        )
    }

    /// WERO / EARO / WEAR / EAAR: registered I_T nexuses have full access (SPC-4 Table 65).
    pub fn registrants_have_access(self) -> bool {
        !matches!(self, Self::WriteExclusive | Self::ExclusiveAccess)
    }

    /// EA, EARO, EAAR: reads from I_T nexuses without access conflict too.
    pub fn exclusive_access(self) -> bool {
        matches!(
            self,
            Self::ExclusiveAccess
                | Self::ExclusiveAccessRegistrantsOnly
                | Self::ExclusiveAccessAllRegistrants
        )
    }
}

/// PERSISTENT RESERVE OUT service actions (SPC-4 §6.16.2 Table 212).
/// The name of PERSISTENT RESERVE OUT service action `sa` (SPC-4 §6.16.2 Table 219).
pub fn out_action_name(sa: u8) -> &'static str {
    match sa {
        sa::REGISTER => "REGISTER",
        sa::RESERVE => "RESERVE",
        sa::RELEASE => "RELEASE",
        sa::CLEAR => "CLEAR",
        sa::PREEMPT => "PREEMPT",
        sa::PREEMPT_AND_ABORT => "PREEMPT AND ABORT",
        sa::REGISTER_AND_IGNORE_EXISTING_KEY => "REGISTER AND IGNORE EXISTING KEY",
        sa::REGISTER_AND_MOVE => "REGISTER AND MOVE",
        _ => "unknown",
    }
}

pub mod sa {
    pub const REGISTER: u8 = 0x00;
    pub const RESERVE: u8 = 0x01;
    pub const RELEASE: u8 = 0x02;
    pub const CLEAR: u8 = 0x03;
    pub const PREEMPT: u8 = 0x04;
    pub const PREEMPT_AND_ABORT: u8 = 0x05;
    pub const REGISTER_AND_IGNORE_EXISTING_KEY: u8 = 0x06;
    pub const REGISTER_AND_MOVE: u8 = 0x07;
    /// PERSISTENT RESERVE IN service actions (SPC-4 §6.15.1 Table 199).
    pub const READ_KEYS: u8 = 0x00;
    pub const READ_RESERVATION: u8 = 0x01;
    pub const REPORT_CAPABILITIES: u8 = 0x02;
    pub const READ_FULL_STATUS: u8 = 0x03;
}

/// Upper bound on registrations per LU; one more is INSUFFICIENT REGISTRATION RESOURCES
/// (SPC-4 §5.13.7), so a peer cannot grow the state (and the APTPL file) without bound.
pub const MAX_REGISTRATIONS: usize = 1024;

/// Upper bound on a PERSISTENT RESERVE OUT parameter list (bytes): 24 + 4 + TransportIDs of
/// up to 256 bytes each for a full SPEC_I_PT list of 255 nexuses. A larger PARAMETER LIST
/// LENGTH is INVALID FIELD IN CDB (byte 5) before any Data-Out is used.
pub const MAX_PROUT_PARAM_LEN: u32 = 64 * 1024;

/// Longest iSCSI name accepted (RFC 7143 §4.2.7.1: 223 bytes).
pub const MAX_NAME_LEN: usize = 223;

/// One registration (SPC-4 §5.13.7): an I_T nexus, or, for a SPEC_I_PT / REGISTER AND MOVE
/// TransportID in format 00b, every initiator port of an initiator name; on one target port
/// or on all of them (ALL_TG_PT=1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// Stable identity inside this LU, so the reservation holder is a reference, not a key copy.
    pub(crate) id: u64,
    /// Initiator name, lower-cased.
    pub name: String,
    /// ISID of the initiator port; `None`: every ISID of `name` (TransportID format 00b).
    pub isid: Option<[u8; 6]>,
    /// Relative target port identifier; `None`: all target ports (ALL_TG_PT=1).
    pub rtpi: Option<u16>,
    pub key: u64,
}

impl Registration {
    /// Whether this registration covers the I_T nexus `it`.
    pub fn matches(&self, it: &ItNexus) -> bool {
        self.name == it.initiator.name()
            && self.isid.is_none_or(|i| i == it.initiator.isid())
            && self.rtpi.is_none_or(|r| r == it.rtpi)
    }

    /// Whether some I_T nexus is covered by both registrations.
    fn overlaps(&self, name: &str, isid: Option<[u8; 6]>, rtpi: Option<u16>) -> bool {
        self.name == name
            && (self.isid.is_none() || isid.is_none() || self.isid == isid)
            && (self.rtpi.is_none() || rtpi.is_none() || self.rtpi == rtpi)
    }

    /// `name,i,0x<isid>` or `name`.
    pub fn initiator_port(&self) -> String {
        match self.isid {
            Some(isid) => InitiatorPort::new(&self.name, isid).to_string(),
            None => self.name.clone(),
        }
    }
}

/// The persistent reservation (SPC-4 §5.13.9): always LU_SCOPE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reservation {
    /// [`Registration::id`] of the holder (meaningless for the all-registrants types).
    pub(crate) holder: u64,
    pub ty: ReservationType,
}

/// Why a PR command did not complete with GOOD.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrError {
    /// RESERVATION CONFLICT status (18h), no sense data.
    Conflict,
    /// CHECK CONDITION with this sense.
    Sense(SenseReason),
}

impl From<SenseReason> for PrError {
    fn from(r: SenseReason) -> Self {
        PrError::Sense(r)
    }
}

/// A PERSISTENT RESERVE OUT as parsed from the CDB (SPC-4 §6.16.1); `param` is exactly the
/// PARAMETER LIST LENGTH bytes of Data-Out.
#[derive(Debug, Clone, Copy)]
pub struct OutRequest<'a> {
    pub service_action: u8,
    pub scope: u8,
    pub ty: u8,
    pub param: &'a [u8],
}

/// Static facts the decision tables need from the LU configuration.
#[derive(Debug, Clone, Copy)]
pub struct PrContext<'a> {
    pub relative_ports: &'a [u16],
    pub ptpl_capable: bool,
}

/// What a successful PERSISTENT RESERVE OUT did, for the LU to carry out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Effects {
    /// Unit attentions: every I_T nexus covered by the registration gets the condition,
    /// except the requesting I_T nexus (SPC-4 §5.13.11; semantics §1.10).
    pub ua: Vec<(Registration, SenseReason)>,
    /// Registrations preempted by PREEMPT AND ABORT: their I_T nexuses' tasks are aborted.
    pub aborted: Vec<Registration>,
    /// Registrations or reservation changed (APTPL file to rewrite).
    pub changed: bool,
}

/// All persistent-reservation state of one logical unit (registrations, reservation,
/// PRgeneration, APTPL). SPC-2 reservations are kept by the LU.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrState {
    pub(crate) regs: Vec<Registration>,
    pub(crate) res: Option<Reservation>,
    /// PRgeneration (SPC-4 §6.15.2), wrapping.
    pub(crate) generation: u32,
    /// APTPL of the last successful REGISTER / REGISTER AND IGNORE / REGISTER AND MOVE.
    pub(crate) aptpl: bool,
    pub(crate) next_id: u64,
    /// Target-managed owner (lower-cased initiator name), see [`ownership`].
    pub(crate) owner: Option<String>,
    /// Epoch of the last ownership decision.
    pub(crate) epoch: u64,
    /// The target-side handover in progress ([`ownership::Handover`]); not in the state file.
    pub(crate) handover: ownership::Handover,
    /// Handover epochs above [`Self::epoch`] that were aborted and may never be prepared or
    /// committed (at most [`ownership::MAX_ABORTED`]); not in the state file.
    pub(crate) aborted: std::collections::BTreeSet<u64>,
}

fn be_u64(p: &[u8], at: usize) -> u64 {
    p.get(at..at.saturating_add(8))
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

fn be_u32(p: &[u8], at: usize) -> u32 {
    p.get(at..at.saturating_add(4))
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map(u32::from_be_bytes)
        .unwrap_or(0)
}

fn param_field(byte: u16) -> SenseReason {
    SenseReason::InvalidFieldInParameterList(FieldPointer::byte(byte))
}

fn param_bit(byte: u16, bit: u8) -> SenseReason {
    SenseReason::InvalidFieldInParameterList(FieldPointer::bit(byte, bit))
}

fn cdb_type_field() -> SenseReason {
    SenseReason::InvalidFieldInCdb(FieldPointer::byte(2))
}

impl PrState {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn generation(&self) -> u32 {
        self.generation
    }

    pub fn aptpl(&self) -> bool {
        self.aptpl
    }

    pub fn registrations(&self) -> &[Registration] {
        &self.regs
    }

    pub fn reservation(&self) -> Option<Reservation> {
        self.res
    }

    /// The registration covering `it`, if any.
    pub fn find(&self, it: &ItNexus) -> Option<&Registration> {
        self.regs.iter().find(|r| r.matches(it))
    }

    /// Give the registrations the ids `0..n` in their order (the holder reference follows)
    /// and make the next id `n`: the form [`persist::decode`] returns, so that replicas that
    /// exchange the state as bytes hold equal values (issue 18). Nothing a command observes
    /// changes: ids are internal references.
    pub fn renumber(&mut self) {
        let mut holder = None;
        for (i, r) in self.regs.iter_mut().enumerate() {
            let id = i as u64;
            if self.res.is_some_and(|res| res.holder == r.id) && holder.is_none() {
                holder = Some(id);
            }
            r.id = id;
        }
        if let Some(res) = &mut self.res {
            // An all-registrants reservation's holder is meaningless; keep it on a valid id.
            res.holder = holder.unwrap_or(0);
        }
        self.next_id = self.regs.len() as u64;
    }

    /// [`Registration::id`] of the registration covering `it`.
    pub fn registration_id(&self, it: &ItNexus) -> Option<u64> {
        self.find(it).map(|r| r.id)
    }

    /// Whether the registration `id` holds the reservation (SPC-4 §5.13.10: every registrant
    /// for the all-registrants types).
    pub fn is_holder(&self, id: u64) -> bool {
        match self.res {
            Some(res) => res.ty.all_registrants() || res.holder == id,
            None => false,
        }
    }

    fn reg(&self, id: u64) -> Option<&Registration> {
        self.regs.iter().find(|r| r.id == id)
    }

    fn bump(&mut self) {
        self.generation = self.generation.wrapping_add(1);
    }

    fn add(
        &mut self,
        name: &str,
        isid: Option<[u8; 6]>,
        rtpi: Option<u16>,
        key: u64,
    ) -> Result<u64, PrError> {
        if self.regs.len() >= MAX_REGISTRATIONS {
            return Err(SenseReason::InsufficientRegistrationResources.into());
        }
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        self.regs.push(Registration {
            id,
            name: name.to_string(),
            isid,
            rtpi,
            key,
        });
        Ok(id)
    }

    /// Remove registration `id`, applying the implicit release of SPC-4 §5.13.11.2.3: the
    /// holder of a non-all-registrants reservation releases it (RO types: 2Ah/04h to the
    /// remaining registrants); an all-registrants reservation ends with its last registrant.
    fn unregister(&mut self, id: u64, fx: &mut Effects) {
        self.regs.retain(|r| r.id != id);
        if let Some(res) = self.res {
            if res.ty.all_registrants() {
                if self.regs.is_empty() {
                    self.res = None;
                }
            } else if res.holder == id {
                self.res = None;
                if res.ty.registrants_have_access() {
                    for r in &self.regs {
                        fx.ua.push((r.clone(), SenseReason::ReservationsReleased));
                    }
                }
            }
        }
    }

    /// PERSISTENT RESERVE OUT from the I_T nexus `it` (SPC-4 §5.13, §6.16; semantics §1.4).
    /// On error nothing has changed.
    pub fn prout(
        &mut self,
        it: &ItNexus,
        req: OutRequest<'_>,
        ctx: PrContext<'_>,
    ) -> Result<Effects, PrError> {
        let p = req.param;
        // §6.16.3 / §6.16.4: every list is at least 24 bytes.
        if p.len() < 24 {
            return Err(SenseReason::ParameterListLengthError.into());
        }
        let rk = be_u64(p, 0);
        let sark = be_u64(p, 8);
        let flags = p.get(20).copied().unwrap_or(0);
        let spec_i_pt = flags & 0x08 != 0;
        let all_tg_pt = flags & 0x04 != 0;
        let aptpl = flags & 0x01 != 0;
        if req.service_action != sa::REGISTER_AND_MOVE {
            if spec_i_pt && req.service_action != sa::REGISTER {
                return Err(param_bit(20, 3).into());
            }
            if !spec_i_pt && p.len() != 24 {
                return Err(SenseReason::ParameterListLengthError.into());
            }
        }
        let mine = self.find(it).map(|r| (r.id, r.key));
        match req.service_action {
            sa::REGISTER | sa::REGISTER_AND_IGNORE_EXISTING_KEY => {
                let ignore = req.service_action == sa::REGISTER_AND_IGNORE_EXISTING_KEY;
                if aptpl && !ctx.ptpl_capable {
                    return Err(param_bit(20, 0).into());
                }
                let fx = self.register(it, mine, ignore, rk, sark, all_tg_pt, spec_i_pt, p)?;
                self.aptpl = aptpl;
                Ok(fx)
            }
            sa::REGISTER_AND_MOVE => {
                let (id, key) = mine.ok_or(PrError::Conflict)?;
                if key != rk {
                    return Err(PrError::Conflict);
                }
                self.register_and_move(it, id, sark, p, ctx)
            }
            _ => {
                let (id, key) = mine.ok_or(PrError::Conflict)?;
                if key != rk {
                    return Err(PrError::Conflict);
                }
                match req.service_action {
                    sa::RESERVE => self.reserve(id, req.scope, req.ty),
                    sa::RELEASE => self.release(id, req.scope, req.ty),
                    sa::CLEAR => Ok(self.clear()),
                    sa::PREEMPT | sa::PREEMPT_AND_ABORT => self.preempt(
                        id,
                        sark,
                        req.scope,
                        req.ty,
                        req.service_action == sa::PREEMPT_AND_ABORT,
                    ),
                    _ => Err(SenseReason::InvalidFieldInCdb(FieldPointer::bit(1, 4)).into()),
                }
            }
        }
    }

    /// REGISTER (Table 67) and REGISTER AND IGNORE EXISTING KEY (Table 68).
    #[allow(clippy::too_many_arguments)]
    fn register(
        &mut self,
        it: &ItNexus,
        mine: Option<(u64, u64)>,
        ignore: bool,
        rk: u64,
        sark: u64,
        all_tg_pt: bool,
        spec_i_pt: bool,
        p: &[u8],
    ) -> Result<Effects, PrError> {
        let mut fx = Effects::default();
        match mine {
            Some((id, key)) => {
                if !ignore && rk != key {
                    return Err(PrError::Conflict);
                }
                if spec_i_pt {
                    return Err(param_bit(20, 3).into());
                }
                if sark == 0 {
                    self.unregister(id, &mut fx);
                } else if let Some(r) = self.regs.iter_mut().find(|r| r.id == id) {
                    if r.key == sark {
                        return Ok(fx);
                    }
                    r.key = sark;
                }
            }
            None => {
                if !ignore && rk != 0 {
                    return Err(PrError::Conflict);
                }
                if sark == 0 {
                    // Table 67: unregistered nexus, SARK 0: GOOD, no change.
                    return Ok(fx);
                }
                let rtpi = if all_tg_pt { None } else { Some(it.rtpi) };
                let name = it.initiator.name();
                let isid = Some(it.initiator.isid());
                let mut extra: Vec<(String, Option<[u8; 6]>)> = Vec::new();
                if spec_i_pt {
                    // §6.16.3: TRANSPORTID PARAMETER DATA LENGTH, then whole TransportIDs.
                    let tpdl = usize::try_from(be_u32(p, 24)).unwrap_or(usize::MAX);
                    let end = tpdl
                        .checked_add(28)
                        .ok_or(SenseReason::ParameterListLengthError)?;
                    let list = p
                        .get(28..end)
                        .ok_or(SenseReason::ParameterListLengthError)?;
                    let mut at = 0usize;
                    while at < list.len() {
                        let rest = list.get(at..).unwrap_or_default();
                        let offset = u16::try_from(at.saturating_add(28)).unwrap_or(u16::MAX);
                        let (tid, used) = transport_id::parse(rest)
                            .map_err(|e| param_field(offset.saturating_add(e.offset)))?;
                        let overlaps_caller =
                            tid.name == name && tid.isid.is_none_or(|i| i == it.initiator.isid());
                        let overlaps_listed = extra.iter().any(|(n, i)| {
                            *n == tid.name && (i.is_none() || tid.isid.is_none() || *i == tid.isid)
                        });
                        let registered = self
                            .regs
                            .iter()
                            .any(|r| r.overlaps(&tid.name, tid.isid, rtpi));
                        if overlaps_caller || overlaps_listed || registered {
                            return Err(param_field(offset).into());
                        }
                        extra.push((tid.name, tid.isid));
                        at = at.saturating_add(used);
                    }
                }
                if self
                    .regs
                    .len()
                    .saturating_add(extra.len())
                    .saturating_add(1)
                    > MAX_REGISTRATIONS
                {
                    return Err(SenseReason::InsufficientRegistrationResources.into());
                }
                if all_tg_pt {
                    // The initiator port on every target port: it replaces that port's
                    // registrations on single target ports (same key semantics as a new one).
                    let caller_port: Vec<u64> = self
                        .regs
                        .iter()
                        .filter(|r| r.name == name && r.isid == isid)
                        .map(|r| r.id)
                        .collect();
                    for id in caller_port {
                        self.unregister(id, &mut fx);
                    }
                }
                self.add(name, isid, rtpi, sark)?;
                for (n, i) in extra {
                    self.add(&n, i, rtpi, sark)?;
                }
            }
        }
        fx.changed = true;
        self.bump();
        Ok(fx)
    }

    /// RESERVE (SPC-4 §5.13.9): no PRgeneration change, no unit attention.
    fn reserve(&mut self, id: u64, scope: u8, ty: u8) -> Result<Effects, PrError> {
        if scope != 0 {
            return Err(SenseReason::InvalidFieldInCdb(FieldPointer::bit(2, 7)).into());
        }
        let ty = ReservationType::from_code(ty).ok_or_else(cdb_type_field)?;
        match self.res {
            Some(res) if self.is_holder(id) && res.ty == ty => Ok(Effects::default()),
            Some(_) => Err(PrError::Conflict),
            None => {
                self.res = Some(Reservation { holder: id, ty });
                Ok(Effects {
                    changed: true,
                    ..Effects::default()
                })
            }
        }
    }

    /// RELEASE (SPC-4 §5.13.11.2.2): a non-holder's RELEASE does nothing; the holder's with
    /// another TYPE or SCOPE is INVALID RELEASE OF PERSISTENT RESERVATION.
    fn release(&mut self, id: u64, scope: u8, ty: u8) -> Result<Effects, PrError> {
        let mut fx = Effects::default();
        let Some(res) = self.res else {
            return Ok(fx);
        };
        if !self.is_holder(id) {
            return Ok(fx);
        }
        if scope != 0 || ty != res.ty.code() {
            return Err(SenseReason::InvalidReleaseOfPersistentReservation.into());
        }
        self.res = None;
        fx.changed = true;
        if res.ty.registrants_have_access() {
            for r in &self.regs {
                fx.ua.push((r.clone(), SenseReason::ReservationsReleased));
            }
        }
        Ok(fx)
    }

    /// CLEAR (SPC-4 §5.13.11.2.7): every registration and the reservation go; 2Ah/03h.
    fn clear(&mut self) -> Effects {
        let mut fx = Effects {
            changed: true,
            ..Effects::default()
        };
        for r in self.regs.drain(..) {
            fx.ua.push((r, SenseReason::ReservationsPreempted));
        }
        self.res = None;
        self.bump();
        fx
    }

    /// PREEMPT and PREEMPT AND ABORT (SPC-4 §5.13.11.2.4-6, semantics §1.4 table).
    fn preempt(
        &mut self,
        id: u64,
        sark: u64,
        scope: u8,
        ty: u8,
        abort: bool,
    ) -> Result<Effects, PrError> {
        let mut fx = Effects::default();
        let new_type = || -> Result<ReservationType, PrError> {
            if scope != 0 {
                return Err(SenseReason::InvalidFieldInCdb(FieldPointer::bit(2, 7)).into());
            }
            ReservationType::from_code(ty).ok_or_else(|| cdb_type_field().into())
        };
        let remove: Vec<u64>;
        match self.res {
            None => {
                if sark == 0 {
                    return Err(param_field(8).into());
                }
                remove = self.ids_with_key(sark, None);
                if remove.is_empty() {
                    return Err(PrError::Conflict);
                }
            }
            Some(res) if res.ty.all_registrants() => {
                if sark == 0 {
                    let ty = new_type()?;
                    remove = self
                        .regs
                        .iter()
                        .filter(|r| r.id != id)
                        .map(|r| r.id)
                        .collect();
                    self.res = Some(Reservation { holder: id, ty });
                } else {
                    remove = self.ids_with_key(sark, None);
                    if remove.is_empty() {
                        return Err(PrError::Conflict);
                    }
                }
            }
            Some(res) => {
                let holder_key = self.reg(res.holder).map(|r| r.key);
                if sark == 0 {
                    return Err(param_field(8).into());
                }
                if holder_key == Some(sark) {
                    let ty = new_type()?;
                    remove = self.ids_with_key(sark, Some(id));
                    self.res = Some(Reservation { holder: id, ty });
                    if res.holder != id && !remove.contains(&res.holder) {
                        // The holder lost its reservation but not its registration.
                        if let Some(h) = self.reg(res.holder) {
                            fx.ua.push((h.clone(), SenseReason::RegistrationsPreempted));
                        }
                    }
                    if ty != res.ty {
                        for r in self.regs.iter().filter(|r| !remove.contains(&r.id)) {
                            fx.ua.push((r.clone(), SenseReason::ReservationsReleased));
                        }
                    }
                } else {
                    remove = self.ids_with_key(sark, None);
                    if remove.is_empty() {
                        return Err(PrError::Conflict);
                    }
                }
            }
        }
        for rid in &remove {
            if let Some(r) = self.reg(*rid) {
                fx.ua.push((r.clone(), SenseReason::RegistrationsPreempted));
                if abort {
                    fx.aborted.push(r.clone());
                }
            }
        }
        for rid in remove {
            // The reservation, where it changes hands, was set above; removing a preempted
            // registration releases only a reservation it still holds.
            let mut ignored = Effects::default();
            self.unregister(rid, &mut ignored);
        }
        fx.changed = true;
        self.bump();
        Ok(fx)
    }

    fn ids_with_key(&self, key: u64, except: Option<u64>) -> Vec<u64> {
        self.regs
            .iter()
            .filter(|r| r.key == key && Some(r.id) != except)
            .map(|r| r.id)
            .collect()
    }

    /// REGISTER AND MOVE (SPC-4 §5.13.8, §6.16.4).
    fn register_and_move(
        &mut self,
        it: &ItNexus,
        id: u64,
        sark: u64,
        p: &[u8],
        ctx: PrContext<'_>,
    ) -> Result<Effects, PrError> {
        let res = self
            .res
            .ok_or(SenseReason::InvalidFieldInCdb(FieldPointer::byte(1)))?;
        if !self.is_holder(id) || res.ty.all_registrants() {
            return Err(PrError::Conflict);
        }
        let flags = p.get(17).copied().unwrap_or(0);
        let unreg = flags & 0x02 != 0;
        let aptpl = flags & 0x01 != 0;
        if aptpl && !ctx.ptpl_capable {
            return Err(param_bit(17, 0).into());
        }
        if sark == 0 {
            return Err(param_field(8).into());
        }
        let rtpi = u16::from_be_bytes([
            p.get(18).copied().unwrap_or(0),
            p.get(19).copied().unwrap_or(0),
        ]);
        if !ctx.relative_ports.contains(&rtpi) {
            return Err(param_field(18).into());
        }
        let tid_len = usize::try_from(be_u32(p, 20)).unwrap_or(usize::MAX);
        let end = tid_len
            .checked_add(24)
            .ok_or(SenseReason::ParameterListLengthError)?;
        let tid_bytes = p
            .get(24..end)
            .ok_or(SenseReason::ParameterListLengthError)?;
        let (tid, used) = transport_id::parse(tid_bytes)
            .map_err(|e| param_field(24u16.saturating_add(e.offset)))?;
        if used != tid_bytes.len() {
            return Err(param_field(20).into());
        }
        let dest_is_caller = tid.name == it.initiator.name()
            && tid.isid.is_none_or(|i| i == it.initiator.isid())
            && rtpi == it.rtpi;
        if dest_is_caller {
            return Err(param_field(24).into());
        }
        // The destination's registration: an existing one covering exactly it, or a new one.
        let existing = self
            .regs
            .iter()
            .find(|r| r.id != id && r.overlaps(&tid.name, tid.isid, Some(rtpi)))
            .map(|r| r.id);
        let dest = match existing {
            Some(d) => {
                if let Some(r) = self.regs.iter_mut().find(|r| r.id == d) {
                    r.key = sark;
                }
                d
            }
            None => self.add(&tid.name, tid.isid, Some(rtpi), sark)?,
        };
        self.res = Some(Reservation {
            holder: dest,
            ty: res.ty,
        });
        if unreg {
            self.regs.retain(|r| r.id != id);
        }
        self.aptpl = aptpl;
        self.bump();
        Ok(Effects {
            changed: true,
            ..Effects::default()
        })
    }

    /// PERSISTENT RESERVE IN parameter data (SPC-4 §6.15) for service action `sa`, uncut;
    /// the ADDITIONAL LENGTH / LENGTH fields always describe the whole data. REPORT
    /// CAPABILITIES reports `ptpl_capable` as PTPL_C and `ptpl_active` (the state survives a
    /// power loss now: APTPL, or [`PrPersistence::Always`]) as PTPL_A (§6.15.4).
    pub fn prin(
        &self,
        service_action: u8,
        ptpl_capable: bool,
        ptpl_active: bool,
    ) -> Result<Vec<u8>, SenseReason> {
        let mut out = Vec::new();
        match service_action {
            sa::READ_KEYS => {
                out.extend_from_slice(&self.generation.to_be_bytes());
                let n = u32::try_from(self.regs.len().saturating_mul(8)).unwrap_or(u32::MAX);
                out.extend_from_slice(&n.to_be_bytes());
                for r in &self.regs {
                    out.extend_from_slice(&r.key.to_be_bytes());
                }
            }
            sa::READ_RESERVATION => {
                out.extend_from_slice(&self.generation.to_be_bytes());
                match self.res {
                    None => out.extend_from_slice(&0u32.to_be_bytes()),
                    Some(res) => {
                        out.extend_from_slice(&16u32.to_be_bytes());
                        out.extend_from_slice(&self.reservation_key().to_be_bytes());
                        out.extend_from_slice(&[0, 0, 0, 0, 0, res.ty.code(), 0, 0]);
                    }
                }
            }
            sa::REPORT_CAPABILITIES => {
                // Table 207: CRH SIP_C ATP_C PTPL_C; TMV, ALLOW COMMANDS 011b, PTPL_A; mask.
                let caps = 0x10 | 0x08 | 0x04 | u8::from(ptpl_capable);
                let tmv = 0x80 | 0x30 | u8::from(ptpl_active);
                out.extend_from_slice(&[0x00, 0x08, caps, tmv, 0xEA, 0x01, 0x00, 0x00]);
            }
            sa::READ_FULL_STATUS => {
                out.extend_from_slice(&self.generation.to_be_bytes());
                out.extend_from_slice(&[0; 4]);
                for r in &self.regs {
                    let holder = self.is_holder(r.id);
                    let tid = transport_id::encode(&r.name, r.isid);
                    out.extend_from_slice(&r.key.to_be_bytes());
                    out.extend_from_slice(&[0; 4]);
                    out.push(u8::from(r.rtpi.is_none()) << 1 | u8::from(holder));
                    out.push(match (holder, self.res) {
                        (true, Some(res)) => res.ty.code(),
                        _ => 0,
                    });
                    out.extend_from_slice(&[0; 4]);
                    out.extend_from_slice(&r.rtpi.unwrap_or(0).to_be_bytes());
                    let n = u32::try_from(tid.len()).unwrap_or(u32::MAX);
                    out.extend_from_slice(&n.to_be_bytes());
                    out.extend_from_slice(&tid);
                }
                let n = u32::try_from(out.len().saturating_sub(8)).unwrap_or(u32::MAX);
                crate::vpd::put(&mut out, 4, &n.to_be_bytes());
            }
            _ => return Err(SenseReason::InvalidFieldInCdb(FieldPointer::bit(1, 4))),
        }
        Ok(out)
    }

    /// The key READ RESERVATION reports: the holder's current key, 0 for all-registrants.
    fn reservation_key(&self) -> u64 {
        match self.res {
            Some(res) if !res.ty.all_registrants() => {
                self.reg(res.holder).map(|r| r.key).unwrap_or(0)
            }
            _ => 0,
        }
    }

    /// A read-only view (no SPC-2 holder; the LU fills it in).
    pub fn snapshot(&self) -> PrSnapshot {
        PrSnapshot {
            generation: self.generation,
            aptpl: self.aptpl,
            registrations: self
                .regs
                .iter()
                .map(|r| RegistrationView {
                    initiator_port: r.initiator_port(),
                    key: r.key,
                    rtpi: r.rtpi,
                    holder: self.is_holder(r.id),
                })
                .collect(),
            reservation: self.res.map(|res| ReservationView {
                ty: res.ty,
                scope: 0,
                key: self.reservation_key(),
            }),
            spc2_holder: None,
            owner: self.owner.clone(),
            epoch: self.epoch,
            handover: ownership::Handover::Idle,
        }
    }
}
