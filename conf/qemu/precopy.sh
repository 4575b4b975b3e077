#!/usr/bin/env bash
# precopy hook: start the live migration and wait until the source is paused before switchover.
# Destination: capabilities events + late-block-activate (block devices stay inactive until
# `cont`), then migrate-incoming on $IRONLUN_MIGRATE_URI. Source: capabilities
# pause-before-switchover + events, then migrate; waits for status pre-switchover (vCPUs
# stopped, device state not yet sent, block devices still active on the source).
# Re-running it after success is a no-op. See hooks-common.sh for the environment.
. "$(dirname "$0")/hooks-common.sh"
need IRONLUN_QMP_SRC; need IRONLUN_QMP_DST; need IRONLUN_MIGRATE_URI
src=$IRONLUN_QMP_SRC dst=$IRONLUN_QMP_DST uri=$IRONLUN_MIGRATE_URI

s=$(migrate_status "$src") || fail "source QMP $src unreachable"
if [ "$s" = pre-switchover ]; then
  say "source already at pre-switchover; nothing to do"
  exit 0
fi
case $s in
  none|completed|failed|cancelled) ;;
  *) fail "source migration already in progress (status $s)" ;;
esac

d=$(migrate_status "$dst") || fail "destination QMP $dst unreachable"
case $d in
  none|setup) ;;   # setup: also after a migrate-incoming that failed to listen (it may be retried)
  *) fail "destination migration status is $d, not waiting for an incoming migration" ;;
esac
caps='{"capabilities":[{"capability":"events","state":true},{"capability":"late-block-activate","state":true}]}'
if ! err=$(qmp "$dst" migrate-set-capabilities "$caps" 2>&1 >/dev/null); then
  [ "$d" = setup ] || fail "destination: migrate-set-capabilities: $err"
fi
if err=$(qmp "$dst" migrate-incoming "{\"uri\":\"$uri\"}" 2>&1 >/dev/null); then
  say "destination listening on $uri (late-block-activate)"
else
  case $err in
    *"already been started"*) say "destination already listening (migrate-incoming done before)" ;;
    *) fail "destination: migrate-incoming $uri: $err" ;;
  esac
fi

qmp "$src" migrate-set-capabilities '{"capabilities":[{"capability":"events","state":true},{"capability":"pause-before-switchover","state":true}]}' >/dev/null ||
  fail "source: migrate-set-capabilities"
if [ -n "${IRONLUN_MIGRATE_MAX_BW:-}" ]; then
  qmp "$src" migrate-set-parameters "{\"max-bandwidth\":$IRONLUN_MIGRATE_MAX_BW}" >/dev/null ||
    fail "source: migrate-set-parameters max-bandwidth"
fi
qmp "$src" migrate "{\"uri\":\"$uri\"}" >/dev/null || fail "source: migrate $uri"
say "source migrating to $uri (pause-before-switchover)"
qmp "$src" --wait-status pre-switchover >/dev/null || fail "source did not reach pre-switchover"
say "source paused at pre-switchover"
