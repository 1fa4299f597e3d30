// muster: the operator CLI. Talks to the controller over /v1/operator with the
// operator's key; signs manifests and seals vars locally (the controller never
// sees an operator's private key or a plaintext secret).
//
// Exit codes: 0 success; 1 the operation failed (refused by the controller, or a
// waited-for deploy did not succeed); 2 usage or configuration error; 3 cannot
// reach or authenticate with the controller; 4 --wait timed out.
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <iomanip>
#include <iostream>
#include <map>
#include <optional>
#include <set>
#include <sstream>

#include "common/crypto.h"
#include "common/fsutil.h"
#include "common/json_limits.h"
#include "common/manifest.h"
#include "common/phase.h"
#include "common/tls.h"
#include "common/utf8.h"
#include "common/vars_bundle.h"
#include "controller/cli/connection.h"
#include "controller/cli/flake.h"

namespace fs = std::filesystem;
using nlohmann::json;
using namespace muster;

namespace {

constexpr int kExitFailed = 1;
constexpr int kExitUsage = 2;
constexpr int kExitConnect = 3;
constexpr int kExitTimeout = 4;

struct Globals {
  std::string controller;
  std::string pin;
  std::string key;
  std::string config;
  bool json_out = false;
  // Publishing defaults from the config file: binary cache to copy to, its
  // signing key, and what agents should substitute from.
  std::string cache;
  std::string cache_key;
  std::vector<std::string> substituters;
  std::vector<std::string> trusted_keys;
};

std::string ConfigHome() {
  if (const char* x = std::getenv("XDG_CONFIG_HOME"); x && *x) return std::string(x) + "/muster";
  if (const char* h = std::getenv("HOME"); h && *h) return std::string(h) + "/.config/muster";
  return "/root/.config/muster";
}

int Die(const std::string& msg, int code) {
  std::cerr << "muster: " << msg << "\n";
  return code;
}

// flag > environment > config file > default.
Status ResolveGlobals(Globals& g) {
  auto env = [](const char* n) -> std::string {
    const char* v = std::getenv(n);
    return v ? v : "";
  };
  if (g.config.empty()) g.config = env("MUSTER_CONFIG");
  bool explicit_config = !g.config.empty();
  if (g.config.empty()) g.config = ConfigHome() + "/config.json";
  json file = json::object();
  std::error_code ec;
  if (fs::exists(g.config, ec)) {
    auto text = ReadFile(g.config, 1 << 20);
    if (!text) return text.error();
    auto j = ParseJsonBounded(*text);
    if (!j || !j->is_object()) return Err(g.config + ": not a JSON object");
    file = *j;
  } else if (explicit_config) {
    return Err("config file " + g.config + " does not exist");
  }
  auto pick = [&](std::string& field, const char* var, const char* key, std::string def) {
    if (!field.empty()) return;
    field = env(var);
    if (!field.empty()) return;
    if (file.contains(key) && file[key].is_string()) {
      field = file[key].get<std::string>();
      return;
    }
    field = std::move(def);
  };
  pick(g.controller, "MUSTER_CONTROLLER", "controller", "");
  pick(g.pin, "MUSTER_PIN", "pin", "");
  pick(g.key, "MUSTER_KEY", "key", ConfigHome() + "/operator.key");
  pick(g.cache, "MUSTER_CACHE", "cache", "");
  pick(g.cache_key, "MUSTER_CACHE_KEY", "cacheKey", "");
  auto list = [&](const char* key) {
    std::vector<std::string> v;
    if (file.contains(key) && file[key].is_array()) {
      for (const auto& x : file[key]) {
        if (x.is_string()) v.push_back(x.get<std::string>());
      }
    }
    return v;
  };
  g.substituters = list("substituters");
  g.trusted_keys = list("trustedPublicKeys");
  return Status::Ok();
}

Result<std::unique_ptr<Connection>> Connect(const Globals& g, SecretKey& key) {
  if (g.controller.empty()) {
    return Err(
        "no controller given: use --controller wss://HOST:PORT, MUSTER_CONTROLLER or "
        "'controller' in " +
        g.config);
  }
  if (g.pin.empty()) {
    return Err("no controller pin given: use --pin sha256:…, MUSTER_PIN or 'pin' in " + g.config);
  }
  auto url = ParseWsUrl(g.controller, "/v1/operator");
  if (!url) return url.error();
  if (url->path == "/v1/agent") url->path = "/v1/operator";
  auto ctx = tls::MakeClientContext(key, g.pin);
  if (!ctx) return ctx.error();
  ClientOptions o;
  o.url = *url;
  o.tls = *ctx;
  o.max_message_bytes = 16u << 20;
  o.user_agent = std::string("muster-cli/") + MUSTER_VERSION;
  return Connection::Open(o);
}

// Loads the operator key and connects; returns 0, or the exit code after
// saying what is wrong.
int OpenConnection(const Globals& g, std::unique_ptr<Connection>* out) {
  auto key = LoadSecretKey(g.key);
  if (!key) {
    return Die(key.message() + " (create one with 'muster key generate', or pass --key)",
               kExitUsage);
  }
  auto conn = Connect(g, *key);
  if (!conn) return Die(conn.message(), kExitConnect);
  *out = std::move(*conn);
  return 0;
}

std::string Ago(std::int64_t ms) {
  if (ms == 0) return "never";
  auto now = std::chrono::duration_cast<std::chrono::milliseconds>(
                 std::chrono::system_clock::now().time_since_epoch())
                 .count();
  std::int64_t s = (now - ms) / 1000;
  if (s < 0) s = 0;
  if (s < 120) return std::to_string(s) + "s ago";
  if (s < 7200) return std::to_string(s / 60) + "m ago";
  if (s < 172800) return std::to_string(s / 3600) + "h ago";
  return std::to_string(s / 86400) + "d ago";
}

std::string Timestamp(std::int64_t ms) {
  std::time_t t = static_cast<std::time_t>(ms / 1000);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

std::string JoinTags(const json& tags) {
  std::string s;
  for (const auto& t : tags) s += (s.empty() ? "" : ",") + t.get<std::string>();
  return s.empty() ? "-" : s;
}

void PrintTable(const std::vector<std::vector<std::string>>& rows) {
  std::vector<std::size_t> w;
  for (const auto& r : rows) {
    if (w.size() < r.size()) w.resize(r.size(), 0);
    for (std::size_t i = 0; i < r.size(); ++i) w[i] = std::max(w[i], r[i].size());
  }
  for (const auto& r : rows) {
    std::string line;
    for (std::size_t i = 0; i < r.size(); ++i) {
      line += r[i];
      if (i + 1 < r.size()) line += std::string(w[i] - r[i].size() + 2, ' ');
    }
    std::cout << line << "\n";
  }
}

struct PublishArgs {
  std::vector<std::string> positionals;  // [MACHINE…] STOREPATH, or machines with --flake
  std::vector<std::string> machines;
  std::vector<std::string> tags;
  bool all = false;
  std::string flake;
  int build_jobs = 2;
  std::string action = "switch";
  std::string kind = "auto";
  std::string vars_dir;
  std::string vars_root;
  std::vector<std::string> substituters;
  std::vector<std::string> trusted_keys;
  std::string cache;
  std::string cache_key;
  bool force = false;
  bool wait = false;
  int timeout = 600;
  std::string canary;
  int max_parallel = 0;
  int max_failures = 0;
};

// Waits for the machine's report on generation gen to reach a terminal phase.
int WaitFor(Connection& c, const std::string& machine, std::int64_t gen, int timeout_s,
            bool json_out) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(timeout_s);
  // The deploy may already have progressed before the subscription: check once.
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) {
      return Die("timed out after " + std::to_string(timeout_s) + " s waiting for " + machine +
                     " generation " + std::to_string(gen) + " (it continues; see 'muster status " +
                     machine + "')",
                 kExitTimeout);
    }
    auto ev = c.NextEvent(std::min(left, std::chrono::milliseconds(1000)));
    if (!ev) return Die(ev.message(), kExitConnect);
    if (!*ev) continue;
    const proto::Event& e = **ev;
    if (e.topic != "status") continue;
    if (e.data.value("machine", "") != machine ||
        e.data.value("generation", std::int64_t{0}) != gen)
      continue;
    std::string phase = e.data.value("phase", "");
    std::string detail = e.data.value("detail", "");
    if (json_out) {
      std::cout << e.data.dump() << "\n";
    } else {
      std::cout << Timestamp(e.data.value("at", std::int64_t{0})) << "  " << machine << "  gen "
                << gen << "  " << phase << (detail.empty() ? "" : "  " + detail) << "\n";
    }
    std::cout.flush();
    auto ph = ParsePhase(phase);
    if (ph && IsTerminal(*ph)) {
      return (*ph == Phase::kSucceeded || *ph == Phase::kUnchanged) ? 0 : kExitFailed;
    }
  }
}

