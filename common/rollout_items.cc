#include "common/rollout_items.h"

#include <cstdint>

namespace muster {

namespace {

void PutLength(std::string& out, std::size_t n) {
  const auto v = static_cast<std::uint32_t>(n);
  out.push_back(static_cast<char>((v >> 24) & 0xff));
  out.push_back(static_cast<char>((v >> 16) & 0xff));
  out.push_back(static_cast<char>((v >> 8) & 0xff));
  out.push_back(static_cast<char>(v & 0xff));
}

// Reads a 4-byte length at *pos; false when fewer than 4 bytes are left.
bool GetLength(std::string_view in, std::size_t* pos, std::size_t* n) {
  if (in.size() - *pos < 4) return false;
  std::uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v = (v << 8) | static_cast<unsigned char>(in[*pos + i]);
  *pos += 4;
  *n = v;
  return true;
}

}  // namespace

void AppendRolloutItem(std::string& out, std::string_view manifest, std::string_view signature,
                       std::string_view vars) {
  out.reserve(out.size() + 8 + manifest.size() + signature.size() + vars.size());
  PutLength(out, manifest.size());
  out.append(manifest);
  out.append(signature);
  PutLength(out, vars.size());
  out.append(vars);
}

Result<std::vector<RolloutItemView>> DecodeRolloutItems(std::string_view payload, std::size_t count,
                                                        std::size_t max_vars_bytes) {
  if (count == 0 || count > kMaxRolloutItems) {
    return Err("a rollout carries 1 to " + std::to_string(kMaxRolloutItems) + " items, not " +
               std::to_string(count));
  }
  // Every item takes at least 72 bytes: refuse a count the payload cannot
  // hold before reserving room for it.
  constexpr std::size_t kMinItem = 8 + kRolloutSignatureBytes;
  if (payload.size() / kMinItem < count) {
    return Err("the rollout's payload (" + std::to_string(payload.size()) +
               " bytes) is too short for " + std::to_string(count) + " items; it was truncated");
  }
  std::vector<RolloutItemView> out;
  out.reserve(count);
  std::size_t pos = 0;
  for (std::size_t i = 0; i < count; ++i) {
    const std::string item = "item " + std::to_string(i + 1) + " of " + std::to_string(count);
    RolloutItemView v;
    std::size_t n = 0;
    if (!GetLength(payload, &pos, &n)) return Err(item + " is truncated (manifest length)");
    if (n == 0 || n > kMaxRolloutManifestBytes) {
      return Err(item + " has a manifest of " + std::to_string(n) + " bytes (1 to " +
                 std::to_string(kMaxRolloutManifestBytes) + " allowed)");
    }
    if (payload.size() - pos < n + kRolloutSignatureBytes) {
      return Err(item + " is truncated (manifest or signature)");
    }
    v.manifest = payload.substr(pos, n);
    pos += n;
    v.signature = payload.substr(pos, kRolloutSignatureBytes);
    pos += kRolloutSignatureBytes;
    if (!GetLength(payload, &pos, &n)) return Err(item + " is truncated (vars length)");
    if (n > max_vars_bytes) {
      return Err(item + " has " + std::to_string(n) + " bytes of sealed vars, more than the " +
                 std::to_string(max_vars_bytes) + " a deploy message may carry");
    }
    if (payload.size() - pos < n) return Err(item + " is truncated (vars)");
    v.vars = payload.substr(pos, n);
    pos += n;
    out.push_back(v);
  }
  if (pos != payload.size()) {
    return Err("the rollout's payload has " + std::to_string(payload.size() - pos) +
               " bytes after its " + std::to_string(count) + " items");
  }
  return out;
}

}  // namespace muster
