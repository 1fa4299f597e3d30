// Preview requests: "what would this generation change here?", signed by an
// operator like a publish, so that a compromised controller cannot make a
// machine download (or dry-activate) anything no operator asked for.
//
// A preview is a manifest (machine, toplevel, kind, substituters and their
// keys, createdAt; action dry-activate) signed under its own domain,
// "muster-preview-v1\n" + JSON, so a preview can never pass as a deploy nor a
// deploy as a preview. It carries no vars and consumes no generation number:
// instead of the replay floor, an agent accepts it only while it is fresh
// (createdAt within maxAge before, or the future skew after, its clock) and
// only once (PreviewReplayGuard). A controller can therefore withhold a
// preview or deliver it late (refused), never redirect it.
// Pure functions; PreviewReplayGuard is not thread-safe.
#pragma once

#include <cstdint>
#include <deque>
#include <string>
#include <vector>

#include "common/crypto.h"
#include "common/error.h"
#include "common/manifest.h"

namespace muster {

// Signs m as a preview (generation is set to 1 and action to dry-activate:
// neither means anything here).
SignedManifest SignPreview(Manifest m, const SecretKey& key);

struct PreviewVerifyContext {
  std::string machine;
  std::vector<PublicKey> trusted_operators;
  std::int64_t now_s = 0;
  std::int64_t max_age_s = 600;
  std::int64_t max_future_skew_s = 300;
};

// Signature by a trusted operator under the preview domain, this machine,
// action dry-activate, no vars, createdAt fresh. Errors say what to do.
Result<Manifest> VerifyPreview(const SignedManifest& sm, const PreviewVerifyContext& ctx);

// Remembers the signatures of recent previews; Seen is true for a repeat.
class PreviewReplayGuard {
 public:
  explicit PreviewReplayGuard(std::size_t capacity = 256) : capacity_(capacity) {}
  // True when signature was seen before (a replay); otherwise remembers it.
  bool Seen(const std::string& signature);

 private:
  std::size_t capacity_;
  std::deque<std::string> recent_;
};

}  // namespace muster
