// RolloutManager over a real Fleet and SQLite store: waves are released as a
// batch of final reports arrives, stored before anything is pushed, and what
// was released survives a restart.
#include <gtest/gtest.h>
#include <sqlite3.h>

#include <map>

#include "controller/rollout.h"
#include "controller/test_fakes.h"

namespace muster {
namespace {

using testing::FakeChannel;

class RolloutManagerTest : public testing::FleetTest {
 protected:
  static constexpr int kMachines = 6;

  void SetUp() override {
    FleetTest::SetUp();
    for (int i = 0; i < kMachines; ++i) {
      std::string name = "m" + std::to_string(i);
      keys_.push_back(SecretKey::Generate());
      ASSERT_TRUE(fleet_->AddMachine(name, keys_.back().public_key().ToText(), {"all"}).ok());
      channels_[name] = std::make_shared<FakeChannel>();
      ASSERT_TRUE(fleet_->AgentHello(name, MakeHello(0, 0, "idle", name), channels_[name]).ok());
    }
    rollouts_ = std::make_unique<RolloutManager>(*fleet_, *store_);
    fleet_->SetObserver(rollouts_.get());
  }

  RolloutSpec Spec(int max_parallel) {
    RolloutSpec spec;
    spec.created_by = "alice";
    spec.max_parallel = max_parallel;
    for (int i = 0; i < kMachines; ++i) {
      GenerationRecord g;
      g.machine = "m" + std::to_string(i);
      g.generation = 1;
      g.manifest = MakeDeploy(1, g.machine, nullptr, false).manifest;
      g.toplevel = kToplevel;
      g.action = "switch";
      g.published_by = "alice";
      g.created_at = now_;
      spec.generations.push_back(g);
    }
    return spec;
  }

  // Machines that were sent a deploy since the last call.
  std::vector<std::string> Deployed() {
    std::vector<std::string> out;
    for (auto& [name, ch] : channels_) {
      std::lock_guard lock(ch->mu);
      for (const auto& t : ch->sent) {
        if (std::holds_alternative<proto::Deploy>(Decoded(t))) out.push_back(name);
      }
      ch->sent.clear();
    }
    return out;
  }

  std::map<std::string, std::string> StoredStates(const std::string& id) {
    std::map<std::string, std::string> out;
    for (const auto& it : store_->ListRolloutItems(id)) out[it.machine] = it.state;
    return out;
  }

  static proto::StatusReport Final(std::uint64_t seq, const std::string& phase) {
    proto::StatusReport r;
    r.seq = seq;
    r.generation = 1;
    r.phase = phase;
    return r;
  }

