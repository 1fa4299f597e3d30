# Evaluates the modules with nixpkgs' lib.evalModules but without the rest of nixpkgs,
# NixOS or nix-darwin: the options they set (systemd, launchd, users, …) are accepted by a
# freeform stub, `pkgs` is a stub with formats.json and a fake muster derivation.
# tests/packaging/check.sh (step `modules`) runs it when a nixpkgs lib is at hand:
#   nix-instantiate --eval --strict --json nixos-module/tests/eval.nix \
#     --arg lib 'import /path/to/nixpkgs/lib' --argstr case agent
# The full module system with the real NixOS is exercised by the VM test (vm.nix).
{ lib, case }:
let
  inherit (lib) types;

  jsonType = types.nullOr (types.oneOf [
    types.bool types.int types.float types.str
    (types.attrsOf jsonType) (types.listOf jsonType)
  ]) // { description = "JSON value"; };

  pkgs = {
    formats.json = { }: {
      type = jsonType;
      # Stands for the store file: interpolates to a path, keeps the value for the checks.
      generate = name: value: { __toString = _: "/nix/store/00000000000000000000000000000000-${name}"; inherit name value; };
    };
    callPackage = _fn: _args: pkgs.muster;
    muster = {
      type = "derivation";
      name = "muster-0.1.0";
      outPath = "/nix/store/00000000000000000000000000000000-muster-0.1.0";
      meta.mainProgram = "muster";
    };
  };

  stub = { lib, ... }: {
    options.assertions = lib.mkOption { type = types.listOf types.attrs; default = [ ]; };
    options.meta = lib.mkOption { type = types.attrsOf types.anything; default = { }; };
    # Everything else the modules set (systemd.*, launchd.*, users.*, environment.*, …).
    config._module.freeformType = types.lazyAttrsOf types.anything;
  };

  eval = module: extra: evalWith [ module ] extra;
  evalWith = modules: extra:
    (lib.evalModules {
      modules = [ stub extra { _module.args = { inherit pkgs; }; } ] ++ modules;
    }).config;

  agentBase = {
    networking.hostName = "web1";
    nix.package = "/nix/store/00000000000000000000000000000000-nix";
    systemd.package = "/nix/store/00000000000000000000000000000000-systemd";
    services.muster-agent = {
      enable = true;
      controllers = [ "wss://ctl.example.org:7443" ];
      controllerPin = "sha256:1897eb94e4b87db23de0f1d4b4c983a8a243b80b5c00d3c07da6294fcbfcf180";
      trustedOperatorKeys = [ "ed25519:8O59lk3d/tJL8ZliV76W15+ym20stQNRFDl23jppQRo=" ];
      healthChecks = [
        { name = "sshd"; command = [ "/run/current-system/sw/bin/systemctl" "is-active" "sshd" ]; }
        { name = "web"; http = "http://127.0.0.1/"; timeout = 10; }
      ];
    };
  };

  # The flake's outputs with a stub nixpkgs: its modules must set `package` themselves.
  flake = (import ../../flake.nix).outputs {
    self = flake;
    nixpkgs = { inherit lib; legacyPackages = { }; };
  };

  # packaging/package.nix with a stub stdenv whose mkDerivation returns the attributes.
  package = import ../../packaging/package.nix ({
    inherit lib;
    stdenv = {
      mkDerivation = f: let a = f a; in a;
      buildPlatform.canExecute = _: true;
      hostPlatform = { };
    };
    boost = { version = "1.83.0"; };
  } // lib.genAttrs [ "cmake" "ninja" "pkg-config" "openssl" "libsodium" "nlohmann_json" "spdlog" "cli11" "sqlite" "gtest" "python3" "zstd" "libpq" ] (n: n));

  failedAssertions = cfg: map (a: a.message) (builtins.filter (a: !a.assertion) cfg.assertions);

  cases = {
    agent =
      let c = eval ../agent.nix agentBase; in {
        config = c.environment.etc."muster/agent.json".source.value;
        service = c.systemd.services.muster-agent;
        failed = failedAssertions c;
      };

    agent-settings =
      let
        c = eval ../agent.nix (lib.recursiveUpdate agentBase {
          services.muster-agent = {
            machine = "db1";
            enrollTokenFile = "/run/secrets/muster-token";
            confirmTimeout = 300;
            settings = { rebootPolicy = "when-required"; metricsListen = "127.0.0.1:9101"; extraKey = [ 1 2 ]; };
          };
        });
      in {
        config = c.environment.etc."muster/agent.json".source.value;
        service = c.systemd.services.muster-agent;
        failed = failedAssertions c;
      };

    # An empty networking.hostName: an assertion says what to set, not a type error.
    agent-no-hostname =
      let c = eval ../agent.nix (lib.recursiveUpdate agentBase { networking.hostName = ""; });
      in { failed = failedAssertions c; };

    agent-bad-check =
      let c = eval ../agent.nix (lib.recursiveUpdate agentBase {
        services.muster-agent.healthChecks = [ { name = "both"; command = [ "true" ]; http = "http://x/"; } ];
      });
      in { failed = failedAssertions c; };

    # Must fail to evaluate: the pin is not sha256:<64 hex>.
    agent-bad-pin =
      let c = eval ../agent.nix (lib.recursiveUpdate agentBase {
        services.muster-agent.controllerPin = "sha256:xyz";
      });
      in c.environment.etc."muster/agent.json".source.value;

    darwin-agent =
      let c = eval ../darwin-agent.nix agentBase; in {
        config = c.environment.etc."muster/agent.json".source.value;
        daemon = c.launchd.daemons.muster-agent;
        failed = failedAssertions c;
      };

    flake-modules =
      let
        agent = eval flake.nixosModules.agent agentBase;
        darwin = eval flake.darwinModules.agent agentBase;
        controller = eval flake.nixosModules.controller { services.muster-controller.enable = true; };
      in {
        agentExec = agent.systemd.services.muster-agent.serviceConfig.ExecStart;
        darwinArgs = darwin.launchd.daemons.muster-agent.serviceConfig.ProgramArguments;
        controllerExec = controller.systemd.services.muster-controller.serviceConfig.ExecStart;
        outputs = builtins.attrNames flake;
        nixosModules = builtins.attrNames flake.nixosModules;
        # default and agent together: each wrapper is imported once (by its key).
        bothPackage = (evalWith [ flake.nixosModules.default flake.nixosModules.agent ]
          agentBase).services.muster-agent.package.name;
        darwinModules = builtins.attrNames flake.darwinModules;
      };

    package = {
      inherit (package) pname version cmakeFlags nativeBuildInputs buildInputs checkPhase doCheck;
      # lib.fileset needs Nix >= 2.14 (builtins.readFileType); older Nix skips the source.
      srcFiles = if builtins ? readFileType then builtins.attrNames (builtins.readDir package.src) else null;
      inherit (package.meta) mainProgram platforms homepage;
      license = package.meta.license.spdxId or package.meta.license;
    };

    controller =
      let c = eval ../controller.nix { services.muster-controller.enable = true; }; in {
        config = c.environment.etc."muster/controller.json".source.value;
        service = c.systemd.services.muster-controller;
        firewall = c.networking.firewall or { };
        user = c.users.users.muster;
      };

    controller-custom =
      let c = eval ../controller.nix {
        services.muster-controller = {
          enable = true;
          listen = [ "[fd80::1]:7443" "0.0.0.0:8443" ];
          stateDir = "/srv/muster";
          metricsListen = null;
          openFirewall = true;
          settings = { threads = 4; logLevel = "debug"; };
        };
      };
      in {
        config = c.environment.etc."muster/controller.json".source.value;
        service = c.systemd.services.muster-controller;
        firewall = c.networking.firewall;
        tmpfiles = c.systemd.tmpfiles.rules;
      };
  };
in
cases.${case}
