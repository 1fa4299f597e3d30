# Fake system toplevels for muster's integration tests and Quick start, built
# with plain `derivation` (no nixpkgs needed, works offline with Debian's nix).
#
# Each toplevel records its activations by appending a line to `log`:
#   "<name> <action> <kind>" — so tests can assert order and arguments.
# The activation also points the current-system link (passed by the agent in
# MUSTER_CURRENT_SYSTEM) at itself, as NixOS and nix-darwin activation do.
#
#   kind      nixos | darwin | home-manager | profile
#   behaviour ok | fail (activation exits 1) | cut (creates `cutFile`, which the
#             test's proxy treats as "network down"; an ok toplevel removes it)
#             | restart-agent (runs `systemctl restart muster-agent.service`, as a NixOS
#             switch does when muster's unit or package changed)
#             | fds (writes `ls -l /proc/self/fd/` to "<log>.fds": what activation inherits)
#             | garbage (prints ill-formed UTF-8 and lines of multi-byte characters longer
#             than the agent's cuts on stdout and stderr, then exits 1)
#   kernel    a string standing for the kernel build; differing values mean a
#             reboot is needed
#   payload   bytes of random data in a store path of its own that the toplevel
#             refers to (closures of several paths and of any size); "0": none
#   payloads  how many such store paths ("1"; the further ones are named
#             muster-test-payload-<name>-<i>)
#   payloadKind random (incompressible) | text (hex digits of random bytes,
#             which zstd halves)
#   kernelSize bytes of padding in the kernel image ("0": a one-line file), for
#             tests of the free space in /boot
#   stopUnits, reloadUnits, restartUnits, startUnits
#             comma-separated unit names that `switch-to-configuration
#             dry-activate` reports, in the words NixOS uses ("would restart the
#             following units: sshd.service, nginx.service")
{ name ? "system"
, kind ? "nixos"
, behaviour ? "ok"
, log ? "/tmp/muster-activation.log"
, cutFile ? "/tmp/muster-cut"
, kernel ? "6.1.0"
, salt ? ""
, sleep ? "0"
, payload ? "0"
, payloadKind ? "random"
, payloads ? "1"
, kernelSize ? "0"
, stopUnits ? ""
, reloadUnits ? ""
, restartUnits ? ""
, startUnits ? ""
, system ? builtins.currentSystem
}:
let
  sh = "/bin/sh";
  activationScript = ''
    #!${sh}
    set -e
    self="$(cd "$(dirname "$0")" && pwd -P)"
    case "$(basename "$0")" in switch-to-configuration) self="$(dirname "$self")";; esac
    echo "${name} ''${1:-activate} ${kind}" >> "${log}"
    # Where it ran: the cgroup names the systemd unit (a transient muster-activate-*).
    cat /proc/self/cgroup > "${log}.${name}.cgroup" 2>/dev/null || true
    if [ "''${1:-}" = "dry-activate" ]; then
      # What NixOS's switch-to-configuration prints for dry-activate; changes nothing.
      ${if stopUnits != "" then ''echo "would stop the following units: ${stopUnits}"'' else ""}
      echo "would activate the configuration..."
      ${if reloadUnits != "" then ''echo "would reload the following units: ${reloadUnits}"'' else ""}
      ${if restartUnits != "" then ''echo "would restart the following units: ${restartUnits}"'' else ""}
      ${if startUnits != "" then ''echo "would start the following units: ${startUnits}"'' else ""}
    fi
    echo "activating ${name} (${kind}) action ''${1:-activate}"
    if [ "${sleep}" != "0" ]; then sleep ${sleep}; fi
    ${if behaviour == "fail" then ''
      echo "error: unit failed to start (fake failure)" >&2
      exit 1
    '' else if behaviour == "fds" then ''
      rm -f "${cutFile}"
      ls -l /proc/self/fd/ > "${log}.fds"
    '' else if behaviour == "garbage" then ''
      i=0; while [ $i -lt 1500 ]; do printf '\342\202\254'; i=$((i+1)); done; echo
      printf 'bad bytes: \377\376 \300\257 \355\240\200 cut: \342\202\n'
      i=0; while [ $i -lt 1500 ]; do printf '\360\237\230\200' >&2; i=$((i+1)); done
      printf ' stderr ends \342\202' >&2
      exit 1
    '' else if behaviour == "restart-agent" then ''
      # As a NixOS switch does when muster's unit or package changed.
      rm -f "${cutFile}"
      echo "restarting muster-agent.service"
      systemctl restart muster-agent.service
      echo "muster-agent.service restarted"
    '' else if behaviour == "cut" then ''
      touch "${cutFile}"
      echo "networking reconfigured (cut)"
    '' else ''
      rm -f "${cutFile}"
    ''}
    ${if kind == "nixos" || kind == "darwin" then ''
      # NixOS and nix-darwin activation point /run/current-system at the new system.
      if [ "''${1:-}" != "dry-activate" ] && [ "''${1:-}" != "boot" ] && [ -n "''${MUSTER_CURRENT_SYSTEM:-}" ]; then
        mkdir -p "$(dirname "$MUSTER_CURRENT_SYSTEM")"
        ln -sfn "$self" "$MUSTER_CURRENT_SYSTEM.tmp"
        mv -T "$MUSTER_CURRENT_SYSTEM.tmp" "$MUSTER_CURRENT_SYSTEM"
      fi
    '' else ""}
  '';
  # The kernel is its own store path, shared by toplevels with the same kernel
  # string, as on NixOS: a different kernel means a reboot is needed.
  kernelPkg = derivation {
    name = "muster-test-kernel-${kernel}";
    inherit system;
    builder = sh;
    args = [ "-c" ("PATH=/usr/bin:/bin; mkdir -p $out/lib/modules; echo kernel ${kernel} > $out/bzImage; echo initrd ${kernel} > $out/initrd; echo ${salt} > $out/salt"
      + (if kernelSize != "0" then "; head -c ${kernelSize} /dev/zero >> $out/bzImage" else "")) ];
  };
  payloadOf = suffix: derivation {
    name = "muster-test-payload-${name}${suffix}";
    inherit system;
    builder = sh;
    args = [ "-c" ("PATH=/usr/bin:/bin; mkdir -p $out; "
      + (if payloadKind == "text"
         then "od -v -An -tx1 /dev/urandom | head -c ${payload} > $out/data; "
         else "head -c ${payload} /dev/urandom > $out/data; ")
      + "echo ${salt} > $out/salt${suffix}") ];
  };
  payloadPkg = payloadOf "";
  morePayloads = builtins.genList (i: payloadOf "-${toString (i + 2)}")
    (builtins.fromJSON payloads - 1);
