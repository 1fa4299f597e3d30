# NixOS module: services.muster-controller, a sandboxed systemd service running as the
# system user `muster`. The flake's nixosModules.controller imports this file and sets
# `package` to muster built from the same checkout.
{ config, lib, pkgs, ... }:
let
  inherit (lib) mkOption mkEnableOption mkPackageOption types literalExpression;
  cfg = config.services.muster-controller;
  render = import ./render.nix;
  jsonFormat = pkgs.formats.json { };
  configFile = jsonFormat.generate "muster-controller.json" (render.controller cfg);
  exe = lib.getExe' cfg.package "muster-controller";
  defaultStateDir = "/var/lib/muster-controller";
  operatorsFile = jsonFormat.generate "muster-operators.json" cfg.operators;
  storeArg = lib.optionalString (cfg.store != null) " --store ${lib.escapeShellArg cfg.store}";
in
{
  options.services.muster-controller = {
    enable = mkEnableOption "the muster controller, which holds agent connections and serves operators";

    package = mkPackageOption pkgs "muster" { };

    listen = mkOption {
      type = types.nonEmptyListOf types.str;
      default = [ "[::]:7443" ];
      description = ''
        Addresses (`ADDR:PORT`, IPv6 in brackets) agents and operators connect to.
        `[::]:PORT` listens on every address.
      '';
      example = [ "[fd80:56c2:e21c::1]:7443" "0.0.0.0:7443" ];
    };

    stateDir = mkOption {
      type = types.strMatching "/.*";
      default = defaultStateDir;
      description = ''
        Directory holding the controller's key, certificate and SQLite store. Created
        (with `muster-controller init`) before the first start.
      '';
    };

    metricsListen = mkOption {
      type = types.nullOr types.str;
      default = "127.0.0.1:9100";
      description = "ADDR:PORT serving /metrics (Prometheus) and /healthz; null turns it off.";
      example = "[::1]:9100";
    };

    httpListen = mkOption {
      type = types.nullOr types.str;
      default = null;
      description = ''
        ADDR:PORT of the read-only web dashboard (docs/DASHBOARD.md); null: none. On
        loopback it is open; any other address needs a token from `muster dashboard token`.
      '';
      example = "127.0.0.1:8080";
    };

    keyFile = mkOption {
      # A string, not a path: the key must never be copied into the store.
      type = types.nullOr (types.strMatching "/.*");
      default = null;
      description = ''
        The controller's key, provided by a secret store (the clan service passes its
        vars generator's file, owned by `muster`), instead of `stateDir/controller.key`.
        Its pin is what agents check; a self-signed certificate is made for it.
      '';
      example = "/run/secrets/vars/muster-controller/key";
    };

    store = mkOption {
      type = types.nullOr (types.strMatching "postgres(ql)?://.*");
      default = null;
      description = ''
        A PostgreSQL store (libpq URI) instead of `stateDir/muster.db`, for controllers
        sharing one fleet (see docs/POSTGRESQL.md). Keep the password out of it (it is
        world-readable in the store): use peer authentication or a `PGPASSFILE`.
      '';
      example = "postgresql:///muster?host=/run/postgresql";
    };

    rosterFile = mkOption {
      type = types.nullOr types.path;
      default = null;
      description = ''
        Declarative roster: operator-signed entries written by `muster roster sign`
        (with clan: `muster roster sign --clan -o roster.json`). Applied at start and
        whenever it changes, without a restart; entries not signed by a registered
        operator are refused. Machines in it need no `muster machine add`.
      '';
    };

    operators = mkOption {
      type = types.attrsOf (types.strMatching "ed25519:[A-Za-z0-9+/]{43}=");
      default = { };
      description = ''
        The declared operators, made the managed set before every start
        (`muster-controller operator sync`): added, given the key declared here, and
        an operator removed from this set is removed from the controller (its key is
        refused and its sessions close). Operators added by hand and never declared
        stay; remove them with `muster-controller operator remove`.
      '';
      example = { alice = "ed25519:8O59lk3d/tJL8ZliV76W15+ym20stQNRFDl23jppQRo="; };
    };

    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = "Whether to open the TCP ports of `listen` (not `metricsListen`) in the firewall.";
    };

    settings = mkOption {
      type = types.submodule {
        freeformType = jsonFormat.type;
        options = {
          logLevel = mkOption {
            type = types.enum [ "trace" "debug" "info" "warn" "error" "critical" "off" ];
            default = "info";
            description = "Log level.";
          };
          threads = mkOption {
            type = types.nullOr types.ints.positive;
            default = null;
            description = "I/O threads; null means one per core.";
          };
          handshakeTimeout = mkOption {
            type = types.nullOr types.ints.positive;
            default = null;
            description = "Seconds allowed for the TLS and websocket handshakes; null keeps the built-in default.";
          };
          pingInterval = mkOption {
            type = types.nullOr types.ints.positive;
            default = null;
            description = "Seconds between pings to each agent; null keeps the built-in default (60; agents ping every 50 s, so idle agents are not pinged).";
          };
          idleTimeout = mkOption {
            type = types.nullOr types.ints.positive;
            default = null;
            description = "Seconds without a frame after which a connection is dropped; null keeps the built-in default (150).";
          };
          maxMessageBytes = mkOption {
            type = types.nullOr (types.ints.between 4096 2147483647);
            default = null;
            description = ''
              Largest message to or from an agent, in bytes; a publish whose deploy message
              (manifest and sealed vars) is larger is refused. Agents' maxMessageBytes must be
              at least this. null keeps the built-in default (1048576).
            '';
          };
          maxHandshakes = mkOption {
            type = types.nullOr types.ints.positive;
            default = null;
            description = ''
              Connections that may be in their TLS/websocket handshake at once; the oldest is
              cut beyond that. null keeps the built-in default (1024).
            '';
          };
        };
      };
      default = { };
      description = ''
        Further settings of the controller's JSON configuration, merged over the options
        above. A null value removes a freeform key (one not declared here); a declared
        setting takes null where its type allows it (all but `logLevel`), which leaves it
        out of the file and keeps the built-in default. See docs/PACKAGING.md for the format.
      '';
      example = { threads = 4; logLevel = "debug"; };
    };
  };

  config = lib.mkIf cfg.enable {
    environment.etc."muster/controller.json".source = configFile;
    environment.etc."muster/roster.json" = lib.mkIf (cfg.rosterFile != null) { source = cfg.rosterFile; };
    environment.systemPackages = [ cfg.package ];

    users.users.muster = {
      isSystemUser = true;
      group = "muster";
      home = cfg.stateDir;
      description = "muster controller";
    };
    users.groups.muster = { };

    networking.firewall.allowedTCPPorts = lib.mkIf cfg.openFirewall (map render.listenPort cfg.listen);

    systemd.tmpfiles.rules = lib.mkIf (cfg.stateDir != defaultStateDir) [
      "d ${cfg.stateDir} 0700 muster muster - -"
    ];

    systemd.services.muster-controller = {
      description = "muster controller: holds agent connections and serves operators";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];
      serviceConfig = {
        Type = "exec";
        User = "muster";
        Group = "muster";
        ExecStartPre = [
          "${exe} run --check-config --config ${configFile}"
          # Idempotent: creates whatever is missing (key, certificate, store) and logs the pin.
          ("${exe} init --state-dir ${cfg.stateDir}"
            + lib.optionalString (cfg.keyFile != null) " --key-file ${cfg.keyFile}"
            + storeArg)
          # The declared set; an operator no longer in it stops being trusted.
          "${exe} operator sync --file ${operatorsFile} --state-dir ${cfg.stateDir}${storeArg}"
        ];
        ExecStart = "${exe} run --config ${configFile}";
        Restart = "on-failure";
        RestartSec = 5;
        LimitNOFILE = 1048576;
        StateDirectory = lib.mkIf (cfg.stateDir == defaultStateDir) "muster-controller";
        StateDirectoryMode = "0700";
        ReadWritePaths = lib.mkIf (cfg.stateDir != defaultStateDir) [ cfg.stateDir ];
        UMask = "0077";

        CapabilityBoundingSet = "";
        AmbientCapabilities = "";
        NoNewPrivileges = true;
        ProtectSystem = "strict";
        ProtectHome = true;
        PrivateTmp = true;
        PrivateDevices = true;
        ProtectKernelTunables = true;
        ProtectKernelModules = true;
        ProtectKernelLogs = true;
        ProtectControlGroups = true;
        ProtectClock = true;
        ProtectHostname = true;
        ProtectProc = "invisible";
        ProcSubset = "pid";
        RestrictAddressFamilies = [ "AF_INET" "AF_INET6" "AF_UNIX" ];
        RestrictNamespaces = true;
        RestrictRealtime = true;
        RestrictSUIDSGID = true;
        LockPersonality = true;
        MemoryDenyWriteExecute = true;
        RemoveIPC = true;
        SystemCallArchitectures = "native";
        SystemCallFilter = [ "@system-service" "~@privileged @resources" ];
        SystemCallErrorNumber = "EPERM";
      };
    };
  };
}
