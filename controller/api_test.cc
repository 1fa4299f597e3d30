#include "controller/api.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <limits>
#include <memory>
#include <string>

#include "controller/test_fakes.h"

namespace muster {
namespace {

using nlohmann::json;
using testing::FakeChannel;
using ::testing::HasSubstr;

class ApiTest : public testing::FleetTest {
 protected:
  void SetUp() override {
    FleetTest::SetUp();
    api_ = std::make_unique<Api>(*fleet_);
  }

  proto::Response Call(const std::string& method, json params = json::object()) {
    proto::Request req;
    req.id = ++id_;
    req.method = method;
    req.params = std::move(params);
    proto::Response r = api_->Handle(who_, req);
    EXPECT_EQ(r.id, req.id) << "the response answers the request";
    // Every response survives the wire.
    auto back = proto::Decode(proto::Encode(r));
    EXPECT_TRUE(back.ok()) << back.message();
    return r;
  }
  proto::Response MustCall(const std::string& method, json params = json::object()) {
    proto::Response r = Call(method, std::move(params));
    EXPECT_TRUE(r.ok) << method << ": " << r.error;
    return r;
  }
  static json PublishParams(const proto::Deploy& d) {
    return {{"manifest", d.manifest.manifest},
            {"signer", d.manifest.signer},
            {"signature", d.manifest.signature},
            {"vars", d.vars}};
  }

