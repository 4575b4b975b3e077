//! Tier 7 (issue 18, acceptance 2): the Linux initiator with dm-multipath across two ironlun
//! gateways of one cluster, and `kill -9` of the active gateway under I/O.
//!
//! Three real etcd members and two release gateways on the host's loopback (gw-a: TPGT and
//! ALUA group 1, gw-b: 2), one LUN on one shared image (uring, `O_DIRECT`); timing T = 3 s,
//! m = 0.3 s, Δ = 0.5 s, renewals every 500 ms. The guest logs in to both gateways (one session
//! each), multipathd makes one map (group_by_prio, prio alua: gw-a active/optimized, gw-b
//! standby), the host registers a key through both paths and reserves Write Exclusive –
//! Registrants Only through gw-a.
//!
//! Under fio (64 KiB writes with crc32c verify, rate-limited so they span the event) gw-a is
//! killed with SIGKILL. Its path fails; gw-b takes over the ALUA group once gw-a's lease is gone
//! plus Δ (the bound: T + Δ(1+ρ) after gw-a's last renewal, plus etcd's lease check); the
//! kernel's ALUA handler and multipathd move the queued I/O to gw-b's path. The test reports
//! how long the map carried no I/O, fio ends with no I/O error and every block verifies, and
//! `sg_persist` through the survivor shows both registrations and the reservation unchanged.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use ironlun_initiator_tests::linux_guest::{
    artefact_dir, free_port, save_daemon_log, Guest, GuestSpec,
};
use ironlun_testkit::{Daemon, EtcdCluster, Gateways};
use std::time::{Duration, Instant};

const TARGET: &str = "iqn.2026-11.io.ironlun:failover";
const MULTIPATH_CONF: &str = include_str!("../guest/multipath.conf");
const FAST: &str = "lease_ttl_ms = 3000\nkeepalive_interval_ms = 500\nmargin_ms = 300\n\
lock_delay_ms = 500\netcd_timeout_ms = 400\n";
const S: Duration = Duration::from_secs(1);

