// The deploy state machine, driven step by step with scripted outcomes.
#include "agent/lifecycle.h"

#include <gtest/gtest.h>

#include <vector>

namespace muster {
namespace {

DeployRecord Record(Action action, bool vars = false) {
  DeployRecord r;
  r.manifest.machine = "web1";
  r.manifest.generation = 5;
  r.manifest.toplevel = "/nix/store/00000000000000000000000000000000-new";
  r.manifest.action = action;
  r.manifest.vars_hash = vars ? "sha256:abc" : "";
  r.previous_toplevel = "/nix/store/11111111111111111111111111111111-old";
  r.phase = Phase::kVerified;
  return r;
}

// Runs the machine with every step succeeding; returns the steps taken.
std::vector<Step> RunAllOk(DeployRecord& r, const LifecyclePolicy& policy = {}) {
  std::vector<Step> steps;
  for (int i = 0; i < 20; ++i) {
    Step s = NextStep(r);
    if (s == Step::kNone) break;
    steps.push_back(s);
    r.phase = PhaseBefore(s, r.phase);
    StepOutcome o;
    o.ok = true;
    Apply(r, s, o, 1000 + i, policy);
  }
  return steps;
}

struct ActionCase {
  Action action;
  bool vars;
  std::vector<Step> steps;
  Phase final_phase;
};

TEST(Lifecycle, StepsPerAction) {
  const std::vector<ActionCase> cases = {
      {Action::kSwitch,
       true,
       {Step::kCheckUnchanged, Step::kRealise, Step::kInstallVars, Step::kSetProfile,
        Step::kActivate, Step::kConfirm},
       Phase::kSucceeded},
      {Action::kSwitch,
       false,
       {Step::kCheckUnchanged, Step::kRealise, Step::kSetProfile, Step::kActivate, Step::kConfirm},
       Phase::kSucceeded},
      {Action::kBoot,
       true,
       {Step::kCheckUnchanged, Step::kRealise, Step::kInstallVars, Step::kSetProfile,
        Step::kActivate},
       Phase::kSucceeded},
      {Action::kTest,
       true,
       {Step::kCheckUnchanged, Step::kRealise, Step::kInstallVars, Step::kActivate, Step::kConfirm},
       Phase::kSucceeded},
      {Action::kDryActivate,
       true,
       {Step::kCheckUnchanged, Step::kRealise, Step::kActivate},
       Phase::kSucceeded},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(std::string(ToString(c.action)) + (c.vars ? " with vars" : ""));
    DeployRecord r = Record(c.action, c.vars);
    EXPECT_EQ(RunAllOk(r), c.steps);
    EXPECT_EQ(r.phase, c.final_phase);
    EXPECT_GT(r.finished_at, 0);
  }
}

TEST(Lifecycle, BootAndDryActivateSayThereIsNothingToConfirm) {
  DeployRecord boot = Record(Action::kBoot);
  RunAllOk(boot);
  EXPECT_NE(boot.detail.find("nothing to confirm"), std::string::npos) << boot.detail;
  DeployRecord dry = Record(Action::kDryActivate);
  RunAllOk(dry);
  EXPECT_NE(dry.detail.find("nothing was changed"), std::string::npos) << dry.detail;
}

TEST(Lifecycle, UnchangedFinishesAtOnce) {
  DeployRecord r = Record(Action::kSwitch);
  StepOutcome o;
  o.ok = o.unchanged = true;
  o.detail = "already active";
  Apply(r, Step::kCheckUnchanged, o, 10, {});
  EXPECT_EQ(r.phase, Phase::kUnchanged);
  EXPECT_EQ(NextStep(r), Step::kNone);
}

struct FailureCase {
  Step failing;
  Phase final_phase;
  bool rollback;
};

TEST(Lifecycle, FailuresFailOrRollBackDependingOnWhatChanged) {
  const std::vector<FailureCase> cases = {
      {Step::kRealise, Phase::kFailed, false},      // nothing changed yet
      {Step::kInstallVars, Phase::kFailed, false},  // the swap is atomic: nothing changed
      {Step::kSetProfile, Phase::kRolledBack, true}, {Step::kActivate, Phase::kRolledBack, true},
      {Step::kConfirm, Phase::kRolledBack, true},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(std::string(ToString(c.failing)));
    DeployRecord r = Record(Action::kSwitch, true);
    bool rolled = false;
    for (int i = 0; i < 20; ++i) {
      Step s = NextStep(r);
      if (s == Step::kNone) break;
      if (s == Step::kRollback) rolled = true;
      r.phase = PhaseBefore(s, r.phase);
      StepOutcome o;
      o.ok = s != c.failing;
      o.detail = o.ok ? "fine" : "boom";
      Apply(r, s, o, 100 + i, {});
    }
    EXPECT_EQ(r.phase, c.final_phase) << r.detail;
    EXPECT_EQ(rolled, c.rollback);
    EXPECT_NE(r.detail.find("boom"), std::string::npos) << r.detail;
  }
}

TEST(Lifecycle, FailedRollbackIsFailedWithBothReasons) {
  DeployRecord r = Record(Action::kSwitch);
  r.phase = Phase::kActivating;
  Apply(r, Step::kActivate, StepOutcome{false, "unit failed"}, 5, {});
  ASSERT_EQ(NextStep(r), Step::kRollback);
  Apply(r, Step::kRollback, StepOutcome{false, "nothing to roll back to"}, 6, {});
  EXPECT_EQ(r.phase, Phase::kFailed);
  EXPECT_NE(r.detail.find("unit failed"), std::string::npos);
  EXPECT_NE(r.detail.find("nothing to roll back to"), std::string::npos);
}

// SIGTERM during activation or confirmation: the agent stops at once and the
// record stays exactly as persisted, so the next agent resumes it.
TEST(Lifecycle, InterruptedStepLeavesTheRecordForTheNextAgent) {
  for (Step step : {Step::kActivate, Step::kConfirm, Step::kRollback}) {
    DeployRecord r = Record(Action::kSwitch);
    r.phase = PhaseBefore(step, Phase::kProfileSet);
    r.profile_changed = true;
    if (step == Step::kRollback) r.rollback_reason = "health checks failed";
    const std::string before = r.detail;
    StepOutcome o{false, "agent stopping"};
    o.interrupted = true;
    Apply(r, step, o, 7, {});
    EXPECT_EQ(r.phase, PhaseBefore(step, Phase::kProfileSet)) << ToString(step);
    EXPECT_EQ(r.detail, before) << ToString(step);
    EXPECT_EQ(r.activation_started, false) << ToString(step);
    EXPECT_EQ(NextStep(r), step) << "the next agent takes the same step up again";
  }
}

TEST(Lifecycle, ResumeWhileTheActivationStillRunsChangesNothing) {
  DeployRecord r = Record(Action::kSwitch);
  r.phase = Phase::kActivating;
  Resume(r, ActivationEvidence::kRunning, r.previous_toplevel, "", 10, {});
  EXPECT_EQ(r.phase, Phase::kActivating);
  EXPECT_TRUE(r.rollback_reason.empty());
  // Once it finished, the agent that waited for it records the result.
  Resume(r, ActivationEvidence::kSucceeded, r.manifest.toplevel, "", 20, {});
  EXPECT_EQ(r.phase, Phase::kConfirming);
  EXPECT_EQ(r.detail, "activation finished while the agent was down");
}

TEST(Lifecycle, ConfirmVerdicts) {
  DeployRecord r = Record(Action::kSwitch);
  r.confirm_deadline = 1000;
  std::string why;
  EXPECT_EQ(JudgeConfirm(r, true, true, 500, &why), ConfirmVerdict::kSucceeded);
  EXPECT_EQ(JudgeConfirm(r, true, true, 5000, &why), ConfirmVerdict::kSucceeded);
  EXPECT_EQ(JudgeConfirm(r, false, true, 999, &why), ConfirmVerdict::kWait);
  EXPECT_EQ(JudgeConfirm(r, false, true, 1000, &why), ConfirmVerdict::kRollBack);
  EXPECT_NE(why.find("controller could not be reached"), std::string::npos) << why;
  EXPECT_EQ(JudgeConfirm(r, true, false, 1000, &why), ConfirmVerdict::kRollBack);
  EXPECT_NE(why.find("health checks did not pass"), std::string::npos) << why;
  EXPECT_EQ(JudgeConfirm(r, false, false, 1000, &why), ConfirmVerdict::kRollBack);
  EXPECT_NE(why.find("not reached and health checks failing"), std::string::npos) << why;
}

TEST(Lifecycle, ConfirmDeadlineComesFromPolicy) {
  DeployRecord r = Record(Action::kSwitch);
  r.phase = Phase::kActivating;
  LifecyclePolicy p;
  p.confirm_timeout_ms = 7000;
  Apply(r, Step::kActivate, StepOutcome{true, "done"}, 1000, p);
  EXPECT_EQ(r.phase, Phase::kConfirming);
  EXPECT_EQ(r.confirm_deadline, 8000);
}

struct ResumeCase {
  const char* name;
  ActivationEvidence evidence;
  bool active_is_new;
  Phase phase_after;
  bool rollback_due;
};

TEST(Lifecycle, ResumeAfterRestartDuringActivation) {
  const std::vector<ResumeCase> cases = {
      {"wrapper recorded success", ActivationEvidence::kSucceeded, false, Phase::kConfirming,
       false},
      {"wrapper recorded failure", ActivationEvidence::kFailed, true, Phase::kActivating, true},
      {"unknown, new system active", ActivationEvidence::kUnknown, true, Phase::kConfirming, false},
      {"unknown, old system active", ActivationEvidence::kUnknown, false, Phase::kActivating, true},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    DeployRecord r = Record(Action::kSwitch);
    r.realised = r.profile_changed = true;
    r.phase = Phase::kActivating;
    Resume(r, c.evidence, c.active_is_new ? r.manifest.toplevel : r.previous_toplevel, "exit 1", 50,
           {});
    EXPECT_EQ(r.phase, c.phase_after) << r.detail;
    EXPECT_EQ(!r.rollback_reason.empty(), c.rollback_due) << r.detail;
    EXPECT_TRUE(r.activation_started);
  }
}

TEST(Lifecycle, ResumeLeavesOtherPhasesToRepeatTheirStep) {
  DeployRecord r = Record(Action::kSwitch, true);
  r.phase = Phase::kRealising;
  Resume(r, ActivationEvidence::kUnknown, "", "", 10, {});
  EXPECT_EQ(NextStep(r), Step::kRealise);
  r.realised = true;
  r.phase = Phase::kVarsInstalled;
  r.vars_done = true;
  EXPECT_EQ(NextStep(r), Step::kSetProfile);
}

TEST(Lifecycle, ResumeWhileConfirmingExtendsTheWindow) {
  DeployRecord r = Record(Action::kSwitch);
  r.phase = Phase::kConfirming;
  r.confirm_deadline = 100;
  LifecyclePolicy p;
  p.confirm_timeout_ms = 10000;
  Resume(r, ActivationEvidence::kUnknown, "", "", 1000, p);
  EXPECT_EQ(r.confirm_deadline, 6000);
  EXPECT_EQ(NextStep(r), Step::kConfirm);
}

}  // namespace
}  // namespace muster

