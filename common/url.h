// Parsing of controller URLs and listen addresses.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "common/error.h"

namespace muster {

struct WsUrl {
  std::string host;  // without brackets for IPv6
  std::uint16_t port = 443;
  std::string path;  // starts with '/'
  std::string ToString() const;
};

// Accepts wss://HOST[:PORT][/PATH]; IPv6 hosts in brackets. default_path is used
// when the URL has none.
Result<WsUrl> ParseWsUrl(std::string_view url, std::string_view default_path);

struct HostPort {
  std::string host;  // without brackets
  std::uint16_t port = 0;
};

// Accepts ADDR:PORT, [V6ADDR]:PORT, :PORT (all IPv4/IPv6 via [::]).
Result<HostPort> ParseHostPort(std::string_view text);

}  // namespace muster
