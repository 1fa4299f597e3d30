// The agent's persisted record: what it accepted, where each deploy stands.
//
// Stored as JSON in <stateDir>/state.json (0600), replaced atomically before
// every lifecycle step so that a restarted agent resumes and reports the truth.
// Holds the sealed vars (ciphertext only) of the deploy in progress so that a
// restart can finish installing them. Not thread-safe: owned by one thread.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "common/error.h"
#include "common/manifest.h"
#include "common/phase.h"

namespace muster {

struct DeployRecord {
  SignedManifest signed_manifest;
  Manifest manifest;  // parsed from signed_manifest.manifest
  std::string vars;   // base64 sealed box, "" when none
  Phase phase = Phase::kVerified;
  std::string detail;
  Kind kind = Kind::kProfile;     // detected from the toplevel
  std::string previous_toplevel;  // active before this deploy; rollback target
  bool realised = false;          // the closure is in the local store
  bool window_passed = false;     // schedule "window": a maintenance window was open
  bool vars_done = false;         // the vars step completed
  bool vars_started = false;      // the vars step began (the swap may have happened)
  bool vars_changed = false;      // vars were swapped in (a backup exists)
  bool profile_changed = false;   // the profile was switched to the new toplevel
  bool activation_started = false;
  std::string rollback_reason;   // non-empty: a rollback is due
  std::int64_t received_at = 0;  // unix ms
  std::int64_t activated_at = 0;
  std::int64_t confirm_deadline = 0;
  std::int64_t finished_at = 0;
  std::int64_t closure_bytes = 0;
  bool reboot_required = false;
  std::string activated_boot_id;  // the boot in which the activation finished

  std::int64_t generation() const { return manifest.generation; }
};

struct AgentState {
  std::int64_t last_applied = 0;     // highest generation accepted (verified)
  std::int64_t last_created_at = 0;  // newest createdAt accepted (unix s); absent in old files: 0
  std::optional<DeployRecord> current;
  std::optional<DeployRecord> pending;  // accepted, waiting for the current deploy to end
  std::int64_t last_refused = 0;        // last generation refused, for hello
  std::string last_refused_reason;
};

Result<AgentState> LoadAgentState(const std::string& path);  // missing file: empty state
Status SaveAgentState(const AgentState& s, const std::string& path);

std::string EncodeAgentState(const AgentState& s);
Result<AgentState> DecodeAgentState(std::string_view text);

}  // namespace muster
