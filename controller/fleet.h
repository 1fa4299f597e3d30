// Fleet: who is registered, who is connected, and what each machine should run.
//
// The one place where agent sessions, operator requests and the store meet. No
// networking here: sessions implement AgentChannel / EventSink and call in.
// Thread-safe: methods may be called from any I/O thread.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "common/crypto.h"
#include "common/phase.h"
#include "common/protocol.h"
#include "common/rollout_items.h"
#include "common/roster.h"
#include "controller/store.h"

namespace muster {

// A connected agent, as the fleet sees it. Send and Close are thread-safe and
// never block (they post onto the session's strand).
class AgentChannel {
 public:
  virtual ~AgentChannel() = default;
  virtual void Send(std::string text) = 0;
  virtual void Close(std::string reason) = 0;
};

// A connected operator that asked for live events.
class EventSink {
 public:
  virtual ~EventSink() = default;
  virtual void Deliver(std::string text) = 0;  // thread-safe, non-blocking
  // Whether it also wants events that happened at another controller sharing
  // the database (agents connected there). The webhook notifier does not:
  // that controller notifies for its own agents.
  virtual bool WantsRemoteEvents() const { return true; }
};

// kEnrollee: an unregistered key admitted while enrolment tokens are
// outstanding; it may only use /v1/enroll.
enum class Role { kNone, kMachine, kOperator, kEnrollee };

// Told about agent progress (the rollout manager). Called without Fleet locks.
struct StatusNote {
  std::string machine;
  std::int64_t generation = 0;
  std::string phase;
  std::string detail;
};

class FleetObserver {
 public:
  virtual ~FleetObserver() = default;
  virtual void OnStatus(const std::string& machine, std::int64_t generation,
                        const std::string& phase, const std::string& detail) = 0;
  // The reports of one group commit, in order (by default one by one).
  virtual void OnStatuses(const std::vector<StatusNote>& notes) {
    for (const auto& n : notes) OnStatus(n.machine, n.generation, n.phase, n.detail);
  }
  virtual void OnOnline(const std::string& machine) = 0;
  virtual void OnDirectPublish(const std::string& machine, std::int64_t generation) = 0;
};

// Deploy durations (publish to final report), Prometheus-style buckets.
struct DurationHistogram {
  static constexpr double kBounds[] = {1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600};
  std::uint64_t buckets[std::size(kBounds)] = {};  // cumulative counts per bound
  std::uint64_t count = 0;
  double sum = 0;
  void Observe(double seconds);
};

// Notification lag between controllers (commit of a change at one, its
// reading at another, both on the database's clock), Prometheus-style buckets.
struct LagHistogram {
  static constexpr double kBounds[] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                       0.1,   0.25,   0.5,   1,    2.5,   5};
  std::uint64_t buckets[std::size(kBounds)] = {};  // cumulative counts per bound
  std::uint64_t count = 0;
  double sum = 0;
  void Observe(double seconds);
};

struct Identity {
  Role role = Role::kNone;
  std::string name;
};

struct FleetCounters {
  std::uint64_t publishes = 0;
  std::uint64_t deploys_sent = 0;
  std::uint64_t status_reports = 0;
  std::uint64_t enrolments = 0;
  std::uint64_t revocations = 0;
  DurationHistogram deploy_seconds;
  LagHistogram notification_lag;  // only while clustered
  bool clustered = false;         // one of several controllers on one database
};

class Fleet {
 public:
  using Clock = std::function<std::int64_t()>;  // unix ms

  // What an agent's strings are cut to (at a character boundary, after
  // invalid UTF-8 is replaced) before they reach the store or an event.
  static constexpr std::size_t kMaxDetailBytes = 4096;   // status detail
  static constexpr std::size_t kMaxLogLineBytes = 8192;  // one log line
  static constexpr std::size_t kMaxFactBytes = 256;      // each host fact
  static constexpr std::size_t kMaxPathBytes = 1024;     // reported toplevel
  static constexpr std::size_t kMaxStreamBytes = 32;     // log stream name

