//! One LU's replicated reservation state on a real etcd: the driver of
//! `ironlun_cluster::gateway::Gateway` (scale-out.md §2.2–§2.5). It carries the gateway's
//! requests to etcd ([`crate::etcd`]), feeds it the watch, the answers and its timer, and
//! hands its outputs to the host: PR OUT answers to their callers, unit attentions, task
//! aborts, fencing.
//!
//! Keys (prefix `P` = `[cluster]`'s `/ironlun/v1/<cluster>/`; `<gw>` the numeric gateway id,
//! `<serial>` the LU's unit serial number in hex):
//! `P/gw/<gw>` member (under the gateway's lease), `P/lu/<serial>/pr` the record
//! (`ironlun_cluster::codec`), `P/lu/<serial>/applied/<gw>` and `…/drained/<gw>` the
//! acknowledgements (under the lease), `P/lu/<serial>/alua` the active gateway.
//!
//! Contract:
//! - A PR OUT is answered exactly once, through the oneshot it was submitted with.
//! - Etcd calls never block the loop: each runs as a task and reports back. A transaction that
//!   fails or times out gets no answer; the gateway resends it after its `rpc_timeout` (its
//!   op id makes a second commit impossible). Acknowledgement puts are retried until they
//!   succeed or the lease is lost, always with the newest value.
//! - The watch covers `P`; a broken watch is re-established from the next revision (the
//!   gateway ignores events it has seen). A watch refused for compaction ends the driver:
//!   pending PR OUTs answer NOT READY and [`Host::stale`] tells the host to join anew from a
//!   snapshot (§2.5).
//! - A value that does not decode is logged and skipped; the replay check (`Output::Diverged`)
//!   catches a state it would have changed.

use super::Fence;
use crate::etcd::{self, Compare, Etcd, EtcdError, Op};
use ironlun_cluster::codec;
use ironlun_cluster::gateway::{
    Answer, Event, Gateway, GatewayConfig, Output, Request, Submit, Token,
};
use ironlun_cluster::kv::{self, Change, Key, TxnResult, Value};
use ironlun_cluster::{GatewayId, Revision, Time};
use ironlun_scsi::pr::ownership::OwnershipOp;
use ironlun_scsi::pr::{ItNexus, OutRequest, PrState};
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// The etcd keys of one LU in one cluster.
#[derive(Debug, Clone)]
pub struct LuKeys {
    prefix: String,
    lu: String,
    serial: String,
}

impl LuKeys {
    /// Keys under `prefix` (ends in `/`) for the LU with unit serial number `serial`.
    pub fn new(prefix: &str, serial: &str) -> LuKeys {
        let hex = ironlun_scsi::pr::persist::hex(serial.as_bytes());
        LuKeys {
            prefix: prefix.to_string(),
            lu: format!("{prefix}lu/{hex}/"),
            serial: serial.to_string(),
        }
    }

    /// The cluster prefix (what the watch covers).
    pub fn prefix(&self) -> &[u8] {
        self.prefix.as_bytes()
    }

    /// The bytes of `key`.
    pub fn key(&self, key: Key) -> Vec<u8> {
        match key {
            Key::Pr => format!("{}pr", self.lu),
            Key::Member(g) => format!("{}gw/{}", self.prefix, g.0),
            Key::Applied(g) => format!("{}applied/{}", self.lu, g.0),
            Key::Drained(g) => format!("{}drained/{}", self.lu, g.0),
        }
        .into_bytes()
    }

    /// `P/lu/<serial>/alua`: the LU's active gateway (`target::cluster::alua`).
    pub fn alua(&self) -> Vec<u8> {
        format!("{}alua", self.lu).into_bytes()
    }

