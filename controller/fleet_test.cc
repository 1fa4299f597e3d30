#include "controller/fleet.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <vector>

#include "common/utf8.h"
#include "controller/test_fakes.h"

namespace muster {
namespace {

using ::testing::ElementsAre;
using testing::FakeChannel;
using testing::FakeSink;
using testing::FleetTest;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

TEST_F(FleetTest, LookupKnowsMachinesAndOperators) {
  Identity m = fleet_->Lookup(web1_.public_key());
  EXPECT_EQ(m.role, Role::kMachine);
  EXPECT_EQ(m.name, "web1");
  Identity o = fleet_->Lookup(alice_.public_key());
  EXPECT_EQ(o.role, Role::kOperator);
  EXPECT_EQ(o.name, "alice");
  EXPECT_EQ(fleet_->Lookup(mallory_.public_key()).role, Role::kNone);

  // A second fleet over the same store learns the registry from Load().
  Fleet other(*store_, [] { return std::int64_t{0}; });
  EXPECT_EQ(other.Lookup(web1_.public_key()).role, Role::kNone);
  ASSERT_TRUE(other.Load().ok());
  EXPECT_EQ(other.Lookup(web1_.public_key()).name, "web1");
  EXPECT_EQ(other.Lookup(alice_.public_key()).role, Role::kOperator);
}

TEST_F(FleetTest, AddMachineRefusals) {
  std::string fresh = mallory_.public_key().ToText();
  struct Case {
    std::string name;
    std::string key;
    std::string want;
  } cases[] = {
      {"", fresh, "machine name '' is invalid"},
      {"web 2", fresh, "machine name 'web 2' is invalid: use 1-253 letters, digits"},
      {"web/2", fresh, "is invalid"},
      {std::string(254, 'm'), fresh, "is invalid"},
      {"web2", "ssh-ed25519 AAAA", "must look like 'ed25519:<base64>'"},
      {"web2", web1_.public_key().ToText(), "key is already registered to machine 'web1'"},
      {"web2", alice_.public_key().ToText(), "key is already registered to operator 'alice'"},
      {"web1", fresh, "'web1' or its key is already registered"},
  };
  for (const auto& c : cases) {
    auto st = fleet_->AddMachine(c.name, c.key, {});
    ASSERT_FALSE(st.ok()) << c.name;
    EXPECT_THAT(st.message(), HasSubstr(c.want)) << c.name;
  }
  EXPECT_EQ(fleet_->Lookup(mallory_.public_key()).role, Role::kNone);
  EXPECT_EQ(store_->ListMachines().size(), 1u);
}

TEST_F(FleetTest, HelloWithNothingPublishedGetsOnlyWelcome) {
  auto ch = std::make_shared<FakeChannel>();
  auto out = fleet_->AgentHello("web1", MakeHello(), ch);
  ASSERT_TRUE(out.ok()) << out.message();
  ASSERT_EQ(out->size(), 1u);
  auto w = std::get<proto::Welcome>(Decoded((*out)[0]));
  EXPECT_EQ(w.machine, "web1");
  EXPECT_EQ(w.server_time, kNow);
  EXPECT_TRUE(fleet_->IsOnline("web1"));
  EXPECT_EQ(fleet_->OnlineCount(), 1u);
  auto m = store_->GetMachine("web1");
  EXPECT_EQ(m->last_seen, kNow);
  EXPECT_EQ(m->facts["system"], "x86_64-linux");
}

TEST_F(FleetTest, HelloForAnotherMachineIsRefused) {
  auto ch = std::make_shared<FakeChannel>();
  auto out = fleet_->AgentHello("web1", MakeHello(0, 0, "idle", "db1"), ch);
  ASSERT_FALSE(out.ok());
  EXPECT_THAT(out.message(),
              HasSubstr("hello names machine 'db1' but this key is registered as 'web1'"));
  EXPECT_FALSE(fleet_->IsOnline("web1"));
}

TEST_F(FleetTest, HelloGetsWelcomeThenDeployOnlyWhenNeeded) {
  proto::Deploy d = MakeDeploy(5);
  ASSERT_TRUE(fleet_->Publish("alice", d).ok());
  struct Case {
    const char* name;
    std::int64_t last_applied;
    std::int64_t generation;
    const char* phase;
    bool want_deploy;
  } cases[] = {
      {"fresh agent", 0, 0, "idle", true},
      {"behind", 4, 4, "succeeded", true},
      {"already applied", 5, 5, "succeeded", false},
      {"ahead (controller restored from backup)", 7, 7, "succeeded", false},
      {"finished here: failed", 4, 5, "failed", false},
      {"finished here: rolled back", 4, 5, "rolled-back", false},
      {"finished here: refused", 0, 5, "refused", false},
      {"finished here: unchanged", 4, 5, "unchanged", false},
      {"in progress", 4, 5, "realising", false},
      {"in progress: confirming", 4, 5, "confirming", false},
      {"same generation but idle", 4, 5, "idle", true},
      {"same generation, unknown phase", 4, 5, "bogus", true},
      {"older generation failed", 4, 3, "failed", true},
  };
  for (const auto& c : cases) {
    auto ch = std::make_shared<FakeChannel>();
    auto out = fleet_->AgentHello("web1", MakeHello(c.last_applied, c.generation, c.phase), ch);
    ASSERT_TRUE(out.ok()) << c.name << ": " << out.message();
    ASSERT_EQ(out->size(), c.want_deploy ? 2u : 1u) << c.name;
    EXPECT_TRUE(std::holds_alternative<proto::Welcome>(Decoded((*out)[0]))) << c.name;
    if (c.want_deploy) {
      auto got = std::get<proto::Deploy>(Decoded((*out)[1]));
      EXPECT_EQ(got.manifest.manifest, d.manifest.manifest) << c.name;
      EXPECT_EQ(got.manifest.signer, d.manifest.signer) << c.name;
      EXPECT_EQ(got.manifest.signature, d.manifest.signature) << c.name;
      EXPECT_EQ(got.vars, d.vars) << c.name;
    }
    EXPECT_THAT(ch->sent, IsEmpty()) << "hello replies are returned, not sent: " << c.name;
  }
}

TEST_F(FleetTest, HelloWithAFinalPhaseTheStoreLacksIsRecordedOnce) {
  // The agent's report of "succeeded" died with another controller before it
  // was stored; its next hello carries the phase.
  ASSERT_TRUE(fleet_->Publish("alice", MakeDeploy(5)).ok());
  ASSERT_EQ(store_->GetMachine("web1")->phase, "idle");
  ASSERT_TRUE(
      fleet_->AgentHello("web1", MakeHello(5, 5, "succeeded"), std::make_shared<FakeChannel>())
          .ok());
  // Not at once: the agent's own report (with its detail) may follow the hello.
  fleet_->Refresh();
  EXPECT_EQ(store_->GetMachine("web1")->phase, "idle");
  now_ += Fleet::kHelloFinalGraceMs;
  fleet_->Refresh();
  auto m = store_->GetMachine("web1");
  EXPECT_EQ(m->generation, 5);
  EXPECT_EQ(m->phase, "succeeded");
  auto count = [&] {
    int n = 0;
    for (const auto& e : store_->ListEvents("web1", 5, 100)) n += e.phase == "succeeded";
    return n;
  };
  EXPECT_EQ(count(), 1);
  // Known already: nothing more is recorded.
  ASSERT_TRUE(
      fleet_->AgentHello("web1", MakeHello(5, 5, "succeeded"), std::make_shared<FakeChannel>())
          .ok());
  now_ += Fleet::kHelloFinalGraceMs;
  fleet_->Refresh();
  EXPECT_EQ(count(), 1);
  // Phases in progress, older generations and unknown ones are not reports.
  ASSERT_TRUE(fleet_->Publish("alice", MakeDeploy(6)).ok());
  ASSERT_TRUE(
      fleet_->AgentHello("web1", MakeHello(5, 6, "realising"), std::make_shared<FakeChannel>())
          .ok());
  ASSERT_TRUE(
      fleet_->AgentHello("web1", MakeHello(5, 4, "failed"), std::make_shared<FakeChannel>()).ok());
  ASSERT_TRUE(
      fleet_->AgentHello("web1", MakeHello(5, 9, "failed"), std::make_shared<FakeChannel>()).ok());
  now_ += Fleet::kHelloFinalGraceMs;
  fleet_->Refresh();
  m = store_->GetMachine("web1");
  EXPECT_EQ(m->generation, 5);
  EXPECT_EQ(m->phase, "succeeded");
}

TEST_F(FleetTest, AReportFollowingTheHelloWinsOverTheHellosFinalPhase) {
  ASSERT_TRUE(fleet_->Publish("alice", MakeDeploy(5)).ok());
  ASSERT_TRUE(
      fleet_->AgentHello("web1", MakeHello(5, 5, "rolled-back"), std::make_shared<FakeChannel>())
          .ok());
  proto::StatusReport r;
  r.seq = 1;
  r.generation = 5;
  r.phase = "rolled-back";
  r.detail = "the controller could not be reached";
  ASSERT_TRUE(fleet_->AgentStatus("web1", r).ok());
  now_ += Fleet::kHelloFinalGraceMs;
  fleet_->Refresh();
  EXPECT_EQ(store_->GetMachine("web1")->detail, "the controller could not be reached");
  int n = 0;
  for (const auto& e : store_->ListEvents("web1", 5, 100)) n += e.phase == "rolled-back";
  EXPECT_EQ(n, 1);
}

TEST_F(FleetTest, HelloDeploysNewestGeneration) {
  ASSERT_TRUE(fleet_->Publish("alice", MakeDeploy(1)).ok());
  ASSERT_TRUE(fleet_->Publish("alice", MakeDeploy(2)).ok());
  auto out = fleet_->AgentHello("web1", MakeHello(), std::make_shared<FakeChannel>());
  ASSERT_TRUE(out.ok());
  ASSERT_EQ(out->size(), 2u);
  auto got = std::get<proto::Deploy>(Decoded((*out)[1]));
  EXPECT_EQ(ParseManifest(got.manifest.manifest)->generation, 2);
  EXPECT_EQ(fleet_->counters().deploys_sent, 1u);
}

TEST_F(FleetTest, PublishPushesToOnlineChannel) {
  auto ch = std::make_shared<FakeChannel>();
  ASSERT_TRUE(fleet_->AgentHello("web1", MakeHello(), ch).ok());
  proto::Deploy d = MakeDeploy(1);
  auto g = fleet_->Publish("alice", d);
  ASSERT_TRUE(g.ok()) << g.message();
  EXPECT_EQ(g->machine, "web1");
  EXPECT_EQ(g->generation, 1);
  EXPECT_EQ(g->toplevel, kToplevel);
  EXPECT_EQ(g->action, "switch");
  EXPECT_EQ(g->published_by, "alice");
  EXPECT_EQ(g->created_at, kNow);
  ASSERT_EQ(ch->sent.size(), 1u);
  auto pushed = std::get<proto::Deploy>(Decoded(ch->sent[0]));
  EXPECT_EQ(pushed.manifest.manifest, d.manifest.manifest);
  EXPECT_EQ(pushed.vars, d.vars);
  auto stored = store_->LatestGeneration("web1");
  ASSERT_TRUE(stored.has_value());
  EXPECT_EQ(stored->manifest.signature, d.manifest.signature);
  EXPECT_EQ(stored->vars, d.vars);
  auto c = fleet_->counters();
  EXPECT_EQ(c.publishes, 1u);
  EXPECT_EQ(c.deploys_sent, 1u);
}

TEST_F(FleetTest, PublishWhileOfflineOnlyStores) {
  auto g = fleet_->Publish("alice", MakeDeploy(1, "web1", nullptr, /*with_vars=*/false));
  ASSERT_TRUE(g.ok()) << g.message();
  EXPECT_EQ(g->vars, "");
  EXPECT_EQ(fleet_->counters().deploys_sent, 0u);
  EXPECT_EQ(store_->LatestGeneration("web1")->generation, 1);
}

TEST_F(FleetTest, PublishRefusals) {
  ASSERT_TRUE(fleet_->Publish("alice", MakeDeploy(5)).ok());
  auto ch = std::make_shared<FakeChannel>();
  ASSERT_TRUE(fleet_->AgentHello("web1", MakeHello(5, 5, "succeeded"), ch).ok());

  proto::Deploy tampered = MakeDeploy(6);
  tampered.manifest.manifest.replace(tampered.manifest.manifest.find("\"generation\":6"), 14,
                                     "\"generation\":7");
  proto::Deploy bad_vars = MakeDeploy(6);
  bad_vars.vars = "***";
  proto::Deploy swapped_vars = MakeDeploy(6);
  swapped_vars.vars = Base64Encode(SealTo(web1_.public_key(), "other").value());
  proto::Deploy bad_signer = MakeDeploy(6);
  bad_signer.manifest.signer = "nonsense";
  proto::Deploy invalid = MakeDeploy(6);
  invalid.manifest.manifest = "{\"format\":1}";

  struct Case {
    const char* name;
    proto::Deploy d;
    std::string want;
  } cases[] = {
      {"unregistered signer", MakeDeploy(6, "web1", &mallory_),
       "signed by " + mallory_.public_key().ShortId() + ", which is not a registered operator key"},
      {"machine key is no operator key", MakeDeploy(6, "web1", &web1_),
       "not a registered operator key"},
      {"signer not a key", bad_signer, "publish: public key must look like"},
      {"unknown machine", MakeDeploy(1, "db9"), "publish: no machine named 'db9'; add it first"},
      {"tampered manifest", tampered, "invalid signature"},
      {"invalid manifest", invalid, "publish: manifest field missing"},
      {"vars not base64", bad_vars, "publish: vars are not base64"},
      {"vars do not match hash", swapped_vars, "do not match the signed vars hash"},
      {"same generation", MakeDeploy(5), "generation 5 for web1 is not newer"},
      {"older generation", MakeDeploy(3), "generation 3 for web1 is not newer"},
  };
  for (const auto& c : cases) {
    auto g = fleet_->Publish("alice", c.d);
    ASSERT_FALSE(g.ok()) << c.name;
    EXPECT_THAT(g.message(), HasSubstr(c.want)) << c.name;
  }
  EXPECT_THAT(ch->sent, IsEmpty()) << "nothing refused reaches the agent";
  EXPECT_EQ(store_->LatestGeneration("web1")->generation, 5);
  EXPECT_EQ(fleet_->counters().publishes, 1u);
}

TEST_F(FleetTest, NewConnectionReplacesAndClosesOldOne) {
  auto first = std::make_shared<FakeChannel>();
  auto second = std::make_shared<FakeChannel>();
  ASSERT_TRUE(fleet_->AgentHello("web1", MakeHello(), first).ok());
  ASSERT_TRUE(fleet_->AgentHello("web1", MakeHello(), second).ok());
  EXPECT_THAT(first->closed, ElementsAre("replaced by a newer connection"));
  EXPECT_THAT(second->closed, IsEmpty());
  EXPECT_EQ(fleet_->OnlineCount(), 1u);

  // A publish goes to the new connection only.
  ASSERT_TRUE(fleet_->Publish("alice", MakeDeploy(1)).ok());
  EXPECT_THAT(first->sent, IsEmpty());
  EXPECT_EQ(second->sent.size(), 1u);

  // The old session ending later does not take the new one offline.
  fleet_->AgentGone("web1", first.get());
  EXPECT_TRUE(fleet_->IsOnline("web1"));
  fleet_->AgentGone("web1", second.get());
  EXPECT_FALSE(fleet_->IsOnline("web1"));
  EXPECT_EQ(fleet_->OnlineCount(), 0u);

  // A hello on the same channel again does not close it.
  ASSERT_TRUE(fleet_->AgentHello("web1", MakeHello(), second).ok());
  ASSERT_TRUE(fleet_->AgentHello("web1", MakeHello(1, 1, "succeeded"), second).ok());
  EXPECT_THAT(second->closed, IsEmpty());
}

TEST_F(FleetTest, ExpiredChannelCountsAsOffline) {
  {
    auto ch = std::make_shared<FakeChannel>();
    ASSERT_TRUE(fleet_->AgentHello("web1", MakeHello(), ch).ok());
    EXPECT_TRUE(fleet_->IsOnline("web1"));
  }
  EXPECT_FALSE(fleet_->IsOnline("web1"));
  auto g = fleet_->Publish("alice", MakeDeploy(1));
  ASSERT_TRUE(g.ok());
  EXPECT_EQ(fleet_->counters().deploys_sent, 0u);
}

TEST_F(FleetTest, RemoveMachineClosesChannelAndForgetsKey) {
  auto ch = std::make_shared<FakeChannel>();
  ASSERT_TRUE(fleet_->AgentHello("web1", MakeHello(), ch).ok());
  ASSERT_TRUE(fleet_->RemoveMachine("web1").ok());
  EXPECT_THAT(ch->closed, ElementsAre("machine was removed from the controller"));
  EXPECT_EQ(fleet_->Lookup(web1_.public_key()).role, Role::kNone);
  EXPECT_FALSE(store_->GetMachine("web1").has_value());
  auto again = fleet_->RemoveMachine("web1");
  ASSERT_FALSE(again.ok());
  EXPECT_THAT(again.message(), HasSubstr("no machine named 'web1'"));
  // The key may be registered again, under a new name.
  EXPECT_TRUE(fleet_->AddMachine("web1-new", web1_.public_key().ToText(), {}).ok());
  EXPECT_EQ(fleet_->Lookup(web1_.public_key()).name, "web1-new");
}

TEST_F(FleetTest, StatusIsRecordedAckedAndBroadcast) {
  auto sink = std::make_shared<FakeSink>();
  fleet_->Subscribe(sink);
  proto::StatusReport r;
  r.seq = 42;
  r.generation = 3;
  r.phase = "activating";
  r.detail = std::string(5000, 'd');
  r.toplevel = kToplevel;
  r.reboot_required = true;
  auto ack = fleet_->AgentStatus("web1", r);
  ASSERT_TRUE(ack.ok()) << ack.message();
  EXPECT_EQ(std::get<proto::Ack>(Decoded(*ack)).seq, 42u);
  auto m = store_->GetMachine("web1");
  EXPECT_EQ(m->phase, "activating");
  EXPECT_EQ(m->generation, 3);
  EXPECT_EQ(m->detail.size(), 4096u) << "detail is capped";
  EXPECT_TRUE(m->reboot_required);
  auto events = store_->ListEvents("web1", 3, 10);
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].at, kNow);
  ASSERT_THAT(sink->Topics(), ElementsAre("status"));
  EXPECT_EQ(sink->events[0].data["phase"], "activating");
  EXPECT_EQ(sink->events[0].data["rebootRequired"], true);
  EXPECT_EQ(fleet_->counters().status_reports, 1u);

