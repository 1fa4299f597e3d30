#include "controller/api.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <limits>
#include <memory>
#include <string>

#include "common/rollout_items.h"
#include "common/utf8.h"
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
    std::string text = proto::Encode(r);
    EXPECT_TRUE(IsValidUtf8(text));
    auto back = proto::Decode(text);
    EXPECT_TRUE(back.ok()) << back.message();
    return r;
  }
  proto::Response MustCall(const std::string& method, json params = json::object()) {
    proto::Response r = Call(method, std::move(params));
    EXPECT_TRUE(r.ok) << method << ": " << r.error;
    return r;
  }
  // A roster entry signed by `signer` (alice by default), as the CLI sends it.
  json Signed(const RosterEntry& e, const SecretKey* signer = nullptr) {
    SignedRosterEntry s = SignRosterEntry(e, signer ? *signer : alice_);
    return {{"entry", s.entry}, {"signer", s.signer}, {"signature", s.signature}};
  }
  RosterEntry Entry(const std::string& name, const SecretKey& key,
                    std::vector<std::string> tags = {}, std::int64_t at = kNow) {
    RosterEntry e;
    e.machine = name;
    e.key = key.public_key().ToText();
    e.tags = std::move(tags);
    e.signed_at = at;
    return e;
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
      {"machine.add", {{"name", "db1"}, {"key", "k"}}, "parameter 'entry' (a signed roster"},
      {"machine.add", {{"entry", "text"}}, "parameter 'entry' (a signed roster entry)"},
      {"machine.add",
       {{"entry", {{"entry", "{}"}, {"signer", "s"}}}},
       "parameter 'signature' (a string) is required"},
      {"machine.remove", json::object(), "machine.remove: parameter 'entry'"},
      {"machine.enroll", {{"name", "x"}}, "machine.enroll: parameter 'grant'"},
      {"machine.get", json::object(), "machine.get: parameter 'name' (a string) is required"},
      {"machine.tag", {{"tags", {"x"}}}, "machine.tag: parameter 'entry'"},
      {"machine.sign", {{"name", "x"}}, "machine.sign: parameter 'entry'"},
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
  auto add = MustCall("machine.add", {{"entry", Signed(Entry("db1", mallory_, {"db", "eu"}))}});
  EXPECT_EQ(add.result, json({{"name", "db1"}}));
  EXPECT_EQ(fleet_->Lookup(mallory_.public_key()).name, "db1");

  auto dup = Call("machine.add", {{"entry", Signed(Entry("db2", mallory_))}});
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
  ASSERT_TRUE(db1["roster"].is_object());
  EXPECT_EQ(db1["roster"]["signer"], alice_.public_key().ToText());
  for (const char* field : {"lastSeen", "generation", "targetToplevel", "detail", "toplevel",
                            "rebootRequired", "lastApplied", "facts"}) {
    EXPECT_TRUE(db1.contains(field)) << field;
  }
  // web1 was registered unsigned (as a store from before signed rosters holds it).
  EXPECT_TRUE(list.result["machines"][1]["roster"].is_null());

  EXPECT_EQ(
      MustCall("machine.tag", {{"entry", Signed(Entry("db1", mallory_, {"canary"}, kNow + 1))}})
          .result["name"],
      "db1");
  auto get = MustCall("machine.get", {{"name", "db1"}});
  EXPECT_EQ(get.result["machine"]["tags"], json({"canary"}));
  EXPECT_EQ(get.result["latestGeneration"], 0);
  // An entry not newer than the one held is refused (a replay).
  auto replay = Call("machine.tag", {{"entry", Signed(Entry("db1", mallory_, {"db"}))}});
  ASSERT_FALSE(replay.ok);
  EXPECT_THAT(replay.error, HasSubstr("not newer"));
  // The key cannot change through a retag.
  auto rekey = Call("machine.tag", {{"entry", Signed(Entry("db1", web1_, {}, kNow + 5))}});
  ASSERT_FALSE(rekey.ok);
  EXPECT_THAT(rekey.error, HasSubstr("another key"));
  // Only registered operators' entries are stored.
  auto rogue =
      Call("machine.tag", {{"entry", Signed(Entry("db1", mallory_, {"x"}, kNow + 6), &mallory_)}});
  ASSERT_FALSE(rogue.ok);
  EXPECT_THAT(rogue.error, HasSubstr("not a registered operator key"));
  // Nor altered ones.
  json altered = Signed(Entry("db1", mallory_, {"x"}, kNow + 7));
  altered["entry"] = altered["entry"].get<std::string>().replace(
      altered["entry"].get<std::string>().find("\"x\""), 3, "\"y\"");
  auto bad = Call("machine.tag", {{"entry", altered}});
  ASSERT_FALSE(bad.ok);
  EXPECT_THAT(bad.error, HasSubstr("invalid signature"));

  auto tag_ghost = Call("machine.tag", {{"entry", Signed(Entry("ghost", mallory_))}});
  ASSERT_FALSE(tag_ghost.ok);
  EXPECT_THAT(tag_ghost.error, HasSubstr("no machine named 'ghost'"));
  auto get_ghost = Call("machine.get", {{"name", "ghost"}});
  ASSERT_FALSE(get_ghost.ok);
  EXPECT_THAT(get_ghost.error,
              HasSubstr("no machine named 'ghost'; add it with 'muster machine add'"));

  RosterEntry removal;
  removal.machine = "db1";
  removal.removed = true;
  removal.signed_at = kNow + 10;
  EXPECT_EQ(MustCall("machine.remove", {{"entry", Signed(removal)}}).result["name"], "db1");
  auto gone = Call("machine.remove", {{"entry", Signed(removal)}});
  ASSERT_FALSE(gone.ok);
  EXPECT_THAT(gone.error, HasSubstr("no machine named 'db1'"));
  EXPECT_EQ(MustCall("machine.list").result["machines"].size(), 1u);
  // The removal is served to CLIs, and an entry older than it cannot return.
  auto roster = MustCall("roster");
  ASSERT_EQ(roster.result["removed"].size(), 1u);
  auto back = Call("machine.add", {{"entry", Signed(Entry("db1", mallory_, {}, kNow + 9))}});
  ASSERT_FALSE(back.ok);
  EXPECT_THAT(back.error, HasSubstr("older than its removal"));
  MustCall("machine.add", {{"entry", Signed(Entry("db1", mallory_, {}, kNow + 11))}});
}

