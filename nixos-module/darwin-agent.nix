# nix-darwin module: services.muster-agent as the launchd daemon org.muster.agent
# (launchd.daemons.muster-agent), running as root. Same options as the NixOS module.
{ config, lib, pkgs, ... }:
let
  cfg = config.services.muster-agent;
  render = import ./render.nix;
  jsonFormat = pkgs.formats.json { };
  # launchd cannot rotate what it captures: the agent writes logFile itself and
  # rotates it (10 MiB, 5 kept as muster-agent.1.log …); settings.logFile overrides.
  configFile = jsonFormat.generate "muster-agent.json"
    (render.agent (cfg // { settings = { logFile = cfg.logFile; } // cfg.settings; }));
in
{
  options.services.muster-agent = import ./agent-options.nix {
    inherit lib pkgs config;
    platformDefaults = {
      stateDir = "/var/lib/muster-agent";
      # nix-darwin keeps no booted-system link and boots no Nix kernel: the reboot
      # check compares the current system with itself and never asks for a reboot.
      bootedSystem = "/run/current-system";
    };
  } // {
    logFile = lib.mkOption {
      type = lib.types.strMatching "/.*";
      default = "/var/log/muster-agent.log";
      description = ''
        The agent's log. The agent writes it and rotates it at 10 MiB, keeping five
        (`muster-agent.1.log` … next to it); launchd also sends the process's standard
        output and error there (only what comes before logging starts).
      '';
    };
  };

  config = lib.mkIf cfg.enable {
    assertions = [{
      assertion = cfg.machine != "";
      message = "services.muster-agent.machine is empty because networking.hostName is empty; set services.muster-agent.machine to the name registered with `muster machine add` (or set networking.hostName).";
    }] ++ map
      (c: {
        assertion = (c.command == null) != (c.http == null);
        message = "services.muster-agent.healthChecks: check '${c.name}' needs exactly one of `command` and `http`.";
      })
      cfg.healthChecks;

    environment.etc."muster/agent.json".source = configFile;
    environment.systemPackages = [ cfg.package ];

    system.activationScripts.postActivation.text = ''
      mkdir -p ${lib.escapeShellArg cfg.settings.stateDir}
      chmod 0700 ${lib.escapeShellArg cfg.settings.stateDir}
    '';

    launchd.daemons.muster-agent = {
      # nix-store/nix-env from the system's Nix (or a Nix installed outside nix-darwin),
      # then the usual system directories.
      path = lib.optional (config.nix.enable or true) config.nix.package
        ++ [ "/nix/var/nix/profiles/default/bin" "/usr/bin" "/bin" "/usr/sbin" "/sbin" ];
      serviceConfig = {
        Label = "org.muster.agent";
        ProgramArguments = [ (lib.getExe' cfg.package "muster-agent") "--config" "${configFile}" ];
        RunAtLoad = true;
        KeepAlive = true;
        # launchd restarts a crashing daemon at most every ThrottleInterval seconds.
        ThrottleInterval = 5;
        StandardOutPath = cfg.logFile;
        StandardErrorPath = cfg.logFile;
      };
    };
  };
}