  r.phase = "dancing";
  auto bad = fleet_->AgentStatus("web1", r);
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(bad.message(), HasSubstr("unknown phase 'dancing'"));
  EXPECT_EQ(store_->ListEvents("web1", 0, 10).size(), 1u);
}

TEST_F(FleetTest, BatchedHellosAndStatusesAnswerEachInOrder) {
  auto ch = std::make_shared<FakeChannel>();
  auto hellos = fleet_->AgentHellos(
      {{"web1", MakeHello(), ch}, {"web1", MakeHello(0, 0, "idle", "web9"), ch}});
  ASSERT_EQ(hellos.size(), 2u);
  ASSERT_TRUE(hellos[0].ok()) << hellos[0].message();
  EXPECT_EQ(std::get<proto::Welcome>(Decoded((*hellos[0])[0])).machine, "web1");
  ASSERT_FALSE(hellos[1].ok());
  EXPECT_THAT(hellos[1].message(), HasSubstr("'web9'"));
  EXPECT_EQ(store_->GetMachine("web1")->last_seen, kNow);

  std::vector<std::pair<std::string, proto::StatusReport>> reports;
  std::uint64_t seq = 1;
  for (const char* phase : {"received", "dancing", "verified"}) {
    proto::StatusReport r;
    r.seq = seq++;
    r.generation = 3;
    r.phase = phase;
    reports.emplace_back("web1", r);
  }
  auto acks = fleet_->AgentStatuses(reports);
  ASSERT_EQ(acks.size(), 3u);
  ASSERT_TRUE(acks[0].ok() && acks[2].ok());
  EXPECT_EQ(std::get<proto::Ack>(Decoded(*acks[0])).seq, 1u);
  EXPECT_EQ(std::get<proto::Ack>(Decoded(*acks[2])).seq, 3u);
  ASSERT_FALSE(acks[1].ok());
  EXPECT_THAT(acks[1].message(), HasSubstr("unknown phase 'dancing'"));
  std::vector<std::string> got;
  for (const auto& e : store_->ListEvents("web1", 3, 10)) got.push_back(e.phase);
  EXPECT_THAT(got, ElementsAre("received", "verified"));
  EXPECT_EQ(fleet_->counters().status_reports, 2u);
}

