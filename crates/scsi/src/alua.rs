//! Asymmetric logical unit access (SPC-4 §5.16): target port groups, their access states,
//! which commands each state admits, and REPORT TARGET PORT GROUPS (SPC-4 §6.27).
//!
//! Only implicit ALUA is offered (INQUIRY TPGS = 01b): states change through the daemon's
//! admin interface, never through SET TARGET PORT GROUPS, which stays an unsupported service
//! action. Every relative target port belongs to exactly one group; a port listed in none
//! is reported as active/optimized in no group.

use crate::cdb::op;
use crate::sense::SenseReason;

/// MAINTENANCE IN service action REPORT TARGET PORT GROUPS (SPC-4 §6.27).
pub const SA_REPORT_TARGET_PORT_GROUPS: u16 = 0x0A;

/// INQUIRY byte 5 TPGS field (bits 5:4) = 01b: implicit asymmetric access only (SPC-4 §6.6.2).
pub const TPGS_IMPLICIT: u8 = 0x10;

/// Seconds an implicit transition may take (extended RTPG header, IMPLICIT TRANSITION TIME):
/// state changes here are immediate.
pub const IMPLICIT_TRANSITION_SECS: u8 = 0;

/// Target port group descriptors carry at most 255 ports (TARGET PORT COUNT is one byte).
const MAX_PORTS_PER_DESCRIPTOR: usize = 255;

/// An asymmetric access state (SPC-4 §5.16.2.4, table 39 codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AccessState {
    ActiveOptimized,
    ActiveNonOptimized,
    Standby,
    Unavailable,
    Transitioning,
}

/// Every state, in code order.
pub const ALL_STATES: &[AccessState] = &[
    AccessState::ActiveOptimized,
    AccessState::ActiveNonOptimized,
    AccessState::Standby,
    AccessState::Unavailable,
    AccessState::Transitioning,
];

impl AccessState {
    /// The ASYMMETRIC ACCESS STATE code of RTPG descriptors.
    pub const fn code(self) -> u8 {
        match self {
            AccessState::ActiveOptimized => 0x0,
            AccessState::ActiveNonOptimized => 0x1,
            AccessState::Standby => 0x2,
            AccessState::Unavailable => 0x3,
            AccessState::Transitioning => 0xF,
        }
    }

    /// The configuration / admin API spelling.
    pub const fn name(self) -> &'static str {
        match self {
            AccessState::ActiveOptimized => "active_optimized",
            AccessState::ActiveNonOptimized => "active_non_optimized",
            AccessState::Standby => "standby",
            AccessState::Unavailable => "unavailable",
            AccessState::Transitioning => "transitioning",
        }
    }

    /// Parse [`AccessState::name`]; `-` may stand for `_` and `/` for `_` too
    /// ("active/optimized").
    pub fn from_name(s: &str) -> Option<AccessState> {
        let norm: String = s
            .trim()
            .chars()
            .map(|c| match c {
                '-' | '/' => '_',
                c => c.to_ascii_lowercase(),
            })
            .collect();
        ALL_STATES.iter().copied().find(|st| st.name() == norm)
    }

    /// Whether a command with this CDB may run on a port in this state; otherwise the NOT
    /// READY sense the state calls for. Active states admit everything. Standby
    /// (SPC-4 §5.16.2.4.4) admits INQUIRY, LOG SELECT/SENSE, MODE SELECT/SENSE, REPORT LUNS,
    /// RECEIVE DIAGNOSTIC RESULTS, SEND DIAGNOSTIC, REPORT/SET TARGET PORT GROUPS, REQUEST
    /// SENSE and PERSISTENT RESERVE IN/OUT (the ones of those this LU implements), and READ
    /// CAPACITY (10) and (16), as LIO does (SPC-4 does not list them); unavailable
    /// (§5.16.2.4.5) and transitioning (§5.16.2.6) admit INQUIRY, REPORT LUNS, REPORT/SET
    /// TARGET PORT GROUPS and REQUEST SENSE.
    pub fn check(self, cdb: &[u8]) -> Result<(), SenseReason> {
        let opcode = cdb.first().copied().unwrap_or(0);
        let sa = u16::from(cdb.get(1).copied().unwrap_or(0) & 0x1F);
        let always = matches!(opcode, op::INQUIRY | op::REPORT_LUNS | op::REQUEST_SENSE)
            || (opcode == op::MAINTENANCE_IN && sa == SA_REPORT_TARGET_PORT_GROUPS);
        // READ CAPACITY (10/16) beyond SPC-4's list, as LIO admits it: Linux sizes a disk
        // when it attaches, and a standby path attached at size 0 stays useless after it
        // turns active (issue 18's gateway failover).
        let standby_too = matches!(
            opcode,
            op::MODE_SELECT_6
                | op::MODE_SELECT_10
                | op::MODE_SENSE_6
                | op::MODE_SENSE_10
                | op::PERSISTENT_RESERVE_IN
                | op::PERSISTENT_RESERVE_OUT
                | op::READ_CAPACITY_10
        ) || (opcode == op::SERVICE_ACTION_IN_16
            && sa == op::SA_READ_CAPACITY_16);
        match self {
            AccessState::ActiveOptimized | AccessState::ActiveNonOptimized => Ok(()),
            _ if always => Ok(()),
            AccessState::Standby if standby_too => Ok(()),
            AccessState::Standby => Err(SenseReason::AluaStandby),
            AccessState::Unavailable => Err(SenseReason::AluaUnavailable),
            AccessState::Transitioning => Err(SenseReason::AluaTransitioning),
        }
    }
}

