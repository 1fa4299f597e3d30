#include "common/ws_client.h"

#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/ssl.hpp>
#include <boost/beast/websocket.hpp>
#include <boost/beast/websocket/ssl.hpp>
#include <deque>
#include <variant>

#include "common/process.h"
#include "common/tls.h"
#include "common/utf8.h"

namespace muster {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace websocket = beast::websocket;
using tcp = asio::ip::tcp;
using SteadyClock = std::chrono::steady_clock;

namespace {

constexpr std::size_t kWriteBufferBytes = 256 * 1024;

class Client final : public WsClient, public std::enable_shared_from_this<Client> {
 public:
  Client(asio::any_io_executor ex, ClientOptions o, Handlers h)
      : strand_(asio::make_strand(ex)),
        opts_(std::move(o)),
        handlers_(std::move(h)),
        resolver_(strand_),
        ws_(strand_, *opts_.tls),
        timer_(strand_),
        buffer_(opts_.max_message_bytes) {}

  void Connect() override {
    asio::dispatch(strand_, [self = shared_from_this()] { self->Resolve(); });
  }

  void Send(std::string text) override {
    asio::post(strand_, [self = shared_from_this(), t = std::move(text)]() mutable {
      if (self->done_ || !self->open_) return;
      self->outbox_.push_back(std::move(t));
      self->Flush();
    });
  }

  void SendBinary(std::string bytes) override {
    asio::post(strand_, [self = shared_from_this(), b = std::move(bytes)]() mutable {
      if (self->done_ || !self->open_) return;
      self->outbox_.push_back(Binary{std::move(b)});
      self->Flush();
    });
  }

  void Close(std::string reason) override {
    asio::post(strand_, [self = shared_from_this(), r = std::move(reason)]() mutable {
      if (self->done_) return;
      if (!self->open_) return self->Finish(r);
      self->close_reason_ = r;
      self->outbox_.push_back(CloseFrame{r});
      self->Flush();
      self->timer_.expires_after(std::chrono::seconds(3));
      self->timer_.async_wait([self](beast::error_code ec) {
        if (!ec) self->HardClose(self->close_reason_);
      });
    });
  }

  void Abort() override {
    asio::post(strand_, [self = shared_from_this()] { self->HardClose("aborted"); });
  }

 private:
  struct Ping {};
  struct CloseFrame {
    std::string reason;
  };
  struct Binary {
    std::string bytes;
  };
  using Out = std::variant<std::string, Ping, CloseFrame, Binary>;

  void Resolve() {
    timer_.expires_after(opts_.connect_timeout + opts_.handshake_timeout);
    timer_.async_wait([self = shared_from_this()](beast::error_code ec) {
      if (!ec && !self->open_)
        self->HardClose("connection to " + self->opts_.url.ToString() + " timed out");
    });
    resolver_.async_resolve(
        opts_.url.host, std::to_string(opts_.url.port),
        [self = shared_from_this()](beast::error_code ec, tcp::resolver::results_type r) {
          if (ec)
            return self->Finish("cannot resolve " + self->opts_.url.host + ": " + ec.message());
          self->DoConnect(r);
        });
  }

  void DoConnect(const tcp::resolver::results_type& r) {
    beast::get_lowest_layer(ws_).expires_after(opts_.connect_timeout);
    beast::get_lowest_layer(ws_).async_connect(
        r, [self = shared_from_this()](beast::error_code ec, const tcp::endpoint&) {
          if (ec)
            return self->Finish("cannot connect to " + self->opts_.url.ToString() + ": " +
                                ec.message());
          beast::error_code ig;
          beast::get_lowest_layer(self->ws_).socket().set_option(tcp::no_delay(true), ig);
          SetCloseOnExec(beast::get_lowest_layer(self->ws_).socket().native_handle());
          beast::get_lowest_layer(self->ws_).expires_after(self->opts_.handshake_timeout);
          self->DoTls();
        });
  }