    /// Which key `bytes` is, if it is one of this LU's or a member key.
    pub fn parse(&self, bytes: &[u8]) -> Option<Key> {
        let s = std::str::from_utf8(bytes).ok()?;
        let id = |t: &str| t.parse().ok().map(GatewayId);
        if let Some(g) = s.strip_prefix(&format!("{}gw/", self.prefix)) {
            return id(g).map(Key::Member);
        }
        let rest = s.strip_prefix(&self.lu)?;
        if rest == "pr" {
            return Some(Key::Pr);
        }
        if let Some(g) = rest.strip_prefix("applied/") {
            return id(g).map(Key::Applied);
        }
        rest.strip_prefix("drained/").and_then(id).map(Key::Drained)
    }

    /// The protocol's view of a stored value of `key`.
    fn value(&self, key: Key, bytes: &[u8]) -> Result<Value, codec::CodecError> {
        Ok(match key {
            Key::Pr => Value::Record(Box::new(codec::decode_record(bytes, &self.serial)?)),
            Key::Member(_) => Value::Member,
            Key::Applied(_) | Key::Drained(_) => Value::Revision(codec::decode_revision(bytes)?),
        })
    }

    /// An etcd watch event as the protocol's, if it concerns this LU.
    fn event(&self, e: &etcd::Event) -> Option<kv::Event> {
        match e {
            etcd::Event::Put(kv) => {
                let key = self.parse(&kv.key)?;
                let value = match self.value(key, &kv.value) {
                    Ok(v) => v,
                    Err(err) => {
                        tracing::error!(key = %String::from_utf8_lossy(&kv.key), error = %err, "cluster: undecodable value skipped");
                        return None;
                    }
                };
                Some(kv::Event {
                    revision: rev(kv.mod_revision),
                    key,
                    change: Change::Put {
                        value,
                        create_revision: rev(kv.create_revision),
                    },
                })
            }
            etcd::Event::Delete { key, mod_revision } => Some(kv::Event {
                revision: rev(*mod_revision),
                key: self.parse(key)?,
                change: Change::Delete,
            }),
        }
    }
}

fn rev(r: i64) -> Revision {
    Revision::try_from(r).unwrap_or(0)
}

fn etcd_rev(r: Revision) -> i64 {
    i64::try_from(r).unwrap_or(i64::MAX)
}

/// What the host asks of the driver.
#[derive(Debug)]
enum Cmd {
    Prout {
        it: ItNexus,
        service_action: u8,
        scope: u8,
        ty: u8,
        param: Vec<u8>,
        answer: oneshot::Sender<Answer>,
    },
    Ownership {
        op: OwnershipOp,
        answer: oneshot::Sender<(Answer, Option<Revision>)>,
    },
    WaitDrained(Revision, oneshot::Sender<()>),
    Drained(Revision),
    MaySubmit(oneshot::Sender<bool>),
    State(oneshot::Sender<(Revision, PrState)>),
}

/// Where the driver hands the gateway's outputs other than PR OUT answers, in order, on its
/// own task, before any later answer goes out: a host that installs [`Output::State`] in the
/// LU here has it in effect before the PR OUT that committed it is answered GOOD.
pub trait Host: Send + Sync + 'static {
    /// One output (never [`Output::Respond`]). Must not block: no `.await`, no I/O.
    fn output(&self, out: Output);

    /// The driver ended because its watch can no longer follow the store (history compacted
    /// past it): the replica is stale from now on and must be joined anew from a snapshot.
    fn stale(&self) {}
}

impl Host for mpsc::UnboundedSender<Output> {
    fn output(&self, out: Output) {
        let _ = self.send(out);
    }
}

/// The host's handle on a running driver.
#[derive(Debug, Clone)]
pub struct Replica {
    cmds: mpsc::Sender<Cmd>,
}

