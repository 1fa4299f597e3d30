#include "common/manifest.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "common/golden_samples.h"
#include "common/testutil.h"

namespace muster {
namespace {

using nlohmann::json;
using ::testing::AllOf;
using ::testing::HasSubstr;

[[maybe_unused]] const bool kCryptoReady = (InitCrypto(), true);

constexpr const char* kToplevel =
    "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-nixos-system-web1-24.05";

Manifest Sample(std::int64_t generation = 12, const std::string& machine = "web1") {
  Manifest m;
  m.machine = machine;
  m.generation = generation;
  m.toplevel = kToplevel;
  m.kind = Kind::kNixos;
  m.action = Action::kBoot;
  m.substituters = {"https://cache.example.org"};
  m.trusted_public_keys = {"cache.example.org-1:abc="};
  m.created_at = 1700000000;
  m.force = true;
  m.rollout = "r-42";
  return m;
}

void ExpectSame(const Manifest& a, const Manifest& b) {
  EXPECT_EQ(a.machine, b.machine);
  EXPECT_EQ(a.generation, b.generation);
  EXPECT_EQ(a.toplevel, b.toplevel);
  EXPECT_EQ(a.kind, b.kind);
  EXPECT_EQ(a.action, b.action);
  EXPECT_EQ(a.substituters, b.substituters);
  EXPECT_EQ(a.trusted_public_keys, b.trusted_public_keys);
  EXPECT_EQ(a.vars_hash, b.vars_hash);
  EXPECT_EQ(a.created_at, b.created_at);
  EXPECT_EQ(a.force, b.force);
  EXPECT_EQ(a.rollout, b.rollout);
}

TEST(Enums, EveryActionAndKindRoundTrips) {
  for (Action a : {Action::kSwitch, Action::kBoot, Action::kTest, Action::kDryActivate}) {
    EXPECT_EQ(ParseAction(ToString(a)), a) << ToString(a);
  }
  for (Kind k : {Kind::kAuto, Kind::kNixos, Kind::kDarwin, Kind::kHomeManager, Kind::kProfile}) {
    EXPECT_EQ(ParseKind(ToString(k)), k) << ToString(k);
  }
  EXPECT_EQ(ToString(Action::kDryActivate), "dry-activate");
  EXPECT_EQ(ToString(Kind::kHomeManager), "home-manager");
  EXPECT_FALSE(ParseAction("Switch"));
  EXPECT_FALSE(ParseAction(""));
  EXPECT_FALSE(ParseKind("nixOS"));
}

TEST(Manifest, JsonRoundTrip) {
  Manifest m = Sample();
  m.vars_hash = VarsHash("ciphertext");
  std::string text = ManifestToJson(m);
  EXPECT_EQ(text, ManifestToJson(m)) << "encoding must be deterministic";
  EXPECT_EQ(text.find(' '), std::string::npos) << "no whitespace: " << text;
  auto back = ParseManifest(text);
  ASSERT_TRUE(back.ok()) << back.message();
  ExpectSame(*back, m);
  EXPECT_EQ(ManifestToJson(*back), text);
}

TEST(Manifest, GoldenFile) {
  auto path = testing::TestData("manifest.json");
  if (testing::UpdateGolden()) {
    testing::Spit(path, json::parse(ManifestToJson(testing::GoldenManifest())).dump(2) + "\n");
  }
  std::string text = testing::Slurp(path);
  auto m = ParseManifest(text);
  ASSERT_TRUE(m.ok()) << m.message();
  EXPECT_EQ(json::parse(ManifestToJson(*m)), json::parse(text));
  ExpectSame(*m, testing::GoldenManifest());
}

TEST(ValidateStorePath, Table) {
  std::string hash = "0123456789abcdfghijklmnpqrsvwxyz";
  struct Case {
    std::string path;
    bool ok;
  } cases[] = {
      {"/nix/store/" + hash + "-nixos-system-web1-24.05", true},
      {"/nix/store/" + hash + "-a", true},
      {"/nix/store/" + hash + "-name+with_chars.?=", true},
      {"/nix/store/" + hash + "-", false},
      {"/nix/store/" + hash, false},
      {"/nix/store/" + hash.substr(1) + "-short-hash", false},
      {"/nix/store/" + hash + "-sub/dir", false},
      {"/nix/store/" + hash + "-with space", false},
      {"/nix/store/" + hash + "-semi;colon", false},
      {"/nix/store/" + hash + "x-name", false},
      {"/nix/store/../" + hash + "-x", false},
      {"/gnu/store/" + hash + "-x", false},
      {"nix/store/" + hash + "-x", false},
      {"", false},
  };
  for (const auto& c : cases) {
    EXPECT_EQ(ValidateStorePath(c.path).ok(), c.ok) << c.path;
  }
}

TEST(ParseManifest, Refusals) {
  json good = json::parse(ManifestToJson(Sample()));
  auto with = [&](const char* key, json value) {
    json j = good;
    j[key] = std::move(value);
    return j.dump();
  };
  auto without = [&](const char* key) {
    json j = good;
    j.erase(key);
    return j.dump();
  };
  struct Case {
    std::string text;
    std::string want;
  } cases[] = {
      {"[]", "not a JSON object"},
      {"{", "malformed JSON"},
      {"", "malformed JSON"},
      {with("format", 2), "format 2 is not supported by this agent; upgrade muster-agent"},
      {with("format", "1"), "wrong type"},
      {without("machine"), "missing or of the wrong type"},
      {without("toplevel"), "missing"},
      {without("varsHash"), "missing"},
      {without("force"), "missing"},
      {with("generation", "12"), "wrong type"},
      {with("substituters", "https://cache"), "wrong type"},
      {with("substituters", json::array({1})), "wrong type"},
      {with("machine", ""), "machine name is invalid"},
      {with("machine", std::string(254, 'm')), "machine name is invalid"},
      {with("generation", 0), "generation must be positive"},
      // Found by fuzz_manifest: out-of-range floats were converted with undefined behaviour.
      {with("generation", 1.18e21), "generation must be an integer"},
      {with("generation", 12.5), "generation must be an integer"},
      {with("generation", 18446744073709551615u), "generation must be an integer"},
      {with("createdAt", -1e300), "createdAt must be an integer"},
      {with("format", 1.0), "format must be an integer"},
      {with("generation", -3), "generation must be positive"},
      {with("toplevel", "/tmp/evil"), "is not a Nix store path"},
      {with("kind", "windows"), "manifest kind \"windows\" is unknown"},
      {with("action", "reboot"), "manifest action \"reboot\" is unknown"},
      {with("substituters", json::array({"https://a b"})), "substituter 'https://a b' is invalid"},
      {with("substituters", json::array({""})), "substituter '' is invalid"},
      {with("trustedPublicKeys", json::array({"nocolon"})), "not of the form name:base64"},
      {with("trustedPublicKeys", json::array({"a:b c"})), "not of the form name:base64"},
      {with("rollout", json::array({json::array({json::array({json::array(
                           {json::array({json::array({json::array({json::array({1})})})})})})})})),
       "nesting deeper than 8"},
      {"\"" + std::string(70000, 'x') + "\"", "exceeds the limit"},
  };
  for (const auto& c : cases) {
    Result<Manifest> r = Manifest{};
    EXPECT_NO_THROW(r = ParseManifest(c.text)) << c.text.substr(0, 80);
    ASSERT_FALSE(r.ok()) << c.text.substr(0, 200);
    EXPECT_THAT(r.message(), HasSubstr(c.want)) << c.text.substr(0, 200);
  }
  // rollout is optional (older CLIs).
  auto r = ParseManifest(without("rollout"));
  ASSERT_TRUE(r.ok()) << r.message();
  EXPECT_EQ(r->rollout, "");
}

class VerifyTest : public ::testing::Test {
 protected:
  SecretKey op_ = SecretKey::FromSeed(std::string(32, 'o')).value();
  SecretKey stranger_ = SecretKey::FromSeed(std::string(32, 's')).value();
  std::string sealed_ = "sealed-vars-ciphertext";

