#include "controller/store.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common/testutil.h"
#include "controller/pg_test_server.h"

namespace muster {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using testing::PgTestServer;

// Every test runs against each backend: SQLite in a temporary directory, and
// PostgreSQL in a fresh database of a server started for the test process
// (skipped only when the PostgreSQL binaries are not installed).
class StoreTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    if (GetParam() == "postgresql") {
      std::string why;
      pg_ = testing::PgTestServer::Shared(&why);
      if (pg_ == nullptr && PgTestServer::FindBinDir().empty()) GTEST_SKIP() << why;
      ASSERT_NE(pg_, nullptr) << why;
      spec_ = pg_->Uri(pg_->NewDatabase());
    } else {
      spec_ = (dir_ / "muster.db").string();
    }
    Reopen();
  }

  void Reopen(const StoreLimits& limits = {}) {
    store_.reset();
    auto s = Open(limits);
    ASSERT_TRUE(s.ok()) << s.message();
    store_ = std::move(*s);
  }

  // A further store on the same data (another controller, for PostgreSQL).
  Result<std::unique_ptr<Store>> Open(const StoreLimits& limits = {}) {
    return GetParam() == "postgresql" ? OpenPostgresStore(spec_, limits)
                                      : OpenSqliteStore(spec_, limits);
  }

  static MachineRecord Machine(const std::string& name, const std::string& key,
                               std::vector<std::string> tags = {}) {
    MachineRecord m;
    m.name = name;
    m.key = key;
    m.tags = std::move(tags);
    m.created_at = 1000;
    return m;
  }

  static GenerationRecord Gen(const std::string& machine, std::int64_t generation) {
    GenerationRecord g;
    g.machine = machine;
    g.generation = generation;
    g.manifest = {"{\"generation\":" + std::to_string(generation) + "}", "ed25519:op",
                  "sig" + std::to_string(generation)};
    g.vars = "dmFycw==";
    g.toplevel = "/nix/store/" + std::to_string(generation) + "-system";
    g.action = "switch";
    g.rollout = "r1";
    g.published_by = "alice";
    g.created_at = 2000 + generation;
    return g;
  }

  static EventRecord Event(std::int64_t generation, const std::string& phase, std::int64_t at,
                           const std::string& detail = "") {
    EventRecord e;
    e.generation = generation;
    e.phase = phase;
    e.detail = detail;
    e.at = at;
    return e;
  }

  testing::TempDir dir_;
  testing::PgTestServer* pg_ = nullptr;
  std::string spec_;
  std::unique_ptr<Store> store_;
};

INSTANTIATE_TEST_SUITE_P(Backends, StoreTest, ::testing::Values("sqlite", "postgresql"),
                         [](const auto& p) { return p.param; });

TEST_P(StoreTest, MachinesAddGetListRemove) {
  ASSERT_TRUE(store_->AddMachine(Machine("web2", "ed25519:k2", {"web"})).ok());
  ASSERT_TRUE(store_->AddMachine(Machine("db1", "ed25519:k1", {"db", "eu"})).ok());
  auto m = store_->GetMachine("db1");
  ASSERT_TRUE(m.has_value());
  EXPECT_EQ(m->key, "ed25519:k1");
  EXPECT_THAT(m->tags, ElementsAre("db", "eu"));
  EXPECT_EQ(m->created_at, 1000);
  EXPECT_EQ(m->last_seen, 0);
  EXPECT_EQ(m->phase, "idle");
  EXPECT_EQ(m->generation, 0);
  EXPECT_TRUE(m->facts.is_object());
  EXPECT_FALSE(store_->GetMachine("nope").has_value());

  auto all = store_->ListMachines();
  ASSERT_EQ(all.size(), 2u);
  EXPECT_EQ(all[0].name, "db1") << "sorted by name";
  EXPECT_EQ(all[1].name, "web2");

  ASSERT_TRUE(store_->RemoveMachine("db1").ok());
  EXPECT_FALSE(store_->GetMachine("db1").has_value());
  auto again = store_->RemoveMachine("db1");
  ASSERT_FALSE(again.ok());
  EXPECT_THAT(again.message(), HasSubstr("no machine named 'db1'"));
  EXPECT_EQ(store_->ListMachines().size(), 1u);
}

TEST_P(StoreTest, DuplicateNameOrKeyIsRefused) {
  ASSERT_TRUE(store_->AddMachine(Machine("web1", "ed25519:k1")).ok());
  struct Case {
    const char* name;
    MachineRecord m;
  } cases[] = {
      {"same name", Machine("web1", "ed25519:other")},
      {"same key", Machine("web9", "ed25519:k1")},
  };
  for (const auto& c : cases) {
    auto st = store_->AddMachine(c.m);
    ASSERT_FALSE(st.ok()) << c.name;
    EXPECT_THAT(st.message(), HasSubstr("already registered")) << c.name;
    EXPECT_THAT(st.message(), HasSubstr("muster machine remove " + c.m.name)) << c.name;
  }
  EXPECT_EQ(store_->ListMachines().size(), 1u);
  // After removal the name and key are free again.
  ASSERT_TRUE(store_->RemoveMachine("web1").ok());
  EXPECT_TRUE(store_->AddMachine(Machine("web1", "ed25519:k1")).ok());
}

TEST_P(StoreTest, Tags) {
  ASSERT_TRUE(store_->AddMachine(Machine("web1", "ed25519:k1", {"a"})).ok());
  ASSERT_TRUE(store_->SetMachineTags("web1", {"web", "canary", "eu-west"}).ok());
  EXPECT_THAT(store_->GetMachine("web1")->tags, ElementsAre("web", "canary", "eu-west"));
  ASSERT_TRUE(store_->SetMachineTags("web1", {}).ok());
  EXPECT_TRUE(store_->GetMachine("web1")->tags.empty());
  auto st = store_->SetMachineTags("ghost", {"x"});
  ASSERT_FALSE(st.ok());
  EXPECT_THAT(st.message(), HasSubstr("no machine named 'ghost'"));
}

TEST_P(StoreTest, Operators) {
  ASSERT_TRUE(store_->AddOperator({"bob", "ed25519:b", 5}).ok());
  ASSERT_TRUE(store_->AddOperator({"alice", "ed25519:a", 6}).ok());
  auto dup = store_->AddOperator({"carol", "ed25519:a", 7});
  ASSERT_FALSE(dup.ok());
  EXPECT_THAT(dup.message(), HasSubstr("already registered"));
  auto ops = store_->ListOperators();
  ASSERT_EQ(ops.size(), 2u);
  EXPECT_EQ(ops[0].name, "alice");
  EXPECT_EQ(ops[0].key, "ed25519:a");
  EXPECT_EQ(ops[0].created_at, 6);
  ASSERT_TRUE(store_->RemoveOperator("alice").ok());
  auto gone = store_->RemoveOperator("alice");
  ASSERT_FALSE(gone.ok());
  EXPECT_THAT(gone.message(), HasSubstr("no operator named 'alice'"));
}

TEST_P(StoreTest, GenerationsMustIncrease) {
  ASSERT_TRUE(store_->AddMachine(Machine("web1", "ed25519:k1")).ok());
  ASSERT_TRUE(store_->AddGeneration(Gen("web1", 1)).ok());
  ASSERT_TRUE(store_->AddGeneration(Gen("web1", 5)).ok());
  struct Case {
    std::int64_t generation;
  } cases[] = {{5}, {4}, {1}, {0}, {-1}};
  for (const auto& c : cases) {
    auto st = store_->AddGeneration(Gen("web1", c.generation));
    ASSERT_FALSE(st.ok()) << c.generation;
    EXPECT_THAT(st.message(), HasSubstr("generation " + std::to_string(c.generation) +
                                        " for web1 is not newer than the stored generation 5"));
  }
  // Numbering is per machine.
  EXPECT_TRUE(store_->AddGeneration(Gen("db1", 1)).ok());
  EXPECT_TRUE(store_->AddGeneration(Gen("web1", 6)).ok());
  // A refused insert leaves no transaction open: later writes still work.
  EXPECT_TRUE(store_->SetSetting("k", "v").ok());
  // Every machine's highest number in one read, held-back ones included.
  GenerationRecord held = Gen("db1", 9);
  held.released = false;
  ASSERT_TRUE(store_->AddGeneration(held).ok());
  EXPECT_EQ(store_->MaxGenerations(),
            (std::map<std::string, std::int64_t>{{"db1", 9}, {"web1", 6}}));
  EXPECT_EQ(store_->MaxGeneration("db1"), 9);
}

