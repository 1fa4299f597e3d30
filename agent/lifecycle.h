// The deploy lifecycle as a pure state machine: no I/O, time passed in.
//
//   received → verified → realising → vars-installed → profile-set → activating
//            → confirming → succeeded | rolled-back | failed      (+ unchanged)
//
// The runner (agent.cc) asks NextStep() what to do, performs it, and feeds the
// outcome back with Apply(); it persists the record before every step. Which
// steps apply depends on the manifest's action:
// A manifest with schedule "window" waits after the realise (phase staged)
// until one of the machine's maintenance windows is open; nothing has changed
// yet, so a newer generation arriving meanwhile ends it as failed (superseded).
//   switch       realise, vars, profile, activate, confirm
//   boot         realise, vars, profile, activate            (nothing to confirm)
//   test         realise, vars, activate, confirm            (profile untouched)
//   dry-activate realise, activate                           (changes nothing)
// A failure after anything changed (vars, profile, activation) schedules a
// rollback: vars restored, profile reset and the previous closure re-activated.
#pragma once

#include <cstdint>
#include <string>

#include "agent/state.h"

namespace muster {

enum class Step {
  kNone,  // terminal: nothing to do
  kCheckUnchanged,
  kRealise,
  kAwaitWindow,  // schedule "window": wait (phase staged) until a window opens
  kInstallVars,
  kSetProfile,
  kActivate,
  kConfirm,
  kRollback,
};

std::string_view ToString(Step s);

struct StepOutcome {
  bool ok = false;
  std::string detail;              // what happened, for the operator
  std::int64_t closure_bytes = 0;  // realise
  bool reboot_required = false;    // activate
  bool unchanged = false;          // check-unchanged: closure already active
  // The agent is stopping and the step goes on without it (an activation in
  // its transient unit) or is taken up again after the restart (confirm):
  // Apply leaves the record as it is, so the next agent resumes it.
  bool interrupted = false;
};

struct LifecyclePolicy {
  std::int64_t confirm_timeout_ms = 120000;
};

Step NextStep(const DeployRecord& r);

// Records the outcome of `step` in r (phase, detail, flags, deadlines).
void Apply(DeployRecord& r, Step step, const StepOutcome& o, std::int64_t now_ms,
           const LifecyclePolicy& policy);

// Ends the deploy before `step` could run: failed if nothing was changed yet,
// else a rollback is scheduled (as for a failed step).
void Abandon(DeployRecord& r, const std::string& why, std::int64_t now_ms);

// The phase to persist (and report) just before a step starts.
Phase PhaseBefore(Step step, Phase current);

enum class ConfirmVerdict { kWait, kSucceeded, kRollBack };
// controller_ok: a message was exchanged with the controller after activation.
ConfirmVerdict JudgeConfirm(const DeployRecord& r, bool controller_ok, bool health_ok,
                            std::int64_t now_ms, std::string* why);

// What the agent observed on start-up about an activation it may have missed.
enum class ActivationEvidence {
  kSucceeded,  // the activation wrapper recorded exit status 0
  kFailed,     // it recorded a non-zero status
  kUnknown,    // no record: the activation was cut short or never started
  kRunning,    // still running, and the agent is stopping: decide after the restart
};

// Adjusts a record found in a non-terminal phase when the agent starts.
// active_toplevel is what the current-system link (or profile) points at now.
void Resume(DeployRecord& r, ActivationEvidence evidence, const std::string& active_toplevel,
            const std::string& evidence_detail, std::int64_t now_ms, const LifecyclePolicy& policy);

}  // namespace muster