TEST_F(ApiTest, RosterListsEntriesAndGenerationNumbers) {
  MustCall("machine.add", {{"entry", Signed(Entry("db1", mallory_, {"db"}))}});
  MustCall("publish", PublishParams(MakeDeploy(3)));
  auto all = MustCall("roster");
  ASSERT_EQ(all.result["machines"].size(), 2u);
  EXPECT_EQ(all.result["machines"][0]["name"], "db1");
  EXPECT_EQ(all.result["machines"][0]["maxGeneration"], 0);
  EXPECT_EQ(all.result["machines"][1]["maxGeneration"], 3);
  auto one = MustCall("roster", {{"names", {"web1"}}});
  ASSERT_EQ(one.result["machines"].size(), 1u);
  EXPECT_EQ(one.result["machines"][0]["tags"], json({"web"}));
}

TEST_F(ApiTest, EnrolmentGrantIsCompletedOnlyWithTheTokensKey) {
  std::string token = NewEnrollToken();
  SecretKey ek = EnrollKeyFromToken(token).value();
  RosterEntry grant;
  grant.machine = "edge1";
  grant.enroll_key = ek.public_key().ToText();
  grant.tags = {"edge"};
  grant.signed_at = kNow;
  grant.expires_at = kNow + 60000;
  auto r = MustCall("machine.enroll", {{"grant", Signed(grant)}});
  EXPECT_EQ(r.result["expiresAt"], kNow + 60000);
  // An unknown key is an enrollee while the grant is live.
  EXPECT_EQ(fleet_->Lookup(mallory_.public_key()).role, Role::kEnrollee);
  // A proof made without the token is refused; the right one registers.
  SecretKey other = SecretKey::Generate();
  auto forged = MakeEnrollBinding(other, "edge1", mallory_.public_key());
  auto st = fleet_->Enroll(mallory_.public_key(), "edge1", forged.signature);
  ASSERT_FALSE(st.ok());
  EXPECT_THAT(st.message(), HasSubstr("not signed by the key of the token"));
  auto proof = MakeEnrollBinding(ek, "edge1", mallory_.public_key());
  ASSERT_TRUE(fleet_->Enroll(mallory_.public_key(), "edge1", proof.signature).ok());
  EXPECT_EQ(fleet_->Lookup(mallory_.public_key()).name, "edge1");
  auto m = store_->GetMachine("edge1");
  ASSERT_TRUE(m);
  EXPECT_EQ(m->tags, std::vector<std::string>{"edge"});
  EXPECT_FALSE(m->roster.empty());
  EXPECT_FALSE(m->binding.empty());
  // Spent: a second enrolment is refused.
  SecretKey late = SecretKey::Generate();
  auto again = fleet_->Enroll(late.public_key(), "edge1",
                              MakeEnrollBinding(ek, "edge1", late.public_key()).signature);
  ASSERT_FALSE(again.ok());
  EXPECT_THAT(again.message(), HasSubstr("no live enrolment token"));
  // Grants that expire too late or are already expired are refused.
  grant.machine = "edge2";
  grant.expires_at = kNow + 31LL * 24 * 3600 * 1000;
  EXPECT_FALSE(Call("machine.enroll", {{"grant", Signed(grant)}}).ok);
  grant.expires_at = kNow - 1;
  EXPECT_FALSE(Call("machine.enroll", {{"grant", Signed(grant)}}).ok);
}

