#!/usr/bin/env bash
# muster vs SSH push (issue 12 target 6): runs bench/ssh_vs_muster.py for each
# fleet size and writes one JSON file per size and a summary with the machine.
# Usage: bench/ssh_vs_muster.sh BUILD_DIR OUT_DIR
# Knobs (environment): NS="20 100" (fleet sizes), RUNS=3, MODES=clan,colmena,muster
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin=$(cd "${1:?usage: ssh_vs_muster.sh BUILD_DIR OUT_DIR}" && pwd)
out=${2:?usage: ssh_vs_muster.sh BUILD_DIR OUT_DIR}
mkdir -p "$out"
NS=${NS:-"20 100"} RUNS=${RUNS:-3} MODES=${MODES:-clan,colmena,muster}
export MUSTER_BIN_DIR=$bin PYTHONDONTWRITEBYTECODE=1
summary=$out/summary.md
{
  echo "# muster vs SSH push, $(date -u +%FT%TZ)"
  echo
  echo "- CPU: $(lscpu | sed -n 's/^Model name: *//p'), nproc $(nproc)"
  echo "- load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "- binaries: $bin ($(git -C "$here/.." rev-parse --short HEAD 2>/dev/null || echo '?'))"
  echo "- $(ssh -V 2>&1), $(nix --version)"
} >"$summary"
for n in $NS; do
  echo "ssh_vs_muster: N=$n, $RUNS runs" >&2
  {
    echo
    python3 "$here/ssh_vs_muster.py" --machines "$n" --runs "$RUNS" --modes "$MODES" \
      --json "$out/ssh-vs-muster-$n.json" 2> >(tee "$out/ssh-vs-muster-$n.log" >&2)
    echo
    echo "load average after N=$n: $(cut -d' ' -f1-3 /proc/loadavg)"
  } >>"$summary"
done
cat "$summary"
