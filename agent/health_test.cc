#include "agent/health.h"

#include <gtest/gtest.h>

#include <boost/asio/ip/tcp.hpp>

namespace muster {
namespace {

class FakeRunner : public ProcessRunner {
 public:
  RunResult Run(const RunOptions& o) override {
    seen.push_back(o.argv[0]);
    RunResult r;
    r.exited = true;
    r.exit_code = o.argv[0] == "/bin/false" ? 1 : 0;
    if (r.exit_code) r.err_tail = "not healthy";
    return r;
  }
  std::vector<std::string> seen;
};

HealthCheck Cmd(const std::string& name, const std::string& prog) {
  HealthCheck h;
  h.name = name;
  h.command = {prog};
  return h;
}

TEST(Health, AllPassingChecksPass) {
  FakeRunner runner;
  auto r = RunHealthChecks({Cmd("a", "/bin/true"), Cmd("b", "/bin/true")}, runner);
  EXPECT_TRUE(r.ok);
  EXPECT_EQ(r.detail, "all 2 health checks passed");
  EXPECT_EQ(runner.seen.size(), 2u);
}

TEST(Health, FirstFailureNamesTheCheck) {
  FakeRunner runner;
  auto r = RunHealthChecks({Cmd("a", "/bin/true"), Cmd("db", "/bin/false"), Cmd("c", "/bin/true")},
                           runner);
  EXPECT_FALSE(r.ok);
  EXPECT_NE(r.detail.find("health check 'db' failed"), std::string::npos) << r.detail;
  EXPECT_NE(r.detail.find("not healthy"), std::string::npos) << r.detail;
  EXPECT_EQ(runner.seen.size(), 2u) << "stops at the first failure";
}

TEST(Health, NoChecksIsHealthy) {
  FakeRunner runner;
  EXPECT_TRUE(RunHealthChecks({}, runner).ok);
}

TEST(Health, HttpToAClosedPortFailsClearly) {
  // Find a port nobody listens on: bind, note it, close.
  boost::asio::io_context ioc;
  boost::asio::ip::tcp::acceptor a(ioc, {boost::asio::ip::make_address("127.0.0.1"), 0});
  auto port = a.local_endpoint().port();
  a.close();
  auto r = HttpGetStatus("http://127.0.0.1:" + std::to_string(port) + "/", std::chrono::seconds(2));
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.message().find("GET http://127.0.0.1:"), std::string::npos) << r.message();
  EXPECT_FALSE(HttpGetStatus("ftp://x/", std::chrono::seconds(1)).ok());
}

}  // namespace
}  // namespace muster
