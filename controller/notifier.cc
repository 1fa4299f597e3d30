#include "controller/notifier.h"

#include <sodium.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>

#include "common/json_limits.h"
#include "common/phase.h"
#include "common/utf8.h"

namespace muster {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;
using nlohmann::json;

namespace {

std::string RandomHex(std::size_t bytes) {
  std::vector<unsigned char> raw(bytes);
  randombytes_buf(raw.data(), raw.size());
  std::string hex(bytes * 2 + 1, '\0');
  sodium_bin2hex(hex.data(), hex.size(), raw.data(), raw.size());
  hex.pop_back();
  return hex;
}

// One request/answer on a connected (and, for TLS, handshaken) stream.
template <class Stream>
void Exchange(Stream& stream, http::request<http::string_body>& req, PostResult& out) {
  auto buffer = std::make_shared<beast::flat_buffer>();
  auto parser = std::make_shared<http::response_parser<http::string_body>>();
  parser->body_limit(64 * 1024);  // the answer's body is not used
  http::async_write(stream, req,
                    [&stream, &out, buffer, parser](beast::error_code ec, std::size_t) {
                      if (ec) {
                        out.error = "sending: " + ec.message();
                        return;
                      }
                      http::async_read(stream, *buffer, *parser,
                                       [&out, buffer, parser](beast::error_code ec2, std::size_t) {
                                         if (ec2) {
                                           out.error = "reading the answer: " + ec2.message();
                                           return;
                                         }
                                         out.status = static_cast<int>(parser->get().result_int());
                                       });
                    });
}

}  // namespace

Result<HttpUrl> ParseHttpUrl(std::string_view url) {
  HttpUrl u;
  std::string_view rest;
  if (url.rfind("http://", 0) == 0) {
    rest = url.substr(7);
    u.port = 80;
  } else if (url.rfind("https://", 0) == 0) {
    rest = url.substr(8);
    u.tls = true;
    u.port = 443;
  } else {
    return Err("webhook URL '" + CutUtf8(url, 200) + "' must start with http:// or https://");
  }
  if (url.size() > 2048) return Err("webhook URL is longer than 2048 bytes");
  for (char c : url) {
    if (static_cast<unsigned char>(c) <= 0x20 || c == 0x7f) {
      return Err("webhook URL contains a space or control character");
    }
  }
  auto slash = rest.find_first_of("/?");
  std::string_view authority = rest.substr(0, slash);
  u.target = slash == rest.npos ? "/" : std::string(rest.substr(slash));
  if (u.target[0] == '?') u.target = "/" + u.target;
  if (authority.find('@') != authority.npos) {
    return Err(
        "webhook URL must not carry credentials; the signature authenticates the "
        "controller");
  }
  std::string_view port_text;
  if (!authority.empty() && authority[0] == '[') {
    auto close = authority.find(']');
    if (close == authority.npos) return Err("webhook URL has an unclosed '[' in its host");
    u.host = std::string(authority.substr(1, close - 1));
    auto after = authority.substr(close + 1);
    if (!after.empty()) {
      if (after[0] != ':') return Err("webhook URL: expected ':PORT' after ']'");
      port_text = after.substr(1);
    }
  } else {
    auto colon = authority.rfind(':');
    u.host = std::string(authority.substr(0, colon));
    if (colon != authority.npos) port_text = authority.substr(colon + 1);
  }
  if (u.host.empty()) return Err("webhook URL has no host");
  if (!port_text.empty()) {
    int p = 0;
    for (char c : port_text) {
      if (c < '0' || c > '9' || p > 65535) return Err("webhook URL has a bad port");
      p = p * 10 + (c - '0');
    }
    if (p < 1 || p > 65535) return Err("webhook URL has a bad port");
    u.port = static_cast<std::uint16_t>(p);
  }
  return u;
}

std::string WebhookSignature(std::string_view secret, std::string_view body) {
  crypto_auth_hmacsha256_state st;
  unsigned char mac[crypto_auth_hmacsha256_BYTES];
  crypto_auth_hmacsha256_init(&st, reinterpret_cast<const unsigned char*>(secret.data()),
                              secret.size());
  crypto_auth_hmacsha256_update(&st, reinterpret_cast<const unsigned char*>(body.data()),
                                body.size());
  crypto_auth_hmacsha256_final(&st, mac);
  char hex[sizeof mac * 2 + 1];
  sodium_bin2hex(hex, sizeof hex, mac, sizeof mac);
  return std::string("sha256=") + hex;
}

std::int64_t RetryDelayMs(const NotifierOptions& o, int attempts, double jitter) {
  std::int64_t d = o.retry_base_ms;
  for (int i = 1; i < attempts && d < o.retry_max_ms; ++i) d *= 2;
  d = std::min(d, o.retry_max_ms);
  jitter = std::clamp(jitter, 0.0, 1.0);
  return d / 2 + static_cast<std::int64_t>(static_cast<double>(d - d / 2) * jitter);
}

PostResult HttpPost(const HttpUrl& url,
                    const std::vector<std::pair<std::string, std::string>>& headers,
                    const std::string& body, std::chrono::seconds timeout) {
  PostResult out;
  asio::io_context ioc;  // destroyed last: the streams below use it
  http::request<http::string_body> req{http::verb::post, url.target, 11};
  std::string host = url.host.find(':') != std::string::npos ? "[" + url.host + "]" : url.host;
  req.set(http::field::host, host + ":" + std::to_string(url.port));
  req.set(http::field::user_agent, "muster-controller");
  req.set(http::field::content_type, "application/json");
  for (const auto& [k, v] : headers) req.set(k, v);
  req.body() = body;
  req.keep_alive(false);
  req.prepare_payload();
  tcp::resolver resolver(ioc);
  asio::ssl::context tls(asio::ssl::context::tls_client);
  beast::error_code ec;
  if (url.tls) {
    tls.set_default_verify_paths(ec);
    tls.set_verify_mode(asio::ssl::verify_peer);
  }
  beast::tcp_stream plain(ioc);
  beast::ssl_stream<beast::tcp_stream> secure(ioc, tls);
  beast::tcp_stream& lowest = url.tls ? beast::get_lowest_layer(secure) : plain;
  lowest.expires_after(timeout);
  if (url.tls) {
    if (!SSL_set_tlsext_host_name(secure.native_handle(), url.host.c_str())) {
      return {0, "cannot set the TLS server name"};
    }
    secure.set_verify_callback(asio::ssl::host_name_verification(url.host));
  }
  resolver.async_resolve(
      url.host, std::to_string(url.port),
      [&](beast::error_code rec, const tcp::resolver::results_type& results) {
        if (rec) {
          out.error = "resolving " + url.host + ": " + rec.message();
          return;
        }
        lowest.async_connect(results, [&](beast::error_code cec, const tcp::endpoint&) {
          if (cec) {
            out.error = "connecting: " + cec.message();
            return;
          }
          if (!url.tls) return Exchange(plain, req, out);
          secure.async_handshake(asio::ssl::stream_base::client, [&](beast::error_code hec) {
            if (hec) {
              out.error = "TLS: " + hec.message();
              return;
            }
            Exchange(secure, req, out);
          });
        });
      });
  ioc.run_for(timeout + std::chrono::seconds(1));
  if (!ioc.stopped()) {
    ioc.stop();
    if (out.status == 0 && out.error.empty()) out.error = "timed out";
  }
  if (out.status == 0 && out.error.empty()) out.error = "timed out";
  return out;
}

Notifier::Notifier(Fleet& fleet, NotifierOptions options, Poster poster)
    : fleet_(fleet), store_(fleet.store()), options_(options), poster_(std::move(poster)) {}

Notifier::~Notifier() { Stop(); }

void Notifier::Start() {
  RefreshHooks();
  // Final reports carry their notifications into the store's transaction.
  fleet_.SetStatusOutbox([w = weak_from_this()](StatusWrite& write) {
    if (auto self = w.lock()) self->Outbox(write);
  });
  if (options_.shared_poll_ms > 0 || !Hooks()->empty()) Subscribe();
  sender_ = std::thread([this] { SenderLoop(); });
}

void Notifier::RefreshHooks() {
  auto list = std::make_shared<const std::vector<WebhookRecord>>(store_.ListWebhooks());
  std::lock_guard lock(mu_);
  hooks_ = std::move(list);
}

std::shared_ptr<const std::vector<WebhookRecord>> Notifier::Hooks() const {
  std::lock_guard lock(mu_);
  return hooks_;
}

void Notifier::Outbox(StatusWrite& write) {
  auto ph = ParsePhase(write.ev.phase);
  if (!ph || !IsTerminal(*ph)) return;
  auto hooks = Hooks();
  if (hooks->empty()) return;
  json data = {{"machine", write.ev.machine},
               {"generation", write.ev.generation},
               {"phase", write.ev.phase},
               {"detail", write.ev.detail},
               {"rebootRequired", write.reboot_required}};
  write.deliveries = Deliveries("deploy", std::move(data), *hooks, "", nullptr);
  write.max_queued = options_.max_queued;
}

void Notifier::Subscribe() {
  std::int64_t now = fleet_.Now();
  {
    std::lock_guard lock(mu_);
    if (subscribed_) return;
    subscribed_ = true;
    for (const auto& r : store_.ListRollouts(200)) rollout_state_[r.id] = r.state;
    // Away since before this start: counted from the start, so that agents
    // get the full threshold to reconnect after a controller restart.
    for (const auto& m : store_.ListMachines()) {
      if (!m.revoked && !fleet_.IsOnline(m.name)) {
        offline_since_[m.name] = std::max(m.last_seen, now);
      }
    }
  }
  fleet_.Subscribe(shared_from_this());
}

void Notifier::Stop() {
  {
    std::lock_guard lock(mu_);
    if (stop_) return;
    stop_ = true;
  }
  cv_.notify_all();
  if (sender_.joinable()) sender_.join();
  fleet_.SetStatusOutbox(nullptr);
  fleet_.Unsubscribe(this);
}

void Notifier::Wake() {
  {
    std::lock_guard lock(mu_);
    wake_ = true;
  }
  cv_.notify_all();
}

void Notifier::Deliver(std::string text) {
  // Cheap tests first: most events (logs, publishes) notify nobody.
  bool status = text.find("\"topic\":\"status\"") != std::string::npos;
  bool rollout = text.find("\"topic\":\"rollout\"") != std::string::npos;
  bool machine = text.find("\"topic\":\"machine\"") != std::string::npos;
  if (!status && !rollout && !machine) return;
  json j = json::parse(text, nullptr, false);
  if (j.is_discarded() || !j.is_object() || !j.contains("body")) return;
  try {
    const json& data = j["body"]["data"];
    if (status) {
      // Queued with the report itself (Outbox): only the sender is woken.
      auto ph = ParsePhase(data.value("phase", ""));
      if (ph && IsTerminal(*ph)) Wake();
    } else if (rollout) {
      std::string id = data.value("rollout", "");
      std::string state = data.value("state", "");
      std::string before;
      {
        std::lock_guard lock(mu_);
        auto& slot = rollout_state_[id];
        if (slot == state) return;
        before = slot;
        slot = state;
      }
      Enqueue("rollout", {{"rollout", id},
                          {"state", state},
                          {"previousState", before},
                          {"detail", data.value("detail", "")},
                          {"counts", data.value("counts", json::object())},
                          {"total", data.value("total", 0)}});
    } else if (machine && data.contains("online")) {
      std::string name = data.value("machine", "");
      bool online = data.value("online", false);
      {
        std::lock_guard lock(mu_);
        if (online) {
          offline_since_.erase(name);
          offline_notified_.erase(name);
        } else {
          offline_since_[name] = fleet_.Now();
        }
      }
      if (!online) Wake();  // its deadline may be the nearest now
    }
  } catch (const std::exception& e) {
    spdlog::warn("notifications: ignored an event: {}", e.what());
  }
}

void Notifier::Enqueue(const std::string& event, json data, const std::string& only_webhook,
                       std::string* id_out) {
  // Broadcasts use the webhooks kept current (RefreshHooks); a test of one
  // webhook reads it afresh, as it may have been added through another
  // controller since the last poll.
  auto hooks = only_webhook.empty()
                   ? Hooks()
                   : std::make_shared<const std::vector<WebhookRecord>>(store_.ListWebhooks());
  std::vector<DeliveryRecord> rows =
      Deliveries(event, std::move(data), *hooks, only_webhook, id_out);
  if (rows.empty()) return;
  auto dropped = store_.EnqueueDeliveries(rows, options_.max_queued);
  if (!dropped) {
    spdlog::error("notifications: cannot queue a {} notification: {}", event, dropped.message());
    return;
  }
  if (*dropped > 0) {
    spdlog::warn("notifications: queue full ({} deliveries); dropped the {} oldest",
                 options_.max_queued, *dropped);
  }
  Wake();
}

std::vector<DeliveryRecord> Notifier::Deliveries(const std::string& event, json data,
                                                 const std::vector<WebhookRecord>& hooks,
                                                 const std::string& only_webhook,
                                                 std::string* id_out) {
  std::vector<DeliveryRecord> rows;
  std::int64_t now = fleet_.Now();
  std::string id = RandomHex(16);
  json body = {
      {"version", 1}, {"id", id}, {"event", event}, {"at", now}, {"data", std::move(data)}};
  std::string text = DumpJson(body);
  for (const auto& w : hooks) {
    if (!only_webhook.empty() && w.id != only_webhook) continue;
    if (only_webhook.empty() && !w.events.empty() &&
        std::find(w.events.begin(), w.events.end(), event) == w.events.end()) {
      continue;
    }
    DeliveryRecord d;
    d.webhook = w.id;
    d.event = event;
    d.body = text;
    d.created_at = now;
    d.next_at = now;
    rows.push_back(std::move(d));
  }
  if (id_out) *id_out = id;
  return rows;
}

Result<WebhookRecord> Notifier::Add(const std::string& url, const std::string& secret,
                                    const std::vector<std::string>& events, const std::string& by) {
  auto u = ParseHttpUrl(url);
  if (!u) return u.error();
  if (secret.size() < 16 || secret.size() > 256) {
    return Err("a webhook secret has 16 to 256 bytes");
  }
  for (const auto& e : events) {
    if (std::find_if(std::begin(kEvents), std::end(kEvents),
                     [&](const char* k) { return e == k; }) == std::end(kEvents)) {
      return Err("unknown webhook event '" + CutUtf8(e, 64) +
                 "'; choose from deploy, rollout, offline, test");
    }
  }
  WebhookRecord w;
  w.id = "w" + RandomHex(6);
  w.url = url;
  w.secret = secret;
  w.events = events;
  w.created_by = by;
  w.created_at = fleet_.Now();
  if (auto st = store_.AddWebhook(w); !st) return st.error();
  RefreshHooks();
  Subscribe();  // events cost nothing until the first webhook exists
  return w;
}

Status Notifier::Remove(const std::string& id) {
  auto st = store_.RemoveWebhook(id);
  RefreshHooks();
  return st;
}

Result<std::string> Notifier::Test(const std::string& id, const std::string& by) {
  auto hooks = store_.ListWebhooks();
  if (std::none_of(hooks.begin(), hooks.end(),
                   [&](const WebhookRecord& w) { return w.id == id; })) {
    return Err("no webhook '" + id + "'; see 'muster webhook list'");
  }
  std::string delivery;
  Enqueue("test", {{"webhook", id}, {"by", by}}, id, &delivery);
  return delivery;
}

std::optional<std::int64_t> Notifier::CheckOffline(std::int64_t now) {
  std::vector<std::pair<std::string, std::int64_t>> due;
  std::optional<std::int64_t> next;
  {
    std::lock_guard lock(mu_);
    for (const auto& [name, since] : offline_since_) {
      if (offline_notified_.count(name)) continue;
      std::int64_t at = since + options_.offline_after_ms;
      if (at <= now) {
        due.emplace_back(name, since);
      } else {
        next = next ? std::min(*next, at) : at;
      }
    }
    for (const auto& [name, since] : due) offline_notified_.insert(name);
  }
  for (const auto& [name, since] : due) {
    auto m = store_.GetMachine(name);
    if (!m || m->revoked || fleet_.IsOnline(name)) continue;
    Enqueue("offline", {{"machine", name},
                        {"lastSeen", m->last_seen},
                        {"offlineSince", since},
                        {"thresholdSeconds", options_.offline_after_ms / 1000}});
  }
  return next;
}

void Notifier::Attempt(const DeliveryRecord& d, const std::map<std::string, WebhookRecord>& hooks) {
  auto hook = hooks.find(d.webhook);
  if (hook == hooks.end()) {
    (void)store_.RemoveDelivery(d.id);  // its webhook was removed meanwhile
    return;
  }
  std::string id;
  {
    json b = json::parse(d.body, nullptr, false);
    if (b.is_object()) id = b.value("id", "");
  }
  PostResult r;
  auto url = ParseHttpUrl(hook->second.url);
  if (!url) {
    r.error = url.message();
  } else {
    r = poster_(*url,
                {{"X-Muster-Event", d.event},
                 {"X-Muster-Delivery", id},
                 {"X-Muster-Signature-256", WebhookSignature(hook->second.secret, d.body)}},
                d.body, options_.timeout);
  }
  bool ok = r.status >= 200 && r.status < 300;
  json ev = {{"delivery", id},     {"webhook", d.webhook},
             {"event", d.event},   {"attempt", d.attempts + 1},
             {"status", r.status}, {"delivered", ok}};
  if (ok) {
    (void)store_.RemoveDelivery(d.id);
    fleet_.Broadcast("webhook", ev);
    return;
  }
  DeliveryRecord next = d;
  next.attempts = d.attempts + 1;
  next.last_error = r.status ? "HTTP " + std::to_string(r.status) : CutUtf8(r.error, 512);
  ev["error"] = next.last_error;
  if (next.attempts >= options_.max_attempts) {
    spdlog::error("notifications: gave up on {} delivery {} to {} after {} attempts: {}", d.event,
                  id, hook->second.url, next.attempts, next.last_error);
    (void)store_.RemoveDelivery(d.id);
    ev["gaveUp"] = true;
  } else {
    next.next_at =
        fleet_.Now() + RetryDelayMs(options_, next.attempts, randombytes_uniform(1000) / 1000.0);
    spdlog::warn("notifications: {} delivery {} to {} failed ({}); attempt {} at +{} ms", d.event,
                 id, hook->second.url, next.last_error, next.attempts + 1,
                 next.next_at - fleet_.Now());
    if (auto st = store_.RescheduleDelivery(next); !st) {
      spdlog::error("notifications: {}", st.message());
    }
    ev["retryInMs"] = next.next_at - fleet_.Now();
  }
  fleet_.Broadcast("webhook", ev);
}

void Notifier::SenderLoop() {
  for (;;) {
    if (options_.shared_poll_ms > 0) RefreshHooks();  // webhooks added through the others
    std::int64_t now = fleet_.Now();
    auto offline_next = CheckOffline(now);
    auto due = store_.DueDeliveries(now, 16);
    if (!due.empty()) {
      std::map<std::string, WebhookRecord> hooks;
      for (auto& w : store_.ListWebhooks()) hooks[w.id] = std::move(w);
      for (const auto& d : due) {
        {
          std::lock_guard lock(mu_);
          if (stop_) return;
        }
        Attempt(d, hooks);
      }
      continue;  // there may be more due
    }
    std::optional<std::int64_t> wake_at = store_.NextDeliveryAt();
    if (offline_next) wake_at = wake_at ? std::min(*wake_at, *offline_next) : *offline_next;
    std::unique_lock lock(mu_);
    if (stop_) return;
    // The fleet clock is wall time in unix ms; a minute at most, so that a
    // clock step cannot park the sender.
    std::int64_t most = options_.shared_poll_ms > 0 ? options_.shared_poll_ms : 60000;
    std::int64_t wait_ms =
        wake_at ? std::clamp<std::int64_t>(*wake_at - fleet_.Now(), 0, most) : most;
    cv_.wait_for(lock, std::chrono::milliseconds(wait_ms), [this] { return stop_ || wake_; });
    if (stop_) return;
    wake_ = false;
  }
}

}  // namespace muster