int Watch(Connection& c, const std::string& id, int timeout_s, bool json_out);

// Parses --canary N or P% against the number of machines.
Result<int> CanaryCount(const std::string& text, std::size_t total) {
  if (text.empty()) return 0;
  try {
    if (text.back() == '%') {
      double p = std::stod(text.substr(0, text.size() - 1));
      if (p < 0 || p > 100) return Err("--canary percent must be between 0 and 100");
      return static_cast<int>(std::ceil(p / 100.0 * static_cast<double>(total)));
    }
    std::size_t used = 0;
    int n = std::stoi(text, &used);
    if (used != text.size() || n < 0) throw std::invalid_argument("x");
    return n;
  } catch (const std::exception&) {
    return Err("--canary takes a count (e.g. 2) or a percentage (e.g. 10%), not '" + text + "'");
  }
}

int Publish(const Globals& g, PublishArgs a) {
  auto action = ParseAction(a.action);
  if (!action) return Die("--action must be switch, boot, test or dry-activate", kExitUsage);
  auto kind = ParseKind(a.kind);
  if (!kind) return Die("--kind must be auto, nixos, darwin, home-manager or profile", kExitUsage);
  if (a.cache.empty()) a.cache = g.cache;
  if (a.cache_key.empty()) a.cache_key = g.cache_key;
  if (a.substituters.empty()) a.substituters = g.substituters;
  if (a.trusted_keys.empty()) a.trusted_keys = g.trusted_keys;
  if (a.substituters.empty() && !a.cache.empty()) a.substituters = {a.cache};
  if (a.trusted_keys.empty() && !a.cache_key.empty()) {
    auto pub = CachePublicKey(a.cache_key);
    if (!pub) return Die(pub.message(), kExitUsage);
    a.trusted_keys = {*pub};
  }

  // Targets and toplevel(s).
  std::string storepath;
  if (!a.flake.empty()) {
    auto hash = a.flake.find('#');
    if (hash != std::string::npos) {
      a.machines.push_back(a.flake.substr(hash + 1));
      a.flake = a.flake.substr(0, hash);
    }
    for (const auto& p : a.positionals) a.machines.push_back(p);
  } else {
    if (a.positionals.empty() || a.positionals.back().rfind("/nix/store/", 0) != 0) {
      return Die("give the system toplevel as the last argument (/nix/store/…) or use --flake",
                 kExitUsage);
    }
    storepath = a.positionals.back();
    if (auto st = ValidateStorePath(storepath); !st) return Die(st.message(), kExitUsage);
    a.machines.insert(a.machines.end(), a.positionals.begin(), a.positionals.end() - 1);
  }
  auto key = LoadSecretKey(g.key);
  if (!key) return Die(key.message() + " (create one with 'muster key generate')", kExitUsage);
  auto conn = Connect(g, *key);
  if (!conn) return Die(conn.message(), kExitConnect);
  Connection& c = **conn;

  std::vector<std::string> targets = a.machines;
  if (a.all || !a.tags.empty()) {
    auto list = c.Call("machine.list", json::object());
    if (!list) return Die(list.message(), kExitFailed);
    for (const auto& m : (*list)["machines"]) {
      bool take = a.all;
      for (const auto& t : m["tags"]) {
        if (std::find(a.tags.begin(), a.tags.end(), t.get<std::string>()) != a.tags.end())
          take = true;
      }
      if (take && !m.value("revoked", false)) targets.push_back(m["name"].get<std::string>());
    }
  }
  {
    std::vector<std::string> uniq;
    for (const auto& t : targets) {
      if (std::find(uniq.begin(), uniq.end(), t) == uniq.end()) uniq.push_back(t);
    }
    targets = uniq;
  }
  if (targets.empty())
    return Die("no machines to publish to (name them, or use --tag / --all)", kExitUsage);
  bool rollout =
      targets.size() > 1 || !a.canary.empty() || a.max_parallel > 0 || a.max_failures > 0;
  auto canary = CanaryCount(a.canary, targets.size());
  if (!canary) return Die(canary.message(), kExitUsage);

  std::map<std::string, std::string> toplevels;
  if (!a.flake.empty()) {
    FlakeBuildOptions fo;
    fo.flake = a.flake;
    fo.jobs = a.build_jobs;
    fo.cache = a.cache;
    fo.cache_key = a.cache_key;
    fo.on_line = [&](const std::string& m, const std::string& line) {
      std::cerr << "[" << m << "] " << line << "\n";
    };
    auto built = BuildFromFlake(fo, targets);
    if (!built) return Die(built.message(), kExitFailed);
    toplevels = *built;
  } else {
    for (const auto& t : targets) toplevels[t] = storepath;
  }

  std::optional<VarsBundle> shared_vars;
  if (!a.vars_dir.empty()) {
    auto b = ReadVarsDirectory(a.vars_dir);
    if (!b) return Die(b.message(), kExitUsage);
    shared_vars = std::move(*b);
  }
  if (a.wait) {
    auto sub = c.Call("subscribe", json::object());
    if (!sub) return Die(sub.message(), kExitFailed);
  }

  for (int attempt = 0; attempt < 5; ++attempt) {
    json items = json::array();
    std::map<std::string, std::int64_t> numbers;
    std::map<std::string, std::size_t> var_counts;
    for (const auto& machine : targets) {
      auto info = c.Call("machine.get", {{"name", machine}});
      if (!info) return Die(info.message(), kExitFailed);
      auto mkey = ParsePublicKey((*info)["machine"]["key"].get<std::string>());
      if (!mkey) return Die("controller returned an invalid key for " + machine, kExitFailed);
      std::optional<VarsBundle> bundle = shared_vars;
      if (!a.vars_root.empty()) {
        std::error_code ec;
        fs::path dir = fs::path(a.vars_root) / machine;
        if (fs::is_directory(dir, ec)) {
          auto b = ReadVarsDirectory(dir);
          if (!b) return Die(b.message(), kExitUsage);
          bundle = std::move(*b);
        }
      }
      std::string sealed_b64;
      if (bundle) {
        auto sealed = SealTo(*mkey, EncodeVarsBundle(*bundle));
        if (!sealed) return Die(sealed.message(), kExitFailed);
        sealed_b64 = Base64Encode(*sealed);
        var_counts[machine] = bundle->files.size();
      }
      Manifest m;
      m.machine = machine;
      m.generation =
          (*info).value("maxGeneration", (*info)["latestGeneration"].get<std::int64_t>()) + 1;
      m.toplevel = toplevels.at(machine);
      m.kind = *kind;
      m.action = *action;
      m.substituters = a.substituters;
      m.trusted_public_keys = a.trusted_keys;
      m.vars_hash = bundle ? VarsHash(*Base64Decode(sealed_b64)) : "";
      m.created_at = static_cast<std::int64_t>(std::time(nullptr));
      m.force = a.force;
      SignedManifest sm = SignManifest(m, *key);
      numbers[machine] = m.generation;
      items.push_back({{"manifest", sm.manifest},
                       {"signer", sm.signer},
                       {"signature", sm.signature},
                       {"vars", sealed_b64}});
    }
    if (!rollout) {
      const json& it = items[0];
      auto res = c.Call("publish", it);
      if (!res) {
        if (res.message().find("not newer") != std::string::npos)
          continue;  // raced another publish
        return Die(res.message(), kExitFailed);
      }
      const std::string& machine = targets[0];
      bool online = res->value("online", false);
      if (g.json_out) {
        std::cout << res->dump() << "\n";
      } else {
        std::cout << "published " << machine << " generation " << numbers[machine] << ": "
                  << a.action << " " << toplevels[machine]
                  << (var_counts.count(machine)
                          ? " with " + std::to_string(var_counts[machine]) + " vars files"
                          : "")
                  << (online ? "" : " (machine offline: it gets it when it connects)") << "\n";
      }
      std::cout.flush();
      if (!a.wait) return 0;
      return WaitFor(c, machine, numbers[machine], a.timeout, g.json_out);
    }
    auto res = c.Call("rollout.create", {{"items", items},
                                         {"canary", *canary},
                                         {"maxParallel", a.max_parallel},
                                         {"maxFailures", a.max_failures}});
    if (!res) {
      if (res.message().find("not newer") != std::string::npos) continue;
      return Die(res.message(), kExitFailed);
    }
    std::string id = (*res)["rollout"].get<std::string>();
    if (g.json_out) {
      std::cout << res->dump() << "\n";
    } else {
      std::cout << "rollout " << id << ": " << targets.size() << " machines, canary " << *canary
                << ", max parallel "
                << (a.max_parallel ? std::to_string(a.max_parallel) : "unlimited")
                << ", max failures " << a.max_failures << "\n";
    }
    std::cout.flush();
    if (!a.wait) return 0;
    return Watch(c, id, a.timeout, g.json_out);
  }
  return Die("could not publish: generations kept changing underneath", kExitFailed);
}

