// The controller's durable state behind one narrow interface.
//
// Implementations: SqliteStore (embedded default) and PgStore (PostgreSQL,
// for several controllers sharing one fleet). Every mutating call returns only
// after the change is durable (SQLite WAL with synchronous=FULL; PostgreSQL
// with synchronous_commit=on), so a publish the CLI saw accepted survives a
// crash. Thread-safe: calls may come from any I/O thread; implementations
// serialise internally.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "common/error.h"
#include "common/manifest.h"

namespace muster {

struct MachineRecord {
  std::string name;
  std::string key;  // "ed25519:…"
  std::vector<std::string> tags;
  std::int64_t created_at = 0;  // unix ms
  std::int64_t last_seen = 0;   // unix ms, 0 = never
  nlohmann::json facts = nlohmann::json::object();
  std::int64_t generation = 0;  // generation of the last reported status
  std::string phase = "idle";
  std::string detail;
  std::string toplevel;
  bool reboot_required = false;
  std::int64_t last_applied = 0;
  bool revoked = false;
  // The operator-signed roster entry (EncodeSignedRosterEntry), "" for a
  // machine registered before signed rosters ("unsigned"), and for an enrolled
  // machine its binding (EncodeEnrollBinding), else "".
  std::string roster;
  std::string binding;
};

struct OperatorRecord {
  std::string name;
  std::string key;
  std::int64_t created_at = 0;
};

struct GenerationRecord {
  std::string machine;
  std::int64_t generation = 0;
  SignedManifest manifest;
  std::string vars;  // base64 of the sealed box ("" when none); ciphertext only
  std::string toplevel;
  std::string action;
  std::string rollout;
  std::string published_by;     // operator name
  std::int64_t created_at = 0;  // unix ms (controller clock)
  bool released = true;         // false while a rollout holds it back
};

struct RolloutRecord {
  std::string id;
  std::int64_t created_at = 0;
  std::string created_by;
  int canary = 0;                 // machines in the canary stage
  int max_parallel = 0;           // 0 = unlimited
  int max_failures = 0;           // halt when failures exceed this
  std::string state = "running";  // running | paused | halted | aborted | succeeded
  std::string detail;
  std::int64_t updated_at = 0;
};

struct RolloutItemRecord {
  std::string rollout;
  int position = 0;  // order of release
  std::string machine;
  std::int64_t generation = 0;
  int stage = 1;  // 0 = canary
  std::string state =
      "pending";  // pending | released | succeeded | failed | superseded | cancelled
  std::string detail;
  std::int64_t updated_at = 0;
};

struct EventRecord {
  std::int64_t id = 0;
  std::string machine;
  std::int64_t generation = 0;
  std::string phase;
  std::string detail;
  std::int64_t at = 0;  // unix ms
};

// The arguments of one Store::RecordHello call.
struct HelloWrite {
  std::string name;
  std::int64_t at = 0;
  nlohmann::json facts = nlohmann::json::object();
  std::int64_t last_applied = 0;
};

// One queued delivery of a notification body to one webhook.
struct DeliveryRecord {
  std::int64_t id = 0;
  std::string webhook;  // WebhookRecord::id
  std::string event;    // "deploy" | "rollout" | "offline" | "test"
  std::string body;     // the JSON body, signed as it is
  int attempts = 0;
  std::int64_t created_at = 0;
  std::int64_t next_at = 0;  // unix ms of the next attempt
  std::string last_error;
};

// The arguments of one Store::RecordStatus call.
struct StatusWrite {
  std::string name;
  EventRecord ev;
  std::string toplevel;
  bool reboot_required = false;
  nlohmann::json facts = nullptr;  // null: keep the stored facts
  // Webhook notifications of this report (Fleet's status outbox), queued in
  // the same transaction as the report: a controller that dies once the
  // report is stored has queued them too. The queue keeps at most
  // max_queued deliveries (the oldest go), as EnqueueDeliveries.
  std::vector<DeliveryRecord> deliveries = {};
  std::int64_t max_queued = 0;
};

struct LogRecord {
  std::int64_t id = 0;
  std::string machine;
  std::int64_t generation = 0;
  std::string stream;
  std::string line;
  std::int64_t at = 0;
};

// A webhook target (muster webhook add). The secret keys the HMAC-SHA256
// signature of every body; the controller must hold it to sign.
struct WebhookRecord {
  std::string id;
  std::string url;  // http:// or https://
  std::string secret;
  std::vector<std::string> events;  // "deploy", "rollout", "offline", "test"; empty = all
  std::string created_by;
  std::int64_t created_at = 0;
};

// Queues the webhook deliveries that status writes carry through enqueue (a
// store's inserts in the caller's transaction), under the largest bound any
// of them names, and logs what that bound dropped.
using EnqueueDeliveriesFn =
    std::function<Result<std::int64_t>(const std::vector<DeliveryRecord>&, std::int64_t)>;
Status QueueDeliveriesOf(std::span<const StatusWrite> writes, const EnqueueDeliveriesFn& enqueue);

class Store {
 public:
  virtual ~Store() = default;

