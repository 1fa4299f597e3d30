// Simulated agents: many real TLS 1.3 websocket connections in one process.
//
// Each simulated agent has its own Ed25519 key (bench/keys.h) and speaks the
// agent protocol: hello → welcome; on deploy it verifies the signed manifest with
// VerifySignedManifest exactly as muster-agent does, then reports the phases
// received … succeeded back to back (an immediate fake activation); the
// controller acks each report. It answers pings, pings every ping_interval, and
// after any loss reconnects with the agent's full-jitter backoff (BackoffDelay).
//
// Memory is kept small per agent: no Beast stream, one raw OpenSSL SSL object
// on a non-blocking socket driven by epoll (edge-triggered), buffers that are
// released when empty, certificates kept as DER and loaded per handshake. Agent
// i lives on worker thread i % threads. Sources are spread over 127.0.0.2… so
// that ephemeral ports do not run out.
//
// Threading: Start/SetTarget/Stop and the accessors may be called from any
// thread; the per-agent time arrays are written by the workers (relaxed atomics)
// and are meant to be read once the interesting counter has settled.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common/crypto.h"

namespace muster::bench {

struct SimOptions {
  std::string host = "127.0.0.1";
  std::uint16_t port = 0;
  // A second controller of the same fleet (PostgreSQL): when set, the agents
  // of odd-numbered threads connect here instead (with 2 threads, the odd
  // agents); PortOf tells which.
  std::uint16_t port2 = 0;
  std::string pin;          // controller fingerprint, "sha256:…"
  PublicKey operator_key;   // trusted operator (the bench operator)
  std::uint32_t count = 0;  // agents 0 … count-1
  int threads = 1;
  std::uint32_t max_inflight = 1000;  // concurrent first connection attempts (all threads)
  int source_addresses = 200;         // 127.0.0.2 … 127.0.0.(1+N)
  std::chrono::milliseconds ping_interval{std::chrono::seconds(25)};
  std::chrono::milliseconds idle_timeout{std::chrono::seconds(75)};
  // From the connect to the welcome: the agent's connect (10 s) plus TLS
  // handshake (60 s) timeouts (common/ws_client.h).
  std::chrono::milliseconds handshake_timeout{std::chrono::seconds(70)};
  std::chrono::milliseconds backoff_base{std::chrono::seconds(1)};
  std::chrono::milliseconds backoff_cap{std::chrono::seconds(60)};
  // A deploy's verification (signature, sealed vars) and its reports wait
  // until the thread has read everything that arrived: agents on separate
  // machines do not delay each other's receipt of a deploy, so notification
  // times then measure the controller's push, not this simulator's crypto.
  bool defer_agent_work = false;
};

// Monotonic nanoseconds (CLOCK_MONOTONIC), the clock of every recorded time.
std::int64_t NowNs();

struct SimCounters {
  std::atomic<std::uint64_t> connects{0};     // TCP connection attempts
  std::atomic<std::uint64_t> tcp_ok{0};       // TCP connections established
  std::atomic<std::uint64_t> tls_ok{0};       // TLS handshakes completed
  std::atomic<std::uint64_t> welcomes{0};     // hello answered by welcome
  std::atomic<std::int64_t> open{0};          // currently welcomed connections
  std::atomic<std::uint64_t> disconnects{0};  // welcomed connections lost
  std::atomic<std::uint64_t> deploys{0};      // deploy messages received
  std::atomic<std::uint64_t> verified{0};     // … that passed VerifySignedManifest
  std::atomic<std::uint64_t> refused{0};      // … that did not
  std::atomic<std::uint64_t> reports{0};      // status reports sent
  std::atomic<std::uint64_t> acks{0};         // acks received
  std::atomic<std::uint64_t> final_acks{0};   // acks of a 'succeeded' report
  std::atomic<std::uint64_t> pings_sent{0};
  std::atomic<std::uint64_t> pongs_sent{0};
};

class Simulator {
 public:
  explicit Simulator(SimOptions options);
  ~Simulator();

  void Start();                     // starts the worker threads; nothing connects yet
  void SetTarget(std::uint32_t n);  // agents [0, n) connect (never shrinks)
  void Stop();                      // closes every connection and joins the workers

  // While set, losses and failed attempts are counted as expected, not as errors
  // (the controller is being killed on purpose).
  void ExpectDisconnects(bool on) { expect_disconnects_ = on; }

  const SimCounters& counters() const { return counters_; }
  const SimOptions& options() const { return opts_; }
  // Reasons of unexpected failures (and of expected ones), with counts.
  std::map<std::string, std::uint64_t> Errors() const;
  std::map<std::string, std::uint64_t> ExpectedFailures() const;
  std::uint64_t ErrorCount() const;

  // Per agent: last welcome, last TCP establishment, first receipt of a deploy
  // for the generation being tracked and ack of its 'succeeded' report (ns; 0 = none).
  std::int64_t WelcomeNs(std::uint32_t i) const {
    return welcome_ns_[i].load(std::memory_order_relaxed);
  }
  std::int64_t TcpNs(std::uint32_t i) const { return tcp_ns_[i].load(std::memory_order_relaxed); }
  std::int64_t NotifyNs(std::uint32_t i) const {
    return notify_ns_[i].load(std::memory_order_relaxed);
  }
  std::int64_t AckNs(std::uint32_t i) const { return ack_ns_[i].load(std::memory_order_relaxed); }
  // Ack of the first ('received') report: the controller recorded the receipt.
  std::int64_t ReceivedAckNs(std::uint32_t i) const {
    return received_ack_ns_[i].load(std::memory_order_relaxed);
  }
  // When the 'succeeded' report of a tracked deploy was queued to be sent.
  std::int64_t FinalSentNs(std::uint32_t i) const {
    return final_sent_ns_[i].load(std::memory_order_relaxed);
  }
  std::int64_t AppliedGeneration(std::uint32_t i) const {
    return applied_[i].load(std::memory_order_relaxed);
  }
  // Deploys of this generation or a newer one set NotifyNs/AckNs (earlier ones
  // are ignored there). With 1, any deploy is tracked (the generation numbers a
  // 'muster publish' picks are not known beforehand).
  void TrackGeneration(std::int64_t generation) { tracked_generation_ = generation; }
  bool Tracked(std::int64_t generation) const {
    std::int64_t t = tracked_generation_.load(std::memory_order_relaxed);
    return t != 0 && generation >= t;
  }

 private:
  friend class Worker;
  void RecordFailure(const std::string& reason, bool expected);

  SimOptions opts_;
  SimCounters counters_;
  std::atomic<std::uint32_t> target_{0};
  std::atomic<bool> stop_{false};
  std::atomic<bool> expect_disconnects_{false};
  std::atomic<std::int64_t> tracked_generation_{0};
  std::vector<std::atomic<std::int64_t>> welcome_ns_, tcp_ns_, notify_ns_, ack_ns_,
      received_ack_ns_, final_sent_ns_, applied_;
  mutable std::mutex err_mu_;
  std::map<std::string, std::uint64_t> errors_, expected_;
  std::uint64_t error_count_ = 0;
  std::vector<std::unique_ptr<class Worker>> workers_;
  std::vector<std::thread> threads_;
};

}  // namespace muster::bench