/// One target port group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortGroup {
    /// TARGET PORT GROUP identifier (non-zero).
    pub id: u16,
    pub state: AccessState,
    /// Relative target port identifiers of its ports, ascending.
    pub ports: Vec<u16>,
    /// The state was changed by implicit behaviour since start (RTPG STATUS CODE 02h).
    pub changed: bool,
}

/// The target port groups of a logical unit (the daemon gives every LU the same set).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PortGroups {
    groups: Vec<PortGroup>,
}

/// Why a state change was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AluaError {
    /// No target port group with this identifier.
    UnknownGroup(u16),
}

impl std::fmt::Display for AluaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AluaError::UnknownGroup(id) => write!(f, "no target port group {id}"),
        }
    }
}

impl std::error::Error for AluaError {}

impl PortGroups {
    /// `groups` (ids distinct and non-zero, each port in at most one, as configuration
    /// validates), plus every port of `all_ports` not listed in any: those join group 1,
    /// which is created active/optimized if absent. Groups and ports are sorted.
    pub fn new(mut groups: Vec<PortGroup>, all_ports: &[u16]) -> PortGroups {
        let unlisted: Vec<u16> = all_ports
            .iter()
            .copied()
            .filter(|p| !groups.iter().any(|g| g.ports.contains(p)))
            .collect();
        if !unlisted.is_empty() {
            match groups.iter_mut().find(|g| g.id == 1) {
                Some(g) => g.ports.extend(unlisted),
                None => groups.push(PortGroup {
                    id: 1,
                    state: AccessState::ActiveOptimized,
                    ports: unlisted,
                    changed: false,
                }),
            }
        }
        for g in &mut groups {
            g.ports.sort_unstable();
            g.ports.dedup();
        }
        groups.sort_by_key(|g| g.id);
        PortGroups { groups }
    }

    /// Every group, by ascending identifier.
    pub fn groups(&self) -> &[PortGroup] {
        &self.groups
    }

    /// The group the relative target port `rtpi` belongs to.
    pub fn group_of(&self, rtpi: u16) -> Option<&PortGroup> {
        self.groups.iter().find(|g| g.ports.contains(&rtpi))
    }

    /// The access state of the logical unit through port `rtpi` (active/optimized when the
    /// port is in no group).
    pub fn state_of(&self, rtpi: u16) -> AccessState {
        self.group_of(rtpi)
            .map_or(AccessState::ActiveOptimized, |g| g.state)
    }

