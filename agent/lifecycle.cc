#include "agent/lifecycle.h"

#include <algorithm>

namespace muster {

namespace {
bool SetsProfile(Action a) { return a == Action::kSwitch || a == Action::kBoot; }
bool InstallsVars(const DeployRecord& r) {
  return !r.manifest.vars_hash.empty() && r.manifest.action != Action::kDryActivate;
}
bool Confirms(Action a) { return a == Action::kSwitch || a == Action::kTest; }
bool ChangedAnything(const DeployRecord& r) {
  return r.vars_changed || r.profile_changed || r.activation_started;
}

void Finish(DeployRecord& r, Phase p, std::string detail, std::int64_t now) {
  r.phase = p;
  r.detail = std::move(detail);
  r.finished_at = now;
}

void ScheduleRollbackOrFail(DeployRecord& r, const std::string& why, std::int64_t now) {
  if (!ChangedAnything(r)) {
    Finish(r, Phase::kFailed, why, now);
    return;
  }
  r.rollback_reason = why;
  r.detail = why + "; rolling back";
}
}  // namespace

std::string_view ToString(Step s) {
  switch (s) {
    case Step::kNone:
      return "none";
    case Step::kCheckUnchanged:
      return "check-unchanged";
    case Step::kRealise:
      return "realise";
    case Step::kAwaitWindow:
      return "await-window";
    case Step::kInstallVars:
      return "install-vars";
    case Step::kSetProfile:
      return "set-profile";
    case Step::kActivate:
      return "activate";
    case Step::kConfirm:
      return "confirm";
    case Step::kRollback:
      return "rollback";
  }
  return "none";
}

Step NextStep(const DeployRecord& r) {
  if (IsTerminal(r.phase)) return Step::kNone;
  if (!r.rollback_reason.empty()) return Step::kRollback;
  switch (r.phase) {
    case Phase::kIdle:
    case Phase::kReceived:
    case Phase::kVerified:
      return Step::kCheckUnchanged;
    case Phase::kActivating:
      return Step::kActivate;
    case Phase::kConfirming:
      return Step::kConfirm;
    default:
      break;
  }
  if (!r.realised) return Step::kRealise;
  if (r.manifest.in_window && !r.window_passed && r.manifest.action != Action::kDryActivate)
    return Step::kAwaitWindow;
  if (InstallsVars(r) && !r.vars_done) return Step::kInstallVars;
  if (SetsProfile(r.manifest.action) && !r.profile_changed) return Step::kSetProfile;
  return Step::kActivate;
}

void Abandon(DeployRecord& r, const std::string& why, std::int64_t now) {
  if (IsTerminal(r.phase)) return;
  if (!r.rollback_reason.empty()) return;  // already rolling back: let it finish
  ScheduleRollbackOrFail(r, why, now);
}

Phase PhaseBefore(Step step, Phase current) {
  switch (step) {
    case Step::kRealise:
      return Phase::kRealising;
    case Step::kActivate:
      return Phase::kActivating;
    case Step::kConfirm:
      return Phase::kConfirming;
    default:
      return current;
  }
}

void Apply(DeployRecord& r, Step step, const StepOutcome& o, std::int64_t now,
           const LifecyclePolicy& policy) {
  if (o.interrupted) return;  // the next agent resumes from the persisted record
  switch (step) {
    case Step::kNone:
      return;
    case Step::kCheckUnchanged:
      if (o.unchanged) {
        Finish(r, Phase::kUnchanged, o.detail, now);
      } else {
        r.phase = Phase::kRealising;
        r.detail = o.detail;
      }
      return;
    case Step::kRealise:
      if (!o.ok) return Finish(r, Phase::kFailed, o.detail, now);
      r.realised = true;
      r.closure_bytes = o.closure_bytes;
      r.detail = o.detail;
      return;
    case Step::kAwaitWindow:
      if (!o.ok) return Finish(r, Phase::kFailed, o.detail, now);
      r.window_passed = true;
      r.detail = o.detail;
      return;
    case Step::kInstallVars:
      if (!o.ok) return ScheduleRollbackOrFail(r, o.detail, now);
      // An install interrupted after its swap finds the bundle in place
      // ("unchanged") but did change the directory: the old content is kept
      // beside it and a rollback must restore it.
      r.vars_changed = r.vars_changed || !o.unchanged || r.vars_started;
      r.vars_done = true;
      r.phase = Phase::kVarsInstalled;
      r.detail = o.detail;
      return;
    case Step::kSetProfile:
      if (!o.ok) return ScheduleRollbackOrFail(r, o.detail, now);
      r.profile_changed = true;
      r.phase = Phase::kProfileSet;
      r.detail = o.detail;
      return;
    case Step::kActivate:
      r.activation_started = true;
      if (!o.ok) return ScheduleRollbackOrFail(r, o.detail, now);
      r.reboot_required = o.reboot_required;
      r.activated_at = now;
      if (!Confirms(r.manifest.action)) {
        std::string why = r.manifest.action == Action::kBoot
                              ? "boot: the new system becomes active at the next reboot; nothing "
                                "to confirm over the network"
                              : "dry-activate: nothing was changed; nothing to confirm";
        return Finish(r, Phase::kSucceeded, o.detail.empty() ? why : o.detail + "; " + why, now);
      }
      r.phase = Phase::kConfirming;
      r.confirm_deadline = now + policy.confirm_timeout_ms;
      r.detail = o.detail;
      return;
    case Step::kConfirm:
      if (o.ok) return Finish(r, Phase::kSucceeded, o.detail, now);
      return ScheduleRollbackOrFail(r, o.detail, now);
    case Step::kRollback:
      if (o.ok) {
        return Finish(r, Phase::kRolledBack,
                      r.rollback_reason + "; rolled back" +
                          (o.detail.empty() ? std::string() : ": " + o.detail),
                      now);
      }
      return Finish(r, Phase::kFailed, r.rollback_reason + "; rollback failed: " + o.detail, now);
  }
}

ConfirmVerdict JudgeConfirm(const DeployRecord& r, bool controller_ok, bool health_ok,
                            std::int64_t now, std::string* why) {
  if (controller_ok && health_ok) return ConfirmVerdict::kSucceeded;
  if (now < r.confirm_deadline) return ConfirmVerdict::kWait;
  if (why != nullptr) {
    if (!controller_ok && !health_ok) {
      *why = "confirmation timed out: controller not reached and health checks failing";
    } else if (!controller_ok) {
      *why = "confirmation timed out: the controller could not be reached after activation";
    } else {
      *why = "confirmation timed out: health checks did not pass";
    }
  }
  return ConfirmVerdict::kRollBack;
}

void Resume(DeployRecord& r, ActivationEvidence evidence, const std::string& active_toplevel,
            const std::string& evidence_detail, std::int64_t now, const LifecyclePolicy& policy) {
  if (IsTerminal(r.phase) || !r.rollback_reason.empty()) return;
  if (r.phase == Phase::kActivating) {
    StepOutcome o;
    switch (evidence) {
      case ActivationEvidence::kRunning:
        return;  // still running: the record stays as it is, for the next agent
      case ActivationEvidence::kSucceeded:
        o.ok = true;
        o.detail = "activation finished while the agent was down";
        break;
      case ActivationEvidence::kFailed:
        o.ok = false;
        o.detail = "activation failed while the agent was down: " + evidence_detail;
        break;
      case ActivationEvidence::kUnknown:
        if (active_toplevel == r.manifest.toplevel && r.manifest.action != Action::kBoot &&
            r.manifest.action != Action::kDryActivate) {
          o.ok = true;
          o.detail = "agent restarted during activation; the new system is active";
        } else {
          o.ok = false;
          o.detail = "agent restarted during activation and the activation did not complete";
        }
        break;
    }
    Apply(r, Step::kActivate, o, now, policy);
    return;
  }
  if (r.phase == Phase::kConfirming) {
    // The confirmation window restarts: the agent was away, not the system.
    r.confirm_deadline = std::max(r.confirm_deadline, now + policy.confirm_timeout_ms / 2);
  }
}

}  // namespace muster