  Fleet(Store& store, Clock clock);

  // The largest deploy message agents accept (the controller's
  // --max-message-bytes, which agents' maxMessageBytes must match): Publish and
  // ValidateDeploy refuse a generation whose deploy message is larger.
  void SetMaxDeployBytes(std::size_t n) { max_deploy_bytes_ = n; }
  std::size_t max_deploy_bytes() const { return max_deploy_bytes_; }

  // Loads the key registry from the store. Call once before serving.
  Status Load();
  // Re-reads what another process may change in the store: the operators
  // ('muster-controller operator add') and the number of live enrolment
  // tokens. The controller calls it every second, off the handshake path.
  // Also retries status reports whose write failed (RetryUnstored) and records
  // overdue final phases from hellos (RecordOverdueHelloFinals).
  void Refresh();
  // Status reports are acked to agents, which do not send them again, even
  // when the store failed to write them (a database away): those are kept
  // (at most kMaxUnstored, the oldest dropped first) and written again, in
  // order, before the next report and on every Refresh; once stored, the
  // observer is told of them again (the rollouts record their outcome).
  static constexpr std::size_t kMaxUnstored = 10000;
  void RetryUnstored();
  // A final phase carried by a hello that the store lacks is recorded as a
  // report only if the agent's own report has not arrived within this grace
  // (it normally follows the hello at once, with the real detail); checked on
  // Refresh. Its report was lost with a controller that died before storing it.
  static constexpr std::int64_t kHelloFinalGraceMs = 3000;
  void RecordOverdueHelloFinals();
  std::size_t UnstoredCount() const;

  // Registry lookups, used during the TLS handshake. In memory only: a
  // registered key's identity; kNone for a revoked key; kEnrollee for any other
  // key while enrolment tokens are live.
  Identity Lookup(const PublicKey& key) const;

  // --- agents ---
  // Registers the live channel for a machine (replacing and closing an older
  // one), records the hello and returns the messages to send in order: a
  // welcome, then a deploy if the machine has a generation it has not applied.
  Result<std::vector<std::string>> AgentHello(const std::string& machine, const proto::Hello& hello,
                                              std::shared_ptr<AgentChannel> channel);
  // AgentHello for several agents with one group commit in the store; one
  // result per hello, in order.
  struct HelloRequest {
    std::string machine;
    proto::Hello hello;
    std::shared_ptr<AgentChannel> channel;
  };
  std::vector<Result<std::vector<std::string>>> AgentHellos(
      const std::vector<HelloRequest>& hellos);
  // Records a status report; returns the ack to send.
  Result<std::string> AgentStatus(const std::string& machine, const proto::StatusReport& report);
  // AgentStatus for several reports (machine, report) with one group commit
  // in the store; one result per report, in order.
  std::vector<Result<std::string>> AgentStatuses(
      const std::vector<std::pair<std::string, proto::StatusReport>>& reports);
  // Stores log lines (AgentLogBatch for one message); fails if the generation
  // does not exist for the machine (the lines are dropped) or the store fails.
  Status AgentLogs(const std::string& machine, const proto::LogLines& logs);
  struct LogWrite {
    std::string machine;
    proto::LogLines logs;
  };
  // Stores several log messages in one transaction and broadcasts them. A
  // message for a generation that does not exist for its machine is dropped:
  // false at its index. Fails (nothing stored) when the store does.
  Result<std::vector<bool>> AgentLogBatch(const std::vector<LogWrite>& writes);
  void AgentSeen(const std::string& machine);
  // The machines whose agents are connected to this controller.
  std::vector<std::string> LocalMachines() const;
  void AgentGone(const std::string& machine, const AgentChannel* channel);
  // AgentGone in two steps, for the server: ForgetAgent drops the connection
  // from memory at once (true when it was the machine's current one: then a
  // departure is due) and RecordDepartures writes a batch of them to the
  // store, off the I/O threads (one commit for a fleet dropping at once).
  bool ForgetAgent(const std::string& machine, const AgentChannel* channel);
  void RecordDepartures(const std::vector<Store::Departure>& gone);
  // Connected to this controller or, when several share the database, to
  // another live one (see SetRemotePresence).
  bool IsOnline(const std::string& machine) const;
  std::size_t OnlineCount() const;  // connected to this controller

