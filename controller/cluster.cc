#include "controller/cluster.h"

#include <libpq-fe.h>
#include <poll.h>
#include <spdlog/spdlog.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <atomic>
#include <cctype>
#include <cstdlib>
#include <map>
#include <random>
#include <set>
#include <thread>
#include <vector>

#include "common/json_limits.h"
#include "controller/pg_result.h"

namespace muster {

namespace {

using Clock = std::chrono::steady_clock;

using pg::Res;
using pg::TextArray;

// The changes after $1, at most $2, with the reading snapshot's xmin (and xmax;
// to tell a gap that may still fill from one that cannot) and, for a status
// change, its event row and the machine's reboot flag. One row with a null id
// when there is nothing new. Changes this controller made ($3 is its id) are
// read for their ids only: it acted on them already. Each joined row is
// looked up by its key, once per change (LATERAL ... OFFSET 0 keeps the
// planner from hashing the whole events table for 500 changes: 20-30 ms a
// read, against about 1 ms, measured on 80,000 events).
#define MUSTER_CHANGES_QUERY(ROWS)                                                         \
  "WITH s AS (SELECT pg_snapshot_xmin(pg_current_snapshot())::TEXT::BIGINT AS xmin, "      \
  "pg_snapshot_xmax(pg_current_snapshot())::TEXT::BIGINT AS xmax, muster_now() AS now) "   \
  "SELECT s.xmin, s.xmax, c.id, c.kind, c.subject, c.generation, c.ref, c.ref2, c.extra, " \
  "c.origin, s.now - c.at, e.phase, e.detail, e.at, COALESCE(m.reboot_required, 0), "      \
  "c.xact::TEXT, " MUSTER_PG_GENERATION_COLUMNS(                                           \
      "g.") " FROM s LEFT JOIN LATERAL (" ROWS                                             \
            ") c ON TRUE LEFT JOIN LATERAL (SELECT * FROM events WHERE c.kind = 'status' " \
            "AND c.origin <> $3 AND id = c.ref OFFSET 0) e ON TRUE "                       \
            "LEFT JOIN LATERAL (SELECT * FROM generations WHERE c.kind = 'deploy' AND "    \
            "c.origin <> $3 AND machine = c.subject AND generation = c.generation "        \
            "OFFSET 0) g ON TRUE LEFT JOIN LATERAL (SELECT reboot_required FROM machines " \
            "WHERE c.kind = 'status' AND c.origin <> $3 AND name = c.subject OFFSET 0) m " \
            "ON TRUE ORDER BY c.id"
constexpr const char* kChangesQuery =
    MUSTER_CHANGES_QUERY("SELECT * FROM changes WHERE id > $1 ORDER BY id LIMIT $2");
// The same, for the changes at or below $1 written by the transactions $2
// (an xid8 array): see Cluster::Impl::ReadLateChanges.
constexpr const char* kLateChangesQuery = MUSTER_CHANGES_QUERY(
    "SELECT * FROM changes WHERE id <= $1 AND xact = ANY($2::xid8[]) ORDER BY id");
#undef MUSTER_CHANGES_QUERY
constexpr int kBatch = 500;
constexpr std::chrono::milliseconds kGapPoll{5};

// "{1,2}" → {"1","2"}: the text of a PostgreSQL array of numbers.
std::set<std::string> NumberArray(const std::string& text) {
  std::set<std::string> out;
  std::string cur;
  for (char c : text) {
    if (std::isdigit(static_cast<unsigned char>(c))) {
      cur += c;
    } else if (!cur.empty()) {
      out.insert(cur);
      cur.clear();
    }
  }
  if (!cur.empty()) out.insert(cur);
  return out;
}

std::string JoinArray(const std::set<std::string>& items) {
  std::string out = "{";
  for (const auto& i : items) out += (out.size() > 1 ? "," : "") + i;
  return out + "}";
}

}  // namespace

std::string NewClusterId() {
  char host[256] = {};
  if (gethostname(host, sizeof host - 1) != 0) host[0] = '\0';
  std::string h;
  for (const char* p = host; *p && h.size() < 40; ++p) {
    unsigned char c = static_cast<unsigned char>(*p);
    h += (std::isalnum(c) || c == '-' || c == '.') ? static_cast<char>(c) : '-';
  }
  if (h.empty()) h = "controller";
  std::mt19937_64 rng{std::random_device{}()};
  char tail[32];
  std::snprintf(tail, sizeof tail, "-%d-%06llx", static_cast<int>(getpid()),
                static_cast<unsigned long long>(rng() & 0xffffff));
  return h + tail;
}

struct Cluster::Impl {
  Impl(Fleet& f, RolloutManager& r, ClusterOptions o) : fleet(f), rollouts(r), opt(std::move(o)) {}

