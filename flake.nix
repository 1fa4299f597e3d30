{
  description = "muster: pull deployer for NixOS and nix-darwin fleets";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      systems = [ "x86_64-linux" "aarch64-linux" "x86_64-darwin" "aarch64-darwin" ];
      forAllSystems = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});

      # The flake's modules default `package` to muster built from this checkout with
      # the user's own nixpkgs (set it to pkgs.muster when using overlays.default).
      withPackage = service: module: { lib, pkgs, ... }: {
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
        agent = withPackage "muster-agent" ./nixos-module/agent.nix;
        controller = withPackage "muster-controller" ./nixos-module/controller.nix;
        default = { imports = [ agent controller ]; };
      };

      darwinModules = rec {
        agent = withPackage "muster-agent" ./nixos-module/darwin-agent.nix;
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