// Live view of a rollout: a progress bar and per-machine lines on a terminal,
// plain timestamped lines otherwise. Exit code 0 only when it succeeded.
int Watch(Connection& c, const std::string& id, int timeout_s, bool json_out) {
  auto sub = c.Call("subscribe", json::object());
  if (!sub) return Die(sub.message(), kExitFailed);
  auto first = c.Call("rollout.status", {{"id", id}});
  if (!first) return Die(first.message(), kExitFailed);
  const bool tty = !json_out && ::isatty(1);
  std::map<std::string, std::string> last_item, last_phase;  // what was shown per machine
  std::set<std::string> members;
  for (const auto& it : (*first)["items"]) members.insert(it["machine"].get<std::string>());
  std::size_t bar_len = 0;
  auto clear_bar = [&] {
    if (tty && bar_len) {
      std::cout << "\r" << std::string(bar_len, ' ') << "\r";
      bar_len = 0;
    }
  };
  auto line = [&](std::int64_t at, const std::string& text) {
    clear_bar();
    std::cout << Timestamp(at) << "  " << text << "\n";
  };
  auto draw = [&](const json& d) {
    if (!tty) return;
    int total = d.value("total", 0);
    const json& counts = d["counts"];
    int ok = counts.value("succeeded", 0), bad = counts.value("failed", 0);
    int done = ok + bad + counts.value("superseded", 0) + counts.value("cancelled", 0);
    int width = 30;
    int filled = total ? done * width / total : width;
    std::string bar =
        "[" + std::string(static_cast<std::size_t>(filled), '#') +
        std::string(static_cast<std::size_t>(width - filled), '-') + "] " + std::to_string(done) +
        "/" + std::to_string(total) + "  " + d.value("state", "") + "  " + std::to_string(ok) +
        " ok  " + std::to_string(bad) + " failed  " + std::to_string(counts.value("released", 0)) +
        " in flight  " + std::to_string(counts.value("pending", 0)) + " pending";
    clear_bar();
    std::cout << bar;
    bar_len = bar.size();
    std::cout.flush();
  };
  auto handle_rollout = [&](const json& d) -> int {
    if (json_out) std::cout << d.dump() << "\n";
    for (const auto& it : d["items"]) {
      std::string m = it["machine"].get<std::string>();
      std::string st = it["state"].get<std::string>();
      if (last_item[m] == st) continue;
      last_item[m] = st;
      // Per-machine phases come from status events; the rollout adds when a
      // machine is released and how it ended up.
      if (!json_out && st != "pending") {
        line(it.value("updatedAt", std::int64_t{0}),
             m + "  gen " + std::to_string(it["generation"].get<std::int64_t>()) + "  [rollout] " +
                 st +
                 (st == "released" ? (it.value("stage", "") == "canary" ? " (canary)" : "") : ""));
      }
    }
    draw(d);
    std::string state = d.value("state", "");
    if (state == "succeeded" || state == "halted" || state == "aborted") {
      clear_bar();
      if (!json_out) {
        std::cout << "rollout " << id << " " << state << ": " << d.value("detail", "") << "\n";
      }
      return state == "succeeded" ? 0 : kExitFailed;
    }
    return -1;
  };
  if (int rc = handle_rollout(*first); rc >= 0) return rc;
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(timeout_s);
  while (std::chrono::steady_clock::now() < deadline) {
    auto ev = c.NextEvent(std::chrono::milliseconds(1000));
    if (!ev) return Die(ev.message(), kExitConnect);
    if (!*ev) continue;
    const auto& e = **ev;
    if (e.topic == "rollout" && e.data.value("rollout", "") == id && e.data.contains("items")) {
      if (int rc = handle_rollout(e.data); rc >= 0) return rc;
    } else if (e.topic == "status" && members.count(e.data.value("machine", ""))) {
      if (json_out) {
        std::cout << e.data.dump() << "\n";
      } else {
        std::string m = e.data.value("machine", "");
        std::string ph = e.data.value("phase", "");
        if (last_phase[m] != ph) {
          last_phase[m] = ph;
          line(e.data.value("at", std::int64_t{0}),
               m + "  gen " + std::to_string(e.data.value("generation", std::int64_t{0})) + "  " +
                   ph +
                   (e.data.value("detail", "").empty() ? "" : "  " + e.data.value("detail", "")));
        }
      }
    }
    std::cout.flush();
  }
  clear_bar();
  return Die("timed out after " + std::to_string(timeout_s) + " s watching rollout " + id +
                 " (it continues; 'muster rollout watch " + id + "')",
             kExitTimeout);
}

