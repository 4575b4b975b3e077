#!/usr/bin/env bash
# The project's benchmark: ironlun and Linux tgt side by side on 127.0.0.1, the same client
# commands alternating ironlun, tgt (and ironlun's RAM LUN) for REPS repetitions. Both targets
# serve a 1 GiB file holding the same random data, read once beforehand so it is page-cached.
# Reports medians and min–max, the ironlun/tgt ratio against the goals of issue #3, target CPU
# µs per operation (utime+stime of the target process, /proc/PID/stat), the iperf3 loopback
# ceiling, a RAM-LUN run (ironlun's protocol-only ceiling) and ironlun's RSS with 64 idle
# sessions. These machines are noisy: compare ratios from one run, not absolutes across runs.
# VHD section (issue 7): the same ironlun serves the raw file LUN 0 and LUN 2, a fully allocated
# dynamic VHD holding the same data (qemu-img convert), both page-cached; reads and writes
# alternate raw and VHD per repetition and the report gives the vhd/raw ratio against 80 %.
#
# Usage: scripts/bench.sh [-r REPS] [-t SECONDS] [-o FILE] [-q] [--soak MINUTES] [--vhd-only] [--publish]
#   -r REPS         repetitions per workload and target (default 3)
#   -t SECONDS      seconds per iscsi-perf and iperf3 run (default 5)
#   -o FILE         also write the markdown report to FILE (default bench-results/latest.md), the
#                   results as JSON to FILE.json and the ironlun/tgt chart to FILE.svg (FILE
#                   without its .md; scripts/bench/results.py, chart.py)
#   -q              quick smoke test: 1 repetition, 2 s runs, smaller qemu-img counts
#   --soak MINUTES  run only the soak instead (scripts/bench/soak.sh; no tgt, no other section):
#                   ironlun alone, MINUTES of mixed QD32 reads and writes (4 KiB to 1 MiB) with
#                   a login/logout every second, RSS, fds and threads sampled; PASS when flat
#                   after the warm-up (scripts/bench/soak.py defines it). Writes -o FILE (default
#                   bench-results/soak.md), FILE.json and FILE.svg; --publish copies the chart
#                   to docs/soak.svg. Exit status 3 when not PASS. -r, -t, -q do not apply.
#   --vhd-only      only the VHD section (no tgt, RSS, iperf3 or RAM LUN; no chart)
#   --cluster       only the cluster-mode cost (scripts/bench/cluster.sh): three etcd members,
#                   one node against a gateway of two: data-path IOPS ratio (goal ≥ 0.95) and
#                   PR OUT latency through etcd; -o FILE (default bench-results/cluster.md)
#   --publish       also copy the chart to docs/bench.svg, the one README.md shows
#   (-q overrides -r and -t.) Default runtime: about 8-11 minutes on 2 cores (VHD section: about
#   2.5 minutes, under 1 with -q).
# Env: IRONLUN_BIN (skip the build and use this binary), IL_PORT (3270), TGT_PORT (3271),
#      IPERF_PORT (3272), TGT_CTL (tgtd control port, default TGT_PORT), IRONLUN_LOG (warn).
#      SPDK_DIR: a built SPDK tree (../shared/tools/spdk/build-spdk.sh) adds SPDK's iSCSI target
#      as a third column (SPDK_PORT 3273): one busy-polling reactor (MASK 0x1), a uring bdev on
#      its own copy of the file, opened without O_DIRECT (page cache, as the others), hugepages
#      when they can be reserved, else --no-huge. Its reactor spins a whole core even when idle,
#      so it runs only for its own measurements: started before them in each repetition,
#      stopped after (by PID). SPDK_TOOLS: the scripts that start it (../shared/tools/spdk).
# Needs root for tgtd (scripts/install-deps.sh installs tgt, iperf3, libiscsi-bin, qemu-utils).
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=3; SECS=5; OUT=bench-results/latest.md; QUICK=0; SOAK=0; VHD_ONLY=0; PUBLISH=0; CLUSTER=0
usage() { sed -n '2,35p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
while [ $# -gt 0 ]; do
  case $1 in
    -r) REPS=${2:?}; shift 2 ;;
    -t) SECS=${2:?}; shift 2 ;;
    -o) OUT=${2:?}; OUT_SET=1; shift 2 ;;
    -q) QUICK=1; shift ;;
    --soak) SOAK=${2:?}; shift 2 ;;
    --vhd-only) VHD_ONLY=1; shift ;;
    --cluster) CLUSTER=1; shift ;;
    --publish) PUBLISH=1; shift ;;
    *) usage ;;
  esac
