// A TLS stream for the controller's sessions that holds no buffers of its own.
//
// Asio's ssl::stream keeps two 17 KiB std::vectors per stream (its input and
// output staging) and a BIO pair whose two 17 KiB rings become resident as
// records pass: ~68 KiB per connection for as long as it is open, idle or not.
// Here OpenSSL reads and writes the socket itself (SSL_set_fd, non-blocking),
// and the stream waits on the socket's reactor (async_wait) whenever OpenSSL
// wants to read or write more. With SSL_MODE_RELEASE_BUFFERS an idle
// connection then holds only the SSL object, its session and the peer's
// certificate. The load generator in bench/ drives its client side the same way.
//
// It models Asio's AsyncReadStream and AsyncWriteStream, so Beast's websocket
// and HTTP code run on it unchanged; next_layer() is the socket. It has no
// timeouts of its own: the owner closes the socket when a deadline passes,
// which aborts whatever is waiting (operation_aborted).
//
// OpenSSL's socket BIO writes with write(2), so the process must ignore SIGPIPE
// (muster-controller does, in main).
//
// Threading: like any Asio stream, used from one strand; one read and one
// write may be outstanding at once (each calls into OpenSSL only from its
// completion handler on that strand).
#pragma once

#include <openssl/err.h>
#include <openssl/ssl.h>

#include <atomic>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ssl/context.hpp>
#include <boost/asio/ssl/error.hpp>
#include <boost/asio/ssl/stream_base.hpp>
#include <boost/beast/core/async_base.hpp>
#include <boost/beast/core/buffers_range.hpp>
#include <boost/beast/websocket/teardown.hpp>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstring>
#include <utility>

namespace muster {

class TlsStream {
 public:
  using socket_type = boost::asio::ip::tcp::socket;
  using executor_type = socket_type::executor_type;
  using next_layer_type = socket_type;
  using lowest_layer_type = socket_type;
  using error_code = boost::system::error_code;

  // The socket must be connected; ctx's settings and verification apply.
  TlsStream(socket_type&& socket, boost::asio::ssl::context& ctx)
      : socket_(std::move(socket)), ssl_(SSL_new(ctx.native_handle())) {
    if (ssl_) {
      SSL_set_fd(ssl_, static_cast<int>(socket_.native_handle()));
      SSL_set_mode(ssl_, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER |
                             SSL_MODE_RELEASE_BUFFERS);
    }
    error_code ec;
    socket_.non_blocking(true, ec);
  }
  ~TlsStream() {
    if (ssl_) SSL_free(ssl_);
  }
  TlsStream(const TlsStream&) = delete;
  TlsStream& operator=(const TlsStream&) = delete;

  executor_type get_executor() noexcept { return socket_.get_executor(); }
  socket_type& next_layer() noexcept { return socket_; }
  const socket_type& next_layer() const noexcept { return socket_; }
  socket_type& lowest_layer() noexcept { return socket_; }
  SSL* native_handle() noexcept { return ssl_; }

  // While an operation waits for the peer's bytes, *since holds when the wait
  // began (NowNs), else 0: how the owner tells a stalled peer from a busy CPU.
  void WatchInput(std::atomic<std::int64_t>* since) noexcept { input_wait_ = since; }
  static std::int64_t NowNs() noexcept {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(
               std::chrono::steady_clock::now().time_since_epoch())
        .count();
  }

  // handler(error_code)
  template <class Token>
  auto async_handshake(boost::asio::ssl::stream_base::handshake_type type, Token&& token) {
    if (ssl_) {
      if (type == boost::asio::ssl::stream_base::server) {
        SSL_set_accept_state(ssl_);
      } else {
        SSL_set_connect_state(ssl_);
      }
    }
    return boost::asio::async_initiate<Token, void(error_code)>(
        [this](auto handler) {
          using H = std::decay_t<decltype(handler)>;
          new_op<HandshakeOp<H>>(std::move(handler));
        },
        token);
  }

  // handler(error_code, bytes)
  template <class MutableBuffers, class Token>
  auto async_read_some(const MutableBuffers& buffers, Token&& token) {
    return boost::asio::async_initiate<Token, void(error_code, std::size_t)>(
        [this, buffers](auto handler) {
          using H = std::decay_t<decltype(handler)>;
          new_op<IoOp<H, Read<MutableBuffers>>>(std::move(handler), Read<MutableBuffers>{buffers});
        },
        token);
  }

