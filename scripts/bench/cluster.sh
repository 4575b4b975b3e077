#!/usr/bin/env bash
# scripts/bench.sh --cluster (issue 18, acceptance 6): what cluster mode costs.
#
# Starts three etcd members on 127.0.0.1, then two setups with the same kind of LUN (a 1 GiB
# file of random data through io_uring with O_DIRECT, as cluster LUNs must be):
# - ONE:  one ironlun without [cluster] (port IL_PORT, default 3270);
# - GW-A: gateway gw-a (active/optimized) of a two-gateway cluster (ports GW_PORT and
#   GW_PORT+1, default 3274/3275), gw-b standby.
# For REPS repetitions, alternating ONE and GW-A, it measures:
# - 4 KiB random read QD32 (iscsi-perf) and 4 KiB write QD32 (qemu-img bench), whose
#   GW-A/ONE ratios must stay within 5 % (nothing on the I/O path reads etcd);
# - PERSISTENT RESERVE OUT latency, one REGISTER key change at a time, N_PROUT each
#   (crates/initiator/examples/prout_latency.rs): p50, p90 and p99. Through GW-A each is one
#   etcd transaction plus the other gateway's applied acknowledgement.
# - handover cost: N_HANDOVER handovers back and forth between two hosts (both logged in by
#   crates/initiator/examples/hold_sessions.rs, idle) by `ironlun migrate --json` with `true`
#   hooks, through ONE, and through gw-a and gw-b in turn: the storage switch time `migrate`
#   reports (the target's fence, drain, flush and commit; through the gateways, with migrate's
#   default on-deadline abort, one switch record plus every gateway's acknowledgement, then
#   the flush).
# Everything started here is stopped by PID at exit.
#
# Usage: scripts/bench/cluster.sh REPS SECONDS OUT.md
# Env: IRONLUN_BIN, IL_PORT (3270), GW_PORT (3274), ETCD_PORT (23790: clients 23790/23792/23794,
#      peers +1), N_PROUT (500), N_HANDOVER (50), IRONLUN_LOG (warn).
set -euo pipefail
cd "$(dirname "$0")/../.."
REPS=${1:?REPS}; SECS=${2:?SECONDS}; OUT=${3:?OUT.md}
T0=$(date +%s)
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- crates 2>/dev/null || echo '+dirty')
log() { echo "[cluster-bench $(($(date +%s) - T0))s] $*" >&2; }

bash scripts/install-deps.sh >/dev/null
if [ -n "${IRONLUN_BIN:-}" ]; then
  BIN=$IRONLUN_BIN
else
  cargo build --release -p ironlun >/dev/null 2>&1 || cargo build --release -p ironlun
  BIN=${CARGO_TARGET_DIR:-target}/release/ironlun
fi
cargo build --release -p ironlun-initiator --example prout_latency >/dev/null 2>&1 \
  || cargo build --release -p ironlun-initiator --example prout_latency
PROUT=${CARGO_TARGET_DIR:-target}/release/examples/prout_latency
cargo build --release -p ironlun-initiator --example hold_sessions >/dev/null 2>&1 \
  || cargo build --release -p ironlun-initiator --example hold_sessions
