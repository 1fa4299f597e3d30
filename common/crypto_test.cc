#include "common/crypto.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "common/testutil.h"

namespace muster {
namespace {

using ::testing::HasSubstr;
using testing::TempDir;

[[maybe_unused]] const bool kCryptoReady = (InitCrypto(), true);

std::string Seed(char fill) { return std::string(32, fill); }

mode_t ModeOf(const std::filesystem::path& p) {
  struct stat st {};
  EXPECT_EQ(::stat(p.c_str(), &st), 0) << p;
  return st.st_mode & 07777;
}

TEST(Encoding, Base64RoundTripAndErrors) {
  for (std::string s : {std::string(), std::string("a"), std::string("ab"), std::string("abc"),
                        std::string("\0\xff\x01binary", 9)}) {
    auto back = Base64Decode(Base64Encode(s));
    ASSERT_TRUE(back.ok()) << back.message();
    EXPECT_EQ(*back, s);
  }
  EXPECT_EQ(Base64Encode("hello"), "aGVsbG8=");
  for (const char* bad : {"a", "aGVsbG8", "aGVs bG8=", "!!!!", "aGVsbG8=x"}) {
    EXPECT_FALSE(Base64Decode(bad).ok()) << bad;
  }
}

TEST(Encoding, HexAndSha256) {
  EXPECT_EQ(HexEncode(std::string("\x00\x0f\xa0\xff", 4)), "000fa0ff");
  EXPECT_EQ(Sha256Hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
}

TEST(PublicKey, TextFormsRoundTrip) {
  SecretKey k = SecretKey::Generate();
  const PublicKey& pk = k.public_key();
  std::string text = pk.ToText();
  EXPECT_EQ(text.rfind("ed25519:", 0), 0u) << text;
  EXPECT_EQ(text.size(), std::string("ed25519:").size() + 44);
  auto parsed = ParsePublicKey(text);
  ASSERT_TRUE(parsed.ok()) << parsed.message();
  EXPECT_EQ(*parsed, pk);
  // Trailing newline and spaces (a pasted file) are accepted.
  auto pasted = ParsePublicKey(text + " \r\n");
  ASSERT_TRUE(pasted.ok()) << pasted.message();
  EXPECT_EQ(*pasted, pk);

  std::string fp = pk.Fingerprint();
  EXPECT_EQ(fp, "sha256:" + Sha256Hex(pk.Raw()));
  EXPECT_EQ(fp.size(), 7u + 64u);
  EXPECT_EQ(pk.ShortId(), fp.substr(7, 12));
}

TEST(PublicKey, DeterministicFromSeed) {
  auto a = SecretKey::FromSeed(Seed('\x01'));
  auto b = SecretKey::FromSeed(Seed('\x01'));
  auto c = SecretKey::FromSeed(Seed('\x02'));
  ASSERT_TRUE(a.ok() && b.ok() && c.ok());
  EXPECT_EQ(a->public_key(), b->public_key());
  EXPECT_NE(a->public_key(), c->public_key());
  EXPECT_EQ(a->seed(), Seed('\x01'));
  for (size_t n : {0u, 31u, 33u, 64u}) {
    auto bad = SecretKey::FromSeed(std::string(n, 'x'));
    ASSERT_FALSE(bad.ok()) << n;
    EXPECT_THAT(bad.message(), HasSubstr("32 bytes"));
  }
}

TEST(PublicKey, ParseErrors) {
  std::string b64_31 = Base64Encode(std::string(31, 'k'));
  std::string b64_33 = Base64Encode(std::string(33, 'k'));
  struct Case {
    std::string text;
    std::string want;
  } cases[] = {
      {"", "must look like 'ed25519:<base64>'"},
      {"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI", "must look like 'ed25519:<base64>'"},
      {"ED25519:" + Base64Encode(std::string(32, 'k')), "must look like"},
      {"ed25519:", "does not hold 32 base64-encoded bytes"},
      {"ed25519:!!!!", "does not hold 32"},
      {"ed25519:" + b64_31, "does not hold 32"},
      {"ed25519:" + b64_33, "does not hold 32"},
  };
  for (const auto& c : cases) {
    auto r = ParsePublicKey(c.text);
    ASSERT_FALSE(r.ok()) << c.text;
    EXPECT_THAT(r.message(), HasSubstr(c.want)) << c.text;
  }
}

TEST(Fingerprint, ParseNormalisesAndRejects) {
  std::string hex(64, 'a');
  auto upper = ParseFingerprint("sha256:" + std::string(64, 'A') + "\n");
  ASSERT_TRUE(upper.ok()) << upper.message();
  EXPECT_EQ(*upper, "sha256:" + hex);
  struct Case {
    std::string text;
    std::string want;
  } cases[] = {
      {"", "must look like 'sha256:<64 hex digits>'"},
      {hex, "must look like"},
      {"sha256:" + hex.substr(1), "must look like"},
      {"sha256:" + hex + "0", "must look like"},
      {"sha1:" + hex, "must look like"},
      {"sha256:" + hex.substr(1) + "g", "non-hex"},
      {"sha256:" + hex.substr(1) + ":", "non-hex"},
  };
  for (const auto& c : cases) {
    auto r = ParseFingerprint(c.text);
    ASSERT_FALSE(r.ok()) << c.text;
    EXPECT_THAT(r.message(), HasSubstr(c.want)) << c.text;
  }
}

TEST(Signature, VerifiesAndDetectsTampering) {
  SecretKey k = SecretKey::Generate();
  SecretKey other = SecretKey::Generate();
  const std::string msg = "muster-manifest-v1\n{\"generation\":3}";
  std::string sig = k.Sign(msg);
  ASSERT_EQ(sig.size(), 64u);
  EXPECT_EQ(sig, k.Sign(msg)) << "Ed25519 signatures are deterministic";

  std::string flipped_sig = sig;
  flipped_sig[10] = static_cast<char>(flipped_sig[10] ^ 0x01);
  std::string flipped_msg = msg;
  flipped_msg.back() = '4';
  struct Case {
    const char* name;
    const PublicKey* key;
    std::string message;
    std::string signature;
    bool want;
  } cases[] = {
      {"valid", &k.public_key(), msg, sig, true},
      {"tampered message", &k.public_key(), flipped_msg, sig, false},
      {"tampered signature", &k.public_key(), msg, flipped_sig, false},
      {"other key", &other.public_key(), msg, sig, false},
      {"truncated signature", &k.public_key(), msg, sig.substr(0, 63), false},
      {"empty signature", &k.public_key(), msg, "", false},
      {"extended message", &k.public_key(), msg + " ", sig, false},
  };
  for (const auto& c : cases) {
    EXPECT_EQ(VerifySignature(*c.key, c.message, c.signature), c.want) << c.name;
  }
}

TEST(SealedBox, RoundTrip) {
  SecretKey k = SecretKey::Generate();
  for (std::string plain : {std::string(), std::string("secret"), std::string(100000, '\x7f')}) {
    auto sealed = SealTo(k.public_key(), plain);
    ASSERT_TRUE(sealed.ok()) << sealed.message();
    EXPECT_EQ(sealed->size(), plain.size() + 48);
    auto opened = k.OpenSealed(*sealed);
    ASSERT_TRUE(opened.ok()) << opened.message();
    EXPECT_EQ(*opened, plain);
  }
  // Each seal uses a fresh ephemeral key.
  EXPECT_NE(*SealTo(k.public_key(), "x"), *SealTo(k.public_key(), "x"));
}

TEST(SealedBox, RefusesTamperedShortAndForeign) {
  SecretKey k = SecretKey::Generate();
  SecretKey other = SecretKey::Generate();
  auto sealed = SealTo(k.public_key(), "the secret key.txt");
  ASSERT_TRUE(sealed.ok());
  std::string tampered = *sealed;
  tampered[tampered.size() / 2] = static_cast<char>(tampered[tampered.size() / 2] ^ 0x20);

  auto r1 = k.OpenSealed(tampered);
  ASSERT_FALSE(r1.ok());
  EXPECT_THAT(r1.message(), HasSubstr("cannot be opened"));
  auto r2 = other.OpenSealed(*sealed);
  ASSERT_FALSE(r2.ok());
  EXPECT_THAT(r2.message(), HasSubstr("sealed to another key"));
  auto r3 = k.OpenSealed(sealed->substr(0, 47));
  ASSERT_FALSE(r3.ok());
  EXPECT_THAT(r3.message(), HasSubstr("too short"));
  EXPECT_FALSE(k.OpenSealed("").ok());
}

TEST(KeyFile, SaveCreates0600AndLoadsBack) {
  TempDir dir;
  auto path = dir / "key";
  SecretKey k = SecretKey::Generate();
  ASSERT_TRUE(SaveSecretKey(k, path).ok());
  EXPECT_EQ(ModeOf(path), 0600u);
  std::string text = testing::Slurp(path);
  EXPECT_EQ(text.rfind("muster-secret-key-v1 ed25519 ", 0), 0u) << text;
  EXPECT_EQ(text.back(), '\n');
  auto loaded = LoadSecretKey(path);
  ASSERT_TRUE(loaded.ok()) << loaded.message();
  EXPECT_EQ(loaded->public_key(), k.public_key());
  EXPECT_EQ(loaded->seed(), k.seed());
  // Only the key file is left in the directory (no staging files).
  int entries = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator(dir.path())) ++entries;
  EXPECT_EQ(entries, 1);
}

TEST(KeyFile, RefusesOverwrite) {
  TempDir dir;
  auto path = dir / "key";
  SecretKey a = SecretKey::Generate();
  ASSERT_TRUE(SaveSecretKey(a, path).ok());
  auto st = SaveSecretKey(SecretKey::Generate(), path);
  ASSERT_FALSE(st.ok());
  EXPECT_THAT(st.message(), HasSubstr("refusing to overwrite"));
  EXPECT_EQ(LoadSecretKey(path)->public_key(), a.public_key());
}

TEST(KeyFile, ConcurrentSavesNeverReplaceAKey) {
  // The refusal used to be check-then-rename: two writers could both pass the
  // check, and the later rename replaced the key the first one had saved.
  for (int round = 0; round < 20; ++round) {
    TempDir dir;
    auto path = dir / "key";
    std::vector<SecretKey> keys;
    for (int i = 0; i < 8; ++i) keys.push_back(SecretKey::Generate());
    std::vector<int> ok(keys.size(), 0);
    std::vector<std::thread> threads;
    for (std::size_t i = 0; i < keys.size(); ++i) {
      threads.emplace_back([&, i] { ok[i] = SaveSecretKey(keys[i], path).ok() ? 1 : 0; });
    }
    for (auto& t : threads) t.join();
    ASSERT_EQ(std::count(ok.begin(), ok.end(), 1), 1) << "round " << round;
    std::size_t winner = static_cast<std::size_t>(std::find(ok.begin(), ok.end(), 1) - ok.begin());
    EXPECT_EQ(LoadSecretKey(path)->public_key(), keys[winner].public_key());
    int entries = 0;
    for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator(dir.path())) {
      ++entries;
    }
    EXPECT_EQ(entries, 1) << "no staging files left";
  }
}

TEST(KeyFile, RefusesToReplaceADanglingSymlink) {
  TempDir dir;
  auto path = dir / "key";
  ASSERT_EQ(::symlink((dir / "elsewhere").c_str(), path.c_str()), 0);
  auto st = SaveSecretKey(SecretKey::Generate(), path);
  ASSERT_FALSE(st.ok());
  EXPECT_THAT(st.message(), HasSubstr("refusing to overwrite existing key file"));
  EXPECT_TRUE(std::filesystem::is_symlink(path));
  EXPECT_FALSE(std::filesystem::exists(dir / "elsewhere"));
}

TEST(KeyFile, RefusesGroupOrWorldAccessibleFile) {
  TempDir dir;
  auto path = dir / "key";
  ASSERT_TRUE(SaveSecretKey(SecretKey::Generate(), path).ok());
  for (mode_t mode : {0644, 0640, 0604, 0660, 0602}) {
    ASSERT_EQ(::chmod(path.c_str(), mode), 0);
    auto r = LoadSecretKey(path);
    ASSERT_FALSE(r.ok()) << std::oct << mode;
    EXPECT_THAT(r.message(), HasSubstr("chmod 600 " + path.string()));
    char want[8];
    std::snprintf(want, sizeof want, "%04o", static_cast<unsigned>(mode));
    EXPECT_THAT(r.message(), HasSubstr(std::string("has mode ") + want));
  }
  ASSERT_EQ(::chmod(path.c_str(), 0400), 0);
  EXPECT_TRUE(LoadSecretKey(path).ok());
}

TEST(KeyFile, LoadErrors) {
  TempDir dir;
  struct Case {
    const char* name;
    std::string content;  // "" = do not create
    std::string want;
  } cases[] = {
      {"missing", "", "does not exist"},
      {"wrong header", "ssh-ed25519 AAAA\n", "is not a muster secret key"},
      {"short seed", "muster-secret-key-v1 ed25519 " + Base64Encode("short") + "\n", "corrupt"},
      {"not base64", "muster-secret-key-v1 ed25519 !!!!\n", "corrupt"},
  };
  for (const auto& c : cases) {
    auto path = dir / c.name;
    if (!c.content.empty()) {
      testing::Spit(path, c.content);
      ASSERT_EQ(::chmod(path.c_str(), 0600), 0);
    }
    auto r = LoadSecretKey(path);
    ASSERT_FALSE(r.ok()) << c.name;
    EXPECT_THAT(r.message(), HasSubstr(c.want)) << c.name;
  }
}

TEST(KeyFile, LoadOrCreateCreatesOnceThenLoads) {
  TempDir dir;
  auto path = dir / "state" / "nested" / "machine.key";
  auto first = LoadOrCreateSecretKey(path);
  ASSERT_TRUE(first.ok()) << first.message();
  EXPECT_EQ(ModeOf(path), 0600u);
  EXPECT_EQ(ModeOf(dir / "state"), 0700u);
  EXPECT_EQ(ModeOf(dir / "state" / "nested"), 0700u);
  auto second = LoadOrCreateSecretKey(path);
  ASSERT_TRUE(second.ok()) << second.message();
  EXPECT_EQ(second->public_key(), first->public_key());
}

}  // namespace
}  // namespace muster
