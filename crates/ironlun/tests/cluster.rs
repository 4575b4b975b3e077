//! Cluster mode so far (issue 18). The etcd client (`ironlun::etcd`) against a real
//! three-member etcd 3.4 on loopback (the cluster state's store; scale-out.md §2.1–§2.5):
//! leases, compare-and-swap on a key's revision and its writer's lease, watches in revision
//! order, lease expiry as a DELETE, compaction, a member lost with quorum kept, and quorum lost
//! (calls fail, none hangs). A gateway's membership (`ironlun::cluster`): one name, one live
//! member; cut off from etcd it fences itself before etcd expires its lease, and rejoins with
//! a new lease once healed. Three gateways replicating one LU's reservations through etcd
//! (`ironlun::cluster::replica` driving `ironlun_cluster::gateway`): registrations through A,
//! the reservation through B, PREEMPT AND ABORT through C answered only after A drained the
//! aborted tasks, the same state on all three, unit attentions from every gateway for its own
//! ports. And `[cluster]` in a config: `ironlun check` shows it, `serve`
//! refuses it until the replicated state drives the LUs (never a node-local fail-open).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use ironlun::cluster::{JoinError, Membership};
use ironlun::config::{Cluster, Config};
use ironlun::etcd::{Compare, Etcd, EtcdError, Event, Op, Watch};
use ironlun_testkit::{EtcdCluster, Proxy, PROMPT};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

const CALL: Duration = Duration::from_secs(2);

fn client(c: &EtcdCluster) -> Etcd {
    Etcd::new(&c.endpoints(), CALL).unwrap()
}

/// Events from `w` until one at `revision` or later has been seen (hang guard [`PROMPT`]).
async fn events_until(w: &mut Watch, revision: i64) -> Vec<Event> {
    let mut got = Vec::new();
    while got.last().is_none_or(|e: &Event| e.revision() < revision) {
        let (_, batch) = tokio::time::timeout(PROMPT, w.next())
            .await
            .unwrap_or_else(|_| panic!("no event up to revision {revision}; got {got:?}"))
            .expect("watch");
        got.extend(batch);
    }
    got
}