  Fleet& fleet;
  RolloutManager& rollouts;
  ClusterOptions opt;
  PGconn* conn = nullptr;
  int wake_fd = -1;
  std::atomic<bool> stop{false};
  std::thread thread;

  std::int64_t last = 0;  // the last change id applied (or skipped as a gap)
  // The start-up window. Change ids are taken when a row is written, not at
  // commit, so a transaction open when this controller started may commit
  // a change numbered below `last` after it was read: the normal reading
  // (ids above `last`) would never see it. Open notes the transactions then
  // in progress (the snapshot's xip list, bounded by max_connections) and
  // `late_below` = `last`; every read then also looks for change rows at or
  // below it written by those transactions (the `xact` column, migration 3).
  // A transaction's rows become visible together, so one that showed rows,
  // or is no longer in progress, is done with; the window closes when none
  // is left. Exact, not a time guess: a transaction held open for minutes is
  // still caught (while its rows are within the change retention).
  std::int64_t late_below = 0;
  std::set<std::string> late_xacts;
  std::int64_t gap_xid = 0;     // while waiting for a gap after `last`: an xid assigned then
  Clock::time_point gap_since;  // and when it was first seen
  bool driving = false;
  Clock::time_point lease_ok{};       // last successful renewal of the driver lease
  Clock::time_point next_connect{};   // reconnect attempts, at most once a second
  Clock::time_point next_presence{};  // full presence refresh
  Clock::time_point next_reassert{};  // re-writing our own presence rows
  Clock::time_point next_prune{};
  bool down_logged = false;

  ~Impl() {
    if (conn) PQfinish(conn);
    if (wake_fd >= 0) close(wake_fd);
  }

  template <typename... Args>
  Res Q(const char* sql, const Args&... args) {
    std::vector<std::string> params{args...};
    std::vector<const char*> ptrs;
    for (const auto& p : params) ptrs.push_back(p.c_str());
    return Res(PQexecParams(conn, sql, static_cast<int>(ptrs.size()), nullptr, ptrs.data(), nullptr,
                            nullptr, 0));
  }

  void Drop(const std::string& why) {
    if (!down_logged) {
      spdlog::warn("cluster: lost the database ({}); catching up when it is back", why);
      down_logged = true;
    }
    if (conn) PQfinish(conn);
    conn = nullptr;
  }

  Status Connect() {
    const std::string options =
        "-c statement_timeout=10000 -c client_min_messages=warning -c muster.controller=" + opt.id;
    if (conn) PQfinish(conn);
    conn = pg::Connect(opt.conninfo, "muster-controller-cluster", "5", options);
    if (conn == nullptr || PQstatus(conn) != CONNECTION_OK) {
      std::string e = pg::ConnectionError(conn);
      if (conn) PQfinish(conn);
      conn = nullptr;
      return Err("cluster: cannot connect to PostgreSQL: " + e);
    }
    if (auto r = Q("LISTEN muster_changes"); !r.ok()) {
      std::string e = r.error();
      PQfinish(conn);
      conn = nullptr;
      return Err("cluster: LISTEN failed: " + e);
    }
    return Status::Ok();
  }

