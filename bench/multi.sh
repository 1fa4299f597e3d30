#!/usr/bin/env bash
# Several controllers on PostgreSQL (docs/BENCHMARKS.md, "Several controllers
# on PostgreSQL (issue 13)"): one 'muster publish --all' over N simulated
# agents, spread over two controllers sharing one PostgreSQL database, and the
# same rollout on one controller with PostgreSQL and on one with SQLite as
# baselines, all in one run.
#
#   bench/multi.sh BUILD_DIR OUT_DIR [SCENARIOS]
#
# BUILD_DIR holds muster-controller, muster (the CLI) and muster-loadgen (a
# RelWithDebInfo build). SCENARIOS (default "sqlite pg1 pg2"):
#   sqlite  one controller, SQLite store (the embedded default)
#   pg1     one controller, PostgreSQL store
#   pg2     two controllers, one PostgreSQL database, N/2 agents on each; the
#           CLI talks to the first (which drives the rollout)
#   pg2pub  two controllers as pg2, but N single-machine publishes through
#           the first at RATE per second (default 200): how long after its
#           publish was accepted each agent had its deploy, by controller
#   depart  one controller on PostgreSQL; N agents connect, then all drop at
#           once (the load generator exits): how long until the controller has
#           recorded them (agents connected = 0), how slow /metrics answers
#           meanwhile, and how long a SIGTERM stop takes afterwards
# Knobs: N=10000 RATE=200 PUBLISH_TIMEOUT=600 PORT=17643 PORT2=17644 MPORT=17653 MPORT2=17654 PING=50
# PG_STATS=1 loads pg_stat_statements and writes, per scenario, the statements
# that took the most server time (OUT_DIR/statements-SCENARIO.txt).
# PostgreSQL is Debian's (or MUSTER_PG_BIN), started by initdb/pg_ctl in
# OUT_DIR as nobody when run as root, on a Unix socket, fsync on (as SQLite).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
build=$(cd "$1" && pwd)
out=$(mkdir -p "$2" && cd "$2" && pwd)
scenarios=${3:-sqlite pg1 pg2}
N=${N:-10000} PORT=${PORT:-17643} PORT2=${PORT2:-17644} PING=${PING:-50}
MPORT=${MPORT:-17653} MPORT2=${MPORT2:-17654}
ctl=$build/controller/muster-controller cli=$build/controller/cli/muster
lg=$build/bench/muster-loadgen
for b in "$ctl" "$cli" "$lg"; do [[ -x $b ]] || { echo "missing $b" >&2; exit 2; }; done
pgbin=${MUSTER_PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)}
[[ -x $pgbin/pg_ctl ]] || pgbin=$(dirname "$(command -v pg_ctl)")
ulimit -n "$(ulimit -Hn)"
log() { echo "[$(date +%T)] $*" >&2; }
pids=()
pgdir=$out/pg
as_pg() { if [[ $(id -u) == 0 ]]; then setpriv --reuid=65534 --regid=65534 --clear-groups -- "$@"; else "$@"; fi; }
pg_stop() { [[ -f $pgdir/data/postmaster.pid ]] && as_pg "$pgbin/pg_ctl" -D "$pgdir/data" -m fast -w -s stop || true; }
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  pg_stop
}
trap cleanup EXIT

{
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), nproc $(nproc)"
  echo "memory: $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo), kernel $(uname -r)"
  echo "build: $build ($(git -C "$here/.." rev-parse --short HEAD 2>/dev/null || echo '?'))"
  echo "postgresql: $("$pgbin/postgres" --version)"
  echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee "$out/machine.txt" >&2