HOLD=${CARGO_TARGET_DIR:-target}/release/examples/hold_sessions
[ -x "$BIN" ] && [ -x "$PROUT" ] && [ -x "$HOLD" ] || { echo "cluster.sh: binaries missing" >&2; exit 1; }
IL_PORT=${IL_PORT:-3270}; GW_PORT=${GW_PORT:-3274}; ETCD_PORT=${ETCD_PORT:-23790}
N_PROUT=${N_PROUT:-500}; N_HANDOVER=${N_HANDOVER:-50}
WORK=$(mktemp -d /tmp/ironlun-cluster-bench.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# etcd: three members.
INITIAL=""; ENDPOINTS=()
for i in 0 1 2; do
  c=$((ETCD_PORT + 2 * i)); p=$((c + 1))
  INITIAL+="${INITIAL:+,}e$i=http://127.0.0.1:$p"
  ENDPOINTS+=("127.0.0.1:$c")
done
for i in 0 1 2; do
  c=$((ETCD_PORT + 2 * i)); p=$((c + 1))
  etcd --name "e$i" --data-dir "$WORK/e$i" --listen-client-urls "http://127.0.0.1:$c" \
    --advertise-client-urls "http://127.0.0.1:$c" --listen-peer-urls "http://127.0.0.1:$p" \
    --initial-advertise-peer-urls "http://127.0.0.1:$p" --initial-cluster "$INITIAL" \
    --initial-cluster-token bench --initial-cluster-state new >"$WORK/e$i.log" 2>&1 &
  PIDS+=($!)
done
for _ in $(seq 1 60); do
  ETCDCTL_API=3 etcdctl --endpoints "$(IFS=,; echo "${ENDPOINTS[*]}")" endpoint health >/dev/null 2>&1 && break
  sleep 0.5
done
ETCDCTL_API=3 etcdctl --endpoints "$(IFS=,; echo "${ENDPOINTS[*]}")" endpoint health >/dev/null \
  || { echo "cluster.sh: etcd did not come up" >&2; exit 1; }
log "etcd up"

IQN=iqn.2026-11.io.ironlun:cbench
dd if=/dev/urandom of="$WORK/one.img" bs=1M count=1024 status=none
cp "$WORK/one.img" "$WORK/gw.img"
lun() { # PATH SERIAL
  printf '[[target]]\nname = "%s"\n\n[[target.lun]]\nid = 0\nbackstore = "uring"\ndirect = true\npath = "%s"\nserial = "%s"\n' "$IQN" "$1" "$2"
}
eps=$(printf '"%s", ' "${ENDPOINTS[@]}"); eps="[${eps%, }]"
layout='[{ name = "gw-a", tpgts = [1] }, { name = "gw-b", tpgts = [2] }]'
mkdir -p "$WORK/one" "$WORK/a" "$WORK/b"
{ printf '[[portal]]\nlisten = "127.0.0.1:%s"\ntpgt = 1\n\n' "$IL_PORT"; lun "$WORK/one.img" one; } > "$WORK/one.toml"
for g in a b; do
  n=$([ $g = a ] && echo 1 || echo 2); port=$((GW_PORT + n - 1))
  { printf '[[portal]]\nlisten = "127.0.0.1:%s"\ntpgt = %s\n\n' "$port" "$n"; lun "$WORK/gw.img" gw
    printf '\n[cluster]\nname = "gw-%s"\ncluster = "bench"\nendpoints = %s\ngateways = %s\n' "$g" "$eps" "$layout"
  } > "$WORK/$g.toml"
done
start() { # NAME: start ironlun on $WORK/NAME.toml, wait for its url line
  IRONLUN_LOG=${IRONLUN_LOG:-warn} "$BIN" serve -c "$WORK/$1.toml" --data-dir "$WORK/$1" \
    >"$WORK/$1.out" 2>"$WORK/$1.log" &
  PIDS+=($!)
  for _ in $(seq 1 120); do grep -q '^url ' "$WORK/$1.out" && return 0; sleep 0.25; done
  cat "$WORK/$1.log" >&2; echo "cluster.sh: $1 did not start" >&2; exit 1
}
start one; start a; start b
log "ironlun (one node) and gateways gw-a, gw-b up"
URL_ONE="iscsi://127.0.0.1:$IL_PORT/$IQN/0"; URL_GW="iscsi://127.0.0.1:$GW_PORT/$IQN/0"

qbench() { # URL COUNT [-w]: IOPS of qemu-img bench, 4 KiB sequential, QD32
  local t
  t=$(timeout 300 qemu-img bench -f raw -n -c "$2" -d 32 -s 4096 ${3:+-w} "$1" 2>&1 \
    | sed -nE 's/^Run completed in ([0-9.]+) seconds\./\1/p')
  [ -n "$t" ] || { echo "cluster.sh: qemu-img bench on $1 failed" >&2; exit 1; }
  python3 -c "print(round($2/$t))"
}
perf_rr() { # URL: iscsi-perf 4 KiB random read QD32 average IOPS
  timeout $((SECS + 30)) iscsi-perf -m 32 -b 8 -t "$SECS" -r "$1" 2>&1 | tr '\r' '\n' \
    | sed -nE 's/^iops average ([0-9]+).*/\1/p' | tail -1
}
COUNT=$((SECS * 8000))
declare -A R
for rep in $(seq 1 "$REPS"); do
  order="one gw"; [ $((rep % 2)) = 0 ] && order="gw one"
  for who in $order; do
    url=$([ $who = one ] && echo "$URL_ONE" || echo "$URL_GW")
    R[$who.rr.$rep]=$(perf_rr "$url")
    R[$who.rw.$rep]=$(qbench "$url" "$COUNT" w)
    log "rep $rep $who: read ${R[$who.rr.$rep]} write ${R[$who.rw.$rep]} IOPS"
  done
done
P_ONE=$("$PROUT" "127.0.0.1:$IL_PORT" "$IQN" "$N_PROUT")
P_GW=$("$PROUT" "127.0.0.1:$GW_PORT" "$IQN" "$N_PROUT")
log "PR OUT one node: $P_ONE; gw-a: $P_GW"

# Handovers: two idle hosts logged in through each setup (gw-a: the active gateway).
H1=iqn.2026-11.io.ironlun:hbench-1; H2=iqn.2026-11.io.ironlun:hbench-2
for who in one gw; do
  port=$([ $who = one ] && echo "$IL_PORT" || echo "$GW_PORT")
  "$HOLD" "127.0.0.1:$port" "$IQN" "$H1" "$H2" >"$WORK/hold-$who.out" 2>&1 &
  PIDS+=($!)
done
for who in one gw; do
  for _ in $(seq 1 40); do grep -q '^ready' "$WORK/hold-$who.out" && break; sleep 0.25; done
  grep -q '^ready' "$WORK/hold-$who.out" || { cat "$WORK/hold-$who.out" >&2; echo "cluster.sh: hold_sessions ($who) failed" >&2; exit 1; }
done
admin_of() { sed -n 's/^admin //p' "$WORK/$1.out"; }
handovers() { # NAME ADMIN [ADMIN2]: owner H1, then N_HANDOVER handovers back and forth
  local from=$H1 to=$H2 adm i
  "$BIN" ctl --admin "$2" own "$IQN/0" "$H1" >/dev/null
  : >"$WORK/$1.switch"
  for i in $(seq 1 "$N_HANDOVER"); do
    adm=$2; [ $((i % 2)) = 0 ] && [ -n "${3:-}" ] && adm=$3
    "$BIN" migrate --admin "$adm" --lun "$IQN/0" --from "$from" --to "$to" --json \
      --journal "$WORK/$1.journal" --precopy true --pause true --resume true --rollback true \
      --announce true >"$WORK/$1.migrate.json" \
      || { cat "$WORK/$1.migrate.json" >&2; echo "cluster.sh: migrate $i ($1) failed" >&2; exit 1; }
    python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["storage_switch_ms"])' \
      "$WORK/$1.migrate.json" >>"$WORK/$1.switch"
    local t=$from; from=$to; to=$t
  done
}
handovers one "$(admin_of one)"
handovers gw "$(admin_of a)" "$(admin_of b)"
H_ONE=$(tr '\n' ' ' <"$WORK/one.switch"); H_GW=$(tr '\n' ' ' <"$WORK/gw.switch")
log "handovers done ($N_HANDOVER each)"

