// ByteStorage in the fleet's PostgreSQL database, so that every controller of
// one fleet serves the same binary cache and a controller that dies takes no
// cached path with it. Objects are rows of cache_objects (key, size, mtime);
// their bytes are rows of cache_chunks (object id, offset, bytes) of at most
// kChunk bytes each, stored uncompressed out of line (NARs arrive compressed:
// pglz would spend CPU for nothing, and out-of-line values can be read in
// slices). An object keeps its id when it is promoted, so a rename moves no
// bytes, and a reader that found an id reads that object's bytes only.
//
// Calls run on a small pool of connections of their own (the store's single
// connection must not wait behind a 4 MiB chunk). Mutations of one key are
// serialised across controllers by a transaction advisory lock on its hash.
#include <libpq-fe.h>

#include <condition_variable>
#include <ctime>
#include <mutex>
#include <optional>

#include "controller/byte_storage.h"
#include "controller/pg_result.h"

namespace muster {

namespace {

constexpr std::size_t kChunk = 4 << 20;
// "must" + 1: the store's own advisory locks use 1836413812.
constexpr const char* kKeyLock = "SELECT pg_advisory_xact_lock(1836413813, hashtext($1))";

std::int64_t Now() { return static_cast<std::int64_t>(std::time(nullptr)); }

// A parameter: text, or raw bytes sent in binary (bytea without escaping).
struct Param {
  std::string_view value;
  bool binary = false;
};

class Connection {
 public:
  explicit Connection(std::string conninfo) : conninfo_(std::move(conninfo)) {}
  ~Connection() {
    if (conn_) PQfinish(conn_);
  }

  // Connects on first use and after a connection broke (outside a
  // transaction), at most once a second so that while the database is down
  // calls fail at once.
  bool Ready() {
    if (conn_ && PQstatus(conn_) == CONNECTION_OK) return true;
    if (in_tx_) return false;
    auto now = std::chrono::steady_clock::now();
    if (conn_ && now - last_try_ < std::chrono::seconds(1)) return false;
    last_try_ = now;
    if (conn_) {
      PQreset(conn_);
    } else {
      conn_ = pg::Connect(conninfo_, "muster-controller cache", "10",
                          "-c synchronous_commit=on -c statement_timeout=60000 "
                          "-c client_min_messages=warning");
    }
    return conn_ && PQstatus(conn_) == CONNECTION_OK;
  }

  std::string error() const { return pg::ConnectionError(conn_); }

  // One statement; binary_result asks for raw bytea (and 8-byte integers).
  pg::Res Exec(const char* sql, std::initializer_list<Param> params, bool binary_result = false) {
    if (!Ready()) return pg::Res(nullptr);
    std::vector<const char*> values;
    std::vector<int> lengths, formats;
    for (const auto& p : params) {
      values.push_back(p.value.data());
      lengths.push_back(static_cast<int>(p.value.size()));
      formats.push_back(p.binary ? 1 : 0);
    }
    // Text parameters must be NUL-terminated: copy them.
    std::vector<std::string> texts;
    texts.reserve(values.size());
    std::size_t i = 0;
    for (const auto& p : params) {
      if (!p.binary) {
        texts.emplace_back(p.value);
        values[i] = texts.back().c_str();
      }
      ++i;
    }
    return pg::Res(PQexecParams(conn_, sql, static_cast<int>(values.size()), nullptr, values.data(),
                                lengths.data(), formats.data(), binary_result ? 1 : 0));
  }

  bool Begin() {
    auto r = Exec("BEGIN", {});
    in_tx_ = r.ok();
    return in_tx_;
  }
  // Commits (or, with commit false, rolls back); "" or the commit's error.
  std::string End(bool commit) {
    auto r = Exec(commit ? "COMMIT" : "ROLLBACK", {});
    in_tx_ = false;
    if (!commit) return "";
    return r.ok() ? "" : r.error();
  }

