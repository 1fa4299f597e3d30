#!/usr/bin/env bash
# Correctness run of a fleet rollout and a reconnect storm (CTest label "bench";
# no timing asserted): a real controller that handshakes only 4 connections at
# a time, N simulated agents connecting all at once (so most wait their turn in
# the admission queue), one 'muster publish --all' rollout over them with a
# vars bundle sealed to each, then SIGKILL and restart of the controller under
# them. Every agent must connect without a cut handshake, verify and open its
# generation, have its reports acked, and come back after the restart.
# Usage: rollout_smoke.sh MUSTER_CONTROLLER MUSTER_LOADGEN MUSTER_CLI [N]
set -euo pipefail
controller=$1 loadgen=$2 cli=$3 n=${4:-300}
dir=$(mktemp -d "${TMPDIR:-/tmp}/muster-rollout-smoke.XXXXXX")
cleanup() {
  for f in "$dir"/controller*.pid; do
    [[ -f $f ]] && kill "$(cat "$f")" 2>/dev/null || true
  done
  rm -rf "$dir"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port=$(free_port) mport=$(free_port)
pin=$("$controller" init --state-dir "$dir/state" | sed -n 's/^pin: *//p')
"$loadgen" register --state-dir "$dir/state" --count "$n" >/dev/null
"$loadgen" operator-key --out "$dir/operator.key" >/dev/null
printf '{"controller": "wss://127.0.0.1:%s", "pin": "%s", "key": "%s"}\n' \
  "$port" "$pin" "$dir/operator.key" >"$dir/cli.json"
mkdir -p "$dir/vars/activation"
head -c 3000 /dev/urandom | base64 >"$dir/vars/activation/secret"

run_controller="exec '$controller' run --state-dir '$dir/state' --listen 127.0.0.1:$port \
  --max-handshakes 4 --metrics-listen 127.0.0.1:$mport --log-level warn >>'$dir/controller.log' 2>&1"
sh -c "$run_controller" &
echo $! >"$dir/controller.pid"
for _ in $(seq 1 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  sleep 0.1
done

publish="XDG_STATE_HOME='$dir/xdg' '$cli' --config '$dir/cli.json' publish --all --yes \
  --vars '$dir/vars' /nix/store/0123456789abcdfghijklmnpqrsvwxyz-nixos-system-bench >'$dir/publish.log' 2>&1"
if ! timeout 110 "$loadgen" run --state-dir "$dir/state" --port "$port" --count "$n" \
    --inflight "$n" --stage-timeout 40 --publish-cmd "$publish" --publish-timeout 30 \
    --controller-pid "$(cat "$dir/controller.pid")" --restart-cmd "$run_controller" \
    --pid-file "$dir/controller2.pid" --reconnect-timeout 40 --check \
    --json "$dir/result.json" >/dev/null 2>"$dir/loadgen.log"; then
  echo "load generator run failed:" >&2
  cat "$dir/result.json" >&2 2>/dev/null || tail -n 20 "$dir/loadgen.log" >&2
  cat "$dir/publish.log" >&2 2>/dev/null || true
  tail -n 30 "$dir/controller.log" >&2
  exit 1
fi
# What the restarted controller refused while the fleet came back.
metrics=$(python3 - "$mport" <<'PY'
import sys, time, urllib.request
for _ in range(50):
    try:
        print(urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=5).read().decode())
        break
    except OSError:
        time.sleep(0.1)
PY
)
echo "$metrics" >"$dir/metrics.txt"
python3 - "$dir/result.json" "$n" "$dir/metrics.txt" <<'PY'
import json, re, sys
r = json.load(open(sys.argv[1])); n = int(sys.argv[2]); metrics = open(sys.argv[3]).read()
assert r["ok"], r.get("failures")
st = r["stages"][0]["storm"]; ro = r["rollout"]; rc = r["reconnect"]; c = r["counters"]
# Connecting all at once through 4 handshake slots: nobody was cut.
assert c["welcomes"] >= 2 * n and not r["errors"], (c, r["errors"])
assert ro["notified"] == n and ro["acknowledged"] == n, ro
assert c["verified"] == n and c["refused"] == 0, c
assert rc["returned"] == n, rc
assert "muster_admission_waits_total" in metrics, metrics[:500]
cut = {m.group(1): int(m.group(2)) for m in
       re.finditer(r'muster_refusals_total\{reason="([^"]+)"\} (\d+)', metrics)
       if m.group(1).startswith(("handshake", "admission"))}
assert not cut, f"the restarted controller cut handshakes: {cut}"
waits = int(re.search(r"muster_admission_waits_total (\d+)", metrics).group(1))
assert waits > 0, "nobody waited for a slot: the admission queue was not exercised"
print(f"bench.rollout_smoke: {n} agents through 4 handshake slots; 'muster publish --all' "
      f"returned in {ro['commandSeconds']:.2f} s, all acked {ro['ackMs']['max']:.0f} ms after it "
      f"started; after SIGKILL all back in {rc['secondsToAllBack']:.1f} s; "
      f"{waits} waited for one of its 4 handshake slots, none cut; "
      f"expected failures while down: {rc['expectedFailures']}")
PY
