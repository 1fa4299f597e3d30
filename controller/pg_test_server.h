// A throw-away PostgreSQL server for unit tests (not part of any library).
//
// PgTestServer::Shared() starts one server per test process, on a Unix socket
// in a temporary directory, as an unprivileged user (nobody when the tests run
// as root; PostgreSQL refuses to run as root), with fsync off: durability is
// the production server's business, not the unit tests'. initdb runs once per
// machine into a template directory under $TMPDIR that later processes copy
// (~0.1 s instead of ~2 s). NewDatabase() gives each test an empty database.
// Not thread-safe; meant for the test's main thread.
#pragma once

#include <libpq-fe.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "common/process.h"
#include "common/testutil.h"

namespace muster::testing {

class PgTestServer {
 public:
  // The directory holding initdb and pg_ctl: $MUSTER_PG_BIN, else the newest
  // /usr/lib/postgresql/*/bin, else where PATH has pg_ctl; "" when none.
  static std::string FindBinDir() {
    namespace fs = std::filesystem;
    if (const char* env = std::getenv("MUSTER_PG_BIN"); env && *env) return env;
    std::vector<fs::path> dirs;
    std::error_code ec;
    for (const auto& e : fs::directory_iterator("/usr/lib/postgresql", ec)) {
      if (fs::exists(e.path() / "bin/pg_ctl")) dirs.push_back(e.path() / "bin");
    }
    if (!dirs.empty()) {
      std::sort(dirs.begin(), dirs.end(), [](const fs::path& a, const fs::path& b) {
        return std::stoi(a.parent_path().filename().string()) <
               std::stoi(b.parent_path().filename().string());
      });
      return dirs.back().string();
    }
    std::string ctl = FindProgram("pg_ctl");
    return ctl.empty() ? "" : fs::path(ctl).parent_path().string();
  }

  // The process's server, started on first use; nullptr (and *why set) when
  // the binaries are absent or it cannot start.
  static PgTestServer* Shared(std::string* why) {
    static std::unique_ptr<PgTestServer> server;
    static std::string error;
    if (!server && error.empty()) {
      auto s = std::make_unique<PgTestServer>();
      error = s->Start();
      if (error.empty()) server = std::move(s);
    }
    if (!server) *why = error;
    return server.get();
  }

  ~PgTestServer() {
    if (started_) (void)Run({bin_ + "/pg_ctl", "-D", data_, "-m", "immediate", "-s", "stop"});
  }

  // The name of a new, empty database (see Uri).
  std::string NewDatabase() {
    static std::atomic<int> n{0};
    std::string name = "t" + std::to_string(::getpid()) + "_" + std::to_string(n++);
    std::string err = Exec("postgres", "CREATE DATABASE " + name);
    if (!err.empty()) throw std::runtime_error("CREATE DATABASE: " + err);
    return name;
  }

  std::string Uri(const std::string& db) const {
    return "postgresql://muster@/" + db + "?host=" + dir_.path().string();
  }

  // Runs sql in database db; "" on success, else the error. *first (when
  // set) receives the first column of the first row.
  std::string Exec(const std::string& db, const std::string& sql, std::string* first = nullptr) {
    PGconn* c = PQconnectdb(("host=" + dir_.path().string() + " user=muster dbname=" + db).c_str());
    std::string err;
    if (PQstatus(c) != CONNECTION_OK) {
      err = PQerrorMessage(c);
    } else {
      PGresult* r = PQexec(c, sql.c_str());
      if (PQresultStatus(r) != PGRES_COMMAND_OK && PQresultStatus(r) != PGRES_TUPLES_OK) {
        err = PQresultErrorMessage(r);
      } else if (first && PQntuples(r) > 0) {
        *first = PQgetvalue(r, 0, 0);
      }
      PQclear(r);
    }
    PQfinish(c);
    return err;
  }

  // Stops and starts the server (same data, same socket): connections break.
  std::string Restart() {
    RunResult r = Run({bin_ + "/pg_ctl", "-D", data_, "-m", "fast", "-w", "-s", "stop"});
    if (!r.ok()) return "pg_ctl stop: " + r.Describe();
    started_ = false;
    return StartServer();
  }

 private:
  std::string Start() {
    bin_ = FindBinDir();
    if (bin_.empty()) {
      return "PostgreSQL binaries (initdb, pg_ctl) not found; install Debian's 'postgresql' "
             "package or set MUSTER_PG_BIN";
    }
    if (::geteuid() == 0 && ::chown(dir_.path().c_str(), 65534, 65534) != 0) {
      return "cannot hand " + dir_.path().string() + " to nobody";
    }
    std::string version = std::filesystem::path(bin_).parent_path().filename().string();
    std::string tmpl = (std::filesystem::temp_directory_path() /
                        ("muster-pg-template-" + version + "-" + std::to_string(::geteuid())))
                           .string();
    if (!std::filesystem::exists(tmpl + "/PG_VERSION")) {
      std::string fresh = dir_.path().string() + "/template";
      RunResult r = Run({bin_ + "/initdb", "-D", fresh, "-U", "muster", "--auth=trust", "-E",
                         "UTF8", "--locale=C", "--no-sync", "--no-instructions"});
      if (!r.ok()) return "initdb: " + r.Describe();
      // Another process may have won the race: then use its template.
      std::error_code ec;
      std::filesystem::rename(fresh, tmpl, ec);
      if (ec) std::filesystem::remove_all(fresh, ec);
    }
    data_ = dir_.path().string() + "/data";
    RunResult cp = Run({"/bin/cp", "-a", tmpl, data_});
    if (!cp.ok()) return "copying the PostgreSQL template: " + cp.Describe();
    return StartServer();
  }

  std::string StartServer() {
    RunResult r = Run({bin_ + "/pg_ctl", "-D", data_, "-w", "-t", "60", "-s", "-l",
                       dir_.path().string() + "/server.log", "-o",
                       "-k " + dir_.path().string() +
                           " -c listen_addresses= -c fsync=off -c full_page_writes=off"
                           " -c max_connections=200",
                       "start"});
    if (!r.ok()) {
      std::string log;
      try {
        log = Slurp(dir_.path() / "server.log");
      } catch (...) {
      }
      return "pg_ctl start: " + r.Describe() + "\n" + log;
    }
    started_ = true;
    return "";
  }

  // Runs a PostgreSQL tool, as nobody when this process is root.
  static RunResult Run(std::vector<std::string> argv) {
    if (::geteuid() == 0) {
      argv.insert(argv.begin(),
                  {"/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"});
    }
    RunOptions o;
    o.argv = std::move(argv);
    o.timeout = std::chrono::seconds(90);
    o.cwd = "/";
    SystemProcessRunner runner;
    return runner.Run(o);
  }

  TempDir dir_;
  std::string bin_, data_;
  bool started_ = false;
};

}  // namespace muster::testing