    /// Set group `id` to `state`; `Ok(true)` when the state changed.
    pub fn set_state(&mut self, id: u16, state: AccessState) -> Result<bool, AluaError> {
        let g = self
            .groups
            .iter_mut()
            .find(|g| g.id == id)
            .ok_or(AluaError::UnknownGroup(id))?;
        if g.state == state {
            return Ok(false);
        }
        g.state = state;
        g.changed = true;
        Ok(true)
    }

    /// REPORT TARGET PORT GROUPS parameter data (SPC-4 §6.27.2): the length-only header
    /// (`extended` false: 4 bytes) or the extended header (8 bytes: format type 001b and the
    /// implicit transition time), then one descriptor per group. Not cut to any allocation
    /// length.
    pub fn report(&self, extended: bool) -> Vec<u8> {
        let mut out = vec![0u8; if extended { 8 } else { 4 }];
        if extended {
            if let Some(b) = out.get_mut(4) {
                *b = 0x10;
            }
            if let Some(b) = out.get_mut(5) {
                *b = IMPLICIT_TRANSITION_SECS;
            }
        }
        for g in &self.groups {
            let ports: Vec<u16> = g
                .ports
                .iter()
                .copied()
                .take(MAX_PORTS_PER_DESCRIPTOR)
                .collect();
            // [0] PREF=0, state; [1] T_SUP U_SUP S_SUP AN_SUP AO_SUP.
            out.push(g.state.code());
            out.push(0x80 | 0x08 | 0x04 | 0x02 | 0x01);
            out.extend_from_slice(&g.id.to_be_bytes());
            // [4] reserved; [5] STATUS CODE; [6] vendor specific; [7] TARGET PORT COUNT.
            let status = if g.changed { 0x02 } else { 0x00 };
            let count = u8::try_from(ports.len()).unwrap_or(u8::MAX);
            out.extend_from_slice(&[0, status, 0, count]);
            for p in ports {
                out.extend_from_slice(&[0, 0]);
                out.extend_from_slice(&p.to_be_bytes());
            }
        }
        // RETURN DATA LENGTH: the bytes after the first four.
        let len = u32::try_from(out.len().saturating_sub(4)).unwrap_or(u32::MAX);
        crate::vpd::put(&mut out, 0, &len.to_be_bytes());
        out
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::sense::SenseReason as R;
    use AccessState::*;

    fn two_groups() -> PortGroups {
        let g2 = PortGroup {
            id: 2,
            state: Standby,
            ports: vec![2],
            changed: false,
        };
        PortGroups::new(vec![g2], &[1, 2, 3])
    }

    #[test]
    fn unlisted_ports_join_group_one() {
        let pg = two_groups();
        let ids: Vec<(u16, Vec<u16>)> = pg
            .groups()
            .iter()
            .map(|g| (g.id, g.ports.clone()))
            .collect();
        assert_eq!(ids, vec![(1, vec![1, 3]), (2, vec![2])]);
        assert_eq!(pg.state_of(3), ActiveOptimized);
        assert_eq!(pg.state_of(2), Standby);
        assert_eq!(pg.state_of(99), ActiveOptimized);
        assert_eq!(pg.group_of(99), None);
        // A configured group 1 takes them with its own state.
        let g1 = PortGroup {
            id: 1,
            state: ActiveNonOptimized,
            ports: vec![5],
            changed: false,
        };
        let pg = PortGroups::new(vec![g1], &[1, 5]);
        assert_eq!(pg.groups()[0].ports, vec![1, 5]);
        assert_eq!(pg.state_of(1), ActiveNonOptimized);
    }

    #[test]
    fn rtpg_length_only_layout() {
        let d = two_groups().report(false);
        #[rustfmt::skip]
        let expected = [
            0, 0, 0, 28,
            0x00, 0x8F, 0, 1, 0, 0, 0, 2,   0, 0, 0, 1,   0, 0, 0, 3,
            0x02, 0x8F, 0, 2, 0, 0, 0, 1,   0, 0, 0, 2,
        ];
        assert_eq!(d, expected);
    }

    #[test]
    fn rtpg_extended_layout_and_status() {
        let mut pg = two_groups();
        assert_eq!(pg.set_state(2, Unavailable), Ok(true));
        assert_eq!(pg.set_state(2, Unavailable), Ok(false));
        assert_eq!(pg.set_state(7, Standby), Err(AluaError::UnknownGroup(7)));
        let d = pg.report(true);
        assert_eq!(&d[..8], &[0, 0, 0, 32, 0x10, 0, 0, 0]);
        assert_eq!(
            u32::from_be_bytes(d[..4].try_into().unwrap()) as usize + 4,
            d.len()
        );
        // Group 1 unchanged (status 00h), group 2 unavailable, changed implicitly (02h).
        assert_eq!(&d[8..16], &[0x00, 0x8F, 0, 1, 0, 0, 0, 2]);
        assert_eq!(&d[24..32], &[0x03, 0x8F, 0, 2, 0, 2, 0, 1]);
        assert_eq!(&d[32..36], &[0, 0, 0, 2]);
    }

    #[test]
    fn state_names_round_trip() {
        for s in ALL_STATES {
            assert_eq!(AccessState::from_name(s.name()), Some(*s));
        }
        assert_eq!(
            AccessState::from_name("Active/Non-Optimized"),
            Some(ActiveNonOptimized)
        );
        assert_eq!(AccessState::from_name("offline"), None);
    }

    /// The enforcement table: (CDB, result per state AO, ANO, S, U, T).
    #[test]
    fn enforcement_table() {
        let ok = Ok(());
        let (s, u, t) = (
            Err(R::AluaStandby),
            Err(R::AluaUnavailable),
            Err(R::AluaTransitioning),
        );
        let rtpg = [0xA3, 0x0A, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0];
        let rsoc = [0xA3, 0x0C, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0];
        type Row<'a> = (&'a [u8], [Result<(), R>; 5]);
        let rows: &[Row] = &[
            (&[0x12, 0, 0, 0, 96, 0], [ok, ok, ok, ok, ok]),
            (
                &[0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0],
                [ok, ok, ok, ok, ok],
            ),
            (&[0x03, 0, 0, 0, 18, 0], [ok, ok, ok, ok, ok]),
            (&rtpg, [ok, ok, ok, ok, ok]),
            (&[0x1A, 0, 0x3F, 0, 255, 0], [ok, ok, ok, u, t]),
            (&[0x5A, 0, 0x3F, 0, 0, 0, 0, 1, 0, 0], [ok, ok, ok, u, t]),
            (&[0x15, 0x10, 0, 0, 0, 0], [ok, ok, ok, u, t]),
            (&[0x55, 0x10, 0, 0, 0, 0, 0, 0, 0, 0], [ok, ok, ok, u, t]),
            (&[0x5E, 0, 0, 0, 0, 0, 0, 1, 0, 0], [ok, ok, ok, u, t]),
            (&[0x5F, 0, 0, 0, 0, 0, 0, 0, 24, 0], [ok, ok, ok, u, t]),
            (&[0x00, 0, 0, 0, 0, 0], [ok, ok, s, u, t]),
            (&[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0], [ok, ok, s, u, t]),
            (&[0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0], [ok, ok, s, u, t]),
            (&[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], [ok, ok, ok, u, t]),
            (
                &[0x9E, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0],
                [ok, ok, ok, u, t],
            ),
            (
                &[0x9E, 0x12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0],
                [ok, ok, s, u, t],
            ),
            (&[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], [ok, ok, s, u, t]),
            (&rsoc, [ok, ok, s, u, t]),
            (&[], [ok, ok, s, u, t]),
        ];
        for (cdb, expect) in rows {
            for (state, want) in ALL_STATES.iter().zip(expect.iter()) {
                assert_eq!(state.check(cdb), *want, "{state:?} {cdb:02x?}");
            }
        }
    }
}
