// Webhook notifications: deploy final states, rollout state changes and
// machines offline longer than a threshold, POSTed as signed JSON.
//
// Every notification is first written to the store's bounded queue (one row
// per webhook), then sent by one sender thread; a delivery leaves the queue
// only when the receiver answered 2xx (or after max_attempts, logged), so a
// controller restart loses nothing. A deploy's notification is queued in the
// same transaction as the final report itself (Fleet's status outbox), so
// that a controller dying between storing the report and queueing it cannot
// lose it either. Failed attempts are retried with
// exponential backoff and jitter. Body and headers: docs/DASHBOARD.md.
//
// Threading: Deliver (the Fleet's broadcast) and the public methods may be
// called from any thread; the sender runs on its own thread between Start and
// Stop.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "controller/fleet.h"
#include "controller/store.h"

namespace muster {

struct NotifierOptions {
  std::int64_t offline_after_ms = 10 * 60 * 1000;  // "offline" after this long away
  std::int64_t max_queued = 10000;                 // bound on the durable queue
  int max_attempts = 20;                           // then the delivery is dropped (logged)
  std::int64_t retry_base_ms = 1000;               // first retry; doubles, with jitter
  std::int64_t retry_max_ms = 3600 * 1000;
  std::chrono::seconds timeout{10};  // per attempt: connect, send, answer
  // 0: this controller's queue alone (SQLite). Else the queue is shared by
  // several controllers (PostgreSQL; the store claims each delivery for one):
  // the sender looks at it at least this often, for deliveries queued or
  // left by the others, and events are watched from the start, since a
  // webhook may be added through another controller.
  std::int64_t shared_poll_ms = 0;
};

// An http:// or https:// webhook address.
struct HttpUrl {
  bool tls = false;
  std::string host;  // without brackets
  std::uint16_t port = 0;
  std::string target;  // path and query, starts with '/'
};
Result<HttpUrl> ParseHttpUrl(std::string_view url);

// "sha256=<lowercase hex of HMAC-SHA256(secret, body)>": the
// X-Muster-Signature-256 header.
std::string WebhookSignature(std::string_view secret, std::string_view body);

// The delay before attempt `attempts + 1` (attempts >= 1 failed so far):
// retry_base_ms * 2^(attempts-1), capped, then a uniform draw from its upper
// half (jitter in [0,1)).
std::int64_t RetryDelayMs(const NotifierOptions& o, int attempts, double jitter);

// What one POST did: the HTTP status, or why there was none.
struct PostResult {
  int status = 0;  // 0: no answer
  std::string error;
};
using Poster = std::function<PostResult(
    const HttpUrl& url, const std::vector<std::pair<std::string, std::string>>& headers,
    const std::string& body, std::chrono::seconds timeout)>;
// The real poster: Boost.Beast over TCP, TLS (system CAs, host name checked)
// for https.
PostResult HttpPost(const HttpUrl& url,
                    const std::vector<std::pair<std::string, std::string>>& headers,
                    const std::string& body, std::chrono::seconds timeout);

class Notifier : public EventSink, public std::enable_shared_from_this<Notifier> {
 public:
  Notifier(Fleet& fleet, NotifierOptions options, Poster poster = HttpPost);
  ~Notifier() override;

  // Starts the sender thread, and subscribes to the fleet's events when a
  // webhook exists (Add subscribes too): without webhooks, fleet events cost
  // nothing here.
  void Start();
  void Stop();

  // EventSink: turns fleet events into queued notifications.
  void Deliver(std::string text) override;
  // Another controller notifies for the agents connected to it.
  bool WantsRemoteEvents() const override { return false; }

  // Operator requests (webhook.*).
  Result<WebhookRecord> Add(const std::string& url, const std::string& secret,
                            const std::vector<std::string>& events, const std::string& by);
  Status Remove(const std::string& id);
  // Queues a "test" notification for one webhook; returns its delivery id
  // (the body's "id", which the "webhook" fleet event reports on).
  Result<std::string> Test(const std::string& id, const std::string& by);

  static constexpr const char* kEvents[] = {"deploy", "rollout", "offline", "test"};

 private:
  // Queues body (with a fresh delivery id) for every webhook wanting event.
  void Enqueue(const std::string& event, nlohmann::json data, const std::string& only_webhook = "",
               std::string* id_out = nullptr);
  // The rows of one notification (a fresh delivery id) for the hooks wanting event.
  std::vector<DeliveryRecord> Deliveries(const std::string& event, nlohmann::json data,
                                         const std::vector<WebhookRecord>& hooks,
                                         const std::string& only_webhook, std::string* id_out);
  // Fleet's status outbox: a final report's "deploy" notifications, queued
  // in the report's own transaction, so that a controller dying between the
  // two loses none.
  void Outbox(StatusWrite& write);
  // Re-reads the webhooks (at the start, on Add/Remove, and at each poll of
  // a shared queue, for webhooks added through other controllers).
  void RefreshHooks();
  std::shared_ptr<const std::vector<WebhookRecord>> Hooks() const;
  void SenderLoop();
  void Attempt(const DeliveryRecord& d, const std::map<std::string, WebhookRecord>& hooks);
  // Offline machines past the threshold, queued once per absence; returns the
  // next time one will be due (or nullopt).
  std::optional<std::int64_t> CheckOffline(std::int64_t now);
  void Wake();
  void Subscribe();  // once

  Fleet& fleet_;
  Store& store_;
  NotifierOptions options_;
  Poster poster_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  bool wake_ = false;
  bool subscribed_ = false;
  // The webhooks, as last read (RefreshHooks): events cost no query.
  std::shared_ptr<const std::vector<WebhookRecord>> hooks_ =
      std::make_shared<const std::vector<WebhookRecord>>();  // under mu_
  std::thread sender_;
  std::map<std::string, std::string> rollout_state_;   // rollout id → last state seen
  std::map<std::string, std::int64_t> offline_since_;  // machine → unix ms
  std::set<std::string> offline_notified_;
};

}  // namespace muster