  std::vector<SecretKey> keys_;
  std::map<std::string, std::shared_ptr<FakeChannel>> channels_;
  std::unique_ptr<RolloutManager> rollouts_;
};

TEST_F(RolloutManagerTest, AWaveOfFinalReportsReleasesTheNextWaveStoredBeforePushed) {
  auto r = rollouts_->Create(Spec(2));
  ASSERT_TRUE(r.ok()) << r.message();
  EXPECT_EQ(Deployed(), (std::vector<std::string>{"m0", "m1"}));
  auto states = StoredStates(r->id);
  EXPECT_EQ(states["m0"], "released");
  EXPECT_EQ(states["m1"], "released");
  EXPECT_EQ(states["m2"], "pending");
  ASSERT_TRUE(store_->LatestGeneration("m0").has_value());  // marked released in the store
  EXPECT_FALSE(store_->LatestGeneration("m2").has_value());

  // Both final reports in one group commit: one evaluation releases the next two.
  auto acks = fleet_->AgentStatuses({{"m0", Final(1, "succeeded")}, {"m1", Final(1, "failed")}});
  ASSERT_EQ(acks.size(), 2u);
  EXPECT_TRUE(acks[0].ok() && acks[1].ok());
  states = StoredStates(r->id);
  EXPECT_EQ(states["m0"], "succeeded");
  EXPECT_EQ(states["m1"], "failed");
  // One failure is more than --max-failures 0: the rollout halts, nothing more goes out.
  EXPECT_EQ(store_->GetRollout(r->id)->state, "halted");
  EXPECT_TRUE(Deployed().empty());
  EXPECT_EQ(states["m2"], "pending");
}

TEST_F(RolloutManagerTest, ReleasesInWavesToTheEndAndSurvivesARestart) {
  RolloutSpec spec = Spec(2);
  auto r = rollouts_->Create(spec);
  ASSERT_TRUE(r.ok()) << r.message();
  EXPECT_EQ(Deployed().size(), 2u);
  ASSERT_TRUE(fleet_->AgentStatuses({{"m0", Final(1, "succeeded")}, {"m1", Final(1, "succeeded")}})
                  .size() == 2);
  EXPECT_EQ(Deployed(), (std::vector<std::string>{"m2", "m3"}));

  // A new manager (a restarted controller) picks the rollout up from the store.
  fleet_->SetObserver(nullptr);
  rollouts_ = std::make_unique<RolloutManager>(*fleet_, *store_);
  fleet_->SetObserver(rollouts_.get());
  rollouts_->Resume();
  EXPECT_TRUE(Deployed().empty()) << "m2 and m3 are in flight; nothing is released twice";
  auto states = StoredStates(r->id);
  EXPECT_EQ(states["m2"], "released");
  EXPECT_EQ(states["m3"], "released");
  EXPECT_EQ(states["m4"], "pending");

  fleet_->AgentStatuses({{"m2", Final(2, "succeeded")}, {"m3", Final(2, "succeeded")}});
  EXPECT_EQ(Deployed(), (std::vector<std::string>{"m4", "m5"}));
  fleet_->AgentStatuses({{"m4", Final(3, "succeeded")}, {"m5", Final(3, "succeeded")}});
  EXPECT_EQ(store_->GetRollout(r->id)->state, "succeeded");
  for (const auto& [m, st] : StoredStates(r->id)) EXPECT_EQ(st, "succeeded") << m;
  for (int i = 0; i < kMachines; ++i) {
    auto g = store_->LatestGeneration("m" + std::to_string(i));
    ASSERT_TRUE(g.has_value());
    EXPECT_EQ(g->generation, 1);
  }
}

TEST_F(RolloutManagerTest, IntermediatePhasesChangeNothing) {
  auto r = rollouts_->Create(Spec(1));
  ASSERT_TRUE(r.ok()) << r.message();
  EXPECT_EQ(Deployed(), (std::vector<std::string>{"m0"}));
  fleet_->AgentStatuses({{"m0", Final(1, "received")}, {"m0", Final(2, "activating")}});
  EXPECT_TRUE(Deployed().empty());
  EXPECT_EQ(StoredStates(r->id)["m0"], "released");
}

// A wave's final reports and the release they enable are one transaction:
// when it fails (here a trigger stands in for a full disk), neither is stored
// and nothing is pushed; the finals are kept and written with the next step.
TEST_F(RolloutManagerTest, FinalsAndTheReleaseTheyEnableAreStoredTogetherOrNotAtAll) {
  auto r = rollouts_->Create(Spec(2));
  ASSERT_TRUE(r.ok()) << r.message();
  EXPECT_EQ(Deployed(), (std::vector<std::string>{"m0", "m1"}));

  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open((dir_ / "muster.db").string().c_str(), &db), SQLITE_OK);
  auto exec = [&](const char* sql) {
    char* err = nullptr;
    int rc = sqlite3_exec(db, sql, nullptr, nullptr, &err);
    std::string e = err ? err : "";
    sqlite3_free(err);
    return rc == SQLITE_OK ? std::string() : e;
  };
  ASSERT_EQ(exec("CREATE TRIGGER full_disk BEFORE UPDATE OF released ON generations "
                 "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"),
            "");

  auto acks = fleet_->AgentStatuses({{"m0", Final(1, "succeeded")}, {"m1", Final(1, "succeeded")}});
  ASSERT_EQ(acks.size(), 2u);
  EXPECT_TRUE(acks[0].ok() && acks[1].ok()) << "the reports themselves are stored";
  EXPECT_TRUE(Deployed().empty()) << "nothing is pushed that the store does not have";
  auto states = StoredStates(r->id);
  EXPECT_EQ(states["m0"], "released") << "the finals were rolled back with the release";
  EXPECT_EQ(states["m2"], "pending");
  EXPECT_FALSE(store_->LatestGeneration("m2").has_value());

  ASSERT_EQ(exec("DROP TRIGGER full_disk"), "");
  sqlite3_close(db);
  // The next step (here m2 connecting again) writes the kept finals with the
  // release they enable.
  ASSERT_TRUE(fleet_->AgentHello("m2", MakeHello(0, 0, "idle", "m2"), channels_["m2"]).ok());
  EXPECT_EQ(Deployed(), (std::vector<std::string>{"m2", "m3"}));
  states = StoredStates(r->id);
  EXPECT_EQ(states["m0"], "succeeded");
  EXPECT_EQ(states["m1"], "succeeded");
  EXPECT_EQ(states["m2"], "released");
  EXPECT_EQ(states["m3"], "released");
  ASSERT_TRUE(store_->LatestGeneration("m3").has_value());
}

}  // namespace
}  // namespace muster
