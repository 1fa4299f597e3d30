#include "common/url.h"

#include <charconv>

namespace muster {

namespace {
Result<std::uint16_t> ParsePort(std::string_view s, std::string_view whole) {
  unsigned v = 0;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc() || p != s.data() + s.size() || v > 65535 || s.empty()) {
    return Err("'" + std::string(whole) + "' has an invalid port '" + std::string(s) + "'");
  }
  return static_cast<std::uint16_t>(v);
}

Result<HostPort> SplitHostPort(std::string_view hp, std::string_view whole, bool port_required,
                               std::uint16_t default_port) {
  HostPort out;
  std::string_view rest;
  if (!hp.empty() && hp.front() == '[') {
    auto close = hp.find(']');
    if (close == std::string_view::npos)
      return Err("'" + std::string(whole) + "' has an unclosed '['");
    out.host = std::string(hp.substr(1, close - 1));
    rest = hp.substr(close + 1);
  } else {
    auto colon = hp.rfind(':');
    if (colon != std::string_view::npos && hp.find(':') != colon) {
      return Err("'" + std::string(whole) + "': put IPv6 addresses in brackets, e.g. [::1]:7443");
    }
    out.host = std::string(hp.substr(0, colon));
    rest = colon == std::string_view::npos ? std::string_view() : hp.substr(colon);
  }
  if (rest.empty()) {
    if (port_required) return Err("'" + std::string(whole) + "' has no port (ADDR:PORT)");
    out.port = default_port;
    return out;
  }
  if (rest.front() != ':') return Err("'" + std::string(whole) + "' is malformed");
  auto port = ParsePort(rest.substr(1), whole);
  if (!port) return port.error();
  out.port = *port;
  return out;
}
}  // namespace

std::string WsUrl::ToString() const {
  std::string h = host.find(':') != std::string::npos ? "[" + host + "]" : host;
  return "wss://" + h + ":" + std::to_string(port) + path;
}

Result<WsUrl> ParseWsUrl(std::string_view url, std::string_view default_path) {
  constexpr std::string_view kScheme = "wss://";
  if (url.substr(0, kScheme.size()) != kScheme) {
    return Err("controller URL '" + std::string(url) + "' must start with wss://");
  }
  std::string_view rest = url.substr(kScheme.size());
  auto slash = rest.find('/');
  std::string_view hp = rest.substr(0, slash);
  auto h = SplitHostPort(hp, url, false, 443);
  if (!h) return h.error();
  if (h->host.empty()) return Err("controller URL '" + std::string(url) + "' has no host");
  WsUrl out;
  out.host = h->host;
  out.port = h->port;
  out.path =
      slash == std::string_view::npos ? std::string(default_path) : std::string(rest.substr(slash));
  if (out.path == "/") out.path = std::string(default_path);
  return out;
}

Result<HostPort> ParseHostPort(std::string_view text) {
  auto h = SplitHostPort(text, text, true, 0);
  if (!h) return h.error();
  if (h->host.empty()) h->host = "::";
  return h;
}

}  // namespace muster
