// SQLite implementation of Store: one connection, WAL, synchronous=FULL, a
// mutex around every call.
#include <sqlite3.h>

#include <map>
#include <mutex>
#include <unordered_map>

#include "common/json_limits.h"
#include "controller/store.h"

namespace muster {

namespace {

using nlohmann::json;

constexpr int kSchemaVersion = 1;

constexpr const char* kSchema = R"SQL(
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS machines (
  name TEXT PRIMARY KEY,
  key TEXT NOT NULL UNIQUE,
  tags TEXT NOT NULL DEFAULT '[]',
  created_at INTEGER NOT NULL,
  last_seen INTEGER NOT NULL DEFAULT 0,
  facts TEXT NOT NULL DEFAULT '{}',
  generation INTEGER NOT NULL DEFAULT 0,
  phase TEXT NOT NULL DEFAULT 'idle',
  detail TEXT NOT NULL DEFAULT '',
  toplevel TEXT NOT NULL DEFAULT '',
  reboot_required INTEGER NOT NULL DEFAULT 0,
  last_applied INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS operators (
  name TEXT PRIMARY KEY,
  key TEXT NOT NULL UNIQUE,
  created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS generations (
  machine TEXT NOT NULL,
  generation INTEGER NOT NULL,
  manifest TEXT NOT NULL,
  signer TEXT NOT NULL,
  signature TEXT NOT NULL,
  vars TEXT NOT NULL,
  toplevel TEXT NOT NULL,
  action TEXT NOT NULL,
  rollout TEXT NOT NULL DEFAULT '',
  published_by TEXT NOT NULL DEFAULT '',
  created_at INTEGER NOT NULL,
  PRIMARY KEY (machine, generation)
);
CREATE TABLE IF NOT EXISTS events (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  machine TEXT NOT NULL,
  generation INTEGER NOT NULL,
  phase TEXT NOT NULL,
  detail TEXT NOT NULL,
  at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS events_machine ON events (machine, generation, id);
CREATE TABLE IF NOT EXISTS logs (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  machine TEXT NOT NULL,
  generation INTEGER NOT NULL,
  stream TEXT NOT NULL,
  line TEXT NOT NULL,
  at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS logs_machine ON logs (machine, generation, id);
CREATE TABLE IF NOT EXISTS rollouts (
  id TEXT PRIMARY KEY,
  created_at INTEGER NOT NULL,
  created_by TEXT NOT NULL,
  canary INTEGER NOT NULL,
  max_parallel INTEGER NOT NULL,
  max_failures INTEGER NOT NULL,
  state TEXT NOT NULL,
  detail TEXT NOT NULL DEFAULT '',
  updated_at INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS rollout_items (
  rollout TEXT NOT NULL,
  position INTEGER NOT NULL,
  machine TEXT NOT NULL,
  generation INTEGER NOT NULL,
  stage INTEGER NOT NULL,
  state TEXT NOT NULL,
  detail TEXT NOT NULL DEFAULT '',
  updated_at INTEGER NOT NULL DEFAULT 0,
  PRIMARY KEY (rollout, position)
);
CREATE TABLE IF NOT EXISTS enroll_tokens (
  hash TEXT PRIMARY KEY,
  machine TEXT NOT NULL,
  tags TEXT NOT NULL,
  expires_at INTEGER NOT NULL,
  created_by TEXT NOT NULL,
  spent_at INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS roster_removed (
  name TEXT PRIMARY KEY,
  roster TEXT NOT NULL,
  signed_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS webhooks (
  id TEXT PRIMARY KEY,
  url TEXT NOT NULL,
  secret TEXT NOT NULL,
  events TEXT NOT NULL DEFAULT '[]',
  created_by TEXT NOT NULL DEFAULT '',
  created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS deliveries (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  webhook TEXT NOT NULL,
  event TEXT NOT NULL,
  body TEXT NOT NULL,
  attempts INTEGER NOT NULL DEFAULT 0,
  created_at INTEGER NOT NULL,
  next_at INTEGER NOT NULL,
  last_error TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (next_at, id);
CREATE TABLE IF NOT EXISTS log_sizes (
  machine TEXT NOT NULL,
  generation INTEGER NOT NULL,
  bytes INTEGER NOT NULL,
  PRIMARY KEY (machine, generation)
);
)SQL";

// Prepared statements, cached per connection and keyed by their SQL text:
// preparing cost more CPU than executing the small statements of a status
// report. Every use happens under the store's mutex; a statement already in use
// (the same SQL twice in one scope) is prepared afresh and finalized after use.
struct CachedStmt {
  sqlite3_stmt* s = nullptr;
  bool busy = false;
};
std::mutex g_stmt_cache_mu;
std::map<sqlite3*, std::unordered_map<std::string, CachedStmt>> g_stmt_cache;

void FinalizeCachedStatements(sqlite3* db) {
  std::lock_guard lock(g_stmt_cache_mu);
  auto it = g_stmt_cache.find(db);
  if (it == g_stmt_cache.end()) return;
  for (auto& [sql, c] : it->second) sqlite3_finalize(c.s);
  g_stmt_cache.erase(it);
}

class Stmt {
 public:
  Stmt(sqlite3* db, const char* sql) : db_(db) {
    {
      std::lock_guard lock(g_stmt_cache_mu);
      auto& per_db = g_stmt_cache[db];
      auto it = per_db.find(sql);
      if (it != per_db.end() && !it->second.busy) {
        cached_ = &it->second;
        cached_->busy = true;
        s_ = cached_->s;
        return;
      }
    }
    if (sqlite3_prepare_v2(db, sql, -1, &s_, nullptr) != SQLITE_OK) {
      s_ = nullptr;
      return;
    }
    std::lock_guard lock(g_stmt_cache_mu);
    auto [it, fresh] = g_stmt_cache[db].try_emplace(sql, CachedStmt{s_, true});
    if (fresh) cached_ = &it->second;
  }
  ~Stmt() {
    if (cached_ == nullptr) {
      sqlite3_finalize(s_);
      return;
    }
    sqlite3_reset(s_);
    sqlite3_clear_bindings(s_);
    std::lock_guard lock(g_stmt_cache_mu);
    cached_->busy = false;
  }
  Stmt(const Stmt&) = delete;
  Stmt& operator=(const Stmt&) = delete;

  bool valid() const { return s_ != nullptr; }
  Stmt& Bind(int i, const std::string& v) {
    sqlite3_bind_text(s_, i, v.data(), static_cast<int>(v.size()), SQLITE_TRANSIENT);
    return *this;
  }
  Stmt& Bind(int i, std::int64_t v) {
    sqlite3_bind_int64(s_, i, v);
    return *this;
  }
  // SQLITE_ROW, SQLITE_DONE or an error code.
  int Step() { return s_ ? sqlite3_step(s_) : SQLITE_ERROR; }
  std::string Text(int i) const {
    const auto* p = sqlite3_column_text(s_, i);
    return p ? std::string(reinterpret_cast<const char*>(p),
                           static_cast<size_t>(sqlite3_column_bytes(s_, i)))
             : std::string();
  }
  std::int64_t Int(int i) const { return sqlite3_column_int64(s_, i); }
  bool IsNull(int i) const { return sqlite3_column_type(s_, i) == SQLITE_NULL; }
  std::string ErrorText() const { return sqlite3_errmsg(db_); }

 private:
  sqlite3* db_;
  sqlite3_stmt* s_ = nullptr;
  CachedStmt* cached_ = nullptr;
};

json ParseOr(const std::string& text, json fallback) {
  json j = json::parse(text, nullptr, false);
  return j.is_discarded() ? fallback : j;
}

class SqliteStore final : public Store {
 public:
  SqliteStore(sqlite3* db, const StoreLimits& limits) : limits_(limits), db_(db) {}
  ~SqliteStore() override {
    FinalizeCachedStatements(db_);
    sqlite3_close(db_);
  }

  Status Init() {
    if (auto st = Exec("PRAGMA journal_mode=WAL"); !st) return st;
    if (auto st = Exec("PRAGMA synchronous=FULL"); !st) return st;
    if (auto st = Exec("PRAGMA foreign_keys=ON"); !st) return st;
    sqlite3_busy_timeout(db_, 5000);
    if (auto st = Exec(kSchema); !st) return st;
    AddColumnIfMissing("generations", "released", "INTEGER NOT NULL DEFAULT 1");
    AddColumnIfMissing("machines", "revoked", "INTEGER NOT NULL DEFAULT 0");
    AddColumnIfMissing("machines", "roster", "TEXT NOT NULL DEFAULT ''");
    AddColumnIfMissing("machines", "binding", "TEXT NOT NULL DEFAULT ''");
    AddColumnIfMissing("enroll_tokens", "grant_entry", "TEXT NOT NULL DEFAULT ''");
    auto v = GetSettingLocked("schema_version");
    if (v && std::stoi(*v) > kSchemaVersion) {
      return Err("store schema version " + *v + " is newer than this controller supports (" +
                 std::to_string(kSchemaVersion) + "); upgrade muster-controller");
    }
    if (auto st = RecountLogSizes(); !st) return st;
    return SetSettingLocked("schema_version", std::to_string(kSchemaVersion));
  }

  // log_sizes once counted line bytes only; it now also counts a per-row
  // overhead (StoreLimits::kLogRowOverhead). Recounted once per store.
  Status RecountLogSizes() {
    if (GetSettingLocked("log_accounting") == "2") return Status::Ok();
    std::string sql =
        "UPDATE log_sizes SET bytes = (SELECT COALESCE(SUM(LENGTH(CAST(line AS BLOB)) + " +
        std::to_string(StoreLimits::kLogRowOverhead) +
        "), 0) FROM logs WHERE logs.machine = log_sizes.machine AND "
        "logs.generation = log_sizes.generation)";
    if (auto st = Exec(sql.c_str()); !st) return st;
    return SetSettingLocked("log_accounting", "2");
  }

  Status AddMachine(const MachineRecord& m) override {
    std::lock_guard lock(mu_);
    Stmt s(db_,
           "INSERT INTO machines (name, key, tags, created_at, roster, binding) VALUES (?, ?, ?, "
           "?, ?, ?)");
    s.Bind(1, m.name)
        .Bind(2, m.key)
        .Bind(3, DumpJson(json(m.tags)))
        .Bind(4, m.created_at)
        .Bind(5, m.roster)
        .Bind(6, m.binding);
    int rc = s.Step();
    if (rc == SQLITE_CONSTRAINT) {
      return Err("machine '" + m.name +
                 "' or its key is already registered; remove it first "
                 "('muster machine remove " +
                 m.name + "') to register it again");
    }
    if (rc != SQLITE_DONE) return Err("store: cannot add machine: " + s.ErrorText());
    return Status::Ok();
  }

  Status RemoveMachine(const std::string& name) override {
    std::lock_guard lock(mu_);
    Stmt s(db_, "DELETE FROM machines WHERE name = ?");
    s.Bind(1, name);
    if (s.Step() != SQLITE_DONE) return Err("store: cannot remove machine: " + s.ErrorText());
    if (sqlite3_changes(db_) == 0) return Err("no machine named '" + name + "'");
    return Status::Ok();
  }

  Status SetMachineTags(const std::string& name, const std::vector<std::string>& tags) override {
    std::lock_guard lock(mu_);
    Stmt s(db_, "UPDATE machines SET tags = ? WHERE name = ?");
    s.Bind(1, DumpJson(json(tags))).Bind(2, name);
    if (s.Step() != SQLITE_DONE) return Err("store: " + s.ErrorText());
    if (sqlite3_changes(db_) == 0) return Err("no machine named '" + name + "'");
    return Status::Ok();
  }

  Status SetMachineRoster(const std::string& name, const std::vector<std::string>& tags,
                          const std::string& roster, const std::string& binding) override {
    std::lock_guard lock(mu_);
    Stmt s(db_, "UPDATE machines SET tags = ?, roster = ?, binding = ? WHERE name = ?");
    s.Bind(1, json(tags).dump()).Bind(2, roster).Bind(3, binding).Bind(4, name);
    if (s.Step() != SQLITE_DONE) return Err("store: " + s.ErrorText());
    if (sqlite3_changes(db_) == 0) return Err("no machine named '" + name + "'");
    return Status::Ok();
  }

  Status RecordRemoval(const std::string& name, const std::string& roster,
                       std::int64_t signed_at) override {
    std::lock_guard lock(mu_);
    Stmt s(db_,
           "INSERT INTO roster_removed (name, roster, signed_at) VALUES (?, ?, ?) ON CONFLICT "
           "(name) DO UPDATE SET roster = excluded.roster, signed_at = excluded.signed_at");
    s.Bind(1, name).Bind(2, roster).Bind(3, signed_at);
    if (s.Step() != SQLITE_DONE) return Err("store: " + s.ErrorText());
    return Status::Ok();
  }

  std::vector<std::pair<std::string, std::string>> ListRemovals() override {
    std::lock_guard lock(mu_);
    std::vector<std::pair<std::string, std::string>> out;
    Stmt s(db_, "SELECT name, roster FROM roster_removed ORDER BY name");
    while (s.Step() == SQLITE_ROW) out.emplace_back(s.Text(0), s.Text(1));
    return out;
  }

  std::int64_t RemovalSignedAt(const std::string& name) override {
    std::lock_guard lock(mu_);
    Stmt s(db_, "SELECT signed_at FROM roster_removed WHERE name = ?");
    s.Bind(1, name);
    return s.Step() == SQLITE_ROW ? s.Int(0) : 0;
  }

  static constexpr const char* kMachineCols =
      "name, key, tags, created_at, last_seen, facts, generation, phase, detail, toplevel, "
      "reboot_required, last_applied, revoked, roster, binding";

  static MachineRecord ReadMachine(const Stmt& s) {
    MachineRecord m;
    m.name = s.Text(0);
    m.key = s.Text(1);
    json tags = ParseOr(s.Text(2), json::array());
    if (tags.is_array()) {
      for (const auto& t : tags) {
        if (t.is_string()) m.tags.push_back(t.get<std::string>());
      }
    }
    m.created_at = s.Int(3);
    m.last_seen = s.Int(4);
    m.facts = ParseOr(s.Text(5), json::object());
    m.generation = s.Int(6);
    m.phase = s.Text(7);
    m.detail = s.Text(8);
    m.toplevel = s.Text(9);
    m.reboot_required = s.Int(10) != 0;
    m.last_applied = s.Int(11);
    m.revoked = s.Int(12) != 0;
    m.roster = s.Text(13);
    m.binding = s.Text(14);
    return m;
  }

  std::vector<MachineRecord> ListMachines() override {
    std::lock_guard lock(mu_);
    std::vector<MachineRecord> out;
    Stmt s(db_, (std::string("SELECT ") + kMachineCols + " FROM machines ORDER BY name").c_str());
    while (s.Step() == SQLITE_ROW) out.push_back(ReadMachine(s));
    return out;
  }

  std::optional<MachineRecord> GetMachine(const std::string& name) override {
    std::lock_guard lock(mu_);
    Stmt s(db_, (std::string("SELECT ") + kMachineCols + " FROM machines WHERE name = ?").c_str());
    s.Bind(1, name);
    if (s.Step() != SQLITE_ROW) return std::nullopt;
    return ReadMachine(s);
  }

  Status RecordHello(const std::string& name, std::int64_t at, const json& facts,
                     std::int64_t last_applied) override {
    std::lock_guard lock(mu_);
    return WriteHelloLocked(name, at, facts, last_applied);
  }

  // Group commit, as RecordStatuses.
  std::vector<Status> RecordHellos(const std::vector<HelloWrite>& writes) override {
    {
      std::lock_guard lock(mu_);
      if (Exec("BEGIN IMMEDIATE")) {
        bool ok = true;
        for (const auto& w : writes) {
          if (!WriteHelloLocked(w.name, w.at, w.facts, w.last_applied)) {
            ok = false;
            break;
          }
        }
        if (ok && Exec("COMMIT")) return std::vector<Status>(writes.size(), Status::Ok());
        (void)Exec("ROLLBACK");
      }
    }
    return Store::RecordHellos(writes);
  }

  Status WriteHelloLocked(const std::string& name, std::int64_t at, const json& facts,
                          std::int64_t last_applied) {
    Stmt s(db_,
           "UPDATE machines SET last_seen = ?, facts = ?, last_applied = MAX(last_applied, ?) "
           "WHERE name = ?");
    s.Bind(1, at).Bind(2, DumpJson(facts)).Bind(3, last_applied).Bind(4, name);
    if (s.Step() != SQLITE_DONE) return Err("store: " + s.ErrorText());
    return Status::Ok();
  }

  Status RecordSeen(const std::string& name, std::int64_t at) override {
    std::lock_guard lock(mu_);
    Stmt s(db_, "UPDATE machines SET last_seen = ? WHERE name = ?");
    s.Bind(1, at).Bind(2, name);
    if (s.Step() != SQLITE_DONE) return Err("store: " + s.ErrorText());
    return Status::Ok();
  }

  Status RecordDepartures(const std::vector<Departure>& gone) override {
    if (gone.empty()) return Status::Ok();
    std::lock_guard lock(mu_);
    if (auto st = Exec("BEGIN IMMEDIATE"); !st) return st;
    for (const auto& d : gone) {
      Stmt s(db_, "UPDATE machines SET last_seen = ? WHERE name = ?");
      s.Bind(1, d.at).Bind(2, d.name);
      if (s.Step() != SQLITE_DONE) {
        std::string why = s.ErrorText();
        RollbackLocked();
        return Err("store: " + why);
      }
    }
    if (auto st = Exec("COMMIT"); !st) {
      RollbackLocked();
      return st;
    }
    return Status::Ok();
  }

  Status RecordStatus(const std::string& name, const EventRecord& ev, const std::string& toplevel,
                      bool reboot_required, const json& facts) override {
    std::lock_guard lock(mu_);
    if (auto st = Exec("BEGIN IMMEDIATE"); !st) return st;
    if (auto st = WriteStatusLocked(name, ev, toplevel, reboot_required, facts); !st) {
      RollbackLocked();
      return st;
    }
    if (auto st = Exec("COMMIT"); !st) {
      RollbackLocked();
      return st;
    }
    return Status::Ok();
  }

  // Group commit: every report in one transaction, one fsync, with the
  // notifications they carry. If anything fails, each report is recorded on
  // its own so that each gets its own result.
  std::vector<Status> RecordStatuses(const std::vector<StatusWrite>& writes) override {
    {
      std::lock_guard lock(mu_);
      if (Exec("BEGIN IMMEDIATE")) {
        bool ok = true;
        for (const auto& w : writes) {
          if (!WriteStatusLocked(w.name, w.ev, w.toplevel, w.reboot_required, w.facts)) {
            ok = false;
            break;
          }
        }
        if (ok) ok = QueueNotificationsLocked(writes).ok();
        if (ok && Exec("COMMIT")) return std::vector<Status>(writes.size(), Status::Ok());
        RollbackLocked();
      }
    }
    return Store::RecordStatuses(writes);
  }

  Status RecordStatusWrite(const StatusWrite& w) override {
    std::lock_guard lock(mu_);
    if (auto st = Exec("BEGIN IMMEDIATE"); !st) return st;
    auto st = WriteStatusLocked(w.name, w.ev, w.toplevel, w.reboot_required, w.facts);
    if (st) st = QueueNotificationsLocked({&w, 1});
    if (st) st = Exec("COMMIT");
    if (!st) RollbackLocked();
    return st;
  }

  // The deliveries the writes carry, in the caller's transaction.
  Status QueueNotificationsLocked(std::span<const StatusWrite> writes) {
    return QueueDeliveriesOf(writes, [this](const auto& all, std::int64_t max_queued) {
      return EnqueueDeliveriesLocked(all, max_queued);
    });
  }

  // The machine row and the event row of one report; the caller holds mu_ and
  // a transaction.
  Status WriteStatusLocked(const std::string& name, const EventRecord& ev,
                           const std::string& toplevel, bool reboot_required, const json& facts) {
    Stmt u(db_,
           "UPDATE machines SET generation = ?, phase = ?, detail = ?, "
           "toplevel = CASE WHEN ? = '' THEN toplevel ELSE ? END, reboot_required = ?, "
           "last_seen = ?, "
           "last_applied = CASE WHEN ? IN ('succeeded','unchanged','rolled-back','failed',"
           "'verified','realising','vars-installed','profile-set','activating','confirming') "
           "THEN MAX(last_applied, ?) ELSE last_applied END "
           "WHERE name = ?");
    u.Bind(1, ev.generation)
        .Bind(2, ev.phase)
        .Bind(3, ev.detail)
        .Bind(4, toplevel)
        .Bind(5, toplevel)
        .Bind(6, std::int64_t{reboot_required ? 1 : 0})
        .Bind(7, ev.at)
        .Bind(8, ev.phase)
        .Bind(9, ev.generation)
        .Bind(10, name);
    Stmt i(db_, "INSERT INTO events (machine, generation, phase, detail, at) VALUES (?,?,?,?,?)");
    i.Bind(1, name).Bind(2, ev.generation).Bind(3, ev.phase).Bind(4, ev.detail).Bind(5, ev.at);
    if (u.Step() != SQLITE_DONE || i.Step() != SQLITE_DONE) {
      return Err("store: cannot record status: " + std::string(sqlite3_errmsg(db_)));
    }
    if (auto st = BoundEventsLocked(name); !st) return st;
    if (facts.is_object()) {
      Stmt f(db_, "UPDATE machines SET facts = ? WHERE name = ?");
      f.Bind(1, DumpJson(facts)).Bind(2, name);
      (void)f.Step();
    }
    return Status::Ok();
  }

  Status AddOperator(const OperatorRecord& op) override {
    std::lock_guard lock(mu_);
    Stmt s(db_, "INSERT INTO operators (name, key, created_at) VALUES (?, ?, ?)");
    s.Bind(1, op.name).Bind(2, op.key).Bind(3, op.created_at);
    int rc = s.Step();
    if (rc == SQLITE_CONSTRAINT) {
      return Err("operator '" + op.name + "' or its key is already registered");
    }
    if (rc != SQLITE_DONE) return Err("store: cannot add operator: " + s.ErrorText());
    return Status::Ok();
  }

  Status RemoveOperator(const std::string& name) override {
    std::lock_guard lock(mu_);
    Stmt s(db_, "DELETE FROM operators WHERE name = ?");
    s.Bind(1, name);
    if (s.Step() != SQLITE_DONE) return Err("store: " + s.ErrorText());
    if (sqlite3_changes(db_) == 0) return Err("no operator named '" + name + "'");
    return Status::Ok();
  }

  std::vector<OperatorRecord> ListOperators() override {
    std::lock_guard lock(mu_);
    std::vector<OperatorRecord> out;
    Stmt s(db_, "SELECT name, key, created_at FROM operators ORDER BY name");
    while (s.Step() == SQLITE_ROW) out.push_back({s.Text(0), s.Text(1), s.Int(2)});
    return out;
  }

  Status AddGeneration(const GenerationRecord& g) override {
    std::lock_guard lock(mu_);
    if (auto st = Exec("BEGIN IMMEDIATE"); !st) return st;
    if (auto st = InsertGenerationLocked(g); !st) {
      (void)Exec("ROLLBACK");
      return st;
    }
    return Exec("COMMIT");
  }

  std::vector<Status> AddGenerations(const std::vector<GenerationRecord>& gens) override {
    std::lock_guard lock(mu_);
    std::vector<Status> out;
    out.reserve(gens.size());
    if (auto st = Exec("BEGIN IMMEDIATE"); !st) return std::vector<Status>(gens.size(), st);
    bool any = false;
    for (const auto& g : gens) {
      out.push_back(InsertGenerationLocked(g));  // a refusal writes nothing
      any |= out.back().ok();
    }
    if (!any) {
      (void)Exec("ROLLBACK");
      return out;
    }
    if (auto st = Exec("COMMIT"); !st) {
      (void)Exec("ROLLBACK");
      for (auto& o : out) {
        if (o) o = st;
      }
    }
    return out;
  }

  // Inside a transaction: refuses a number not above the stored ones.
  Status InsertGenerationLocked(const GenerationRecord& g) {
    Stmt q(db_, "SELECT COALESCE(MAX(generation), 0) FROM generations WHERE machine = ?");
    q.Bind(1, g.machine);
    std::int64_t latest = q.Step() == SQLITE_ROW ? q.Int(0) : 0;
    if (g.generation <= latest) {
      return Err("generation " + std::to_string(g.generation) + " for " + g.machine +
                 " is not newer than the stored generation " + std::to_string(latest));
    }
    Stmt s(db_,
           "INSERT INTO generations (machine, generation, manifest, signer, signature, vars, "
           "toplevel, action, rollout, published_by, created_at, released) "
           "VALUES (?,?,?,?,?,?,?,?,?,?,?,?)");
    BindGen(s, g);
    if (s.Step() != SQLITE_DONE) return Err("store: cannot add generation: " + s.ErrorText());
    return Status::Ok();
  }

  static void BindGen(Stmt& s, const GenerationRecord& g) {
    s.Bind(1, g.machine)
        .Bind(2, g.generation)
        .Bind(3, g.manifest.manifest)
        .Bind(4, g.manifest.signer)
        .Bind(5, g.manifest.signature)
        .Bind(6, g.vars)
        .Bind(7, g.toplevel)
        .Bind(8, g.action)
        .Bind(9, g.rollout)
        .Bind(10, g.published_by)
        .Bind(11, g.created_at)
        .Bind(12, std::int64_t{g.released ? 1 : 0});
  }

  std::int64_t MaxGeneration(const std::string& machine) override {
    std::lock_guard lock(mu_);
    Stmt q(db_, "SELECT COALESCE(MAX(generation), 0) FROM generations WHERE machine = ?");
    q.Bind(1, machine);
    return q.Step() == SQLITE_ROW ? q.Int(0) : 0;
  }

  std::map<std::string, std::int64_t> MaxGenerations() override {
    std::lock_guard lock(mu_);
    Stmt q(db_, "SELECT machine, MAX(generation) FROM generations GROUP BY machine");
    std::map<std::string, std::int64_t> out;
    while (q.Step() == SQLITE_ROW) out.emplace_hint(out.end(), q.Text(0), q.Int(1));
    return out;
  }

  Status ReleaseGeneration(const std::string& machine, std::int64_t generation) override {
    std::lock_guard lock(mu_);
    Stmt s(db_, "UPDATE generations SET released = 1 WHERE machine = ? AND generation = ?");
    s.Bind(1, machine).Bind(2, generation);
    if (s.Step() != SQLITE_DONE) return Err("store: " + s.ErrorText());
    return Status::Ok();
  }

  Status CreateRollout(const RolloutRecord& r, const std::vector<GenerationRecord>& gens,
                       const std::vector<RolloutItemRecord>& items) override {
    std::lock_guard lock(mu_);
    if (auto st = Exec("BEGIN IMMEDIATE"); !st) return st;
    auto fail = [&](std::string e) {
      (void)Exec("ROLLBACK");
      return Status(Err(std::move(e)));
    };
    for (const auto& g : gens) {
      if (auto st = InsertGenerationLocked(g); !st) return fail(st.message());
    }
    Stmt r1(db_,
            "INSERT INTO rollouts (id, created_at, created_by, canary, max_parallel, max_failures, "
            "state, detail, updated_at) VALUES (?,?,?,?,?,?,?,?,?)");
    r1.Bind(1, r.id)
        .Bind(2, r.created_at)
        .Bind(3, r.created_by)
        .Bind(4, std::int64_t{r.canary})
        .Bind(5, std::int64_t{r.max_parallel})
        .Bind(6, std::int64_t{r.max_failures})
        .Bind(7, r.state)
        .Bind(8, r.detail)
        .Bind(9, r.updated_at);
    if (r1.Step() != SQLITE_DONE) return fail("store: cannot add rollout: " + r1.ErrorText());
    for (const auto& it : items) {
      Stmt i(db_,
             "INSERT INTO rollout_items (rollout, position, machine, generation, stage, state, "
             "detail, updated_at) VALUES (?,?,?,?,?,?,?,?)");
      i.Bind(1, it.rollout)
          .Bind(2, std::int64_t{it.position})
          .Bind(3, it.machine)
          .Bind(4, it.generation)
          .Bind(5, std::int64_t{it.stage})
          .Bind(6, it.state)
          .Bind(7, it.detail)
          .Bind(8, it.updated_at);
      if (i.Step() != SQLITE_DONE) return fail("store: cannot add rollout item: " + i.ErrorText());
    }
    return Exec("COMMIT");
  }

  Status UpdateRollout(const RolloutRecord& r) override {
    std::lock_guard lock(mu_);
    Stmt s(db_, "UPDATE rollouts SET state = ?, detail = ?, updated_at = ? WHERE id = ?");
    s.Bind(1, r.state).Bind(2, r.detail).Bind(3, r.updated_at).Bind(4, r.id);
    if (s.Step() != SQLITE_DONE) return Err("store: " + s.ErrorText());
    return Status::Ok();
  }

  Status UpdateRolloutItem(const RolloutItemRecord& it) override {
    std::lock_guard lock(mu_);
    return UpdateItemLocked(it);
  }

  Status UpdateRolloutItems(const std::vector<RolloutItemRecord>& items) override {
    return InTransaction([&] {
      for (const auto& it : items) {
        if (auto st = UpdateItemLocked(it); !st) return st;
      }
      return Status::Ok();
    });
  }

  Status ReleaseRolloutItems(const std::vector<RolloutItemRecord>& items) override {
    return InTransaction([&] { return ReleaseItemsLocked(items); });
  }

  Status AdvanceRollout(const std::vector<RolloutItemRecord>& finals,
                        const std::vector<RolloutItemRecord>& releases,
                        const RolloutRecord* state) override {
    return InTransaction([&] {
      for (const auto& it : finals) {
        if (auto st = UpdateItemLocked(it); !st) return st;
      }
      if (auto st = ReleaseItemsLocked(releases); !st) return st;
      if (!state) return Status::Ok();
      Stmt s(db_, "UPDATE rollouts SET state = ?, detail = ?, updated_at = ? WHERE id = ?");
      s.Bind(1, state->state).Bind(2, state->detail).Bind(3, state->updated_at).Bind(4, state->id);
      if (s.Step() != SQLITE_DONE) return Status(Err("store: " + s.ErrorText()));
      return Status::Ok();
    });
  }

  // The caller holds mu_ and a transaction.
  Status ReleaseItemsLocked(const std::vector<RolloutItemRecord>& items) {
    for (const auto& it : items) {
      Stmt g(db_, "UPDATE generations SET released = 1 WHERE machine = ? AND generation = ?");
      g.Bind(1, it.machine).Bind(2, it.generation);
      if (g.Step() != SQLITE_DONE) return Status(Err("store: " + g.ErrorText()));
      if (auto st = UpdateItemLocked(it); !st) return st;
    }
    return Status::Ok();
  }

  // Runs body inside BEGIN IMMEDIATE … COMMIT, rolled back when it fails.
  template <typename F>
  Status InTransaction(F&& body) {
    std::lock_guard lock(mu_);
    if (auto st = Exec("BEGIN IMMEDIATE"); !st) return st;
    if (auto st = body(); !st) {
      (void)Exec("ROLLBACK");
      return st;
    }
    return Exec("COMMIT");
  }

  Status UpdateItemLocked(const RolloutItemRecord& it) {
    Stmt s(db_,
           "UPDATE rollout_items SET state = ?, detail = ?, updated_at = ? WHERE rollout = ? AND "
           "position = ?");
    s.Bind(1, it.state)
        .Bind(2, it.detail)
        .Bind(3, it.updated_at)
        .Bind(4, it.rollout)
        .Bind(5, std::int64_t{it.position});
    if (s.Step() != SQLITE_DONE) return Err("store: " + s.ErrorText());
    return Status::Ok();
  }

  static RolloutRecord ReadRollout(const Stmt& s) {
    RolloutRecord r;
    r.id = s.Text(0);
    r.created_at = s.Int(1);
    r.created_by = s.Text(2);
    r.canary = static_cast<int>(s.Int(3));
    r.max_parallel = static_cast<int>(s.Int(4));
    r.max_failures = static_cast<int>(s.Int(5));
    r.state = s.Text(6);
    r.detail = s.Text(7);
    r.updated_at = s.Int(8);
    return r;
  }

  std::optional<RolloutRecord> GetRollout(const std::string& id) override {
    std::lock_guard lock(mu_);
    Stmt s(db_,
           "SELECT id, created_at, created_by, canary, max_parallel, max_failures, state, detail, "
           "updated_at FROM rollouts WHERE id = ?");
    s.Bind(1, id);
    if (s.Step() != SQLITE_ROW) return std::nullopt;
    return ReadRollout(s);
  }

  std::vector<RolloutRecord> ListRollouts(int limit) override {
    std::lock_guard lock(mu_);
    std::vector<RolloutRecord> out;
    Stmt s(db_,
           "SELECT id, created_at, created_by, canary, max_parallel, max_failures, state, detail, "
           "updated_at FROM rollouts ORDER BY created_at DESC, id DESC LIMIT ?");
    s.Bind(1, std::int64_t{limit});
    while (s.Step() == SQLITE_ROW) out.push_back(ReadRollout(s));
    return out;
  }

  std::vector<RolloutItemRecord> ListRolloutItems(const std::string& id) override {
    std::lock_guard lock(mu_);
    std::vector<RolloutItemRecord> out;
    Stmt s(db_,
           "SELECT rollout, position, machine, generation, stage, state, detail, updated_at FROM "
           "rollout_items WHERE rollout = ? ORDER BY position");
    s.Bind(1, id);
    while (s.Step() == SQLITE_ROW) {
      RolloutItemRecord it;
      it.rollout = s.Text(0);
      it.position = static_cast<int>(s.Int(1));
      it.machine = s.Text(2);
      it.generation = s.Int(3);
      it.stage = static_cast<int>(s.Int(4));
      it.state = s.Text(5);
      it.detail = s.Text(6);
      it.updated_at = s.Int(7);
      out.push_back(std::move(it));
    }
    return out;
  }

  Status SetMachineRevoked(const std::string& name, bool revoked) override {
    std::lock_guard lock(mu_);
    Stmt s(db_, "UPDATE machines SET revoked = ? WHERE name = ?");
    s.Bind(1, std::int64_t{revoked ? 1 : 0}).Bind(2, name);
    if (s.Step() != SQLITE_DONE) return Err("store: " + s.ErrorText());
    if (sqlite3_changes(db_) == 0) return Err("no machine named '" + name + "'");
    return Status::Ok();
  }

  Status AddEnrollToken(const EnrollToken& t) override {
    std::lock_guard lock(mu_);
    Stmt s(db_,
           "INSERT INTO enroll_tokens (hash, machine, tags, expires_at, created_by, grant_entry) "
           "VALUES (?,?,?,?,?,?)");
    s.Bind(1, t.hash)
        .Bind(2, t.machine)
        .Bind(3, DumpJson(json(t.tags)))
        .Bind(4, t.expires_at)
        .Bind(5, t.created_by)
        .Bind(6, t.grant);
    if (s.Step() != SQLITE_DONE) return Err("store: cannot add enrolment token: " + s.ErrorText());
    return Status::Ok();
  }

  Status SpendEnrollToken(const std::string& hash, const std::string& machine,
                          const std::string& key, const std::string& binding,
                          std::int64_t now) override {
    std::lock_guard lock(mu_);
    if (auto st = Exec("BEGIN IMMEDIATE"); !st) return st;
    auto fail = [&](std::string e) {
      (void)Exec("ROLLBACK");
      return Status(Err(std::move(e)));
    };
    Stmt q(db_,
           "SELECT machine, tags, expires_at, spent_at, grant_entry FROM enroll_tokens WHERE hash "
           "= ?");
    q.Bind(1, hash);
    if (q.Step() != SQLITE_ROW) return fail("enrolment token is not valid");
    if (q.Int(3) != 0) return fail("enrolment token was already used");
    if (q.Int(2) < now)
      return fail("enrolment token has expired; ask for a new one ('muster machine enroll')");
    if (q.Text(0) != machine) {
      return fail("enrolment token is for machine '" + q.Text(0) + "', not '" + machine + "'");
    }
    std::string tags = q.Text(1);
    std::string grant = q.Text(4);
    Stmt spend(db_, "UPDATE enroll_tokens SET spent_at = ? WHERE hash = ?");
    spend.Bind(1, now).Bind(2, hash);
    Stmt add(db_,
             "INSERT INTO machines (name, key, tags, created_at, roster, binding) VALUES (?, ?, ?, "
             "?, ?, ?)");
    add.Bind(1, machine).Bind(2, key).Bind(3, tags).Bind(4, now).Bind(5, grant).Bind(6, binding);
    if (spend.Step() != SQLITE_DONE) return fail("store: " + spend.ErrorText());
    int rc = add.Step();
    if (rc == SQLITE_CONSTRAINT)
      return fail("machine '" + machine + "' or this key is already registered");
    if (rc != SQLITE_DONE) return fail("store: " + add.ErrorText());
    return Exec("COMMIT");
  }

  std::optional<EnrollToken> LiveEnrollToken(const std::string& machine,
                                             std::int64_t now) override {
    std::lock_guard lock(mu_);
    Stmt s(db_,
           "SELECT hash, tags, expires_at, created_by, grant_entry FROM enroll_tokens WHERE "
           "machine = ? AND spent_at = 0 AND expires_at >= ? ORDER BY expires_at DESC LIMIT 1");
    s.Bind(1, machine).Bind(2, now);
    if (s.Step() != SQLITE_ROW) return std::nullopt;
    EnrollToken t;
    t.hash = s.Text(0);
    t.machine = machine;
    json tags = ParseOr(s.Text(1), json::array());
    for (const auto& x : tags) {
      if (x.is_string()) t.tags.push_back(x.get<std::string>());
    }
    t.expires_at = s.Int(2);
    t.created_by = s.Text(3);
    t.grant = s.Text(4);
    return t;
  }

  int LiveEnrollTokens(std::int64_t now) override {
    std::lock_guard lock(mu_);
    Stmt s(db_, "SELECT COUNT(*) FROM enroll_tokens WHERE spent_at = 0 AND expires_at >= ?");
    s.Bind(1, now);
    return s.Step() == SQLITE_ROW ? static_cast<int>(s.Int(0)) : 0;
  }

  static constexpr const char* kGenCols =
      "machine, generation, manifest, signer, signature, vars, toplevel, action, rollout, "
      "published_by, created_at, released";

  static GenerationRecord ReadGen(const Stmt& s) {
    GenerationRecord g;
    g.machine = s.Text(0);
    g.generation = s.Int(1);
    g.manifest = {s.Text(2), s.Text(3), s.Text(4)};
    g.vars = s.Text(5);
    g.toplevel = s.Text(6);
    g.action = s.Text(7);
    g.rollout = s.Text(8);
    g.published_by = s.Text(9);
    g.created_at = s.Int(10);
    g.released = s.Int(11) != 0;
    return g;
  }

  std::optional<GenerationRecord> LatestGeneration(const std::string& machine) override {
    std::lock_guard lock(mu_);
    Stmt s(db_, (std::string("SELECT ") + kGenCols +
                 " FROM generations WHERE machine = ? AND released = 1 ORDER BY generation DESC "
                 "LIMIT 1")
                    .c_str());
    s.Bind(1, machine);
    if (s.Step() != SQLITE_ROW) return std::nullopt;
    return ReadGen(s);
  }

  std::optional<GenerationRecord> GetGeneration(const std::string& machine,
                                                std::int64_t generation) override {
    std::lock_guard lock(mu_);
    Stmt s(db_, (std::string("SELECT ") + kGenCols +
                 " FROM generations WHERE machine = ? AND generation = ?")
                    .c_str());
    s.Bind(1, machine).Bind(2, generation);
    if (s.Step() != SQLITE_ROW) return std::nullopt;
    return ReadGen(s);
  }

  std::vector<GenerationRecord> ListGenerations(const std::string& machine, int limit) override {
    std::lock_guard lock(mu_);
    std::vector<GenerationRecord> out;
    Stmt s(db_, (std::string("SELECT ") + kGenCols +
                 " FROM generations WHERE machine = ? ORDER BY generation DESC LIMIT ?")
                    .c_str());
    s.Bind(1, machine).Bind(2, std::int64_t{limit});
    while (s.Step() == SQLITE_ROW) out.push_back(ReadGen(s));
    return out;
  }

  std::vector<EventRecord> ListEvents(const std::string& machine, std::int64_t generation,
                                      int limit) override {
    std::lock_guard lock(mu_);
    std::vector<EventRecord> out;
    Stmt s(db_,
           "SELECT id, machine, generation, phase, detail, at FROM events WHERE machine = ? AND "
           "(? = 0 OR generation = ?) ORDER BY id DESC LIMIT ?");
    s.Bind(1, machine).Bind(2, generation).Bind(3, generation).Bind(4, std::int64_t{limit});
    while (s.Step() == SQLITE_ROW) {
      out.push_back({s.Int(0), s.Text(1), s.Int(2), s.Text(3), s.Text(4), s.Int(5)});
    }
    std::reverse(out.begin(), out.end());
    return out;
  }

  bool HasGeneration(const std::string& machine, std::int64_t generation) override {
    std::lock_guard lock(mu_);
    Stmt s(db_, "SELECT 1 FROM generations WHERE machine = ? AND generation = ?");
    s.Bind(1, machine).Bind(2, generation);
    return s.Step() == SQLITE_ROW;
  }

  Status AppendLogs(const std::vector<LogRecord>& lines) override {
    if (lines.empty()) return Status::Ok();
    std::lock_guard lock(mu_);
    if (auto st = Exec("BEGIN IMMEDIATE"); !st) return st;
    auto fail = [&](const std::string& what) {
      std::string e = what + ": " + sqlite3_errmsg(db_);
      RollbackLocked();
      return Status(Err("store: cannot append logs: " + e));
    };
    std::map<std::pair<std::string, std::int64_t>, std::int64_t> added;  // (machine, gen) → bytes
    for (const auto& l : lines) {
      // Load the machine's total before its first line is counted in log_sizes.
      if (!log_bytes_.count(l.machine)) (void)MachineLogBytesLocked(l.machine);
      Stmt i(db_, "INSERT INTO logs (machine, generation, stream, line, at) VALUES (?,?,?,?,?)");
      i.Bind(1, l.machine).Bind(2, l.generation).Bind(3, l.stream).Bind(4, l.line).Bind(5, l.at);
      if (i.Step() != SQLITE_DONE) return fail("insert");
      std::int64_t cost = static_cast<std::int64_t>(l.line.size()) + StoreLimits::kLogRowOverhead;
      added[{l.machine, l.generation}] += cost;
      log_bytes_[l.machine] += cost;
    }
    for (const auto& [key, bytes] : added) {
      Stmt z(db_,
             "INSERT INTO log_sizes (machine, generation, bytes) VALUES (?,?,?) "
             "ON CONFLICT (machine, generation) DO UPDATE SET bytes = bytes + excluded.bytes "
             "RETURNING bytes");
      z.Bind(1, key.first).Bind(2, key.second).Bind(3, bytes);
      if (z.Step() != SQLITE_ROW) return fail("count");
      std::int64_t total = z.Int(0);
      if (total > limits_.log_bytes_per_generation) {
        std::int64_t target = limits_.log_bytes_per_generation * 3 / 4;
        if (!DropOldestLogLinesLocked(key.first, key.second, total - target)) return fail("prune");
      }
    }
    for (const auto& [key, bytes] : added) {
      if (log_bytes_[key.first] > limits_.log_bytes_per_machine) {
        if (!PruneMachineLogsLocked(key.first)) return fail("prune");
      }
    }
    if (auto st = Exec("COMMIT"); !st) return fail("commit");
    return Status::Ok();
  }

  std::vector<LogRecord> ReadLogs(const std::string& machine, std::int64_t generation,
                                  std::int64_t after_id, int limit) override {
    std::lock_guard lock(mu_);
    std::vector<LogRecord> out;
    Stmt s(db_,
           "SELECT id, machine, generation, stream, line, at FROM logs WHERE machine = ? AND "
           "generation = ? AND id > ? ORDER BY id LIMIT ?");
    s.Bind(1, machine).Bind(2, generation).Bind(3, after_id).Bind(4, std::int64_t{limit});
    while (s.Step() == SQLITE_ROW) {
      out.push_back({s.Int(0), s.Text(1), s.Int(2), s.Text(3), s.Text(4), s.Int(5)});
    }
    return out;
  }

  std::optional<std::string> GetSetting(const std::string& key) override {
    std::lock_guard lock(mu_);
    return GetSettingLocked(key);
  }

  Status SetSetting(const std::string& key, const std::string& value) override {
    std::lock_guard lock(mu_);
    return SetSettingLocked(key, value);
  }

  // --- Notifications ---
  Status AddWebhook(const WebhookRecord& w) override {
    std::lock_guard lock(mu_);
    Stmt s(db_,
           "INSERT INTO webhooks (id, url, secret, events, created_by, created_at) VALUES (?, ?, "
           "?, ?, ?, ?)");
    s.Bind(1, w.id)
        .Bind(2, w.url)
        .Bind(3, w.secret)
        .Bind(4, DumpJson(json(w.events)))
        .Bind(5, w.created_by)
        .Bind(6, w.created_at);
    int rc = s.Step();
    if (rc == SQLITE_CONSTRAINT) return Err("webhook '" + w.id + "' exists already");
    if (rc != SQLITE_DONE) return Err("store: " + s.ErrorText());
    return Status::Ok();
  }

  Status RemoveWebhook(const std::string& id) override {
    std::lock_guard lock(mu_);
    if (auto st = Exec("BEGIN IMMEDIATE"); !st) return st;
    Stmt d(db_, "DELETE FROM webhooks WHERE id = ?");
    d.Bind(1, id);
    if (d.Step() != SQLITE_DONE) {
      RollbackLocked();
      return Err("store: " + d.ErrorText());
    }
    if (sqlite3_changes(db_) == 0) {
      RollbackLocked();
      return Err("no webhook '" + id + "'; see 'muster webhook list'");
    }
    Stmt q(db_, "DELETE FROM deliveries WHERE webhook = ?");
    q.Bind(1, id);
    if (q.Step() != SQLITE_DONE) {
      RollbackLocked();
      return Err("store: " + q.ErrorText());
    }
    return Exec("COMMIT");
  }

  std::vector<WebhookRecord> ListWebhooks() override {
    std::lock_guard lock(mu_);
    std::vector<WebhookRecord> out;
    Stmt s(db_,
           "SELECT id, url, secret, events, created_by, created_at FROM webhooks ORDER BY "
           "created_at, id");
    while (s.Step() == SQLITE_ROW) {
      WebhookRecord w;
      w.id = s.Text(0);
      w.url = s.Text(1);
      w.secret = s.Text(2);
      json ev = ParseOr(s.Text(3), json::array());
      if (ev.is_array()) {
        for (const auto& e : ev) {
          if (e.is_string()) w.events.push_back(e.get<std::string>());
        }
      }
      w.created_by = s.Text(4);
      w.created_at = s.Int(5);
      out.push_back(std::move(w));
    }
    return out;
  }

  Result<std::int64_t> EnqueueDeliveries(const std::vector<DeliveryRecord>& deliveries,
                                         std::int64_t max_queued) override {
    std::lock_guard lock(mu_);
    if (deliveries.empty()) return std::int64_t{0};
    if (auto st = Exec("BEGIN IMMEDIATE"); !st) return st.error();
    auto dropped = EnqueueDeliveriesLocked(deliveries, max_queued);
    if (!dropped) {
      RollbackLocked();
      return dropped;
    }
    if (auto st = Exec("COMMIT"); !st) {
      RollbackLocked();
      return st.error();
    }
    return dropped;
  }

  // The inserts and the bound of EnqueueDeliveries; the caller holds mu_ and
  // a transaction (and rolls it back on an error).
  Result<std::int64_t> EnqueueDeliveriesLocked(const std::vector<DeliveryRecord>& deliveries,
                                               std::int64_t max_queued) {
    for (const auto& d : deliveries) {
      Stmt s(db_,
             "INSERT INTO deliveries (webhook, event, body, attempts, created_at, next_at, "
             "last_error) VALUES (?, ?, ?, ?, ?, ?, ?)");
      s.Bind(1, d.webhook)
          .Bind(2, d.event)
          .Bind(3, d.body)
          .Bind(4, std::int64_t{d.attempts})
          .Bind(5, d.created_at)
          .Bind(6, d.next_at)
          .Bind(7, d.last_error);
      if (s.Step() != SQLITE_DONE) return Err("store: " + s.ErrorText());
    }
    std::int64_t dropped = 0;
    {
      Stmt c(db_, "SELECT COUNT(*) FROM deliveries");
      std::int64_t n = c.Step() == SQLITE_ROW ? c.Int(0) : 0;
      dropped = std::max<std::int64_t>(0, n - max_queued);
    }
    if (dropped > 0) {
      Stmt d(db_,
             "DELETE FROM deliveries WHERE id IN (SELECT id FROM deliveries ORDER BY id LIMIT ?)");
      d.Bind(1, dropped);
      if (d.Step() != SQLITE_DONE) return Err("store: " + d.ErrorText());
    }
    return dropped;
  }

  std::vector<DeliveryRecord> DueDeliveries(std::int64_t now, int limit) override {
    std::lock_guard lock(mu_);
    std::vector<DeliveryRecord> out;
    Stmt s(db_,
           "SELECT id, webhook, event, body, attempts, created_at, next_at, last_error FROM "
           "deliveries WHERE next_at <= ? ORDER BY next_at, id LIMIT ?");
    s.Bind(1, now).Bind(2, std::int64_t{limit});
    while (s.Step() == SQLITE_ROW) {
      out.push_back({s.Int(0), s.Text(1), s.Text(2), s.Text(3), static_cast<int>(s.Int(4)),
                     s.Int(5), s.Int(6), s.Text(7)});
    }
    return out;
  }

  std::optional<std::int64_t> NextDeliveryAt() override {
    std::lock_guard lock(mu_);
    Stmt s(db_, "SELECT MIN(next_at) FROM deliveries");
    if (s.Step() != SQLITE_ROW || s.IsNull(0)) {
      return std::nullopt;
    }
    return s.Int(0);
  }

  Status RescheduleDelivery(const DeliveryRecord& d) override {
    std::lock_guard lock(mu_);
    Stmt s(db_, "UPDATE deliveries SET attempts = ?, next_at = ?, last_error = ? WHERE id = ?");
    s.Bind(1, std::int64_t{d.attempts}).Bind(2, d.next_at).Bind(3, d.last_error).Bind(4, d.id);
    if (s.Step() != SQLITE_DONE) return Err("store: " + s.ErrorText());
    return Status::Ok();
  }

  Status RemoveDelivery(std::int64_t id) override {
    std::lock_guard lock(mu_);
    Stmt s(db_, "DELETE FROM deliveries WHERE id = ?");
    s.Bind(1, id);
    if (s.Step() != SQLITE_DONE) return Err("store: " + s.ErrorText());
    return Status::Ok();
  }

  std::int64_t QueuedDeliveries() override {
    std::lock_guard lock(mu_);
    Stmt s(db_, "SELECT COUNT(*) FROM deliveries");
    return s.Step() == SQLITE_ROW ? s.Int(0) : 0;
  }

 private:
  void AddColumnIfMissing(const char* table, const char* column, const char* decl) {
    Stmt q(db_,
           (std::string("SELECT COUNT(*) FROM pragma_table_info('") + table + "') WHERE name = ?")
               .c_str());
    q.Bind(1, std::string(column));
    if (q.Step() == SQLITE_ROW && q.Int(0) == 0) {
      (void)Exec(
          (std::string("ALTER TABLE ") + table + " ADD COLUMN " + column + " " + decl).c_str());
    }
  }

  // After a failed transaction the cached per-machine totals may count rows
  // that were never written: forget them (they are recounted when needed).
  void RollbackLocked() {
    (void)Exec("ROLLBACK");
    log_bytes_.clear();
    event_rows_.clear();
  }

  // The machine's log bytes (sum of log_sizes), cached.
  std::int64_t MachineLogBytesLocked(const std::string& machine) {
    auto it = log_bytes_.find(machine);
    if (it != log_bytes_.end()) return it->second;
    Stmt q(db_, "SELECT COALESCE(SUM(bytes), 0) FROM log_sizes WHERE machine = ?");
    q.Bind(1, machine);
    std::int64_t n = q.Step() == SQLITE_ROW ? q.Int(0) : 0;
    log_bytes_[machine] = n;
    return n;
  }

  // Deletes the oldest lines of (machine, generation) worth at least `bytes`
  // and updates both counts. Returns false on a store error.
  bool DropOldestLogLinesLocked(const std::string& machine, std::int64_t generation,
                                std::int64_t bytes) {
    std::int64_t removed = 0, last_id = -1;
    {
      Stmt q(db_,
             "SELECT id, LENGTH(CAST(line AS BLOB)) FROM logs WHERE machine = ? AND "
             "generation = ? ORDER BY id");
      q.Bind(1, machine).Bind(2, generation);
      while (removed < bytes && q.Step() == SQLITE_ROW) {
        last_id = q.Int(0);
        removed += q.Int(1) + StoreLimits::kLogRowOverhead;
      }
    }
    Stmt d(db_, "DELETE FROM logs WHERE machine = ? AND generation = ? AND id <= ?");
    d.Bind(1, machine).Bind(2, generation).Bind(3, last_id);
    if (d.Step() != SQLITE_DONE) return false;
    Stmt z(db_, "UPDATE log_sizes SET bytes = bytes - ? WHERE machine = ? AND generation = ?");
    z.Bind(1, removed).Bind(2, machine).Bind(3, generation);
    if (z.Step() != SQLITE_DONE) return false;
    Stmt e(db_, "DELETE FROM log_sizes WHERE machine = ? AND generation = ? AND bytes <= 0");
    e.Bind(1, machine).Bind(2, generation);
    if (e.Step() != SQLITE_DONE) return false;
    log_bytes_[machine] -= removed;
    return true;
  }

  // Brings the machine's logs to 3/4 of its bound: whole generations go
  // first, lowest number (oldest) first, then the oldest lines of the next.
  bool PruneMachineLogsLocked(const std::string& machine) {
    const std::int64_t target = limits_.log_bytes_per_machine * 3 / 4;
    std::int64_t& total = log_bytes_[machine];
    while (total > target) {
      std::int64_t generation = 0, bytes = 0;
      {
        Stmt q(db_,
               "SELECT generation, bytes FROM log_sizes WHERE machine = ? ORDER BY generation "
               "LIMIT 1");
        q.Bind(1, machine);
        if (q.Step() != SQLITE_ROW) {
          total = 0;  // nothing is left: the cached total was stale
          return true;
        }
        generation = q.Int(0);
        bytes = q.Int(1);
      }
      if (bytes <= total - target) {
        Stmt d(db_, "DELETE FROM logs WHERE machine = ? AND generation = ?");
        d.Bind(1, machine).Bind(2, generation);
        Stmt z(db_, "DELETE FROM log_sizes WHERE machine = ? AND generation = ?");
        z.Bind(1, machine).Bind(2, generation);
        if (d.Step() != SQLITE_DONE || z.Step() != SQLITE_DONE) return false;
        total -= bytes;
      } else if (!DropOldestLogLinesLocked(machine, generation, total - target)) {
        return false;
      }
    }
    return true;
  }

  // Counts the event just inserted for machine; past the bound, deletes the
  // oldest events down to 3/4 of it, sparing the newest generations' events
  // unless they alone are too many. The caller holds mu_ and a transaction.
  Status BoundEventsLocked(const std::string& machine) {
    auto it = event_rows_.find(machine);
    if (it == event_rows_.end()) {
      Stmt q(db_, "SELECT COUNT(*) FROM events WHERE machine = ?");  // includes the new row
      q.Bind(1, machine);
      it = event_rows_.emplace(machine, q.Step() == SQLITE_ROW ? q.Int(0) : 0).first;
    } else {
      ++it->second;
    }
    std::int64_t& rows = it->second;
    if (rows <= limits_.events_per_machine) return Status::Ok();
    const std::int64_t target = limits_.events_per_machine - limits_.events_per_machine / 4;
    {
      Stmt d(db_,
             "DELETE FROM events WHERE id IN (SELECT id FROM events WHERE machine = ?1 AND "
             "generation NOT IN (SELECT generation FROM generations WHERE machine = ?1 ORDER BY "
             "generation DESC LIMIT ?2) ORDER BY id LIMIT ?3)");
      d.Bind(1, machine)
          .Bind(2, std::int64_t{limits_.keep_event_generations})
          .Bind(3, rows - target);
      if (d.Step() != SQLITE_DONE) return Err("store: cannot prune events: " + d.ErrorText());
      rows -= sqlite3_changes(db_);
    }
    if (rows > target) {
      Stmt d(db_,
             "DELETE FROM events WHERE id IN (SELECT id FROM events WHERE machine = ? ORDER BY "
             "id LIMIT ?)");
      d.Bind(1, machine).Bind(2, rows - target);
      if (d.Step() != SQLITE_DONE) return Err("store: cannot prune events: " + d.ErrorText());
      rows -= sqlite3_changes(db_);
    }
    return Status::Ok();
  }

  Status Exec(const char* sql) {
    char* err = nullptr;
    if (sqlite3_exec(db_, sql, nullptr, nullptr, &err) != SQLITE_OK) {
      std::string e = err ? err : "unknown error";
      sqlite3_free(err);
      return Err("store: " + e);
    }
    return Status::Ok();
  }

  std::optional<std::string> GetSettingLocked(const std::string& key) {
    Stmt s(db_, "SELECT value FROM settings WHERE key = ?");
    s.Bind(1, key);
    if (s.Step() != SQLITE_ROW) return std::nullopt;
    return s.Text(0);
  }

  Status SetSettingLocked(const std::string& key, const std::string& value) {
    Stmt s(db_,
           "INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET "
           "value = excluded.value");
    s.Bind(1, key).Bind(2, value);
    if (s.Step() != SQLITE_DONE) return Err("store: " + s.ErrorText());
    return Status::Ok();
  }

  std::mutex mu_;
  const StoreLimits limits_;
  sqlite3* db_;
  std::unordered_map<std::string, std::int64_t> log_bytes_;   // machine → bytes in log_sizes
  std::unordered_map<std::string, std::int64_t> event_rows_;  // machine → rows in events
};

}  // namespace

Status CheckStoreLimits(const StoreLimits& l) {
  if (l.log_bytes_per_generation < 4096) {
    return Err("--max-log-bytes-per-generation must be at least 4096");
  }
  if (l.log_bytes_per_machine < l.log_bytes_per_generation) {
    return Err("--max-log-bytes-per-machine (" + std::to_string(l.log_bytes_per_machine) +
               ") must be at least --max-log-bytes-per-generation (" +
               std::to_string(l.log_bytes_per_generation) + ")");
  }
  if (l.events_per_machine < 16) return Err("--max-events-per-machine must be at least 16");
  if (l.keep_event_generations < 0 || l.keep_event_generations > 10000) {
    return Err("--keep-event-generations must be between 0 and 10000");
  }
  return Status::Ok();
}

Result<std::unique_ptr<Store>> OpenSqliteStore(const std::string& path, const StoreLimits& limits) {
  if (auto st = CheckStoreLimits(limits); !st) return st.error();
  sqlite3* db = nullptr;
  int rc =
      sqlite3_open_v2(path.c_str(), &db,
                      SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_FULLMUTEX, nullptr);
  if (rc != SQLITE_OK) {
    std::string e = db ? sqlite3_errmsg(db) : "out of memory";
    sqlite3_close(db);
    return Err("cannot open store " + path + ": " + e);
  }
  auto store = std::make_unique<SqliteStore>(db, limits);
  if (auto st = store->Init(); !st)
    return Err("cannot initialise store " + path + ": " + st.message());
  return std::unique_ptr<Store>(std::move(store));
}

}  // namespace muster
