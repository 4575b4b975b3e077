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
//! - **Fence:** [`ClusterLu::may_submit`], checked before every backend submit
//!   (`LunHandle::perform`): the membership's deadline has not passed, and the LU's replica is
//!   current (not fenced by its gateway protocol, which after a lapse reopens only once the
//!   replica has caught up with the store's head).
//! - **Rejoin:** a lost lease fences the replica for good; once the membership has registered
//!   again, the LU joins anew from a snapshot ([`Replica::join`]) as a new generation, and the
//!   old generation's outputs are ignored from then on.

pub mod alua;

use super::{LunHandle, Registry};
use crate::cluster::replica::{Host, LuKeys, Replica};
use crate::cluster::{Fence, Membership};
use crate::config::Config;
use crate::etcd::{Compare, Etcd, EtcdError, Op};
use bytes::Bytes;
use ironlun_cluster::gateway::{Answer, GatewayConfig, Output};
use ironlun_cluster::lease::Timing;
use ironlun_cluster::{GatewayId, Revision};
use ironlun_scsi::lu::{self, AbortTicket, Completion};
use ironlun_scsi::pr::ownership::{DrainTicket, OwnershipOp};
use ironlun_scsi::pr::{OutRequest, PrError};
use ironlun_scsi::sense::SenseReason;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::mpsc;

/// This daemon's place in its cluster, for the admin API ([`status`], [`move_active`]).
#[derive(Debug)]
pub struct Cluster {
    etcd: Arc<Etcd>,
    prefix: String,
    me: GatewayId,
    config: crate::config::Cluster,
    membership: Arc<Membership>,
}

/// Lost compare-and-swap races tolerated before BUSY (scale-out.md §2.2 step 2).
const MAX_TRIES: u32 = 16;

/// An LU's part in the cluster: its current replica and whether it may serve I/O.
#[derive(Debug)]
pub struct ClusterLu {
    /// `None` only until the first join has read the state.
    replica: Mutex<Option<Replica>>,
    /// The generation whose outputs count (one per join).
    generation: AtomicU64,
    /// The replica is current and its gateway not fenced.
    ready: AtomicBool,
    /// The active gateway's id ([`alua`]); 0 until known.
    active: AtomicU32,
    fence: Arc<Fence>,
}

impl ClusterLu {
    /// The self-fence check before a backend submit: the membership's deadline and the
    /// replica's readiness (two atomic loads and a clock read).
    pub fn may_submit(&self) -> bool {
        self.ready.load(Ordering::Acquire) && self.fence.may_submit()
    }

    /// The LU's current replica.
    pub fn replica(&self) -> Option<Replica> {
        self.replica
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Make `replica` of `generation` the current one; the outputs of earlier generations
    /// are ignored from now on.
    fn replace(&self, replica: Replica, generation: u64) {
        self.generation.store(generation, Ordering::Release);
        *self
            .replica
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(replica);
    }
}

/// A PERSISTENT RESERVE OUT on a replicated LU: decided by the cluster; the state it made is
/// in this LU before GOOD (see the module documentation).
pub(crate) async fn prout(handle: &LunHandle, req: lu::Replicate) -> Completion {
    let d_sense = handle.lu().d_sense();
    let Some(replica) = handle.cluster.get().and_then(ClusterLu::replica) else {
        return Completion::check_condition(SenseReason::AluaTransitioning, d_sense);
    };
    let answer = replica
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
        // Only ownership steps are refused this way.
        Answer::Refused(_) => Completion::reservation_conflict(),
    }
}

/// What an LU needs to join (again): its handle, keys, the gateway's membership and config.
struct LuCtx {
    handle: Weak<LunHandle>,
    label: String,
    membership: Arc<Membership>,
    gcfg: GatewayConfig,
    etcd: Arc<Etcd>,
    keys: LuKeys,
    drains: mpsc::UnboundedSender<(Wait, Revision)>,
}