impl Replica {
    /// Run the driver for `gw` (joined with lease `lease`; its member key already exists) on
    /// `etcd`, reading time from `clock` (the membership's gate: the instants the gateway was
    /// created with are on it). Outputs other than PR OUT answers go to the returned receiver.
    /// The driver ends when every [`Replica`] handle is dropped, or on a fatal watch error.
    pub fn spawn(
        gw: Gateway,
        etcd: Arc<Etcd>,
        keys: LuKeys,
        clock: Arc<Fence>,
    ) -> (Replica, mpsc::UnboundedReceiver<Output>) {
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        (
            Replica::spawn_with(gw, etcd, keys, clock, Arc::new(out_tx)),
            out_rx,
        )
    }

    /// Join from a snapshot (scale-out.md §2.5 "Join"): read the LU's and the members' keys at
    /// one revision, build the gateway from them ([`Gateway::join`]) and run it from there, the
    /// outputs handed to `host`. The gateway's registration: `cfg`, `lease` granted by a
    /// request sent at `granted_at`, member key created at `created`.
    #[allow(clippy::too_many_arguments)]
    pub async fn join(
        cfg: GatewayConfig,
        lease: i64,
        granted_at: Time,
        created: i64,
        etcd: Arc<Etcd>,
        keys: LuKeys,
        clock: Arc<Fence>,
        host: Arc<dyn Host>,
    ) -> Result<Replica, EtcdError> {
        let (revision, kvs) = etcd.get_prefix(keys.prefix()).await?;
        let snapshot: Vec<kv::Event> = kvs
            .into_iter()
            .filter_map(|kv| keys.event(&etcd::Event::Put(kv)))
            .collect();
        let gw = Gateway::join(
            cfg,
            u64::try_from(lease).unwrap_or(0),
            granted_at,
            rev(created),
            rev(revision),
            &snapshot,
        );
        Ok(Replica::spawn_with(gw, etcd, keys, clock, host))
    }

    /// As [`Replica::spawn`], with the outputs handed to `host` on the driver's task.
    pub fn spawn_with(
        gw: Gateway,
        etcd: Arc<Etcd>,
        keys: LuKeys,
        clock: Arc<Fence>,
        host: Arc<dyn Host>,
    ) -> Replica {
        let (cmds_tx, cmds_rx) = mpsc::channel(64);
        let driver = Driver {
            gw,
            etcd,
            keys,
            clock,
            answers: HashMap::new(),
            drain_waiters: Vec::new(),
            next_token: 0,
            out: host,
        };
        tokio::spawn(driver.run(cmds_rx));
        Replica { cmds: cmds_tx }
    }

    /// A PERSISTENT RESERVE OUT from `it`: its answer once the protocol decides it (at once
    /// for errors and no-ops; after the commit and the completion rule otherwise).
    pub async fn prout(&self, it: &ItNexus, req: OutRequest<'_>) -> Answer {
        let (tx, rx) = oneshot::channel();
        let cmd = Cmd::Prout {
            it: it.clone(),
            service_action: req.service_action,
            scope: req.scope,
            ty: req.ty,
            param: req.param.to_vec(),
            answer: tx,
        };
        if self.cmds.send(cmd).await.is_err() {
            return Answer::NotReady;
        }
        rx.await.unwrap_or(Answer::NotReady)
    }

    /// An ownership or handover step (scale-out.md §2.7), decided and completed as a PR OUT
    /// is; with the revision it was committed at, for a GOOD that needed the store.
    pub async fn ownership(&self, op: OwnershipOp) -> (Answer, Option<Revision>) {
        let (tx, rx) = oneshot::channel();
        if self
            .cmds
            .send(Cmd::Ownership { op, answer: tx })
            .await
            .is_err()
        {
            return (Answer::NotReady, None);
        }
        rx.await.unwrap_or((Answer::NotReady, None))
    }

