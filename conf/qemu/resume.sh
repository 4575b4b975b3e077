#!/usr/bin/env bash
# resume hook (after the storage commit): let the source finish the switchover
# (migrate-continue from pre-switchover), wait for completed on both sides, then `cont` the
# destination and verify it runs. Safe to re-run once the source has completed.
. "$(dirname "$0")/hooks-common.sh"
need IRONLUN_QMP_SRC; need IRONLUN_QMP_DST
src=$IRONLUN_QMP_SRC dst=$IRONLUN_QMP_DST
m=$(migrate_status "$src") || fail "source QMP unreachable"
case $m in
  pre-switchover)
    qmp "$src" migrate-continue '{"state":"pre-switchover"}' >/dev/null || fail "source: migrate-continue"
    say "source: migrate-continue" ;;
  device|completed) say "source already past pre-switchover ($m)" ;;
  *) fail "source migration status is $m, not pre-switchover" ;;
esac
qmp "$src" --wait-status completed >/dev/null || fail "source migration did not complete"
say "source: migration completed"
qmp "$dst" --wait-status completed >/dev/null || fail "destination did not finish loading the migration"
r=$(run_status "$dst")
if [ "$r" != running ]; then
  qmp "$dst" cont >/dev/null || fail "destination: cont (run state $r)"
  say "destination: cont (was $r)"
fi
qmp "$dst" --timeout 10 --wait-status running >/dev/null || fail "destination is not running"
say "destination running"
