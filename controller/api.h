// Operator requests: method name + JSON params in, JSON result or error out.
//
// Methods (params → result):
// Roster changes carry an operator-signed entry, Entry = {entry, signer,
// signature} (common/roster.h); Machine includes its roster entry and binding.
//   machine.add    {entry}                        → {name}
//   machine.remove {entry}  (a signed removal)    → {name}
//   machine.tag|sign {entry} (same key, newer)    → {name}
//   machine.revoke {entry} (the key, revoked)     → {name}  (its connection closes)
//   machine.list   {}                             → {machines: [Machine]}
//   machine.get    {name}                         → {machine: Machine, latestGeneration,
//                                                    maxGeneration}
//   roster         {names?}                       → {machines: [{name, key, revoked, roster,
//                                                    binding, maxGeneration}], removed: [Entry]}
//   publish        {manifest, signer, signature, vars} → {machine, generation, online}
//   status         {machine?}                     → {machines: [Machine]}
//   preview        {items: [{manifest, signer, signature}]}  (signed previews,
//                   common/preview.h) → {id, sent: [machine], offline: [machine]};
//                   answers arrive as "preview" events {id, machine, …}
//   history        {machine, limit?}              → {machine, generations: [{…, events}]}
//   logs           {machine, generation?, after?, limit?} → {generation, lines, last}
//   machine.enroll {grant: Entry}                 → {name, expiresAt}
//   rollout.create {items: [{manifest, signer, signature, vars}], canary, maxParallel,
//                   maxFailures}                 → Rollout without its items
//                   (state, detail, counts, total: the answer does not grow with the fleet)
//   rollout.create as a binary frame (proto::EncodeBinary): {count, signer, canary,
//                   maxParallel, maxFailures} + the items (common/rollout_items.h) → the same
//   rollout.list   {limit?}                       → {rollouts: [Rollout]}
//   rollout.status|pause|resume|abort {id}        → Rollout
//   rollout.retry-plan {id}  → {rollout, state, canary, maxParallel, maxFailures,
//                   items: [{machine, generation, detail, phase, manifest, signer,
//                   signature, vars}]}  (its failed items, as stored)
//   operator.list  {}                             → {operators: [{name, key, createdAt}]}
//   operator.remove {name}                        → {name}  (its sessions close)
//   dashboard.token {hash}  (SHA-256 hex of a token the CLI made) → {}
//   dashboard.revoke {}  (every dashboard token)  → {revoked}
//   webhook.add    {url, secret, events?}         → {id, url, events}
//   webhook.list   {}                             → {webhooks: [{id, url, events, createdBy,
//                                                    createdAt}], queued}  (no secrets)
//   webhook.remove {id}                           → {id}  (its queued deliveries too)
//   webhook.test   {id}                           → {delivery}  (then "webhook" events)
//   subscribe      {}  (handled by the session)  → {} then events
//   cache.*        the binary cache (controller/cache_service.h)
// Thread-safe: stateless apart from the Fleet it calls.
#pragma once

#include "common/protocol.h"
#include "controller/cache_service.h"
#include "controller/fleet.h"
#include "controller/notifier.h"
#include "controller/rollout.h"

namespace muster {

class Api {
 public:
  explicit Api(Fleet& fleet, RolloutManager* rollouts = nullptr)
      : fleet_(fleet), rollouts_(rollouts) {}
  // Answers one operator request; when the store stopped answering during it
  // (reads then look empty), the answer is an error saying so instead.
  proto::Response Handle(const Identity& who, const proto::Request& req);
  // A 'publish' request in two steps, so that the server can group-commit
  // pipelined publishes: the checks (signature, numbers, size), then the
  // answer for what Fleet::CommitPublishes did with the record.
  Result<GenerationRecord> PreparePublish(const Identity& who, const proto::Request& req);
  proto::Response PublishAnswer(const Identity& who, std::uint64_t id,
                                const Result<GenerationRecord>& stored);
  // Serves cache.* requests from cache (unset: they are refused).
  void SetCache(CacheService* cache) { cache_ = cache; }
  // Serves webhook.* requests (unset: they are refused).
  void SetNotifier(Notifier* notifier) { notifier_ = notifier; }

 private:
  proto::Response HandleRequest(const Identity& who, const proto::Request& req);
  // rollout.create in its binary form.
  proto::Response CreateRollout(const Identity& who, const proto::Request& req);
  nlohmann::json MachineJson(const MachineRecord& m);
  Fleet& fleet_;
  RolloutManager* rollouts_;
  CacheService* cache_ = nullptr;
  Notifier* notifier_ = nullptr;
};

}  // namespace muster