int Rollout(const Globals& g, const std::string& verb, const std::string& id, int timeout) {
  std::unique_ptr<Connection> conn;
  if (int rc = OpenConnection(g, &conn)) return rc;
  if (verb == "watch") return Watch(*conn, id, timeout, g.json_out);
  if (verb == "list") {
    auto res = conn->Call("rollout.list", {{"limit", 50}});
    if (!res) return Die(res.message(), kExitFailed);
    if (g.json_out) {
      std::cout << (*res)["rollouts"].dump(2) << "\n";
      return 0;
    }
    std::vector<std::vector<std::string>> rows = {
        {"ROLLOUT", "STATE", "CREATED", "BY", "MACHINES", "DETAIL"}};
    for (const auto& r : (*res)["rollouts"]) {
      rows.push_back({r["rollout"].get<std::string>(), r["state"].get<std::string>(),
                      Timestamp(r["createdAt"].get<std::int64_t>()),
                      r["createdBy"].get<std::string>(), std::to_string(r["total"].get<int>()),
                      r.value("detail", "")});
    }
    PrintTable(rows);
    return 0;
  }
  auto res = conn->Call("rollout." + verb, {{"id", id}});
  if (!res) return Die(res.message(), kExitFailed);
  if (g.json_out) {
    std::cout << res->dump(2) << "\n";
    return 0;
  }
  std::cout << "rollout " << id << "  " << (*res)["state"].get<std::string>() << "  "
            << (*res).value("detail", "") << "\n";
  std::vector<std::vector<std::string>> rows = {
      {"MACHINE", "GEN", "STAGE", "STATE", "ONLINE", "DETAIL"}};
  for (const auto& it : (*res)["items"]) {
    rows.push_back({it["machine"].get<std::string>(),
                    std::to_string(it["generation"].get<std::int64_t>()),
                    it["stage"].get<std::string>(), it["state"].get<std::string>(),
                    it["online"].get<bool>() ? "yes" : "no", it.value("detail", "")});
  }
  PrintTable(rows);
  return 0;
}

