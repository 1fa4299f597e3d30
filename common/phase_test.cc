#include "common/phase.h"

#include <gtest/gtest.h>

#include <set>
#include <string>

namespace muster {
namespace {

TEST(Phase, EveryNameRoundTrips) {
  struct Case {
    Phase phase;
    const char* name;
    bool terminal;
  } cases[] = {
      {Phase::kIdle, "idle", false},
      {Phase::kReceived, "received", false},
      {Phase::kVerified, "verified", false},
      {Phase::kRefused, "refused", true},
      {Phase::kRealising, "realising", false},
      {Phase::kStaged, "staged", false},
      {Phase::kVarsInstalled, "vars-installed", false},
      {Phase::kProfileSet, "profile-set", false},
      {Phase::kActivating, "activating", false},
      {Phase::kConfirming, "confirming", false},
      {Phase::kSucceeded, "succeeded", true},
      {Phase::kRolledBack, "rolled-back", true},
      {Phase::kFailed, "failed", true},
      {Phase::kUnchanged, "unchanged", true},
  };
  std::set<std::string> names;
  for (const auto& c : cases) {
    EXPECT_EQ(ToString(c.phase), c.name);
    EXPECT_EQ(ParsePhase(c.name), c.phase) << c.name;
    EXPECT_EQ(IsTerminal(c.phase), c.terminal) << c.name;
    names.insert(c.name);
  }
  EXPECT_EQ(names.size(), 14u) << "names are distinct";
  EXPECT_EQ(static_cast<int>(Phase::kUnchanged) + 1, 14) << "a new phase needs a row here";
}

TEST(Phase, UnknownNamesAreRejected) {
  for (const char* s : {"", "Idle", "SUCCEEDED", "rolled_back", "vars installed", "succeeded "}) {
    EXPECT_FALSE(ParsePhase(s).has_value()) << "'" << s << "'";
  }
}

}  // namespace
}  // namespace muster
