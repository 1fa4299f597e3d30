// muster publish … --preview / muster rollout preview …: signed preview
// requests to each online target, their answers per machine and in sum.
#include <algorithm>
#include <chrono>
#include <iostream>
#include <map>
#include <set>

#include "common/fsutil.h"
#include "controller/cli/commands.h"

using nlohmann::json;

namespace muster::cli {

namespace {

std::string Plural(std::size_t n, const char* one, const char* many) {
  return std::to_string(n) + " " + (n == 1 ? one : many);
}

std::vector<std::string> Strings(const json& j, const char* k) {
  std::vector<std::string> out;
  auto it = j.find(k);
  if (it == j.end() || !it->is_array()) return out;
  for (const auto& v : *it) {
    if (v.is_string()) out.push_back(v.get<std::string>());
  }
  return out;
}

std::string JoinList(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& x : v) s += (s.empty() ? "" : ", ") + Printable(x);
  return s;
}

constexpr const char* kVerbs[] = {"stop", "reload", "restart", "start"};

void PrintMachine(const std::string& machine, const json& r) {
  std::string err = r.value("error", "");
  if (!err.empty()) {
    std::cout << Printable(machine) << ": preview failed: " << Printable(err) << "\n";
    return;
  }
  std::cout << Printable(machine) << ": download "
            << HumanSize(r.value("downloadBytes", std::int64_t{0})) << " ("
            << r.value("fetchPaths", 0) << " paths, "
            << HumanSize(r.value("unpackedBytes", std::int64_t{0})) << " unpacked); store paths +"
            << r.value("addedCount", 0) << " -" << r.value("removedCount", 0)
            << (r.value("rebootRequired", false) ? "; reboot needed" : "") << "\n";
  for (const auto& v : r.value("versions", json::array())) {
    std::string name = Printable(v.value("name", "")), before = Printable(v.value("before", "")),
                after = Printable(v.value("after", ""));
    if (before.empty()) {
      std::cout << "  + " << name << " " << after << "\n";
    } else if (after.empty()) {
      std::cout << "  - " << name << " " << before << "\n";
    } else {
      std::cout << "  " << name << " " << before << " -> " << after << "\n";
    }
  }
  const json& units = r.contains("units") ? r["units"] : json::object();
  for (const char* verb : kVerbs) {
    auto list = Strings(units, verb);
    if (!list.empty()) std::cout << "  would " << verb << ": " << JoinList(list) << "\n";
  }
}

}  // namespace

int RunPreview(Connection& c, const json& items, int timeout_s, bool json_out) {
  auto sub = c.Call("subscribe", json::object());
  if (!sub) return Die(sub.message(), kExitFailed);
  auto res = c.Call("preview", {{"items", items}});
  if (!res) return Die(res.message(), kExitFailed);
  const std::string id = res->value("id", "");
  std::set<std::string> waiting;
  for (const auto& m : (*res)["sent"]) waiting.insert(m.get<std::string>());
  std::vector<std::string> offline;
  for (const auto& m : (*res)["offline"]) offline.push_back(m.get<std::string>());
  if (!json_out) {
    std::cerr << "preview " << id << ": asked " << Plural(waiting.size(), "machine", "machines")
              << (offline.empty() ? "" : ", " + std::to_string(offline.size()) + " offline")
              << "\n";
  }
  std::map<std::string, json> reports;
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(timeout_s);
  while (!waiting.empty()) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) break;
    auto ev = c.NextEvent(std::min(left, std::chrono::milliseconds(1000)));
    if (!ev) return Die(ev.message(), kExitConnect);
    if (!*ev || (*ev)->topic != "preview") continue;
    const json& d = (*ev)->data;
    if (d.value("id", "") != id) continue;
    std::string machine = d.value("machine", "");
    if (!waiting.erase(machine)) continue;
    reports[machine] = d;
    if (!json_out) PrintMachine(machine, d);
  }

  // Across the rollout: how many machines do what to each unit.
  std::map<std::string, std::map<std::string, int>> by_verb;  // verb → unit → machines
  int reboots = 0, failed = 0;
  std::int64_t download = 0;
  for (const auto& [machine, r] : reports) {
    if (!r.value("error", "").empty()) {
      ++failed;
      continue;
    }
    download += r.value("downloadBytes", std::int64_t{0});
    if (r.value("rebootRequired", false)) ++reboots;
    const json& units = r.contains("units") ? r["units"] : json::object();
    for (const char* verb : kVerbs) {
      for (const auto& u : Strings(units, verb)) ++by_verb[verb][u];
    }
  }
  std::vector<std::string> missing(waiting.begin(), waiting.end());
  if (json_out) {
    json machines = json::array();
    for (const auto& [m, r] : reports) machines.push_back(r);
    json units = json::object();
    for (const auto& [verb, counts] : by_verb) {
      for (const auto& [unit, n] : counts) units[verb][unit] = n;
    }
    std::cout << json{{"id", id},
                      {"machines", machines},
                      {"offline", offline},
                      {"noAnswer", missing},
                      {"summary",
                       {{"previewed", reports.size() - static_cast<std::size_t>(failed)},
                        {"failed", failed},
                        {"rebootRequired", reboots},
                        {"downloadBytes", download},
                        {"units", units}}}}
                     .dump()
              << "\n";
  } else {
    std::cout << "summary: "
              << Plural(reports.size() - static_cast<std::size_t>(failed), "machine", "machines")
              << " previewed, download " << HumanSize(download) << " in all";
    if (failed) std::cout << ", " << failed << " failed";
    std::cout << "\n";
    for (const auto& [verb, counts] : by_verb) {
      std::vector<std::pair<int, std::string>> order;
      for (const auto& [unit, n] : counts) order.emplace_back(-n, unit);
      std::sort(order.begin(), order.end());
      for (const auto& [neg, unit] : order) {
        std::cout << "  " << Plural(static_cast<std::size_t>(-neg), "machine", "machines")
                  << " will " << verb << " " << Printable(unit) << "\n";
      }
    }
    if (reboots)
      std::cout << "  " << Plural(static_cast<std::size_t>(reboots), "machine", "machines")
                << " will need a reboot\n";
    for (const auto& m : offline) std::cout << "  " << Printable(m) << ": offline, not previewed\n";
    for (const auto& m : missing)
      std::cout << "  " << Printable(m) << ": no answer within " << timeout_s << " s\n";
  }
  return failed || !missing.empty() ? kExitFailed : 0;
}

}  // namespace muster::cli
