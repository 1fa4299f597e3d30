// clan (clan.lol) integration for the CLI: the inventory as targets, clan's
// secret stores as vars, clan public values as the signed roster.
//
// What clan-core provides and this file builds on:
// - the inventory, `nix eval --json FLAKE#clanInternals.inventoryClass.
//   inventorySerialization.machines`: machine name → {machineClass, tags, …};
//   the tags `all`, `nixos` and `darwin` are computed;
// - per machine, `clan.core.deployment.requireExplicitUpdate` (such machines
//   are skipped unless named) and the secret store with its directory
//   (`clan.core.vars.settings.secretStore`: sops → `clan.core.vars.sops.
//   secretUploadDirectory`, password-store / age → their `secretLocation`);
// - `clan vars upload MACHINE --directory DIR --flake FLAKE`, which writes
//   what `clan machines update` would upload; clan installs it with
//   directories 0700 and files 0400 root:root, replacing the directory;
// - public values at vars/per-machine/<m>/<generator>/<file>/value (the
//   muster clan service's generator `muster-agent` keeps `key.pub` there).
// Everything here runs on the operator's machine. Single-threaded except
// where noted.
#pragma once

#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "common/error.h"
#include "common/vars_bundle.h"
#include "controller/cli/commands.h"

namespace muster::cli {

struct ClanMachine {
  std::string name;
  std::string machine_class = "nixos";        // nixos | darwin
  std::vector<std::string> tags;              // as the inventory lists them
  bool HasTag(const std::string& tag) const;  // including the computed ones
};

// Parses inventorySerialization.machines; names are checked as muster
// machine names.
Result<std::map<std::string, ClanMachine>> ParseClanInventory(const nlohmann::json& machines);

struct ClanSelection {
  std::vector<std::string> names;
  std::vector<std::string> tags;  // AND, like clan
  bool all = false;
};

// Targets as `clan machines update` picks them: named machines (each must
// exist and carry every tag given), else every machine carrying all tags
// (--all: every machine), minus those with requireExplicitUpdate (listed in
// *skipped). Fails, saying what to do, when nothing is selected.
// requires_explicit is consulted only for machines that were not named.
Result<std::vector<std::string>> ResolveClanTargets(
    const std::map<std::string, ClanMachine>& inventory, const ClanSelection& sel,
    const std::function<Result<bool>(const std::string&)>& requires_explicit,
    std::vector<std::string>* skipped);

// Per machine facts from its configuration.
struct ClanMachineConfig {
  bool require_explicit_update = false;
  std::string secret_store = "sops";  // sops | password-store | age | vm | fs
  std::string vars_dir;               // where clan uploads its secrets
};
// The directory for the machine's secret store, or why muster cannot deliver it.
Result<std::string> ClanVarsDirectory(const std::string& store, const nlohmann::json& facts);
// Parses the answer of the facts evaluation for one machine.
Result<ClanMachineConfig> ParseClanMachineConfig(const std::string& machine,
                                                 const nlohmann::json& facts);

// What clan's upload directory holds, as a bundle for target: every file 0400
// root:root (what clan's own upload installs, whatever modes --directory
// left), directories implied 0700.
Result<VarsBundle> ClanUploadBundle(const std::string& dir, const std::string& target);

// A private temporary directory (0700) on tmpfs where one is available
// ($XDG_RUNTIME_DIR, /dev/shm, else $TMPDIR with a warning); removed with
// everything in it when destroyed. SIGINT, SIGTERM and SIGHUP are held back
// while it exists, so that an interrupt cannot leave plaintext behind: they
// take effect once it is gone.
class PlaintextDir {
 public:
  static Result<std::unique_ptr<PlaintextDir>> Create();
  ~PlaintextDir();
  PlaintextDir(const PlaintextDir&) = delete;
  PlaintextDir& operator=(const PlaintextDir&) = delete;
  const std::string& path() const { return path_; }
  bool on_tmpfs() const { return tmpfs_; }

 private:
  PlaintextDir() = default;
  std::string path_;
  bool tmpfs_ = false;
  bool masked_ = false;
  sigset_t old_{};
};

// The clan side of 'muster publish --clan': resolves targets from the
// inventory and fetches each machine's vars with clan.
class ClanFlake {
 public:
  explicit ClanFlake(std::string flake) : flake_(std::move(flake)) {}
  // Inventory, tags, requireExplicitUpdate; prints skipped machines to stderr.
  Result<std::vector<std::string>> Targets(const ClanSelection& sel);
  // `clan vars upload` into a PlaintextDir, read as a bundle for the
  // machine's secret store directory, directory removed before returning.
  Result<VarsBundle> Vars(const std::string& machine);

 private:
  Result<ClanMachineConfig> Config(const std::string& machine);
  Result<std::map<std::string, ClanMachineConfig>> EvalConfigs(
      const std::vector<std::string>& names);

  std::string flake_;
  std::map<std::string, ClanMachine> inventory_;
  std::map<std::string, ClanMachineConfig> configs_;
};

// muster roster sign: signed roster entries for machines and keys.
struct RosterSignArgs {
  std::vector<std::string> machines;  // NAME=ed25519:…
  std::string keys_file;              // JSON {"NAME": "ed25519:…" | {"key", "tags"}}
  bool clan = false;                  // keys from the clan's public values, tags from its inventory
  std::string flake = ".";
  std::string out;  // "" = stdout
};
int RosterSign(const Globals& g, const RosterSignArgs& a);

}  // namespace muster::cli
