//! ALUA across gateways (issue 18; scale-out.md §2.1 `P/lu/<serial>/alua`, §2.5 "Gateway
//! death"): one gateway is active/optimized for each LU, the others standby.
//!
//! - **Groups:** each gateway is one target port group, id = its gateway id, holding its
//!   TPGTs (`config::Cluster::port_groups`). RTPG through any gateway reports them all.
//! - **The key:** `P/lu/<serial>/alua` = `active=<gw>`. Created by the first gateway that
//!   finds it absent (naming the lowest live member), moved only by compare-and-swap on its
//!   revision: by `ironlun ctl cluster move`, or by the lowest live gateway once the active one's
//!   member key has been deleted and Δ(1+ρ) has passed (its in-flight writes have ended,
//!   §2.4).
//! - **Local states:** the active gateway's group active/optimized, every other standby
//!   (SPC-4 §5.16.2.4.4: PR commands pass, media access gets NOT READY 04/0B); this
//!   gateway's own group transitioning while its replica is not current (fenced), so
//!   multipath moves away. A change raises ASYMMETRIC ACCESS STATE CHANGED on the LU.
//! - **Storage fence:** a gateway that becomes active for a LU takes the backstore's fence
//!   ([`take_exclusive`](ironlun_backstore::BlockBackend::take_exclusive): RBD's exclusive lock, breaking and blocklisting the
//!   previous holder's) on the blocking pool, and reports its own group active/optimized only
//!   once it holds it ([`holds_exclusive`](ironlun_backstore::BlockBackend::holds_exclusive)); until then, transitioning.
//!   The gateway that stops being active releases it (a stalled one cannot: it is fenced).
//! - **Watch:** one per gateway over the cluster prefix, for the ALUA keys and the members.

use crate::cluster::replica::LuKeys;
use crate::etcd::{Compare, Etcd, EtcdError, Event, Op};
use crate::target::LunHandle;
use ironlun_cluster::lease::Timing;
use ironlun_cluster::GatewayId;
use ironlun_scsi::alua::AccessState;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Instant;

/// The ALUA key of the LU with unit serial number `serial` (its place among the LU's keys:
/// [`LuKeys::alua`]).
pub fn key(prefix: &str, serial: &str) -> Vec<u8> {
    LuKeys::new(prefix, serial).alua()
}

/// The value naming `gw` active.
fn value(gw: GatewayId) -> Vec<u8> {
    format!("active={}", gw.0).into_bytes()
}

/// The active gateway a stored value names.
fn parse(v: &[u8]) -> Option<GatewayId> {
    std::str::from_utf8(v)
        .ok()?
        .strip_prefix("active=")?
        .parse()
        .ok()
        .map(GatewayId)
}

/// A member key's gateway id.
fn member(prefix: &str, key: &[u8]) -> Option<GatewayId> {
    std::str::from_utf8(key)
        .ok()?
        .strip_prefix(&format!("{prefix}gw/"))?
        .parse()
        .ok()
        .map(GatewayId)
}

/// Set `handle`'s group states from its active gateway and its readiness.
pub(crate) fn apply(handle: &LunHandle, me: GatewayId) {
    let Some(c) = handle.cluster.get() else {
        return;
    };
    let active = c.active.load(Ordering::Acquire);
    let ready = c.ready.load(Ordering::Acquire);
    let mut lu = handle.lu();
    let ids: Vec<u16> = lu
        .config()
        .port_groups
        .groups()
        .iter()
        .map(|g| g.id)
        .collect();
    for id in ids {
        let state = if u32::from(id) == me.0 && !ready {
            AccessState::Transitioning
        } else if active == 0 {
            // Not known yet (before the first read): nothing is served.
            AccessState::Transitioning
        } else if u32::from(id) == active && active == me.0 && !handle.backend.holds_exclusive() {
            // Active here, but the storage fence is not ours (yet): nothing is served.
            AccessState::Transitioning
        } else if u32::from(id) == active {
            AccessState::ActiveOptimized
        } else {
            AccessState::Standby
        };
        let _ = lu.set_port_group_state(id, state);
    }
}

/// Create `key` naming `active` unless it exists; the active gateway it names and its
/// revision.
async fn create(
    etcd: &Etcd,
    key: &[u8],
    active: GatewayId,
) -> Result<(Option<GatewayId>, i64), EtcdError> {
    let t = etcd
        .txn(
            &[Compare::CreateRevision(key.to_vec(), 0)],
            &[Op::Put {
                key: key.to_vec(),
                value: value(active),
                lease: 0,
            }],
            &[Op::Get(key.to_vec())],
        )
        .await?;
    if t.succeeded {
        return Ok((Some(active), t.revision));
    }
    let kv = t.gets.first().cloned().flatten();
    Ok((
        kv.as_ref().and_then(|kv| parse(&kv.value)),
        kv.map_or(0, |kv| kv.mod_revision),
    ))
}

