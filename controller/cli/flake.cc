#include "controller/cli/flake.h"

#include <cstdlib>
#include <mutex>
#include <nlohmann/json.hpp>
#include <thread>

#include "common/process.h"

namespace muster {

using nlohmann::json;

std::map<std::string, std::string> NixEnv() {
  std::string cfg;
  if (const char* c = std::getenv("NIX_CONFIG")) cfg = c;
  if (cfg.find("experimental-features") == std::string::npos) {
    cfg += (cfg.empty() ? "" : "\n") + std::string("experimental-features = nix-command flakes");
  } else if (cfg.find("flakes") == std::string::npos) {
    // Keep the user's settings and add flakes on a later line (last one wins).
    cfg += "\nextra-experimental-features = nix-command flakes";
  }
  return {{"NIX_CONFIG", cfg}};
}

namespace {
RunResult Nix(const std::vector<std::string>& args,
              const std::function<void(const std::string&)>& on_line,
              std::chrono::milliseconds timeout = std::chrono::hours(4)) {
  std::string nix = FindProgram("nix");
  RunOptions o;
  if (nix.empty()) {
    RunResult r;
    r.start_error = "nix not found in PATH";
    return r;
  }
  o.argv = {nix};
  o.argv.insert(o.argv.end(), args.begin(), args.end());
  o.env = NixEnv();
  o.timeout = timeout;
  o.max_output = 16u << 20;
  if (on_line) {
    o.on_line = [&](bool is_err, const std::string& line) {
      if (is_err) on_line(line);  // stdout carries the JSON answer
    };
  }
  SystemProcessRunner runner;
  return runner.Run(o);
}
}  // namespace

Result<std::string> SystemAttribute(const std::string& flake, const std::string& machine) {
  for (const auto& [set, suffix] :
       {std::pair<std::string, std::string>{"nixosConfigurations", ".config.system.build.toplevel"},
        {"darwinConfigurations", ".system"}}) {
    auto r = Nix({"eval", "--json", flake + "#" + set, "--apply", "builtins.attrNames"}, nullptr,
                 std::chrono::minutes(10));
    if (!r.ok()) continue;
    json names = json::parse(r.out, nullptr, false);
    if (!names.is_array()) continue;
    for (const auto& n : names) {
      if (n.is_string() && n.get<std::string>() == machine) {
        return set + ".\"" + machine + "\"" + suffix;
      }
    }
  }
  return Err("flake " + flake + " has neither nixosConfigurations." + machine +
             " nor darwinConfigurations." + machine);
}

Result<std::string> CachePublicKey(const std::string& secret_key_file) {
  std::string nix = FindProgram("nix");
  if (nix.empty()) return Err("nix not found in PATH");
  RunOptions o;
  o.argv = {nix, "key", "convert-secret-to-public"};
  o.env = NixEnv();
  o.timeout = std::chrono::seconds(30);
  auto text = [&]() -> Result<std::string> {
    FILE* f = std::fopen(secret_key_file.c_str(), "r");
    if (!f) return Err("cannot read cache key " + secret_key_file);
    std::string s;
    char buf[512];
    size_t n;
    while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) s.append(buf, n);
    std::fclose(f);
    return s;
  }();
  if (!text) return text.error();
  o.input = *text;
  SystemProcessRunner runner;
  auto r = runner.Run(o);
  if (!r.ok()) return Err("nix key convert-secret-to-public " + r.Describe());
  std::string pub = r.out;
  while (!pub.empty() && (pub.back() == '\n' || pub.back() == ' ')) pub.pop_back();
  return pub;
}

Result<std::map<std::string, std::string>> BuildFromFlake(
    const FlakeBuildOptions& o, const std::vector<std::string>& machines) {
  std::map<std::string, std::string> out;
  std::mutex mu;
  std::string first_error;
  std::size_t next = 0;
  auto say = [&](const std::string& m, const std::string& line) {
    std::lock_guard lock(mu);
    if (o.on_line) o.on_line(m, line);
  };
  auto worker = [&] {
    for (;;) {
      std::string m;
      {
        std::lock_guard lock(mu);
        if (next >= machines.size() || !first_error.empty()) return;
        m = machines[next++];
      }
      auto fail = [&](const std::string& e) {
        std::lock_guard lock(mu);
        if (first_error.empty()) first_error = m + ": " + e;
      };
      auto attr = SystemAttribute(o.flake, m);
      if (!attr) return fail(attr.message());
      say(m, "building " + o.flake + "#" + *attr);
      auto r = Nix({"build", "--no-link", "--json", "-L", o.flake + "#" + *attr},
                   [&](const std::string& line) { say(m, line); });
      if (!r.ok()) return fail("nix build " + r.Describe());
      json res = json::parse(r.out, nullptr, false);
      std::string path;
      if (res.is_array() && !res.empty() && res[0].contains("outputs")) {
        path = res[0]["outputs"].value("out", "");
      }
      if (path.empty()) return fail("nix build did not report an output path");
      say(m, "built " + path);
      if (!o.cache_key.empty()) {
        auto s = Nix({"store", "sign", "--key-file", o.cache_key, "--recursive", path},
                     [&](const std::string& line) { say(m, line); });
        if (!s.ok()) return fail("nix store sign " + s.Describe());
      }
      if (!o.cache.empty()) {
        say(m, "copying to " + o.cache);
        auto c =
            Nix({"copy", "--to", o.cache, path}, [&](const std::string& line) { say(m, line); });
        if (!c.ok()) return fail("nix copy --to " + o.cache + " " + c.Describe());
      }
      std::lock_guard lock(mu);
      out[m] = path;
    }
  };
  std::vector<std::thread> threads;
  int n = std::max(1, std::min<int>(o.jobs, static_cast<int>(machines.size())));
  for (int i = 0; i < n; ++i) threads.emplace_back(worker);
  for (auto& t : threads) t.join();
  if (!first_error.empty()) return Err(first_error);
  return out;
}

}  // namespace muster