int Status_(const Globals& g, const std::string& machine) {
  std::unique_ptr<Connection> conn;
  if (int rc = OpenConnection(g, &conn)) return rc;
  json params = json::object();
  if (!machine.empty()) params["machine"] = machine;
  auto res = conn->Call("status", params);
  if (!res) return Die(res.message(), kExitFailed);
  if (g.json_out) {
    std::cout << (*res)["machines"].dump(2) << "\n";
    return 0;
  }
  std::vector<std::vector<std::string>> rows = {
      {"MACHINE", "TAGS", "ONLINE", "LAST SEEN", "GEN", "TARGET", "PHASE", "REBOOT", "DETAIL"}};
  for (const auto& m : (*res)["machines"]) {
    std::string detail = m.value("detail", "");
    if (detail.size() > 80) detail = CutUtf8(detail, 77) + "...";
    rows.push_back({m["name"].get<std::string>(), JoinTags(m["tags"]),
                    m["online"].get<bool>() ? "yes" : "no", Ago(m["lastSeen"].get<std::int64_t>()),
                    std::to_string(m["generation"].get<std::int64_t>()),
                    std::to_string(m["targetGeneration"].get<std::int64_t>()),
                    m["phase"].get<std::string>(), m["rebootRequired"].get<bool>() ? "yes" : "no",
                    detail.empty() ? "-" : detail});
  }
  PrintTable(rows);
  return 0;
}

