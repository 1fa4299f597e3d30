#!/usr/bin/env bash
# Fleet benchmarks, wave 2 (docs/BENCHMARKS.md, "Wave 2"): what an operator does
# to a large fleet, and what the controller costs while it waits.
#
#   bench/wave2.sh BUILD_DIR OUT_DIR [SCENARIOS]
#
# BUILD_DIR holds muster-controller, muster-agent, muster (the CLI) and
# muster-loadgen (a RelWithDebInfo build). SCENARIOS (default all), any of:
#   baseline   in-memory mTLS handshake rate, 1 and nproc threads
#   idle       connect storm and idle hold at STAGES, IDLE seconds each
#   rollout    one 'muster publish --all' over N agents (vars sealed to each)
#   waves      the same with --max-parallel WAVE
#   pipelined  N single-machine publishes pipelined over one connection
#   storm      SIGKILL + restart under N agents, RUNS times
#   agent      the real muster-agent idle for AGENT_IDLE seconds
# Knobs: N=10000 STAGES=1000,10000 IDLE=120 WAVE=1000 RUNS=5 AGENT_IDLE=60
#        PORT=17643 PING=50 (the agents' ping interval; 25 for agents before wave 2)
#        RESTART_WRAP='perf record -g -o F --' runs the restarted controller of
#        the storm under a profiler (or any other command prefix)
#        CTL_ARGS='--metrics-listen 127.0.0.1:P' more controller options
#        LG_ARGS='--defer-agent-work' more load generator options
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
build=$(cd "$1" && pwd)
out=$2
scenarios=${3:-baseline idle rollout waves pipelined storm agent}
N=${N:-10000} STAGES=${STAGES:-1000,10000} IDLE=${IDLE:-120} WAVE=${WAVE:-1000}
RUNS=${RUNS:-5} AGENT_IDLE=${AGENT_IDLE:-60} PORT=${PORT:-17643} PING=${PING:-50}
ctl=$build/controller/muster-controller agent=$build/agent/muster-agent
cli=$build/controller/cli/muster lg=$build/bench/muster-loadgen
for b in "$ctl" "$agent" "$cli" "$lg"; do [[ -x $b ]] || { echo "missing $b" >&2; exit 2; }; done
mkdir -p "$out"
ulimit -n "$(ulimit -Hn)"
log() { echo "[$(date +%T)] $*" >&2; }
ctl_pid=
cleanup() {
  [[ -n $ctl_pid ]] && kill "$ctl_pid" 2>/dev/null || true
  [[ -f $out/restarted.pid ]] && kill "$(cat "$out/restarted.pid")" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap cleanup EXIT

{
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), nproc $(nproc)"
  echo "memory: $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo), kernel $(uname -r)"
  echo "build: $build ($(git -C "$build/../.." rev-parse --short HEAD 2>/dev/null || echo '?'))"
  echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee "$out/machine.txt" >&2

state=$out/state
fresh_state() {
  rm -rf "$state" "$out/xdg" "$out/operator.key"
  pin=$("$ctl" init --state-dir "$state" | sed -n 's/^pin: *//p')
  "$lg" register --state-dir "$state" --count $((N + 1)) >"$out/register.json"
  "$lg" operator-key --out "$out/operator.key" >/dev/null
  printf '{"controller": "wss://127.0.0.1:%s", "pin": "%s", "key": "%s"}\n' \
    "$PORT" "$pin" "$out/operator.key" >"$out/cli.json"
}
run_cmd() {  # the controller command line (also the restart command, with $1 as prefix)
  echo "exec ${1:-} '$ctl' run --state-dir '$state' --listen 127.0.0.1:$PORT ${CTL_ARGS:-} --log-level warn >>'$out/controller.log' 2>&1"
}
start_controller() {
  sh -c "$(run_cmd)" &
  ctl_pid=$!
  for _ in $(seq 1 200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "controller did not start" >&2; exit 1
}
stop_controller() {
  [[ -n $ctl_pid ]] && { kill "$ctl_pid" 2>/dev/null || true; wait "$ctl_pid" 2>/dev/null || true; }
  ctl_pid=
  if [[ -f $out/restarted.pid ]]; then
    kill "$(cat "$out/restarted.pid")" 2>/dev/null || true
    while kill -0 "$(cat "$out/restarted.pid")" 2>/dev/null; do sleep 0.1; done
    rm -f "$out/restarted.pid"
  fi
}
loadgen() { "$lg" run --state-dir "$state" --port "$PORT" --ping-interval "$PING" ${LG_ARGS:-} "$@"; }
mkdir -p "$out/vars/activation"
head -c 2048 /dev/urandom | base64 -w 76 >"$out/vars/activation/secret"  # ~2.7 KiB per machine
top=/nix/store/0123456789abcdfghijklmnpqrsvwxyz-nixos-system-bench
publish_cmd() {
  echo "XDG_STATE_HOME='$out/xdg' '$cli' --config '$out/cli.json' publish --all --yes --vars '$out/vars' $* $top >>'$out/publish.log' 2>&1"
}

for s in $scenarios; do
  case $s in
    baseline)
      log "baseline"
      "$lg" baseline --threads 1 --seconds 5 >"$out/baseline-1.json"
      "$lg" baseline --threads "$(nproc)" --seconds 5 >"$out/baseline-n.json"
      cat "$out/baseline-1.json" "$out/baseline-n.json" >&2 ;;
    idle)
      log "idle at $STAGES"
      fresh_state; start_controller
      loadgen --count "${STAGES##*,}" --stages "$STAGES" --idle "$IDLE" --controller-pid "$ctl_pid" \
        --threads 2 --json "$out/idle.json" >/dev/null || log "idle: failures (see idle.json)"
      stop_controller ;;
    rollout | waves)
      extra=; [[ $s == waves ]] && extra="--max-parallel $WAVE"
      log "$s: muster publish --all $extra over $N agents"
      fresh_state; start_controller
      loadgen --count "$N" --threads 2 --publish-cmd "$(publish_cmd $extra)" \
        ${extra:+--max-parallel $WAVE} --publish-timeout 300 --controller-pid "$ctl_pid" \
        --json "$out/$s.json" >/dev/null || log "$s: failures (see $s.json)"
      stop_controller ;;
    pipelined)
      log "pipelined: $N single publishes over one connection"
      fresh_state; start_controller
      loadgen --count "$N" --threads 2 --publish --publish-timeout 300 --controller-pid "$ctl_pid" \
        --json "$out/pipelined.json" >/dev/null || log "pipelined: failures"
      stop_controller ;;
    storm)
      fresh_state
      for r in $(seq 1 "$RUNS"); do
        log "storm $r/$RUNS: SIGKILL and restart under $N agents"
        start_controller
        loadgen --count "$N" --threads 2 --controller-pid "$ctl_pid" --restart-cmd "$(run_cmd "${RESTART_WRAP:-}")" \
          --pid-file "$out/restarted.pid" --reconnect-timeout 300 \
          --json "$out/storm-$r.json" >/dev/null || log "storm $r: failures"
        wait "$ctl_pid" 2>/dev/null || true; ctl_pid=
        stop_controller
      done
      "$lg" baseline --threads "$(nproc)" --seconds 5 >"$out/baseline-after-storm.json" ;;
    agent)
      log "the real agent idle for ${AGENT_IDLE}s"
      fresh_state; start_controller
      adir=$out/agent; rm -rf "$adir"; mkdir -p "$adir/state" "$adir/vars"
      "$lg" agent-key --index "$N" --out "$adir/state/machine.key" >/dev/null
      opkey=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["operatorKey"])' "$out/register.json")
      printf '{"machine": "bench-%06d", "controllers": ["wss://127.0.0.1:%s"], "controllerPin": "%s", "trustedOperatorKeys": ["%s"], "stateDir": "%s/state", "varsDir": "%s/vars", "profile": "%s/profile", "currentSystem": "%s/current-system", "bootedSystem": "%s/booted-system", "systemdRun": "never"}\n' \
        "$N" "$PORT" "$pin" "$opkey" "$adir" "$adir" "$adir" "$adir" "$adir" >"$adir/agent.json"
      "$agent" --config "$adir/agent.json" >"$out/agent.log" 2>&1 &
      apid=$!
      sleep 5
      python3 - "$apid" "$AGENT_IDLE" >"$out/agent.json" <<'PY'
