//! Portals, connections and graceful shutdown: the only place that knows sockets.
//!
//! Each accepted connection gets one task that owns the sans-IO [`Connection`], reads into a
//! `BytesMut`, and writes transmits with vectored writes. A SCSI command whose I/O is cheap
//! (see [`crate::target`]: RAM, small page-cached transfers) runs to completion on the
//! connection's task as soon as it is framed; the others get one task each, so commands of a
//! connection run concurrently and complete in any order. Everything that completed while a
//! batch of received PDUs was handled goes out in one vectored write.
//!
//! Connections live on I/O threads ([`Shard`]s), each a current-thread runtime, assigned round
//! robin at accept: a connection's task never migrates, so a wake-up touches one thread. (On the
//! work-stealing runtime every wake-up also unparked an idle worker to look for work; on
//! loopback with two cores that halved 4 KiB QD32 IOPS.) There are as many shards as the
//! calling runtime has workers.

use crate::config::Config;
use crate::target::{Nexus, Registry, Started};
use bytes::{Bytes, BytesMut};
use ironlun_iscsi::acl::SessionLimits;
use ironlun_iscsi::connection::{Connection, Event, PortalConfig, ScsiCompletion, TargetInfo};
use std::io::IoSlice;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tracing::Instrument;

/// How long shutdown waits for in-flight commands before closing connections anyway.
const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Receive buffer growth step.
const READ_CHUNK: usize = 256 * 1024;
/// Most iovecs handed to one `writev` (Linux IOV_MAX is 1024).
const MAX_IOV: usize = 512;

/// A bound, not yet serving, daemon.
pub struct Server {
    listeners: Vec<(TcpListener, Arc<PortalConfig>)>,
    registry: Arc<Registry>,
}

impl Server {
    /// Open every backend and bind every portal.
    pub async fn bind(cfg: &Config) -> Result<Server, String> {
        let registry = Arc::new(Registry::build(cfg)?);
        let mut bound = Vec::new();
        for p in &cfg.portals {
            let l = TcpListener::bind(p.listen).await.map_err(|e| format!("bind {}: {e}", p.listen))?;
            let addr = l.local_addr().map_err(|e| e.to_string())?;
            bound.push((l, addr, p.tpgt));
        }
        // One set of session counters for every portal: limits are per target and daemon-wide.
        let sessions = Arc::new(cfg.targets.iter().fold(
            SessionLimits::new(cfg.limits.max_sessions),
            |limits, t| limits.with_target(&t.name, t.max_sessions),
        ));
        let mut listeners = Vec::new();
        for (l, addr, tpgt) in bound {
            let targets = cfg
                .targets
                .iter()
                .map(|t| TargetInfo {
                    name: t.name.clone(),
                    alias: t.alias.clone(),
                    addresses: vec![format!("{},{}", fmt_addr(addr), tpgt)],
                    portal_group_tag: tpgt,
                    acl: t.acl.clone(),
                })
                .collect();
            let pc = PortalConfig {
                targets,
                offers: cfg.negotiation.offers.clone(),
                limits: Default::default(),
                portal_group_tag: tpgt,
                cmd_window: cfg.negotiation.cmd_window,
                sessions: sessions.clone(),
            };
            listeners.push((l, Arc::new(pc)));
        }
        Ok(Server { listeners, registry })
    }

