#include "controller/server.h"

#include <spdlog/spdlog.h>
#include <sys/ioctl.h>
#include <sys/socket.h>

#include <array>
#include <boost/asio/ip/v6_only.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/websocket.hpp>
#include <condition_variable>
#include <deque>
#include <functional>
#include <list>
#include <optional>
#include <thread>
#include <variant>

#include "common/process.h"
#include "common/protocol.h"
#include "common/tls.h"
#include "common/utf8.h"
#include "controller/tls_stream.h"

namespace muster {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
namespace websocket = beast::websocket;
using tcp = asio::ip::tcp;
using Clock = std::chrono::steady_clock;

namespace {

using WsStream = websocket::stream<TlsStream>;  // tls_stream.h: no per-connection buffers

class Session;

// Records agents' hellos and status reports on one thread, in group commits:
// each is durable before its answer (welcome, ack) is sent, as when each had
// its own transaction, but one fsync covers everything that arrived meanwhile.
// A session reads its next message only once the previous one is answered, so
// an agent's messages stay in order. Callbacks run on the writer thread.
class StoreWriter {
 public:
  using HelloDone = std::function<void(Result<std::vector<std::string>>)>;
  using StatusDone = std::function<void(Result<std::string>)>;
  using PublishDone = std::function<void(Result<GenerationRecord>)>;
  explicit StoreWriter(Fleet& fleet) : fleet_(fleet) {}
  ~StoreWriter() { Stop(); }

  void SubmitHello(Fleet::HelloRequest request, HelloDone done) {
    Item it;
    it.hello = std::move(request);
    it.hello_done = std::move(done);
    Push(std::move(it));
  }
  void SubmitStatus(std::string machine, proto::StatusReport report, StatusDone done) {
    Item it;
    it.hello.machine = std::move(machine);
    it.report = std::move(report);
    it.status_done = std::move(done);
    Push(std::move(it));
  }
  // A publish checked by Api::PreparePublish (an error passes through, in
  // order with the operator's other publishes).
  void SubmitPublish(std::string operator_name, Result<GenerationRecord> prepared,
                     PublishDone done) {
    Item it;
    it.hello.machine = std::move(operator_name);
    it.publish = std::move(prepared);
    it.publish_done = std::move(done);
    Push(std::move(it));
  }

  // A connection that ended (Fleet::ForgetAgent said a departure is due):
  // last seen at `at`, no longer held here. Written in order with the hellos
  // (a departure queued before a reconnect's hello is written before it).
  void SubmitGone(std::string machine, std::int64_t at) {
    Item it;
    it.hello.machine = std::move(machine);
    it.gone_at = at;
    Push(std::move(it));
  }

  // Joins the thread; what is still queued is dropped (never answered), except
  // departures, which are written (nothing waits for them, and last-seen
  // times should not be lost with a stopping controller).
  void Stop() {
    {
      std::lock_guard lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    if (thread_.joinable() && thread_.get_id() != std::this_thread::get_id()) thread_.join();
    std::vector<Store::Departure> gone;
    {
      std::lock_guard lock(mu_);
      for (auto& it : queue_) {
        if (it.gone_at) gone.push_back({std::move(it.hello.machine), it.gone_at});
      }
      queue_.clear();
    }
    fleet_.RecordDepartures(gone);
  }

 private:
  struct Item {
    std::int64_t gone_at = 0;   // set for a departure
    Fleet::HelloRequest hello;  // hello.machine: the machine, or a publish's operator
    proto::StatusReport report;
    HelloDone hello_done;                        // set for a hello
    StatusDone status_done;                      // set for a status report
    Result<GenerationRecord> publish = Err("");  // a publish: hello.machine is the operator
    PublishDone publish_done;                    // set for a publish
  };
  static constexpr std::size_t kMaxBatch = 4096;

  void Push(Item item) {
    std::lock_guard lock(mu_);
    if (stop_) return;
    if (!thread_.joinable()) thread_ = std::thread([this] { Loop(); });
    queue_.push_back(std::move(item));
    cv_.notify_one();
  }

  void Loop() {
    for (;;) {
      std::vector<Item> batch;
      {
        std::unique_lock lock(mu_);
        cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
        if (stop_) return;
        std::size_t n = std::min(queue_.size(), kMaxBatch);
        batch.assign(std::make_move_iterator(queue_.begin()),
                     std::make_move_iterator(queue_.begin() + static_cast<std::ptrdiff_t>(n)));
        queue_.erase(queue_.begin(), queue_.begin() + static_cast<std::ptrdiff_t>(n));
      }
      std::vector<Fleet::HelloRequest> hellos;
      std::vector<std::pair<std::string, proto::StatusReport>> reports;
      std::vector<std::pair<std::string, GenerationRecord>> publishes;
      std::vector<Store::Departure> gone;
      for (auto& it : batch) {
        if (it.gone_at) {
          gone.push_back({std::move(it.hello.machine), it.gone_at});
        } else if (it.hello_done) {
          hellos.push_back(std::move(it.hello));
        } else if (it.publish_done) {
          if (it.publish) publishes.emplace_back(it.hello.machine, *it.publish);
        } else {
          reports.emplace_back(std::move(it.hello.machine), std::move(it.report));
        }
      }
      decltype(fleet_.AgentHellos(hellos)) welcomed;
      decltype(fleet_.AgentStatuses(reports)) acked;
      std::vector<Status> published;
      try {
        // Departures first: one queued before a hello of the same machine
        // (it reconnected) must not undo that hello's presence; one queued
        // after it can only be of an older connection, already replaced in
        // memory, so none is queued (Fleet::ForgetAgent).
        fleet_.RecordDepartures(gone);
        if (!hellos.empty()) welcomed = fleet_.AgentHellos(hellos);
        if (!reports.empty()) acked = fleet_.AgentStatuses(reports);
        if (!publishes.empty()) published = fleet_.CommitPublishes(publishes);
      } catch (const std::exception& e) {
        // Never end the thread (or the process): answer the whole batch with
        // the error, so that each session closes and its agent reconnects.
        spdlog::error("recording {} hello(s) and {} status report(s) failed: {}", hellos.size(),
                      reports.size(), e.what());
        std::string why = std::string("controller error while recording: ") + e.what();
        welcomed.clear();
        acked.clear();
        for (std::size_t i = 0; i < hellos.size(); ++i) welcomed.emplace_back(Err(why));
        for (std::size_t i = 0; i < reports.size(); ++i) acked.emplace_back(Err(why));
        published.assign(publishes.size(), Status(Err(why)));
      }
      std::size_t h = 0, r = 0, q = 0;
      for (auto& it : batch) {
        if (it.gone_at) continue;
        try {
          if (it.hello_done) {
            it.hello_done(std::move(welcomed[h++]));
          } else if (it.publish_done) {
            if (it.publish) {
              const Status& st = published[q++];
              if (!st) it.publish = st.error();
            }
            it.publish_done(std::move(it.publish));
          } else {
            it.status_done(std::move(acked[r++]));
          }
        } catch (const std::exception& e) {
          spdlog::error("answering a hello or status report failed: {}", e.what());
        }
      }
    }
  }

  Fleet& fleet_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Item> queue_;
  std::thread thread_;
  bool stop_ = false;
};

// Runs operators' cache requests (uploads verify and hash as they arrive; a
// commit or a GC touches the disk for seconds) on a thread of its own, so
// that they never hold an I/O thread that serves agents. One job at a time;
// a session waits for its job before it reads on (backpressure: one chunk per
// uploader in memory here). Callbacks run on the worker thread.
class CacheWorker {
 public:
  // threads: jobs run at once (started on first use).
  explicit CacheWorker(std::size_t threads = 1) : threads_(threads) {}
  ~CacheWorker() { Stop(); }

