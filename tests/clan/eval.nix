# Evaluates muster's clan service (flake output clan.modules.muster) with clan-core's real
# inventory and service machinery, then each machine's resulting NixOS / nix-darwin module
# with clan-core's real vars modules, muster's own modules and nixpkgs' lib.evalModules.
# What NixOS itself would add (systemd, users, …) is accepted by a freeform stub, and
# pkgs is a stub: this checks the wiring, the VM test checks a running system.
#
#   nix-instantiate --eval --strict --json tests/clan/eval.nix \
#     --arg clanCore /path/to/clan-core --arg nixpkgsLib /path/to/nixpkgs/lib \
#     --arg muster ./.
# tests/clan/check.sh prepares the sources (and Debian nix 2.8's shims) and runs it.
{ clanCore, nixpkgsLib, muster, fixture ? toString ./fixture }:
let
  lib = import nixpkgsLib;
  inherit (lib) types;

  jsonType = types.nullOr (types.oneOf [
    types.bool types.int types.float types.str types.path
    (types.attrsOf jsonType) (types.listOf jsonType)
  ]) // { description = "JSON value"; };

  musterDrv = {
    type = "derivation";
    name = "muster-0.1.0";
    outPath = "/nix/store/00000000000000000000000000000000-muster-0.1.0";
    meta.mainProgram = "muster";
  };
  pkgs = {
    formats.json = { }: {
      type = jsonType;
      generate = name: value: { __toString = _: "/nix/store/00000000000000000000000000000000-${name}"; inherit name value; };
    };
    callPackage = _fn: _args: musterDrv;
    muster = musterDrv;
    coreutils = "/nix/store/00000000000000000000000000000000-coreutils";
    writeShellApplication = { name, ... }: "/nix/store/00000000000000000000000000000000-${name}";
    stdenv.hostPlatform.system = "x86_64-linux";
  };

  # muster's flake, its outputs applied to this lib (packages are never forced).
  musterFlake = (import (muster + "/flake.nix")).outputs {
    self = musterFlake;
    nixpkgs = { inherit lib; legacyPackages = { }; };
  };

  # clan-core as its flake would present itself, without fetching its inputs.
  clanCoreFlake = {
    inherit clanLib;
    clan = { modules = { }; deprecatedModules = [ ]; templates = { }; };
    modules.clan.default = lib.modules.importApply (clanCore + "/modules/clan/default.nix") { clan-core = clanCoreFlake; };
    inputs = { nixpkgs = { inherit lib; }; nix-darwin = { }; };
  };
  clanLib =
    let base = import (clanCore + "/lib") { inherit lib; };
    in lib.fix (lib.extends (_final: _: {
      clan = import (clanCore + "/lib/clan") { inherit lib; clan-core = clanCoreFlake; };
    }) base.__unfix__);

  operator = "ed25519:8O59lk3d/tJL8ZliV76W15+ym20stQNRFDl23jppQRo=";

  # The same clan with another operator set (bob removed from the settings).
  clanWith = operators: clanLib.clan {
    self = { inputs = { muster = musterFlake; }; outPath = fixture; };
    directory = fixture;
    meta.name = "fixture";
    meta.domain = "fleet";
    inventory = {
      machines = {
        ctl = { tags = [ "infra" ]; };
        web1 = { tags = [ "web" ]; };
        pw1 = { tags = [ "web" ]; };
        mac1 = { machineClass = "darwin"; };
      };
      instances.muster = {
        module = { input = "muster"; name = "muster"; };
        roles.controller.machines.ctl.settings.operators = operators;
        roles.agent.tags.all = { };
        roles.agent.machines.pw1.settings.confirmTimeout = 300;
      };
    };
  };

  bob = "ed25519:6VgpIoJZopyCHpPrv2znKuil0Sa0+PneH/98voXnsWk=";
  finalOf = operators:
    let services = (clanWith operators).config._services.allServices; in
    (services."muster-muster" or (throw "no muster service among: ${toString (builtins.attrNames services)}")).result.final;
  final = finalOf { alice = operator; };
  finalWithBob = finalOf { alice = operator; inherit bob; };

  # Everything NixOS / nix-darwin and clan-core's other modules would declare.
  stub = { lib, ... }: {
    options.assertions = lib.mkOption { type = types.listOf types.attrs; default = [ ]; };
    options.warnings = lib.mkOption { type = types.listOf types.str; default = [ ]; };
    options.meta = lib.mkOption { type = types.attrsOf types.anything; default = { }; };
    # Set by clan for machines of a clan; undefined here: machine-level vars settings.
    options.clanConfig = lib.mkOption { type = types.raw; };
    config._module.freeformType = types.lazyAttrsOf types.anything;
  };

  # The part of sops-nix's interface clan's sops backend uses: secrets get their
  # /run/secrets path as sops-nix gives it.
  sopsStub = { lib, ... }: {
    options.sops = {
      secrets = lib.mkOption {
        type = types.attrsOf (types.submodule ({ name, ... }: {
          freeformType = types.lazyAttrsOf types.anything;
          options.path = lib.mkOption { type = types.str; default = "/run/secrets/${name}"; };
        }));
        default = { };
      };
      validateSopsFiles = lib.mkOption { type = types.bool; default = false; };
      defaultSopsFile = lib.mkOption { type = types.nullOr types.str; default = null; };
      age.keyFile = lib.mkOption { type = types.nullOr types.str; default = null; };
    };
  };

  machine = name: class: secretStore: machineWith final name class secretStore;
  machineWith = final: name: class: secretStore:
    (lib.evalModules {
      specialArgs = { _class = class; };
      modules = [
        stub
        sopsStub
        (clanCore + "/nixosModules/clanCore/vars")
        (clanCore + "/nixosModules/clanCore/settings.nix")
        ({ ... }: {
          _module.args = { inherit pkgs; };
          networking.hostName = name;
          nix.package = "/nix/store/00000000000000000000000000000000-nix";
          systemd.package = "/nix/store/00000000000000000000000000000000-systemd";
          clan.core.settings.directory = fixture;
          clan.core.settings.machine.name = name;
          clan.core.settings.domain = "fleet";
          clan.core.vars.settings.secretStore = secretStore;
        })
        final.${name}.${if class == "darwin" then "darwinModule" else "nixosModule"}
      ];
    }).config;

  ctl = machine "ctl" "nixos" "sops";
  web1 = machine "web1" "nixos" "sops";
  pw1 = machine "pw1" "nixos" "password-store";
  mac1 = machine "mac1" "darwin" "sops";

  failed = cfg: map (a: a.message) (builtins.filter (a: !a.assertion) cfg.assertions);
  agentJson = cfg: cfg.environment.etc."muster/agent.json".source.value;
  pin = lib.removeSuffix "\n" (builtins.readFile (fixture + "/vars/per-machine/ctl/muster-controller/pin/value"));

  checks = {
    controller_registers_the_operators_and_uses_its_var_key =
      ctl.services.muster-controller.enable
      && ctl.services.muster-controller.operators == { alice = operator; }
      && ctl.services.muster-controller.keyFile == ctl.clan.core.vars.generators.muster-controller.files.key.path
      && ctl.clan.core.vars.generators.muster-controller.files.key.owner == "muster"
      && !ctl.clan.core.vars.generators.muster-controller.files.pin.secret
      && ctl.environment.etc."muster/roster.json".source == fixture + "/muster-roster.json";
    controller_config_names_key_and_roster =
      let c = ctl.environment.etc."muster/controller.json".source.value; in
      c.keyFile == ctl.services.muster-controller.keyFile && c.roster == "/etc/muster/roster.json";
    agents_pin_the_controller_and_trust_the_operators =
      let a = agentJson web1; in
      a.controllers == [ "wss://ctl.fleet:7443" ] && a.controllerPin == pin
      && a.trustedOperatorKeys == [ operator ] && a.machine == "web1";
    agent_key_is_the_generator_file =
      let a = agentJson web1; in
      a.machineKeyFile == web1.clan.core.vars.generators.muster-agent.files.key.path
      && a.machineKeyCreatedAt == 1780000000
      && web1.clan.core.vars.generators.muster-agent.files."key.pub".secret == false;
    vars_dir_follows_the_secret_store =
      (agentJson web1).varsDir == web1.clan.core.vars.sops.secretUploadDirectory
      && (agentJson pw1).varsDir == pw1.clan.core.vars.password-store.secretLocation
      && (agentJson pw1).varsDir == "/etc/secret-vars"
      && (agentJson web1).varsDir == "/var/lib/sops-nix";
    per_machine_settings_apply = (agentJson pw1).confirmTimeout == 300 && (agentJson web1).confirmTimeout == 120;
    darwin_machines_get_the_darwin_agent = mac1.services.muster-agent.enable && (agentJson mac1).machine == "mac1";
    controller_tagged_all_is_an_agent_too = ctl.services.muster-agent.enable && (agentJson ctl).machine == "ctl";
    # Operators follow the instance settings on both sides: bob, once removed, is neither
    # in the controller's declared set (`operator sync` removes him) nor trusted by agents.
    removed_operator_is_dropped_on_both_sides =
      let
        ctlBob = machineWith finalWithBob "ctl" "nixos" "sops";
        web1Bob = machineWith finalWithBob "web1" "nixos" "sops";
      in
      ctlBob.services.muster-controller.operators == { alice = operator; inherit bob; }
      && builtins.elem bob (agentJson web1Bob).trustedOperatorKeys
      && ctl.services.muster-controller.operators == { alice = operator; }
      && !(builtins.elem bob (agentJson web1).trustedOperatorKeys);
    no_failed_assertions = failed ctl ++ failed web1 ++ failed pw1 ++ failed mac1 == [ ];
  };
in
if lib.all (x: x) (builtins.attrValues checks) then checks
else throw "clan service checks failed: ${builtins.toJSON (lib.filterAttrs (_: v: !v) checks)}; agent.json web1: ${builtins.toJSON (agentJson web1)}"