TEST_F(FleetTest, LogsAreStoredAndBroadcast) {
  ASSERT_TRUE(fleet_->Publish("alice", MakeDeploy(4)).ok());
  auto sink = std::make_shared<FakeSink>();
  fleet_->Subscribe(sink);
  proto::LogLines l{4, "realise", {"copying path", std::string(10000, 'x')}};
  ASSERT_TRUE(fleet_->AgentLogs("web1", l).ok());
  auto stored = store_->ReadLogs("web1", 4, 0, 10);
  ASSERT_EQ(stored.size(), 2u);
  EXPECT_EQ(stored[0].line, "copying path");
  EXPECT_EQ(stored[0].stream, "realise");
  EXPECT_EQ(stored[1].line.size(), 8192u) << "lines are capped";
  ASSERT_THAT(sink->Topics(), ElementsAre("log"));
  EXPECT_EQ(sink->events[0].data["lines"][0], "copying path");
}

TEST_F(FleetTest, LogsForGenerationsThatDoNotExistAreDropped) {
  ASSERT_TRUE(fleet_->Publish("alice", MakeDeploy(2)).ok());
  ASSERT_TRUE(fleet_->AddMachine("db1", mallory_.public_key().ToText(), {}).ok());
  auto sink = std::make_shared<FakeSink>();
  fleet_->Subscribe(sink);
  auto st = fleet_->AgentLogs("web1", {7, "realise", {"made up"}});
  ASSERT_FALSE(st.ok());
  EXPECT_THAT(st.message(),
              HasSubstr("generation 7, which does not exist for machine 'web1', were dropped"));
  auto stored = fleet_->AgentLogBatch({{"web1", {2, "realise", {"a"}}},
                                       {"web1", {3, "realise", {"b"}}},
                                       {"db1", {2, "realise", {"web1's number"}}},
                                       {"web1", {2, "activate", {"c"}}}});
  ASSERT_TRUE(stored.ok()) << stored.message();
  EXPECT_THAT(*stored, ElementsAre(true, false, false, true));
  std::vector<std::string> lines;
  for (const auto& l : store_->ReadLogs("web1", 2, 0, 10)) lines.push_back(l.line);
  EXPECT_THAT(lines, ElementsAre("a", "c"));
  EXPECT_TRUE(store_->ReadLogs("web1", 3, 0, 10).empty());
  EXPECT_TRUE(store_->ReadLogs("web1", 7, 0, 10).empty());
  EXPECT_TRUE(store_->ReadLogs("db1", 2, 0, 10).empty());
  EXPECT_THAT(sink->Topics(), ElementsAre("log", "log")) << "only stored lines are broadcast";
}

