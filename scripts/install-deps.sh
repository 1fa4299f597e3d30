#!/usr/bin/env bash
# Installs every Debian 12 package muster's build, tests, fuzzers and Quick start need.
# A no-op when they are all present. Run as root.
set -euo pipefail

PACKAGES=(
  build-essential cmake ninja-build ccache pkg-config git
  libboost1.81-dev libboost-system1.81-dev libboost-program-options1.81-dev
  libssl-dev openssl libsodium-dev nlohmann-json3-dev libspdlog-dev libfmt-dev
  libcli11-dev libsqlite3-dev sqlite3 libpq-dev postgresql libzstd-dev libgtest-dev libgmock-dev
  nix-bin clang libclang-rt-14-dev
  iproute2 iptables procps psmisc python3 curl ca-certificates systemd
  systemd-container mmdebstrap chromium
  openssh-server  # bench/ssh_vs_muster.py and its smoke test bench.ssh_smoke: one sshd per machine
)

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "install-deps: missing packages: ${missing[*]}; run this script as root" >&2
    exit 1
  fi
  echo "install-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "install-deps: all packages present"
fi
