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
//   history        {machine, limit?}              → {machine, generations: [{…, events}]}
//   logs           {machine, generation?, after?, limit?} → {generation, lines, last}
//   machine.enroll {grant: Entry}                 → {name, expiresAt}
//   rollout.create {items: [{manifest, signer, signature, vars}], canary, maxParallel,
//                   maxFailures}                 → Rollout
//   rollout.list   {limit?}                       → {rollouts: [Rollout]}
//   rollout.status|pause|resume|abort {id}        → Rollout
//   operator.list  {}                             → {operators: [{name, key, createdAt}]}
//   operator.remove {name}                        → {name}  (its sessions close)
//   subscribe      {}  (handled by the session)  → {} then events
//   cache.*        the binary cache (controller/cache_service.h)
// Thread-safe: stateless apart from the Fleet it calls.
#pragma once

#include "common/protocol.h"
#include "controller/cache_service.h"
#include "controller/fleet.h"
#include "controller/rollout.h"

namespace muster {

class Api {
 public:
  explicit Api(Fleet& fleet, RolloutManager* rollouts = nullptr)
      : fleet_(fleet), rollouts_(rollouts) {}
  // Answers one operator request; when the store stopped answering during it
  // (reads then look empty), the answer is an error saying so instead.
  proto::Response Handle(const Identity& who, const proto::Request& req);
  // Serves cache.* requests from cache (unset: they are refused).
  void SetCache(CacheService* cache) { cache_ = cache; }

 private:
  proto::Response HandleRequest(const Identity& who, const proto::Request& req);
  nlohmann::json MachineJson(const MachineRecord& m);
  Fleet& fleet_;
  RolloutManager* rollouts_;
  CacheService* cache_ = nullptr;
};

}  // namespace muster