  void DoTls() {
    SSL* ssl = ws_.next_layer().native_handle();
    SSL_set_tlsext_host_name(ssl, opts_.url.host.c_str());
    ws_.next_layer().async_handshake(asio::ssl::stream_base::client, [self = shared_from_this()](
                                                                         beast::error_code ec) {
      if (ec) {
        std::string why = tls::RefusalReason(self->ws_.next_layer().native_handle());
        if (why.empty()) {
          why = ec.message();
          if (why.find("alert") != std::string::npos ||
              why.find("certificate") != std::string::npos) {
            why += " (the controller refused this key: is the machine registered?)";
          }
        }
        return self->Finish("TLS handshake with " + self->opts_.url.ToString() + " failed: " + why);
      }
      self->DoUpgrade();
    });
  }

  void DoUpgrade() {
    beast::get_lowest_layer(ws_).expires_never();
    websocket::stream_base::timeout t{};
    t.handshake_timeout = opts_.handshake_timeout;
    t.idle_timeout = websocket::stream_base::none();
    t.keep_alive_pings = false;
    ws_.set_option(t);
    // The limit is the read buffer's (buffer_overflow names the cause). With
    // read_message_max Beast would refuse at the frame header and then report
    // the TLS teardown's error instead ("application data after close notify").
    ws_.read_message_max(0);
    // A client masks what it sends in a buffer of this size, one TLS write per
    // buffer: Beast's 4 KiB default made a 2 MiB upload chunk 512 writes.
    ws_.write_buffer_bytes(kWriteBufferBytes);
    ws_.set_option(
        websocket::stream_base::decorator([ua = opts_.user_agent](websocket::request_type& req) {
          req.set(beast::http::field::user_agent, ua);
        }));
    ws_.control_callback(
        [this](websocket::frame_type, beast::string_view) { last_rx_ = SteadyClock::now(); });
    std::string host =
        opts_.url.host.find(':') != std::string::npos ? "[" + opts_.url.host + "]" : opts_.url.host;
    host += ":" + std::to_string(opts_.url.port);
    ws_.async_handshake(
        res_, host, opts_.url.path, [self = shared_from_this()](beast::error_code ec) {
          if (ec)
            return self->Finish("websocket upgrade at " + self->opts_.url.ToString() +
                                " failed: " + self->UpgradeError(ec));
          self->OnOpen();
        });
  }

  // In TLS 1.3 the server checks the client's certificate after the client
  // has finished its side of the handshake, so a refused key shows up here.
  std::string UpgradeError(const beast::error_code& ec) {
    if (ec == websocket::error::upgrade_declined) {
      return "HTTP " + std::to_string(res_.result_int()) + " " + std::string(res_.body());
    }
    if (ec.category() == asio::error::get_ssl_category() ||
        ec == asio::ssl::error::stream_truncated || ec == asio::error::eof ||
        ec == asio::error::connection_reset) {
      return ec.message() +
             ": the controller refused this key during the TLS handshake; is it "
             "registered? ('muster machine add' for machines, 'muster-controller operator add' "
             "for operators)";
    }
    return ec.message();
  }

  void OnOpen() {
    open_ = true;
    last_rx_ = SteadyClock::now();
    timer_.cancel();
    ArmTimer();
    if (handlers_.on_open) handlers_.on_open();
    Read();
    Flush();
  }

  void ArmTimer() {
    timer_.expires_after(opts_.ping_interval);
    timer_.async_wait([self = shared_from_this()](beast::error_code ec) {
      if (ec || self->done_) return;
      if (SteadyClock::now() - self->last_rx_ >= self->opts_.idle_timeout) {
        return self->HardClose("nothing received from the controller for " +
                               std::to_string(std::chrono::duration_cast<std::chrono::seconds>(
                                                  self->opts_.idle_timeout)
                                                  .count()) +
                               " s (idle timeout)");
      }
      self->outbox_.push_back(Ping{});
      self->Flush();
      self->ArmTimer();
    });
  }