done
if [ "$SOAK" != 0 ]; then   # the soak runs on its own
  [[ $SOAK =~ ^[0-9]+([.][0-9]+)?$ ]] || { echo "bench.sh: --soak takes minutes, not '$SOAK'" >&2; exit 2; }
  [ "$VHD_ONLY" = 0 ] || { echo "bench.sh: --soak runs only the soak; drop --vhd-only" >&2; exit 2; }
  exec bash scripts/bench/soak.sh "$SOAK" "$([ -n "${OUT_SET:-}" ] && echo "$OUT" || echo bench-results/soak.md)" "$PUBLISH"
fi
if [ "$CLUSTER" = 1 ]; then   # the cluster cost runs on its own
  if [ "$QUICK" = 1 ]; then REPS=1; SECS=2; fi
  mkdir -p "$(dirname "$([ -n "${OUT_SET:-}" ] && echo "$OUT" || echo bench-results/cluster.md)")"
  exec bash scripts/bench/cluster.sh "$REPS" "$SECS" "$([ -n "${OUT_SET:-}" ] && echo "$OUT" || echo bench-results/cluster.md)"
fi
Q4K=40000; Q1M=1024   # qemu-img bench request counts (4 KiB: 156 MiB; 1 MiB: the whole LUN)
Q64K=32768            # VHD section: 64 KiB writes (2 GiB: about 1.5 s, shorter runs are mostly noise)
if [ "$QUICK" = 1 ]; then REPS=1; SECS=2; Q4K=10000; Q1M=256; Q64K=8192; fi
T0=$(date +%s)
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- crates 2>/dev/null || echo '+dirty')   # at start: main moves

bash scripts/install-deps.sh >/dev/null
if [ -n "${IRONLUN_BIN:-}" ]; then
  BIN=$IRONLUN_BIN
else
  cargo build --release -p ironlun >/dev/null 2>&1 || cargo build --release -p ironlun
  BIN=${CARGO_TARGET_DIR:-target}/release/ironlun
fi
[ -x "$BIN" ] || { echo "bench.sh: no ironlun binary at $BIN" >&2; exit 1; }
WORK=$(mktemp -d /tmp/ironlun-bench.XXXXXX)
IL_PORT=${IL_PORT:-3270}; TGT_PORT=${TGT_PORT:-3271}; IPERF_PORT=${IPERF_PORT:-3272}
TGT_CTL=${TGT_CTL:-$TGT_PORT}   # tgtd management channel /var/run/tgtd/socket.$TGT_CTL
TGT_DIR="$WORK/tgt"
BG=()   # helper processes we started (iperf3 servers, idle-session holders)
cleanup() {
  for p in "${BG[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  spdk_down
  if [ -n "${IL_PID:-}" ]; then kill -TERM "$IL_PID" 2>/dev/null || true; wait "$IL_PID" 2>/dev/null || true; fi
  bash scripts/bench/tgt.sh down "$TGT_DIR" "$TGT_CTL" || true
  umount "$WORK/spdk/huge" 2>/dev/null || true
  [ -z "${HUGE0:-}" ] || echo "$HUGE0" > /proc/sys/vm/nr_hugepages 2>/dev/null || true
  rm -rf "$WORK"
}
spdk_down() { [ -n "${SPDK_PID:-}" ] || return 0; WORKDIR="$WORK/spdk/run" bash "$SPDK_TOOLS/spdk-down.sh" >/dev/null 2>&1 || true; SPDK_PID=; }
trap cleanup EXIT
trap 'exit 130' INT TERM
log() { echo "[bench $(($(date +%s) - T0))s] $*" >&2; }

