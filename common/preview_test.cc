#include "common/preview.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace muster {
namespace {

using ::testing::HasSubstr;

class PreviewTest : public ::testing::Test {
 protected:
  void SetUp() override { InitCrypto(); }
  SecretKey op_ = SecretKey::FromSeed(std::string(32, 'o')).value();
  SecretKey stranger_ = SecretKey::FromSeed(std::string(32, 's')).value();
  Manifest M() {
    Manifest m;
    m.machine = "web1";
    m.generation = 77;
    m.toplevel = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-nixos-system-web1";
    m.kind = Kind::kNixos;
    m.action = Action::kSwitch;
    m.substituters = {"muster:"};
    m.created_at = 1800000000;
    return m;
  }
  PreviewVerifyContext Ctx() { return {"web1", {op_.public_key()}, 1800000010, 600, 300}; }
};

TEST_F(PreviewTest, SignedPreviewVerifies) {
  auto sm = SignPreview(M(), op_);
  auto m = VerifyPreview(sm, Ctx());
  ASSERT_TRUE(m.ok()) << m.message();
  EXPECT_EQ(m->action, Action::kDryActivate);
  EXPECT_EQ(m->toplevel, M().toplevel);
  EXPECT_EQ(m->substituters, std::vector<std::string>{"muster:"});
}

TEST_F(PreviewTest, Refusals) {
  struct Case {
    std::string name;
    SignedManifest sm;
    PreviewVerifyContext ctx;
    const char* says;
  };
  auto ctx = Ctx();
  auto good = SignPreview(M(), op_);
  Manifest other = M();
  other.machine = "db1";
  auto tampered = good;
  tampered.manifest.replace(tampered.manifest.find("web1"), 4, "web2");
  auto old_ctx = ctx;
  old_ctx.now_s = 1800000000 + 601;
  auto early_ctx = ctx;
  early_ctx.now_s = 1800000000 - 301;
  std::vector<Case> cases = {
      {"stranger", SignPreview(M(), stranger_), ctx, "unknown key"},
      {"other machine", SignPreview(other, op_), ctx, "addressed to machine 'db1'"},
      {"tampered", tampered, ctx, "invalid signature"},
      // A deploy manifest is not a preview, even a dry-activate one.
      {"deploy as preview", SignManifest(M(), op_), ctx, "invalid signature"},
      {"stale", good, old_ctx, "older than 600 s"},
      {"future", good, early_ctx, "ahead of this machine's clock"},
  };
  for (const auto& c : cases) {
    auto r = VerifyPreview(c.sm, c.ctx);
    ASSERT_FALSE(r.ok()) << c.name;
    EXPECT_THAT(r.message(), HasSubstr(c.says)) << c.name;
  }
  // And a preview is never a deploy.
  VerifyContext vc;
  vc.machine = "web1";
  vc.trusted_operators = {op_.public_key()};
  auto as_deploy = VerifySignedManifest(good, vc, "");
  ASSERT_FALSE(as_deploy.ok());
  EXPECT_THAT(as_deploy.message(), HasSubstr("invalid signature"));
}

TEST_F(PreviewTest, ReplayGuardRefusesRepeats) {
  PreviewReplayGuard g(2);
  EXPECT_FALSE(g.Seen("a"));
  EXPECT_TRUE(g.Seen("a"));
  EXPECT_FALSE(g.Seen("b"));
  EXPECT_FALSE(g.Seen("c"));  // "a" falls out of a guard of two
  EXPECT_FALSE(g.Seen("a"));
  EXPECT_TRUE(g.Seen("c"));
}

}  // namespace
}  // namespace muster
