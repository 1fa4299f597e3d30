#include "common/roster.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

namespace muster {
namespace {

using ::testing::HasSubstr;

[[maybe_unused]] const bool kCryptoReady = (InitCrypto(), true);

RosterEntry Entry(const std::string& machine, const PublicKey& key) {
  RosterEntry e;
  e.machine = machine;
  e.key = key.ToText();
  e.tags = {"web", "eu:1"};
  e.signed_at = 1700000000123;
  return e;
}

TEST(Roster, SignedEntryRoundTripsAndVerifies) {
  SecretKey op = SecretKey::Generate();
  SecretKey machine = SecretKey::Generate();
  SignedRosterEntry s = SignRosterEntry(Entry("web1", machine.public_key()), op);
  auto decoded = DecodeSignedRosterEntry(EncodeSignedRosterEntry(s));
  ASSERT_TRUE(decoded) << decoded.message();
  auto e = VerifyRosterEntry(*decoded, {op.public_key()});
  ASSERT_TRUE(e) << e.message();
  EXPECT_EQ(e->machine, "web1");
  EXPECT_EQ(e->tags, (std::vector<std::string>{"web", "eu:1"}));
  EXPECT_EQ(e->signed_at, 1700000000123);
  auto k = RosterKey(*e, std::nullopt);
  ASSERT_TRUE(k) << k.message();
  EXPECT_EQ(*k, machine.public_key());
}

TEST(Roster, UntrustedSignerIsRefusedWithAdvice) {
  SecretKey op = SecretKey::Generate();
  SecretKey rogue = SecretKey::Generate();
  SignedRosterEntry s = SignRosterEntry(Entry("web1", SecretKey::Generate().public_key()), rogue);
  auto e = VerifyRosterEntry(s, {op.public_key()});
  ASSERT_FALSE(e);
  EXPECT_THAT(e.message(), HasSubstr("machine 'web1'"));
  EXPECT_THAT(e.message(), HasSubstr("does not trust"));
  EXPECT_THAT(e.message(), HasSubstr("trustedOperatorKeys"));
  // The signature itself is fine: only trust is missing.
  EXPECT_TRUE(CheckRosterSignature(s));
}

TEST(Roster, AnyChangeAfterSigningIsRefused) {
  SecretKey op = SecretKey::Generate();
  SecretKey machine = SecretKey::Generate();
  SignedRosterEntry good = SignRosterEntry(Entry("web1", machine.public_key()), op);
  const std::vector<std::pair<std::string, std::string>> edits = {
      {"\"web\"", "\"db\""},  // tag injection
      {machine.public_key().ToText(), SecretKey::Generate().public_key().ToText()},  // key swap
      {"\"web1\"", "\"web2\""},            // other machine
      {"1700000000123", "1900000000123"},  // reordering
  };
  for (const auto& [from, to] : edits) {
    SignedRosterEntry s = good;
    auto pos = s.entry.find(from);
    ASSERT_NE(pos, std::string::npos) << from;
    s.entry.replace(pos, from.size(), to);
    auto e = VerifyRosterEntry(s, {op.public_key()});
    ASSERT_FALSE(e) << "edit " << from << " -> " << to << " was accepted";
    EXPECT_THAT(e.message(), HasSubstr("invalid signature"));
  }
  SignedRosterEntry s = good;
  s.signature[3] = s.signature[3] == 'A' ? 'B' : 'A';
  EXPECT_FALSE(VerifyRosterEntry(s, {op.public_key()}));
}

TEST(Roster, ParseRejectsMalformedEntries) {
  SecretKey k = SecretKey::Generate();
  const std::string key = k.public_key().ToText();
  auto make = [&](nlohmann::json patch) {
    nlohmann::json j = nlohmann::json::parse(RosterEntryToJson(Entry("web1", k.public_key())));
    j.merge_patch(patch);
    return j.dump();
  };
  const std::vector<std::pair<nlohmann::json, std::string>> cases = {
      {{{"format", 2}}, "format"},
      {{{"machine", ""}}, "machine name"},
      {{{"machine", "-x"}}, "machine name"},
      {{{"machine", "a b"}}, "machine name"},
      {{{"tags", {"ok", "bad tag"}}}, "tag"},
      {{{"tags", {""}}}, "tag"},
      {{{"key", "ed25519:nope"}}, "key"},
      {{{"key", ""}}, "exactly one"},
      {{{"enrollKey", key}}, "exactly one"},
      {{{"removed", true}}, "exactly one"},
      {{{"signedAt", 0}}, "signedAt"},
      {{{"signedAt", 1.5}}, "signedAt"},
      {{{"signedAt", 18446744073709551615ull}}, "signedAt"},
      {{{"tags", "web"}}, "wrong type"},
  };
  for (const auto& [patch, want] : cases) {
    auto e = ParseRosterEntry(make(patch));
    ASSERT_FALSE(e) << patch.dump();
    EXPECT_THAT(e.message(), HasSubstr(want)) << patch.dump();
  }
  EXPECT_FALSE(ParseRosterEntry("[]"));
  EXPECT_FALSE(ParseRosterEntry("{"));
  std::vector<std::string> many(65, "t");
  EXPECT_FALSE(ValidateTags(many));
}

TEST(Roster, RemovalEntryVouchesForNoKey) {
  SecretKey op = SecretKey::Generate();
  RosterEntry e;
  e.machine = "web1";
  e.removed = true;
  e.signed_at = 5;
  auto v = VerifyRosterEntry(SignRosterEntry(e, op), {op.public_key()});
  ASSERT_TRUE(v) << v.message();
  auto k = RosterKey(*v, std::nullopt);
  ASSERT_FALSE(k);
  EXPECT_THAT(k.message(), HasSubstr("removed"));
}

TEST(Roster, RevocationNamesTheKeyAndVouchesForNothing) {
  SecretKey op = SecretKey::Generate();
  SecretKey machine = SecretKey::Generate();
  RosterEntry e = Entry("web1", machine.public_key());
  e.revoked = true;
  auto v = VerifyRosterEntry(SignRosterEntry(e, op), {op.public_key()});
  ASSERT_TRUE(v) << v.message();
  EXPECT_TRUE(v->revoked);
  auto k = RosterKey(*v, std::nullopt);
  ASSERT_FALSE(k);
  EXPECT_THAT(k.message(), HasSubstr("revoked"));
  // Entries from before revocations were signed have no "revoked" field.
  EXPECT_EQ(RosterEntryToJson(Entry("web1", machine.public_key())).find("revoked"),
            std::string::npos);
  e.key.clear();
  e.removed = true;
  EXPECT_FALSE(ParseRosterEntry(RosterEntryToJson(e)));  // a revocation names its key
}

TEST(Roster, GrantIsCompletedOnlyByTheTokenHolder) {
  SecretKey op = SecretKey::Generate();
  std::string token = NewEnrollToken();
  auto ek = EnrollKeyFromToken(token + "\n");
  ASSERT_TRUE(ek) << ek.message();
  RosterEntry grant;
  grant.machine = "edge7";
  grant.enroll_key = ek->public_key().ToText();
  grant.tags = {"edge"};
  grant.expires_at = 2000;
  grant.signed_at = 1000;
  auto g = VerifyRosterEntry(SignRosterEntry(grant, op), {op.public_key()});
  ASSERT_TRUE(g) << g.message();

  SecretKey machine = SecretKey::Generate();
  EXPECT_FALSE(RosterKey(*g, std::nullopt));  // not enrolled yet

  EnrollBinding b = MakeEnrollBinding(*ek, "edge7", machine.public_key());
  auto k = RosterKey(*g, b);
  ASSERT_TRUE(k) << k.message();
  EXPECT_EQ(*k, machine.public_key());
  auto round = DecodeEnrollBinding(EncodeEnrollBinding(b));
  ASSERT_TRUE(round);
  EXPECT_TRUE(RosterKey(*g, *round));

  // A controller that swaps in its own key cannot sign the binding.
  SecretKey rogue = SecretKey::Generate();
  EnrollBinding swapped = b;
  swapped.key = rogue.public_key().ToText();
  auto bad = RosterKey(*g, swapped);
  ASSERT_FALSE(bad);
  EXPECT_THAT(bad.message(), HasSubstr("not signed by the key of the token"));
  // Nor can it sign one with another key of its own.
  EXPECT_FALSE(
      RosterKey(*g, MakeEnrollBinding(SecretKey::Generate(), "edge7", rogue.public_key())));
  // A binding is for one machine name.
  EXPECT_FALSE(RosterKey(*g, MakeEnrollBinding(*ek, "edge8", machine.public_key())));
}

TEST(Roster, TokensAreCheckedAndDistinct) {
  EXPECT_NE(NewEnrollToken(), NewEnrollToken());
  EXPECT_FALSE(EnrollKeyFromToken("mtok_abc"));
  EXPECT_FALSE(EnrollKeyFromToken("mtok2_!!!"));
  EXPECT_FALSE(EnrollKeyFromToken("mtok2_YWJj"));  // 3 bytes
  std::string t = NewEnrollToken();
  auto a = EnrollKeyFromToken(t);
  auto b = EnrollKeyFromToken(t);
  ASSERT_TRUE(a && b);
  EXPECT_EQ(a->public_key(), b->public_key());
}

}  // namespace
}  // namespace muster
