#include "agent/windows.h"

#include <gtest/gtest.h>

#include <cstdlib>
#include <ctime>

namespace muster {
namespace {

// Each test fixes the process time zone (gtest runs tests on one thread).
class Windows : public ::testing::Test {
 protected:
  void Zone(const char* tz) {
    ::setenv("TZ", tz, 1);
    ::tzset();
  }
  void TearDown() override {
    ::unsetenv("TZ");
    ::tzset();
  }
  static MaintenanceWindow W(unsigned days, int start_s, int end_s) {
    return MaintenanceWindow{days, start_s, end_s, "w"};
  }
};

constexpr unsigned kSat = 1u << 6, kSun = 1u << 0, kMon = 1u << 1, kAll = 0x7f;
// 2026-12-05 is a Saturday; 00:00:00 UTC.
constexpr std::int64_t kSat0 = 1796428800;

TEST_F(Windows, NoWindowsIsAlwaysOpen) {
  Zone("UTC0");
  EXPECT_TRUE(EvaluateWindows({}, kSat0).open);
}

TEST_F(Windows, OpenInsideClosedOutsideWithTheNextStart) {
  Zone("UTC0");
  std::vector<MaintenanceWindow> ws = {W(kSat | kSun, 2 * 3600, 4 * 3600)};
  struct Case {
    std::int64_t now;
    bool open;
    std::int64_t closes, next;
  } cases[] = {
      {kSat0 + 3600, false, 0, kSat0 + 2 * 3600},          // Sat 01:00: opens at 02:00
      {kSat0 + 2 * 3600, true, kSat0 + 4 * 3600, 0},       // start is inside
      {kSat0 + 4 * 3600 - 1, true, kSat0 + 4 * 3600, 0},   // last second
      {kSat0 + 4 * 3600, false, 0, kSat0 + 86400 + 7200},  // end is outside: Sunday next
      {kSat0 + 86400 + 5 * 3600, false, 0, kSat0 + 7 * 86400 + 7200},  // Sun 05:00: next Sat
      {kSat0 - 3 * 86400, false, 0, kSat0 + 7200},                     // Wednesday
  };
  for (const auto& c : cases) {
    auto st = EvaluateWindows(ws, c.now);
    EXPECT_EQ(st.open, c.open) << c.now - kSat0;
    EXPECT_EQ(st.closes_at_s, c.closes) << c.now - kSat0;
    EXPECT_EQ(st.next_open_s, c.next) << c.now - kSat0;
  }
}

TEST_F(Windows, AcrossMidnightBelongsToTheDayItStarts) {
  Zone("UTC0");
  // Friday 22:00 to Saturday 02:00.
  std::vector<MaintenanceWindow> ws = {W(1u << 5, 22 * 3600, 2 * 3600)};
  auto st = EvaluateWindows(ws, kSat0 + 3600);  // Saturday 01:00
  EXPECT_TRUE(st.open);
  EXPECT_EQ(st.closes_at_s, kSat0 + 7200);
  st = EvaluateWindows(ws, kSat0 + 3 * 3600);  // Saturday 03:00: next Friday 22:00
  EXPECT_FALSE(st.open);
  EXPECT_EQ(st.next_open_s, kSat0 + 6 * 86400 + 22 * 3600);
}

TEST_F(Windows, FollowsTheTimeZoneAndDaylightSaving) {
  // Central European time without tzdata: UTC+1, UTC+2 in summer.
  Zone("CET-1CEST,M3.5.0,M10.5.0/3");
  std::vector<MaintenanceWindow> ws = {W(kAll, 2 * 3600, 3 * 3600)};
  // December: 02:00 CET is 01:00 UTC.
  auto st = EvaluateWindows(ws, kSat0);
  EXPECT_FALSE(st.open);
  EXPECT_EQ(st.next_open_s, kSat0 + 3600);
  // 2026-07-04 (Saturday) 00:00 UTC is 02:00 CEST: open until 01:00 UTC.
  const std::int64_t jul = 1783123200;
  st = EvaluateWindows(ws, jul);
  EXPECT_TRUE(st.open);
  EXPECT_EQ(st.closes_at_s, jul + 3600);
  // Monday-only window seen from Saturday in the same zone.
  st = EvaluateWindows({W(kMon, 0, 3600)}, kSat0);
  EXPECT_EQ(st.next_open_s, kSat0 + 2 * 86400 - 3600);
  EXPECT_EQ(LocalTimeText(kSat0), "2026-12-05 01:00:00 CET");
}

TEST_F(Windows, DescribesWindowsAndZone) {
  std::vector<MaintenanceWindow> ws = {{kSat, 0, 60, "sat 00:00-00:01"}, {kSun, 0, 60, "sun x"}};
  EXPECT_EQ(DescribeWindows(ws, "Europe/Berlin"), "sat 00:00-00:01; sun x (Europe/Berlin)");
  EXPECT_EQ(DescribeWindows(ws, ""), "sat 00:00-00:01; sun x (local time)");
}

}  // namespace
}  // namespace muster
