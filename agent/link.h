// The agent's one connection to a controller, kept up forever.
//
// Tries the configured controller URLs in turn and reconnects after any loss
// with full-jitter exponential backoff: the n-th consecutive failure waits a
// uniformly random time in [0, min(cap, base * 2^n)]. All methods must be called
// on the io_context's thread (the agent posts there).
#pragma once

#include <boost/asio/io_context.hpp>
#include <boost/asio/ssl/context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <functional>
#include <memory>
#include <random>
#include <string>

#include "agent/config.h"
#include "common/ws_client.h"

namespace muster {

// Full-jitter backoff: a pure function of the attempt number and a random draw
// u in [0, 1).
std::chrono::milliseconds BackoffDelay(int attempt, std::chrono::milliseconds base,
                                       std::chrono::milliseconds cap, double u);

class Link {
 public:
  struct Callbacks {
    std::function<void()> on_open;  // connected: send hello now
    std::function<void(std::string)> on_message;
    std::function<void(const std::string& reason)> on_down;
  };

  Link(boost::asio::io_context& ioc, const AgentConfig& config,
       std::shared_ptr<boost::asio::ssl::context> tls, Callbacks callbacks);

  void Start();
  void Stop();
  bool connected() const { return connected_; }
  // Sends if connected; returns false otherwise.
  bool Send(std::string text);
  // The session is healthy (welcome received): the next failure starts over.
  void ResetBackoff() { attempt_ = 0; }
  // Drops the current connection (e.g. after an error message); reconnects.
  void Drop(const std::string& reason);

 private:
  void Connect();
  void OnDown(const std::string& reason);

  boost::asio::io_context& ioc_;
  const AgentConfig& config_;
  std::shared_ptr<boost::asio::ssl::context> tls_;
  Callbacks cb_;
  std::shared_ptr<WsClient> client_;
  boost::asio::steady_timer timer_;
  std::mt19937_64 rng_{std::random_device{}()};
  std::size_t url_index_ = 0;
  int attempt_ = 0;
  bool connected_ = false;
  bool stopped_ = false;
  std::uint64_t epoch_ = 0;  // identifies the current client in callbacks
};

}  // namespace muster
