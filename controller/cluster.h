// Several controllers serving one fleet at the same time, on one PostgreSQL
// database.
//
// Each controller on a PostgreSQL store runs one Cluster: a thread with its
// own database connection that
//  - LISTENs on `muster_changes`. Triggers (pg_store.cc, migration 2) write a
//    row into `changes` for every change another controller must act on, in
//    the transaction of the change itself, and NOTIFY on commit with the
//    newest id as payload. The thread reads the rows after the last id it
//    applied (catch-up by sequence number): a missed notification, or a
//    reconnect after the database was away, costs latency, never a change.
//    An id missing in the middle (a transaction still open, or rolled back) is
//    waited for until every transaction that was open when it was first seen
//    has ended, so that changes are applied in commit order without loss.
//  - applies what others changed: a released generation is pushed to its
//    agent if connected here; status reports, logs and rollout progress reach
//    this controller's operator event streams; the rollout driver sees reports
//    of agents connected anywhere; roster and operator changes reload the
//    registry used by the TLS handshake.
//  - renews this controller's row in `controllers` (its lease); presence rows
//    (which controller holds which agent's connection) count only while their
//    controller's lease is unexpired, so a controller that dies without
//    cleaning up drops out of "online" within the lease.
//  - holds or tries to take the rollout driver's lease (`leases`): exactly
//    one controller at a time releases machines (RolloutManager::SetDriving);
//    the store refuses a release from a controller without the lease, and
//    releases an item only from "pending".
//
// SQLite serves one controller: no Cluster is made for it, and nothing here
// runs. Thread-safety: Open, Start and Stop from one thread; the rest is
// internal to the thread.
#pragma once

#include <chrono>
#include <memory>
#include <string>

#include "common/error.h"
#include "controller/fleet.h"
#include "controller/rollout.h"

namespace muster {

struct ClusterOptions {
  std::string conninfo;  // the PostgreSQL store's
  std::string id;        // this controller; unique per process (NewClusterId)
  // How often leases are renewed and changes read even without a
  // notification; a lease lasts `lease` from its last renewal.
  std::chrono::milliseconds tick{500};
  std::chrono::milliseconds lease{3000};
  // Change rows older than this are deleted (by the driver); a controller
  // away from the database for longer reloads its state instead of catching up.
  std::chrono::milliseconds retention{15 * 60 * 1000};
};

// "<host>-<pid>-<random>", made of letters, digits, '-' and '.'.
std::string NewClusterId();

class Cluster {
 public:
  Cluster(Fleet& fleet, RolloutManager& rollouts, ClusterOptions options);
  ~Cluster();
  Cluster(const Cluster&) = delete;
  Cluster& operator=(const Cluster&) = delete;

  // Connects, notes the newest change id (changes after it are applied), and
  // renews the leases once. Call before the fleet is loaded, so that nothing
  // committed between the load and the first read is missed. Fails with a
  // message naming what went wrong.
  Status Open();
  // Starts the thread.
  void Start();
  // Stops the thread and gives up this controller's presence rows and leases
  // (another controller takes over at once instead of after the lease).
  void Stop();

  const std::string& id() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace muster