# --- targets: the same 1 GiB of random data in a file for each ---
log "writing 1 GiB of random data for both backing files"
mkdir -p "$WORK/il" "$TGT_DIR"
dd if=/dev/urandom of="$TGT_DIR/lun1.img" bs=1M count=1024 status=none
cp "$TGT_DIR/lun1.img" "$WORK/il/lun0.img"
# The VHD LUN: the same data as a dynamic VHD, every block allocated (random data has no zero
# block for convert to skip); force_size keeps the virtual size exactly 1 GiB.
log "converting lun0.img to a dynamic VHD (lun2.vhd)"
qemu-img convert -f raw -O vpc -o subformat=dynamic,force_size=on "$WORK/il/lun0.img" "$WORK/il/lun2.vhd"
qemu-img map -f vpc --output=json "$WORK/il/lun2.vhd" | python3 -c '
import json, sys
m = json.load(sys.stdin)
hole = sum(e["length"] for e in m if not e["data"])
sys.exit(f"bench.sh: lun2.vhd has {hole} unallocated bytes" if hole else 0)'
if [ "$VHD_ONLY" = 0 ]; then
  log "starting tgt $(dpkg-query -W -f='${Version}' tgt 2>/dev/null || true)"
  bash scripts/bench/tgt.sh up "$TGT_DIR" "$TGT_PORT" "$TGT_CTL" "$TGT_DIR/lun1.img" >/dev/null
  TGT_PID=$(cat "$TGT_DIR/tgtd.pid")
fi
SPDK_TOOLS=${SPDK_TOOLS:-$(cd .. && pwd)/shared/tools/spdk}
SPDK_PORT=${SPDK_PORT:-3273}
SPDK=0
if [ -n "${SPDK_DIR:-}" ] && [ "$VHD_ONLY" = 0 ]; then
  [ -x "$SPDK_DIR/build/bin/iscsi_tgt" ] || { echo "bench.sh: SPDK_DIR=$SPDK_DIR has no build/bin/iscsi_tgt" >&2; exit 1; }
  [ -f "$SPDK_TOOLS/spdk-up.sh" ] || { echo "bench.sh: no spdk-up.sh in SPDK_TOOLS=$SPDK_TOOLS" >&2; exit 1; }
  SPDK=1
  mkdir -p "$WORK/spdk/run" "$WORK/spdk/huge"
  cp "$TGT_DIR/lun1.img" "$WORK/spdk/spdk.img"
  SPDK_NOHUGE=1
  HUGE0=$(cat /proc/sys/vm/nr_hugepages)
  if echo 640 > /proc/sys/vm/nr_hugepages 2>/dev/null && [ "$(cat /proc/sys/vm/nr_hugepages)" -ge 512 ] \
     && mount -t hugetlbfs nodev "$WORK/spdk/huge" 2>/dev/null; then SPDK_NOHUGE=0; fi
  SPDK_URL="iscsi://127.0.0.1:$SPDK_PORT/iqn.2016-06.io.spdk:anchor/0"
fi
# Start SPDK's target for its measurements; SPDK_PID is its PID.
spdk_up() {
  SPDK_PID=$(SPDK_DIR="$SPDK_DIR" WORKDIR="$WORK/spdk/run" PORT="$SPDK_PORT" MASK=0x1 MEM_MB=1024 \
    HUGE_DIR="$WORK/spdk/huge" NOHUGE="$SPDK_NOHUGE" BDEV=uring FILE="$WORK/spdk/spdk.img" BUFFERED=1 \
    bash "$SPDK_TOOLS/spdk-up.sh" | tail -1)
  cat "$WORK/spdk/spdk.img" > /dev/null
}
IL_IQN=iqn.2026-11.io.ironlun:bench
cat > "$WORK/ironlun.toml" <<EOF
data_dir = "$WORK/il"

