#include "controller/cli/clan.h"

#include <signal.h>
#include <stdlib.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <set>

#include "common/fsutil.h"
#include "common/json_limits.h"
#include "common/process.h"
#include "common/roster.h"
#include "controller/cli/flake.h"
#include "controller/cli/trust.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace muster::cli {

namespace {

constexpr long kTmpfsMagic = 0x01021994;
constexpr const char* kAgentGenerator = "muster-agent";

std::string JoinAnd(const std::vector<std::string>& v) {
  std::string out;
  for (const auto& s : v) out += (out.empty() ? "" : " AND ") + s;
  return out;
}

RunResult RunNix(const std::vector<std::string>& args) {
  RunResult r;
  std::string nix = FindProgram("nix");
  if (nix.empty()) {
    r.start_error = "nix not found in PATH";
    return r;
  }
  RunOptions o;
  o.argv = {nix};
  o.argv.insert(o.argv.end(), args.begin(), args.end());
  o.env = NixEnv();
  o.timeout = std::chrono::minutes(30);
  o.max_output = 64u << 20;
  SystemProcessRunner runner;
  return runner.Run(o);
}

Result<json> NixEvalJson(const std::string& installable, const std::string& apply = "") {
  std::vector<std::string> args = {"eval", "--json", installable};
  if (!apply.empty()) args.insert(args.end(), {"--apply", apply});
  auto r = RunNix(args);
  if (!r.ok()) return Err("nix eval " + installable + " " + r.Describe());
  auto j = ParseJsonBounded(r.out, 64u << 20, 64);
  if (!j) return Err("nix eval " + installable + ": " + j.message());
  return *j;
}

}  // namespace

bool ClanMachine::HasTag(const std::string& tag) const {
  if (tag == "all" || tag == machine_class) return true;
  return std::find(tags.begin(), tags.end(), tag) != tags.end();
}

Result<std::map<std::string, ClanMachine>> ParseClanInventory(const json& machines) {
  if (!machines.is_object()) {
    return Err("the clan inventory's 'machines' is not an attribute set; is this a clan flake?");
  }
  std::map<std::string, ClanMachine> out;
  for (const auto& [name, m] : machines.items()) {
    if (auto st = ValidateMachineName(name); !st) {
      return Err("clan machine '" + name + "': " + st.message());
    }
    ClanMachine cm;
    cm.name = name;
    if (m.is_object()) {
      if (m.contains("machineClass") && m["machineClass"].is_string()) {
        cm.machine_class = m["machineClass"].get<std::string>();
      }
      if (m.contains("tags") && m["tags"].is_array()) {
        for (const auto& t : m["tags"]) {
          if (t.is_string()) cm.tags.push_back(t.get<std::string>());
        }
      }
    }
    if (cm.machine_class != "nixos" && cm.machine_class != "darwin") {
      return Err("clan machine '" + name + "' has machineClass '" + cm.machine_class +
                 "'; muster deploys nixos and darwin machines");
    }
    out[name] = std::move(cm);
  }
  return out;
}

Result<std::vector<std::string>> ResolveClanTargets(
    const std::map<std::string, ClanMachine>& inventory, const ClanSelection& sel,
    const std::function<Result<bool>(const std::string&)>& requires_explicit,
    std::vector<std::string>* skipped) {
  std::vector<std::string> out;
  if (!sel.names.empty()) {
    // Named: an explicit update, like 'clan machines update NAME'.
    for (const auto& name : sel.names) {
      auto it = inventory.find(name);
      if (it == inventory.end()) {
        std::string known;
        for (const auto& [n, _] : inventory) known += (known.empty() ? "" : ", ") + n;
        return Err("machine '" + name + "' is not in the clan's inventory (machines: " +
                   (known.empty() ? "none" : known) + ")");
      }
      for (const auto& t : sel.tags) {
        if (!it->second.HasTag(t)) {
          return Err("machine '" + name + "' does not carry the tag '" + t +
                     "' (tags are AND-ed, as clan does); drop the name or the tag");
        }
      }
      if (std::find(out.begin(), out.end(), name) == out.end()) out.push_back(name);
    }
    return out;
  }
  if (sel.tags.empty() && !sel.all) {
    return Err("name machines, or choose them with --tag T (AND-ed, like clan) or --all");
  }
  std::vector<std::string> candidates;
  for (const auto& [name, m] : inventory) {
    if (std::all_of(sel.tags.begin(), sel.tags.end(),
                    [&](const std::string& t) { return m.HasTag(t); })) {
      candidates.push_back(name);
    }
  }
  if (candidates.empty()) {
    return Err(sel.tags.empty()
                   ? std::string("the clan's inventory has no machines")
                   : "no machines in the clan's inventory with tags: " + JoinAnd(sel.tags));
  }
  for (const auto& name : candidates) {
    auto explicit_only = requires_explicit(name);
    if (!explicit_only) return explicit_only.error();
    if (*explicit_only) {
      if (skipped) skipped->push_back(name);
    } else {
      out.push_back(name);
    }
  }
  if (out.empty()) {
    return Err(
        "every selected machine sets clan.core.deployment.requireExplicitUpdate; name "
        "them to publish to them");
  }
  return out;
}

