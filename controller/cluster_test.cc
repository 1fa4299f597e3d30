// Cluster over a real PostgreSQL server (pg_test_server.h): what a controller
// that has just started reads from the change log.
#include "controller/cluster.h"

#include <gtest/gtest.h>
#include <libpq-fe.h>

#include <chrono>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common/crypto.h"
#include "controller/pg_test_server.h"
#include "controller/store.h"

namespace muster {
namespace {

using testing::PgTestServer;

// Records the log lines of "log" events; Deliver runs on the cluster thread.
class LogSink : public EventSink {
 public:
  void Deliver(std::string text) override {
    std::lock_guard lock(mu_);
    texts_.push_back(std::move(text));
  }
  bool Saw(const std::string& needle) {
    std::lock_guard lock(mu_);
    for (const auto& t : texts_) {
      if (t.find(needle) != std::string::npos) return true;
    }
    return false;
  }

 private:
  std::mutex mu_;
  std::vector<std::string> texts_;
};

// One libpq session of the test's own, for a transaction held open.
class Session {
 public:
  explicit Session(const std::string& conninfo) : conn_(PQconnectdb(conninfo.c_str())) {}
  ~Session() { PQfinish(conn_); }
  std::string Exec(const std::string& sql) {
    PGresult* r = PQexec(conn_, sql.c_str());
    std::string err;
    if (PQresultStatus(r) != PGRES_COMMAND_OK && PQresultStatus(r) != PGRES_TUPLES_OK) {
      err = PQresultErrorMessage(r);
    }
    PQclear(r);
    return err;
  }

 private:
  PGconn* conn_;
};

class ClusterTest : public ::testing::Test {
 protected:
  void SetUp() override {
    InitCrypto();
    std::string why;
    pg_ = PgTestServer::Shared(&why);
    if (pg_ == nullptr && PgTestServer::FindBinDir().empty()) GTEST_SKIP() << why;
    ASSERT_NE(pg_, nullptr) << why;
    uri_ = pg_->Uri(pg_->NewDatabase());
    auto s = OpenPostgresStore(uri_);
    ASSERT_TRUE(s.ok()) << s.message();
    store_ = std::move(*s);
  }

  static std::string LogInsert(const std::string& line) {
    return "INSERT INTO logs (machine, generation, stream, line, at) VALUES ('web1', 1, "
           "'stdout', '" +
           line + "', 0)";
  }

  // A controller's fleet and its Cluster, opened, loaded and started, with a
  // sink recording what it broadcasts.
  void StartCluster() {
    fleet_ = std::make_unique<Fleet>(*store_, [] { return std::int64_t{1717200000000}; });
    rollouts_ = std::make_unique<RolloutManager>(*fleet_, *store_);
    ClusterOptions o;
    o.conninfo = uri_;
    o.id = "test-controller";
    o.tick = std::chrono::milliseconds(20);
    ASSERT_TRUE(store_->SetControllerId(o.id).ok());
    cluster_ = std::make_unique<Cluster>(*fleet_, *rollouts_, o);
    ASSERT_TRUE(cluster_->Open().ok());
    ASSERT_TRUE(fleet_->Load().ok());
    sink_ = std::make_shared<LogSink>();
    fleet_->Subscribe(sink_);
    cluster_->Start();
  }

  // Waits (at most 10 s) until the sink saw every one of `lines`.
  bool SawAll(const std::vector<std::string>& lines) {
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    for (;;) {
      bool all = true;
      for (const auto& l : lines) all = all && sink_->Saw(l);
      if (all) return true;
      if (std::chrono::steady_clock::now() >= deadline) return false;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  }

  void TearDown() override {
    if (cluster_) cluster_->Stop();
  }

  PgTestServer* pg_ = nullptr;
  std::string uri_;
  std::unique_ptr<Store> store_;
  std::unique_ptr<Fleet> fleet_;
  std::unique_ptr<RolloutManager> rollouts_;
  std::unique_ptr<Cluster> cluster_;
  std::shared_ptr<LogSink> sink_;
};

// A change whose transaction was open when the controller started, and whose
// id is below one already committed then, still reaches this controller once
// it commits; what was committed before the start is not replayed.
TEST_F(ClusterTest, AChangeCommittedAfterTheStartBelowTheNewestIdArrives) {
  Session held(uri_);
  ASSERT_EQ(held.Exec("BEGIN"), "");
  ASSERT_EQ(held.Exec(LogInsert("late line")), "");  // takes the lower change id
  Session other(uri_);
  ASSERT_EQ(other.Exec(LogInsert("early line")), "");  // commits the higher one

  StartCluster();

  ASSERT_EQ(held.Exec("COMMIT"), "");
  EXPECT_TRUE(SawAll({"late line"}));
  // Changes of transactions begun after the start are the normal path.
  ASSERT_EQ(other.Exec(LogInsert("after line")), "");
  EXPECT_TRUE(SawAll({"after line"}));
  EXPECT_FALSE(sink_->Saw("early line"));
}

// A change whose id is below one already committed, held by a transaction
// newer than every completed one (so in no list of the reader's snapshot),
// is waited for while other transactions come and go, and arrives when it
// commits: before, the reader took the gap for a rollback and skipped it.
TEST_F(ClusterTest, AGapHeldByATransactionNewerThanTheSnapshotIsWaitedFor) {
  StartCluster();

  Session older(uri_), held(uri_), others(uri_);
  ASSERT_EQ(older.Exec("BEGIN"), "");
  ASSERT_EQ(older.Exec("SELECT pg_current_xact_id()"), "");  // the older xid, no row yet
  ASSERT_EQ(held.Exec("BEGIN"), "");
  ASSERT_EQ(held.Exec(LogInsert("held line")), "");    // newer xid, lower change id
  ASSERT_EQ(older.Exec(LogInsert("older line")), "");  // higher change id
  ASSERT_EQ(older.Exec("COMMIT"), "");                 // the held one is newest now, and open
  // Transactions that complete meanwhile move the snapshots' xmax past it.
  for (int i = 0; i < 10; ++i) {
    ASSERT_EQ(others.Exec("SELECT pg_current_xact_id()"), "");
    std::this_thread::sleep_for(std::chrono::milliseconds(30));
  }
  EXPECT_FALSE(sink_->Saw("older line")) << "applied in id order: it waits behind the gap";
  ASSERT_EQ(held.Exec("COMMIT"), "");
  SawAll({"held line", "older line"});
  EXPECT_TRUE(sink_->Saw("held line")) << "the held change was skipped as rolled back";
  EXPECT_TRUE(sink_->Saw("older line"));
}

}  // namespace
}  // namespace muster
