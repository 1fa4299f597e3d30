#include "controller/api.h"

#include <sodium.h>
#include <spdlog/spdlog.h>

#include <set>

#include "common/rollout_items.h"
#include "controller/dashboard.h"

namespace muster {

using nlohmann::json;

namespace {
proto::Response Ok(std::uint64_t id, json result) {
  proto::Response r;
  r.id = id;
  r.result = std::move(result);
  return r;
}
proto::Response Fail(std::uint64_t id, std::string error) {
  proto::Response r;
  r.id = id;
  r.ok = false;
  r.error = std::move(error);
  return r;
}
std::string Need(const json& p, const char* key) {
  auto it = p.find(key);
  if (it == p.end() || !it->is_string() || it->get<std::string>().empty()) {
    throw std::invalid_argument(std::string("parameter '") + key + "' (a string) is required");
  }
  return it->get<std::string>();
}
// The signing time of a generation's manifest (unix ms; 0 if unreadable): the
// time agents order manifests by, which may differ from when it was stored.
std::int64_t SignedAtMs(const GenerationRecord& g) {
  auto m = ParseManifest(g.manifest.manifest);
  if (!m || m->created_at <= 0 || m->created_at > INT64_MAX / 1000) return 0;
  return m->created_at * 1000;
}
// A signed roster entry parameter: {entry, signer, signature}.
SignedRosterEntry EntryParam(const json& p, const char* key) {
  auto it = p.find(key);
  if (it == p.end() || !it->is_object()) {
    throw std::invalid_argument(std::string("parameter '") + key +
                                "' (a signed roster entry) is required; this controller accepts "
                                "only operator-signed roster changes (upgrade the muster CLI)");
  }
  return {Need(*it, "entry"), Need(*it, "signer"), Need(*it, "signature")};
}
json EntryJson(const std::string& encoded) {
  if (encoded.empty()) return nullptr;
  json j = json::parse(encoded, nullptr, false);
  return j.is_discarded() ? json(nullptr) : j;
}
std::int64_t IntParam(const json& p, const char* key, std::int64_t def) {
  auto it = p.find(key);
  if (it == p.end() || it->is_null()) return def;
  if (!it->is_number_integer()) {
    throw std::invalid_argument(std::string("parameter '") + key + "' must be an integer");
  }
  return it->get<std::int64_t>();
}
}  // namespace

json Api::MachineJson(const MachineRecord& m) {
  auto latest = fleet_.store().LatestGeneration(m.name);
  return {{"name", m.name},
          {"key", m.key},
          {"tags", m.tags},
          {"online", fleet_.IsOnline(m.name)},
          {"lastSeen", m.last_seen},
          {"generation", m.generation},
          {"targetGeneration", latest ? latest->generation : 0},
          {"targetToplevel", latest ? latest->toplevel : ""},
          {"phase", m.phase},
          {"detail", m.detail},
          {"toplevel", m.toplevel},
          {"rebootRequired", m.reboot_required},
          {"lastApplied", m.last_applied},
          {"revoked", m.revoked},
          {"roster", EntryJson(m.roster)},
          {"binding", EntryJson(m.binding)},
          {"facts", m.facts}};
}

Result<GenerationRecord> Api::PreparePublish(const Identity& who, const proto::Request& req) {
  try {
    const json& p = req.params;
    proto::Deploy d;
    d.manifest.manifest = Need(p, "manifest");
    d.manifest.signer = Need(p, "signer");
    d.manifest.signature = Need(p, "signature");
    d.vars = p.value("vars", std::string());
    return fleet_.ValidateDeploy(who.name, d);
  } catch (const std::exception& e) {
    return Err(req.method + ": " + e.what());
  }
}

proto::Response Api::PublishAnswer(const Identity& who, std::uint64_t id,
                                   const Result<GenerationRecord>& g) {
  if (!g) return Fail(id, g.message());
  spdlog::info("operator {} published {} generation {} ({})", who.name, g->machine, g->generation,
               g->toplevel);
  return Ok(id, {{"machine", g->machine},
                 {"generation", g->generation},
                 {"online", fleet_.IsOnline(g->machine)}});
}

proto::Response Api::CreateRollout(const Identity& who, const proto::Request& req) {
  // The binary form (common/rollout_items.h): settings, count and signer in
  // the header, the items sliced from the payload without a copy or base64.
  const json& p = req.params;
  const std::int64_t count = IntParam(p, "count", 0);
  if (count < 1 || static_cast<std::uint64_t>(count) > kMaxRolloutItems) {
    return Fail(req.id, "rollout.create: 'count' must be 1 to " + std::to_string(kMaxRolloutItems) +
                            " items");
  }
  auto signer = ParsePublicKey(Need(p, "signer"));
  if (!signer) return Fail(req.id, "rollout.create: signer: " + signer.message());
  auto items =
      DecodeRolloutItems(req.payload, static_cast<std::size_t>(count), fleet_.max_deploy_bytes());
  if (!items) return Fail(req.id, "rollout.create: " + items.message());
  auto gens = fleet_.ValidateDeploys(who.name, *signer, *items);
  if (!gens) return Fail(req.id, "rollout.create: " + gens.message());
  RolloutSpec spec;
  spec.created_by = who.name;
  spec.canary = static_cast<int>(IntParam(p, "canary", 0));
  spec.max_parallel = static_cast<int>(IntParam(p, "maxParallel", 0));
  spec.max_failures = static_cast<int>(IntParam(p, "maxFailures", 0));
  spec.generations = std::move(*gens);
  auto r = rollouts_->Create(std::move(spec));
  if (!r) return Fail(req.id, r.message());
  return Ok(req.id, rollouts_->Summary(r->id));
}

proto::Response Api::Handle(const Identity& who, const proto::Request& req) {
  // A store that did not answer during the request (a database down) made
  // its reads look empty: report that instead of an answer built on them.
  const std::uint64_t failures = fleet_.store().Failures();
  proto::Response out = HandleRequest(who, req);
  if (fleet_.store().Failures() != failures) {
    if (auto st = fleet_.store().Ping(); !st) {
      return Fail(req.id, req.method + ": " + st.message() + "; try again when it is back");
    }
  }
  return out;
}

proto::Response Api::HandleRequest(const Identity& who, const proto::Request& req) {
  const json& p = req.params;
  try {
    if (req.method.rfind("cache.", 0) == 0) {
      if (!cache_) return Fail(req.id, "this controller runs without a binary cache");
      auto r = cache_->Handle(req.method, p, req.payload);
      if (!r) return Fail(req.id, r.message());
      return Ok(req.id, std::move(*r));
    }
    if (req.method == "machine.add") {
      SignedRosterEntry e = EntryParam(p, "entry");
      if (auto st = fleet_.AddMachine(e); !st) return Fail(req.id, st.message());
      auto name = ParseRosterEntry(e.entry)->machine;
      spdlog::info("operator {} registered machine {}", who.name, name);
      return Ok(req.id, {{"name", name}});
    }
    if (req.method == "machine.remove") {
      SignedRosterEntry e = EntryParam(p, "entry");
      if (auto st = fleet_.RemoveMachine(e); !st) return Fail(req.id, st.message());
      auto name = ParseRosterEntry(e.entry)->machine;
      spdlog::info("operator {} removed machine {}", who.name, name);
      return Ok(req.id, {{"name", name}});
    }
    if (req.method == "machine.tag" || req.method == "machine.sign") {
      SignedRosterEntry e = EntryParam(p, "entry");
      if (auto st = fleet_.UpdateMachine(e); !st) return Fail(req.id, st.message());
      auto name = ParseRosterEntry(e.entry)->machine;
      spdlog::info("operator {}: {} {}", who.name, req.method, name);
      return Ok(req.id, {{"name", name}});
    }
    if (req.method == "roster") {
      // Every machine's signed entry and generation numbers in one answer, so
      // that the CLI resolves and numbers a rollout without a call per machine.
      std::set<std::string> only;
      if (auto it = p.find("names"); it != p.end() && it->is_array()) {
        for (const auto& n : *it) {
          if (n.is_string()) only.insert(n.get<std::string>());
        }
      }
      json machines = json::array();
      const auto max_generations = fleet_.store().MaxGenerations();
      for (const auto& m : fleet_.store().ListMachines()) {
        if (!only.empty() && !only.count(m.name)) continue;
        auto max = max_generations.find(m.name);
        machines.push_back({{"name", m.name},
                            {"key", m.key},
                            {"tags", m.tags},
                            {"revoked", m.revoked},
                            {"roster", EntryJson(m.roster)},
                            {"binding", EntryJson(m.binding)},
                            {"maxGeneration", max == max_generations.end() ? 0 : max->second}});
      }
      json removed = json::array();
      for (const auto& [name, entry] : fleet_.store().ListRemovals()) {
        if (!only.empty() && !only.count(name)) continue;
        removed.push_back(EntryJson(entry));
      }
      json out = json::object();  // moved in: an initializer list would copy 10,000 rows
      out["machines"] = std::move(machines);
      out["removed"] = std::move(removed);
      return Ok(req.id, std::move(out));
    }
    if (req.method == "machine.list" || req.method == "status") {
      json machines = json::array();
      std::string only = p.value("machine", std::string());
      for (const auto& m : fleet_.store().ListMachines()) {
        if (!only.empty() && m.name != only) continue;
        machines.push_back(MachineJson(m));
      }
      if (!only.empty() && machines.empty()) return Fail(req.id, "no machine named '" + only + "'");
      json out = json::object();
      out["machines"] = std::move(machines);
      return Ok(req.id, std::move(out));
    }
    if (req.method == "machine.get") {
      std::string name = Need(p, "name");
      auto m = fleet_.store().GetMachine(name);
      if (!m)
        return Fail(req.id, "no machine named '" + name + "'; add it with 'muster machine add'");
      auto latest = fleet_.store().LatestGeneration(name);
      return Ok(req.id, {{"machine", MachineJson(*m)},
                         {"latestGeneration", latest ? latest->generation : 0},
                         {"maxGeneration", fleet_.store().MaxGeneration(name)}});
    }
    if (req.method == "publish") {
      auto g = PreparePublish(who, req);
      if (g) {
        if (auto st = fleet_.CommitPublishes({{who.name, *g}}).front(); !st) g = st.error();
      }
      return PublishAnswer(who, req.id, g);
    }
    if (req.method == "preview") {
      // Signed preview requests (common/preview.h), checked here for an early
      // error; each agent verifies them again against its own trusted keys.
      auto items = p.find("items");
      if (items == p.end() || !items->is_array() || items->empty() || items->size() > 100000) {
        return Fail(req.id, "preview: 'items' must list signed preview requests");
      }
      std::string raw(4, '\0');
      randombytes_buf(raw.data(), raw.size());
      const std::string id = "p" + HexEncode(raw);
      json sent = json::array(), offline = json::array();
      for (const auto& it : *items) {
        if (!it.is_object()) return Fail(req.id, "preview: each item is an object");
        SignedManifest sm{Need(it, "manifest"), Need(it, "signer"), Need(it, "signature")};
        auto m = fleet_.CheckPreview(sm);
        if (!m) return Fail(req.id, m.message());
        if (cache_) cache_->AllowPreview(m->machine, m->toplevel);
        if (fleet_.SendPreview(m->machine, proto::Preview{id, sm})) {
          sent.push_back(m->machine);
        } else {
          offline.push_back(m->machine);
        }
      }
      spdlog::info("operator {} asked {} machine(s) for preview {}", who.name, sent.size(), id);
      return Ok(req.id, {{"id", id}, {"sent", sent}, {"offline", offline}});
    }
    if (req.method == "history") {
      std::string name = Need(p, "machine");
      if (!fleet_.store().GetMachine(name)) return Fail(req.id, "no machine named '" + name + "'");
      int limit = static_cast<int>(std::clamp<std::int64_t>(IntParam(p, "limit", 20), 1, 1000));
      json gens = json::array();
      for (const auto& g : fleet_.store().ListGenerations(name, limit)) {
        json events = json::array();
        for (const auto& e : fleet_.store().ListEvents(name, g.generation, 200)) {
          events.push_back({{"phase", e.phase}, {"detail", e.detail}, {"at", e.at}});
        }
        gens.push_back({{"generation", g.generation},
                        {"toplevel", g.toplevel},
                        {"action", g.action},
                        {"rollout", g.rollout},
                        {"publishedBy", g.published_by},
                        {"createdAt", g.created_at},
                        {"signedAt", SignedAtMs(g)},
                        {"events", events}});
      }
      return Ok(req.id, {{"machine", name}, {"generations", gens}});
    }
    if (req.method == "logs") {
      std::string name = Need(p, "machine");
      if (!fleet_.store().GetMachine(name)) return Fail(req.id, "no machine named '" + name + "'");
      std::int64_t gen = IntParam(p, "generation", 0);
      if (gen == 0) {
        auto latest = fleet_.store().LatestGeneration(name);
        gen = latest ? latest->generation : 0;
      }
      std::int64_t after = IntParam(p, "after", 0);
      int limit = static_cast<int>(std::clamp<std::int64_t>(IntParam(p, "limit", 1000), 1, 10000));
      json lines = json::array();
      std::int64_t last = after;
      for (const auto& l : fleet_.store().ReadLogs(name, gen, after, limit)) {
        lines.push_back({{"stream", l.stream}, {"line", l.line}, {"at", l.at}});
        last = l.id;
      }
      return Ok(req.id, {{"generation", gen}, {"lines", lines}, {"last", last}});
    }
    if (req.method == "machine.revoke") {
      SignedRosterEntry e = EntryParam(p, "entry");
      if (auto st = fleet_.RevokeMachine(e); !st) return Fail(req.id, st.message());
      std::string name = ParseRosterEntry(e.entry)->machine;
      spdlog::warn("operator {} revoked machine {}", who.name, name);
      return Ok(req.id, {{"name", name}});
    }
    if (req.method == "operator.list") {
      json ops = json::array();
      for (const auto& o : fleet_.store().ListOperators()) {
        ops.push_back({{"name", o.name}, {"key", o.key}, {"createdAt", o.created_at}});
      }
      return Ok(req.id, {{"operators", ops}});
    }
    if (req.method == "operator.remove") {
      // The request arrives on a session authenticated by the requesting
      // operator's key (mutual TLS), which the log records.
      std::string name = Need(p, "name");
      if (auto st = fleet_.RemoveOperator(name); !st) return Fail(req.id, st.message());
      spdlog::warn("operator {} removed operator {}", who.name, name);
      return Ok(req.id, {{"name", name}});
    }
    if (req.method == "machine.enroll") {
      SignedRosterEntry grant = EntryParam(p, "grant");
      if (auto st = fleet_.AddEnrollGrant(grant, who.name); !st) return Fail(req.id, st.message());
      auto e = ParseRosterEntry(grant.entry);
      spdlog::info("operator {} created an enrolment grant for {}", who.name, e->machine);
      return Ok(req.id, {{"name", e->machine}, {"expiresAt", e->expires_at}});
    }
    if (req.method.rfind("webhook.", 0) == 0) {
      if (!notifier_) return Fail(req.id, "this controller runs without notifications");
      if (req.method == "webhook.add") {
        std::vector<std::string> events;
        if (auto it = p.find("events"); it != p.end() && !it->is_null()) {
          if (!it->is_array()) return Fail(req.id, "webhook.add: 'events' must be a list");
          for (const auto& e : *it) {
            if (!e.is_string()) return Fail(req.id, "webhook.add: events are strings");
            events.push_back(e.get<std::string>());
          }
        }
        auto w = notifier_->Add(Need(p, "url"), Need(p, "secret"), events, who.name);
        if (!w) return Fail(req.id, w.message());
        spdlog::info("operator {} added webhook {} ({})", who.name, w->id, w->url);
        return Ok(req.id, {{"id", w->id}, {"url", w->url}, {"events", w->events}});
      }
      if (req.method == "webhook.list") {
        json list = json::array();
        for (const auto& w : fleet_.store().ListWebhooks()) {
          list.push_back({{"id", w.id},
                          {"url", w.url},
                          {"events", w.events},
                          {"createdBy", w.created_by},
                          {"createdAt", w.created_at}});
        }
        return Ok(req.id, {{"webhooks", list}, {"queued", fleet_.store().QueuedDeliveries()}});
      }
      if (req.method == "webhook.remove") {
        std::string id = Need(p, "id");
        if (auto st = notifier_->Remove(id); !st) return Fail(req.id, st.message());
        spdlog::info("operator {} removed webhook {}", who.name, id);
        return Ok(req.id, {{"id", id}});
      }
      if (req.method == "webhook.test") {
        auto d = notifier_->Test(Need(p, "id"), who.name);
        if (!d) return Fail(req.id, d.message());
        return Ok(req.id, {{"delivery", *d}});
      }
      return Fail(req.id, "unknown method '" + req.method + "'");
    }
    if (req.method == "dashboard.token") {
      std::string hash = Need(p, "hash");
      if (auto st = AddDashboardTokenHash(fleet_.store(), hash, who.name, fleet_.Now()); !st) {
        return Fail(req.id, st.message());
      }
      spdlog::info("operator {} issued a dashboard access token", who.name);
      return Ok(req.id, json::object());
    }
    if (req.method == "dashboard.revoke") {
      auto n = ClearDashboardTokens(fleet_.store());
      if (!n) return Fail(req.id, n.message());
      spdlog::warn("operator {} revoked every dashboard access token ({})", who.name, *n);
      return Ok(req.id, {{"revoked", *n}});
    }
    if (req.method.rfind("rollout.", 0) == 0) {
      if (!rollouts_) return Fail(req.id, "rollouts are not available");
      if (req.method == "rollout.create" && !req.payload.empty()) return CreateRollout(who, req);
      if (req.method == "rollout.create") {
        auto items = p.find("items");
        if (items == p.end() || !items->is_array() || items->empty()) {
          return Fail(req.id, "rollout.create: 'items' must be a non-empty list of signed deploys");
        }
        RolloutSpec spec;
        spec.created_by = who.name;
        spec.canary = static_cast<int>(IntParam(p, "canary", 0));
        spec.max_parallel = static_cast<int>(IntParam(p, "maxParallel", 0));
        spec.max_failures = static_cast<int>(IntParam(p, "maxFailures", 0));
        std::set<std::string> seen;
        for (const auto& it : *items) {
          if (!it.is_object()) return Fail(req.id, "rollout.create: each item must be an object");
          proto::Deploy d;
          d.manifest.manifest = Need(it, "manifest");
          d.manifest.signer = Need(it, "signer");
          d.manifest.signature = Need(it, "signature");
          d.vars = it.value("vars", std::string());
          auto g = fleet_.ValidateDeploy(who.name, d);
          if (!g) return Fail(req.id, g.message());
          if (!seen.insert(g->machine).second) {
            return Fail(req.id, "rollout.create: machine '" + g->machine + "' appears twice");
          }
          spec.generations.push_back(std::move(*g));
        }
        auto r = rollouts_->Create(std::move(spec));
        if (!r) return Fail(req.id, r.message());
        return Ok(req.id, rollouts_->Summary(r->id));
      }
      if (req.method == "rollout.list") {
        int limit = static_cast<int>(std::clamp<std::int64_t>(IntParam(p, "limit", 20), 1, 1000));
        return Ok(req.id, {{"rollouts", rollouts_->List(limit)}});
      }
      if (req.method == "rollout.retry-plan") {
        // What 'muster rollout retry' re-signs: the failed machines' signed
        // manifests and sealed vars, as stored (the CLI verifies them).
        std::string rid = Need(p, "id");
        auto r = fleet_.store().GetRollout(rid);
        if (!r) return Fail(req.id, "no rollout '" + rid + "'; see 'muster rollout list'");
        json items = json::array();
        for (const auto& it : fleet_.store().ListRolloutItems(rid)) {
          if (it.state != "failed") continue;
          auto g = fleet_.store().GetGeneration(it.machine, it.generation);
          if (!g) continue;
          auto m = fleet_.store().GetMachine(it.machine);
          items.push_back({{"machine", it.machine},
                           {"generation", it.generation},
                           {"detail", it.detail},
                           {"phase", m && m->generation == it.generation ? m->phase : ""},
                           {"manifest", g->manifest.manifest},
                           {"signer", g->manifest.signer},
                           {"signature", g->manifest.signature},
                           {"vars", g->vars}});
        }
        return Ok(req.id, {{"rollout", r->id},
                           {"state", r->state},
                           {"canary", r->canary},
                           {"maxParallel", r->max_parallel},
                           {"maxFailures", r->max_failures},
                           {"items", items}});
      }
      std::string id = Need(p, "id");
      Status st;
      if (req.method == "rollout.pause") {
        st = rollouts_->Pause(id);
      } else if (req.method == "rollout.resume") {
        st = rollouts_->Continue(id);
      } else if (req.method == "rollout.abort") {
        st = rollouts_->Abort(id);
      } else if (req.method != "rollout.status") {
        return Fail(req.id, "unknown method '" + req.method + "'");
      }
      if (!st) return Fail(req.id, st.message());
      json d = rollouts_->Describe(id);
      if (d.is_null()) return Fail(req.id, "no rollout '" + id + "'; see 'muster rollout list'");
      if (req.method != "rollout.status") {
        spdlog::info("operator {}: {} {}", who.name, req.method, id);
      }
      return Ok(req.id, d);
    }
    return Fail(req.id, "unknown method '" + req.method + "'");
  } catch (const std::exception& e) {
    return Fail(req.id, req.method + ": " + e.what());
  }
}

}  // namespace muster
