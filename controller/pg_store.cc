// PostgreSQL implementation of Store (libpq): one connection per store, a
// mutex around every call, synchronous_commit=on so that a call returns only
// after its commit is flushed. Several controllers may share one database:
// every check-then-write runs in one transaction under a row lock or a
// transaction-scoped advisory lock, and per-machine counters live in tables
// (never in this process's memory), so that bounds hold whichever controller
// writes.
#include <libpq-fe.h>
#include <sqlite3.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <chrono>
#include <cstdlib>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <string_view>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "common/json_limits.h"
#include "controller/pg_result.h"
#include "controller/store.h"

namespace muster {

namespace {

using nlohmann::json;

// Versioned migrations: entry i brings the schema to version i + 1. Applied in
// order, once, under a session advisory lock (kMigrationLock), each in its own
// transaction together with its row in schema_migrations. Never edit an entry
// that has shipped: append a new one.
constexpr const char* kMigrations[] = {
    R"SQL(
CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE machines (
  name TEXT PRIMARY KEY,
  key TEXT NOT NULL UNIQUE,
  tags TEXT NOT NULL DEFAULT '[]',
  created_at BIGINT NOT NULL,
  last_seen BIGINT NOT NULL DEFAULT 0,
  facts TEXT NOT NULL DEFAULT '{}',
  generation BIGINT NOT NULL DEFAULT 0,
  phase TEXT NOT NULL DEFAULT 'idle',
  detail TEXT NOT NULL DEFAULT '',
  toplevel TEXT NOT NULL DEFAULT '',
  reboot_required BIGINT NOT NULL DEFAULT 0,
  last_applied BIGINT NOT NULL DEFAULT 0,
  revoked BIGINT NOT NULL DEFAULT 0,
  roster TEXT NOT NULL DEFAULT '',
  binding TEXT NOT NULL DEFAULT ''
);
CREATE TABLE operators (
  name TEXT PRIMARY KEY,
  key TEXT NOT NULL UNIQUE,
  created_at BIGINT NOT NULL
);
CREATE TABLE generations (
  machine TEXT NOT NULL,
  generation BIGINT NOT NULL,
  manifest TEXT NOT NULL,
  signer TEXT NOT NULL,
  signature TEXT NOT NULL,
  vars TEXT NOT NULL,
  toplevel TEXT NOT NULL,
  action TEXT NOT NULL,
  rollout TEXT NOT NULL DEFAULT '',
  published_by TEXT NOT NULL DEFAULT '',
  created_at BIGINT NOT NULL,
  released BIGINT NOT NULL DEFAULT 1,
  PRIMARY KEY (machine, generation)
);
CREATE TABLE events (
  id BIGSERIAL PRIMARY KEY,
  machine TEXT NOT NULL,
  generation BIGINT NOT NULL,
  phase TEXT NOT NULL,
  detail TEXT NOT NULL,
  at BIGINT NOT NULL
);
CREATE INDEX events_machine ON events (machine, generation, id);
CREATE TABLE event_counts (machine TEXT PRIMARY KEY, rows BIGINT NOT NULL);
CREATE TABLE logs (
  id BIGSERIAL PRIMARY KEY,
  machine TEXT NOT NULL,
  generation BIGINT NOT NULL,
  stream TEXT NOT NULL,
  line TEXT NOT NULL,
  at BIGINT NOT NULL
);
CREATE INDEX logs_machine ON logs (machine, generation, id);
CREATE TABLE log_sizes (
  machine TEXT NOT NULL,
  generation BIGINT NOT NULL,
  bytes BIGINT NOT NULL,
  PRIMARY KEY (machine, generation)
);
CREATE TABLE rollouts (
  id TEXT PRIMARY KEY,
  created_at BIGINT NOT NULL,
  created_by TEXT NOT NULL,
  canary BIGINT NOT NULL,
  max_parallel BIGINT NOT NULL,
  max_failures BIGINT NOT NULL,
  state TEXT NOT NULL,
  detail TEXT NOT NULL DEFAULT '',
  updated_at BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE rollout_items (
  rollout TEXT NOT NULL,
  position BIGINT NOT NULL,
  machine TEXT NOT NULL,
  generation BIGINT NOT NULL,
  stage BIGINT NOT NULL,
  state TEXT NOT NULL,
  detail TEXT NOT NULL DEFAULT '',
  updated_at BIGINT NOT NULL DEFAULT 0,
  PRIMARY KEY (rollout, position)
);
CREATE TABLE enroll_tokens (
  hash TEXT PRIMARY KEY,
  machine TEXT NOT NULL,
  tags TEXT NOT NULL,
  expires_at BIGINT NOT NULL,
  created_by TEXT NOT NULL,
  spent_at BIGINT NOT NULL DEFAULT 0,
  grant_entry TEXT NOT NULL DEFAULT ''
);
CREATE TABLE roster_removed (
  name TEXT PRIMARY KEY,
  roster TEXT NOT NULL,
  signed_at BIGINT NOT NULL
);
)SQL",
    // 2: several controllers at the same time. Every change another controller
    // must act on is a row in `changes`, written by a trigger in the same
    // transaction as the change itself, and announced on commit with
    // NOTIFY muster_changes (payload: the newest change id; readers read the
    // rows, so a missed notification costs only latency). Presence rows name
    // the controller that holds the agent's connection; a controller's rows
    // count only while its row in `controllers` is unexpired. `leases` holds
    // the rollout driver's lease. Times are the database's clock (unix ms).
    R"SQL(
CREATE TABLE changes (
  id BIGSERIAL PRIMARY KEY,
  kind TEXT NOT NULL,
  subject TEXT NOT NULL DEFAULT '',
  generation BIGINT NOT NULL DEFAULT 0,
  ref BIGINT NOT NULL DEFAULT 0,
  ref2 BIGINT NOT NULL DEFAULT 0,
  extra TEXT NOT NULL DEFAULT '',
  origin TEXT NOT NULL DEFAULT '',
  at BIGINT NOT NULL
);
CREATE INDEX changes_at ON changes (at);
CREATE TABLE controllers (
  id TEXT PRIMARY KEY,
  started_at BIGINT NOT NULL,
  expires_at BIGINT NOT NULL
);
CREATE TABLE presence (
  machine TEXT PRIMARY KEY,
  controller TEXT NOT NULL,
  since BIGINT NOT NULL
);
CREATE INDEX presence_controller ON presence (controller);
CREATE TABLE leases (
  name TEXT PRIMARY KEY,
  holder TEXT NOT NULL,
  expires_at BIGINT NOT NULL
);
CREATE FUNCTION muster_now() RETURNS BIGINT LANGUAGE sql VOLATILE AS
  $$ SELECT (EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT $$;
CREATE FUNCTION muster_origin() RETURNS TEXT LANGUAGE sql STABLE AS
  $$ SELECT COALESCE(current_setting('muster.controller', true), '') $$;
CREATE FUNCTION muster_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_TABLE_NAME = 'generations' AND TG_OP = 'INSERT' THEN
    INSERT INTO changes (kind, subject, generation, origin, at)
      SELECT 'deploy', n.machine, n.generation, muster_origin(), muster_now()
      FROM new_rows n WHERE n.released = 1;
  ELSIF TG_TABLE_NAME = 'generations' THEN
    INSERT INTO changes (kind, subject, generation, origin, at)
      SELECT 'deploy', n.machine, n.generation, muster_origin(), muster_now()
      FROM new_rows n JOIN old_rows o USING (machine, generation)
      WHERE n.released = 1 AND o.released = 0;
  ELSIF TG_TABLE_NAME = 'events' THEN
    INSERT INTO changes (kind, subject, generation, ref, origin, at)
      SELECT 'status', n.machine, n.generation, n.id, muster_origin(), muster_now()
      FROM new_rows n ORDER BY n.id;
  ELSIF TG_TABLE_NAME = 'logs' THEN
    INSERT INTO changes (kind, subject, generation, ref, ref2, extra, origin, at)
      SELECT 'log', n.machine, n.generation, MIN(n.id), MAX(n.id), n.stream, muster_origin(),
             muster_now()
      FROM new_rows n GROUP BY n.machine, n.generation, n.stream ORDER BY MIN(n.id);
  ELSIF TG_TABLE_NAME = 'machines' AND TG_OP = 'UPDATE' THEN
    INSERT INTO changes (kind, subject, origin, at)
      SELECT 'machine', n.name, muster_origin(), muster_now()
      FROM new_rows n JOIN old_rows o USING (name)
      WHERE n.key <> o.key OR n.revoked <> o.revoked OR n.roster <> o.roster
         OR n.tags <> o.tags OR n.binding <> o.binding;
  ELSIF TG_TABLE_NAME = 'machines' AND TG_OP = 'INSERT' THEN
    INSERT INTO changes (kind, subject, origin, at)
      SELECT 'machine', n.name, muster_origin(), muster_now() FROM new_rows n;
  ELSIF TG_TABLE_NAME = 'machines' THEN
    INSERT INTO changes (kind, subject, origin, at)
      SELECT 'machine', o.name, muster_origin(), muster_now() FROM old_rows o;
  ELSIF TG_TABLE_NAME = 'operators' AND TG_OP = 'DELETE' THEN
    INSERT INTO changes (kind, subject, origin, at)
      SELECT 'operator', o.name, muster_origin(), muster_now() FROM old_rows o;
  ELSIF TG_TABLE_NAME = 'operators' THEN
    INSERT INTO changes (kind, subject, origin, at)
      SELECT 'operator', n.name, muster_origin(), muster_now() FROM new_rows n;
  ELSIF TG_TABLE_NAME = 'rollouts' THEN
    INSERT INTO changes (kind, subject, origin, at)
      SELECT 'rollout', n.id, muster_origin(), muster_now() FROM new_rows n;
  ELSIF TG_TABLE_NAME = 'rollout_items' THEN
    INSERT INTO changes (kind, subject, ref, origin, at)
      SELECT 'rollout_item', n.rollout, n.position, muster_origin(), muster_now()
      FROM new_rows n JOIN old_rows o USING (rollout, position)
      WHERE n.state <> o.state OR n.detail <> o.detail;
  ELSIF TG_TABLE_NAME = 'presence' AND TG_OP = 'DELETE' THEN
    INSERT INTO changes (kind, subject, extra, origin, at)
      SELECT 'offline', o.machine, o.controller, muster_origin(), muster_now() FROM old_rows o;
  ELSIF TG_TABLE_NAME = 'presence' THEN
    INSERT INTO changes (kind, subject, extra, origin, at)
      SELECT 'online', n.machine, n.controller, muster_origin(), muster_now() FROM new_rows n;
  END IF;
  IF FOUND THEN
    PERFORM pg_notify('muster_changes', currval(pg_get_serial_sequence('changes', 'id'))::TEXT);
  END IF;
  RETURN NULL;
END $$;
CREATE TRIGGER generations_ins AFTER INSERT ON generations REFERENCING NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION muster_changed();
CREATE TRIGGER generations_upd AFTER UPDATE ON generations
  REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows
  FOR EACH STATEMENT EXECUTE FUNCTION muster_changed();
CREATE TRIGGER events_ins AFTER INSERT ON events REFERENCING NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION muster_changed();
CREATE TRIGGER logs_ins AFTER INSERT ON logs REFERENCING NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION muster_changed();
CREATE TRIGGER machines_ins AFTER INSERT ON machines REFERENCING NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION muster_changed();
CREATE TRIGGER machines_upd AFTER UPDATE ON machines
  REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows
  FOR EACH STATEMENT EXECUTE FUNCTION muster_changed();
CREATE TRIGGER machines_del AFTER DELETE ON machines REFERENCING OLD TABLE AS old_rows
  FOR EACH STATEMENT EXECUTE FUNCTION muster_changed();
CREATE TRIGGER operators_ins AFTER INSERT ON operators REFERENCING NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION muster_changed();
CREATE TRIGGER operators_upd AFTER UPDATE ON operators REFERENCING NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION muster_changed();
CREATE TRIGGER operators_del AFTER DELETE ON operators REFERENCING OLD TABLE AS old_rows
  FOR EACH STATEMENT EXECUTE FUNCTION muster_changed();
CREATE TRIGGER rollouts_ins AFTER INSERT ON rollouts REFERENCING NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION muster_changed();
CREATE TRIGGER rollouts_upd AFTER UPDATE ON rollouts REFERENCING NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION muster_changed();
CREATE TRIGGER rollout_items_upd AFTER UPDATE ON rollout_items
  REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows
  FOR EACH STATEMENT EXECUTE FUNCTION muster_changed();
CREATE TRIGGER presence_ins AFTER INSERT ON presence REFERENCING NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION muster_changed();
CREATE TRIGGER presence_upd AFTER UPDATE ON presence REFERENCING NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION muster_changed();
CREATE TRIGGER presence_del AFTER DELETE ON presence REFERENCING OLD TABLE AS old_rows
  FOR EACH STATEMENT EXECUTE FUNCTION muster_changed();
)SQL",
    // 3: the transaction that wrote each change row (cluster.cc: a controller
    // starting re-reads the changes of transactions still open at its start),
    // and the webhook queue. A delivery is claimed by the controller sending
    // it (`claimed_by`); a claim counts only while that controller's lease in
    // `controllers` is unexpired, so the queue of a controller that died is
    // sent by another within the lease.
    R"SQL(
ALTER TABLE changes ADD COLUMN xact xid8 NOT NULL DEFAULT pg_current_xact_id();
CREATE TABLE webhooks (
  id TEXT PRIMARY KEY,
  url TEXT NOT NULL,
  secret TEXT NOT NULL,
  events TEXT NOT NULL DEFAULT '[]',
  created_by TEXT NOT NULL DEFAULT '',
  created_at BIGINT NOT NULL
);
CREATE TABLE deliveries (
  id BIGSERIAL PRIMARY KEY,
  webhook TEXT NOT NULL,
  event TEXT NOT NULL,
  body TEXT NOT NULL,
  attempts INTEGER NOT NULL DEFAULT 0,
  created_at BIGINT NOT NULL,
  next_at BIGINT NOT NULL,
  last_error TEXT NOT NULL DEFAULT '',
  claimed_by TEXT NOT NULL DEFAULT ''
);
CREATE INDEX deliveries_due ON deliveries (next_at, id);
)SQL",
    // 4: change triggers that cost nothing where nothing changes. A machine
    // row is updated by every hello and status report, and a change row is
    // due only when its identity or roster entry changed: a row trigger with
    // that WHEN test is decided without running any function, where the
    // statement trigger joined the old and new rows of every such update.
    // And the statement triggers plan each query for the rows at hand: with
    // plans cached over calls, one planned for a one-row update (a hello)
    // was reused for a batch of thousands, joining them as a nested loop
    // (seconds per batch of status reports, measured).
    R"SQL(
DROP TRIGGER machines_upd ON machines;
CREATE FUNCTION muster_machine_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO changes (kind, subject, origin, at)
    VALUES ('machine', NEW.name, muster_origin(), muster_now());
  PERFORM pg_notify('muster_changes', currval(pg_get_serial_sequence('changes', 'id'))::TEXT);
  RETURN NULL;
END $$;
CREATE TRIGGER machines_upd AFTER UPDATE ON machines FOR EACH ROW
  WHEN (NEW.key <> OLD.key OR NEW.revoked <> OLD.revoked OR NEW.roster <> OLD.roster
        OR NEW.tags <> OLD.tags OR NEW.binding <> OLD.binding)
  EXECUTE FUNCTION muster_machine_changed();
ALTER FUNCTION muster_changed() SET plan_cache_mode = force_custom_plan;
)SQL",
    // 5: the binary cache's bytes (controller/pg_byte_storage.cc), shared by
    // every controller of the fleet. Chunks are stored out of line and
    // uncompressed: NARs arrive compressed, and such values are read in slices.
    R"SQL(
CREATE TABLE cache_objects (
  id BIGSERIAL PRIMARY KEY,
  key TEXT NOT NULL UNIQUE,
  size BIGINT NOT NULL,
  mtime BIGINT NOT NULL
);
CREATE TABLE cache_chunks (
  object BIGINT NOT NULL REFERENCES cache_objects (id) ON DELETE CASCADE,
  off BIGINT NOT NULL,
  data BYTEA NOT NULL,
  PRIMARY KEY (object, off)
);
ALTER TABLE cache_chunks ALTER COLUMN data SET STORAGE EXTERNAL;
)SQL",
};
constexpr int kSchemaVersion = static_cast<int>(std::size(kMigrations));

