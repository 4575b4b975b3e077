#!/usr/bin/env bash
# pause hook: verify the source is paused before switchover (precopy.sh brought it there:
# migration status pre-switchover and vCPUs stopped). It changes nothing.
. "$(dirname "$0")/hooks-common.sh"
need IRONLUN_QMP_SRC
m=$(migrate_status "$IRONLUN_QMP_SRC") || fail "source QMP unreachable"
[ "$m" = pre-switchover ] || fail "source migration status is $m, not pre-switchover"
r=$(qmp "$IRONLUN_QMP_SRC" query-status --field running) || fail "source query-status"
[ "$r" = false ] || fail "source vCPUs are running at pre-switchover"
say "source paused at pre-switchover (run state $(run_status "$IRONLUN_QMP_SRC"))"