  // --- other controllers on the same database (cluster.h calls these) ---
  // Replaces the set of machines connected to other live controllers
  // (machine → controller id); machines that came or went are broadcast and
  // the observer told of the ones that came.
  void SetRemotePresence(std::map<std::string, std::string> remote);
  // One presence change at another controller.
  void RemotePresence(const std::string& machine, const std::string& controller, bool online);
  // A generation was released at another controller: pushed to the agent if
  // it is connected here; a direct publish (no rollout) is told to the
  // observer (the rollout driver supersedes rollout items).
  void RemoteDeploy(const std::string& machine, std::int64_t generation);
  void RemoteDeploy(const GenerationRecord& g);  // the same, with the row already read
  // Status reports stored by other controllers: broadcast and told to the
  // observer, in order.
  void RemoteStatuses(const std::vector<EventRecord>& events,
                      const std::vector<bool>& reboot_required);
  void RemoteLogs(const std::string& machine, std::int64_t generation, const std::string& stream,
                  const std::vector<std::string>& lines);
  // Re-reads the machine registry (keys, revocations) after another
  // controller changed it; connections of machines removed or revoked there
  // are closed here.
  void ReloadRegistry();
  void SetClustered(bool on);
  void ObserveNotificationLag(double seconds);

  // --- operators ---
  // Registers a machine without a signed roster entry: what a store from
  // before signed rosters holds ("unsigned"; CLIs refuse to publish to it until
  // an operator signs it). Tests and the load generator use it too.
  Status AddMachine(const std::string& name, const std::string& key,
                    const std::vector<std::string>& tags);
  // Roster changes carry an entry signed by a registered operator; each is
  // refused unless newer (signedAt) than what the controller holds for the
  // machine. The controller checks them for its own consistency only: CLIs
  // verify entries against the operator keys they trust.
  Status AddMachine(const SignedRosterEntry& entry);     // a new machine with its key
  Status UpdateMachine(const SignedRosterEntry& entry);  // tags / (re-)signing; same key
  Status RemoveMachine(const SignedRosterEntry& entry);  // a signed removal
  // Checks an entry's signature and that a registered operator made it,
  // without changing anything (the declarative roster, before a key change).
  Result<RosterEntry> ValidateRosterEntry(const SignedRosterEntry& entry) {
    return CheckEntry(entry);
  }
  Status RemoveMachine(const std::string& name);  // also closes its connection
  Status AddOperator(const std::string& name, const std::string& key);
  // Removes an operator: its key is refused from now on and its open sessions
  // are closed. Refuses to remove the last operator.
  Status RemoveOperator(const std::string& name);
  // An operator session, closed when its operator is removed.
  void OperatorConnected(const std::string& name, std::shared_ptr<AgentChannel> session);
  bool IsOperator(const std::string& name) const;
  // Closes the machine's connection and refuses its key from now on.
  Status RevokeMachine(const std::string& name);
  // The same, with an operator-signed revocation naming the machine's key,
  // which CLIs then see and refuse to seal to.
  Status RevokeMachine(const SignedRosterEntry& entry);
  // Stores an operator-signed enrolment grant (the CLI made the token and keeps
  // it; the controller only sees the grant's public enrolment key).
  Status AddEnrollGrant(const SignedRosterEntry& grant, const std::string& by);
  // Registers key as machine if a live grant exists and proof (the key signed
  // by the grant's enrolment key) verifies; spends the grant.
  Status Enroll(const PublicKey& key, const std::string& machine, const std::string& proof);