TEST_P(StoreTest, LatestGetAndListGenerations) {
  EXPECT_FALSE(store_->LatestGeneration("web1").has_value());
  for (std::int64_t g : {1, 2, 3, 7}) ASSERT_TRUE(store_->AddGeneration(Gen("web1", g)).ok());
  auto latest = store_->LatestGeneration("web1");
  ASSERT_TRUE(latest.has_value());
  EXPECT_EQ(latest->generation, 7);
  GenerationRecord want = Gen("web1", 7);
  EXPECT_EQ(latest->manifest.manifest, want.manifest.manifest);
  EXPECT_EQ(latest->manifest.signer, want.manifest.signer);
  EXPECT_EQ(latest->manifest.signature, want.manifest.signature);
  EXPECT_EQ(latest->vars, want.vars);
  EXPECT_EQ(latest->toplevel, want.toplevel);
  EXPECT_EQ(latest->action, want.action);
  EXPECT_EQ(latest->rollout, want.rollout);
  EXPECT_EQ(latest->published_by, want.published_by);
  EXPECT_EQ(latest->created_at, want.created_at);

  EXPECT_EQ(store_->GetGeneration("web1", 2)->toplevel, "/nix/store/2-system");
  EXPECT_FALSE(store_->GetGeneration("web1", 4).has_value());
  EXPECT_FALSE(store_->GetGeneration("db1", 2).has_value());

  std::vector<std::int64_t> listed;
  for (const auto& g : store_->ListGenerations("web1", 3)) listed.push_back(g.generation);
  EXPECT_THAT(listed, ElementsAre(7, 3, 2)) << "newest first, limited";
  EXPECT_TRUE(store_->ListGenerations("nobody", 10).empty());
}

TEST_P(StoreTest, StatusUpdatesMachineAndAppendsEventsInOrder) {
  ASSERT_TRUE(store_->AddMachine(Machine("web1", "ed25519:k1")).ok());
  const char* phases[] = {"received", "verified", "realising", "activating", "succeeded"};
  std::int64_t at = 100;
  for (const char* p : phases) {
    ASSERT_TRUE(store_
                    ->RecordStatus("web1", Event(3, p, at++, std::string("d-") + p),
                                   "/nix/store/3-system", false)
                    .ok());
  }
  ASSERT_TRUE(store_->RecordStatus("web1", Event(4, "received", at++), "", true).ok());

  auto m = store_->GetMachine("web1");
  EXPECT_EQ(m->generation, 4);
  EXPECT_EQ(m->phase, "received");
  EXPECT_EQ(m->toplevel, "/nix/store/3-system") << "an empty toplevel keeps the known one";
  EXPECT_TRUE(m->reboot_required);
  EXPECT_EQ(m->last_seen, at - 1);
  EXPECT_EQ(m->last_applied, 3) << "'received' does not count as accepted";

  std::vector<std::string> got;
  for (const auto& e : store_->ListEvents("web1", 3, 100)) {
    got.push_back(e.phase);
    EXPECT_EQ(e.machine, "web1");
    EXPECT_EQ(e.generation, 3);
    EXPECT_EQ(e.detail, "d-" + e.phase);
  }
  EXPECT_THAT(got, ElementsAre("received", "verified", "realising", "activating", "succeeded"));
  EXPECT_EQ(store_->ListEvents("web1", 0, 100).size(), 6u) << "generation 0 lists all";
  // A limit keeps the most recent events, still oldest first.
  got.clear();
  for (const auto& e : store_->ListEvents("web1", 0, 2)) got.push_back(e.phase);
  EXPECT_THAT(got, ElementsAre("succeeded", "received"));
  auto all = store_->ListEvents("web1", 0, 100);
  EXPECT_TRUE(std::is_sorted(all.begin(), all.end(),
                             [](const auto& a, const auto& b) { return a.id < b.id; }));
}

TEST_P(StoreTest, LastAppliedFollowsAcceptedPhasesOnly) {
  ASSERT_TRUE(store_->AddMachine(Machine("web1", "ed25519:k1")).ok());
  struct Case {
    std::int64_t generation;
    const char* phase;
    std::int64_t want_last_applied;
  } cases[] = {
      {2, "received", 0},   {2, "refused", 0}, {3, "verified", 3},
      {4, "idle", 3},       {5, "failed", 5},  {4, "succeeded", 5},  // never decreases
      {6, "confirming", 6},
  };
  std::int64_t at = 1;
  for (const auto& c : cases) {
    ASSERT_TRUE(store_->RecordStatus("web1", Event(c.generation, c.phase, at++), "", false).ok());
    EXPECT_EQ(store_->GetMachine("web1")->last_applied, c.want_last_applied)
        << c.generation << " " << c.phase;
  }
}

TEST_P(StoreTest, HelloAndSeen) {
  ASSERT_TRUE(store_->AddMachine(Machine("web1", "ed25519:k1")).ok());
  nlohmann::json facts = {{"system", "x86_64-linux"}, {"os", "nixos"}};
  ASSERT_TRUE(store_->RecordHello("web1", 500, facts, 9).ok());
  auto m = store_->GetMachine("web1");
  EXPECT_EQ(m->facts, facts);
  EXPECT_EQ(m->last_seen, 500);
  EXPECT_EQ(m->last_applied, 9);
  ASSERT_TRUE(store_->RecordHello("web1", 600, facts, 4).ok());
  EXPECT_EQ(store_->GetMachine("web1")->last_applied, 9) << "an agent cannot lower it";
  ASSERT_TRUE(store_->RecordSeen("web1", 700).ok());
  EXPECT_EQ(store_->GetMachine("web1")->last_seen, 700);
}

TEST_P(StoreTest, DeparturesRecordWhenEachMachineWasLastSeen) {
  ASSERT_TRUE(store_->AddMachine(Machine("web1", "ed25519:k1")).ok());
  ASSERT_TRUE(store_->AddMachine(Machine("web2", "ed25519:k2")).ok());
  ASSERT_TRUE(store_->RecordHello("web1", 500, nullptr, 0).ok());
  ASSERT_TRUE(store_->RecordHello("web2", 500, nullptr, 0).ok());
  ASSERT_TRUE(store_->RecordDepartures({{"web1", 800}, {"web2", 900}}).ok());
  EXPECT_EQ(store_->GetMachine("web1")->last_seen, 800);
  EXPECT_EQ(store_->GetMachine("web2")->last_seen, 900);
  // A machine removed meanwhile is no error; an empty batch writes nothing.
  ASSERT_TRUE(store_->RecordDepartures({{"gone", 950}}).ok());
  ASSERT_TRUE(store_->RecordDepartures({}).ok());
  EXPECT_EQ(store_->GetMachine("web1")->last_seen, 800);
}

