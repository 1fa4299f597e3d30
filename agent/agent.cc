#include "agent/agent.h"

#include <spdlog/spdlog.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <boost/asio/post.hpp>
#include <filesystem>
#include <random>

#include "agent/floor.h"
#include "agent/health.h"
#include "agent/preview.h"
#include "agent/vars.h"
#include "agent/windows.h"
#include "common/fsutil.h"
#include "common/log.h"
#include "common/roster.h"
#include "common/utf8.h"

namespace muster {

namespace {
constexpr std::size_t kMaxQueuedLogLines = 5000;
constexpr std::size_t kMaxQueuedReports = 64;
// What process output and details are cut to (between characters, invalid
// UTF-8 replaced) before they are queued, persisted or sent.
constexpr std::size_t kMaxLogLineBytes = 4000;
constexpr std::size_t kMaxDetailBytes = 4000;
constexpr std::size_t kMaxFactBytes = 256;
// One log message holds at most this many lines and line bytes, so that even
// fully escaped (\u00XX: 6 bytes per byte) it stays far below the controller's
// message limit.
constexpr std::size_t kMaxLinesPerMessage = 200;
constexpr std::size_t kMaxLineBytesPerMessage = 64 * 1024;

// This boot's id ("" where there is none, e.g. macOS).
std::string BootId() {
  auto t = ReadFile("/proc/sys/kernel/random/boot_id", 128);
  if (!t) return "";
  std::string s = *t;
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  return s;
}

std::string ReadFirstLine(const std::string& path) {
  auto t = ReadFile(path, 4096);
  if (!t) return "";
  std::string s = *t;
  auto nl = s.find('\n');
  return nl == std::string::npos ? s : s.substr(0, nl);
}

std::string HumanBytes(std::int64_t b) {
  char buf[32];
  if (b >= (1 << 30)) {
    std::snprintf(buf, sizeof buf, "%.1f GiB", static_cast<double>(b) / (1 << 30));
  } else if (b >= (1 << 20)) {
    std::snprintf(buf, sizeof buf, "%.1f MiB", static_cast<double>(b) / (1 << 20));
  } else {
    std::snprintf(buf, sizeof buf, "%.1f KiB", static_cast<double>(b) / 1024);
  }
  return buf;
}
}  // namespace

Agent::Agent(AgentConfig config, SecretKey key, std::shared_ptr<boost::asio::ssl::context> tls,
             std::unique_ptr<SystemOps> ops, ProcessRunner& runner, Clock clock)
    : cfg_(std::move(config)),
      key_(std::move(key)),
      tls_(std::move(tls)),
      ops_(std::move(ops)),
      runner_(runner),
      clock_(std::move(clock)),
      log_timer_(ioc_) {
  policy_.confirm_timeout_ms = cfg_.confirm_timeout.count();
}

Agent::~Agent() {
  Stop();
  if (worker_.joinable()) worker_.join();
}

proto::HostFacts Agent::Facts() {
  proto::HostFacts f;
  struct utsname u {};
  if (::uname(&u) == 0) {
    std::string machine = u.machine;
    if (machine == "arm64") machine = "aarch64";
    std::string sys = u.sysname;
    f.system = machine + "-" + (sys == "Darwin" ? "darwin" : "linux");
    f.kernel = u.release;
  }
  char host[256] = {};
  if (::gethostname(host, sizeof host - 1) == 0) f.hostname = host;
  f.system = CutUtf8(f.system, kMaxFactBytes);
  f.kernel = CutUtf8(f.kernel, kMaxFactBytes);
  f.hostname = CutUtf8(f.hostname, kMaxFactBytes);
  std::string nixos = ReadFirstLine(cfg_.current_system + "/nixos-version");
  std::string darwin = ReadFirstLine(cfg_.current_system + "/darwin-version");
  if (!nixos.empty()) {
    f.os = "nixos";
    f.os_version = CutUtf8(nixos, kMaxFactBytes);
  } else if (!darwin.empty()) {
    f.os = "darwin";
    f.os_version = CutUtf8(darwin, kMaxFactBytes);
  } else {
    f.os = f.system.find("darwin") != std::string::npos ? "darwin" : "linux";
  }
  return f;
}

int Agent::Run() {
  {
    auto floor = LoadFloor(cfg_.FloorPath());
    if (!floor) {
      spdlog::error("refusing to start: {}", floor.message());
      return 1;
    }
    std::error_code ec;
    const bool have_state = std::filesystem::exists(cfg_.StatePath(), ec);
    auto st = LoadAgentState(cfg_.StatePath());
    if (!st) {
      spdlog::error("{}", st.message());
      spdlog::error("{}", UnreadableStateAdvice(cfg_.StatePath(), cfg_.FloorPath(), *floor));
      return 1;
    }
    // The floor is the larger of floor.json and state.json: moving state.json
    // aside does not reopen replay.
    auto established = EstablishFloor(
        cfg_.FloorPath(),
        MachineKeyTime(cfg_.KeyPath(), cfg_.KeyProvided(), cfg_.machine_key_created_at), *floor,
        have_state ? std::optional<AgentState>(*st) : std::nullopt);
    if (established.start.from_key_time) {
      spdlog::warn("{}", established.start.note);
    } else {
      spdlog::info("{}", established.start.note);
    }
    if (!established.written) {
      spdlog::error(
          "{}; no generation is accepted until it can be written (free space in {} or "
          "make it writable)",
          established.written.message(), cfg_.state_dir);
    }
    state_ = std::move(*st);
    state_.last_applied = established.start.floor.last_applied;
    state_.last_created_at = established.start.floor.last_created_at;
    pending_ = state_.pending;  // accepted before a restart, not yet started
  }
  // Resume an interrupted deploy before anything else.
  if (state_.current && !IsTerminal(state_.current->phase)) {
    DeployRecord& r = *state_.current;
    spdlog::info("resuming generation {} from phase {}", r.generation(), ToString(r.phase));
    if (r.phase == Phase::kActivating) {
      // The activation may still run in its transient unit (the previous agent
      // stopped at once on SIGTERM): the worker waits for its result while the
      // link is up, and a SIGTERM meanwhile still stops this agent at once.
      resume_activation_ = true;
    } else {
      Resume(r, ActivationEvidence::kUnknown, ops_->ActiveToplevel(), "", clock_(), policy_);
      Persist();
    }
    Report(r);
  } else if (state_.current) {
    NoteBootedInto(*state_.current);
    Report(*state_.current);
  }
  // A deploy that finished before a restart (or just now, while resuming) no
  // longer needs the previous vars.
  if (state_.current) DiscardPreviousVarsIfFinal(*state_.current);

  if (!cfg_.enroll_token_file.empty()) EnrollIfNeeded();

  Link::Callbacks cb;
  cb.on_open = [this] { OnOpen(); };
  cb.on_message = [this](std::string t) { OnMessage(t); };
  cb.on_down = [this](const std::string&) {
    if (substituter_) substituter_->OnLinkDown();
    std::lock_guard lock(mu_);
    if (welcomed_) ++disconnects_;
    welcomed_ = false;
  };
  link_ = std::make_unique<Link>(ioc_, cfg_, tls_, cb);
  substituter_ = std::make_unique<Substituter>(
      ioc_, [this](std::string t) { return link_->Send(std::move(t)); });
  link_->Start();
  ArmLogTimer();
  if (!cfg_.metrics_listen.empty()) {
    metrics_ = std::make_unique<HttpServer>(
        ioc_,
        [this](const std::string& path) {
          HttpReply r;
          if (path == "/metrics") {
            r.content_type = "text/plain; version=0.0.4";
            r.body = RenderMetrics();
          } else {
            r.status = 404;
            r.body = "not found; try /metrics\n";
          }
          return r;
        },
        "muster-agent");
    auto ep = metrics_->Start(*ParseHostPort(cfg_.metrics_listen));
    if (!ep) {
      spdlog::error("metrics: {}", ep.message());
    } else {
      spdlog::info("metrics on {}:{}", ep->address().to_string(), ep->port());
    }
  }
  worker_ = std::thread([this] { WorkerLoop(); });
  spdlog::info("machine {} (key {}) connecting to {} controller(s)", cfg_.machine,
               key_.public_key().ShortId(), cfg_.controllers.size());
  RunIoContextGuarded(ioc_, "I/O thread");
  {
    std::lock_guard lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  if (worker_.joinable()) worker_.join();
  return 0;
}

void Agent::Stop() {
  {
    std::lock_guard lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  ops_->Interrupt();  // an activation in progress goes on without this agent
  boost::asio::post(ioc_, [this] {
    if (link_) link_->Stop();
    log_timer_.cancel();
    if (metrics_) metrics_->Stop();
    ioc_.stop();
  });
}

// ---------------------------------------------------------------- enrolment

// With an enrolment token and no record of having enrolled, register this
// machine's key on /v1/enroll first. Retries with backoff while the
// controller cannot be reached; gives up (and carries on as a normal agent,
// whose handshake then says what is wrong) when the controller refuses.
void Agent::EnrollIfNeeded() {
  const std::string marker = cfg_.state_dir + "/enrolled";
  std::error_code ec;
  if (std::filesystem::exists(marker, ec)) return;
  auto token_text = ReadFile(cfg_.enroll_token_file, 4096);
  if (!token_text) {
    spdlog::error("enrolment: {}", token_text.message());
    return;
  }
  // The token stays here: the controller gets only this machine's key signed
  // with the enrolment key derived from it (common/roster.h).
  auto enroll_key = EnrollKeyFromToken(*token_text);
  if (!enroll_key) {
    spdlog::error("enrolment: {} ({})", enroll_key.message(), cfg_.enroll_token_file);
    return;
  }
  const std::string proof =
      MakeEnrollBinding(*enroll_key, cfg_.machine, key_.public_key()).signature;
  for (int attempt = 0;; ++attempt) {
    {
      std::lock_guard lock(mu_);
      if (stopping_) return;
    }
    WsUrl url = cfg_.controllers[static_cast<std::size_t>(attempt) % cfg_.controllers.size()];
    url.path = "/v1/enroll";
    boost::asio::io_context ioc;
    ClientOptions o;
    o.url = url;
    o.tls = tls_;
    std::string outcome, refusal;
    bool done = false;
    std::shared_ptr<WsClient> client;
    WsClient::Handlers h;
    h.on_open = [&] { client->Send(proto::Encode(proto::Enroll{cfg_.machine, proof})); };
    h.on_message = [&](std::string text) {
      auto m = proto::Decode(text, {.max_bytes = cfg_.max_message_bytes});
      if (m && std::holds_alternative<proto::Enrolled>(*m)) outcome = "enrolled";
      if (m && std::holds_alternative<proto::ErrorMsg>(*m))
        refusal = std::get<proto::ErrorMsg>(*m).message;
    };
    h.on_close = [&](std::string reason) {
      done = true;
      if (outcome.empty() && refusal.empty()) refusal = "";
      if (outcome.empty()) outcome = reason;
    };
    client = WsClient::Create(ioc.get_executor(), o, h);
    client->Connect();
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    while (!done && std::chrono::steady_clock::now() < deadline) {
      try {
        ioc.run_one_for(std::chrono::milliseconds(100));
      } catch (const std::exception& e) {
        spdlog::error("enrolment: a handler failed: {}; continuing", e.what());
      }
    }
    if (outcome == "enrolled") {
      (void)WriteFileAtomic(marker, cfg_.machine + "\n", 0600);
      spdlog::info("enrolled as machine {} with key {}", cfg_.machine, key_.public_key().ShortId());
      return;
    }
    if (!refusal.empty()) {
      spdlog::error("enrolment of {} refused by the controller: {}", cfg_.machine, refusal);
      return;
    }
    std::uniform_real_distribution<double> u(0.0, 1.0);
    std::mt19937_64 rng{std::random_device{}()};
    auto delay = BackoffDelay(attempt, cfg_.backoff_base, cfg_.backoff_cap, u(rng));
    spdlog::warn("enrolment: {}; retrying in {} ms", outcome, delay.count());
    std::unique_lock lock(mu_);
    cv_.wait_for(lock, delay, [&] { return stopping_; });
  }
}

// ---------------------------------------------------------------- I/O thread

void Agent::OnOpen() { SendHello(); }

void Agent::SendHello() {
  proto::Hello h;
  h.machine = cfg_.machine;
  h.agent_version = MUSTER_VERSION;
  h.facts = Facts();
  h.toplevel = SanitizeUtf8(ops_->ActiveToplevel());
  {
    std::lock_guard lock(mu_);
    h.last_applied = state_.last_applied;
    if (pending_) {
      h.generation = pending_->generation();
      h.phase = std::string(ToString(Phase::kVerified));
    } else if (state_.current) {
      h.generation = state_.current->generation();
      h.phase = std::string(ToString(state_.current->phase));
    } else {
      h.phase = "idle";
    }
    if (state_.last_refused > h.generation) {
      h.generation = state_.last_refused;
      h.phase = "refused";
    }
  }
  link_->Send(proto::Encode(h));
}

void Agent::OnMessage(const std::string& text) {
  auto msg = proto::Decode(text, {.max_bytes = cfg_.max_message_bytes});
  if (!msg) {
    spdlog::error("controller sent an invalid message ({}); reconnecting", msg.message());
    link_->Drop("invalid message from controller");
    return;
  }
  if (const auto* w = std::get_if<proto::Welcome>(&*msg)) {
    spdlog::info("connected to the controller as {}", w->machine);
    link_->ResetBackoff();
    {
      std::lock_guard lock(mu_);
      welcomed_ = true;
      ++connections_;
    }
    cv_.notify_all();  // a confirmation waiting for contact has it
    FlushReports();
    FlushLogs();
    substituter_->OnLinkUp();
    return;
  }
  if (const auto* a = std::get_if<proto::Ack>(&*msg)) {
    {
      std::lock_guard lock(mu_);
      acked_seq_ = std::max(acked_seq_, a->seq);
    }
    cv_.notify_all();
    return;
  }
  if (auto* f = std::get_if<proto::Fetched>(&*msg)) {
    substituter_->OnFetched(std::move(*f));
    return;
  }
  if (const auto* d = std::get_if<proto::Deploy>(&*msg)) {
    OnDeploy(*d);
    return;
  }
  if (const auto* p = std::get_if<proto::Preview>(&*msg)) {
    OnPreview(*p);
    return;
  }
  if (const auto* e = std::get_if<proto::ErrorMsg>(&*msg)) {
    spdlog::error("controller: {}: {}", e->code, e->message);
    return;
  }
  spdlog::warn("ignoring unexpected '{}' message from the controller", proto::TypeName(*msg));
}

void Agent::OnDeploy(const proto::Deploy& d) {
  auto peek = ParseManifest(d.manifest.manifest);
  std::int64_t gen = peek ? peek->generation : 0;
  VerifyContext ctx;
  ctx.machine = cfg_.machine;
  ctx.trusted_operators = cfg_.trusted_operator_keys;
  ctx.now_s = clock_() / 1000;
  ctx.max_future_skew_s = cfg_.max_manifest_future_skew.count();
  {
    std::lock_guard lock(mu_);
    ctx.last_applied = state_.last_applied;
    ctx.last_created_at = state_.last_created_at;
    bool in_hand = (pending_ && pending_->generation() == gen) ||
                   (state_.current && state_.current->generation() == gen);
    if (in_hand) {
      spdlog::debug("generation {} delivered again; already in hand", gen);
      return;
    }
  }
  auto refuse = [&](const std::string& reason) {
    std::string why = CutUtf8(reason, kMaxDetailBytes);
    spdlog::error("refused: {}", why);
    proto::StatusReport r;
    r.generation = gen;
    r.phase = "refused";
    r.detail = why;
    r.at = clock_();
    {
      std::lock_guard lock(mu_);
      if (gen > state_.last_refused) {
        state_.last_refused = gen;
        state_.last_refused_reason = why;
        (void)SaveAgentState(state_, cfg_.StatePath());
      }
      QueueReportLocked(r);
    }
    FlushReports();
  };
  auto sealed = Base64Decode(d.vars);
  if (!sealed) return refuse("generation " + std::to_string(gen) + ": vars are not valid base64");
  auto m = VerifySignedManifest(d.manifest, ctx, *sealed);
  if (!m) return refuse(m.message());
  if (!d.vars.empty()) {
    auto bundle = OpenVars(key_, d.vars);
    if (!bundle) {
      return refuse("manifest for " + cfg_.machine + " generation " + std::to_string(gen) + ": " +
                    bundle.message());
    }
    if (auto st = CheckVarsTarget(*bundle, cfg_.vars_dir); !st) {
      return refuse("generation " + std::to_string(gen) + ": " + st.message());
    }
  }
  DeployRecord r;
  r.signed_manifest = d.manifest;
  r.manifest = *m;
  r.vars = d.vars;
  r.phase = Phase::kVerified;
  r.received_at = clock_();
  r.detail = "signed by " + ParsePublicKey(d.manifest.signer)->ShortId() + "; " +
             std::string(ToString(m->action)) + " " + m->toplevel;
  {
    std::lock_guard lock(mu_);
    const Floor accepted{m->generation, std::max(ctx.last_created_at, m->created_at)};
    state_.last_applied = accepted.last_applied;        // never accept this number again
    state_.last_created_at = accepted.last_created_at;  // nor anything signed before it
    std::optional<DeployRecord> previous_pending = state_.pending;
    state_.pending = r;  // survives a restart before the worker takes it
    // floor.json first (fsynced): state.json never records an acceptance that
    // the floor, which outlives it, does not hold.
    Status st = SaveFloor(accepted, cfg_.FloorPath());
    if (st) st = SaveAgentState(state_, cfg_.StatePath());
    if (!st) {
      state_.last_applied = ctx.last_applied;
      state_.last_created_at = ctx.last_created_at;
      state_.pending = previous_pending;
      spdlog::error("cannot persist state: {}", st.message());
      proto::StatusReport rep;
      rep.generation = gen;
      rep.phase = "failed";
      rep.detail = "cannot record generation " + std::to_string(gen) + " in the agent state (" +
                   st.message() + "); nothing was changed";
      rep.at = clock_();
      QueueReportLocked(rep);
      boost::asio::post(ioc_, [this] { FlushReports(); });
      return;
    }
    if (pending_) {
      spdlog::info("generation {} supersedes queued generation {}", m->generation,
                   pending_->generation());
    }
    pending_ = r;
  }
  spdlog::info("accepted generation {}: {} {}", m->generation, ToString(m->action), m->toplevel);
  cv_.notify_all();
}

void Agent::OnPreview(const proto::Preview& p) {
  PreviewVerifyContext ctx;
  ctx.machine = cfg_.machine;
  ctx.trusted_operators = cfg_.trusted_operator_keys;
  ctx.now_s = clock_() / 1000;
  ctx.max_future_skew_s = cfg_.max_manifest_future_skew.count();
  auto m = VerifyPreview(p.manifest, ctx);
  proto::PreviewReport refusal;
  refusal.id = CutUtf8(p.id, 64);
  if (!m) {
    refusal.error = "refused: " + m.message();
  } else if (preview_guard_.Seen(p.manifest.signature)) {
    refusal.error = "refused: this preview request was delivered before (a replay); ask again";
  } else {
    std::lock_guard lock(mu_);
    if (queued_preview_ || preview_running_) {
      refusal.error = "another preview is running on " + cfg_.machine + "; ask again when it ends";
    } else {
      queued_preview_.emplace(refusal.id, *m);
    }
  }
  if (!refusal.error.empty()) {
    spdlog::warn("preview {}: {}", refusal.id, refusal.error);
    SendPreviewReport(std::move(refusal));
    return;
  }
  spdlog::info("preview {} of {} queued", refusal.id, m->toplevel);
  cv_.notify_all();
}

void Agent::SendPreviewReport(proto::PreviewReport r) {
  r.at = clock_();
  r.error = CutUtf8(r.error, kMaxDetailBytes);
  boost::asio::post(ioc_, [this, text = proto::Encode(r)] {
    if (!link_->Send(text))
      spdlog::warn("preview report not sent: the controller is not connected");
  });
}

void Agent::RunQueuedPreview() {
  std::string id;
  Manifest m;
  {
    std::lock_guard lock(mu_);
    if (!queued_preview_) return;
    id = queued_preview_->first;
    m = queued_preview_->second;
    queued_preview_.reset();
    preview_running_ = true;
  }
  spdlog::info("preview {}: {}", id, m.toplevel);
  LineSink sink = [](const std::string& stream, const std::string& line) {
    spdlog::debug("[preview {}] {}", stream, line);
  };
  proto::PreviewReport r;
  bool via_controller = UsesControllerCache(m) && substituter_;
  std::string url;
  if (via_controller) {
    auto opened = substituter_->Open();
    if (!opened) {
      r.error = opened.message();
      via_controller = false;
    } else {
      url = *opened;
    }
  }
  if (r.error.empty()) {
    Manifest run = via_controller ? WithControllerCache(m, url) : m;
    try {
      r = RunPreview(run, *ops_, sink);
    } catch (const std::exception& e) {
      r.error = std::string("preview failed with an internal error: ") + e.what();
    }
    if (via_controller) substituter_->Close();
    for (auto at = r.error.find(url); via_controller && at != std::string::npos;
         at = r.error.find(url)) {
      r.error.replace(at, url.size(), "the controller's cache (muster:)");
    }
  }
  r.id = id;
  r.toplevel = m.toplevel;
  auto clean = [](std::vector<std::string>& v) {
    for (auto& s : v) s = CutUtf8(s, 512);
  };
  clean(r.added);
  clean(r.removed);
  clean(r.units_stop);
  clean(r.units_reload);
  clean(r.units_restart);
  clean(r.units_start);
  for (auto& v : r.versions) {
    v.name = CutUtf8(v.name, 256);
    v.before = CutUtf8(v.before, 512);
    v.after = CutUtf8(v.after, 512);
  }
  r.current = SanitizeUtf8(r.current);
  spdlog::info("preview {}: {}", id, r.error.empty() ? "done" : r.error);
  SendPreviewReport(std::move(r));
  std::lock_guard lock(mu_);
  preview_running_ = false;
}

void Agent::QueueReportLocked(const proto::StatusReport& r) {
  outbox_status_.push_back(r);
  while (outbox_status_.size() > kMaxQueuedReports) outbox_status_.pop_front();
}

void Agent::FlushReports() {
  for (;;) {
    proto::StatusReport r;
    {
      std::lock_guard lock(mu_);
      if (!welcomed_ || outbox_status_.empty() || !link_->connected()) return;
      r = outbox_status_.front();
      outbox_status_.pop_front();
      r.seq = next_seq_++;
    }
    if (!link_->Send(proto::Encode(r))) {
      std::lock_guard lock(mu_);
      outbox_status_.push_front(r);
      return;
    }
  }
}

void Agent::FlushLogs() {
  std::deque<proto::LogLines> batch;
  {
    std::lock_guard lock(mu_);
    if (!welcomed_ || outbox_logs_.empty()) return;
    batch.swap(outbox_logs_);
    outbox_log_lines_ = 0;
    outbox_log_bytes_ = 0;
  }
  for (auto& l : batch) link_->Send(proto::Encode(l));
}

void Agent::ArmLogTimer() {
  log_timer_.expires_after(std::chrono::milliseconds(200));
  log_timer_.async_wait([this](const boost::system::error_code& ec) {
    if (ec) return;
    FlushReports();
    FlushLogs();
    ArmLogTimer();
  });
}

// ------------------------------------------------------------- worker thread

void Agent::Persist() {
  if (auto st = SaveAgentState(state_, cfg_.StatePath()); !st) {
    spdlog::error("cannot persist the agent state: {}", st.message());
    persist_error_ = st.message();
  } else {
    persist_error_.clear();
  }
}

void Agent::DiscardPreviousVarsIfFinal(const DeployRecord& r) {
  if (!IsTerminal(r.phase)) return;  // a rollback may still restore them
  if (r.phase == Phase::kFailed && r.vars_changed) {
    // The rollback failed: the old vars may still be needed to recover by hand.
    std::error_code ec;
    if (!std::filesystem::exists(cfg_.vars_dir + ".muster-previous", ec)) return;
    spdlog::warn(
        "generation {}: the vars from before it are kept in {}.muster-previous for "
        "recovery; remove that directory once the machine is repaired",
        r.generation(), cfg_.vars_dir);
    return;
  }
  if (auto st = DiscardPreviousVars(cfg_.vars_dir); !st) spdlog::error("{}", st.message());
}

std::string Agent::RenderMetrics() {
  std::lock_guard lock(mu_);
  std::string o;
  auto add = [&](const std::string& name, const char* type, const char* help,
                 const std::string& sample) {
    o += "# HELP " + name + " " + help + "\n# TYPE " + name + " " + type + "\n" + sample;
  };
  add("muster_agent_connected", "gauge", "1 while the agent holds a welcomed connection.",
      "muster_agent_connected " + std::to_string(welcomed_ ? 1 : 0) + "\n");
  add("muster_agent_connections_total", "counter", "Sessions established with a controller.",
      "muster_agent_connections_total " + std::to_string(connections_) + "\n");
  add("muster_agent_disconnects_total", "counter", "Established sessions that were lost.",
      "muster_agent_disconnects_total " + std::to_string(disconnects_) + "\n");
  add("muster_agent_last_applied_generation", "gauge", "Highest generation accepted.",
      "muster_agent_last_applied_generation " + std::to_string(state_.last_applied) + "\n");
  std::string phase = state_.current ? std::string(ToString(state_.current->phase)) : "idle";
  add("muster_agent_phase", "gauge", "Phase of the current or last deploy (label).",
      "muster_agent_phase{phase=\"" + phase + "\"} 1\n");
  add("muster_agent_reboot_required", "gauge", "1 when the last deploy needs a reboot.",
      "muster_agent_reboot_required " +
          std::to_string(state_.current && state_.current->reboot_required ? 1 : 0) + "\n");
  std::string outcomes;
  for (const auto& [k, v] : outcomes_) {
    outcomes += "muster_agent_deploys_total{result=\"" + k + "\"} " + std::to_string(v) + "\n";
  }
  add("muster_agent_deploys_total", "counter", "Deploys finished since start, by result.",
      outcomes);
  return o;
}

void Agent::Report(const DeployRecord& r) {
  proto::StatusReport s;
  s.generation = r.generation();
  s.phase = std::string(ToString(r.phase));
  s.detail = CutUtf8(r.detail, kMaxDetailBytes);
  s.toplevel =
      r.phase == Phase::kSucceeded || r.phase == Phase::kRolledBack || r.phase == Phase::kUnchanged
          ? SanitizeUtf8(ops_->ActiveToplevel())
          : std::string();
  s.reboot_required = r.reboot_required;
  s.closure_bytes = r.closure_bytes;
  s.at = clock_();
  if (IsTerminal(r.phase)) s.facts = Facts();
  spdlog::info("generation {}: {}{}{}", s.generation, s.phase, s.detail.empty() ? "" : ": ",
               s.detail);
  {
    std::lock_guard lock(mu_);
    QueueReportLocked(s);
  }
  boost::asio::post(ioc_, [this] { FlushReports(); });
}

void Agent::Log(std::int64_t generation, const std::string& stream, const std::string& line) {
  spdlog::debug("[{}] {}", stream, line);
  std::lock_guard lock(mu_);
  if (outbox_log_lines_ >= kMaxQueuedLogLines) return;  // offline too long: drop the excess
  std::string clean = CutUtf8(line, kMaxLogLineBytes);
  if (outbox_logs_.empty() || outbox_logs_.back().stream != stream ||
      outbox_logs_.back().generation != generation ||
      outbox_logs_.back().lines.size() >= kMaxLinesPerMessage ||
      outbox_log_bytes_ + clean.size() > kMaxLineBytesPerMessage) {
    outbox_logs_.push_back(proto::LogLines{generation, stream, {}});
    outbox_log_bytes_ = 0;
  }
  outbox_log_bytes_ += clean.size();
  outbox_logs_.back().lines.push_back(std::move(clean));
  ++outbox_log_lines_;
}

std::string Agent::Tag(const DeployRecord& r, const char* what) const {
  return "gen" + std::to_string(r.generation()) + "-" + what;
}

void Agent::WorkerLoop() {
  for (;;) {
    try {
      if (!WorkOnce()) return;
    } catch (const std::exception& e) {
      // RunStep turns a failing step into a failed outcome; this is for what
      // is left (persisting, reporting). Never end the thread or the process:
      // log, pause so as not to spin, and carry on from the persisted state.
      spdlog::error("deploy worker: {}; retrying in 1 s", e.what());
      std::unique_lock lock(mu_);
      cv_.wait_for(lock, std::chrono::seconds(1), [&] { return stopping_; });
    }
  }
}

bool Agent::WorkOnce() {
  DeployRecord* r = nullptr;
  {
    std::unique_lock lock(mu_);
    cv_.wait(lock, [&] {
      return stopping_ || pending_ || queued_preview_ ||
             (state_.current && !IsTerminal(state_.current->phase));
    });
    if (stopping_) return false;
    if (queued_preview_ && !(state_.current && !IsTerminal(state_.current->phase))) {
      // Between deploys: a preview first (it changes nothing), then what is pending.
      lock.unlock();
      RunQueuedPreview();
      return true;
    }
    if (!(state_.current && !IsTerminal(state_.current->phase))) {
      state_.current = std::move(*pending_);
      pending_.reset();
      state_.pending.reset();
      state_.current->kind = state_.current->manifest.kind != Kind::kAuto
                                 ? state_.current->manifest.kind
                                 : Kind::kAuto;  // detected after realise
      state_.current->previous_toplevel = ops_->ActiveToplevel();
      Persist();
      r = &*state_.current;
      lock.unlock();
      Report(*r);
    } else {
      r = &*state_.current;
    }
  }
  if (resume_activation_) {
    resume_activation_ = false;
    ResumeActivation(*r);
    return true;
  }
  Step step = NextStep(*r);
  if (step == Step::kNone) return true;
  RunStep(*r, step);
  DiscardPreviousVarsIfFinal(*r);
  if (IsTerminal(r->phase) && r->reboot_required && cfg_.reboot_policy == "when-required" &&
      r->phase == Phase::kSucceeded) {
    Log(r->generation(), "agent", "reboot required and rebootPolicy is when-required: rebooting");
    if (auto st = ops_->Reboot(); !st) spdlog::error("reboot failed: {}", st.message());
  }
  return true;
}

void Agent::ResumeActivation(DeployRecord& r) {
  std::string detail;
  auto ev = ops_->ActivationResult(Tag(r, "activate"), &detail);
  if (ev == ActivationEvidence::kRunning) return;  // stopping; the next agent waits for it
  const bool reboot =
      ev == ActivationEvidence::kSucceeded && ops_->RebootRequired(r.manifest.toplevel);
  {
    std::lock_guard lock(mu_);
    Resume(r, ev, ops_->ActiveToplevel(), detail, clock_(), policy_);
    if (r.phase == Phase::kConfirming || r.phase == Phase::kSucceeded) {
      r.reboot_required = reboot;
      if (reboot) r.detail += "; reboot required (kernel, initrd or modules changed)";
      r.activated_boot_id = BootId();
    }
    if (IsTerminal(r.phase)) ++outcomes_[std::string(ToString(r.phase))];
    Persist();
  }
  Report(r);
}

void Agent::NoteBootedInto(DeployRecord& r) {
  if (r.phase != Phase::kSucceeded || !r.reboot_required || r.activated_boot_id.empty()) return;
  const std::string boot = BootId();
  if (boot.empty() || boot == r.activated_boot_id) return;
  if (ops_->RebootRequired(r.manifest.toplevel)) return;  // booted something else
  r.reboot_required = false;
  r.detail = "booted into generation " + std::to_string(r.generation()) + " (boot " + boot +
             "; activated in boot " + r.activated_boot_id + ")";
  r.activated_boot_id = boot;
  Persist();
}

void Agent::RunStep(DeployRecord& r, Step step) {
  {
    std::lock_guard lock(mu_);
    if (stopping_) return;  // start nothing new; the next agent resumes from the record
  }
  Phase before = PhaseBefore(step, r.phase);
  if (before != r.phase) {
    {
      std::lock_guard lock(mu_);
      r.phase = before;
      if (step == Step::kRealise) r.detail = "realising " + r.manifest.toplevel;
      if (step == Step::kActivate)
        r.detail = std::string(ToString(r.manifest.action)) + " " + r.manifest.toplevel;
      Persist();
    }
    Report(r);
  }
  if (step == Step::kInstallVars && !r.vars_started) {
    std::lock_guard lock(mu_);
    r.vars_started = true;  // from here a rollback must consider the vars
    Persist();
  }
  // State is persisted before each step: a step that changes the system must
  // not start from a record that is not on disk (a restarted agent would not
  // know what it did). Rolling back is always allowed.
  if (step == Step::kInstallVars || step == Step::kSetProfile || step == Step::kActivate) {
    bool abandoned = false;
    {
      std::lock_guard lock(mu_);
      if (!persist_error_.empty()) {
        Abandon(r,
                "stopped before " + std::string(ToString(step)) +
                    ": the agent state cannot be saved (" + persist_error_ + "); free space in " +
                    cfg_.state_dir + " or make it writable",
                clock_());
        Persist();
        abandoned = true;
      }
    }
    if (abandoned) {
      Report(r);
      return;
    }
  }
  StepOutcome o;
  try {
    o = Perform(r, step);
  } catch (const std::exception& e) {
    o = StepOutcome{};
    o.detail = std::string(ToString(step)) + " failed with an internal error: " + e.what() +
               "; see the agent's log";
  }
  if (o.interrupted) return;  // stopping: the record stays as persisted, for the next agent
  o.detail = CutUtf8(o.detail, kMaxDetailBytes);  // from program output, paths, files
  {
    std::lock_guard lock(mu_);
    // Only an ack for a message sent from now on proves the controller is
    // reachable after this activation.
    if (step == Step::kActivate) {
      confirm_floor_ = next_seq_ - 1;
      confirm_connections_ = connections_;
    }
    Apply(r, step, o, clock_(), policy_);
    if (step == Step::kActivate && o.ok) r.activated_boot_id = BootId();
    if (IsTerminal(r.phase)) ++outcomes_[std::string(ToString(r.phase))];
    Persist();
  }
  Report(r);
}

void Agent::SetKind(DeployRecord& r, Kind kind) {
  std::lock_guard lock(mu_);  // r lives in state_, which the I/O thread saves under mu_
  r.kind = kind;
}

StepOutcome Agent::Perform(DeployRecord& r, Step step) {
  const std::int64_t gen = r.generation();
  LineSink sink = [this, gen](const std::string& stream, const std::string& line) {
    Log(gen, stream, line);
  };
  StepOutcome o;
  switch (step) {
    case Step::kNone:
      return o;
    case Step::kCheckUnchanged: {
      std::string active = ops_->ActiveToplevel();
      auto installed = ReadFile(cfg_.vars_dir + "/.muster-vars-hash", 4096);
      bool vars_same =
          r.manifest.vars_hash.empty() || (installed && *installed == r.manifest.vars_hash + "\n");
      if (active == r.manifest.toplevel && vars_same && !r.manifest.force &&
          r.manifest.action != Action::kDryActivate) {
        o.ok = o.unchanged = true;
        o.detail = r.manifest.toplevel +
                   " is already active; nothing to do (publish with --force to re-activate)";
      } else {
        o.ok = true;
        o.detail = "realising " + r.manifest.toplevel;
      }
      return o;
    }
    case Step::kRealise: {
      // "muster:" in the signed manifest: the controller's cache, served on
      // loopback for this realise only.
      Manifest m = r.manifest;
      bool via_controller = UsesControllerCache(m) && substituter_;
      std::string url;
      if (via_controller) {
        auto opened = substituter_->Open();
        if (!opened) {
          o.detail = opened.message();
          return o;
        }
        url = *opened;
        m = WithControllerCache(std::move(m), url);
      }
      auto size = ops_->Realise(m, sink);
      if (via_controller) substituter_->Close();
      if (!size) {
        o.detail = size.message();
        for (auto at = o.detail.find(url); via_controller && at != std::string::npos;
             at = o.detail.find(url)) {
          o.detail.replace(at, url.size(), "the controller's cache (muster:)");
        }
        return o;
      }
      o.ok = true;
      o.closure_bytes = *size;
      if (r.manifest.kind == Kind::kAuto) SetKind(r, ops_->DetectKind(r.manifest.toplevel));
      o.detail = "realised " + r.manifest.toplevel + " (closure " + HumanBytes(*size) + ", " +
                 std::string(ToString(r.kind)) + ")";
      return o;
    }
    case Step::kAwaitWindow:
      return AwaitWindow(r);
    case Step::kInstallVars: {
      auto res = InstallVars(key_, r.vars, r.manifest.vars_hash, cfg_.vars_dir);
      if (!res) {
        o.detail = "installing vars into " + cfg_.vars_dir + " failed: " + res.message();
        return o;
      }
      o.ok = true;
      o.unchanged = !res->changed;
      o.detail = std::to_string(res->files) + " vars files " +
                 (res->changed ? "installed in " : "already in ") + cfg_.vars_dir;
      return o;
    }
    case Step::kSetProfile: {
      auto st = ops_->SetProfile(r.manifest.toplevel, sink);
      o.ok = st.ok();
      o.detail = st ? "profile " + cfg_.profile + " → " + r.manifest.toplevel : st.message();
      return o;
    }
    case Step::kActivate: {
      if (r.kind == Kind::kAuto) SetKind(r, ops_->DetectKind(r.manifest.toplevel));
      auto a =
          ops_->Activate(r.kind, r.manifest.toplevel, r.manifest.action, Tag(r, "activate"), sink);
      if (a.left_running) {
        o.interrupted = true;
        return o;
      }
      o.ok = a.status.ok();
      if (!a.status) {
        o.detail = "activation failed: " + a.status.message();
        return o;
      }
      o.reboot_required = ops_->RebootRequired(r.manifest.toplevel);
      o.detail = std::string(ToString(r.manifest.action)) + " of " + r.manifest.toplevel + " done" +
                 (o.reboot_required ? "; reboot required (kernel, initrd or modules changed)" : "");
      return o;
    }
    case Step::kConfirm:
      return Confirm(r);
    case Step::kRollback:
      return Rollback(r);
  }
  return o;
}

StepOutcome Agent::AwaitWindow(DeployRecord& r) {
  const std::string zone = cfg_.maintenance_time_zone;
  for (;;) {
    const std::int64_t now_ms = clock_();
    const WindowState w = EvaluateWindows(cfg_.maintenance_windows, now_ms / 1000);
    if (w.open) {
      StepOutcome o{true, cfg_.maintenance_windows.empty()
                              ? std::string("no maintenance windows configured: activating now")
                              : "maintenance window open until " + LocalTimeText(w.closes_at_s) +
                                    ": activating"};
      return o;
    }
    if (r.phase != Phase::kStaged || r.detail.find("staged:") != 0) {
      {
        std::lock_guard lock(mu_);
        r.phase = Phase::kStaged;
        r.detail = "staged: " + r.manifest.toplevel + " is realised; it activates in the next " +
                   "maintenance window at " + LocalTimeText(w.next_open_s) + " (" +
                   DescribeWindows(cfg_.maintenance_windows, zone) +
                   "); publish with --now to activate at once";
        Persist();
      }
      Report(r);
    }
    // Sleep until the window opens (at most a minute, so that a clock step
    // or a daylight-saving change is noticed), a newer generation arrives or
    // the agent stops.
    const std::int64_t wait_ms = std::clamp<std::int64_t>(
        w.next_open_s == 0 ? 60000 : w.next_open_s * 1000 - now_ms, 10, 60000);
    std::unique_lock lock(mu_);
    cv_.wait_for(lock, std::chrono::milliseconds(wait_ms),
                 [&] { return stopping_ || pending_.has_value() || queued_preview_.has_value(); });
    if (stopping_) {
      StepOutcome o{false, "agent stopping"};
      o.interrupted = true;  // staged stays persisted; the next agent waits on
      return o;
    }
    if (pending_) {
      return {false, "superseded by generation " + std::to_string(pending_->generation()) +
                         " while staged for a maintenance window; nothing was changed"};
    }
    if (queued_preview_) {
      lock.unlock();
      RunQueuedPreview();  // a staged machine can still preview the next generation
    }
  }
}

StepOutcome Agent::Confirm(DeployRecord& r) {
  // A fresh exchange with the controller: an ack for a report sent after
  // activation (the confirming report queued by RunStep, or any later one).
  std::uint64_t floor, sessions;
  {
    std::lock_guard lock(mu_);
    floor = confirm_floor_;
    sessions = confirm_connections_;
  }
  HealthReport health{false, "health checks not run yet"};
  for (;;) {
    bool controller_ok;
    {
      std::unique_lock lock(mu_);
      controller_ok = acked_seq_ > floor || connections_ > sessions;
      if (stopping_) {
        StepOutcome o{false, "agent stopping"};
        o.interrupted = true;  // the next agent confirms (its window restarts)
        return o;
      }
    }
    if (!health.ok) health = RunHealthChecks(cfg_.health_checks, runner_);
    if (!health.ok) Log(r.generation(), "health", health.detail);
    std::string why;
    auto verdict = JudgeConfirm(r, controller_ok, health.ok, clock_(), &why);
    if (verdict == ConfirmVerdict::kSucceeded) {
      std::string d = "confirmed: controller reached after activation";
      if (!health.detail.empty()) d += "; " + health.detail;
      if (r.reboot_required) d += "; reboot required";
      return {true, d};
    }
    if (verdict == ConfirmVerdict::kRollBack) {
      if (!health.ok) why += " (" + health.detail + ")";
      return {false, why};
    }
    std::unique_lock lock(mu_);
    cv_.wait_for(lock, std::chrono::milliseconds(500),
                 [&] { return stopping_ || acked_seq_ > floor || connections_ > sessions; });
  }
}

StepOutcome Agent::Rollback(DeployRecord& r) {
  const std::int64_t gen = r.generation();
  LineSink sink = [this, gen](const std::string&, const std::string& line) {
    Log(gen, "rollback", line);
  };
  std::vector<std::string> done;
  if (r.vars_changed) {
    if (auto st = RestoreVars(cfg_.vars_dir); !st)
      return {false, "restoring vars: " + st.message()};
    done.push_back("vars restored");
  }
  const std::string& prev = r.previous_toplevel;
  if (r.profile_changed || r.activation_started) {
    if (prev.empty()) {
      return {false, "nothing to roll back to: no system was active before this deploy"};
    }
  }
  if (r.profile_changed) {
    if (auto st = ops_->SetProfile(prev, sink); !st) return {false, st.message()};
    done.push_back("profile reset");
  }
  if (r.activation_started && r.manifest.action != Action::kDryActivate &&
      r.manifest.action != Action::kBoot) {
    Kind k = ops_->DetectKind(prev);
    Action a = r.profile_changed ? Action::kSwitch : Action::kTest;
    auto act = ops_->Activate(k, prev, a, Tag(r, "rollback"), sink);
    if (act.left_running) {
      StepOutcome o{false, "agent stopping during the rollback"};
      o.interrupted = true;  // the next agent waits for it (same tag) and finishes
      return o;
    }
    if (!act.status) return {false, "re-activating " + prev + ": " + act.status.message()};
    done.push_back("re-activated " + prev);
  }
  std::string d;
  for (const auto& s : done) d += (d.empty() ? "" : ", ") + s;
  return {true, d};
}

}  // namespace muster