  // After a reconnect: were changes after `last` pruned meanwhile? Then
  // catching up by sequence cannot work: reload what is kept in memory.
  void AfterReconnect() {
    auto r = Q("SELECT value FROM settings WHERE key = 'changes_pruned_below'");
    std::int64_t pruned = r.rows() == 1 ? std::strtoll(r.Text(0, 0).c_str(), nullptr, 10) : 0;
    if (pruned > last + 1) {
      spdlog::warn("cluster: changes {}..{} were pruned while away; reloading the registry",
                   last + 1, pruned - 1);
      last = pruned - 1;
      gap_xid = 0;
      fleet.ReloadRegistry();
      fleet.Refresh();
      rollouts.Resume();
      for (const auto& m : fleet.LocalMachines()) {
        if (auto g = fleet.store().LatestGeneration(m)) {
          auto rec = fleet.store().GetMachine(m);
          if (rec && g->generation > rec->last_applied && g->generation != rec->generation) {
            fleet.Push(m, g->generation);
          }
        }
      }
    }
    next_presence = {};
    next_reassert = {};
  }

  bool EnsureConnected() {
    if (conn && PQstatus(conn) == CONNECTION_OK) return true;
    auto now = Clock::now();
    if (now < next_connect) return false;
    next_connect = now + std::chrono::seconds(1);
    if (auto st = Connect(); !st) {
      Drop(st.message());
      return false;
    }
    if (down_logged) spdlog::info("cluster: database reachable again; catching up");
    down_logged = false;
    AfterReconnect();
    return true;
  }

  // The start-up window (see late_xacts): changes at or below late_below of
  // transactions that were open when this controller started.
  void ReadLateChanges() {
    if (late_xacts.empty()) return;
    // First which of them have ended, then their rows: a transaction that
    // ended as seen by the first statement's snapshot has its rows in the
    // second's.
    Res st =
        Q("SELECT x::TEXT FROM unnest($1::xid8[]) AS x WHERE pg_visible_in_snapshot(x, "
          "pg_current_snapshot())",
          JoinArray(late_xacts));
    if (!st.ok()) return Drop(st.error());
    std::set<std::string> ended;
    for (int i = 0; i < st.rows(); ++i) ended.insert(st.Text(i, 0));
    Res r = Q(kLateChangesQuery, std::to_string(late_below), JoinArray(late_xacts), opt.id);
    if (!r.ok()) return Drop(r.error());
    Batch b;
    for (int i = 0; i < r.rows(); ++i) {
      if (r.Null(i, 2)) break;
      ended.insert(r.Text(i, 15));
      Collect(r, i, b);
    }
    Apply(b);
    for (const auto& x : ended) late_xacts.erase(x);
    if (late_xacts.empty()) spdlog::debug("cluster: start-up window closed");
  }

  // Reads and applies changes after `last` until none are left.
  void ReadChanges() {
    ReadLateChanges();
    if (!conn) return;
    for (int round = 0; round < 1000 && !stop; ++round) {
      Res r = Q(kChangesQuery, std::to_string(last), std::to_string(kBatch), opt.id);
      if (!r.ok()) return Drop(r.error());
      int n = r.rows();
      if (n == 0) return;
      std::int64_t xmin = r.Int(0, 0);
      Batch b;
      int taken = 0;
      for (int i = 0; i < n; ++i) {
        if (r.Null(i, 2)) break;  // nothing new
        std::int64_t id = r.Int(i, 2);
        if (id != last + 1) {
          // A gap: an id taken by a transaction still open (its change is
          // coming) or rolled back (never). Wait until every transaction that
          // had begun when the gap was first seen has ended; then it cannot
          // fill. Those are the ones older than an id assigned now: the
          // snapshot's xmax is one past the newest *completed* transaction, so
          // an open one newer than that is in none of its lists, and waiting
          // for xmin to pass xmax skipped its change (measured: 15 deploys of
          // 10,000 lost under 200 publishes/s).
          if (gap_xid == 0) {
            Res x = Q("SELECT pg_current_xact_id()::TEXT::BIGINT");
            if (x.rows() != 1) {
              Apply(b);
              return Drop(x.error());
            }
            gap_xid = x.Int(0, 0);
            gap_since = Clock::now();
          }
          bool settled = xmin >= gap_xid || Clock::now() - gap_since > std::chrono::seconds(60);
          if (!settled) break;
          spdlog::debug("cluster: change ids {}..{} never came (rolled back); going on", last + 1,
                        id - 1);
        }
        gap_xid = 0;
        last = id;
        ++taken;
        Collect(r, i, b);
      }
      Apply(b);
      if (taken < kBatch) return;
    }
  }

