# Whole-NixOS evaluation of a clan that uses muster's clan service: clan-core's own
# `clan` function builds nixosConfigurations with real nixpkgs (its full NixOS module
# list), clan-core's clanCore modules, sops-nix and disko; nothing is stubbed but
# data-mesher's module (clan-core imports it for every machine; muster does not use it).
# The checks read what NixOS renders: the muster-agent / muster-controller systemd units,
# the JSON config file those units start with, the key paths the secret store gives them,
# and that each unit is ordered after the installation of the machine's secrets.
#
#   nix-instantiate --eval --strict --json tests/clan/system.nix \
#     --arg clanCore /path/to/clan-core --arg nixpkgs /path/to/prepared/nixpkgs \
#     --arg sopsNix /path/to/sops-nix --arg disko /path/to/disko --arg muster ./.
# tests/clan/check.sh system prepares nixpkgs for Debian's nix 2.8 and runs it.
{ clanCore, nixpkgs, sopsNix, disko, muster, fixture ? toString ./fixture }:
let
  nixpkgsFlake =
    let
      self = outputs // {
        outPath = toString nixpkgs;
        lastModifiedDate = "19700101000000";
        shortRev = "0000000";
      };
      outputs = (import (nixpkgs + "/flake.nix")).outputs { inherit self; };
    in
    self;
  inherit (nixpkgsFlake) lib;
  system = "x86_64-linux";

  musterFlake = (import (muster + "/flake.nix")).outputs {
    self = musterFlake // { outPath = toString muster; };
    nixpkgs = nixpkgsFlake;
  };

  # clan-core's machine modules exactly as its flake exports them (flake-parts module).
  coreModules = (import (clanCore + "/nixosModules/flake-module.nix") {
    inputs = {
      sops-nix.nixosModules.sops = sopsNix + "/modules/sops";
      disko.nixosModules.default = disko + "/module.nix";
      data-mesher.nixosModules.data-mesher = { };
    };
    self = "${toString clanCore}/";
  }).flake;

  clanCoreFlake = {
    inherit clanLib;
    inherit (coreModules) nixosModules;
    clan = { modules = { }; deprecatedModules = [ ]; templates = { }; };
    modules.clan.default = lib.modules.importApply (clanCore + "/modules/clan/default.nix") { clan-core = clanCoreFlake; };
    inputs = { nixpkgs = nixpkgsFlake; nix-darwin = { }; };
  };
  clanLib =
    let base = import (clanCore + "/lib") { inherit lib; };
    in lib.fix (lib.extends (_final: _: {
      clan = import (clanCore + "/lib/clan") { inherit lib; clan-core = clanCoreFlake; };
    }) base.__unfix__);

  operators = {
    alice = "ed25519:8O59lk3d/tJL8ZliV76W15+ym20stQNRFDl23jppQRo=";
    bob = "ed25519:6VgpIoJZopyCHpPrv2znKuil0Sa0+PneH/98voXnsWk=";
  };

  # What every machine of the fixture needs to be a bootable NixOS.
  base = extra: { ... }: {
    imports = [ extra ];
    nixpkgs.hostPlatform = system;
    fileSystems."/" = { device = "/dev/vda1"; fsType = "ext4"; };
    boot.loader.grub.devices = [ "/dev/vda" ];
    system.stateVersion = "26.05";
    documentation.enable = false;
  };

  # One clan per vars backend (clan-core chooses it for the whole clan), all with the same
  # inventory; only the machines a check reads are evaluated.
  clanWith = secretStore: clanLib.clan {
    self = { inputs = { muster = musterFlake; nixpkgs = nixpkgsFlake; }; outPath = fixture; };
    directory = fixture;
    meta.name = "fixture";
    meta.domain = "fleet";
    vars.settings.secretStore = secretStore;
    inventory = {
      machines = {
        ctl = { tags = [ "infra" ]; };
        web1 = { tags = [ "web" ]; };
        pw1 = { tags = [ "web" ]; };
        age1 = { };
      };
      instances.muster = {
        module = { input = "muster"; name = "muster"; };
        roles.controller.machines.ctl.settings.operators = operators;
        roles.agent.tags.all = { };
        roles.agent.machines.pw1.settings.confirmTimeout = 300;
      };
    };
    machines = {
      # sops: secrets installed by the activation script (sops-nix's default).
      ctl = base { };
      # sops with systemd activation (systemd-sysusers): sops-install-secrets.service.
      web1 = base { systemd.sysusers.enable = true; };
      # password-store with systemd activation (userborn): pass-install-secrets.service.
      pw1 = base { services.userborn.enable = true; };
      # age: activation script.
      age1 = base { };
    };
  };

  cfg = store: name: (clanWith store).config.nixosConfigurations.${name}.config;
  ctl = cfg "sops" "ctl";
  web1 = cfg "sops" "web1";
  pw1 = cfg "password-store" "pw1";
  age1 = cfg "age" "age1";

  unit = c: name: c.systemd.units."${name}.service".text;
  # `Key=a b c` lines of a unit, as one list of words.
  directive = text: key: lib.concatMap (l: lib.splitString " " (lib.removePrefix "${key}=" l))
    (builtins.filter (lib.hasPrefix "${key}=") (lib.splitString "\n" text));
  execStart = c: name: directive (unit c name) "ExecStart";
  # The file the unit is started with (`--config FILE`) and the JSON muster will read from
  # it, taken from the derivation that writes it (formats.json keeps `value`).
  configOf = c: name: etc:
    let
      words = execStart c name;
      file = c.environment.etc.${etc}.source;
    in
    assert lib.assertMsg (builtins.elem "--config" words && lib.last words == "${file}")
      "${name}.service does not start with --config ${file}: ${toString words}";
    file.value;
  agentJson = c: configOf c "muster-agent" "muster/agent.json";
  controllerJson = c: configOf c "muster-controller" "muster/controller.json";
  package = c: service: toString c.services.${service}.package;

  pin = lib.removeSuffix "\n" (builtins.readFile (fixture + "/vars/per-machine/ctl/muster-controller/pin/value"));
  ordered = c: name: want:
    builtins.elem want (directive (unit c name) "After") && builtins.elem want (directive (unit c name) "Wants");
  orderedAfterAny = c: name: lib.any (u: builtins.elem u (directive (unit c name) "After"))
    [ "sops-install-secrets.service" "pass-install-secrets.service" "age-decrypt-secrets.service" ];
  failed = c: map (a: a.message) (builtins.filter (a: !a.assertion) c.assertions);

  checks = {
    agent_unit_runs_the_package_with_its_config =
      builtins.head (execStart web1 "muster-agent") == "${package web1 "muster-agent"}/bin/muster-agent"
      && lib.hasPrefix "/nix/store/" (package web1 "muster-agent")
      && lib.hasInfix "-muster-" (package web1 "muster-agent");
    controller_unit_runs_the_package_with_its_config =
      builtins.head (execStart ctl "muster-controller") == "${package ctl "muster-controller"}/bin/muster-controller"
      && (controllerJson ctl).keyFile == "/run/secrets/vars/per-machine/ctl/muster-controller/key";
    agent_config_pins_the_controller_and_trusts_the_operators =
      let a = agentJson web1; in
      a.machine == "web1" && a.controllers == [ "wss://ctl.fleet:7443" ] && a.controllerPin == pin
      && lib.sort lib.lessThan a.trustedOperatorKeys == lib.sort lib.lessThan (builtins.attrValues operators);
    # Before every start the controller makes the instance's operators its managed set
    # (`operator sync`: one removed from the settings is removed from the controller).
    controller_syncs_the_declared_operators =
      let
        words = directive (unit ctl "muster-controller") "ExecStartPre";
        pkgs = (clanWith "sops").config.nixosConfigurations.ctl.pkgs;
        declared = (pkgs.formats.json { }).generate "muster-operators.json" operators;
        # `… operator sync --file FILE …`: the words after "operator"
        at = lib.lists.findFirstIndex (w: w == "operator") null words;
      in
      at != null
      && lib.sublist (at + 1) 3 words == [ "sync" "--file" "${declared}" ]
      && !(builtins.elem "add" words);
    controller_config_has_the_operators_and_the_roster =
      let c = controllerJson ctl; in
      c.roster == "/etc/muster/roster.json"
      && ctl.environment.etc."muster/roster.json".source == fixture + "/muster-roster.json";
    # sops: the key is a sops-nix secret under /run/secrets, root 0400 for the agent, owned
    # by the muster user for the controller.
    agent_key_is_the_sops_secret =
      let s = web1.sops.secrets."vars/per-machine/web1/muster-agent/key"; in
      (agentJson web1).machineKeyFile == s.path && s.path == "/run/secrets/vars/per-machine/web1/muster-agent/key"
      && s.owner == "root" && s.mode == "0400" && s.format == "binary";
    controller_key_is_the_sops_secret_of_its_user =
      let s = ctl.sops.secrets."vars/per-machine/ctl/muster-controller/key"; in
      s.path == (controllerJson ctl).keyFile && s.owner == "muster" && s.group == "muster"
      && ctl.users.users.muster.isSystemUser;
    password_store_and_age_keys_are_under_run_secrets =
      (agentJson pw1).machineKeyFile == "/run/secrets/per-machine/pw1/muster-agent/key"
      && (agentJson age1).machineKeyFile == "/run/secrets/per-machine/age1/muster-agent/key";
    vars_dir_follows_the_secret_store =
      (agentJson web1).varsDir == "/var/lib/sops-nix"
      && (agentJson ctl).varsDir == ctl.clan.core.vars.sops.secretUploadDirectory
      && (agentJson pw1).varsDir == "/etc/secret-vars"
      && (agentJson pw1).varsDir == pw1.clan.core.vars.password-store.secretLocation
      && (agentJson age1).varsDir == age1.clan.core.vars.age.secretLocation;
    sops_key_file_is_in_the_vars_dir =
      web1.sops.age.keyFile == "${(agentJson web1).varsDir}/key.txt";
    per_machine_settings_apply =
      (agentJson pw1).confirmTimeout == 300 && (agentJson web1).confirmTimeout == 120;
    # Systemd activation: the agent (and controller) start only after the unit that puts
    # their key in place.
    agent_after_sops_install_secrets =
      web1.sops.useSystemdActivation
      && web1.systemd.services ? sops-install-secrets
      && ordered web1 "muster-agent" "sops-install-secrets.service";
    agent_after_pass_install_secrets =
      pw1.systemd.services ? pass-install-secrets
      && ordered pw1 "muster-agent" "pass-install-secrets.service";
    # Activation scripts: secrets are in place before any unit starts (boot) or restarts
    # (switch); the unit names no secret service that does not exist.
    activation_script_installs_before_units =
      !ctl.sops.useSystemdActivation
      && lib.hasInfix "sops-install-secrets" ctl.system.activationScripts.setupSecrets.text
      # (its text is a writeShellApplication, whose shellcheck needs the Haskell package
      # set; the nixpkgs-slim snapshot lacks hackage-packages.nix: look at deps only)
      && builtins.elem "users" age1.system.activationScripts.setupSecrets.deps
      && !orderedAfterAny ctl "muster-agent" && !orderedAfterAny ctl "muster-controller"
      && !orderedAfterAny age1 "muster-agent";
    controller_tagged_all_is_an_agent_too = (agentJson ctl).machine == "ctl";
    no_failed_assertions = failed ctl ++ failed web1 ++ failed pw1 ++ failed age1 == [ ];
  };
in
if lib.all (x: x) (builtins.attrValues checks) then checks
else throw "clan system checks failed: ${builtins.toJSON (lib.attrNames (lib.filterAttrs (_: v: !v) checks))}; web1 agent.json: ${builtins.toJSON (agentJson web1)}; web1 muster-agent.service: ${unit web1 "muster-agent"}"