/// The CAS a gateway commits a PR change with: the record's revision is still `r0` (0: no
/// record yet) and the gateway's member key still holds its lease.
async fn cas(e: &Etcd, r0: i64, lease: i64, value: &[u8]) -> ironlun::etcd::TxnOutcome {
    e.txn(
        &[
            Compare::ModRevision(b"/t/lu/pr".to_vec(), r0),
            Compare::Lease(b"/t/gw/a".to_vec(), lease),
        ],
        &[Op::Put {
            key: b"/t/lu/pr".to_vec(),
            value: value.to_vec(),
            lease: 0,
        }],
        &[Op::Get(b"/t/lu/pr".to_vec())],
    )
    .await
    .expect("txn")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_cas_watch_and_revoke() {
    let c = EtcdCluster::start(3);
    let e = client(&c);
    let lease = e.grant(5).await.unwrap();
    assert!(lease.id != 0 && lease.ttl == 5, "{lease:?}");
    let member_rev = e.put(b"/t/gw/a", b"{}", lease.id).await.unwrap();

    // First commit: the record is absent and the lease holds.
    let first = cas(&e, 0, lease.id, b"v1").await;
    assert!(first.succeeded, "{first:?}");
    assert!(first.revision > member_rev);
    // The same CAS again loses, and its else branch returns the record as it now is.
    let again = cas(&e, 0, lease.id, b"v2").await;
    assert!(!again.succeeded);
    let now = again.gets[0].clone().expect("record");
    assert_eq!(
        (now.value.as_slice(), now.mod_revision),
        (&b"v1"[..], first.revision)
    );
    // Right revision, wrong lease: loses too.
    let other = e.grant(5).await.unwrap();
    assert!(!cas(&e, first.revision, other.id, b"v2").await.succeeded);
    let second = cas(&e, first.revision, lease.id, b"v2").await;
    assert!(second.succeeded);

    // A watch from the start replays the history in revision order, then goes on live.
    let mut w = e.watch(b"/t/", 1).await.unwrap();
    let seen = events_until(&mut w, second.revision).await;
    let revisions: Vec<i64> = seen.iter().map(Event::revision).collect();
    assert_eq!(
        revisions,
        vec![member_rev, first.revision, second.revision],
        "{seen:?}"
    );
    assert!(matches!(&seen[0], Event::Put(kv) if kv.lease == lease.id && kv.key == b"/t/gw/a"));

    // Prefix read at a revision.
    let (rev, kvs) = e.get_prefix(b"/t/").await.unwrap();
    assert!(rev >= second.revision);
    assert_eq!(kvs.len(), 2);

    // Keep-alive renews; revoke deletes the member key at once (a DELETE in the watch), and
    // the lease is gone for keep-alive and for the CAS.
    assert_eq!(e.keep_alive(lease.id).await.unwrap(), Some(5));
    e.revoke(lease.id).await.unwrap();
    let gone = events_until(&mut w, second.revision + 1).await;
    assert!(
        matches!(&gone[..], [Event::Delete { key, .. }] if key == b"/t/gw/a"),
        "{gone:?}"
    );
    assert_eq!(e.keep_alive(lease.id).await.unwrap(), None);
    assert!(!cas(&e, second.revision, lease.id, b"v3").await.succeeded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unrenewed_lease_expires_as_a_delete() {
    let c = EtcdCluster::start(3);
    let e = client(&c);
    let lease = e.grant(2).await.unwrap();
    let put = e.put(b"/t/gw/a", b"{}", lease.id).await.unwrap();
    let mut w = e.watch(b"/t/gw/", put + 1).await.unwrap();
    // Nobody renews: etcd deletes the key when the lease expires (TTL plus the lessor's check).
    let gone = events_until(&mut w, put + 1).await;
    assert!(
        matches!(&gone[..], [Event::Delete { key, .. }] if key == b"/t/gw/a"),
        "{gone:?}"
    );
    assert_eq!(e.keep_alive(lease.id).await.unwrap(), None);
    assert_eq!(e.get(b"/t/gw/a").await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_from_compacted_history_is_refused() {
    let c = EtcdCluster::start(3);
    let e = client(&c);
    let mut last = 0;
    for i in 0..5u8 {
        last = e.put(b"/t/lu/pr", &[i], 0).await.unwrap();
    }
    e.compact(last).await.unwrap();
    // etcd confirms the watch, then cancels it with the compaction revision.
    let mut w = e.watch(b"/t/", 1).await.unwrap();
    match tokio::time::timeout(PROMPT, w.next())
        .await
        .expect("watch hung")
    {
        Err(EtcdError::Compacted(r)) => assert_eq!(r, last),
        other => panic!("watch from compacted history: {other:?}"),
    }
    // From the head it works.
    let mut w = e.watch(b"/t/", last + 1).await.unwrap();
    let r = e.put(b"/t/lu/pr", b"x", 0).await.unwrap();
    assert_eq!(events_until(&mut w, r).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_loss_with_quorum_kept_then_quorum_lost() {
    let mut c = EtcdCluster::start(3);
    let e = client(&c);
    let lease = e.grant(5).await.unwrap();
    e.put(b"/t/gw/a", b"{}", lease.id).await.unwrap();
    let first = cas(&e, 0, lease.id, b"v1").await;
    assert!(first.succeeded);

    // The first endpoint's member dies: calls go on through the others. If it was the leader,
    // a change sent during the election may time out with its outcome unknown; the caller
    // reads the key to learn it (a gateway matches its op id, scale-out.md §2.2 step 2).
    c.kill9(0);
    let mut tries = 0;
    let second_revision = loop {
        let t = e
            .txn(
                &[
                    Compare::ModRevision(b"/t/lu/pr".to_vec(), first.revision),
                    Compare::Lease(b"/t/gw/a".to_vec(), lease.id),
                ],
                &[Op::Put {
                    key: b"/t/lu/pr".to_vec(),
                    value: b"v2".to_vec(),
                    lease: 0,
                }],
                &[],
            )
            .await;
        tries += 1;
        assert!(tries < 20, "no commit after the member loss: {t:?}");
        match t {
            Ok(t) => {
                assert!(t.succeeded, "{t:?}");
                break t.revision;
            }
            Err(EtcdError::Unknown(_) | EtcdError::Unreachable(_) | EtcdError::Server { .. }) => {
                if let Ok(Some(kv)) = e.get(b"/t/lu/pr").await {
                    if kv.value == b"v2" {
                        break kv.mod_revision;
                    }
                }
            }
            Err(other) => panic!("txn: {other}"),
        }
    };
    assert_eq!(e.keep_alive(lease.id).await.unwrap(), Some(5));
    assert_eq!(
        e.get(b"/t/lu/pr").await.unwrap().unwrap().mod_revision,
        second_revision
    );

    // A second member stops: no quorum. Calls fail (never GOOD from a minority, never a hang:
    // each is bounded by the client's own deadline).
    c.signal(1, "STOP");
    let ka = tokio::time::timeout(PROMPT, e.keep_alive(lease.id))
        .await
        .expect("keep-alive hung without quorum");
    assert!(ka.is_err(), "keep-alive without quorum: {ka:?}");
    let read = tokio::time::timeout(PROMPT, e.get(b"/t/lu/pr"))
        .await
        .expect("read hung without quorum");
    assert!(read.is_err(), "linearizable read without quorum: {read:?}");
    let txn = tokio::time::timeout(
        PROMPT,
        e.txn(
            &[Compare::ModRevision(b"/t/lu/pr".to_vec(), second_revision)],
            &[Op::Put {
                key: b"/t/lu/pr".to_vec(),
                value: b"v3".to_vec(),
                lease: 0,
            }],
            &[],
        ),
    )
    .await
    .expect("txn hung without quorum");
    assert!(
        matches!(
            txn,
            Err(EtcdError::Unknown(_) | EtcdError::Server { .. } | EtcdError::Unreachable(_))
        ),
        "txn without quorum: {txn:?}"
    );

    // Quorum back: the store answers again, and holds what was committed (v3 may or may not
    // have been: its outcome was unknown, and a read tells).
    c.signal(1, "CONT");
    c.restart(0);
    let mut tries = 0;
    let now = loop {
        match e.get(b"/t/lu/pr").await {
            Ok(kv) => break kv.unwrap(),
            Err(err) => {
                tries += 1;
                assert!(tries < 100, "no answer after quorum came back: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert!(
        now.value == b"v2" || now.value == b"v3",
        "{:?}",
        String::from_utf8_lossy(&now.value)
    );
    assert!(now.mod_revision >= second_revision);
}

#[test]
fn a_cluster_config_is_checked_and_serve_without_etcd_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    // Nothing listens on this port: the daemon must not serve without its cluster state.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    std::fs::write(
        &path,
        format!(
            "[[target]]\nname = \"iqn.2026-11.io.ironlun:a\"\n[[target.lun]]\nid = 0\nbackstore = \"uring\"\npath = \"l.img\"\ndirect = true\nsize = 4096\n\
             [cluster]\nname = \"gw-a\"\ncluster = \"lab\"\nendpoints = [\"{dead}\"]\ngateways = [{{ name = \"gw-a\", tpgts = [1] }}]\n"
        ),
    )
    .unwrap();
    let bin = env!("CARGO_BIN_EXE_ironlun");
    let check = Command::new(bin)
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success(), "{out}");
    assert!(
        out.contains(&format!("cluster lab gateway gw-a etcd {dead}")),
        "{out}"
    );
    let started = Instant::now();
    let serve = Command::new(bin)
        .args(["serve", "--config"])
        .arg(&path)
        .args(["--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&serve.stderr);
    assert!(!serve.status.success(), "{err}");
    assert!(err.contains("cluster") && err.contains("etcd"), "{err}");
    assert!(
        started.elapsed() < PROMPT,
        "did not hang: {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cut_off_gets_errors_not_hangs_and_recovers() {
    let c = EtcdCluster::start(3);
    let proxies: Vec<Proxy> = c
        .endpoints()
        .iter()
        .map(|e| Proxy::start(e.parse().unwrap()))
        .collect();
    let through: Vec<String> = proxies.iter().map(|p| p.addr().to_string()).collect();
    let e = Etcd::new(&through, CALL).unwrap();
    let lease = e.grant(5).await.unwrap();
    assert_eq!(e.keep_alive(lease.id).await.unwrap(), Some(5));
    // The link dies (every path to etcd black-holed): calls fail at their deadline.
    for p in &proxies {
        p.block();
    }
    let ka = tokio::time::timeout(PROMPT * 2, e.keep_alive(lease.id))
        .await
        .expect("keep-alive hung behind a dead link");
    assert!(matches!(ka, Err(EtcdError::Unreachable(_))), "{ka:?}");
    let put = tokio::time::timeout(PROMPT * 2, e.put(b"/t/x", b"1", 0))
        .await
        .expect("put hung behind a dead link");
    assert!(matches!(put, Err(EtcdError::Unknown(_))), "{put:?}");
    // Healed: the same client works again, and the lease (5 s) may or may not have lapsed.
    for p in &proxies {
        p.unblock();
    }
    let mut tries = 0;
    while e.get(b"/t/x").await.is_err() {
        tries += 1;
        assert!(tries < 100, "no answer after the link came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `[cluster]` for gateway `name` on `endpoints`: T = 3 s, renewals every 600 ms, m = 0.5 s.
fn cluster_config(name: &str, endpoints: &[String]) -> Cluster {
    let list: Vec<String> = endpoints.iter().map(|e| format!("{e:?}")).collect();
    let text = format!(
        "[[target]]\nname = \"iqn.2026-11.io.ironlun:a\"\n[[target.lun]]\nid = 0\nbackstore = \"uring\"\npath = \"l.img\"\ndirect = true\nsize = 4096\n\
         [cluster]\nname = \"{name}\"\ncluster = \"t\"\nendpoints = [{}]\nlease_ttl_ms = 3000\n\
         keepalive_interval_ms = 600\nmargin_ms = 500\nlock_delay_ms = 1000\netcd_timeout_ms = 400\n\
         gateways = [{{ name = \"{name}\", tpgts = [1] }}]\n",
        list.join(", ")
    );
    Config::parse("t.toml", &text, None, None)
        .unwrap()
        .cluster
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_cut_off_fences_itself_before_its_lease_expires_then_rejoins() {
    let c = EtcdCluster::start(3);
    let proxies: Vec<Proxy> = c
        .endpoints()
        .iter()
        .map(|e| Proxy::start(e.parse().unwrap()))
        .collect();
    let through: Vec<String> = proxies.iter().map(|p| p.addr().to_string()).collect();
    let cfg = cluster_config("gw-a", &through);
    let etcd = Arc::new(Etcd::new(&through, cfg.etcd_timeout).unwrap());
    let m = Arc::new(
        Membership::join(etcd, &cfg, b"{\"tpgts\":[1]}".to_vec())
            .await
            .unwrap(),
    );
    assert!(m.fence().may_submit(), "joined: the gate is open");

    // The name is taken while gw-a lives.
    let direct = Arc::new(Etcd::new(&c.endpoints(), CALL).unwrap());
    match Membership::join(
        direct.clone(),
        &cluster_config("gw-a", &c.endpoints()),
        b"{}".to_vec(),
    )
    .await
    {
        Err(JoinError::NameInUse(name, lease)) => {
            assert_eq!((name.as_str(), lease), ("gw-a", m.lease()))
        }
        other => panic!("second gw-a: {other:?}"),
    }

    // An observer (another gateway's view) watches the member keys.
    let (head, members) = direct.get_prefix(b"/ironlun/v1/t/gw/").await.unwrap();
    assert_eq!(members.len(), 1);
    let mut w = direct.watch(b"/ironlun/v1/t/gw/", head + 1).await.unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let runner = {
        let m = m.clone();
        tokio::spawn(async move {
            m.run("gw-a", async {
                let _ = stop_rx.await;
            })
            .await
        })
    };

    // Cut gw-a off. etcd expires its lease; the observer sees the DELETE. By then gw-a's gate
    // has closed, and its deadline lies before the moment the DELETE was seen.
    let old_lease = m.lease();
    for p in &proxies {
        p.block();
    }
    let gone = events_until(&mut w, head + 1).await;
    let seen = Instant::now();
    assert!(
        matches!(&gone[..], [Event::Delete { key, .. }] if key == m.key()),
        "{gone:?}"
    );
    let fence = m.fence();
    assert!(
        !fence.may_submit(),
        "gw-a still submits after its lease expired"
    );
    let deadline = fence.deadline().expect("a deadline from the last renewal");
    assert!(
        deadline < seen,
        "deadline {deadline:?} not before the DELETE at {seen:?}"
    );

    // Healed: the old lease is gone, so gw-a joins again with a new one and reopens the gate.
    for p in &proxies {
        p.unblock();
    }
    let back = events_until(&mut w, head + 2).await;
    assert!(
        matches!(back.last(), Some(Event::Put(kv)) if kv.key == m.key() && kv.lease != old_lease),
        "{back:?}"
    );
    let mut polls = 0;
    while !fence.may_submit() {
        polls += 1;
        assert!(polls < 1000, "gate never reopened");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_ne!(m.lease(), old_lease);

    let _ = stop_tx.send(());
    runner.await.unwrap();
    m.leave().await.unwrap();
    assert!(!fence.may_submit());
    assert_eq!(
        direct.get(m.key()).await.unwrap(),
        None,
        "leave removes the member key"
    );
}

mod replicas {
    use super::*;
    use ironlun::cluster::replica::{LuKeys, Replica};
    use ironlun_cluster::gateway::{Answer, Gateway, GatewayConfig, Output};
    use ironlun_cluster::kv::Key;
    use ironlun_cluster::lease::{LeaseSettings, Timing};
    use ironlun_cluster::op::param_list;
    use ironlun_cluster::GatewayId;
    use ironlun_scsi::pr::{sa, InitiatorPort, ItNexus, OutRequest};
    use ironlun_scsi::sense::SenseReason;
    use tokio::sync::mpsc::UnboundedReceiver;

    const SERIAL: &str = "lu-0-serial";

    fn timing() -> Timing {
        Timing::new(LeaseSettings {
            ttl: Duration::from_secs(3),
            rho_ppm: 10_000,
            margin: Duration::from_millis(500),
            lock_delay: Duration::from_secs(1),
            keepalive_interval: Duration::from_millis(600),
        })
        .unwrap()
    }

    /// Gateway `id` serving port `id`, joined to `endpoints`; its replica and outputs.
    async fn gateway(
        endpoints: &[String],
        id: u32,
    ) -> (Membership, Replica, UnboundedReceiver<Output>) {
        let etcd = Arc::new(Etcd::new(endpoints, Duration::from_millis(500)).unwrap());
        let keys = LuKeys::new("/ironlun/v1/t/", SERIAL);
        let (m, created, sent) = Membership::join_as(
            etcd.clone(),
            timing(),
            keys.key(Key::Member(GatewayId(id))),
            b"{}".to_vec(),
            &format!("gw{id}"),
        )
        .await
        .unwrap();
        let cfg = GatewayConfig {
            id: GatewayId(id),
            ports: vec![u16::try_from(id).unwrap()],
            cluster_ports: vec![1, 2, 3],
            timing: timing(),
            rpc_timeout: Duration::from_millis(800),
            max_tries: 16,
        };
        let gw = Gateway::new(
            cfg,
            u64::try_from(m.lease()).unwrap(),
            sent,
            u64::try_from(created).unwrap(),
        );
        let (r, out) = Replica::spawn(gw, etcd, keys, m.fence());
        (m, r, out)
    }

    fn nexus(host: &str, port: u16) -> ItNexus {
        ItNexus {
            initiator: InitiatorPort::new(host, [0x40, 0, 0, 0, 0, 1]),
            rtpi: port,
        }
    }

    async fn prout(r: &Replica, it: &ItNexus, service_action: u8, ty: u8, p: Vec<u8>) -> Answer {
        tokio::time::timeout(
            PROMPT * 2,
            r.prout(
                it,
                OutRequest {
                    service_action,
                    scope: 0,
                    ty,
                    param: &p,
                },
            ),
        )
        .await
        .expect("PR OUT hung")
    }

    const H1: &str = "iqn.2026-12.io.test:h1";
    const H2: &str = "iqn.2026-12.io.test:h2";
    const ALL_TG_PT: u8 = 0x04;
    const WERO: u8 = 5;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn three_gateways_one_reservation_state() {
        let c = EtcdCluster::start(3);
        let e = c.endpoints();
        let (_ma, a, mut out_a) = gateway(&e, 1).await;
        let (_mb, b, out_b) = gateway(&e, 2).await;
        let (_mc, cc, out_c) = gateway(&e, 3).await;

        // Registrations through A (all target ports), the reservation through B.
        assert_eq!(
            prout(
                &a,
                &nexus(H1, 1),
                sa::REGISTER,
                0,
                param_list(0, 0x11, ALL_TG_PT)
            )
            .await,
            Answer::Good
        );
        assert_eq!(
            prout(
                &a,
                &nexus(H2, 1),
                sa::REGISTER,
                0,
                param_list(0, 0x22, ALL_TG_PT)
            )
            .await,
            Answer::Good
        );
        assert_eq!(
            prout(&b, &nexus(H1, 2), sa::RESERVE, WERO, param_list(0x11, 0, 0)).await,
            Answer::Good
        );
        // A conflict is decided from B's replica without the store (H2 does not hold it).
        assert!(matches!(
            prout(&b, &nexus(H2, 2), sa::RELEASE, WERO, param_list(0x22, 0, 0)).await,
            Answer::Good | Answer::Failed(_)
        ));

        // A stands for a gateway with H1's writes in flight: it drains the tasks the preempt
        // aborts only after 300 ms, and notes when.
        let drained_at = Arc::new(std::sync::Mutex::new(None::<Instant>));
        let host_a = {
            let (a, drained_at) = (a.clone(), drained_at.clone());
            tokio::spawn(async move {
                let mut seen = Vec::new();
                while let Some(o) = out_a.recv().await {
                    if let Output::AbortTasks {
                        registrations,
                        revision,
                        ..
                    } = &o
                    {
                        assert!(
                            registrations.iter().all(|r| r.name == H1),
                            "{registrations:?}"
                        );
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        *drained_at.lock().unwrap() = Some(Instant::now());
                        a.drained(*revision).await;
                    }
                    seen.push(o);
                    if seen.iter().any(|o| {
                        matches!(
                            o,
                            Output::Ua {
                                reason: SenseReason::RegistrationsPreempted,
                                ..
                            }
                        )
                    }) && drained_at.lock().unwrap().is_some()
                    {
                        return seen;
                    }
                }
                seen
            })
        };

        // B and C have no tasks of H1 in flight: they report the abort drained at once (every
        // gateway serving H1's all-ports registration is asked to abort its local tasks).
        let idle_host = |r: Replica, mut out: UnboundedReceiver<Output>| {
            tokio::spawn(async move {
                let mut seen = Vec::new();
                while let Ok(Some(o)) =
                    tokio::time::timeout(Duration::from_secs(1), out.recv()).await
                {
                    if let Output::AbortTasks { revision, .. } = &o {
                        r.drained(*revision).await;
                    }
                    seen.push(o);
                }
                seen
            })
        };
        let host_b = idle_host(b.clone(), out_b);
        let host_c = idle_host(cc.clone(), out_c);

        // PREEMPT AND ABORT through C: GOOD only after A's drain.
        let sent = Instant::now();
        let answer = prout(
            &cc,
            &nexus(H2, 3),
            sa::PREEMPT_AND_ABORT,
            WERO,
            param_list(0x22, 0x11, 0),
        )
        .await;
        let good_at = Instant::now();
        assert_eq!(answer, Answer::Good);
        let drained = drained_at
            .lock()
            .unwrap()
            .expect("A was never asked to abort H1's tasks");
        assert!(
            drained > sent && drained < good_at,
            "GOOD came before A's aborted tasks drained"
        );

        // One state everywhere.
        let mut states = Vec::new();
        for r in [&a, &b, &cc] {
            let mut polls = 0;
            let (rev, st) = loop {
                let (rev, st) = r.state().await.unwrap();
                if states.first().is_none_or(|(r0, _): &(u64, _)| rev >= *r0) {
                    break (rev, st);
                }
                polls += 1;
                assert!(polls < 1000, "replica behind");
                tokio::time::sleep(Duration::from_millis(5)).await;
            };
            states.push((rev, st));
        }
        assert!(
            states.iter().all(|s| s == &states[0]),
            "replicas differ: {states:#?}"
        );
        let st = &states[0].1;
        assert_eq!(st.registrations().len(), 1, "H1 preempted: {st:?}");
        assert_eq!(st.registrations()[0].name, H2);
        assert!(st.reservation().is_some());

        // Unit attentions: every gateway raises REGISTRATIONS PREEMPTED for H1's registration
        // (all target ports: its nexuses may be on any gateway); none for H2.
        let seen_a = tokio::time::timeout(PROMPT, host_a)
            .await
            .expect("A's outputs")
            .unwrap();
        let seen_b = tokio::time::timeout(PROMPT, host_b)
            .await
            .expect("B's outputs")
            .unwrap();
        let seen_c = tokio::time::timeout(PROMPT, host_c)
            .await
            .expect("C's outputs")
            .unwrap();
        for (name, outs) in [("A", seen_a), ("B", seen_b), ("C", seen_c)] {
            let uas: Vec<_> = outs
                .iter()
                .filter_map(|o| match o {
                    Output::Ua {
                        registration,
                        reason: SenseReason::RegistrationsPreempted,
                        ..
                    } => Some(registration.name.clone()),
                    _ => None,
                })
                .collect();
            assert_eq!(uas, vec![H1.to_string()], "gateway {name}: {outs:?}");
        }
    }
}