  template <class ConstBuffers, class Token>
  auto async_write_some(const ConstBuffers& buffers, Token&& token) {
    return boost::asio::async_initiate<Token, void(error_code, std::size_t)>(
        [this, buffers](auto handler) {
          using H = std::decay_t<decltype(handler)>;
          new_op<IoOp<H, Write<ConstBuffers>>>(std::move(handler), Write<ConstBuffers>{buffers});
        },
        token);
  }

  // Sends close_notify if the socket takes it now, then shuts the socket down.
  void shutdown(error_code& ec) {
    if (ssl_ && SSL_is_init_finished(ssl_)) {
      ERR_clear_error();
      (void)SSL_shutdown(ssl_);
    }
    socket_.shutdown(socket_type::shutdown_both, ec);
  }

 private:
  // What one attempt of an operation needs from OpenSSL.
  struct Attempt {
    bool done = false;
    bool want_write = false;  // not done: wait for writability (else readability)
    error_code ec;
    std::size_t bytes = 0;
  };

  // Maps an OpenSSL result (r <= 0 from an I/O call) to an attempt.
  Attempt Fail(int r) {
    Attempt a;
    switch (SSL_get_error(ssl_, r)) {
      case SSL_ERROR_WANT_READ:
        return a;
      case SSL_ERROR_WANT_WRITE:
        a.want_write = true;
        return a;
      case SSL_ERROR_ZERO_RETURN:  // close_notify
        a.done = true;
        a.ec = boost::asio::error::eof;
        return a;
      case SSL_ERROR_SYSCALL: {
        a.done = true;
        int e = errno;
        if (ERR_peek_error() == 0 && (e == 0 || e == ECONNRESET || e == EPIPE)) {
          // The peer went away without close_notify.
          a.ec = e == 0 ? error_code(boost::asio::ssl::error::stream_truncated)
                        : error_code(e, boost::system::system_category());
        } else if (ERR_peek_error() != 0) {
          a.ec =
              error_code(static_cast<int>(ERR_get_error()), boost::asio::error::get_ssl_category());
        } else {
          a.ec = error_code(e, boost::system::system_category());
        }
        return a;
      }
      default: {
        a.done = true;
        unsigned long e = ERR_get_error();
        a.ec = e ? error_code(static_cast<int>(e), boost::asio::error::get_ssl_category())
                 : error_code(boost::asio::ssl::error::stream_truncated);
        return a;
      }
    }
  }

  template <class Buffers>
  struct Read {
    Buffers buffers;
    Attempt operator()(TlsStream& s) {
      for (auto b : boost::beast::buffers_range_ref(buffers)) {
        if (b.size() == 0) continue;
        ERR_clear_error();
        errno = 0;
        std::size_t n = 0;
        int r = SSL_read_ex(s.ssl_, b.data(), b.size(), &n);
        if (r == 1) return {true, false, {}, n};
        return s.Fail(r);
      }
      return {true, false, {}, 0};  // nothing to read into
    }
  };

  template <class Buffers>
  struct Write {
    Buffers buffers;
    Attempt operator()(TlsStream& s) {
      // Small pieces (a websocket frame's header, a short message) are
      // gathered into one record (up to 16 KiB) so that a header and its
      // payload do not become two records. A large first piece (the middle
      // of a cache chunk) goes to OpenSSL as it is: it copies the bytes into
      // its record buffer anyway. The scratch space is per thread, not per
      // connection; OpenSSL copies it before returning (and
      // ACCEPT_MOVING_WRITE_BUFFER lets a retry pass the same bytes anew).
      thread_local unsigned char scratch[16384];
      const unsigned char* data = scratch;
      std::size_t len = 0;
      for (auto b : boost::beast::buffers_range_ref(buffers)) {
        if (len == 0 && b.size() >= sizeof scratch) {
          data = static_cast<const unsigned char*>(b.data());
          len = b.size();
          break;
        }
        std::size_t take = std::min(b.size(), sizeof scratch - len);
        std::memcpy(scratch + len, b.data(), take);
        len += take;
        if (len == sizeof scratch) break;
      }
      if (len == 0) return {true, false, {}, 0};
      ERR_clear_error();
      errno = 0;
      std::size_t n = 0;
      int r = SSL_write_ex(s.ssl_, data, len, &n);
      if (r == 1) return {true, false, {}, n};
      return s.Fail(r);
    }
  };