TEST_F(ApiTest, OperatorRemovalRefusesTheKeyAndClosesSessions) {
  ASSERT_TRUE(fleet_->AddOperator("bob", mallory_.public_key().ToText()).ok());
  auto session = std::make_shared<FakeChannel>();
  fleet_->OperatorConnected("bob", session);
  auto list = MustCall("operator.list");
  ASSERT_EQ(list.result["operators"].size(), 2u);
  MustCall("operator.remove", {{"name", "bob"}});
  EXPECT_EQ(session->closed.size(), 1u);
  EXPECT_EQ(fleet_->Lookup(mallory_.public_key()).role, Role::kNone);
  EXPECT_FALSE(fleet_->IsOperator("bob"));
  auto last = Call("operator.remove", {{"name", "alice"}});
  ASSERT_FALSE(last.ok);
  EXPECT_THAT(last.error, HasSubstr("last operator"));
  // Removed beside the controller (another process): Refresh notices.
  ASSERT_TRUE(fleet_->AddOperator("carol", mallory_.public_key().ToText()).ok());
  auto carol = std::make_shared<FakeChannel>();
  fleet_->OperatorConnected("carol", carol);
  ASSERT_TRUE(store_->RemoveOperator("carol").ok());
  EXPECT_EQ(fleet_->Lookup(mallory_.public_key()).role, Role::kOperator);  // not yet synced
  fleet_->Refresh();
  EXPECT_EQ(carol->closed.size(), 1u);
  EXPECT_EQ(fleet_->Lookup(mallory_.public_key()).role, Role::kNone);
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
  EXPECT_EQ(gens[0]["signedAt"], 1717200000000) << "the manifest's createdAt, in ms";
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

TEST_F(ApiTest, EnrolGrantLifetimeIsBounded) {
  // Lifetimes are checked without arithmetic that could overflow.
  RosterEntry grant;
  grant.machine = "new1";
  grant.enroll_key = SecretKey::Generate().public_key().ToText();
  grant.signed_at = kNow;
  for (std::int64_t expires :
       {std::int64_t{0}, std::int64_t{kNow}, std::int64_t{kNow + 2592000001},
        std::numeric_limits<std::int64_t>::max(), std::numeric_limits<std::int64_t>::min()}) {
    grant.expires_at = expires;
    auto r = Call("machine.enroll", {{"grant", Signed(grant)}});
    ASSERT_FALSE(r.ok) << expires;
    EXPECT_THAT(r.error, HasSubstr("must expire between now and 30 days from now")) << expires;
  }
  grant.expires_at = kNow + 1000;
  EXPECT_EQ(MustCall("machine.enroll", {{"grant", Signed(grant)}}).result["expiresAt"],
            kNow + 1000);
  grant.machine = "new2";
  grant.enroll_key = SecretKey::Generate().public_key().ToText();
  grant.expires_at = kNow + 2592000000LL;
  EXPECT_EQ(MustCall("machine.enroll", {{"grant", Signed(grant)}}).result["expiresAt"],
            kNow + 2592000000LL);
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

TEST_F(ApiTest, IllFormedStringsAlreadyInTheStoreAreAnsweredNotThrown) {
  // What an older controller could have stored: details and lines cut inside
  // a character. Answering must not throw (that ended the controller, again
  // after every restart); the bad bytes come out as U+FFFD.
  ASSERT_TRUE(fleet_->Publish("alice", MakeDeploy(1)).ok());
  EventRecord ev{0, "web1", 1, "failed", "nix said: \xE2\x82", kNow};
  ASSERT_TRUE(store_->RecordStatus("web1", ev, kToplevel, false, {{"hostname", "h\xFF"}}).ok());
  ASSERT_TRUE(store_->AppendLogs({{0, "web1", 1, "realise", "copying \xF0\x9F\x98", kNow}}).ok());

  auto status = MustCall("status");
  EXPECT_EQ(status.result["machines"][0]["detail"], "nix said: \xE2\x82");
  auto decoded = proto::Decode(proto::Encode(status));
  ASSERT_TRUE(decoded.ok()) << decoded.message();
  const auto& wire = std::get<proto::Response>(*decoded).result["machines"][0];
  EXPECT_EQ(wire["detail"], "nix said: \xEF\xBF\xBD");
  auto history = MustCall("history", {{"machine", "web1"}});
  EXPECT_EQ(history.result["generations"][0]["events"].size(), 1u);
  auto logs = MustCall("logs", {{"machine", "web1"}});
  EXPECT_EQ(logs.result["lines"].size(), 1u);
}

}  // namespace
}  // namespace muster