pg_start() {  # a fresh server and database "muster"; sets uri
  pg_stop
  rm -rf "$pgdir"; mkdir -p "$pgdir"; [[ $(id -u) == 0 ]] && chown 65534:65534 "$pgdir"
  as_pg "$pgbin/initdb" -D "$pgdir/data" -U muster --auth=trust -E UTF8 --locale=C \
    --no-instructions >/dev/null
  as_pg "$pgbin/pg_ctl" -D "$pgdir/data" -w -s -l "$pgdir/server.log" \
    -o "-k $pgdir -c listen_addresses= -c max_connections=100 ${PG_STATS:+-c shared_preload_libraries=pg_stat_statements -c pg_stat_statements.track=all}" start
  as_pg "$pgbin/createdb" -h "$pgdir" -U muster muster
  if [[ -n ${PG_STATS:-} ]]; then as_pg "$pgbin/psql" -q -h "$pgdir" -U muster muster -c 'CREATE EXTENSION pg_stat_statements'; fi
  uri="postgresql://muster@/muster?host=$pgdir"
}
# CPU seconds (utime+stime) of the PostgreSQL server: live processes plus the
# postmaster's reaped children.
pg_cpu() {
  python3 - "$pgdir/data/postmaster.pid" <<'PY'
import os, sys
tck = os.sysconf("SC_CLK_TCK")
pm = int(open(sys.argv[1]).readline())
def stat(pid):
    s = open(f"/proc/{pid}/stat").read()
    return s[s.rfind(")") + 2:].split()
total = 0
for d in os.listdir("/proc"):
    if not d.isdigit():
        continue
    try:
        f = stat(d)
        if int(d) == pm or int(f[1]) == pm:
            total += int(f[11]) + int(f[12])
            if int(d) == pm:
                total += int(f[13]) + int(f[14])
    except (OSError, IndexError):
        pass
print(total / tck)
PY
}
# The muster_notification_lag_seconds buckets of a controller's /metrics.
lag_buckets() {
  curl -s "http://127.0.0.1:$1/metrics" | sed -n 's/^muster_notification_lag_seconds_bucket{le="\([^"]*\)"} \(.*\)$/\1 \2/p'
}

state=$out/state
fresh_state() {  # registers N+1 machines (SQLite); copies them to PostgreSQL when $1 = pg
  rm -rf "$state" "$out/state2" "$out/xdg" "$out/operator.key"
  pin=$("$ctl" init --state-dir "$state" | sed -n 's/^pin: *//p')
  "$lg" register --state-dir "$state" --count $((N + 1)) >"$out/register.json"
  "$lg" operator-key --out "$out/operator.key" >/dev/null
  printf '{"controller": "wss://127.0.0.1:%s", "pin": "%s", "key": "%s"}\n' \
    "$PORT" "$pin" "$out/operator.key" >"$out/cli.json"
  store_args=()
  if [[ ${1:-} == pg ]]; then
    pg_start
    "$ctl" migrate --store "$uri" --from-sqlite "$state/muster.db" >"$out/migrate.log"
    mv "$state/muster.db" "$state/muster.db.copied"
    store_args=(--store "$uri")
    mkdir -p "$out/state2"; chmod 700 "$out/state2"
    cp -p "$state/controller.key" "$state/controller.crt" "$out/state2/"
  fi
}
start_controller() {  # DIR PORT MPORT LOG; sets last_pid
  "$ctl" run --state-dir "$1" "${store_args[@]}" --listen "127.0.0.1:$2" \
    --metrics-listen "127.0.0.1:$3" --log-level warn >>"$4" 2>&1 &
  last_pid=$!
  pids+=("$last_pid")
  for _ in $(seq 1 400); do
    (exec 3<>"/dev/tcp/127.0.0.1/$2") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "controller on $2 did not start" >&2; exit 1
}
stop_all() {  # SIGKILL: a graceful stop records N disconnects first, and nothing here is kept
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  pids=()
}
mkdir -p "$out/vars/activation"
head -c 2048 /dev/urandom | base64 -w 76 >"$out/vars/activation/secret"  # ~2.7 KiB per machine
top=/nix/store/0123456789abcdfghijklmnpqrsvwxyz-nixos-system-bench
publish_cmd="XDG_STATE_HOME='$out/xdg' '$cli' --config '$out/cli.json' publish --all --yes --vars '$out/vars' $top >>'$out/publish.log' 2>&1"

depart() {
  log "depart: $N agents connect to a PostgreSQL controller, then drop at once"
  fresh_state pg
  start_controller "$state" "$PORT" "$MPORT" "$out/controller-depart.log"; a_pid=$last_pid
  "$lg" run --state-dir "$state" --port "$PORT" --ping-interval "$PING" --count "$N" --threads 2 \
    --stages "$N" --idle 5 --controller-pid "$a_pid" --json "$out/depart-connect.json" >/dev/null ||
    log "depart: connect failures"
  python3 - "$MPORT" "$a_pid" >"$out/depart.json" <<'PY'
import json, os, signal, sys, time, urllib.request
port, pid = sys.argv[1], int(sys.argv[2])
t0, worst, drained = time.monotonic(), 0.0, None
while time.monotonic() - t0 < 600:
    s = time.monotonic()
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=600).read().decode()
    worst = max(worst, time.monotonic() - s)
    line = next(l for l in text.splitlines() if l.startswith("muster_agents_connected "))
    if float(line.split()[1]) == 0:
        drained = time.monotonic() - t0
        break
    time.sleep(0.05)