[[portal]]
listen = "127.0.0.1:$IL_PORT"

[[target]]
name = "$IL_IQN"

[[target.lun]]
id = 0
backstore = "file"
path = "lun0.img"
size = "1GiB"
block_size = 512

[[target.lun]]
id = 1
backstore = "ram"
size = "1GiB"
block_size = 512

[[target.lun]]
id = 2
backstore = "vhd"
path = "lun2.vhd"
size = "1GiB"
block_size = 512
EOF
log "starting ironlun ($BIN)"
IRONLUN_LOG=${IRONLUN_LOG:-warn} "$BIN" serve -c "$WORK/ironlun.toml" --admin off > "$WORK/il.out" 2> "$WORK/il.log" &
IL_PID=$!
for _ in $(seq 1 100); do grep -q '^listening' "$WORK/il.out" 2>/dev/null && break; sleep 0.1; done
grep -q '^listening' "$WORK/il.out" || { echo "ironlun did not start:" >&2; cat "$WORK/il.log" >&2; exit 1; }
cat "$WORK/il/lun0.img" "$TGT_DIR/lun1.img" "$WORK/il/lun2.vhd" > /dev/null   # backing files into the page cache

IL_URL="iscsi://127.0.0.1:$IL_PORT/$IL_IQN/0"
RAM_URL="iscsi://127.0.0.1:$IL_PORT/$IL_IQN/1"
VHD_URL="iscsi://127.0.0.1:$IL_PORT/$IL_IQN/2"
TGT_URL="iscsi://127.0.0.1:$TGT_PORT/iqn.2026-11.test:tgt/1"
RES="$WORK/results.tsv"; : > "$RES"
CLK_TCK=$(getconf CLK_TCK)

