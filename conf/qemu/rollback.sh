#!/usr/bin/env bash
# rollback hook (a step before the storage commit failed): cancel the migration on the source,
# wait for it to settle, `cont` the source if it is still stopped, and verify it runs. A source
# whose migration already completed (run state postmigrate) cannot be rolled back here (the
# destination owns the guest): that is a failure.
. "$(dirname "$0")/hooks-common.sh"
need IRONLUN_QMP_SRC
src=$IRONLUN_QMP_SRC
m=$(migrate_status "$src") || fail "source QMP unreachable"
case $m in
  completed)
    # Also the status of a VM that once arrived by an incoming migration; only a source that
    # migrated away (run state postmigrate) is lost.
    r=$(run_status "$src")
    [ "$r" != postmigrate ] || fail "source migration already completed (run state $r); cannot roll back"
    say "source migration status completed from an earlier migration (run state $r); nothing to cancel" ;;
  none|failed|cancelled) say "source migration status $m; nothing to cancel" ;;
  *)
    qmp "$src" migrate_cancel >/dev/null || fail "source: migrate_cancel"
    say "source: migrate_cancel (was $m)"
    qmp "$src" --wait-status cancelled,failed >/dev/null || fail "source migration did not settle"
    say "source: migration $(migrate_status "$src")" ;;
esac
r=$(run_status "$src")
case $r in
  running) ;;
  paused|finish-migrate|postmigrate)
    qmp "$src" cont >/dev/null || fail "source: cont (run state $r)"
    say "source: cont (was $r)" ;;
  *) qmp "$src" --timeout 10 --wait-status running >/dev/null || fail "source run state $r" ;;
esac
qmp "$src" --timeout 10 --wait-status running >/dev/null || fail "source is not running"
say "source running"
