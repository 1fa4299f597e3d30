#include "bench/keys.h"

#include <sodium.h>

#include <cstdio>

namespace muster::bench {

namespace {
std::string SeedOf(const std::string& label) {
  unsigned char seed[crypto_hash_sha256_BYTES];
  crypto_hash_sha256(seed, reinterpret_cast<const unsigned char*>(label.data()), label.size());
  return std::string(reinterpret_cast<const char*>(seed), 32);
}
SecretKey FromLabel(const std::string& label) { return *SecretKey::FromSeed(SeedOf(label)); }
}  // namespace

std::string AgentName(std::uint32_t index) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "bench-%06u", index);
  return buf;
}

SecretKey AgentKey(std::uint32_t index) {
  return FromLabel("muster-bench-agent-v1:" + std::to_string(index));
}

std::string AgentSeed(std::uint32_t index) {
  return SeedOf("muster-bench-agent-v1:" + std::to_string(index));
}

SecretKey OperatorKey() { return FromLabel("muster-bench-operator-v1"); }

}  // namespace muster::bench
