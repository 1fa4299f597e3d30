// muster-controller: init, run, operator add / remove / sync.
#include <signal.h>

#ifdef __linux__
#include <sys/inotify.h>
#endif
#ifdef __GLIBC__
#include <malloc.h>
#endif
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <array>
#include <boost/asio/io_context.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/asio/steady_timer.hpp>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <functional>
#include <iostream>
#include <thread>

#include "common/crypto.h"
#include "common/fsutil.h"
#include "common/json_limits.h"
#include "common/log.h"
#include "common/tls.h"
#include "controller/api.h"
#include "controller/cluster.h"
#include "controller/dashboard.h"
#include "controller/fleet.h"
#include "controller/metrics.h"
#include "controller/notifier.h"
#include "controller/operator_set.h"
#include "controller/rollout.h"
#include "controller/roster_file.h"
#include "controller/server.h"
#include "controller/store.h"

namespace fs = std::filesystem;
using namespace muster;

namespace {

struct Paths {
  fs::path dir;
  // A key provided by a secret store (clan vars) instead of dir/controller.key.
  fs::path key_file = {};
  fs::path key() const { return key_file.empty() ? dir / "controller.key" : key_file; }
  fs::path cert() const { return dir / "controller.crt"; }
  fs::path db() const { return dir / "muster.db"; }
  // --store: a postgresql:// URI or an SQLite path; "" = db().
  std::string store_spec = {};
  std::string store() const { return store_spec.empty() ? db().string() : store_spec; }
  // Rewritten by 'operator add' after it committed: a running controller
  // watches it and re-reads the operators at once.
  fs::path operators_marker() const { return dir / "operators.changed"; }
};

// Calls Fleet::Refresh every second, and at once when the operators marker
// changes (inotify on the state directory, where available). Its handlers run
// until the io_context stops; destroy it only after that.
class RegistryRefresher {
 public:
  RegistryRefresher(boost::asio::io_context& ioc, Fleet& fleet, fs::path marker)
      : fleet_(fleet), marker_(std::move(marker)), timer_(ioc), watch_(ioc) {}

  void Start() {
#ifdef __linux__
    int fd = ::inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
    if (fd >= 0 &&
        ::inotify_add_watch(fd, marker_.parent_path().c_str(), IN_MOVED_TO | IN_CLOSE_WRITE) >= 0) {
      watch_.assign(fd);
      Watch();
    } else {
      int e = errno;
      if (fd >= 0) ::close(fd);
      spdlog::warn(
          "cannot watch {} ({}); operators added with 'operator add' take effect "
          "within a second",
          marker_.parent_path().string(), std::strerror(e));
    }
#endif
    Tick();
  }

 private:
  void Tick() {
    timer_.expires_after(std::chrono::seconds(1));
    timer_.async_wait([this](const boost::system::error_code& ec) {
      if (ec) return;
      fleet_.Refresh();
      Tick();
    });
  }
  void Watch() {
    watch_.async_read_some(boost::asio::buffer(events_),
                           [this](const boost::system::error_code& ec, std::size_t n) {
                             if (ec) return;
                             // Any event naming the marker (the directory sees others).
                             std::string_view data(events_.data(), n);
                             if (data.find(marker_.filename().string()) != data.npos) {
                               fleet_.Refresh();
                             }
                             Watch();
                           });
  }

  Fleet& fleet_;
  fs::path marker_;
  boost::asio::steady_timer timer_;
  boost::asio::posix::stream_descriptor watch_;
  std::array<char, 4096> events_{};
};

// Applies the declarative roster (--roster) when it changes; polled every
// second. Logs a result only when it differs from the previous one.
class RosterWatcher {
 public:
  RosterWatcher(boost::asio::io_context& ioc, RosterFile& file) : file_(file), timer_(ioc) {}
  void Report(const Result<RosterApplied>& r) {
    std::string text = r ? r->Summary() : r.message();
    if (r) {
      for (const auto& why : r->refused) text += "\n" + why;
    }
    if (text == last_) return;
    last_ = text;
    if (!r) {
      spdlog::error("{}", r.message());
      return;
    }
    spdlog::info("roster {}: {}", file_.path(), r->Summary());
    for (const auto& why : r->refused) {
      spdlog::warn(
          "roster {}: refused {} (sign it with an operator key registered here: "
          "'muster roster sign', 'muster-controller operator add')",
          file_.path(), why);
    }
  }
  void Start() {
    timer_.expires_after(std::chrono::seconds(1));
    timer_.async_wait([this](const boost::system::error_code& ec) {
      if (ec) return;
      if (auto r = file_.Poll()) Report(*r);
      Start();
    });
  }

