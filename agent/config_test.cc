#include "agent/config.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace muster {
namespace {

using ::testing::HasSubstr;

const char* kPin = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

std::string Minimal(const std::string& extra = "") {
  InitCrypto();
  std::string key = SecretKey::Generate().public_key().ToText();
  return std::string(
             R"({"machine":"web1","controllers":["wss://ctl.example:7443"],"controllerPin":")") +
         kPin + R"(","trustedOperatorKeys":[")" + key + "\"]" + extra + "}";
}

TEST(AgentConfig, MinimalHasNixosDefaults) {
  auto c = ParseAgentConfig(Minimal(), "agent.json");
  ASSERT_TRUE(c.ok()) << c.message();
  EXPECT_EQ(c->machine, "web1");
  EXPECT_EQ(c->controllers[0].host, "ctl.example");
  EXPECT_EQ(c->controllers[0].port, 7443);
  EXPECT_EQ(c->controllers[0].path, "/v1/agent");
  EXPECT_EQ(c->vars_dir, "/var/lib/sops-nix");
  EXPECT_EQ(c->profile, "/nix/var/nix/profiles/system");
  EXPECT_EQ(c->current_system, "/run/current-system");
  EXPECT_EQ(c->confirm_timeout, std::chrono::seconds(120));
  EXPECT_EQ(c->backoff_base, std::chrono::seconds(1));
  EXPECT_EQ(c->backoff_cap, std::chrono::seconds(60));
  EXPECT_EQ(c->reboot_policy, "never");
  EXPECT_EQ(c->max_manifest_future_skew, std::chrono::seconds(300));
  EXPECT_EQ(c->FloorPath(), "/var/lib/muster-agent/floor.json");
  EXPECT_EQ(c->max_message_bytes, kDefaultMaxMessageBytes) << "the controller's default too";
}

TEST(AgentConfig, ProvidedMachineKey) {
  auto c = ParseAgentConfig(
      Minimal(
          R"(,"machineKeyFile":"/run/secrets/vars/muster-agent/key","machineKeyCreatedAt":1717200000)"),
      "agent.json");
  ASSERT_TRUE(c.ok()) << c.message();
  EXPECT_EQ(c->KeyPath(), "/run/secrets/vars/muster-agent/key");
  EXPECT_TRUE(c->KeyProvided());
  EXPECT_EQ(c->machine_key_created_at, 1717200000);
  EXPECT_EQ(c->FloorPath(), "/var/lib/muster-agent/floor.json") << "the floor stays in stateDir";

  auto own = ParseAgentConfig(Minimal(), "agent.json");
  ASSERT_TRUE(own.ok());
  EXPECT_EQ(own->KeyPath(), "/var/lib/muster-agent/machine.key");
  EXPECT_FALSE(own->KeyProvided());

  struct {
    std::string extra, error;
  } bad[] = {
      {R"(,"machineKeyFile":"relative/key")", "machineKeyFile"},
      {R"(,"machineKeyFile":"/k","machineKeyCreatedAt":-1)", "unix seconds"},
      {R"(,"machineKeyCreatedAt":5)", "belongs to 'machineKeyFile'"},
      {R"(,"machineKeyFile":"/k","enrollTokenFile":"/t")", "exclude each other"},
  };
  for (const auto& b : bad) {
    auto r = ParseAgentConfig(Minimal(b.extra), "agent.json");
    ASSERT_FALSE(r.ok()) << b.extra;
    EXPECT_THAT(r.message(), HasSubstr(b.error)) << b.extra;
  }
}

TEST(AgentConfig, FullSettings) {
  auto c = ParseAgentConfig(
      Minimal(
          R"(,"stateDir":"/s","varsDir":"/v","confirmTimeout":3.5,"rebootPolicy":"when-required",
        "healthChecks":[{"name":"ssh","command":["/bin/true"],"timeout":2},{"http":"http://127.0.0.1:80/"}],
        "metricsListen":"127.0.0.1:9101","systemdRun":"never","pingInterval":1,"idleTimeout":3,
        "enrollTokenFile":"/run/token","metricsListen":null,"maxManifestFutureSkew":30,
        "maxMessageBytes":2097152,
        "controllerCaFile":"/etc/muster/ca.pem")"),
      "agent.json");
  ASSERT_TRUE(c.ok()) << c.message();
  EXPECT_EQ(c->state_dir, "/s");
  EXPECT_EQ(c->confirm_timeout, std::chrono::milliseconds(3500));
  ASSERT_EQ(c->health_checks.size(), 2u);
  EXPECT_EQ(c->health_checks[0].name, "ssh");
  EXPECT_EQ(c->health_checks[0].timeout, std::chrono::seconds(2));
  EXPECT_EQ(c->health_checks[1].name, "http://127.0.0.1:80/");
  EXPECT_EQ(c->KeyPath(), "/s/machine.key");
  EXPECT_EQ(c->max_manifest_future_skew, std::chrono::seconds(30));
  auto zero = ParseAgentConfig(Minimal(R"(,"maxManifestFutureSkew":0)"), "agent.json");
  ASSERT_TRUE(zero.ok()) << zero.message();
  EXPECT_EQ(zero->max_manifest_future_skew, std::chrono::seconds(0));
  EXPECT_EQ(c->max_message_bytes, 2097152u);
  EXPECT_EQ(c->controller_ca_file, "/etc/muster/ca.pem");
  EXPECT_TRUE(ParseAgentConfig(Minimal(), "agent.json")->controller_ca_file.empty())
      << "pin only by default";
}

struct BadCase {
  std::string json;
  std::string message;
};

TEST(AgentConfig, ErrorsNameTheField) {
  InitCrypto();
  const std::vector<BadCase> cases = {
      {"[]", "expected a JSON object"},
      {"{", "malformed JSON"},
      {Minimal(R"(,"colour":"red")"), "unknown setting 'colour'"},
      {Minimal(R"(,"stateDir":"relative")"), "'stateDir' must be an absolute path"},
      {Minimal(R"(,"controllerCaFile":"ca.pem")"), "'controllerCaFile' must be an absolute path"},
      {Minimal(R"(,"logFile":"agent.log")"), "'logFile' must be an absolute path"},
      {Minimal(R"(,"confirmTimeout":-1)"), "'confirmTimeout' must be a positive number"},
      {Minimal(R"(,"rebootPolicy":"sometimes")"), "\"never\" or \"when-required\""},
      {Minimal(R"(,"healthChecks":[{"command":["true"]}])"), "must be an absolute path"},
      {Minimal(R"(,"healthChecks":[{"command":["/bin/true"],"http":"http://x/"}])"),
       "exactly one of"},
      {Minimal(R"(,"healthChecks":[{"http":"https://x/"}])"), "https is not supported"},
      {Minimal(R"(,"pingInterval":10,"idleTimeout":5)"), "'idleTimeout' must be greater"},
      {Minimal(R"(,"maxManifestFutureSkew":-1)"),
       "setting 'maxManifestFutureSkew': must be a whole number of seconds from 0 to 86400"},
      {Minimal(R"(,"maxManifestFutureSkew":86401)"), "from 0 to 86400"},
      {Minimal(R"(,"maxManifestFutureSkew":1.5)"), "whole number of seconds"},
      {Minimal(R"(,"maxManifestFutureSkew":"300")"), "whole number of seconds"},
      {Minimal(R"(,"maxManifestFutureSkew":1e300)"), "whole number of seconds"},
      {Minimal(R"(,"maxMessageBytes":100)"),
       "setting 'maxMessageBytes': must be a number of bytes from 4096"},
      {Minimal(R"(,"maxMessageBytes":"1M")"), "at least the controller's --max-message-bytes"},
      {R"({"controllers":["wss://x"],"controllerPin":")" + std::string(kPin) +
           R"(","trustedOperatorKeys":["x"]})",
       "ed25519"},
      {R"({"machine":"m","controllers":[],"controllerPin":"x","trustedOperatorKeys":[]})",
       "pin must look like"},
      {R"({"machine":"m","controllers":["http://x"]})", "must start with wss://"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.json);
    auto r = ParseAgentConfig(c.json, "agent.json");
    ASSERT_FALSE(r.ok());
    EXPECT_THAT(r.message(), HasSubstr(c.message));
    EXPECT_THAT(r.message(), HasSubstr("agent.json"));
  }
}

TEST(AgentConfig, RequiredFieldsSayWhatToDo) {
  InitCrypto();
  auto r = ParseAgentConfig(R"({"controllers":["wss://x"]})", "a.json");
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.message(), HasSubstr("'machine'"));
  auto k = SecretKey::Generate().public_key().ToText();
  r = ParseAgentConfig(
      R"({"machine":"m","controllers":["wss://x"],"trustedOperatorKeys":[")" + k + "\"]}",
      "a.json");
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.message(), HasSubstr("muster-controller init"));
  r = ParseAgentConfig(
      R"({"machine":"m","controllers":["wss://x"],"controllerPin":")" + std::string(kPin) + "\"}",
      "a.json");
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.message(), HasSubstr("trustedOperatorKeys"));
}

}  // namespace
}  // namespace muster

namespace muster {
namespace {

TEST(AgentConfig, MaintenanceWindowsAndFreeSpace) {
  auto c = ParseAgentConfig(
      Minimal(R"(,"maintenanceWindows":[{"days":["sat","Sunday"],"start":"02:00","end":"04:30"},)"
              R"({"days":["daily"],"start":"23:00:30","end":"01:00"}],)"
              R"("maintenanceTimeZone":"UTC","minFreeStoreMiB":1024,"bootDir":"/efi",)"
              R"("minFreeBootMiB":16)"),
      "agent.json");
  ASSERT_TRUE(c.ok()) << c.message();
  ASSERT_EQ(c->maintenance_windows.size(), 2u);
  EXPECT_EQ(c->maintenance_windows[0].days, (1u << 6) | 1u);
  EXPECT_EQ(c->maintenance_windows[0].start_s, 7200);
  EXPECT_EQ(c->maintenance_windows[0].end_s, 4 * 3600 + 1800);
  EXPECT_EQ(c->maintenance_windows[0].text, "sat,Sunday 02:00-04:30");
  EXPECT_EQ(c->maintenance_windows[1].days, 0x7fu);
  EXPECT_EQ(c->maintenance_windows[1].start_s, 23 * 3600 + 30);
  EXPECT_EQ(c->min_free_store_bytes, std::int64_t{1024} << 20);
  EXPECT_EQ(c->min_free_boot_bytes, std::int64_t{16} << 20);
  EXPECT_EQ(c->boot_dir, "/efi");
  auto d = ParseAgentConfig(Minimal(), "agent.json");
  ASSERT_TRUE(d.ok());
  EXPECT_TRUE(d->maintenance_windows.empty());
  EXPECT_EQ(d->min_free_store_bytes, std::int64_t{256} << 20);
  EXPECT_EQ(d->store_dir, "/nix/store");

  struct Bad {
    const char* extra;
    const char* says;
  } bad[] = {
      {R"(,"maintenanceWindows":[{"days":["someday"],"start":"02:00","end":"03:00"}])",
       "is not a weekday"},
      {R"(,"maintenanceWindows":[{"days":[],"start":"02:00","end":"03:00"}])", "at least one day"},
      {R"(,"maintenanceWindows":[{"days":["mon"],"start":"2am","end":"03:00"}])",
       "time of day HH:MM"},
      {R"(,"maintenanceWindows":[{"days":["mon"],"start":"25:00","end":"03:00"}])",
       "time of day HH:MM"},
      {R"(,"maintenanceWindows":[{"days":["mon"],"start":"03:00","end":"03:00"}])", "are equal"},
      {R"(,"maintenanceWindows":[{"days":["mon"],"start":"01:00","end":"03:00","tz":"x"}])",
       "unknown window field 'tz'"},
      {R"(,"maintenanceTimeZone":"Mars/Olympus_Mons")", "not in the zone database"},
      {R"(,"maintenanceTimeZone":"../../etc/passwd")", "not in the zone database"},
      {R"(,"minFreeStoreMiB":-1)", "whole number of MiB"},
  };
  for (const auto& b : bad) {
    auto r = ParseAgentConfig(Minimal(b.extra), "agent.json");
    ASSERT_FALSE(r.ok()) << b.extra;
    EXPECT_THAT(r.message(), ::testing::HasSubstr(b.says)) << b.extra;
  }
}

}  // namespace
}  // namespace muster
