//! Tier 7, group 3 (issue 16): persistent reservations through the Linux kernel, one guest
//! logged in as two hosts (two open-iscsi ifaces with distinct initiator names: two I_T nexuses
//! on the same LUN, /dev/sdX as node1 and /dev/sdY as node2).
//!
//! 1. `sg_persist`: every PERSISTENT RESERVE OUT service action ironlun implements (REGISTER,
//!    REGISTER AND IGNORE EXISTING KEY, RESERVE, RELEASE, PREEMPT, PREEMPT AND ABORT, REGISTER
//!    AND MOVE, CLEAR; REPLACE LOST RESERVATION is not implemented and REPORT CAPABILITIES says
//!    so) and every PERSISTENT RESERVE IN (READ KEYS, READ RESERVATION, REPORT CAPABILITIES,
//!    READ FULL STATUS), each checked by what READ KEYS / READ RESERVATION / READ FULL STATUS
//!    show next, and by which node can write.
//! 2. fence_scsi with two node keys (1 and 2): `on` for both (register, WERO reservation),
//!    `status` ON, `monitor`, both write; node2 runs `off` for key 1 (PREEMPT AND ABORT),
//!    `status` OFF, key 1 gone, node1's write refused, node2's accepted.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use ironlun_initiator_tests::linux_guest::{artefact_dir, save_daemon_log, Guest, GuestSpec};
use ironlun_testkit::Daemon;
use std::time::{Duration, Instant};

const TARGET: &str = "iqn.2026-11.io.ironlun:pr";

const CONFIG: &str = r#"
[[portal]]
listen = "127.0.0.1:0"
tpgt = 1

[[target]]
name = "iqn.2026-11.io.ironlun:pr"

[[target.lun]]
id = 0
backstore = "file"
path = "pr.img"
size = "64MiB"
"#;

const S: Duration = Duration::from_secs(1);

