// A blocking request/response connection for the CLI, built on WsClient.
// Not thread-safe: one CLI thread drives it.
#pragma once

#include <boost/asio/io_context.hpp>
#include <chrono>
#include <deque>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>

#include "common/error.h"
#include "common/protocol.h"
#include "common/ws_client.h"

namespace muster {

class Connection {
 public:
  // Connects and completes the TLS and websocket handshakes, or fails with a
  // message saying what to check.
  static Result<std::unique_ptr<Connection>> Open(ClientOptions options);
  ~Connection();

  // Sends a request and waits for its response. Events arriving meanwhile are
  // queued for NextEvent.
  Result<nlohmann::json> Call(const std::string& method, nlohmann::json params,
                              std::chrono::milliseconds timeout = std::chrono::seconds(60));
  // Pipelining: sends a request (a binary frame carrying payload, see
  // proto::EncodeBinary) without waiting; returns its id for Await.
  std::uint64_t Send(const std::string& method, nlohmann::json params, std::string payload);
  // Waits for the response to the request id (responses to other requests
  // that arrive meanwhile are kept for their own Await).
  Result<nlohmann::json> Await(std::uint64_t id, std::chrono::milliseconds timeout);
  // Waits up to timeout for an event; nullopt on timeout. Fails if the
  // connection ended.
  Result<std::optional<proto::Event>> NextEvent(std::chrono::milliseconds timeout);

 private:
  Connection() = default;
  bool Pump(std::chrono::milliseconds timeout);

  boost::asio::io_context ioc_;
  std::shared_ptr<WsClient> client_;
  std::deque<std::string> inbox_;
  std::deque<proto::Event> events_;
  std::map<std::uint64_t, proto::Response> responses_;  // arrived before their Await
  bool open_ = false;
  bool closed_ = false;
  std::string close_reason_;
  std::uint64_t next_id_ = 1;
  proto::DecodeLimits limits_;  // the connection's message limit, not the agents' default
};

}  // namespace muster
