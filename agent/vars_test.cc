// Installing vars bundles into a temporary target directory.
#include "agent/vars.h"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "common/manifest.h"

namespace muster {
namespace {

namespace fs = std::filesystem;

class VarsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    InitCrypto();
    root_ = fs::temp_directory_path() /
            ("muster-vars-" + std::to_string(::getpid()) + "-" +
             ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(root_);
    fs::create_directories(root_);
    target_ = (root_ / "sops-nix").string();
  }
  void TearDown() override { fs::remove_all(root_); }

  std::string Seal(const VarsBundle& b, std::string* hash) {
    auto sealed = SealTo(key_.public_key(), EncodeVarsBundle(b));
    *hash = VarsHash(*sealed);
    return Base64Encode(*sealed);
  }
  static std::string Slurp(const fs::path& p) {
    std::ifstream f(p);
    return {std::istreambuf_iterator<char>(f), {}};
  }

  SecretKey key_ = SecretKey::Generate();
  fs::path root_;
  std::string target_;
};

TEST_F(VarsTest, InstallsFilesWithModesAndPrivateDirectories) {
  VarsBundle b;
  b.files.push_back({"key.txt", 0400, "root", "root", "AGE-SECRET-KEY-1"});
  b.files.push_back({"activation/web1/token", 0440, "root", "root", "tok"});
  std::string hash;
  auto sealed = Seal(b, &hash);
  auto r = InstallVars(key_, sealed, hash, target_);
  ASSERT_TRUE(r.ok()) << r.message();
  EXPECT_TRUE(r->changed);
  EXPECT_EQ(r->files, 2u);
  EXPECT_EQ(Slurp(fs::path(target_) / "key.txt"), "AGE-SECRET-KEY-1");
  struct stat st {};
  ASSERT_EQ(::stat((target_ + "/activation/web1/token").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0440u);
  ASSERT_EQ(::stat((target_ + "/activation").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0700u);
  ASSERT_EQ(::stat((target_ + "/key.txt").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0400u);
  // Installing the same bundle again changes nothing.
  auto again = InstallVars(key_, sealed, hash, target_);
  ASSERT_TRUE(again.ok());
  EXPECT_FALSE(again->changed);
  // No staging leftovers beside the target.
  for (const auto& e : fs::directory_iterator(root_)) {
    std::string n = e.path().filename().string();
    EXPECT_TRUE(n == "sops-nix" || n == "sops-nix.muster-previous") << n;
  }
}

TEST_F(VarsTest, ReplacesWholeDirectoryAndRestoreBringsTheOldBack) {
  std::string h1, h2;
  VarsBundle one;
  one.files.push_back({"a", 0400, "root", "root", "one"});
  one.files.push_back({"only-in-one", 0400, "root", "root", "x"});
  VarsBundle two;
  two.files.push_back({"a", 0400, "root", "root", "two"});
  ASSERT_TRUE(InstallVars(key_, Seal(one, &h1), h1, target_).ok());
  ASSERT_TRUE(InstallVars(key_, Seal(two, &h2), h2, target_).ok());
  EXPECT_EQ(Slurp(fs::path(target_) / "a"), "two");
  EXPECT_FALSE(fs::exists(fs::path(target_) / "only-in-one"));
  ASSERT_TRUE(RestoreVars(target_).ok());
  EXPECT_EQ(Slurp(fs::path(target_) / "a"), "one");
  EXPECT_TRUE(fs::exists(fs::path(target_) / "only-in-one"));
}

TEST_F(VarsTest, DiscardingThePreviousVarsLeavesOnlyTheCurrentOnes) {
  std::string h1, h2;
  VarsBundle old_key;
  old_key.files.push_back({"key.txt", 0400, "root", "root", "rotated-out"});
  VarsBundle new_key;
  new_key.files.push_back({"key.txt", 0400, "root", "root", "current"});
  ASSERT_TRUE(InstallVars(key_, Seal(old_key, &h1), h1, target_).ok());
  ASSERT_TRUE(InstallVars(key_, Seal(new_key, &h2), h2, target_).ok());
  const fs::path previous = target_ + ".muster-previous";
  ASSERT_EQ(Slurp(previous / "key.txt"), "rotated-out") << "kept while a rollback may need it";
  ASSERT_TRUE(DiscardPreviousVars(target_).ok());
  EXPECT_FALSE(fs::exists(previous));
  EXPECT_EQ(Slurp(fs::path(target_) / "key.txt"), "current");
  EXPECT_TRUE(DiscardPreviousVars(target_).ok()) << "nothing kept: a no-op";
  EXPECT_TRUE(RestoreVars(target_).ok());
  EXPECT_EQ(Slurp(fs::path(target_) / "key.txt"), "current") << "nothing to restore any more";
}

TEST_F(VarsTest, RestoringAFirstInstallLeavesAnEmptyDirectory) {
  std::string h;
  VarsBundle b;
  b.files.push_back({"secret", 0400, "root", "root", "s"});
  ASSERT_TRUE(InstallVars(key_, Seal(b, &h), h, target_).ok());
  ASSERT_TRUE(RestoreVars(target_).ok());
  ASSERT_TRUE(fs::is_directory(target_));
  EXPECT_TRUE(fs::is_empty(target_));
}

TEST_F(VarsTest, RefusesWhatItCannotOpenOrValidate) {
  std::string h;
  VarsBundle b;
  b.files.push_back({"a", 0400, "root", "root", "x"});
  SecretKey other = SecretKey::Generate();
  auto sealed_other = SealTo(other.public_key(), EncodeVarsBundle(b));
  auto r = InstallVars(key_, Base64Encode(*sealed_other), VarsHash(*sealed_other), target_);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.message().find("cannot be opened"), std::string::npos) << r.message();
  EXPECT_FALSE(fs::exists(target_));
  auto bad =
      SealTo(key_.public_key(), R"({"format":1,"files":[{"path":"../etc/passwd","content":""}]})");
  r = InstallVars(key_, Base64Encode(*bad), VarsHash(*bad), target_);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.message().find(".."), std::string::npos) << r.message();
  auto unknown_user =
      SealTo(key_.public_key(),
             R"({"format":1,"files":[{"path":"a","owner":"no-such-user-xyz","content":""}]})");
  r = InstallVars(key_, Base64Encode(*unknown_user), VarsHash(*unknown_user), target_);
  if (::geteuid() == 0) {
    ASSERT_FALSE(r.ok());
    EXPECT_NE(r.message().find("unknown user 'no-such-user-xyz'"), std::string::npos)
        << r.message();
    EXPECT_FALSE(fs::exists(target_)) << "a failed install leaves the target untouched";
  }
}

TEST_F(VarsTest, BundleForAnotherDirectoryIsRefusedBeforeAnythingIsWritten) {
  VarsBundle b;
  b.files.push_back({"secrets.tar.gz", 0400, "root", "root", "tarball"});
  b.target = "/etc/secret-vars";
  std::string hash;
  std::string sealed = Seal(b, &hash);
  auto r = InstallVars(key_, sealed, hash, target_);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.message().find("meant for /etc/secret-vars"), std::string::npos) << r.message();
  EXPECT_NE(r.message().find("set varsDir to /etc/secret-vars"), std::string::npos);
  EXPECT_FALSE(fs::exists(target_));

  b.target = target_ + "/";
  sealed = Seal(b, &hash);
  auto ok = InstallVars(key_, sealed, hash, target_);
  ASSERT_TRUE(ok.ok()) << ok.message();
  EXPECT_EQ(Slurp(fs::path(target_) / "secrets.tar.gz"), "tarball");
  EXPECT_TRUE(CheckVarsTarget(VarsBundle{}, "/anything").ok()) << "no target: the agent's varsDir";
}

}  // namespace
}  // namespace muster