namespace muster {
namespace {

TEST(Lifecycle, WindowScheduleWaitsAfterTheRealiseAndBeforeAnyChange) {
  DeployRecord r = Record(Action::kSwitch, true);
  r.manifest.in_window = true;
  EXPECT_EQ(RunAllOk(r), (std::vector<Step>{Step::kCheckUnchanged, Step::kRealise,
                                            Step::kAwaitWindow, Step::kInstallVars,
                                            Step::kSetProfile, Step::kActivate, Step::kConfirm}));
  EXPECT_EQ(r.phase, Phase::kSucceeded);
  EXPECT_TRUE(r.window_passed);
  // dry-activate changes nothing: no window to wait for.
  DeployRecord dry = Record(Action::kDryActivate);
  dry.manifest.in_window = true;
  EXPECT_EQ(RunAllOk(dry),
            (std::vector<Step>{Step::kCheckUnchanged, Step::kRealise, Step::kActivate}));
}

TEST(Lifecycle, StagedAndSupersededFailsWithNothingToRollBack) {
  DeployRecord r = Record(Action::kSwitch, true);
  r.manifest.in_window = true;
  r.realised = true;
  r.phase = Phase::kStaged;  // as persisted while waiting; a restart resumes here
  ASSERT_EQ(NextStep(r), Step::kAwaitWindow);
  StepOutcome o;
  o.detail = "superseded by generation 6 while staged; nothing was changed";
  Apply(r, Step::kAwaitWindow, o, 50, {});
  EXPECT_EQ(r.phase, Phase::kFailed);
  EXPECT_TRUE(r.rollback_reason.empty());
  EXPECT_EQ(r.detail, o.detail);
  EXPECT_EQ(NextStep(r), Step::kNone);
}

}  // namespace
}  // namespace muster
