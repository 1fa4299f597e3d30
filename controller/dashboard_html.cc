#include "controller/dashboard_html.h"

#include <algorithm>
#include <ctime>
#include <deque>
#include <map>

#include "common/utf8.h"

namespace muster {

namespace {

constexpr int kHistoryGenerations = 20;
constexpr int kEventsPerGeneration = 200;
constexpr std::size_t kLogLinesShown = 500;
constexpr int kRolloutsShown = 50;

// Escaped, after invalid UTF-8 is replaced (the store holds valid UTF-8
// already; this keeps a page well-formed whatever reaches it).
std::string E(std::string_view s) { return HtmlEscape(s); }

std::string Head(const std::string& title, const std::string& page, const std::string& data_attrs,
                 bool live = true) {
  return "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
         "<meta name=\"viewport\" content=\"width=device-width\">"
         "<title>" +
         E(title) +
         " · muster</title>"
         "<link rel=\"icon\" href=\"/static/icon.svg\" type=\"image/svg+xml\">"
         "<link rel=\"stylesheet\" href=\"/static/app.css\">" +
         std::string(live ? "<script src=\"/static/app.js\" defer></script>" : "") +
         "</head>"
         "<body data-page=\"" +
         page + "\"" + data_attrs +
         "><header><span class=\"brand\">muster</span>"
         "<a href=\"/\">Fleet</a><a href=\"/rollouts\">Rollouts</a>" +
         std::string(live ? "<span id=\"live\" class=\"live\">connecting</span>" : "") +
         "</header><main>";
}

constexpr const char* kFoot = "</main></body></html>\n";

std::string PhaseClass(const std::string& phase) {
  // Phases and states are the controller's own words, but a stored phase
  // came from an agent: keep the class to a safe alphabet.
  std::string c;
  for (char ch : phase) {
    if ((ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') || ch == '-') c += ch;
  }
  return c;
}

std::string Tags(const std::vector<std::string>& tags) {
  std::string o;
  for (const auto& t : tags) o += "<span class=\"tag\">" + E(t) + "</span>";
  return o;
}

std::string Td(const std::string& cls, const std::string& text, const std::string& extra = "") {
  return "<td class=\"" + cls + (extra.empty() ? "" : " " + extra) + "\">" + text + "</td>";
}

}  // namespace

std::string HtmlEscape(std::string_view text) {
  std::string in = SanitizeUtf8(text);
  std::string o;
  o.reserve(in.size() + in.size() / 8);
  for (char c : in) {
    switch (c) {
      case '&':
        o += "&amp;";
        break;
      case '<':
        o += "&lt;";
        break;
      case '>':
        o += "&gt;";
        break;
      case '"':
        o += "&quot;";
        break;
      case '\'':
        o += "&#39;";
        break;
      default:
        o += c;
    }
  }
  return o;
}

std::string DashboardTime(std::int64_t unix_ms) {
  if (unix_ms <= 0) return "never";
  std::time_t t = static_cast<std::time_t>(unix_ms / 1000);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M:%SZ", &tm);
  return buf;
}

std::string RenderFleetPage(Fleet& fleet) {
  auto machines = fleet.store().ListMachines();
  std::sort(machines.begin(), machines.end(),
            [](const MachineRecord& a, const MachineRecord& b) { return a.name < b.name; });
  std::size_t online = 0, reboot = 0;
  std::string rows;
  for (const auto& m : machines) {
    bool on = fleet.IsOnline(m.name);
    online += on;
    reboot += m.reboot_required;
    auto latest = fleet.store().LatestGeneration(m.name);
    rows += "<tr class=\"machine\" data-machine=\"" + E(m.name) + "\">";
    rows += "<td><a href=\"/machine/" + E(m.name) + "\">" + E(m.name) + "</a>" +
            (m.revoked ? " <span class=\"reboot-yes\">revoked</span>" : "") + "</td>";
    rows += "<td>" + Tags(m.tags) + "</td>";
    rows += Td("c-online", on ? "online" : "offline", on ? "online-yes" : "muted");
    rows += Td("c-seen", E(DashboardTime(m.last_seen)), "muted");
    rows += Td("c-generation", std::to_string(m.generation), "num");
    rows += Td("c-target", std::to_string(latest ? latest->generation : 0), "num");
    rows += Td("c-phase", E(m.phase), "phase-" + PhaseClass(m.phase));
    rows += Td("c-detail", E(m.detail));
    rows += Td("c-reboot", m.reboot_required ? "yes" : "no", m.reboot_required ? "reboot-yes" : "");
    rows += "</tr>";
  }
  std::string o = Head("Fleet", "fleet", "");
  o += "<h1>Fleet</h1><p class=\"muted\" id=\"summary\">" + std::to_string(machines.size()) +
       " machines, " + std::to_string(online) + " online, " + std::to_string(reboot) +
       " need a reboot</p>";
  o += "<table id=\"fleet\"><thead><tr><th>Machine</th><th>Tags</th><th>Online</th>"
       "<th>Last seen</th><th class=\"num\">Generation</th><th class=\"num\">Target</th>"
       "<th>Phase</th><th>Detail</th><th>Reboot</th></tr></thead><tbody>" +
       rows + "</tbody></table>";
  if (machines.empty()) {
    o += "<p class=\"muted\">No machines yet: register one with 'muster machine add'.</p>";
  }
  return o + kFoot;
}

std::optional<std::string> RenderMachinePage(Fleet& fleet, const std::string& name) {
  auto m = fleet.store().GetMachine(name);
  if (!m) return std::nullopt;
  bool on = fleet.IsOnline(m->name);
  auto gens = fleet.store().ListGenerations(m->name, kHistoryGenerations);
  std::string o = Head(m->name, "machine", " data-machine=\"" + E(m->name) + "\"");
  o += "<h1>" + E(m->name) + "</h1>";
  o += "<dl class=\"facts\"><dt>Online</dt><dd id=\"online\" class=\"" +
       std::string(on ? "online-yes" : "muted") + "\">" + (on ? "online" : "offline") + "</dd>";
  o += "<dt>Last seen</dt><dd>" + E(DashboardTime(m->last_seen)) + "</dd>";
  o += "<dt>Phase</dt><dd id=\"phase\" class=\"phase-" + PhaseClass(m->phase) + "\">" +
       E(m->phase) + "</dd>";
  o += "<dt>Generation</dt><dd id=\"generation\">" + std::to_string(m->generation) + "</dd>";
  o += "<dt>System</dt><dd><code>" + E(m->toplevel) + "</code></dd>";
  o += "<dt>Reboot needed</dt><dd>" + std::string(m->reboot_required ? "yes" : "no") + "</dd>";
  o += "<dt>Tags</dt><dd>" + Tags(m->tags) + "</dd>";
  o += "<dt>Key</dt><dd><code>" + E(m->key) + "</code></dd>";
  if (m->facts.is_object()) {
    for (const auto& [k, v] : m->facts.items()) {
      o += "<dt>" + E(k) + "</dt><dd>" + E(v.is_string() ? v.get<std::string>() : v.dump()) +
           "</dd>";
    }
  }
  o += "</dl>";

  // The newest generation's log, its last kLogLinesShown lines.
  std::int64_t log_gen = gens.empty() ? 0 : gens.front().generation;
  std::deque<std::string> lines;
  if (log_gen) {
    std::int64_t after = 0;
    for (;;) {
      auto batch = fleet.store().ReadLogs(m->name, log_gen, after, 1000);
      for (auto& l : batch) {
        lines.push_back("[" + l.stream + "] " + l.line);
        if (lines.size() > kLogLinesShown) lines.pop_front();
      }
      if (batch.size() < 1000) break;
      after = batch.back().id;
    }
  }
  o += "<h2>Log (generation <span id=\"log-generation\">" + std::to_string(log_gen) +
       "</span>)</h2><pre id=\"log\" class=\"log\">";
  for (const auto& l : lines) o += E(l) + "\n";
  o += "</pre>";

  o += "<h2>History</h2><div id=\"generations\">";
  for (const auto& g : gens) {
    o += "<section class=\"gen\" data-generation=\"" + std::to_string(g.generation) + "\">";
    o += "<h3>Generation " + std::to_string(g.generation) + "</h3>";
    o += "<p class=\"muted\">" + E(g.action) + " <code>" + E(g.toplevel) + "</code> published by " +
         E(g.published_by) + " at " + E(DashboardTime(g.created_at)) +
         (g.rollout.empty()
              ? ""
              : " in rollout <a href=\"/rollout/" + E(g.rollout) + "\">" + E(g.rollout) + "</a>") +
         (g.released ? "" : " (held back)") + "</p>";
    o += "<table class=\"events\"><tr><th>Time</th><th>Phase</th><th>Detail</th></tr>";
    // The newest kEventsPerGeneration, oldest first (as the store returns them).
    auto events = fleet.store().ListEvents(m->name, g.generation, kEventsPerGeneration);
    for (const auto& e : events) {
      o += "<tr class=\"event\"><td class=\"muted\">" + E(DashboardTime(e.at)) +
           "</td><td class=\"phase-" + PhaseClass(e.phase) + "\">" + E(e.phase) + "</td><td>" +
           E(e.detail) + "</td></tr>";
    }
    o += "</table></section>";
  }
  o += "</div>";
  return o + kFoot;
}

std::string RenderRolloutsPage(Fleet& fleet) {
  auto list = fleet.store().ListRollouts(kRolloutsShown);
  std::string o = Head("Rollouts", "rollouts", "");
  o += "<h1>Rollouts</h1><table id=\"rollouts\"><thead><tr><th>Rollout</th><th>State</th>"
       "<th>Detail</th><th class=\"num\">Done</th><th class=\"num\">Machines</th><th>By</th>"
       "<th>Created</th></tr></thead><tbody>";
  for (const auto& r : list) {
    auto items = fleet.store().ListRolloutItems(r.id);
    int done = 0;
    for (const auto& it : items) {
      done += it.state == "succeeded" || it.state == "failed" || it.state == "superseded" ||
              it.state == "cancelled";
    }
    o += "<tr class=\"rollout\" data-rollout=\"" + E(r.id) + "\"><td><a href=\"/rollout/" +
         E(r.id) + "\">" + E(r.id) + "</a></td>";
    o += Td("c-state", E(r.state), "state-" + PhaseClass(r.state));
    o += Td("c-detail", E(r.detail));
    o += Td("c-done", std::to_string(done), "num");
    o += Td("c-total", std::to_string(items.size()), "num");
    o += "<td>" + E(r.created_by) + "</td><td class=\"muted\">" + E(DashboardTime(r.created_at)) +
         "</td></tr>";
  }
  o += "</tbody></table>";
  if (list.empty()) o += "<p class=\"muted\">No rollouts yet.</p>";
  return o + kFoot;
}

std::optional<std::string> RenderRolloutPage(Fleet& fleet, RolloutManager* rollouts,
                                             const std::string& id) {
  (void)rollouts;  // the store holds what the manager wrote through
  auto r = fleet.store().GetRollout(id);
  if (!r) return std::nullopt;
  auto items = fleet.store().ListRolloutItems(id);
  std::string o = Head("Rollout " + r->id, "rollout", " data-rollout=\"" + E(r->id) + "\"");
  o += "<h1>Rollout " + E(r->id) + "</h1>";
  o += "<dl class=\"facts\"><dt>State</dt><dd id=\"rollout-state\" class=\"state-" +
       PhaseClass(r->state) + "\">" + E(r->state) + "</dd>";
  o += "<dt>Detail</dt><dd id=\"rollout-detail\">" + E(r->detail) + "</dd>";
  o += "<dt>Created</dt><dd>" + E(DashboardTime(r->created_at)) + " by " + E(r->created_by) +
       "</dd>";
  o += "<dt>Limits</dt><dd>canary " + std::to_string(r->canary) + ", max parallel " +
       (r->max_parallel ? std::to_string(r->max_parallel) : std::string("unlimited")) +
       ", max failures " + std::to_string(r->max_failures) + "</dd></dl>";
  std::map<int, std::vector<const RolloutItemRecord*>> stages;
  for (const auto& it : items) stages[it.stage].push_back(&it);
  for (const auto& [stage, list] : stages) {
    o += "<h2>" + std::string(stage == 0 ? "Canary" : "Stage " + std::to_string(stage)) + "</h2>";
    o += "<table class=\"stage\"><thead><tr><th>Machine</th><th class=\"num\">Generation</th>"
         "<th>State</th><th>Detail</th><th>Updated</th></tr></thead><tbody>";
    for (const auto* it : list) {
      o += "<tr class=\"item\" data-machine=\"" + E(it->machine) + "\"><td><a href=\"/machine/" +
           E(it->machine) + "\">" + E(it->machine) + "</a></td>";
      o += Td("c-generation", std::to_string(it->generation), "num");
      o += Td("c-state", E(it->state), "state-" + PhaseClass(it->state));
      o += Td("c-detail", E(it->detail));
      o += "<td class=\"muted\">" + E(DashboardTime(it->updated_at)) + "</td></tr>";
    }
    o += "</tbody></table>";
  }
  return o + kFoot;
}

std::string RenderMessagePage(const std::string& title, const std::string& text) {
  return Head(title, "message", "", false) + "<h1>" + E(title) + "</h1><p>" + E(text) + "</p>" +
         kFoot;
}

}  // namespace muster
