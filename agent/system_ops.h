// Everything the lifecycle does to the machine, behind one interface: realise
// with nix, set the profile, activate by kind, inspect links, detect whether a
// reboot is needed. The real implementation (NixSystem) runs programs through a
// ProcessRunner (argv vectors, absolute paths, timeouts); tests substitute a fake.
// Not thread-safe: used by the agent's worker thread only.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "agent/config.h"
#include "agent/disk_space.h"
#include "agent/lifecycle.h"
#include "common/error.h"
#include "common/manifest.h"
#include "common/process.h"

namespace muster {

// How Activate ended: status is its success or failure; left_running means
// the agent is stopping and the activation carries on without it (status Ok).
struct ActivateOutcome {
  Status status;
  bool left_running = false;
};

// Receives output lines: stream is "realise", "activate", "rollback", …
using LineSink = std::function<void(const std::string& stream, const std::string& line)>;

class SystemOps {
 public:
  virtual ~SystemOps() = default;

  // nixos | darwin | home-manager | profile, from marker files in the toplevel.
  virtual Kind DetectKind(const std::string& toplevel) = 0;
  // The store path that is active now (current-system link, else the profile);
  // "" when neither exists.
  virtual std::string ActiveToplevel() = 0;
  // nix-store --realise with the manifest's substituters and keys, --max-jobs 0.
  // Returns the closure size in bytes.
  virtual Result<std::int64_t> Realise(const Manifest& m, const LineSink& sink) = 0;
  // What a Realise of m would fetch (nix-store --realise --dry-run with the
  // same substituters and keys); known is false when nothing is to be fetched.
  virtual Result<FetchEstimate> EstimateFetch(const Manifest& m) = 0;
  // The store paths of path's closure (nix-store --query --requisites).
  virtual Result<std::vector<std::string>> Closure(const std::string& path) = 0;
  // Runs `<toplevel>/bin/switch-to-configuration dry-activate` (it changes
  // nothing) and returns its output (stdout and stderr lines).
  virtual Result<std::string> DryActivate(const std::string& toplevel, const LineSink& sink) = 0;
  // nix-env -p PROFILE --set PATH.
  virtual Status SetProfile(const std::string& toplevel, const LineSink& sink) = 0;
  // Runs the activation for kind/action through the activation wrapper, which
  // records the result under tag so that a restarted agent can learn it (with
  // systemd, in the transient unit muster-activate-<tag>.service). When an
  // activation for tag is still running (started by an agent before a
  // restart), waits for it instead of starting another one. After Interrupt()
  // returns at once with left_running set: the activation goes on without the
  // agent, and ActivationResult(tag) learns its outcome later.
  virtual ActivateOutcome Activate(Kind kind, const std::string& toplevel, Action action,
                                   const std::string& tag, const LineSink& sink) = 0;
  // What the wrapper recorded for tag; waits while an activation still runs
  // (its wrapper holds the lock, or its transient unit is active). After
  // Interrupt() it returns kRunning instead of waiting.
  virtual ActivationEvidence ActivationResult(const std::string& tag, std::string* detail) = 0;
  // Thread-safe: the agent is stopping. A running Activate or ActivationResult
  // returns within a fraction of a second, and later ones do not wait; nothing
  // is killed.
  virtual void Interrupt() = 0;
  // Kernel, initrd or kernel modules of the booted system differ from toplevel's.
  virtual bool RebootRequired(const std::string& toplevel) = 0;
  // Reboots the machine (rebootPolicy = when-required).
  virtual Status Reboot() = 0;
};

std::unique_ptr<SystemOps> MakeNixSystem(const AgentConfig& config, ProcessRunner& runner);

// The activation wrapper (muster-agent --activation-wrapper …): holds lock_path,
// runs argv, copies its output to stdout (ignoring a reader that went away) and
// writes {"exit":N,"signal":S,"detail":…} to result_path atomically. Returns
// the exit status to use for the wrapper process.
int RunActivationWrapper(const std::string& lock_path, const std::string& result_path,
                         const std::vector<std::string>& argv);

}  // namespace muster