/// What a revision's drain waits for on this gateway.
#[derive(Debug)]
enum Wait {
    /// Tasks aborted under this ticket (PREEMPT AND ABORT, an ownership step).
    Aborted(AbortTicket),
    /// A fenced host's tasks, which run to their end.
    Tasks(DrainTicket),
}

/// Join with the membership's current registration as `generation`.
async fn join(ctx: &Arc<LuCtx>, generation: u64) -> Result<Replica, EtcdError> {
    let (lease, created, granted_at) = ctx.membership.registration();
    let host = Arc::new(LuHost {
        ctx: ctx.clone(),
        generation,
        installed: AtomicBool::new(false),
    });
    Replica::join(
        ctx.gcfg.clone(),
        lease,
        granted_at,
        created,
        ctx.etcd.clone(),
        ctx.keys.clone(),
        ctx.membership.fence(),
        host,
    )
    .await
}

/// Join anew as `generation`: after a lost lease (`lost_lease`: wait until the membership
/// holds another one) or a stale replica (`None`: at once), retrying at the keep-alive
/// interval until it succeeds or a later generation has taken over.
async fn rejoin(ctx: Arc<LuCtx>, lost_lease: Option<i64>, generation: u64) {
    let interval = ctx.gcfg.timing.settings().keepalive_interval;
    let mut first = lost_lease.is_none();
    loop {
        if !first {
            tokio::time::sleep(interval).await;
        }
        first = false;
        let Some(handle) = ctx.handle.upgrade() else {
            return;
        };
        let Some(c) = handle.cluster.get() else {
            return;
        };
        if c.generation.load(Ordering::Acquire) != generation {
            return;
        }
        let (lease, _, _) = ctx.membership.registration();
        if Some(lease) == lost_lease || !ctx.membership.fence().may_submit() {
            continue;
        }
        match join(&ctx, generation).await {
            Ok(r) => {
                c.replace(r, generation);
                tracing::info!(lu = %ctx.label, lease, generation, "cluster: rejoined from a snapshot");
                return;
            }
            Err(e) => {
                tracing::warn!(lu = %ctx.label, error = %e, "cluster: rejoin failed; retrying");
            }
        }
    }
}

/// Make the LU stop serving from generation `from` and join anew as the next one.
fn renew_generation(ctx: &Arc<LuCtx>, handle: &LunHandle, from: u64, lost_lease: Option<i64>) {
    let Some(c) = handle.cluster.get() else {
        return;
    };
    c.ready.store(false, Ordering::Release);
    alua::apply(handle, ctx.gcfg.id);
    // This generation's outputs stop counting now; the next one joins anew.
    if c.generation
        .compare_exchange(from, from + 1, Ordering::AcqRel, Ordering::Acquire)
        .is_ok()
    {
        tokio::spawn(rejoin(ctx.clone(), lost_lease, from + 1));
    }
}

/// Carries one generation's replica outputs into its LU.
struct LuHost {
    ctx: Arc<LuCtx>,
    generation: u64,
    /// The join's state is installed: later [`Output::State`]s are records, which do not
    /// make a fenced replica current (only [`Output::Unfenced`] does).
    installed: AtomicBool,
}

impl Host for LuHost {
    fn stale(&self) {
        if let Some(handle) = self.ctx.handle.upgrade() {
            tracing::warn!(lu = %self.ctx.label, "cluster: replica stale (history compacted); joining again from a snapshot");
            renew_generation(&self.ctx, &handle, self.generation, None);
        }
    }

