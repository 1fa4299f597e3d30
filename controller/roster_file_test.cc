#include "controller/roster_file.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <filesystem>

#include "common/fsutil.h"
#include "common/roster.h"
#include "controller/test_fakes.h"

namespace muster {
namespace {

using testing::FleetTest;
using ::testing::HasSubstr;

class RosterFileTest : public FleetTest {
 protected:
  SignedRosterEntry Entry(const std::string& machine, const SecretKey& key,
                          std::vector<std::string> tags, std::int64_t signed_at,
                          const SecretKey* signer = nullptr) {
    RosterEntry e;
    e.machine = machine;
    e.key = key.public_key().ToText();
    e.tags = std::move(tags);
    e.signed_at = signed_at;
    return SignRosterEntry(e, signer ? *signer : alice_);
  }
  SignedRosterEntry Removal(const std::string& machine, std::int64_t signed_at) {
    RosterEntry e;
    e.machine = machine;
    e.removed = true;
    e.signed_at = signed_at;
    return SignRosterEntry(e, alice_);
  }
  std::vector<std::string> Tags(const std::string& m) { return store_->GetMachine(m)->tags; }

  SecretKey db1_ = SecretKey::Generate();
  SecretKey db1_new_ = SecretKey::Generate();
};

TEST_F(RosterFileTest, AddsUpdatesRekeysRemovesAndLeavesOlderEntriesAlone) {
  auto first =
      ApplyRosterText(*fleet_, EncodeRosterFile({Entry("db1", db1_, {"db"}, 100),
                                                 Entry("web1", web1_, {"web", "eu"}, 100)}));
  ASSERT_TRUE(first.ok()) << first.message();
  EXPECT_EQ(first->added, 1);
  EXPECT_EQ(first->updated, 1) << "web1 was registered unsigned; the entry signs it";
  EXPECT_TRUE(first->refused.empty());
  EXPECT_EQ(fleet_->Lookup(db1_.public_key()).name, "db1") << "no 'machine add' needed";
  EXPECT_EQ(Tags("web1"), (std::vector<std::string>{"web", "eu"}));

  // The same file again changes nothing; an older entry cannot undo a newer one.
  auto again = ApplyRosterText(*fleet_, EncodeRosterFile({Entry("db1", db1_, {"old"}, 50)}));
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->unchanged, 1);
  EXPECT_EQ(Tags("db1"), (std::vector<std::string>{"db"}));

  // Regenerated vars: a newer entry with another key replaces the key.
  auto rekey = ApplyRosterText(*fleet_, EncodeRosterFile({Entry("db1", db1_new_, {"db"}, 200)}));
  ASSERT_TRUE(rekey.ok());
  EXPECT_EQ(rekey->rekeyed, 1);
  EXPECT_EQ(fleet_->Lookup(db1_new_.public_key()).name, "db1");
  EXPECT_EQ(fleet_->Lookup(db1_.public_key()).role, Role::kNone) << "the old key is refused";

