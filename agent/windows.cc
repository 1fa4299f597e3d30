#include "agent/windows.h"

#include <ctime>

namespace muster {

namespace {
// Local midnight `days` days after the local date of t, with its weekday.
std::int64_t LocalMidnight(std::int64_t t, int days, int* wday) {
  std::time_t tt = static_cast<std::time_t>(t);
  std::tm tm{};
  localtime_r(&tt, &tm);
  tm.tm_mday += days;
  tm.tm_hour = tm.tm_min = tm.tm_sec = 0;
  tm.tm_isdst = -1;
  std::time_t m = std::mktime(&tm);
  *wday = tm.tm_wday;
  return static_cast<std::int64_t>(m);
}

// The instant `seconds` of wall-clock time after the local midnight at m.
std::int64_t WallClock(std::int64_t midnight, int seconds) {
  std::time_t tt = static_cast<std::time_t>(midnight);
  std::tm tm{};
  localtime_r(&tt, &tm);
  tm.tm_sec += seconds;
  tm.tm_isdst = -1;
  return static_cast<std::int64_t>(std::mktime(&tm));
}
}  // namespace

WindowState EvaluateWindows(const std::vector<MaintenanceWindow>& windows, std::int64_t now_s) {
  WindowState st;
  if (windows.empty()) {
    st.open = true;
    return st;
  }
  // Yesterday's window may still run past midnight; a week ahead covers every
  // weekday once more.
  for (int d = -1; d <= 8; ++d) {
    int wday = 0;
    const std::int64_t midnight = LocalMidnight(now_s, d, &wday);
    for (const auto& w : windows) {
      if ((w.days & (1u << wday)) == 0) continue;
      const std::int64_t start = WallClock(midnight, w.start_s);
      const int end_s = w.end_s > w.start_s ? w.end_s : w.end_s + 24 * 3600;
      const std::int64_t end = WallClock(midnight, end_s);
      if (start <= now_s && now_s < end) {
        if (!st.open || end > st.closes_at_s) st.closes_at_s = end;
        st.open = true;
      } else if (start > now_s && (st.next_open_s == 0 || start < st.next_open_s)) {
        st.next_open_s = start;
      }
    }
  }
  if (st.open) st.next_open_s = 0;
  return st;
}

std::string DescribeWindows(const std::vector<MaintenanceWindow>& windows,
                            const std::string& zone) {
  std::string s;
  for (const auto& w : windows) s += (s.empty() ? "" : "; ") + w.text;
  return s + " (" + (zone.empty() ? std::string("local time") : zone) + ")";
}

std::string LocalTimeText(std::int64_t unix_s) {
  std::time_t tt = static_cast<std::time_t>(unix_s);
  std::tm tm{};
  localtime_r(&tt, &tm);
  char buf[64];
  std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M:%S %Z", &tm);
  return buf;
}

}  // namespace muster
