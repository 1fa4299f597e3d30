#include "common/phase.h"

#include <array>
#include <utility>

namespace muster {

namespace {
constexpr std::array<std::pair<Phase, std::string_view>, 14> kNames{{
    {Phase::kIdle, "idle"},
    {Phase::kReceived, "received"},
    {Phase::kVerified, "verified"},
    {Phase::kRefused, "refused"},
    {Phase::kRealising, "realising"},
    {Phase::kStaged, "staged"},
    {Phase::kVarsInstalled, "vars-installed"},
    {Phase::kProfileSet, "profile-set"},
    {Phase::kActivating, "activating"},
    {Phase::kConfirming, "confirming"},
    {Phase::kSucceeded, "succeeded"},
    {Phase::kRolledBack, "rolled-back"},
    {Phase::kFailed, "failed"},
    {Phase::kUnchanged, "unchanged"},
}};
}  // namespace

std::string_view ToString(Phase p) {
  for (const auto& [ph, name] : kNames) {
    if (ph == p) return name;
  }
  return "idle";
}

std::optional<Phase> ParsePhase(std::string_view s) {
  for (const auto& [ph, name] : kNames) {
    if (name == s) return ph;
  }
  return std::nullopt;
}

bool IsTerminal(Phase p) {
  return p == Phase::kSucceeded || p == Phase::kRolledBack || p == Phase::kFailed ||
         p == Phase::kUnchanged || p == Phase::kRefused;
}

}  // namespace muster