import json, os, sys, time
pid, secs = int(sys.argv[1]), float(sys.argv[2])
tck = os.sysconf("SC_CLK_TCK")
def sample():
    st = open(f"/proc/{pid}/stat").read()
    f = st[st.rfind(")") + 2:].split()
    return time.monotonic(), (int(f[11]) + int(f[12])) / tck
t0, c0 = sample(); time.sleep(secs); t1, c1 = sample()
roll = {l.split(":")[0]: int(l.split()[1]) for l in open(f"/proc/{pid}/smaps_rollup") if l.endswith("kB\n")}
kv = dict(l.split(":", 1) for l in open(f"/proc/{pid}/status") if ":" in l)
print(json.dumps({"seconds": t1 - t0, "cpuPercentOfOneCore": (c1 - c0) / (t1 - t0) * 100,
                  "rssKiB": int(kv["VmRSS"].split()[0]), "pssKiB": roll.get("Pss"),
                  "privateKiB": roll.get("Private_Clean", 0) + roll.get("Private_Dirty", 0),
                  "anonymousKiB": roll.get("Anonymous"), "threads": int(kv["Threads"])}))
PY
      kill "$apid" 2>/dev/null || true; wait "$apid" 2>/dev/null || true
      cat "$out/agent.json" >&2
      stop_controller ;;
    *) echo "unknown scenario $s" >&2; exit 2 ;;
  esac
done
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$out/machine.txt"
log "results in $out"
