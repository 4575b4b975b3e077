//! Tier 7, group 4 (issue 16): dm-multipath with ALUA through the Linux kernel. One LU served
//! on two portals in two target port groups: 127.0.0.1:P1 (tag 1, group 1, active/optimized)
//! and 127.0.0.1:P2 (tag 2, group 2, active/non-optimized). The guest reaches them over two
//! NICs, each its own slirp network: P1 as 10.0.3.2 through eth1, P2 as 10.0.2.2 through eth0,
//! so that taking eth1 down cuts the P1 path's connection. multipathd runs with
//! `initiator-tests/guest/multipath.conf` (group_by_prio, prio alua, hardware_handler "1 alua",
//! failback immediate, no_path_retry 12).
//!
//! 1. SendTargets through P1 lists both portals with their tags; the records are re-pointed to
//!    10.0.2.2 and `iscsiadm -m node --login` logs in to both; both disks are the same LU,
//!    `scsi_dh_alua` is attached, `sg_rtpg` shows the two groups' states.
//! 2. multipathd makes one map over both paths: `multipath -ll` shows hwhandler '1 alua' and two
//!    priority groups, prio 50 (the P1 path) active and prio 10 (the P2 path) enabled; each
//!    session's recovery timeout is 5 s (multipathd lowers it from open-iscsi's 120 s).
//! 3. Path loss and return under fio (writes with crc32c verify, rate-limited so they span the
//!    events; asserted still running after each): the optimized path's node is logged out; the map is left with the P2 path and
//!    I/O goes on through it; logged in again, the new path joins the map and, failback
//!    immediate, its group (prio 50) is active again; fio ends with no I/O error and every
//!    block verifies.
//! 4. Link cut and return under fio: eth1 goes down, so the P1 path's TCP connection stalls
//!    without a FIN; open-iscsi's NOP-Out times out, the session fails, and after its recovery
//!    timeout (5 s, set by multipathd) the queued I/O fails over to the P2 path; the link comes
//!    back, iscsid reconnects the same session (the daemon reinstates it), the path is active
//!    again and carries I/O; fio ends clean.
//! 5. ALUA switch under fio: `ironlun ctl port-group` makes group 1 active/non-optimized and
//!    group 2 active/optimized; after the unit attention (2Ah/06h) multipathd's ALUA prio swaps
//!    the groups (the P2 path prio 50 active, the P1 path prio 10); I/O then flows through the
//!    P2 path; fio ends clean.
//! 6. Switched back: the P1 path's group is active again; multipathd stopped, the map flushed,
//!    both paths logged out.
//!
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use ironlun_initiator_tests::linux_guest::{
    artefact_dir, free_port, save_daemon_log, Guest, GuestSpec,
};
use ironlun_testkit::Daemon;
use std::time::{Duration, Instant};

const TARGET: &str = "iqn.2026-11.io.ironlun:mpath";

/// The multipath.conf the guest uses (`/etc/multipath.conf`); README quotes it.
const MULTIPATH_CONF: &str = include_str!("../guest/multipath.conf");

fn config(p1: u16, p2: u16) -> String {
    format!(
        r#"
[[portal]]
listen = "127.0.0.1:{p1}"
tpgt = 1

[[portal]]
listen = "127.0.0.1:{p2}"
tpgt = 2

[[port_group]]
id = 1
state = "active_optimized"
tpgts = [1]

[[port_group]]
id = 2
state = "active_non_optimized"
tpgts = [2]

[[target]]
name = "{TARGET}"

[[target.lun]]
id = 0
backstore = "file"
path = "mpath.img"
size = "128MiB"
"#
    )
}

/// `ironlun ctl port-group` prints `GROUP STATE TPGTS CHANGED` rows: is GROUP in STATE?
fn has_state(table: &str, group: &str, state: &str) -> bool {
    table.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() >= 2 && f[0] == group && f[1] == state
    })
}

const S: Duration = Duration::from_secs(1);