in
derivation {
  name = "muster-test-${name}";
  inherit system;
  builder = sh;
  inherit activationScript kind kernel salt;
  passAsFile = [ "activationScript" ];
  args = [ "-c" ''
    set -e
    PATH=/usr/bin:/bin
    mkdir -p $out/bin
    case "$kind" in
      nixos)
        echo "24.11.${name}" > $out/nixos-version
        cp $activationScriptPath $out/bin/switch-to-configuration
        chmod 555 $out/bin/switch-to-configuration
        ln -s ${kernelPkg}/bzImage $out/kernel
        ln -s ${kernelPkg}/initrd $out/initrd
        ln -s ${kernelPkg}/lib/modules $out/kernel-modules
        ;;
      darwin)
        echo "25.05.${name}" > $out/darwin-version
        cp $activationScriptPath $out/activate
        chmod 555 $out/activate
        ;;
      home-manager)
        echo "25.05" > $out/hm-version
        cp $activationScriptPath $out/activate
        chmod 555 $out/activate
        ;;
      *)
        echo "plain profile ${name}" > $out/README
        ;;
    esac
    echo "$salt" > $out/salt
    ${if payload != "0" then "ln -s ${payloadPkg} $out/payload" else ""}
    ${if payload != "0" then builtins.concatStringsSep "\n"
        (builtins.genList (i: "ln -s ${builtins.elemAt morePayloads i} $out/payload-${toString (i + 2)}")
          (builtins.length morePayloads)) else ""}
  '' ];
}