TEST_P(StoreTest, GroupCommitsRecordEveryHelloAndReportInOrder) {
  ASSERT_TRUE(store_->AddMachine(Machine("web1", "ed25519:k1")).ok());
  ASSERT_TRUE(store_->AddMachine(Machine("web2", "ed25519:k2")).ok());
  nlohmann::json facts = {{"os", "nixos"}};
  auto hellos = store_->RecordHellos({{"web1", 500, facts, 3}, {"web2", 501, facts, 0}});
  ASSERT_EQ(hellos.size(), 2u);
  EXPECT_TRUE(hellos[0].ok() && hellos[1].ok());
  EXPECT_EQ(store_->GetMachine("web1")->last_applied, 3);
  EXPECT_EQ(store_->GetMachine("web2")->last_seen, 501);

  std::vector<StatusWrite> writes;
  std::int64_t at = 1000;
  for (const char* p : {"received", "verified", "succeeded"}) {
    writes.push_back({"web1", Event(4, p, at++),
                      std::string(p) == "succeeded" ? "/nix/store/4-system" : "", false, nullptr});
    writes.push_back({"web2", Event(7, p, at++), "", false, nullptr});
  }
  auto results = store_->RecordStatuses(writes);
  ASSERT_EQ(results.size(), writes.size());
  for (const auto& r : results) EXPECT_TRUE(r.ok()) << r.message();
  std::vector<std::string> got;
  for (const auto& e : store_->ListEvents("web1", 4, 10)) got.push_back(e.phase);
  EXPECT_THAT(got, ElementsAre("received", "verified", "succeeded"));
  auto m = store_->GetMachine("web1");
  EXPECT_EQ(m->phase, "succeeded");
  EXPECT_EQ(m->toplevel, "/nix/store/4-system");
  EXPECT_EQ(m->last_applied, 4);
  EXPECT_EQ(store_->GetMachine("web2")->last_applied, 7);
  Reopen();  // cached statements are finalized, so the store closes cleanly
  EXPECT_EQ(store_->ListEvents("web2", 7, 10).size(), 3u);
}

TEST_P(StoreTest, AReportsDeliveriesAreQueuedInItsTransaction) {
  ASSERT_TRUE(store_->AddMachine(Machine("web1", "k1")).ok());
  ASSERT_TRUE(
      store_->AddWebhook({"w1", "http://127.0.0.1:1/", std::string(32, 's'), {}, "a", 1}).ok());
  auto delivery = [](const std::string& body) {
    DeliveryRecord d;
    d.webhook = "w1";
    d.event = "deploy";
    d.body = body;
    d.created_at = d.next_at = 5;
    return d;
  };
  std::vector<StatusWrite> writes;
  writes.push_back({"web1", Event(1, "realising", 10), "", false, nullptr});
  writes.push_back({"web1", Event(1, "succeeded", 11), "/nix/store/1-system", false, nullptr});
  writes.back().deliveries = {delivery("first")};
  writes.back().max_queued = 10;
  for (const auto& st : store_->RecordStatuses(writes)) ASSERT_TRUE(st.ok()) << st.message();
  auto due = store_->DueDeliveries(100, 10);
  ASSERT_EQ(due.size(), 1u);
  EXPECT_EQ(due[0].body, "first");
  StatusWrite good{"web1", Event(2, "failed", 13), "", false, nullptr};
  good.deliveries = {delivery("second")};
  good.max_queued = 10;
  ASSERT_TRUE(store_->RecordStatusWrite(good).ok());
  EXPECT_EQ(store_->QueuedDeliveries(), 2);
  // The bound holds on this path too: the oldest go.
  StatusWrite more{"web1", Event(3, "succeeded", 14), "", false, nullptr};
  more.deliveries = {delivery("third"), delivery("fourth")};
  more.max_queued = 3;
  ASSERT_TRUE(store_->RecordStatusWrite(more).ok());
  std::vector<std::string> bodies;
  for (const auto& d : store_->DueDeliveries(100, 10)) bodies.push_back(d.body);
  std::sort(bodies.begin(), bodies.end());
  EXPECT_EQ(bodies, (std::vector<std::string>{"fourth", "second", "third"}));
}

TEST_P(StoreTest, LogsReadByGenerationAfterIdWithLimit) {
  std::vector<LogRecord> batch;
  for (int i = 0; i < 10; ++i) {
    batch.push_back({0, "web1", 3, i % 2 ? "activate" : "realise", "line " + std::to_string(i), i});
  }
  batch.push_back({0, "web1", 4, "realise", "other generation", 99});
  ASSERT_TRUE(store_->AppendLogs(batch).ok());
  ASSERT_TRUE(store_->AppendLogs({}).ok());

  auto first = store_->ReadLogs("web1", 3, 0, 4);
  ASSERT_EQ(first.size(), 4u);
  EXPECT_EQ(first[0].line, "line 0");
  EXPECT_EQ(first[1].stream, "activate");
  EXPECT_EQ(first[3].line, "line 3");
  auto rest = store_->ReadLogs("web1", 3, first.back().id, 100);
  ASSERT_EQ(rest.size(), 6u);
  EXPECT_EQ(rest[0].line, "line 4");
  EXPECT_EQ(rest[5].line, "line 9");
  EXPECT_EQ(rest[5].at, 9);
  EXPECT_TRUE(store_->ReadLogs("web1", 3, rest.back().id, 100).empty());
  auto other = store_->ReadLogs("web1", 4, 0, 100);
  ASSERT_EQ(other.size(), 1u);
  EXPECT_EQ(other[0].line, "other generation");
}

TEST_P(StoreTest, LogsAreBoundedPerGeneration) {
  const std::string kilobyte(1024, 'x');
  constexpr std::int64_t kBound = 4 << 20;
  int n = 0;
  for (int batch = 0; batch < 6; ++batch) {  // 6 MiB in 1 MiB batches
    std::vector<LogRecord> lines;
    for (int i = 0; i < 1024; ++i, ++n) {
      lines.push_back({0, "web1", 1, "realise", std::to_string(n) + ":" + kilobyte, n});
    }
    ASSERT_TRUE(store_->AppendLogs(lines).ok());
  }
  ASSERT_TRUE(store_->AppendLogs({{0, "web1", 2, "realise", "small", 0}}).ok());
  auto kept = store_->ReadLogs("web1", 1, 0, 100000);
  std::int64_t bytes = 0;
  for (const auto& l : kept) bytes += static_cast<std::int64_t>(l.line.size());
  EXPECT_LE(bytes, kBound);
  EXPECT_GE(bytes, kBound / 2) << "dropping is gradual, not everything";
  ASSERT_FALSE(kept.empty());
  EXPECT_EQ(kept.front().line.substr(0, kept.front().line.find(':')),
            std::to_string(n - static_cast<int>(kept.size())))
      << "the oldest lines go first";
  EXPECT_EQ(kept.back().line.substr(0, kept.back().line.find(':')), std::to_string(n - 1));
  EXPECT_EQ(store_->ReadLogs("web1", 2, 0, 10).size(), 1u) << "other generations untouched";
}

// Bytes a set of log lines occupies by the store's accounting.
std::int64_t LogBytes(const std::vector<LogRecord>& lines) {
  std::int64_t n = 0;
  for (const auto& l : lines) {
    n += static_cast<std::int64_t>(l.line.size()) + StoreLimits::kLogRowOverhead;
  }
  return n;
}

TEST_P(StoreTest, LogsAreBoundedPerMachineOldestGenerationsFirst) {
  StoreLimits limits;
  limits.log_bytes_per_generation = 64 << 10;
  limits.log_bytes_per_machine = 256 << 10;
  Reopen(limits);
  const std::string line(960, 'x');  // 1 KiB with the row overhead
  for (int gen = 1; gen <= 10; ++gen) {
    std::vector<LogRecord> lines;
    for (int i = 0; i < 100; ++i) {
      lines.push_back({0, "web1", gen, "realise", std::to_string(i) + ":" + line, i});
    }
    ASSERT_TRUE(store_->AppendLogs(lines).ok());
  }
  ASSERT_TRUE(store_->AppendLogs({{0, "web2", 1, "realise", "another machine", 0}}).ok());
  std::int64_t total = 0;
  std::vector<int> kept_gens;
  for (int gen = 1; gen <= 10; ++gen) {
    auto kept = store_->ReadLogs("web1", gen, 0, 100000);
    EXPECT_LE(LogBytes(kept), limits.log_bytes_per_generation) << "generation " << gen;
    total += LogBytes(kept);
    if (!kept.empty()) kept_gens.push_back(gen);
  }
  EXPECT_LE(total, limits.log_bytes_per_machine);
  EXPECT_GE(total, limits.log_bytes_per_machine / 2) << "pruning is gradual";
  ASSERT_FALSE(kept_gens.empty());
  EXPECT_EQ(kept_gens.back(), 10) << "the newest generation is kept";
  EXPECT_GT(kept_gens.front(), 1) << "the oldest generation goes first";
  for (std::size_t i = 1; i < kept_gens.size(); ++i) {
    EXPECT_EQ(kept_gens[i], kept_gens[i - 1] + 1) << "only the oldest generations are gone";
  }
  EXPECT_EQ(store_->ReadLogs("web2", 1, 0, 10).size(), 1u) << "other machines untouched";
}

