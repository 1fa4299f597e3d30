// Preview before go: what a generation would change on this machine, found
// without changing anything but the store (the closure is fetched, nothing is
// linked, installed or activated).
//
// RunPreview asks nix what it would fetch, realises (download only), compares
// the new closure with the active one (store paths added and removed, and
// package versions nvd-style, from the name-version of store path names),
// runs `switch-to-configuration dry-activate` (NixOS) and parses the units it
// would stop, reload, restart and start, and checks whether a reboot would be
// needed. The parsers are pure; RunPreview uses SystemOps only.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "agent/system_ops.h"
#include "common/manifest.h"
#include "common/protocol.h"

namespace muster {

struct StoreName {
  std::string name;
  std::string version;  // "" when the name has none
};

// "/nix/store/<hash>-openssh-9.8p1" → {"openssh", "9.8p1"}: as Nix splits
// names, the version starts at the first dash followed by a digit.
StoreName ParseStoreName(std::string_view path);
// The name part of a store path: "/nix/store/<hash>-openssh-9.8p1" → "openssh-9.8p1".
std::string StorePathName(std::string_view path);

// Package changes between two closures: a name whose set of versions differs
// (before/after joined with ", "), added (before "") or removed (after "").
// Names without any version and the toplevels themselves are left out; sorted
// by name.
std::vector<proto::VersionChange> DiffVersions(const std::vector<std::string>& before,
                                               const std::vector<std::string>& after);

// Fills the unit lists of r from the output of `switch-to-configuration
// dry-activate` ("would stop the following units: a.service, b.service", and
// likewise reload, restart, start; "would restart systemd" counts as a restart
// of systemd).
void ParseDryActivate(std::string_view output, proto::PreviewReport* r);

// The whole preview of m (its toplevel, substituters and keys) on this
// machine; r.error says what failed.
proto::PreviewReport RunPreview(const Manifest& m, SystemOps& ops, const LineSink& sink);

}  // namespace muster
