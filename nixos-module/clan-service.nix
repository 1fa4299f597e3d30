# clan service `muster` (flake output clan.modules.muster): one inventory instance wires
# a pull-deployed fleet.
#
#   inventory.instances.muster = {
#     module.input = "muster";                      # this flake, as an input of the clan
#     module.name = "muster";
#     roles.controller.machines.ctl.settings.operators.alice = "ed25519:…";
#     roles.agent.tags.all = { };
#   };
#
# Vars generators create each agent's machine key (`muster-agent`: secret `key`, public
# `key.pub` and `created-at`) and the controller's key (`muster-controller`: secret `key`
# owned by muster, public `key.pub` and `pin`). Agents read the controller's pin and the
# operators from the clan; the controller reads the roster an operator signed from the
# agents' public keys (`muster roster sign --clan -o muster-roster.json`, committed at the
# clan's root). An agent installs vars where the machine's secret store expects them, so
# `muster publish --clan` delivers what `clan machines update` would upload.
#
# `self` is muster's flake: its NixOS / nix-darwin modules bring the package.
{ self }:
{ clanLib, directory, lib, ... }:
let
  inherit (lib) mkOption types;

  keyType = types.strMatching "ed25519:[A-Za-z0-9+/]{43}=";

  # The key pair of the agent or controller, made with muster itself. The pin is the
  # SHA-256 of the raw public key, as `muster-controller init` prints it.
  keyGenerator = { pkgs, package, owner ? null, pin ? false }:
    {
      files = {
        key = lib.optionalAttrs (owner != null) { inherit owner; group = owner; };
        "key.pub".secret = false;
        created-at.secret = false;
      } // lib.optionalAttrs pin { pin.secret = false; };
      runtimeInputs = [ package pkgs.coreutils ];
      script = ''
        muster key generate --out "$out/key" >/dev/null
        date +%s > "$out/created-at"
      '' + lib.optionalString pin ''
        printf 'sha256:%s\n' "$(cut -d: -f2 "$out/key.pub" | base64 -d | sha256sum | cut -d' ' -f1)" > "$out/pin"
      '';
    };

  # The directory the machine's clan secret store uploads to: where the agent must put
  # the vars that `muster publish --clan` takes from `clan vars upload --directory`.
  secretStoreDir = config:
    let
      vars = config.clan.core.vars;
      store = vars.settings.secretStore;
    in
    if store == "sops" then vars.sops.secretUploadDirectory
    else if store == "password-store" then vars.password-store.secretLocation
    else if store == "age" then vars.age.secretLocation
    else throw "muster: clan.core.vars.settings.secretStore is '${store}'; muster delivers vars for sops, age and password-store";

  trimmed = s: lib.removeSuffix "\n" s;

  # The unit that installs the machine's clan secrets (its muster key among them) when
  # systemd does it (systemd-sysusers or userborn), so that muster's units start after it.
  # Without those, sops-nix, age and password-store install secrets from an activation
  # script, which runs before any unit is started at boot and before units are restarted
  # on a switch: nothing to order. The names are sops-nix's and clan-core's own.
  secretsUnits = { config, options }:
    let
      vars = config.clan.core.vars;
      store = vars.settings.secretStore;
      systemdActivation =
        (options.systemd ? sysusers && config.systemd.sysusers.enable)
        || (options.services ? userborn && config.services.userborn.enable);
    in
    if store == "sops" then lib.optional (config.sops.useSystemdActivation or false) "sops-install-secrets.service"
    else if store == "password-store" then lib.optional systemdActivation "pass-install-secrets.service"
    else if store == "age" then lib.optional systemdActivation "age-decrypt-secrets.service"
    else [ ];

  # NixOS only (nix-darwin has no such units): order `service` after the secrets.
  afterSecrets = service: { config, options, ... }:
    let units = secretsUnits { inherit config options; }; in
    {
      systemd.services.${service} = {
        after = units;
        wants = units;
      };
    };

  agentModule = { settings, roles, machine }: { config, pkgs, ... }:
    let
      controllers = builtins.attrNames (roles.controller.machines or { });
      ctl = builtins.head controllers;
      ctlSettings = roles.controller.machines.${ctl}.settings or { };
      port = ctlSettings.port or 7443;
      zt = ctlSettings.zerotierInstance or null;
      host =
        if settings.controllerHost != null then settings.controllerHost
        else if (ctlSettings.host or null) != null then ctlSettings.host
        else if zt != null then
          trimmed (clanLib.getPublicValue {
            flake = directory;
            machine = ctl;
            generator = "zerotier-ip-${ctl}-${zt}";
            file = "ip";
          })
        else "${ctl}.${config.clan.core.settings.domain}";
      bracketed = if lib.hasInfix ":" host then "[${host}]" else host;
      pin = clanLib.getPublicValue {
        flake = directory;
        machine = ctl;
        generator = "muster-controller";
        file = "pin";
        default = throw ''
          muster: the controller ${ctl} has no pin yet (vars/per-machine/${ctl}/muster-controller/pin);
          run 'clan vars generate ${ctl}' and commit the result.'';
      };
      gen = config.clan.core.vars.generators.muster-agent.files;
      createdAt = if gen.created-at.exists or false then gen.created-at.value else null;
    in
    {
      assertions = [{
        assertion = builtins.length controllers == 1;
        message = "muster: the instance needs exactly one machine in roles.controller (it has ${toString (builtins.length controllers)}).";
      }];
      clan.core.vars.generators.muster-agent = keyGenerator {
        inherit pkgs;
        package = config.services.muster-agent.package;
      };
      services.muster-agent = {
        enable = true;
        machine = machine.name;
        controllers = [ "wss://${bracketed}:${toString port}" ];
        controllerPin = trimmed pin;
        trustedOperatorKeys = lib.mkDefault (builtins.attrValues (ctlSettings.operators or { }));
        machineKeyFile = gen.key.path;
        machineKeyCreatedAt = if createdAt == null then null else lib.toInt (trimmed createdAt);
        varsDir = lib.mkDefault (secretStoreDir config);
        inherit (settings) healthChecks confirmTimeout maintenanceWindows maintenanceTimeZone;
        settings = settings.settings;
      };
    };
