// The generation manifest: what an operator signs and an agent verifies.
//
// The signed bytes are the manifest's JSON text exactly as the CLI produced it;
// it travels as a string so no re-serialisation can change what was signed.
// The signature covers "muster-manifest-v1\n" followed by those bytes.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "common/crypto.h"
#include "common/error.h"

namespace muster {

enum class Action { kSwitch, kBoot, kTest, kDryActivate };
enum class Kind { kAuto, kNixos, kDarwin, kHomeManager, kProfile };

std::string_view ToString(Action a);
std::string_view ToString(Kind k);
std::optional<Action> ParseAction(std::string_view s);
std::optional<Kind> ParseKind(std::string_view s);

struct Manifest {
  std::string machine;
  std::int64_t generation = 0;
  std::string toplevel;  // /nix/store/…
  Kind kind = Kind::kAuto;
  Action action = Action::kSwitch;
  std::vector<std::string> substituters;
  std::vector<std::string> trusted_public_keys;
  std::string vars_hash;  // "" when there are no vars, else "sha256:<hex>" of the ciphertext
  std::int64_t created_at = 0;  // unix seconds
  bool force = false;           // activate even when the closure is already active
  std::string rollout;          // rollout id, "" for a single publish
};

struct SignedManifest {
  std::string manifest;   // exact JSON text that was signed
  std::string signer;     // "ed25519:…" public key of the operator
  std::string signature;  // base64 of the 64-byte Ed25519 signature
};

// Deterministic JSON text for a manifest (sorted keys, no whitespace).
std::string ManifestToJson(const Manifest& m);
// Strict parse: every field present with the right type; store path checked.
Result<Manifest> ParseManifest(std::string_view text);

// Checks that a string is a plausible Nix store path (/nix/store/<32 chars>-<name>).
Status ValidateStorePath(std::string_view path);

SignedManifest SignManifest(const Manifest& m, const SecretKey& key);

// Generation numbers may not exceed a ceiling that grows with signing time
// (one per second since kGenerationEpoch), so that no number a controller
// steers the CLI to can block later updates: a manifest signed later can
// always carry a higher number.
constexpr std::int64_t kGenerationEpoch = 1577836800;  // 2020-01-01T00:00:00Z
std::int64_t GenerationCeiling(std::int64_t created_at_s);  // >= 0, never overflows
// Fails when generation < 1 or above the ceiling for created_at_s.
Status CheckGenerationNumber(std::int64_t generation, std::int64_t created_at_s);

// What the agent needs to decide whether to accept a generation.
struct VerifyContext {
  std::string machine;                        // this agent's machine name
  std::vector<PublicKey> trusted_operators;   // from the agent's configuration
  std::int64_t last_applied = 0;              // highest generation ever accepted
};

// Verifies signature, machine, generation number and vars hash. On failure the
// message names the machine, the generation and what to change.
Result<Manifest> VerifySignedManifest(const SignedManifest& sm, const VerifyContext& ctx,
                                      std::string_view sealed_vars);

std::string VarsHash(std::string_view sealed_vars);  // "sha256:<hex>" or "" when empty

}  // namespace muster
