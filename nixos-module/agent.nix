# NixOS module: services.muster-agent, a systemd service running as root (it sets the
# system profile and activates). The flake's nixosModules.agent imports this file and
# sets `package` to muster built from the same checkout.
{ config, lib, pkgs, ... }:
let
  cfg = config.services.muster-agent;
  render = import ./render.nix;
  jsonFormat = pkgs.formats.json { };
  configFile = jsonFormat.generate "muster-agent.json" (render.agent cfg);
in
{
  options.services.muster-agent = import ./agent-options.nix {
    inherit lib pkgs config;
    platformDefaults = {
      stateDir = "/var/lib/muster-agent";
      bootedSystem = "/run/booted-system";
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

    # The rendered file, for `muster-agent --check-config --config /etc/muster/agent.json`
    # and for people reading the machine; the service itself uses the store path.
    environment.etc."muster/agent.json".source = configFile;
    environment.systemPackages = [ cfg.package ];

    systemd.services.muster-agent = {
      description = "muster agent: pulls and activates this machine's system generation";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];
      # nix-store/nix-env to realise and set the profile, systemd-run to activate.
      path = [ config.nix.package config.systemd.package ];
      # Keep the running agent through activation (it watches switch-to-configuration,
      # which runs in its own transient unit) and restart it once activation is done.
      stopIfChanged = false;
      unitConfig.StartLimitIntervalSec = 0;
      serviceConfig = {
        Type = "exec";
        ExecStart = "${lib.getExe' cfg.package "muster-agent"} --config ${configFile}";
        Restart = "always";
        RestartSec = 5;
        # Only the agent is stopped on a restart of this unit; a child it started
        # (e.g. a fallback activation) is left to finish.
        KillMode = "process";
        StateDirectory = lib.mkIf (cfg.settings.stateDir == "/var/lib/muster-agent") "muster-agent";
        StateDirectoryMode = "0700";
      };
    };

    systemd.tmpfiles.rules = lib.mkIf (cfg.settings.stateDir != "/var/lib/muster-agent") [
      "d ${cfg.settings.stateDir} 0700 root root - -"
    ];
  };

  meta.maintainers = [ ];
}