  void Read() {
    ws_.async_read(buffer_, [self = shared_from_this()](beast::error_code ec, std::size_t) {
      if (ec) {
        std::string why = ec.message();
        if (ec == websocket::error::buffer_overflow || ec == websocket::error::message_too_big) {
          why = "the controller sent a message larger than this side's limit of " +
                std::to_string(self->opts_.max_message_bytes) + " bytes; it was refused";
          if (self->handlers_.on_oversize)
            self->handlers_.on_oversize(self->opts_.max_message_bytes);
        } else if (ec == websocket::error::closed) {
          auto r = self->ws_.reason();
          why = "closed by the controller" +
                (r.reason.empty() ? std::string() : ": " + std::string(r.reason.c_str()));
        }
        return self->HardClose(why);
      }
      self->last_rx_ = SteadyClock::now();
      std::size_t text_max = self->opts_.max_text_message_bytes;
      if (text_max && self->ws_.got_text() && self->buffer_.size() > text_max) {
        self->buffer_.consume(self->buffer_.size());
        if (self->handlers_.on_oversize) self->handlers_.on_oversize(text_max);
        return self->HardClose("the controller sent a message larger than this side's limit of " +
                               std::to_string(text_max) + " bytes; it was refused");
      }
      std::string text = beast::buffers_to_string(self->buffer_.data());
      self->buffer_.consume(self->buffer_.size());
      if (self->handlers_.on_message) self->handlers_.on_message(std::move(text));
      if (!self->done_) self->Read();
    });
  }

  void Flush() {
    if (writing_ || outbox_.empty() || done_ || !open_) return;
    writing_ = true;
    auto self = shared_from_this();
    Out& front = outbox_.front();
    if (auto* text = std::get_if<std::string>(&front)) {
      ws_.text(true);
      ws_.async_write(asio::buffer(*text),
                      [self](beast::error_code ec, std::size_t) { self->OnWrite(ec); });
    } else if (auto* bin = std::get_if<Binary>(&front)) {
      ws_.binary(true);
      ws_.async_write(asio::buffer(bin->bytes),
                      [self](beast::error_code ec, std::size_t) { self->OnWrite(ec); });
    } else if (std::holds_alternative<Ping>(front)) {
      ws_.async_ping({}, [self](beast::error_code ec) { self->OnWrite(ec); });
    } else {
      websocket::close_reason cr(websocket::close_code::normal,
                                 CutUtf8(std::get<CloseFrame>(front).reason, 120));
      ws_.async_close(cr, [self](beast::error_code) { self->HardClose(self->close_reason_); });
    }
  }

  void OnWrite(beast::error_code ec) {
    writing_ = false;
    if (ec) return HardClose("write failed: " + ec.message());
    outbox_.pop_front();
    Flush();
  }

  void HardClose(const std::string& reason) {
    beast::error_code ec;
    beast::get_lowest_layer(ws_).socket().shutdown(tcp::socket::shutdown_both, ec);
    beast::get_lowest_layer(ws_).socket().close(ec);
    Finish(reason);
  }

  void Finish(const std::string& reason) {
    if (done_) return;
    done_ = true;
    open_ = false;
    timer_.cancel();
    resolver_.cancel();
    beast::error_code ec;
    beast::get_lowest_layer(ws_).socket().close(ec);
    outbox_.clear();
    auto cb = std::move(handlers_.on_close);
    handlers_ = {};
    if (cb) cb(reason);
  }

  asio::strand<asio::any_io_executor> strand_;
  ClientOptions opts_;
  Handlers handlers_;
  tcp::resolver resolver_;
  websocket::stream<beast::ssl_stream<beast::tcp_stream>> ws_;
  asio::steady_timer timer_;
  beast::flat_buffer buffer_;
  websocket::response_type res_;
  std::deque<Out> outbox_;
  bool writing_ = false;
  bool open_ = false;
  bool done_ = false;
  std::string close_reason_;
  SteadyClock::time_point last_rx_ = SteadyClock::now();
};

}  // namespace

std::shared_ptr<WsClient> WsClient::Create(asio::any_io_executor ex, ClientOptions options,
                                           Handlers handlers) {
  return std::make_shared<Client>(std::move(ex), std::move(options), std::move(handlers));
}

}  // namespace muster