// Session advisory lock keys (two int4 halves): 0x6d757374 is "must".
constexpr const char* kMigrationLock = "SELECT pg_advisory_lock(1836413812, 1)";
constexpr const char* kMigrationUnlock = "SELECT pg_advisory_unlock(1836413812, 1)";
// Transaction advisory lock serialising generation numbering per machine.
// $1: a text array of machines, locked in one order.
constexpr const char* kGenerationLocks =
    "SELECT pg_advisory_xact_lock(1836413812, hashtext(m)) FROM "
    "(SELECT m FROM unnest($1::TEXT[]) AS m ORDER BY hashtext(m), m) AS o";

json ParseOr(const std::string& text, json fallback) {
  json j = json::parse(text, nullptr, false);
  return j.is_discarded() ? fallback : j;
}

// The strings of a JSON array column (tags, webhook events); others skipped.
std::vector<std::string> StringList(const std::string& text) {
  std::vector<std::string> out;
  json a = ParseOr(text, json::array());
  if (!a.is_array()) return out;
  for (const auto& e : a) {
    if (e.is_string()) out.push_back(e.get<std::string>());
  }
  return out;
}

// PostgreSQL text cannot hold U+0000 (valid UTF-8, so it passes the checks
// upstream): it is stored as U+FFFD.
std::string Param(const std::string& s) {
  if (s.find('\0') == std::string::npos) return s;
  std::string out;
  out.reserve(s.size() + 8);
  for (char c : s) {
    if (c == '\0') {
      out += "\xEF\xBF\xBD";
    } else {
      out += c;
    }
  }
  return out;
}
std::string Param(std::int64_t v) { return std::to_string(v); }
std::string Param(int v) { return std::to_string(v); }
std::string Param(bool v) { return v ? "1" : "0"; }

using pg::Res;

// Rollout items as array parameters ($1..$8) for one statement over all of
// them, each (rollout, position) once: an UPDATE ... FROM with two source
// rows for one target row would apply either.
struct ItemColumns {
  static constexpr const char* kUnnest =
      "unnest($1::TEXT[], $2::BIGINT[], $3::TEXT[], $4::BIGINT[], $5::TEXT[], $6::TEXT[], "
      "$7::BIGINT[], $8::BIGINT[]) AS u(rollout, position, machine, generation, state, detail, "
      "updated_at, stage)";
  ItemColumns(const std::vector<RolloutItemRecord>& items, bool last_wins) {
    std::map<std::pair<std::string_view, std::int64_t>, const RolloutItemRecord*> pick;
    std::vector<const RolloutItemRecord*> order;
    for (const auto& it : items) {
      auto [slot, fresh] = pick.try_emplace({it.rollout, it.position}, &it);
      if (fresh) {
        order.push_back(&it);
      } else if (last_wins) {
        slot->second = &it;
      }
    }
    std::vector<std::string> r, m, st, d;
    std::vector<std::int64_t> p, g, at, sg;
    for (const RolloutItemRecord* first : order) {
      const RolloutItemRecord& it = *pick.at({first->rollout, first->position});
      r.push_back(it.rollout);
      p.push_back(it.position);
      m.push_back(it.machine);
      g.push_back(it.generation);
      st.push_back(it.state);
      d.push_back(it.detail);
      at.push_back(it.updated_at);
      sg.push_back(it.stage);
    }
    stage = pg::IntArray(sg);
    rollout = pg::TextArray(r);
    position = pg::IntArray(p);
    machine = pg::TextArray(m);
    generation = pg::IntArray(g);
    state = pg::TextArray(st);
    detail = pg::TextArray(d);
    updated_at = pg::IntArray(at);
  }
  std::string rollout, position, machine, generation, state, detail, updated_at, stage;
};

class PgStore final : public Store {
 public:
  PgStore(std::string conninfo, const StoreLimits& limits)
      : limits_(limits), conninfo_(std::move(conninfo)) {}
  ~PgStore() override {
    if (conn_) PQfinish(conn_);
  }

  Status Init() {
    std::lock_guard lock(mu_);
    if (auto st = ConnectLocked(); !st) return st;
    if (auto r = Q(kMigrationLock); !r.ok()) return Err("store: cannot lock schema: " + r.error());
    auto st = MigrateLocked();
    (void)Q(kMigrationUnlock);
    return st;
  }