#[test]
fn dm_multipath_alua_path_loss_and_group_switch_under_fio() {
    let t0 = Instant::now();
    let group = artefact_dir("linux_multipath");
    let (p1, p2) = (free_port(), free_port());
    let d = Daemon::release().config(&config(p1, p2)).portals().start();
    let mut g = Guest::boot(
        &group,
        &GuestSpec {
            name: "initiator",
            initiator: "iqn.2026-11.test:linux-multipath",
            mem_mib: 2048,
            extra: [
                "-netdev",
                "user,id=n1,net=10.0.3.0/24",
                "-device",
                "virtio-net-pci,netdev=n1,mac=52:54:00:12:34:57",
            ]
            .map(String::from)
            .to_vec(),
            eth1: Some("10.0.3.15/24"),
        },
        180 * S,
    );
    std::fs::write(g.dir.join("share/multipath.conf"), MULTIPATH_CONF).unwrap();
    // A: the P1 path's disk (sdX), B: the P2 path's. DM: the map's dm-N.
    let env = format!(
        r#"P1={p1}; P2={p2}; T={TARGET}; H1=10.0.3.2
# disk1: the P1 path's disk (through eth1, where the host is 10.0.3.2).
disk1() {{ readlink -f "/dev/disk/by-path/ip-$H1:$P1-iscsi-$T-lun-0"; }}
A=$(basename "$(disk1 2>/dev/null)" 2>/dev/null || true)
B=$(basename "$(disk_of $T $P2 2>/dev/null)" 2>/dev/null || true)
DM=$(cd /sys/block && ls -d dm-* 2>/dev/null | head -1 || true)
# mp_groups: one line per path group of `multipath -ll`: PRIO STATUS DISK...
mp_groups() {{
  multipath -ll 2>/dev/null | awk '
    /prio=/ {{ if (g != "") print g; p = $0; sub(/.*prio=/, "", p); sub(/ .*/, "", p)
              s = $0; sub(/.*status=/, "", s); sub(/ .*/, "", s); g = p " " s; next }}
    g != "" {{ for (i = 1; i <= NF; i++) if ($i ~ /^sd[a-z]+$/) g = g " " $i }}
    END {{ if (g != "") print g }}'
}}
# mp_is GROUP...: the path groups are exactly these, in any order (the map keeps the order of
# the priorities it was loaded with). A group is "active" only once I/O has chosen it, so read
# a block first.
mp_is() {{
  timeout 10 dd if=/dev/$DM of=/dev/null bs=4k count=1 iflag=direct status=none || true
  [ "$(mp_groups | sort)" = "$(printf '%s\n' "$@" | sort)" ]
}}
# mp_wait SECONDS GROUP...: wait until `mp_is GROUP...`; else show the map and fail.
mp_wait() {{
  {{ local x=$-; set +x; }} 2>/dev/null
  local t=$1; shift
  local end=$(( $(date +%s) + t ))
  until mp_is "$@"; do
    [ "$(date +%s)" -lt "$end" ] || {{ multipath -ll; mp_groups; fail "path groups not [$*] after ${{t}}s"; }}
    sleep 0.5
  done
  case $x in *x*) set -x ;; esac
}}
# slaves: the map's paths (sdX), one per line.
slaves() {{ ls /sys/block/$DM/slaves; }}
# ios DISK: reads + writes completed on DISK.
ios() {{ awk '{{print $1 + $5}}' /sys/block/$1/stat; }}
# fio_start SIZE: write SIZE at 2 MiB/s through the map, then verify every block's crc32c.
fio_start() {{
  rm -f /tmp/fio.rc /tmp/fio.log
  ( fio --name=mpath --filename=/dev/$DM --size=$1 --rw=write --bs=64k --direct=1 \
      --ioengine=libaio --iodepth=4 --rate=2m --verify=crc32c --do_verify=1 --output=/tmp/fio.log
    echo $? >/tmp/fio.rc ) >/dev/null 2>&1 &
  sleep 2; [ ! -f /tmp/fio.rc ] || {{ cat /tmp/fio.log; fail "fio ended at once"; }}
}}
fio_running() {{ [ ! -f /tmp/fio.rc ] || fail "fio finished too early: $(cat /tmp/fio.log)"; }}
# fio_clean: wait for fio; it must report no error and no verify mismatch.
fio_clean() {{
  wait_for 240 test -f /tmp/fio.rc
  cat /tmp/fio.log
  [ "$(cat /tmp/fio.rc)" = 0 ] || fail "fio saw an I/O error or a verify mismatch"
  grep -q 'err= 0' /tmp/fio.log || fail "fio reports errors"
}}
"#
    );

    // 1. Discovery of both portals, login to both paths.
    g.step(
        "discover-login-both-paths",
        180 * S,
        &format!(
            r#"{env}start_iscsid
modprobe scsi_dh_alua
modprobe dm_multipath
modprobe dm_service_time
out=$(iscsiadm -m discovery -t st -p $H1:$P1)
echo "$out"
echo "$out" | grep -qx "127.0.0.1:$P1,1 $T" || fail "SendTargets lacks 127.0.0.1:$P1,1"
echo "$out" | grep -qx "127.0.0.1:$P2,2 $T" || fail "SendTargets lacks 127.0.0.1:$P2,2"
repoint_discovered
# The P1 path goes through eth1: its record is made for 10.0.3.2 instead.
iscsiadm -m node -o delete -T $T -p $HOST:$P1
iscsiadm -m node -o new -T $T -p $H1:$P1,1 >/dev/null
iscsiadm -m node -T $T --login
wait_for 30 test -b "/dev/disk/by-path/ip-$H1:$P1-iscsi-$T-lun-0"
A=$(basename "$(disk1)"); B=$(basename "$(wait_disk $T $P2)")
echo "P1 path: $A, P2 path: $B"
[ "$A" != "$B" ] || fail "one disk for two paths"
cat /sys/block/$A/device/wwid /sys/block/$B/device/wwid
[ "$(cat /sys/block/$A/device/wwid)" = "$(cat /sys/block/$B/device/wwid)" ] || fail "not the same LU"
for x in $A $B; do
  [ "$(cat /sys/block/$x/device/dh_state)" = alua ] || fail "$x: device handler $(cat /sys/block/$x/device/dh_state), not alua"
done
sg_rtpg -d /dev/$A | tee /tmp/rtpg
grep -A1 'group id : 0x1 ' /tmp/rtpg | grep -q 'state : 0x00' || fail "RTPG: group 1 is not active/optimized"
grep -A1 'group id : 0x2 ' /tmp/rtpg | grep -q 'state : 0x01' || fail "RTPG: group 2 is not active/non-optimized""#
        ),
    );

    // 2. multipathd: one map, two priority groups from ALUA.
    g.step(
        "multipathd-two-prio-groups",
        120 * S,
        &format!(
            r#"{env}cp /host/multipath.conf /etc/multipath.conf
setsid multipathd -d -s >>/host/multipathd.log 2>&1 </dev/null &
wait_for 60 sh -c 'ls -d /sys/block/dm-*'
DM=$(cd /sys/block && ls -d dm-* | head -1)
wait_for 60 sh -c "[ \$(ls /sys/block/$DM/slaves | wc -l) = 2 ]"
mp_wait 60 "50 active $A" "10 enabled $B"
multipath -ll | tee /tmp/ll
grep -q "hwhandler='1 alua'" /tmp/ll || fail "map without the alua hardware handler"
# multipathd lowers each iSCSI path's recovery timeout (replacement_timeout, 120 s) to 5 s.
for f in /sys/class/iscsi_session/session*/recovery_tmo; do
  [ "$(cat $f)" = 5 ] || fail "$f is $(cat $f), not 5"
done
[ "$(blockdev --getsize64 /dev/$DM)" = 134217728 ] || fail "/dev/$DM is not 128 MiB""#
        ),
    );

    // 3. Path loss and return under fio: the optimized path is logged out and back in.
    g.step(
        "fio-under-path-loss",
        300 * S,
        &format!(
            r#"{env}fio_start 120M
a0=$(ios $B)
iscsiadm -m node -T $T -p $H1:$P1 --logout
wait_for 60 sh -c "[ \"\$(ls /sys/block/$DM/slaves)\" = $B ]"
multipath -ll
mp_wait 30 "10 active $B"
sleep 4
fio_running
[ "$(ios $B)" -gt "$a0" ] || fail "no I/O through the remaining path $B"
iscsiadm -m node -T $T -p $H1:$P1 --login
wait_for 30 test -b "/dev/disk/by-path/ip-$H1:$P1-iscsi-$T-lun-0"
A=$(basename "$(disk1)")
echo "P1 path again: $A"
wait_for 60 sh -c "[ \$(ls /sys/block/$DM/slaves | wc -l) = 2 ]"
mp_wait 60 "50 active $A" "10 enabled $B"
multipath -ll
fio_running
a1=$(ios $A); sleep 3
[ "$(ios $A)" -gt "$a1" ] || fail "no I/O through the returned optimized path $A"
fio_clean"#
        ),
    );

    // 4. Link cut and return under fio: eth1 (the P1 path) down, then up again.
    g.step(
        "fio-under-link-cut",
        300 * S,
        &format!(
            r#"{env}fio_start 120M
sid=$(iscsiadm -m session | awk -v p="$H1:$P1," 'index($0, p) {{ gsub(/[][]/, "", $2); print $2 }}')
[ -n "$sid" ] || fail "no session through $H1:$P1"
a0=$(ios $B); t0=$(date +%s)
ip link set eth1 down
wait_for 60 sh -c "multipath -ll | grep -w $A | grep -q failed"
echo "the P1 path failed $(( $(date +%s) - t0 )) s after the link cut"
multipath -ll
sleep 4
fio_running
[ "$(ios $B)" -gt "$a0" ] || fail "no I/O through the remaining path $B"
ip link set eth1 up
t1=$(date +%s)
wait_for 90 sh -c "[ \$(iscsiadm -m session -P 1 | grep -c 'Session State: LOGGED_IN') = 2 ]"
echo "the session was back $(( $(date +%s) - t1 )) s after the link returned"
[ "$(iscsiadm -m session | awk -v p="$H1:$P1," 'index($0, p) {{ gsub(/[][]/, "", $2); print $2 }}')" = "$sid" ] ||
  fail "the P1 path came back as a new session, not session $sid"
mp_wait 60 "50 active $A" "10 enabled $B"
multipath -ll
fio_running
a1=$(ios $A); sleep 3
[ "$(ios $A)" -gt "$a1" ] || fail "no I/O through the returned optimized path $A"
fio_clean
grep -i 'conn.*error\|ping timeout\|session recovery' /host/iscsid.log | tail -5 || true
dmesg | grep -i 'iscsi\|multipath' | tail -10"#
        ),
    );

    // 5. ALUA switch under fio: group 2 becomes optimized, group 1 non-optimized.
    g.step(
        "fio-start-before-switch",
        60 * S,
        &format!("{env}fio_start 64M"),
    );
    let before = d.ctl(&["port-group"]);
    assert!(
        has_state(&before, "1", "active_optimized")
            && has_state(&before, "2", "active_non_optimized"),
        "ironlun ctl port-group before the switch:\n{before}"
    );
    d.ctl(&["port-group", "1", "active_non_optimized"]);
    let after = d.ctl(&["port-group", "2", "active_optimized"]);
    assert!(
        has_state(&after, "1", "active_non_optimized")
            && has_state(&after, "2", "active_optimized"),
        "ironlun ctl port-group after the switch:\n{after}"
    );
    g.step(
        "multipath-follows-alua-switch",
        300 * S,
        &format!(
            r#"{env}t0=$(date +%s)
mp_wait 90 "50 active $B" "10 enabled $A"
echo "multipath followed the switch in $(( $(date +%s) - t0 )) s"
multipath -ll
fio_running
b1=$(ios $B); a1=$(ios $A); sleep 3
[ "$(ios $B)" -gt "$b1" ] || fail "no I/O through the newly optimized path $B"
sg_rtpg -d /dev/$B | tee /tmp/rtpg
grep -A1 'group id : 0x2 ' /tmp/rtpg | grep -q 'state : 0x00' || fail "RTPG: group 2 is not active/optimized"
fio_clean
grep -i 'alua' /host/multipathd.log | tail -5 || true
dmesg | grep -i 'alua' | tail -5"#
        ),
    );

    // 6. Switched back, then the map flushed and both paths logged out.
    d.ctl(&["port-group", "2", "active_non_optimized"]);
    d.ctl(&["port-group", "1", "active_optimized"]);
    g.step(
        "switch-back-and-logout",
        180 * S,
        &format!(
            r#"{env}sg_turs /dev/$A || true; sg_turs /dev/$B || true
mp_wait 90 "50 active $A" "10 enabled $B"
multipath -ll
multipathd shutdown || kill $(pgrep -x multipathd)
wait_for 30 sh -c '! pgrep -x multipathd'
multipath -F
[ -z "$(ls /sys/block | grep dm- || true)" ] || fail "map left after multipath -F"
iscsiadm -m node -T $T --logout
if iscsiadm -m session; then fail "a session is left"; fi"#
        ),
    );
    drop(g);
    save_daemon_log(&group, "end", &d.stop());
    eprintln!(
        "tier7: linux_multipath passed in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}
