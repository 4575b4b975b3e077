//! This daemon as a gateway of a cluster (issue 18): its membership in etcd and the
//! self-fencing gate every backend submit will pass (`../shared/reference/scale-out.md` §2.4,
//! §2.5 "Join" and "Rejoin").
//!
//! - **Join:** grant a lease of TTL `T`, then create `P/gw/<name>` attached to it in one
//!   transaction that succeeds only if no live gateway holds the name.
//! - **Renew:** every keep-alive interval; a renewal sent at local instant `s` and answered with
//!   TTL > 0 moves the deadline to `D = s + T(1−ρ) − m` (`ironlun_cluster::lease::Timing`),
//!   never backwards.
//! - **Fence:** [`Fence::may_submit`] is one atomic load and one clock read; false from `D` on.
//!   Nothing but a renewal moves `D`, so a gateway cut off from etcd stops itself before etcd
//!   can expire its lease (at `s + T` at the earliest) and long before the others act on the
//!   expiry (`+ Δ`).
//! - **Rejoin:** a renewal answered "lease not found" (the lease expired while cut off) makes a
//!   new lease and member key; the gate opens only with the new lease. A cut-off gateway keeps
//!   trying at the keep-alive interval.

pub mod replica;

use crate::config::Cluster;
use crate::etcd::{Compare, Etcd, EtcdError, Op};
use ironlun_cluster::lease::Timing;
use ironlun_cluster::Time;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The self-fencing gate: may this gateway submit backend I/O now?
#[derive(Debug)]
pub struct Fence {
    /// The clock's origin: [`Time`] values are microseconds since it (CLOCK_MONOTONIC).
    origin: Instant,
    /// The deadline `D` in microseconds since `origin`; 0 = fenced (not joined, or lost).
    deadline_us: AtomicU64,
}

impl Fence {
    fn new() -> Fence {
        Fence {
            origin: Instant::now(),
            deadline_us: AtomicU64::new(0),
        }
    }

    /// Now on the gate's clock.
    pub fn now(&self) -> Time {
        Time::from_micros(u64::try_from(self.origin.elapsed().as_micros()).unwrap_or(u64::MAX))
    }

    /// Whether backend I/O may be submitted now: strictly before the deadline.
    pub fn may_submit(&self) -> bool {
        self.now().as_micros() < self.deadline_us.load(Ordering::Acquire)
    }

    /// The deadline, as an instant (`None`: fenced since joining failed or the lease was lost).
    pub fn deadline(&self) -> Option<Instant> {
        match self.deadline_us.load(Ordering::Acquire) {
            0 => None,
            us => Some(self.origin + Duration::from_micros(us)),
        }
    }

    /// Move the deadline to `d` if that is later (renewals answered out of order never pull
    /// it back).
    fn extend(&self, d: Time) {
        self.deadline_us.fetch_max(d.as_micros(), Ordering::AcqRel);
    }

    /// Close the gate now (the lease is gone).
    fn close(&self) {
        self.deadline_us.store(0, Ordering::Release);
    }
}

/// The timing of `c` as the protocol crate checks it.
pub fn timing(c: &Cluster) -> Result<Timing, String> {
    Timing::new(c.lease_settings()).map_err(|e| e.to_string())
}

/// Why joining failed.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("gateway name {0:?} is held by a live member (lease {1:x}): two gateways cannot share a name")]
    NameInUse(String, i64),
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    #[error("cluster timing: {0}")]
    Timing(String),
}

/// This gateway's membership: its lease, its member key and its [`Fence`].
#[derive(Debug)]
pub struct Membership {
    etcd: Arc<Etcd>,
    timing: Timing,
    key: Vec<u8>,
    value: Vec<u8>,
    lease: AtomicI64,
    /// The current registration: (lease, revision that created the member key, local instant
    /// the grant was sent).
    registration: std::sync::Mutex<(i64, i64, Time)>,
    fence: Arc<Fence>,
}

impl Membership {
    /// Join the cluster `c` as `c.name`, describing this gateway by `value` (JSON: its portals
    /// and TPGTs). The fence opens once the member key is in place.
    pub async fn join(
        etcd: Arc<Etcd>,
        c: &Cluster,
        value: Vec<u8>,
    ) -> Result<Membership, JoinError> {
        let timing = timing(c).map_err(JoinError::Timing)?;
        let key = format!("{}gw/{}", c.prefix(), c.name).into_bytes();
        Ok(Membership::join_as(etcd, timing, key, value, &c.name)
            .await?
            .0)
    }

