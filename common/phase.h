// The deploy phases an agent reports, shared by agent, controller and CLI.
#pragma once

#include <optional>
#include <string_view>

namespace muster {

enum class Phase {
  kIdle,           // nothing assigned yet
  kReceived,       // generation arrived, not yet checked
  kVerified,       // signature, machine, number and vars hash are good
  kRefused,        // verification failed; nothing was changed
  kRealising,      // nix-store --realise running
  kStaged,         // realised; waiting for the machine's next maintenance window
  kVarsInstalled,  // vars swapped into place
  kProfileSet,     // profile points at the new toplevel
  kActivating,     // activation running
  kConfirming,     // waiting for controller round-trip and health checks
  kSucceeded,
  kRolledBack,
  kFailed,
  kUnchanged,  // closure already active and not forced
};

std::string_view ToString(Phase p);
std::optional<Phase> ParsePhase(std::string_view s);
// succeeded, rolled-back, failed, unchanged, refused.
bool IsTerminal(Phase p);

}  // namespace muster
