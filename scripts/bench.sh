#!/usr/bin/env bash
# Side-by-side benchmark: ironlun and Linux tgt, same client tools, same run, alternating A B.
# Both serve a 1 GiB sparse backing file on loopback. Prints a markdown table with medians,
# min–max and the ironlun/tgt ratio. These machines are noisy: compare ratios, not absolutes.
#
# Usage: scripts/bench.sh [-r REPS] [-t SECONDS] [-o FILE]
#   -r  repetitions per workload and target (default 3)
#   -t  seconds per iscsi-perf run (default 5)
#   -o  also write the table to FILE (markdown)
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=3; SECS=5; OUT=""
while getopts "r:t:o:" o; do
  case $o in r) REPS=$OPTARG ;; t) SECS=$OPTARG ;; o) OUT=$OPTARG ;; *) sed -n '2,10p' "$0"; exit 2 ;; esac
done
bash scripts/install-deps.sh >/dev/null
cargo build --release -p ironlun >/dev/null 2>&1 || cargo build --release -p ironlun

WORK=$(mktemp -d /tmp/ironlun-bench.XXXXXX)
IL_PORT=${IL_PORT:-3270}; TGT_PORT=${TGT_PORT:-3271}
TGT_DIR="$WORK/tgt"
cleanup() {
  [ -n "${IL_PID:-}" ] && kill -TERM "$IL_PID" 2>/dev/null && wait "$IL_PID" 2>/dev/null || true
  WORKDIR="$TGT_DIR" bash ../shared/tools/tgt-down.sh >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

SHARED=$(cd .. && pwd)/shared
[ -d "$SHARED/tools" ] || { echo "bench.sh: ../shared/tools (tgt-up.sh) missing" >&2; exit 1; }

./target/release/ironlun serve --listen 127.0.0.1:$IL_PORT --data-dir "$WORK/il" > "$WORK/il.out" 2> "$WORK/il.log" &
IL_PID=$!
for _ in $(seq 1 100); do grep -q '^listening' "$WORK/il.out" 2>/dev/null && break; sleep 0.1; done
grep -q '^listening' "$WORK/il.out" || { echo "ironlun did not start:"; cat "$WORK/il.log"; exit 1; }
WORKDIR="$TGT_DIR" PORT=$TGT_PORT bash "$SHARED/tools/tgt-up.sh" >/dev/null

IL_URL="iscsi://127.0.0.1:$IL_PORT/iqn.2026-11.io.ironlun:lab/0"
TGT_URL="iscsi://127.0.0.1:$TGT_PORT/iqn.2026-11.test:tgt/1"

# One measurement: prints a number (IOPS or MB/s).
perf() { # perf URL QD BLOCKS(512-byte) random(0|1) metric(iops|mbs)
  local url=$1 qd=$2 blocks=$3 rnd=$4 metric=$5 line rflag=""
  [ "$rnd" = 1 ] && rflag=-r
  line=$(timeout $((SECS + 30)) iscsi-perf -m "$qd" -b "$blocks" -t "$SECS" $rflag "$url" 2>&1 | tr '\r' '\n' | grep 'iops average' | tail -1)
  if [ "$metric" = iops ]; then echo "$line" | sed -E 's/.*iops average ([0-9]+).*/\1/'; else echo "$line" | sed -E 's/.*iops average [0-9]+ \(([0-9]+) MB\/s\).*/\1/'; fi
}
qbench() { # qbench URL QD SIZE COUNT mode(w|r) metric
  local url=$1 qd=$2 size=$3 count=$4 mode=$5 metric=$6 t
  local wflag=""; [ "$mode" = w ] && wflag="-w"
  t=$(timeout 300 qemu-img bench -f raw -n -c "$count" -d "$qd" -s "$size" $wflag "$url" 2>&1 | sed -nE 's/Run completed in ([0-9.]+) seconds./\1/p')
  if [ "$metric" = iops ]; then python3 -c "print(round($count/$t))"; else python3 -c "print(round($count*$size/$t/1e6))"; fi
}

WORKLOADS=(
  "4 KiB random read QD32 (iscsi-perf)|iops|perf URL 32 8 1 iops"
  "1 MiB sequential read QD8 (iscsi-perf)|MB/s|perf URL 8 2048 0 mbs"
  "4 KiB write QD32 (qemu-img bench)|iops|qbench URL 32 4096 40000 w iops"
  "1 MiB write QD8 (qemu-img bench)|MB/s|qbench URL 8 1048576 1000 w mbs"
)

median() { python3 -c "import statistics,sys; v=[float(x) for x in sys.argv[1:] if x]; print(round(statistics.median(v)) if v else 'n/a')" "$@"; }
minmax() { python3 -c "import sys; v=[float(x) for x in sys.argv[1:] if x]; print(f'{min(v):.0f}–{max(v):.0f}' if v else 'n/a')" "$@"; }

rows=()
for w in "${WORKLOADS[@]}"; do
  name=${w%%|*}; rest=${w#*|}; unit=${rest%%|*}; cmd=${rest#*|}
  il=(); tg=()
  for r in $(seq 1 "$REPS"); do
    il+=("$(${cmd/URL/$IL_URL} || true)")
    tg+=("$(${cmd/URL/$TGT_URL} || true)")
  done
  mi=$(median "${il[@]}"); mt=$(median "${tg[@]}")
  ratio=$(python3 -c "print(f'{float(\"$mi\")/float(\"$mt\"):.2f}')" 2>/dev/null || echo n/a)
  rows+=("| $name | $unit | $mi ($(minmax "${il[@]}")) | $mt ($(minmax "${tg[@]}")) | $ratio |")
  echo "$name: ironlun ${il[*]} | tgt ${tg[*]}" >&2
done

table=$(
  echo "ironlun vs tgt, $(date -u +%Y-%m-%d), $(nproc) cores, $REPS reps alternating, medians (min–max)"
  echo
  echo "| workload | unit | ironlun | tgt | ironlun/tgt |"
  echo "| --- | --- | --- | --- | --- |"
  printf '%s\n' "${rows[@]}"
)
echo "$table"
[ -n "$OUT" ] && echo "$table" > "$OUT"
exit 0