  Status MigrateLocked() {
    if (auto r = Q("CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, "
                   "applied_at BIGINT NOT NULL)");
        !r.ok()) {
      return Err("store: " + r.error());
    }
    auto v = Q("SELECT COALESCE(MAX(version), 0) FROM schema_migrations");
    if (!v.ok()) return Err("store: " + v.error());
    std::int64_t have = v.Int(0, 0);
    if (have > kSchemaVersion) {
      return Err("store schema version " + std::to_string(have) +
                 " is newer than this controller supports (" + std::to_string(kSchemaVersion) +
                 "); upgrade muster-controller");
    }
    for (std::int64_t next = have + 1; next <= kSchemaVersion; ++next) {
      if (auto r = Begin(); !r.ok()) return Err("store: " + r.error());
      auto m = Res(PQexec(conn_, kMigrations[next - 1]));  // several statements: no parameters
      if (!m.ok()) {
        std::string e = m.error();
        (void)End("ROLLBACK");
        return Err("store: schema migration " + std::to_string(next) + " failed: " + e);
      }
      auto rec =
          Q("INSERT INTO schema_migrations (version, applied_at) VALUES ($1, "
            "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT)",
            next);
      auto set =
          Q("INSERT INTO settings (key, value) VALUES ('schema_version', $1) ON CONFLICT "
            "(key) DO UPDATE SET value = excluded.value",
            std::to_string(next));
      if (!rec.ok() || !set.ok()) {
        std::string e = rec.ok() ? set.error() : rec.error();
        (void)End("ROLLBACK");
        return Err("store: schema migration " + std::to_string(next) + ": " + e);
      }
      if (auto r = End("COMMIT"); !r.ok()) return Err("store: " + r.error());
    }
    // Someone may have written a newer version into settings (as the SQLite
    // store checks it, so does this one).
    auto s = Q("SELECT value FROM settings WHERE key = 'schema_version'");
    if (s.rows() == 1 && std::strtoll(s.Text(0, 0).c_str(), nullptr, 10) > kSchemaVersion) {
      return Err("store schema version " + s.Text(0, 0) +
                 " is newer than this controller supports (" + std::to_string(kSchemaVersion) +
                 "); upgrade muster-controller");
    }
    return Status::Ok();
  }

  Status AddMachine(const MachineRecord& m) override {
    std::lock_guard lock(mu_);
    auto r =
        Q("INSERT INTO machines (name, key, tags, created_at, roster, binding) VALUES "
          "($1, $2, $3, $4, $5, $6)",
          m.name, m.key, DumpJson(json(m.tags)), m.created_at, m.roster, m.binding);
    if (r.unique_violation()) {
      return Err("machine '" + m.name +
                 "' or its key is already registered; remove it first "
                 "('muster machine remove " +
                 m.name + "') to register it again");
    }
    if (!r.ok()) return Err("store: cannot add machine: " + r.error());
    return Status::Ok();
  }

  Status RemoveMachine(const std::string& name) override {
    std::lock_guard lock(mu_);
    auto r = Q("DELETE FROM machines WHERE name = $1", name);
    if (!r.ok()) return Err("store: cannot remove machine: " + r.error());
    if (r.changes() == 0) return Err("no machine named '" + name + "'");
    return Status::Ok();
  }

  Status SetMachineTags(const std::string& name, const std::vector<std::string>& tags) override {
    std::lock_guard lock(mu_);
    auto r = Q("UPDATE machines SET tags = $1 WHERE name = $2", DumpJson(json(tags)), name);
    if (!r.ok()) return Err("store: " + r.error());
    if (r.changes() == 0) return Err("no machine named '" + name + "'");
    return Status::Ok();
  }

  Status SetMachineRoster(const std::string& name, const std::vector<std::string>& tags,
                          const std::string& roster, const std::string& binding) override {
    std::lock_guard lock(mu_);
    auto r = Q("UPDATE machines SET tags = $1, roster = $2, binding = $3 WHERE name = $4",
               DumpJson(json(tags)), roster, binding, name);
    if (!r.ok()) return Err("store: " + r.error());
    if (r.changes() == 0) return Err("no machine named '" + name + "'");
    return Status::Ok();
  }

  Status RecordRemoval(const std::string& name, const std::string& roster,
                       std::int64_t signed_at) override {
    std::lock_guard lock(mu_);
    auto r =
        Q("INSERT INTO roster_removed (name, roster, signed_at) VALUES ($1, $2, $3) ON "
          "CONFLICT (name) DO UPDATE SET roster = excluded.roster, signed_at = "
          "excluded.signed_at",
          name, roster, signed_at);
    if (!r.ok()) return Err("store: " + r.error());
    return Status::Ok();
  }

  std::vector<std::pair<std::string, std::string>> ListRemovals() override {
    std::lock_guard lock(mu_);
    std::vector<std::pair<std::string, std::string>> out;
    auto r = Q("SELECT name, roster FROM roster_removed ORDER BY name");
    for (int i = 0; i < r.rows(); ++i) out.emplace_back(r.Text(i, 0), r.Text(i, 1));
    return out;
  }

  std::int64_t RemovalSignedAt(const std::string& name) override {
    std::lock_guard lock(mu_);
    auto r = Q("SELECT signed_at FROM roster_removed WHERE name = $1", name);
    return r.rows() == 1 ? r.Int(0, 0) : 0;
  }

  static constexpr const char* kMachineCols =
      "name, key, tags, created_at, last_seen, facts, generation, phase, detail, toplevel, "
      "reboot_required, last_applied, revoked, roster, binding";

  static MachineRecord ReadMachine(const Res& r, int i) {
    MachineRecord m;
    m.name = r.Text(i, 0);
    m.key = r.Text(i, 1);
    m.tags = StringList(r.Text(i, 2));
    m.created_at = r.Int(i, 3);
    m.last_seen = r.Int(i, 4);
    m.facts = ParseOr(r.Text(i, 5), json::object());
    m.generation = r.Int(i, 6);
    m.phase = r.Text(i, 7);
    m.detail = r.Text(i, 8);
    m.toplevel = r.Text(i, 9);
    m.reboot_required = r.Int(i, 10) != 0;
    m.last_applied = r.Int(i, 11);
    m.revoked = r.Int(i, 12) != 0;
    m.roster = r.Text(i, 13);
    m.binding = r.Text(i, 14);
    return m;
  }

  std::vector<MachineRecord> ListMachines() override {
    std::lock_guard lock(mu_);
    std::vector<MachineRecord> out;
    // COLLATE "C": the same byte order as SQLite's, whatever the database's locale.
    auto r =
        Q(std::string("SELECT ") + kMachineCols + " FROM machines ORDER BY name COLLATE \"C\"");
    for (int i = 0; i < r.rows(); ++i) out.push_back(ReadMachine(r, i));
    return out;
  }

  std::optional<MachineRecord> GetMachine(const std::string& name) override {
    std::lock_guard lock(mu_);
    auto r = Q(std::string("SELECT ") + kMachineCols + " FROM machines WHERE name = $1", name);
    if (r.rows() != 1) return std::nullopt;
    return ReadMachine(r, 0);
  }

  Status RecordHello(const std::string& name, std::int64_t at, const json& facts,
                     std::int64_t last_applied) override {
    std::lock_guard lock(mu_);
    return WriteHelloLocked(name, at, facts, last_applied);
  }

  // Group commit: one transaction (one flush) for all; on any failure each is
  // recorded on its own so that each gets its own result.
  std::vector<Status> RecordHellos(const std::vector<HelloWrite>& writes) override {
    {
      std::lock_guard lock(mu_);
      if (Begin().ok()) {
        bool ok = true;
        for (const auto& w : writes) {
          if (!WriteHelloLocked(w.name, w.at, w.facts, w.last_applied)) {
            ok = false;
            break;
          }
        }
        if (ok && End("COMMIT").ok()) return std::vector<Status>(writes.size(), Status::Ok());
        (void)End("ROLLBACK");
      }
    }
    return Store::RecordHellos(writes);
  }

  Status WriteHelloLocked(const std::string& name, std::int64_t at, const json& facts,
                          std::int64_t last_applied) {
    auto r =
        Q("UPDATE machines SET last_seen = $1, facts = $2, last_applied = GREATEST("
          "last_applied, $3::BIGINT) WHERE name = $4",
          at, DumpJson(facts), last_applied, name);
    if (!r.ok()) return Err("store: " + r.error());
    if (!controller_id_.empty()) {
      auto p =
          Q("INSERT INTO presence (machine, controller, since) VALUES ($1, $2, muster_now()) "
            "ON CONFLICT (machine) DO UPDATE SET controller = excluded.controller, since = "
            "excluded.since",
            name, controller_id_);
      if (!p.ok()) return Err("store: cannot record presence: " + p.error());
    }
    return Status::Ok();
  }

  Status SetControllerId(const std::string& id) override {
    for (char c : id) {
      if (!std::isalnum(static_cast<unsigned char>(c)) && c != '-' && c != '_' && c != '.') {
        return Err("controller id '" + id + "' may hold only letters, digits, '-', '_' and '.'");
      }
    }
    std::lock_guard lock(mu_);
    controller_id_ = id;
    return ConnectLocked();
  }

  Status AnnouncePreview(const std::string& machine, const json& message) override {
    std::lock_guard lock(mu_);
    if (controller_id_.empty()) return Status::Ok();
    // The transaction id first, then the change id, as for every change row
    // (a trigger's data change comes first): a reader waiting at a gap in the
    // ids waits for the transactions begun before it saw the gap.
    if (auto b = Begin(); !b.ok()) return Err("store: " + b.error());
    std::string why;
    if (auto x = Q("SELECT pg_current_xact_id()"); !x.ok()) {
      why = x.error();
    } else if (auto r = Q("WITH c AS (INSERT INTO changes (kind, subject, extra, origin, at) "
                          "VALUES ('preview', $1, $2, muster_origin(), muster_now()) RETURNING "
                          "id) SELECT pg_notify('muster_changes', id::TEXT) FROM c",
                          machine, DumpJson(message));
               !r.ok()) {
      why = r.error();
    }
    if (!why.empty()) {
      (void)End("ROLLBACK");
      return Err("store: cannot pass the preview on: " + why);
    }
    return CommitLocked("cannot pass the preview on");
  }

  Status RecordGone(const std::string& machine) override {
    std::lock_guard lock(mu_);
    if (controller_id_.empty()) return Status::Ok();
    auto r =
        Q("DELETE FROM presence WHERE machine = $1 AND controller = $2", machine, controller_id_);
    if (!r.ok()) return Err("store: cannot record presence: " + r.error());
    return Status::Ok();
  }

  // One transaction; an item is released only from "pending" (so that no
  // machine is released twice, whichever controller drives), and, once this
  // store names its controller, only while that controller holds the rollout
  // driver's lease (a driver that lost it, e.g. paused past its expiry, writes
  // nothing).
  Status ReleaseRolloutItems(const std::vector<RolloutItemRecord>& items) override {
    return AdvanceRollout({}, items, nullptr);
  }

