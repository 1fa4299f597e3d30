// Operator requests: method name + JSON params in, JSON result or error out.
//
// Methods (params → result):
//   machine.add    {name, key, tags[]}            → {name}
//   machine.remove {name}                         → {name}
//   machine.list   {}                             → {machines: [Machine]}
//   machine.get    {name}                         → {machine: Machine, latestGeneration}
//   machine.tag    {name, tags[]}                 → {name}
//   publish        {manifest, signer, signature, vars} → {machine, generation, online}
//   status         {machine?}                     → {machines: [Machine]}
//   history        {machine, limit?}              → {machine, generations: [{…, events}]}
//   logs           {machine, generation?, after?, limit?} → {generation, lines, last}
//   machine.revoke {name}                         → {name}
//   machine.enroll {name, tags[], ttl?}           → {name, token, expiresAt}
//   rollout.create {items: [{manifest, signer, signature, vars}], canary, maxParallel,
//                   maxFailures}                 → Rollout
//   rollout.list   {limit?}                       → {rollouts: [Rollout]}
//   rollout.status|pause|resume|abort {id}        → Rollout
//   subscribe      {}  (handled by the session)  → {} then events
// Thread-safe: stateless apart from the Fleet it calls.
#pragma once

#include "common/protocol.h"
#include "controller/fleet.h"
#include "controller/rollout.h"

namespace muster {

class Api {
 public:
  explicit Api(Fleet& fleet, RolloutManager* rollouts = nullptr)
      : fleet_(fleet), rollouts_(rollouts) {}
  proto::Response Handle(const Identity& who, const proto::Request& req);

 private:
  nlohmann::json MachineJson(const MachineRecord& m);
  Fleet& fleet_;
  RolloutManager* rollouts_;
};

}  // namespace muster