s = time.monotonic()
os.kill(pid, signal.SIGTERM)
def running():
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False  # reaped already
while running():
    time.sleep(0.02)
print(json.dumps({"secondsUntilNoneConnected": drained, "worstMetricsSeconds": worst,
                  "stopSeconds": time.monotonic() - s}))
PY
  wait "$a_pid" 2>/dev/null || true
  pids=()
  cat "$out/depart.json" >&2
  pg_stop
}

for s in $scenarios; do
  if [[ $s == depart ]]; then depart; continue; fi
  log "$s: muster publish --all over $N agents"
  case $s in
    sqlite) fresh_state ;;
    pg1 | pg2 | pg2pub) fresh_state pg ;;
    *) echo "unknown scenario $s" >&2; exit 2 ;;
  esac
  start_controller "$state" "$PORT" "$MPORT" "$out/controller-$s.log"; a_pid=$last_pid
  two=()
  if [[ $s == pg2 || $s == pg2pub ]]; then
    sleep 1  # the first controller takes the rollout driver's lease
    start_controller "$out/state2" "$PORT2" "$MPORT2" "$out/controller2-$s.log"; b_pid=$last_pid
    two=(--port2 "$PORT2" --controller-pid2 "$b_pid")
    lag_buckets "$MPORT2" >"$out/lag-before-$s.txt"
  fi
  if [[ $s != sqlite ]]; then
    pg0=$(pg_cpu)
    if [[ -n ${PG_STATS:-} ]]; then as_pg "$pgbin/psql" -q -h "$pgdir" -U muster muster -c 'SELECT pg_stat_statements_reset()' >/dev/null; fi
  fi
  if [[ $s == pg2pub ]]; then
    what=(--publish --publish-rate "${RATE:-200}")
  else
    what=(--publish-cmd "$publish_cmd")
  fi
  "$lg" run --state-dir "$state" --port "$PORT" --ping-interval "$PING" --count "$N" --threads 2 \
    "${two[@]}" "${what[@]}" --publish-timeout "${PUBLISH_TIMEOUT:-600}" --controller-pid "$a_pid" \
    --json "$out/$s.json" >/dev/null || log "$s: failures (see $s.json)"
  if [[ $s != sqlite ]]; then
    echo "{\"postgresqlCpuSeconds\": $(python3 -c "print($(pg_cpu) - $pg0)")}" >"$out/pgcpu-$s.json"
    if [[ -n ${PG_STATS:-} ]]; then as_pg "$pgbin/psql" -h "$pgdir" -U muster muster -c "SELECT round(total_exec_time) AS ms, calls, rows, left(regexp_replace(query, '\s+', ' ', 'g'), 150) AS query FROM pg_stat_statements ORDER BY total_exec_time DESC LIMIT 25" >"$out/statements-$s.txt"; fi
  fi
  if [[ $s == pg2 || $s == pg2pub ]]; then
    lag_buckets "$MPORT2" >"$out/lag-after-$s.txt"
    python3 - "$out/lag-before-$s.txt" "$out/lag-after-$s.txt" >"$out/lag-$s.json" <<'PY'
import json, sys
def read(p):
    return [(float("inf") if le == "+Inf" else float(le), int(n))
            for le, n in (l.split() for l in open(p) if l.strip())]
b, a = read(sys.argv[1]), read(sys.argv[2])
d = [(le, na - nb) for (le, na), (_, nb) in zip(a, b)]
total = d[-1][1]
def q(x):  # the smallest bucket bound holding the quantile
    for le, n in d:
        if n >= x * total:
            return le
print(json.dumps({"changesRead": total, "p50AtMostSeconds": q(0.5), "p99AtMostSeconds": q(0.99),
                  "buckets": {str(le): n for le, n in d}}))
PY
  fi
  cat "$out/$s.json" >&2
  stop_all
  pg_stop
done
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$out/machine.txt"
log "results in $out"
