#include "controller/fleet.h"

#include <spdlog/spdlog.h>

#include <algorithm>

#include "common/json_limits.h"
#include "common/parallel.h"
#include "common/phase.h"
#include "common/preview.h"
#include "common/utf8.h"

namespace muster {

using nlohmann::json;

namespace {
// An agent's host facts made fit to store: well-formed UTF-8, each bounded.
json CleanFacts(const proto::HostFacts& f) {
  proto::HostFacts c;
  c.system = CutUtf8(f.system, Fleet::kMaxFactBytes);
  c.os = CutUtf8(f.os, Fleet::kMaxFactBytes);
  c.os_version = CutUtf8(f.os_version, Fleet::kMaxFactBytes);
  c.hostname = CutUtf8(f.hostname, Fleet::kMaxFactBytes);
  c.kernel = CutUtf8(f.kernel, Fleet::kMaxFactBytes);
  return proto::ToJson(c);
}
}  // namespace

Fleet::Fleet(Store& store, Clock clock) : store_(store), clock_(std::move(clock)) {}

void DurationHistogram::Observe(double seconds) {
  for (std::size_t i = 0; i < std::size(kBounds); ++i) {
    if (seconds <= kBounds[i]) ++buckets[i];
  }
  ++count;
  sum += seconds;
}

void LagHistogram::Observe(double seconds) {
  for (std::size_t i = 0; i < std::size(kBounds); ++i) {
    if (seconds <= kBounds[i]) ++buckets[i];
  }
  ++count;
  sum += seconds;
}

std::vector<std::shared_ptr<AgentChannel>> Fleet::ApplyMachinesLocked(
    const std::vector<MachineRecord>& machines) {
  std::set<std::string> allowed;
  for (auto it = keys_.begin(); it != keys_.end();) {
    it = it->second.role == Role::kMachine ? keys_.erase(it) : std::next(it);
  }
  revoked_.clear();
  revoked_keys_.clear();
  for (const auto& m : machines) {
    if (m.revoked) {
      revoked_.insert(m.name);
      revoked_keys_.insert(m.key);
    } else {
      keys_[m.key] = {Role::kMachine, m.name};
      allowed.insert(m.name);
    }
  }
  std::vector<std::shared_ptr<AgentChannel>> close;
  for (auto it = online_.begin(); it != online_.end();) {
    if (allowed.count(it->first)) {
      ++it;
      continue;
    }
    if (auto ch = it->second.lock()) close.push_back(std::move(ch));
    it = online_.erase(it);
  }
  return close;
}

Status Fleet::Load() {
  auto machines = store_.ListMachines();
  {
    std::lock_guard lock(mu_);
    keys_.clear();
    (void)ApplyMachinesLocked(machines);
  }
  Refresh();
  return Status::Ok();
}

void Fleet::ReloadRegistry() {
  const std::uint64_t failures = store_.Failures();
  auto machines = store_.ListMachines();
  if (store_.Failures() != failures) return;  // not answered: keep what is known
  std::vector<std::shared_ptr<AgentChannel>> close;
  {
    std::lock_guard lock(mu_);
    close = ApplyMachinesLocked(machines);
  }
  for (auto& ch : close) ch->Close("machine was removed or revoked (at another controller)");
}

std::vector<std::string> Fleet::LocalMachines() const {
  std::lock_guard lock(mu_);
  std::vector<std::string> out;
  for (const auto& [name, ch] : online_) {
    if (!ch.expired()) out.push_back(name);
  }
  return out;
}

void Fleet::SetClustered(bool on) {
  std::lock_guard lock(mu_);
  counters_.clustered = on;
}

void Fleet::ObserveNotificationLag(double seconds) {
  std::lock_guard lock(mu_);
  counters_.notification_lag.Observe(seconds);
}

void Fleet::SetRemotePresence(std::map<std::string, std::string> remote) {
  std::vector<std::string> came, went;
  {
    std::lock_guard lock(mu_);
    for (auto it = remote.begin(); it != remote.end();) {
      // A machine connected here is here, whatever an older row says.
      auto local = online_.find(it->first);
      if (local != online_.end() && !local->second.expired()) {
        it = remote.erase(it);
        continue;
      }
      if (!remote_online_.count(it->first)) came.push_back(it->first);
      ++it;
    }
    for (const auto& [m, c] : remote_online_) {
      if (!remote.count(m)) went.push_back(m);
    }
    remote_online_ = std::move(remote);
  }
  for (const auto& m : went) Broadcast("machine", {{"machine", m}, {"online", false}}, true);
  for (const auto& m : came) {
    Broadcast("machine", {{"machine", m}, {"online", true}}, true);
    if (observer_) observer_->OnOnline(m);
  }
}

void Fleet::RemotePresence(const std::string& machine, const std::string& controller, bool online) {
  bool came = false, went = false;
  {
    std::lock_guard lock(mu_);
    auto local = online_.find(machine);
    bool here = local != online_.end() && !local->second.expired();
    auto it = remote_online_.find(machine);
    if (online) {
      if (here) return;  // an older row: the agent is connected here now
      came = it == remote_online_.end();
      remote_online_[machine] = controller;
    } else if (it != remote_online_.end() && it->second == controller) {
      remote_online_.erase(it);
      went = !here;
    }
  }
  if (came || went) Broadcast("machine", {{"machine", machine}, {"online", came}}, true);
  if (came && observer_) observer_->OnOnline(machine);
}

void Fleet::RemoteDeploy(const std::string& machine, std::int64_t generation) {
  if (auto g = store_.GetGeneration(machine, generation)) RemoteDeploy(*g);
}

void Fleet::RemoteDeploy(const GenerationRecord& rec) {
  if (!rec.released) return;
  const GenerationRecord* g = &rec;
  const std::string& machine = rec.machine;
  const std::int64_t generation = rec.generation;
  std::shared_ptr<AgentChannel> ch;
  {
    std::lock_guard lock(mu_);
    auto it = online_.find(machine);
    if (it != online_.end()) ch = it->second.lock();
    if (ch) NoteSentLocked(*g);
  }
  if (ch) ch->Send(DeployText(*g));
  if (g->rollout.empty()) {
    if (observer_) observer_->OnDirectPublish(machine, generation);
    Broadcast("publish",
              {{"machine", g->machine},
               {"generation", g->generation},
               {"toplevel", g->toplevel},
               {"by", g->published_by},
               {"online", IsOnline(machine)}},
              true);
  }
}

void Fleet::RemoteStatuses(const std::vector<EventRecord>& events,
                           const std::vector<bool>& reboot_required) {
  std::vector<StatusNote> notes;
  notes.reserve(events.size());
  for (std::size_t i = 0; i < events.size(); ++i) {
    const auto& ev = events[i];
    Broadcast("status",
              {{"machine", ev.machine},
               {"generation", ev.generation},
               {"phase", ev.phase},
               {"detail", ev.detail},
               {"rebootRequired", i < reboot_required.size() && reboot_required[i]},
               {"at", ev.at}},
              true);
    notes.push_back({ev.machine, ev.generation, ev.phase, ev.detail});
  }
  if (observer_ && !notes.empty()) observer_->OnStatuses(notes);
}

void Fleet::RemoteLogs(const std::string& machine, std::int64_t generation,
                       const std::string& stream, const std::vector<std::string>& lines) {
  Broadcast(
      "log",
      {{"machine", machine}, {"generation", generation}, {"stream", stream}, {"lines", lines}},
      true);
}

std::vector<std::shared_ptr<AgentChannel>> Fleet::DropOperatorLocked(const std::string& name) {
  std::vector<std::shared_ptr<AgentChannel>> out;
  auto it = operators_.find(name);
  if (it != operators_.end()) {
    keys_.erase(it->second);
    operators_.erase(it);
  }
  auto [b, e] = operator_sessions_.equal_range(name);
  for (auto s = b; s != e; ++s) {
    if (auto ch = s->second.lock()) out.push_back(std::move(ch));
  }
  operator_sessions_.erase(b, e);
  return out;
}

Status Fleet::RemoveOperator(const std::string& name) {
  {
    std::lock_guard lock(mu_);
    if (!operators_.count(name)) return Err("no operator named '" + name + "'");
    if (operators_.size() == 1) {
      return Err("'" + name +
                 "' is the last operator; add another first ('muster-controller operator add')");
    }
  }
  if (auto st = store_.RemoveOperator(name); !st) return st;
  std::vector<std::shared_ptr<AgentChannel>> sessions;
  {
    std::lock_guard lock(mu_);
    sessions = DropOperatorLocked(name);
  }
  for (auto& ch : sessions) ch->Close("operator '" + name + "' was removed");
  {
    std::lock_guard lock(mu_);
    ++operators_changed_;
  }
  spdlog::warn("operator {} removed; {} open session(s) closed", name, sessions.size());
  Broadcast("operator", {{"operator", name}, {"removed", true}});
  return Status::Ok();
}

void Fleet::OperatorConnected(const std::string& name, std::shared_ptr<AgentChannel> session) {
  std::lock_guard lock(mu_);
  // Forget sessions that ended, so the map does not grow with reconnects.
  for (auto it = operator_sessions_.begin(); it != operator_sessions_.end();) {
    it = it->second.expired() ? operator_sessions_.erase(it) : std::next(it);
  }
  operator_sessions_.emplace(name, session);
}

bool Fleet::IsOperator(const std::string& name) const {
  std::lock_guard lock(mu_);
  return operators_.count(name) != 0;
}

void Fleet::RetryUnstored() {
  std::lock_guard retry(retry_mu_);
  std::vector<StatusWrite> batch;
  {
    std::lock_guard lock(mu_);
    if (unstored_.empty()) return;
    batch.swap(unstored_);
  }
  std::vector<Status> stored = store_.RecordStatuses(batch);
  std::vector<StatusWrite> again;
  std::vector<StatusNote> notes;
  for (std::size_t i = 0; i < batch.size(); ++i) {
    if (i < stored.size() && stored[i]) {
      const auto& ev = batch[i].ev;
      notes.push_back({ev.machine, ev.generation, ev.phase, ev.detail});
    } else {
      again.push_back(std::move(batch[i]));
    }
  }
  if (!again.empty()) {
    std::lock_guard lock(mu_);
    // Older ones first, then any that failed meanwhile.
    again.insert(again.end(), std::make_move_iterator(unstored_.begin()),
                 std::make_move_iterator(unstored_.end()));
    if (again.size() > kMaxUnstored) {
      again.erase(again.begin(),
                  again.begin() + static_cast<std::ptrdiff_t>(again.size() - kMaxUnstored));
    }
    unstored_.swap(again);
  }
  if (!notes.empty()) {
    spdlog::info("{} status report(s) stored after the store failed them earlier", notes.size());
    if (observer_) observer_->OnStatuses(notes);
  }
}

std::size_t Fleet::UnstoredCount() const {
  std::lock_guard lock(mu_);
  return unstored_.size();
}

void Fleet::Refresh() {
  RetryUnstored();
  RecordOverdueHelloFinals();
  std::uint64_t version;
  {
    std::lock_guard lock(mu_);
    version = operators_changed_;
  }
  std::map<std::string, std::string> stored;
  // A store that did not answer (a database down) lists nothing: that must not
  // remove every operator, so such a refresh changes nothing.
  const std::uint64_t failures = store_.Failures();
  for (const auto& o : store_.ListOperators()) stored[o.name] = o.key;
  int live = store_.LiveEnrollTokens(clock_());
  if (store_.Failures() != failures) return;
  std::vector<std::string> gone;
  std::vector<std::shared_ptr<AgentChannel>> sessions;
  {
    std::lock_guard lock(mu_);
    live_tokens_ = live;
    // An operator added or removed here meanwhile may be missing from this
    // read: keep the cache as it is until the next refresh.
    if (version != operators_changed_) return;
    for (const auto& [name, key] : operators_) {
      auto it = stored.find(name);
      if (it == stored.end() || it->second != key) gone.push_back(name);
    }
    for (const auto& name : gone) {
      auto s = DropOperatorLocked(name);
      sessions.insert(sessions.end(), s.begin(), s.end());
    }
    for (const auto& [name, key] : stored) {
      if (operators_.count(name)) continue;
      operators_[name] = key;
      keys_[key] = {Role::kOperator, name};
    }
  }
  for (const auto& name : gone) spdlog::warn("operator {} was removed from the store", name);
  for (auto& ch : sessions) ch->Close("operator was removed");
}

Identity Fleet::Lookup(const PublicKey& key) const {
  std::string text = key.ToText();
  std::lock_guard lock(mu_);
  auto it = keys_.find(text);
  if (it != keys_.end()) return it->second;
  // A revoked key stays refused while tokens are live: it must not get a
  // session (nor enrol under another name) again.
  if (revoked_keys_.count(text)) return {};
  return live_tokens_ > 0 ? Identity{Role::kEnrollee, ""} : Identity{};
}

namespace {

// Writes the deploy message for a record as proto::Encode would (sorted keys,
// no whitespace), each string escaped on its own: no document of the whole
// message is built. Out appends raw text and quoted strings, or counts them.
template <class Out>
void WriteDeploy(const GenerationRecord& g, Out& out) {
  out.Raw(R"({"body":{"manifest":)");
  out.Quoted(g.manifest.manifest);
  out.Raw(R"(,"signature":)");
  out.Quoted(g.manifest.signature);
  out.Raw(R"(,"signer":)");
  out.Quoted(g.manifest.signer);
  out.Raw(R"(,"vars":)");
  out.Quoted(g.vars);
  out.Raw(R"(},"type":"deploy","v":)");
  out.Raw(std::to_string(proto::kVersion));
  out.Raw("}");
}

bool Plain(const std::string& s) {
  // Base64 (vars, signature, key) needs no escaping: copied as it is.
  return std::all_of(s.begin(), s.end(), [](char c) {
    auto u = static_cast<unsigned char>(c);
    return u >= 0x20 && u < 0x80 && c != '"' && c != '\\';
  });
}

struct DeployAppender {
  std::string& text;
  void Raw(std::string_view s) { text += s; }
  void Quoted(const std::string& s) {
    if (Plain(s)) {
      text += '"';
      text += s;
      text += '"';
    } else {
      text += DumpJson(json(s));
    }
  }
};

struct DeployCounter {
  std::size_t size = 0;
  void Raw(std::string_view s) { size += s.size(); }
  // The length DumpJson gives s, without writing it for ASCII (a manifest).
  void Quoted(const std::string& s) {
    std::size_t n = 2;
    for (char c : s) {
      auto u = static_cast<unsigned char>(c);
      if (u >= 0x80) {  // UTF-8, valid or replaced: the serialiser decides
        size += DumpJson(json(s)).size();
        return;
      }
      if (c == '"' || c == '\\') {
        n += 2;
      } else if (u < 0x20) {
        bool short_escape = c == '\b' || c == '\f' || c == '\n' || c == '\r' || c == '\t';
        n += short_escape ? 2 : 6;
      } else {
        n += 1;
      }
    }
    size += n;
  }
};

}  // namespace

std::string Fleet::DeployText(const GenerationRecord& g) {
  std::string out;
  out.reserve(96 + g.manifest.manifest.size() * 5 / 4 + g.manifest.signer.size() +
              g.manifest.signature.size() + g.vars.size());
  DeployAppender a{out};
  WriteDeploy(g, a);
  return out;
}

std::size_t Fleet::DeployTextSize(const GenerationRecord& g) {
  DeployCounter c;
  WriteDeploy(g, c);
  return c.size;
}

Result<std::vector<std::string>> Fleet::AgentHello(const std::string& machine,
                                                   const proto::Hello& hello,
                                                   std::shared_ptr<AgentChannel> channel) {
  return std::move(AgentHellos({{machine, hello, std::move(channel)}}).front());
}

std::vector<Result<std::vector<std::string>>> Fleet::AgentHellos(
    const std::vector<HelloRequest>& hellos) {
  std::vector<std::optional<Error>> refused(hellos.size());
  std::vector<HelloWrite> writes;
  for (std::size_t k = 0; k < hellos.size(); ++k) {
    const auto& [machine, hello, channel] = hellos[k];
    if (hello.machine != machine) {
      refused[k] = Err("hello names machine '" + CutUtf8(hello.machine, 253) +
                       "' but this key is registered as '" + machine + "'");
      continue;
    }
    std::shared_ptr<AgentChannel> previous;
    {
      std::lock_guard lock(mu_);
      auto& slot = online_[machine];
      previous = slot.lock();
      slot = channel;
      remote_online_.erase(machine);  // it moved here
    }
    if (previous && previous != channel) previous->Close("replaced by a newer connection");
    bool revoked;
    {
      std::lock_guard lock(mu_);
      revoked = revoked_.count(machine) != 0;  // revoked between TLS and hello
    }
    if (revoked) {
      refused[k] = Err("machine '" + machine + "' is revoked");
      continue;
    }
    writes.push_back({machine, clock_(), CleanFacts(hello.facts), hello.last_applied});
  }
  std::vector<Status> stored = writes.empty() ? std::vector<Status>() : store_.RecordHellos(writes);
  std::vector<Result<std::vector<std::string>>> out;
  out.reserve(hellos.size());
  std::vector<PendingFinal> finals;
  for (std::size_t k = 0, w = 0; k < hellos.size(); ++k) {
    if (refused[k]) {
      out.emplace_back(Err(refused[k]->message));
      continue;
    }
    if (!stored[w]) spdlog::error("{}: {}", hellos[k].machine, stored[w].message());
    ++w;
    if (MissedFinalReport(hellos[k].machine, hellos[k].hello)) {
      finals.push_back({hellos[k].machine, hellos[k].hello, clock_() + kHelloFinalGraceMs});
    }
    out.push_back(AfterHello(hellos[k].machine, hellos[k].hello));
  }
  if (!finals.empty()) {
    std::lock_guard lock(mu_);
    for (auto& f : finals) {
      if (pending_finals_.size() >= kMaxUnstored) pending_finals_.erase(pending_finals_.begin());
      pending_finals_.push_back(std::move(f));
    }
  }
  return out;
}

void Fleet::RecordOverdueHelloFinals() {
  std::vector<PendingFinal> due;
  {
    std::lock_guard lock(mu_);
    const std::int64_t now = clock_();
    auto first_later =
        std::stable_partition(pending_finals_.begin(), pending_finals_.end(),
                              [&](const PendingFinal& f) { return f.due_ms <= now; });
    due.assign(std::make_move_iterator(pending_finals_.begin()),
               std::make_move_iterator(first_later));
    pending_finals_.erase(pending_finals_.begin(), first_later);
  }
  // Final phases the store still has not heard of (the agent's report was
  // lost with a controller that died before storing it): recorded now, as
  // reports, so that rollouts waiting for them go on. Nothing is acked: seq 0.
  std::vector<std::pair<std::string, proto::StatusReport>> missed;
  for (const auto& f : due) {
    if (auto r = MissedFinalReport(f.machine, f.hello))
      missed.emplace_back(f.machine, std::move(*r));
  }
  for (const auto& [machine, r] : missed) {
    spdlog::info("{} generation {}: {} (from its hello)", machine, r.generation,
                 ForLog(r.phase, 32));
  }
  if (!missed.empty()) (void)AgentStatuses(missed);
}

std::optional<proto::StatusReport> Fleet::MissedFinalReport(const std::string& machine,
                                                            const proto::Hello& hello) {
  auto ph = ParsePhase(hello.phase);
  if (hello.generation <= 0 || !ph || !IsTerminal(*ph)) return std::nullopt;
  auto m = store_.GetMachine(machine);
  if (!m || hello.generation < m->generation) return std::nullopt;
  if (hello.generation == m->generation && m->phase == hello.phase) return std::nullopt;
  if (!store_.GetGeneration(machine, hello.generation)) return std::nullopt;
  proto::StatusReport r;
  r.generation = hello.generation;
  r.phase = hello.phase;
  r.toplevel = hello.toplevel;
  r.detail = "reported when the agent reconnected (its earlier report was not stored)";
  return r;
}

std::vector<std::string> Fleet::AfterHello(const std::string& machine, const proto::Hello& hello) {
  std::vector<std::string> out;
  out.push_back(proto::Encode(proto::Welcome{machine, clock_()}));
  auto latest = store_.LatestGeneration(machine);
  if (latest && latest->generation > hello.last_applied) {
    auto ph = ParsePhase(hello.phase);
    bool finished_here = hello.generation == latest->generation && ph && IsTerminal(*ph);
    bool in_progress =
        hello.generation == latest->generation && ph && !IsTerminal(*ph) && *ph != Phase::kIdle;
    if (!finished_here && !in_progress) {
      out.push_back(DeployText(*latest));
      std::lock_guard lock(mu_);
      NoteSentLocked(*latest);
    }
  }
  Broadcast("machine", {{"machine", machine}, {"online", true}});
  if (observer_) observer_->OnOnline(machine);
  return out;
}

Result<std::string> Fleet::AgentStatus(const std::string& machine, const proto::StatusReport& r) {
  return std::move(AgentStatuses({{machine, r}}).front());
}

std::vector<Result<std::string>> Fleet::AgentStatuses(
    const std::vector<std::pair<std::string, proto::StatusReport>>& reports) {
  std::vector<StatusWrite> writes;
  writes.reserve(reports.size());
  for (const auto& [machine, r] : reports) {
    if (!ParsePhase(r.phase)) continue;
    StatusWrite w;
    w.name = machine;
    w.ev.machine = machine;
    w.ev.generation = r.generation;
    w.ev.phase = r.phase;
    w.ev.detail = CutUtf8(r.detail, kMaxDetailBytes);
    w.ev.at = clock_();
    w.toplevel = CutUtf8(r.toplevel, kMaxPathBytes);
    w.reboot_required = r.reboot_required;
    w.facts = r.facts ? CleanFacts(*r.facts) : json(nullptr);
    writes.push_back(std::move(w));
  }
  bool behind;
  std::shared_ptr<const StatusOutbox> outbox;
  {
    std::lock_guard lock(mu_);
    behind = !unstored_.empty();
    outbox = outbox_;
  }
  if (outbox) {
    for (auto& w : writes) (*outbox)(w);
  }
  if (behind) RetryUnstored();  // older reports first: a later one must not be overwritten
  {
    std::lock_guard lock(mu_);
    behind = !unstored_.empty();
  }
  // Still behind: these wait in line too, rather than be overwritten later.
  std::vector<Status> stored =
      writes.empty() ? std::vector<Status>()
      : behind       ? std::vector<Status>(writes.size(),
                                     Err("queued behind reports the store failed to write"))
                     : store_.RecordStatuses(writes);
  {
    std::lock_guard lock(mu_);
    for (std::size_t i = 0; i < stored.size(); ++i) {
      if (!stored[i]) unstored_.push_back(writes[i]);
    }
    if (unstored_.size() > kMaxUnstored) {
      unstored_.erase(unstored_.begin(), unstored_.begin() + static_cast<std::ptrdiff_t>(
                                                                 unstored_.size() - kMaxUnstored));
    }
  }
  std::vector<Result<std::string>> out;
  out.reserve(reports.size());
  std::vector<StatusNote> notes;
  std::size_t k = 0;
  for (const auto& [machine, r] : reports) {
    auto ph = ParsePhase(r.phase);
    if (!ph) {
      out.push_back(Err("status report has unknown phase '" + CutUtf8(r.phase, 40) + "'"));
      continue;
    }
    const EventRecord& ev = writes[k].ev;
    if (!stored[k]) spdlog::error("{}: {}", machine, stored[k].message());
    ++k;
    out.push_back(AfterStatus(machine, r, *ph, ev));
    notes.push_back({machine, r.generation, r.phase, ev.detail});
  }
  // After the status events, so that watchers see the phases before their
  // effect; one call for the batch, so that a wave's reports cost one commit.
  if (observer_ && !notes.empty()) observer_->OnStatuses(notes);
  return out;
}

Result<std::string> Fleet::AfterStatus(const std::string& machine, const proto::StatusReport& r,
                                       Phase phase, const EventRecord& ev) {
  {
    std::lock_guard lock(mu_);
    ++counters_.status_reports;
  }
  if (IsTerminal(phase)) {
    // The time since publishing, from what this controller sent (a map
    // lookup per final report), else from the store.
    std::optional<std::int64_t> created_at;
    {
      std::lock_guard lock(mu_);
      auto it = sent_.find(machine);
      if (it != sent_.end() && it->second.first == r.generation) created_at = it->second.second;
    }
    if (!created_at) {
      if (auto g = store_.GetGeneration(machine, r.generation)) created_at = g->created_at;
    }
    if (created_at) {
      std::lock_guard lock(mu_);
      counters_.deploy_seconds.Observe(static_cast<double>(ev.at - *created_at) / 1000.0);
    }
  }
  Broadcast("status", {{"machine", machine},
                       {"generation", r.generation},
                       {"phase", r.phase},
                       {"detail", ev.detail},
                       {"rebootRequired", r.reboot_required},
                       {"at", ev.at}});
  return proto::Encode(proto::Ack{r.seq});
}

Status Fleet::AgentLogs(const std::string& machine, const proto::LogLines& logs) {
  auto stored = AgentLogBatch({{machine, logs}});
  if (!stored) return stored.error();
  if (!stored->front()) {
    return Err("log lines for generation " + std::to_string(logs.generation) +
               ", which does not exist for machine '" + machine + "', were dropped");
  }
  return Status::Ok();
}

Result<std::vector<bool>> Fleet::AgentLogBatch(const std::vector<LogWrite>& writes) {
  std::vector<bool> known(writes.size(), false);
  std::map<std::pair<std::string, std::int64_t>, bool> exists;
  std::vector<LogRecord> recs;
  // Each write's stream and lines cut between characters, as stored and sent.
  std::vector<std::pair<std::string, std::vector<std::string>>> cut(writes.size());
  std::int64_t now = clock_();
  for (std::size_t k = 0; k < writes.size(); ++k) {
    const auto& [machine, logs] = writes[k];
    auto [it, fresh] = exists.try_emplace({machine, logs.generation}, false);
    if (fresh) it->second = store_.HasGeneration(machine, logs.generation);
    if (!it->second) continue;
    known[k] = true;
    cut[k].first = CutUtf8(logs.stream, kMaxStreamBytes);
    cut[k].second.reserve(logs.lines.size());
    for (const auto& l : logs.lines) {
      cut[k].second.push_back(CutUtf8(l, kMaxLogLineBytes));
      recs.push_back({0, machine, logs.generation, cut[k].first, cut[k].second.back(), now});
    }
  }
  if (auto st = store_.AppendLogs(recs); !st) return st.error();
  for (std::size_t k = 0; k < writes.size(); ++k) {
    if (!known[k]) continue;
    const auto& [machine, logs] = writes[k];
    Broadcast("log", {{"machine", machine},
                      {"generation", logs.generation},
                      {"stream", cut[k].first},
                      {"lines", cut[k].second}});
  }
  return known;
}

void Fleet::AgentSeen(const std::string& machine) { (void)store_.RecordSeen(machine, clock_()); }

void Fleet::AgentGone(const std::string& machine, const AgentChannel* channel) {
  if (ForgetAgent(machine, channel)) RecordDepartures({{machine, clock_()}});
}

bool Fleet::ForgetAgent(const std::string& machine, const AgentChannel* channel) {
  bool removed = false;
  {
    std::lock_guard lock(mu_);
    auto it = online_.find(machine);
    if (it != online_.end()) {
      auto cur = it->second.lock();
      if (!cur || cur.get() == channel) {
        online_.erase(it);
        removed = true;
      }
    }
  }
  if (removed) Broadcast("machine", {{"machine", machine}, {"online", false}});
  return removed;
}

void Fleet::RecordDepartures(const std::vector<Store::Departure>& gone) {
  if (gone.empty()) return;
  if (auto st = store_.RecordDepartures(gone); !st) {
    spdlog::warn("recording {} disconnection(s): {}", gone.size(), st.message());
  }
}

bool Fleet::IsOnline(const std::string& machine) const {
  std::lock_guard lock(mu_);
  auto it = online_.find(machine);
  return (it != online_.end() && !it->second.expired()) || remote_online_.count(machine) != 0;
}

std::size_t Fleet::OnlineCount() const {
  std::lock_guard lock(mu_);
  return online_.size();
}

Status Fleet::AddMachine(const std::string& name, const std::string& key,
                         const std::vector<std::string>& tags) {
  return Register(name, key, tags, "");
}

Status Fleet::Register(const std::string& name, const std::string& key,
                       const std::vector<std::string>& tags, const std::string& roster) {
  if (auto st = ValidateMachineName(name); !st) return st;
  if (auto st = ValidateTags(tags); !st) return st;
  auto pk = ParsePublicKey(key);
  if (!pk) return pk.error();
  {
    std::lock_guard lock(mu_);
    auto it = keys_.find(pk->ToText());
    if (it != keys_.end()) {
      return Err("key is already registered to " +
                 std::string(it->second.role == Role::kMachine ? "machine '" : "operator '") +
                 it->second.name + "'");
    }
  }
  MachineRecord m;
  m.name = name;
  m.key = pk->ToText();
  m.tags = tags;
  m.created_at = clock_();
  m.roster = roster;
  if (auto st = store_.AddMachine(m); !st) return st;
  std::lock_guard lock(mu_);
  keys_[m.key] = {Role::kMachine, name};
  return Status::Ok();
}

Result<RosterEntry> Fleet::CheckEntry(const SignedRosterEntry& entry) {
  auto e = CheckRosterSignature(entry);
  if (!e) return e.error();
  auto signer = ParsePublicKey(entry.signer);
  if (!signer) return signer.error();
  if (Lookup(*signer).role != Role::kOperator) {
    return Err("roster entry for '" + e->machine + "' is signed by " + signer->ShortId() +
               ", which is not a registered operator key");
  }
  return e;
}

std::int64_t Fleet::HeldSignedAt(const MachineRecord& m) {
  if (m.roster.empty()) return 0;
  auto s = DecodeSignedRosterEntry(m.roster);
  if (!s) return 0;
  auto e = ParseRosterEntry(s->entry);
  return e ? e->signed_at : 0;
}

Status Fleet::AddMachine(const SignedRosterEntry& entry) {
  auto e = CheckEntry(entry);
  if (!e) return e.error();
  if (e->key.empty()) return Err("machine.add: the entry must name the machine's key");
  std::int64_t removed_at = store_.RemovalSignedAt(e->machine);
  if (e->signed_at <= removed_at) {
    return Err("roster entry for '" + e->machine +
               "' is older than its removal; sign a new one (check the operator's clock)");
  }
  return Register(e->machine, e->key, e->tags, EncodeSignedRosterEntry(entry));
}

Status Fleet::UpdateMachine(const SignedRosterEntry& entry) {
  auto e = CheckEntry(entry);
  if (!e) return e.error();
  auto m = store_.GetMachine(e->machine);
  if (!m) return Err("no machine named '" + e->machine + "'");
  if (e->key != m->key) {
    return Err("roster entry for '" + e->machine +
               "' names another key than the one registered; remove the machine and add it "
               "again to change its key");
  }
  if (e->signed_at <= HeldSignedAt(*m)) {
    return Err("roster entry for '" + e->machine +
               "' is not newer than the one held (check the operator's clock)");
  }
  return store_.SetMachineRoster(e->machine, e->tags, EncodeSignedRosterEntry(entry), "");
}

Status Fleet::RevokeMachine(const SignedRosterEntry& entry) {
  auto e = CheckEntry(entry);
  if (!e) return e.error();
  if (!e->revoked) return Err("machine.revoke: the entry is not a revocation");
  auto m = store_.GetMachine(e->machine);
  if (!m) return Err("no machine named '" + e->machine + "'");
  if (e->key != m->key) {
    return Err("the revocation of '" + e->machine + "' names another key than the one registered");
  }
  if (e->signed_at <= HeldSignedAt(*m)) {
    return Err("revocation of '" + e->machine +
               "' is not newer than its roster entry (check the operator's clock)");
  }
  if (auto st =
          store_.SetMachineRoster(e->machine, e->tags, EncodeSignedRosterEntry(entry), m->binding);
      !st) {
    return st;
  }
  return RevokeMachine(e->machine);
}

Status Fleet::RemoveMachine(const SignedRosterEntry& entry) {
  auto e = CheckEntry(entry);
  if (!e) return e.error();
  if (!e->removed) return Err("machine.remove: the entry is not a removal");
  auto m = store_.GetMachine(e->machine);
  if (!m) return Err("no machine named '" + e->machine + "'");
  if (e->signed_at <= HeldSignedAt(*m)) {
    return Err("removal of '" + e->machine +
               "' is not newer than its roster entry (check the operator's clock)");
  }
  if (auto st = store_.RecordRemoval(e->machine, EncodeSignedRosterEntry(entry), e->signed_at);
      !st) {
    return st;
  }
  return RemoveMachine(e->machine);
}

Status Fleet::RemoveMachine(const std::string& name) {
  auto m = store_.GetMachine(name);
  if (!m) return Err("no machine named '" + name + "'");
  if (auto st = store_.RemoveMachine(name); !st) return st;
  std::shared_ptr<AgentChannel> ch;
  {
    std::lock_guard lock(mu_);
    keys_.erase(m->key);
    revoked_.erase(name);  // the name and the key may be registered again
    revoked_keys_.erase(m->key);
    auto it = online_.find(name);
    if (it != online_.end()) ch = it->second.lock();
  }
  if (ch) ch->Close("machine was removed from the controller");
  return Status::Ok();
}

Status Fleet::AddOperator(const std::string& name, const std::string& key) {
  auto pk = ParsePublicKey(key);
  if (!pk) return pk.error();
  OperatorRecord op{name, pk->ToText(), clock_()};
  if (auto st = store_.AddOperator(op); !st) return st;
  std::lock_guard lock(mu_);
  keys_[op.key] = {Role::kOperator, name};
  operators_[name] = op.key;
  ++operators_changed_;
  return Status::Ok();
}

Result<GenerationRecord> Fleet::ValidateDeploy(const std::string& operator_name,
                                               const proto::Deploy& d) {
  // The controller checks what it can, so that mistakes surface at publish time;
  // the agent verifies again and is the one that matters.
  auto signer = ParsePublicKey(d.manifest.signer);
  if (!signer) return Err("publish: " + signer.message());
  Identity who = Lookup(*signer);
  if (who.role != Role::kOperator) {
    return Err("publish: manifest is signed by " + signer->ShortId() +
               ", which is not a registered operator key");
  }
  auto sealed = Base64Decode(d.vars);
  if (!sealed) return Err("publish: vars are not base64");
  auto g = CheckSigned(operator_name, *signer, d.manifest, *sealed, d.vars);
  if (!g) return g;
  auto machine = store_.GetMachine(g->machine);
  if (!machine) {
    if (auto st = store_.Ping(); !st) return Err("publish: " + st.message() + "; try again later");
    return Err("publish: no machine named '" + g->machine + "'; add it first");
  }
  if (machine->revoked) return Err("publish: machine '" + g->machine + "' is revoked");
  return g;
}

Result<GenerationRecord> Fleet::CheckSigned(const std::string& operator_name,
                                            const PublicKey& signer, SignedManifest sm,
                                            std::string_view sealed, std::string vars_b64) const {
  auto m = ParseManifest(sm.manifest);
  if (!m) return Err("publish: " + m.message());
  GenerationRecord g;
  g.manifest = std::move(sm);
  g.vars = std::move(vars_b64);
  // The agent closes a connection on a larger message and would receive the
  // same one on every reconnect: refuse it here, where an operator sees why.
  if (std::size_t size = DeployTextSize(g); size > max_deploy_bytes_) {
    std::size_t rest = size - g.vars.size();  // manifest and framing
    // Sealed vars are base64 of a box holding base64 contents: ~16/9 of the files.
    std::size_t room = max_deploy_bytes_ > rest ? (max_deploy_bytes_ - rest) * 9 / 16 : 0;
    return Err("publish: the deploy message for " + m->machine + " generation " +
               std::to_string(m->generation) + " would be " + std::to_string(size) +
               " bytes, more than the " + std::to_string(max_deploy_bytes_) +
               " bytes agents accept (controller --max-message-bytes, agent maxMessageBytes); "
               "make the vars smaller (about " +
               std::to_string(room / 1024) + " KiB of files fit) or raise both limits");
  }
  VerifyContext ctx{m->machine, {signer}, 0};
  auto verified = VerifySignedManifest(g.manifest, ctx, sealed);
  if (!verified) return Err("publish: " + verified.message());
  g.machine = m->machine;
  g.generation = m->generation;
  g.toplevel = m->toplevel;
  g.action = std::string(ToString(m->action));
  g.rollout = m->rollout;
  g.published_by = operator_name;
  g.created_at = clock_();
  return g;
}

Result<std::vector<GenerationRecord>> Fleet::ValidateDeploys(
    const std::string& operator_name, const PublicKey& signer,
    const std::vector<RolloutItemView>& items) {
  if (Lookup(signer).role != Role::kOperator) {
    return Err("publish: the rollout is signed by " + signer.ShortId() +
               ", which is not a registered operator key");
  }
  const std::size_t n = items.size();
  const std::string signer_text = signer.ToText();
  std::vector<GenerationRecord> out(n);
  std::vector<std::optional<Error>> errors(n);
  // Pure checks on every core: signatures dominate (one Ed25519 verify and
  // one manifest parse per item).
  ParallelFor(n, [&](std::size_t i) {
    try {
      const RolloutItemView& it = items[i];
      SignedManifest sm{std::string(it.manifest), signer_text, Base64Encode(it.signature)};
      auto g = CheckSigned(operator_name, signer, std::move(sm), it.vars,
                           it.vars.empty() ? std::string() : Base64Encode(it.vars));
      if (g) {
        out[i] = std::move(*g);
      } else {
        errors[i] = g.error();
      }
    } catch (const std::exception& e) {
      errors[i] = Err(std::string("publish: ") + e.what());
    }
  });
  auto where = [&](std::size_t i) {
    return "item " + std::to_string(i + 1) + " of " + std::to_string(n) + ": ";
  };
  for (std::size_t i = 0; i < n; ++i) {
    if (errors[i]) return Err(where(i) + errors[i]->message);
  }
  // One read for every machine instead of one per item.
  std::map<std::string, bool> revoked;
  for (const auto& m : store_.ListMachines()) revoked.emplace(m.name, m.revoked);
  std::set<std::string> seen;
  for (std::size_t i = 0; i < n; ++i) {
    const std::string& name = out[i].machine;
    auto it = revoked.find(name);
    if (it == revoked.end()) {
      if (auto st = store_.Ping(); !st)
        return Err("publish: " + st.message() + "; try again later");
      return Err(where(i) + "publish: no machine named '" + name + "'; add it first");
    }
    if (it->second) return Err(where(i) + "publish: machine '" + name + "' is revoked");
    if (!seen.insert(name).second) {
      return Err(where(i) + "machine '" + name + "' appears twice");
    }
  }
  return out;
}

Result<GenerationRecord> Fleet::Publish(const std::string& operator_name, const proto::Deploy& d) {
  auto v = ValidateDeploy(operator_name, d);
  if (!v) return v.error();
  if (auto st = CommitPublishes({{operator_name, *v}}).front(); !st) return st.error();
  return v;
}

std::vector<Status> Fleet::CommitPublishes(
    const std::vector<std::pair<std::string, GenerationRecord>>& items) {
  std::vector<GenerationRecord> gens;
  gens.reserve(items.size());
  for (const auto& [op, g] : items) gens.push_back(g);
  std::vector<Status> stored = store_.AddGenerations(gens);  // durable from here on
  for (std::size_t i = 0; i < items.size(); ++i) {
    if (!stored[i]) continue;
    const auto& [operator_name, g] = items[i];
    std::shared_ptr<AgentChannel> ch;
    {
      std::lock_guard lock(mu_);
      ++counters_.publishes;
      auto it = online_.find(g.machine);
      if (it != online_.end()) ch = it->second.lock();
      if (ch) NoteSentLocked(g);
    }
    if (ch) ch->Send(DeployText(g));
    if (observer_) observer_->OnDirectPublish(g.machine, g.generation);
    Broadcast("publish", {{"machine", g.machine},
                          {"generation", g.generation},
                          {"toplevel", g.toplevel},
                          {"by", operator_name},
                          {"online", ch != nullptr || IsOnline(g.machine)}});
  }
  return stored;
}

Status Fleet::RevokeMachine(const std::string& name) {
  auto m = store_.GetMachine(name);
  if (!m) return Err("no machine named '" + name + "'");
  if (auto st = store_.SetMachineRevoked(name, true); !st) return st;
  std::shared_ptr<AgentChannel> ch;
  {
    std::lock_guard lock(mu_);
    keys_.erase(m->key);
    revoked_.insert(name);
    revoked_keys_.insert(m->key);
    ++counters_.revocations;
    auto it = online_.find(name);
    if (it != online_.end()) ch = it->second.lock();
  }
  if (ch) ch->Close("machine key was revoked");
  Broadcast("machine", {{"machine", name}, {"revoked", true}});
  return Status::Ok();
}

Status Fleet::AddEnrollGrant(const SignedRosterEntry& grant, const std::string& by) {
  auto e = CheckEntry(grant);
  if (!e) return e.error();
  if (e->enroll_key.empty()) return Err("machine.enroll: the entry is not an enrolment grant");
  if (store_.GetMachine(e->machine)) {
    return Err("machine '" + e->machine +
               "' is already registered; remove it first to enrol it again");
  }
  std::int64_t now = clock_();
  if (e->expires_at <= now || e->expires_at - now > 30LL * 24 * 3600 * 1000) {
    return Err("enrolment grant for '" + e->machine +
               "' must expire between now and 30 days from now (check the operator's clock)");
  }
  Store::EnrollToken t{Sha256Hex(e->enroll_key),      e->machine, e->tags, e->expires_at, by,
                       EncodeSignedRosterEntry(grant)};
  if (auto st = store_.AddEnrollToken(t); !st) return st;
  std::lock_guard lock(mu_);
  ++live_tokens_;  // admit enrollees at once, not only after the next Refresh
  return Status::Ok();
}

Status Fleet::Enroll(const PublicKey& key, const std::string& machine, const std::string& proof) {
  std::int64_t now = clock_();
  auto t = store_.LiveEnrollToken(machine, now);
  if (!t) {
    return Err("no live enrolment token for machine '" + machine +
               "' (unknown, used or expired); ask an operator for a new one ('muster machine "
               "enroll " +
               machine + "')");
  }
  auto grant_text = DecodeSignedRosterEntry(t->grant);
  if (!grant_text) return grant_text.error();
  auto grant = ParseRosterEntry(grant_text->entry);
  if (!grant) return grant.error();
  EnrollBinding b{key.ToText(), proof};
  if (auto st = VerifyEnrollBinding(*grant, b); !st) return st;
  if (auto st =
          store_.SpendEnrollToken(t->hash, machine, key.ToText(), EncodeEnrollBinding(b), now);
      !st) {
    return st;
  }
  int live = store_.LiveEnrollTokens(clock_());
  std::lock_guard lock(mu_);
  keys_[key.ToText()] = {Role::kMachine, machine};
  live_tokens_ = live;
  ++counters_.enrolments;
  return Status::Ok();
}

Status Fleet::Release(const std::string& machine, std::int64_t generation) {
  if (auto st = store_.ReleaseGeneration(machine, generation); !st) return st;
  Push(machine, generation);
  return Status::Ok();
}

void Fleet::Push(const GenerationRecord& g) {
  std::shared_ptr<AgentChannel> ch;
  {
    std::lock_guard lock(mu_);
    auto it = online_.find(g.machine);
    if (it != online_.end()) ch = it->second.lock();
    if (ch) NoteSentLocked(g);
  }
  if (ch) ch->Send(DeployText(g));
}

void Fleet::Push(const std::string& machine, std::int64_t generation) {
  auto ch = LocalChannel(machine);
  if (!ch) return;  // offline: the welcome carries it when it connects
  auto g = store_.GetGeneration(machine, generation);
  if (!g) return;
  {
    std::lock_guard lock(mu_);
    NoteSentLocked(*g);
  }
  ch->Send(DeployText(*g));
}

Result<Manifest> Fleet::CheckPreview(const SignedManifest& sm) const {
  auto signer = ParsePublicKey(sm.signer);
  if (!signer || Lookup(*signer).role != Role::kOperator) {
    return Err("preview: signed by a key that is not a registered operator");
  }
  auto peek = ParseManifest(sm.manifest);
  if (!peek) return Err("preview: " + peek.message());
  PreviewVerifyContext ctx{peek->machine, {*signer}, Now() / 1000, 600, 300};
  auto m = VerifyPreview(sm, ctx);
  if (!m) return Err("preview for " + peek->machine + ": " + m.message());
  if (!store_.GetMachine(m->machine)) return Err("no machine named '" + m->machine + "'");
  return m;
}

bool Fleet::SendPreview(const std::string& machine, const proto::Preview& p) {
  if (auto ch = LocalChannel(machine)) {
    ch->Send(proto::Encode(p));
    return true;
  }
  if (!IsOnline(machine)) return false;  // nor connected to another controller
  json request = {{"id", p.id},
                  {"manifest", p.manifest.manifest},
                  {"signer", p.manifest.signer},
                  {"signature", p.manifest.signature}};
  if (auto st = store_.AnnouncePreview(machine, {{"request", request}}); !st) {
    spdlog::warn("{}: {}", machine, st.message());
    return false;
  }
  return true;
}

void Fleet::RemotePreview(const std::string& machine, const json& message) {
  if (!message.is_object()) return;
  if (auto report = message.find("report"); report != message.end() && report->is_object()) {
    Broadcast("preview", *report, /*remote=*/true);
    return;
  }
  auto request = message.find("request");
  if (request == message.end() || !request->is_object()) return;
  auto ch = LocalChannel(machine);
  if (!ch) return;  // not connected here (or no longer): its controller answers
  auto text = [&](const char* key) {
    auto v = request->find(key);
    return v != request->end() && v->is_string() ? v->get<std::string>() : std::string();
  };
  proto::Preview p{text("id"), {text("manifest"), text("signer"), text("signature")}};
  // Checked again here: this controller vouches for what it sends its agents.
  auto m = CheckPreview(p.manifest);
  if (!m || m->machine != machine) {
    spdlog::warn("{}: preview passed on by another controller refused: {}", machine,
                 m ? "it names another machine" : m.message());
    return;
  }
  if (preview_hook_) preview_hook_(m->machine, m->toplevel);
  if (p.id.size() <= 64) {  // as a report's id is cut (AgentPreview)
    std::lock_guard lock(mu_);
    remote_previews_.push_back(p.id);
    if (remote_previews_.size() > 1000) remote_previews_.pop_front();
  }
  ch->Send(proto::Encode(p));
}

void Fleet::SetPreviewHook(std::function<void(const std::string&, const std::string&)> hook) {
  preview_hook_ = std::move(hook);
}

void Fleet::SetStatusOutbox(StatusOutbox outbox) {
  std::lock_guard lock(mu_);
  outbox_ = outbox ? std::make_shared<const StatusOutbox>(std::move(outbox)) : nullptr;
}

void Fleet::AgentPreview(const std::string& machine, proto::PreviewReport r) {
  auto clean = [](std::string& s, std::size_t n) { s = CutUtf8(SanitizeUtf8(s), n); };
  auto clean_all = [&](std::vector<std::string>& v) {
    if (v.size() > proto::kMaxPreviewItems) v.resize(proto::kMaxPreviewItems);
    for (auto& s : v) clean(s, 512);
  };
  clean(r.id, 64);
  clean(r.error, kMaxDetailBytes);
  clean(r.toplevel, kMaxPathBytes);
  clean(r.current, kMaxPathBytes);
  clean_all(r.added);
  clean_all(r.removed);
  clean_all(r.units_stop);
  clean_all(r.units_reload);
  clean_all(r.units_restart);
  clean_all(r.units_start);
  if (r.versions.size() > proto::kMaxPreviewItems) r.versions.resize(proto::kMaxPreviewItems);
  for (auto& v : r.versions) {
    clean(v.name, 256);
    clean(v.before, 512);
    clean(v.after, 512);
  }
  json data = proto::ToJson(r);
  data["machine"] = machine;
  Broadcast("preview", data);
  // Asked through another controller: the report goes back that way.
  bool remote;
  {
    std::lock_guard lock(mu_);
    remote =
        std::find(remote_previews_.begin(), remote_previews_.end(), r.id) != remote_previews_.end();
  }
  if (!remote) return;
  if (auto st = store_.AnnouncePreview(machine, {{"report", data}}); !st) {
    spdlog::warn("{}: {}", machine, st.message());
  }
}

void Fleet::Subscribe(std::shared_ptr<EventSink> sink) {
  std::lock_guard lock(mu_);
  sinks_.push_back(sink);
}

void Fleet::Unsubscribe(const EventSink* sink) {
  std::lock_guard lock(mu_);
  std::erase_if(sinks_, [&](const std::weak_ptr<EventSink>& w) {
    auto s = w.lock();
    return !s || s.get() == sink;
  });
}

void Fleet::Broadcast(const std::string& topic, const json& data, bool remote) {
  std::vector<std::shared_ptr<EventSink>> targets;
  {
    std::lock_guard lock(mu_);
    if (sinks_.empty()) return;
    for (auto& w : sinks_) {
      auto s = w.lock();
      if (s && (!remote || s->WantsRemoteEvents())) targets.push_back(std::move(s));
    }
  }
  std::string text = proto::Encode(proto::Event{topic, data});
  for (auto& s : targets) s->Deliver(text);
}

void Fleet::NoteSentLocked(const GenerationRecord& g) {
  ++counters_.deploys_sent;
  sent_[g.machine] = {g.generation, g.created_at};
}

bool Fleet::Watched(bool remote) const {
  std::lock_guard lock(mu_);
  for (const auto& w : sinks_) {
    auto s = w.lock();
    if (s && (!remote || s->WantsRemoteEvents())) return true;
  }
  return false;
}

std::shared_ptr<AgentChannel> Fleet::LocalChannel(const std::string& machine) const {
  std::lock_guard lock(mu_);
  auto it = online_.find(machine);
  return it != online_.end() ? it->second.lock() : nullptr;
}

FleetCounters Fleet::counters() const {
  std::lock_guard lock(mu_);
  return counters_;
}

}  // namespace muster
