//! The LUs of a gateway driven by their replicated reservation state (issue 18;
//! scale-out.md §2.2 "apply(r)", §2.3).
//!
//! - **PR OUT:** the LU checks what it can ([`ironlun_scsi::lu::Step::Replicate`]); the
//!   command is then decided by the LU's [`Replica`] and answered with what the protocol says
//!   ([`prout`]). Nothing is applied locally on the way in.
//! - **apply(r):** every record, this gateway's own included, arrives through the watch; the
//!   driver hands its outputs to [`LuHost`] on its own task, in order: the state is installed,
//!   then unit attentions are raised on this gateway's nexuses (except the requester's), then
//!   the preempted nexuses' tasks are aborted. All of it happens before `applied/<me>` is put
//!   and before the requester's GOOD, so no command that starts after GOOD, anywhere, sees
//!   the old state.
//! - **Drain:** each abort's ticket is waited for in revision order on one task per LU; then
//!   `drained/<me>` = r ([`Replica::drained`]), which the requesting gateway waits for before
//!   GOOD (no write of a preempted nexus lands after it).
//! - **Fence:** [`ClusterLu::may_submit`] is the membership's gate, checked before every
//!   backend submit (`LunHandle::perform`).

use super::{LunHandle, Registry};
use crate::cluster::replica::{Host, LuKeys, Replica};
use crate::cluster::{Fence, Membership};
use crate::config::Config;
use crate::etcd::{Compare, Etcd, Op};
use bytes::Bytes;
use ironlun_cluster::gateway::{Answer, Gateway, GatewayConfig, Output};
use ironlun_cluster::lease::Timing;
use ironlun_cluster::Revision;
use ironlun_scsi::lu::{self, AbortTicket, Completion};
use ironlun_scsi::pr::{OutRequest, PrError};
use ironlun_scsi::sense::SenseReason;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;
use tokio::sync::mpsc;

/// Lost compare-and-swap races tolerated before BUSY (scale-out.md §2.2 step 2).
const MAX_TRIES: u32 = 16;

/// An LU's part in the cluster: its replica and the gateway's fence.
#[derive(Debug)]
pub struct ClusterLu {
    replica: Replica,
    fence: Arc<Fence>,
}

impl ClusterLu {
    /// The self-fence check before a backend submit.
    pub fn may_submit(&self) -> bool {
        self.fence.may_submit()
    }

    /// The LU's replica.
    pub fn replica(&self) -> &Replica {
        &self.replica
    }
}

/// A PERSISTENT RESERVE OUT on a replicated LU: decided by the cluster; the state it made is
/// in this LU before GOOD (see the module documentation).
pub(crate) async fn prout(handle: &LunHandle, req: lu::Replicate) -> Completion {
    let d_sense = handle.lu().d_sense();
    let Some(c) = handle.cluster.get() else {
        return Completion::check_condition(SenseReason::AluaTransitioning, d_sense);
    };
    let answer = c
        .replica
        .prout(
            &req.it,
            OutRequest {
                service_action: req.service_action,
                scope: req.scope,
                ty: req.ty,
                param: &req.param,
            },
        )
        .await;
    match answer {
        Answer::Good => Completion::good(Bytes::new()),
        Answer::Failed(PrError::Conflict) => Completion::reservation_conflict(),
        Answer::Failed(PrError::Sense(reason)) => Completion::check_condition(reason, d_sense),
        Answer::NotReady => Completion::check_condition(Answer::NOT_READY_SENSE, d_sense),
        Answer::Busy => Completion::busy(),
    }
}

/// Carries a replica's outputs into its LU.
struct LuHost {
    handle: Weak<LunHandle>,
    label: String,
    drains: mpsc::UnboundedSender<(AbortTicket, Revision)>,
}

impl Host for LuHost {
    fn output(&self, out: Output) {
        let Some(handle) = self.handle.upgrade() else {
            return;
        };
        match out {
            Output::State { state, .. } => handle.lu().install_pr(state),
            Output::Ua {
                registration,
                reason,
                except,
            } => handle
                .lu()
                .raise_replicated(&registration, reason, except.as_ref()),
            Output::AbortTasks {
                registrations,
                revision,
                from,
            } => {
                let ticket = handle.lu().abort_replicated(&registrations, from.as_ref());
                let _ = self.drains.send((ticket, revision));
            }
            Output::Fenced => {
                tracing::error!(lu = %self.label, "cluster: fenced; PR OUT answers NOT READY until the replica is current again");
            }
            Output::Unfenced => tracing::info!(lu = %self.label, "cluster: replica current again"),
            Output::LeaseLost => {
                tracing::error!(lu = %self.label, "cluster: this gateway's lease is gone; the LU stays fenced until the daemon restarts");
            }
            Output::Diverged { revision } => {
                tracing::error!(lu = %self.label, revision, "cluster: replaying the record did not give its stored state; the stored state was installed");
            }
            Output::Respond { .. } => {}
        }
    }
}