  std::unique_ptr<Api> api_;  // after SetUp has made the fleet
  Identity who_{Role::kOperator, "alice"};
  std::uint64_t id_ = 100;
};

TEST_F(ApiTest, MissingOrMalformedParams) {
  struct Case {
    const char* method;
    json params;
    std::string want;
  } cases[] = {
      {"machine.add",
       {{"key", "ed25519:x"}},
       "machine.add: parameter 'name' (a string) is required"},
      {"machine.add", {{"name", "db1"}}, "machine.add: parameter 'key' (a string) is required"},
      {"machine.add", {{"name", ""}, {"key", "k"}}, "parameter 'name' (a string) is required"},
      {"machine.add", {{"name", 5}, {"key", "k"}}, "parameter 'name' (a string) is required"},
      {"machine.add",
       {{"name", "db1"}, {"key", "k"}, {"tags", "web"}},
       "parameter 'tags' must be a list of strings"},
      {"machine.add",
       {{"name", "db1"}, {"key", "k"}, {"tags", {"web", 1}}},
       "parameter 'tags' must be a list of strings"},
      {"machine.remove", json::object(), "machine.remove: parameter 'name' (a string) is required"},
      {"machine.get", json::object(), "machine.get: parameter 'name' (a string) is required"},
      {"machine.tag", {{"tags", {"x"}}}, "machine.tag: parameter 'name' (a string) is required"},
      {"publish",
       {{"signer", "s"}, {"signature", "s"}},
       "publish: parameter 'manifest' (a string) is required"},
      {"publish",
       {{"manifest", "m"}, {"signature", "s"}},
       "publish: parameter 'signer' (a string) is required"},
      {"publish",
       {{"manifest", "m"}, {"signer", "s"}},
       "publish: parameter 'signature' (a string) is required"},
      {"history", json::object(), "history: parameter 'machine' (a string) is required"},
      {"history", {{"machine", "web1"}, {"limit", "5"}}, "parameter 'limit' must be an integer"},
      {"logs", json::object(), "logs: parameter 'machine' (a string) is required"},
      {"logs",
       {{"machine", "web1"}, {"generation", 1.5}},
       "parameter 'generation' must be an integer"},
      {"logs", {{"machine", "web1"}, {"after", "0"}}, "parameter 'after' must be an integer"},
      {"status", {{"machine", 3}}, "status: "},
      {"machine.frobnicate", json::object(), "unknown method 'machine.frobnicate'"},
      {"", json::object(), "unknown method ''"},
  };
  for (const auto& c : cases) {
    proto::Response r = Call(c.method, c.params);
    ASSERT_FALSE(r.ok) << c.method << " " << c.params.dump();
    EXPECT_THAT(r.error, HasSubstr(c.want)) << c.method << " " << c.params.dump();
  }
}

TEST_F(ApiTest, MachineAddListGetTagRemove) {
  std::string key = mallory_.public_key().ToText();
  auto add = MustCall("machine.add", {{"name", "db1"}, {"key", key}, {"tags", {"db", "eu"}}});
  EXPECT_EQ(add.result, json({{"name", "db1"}}));
  EXPECT_EQ(fleet_->Lookup(mallory_.public_key()).name, "db1");

  auto dup = Call("machine.add", {{"name", "db2"}, {"key", key}});
  ASSERT_FALSE(dup.ok);
  EXPECT_THAT(dup.error, HasSubstr("already registered to machine 'db1'"));

  auto list = MustCall("machine.list");
  ASSERT_EQ(list.result["machines"].size(), 2u);
  const json& db1 = list.result["machines"][0];
  EXPECT_EQ(db1["name"], "db1");
  EXPECT_EQ(db1["key"], key);
  EXPECT_EQ(db1["tags"], json({"db", "eu"}));
  EXPECT_EQ(db1["online"], false);
  EXPECT_EQ(db1["phase"], "idle");
  EXPECT_EQ(db1["targetGeneration"], 0);
  for (const char* field : {"lastSeen", "generation", "targetToplevel", "detail", "toplevel",
                            "rebootRequired", "lastApplied", "facts"}) {
    EXPECT_TRUE(db1.contains(field)) << field;
  }

  EXPECT_EQ(MustCall("machine.tag", {{"name", "db1"}, {"tags", {"canary"}}}).result["name"], "db1");
  auto get = MustCall("machine.get", {{"name", "db1"}});
  EXPECT_EQ(get.result["machine"]["tags"], json({"canary"}));
  EXPECT_EQ(get.result["latestGeneration"], 0);

  auto tag_ghost = Call("machine.tag", {{"name", "ghost"}, {"tags", json::array()}});
  ASSERT_FALSE(tag_ghost.ok);
  EXPECT_THAT(tag_ghost.error, HasSubstr("no machine named 'ghost'"));
  auto get_ghost = Call("machine.get", {{"name", "ghost"}});
  ASSERT_FALSE(get_ghost.ok);
  EXPECT_THAT(get_ghost.error,
              HasSubstr("no machine named 'ghost'; add it with 'muster machine add'"));

  EXPECT_EQ(MustCall("machine.remove", {{"name", "db1"}}).result["name"], "db1");
  auto gone = Call("machine.remove", {{"name", "db1"}});
  ASSERT_FALSE(gone.ok);
  EXPECT_THAT(gone.error, HasSubstr("no machine named 'db1'"));
  EXPECT_EQ(MustCall("machine.list").result["machines"].size(), 1u);
}

TEST_F(ApiTest, StatusFiltersByMachine) {
  auto ch = std::make_shared<FakeChannel>();
  ASSERT_TRUE(fleet_->AgentHello("web1", MakeHello(), ch).ok());
  auto all = MustCall("status");
  ASSERT_EQ(all.result["machines"].size(), 1u);
  EXPECT_EQ(all.result["machines"][0]["online"], true);
  EXPECT_EQ(all.result["machines"][0]["facts"]["os"], "nixos");
  EXPECT_EQ(MustCall("status", {{"machine", "web1"}}).result["machines"].size(), 1u);
  auto none = Call("status", {{"machine", "db1"}});
  ASSERT_FALSE(none.ok);
  EXPECT_THAT(none.error, HasSubstr("no machine named 'db1'"));
}

TEST_F(ApiTest, PublishStoresAndReportsOnline) {
  auto r = MustCall("publish", PublishParams(MakeDeploy(1)));
  EXPECT_EQ(r.result, json({{"machine", "web1"}, {"generation", 1}, {"online", false}}));
  EXPECT_EQ(store_->LatestGeneration("web1")->published_by, "alice");

  auto ch = std::make_shared<FakeChannel>();
  ASSERT_TRUE(fleet_->AgentHello("web1", MakeHello(1, 1, "succeeded"), ch).ok());
  r = MustCall("publish", PublishParams(MakeDeploy(2)));
  EXPECT_EQ(r.result["online"], true);
  EXPECT_EQ(ch->sent.size(), 1u);

  auto get = MustCall("machine.get", {{"name", "web1"}});
  EXPECT_EQ(get.result["latestGeneration"], 2);
  EXPECT_EQ(get.result["machine"]["targetGeneration"], 2);
  EXPECT_EQ(get.result["machine"]["targetToplevel"], kToplevel);

  auto stale = Call("publish", PublishParams(MakeDeploy(2)));
  ASSERT_FALSE(stale.ok);
  EXPECT_THAT(stale.error, HasSubstr("not newer"));
  auto rogue = Call("publish", PublishParams(MakeDeploy(3, "web1", &mallory_)));
  ASSERT_FALSE(rogue.ok);
  EXPECT_THAT(rogue.error, HasSubstr("not a registered operator key"));

  // Vars are optional.
  json no_vars = PublishParams(MakeDeploy(3, "web1", nullptr, false));
  no_vars.erase("vars");
  MustCall("publish", no_vars);
}

TEST_F(ApiTest, HistoryListsGenerationsWithEvents) {
  for (std::int64_t g : {1, 2, 3}) ASSERT_TRUE(fleet_->Publish("alice", MakeDeploy(g)).ok());
  for (const char* phase : {"received", "verified", "succeeded"}) {
    proto::StatusReport r;
    r.generation = 3;
    r.phase = phase;
    r.detail = std::string("at ") + phase;
    ASSERT_TRUE(fleet_->AgentStatus("web1", r).ok());
  }
  auto h = MustCall("history", {{"machine", "web1"}, {"limit", 2}});
  EXPECT_EQ(h.result["machine"], "web1");
  const json& gens = h.result["generations"];
  ASSERT_EQ(gens.size(), 2u);
  EXPECT_EQ(gens[0]["generation"], 3);
  EXPECT_EQ(gens[1]["generation"], 2);
  EXPECT_EQ(gens[0]["toplevel"], kToplevel);
  EXPECT_EQ(gens[0]["action"], "switch");
  EXPECT_EQ(gens[0]["publishedBy"], "alice");
  EXPECT_EQ(gens[0]["createdAt"], kNow);
  ASSERT_EQ(gens[0]["events"].size(), 3u);
  EXPECT_EQ(gens[0]["events"][0]["phase"], "received");
  EXPECT_EQ(gens[0]["events"][2]["phase"], "succeeded");
  EXPECT_EQ(gens[0]["events"][2]["detail"], "at succeeded");
  EXPECT_TRUE(gens[1]["events"].empty());

  // Limits are clamped rather than refused.
  EXPECT_EQ(MustCall("history", {{"machine", "web1"}, {"limit", 0}}).result["generations"].size(),
            1u);
  EXPECT_EQ(MustCall("history", {{"machine", "web1"}}).result["generations"].size(), 3u);
  auto ghost = Call("history", {{"machine", "ghost"}});
  ASSERT_FALSE(ghost.ok);
  EXPECT_THAT(ghost.error, HasSubstr("no machine named 'ghost'"));
}

TEST_F(ApiTest, EnrolTokenLifetimeIsBounded) {
  // ttl * 1000 used to overflow for huge values (and then passed the check).
  for (std::int64_t ttl :
       {std::int64_t{0}, std::int64_t{-5}, std::int64_t{2592001},
        std::numeric_limits<std::int64_t>::max() / 500, std::numeric_limits<std::int64_t>::max()}) {
    auto r = Call("machine.enroll", {{"name", "new1"}, {"ttl", ttl}});
    ASSERT_FALSE(r.ok) << ttl;
    EXPECT_THAT(r.error, HasSubstr("token lifetime of " + std::to_string(ttl) +
                                   " s is out of range; give --ttl between 1 and 2592000"));
  }
  auto one = MustCall("machine.enroll", {{"name", "new1"}, {"ttl", 1}});
  EXPECT_EQ(one.result["expiresAt"], kNow + 1000);
  auto max = MustCall("machine.enroll", {{"name", "new2"}, {"ttl", 2592000}});
  EXPECT_EQ(max.result["expiresAt"], kNow + 2592000000LL);
}

TEST_F(ApiTest, LogsFollowLatestGenerationAndPage) {
  ASSERT_TRUE(fleet_->Publish("alice", MakeDeploy(1)).ok());
  ASSERT_TRUE(fleet_->Publish("alice", MakeDeploy(2)).ok());
  ASSERT_TRUE(fleet_->AgentLogs("web1", {1, "realise", {"old"}}).ok());
  ASSERT_TRUE(fleet_->AgentLogs("web1", {2, "realise", {"a", "b", "c"}}).ok());

  auto latest = MustCall("logs", {{"machine", "web1"}});
  EXPECT_EQ(latest.result["generation"], 2);
  ASSERT_EQ(latest.result["lines"].size(), 3u);
  EXPECT_EQ(latest.result["lines"][0]["line"], "a");
  EXPECT_EQ(latest.result["lines"][0]["stream"], "realise");
  EXPECT_EQ(latest.result["lines"][0]["at"], kNow);

  auto page = MustCall("logs", {{"machine", "web1"}, {"limit", 2}});
  ASSERT_EQ(page.result["lines"].size(), 2u);
  std::int64_t last = page.result["last"].get<std::int64_t>();
  auto next = MustCall("logs", {{"machine", "web1"}, {"after", last}});
  ASSERT_EQ(next.result["lines"].size(), 1u);
  EXPECT_EQ(next.result["lines"][0]["line"], "c");
  auto empty = MustCall("logs", {{"machine", "web1"}, {"after", next.result["last"]}});
  EXPECT_TRUE(empty.result["lines"].empty());
  EXPECT_EQ(empty.result["last"], next.result["last"]) << "'last' stays put when nothing is new";

  auto old = MustCall("logs", {{"machine", "web1"}, {"generation", 1}});
  ASSERT_EQ(old.result["lines"].size(), 1u);
  EXPECT_EQ(old.result["lines"][0]["line"], "old");
  auto ghost = Call("logs", {{"machine", "ghost"}});
  ASSERT_FALSE(ghost.ok);
  EXPECT_THAT(ghost.error, HasSubstr("no machine named 'ghost'"));
}

}  // namespace
}  // namespace muster