 private:
  std::string conninfo_;
  PGconn* conn_ = nullptr;
  bool in_tx_ = false;
  std::chrono::steady_clock::time_point last_try_{};
};

std::int64_t BigEndian64(const char* p) {
  std::uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v = (v << 8) | static_cast<unsigned char>(p[i]);
  return static_cast<std::int64_t>(v);
}

// The error of a failed statement, with the note that marks a full disk.
std::string Describe(const pg::Res& r, const std::string& what) {
  std::string e = "cache storage: " + what + ": " + r.error();
  // 53100 disk_full, 53200 out_of_memory (of the server), 53400 configuration limit
  if (r.sqlstate() == "53100") e += std::string(" (") + kDiskFullNote + " on the database server)";
  return e;
}

// Inserts bytes as the chunks of object id from offset on (kChunk each, the
// last shorter), in the caller's transaction; the failed statement, if one did.
std::optional<pg::Res> WriteChunks(Connection& c, const std::string& id, std::uint64_t offset,
                                   std::string_view bytes) {
  for (std::size_t done = 0; done < bytes.size(); done += kChunk) {
    std::string at = std::to_string(offset + done);
    auto w = c.Exec("INSERT INTO cache_chunks (object, off, data) VALUES ($1, $2, $3)",
                    {{id}, {at}, {bytes.substr(done, kChunk), true}});
    if (!w.ok()) return w;
  }
  return std::nullopt;
}

class PgByteStorage : public ByteStorage {
 public:
  PgByteStorage(const std::string& conninfo, std::size_t connections) {
    for (std::size_t i = 0; i < connections; ++i)
      pool_.push_back(std::make_unique<Connection>(conninfo));
    for (auto& c : pool_) idle_.push_back(c.get());
  }

  // Checks the schema is there (the store's migrations create it).
  Status Check() {
    Lease c(*this);
    if (!c->Ready()) return Err("cache storage: cannot connect to PostgreSQL: " + c->error());
    auto r = c->Exec("SELECT 1 FROM cache_objects LIMIT 1", {});
    if (!r.ok()) return Err(Describe(r, "the cache tables are missing (is the store migrated?)"));
    return Status::Ok();
  }

  Status Put(const std::string& key, std::string_view bytes) override {
    if (!ValidStorageKey(key)) return Err("invalid storage key '" + key + "'");
    Lease c(*this);
    if (!c->Begin()) return Err("cache storage: cannot begin: " + c->error());
    auto fail = [&](const pg::Res& r, const std::string& what) {
      c->End(false);
      return Err(Describe(r, what + " " + key));
    };
    if (auto r = c->Exec(kKeyLock, {{key}}); !r.ok()) return fail(r, "cannot lock");
    if (auto r = c->Exec("DELETE FROM cache_objects WHERE key = $1", {{key}}); !r.ok())
      return fail(r, "cannot replace");
    std::string size = std::to_string(bytes.size()), now = std::to_string(Now());
    auto ins =
        c->Exec("INSERT INTO cache_objects (key, size, mtime) VALUES ($1, $2, $3) RETURNING id",
                {{key}, {size}, {now}});
    if (ins.rows() != 1) return fail(ins, "cannot write");
    std::string id = ins.Text(0, 0);
    if (auto w = WriteChunks(*c, id, 0, bytes)) return fail(*w, "cannot write");
    if (auto e = c->End(true); !e.empty())
      return Err("cache storage: cannot write " + key + ": " + e);
    return Status::Ok();
  }

