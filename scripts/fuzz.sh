#!/usr/bin/env bash
# Run every cargo-fuzz target in crates/fuzz for SECONDS each (default 60), in turn.
# Exits non-zero if a target fails to build or finds a crash (the input lands in
# crates/fuzz/artifacts/<target>/). Corpora grow in crates/fuzz/corpus/<target>/ (git-ignored).
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# cargo fuzz builds with -Zsanitizer=address, a nightly-only flag; only a stable toolchain is
# installed on these machines, so RUSTC_BOOTSTRAP=1 lets stable rustc accept it.
set -euo pipefail

secs="${1:-60}"
shift || true
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
fuzz_dir="$root/crates/fuzz"
cd "$fuzz_dir"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi
export RUSTC_BOOTSTRAP=1

if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list --fuzz-dir "$fuzz_dir")
fi

failed=()
for t in "${targets[@]}"; do
    echo "=== fuzz $t for ${secs}s"
    mkdir -p "corpus/$t"
    start=$(date +%s)
    if cargo fuzz run --fuzz-dir "$fuzz_dir" "$t" "corpus/$t" -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1; then
        echo "=== $t: ok ($(( $(date +%s) - start ))s including build)"
    else
        echo "=== $t: FAILED (see crates/fuzz/artifacts/$t/)" >&2
        failed+=("$t")
    fi
done

if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzz.sh: ${#failed[@]} target(s) failed: ${failed[*]}" >&2
    exit 1
fi
echo "fuzz.sh: ${#targets[@]} target(s) ran ${secs}s each without a crash"