# utime+stime (clock ticks) of a process, all threads (proc(5): fields 14 and 15)
cpu_ticks() { local s; s=$(cat "/proc/$1/stat") || { echo 0; return; }; s=${s##*) }; set -- $s; echo $(( ${12} + ${13} )); }
rss_mib() { awk '/^VmRSS:/ {printf "%.1f\n", $2 / 1024}' "/proc/$1/status"; }

# --- client commands; each prints "VALUE OPS" (VALUE: IOPS, MB/s or µs; OPS: operations done) ---
perf_iops() { # URL QD BLOCKS(512 B) [-r]: average IOPS of one iscsi-perf run
  timeout $((SECS + 30)) iscsi-perf -m "$2" -b "$3" -t "$SECS" ${4:-} "$1" 2>&1 | tr '\r' '\n' \
    | sed -nE 's/^iops average ([0-9]+).*/\1/p' | tail -1
}
w_rr4k_qd1() { local i; i=$(perf_iops "$1" 1 8 -r); [ -n "$i" ] || return 1; python3 -c "i=$i; print(1e6/i, i*$SECS)"; }
w_rr4k_qd32() { local i; i=$(perf_iops "$1" 32 8 -r); [ -n "$i" ] || return 1; echo "$i $((i * SECS))"; }
w_sr1m_qd8() { local i; i=$(perf_iops "$1" 8 2048); [ -n "$i" ] || return 1; python3 -c "i=$i; print(i*1048576/1e6, i*$SECS)"; }
qbench() { # URL QD SIZE COUNT [-w] METRIC(iops|mbs) [STEP]
  local t
  t=$(timeout 300 qemu-img bench -f raw -n -c "$4" -d "$2" -s "$3" ${7:+-S "$7"} ${5:+-w} "$1" 2>&1 \
    | sed -nE 's/^Run completed in ([0-9.]+) seconds\./\1/p')
  [ -n "$t" ] || return 1
  if [ "$6" = iops ]; then python3 -c "print($4/$t, $4)"; else python3 -c "print($4*$3/$t/1e6, $4)"; fi
}
w_qw4k_qd32() { qbench "$1" 32 4096 "$Q4K" w iops; }
w_qr1m_qd8() { qbench "$1" 8 1048576 "$Q1M" "" mbs; }
w_qw1m_qd8() { qbench "$1" 8 1048576 "$Q1M" w mbs; }
sessions() { # URL N: N concurrent iscsi-perf sessions sharing a total queue depth of 32
  local n=$2 qd=$((32 / $2)) pids=() k sum=0 v
  for k in $(seq 1 "$n"); do
    timeout $((SECS + 30)) iscsi-perf -i "iqn.2026-11.io.ironlun:bench-s$k" -m "$qd" -b 8 -t "$SECS" -r "$1" \
      > "$WORK/sess.$k" 2>&1 & pids+=($!)
  done
  wait "${pids[@]}" || true
  for k in $(seq 1 "$n"); do
    v=$(tr '\r' '\n' < "$WORK/sess.$k" | sed -nE 's/^iops average ([0-9]+).*/\1/p' | tail -1)
    sum=$((sum + ${v:-0}))
  done
  [ "$sum" -gt 0 ] || return 1
  echo "$sum $((sum * SECS))"
}
w_sess1() { sessions "$1" 1; }
w_sess4() { sessions "$1" 4; }
w_sess16() { sessions "$1" 16; }
# VHD section: raw LUN 0 against VHD LUN 2 (the 4 KiB write strides 1 MiB + 4 KiB, so that
# consecutive writes land in different VHD blocks across the whole disk)
w_v_rr4k() { w_rr4k_qd32 "$1"; }
w_v_sr64k() { local i; i=$(perf_iops "$1" 8 128); [ -n "$i" ] || return 1; python3 -c "i=$i; print(i*65536/1e6, i*$SECS)"; }
w_v_sr1m() { w_sr1m_qd8 "$1"; }
w_v_w4k() { qbench "$1" 32 4096 "$Q4K" w iops 1052672; }
w_v_sw64k() { qbench "$1" 8 65536 "$Q64K" w mbs; }
w_v_sw1m() { qbench "$1" 8 1048576 "$Q1M" w mbs; }

# One measured run: KEY TARGET(il|tgt|ram) URL PID -> a results line with CPU µs per op.
run() {
  local key=$1 tgt=$2 url=$3 pid=$4 c0 c1 out val ops
  c0=$(cpu_ticks "$pid")
  out=$("w_$key" "$url" 2>/dev/null || true)
  c1=$(cpu_ticks "$pid")
  read -r val ops <<< "${out:-nan 0}" || true
  python3 - "$key" "$tgt" "${val:-nan}" "${ops:-0}" "$((c1 - c0))" "$CLK_TCK" >> "$RES" <<'PY'
import sys
key, tgt, val, ops, ticks, hz = sys.argv[1:7]
ops = float(ops)
cpu = float(ticks) / float(hz) * 1e6 / ops if ops > 0 else float("nan")
print(f"{key}\t{tgt}\t{val}\t{cpu:.2f}")
PY
  log "$key $tgt: $(tail -1 "$RES" | cut -f3,4 --output-delimiter=' , cpu µs/op ')"
}

# --- RSS: fresh ironlun (and tgt), then with 64 idle logged-in sessions ---
idle_rss() { # TARGET(il|tgt) PORT IQN PID
  local ready="$WORK/idle.$1" hp
  echo -e "rss0\t$1\t$(rss_mib "$4")" >> "$RES"
  python3 scripts/bench/idle_sessions.py 127.0.0.1 "$2" "$3" 64 "$ready" 2> "$WORK/idle.$1.log" & hp=$!; BG+=("$hp")
  for _ in $(seq 1 300); do [ -s "$ready" ] || ! kill -0 "$hp" 2>/dev/null && break; sleep 0.1; done
  sleep 1
  if [ -s "$ready" ]; then echo -e "rss64\t$1\t$(rss_mib "$4")" >> "$RES"; else
    echo -e "rss64\t$1\tnan" >> "$RES"; log "idle sessions on $1 failed: $(cat "$WORK/idle.$1.log")"; fi
  kill -TERM "$hp" 2>/dev/null || true; wait "$hp" 2>/dev/null || true
  log "RSS $1: $(grep -P "^rss\d+\t$1\t" "$RES" | cut -f1,3 | tr '\t\n' '= ')"
}
if [ "$VHD_ONLY" = 0 ]; then   # RSS, iperf3, RAM LUN and the ironlun/tgt workloads (not indented)
idle_rss il "$IL_PORT" "$IL_IQN" "$IL_PID"
idle_rss tgt "$TGT_PORT" iqn.2026-11.test:tgt "$TGT_PID"
sleep 1

# --- iperf3 loopback ceiling ---
for r in $(seq 1 "$REPS"); do
  iperf3 -s -1 -B 127.0.0.1 -p "$IPERF_PORT" > /dev/null 2>&1 & hp=$!; BG+=("$hp")
  sleep 0.5
  v=$(iperf3 -c 127.0.0.1 -p "$IPERF_PORT" -t "$SECS" -J 2>/dev/null \
    | python3 -c "import json,sys; print(json.load(sys.stdin)['end']['sum_received']['bits_per_second']/8e6)" 2>/dev/null || echo nan)
  wait "$hp" 2>/dev/null || true
  echo -e "iperf\t-\t$v" >> "$RES"; log "iperf3: $v MB/s"
done

# --- populate the RAM LUN, so that its reads return data rather than unallocated zeroes ---
qemu-img bench -f raw -n -c 1024 -d 8 -s 1048576 -w "$RAM_URL" > /dev/null 2>&1 || log "RAM LUN prefill failed"

# --- workloads, alternating ironlun, tgt, ironlun RAM LUN within each repetition ---
KEYS=(rr4k_qd1 rr4k_qd32 sr1m_qd8 qw4k_qd32 qr1m_qd8 qw1m_qd8 sess1 sess4 sess16)
for r in $(seq 1 "$REPS"); do
  log "repetition $r/$REPS"
  for key in "${KEYS[@]}"; do
    run "$key" il "$IL_URL" "$IL_PID"
    run "$key" tgt "$TGT_URL" "$TGT_PID"
    case $key in sess*) ;; *) run "$key" ram "$RAM_URL" "$IL_PID" ;; esac
  done
  if [ "$SPDK" = 1 ]; then
    spdk_up
    log "SPDK iscsi_tgt PID $SPDK_PID ($([ "$SPDK_NOHUGE" = 1 ] && echo --no-huge || echo hugepages))"
    for key in "${KEYS[@]}"; do run "$key" spdk "$SPDK_URL" "$SPDK_PID"; done
    spdk_down
  fi