Result<std::string> ClanVarsDirectory(const std::string& store, const json& facts) {
  auto dir = [&](const char* key) -> Result<std::string> {
    if (!facts.contains(key) || !facts[key].is_string()) {
      return Err("the machine's configuration has no directory for the " + store + " secret store");
    }
    std::string d = facts[key].get<std::string>();
    if (d.size() < 2 || d[0] != '/')
      return Err("secret store directory '" + d + "' is not absolute");
    return d;
  };
  if (store == "sops") return dir("sops");
  if (store == "password-store") return dir("passwordStore");
  if (store == "age") return dir("age");
  return Err("the clan secret store '" + store +
             "' keeps secrets where muster cannot deliver them; use sops, age or password-store "
             "(clan.core.vars.settings.secretStore)");
}

Result<ClanMachineConfig> ParseClanMachineConfig(const std::string& machine, const json& facts) {
  if (!facts.is_object()) return Err("machine '" + machine + "': no configuration facts");
  ClanMachineConfig c;
  c.require_explicit_update = facts.value("requireExplicitUpdate", false);
  c.secret_store = facts.value("secretStore", std::string("sops"));
  auto dir = ClanVarsDirectory(c.secret_store, facts);
  if (!dir) return Err("machine '" + machine + "': " + dir.message());
  c.vars_dir = *dir;
  return c;
}

Result<VarsBundle> ClanUploadBundle(const std::string& dir, const std::string& target) {
  auto b = ReadVarsDirectory(dir);
  if (!b) return b.error();
  for (auto& f : b->files) {
    f.mode = 0400;
    f.owner = "root";
    f.group = "root";
  }
  b->target = target;
  return b;
}

Result<std::unique_ptr<PlaintextDir>> PlaintextDir::Create() {
  std::unique_ptr<PlaintextDir> d(new PlaintextDir());
  sigset_t hold;
  sigemptyset(&hold);
  sigaddset(&hold, SIGINT);
  sigaddset(&hold, SIGTERM);
  sigaddset(&hold, SIGHUP);
  d->masked_ = ::sigprocmask(SIG_BLOCK, &hold, &d->old_) == 0;
  std::vector<std::string> bases;
  if (const char* x = std::getenv("XDG_RUNTIME_DIR"); x && *x) bases.emplace_back(x);
  bases.emplace_back("/dev/shm");
  const char* t = std::getenv("TMPDIR");
  std::string fallback = t && *t ? t : "/tmp";
  for (const auto& b : bases) {
    struct statfs st {};
    if (::statfs(b.c_str(), &st) == 0 && static_cast<long>(st.f_type) == kTmpfsMagic &&
        ::access(b.c_str(), W_OK) == 0) {
      fallback = b;
      d->tmpfs_ = true;
      break;
    }
  }
  std::string tmpl = fallback + "/muster-clan-vars-XXXXXX";
  if (::mkdtemp(tmpl.data()) == nullptr) {
    return Err("cannot create a private temporary directory in " + fallback + ": " +
               std::strerror(errno) + " (set TMPDIR)");
  }
  d->path_ = tmpl;  // mkdtemp makes it 0700
  return d;
}

