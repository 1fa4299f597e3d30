#include "controller/cli/common.h"

#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <iostream>

#include "common/fsutil.h"
#include "common/json_limits.h"
#include "common/tls.h"
#include "common/url.h"
#include "common/utf8.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace muster::cli {

namespace {
std::string Env(const char* n) {
  const char* v = std::getenv(n);
  return v ? v : "";
}
}  // namespace

std::string ConfigHome() {
  if (auto x = Env("XDG_CONFIG_HOME"); !x.empty()) return x + "/muster";
  if (auto h = Env("HOME"); !h.empty()) return h + "/.config/muster";
  return "/root/.config/muster";
}

std::string StateHome() {
  if (auto x = Env("XDG_STATE_HOME"); !x.empty()) return x + "/muster";
  if (auto h = Env("HOME"); !h.empty()) return h + "/.local/state/muster";
  return "/root/.local/state/muster";
}

int Die(const std::string& msg, int code) {
  std::cerr << "muster: " << msg << "\n";
  return code;
}

Status ResolveGlobals(Globals& g) {
  if (g.config.empty()) g.config = Env("MUSTER_CONFIG");
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
    field = Env(var);
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
  auto list = [&](const char* key, std::vector<std::string>& out) -> Status {
    if (!file.contains(key)) return Status::Ok();
    if (!file[key].is_array()) return Err(g.config + ": '" + key + "' must be a list of strings");
    for (const auto& x : file[key]) {
      if (!x.is_string()) return Err(g.config + ": '" + key + "' must be a list of strings");
      out.push_back(x.get<std::string>());
    }
    return Status::Ok();
  };
  if (auto st = list("substituters", g.substituters); !st) return st;
  if (auto st = list("trustedPublicKeys", g.trusted_keys); !st) return st;
  if (auto st = list("trustedOperatorKeys", g.trusted_operator_keys); !st) return st;
  for (const auto& k : g.trusted_operator_keys) {
    if (auto pk = ParsePublicKey(k); !pk) {
      return Err(g.config + ": trustedOperatorKeys: " + pk.message());
    }
  }
  return Status::Ok();
}

int LoadOperatorKey(const Globals& g, SecretKey* key) {
  auto k = LoadSecretKey(g.key);
  if (!k) {
    return Die(k.message() + " (create one with 'muster key generate', or pass --key)", kExitUsage);
  }
  if (key) *key = *k;
  return 0;
}

int OpenConnection(const Globals& g, std::unique_ptr<Connection>* out, SecretKey* key_out) {
  auto key = LoadSecretKey(g.key);
  if (!key) {
    return Die(key.message() + " (create one with 'muster key generate', or pass --key)",
               kExitUsage);
  }
  if (key_out) *key_out = *key;
  if (g.controller.empty()) {
    return Die(
        "no controller given: use --controller wss://HOST:PORT, MUSTER_CONTROLLER or "
        "'controller' in " +
            g.config,
        kExitUsage);
  }
  if (g.pin.empty()) {
    return Die("no controller pin given: use --pin sha256:…, MUSTER_PIN or 'pin' in " + g.config,
               kExitUsage);
  }
  auto url = ParseWsUrl(g.controller, "/v1/operator");
  if (!url) return Die(url.message(), kExitUsage);
  if (url->path == "/v1/agent") url->path = "/v1/operator";
  auto ctx = tls::MakeClientContext(*key, g.pin);
  if (!ctx) return Die(ctx.message(), kExitConnect);
  ClientOptions o;
  o.url = *url;
  o.tls = *ctx;
  // Answers about the whole fleet (the roster: ~550 bytes per machine) are
  // large; the controller's own limit for operator requests is 64 MiB.
  o.max_message_bytes = 256u << 20;
  o.user_agent = std::string("muster-cli/") + MUSTER_VERSION;
  auto conn = Connection::Open(o);
  if (!conn) return Die(conn.message(), kExitConnect);
  *out = std::move(*conn);
  return 0;
}

std::int64_t NowMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

std::string Ago(std::int64_t ms) {
  if (ms == 0) return "never";
  std::int64_t s = (NowMs() - ms) / 1000;
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
  for (const auto& t : tags) {
    if (t.is_string()) s += (s.empty() ? "" : ",") + Printable(t.get<std::string>());
  }
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

std::string Printable(std::string_view in) { return PrintableUtf8(in); }

bool Interactive() { return ::isatty(0) && ::isatty(2); }

bool Confirm(const std::string& question) {
  if (!Interactive()) return false;
  std::cerr << question << " [y/N] " << std::flush;
  std::string answer;
  if (!std::getline(std::cin, answer)) return false;
  return answer == "y" || answer == "Y" || answer == "yes";
}

}  // namespace muster::cli
