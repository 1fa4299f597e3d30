// One libpq result, freed on destruction, with the typed accessors the
// PostgreSQL store and the cluster thread read rows with; and how both connect.
#pragma once

#include <libpq-fe.h>

#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

#include "controller/store.h"

namespace muster::pg {

class Res {
 public:
  explicit Res(PGresult* r) : r_(r) {}
  ~Res() { PQclear(r_); }
  Res(Res&& o) noexcept : r_(o.r_) { o.r_ = nullptr; }
  Res(const Res&) = delete;
  Res& operator=(const Res&) = delete;
  Res& operator=(Res&&) = delete;

  bool ok() const {
    auto s = PQresultStatus(r_);
    return r_ != nullptr && (s == PGRES_COMMAND_OK || s == PGRES_TUPLES_OK);
  }
  int rows() const { return ok() ? PQntuples(r_) : 0; }
  PGresult* get() const { return r_; }
  bool Null(int row, int col) const { return PQgetisnull(r_, row, col) != 0; }
  std::string Text(int row, int col) const {
    return std::string(PQgetvalue(r_, row, col),
                       static_cast<std::size_t>(PQgetlength(r_, row, col)));
  }
  std::int64_t Int(int row, int col) const {
    return std::strtoll(PQgetvalue(r_, row, col), nullptr, 10);
  }
  // Rows changed by an INSERT/UPDATE/DELETE.
  std::int64_t changes() const {
    const char* n = PQcmdTuples(r_);
    return (n && *n) ? std::strtoll(n, nullptr, 10) : 0;
  }
  std::string sqlstate() const {
    const char* s = r_ ? PQresultErrorField(r_, PG_DIAG_SQLSTATE) : nullptr;
    return s ? s : "";
  }
  bool unique_violation() const { return sqlstate() == "23505"; }
  std::string error() const {
    std::string e = r_ ? PQresultErrorMessage(r_) : "no result (connection lost?)";
    while (!e.empty() && (e.back() == '\n' || e.back() == ' ')) e.pop_back();
    return e.empty() ? "unknown error" : e;
  }

 private:
  PGresult* r_;
};

// Opens a connection with TCP keepalives (a dead server is noticed in about
// 25 s), the given application name, connect timeout (seconds, as text) and
// server options. Never null unless out of memory; check PQstatus.
inline PGconn* Connect(const std::string& conninfo, const char* application,
                       const char* connect_timeout, const std::string& options) {
  const char* keys[] = {"connect_timeout",
                        "application_name",
                        "keepalives",
                        "keepalives_idle",
                        "keepalives_interval",
                        "keepalives_count",
                        "options",
                        "dbname",
                        nullptr};
  const char* vals[] = {connect_timeout, application,      "1",    "10", "5", "3",
                        options.c_str(), conninfo.c_str(), nullptr};
  return PQconnectdbParams(keys, vals, 1);
}

// A PostgreSQL array literal of text values ({"a","b"}), for one parameter
// that a statement unnests: a batch in one statement instead of one per row.
// A NUL (which no text value may hold) becomes U+FFFD, as in single values.
inline std::string TextArray(const std::vector<std::string>& items) {
  std::size_t size = 2;
  for (const auto& item : items) size += item.size() + 3;
  std::string out;
  out.reserve(size + size / 16);
  out += '{';
  for (std::size_t i = 0; i < items.size(); ++i) {
    if (i) out += ',';
    out += '"';
    // Runs without a quote, a backslash or a NUL are appended whole: a
    // rollout's arrays carry 10,000 manifests and sealed vars.
    std::string_view rest = items[i];
    while (!rest.empty()) {
      std::size_t n = 0;
      while (n < rest.size() && rest[n] != '"' && rest[n] != '\\' && rest[n] != '\0') ++n;
      out.append(rest.data(), n);
      if (n == rest.size()) break;
      if (rest[n] == '\0') {
        out += "\xEF\xBF\xBD";
      } else {
        out += '\\';
        out += rest[n];
      }
      rest.remove_prefix(n + 1);
    }
    out += '"';
  }
  out += '}';
  return out;
}

// The same for numbers ({1,2}).
inline std::string IntArray(const std::vector<std::int64_t>& items) {
  std::string out = "{";
  for (std::size_t i = 0; i < items.size(); ++i) {
    if (i) out += ',';
    out += std::to_string(items[i]);
  }
  return out + "}";
}

// libpq's last error on conn, without its trailing newline.
inline std::string ConnectionError(PGconn* conn) {
  std::string e = conn ? PQerrorMessage(conn) : "out of memory";
  while (!e.empty() && (e.back() == '\n' || e.back() == ' ')) e.pop_back();
  return e.empty() ? "unknown error" : e;
}

// The columns of a generations row, in the order ReadGeneration reads them
// (prefix them with a table alias as needed: GENERATION_COLUMNS("g.")).
#define MUSTER_PG_GENERATION_COLUMNS(P)                                                   \
  P "machine, " P "generation, " P "manifest, " P "signer, " P "signature, " P "vars, " P \
    "toplevel, " P "action, " P "rollout, " P "published_by, " P "created_at, " P "released"

// A generations row read from `col`, columns as MUSTER_PG_GENERATION_COLUMNS.
inline GenerationRecord ReadGeneration(const Res& r, int row, int col = 0) {
  GenerationRecord g;
  g.machine = r.Text(row, col);
  g.generation = r.Int(row, col + 1);
  g.manifest = {r.Text(row, col + 2), r.Text(row, col + 3), r.Text(row, col + 4)};
  g.vars = r.Text(row, col + 5);
  g.toplevel = r.Text(row, col + 6);
  g.action = r.Text(row, col + 7);
  g.rollout = r.Text(row, col + 8);
  g.published_by = r.Text(row, col + 9);
  g.created_at = r.Int(row, col + 10);
  g.released = r.Int(row, col + 11) != 0;
  return g;
}

}  // namespace muster::pg
