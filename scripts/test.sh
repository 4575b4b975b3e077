#!/usr/bin/env bash
# The one test command: installs what the tests need, then runs every tier (DESIGN.md §4).
#   1-4  unit, property, in-memory pair and daemon tests      cargo test --workspace
#        (and the bench report renderers: python3 -m unittest discover -s scripts/bench)
#   5    fuzz targets, each for FUZZ_SECONDS (default: 60, vhd_open 120)  scripts/fuzz.sh
#   6    real initiators against the release daemon            cargo test -p ironlun-initiator-tests
#   7    the Linux initiator stack in QEMU guests               cargo test -p ironlun-initiator-tests --test 'linux_*'
#        (scripts/guest/linux/build.sh builds the guest once; cached under target/linux-guest)
# Env: FUZZ_SECONDS=N (0 skips tier 5 — for local iteration only; CI runs it).
set -euo pipefail
cd "$(dirname "$0")/.."
FUZZ_SECONDS=${FUZZ_SECONDS:-default}

echo "== installing test dependencies"
bash scripts/install-deps.sh

echo "== layers: crate dependencies and the daemon's module imports (scripts/check-layers.py)"
PYTHONDONTWRITEBYTECODE=1 python3 -m unittest discover -s scripts -p 'test_check_layers.py'
python3 scripts/check-layers.py

echo "== tier 1: the benchmark report renderers (scripts/bench: results, table, chart)"
PYTHONDONTWRITEBYTECODE=1 python3 -m unittest discover -s scripts/bench -p 'test_*.py'

echo "== tiers 1-4: unit, property, in-memory and daemon tests"
cargo build --release -p ironlun
cargo test --workspace --exclude ironlun-initiator-tests

echo "== tier 6: real initiators (libiscsi, qemu-img) against the release daemon"
tier6=(--lib)
for f in initiator-tests/tests/*.rs; do
  n=$(basename "$f" .rs)
  case $n in linux_*) ;; *) tier6+=(--test "$n") ;; esac   # linux_*: tier 7
done
cargo test --release -p ironlun-initiator-tests "${tier6[@]}" -- --test-threads=1 --nocapture

echo "== tier 7: the Linux initiator stack (open-iscsi, multipath, sg3-utils, fio, fence_scsi, Pacemaker) in QEMU guests"
cargo test --release -p ironlun-initiator-tests --test 'linux_*' -- --test-threads=1 --nocapture

echo "== tier 5: io_uring cancellation under AddressSanitizer (backstore tests and the daemon)"
asan=(env RUSTFLAGS=-Zsanitizer=address RUSTC_BOOTSTRAP=1 CARGO_TARGET_DIR=target/asan)
"${asan[@]}" cargo test --release -p ironlun-backstore --target x86_64-unknown-linux-gnu --test uring
"${asan[@]}" cargo build --release -p ironlun --target x86_64-unknown-linux-gnu
IRONLUN_BIN="$PWD/target/asan/x86_64-unknown-linux-gnu/release/ironlun" \
  cargo test --release -p ironlun-initiator-tests --test uring_cancel -- --nocapture

if [ "$FUZZ_SECONDS" != 0 ]; then
  echo "== tier 5: fuzz targets (seconds each: ${FUZZ_SECONDS})"
  bash scripts/fuzz.sh "$FUZZ_SECONDS"
else
  echo "== tier 5 skipped (FUZZ_SECONDS=0)"
fi
echo "== all tiers passed"