    /// The addresses actually bound (port 0 resolved).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners.iter().filter_map(|(l, _)| l.local_addr().ok()).collect()
    }

    /// Serve until `shutdown` flips to true; then stop accepting, let in-flight commands finish,
    /// close connections and flush every backend.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut conns = JoinSet::new();
        let mut accepts = JoinSet::new();
        let (conn_tx, mut conn_rx) = mpsc::unbounded_channel::<(TcpStream, SocketAddr, Arc<PortalConfig>)>();
        for (l, pc) in self.listeners {
            let tx = conn_tx.clone();
            let mut sd = shutdown.clone();
            accepts.spawn(async move {
                loop {
                    tokio::select! {
                        r = l.accept() => match r {
                            Ok((s, peer)) => { if tx.send((s, peer, pc.clone())).is_err() { return; } }
                            Err(e) => {
                                tracing::warn!(error = %e, "accept failed");
                                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                            }
                        },
                        _ = sd.changed() => return,
                    }
                }
            });
        }
        drop(conn_tx);
        let shards = Shard::start_many(tokio::runtime::Handle::current().metrics().num_workers());
        let mut next_shard = 0usize;
        loop {
            tokio::select! {
                Some((s, peer, pc)) = conn_rx.recv() => {
                    let reg = self.registry.clone();
                    let sd = shutdown.clone();
                    let span = tracing::info_span!("conn", %peer);
                    let serve = move |s: TcpStream| async move {
                        if let Err(e) = serve_connection(s, pc, reg, sd).await {
                            tracing::debug!(error = %e, "connection ended with error");
                        }
                    };
                    next_shard = next_shard.wrapping_add(1);
                    match shards.get(next_shard % shards.len().max(1)) {
                        Some(shard) => match s.into_std() {
                            // Re-registered with the shard's reactor inside the task.
                            Ok(std) => {
                                conns.spawn_on(
                                    async move {
                                        match TcpStream::from_std(std) {
                                            Ok(s) => serve(s).await,
                                            Err(e) => tracing::warn!(error = %e, "cannot move connection to its I/O thread"),
                                        }
                                    }
                                    .instrument(span),
                                    &shard.handle,
                                );
                            }
                            Err(e) => tracing::warn!(error = %e, "cannot move connection to its I/O thread"),
                        },
                        None => {
                            conns.spawn(serve(s).instrument(span));
                        }
                    }
                }
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
                _ = shutdown.changed() => break,
            }
        }
        tracing::info!("shutting down: draining {} connection(s)", conns.len());
        accepts.shutdown().await;
        let drain = async { while conns.join_next().await.is_some() {} };
        if tokio::time::timeout(DRAIN_TIMEOUT + std::time::Duration::from_secs(2), drain).await.is_err() {
            tracing::warn!("connections did not close in time; aborting them");
            conns.shutdown().await;
        }
        for shard in shards {
            shard.stop();
        }
        let reg = self.registry.clone();
        let _ = tokio::task::spawn_blocking(move || reg.flush_all()).await;
        tracing::info!("stopped");
    }
}

/// One I/O thread: a current-thread runtime running the connections placed on it (and its own
/// blocking pool for their large I/O).
struct Shard {
    handle: tokio::runtime::Handle,
    stop: tokio::sync::oneshot::Sender<()>,
}

impl Shard {
    /// Start `n` shards (fewer if threads cannot be created; none means connections stay on
    /// the calling runtime).
    fn start_many(n: usize) -> Vec<Shard> {
        (0..n.max(1))
            .filter_map(|i| match Shard::start(i) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start I/O thread");
                    None
                }
            })
            .collect()
    }

    fn start(index: usize) -> std::io::Result<Shard> {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        // The runtime is built and dropped on its own thread (dropping one inside async code panics).
        std::thread::Builder::new().name(format!("ironlun-io-{index}")).spawn(move || {
            match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => {
                    let _ = ready_tx.send(Ok(rt.handle().clone()));
                    // Runs until stopped; dropping the runtime then cancels what is left on it.
                    rt.block_on(async {
                        let _ = stopped.await;
                    });
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            }
        })?;
        // Waits only for the runtime to be built (microseconds, once per shard at start).
        let handle = ready_rx.recv().map_err(|_| std::io::Error::other("I/O thread exited"))??;
        Ok(Shard { handle, stop })
    }

    /// Let the thread end (its connections are already closed or abandoned).
    fn stop(self) {
        let _ = self.stop.send(());
    }
}

fn fmt_addr(a: SocketAddr) -> String {
    match a {
        SocketAddr::V4(v) => v.to_string(),
        SocketAddr::V6(v) => format!("[{}]:{}", v.ip(), v.port()),
    }
}

