// Maintenance windows: when a staged generation may activate.
//
// Times are wall-clock times in the process's local time zone (main() sets TZ
// from maintenanceTimeZone before any thread starts), so a window follows
// daylight-saving changes as the people who chose "02:00" expect. The clock is
// passed in: tests evaluate any instant without waiting for it. Uses
// localtime_r/mktime only; thread-safe once TZ is fixed.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "agent/config.h"

namespace muster {

struct WindowState {
  bool open = false;
  std::int64_t closes_at_s = 0;  // open: when the window that holds now ends (unix s)
  std::int64_t next_open_s = 0;  // closed: when the next window starts (unix s); 0: none
};

// Where now_s (unix seconds) stands against the windows. No windows: always
// open (closes_at_s 0).
WindowState EvaluateWindows(const std::vector<MaintenanceWindow>& windows, std::int64_t now_s);

// "mon,tue 02:00-04:00; sat 22:00-06:00 (Europe/Berlin)".
std::string DescribeWindows(const std::vector<MaintenanceWindow>& windows, const std::string& zone);

// "2026-12-05 02:00:00 CET" in local time.
std::string LocalTimeText(std::int64_t unix_s);

}  // namespace muster