  // The finals, the release and the rollout's state in one transaction, under
  // the same lease check as a release.
  Status AdvanceRollout(const std::vector<RolloutItemRecord>& finals,
                        const std::vector<RolloutItemRecord>& items,
                        const RolloutRecord* state) override {
    std::lock_guard lock(mu_);
    if (auto b = Begin(); !b.ok()) return Err("store: " + b.error());
    auto fail = [&](std::string e) {
      (void)End("ROLLBACK");
      return Status(Err(std::move(e)));
    };
    if (!finals.empty()) {
      // Later entries for the same item win, as if written in turn.
      ItemColumns c(finals, /*last_wins=*/true);
      auto u = Q(
          std::string("UPDATE rollout_items AS r SET state = u.state, detail = u.detail, "
                      "updated_at = u.updated_at FROM ") +
              ItemColumns::kUnnest + " WHERE r.rollout = u.rollout AND r.position = u.position",
          c.rollout, c.position, c.machine, c.generation, c.state, c.detail, c.updated_at, c.stage);
      if (!u.ok()) return fail("store: cannot record rollout item: " + u.error());
    }
    if (!controller_id_.empty() && !items.empty()) {
      auto l =
          Q("SELECT 1 FROM leases WHERE name = 'rollouts' AND holder = $1 AND expires_at > "
            "muster_now() FOR SHARE",
            controller_id_);
      if (!l.ok()) return fail("store: " + l.error());
      if (l.rows() != 1) {
        return fail(
            "this controller does not hold the rollout driver's lease (another "
            "controller drives rollouts now)");
      }
    }
    if (!items.empty()) {
      // Only items still pending are released (the first entry for an item
      // wins: a second would find it released), and only their generations.
      ItemColumns c(items, /*last_wins=*/false);
      auto u = Q(std::string("WITH released AS (UPDATE rollout_items AS r SET state = u.state, "
                             "detail = u.detail, updated_at = u.updated_at FROM ") +
                     ItemColumns::kUnnest +
                     " WHERE r.rollout = u.rollout AND r.position = u.position AND r.state = "
                     "'pending' RETURNING u.machine, u.generation) "
                     "UPDATE generations AS g SET released = 1 FROM released AS x WHERE "
                     "g.machine = x.machine AND g.generation = x.generation AND g.released = 0",
                 c.rollout, c.position, c.machine, c.generation, c.state, c.detail, c.updated_at,
                 c.stage);
      if (!u.ok()) return fail("store: cannot release rollout items: " + u.error());
    }
    if (state) {
      auto u = Q("UPDATE rollouts SET state = $1, detail = $2, updated_at = $3 WHERE id = $4",
                 state->state, state->detail, state->updated_at, state->id);
      if (!u.ok()) return fail("store: cannot record rollout: " + u.error());
    }
    return CommitLocked("cannot release rollout items");
  }

  Status UpdateRolloutItems(const std::vector<RolloutItemRecord>& items) override {
    return AdvanceRollout(items, {}, nullptr);
  }

  Status RecordSeen(const std::string& name, std::int64_t at) override {
    std::lock_guard lock(mu_);
    auto r = Q("UPDATE machines SET last_seen = $1 WHERE name = $2", at, name);
    if (!r.ok()) return Err("store: " + r.error());
    return Status::Ok();
  }

  Status RecordDepartures(const std::vector<Departure>& gone) override {
    if (gone.empty()) return Status::Ok();
    std::lock_guard lock(mu_);
    if (auto r = Begin(); !r.ok()) return Err("store: " + r.error());
    for (const auto& d : gone) {
      std::string why;
      auto seen = Q("UPDATE machines SET last_seen = $1 WHERE name = $2", d.at, d.name);
      if (!seen.ok()) {
        why = seen.error();
      } else if (!controller_id_.empty()) {
        auto left = Q("DELETE FROM presence WHERE machine = $1 AND controller = $2", d.name,
                      controller_id_);
        if (!left.ok()) why = left.error();
      }
      if (!why.empty()) {
        (void)End("ROLLBACK");
        return Err("store: cannot record departures: " + why);
      }
    }
    if (auto r = End("COMMIT"); !r.ok()) {
      (void)End("ROLLBACK");
      return Err("store: cannot record departures: " + r.error());
    }
    return Status::Ok();
  }

  Status RecordStatus(const std::string& name, const EventRecord& ev, const std::string& toplevel,
                      bool reboot_required, const json& facts) override {
    std::lock_guard lock(mu_);
    if (auto r = Begin(); !r.ok()) return Err("store: " + r.error());
    const StatusWrite w{name, ev, toplevel, reboot_required, facts};
    return RecordStatusWriteLocked(w);
  }

  Status RecordStatusWrite(const StatusWrite& w) override {
    std::lock_guard lock(mu_);
    if (auto r = Begin(); !r.ok()) return Err("store: " + r.error());
    return RecordStatusWriteLocked(w);
  }

  // In the transaction the caller began; ends it.
  Status RecordStatusWriteLocked(const StatusWrite& w) {
    auto st = WriteStatusesLocked({&w});
    if (st) st = QueueNotificationsLocked({&w, 1});
    if (!st) {
      (void)End("ROLLBACK");
      return st;
    }
    if (auto r = End("COMMIT"); !r.ok()) {
      (void)End("ROLLBACK");
      return Err("store: cannot record status: " + r.error());
    }
    return Status::Ok();
  }

  // One transaction for the batch, and a few statements per round rather
  // than four per report (each of which also ran the change triggers): a
  // round holds each machine at most once, so that a machine's reports apply
  // in order. If the batch fails, each report is tried on its own, so that
  // one bad report costs only itself.
  std::vector<Status> RecordStatuses(const std::vector<StatusWrite>& writes) override {
    if (writes.empty()) return {};
    {
      std::lock_guard lock(mu_);
      if (Begin().ok()) {
        std::vector<std::vector<const StatusWrite*>> rounds;
        std::unordered_map<std::string_view, std::size_t> seen;
        for (const auto& w : writes) {
          std::size_t k = seen[w.name]++;
          if (rounds.size() <= k) rounds.emplace_back();
          rounds[k].push_back(&w);
        }
        bool ok = true;
        for (const auto& round : rounds) {
          if (!WriteStatusesLocked(round)) {
            ok = false;
            break;
          }
        }
        if (ok) ok = QueueNotificationsLocked(writes).ok();
        if (ok && End("COMMIT").ok()) return std::vector<Status>(writes.size(), Status::Ok());
        (void)End("ROLLBACK");
      }
    }
    return Store::RecordStatuses(writes);
  }

  // The machine rows and event rows of reports of distinct machines, three
  // statements for all of them (four when some machine reached its event
  // bound); the caller holds mu_ and a transaction.
  Status WriteStatusesLocked(const std::vector<const StatusWrite*>& round) {
    std::vector<std::string> names, phases, details, toplevels, facts;
    std::vector<std::int64_t> generations, reboots, ats;
    for (const StatusWrite* w : round) {
      names.push_back(w->name);
      generations.push_back(w->ev.generation);
      phases.push_back(w->ev.phase);
      details.push_back(w->ev.detail);
      toplevels.push_back(w->toplevel);
      reboots.push_back(w->reboot_required ? 1 : 0);
      ats.push_back(w->ev.at);
      facts.push_back(w->facts.is_object() ? DumpJson(w->facts) : "");
    }
    const std::string n = pg::TextArray(names), g = pg::IntArray(generations),
                      p = pg::TextArray(phases), d = pg::TextArray(details), at = pg::IntArray(ats);
    auto u =
        Q("UPDATE machines AS m SET generation = u.generation, phase = u.phase, "
          "detail = u.detail, "
          "toplevel = CASE WHEN u.toplevel = '' THEN m.toplevel ELSE u.toplevel END, "
          "reboot_required = u.reboot, last_seen = u.at, "
          "last_applied = CASE WHEN u.phase IN ('succeeded','unchanged','rolled-back','failed',"
          "'verified','realising','vars-installed','profile-set','activating','confirming') "
          "THEN GREATEST(m.last_applied, u.generation) ELSE m.last_applied END, "
          "facts = CASE WHEN u.facts = '' THEN m.facts ELSE u.facts END "
          "FROM unnest($1::TEXT[], $2::BIGINT[], $3::TEXT[], $4::TEXT[], $5::TEXT[], "
          "$6::BIGINT[], $7::BIGINT[], $8::TEXT[]) "
          "AS u(name, generation, phase, detail, toplevel, reboot, at, facts) "
          "WHERE m.name = u.name",
          n, g, p, d, pg::TextArray(toplevels), pg::IntArray(reboots), at, pg::TextArray(facts));
    if (!u.ok()) return Err("store: cannot record status: " + u.error());
    auto i =
        Q("INSERT INTO events (machine, generation, phase, detail, at) "
          "SELECT u.name, u.generation, u.phase, u.detail, u.at FROM unnest($1::TEXT[], "
          "$2::BIGINT[], $3::TEXT[], $4::TEXT[], $5::BIGINT[]) WITH ORDINALITY "
          "AS u(name, generation, phase, detail, at, ord) ORDER BY u.ord",
          n, g, p, d, at);
    if (!i.ok()) return Err("store: cannot record status: " + i.error());
    return BoundEventsLocked(names);
  }

  Status AddOperator(const OperatorRecord& op) override {
    std::lock_guard lock(mu_);
    auto r = Q("INSERT INTO operators (name, key, created_at) VALUES ($1, $2, $3)", op.name, op.key,
               op.created_at);
    if (r.unique_violation()) {
      return Err("operator '" + op.name + "' or its key is already registered");
    }
    if (!r.ok()) return Err("store: cannot add operator: " + r.error());
    return Status::Ok();
  }

  Status RemoveOperator(const std::string& name) override {
    std::lock_guard lock(mu_);
    auto r = Q("DELETE FROM operators WHERE name = $1", name);
    if (!r.ok()) return Err("store: " + r.error());
    if (r.changes() == 0) return Err("no operator named '" + name + "'");
    return Status::Ok();
  }

  std::vector<OperatorRecord> ListOperators() override {
    std::lock_guard lock(mu_);
    std::vector<OperatorRecord> out;
    auto r = Q("SELECT name, key, created_at FROM operators ORDER BY name COLLATE \"C\"");
    for (int i = 0; i < r.rows(); ++i) out.push_back({r.Text(i, 0), r.Text(i, 1), r.Int(i, 2)});
    return out;
  }

  Status AddGeneration(const GenerationRecord& g) override {
    std::lock_guard lock(mu_);
    if (auto r = Begin(); !r.ok()) return Err("store: " + r.error());
    if (auto st = InsertGenerationsLocked({g}); !st) {
      (void)End("ROLLBACK");
      return st;
    }
    return CommitLocked("cannot add generation");
  }