TEST_F(FleetTest, RevokedKeyIsRefusedEvenWhileEnrolmentTokensAreLive) {
  ASSERT_TRUE(AddGrant("new1", 60000).ok());
  EXPECT_EQ(fleet_->Lookup(mallory_.public_key()).role, Role::kEnrollee)
      << "an unknown key may enrol while a token is live";
  ASSERT_TRUE(fleet_->RevokeMachine("web1").ok());
  EXPECT_EQ(fleet_->Lookup(web1_.public_key()).role, Role::kNone);
  Fleet restarted(*store_, [this] { return now_; });
  ASSERT_TRUE(restarted.Load().ok());
  EXPECT_EQ(restarted.Lookup(web1_.public_key()).role, Role::kNone) << "also after a restart";
  EXPECT_EQ(restarted.Lookup(mallory_.public_key()).role, Role::kEnrollee);
  // Removing the machine forgets the revocation: the key may be registered again.
  ASSERT_TRUE(fleet_->RemoveMachine("web1").ok());
  EXPECT_EQ(fleet_->Lookup(web1_.public_key()).role, Role::kEnrollee);
}

TEST_F(FleetTest, LookupIsInMemoryAndRefreshedFromTheStore) {
  // Another process ('muster-controller operator add') writes the store.
  ASSERT_TRUE(store_->AddOperator({"bob", mallory_.public_key().ToText(), kNow}).ok());
  EXPECT_EQ(fleet_->Lookup(mallory_.public_key()).role, Role::kNone) << "not read per handshake";
  fleet_->Refresh();
  Identity bob = fleet_->Lookup(mallory_.public_key());
  EXPECT_EQ(bob.role, Role::kOperator);
  EXPECT_EQ(bob.name, "bob");
  ASSERT_TRUE(store_->RemoveOperator("bob").ok());
  EXPECT_EQ(fleet_->Lookup(mallory_.public_key()).role, Role::kOperator) << "cached";
  fleet_->Refresh();
  EXPECT_EQ(fleet_->Lookup(mallory_.public_key()).role, Role::kNone) << "invalidated";
  EXPECT_EQ(fleet_->Lookup(alice_.public_key()).role, Role::kOperator);
  EXPECT_EQ(fleet_->Lookup(web1_.public_key()).role, Role::kMachine) << "machines stay";
  // Tokens: live at once when created here; gone after expiry and a refresh.
  ASSERT_TRUE(AddGrant("new1", 1000).ok());
  EXPECT_EQ(fleet_->Lookup(mallory_.public_key()).role, Role::kEnrollee);
  now_ += 2000;
  fleet_->Refresh();
  EXPECT_EQ(fleet_->Lookup(mallory_.public_key()).role, Role::kNone);
}

