#include "controller/notifier.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <condition_variable>

#include "controller/test_fakes.h"

namespace muster {
namespace {

using testing::FakeChannel;
using ::testing::HasSubstr;

TEST(WebhookSignatureTest, IsHmacSha256Rfc4231) {
  EXPECT_EQ(WebhookSignature("Jefe", "what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
}

TEST(ParseHttpUrlTest, AcceptsHttpAndHttpsOnly) {
  struct Case {
    std::string url;
    bool ok;
    bool tls;
    std::string host;
    int port;
    std::string target;
  } cases[] = {
      {"http://127.0.0.1:8080/hook", true, false, "127.0.0.1", 8080, "/hook"},
      {"https://hooks.example.org", true, true, "hooks.example.org", 443, "/"},
      {"http://[::1]:9/a?b=c", true, false, "::1", 9, "/a?b=c"},
      {"http://h?x=1", true, false, "h", 80, "/?x=1"},
      {"ftp://h/x", false, false, "", 0, ""},
      {"http://user:pw@h/x", false, false, "", 0, ""},
      {"http://h:99999/", false, false, "", 0, ""},
      {"http://h/a b", false, false, "", 0, ""},
      {"http:///x", false, false, "", 0, ""},
  };
  for (const auto& c : cases) {
    auto u = ParseHttpUrl(c.url);
    ASSERT_EQ(u.ok(), c.ok) << c.url;
    if (!c.ok) continue;
    EXPECT_EQ(u->tls, c.tls) << c.url;
    EXPECT_EQ(u->host, c.host) << c.url;
    EXPECT_EQ(u->port, c.port) << c.url;
    EXPECT_EQ(u->target, c.target) << c.url;
  }
}

TEST(RetryDelayTest, DoublesWithJitterUpToTheCap) {
  NotifierOptions o;
  o.retry_base_ms = 1000;
  o.retry_max_ms = 8000;
  EXPECT_EQ(RetryDelayMs(o, 1, 0.0), 500);
  EXPECT_EQ(RetryDelayMs(o, 1, 1.0), 1000);
  EXPECT_EQ(RetryDelayMs(o, 2, 1.0), 2000);
  EXPECT_EQ(RetryDelayMs(o, 3, 0.5), 3000);
  EXPECT_EQ(RetryDelayMs(o, 10, 1.0), 8000);
  EXPECT_EQ(RetryDelayMs(o, 1000, 0.0), 4000);
}

class NotifierTest : public testing::FleetTest {
 protected:
  struct Post {
    std::string target, body;
    std::vector<std::pair<std::string, std::string>> headers;
  };
  Poster Recorder(std::vector<int> codes) {
    return
        [this, codes](const HttpUrl& u, const std::vector<std::pair<std::string, std::string>>& h,
                      const std::string& body, std::chrono::seconds) {
          std::lock_guard lock(mu_);
          int code = posts_.size() < codes.size() ? codes[posts_.size()] : 200;
          posts_.push_back({u.target, body, h});
          cv_.notify_all();
          return PostResult{code, ""};
        };
  }
  bool WaitPosts(std::size_t n) {
    std::unique_lock lock(mu_);
    return cv_.wait_for(lock, std::chrono::seconds(20), [&] { return posts_.size() >= n; });
  }
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Post> posts_;
};

TEST_F(NotifierTest, FinalStatusIsQueuedSignedAndSentOnce) {
  NotifierOptions o;
  o.retry_base_ms = 1;
  auto n = std::make_shared<Notifier>(*fleet_, o, Recorder({500}));
  auto w = n->Add("http://127.0.0.1:1/hook", std::string(32, 's'), {"deploy"}, "alice");
  ASSERT_TRUE(w.ok()) << w.message();
  EXPECT_FALSE(n->Add("http://x/", "short", {}, "alice").ok());
  EXPECT_FALSE(n->Add("http://x/", std::string(32, 's'), {"nope"}, "alice").ok());
  n->Start();
  auto ch = std::make_shared<FakeChannel>();
  ASSERT_TRUE(fleet_->AgentHello("web1", MakeHello(), ch).ok());
  ASSERT_TRUE(fleet_->Publish("alice", MakeDeploy(1)).ok());
  for (const char* phase : {"verified", "activating", "succeeded"}) {
    proto::StatusReport r;
    r.generation = 1;
    r.phase = phase;
    ASSERT_TRUE(fleet_->AgentStatus("web1", r).ok());
  }
  ASSERT_TRUE(WaitPosts(2)) << "a 500, then the retry";
  n->Stop();
  std::lock_guard lock(mu_);
  ASSERT_EQ(posts_.size(), 2u);
  EXPECT_EQ(posts_[0].body, posts_[1].body) << "a retry sends the same body";
  auto body = nlohmann::json::parse(posts_[1].body);
  EXPECT_EQ(body["event"], "deploy");
  EXPECT_EQ(body["data"]["phase"], "succeeded");
  EXPECT_EQ(body["data"]["machine"], "web1");
  std::map<std::string, std::string> h(posts_[1].headers.begin(), posts_[1].headers.end());
  EXPECT_EQ(h["X-Muster-Signature-256"], WebhookSignature(std::string(32, 's'), posts_[1].body));
  EXPECT_EQ(h["X-Muster-Delivery"], body["id"]);
  EXPECT_EQ(store_->QueuedDeliveries(), 0);
}

// The deploy notification is written with the final report, in its
// transaction: it does not wait for the fleet event that follows the commit
// (a controller killed in between used to lose it). Here that event never
// reaches the notifier, as if the process had died right after the commit.
TEST_F(NotifierTest, AFinalReportsNotificationIsQueuedWithTheReportItself) {
  NotifierOptions o;
  auto n = std::make_shared<Notifier>(*fleet_, o, Recorder({}));
  ASSERT_TRUE(n->Add("http://127.0.0.1:1/hook", std::string(32, 's'), {"deploy"}, "alice").ok());
  ASSERT_TRUE(n->Add("http://127.0.0.1:1/other", std::string(32, 't'), {"rollout"}, "alice").ok());
  n->Start();
  fleet_->Unsubscribe(n.get());
  auto ch = std::make_shared<FakeChannel>();
  ASSERT_TRUE(fleet_->AgentHello("web1", MakeHello(), ch).ok());
  ASSERT_TRUE(fleet_->Publish("alice", MakeDeploy(1)).ok());
  proto::StatusReport r;
  r.generation = 1;
  r.phase = "verified";
  ASSERT_TRUE(fleet_->AgentStatus("web1", r).ok());
  EXPECT_EQ(store_->QueuedDeliveries(), 0) << "a phase that is not final notifies nobody";
  r.phase = "failed";
  r.detail = "activation exited 1";
  ASSERT_TRUE(fleet_->AgentStatus("web1", r).ok());
  n->Stop();
  auto due = store_->DueDeliveries(kNow + 60000, 10);
  ASSERT_EQ(due.size(), 1u) << "one webhook wants deploy events";
  auto hooks = store_->ListWebhooks();
  auto hook = std::find_if(hooks.begin(), hooks.end(),
                           [&](const WebhookRecord& w) { return w.id == due[0].webhook; });
  ASSERT_NE(hook, hooks.end());
  EXPECT_EQ(hook->url, "http://127.0.0.1:1/hook");
  auto body = nlohmann::json::parse(due[0].body);
  EXPECT_EQ(body["event"], "deploy");
  EXPECT_EQ(body["data"]["machine"], "web1");
  EXPECT_EQ(body["data"]["generation"], 1);
  EXPECT_EQ(body["data"]["phase"], "failed");
  EXPECT_EQ(body["data"]["detail"], "activation exited 1");
}

TEST_F(NotifierTest, QueueIsBoundedOldestFirst) {
  WebhookRecord w{"w1", "http://127.0.0.1:1/", std::string(32, 's'), {}, "alice", kNow};
  ASSERT_TRUE(store_->AddWebhook(w).ok());
  std::vector<DeliveryRecord> rows;
  for (int i = 0; i < 5; ++i) {
    DeliveryRecord d;
    d.webhook = "w1";
    d.event = "test";
    d.body = "{\"n\":" + std::to_string(i) + "}";
    d.created_at = kNow;
    d.next_at = kNow + i;
    rows.push_back(d);
  }
  auto dropped = store_->EnqueueDeliveries(rows, 3);
  ASSERT_TRUE(dropped.ok()) << dropped.message();
  EXPECT_EQ(*dropped, 2);
  auto due = store_->DueDeliveries(kNow + 10, 10);
  ASSERT_EQ(due.size(), 3u);
  EXPECT_EQ(due[0].body, "{\"n\":2}");
  EXPECT_EQ(store_->NextDeliveryAt(), kNow + 2);
  due[0].attempts = 1;
  due[0].next_at = kNow + 100;
  due[0].last_error = "HTTP 500";
  ASSERT_TRUE(store_->RescheduleDelivery(due[0]).ok());
  EXPECT_EQ(store_->DueDeliveries(kNow + 10, 10).size(), 2u);
  ASSERT_TRUE(store_->RemoveWebhook("w1").ok());
  EXPECT_EQ(store_->QueuedDeliveries(), 0) << "a removed webhook's deliveries go with it";
  EXPECT_THAT(store_->RemoveWebhook("w1").message(), HasSubstr("no webhook 'w1'"));
}

}  // namespace
}  // namespace muster
