//! Tier 7, group 5 (issues 16 and 19): a two-node Pacemaker cluster fenced through ironlun,
//! with the LU's write access held by the resource agent `ocf:ironlun:ironlun-lun`.
//!
//! Two guests, node1 and node2, each logged in to the target through its own initiator name
//! (slirp, eth0), run Corosync 3 and Pacemaker 2.1 (no systemd: `corosync -f` and `pacemakerd`
//! started by a step) over a link the test makes between them: QEMU UDP sockets on the host's
//! loopback, eth1 in the guests (192.168.77.1 and .2). The target has three LUNs: 0 the data
//! (ext4), 1 the fence_scsi device, 2 a migratable LU. The agent (conf/pacemaker/ironlun-lun)
//! and the daemon's binary reach the guests through their 9p share; they call the admin API
//! on the host (TCP with a bearer token, 10.0.2.2 in the guests). Settings:
//! `initiator-tests/guest/corosync.conf` and `initiator-tests/guest/cluster.crm` (fence_scsi
//! with unfencing on LUN 1, one device per victim with a fencing delay for node2; the group
//! `data` = agent on LUN 0 + Filesystem, preferring node1; `mig` = agent on LUN 2 with
//! allow-migrate).
//!
//! 1. Both nodes unfence themselves (two keys on LUN 1, Write Exclusive - Registrants Only);
//!    the preferred-owner constraint places `data` on node1: the daemon shows node1 owning
//!    LUN 0, and node1 writes a file.
//! 2. Live move: node1 writes numbered records to LUN 2 (O_DIRECT, each one logged once
//!    acknowledged) while `crm resource move mig node2` runs the agent's migrate_to on node1
//!    and migrate_from on node2 (`ironlun migrate`). node1's writes stop with an error, node2
//!    owns LUN 2 and reads every acknowledged record back.
//! 3. node1's corosync link is cut (`ip link set eth1 down` in node1). node2 fences node1 with
//!    fence_scsi (PREEMPT AND ABORT of node1's key on LUN 1), the agent fails LUN 0 over to
//!    node2 (`ironlun ctl failover --force`: node1 is still logged in) and the file system
//!    mounts clean there: the file is intact and node2 writes. `crm_mon` shows the move; the
//!    failover time (cut to mounted on node2) is printed.
//! 4. node1 is refused: a WRITE through its nexus to LUN 0 ends RESERVATION CONFLICT, its file
//!    system (if still mounted) cannot write, its fence_scsi attempt fails and node2's key
//!    stays the only one on LUN 1; node1 does not take LUN 0 back (migration-threshold=1). The
//!    daemon shows node2 owning LUNs 0 and 2 and node2 as the only registrant of LUN 1; its
//!    events show node2's PREEMPT AND ABORT, the failover and the handover.
//! 5. node2 stops the group (the agent releases LUN 0) and `e2fsck -fn` finds it clean.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use ironlun_initiator_tests::linux_guest::{artefact_dir, save_daemon_log, Guest, GuestSpec};
use ironlun_testkit::Daemon;
use std::time::{Duration, Instant};

const TARGET: &str = "iqn.2026-11.io.ironlun:cluster";

const CONFIG: &str = r#"
[admin]
listen = "127.0.0.1:0"
token_file = "admin.token"

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

[[target.lun]]
id = 1
backstore = "file"
path = "fence.img"
size = "16MiB"

[[target.lun]]
id = 2
backstore = "file"
path = "mig.img"
size = "64MiB"
"#;

/// The admin API's bearer token (the guests' copy is `/host/admin.token`).
const TOKEN: &str = "tier7-cluster-admin-token-0123456789";