int History(const Globals& g, const std::string& machine, int limit) {
  std::unique_ptr<Connection> conn;
  if (int rc = OpenConnection(g, &conn)) return rc;
  auto res = conn->Call("history", {{"machine", machine}, {"limit", limit}});
  if (!res) return Die(res.message(), kExitFailed);
  if (g.json_out) {
    std::cout << (*res)["generations"].dump(2) << "\n";
    return 0;
  }
  for (const auto& gen : (*res)["generations"]) {
    std::cout << "generation " << gen["generation"].get<std::int64_t>() << "  "
              << gen["action"].get<std::string>() << " " << gen["toplevel"].get<std::string>()
              << "  published " << Timestamp(gen["createdAt"].get<std::int64_t>()) << " by "
              << gen["publishedBy"].get<std::string>() << "\n";
    for (const auto& e : gen["events"]) {
      std::string d = e.value("detail", "");
      std::cout << "  " << Timestamp(e["at"].get<std::int64_t>()) << "  " << std::left
                << std::setw(15) << e["phase"].get<std::string>() << d << "\n";
    }
  }
  return 0;
}

int Logs(const Globals& g, const std::string& machine, std::int64_t generation, bool follow) {
  std::unique_ptr<Connection> conn;
  if (int rc = OpenConnection(g, &conn)) return rc;
  if (follow) {
    auto sub = conn->Call("subscribe", json::object());
    if (!sub) return Die(sub.message(), kExitFailed);
  }
  std::int64_t after = 0;
  std::int64_t gen = generation;
  for (;;) {
    auto res = conn->Call(
        "logs", {{"machine", machine}, {"generation", gen}, {"after", after}, {"limit", 5000}});
    if (!res) return Die(res.message(), kExitFailed);
    gen = (*res)["generation"].get<std::int64_t>();
    for (const auto& l : (*res)["lines"]) {
      if (g.json_out) {
        std::cout << l.dump() << "\n";
      } else {
        std::cout << "[" << l["stream"].get<std::string>() << "] " << l["line"].get<std::string>()
                  << "\n";
      }
    }
    std::cout.flush();
    after = (*res)["last"].get<std::int64_t>();
    if ((*res)["lines"].size() >= 5000) continue;
    if (!follow) return 0;
    // Wait for new lines (log events) or a terminal status, then read again.
    bool finished = false;
    for (;;) {
      auto ev = conn->NextEvent(std::chrono::seconds(1));
      if (!ev) return Die(ev.message(), kExitConnect);
      if (!*ev) break;
      const auto& e = **ev;
      if (e.data.value("machine", "") != machine) continue;
      if (e.topic == "log") break;
      if (e.topic == "publish" && generation == 0) {
        gen = e.data.value("generation", gen);
        after = 0;
        break;
      }
      if (e.topic == "status" && e.data.value("generation", std::int64_t{0}) == gen) {
        auto ph = ParsePhase(e.data.value("phase", ""));
        if (ph && IsTerminal(*ph)) finished = true;
      }
    }
    (void)finished;  // -f keeps following later generations too
  }
}

int SimpleCall(const Globals& g, const std::string& method, const json& params,
               const std::string& ok_message) {
  std::unique_ptr<Connection> conn;
  if (int rc = OpenConnection(g, &conn)) return rc;
  auto res = conn->Call(method, params);
  if (!res) return Die(res.message(), kExitFailed);
  if (g.json_out) {
    std::cout << res->dump() << "\n";
  } else {
    std::cout << ok_message << "\n";
  }
  return 0;
}

