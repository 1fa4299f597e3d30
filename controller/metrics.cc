#include "controller/metrics.h"

#include <map>
#include <sstream>

namespace muster {

namespace asio = boost::asio;
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
    << "# HELP muster_admission_waits_total Connections that waited for a handshake slot.\n"
    << "# TYPE muster_admission_waits_total counter\n"
    << "muster_admission_waits_total " << stats.admission_waits.load() << "\n"
    << "# HELP muster_refusals_total Connections refused or closed, by reason.\n"
    << "# TYPE muster_refusals_total counter\n";
  {
    std::lock_guard lock(stats.mu);
    for (const auto& [reason, n] : stats.refusals) {
      o << "muster_refusals_total{reason=\"" << reason << "\"} " << n << "\n";
    }
  }
  if (c.clustered) {
    o << "# HELP muster_notification_lag_seconds Changes committed by another controller: time "
         "from the commit to their reading here (database clock).\n"
      << "# TYPE muster_notification_lag_seconds histogram\n";
    for (std::size_t i = 0; i < std::size(LagHistogram::kBounds); ++i) {
      o << "muster_notification_lag_seconds_bucket{le=\"" << LagHistogram::kBounds[i] << "\"} "
        << c.notification_lag.buckets[i] << "\n";
    }
    o << "muster_notification_lag_seconds_bucket{le=\"+Inf\"} " << c.notification_lag.count << "\n"
      << "muster_notification_lag_seconds_sum " << c.notification_lag.sum << "\n"
      << "muster_notification_lag_seconds_count " << c.notification_lag.count << "\n";
  }
  o << "# HELP muster_log_lines_stored_total Agent log lines stored.\n"
    << "# TYPE muster_log_lines_stored_total counter\n"
    << "muster_log_lines_stored_total " << stats.logs.stored_lines.load() << "\n"
    << "# HELP muster_log_lines_dropped_total Agent log lines dropped, by reason.\n"
    << "# TYPE muster_log_lines_dropped_total counter\n"
    << "muster_log_lines_dropped_total{reason=\"queue-full\"} "
    << stats.logs.dropped_queue_full.load() << "\n"
    << "muster_log_lines_dropped_total{reason=\"unknown-generation\"} "
    << stats.logs.dropped_unknown_generation.load() << "\n"
    << "muster_log_lines_dropped_total{reason=\"store-error\"} "
    << stats.logs.dropped_store_error.load() << "\n"
    << "# HELP muster_log_queue_lines Agent log lines waiting to be stored.\n"
    << "# TYPE muster_log_queue_lines gauge\n"
    << "muster_log_queue_lines " << stats.logs.queued_lines.load() << "\n"
    << "# HELP muster_agent_read_pauses_total Pauses of an agent session's reads because it "
       "sent more than its budget.\n"
    << "# TYPE muster_agent_read_pauses_total counter\n"
    << "muster_agent_read_pauses_total " << stats.read_pauses.load() << "\n";
  o << "# HELP muster_webhook_deliveries_queued Webhook deliveries waiting to be sent or "
       "retried.\n"
    << "# TYPE muster_webhook_deliveries_queued gauge\n"
    << "muster_webhook_deliveries_queued " << fleet.store().QueuedDeliveries() << "\n";
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

MetricsServer::MetricsServer(asio::io_context& ioc, Fleet& fleet, ServerStats& stats)
    : http_(
          ioc,
          [&fleet, &stats](const std::string& path) {
            HttpReply r;
            if (path == "/metrics") {
              r.content_type = "text/plain; version=0.0.4";
              r.body = RenderMetrics(fleet, stats);
            } else if (path == "/healthz") {
              // Unhealthy while the store does not answer: publishes and
              // reports would fail, so a load balancer should look elsewhere.
              if (auto st = fleet.store().Ping(); !st) {
                r.status = 503;
                r.body = st.message() + "\n";
              } else {
                r.body = "ok\n";
              }
            } else {
              r.status = 404;
              r.body = "not found; try /metrics or /healthz\n";
            }
            return r;
          },
          "muster-controller") {}

Result<tcp::endpoint> MetricsServer::Start(const HostPort& where) { return http_.Start(where); }

void MetricsServer::Stop() { http_.Stop(); }

}  // namespace muster
