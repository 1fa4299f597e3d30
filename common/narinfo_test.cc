#include "common/narinfo.h"

#include <gtest/gtest.h>

#include "common/testutil.h"

namespace muster::nar {
namespace {

std::string Trim(std::string s) {
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  return s;
}

struct NixFixture : ::testing::Test {
  void SetUp() override {
    InitCrypto();
    narinfo = testing::Slurp(testing::TestData("nix/signed-by-nix.narinfo"));
    secret = Trim(testing::Slurp(testing::TestData("nix/test-cache-1.secret")));
    pub = Trim(testing::Slurp(testing::TestData("nix/test-cache-1.public")));
  }
  std::string narinfo, secret, pub;
};

TEST(Nix32, MatchesNixForTheSameHash) {
  // nix path-info --json printed the SRI form, the narinfo the base-32 form.
  auto raw = ParseSha256("sha256-VBXk93W8FDvoEEB1ei3sVHP8lWF5+VBAp7tHnlOf8pg=");
  ASSERT_TRUE(raw.ok()) << raw.message();
  EXPECT_EQ(FormatSha256(*raw), "sha256:167jkx9rwixvlx051ybrc6azqwslxhnplxa023l3n55wfpvy85al");
  auto back = ParseSha256("sha256:167jkx9rwixvlx051ybrc6azqwslxhnplxa023l3n55wfpvy85al");
  ASSERT_TRUE(back.ok());
  EXPECT_EQ(*back, *raw);
  auto hex = ParseSha256("sha256:" + HexEncode(*raw));
  ASSERT_TRUE(hex.ok());
  EXPECT_EQ(*hex, *raw);
}

TEST(Nix32, RefusesBadInput) {
  const char* bad[] = {"sha256:167jkx9rwixvlx051ybrc6azqwslxhnplxa023l3n55wfpvy85ae",  // 'e'
                       "sha256:167jkx", "md5:abc", "sha256-AAAA", ""};
  for (const char* b : bad) EXPECT_FALSE(ParseSha256(b).ok()) << b;
  // 52 digits of 5 bits carry 260 bits: a top digit above 0-7 does not fit in 32 bytes.
  EXPECT_FALSE(Nix32Decode(std::string(52, 'z'), 32).ok());
}

TEST_F(NixFixture, NixsSignatureVerifiesAndTamperingBreaksIt) {
  auto info = ParseNarInfo(narinfo);
  ASSERT_TRUE(info.ok()) << info.message();
  EXPECT_EQ(info->nar_size, 2504u);
  ASSERT_EQ(info->references.size(), 1u);
  EXPECT_TRUE(HasValidSignature(*info, {pub}));
  EXPECT_FALSE(HasValidSignature(*info, {"other:" + pub.substr(pub.find(':') + 1)}));
  auto changed = *info;
  changed.nar_size += 1;
  EXPECT_FALSE(HasValidSignature(changed, {pub}));
  changed = *info;
  changed.references.clear();
  EXPECT_FALSE(HasValidSignature(changed, {pub}));
  changed = *info;
  changed.nar_hash = "sha256:067jkx9rwixvlx051ybrc6azqwslxhnplxa023l3n55wfpvy85al";
  EXPECT_FALSE(HasValidSignature(changed, {pub}));
  // URL, compression and file fields are not signed: a cache may recompress.
  changed = *info;
  changed.url = "nar/x.nar.zst";
  changed.compression = "zstd";
  changed.file_size = 1;
  EXPECT_TRUE(HasValidSignature(changed, {pub}));
}

TEST_F(NixFixture, OurSignatureIsNixsSignature) {
  auto key = ParseSigningKey(secret);
  ASSERT_TRUE(key.ok()) << key.message();
  EXPECT_EQ(PublicKeyText(*key), pub);
  EXPECT_EQ(SigningKeyText(*key), secret);
  auto info = ParseNarInfo(narinfo);
  ASSERT_TRUE(info.ok());
  std::string nix_sig;
  for (const auto& s : info->sigs) {
    if (s.rfind("test-cache-1:", 0) == 0) nix_sig = s;
  }
  ASSERT_FALSE(nix_sig.empty());
  // Ed25519 is deterministic: the same fingerprint gives nix's exact bytes.
  EXPECT_EQ(Sign(*info, *key), nix_sig);
  EXPECT_EQ(Fingerprint(*info),
            "1;/nix/store/00c289f0lbcy76l511kx3xp02r2sf1bs-muster-test-newer;"
            "sha256:167jkx9rwixvlx051ybrc6azqwslxhnplxa023l3n55wfpvy85al;2504;"
            "/nix/store/93a8pwgyy2gz5d6kcdm89dhsh00l23d0-muster-test-kernel-6.1.0");
}

TEST_F(NixFixture, FormatParsesBackToTheSame) {
  auto info = ParseNarInfo(narinfo);
  ASSERT_TRUE(info.ok());
  auto again = ParseNarInfo(FormatNarInfo(*info));
  ASSERT_TRUE(again.ok()) << again.message();
  EXPECT_EQ(FormatNarInfo(*again), FormatNarInfo(*info));
  EXPECT_EQ(FormatNarInfo(*info), narinfo);
}

TEST(NarInfo, RefusesMalformed) {
  struct Case {
    const char* text;
    const char* why;
  } cases[] = {
      {"URL: nar/x\nNarHash: sha256:167jkx9rwixvlx051ybrc6azqwslxhnplxa023l3n55wfpvy85al\nNarSize: "
       "1\n",
       "lacks"},
      {"StorePath: /etc/passwd\nURL: x\nNarHash: "
       "sha256:167jkx9rwixvlx051ybrc6azqwslxhnplxa023l3n55wfpvy85al\nNarSize: 1\n",
       "store"},
      {"StorePath: /nix/store/00c289f0lbcy76l511kx3xp02r2sf1bs-a\nURL: x\nNarHash: "
       "sha256:1\nNarSize: 1\n",
       "NarHash"},
      {"StorePath: /nix/store/00c289f0lbcy76l511kx3xp02r2sf1bs-a\nURL: x\nNarHash: "
       "sha256:167jkx9rwixvlx051ybrc6azqwslxhnplxa023l3n55wfpvy85al\nNarSize: -1\n",
       "not a number"},
      {"StorePath: /nix/store/00c289f0lbcy76l511kx3xp02r2sf1bs-a\nURL: x\nNarHash: "
       "sha256:167jkx9rwixvlx051ybrc6azqwslxhnplxa023l3n55wfpvy85al\nNarSize: 1\nReferences: "
       "../../etc\n",
       "reference"},
  };
  for (const auto& c : cases) {
    auto r = ParseNarInfo(c.text);
    ASSERT_FALSE(r.ok()) << c.text;
    EXPECT_NE(r.message().find(c.why), std::string::npos) << r.message();
  }
  EXPECT_FALSE(ParseNarInfo(std::string(70000, 'a')).ok());
}

TEST(SigningKey, RefusesWrongForms) {
  InitCrypto();
  EXPECT_FALSE(ParseSigningKey("no-colon").ok());
  EXPECT_FALSE(ParseSigningKey("name:AAAA").ok());
  auto k = GenerateSigningKey("fleet-1");
  auto text = SigningKeyText(k);
  auto back = ParseSigningKey(text + "\n");
  ASSERT_TRUE(back.ok()) << back.message();
  EXPECT_EQ(PublicKeyText(*back), PublicKeyText(k));
  // A secret whose public half was swapped is corrupt.
  auto other = GenerateSigningKey("fleet-1");
  std::string raw = *Base64Decode(text.substr(8));
  raw.replace(32, 32, std::string(other.key.public_key().Raw()));
  EXPECT_FALSE(ParseSigningKey("fleet-1:" + Base64Encode(raw)).ok());
}

}  // namespace
}  // namespace muster::nar
