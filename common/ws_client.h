// One outbound TLS 1.3 websocket connection (used by the agent and the CLI).
//
// Callback-based; every handler runs on the client's strand. The client pings
// every ping_interval and closes the connection when nothing (data or pong) was
// received for idle_timeout: Beast's client preset would never notice a dead
// server. Connect once per object: after on_close, create a new client.
// Send and Close are thread-safe. The websocket stream type is instantiated in
// ws_client.cc only.
#pragma once

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/ssl/context.hpp>
#include <chrono>
#include <cstddef>
#include <functional>
#include <memory>
#include <string>

#include "common/url.h"

namespace muster {

struct ClientOptions {
  WsUrl url;
  std::shared_ptr<boost::asio::ssl::context> tls;
  // Name resolution and TCP connect.
  std::chrono::milliseconds connect_timeout{std::chrono::seconds(10)};
  // TLS handshake and websocket upgrade, once TCP is up. Long, because a
  // controller taking in a whole fleet at once (after a restart) queues
  // connections and handshakes them in turn rather than cutting them.
  std::chrono::milliseconds handshake_timeout{std::chrono::seconds(60)};
  std::chrono::milliseconds ping_interval{std::chrono::seconds(50)};
  std::chrono::milliseconds idle_timeout{std::chrono::seconds(150)};
  std::size_t max_message_bytes = 1 << 20;
  // A lower bound for text messages (0: max_message_bytes), when binary
  // frames (bulk bytes) may be larger than any JSON message should be.
  std::size_t max_text_message_bytes = 0;
  std::string user_agent = "muster";
};

class WsClient {
 public:
  struct Handlers {
    std::function<void()> on_open;
    std::function<void(std::string text)> on_message;
    // Called exactly once when a connection attempt or connection ends. reason
    // is suitable for a log line (includes TLS pin mismatches and close reasons).
    std::function<void(std::string reason)> on_close;
    // Called (before on_close) when the peer sent a message larger than
    // max_message_bytes; the connection is then closed with code 1009.
    std::function<void(std::size_t limit)> on_oversize;
  };

  static std::shared_ptr<WsClient> Create(boost::asio::any_io_executor ex, ClientOptions options,
                                          Handlers handlers);
  virtual ~WsClient() = default;

  virtual void Connect() = 0;
  virtual void Send(std::string text) = 0;
  // Sends a binary frame (proto::EncodeBinary). A binary frame received is
  // handed to on_message as it is; proto::Decode recognises it.
  virtual void SendBinary(std::string bytes) = 0;
  virtual void Close(std::string reason) = 0;
  // Drops the TCP connection without a close handshake (tests, fault paths).
  virtual void Abort() = 0;
};

}  // namespace muster
