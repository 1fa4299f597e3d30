#!/usr/bin/env bash
# muster Quick start: on one Debian 12 machine, as root, builds muster, starts a
# controller and an agent (in a sandbox root under $MUSTER_QS_DIR), builds a
# NixOS-like system toplevel with nix, pushes it to a signed binary cache,
# publishes it as a signed generation with vars, and waits until the agent has
# realised, activated and confirmed it. Ends with `muster status`.
#
#   MUSTER_QS_DIR   where everything lives (default /var/tmp/muster-quickstart)
#   --keep          leave controller and agent running afterwards
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=$PWD
KEEP=0
[[ "${1:-}" == "--keep" ]] && KEEP=1

say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

say "Installing build dependencies (Debian packages)"
scripts/install-deps.sh

say "Building muster (release preset)"
cmake --preset release -DMUSTER_BUILD_TESTS=OFF >/dev/null
cmake --build --preset release
BIN=$SRC/build/release
CTL=$BIN/controller/muster-controller
AGENT=$BIN/agent/muster-agent
CLI=$BIN/controller/cli/muster

# Builds run as root without a sandbox; no network substituters (offline machines).
export NIX_CONFIG=$'sandbox = false\nbuild-users-group =\nexperimental-features = nix-command\nsubstituters ='
unset NIX_REMOTE || true

QS=${MUSTER_QS_DIR:-/var/tmp/muster-quickstart}
for pidfile in "$QS"/*.pid; do
  [[ -f $pidfile ]] && kill "$(cat "$pidfile")" 2>/dev/null || true
done
rm -rf "$QS"
mkdir -p "$QS"/{cli,cache,vars-in/activation/demo}
ROOT=$QS/machine   # the agent's sandbox root: profile, current-system, vars
mkdir -p "$ROOT/run"

cleanup() {
  if [[ $KEEP == 0 ]]; then
    for pidfile in "$QS"/*.pid; do
      [[ -f $pidfile ]] && kill "$(cat "$pidfile")" 2>/dev/null || true
    done
  fi
}
trap cleanup EXIT

say "Creating the controller key, certificate and store"
"$CTL" init --state-dir "$QS/controller" | tee "$QS/controller-init.txt"
PIN=$(awk '/^pin:/ {print $2}' "$QS/controller-init.txt")

say "Creating an operator key and registering it"
OPKEY=$("$CLI" --key "$QS/cli/operator.key" key generate 2>/dev/null)
"$CTL" operator add quickstart --key "$OPKEY" --state-dir "$QS/controller"

say "Starting the controller on 127.0.0.1:7443"
"$CTL" run --state-dir "$QS/controller" --listen 127.0.0.1:7443 --metrics-listen 127.0.0.1:9100 \
  >"$QS/controller.log" 2>&1 &
echo $! >"$QS/controller.pid"
for _ in $(seq 100); do grep -q "listening on" "$QS/controller.log" && break; sleep 0.1; done
grep "listening on" "$QS/controller.log" || { cat "$QS/controller.log"; exit 1; }
cat >"$QS/cli/config.json" <<JSON
{"controller": "wss://127.0.0.1:7443", "pin": "$PIN", "key": "$QS/cli/operator.key"}
JSON
export MUSTER_CONFIG=$QS/cli/config.json

say "Configuring the agent for machine 'demo' (sandbox root $ROOT)"
cat >"$QS/agent.json" <<JSON
{
  "machine": "demo",
  "controllers": ["wss://127.0.0.1:7443"],
  "controllerPin": "$PIN",
  "trustedOperatorKeys": ["$OPKEY"],
  "stateDir": "$ROOT/state",
  "varsDir": "$ROOT/var/lib/sops-nix",
  "profile": "$ROOT/nix/var/nix/profiles/system",
  "currentSystem": "$ROOT/run/current-system",
  "bootedSystem": "$ROOT/run/booted-system",
  "confirmTimeout": 30,
  "systemdRun": "never",
  "healthChecks": [{"name": "metrics", "http": "http://127.0.0.1:9100/healthz", "timeout": 5}]
}
JSON
MKEY=$("$AGENT" --config "$QS/agent.json" --print-key)
"$CLI" machine add demo --key "$MKEY" --tag quickstart
"$AGENT" --config "$QS/agent.json" >"$QS/agent.log" 2>&1 &
echo $! >"$QS/agent.pid"

say "Building a NixOS-like system toplevel with nix"
TOP=$(nix-build --no-out-link tests/integration/toplevel.nix --argstr name quickstart \
  --argstr log "$QS/activation.log" --argstr salt "$(date +%s)")
echo "$TOP"

say "Pushing it to a signed file:// binary cache and removing the local copy"
nix key generate-secret --key-name quickstart-cache-1 >"$QS/cache.sk"
chmod 600 "$QS/cache.sk"
CACHE_PUB=$(nix key convert-secret-to-public <"$QS/cache.sk")
nix store sign --key-file "$QS/cache.sk" --recursive "$TOP"
nix copy --to "file://$QS/cache" "$TOP"
nix-store --delete "$TOP" >/dev/null 2>&1 || true
[[ -e $TOP ]] && echo "(still in the local store: referenced elsewhere)" || echo "removed $TOP from the local store"

say "Publishing it with a vars bundle and watching the agent deploy it"
printf 'AGE-SECRET-KEY-1QUICKSTARTDEMO\n' >"$QS/vars-in/key.txt"
printf 'hunter2\n' >"$QS/vars-in/activation/demo/password"
chmod 0400 "$QS/vars-in/key.txt" "$QS/vars-in/activation/demo/password"   # modes travel with the files
"$CLI" publish demo "$TOP" --vars "$QS/vars-in" \
  --substituter "file://$QS/cache" --trusted-public-key "$CACHE_PUB" --wait --timeout 120

say "muster status"
"$CLI" status

say "What happened on the machine"
echo "activation log:   $(cat "$QS/activation.log")"
echo "profile:          $(readlink -f "$ROOT/nix/var/nix/profiles/system")"
echo "current-system:   $(readlink -f "$ROOT/run/current-system")"
echo "vars:"
find "$ROOT/var/lib/sops-nix" \( -type f -o -type d \) ! -name '.muster-vars-hash' -printf '  %m %u:%g %p\n' | sort -k3
echo "logs: $QS/controller.log $QS/agent.log"
"$CLI" status demo --json | grep -q '"phase": "succeeded"'
say "Quick start finished: generation 1 succeeded on machine 'demo'"
[[ $KEEP == 1 ]] && echo "controller and agent keep running (pids in $QS/*.pid)"
exit 0