  virtual Status AddMachine(const MachineRecord& m) = 0;      // fails if name or key exist
  virtual Status RemoveMachine(const std::string& name) = 0;  // fails if unknown
  virtual Status SetMachineTags(const std::string& name, const std::vector<std::string>& tags) = 0;
  // Replaces tags, roster entry and binding of a machine (its key stays).
  virtual Status SetMachineRoster(const std::string& name, const std::vector<std::string>& tags,
                                  const std::string& roster, const std::string& binding) = 0;
  // Signed removals (tombstones), kept so that an older entry cannot return
  // unnoticed: name → encoded signed entry with "removed": true.
  virtual Status RecordRemoval(const std::string& name, const std::string& roster,
                               std::int64_t signed_at) = 0;
  virtual std::vector<std::pair<std::string, std::string>> ListRemovals() = 0;
  // signedAt of the machine's newest removal, 0 when none.
  virtual std::int64_t RemovalSignedAt(const std::string& name) = 0;
  virtual std::vector<MachineRecord> ListMachines() = 0;
  virtual std::optional<MachineRecord> GetMachine(const std::string& name) = 0;
  // Records a hello: facts, last_seen and the agent's own view of its state.
  virtual Status RecordHello(const std::string& name, std::int64_t at, const nlohmann::json& facts,
                             std::int64_t last_applied) = 0;
  // Several hellos, each durable on return like RecordHello, one result per
  // hello in order. SqliteStore commits them together; this default does not.
  virtual std::vector<Status> RecordHellos(const std::vector<HelloWrite>& writes) {
    std::vector<Status> out;
    out.reserve(writes.size());
    for (const auto& w : writes) out.push_back(RecordHello(w.name, w.at, w.facts, w.last_applied));
    return out;
  }
  virtual Status RecordSeen(const std::string& name, std::int64_t at) = 0;
  // Records a status report: machine row + an event row, in one transaction.
  // facts: null to keep the stored ones.
  virtual Status RecordStatus(const std::string& name, const EventRecord& ev,
                              const std::string& toplevel, bool reboot_required,
                              const nlohmann::json& facts = nullptr) = 0;
  // Records several reports, each durable on return like RecordStatus, with one
  // result per report in order. SqliteStore commits them together (group
  // commit: one fsync); this default records them one by one.
  virtual std::vector<Status> RecordStatuses(const std::vector<StatusWrite>& writes) {
    std::vector<Status> out;
    out.reserve(writes.size());
    for (const auto& w : writes) out.push_back(RecordStatusWrite(w));
    return out;
  }
  // One report with its deliveries. Both backends write them in one
  // transaction; this default (for stores without) queues them after.
  virtual Status RecordStatusWrite(const StatusWrite& w) {
    auto st = RecordStatus(w.name, w.ev, w.toplevel, w.reboot_required, w.facts);
    if (st && !w.deliveries.empty()) {
      if (auto q = EnqueueDeliveries(w.deliveries, w.max_queued); !q) return q.error();
    }
    return st;
  }

