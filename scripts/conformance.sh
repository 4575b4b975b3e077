#!/usr/bin/env bash
# Run libiscsi's iscsi-test-cu against URL, one process per suite (DESIGN.md §4: a libiscsi quirk
# corrupts later 16-byte CDBs in the same process when COMPARE AND WRITE is missing), with two
# initiator names, a second path (URL2, or --url2, or URL again: MultipathIO wants two portals)
# and --dataloss.
#
# Usage: scripts/conformance.sh [--suites "SCSI.Read10 iSCSI.iSCSIcmdsn ..."] [--require "Read10 ..."]
#                               [--no-skip "ProutRegister ..."] [--out DIR] [--timeout SECS]
#                               [--url2 URL2] [--allow-sanitize] [--single-path "SCSI.Sanitize"] URL [URL2]
#   --suites   suites to run (default: every SCSI.* and iSCSI.* suite iscsi-test-cu lists)
#   --require  suites (short names) that must show 0 failures and no crash/timeout; exit 1 otherwise
#   --no-skip  suites (short names) that must in addition show 0 skips
#   --out      keep each suite's full log here (default: a temp dir, printed at the end)
#   --url2     the second path's URL (MultipathIO; e.g. the LUN through another portal)
#   --allow-sanitize  pass --allow-sanitize (SANITIZE tests erase the LUN)
#   --single-path  suites run with URL only: libiscsi then opens (and logs out) a second session
#              per test instead of sharing one, so state a test leaves on it (Sanitize.Reservations'
#              RESERVE(6)) does not leak into later tests of the process
# Prints a table: suite, tests, passed, failed, skipped, and the skip reasons.
set -uo pipefail
suites=""; require=""; noskip=""; out=""; per_timeout=300; url2=""; sanitize=""; single=
while [ $# -gt 1 ] && [ "${1#--}" != "$1" ]; do
  case "$1" in
    --suites) suites=$2; shift 2 ;;
    --require) require=$2; shift 2 ;;
    --no-skip) noskip=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --timeout) per_timeout=$2; shift 2 ;;
    --url2) url2=$2; shift 2 ;;
    --allow-sanitize) sanitize=--allow-sanitize; shift ;;
    --single-path) single=$2; shift 2 ;;
    *) echo "conformance.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
[ $# -eq 1 ] || [ $# -eq 2 ] || { sed -n '2,19p' "$0" >&2; exit 2; }
url=$1
[ -n "$url2" ] || url2=${2:-$1}
command -v iscsi-test-cu >/dev/null || { echo "conformance.sh: iscsi-test-cu missing (apt-get install libiscsi-bin)" >&2; exit 1; }
[ -n "$out" ] || out=$(mktemp -d /tmp/ironlun-conformance.XXXXXX)
mkdir -p "$out"
if [ -z "$suites" ]; then
  suites=$(iscsi-test-cu --list | awk -F. 'NF==2 && ($1=="SCSI" || $1=="iSCSI")')
fi
I1=iqn.2026-11.io.ironlun:conformance-1
I2=iqn.2026-11.io.ironlun:conformance-2

summary="$out/summary.txt"   # fields separated by US (0x1f)
: > "$summary"
for s in $suites; do
  log="$out/$s.log"
  paths=("$url" "$url2")
  for x in $single; do [ "$x" = "$s" ] && paths=("$url"); done
  timeout "$per_timeout" iscsi-test-cu --dataloss $sanitize -i "$I1" -I "$I2" --test="$s" "${paths[@]}" > "$log" 2>&1
  rc=$?
  python3 - "$s" "$rc" "$log" >> "$summary" <<'PY'
import re, sys
suite, rc, log = sys.argv[1], int(sys.argv[2]), sys.argv[3]
text = open(log, errors="replace").read()
tests = {}; reasons = []
# CUnit prints "  Test: NAME ...passed" or "...FAILED"; libiscsi prints "[SKIPPED] why" inside a
# test before its result. Text after the result (suite teardown) belongs to no test.
parts = re.split(r"^\s+Test: (\S+) \.\.\.", text, flags=re.M)
for name, body in zip(parts[1::2], parts[2::2]):
    body = body.split("Run Summary:")[0]
    # CUnit's verdict; libiscsi's own "[FAILED] ..." log lines (expected failures) are not it.
    m = re.search(r"(?<!\[)(passed|FAILED)(?!\])", body)
    head = body[: m.start()] if m else body
    skips = re.findall(r"\[SKIPPED\]\s*(.*)", head)
    for r in dict.fromkeys(x.strip() for x in skips):
        reasons.append(name + ": " + r)
    if m is None:
        tests[name] = "fail"   # started but never finished: crash, hang or timeout
    elif m.group(0) == "FAILED":
        tests[name] = "fail"
    else:
        tests[name] = "skip" if skips else "pass"
status = "ok"
cu = re.search(r"^\s+tests\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", text, flags=re.M)
if cu and int(cu.group(4)) != sum(v == "fail" for v in tests.values()):
    status = "PARSE-MISMATCH"   # CUnit's own failure count disagrees with the per-test parse
if rc == 124: status = "TIMEOUT"
elif rc >= 128 or (rc != 0 and not tests): status = f"CRASH(rc={rc})"
n = len(tests); p = sum(v == "pass" for v in tests.values())
f = sum(v == "fail" for v in tests.values()); k = sum(v == "skip" for v in tests.values())
failed = ",".join(t for t, v in tests.items() if v == "fail")
print("\x1f".join([suite, str(n), str(p), str(f), str(k), status, failed, " | ".join(reasons)]))
PY
done

printf '%-34s %5s %6s %6s %7s  %s\n' suite tests passed failed skipped status
total_fail=0; required_bad=""
while IFS=$'\x1f' read -r s n p f k st failed reasons; do
  printf '%-34s %5s %6s %6s %7s  %s%s\n' "$s" "$n" "$p" "$f" "$k" "$st" "${failed:+  failed: $failed}"
  short=${s#*.}
  for r in $require $noskip; do
    if [ "$r" = "$short" ] && { [ "$f" != 0 ] || [ "$st" != ok ] || [ "$n" = 0 ]; }; then required_bad="$required_bad $short"; fi
  done
  for r in $noskip; do
    if [ "$r" = "$short" ] && [ "$k" != 0 ]; then required_bad="$required_bad $short(skipped)"; fi
  done
done < "$summary"
echo
echo "skip reasons:"
awk -F'\x1f' '$8 != "" {print "  " $1 ": " $8}' "$summary"
echo "logs: $out"
if [ -n "$required_bad" ]; then
  echo "conformance: FAILED in required suites:$required_bad"
  exit 1
fi
echo "conformance: required suites clean"