TEST_F(FleetTest, SubscribersSeeFleetEventsUntilUnsubscribed) {
  auto sink = std::make_shared<FakeSink>();
  auto other = std::make_shared<FakeSink>();
  fleet_->Subscribe(sink);
  fleet_->Subscribe(other);
  auto ch = std::make_shared<FakeChannel>();
  ASSERT_TRUE(fleet_->AgentHello("web1", MakeHello(), ch).ok());
  ASSERT_TRUE(fleet_->Publish("alice", MakeDeploy(1)).ok());
  fleet_->AgentGone("web1", ch.get());
  EXPECT_THAT(sink->Topics(), ElementsAre("machine", "publish", "machine"));
  EXPECT_EQ(sink->events[0].data["online"], true);
  EXPECT_EQ(sink->events[1].data["generation"], 1);
  EXPECT_EQ(sink->events[1].data["by"], "alice");
  EXPECT_EQ(sink->events[1].data["online"], true);
  EXPECT_EQ(sink->events[2].data["online"], false);

  fleet_->Unsubscribe(sink.get());
  fleet_->Broadcast("custom", {{"x", 1}});
  EXPECT_EQ(sink->events.size(), 3u);
  ASSERT_EQ(other->events.size(), 4u);
  EXPECT_EQ(other->events[3].topic, "custom");
  // A sink that went away is simply skipped.
  other.reset();
  fleet_->Broadcast("custom", {{"x", 2}});
}