  virtual Status AddOperator(const OperatorRecord& op) = 0;
  virtual Status RemoveOperator(const std::string& name) = 0;
  virtual std::vector<OperatorRecord> ListOperators() = 0;

  // Stores a generation; fails with a message containing "not newer" when a
  // generation >= g.generation exists for the machine.
  virtual Status AddGeneration(const GenerationRecord& g) = 0;
  // Several generations in one durable transaction (pipelined publishes); one
  // status per record, in order: one refused (not newer) leaves the others.
  virtual std::vector<Status> AddGenerations(const std::vector<GenerationRecord>& gens) {
    std::vector<Status> out;
    out.reserve(gens.size());
    for (const auto& g : gens) out.push_back(AddGeneration(g));
    return out;
  }
  // The newest released generation (what an agent should run).
  virtual std::optional<GenerationRecord> LatestGeneration(const std::string& machine) = 0;
  // The highest generation number stored, released or not (0 if none).
  virtual std::int64_t MaxGeneration(const std::string& machine) = 0;
  // MaxGeneration of every machine that has a generation, in one read (the
  // roster answer for a fleet; one query per machine cost a round trip each).
  virtual std::map<std::string, std::int64_t> MaxGenerations() {
    std::map<std::string, std::int64_t> out;
    for (const auto& m : ListMachines()) {
      if (std::int64_t n = MaxGeneration(m.name)) out[m.name] = n;
    }
    return out;
  }
  virtual Status ReleaseGeneration(const std::string& machine, std::int64_t generation) = 0;

  // Rollouts: created with their (unreleased) generations in one transaction.
  virtual Status CreateRollout(const RolloutRecord& r, const std::vector<GenerationRecord>& gens,
                               const std::vector<RolloutItemRecord>& items) = 0;
  virtual Status UpdateRollout(const RolloutRecord& r) = 0;
  virtual Status UpdateRolloutItem(const RolloutItemRecord& item) = 0;
  // Many items in one durable transaction (a wave's final reports).
  virtual Status UpdateRolloutItems(const std::vector<RolloutItemRecord>& items) {
    for (const auto& it : items) {
      if (auto st = UpdateRolloutItem(it); !st) return st;
    }
    return Status::Ok();
  }
  // Releases rollout items in one durable transaction: each item's generation
  // is marked released and the item stored as given (a wave of thousands
  // costs one commit, not two per machine).
  virtual Status ReleaseRolloutItems(const std::vector<RolloutItemRecord>& items) {
    for (const auto& it : items) {
      if (auto st = ReleaseGeneration(it.machine, it.generation); !st) return st;
      if (auto st = UpdateRolloutItem(it); !st) return st;
    }
    return Status::Ok();
  }
  // One step of a rollout's driver in one durable transaction: the items that
  // reached a final phase, the wave that this enables (released as by
  // ReleaseRolloutItems) and, when given, the rollout's new state. A wave's
  // final reports and the next wave's release then cost one commit, not three.
  // Backends override it to store all of it or nothing; this version (for
  // test fakes) runs the three writes in turn.
  virtual Status AdvanceRollout(const std::vector<RolloutItemRecord>& finals,
                                const std::vector<RolloutItemRecord>& releases,
                                const RolloutRecord* state) {
    if (!finals.empty()) {
      if (auto st = UpdateRolloutItems(finals); !st) return st;
    }
    if (!releases.empty()) {
      if (auto st = ReleaseRolloutItems(releases); !st) return st;
    }
    return state ? UpdateRollout(*state) : Status::Ok();
  }
  virtual std::optional<RolloutRecord> GetRollout(const std::string& id) = 0;
  virtual std::vector<RolloutRecord> ListRollouts(int limit) = 0;  // newest first
  virtual std::vector<RolloutItemRecord> ListRolloutItems(const std::string& id) = 0;

  // Machine revocation: the key is refused from now on; the record stays.
  virtual Status SetMachineRevoked(const std::string& name, bool revoked) = 0;

