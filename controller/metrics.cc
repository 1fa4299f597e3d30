#include "controller/metrics.h"

#include <map>
#include <sstream>

#include <boost/asio/strand.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

namespace muster {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;

std::string RenderMetrics(Fleet& fleet, ServerStats& stats) {
  std::ostringstream o;
  auto machines = fleet.store().ListMachines();
  std::map<std::string, int> phases;
  int reboot = 0;
  for (const auto& m : machines) {
    ++phases[m.phase];
    if (m.reboot_required) ++reboot;
  }
  auto c = fleet.counters();
  o << "# HELP muster_agents_connected Agents with an authenticated connection.\n"
    << "# TYPE muster_agents_connected gauge\n"
    << "muster_agents_connected " << fleet.OnlineCount() << "\n"
    << "# HELP muster_machines Registered machines.\n"
    << "# TYPE muster_machines gauge\n"
    << "muster_machines " << machines.size() << "\n"
    << "# HELP muster_machines_by_phase Registered machines by the phase of their last report.\n"
    << "# TYPE muster_machines_by_phase gauge\n";
  for (const auto& [phase, n] : phases) {
    o << "muster_machines_by_phase{phase=\"" << phase << "\"} " << n << "\n";
  }
  o << "# HELP muster_machines_reboot_required Machines that report a reboot is needed.\n"
    << "# TYPE muster_machines_reboot_required gauge\n"
    << "muster_machines_reboot_required " << reboot << "\n"
    << "# HELP muster_connections_total TCP connections accepted.\n"
    << "# TYPE muster_connections_total counter\n"
    << "muster_connections_total " << stats.connections.load() << "\n"
    << "# HELP muster_handshakes_total Completed authenticated handshakes.\n"
    << "# TYPE muster_handshakes_total counter\n"
    << "muster_handshakes_total " << stats.handshakes_ok.load() << "\n"
    << "# HELP muster_sessions_open Open sessions, authenticated or not.\n"
    << "# TYPE muster_sessions_open gauge\n"
    << "muster_sessions_open " << stats.sessions_open.load() << "\n"
    << "# HELP muster_refusals_total Connections refused or closed, by reason.\n"
    << "# TYPE muster_refusals_total counter\n";
  {
    std::lock_guard lock(stats.mu);
    for (const auto& [reason, n] : stats.refusals) {
      o << "muster_refusals_total{reason=\"" << reason << "\"} " << n << "\n";
    }
  }
  o << "# HELP muster_publishes_total Generations published.\n"
    << "# TYPE muster_publishes_total counter\n"
    << "muster_publishes_total " << c.publishes << "\n"
    << "# HELP muster_deploys_sent_total Deploy messages sent to agents.\n"
    << "# TYPE muster_deploys_sent_total counter\n"
    << "muster_deploys_sent_total " << c.deploys_sent << "\n"
    << "# HELP muster_status_reports_total Status reports received from agents.\n"
    << "# TYPE muster_status_reports_total counter\n"
    << "muster_status_reports_total " << c.status_reports << "\n"
    << "# HELP muster_enrolments_total Machines enrolled with a token.\n"
    << "# TYPE muster_enrolments_total counter\n"
    << "muster_enrolments_total " << c.enrolments << "\n"
    << "# HELP muster_revocations_total Machine keys revoked.\n"
    << "# TYPE muster_revocations_total counter\n"
    << "muster_revocations_total " << c.revocations << "\n"
    << "# HELP muster_deploy_duration_seconds Publish to final report, per deploy.\n"
    << "# TYPE muster_deploy_duration_seconds histogram\n";
  for (std::size_t i = 0; i < std::size(DurationHistogram::kBounds); ++i) {
    o << "muster_deploy_duration_seconds_bucket{le=\"" << DurationHistogram::kBounds[i] << "\"} "
      << c.deploy_seconds.buckets[i] << "\n";
  }
  o << "muster_deploy_duration_seconds_bucket{le=\"+Inf\"} " << c.deploy_seconds.count << "\n"
    << "muster_deploy_duration_seconds_sum " << c.deploy_seconds.sum << "\n"
    << "muster_deploy_duration_seconds_count " << c.deploy_seconds.count << "\n"
    << "# HELP muster_rollout_machines Machines of active and recent rollouts by state.\n"
    << "# TYPE muster_rollout_machines gauge\n";
  for (const auto& r : fleet.store().ListRollouts(20)) {
    std::map<std::string, int> by;
    for (const auto& it : fleet.store().ListRolloutItems(r.id)) ++by[it.state];
    for (const auto& [state, n] : by) {
      o << "muster_rollout_machines{rollout=\"" << r.id << "\",rollout_state=\"" << r.state
        << "\",state=\"" << state << "\"} " << n << "\n";
    }
  }
  return o.str();
}

namespace {

class HttpSession : public std::enable_shared_from_this<HttpSession> {
 public:
  HttpSession(tcp::socket s, Fleet& fleet, ServerStats& stats)
      : stream_(std::move(s)), fleet_(fleet), stats_(stats) {}

