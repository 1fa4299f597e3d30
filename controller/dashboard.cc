#include "controller/dashboard.h"

#include <sodium.h>
#include <spdlog/spdlog.h>

#include <array>
#include <atomic>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <deque>

#include "common/crypto.h"
#include "common/json_limits.h"
#include "common/process.h"
#include "controller/dashboard_html.h"

namespace muster {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;
using nlohmann::json;

namespace {

constexpr const char* kTokensSetting = "dashboard.tokens";
constexpr const char* kCookie = "muster_dashboard";
constexpr std::size_t kMaxTokens = 100;

// Pages run no inline code and load nothing from elsewhere.
constexpr const char* kCsp =
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

json LoadTokens(Store& store) {
  auto text = store.GetSetting(kTokensSetting);
  if (!text) return json::array();
  auto j = ParseJsonBounded(*text);
  if (!j || !j->is_array()) return json::array();
  return *j;
}

int FromHex(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// Percent-decoding; '+' stays (paths and our query values never use it for
// a space). Invalid escapes are kept as they are.
std::string PercentDecode(std::string_view s) {
  std::string o;
  for (std::size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '%' && i + 2 < s.size()) {
      int a = FromHex(s[i + 1]), b = FromHex(s[i + 2]);
      if (a >= 0 && b >= 0) {
        o += static_cast<char>(a * 16 + b);
        i += 2;
        continue;
      }
    }
    o += s[i];
  }
  return o;
}

std::string QueryValue(std::string_view query, std::string_view key) {
  while (!query.empty()) {
    auto amp = query.find('&');
    auto part = query.substr(0, amp);
    auto eq = part.find('=');
    if (part.substr(0, eq) == key) {
      return eq == part.npos ? "" : PercentDecode(part.substr(eq + 1));
    }
    if (amp == query.npos) break;
    query.remove_prefix(amp + 1);
  }
  return "";
}

std::string CookieValue(std::string_view header, std::string_view name) {
  while (!header.empty()) {
    auto semi = header.find(';');
    auto part = header.substr(0, semi);
    while (!part.empty() && part.front() == ' ') part.remove_prefix(1);
    auto eq = part.find('=');
    if (eq != part.npos && part.substr(0, eq) == name) return std::string(part.substr(eq + 1));
    if (semi == header.npos) break;
    header.remove_prefix(semi + 1);
  }
  return "";
}

// Whether a Host header names this machine by an IP literal or "localhost";
// a page that a rebinding DNS name pointed here carries its own name.
bool HostIsLocalLiteral(std::string_view host) {
  std::string h(host);
  if (!h.empty() && h.front() == '[') {
    auto close = h.find(']');
    if (close == std::string::npos) return false;
    h = h.substr(1, close - 1);
  } else if (auto colon = h.rfind(':'); colon != std::string::npos) {
    h = h.substr(0, colon);
  }
  if (h == "localhost") return true;
  beast::error_code ec;
  (void)asio::ip::make_address(h, ec);
  return !ec;
}

}  // namespace

Status AddDashboardTokenHash(Store& store, const std::string& sha256_hex, const std::string& by,
                             std::int64_t now) {
  if (sha256_hex.size() != 64 ||
      sha256_hex.find_first_not_of("0123456789abcdef") != std::string::npos) {
    return Err("a dashboard token hash is 64 lowercase hex digits (SHA-256)");
  }
  json tokens = LoadTokens(store);
  if (tokens.size() >= kMaxTokens) {
    return Err("there are already " + std::to_string(kMaxTokens) +
               " dashboard tokens; revoke them with 'muster dashboard token --revoke-all'");
  }
  tokens.push_back({{"hash", sha256_hex}, {"by", by}, {"createdAt", now}});
  return store.SetSetting(kTokensSetting, tokens.dump());
}

bool DashboardTokenValid(Store& store, std::string_view token) {
  if (token.empty() || token.size() > 256) return false;
  std::string h = Sha256Hex(token);
  bool found = false;
  for (const auto& t : LoadTokens(store)) {
    if (!t.is_object() || !t.contains("hash") || !t["hash"].is_string()) continue;
    const auto& stored = t["hash"].get_ref<const std::string&>();
    if (stored.size() == h.size() && sodium_memcmp(stored.data(), h.data(), h.size()) == 0) {
      found = true;
    }
  }
  return found;
}

Result<int> ClearDashboardTokens(Store& store) {
  int n = static_cast<int>(LoadTokens(store).size());
  if (auto st = store.SetSetting(kTokensSetting, "[]"); !st) return st.error();
  return n;
}

struct DashboardServer::Impl : std::enable_shared_from_this<DashboardServer::Impl> {
  Impl(asio::io_context& io, Fleet& f, RolloutManager* r, DashboardOptions o)
      : ioc(io), acceptor(asio::make_strand(io)), fleet(f), rollouts(r), options(o) {}
  void Accept();

