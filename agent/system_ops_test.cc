// NixSystem pieces that need no nix: kind detection, links, the activation
// wrapper's record, reboot detection.
#include "agent/system_ops.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/file.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <thread>
#include <vector>

#include "common/testutil.h"

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
  EXPECT_EQ(RunActivationWrapper(lock, ok, {"/bin/sh", "-c", "true"}), 0);
  EXPECT_EQ(RunActivationWrapper(lock, bad, {"/bin/sh", "-c", "echo oops >&2; exit 3"}), 3);
  std::string detail;
  // ActivationResult reads "<state>/activations/<tag>.result".
  EXPECT_EQ(ops_->ActivationResult("ok", &detail), ActivationEvidence::kSucceeded);
  EXPECT_EQ(ops_->ActivationResult("bad", &detail), ActivationEvidence::kFailed);
  EXPECT_NE(detail.find("oops"), std::string::npos) << detail;
  EXPECT_EQ(ops_->ActivationResult("never-ran", &detail), ActivationEvidence::kUnknown);
}

// A wrapper holding the lock stands for an activation the previous agent
// left running in its transient unit.
class HeldLock {
 public:
  explicit HeldLock(const std::string& path) {
    fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    EXPECT_EQ(::flock(fd_, LOCK_EX), 0);
  }
  ~HeldLock() { Release(); }
  void Release() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

 private:
  int fd_ = -1;
};

TEST_F(SystemOpsTest, ActivationResultWaitsForARunningWrapperUntilInterrupted) {
  fs::create_directories(cfg_.state_dir + "/activations");
  HeldLock running(cfg_.state_dir + "/activations/gen3-activate.lock");
  std::thread stop([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    ops_->Interrupt();  // SIGTERM
  });
  auto t0 = std::chrono::steady_clock::now();
  std::string detail;
  EXPECT_EQ(ops_->ActivationResult("gen3-activate", &detail), ActivationEvidence::kRunning);
  auto took = std::chrono::steady_clock::now() - t0;
  stop.join();
  EXPECT_GE(took, std::chrono::milliseconds(250)) << "it waited while the wrapper ran";
  EXPECT_LT(took, std::chrono::seconds(2)) << "and stopped waiting at once when interrupted";
}

TEST_F(SystemOpsTest, ActivationResultReadsTheResultOnceTheWrapperFinished) {
  fs::create_directories(cfg_.state_dir + "/activations");
  HeldLock running(cfg_.state_dir + "/activations/gen4-activate.lock");
  std::thread finish([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    std::ofstream(cfg_.state_dir + "/activations/gen4-activate.result") << R"({"exit":0})";
    running.Release();
  });
  std::string detail;
  EXPECT_EQ(ops_->ActivationResult("gen4-activate", &detail), ActivationEvidence::kSucceeded);
  finish.join();
}

TEST_F(SystemOpsTest, ActivateJoinsAnActivationStillRunningForTheSameTag) {
  // A restart during a rollback: the next agent must not start a second
  // activation (its unit name would collide) but wait for the first one.
  cfg_.systemd_run = "never";
  ops_ = MakeNixSystem(cfg_, runner_);
  auto top = Toplevel("prev", "darwin-version");
  testing::Spit(top / "activate", "#!/bin/sh\nexit 99\n");  // must not run
  fs::permissions(top / "activate", fs::perms::owner_all);
  fs::create_directories(cfg_.state_dir + "/activations");
  HeldLock running(cfg_.state_dir + "/activations/gen5-rollback.lock");
  std::thread finish([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    std::ofstream(cfg_.state_dir + "/activations/gen5-rollback.result")
        << R"({"exit":1,"detail":"exited with status 1: unit sshd failed"})";
    running.Release();
  });
  std::vector<std::string> lines;
  auto a = ops_->Activate(Kind::kDarwin, top.string(), Action::kSwitch, "gen5-rollback",
                          [&](const std::string&, const std::string& l) { lines.push_back(l); });
  finish.join();
  EXPECT_FALSE(a.left_running);
  ASSERT_FALSE(a.status.ok());
  EXPECT_NE(a.status.message().find("unit sshd failed"), std::string::npos) << a.status.message();
  ASSERT_EQ(lines.size(), 1u);
  EXPECT_NE(lines[0].find("still running; waiting for it"), std::string::npos) << lines[0];
}

TEST_F(SystemOpsTest, InterruptedAgentStartsNoActivation) {
  cfg_.systemd_run = "never";
  ops_ = MakeNixSystem(cfg_, runner_);
  auto top = Toplevel("next", "darwin-version");
  testing::Spit(top / "activate", "#!/bin/sh\nexit 0\n");
  ops_->Interrupt();
  auto a = ops_->Activate(Kind::kDarwin, top.string(), Action::kSwitch, "gen6-activate",
                          [](const std::string&, const std::string&) {});
  EXPECT_FALSE(a.status.ok());
  EXPECT_NE(a.status.message().find("stopping"), std::string::npos) << a.status.message();
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