/// `lu`'s active gateway is `g` now: record it and set its states.
fn set_active(lu: &Lu, g: GatewayId, me: GatewayId) {
    if let Some(h) = lu.handle.upgrade() {
        if let Some(c) = h.cluster.get() {
            let before = c.active.swap(g.0, Ordering::AcqRel);
            if before != g.0 {
                tracing::info!(lu = %h.label(), active = g.0, "cluster ALUA: active gateway");
            }
            // No longer active: give the fence up for the next gateway (not reporting it held
            // from now on). Becoming active, or active without the fence: take it. The states
            // are set now and again once it is up.
            if before == me.0 && g != me {
                release_fence(Arc::clone(&h));
            } else if g == me && (before != me.0 || !h.backend.holds_exclusive()) {
                apply(&h, me);
                take_fence(h, me);
                return;
            }
        }
        apply(&h, me);
    }
}

/// Give the LU's storage fence up on the blocking pool.
fn release_fence(h: Arc<LunHandle>) {
    tokio::task::spawn_blocking(move || {
        if let Err(e) = h.backend.release_exclusive() {
            tracing::warn!(lu = %h.label(), error = %e, "cluster ALUA: cannot release the storage fence; the next gateway breaks it");
        }
    });
}

/// Take the LU's storage fence on the blocking pool (retrying every second while this gateway
/// stays active), then set the states again.
fn take_fence(h: Arc<LunHandle>, me: GatewayId) {
    tokio::task::spawn_blocking(move || loop {
        let still_active = h
            .cluster
            .get()
            .is_some_and(|c| c.active.load(Ordering::Acquire) == me.0);
        if !still_active {
            return;
        }
        let started = Instant::now();
        match h.backend.take_exclusive() {
            Ok(()) => {
                tracing::info!(lu = %h.label(), took = ?started.elapsed(), "cluster ALUA: storage fence taken");
                apply(&h, me);
                return;
            }
            Err(e) => {
                tracing::error!(lu = %h.label(), error = %e, "cluster ALUA: cannot take the storage fence; retrying");
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
        }
    });
}

/// One LU as the ALUA driver tracks it.
struct Lu {
    handle: Weak<LunHandle>,
    key: Vec<u8>,
    /// The key's mod revision (the CAS token), 0 while absent.
    revision: i64,
}

/// The ALUA driver of one gateway.
pub struct Alua {
    etcd: Arc<Etcd>,
    prefix: String,
    me: GatewayId,
    timing: Timing,
    luns: Vec<Lu>,
    live: BTreeSet<GatewayId>,
    /// Members whose key was deleted, and when this gateway saw it.
    gone: BTreeMap<GatewayId, Instant>,
}

impl Alua {
    /// Read every LU's ALUA key and the members, create absent keys (naming the lowest live
    /// member), apply the states; then keep them current on a task of their own.
    pub async fn start(
        etcd: Arc<Etcd>,
        prefix: String,
        me: GatewayId,
        timing: Timing,
        handles: &[(Arc<LunHandle>, String)],
    ) -> Result<(), EtcdError> {
        let luns = handles
            .iter()
            .map(|(h, serial)| Lu {
                handle: Arc::downgrade(h),
                key: key(&prefix, serial),
                revision: 0,
            })
            .collect();
        let mut a = Alua {
            etcd,
            prefix,
            me,
            timing,
            luns,
            live: BTreeSet::new(),
            gone: BTreeMap::new(),
        };
        let revision = a.read().await?;
        tokio::spawn(a.run(revision + 1));
        Ok(())
    }

    /// The initial read; returns the revision it saw.
    async fn read(&mut self) -> Result<i64, EtcdError> {
        let (revision, kvs) = self.etcd.get_prefix(self.prefix.as_bytes()).await?;
        for kv in &kvs {
            if let Some(g) = member(&self.prefix, &kv.key) {
                self.live.insert(g);
            }
        }
        let lowest = self.live.first().copied().unwrap_or(self.me);
        let now = Instant::now();
        for lu in &mut self.luns {
            let (active, rev) = match kvs.iter().find(|kv| kv.key == lu.key) {
                Some(kv) => (parse(&kv.value), kv.mod_revision),
                None => create(&self.etcd, &lu.key, lowest).await?,
            };
            lu.revision = rev;
            if let Some(g) = active {
                set_active(lu, g, self.me);
                // Its gateway is gone already (all restarted, or it died just now): take
                // over as for a DELETE seen now.
                if !self.live.contains(&g) {
                    self.gone.entry(g).or_insert(now);
                }
            }
        }
        Ok(revision)
    }

    async fn run(mut self, mut next: i64) {
        let mut watch = None;
        loop {
            if watch.is_none() {
                match self.etcd.watch(self.prefix.as_bytes(), next).await {
                    Ok(w) => watch = Some(w),
                    Err(e) => {
                        tracing::warn!(error = %e, "cluster ALUA watch: cannot start; retrying");
                        tokio::time::sleep(self.etcd.timeout()).await;
                        continue;
                    }
                }
            }
            let Some(w) = watch.as_mut() else { continue };
            let delay = self.timing.local_lock_delay();
            let due = self.gone.values().map(|at| *at + delay).min();
            tokio::select! {
                batch = w.next() => match batch {
                    Ok((_, events)) => {
                        for e in &events {
                            next = next.max(e.revision() + 1);
                            self.event(e);
                        }
                    }
                    Err(EtcdError::Compacted(r)) => {
                        tracing::warn!(compacted = r, "cluster ALUA watch: history compacted; reading again");
                        match self.read().await {
                            Ok(rev) => next = rev + 1,
                            Err(e) => tracing::warn!(error = %e, "cluster ALUA: read failed"),
                        }
                        watch = None;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cluster ALUA watch ended; watching again");
                        watch = None;
                    }
                },
                () = async {
                    match due {
                        Some(t) => tokio::time::sleep_until(t.into()).await,
                        None => std::future::pending().await,
                    }
                } => self.take_over().await,
            }
            if self.luns.iter().all(|l| l.handle.strong_count() == 0) {
                return;
            }
        }
    }

    fn event(&mut self, e: &Event) {
        match e {
            Event::Put(kv) => {
                if let Some(g) = member(&self.prefix, &kv.key) {
                    self.live.insert(g);
                    self.gone.remove(&g);
                    return;
                }
                let me = self.me;
                if let Some(lu) = self.luns.iter_mut().find(|l| l.key == kv.key) {
                    lu.revision = kv.mod_revision;
                    if let Some(g) = parse(&kv.value) {
                        set_active(lu, g, me);
                    }
                }
            }
            Event::Delete { key, .. } => {
                if let Some(g) = member(&self.prefix, key) {
                    self.live.remove(&g);
                    if g != self.me {
                        self.gone.insert(g, Instant::now());
                    }
                }
            }
        }
    }

    /// For every gateway gone for Δ(1+ρ): if this is the lowest live gateway and may serve,
    /// move each LU it was active for here.
    async fn take_over(&mut self) {
        let delay = self.timing.local_lock_delay();
        let now = Instant::now();
        let due: Vec<GatewayId> = self
            .gone
            .iter()
            .filter(|(_, at)| now >= **at + delay)
            .map(|(g, _)| *g)
            .collect();
        if due.is_empty() {
            return;
        }
        let lowest = self.live.first().copied();
        for g in due {
            self.gone.remove(&g);
            if lowest != Some(self.me) {
                continue;
            }
            let me = self.me;
            let mut retry = false;
            for lu in &mut self.luns {
                let Some(h) = lu.handle.upgrade() else {
                    continue;
                };
                let Some(c) = h.cluster.get() else { continue };
                if c.active.load(Ordering::Acquire) != g.0 || !c.may_submit() {
                    continue;
                }
                match move_to(&self.etcd, &lu.key, lu.revision, me).await {
                    Ok(Some(rev)) => {
                        tracing::warn!(lu = %h.label(), from = g.0, to = me.0, "cluster ALUA: the active gateway is gone; this gateway is active now");
                        lu.revision = rev;
                        set_active(lu, me, me);
                    }
                    Ok(None) => {} // Moved meanwhile: the watch brings it.
                    Err(e) => {
                        tracing::warn!(lu = %h.label(), error = %e, "cluster ALUA: take-over failed; retrying");
                        retry = true;
                    }
                }
            }
            if retry {
                self.gone.insert(g, now);
            }
        }
    }
}

/// Compare-and-swap `key` (at `revision`) to name `to` active; `Ok(None)` when it moved
/// meanwhile.
pub async fn move_to(
    etcd: &Etcd,
    key: &[u8],
    revision: i64,
    to: GatewayId,
) -> Result<Option<i64>, EtcdError> {
    let t = etcd
        .txn(
            &[Compare::ModRevision(key.to_vec(), revision)],
            &[Op::Put {
                key: key.to_vec(),
                value: value(to),
                lease: 0,
            }],
            &[],
        )
        .await?;
    Ok(t.succeeded.then_some(t.revision))
}

/// The active gateway of the LU keyed `key` now, and the key's revision.
pub async fn active(etcd: &Etcd, key: &[u8]) -> Result<(Option<GatewayId>, i64), EtcdError> {
    Ok(etcd
        .get(key)
        .await?
        .map_or((None, 0), |kv| (parse(&kv.value), kv.mod_revision)))
}