  // Inside a transaction: refuses a number not above a machine's stored ones.
  // Each machine's numbering lock (an advisory lock) makes the check and the
  // insert one step across controllers. Three statements for any number of
  // distinct machines: the locks (in one order, so that two such batches
  // cannot deadlock), then, in a snapshot taken after them, the newest
  // numbers, then the rows. The caller holds mu_ and a transaction.
  Status InsertGenerationsLocked(const std::vector<GenerationRecord>& gens) {
    if (gens.empty()) return Status::Ok();
    std::set<std::string> distinct;
    for (const auto& g : gens) distinct.insert(g.machine);
    if (distinct.size() != gens.size()) {  // one machine twice: in turn
      for (const auto& g : gens) {
        if (auto st = InsertGenerationsLocked({g}); !st) return st;
      }
      return Status::Ok();
    }
    const std::string names = pg::TextArray({distinct.begin(), distinct.end()});
    auto l = Q(kGenerationLocks, names);
    if (!l.ok()) return Err("store: " + l.error());
    auto q =
        Q("SELECT u.m, COALESCE(MAX(g.generation), 0) FROM unnest($1::TEXT[]) AS u(m) "
          "LEFT JOIN generations g ON g.machine = u.m GROUP BY u.m",
          names);
    if (!q.ok()) return Err("store: " + q.error());
    std::map<std::string, std::int64_t> latest;
    for (int i = 0; i < q.rows(); ++i) latest[q.Text(i, 0)] = q.Int(i, 1);
    std::vector<std::string> machine, manifest, signer, signature, vars, toplevel, action, rollout,
        by;
    std::vector<std::int64_t> generation, created, released;
    for (const auto& g : gens) {
      if (g.generation <= latest[g.machine]) {
        return Err("generation " + std::to_string(g.generation) + " for " + g.machine +
                   " is not newer than the stored generation " + std::to_string(latest[g.machine]));
      }
      machine.push_back(g.machine);
      generation.push_back(g.generation);
      manifest.push_back(g.manifest.manifest);
      signer.push_back(g.manifest.signer);
      signature.push_back(g.manifest.signature);
      vars.push_back(g.vars);
      toplevel.push_back(g.toplevel);
      action.push_back(g.action);
      rollout.push_back(g.rollout);
      by.push_back(g.published_by);
      created.push_back(g.created_at);
      released.push_back(g.released ? 1 : 0);
    }
    auto s =
        QV("INSERT INTO generations (machine, generation, manifest, signer, signature, "
           "vars, toplevel, action, rollout, published_by, created_at, released) "
           "SELECT * FROM unnest($1::TEXT[], $2::BIGINT[], $3::TEXT[], $4::TEXT[], "
           "$5::TEXT[], $6::TEXT[], $7::TEXT[], $8::TEXT[], $9::TEXT[], $10::TEXT[], "
           "$11::BIGINT[], $12::BIGINT[])",
           {pg::TextArray(machine), pg::IntArray(generation), pg::TextArray(manifest),
            pg::TextArray(signer), pg::TextArray(signature), pg::TextArray(vars),
            pg::TextArray(toplevel), pg::TextArray(action), pg::TextArray(rollout),
            pg::TextArray(by), pg::IntArray(created), pg::IntArray(released)});
    if (!s.ok()) return Err("store: cannot add generation: " + s.error());
    return Status::Ok();
  }

  std::int64_t MaxGeneration(const std::string& machine) override {
    std::lock_guard lock(mu_);
    auto r = Q("SELECT COALESCE(MAX(generation), 0) FROM generations WHERE machine = $1", machine);
    return r.rows() == 1 ? r.Int(0, 0) : 0;
  }

  std::map<std::string, std::int64_t> MaxGenerations() override {
    std::lock_guard lock(mu_);
    auto r = Q("SELECT machine, MAX(generation) FROM generations GROUP BY machine");
    std::map<std::string, std::int64_t> out;
    for (int i = 0; i < r.rows(); ++i) out.emplace(r.Text(i, 0), r.Int(i, 1));
    return out;
  }

  Status ReleaseGeneration(const std::string& machine, std::int64_t generation) override {
    std::lock_guard lock(mu_);
    auto r = Q("UPDATE generations SET released = 1 WHERE machine = $1 AND generation = $2",
               machine, generation);
    if (!r.ok()) return Err("store: " + r.error());
    return Status::Ok();
  }

  Status CreateRollout(const RolloutRecord& r, const std::vector<GenerationRecord>& gens,
                       const std::vector<RolloutItemRecord>& items) override {
    std::lock_guard lock(mu_);
    if (auto b = Begin(); !b.ok()) return Err("store: " + b.error());
    auto fail = [&](std::string e) {
      (void)End("ROLLBACK");
      return Status(Err(std::move(e)));
    };
    // A few statements for the whole fleet, not three per machine: a rollout
    // of 10,000 machines was 40,000 round trips and 10,000 trigger runs.
    if (auto st = InsertGenerationsLocked(gens); !st) return fail(st.message());
    auto r1 =
        Q("INSERT INTO rollouts (id, created_at, created_by, canary, max_parallel, "
          "max_failures, state, detail, updated_at) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9)",
          r.id, r.created_at, r.created_by, r.canary, r.max_parallel, r.max_failures, r.state,
          r.detail, r.updated_at);
    if (!r1.ok()) return fail("store: cannot add rollout: " + r1.error());
    if (!items.empty()) {
      ItemColumns c(items, /*last_wins=*/true);
      auto i = Q(std::string("INSERT INTO rollout_items (rollout, position, machine, generation, "
                             "state, detail, updated_at, stage) SELECT * FROM ") +
                     ItemColumns::kUnnest,
                 c.rollout, c.position, c.machine, c.generation, c.state, c.detail, c.updated_at,
                 c.stage);
      if (!i.ok()) return fail("store: cannot add rollout item: " + i.error());
    }
    return CommitLocked("cannot add rollout");
  }

  Status UpdateRollout(const RolloutRecord& r) override {
    std::lock_guard lock(mu_);
    auto u = Q("UPDATE rollouts SET state = $1, detail = $2, updated_at = $3 WHERE id = $4",
               r.state, r.detail, r.updated_at, r.id);
    if (!u.ok()) return Err("store: " + u.error());
    return Status::Ok();
  }

  Status UpdateRolloutItem(const RolloutItemRecord& it) override {
    std::lock_guard lock(mu_);
    auto u =
        Q("UPDATE rollout_items SET state = $1, detail = $2, updated_at = $3 WHERE "
          "rollout = $4 AND position = $5",
          it.state, it.detail, it.updated_at, it.rollout, it.position);
    if (!u.ok()) return Err("store: " + u.error());
    return Status::Ok();
  }

  static constexpr const char* kRolloutCols =
      "id, created_at, created_by, canary, max_parallel, max_failures, state, detail, updated_at";

  static RolloutRecord ReadRollout(const Res& s, int i) {
    RolloutRecord r;
    r.id = s.Text(i, 0);
    r.created_at = s.Int(i, 1);
    r.created_by = s.Text(i, 2);
    r.canary = static_cast<int>(s.Int(i, 3));
    r.max_parallel = static_cast<int>(s.Int(i, 4));
    r.max_failures = static_cast<int>(s.Int(i, 5));
    r.state = s.Text(i, 6);
    r.detail = s.Text(i, 7);
    r.updated_at = s.Int(i, 8);
    return r;
  }

  std::optional<RolloutRecord> GetRollout(const std::string& id) override {
    std::lock_guard lock(mu_);
    auto r = Q(std::string("SELECT ") + kRolloutCols + " FROM rollouts WHERE id = $1", id);
    if (r.rows() != 1) return std::nullopt;
    return ReadRollout(r, 0);
  }

  std::vector<RolloutRecord> ListRollouts(int limit) override {
    std::lock_guard lock(mu_);
    std::vector<RolloutRecord> out;
    auto r = Q(std::string("SELECT ") + kRolloutCols +
                   " FROM rollouts ORDER BY created_at DESC, id COLLATE \"C\" DESC LIMIT $1",
               limit);
    for (int i = 0; i < r.rows(); ++i) out.push_back(ReadRollout(r, i));
    return out;
  }

  std::vector<RolloutItemRecord> ListRolloutItems(const std::string& id) override {
    std::lock_guard lock(mu_);
    std::vector<RolloutItemRecord> out;
    auto r =
        Q("SELECT rollout, position, machine, generation, stage, state, detail, updated_at "
          "FROM rollout_items WHERE rollout = $1 ORDER BY position",
          id);
    for (int i = 0; i < r.rows(); ++i) {
      RolloutItemRecord it;
      it.rollout = r.Text(i, 0);
      it.position = static_cast<int>(r.Int(i, 1));
      it.machine = r.Text(i, 2);
      it.generation = r.Int(i, 3);
      it.stage = static_cast<int>(r.Int(i, 4));
      it.state = r.Text(i, 5);
      it.detail = r.Text(i, 6);
      it.updated_at = r.Int(i, 7);
      out.push_back(std::move(it));
    }
    return out;
  }

  Status SetMachineRevoked(const std::string& name, bool revoked) override {
    std::lock_guard lock(mu_);
    auto r = Q("UPDATE machines SET revoked = $1 WHERE name = $2", revoked, name);
    if (!r.ok()) return Err("store: " + r.error());
    if (r.changes() == 0) return Err("no machine named '" + name + "'");
    return Status::Ok();
  }

  Status AddEnrollToken(const EnrollToken& t) override {
    std::lock_guard lock(mu_);
    auto r =
        Q("INSERT INTO enroll_tokens (hash, machine, tags, expires_at, created_by, "
          "grant_entry) VALUES ($1,$2,$3,$4,$5,$6)",
          t.hash, t.machine, DumpJson(json(t.tags)), t.expires_at, t.created_by, t.grant);
    if (!r.ok()) return Err("store: cannot add enrolment token: " + r.error());
    return Status::Ok();
  }

  Status SpendEnrollToken(const std::string& hash, const std::string& machine,
                          const std::string& key, const std::string& binding,
                          std::int64_t now) override {
    std::lock_guard lock(mu_);
    if (auto b = Begin(); !b.ok()) return Err("store: " + b.error());
    auto fail = [&](std::string e) {
      (void)End("ROLLBACK");
      return Status(Err(std::move(e)));
    };
    // FOR UPDATE: two controllers spending one token wait for each other, and
    // the second sees it spent.
    auto q =
        Q("SELECT machine, tags, expires_at, spent_at, grant_entry FROM enroll_tokens WHERE "
          "hash = $1 FOR UPDATE",
          hash);
    if (!q.ok()) return fail("store: " + q.error());
    if (q.rows() != 1) return fail("enrolment token is not valid");
    if (q.Int(0, 3) != 0) return fail("enrolment token was already used");
    if (q.Int(0, 2) < now) {
      return fail("enrolment token has expired; ask for a new one ('muster machine enroll')");
    }
    if (q.Text(0, 0) != machine) {
      return fail("enrolment token is for machine '" + q.Text(0, 0) + "', not '" + machine + "'");
    }
    auto spend = Q("UPDATE enroll_tokens SET spent_at = $1 WHERE hash = $2", now, hash);
    if (!spend.ok()) return fail("store: " + spend.error());
    auto add =
        Q("INSERT INTO machines (name, key, tags, created_at, roster, binding) VALUES "
          "($1, $2, $3, $4, $5, $6)",
          machine, key, q.Text(0, 1), now, q.Text(0, 4), binding);
    if (add.unique_violation()) {
      return fail("machine '" + machine + "' or this key is already registered");
    }
    if (!add.ok()) return fail("store: " + add.error());
    return CommitLocked("cannot enrol");
  }

