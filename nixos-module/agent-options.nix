# Options of services.muster-agent, shared by the NixOS module (agent.nix) and the
# nix-darwin module (darwin-agent.nix). `platformDefaults` holds the settings whose
# defaults differ between the two (stateDir, bootedSystem).
{ lib, pkgs, config, platformDefaults }:
let
  inherit (lib) mkOption mkEnableOption mkPackageOption types literalExpression;
  jsonFormat = pkgs.formats.json { };

  healthCheckType = types.submodule {
    options = {
      name = mkOption {
        type = types.strMatching "[A-Za-z0-9_.-]+";
        description = "Name of the check, shown in reports and in `muster status`.";
        example = "sshd";
      };
      command = mkOption {
        type = types.nullOr (types.nonEmptyListOf types.str);
        default = null;
        description = ''
          Program and arguments (no shell) that must exit 0 for the check to pass.
          Exactly one of `command` and `http` is set.
        '';
        example = [ "/run/current-system/sw/bin/systemctl" "is-active" "sshd" ];
      };
      http = mkOption {
        type = types.nullOr (types.strMatching "https?://.*");
        default = null;
        description = ''
          URL that must answer with a 2xx status for the check to pass.
          Exactly one of `command` and `http` is set.
        '';
        example = "http://127.0.0.1/";
      };
      timeout = mkOption {
        type = types.ints.positive;
        default = 30;
        description = "Seconds after which the check counts as failed.";
      };
    };
  };