TEST_F(FleetTest, SeenUpdatesLastSeen) {
  now_ = kNow + 5000;
  fleet_->AgentSeen("web1");
  EXPECT_EQ(store_->GetMachine("web1")->last_seen, kNow + 5000);
  EXPECT_EQ(fleet_->Now(), kNow + 5000);
}

// Strings an agent can send whose cut at the limit falls inside a character:
// 2-, 3- and 4-byte characters after 0..3 ASCII bytes, sized so that the limit
// lands on every byte of a character; and ill-formed bytes (which a decoded
// message cannot hold, but a bug elsewhere might pass on).
std::vector<std::string> AcrossLimit(std::size_t limit) {
  std::vector<std::string> out;
  for (std::string ch : {"\xC3\xA9", "\xE2\x82\xAC", "\xF0\x9F\x98\x80"}) {
    for (std::size_t pad = 0; pad < 4; ++pad) {
      for (std::size_t over = 0; over < 5; ++over) {
        std::string s(pad, 'x');
        while (s.size() < limit + over) s += ch;
        out.push_back(s);
      }
    }
  }
  out.push_back("cut \xE2\x82");
  out.push_back("overlong \xC0\xAF surrogate \xED\xA0\x80 too big \xF4\x90\x80\x80 \xFF");
  out.push_back(std::string(limit - 1, 'a') + "\xF0\x9F\x98\x80");
  return out;
}