  struct Handshake {
    Attempt operator()(TlsStream& s) {
      ERR_clear_error();
      errno = 0;
      int r = SSL_do_handshake(s.ssl_);
      if (r == 1) return {true, false, {}, 0};
      Attempt a = s.Fail(r);
      if (a.done && a.ec == boost::asio::error::eof)
        a.ec = boost::asio::ssl::error::stream_truncated;
      return a;
    }
  };

  // One operation: try, and while OpenSSL wants the socket, wait for it and
  // try again. Completes through beast::async_base, which posts a completion
  // that happens before the initiating function returns.
  template <class Handler, class Step>
  class IoOp : public boost::beast::async_base<Handler, executor_type> {
   public:
    IoOp(Handler&& h, TlsStream& s, Step step)
        : boost::beast::async_base<Handler, executor_type>(std::move(h), s.get_executor()),
          s_(s),
          step_(std::move(step)) {
      Run(false);
    }
    void operator()(error_code ec) {
      s_.InputWaitEnded();
      if (ec) return this->complete(true, ec, std::size_t{0});
      Run(true);
    }

   private:
    void Run(bool continuation) {
      if (!s_.ssl_) {
        return this->complete(continuation, error_code(boost::asio::error::no_memory),
                              std::size_t{0});
      }
      Attempt a = step_(s_);
      if (a.done) return this->complete(continuation, a.ec, a.bytes);
      if (!a.want_write) s_.InputWaitBegan();
      s_.socket_.async_wait(a.want_write ? socket_type::wait_write : socket_type::wait_read,
                            std::move(*this));
    }
    TlsStream& s_;
    Step step_;
  };

  template <class Handler>
  class HandshakeOp : public boost::beast::async_base<Handler, executor_type> {
   public:
    HandshakeOp(Handler&& h, TlsStream& s)
        : boost::beast::async_base<Handler, executor_type>(std::move(h), s.get_executor()), s_(s) {
      Run(false);
    }
    void operator()(error_code ec) {
      s_.InputWaitEnded();
      if (ec) return this->complete(true, ec);
      Run(true);
    }

   private:
    void Run(bool continuation) {
      if (!s_.ssl_) return this->complete(continuation, error_code(boost::asio::error::no_memory));
      Attempt a = Handshake{}(s_);
      if (a.done) return this->complete(continuation, a.ec);
      if (!a.want_write) s_.InputWaitBegan();
      s_.socket_.async_wait(a.want_write ? socket_type::wait_write : socket_type::wait_read,
                            std::move(*this));
    }
    TlsStream& s_;
  };

  template <class Op, class Handler, class... Args>
  void new_op(Handler&& h, Args&&... args) {
    Op(std::forward<Handler>(h), *this, std::forward<Args>(args)...);
  }

  void InputWaitBegan() noexcept {
    if (input_wait_) input_wait_->store(NowNs(), std::memory_order_relaxed);
  }
  void InputWaitEnded() noexcept {
    if (input_wait_) input_wait_->store(0, std::memory_order_relaxed);
  }

  socket_type socket_;
  SSL* ssl_;
  std::atomic<std::int64_t>* input_wait_ = nullptr;
};

// Websocket close: close_notify (if it fits now) and socket shutdown; found by
// Beast through argument-dependent lookup.
inline void teardown(boost::beast::role_type, TlsStream& s, boost::system::error_code& ec) {
  s.shutdown(ec);
  boost::system::error_code ignored;
  s.next_layer().close(ignored);
}

template <class Handler>
void async_teardown(boost::beast::role_type role, TlsStream& s, Handler&& handler) {
  boost::system::error_code ec;
  teardown(role, s, ec);
  boost::asio::post(s.get_executor(),
                    [h = std::forward<Handler>(handler), ec]() mutable { std::move(h)(ec); });
}

}  // namespace muster