  std::optional<EnrollToken> LiveEnrollToken(const std::string& machine,
                                             std::int64_t now) override {
    std::lock_guard lock(mu_);
    auto r =
        Q("SELECT hash, tags, expires_at, created_by, grant_entry FROM enroll_tokens WHERE "
          "machine = $1 AND spent_at = 0 AND expires_at >= $2 ORDER BY expires_at DESC "
          "LIMIT 1",
          machine, now);
    if (r.rows() != 1) return std::nullopt;
    EnrollToken t;
    t.hash = r.Text(0, 0);
    t.machine = machine;
    t.tags = StringList(r.Text(0, 1));
    t.expires_at = r.Int(0, 2);
    t.created_by = r.Text(0, 3);
    t.grant = r.Text(0, 4);
    return t;
  }

  int LiveEnrollTokens(std::int64_t now) override {
    std::lock_guard lock(mu_);
    auto r = Q("SELECT COUNT(*) FROM enroll_tokens WHERE spent_at = 0 AND expires_at >= $1", now);
    return r.rows() == 1 ? static_cast<int>(r.Int(0, 0)) : 0;
  }

  static constexpr const char* kGenCols = MUSTER_PG_GENERATION_COLUMNS("");

  std::optional<GenerationRecord> LatestGeneration(const std::string& machine) override {
    std::lock_guard lock(mu_);
    auto r = Q(std::string("SELECT ") + kGenCols +
                   " FROM generations WHERE machine = $1 AND released = 1 ORDER BY generation "
                   "DESC LIMIT 1",
               machine);
    if (r.rows() != 1) return std::nullopt;
    return pg::ReadGeneration(r, 0);
  }

  std::optional<GenerationRecord> GetGeneration(const std::string& machine,
                                                std::int64_t generation) override {
    std::lock_guard lock(mu_);
    auto r = Q(std::string("SELECT ") + kGenCols +
                   " FROM generations WHERE machine = $1 AND generation = $2",
               machine, generation);
    if (r.rows() != 1) return std::nullopt;
    return pg::ReadGeneration(r, 0);
  }

  std::vector<GenerationRecord> ListGenerations(const std::string& machine, int limit) override {
    std::lock_guard lock(mu_);
    std::vector<GenerationRecord> out;
    auto r = Q(std::string("SELECT ") + kGenCols +
                   " FROM generations WHERE machine = $1 ORDER BY generation DESC LIMIT $2",
               machine, limit);
    for (int i = 0; i < r.rows(); ++i) out.push_back(pg::ReadGeneration(r, i));
    return out;
  }

  std::vector<EventRecord> ListEvents(const std::string& machine, std::int64_t generation,
                                      int limit) override {
    std::lock_guard lock(mu_);
    std::vector<EventRecord> out;
    auto r =
        Q("SELECT id, machine, generation, phase, detail, at FROM events WHERE machine = $1 "
          "AND ($2::BIGINT = 0 OR generation = $2::BIGINT) ORDER BY id DESC LIMIT $3",
          machine, generation, limit);
    for (int i = r.rows() - 1; i >= 0; --i) {
      out.push_back(
          {r.Int(i, 0), r.Text(i, 1), r.Int(i, 2), r.Text(i, 3), r.Text(i, 4), r.Int(i, 5)});
    }
    return out;
  }

  bool HasGeneration(const std::string& machine, std::int64_t generation) override {
    std::lock_guard lock(mu_);
    auto r =
        Q("SELECT 1 FROM generations WHERE machine = $1 AND generation = $2", machine, generation);
    return r.rows() == 1;
  }

  Status AppendLogs(const std::vector<LogRecord>& lines) override {
    if (lines.empty()) return Status::Ok();
    std::lock_guard lock(mu_);
    if (auto b = Begin(); !b.ok()) return Err("store: cannot append logs: " + b.error());
    auto fail = [&](const std::string& what, const Res& r) {
      std::string e = what + ": " + r.error();
      (void)End("ROLLBACK");
      return Status(Err("store: cannot append logs: " + e));
    };
    std::map<std::pair<std::string, std::int64_t>, std::int64_t> added;  // (machine, gen) → bytes
    for (const auto& l : lines) {
      auto i =
          Q("INSERT INTO logs (machine, generation, stream, line, at) VALUES "
            "($1, $2, $3, $4, $5)",
            l.machine, l.generation, l.stream, l.line, l.at);
      if (!i.ok()) return fail("insert", i);
      added[{l.machine, l.generation}] +=
          static_cast<std::int64_t>(Param(l.line).size()) + StoreLimits::kLogRowOverhead;
    }
    std::set<std::string> machines;
    for (const auto& [key, bytes] : added) {
      machines.insert(key.first);
      auto z =
          Q("INSERT INTO log_sizes (machine, generation, bytes) VALUES ($1, $2, $3) "
            "ON CONFLICT (machine, generation) DO UPDATE SET bytes = log_sizes.bytes + "
            "excluded.bytes RETURNING bytes",
            key.first, key.second, bytes);
      if (z.rows() != 1) return fail("count", z);
      std::int64_t total = z.Int(0, 0);
      if (total > limits_.log_bytes_per_generation) {
        std::int64_t target = limits_.log_bytes_per_generation * 3 / 4;
        if (auto st = DropOldestLogLinesLocked(key.first, key.second, total - target); !st) {
          (void)End("ROLLBACK");
          return st;
        }
      }
    }
    for (const auto& machine : machines) {
      if (auto st = PruneMachineLogsLocked(machine); !st) {
        (void)End("ROLLBACK");
        return st;
      }
    }
    return CommitLocked("cannot append logs");
  }

  std::vector<LogRecord> ReadLogs(const std::string& machine, std::int64_t generation,
                                  std::int64_t after_id, int limit) override {
    std::lock_guard lock(mu_);
    std::vector<LogRecord> out;
    auto r =
        Q("SELECT id, machine, generation, stream, line, at FROM logs WHERE machine = $1 "
          "AND generation = $2 AND id > $3 ORDER BY id LIMIT $4",
          machine, generation, after_id, limit);
    for (int i = 0; i < r.rows(); ++i) {
      out.push_back(
          {r.Int(i, 0), r.Text(i, 1), r.Int(i, 2), r.Text(i, 3), r.Text(i, 4), r.Int(i, 5)});
    }
    return out;
  }

  std::uint64_t Failures() override { return failures_.load(std::memory_order_relaxed); }

  Status Ping() override {
    std::lock_guard lock(mu_);
    auto r = Q("SELECT 1");
    if (!r.ok()) return Err("PostgreSQL store unreachable: " + r.error());
    return Status::Ok();
  }

  std::optional<std::string> GetSetting(const std::string& key) override {
    std::lock_guard lock(mu_);
    auto r = Q("SELECT value FROM settings WHERE key = $1", key);
    if (r.rows() != 1) return std::nullopt;
    return r.Text(0, 0);
  }

  Status SetSetting(const std::string& key, const std::string& value) override {
    std::lock_guard lock(mu_);
    auto r =
        Q("INSERT INTO settings (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE "
          "SET value = excluded.value",
          key, value);
    if (!r.ok()) return Err("store: " + r.error());
    return Status::Ok();
  }

