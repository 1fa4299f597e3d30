#include "agent/floor.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/time.h>

#include <filesystem>
#include <vector>

#include "common/testutil.h"

namespace muster {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;
using ::testing::Not;

[[maybe_unused]] const bool kCryptoReady = (InitCrypto(), true);

constexpr std::int64_t kT = 1717200000;  // 2024-06-01T00:00:00Z

Floor Load(const std::string& path) {
  auto f = LoadFloor(path);
  EXPECT_TRUE(f.ok()) << f.message();
  EXPECT_TRUE(f.ok() && f->has_value()) << path << " is missing";
  return f.ok() && f->has_value() ? **f : Floor{-1, -1};
}

void SetMtime(const std::string& path, std::int64_t s) {
  struct timeval tv[2] = {{static_cast<time_t>(s), 0}, {static_cast<time_t>(s), 0}};
  ASSERT_EQ(::utimes(path.c_str(), tv), 0) << path;
}

DeployRecord RecordSignedAt(std::int64_t generation, std::int64_t created_at) {
  DeployRecord r;
  r.manifest.machine = "web1";
  r.manifest.generation = generation;
  r.manifest.created_at = created_at;
  return r;
}

TEST(Floor, EncodeDecodeAndRefusals) {
  for (Floor f : {Floor{0, 0}, Floor{12, kT}, Floor{INT64_MAX, INT64_MIN}}) {
    auto back = DecodeFloor(EncodeFloor(f));
    ASSERT_TRUE(back.ok()) << back.message();
    EXPECT_EQ(*back, f);
  }
  EXPECT_EQ(EncodeFloor({3, kT}),
            "{\"format\":1,\"lastApplied\":3,\"lastCreatedAt\":1717200000}\n");
  struct Case {
    const char* text;
    const char* want;
  } cases[] = {
      {"", "malformed JSON"},
      {"{", "malformed JSON"},
      {"[]", "not a floor file of format 1"},
      {R"({"format":2,"lastApplied":1,"lastCreatedAt":1})", "not a floor file of format 1"},
      {R"({"lastApplied":1,"lastCreatedAt":1})", "not a floor file of format 1"},
      {R"({"format":1,"lastApplied":1})", "'lastCreatedAt' (unix seconds) must be"},
      {R"({"format":1,"lastCreatedAt":1})", "'lastApplied' (a generation, >= 0)"},
      {R"({"format":1,"lastApplied":-1,"lastCreatedAt":1})", "'lastApplied' (a generation, >= 0)"},
      {R"({"format":1,"lastApplied":1.5,"lastCreatedAt":1})", "must be integers"},
      {R"({"format":1,"lastApplied":"1","lastCreatedAt":1})", "must be integers"},
      {R"({"format":1,"lastApplied":1,"lastCreatedAt":18446744073709551615})", "must be integers"},
      {R"({"format":1,"lastApplied":1,"lastCreatedAt":[[1]]})", "nesting deeper"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.text);
    auto r = DecodeFloor(c.text);
    ASSERT_FALSE(r.ok());
    EXPECT_THAT(r.message(), HasSubstr(c.want));
  }
}

TEST(Floor, MissingFileIsNoneSavedFileIsPrivateCorruptFileSaysWhatToDo) {
  testing::TempDir dir;
  const std::string path = dir / "floor.json";
  auto none = LoadFloor(path);
  ASSERT_TRUE(none.ok()) << none.message();
  EXPECT_FALSE(none->has_value());
  ASSERT_TRUE(SaveFloor({4, kT}, path).ok());
  struct stat st {};
  ASSERT_EQ(::stat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  EXPECT_EQ(Load(path), (Floor{4, kT}));
  testing::Spit(path, "{\"format\":1,\"lastApp");
  auto bad = LoadFloor(path);
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(
      bad.message(),
      AllOf(HasSubstr(path + ": malformed JSON"), HasSubstr("no older one is accepted again"),
            HasSubstr("move it aside: it is then rebuilt from state.json"),
            HasSubstr(R"({"format":1,"lastApplied":0,"lastCreatedAt":NOW})")));
  EXPECT_FALSE(SaveFloor({1, 1}, (dir / "missing/floor.json").string()).ok());
}

TEST(Floor, MachineKeyAndFloorAreCreatedTogetherOnce) {
  testing::TempDir dir;
  const std::string key_path = dir / "machine.key", floor_path = dir / "floor.json";
  auto key = LoadOrCreateMachineKey(key_path, floor_path, kT);
  ASSERT_TRUE(key.ok()) << key.message();
  EXPECT_EQ(Load(floor_path), (Floor{0, kT}));
  struct stat st {};
  ASSERT_EQ(::stat(floor_path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);

  // Later starts load the key and leave the floor alone.
  ASSERT_TRUE(SaveFloor({7, kT + 50}, floor_path).ok());
  auto again = LoadOrCreateMachineKey(key_path, floor_path, kT + 100);
  ASSERT_TRUE(again.ok()) << again.message();
  EXPECT_EQ(again->public_key(), key->public_key());
  EXPECT_EQ(Load(floor_path), (Floor{7, kT + 50}));

  // A new key (the old one moved aside) never lowers an existing floor.
  std::filesystem::rename(key_path, key_path + ".old");
  auto fresh = LoadOrCreateMachineKey(key_path, floor_path, kT + 200);
  ASSERT_TRUE(fresh.ok()) << fresh.message();
  EXPECT_FALSE(fresh->public_key() == key->public_key());
  EXPECT_EQ(Load(floor_path), (Floor{7, kT + 50}));

  // A key that exists without a floor (an older install) gets none here: the
  // start-up falls back to the key's modification time.
  testing::TempDir old;
  ASSERT_TRUE(LoadOrCreateSecretKey(old / "machine.key").ok());
  ASSERT_TRUE(LoadOrCreateMachineKey(old / "machine.key", old / "floor.json", kT).ok());
  EXPECT_FALSE(std::filesystem::exists(old / "floor.json"));
}

TEST(Floor, FloorOfStateUsesTheRecordsOfStateFilesWithoutLastCreatedAt) {
  AgentState s;
  s.last_applied = 5;
  EXPECT_EQ(FloorOfState(s), (Floor{5, 0}));
  s.current = RecordSignedAt(4, kT);
  EXPECT_EQ(FloorOfState(s), (Floor{5, kT}));
  s.pending = RecordSignedAt(5, kT + 9);
  EXPECT_EQ(FloorOfState(s), (Floor{5, kT + 9}));
  s.last_created_at = kT + 20;
  EXPECT_EQ(FloorOfState(s), (Floor{5, kT + 20}));
}

TEST(Floor, ResolveStartFloorTable) {
  struct Case {
    const char* name;
    std::optional<Floor> file, state;
    std::optional<std::int64_t> key_mtime;
    Floor want;
    bool from_key_time;
    std::string note;
  } cases[] = {
      {"both agree",
       Floor{2, kT},
       Floor{2, kT},
       kT - 99,
       {2, kT},
       false,
       "floor.json and state.json"},
      {"floor ahead (state.json write failed after the floor)",
       Floor{3, kT + 5},
       Floor{2, kT},
       std::nullopt,
       {3, kT + 5},
       false,
       "generation 3, signed at 2024-06-01T00:00:05Z"},
      {"state ahead of the key-time floor",
       Floor{0, kT},
       Floor{4, kT + 60},
       kT,
       {4, kT + 60},
       false,
       "generation 4"},
      {"fields taken separately",
       Floor{9, kT},
       Floor{2, kT + 1},
       std::nullopt,
       {9, kT + 1},
       false,
       ""},
      {"state.json moved aside",
       Floor{2, kT},
       std::nullopt,
       kT - 1000,
       {2, kT},
       false,
       "state.json is absent, so no deploy record was resumed"},
      {"upgrade: no floor.json yet",
       std::nullopt,
       Floor{6, kT},
       kT - 1000,
       {6, kT},
       false,
       "floor.json was missing and is written now"},
      {"neither file: the key's modification time",
       std::nullopt,
       std::nullopt,
       kT,
       {0, kT},
       true,
       "starting from the machine key's modification time 2024-06-01T00:00:00Z as the "
       "signing-time floor"},
      {"nothing at all", std::nullopt, std::nullopt, std::nullopt, {0, 0}, true, "neither"},
      {"a fresh agent's floor",
       Floor{0, kT},
       std::nullopt,
       kT,
       {0, kT},
       false,
       "no generation accepted, signing-time floor 2024-06-01T00:00:00Z"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    StartFloor s = ResolveStartFloor(c.file, c.state, c.key_mtime);
    EXPECT_EQ(s.floor, c.want);
    EXPECT_EQ(s.from_key_time, c.from_key_time);
    EXPECT_THAT(s.note, HasSubstr(c.note));
  }
}

class EstablishFloorTest : public ::testing::Test {
 protected:
  testing::TempDir dir_;
  std::string key_ = dir_ / "machine.key";
  std::string floor_ = dir_ / "floor.json";
  std::string state_ = dir_ / "state.json";

  void SetUp() override {
    ASSERT_TRUE(LoadOrCreateMachineKey(key_, floor_, kT).ok());
    SetMtime(key_, kT);
  }
  EstablishedFloor Establish() {
    auto file = LoadFloor(floor_);
    EXPECT_TRUE(file.ok()) << file.message();
    std::optional<AgentState> state;
    if (std::filesystem::exists(state_)) {
      auto s = LoadAgentState(state_);
      EXPECT_TRUE(s.ok()) << s.message();
      if (s.ok()) state = *s;
    }
    return EstablishFloor(floor_, key_, file.ok() ? *file : std::nullopt, state);
  }
};

// Moving state.json aside (what its error message once suggested) keeps the floor.
TEST_F(EstablishFloorTest, StateMovedAsideKeepsTheFloor) {
  AgentState s;
  s.last_applied = 2;
  s.last_created_at = kT + 100;
  ASSERT_TRUE(SaveFloor({2, kT + 100}, floor_).ok());
  ASSERT_TRUE(SaveAgentState(s, state_).ok());
  std::filesystem::rename(state_, state_ + ".aside");
  EstablishedFloor e = Establish();
  EXPECT_TRUE(e.written.ok()) << e.written.message();
  EXPECT_EQ(e.start.floor, (Floor{2, kT + 100}));
  EXPECT_FALSE(e.start.from_key_time);
  EXPECT_EQ(Load(floor_), (Floor{2, kT + 100}));
}

TEST_F(EstablishFloorTest, BothMovedAsideStartsFromTheKeyTimeAndWritesIt) {
  std::filesystem::rename(floor_, floor_ + ".aside");
  SetMtime(key_, kT + 3600);
  EstablishedFloor e = Establish();
  EXPECT_TRUE(e.start.from_key_time);
  EXPECT_EQ(e.start.floor, (Floor{0, kT + 3600}));
  EXPECT_THAT(e.start.note, HasSubstr("2024-06-01T01:00:00Z"));
  EXPECT_TRUE(e.written.ok()) << e.written.message();
  EXPECT_EQ(Load(floor_), (Floor{0, kT + 3600}));
}

TEST_F(EstablishFloorTest, UpgradeFromStateWithoutFloorOrLastCreatedAt) {
  std::filesystem::remove(floor_);
  testing::Spit(state_, R"({"format":1,"lastApplied":5})");
  AgentState s = *LoadAgentState(state_);
  s.current = RecordSignedAt(5, kT + 7);
  EstablishedFloor e = EstablishFloor(floor_, key_, std::nullopt, s);
  EXPECT_FALSE(e.start.from_key_time);
  EXPECT_EQ(e.start.floor, (Floor{5, kT + 7}));
  EXPECT_TRUE(e.written.ok()) << e.written.message();
  EXPECT_EQ(Load(floor_), (Floor{5, kT + 7}));
}

TEST_F(EstablishFloorTest, FloorBehindTheStateIsRaised) {
  AgentState s;
  s.last_applied = 3;
  s.last_created_at = kT + 30;
  ASSERT_TRUE(SaveAgentState(s, state_).ok());
  EstablishedFloor e = Establish();
  EXPECT_EQ(e.start.floor, (Floor{3, kT + 30}));
  EXPECT_EQ(Load(floor_), (Floor{3, kT + 30}));
}

TEST_F(EstablishFloorTest, AnUnwritableFloorIsReportedNotIgnored) {
  EstablishedFloor e =
      EstablishFloor((dir_ / "gone/floor.json").string(), key_, std::nullopt, std::nullopt);
  EXPECT_EQ(e.start.floor, (Floor{0, kT}));
  ASSERT_FALSE(e.written.ok());
  EXPECT_THAT(e.written.message(), HasSubstr("cannot write the replay floor"));
}

// A key installed by a secret store (clan vars through sops-nix) is rewritten at
// every activation: its modification time is not when it was made, and a
// machine that starts for the first time after a publish must still accept
// what was signed for it. The generator's creation time is the floor instead.
TEST(Floor, ProvidedKeyStartsFromItsDeclaredCreationTimeNotItsMtime) {
  testing::TempDir dir;
  std::string key = dir / "vars-key";
  std::string floor = dir / "floor.json";
  ASSERT_TRUE(SaveSecretKey(SecretKey::Generate(), key).ok());
  SetMtime(key, kT + 3600);  // installed an hour after a publish signed at kT + 60

  EstablishedFloor e =
      EstablishFloor(floor, MachineKeyTime(key, true, kT), std::nullopt, std::nullopt);
  EXPECT_TRUE(e.written.ok()) << e.written.message();
  EXPECT_EQ(e.start.floor, (Floor{0, kT}));
  EXPECT_TRUE(e.start.from_key_time);
  EXPECT_THAT(e.start.note, HasSubstr("machineKeyCreatedAt"));
  EXPECT_EQ(Load(floor), (Floor{0, kT})) << "written at the first start, then it only rises";

  std::string floor2 = dir / "floor2.json";
  EstablishedFloor unknown =
      EstablishFloor(floor2, MachineKeyTime(key, true, 0), std::nullopt, std::nullopt);
  EXPECT_EQ(unknown.start.floor, (Floor{0, 0}));
  EXPECT_THAT(unknown.start.note, HasSubstr("without machineKeyCreatedAt"));

  EstablishedFloor created =
      EstablishFloor(floor2, MachineKeyTime(key, false, 0), std::nullopt, std::nullopt);
  EXPECT_EQ(created.start.floor, (Floor{0, kT + 3600})) << "an agent-created key: its mtime";
}

TEST(Floor, ProvidedKeyIsLoadedNeverCreated) {
  testing::TempDir dir;
  std::string key = dir / "missing";
  auto k = LoadProvidedMachineKey(key);
  ASSERT_FALSE(k.ok());
  EXPECT_THAT(k.message(), AllOf(HasSubstr("machineKeyFile " + key + " does not exist"),
                                 HasSubstr("clan machines update")));
  EXPECT_FALSE(std::filesystem::exists(key));
  ASSERT_TRUE(SaveSecretKey(SecretKey::Generate(), key).ok());
  ::chmod(key.c_str(), 0444);
  auto open = LoadProvidedMachineKey(key);
  ASSERT_FALSE(open.ok());
  EXPECT_THAT(open.message(), HasSubstr("chmod 600"));
  ::chmod(key.c_str(), 0400);  // as clan installs secrets
  EXPECT_TRUE(LoadProvidedMachineKey(key).ok());
}

TEST(Floor, UnreadableStateAdviceSaysWhatIsKeptAndWhatIsSafe) {
  std::string kept = UnreadableStateAdvice("/s/state.json", "/s/floor.json", Floor{2, kT});
  EXPECT_THAT(kept, AllOf(HasSubstr("Moving /s/state.json aside is safe"),
                          HasSubstr("/s/floor.json (generation 2, signed at "
                                    "2024-06-01T00:00:00Z) is kept"),
                          HasSubstr("no older generation is accepted again"),
                          HasSubstr("an interrupted one is not resumed")));
  std::string unsafe = UnreadableStateAdvice("/s/state.json", "/s/floor.json", std::nullopt);
  EXPECT_THAT(unsafe, AllOf(HasSubstr("Do not simply move /s/state.json aside"),
                            HasSubstr("there is no /s/floor.json"),
                            HasSubstr(R"({"format":1,"lastApplied":0,"lastCreatedAt":NOW})"),
                            Not(HasSubstr("is safe"))));
}

}  // namespace
}  // namespace muster