TEST_P(StoreTest, EmptyLogLinesAreBoundedByTheirRowCost) {
  StoreLimits limits;
  limits.log_bytes_per_generation = 64 << 10;
  limits.log_bytes_per_machine = 64 << 10;
  Reopen(limits);
  std::vector<LogRecord> lines(20000, LogRecord{0, "web1", 1, "realise", "", 0});
  ASSERT_TRUE(store_->AppendLogs(lines).ok());
  auto kept = store_->ReadLogs("web1", 1, 0, 100000);
  EXPECT_LE(static_cast<std::int64_t>(kept.size()),
            limits.log_bytes_per_machine / StoreLimits::kLogRowOverhead);
  EXPECT_FALSE(kept.empty());
}

TEST_P(StoreTest, LogBoundHoldsAcrossReopen) {
  StoreLimits limits;
  limits.log_bytes_per_generation = 64 << 10;
  limits.log_bytes_per_machine = 128 << 10;
  Reopen(limits);
  const std::string line(960, 'y');
  for (int round = 0; round < 2; ++round) {
    for (int gen = round * 3 + 1; gen <= round * 3 + 3; ++gen) {
      std::vector<LogRecord> lines(60, LogRecord{0, "web1", gen, "realise", line, 0});
      ASSERT_TRUE(store_->AppendLogs(lines).ok());
    }
    Reopen(limits);  // the per-machine total is recounted from the store
  }
  std::int64_t total = 0;
  for (int gen = 1; gen <= 6; ++gen) total += LogBytes(store_->ReadLogs("web1", gen, 0, 100000));
  EXPECT_LE(total, limits.log_bytes_per_machine);
  EXPECT_FALSE(store_->ReadLogs("web1", 6, 0, 1).empty());
}

TEST_P(StoreTest, EventsAreBoundedPerMachineKeepingTheNewestGenerationsWhole) {
  StoreLimits limits;
  limits.events_per_machine = 40;
  limits.keep_event_generations = 2;
  Reopen(limits);
  ASSERT_TRUE(store_->AddMachine(Machine("web1", "ed25519:k1")).ok());
  ASSERT_TRUE(store_->AddMachine(Machine("web2", "ed25519:k2")).ok());
  for (int gen = 1; gen <= 5; ++gen) ASSERT_TRUE(store_->AddGeneration(Gen("web1", gen)).ok());
  ASSERT_TRUE(store_->RecordStatus("web2", Event(1, "succeeded", 1), "", false).ok());
  // Gen 99 does not exist: its events are never among the newest generations.
  std::vector<StatusWrite> writes;
  for (int gen : {1, 2, 99, 3, 4, 5}) {
    for (int i = 0; i < 10; ++i) {
      writes.push_back({"web1", Event(gen, "realising", gen * 100 + i), "", false});
    }
  }
  for (const auto& st : store_->RecordStatuses(writes)) ASSERT_TRUE(st.ok()) << st.message();
  auto all = store_->ListEvents("web1", 0, 100000);
  EXPECT_LE(all.size(), 40u);
  EXPECT_EQ(store_->ListEvents("web1", 5, 100).size(), 10u) << "newest generation whole";
  EXPECT_EQ(store_->ListEvents("web1", 4, 100).size(), 10u) << "second newest whole";
  EXPECT_TRUE(store_->ListEvents("web1", 1, 100).empty()) << "oldest events go first";
  EXPECT_EQ(store_->ListEvents("web2", 0, 100).size(), 1u) << "other machines untouched";

  // A flood for the newest generation: the bound still holds, newest kept.
  for (int i = 0; i < 200; ++i) {
    ASSERT_TRUE(store_->RecordStatus("web1", Event(5, "confirming", 10000 + i), "", false).ok());
  }
  all = store_->ListEvents("web1", 0, 100000);
  EXPECT_LE(all.size(), 40u);
  ASSERT_FALSE(all.empty());
  EXPECT_EQ(all.back().at, 10199);
  Reopen(limits);  // the count is recounted after a restart
  for (int i = 0; i < 50; ++i) {
    ASSERT_TRUE(store_->RecordStatus("web1", Event(5, "confirming", 20000 + i), "", false).ok());
  }
  EXPECT_LE(store_->ListEvents("web1", 0, 100000).size(), 40u);
}

TEST_P(StoreTest, HasGeneration) {
  ASSERT_TRUE(store_->AddGeneration(Gen("web1", 3)).ok());
  auto held = Gen("web1", 4);
  held.released = false;
  ASSERT_TRUE(store_->AddGeneration(held).ok());
  EXPECT_TRUE(store_->HasGeneration("web1", 3));
  EXPECT_TRUE(store_->HasGeneration("web1", 4)) << "unreleased generations exist too";
  EXPECT_FALSE(store_->HasGeneration("web1", 2));
  EXPECT_FALSE(store_->HasGeneration("web2", 3));
}

TEST(StoreLimitsCheck, NamesTheSettingThatIsWrong) {
  StoreLimits l;
  EXPECT_TRUE(CheckStoreLimits(l).ok()) << "the defaults are valid";
  l.log_bytes_per_machine = l.log_bytes_per_generation - 1;
  EXPECT_THAT(CheckStoreLimits(l).message(),
              HasSubstr("--max-log-bytes-per-machine (4194303) must be at least "
                        "--max-log-bytes-per-generation (4194304)"));
  l = {};
  l.events_per_machine = 3;
  EXPECT_THAT(CheckStoreLimits(l).message(), HasSubstr("--max-events-per-machine"));
  l = {};
  l.keep_event_generations = -1;
  EXPECT_THAT(CheckStoreLimits(l).message(), HasSubstr("--keep-event-generations"));
  testing::TempDir dir;
  l.keep_event_generations = -1;
  auto s = OpenSqliteStore((dir / "muster.db").string(), l);
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(s.message(), HasSubstr("--keep-event-generations"));
}

// A rollout step: a final report on one item, the release of the next and
// the rollout's new state, in one call.
TEST_P(StoreTest, ARolloutStepStoresFinalsReleasesAndStateTogether) {
  for (const char* name : {"web1", "web2"}) {
    MachineRecord m;
    m.name = name;
    m.key = std::string("ed25519:") + name;
    m.created_at = 1;
    ASSERT_TRUE(store_->AddMachine(m).ok());
  }
  RolloutRecord r;
  r.id = "r1";
  r.created_by = "alice";
  r.state = "running";
  std::vector<GenerationRecord> gens;
  std::vector<RolloutItemRecord> items;
  for (int i = 0; i < 2; ++i) {
    GenerationRecord g;
    g.machine = i == 0 ? "web1" : "web2";
    g.generation = 1;
    g.manifest.manifest = "{}";
    g.toplevel = "/nix/store/1-system";
    g.action = "switch";
    g.rollout = "r1";
    g.released = i == 0;
    gens.push_back(g);
    RolloutItemRecord it;
    it.rollout = "r1";
    it.position = i;
    it.machine = g.machine;
    it.generation = 1;
    it.state = i == 0 ? "released" : "pending";
    items.push_back(it);
  }
  ASSERT_TRUE(store_->CreateRollout(r, gens, items).ok());
  EXPECT_FALSE(store_->LatestGeneration("web2").has_value());

  RolloutItemRecord done = items[0], next = items[1];
  done.state = "succeeded";
  done.detail = "succeeded";
  next.state = "released";
  RolloutRecord state = r;
  state.detail = "1 of 2 done";
  state.updated_at = 9;
  ASSERT_TRUE(store_->AdvanceRollout({done}, {next}, &state).ok());
  auto stored = store_->ListRolloutItems("r1");
  ASSERT_EQ(stored.size(), 2u);
  EXPECT_EQ(stored[0].state, "succeeded");
  EXPECT_EQ(stored[0].detail, "succeeded");
  EXPECT_EQ(stored[1].state, "released");
  ASSERT_TRUE(store_->LatestGeneration("web2").has_value()) << "its generation is released";
  EXPECT_EQ(store_->GetRollout("r1")->detail, "1 of 2 done");
  EXPECT_EQ(store_->GetRollout("r1")->updated_at, 9);

  // An item named twice: the later final wins, as written in turn; and on
  // PostgreSQL, where several controllers may try, an item released already
  // is not released again.
  RolloutItemRecord first = done, last = done, again = next;
  first.detail = "first";
  last.detail = "last";
  again.detail = "released again";
  ASSERT_TRUE(store_->AdvanceRollout({first, last}, {again, again}, nullptr).ok());
  stored = store_->ListRolloutItems("r1");
  ASSERT_EQ(stored.size(), 2u);
  EXPECT_EQ(stored[0].detail, "last");
  if (GetParam() == "postgresql") {
    EXPECT_EQ(stored[1].detail, "") << "a released item is not released twice";
  }
}

