# muster for nixpkgs' callPackage: `pkgs.callPackage ./packaging/package.nix { }`.
# The flake at the root exposes it as packages.<system>.default.
{ lib
, stdenv
, cmake
, ninja
, pkg-config
, boost
, openssl
, libsodium
, zstd
, libpq
, nlohmann_json
, spdlog
, cli11
, sqlite
, gtest
, python3
}:

assert lib.versionAtLeast boost.version "1.81";

stdenv.mkDerivation (finalAttrs: {
  pname = "muster";
  # The one version number lives in CMakeLists.txt: project(muster VERSION x.y.z …).
  version = builtins.head
    (builtins.match ".*project\\(muster VERSION ([0-9.]+)[ )].*" (builtins.readFile ../CMakeLists.txt));

  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../CMakeLists.txt
      ../CMakePresets.json
      ../common
      ../agent
      ../controller
      ../tests
      ../packaging
      (lib.fileset.maybeMissing ../docs)
    ];
  };

  # python3: with doCheck the test tree is configured, and the integration and
  # systemd tests' CMake needs the interpreter (only the unit tests run here).
  nativeBuildInputs = [ cmake ninja pkg-config ] ++ lib.optional finalAttrs.doCheck python3;
  buildInputs = [ boost openssl libsodium zstd libpq nlohmann_json spdlog cli11 sqlite gtest ];

  cmakeFlags = [
    (lib.cmakeBool "MUSTER_WERROR" false)
    (lib.cmakeBool "MUSTER_BUILD_BENCH" false)
    (lib.cmakeBool "MUSTER_BUILD_TESTS" finalAttrs.doCheck)
    # Units and examples under /lib and /etc are for the Debian package; NixOS and
    # nix-darwin get theirs from the modules.
    (lib.cmakeBool "MUSTER_INSTALL_SYSTEM_FILES" false)
  ];

  doCheck = stdenv.buildPlatform.canExecute stdenv.hostPlatform;
  checkPhase = ''
    runHook preCheck
    ctest -L unit --output-on-failure -j $NIX_BUILD_CORES
    runHook postCheck
  '';

  meta = {
    description = "Pull deployer for NixOS and nix-darwin fleets";
    longDescription = ''
      muster-agent keeps one outbound TLS websocket to muster-controller, receives the
      system generation an operator signed for its machine together with its secrets,
      realises it from a binary cache, activates, and confirms or rolls back.
    '';
    # Where this repository is published (the docs' github:OWNER/muster).
    homepage = "https://github.com/OWNER/muster";
    license = lib.licenses.mit;
    mainProgram = "muster";
    platforms = lib.platforms.linux ++ lib.platforms.darwin;
  };
})
