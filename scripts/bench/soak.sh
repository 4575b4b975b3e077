#!/usr/bin/env bash
# The soak of scripts/bench.sh --soak MINUTES (issue 15): a release ironlun alone on 127.0.0.1
# (LUN 0: a 256 MiB file, LUN 1: a 64 MiB RAM LUN, both written through once), then
# scripts/bench/soak.py drives mixed QD32 I/O and one login/logout a second for MINUTES while it
# samples the daemon's RSS, fds and threads; the verdict (flat or not, soak.py defines it), the
# report, the JSON and the chart follow. Ctrl-C or SIGTERM stop everything started here; every
# client also stops by itself at the end of the run.
#
# Usage: scripts/bench/soak.sh MINUTES OUT.md PUBLISH(0|1)
#   writes OUT.md (report), OUT.json (samples, load, verdict), OUT.svg (chart; soak_chart.py)
#   and OUT.daemon.log (the daemon's stderr);
#   PUBLISH=1 also copies the chart to docs/soak.svg. Exit status: 0 PASS, 3 FAIL or
#   INCONCLUSIVE, 1 the soak could not run.
# Env: IRONLUN_BIN (skip the build), IL_PORT (3270), IRONLUN_LOG (warn), SOAK_INTERVAL (seconds
#      between samples; default 10, 5 for runs under 10 minutes), SOAK_WARMUP (seconds; default
#      10 % of the run, at least 60).
set -euo pipefail
cd "$(dirname "$0")/../.."
MIN=${1:?MINUTES}; OUT=${2:?OUT.md}; PUBLISH=${3:-0}
T0=$(date +%s)
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- crates 2>/dev/null || echo '+dirty')
log() { echo "[soak $(($(date +%s) - T0))s] $*" >&2; }

bash scripts/install-deps.sh >/dev/null
if [ -n "${IRONLUN_BIN:-}" ]; then
  BIN=$IRONLUN_BIN
else
  cargo build --release -p ironlun >/dev/null 2>&1 || cargo build --release -p ironlun
  BIN=${CARGO_TARGET_DIR:-target}/release/ironlun
fi
[ -x "$BIN" ] || { echo "soak.sh: no ironlun binary at $BIN" >&2; exit 1; }
WORK=$(mktemp -d /tmp/ironlun-soak.XXXXXX)
IL_PORT=${IL_PORT:-3270}
cleanup() {
  if [ -n "${SOAK_PID:-}" ]; then kill -TERM "$SOAK_PID" 2>/dev/null || true; wait "$SOAK_PID" 2>/dev/null || true; fi
  if [ -n "${IL_PID:-}" ]; then kill -TERM "$IL_PID" 2>/dev/null || true; wait "$IL_PID" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

IQN=iqn.2026-11.io.ironlun:soak
mkdir -p "$WORK/il"
truncate -s 256M "$WORK/il/lun0.img"
# The admin API on TCP (for /metrics) always needs a bearer token (issue 15).
head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$WORK/token"
chmod 600 "$WORK/token"
cat > "$WORK/ironlun.toml" <<EOF
data_dir = "$WORK/il"

[admin]
token_file = "$WORK/token"

[[portal]]
listen = "127.0.0.1:$IL_PORT"

[[target]]
name = "$IQN"

[[target.lun]]
id = 0
backstore = "file"
path = "lun0.img"
size = "256MiB"
block_size = 512

[[target.lun]]
id = 1
backstore = "ram"
size = "64MiB"
block_size = 512
EOF
log "starting ironlun ($BIN)"
IRONLUN_LOG=${IRONLUN_LOG:-warn} "$BIN" serve -c "$WORK/ironlun.toml" --admin 127.0.0.1:0 > "$WORK/il.out" 2> "$WORK/il.log" &
IL_PID=$!
for _ in $(seq 1 100); do grep -q '^admin ' "$WORK/il.out" 2>/dev/null && break; sleep 0.1; done
grep -q '^listening' "$WORK/il.out" || { echo "ironlun did not start:" >&2; cat "$WORK/il.log" >&2; exit 1; }
ADMIN=$(sed -n 's/^admin //p' "$WORK/il.out" | head -1)
URL0="iscsi://127.0.0.1:$IL_PORT/$IQN/0"; URL1="iscsi://127.0.0.1:$IL_PORT/$IQN/1"
# Write both LUNs through once: the RAM LUN's chunks are allocated on first write, so its
# 64 MiB are resident before the first sample rather than growing into the measurement.
qemu-img bench -f raw -n -w --pattern 90 -c 256 -d 8 -s 1048576 "$URL0" > /dev/null
qemu-img bench -f raw -n -w --pattern 90 -c 64 -d 8 -s 1048576 "$URL1" > /dev/null

DATE=$(date -u '+%Y-%m-%d %H:%M UTC')
JSON=${OUT%.md}.json; SVG=${OUT%.md}.svg
mkdir -p "$(dirname "$OUT")"
log "soak: $MIN min of mixed QD32 I/O and one login/logout a second (admin $ADMIN)"
python3 scripts/bench/soak.py run --pid "$IL_PID" --portal "127.0.0.1:$IL_PORT" --iqn "$IQN" \
  --file-lun 0 --ram-lun 1 --minutes "$MIN" --json "$JSON" ${ADMIN:+--metrics "$ADMIN/metrics" --metrics-token "$WORK/token"} \
  ${SOAK_INTERVAL:+--interval "$SOAK_INTERVAL"} ${SOAK_WARMUP:+--warmup "$SOAK_WARMUP"} \
  --meta "date=$DATE" --meta "commit=$COMMIT" --meta "cores=$(nproc)" ${IRONLUN_BIN:+--meta "binary=$IRONLUN_BIN"} \
  --meta "luns=LUN 0 file 256 MiB, LUN 1 RAM 64 MiB, block size 512, both written through once before the soak; IRONLUN_LOG=${IRONLUN_LOG:-warn}" &
SOAK_PID=$!
wait "$SOAK_PID" || { rc=$?; SOAK_PID=; echo "soak.sh: soak.py failed ($rc)" >&2; exit 1; }
SOAK_PID=
kill -0 "$IL_PID" 2>/dev/null || { echo "soak.sh: ironlun exited during the soak:" >&2; tail -20 "$WORK/il.log" >&2; exit 1; }
cp "$WORK/il.log" "${OUT%.md}.daemon.log"
log "daemon log (IRONLUN_LOG=${IRONLUN_LOG:-warn}): $(wc -l < "$WORK/il.log") lines, kept in ${OUT%.md}.daemon.log"
python3 scripts/bench/soak.py report "$JSON" --runtime-s $(($(date +%s) - T0)) | tee "$OUT"
python3 scripts/bench/soak_chart.py "$JSON" "$SVG"
log "report written to $OUT, samples and verdict to $JSON, chart to $SVG"
if [ "$PUBLISH" = 1 ]; then mkdir -p docs; cp "$SVG" docs/soak.svg; log "chart copied to docs/soak.svg"; fi
VERDICT=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["analysis"]["verdict"])' "$JSON")
[ "$VERDICT" = PASS ]  || exit 3