in
{
  _class = "clan.service";
  manifest.name = "muster";
  manifest.description = "Pull deployment: machines fetch their signed system generation and vars from a muster controller, also when asleep or behind NAT.";
  manifest.categories = [ "System" ];
  manifest.readme = builtins.readFile ../docs/CLAN.md;
  manifest.constraints.roles.controller.minMachines = 1;
  manifest.constraints.roles.controller.maxMachines = 1;

  roles.controller = {
    description = "Runs muster-controller: holds agent connections and serves operators; its key is a clan var, its roster the one operators signed.";
    interface = { lib, ... }: {
      options = {
        operators = mkOption {
          type = types.attrsOf keyType;
          description = "Operator name → public key (`muster key show`). Registered on the controller and trusted by every agent.";
          example = { alice = "ed25519:8O59lk3d/tJL8ZliV76W15+ym20stQNRFDl23jppQRo="; };
        };
        port = mkOption { type = types.port; default = 7443; description = "Port agents and operators connect to."; };
        host = mkOption {
          type = types.nullOr types.str;
          default = null;
          description = "Address agents use to reach the controller; default `<machine>.<meta.domain>`, or its ZeroTier address with `zerotierInstance`.";
          example = "fd80:56c2:e21c:1:2399:93a1:c0ae:9f22";
        };
        zerotierInstance = mkOption {
          type = types.nullOr types.str;
          default = null;
          description = "Name of the clan zerotier instance whose address (public value `zerotier-ip-<ctl>-<instance>/ip`) agents use.";
        };
        rosterFile = mkOption {
          type = types.nullOr types.path;
          default = if builtins.pathExists (directory + "/muster-roster.json") then directory + "/muster-roster.json" else null;
          defaultText = "<clan directory>/muster-roster.json if it exists";
          description = "Signed roster (`muster roster sign --clan -o muster-roster.json`).";
        };
        openFirewall = mkOption { type = types.bool; default = true; description = "Open `port` in the firewall."; };
        settings = mkOption {
          type = types.attrsOf types.anything;
          default = { };
          description = "Passed to services.muster-controller.settings.";
        };
      };
    };
    perInstance = { settings, ... }: {
      nixosModule = { config, pkgs, ... }: {
        imports = [ self.nixosModules.controller (afterSecrets "muster-controller") ];
        clan.core.vars.generators.muster-controller = keyGenerator {
          inherit pkgs;
          package = config.services.muster-controller.package;
          owner = "muster";
          pin = true;
        };
        services.muster-controller = {
          enable = true;
          listen = [ "[::]:${toString settings.port}" ];
          inherit (settings) openFirewall operators rosterFile;
          keyFile = config.clan.core.vars.generators.muster-controller.files.key.path;
          settings = settings.settings;
        };
      };
    };
  };

  roles.agent = {
    description = "Runs muster-agent: pulls this machine's signed generation and installs its vars where the machine's clan secret store expects them.";
    interface = { lib, ... }: {
      options = {
        controllerHost = mkOption {
          type = types.nullOr types.str;
          default = null;
          description = "Overrides the controller role's address for this machine.";
        };
        healthChecks = mkOption {
          type = types.listOf types.attrs;
          default = [ ];
          description = "services.muster-agent.healthChecks.";
        };
        confirmTimeout = mkOption { type = types.ints.positive; default = 120; description = "Seconds to confirm a generation."; };
        maintenanceWindows = mkOption {
          type = types.listOf types.attrs;
          default = [ ];
          description = "services.muster-agent.maintenanceWindows ({ days; start; end; }).";
        };
        maintenanceTimeZone = mkOption {
          type = types.nullOr types.str;
          default = null;
          description = "services.muster-agent.maintenanceTimeZone.";
        };
        settings = mkOption {
          type = types.attrsOf types.anything;
          default = { };
          description = "Passed to services.muster-agent.settings.";
        };
      };
    };
    perInstance = { settings, roles, machine, ... }:
      let args = { inherit settings roles machine; }; in
      {
        nixosModule = { ... }: {
          imports = [ self.nixosModules.agent (agentModule args) (afterSecrets "muster-agent") ];
        };
        darwinModule = { ... }: {
          imports = [ self.darwinModules.agent (agentModule args) ];
        };
      };
  };
}
