#include "controller/cli/trust.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "common/fsutil.h"
#include "common/testutil.h"

namespace muster::cli {
namespace {

using nlohmann::json;
using ::testing::HasSubstr;

[[maybe_unused]] const bool kCryptoReady = (InitCrypto(), true);

class RosterViewTest : public ::testing::Test {
 protected:
  json Row(const std::string& name, const SecretKey& machine, const SecretKey& signer,
           std::vector<std::string> tags, std::int64_t at) {
    RosterEntry e;
    e.machine = name;
    e.key = machine.public_key().ToText();
    e.tags = std::move(tags);
    e.signed_at = at;
    return {{"name", name},
            {"key", e.key},
            {"roster", EntryToJson(SignRosterEntry(e, signer))},
            {"binding", nullptr}};
  }
  RosterView View(const json& machines, const json& removed = json::array()) {
    return RosterView(machines, removed, {alice_.public_key(), bob_.public_key()}, seen_);
  }

  muster::testing::TempDir dir_;
  SeenEntries seen_{(dir_.path() / "seen.json").string()};
  SecretKey alice_ = SecretKey::Generate();
  SecretKey bob_ = SecretKey::Generate();
  SecretKey mallory_ = SecretKey::Generate();
  SecretKey web1_ = SecretKey::Generate();
  SecretKey web2_ = SecretKey::Generate();
};

TEST_F(RosterViewTest, SelectsOnlyVerifiedMachinesBySignedTags) {
  json rows = json::array({
      Row("web1", web1_, alice_, {"web"}, 10),
      Row("web2", web2_, bob_, {"web", "eu"}, 10),
      Row("evil", mallory_, mallory_, {"web"}, 10),             // untrusted signer
      {{"name", "old"}, {"key", web1_.public_key().ToText()}},  // unsigned
  });
  RosterView v = View(rows);
  EXPECT_EQ(v.Select({"web"}, false), (std::vector<std::string>{"web1", "web2"}));
  EXPECT_EQ(v.Select({"eu"}, false), (std::vector<std::string>{"web2"}));
  EXPECT_EQ(v.Select({}, true), (std::vector<std::string>{"web1", "web2"}));
  ASSERT_TRUE(v.Get("web1"));
  EXPECT_EQ(v.Get("web1")->key, web1_.public_key());
  EXPECT_THAT(v.Get("evil").message(), HasSubstr("does not trust"));
  EXPECT_THAT(v.Get("old").message(), HasSubstr("unsigned"));
  EXPECT_THAT(v.Get("nope").message(), HasSubstr("no machine named 'nope'"));
  EXPECT_EQ(v.untrusted().size(), 2u);
}

TEST_F(RosterViewTest, EntryListedUnderAnotherNameOrRevokedIsNotTrusted) {
  json row = Row("web1", web1_, alice_, {}, 10);
  row["name"] = "web9";
  json revoked = Row("web2", web2_, alice_, {}, 10);
  revoked["revoked"] = true;
  RosterView v = View(json::array({row, revoked}));
  EXPECT_THAT(v.Get("web9").message(), HasSubstr("entry of machine 'web1'"));
  EXPECT_THAT(v.Get("web2").message(), HasSubstr("revoked"));
}

TEST_F(RosterViewTest, OlderEntriesThanSeenOrRemovedAreRefused) {
  {
    RosterView v = View(json::array({Row("web1", web1_, alice_, {"new"}, 20)}));
    ASSERT_TRUE(v.Get("web1"));
  }
  ASSERT_TRUE(seen_.Save().ok());
  SeenEntries reloaded((dir_.path() / "seen.json").string());
  ASSERT_TRUE(reloaded.Load().ok());
  EXPECT_EQ(reloaded.Get("web1"), 20);
  RosterView replay(json::array({Row("web1", web1_, alice_, {"old"}, 19)}), json::array(),
                    {alice_.public_key()}, reloaded);
  EXPECT_THAT(replay.Get("web1").message(), HasSubstr("older than one this CLI saw"));

  RosterEntry removal;
  removal.machine = "web2";
  removal.removed = true;
  removal.signed_at = 30;
  json removed = json::array({EntryToJson(SignRosterEntry(removal, bob_))});
  RosterView v = View(json::array({Row("web2", web2_, alice_, {}, 29)}), removed);
  EXPECT_THAT(v.Get("web2").message(), HasSubstr("older than one this CLI saw"));
  EXPECT_EQ(seen_.Get("web2"), 30);
}

TEST_F(RosterViewTest, DamagedSeenFileIsAnErrorNotAReset) {
  auto path = dir_.path() / "bad.json";
  ASSERT_TRUE(WriteFileAtomic(path, "[1,2", 0600).ok());
  SeenEntries s(path.string());
  auto st = s.Load();
  ASSERT_FALSE(st.ok());
  EXPECT_THAT(st.message(), HasSubstr("damaged"));
}

TEST(Printable, EscapesControlsAndInvalidBytes) {
  struct Case {
    std::string in, want;
  } cases[] = {
      {"plain text", "plain text"},
      {"tab\tstays", "tab\tstays"},
      {"\x1b[31mred\x1b[0m", "\\x1b[31mred\\x1b[0m"},
      {"bell\a", "bell\\x07"},
      {"cr\rline\n", "cr\\x0dline\\x0a"},
      {"del\x7f", "del\\x7f"},
      {"caf\xc3\xa9", "caf\xc3\xa9"},                                      // é
      {"\xe2\x82\xac \xf0\x9f\x98\x80", "\xe2\x82\xac \xf0\x9f\x98\x80"},  // € 😀
      {"\xc2\x9b"
       "31m",
       "\\x9b31m"},                              // C1 CSI
      {"cut\xe2\x82", "cut\xef\xbf\xbd"},        // a truncated character: one U+FFFD
      {"\xc0\xaf", "\xef\xbf\xbd\xef\xbf\xbd"},  // overlong
      {"\xed\xa0\x80", "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd"},                  // surrogate
      {"\xf4\x90\x80\x80", "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd"},  // > U+10FFFF
      {std::string("nul\0x", 5), "nul\\x00x"},
  };
  for (const auto& c : cases) EXPECT_EQ(Printable(c.in), c.want) << c.in;
}

}  // namespace
}  // namespace muster::cli