TEST_P(StoreTest, ARolloutWithAGenerationNotNewerStoresNothing) {
  for (const char* name : {"web1", "web2", "web3"}) {
    ASSERT_TRUE(store_->AddMachine(Machine(name, std::string("ed25519:") + name)).ok());
  }
  ASSERT_TRUE(store_->AddGeneration(Gen("web2", 5)).ok());
  RolloutRecord r;
  r.id = "r1";
  r.state = "running";
  std::vector<GenerationRecord> gens;
  std::vector<RolloutItemRecord> items;
  for (const char* name : {"web1", "web2", "web3"}) {
    GenerationRecord g = Gen(name, 5);
    g.manifest.manifest = "{\"quoted\": \"a\\\\b\", \"m\": \"" + std::string(name) + "\"}";
    g.released = false;
    gens.push_back(g);
    RolloutItemRecord it;
    it.rollout = "r1";
    it.position = static_cast<int>(items.size());
    it.machine = name;
    it.generation = 5;
    items.push_back(it);
  }
  auto refused = store_->CreateRollout(r, gens, items);
  EXPECT_THAT(refused.message(), HasSubstr("generation 5 for web2 is not newer than the stored "
                                           "generation 5"));
  EXPECT_FALSE(store_->GetRollout("r1").has_value());
  EXPECT_EQ(store_->MaxGeneration("web1"), 0) << "nothing of the refused rollout was stored";

  for (auto& g : gens) g.generation = 6;
  for (auto& it : items) it.generation = 6;
  ASSERT_TRUE(store_->CreateRollout(r, gens, items).ok());
  auto g1 = store_->GetGeneration("web1", 6);
  ASSERT_TRUE(g1.has_value());
  EXPECT_EQ(g1->manifest.manifest, gens[0].manifest.manifest) << "text intact";
  EXPECT_FALSE(g1->released);
  EXPECT_EQ(g1->vars, gens[0].vars);
  EXPECT_EQ(store_->ListRolloutItems("r1").size(), 3u);
  EXPECT_EQ(store_->ListRolloutItems("r1")[2].machine, "web3");
}

TEST_P(StoreTest, SettingsAndSchemaVersion) {
  EXPECT_EQ(store_->GetSetting("schema_version"), GetParam() == "postgresql" ? "5" : "1");
  EXPECT_FALSE(store_->GetSetting("missing").has_value());
  ASSERT_TRUE(store_->SetSetting("k", "v1").ok());
  ASSERT_TRUE(store_->SetSetting("k", "v2").ok());
  EXPECT_EQ(store_->GetSetting("k"), "v2");
}

TEST_P(StoreTest, DataSurvivesReopen) {
  ASSERT_TRUE(store_->AddMachine(Machine("web1", "ed25519:k1", {"web"})).ok());
  ASSERT_TRUE(store_->AddOperator({"alice", "ed25519:a", 1}).ok());
  ASSERT_TRUE(store_->AddGeneration(Gen("web1", 8)).ok());
  ASSERT_TRUE(
      store_->RecordStatus("web1", Event(8, "succeeded", 50), "/nix/store/8-system", false).ok());
  ASSERT_TRUE(store_->AppendLogs({{0, "web1", 8, "activate", "done", 51}}).ok());
  ASSERT_TRUE(store_->SetSetting("k", "v").ok());
  Reopen();
  auto m = store_->GetMachine("web1");
  ASSERT_TRUE(m.has_value());
  EXPECT_THAT(m->tags, ElementsAre("web"));
  EXPECT_EQ(m->phase, "succeeded");
  EXPECT_EQ(m->last_applied, 8);
  EXPECT_EQ(store_->ListOperators().size(), 1u);
  EXPECT_EQ(store_->LatestGeneration("web1")->generation, 8);
  EXPECT_EQ(store_->ListEvents("web1", 8, 10).size(), 1u);
  EXPECT_EQ(store_->ReadLogs("web1", 8, 0, 10).size(), 1u);
  EXPECT_EQ(store_->GetSetting("k"), "v");
  EXPECT_FALSE(store_->AddGeneration(Gen("web1", 8)).ok()) << "numbering survives too";
}

TEST_P(StoreTest, WebhooksAndABoundedDeliveryQueue) {
  WebhookRecord w;
  w.id = "w1";
  w.url = "http://127.0.0.1:9/hook";
  w.secret = std::string(32, 's');
  w.events = {"deploy"};
  w.created_at = 5;
  ASSERT_TRUE(store_->AddWebhook(w).ok());
  EXPECT_FALSE(store_->AddWebhook(w).ok()) << "the id exists";
  auto hooks = store_->ListWebhooks();
  ASSERT_EQ(hooks.size(), 1u);
  EXPECT_EQ(hooks[0].url, w.url);
  EXPECT_EQ(hooks[0].events, std::vector<std::string>{"deploy"});
  std::vector<DeliveryRecord> rows;
  for (int i = 0; i < 3; ++i) {
    DeliveryRecord d;
    d.webhook = "w1";
    d.event = "deploy";
    d.body = "{\"n\":" + std::to_string(i) + "}";
    d.created_at = 10;
    d.next_at = 10 + i;
    rows.push_back(d);
  }
  auto dropped = store_->EnqueueDeliveries(rows, 2);
  ASSERT_TRUE(dropped.ok()) << dropped.message();
  EXPECT_EQ(*dropped, 1) << "the bound drops the oldest";
  EXPECT_EQ(store_->QueuedDeliveries(), 2);
  EXPECT_EQ(store_->NextDeliveryAt(), std::optional<std::int64_t>(11));
  auto due = store_->DueDeliveries(11, 10);
  ASSERT_EQ(due.size(), 1u);
  EXPECT_EQ(due[0].body, "{\"n\":1}");
  due[0].attempts = 1;
  due[0].next_at = 100;
  due[0].last_error = "HTTP 500";
  ASSERT_TRUE(store_->RescheduleDelivery(due[0]).ok());
  due = store_->DueDeliveries(100, 10);
  ASSERT_EQ(due.size(), 2u);
  EXPECT_EQ(due[0].body, "{\"n\":2}");
  EXPECT_EQ(due[1].attempts, 1);
  EXPECT_EQ(due[1].last_error, "HTTP 500");
  ASSERT_TRUE(store_->RemoveDelivery(due[0].id).ok());
  EXPECT_EQ(store_->QueuedDeliveries(), 1);
  ASSERT_TRUE(store_->RemoveWebhook("w1").ok());
  EXPECT_EQ(store_->QueuedDeliveries(), 0) << "its deliveries go with it";
  EXPECT_FALSE(store_->RemoveWebhook("w1").ok());
}

TEST_P(StoreTest, RefusesNewerSchema) {
  ASSERT_TRUE(store_->SetSetting("schema_version", "99").ok());
  store_.reset();
  auto s = Open();
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(s.message(), HasSubstr("schema version 99 is newer than this controller supports"));
  EXPECT_THAT(s.message(), HasSubstr("upgrade muster-controller"));
}

TEST(SqliteStoreOpen, ReportsUnopenablePath) {
  testing::TempDir dir;
  auto s = OpenSqliteStore((dir / "missing-dir/muster.db").string());
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(s.message(), HasSubstr("cannot open store"));
}

