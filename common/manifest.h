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
  std::string vars_hash;        // "" when there are no vars, else "sha256:<hex>" of the ciphertext
  std::int64_t created_at = 0;  // unix seconds
  bool force = false;           // activate even when the closure is already active
  std::string rollout;          // rollout id, "" for a single publish
  // true: realise at once, activate only inside one of the machine's
  // maintenance windows (publish --stage, and rollouts unless --now). Signed
  // like every field, so a controller cannot make a machine activate outside
  // its windows, nor hold it back by claiming one. Encoded as "schedule":
  // "window" and left out when false, so older manifests keep their bytes.
  bool in_window = false;
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

// The generation-number rule, shared by the CLI (before signing) and the agent
// (when verifying). The CLI numbers a generation from what the controller
// reports, so a compromised controller steers the number; capping it by the
// signing time means no steered number can block later updates: a manifest
// signed one second later may always carry a higher number.
constexpr std::int64_t kGenerationEpoch = 1577836800;  // 2020-01-01T00:00:00Z

// The highest generation number a manifest signed at created_at_s (unix
// seconds) may carry: the seconds since kGenerationEpoch, 0 before it. Defined
// for every int64 input (no overflow).
std::int64_t GenerationCeiling(std::int64_t created_at_s);

// Ok when 1 <= generation <= GenerationCeiling(created_at_s); otherwise an
// error saying the number looks steered by the controller (or, when the
// ceiling is 0, that the signer's clock is wrong).
Status CheckGenerationNumber(std::int64_t generation, std::int64_t created_at_s);

// "2024-06-01T00:00:00Z" for unix seconds; "unix time N" outside years 0–9999.
std::string UnixSecondsText(std::int64_t s);

// What the agent needs to decide whether to accept a generation.
struct VerifyContext {
  std::string machine;                       // this agent's machine name
  std::vector<PublicKey> trusted_operators;  // from the agent's configuration
  std::int64_t last_applied = 0;             // highest generation ever accepted
  // createdAt (unix seconds) of the newest manifest accepted, or the floor the
  // agent started from (its key's creation time); 0: none.
  std::int64_t last_created_at = 0;
  // The verifier's clock (unix seconds); unset skips the future-skew check (the
  // controller's early check at publish time has no say in it).
  std::optional<std::int64_t> now_s = std::nullopt;
  std::int64_t max_future_skew_s = 300;  // how far createdAt may be ahead of now_s
};

// Verifies signature, machine, generation number (greater than last_applied
// and within CheckGenerationNumber for its own createdAt), signing time (not
// before last_created_at, not more than max_future_skew_s after now_s) and vars
// hash. On failure the message names the machine, the generation and what to
// change.
Result<Manifest> VerifySignedManifest(const SignedManifest& sm, const VerifyContext& ctx,
                                      std::string_view sealed_vars);

std::string VarsHash(std::string_view sealed_vars);  // "sha256:<hex>" or "" when empty

}  // namespace muster