python3 - "$OUT" "$REPS" "$SECS" "$COMMIT" "$N_PROUT" "$P_ONE" "$P_GW" "$(($(date +%s) - T0))" "$COUNT" "$H_ONE" "$H_GW" <<PY
import statistics, sys
out, reps, secs, commit, n, p_one, p_gw, elapsed, count, h_one, h_gw = sys.argv[1:12]
reps = int(reps)
r = {$(for k in "${!R[@]}"; do printf '"%s": %s, ' "$k" "${R[$k]:-0}"; done)}
def med(who, w):
    return statistics.median(r[f"{who}.{w}.{i}"] for i in range(1, reps + 1))
def rng(who, w):
    v = [r[f"{who}.{w}.{i}"] for i in range(1, reps + 1)]
    return f"{min(v):,}–{max(v):,}"
rows = []
ok = True
for w, name in [("rr", "4 KiB random read QD32 (iscsi-perf)"), ("rw", "4 KiB write QD32 (qemu-img bench -w)")]:
    one, gw = med("one", w), med("gw", w)
    ratio = gw / one if one else 0
    ok &= ratio >= 0.95
    rows.append(f"| {name} | {one:,.0f} ({rng('one', w)}) | {gw:,.0f} ({rng('gw', w)}) | {ratio:.3f} | ≥ 0.95 {'met' if ratio >= 0.95 else 'NOT met'} |")
def lat(s):
    c, p50, p90, p99, mx = s.split()
    return c, int(p50), int(p90), int(p99), int(mx)
o, g = lat(p_one), lat(p_gw)
def hand(s):
    v = sorted(float(x) for x in s.split())
    at = lambda q: v[max(0, -(-len(v) * q // 100) - 1)]
    return len(v), at(50), at(90), v[-1]
ho, hg = hand(h_one), hand(h_gw)
import datetime
text = f"""# Cluster mode cost (scripts/bench.sh --cluster)

{datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC, commit {commit}, {reps} repetitions alternating one node and gateway gw-a, {secs} s per iscsi-perf run, qemu-img bench {int(count):,} requests; runtime {elapsed} s.
Both serve a 1 GiB file of random data through io_uring with O_DIRECT (the backstore cluster LUNs
must use); the cluster has two gateways (gw-a active/optimized, gw-b standby) and three etcd members,
all on this machine's loopback. Medians (min–max).

| data path | one node IOPS | gw-a IOPS | gw-a / one | goal |
| --- | --- | --- | --- | --- |
{chr(10).join(rows)}

| PERSISTENT RESERVE OUT (REGISTER key change, one at a time) | n | p50 µs | p90 µs | p99 µs | max µs |
| --- | --- | --- | --- | --- | --- |
| one node (state file written only with APTPL: none here) | {o[0]} | {o[1]:,} | {o[2]:,} | {o[3]:,} | {o[4]:,} |
| gw-a (one etcd transaction, gw-b's acknowledgement) | {g[0]} | {g[1]:,} | {g[2]:,} | {g[3]:,} | {g[4]:,} |

| handover storage switch (ironlun migrate, idle hosts) | n | p50 ms | p90 ms | max ms | goal |
| --- | --- | --- | --- | --- | --- |
| one node | {ho[0]} | {ho[1]:.3f} | {ho[2]:.3f} | {ho[3]:.3f} | |
| through gw-a and gw-b in turn (one switch record and the acknowledgements, then the flush) | {hg[0]} | {hg[1]:.3f} | {hg[2]:.3f} | {hg[3]:.3f} | median ≤ 15 {'met' if hg[1] <= 15 else 'NOT met'} |
"""
open(out, "w").write(text)
print(text)
PY