// --- PostgreSQL only: several controllers on one database ---

class PgStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string why;
    pg_ = PgTestServer::Shared(&why);
    if (pg_ == nullptr && PgTestServer::FindBinDir().empty()) GTEST_SKIP() << why;
    ASSERT_NE(pg_, nullptr) << why;
    db_ = pg_->NewDatabase();
    uri_ = pg_->Uri(db_);
  }
  std::unique_ptr<Store> OpenOrDie() {
    auto s = OpenPostgresStore(uri_);
    EXPECT_TRUE(s.ok()) << s.message();
    return s.ok() ? std::move(*s) : nullptr;
  }
  // Registers machines, each with the key "ed25519:<name>".
  static void AddMachines(Store& s, std::initializer_list<const char*> names) {
    for (const char* name : names) {
      MachineRecord m;
      m.name = name;
      m.key = std::string("ed25519:") + name;
      m.created_at = 1;
      ASSERT_TRUE(s.AddMachine(m).ok()) << name;
    }
  }
  PgTestServer* pg_ = nullptr;
  std::string db_, uri_;
};

TEST_F(PgStoreTest, ControllersStartingTogetherMigrateOnce) {
  constexpr int kControllers = 6;
  std::vector<Result<std::unique_ptr<Store>>> opened;
  std::vector<std::thread> threads;
  std::mutex mu;
  for (int i = 0; i < kControllers; ++i) {
    threads.emplace_back([&] {
      auto s = OpenPostgresStore(uri_);
      std::lock_guard lock(mu);
      opened.push_back(std::move(s));
    });
  }
  for (auto& t : threads) t.join();
  for (const auto& s : opened) ASSERT_TRUE(s.ok()) << s.message();
  std::string rows, distinct;
  ASSERT_EQ(pg_->Exec(db_, "SELECT COUNT(*) FROM schema_migrations", &rows), "");
  ASSERT_EQ(pg_->Exec(db_, "SELECT COUNT(DISTINCT version) FROM schema_migrations", &distinct), "");
  EXPECT_EQ(rows, "5") << "each migration recorded once";
  EXPECT_EQ(distinct, rows);
  EXPECT_EQ(opened[0].value()->GetSetting("schema_version"), "5");
}

TEST_F(PgStoreTest, TwoControllersShareOneFleet) {
  auto a = OpenOrDie(), b = OpenOrDie();
  ASSERT_TRUE(a && b);
  MachineRecord m;
  m.name = "web1";
  m.key = "ed25519:k1";
  m.created_at = 1;
  ASSERT_TRUE(a->AddMachine(m).ok());
  EXPECT_THAT(b->AddMachine(m).message(), HasSubstr("already registered"));
  GenerationRecord g;
  g.machine = "web1";
  g.generation = 5;
  g.manifest = {"{}", "ed25519:op", "sig"};
  ASSERT_TRUE(a->AddGeneration(g).ok());
  EXPECT_EQ(b->LatestGeneration("web1")->generation, 5) << "a publish via A is visible to B";
  EXPECT_THAT(b->AddGeneration(g).message(), HasSubstr("not newer than the stored generation 5"));
  g.generation = 4;
  EXPECT_FALSE(b->AddGeneration(g).ok()) << "numbering is shared";
}

TEST_F(PgStoreTest, ConcurrentPublishesOfOneNumberAcceptExactlyOne) {
  constexpr int kControllers = 4, kRounds = 20;
  std::vector<std::unique_ptr<Store>> stores;
  for (int i = 0; i < kControllers; ++i) stores.push_back(OpenOrDie());
  for (int round = 1; round <= kRounds; ++round) {
    std::atomic<int> accepted{0};
    std::vector<std::thread> threads;
    for (int i = 0; i < kControllers; ++i) {
      threads.emplace_back([&, i] {
        GenerationRecord g;
        g.machine = "web1";
        // Two controllers race for the same number, two for the one below it.
        g.generation = round * 10 - (i % 2);
        g.manifest = {"{}", "ed25519:op", "sig"};
        if (stores[static_cast<std::size_t>(i)]->AddGeneration(g).ok()) ++accepted;
      });
    }
    for (auto& t : threads) t.join();
    EXPECT_GE(accepted.load(), 1) << "round " << round;
    EXPECT_LE(accepted.load(), 2) << "round " << round;
    auto gens = stores[0]->ListGenerations("web1", 1000);
    for (std::size_t i = 1; i < gens.size(); ++i) {
      EXPECT_GT(gens[i - 1].generation, gens[i].generation) << "no number stored twice";
    }
  }
}

TEST_F(PgStoreTest, ATokenIsSpentOnceAcrossControllers) {
  auto a = OpenOrDie(), b = OpenOrDie();
  ASSERT_TRUE(a && b);
  Store::EnrollToken t{"h1", "web1", {"web"}, 1000, "alice", "grant"};
  ASSERT_TRUE(a->AddEnrollToken(t).ok());
  auto first = a->SpendEnrollToken("h1", "web1", "ed25519:k1", "binding", 10);
  auto second = b->SpendEnrollToken("h1", "web1", "ed25519:k2", "binding", 11);
  EXPECT_TRUE(first.ok()) << first.message();
  EXPECT_THAT(second.message(), HasSubstr("already used"));
  EXPECT_EQ(b->GetMachine("web1")->key, "ed25519:k1");
}

TEST_F(PgStoreTest, ReconnectsAfterTheServerRestarts) {
  auto s = OpenOrDie();
  ASSERT_TRUE(s);
  ASSERT_TRUE(s->SetSetting("k", "before").ok());
  const std::uint64_t failures = s->Failures();
  ASSERT_EQ(pg_->Restart(), "");
  // The first call may find the connection broken; within the reconnect
  // interval a later one succeeds, and nothing written before is lost.
  Status st = s->SetSetting("k", "after");
  for (int i = 0; i < 30 && !st.ok(); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    st = s->SetSetting("k", "after");
  }
  ASSERT_TRUE(st.ok()) << st.message();
  EXPECT_EQ(s->GetSetting("k"), "after");
  EXPECT_GT(s->Failures(), failures) << "the broken connection was counted";
  EXPECT_TRUE(s->Ping().ok());
}

TEST_F(PgStoreTest, ABatchOfReportsIsWrittenAsOneWithAwkwardTextIntact) {
  auto s = OpenOrDie();
  ASSERT_TRUE(s);
  ASSERT_NO_FATAL_FAILURE(AddMachines(*s, {"web1", "web2"}));
  const std::string awkward = "a\"b\\c{d},e 'f' NULL";
  const nlohmann::json facts = {{"os", "nix\"os"}, {"tags", {"x,y", "{z}"}}};
  std::vector<StatusWrite> writes;
  writes.push_back({"web1", {0, "web1", 3, "received", awkward, 10}, "", false, nullptr});
  writes.push_back(
      {"web2", {0, "web2", 4, "realising", std::string("n\0l", 3), 11}, "", false, nullptr});
  writes.push_back({"web1", {0, "web1", 3, "succeeded", "", 12}, "/nix/store/3-x", true, facts});
  writes.push_back({"web2", {0, "web2", 4, "failed", "boom", 13}, "", false, nullptr});
  const std::uint64_t failures = s->Failures();
  for (const auto& st : s->RecordStatuses(writes)) ASSERT_TRUE(st.ok()) << st.message();
  EXPECT_EQ(s->Failures(), failures) << "the batch went in whole, not report by report";

  auto e1 = s->ListEvents("web1", 3, 10);
  ASSERT_EQ(e1.size(), 2u);
  EXPECT_EQ(e1[0].phase, "received");
  EXPECT_EQ(e1[0].detail, awkward);
  EXPECT_EQ(e1[1].phase, "succeeded");
  auto e2 = s->ListEvents("web2", 4, 10);
  ASSERT_EQ(e2.size(), 2u);
  EXPECT_EQ(e2[0].detail, "n\xEF\xBF\xBDl");
  auto m1 = s->GetMachine("web1");
  EXPECT_EQ(m1->phase, "succeeded");
  EXPECT_EQ(m1->toplevel, "/nix/store/3-x");
  EXPECT_TRUE(m1->reboot_required);
  EXPECT_EQ(m1->facts, facts);
  EXPECT_EQ(m1->last_applied, 3);
  auto m2 = s->GetMachine("web2");
  EXPECT_EQ(m2->phase, "failed");
  EXPECT_EQ(m2->detail, "boom");
  EXPECT_EQ(m2->facts, nlohmann::json::object()) << "no facts sent: the stored ones stay";
}

