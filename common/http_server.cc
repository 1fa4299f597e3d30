#include "common/http_server.h"

#include <boost/asio/strand.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

#include "common/process.h"

namespace muster {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;

namespace {

class HttpSession : public std::enable_shared_from_this<HttpSession> {
 public:
  HttpSession(tcp::socket s, const HttpServer::Handler& handler, const std::string& name)
      : stream_(std::move(s)), handler_(handler), name_(name) {}

  void Run() {
    stream_.expires_after(std::chrono::seconds(10));
    parser_.body_limit(4096);
    http::async_read(stream_, buffer_, parser_,
                     [self = shared_from_this()](beast::error_code ec, std::size_t) {
                       if (!ec) self->Respond();
                     });
  }

 private:
  void Respond() {
    const auto& req = parser_.get();
    auto res = std::make_shared<http::response<http::string_body>>(http::status::ok, req.version());
    res->set(http::field::server, name_);
    if (req.method() != http::verb::get) {
      res->result(http::status::method_not_allowed);
      res->body() = "GET only\n";
    } else {
      HttpReply r = handler_(std::string(req.target()));
      res->result(static_cast<unsigned>(r.status));
      res->set(http::field::content_type, r.content_type);
      res->body() = std::move(r.body);
    }
    res->keep_alive(false);
    res->prepare_payload();
    http::async_write(stream_, *res,
                      [self = shared_from_this(), res](beast::error_code, std::size_t) {
                        beast::error_code ec;
                        self->stream_.socket().shutdown(tcp::socket::shutdown_send, ec);
                      });
  }

  beast::tcp_stream stream_;
  beast::flat_buffer buffer_;
  http::request_parser<http::string_body> parser_;
  const HttpServer::Handler& handler_;
  const std::string& name_;
};

}  // namespace

struct HttpServer::Impl : std::enable_shared_from_this<HttpServer::Impl> {
  Impl(asio::io_context& io, Handler h, std::string n)
      : ioc(io), acceptor(asio::make_strand(io)), handler(std::move(h)), name(std::move(n)) {}
  void Accept() {
    acceptor.async_accept(
        asio::make_strand(ioc), [self = shared_from_this()](beast::error_code ec, tcp::socket s) {
          if (ec == asio::error::operation_aborted || !self->acceptor.is_open()) return;
          if (!ec) SetCloseOnExec(s.native_handle());
          if (!ec) std::make_shared<HttpSession>(std::move(s), self->handler, self->name)->Run();
          self->Accept();
        });
  }
  asio::io_context& ioc;
  tcp::acceptor acceptor;
  Handler handler;
  std::string name;
};

HttpServer::HttpServer(asio::io_context& ioc, Handler handler, std::string server_name)
    : impl_(std::make_shared<Impl>(ioc, std::move(handler), std::move(server_name))) {}

HttpServer::~HttpServer() { Stop(); }

Result<tcp::endpoint> HttpServer::Start(const HostPort& where) {
  beast::error_code ec;
  auto addr = asio::ip::make_address(where.host, ec);
  if (ec) return Err("address '" + where.host + "' is not an IP address");
  tcp::endpoint ep(addr, where.port);
  impl_->acceptor.open(ep.protocol(), ec);
  if (!ec) impl_->acceptor.set_option(asio::socket_base::reuse_address(true), ec);
  if (!ec) impl_->acceptor.bind(ep, ec);
  if (!ec) impl_->acceptor.listen(asio::socket_base::max_listen_connections, ec);
  if (!ec) SetCloseOnExec(impl_->acceptor.native_handle());
  if (ec) {
    return Err("cannot listen on " + where.host + ":" + std::to_string(where.port) + ": " +
               ec.message());
  }
  impl_->Accept();
  return impl_->acceptor.local_endpoint();
}

void HttpServer::Stop() {
  asio::post(impl_->acceptor.get_executor(), [impl = impl_] {
    beast::error_code ec;
    impl->acceptor.close(ec);
  });
}

}  // namespace muster
