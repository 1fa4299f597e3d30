#!/usr/bin/env bash
# Fleet benchmarks, reproducible from one command (figures: docs/BENCHMARKS.md).
#
#   bench/run.sh [BUILD_DIR] [OUT_DIR]
#
# BUILD_DIR defaults to build/bench (configure it with -DCMAKE_BUILD_TYPE=RelWithDebInfo
# and build muster-loadgen, muster-controller and muster-agent); OUT_DIR to
# /tmp/muster-bench-<date>. Everything runs on loopback and stops by itself.
# Knobs (environment):
#   STAGES=1000,10000,19000  idle-hold stages (agents connected in turn)
#   IDLE=60                  seconds of idle measured at each stage
#   FANOUT=10000             agents for the fan-out and the reconnect storm
#   AGENT_IDLE=60            seconds the real muster-agent is held idle
#   BASELINE_SECONDS=5       length of the in-memory handshake baseline
#   LOADGEN_THREADS=2        load generator worker threads
#   PORT=17443               controller port (fixed: the restarted controller reuses it)
#
# Scenarios: (0) machine and mTLS handshake baseline, (1) connect storm and
# (2) idle hold at each stage, (3) fan-out of one generation to FANOUT agents,
# (4) SIGKILL + restart of the controller under FANOUT agents with the agents'
# real backoff, (5) the real agent idle. Results: OUT_DIR/*.json and summary.md.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
build=$(cd "${1:-$here/../build/bench}" && pwd)
out=${2:-/tmp/muster-bench-$(date +%Y%m%d-%H%M%S)}
STAGES=${STAGES:-1000,10000,19000}
IDLE=${IDLE:-60}
FANOUT=${FANOUT:-10000}
AGENT_IDLE=${AGENT_IDLE:-60}
BASELINE_SECONDS=${BASELINE_SECONDS:-5}
LOADGEN_THREADS=${LOADGEN_THREADS:-2}
PORT=${PORT:-17443}

ctl=$build/controller/muster-controller
agent=$build/agent/muster-agent
lg=$build/bench/muster-loadgen
for b in "$ctl" "$agent" "$lg"; do [[ -x $b ]] || { echo "missing $b; build it first" >&2; exit 2; }; done
mkdir -p "$out"
state=$out/state
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  [[ -f $out/controller.pid ]] && kill "$(cat "$out/controller.pid")" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap cleanup EXIT

# Both processes hold one descriptor per agent; raise the soft limit to the hard one.
ulimit -n "$(ulimit -Hn)"
max_stage=$(tr ',' '\n' <<<"$STAGES" | sort -n | tail -n1)
need=$(( max_stage > FANOUT ? max_stage : FANOUT ))
real_agent_index=$need  # registered, never published to: the real agent stays idle

log() { echo "[$(date +%T)] $*" >&2; }

start_controller() {  # start_controller LOGFILE → sets ctl_pid
  : >"$1"
  "$ctl" run --state-dir "$state" --listen "127.0.0.1:$PORT" >>"$1" 2>&1 &
  ctl_pid=$!
  pids+=("$ctl_pid")
  for _ in $(seq 1 200); do
    grep -q "listening on 127.0.0.1:$PORT" "$1" && return 0
    kill -0 "$ctl_pid" 2>/dev/null || { tail "$1" >&2; exit 1; }
    sleep 0.05
  done
  echo "controller did not start" >&2; exit 1
}
stop_controller() {
  kill "$ctl_pid" 2>/dev/null || true
  wait "$ctl_pid" 2>/dev/null || true
}

log "machine"
{
  echo "nproc: $(nproc)"
  echo "memory: $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
  echo "kernel: $(uname -r)"
  echo "open files (hard limit): $(ulimit -Hn)"
  echo "openssl: $(openssl version 2>/dev/null || echo '?')"
  echo "commit: $(git -C "$here/.." rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
  # The store commits every report with fdatasync: its latency bounds write rates.
  python3 - "$out" <<'PY'
import os, statistics, sys, time
path = os.path.join(sys.argv[1], "fsync-probe")
fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
lat = []
for _ in range(200):
    os.write(fd, b"x" * 4096)
    t = time.perf_counter(); os.fdatasync(fd); lat.append((time.perf_counter() - t) * 1000)
os.close(fd); os.unlink(path)
lat.sort()
print(f"fdatasync of 4 KiB on the state disk: p50 {lat[100]:.2f} ms, p99 {lat[198]:.2f} ms")
PY
} | tee "$out/machine.txt" >&2

log "scenario 0: mTLS handshake baseline (in memory, TLS 1.3, Ed25519 both ways)"
"$lg" baseline --threads 1 --seconds "$BASELINE_SECONDS" >"$out/baseline-1.json"
"$lg" baseline --threads "$(nproc)" --seconds "$BASELINE_SECONDS" >"$out/baseline-n.json"
cat "$out/baseline-1.json" "$out/baseline-n.json" >&2