TEST_F(PgStoreTest, NulIsStoredAsReplacementCharacter) {
  auto s = OpenOrDie();
  ASSERT_TRUE(s);
  ASSERT_TRUE(s->AppendLogs({{0, "web1", 1, "realise", std::string("a\0b", 3), 0}}).ok());
  auto lines = s->ReadLogs("web1", 1, 0, 10);
  ASSERT_EQ(lines.size(), 1u);
  EXPECT_EQ(lines[0].line,
            "a\xEF\xBF\xBD"
            "b");
}

TEST_F(PgStoreTest, CopiesAnSqliteStoreIntoAnEmptyOne) {
  testing::TempDir dir;
  std::string path = (dir / "muster.db").string();
  {
    auto src = OpenSqliteStore(path);
    ASSERT_TRUE(src.ok()) << src.message();
    MachineRecord m;
    m.name = "web1";
    m.key = "ed25519:k1";
    m.tags = {"web"};
    m.created_at = 7;
    ASSERT_TRUE((*src)->AddMachine(m).ok());
    ASSERT_TRUE((*src)->AddOperator({"alice", "ed25519:a", 1}).ok());
    GenerationRecord g;
    g.machine = "web1";
    g.generation = 3;
    g.manifest = {"{\"generation\":3}", "ed25519:a", "sig"};
    g.toplevel = "/nix/store/3-system";
    ASSERT_TRUE((*src)->AddGeneration(g).ok());
    EventRecord ev{0, "web1", 3, "succeeded", "ok", 9};
    ASSERT_TRUE((*src)->RecordStatus("web1", ev, "/nix/store/3-system", false).ok());
    ASSERT_TRUE((*src)->AppendLogs({{0, "web1", 3, "activate", "done", 10}}).ok());
    ASSERT_TRUE((*src)->SetSetting("k", "v").ok());
  }
  auto copied = CopySqliteToPostgres(path, uri_);
  ASSERT_TRUE(copied.ok()) << copied.message();
  EXPECT_THAT(*copied, HasSubstr("1 machines"));
  EXPECT_THAT(*copied, HasSubstr("1 generations"));
  auto s = OpenOrDie();
  ASSERT_TRUE(s);
  auto m = s->GetMachine("web1");
  ASSERT_TRUE(m.has_value());
  EXPECT_THAT(m->tags, ElementsAre("web"));
  EXPECT_EQ(m->phase, "succeeded");
  EXPECT_EQ(m->last_applied, 3);
  EXPECT_EQ(s->ListOperators().size(), 1u);
  EXPECT_EQ(s->LatestGeneration("web1")->toplevel, "/nix/store/3-system");
  EXPECT_EQ(s->ListEvents("web1", 3, 10).size(), 1u);
  EXPECT_EQ(s->GetSetting("k"), "v");
  EXPECT_EQ(s->GetSetting("schema_version"), "5");
  // New rows continue the copied ids.
  ASSERT_TRUE(s->AppendLogs({{0, "web1", 3, "activate", "again", 11}}).ok());
  auto logs = s->ReadLogs("web1", 3, 0, 10);
  ASSERT_EQ(logs.size(), 2u);
  EXPECT_LT(logs[0].id, logs[1].id);
  auto twice = CopySqliteToPostgres(path, uri_);
  ASSERT_FALSE(twice.ok());
  EXPECT_THAT(twice.message(), HasSubstr("empty database only"));
}

TEST(PgStoreOpen, ReportsUnreachableServerWithoutPassword) {
  testing::TempDir dir;
  auto s = OpenPostgresStore("postgresql://muster:s3cret@/db?host=" + dir.path().string() +
                             "&connect_timeout=2");
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(s.message(), HasSubstr("cannot connect to PostgreSQL"));
  EXPECT_THAT(s.message(), ::testing::Not(HasSubstr("s3cret")));
}

TEST(StoreSpec, PostgresUrisAreRecognised) {
  EXPECT_TRUE(IsPostgresStoreSpec("postgresql://db.example/muster"));
  EXPECT_TRUE(IsPostgresStoreSpec("postgres:///muster?host=/run/postgresql"));
  EXPECT_FALSE(IsPostgresStoreSpec("/var/lib/muster-controller/muster.db"));
  EXPECT_FALSE(IsPostgresStoreSpec("muster.db"));
}

}  // namespace
}  // namespace muster