/// Write every piece, using vectored writes (header and payload `Bytes` are not copied).
async fn write_all_vectored<W: AsyncWrite + Unpin>(w: &mut W, pieces: &mut Vec<Bytes>) -> std::io::Result<()> {
    let mut start = 0;
    while start < pieces.len() {
        let slices: Vec<IoSlice<'_>> =
            pieces.get(start..).unwrap_or(&[]).iter().take(MAX_IOV).map(|b| IoSlice::new(b)).collect();
        let mut n = w.write_vectored(&slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        drop(slices);
        while n > 0 {
            let Some(p) = pieces.get_mut(start) else { break };
            if n >= p.len() {
                n -= p.len();
                start += 1;
            } else {
                let _ = p.split_to(n);
                n = 0;
            }
        }
        while pieces.get(start).is_some_and(Bytes::is_empty) {
            start += 1;
        }
    }
    pieces.clear();
    Ok(())
}

fn complete(conn: &mut Connection, (itt, c, spdtl): (u32, ScsiCompletion, Option<u32>)) {
    match spdtl {
        Some(n) if n > 0 => conn.complete_command_with_spdtl(itt, c, n),
        _ => conn.complete_command(itt, c),
    }
}

async fn serve_connection(
    stream: TcpStream,
    portal: Arc<PortalConfig>,
    registry: Arc<Registry>,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let (mut rd, mut wr) = stream.into_split();
    let mut conn = Connection::new_with_tsih(portal, registry.new_tsih(), Instant::now());
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(u32, ScsiCompletion, Option<u32>)>();
    let mut nexus: Option<Arc<Nexus>> = None;
    let mut inflight: usize = 0;
    let mut draining = *shutdown.borrow();
    let mut drain_deadline: Option<tokio::time::Instant> = None;
    let mut out: Vec<Bytes> = Vec::new();

    loop {
        while let Some(ev) = conn.poll_event() {
            match ev {
                Event::LoggedIn(info) => {
                    tracing::info!(initiator = %info.initiator_name, target = ?info.target_name, tsih = info.tsih, "login");
                    if let Some(t) = info.target_name.as_deref().and_then(|n| registry.target(n)) {
                        nexus = Some(Arc::new(Nexus::attach_for(t, registry.new_nexus(), &info.initiator_name)));
                    }
                }
                Event::Command(cmd) => match &nexus {
                    Some(n) => match n.start(cmd.lun, cmd.cdb, cmd.data_out) {
                        Started::Done(c, spdtl) => complete(&mut conn, (cmd.itt, c, spdtl)),
                        Started::Pending(p) => {
                            let tx = done_tx.clone();
                            inflight += 1;
                            tokio::spawn(async move {
                                let (c, spdtl) = p.finish().await;
                                let _ = tx.send((cmd.itt, c, spdtl));
                            });
                        }
                    },
                    None => {
                        let c = ironlun_scsi::lu::no_such_lun(&cmd.cdb);
                        let c = ScsiCompletion { status: c.status, sense: c.sense, data_in: c.data };
                        complete(&mut conn, (cmd.itt, c, None));
                    }
                },
                Event::TaskMgmt(t) => {
                    let resp = match &nexus {
                        Some(n) => n.task_mgmt(t.function, t.lun),
                        None => ironlun_iscsi::pdu::TmfResponse::FunctionRejected,
                    };
                    conn.complete_tmf(t.itt, resp);
                }
                Event::Aborted(itts) => {
                    tracing::debug!(?itts, "tasks aborted");
                }
            }
        }
        // Coalesce everything ready into one vectored write.
        conn.poll_transmit_into(&mut out);
        if !out.is_empty() {
            write_all_vectored(&mut wr, &mut out).await?;
        }
        if conn.is_closed().is_some() {
            break;
        }
        if draining && inflight == 0 {
            break;
        }
        let timeout = conn.poll_timeout().map(tokio::time::Instant::from_std);
        if buf.capacity() - buf.len() < READ_CHUNK / 4 {
            buf.reserve(READ_CHUNK);
        }
        tokio::select! {
            r = rd.read_buf(&mut buf), if !draining => {
                if r? == 0 {
                    break;
                }
                conn.receive(&mut buf, Instant::now());
            }
            Some(done) = done_rx.recv() => {
                inflight = inflight.saturating_sub(1);
                complete(&mut conn, done);
                // Coalesce: every completion already waiting goes out in the same write.
                while let Ok(done) = done_rx.try_recv() {
                    inflight = inflight.saturating_sub(1);
                    complete(&mut conn, done);
                }
            }
            _ = async { match timeout { Some(t) => tokio::time::sleep_until(t).await, None => std::future::pending().await } } => {
                conn.handle_timeout(Instant::now());
            }
            _ = shutdown.changed(), if !draining => {
                draining = true;
                drain_deadline = Some(tokio::time::Instant::now() + DRAIN_TIMEOUT);
            }
            _ = async { match drain_deadline { Some(t) => tokio::time::sleep_until(t).await, None => std::future::pending().await } } => {
                tracing::warn!(inflight, "drain timeout; closing connection with commands in flight");
                break;
            }
        }
    }
    // Commands still running finish on their own; their results are dropped with `done_rx`.
    let _ = wr.shutdown().await;
    drop(nexus);
    Ok(())
}