  struct Batch {
    std::vector<EventRecord> statuses;
    std::vector<bool> reboot;
    bool registry = false;
    bool operators = false;
    std::map<std::string, std::vector<int>> rollouts;
  };

  void FlushStatuses(Batch& b) {
    if (b.statuses.empty()) return;
    fleet.RemoteStatuses(b.statuses, b.reboot);
    b.statuses.clear();
    b.reboot.clear();
  }

  void Collect(const Res& r, int i, Batch& b) {
    std::string kind = r.Text(i, 3), subject = r.Text(i, 4), extra = r.Text(i, 8),
                origin = r.Text(i, 9);
    std::int64_t generation = r.Int(i, 5), ref = r.Int(i, 6), ref2 = r.Int(i, 7);
    if (origin == opt.id) return;  // done here already
    fleet.ObserveNotificationLag(static_cast<double>(std::max<std::int64_t>(0, r.Int(i, 10))) /
                                 1000.0);
    if (kind == "status") {
      if (r.Null(i, 11)) return;  // the event was pruned meanwhile
      EventRecord ev;
      ev.id = ref;
      ev.machine = subject;
      ev.generation = generation;
      ev.phase = r.Text(i, 11);
      ev.detail = r.Text(i, 12);
      ev.at = r.Int(i, 13);
      b.statuses.push_back(std::move(ev));
      b.reboot.push_back(r.Int(i, 14) != 0);
      return;
    }
    FlushStatuses(b);  // keep the order of reports and what follows them
    if (kind == "deploy") {
      // The row was read with the change (columns 16 on): no query on the
      // store's own connection per machine, which its agents' reports keep busy.
      if (!r.Null(i, 16)) fleet.RemoteDeploy(pg::ReadGeneration(r, i, 16));
    } else if (kind == "log") {
      Res l =
          Q("SELECT line FROM logs WHERE id BETWEEN $1 AND $2 AND machine = $3 AND "
            "generation = $4 AND stream = $5 ORDER BY id",
            std::to_string(ref), std::to_string(ref2), subject, std::to_string(generation), extra);
      std::vector<std::string> lines;
      for (int k = 0; k < l.rows(); ++k) lines.push_back(l.Text(k, 0));
      if (!lines.empty()) fleet.RemoteLogs(subject, generation, extra, lines);
    } else if (kind == "machine") {
      b.registry = true;
    } else if (kind == "operator") {
      b.operators = true;
    } else if (kind == "rollout") {
      b.rollouts[subject];
    } else if (kind == "rollout_item") {
      b.rollouts[subject].push_back(static_cast<int>(ref));
    } else if (kind == "online" || kind == "offline") {
      if (extra != opt.id) fleet.RemotePresence(subject, extra, kind == "online");
    } else if (kind == "preview") {
      // A preview report holds bounded lists (proto::kMaxPreviewItems).
      if (auto m = ParseJsonBounded(extra, 16u << 20)) fleet.RemotePreview(subject, *m);
    }
  }

  void Apply(Batch& b) {
    FlushStatuses(b);
    if (b.registry) fleet.ReloadRegistry();
    if (b.operators) fleet.Refresh();
    for (auto& [id, positions] : b.rollouts) rollouts.OnRemoteChange(id, positions);
  }

