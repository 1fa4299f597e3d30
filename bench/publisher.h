// Fan-out publisher: one operator websocket (/v1/operator) that publishes one
// signed generation to each of many machines, all requests pipelined (or
// paced at a given rate, for the latency of one publish in a steady stream).
//
// Manifests are signed with the bench operator key before the clock starts.
// Blocking: Run returns when every request was answered, the connection ended,
// or the timeout passed.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

namespace muster::bench {

struct PublishOptions {
  std::string host = "127.0.0.1";
  std::uint16_t port = 0;
  std::string pin;
  std::uint32_t count = 0;  // machines 0 … count-1
  std::int64_t generation = 0;
  std::string toplevel;  // /nix/store/…
  std::chrono::seconds timeout{120};
  double rate = 0;  // publishes per second; 0: all at once, pipelined
};

struct PublishResult {
  std::int64_t start_ns = 0;              // first request handed to the socket
  std::vector<std::int64_t> sent_ns;      // per machine, when paced; 0 = all at start_ns
  std::vector<std::int64_t> response_ns;  // per machine; 0 = no response
  std::uint32_t ok = 0;
  std::uint32_t failed = 0;
  std::string error;  // connection failure or first refusal
};

PublishResult PublishAll(const PublishOptions& options);

}  // namespace muster::bench
