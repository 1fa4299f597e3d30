// The controller's network front: TLS 1.3 websocket listener and sessions.
//
// Endpoints: /v1/agent (machine keys) and /v1/operator (operator keys). Each
// connection is one session on its own strand; handshakes (TCP accept to
// websocket upgrade and, for agents, the hello) must finish within
// handshake_timeout; after that the server pings a peer that has been quiet for
// ping_interval and closes one from which nothing was received for idle_timeout. The websocket
// stream type is instantiated only in server.cc. An agent session that sends more than its
// agent_limits is paced (its reads pause); its log lines go to a LogWriter.
#pragma once

#include <atomic>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ssl/context.hpp>
#include <chrono>
#include <cstddef>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "common/error.h"
#include "common/protocol.h"
#include "common/url.h"
#include "controller/api.h"
#include "controller/fleet.h"
#include "controller/log_writer.h"
#include "controller/rate_limit.h"

namespace muster {

struct ServerOptions {
  std::vector<HostPort> listen;
  std::chrono::milliseconds handshake_timeout{std::chrono::seconds(10)};
  std::chrono::milliseconds ping_interval{std::chrono::seconds(60)};
  std::chrono::milliseconds idle_timeout{std::chrono::seconds(150)};
  std::size_t max_message_bytes = 1 << 20;             // agents and enrolment
  std::size_t max_operator_message_bytes = 64u << 20;  // operators (rollouts over many machines)
  std::size_t max_outbox_bytes = proto::kDefaultMaxOutboxBytes;
  // TLS handshakes processed at once; further connections wait their turn
  // (first come, first served) holding only a socket, at most max_waiting of
  // them for at most admission_timeout each (then they are refused and the
  // agent backs off). handshake_timeout runs from the start of a handshake.
  std::size_t max_handshakes = 1024;
  std::size_t max_waiting = 65536;
  std::chrono::milliseconds admission_timeout{std::chrono::seconds(120)};
  // What one agent session may send; past it, its reads pause (rate_limit.h).
  SessionLimits agent_limits;
  // The queue in front of the log writer thread (log_writer.h).
  LogWriter::Options log_queue;
  // The binary cache agents fetch from (fetch messages); unset: 404s.
  CacheService* cache = nullptr;
};

// Counters for metrics; all monotonic except sessions_open.
struct ServerStats {
  std::atomic<std::uint64_t> connections{0};
  std::atomic<std::uint64_t> handshakes_ok{0};
  std::atomic<std::int64_t> sessions_open{0};
  std::atomic<std::uint64_t> admission_waits{0};  // connections that waited for a slot
  std::atomic<std::uint64_t> read_pauses{0};      // agent sessions paced by their budget
  LogStats logs;
  std::mutex mu;
  std::map<std::string, std::uint64_t> refusals;  // reason → count
  void Refuse(const std::string& reason) {
    std::lock_guard lock(mu);
    ++refusals[reason];
  }
};

class Server {
 public:
  Server(boost::asio::io_context& ioc, Fleet& fleet, Api& api,
         std::shared_ptr<boost::asio::ssl::context> tls, ServerOptions options);
  ~Server();

  // Binds every listen address and starts accepting. Returns the bound
  // endpoints (a port of 0 is replaced by the one the kernel chose).
  Result<std::vector<boost::asio::ip::tcp::endpoint>> Start();
  // Stops accepting; open sessions end when the io_context stops.
  void Stop();

  ServerStats& stats() { return *stats_; }

 private:
  struct Impl;
  std::shared_ptr<Impl> impl_;
  std::shared_ptr<ServerStats> stats_;
};

}  // namespace muster