    fn output(&self, out: Output) {
        let Some(handle) = self.ctx.handle.upgrade() else {
            return;
        };
        let Some(c) = handle.cluster.get() else {
            return;
        };
        if c.generation.load(Ordering::Acquire) != self.generation {
            // A replaced generation (lease lost) may still see the watch: not ours any more.
            return;
        }
        let label = &self.ctx.label;
        match out {
            Output::State { state, revision } => {
                handle.lu().install_pr(state);
                if !self.installed.swap(true, Ordering::AcqRel) {
                    c.ready.store(true, Ordering::Release);
                    alua::apply(&handle, self.ctx.gcfg.id);
                    tracing::info!(lu = %label, revision, generation = self.generation, "cluster: joined from a snapshot; serving");
                }
            }
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
                let _ = self.ctx.drains.send((Wait::Aborted(ticket), revision));
            }
            Output::AbortHost { pick, revision } => {
                let wait = match handle.lu().abort_host_tasks(&pick) {
                    Some(ticket) => Wait::Aborted(ticket),
                    None => Wait::Tasks(DrainTicket::default()),
                };
                let _ = self.ctx.drains.send((wait, revision));
            }
            Output::DrainHost { host, revision } => {
                let ticket = handle.lu().drain_ticket(Some(&host));
                let _ = self.ctx.drains.send((Wait::Tasks(ticket), revision));
            }
            Output::Fenced => {
                c.ready.store(false, Ordering::Release);
                alua::apply(&handle, self.ctx.gcfg.id);
                tracing::error!(lu = %label, "cluster: fenced; no backend I/O and PR OUT answers NOT READY until the replica is current again");
            }
            Output::Unfenced => {
                c.ready.store(true, Ordering::Release);
                alua::apply(&handle, self.ctx.gcfg.id);
                tracing::info!(lu = %label, "cluster: replica current again; serving");
            }
            Output::LeaseLost => {
                let (lease, _, _) = self.ctx.membership.registration();
                tracing::error!(lu = %label, lease, "cluster: this gateway's lease is gone; rejoining once the membership has a new one");
                renew_generation(&self.ctx, &handle, self.generation, Some(lease));
            }
            Output::Diverged { revision } => {
                tracing::error!(lu = %label, revision, "cluster: replaying the record did not give its stored state; the stored state was installed");
            }
            Output::Respond { .. } => {}
        }
    }
}

