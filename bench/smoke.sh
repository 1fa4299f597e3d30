#!/usr/bin/env bash
# Correctness run of the load generator (CTest label "bench"; no timing asserted):
# a real controller in a temporary directory on 127.0.0.1 port 0, N registered
# agents connect, one generation is published to each, every agent must verify
# it and have all its status reports acked, with no unexpected failure.
# Usage: smoke.sh MUSTER_CONTROLLER MUSTER_LOADGEN [N]
set -euo pipefail
controller=$1 loadgen=$2 n=${3:-200}
dir=$(mktemp -d "${TMPDIR:-/tmp}/muster-bench-smoke.XXXXXX")
pid=
cleanup() {
  if [[ -n $pid ]]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  rm -rf "$dir"
}
trap cleanup EXIT

"$controller" init --state-dir "$dir/state" >/dev/null
"$loadgen" register --state-dir "$dir/state" --count "$n" >/dev/null
"$controller" run --state-dir "$dir/state" --listen 127.0.0.1:0 --log-level info \
  >"$dir/controller.log" 2>&1 &
pid=$!
port=
for _ in $(seq 1 100); do
  port=$(sed -n 's/.*listening on 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$dir/controller.log" | head -n1)
  [[ -n $port ]] && break
  kill -0 "$pid" 2>/dev/null || { cat "$dir/controller.log" >&2; exit 1; }
  sleep 0.1
done
[[ -n $port ]] || { echo "controller did not report its port" >&2; cat "$dir/controller.log" >&2; exit 1; }

if ! timeout 50 "$loadgen" run --state-dir "$dir/state" --port "$port" --count "$n" \
    --publish --publish-timeout 30 --stage-timeout 30 --check --json "$dir/result.json" >/dev/null; then
  echo "load generator run failed:" >&2
  cat "$dir/result.json" >&2 2>/dev/null || true
  tail -n 30 "$dir/controller.log" >&2
  exit 1
fi
python3 - "$dir/result.json" "$n" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); n = int(sys.argv[2])
f = r["fanout"]; c = r["counters"]
assert r["ok"], r.get("failures")
assert f["notified"] == n and f["acknowledged"] == n and f["publishOk"] == n, f
assert c["welcomes"] >= n and c["verified"] == n and c["refused"] == 0, c
assert c["acks"] == c["reports"] == 8 * n, c
assert not r["errors"], r["errors"]
print(f"bench.smoke: {n} agents connected, verified generation {f['generation']} and had {c['acks']} reports acked")
PY