TEST_F(FleetTest, AgentStringsAreStoredAndBroadcastAsValidUtf8CutBetweenCharacters) {
  auto sink = std::make_shared<FakeSink>();
  fleet_->Subscribe(sink);
  auto ch = std::make_shared<FakeChannel>();
  proto::Hello hello = MakeHello();
  hello.facts.hostname = "host\xFF" + std::string(300, 'h');
  hello.facts.os_version = "24.11 \xE2\x82";
  ASSERT_TRUE(fleet_->AgentHello("web1", hello, ch).ok());
  auto facts = store_->GetMachine("web1")->facts;
  EXPECT_TRUE(IsValidUtf8(DumpJson(facts)));
  EXPECT_LE(facts["hostname"].get<std::string>().size(), Fleet::kMaxFactBytes);
  EXPECT_EQ(facts["osVersion"], "24.11 \xEF\xBF\xBD");

  std::uint64_t seq = 0;
  for (const auto& detail : AcrossLimit(Fleet::kMaxDetailBytes)) {
    SCOPED_TRACE(detail.size());
    proto::StatusReport r;
    r.seq = ++seq;
    r.generation = 1;
    r.phase = "realising";
    r.detail = detail;
    r.toplevel = "/nix/store/x-\xE2\x82";
    r.facts = hello.facts;
    auto ack = fleet_->AgentStatus("web1", r);
    ASSERT_TRUE(ack.ok()) << ack.message();
    auto m = store_->GetMachine("web1");
    ASSERT_TRUE(IsValidUtf8(m->detail));
    EXPECT_LE(m->detail.size(), Fleet::kMaxDetailBytes);
    EXPECT_EQ(m->detail, CutUtf8(detail, Fleet::kMaxDetailBytes));
    EXPECT_TRUE(IsValidUtf8(m->toplevel));
    EXPECT_TRUE(IsValidUtf8(DumpJson(m->facts)));
    const auto& ev = sink->events.back();
    EXPECT_EQ(ev.topic, "status");
    EXPECT_EQ(ev.data["detail"], m->detail);
  }
  // An unknown phase is quoted in the refusal, cut.
  proto::StatusReport odd;
  odd.phase = std::string(100, 'p') + "\xE2\x82";
  auto refused = fleet_->AgentStatus("web1", odd);
  ASSERT_FALSE(refused.ok());
  EXPECT_TRUE(IsValidUtf8(refused.message()));

  std::vector<std::string> lines = AcrossLimit(Fleet::kMaxLogLineBytes);
  ASSERT_TRUE(fleet_->Publish("alice", MakeDeploy(1)).ok());  // logs need their generation
  ASSERT_TRUE(fleet_->AgentLogs("web1", {1, "realise\xFF", lines}).ok());
  auto stored = store_->ReadLogs("web1", 1, 0, 1000);
  ASSERT_EQ(stored.size(), lines.size());
  for (std::size_t i = 0; i < lines.size(); ++i) {
    EXPECT_EQ(stored[i].line, CutUtf8(lines[i], Fleet::kMaxLogLineBytes)) << i;
    EXPECT_TRUE(IsValidUtf8(stored[i].stream));
  }
  const auto& log_event = sink->events.back();
  ASSERT_EQ(log_event.topic, "log");
  EXPECT_EQ(log_event.data["lines"].size(), lines.size());
  EXPECT_EQ(log_event.data["lines"][0], stored[0].line) << "events carry the stored (cut) lines";
}

TEST(DeployText, IsWhatTheProtocolEncodesAndItsSizeIsCountedExactly) {
  // Every kind of character a manifest or vars could hold: quotes and
  // backslashes, short and long control escapes, DEL, valid and invalid UTF-8.
  const std::vector<std::string> texts = {"",
                                          "plain",
                                          "{\"a\":\"b\\c\"}",
                                          std::string("nul\0x", 5),
                                          "\b\f\n\r\t\x01\x1f\x7f",
                                          "caf\xc3\xa9 \xe2\x82\xac",
                                          "cut \xc3",
                                          "bad \xff\xfe"};
  for (const auto& m : texts) {
    for (const auto& v : texts) {
      GenerationRecord g;
      g.manifest.manifest = m;
      g.manifest.signature = v;
      g.manifest.signer = "ed25519:" + v;
      g.vars = v;
      proto::Deploy d{g.manifest, g.vars};
      EXPECT_EQ(Fleet::DeployText(g), proto::Encode(d)) << m << " / " << v;
      EXPECT_EQ(Fleet::DeployTextSize(g), Fleet::DeployText(g).size()) << m << " / " << v;
    }
  }
}

TEST_F(FleetTest, PublishRefusesADeployLargerThanAgentsAccept) {
  proto::Deploy d = MakeDeploy(1);
  std::size_t size = proto::Encode(d).size();
  fleet_->SetMaxDeployBytes(size - 1);
  for (bool validate_only : {true, false}) {
    auto g = validate_only ? fleet_->ValidateDeploy("alice", d) : fleet_->Publish("alice", d);
    ASSERT_FALSE(g.ok());
    EXPECT_THAT(g.message(), HasSubstr("deploy message for web1 generation 1 would be " +
                                       std::to_string(size) + " bytes, more than the " +
                                       std::to_string(size - 1) + " bytes agents accept"));
    EXPECT_THAT(g.message(), HasSubstr("make the vars smaller"));
  }
  EXPECT_FALSE(store_->LatestGeneration("web1").has_value()) << "nothing was stored";
  fleet_->SetMaxDeployBytes(size);
  EXPECT_TRUE(fleet_->Publish("alice", d).ok()) << "exactly the limit is accepted";
}

}  // namespace
}  // namespace muster

