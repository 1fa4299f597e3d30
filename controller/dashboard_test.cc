#include "controller/dashboard.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "controller/dashboard_html.h"
#include "controller/test_fakes.h"

namespace muster {
namespace {

using testing::FakeChannel;
using ::testing::HasSubstr;
using ::testing::Not;

class DashboardTest : public testing::FleetTest {};

TEST(HtmlEscapeTest, EscapesMarkupAndRepairsUtf8) {
  struct Case {
    std::string in, out;
  } cases[] = {
      {"plain", "plain"},
      {"<script>alert(1)</script>", "&lt;script&gt;alert(1)&lt;/script&gt;"},
      {"a\"b'c&d", "a&quot;b&#39;c&amp;d"},
      {"\" onmouseover=\"x", "&quot; onmouseover=&quot;x"},
      {"caf\xc3\xa9", "caf\xc3\xa9"},
      {std::string("bad\xff") + "x", "bad\xef\xbf\xbdx"},
  };
  for (const auto& c : cases) EXPECT_EQ(HtmlEscape(c.in), c.out) << c.in;
}

TEST(DashboardTimeTest, FormatsUtcAndNever) {
  EXPECT_EQ(DashboardTime(0), "never");
  EXPECT_EQ(DashboardTime(1717200000000), "2024-06-01 00:00:00Z");
}

// Everything an agent reports (detail, facts, log lines) lands escaped.
TEST_F(DashboardTest, AgentStringsAreEscapedOnEveryPage) {
  auto ch = std::make_shared<FakeChannel>();
  proto::Hello h = MakeHello();
  h.facts.hostname = "<img src=x onerror=alert(1)>";
  ASSERT_TRUE(fleet_->AgentHello("web1", h, ch).ok());
  ASSERT_TRUE(fleet_->Publish("alice", MakeDeploy(1)).ok());
  proto::StatusReport r;
  r.generation = 1;
  r.phase = "failed";
  r.detail = "</td><script>alert('detail')</script>";
  ASSERT_TRUE(fleet_->AgentStatus("web1", r).ok());
  proto::LogLines logs;
  logs.generation = 1;
  logs.stream = "<b>";
  logs.lines = {"<script>alert('log')</script>"};
  ASSERT_TRUE(fleet_->AgentLogs("web1", logs).ok());

  std::string fleet = RenderFleetPage(*fleet_);
  EXPECT_THAT(fleet, Not(HasSubstr("<script>alert")));
  EXPECT_THAT(fleet, HasSubstr("&lt;/td&gt;&lt;script&gt;alert(&#39;detail&#39;)"));
  EXPECT_THAT(fleet, HasSubstr("data-machine=\"web1\""));
  EXPECT_THAT(fleet, HasSubstr("class=\"c-phase phase-failed\">failed<"));

  auto page = RenderMachinePage(*fleet_, "web1");
  ASSERT_TRUE(page.has_value());
  EXPECT_THAT(*page, Not(HasSubstr("<script>alert")));
  EXPECT_THAT(*page, Not(HasSubstr("<img src=x")));
  EXPECT_THAT(*page, HasSubstr("&lt;img src=x onerror=alert(1)&gt;"));
  EXPECT_THAT(*page, HasSubstr("[&lt;b&gt;] &lt;script&gt;alert(&#39;log&#39;)"));
  // The only script is the embedded one.
  EXPECT_THAT(*page, HasSubstr("<script src=\"/static/app.js\" defer></script>"));
  EXPECT_EQ(RenderMachinePage(*fleet_, "nope"), std::nullopt);
}

TEST_F(DashboardTest, MachinePageShowsEveryEventOfItsGenerations) {
  auto ch = std::make_shared<FakeChannel>();
  ASSERT_TRUE(fleet_->AgentHello("web1", MakeHello(), ch).ok());
  ASSERT_TRUE(fleet_->Publish("alice", MakeDeploy(1)).ok());
  ASSERT_TRUE(fleet_->Publish("alice", MakeDeploy(2)).ok());
  for (const char* phase : {"verified", "realising", "activating", "succeeded"}) {
    proto::StatusReport r;
    r.generation = 2;
    r.phase = phase;
    ASSERT_TRUE(fleet_->AgentStatus("web1", r).ok());
  }
  auto page = RenderMachinePage(*fleet_, "web1");
  ASSERT_TRUE(page.has_value());
  auto g2 = page->find("data-generation=\"2\"");
  auto g1 = page->find("data-generation=\"1\"");
  ASSERT_NE(g2, std::string::npos);
  ASSERT_NE(g1, std::string::npos);
  EXPECT_LT(g2, g1) << "newest generation first";
  std::size_t at = g2;
  for (const char* phase : {"verified", "realising", "activating", "succeeded"}) {
    auto next = page->find(std::string(">") + phase + "<", at);
    ASSERT_NE(next, std::string::npos) << phase;
    EXPECT_LT(next, g1) << phase << " belongs to generation 2";
    at = next;  // oldest event first within a generation
  }
}

TEST_F(DashboardTest, TokensAreStoredHashedAndChecked) {
  std::string token(64, 'f');
  EXPECT_FALSE(DashboardTokenValid(*store_, token));
  EXPECT_FALSE(AddDashboardTokenHash(*store_, "not-a-hash", "alice", kNow).ok());
  ASSERT_TRUE(AddDashboardTokenHash(*store_, Sha256Hex(token), "alice", kNow).ok());
  EXPECT_TRUE(DashboardTokenValid(*store_, token));
  EXPECT_FALSE(DashboardTokenValid(*store_, token + "0"));
  EXPECT_FALSE(DashboardTokenValid(*store_, ""));
  auto stored = store_->GetSetting("dashboard.tokens");
  ASSERT_TRUE(stored.has_value());
  EXPECT_THAT(*stored, Not(HasSubstr(token)));
  auto n = ClearDashboardTokens(*store_);
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(*n, 1);
  EXPECT_FALSE(DashboardTokenValid(*store_, token));
}

TEST(DashboardAssetTest, ScriptNeverWritesMarkup) {
  const DashboardAsset* js = FindDashboardAsset("/static/app.js");
  ASSERT_NE(js, nullptr);
  EXPECT_THAT(std::string(js->body), Not(HasSubstr("innerHTML")));
  EXPECT_THAT(std::string(js->body), Not(HasSubstr("insertAdjacentHTML")));
  EXPECT_THAT(std::string(js->body), Not(HasSubstr("document.write")));
  EXPECT_THAT(std::string(js->body), HasSubstr("EventSource"));
  EXPECT_NE(FindDashboardAsset("/static/app.css"), nullptr);
  EXPECT_EQ(FindDashboardAsset("/static/../main.cc"), nullptr);
}

}  // namespace
}  // namespace muster