  void Submit(std::function<void()> job) {
    std::lock_guard lock(mu_);
    if (stop_) return;
    while (pool_.size() < threads_) pool_.emplace_back([this] { Loop(); });
    queue_.push_back(std::move(job));
    cv_.notify_one();
  }

  // Joins the threads; what is still queued is dropped (never answered).
  void Stop() {
    {
      std::lock_guard lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : pool_) {
      if (t.joinable() && t.get_id() != std::this_thread::get_id()) t.join();
    }
  }

 private:
  void Loop() {
    for (;;) {
      std::function<void()> job;
      {
        std::unique_lock lock(mu_);
        cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
        if (stop_) return;
        job = std::move(queue_.front());
        queue_.pop_front();
      }
      try {
        job();
      } catch (const std::exception& e) {
        spdlog::error("cache request failed: {}", e.what());
      }
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_;
  std::size_t threads_;
  std::vector<std::thread> pool_;
  bool stop_ = false;
};

struct Shared {
  Shared(Fleet& f, Api& a, std::shared_ptr<asio::ssl::context> t, ServerOptions o,
         std::shared_ptr<ServerStats> s)
      : fleet(f),
        api(a),
        tls(std::move(t)),
        options(std::move(o)),
        stats(std::move(s)),
        store_writer(f),
        log_writer([&f](const std::vector<Fleet::LogWrite>& w) { return f.AgentLogBatch(w); },
                   options.log_queue, stats->logs) {}
  Fleet& fleet;
  Api& api;
  std::shared_ptr<asio::ssl::context> tls;
  ServerOptions options;
  std::shared_ptr<ServerStats> stats;
  // Admission: at most options.max_handshakes connections go through their
  // TLS handshake at once; the others wait their turn, first come first
  // served, holding only a socket (no TLS or websocket state). A fleet that
  // reconnects all at once (controller restart) is then taken in at the rate
  // the CPU does handshakes, instead of being cut and pushed onto backoffs.
  std::mutex admission_mu;
  std::list<std::weak_ptr<Session>> holders;  // in their handshake, oldest grant first
  std::deque<std::weak_ptr<Session>> waiting;
  StoreWriter store_writer;
  LogWriter log_writer;  // agents' log lines, off the I/O threads
  CacheWorker cache_worker;
  CacheWorker rollout_worker;  // rollout.create, one at a time, off the I/O threads
  // Agents' fetches when the cache's bytes are a database round trip away
  // (as many at once as the cache storage has connections).
  CacheWorker fetch_worker{4};
};

// Errors that only mean "the peer went away"; not worth a warning.
bool Benign(const beast::error_code& ec) {
  return ec == asio::error::operation_aborted || ec == websocket::error::closed ||
         ec == beast::error::timeout || ec == asio::error::eof ||
         ec == asio::ssl::error::stream_truncated || ec == asio::error::connection_reset ||
         ec == asio::error::broken_pipe;
}

std::string Endpoint(const tcp::socket& s) {
  beast::error_code ec;
  auto ep = s.remote_endpoint(ec);
  if (ec) return "?";
  return ep.address().to_string() + ":" + std::to_string(ep.port());
}

class Session : public std::enable_shared_from_this<Session>,
                public AgentChannel,
                public EventSink {
 public:
  Session(tcp::socket socket, std::shared_ptr<Shared> shared)
      : shared_(std::move(shared)),
        ex_(socket.get_executor()),
        raw_(std::move(socket)),
        timer_(ex_),
        hs_timer_(ex_),
        pause_timer_(ex_) {
    peer_ = Endpoint(raw_);
    ++shared_->stats->sessions_open;
    ++shared_->stats->connections;
  }
  ~Session() override {
    LeaveHandshake();
    --shared_->stats->sessions_open;
  }

  void Run() {
    asio::dispatch(ex_, [self = shared_from_this()] { self->WaitForBytes(); });
  }

  // AgentChannel / EventSink: thread-safe, post onto the strand.
  void Send(std::string text) override {
    asio::post(ex_, [self = shared_from_this(), t = std::move(text)]() mutable {
      self->Queue(std::move(t));
    });
  }
  void Deliver(std::string text) override { Send(std::move(text)); }
  void Close(std::string reason) override {
    asio::post(ex_, [self = shared_from_this(), r = std::move(reason)]() mutable {
      self->CloseWith("closed", std::move(r));
    });
  }

 private:
  const ServerOptions& opts() const { return shared_->options; }

  // The TLS and websocket machinery (~90 KiB) is built only once the peer has
  // sent something and a handshake slot is free: a connection that stalls in
  // TCP or waits its turn costs a socket and a timer. Silent connections are
  // cut at handshake_timeout; one that has sent its first bytes waits for a
  // slot up to admission_timeout; the handshake timeout then runs again from
  // the slot's grant.
  void WaitForBytes() {
    timer_.expires_after(opts().handshake_timeout);
    timer_.async_wait([self = shared_from_this()](beast::error_code ec) {
      if (ec || self->ws_ || self->closed_ || self->got_bytes_) return;
      self->shared_->stats->Refuse("handshake-timeout");
      beast::error_code ig;
      self->raw_.close(ig);
    });
    raw_.async_wait(tcp::socket::wait_read, [self = shared_from_this()](beast::error_code ec) {
      if (ec || !self->raw_.is_open() || self->closed_) return self->End();
      self->OnFirstBytes();
    });
  }

  // A slot (or a place in the queue) is taken only once the first TLS record
  // (the ClientHello) has arrived whole: a peer that sends part of one and
  // stalls is looked at again every 200 ms and cut at the handshake timeout,
  // and never keeps a live agent out of a slot. Real clients send the
  // ClientHello at once.
  void OnFirstBytes() {
    if (closed_ || !raw_.is_open()) return End();
    if (FirstRecordComplete()) {
      got_bytes_ = true;
      timer_.cancel();
      return RequestSlot();
    }
    pause_timer_.expires_after(std::chrono::milliseconds(200));
    pause_timer_.async_wait([self = shared_from_this()](beast::error_code ec) {
      if (ec) return self->End();
      self->OnFirstBytes();
    });
  }

  bool FirstRecordComplete() {
    unsigned char h[5];
    int fd = raw_.native_handle();
    ssize_t n = ::recv(fd, h, sizeof h, MSG_PEEK | MSG_DONTWAIT);
    if (n <= 0) return true;  // EOF or an error: the TLS handshake reports it
    if (n < 5) return false;
    if (h[0] != 0x16) return true;  // not a handshake record: TLS refuses it at once
    std::size_t need = 5 + (static_cast<std::size_t>(h[3]) << 8 | h[4]);
    int avail = 0;
    if (::ioctl(fd, FIONREAD, &avail) != 0) return true;
    return static_cast<std::size_t>(avail) >= need;
  }

  void RequestSlot() {
    bool granted = false, full = false, queued = false;
    std::shared_ptr<Session> evict;
    {
      std::lock_guard lock(shared_->admission_mu);
      auto& a = *shared_;
      if (a.holders.size() < opts().max_handshakes) {
        GrantLocked();
        granted = true;
      } else {
        // All slots busy. A holder that has been waiting on its peer for a
        // while (a stalled peer, not a slow CPU: time spent in our own work or
        // the store does not count) gives its slot to this newcomer, so
        // stalled connections cannot keep live ones out. Otherwise the
        // newcomer waits its turn: in a storm live peers answer at once,
        // nobody is cut and the queue drains at the handshake rate.
        const std::int64_t now = TlsStream::NowNs();
        const std::int64_t stall = std::min<std::int64_t>(
            std::chrono::duration_cast<std::chrono::nanoseconds>(opts().handshake_timeout).count() /
                2,
            2'000'000'000);
        int looked = 0;  // the oldest grants are the likeliest stalled; bounded work
        for (auto& w : a.holders) {
          if (++looked > 64) break;
          auto h = w.lock();
          if (!h) continue;
          std::int64_t since = h->peer_wait_since_.load(std::memory_order_relaxed);
          if (since != 0 && now - since > stall) {
            evict = std::move(h);
            break;
          }
        }
        if (evict) {
          auto& holders = a.holders;
          holders.erase(evict->hs_it_);
          evict->in_handshake_ = false;
          GrantLocked();
          granted = true;
        } else if (a.waiting.size() >= opts().max_waiting) {
          full = true;
        } else {
          a.waiting.push_back(weak_from_this());
          queued_ = queued = true;
          ++a.stats->admission_waits;
        }
      }
    }
    if (evict) {
      asio::post(evict->ex_, [evict] {
        evict->shared_->stats->Refuse("handshake-evicted");
        evict->Abort();
      });
    }
    if (granted) return BeginHandshake();
    if (full) {
      shared_->stats->Refuse("admission-full");
      beast::error_code ig;
      raw_.close(ig);
      return End();
    }
    if (queued) ArmAdmissionTimer();
  }

  // While queued, this timer keeps the session alive; BeginHandshake (posted
  // when a slot is granted) cancels it.
  void ArmAdmissionTimer() {
    timer_.expires_after(opts().admission_timeout);
    timer_.async_wait([self = shared_from_this()](beast::error_code ec) {
      if (ec || self->ws_ || self->closed_) return;
      self->shared_->stats->Refuse("admission-timeout");
      beast::error_code ig;
      self->raw_.close(ig);
      self->End();
    });
  }

  // Under admission_mu: takes a slot for this session.
  void GrantLocked() {
    auto& h = shared_->holders;
    hs_it_ = h.insert(h.end(), weak_from_this());
    in_handshake_ = true;
    queued_ = false;
  }

  // Under admission_mu: gives the slot back and hands free slots to the
  // longest-waiting live sessions (their BeginHandshake is posted).
  void ReleaseSlotLocked() {
    auto& a = *shared_;
    if (in_handshake_) {
      a.holders.erase(hs_it_);
      in_handshake_ = false;
    }
    while (!a.waiting.empty() && a.holders.size() < opts().max_handshakes) {
      auto s = a.waiting.front().lock();
      a.waiting.pop_front();
      if (!s) continue;
      s->GrantLocked();
      asio::post(s->ex_, [s] { s->BeginHandshake(); });
    }
  }

  // On the session's strand, holding a slot.
  void BeginHandshake() {
    if (closed_ || !raw_.is_open()) {
      LeaveHandshake();  // gone while it waited: the slot goes to the next
      return End();
    }
    timer_.cancel();
    handshake_deadline_ = Clock::now() + opts().handshake_timeout;
    ws_.emplace(std::move(raw_), *shared_->tls);
    ws_->next_layer().WatchInput(&peer_wait_since_);
    StartTls();
  }

  // The handshake ended (the peer is authenticated and ready, or it failed):
  // the slot is released.
  void LeaveHandshake() {
    std::lock_guard lock(shared_->admission_mu);
    if (!in_handshake_) return;
    ReleaseSlotLocked();
  }

  void StartTls() {
    // TLS, upgrade and (agents) the hello must be done by the deadline; the
    // socket is closed then, which aborts whatever step is waiting.
    hs_timer_.expires_at(handshake_deadline_);
    hs_timer_.async_wait([self = shared_from_this()](beast::error_code ec) {
      if (ec || self->authenticated_ || self->closed_) return;
      self->timed_out_ = true;
      beast::error_code ig;
      beast::get_lowest_layer(*self->ws_).close(ig);
    });
    ws_->next_layer().async_handshake(
        asio::ssl::stream_base::server,
        [self = shared_from_this()](beast::error_code ec) { self->OnTls(ec); });
  }

  void OnTls(beast::error_code ec) {
    if (ec) {
      std::string why = tls::RefusalReason(ws_->next_layer().native_handle());
      if (!why.empty()) {
        shared_->stats->Refuse("unregistered-key");
        spdlog::warn("{}: refused during TLS handshake: {}", peer_, why);
      } else if (timed_out_) {
        shared_->stats->Refuse("handshake-timeout");
        spdlog::debug("{}: TLS handshake timed out", peer_);
      } else {
        shared_->stats->Refuse("tls");
        spdlog::info("{}: TLS handshake failed: {}", peer_, ec.message());
      }
      return;
    }
    auto key = tls::PeerKey(ws_->next_layer().native_handle());
    if (!key) {
      shared_->stats->Refuse("unregistered-key");
      return;
    }
    who_ = shared_->fleet.Lookup(*key);
    key_id_ = key->ShortId();
    if (who_.role == Role::kNone) {
      shared_->stats->Refuse("unregistered-key");
      spdlog::warn("{}: key {} is not registered (removed during handshake)", peer_, key_id_);
      return;
    }
    http::async_read(ws_->next_layer(), buffer_, upgrade_,
                     [self = shared_from_this()](beast::error_code e, std::size_t) {
                       self->OnUpgradeRequest(e);
                     });
  }

  void OnUpgradeRequest(beast::error_code ec) {
    if (ec) {
      shared_->stats->Refuse(timed_out_ ? "handshake-timeout" : "bad-upgrade");
      spdlog::info("{} ({}): no valid websocket upgrade: {}", peer_, who_.name, ec.message());
      return;
    }
    std::string target(upgrade_.target());
    std::string want = who_.role == Role::kMachine    ? "/v1/agent"
                       : who_.role == Role::kOperator ? "/v1/operator"
                                                      : "/v1/enroll";
    if (!websocket::is_upgrade(upgrade_) || target != want) {
      shared_->stats->Refuse("bad-endpoint");
      spdlog::warn("{} ({} '{}'): refused request for '{}'; this key may only use {}", peer_,
                   RoleName(), who_.name, target, want);
      auto res = std::make_shared<http::response<http::string_body>>(http::status::forbidden, 11);
      res->set(http::field::content_type, "text/plain");
      res->body() = "this key may only use " + want + "\n";
      res->prepare_payload();
      http::async_write(ws_->next_layer(), *res,
                        [self = shared_from_this(), res](beast::error_code, std::size_t) {
                          beast::error_code ig;
                          beast::get_lowest_layer(*self->ws_).close(ig);
                        });
      return;
    }
    // Operators (authenticated, few) may send large requests: a rollout over
    // thousands of machines carries a signed manifest and sealed vars for each.
    ws_->read_message_max(who_.role == Role::kOperator ? std::max(opts().max_message_bytes,
                                                                  opts().max_operator_message_bytes)
                                                       : opts().max_message_bytes);
    ws_->auto_fragment(false);
    websocket::stream_base::timeout t{};
    t.handshake_timeout = opts().handshake_timeout;
    t.idle_timeout = websocket::stream_base::none();  // we run our own ping/idle timer
    t.keep_alive_pings = false;
    ws_->set_option(t);
    ws_->set_option(websocket::stream_base::decorator([](websocket::response_type& res) {
      res.set(http::field::server, "muster-controller/" MUSTER_VERSION);
    }));
    ws_->control_callback(
        [this](websocket::frame_type, beast::string_view) { last_rx_ = Clock::now(); });
    ws_->async_accept(upgrade_,
                      [self = shared_from_this()](beast::error_code e) { self->OnAccept(e); });
  }

  void OnAccept(beast::error_code ec) {
    if (ec) {
      shared_->stats->Refuse("bad-upgrade");
      spdlog::info("{}: websocket accept failed: {}", peer_, ec.message());
      return;
    }
    upgrade_ = {};
    buffer_.clear();
    buffer_.shrink_to_fit();
    if (who_.role == Role::kMachine) {
      limiter_.emplace(opts().agent_limits, opts().max_message_bytes, Clock::now());
      log_source_ = std::make_shared<LogSource>();
      log_source_->machine = who_.name;
      log_source_->peer = peer_;
    }
    // Agents must say hello within the handshake timeout; the TCP deadline
    // stays armed until then. Operators are ready at once.
    if (who_.role == Role::kOperator) {
      authenticated_ = true;
      hs_timer_.cancel();
      LeaveHandshake();
      ++shared_->stats->handshakes_ok;
      shared_->fleet.OperatorConnected(who_.name,
                                       std::static_pointer_cast<AgentChannel>(shared_from_this()));
      spdlog::debug("{}: operator {} connected", peer_, who_.name);
    }
    last_rx_ = Clock::now();
    ArmTimer();
    Read();
  }

  void ArmTimer() {
    timer_.expires_after(opts().ping_interval);
    timer_.async_wait([self = shared_from_this()](beast::error_code ec) {
      if (ec) return;  // cancelled: the session is ending
      self->OnTimer();
    });
  }

  void OnTimer() {
    if (closed_) return;
    if (paused_) {  // we are not reading (ReadNext): the silence is ours
      ArmTimer();
      return;
    }
    if (Clock::now() - last_rx_ >= opts().idle_timeout) {
      spdlog::info("{} ({}): nothing received for {} s; closing", peer_, who_.name,
                   std::chrono::duration_cast<std::chrono::seconds>(opts().idle_timeout).count());
      shared_->stats->Refuse("idle-timeout");
      Abort();
      return;
    }
    // Ping only a peer that has been quiet for a whole interval: one that sent
    // something (agents ping every 25 s) is demonstrably alive, and skipping
    // halves the idle frames of a large fleet.
    if (Clock::now() - last_rx_ >= opts().ping_interval) {
      outbox_.push_back(Ping{});
      Flush();
    }
    ArmTimer();
  }

  // Reads the next message, first waiting out the session's debt when the
  // agent sent more than its budget: backpressure, nothing it sent is dropped.
  void ReadNext() {
    if (closed_) return;
    auto wait = limiter_ ? limiter_->Delay(Clock::now()) : std::chrono::nanoseconds(0);
    if (wait <= std::chrono::nanoseconds(0)) return Read();
    ++shared_->stats->read_pauses;
    if (!warned_pace_) {
      warned_pace_ = true;
      spdlog::info("{} ({}): sending more than {} messages or {} bytes per second; pacing reads",
                   peer_, who_.name, opts().agent_limits.messages_per_second,
                   opts().agent_limits.bytes_per_second);
    }
    paused_ = true;
    pause_timer_.expires_after(wait);
    pause_timer_.async_wait([self = shared_from_this()](beast::error_code ec) {
      self->paused_ = false;
      if (ec || self->closed_) return;
      self->last_rx_ = Clock::now();
      self->Read();
    });
  }

  void Read() {
    ws_->async_read(buffer_, [self = shared_from_this()](beast::error_code ec, std::size_t) {
      self->OnRead(ec);
    });
  }

  void OnRead(beast::error_code ec) {
    if (ec) {
      if (ec == websocket::error::message_too_big) {
        shared_->stats->Refuse("oversize");
        spdlog::warn("{} ({}): message larger than {} bytes; closing", peer_, who_.name,
                     opts().max_message_bytes);
        Abort();
      } else if (!Benign(ec)) {
        spdlog::info("{} ({}): read failed: {}", peer_, who_.name, ec.message());
      }
      return End();
    }
    last_rx_ = Clock::now();
    // A binary frame carries bulk bytes after a JSON header (proto::EncodeBinary);
    // Decode tells the two apart and refuses a binary frame without the header.
    if (!ws_->got_text() &&
        (buffer_.size() == 0 || static_cast<const char*>(buffer_.data().data())[0] != '\0')) {
      buffer_.consume(buffer_.size());
      return Refuse("bad-message", "a binary frame must start with its header length");
    }
    // Decoded in place (a flat_buffer is one contiguous block): a binary
    // frame's payload is copied once, into the message.
    std::string_view text(static_cast<const char*>(buffer_.data().data()), buffer_.size());
    // Cache fetches are paced by the agent's own window, not the message budget.
    if (limiter_ && (!ws_->got_text() || text.find("\"type\":\"fetch\"") == std::string::npos)) {
      limiter_->Charge(text.size(), Clock::now());
    }
    proto::DecodeLimits limits;
    limits.max_bytes = who_.role == Role::kOperator
                           ? std::max(opts().max_message_bytes, opts().max_operator_message_bytes)
                           : opts().max_message_bytes;
    auto msg = proto::Decode(text, limits);
    buffer_.consume(buffer_.size());
    // Idle sessions give large buffers back; a run of binary frames (an
    // upload) keeps its buffer rather than reallocating it per chunk.
    if (ws_->got_text() && buffer_.capacity() > 64 * 1024) buffer_.shrink_to_fit();
    if (!msg) return Refuse("bad-message", msg.message());
    if (who_.role == Role::kMachine) {
      if (!HandleAgent(*msg)) return;
    } else if (who_.role == Role::kOperator) {
      if (!HandleOperator(*msg)) return;
    } else {
      HandleEnroll(*msg);
      return;
    }
    if (!closed_) ReadNext();
  }

  bool HandleAgent(proto::Message& msg) {
    if (!authenticated_) {
      const auto* hello = std::get_if<proto::Hello>(&msg);
      if (!hello) {
        Refuse("bad-message", "the first message must be 'hello', got '" +
                                  std::string(proto::TypeName(msg)) + "'");
        return false;
      }
      // Reading resumes once the hello is durable and answered (see StoreWriter).
      shared_->store_writer.SubmitHello(
          {who_.name, *hello, std::static_pointer_cast<AgentChannel>(shared_from_this())},
          [self = shared_from_this(), gen = hello->generation,
           phase = hello->phase](Result<std::vector<std::string>> out) mutable {
            asio::post(self->ex_,
                       [self, gen, phase = std::move(phase), out = std::move(out)]() mutable {
                         self->OnHelloRecorded(gen, phase, std::move(out));
                       });
          });
      return false;
    }
    if (const auto* st = std::get_if<proto::StatusReport>(&msg)) {
      // Reading resumes once the report is durable and acked (see StoreWriter).
      shared_->store_writer.SubmitStatus(
          who_.name, *st, [self = shared_from_this(), st = *st](Result<std::string> ack) mutable {
            asio::post(self->ex_, [self, st = std::move(st), ack = std::move(ack)]() mutable {
              if (self->closed_) return;
              if (!ack) return self->Refuse("bad-message", ack.message());
              spdlog::info("{} generation {}: {}{}{}", self->who_.name, st.generation,
                           ForLog(st.phase, 32), st.detail.empty() ? "" : ": ", ForLog(st.detail));
              self->Queue(std::move(*ack));
              if (!self->closed_) self->ReadNext();
            });
          });
      return false;
    }
    if (const auto* f = std::get_if<proto::Fetch>(&msg)) {
      // One chunk per request, read from disk on this I/O thread (from the
      // database on a worker): the agent asks for the next only when it has
      // room, so nothing queues up here.
      if (!opts().cache) {
        Queue(proto::Encode(proto::Fetched{f->id, 404, f->offset, 0, "", "no binary cache"}));
      } else if (opts().cache->RemoteStorage()) {
        // The bytes are in the database: never wait for it on an I/O thread.
        // Answers carry their request's id, so their order does not matter.
        shared_->fetch_worker.Submit([self = shared_from_this(), f = *f]() {
          auto frame = proto::EncodeBinaryParts(self->opts().cache->Fetch(self->who_.name, f));
          asio::post(self->ex_, [self, frame = std::move(frame)]() mutable {
            if (!self->closed_) self->Queue(std::move(frame));
          });
        });
      } else {
        Queue(proto::EncodeBinaryParts(opts().cache->Fetch(who_.name, *f)));
      }
      return true;
    }
    if (auto* pr = std::get_if<proto::PreviewReport>(&msg)) {
      shared_->fleet.AgentPreview(who_.name, std::move(*pr));
      return true;
    }
    if (auto* logs = std::get_if<proto::LogLines>(&msg)) {
      // Never blocks: a full queue drops the lines (counted, warned once).
      (void)shared_->log_writer.Submit(log_source_, std::move(*logs));
      return true;
    }
    if (std::holds_alternative<proto::Hello>(msg)) {
      Refuse("bad-message", "'hello' may only be sent once");
      return false;
    }
    Refuse("bad-message", "agents may not send '" + std::string(proto::TypeName(msg)) + "'");
    return false;
  }

  // An unregistered key with a one-time token: one enroll message, one answer.
  void HandleEnroll(const proto::Message& msg) {
    const auto* e = std::get_if<proto::Enroll>(&msg);
    if (!e) {
      Refuse("bad-message", "an unregistered key may only send 'enroll', got '" +
                                std::string(proto::TypeName(msg)) + "'");
      return;
    }
    auto key = tls::PeerKey(ws_->next_layer().native_handle());
    if (!key) return Refuse("bad-enroll", "no client key");
    if (auto st = shared_->fleet.Enroll(*key, e->machine, e->proof); !st) {
      shared_->stats->Refuse("bad-enroll");
      spdlog::warn("{}: enrolment of '{}' refused: {}", peer_, ForLog(e->machine, 64),
                   ForLog(st.message()));
      CloseWith("bad-enroll", st.message());
      return;
    }
    spdlog::info("{}: machine {} enrolled with key {}", peer_, e->machine, key->ShortId());
    Queue(proto::Encode(proto::Enrolled{e->machine}));
    closing_ = true;
    outbox_.push_back(
        CloseFrame{websocket::close_reason(websocket::close_code::normal, "enrolled")});
    Flush();
  }

  const char* RoleName() const {
    switch (who_.role) {
      case Role::kMachine:
        return "machine";
      case Role::kOperator:
        return "operator";
      case Role::kEnrollee:
        return "enrollee";
      default:
        return "unknown";
    }
  }

  void OnHelloRecorded(std::int64_t generation, const std::string& phase,
                       Result<std::vector<std::string>> out) {
    if (out && closed_) {
      // The session ended while its hello was being recorded: undo the registration.
      shared_->fleet.AgentGone(who_.name, this);
      return;
    }
    if (closed_) return;
    if (!out) return Refuse("bad-hello", out.message());
    authenticated_ = true;
    registered_ = true;
    LeaveHandshake();
    hs_timer_.cancel();
    ++shared_->stats->handshakes_ok;
    spdlog::info("{}: machine {} connected (key {}, generation {} {})", peer_, who_.name, key_id_,
                 generation, ForLog(phase, 32));
    for (auto& t : *out) Queue(std::move(t));
    if (!closed_) ReadNext();
  }

  bool HandleOperator(proto::Message& msg) {
    auto* req = std::get_if<proto::Request>(&msg);
    if (!req) {
      Refuse("bad-message",
             "operators may only send 'request', got '" + std::string(proto::TypeName(msg)) + "'");
      return false;
    }
    if (!shared_->fleet.IsOperator(who_.name)) {
      Refuse("operator-removed", "operator '" + who_.name + "' was removed; its key is refused");
      return false;
    }
    if (publishes_pending_ > 0 && req->method != "publish") {
      // Anything else waits until the publishes before it are answered: it
      // may read what they stored.
      deferred_ = *req;
      read_held_ = true;
      return false;
    }
    if (req->method == "subscribe") {
      if (!subscribed_) {
        subscribed_ = true;
        shared_->fleet.Subscribe(std::static_pointer_cast<EventSink>(shared_from_this()));
      }
      proto::Response r;
      r.id = req->id;
      Queue(proto::Encode(r));
      return true;
    }
    if (req->method == "publish") {
      // Pipelined: checked here, committed with whatever else is queued for
      // the store (one fsync for many), answered in order; the session reads
      // on meanwhile, up to kMaxPipelinedPublishes.
      ++publishes_pending_;
      shared_->store_writer.SubmitPublish(
          who_.name, shared_->api.PreparePublish(who_, *req),
          [self = shared_from_this(), id = req->id](Result<GenerationRecord> g) mutable {
            asio::post(self->ex_, [self, id, g = std::move(g)]() { self->OnPublished(id, g); });
          });
      if (publishes_pending_ >= kMaxPipelinedPublishes) {
        read_held_ = true;
        return false;
      }
      return true;
    }
    if (req->method.rfind("cache.", 0) == 0 || req->method == "rollout.create") {
      // Off the I/O thread (a rollout over the fleet verifies and stores
      // thousands of items; a cache commit touches the disk for seconds);
      // reading resumes once it is answered.
      CacheWorker& worker =
          req->method == "rollout.create" ? shared_->rollout_worker : shared_->cache_worker;
      worker.Submit([self = shared_from_this(), req = std::move(*req)]() mutable {
        auto res = self->shared_->api.Handle(self->who_, req);
        asio::post(self->ex_, [self, res = std::move(res)]() mutable {
          if (self->closed_) return;
          self->Queue(proto::Encode(res));
          if (!self->closed_) self->ReadNext();
        });
      });
      return false;
    }
    Queue(proto::Encode(shared_->api.Handle(who_, *req)));
    return true;
  }

  void OnPublished(std::uint64_t id, const Result<GenerationRecord>& g) {
    --publishes_pending_;
    if (closed_) return;
    Queue(proto::Encode(shared_->api.PublishAnswer(who_, id, g)));
    if (!read_held_) return;
    if (deferred_) {
      if (publishes_pending_ > 0) return;
      proto::Message m = std::move(*deferred_);
      deferred_.reset();
      read_held_ = false;
      if (HandleOperator(m) && !closed_) ReadNext();
      return;
    }
    if (publishes_pending_ < kMaxPipelinedPublishes) {
      read_held_ = false;
      ReadNext();
    }
  }

  // Sends an error message explaining why, then closes.
  void Refuse(const std::string& code, const std::string& message) {
    shared_->stats->Refuse(code);
    spdlog::warn("{} ({} '{}'): {}: {}; closing", peer_, RoleName(), who_.name, code,
                 ForLog(message));
    CloseWith(code, message);
  }

  void CloseWith(std::string code, std::string message) {
    if (closed_ || closing_) return;
    Queue(proto::Encode(proto::ErrorMsg{std::move(code), message}));
    std::string reason = CutUtf8(message, 120);  // a close reason must be UTF-8, <= 123 bytes
    closing_ = true;
    outbox_.push_back(
        CloseFrame{websocket::close_reason(websocket::close_code::policy_error, reason)});
    Flush();
    // Do not wait forever on a peer that does not read.
    timer_.expires_after(std::chrono::seconds(5));
    timer_.async_wait([self = shared_from_this()](beast::error_code ec) {
      if (!ec) self->Abort();
    });
  }

  struct Ping {};
  struct CloseFrame {
    websocket::close_reason reason;
  };
  using Binary = proto::BinaryFrame;  // written gathered: the payload is never copied
  using Out = std::variant<std::string, Ping, CloseFrame, Binary>;

  static std::size_t SizeOf(const Out& o) {
    if (auto* text = std::get_if<std::string>(&o)) return text->size();
    if (auto* bin = std::get_if<Binary>(&o)) return bin->size();
    return 0;
  }

  // Queues a text message, or a binary frame (proto::EncodeBinaryParts).
  void Queue(std::string text) { Enqueue(Out{std::move(text)}); }
  void Queue(Binary frame) { Enqueue(Out{std::move(frame)}); }

  void Enqueue(Out out) {
    if (closed_) return;
    outbox_bytes_ += SizeOf(out);
    if (outbox_bytes_ > opts().max_outbox_bytes) {
      spdlog::warn("{} ({}): peer is not reading ({} bytes queued); closing", peer_, who_.name,
                   outbox_bytes_);
      shared_->stats->Refuse("slow-reader");
      Abort();
      return;
    }
    if (closing_) {
      // Insert before the close frame.
      auto it = outbox_.end();
      if (!outbox_.empty() && std::holds_alternative<CloseFrame>(outbox_.back())) --it;
      outbox_.insert(it, std::move(out));
    } else {
      outbox_.push_back(std::move(out));
    }
    Flush();
  }

  void Flush() {
    if (writing_ || outbox_.empty() || closed_) return;
    writing_ = true;
    Out& front = outbox_.front();
    auto self = shared_from_this();
    if (auto* text = std::get_if<std::string>(&front)) {
      ws_->text(true);
      ws_->async_write(asio::buffer(*text),
                       [self](beast::error_code ec, std::size_t) { self->OnWrite(ec); });
    } else if (auto* bin = std::get_if<Binary>(&front)) {
      ws_->binary(true);
      std::array<asio::const_buffer, 2> parts{asio::buffer(bin->head), asio::buffer(bin->payload)};
      ws_->async_write(parts, [self](beast::error_code ec, std::size_t) { self->OnWrite(ec); });
    } else if (std::holds_alternative<Ping>(front)) {
      ws_->async_ping({}, [self](beast::error_code ec) { self->OnWrite(ec); });
    } else {
      auto reason = std::get<CloseFrame>(front).reason;
      ws_->async_close(reason, [self](beast::error_code) {
        self->writing_ = false;
        self->End();
      });
    }
  }

  void OnWrite(beast::error_code ec) {
    writing_ = false;
    if (closed_) {
      // End() ran while this write was in flight (an abort, an eviction): it
      // kept only the element being written, for the write to finish with.
      outbox_.clear();
      return;
    }
    if (ec) {
      if (!Benign(ec)) spdlog::info("{} ({}): write failed: {}", peer_, who_.name, ec.message());
      return Abort();
    }
    outbox_bytes_ -= SizeOf(outbox_.front());
    outbox_.pop_front();
    Flush();
  }

  // Hard close: cancels everything outstanding.
  void Abort() {
    beast::error_code ec;
    tcp::socket& sock = ws_ ? beast::get_lowest_layer(*ws_) : raw_;
    sock.shutdown(tcp::socket::shutdown_both, ec);
    sock.close(ec);
    End();
  }

  void End() {
    if (closed_) return;
    closed_ = true;
    LeaveHandshake();
    timer_.cancel();
    hs_timer_.cancel();
    pause_timer_.cancel();
    // A write in flight still reads the front element; OnWrite drops it.
    if (writing_ && !outbox_.empty()) {
      outbox_.erase(outbox_.begin() + 1, outbox_.end());
    } else {
      outbox_.clear();
    }
    if (registered_) {
      if (shared_->fleet.ForgetAgent(who_.name, this)) {
        shared_->store_writer.SubmitGone(who_.name, shared_->fleet.Now());
      }
      spdlog::info("{}: machine {} disconnected", peer_, who_.name);
    }
    if (subscribed_) shared_->fleet.Unsubscribe(this);
  }

  std::shared_ptr<Shared> shared_;
  asio::any_io_executor ex_;  // the session's strand
  tcp::socket raw_;           // until the peer sends its first bytes
  std::optional<WsStream> ws_;
  asio::steady_timer timer_;
  asio::steady_timer hs_timer_;            // the handshake deadline (StartTls)
  asio::steady_timer pause_timer_;         // ReadNext's wait
  std::optional<SessionLimiter> limiter_;  // agents only
  std::shared_ptr<LogSource> log_source_;  // agents only
  bool paused_ = false;
  bool warned_pace_ = false;
  Clock::time_point handshake_deadline_;
  // Admission (under Shared::admission_mu): holds a slot, or waits for one.
  bool in_handshake_ = false;
  bool queued_ = false;
  bool got_bytes_ = false;  // strand-local
  std::list<std::weak_ptr<Session>>::iterator hs_it_;
  // Since when the TLS stream waits for the peer's bytes (0: it does not);
  // read by other sessions' admission under admission_mu.
  std::atomic<std::int64_t> peer_wait_since_{0};
  beast::flat_buffer buffer_;
  http::request<http::string_body> upgrade_;
  std::deque<Out> outbox_;
  std::size_t outbox_bytes_ = 0;
  bool writing_ = false;
  bool closing_ = false;
  bool closed_ = false;
  bool authenticated_ = false;
  bool timed_out_ = false;  // the handshake deadline closed the socket
  // Operators: publishes submitted and not yet answered, a request held back
  // behind them, and whether reading waits for them.
  static constexpr int kMaxPipelinedPublishes = 4096;
  int publishes_pending_ = 0;
  std::optional<proto::Request> deferred_;
  bool read_held_ = false;
  bool registered_ = false;
  bool subscribed_ = false;
  Identity who_;
  std::string key_id_;
  std::string peer_;
  Clock::time_point last_rx_ = Clock::now();
};

class Listener : public std::enable_shared_from_this<Listener> {
 public:
  static constexpr std::chrono::seconds kBindRetry{10};

  Listener(asio::io_context& ioc, std::shared_ptr<Shared> shared)
      : ioc_(ioc), acceptor_(asio::make_strand(ioc)), shared_(std::move(shared)) {}

  Result<tcp::endpoint> Open(const HostPort& hp) {
    beast::error_code ec;
    auto addr = asio::ip::make_address(hp.host, ec);
    if (ec) return Err("listen address '" + hp.host + "' is not an IP address");
    tcp::endpoint ep(addr, hp.port);
    acceptor_.open(ep.protocol(), ec);
    if (!ec) acceptor_.set_option(asio::socket_base::reuse_address(true), ec);
    if (!ec && addr.is_v6() && addr.to_v6().is_unspecified()) {
      acceptor_.set_option(asio::ip::v6_only(false), ec);  // [::] serves IPv4 too
    }
    if (!ec) acceptor_.bind(ep, ec);
    // A controller restarted right after a crash finds its port still taken
    // for a moment while the kernel tears down the old process's thousands of
    // connections: wait for it (bounded) rather than exit and leave the fleet
    // waiting on a supervisor's restart delay.
    const auto give_up = std::chrono::steady_clock::now() + kBindRetry;
    for (bool warned = false;
         ec == asio::error::address_in_use && std::chrono::steady_clock::now() < give_up;) {
      if (!warned) {
        spdlog::warn("{} port {} is in use; retrying for up to {} s", ep.address().to_string(),
                     hp.port, std::chrono::duration_cast<std::chrono::seconds>(kBindRetry).count());
        warned = true;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      ec = {};
      acceptor_.bind(ep, ec);
    }
    if (!ec) acceptor_.listen(asio::socket_base::max_listen_connections, ec);
    if (!ec) SetCloseOnExec(acceptor_.native_handle());
    if (ec) {
      return Err(
          "cannot listen on " + ep.address().to_string() + " port " + std::to_string(hp.port) +
          ": " + ec.message() +
          (ec == asio::error::address_in_use
               ? " (still, after " +
                     std::to_string(
                         std::chrono::duration_cast<std::chrono::seconds>(kBindRetry).count()) +
                     " s: another process holds it; stop it or choose another --listen)"
               : ""));
    }
    return acceptor_.local_endpoint();
  }

  void Accept() {
    acceptor_.async_accept(asio::make_strand(ioc_),
                           [self = shared_from_this()](beast::error_code ec, tcp::socket s) {
                             self->OnAccept(ec, std::move(s));
                           });
  }

  void Close() {
    asio::post(acceptor_.get_executor(), [self = shared_from_this()] {
      beast::error_code ec;
      self->acceptor_.close(ec);
    });
  }

 private:
  void OnAccept(beast::error_code ec, tcp::socket s) {
    if (ec == asio::error::operation_aborted || !acceptor_.is_open()) return;
    if (ec) {
      // EMFILE and friends: wait a little instead of spinning.
      spdlog::warn("accept failed: {}", ec.message());
      auto t = std::make_shared<asio::steady_timer>(acceptor_.get_executor(),
                                                    std::chrono::milliseconds(100));
      t->async_wait([self = shared_from_this(), t](beast::error_code) { self->Accept(); });
      return;
    }
    beast::error_code ignored;
    s.set_option(tcp::no_delay(true), ignored);
    SetCloseOnExec(s.native_handle());
    std::make_shared<Session>(std::move(s), shared_)->Run();
    Accept();
  }

  asio::io_context& ioc_;
  tcp::acceptor acceptor_;
  std::shared_ptr<Shared> shared_;
};

}  // namespace

struct Server::Impl {
  asio::io_context& ioc;
  std::shared_ptr<Shared> shared;
  std::vector<std::shared_ptr<Listener>> listeners;
};

Server::Server(asio::io_context& ioc, Fleet& fleet, Api& api,
               std::shared_ptr<asio::ssl::context> tls, ServerOptions options)
    : stats_(std::make_shared<ServerStats>()) {
  auto shared = std::make_shared<Shared>(fleet, api, std::move(tls), std::move(options), stats_);
  impl_ = std::make_shared<Impl>(Impl{ioc, std::move(shared), {}});
}

Server::~Server() {
  Stop();
  impl_->shared->store_writer.Stop();  // before the io_context its callbacks post to
  impl_->shared->cache_worker.Stop();
  impl_->shared->fetch_worker.Stop();
  impl_->shared->rollout_worker.Stop();
  impl_->shared->log_writer.Stop();  // stores what is queued
}

Result<std::vector<tcp::endpoint>> Server::Start() {
  std::vector<tcp::endpoint> bound;
  for (const auto& hp : impl_->shared->options.listen) {
    auto l = std::make_shared<Listener>(impl_->ioc, impl_->shared);
    auto ep = l->Open(hp);
    if (!ep) return ep.error();
    bound.push_back(*ep);
    impl_->listeners.push_back(l);
  }
  for (auto& l : impl_->listeners) l->Accept();
  return bound;
}

void Server::Stop() {
  for (auto& l : impl_->listeners) l->Close();
  impl_->listeners.clear();
}

}  // namespace muster