namespace muster {
namespace {

// rollout.create in its binary form (common/rollout_items.h), end to end
// through the Api, the Fleet's checks, the RolloutManager and the store.
class BinaryRolloutTest : public testing::FleetTest {
 protected:
  void SetUp() override {
    FleetTest::SetUp();
    for (const char* name : {"web2", "web3"}) {
      keys_.push_back(SecretKey::Generate());
      ASSERT_TRUE(fleet_->AddMachine(name, keys_.back().public_key().ToText(), {"web"}).ok());
    }
    rollouts_ = std::make_unique<RolloutManager>(*fleet_, *store_);
    fleet_->SetObserver(rollouts_.get());
    api_ = std::make_unique<Api>(*fleet_, rollouts_.get());
    for (const char* name : {"web1", "web2", "web3"}) deploys_.push_back(MakeDeploy(1, name));
  }

  static std::string Payload(const std::vector<proto::Deploy>& deploys) {
    std::string out;
    for (const auto& d : deploys) {
      AppendRolloutItem(out, d.manifest.manifest, Base64Decode(d.manifest.signature).value(),
                        Base64Decode(d.vars).value());
    }
    return out;
  }
  proto::Response Create(std::string payload, std::size_t count,
                         const SecretKey* signer = nullptr) {
    proto::Request req;
    req.id = 7;
    req.method = "rollout.create";
    req.params = {{"count", count},
                  {"signer", (signer ? *signer : alice_).public_key().ToText()},
                  {"canary", 0},
                  {"maxParallel", 0},
                  {"maxFailures", 0}};
    req.payload = std::move(payload);
    // It travels as one binary frame and decodes to the same request.
    auto back = proto::Decode(proto::EncodeBinary(req));
    EXPECT_TRUE(back.ok()) << back.message();
    return api_->Handle(who_, std::get<proto::Request>(*back));
  }
  void ExpectNothingStored() {
    EXPECT_TRUE(store_->ListRollouts(10).empty());
    for (const char* name : {"web1", "web2", "web3"}) {
      EXPECT_FALSE(store_->GetGeneration(name, 1)) << name;
    }
  }