PlaintextDir::~PlaintextDir() {
  if (!path_.empty()) {
    std::error_code ec;
    fs::remove_all(path_, ec);
    if (ec) std::cerr << "muster: could not remove " << path_ << ": " << ec.message() << "\n";
  }
  if (masked_) ::sigprocmask(SIG_SETMASK, &old_, nullptr);
}

Result<std::map<std::string, ClanMachineConfig>> ClanFlake::EvalConfigs(
    const std::vector<std::string>& names) {
  std::map<std::string, ClanMachineConfig> out;
  for (const char* cls : {"nixos", "darwin"}) {
    std::string set;
    for (const auto& n : names) {
      if (inventory_.at(n).machine_class == cls) set += "\"" + n + "\" = null; ";
    }
    if (set.empty()) continue;
    // Only the named machines are evaluated. Option paths as clan-core's
    // own selectors use them (clan_lib/nix_selectors.py), with clan's defaults.
    std::string apply =
        "cs: builtins.mapAttrs (n: c: let cfg = c.config; v = cfg.clan.core.vars or {}; in { "
        "requireExplicitUpdate = cfg.clan.core.deployment.requireExplicitUpdate or "
        "(cfg.clan.deployment.requireExplicitUpdate or false); "
        "secretStore = v.settings.secretStore or \"sops\"; "
        "sops = v.sops.secretUploadDirectory or \"/var/lib/sops-nix\"; "
        "passwordStore = v.password-store.secretLocation or \"/etc/secret-vars\"; "
        "age = v.age.secretLocation or \"/etc/secret-vars\"; }) (builtins.intersectAttrs { " +
        set + "} cs)";
    auto j = NixEvalJson(flake_ + "#" + cls + "Configurations", apply);
    if (!j) return j.error();
    for (const auto& n : names) {
      if (inventory_.at(n).machine_class != cls) continue;
      if (!j->contains(n)) {
        return Err("machine '" + n + "' is in the clan's inventory but the flake has no " + cls +
                   "Configurations." + n);
      }
      auto c = ParseClanMachineConfig(n, (*j)[n]);
      if (!c) return c.error();
      out[n] = *c;
    }
  }
  return out;
}

Result<ClanMachineConfig> ClanFlake::Config(const std::string& machine) {
  if (auto it = configs_.find(machine); it != configs_.end()) return it->second;
  auto c = EvalConfigs({machine});
  if (!c) return c.error();
  configs_.insert(c->begin(), c->end());
  return configs_.at(machine);
}

Result<std::vector<std::string>> ClanFlake::Targets(const ClanSelection& sel) {
  auto inv = NixEvalJson(flake_ + "#clanInternals.inventoryClass.inventorySerialization.machines");
  if (!inv) {
    return Err(inv.message() + "\n(is " + flake_ +
               " a clan flake? 'muster publish --clan' reads its inventory)");
  }
  auto parsed = ParseClanInventory(*inv);
  if (!parsed) return parsed.error();
  inventory_ = std::move(*parsed);
  // All candidates' facts in one evaluation per machine class.
  std::vector<std::string> wanted;
  for (const auto& [name, m] : inventory_) {
    bool named = std::find(sel.names.begin(), sel.names.end(), name) != sel.names.end();
    bool tagged = std::all_of(sel.tags.begin(), sel.tags.end(),
                              [&](const std::string& t) { return m.HasTag(t); });
    if (named || (sel.names.empty() && tagged && (sel.all || !sel.tags.empty()))) {
      wanted.push_back(name);
    }
  }
  if (!wanted.empty()) {
    auto configs = EvalConfigs(wanted);
    if (!configs) return configs.error();
    configs_ = std::move(*configs);
  }
  std::vector<std::string> skipped;
  auto targets = ResolveClanTargets(
      inventory_, sel,
      [&](const std::string& m) -> Result<bool> {
        auto c = Config(m);
        if (!c) return c.error();
        return c->require_explicit_update;
      },
      &skipped);
  for (const auto& s : skipped) {
    std::cerr << "muster: skipped " << s
              << ": clan.core.deployment.requireExplicitUpdate is set (name it to publish)\n";
  }
  return targets;
}

