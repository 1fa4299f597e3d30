{
  description = "muster: pull deployer for NixOS and nix-darwin fleets";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      # No x86_64-darwin: nixpkgs deprecated it (a warning on every evaluation).
      systems = [ "x86_64-linux" "aarch64-linux" "aarch64-darwin" ];
      forAllSystems = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});

      # The flake's modules default `package` to muster built from this checkout with
      # the user's own nixpkgs (set it to pkgs.muster when using overlays.default).
      # `key` lets the module system import each wrapper once, however often it is
      # reached (nixosModules.default together with nixosModules.agent); `_file`
      # names it in error messages.
      withPackage = name: service: module: { lib, pkgs, ... }: {
        key = "muster-flake#${name}";
        _file = "${toString ./flake.nix}#${name}";
        imports = [ module ];
        config.services.${service}.package = lib.mkDefault (pkgs.callPackage ./packaging/package.nix { });
      };
    in
    {
      overlays.default = final: _prev: {
        muster = final.callPackage ./packaging/package.nix { };
      };

      packages = forAllSystems (pkgs: rec {
        muster = pkgs.callPackage ./packaging/package.nix { };
        default = muster;
      });

      nixosModules = rec {
        agent = withPackage "nixosModules.agent" "muster-agent" ./nixos-module/agent.nix;
        controller = withPackage "nixosModules.controller" "muster-controller" ./nixos-module/controller.nix;
        default = {
          key = "muster-flake#nixosModules.default";
          _file = "${toString ./flake.nix}#nixosModules.default";
          imports = [ agent controller ];
        };
      };

      # clan service (clan.lol): `inventory.instances.muster.module.input = "muster"`.
      clan.modules.muster = import ./nixos-module/clan-service.nix { inherit self; };

      darwinModules = rec {
        agent = withPackage "darwinModules.agent" "muster-agent" ./nixos-module/darwin-agent.nix;
        default = agent;
      };

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          inputsFrom = [ self.packages.${pkgs.stdenv.hostPlatform.system}.default ];
          packages = with pkgs; [ ccache clang-tools python3 jq ]
            ++ lib.optionals pkgs.stdenv.hostPlatform.isLinux [ gdb ];
        };
      });

      checks = forAllSystems (pkgs:
        let system = pkgs.stdenv.hostPlatform.system; in
        {
          package = self.packages.${system}.default;
        } // lib.optionalAttrs pkgs.stdenv.hostPlatform.isLinux {
          vm = import ./nixos-module/tests/vm.nix { inherit pkgs self; };
        });

      formatter = forAllSystems (pkgs: pkgs.nixpkgs-fmt);
    };
}
