// NixSystem pieces that need no nix: kind detection, links, the activation
// wrapper's record, reboot detection.
#include "agent/system_ops.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

namespace muster {
namespace {

namespace fs = std::filesystem;

class SystemOpsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = fs::temp_directory_path() /
            ("muster-ops-" + std::to_string(::getpid()) + "-" +
             ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(root_);
    fs::create_directories(root_ / "run");
    cfg_.state_dir = (root_ / "state").string();
    cfg_.current_system = (root_ / "run/current-system").string();
    cfg_.booted_system = (root_ / "run/booted-system").string();
    cfg_.profile = (root_ / "profiles/system").string();
    fs::create_directories(cfg_.state_dir);
    ops_ = MakeNixSystem(cfg_, runner_);
  }
  void TearDown() override { fs::remove_all(root_); }

  fs::path Toplevel(const std::string& name, const std::string& marker) {
    fs::path p = root_ / name;
    fs::create_directories(p);
    if (!marker.empty()) std::ofstream(p / marker) << "1\n";
    return p;
  }

  AgentConfig cfg_;
  SystemProcessRunner runner_;
  std::unique_ptr<SystemOps> ops_;
  fs::path root_;
};

TEST_F(SystemOpsTest, DetectsKindFromMarkerFiles) {
  EXPECT_EQ(ops_->DetectKind(Toplevel("n", "nixos-version").string()), Kind::kNixos);
  EXPECT_EQ(ops_->DetectKind(Toplevel("d", "darwin-version").string()), Kind::kDarwin);
  EXPECT_EQ(ops_->DetectKind(Toplevel("h", "hm-version").string()), Kind::kHomeManager);
  EXPECT_EQ(ops_->DetectKind(Toplevel("p", "").string()), Kind::kProfile);
}

TEST_F(SystemOpsTest, ActiveToplevelFollowsCurrentSystemThenProfile) {
  EXPECT_EQ(ops_->ActiveToplevel(), "");
  auto a = Toplevel("a", "nixos-version");
  fs::create_directories(root_ / "profiles");
  fs::create_symlink(a, cfg_.profile);
  EXPECT_EQ(ops_->ActiveToplevel(), fs::canonical(a).string());
  auto b = Toplevel("b", "nixos-version");
  fs::create_symlink(b, cfg_.current_system);
  EXPECT_EQ(ops_->ActiveToplevel(), fs::canonical(b).string());
}

TEST_F(SystemOpsTest, ActivationWrapperRecordsTheOutcome) {
  fs::create_directories(cfg_.state_dir + "/activations");
  std::string lock = cfg_.state_dir + "/activations/t.lock";
  std::string ok = cfg_.state_dir + "/activations/ok.result";
  std::string bad = cfg_.state_dir + "/activations/bad.result";
  EXPECT_EQ(RunActivationWrapper(lock, ok, {"/bin/true"}), 0);
  EXPECT_EQ(RunActivationWrapper(lock, bad, {"/bin/sh", "-c", "echo oops >&2; exit 3"}), 3);
  std::string detail;
  // ActivationResult reads "<state>/activations/<tag>.result".
  EXPECT_EQ(ops_->ActivationResult("ok", &detail), ActivationEvidence::kSucceeded);
  EXPECT_EQ(ops_->ActivationResult("bad", &detail), ActivationEvidence::kFailed);
  EXPECT_NE(detail.find("oops"), std::string::npos) << detail;
  EXPECT_EQ(ops_->ActivationResult("never-ran", &detail), ActivationEvidence::kUnknown);
}

TEST_F(SystemOpsTest, RebootRequiredComparesKernelInitrdAndModules) {
  auto k1 = Toplevel("kernel1", "");
  auto k2 = Toplevel("kernel2", "");
  auto make = [&](const std::string& name, const fs::path& kernel) {
    auto t = Toplevel(name, "nixos-version");
    fs::create_symlink(kernel / "bzImage", t / "kernel");
    fs::create_symlink(kernel / "initrd", t / "initrd");
    fs::create_symlink(kernel / "modules", t / "kernel-modules");
    std::ofstream(kernel / "bzImage") << "k";
    std::ofstream(kernel / "initrd") << "i";
    fs::create_directories(kernel / "modules");
    return t;
  };
  auto booted = make("booted", k1);
  auto same = make("same", k1);
  auto other = make("other", k2);
  EXPECT_FALSE(ops_->RebootRequired(same.string())) << "no booted-system link: nothing to compare";
  fs::create_symlink(booted, cfg_.booted_system);
  EXPECT_FALSE(ops_->RebootRequired(same.string()));
  EXPECT_TRUE(ops_->RebootRequired(other.string()));
}

}  // namespace
}  // namespace muster
