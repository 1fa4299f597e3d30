// The read-only web dashboard (--http-listen): fleet table, machine pages,
// rollouts, and live updates as server-sent events on /events.
//
// Access: on a loopback address anyone who can reach the port may read it
// (requests must name a loopback or IP-literal Host, which defeats DNS
// rebinding). On any other address every request except /static/* needs an
// operator-issued access token ('muster dashboard token'), presented as
// "Authorization: Bearer TOKEN", as the cookie it sets, or once as ?token=
// (answered with the cookie and a redirect that drops it from the address).
// Tokens are stored as SHA-256 hashes in the store's settings.
//
// Threading: pages are rendered on an I/O thread from the store; each event
// stream is one session on its own strand that the Fleet delivers to.
#pragma once

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "common/error.h"
#include "common/url.h"
#include "controller/fleet.h"
#include "controller/rollout.h"

namespace muster {

struct DashboardOptions {
  std::size_t max_streams = 64;              // open /events streams at once
  std::size_t max_stream_backlog = 4 << 20;  // bytes queued for one slow stream
  std::chrono::seconds keepalive{15};        // comment line sent on idle streams
};

class DashboardServer {
 public:
  DashboardServer(boost::asio::io_context& ioc, Fleet& fleet, RolloutManager* rollouts,
                  DashboardOptions options = {});
  ~DashboardServer();
  // Listens; a non-loopback address turns token checks on.
  Result<boost::asio::ip::tcp::endpoint> Start(const HostPort& where);
  void Stop();

  struct Impl;  // defined in dashboard.cc, shared with its sessions

 private:
  std::shared_ptr<Impl> impl_;
};

// Dashboard access tokens in the store (settings key "dashboard.tokens": a
// JSON list of {hash, by, createdAt}). The CLI makes the token and sends only
// its hash.
Status AddDashboardTokenHash(Store& store, const std::string& sha256_hex, const std::string& by,
                             std::int64_t now);
// Whether token (the secret itself) hashes to a stored hash.
bool DashboardTokenValid(Store& store, std::string_view token);
// Removes every token; returns how many there were.
Result<int> ClearDashboardTokens(Store& store);

}  // namespace muster
