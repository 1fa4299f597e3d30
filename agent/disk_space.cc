#include "agent/disk_space.h"

#include <sys/statvfs.h>

#include <cerrno>
#include <cmath>
#include <cstring>
#include <regex>

namespace muster {

namespace {
std::int64_t Scale(double v, const std::string& unit) {
  double f = 1;
  if (unit == "KiB") f = 1024.0;
  if (unit == "MiB") f = 1024.0 * 1024;
  if (unit == "GiB") f = 1024.0 * 1024 * 1024;
  if (unit == "TiB") f = 1024.0 * 1024 * 1024 * 1024;
  double b = v * f;
  if (!(b >= 0) || b > 9.0e18) return 0;
  return static_cast<std::int64_t>(std::llround(b));
}
}  // namespace

FetchEstimate ParseDryRunFetch(std::string_view text) {
  static const std::regex kLine(
      R"((these ([0-9]+) paths|this path) will be fetched \(([0-9.]+) (B|KiB|MiB|GiB|TiB) download, ([0-9.]+) (B|KiB|MiB|GiB|TiB) unpacked\))");
  FetchEstimate e;
  std::string s(text);
  std::smatch m;
  if (!std::regex_search(s, m, kLine)) return e;
  try {
    e.paths = m[2].matched ? std::stoll(m[2].str()) : 1;
    e.download_bytes = Scale(std::stod(m[3].str()), m[4].str());
    e.unpacked_bytes = Scale(std::stod(m[5].str()), m[6].str());
    e.known = true;
  } catch (const std::exception&) {
    return FetchEstimate{};
  }
  return e;
}

Result<std::int64_t> FreeBytes(const std::string& path) {
  struct statvfs st {};
  if (::statvfs(path.c_str(), &st) != 0) {
    return Err("cannot read the free space of " + path + ": " + std::strerror(errno));
  }
  const long double b =
      static_cast<long double>(st.f_bavail) * static_cast<long double>(st.f_frsize);
  if (b > 9.0e18L) return std::int64_t{9000000000000000000};
  return static_cast<std::int64_t>(b);
}

Status CheckRoom(const std::string& what, const std::string& dir, std::int64_t free_bytes,
                 std::int64_t need_bytes, std::int64_t reserve_bytes, const std::string& advice) {
  if (free_bytes - need_bytes >= reserve_bytes) return Status::Ok();
  std::string msg = "not enough free space in " + dir + " for " + what + ": it needs " +
                    HumanSize(need_bytes) + ", " + HumanSize(free_bytes) + " are free";
  if (reserve_bytes > 0) msg += " and " + HumanSize(reserve_bytes) + " must stay free";
  msg += "; nothing was changed. " + advice;
  return Err(msg);
}

}  // namespace muster
