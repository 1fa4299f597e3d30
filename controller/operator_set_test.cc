#include "controller/operator_set.h"

#include "controller/test_fakes.h"

namespace muster {
namespace {

using testing::FleetTest;

std::string Key(char seed) {
  return SecretKey::FromSeed(std::string(32, seed)).value().public_key().ToText();
}

TEST(ParseOperatorSet, AcceptsNamesAndKeys) {
  auto s = ParseOperatorSet(R"({"alice": ")" + Key('a') + R"(", "bob@ci": ")" + Key('b') + "\"}");
  ASSERT_TRUE(s.ok()) << s.message();
  EXPECT_EQ(*s, (OperatorSet{{"alice", Key('a')}, {"bob@ci", Key('b')}}));
  auto empty = ParseOperatorSet("{}");
  ASSERT_TRUE(empty.ok());
  EXPECT_TRUE(empty->empty());
}

TEST(ParseOperatorSet, RefusesBadInputNamingTheEntry) {
  struct Case {
    std::string text, message;
  } cases[] = {
      {"[]", "expected an object"},
      {"{", "operators file"},
      {R"({"": ")" + Key('a') + "\"}", "is not an operator name"},
      {R"({"a b": ")" + Key('a') + "\"}", "'a b' is not an operator name"},
      {R"({")" + std::string(65, 'x') + R"(": ")" + Key('a') + "\"}", "is not an operator name"},
      {R"({"alice": 1})", "the key of 'alice' is not a string"},
      {R"({"alice": "ed25519:short"})", "operator 'alice'"},
      {R"({"\u00ff\u00fe": "x"})", "is not an operator name"},
  };
  for (const auto& c : cases) {
    auto s = ParseOperatorSet(c.text);
    ASSERT_FALSE(s.ok()) << c.text;
    EXPECT_NE(s.message().find(c.message), std::string::npos) << c.text << ": " << s.message();
  }
}

TEST(PlanOperatorSync, AddsRekeysRemovesOnlyWhatItManaged) {
  OperatorSet declared{{"alice", Key('a')}, {"carol", Key('c')}, {"dave", Key('e')}};
  OperatorSet registered{
      {"alice", Key('a')}, {"bob", Key('b')}, {"dave", Key('d')}, {"hand", Key('h')}};
  auto plan = PlanOperatorSync(declared, registered, {"alice", "bob", "dave", "gone"});
  EXPECT_EQ(plan.add, std::vector<std::string>{"carol"});
  EXPECT_EQ(plan.rekey, std::vector<std::string>{"dave"});
  EXPECT_EQ(plan.remove, std::vector<std::string>{"bob"});  // "gone" is not registered
  EXPECT_EQ(plan.kept, std::vector<std::string>{"hand"});
  auto same = PlanOperatorSync(registered, registered, {});
  EXPECT_TRUE(same.add.empty() && same.rekey.empty() && same.remove.empty());
}

class OperatorSyncTest : public FleetTest {
 protected:
  Identity Who(char seed) { return fleet_->Lookup(*ParsePublicKey(Key(seed))); }
};

TEST_F(OperatorSyncTest, RemovedFromTheDeclarationIsNoLongerTrusted) {
  // alice was added by hand (the fixture); the declaration brings bob and carol.
  auto r = SyncOperators(*fleet_, *store_, {{"bob", Key('b')}, {"carol", Key('c')}});
  ASSERT_TRUE(r.ok()) << r.message();
  EXPECT_NE(r->find("added bob, carol"), std::string::npos) << *r;
  EXPECT_NE(r->find("kept (added by hand) alice"), std::string::npos) << *r;
  EXPECT_EQ(Who('b').role, Role::kOperator);

  // carol leaves the declaration: refused from now on; alice (by hand) stays.
  r = SyncOperators(*fleet_, *store_, {{"bob", Key('b')}});
  ASSERT_TRUE(r.ok()) << r.message();
  EXPECT_NE(r->find("removed carol"), std::string::npos) << *r;
  EXPECT_EQ(Who('c').role, Role::kNone);
  EXPECT_EQ(Who('b').role, Role::kOperator);
  EXPECT_TRUE(fleet_->IsOperator("alice"));

  // A new process (the next start) sees the same store: nothing to do.
  Fleet again(*store_, [] { return kNow; });
  ASSERT_TRUE(again.Load().ok());
  r = SyncOperators(again, *store_, {{"bob", Key('b')}});
  ASSERT_TRUE(r.ok()) << r.message();
  EXPECT_NE(r->find("added none; new key none; removed none"), std::string::npos) << *r;
  EXPECT_FALSE(again.IsOperator("carol"));
}

TEST_F(OperatorSyncTest, NewKeyReplacesTheOldOne) {
  ASSERT_TRUE(SyncOperators(*fleet_, *store_, {{"bob", Key('b')}}).ok());
  auto r = SyncOperators(*fleet_, *store_, {{"bob", Key('x')}});
  ASSERT_TRUE(r.ok()) << r.message();
  EXPECT_NE(r->find("new key bob"), std::string::npos) << *r;
  EXPECT_EQ(Who('b').role, Role::kNone);
  EXPECT_EQ(Who('x').role, Role::kOperator);
  EXPECT_EQ(Who('x').name, "bob");
}

TEST_F(OperatorSyncTest, DeclaringAHandAddedOperatorManagesIt) {
  ASSERT_TRUE(SyncOperators(*fleet_, *store_, {{"alice", Key('a')}, {"bob", Key('b')}}).ok());
  auto r = SyncOperators(*fleet_, *store_, {{"bob", Key('b')}});
  ASSERT_TRUE(r.ok()) << r.message();
  EXPECT_FALSE(fleet_->IsOperator("alice"));
}

TEST_F(OperatorSyncTest, NeverLeavesTheFleetWithoutOperators) {
  ASSERT_TRUE(SyncOperators(*fleet_, *store_, {{"alice", Key('a')}}).ok());
  auto r = SyncOperators(*fleet_, *store_, {});
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.message().find("last operator"), std::string::npos) << r.message();
  EXPECT_TRUE(fleet_->IsOperator("alice"));
  // Still managed: declaring someone else later removes alice then.
  r = SyncOperators(*fleet_, *store_, {{"bob", Key('b')}});
  ASSERT_TRUE(r.ok()) << r.message();
  EXPECT_FALSE(fleet_->IsOperator("alice"));
}

TEST_F(OperatorSyncTest, KeyUnderAnotherNameIsRefused) {
  // alice's key (registered by hand as alice) declared as "mallory".
  auto r = SyncOperators(*fleet_, *store_, {{"mallory", Key('a')}});
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.message().find("operator 'mallory'"), std::string::npos) << r.message();
  EXPECT_EQ(Who('a').name, "alice");
}

}  // namespace
}  // namespace muster
