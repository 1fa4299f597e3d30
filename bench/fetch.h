// Simulated machines fetching a closure from the controller's binary cache at
// once, over the agent protocol: each one a real mutually authenticated TLS
// websocket (the machine's bench key), hello, then `fetch` requests for every
// object of the closure (narinfo, then its NAR in chunks, a window of them in
// flight), as the agent's loopback substituter forwards nix's GETs. Machine 0
// also hashes every NAR it receives (decompressed when it is zstd) and checks
// it against the narinfo's NarHash, so that the figures are about correct bytes.
//
// Blocking: FetchAll returns when every machine fetched everything, one
// failed, or the timeout passed.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

namespace muster::bench {

struct FetchOptions {
  std::string host = "127.0.0.1";
  std::uint16_t port = 0;
  std::string pin;
  std::uint32_t count = 0;          // machines bench-000000 … count-1
  std::vector<std::string> hashes;  // store hashes of the closure's paths
  int threads = 1;
  std::size_t window = 2;  // fetch requests in flight per object (as the agent)
  std::size_t chunk = 1 << 20;
  std::chrono::seconds timeout{600};
};

struct FetchResult {
  std::int64_t start_ns = 0;   // the first machine was welcomed
  std::int64_t end_ns = 0;     // the last machine finished
  std::uint64_t bytes = 0;     // payload bytes received (narinfos and NARs)
  std::uint32_t done = 0;      // machines that fetched every object
  std::uint32_t verified = 0;  // NARs whose NarHash machine 0 checked
  std::string error;           // the first failure
};

FetchResult FetchAll(const FetchOptions& options);

}  // namespace muster::bench