  VerifyContext Ctx(std::int64_t last_applied = 11) {
    return VerifyContext{"web1", {stranger_.public_key(), op_.public_key()}, last_applied};
  }
  SignedManifest Signed(Manifest m) {
    if (m.vars_hash.empty()) m.vars_hash = VarsHash(sealed_);
    return SignManifest(m, op_);
  }
};

TEST_F(VerifyTest, AcceptsGoodManifest) {
  SignedManifest sm = Signed(Sample(12));
  EXPECT_EQ(sm.signer, op_.public_key().ToText());
  auto r = VerifySignedManifest(sm, Ctx(), sealed_);
  ASSERT_TRUE(r.ok()) << r.message();
  EXPECT_EQ(r->generation, 12);
  EXPECT_EQ(r->machine, "web1");
}

TEST_F(VerifyTest, AcceptsManifestWithoutVars) {
  Manifest m = Sample(12);
  SignedManifest sm = SignManifest(m, op_);  // varsHash ""
  auto r = VerifySignedManifest(sm, Ctx(), "");
  ASSERT_TRUE(r.ok()) << r.message();
}

TEST_F(VerifyTest, Refusals) {
  SignedManifest good = Signed(Sample(12));
  SecretKey rogue = SecretKey::FromSeed(std::string(32, 'r')).value();

  SignedManifest unknown = SignManifest(*ParseManifest(good.manifest), rogue);
  SignedManifest tampered = good;
  tampered.manifest.replace(tampered.manifest.find("\"generation\":12"), 15, "\"generation\":13");
  SignedManifest bad_b64 = good;
  bad_b64.signature = "!!!not-base64";
  SignedManifest wrong_sig = good;
  wrong_sig.signature = Base64Encode(op_.Sign("something else"));
  SignedManifest no_domain = good;  // signature over the bare text, without the domain prefix
  no_domain.signature = Base64Encode(op_.Sign(good.manifest));
  SignedManifest bad_signer = good;
  bad_signer.signer = "ssh-ed25519 AAAA";
  SignedManifest other_machine = Signed(Sample(12, "db1"));
  SignedManifest invalid_but_signed = good;
  invalid_but_signed.manifest = "{\"format\":1}";
  invalid_but_signed.signature =
      Base64Encode(op_.Sign(std::string("muster-manifest-v1\n") + invalid_but_signed.manifest));

  struct Case {
    const char* name;
    SignedManifest sm;
    std::int64_t last_applied;
    std::string vars;
    std::vector<std::string> want;
  } cases[] = {
      {"unknown key",
       unknown,
       11,
       sealed_,
       {"manifest for web1 generation 12 is signed by unknown key " + rogue.public_key().ShortId(),
        rogue.public_key().ToText(), "add it to trustedOperatorKeys"}},
      {"tampered manifest",
       tampered,
       11,
       sealed_,
       {"manifest for web1 generation 13 has an invalid signature by key " +
            op_.public_key().ShortId(),
        "altered after signing"}},
      {"signature not base64", bad_b64, 11, sealed_, {"invalid signature"}},
      {"signature of other bytes", wrong_sig, 11, sealed_, {"invalid signature"}},
      {"signature without domain prefix", no_domain, 11, sealed_, {"invalid signature"}},
      {"signer not a key", bad_signer, 11, sealed_, {"manifest signer: ", "ed25519:<base64>"}},
      {"other machine",
       other_machine,
       11,
       sealed_,
       {"manifest for db1 generation 12 is addressed to machine 'db1', not to this machine "
        "'web1'"}},
      {"replayed generation",
       good,
       12,
       sealed_,
       {"manifest for web1 generation 12 is not newer than generation 12 already accepted here",
        "a rollback is published as a new, higher generation"}},
      {"older generation", good, 30, sealed_, {"not newer than generation 30"}},
      {"vars hash mismatch",
       good,
       11,
       "other-ciphertext",
       {"do not match the signed vars hash", VarsHash(sealed_), VarsHash("other-ciphertext")}},
      {"vars missing", good, 11, "", {"do not match the signed vars hash", "got ''"}},
      {"signed but invalid", invalid_but_signed, 0, "", {"signed manifest is invalid"}},
  };
  for (const auto& c : cases) {
    Result<Manifest> r = Manifest{};
    VerifyContext ctx = Ctx(c.last_applied);
    EXPECT_NO_THROW(r = VerifySignedManifest(c.sm, ctx, c.vars)) << c.name;
    ASSERT_FALSE(r.ok()) << c.name;
    for (const auto& w : c.want) EXPECT_THAT(r.message(), HasSubstr(w)) << c.name;
  }
}

TEST_F(VerifyTest, UnexpectedVarsAreRefused) {
  Manifest m = Sample(12);
  SignedManifest sm = SignManifest(m, op_);  // signed without vars
  auto r = VerifySignedManifest(sm, Ctx(), "smuggled");
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.message(), AllOf(HasSubstr("expected ''"), HasSubstr("do not match")));
}

TEST_F(VerifyTest, NoTrustedKeysRefusesEverything) {
  VerifyContext ctx{"web1", {}, 0};
  auto r = VerifySignedManifest(Signed(Sample(12)), ctx, sealed_);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.message(), HasSubstr("unknown key"));
}