  Result<std::string> Read(const std::string& key, std::uint64_t offset,
                           std::size_t max_bytes) override {
    if (!ValidStorageKey(key)) return Err("invalid storage key '" + key + "'");
    Lease c(*this);
    auto o = c->Exec("SELECT id, size FROM cache_objects WHERE key = $1", {{key}});
    if (!o.ok()) return Err(Describe(o, "cannot read " + key));
    if (o.rows() == 0) return Err("cache storage: no object " + key);
    std::string id = o.Text(0, 0);
    auto size = static_cast<std::uint64_t>(o.Int(0, 1));
    if (offset >= size || max_bytes == 0) return std::string();
    std::uint64_t end = std::min<std::uint64_t>(size, offset + max_bytes);
    // Only the chunks that overlap [offset, end), and of each only its part.
    std::string from = std::to_string(offset), to = std::to_string(end),
                low = std::to_string(offset >= kChunk ? offset - kChunk : 0);
    auto r = c->Exec(
        "SELECT off, substring(data FROM (GREATEST($2::BIGINT - off, 0) + 1)::INT FOR "
        "(LEAST($3::BIGINT, off + octet_length(data)) - GREATEST($2::BIGINT, off))::INT) "
        "FROM cache_chunks WHERE object = $1 AND off >= $4::BIGINT AND off < $3::BIGINT AND "
        "off + octet_length(data) > $2::BIGINT ORDER BY off",
        {{id}, {from}, {to}, {low}}, true);
    if (!r.ok()) return Err(Describe(r, "cannot read " + key));
    std::string out;
    out.reserve(end - offset);
    std::uint64_t at = offset;
    for (int i = 0; i < r.rows(); ++i) {
      std::uint64_t off = static_cast<std::uint64_t>(BigEndian64(PQgetvalue(r.get(), i, 0)));
      if (std::max(off, offset) != at) break;  // removed under us: return what is whole
      std::size_t n = static_cast<std::size_t>(PQgetlength(r.get(), i, 1));
      out.append(PQgetvalue(r.get(), i, 1), n);
      at += n;
    }
    return out;
  }

  std::optional<std::uint64_t> Size(const std::string& key) override {
    if (!ValidStorageKey(key)) return std::nullopt;
    Lease c(*this);
    auto r = c->Exec("SELECT size FROM cache_objects WHERE key = $1", {{key}});
    if (r.rows() != 1) return std::nullopt;
    return static_cast<std::uint64_t>(r.Int(0, 0));
  }

  Status Remove(const std::string& key) override {
    if (!ValidStorageKey(key)) return Err("invalid storage key '" + key + "'");
    Lease c(*this);
    auto r = c->Exec("DELETE FROM cache_objects WHERE key = $1", {{key}});
    if (!r.ok()) return Err(Describe(r, "cannot remove " + key));
    return Status::Ok();
  }

  std::vector<Entry> List(const std::string& prefix) override {
    std::vector<Entry> out;
    Lease c(*this);
    auto r = c->Exec(
        "SELECT key, size, mtime FROM cache_objects WHERE left(key, length($1)) = $1 ORDER BY key",
        {{prefix}});
    for (int i = 0; i < r.rows(); ++i) {
      out.push_back({r.Text(i, 0), static_cast<std::uint64_t>(r.Int(i, 1)), r.Int(i, 2)});
    }
    return out;
  }

  Result<std::uint64_t> Append(const std::string& key, std::uint64_t offset,
                               std::string_view bytes) override {
    if (!ValidStorageKey(key)) return Err("invalid storage key '" + key + "'");
    Lease c(*this);
    if (!c->Begin()) return Err("cache storage: cannot begin: " + c->error());
    auto fail = [&](const pg::Res& r, const std::string& what) {
      c->End(false);
      return Err(Describe(r, what + " " + key));
    };
    // A staged chunk need not be durable (as in the directory, where it is
    // not fsynced): after a crash the upload resumes from what is there, and
    // Promote's synchronous commit flushes every chunk before it.
    if (auto r = c->Exec("SET LOCAL synchronous_commit = off", {}); !r.ok())
      return fail(r, "cannot begin");
    if (auto r = c->Exec(kKeyLock, {{key}}); !r.ok()) return fail(r, "cannot lock");
    auto o = c->Exec("SELECT id, size FROM cache_objects WHERE key = $1", {{key}});
    if (!o.ok()) return fail(o, "cannot read");
    std::string id;
    std::uint64_t size = 0;
    if (o.rows() == 1) {
      id = o.Text(0, 0);
      size = static_cast<std::uint64_t>(o.Int(0, 1));
    }
    if (size != offset || (id.empty() && offset != 0)) {
      c->End(false);
      return Err("upload offset " + std::to_string(offset) + " does not match the " +
                 std::to_string(size) + " bytes received so far; resume from " +
                 std::to_string(size));
    }
    std::string now = std::to_string(Now());
    if (id.empty()) {
      // Only the first chunk creates the object.
      auto ins =
          c->Exec("INSERT INTO cache_objects (key, size, mtime) VALUES ($1, 0, $2) RETURNING id",
                  {{key}, {now}});
      if (ins.rows() != 1) return fail(ins, "cannot create");
      id = ins.Text(0, 0);
    }
    if (auto w = WriteChunks(*c, id, offset, bytes)) return fail(*w, "cannot write");
    std::string new_size = std::to_string(offset + bytes.size());
    auto u = c->Exec("UPDATE cache_objects SET size = $2, mtime = $3 WHERE id = $1",
                     {{id}, {new_size}, {now}});
    if (!u.ok()) return fail(u, "cannot write");
    if (auto e = c->End(true); !e.empty())
      return Err("cache storage: cannot write " + key + ": " + e);
    return offset + bytes.size();
  }