done
fi   # VHD_ONLY

# --- VHD section: raw file LUN 0 against the dynamic VHD LUN 2, the order swapped every repetition ---
# Both files get the same page-cache history first: written back, evicted (fsync +
# POSIX_FADV_DONTNEED, these two files only) and read once. Without this the comparison measures
# how each file was written: on this kernel (ext4, large folios) a 4 KiB buffered write into a
# folio built by large writes (dd bs=1M, qemu-img convert) costs several times one built by small
# writes, whatever the format (ext4_block_write_begin walks the folio's buffer heads).
python3 -c '
import os, sys
for p in sys.argv[1:]:
    fd = os.open(p, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)' "$WORK/il/lun0.img" "$WORK/il/lun2.vhd"
cat "$WORK/il/lun0.img" "$WORK/il/lun2.vhd" > /dev/null
VKEYS=(v_rr4k v_sr64k v_sr1m v_w4k v_sw64k v_sw1m)
for r in $(seq 1 "$REPS"); do
  log "VHD repetition $r/$REPS"
  for key in "${VKEYS[@]}"; do
    if [ $((r % 2)) = 1 ]; then
      run "$key" raw "$IL_URL" "$IL_PID"; run "$key" vhd "$VHD_URL" "$IL_PID"
    else
      run "$key" vhd "$VHD_URL" "$IL_PID"; run "$key" raw "$IL_URL" "$IL_PID"
    fi
  done
