#!/usr/bin/env bash
# announce hook: after the destination runs, let it announce the guest's NICs (gratuitous
# ARP/RARP) with announce-self, when this QEMU has it; otherwise a no-op with a note.
. "$(dirname "$0")/hooks-common.sh"
need IRONLUN_QMP_DST
if qmp "$IRONLUN_QMP_DST" query-commands | grep -q '"announce-self"'; then
  qmp "$IRONLUN_QMP_DST" announce-self '{"initial":50,"max":550,"rounds":5,"step":100}' >/dev/null ||
    fail "destination: announce-self"
  say "destination: announce-self (5 rounds)"
else
  say "destination QEMU has no announce-self; nothing announced"
fi
