// Deterministic identities for simulated agents and the bench operator.
//
// Agent i has the Ed25519 seed SHA-256("muster-bench-agent-v1:" + i) and the
// machine name "bench-NNNNNN"; the operator has the seed of "muster-bench-operator-v1".
// The same functions are used by `register` (writing the store) and by the load
// generator, so keys never travel between them. Thread-safe.
#pragma once

#include <cstdint>
#include <string>

#include "common/crypto.h"

namespace muster::bench {

std::string AgentName(std::uint32_t index);
SecretKey AgentKey(std::uint32_t index);
// The 32-byte seed of AgentKey(index), cheaper when only OpenSSL needs the key.
std::string AgentSeed(std::uint32_t index);
SecretKey OperatorKey();
constexpr const char* kOperatorName = "bench-operator";

}  // namespace muster::bench
