# Options -> the JSON configuration muster-agent and muster-controller read.
#
# Pure and free of nixpkgs on purpose (builtins only), so that
#   nix-instantiate --eval --strict --json -E '(import ./render.nix).agent { ... }'
# works on a machine without nixpkgs; tests/packaging/check-render.sh does exactly that.
# The modules (agent.nix, darwin-agent.nix, controller.nix) pass their `cfg` here and
# write the result with pkgs.formats.json.
#
# Rules: every key the binaries know is named here once; `settings` (freeform) is merged
# on top, so it can add keys and override ours; keys whose value is null are omitted.
let
  dropNulls = attrs:
    builtins.removeAttrs attrs (builtins.filter (n: attrs.${n} == null) (builtins.attrNames attrs));

  healthCheck = c:
    dropNulls {
      inherit (c) name timeout;
      command = c.command or null;
      http = c.http or null;
    };
in
{
  inherit dropNulls;

  # cfg: services.muster-agent (machine, controllers, controllerPin, trustedOperatorKeys,
  # enrollTokenFile, varsDir, healthChecks, confirmTimeout, maintenanceWindows,
  # maintenanceTimeZone, settings).
  # settings carries stateDir, profile, currentSystem, bootedSystem, metricsListen,
  # rebootPolicy, logLevel, maxManifestFutureSkew and anything else the agent learns later.
  agent = cfg:
    dropNulls (
      {
        inherit (cfg) machine controllers controllerPin trustedOperatorKeys varsDir confirmTimeout;
        healthChecks = map healthCheck cfg.healthChecks;
        enrollTokenFile = cfg.enrollTokenFile or null;
        machineKeyFile = cfg.machineKeyFile or null;
        machineKeyCreatedAt = cfg.machineKeyCreatedAt or null;
        maintenanceWindows =
          if (cfg.maintenanceWindows or [ ]) == [ ] then null else cfg.maintenanceWindows;
        maintenanceTimeZone = cfg.maintenanceTimeZone or null;
      }
      // cfg.settings
    );

  # cfg: services.muster-controller (stateDir, listen, metricsListen, keyFile, rosterFile,
  # settings). The roster is read from /etc/muster/roster.json, a link the module points at
  # rosterFile: a new roster changes the link, not the configuration, so the controller
  # applies it without a restart.
  # settings carries logLevel, threads, handshakeTimeout, pingInterval, idleTimeout,
  # maxMessageBytes, maxHandshakes.
  controller = cfg:
    dropNulls (
      {
        inherit (cfg) stateDir listen;
        metricsListen = cfg.metricsListen or null;
        httpListen = cfg.httpListen or null;
        keyFile = cfg.keyFile or null;
        store = cfg.store or null;
        roster = if (cfg.rosterFile or null) == null then null else "/etc/muster/roster.json";
      }
      // cfg.settings
    );

  # "[::]:7443" -> 7443, "0.0.0.0:7443" -> 7443; used for openFirewall.
  listenPort = addr:
    let m = builtins.match ".*:([0-9]+)" addr;
    in
    if m == null
    then throw "muster: listen address '${addr}' has no :PORT (write e.g. \"[::]:7443\")"
    else builtins.fromJSON (builtins.head m);
}
