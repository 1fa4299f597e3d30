// Building system toplevels from a flake and copying them to a binary cache,
// with nix's own commands (argv vectors, output shown line by line).
#pragma once

#include <functional>
#include <map>
#include <string>
#include <vector>

#include "common/error.h"

namespace muster {

struct FlakeBuildOptions {
  std::string flake;      // e.g. "." or "path:/src/infra" or "github:org/repo"
  int jobs = 2;           // builds run concurrently up to this many
  std::string cache;      // nix copy --to URL ("" = do not copy)
  std::string cache_key;  // secret key file to sign paths with ("" = do not sign)
  std::function<void(const std::string& machine, const std::string& line)> on_line;
};

// The attribute that builds a machine's system:
// nixosConfigurations.<m>.config.system.build.toplevel or darwinConfigurations.<m>.system,
// whichever the flake has.
Result<std::string> SystemAttribute(const std::string& flake, const std::string& machine);

// Builds (and copies/signs) each machine's toplevel; returns machine → store path.
// Fails with the first error, naming the machine and nix's message.
Result<std::map<std::string, std::string>> BuildFromFlake(const FlakeBuildOptions& o,
                                                          const std::vector<std::string>& machines);

// Public key ("name:base64") of a nix secret signing key file.
Result<std::string> CachePublicKey(const std::string& secret_key_file);

// Environment additions for nix invocations (flakes and nix-command enabled).
std::map<std::string, std::string> NixEnv();

}  // namespace muster