  // Leases, presence, pruning; every tick.
  void Tick() {
    auto now = Clock::now();
    const std::string lease_ms = std::to_string(opt.lease.count());
    // This controller's own lease: its presence rows count while it holds.
    auto u =
        Q("UPDATE controllers SET expires_at = muster_now() + $2 WHERE id = $1 AND "
          "expires_at > muster_now()",
          opt.id, lease_ms);
    if (!u.ok()) return Drop(u.error());
    if (u.changes() == 0) {
      // New, or lapsed (the database was away): another controller may have
      // deleted our presence rows as a dead controller's; write them again.
      auto i =
          Q("INSERT INTO controllers (id, started_at, expires_at) VALUES ($1, muster_now(), "
            "muster_now() + $2) ON CONFLICT (id) DO UPDATE SET expires_at = "
            "excluded.expires_at",
            opt.id, lease_ms);
      if (!i.ok()) return Drop(i.error());
      next_reassert = {};
    }
    if (now >= next_reassert) {
      ReassertPresence();
      next_reassert = now + std::chrono::seconds(10);
    }
    // The rollout driver's lease: renewed by its holder, taken once expired.
    auto l =
        Q("INSERT INTO leases (name, holder, expires_at) VALUES ('rollouts', $1, "
          "muster_now() + $2) ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, "
          "expires_at = excluded.expires_at WHERE leases.holder = excluded.holder OR "
          "leases.expires_at < muster_now() RETURNING holder",
          opt.id, lease_ms);
    if (!l.ok()) return Drop(l.error());
    if (l.rows() == 1) lease_ok = now;
    SetDriving(l.rows() == 1);
    if (driving) {
      // Presence of controllers that died without cleaning up.
      (void)Q(
          "DELETE FROM presence WHERE controller NOT IN (SELECT id FROM controllers WHERE "
          "expires_at > muster_now())");
      if (now >= next_prune) {
        Prune();
        next_prune = now + std::chrono::seconds(60);
      }
    }
    if (now >= next_presence) {
      RefreshPresence();
      next_presence = now + std::chrono::seconds(2);
    }
  }

  void SetDriving(bool d) {
    if (d == driving) return;
    driving = d;
    rollouts.SetDriving(d);
  }

  // Without the database the lease cannot be renewed: past its expiry, this
  // controller no longer counts itself the driver (another may be).
  void CheckLeaseWhileAway() {
    if (driving && Clock::now() - lease_ok > opt.lease) SetDriving(false);
  }

  void ReassertPresence() {
    auto mine = fleet.LocalMachines();
    auto a = TextArray(mine);
    (void)Q(
        "INSERT INTO presence (machine, controller, since) SELECT m, $1, muster_now() FROM "
        "unnest($2::TEXT[]) AS m WHERE m IN (SELECT name FROM machines) ON CONFLICT "
        "(machine) DO UPDATE SET controller = excluded.controller WHERE presence.controller "
        "<> excluded.controller",
        opt.id, a);
    (void)Q("DELETE FROM presence WHERE controller = $1 AND NOT (machine = ANY($2::TEXT[]))",
            opt.id, a);
  }

  void RefreshPresence() {
    auto r =
        Q("SELECT p.machine, p.controller FROM presence p JOIN controllers c ON c.id = "
          "p.controller WHERE c.expires_at > muster_now() AND p.controller <> $1",
          opt.id);
    if (!r.ok()) return Drop(r.error());
    std::map<std::string, std::string> remote;
    for (int i = 0; i < r.rows(); ++i) remote[r.Text(i, 0)] = r.Text(i, 1);
    fleet.SetRemotePresence(std::move(remote));
  }

  void Prune() {
    auto d =
        Q("WITH d AS (DELETE FROM changes WHERE at < muster_now() - $1 RETURNING id) "
          "SELECT COALESCE(MAX(id), 0) FROM d",
          std::to_string(opt.retention.count()));
    if (d.rows() == 1 && d.Int(0, 0) > 0) {
      (void)Q(
          "INSERT INTO settings (key, value) VALUES ('changes_pruned_below', $1) ON "
          "CONFLICT (key) DO UPDATE SET value = GREATEST(settings.value::BIGINT, "
          "excluded.value::BIGINT)::TEXT",
          std::to_string(d.Int(0, 0) + 1));
    }
    (void)Q("DELETE FROM controllers WHERE expires_at < muster_now() - 3600000");
  }

