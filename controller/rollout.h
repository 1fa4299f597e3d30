// Staged rollouts: one publish over many machines, released in stages.
//
// A rollout holds one signed generation per machine, stored unreleased. The
// canary stage (the first `canary` machines) is released first; when every
// canary has finished, the rest follow in waves of at most `max_parallel`
// machines in flight. Only machines that are online are released; offline ones
// stay pending and are released when they connect (unless the rollout was
// aborted). When more than `max_failures` machines fail, the rollout halts:
// nothing further is released. State lives in the store and survives a
// controller restart. The semantics follow Kubernetes Deployments (max
// unavailable, pause, progress) rather than any Nix deployer.
//
// Schedule() is the pure decision; RolloutManager applies it. The manager is
// thread-safe (one mutex) and is the Fleet's observer.
#pragma once

#include <functional>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "controller/fleet.h"
#include "controller/store.h"

namespace muster {

struct ScheduleResult {
  std::vector<int> release;  // positions to release now
  std::string state;         // new rollout state
  std::string detail;
};

// Decides what to release given the rollout and its items; `online` says
// whether a machine is connected.
ScheduleResult Schedule(const RolloutRecord& r, const std::vector<RolloutItemRecord>& items,
                        const std::function<bool(const std::string&)>& online);

// "succeeded" | "failed" | "" (not final) for an agent phase.
std::string ItemOutcome(const std::string& phase);

struct RolloutSpec {
  std::string created_by;
  int canary = 0;
  int max_parallel = 0;
  int max_failures = 0;
  std::vector<GenerationRecord> generations;  // validated, one per machine, in order
};

class RolloutManager : public FleetObserver {
 public:
  RolloutManager(Fleet& fleet, Store& store);

  // Re-evaluates every active rollout (at start-up, and when this controller
  // becomes the driver): items released whose machine has meanwhile reported
  // its final phase for that generation are settled from the store first (a
  // report that reached no driver is not lost).
  void Resume();

  // Several controllers on one database: only the one holding the driver's
  // lease releases machines and records final reports (cluster.h). The others
  // store new rollouts and state changes (the driver reads them) and broadcast
  // what they change. Default (one controller): driving.
  void SetDriving(bool driving);
  bool Driving();
  // A rollout (created, its state or an item changed) by another controller:
  // the driver re-reads and re-evaluates it; every controller broadcasts the
  // items that changed to its watchers.
  void OnRemoteChange(const std::string& id, const std::vector<int>& positions);

  Result<RolloutRecord> Create(RolloutSpec spec);
  Status Pause(const std::string& id);
  Status Continue(const std::string& id);  // resume a paused rollout
  Status Abort(const std::string& id);
  nlohmann::json Describe(const std::string& id);  // null when unknown
  // Describe without the items (state, counts, total): what rollout.create
  // answers, so that the answer does not grow with the fleet.
  nlohmann::json Summary(const std::string& id);
  nlohmann::json List(int limit);

  // FleetObserver
  void OnStatus(const std::string& machine, std::int64_t generation, const std::string& phase,
                const std::string& detail) override;
  void OnStatuses(const std::vector<StatusNote>& notes) override;
  void OnOnline(const std::string& machine) override;
  void OnDirectPublish(const std::string& machine, std::int64_t generation) override;

 private:
  // Applies Schedule() to a rollout; `changed` are item positions already
  // updated by the caller (they go into the broadcast event).
  // `finals` (items of an active rollout that reached a final phase, not yet
  // stored) are written in the same transaction as the release they enable.
  void EvaluateLocked(const std::string& id, std::vector<int> changed = {},
                      std::vector<RolloutItemRecord> finals = {});
  // Moves a rollout from state `from` to `to`, then re-evaluates it.
  Status Transition(const std::string& id, const std::string& from, const std::string& to,
                    const std::string& detail);

  // Active rollouts are kept in memory (written through to the store), with
  // an index machine → (rollout, item position), so that a report costs a map
  // lookup, and one from a machine outside any rollout costs nothing. Rebuilt
  // from the store when rollouts are created or change state.
  //
  // A rollout created here also holds its generation records (by position)
  // until each is released, so that a wave is pushed without reading every
  // record back; at most kMaxHeldBytes over all rollouts (beyond that, and
  // after a restart, released records are read from the store).
  struct ActiveRollout {
    RolloutRecord record;
    std::vector<RolloutItemRecord> items;
    std::vector<GenerationRecord> held;  // empty, or one per position ("" once pushed)
    // Final phases applied here whose write failed: written with the next step.
    std::vector<RolloutItemRecord> unstored;
  };
  static constexpr std::size_t kMaxHeldBytes = 256u << 20;
  static std::size_t HeldBytes(const GenerationRecord& g);
  std::size_t held_bytes_ = 0;
  void ReindexLocked();
  std::map<std::string, ActiveRollout> active_;
  std::map<std::string, std::vector<std::pair<std::string, int>>> by_machine_;
  nlohmann::json DescribeLocked(const RolloutRecord& r, const std::vector<RolloutItemRecord>& items,
                                const std::vector<int>* only);
  nlohmann::json DescribeLocked(const RolloutRecord& r,
                                const std::vector<RolloutItemRecord>& items);
  std::vector<std::string> ActiveIds();

  Fleet& fleet_;
  Store& store_;
  std::mutex mu_;
  std::uint64_t seq_ = 0;
  bool driving_ = true;
};

}  // namespace muster