 private:
  RosterFile& file_;
  boost::asio::steady_timer timer_;
  std::string last_;
};

std::int64_t NowMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

int Fail(const std::string& msg, int code = 1) {
  std::cerr << "muster-controller: " << msg << "\n";
  return code;
}

int Init(const Paths& p) {
  if (auto st = MakeDirs(p.dir, 0700); !st) return Fail(st.message());
  auto key = p.key_file.empty() ? LoadOrCreateSecretKey(p.key()) : LoadSecretKey(p.key());
  if (!key) return Fail(key.message());
  bool stale_cert = false;
  if (!p.key_file.empty() && fs::exists(p.cert())) {
    // A provided key may have been regenerated: a self-signed certificate for
    // another key would fail every handshake, so make a new one.
    auto pem = ReadFile(p.cert(), 1 << 16);
    stale_cert = !pem || !tls::MakeServerContext(*key, *pem, nullptr);
    if (stale_cert) {
      std::cerr << "muster-controller: " << p.cert().string() << " is not for the key in "
                << p.key_file.string() << "; writing a new self-signed certificate\n";
    }
  }
  if (stale_cert || !fs::exists(p.cert())) {
    auto pem = tls::MakeSelfSignedCertPem(*key, "muster-controller");
    if (!pem) return Fail(pem.message());
    if (auto st = WriteFileAtomic(p.cert(), *pem, 0644); !st) return Fail(st.message());
  }
  auto store = OpenStore(p.store());
  if (!store) return Fail(store.message());
  std::cout << "state directory: " << p.dir.string() << "\n"
            << "controller key:  " << key->public_key().ToText() << "\n"
            << "pin:             " << key->public_key().Fingerprint() << "\n"
            << "Give the pin to agents (controllerPin) and operators (--pin / MUSTER_PIN).\n";
  return 0;
}

int OperatorRemove(const Paths& p, const std::string& name) {
  auto store = OpenStore(p.store());
  if (!store) return Fail(store.message() + " (run 'muster-controller init' first)");
  Fleet fleet(**store, NowMs);
  if (auto st = fleet.Load(); !st) return Fail(st.message());
  if (auto st = fleet.RemoveOperator(name); !st) return Fail(st.message());
  (void)WriteFileAtomic(p.operators_marker(), std::to_string(NowMs()) + "\n", 0600);
  std::cout << "operator " << name
            << " removed: a running controller refuses its key and closes its sessions at once"
               "; remove it from agents' trustedOperatorKeys too\n";
  return 0;
}

// A certificate request for the controller key, for agents that check a CA
// (controllerCaFile) in addition to the pin.
int Csr(const Paths& p, const std::string& common_name) {
  auto key = LoadSecretKey(p.key());
  if (!key) {
    return Fail(key.message() + " (run 'muster-controller init --state-dir " + p.dir.string() +
                "' first)");
  }
  auto pem = tls::MakeCertificateRequestPem(*key, common_name);
  if (!pem) return Fail(pem.message());
  std::cout << *pem;
  return 0;
}

int OperatorAdd(const Paths& p, const std::string& name, const std::string& key_text) {
  auto store = OpenStore(p.store());
  if (!store) return Fail(store.message() + " (run 'muster-controller init' first)");
  Fleet fleet(**store, NowMs);
  if (auto st = fleet.Load(); !st) return Fail(st.message());
  std::string k = key_text;
  if (!k.empty() && k[0] != 'e' && fs::exists(k)) {  // a path to a .pub file
    auto text = ReadFile(k, 4096);
    if (!text) return Fail(text.message());
    k = *text;
  }
  if (auto pk = ParsePublicKey(k); pk) {
    Identity who = fleet.Lookup(*pk);
    if (who.role == Role::kOperator && who.name == name) {
      std::cout << "operator " << name << " is already registered with this key\n";
      return 0;  // idempotent, so that modules can run it before every start
    }
  }
  if (auto st = fleet.AddOperator(name, k); !st) return Fail(st.message());
  // Tells a running controller (see RegistryRefresher); it also re-reads
  // the operators every second, so a failure here only delays it.
  (void)WriteFileAtomic(p.operators_marker(), std::to_string(NowMs()) + "\n", 0600);
  std::cout << "operator " << name << " added\n";
  return 0;
}

// The declared operator set (a module's `operators`): registered, re-keyed, and
// those it declared before but no longer does removed. Run before every start.
int OperatorSync(const Paths& p, const std::string& file) {
  auto text = ReadFile(file, 1u << 20);
  if (!text) return Fail("operator sync: " + text.message());
  auto declared = ParseOperatorSet(*text);
  if (!declared) return Fail(file + ": " + declared.message());
  auto store = OpenStore(p.store());
  if (!store) return Fail(store.message() + " (run 'muster-controller init' first)");
  Fleet fleet(**store, NowMs);
  if (auto st = fleet.Load(); !st) return Fail(st.message());
  auto done = SyncOperators(fleet, **store, *declared);
  // Whatever was done before a failure is in the store: tell a running controller.
  (void)WriteFileAtomic(p.operators_marker(), std::to_string(NowMs()) + "\n", 0600);
  if (!done) return Fail("operator sync (" + file + "): " + done.message());
  std::cout << *done << "\n";
  return 0;
}

int Migrate(const std::string& spec, const std::string& from_sqlite) {
  if (!from_sqlite.empty()) {
    if (!IsPostgresStoreSpec(spec)) {
      return Fail("--from-sqlite copies into a PostgreSQL store; --store must be postgresql://…");
    }
    auto copied = CopySqliteToPostgres(from_sqlite, spec);
    if (!copied) return Fail(copied.message());
    std::cout << "copied " << from_sqlite << " into the PostgreSQL store: " << *copied << "\n";
    return 0;
  }
  auto store = OpenStore(spec);
  if (!store) return Fail(store.message());
  auto v = (*store)->GetSetting("schema_version");
  std::cout << "store schema is at version " << v.value_or("?") << "\n";
  return 0;
}

struct RunConfig {
  std::vector<std::string> listen;
  std::string metrics_listen;
  std::string http_listen;  // the dashboard ("" = none)
  int threads = 0;
  int handshake_timeout = 10;
  int ping_interval = 60;
  int idle_timeout = 150;
  std::size_t max_message_bytes = kDefaultMaxMessageBytes;
  std::size_t max_handshakes = 1024;
  std::size_t max_waiting = 65536;
  int admission_timeout = 120;
  std::string log_level = "info";
  StoreLimits store;    // per-machine bounds on logs and events
  SessionLimits agent;  // per-session message and byte rates
  std::size_t log_queue_lines = LogWriter::Options{}.max_queued_lines;
  std::string roster;      // declarative roster file ("" = none)
  std::string key_file;    // provided controller key ("" = STATE_DIR/controller.key)
  std::string store_spec;  // --store ("" = STATE_DIR/muster.db)
  std::uint64_t cache_max_bytes = 64ull << 30;  // the binary cache under <state>/cache
  // Where the cache's bytes live: "files" (<state>/cache), "database" (the
  // PostgreSQL store's, shared by its controllers), "auto" (database when
  // the store is PostgreSQL).
  std::string cache_storage = "auto";
  std::int64_t cache_gc_interval = 3600;     // seconds between collections
  std::int64_t cache_gc_grace = 86400;       // unreferenced paths survive this long
  std::int64_t webhook_offline_after = 600;  // seconds away before an "offline" notification
  std::int64_t webhook_queue_max = NotifierOptions{}.max_queued;
  std::int64_t webhook_retry_base_ms = NotifierOptions{}.retry_base_ms;
  int webhook_max_attempts = NotifierOptions{}.max_attempts;
};

Status CheckRunConfig(const RunConfig& c) {
  if (c.listen.empty()) return Err("at least one --listen ADDR:PORT is required");
  for (const auto& l : c.listen) {
    auto hp = ParseHostPort(l);
    if (!hp) return Err("--listen: " + hp.message());
  }
  if (!c.metrics_listen.empty()) {
    auto hp = ParseHostPort(c.metrics_listen);
    if (!hp) return Err("--metrics-listen: " + hp.message());
  }
  if (!c.http_listen.empty()) {
    auto hp = ParseHostPort(c.http_listen);
    if (!hp) return Err("--http-listen: " + hp.message());
  }
  if (c.ping_interval <= 0 || c.idle_timeout <= c.ping_interval) {
    return Err("--idle-timeout must be greater than --ping-interval (both in seconds, > 0)");
  }
  if (c.handshake_timeout <= 0) return Err("--handshake-timeout must be positive");
  if (c.max_message_bytes < 4096) return Err("--max-message-bytes must be at least 4096");
  if (c.max_handshakes < 1) return Err("--max-handshakes must be at least 1");
  if (c.max_waiting < 1) return Err("--max-waiting must be at least 1");
  if (c.admission_timeout < 1) return Err("--admission-timeout must be at least 1 second");
  if (auto st = CheckStoreLimits(c.store); !st) return st;
  if (c.agent.messages_per_second < 1) {
    return Err("--agent-messages-per-second must be at least 1");
  }
  if (c.agent.bytes_per_second < 1024) return Err("--agent-bytes-per-second must be at least 1024");
  if (c.log_queue_lines < 1000) return Err("--log-queue-lines must be at least 1000");
  if (c.cache_storage != "auto" && c.cache_storage != "files" && c.cache_storage != "database") {
    return Err("--cache-storage must be auto, files or database, not '" +
               c.cache_storage.substr(0, 40) + "'");
  }
  if (c.cache_gc_interval < 1) return Err("--cache-gc-interval must be at least 1 second");
  if (c.cache_gc_grace < 0) return Err("--cache-gc-grace must not be negative");
  if (c.webhook_offline_after < 1) return Err("--webhook-offline-after must be at least 1 second");
  if (c.webhook_queue_max < 1) return Err("--webhook-queue-max must be at least 1");
  if (c.webhook_retry_base_ms < 1) return Err("--webhook-retry-base-ms must be at least 1");
  if (c.webhook_max_attempts < 1) return Err("--webhook-max-attempts must be at least 1");
  return Status::Ok();
}

// Reads a JSON config file ({"listen": [...], "metricsListen": "...", ...})
// rendered by the NixOS module; command-line flags override it.
Status LoadConfigFile(const std::string& path, RunConfig& c, std::string& state_dir) {
  auto text = ReadFile(path, 1 << 20);
  if (!text) return text.error();
  auto j = ParseJsonBounded(*text);
  if (!j) return Err(path + ": " + j.message());
  try {
    if (!j->is_object()) return Err(path + ": expected a JSON object");
    for (auto& [k, v] : j->items()) {
      if (k == "listen") {
        c.listen = v.get<std::vector<std::string>>();
      } else if (k == "metricsListen") {
        c.metrics_listen = v.is_null() ? "" : v.get<std::string>();
      } else if (k == "httpListen") {
        c.http_listen = v.is_null() ? "" : v.get<std::string>();
      } else if (k == "stateDir") {
        state_dir = v.get<std::string>();
      } else if (k == "threads") {
        c.threads = v.get<int>();
      } else if (k == "handshakeTimeout") {
        c.handshake_timeout = v.get<int>();
      } else if (k == "pingInterval") {
        c.ping_interval = v.get<int>();
      } else if (k == "idleTimeout") {
        c.idle_timeout = v.get<int>();
      } else if (k == "maxHandshakes") {
        c.max_handshakes = v.get<std::size_t>();
      } else if (k == "maxWaiting") {
        c.max_waiting = v.get<std::size_t>();
      } else if (k == "admissionTimeout") {
        c.admission_timeout = v.get<int>();
      } else if (k == "maxMessageBytes") {
        c.max_message_bytes = v.get<std::size_t>();
      } else if (k == "logLevel") {
        c.log_level = v.get<std::string>();
      } else if (k == "maxLogBytesPerMachine") {
        c.store.log_bytes_per_machine = v.get<std::int64_t>();
      } else if (k == "maxLogBytesPerGeneration") {
        c.store.log_bytes_per_generation = v.get<std::int64_t>();
      } else if (k == "maxEventsPerMachine") {
        c.store.events_per_machine = v.get<std::int64_t>();
      } else if (k == "keepEventGenerations") {
        c.store.keep_event_generations = v.get<int>();
      } else if (k == "agentMessagesPerSecond") {
        c.agent.messages_per_second = v.get<double>();
      } else if (k == "agentBytesPerSecond") {
        c.agent.bytes_per_second = v.get<double>();
      } else if (k == "logQueueLines") {
        c.log_queue_lines = v.get<std::size_t>();
      } else if (k == "store") {
        c.store_spec = v.is_null() ? "" : v.get<std::string>();
      } else if (k == "keyFile") {
        c.key_file = v.is_null() ? "" : v.get<std::string>();
      } else if (k == "roster") {
        c.roster = v.is_null() ? "" : v.get<std::string>();
      } else if (k == "cacheMaxBytes") {
        c.cache_max_bytes = v.get<std::uint64_t>();
      } else if (k == "cacheStorage") {
        c.cache_storage = v.get<std::string>();
      } else if (k == "cacheGcInterval") {
        c.cache_gc_interval = v.get<std::int64_t>();
      } else if (k == "cacheGcGrace") {
        c.cache_gc_grace = v.get<std::int64_t>();
      } else if (k == "webhookOfflineAfter") {
        c.webhook_offline_after = v.get<std::int64_t>();
      } else if (k == "webhookQueueMax") {
        c.webhook_queue_max = v.get<std::int64_t>();
      } else if (k == "webhookRetryBaseMs") {
        c.webhook_retry_base_ms = v.get<std::int64_t>();
      } else if (k == "webhookMaxAttempts") {
        c.webhook_max_attempts = v.get<int>();
      } else {
        return Err(path + ": unknown setting '" + k + "'");
      }
    }
  } catch (const std::exception& e) {
    return Err(path + ": a setting has the wrong type: " + e.what());
  }
  return Status::Ok();
}

int Run(const Paths& p, const RunConfig& c) {
  if (!SetupLogging("muster-controller", c.log_level)) {
    spdlog::warn("unknown log level '{}'; using info", c.log_level);
  }
  auto key = LoadSecretKey(p.key());
  if (!key)
    return Fail(key.message() + " (run 'muster-controller init --state-dir " + p.dir.string() +
                "' first)");
  auto pem = ReadFile(p.cert(), 1 << 16);
  if (!pem) return Fail(pem.message());
  auto store = OpenStore(p.store(), c.store);
  if (!store) return Fail(store.message());
  Fleet fleet(**store, NowMs);
  RolloutManager rollouts(fleet, **store);
  fleet.SetObserver(&rollouts);
  // Several controllers on one PostgreSQL database: presence, fan-out and the
  // rollout driver's lease (cluster.h). Joined before the registry is loaded,
  // so that no change committed in between is missed.
  std::unique_ptr<Cluster> cluster;
  if (IsPostgresStoreSpec(p.store())) {
    ClusterOptions co;
    co.conninfo = p.store();
    co.id = NewClusterId();
    if (auto st = (*store)->SetControllerId(co.id); !st) return Fail(st.message());
    cluster = std::make_unique<Cluster>(fleet, rollouts, co);
    if (auto st = cluster->Open(); !st) return Fail(st.message());
  }
  if (auto st = fleet.Load(); !st) return Fail(st.message());
  fleet.SetMaxDeployBytes(c.max_message_bytes);
  Api api(fleet, &rollouts);
  bool cache_in_db = c.cache_storage == "database" ||
                     (c.cache_storage == "auto" && IsPostgresStoreSpec(p.store()));
  if (cache_in_db && !IsPostgresStoreSpec(p.store())) {
    return Fail("--cache-storage database needs a PostgreSQL store (--store postgresql://…)", 2);
  }
  std::string cache_where = cache_in_db ? "the PostgreSQL store" : (p.dir / "cache").string();
  auto bytes = cache_in_db ? OpenPostgresByteStorage(p.store())
                           : OpenFileByteStorage((p.dir / "cache").string());
  if (!bytes) return Fail("binary cache in " + cache_where + ": " + bytes.message());
  auto nars = NarCache::Open(std::move(*bytes), c.cache_max_bytes);
  if (!nars) return Fail("binary cache in " + cache_where + ": " + nars.message());
  spdlog::info("binary cache in {}", cache_where);
  CacheService cache(**store, std::move(*nars), c.cache_gc_grace);
  cache.StartSchedule(c.cache_gc_interval);
  api.SetCache(&cache);
  // A preview passed on by another controller may fetch from this one's cache.
  fleet.SetPreviewHook([&cache](const std::string& machine, const std::string& toplevel) {
    cache.AllowPreview(machine, toplevel);
  });
  NotifierOptions no;
  no.offline_after_ms = c.webhook_offline_after * 1000;
  no.max_queued = c.webhook_queue_max;
  no.retry_base_ms = c.webhook_retry_base_ms;
  no.max_attempts = c.webhook_max_attempts;
  if (cluster) no.shared_poll_ms = 1000;  // the queue is the database's, shared
  auto notifier = std::make_shared<Notifier>(fleet, no);
  api.SetNotifier(notifier.get());
  tls::KeyCheck check = [&fleet](const PublicKey& k, std::string* reason) {
    if (fleet.Lookup(k).role != Role::kNone) return true;  // incl. enrolment while tokens are live
    *reason = "key " + k.ToText() + " (" + k.ShortId() +
              ") is not a registered machine or operator; register it with 'muster machine add'";
    return false;
  };
  auto ctx = tls::MakeServerContext(*key, *pem, &check);
  if (!ctx) return Fail(ctx.message());

  boost::asio::io_context ioc;
  ServerOptions so;
  for (const auto& l : c.listen) so.listen.push_back(*ParseHostPort(l));
  so.handshake_timeout = std::chrono::seconds(c.handshake_timeout);
  so.ping_interval = std::chrono::seconds(c.ping_interval);
  so.idle_timeout = std::chrono::seconds(c.idle_timeout);
  so.max_message_bytes = c.max_message_bytes;
  so.max_handshakes = c.max_handshakes;
  so.max_waiting = c.max_waiting;
  so.admission_timeout = std::chrono::seconds(c.admission_timeout);
  so.agent_limits = c.agent;
  so.log_queue.max_queued_lines = c.log_queue_lines;
  so.cache = &cache;
  Server server(ioc, fleet, api, *ctx, so);
  auto bound = server.Start();
  if (!bound) return Fail(bound.message());
  for (const auto& ep : *bound) {
    spdlog::info("listening on {}", (ep.address().is_v6() ? "[" + ep.address().to_string() + "]"
                                                          : ep.address().to_string()) +
                                        ":" + std::to_string(ep.port()));
  }
  std::unique_ptr<MetricsServer> metrics;
  if (!c.metrics_listen.empty()) {
    metrics = std::make_unique<MetricsServer>(ioc, fleet, server.stats());
    auto ep = metrics->Start(*ParseHostPort(c.metrics_listen));
    if (!ep) return Fail(ep.message());
    spdlog::info("metrics on {}:{}", ep->address().to_string(), ep->port());
  }
  std::unique_ptr<DashboardServer> dashboard;
  if (!c.http_listen.empty()) {
    dashboard = std::make_unique<DashboardServer>(ioc, fleet, &rollouts);
    auto ep = dashboard->Start(*ParseHostPort(c.http_listen));
    if (!ep) return Fail(ep.message());
    spdlog::info(
        "dashboard on http://{}:{}/{}",
        ep->address().is_v6() ? "[" + ep->address().to_string() + "]" : ep->address().to_string(),
        ep->port(), ep->address().is_loopback() ? "" : " (access token required)");
  }
  spdlog::info("controller key {} ready, pin {}", key->public_key().ToText(),
               key->public_key().Fingerprint());
  std::unique_ptr<RosterFile> roster;
  std::unique_ptr<RosterWatcher> roster_watch;
  if (!c.roster.empty()) {
    // Machines in the declarative roster need no 'machine add'; its entries
    // pass the same checks as the CLI's (a registered operator signed them).
    roster = std::make_unique<RosterFile>(fleet, c.roster);
    auto applied = roster->Load();
    if (!applied) return Fail(applied.message(), 2);
    roster_watch = std::make_unique<RosterWatcher>(ioc, *roster);
    roster_watch->Report(applied);
    roster_watch->Start();
  }
  rollouts.Resume();  // active rollouts continue where they were (if this one drives)
  if (cluster) cluster->Start();
  notifier->Start();  // and queued notifications are sent
  // Operators added by another process and expired enrolment tokens: the
  // handshake consults memory only (Fleet::Lookup), so refresh it in the
  // background; 'operator add' also pokes a marker file that is watched.
  RegistryRefresher refresher(ioc, fleet, p.operators_marker());
  refresher.Start();
  boost::asio::signal_set signals(ioc, SIGINT, SIGTERM);
  signals.async_wait([&](const boost::system::error_code& ec, int sig) {
    if (ec) return;
    spdlog::info("signal {}: shutting down", sig);
    server.Stop();
    if (metrics) metrics->Stop();
    if (dashboard) dashboard->Stop();
    ioc.stop();
  });
  int n = c.threads > 0 ? c.threads
                        : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  std::vector<std::thread> threads;
  for (int i = 1; i < n; ++i) threads.emplace_back([&] { RunIoContextGuarded(ioc, "I/O thread"); });
  RunIoContextGuarded(ioc, "I/O thread");
  for (auto& t : threads) t.join();
  if (cluster) cluster->Stop();
  notifier->Stop();
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  ::signal(SIGPIPE, SIG_IGN);
  // Cache chunks (1-4 MiB, a few per fetching machine) come and go all the
  // time. Under glibc's adaptive defaults they were mmapped, or the heap top
  // they freed was trimmed and faulted in again, zeroed, for the next one
  // (clear_page and page faults in the profile of 200 machines fetching).
  // Heap chunks up to 8 MiB and up to 64 MiB of free heap kept per arena:
  // ~7 % fewer CPU seconds per GiB served (docs/BENCHMARKS.md, fourth pass).
#ifdef __GLIBC__
  ::mallopt(M_MMAP_THRESHOLD, 8 << 20);
  ::mallopt(M_TRIM_THRESHOLD, 64 << 20);
#endif
  InitCrypto();
  CLI::App app{"muster-controller: holds agent connections and serves operators"};
  app.set_version_flag("--version", std::string("muster-controller ") + MUSTER_VERSION);
  app.require_subcommand(1);
  std::string state_dir = "/var/lib/muster-controller";

  auto* init = app.add_subcommand("init", "create the controller key, certificate and store");
  init->add_option("--state-dir", state_dir, "state directory")->capture_default_str();
  std::string key_file;
  std::string store_spec;
  const char* kStoreHelp =
      "the store: postgresql://… (several controllers on one database; keep the password in "
      "PGPASSFILE, not here) or an SQLite file (default STATE_DIR/muster.db)";
  init->add_option("--store", store_spec, kStoreHelp);
  init->add_option("--key-file", key_file,
                   "use this controller key (e.g. from clan vars) instead of creating "
                   "STATE_DIR/controller.key");

  std::string csr_cn = "muster-controller";
  auto* csr = app.add_subcommand(
      "csr", "print a certificate request for the controller key (for agents' controllerCaFile)");
  csr->add_option("--state-dir", state_dir, "state directory")->capture_default_str();
  csr->add_option("--cn", csr_cn, "subject common name")->capture_default_str();

  RunConfig rc;
  std::string config_file;
  bool check_config = false;
  auto* run = app.add_subcommand("run", "serve agents and operators");
  run->add_option("--config", config_file, "JSON configuration file (flags override it)");
  run->add_option("--state-dir", state_dir, "state directory")->capture_default_str();
  run->add_option("--listen", rc.listen, "ADDR:PORT to listen on (repeatable; [::]:PORT for all)");
  run->add_option("--metrics-listen", rc.metrics_listen, "ADDR:PORT for /metrics and /healthz");
  run->add_option("--http-listen", rc.http_listen,
                  "ADDR:PORT for the read-only web dashboard (loopback: open; any other address "
                  "needs a token from 'muster dashboard token')");
  run->add_option("--threads", rc.threads, "I/O threads (default: one per core)");
  run->add_option("--handshake-timeout", rc.handshake_timeout, "seconds")->capture_default_str();
  run->add_option("--ping-interval", rc.ping_interval, "seconds")->capture_default_str();
  run->add_option("--idle-timeout", rc.idle_timeout, "seconds")->capture_default_str();
  run->add_option("--max-message-bytes", rc.max_message_bytes,
                  "largest message to or from an agent; publishes whose deploy message is larger "
                  "are refused (agents' maxMessageBytes must be at least this)")
      ->capture_default_str();
  run->add_option("--max-handshakes", rc.max_handshakes,
                  "TLS handshakes processed at once; further connections wait their turn")
      ->capture_default_str();
  run->add_option("--max-waiting", rc.max_waiting,
                  "connections waiting for a handshake slot; beyond, new ones are refused")
      ->capture_default_str();
  run->add_option("--admission-timeout", rc.admission_timeout,
                  "seconds a connection may wait for a handshake slot")
      ->capture_default_str();
  run->add_option("--log-level", rc.log_level)->capture_default_str();
  run->add_option("--max-log-bytes-per-machine", rc.store.log_bytes_per_machine,
                  "log bytes kept per machine (oldest dropped)")
      ->capture_default_str();
  run->add_option("--max-log-bytes-per-generation", rc.store.log_bytes_per_generation,
                  "log bytes kept per generation of a machine")
      ->capture_default_str();
  run->add_option("--max-events-per-machine", rc.store.events_per_machine,
                  "status events kept per machine (oldest dropped)")
      ->capture_default_str();
  run->add_option("--keep-event-generations", rc.store.keep_event_generations,
                  "the events of this many newest generations are pruned last")
      ->capture_default_str();
  run->add_option("--agent-messages-per-second", rc.agent.messages_per_second,
                  "per agent connection; beyond it (after a 4 s burst) its reads pause")
      ->capture_default_str();
  run->add_option("--agent-bytes-per-second", rc.agent.bytes_per_second,
                  "per agent connection; beyond it (after a 4 s burst) its reads pause")
      ->capture_default_str();
  run->add_option("--cache-max-bytes", rc.cache_max_bytes,
                  "bound on the binary cache (<state-dir>/cache), bytes")
      ->capture_default_str();
  run->add_option("--cache-storage", rc.cache_storage,
                  "where the binary cache keeps its bytes: files (<state-dir>/cache), database "
                  "(the PostgreSQL store, shared by every controller on it) or auto (database "
                  "with a PostgreSQL store, else files)")
      ->capture_default_str();
  run->add_option("--cache-gc-interval", rc.cache_gc_interval, "seconds between cache collections")
      ->capture_default_str()
      ->check(CLI::Range(std::int64_t{1}, std::int64_t{1} << 40));
  run->add_option("--cache-gc-grace", rc.cache_gc_grace,
                  "seconds an unreferenced cache path or upload survives")
      ->capture_default_str()
      ->check(CLI::Range(std::int64_t{0}, std::int64_t{1} << 40));
  run->add_option("--webhook-offline-after", rc.webhook_offline_after,
                  "seconds a machine must be away before webhooks hear it is offline")
      ->capture_default_str();
  run->add_option("--webhook-queue-max", rc.webhook_queue_max,
                  "webhook deliveries kept queued; beyond it the oldest are dropped")
      ->capture_default_str();
  run->add_option("--webhook-retry-base-ms", rc.webhook_retry_base_ms,
                  "delay before the first webhook retry; it doubles per attempt (up to an hour)")
      ->capture_default_str();
  run->add_option("--webhook-max-attempts", rc.webhook_max_attempts,
                  "attempts per webhook delivery before it is dropped (logged)")
      ->capture_default_str();
  run->add_option("--log-queue-lines", rc.log_queue_lines,
                  "agent log lines waiting for the store; beyond it lines are dropped")
      ->capture_default_str();
  run->add_option("--key-file", key_file, "controller key file (default STATE_DIR/controller.key)");
  run->add_option("--store", store_spec, kStoreHelp);
  run->add_option("--roster", rc.roster,
                  "declarative roster: signed entries from 'muster roster sign', applied at start "
                  "and whenever the file changes");
  run->add_flag("--check-config", check_config, "validate the configuration and exit");

  std::string op_name, op_key;
  auto* op = app.add_subcommand("operator", "manage operators locally");
  op->require_subcommand(1);
  auto* op_add = op->add_subcommand("add", "register an operator key");
  op_add->add_option("NAME", op_name, "operator name")->required();
  op_add->add_option("--key", op_key, "public key 'ed25519:…' or a path to a .pub file")
      ->required();
  op_add->add_option("--state-dir", state_dir, "state directory")->capture_default_str();
  op_add->add_option("--store", store_spec, kStoreHelp);
  std::string op_rm_name;
  auto* op_remove =
      op->add_subcommand("remove", "remove an operator: its key is refused and its sessions close");
  op_remove->add_option("NAME", op_rm_name, "operator name")->required();
  op_remove->add_option("--state-dir", state_dir, "state directory")->capture_default_str();
  op_remove->add_option("--store", store_spec, kStoreHelp);

  std::string op_sync_file;
  auto* op_sync = op->add_subcommand(
      "sync",
      "make the declared operators (JSON {\"name\": \"ed25519:…\"}) the managed set: add them, "
      "give them their declared keys, and remove those declared before but not any more "
      "(operators added by hand stay)");
  op_sync->add_option("--file", op_sync_file, "the declared operators (JSON object)")->required();
  op_sync->add_option("--state-dir", state_dir, "state directory")->capture_default_str();
  op_sync->add_option("--store", store_spec, kStoreHelp);

  std::string from_sqlite;
  auto* migrate = app.add_subcommand(
      "migrate",
      "bring a store's schema up to date (PostgreSQL: once, however many controllers share it), "
      "optionally copying an SQLite store into an empty PostgreSQL one");
  migrate->add_option("--store", store_spec, kStoreHelp)->required();
  migrate->add_option("--from-sqlite", from_sqlite,
                      "copy this SQLite store (a stopped controller's muster.db) into --store, "
                      "which must be an empty PostgreSQL store");

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  if (init->parsed()) return Init({state_dir, key_file, store_spec});
  if (csr->parsed()) return Csr({state_dir}, csr_cn);
  if (op_add->parsed()) return OperatorAdd({state_dir, {}, store_spec}, op_name, op_key);
  if (op_remove->parsed()) return OperatorRemove({state_dir, {}, store_spec}, op_rm_name);
  if (op_sync->parsed()) return OperatorSync({state_dir, {}, store_spec}, op_sync_file);
  if (migrate->parsed()) return Migrate(store_spec, from_sqlite);
  if (run->parsed()) {
    RunConfig merged;
    std::string dir = state_dir;
    if (!config_file.empty()) {
      if (auto st = LoadConfigFile(config_file, merged, dir); !st) return Fail(st.message(), 2);
      if (run->count("--state-dir")) dir = state_dir;
    }
    if (!rc.listen.empty() || config_file.empty()) merged.listen = rc.listen;
    if (run->count("--metrics-listen")) merged.metrics_listen = rc.metrics_listen;
    if (run->count("--http-listen")) merged.http_listen = rc.http_listen;
    if (run->count("--threads")) merged.threads = rc.threads;
    if (run->count("--handshake-timeout") || config_file.empty())
      merged.handshake_timeout = rc.handshake_timeout;
    if (run->count("--ping-interval") || config_file.empty())
      merged.ping_interval = rc.ping_interval;
    if (run->count("--idle-timeout") || config_file.empty()) merged.idle_timeout = rc.idle_timeout;
    if (run->count("--max-message-bytes") || config_file.empty())
      merged.max_message_bytes = rc.max_message_bytes;
    if (run->count("--max-handshakes") || config_file.empty())
      merged.max_handshakes = rc.max_handshakes;
    if (run->count("--max-waiting") || config_file.empty()) merged.max_waiting = rc.max_waiting;
    if (run->count("--admission-timeout") || config_file.empty())
      merged.admission_timeout = rc.admission_timeout;
    if (run->count("--log-level") || config_file.empty()) merged.log_level = rc.log_level;
    auto flag = [&](const char* name) { return run->count(name) > 0 || config_file.empty(); };
    if (flag("--max-log-bytes-per-machine"))
      merged.store.log_bytes_per_machine = rc.store.log_bytes_per_machine;
    if (flag("--max-log-bytes-per-generation"))
      merged.store.log_bytes_per_generation = rc.store.log_bytes_per_generation;
    if (flag("--max-events-per-machine"))
      merged.store.events_per_machine = rc.store.events_per_machine;
    if (flag("--keep-event-generations"))
      merged.store.keep_event_generations = rc.store.keep_event_generations;
    if (flag("--agent-messages-per-second"))
      merged.agent.messages_per_second = rc.agent.messages_per_second;
    if (flag("--agent-bytes-per-second")) merged.agent.bytes_per_second = rc.agent.bytes_per_second;
    if (flag("--log-queue-lines")) merged.log_queue_lines = rc.log_queue_lines;
    if (run->count("--roster")) merged.roster = rc.roster;
    if (run->count("--key-file")) merged.key_file = key_file;
    if (run->count("--store")) merged.store_spec = store_spec;
    if (flag("--cache-max-bytes")) merged.cache_max_bytes = rc.cache_max_bytes;
    if (flag("--cache-storage")) merged.cache_storage = rc.cache_storage;
    if (flag("--cache-gc-interval")) merged.cache_gc_interval = rc.cache_gc_interval;
    if (flag("--cache-gc-grace")) merged.cache_gc_grace = rc.cache_gc_grace;
    if (flag("--webhook-offline-after")) merged.webhook_offline_after = rc.webhook_offline_after;
    if (flag("--webhook-queue-max")) merged.webhook_queue_max = rc.webhook_queue_max;
    if (flag("--webhook-retry-base-ms")) merged.webhook_retry_base_ms = rc.webhook_retry_base_ms;
    if (flag("--webhook-max-attempts")) merged.webhook_max_attempts = rc.webhook_max_attempts;
    if (auto st = CheckRunConfig(merged); !st) return Fail(st.message(), 2);
    if (check_config) {
      std::cout << "configuration is valid\n";
      return 0;
    }
    return Run({dir, merged.key_file, merged.store_spec}, merged);
  }
  return 0;
}
