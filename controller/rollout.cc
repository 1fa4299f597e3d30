#include "controller/rollout.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <random>

#include "common/crypto.h"

namespace muster {

using nlohmann::json;

namespace {
bool Final(const std::string& item_state) {
  return item_state == "succeeded" || item_state == "failed" || item_state == "superseded" ||
         item_state == "cancelled";
}
bool Active(const std::string& rollout_state) {
  return rollout_state == "running" || rollout_state == "paused";
}
}  // namespace

std::string ItemOutcome(const std::string& phase) {
  if (phase == "succeeded" || phase == "unchanged") return "succeeded";
  if (phase == "failed" || phase == "rolled-back" || phase == "refused") return "failed";
  return "";
}

ScheduleResult Schedule(const RolloutRecord& r, const std::vector<RolloutItemRecord>& items,
                        const std::function<bool(const std::string&)>& online) {
  ScheduleResult out;
  out.state = r.state;
  out.detail = r.detail;
  if (!Active(r.state)) return out;
  int failed = 0, succeeded = 0, in_flight = 0, pending = 0, canary_open = 0;
  for (const auto& it : items) {
    if (it.state == "failed") ++failed;
    if (it.state == "succeeded") ++succeeded;
    if (it.state == "released") ++in_flight;
    if (it.state == "pending") ++pending;
    if (it.stage == 0 && !Final(it.state)) ++canary_open;
  }
  if (failed > r.max_failures) {
    out.state = "halted";
    out.detail = std::to_string(failed) + " machine(s) failed, more than --max-failures " +
                 std::to_string(r.max_failures) + "; nothing further is released";
    return out;
  }
  if (pending == 0 && in_flight == 0) {
    out.state = "succeeded";
    out.detail = std::to_string(succeeded) + " succeeded" +
                 (failed ? ", " + std::to_string(failed) + " failed (within --max-failures)" : "");
    return out;
  }
  if (r.state == "paused") return out;
  int limit = r.max_parallel > 0 ? r.max_parallel : static_cast<int>(items.size());
  for (const auto& it : items) {
    if (in_flight >= limit) break;
    if (it.state != "pending") continue;
    if (it.stage != 0 && canary_open > 0) break;  // later stages wait for the canaries
    if (!online(it.machine)) continue;            // offline: stays pending
    out.release.push_back(it.position);
    ++in_flight;
  }
  std::string stage = canary_open > 0 ? "canary" : "waves";
  out.detail = stage + ": " + std::to_string(succeeded) + " succeeded, " + std::to_string(failed) +
               " failed, " + std::to_string(in_flight) + " in flight, " +
               std::to_string(pending - static_cast<int>(out.release.size())) + " pending";
  return out;
}

RolloutManager::RolloutManager(Fleet& fleet, Store& store) : fleet_(fleet), store_(store) {}

std::vector<std::string> RolloutManager::ActiveIds() {
  std::vector<std::string> ids;
  for (const auto& r : store_.ListRollouts(1000)) {
    if (Active(r.state)) ids.push_back(r.id);
  }
  return ids;
}

std::size_t RolloutManager::HeldBytes(const GenerationRecord& g) {
  return sizeof g + g.machine.size() + g.manifest.manifest.size() + g.manifest.signer.size() +
         g.manifest.signature.size() + g.vars.size() + g.toplevel.size() + g.action.size() +
         g.rollout.size() + g.published_by.size();
}

void RolloutManager::ReindexLocked() {
  // Records held for rollouts that stay active are kept; the others' go. So
  // are final phases not yet stored: applied again over what is read.
  std::map<std::string, std::vector<GenerationRecord>> held;
  std::map<std::string, std::vector<RolloutItemRecord>> unstored;
  for (auto& [id, a] : active_) {
    if (!a.held.empty()) held[id] = std::move(a.held);
    if (!a.unstored.empty()) unstored[id] = std::move(a.unstored);
  }
  active_.clear();
  by_machine_.clear();
  for (const auto& id : ActiveIds()) {
    auto r = store_.GetRollout(id);
    if (!r) continue;
    ActiveRollout& a = active_[id];
    a.record = *r;
    a.items = store_.ListRolloutItems(id);
    if (auto h = held.find(id); h != held.end()) {
      a.held = std::move(h->second);
      held.erase(h);
    }
    if (auto u = unstored.find(id); u != unstored.end()) {
      for (const auto& f : u->second) {
        if (static_cast<std::size_t>(f.position) < a.items.size()) {
          a.items[static_cast<std::size_t>(f.position)] = f;
        }
      }
      a.unstored = std::move(u->second);
    }
    for (const auto& it : a.items) {
      if (!Final(it.state)) by_machine_[it.machine].emplace_back(id, it.position);
    }
  }
  for (const auto& [id, records] : held) {
    for (const auto& g : records) held_bytes_ -= std::min(held_bytes_, HeldBytes(g));
  }
}

void RolloutManager::Resume() {
  std::lock_guard lock(mu_);
  if (!driving_) return;
  ReindexLocked();
  // Final reports that reached no driver (stored while none held the lease,
  // or while this one was down): the machine's row has its last phase.
  std::vector<RolloutItemRecord> settled;
  std::map<std::string, std::vector<int>> touched;
  std::int64_t now = fleet_.Now();
  for (auto& [id, a] : active_) {
    for (auto& it : a.items) {
      if (it.state != "released") continue;
      auto m = store_.GetMachine(it.machine);
      if (!m || m->generation != it.generation) continue;
      std::string outcome = ItemOutcome(m->phase);
      if (outcome.empty()) continue;
      RolloutItemRecord u = it;
      u.state = outcome;
      u.detail = m->phase + (m->detail.empty() ? "" : ": " + m->detail);
      u.updated_at = now;
      settled.push_back(u);
      touched[id].push_back(it.position);
      it = std::move(u);
    }
  }
  if (!settled.empty()) {
    if (auto st = store_.UpdateRolloutItems(settled); !st) {
      spdlog::error("rollouts: cannot record {} final report(s): {}", settled.size(), st.message());
      ReindexLocked();
      touched.clear();
    }
  }
  for (const auto& id : ActiveIds()) {
    auto t = touched.find(id);
    EvaluateLocked(id, t == touched.end() ? std::vector<int>{} : t->second);
  }
}

void RolloutManager::SetDriving(bool driving) {
  {
    std::lock_guard lock(mu_);
    if (driving_ == driving) return;
    driving_ = driving;
  }
  spdlog::info("rollouts: this controller {} the driver", driving ? "is now" : "is no longer");
  if (driving) Resume();
}

bool RolloutManager::Driving() {
  std::lock_guard lock(mu_);
  return driving_;
}

void RolloutManager::OnRemoteChange(const std::string& id, const std::vector<int>& positions) {
  std::lock_guard lock(mu_);
  if (driving_) {
    ReindexLocked();
    EvaluateLocked(id, positions);  // broadcasts
    return;
  }
  // Read only for someone watching: a rollout of 10,000 machines changes
  // thousands of times, and each read is all of its items.
  if (!fleet_.Watched(/*remote=*/true)) return;
  auto r = store_.GetRollout(id);
  if (!r) return;
  fleet_.Broadcast("rollout", DescribeLocked(*r, store_.ListRolloutItems(id), &positions), true);
}

Result<RolloutRecord> RolloutManager::Create(RolloutSpec spec) {
  if (spec.generations.empty()) return Err("a rollout needs at least one machine");
  if (spec.canary < 0 || spec.max_parallel < 0 || spec.max_failures < 0) {
    return Err("--canary, --max-parallel and --max-failures must not be negative");
  }
  std::lock_guard lock(mu_);
  RolloutRecord r;
  std::int64_t now = fleet_.Now();
  std::mt19937_64 rng{std::random_device{}()};
  char id[16];
  std::snprintf(id, sizeof id, "r%06llx", static_cast<unsigned long long>(rng() & 0xffffff));
  r.id = id;
  r.created_at = now;
  r.created_by = spec.created_by;
  r.canary = std::min<int>(spec.canary, static_cast<int>(spec.generations.size()));
  r.max_parallel = spec.max_parallel;
  r.max_failures = spec.max_failures;
  r.state = "running";
  r.updated_at = now;
  std::vector<RolloutItemRecord> items;
  int pos = 0;
  for (auto& g : spec.generations) {
    g.released = false;
    g.rollout = r.id;
    RolloutItemRecord it;
    it.rollout = r.id;
    it.position = pos;
    it.machine = g.machine;
    it.generation = g.generation;
    it.stage = pos < r.canary ? 0 : 1;
    it.updated_at = now;
    items.push_back(it);
    ++pos;
  }
  if (auto st = store_.CreateRollout(r, spec.generations, items); !st) return st.error();
  // Indexed from what was just stored rather than re-read from the store.
  ActiveRollout& a = active_[r.id];
  a.record = r;
  a.items = std::move(items);
  for (const auto& it : a.items) by_machine_[it.machine].emplace_back(r.id, it.position);
  spdlog::info("rollout {} created by {}: {} machines, canary {}, max parallel {}, max failures {}",
               r.id, r.created_by, a.items.size(), r.canary, r.max_parallel, r.max_failures);
  // Waves are pushed from the records in hand (no store read per item) while
  // they fit the budget; a restart or a larger backlog reads them back.
  std::size_t bytes = 0;
  for (const auto& g : spec.generations) bytes += HeldBytes(g);
  if (held_bytes_ + bytes <= kMaxHeldBytes) {
    a.held = std::move(spec.generations);
    held_bytes_ += bytes;
  }
  EvaluateLocked(r.id);
  auto found = active_.find(r.id);
  if (found != active_.end()) return found->second.record;
  return *store_.GetRollout(r.id);
}

void RolloutManager::EvaluateLocked(const std::string& id, std::vector<int> changed,
                                    std::vector<RolloutItemRecord> finals) {
  if (!driving_) {
    // Not the driver: nothing is released here; watchers of this controller
    // still see what it changed (a new rollout, a pause).
    auto rr = store_.GetRollout(id);
    if (rr) fleet_.Broadcast("rollout", DescribeLocked(*rr, store_.ListRolloutItems(id), &changed));
    return;
  }
  RolloutRecord r;
  std::vector<RolloutItemRecord> loaded;
  std::vector<RolloutItemRecord>* items = nullptr;
  auto found = active_.find(id);
  if (found != active_.end()) {
    r = found->second.record;
    items = &found->second.items;
    // Final phases applied in memory at once, so that the schedule counts
    // them; written below with what they enable (and any a failed write left).
    auto& unstored = found->second.unstored;
    finals.insert(finals.begin(), std::make_move_iterator(unstored.begin()),
                  std::make_move_iterator(unstored.end()));
    unstored.clear();
    for (const auto& f : finals) (*items)[static_cast<std::size_t>(f.position)] = f;
  } else {
    auto rr = store_.GetRollout(id);
    if (!rr) return;
    r = *rr;
    loaded = store_.ListRolloutItems(id);
    items = &loaded;
  }
  auto res = Schedule(r, *items, [&](const std::string& m) { return fleet_.IsOnline(m); });
  std::int64_t now = fleet_.Now();
  // The finals, the whole wave and the new state in one durable transaction,
  // then pushed: releases and state change in memory only once the store has
  // them.
  std::vector<RolloutItemRecord> wave;
  wave.reserve(res.release.size());
  for (int pos : res.release) {
    RolloutItemRecord it = (*items)[static_cast<std::size_t>(pos)];
    it.state = "released";
    it.detail = it.stage == 0 ? "released (canary)" : "released";
    it.updated_at = now;
    wave.push_back(std::move(it));
  }
  const bool state_changed = res.state != r.state || res.detail != r.detail;
  RolloutRecord next = r;
  if (state_changed) {
    next.state = res.state;
    next.detail = res.detail;
    next.updated_at = now;
  }
  if (!finals.empty() || !wave.empty() || state_changed) {
    if (auto st = store_.AdvanceRollout(finals, wave, state_changed ? &next : nullptr); !st) {
      spdlog::error("rollout {}: cannot record {} final report(s) and release {} machine(s): {}",
                    id, finals.size(), wave.size(), st.message());
      // The finals stay applied here and are written with the next step;
      // nothing is released and the state is unchanged until then.
      if (found != active_.end()) found->second.unstored = std::move(finals);
      return;
    }
  }
  for (auto& it : wave) {
    const auto pos = static_cast<std::size_t>(it.position);
    std::vector<GenerationRecord>* held = found != active_.end() ? &found->second.held : nullptr;
    if (held && pos < held->size() && (*held)[pos].machine == it.machine &&
        (*held)[pos].generation == it.generation) {
      fleet_.Push((*held)[pos]);
      held_bytes_ -= std::min(held_bytes_, HeldBytes((*held)[pos]));
      (*held)[pos] = GenerationRecord();  // pushed once: its bytes go
    } else {
      fleet_.Push(it.machine, it.generation);
    }
    changed.push_back(it.position);
    (*items)[pos] = std::move(it);
  }
  bool reindex = false;
  if (state_changed) {
    if (res.state != r.state) spdlog::info("rollout {}: {} ({})", id, res.state, res.detail);
    bool was_active = Active(r.state);
    r = next;
    if (found != active_.end()) found->second.record = r;
    reindex = was_active != Active(r.state);
  }
  // Watchers get the counts and only the items that changed: a rollout over
  // thousands of machines must not resend every item on every report. With
  // nobody watching, the event is not built at all.
  json event = fleet_.Watched() ? DescribeLocked(r, *items, &changed) : json();
  if (reindex) ReindexLocked();  // invalidates `items`
  if (!event.is_null()) fleet_.Broadcast("rollout", event);
}

void RolloutManager::OnStatus(const std::string& machine, std::int64_t generation,
                              const std::string& phase, const std::string& detail) {
  OnStatuses({{machine, generation, phase, detail}});
}

void RolloutManager::OnStatuses(const std::vector<StatusNote>& notes) {
  // Only a final report changes a rollout; intermediate phases reach watchers
  // as status events and need no write or re-evaluation here. A batch (one
  // group commit of reports) is stored in one transaction and each rollout it
  // touches is evaluated once. Only the driver records them.
  std::lock_guard lock(mu_);
  if (!driving_) return;
  std::vector<RolloutItemRecord> updates;
  std::map<std::string, std::vector<int>> touched;  // rollout → positions
  std::int64_t now = fleet_.Now();
  for (const auto& n : notes) {
    std::string outcome = ItemOutcome(n.phase);
    if (outcome.empty()) continue;
    auto idx = by_machine_.find(n.machine);
    if (idx == by_machine_.end()) continue;
    for (const auto& [id, pos] : idx->second) {
      auto a = active_.find(id);
      if (a == active_.end()) continue;
      const auto& it = a->second.items[static_cast<std::size_t>(pos)];
      if (it.generation != n.generation || Final(it.state)) continue;
      RolloutItemRecord u = it;
      u.state = outcome;
      u.detail = n.phase + (n.detail.empty() ? "" : ": " + n.detail);
      u.updated_at = now;
      updates.push_back(std::move(u));
      touched[id].push_back(pos);
    }
  }
  if (updates.empty()) return;
  // Each rollout's finals are stored with the release they enable, in one
  // transaction (EvaluateLocked).
  std::map<std::string, std::vector<RolloutItemRecord>> finals;
  for (auto& u : updates) finals[u.rollout].push_back(std::move(u));
  for (auto& [id, positions] : touched) {
    EvaluateLocked(id, std::move(positions), std::move(finals[id]));
  }
}

void RolloutManager::OnOnline(const std::string& machine) {
  std::lock_guard lock(mu_);
  if (!driving_) return;
  auto idx = by_machine_.find(machine);
  if (idx == by_machine_.end()) return;
  auto refs = idx->second;
  for (const auto& [id, pos] : refs) {
    auto a = active_.find(id);
    if (a == active_.end()) continue;
    if (a->second.items[static_cast<std::size_t>(pos)].state == "pending") EvaluateLocked(id);
  }
}

void RolloutManager::OnDirectPublish(const std::string& machine, std::int64_t generation) {
  std::lock_guard lock(mu_);
  if (!driving_) return;
  auto idx = by_machine_.find(machine);
  if (idx == by_machine_.end()) return;
  auto refs = idx->second;
  for (const auto& [id, pos] : refs) {
    auto a = active_.find(id);
    if (a == active_.end()) continue;
    auto& it = a->second.items[static_cast<std::size_t>(pos)];
    if (Final(it.state) || it.generation >= generation) continue;
    it.state = "superseded";
    it.detail = "superseded by generation " + std::to_string(generation);
    it.updated_at = fleet_.Now();
    (void)store_.UpdateRolloutItem(it);
    EvaluateLocked(id, {pos});
  }
}

Status RolloutManager::Transition(const std::string& id, const std::string& from,
                                  const std::string& to, const std::string& detail) {
  std::lock_guard lock(mu_);
  auto r = store_.GetRollout(id);
  if (!r) return Err("no rollout '" + id + "'; see 'muster rollout list'");
  if (r->state != from) return Err("rollout " + id + " is " + r->state + ", not " + from);
  r->state = to;
  r->detail = detail;
  r->updated_at = fleet_.Now();
  if (auto st = store_.UpdateRollout(*r); !st) return st;
  ReindexLocked();
  EvaluateLocked(id);
  return Status::Ok();
}

Status RolloutManager::Pause(const std::string& id) {
  return Transition(id, "running", "paused",
                    "paused: machines already released finish; nothing new is released");
}

Status RolloutManager::Continue(const std::string& id) {
  return Transition(id, "paused", "running", "resumed");
}

Status RolloutManager::Abort(const std::string& id) {
  std::lock_guard lock(mu_);
  auto r = store_.GetRollout(id);
  if (!r) return Err("no rollout '" + id + "'");
  if (!Active(r->state) && r->state != "halted") {
    return Err("rollout " + id + " is already " + r->state);
  }
  std::int64_t now = fleet_.Now();
  int cancelled = 0;
  for (auto it : store_.ListRolloutItems(id)) {
    if (it.state != "pending") continue;
    it.state = "cancelled";
    it.detail = "rollout aborted before release";
    it.updated_at = now;
    (void)store_.UpdateRolloutItem(it);
    ++cancelled;
  }
  r->state = "aborted";
  r->detail = "aborted; " + std::to_string(cancelled) + " pending machine(s) will not be deployed";
  r->updated_at = now;
  if (auto st = store_.UpdateRollout(*r); !st) return st;
  ReindexLocked();
  fleet_.Broadcast("rollout", DescribeLocked(*r, store_.ListRolloutItems(id), nullptr));
  return Status::Ok();
}

json RolloutManager::DescribeLocked(const RolloutRecord& r,
                                    const std::vector<RolloutItemRecord>& items,
                                    const std::vector<int>* only) {
  json j = {{"rollout", r.id},
            {"state", r.state},
            {"detail", r.detail},
            {"createdAt", r.created_at},
            {"createdBy", r.created_by},
            {"canary", r.canary},
            {"maxParallel", r.max_parallel},
            {"maxFailures", r.max_failures},
            {"updatedAt", r.updated_at}};
  json list = json::array();
  std::map<std::string, int> counts;
  std::set<int> wanted;
  if (only) wanted.insert(only->begin(), only->end());
  for (const auto& it : items) {
    ++counts[it.state];
    if (only && !wanted.count(it.position)) continue;
    list.push_back({{"machine", it.machine},
                    {"generation", it.generation},
                    {"stage", it.stage == 0 ? "canary" : "wave"},
                    {"state", it.state},
                    {"detail", it.detail},
                    {"online", fleet_.IsOnline(it.machine)},
                    {"updatedAt", it.updated_at}});
  }
  j["items"] = list;
  j["counts"] = counts;
  j["total"] = items.size();
  return j;
}

json RolloutManager::Describe(const std::string& id) {
  std::lock_guard lock(mu_);
  auto r = store_.GetRollout(id);
  if (!r) return nullptr;
  return DescribeLocked(*r, store_.ListRolloutItems(id), nullptr);
}

json RolloutManager::Summary(const std::string& id) {
  std::lock_guard lock(mu_);
  static const std::vector<int> kNone;
  if (auto a = active_.find(id); a != active_.end()) {
    return DescribeLocked(a->second.record, a->second.items, &kNone);
  }
  auto r = store_.GetRollout(id);
  if (!r) return nullptr;
  return DescribeLocked(*r, store_.ListRolloutItems(id), &kNone);
}

json RolloutManager::List(int limit) {
  std::lock_guard lock(mu_);
  json out = json::array();
  for (const auto& r : store_.ListRollouts(limit)) {
    json d = DescribeLocked(r, store_.ListRolloutItems(r.id), nullptr);
    d.erase("items");
    out.push_back(d);
  }
  return out;
}

}  // namespace muster