  void Run() {
    stream_.expires_after(std::chrono::seconds(10));
    http::async_read(stream_, buffer_, req_,
                     [self = shared_from_this()](beast::error_code ec, std::size_t) {
                       if (!ec) self->Respond();
                     });
  }

 private:
  void Respond() {
    auto res = std::make_shared<http::response<http::string_body>>(http::status::ok, req_.version());
    res->set(http::field::server, "muster-controller");
    if (req_.method() != http::verb::get) {
      res->result(http::status::method_not_allowed);
      res->body() = "GET only\n";
    } else if (req_.target() == "/metrics") {
      res->set(http::field::content_type, "text/plain; version=0.0.4");
      res->body() = RenderMetrics(fleet_, stats_);
    } else if (req_.target() == "/healthz") {
      res->set(http::field::content_type, "text/plain");
      res->body() = "ok\n";
    } else {
      res->result(http::status::not_found);
      res->body() = "not found; try /metrics or /healthz\n";
    }
    res->keep_alive(false);
    res->prepare_payload();
    http::async_write(stream_, *res, [self = shared_from_this(), res](beast::error_code, std::size_t) {
      beast::error_code ec;
      self->stream_.socket().shutdown(tcp::socket::shutdown_send, ec);
    });
  }

  beast::tcp_stream stream_;
  beast::flat_buffer buffer_;
  http::request<http::string_body> req_;
  Fleet& fleet_;
  ServerStats& stats_;
};

}  // namespace

struct MetricsServer::Impl : std::enable_shared_from_this<MetricsServer::Impl> {
  Impl(asio::io_context& io, Fleet& f, ServerStats& s)
      : ioc(io), acceptor(asio::make_strand(io)), fleet(f), stats(s) {}
  void Accept() {
    acceptor.async_accept(asio::make_strand(ioc),
                          [self = shared_from_this()](beast::error_code ec, tcp::socket s) {
                            if (ec == asio::error::operation_aborted || !self->acceptor.is_open()) return;
                            if (!ec) std::make_shared<HttpSession>(std::move(s), self->fleet, self->stats)->Run();
                            self->Accept();
                          });
  }
  asio::io_context& ioc;
  tcp::acceptor acceptor;
  Fleet& fleet;
  ServerStats& stats;
};

MetricsServer::MetricsServer(asio::io_context& ioc, Fleet& fleet, ServerStats& stats)
    : impl_(std::make_shared<Impl>(ioc, fleet, stats)) {}

MetricsServer::~MetricsServer() { Stop(); }

Result<tcp::endpoint> MetricsServer::Start(const HostPort& where) {
  beast::error_code ec;
  auto addr = asio::ip::make_address(where.host, ec);
  if (ec) return Err("metrics address '" + where.host + "' is not an IP address");
  tcp::endpoint ep(addr, where.port);
  impl_->acceptor.open(ep.protocol(), ec);
  if (!ec) impl_->acceptor.set_option(asio::socket_base::reuse_address(true), ec);
  if (!ec) impl_->acceptor.bind(ep, ec);
  if (!ec) impl_->acceptor.listen(asio::socket_base::max_listen_connections, ec);
  if (ec) return Err("cannot listen for metrics on " + where.host + ":" + std::to_string(where.port) + ": " + ec.message());
  impl_->Accept();
  return impl_->acceptor.local_endpoint();
}

void MetricsServer::Stop() {
  asio::post(impl_->acceptor.get_executor(), [impl = impl_] {
    beast::error_code ec;
    impl->acceptor.close(ec);
  });
}

}  // namespace muster