log "registering $((need + 1)) machines"
rm -rf "$state"
pin=$("$ctl" init --state-dir "$state" | sed -n 's/^pin: *//p')
"$lg" register --state-dir "$state" --count $((need + 1)) >"$out/register.json"
cat "$out/register.json" >&2

log "scenarios 1+2: connect storm and idle hold at $STAGES"
start_controller "$out/controller-idle.log"
"$lg" run --state-dir "$state" --port "$PORT" --count "$max_stage" --stages "$STAGES" \
  --idle "$IDLE" --controller-pid "$ctl_pid" --threads "$LOADGEN_THREADS" \
  --json "$out/idle.json" >/dev/null || log "idle run reported failures (see idle.json)"
stop_controller

log "scenarios 3+4: fan-out to $FANOUT agents, then SIGKILL and restart under them"
start_controller "$out/controller-fanout.log"
"$lg" run --state-dir "$state" --port "$PORT" --count "$FANOUT" --publish \
  --controller-pid "$ctl_pid" --threads "$LOADGEN_THREADS" \
  --restart-cmd "exec '$ctl' run --state-dir '$state' --listen 127.0.0.1:$PORT >>'$out/controller-restarted.log' 2>&1" \
  --pid-file "$out/controller.pid" --json "$out/fanout.json" >/dev/null ||
  log "fan-out run reported failures (see fanout.json)"
kill "$ctl_pid" 2>/dev/null || true  # already SIGKILLed; reap
wait "$ctl_pid" 2>/dev/null || true
if [[ -f $out/controller.pid ]]; then
  rpid=$(cat "$out/controller.pid")
  kill "$rpid" 2>/dev/null || true
  for _ in $(seq 1 100); do kill -0 "$rpid" 2>/dev/null || break; sleep 0.1; done
  rm -f "$out/controller.pid"
fi

log "scenario 5: the real agent idle for ${AGENT_IDLE}s"
start_controller "$out/controller-agent.log"
adir=$out/agent
mkdir -p "$adir/state" "$adir/vars"
"$lg" agent-key --index "$real_agent_index" --out "$adir/state/machine.key" >/dev/null
opkey=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["operatorKey"])' "$out/register.json")
name=$(printf 'bench-%06d' "$real_agent_index")
cat >"$adir/agent.json" <<EOF
{"machine": "$name", "controllers": ["wss://127.0.0.1:$PORT"], "controllerPin": "$pin",
 "trustedOperatorKeys": ["$opkey"], "stateDir": "$adir/state", "varsDir": "$adir/vars",
 "profile": "$adir/profile", "currentSystem": "$adir/current-system",
 "bootedSystem": "$adir/booted-system", "systemdRun": "never"}
EOF
"$agent" --config "$adir/agent.json" >"$out/agent.log" 2>&1 &
apid=$!
pids+=("$apid")
sleep 5
grep -q "connected to the controller" "$out/agent.log" || { log "agent did not connect"; tail "$out/agent.log" >&2; }
python3 - "$apid" "$AGENT_IDLE" >"$out/agent.json" <<'PY'
import json, os, sys, time
pid, secs = int(sys.argv[1]), float(sys.argv[2])
tck = os.sysconf("SC_CLK_TCK")
def sample():
    st = open(f"/proc/{pid}/stat").read()
    f = st[st.rfind(")") + 2:].split()
    kv = dict(l.split(":", 1) for l in open(f"/proc/{pid}/status") if ":" in l)
    kib = lambda k: int(kv[k].split()[0])
    return time.monotonic(), (int(f[11]) + int(f[12])) / tck, kib("VmRSS"), kib("VmHWM"), int(kv["Threads"])
t0, c0, *_ = sample()
time.sleep(secs)
t1, c1, rss, hwm, threads = sample()
roll = {l.split(":")[0]: int(l.split()[1]) for l in open(f"/proc/{pid}/smaps_rollup") if l.endswith("kB\n")}
print(json.dumps({"seconds": t1 - t0, "cpuPercentOfOneCore": (c1 - c0) / (t1 - t0) * 100,
                  "rssKiB": rss, "hwmKiB": hwm, "threads": threads, "pssKiB": roll.get("Pss"),
                  "privateKiB": roll.get("Private_Clean", 0) + roll.get("Private_Dirty", 0),
                  "anonymousKiB": roll.get("Anonymous")}))
PY
kill "$apid" 2>/dev/null || true
wait "$apid" 2>/dev/null || true
stop_controller
cat "$out/agent.json" >&2

echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$out/machine.txt"
python3 "$here/summarize.py" "$out" >"$out/summary.md"
cat "$out/summary.md"
log "results in $out"