  bool Remote() const override { return true; }

  Status Promote(const std::string& staging_key, const std::string& to) override {
    if (!ValidStorageKey(staging_key) || !ValidStorageKey(to)) return Err("invalid storage key");
    Lease c(*this);
    if (!c->Begin()) return Err("cache storage: cannot begin: " + c->error());
    auto fail = [&](const pg::Res& r, const std::string& what) {
      c->End(false);
      return Err(Describe(r, what));
    };
    // Both keys, in one order on every controller: no deadlock.
    const std::string& a = std::min(staging_key, to);
    const std::string& b = std::max(staging_key, to);
    if (auto r = c->Exec(kKeyLock, {{a}}); !r.ok()) return fail(r, "cannot lock " + a);
    if (auto r = c->Exec(kKeyLock, {{b}}); !r.ok()) return fail(r, "cannot lock " + b);
    if (auto r = c->Exec("DELETE FROM cache_objects WHERE key = $1", {{to}}); !r.ok())
      return fail(r, "cannot replace " + to);
    std::string now = std::to_string(Now());
    auto u = c->Exec("UPDATE cache_objects SET key = $2, mtime = $3 WHERE key = $1",
                     {{staging_key}, {to}, {now}});
    if (!u.ok()) return fail(u, "cannot rename " + staging_key);
    if (u.changes() != 1) {
      c->End(false);
      return Err("cache storage: no object " + staging_key + " to promote");
    }
    if (auto e = c->End(true); !e.empty())
      return Err("cache storage: cannot rename to " + to + ": " + e);
    return Status::Ok();
  }

 private:
  // A connection of the pool, given back on destruction.
  class Lease {
   public:
    explicit Lease(PgByteStorage& s) : s_(s) {
      std::unique_lock lock(s_.mu_);
      s_.cv_.wait(lock, [&] { return !s_.idle_.empty(); });
      c_ = s_.idle_.back();
      s_.idle_.pop_back();
    }
    ~Lease() {
      {
        std::lock_guard lock(s_.mu_);
        s_.idle_.push_back(c_);
      }
      s_.cv_.notify_one();
    }
    Lease(const Lease&) = delete;
    Lease& operator=(const Lease&) = delete;
    Connection* operator->() { return c_; }
    Connection& operator*() { return *c_; }

   private:
    PgByteStorage& s_;
    Connection* c_;
  };

  std::vector<std::unique_ptr<Connection>> pool_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Connection*> idle_;
};

}  // namespace

Result<std::unique_ptr<ByteStorage>> OpenPostgresByteStorage(const std::string& conninfo,
                                                             std::size_t connections) {
  auto s = std::make_unique<PgByteStorage>(conninfo, std::max<std::size_t>(connections, 1));
  if (auto st = s->Check(); !st) return st.error();
  return std::unique_ptr<ByteStorage>(std::move(s));
}

}  // namespace muster
