#!/usr/bin/env bash
# 200 simulated machines fetch the same closure from the controller's binary
# cache at once (docs/BENCHMARKS.md, "Closures"): controller throughput and CPU
# per GiB served. Not a test: nothing is asserted about time.
#
#   bench/fetch_fanout.sh BIN_DIR [MIB] [MACHINES] [THREADS]
#
# BIN_DIR holds muster-controller, muster and muster-loadgen (a release build).
# Builds a toplevel whose closure holds MIB (default 100) of random data with
# nix, uploads it with `muster cache push` as the bench operator, publishes it
# to MACHINES (default 200) bench machines and has them fetch it over their
# agent connections (bench/fetch.h). Prints the load generator's JSON.
set -euo pipefail
bin=$(realpath "$1") mib=${2:-100} n=${3:-200} threads=${4:-1}
here=$(cd "$(dirname "$0")" && pwd)
dir=$(mktemp -d "${TMPDIR:-/tmp}/muster-fetch-fanout.XXXXXX")
pid=
cleanup() {
  if [[ -n $pid ]]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  if [[ -n ${top:-} ]]; then
    for p in $(nix-store -q --requisites "$top" 2>/dev/null | tac); do nix-store --delete "$p" >/dev/null 2>&1 || true; done
  fi
  rm -rf "$dir"
}
trap cleanup EXIT
export NIX_CONFIG=${NIX_CONFIG:-$'sandbox = false\nbuild-users-group =\nexperimental-features = nix-command\nsubstituters ='}

"$bin/muster-controller" init --state-dir "$dir/state" >"$dir/init.txt"
pin=$(sed -n 's/.*pin:[[:space:]]*\(sha256:[0-9a-f]*\).*/\1/p' "$dir/init.txt" | head -n1)
"$bin/muster-loadgen" register --state-dir "$dir/state" --count "$n" >/dev/null
"$bin/muster-loadgen" operator-key --out "$dir/operator.key" >/dev/null
"$bin/muster-controller" run --state-dir "$dir/state" --listen 127.0.0.1:0 --log-level info \
  >"$dir/controller.log" 2>&1 &
pid=$!
port=
for _ in $(seq 1 100); do
  port=$(sed -n 's/.*listening on 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$dir/controller.log" | head -n1)
  [[ -n $port ]] && break
  kill -0 "$pid" 2>/dev/null || { cat "$dir/controller.log" >&2; exit 1; }
  sleep 0.1
done
[[ -n $port ]] || { echo "controller did not report its port" >&2; exit 1; }
printf '{"controller": "wss://127.0.0.1:%s", "pin": "%s", "key": "%s"}\n' "$port" "$pin" \
  "$dir/operator.key" >"$dir/cli.json"
export XDG_STATE_HOME=$dir/cli-state
"$bin/muster" --config "$dir/cli.json" key generate --cache --out "$dir/cache.key" >/dev/null 2>&1

top=$(nix-build --no-out-link "$here/../tests/integration/toplevel.nix" --argstr name fanout \
  --argstr salt "fanout-$$-$(date +%s)" --argstr payload $((mib << 20)) 2>/dev/null | tail -n1)
"$bin/muster" --config "$dir/cli.json" cache push "$top" --cache-key "$dir/cache.key" >/dev/null
hashes=$(nix-store -q --requisites "$top" | sed 's|/nix/store/\([a-z0-9]\{32\}\)-.*|\1|' | paste -sd,)

"$bin/muster-loadgen" fetch --state-dir "$dir/state" --port "$port" --count "$n" --toplevel "$top" \
  --hashes "$hashes" --threads "$threads" --controller-pid "$pid"