Result<VarsBundle> ClanFlake::Vars(const std::string& machine) {
  auto cfg = Config(machine);
  if (!cfg) return cfg.error();
  std::string clan = FindProgram("clan");
  if (clan.empty()) {
    return Err(
        "'clan' is not on PATH; 'muster publish --clan' runs 'clan vars upload'. Install "
        "clan-core's clan-cli (e.g. 'nix shell github:clan-lol/clan-core#clan-cli') or "
        "enter the clan's dev shell");
  }
  auto dir = PlaintextDir::Create();
  if (!dir) return dir.error();
  if (!(*dir)->on_tmpfs()) {
    std::cerr << "muster: warning: no tmpfs found ($XDG_RUNTIME_DIR, /dev/shm); " << machine
              << "'s secrets pass through " << (*dir)->path() << " (removed right after)\n";
  }
  std::string out = (*dir)->path() + "/upload";
  RunOptions o;
  o.argv = {clan, "vars", "upload", machine, "--directory", out, "--flake", flake_};
  o.env = NixEnv();
  o.timeout = std::chrono::minutes(30);
  o.on_line = [&](bool, const std::string& line) {
    std::cerr << "[" << machine << "] " << Printable(line) << "\n";
  };
  SystemProcessRunner runner;
  auto r = runner.Run(o);
  if (!r.ok()) return Err("clan vars upload " + machine + " --directory … " + r.Describe());
  std::error_code ec;
  if (!fs::is_directory(out, ec)) fs::create_directories(out, ec);  // nothing to upload
  return ClanUploadBundle(out, cfg->vars_dir);
}

namespace {

struct KeyAndTags {
  std::string key;
  std::vector<std::string> tags;
};

Result<std::map<std::string, KeyAndTags>> KeysFromJson(const std::string& path) {
  auto text = ReadFile(path, 16u << 20);
  if (!text) return text.error();
  auto j = ParseJsonBounded(*text, 16u << 20, 8);
  if (!j || !j->is_object()) {
    return Err(path +
               ": expected {\"NAME\": \"ed25519:…\"} or {\"NAME\": {\"key\": …, \"tags\": […]}}");
  }
  std::map<std::string, KeyAndTags> out;
  for (const auto& [name, v] : j->items()) {
    KeyAndTags kt;
    if (v.is_string()) {
      kt.key = v.get<std::string>();
    } else if (v.is_object() && v.contains("key") && v["key"].is_string()) {
      kt.key = v["key"].get<std::string>();
      if (v.contains("tags")) {
        if (!v["tags"].is_array()) return Err(path + ": '" + name + "'.tags must be a list");
        for (const auto& t : v["tags"]) {
          if (!t.is_string()) return Err(path + ": '" + name + "'.tags must be strings");
          kt.tags.push_back(t.get<std::string>());
        }
      }
    } else {
      return Err(path + ": '" + name + "' must be a key or {\"key\", \"tags\"}");
    }
    out[name] = kt;
  }
  return out;
}

// Keys from vars/per-machine/<m>/muster-agent/key.pub/value, tags from the
// inventory. Machines without the value are not agents (yet): listed.
Result<std::map<std::string, KeyAndTags>> KeysFromClan(const std::string& flake) {
  auto inv = NixEvalJson(flake + "#clanInternals.inventoryClass.inventorySerialization.machines");
  if (!inv) return inv.error();
  auto machines = ParseClanInventory(*inv);
  if (!machines) return machines.error();
  std::map<std::string, KeyAndTags> out;
  // Public values are files in the clan's directory (clanLib.getPublicValue).
  std::string dir = flake.rfind("path:", 0) == 0 ? flake.substr(5) : flake;
  if (std::error_code ec; !fs::is_directory(dir, ec)) {
    return Err("--flake " + flake +
               " is not a directory; 'roster sign --clan' reads the clan's "
               "public values from its checkout");
  }
  for (const auto& [name, m] : *machines) {
    fs::path value =
        fs::path(dir) / "vars/per-machine" / name / kAgentGenerator / "key.pub" / "value";
    std::error_code ec;
    if (!fs::exists(value, ec)) {
      std::cerr << "muster: " << name << ": no " << value.string()
                << " (not a muster agent, or run 'clan vars generate " << name << "' first)\n";
      continue;
    }
    auto text = ReadFile(value, 4096);
    if (!text) return text.error();
    out[name] = {*text, m.tags};
  }
  return out;
}

}  // namespace

