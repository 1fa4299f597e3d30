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
//   subscribe      {}  (handled by the session)  → {} then events
// Thread-safe: stateless apart from the Fleet it calls.
#pragma once

#include "common/protocol.h"
#include "controller/fleet.h"

namespace muster {

class Api {
 public:
  explicit Api(Fleet& fleet) : fleet_(fleet) {}
  proto::Response Handle(const Identity& who, const proto::Request& req);

 private:
  nlohmann::json MachineJson(const MachineRecord& m);
  Fleet& fleet_;
};

}  // namespace muster
