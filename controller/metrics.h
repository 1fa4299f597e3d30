// Plain-HTTP endpoint for Prometheus (/metrics) and liveness (/healthz).
//
// Meant for a loopback or management address; it serves nothing secret.
// RenderMetrics is separate from the server so tests can check the text.
#pragma once

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <memory>
#include <string>

#include "common/http_server.h"
#include "common/url.h"
#include "controller/fleet.h"
#include "controller/server.h"

namespace muster {

std::string RenderMetrics(Fleet& fleet, ServerStats& stats);

class MetricsServer {
 public:
  MetricsServer(boost::asio::io_context& ioc, Fleet& fleet, ServerStats& stats);
  Result<boost::asio::ip::tcp::endpoint> Start(const HostPort& where);
  void Stop();

 private:
  HttpServer http_;
};

}  // namespace muster