  // Copies every row of an SQLite store (opened read-only, schema current)
  // into this one, which must hold no machines, operators or generations; one
  // transaction, so a failure leaves it empty. Returns what was copied.
  Result<std::string> CopyFrom(sqlite3* db) {
    struct Table {
      const char* name;
      const char* cols;
      int ncols;
    };
    static constexpr Table kTables[] = {
        {"settings", "key, value", 2},
        {"machines",
         "name, key, tags, created_at, last_seen, facts, generation, phase, detail, toplevel, "
         "reboot_required, last_applied, revoked, roster, binding",
         15},
        {"operators", "name, key, created_at", 3},
        {"generations",
         "machine, generation, manifest, signer, signature, vars, toplevel, action, rollout, "
         "published_by, created_at, released",
         12},
        {"events", "id, machine, generation, phase, detail, at", 6},
        {"logs", "id, machine, generation, stream, line, at", 6},
        {"log_sizes", "machine, generation, bytes", 3},
        {"rollouts",
         "id, created_at, created_by, canary, max_parallel, max_failures, state, detail, "
         "updated_at",
         9},
        {"rollout_items",
         "rollout, position, machine, generation, stage, state, detail, updated_at", 8},
        {"enroll_tokens", "hash, machine, tags, expires_at, created_by, spent_at, grant_entry", 7},
        {"roster_removed", "name, roster, signed_at", 3},
        {"webhooks", "id, url, secret, events, created_by, created_at", 6},
        {"deliveries", "webhook, event, body, attempts, created_at, next_at, last_error", 7},
    };
    std::lock_guard lock(mu_);
    auto n =
        Q("SELECT (SELECT COUNT(*) FROM machines) + (SELECT COUNT(*) FROM operators) + "
          "(SELECT COUNT(*) FROM generations)");
    if (n.rows() != 1) return Err("store: " + n.error());
    if (n.Int(0, 0) != 0) {
      return Err(
          "the PostgreSQL store already holds machines, operators or generations; copy "
          "into an empty database only");
    }
    if (auto b = Begin(); !b.ok()) return Err("store: " + b.error());
    auto fail = [&](const std::string& e) {
      (void)End("ROLLBACK");
      return Error{e};
    };
    std::string summary;
    for (const auto& t : kTables) {
      std::string sel = std::string("SELECT ") + t.cols + " FROM " + t.name;
      if (std::string(t.name) == "settings") {
        sel += " WHERE key NOT IN ('schema_version', 'log_accounting')";
      }
      sqlite3_stmt* st = nullptr;
      if (sqlite3_prepare_v2(db, sel.c_str(), -1, &st, nullptr) != SQLITE_OK) {
        std::string e = sqlite3_errmsg(db);
        sqlite3_finalize(st);
        return fail(std::string("reading ") + t.name + " from SQLite: " + e);
      }
      std::string ins = std::string("INSERT INTO ") + t.name + " (" + t.cols + ") VALUES (";
      for (int i = 1; i <= t.ncols; ++i) ins += (i > 1 ? ",$" : "$") + std::to_string(i);
      ins += ")";
      if (std::string(t.name) == "settings") {
        ins += " ON CONFLICT (key) DO UPDATE SET value = excluded.value";
      }
      std::int64_t rows = 0;
      int rc;
      while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        std::vector<std::string> vals;
        for (int i = 0; i < t.ncols; ++i) {
          const auto* p = sqlite3_column_text(st, i);
          vals.push_back(
              Param(p ? std::string(reinterpret_cast<const char*>(p),
                                    static_cast<std::size_t>(sqlite3_column_bytes(st, i)))
                      : std::string()));
        }
        auto r = QV(ins, vals);
        if (!r.ok()) {
          sqlite3_finalize(st);
          return fail(std::string("writing ") + t.name + " to PostgreSQL: " + r.error());
        }
        ++rows;
      }
      sqlite3_finalize(st);
      if (rc != SQLITE_DONE) {
        return fail(std::string("reading ") + t.name + " from SQLite: " + sqlite3_errmsg(db));
      }
      if (rows > 0 && std::string(t.name) != "settings" && std::string(t.name) != "log_sizes") {
        summary += (summary.empty() ? "" : ", ") + std::to_string(rows) + " " + t.name;
      }
    }
    for (const char* seq : {"events", "logs", "deliveries"}) {
      auto r = Q(std::string("SELECT setval(pg_get_serial_sequence('") + seq +
                 "', 'id'), COALESCE((SELECT MAX(id) FROM " + seq + "), 0) + 1, false)");
      if (!r.ok()) return fail(std::string("setting the ") + seq + " sequence: " + r.error());
    }
    if (auto c = End("COMMIT"); !c.ok()) return Err("store: cannot commit the copy: " + c.error());
    return summary.empty() ? std::string("nothing (the SQLite store was empty)") : summary;
  }

  // --- Notifications ---
  Status AddWebhook(const WebhookRecord& w) override {
    std::lock_guard lock(mu_);
    auto r =
        Q("INSERT INTO webhooks (id, url, secret, events, created_by, created_at) VALUES ($1, "
          "$2, $3, $4, $5, $6)",
          w.id, w.url, w.secret, DumpJson(json(w.events)), w.created_by, w.created_at);
    if (r.unique_violation()) return Err("webhook '" + w.id + "' exists already");
    if (!r.ok()) return Err("store: " + r.error());
    return Status::Ok();
  }

  Status RemoveWebhook(const std::string& id) override {
    std::lock_guard lock(mu_);
    if (auto b = Begin(); !b.ok()) return Err("store: " + b.error());
    auto d = Q("DELETE FROM webhooks WHERE id = $1", id);
    if (!d.ok() || d.changes() == 0) {
      (void)End("ROLLBACK");
      if (!d.ok()) return Err("store: " + d.error());
      return Err("no webhook '" + id + "'; see 'muster webhook list'");
    }
    if (auto q = Q("DELETE FROM deliveries WHERE webhook = $1", id); !q.ok()) {
      (void)End("ROLLBACK");
      return Err("store: " + q.error());
    }
    return CommitLocked("cannot remove webhook");
  }

  std::vector<WebhookRecord> ListWebhooks() override {
    std::lock_guard lock(mu_);
    std::vector<WebhookRecord> out;
    auto r =
        Q("SELECT id, url, secret, events, created_by, created_at FROM webhooks ORDER BY "
          "created_at, id");
    for (int i = 0; i < r.rows(); ++i) {
      WebhookRecord w;
      w.id = r.Text(i, 0);
      w.url = r.Text(i, 1);
      w.secret = r.Text(i, 2);
      w.events = StringList(r.Text(i, 3));
      w.created_by = r.Text(i, 4);
      w.created_at = r.Int(i, 5);
      out.push_back(std::move(w));
    }
    return out;
  }

  Result<std::int64_t> EnqueueDeliveries(const std::vector<DeliveryRecord>& deliveries,
                                         std::int64_t max_queued) override {
    std::lock_guard lock(mu_);
    if (deliveries.empty()) return std::int64_t{0};
    if (auto b = Begin(); !b.ok()) return Err("store: " + b.error());
    auto dropped = EnqueueDeliveriesLocked(deliveries, max_queued);
    if (!dropped) {
      (void)End("ROLLBACK");
      return dropped;
    }
    if (auto st = CommitLocked("cannot queue notifications"); !st) return st.error();
    return dropped;
  }

  // The inserts and the bound of EnqueueDeliveries; the caller holds mu_ and
  // a transaction (and rolls it back on an error).
  Result<std::int64_t> EnqueueDeliveriesLocked(const std::vector<DeliveryRecord>& deliveries,
                                               std::int64_t max_queued) {
    auto fail = [&](const std::string& e) { return Error{"store: " + e}; };
    for (const auto& d : deliveries) {
      auto r =
          Q("INSERT INTO deliveries (webhook, event, body, attempts, created_at, next_at, "
            "last_error) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            d.webhook, d.event, d.body, d.attempts, d.created_at, d.next_at, d.last_error);
      if (!r.ok()) return fail(r.error());
    }
    // The bound holds across controllers: the oldest rows go, whoever queued
    // them (the same as one controller's queue on SQLite).
    auto c =
        Q("WITH n AS (SELECT COUNT(*) - $1 AS over FROM deliveries), d AS (DELETE FROM "
          "deliveries WHERE id IN (SELECT id FROM deliveries ORDER BY id LIMIT (SELECT "
          "GREATEST(over, 0) FROM n)) RETURNING 1) SELECT COUNT(*) FROM d",
          max_queued);
    if (c.rows() != 1) return fail(c.error());
    return c.Int(0, 0);
  }

  // The deliveries the writes carry, in the caller's transaction.
  Status QueueNotificationsLocked(std::span<const StatusWrite> writes) {
    return QueueDeliveriesOf(writes, [this](const auto& all, std::int64_t max_queued) {
      return EnqueueDeliveriesLocked(all, max_queued);
    });
  }

  // Claims what it returns for this controller: a delivery claimed by a live
  // controller is not due for the others, so each is sent by one at a time.
  // Rows being claimed by another controller's concurrent call are skipped.
  std::vector<DeliveryRecord> DueDeliveries(std::int64_t now, int limit) override {
    std::lock_guard lock(mu_);
    std::vector<DeliveryRecord> out;
    auto r =
        Q("UPDATE deliveries SET claimed_by = $3 WHERE id IN (SELECT id FROM deliveries "
          "WHERE next_at <= $1 AND " +
              std::string(kUnclaimed) +
              " ORDER BY next_at, id LIMIT $2 FOR UPDATE SKIP LOCKED) RETURNING id, "
              "webhook, event, body, attempts, created_at, next_at, last_error",
          now, limit, controller_id_);
    for (int i = 0; i < r.rows(); ++i) {
      out.push_back({r.Int(i, 0), r.Text(i, 1), r.Text(i, 2), r.Text(i, 3),
                     static_cast<int>(r.Int(i, 4)), r.Int(i, 5), r.Int(i, 6), r.Text(i, 7)});
    }
    std::sort(out.begin(), out.end(), [](const DeliveryRecord& a, const DeliveryRecord& b) {
      return a.next_at != b.next_at ? a.next_at < b.next_at : a.id < b.id;
    });
    return out;
  }

  std::optional<std::int64_t> NextDeliveryAt() override {
    std::lock_guard lock(mu_);
    auto r = Q("SELECT MIN(next_at) FROM deliveries WHERE " + std::string(kUnclaimed));
    if (r.rows() != 1 || r.Null(0, 0)) return std::nullopt;
    return r.Int(0, 0);
  }

  Status RescheduleDelivery(const DeliveryRecord& d) override {
    std::lock_guard lock(mu_);
    auto r =
        Q("UPDATE deliveries SET attempts = $1, next_at = $2, last_error = $3, claimed_by = '' "
          "WHERE id = $4",
          d.attempts, d.next_at, d.last_error, d.id);
    if (!r.ok()) return Err("store: " + r.error());
    return Status::Ok();
  }

  Status RemoveDelivery(std::int64_t id) override {
    std::lock_guard lock(mu_);
    auto r = Q("DELETE FROM deliveries WHERE id = $1", id);
    if (!r.ok()) return Err("store: " + r.error());
    return Status::Ok();
  }

  std::int64_t QueuedDeliveries() override {
    std::lock_guard lock(mu_);
    auto r = Q("SELECT COUNT(*) FROM deliveries");
    return r.rows() == 1 ? r.Int(0, 0) : 0;
  }

 private:
  // A delivery free to claim: never claimed, released after an attempt, or
  // claimed by a controller whose lease ran out (it died while sending; the
  // receiver may have had it, hence at-least-once). A store without a
  // controller id (one controller, tests) claims as ''.
  static constexpr const char* kUnclaimed =
      "(claimed_by = '' OR NOT EXISTS (SELECT 1 FROM controllers c WHERE c.id = "
      "deliveries.claimed_by AND c.expires_at > muster_now()))";

  // Connects (or reconnects) with explicit timeouts; a URI's own settings win
  // over these defaults. Every session commits synchronously, whatever the
  // server's default, so that a call returns only once its change is flushed.
  Status ConnectLocked() {
    if (conn_) PQfinish(conn_);
    std::string options =
        "-c synchronous_commit=on -c statement_timeout=30000 "
        "-c client_encoding=UTF8 -c client_min_messages=warning";
    if (!controller_id_.empty()) options += " -c muster.controller=" + controller_id_;
    conn_ = pg::Connect(conninfo_, "muster-controller", "10", options);
    if (conn_ == nullptr) return Err("store: cannot connect to PostgreSQL: out of memory");
    if (PQstatus(conn_) != CONNECTION_OK) {
      return Err("store: cannot connect to PostgreSQL (" + Redacted() +
                 "): " + pg::ConnectionError(conn_));
    }
    return Status::Ok();
  }

  // The connection string without a password, for messages.
  std::string Redacted() const {
    std::string s = conninfo_;
    auto scheme = s.find("://");
    auto at = s.find('@');
    if (scheme != std::string::npos && at != std::string::npos && at > scheme) {
      auto colon = s.find(':', scheme + 3);
      if (colon != std::string::npos && colon < at) s.replace(colon + 1, at - colon - 1, "***");
    }
    auto pw = s.find("password=");
    if (pw != std::string::npos) {
      auto end = s.find(' ', pw);
      s.replace(pw + 9, (end == std::string::npos ? s.size() : end) - pw - 9, "***");
    }
    return s;
  }

  // Runs one statement with text parameters. A connection found broken is
  // re-established first (outside a transaction only: a transaction that lost
  // its connection is gone, and its caller sees the error).
  // Reconnects are tried at most once a second, so that while the database is
  // down calls fail at once instead of each waiting for connect_timeout.
  template <typename... Args>
  Res Q(const std::string& sql, const Args&... args) {
    return QV(sql, {Param(args)...});
  }

  Res QV(const std::string& sql, const std::vector<std::string>& params) {
    if (PQstatus(conn_) != CONNECTION_OK && !in_tx_) {
      auto now = std::chrono::steady_clock::now();
      if (now - last_reset_ >= std::chrono::seconds(1)) {
        last_reset_ = now;
        PQreset(conn_);
      }
    }
    std::vector<const char*> ptrs;
    ptrs.reserve(params.size());
    for (const auto& p : params) ptrs.push_back(p.c_str());
    Res r(PQexecParams(conn_, sql.c_str(), static_cast<int>(ptrs.size()), nullptr, ptrs.data(),
                       nullptr, nullptr, 0));
    if (!r.ok()) failures_.fetch_add(1, std::memory_order_relaxed);
    return r;
  }

  // Transactions are tracked here: a connection lost inside one is not
  // re-established until the caller ends it, so that no later statement of
  // that transaction runs on its own on a fresh connection.
  Res Begin() {
    auto r = Q("BEGIN");
    in_tx_ = r.ok();
    return r;
  }
  Res End(const char* sql) {
    auto r = Q(sql);
    in_tx_ = false;
    return r;
  }

  Status CommitLocked(const std::string& what) {
    auto r = End("COMMIT");
    if (!r.ok()) {
      (void)End("ROLLBACK");
      return Err("store: " + what + ": " + r.error());
    }
    return Status::Ok();
  }

  // Deletes the oldest lines of (machine, generation) worth at least `bytes`
  // and updates the count; the caller holds mu_ and a transaction.
  Status DropOldestLogLinesLocked(const std::string& machine, std::int64_t generation,
                                  std::int64_t bytes) {
    auto q =
        Q("SELECT COALESCE(MAX(id), -1), COALESCE(SUM(cost), 0) FROM (SELECT id, cost, "
          "SUM(cost) OVER (ORDER BY id) - cost AS before FROM (SELECT id, "
          "OCTET_LENGTH(line) + $3::BIGINT AS cost FROM logs WHERE machine = $1 AND "
          "generation = $2) c) t WHERE before < $4::BIGINT",
          machine, generation, StoreLimits::kLogRowOverhead, bytes);
    if (q.rows() != 1) return Err("store: cannot prune logs: " + q.error());
    std::int64_t last_id = q.Int(0, 0), removed = q.Int(0, 1);
    auto d = Q("DELETE FROM logs WHERE machine = $1 AND generation = $2 AND id <= $3", machine,
               generation, last_id);
    auto z = Q("UPDATE log_sizes SET bytes = bytes - $1 WHERE machine = $2 AND generation = $3",
               removed, machine, generation);
    auto e = Q("DELETE FROM log_sizes WHERE machine = $1 AND generation = $2 AND bytes <= 0",
               machine, generation);
    if (!d.ok() || !z.ok() || !e.ok()) {
      return Err("store: cannot prune logs: " + (!d.ok()   ? d.error()
                                                 : !z.ok() ? z.error()
                                                           : e.error()));
    }
    return Status::Ok();
  }

  // Brings the machine's logs to 3/4 of its bound when they exceed it: whole
  // generations go first, lowest number (oldest) first, then the oldest lines
  // of the next. The caller holds mu_ and a transaction.
  Status PruneMachineLogsLocked(const std::string& machine) {
    auto t = Q("SELECT COALESCE(SUM(bytes), 0) FROM log_sizes WHERE machine = $1", machine);
    if (t.rows() != 1) return Err("store: cannot prune logs: " + t.error());
    std::int64_t total = t.Int(0, 0);
    if (total <= limits_.log_bytes_per_machine) return Status::Ok();
    const std::int64_t target = limits_.log_bytes_per_machine * 3 / 4;
    while (total > target) {
      auto q =
          Q("SELECT generation, bytes FROM log_sizes WHERE machine = $1 ORDER BY generation "
            "LIMIT 1",
            machine);
      if (!q.ok()) return Err("store: cannot prune logs: " + q.error());
      if (q.rows() == 0) return Status::Ok();
      std::int64_t generation = q.Int(0, 0), bytes = q.Int(0, 1);
      if (bytes <= total - target) {
        auto d = Q("DELETE FROM logs WHERE machine = $1 AND generation = $2", machine, generation);
        auto z =
            Q("DELETE FROM log_sizes WHERE machine = $1 AND generation = $2", machine, generation);
        if (!d.ok() || !z.ok()) {
          return Err("store: cannot prune logs: " + (d.ok() ? z.error() : d.error()));
        }
        total -= bytes;
      } else {
        if (auto st = DropOldestLogLinesLocked(machine, generation, total - target); !st) {
          return st;
        }
        auto again = Q("SELECT COALESCE(SUM(bytes), 0) FROM log_sizes WHERE machine = $1", machine);
        if (again.rows() != 1) return Err("store: cannot prune logs: " + again.error());
        total = again.Int(0, 0);
      }
    }
    return Status::Ok();
  }

  // Counts the event just inserted for each of `machines` (distinct) in
  // event_counts, shared by all controllers: a missing count row is created
  // from the table, one another controller creates meanwhile is added to.
  // Past the bound, TrimEventsLocked. The caller holds mu_ and a transaction.
  Status BoundEventsLocked(const std::vector<std::string>& machines) {
    const std::string all = pg::TextArray(machines);
    auto c =
        Q("UPDATE event_counts SET rows = rows + 1 WHERE machine = ANY($1::TEXT[]) "
          "RETURNING machine, rows",
          all);
    if (!c.ok()) return Err("store: cannot count events: " + c.error());
    std::vector<std::pair<std::string, std::int64_t>> counts;
    std::unordered_set<std::string> counted;
    for (int r = 0; r < c.rows(); ++r) {
      counts.emplace_back(c.Text(r, 0), c.Int(r, 1));
      counted.insert(counts.back().first);
    }
    std::vector<std::string> missing;
    for (const auto& m : machines) {
      if (!counted.count(m)) missing.push_back(m);
    }
    if (!missing.empty()) {
      auto f =
          Q("INSERT INTO event_counts (machine, rows) SELECT u.name, (SELECT COUNT(*) FROM "
            "events e WHERE e.machine = u.name) FROM unnest($1::TEXT[]) AS u(name) "
            "ON CONFLICT (machine) DO UPDATE SET rows = event_counts.rows + 1 "
            "RETURNING machine, rows",
            pg::TextArray(missing));
      if (!f.ok()) return Err("store: cannot count events: " + f.error());
      for (int r = 0; r < f.rows(); ++r) counts.emplace_back(f.Text(r, 0), f.Int(r, 1));
    }
    for (const auto& [machine, rows] : counts) {
      if (rows <= limits_.events_per_machine) continue;
      if (auto st = TrimEventsLocked(machine, rows); !st) return st;
    }
    return Status::Ok();
  }

  // Deletes a machine's oldest events (`rows` of them) down to 3/4 of the
  // bound, sparing the newest generations' events unless they alone are too
  // many. The caller holds mu_ and a transaction.
  Status TrimEventsLocked(const std::string& machine, std::int64_t rows) {
    const std::int64_t target = limits_.events_per_machine - limits_.events_per_machine / 4;
    auto d1 =
        Q("DELETE FROM events WHERE id IN (SELECT id FROM events WHERE machine = $1 AND "
          "generation NOT IN (SELECT generation FROM generations WHERE machine = $1 ORDER "
          "BY generation DESC LIMIT $2) ORDER BY id LIMIT $3)",
          machine, limits_.keep_event_generations, rows - target);
    if (!d1.ok()) return Err("store: cannot prune events: " + d1.error());
    rows -= d1.changes();
    if (rows > target) {
      auto d2 =
          Q("DELETE FROM events WHERE id IN (SELECT id FROM events WHERE machine = $1 "
            "ORDER BY id LIMIT $2)",
            machine, rows - target);
      if (!d2.ok()) return Err("store: cannot prune events: " + d2.error());
      rows -= d2.changes();
    }
    auto u = Q("UPDATE event_counts SET rows = $1 WHERE machine = $2", rows, machine);
    if (!u.ok()) return Err("store: cannot count events: " + u.error());
    return Status::Ok();
  }

  std::mutex mu_;
  const StoreLimits limits_;
  const std::string conninfo_;
  PGconn* conn_ = nullptr;
  bool in_tx_ = false;
  std::string controller_id_;  // SetControllerId; "" = not one of several controllers
  std::atomic<std::uint64_t> failures_{0};
  std::chrono::steady_clock::time_point last_reset_{};
};

}  // namespace

