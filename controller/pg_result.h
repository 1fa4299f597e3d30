// One libpq result, freed on destruction, with the typed accessors the
// PostgreSQL store and the cluster thread read rows with.
#pragma once

#include <libpq-fe.h>

#include <cstdint>
#include <cstdlib>
#include <string>

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

}  // namespace muster::pg