int RosterSign(const Globals& g, const RosterSignArgs& a) {
  std::map<std::string, KeyAndTags> want;
  if (a.clan) {
    auto k = KeysFromClan(a.flake);
    if (!k) return Die(k.message(), kExitUsage);
    want = std::move(*k);
  }
  if (!a.keys_file.empty()) {
    auto k = KeysFromJson(a.keys_file);
    if (!k) return Die(k.message(), kExitUsage);
    for (auto& [n, kt] : *k) want[n] = std::move(kt);
  }
  for (const auto& m : a.machines) {
    auto eq = m.find('=');
    if (eq == std::string::npos)
      return Die("--machine takes NAME=ed25519:…, not '" + m + "'", kExitUsage);
    want[m.substr(0, eq)] = {m.substr(eq + 1), {}};
  }
  if (want.empty()) {
    return Die("nothing to sign: give --clan, --keys FILE or --machine NAME=KEY", kExitUsage);
  }
  SecretKey key = SecretKey::Generate();
  if (int rc = LoadOperatorKey(g, &key)) return rc;
  std::vector<PublicKey> trusted = TrustedOperatorKeys(g, key);

  // Entries of the previous file that still say the same are kept, so that
  // signing again changes nothing the controller has to apply; machines that
  // are no longer listed get a signed removal.
  std::map<std::string, SignedRosterEntry> previous;
  std::map<std::string, RosterEntry> previous_parsed;
  std::error_code exists_ec;
  if (!a.out.empty() && fs::exists(a.out, exists_ec)) {
    auto text = ReadFile(a.out, 64u << 20);
    if (!text) return Die(text.message(), kExitUsage);
    auto old = DecodeRosterFile(*text);
    if (!old) return Die(a.out + ": " + old.message(), kExitUsage);
    for (const auto& s : *old) {
      auto e = VerifyRosterEntry(s, trusted);
      if (!e) continue;  // not ours to keep
      if (!previous_parsed.count(e->machine) ||
          previous_parsed[e->machine].signed_at < e->signed_at) {
        previous[e->machine] = s;
        previous_parsed[e->machine] = *e;
      }
    }
  }
  std::int64_t now = NowMs();
  std::vector<SignedRosterEntry> entries;
  int kept = 0, signed_new = 0, removals = 0;
  for (const auto& [name, kt] : want) {
    if (auto st = ValidateMachineName(name); !st) return Die(st.message(), kExitUsage);
    if (auto st = ValidateTags(kt.tags); !st) return Die(name + ": " + st.message(), kExitUsage);
    auto pk = ParsePublicKey(kt.key);
    if (!pk) return Die(name + ": " + pk.message(), kExitUsage);
    RosterEntry e;
    e.machine = name;
    e.key = pk->ToText();
    e.tags = kt.tags;
    if (auto p = previous_parsed.find(name); p != previous_parsed.end() && !p->second.removed &&
                                             p->second.key == e.key && p->second.tags == e.tags) {
      entries.push_back(previous[name]);
      ++kept;
      continue;
    }
    e.signed_at =
        std::max(now, previous_parsed.count(name) ? previous_parsed[name].signed_at + 1 : 0);
    entries.push_back(SignRosterEntry(e, key));
    ++signed_new;
  }
  for (const auto& [name, e] : previous_parsed) {
    if (want.count(name)) continue;
    if (e.removed) {
      entries.push_back(previous[name]);
      continue;
    }
    RosterEntry r;
    r.machine = name;
    r.removed = true;
    r.signed_at = std::max(now, e.signed_at + 1);
    entries.push_back(SignRosterEntry(r, key));
    ++removals;
  }
  std::string text = EncodeRosterFile(entries);
  if (a.out.empty()) {
    std::cout << text;
  } else if (auto st = WriteFileAtomic(a.out, text, 0644); !st) {
    return Die(st.message(), kExitFailed);
  }
  std::cerr << "roster: " << signed_new << " signed, " << kept << " unchanged, " << removals
            << " removals, signed by " << key.public_key().ShortId() << "\n";
  return 0;
}

}  // namespace muster::cli