  // Marks a held-back generation released and pushes it if the agent is online.
  Status Release(const std::string& machine, std::int64_t generation);
  // Pushes an already released generation to the agent if it is online.
  void Push(const std::string& machine, std::int64_t generation);
  // The same for a record the caller holds (just stored): no store read.
  void Push(const GenerationRecord& g);
  void SetObserver(FleetObserver* o) { observer_ = o; }

  // Validates and stores a signed generation, then pushes it to the machine if
  // connected. Returns the stored record.
  Result<GenerationRecord> Publish(const std::string& operator_name, const proto::Deploy& d);
  // Publish's checks without storing anything.
  Result<GenerationRecord> ValidateDeploy(const std::string& operator_name, const proto::Deploy& d);
  // The same checks for the items of a binary rollout.create, all signed by
  // `signer`: signatures and manifests are checked on every core, the
  // machines looked up in one store read, duplicates refused. All or nothing:
  // one record per item in order, or the first bad item's error naming its
  // position ("item 7 of 10000: …").
  Result<std::vector<GenerationRecord>> ValidateDeploys(const std::string& operator_name,
                                                        const PublicKey& signer,
                                                        const std::vector<RolloutItemView>& items);
  // Stores validated generations (operator name, record) in one group commit,
  // then pushes each to its machine if connected; one result per item.
  std::vector<Status> CommitPublishes(
      const std::vector<std::pair<std::string, GenerationRecord>>& items);

  // Preview before go. A signed preview request is checked here for an early
  // error (each agent checks it again against its own trusted keys): signed
  // by a registered operator, fresh, for a registered machine.
  Result<Manifest> CheckPreview(const SignedManifest& sm) const;
  // Forwards a checked request to the machine: to its connection here, or,
  // when another controller holds it, through the store to that one
  // (false: the machine is offline).
  bool SendPreview(const std::string& machine, const proto::Preview& p);
  // A machine's preview report: every string made valid UTF-8 and bounded,
  // then broadcast as a "preview" event {machine, …report}, here and, for a
  // preview another controller passed on, through the store to the others.
  void AgentPreview(const std::string& machine, proto::PreviewReport r);
  // A preview message another controller passed on (Store::AnnouncePreview):
  // a request for an agent connected here is checked and sent to it (after
  // the preview hook, which lets it fetch the closure from this controller's
  // cache); a report is broadcast as a remote event.
  void RemotePreview(const std::string& machine, const nlohmann::json& message);
  void SetPreviewHook(
      std::function<void(const std::string& machine, const std::string& toplevel)> hook);
  // Called for every agent status report before it is stored, from the
  // thread storing it: what it adds to the write's deliveries is queued in
  // the report's own transaction (webhook notifications of final phases).
  using StatusOutbox = std::function<void(StatusWrite& write)>;
  void SetStatusOutbox(StatusOutbox outbox);

  void Subscribe(std::shared_ptr<EventSink> sink);
  void Unsubscribe(const EventSink* sink);
  // remote: the event happened at another controller (sinks that do not
  // WantsRemoteEvents skip it).
  void Broadcast(const std::string& topic, const nlohmann::json& data, bool remote = false);
  // Whether anyone is subscribed (an event nobody reads need not be built);
  // remote: anyone taking events made from another controller's changes.
  bool Watched(bool remote = false) const;

  Store& store() { return store_; }
  FleetCounters counters() const;
  std::int64_t Now() const { return clock_(); }

  // The deploy message for a record: the bytes proto::Encode(Deploy) gives,
  // written without building a JSON document; and its size, counted without
  // writing it.
  static std::string DeployText(const GenerationRecord& g);
  static std::size_t DeployTextSize(const GenerationRecord& g);