#[test]
fn dm_multipath_rides_through_the_active_gateways_kill_9() {
    let t0 = Instant::now();
    let group = artefact_dir("linux_gateway_failover");
    let etcd = EtcdCluster::start(3);
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("lun0.img");
    let spec = Gateways {
        n: 2,
        target: TARGET,
        image: &image,
        size: "256MiB",
        cluster: "failover",
        extra: FAST,
    };
    // Fixed ports: the guest reaches the host's loopback through slirp at 10.0.2.2:PORT.
    let ports = [free_port(), free_port()];
    let mut gws: Vec<Daemon> = (0..2)
        .map(|i| {
            let cfg = spec.config(i, &etcd.endpoints()).replacen(
                "listen = \"127.0.0.1:0\"",
                &format!("listen = \"127.0.0.1:{}\"", ports[i]),
                1,
            );
            Daemon::release().config(&cfg).portals().start()
        })
        .collect();
    let mut g = Guest::boot(
        &group,
        &GuestSpec {
            name: "initiator",
            initiator: "iqn.2026-11.test:linux-failover",
            mem_mib: 2048,
            extra: vec![],
            eth1: None,
        },
        180 * S,
    );
    std::fs::write(g.dir.join("share/multipath.conf"), MULTIPATH_CONF).unwrap();
    let (p1, p2) = (ports[0], ports[1]);
    let env = format!(
        r#"P1={p1}; P2={p2}; T={TARGET}; K=0xfa11
A=$(basename "$(disk_of $T $P1 2>/dev/null)" 2>/dev/null || true)
B=$(basename "$(disk_of $T $P2 2>/dev/null)" 2>/dev/null || true)
DM=$(cd /sys/block && ls -d dm-* 2>/dev/null | head -1 || true)
ios() {{ awk '{{print $1 + $5}}' /sys/block/$1/stat; }}
"#
    );

    // 1. Discovery through each gateway (each lists its own portal), login to both paths,
    //    one map from ALUA priorities: gw-a's path active, gw-b's standby.
    g.step(
        "login-both-gateways-one-map",
        240 * S,
        &format!(
            r#"{env}start_iscsid
modprobe scsi_dh_alua
modprobe dm_multipath
modprobe dm_service_time
iscsiadm -m discovery -t st -p $HOST:$P1 | tee /tmp/d1
iscsiadm -m discovery -t st -p $HOST:$P2 | tee /tmp/d2
grep -qx "127.0.0.1:$P1,1 $T" /tmp/d1 || fail "gw-a does not list its portal"
grep -qx "127.0.0.1:$P2,2 $T" /tmp/d2 || fail "gw-b does not list its portal"
repoint_discovered
iscsiadm -m node -T $T --login
A=$(basename "$(wait_disk $T $P1)"); B=$(basename "$(wait_disk $T $P2)")
echo "gw-a path: $A, gw-b path: $B"
[ "$(cat /sys/block/$A/device/wwid)" = "$(cat /sys/block/$B/device/wwid)" ] || fail "not the same LU"
sg_rtpg -d /dev/$A | tee /tmp/rtpg-a
sg_rtpg -d /dev/$B | tee /tmp/rtpg-b
for f in /tmp/rtpg-a /tmp/rtpg-b; do
  grep -A1 'group id : 0x1 ' $f | grep -q 'state : 0x00' || fail "$f: group 1 (gw-a) not active/optimized"
  grep -A1 'group id : 0x2 ' $f | grep -q 'state : 0x02' || fail "$f: group 2 (gw-b) not standby"
done
cp /host/multipath.conf /etc/multipath.conf
setsid multipathd -d -s >>/host/multipathd.log 2>&1 </dev/null &
wait_for 60 sh -c 'ls -d /sys/block/dm-*'
DM=$(cd /sys/block && ls -d dm-* | head -1)
wait_for 60 sh -c "[ \$(ls /sys/block/$DM/slaves | wc -l) = 2 ]"
multipath -ll"#
        ),
    );

    // 2. The host's key through both paths (standby admits PR OUT), the reservation through gw-a.
    g.step(
        "register-both-paths-reserve",
        60 * S,
        &format!(
            r#"{env}sg_persist --out --register --param-sark=$K /dev/$A
sg_persist --out --register --param-sark=$K /dev/$B
sg_persist --out --reserve --param-rk=$K --prout-type=5 /dev/$A
sg_persist -s /dev/$B | tee /tmp/pr-before
[ "$(grep -c "Key=0x0*fa11" /tmp/pr-before)" = 2 ] || fail "two registrations expected"
grep -q 'Write Exclusive, registrants only' /tmp/pr-before || fail "no WERO reservation""#
        ),
    );

    // 3. fio through the map, then gw-a dies.
    g.step(
        "fio-start",
        60 * S,
        &format!(
            r#"{env}rm -f /tmp/fio.rc /tmp/fio.log
( fio --name=failover --filename=/dev/$DM --size=96M --rw=write --bs=64k --direct=1 \
    --ioengine=libaio --iodepth=4 --rate=2m --verify=crc32c --do_verify=1 --output=/tmp/fio.log
  echo $? >/tmp/fio.rc ) >/dev/null 2>&1 &
sleep 3; [ ! -f /tmp/fio.rc ] || {{ cat /tmp/fio.log; fail "fio ended at once"; }}
a0=$(ios $A); sleep 2; [ "$(ios $A)" -gt "$a0" ] || fail "no I/O through gw-a's path""#
        ),
    );
    let dead = gws.remove(0);
    save_daemon_log(&group, "gw-a", &dead.stderr());
    let killed = Instant::now();
    dead.kill9();
    let killed_at = killed.elapsed().as_secs_f64();
    let out = g.step(
        "fio-rides-through-the-failover",
        300 * S,
        &format!(
            r#"{env}t0=$(date +%s%N); b0=$(ios $B)
until [ "$(ios $B)" -gt "$b0" ]; do
  [ $(( ($(date +%s%N) - t0) / 1000000000 )) -lt 60 ] || {{ multipath -ll; fail "no I/O through gw-b's path within 60 s"; }}
  sleep 0.1
done
echo "failover: I/O through gw-b $(( ($(date +%s%N) - t0) / 1000000 )) ms after this step began"
multipath -ll
sg_rtpg -d /dev/$B | tee /tmp/rtpg-after
grep -A1 'group id : 0x2 ' /tmp/rtpg-after | grep -q 'state : 0x00' || fail "group 2 (gw-b) not active/optimized"
wait_for 240 test -f /tmp/fio.rc
cat /tmp/fio.log
[ "$(cat /tmp/fio.rc)" = 0 ] || fail "fio saw an I/O error or a verify mismatch"
grep -q 'err= 0' /tmp/fio.log || fail "fio reports errors"
sg_persist -s /dev/$B | tee /tmp/pr-after
[ "$(grep -c "Key=0x0*fa11" /tmp/pr-after)" = 2 ] || fail "registrations changed"
grep -q 'Write Exclusive, registrants only' /tmp/pr-after || fail "the reservation is gone"
dmesg | grep -i 'alua\|multipath' | tail -8"#
        ),
    );
    let failover = out
        .lines()
        .find(|l| l.starts_with("failover:"))
        .unwrap_or("failover: (line missing)")
        .to_string();
    eprintln!("tier7: {failover} (the kill: {killed_at:.2} s before the step began)");
    g.step(
        "logout",
        120 * S,
        &format!(
            r#"{env}multipathd shutdown || kill $(pgrep -x multipathd)
wait_for 30 sh -c '! pgrep -x multipathd'
multipath -F
iscsiadm -m node -T $T --logout || true"#
        ),
    );
    drop(g);
    for (i, d) in gws.into_iter().enumerate() {
        save_daemon_log(&group, &format!("gw-{}", i + 1), &d.stop());
    }
    eprintln!(
        "tier7: linux_gateway_failover passed in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}
