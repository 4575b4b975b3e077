//! Tier 7, group 5 (issue 16): a two-node Pacemaker cluster fenced through ironlun.
//!
//! Two guests, node1 and node2, each logged in to the same LU through its own initiator name
//! (slirp, eth0), run Corosync 3 and Pacemaker 2.1 (no systemd: `corosync -f` and `pacemakerd`
//! started by a step) over a link the test makes between them: QEMU UDP sockets on the host's
//! loopback, eth1 in the guests (192.168.77.1 and .2). Settings:
//! `initiator-tests/guest/corosync.conf` and `initiator-tests/guest/cluster.crm` (fence_scsi
//! with unfencing, one device per victim with a fencing delay for node2, an ext4 Filesystem
//! resource preferring node1).
//!
//! 1. Both nodes unfence themselves (two keys registered, Write Exclusive - Registrants Only)
//!    and the file system runs on node1, which writes a file.
//! 2. node1's corosync link is cut (`ip link set eth1 down` in node1). node2 fences node1
//!    with fence_scsi (PREEMPT AND ABORT of node1's key) and mounts the file system: the file
//!    is intact and node2 writes. The failover time (cut to mounted on node2) is printed.
//! 3. node1, which still has the file system mounted and tries to fence node2 after its delay,
//!    is refused: a WRITE through its nexus ends RESERVATION CONFLICT, its file system writes
//!    fail, its fence_scsi attempt fails and node2's key stays registered; the daemon shows
//!    node2 as the only registrant and holder, and its event log node2's PREEMPT AND ABORT.
//! 4. node2 stops the resource and `e2fsck -fn` finds the file system clean.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use ironlun_initiator_tests::linux_guest::{artefact_dir, save_daemon_log, Guest, GuestSpec};
use ironlun_testkit::Daemon;
use std::time::{Duration, Instant};

const TARGET: &str = "iqn.2026-11.io.ironlun:cluster";

const CONFIG: &str = r#"
[[portal]]
listen = "127.0.0.1:0"
tpgt = 1

[[target]]
name = "iqn.2026-11.io.ironlun:cluster"

[[target.lun]]
id = 0
backstore = "file"
path = "cluster.img"
size = "256MiB"
"#;

/// The guests' `/etc/corosync/corosync.conf`; README quotes it.
const COROSYNC_CONF: &str = include_str!("../guest/corosync.conf");
/// The Pacemaker configuration (`crm configure load update`); README quotes it.
const CLUSTER_CRM: &str = include_str!("../guest/cluster.crm");

const S: Duration = Duration::from_secs(1);

/// A free UDP port on 127.0.0.1 (bound and released; QEMU binds it right after).
fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Guest `n` (1 or 2) of the cluster: its end of the UDP link is `ports[n-1]`, the peer's the
/// other one.
fn spec(n: u8, ports: (u16, u16)) -> (String, String, Vec<String>, String) {
    let (local, remote) = if n == 1 { ports } else { (ports.1, ports.0) };
    let extra = vec![
        "-netdev".to_string(),
        format!("socket,id=c0,udp=127.0.0.1:{remote},localaddr=127.0.0.1:{local}"),
        "-device".to_string(),
        format!("virtio-net-pci,netdev=c0,mac=52:54:00:00:77:0{n}"),
    ];
    (
        format!("node{n}"),
        format!("iqn.2026-11.test:node{n}"),
        extra,
        format!("192.168.77.{n}/24"),
    )
}

