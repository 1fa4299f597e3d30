// The items of a rollout in one binary request: 'rollout.create' sent as a
// binary frame (proto::EncodeBinary) whose JSON header carries the rollout's
// settings, the item count and the one operator key that signed every
// manifest, and whose payload is the items back to back:
//
//   [4 bytes: manifest length, big-endian][manifest: the exact signed JSON text]
//   [64 bytes: the raw Ed25519 signature]
//   [4 bytes: sealed vars length, big-endian][sealed vars: the raw sealed box]
//
// No base64 and no JSON DOM of the whole request on either side: the CLI
// appends, the controller slices. Pure functions, thread-compatible.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

#include "common/error.h"

namespace muster {

// Largest number of items in one rollout request.
constexpr std::size_t kMaxRolloutItems = 100000;
// Largest manifest an item may carry (ParseManifest refuses larger ones too).
constexpr std::size_t kMaxRolloutManifestBytes = 64 * 1024;
constexpr std::size_t kRolloutSignatureBytes = 64;

// One item, as slices of the payload it was decoded from (valid while the
// payload is).
struct RolloutItemView {
  std::string_view manifest;
  std::string_view signature;  // 64 raw bytes
  std::string_view vars;       // raw sealed box, empty when none
};

// Appends one item to out. signature must be 64 raw bytes.
void AppendRolloutItem(std::string& out, std::string_view manifest, std::string_view signature,
                       std::string_view vars);

// Slices payload into exactly `count` items (1..kMaxRolloutItems). Refuses a
// payload that is truncated, has bytes after the last item, or holds a
// manifest longer than kMaxRolloutManifestBytes or sealed vars longer than
// max_vars_bytes; the error names the item (1-based) and what was wrong.
Result<std::vector<RolloutItemView>> DecodeRolloutItems(std::string_view payload, std::size_t count,
                                                        std::size_t max_vars_bytes);

}  // namespace muster