  auto gone = ApplyRosterText(*fleet_, EncodeRosterFile({Removal("db1", 300)}));
  ASSERT_TRUE(gone.ok());
  EXPECT_EQ(gone->removed, 1);
  EXPECT_FALSE(store_->GetMachine("db1").has_value());
  auto back = ApplyRosterText(*fleet_, EncodeRosterFile({Entry("db1", db1_new_, {"db"}, 250)}));
  ASSERT_TRUE(back.ok());
  ASSERT_EQ(back->refused.size(), 1u) << "older than its removal";
  EXPECT_THAT(back->refused[0], HasSubstr("older than its removal"));
}

TEST_F(RosterFileTest, EntriesNotSignedByARegisteredOperatorAreRefusedOneByOne) {
  auto mallory_entry = Entry("db1", db1_, {"db"}, 100, &mallory_);
  auto forged = Entry("db2", db1_new_, {"db"}, 100);
  forged.entry.replace(forged.entry.find("db2"), 3, "db3");  // altered after signing
  auto r = ApplyRosterText(
      *fleet_, EncodeRosterFile({mallory_entry, forged, Entry("web1", web1_, {"web"}, 100)}));
  ASSERT_TRUE(r.ok()) << r.message();
  ASSERT_EQ(r->refused.size(), 2u);
  EXPECT_THAT(r->refused[0], HasSubstr("not a registered operator key"));
  EXPECT_EQ(r->updated, 1) << "the good entry still applies";
  EXPECT_FALSE(store_->GetMachine("db1").has_value());
  EXPECT_FALSE(store_->GetMachine("db3").has_value());

  // A key change signed by an unknown key must not even remove the old key.
  auto steal =
      ApplyRosterText(*fleet_, EncodeRosterFile({Entry("web1", db1_, {"web"}, 200, &mallory_)}));
  ASSERT_TRUE(steal.ok());
  EXPECT_EQ(steal->refused.size(), 1u);
  EXPECT_EQ(fleet_->Lookup(web1_.public_key()).name, "web1");
}

TEST_F(RosterFileTest, SignedRevocationsRevokeAndOlderEntriesCannotUndoThem) {
  ASSERT_TRUE(ApplyRosterText(*fleet_, EncodeRosterFile({Entry("db1", db1_, {"db"}, 100)})).ok());
  RosterEntry rev;
  rev.machine = "db1";
  rev.key = db1_.public_key().ToText();
  rev.revoked = true;
  rev.signed_at = 200;
  auto r = ApplyRosterText(
      *fleet_, EncodeRosterFile({Entry("db1", db1_, {"db"}, 100), SignRosterEntry(rev, alice_)}));
  ASSERT_TRUE(r.ok()) << r.message();
  EXPECT_EQ(r->revoked, 1);
  EXPECT_EQ(r->unchanged, 1);
  EXPECT_EQ(fleet_->Lookup(db1_.public_key()).role, Role::kNone) << "the key is refused";
  auto again = ApplyRosterText(*fleet_, EncodeRosterFile({Entry("db1", db1_, {"db"}, 150)}));
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->unchanged, 1) << "older than the revocation";
  EXPECT_EQ(fleet_->Lookup(db1_.public_key()).role, Role::kNone);
}

TEST_F(RosterFileTest, MalformedFilesApplyNothing) {
  for (const char* text :
       {"", "[]", R"({"format":2,"entries":[]})", R"({"format":1,"entries":[{"entry":1}]})"}) {
    auto r = ApplyRosterText(*fleet_, text);
    EXPECT_FALSE(r.ok()) << text;
  }
}

TEST_F(RosterFileTest, PollAppliesOnlyWhenTheFileChanges) {
  std::string path = (dir_ / "roster.json").string();
  RosterFile file(*fleet_, path);
  auto missing = file.Load();
  ASSERT_FALSE(missing.ok());
  EXPECT_THAT(missing.message(), HasSubstr(path));

  ASSERT_TRUE(
      WriteFileAtomic(path, EncodeRosterFile({Entry("db1", db1_, {"db"}, 100)}), 0644).ok());
  auto first = file.Poll();
  ASSERT_TRUE(first.has_value());
  ASSERT_TRUE(first->ok()) << first->message();
  EXPECT_EQ((*first)->added, 1);
  EXPECT_FALSE(file.Poll().has_value()) << "unchanged";

  ASSERT_TRUE(
      WriteFileAtomic(path, EncodeRosterFile({Entry("db1", db1_, {"db", "eu"}, 200)}), 0644).ok());
  auto second = file.Poll();
  ASSERT_TRUE(second.has_value() && second->ok());
  EXPECT_EQ((*second)->updated, 1);
  EXPECT_EQ(Tags("db1"), (std::vector<std::string>{"db", "eu"}));

  std::filesystem::remove(path);
  auto gone = file.Poll();
  ASSERT_TRUE(gone.has_value());
  EXPECT_THAT(gone->message(), HasSubstr("stay registered"));
  EXPECT_TRUE(store_->GetMachine("db1").has_value());
}

}  // namespace
}  // namespace muster
