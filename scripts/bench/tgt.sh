#!/usr/bin/env bash
# Start or stop a Linux tgt (tgtd) for scripts/bench.sh, on its own management channel so that it
# neither sees nor touches any other tgtd on the machine.
#   tgt.sh up WORKDIR PORT CTL FILE   tgtd on 127.0.0.1:PORT, control port CTL
#                                     (/var/run/tgtd/socket.CTL); target iqn.2026-11.test:tgt,
#                                     LUN 1 = FILE (rdwr backing store), open to all initiators.
#                                     Writes the PID to WORKDIR/tgtd.pid.
#   tgt.sh down WORKDIR CTL           stop the tgtd whose PID is in WORKDIR/tgtd.pid
# tgtd ignores SIGTERM; it leaves its loop after `--op delete --mode system`, which needs every
# target deleted first. SIGINT, then SIGKILL of that PID only, are the fallbacks.
set -euo pipefail
cmd=${1:?up|down}; WORKDIR=${2:?WORKDIR}
PIDFILE="$WORKDIR/tgtd.pid"
case $cmd in
  up)
    PORT=${3:?PORT}; CTL=${4:?CTL}; FILE=${5:?FILE}
    mkdir -p "$WORKDIR"
    adm() { tgtadm -C "$CTL" --lld iscsi "$@"; }
    if adm --op show --mode target >/dev/null 2>&1; then
      echo "tgt.sh: a tgtd already answers on control port $CTL" >&2; exit 1
    fi
    tgtd -f -C "$CTL" --iscsi "portal=127.0.0.1:$PORT" > "$WORKDIR/tgtd.log" 2>&1 &
    PID=$!
    echo "$PID" > "$PIDFILE"
    for _ in $(seq 1 50); do
      adm --op show --mode target >/dev/null 2>&1 && break
      kill -0 "$PID" 2>/dev/null || { echo "tgt.sh: tgtd died:" >&2; cat "$WORKDIR/tgtd.log" >&2; exit 1; }
      sleep 0.1
    done
    adm --op new --mode target --tid 1 -T iqn.2026-11.test:tgt
    adm --op new --mode logicalunit --tid 1 --lun 1 -b "$FILE"
    adm --op bind --mode target --tid 1 -I ALL
    echo "$PID" ;;
  down)
    CTL=${3:?CTL}
    [ -f "$PIDFILE" ] || exit 0
    PID=$(cat "$PIDFILE")
    gone() { for _ in $(seq 1 50); do kill -0 "$PID" 2>/dev/null || return 0; sleep 0.1; done; return 1; }
    if kill -0 "$PID" 2>/dev/null; then
      tgtadm -C "$CTL" --lld iscsi --op delete --mode target --tid 1 --force >/dev/null 2>&1 || true
      tgtadm -C "$CTL" --op delete --mode system >/dev/null 2>&1 || true
      gone || { kill -INT "$PID" 2>/dev/null || true; gone; } || { kill -KILL "$PID" 2>/dev/null || true; gone || true; }
    fi
    rm -f "$PIDFILE" ;;
  *) echo "usage: tgt.sh up WORKDIR PORT CTL FILE | down WORKDIR CTL" >&2; exit 2 ;;
esac
