// The store's batch writes (one transaction for many records): pipelined
// publishes and rollout waves.
#include <gtest/gtest.h>

#include "common/testutil.h"
#include "controller/store.h"

namespace muster {
namespace {

GenerationRecord Gen(const std::string& machine, std::int64_t generation) {
  GenerationRecord g;
  g.machine = machine;
  g.generation = generation;
  g.manifest = {"{}", "ed25519:op", "sig"};
  g.toplevel = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-system";
  g.action = "switch";
  g.published_by = "alice";
  g.created_at = 1000 + generation;
  g.released = true;
  return g;
}

class StoreBatchTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto s = OpenSqliteStore((dir_ / "muster.db").string());
    ASSERT_TRUE(s.ok()) << s.message();
    store_ = std::move(*s);
    for (const char* m : {"m1", "m2"}) {
      MachineRecord r;
      r.name = m;
      r.key = std::string("ed25519:") + m;
      ASSERT_TRUE(store_->AddMachine(r).ok());
    }
  }
  testing::TempDir dir_;
  std::unique_ptr<Store> store_;
};

TEST_F(StoreBatchTest, AddGenerationsRefusesOnlyTheRecordsThatAreNotNewer) {
  auto st = store_->AddGenerations({Gen("m1", 1), Gen("m1", 1), Gen("m2", 5), Gen("m1", 2)});
  ASSERT_EQ(st.size(), 4u);
  EXPECT_TRUE(st[0].ok()) << st[0].message();
  EXPECT_FALSE(st[1].ok());
  EXPECT_NE(st[1].message().find("not newer"), std::string::npos) << st[1].message();
  EXPECT_TRUE(st[2].ok()) << st[2].message();
  EXPECT_TRUE(st[3].ok()) << st[3].message();
  EXPECT_EQ(store_->MaxGeneration("m1"), 2);
  EXPECT_EQ(store_->MaxGeneration("m2"), 5);
  // Nothing is half-written: the stored records are whole.
  auto g = store_->GetGeneration("m1", 2);
  ASSERT_TRUE(g.has_value());
  EXPECT_EQ(g->toplevel, Gen("m1", 2).toplevel);
}

TEST_F(StoreBatchTest, AddGenerationsAllRefusedWritesNothing) {
  ASSERT_TRUE(store_->AddGeneration(Gen("m1", 3)).ok());
  auto st = store_->AddGenerations({Gen("m1", 2), Gen("m1", 3)});
  EXPECT_FALSE(st[0].ok());
  EXPECT_FALSE(st[1].ok());
  EXPECT_EQ(store_->ListGenerations("m1", 10).size(), 1u);
}

TEST_F(StoreBatchTest, ReleaseRolloutItemsMarksGenerationsAndItemsTogether) {
  RolloutRecord r;
  r.id = "r1";
  r.state = "running";
  std::vector<GenerationRecord> gens = {Gen("m1", 1), Gen("m2", 1)};
  for (auto& g : gens) {
    g.released = false;
    g.rollout = "r1";
  }
  std::vector<RolloutItemRecord> items(2);
  for (int i = 0; i < 2; ++i) {
    items[static_cast<std::size_t>(i)].rollout = "r1";
    items[static_cast<std::size_t>(i)].position = i;
    items[static_cast<std::size_t>(i)].machine = gens[static_cast<std::size_t>(i)].machine;
    items[static_cast<std::size_t>(i)].generation = 1;
  }
  ASSERT_TRUE(store_->CreateRollout(r, gens, items).ok());
  EXPECT_FALSE(store_->LatestGeneration("m1").has_value());
  for (auto& it : items) it.state = "released";
  ASSERT_TRUE(store_->ReleaseRolloutItems(items).ok());
  for (const char* m : {"m1", "m2"}) {
    auto g = store_->LatestGeneration(m);
    ASSERT_TRUE(g.has_value()) << m;
    EXPECT_EQ(g->generation, 1);
  }
  for (const auto& it : store_->ListRolloutItems("r1")) EXPECT_EQ(it.state, "released");
  items[0].state = "succeeded";
  items[1].state = "failed";
  ASSERT_TRUE(store_->UpdateRolloutItems(items).ok());
  auto stored = store_->ListRolloutItems("r1");
  ASSERT_EQ(stored.size(), 2u);
  EXPECT_EQ(stored[0].state, "succeeded");
  EXPECT_EQ(stored[1].state, "failed");
}

}  // namespace
}  // namespace muster
