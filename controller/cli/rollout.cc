// muster rollout …: live view and control of staged rollouts.
#include <unistd.h>

#include <chrono>
#include <iostream>
#include <map>
#include <set>

#include "controller/cli/commands.h"

using nlohmann::json;

namespace muster::cli {

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
        std::cout << "rollout " << id << " " << state << ": " << Printable(d.value("detail", ""))
                  << "\n";
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
                   Printable(ph) +
                   (e.data.value("detail", "").empty()
                        ? ""
                        : "  " + Printable(e.data.value("detail", ""))));
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
                      Printable(r.value("detail", ""))});
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
            << Printable((*res).value("detail", "")) << "\n";
  std::vector<std::vector<std::string>> rows = {
      {"MACHINE", "GEN", "STAGE", "STATE", "ONLINE", "DETAIL"}};
  for (const auto& it : (*res)["items"]) {
    rows.push_back({it["machine"].get<std::string>(),
                    std::to_string(it["generation"].get<std::int64_t>()),
                    it["stage"].get<std::string>(), it["state"].get<std::string>(),
                    it["online"].get<bool>() ? "yes" : "no", Printable(it.value("detail", ""))});
  }
  PrintTable(rows);
  return 0;
}

}  // namespace muster::cli
