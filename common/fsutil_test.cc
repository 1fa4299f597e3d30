#include "common/fsutil.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <map>
#include <set>
#include <string>

#include "common/testutil.h"

namespace muster {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using testing::Slurp;
using testing::Spit;
using testing::TempDir;

std::set<std::string> Entries(const fs::path& dir) {
  std::set<std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) out.insert(e.path().filename().string());
  return out;
}

mode_t ModeOf(const fs::path& p) {
  struct stat st {};
  EXPECT_EQ(::lstat(p.c_str(), &st), 0) << p;
  return st.st_mode & 07777;
}

TEST(WriteFileAtomic, CreatesWithModeAndReplaces) {
  TempDir dir;
  auto path = dir / "state.json";
  struct Case {
    std::string content;
    mode_t mode;
  } cases[] = {
      {"first", 0600},
      {"second, longer content", 0644},
      {"", 0400},
      {std::string(200000, 'z'), 0640},
  };
  for (const auto& c : cases) {
    auto st = WriteFileAtomic(path, c.content, c.mode);
    ASSERT_TRUE(st.ok()) << st.message();
    EXPECT_EQ(Slurp(path), c.content);
    EXPECT_EQ(ModeOf(path), c.mode);
    EXPECT_EQ(Entries(dir.path()), std::set<std::string>{"state.json"}) << "staging file left";
  }
}

TEST(WriteFileExclusive, CreatesOnceAndNeverReplaces) {
  testing::TempDir dir;
  auto path = dir / "f";
  bool existed = true;
  ASSERT_TRUE(WriteFileExclusive(path, "first", 0640, &existed).ok());
  EXPECT_FALSE(existed);
  EXPECT_EQ(testing::Slurp(path), "first");
  struct stat st {};
  ASSERT_EQ(::stat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0640u);
  auto again = WriteFileExclusive(path, "second", 0600, &existed);
  ASSERT_FALSE(again.ok());
  EXPECT_TRUE(existed);
  EXPECT_THAT(again.message(),
              HasSubstr(path.string() + " already exists; refusing to replace it"));
  EXPECT_EQ(testing::Slurp(path), "first");
  int entries = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator(dir.path())) ++entries;
  EXPECT_EQ(entries, 1) << "no staging file left";
  auto missing = WriteFileExclusive(dir / "missing/f", "x", 0600, &existed);
  ASSERT_FALSE(missing.ok());
  EXPECT_FALSE(existed);
  EXPECT_THAT(missing.message(), HasSubstr("cannot create"));
}

TEST(WriteFileAtomic, FailsInMissingDirectoryWithoutLeftovers) {
  TempDir dir;
  auto st = WriteFileAtomic(dir / "missing/file", "x");
  ASSERT_FALSE(st.ok());
  EXPECT_THAT(st.message(), HasSubstr("cannot create"));
  EXPECT_TRUE(Entries(dir.path()).empty());
}

TEST(WriteFileAtomic, RenameOntoDirectoryFailsAndCleansUp) {
  TempDir dir;
  fs::create_directory(dir / "target");
  Spit(dir / "target" / "keep", "k");
  auto st = WriteFileAtomic(dir / "target", "x");
  ASSERT_FALSE(st.ok());
  EXPECT_THAT(st.message(), HasSubstr("cannot rename"));
  EXPECT_EQ(Entries(dir.path()), std::set<std::string>{"target"});
}

TEST(ReadFile, ReadsAndBoundsSize) {
  TempDir dir;
  Spit(dir / "f", std::string(1000, 'a'));
  auto all = ReadFile(dir / "f");
  ASSERT_TRUE(all.ok());
  EXPECT_EQ(all->size(), 1000u);
  EXPECT_TRUE(ReadFile(dir / "f", 1000).ok());
  auto big = ReadFile(dir / "f", 999);
  ASSERT_FALSE(big.ok());
  EXPECT_THAT(big.message(), HasSubstr("larger than 999 bytes"));
  auto missing = ReadFile(dir / "nope");
  ASSERT_FALSE(missing.ok());
  EXPECT_THAT(missing.message(), HasSubstr("cannot open"));
}

TEST(MakeDirs, CreatesNestedWithModeAndIsIdempotent) {
  TempDir dir;
  auto deep = dir / "a/b/c";
  ASSERT_TRUE(MakeDirs(deep, 0700).ok());
  for (const char* p : {"a", "a/b", "a/b/c"}) {
    EXPECT_TRUE(fs::is_directory(dir / p)) << p;
    EXPECT_EQ(ModeOf(dir / p), 0700u) << p;
  }
  EXPECT_TRUE(MakeDirs(deep, 0700).ok());
  EXPECT_TRUE(MakeDirs(fs::path()).ok());
  Spit(dir / "file", "x");
  auto st = MakeDirs(dir / "file/sub");
  ASSERT_FALSE(st.ok());
  EXPECT_THAT(st.message(), HasSubstr("is not a directory"));
}