  asio::io_context& ioc;
  tcp::acceptor acceptor;
  Fleet& fleet;
  RolloutManager* rollouts;
  DashboardOptions options;
  bool require_token = true;
  std::atomic<std::size_t> streams{0};
};

namespace {

// One connection: a request answered with a page, or an event stream.
class DashSession : public EventSink, public std::enable_shared_from_this<DashSession> {
 public:
  DashSession(tcp::socket s, std::shared_ptr<DashboardServer::Impl> server)
      : stream_(std::move(s)), server_(std::move(server)), timer_(stream_.get_executor()) {}

  ~DashSession() override {
    if (streaming_) --server_->streams;
  }

  void Run() {
    stream_.expires_after(std::chrono::seconds(10));
    parser_.header_limit(16 * 1024);
    parser_.body_limit(0);
    http::async_read(stream_, buffer_, parser_,
                     [self = shared_from_this()](beast::error_code ec, std::size_t) {
                       if (!ec) self->OnRequest();
                     });
  }

  // EventSink: any thread.
  void Deliver(std::string text) override {
    asio::post(stream_.get_executor(),
               [self = shared_from_this(), text = std::move(text)]() mutable {
                 self->Queue(std::move(text));
               });
  }

 private:
  using Response = http::response<http::string_body>;

  void OnRequest() {
    const auto& req = parser_.get();
    std::string_view target(req.target().data(), req.target().size());
    auto q = target.find('?');
    std::string path = PercentDecode(target.substr(0, q));
    std::string_view query = q == target.npos ? std::string_view() : target.substr(q + 1);

    if (req.method() != http::verb::get) {
      return Send(Page(http::status::method_not_allowed, "Not allowed",
                       "The dashboard is read-only: GET only."));
    }
    if (!server_->require_token) {
      auto host = req[http::field::host];
      if (!HostIsLocalLiteral(std::string_view(host.data(), host.size()))) {
        return Send(Page(http::status::forbidden, "Forbidden",
                         "This dashboard listens on loopback and answers only requests addressed "
                         "to an IP address or localhost."));
      }
    }
    if (path.rfind("/static/", 0) == 0 || path == "/favicon.ico") {
      const DashboardAsset* a =
          FindDashboardAsset(path == "/favicon.ico" ? "/static/icon.svg" : path);
      if (!a) return Send(Page(http::status::not_found, "Not found", "No such file."));
      Response res(http::status::ok, 11);
      res.set(http::field::content_type, a->content_type);
      res.set(http::field::cache_control, "max-age=300");
      res.body() = std::string(a->body);
      return Send(std::move(res));
    }
    if (server_->require_token) {
      std::string from_query = QueryValue(query, "token");
      if (!from_query.empty()) {
        if (!DashboardTokenValid(server_->fleet.store(), from_query)) return Unauthorized();
        // The token leaves the address bar (and history) at once.
        Response res(http::status::see_other, 11);
        res.set(http::field::location, path.empty() ? "/" : std::string(target.substr(0, q)));
        res.set(http::field::set_cookie,
                std::string(kCookie) + "=" + from_query + "; Path=/; HttpOnly; SameSite=Strict");
        return Send(std::move(res));
      }
      std::string presented;
      auto auth = req[http::field::authorization];
      std::string_view a(auth.data(), auth.size());
      if (a.rfind("Bearer ", 0) == 0) presented = std::string(a.substr(7));
      if (presented.empty()) {
        auto cookie = req[http::field::cookie];
        presented = CookieValue(std::string_view(cookie.data(), cookie.size()), kCookie);
      }
      if (!DashboardTokenValid(server_->fleet.store(), presented)) return Unauthorized();
      token_ = std::move(presented);
    }
    if (path == "/events") return StartStream(QueryValue(query, "machine"));
    std::optional<std::string> html;
    if (path == "/" || path.empty()) {
      html = RenderFleetPage(server_->fleet);
    } else if (path == "/rollouts") {
      html = RenderRolloutsPage(server_->fleet);
    } else if (path.rfind("/machine/", 0) == 0) {
      html = RenderMachinePage(server_->fleet, path.substr(9));
    } else if (path.rfind("/rollout/", 0) == 0) {
      html = RenderRolloutPage(server_->fleet, server_->rollouts, path.substr(9));
    }
    if (!html) {
      return Send(Page(http::status::not_found, "Not found",
                       "Nothing here: the machine or rollout may have been removed."));
    }
    Response res(http::status::ok, 11);
    res.set(http::field::content_type, "text/html; charset=utf-8");
    res.body() = std::move(*html);
    Send(std::move(res));
  }

