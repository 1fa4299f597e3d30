#!/usr/bin/env bash
# Builds the libFuzzer targets (preset "fuzz", clang + libclang-rt-14-dev) into
# build/fuzz and runs each for DURATION_SECONDS; exits non-zero on any crash,
# leak, sanitizer report or build failure. CI: tests/fuzz/run-fuzzers.sh 20
#
# The committed seeds in tests/fuzz/corpus/<target> are read only; new inputs go
# to build/fuzz/corpus/<target>, crash reproducers to build/fuzz/artifacts/<target>/.
# Reproduce a crash with: build/fuzz/tests/fuzz/<target> <artifact>
set -euo pipefail

duration=${1:-}
if [[ ! $duration =~ ^[0-9]+$ || $duration -eq 0 ]]; then
  echo "usage: $0 DURATION_SECONDS   (per target, e.g. 20 in CI)" >&2
  exit 2
fi

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
build="$root/build/fuzz"
targets=(fuzz_protocol fuzz_manifest fuzz_vars_bundle fuzz_utf8)
jobs=${FUZZ_BUILD_JOBS:-$(nproc)}

cd "$root"
cmake --preset fuzz >/dev/null
cmake --build "$build" --parallel "$jobs" --target "${targets[@]}"

failed=()
for t in "${targets[@]}"; do
  seeds="$root/tests/fuzz/corpus/${t#fuzz_}"
  work="$build/corpus/${t#fuzz_}"
  artifacts="$build/artifacts/$t/"
  mkdir -p "$work" "$artifacts"
  log="$build/$t.log"
  echo "== $t: ${duration}s"
  if "$build/tests/fuzz/$t" -max_len=65536 -max_total_time="$duration" -timeout=10 \
      -rss_limit_mb=2048 -print_final_stats=1 -dict="$root/tests/fuzz/muster.dict" \
      -artifact_prefix="$artifacts" "$work" "$seeds" >"$log" 2>&1; then
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1)
    echo "   ok: ${execs:-?} executions, ${cov:-cov: ?}, corpus $(find "$work" -type f | wc -l) inputs"
  else
    echo "   FAILED; last lines of $log:" >&2
    tail -n 40 "$log" >&2
    failed+=("$t")
  fi
done

if ((${#failed[@]})); then
  echo "fuzzers failed: ${failed[*]} (reproducers in $build/artifacts/)" >&2
  exit 1
fi
echo "all fuzzers passed"