 private:
  // The machine's connection to this controller, if any.
  std::shared_ptr<AgentChannel> LocalChannel(const std::string& machine) const;
  // ValidateDeploy's checks that need no store or lock: signature, manifest,
  // vars hash and the deploy message's size. sealed: the raw box; the record
  // keeps vars_b64. Thread-safe.
  Result<GenerationRecord> CheckSigned(const std::string& operator_name, const PublicKey& signer,
                                       SignedManifest sm, std::string_view sealed,
                                       std::string vars_b64) const;
  // Applies a machine list to keys_/revoked_ (under mu_); returns the local
  // channels of machines no longer allowed.
  std::vector<std::shared_ptr<AgentChannel>> ApplyMachinesLocked(
      const std::vector<MachineRecord>& machines);
  // Drops operators (under mu_) and returns their sessions to close.
  std::vector<std::shared_ptr<AgentChannel>> DropOperatorLocked(const std::string& name);
  Status Register(const std::string& name, const std::string& key,
                  const std::vector<std::string>& tags, const std::string& roster);
  // Checks an entry's signature and that a registered operator signed it.
  Result<RosterEntry> CheckEntry(const SignedRosterEntry& entry);
  // signedAt of the entry the controller holds for a machine (0: unsigned).
  static std::int64_t HeldSignedAt(const MachineRecord& m);
  // What follows a durable hello: welcome, pending deploy, events, observer.
  // A report for the final phase a hello carries when the store has a
  // different phase for that generation (its report was lost), else nullopt.
  std::optional<proto::StatusReport> MissedFinalReport(const std::string& machine,
                                                       const proto::Hello& hello);
  std::vector<std::string> AfterHello(const std::string& machine, const proto::Hello& hello);
  // What follows a durable status report: counters, events, observer; the ack.
  Result<std::string> AfterStatus(const std::string& machine, const proto::StatusReport& r,
                                  Phase phase, const EventRecord& ev);

  // Counts a deploy sent and remembers its generation and publish time for
  // the machine (under mu_).
  void NoteSentLocked(const GenerationRecord& g);

  Store& store_;
  Clock clock_;
  mutable std::mutex mu_;
  std::map<std::string, Identity> keys_;  // key text → identity (machines and operators)
  std::set<std::string> revoked_;         // machine names whose keys were revoked
  std::set<std::string> revoked_keys_;    // their keys (refused, never enrollees)
  std::uint64_t operators_changed_ = 0;   // bumped by AddOperator (see Refresh)
  std::map<std::string, std::weak_ptr<AgentChannel>> online_;
  // machine → (generation, created_at) of the last deploy sent from here.
  std::map<std::string, std::pair<std::int64_t, std::int64_t>> sent_;
  std::map<std::string, std::string> remote_online_;  // machine → other controller
  std::map<std::string, std::string> operators_;      // name → key text
  std::multimap<std::string, std::weak_ptr<AgentChannel>> operator_sessions_;
  std::vector<std::weak_ptr<EventSink>> sinks_;
  FleetCounters counters_;
  std::mutex retry_mu_;                // one retry at a time, in order
  std::vector<StatusWrite> unstored_;  // under mu_
  struct PendingFinal {
    std::string machine;
    proto::Hello hello;
    std::int64_t due_ms;
  };
  std::vector<PendingFinal> pending_finals_;  // under mu_, at most kMaxUnstored
  FleetObserver* observer_ = nullptr;
  std::function<void(const std::string&, const std::string&)> preview_hook_;
  std::shared_ptr<const StatusOutbox> outbox_;  // under mu_
  // Ids of previews another controller passed on (RemotePreview), whose
  // reports go back through the store; oldest first, bounded.
  std::deque<std::string> remote_previews_;
  int live_tokens_ = 0;  // as of the last Refresh, AddEnrollGrant or Enroll
  std::size_t max_deploy_bytes_ = kDefaultMaxMessageBytes;
};

}  // namespace muster