/// Wait for each abort to drain, in revision order, and report it to the current replica.
async fn drain_loop(
    handle: Weak<LunHandle>,
    mut drains: mpsc::UnboundedReceiver<(Wait, Revision)>,
) {
    while let Some((wait, revision)) = drains.recv().await {
        let Some(h) = handle.upgrade() else { return };
        match wait {
            Wait::Aborted(ticket) => h.wait_drained(ticket).await,
            Wait::Tasks(ticket) => h.wait_until(|lu| lu.drained(&ticket)).await,
        }
        let replica = h.cluster.get().and_then(ClusterLu::replica);
        drop(h);
        if let Some(r) = replica {
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
    // A gateway restarted right after it died finds its old member key still alive until that
    // lease expires: it waits that long (T and etcd's lease check), no longer.
    let started = std::time::Instant::now();
    let patience = c.lease_ttl + Duration::from_secs(2);
    let membership = loop {
        match Membership::join_as(etcd.clone(), timing, key.clone(), value.clone(), &c.name).await {
            Ok((m, _, _)) => break m,
            Err(e @ crate::cluster::JoinError::NameInUse(..)) if started.elapsed() < patience => {
                tracing::warn!(gateway = %c.name, error = %e, "cluster: waiting for the previous incarnation's lease to expire");
                tokio::time::sleep(c.keepalive_interval).await;
            }
            Err(e) => {
                return Err(format!(
                    "cluster {}: cannot join as {}: {e}",
                    c.cluster, c.name
                ));
            }
        }
    };
    let membership = Arc::new(membership);
    let gcfg = GatewayConfig {
        id: me,
        ports: c.own_ports(),
        cluster_ports: c.cluster_ports(),
        timing,
        rpc_timeout: c.etcd_timeout,
        max_tries: MAX_TRIES,
    };
    let mut handles = Vec::new();
    for t in registry.targets().iter() {
        for (id, handle) in t.luns().iter() {
            let serial = handle.lu().config().serial.clone();
            handles.push((handle.clone(), serial.clone()));
            let (drains, drain_rx) = mpsc::unbounded_channel();
            let ctx = Arc::new(LuCtx {
                handle: Arc::downgrade(handle),
                label: format!("{}/{id}", t.name),
                membership: membership.clone(),
                gcfg: gcfg.clone(),
                etcd: etcd.clone(),
                keys: LuKeys::new(&c.prefix(), &serial),
                drains,
            });
            tokio::spawn(drain_loop(Arc::downgrade(handle), drain_rx));
            // In place before the first join: its first output installs the state.
            let _ = handle.cluster.set(ClusterLu {
                replica: Mutex::new(None),
                generation: AtomicU64::new(0),
                ready: AtomicBool::new(false),
                active: AtomicU32::new(0),
                fence: membership.fence(),
            });
            let replica = join(&ctx, 0).await.map_err(|e| {
                format!(
                    "cluster {}: {}: cannot read its state: {e}",
                    c.cluster, ctx.label
                )
            })?;
            if let Some(cl) = handle.cluster.get() {
                cl.replace(replica, 0);
            }
        }
    }
    alua::Alua::start(etcd.clone(), c.prefix(), me, timing, &handles)
        .await
        .map_err(|e| format!("cluster {}: cannot read the ALUA state: {e}", c.cluster))?;
    let _ = registry.cluster.set(Arc::new(Cluster {
        etcd,
        prefix: c.prefix(),
        me,
        config: c.clone(),
        membership: membership.clone(),
    }));
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

/// Why `PUT /v1/cluster/luns/<target>/<lun>/active` was refused.
#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    #[error("no gateway named {0:?} in the layout")]
    UnknownGateway(String),
    #[error("gateway {0:?} holds no live lease: it cannot serve")]
    NotLive(String),
    #[error("the active gateway changed meanwhile; try again")]
    Raced,
    #[error("etcd: {0}")]
    Etcd(#[from] EtcdError),
}

impl Cluster {
    /// The configured cluster and gateway names.
    pub fn config(&self) -> &crate::config::Cluster {
        &self.config
    }

    fn name_of(&self, g: GatewayId) -> Option<String> {
        let i = usize::try_from(g.0).ok()?.checked_sub(1)?;
        self.config.gateways.get(i).map(|gw| gw.name.clone())
    }

    fn id_of(&self, name: &str) -> Option<GatewayId> {
        let i = self.config.gateways.iter().position(|g| g.name == name)?;
        u32::try_from(i + 1).ok().map(GatewayId)
    }

    /// Gateways with their leases as etcd sees them, and every LU's active gateway
    /// (`GET /v1/cluster`, `ironlun ctl cluster`).
    pub async fn status(&self, registry: &Registry) -> Result<ironlun_api::ClusterJson, EtcdError> {
        let (_, members) = self
            .etcd
            .get_prefix(format!("{}gw/", self.prefix).as_bytes())
            .await?;
        let mut gateways = Vec::new();
        for (i, g) in self.config.gateways.iter().enumerate() {
            let id = u32::try_from(i + 1).unwrap_or(u32::MAX);
            let key = format!("{}gw/{id}", self.prefix).into_bytes();
            let kv = members.iter().find(|kv| kv.key == key);
            let ttl = match kv {
                Some(kv) if kv.lease != 0 => self.etcd.time_to_live(kv.lease).await?,
                _ => None,
            };
            gateways.push(ironlun_api::GatewayJson {
                id,
                name: g.name.clone(),
                tpgts: g.tpgts.clone(),
                live: kv.is_some(),
                lease: kv.map(|kv| format!("{:x}", kv.lease)),
                ttl_seconds: ttl,
            });
        }
        let mut luns = Vec::new();
        for t in registry.targets().iter() {
            for (id, l) in t.luns().iter() {
                let serial = l.lu().config().serial.clone();
                let (active, _) =
                    alua::active(&self.etcd, &alua::key(&self.prefix, &serial)).await?;
                luns.push(ironlun_api::ClusterLunJson {
                    target: t.name.clone(),
                    lun: *id,
                    serial,
                    active: active.and_then(|g| self.name_of(g)),
                    serving: l.cluster.get().is_some_and(ClusterLu::may_submit),
                    generation: l.pr_snapshot().generation,
                });
            }
        }
        Ok(ironlun_api::ClusterJson {
            cluster: self.config.cluster.clone(),
            gateway: self.config.name.clone(),
            gateways,
            luns,
        })
    }

    /// Make `gateway` the active one for `handle`'s LU (compare-and-swap on the ALUA key):
    /// only a gateway holding a live lease. Every gateway applies the change from its watch.
    pub async fn move_active(&self, handle: &LunHandle, gateway: &str) -> Result<(), MoveError> {
        let to = self
            .id_of(gateway)
            .ok_or_else(|| MoveError::UnknownGateway(gateway.to_string()))?;
        let member = format!("{}gw/{}", self.prefix, to.0).into_bytes();
        if self.etcd.get(&member).await?.is_none() {
            return Err(MoveError::NotLive(gateway.to_string()));
        }
        let serial = handle.lu().config().serial.clone();
        let key = alua::key(&self.prefix, &serial);
        let (active, revision) = alua::active(&self.etcd, &key).await?;
        if active == Some(to) {
            return Ok(());
        }
        match alua::move_to(&self.etcd, &key, revision, to).await? {
            Some(_) => {
                tracing::info!(lu = %handle.label(), to = gateway, "cluster ALUA: active gateway moved by the admin API");
                Ok(())
            }
            None => Err(MoveError::Raced),
        }
    }

    /// This gateway's membership.
    pub fn membership(&self) -> &Arc<Membership> {
        &self.membership
    }

    /// This gateway's id.
    pub fn id(&self) -> GatewayId {
        self.me
    }
}

/// An ownership or handover step on a replicated LU (scale-out.md §2.7): decided by the LU's
/// replica through etcd; on `Ok` it is in effect on every live gateway (and the tasks it
/// aborts have drained everywhere). `Ok` carries the commit revision of a step that changed
/// the state, `None` for a retry of the last decision.
pub(crate) async fn ownership(
    handle: &LunHandle,
    op: OwnershipOp,
) -> Result<Option<Revision>, crate::target::OwnershipOpError> {
    use crate::target::OwnershipOpError;
    let Some(replica) = handle.cluster.get().and_then(ClusterLu::replica) else {
        return Err(OwnershipOpError::Cluster(
            "this gateway has not joined the LU's replicated state yet".to_string(),
        ));
    };
    match replica.ownership(op).await {
        (Answer::Good, revision) => Ok(revision),
        (Answer::Refused(e), _) => Err(e.into()),
        (Answer::NotReady, _) => Err(OwnershipOpError::Cluster(
            "this gateway is fenced (no current lease or replica); the step may or may not have been committed: read the state and retry through another gateway".to_string(),
        )),
        (Answer::Busy, _) => Err(OwnershipOpError::Cluster(
            "too many concurrent changes of the LU's state; retry".to_string(),
        )),
        (Answer::Failed(e), _) => Err(OwnershipOpError::Cluster(format!(
            "unexpected reservation outcome {e:?}"
        ))),
    }
}

/// Wait until every gateway has drained what the fence at `revision` asked of it.
pub(crate) async fn fence_drained(handle: &LunHandle, revision: Revision) {
    match handle.cluster.get().and_then(ClusterLu::replica) {
        Some(r) => r.drained_everywhere(revision).await,
        None => std::future::pending().await,
    }
}