#[test]
fn sg_persist_and_fence_scsi_through_the_kernel() {
    let t0 = Instant::now();
    let group = artefact_dir("linux_pr");
    let d = Daemon::release().config(CONFIG).portals().start();
    let port = d.addr.port().to_string();
    let mut g = Guest::boot(
        &group,
        &GuestSpec {
            name: "initiator",
            initiator: "iqn.2026-11.test:linux-pr",
            mem_mib: 2048,
            extra: vec![],
            eth1: None,
        },
        180 * S,
    );
    let env = format!(
        "P={port}; T={TARGET}; N1=iqn.2026-11.test:node1; N2=iqn.2026-11.test:node2
A=$(disk_of_iface node1 2>/dev/null || true); B=$(disk_of_iface node2 2>/dev/null || true)
# can_write DEV: a 4 KiB O_DIRECT write to the last MiB succeeds.
can_write() {{ dd if=/dev/zero of=$1 bs=4k count=1 seek=16000 oflag=direct conv=fsync status=none 2>/dev/null; }}
keys() {{ sg_persist -n -i -k $1; }}
resv() {{ sg_persist -n -i -r $1; }}
"
    );
    g.step(
        "login-as-two-nodes",
        120 * S,
        &format!(
            r#"{env}start_iscsid
for n in 1 2; do
  iface_new node$n iqn.2026-11.test:node$n
  node_new $T $P 1 node$n
  iscsiadm -m node -T $T -p $HOST:$P -I node$n --login
done
wait_for 30 sh -c "[ \$(iscsiadm -m session -P 3 | grep -c 'Attached scsi disk') = 2 ]"
A=$(disk_of_iface node1); B=$(disk_of_iface node2)
echo "node1=$A node2=$B"
[ -b "$A" ] && [ -b "$B" ] && [ "$A" != "$B" ] || fail "two disks expected, got '$A' '$B'"
[ "$(sg_inq -p 0x83 $A | md5sum)" = "$(sg_inq -p 0x83 $B | md5sum)" ] || fail "not the same LU""#
        ),
    );
    g.step(
        "sg_persist-register-reserve-release",
        120 * S,
        &format!(
            r#"{env}keys $A | tee /tmp/k; grep -q 'NO registered reservation keys' /tmp/k || fail "keys at start"
sg_persist -n -i -c $A | tee /tmp/c
grep -qi 'PTPL_C): 1' /tmp/c || fail "REPORT CAPABILITIES: no PTPL_C"
sg_persist -n -o -G -S 0xa1 $A                 # REGISTER
sg_persist -n -o -I -S 0xb2 $B                 # REGISTER AND IGNORE EXISTING KEY
keys $A | tee /tmp/k; grep -q 0xa1 /tmp/k && grep -q 0xb2 /tmp/k || fail "READ KEYS lacks a key"
sg_persist -n -o -R -T 1 -K 0xa1 $A            # RESERVE, Write Exclusive
resv $B | tee /tmp/r; grep -q 'Key=0xa1' /tmp/r && grep -qi 'type: Write Exclusive$' /tmp/r || fail "READ RESERVATION"
can_write $A || fail "the holder cannot write"
if can_write $B; then fail "a non-holder wrote under Write Exclusive"; fi
sg_persist -n -o -L -T 1 -K 0xa1 $A            # RELEASE
resv $A | tee /tmp/r; grep -q 'NO reservation held' /tmp/r || fail "reservation left after RELEASE"
can_write $B || fail "node2 cannot write after RELEASE""#
        ),
    );
    g.step(
        "sg_persist-preempt-abort-move-clear-full-status",
        120 * S,
        &format!(
            r#"{env}sg_persist -n -o -R -T 5 -K 0xa1 $A            # RESERVE, Write Exclusive - Registrants Only
can_write $B || fail "a registrant cannot write under WERO"
sg_persist -n -o -P -T 5 -K 0xb2 -S 0xa1 $B    # PREEMPT node1
keys $B | tee /tmp/k; if grep -q 0xa1 /tmp/k; then fail "0xa1 still registered after PREEMPT"; fi
resv $B | tee /tmp/r; grep -q 'Key=0xb2' /tmp/r || fail "node2 does not hold after PREEMPT"
if can_write $A; then fail "a preempted node wrote"; fi
sg_persist -n -o -I -S 0xa1 $A                 # node1 registers again
sg_persist -n -o -A -T 5 -K 0xa1 -S 0xb2 $A    # PREEMPT AND ABORT node2
keys $A | tee /tmp/k; if grep -q 0xb2 /tmp/k; then fail "0xb2 still registered after PREEMPT AND ABORT"; fi
if can_write $B; then fail "node2 wrote after PREEMPT AND ABORT"; fi
can_write $A || fail "node1 cannot write holding WERO"
sg_persist -n -o -I -S 0xb2 $B
sg_persist -n -i -s $A | tee /tmp/s            # READ FULL STATUS
grep -q 'Key=0xa1' /tmp/s && grep -q 'Key=0xb2' /tmp/s || fail "READ FULL STATUS lacks a key"
grep -q "$N1" /tmp/s && grep -q "$N2" /tmp/s || fail "READ FULL STATUS lacks a TransportID"
grep -q 'Reservation holder' /tmp/s || fail "READ FULL STATUS shows no holder"
tid=$(grep -o "$N2,i,0x[0-9a-f]*" /tmp/s)       # node2's initiator port, from READ FULL STATUS
sg_persist -n -o -M -K 0xa1 -S 0xb2 -T 5 --relative-target-port=1 --transport-id="$tid" $A  # REGISTER AND MOVE
resv $A | tee /tmp/r; grep -q 'Key=0xb2' /tmp/r || fail "node2 does not hold after REGISTER AND MOVE"
hctl=$(basename "$(readlink -f /sys/block/${{A#/dev/}}/device)")
n0=$(dmesg | grep -c "sd $hctl: Parameters changed" || true)
sg_persist -n -o -C -K 0xb2 $B                 # CLEAR
# node1 was registered: its next command reports RESERVATIONS PREEMPTED (2Ah/03h) once. That
# command may be one the kernel sends itself (udev probing the disk after the earlier unit
# attentions); the kernel then logs "Parameters changed" (ASC 2Ah) and sg_persist sees none.
if sg_persist -n -i -k $A >/tmp/ua 2>&1; then
  cat /tmp/ua
  n1=$(dmesg | grep -c "sd $hctl: Parameters changed" || true)
  [ "$n1" -gt "$n0" ] || fail "node1 got no unit attention after CLEAR (sg_persist or kernel)"
  echo "node1's unit attention after CLEAR was taken by a kernel command (dmesg: Parameters changed)"
else
  cat /tmp/ua; grep -q 'Reservations preempted' /tmp/ua || fail "node1's unit attention is not RESERVATIONS PREEMPTED"
fi
keys $A | tee /tmp/k; grep -q 'NO registered reservation keys' /tmp/k || fail "keys left after CLEAR"
resv $A | tee /tmp/r; grep -q 'NO reservation held' /tmp/r || fail "reservation left after CLEAR"
can_write $A && can_write $B || fail "writes refused after CLEAR""#
        ),
    );
    // fence_scsi: node1 and node2 unfence themselves (register, node1 reserves WERO), node2
    // fences node1 (PREEMPT AND ABORT), node1 can no longer write, node2 can.
    g.step(
        "fence_scsi-on-status-monitor-off",
        300 * S,
        &format!(
            r#"{env}fs() {{ fence_scsi --devices=$1 --key=$2 --action=$3 2>&1; }}
# status DEV KEY WANT: fence_scsi's status action exits 0 for ON and 2 for OFF (fence-agents).
status() {{
  local rc=0; fence_scsi --devices=$1 --key=$2 --action=status >/tmp/st 2>&1 || rc=$?; cat /tmp/st
  case $3 in ON) [ $rc = 0 ] && grep -q 'Status: ON' /tmp/st ;; OFF) [ $rc = 2 ] && grep -q 'Status: OFF' /tmp/st ;; esac ||
    fail "key $2 on $1: status rc=$rc, expected $3"
}}
sg_turs $A || true; sg_turs $B || true
fs $A 1 on
fs $B 2 on
status $A 1 ON
status $B 2 ON
fence_scsi --devices=$A --action=monitor || fail "fence_scsi monitor failed"
keys $A | tee /tmp/k
resv $A | tee /tmp/r; grep -qi 'registrants only' /tmp/r || fail "no WERO reservation after unfencing"
can_write $A && can_write $B || fail "an unfenced node cannot write"
fs $B 1 off | tee /tmp/off
status $B 1 OFF
keys $B | tee /tmp/k; if grep -qx '    0x1' /tmp/k; then fail "node1's key still registered"; fi
if can_write $A; then fail "the fenced node1 wrote"; fi
can_write $B || fail "node2 cannot write after fencing node1""#
        ),
    );
    drop(g);
    save_daemon_log(&group, "end", &d.stop());
    eprintln!(
        "tier7: linux_pr passed in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}
