// muster status / history / logs: what machines report. Everything a machine
// sent is passed through Printable() before it reaches the terminal.
#include <iomanip>
#include <iostream>

#include "common/phase.h"
#include "common/utf8.h"
#include "controller/cli/commands.h"

using nlohmann::json;

namespace muster::cli {

int ShowStatus(const Globals& g, const std::string& machine) {
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
    std::string detail = Printable(m.value("detail", ""));
    if (detail.size() > 80) detail = CutUtf8(detail, 77) + "...";
    rows.push_back({Printable(m["name"].get<std::string>()), JoinTags(m["tags"]),
                    m["online"].get<bool>() ? "yes" : "no", Ago(m["lastSeen"].get<std::int64_t>()),
                    std::to_string(m["generation"].get<std::int64_t>()),
                    std::to_string(m["targetGeneration"].get<std::int64_t>()),
                    Printable(m["phase"].get<std::string>()),
                    m["rebootRequired"].get<bool>() ? "yes" : "no", detail.empty() ? "-" : detail});
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
              << gen["publishedBy"].get<std::string>();
    if (std::int64_t signed_at = gen.value("signedAt", std::int64_t{0}); signed_at != 0) {
      std::cout << ", signed " << Timestamp(signed_at);
    }
    std::cout << "\n";
    for (const auto& e : gen["events"]) {
      std::string d = Printable(e.value("detail", ""));
      std::cout << "  " << Timestamp(e["at"].get<std::int64_t>()) << "  " << std::left
                << std::setw(15) << Printable(e["phase"].get<std::string>()) << d << "\n";
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
        std::cout << "[" << Printable(l["stream"].get<std::string>()) << "] "
                  << Printable(l["line"].get<std::string>()) << "\n";
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
}  // namespace muster::cli
