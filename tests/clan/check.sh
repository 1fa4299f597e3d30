#!/usr/bin/env bash
# Checks of muster's clan service (label "clan"):
#   check.sh generators  the vars generator scripts of clan.modules.muster run (with the
#                        built `muster`): the agent's key, key.pub and created-at, the
#                        controller's key, key.pub and pin, and the pin is the one
#                        muster-controller prints for that key. Needs nothing else.
#   check.sh eval        the service evaluated with clan-core's inventory and vars modules
#                        and nixpkgs' lib (tests/clan/eval.nix). Needs the sources:
#                          MUSTER_CLAN_CORE  a clan-core checkout (github:clan-lol/clan-core)
#                          MUSTER_NIXPKGS    a nixpkgs checkout, or its lib/ (e.g. the first
#                                            commit of github:neg-serg/nixpkgs-slim, or
#                                            github:nix-community/nixpkgs.lib)
#                        and is skipped (exit 77, saying so) without them.
#   check.sh system      a whole NixOS evaluation (tests/clan/system.nix): clan-core's
#                        `clan` builds nixosConfigurations of machines using the service
#                        with real nixpkgs (all NixOS modules), sops-nix and disko; checks
#                        the muster units, their config JSON, key paths, varsDir and the
#                        ordering after the secret installation. Needs the sources:
#                          MUSTER_CLAN_CORE  as above
#                          MUSTER_NIXPKGS    a whole nixpkgs checkout (the first commit of
#                                            neg-serg/nixpkgs-slim: its commented-out
#                                            module list is restored in the copy)
#                          MUSTER_SOPS_NIX   a sops-nix checkout (github:Mic92/sops-nix)
#                          MUSTER_DISKO      a disko checkout (github:nix-community/disko)
#                        and is skipped (exit 77, saying so) without them.
# Current nixpkgs wants Nix >= 2.18 (lib/minfeatures.nix) and builtins.readFileType
# (Nix 2.14); Debian 12's nix is 2.8, so a copy of lib/ gets the gate lowered and a
# readFileType built from readDir. Nothing is fetched.
set -euo pipefail

step=${1:?usage: check.sh generators|eval|system}
src=${MUSTER_SOURCE_DIR:-$(cd "$(dirname "$0")/../.." && pwd)}
tmp=$(mktemp -d "${TMPDIR:-/tmp}/muster-clan.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
export NIX_CONFIG="build-users-group =
sandbox = false
experimental-features = nix-command"
export NIX_REMOTE=${NIX_REMOTE:-}

fail() { echo "FAIL: $*" >&2; exit 1; }
skip() { echo "SKIPPED: $*"; exit 77; }
command -v nix-instantiate >/dev/null || skip "nix-instantiate is not installed (scripts/install-deps.sh installs nix-bin)"

step_generators() {
  local muster=${MUSTER_CLI:-} ctl=${MUSTER_CONTROLLER:-}
  [[ -x $muster && -x $ctl ]] || skip "MUSTER_CLI / MUSTER_CONTROLLER are not built binaries"
  nix-instantiate --eval --strict --json "$src/tests/clan/generators.nix" \
    --arg muster "$src" >"$tmp/gen.json" 2>"$tmp/err" || fail "generators.nix: $(cat "$tmp/err")"
  mkdir -p "$tmp/bin"
  ln -s "$(realpath "$muster")" "$tmp/bin/muster"
  for role in agent controller; do
    mkdir -p "$tmp/$role/out"
    python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]]["script"])' \
      "$tmp/gen.json" "$role" >"$tmp/$role/script"
    # As clan runs a generator: bash, $out, only runtimeInputs (here: muster, coreutils) on PATH.
    (cd "$tmp/$role" && env -i PATH="$tmp/bin:/usr/bin:/bin" out="$tmp/$role/out" \
      bash -euo pipefail "$tmp/$role/script") || fail "the $role generator script failed"
    want=$(python3 -c 'import json,sys; print(" ".join(sorted(json.load(open(sys.argv[1]))[sys.argv[2]]["files"])))' \
      "$tmp/gen.json" "$role")
    got=$(cd "$tmp/$role/out" && ls -A | sort | tr '\n' ' ' | sed 's/ $//')
    [[ $want == "$got" ]] || fail "the $role generator wrote '$got', it declares '$want'"
  done
  grep -Eq '^ed25519:[A-Za-z0-9+/]{43}=$' "$tmp/agent/out/key.pub" || fail "agent key.pub: $(cat "$tmp/agent/out/key.pub")"
  grep -Eq '^[0-9]{10}$' "$tmp/agent/out/created-at" || fail "created-at: $(cat "$tmp/agent/out/created-at")"
  [[ $(stat -c %a "$tmp/agent/out/key") == 600 ]] || fail "the agent key is not 0600"
  # The pin agents get must be the one the controller serves with that key.
  local printed
  printed=$("$ctl" init --state-dir "$tmp/ctl-state" --key-file "$tmp/controller/out/key" |
    sed -n 's/^pin: *//p')
  [[ -n $printed && $printed == "$(cat "$tmp/controller/out/pin")" ]] ||
    fail "generator pin $(cat "$tmp/controller/out/pin") differs from muster-controller's $printed"
  [[ ! -e $tmp/ctl-state/controller.key ]] || fail "init --key-file created its own key"
  echo "clan generators: agent and controller keys made, pin $printed matches muster-controller"
}