  void Unauthorized() {
    Send(Page(http::status::unauthorized, "Access token needed",
              "This dashboard is reachable from the network and needs an access token: run "
              "'muster dashboard token' and open the link it prints."));
  }

  static Response Page(http::status status, const std::string& title, const std::string& text) {
    Response res(status, 11);
    res.set(http::field::content_type, "text/html; charset=utf-8");
    res.body() = RenderMessagePage(title, text);
    return res;
  }

  static void Harden(Response& res) {
    res.set(http::field::server, "muster-controller");
    res.set("Content-Security-Policy", kCsp);
    res.set("X-Content-Type-Options", "nosniff");
    res.set("X-Frame-Options", "DENY");
    res.set("Referrer-Policy", "no-referrer");
    if (res.find(http::field::cache_control) == res.end()) {
      res.set(http::field::cache_control, "no-store");
    }
  }

  void Send(Response res) {
    Harden(res);
    res.keep_alive(false);
    res.prepare_payload();
    auto owned = std::make_shared<Response>(std::move(res));
    http::async_write(stream_, *owned,
                      [self = shared_from_this(), owned](beast::error_code, std::size_t) {
                        beast::error_code ec;
                        self->stream_.socket().shutdown(tcp::socket::shutdown_send, ec);
                      });
  }

  void StartStream(std::string machine) {
    if (server_->streams.fetch_add(1) >= server_->options.max_streams) {
      --server_->streams;
      return Send(Page(http::status::service_unavailable, "Busy",
                       "Too many open dashboards; close one and reload."));
    }
    streaming_ = true;
    machine_ = std::move(machine);
    stream_.expires_never();
    std::string head =
        "HTTP/1.1 200 OK\r\nServer: muster-controller\r\n"
        "Content-Type: text/event-stream; charset=utf-8\r\nCache-Control: no-store\r\n"
        "X-Content-Type-Options: nosniff\r\nConnection: close\r\n\r\n"
        "retry: 2000\n\n";
    Queue(std::move(head), /*raw=*/true);
    server_->fleet.Subscribe(std::static_pointer_cast<EventSink>(shared_from_this()));
    WatchClose();
    Tick();
  }

  // Any bytes or EOF from the client: a stream client sends nothing more.
  void WatchClose() {
    stream_.socket().async_read_some(
        asio::buffer(sink_), [self = shared_from_this()](beast::error_code ec, std::size_t) {
          if (ec) return self->Close();
          self->WatchClose();
        });
  }

  void Tick() {
    timer_.expires_after(server_->options.keepalive);
    timer_.async_wait([self = shared_from_this()](beast::error_code ec) {
      if (ec || self->closed_) return;
      auto now = std::chrono::steady_clock::now();
      if (self->server_->require_token &&
          !DashboardTokenValid(self->server_->fleet.store(), self->token_)) {
        spdlog::info("dashboard stream closed: its access token was revoked");
        return self->Close();
      }
      if (self->writing_ && now - self->write_started_ > 2 * self->server_->options.keepalive) {
        spdlog::info("dashboard stream closed: the client stopped reading");
        return self->Close();
      }
      if (!self->writing_ && self->outbox_.empty()) self->Queue(": keepalive\n\n", true);
      self->Tick();
    });
  }