    /// Wait until every gateway has drained what revision `r` asked of it (a handover fence's
    /// tasks), or is gone and Δ has passed (`Gateway::drained_everywhere`). Never returns
    /// if the driver ends first: callers bound it with their deadline.
    pub async fn drained_everywhere(&self, r: Revision) {
        let (tx, rx) = oneshot::channel();
        if self.cmds.send(Cmd::WaitDrained(r, tx)).await.is_err() || rx.await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// The host finished the backend I/O of the tasks aborted by revisions up to `r`.
    pub async fn drained(&self, r: Revision) {
        let _ = self.cmds.send(Cmd::Drained(r)).await;
    }

    /// The local replica: the revision of the record it equals, and the state.
    pub async fn state(&self) -> Option<(Revision, PrState)> {
        let (tx, rx) = oneshot::channel();
        self.cmds.send(Cmd::State(tx)).await.ok()?;
        rx.await.ok()
    }

    /// The self-fence check (`Gateway::may_submit`) as the driver sees it now.
    pub async fn may_submit(&self) -> bool {
        let (tx, rx) = oneshot::channel();
        if self.cmds.send(Cmd::MaySubmit(tx)).await.is_err() {
            return false;
        }
        rx.await.unwrap_or(false)
    }
}

/// What an etcd call reported back to the loop.
#[derive(Debug)]
enum Reply {
    Gateway(Event),
    /// An acknowledgement put of `key` ended: `Some(value)` stored, `None` failed.
    Ack(Key, Option<Revision>),
}

/// One acknowledgement key: the newest value the gateway wants stored, the newest stored,
/// and whether a put is in flight.
#[derive(Debug, Default, Clone, Copy)]
struct Ack {
    wanted: Revision,
    stored: Revision,
    in_flight: bool,
}

/// Who waits for an answer.
#[derive(Debug)]
enum Caller {
    Prout(oneshot::Sender<Answer>),
    /// Wants the commit revision too.
    Ownership(oneshot::Sender<(Answer, Option<Revision>)>),
}

impl Caller {
    fn send(self, answer: Answer, revision: Option<Revision>) {
        let _ = match self {
            Caller::Prout(tx) => tx.send(answer).map_err(drop),
            Caller::Ownership(tx) => tx.send((answer, revision)).map_err(drop),
        };
    }
}

struct Driver {
    gw: Gateway,
    etcd: Arc<Etcd>,
    keys: LuKeys,
    clock: Arc<Fence>,
    answers: HashMap<Token, Caller>,
    /// Callers of [`Replica::drained_everywhere`] and the revision each waits for.
    drain_waiters: Vec<(Revision, oneshot::Sender<()>)>,
    next_token: Token,
    out: Arc<dyn Host>,
}

impl Driver {
    fn now(&self) -> Time {
        self.clock.now()
    }

    async fn run(mut self, mut cmds: mpsc::Receiver<Cmd>) {
        let (reply_tx, mut replies) = mpsc::unbounded_channel::<Reply>();
        // Newest acknowledgement wanted per key, and whether a put of it is in flight.
        let mut acks: HashMap<Key, Ack> = HashMap::new();
        let mut next_watch: i64 = etcd_rev(self.gw.watch_revision()).saturating_add(1);
        let mut watch: Option<etcd::Watch> = None;
        loop {
            self.flush(&reply_tx, &mut acks);
            if watch.is_none() {
                match self.etcd.watch(self.keys.prefix(), next_watch).await {
                    Ok(w) => watch = Some(w),
                    Err(e) => {
                        tracing::warn!(error = %e, "cluster watch: cannot start; retrying");
                        tokio::time::sleep(self.etcd.timeout()).await;
                        self.gw.handle_timeout(self.now());
                        continue;
                    }
                }
            }
            let timer = self.gw.poll_timeout().map(|t| {
                let wait = t.saturating_duration_since(self.now());
                tokio::time::Instant::now() + wait
            });
            let Some(w) = watch.as_mut() else { continue };
            tokio::select! {
                cmd = cmds.recv() => match cmd {
                    None => return,
                    Some(cmd) => self.command(cmd),
                },
                Some(reply) = replies.recv() => match reply {
                    Reply::Gateway(e) => self.gw.handle(self.now(), e),
                    Reply::Ack(key, stored) => {
                        if let Some(a) = acks.get_mut(&key) {
                            a.in_flight = false;
                            a.stored = a.stored.max(stored.unwrap_or(0));
                        }
                    }
                },
                batch = w.next() => match batch {
                    Ok((_, events)) => {
                        if let Some(last) = events.last() {
                            next_watch = next_watch.max(last.revision() + 1);
                        }
                        let mine: Vec<kv::Event> = events.iter().filter_map(|e| self.keys.event(e)).collect();
                        if !mine.is_empty() {
                            self.gw.handle(self.now(), Event::Watch(mine));
                        }
                    }
                    Err(EtcdError::Compacted(r)) => {
                        tracing::warn!(compacted = r, "cluster watch: history compacted past this replica; joining again from a snapshot");
                        for (_, tx) in self.answers.drain() {
                            tx.send(Answer::NotReady, None);
                        }
                        self.out.stale();
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cluster watch ended; watching again");
                        watch = None;
                    }
                },
                () = async {
                    match timer {
                        Some(t) => tokio::time::sleep_until(t).await,
                        None => std::future::pending().await,
                    }
                } => self.gw.handle_timeout(self.now()),
            }
        }
    }

