#include "agent/state.h"

#include <filesystem>
#include <nlohmann/json.hpp>

#include "common/fsutil.h"
#include "common/json_limits.h"

namespace muster {

using nlohmann::json;

namespace {

json RecordToJson(const DeployRecord& r) {
  return {{"manifest", r.signed_manifest.manifest},
          {"signer", r.signed_manifest.signer},
          {"signature", r.signed_manifest.signature},
          {"vars", r.vars},
          {"phase", ToString(r.phase)},
          {"detail", r.detail},
          {"kind", ToString(r.kind)},
          {"previousToplevel", r.previous_toplevel},
          {"realised", r.realised},
          {"windowPassed", r.window_passed},
          {"varsDone", r.vars_done},
          {"varsStarted", r.vars_started},
          {"varsChanged", r.vars_changed},
          {"profileChanged", r.profile_changed},
          {"activationStarted", r.activation_started},
          {"rollbackReason", r.rollback_reason},
          {"receivedAt", r.received_at},
          {"activatedAt", r.activated_at},
          {"confirmDeadline", r.confirm_deadline},
          {"finishedAt", r.finished_at},
          {"closureBytes", r.closure_bytes},
          {"rebootRequired", r.reboot_required},
          {"activatedBootId", r.activated_boot_id}};
}

Result<DeployRecord> RecordFromJson(const json& c) {
  DeployRecord r;
  r.signed_manifest = {c.at("manifest").get<std::string>(), c.at("signer").get<std::string>(),
                       c.at("signature").get<std::string>()};
  auto m = ParseManifest(r.signed_manifest.manifest);
  if (!m) return Err("agent state: " + m.message());
  r.manifest = *m;
  r.vars = c.at("vars").get<std::string>();
  auto ph = ParsePhase(c.at("phase").get<std::string>());
  if (!ph) return Err("agent state: unknown phase");
  r.phase = *ph;
  r.detail = c.value("detail", std::string());
  auto k = ParseKind(c.value("kind", std::string("profile")));
  r.kind = k ? *k : Kind::kProfile;
  r.previous_toplevel = c.value("previousToplevel", std::string());
  r.realised = c.value("realised", false);
  r.window_passed = c.value("windowPassed", false);
  r.vars_done = c.value("varsDone", false);
  r.vars_started = c.value("varsStarted", false);
  r.vars_changed = c.value("varsChanged", false);
  r.profile_changed = c.value("profileChanged", false);
  r.activation_started = c.value("activationStarted", false);
  r.rollback_reason = c.value("rollbackReason", std::string());
  r.received_at = c.value("receivedAt", std::int64_t{0});
  r.activated_at = c.value("activatedAt", std::int64_t{0});
  r.confirm_deadline = c.value("confirmDeadline", std::int64_t{0});
  r.finished_at = c.value("finishedAt", std::int64_t{0});
  r.closure_bytes = c.value("closureBytes", std::int64_t{0});
  r.reboot_required = c.value("rebootRequired", false);
  r.activated_boot_id = c.value("activatedBootId", std::string());
  return r;
}

}  // namespace

std::string EncodeAgentState(const AgentState& s) {
  json j = {{"format", 1},
            {"lastApplied", s.last_applied},
            {"lastCreatedAt", s.last_created_at},
            {"lastRefused", s.last_refused},
            {"lastRefusedReason", s.last_refused_reason}};
  if (s.current) j["current"] = RecordToJson(*s.current);
  if (s.pending) j["pending"] = RecordToJson(*s.pending);
  return DumpJson(j, 2) + "\n";  // never throws, whatever a detail holds
}

Result<AgentState> DecodeAgentState(std::string_view text) {
  auto parsed = ParseJsonBounded(text, 32u << 20, 8);
  if (!parsed) return Err("agent state: " + parsed.message());
  try {
    const json& j = *parsed;
    if (j.at("format").get<int>() != 1) return Err("agent state has an unknown format");
    AgentState s;
    s.last_applied = j.at("lastApplied").get<std::int64_t>();
    s.last_created_at = j.value("lastCreatedAt", std::int64_t{0});  // older agents: absent
    s.last_refused = j.value("lastRefused", std::int64_t{0});
    s.last_refused_reason = j.value("lastRefusedReason", std::string());
    for (const char* which : {"current", "pending"}) {
      if (!j.contains(which) || j.at(which).is_null()) continue;
      auto r = RecordFromJson(j.at(which));
      if (!r) return r.error();
      (std::string(which) == "current" ? s.current : s.pending) = std::move(*r);
    }
    return s;
  } catch (const std::exception& e) {
    return Err(std::string("agent state is corrupt: ") + e.what());
  }
}

Result<AgentState> LoadAgentState(const std::string& path) {
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) return AgentState{};
  auto text = ReadFile(path, 32u << 20);
  if (!text) return text.error();
  auto s = DecodeAgentState(*text);
  if (!s) return Err(path + ": " + s.message());
  return s;
}

Status SaveAgentState(const AgentState& s, const std::string& path) {
  return WriteFileAtomic(path, EncodeAgentState(s), 0600);
}

}  // namespace muster