  void Queue(std::string text, bool raw = false) {
    if (closed_) return;
    if (!raw) {
      // Log lines go only to the page of their machine.
      if (text.find("\"topic\":\"log\"") != std::string::npos) {
        if (machine_.empty()) return;
        // Our own broadcast (valid JSON, machine a string); checked anyway.
        auto j = json::parse(text, nullptr, false);
        if (j.is_discarded()) return;
        const json* data = j.is_object() && j.contains("body") && j["body"].is_object() &&
                                   j["body"].contains("data")
                               ? &j["body"]["data"]
                               : nullptr;
        if (!data || !data->is_object() || !data->contains("machine") ||
            !(*data)["machine"].is_string() ||
            (*data)["machine"].get_ref<const std::string&>() != machine_) {
          return;
        }
      }
      text = "data: " + text + "\n\n";
    }
    backlog_ += text.size();
    if (backlog_ > server_->options.max_stream_backlog) {
      spdlog::info("dashboard stream closed: {} bytes queued for a slow client", backlog_);
      return Close();
    }
    outbox_.push_back(std::move(text));
    if (!writing_) Write();
  }

  void Write() {
    writing_ = true;
    write_started_ = std::chrono::steady_clock::now();
    asio::async_write(stream_.socket(), asio::buffer(outbox_.front()),
                      [self = shared_from_this()](beast::error_code ec, std::size_t) {
                        self->writing_ = false;
                        if (ec) return self->Close();
                        self->backlog_ -= self->outbox_.front().size();
                        self->outbox_.pop_front();
                        if (!self->outbox_.empty() && !self->closed_) self->Write();
                      });
  }

  void Close() {
    if (closed_) return;
    closed_ = true;
    server_->fleet.Unsubscribe(this);
    timer_.cancel();
    beast::error_code ec;
    stream_.socket().shutdown(tcp::socket::shutdown_both, ec);
    stream_.socket().close(ec);
  }

  beast::tcp_stream stream_;
  beast::flat_buffer buffer_;
  http::request_parser<http::empty_body> parser_;
  std::shared_ptr<DashboardServer::Impl> server_;
  asio::steady_timer timer_;
  bool streaming_ = false;
  bool closed_ = false;
  bool writing_ = false;
  std::string machine_;
  std::string token_;  // the access token this stream was opened with (checked on every tick)
  std::deque<std::string> outbox_;
  std::size_t backlog_ = 0;
  std::chrono::steady_clock::time_point write_started_;
  std::array<char, 256> sink_{};
};

}  // namespace

void DashboardServer::Impl::Accept() {
  acceptor.async_accept(asio::make_strand(ioc),
                        [self = shared_from_this()](beast::error_code ec, tcp::socket s) {
                          if (ec == asio::error::operation_aborted || !self->acceptor.is_open()) {
                            return;
                          }
                          if (!ec) {
                            SetCloseOnExec(s.native_handle());
                            std::make_shared<DashSession>(std::move(s), self)->Run();
                          }
                          self->Accept();
                        });
}

DashboardServer::DashboardServer(asio::io_context& ioc, Fleet& fleet, RolloutManager* rollouts,
                                 DashboardOptions options)
    : impl_(std::make_shared<Impl>(ioc, fleet, rollouts, options)) {}

DashboardServer::~DashboardServer() { Stop(); }

Result<tcp::endpoint> DashboardServer::Start(const HostPort& where) {
  beast::error_code ec;
  auto addr = asio::ip::make_address(where.host, ec);
  if (ec) return Err("--http-listen: '" + where.host + "' is not an IP address");
  impl_->require_token = !addr.is_loopback();
  tcp::endpoint ep(addr, where.port);
  impl_->acceptor.open(ep.protocol(), ec);
  if (!ec) impl_->acceptor.set_option(asio::socket_base::reuse_address(true), ec);
  if (!ec) impl_->acceptor.bind(ep, ec);
  if (!ec) impl_->acceptor.listen(asio::socket_base::max_listen_connections, ec);
  if (!ec) SetCloseOnExec(impl_->acceptor.native_handle());
  if (ec) {
    return Err("--http-listen: cannot listen on " + where.host + ":" + std::to_string(where.port) +
               ": " + ec.message());
  }
  impl_->Accept();
  return impl_->acceptor.local_endpoint();
}

void DashboardServer::Stop() {
  asio::post(impl_->acceptor.get_executor(), [impl = impl_] {
    beast::error_code ec;
    impl->acceptor.close(ec);
  });
}

}  // namespace muster