    fn command(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Prout {
                it,
                service_action,
                scope,
                ty,
                param,
                answer,
            } => {
                let token = self.next_token;
                self.next_token += 1;
                let req = OutRequest {
                    service_action,
                    scope,
                    ty,
                    param: &param,
                };
                let submitted = self.gw.prout(self.now(), token, &it, req);
                self.submitted(token, submitted, Caller::Prout(answer));
            }
            Cmd::Ownership { op, answer } => {
                let token = self.next_token;
                self.next_token += 1;
                let submitted = self.gw.ownership(self.now(), token, op);
                self.submitted(token, submitted, Caller::Ownership(answer));
            }
            Cmd::WaitDrained(r, tx) => self.drain_waiters.push((r, tx)),
            Cmd::Drained(r) => self.gw.handle(self.now(), Event::Drained(r)),
            Cmd::MaySubmit(tx) => {
                let _ = tx.send(self.gw.may_submit(self.now()));
            }
            Cmd::State(tx) => {
                let _ = tx.send((self.gw.pr_revision(), self.gw.state().clone()));
            }
        }
    }

    fn submitted(&mut self, token: Token, submitted: Submit, answer: Caller) {
        match submitted {
            Submit::Immediate(a) => answer.send(a, None),
            Submit::Pending => {
                self.answers.insert(token, answer);
            }
        }
    }

    /// Carry out every output and request the gateway has queued. Outputs go first: a record's
    /// state and unit attentions are in the LU before `applied/<me>` says so.
    fn flush(&mut self, reply: &mpsc::UnboundedSender<Reply>, acks: &mut HashMap<Key, Ack>) {
        while let Some(o) = self.gw.poll_output() {
            match o {
                Output::Respond {
                    token,
                    answer,
                    revision,
                } => {
                    if let Some(tx) = self.answers.remove(&token) {
                        tx.send(answer, revision);
                    }
                }
                other => self.out.output(other),
            }
        }
        while let Some(r) = self.gw.poll_request() {
            self.request(r, reply, acks);
        }
        if !self.drain_waiters.is_empty() {
            let now = self.now();
            for (r, tx) in std::mem::take(&mut self.drain_waiters) {
                if self.gw.drained_everywhere(now, r) {
                    let _ = tx.send(());
                } else if !tx.is_closed() {
                    self.drain_waiters.push((r, tx));
                }
            }
        }
        // An acknowledgement newer than the stored one, with no put in flight, goes out with
        // the newest value (a failed put is retried this way).
        for (key, a) in acks.iter_mut() {
            if !a.in_flight && a.wanted > a.stored {
                a.in_flight = true;
                self.put_ack(*key, a.wanted, reply);
            }
        }
    }