TEST(StagingPath, BesideTargetHiddenAndUnique) {
  fs::path target = "/var/lib/sops-nix";
  std::set<std::string> seen;
  for (int i = 0; i < 50; ++i) {
    fs::path p = StagingPathFor(target, "new");
    EXPECT_EQ(p.parent_path(), target.parent_path());
    EXPECT_EQ(p.filename().string().rfind(".sops-nix.new-", 0), 0u) << p;
    seen.insert(p.string());
  }
  EXPECT_EQ(seen.size(), 50u);
  EXPECT_EQ(StagingPathFor("relative", "tmp").parent_path(), fs::path("."));
}

void MakeTree(const fs::path& root, const std::map<std::string, std::string>& files) {
  fs::create_directories(root);
  for (const auto& [rel, content] : files) {
    fs::create_directories((root / rel).parent_path());
    Spit(root / rel, content);
  }
}

std::map<std::string, std::string> ReadTree(const fs::path& root) {
  std::map<std::string, std::string> out;
  for (const auto& e : fs::recursive_directory_iterator(root)) {
    if (e.is_regular_file()) out[fs::relative(e.path(), root).string()] = Slurp(e.path());
  }
  return out;
}

TEST(ReplaceDirectoryAtomic, OverExistingDirectory) {
  TempDir dir;
  auto target = dir / "vars";
  MakeTree(target, {{"key.txt", "old"}, {"activation/old-only", "gone"}});
  auto staged = StagingPathFor(target, "new");
  std::map<std::string, std::string> fresh = {{"key.txt", "new"}, {"activation/secret", "s"}};
  MakeTree(staged, fresh);
  auto st = ReplaceDirectoryAtomic(staged, target);
  ASSERT_TRUE(st.ok()) << st.message();
  EXPECT_EQ(ReadTree(target), fresh);
  EXPECT_EQ(Entries(dir.path()), std::set<std::string>{"vars"}) << "old content or staging left";
}

TEST(ReplaceDirectoryAtomic, IntoNewTarget) {
  TempDir dir;
  auto target = dir / "fresh";
  auto staged = StagingPathFor(target, "new");
  MakeTree(staged, {{"a", "1"}});
  auto st = ReplaceDirectoryAtomic(staged, target);
  ASSERT_TRUE(st.ok()) << st.message();
  EXPECT_EQ(ReadTree(target), (std::map<std::string, std::string>{{"a", "1"}}));
  EXPECT_EQ(Entries(dir.path()), std::set<std::string>{"fresh"});
}

TEST(ReplaceDirectoryAtomic, RepeatedSwapsLeaveNothingBehind) {
  TempDir dir;
  auto target = dir / "t";
  for (int i = 0; i < 5; ++i) {
    auto staged = StagingPathFor(target, "new");
    MakeTree(staged, {{"gen", std::to_string(i)}});
    ASSERT_TRUE(ReplaceDirectoryAtomic(staged, target).ok());
    EXPECT_EQ(Slurp(target / "gen"), std::to_string(i));
    EXPECT_EQ(Entries(dir.path()), std::set<std::string>{"t"});
  }
}

TEST(ReplaceDirectoryAtomic, MissingStagedDirectoryFails) {
  TempDir dir;
  auto st = ReplaceDirectoryAtomic(dir / "nope", dir / "target");
  ASSERT_FALSE(st.ok());
  EXPECT_THAT(st.message(), HasSubstr("cannot move"));
  EXPECT_FALSE(fs::exists(dir / "target"));
}

TEST(FsyncPath, FilesDirectoriesAndMissing) {
  TempDir dir;
  Spit(dir / "f", "x");
  EXPECT_TRUE(FsyncPath(dir / "f").ok());
  EXPECT_TRUE(FsyncPath(dir.path()).ok());
  auto st = FsyncPath(dir / "missing");
  ASSERT_FALSE(st.ok());
  EXPECT_THAT(st.message(), HasSubstr("cannot open"));
}

TEST(ReadLink, SymlinkAndNot) {
  TempDir dir;
  ASSERT_EQ(::symlink("/nix/store/abc-system", (dir / "current").c_str()), 0);
  auto t = ReadLink(dir / "current");
  ASSERT_TRUE(t.ok()) << t.message();
  EXPECT_EQ(*t, "/nix/store/abc-system");
  Spit(dir / "plain", "x");
  EXPECT_FALSE(ReadLink(dir / "plain").ok());
  EXPECT_FALSE(ReadLink(dir / "missing").ok());
}

TEST(HumanSize, PicksTheUnit) {
  EXPECT_EQ(HumanSize(0), "0 B");
  EXPECT_EQ(HumanSize(1023), "1023 B");
  EXPECT_EQ(HumanSize(1024), "1.0 KiB");
  EXPECT_EQ(HumanSize(3 << 19), "1.5 MiB");
  EXPECT_EQ(HumanSize(std::int64_t{5} << 30), "5.0 GiB");
}

}  // namespace
}  // namespace muster