#[test]
fn pacemaker_fences_a_cut_off_node_through_fence_scsi_and_moves_its_file_system() {
    let t0 = Instant::now();
    let group = artefact_dir("linux_cluster");
    let d = Daemon::release().config(CONFIG).portals().start();
    let port = d.addr.port().to_string();
    let link = (free_udp_port(), free_udp_port());
    let (s1, s2) = (spec(1, link), spec(2, link));
    let mut nodes: Vec<Guest> = [&s1, &s2]
        .iter()
        .map(|(name, iqn, extra, ip)| {
            Guest::start(
                &group,
                &GuestSpec {
                    name,
                    initiator: iqn,
                    mem_mib: 2048,
                    extra: extra.clone(),
                    eth1: Some(ip),
                },
            )
        })
        .collect();
    for g in &mut nodes {
        g.wait_ready(240 * S);
        std::fs::write(g.dir.join("share/corosync.conf"), COROSYNC_CONF).unwrap();
        std::fs::write(g.dir.join("share/cluster.crm"), CLUSTER_CRM).unwrap();
    }
    let env = format!(
        "T={TARGET}; P={port}; D=/dev/disk/by-path/ip-$HOST:$P-iscsi-$T-lun-0
# located RSC NODE: crm_resource places RSC on NODE.
located() {{ crm_resource --locate --resource $1 2>/dev/null | grep -q \"is running on: $2\"; }}
"
    );

    // Corosync on both nodes, then one membership of two.
    for g in &mut nodes {
        g.step(
            "corosync",
            60 * S,
            r#"cp /host/corosync.conf /etc/corosync/corosync.conf
mkdir -p /var/log/corosync /var/log/pacemaker /run/cluster /run/crm
setsid corosync -f >/host/corosync.out 2>&1 </dev/null &
wait_for 30 corosync-cfgtool -s
ip -br addr show eth1"#,
        );
    }
    for g in &mut nodes {
        g.step(
            "membership-of-two",
            120 * S,
            r#"wait_for 90 sh -c "corosync-quorumtool -s | grep -q 'Total votes: *2'"
corosync-quorumtool -s"#,
        );
    }
    // Pacemaker and the iSCSI session on both.
    for g in &mut nodes {
        g.step(
            "pacemaker-and-login",
            120 * S,
            &format!(
                r#"{env}chown hacluster:haclient /var/log/pacemaker /run/crm
setsid env PCMK_logfile=/host/pacemaker.log pacemakerd >/host/pacemakerd.out 2>&1 </dev/null &
start_iscsid
node_new $T $P 1
iscsiadm -m node -T $T -p $HOST:$P --login
wait_disk $T $P"#
            ),
        );
    }
    let (n1, rest) = nodes.split_at_mut(1);
    let (node1, node2) = (&mut n1[0], &mut rest[0]);
    node1.step(
        "configure",
        240 * S,
        &format!(
            r#"{env}wait_for 120 sh -c "crm_mon -1 | grep -q 'Online: \[ node1 node2 \]'"
mkfs.ext4 -q -F $D
sed "s|@DEVICE@|$D|g" /host/cluster.crm >/tmp/cluster.crm
crm configure load update /tmp/cluster.crm
crm configure show"#
        ),
    );
    node1.step(
        "unfenced-and-running-on-node1",
        300 * S,
        &format!(
            r#"{env}wait_for 240 located shared-fs node1
wait_for 30 mountpoint -q /srv/shared
crm_mon -1 -r
sg_persist -n -i -k $D | tee /tmp/k
[ "$(grep -c '^    0x' /tmp/k)" = 2 ] || fail "two registered keys expected after unfencing"
sg_persist -n -i -r $D | tee /tmp/r
grep -qi 'registrants only' /tmp/r || fail "no Write Exclusive - Registrants Only reservation"
head -c 8M /dev/urandom >/srv/shared/data
md5sum </srv/shared/data | tee /host/data.md5
sync"#
        ),
    );
    let before = d.ctl(&["reservations"]);
    std::fs::write(group.join("reservations-before.txt"), &before).unwrap();
    eprintln!("tier7: reservations before the cut:\n{before}");
    assert!(
        before.contains("iqn.2026-11.test:node1") && before.contains("iqn.2026-11.test:node2"),
        "both nodes should be registered:\n{before}"
    );

    // Cut node1's corosync link; node2 must fence node1 and take the file system.
    let cut = Instant::now();
    node1.step("cut-corosync-link", 30 * S, "ip link set eth1 down");
    node2.step(
        "wait-for-takeover",
        300 * S,
        &format!(
            r#"{env}wait_for 240 located shared-fs node2; wait_for 30 mountpoint -q /srv/shared"#
        ),
    );
    let failover = cut.elapsed();
    eprintln!(
        "tier7: failover: cut to the file system mounted on node2 in {:.1} s",
        failover.as_secs_f64()
    );
    let md5 = std::fs::read_to_string(node1.dir.join("share/data.md5")).unwrap();
    node2.step(
        "node1-fenced-node2-serves",
        120 * S,
        &format!(
            r#"{env}crm_mon -1 -r
stonith_admin --history node1 | tee /tmp/h
grep -q 'successful' /tmp/h || fail "no successful fencing of node1 in the history"
sg_persist -n -i -k $D | tee /tmp/k
[ "$(grep -c '^    0x' /tmp/k)" = 1 ] || fail "one key (node2's) expected after fencing node1"
sg_persist -n -i -r $D | tee /tmp/r
grep -qi 'registrants only' /tmp/r || fail "no reservation after fencing"
[ "$(md5sum </srv/shared/data)" = "{md5}" ] || fail "node1's file differs on node2"
head -c 4M /dev/urandom >/srv/shared/from-node2
sync"#,
            md5 = md5.trim()
        ),
    );
    node1.step(
        "fenced-node1-refused",
        240 * S,
        &format!(
            r#"{env}# A WRITE of the block that is there, through node1's nexus: RESERVATION CONFLICT.
# Its first commands may report REGISTRATIONS PREEMPTED (2Ah/05h) unless the kernel took it.
sg_turs $D || true
sg_turs $D || true
sg_raw -r 4096 -o /tmp/blk $D 28 00 00 00 08 00 00 00 08 00
rc=0; sg_raw -s 4096 -i /tmp/blk $D 2a 00 00 00 08 00 00 00 08 00 >/tmp/w 2>&1 || rc=$?
cat /tmp/w
grep -q 'Reservation Conflict' /tmp/w || fail "node1's WRITE was not refused with RESERVATION CONFLICT"
# Its file system (still mounted: node1 does not know it was fenced) cannot write either.
if dd if=/dev/zero of=/srv/shared/from-node1 bs=1M count=1 conv=fsync status=none; then
  fail "the fenced node1 wrote through its file system"
fi
dmesg | grep -i 'reservation conflict\|I/O error' | tail -5 || true
# node1 tries to fence node2 (after node2's 20 s delay); its PREEMPT must fail.
wait_for 180 sh -c "crm_mon -1 | grep -A3 'Failed Fencing Actions' | grep -q 'reboot of node2 by node1'"
crm_mon -1 | sed -n '/Fencing Actions/,$p'
stonith_admin --history node2 2>&1 || true
sg_persist -n -i -k $D | tee /tmp/k
[ "$(grep -c '^    0x' /tmp/k)" = 1 ] || fail "node1's fencing attempt changed the registrations""#
        ),
    );
    let after = d.ctl(&["reservations"]);
    std::fs::write(group.join("reservations-after.txt"), &after).unwrap();
    eprintln!("tier7: reservations after the failover:\n{after}");
    assert!(
        after.contains("iqn.2026-11.test:node2") && !after.contains("iqn.2026-11.test:node1"),
        "node2 should be the only registrant:\n{after}"
    );
    let events = d.ctl(&["events"]);
    std::fs::write(group.join("events.txt"), &events).unwrap();
    assert!(
        events
            .lines()
            .any(|l| l.contains("action=PREEMPT AND ABORT")
                && l.contains("initiator=iqn.2026-11.test:node2,")),
        "the daemon's events should show node2's PREEMPT AND ABORT:\n{events}"
    );
    node2.step(
        "stop-and-fsck",
        240 * S,
        &format!(
            r#"{env}crm_resource --resource shared-fs --meta --set-parameter target-role --parameter-value Stopped
wait_for 120 sh -c "! mountpoint -q /srv/shared"
e2fsck -fn $D"#
        ),
    );
    drop(nodes);
    save_daemon_log(&group, "end", &d.stop());
    eprintln!(
        "tier7: linux_cluster passed in {:.1} s (failover {:.1} s)",
        t0.elapsed().as_secs_f64(),
        failover.as_secs_f64()
    );
}
