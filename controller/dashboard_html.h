// The dashboard's pages: server-rendered HTML from the store, plus the
// embedded static assets (one stylesheet, one script, an icon).
//
// Every string that reaches a page passes HtmlEscape: machine names, tags,
// facts, details and log lines come from agents or operators and are
// untrusted. Pages carry no inline script or style, so the Content-Security-
// Policy the server sends ("script-src 'self'") holds even if escaping were
// ever missed. Pure functions of the store's contents (and the online set):
// thread-safe as far as Fleet and RolloutManager are.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "controller/fleet.h"
#include "controller/rollout.h"

namespace muster {

// &, <, >, " and ' replaced by entities; the result is safe in element text
// and in quoted attribute values.
std::string HtmlEscape(std::string_view text);

// A unix-ms time as "2026-12-02 01:02:03Z"; "never" for 0.
std::string DashboardTime(std::int64_t unix_ms);

// "/" — every machine: tags, online / last seen, current and target
// generation, phase, reboot needed.
std::string RenderFleetPage(Fleet& fleet);
// "/machine/NAME" — facts, the generation history with every event, and the
// newest generation's log; nullopt when no such machine exists.
std::optional<std::string> RenderMachinePage(Fleet& fleet, const std::string& name);
// "/rollouts" — the newest rollouts with their counts.
std::string RenderRolloutsPage(Fleet& fleet);
// "/rollout/ID" — one rollout, its machines grouped by stage; nullopt when
// unknown.
std::optional<std::string> RenderRolloutPage(Fleet& fleet, RolloutManager* rollouts,
                                             const std::string& id);
// A page that only says something (errors, 401).
std::string RenderMessagePage(const std::string& title, const std::string& text);

// The embedded assets, by path ("/static/app.js", …); nullptr when unknown.
struct DashboardAsset {
  const char* content_type;
  std::string_view body;
};
const DashboardAsset* FindDashboardAsset(std::string_view path);

}  // namespace muster