TEST(GenerationCeiling, Table) {
  struct Case {
    std::int64_t created_at;
    std::int64_t want;
  } cases[] = {
      {INT64_MIN, 0},
      {-1, 0},
      {0, 0},
      {kGenerationEpoch - 1, 0},
      {kGenerationEpoch, 0},
      {kGenerationEpoch + 1, 1},
      {1700000000, 1700000000 - kGenerationEpoch},
      {INT64_MAX, INT64_MAX - kGenerationEpoch},
  };
  for (const auto& c : cases) EXPECT_EQ(GenerationCeiling(c.created_at), c.want) << c.created_at;
}

TEST(CheckGenerationNumber, Table) {
  struct Case {
    std::int64_t generation;
    std::int64_t created_at;
    std::string want;  // "" = accepted
  } cases[] = {
      {1, kGenerationEpoch + 1, ""},
      {2, kGenerationEpoch + 1,
       "generation 2 is above the ceiling 1 for a manifest signed at "
       "2020-01-01T00:00:01Z"},
      {1700000000 - kGenerationEpoch, 1700000000, ""},
      {1700000000 - kGenerationEpoch + 1, 1700000000, "looks steered by the controller"},
      {INT64_MAX - 1, 1700000000, "check the controller's generations for this machine"},
      {INT64_MAX, 1700000000, "above the ceiling"},
      {INT64_MAX - kGenerationEpoch, INT64_MAX, ""},
      {INT64_MAX, INT64_MAX, "above the ceiling " + std::to_string(INT64_MAX - kGenerationEpoch)},
      {0, 1700000000, "generation 0 is not a positive number"},
      {-7, 1700000000, "generation -7 is not a positive number"},
      {INT64_MIN, 1700000000, "not a positive number"},
      {1, kGenerationEpoch, "before 2020-01-01T00:00:00Z, when no generation number is allowed"},
      {1, 0, "signed at 1970-01-01T00:00:00Z, before 2020-01-01"},
      {1, -1, "signed at 1969-12-31T23:59:59Z"},
      {1, INT64_MIN, "signed at unix time -9223372036854775808"},
      {5, INT64_MIN, "the signing operator's clock is wrong: set it (NTP)"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(std::to_string(c.generation) + " at " + std::to_string(c.created_at));
    Status st = CheckGenerationNumber(c.generation, c.created_at);
    if (c.want.empty()) {
      EXPECT_TRUE(st.ok()) << st.message();
    } else {
      ASSERT_FALSE(st.ok());
      EXPECT_THAT(st.message(), HasSubstr(c.want));
    }
  }
}

TEST(UnixSecondsText, Table) {
  struct Case {
    std::int64_t s;
    const char* want;
  } cases[] = {
      {0, "1970-01-01T00:00:00Z"},
      {kGenerationEpoch, "2020-01-01T00:00:00Z"},
      {1700000000, "2023-11-14T22:13:20Z"},
      {-1, "1969-12-31T23:59:59Z"},
      {-62167219200, "0000-01-01T00:00:00Z"},
      {-62167219201, "unix time -62167219201"},
      {253402300799, "9999-12-31T23:59:59Z"},
      {253402300800, "unix time 253402300800"},
      {INT64_MAX, "unix time 9223372036854775807"},
      {INT64_MIN, "unix time -9223372036854775808"},
  };
  for (const auto& c : cases) EXPECT_EQ(UnixSecondsText(c.s), c.want) << c.s;
}

// Signing time and the generation-number rule, as the agent checks them.
TEST_F(VerifyTest, SigningTimeTable) {
  constexpr std::int64_t kT = 1700000000;  // 2023-11-14T22:13:20Z
  struct Case {
    const char* name;
    std::int64_t generation, created_at;
    std::int64_t last_applied, last_created_at;
    std::optional<std::int64_t> now;
    std::int64_t skew;
    std::vector<std::string> want;  // empty = accepted
  } cases[] = {
      {"newer number, later time", 12, kT + 5, 11, kT, kT + 5, 300, {}},
      {"equal time, higher number", 12, kT, 11, kT, kT, 300, {}},
      {"nothing accepted yet", 1, kT, 0, 0, kT, 300, {}},
      {"signed earlier than the last accepted",
       12,
       kT - 1,
       11,
       kT,
       kT,
       300,
       {"manifest for web1 generation 12 is signed at 2023-11-14T22:13:19Z, before generation 11 "
        "accepted here, signed at 2023-11-14T22:13:20Z",
        "a controller is replaying an older manifest, or operators' clocks disagree",
        "operators must keep their clocks synchronised"}},
      {"signed before the floor of a fresh agent",
       3,
       kT - 3600,
       0,
       kT,
       kT,
       300,
       {"signed at 2023-11-14T21:13:20Z, before this agent's floor 2023-11-14T22:13:20Z",
        "no generation accepted yet"}},
      {"the steered 1000 released after a fix numbered 1",
       1000,
       kT,
       1,
       kT + 1,
       kT + 60,
       300,
       {"generation 1000 is signed at 2023-11-14T22:13:20Z, before generation 1 accepted here"}},
      {"exactly the skew ahead", 12, kT + 300, 11, kT, kT, 300, {}},
      {"one second beyond the skew",
       12,
       kT + 301,
       11,
       kT,
       kT,
       300,
       {"is signed at 2023-11-14T22:18:21Z, 301 s ahead of this machine's clock "
        "(2023-11-14T22:13:20Z; maxManifestFutureSkew is 300 s)",
        "If this machine's clock is wrong, set it (NTP)"}},
      {"zero skew", 12, kT + 1, 11, kT, kT, 0, {"1 s ahead", "maxManifestFutureSkew is 0 s"}},
      {"no clock: no skew check", 12, kT + 86400 * 365, 11, kT, std::nullopt, 300, {}},
      {"signed at INT64_MAX",
       12,
       INT64_MAX,
       11,
       kT,
       kT,
       300,
       {"signed at unix time 9223372036854775807", "s ahead of this machine's clock"}},
      {"signed at INT64_MAX, clock at INT64_MIN",
       12,
       INT64_MAX,
       11,
       0,
       INT64_MIN,
       300,
       {"18446744073709551615 s ahead", "(unix time -9223372036854775808;"}},
      {"clock at INT64_MAX", 12, kT, 11, kT, INT64_MAX, 300, {}},
      {"created at 0", 12, 0, 11, 0, kT, 300, {"signed at 1970-01-01T00:00:00Z, before 2020"}},
      {"created at -1", 12, -1, 11, 0, kT, 300, {"signed at 1969-12-31T23:59:59Z, before 2020"}},
      {"created at INT64_MIN",
       12,
       INT64_MIN,
       11,
       0,
       kT,
       300,
       {"generation 12: generation 12 is signed at unix time -9223372036854775808"}},
      {"number steered to freeze",
       INT64_MAX - 1,
       kT,
       11,
       kT,
       kT,
       300,
       {"generation 9223372036854775806 is above the ceiling " +
            std::to_string(kT - kGenerationEpoch),
        "looks steered by the controller"}},
      {"number at the ceiling", kT - kGenerationEpoch, kT, 11, kT, kT, 300, {}},
      // The order of checks: a replayed number is named as such even when its time is old too.
      {"old number and old time", 5, kT - 10, 11, kT, kT, 300, {"is not newer than generation 11"}},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    Manifest m = Sample(c.generation);
    m.created_at = c.created_at;
    VerifyContext ctx = Ctx(c.last_applied);
    ctx.last_created_at = c.last_created_at;
    ctx.now_s = c.now;
    ctx.max_future_skew_s = c.skew;
    Result<Manifest> r = Manifest{};
    EXPECT_NO_THROW(r = VerifySignedManifest(Signed(m), ctx, sealed_));
    if (c.want.empty()) {
      EXPECT_TRUE(r.ok()) << r.message();
      continue;
    }
    ASSERT_FALSE(r.ok());
    for (const auto& w : c.want) EXPECT_THAT(r.message(), HasSubstr(w));
  }
}

// No number a controller steers can freeze a machine: whatever was accepted at
// the ceiling, a manifest signed one second later can carry a higher number.
TEST_F(VerifyTest, SteeringToTheCeilingCannotFreeze) {
  for (std::int64_t t :
       {kGenerationEpoch + 1, std::int64_t{1700000000}, std::int64_t{4102444800}}) {
    SCOPED_TRACE(t);
    Manifest at_ceiling = Sample(GenerationCeiling(t));
    at_ceiling.created_at = t;
    VerifyContext ctx = Ctx(0);
    ctx.now_s = t;
    auto first = VerifySignedManifest(Signed(at_ceiling), ctx, sealed_);
    ASSERT_TRUE(first.ok()) << first.message();
    Manifest next = Sample(at_ceiling.generation + 1);
    next.created_at = t + 1;
    ctx.last_applied = first->generation;
    ctx.last_created_at = first->created_at;
    ctx.now_s = t + 1;
    auto second = VerifySignedManifest(Signed(next), ctx, sealed_);
    EXPECT_TRUE(second.ok()) << second.message();
  }
}

TEST(VarsHash, EmptyMeansNoVars) {
  EXPECT_EQ(VarsHash(""), "");
  EXPECT_EQ(VarsHash("abc"),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
}

}  // namespace
}  // namespace muster