/// The guests' `/etc/corosync/corosync.conf`; README quotes it.
const COROSYNC_CONF: &str = include_str!("../guest/corosync.conf");
/// The Pacemaker configuration (`crm configure load update`); README quotes it.
const CLUSTER_CRM: &str = include_str!("../guest/cluster.crm");
/// The OCF resource agent, installed in the guests as `ocf:ironlun:ironlun-lun`.
const AGENT: &str = include_str!("../../conf/pacemaker/ironlun-lun");

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
    let d = Daemon::release()
        .config(CONFIG)
        .file("admin.token", TOKEN)
        .portals()
        .start();
    let port = d.addr.port().to_string();
    let admin_port = d
        .admin_url()
        .rsplit(':')
        .next()
        .unwrap()
        .trim_end_matches('/')
        .to_string();
    let token = d.dir().join("admin.token");
    let ctl = |args: &[&str]| -> String {
        let o = d.binary().ctl_at(
            d.admin_url(),
            &[["--token-file", token.to_str().unwrap()].as_slice(), args].concat(),
        );
        let mut out = String::from_utf8_lossy(&o.stdout).into_owned();
        out.push_str(&String::from_utf8_lossy(&o.stderr));
        assert!(o.status.success(), "ironlun ctl {args:?}:\n{out}");
        out
    };
    // The LU's owner from `ctl ownership --json` (`"owner": "NAME"` or `null`), "-" for none.
    let owner = |lun: u32| -> String {
        let json = ctl(&["ownership", &format!("{TARGET}/{lun}"), "--json"]);
        let rest = json.split("\"owner\":").nth(1).unwrap_or("").trim_start();
        match rest.strip_prefix('"') {
            Some(r) => r.split('"').next().unwrap_or("").to_string(),
            None => "-".to_string(),
        }
    };
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
        let share = g.dir.join("share");
        std::fs::write(share.join("corosync.conf"), COROSYNC_CONF).unwrap();
        std::fs::write(share.join("cluster.crm"), CLUSTER_CRM).unwrap();
        std::fs::write(share.join("ironlun-lun"), AGENT).unwrap();
        std::fs::write(share.join("admin.token"), TOKEN).unwrap();
        let bin = share.join("ironlun");
        let _ = std::fs::remove_file(&bin);
        if std::fs::hard_link(d.binary().path(), &bin).is_err() {
            std::fs::copy(d.binary().path(), &bin).unwrap();
        }
    }
    let env = format!(
        "T={TARGET}; P={port}; D=/dev/disk/by-path/ip-$HOST:$P-iscsi-$T-lun-0
F=/dev/disk/by-path/ip-$HOST:$P-iscsi-$T-lun-1; M=/dev/disk/by-path/ip-$HOST:$P-iscsi-$T-lun-2
# located RSC NODE: crm_resource places RSC on NODE.
located() {{ crm_resource --locate --resource $1 2>/dev/null | grep -q \"is running on: $2\"; }}
# no_owner LUN: the daemon reports no owner for the LU.
no_owner() {{ [ -z \"$(owner $1)\" ]; }}
# owner LUN: the LU's owner as the daemon reports it.
owner() {{ /host/ironlun ctl --admin http://$HOST:{admin_port} --token-file /host/admin.token ownership $T/$1 --json | grep -o '\"owner\": *\"[^\"]*\"' | cut -d'\"' -f4; }}
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
    // Pacemaker, the agent (installed as the docs say) and the iSCSI session on both.
    for g in &mut nodes {
        g.step(
            "pacemaker-agent-and-login",
            120 * S,
            &format!(
                r#"{env}chown hacluster:haclient /var/log/pacemaker /run/crm
install -D -m 0755 /host/ironlun-lun /usr/lib/ocf/resource.d/ironlun/ironlun-lun
mkdir -p /run/resource-agents
setsid env PCMK_logfile=/host/pacemaker.log pacemakerd >/host/pacemakerd.out 2>&1 </dev/null &
start_iscsid
node_new $T $P 1
iscsiadm -m node -T $T -p $HOST:$P --login
wait_disk $T $P 0; wait_disk $T $P 1; wait_disk $T $P 2
/host/ironlun --version"#
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
sed -e "s|@DATA@|$D|g" -e "s|@FENCE@|$F|g" -e "s|@MIG@|$M|g" -e "s|@LU@|$T|g" \
    -e "s|@ADMIN@|http://$HOST:{admin_port}|g" -e "s|@TOKEN@|/host/admin.token|g" \
    /host/cluster.crm >/tmp/cluster.crm
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
wait_for 60 located mig node1
crm_mon -1 -r
[ "$(owner 0)" = iqn.2026-11.test:node1 ] || fail "the agent did not make node1 the owner of LUN 0"
[ "$(owner 2)" = iqn.2026-11.test:node1 ] || fail "the agent did not make node1 the owner of LUN 2"
sg_persist -n -i -k $F | tee /tmp/k
[ "$(grep -c '^    0x' /tmp/k)" = 2 ] || fail "two registered keys expected after unfencing"
sg_persist -n -i -r $F | tee /tmp/r
grep -qi 'registrants only' /tmp/r || fail "no Write Exclusive - Registrants Only reservation"
head -c 8M /dev/urandom >/srv/shared/data
md5sum </srv/shared/data | tee /host/data.md5
sync"#
        ),
    );
    let before = ctl(&["reservations"]);
    std::fs::write(group.join("reservations-before.txt"), &before).unwrap();
    eprintln!("tier7: reservations before the cut:\n{before}");
    assert!(
        before.contains("iqn.2026-11.test:node1") && before.contains("iqn.2026-11.test:node2"),
        "both nodes should be registered:\n{before}"
    );
    assert_eq!(owner(0), "iqn.2026-11.test:node1");

    // Live move of `mig` while node1 writes numbered records to LUN 2.
    node1.step(
        "writer-on-lun2",
        60 * S,
        &format!(
            r#"{env}cat >/tmp/writer.sh <<'W'
#!/bin/bash
# Record i: 4 KiB at offset i*4 KiB, its number repeated; its number goes to /host/acked once
# the O_DIRECT write returned. Stops at the first failing write (errno in /host/writer.err).
i=0
while :; do
  yes "record $(printf %08d $i)" | head -c 4096 >/tmp/rec
  if ! dd if=/tmp/rec of=$1 bs=4096 seek=$i count=1 oflag=direct conv=notrunc status=none 2>/host/writer.err; then
    echo "stopped at record $i" >>/host/writer.err; exit 0
  fi
  echo $i >>/host/acked
  i=$((i+1))
done
W
chmod +x /tmp/writer.sh
: >/host/acked
setsid /tmp/writer.sh $M </dev/null >/dev/null 2>&1 &
wait_for 30 sh -c '[ "$(wc -l </host/acked)" -ge 20 ]'
wc -l </host/acked"#
        ),
    );
    let moved = Instant::now();
    node1.step(
        "live-move-mig",
        240 * S,
        &format!(
            r#"{env}crm resource move mig node2
wait_for 180 located mig node2
crm resource clear mig
wait_for 60 sh -c 'grep -q "stopped at record" /host/writer.err'
cat /host/writer.err
grep -E "mig_migrate_(to|from)_0|migrate_to|migrate_from" /host/pacemaker.log | grep -i mig | tail -5 || true
grep -q "Result of migrate_to operation for mig on node1: ok" /host/pacemaker.log || fail "no successful migrate_to of mig on node1"
crm_mon -1 -r"#
        ),
    );
    eprintln!(
        "tier7: live move of mig: {:.1} s",
        moved.elapsed().as_secs_f64()
    );
    assert_eq!(owner(2), "iqn.2026-11.test:node2");
    let acked = std::fs::read_to_string(node1.dir.join("share/acked")).unwrap();
    let acked: Vec<u32> = acked.lines().map(|l| l.parse().unwrap()).collect();
    assert!(acked.len() >= 20, "{} records acknowledged", acked.len());
    std::fs::write(
        node2.dir.join("share/acked"),
        acked.iter().map(|n| format!("{n}\n")).collect::<String>(),
    )
    .unwrap();
    node2.step(
        "mig-on-node2-has-every-acknowledged-record",
        120 * S,
        &format!(
            r#"{env}grep -q "Result of migrate_from operation for mig on node2: ok" /host/pacemaker.log || fail "no successful migrate_from of mig on node2"
n=0
while read -r i; do
  want=$(set +o pipefail; yes "record $(printf %08d $i)" | head -c 4096 | md5sum)
  got=$(dd if=$M bs=4096 skip=$i count=1 iflag=direct status=none | md5sum)
  [ "$got" = "$want" ] || fail "acknowledged record $i is not on LUN 2"
  n=$((n+1))
done </host/acked
echo "$n acknowledged records read back on node2"
# node2 now writes LUN 2.
dd if=/dev/zero of=$M bs=4096 seek=16000 count=1 oflag=direct conv=notrunc status=none"#
        ),
    );
    eprintln!(
        "tier7: {} records acknowledged on node1 before the move, all read back on node2",
        acked.len()
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
            r#"{env}crm_mon -1 -r | tee /host/crm_mon.txt
grep -q 'data-lun.*Started node2' /host/crm_mon.txt || fail "crm_mon does not show data-lun on node2"
grep -q 'shared-fs.*Started node2' /host/crm_mon.txt || fail "crm_mon does not show shared-fs on node2"
stonith_admin --history node1 | tee /tmp/h
grep -q 'successful' /tmp/h || fail "no successful fencing of node1 in the history"
[ "$(owner 0)" = iqn.2026-11.test:node2 ] || fail "the agent did not fail LUN 0 over to node2"
sg_persist -n -i -k $F | tee /tmp/k
[ "$(grep -c '^    0x' /tmp/k)" = 1 ] || fail "one key (node2's) expected after fencing node1"
sg_persist -n -i -r $F | tee /tmp/r
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
            r#"{env}# A WRITE of the block that is there, through node1's nexus to LUN 0: RESERVATION
# CONFLICT (node2 owns it). Its first commands may report REGISTRATIONS PREEMPTED (2Ah/05h).
sg_turs $D || true
sg_turs $D || true
sg_raw -r 4096 -o /tmp/blk $D 28 00 00 00 08 00 00 00 08 00
rc=0; sg_raw -s 4096 -i /tmp/blk $D 2a 00 00 00 08 00 00 00 08 00 >/tmp/w 2>&1 || rc=$?
cat /tmp/w
grep -q 'Reservation Conflict' /tmp/w || fail "node1's WRITE was not refused with RESERVATION CONFLICT"
# Its file system, if still mounted (node1 may have stopped the group after its monitor
# found the LU gone), cannot write either.
if mountpoint -q /srv/shared; then
  if dd if=/dev/zero of=/srv/shared/from-node1 bs=1M count=1 conv=fsync status=none; then
    fail "the fenced node1 wrote through its file system"
  fi
else
  echo "node1 unmounted /srv/shared itself"
fi
dmesg | grep -i 'reservation conflict\|I/O error' | tail -5 || true
# node1 tries to fence node2 (after node2's 20 s delay); its PREEMPT must fail.
wait_for 180 sh -c "crm_mon -1 | grep -A3 'Failed Fencing Actions' | grep -q 'reboot of node2 by node1'"
crm_mon -1 -r | tee /host/crm_mon-node1.txt
stonith_admin --history node2 2>&1 || true
sg_persist -n -i -k $F | tee /tmp/k
[ "$(grep -c '^    0x' /tmp/k)" = 1 ] || fail "node1's fencing attempt changed the registrations"
[ "$(owner 0)" = iqn.2026-11.test:node2 ] || fail "node1 took LUN 0 back""#
        ),
    );
    let after = ctl(&["reservations"]);
    std::fs::write(group.join("reservations-after.txt"), &after).unwrap();
    eprintln!("tier7: reservations after the failover:\n{after}");
    assert!(
        after.contains("iqn.2026-11.test:node2") && !after.contains("iqn.2026-11.test:node1"),
        "node2 should be the only registrant:\n{after}"
    );
    assert_eq!(owner(0), "iqn.2026-11.test:node2");
    assert_eq!(owner(2), "iqn.2026-11.test:node2");
    let events = ctl(&["events"]);
    std::fs::write(group.join("events.txt"), &events).unwrap();
    assert!(
        events
            .lines()
            .any(|l| l.contains("action=PREEMPT AND ABORT")
                && l.contains("initiator=iqn.2026-11.test:node2,")),
        "the daemon's events should show node2's PREEMPT AND ABORT:\n{events}"
    );
    let failovers: Vec<&str> = events
        .lines()
        .filter(|l| l.contains("failover") && l.contains("/0 "))
        .collect();
    assert!(
        failovers
            .iter()
            .any(|l| l.contains("from=iqn.2026-11.test:node1")
                && l.contains("to=iqn.2026-11.test:node2")),
        "the daemon's events should show LUN 0's failover to node2:\n{events}"
    );
    assert!(
        events
            .lines()
            .any(|l| l.contains("handover_commit") && l.contains("/2 ")),
        "the daemon's events should show LUN 2's handover:\n{events}"
    );
    node2.step(
        "stop-and-fsck",
        240 * S,
        &format!(
            r#"{env}crm_resource --resource data --meta --set-parameter target-role --parameter-value Stopped
wait_for 120 sh -c "! mountpoint -q /srv/shared"
wait_for 60 no_owner 0
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
