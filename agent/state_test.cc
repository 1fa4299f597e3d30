#include "agent/state.h"

#include <gtest/gtest.h>
#include <sys/stat.h>

#include <filesystem>

namespace muster {
namespace {

TEST(AgentState, RoundTripsEveryField) {
  InitCrypto();
  SecretKey op = SecretKey::Generate();
  Manifest m;
  m.machine = "web1";
  m.generation = 9;
  m.toplevel = "/nix/store/00000000000000000000000000000000-sys";
  AgentState s;
  s.last_applied = 9;
  s.last_created_at = 1717200000;
  s.last_refused = 12;
  s.last_refused_reason = "unknown key";
  DeployRecord r;
  r.signed_manifest = SignManifest(m, op);
  r.manifest = m;
  r.vars = "c2VhbGVk";
  r.phase = Phase::kConfirming;
  r.detail = "waiting";
  r.kind = Kind::kNixos;
  r.previous_toplevel = "/nix/store/11111111111111111111111111111111-old";
  r.realised = r.vars_done = r.vars_changed = r.profile_changed = r.activation_started = true;
  r.rollback_reason = "";
  r.received_at = 1;
  r.activated_at = 2;
  r.confirm_deadline = 3;
  r.closure_bytes = 1234;
  r.reboot_required = true;
  s.current = r;
  auto back = DecodeAgentState(EncodeAgentState(s));
  ASSERT_TRUE(back.ok()) << back.message();
  EXPECT_EQ(back->last_applied, 9);
  EXPECT_EQ(back->last_created_at, 1717200000);
  EXPECT_EQ(back->last_refused, 12);
  ASSERT_TRUE(back->current.has_value());
  const auto& b = *back->current;
  EXPECT_EQ(b.manifest.toplevel, m.toplevel);
  EXPECT_EQ(b.signed_manifest.signature, r.signed_manifest.signature);
  EXPECT_EQ(b.phase, Phase::kConfirming);
  EXPECT_EQ(b.kind, Kind::kNixos);
  EXPECT_TRUE(b.realised && b.vars_done && b.vars_changed && b.profile_changed &&
              b.activation_started);
  EXPECT_EQ(b.confirm_deadline, 3);
  EXPECT_EQ(b.closure_bytes, 1234);
  EXPECT_TRUE(b.reboot_required);
}

TEST(AgentState, MissingFileIsEmptyAndSavedFileIsPrivate) {
  auto dir =
      std::filesystem::temp_directory_path() / ("muster-state-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  std::string path = (dir / "state.json").string();
  auto empty = LoadAgentState(path);
  ASSERT_TRUE(empty.ok());
  EXPECT_EQ(empty->last_applied, 0);
  AgentState s;
  s.last_applied = 4;
  ASSERT_TRUE(SaveAgentState(s, path).ok());
  struct stat st {};
  ASSERT_EQ(::stat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  EXPECT_EQ(LoadAgentState(path)->last_applied, 4);
  std::filesystem::remove_all(dir);
}

TEST(AgentState, StateWithoutLastCreatedAtStillLoads) {
  auto s = DecodeAgentState(R"({"format":1,"lastApplied":7})");
  ASSERT_TRUE(s.ok()) << s.message();
  EXPECT_EQ(s->last_applied, 7);
  EXPECT_EQ(s->last_created_at, 0);
}

TEST(AgentState, DetailsCutInsideACharacterStillSave) {
  // A detail or refusal reason holding a cut character must not make saving
  // throw (the agent aborted, and resumed into the same abort).
  AgentState s;
  s.last_refused = 3;
  s.last_refused_reason = "public key 'ed25519:\xE2\x82";
  std::string text;
  ASSERT_NO_THROW(text = EncodeAgentState(s));
  auto back = DecodeAgentState(text);
  ASSERT_TRUE(back.ok()) << back.message();
  EXPECT_EQ(back->last_refused_reason, "public key 'ed25519:\xEF\xBF\xBD");
}

TEST(AgentState, CorruptStateIsAnErrorNotAReset) {
  for (const char* text : {"", "{", R"({"format":2,"lastApplied":1})", R"({"format":1})",
                           R"({"format":1,"lastApplied":1,"current":{"manifest":"{}"}})"}) {
    SCOPED_TRACE(text);
    EXPECT_FALSE(DecodeAgentState(text).ok());
  }
}

}  // namespace
}  // namespace muster