namespace muster {
namespace {

// --- PostgreSQL only: what several controllers running at once rely on ---

GenerationRecord HeldBack(const std::string& machine, std::int64_t n) {
  GenerationRecord g;
  g.machine = machine;
  g.generation = n;
  g.manifest.manifest = "{}";
  g.toplevel = "/nix/store/" + std::to_string(n) + "-system";
  g.action = "switch";
  g.rollout = "r1";
  g.released = false;
  return g;
}

TEST_F(PgStoreTest, ChangesAreRecordedWithTheirOriginAndAnnounced) {
  auto a = OpenOrDie(), b = OpenOrDie();
  ASSERT_TRUE(a && b);
  ASSERT_TRUE(a->SetControllerId("ctl-a").ok());
  ASSERT_TRUE(b->SetControllerId("ctl-b").ok());
  EXPECT_FALSE(a->SetControllerId("bad id;").ok());
  MachineRecord m;
  m.name = "web1";
  m.key = "ed25519:k1";
  m.created_at = 1;
  ASSERT_TRUE(a->AddMachine(m).ok());
  GenerationRecord g = HeldBack("web1", 1);
  g.released = true;
  g.rollout = "";
  ASSERT_TRUE(b->AddGeneration(g).ok());
  ASSERT_TRUE(b->RecordHello("web1", 5, nlohmann::json::object(), 0).ok());
  EventRecord ev{0, "web1", 1, "succeeded", "", 6};
  ASSERT_TRUE(a->RecordStatus("web1", ev, "/nix/store/1-system", false).ok());
  ASSERT_TRUE(a->RecordGone("web1").ok());  // not a's: b's row stays
  std::string out;
  ASSERT_EQ(pg_->Exec(db_,
                      "SELECT string_agg(kind || ':' || subject || ':' || origin || ':' || extra, "
                      "' ' ORDER BY id) FROM changes",
                      &out),
            "");
  EXPECT_EQ(out,
            "machine:web1:ctl-a: deploy:web1:ctl-b: online:web1:ctl-b:ctl-b "
            "status:web1:ctl-a:");
  ASSERT_EQ(pg_->Exec(db_, "SELECT controller FROM presence WHERE machine = 'web1'", &out), "");
  EXPECT_EQ(out, "ctl-b");
  ASSERT_TRUE(b->RecordGone("web1").ok());
  ASSERT_EQ(pg_->Exec(db_, "SELECT COUNT(*) FROM presence", &out), "");
  EXPECT_EQ(out, "0");
  ASSERT_EQ(
      pg_->Exec(db_, "SELECT kind || ':' || extra FROM changes ORDER BY id DESC LIMIT 1", &out),
      "");
  EXPECT_EQ(out, "offline:ctl-b");
}

TEST_F(PgStoreTest, DeparturesRemoveOnlyThisControllersPresenceInOneBatch) {
  auto a = OpenOrDie(), b = OpenOrDie();
  ASSERT_TRUE(a && b);
  ASSERT_TRUE(a->SetControllerId("ctl-a").ok());
  ASSERT_TRUE(b->SetControllerId("ctl-b").ok());
  for (const char* name : {"web1", "web2"}) {
    MachineRecord m;
    m.name = name;
    m.key = std::string("ed25519:") + name;
    m.created_at = 1;
    ASSERT_TRUE(a->AddMachine(m).ok());
  }
  ASSERT_TRUE(a->RecordHello("web1", 5, nlohmann::json::object(), 0).ok());
  ASSERT_TRUE(b->RecordHello("web2", 5, nlohmann::json::object(), 0).ok());
  // a's departures: web1 is a's and goes; web2 is held by b and stays.
  ASSERT_TRUE(a->RecordDepartures({{"web1", 70}, {"web2", 80}}).ok());
  std::string out;
  ASSERT_EQ(
      pg_->Exec(db_, "SELECT string_agg(machine || ':' || controller, ' ') FROM presence", &out),
      "");
  EXPECT_EQ(out, "web2:ctl-b");
  EXPECT_EQ(a->GetMachine("web1")->last_seen, 70);
  ASSERT_EQ(pg_->Exec(db_,
                      "SELECT kind || ':' || subject || ':' || extra FROM changes ORDER BY id DESC "
                      "LIMIT 1",
                      &out),
            "");
  EXPECT_EQ(out, "offline:web1:ctl-a");
}

TEST_F(PgStoreTest, AnItemIsReleasedOnceAndOnlyByTheLeaseHolder) {
  auto a = OpenOrDie(), b = OpenOrDie();
  ASSERT_TRUE(a && b);
  MachineRecord m;
  m.name = "web1";
  m.key = "ed25519:k1";
  m.created_at = 1;
  ASSERT_TRUE(a->AddMachine(m).ok());
  RolloutRecord r;
  r.id = "r1";
  r.created_by = "alice";
  RolloutItemRecord it;
  it.rollout = "r1";
  it.machine = "web1";
  it.generation = 1;
  ASSERT_TRUE(a->CreateRollout(r, {HeldBack("web1", 1)}, {it}).ok());
  ASSERT_TRUE(a->SetControllerId("ctl-a").ok());
  ASSERT_TRUE(b->SetControllerId("ctl-b").ok());
  it.state = "released";
  auto refused = a->ReleaseRolloutItems({it});
  ASSERT_FALSE(refused.ok());
  EXPECT_THAT(refused.message(), HasSubstr("does not hold the rollout driver's lease"));
  EXPECT_FALSE(a->LatestGeneration("web1").has_value()) << "nothing released without the lease";
  ASSERT_EQ(pg_->Exec(db_,
                      "INSERT INTO leases (name, holder, expires_at) VALUES ('rollouts', 'ctl-a', "
                      "muster_now() + 60000)",
                      nullptr),
            "");
  EXPECT_FALSE(b->ReleaseRolloutItems({it}).ok()) << "b does not hold it";
  ASSERT_TRUE(a->ReleaseRolloutItems({it}).ok());
  ASSERT_TRUE(a->ReleaseRolloutItems({it}).ok()) << "again: nothing to do, no error";
  ASSERT_TRUE(a->LatestGeneration("web1").has_value());
  std::string out;
  ASSERT_EQ(pg_->Exec(db_, "SELECT COUNT(*) FROM changes WHERE kind = 'deploy'", &out), "");
  EXPECT_EQ(out, "1") << "released once";
  // An expired lease is no lease.
  ASSERT_EQ(pg_->Exec(db_, "UPDATE leases SET expires_at = 0", nullptr), "");
  EXPECT_FALSE(a->ReleaseRolloutItems({it}).ok());
}

// A driver that lost its lease writes nothing of a rollout step: neither the
// release nor the final reports that came with it.
TEST_F(PgStoreTest, ARolloutStepWithoutTheLeaseStoresNothing) {
  auto a = OpenOrDie();
  ASSERT_TRUE(a);
  ASSERT_NO_FATAL_FAILURE(AddMachines(*a, {"web1", "web2"}));
  RolloutRecord r;
  r.id = "r1";
  r.created_by = "alice";
  r.state = "running";
  std::vector<RolloutItemRecord> items(2);
  for (int i = 0; i < 2; ++i) {
    items[i].rollout = "r1";
    items[i].position = i;
    items[i].machine = i == 0 ? "web1" : "web2";
    items[i].generation = 1;
    items[i].state = i == 0 ? "released" : "pending";
  }
  ASSERT_TRUE(a->CreateRollout(r, {HeldBack("web1", 1), HeldBack("web2", 1)}, items).ok());
  ASSERT_TRUE(a->SetControllerId("ctl-a").ok());
  RolloutItemRecord done = items[0], next = items[1];
  done.state = "succeeded";
  next.state = "released";
  RolloutRecord state = r;
  state.detail = "moved on";
  auto refused = a->AdvanceRollout({done}, {next}, &state);
  ASSERT_FALSE(refused.ok());
  EXPECT_THAT(refused.message(), HasSubstr("does not hold the rollout driver's lease"));
  auto stored = a->ListRolloutItems("r1");
  ASSERT_EQ(stored.size(), 2u);
  EXPECT_EQ(stored[0].state, "released") << "the final report was rolled back with the release";
  EXPECT_EQ(stored[1].state, "pending");
  EXPECT_EQ(a->GetRollout("r1")->detail, "");
  EXPECT_FALSE(a->LatestGeneration("web2").has_value());

  ASSERT_EQ(pg_->Exec(db_,
                      "INSERT INTO leases (name, holder, expires_at) VALUES ('rollouts', 'ctl-a', "
                      "muster_now() + 60000)",
                      nullptr),
            "");
  ASSERT_TRUE(a->AdvanceRollout({done}, {next}, &state).ok());
  stored = a->ListRolloutItems("r1");
  EXPECT_EQ(stored[0].state, "succeeded");
  EXPECT_EQ(stored[1].state, "released");
  EXPECT_EQ(a->GetRollout("r1")->detail, "moved on");
  EXPECT_TRUE(a->LatestGeneration("web2").has_value());
}

// Each delivery is claimed by one controller while that controller's lease
// lives; a claim of a controller that died (lease expired) is free again.
TEST_F(PgStoreTest, ADeliveryIsClaimedByOneLiveControllerAtATime) {
  auto a = OpenOrDie(), b = OpenOrDie();
  ASSERT_TRUE(a && b);
  ASSERT_TRUE(a->SetControllerId("ctl-a").ok());
  ASSERT_TRUE(b->SetControllerId("ctl-b").ok());
  ASSERT_EQ(pg_->Exec(db_,
                      "INSERT INTO controllers (id, started_at, expires_at) VALUES ('ctl-a', 0, "
                      "muster_now() + 60000), ('ctl-b', 0, muster_now() + 60000)",
                      nullptr),
            "");
  WebhookRecord w;
  w.id = "w1";
  w.url = "http://127.0.0.1:9/hook";
  w.secret = std::string(32, 's');
  ASSERT_TRUE(a->AddWebhook(w).ok());
  ASSERT_EQ(b->ListWebhooks().size(), 1u) << "one set of webhooks for every controller";
  std::vector<DeliveryRecord> rows(3);
  for (auto& d : rows) {
    d.webhook = "w1";
    d.event = "deploy";
    d.body = "{}";
  }
  ASSERT_TRUE(a->EnqueueDeliveries(rows, 100).ok());
  EXPECT_EQ(a->DueDeliveries(0, 2).size(), 2u);
  auto rest = b->DueDeliveries(0, 10);
  ASSERT_EQ(rest.size(), 1u) << "a's two are claimed";
  EXPECT_TRUE(a->DueDeliveries(0, 10).empty()) << "and b's one";
  EXPECT_FALSE(b->NextDeliveryAt().has_value());
  rest[0].attempts = 1;
  rest[0].next_at = 0;
  ASSERT_TRUE(b->RescheduleDelivery(rest[0]).ok());
  EXPECT_EQ(a->DueDeliveries(0, 10).size(), 1u) << "a failed attempt frees its claim";
  ASSERT_EQ(pg_->Exec(db_, "UPDATE controllers SET expires_at = 0 WHERE id = 'ctl-a'", nullptr),
            "");
  EXPECT_EQ(b->DueDeliveries(0, 10).size(), 3u) << "a died: b sends what a had claimed";
}

}  // namespace
}  // namespace muster
