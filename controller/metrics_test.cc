#include "controller/metrics.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <memory>
#include <sstream>
#include <string>

#include "controller/test_fakes.h"

namespace muster {
namespace {

using testing::FakeChannel;
using ::testing::HasSubstr;

class MetricsTest : public testing::FleetTest {};

TEST_F(MetricsTest, RendersEveryMetricWithHelpAndType) {
  ASSERT_TRUE(fleet_->AddMachine("db1", mallory_.public_key().ToText(), {}).ok());
  auto ch = std::make_shared<FakeChannel>();
  ASSERT_TRUE(fleet_->AgentHello("web1", MakeHello(), ch).ok());
  ASSERT_TRUE(fleet_->Publish("alice", MakeDeploy(1)).ok());
  proto::StatusReport r;
  r.generation = 1;
  r.phase = "succeeded";
  r.reboot_required = true;
  ASSERT_TRUE(fleet_->AgentStatus("web1", r).ok());

  ServerStats stats;
  stats.connections = 7;
  stats.handshakes_ok = 5;
  stats.sessions_open = 2;
  stats.admission_waits = 4;
  stats.Refuse("unknown-key");
  stats.Refuse("unknown-key");
  stats.Refuse("bad-message");
  stats.read_pauses = 3;
  stats.logs.stored_lines = 40;
  stats.logs.dropped_queue_full = 4;
  stats.logs.dropped_unknown_generation = 9;
  stats.logs.queued_lines = 6;

  std::string text = RenderMetrics(*fleet_, stats);
  std::string lined = "\n" + text;  // every line, the first included, follows a newline
  struct Case {
    const char* name;
    const char* type;
    std::vector<std::string> samples;
  } cases[] = {
      {"muster_agents_connected", "gauge", {"muster_agents_connected 1"}},
      {"muster_machines", "gauge", {"muster_machines 2"}},
      {"muster_machines_by_phase",
       "gauge",
       {"muster_machines_by_phase{phase=\"idle\"} 1",
        "muster_machines_by_phase{phase=\"succeeded\"} 1"}},
      {"muster_machines_reboot_required", "gauge", {"muster_machines_reboot_required 1"}},
      {"muster_connections_total", "counter", {"muster_connections_total 7"}},
      {"muster_handshakes_total", "counter", {"muster_handshakes_total 5"}},
      {"muster_sessions_open", "gauge", {"muster_sessions_open 2"}},
      {"muster_admission_waits_total", "counter", {"muster_admission_waits_total 4"}},
      {"muster_refusals_total",
       "counter",
       {"muster_refusals_total{reason=\"unknown-key\"} 2",
        "muster_refusals_total{reason=\"bad-message\"} 1"}},
      {"muster_log_lines_stored_total", "counter", {"muster_log_lines_stored_total 40"}},
      {"muster_log_lines_dropped_total",
       "counter",
       {"muster_log_lines_dropped_total{reason=\"queue-full\"} 4",
        "muster_log_lines_dropped_total{reason=\"unknown-generation\"} 9",
        "muster_log_lines_dropped_total{reason=\"store-error\"} 0"}},
      {"muster_log_queue_lines", "gauge", {"muster_log_queue_lines 6"}},
      {"muster_agent_read_pauses_total", "counter", {"muster_agent_read_pauses_total 3"}},
      {"muster_webhook_deliveries_queued", "gauge", {"muster_webhook_deliveries_queued 0"}},
      {"muster_publishes_total", "counter", {"muster_publishes_total 1"}},
      {"muster_deploys_sent_total", "counter", {"muster_deploys_sent_total 1"}},
      {"muster_status_reports_total", "counter", {"muster_status_reports_total 1"}},
      {"muster_enrolments_total", "counter", {"muster_enrolments_total 0"}},
      {"muster_revocations_total", "counter", {"muster_revocations_total 0"}},
      {"muster_deploy_duration_seconds",
       "histogram",
       {"muster_deploy_duration_seconds_bucket{le=\"+Inf\"} 1",
        "muster_deploy_duration_seconds_count 1"}},  // the fixture's succeeded deploy
  };
  for (const auto& c : cases) {
    EXPECT_THAT(lined, HasSubstr(std::string("\n# HELP ") + c.name + " ")) << c.name;
    EXPECT_THAT(lined, HasSubstr(std::string("\n# TYPE ") + c.name + " " + c.type + "\n"))
        << c.name;
    for (const auto& s : c.samples) EXPECT_THAT(lined, HasSubstr("\n" + s + "\n")) << s;
  }
  // Exposition format: every line is a comment or "name[{labels}] value".
  std::istringstream lines(text);
  std::string line;
  int samples = 0;
  while (std::getline(lines, line)) {
    if (line.rfind("# ", 0) == 0) continue;
    ++samples;
    EXPECT_EQ(line.rfind("muster_", 0), 0u) << line;
    auto space = line.rfind(' ');
    ASSERT_NE(space, std::string::npos) << line;
    EXPECT_NO_THROW((void)std::stod(line.substr(space + 1))) << line;
  }
  // 14 fleet and server samples, 6 log and pacing samples, 1 webhook queue
  // gauge, 2 enrolment/revocation counters, 13 histogram lines (10 buckets,
  // +Inf, sum, count); no rollouts yet.
  EXPECT_EQ(samples, 36);
  EXPECT_EQ(text.back(), '\n');
}

TEST_F(MetricsTest, EmptyFleetStillRendersTotals) {
  ServerStats stats;
  std::string text = RenderMetrics(*fleet_, stats);
  EXPECT_THAT(text, HasSubstr("\nmuster_agents_connected 0\n"));
  EXPECT_THAT(text, HasSubstr("\nmuster_machines 1\n"));
  EXPECT_THAT(text, HasSubstr("\nmuster_publishes_total 0\n"));
  EXPECT_THAT(text, ::testing::Not(HasSubstr("muster_refusals_total{")));
}

}  // namespace
}  // namespace muster