namespace muster {
namespace {

// A sink like the webhook notifier: only this controller's own events.
class LocalOnlySink : public FakeSink {
 public:
  bool WantsRemoteEvents() const override { return false; }
};

TEST_F(FleetTest, OnlySinksTakingRemoteEventsCountAsWatchingThem) {
  EXPECT_FALSE(fleet_->Watched());
  EXPECT_FALSE(fleet_->Watched(/*remote=*/true));
  auto local = std::make_shared<LocalOnlySink>();
  fleet_->Subscribe(local);
  EXPECT_TRUE(fleet_->Watched());
  EXPECT_FALSE(fleet_->Watched(/*remote=*/true)) << "a webhook notifier does not need them built";
  auto sink = std::make_shared<FakeSink>();
  fleet_->Subscribe(sink);
  EXPECT_TRUE(fleet_->Watched(/*remote=*/true));
  fleet_->Unsubscribe(sink.get());
  EXPECT_FALSE(fleet_->Watched(/*remote=*/true));
}

TEST_F(FleetTest, RemotePresenceCountsAsOnlineAndIsBroadcast) {
  auto sink = std::make_shared<FakeSink>();
  auto local = std::make_shared<LocalOnlySink>();
  fleet_->Subscribe(sink);
  fleet_->Subscribe(local);
  EXPECT_FALSE(fleet_->IsOnline("web1"));
  fleet_->SetRemotePresence({{"web1", "ctl-b"}});
  EXPECT_TRUE(fleet_->IsOnline("web1"));
  EXPECT_EQ(fleet_->OnlineCount(), 0u) << "connected elsewhere, not here";
  EXPECT_TRUE(fleet_->LocalMachines().empty());
  fleet_->SetRemotePresence({{"web1", "ctl-b"}});  // unchanged: no event
  // The controller it was on says it left; another one's word does not count.
  fleet_->RemotePresence("web1", "ctl-c", false);
  EXPECT_TRUE(fleet_->IsOnline("web1"));
  fleet_->RemotePresence("web1", "ctl-b", false);
  EXPECT_FALSE(fleet_->IsOnline("web1"));
  fleet_->RemotePresence("web1", "ctl-c", true);
  EXPECT_TRUE(fleet_->IsOnline("web1"));
  ASSERT_EQ(sink->Topics(), (std::vector<std::string>{"machine", "machine", "machine"}));
  EXPECT_EQ(sink->events[0].data["online"], true);
  EXPECT_EQ(sink->events[1].data["online"], false);
  EXPECT_EQ(sink->events[2].data["online"], true);
  EXPECT_TRUE(local->events.empty()) << "remote events skip local-only sinks";
  // Connecting here wins over a row naming another controller.
  auto ch = std::make_shared<FakeChannel>();
  ASSERT_TRUE(fleet_->AgentHello("web1", MakeHello(), ch).ok());
  fleet_->RemotePresence("web1", "ctl-c", false);
  EXPECT_TRUE(fleet_->IsOnline("web1"));
  EXPECT_THAT(fleet_->LocalMachines(), ElementsAre("web1"));
  fleet_->SetRemotePresence({});
  EXPECT_TRUE(fleet_->IsOnline("web1"));
}

TEST_F(FleetTest, RemoteDeployIsPushedToTheLocalAgent) {
  auto ch = std::make_shared<FakeChannel>();
  ASSERT_TRUE(fleet_->AgentHello("web1", MakeHello(), ch).ok());
  auto g = fleet_->ValidateDeploy("alice", MakeDeploy(1));
  ASSERT_TRUE(g.ok()) << g.message();
  // Stored by another controller: only the store has it.
  ASSERT_TRUE(store_->AddGeneration(*g).ok());
  std::size_t before = ch->sent.size();
  fleet_->RemoteDeploy("web1", 1);
  ASSERT_EQ(ch->sent.size(), before + 1);
  EXPECT_EQ(std::get<proto::Deploy>(Decoded(ch->sent.back())).manifest.signature,
            g->manifest.signature);
  fleet_->RemoteDeploy("web1", 7);  // unknown: nothing
  EXPECT_EQ(ch->sent.size(), before + 1);
}

TEST_F(FleetTest, ReloadRegistryClosesMachinesRemovedOrRevokedElsewhere) {
  auto ch = std::make_shared<FakeChannel>();
  ASSERT_TRUE(fleet_->AgentHello("web1", MakeHello(), ch).ok());
  ASSERT_EQ(fleet_->Lookup(web1_.public_key()).role, Role::kMachine);
  ASSERT_TRUE(store_->SetMachineRevoked("web1", true).ok());  // as another controller would
  EXPECT_EQ(fleet_->Lookup(web1_.public_key()).role, Role::kMachine) << "not yet re-read";
  fleet_->ReloadRegistry();
  EXPECT_EQ(fleet_->Lookup(web1_.public_key()).role, Role::kNone);
  EXPECT_EQ(fleet_->Lookup(alice_.public_key()).role, Role::kOperator) << "operators stay";
  ASSERT_EQ(ch->closed.size(), 1u);
  EXPECT_FALSE(fleet_->IsOnline("web1"));
}

}  // namespace
}  // namespace muster
