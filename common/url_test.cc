#include "common/url.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <string>

namespace muster {
namespace {

using ::testing::HasSubstr;

TEST(ParseWsUrl, Accepts) {
  struct Case {
    std::string url;
    std::string host;
    std::uint16_t port;
    std::string path;
    std::string text;  // ToString()
  } cases[] = {
      {"wss://ctl.example.org", "ctl.example.org", 443, "/v1/agent",
       "wss://ctl.example.org:443/v1/agent"},
      {"wss://ctl.example.org/", "ctl.example.org", 443, "/v1/agent",
       "wss://ctl.example.org:443/v1/agent"},
      {"wss://ctl:7443", "ctl", 7443, "/v1/agent", "wss://ctl:7443/v1/agent"},
      {"wss://ctl:7443/custom/path", "ctl", 7443, "/custom/path", "wss://ctl:7443/custom/path"},
      {"wss://10.0.0.1:1", "10.0.0.1", 1, "/v1/agent", "wss://10.0.0.1:1/v1/agent"},
      {"wss://[fd00::1]:7443", "fd00::1", 7443, "/v1/agent", "wss://[fd00::1]:7443/v1/agent"},
      {"wss://[fd00::1]", "fd00::1", 443, "/v1/agent", "wss://[fd00::1]:443/v1/agent"},
      {"wss://[fd7a:115c:a1e0::1]:65535/x", "fd7a:115c:a1e0::1", 65535, "/x",
       "wss://[fd7a:115c:a1e0::1]:65535/x"},
      {"wss://[::1]:0", "::1", 0, "/v1/agent", "wss://[::1]:0/v1/agent"},
  };
  for (const auto& c : cases) {
    auto r = ParseWsUrl(c.url, "/v1/agent");
    ASSERT_TRUE(r.ok()) << c.url << ": " << r.message();
    EXPECT_EQ(r->host, c.host) << c.url;
    EXPECT_EQ(r->port, c.port) << c.url;
    EXPECT_EQ(r->path, c.path) << c.url;
    EXPECT_EQ(r->ToString(), c.text) << c.url;
    // ToString output parses back to the same URL.
    auto again = ParseWsUrl(r->ToString(), "/other");
    ASSERT_TRUE(again.ok()) << again.message();
    EXPECT_EQ(again->ToString(), c.text);
  }
}

TEST(ParseWsUrl, Refuses) {
  struct Case {
    std::string url;
    std::string want;
  } cases[] = {
      {"ws://ctl:7443", "must start with wss://"},
      {"https://ctl", "must start with wss://"},
      {"WSS://ctl", "must start with wss://"},
      {"ctl:7443", "must start with wss://"},
      {"", "must start with wss://"},
      {"wss://", "has no host"},
      {"wss:///v1/agent", "has no host"},
      {"wss://:7443", "has no host"},
      {"wss://[]:7443", "has no host"},
      {"wss://fd00::1", "put IPv6 addresses in brackets, e.g. [::1]:7443"},
      {"wss://fd00::1:7443/x", "put IPv6 addresses in brackets"},
      {"wss://[fd00::1:7443", "has an unclosed '['"},
      {"wss://[fd00::1]7443", "is malformed"},
      {"wss://ctl:", "has an invalid port ''"},
      {"wss://ctl:abc", "has an invalid port 'abc'"},
      {"wss://ctl:65536", "has an invalid port '65536'"},
      {"wss://ctl:-1", "has an invalid port '-1'"},
      {"wss://ctl:80x", "has an invalid port '80x'"},
      {"wss://ctl:99999999999999999999", "has an invalid port"},
  };
  for (const auto& c : cases) {
    auto r = ParseWsUrl(c.url, "/v1/agent");
    ASSERT_FALSE(r.ok()) << c.url;
    EXPECT_THAT(r.message(), HasSubstr(c.want)) << c.url;
  }
}

TEST(ParseHostPort, Accepts) {
  struct Case {
    std::string text;
    std::string host;
    std::uint16_t port;
  } cases[] = {
      {"0.0.0.0:7443", "0.0.0.0", 7443},
      {"127.0.0.1:9100", "127.0.0.1", 9100},
      {"[::]:7443", "::", 7443},
      {":7443", "::", 7443},
      {"[fd00::1]:80", "fd00::1", 80},
      {"[::1]:0", "::1", 0},
      {"localhost:65535", "localhost", 65535},
  };
  for (const auto& c : cases) {
    auto r = ParseHostPort(c.text);
    ASSERT_TRUE(r.ok()) << c.text << ": " << r.message();
    EXPECT_EQ(r->host, c.host) << c.text;
    EXPECT_EQ(r->port, c.port) << c.text;
  }
}

TEST(ParseHostPort, Refuses) {
  struct Case {
    std::string text;
    std::string want;
  } cases[] = {
      {"7443", "has no port (ADDR:PORT)"},
      {"localhost", "has no port"},
      {"[::1]", "has no port"},
      {"", "has no port"},
      {"::1:7443", "put IPv6 addresses in brackets"},
      {"::", "put IPv6 addresses in brackets"},
      {"[::1", "unclosed '['"},
      {"[::1]:", "invalid port ''"},
      {"[::1]x7443", "is malformed"},
      {"host:", "invalid port ''"},
      {"host:70000", "invalid port '70000'"},
      {"host:+1", "invalid port '+1'"},
      {"host: 1", "invalid port ' 1'"},
  };
  for (const auto& c : cases) {
    auto r = ParseHostPort(c.text);
    ASSERT_FALSE(r.ok()) << c.text;
    EXPECT_THAT(r.message(), HasSubstr(c.want)) << c.text;
  }
}

}  // namespace
}  // namespace muster