# patch_lib DIR: Debian nix 2.8 shims in a writable copy of nixpkgs' lib/ (see above).
patch_lib() {
  local lib=$1
  if [[ $(nix-instantiate --eval -E 'builtins ? readFileType') == false ]]; then
    # Nix < 2.14: readFileType from readDir of the parent (what lib did before it required it).
    local shim='(p: if builtins.readDir (dirOf p) ? ${baseNameOf p} then (builtins.readDir (dirOf p)).${baseNameOf p} else throw "lib.filesystem.pathType: ${toString p} does not exist")'
    sed -i "s|pathType = builtins.readFileType;|pathType = builtins.readFileType or $shim;|" "$lib/filesystem.nix"
    sed -i "s|^\(\s*\)readFileType$|\1;\n  readFileType = builtins.readFileType or $shim;\n  inherit (builtins)|" "$lib/filesystem.nix"
  fi
  [[ -f $lib/minfeatures.nix ]] &&
    sed -i 's|compareVersions "2\.[0-9]*" builtins.nixVersion|compareVersions "2.8" builtins.nixVersion|' "$lib/minfeatures.nix"
  return 0
}

step_system() {
  [[ -n ${MUSTER_CLAN_CORE:-} && -n ${MUSTER_NIXPKGS:-} && -n ${MUSTER_SOPS_NIX:-} && -n ${MUSTER_DISKO:-} ]] ||
    skip "the whole-NixOS evaluation needs MUSTER_CLAN_CORE (clan-core), MUSTER_NIXPKGS (a whole nixpkgs checkout), MUSTER_SOPS_NIX (sops-nix) and MUSTER_DISKO (disko); set all four to run it"
  [[ -f $MUSTER_CLAN_CORE/nixosModules/flake-module.nix ]] || fail "MUSTER_CLAN_CORE=$MUSTER_CLAN_CORE is not a clan-core checkout"
  [[ -f $MUSTER_NIXPKGS/nixos/modules/module-list.nix && -f $MUSTER_NIXPKGS/lib/modules.nix ]] ||
    fail "MUSTER_NIXPKGS=$MUSTER_NIXPKGS is not a whole nixpkgs checkout (no nixos/modules/module-list.nix)"
  [[ -f $MUSTER_SOPS_NIX/modules/sops/default.nix ]] || fail "MUSTER_SOPS_NIX=$MUSTER_SOPS_NIX is not a sops-nix checkout"
  [[ -f $MUSTER_DISKO/module.nix ]] || fail "MUSTER_DISKO=$MUSTER_DISKO is not a disko checkout"
  # A copy of nixpkgs to patch: hard links where the file system allows (the checkout is
  # never written: sed -i replaces a file by a new one), a real copy otherwise.
  local np=$tmp/nixpkgs
  cp -al "$MUSTER_NIXPKGS" "$np" 2>/dev/null || { rm -rf "$np"; cp -r "$MUSTER_NIXPKGS" "$np"; }
  rm -rf "$np/.git"
  patch_lib "$np/lib"
  # nixpkgs-slim's first commit is upstream nixpkgs with most of the module list
  # commented out: restore it, so that this is NixOS with all of its modules.
  sed -i 's|^\(\s*\)#\(\./\)|\1\2|' "$np/nixos/modules/module-list.nix"
  # --read-write-mode: clan-core's sops backend adds the encrypted files to the store.
  nix-instantiate --read-write-mode --eval --strict --json "$src/tests/clan/system.nix" \
    --arg clanCore "$MUSTER_CLAN_CORE" --arg nixpkgs "$np" --arg muster "$src" \
    --arg sopsNix "$MUSTER_SOPS_NIX" --arg disko "$MUSTER_DISKO" \
    >"$tmp/system.json" 2>"$tmp/err" || fail "$(grep -v nixbld "$tmp/err" | tail -c 6000)"
  python3 - "$tmp/system.json" <<'PY' || fail "checks: $(cat "$tmp/system.json")"
import json, sys
checks = json.load(open(sys.argv[1]))
bad = [k for k, v in checks.items() if v is not True]
assert len(checks) >= 16 and not bad, bad
print("whole NixOS with clan-core, nixpkgs, sops-nix and disko:", ", ".join(sorted(checks)))
PY
}

step_eval() {
  [[ -n ${MUSTER_CLAN_CORE:-} && -n ${MUSTER_NIXPKGS:-} ]] ||
    skip "the clan service evaluation needs MUSTER_CLAN_CORE (a clan-core checkout) and MUSTER_NIXPKGS (a nixpkgs checkout or its lib/); set both to run it"
  [[ -f $MUSTER_CLAN_CORE/lib/clan/default.nix ]] || fail "MUSTER_CLAN_CORE=$MUSTER_CLAN_CORE is not a clan-core checkout"
  local lib=$MUSTER_NIXPKGS
  [[ -f $lib/lib/default.nix ]] && lib=$lib/lib
  [[ -f $lib/modules.nix ]] || fail "MUSTER_NIXPKGS=$MUSTER_NIXPKGS has no lib/modules.nix"
  cp -r "$lib" "$tmp/lib"
  chmod -R u+w "$tmp/lib"
  patch_lib "$tmp/lib"
  nix-instantiate --eval --strict --json "$src/tests/clan/eval.nix" \
    --arg clanCore "$MUSTER_CLAN_CORE" --arg nixpkgsLib "$tmp/lib" --arg muster "$src" \
    >"$tmp/eval.json" 2>"$tmp/err" || fail "$(grep -v nixbld "$tmp/err")"
  python3 - "$tmp/eval.json" <<'PY' || fail "checks: $(cat "$tmp/eval.json")"
import json, sys
checks = json.load(open(sys.argv[1]))
bad = [k for k, v in checks.items() if v is not True]
assert len(checks) >= 10 and not bad, bad
print("clan service evaluated with clan-core and nixpkgs lib:", ", ".join(sorted(checks)))
PY
}

"step_$step"