  // Enrolment tokens, stored as SHA-256 hashes.
  struct EnrollToken {
    std::string hash;
    std::string machine;
    std::vector<std::string> tags;
    std::int64_t expires_at = 0;
    std::string created_by;
    std::string grant;  // the operator-signed grant (EncodeSignedRosterEntry)
  };
  virtual Status AddEnrollToken(const EnrollToken& t) = 0;
  // Atomically spends a token and registers the machine with key, the token's
  // grant as its roster entry and binding; fails with a message when the token
  // is unknown, spent, expired or for another name.
  virtual Status SpendEnrollToken(const std::string& hash, const std::string& machine,
                                  const std::string& key, const std::string& binding,
                                  std::int64_t now) = 0;
  // The live (unspent, unexpired) token for a machine, if any.
  virtual std::optional<EnrollToken> LiveEnrollToken(const std::string& machine,
                                                     std::int64_t now) = 0;
  virtual int LiveEnrollTokens(std::int64_t now) = 0;
  virtual std::optional<GenerationRecord> GetGeneration(const std::string& machine,
                                                        std::int64_t generation) = 0;
  virtual std::vector<GenerationRecord> ListGenerations(const std::string& machine, int limit) = 0;
  virtual std::vector<EventRecord> ListEvents(const std::string& machine, std::int64_t generation,
                                              int limit) = 0;  // generation 0: all
  // Whether machine has a stored generation with this number (released or not).
  virtual bool HasGeneration(const std::string& machine, std::int64_t generation) = 0;

  // Logs, kept within the byte bounds of StoreLimits per generation and per
  // machine (oldest lines dropped). The caller decides which lines to accept.
  virtual Status AppendLogs(const std::vector<LogRecord>& lines) = 0;
  virtual std::vector<LogRecord> ReadLogs(const std::string& machine, std::int64_t generation,
                                          std::int64_t after_id, int limit) = 0;

  // Whether the store answers (for /healthz): OK, or what is wrong. The
  // embedded store always does.
  virtual Status Ping() { return Status::Ok(); }

  // How many statements have failed since the store was opened. Reads answer
  // empty when the store does not answer; a caller that must not take that for
  // "there is nothing" (a refresh that drops what is missing, a garbage
  // collection) compares this before and after its reads. The embedded store
  // reports 0.
  virtual std::uint64_t Failures() { return 0; }

  // Small key/value settings (schema version, etc.).
  virtual std::optional<std::string> GetSetting(const std::string& key) = 0;
  virtual Status SetSetting(const std::string& key, const std::string& value) = 0;

  // --- Notifications (controller/notifier.h) -------------------------------
  // Webhook targets and the durable queue of deliveries not yet acknowledged.
  // The defaults refuse, so that a backend without them still builds; the
  // notifier then logs why nothing is sent.
  virtual Status AddWebhook(const WebhookRecord& w) {
    (void)w;
    return Err("this store backend does not keep webhooks");
  }
  virtual Status RemoveWebhook(const std::string& id) {  // also drops its queued deliveries
    (void)id;
    return Err("this store backend does not keep webhooks");
  }
  virtual std::vector<WebhookRecord> ListWebhooks() { return {}; }
  // Queues one delivery per webhook in `deliveries`, in one transaction. When
  // the queue would exceed max_queued, the oldest deliveries are dropped
  // first; their number is returned.
  virtual Result<std::int64_t> EnqueueDeliveries(const std::vector<DeliveryRecord>& deliveries,
                                                 std::int64_t max_queued) {
    (void)deliveries;
    (void)max_queued;
    return Err("this store backend does not keep a notification queue");
  }
  // Deliveries whose next_at <= now, oldest first.
  virtual std::vector<DeliveryRecord> DueDeliveries(std::int64_t now, int limit) {
    (void)now;
    (void)limit;
    return {};
  }
  // The earliest next_at in the queue, if any.
  virtual std::optional<std::int64_t> NextDeliveryAt() { return std::nullopt; }
  // After a failed attempt: attempts, next_at and last_error as given.
  virtual Status RescheduleDelivery(const DeliveryRecord& d) {
    (void)d;
    return Err("this store backend does not keep a notification queue");
  }
  // Acknowledged (or given up): removed from the queue.
  virtual Status RemoveDelivery(std::int64_t id) {
    (void)id;
    return Err("this store backend does not keep a notification queue");
  }
  virtual std::int64_t QueuedDeliveries() { return 0; }

