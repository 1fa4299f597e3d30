#include "agent/health.h"

#include <boost/asio/connect.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

#include "common/process.h"

namespace muster {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;

Result<int> HttpGetStatus(const std::string& url, std::chrono::milliseconds timeout) {
  constexpr std::string_view kScheme = "http://";
  if (url.rfind(kScheme, 0) != 0) return Err("health check URL must start with http://");
  std::string rest = url.substr(kScheme.size());
  auto slash = rest.find('/');
  std::string hostport = rest.substr(0, slash);
  std::string target = slash == std::string::npos ? "/" : rest.substr(slash);
  std::string host = hostport, port = "80";
  if (!hostport.empty() && hostport[0] == '[') {
    auto close = hostport.find(']');
    host = hostport.substr(1, close - 1);
    if (close + 1 < hostport.size() && hostport[close + 1] == ':')
      port = hostport.substr(close + 2);
  } else if (auto c = hostport.rfind(':'); c != std::string::npos) {
    host = hostport.substr(0, c);
    port = hostport.substr(c + 1);
  }
  asio::io_context ioc;
  asio::ip::tcp::resolver resolver(ioc);
  beast::tcp_stream stream(ioc);
  http::request<http::empty_body> req{http::verb::get, target, 11};
  req.set(http::field::host, hostport);
  req.set(http::field::user_agent, "muster-agent health check");
  http::response<http::string_body> res;
  beast::flat_buffer buf;
  beast::error_code result = asio::error::timed_out;
  bool done = false;
  stream.expires_after(timeout);
  resolver.async_resolve(
      host, port, [&](beast::error_code ec, asio::ip::tcp::resolver::results_type r) {
        if (ec) {
          result = ec;
          done = true;
          return;
        }
        stream.async_connect(r, [&](beast::error_code ec2, const asio::ip::tcp::endpoint&) {
          if (ec2) {
            result = ec2;
            done = true;
            return;
          }
          SetCloseOnExec(stream.socket().native_handle());
          http::async_write(stream, req, [&](beast::error_code ec3, std::size_t) {
            if (ec3) {
              result = ec3;
              done = true;
              return;
            }
            http::async_read(stream, buf, res, [&](beast::error_code ec4, std::size_t) {
              result = ec4;
              done = true;
            });
          });
        });
      });
  ioc.run_for(timeout + std::chrono::milliseconds(100));
  if (!done) return Err("GET " + url + " timed out");
  if (result) return Err("GET " + url + ": " + result.message());
  return static_cast<int>(res.result_int());
}

HealthReport RunHealthChecks(const std::vector<HealthCheck>& checks, ProcessRunner& runner) {
  for (const auto& c : checks) {
    if (!c.command.empty()) {
      RunOptions o;
      o.argv = c.command;
      o.timeout = c.timeout;
      auto r = runner.Run(o);
      if (!r.ok()) return {false, "health check '" + c.name + "' failed: " + r.Describe()};
    } else {
      auto code = HttpGetStatus(c.http, c.timeout);
      if (!code) return {false, "health check '" + c.name + "' failed: " + code.message()};
      if (*code < 200 || *code > 299) {
        return {false, "health check '" + c.name + "' failed: HTTP " + std::to_string(*code)};
      }
    }
  }
  return {true, checks.empty() ? std::string()
                               : "all " + std::to_string(checks.size()) + " health checks passed"};
}

}  // namespace muster
