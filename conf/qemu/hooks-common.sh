# Sourced by the QEMU hooks of `ironlun migrate` (precopy.sh, pause.sh, resume.sh, rollback.sh,
# announce.sh). Interface, all by environment:
#   IRONLUN_QMP_SRC       QMP unix socket of the source QEMU (running the guest)
#   IRONLUN_QMP_DST       QMP unix socket of the destination QEMU (started with -incoming defer -S)
#   IRONLUN_MIGRATE_URI   migration URI the destination listens on and the source connects to
#                         (unix:/path or tcp:HOST:PORT)
#   IRONLUN_HOOK_TIMEOUT  seconds each wait may take (default 120)
#   IRONLUN_MIGRATE_MAX_BW  optional max-bandwidth for the source, bytes/s
# Each hook prints what it does on stdout ("<hook>: ...") and exits non-zero on failure.
set -euo pipefail
hook=$(basename "$0" .sh)
qmp_py="$(cd "$(dirname "$0")" && pwd)/qmp.py"
timeout=${IRONLUN_HOOK_TIMEOUT:-120}
t0=$(date +%s%N)

say() { echo "$hook: $* (+$(( ($(date +%s%N) - t0) / 1000000 )) ms)"; }
fail() { echo "$hook: FAILED: $*" >&2; exit 1; }
need() { [ -n "${!1:-}" ] || fail "$1 is not set"; }
# The interpreter: $IRONLUN_PYTHON, else the system python3 (a pyenv shim can take seconds to
# start, which would lengthen the blackout), else python3 on PATH.
py=${IRONLUN_PYTHON:-}
[ -n "$py" ] || { [ -x /usr/bin/python3 ] && py=/usr/bin/python3; } || py=python3
# qmp SOCKET ARGS...: qmp.py with the hook timeout; its stdout is the reply.
qmp() { "$py" -S "$qmp_py" --timeout "$timeout" "$@"; }
# query-migrate returns {} before any migration: status "none".
migrate_status() { local s; s=$(qmp "$1" query-migrate --field status) && echo "${s:-none}"; }
run_status() { qmp "$1" query-status --field status; }