bool IsPostgresStoreSpec(const std::string& spec) {
  return spec.rfind("postgresql://", 0) == 0 || spec.rfind("postgres://", 0) == 0;
}

Result<std::unique_ptr<Store>> OpenPostgresStore(const std::string& conninfo,
                                                 const StoreLimits& limits) {
  if (auto st = CheckStoreLimits(limits); !st) return st.error();
  auto store = std::make_unique<PgStore>(conninfo, limits);
  if (auto st = store->Init(); !st) return Err("cannot open store: " + st.message());
  return std::unique_ptr<Store>(std::move(store));
}

Result<std::string> CopySqliteToPostgres(const std::string& sqlite_path,
                                         const std::string& conninfo) {
  {
    // Brings the SQLite schema up to date (and fails clearly on a bad path).
    auto src = OpenSqliteStore(sqlite_path);
    if (!src) return src.error();
  }
  auto store = std::make_unique<PgStore>(conninfo, StoreLimits{});
  if (auto st = store->Init(); !st) return Err("cannot open store: " + st.message());
  sqlite3* db = nullptr;
  if (sqlite3_open_v2(sqlite_path.c_str(), &db, SQLITE_OPEN_READONLY, nullptr) != SQLITE_OK) {
    std::string e = db ? sqlite3_errmsg(db) : "out of memory";
    sqlite3_close(db);
    return Err("cannot open " + sqlite_path + ": " + e);
  }
  sqlite3_busy_timeout(db, 5000);
  auto copied = store->CopyFrom(db);
  sqlite3_close(db);
  return copied;
}

Result<std::unique_ptr<Store>> OpenStore(const std::string& spec, const StoreLimits& limits) {
  if (IsPostgresStoreSpec(spec)) return OpenPostgresStore(spec, limits);
  return OpenSqliteStore(spec, limits);
}

}  // namespace muster