    /// Join with member key `key` (the protocol's `P/gw/<gw>`); also returns the revision that
    /// created the key and the local instant the lease grant was sent (the first `s`).
    pub async fn join_as(
        etcd: Arc<Etcd>,
        timing: Timing,
        key: Vec<u8>,
        value: Vec<u8>,
        name: &str,
    ) -> Result<(Membership, i64, Time), JoinError> {
        let m = Membership {
            etcd,
            timing,
            key,
            value,
            lease: AtomicI64::new(0),
            registration: std::sync::Mutex::new((0, 0, Time::default())),
            fence: Arc::new(Fence::new()),
        };
        let (created, sent) = m.register(name).await?;
        Ok((m, created, sent))
    }

    /// Grant a lease and create the member key under it; open the fence. Returns the revision
    /// that created the key and when the grant was sent.
    async fn register(&self, name: &str) -> Result<(i64, Time), JoinError> {
        let ttl = i64::try_from(self.timing.settings().ttl.as_secs()).unwrap_or(i64::MAX);
        let sent = self.fence.now();
        let lease = self.etcd.grant(ttl).await?;
        let t = self
            .etcd
            .txn(
                &[Compare::CreateRevision(self.key.clone(), 0)],
                &[Op::Put {
                    key: self.key.clone(),
                    value: self.value.clone(),
                    lease: lease.id,
                }],
                &[Op::Get(self.key.clone())],
            )
            .await?;
        if !t.succeeded {
            let holder = t.gets.first().cloned().flatten().map_or(0, |kv| kv.lease);
            let _ = self.etcd.revoke(lease.id).await;
            return Err(JoinError::NameInUse(name.to_string(), holder));
        }
        self.lease.store(lease.id, Ordering::Release);
        *self
            .registration
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = (lease.id, t.revision, sent);
        // The grant was answered with this TTL after `sent`: the deadline counts from it.
        self.fence.extend(self.timing.deadline(sent));
        Ok((t.revision, sent))
    }

    /// The gate every backend submit passes.
    pub fn fence(&self) -> Arc<Fence> {
        self.fence.clone()
    }

    /// The current lease (0: none).
    pub fn lease(&self) -> i64 {
        self.lease.load(Ordering::Acquire)
    }

    /// The current registration: its lease, the revision that created the member key under
    /// it, and the local instant its grant was sent.
    pub fn registration(&self) -> (i64, i64, Time) {
        *self
            .registration
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The member key, `P/gw/<name>`.
    pub fn key(&self) -> &[u8] {
        &self.key
    }

    /// One renewal: extends the deadline on success; on "lease not found" closes the fence and
    /// registers again (a new lease; the fence reopens with it). An unreachable etcd changes
    /// nothing: the deadline stays where the last success put it.
    pub async fn renew(&self, name: &str) -> Result<(), JoinError> {
        let lease = self.lease();
        let sent = self.fence.now();
        match self.etcd.keep_alive(lease).await {
            Ok(Some(_)) => {
                self.fence.extend(self.timing.deadline(sent));
                Ok(())
            }
            Ok(None) => {
                self.fence.close();
                tracing::warn!(gateway = name, lease, "cluster lease lost; joining again");
                self.register(name).await.map(|_| ())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Renew at the keep-alive interval until `stop` resolves, logging when the fence closes
    /// (deadline passed) and opens again.
    pub async fn run(&self, name: &str, stop: impl std::future::Future<Output = ()>) {
        let interval = self.timing.settings().keepalive_interval;
        tokio::pin!(stop);
        let mut fenced = false;
        loop {
            tokio::select! {
                () = &mut stop => return,
                () = tokio::time::sleep(interval) => {}
            }
            if let Err(e) = self.renew(name).await {
                tracing::warn!(gateway = name, error = %e, "cluster lease renewal failed");
            }
            let open = self.fence.may_submit();
            if open == fenced {
                fenced = !open;
                if fenced {
                    tracing::error!(gateway = name, "self-fenced: the cluster lease deadline passed; no backend I/O until etcd answers");
                } else {
                    tracing::info!(
                        gateway = name,
                        "cluster lease renewed; backend I/O allowed again"
                    );
                }
            }
        }
    }

    /// Leave: revoke the lease (the member key goes with it) and close the fence.
    pub async fn leave(&self) -> Result<(), EtcdError> {
        self.fence.close();
        self.etcd.revoke(self.lease()).await
    }
}