  // --- several controllers on one database (PostgreSQL; see cluster.h) ---
  // SQLite serves one controller: these do nothing there.
  //
  // Names this controller in what it writes from now on: the origin of change
  // rows, and presence rows (RecordHello(s) then also records that this
  // controller holds the machine's connection). Reconnects with the name set.
  virtual Status SetControllerId(const std::string& id) {
    (void)id;
    return Status::Ok();
  }
  // A message for the other controllers about `machine`, not kept as state:
  // a preview request for an agent connected elsewhere ({"request": ...}), or
  // a preview report for an operator connected elsewhere ({"report": ...}).
  // It travels as a change row (kind "preview"), so it is pruned with them.
  virtual Status AnnouncePreview(const std::string& machine, const nlohmann::json& message) {
    (void)machine;
    (void)message;
    return Status::Ok();
  }
  // This controller no longer holds the machine's connection.
  virtual Status RecordGone(const std::string& machine) {
    (void)machine;
    return Status::Ok();
  }
  // Machines whose connections ended (name, when): last seen then, and no
  // longer held here (RecordSeen + RecordGone for each). The stores write a
  // batch in one transaction, so that a fleet dropping at once (a network
  // partition, a load balancer restart) costs one commit, not two per machine;
  // this default does not.
  struct Departure {
    std::string name;
    std::int64_t at = 0;
  };
  virtual Status RecordDepartures(const std::vector<Departure>& gone) {
    Status first = Status::Ok();
    for (const auto& d : gone) {
      Status seen = RecordSeen(d.name, d.at);
      Status left = RecordGone(d.name);
      if (first && !seen) first = seen;
      if (first && !left) first = left;
    }
    return first;
  }
};

// What one machine may occupy in the store; enforced on every write, the
// oldest data dropped first (with some slack, so that not every write prunes).
struct StoreLimits {
  // Log bytes per machine and per generation; each line counts its length plus
  // kLogRowOverhead, so that a flood of empty lines is bounded too.
  std::int64_t log_bytes_per_machine = 16 << 20;
  std::int64_t log_bytes_per_generation = 4 << 20;
  static constexpr std::int64_t kLogRowOverhead = 64;
  // Event rows (status reports) per machine. Pruning takes the oldest events
  // outside the newest keep_event_generations generations first, so that those
  // stay whole unless they alone exceed the bound.
  std::int64_t events_per_machine = 2000;
  int keep_event_generations = 10;
};
// A message naming what is wrong with limits, or OK.
Status CheckStoreLimits(const StoreLimits& limits);

// Opens (creating if needed) the SQLite store at path.
Result<std::unique_ptr<Store>> OpenSqliteStore(const std::string& path,
                                               const StoreLimits& limits = {});

// Opens the PostgreSQL store at conninfo (a postgresql:// URI or a libpq
// "key=value" string), applying schema migrations that are missing (once,
// under an advisory lock, however many controllers start together). Fails
// with a message naming the (password-less) address when the server cannot be
// reached or the schema is newer than this controller knows. Strings are
// stored as given, except U+0000, which PostgreSQL text cannot hold: it is
// stored as U+FFFD.
Result<std::unique_ptr<Store>> OpenPostgresStore(const std::string& conninfo,
                                                 const StoreLimits& limits = {});

// Whether spec names a PostgreSQL store (postgresql:// or postgres://).
bool IsPostgresStoreSpec(const std::string& spec);

// Copies an SQLite store (of a stopped controller) into an empty PostgreSQL
// store, in one transaction; returns a summary ("3 machines, 12 generations,
// …") or a message saying what failed (nothing is then copied).
Result<std::string> CopySqliteToPostgres(const std::string& sqlite_path,
                                         const std::string& conninfo);

// OpenPostgresStore for a PostgreSQL spec, else OpenSqliteStore(spec).
Result<std::unique_ptr<Store>> OpenStore(const std::string& spec, const StoreLimits& limits = {});

}  // namespace muster