namespace muster {
namespace {

TEST(Manifest, WindowScheduleIsSignedAndOptional) {
  Manifest m = Sample();
  const std::string now_text = ManifestToJson(m);
  EXPECT_EQ(now_text.find("schedule"), std::string::npos) << "left out when activating at once";
  m.in_window = true;
  const std::string text = ManifestToJson(m);
  EXPECT_THAT(text, HasSubstr(R"("schedule":"window")"));
  auto back = ParseManifest(text);
  ASSERT_TRUE(back.ok()) << back.message();
  EXPECT_TRUE(back->in_window);
  EXPECT_FALSE(ParseManifest(now_text)->in_window);
  json j = json::parse(now_text);
  j["schedule"] = "now";
  EXPECT_FALSE(ParseManifest(j.dump())->in_window);
  j["schedule"] = "whenever";
  auto bad = ParseManifest(j.dump());
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(bad.message(), HasSubstr("schedule \"whenever\" is unknown"));

  // The signature covers it: a controller that drops (or adds) the schedule
  // breaks the signature.
  InitCrypto();
  SecretKey op = SecretKey::Generate();
  SignedManifest sm = SignManifest(m, op);
  VerifyContext ctx;
  ctx.machine = "web1";
  ctx.trusted_operators = {op.public_key()};
  EXPECT_TRUE(VerifySignedManifest(sm, ctx, "").ok());
  SignedManifest tampered = sm;
  const std::string field = R"(,"schedule":"window")";
  tampered.manifest.erase(tampered.manifest.find(field), field.size());
  ASSERT_TRUE(ParseManifest(tampered.manifest).ok());
  EXPECT_FALSE(VerifySignedManifest(tampered, ctx, "").ok());
}

}  // namespace
}  // namespace muster
