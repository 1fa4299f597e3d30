#include "agent/link.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <boost/asio/post.hpp>

#include "common/protocol.h"

namespace muster {

std::chrono::milliseconds BackoffDelay(int attempt, std::chrono::milliseconds base,
                                       std::chrono::milliseconds cap, double u) {
  double ceiling = static_cast<double>(base.count());
  for (int i = 0; i < attempt && ceiling < static_cast<double>(cap.count()); ++i) ceiling *= 2;
  ceiling = std::min(ceiling, static_cast<double>(cap.count()));
  return std::chrono::milliseconds(static_cast<long long>(ceiling * u));
}

Link::Link(boost::asio::io_context& ioc, const AgentConfig& config,
           std::shared_ptr<boost::asio::ssl::context> tls, Callbacks callbacks)
    : ioc_(ioc), config_(config), tls_(std::move(tls)), cb_(std::move(callbacks)), timer_(ioc) {}

void Link::Start() { Connect(); }

void Link::Stop() {
  stopped_ = true;
  timer_.cancel();
  if (client_) client_->Close("agent stopping");
}

bool Link::Send(std::string text) {
  if (!connected_ || !client_) return false;
  client_->Send(std::move(text));
  return true;
}

void Link::Drop(const std::string& reason) {
  if (client_) client_->Close(reason);
}

void Link::Connect() {
  if (stopped_) return;
  const WsUrl& url = config_.controllers[url_index_ % config_.controllers.size()];
  ClientOptions o;
  o.url = url;
  o.tls = tls_;
  o.ping_interval = config_.ping_interval;
  o.idle_timeout = config_.idle_timeout;
  o.user_agent = std::string("muster-agent/") + MUSTER_VERSION;
  // Cache chunks arrive in binary frames of up to 1 MiB whatever the limit for messages.
  o.max_message_bytes = std::max(config_.max_message_bytes, proto::kMaxFetchedFrameBytes);
  o.max_text_message_bytes = config_.max_message_bytes;
  std::uint64_t epoch = ++epoch_;
  WsClient::Handlers h;
  h.on_open = [this, epoch] {
    if (epoch != epoch_) return;
    connected_ = true;
    if (cb_.on_open) cb_.on_open();
  };
  h.on_message = [this, epoch](std::string text) {
    if (epoch != epoch_) return;
    if (cb_.on_message) cb_.on_message(std::move(text));
  };
  h.on_oversize = [this, epoch](std::size_t limit) {
    if (epoch != epoch_) return;
    spdlog::error(
        "the controller sent a message larger than maxMessageBytes ({} bytes), probably a deploy "
        "with large vars; it was refused and would be sent again on every reconnect. Set "
        "maxMessageBytes here to at least the controller's --max-message-bytes (an up-to-date "
        "controller refuses such a publish), or publish smaller vars",
        limit);
    // The same message would follow the next welcome: wait as long as the cap.
    attempt_ = 64;
  };
  h.on_close = [this, epoch](std::string reason) {
    if (epoch != epoch_) return;
    boost::asio::post(ioc_, [this, reason] { OnDown(reason); });
  };
  spdlog::debug("connecting to {}", url.ToString());
  client_ = WsClient::Create(ioc_.get_executor(), o, std::move(h));
  client_->Connect();
}

void Link::OnDown(const std::string& reason) {
  bool was = connected_;
  connected_ = false;
  client_.reset();
  if (cb_.on_down) cb_.on_down(reason);
  if (stopped_) return;
  ++url_index_;
  std::uniform_real_distribution<double> u(0.0, 1.0);
  auto delay = BackoffDelay(attempt_, config_.backoff_base, config_.backoff_cap, u(rng_));
  ++attempt_;
  if (was) {
    spdlog::warn("connection lost: {}; reconnecting in {} ms", reason, delay.count());
  } else {
    spdlog::warn("{}; retrying in {} ms", reason, delay.count());
  }
  timer_.expires_after(delay);
  timer_.async_wait([this](const boost::system::error_code& ec) {
    if (!ec) Connect();
  });
}

}  // namespace muster