  void Run() {
    auto next_tick = Clock::now();
    bool pending = true;
    while (!stop) {
      if (!EnsureConnected()) {
        CheckLeaseWhileAway();
        Wait(-1, std::chrono::milliseconds(200));
        continue;
      }
      auto now = Clock::now();
      if (now >= next_tick) {
        Tick();
        next_tick = now + opt.tick;
        pending = true;  // a read each tick, notification or not
      }
      if (!conn) continue;
      if (pending) {
        ReadChanges();
        pending = false;
      }
      if (!conn) continue;
      auto wait = std::chrono::duration_cast<std::chrono::milliseconds>(next_tick - Clock::now());
      // Waiting at a gap: the transactions it waits for may end without a
      // notification (one that wrote no change row), so look again soon
      // rather than at the next tick; under load a gap lasts milliseconds.
      const bool at_gap = gap_xid != 0;
      if (at_gap) wait = std::min(wait, kGapPoll);
      Wait(PQsocket(conn), std::max(wait, std::chrono::milliseconds(0)));
      if (at_gap) pending = true;
      if (stop || !conn) continue;
      if (PQconsumeInput(conn) == 0) {
        Drop(PQerrorMessage(conn));
        continue;
      }
      while (PGnotify* n = PQnotifies(conn)) {
        pending = true;
        PQfreemem(n);
      }
    }
    if (conn && PQstatus(conn) == CONNECTION_OK) {
      // Leaving: others take over now, not after the lease.
      (void)Q("DELETE FROM presence WHERE controller = $1", opt.id);
      (void)Q("DELETE FROM leases WHERE holder = $1", opt.id);
      (void)Q("DELETE FROM controllers WHERE id = $1", opt.id);
    }
  }

  void Wait(int fd, std::chrono::milliseconds timeout) {
    pollfd fds[2] = {{wake_fd, POLLIN, 0}, {fd, POLLIN, 0}};
    int n = fd >= 0 ? 2 : 1;
    (void)poll(fds, static_cast<nfds_t>(n), static_cast<int>(timeout.count()));
    if (fds[0].revents & POLLIN) {
      std::uint64_t v;
      (void)!read(wake_fd, &v, sizeof v);
    }
  }
};

Cluster::Cluster(Fleet& fleet, RolloutManager& rollouts, ClusterOptions options)
    : impl_(std::make_unique<Impl>(fleet, rollouts, std::move(options))) {}

Cluster::~Cluster() { Stop(); }

const std::string& Cluster::id() const { return impl_->opt.id; }

Status Cluster::Open() {
  Impl& m = *impl_;
  m.wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (m.wake_fd < 0) return Err("cluster: eventfd failed");
  if (auto st = m.Connect(); !st) return st;
  // One statement, one snapshot: the newest id and the transactions still
  // open, whose changes may yet appear below it (late_xacts). The snapshot
  // lists only running transactions older than its xmax (one past the newest
  // completed one); those newer are running too, or were begun since: every
  // id from xmax up to one assigned after the snapshot is added.
  auto r = m.Q(
      "SELECT COALESCE(MAX(id), 0), ARRAY(SELECT pg_snapshot_xip(pg_current_snapshot()))::TEXT, "
      "pg_snapshot_xmax(pg_current_snapshot())::TEXT::BIGINT FROM changes");
  if (r.rows() != 1) return Err("cluster: cannot read the change sequence: " + r.error());
  auto after = m.Q("SELECT pg_current_xact_id()::TEXT::BIGINT");
  if (after.rows() != 1) return Err("cluster: cannot read the change sequence: " + after.error());
  m.last = r.Int(0, 0);
  m.late_below = m.last;
  m.late_xacts = NumberArray(r.Text(0, 1));
  for (std::int64_t x = r.Int(0, 2); x < after.Int(0, 0); ++x)
    m.late_xacts.insert(std::to_string(x));
  m.fleet.SetClustered(true);
  m.rollouts.SetDriving(false);  // until the lease says otherwise
  m.Tick();
  if (!m.conn) return Err("cluster: the database went away while joining");
  spdlog::info("cluster: controller {} joined (changes from {}; {})", m.opt.id, m.last + 1,
               m.driving ? "driving rollouts" : "another controller drives rollouts");
  return Status::Ok();
}

void Cluster::Start() {
  impl_->thread = std::thread([this] {
    try {
      impl_->Run();
    } catch (const std::exception& e) {
      spdlog::critical("cluster thread ended: {}", e.what());
    }
  });
}

void Cluster::Stop() {
  if (!impl_ || !impl_->thread.joinable()) return;
  impl_->stop = true;
  std::uint64_t one = 1;
  (void)!write(impl_->wake_fd, &one, sizeof one);
  impl_->thread.join();
}

}  // namespace muster