    fn request(
        &mut self,
        r: Request,
        reply: &mpsc::UnboundedSender<Reply>,
        acks: &mut HashMap<Key, Ack>,
    ) {
        let me = self.gw.id();
        let etcd = self.etcd.clone();
        let reply = reply.clone();
        match r {
            Request::Txn {
                attempt,
                expect,
                lease,
                record,
            } => {
                let pr = self.keys.key(Key::Pr);
                let member = self.keys.key(Key::Member(me));
                let value = codec::encode_record(&record, &self.keys.serial);
                let lease = i64::try_from(lease).unwrap_or(0);
                tokio::spawn(async move {
                    let t = etcd
                        .txn(
                            &[
                                Compare::ModRevision(pr.clone(), etcd_rev(expect)),
                                Compare::Lease(member.clone(), lease),
                            ],
                            &[Op::Put {
                                key: pr.clone(),
                                value,
                                lease: 0,
                            }],
                            &[Op::Get(pr), Op::Get(member)],
                        )
                        .await;
                    let result = match t {
                        Ok(t) if t.succeeded => TxnResult::Committed(rev(t.revision)),
                        Ok(t) => TxnResult::Failed {
                            current: t
                                .gets
                                .first()
                                .cloned()
                                .flatten()
                                .map_or(0, |kv| rev(kv.mod_revision)),
                            member_alive: t
                                .gets
                                .get(1)
                                .cloned()
                                .flatten()
                                .is_some_and(|kv| kv.lease == lease),
                        },
                        // No answer: the gateway resends after its rpc_timeout.
                        Err(e) => {
                            tracing::debug!(error = %e, "cluster txn: no answer");
                            return;
                        }
                    };
                    let _ = reply.send(Reply::Gateway(Event::Txn { attempt, result }));
                });
            }
            Request::PutApplied(r) => {
                let a = acks.entry(Key::Applied(me)).or_default();
                a.wanted = a.wanted.max(r);
            }
            Request::PutDrained(r) => {
                let a = acks.entry(Key::Drained(me)).or_default();
                a.wanted = a.wanted.max(r);
            }
            Request::KeepAlive { sent_at } => {
                let lease = i64::try_from(self.gw.lease()).unwrap_or(0);
                tokio::spawn(async move {
                    let ok = match etcd.keep_alive(lease).await {
                        Ok(ttl) => ttl.is_some(),
                        Err(e) => {
                            tracing::debug!(error = %e, "cluster keep-alive: no answer");
                            return;
                        }
                    };
                    let _ = reply.send(Reply::Gateway(Event::KeepAlive { sent_at, ok }));
                });
            }
            Request::ReadHead => {
                let pr = self.keys.key(Key::Pr);
                tokio::spawn(async move {
                    if let Ok((head, _)) = etcd.get_prefix(&pr).await {
                        let _ = reply.send(Reply::Gateway(Event::Head(rev(head))));
                    }
                });
            }
        }
    }

    fn put_ack(&self, key: Key, value: Revision, reply: &mpsc::UnboundedSender<Reply>) {
        let etcd = self.etcd.clone();
        let reply = reply.clone();
        let bytes = self.keys.key(key);
        let lease = i64::try_from(self.gw.lease()).unwrap_or(0);
        tokio::spawn(async move {
            match etcd
                .put(&bytes, &codec::encode_revision(value), lease)
                .await
            {
                Ok(_) => {
                    let _ = reply.send(Reply::Ack(key, Some(value)));
                }
                Err(e) => {
                    tracing::debug!(error = %e, "cluster acknowledgement: put failed; retrying");
                    tokio::time::sleep(etcd.timeout()).await;
                    let _ = reply.send(Reply::Ack(key, None));
                }
            }
        });
    }
}
