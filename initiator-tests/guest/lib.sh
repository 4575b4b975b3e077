# Helpers for the tier-7 guest steps (initiator-tests/src/linux_guest.rs writes this file to the
# guest's share as /host/lib.sh; every step sources it under `set -euo pipefail`).
# The daemon runs on the host; inside the guest the host's loopback is 10.0.2.2.
HOST=10.0.2.2

# fail WHY: end the step with an explanation.
fail() { echo "FAIL: $*" >&2; exit 1; }

# wait_for SECONDS CMD...: run CMD every 0.5 s until it succeeds; fail after SECONDS.
wait_for() {
  { local x=$-; set +x; } 2>/dev/null   # no trace of every poll
  local t=$1; shift
  local end=$(( $(date +%s) + t ))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$end" ] || fail "timed out after ${t}s waiting for: $*"
    sleep 0.5
  done
  case $x in *x*) set -x ;; esac
}

# Start iscsid in the foreground (its log, stderr, goes to /host/iscsid.log: an artefact).
start_iscsid() {
  if ! pgrep -x iscsid >/dev/null; then
    modprobe iscsi_tcp
    setsid iscsid -f >>/host/iscsid.log 2>&1 </dev/null &
    wait_for 10 pgrep -x iscsid
    sleep 1   # its control socket is bound before it starts serving; give it the moment
  fi
}

# node_new IQN PORT [TPGT] [IFACE]: a node record for IQN at 10.0.2.2:PORT (no discovery).
node_new() {
  local iface=${4:-default}
  iscsiadm -m node -o new -T "$1" -p "$HOST:$2,${3:-1}" -I "$iface" >/dev/null
}

# node_set IQN PORT KEY VALUE [IFACE]: update one key of a node record.
node_set() {
  iscsiadm -m node -T "$1" -p "$HOST:$2" ${5:+-I "$5"} -o update -n "$3" -v "$4"
}

# repoint_discovered: every node record that discovery created for 127.0.0.1 (behind slirp
# the target answers SendTargets with the host's loopback) is recreated for 10.0.2.2, same
# port and tag, keeping the settings iscsiadm would use (the discovery's defaults).
repoint_discovered() {
  iscsiadm -m node -P 1 2>/dev/null | awk '
    /^Target: / {t=$2}
    /Portal: 127\.0\.0\.1:/ {split($2, a, ":"); split(a[2], b, ","); print t, b[1], b[2]}' |
  while read -r t port tpgt; do
    iscsiadm -m node -o delete -T "$t" -p "127.0.0.1:$port" >/dev/null
    node_new "$t" "$port" "$tpgt"
  done
}

# disk_of IQN PORT [LUN]: the block device of LUN (default 0) through 10.0.2.2:PORT.
disk_of() {
  readlink -f "/dev/disk/by-path/ip-$HOST:$2-iscsi-$1-lun-${3:-0}"
}

# wait_disk IQN PORT [LUN]: wait until the LUN's block device appears; print it.
wait_disk() {
  wait_for 30 test -b "/dev/disk/by-path/ip-$HOST:$2-iscsi-$1-lun-${3:-0}"
  disk_of "$@"
}

# session_state IQN: the "iSCSI Session State" of the session to IQN (LOGGED_IN, FAILED, ...).
session_state() {
  iscsiadm -m session -P 1 2>/dev/null | awk -v t="$1" '
    /^Target: / {cur=$2} cur==t && /iSCSI Session State:/ {print $4; exit}'
}

# pattern SIZE_MIB SEED: the path of a file of SIZE MiB of random data named SEED, made once
# (from /dev/urandom, in the guest's RAM): random blocks never match a block from elsewhere.
pattern() {
  local f=/tmp/pattern/$2-$1
  if [ ! -f "$f" ]; then
    mkdir -p /tmp/pattern
    head -c $(( $1 * 1048576 )) /dev/urandom >"$f.tmp" && mv "$f.tmp" "$f"
  fi
  echo "$f"
}

# pattern_write DEV OFFSET_MIB SIZE_MIB SEED: write the pattern at OFFSET with O_DIRECT and fsync.
pattern_write() {
  dd if="$(pattern "$3" "$4")" of="$1" bs=1M seek="$2" count="$3" oflag=direct conv=fsync,notrunc status=none
}

# pattern_verify DEV OFFSET_MIB SIZE_MIB SEED: read back with O_DIRECT and compare.
pattern_verify() {
  local f; f=$(pattern "$3" "$4")
  dd if="$1" of=/tmp/readback bs=1M skip="$2" count="$3" iflag=direct status=none
  cmp /tmp/readback "$f" || fail "data at ${2} MiB of $1 differs from pattern $4"
  rm -f /tmp/readback
}

# iface_new NAME IQN: an open-iscsi iface (tcp, default NIC) with its own initiator name, so one
# guest can log in as two hosts.
iface_new() {
  iscsiadm -m iface -I "$1" -o new >/dev/null
  iscsiadm -m iface -I "$1" -o update -n iface.initiatorname -v "$2" >/dev/null
}

# disk_of_iface IFACE: the disk of the (single) session logged in through IFACE.
disk_of_iface() {
  iscsiadm -m session -P 3 | awk -v i="$1" '
    /Iface Name:/ {cur=$3} cur==i && /Attached scsi disk/ {print "/dev/" $4; exit}'
}

