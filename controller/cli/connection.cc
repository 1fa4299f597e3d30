#include "controller/cli/connection.h"

namespace muster {

Result<std::unique_ptr<Connection>> Connection::Open(ClientOptions options) {
  std::unique_ptr<Connection> c(new Connection());
  Connection* self = c.get();
  WsClient::Handlers h;
  h.on_open = [self] { self->open_ = true; };
  h.on_message = [self](std::string t) { self->inbox_.push_back(std::move(t)); };
  h.on_close = [self](std::string r) {
    self->closed_ = true;
    self->close_reason_ = std::move(r);
  };
  auto timeout = options.connect_timeout + options.handshake_timeout + std::chrono::seconds(1);
  c->limits_.max_bytes = options.max_message_bytes;
  c->client_ = WsClient::Create(c->ioc_.get_executor(), std::move(options), std::move(h));
  c->client_->Connect();
  auto deadline = std::chrono::steady_clock::now() + timeout;
  while (!c->open_ && !c->closed_ && std::chrono::steady_clock::now() < deadline) {
    c->ioc_.run_one_for(std::chrono::milliseconds(100));
  }
  if (!c->open_) {
    return Err(c->closed_ ? c->close_reason_ : std::string("connection timed out"));
  }
  return c;
}

Connection::~Connection() {
  if (client_ && !closed_) {
    client_->Close("bye");
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(2);
    while (!closed_ && std::chrono::steady_clock::now() < deadline) {
      ioc_.run_one_for(std::chrono::milliseconds(50));
    }
  }
}

bool Connection::Pump(std::chrono::milliseconds timeout) {
  if (!inbox_.empty()) return true;
  auto deadline = std::chrono::steady_clock::now() + timeout;
  while (inbox_.empty() && !closed_ && std::chrono::steady_clock::now() < deadline) {
    ioc_.run_one_for(std::chrono::milliseconds(50));
  }
  return !inbox_.empty();
}

Result<nlohmann::json> Connection::Call(const std::string& method, nlohmann::json params,
                                        std::chrono::milliseconds timeout) {
  proto::Request req;
  req.id = next_id_++;
  req.method = method;
  req.params = std::move(params);
  client_->Send(proto::Encode(req));
  return Await(req.id, timeout);
}

std::uint64_t Connection::Send(const std::string& method, nlohmann::json params,
                               std::string payload) {
  proto::Request req;
  req.id = next_id_++;
  req.method = method;
  req.params = std::move(params);
  req.payload = std::move(payload);
  std::uint64_t id = req.id;
  client_->SendBinary(proto::EncodeBinary(std::move(req)));
  return id;
}

Result<nlohmann::json> Connection::Await(std::uint64_t id, std::chrono::milliseconds timeout) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    if (auto it = responses_.find(id); it != responses_.end()) {
      proto::Response r = std::move(it->second);
      responses_.erase(it);
      if (!r.ok) return Err(r.error);
      return std::move(r.result);
    }
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0)
      return Err("no answer from the controller within " + std::to_string(timeout.count() / 1000) +
                 " s");
    if (!Pump(left)) {
      if (closed_) return Err("connection closed: " + close_reason_);
      continue;
    }
    std::string text = std::move(inbox_.front());
    inbox_.pop_front();
    auto msg = proto::Decode(text, limits_);
    if (!msg) return Err("controller sent an invalid message: " + msg.message());
    if (auto* e = std::get_if<proto::Event>(&*msg)) {
      events_.push_back(std::move(*e));
      continue;
    }
    if (auto* err = std::get_if<proto::ErrorMsg>(&*msg)) return Err(err->message);
    if (auto* r = std::get_if<proto::Response>(&*msg)) {
      // Only requests still awaited are kept (ids below next_id_).
      if (r->id > 0 && r->id < next_id_) responses_[r->id] = std::move(*r);
    }
  }
}

Result<std::optional<proto::Event>> Connection::NextEvent(std::chrono::milliseconds timeout) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    if (!events_.empty()) {
      auto e = std::move(events_.front());
      events_.pop_front();
      return std::optional<proto::Event>(std::move(e));
    }
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) return std::optional<proto::Event>();
    if (!Pump(left)) {
      if (closed_) return Err("connection closed: " + close_reason_);
      return std::optional<proto::Event>();
    }
    std::string text = std::move(inbox_.front());
    inbox_.pop_front();
    auto msg = proto::Decode(text, limits_);
    if (!msg) return Err("controller sent an invalid message: " + msg.message());
    if (auto* e = std::get_if<proto::Event>(&*msg)) events_.push_back(std::move(*e));
    if (auto* err = std::get_if<proto::ErrorMsg>(&*msg)) return Err(err->message);
  }
}

}  // namespace muster