done
echo -e "rss_end\til\t$(rss_mib "$IL_PID")" >> "$RES"

# --- report ---
ELAPSED=$(($(date +%s) - T0))
DATE=$(date -u '+%Y-%m-%d %H:%M UTC')
if [ "$VHD_ONLY" = 1 ]; then cat > "$WORK/header.txt" <<EOF
**ironlun VHD LUN vs raw file LUN** (--vhd-only), $DATE, commit $COMMIT${IRONLUN_BIN:+ (binary: $IRONLUN_BIN, built separately)}, $(nproc) cores, total runtime ${ELAPSED} s.
EOF
else cat > "$WORK/header.txt" <<EOF
**ironlun vs tgt**, $DATE, commit $COMMIT${IRONLUN_BIN:+ (binary: $IRONLUN_BIN, built separately)}, $(nproc) cores, $REPS repetitions alternating ironlun/tgt, ${SECS} s per iscsi-perf run, total runtime ${ELAPSED} s. Both targets on 127.0.0.1 serve a page-cached 1 GiB file holding the same random data; medians (min–max). Ratio goals are issue #3's; for latency and CPU lower is better.
EOF
fi
cat > "$WORK/vhd_commands.txt" <<EOF
$REPS repetitions alternating raw and VHD (the order swapped every repetition), ${SECS} s per iscsi-perf run; URL = \`$IL_URL\` (raw: LUN 0, \`backstore = "file"\`, 1 GiB of random data) or \`$VHD_URL\` (VHD: LUN 2, \`backstore = "vhd"\`, made before the daemon starts by \`qemu-img convert -f raw -O vpc -o subformat=dynamic,force_size=on lun0.img lun2.vhd\`: every 2 MiB block allocated, checked with \`qemu-img map\`); before the section both files are written back, evicted from the page cache (fsync + POSIX_FADV_DONTNEED) and read once with \`cat > /dev/null\`, so that both have the same page-cache history. The raw LUN has taken the ironlun/tgt write workloads before this section unless --vhd-only.

- 4 KiB random read QD32: \`iscsi-perf -m 32 -b 8 -t $SECS -r URL\`
- 64 KiB sequential read QD8: \`iscsi-perf -m 8 -b 128 -t $SECS URL\` (MB/s = IOPS × 64 KiB / 10^6)
- 1 MiB sequential read QD8: \`iscsi-perf -m 8 -b 2048 -t $SECS URL\`
- 4 KiB strided write QD32: \`qemu-img bench -f raw -n -c $Q4K -d 32 -s 4096 -S 1052672 -w URL\` (offsets step by 1 MiB + 4 KiB modulo the disk: every write in another VHD block; qemu-img bench has no random mode and iscsi-perf does not write)
- 64 KiB sequential write QD8: \`qemu-img bench -f raw -n -c $Q64K -d 8 -s 65536 -w URL\`
- 1 MiB sequential write QD8: \`qemu-img bench -f raw -n -c $Q1M -d 8 -s 1048576 -w URL\`
- CPU per op: Δ(utime+stime) of the ironlun process over the run ÷ operations
EOF
cat > "$WORK/commands.txt" <<EOF
Commands (URL = \`$IL_URL\` for ironlun, \`$TGT_URL\` for tgt, \`$RAM_URL\` for ironlun's RAM LUN):

- targets: \`ironlun serve -c ironlun.toml\` (LUN 0 file 1 GiB, LUN 1 ram 1 GiB, block size 512, IRONLUN_LOG=${IRONLUN_LOG:-warn}); \`scripts/bench/tgt.sh up\` = \`tgtd -f -C $TGT_CTL --iscsi portal=127.0.0.1:$TGT_PORT\` (tgt $(dpkg-query -W -f='${Version}' tgt 2>/dev/null || echo "?"), LUN 1 on the file, default rdwr backing store); both files are copies of one \`dd if=/dev/urandom bs=1M count=1024\`, read once with \`cat > /dev/null\`
- 4 KiB random read QD1: \`iscsi-perf -m 1 -b 8 -t $SECS -r URL\` (latency = 1 / average IOPS)
- 4 KiB random read QD32: \`iscsi-perf -m 32 -b 8 -t $SECS -r URL\`
- 1 MiB sequential read QD8: \`iscsi-perf -m 8 -b 2048 -t $SECS URL\` (MB/s = IOPS × 1 MiB / 10^6)
- 4 KiB write QD32: \`qemu-img bench -f raw -n -c $Q4K -d 32 -s 4096 -w URL\`
- 1 MiB read QD8: \`qemu-img bench -f raw -n -c $Q1M -d 8 -s 1048576 URL\`
- 1 MiB write QD8: \`qemu-img bench -f raw -n -c $Q1M -d 8 -s 1048576 -w URL\`
- N sessions (1, 4, 16): N concurrent \`iscsi-perf -i iqn.…:bench-sK -m \$((32/N)) -b 8 -t $SECS -r URL\` (total queue depth 32), IOPS summed
- target CPU per op: Δ(utime+stime) of the target process (/proc/PID/stat, all threads) over the run ÷ operations (iscsi-perf: average IOPS × $SECS s; qemu-img: request count)
- iperf3 ceiling: \`iperf3 -s -1 -B 127.0.0.1\` and \`iperf3 -c 127.0.0.1 -t $SECS -J\` (end.sum_received, MB/s = bit/s ÷ 8 ÷ 10^6)
- RAM LUN: filled first with \`qemu-img bench -f raw -n -c 1024 -d 8 -s 1048576 -w URL\`; same commands as above
- SPDK (when SPDK_DIR is set): \`spdk-up.sh\` with MASK=0x1 BDEV=uring BUFFERED=1 on a copy of the same file (SPDK v24.09 iscsi_tgt, one reactor; $([ "${SPDK_NOHUGE:-1}" = 1 ] && echo "--no-huge" || echo "hugepages")); started before SPDK's runs of each repetition and stopped after them; same client commands, URL \`${SPDK_URL:-}\`; its CPU per op counts the reactor's spinning
- IOPS per target core: 10^6 ÷ target CPU µs per op (operations per second of target CPU time)
- RSS: VmRSS of the target process before and 1 s after \`scripts/bench/idle_sessions.py\` has logged in 64 sessions (held idle); measured on freshly started targets; ironlun's RSS at the end of the run (RAM LUN filled): $(grep -P '^rss_end\t' "$RES" | cut -f3) MiB
EOF
mkdir -p "$(dirname "$OUT")"
JSON=${OUT%.md}.json; SVG=${OUT%.md}.svg
python3 scripts/bench/results.py "$RES" --date "$DATE" --commit "$COMMIT" --cores "$(nproc)" --reps "$REPS" \
  --secs "$SECS" ${IRONLUN_BIN:+--binary "$IRONLUN_BIN"} $([ "$QUICK" = 1 ] && echo --quick) \
  $([ "$VHD_ONLY" = 1 ] && echo --vhd-only) > "$JSON"
{
  if [ "$VHD_ONLY" = 0 ]; then python3 scripts/bench/table.py "$JSON" "$WORK/header.txt" "$WORK/commands.txt"
  else cat "$WORK/header.txt"; fi
  echo
  python3 scripts/bench/vhd_table.py "$JSON" "$WORK/vhd_commands.txt"
} | tee "$OUT"
log "report written to $OUT, results to $JSON"
if [ "$VHD_ONLY" = 0 ]; then
  python3 scripts/bench/chart.py "$JSON" "$SVG"
  log "chart written to $SVG"
  if [ "$PUBLISH" = 1 ]; then mkdir -p docs; cp "$SVG" docs/bench.svg; log "chart copied to docs/bench.svg"; fi
elif [ "$PUBLISH" = 1 ]; then
  log "--publish: no ironlun/tgt chart in a --vhd-only run; docs/bench.svg left as it was"
fi
exit 0
