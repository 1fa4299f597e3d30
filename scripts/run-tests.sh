#!/usr/bin/env bash
# Runs muster's whole test suite on a fresh Debian 12 machine (as root):
# installs dependencies, builds the dev preset (warnings are errors) and runs
# every CTest test: unit, integration (real binaries, TLS, keys and nix),
# packaging checks and a short bounded fuzzing run.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
# Builds run as root without a sandbox; no network substituters (offline machines).
export NIX_CONFIG=$'sandbox = false\nbuild-users-group =\nexperimental-features = nix-command\nsubstituters ='
export CCACHE_DIR=${CCACHE_DIR:-$HOME/.cache/ccache}
cmake --preset dev
cmake --build --preset dev
ctest --preset dev -j2 "$@"