in
{
  enable = mkEnableOption "the muster agent, which pulls and activates the system generation assigned to this machine";

  package = mkPackageOption pkgs "muster" { };

  machine = mkOption {
    # "" is let through the type so that the modules' assertion can say what to do
    # when networking.hostName is empty.
    type = types.strMatching "([A-Za-z0-9][A-Za-z0-9_.-]*)?";
    default = config.networking.hostName;
    defaultText = literalExpression "config.networking.hostName";
    description = ''
      Name of this machine at the controller. Signed manifests name the machine they
      are for; the agent refuses any other.
    '';
    example = "web1";
  };

  controllers = mkOption {
    type = types.nonEmptyListOf (types.strMatching "wss://.+");
    description = ''
      Controllers to connect to (`wss://HOST:PORT`), tried in order. The agent keeps
      one outbound connection; nothing inbound is needed.
    '';
    example = [ "wss://[fd80:56c2:e21c::1]:7443" "wss://ctl.example.org:7443" ];
  };

  controllerPin = mkOption {
    type = types.strMatching "sha256:[0-9a-f]{64}";
    description = ''
      Fingerprint of the controller's public key, printed by `muster-controller init`.
      The agent accepts no other controller.
    '';
    example = "sha256:1897eb94e4b87db23de0f1d4b4c983a8a243b80b5c00d3c07da6294fcbfcf180";
  };

  trustedOperatorKeys = mkOption {
    type = types.nonEmptyListOf (types.strMatching "ed25519:[A-Za-z0-9+/]{43}=");
    description = ''
      Operator public keys whose signatures this agent accepts on generation manifests.
      A compromised controller cannot make the agent run anything these keys did not sign.
    '';
    example = [ "ed25519:8O59lk3d/tJL8ZliV76W15+ym20stQNRFDl23jppQRo=" ];
  };

  enrollTokenFile = mkOption {
    # A string, not a path: a path would copy the secret into the world-readable store.
    type = types.nullOr (types.strMatching "/.*");
    default = null;
    description = ''
      File holding a one-time enrollment token, read at run time (for example from
      sops-nix or agenix). When null the machine's key must be registered with
      `muster machine add` instead.
    '';
    example = "/run/secrets/muster-token";
  };

  machineKeyFile = mkOption {
    # A string, not a path: the key must never be copied into the store.
    type = types.nullOr (types.strMatching "/.*");
    default = null;
    description = ''
      The machine's Ed25519 key, provided by a secret store (the clan service passes
      its vars generator's file) instead of the agent creating `stateDir/machine.key`.
      It must be readable by root only (0400/0600). Register its public key with a
      signed roster entry (`muster roster sign`); it cannot be combined with
      `enrollTokenFile`.
    '';
    example = "/run/secrets/vars/muster-agent/key";
  };

  machineKeyCreatedAt = mkOption {
    type = types.nullOr types.ints.unsigned;
    default = null;
    description = ''
      When `machineKeyFile` was made (unix seconds). On the agent's very first start
      (no floor.json, no state.json) manifests signed before it are refused; the file's
      own modification time is not used, because a secret store rewrites it at every
      activation. null: no such floor.
    '';
  };

  varsDir = mkOption {
    type = types.strMatching "/.*";
    default = "/var/lib/sops-nix";
    description = ''
      Directory the agent replaces atomically with the vars delivered with each
      generation. The default is where `clan machines update` uploads them.
    '';
  };

  healthChecks = mkOption {
    type = types.listOf healthCheckType;
    default = [ ];
    description = ''
      Checks that must pass after activation, together with reaching the controller
      again, within `confirmTimeout`; otherwise the agent re-activates the system that
      ran before.
    '';
    example = literalExpression ''
      [
        { name = "sshd"; command = [ "/run/current-system/sw/bin/systemctl" "is-active" "sshd" ]; }
        { name = "web"; http = "http://127.0.0.1/"; timeout = 10; }
      ]
    '';
  };

  confirmTimeout = mkOption {
    type = types.ints.positive;
    default = 120;
    description = "Seconds a new generation has to confirm before it is rolled back.";
  };

  maintenanceWindows = mkOption {
    type = types.listOf (types.submodule {
      options = {
        days = mkOption {
          type = types.nonEmptyListOf (types.enum [ "mon" "tue" "wed" "thu" "fri" "sat" "sun" "daily" ]);
          description = "Weekdays the window opens on.";
        };
        start = mkOption {
          type = types.strMatching "([01][0-9]|2[0-4]):[0-5][0-9](:[0-5][0-9])?";
          description = "Local time (maintenanceTimeZone) the window opens, HH:MM.";
        };
        end = mkOption {
          type = types.strMatching "([01][0-9]|2[0-4]):[0-5][0-9](:[0-5][0-9])?";
          description = "Local time it closes, HH:MM; at or before start: the next day.";
        };
      };
    });
    default = [ ];
    description = ''
      When generations published with `muster publish --stage` (and rollouts without
      `--now`) may activate: they are realised at once and wait in phase `staged` until a
      window is open. Empty: at once. See docs/FLEET.md.
    '';
    example = literalExpression ''
      [ { days = [ "sat" "sun" ]; start = "02:00"; end = "05:00"; } ]
    '';
  };

  maintenanceTimeZone = mkOption {
    type = types.nullOr types.str;
    default = null;
    example = "Europe/Berlin";
    description = "IANA time zone of maintenanceWindows; null: the machine's local time.";
  };

  settings = mkOption {
    type = types.submodule {
      freeformType = jsonFormat.type;
      options = {
        stateDir = mkOption {
          type = types.strMatching "/.*";
          default = platformDefaults.stateDir;
          description = "Where the agent keeps its key (0600) and deploy state.";
        };
        profile = mkOption {
          type = types.str;
          default = "/nix/var/nix/profiles/system";
          description = "System profile the agent sets before activating.";
        };
        currentSystem = mkOption {
          type = types.str;
          default = "/run/current-system";
          description = "Link to the running system.";
        };
        bootedSystem = mkOption {
          type = types.str;
          default = platformDefaults.bootedSystem;
          description = "Link to the booted system, compared with a new one to detect a needed reboot.";
        };
        metricsListen = mkOption {
          type = types.nullOr types.str;
          default = null;
          description = "ADDR:PORT for the agent's Prometheus metrics; null turns them off.";
          example = "127.0.0.1:9101";
        };
        rebootPolicy = mkOption {
          type = types.enum [ "never" "when-required" ];
          default = "never";
          description = ''
            Whether the agent reboots after activating a generation whose kernel, initrd or
            kernel modules differ from the booted ones. A needed reboot is reported either way.
          '';
        };
        maxMessageBytes = mkOption {
          type = types.nullOr (types.ints.between 4096 1073741824);
          default = null;
          description = ''
            Largest message accepted from the controller, in bytes; keep it at least the
            controller's maxMessageBytes. null keeps the built-in default (1048576).
          '';
        };
        logLevel = mkOption {
          type = types.enum [ "trace" "debug" "info" "warn" "error" "critical" "off" ];
          default = "info";
          description = "Log level.";
        };
        maxManifestFutureSkew = mkOption {
          type = types.ints.between 0 86400;
          default = 300;
          description = ''
            Seconds a manifest's signing time may be ahead of this machine's clock. The agent
            never accepts a manifest signed before one it accepted, so one signed far in the
            future would hold back every update until then; keep the clocks of operators and
            machines synchronised (NTP).
          '';
        };
      };
    };
    default = { };
    description = ''
      Further settings of the agent's JSON configuration, merged over the options above.
      A null value removes a freeform key (one not declared here, e.g. `confirmTimeout`
      or `nixBinDir`); a declared setting takes null only where its type allows it
      (`metricsListen`, `maxManifestFutureSkew`), which leaves it out of the file.
      See docs/PACKAGING.md for the format.
    '';
    example = { rebootPolicy = "when-required"; metricsListen = "127.0.0.1:9101"; };
  };
}