/// Wait for each abort to drain, in revision order, and report it to the replica.
async fn drain_loop(
    handle: Weak<LunHandle>,
    replica: Arc<OnceLock<Replica>>,
    mut drains: mpsc::UnboundedReceiver<(AbortTicket, Revision)>,
) {
    while let Some((ticket, revision)) = drains.recv().await {
        let Some(h) = handle.upgrade() else { return };
        h.wait_drained(ticket).await;
        drop(h);
        if let Some(r) = replica.get() {
            r.drained(revision).await;
        }
    }
}

/// Join the cluster of `cfg` and put every LU of `registry` under its replicated state.
/// Fails (the daemon does not start) when etcd cannot be reached, the layout differs from the
/// one stored at `P/config`, or this gateway's id is held by a live member.
pub async fn attach(cfg: &Config, registry: &Registry) -> Result<Arc<Membership>, String> {
    let Some(c) = &cfg.cluster else {
        return Err("no [cluster]".to_string());
    };
    let etcd = Arc::new(Etcd::new(&c.endpoints, c.etcd_timeout).map_err(|e| e.to_string())?);
    check_layout(&etcd, &c.prefix(), &c.layout()).await?;
    let timing: Timing = crate::cluster::timing(c)?;
    let me = c.id();
    let key = format!("{}gw/{}", c.prefix(), me.0).into_bytes();
    let value = serde_json::json!({ "name": c.name, "tpgts": c.own_ports() })
        .to_string()
        .into_bytes();
    let (membership, created, granted_at) =
        Membership::join_as(etcd.clone(), timing, key, value, &c.name)
            .await
            .map_err(|e| format!("cluster {}: cannot join as {}: {e}", c.cluster, c.name))?;
    let membership = Arc::new(membership);
    let gcfg = GatewayConfig {
        id: me,
        ports: c.own_ports(),
        cluster_ports: c.cluster_ports(),
        timing,
        rpc_timeout: c.etcd_timeout,
        max_tries: MAX_TRIES,
    };
    let lease = u64::try_from(membership.lease()).unwrap_or(0);
    let created = u64::try_from(created).unwrap_or(0);
    for t in registry.targets().iter() {
        for (id, handle) in t.luns().iter() {
            let serial = handle.lu().config().serial.clone();
            let gw = Gateway::new(gcfg.clone(), lease, granted_at, created);
            let (drain_tx, drain_rx) = mpsc::unbounded_channel();
            let label = format!("{}/{id}", t.name);
            let host = Arc::new(LuHost {
                handle: Arc::downgrade(handle),
                label,
                drains: drain_tx,
            });
            let slot = Arc::new(OnceLock::new());
            tokio::spawn(drain_loop(Arc::downgrade(handle), slot.clone(), drain_rx));
            let keys = LuKeys::new(&c.prefix(), &serial);
            let replica = Replica::spawn_with(gw, etcd.clone(), keys, membership.fence(), host);
            let _ = slot.set(replica.clone());
            let _ = handle.cluster.set(ClusterLu {
                replica,
                fence: membership.fence(),
            });
        }
    }
    tracing::info!(
        cluster = %c.cluster,
        gateway = %c.name,
        id = me.0,
        lease = membership.lease(),
        "joined the cluster"
    );
    Ok(membership)
}

/// Store the layout at `P/config` if absent; refuse a different one (scale-out.md §2.1).
async fn check_layout(etcd: &Etcd, prefix: &str, layout: &str) -> Result<(), String> {
    let key = format!("{prefix}config").into_bytes();
    let t = etcd
        .txn(
            &[Compare::CreateRevision(key.clone(), 0)],
            &[Op::Put {
                key: key.clone(),
                value: layout.as_bytes().to_vec(),
                lease: 0,
            }],
            &[Op::Get(key.clone())],
        )
        .await
        .map_err(|e| format!("cluster: etcd: {e}"))?;
    if t.succeeded {
        return Ok(());
    }
    let stored = t
        .gets
        .first()
        .cloned()
        .flatten()
        .map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
        .unwrap_or_default();
    if stored == layout {
        Ok(())
    } else {
        Err(format!(
            "cluster: this gateway's layout {layout:?} differs from the cluster's {stored:?} (at {}config); every gateway must list the same gateways and TPGTs",
            prefix
        ))
    }
}

/// How long a stopping gateway waits for its lease revocation.
pub const LEAVE_TIMEOUT: Duration = Duration::from_secs(2);
