// Rollout scheduling: which machines are released, when a rollout halts.
#include "controller/rollout.h"

#include <gtest/gtest.h>

#include <set>

namespace muster {
namespace {

RolloutRecord Policy(int canary, int max_parallel, int max_failures, std::string state = "running") {
  RolloutRecord r;
  r.id = "r1";
  r.canary = canary;
  r.max_parallel = max_parallel;
  r.max_failures = max_failures;
  r.state = std::move(state);
  return r;
}

// items described as "stage:state" strings, e.g. "0:pending", "1:released".
std::vector<RolloutItemRecord> Items(const std::vector<std::string>& spec) {
  std::vector<RolloutItemRecord> out;
  int pos = 0;
  for (const auto& s : spec) {
    RolloutItemRecord it;
    it.rollout = "r1";
    it.position = pos;
    it.machine = "m" + std::to_string(pos);
    it.generation = 1;
    it.stage = s[0] - '0';
    it.state = s.substr(2);
    out.push_back(it);
    ++pos;
  }
  return out;
}

struct Case {
  const char* name;
  RolloutRecord policy;
  std::vector<std::string> items;
  std::set<std::string> offline;
  std::vector<int> release;
  std::string state;
};

TEST(RolloutSchedule, Table) {
  const std::vector<Case> cases = {
      {"canary first", Policy(1, 0, 0), {"0:pending", "1:pending", "1:pending"}, {}, {0}, "running"},
      {"waves wait for canaries", Policy(1, 0, 0), {"0:released", "1:pending"}, {}, {}, "running"},
      {"after canaries, everything (no limit)", Policy(1, 0, 0),
       {"0:succeeded", "1:pending", "1:pending"}, {}, {1, 2}, "running"},
      {"max parallel counts in-flight machines", Policy(0, 2, 0),
       {"1:released", "1:pending", "1:pending", "1:pending"}, {}, {1}, "running"},
      {"offline machines stay pending", Policy(0, 0, 0), {"1:pending", "1:pending"}, {"m0"}, {1},
       "running"},
      {"failure over the limit halts", Policy(1, 0, 0), {"0:failed", "1:pending"}, {}, {}, "halted"},
      {"failures within the limit continue", Policy(1, 0, 1), {"0:failed", "1:pending"}, {}, {1},
       "running"},
      {"paused releases nothing", Policy(0, 0, 0, "paused"), {"1:pending"}, {}, {}, "paused"},
      {"all done succeeds", Policy(0, 0, 1), {"1:succeeded", "1:failed", "1:superseded"}, {}, {},
       "succeeded"},
      {"aborted is left alone", Policy(0, 0, 0, "aborted"), {"1:pending"}, {}, {}, "aborted"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    auto items = Items(c.items);
    auto res = Schedule(c.policy, items, [&](const std::string& m) { return !c.offline.count(m); });
    EXPECT_EQ(res.release, c.release);
    EXPECT_EQ(res.state, c.state) << res.detail;
  }
}

TEST(RolloutSchedule, HaltSaysWhy) {
  auto res = Schedule(Policy(0, 0, 0), Items({"1:failed", "1:pending"}), [](auto&) { return true; });
  EXPECT_EQ(res.state, "halted");
  EXPECT_NE(res.detail.find("more than --max-failures 0"), std::string::npos) << res.detail;
}

TEST(RolloutSchedule, ItemOutcomes) {
  EXPECT_EQ(ItemOutcome("succeeded"), "succeeded");
  EXPECT_EQ(ItemOutcome("unchanged"), "succeeded");
  EXPECT_EQ(ItemOutcome("rolled-back"), "failed");
  EXPECT_EQ(ItemOutcome("refused"), "failed");
  EXPECT_EQ(ItemOutcome("failed"), "failed");
  EXPECT_EQ(ItemOutcome("activating"), "");
}

}  // namespace
}  // namespace muster