  std::vector<SecretKey> keys_;
  std::vector<proto::Deploy> deploys_;
  std::unique_ptr<RolloutManager> rollouts_;
  std::unique_ptr<Api> api_;
  Identity who_{Role::kOperator, "alice"};
};

TEST_F(BinaryRolloutTest, StoresEveryItemPushesTheSameDeployAndAnswersCounts) {
  auto ch = std::make_shared<FakeChannel>();
  ASSERT_TRUE(fleet_->AgentHello("web1", MakeHello(), ch).ok());
  ch->sent.clear();
  auto r = Create(Payload(deploys_), 3);
  ASSERT_TRUE(r.ok) << r.error;
  EXPECT_EQ(r.result["total"], 3);
  EXPECT_TRUE(r.result["items"].empty()) << "the answer does not describe every item";
  EXPECT_EQ(r.result["counts"]["released"], 1);  // web1, the one online
  EXPECT_EQ(r.result["counts"]["pending"], 2);
  const std::string id = r.result["rollout"].get<std::string>();
  EXPECT_EQ(store_->ListRolloutItems(id).size(), 3u);
  auto g = store_->GetGeneration("web2", 1);
  ASSERT_TRUE(g);
  EXPECT_EQ(g->vars, deploys_[1].vars);  // stored as the JSON path stores it
  EXPECT_EQ(g->manifest.signature, deploys_[1].manifest.signature);
  EXPECT_EQ(g->rollout, id);
  // The deploy pushed from the records in hand has proto::Encode's bytes.
  ASSERT_EQ(ch->sent.size(), 1u);
  EXPECT_EQ(ch->sent[0], proto::Encode(deploys_[0]));
  // A later connect gets it from the store, the same bytes again.
  auto ch3 = std::make_shared<FakeChannel>();
  ASSERT_TRUE(fleet_->AgentHello("web3", MakeHello(0, 0, "idle", "web3"), ch3).ok());
  ASSERT_EQ(ch3->sent.size(), 1u);
  EXPECT_EQ(ch3->sent[0], proto::Encode(deploys_[2]));
}

TEST_F(BinaryRolloutTest, BadInputIsRefusedAndStoresNothing) {
  const std::string good = Payload(deploys_);
  auto expect_refused = [&](proto::Response r, const std::string& want) {
    EXPECT_FALSE(r.ok);
    EXPECT_THAT(r.error, HasSubstr(want));
    ExpectNothingStored();
  };
  expect_refused(Create(good.substr(0, good.size() - 1), 3), "item 3 of 3 is truncated");
  expect_refused(Create(good, 2), "bytes after its 2 items");
  expect_refused(Create(good, 4), "item 4 of 4 is truncated");
  expect_refused(Create(good, 0), "'count' must be 1 to");
  expect_refused(Create(good + good, 6), "machine 'web1' appears twice");
  expect_refused(Create(good, 3, &mallory_), "not a registered operator key");

  // One altered signature (the last item) refuses the whole rollout.
  auto bad_sig = deploys_;
  auto sig = Base64Decode(bad_sig[2].manifest.signature).value();
  sig[5] = static_cast<char>(sig[5] ^ 1);
  bad_sig[2].manifest.signature = Base64Encode(sig);
  expect_refused(Create(Payload(bad_sig), 3), "item 3 of 3: publish: manifest for web3");

  // Vars that do not match the signed hash.
  auto bad_vars = deploys_;
  bad_vars[1].vars = deploys_[0].vars;
  expect_refused(Create(Payload(bad_vars), 3), "item 2 of 3");

  // A machine the controller does not know.
  auto unknown = deploys_;
  unknown[1] = MakeDeploy(1, "db9");
  expect_refused(Create(Payload(unknown), 3), "no machine named 'db9'");

  // A deploy message larger than agents accept.
  fleet_->SetMaxDeployBytes(512);
  expect_refused(Create(good, 3), "bytes agents accept");
}

}  // namespace
}  // namespace muster