int MachineList(const Globals& g) {
  std::unique_ptr<Connection> conn;
  if (int rc = OpenConnection(g, &conn)) return rc;
  auto res = conn->Call("machine.list", json::object());
  if (!res) return Die(res.message(), kExitFailed);
  if (g.json_out) {
    std::cout << (*res)["machines"].dump(2) << "\n";
    return 0;
  }
  std::vector<std::vector<std::string>> rows = {{"MACHINE", "TAGS", "ONLINE", "KEY"}};
  for (const auto& m : (*res)["machines"]) {
    rows.push_back({m["name"].get<std::string>(), JoinTags(m["tags"]),
                    m["online"].get<bool>() ? "yes" : "no", m["key"].get<std::string>()});
  }
  PrintTable(rows);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  InitCrypto();
  CLI::App app{"muster: publish signed system generations and watch them land"};
  app.set_version_flag("--version", std::string("muster ") + MUSTER_VERSION);
  app.fallthrough();  // global options may follow the subcommand
  app.require_subcommand(1);
  Globals g;
  app.add_option("--controller", g.controller,
                 "controller URL, wss://HOST:PORT (env MUSTER_CONTROLLER)");
  app.add_option("--pin", g.pin, "controller key pin, sha256:… (env MUSTER_PIN)");
  app.add_option("--key", g.key,
                 "operator key file (env MUSTER_KEY; default ~/.config/muster/operator.key)");
  app.add_option("--config", g.config,
                 "CLI config file (env MUSTER_CONFIG; default ~/.config/muster/config.json)");
  app.add_flag("--json", g.json_out, "machine-readable output");

  auto* key = app.add_subcommand("key", "operator keys");
  key->require_subcommand(1);
  std::string key_out;
  auto* key_gen =
      key->add_subcommand("generate", "create an operator key and print its public key");
  key_gen->add_option("--out", key_out, "where to write it (default: --key path)");
  auto* key_show = key->add_subcommand("show", "print the public key of the operator key");

  auto* machine = app.add_subcommand("machine", "register and list machines");
  machine->require_subcommand(1);
  std::string m_name, m_key;
  std::vector<std::string> m_tags;
  auto* m_add = machine->add_subcommand("add", "register a machine's public key");
  m_add->add_option("NAME", m_name)->required();
  m_add->add_option("--key", m_key, "the key printed by 'muster-agent --print-key'")->required();
  m_add->add_option("--tag", m_tags, "tag (repeatable)")->allow_extra_args(false);
  auto* m_list = machine->add_subcommand("list", "list machines");
  auto* m_remove = machine->add_subcommand("remove", "forget a machine and close its connection");
  m_remove->add_option("NAME", m_name)->required();
  auto* m_tag = machine->add_subcommand("tag", "replace a machine's tags");
  m_tag->add_option("NAME", m_name)->required();
  m_tag->add_option("--tag", m_tags, "tag (repeatable; none clears)")->allow_extra_args(false);

  PublishArgs pa;
  auto* publish = app.add_subcommand(
      "publish",
      "sign and publish a generation: 'publish MACHINE… STOREPATH', 'publish --tag T STOREPATH', "
      "or 'publish --flake FLAKE#MACHINE' / '--flake FLAKE --tag T'");
  publish->add_option("TARGETS", pa.positionals,
                      "machine names, then the system toplevel /nix/store/…");
  publish->add_option("--machine", pa.machines, "machine (repeatable)")->allow_extra_args(false);
  publish->add_option("--tag", pa.tags, "every machine with this tag (repeatable)")
      ->allow_extra_args(false);
  publish->add_flag("--all", pa.all, "every registered machine");
  publish->add_option("--flake", pa.flake,
                      "build each machine's system from this flake (FLAKE or FLAKE#MACHINE)");
  publish->add_option("--build-jobs", pa.build_jobs, "concurrent builds with --flake")
      ->capture_default_str();
  publish->add_option("--cache", pa.cache,
                      "binary cache to copy built closures to (nix copy --to)");
  publish->add_option("--cache-key", pa.cache_key, "secret key file to sign closures with");
  publish->add_option("--action", pa.action, "switch | boot | test | dry-activate")
      ->capture_default_str();
  publish->add_option("--kind", pa.kind, "auto | nixos | darwin | home-manager | profile")
      ->capture_default_str();
  publish->add_option("--vars", pa.vars_dir, "directory of vars to seal to each machine");
  publish->add_option("--vars-root", pa.vars_root,
                      "directory with one vars directory per machine name");
  publish
      ->add_option("--substituter", pa.substituters,
                   "binary cache URL agents fetch from (repeatable)")
      ->allow_extra_args(false);
  publish
      ->add_option("--trusted-public-key", pa.trusted_keys,
                   "cache signing key name:base64 (repeatable)")
      ->allow_extra_args(false);
  publish->add_flag("--force", pa.force, "activate even if the closure is already active");
  publish->add_option("--canary", pa.canary, "machines deployed first, as a count or a percentage");
  publish->add_option("--max-parallel", pa.max_parallel,
                      "machines in flight at once after the canaries (0: all)");
  publish->add_option("--max-failures", pa.max_failures,
                      "halt the rollout when more machines fail");
  publish->add_flag("--wait", pa.wait,
                    "follow the deploy or rollout live; exit code says whether it succeeded");
  publish->add_option("--timeout", pa.timeout, "seconds to --wait")->capture_default_str();

  auto* rollout = app.add_subcommand("rollout", "staged rollouts");
  rollout->require_subcommand(1);
  std::string r_id;
  int r_timeout = 3600;
  auto* r_list = rollout->add_subcommand("list", "recent rollouts");
  std::vector<CLI::App*> r_cmds;
  for (const char* verb : {"status", "pause", "resume", "abort", "watch"}) {
    auto* sc = rollout->add_subcommand(verb, std::string(verb) + " a rollout");
    sc->add_option("ID", r_id)->required();
    if (std::string(verb) == "watch") sc->add_option("--timeout", r_timeout)->capture_default_str();
    r_cmds.push_back(sc);
  }

  std::string e_name;
  std::vector<std::string> e_tags;
  int e_ttl = 3600;
  auto* m_enroll =
      machine->add_subcommand("enroll", "print a one-time token an agent uses to register itself");
  m_enroll->add_option("NAME", e_name)->required();
  m_enroll->add_option("--tag", e_tags, "tag (repeatable)")->allow_extra_args(false);
  m_enroll->add_option("--ttl", e_ttl, "seconds the token stays valid")->capture_default_str();
  auto* m_revoke =
      machine->add_subcommand("revoke", "refuse a machine's key and close its connection");
  m_revoke->add_option("NAME", m_name)->required();

  std::string s_machine;
  auto* status = app.add_subcommand("status", "machines and where their deploys stand");
  status->add_option("MACHINE", s_machine);

  int h_limit = 10;
  auto* history = app.add_subcommand("history", "generations of a machine and their events");
  history->add_option("MACHINE", s_machine)->required();
  history->add_option("--limit", h_limit)->capture_default_str();

  std::int64_t l_gen = 0;
  bool l_follow = false;
  auto* logs = app.add_subcommand("logs", "output of realise and activation on a machine");
  logs->add_option("MACHINE", s_machine)->required();
  logs->add_option("--generation", l_gen, "generation (default: the newest)");
  logs->add_flag("-f,--follow", l_follow, "keep printing new lines");

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  if (auto st = ResolveGlobals(g); !st) return Die(st.message(), kExitUsage);

  if (key_gen->parsed()) {
    std::string out = key_out.empty() ? g.key : key_out;
    std::error_code ec;
    if (fs::exists(out, ec))
      return Die(out + " already exists; refusing to overwrite a key", kExitUsage);
    fs::path parent = fs::path(out).parent_path();
    if (!parent.empty()) {
      if (auto st = MakeDirs(parent, 0700); !st) return Die(st.message(), kExitUsage);
    }
    SecretKey k = SecretKey::Generate();
    if (auto st = SaveSecretKey(k, out); !st) return Die(st.message(), kExitFailed);
    std::string pub = k.public_key().ToText();
    (void)WriteFileAtomic(out + ".pub", pub + "\n", 0644);
    if (g.json_out) {
      std::cout << json{{"key", pub}, {"path", out}}.dump() << "\n";
    } else {
      std::cout << pub << "\n";
      std::cerr << "wrote " << out << " (0600) and " << out << ".pub\n";
    }
    return 0;
  }
  if (key_show->parsed()) {
    auto k = LoadSecretKey(g.key);
    if (!k) return Die(k.message(), kExitUsage);
    std::cout << k->public_key().ToText() << "\n";
    return 0;
  }
  if (m_add->parsed()) {
    return SimpleCall(g, "machine.add", {{"name", m_name}, {"key", m_key}, {"tags", m_tags}},
                      "machine " + m_name + " added");
  }
  if (m_remove->parsed()) {
    return SimpleCall(g, "machine.remove", {{"name", m_name}}, "machine " + m_name + " removed");
  }
  if (m_tag->parsed()) {
    return SimpleCall(g, "machine.tag", {{"name", m_name}, {"tags", m_tags}},
                      "machine " + m_name + " tagged");
  }
  if (m_list->parsed()) return MachineList(g);
  if (publish->parsed()) return Publish(g, pa);
  if (r_list->parsed()) return Rollout(g, "list", "", 0);
  for (auto* sc : r_cmds) {
    if (sc->parsed()) return Rollout(g, sc->get_name(), r_id, r_timeout);
  }
  if (m_revoke->parsed()) {
    return SimpleCall(g, "machine.revoke", {{"name", m_name}}, "machine " + m_name + " revoked");
  }
  if (m_enroll->parsed()) {
    std::unique_ptr<Connection> conn;
    if (int rc = OpenConnection(g, &conn)) return rc;
    auto res = conn->Call("machine.enroll", {{"name", e_name}, {"tags", e_tags}, {"ttl", e_ttl}});
    if (!res) return Die(res.message(), kExitFailed);
    if (g.json_out) {
      std::cout << res->dump() << "\n";
    } else {
      std::cout << (*res)["token"].get<std::string>() << "\n";
      std::cerr << "one-time token for machine " << e_name << ", valid until "
                << Timestamp((*res)["expiresAt"].get<std::int64_t>())
                << "; put it in the agent's enrollTokenFile\n";
    }
    return 0;
  }
  if (status->parsed()) return Status_(g, s_machine);
  if (history->parsed()) return History(g, s_machine, h_limit);
  if (logs->parsed()) return Logs(g, s_machine, l_gen, l_follow);
  return 0;
}
