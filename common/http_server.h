// A minimal plain-HTTP GET server for metrics and health endpoints.
//
// One request per connection, 10 s deadline, GET only; the handler maps a
// path to (status, content type, body) and runs on an I/O thread, so it must
// be thread-safe and quick. Meant for loopback or management addresses.
#pragma once

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <functional>
#include <memory>
#include <string>

#include "common/error.h"
#include "common/url.h"

namespace muster {

struct HttpReply {
  int status = 200;
  std::string content_type = "text/plain";
  std::string body;
};

class HttpServer {
 public:
  using Handler = std::function<HttpReply(const std::string& path)>;
  HttpServer(boost::asio::io_context& ioc, Handler handler, std::string server_name);
  ~HttpServer();
  Result<boost::asio::ip::tcp::endpoint> Start(const HostPort& where);
  void Stop();

 private:
  struct Impl;
  std::shared_ptr<Impl> impl_;
};

}  // namespace muster
