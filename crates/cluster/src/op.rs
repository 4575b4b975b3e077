//! The replicated operation log entry (scale-out.md §0.1, §2.1).
//!
//! The LU key `P/lu/<naa>/pr` holds a [`Record`]: the PR state after an operation together
//! with the operation itself. Every gateway replays the operation on its copy of the previous
//! state ([`Op::apply`], pure and deterministic because `PrState::prout` is), so that unit
//! attentions and task aborts come out exactly on every gateway without extra messages, and
//! compares the result with the stored state.

use crate::GatewayId;
use ironlun_scsi::pr::ownership::{Checks, OwnershipError, OwnershipOp, TaskPick};
use ironlun_scsi::pr::{Effects, ItNexus, OutRequest, PrContext, PrError, PrState};
use ironlun_scsi::sense::SenseReason;

/// Identity of one operation: the issuing gateway and its sequence number.
///
/// Unique across restarts because [`crate::gateway::Gateway`] seeds `seq` from the
/// create revision of its member key. A retried transaction carries the same id, so a
/// gateway recognises its own commit on the watch (§2.5 "CAS retries are safe").
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OpId {
    /// The gateway that committed the operation.
    pub gateway: GatewayId,
    /// Its sequence number on that gateway.
    pub seq: u64,
}

/// A state change of the LU's reservation record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// A PERSISTENT RESERVE OUT (SPC-4 §6.16) as received on `it`: the CDB fields and the
    /// parameter list.
    Prout {
        /// The requesting I_T nexus (its `rtpi` names the gateway's port).
        it: ItNexus,
        /// SERVICE ACTION (`pr::sa`).
        service_action: u8,
        /// SCOPE (CDB byte 2, bits 7..4).
        scope: u8,
        /// TYPE (CDB byte 2, bits 3..0).
        ty: u8,
        /// The parameter list, exactly PARAMETER LIST LENGTH bytes.
        param: Vec<u8>,
    },
    /// A gateway's member key was deleted (its lease expired), committed by the lowest-id
    /// survivor (§2.5 "Gateway death").
    ///
    /// It changes nothing in [`PrState`]: SPC-3/4 registrations and persistent reservations
    /// survive I_T nexus loss (SPC-4 §5.13.1), so removing the dead gateway's registrations
    /// would be wrong. It is recorded so that the effects that do follow nexus loss (releasing
    /// SPC-2 reservations held through the gateway's ports, moving the ALUA active gateway)
    /// have one ordered place once they join the record.
    GatewayGone {
        /// The gateway whose member key was deleted.
        gateway: GatewayId,
    },
    /// A target-managed ownership or handover step (scale-out.md §2.7), taken through any
    /// gateway; its host names are normalized (`OwnershipOp::normalized`).
    Ownership(OwnershipOp),
}

/// Why an operation changed nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpError {
    /// The PERSISTENT RESERVE OUT failed as `PrState::prout` decided.
    Pr(PrError),
    /// The ownership step was refused (`PrState::ownership`).
    Ownership(OwnershipError),
}

/// What applying an operation did, for every gateway to carry out on its own nexuses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// A PR OUT's unit attentions and PREEMPT AND ABORT's preempted registrations; an
    /// ownership step's removed registrations as REGISTRATIONS PREEMPTED.
    pub fx: Effects,
    /// An ownership step's tasks to abort (on every gateway) before it is reported.
    pub abort: Option<TaskPick>,
    /// A fence: the host whose tasks in the task set must finish before the commit.
    pub drain: Option<String>,
}

impl Applied {
    /// Whether every gateway must report `drained` for the operation's revision before it
    /// completes (PREEMPT AND ABORT, set_owner, commit); a fence's drain is waited for
    /// separately, within the handover's deadline.
    pub fn aborts(&self) -> bool {
        !self.fx.aborted.is_empty() || self.abort.is_some()
    }
}

impl Op {
    /// Applies the operation to `state`. On error `state` is unchanged (as `PrState::prout`).
    /// `ctx.relative_ports` must be the cluster-wide port set (§2.2). A changed state leaves
    /// renumbered (`PrState::renumber`): the form it has after a trip through the store as
    /// bytes ([`crate::codec`]), so replicas compare equal however they got it.
    pub fn apply(&self, state: &mut PrState, ctx: PrContext<'_>) -> Result<Applied, OpError> {
        match self {
            Op::Prout {
                it,
                service_action,
                scope,
                ty,
                param,
            } => {
                let req = OutRequest {
                    service_action: *service_action,
                    scope: *scope,
                    ty: *ty,
                    param,
                };
                let fx = state.prout(it, req, ctx).map_err(OpError::Pr)?;
                state.renumber();
                Ok(Applied {
                    fx,
                    ..Applied::default()
                })
            }
            Op::GatewayGone { .. } => Ok(Applied::default()),
            Op::Ownership(op) => {
                let own = state
                    .ownership(op, Checks::REPLAY)
                    .map_err(OpError::Ownership)?;
                if own.changed {
                    state.renumber();
                }
                let ua = own
                    .removed
                    .into_iter()
                    .map(|r| (r, SenseReason::RegistrationsPreempted))
                    .collect();
                Ok(Applied {
                    fx: Effects {
                        ua,
                        aborted: Vec::new(),
                        changed: own.changed,
                    },
                    abort: own.abort,
                    drain: own.drain,
                })
            }
        }
    }

    /// The operation for a PERSISTENT RESERVE OUT received on `it`.
    pub fn prout(it: &ItNexus, req: OutRequest<'_>) -> Self {
        Op::Prout {
            it: it.clone(),
            service_action: req.service_action,
            scope: req.scope,
            ty: req.ty,
            param: req.param.to_vec(),
        }
    }
}

/// The value of the LU key: the state after `op`, and `op` with its id (§2.1 `PrRecord`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The PR state after the operation.
    pub state: PrState,
    /// The operation that produced it from the previous record's state.
    pub op: Op,
    /// Who committed it.
    pub id: OpId,
}

/// A 24-byte PERSISTENT RESERVE OUT parameter list (SPC-4 §6.16.3 Table 216): reservation
/// key, service action reservation key and the flag byte 20 (SPEC_I_PT 0x08, ALL_TG_PT 0x04,
/// APTPL 0x01).
pub fn param_list(key: u64, sa_key: u64, flags: u8) -> Vec<u8> {
    let mut p = Vec::with_capacity(24);
    p.extend_from_slice(&key.to_be_bytes());
    p.extend_from_slice(&sa_key.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 0, flags, 0, 0, 0]);
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use ironlun_scsi::pr::{sa, InitiatorPort};

    #[test]
    fn replay_is_deterministic_and_gone_changes_nothing() {
        let it = ItNexus {
            initiator: InitiatorPort::new("iqn.h1", [0, 2, 0, 0, 0, 1]),
            rtpi: 1,
        };
        let ctx = PrContext {
            relative_ports: &[1, 2, 3],
            ptpl_capable: true,
        };
        let op = Op::prout(
            &it,
            OutRequest {
                service_action: sa::REGISTER,
                scope: 0,
                ty: 0,
                param: &param_list(0, 7, 0x04),
            },
        );
        let (mut a, mut b) = (PrState::new(), PrState::new());
        assert_eq!(op.apply(&mut a, ctx), op.apply(&mut b, ctx));
        assert_eq!(a, b);
        assert_eq!(a.registrations().len(), 1);
        let gone = Op::GatewayGone {
            gateway: GatewayId(2),
        };
        assert_eq!(gone.apply(&mut a, ctx), Ok(Applied::default()));
        assert_eq!(a, b);
    }
}
