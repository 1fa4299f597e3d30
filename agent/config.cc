#include "agent/config.h"

#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "common/fsutil.h"
#include "common/json_limits.h"

namespace muster {

using nlohmann::json;

namespace {
constexpr std::int64_t kMaxFutureSkewSeconds = 86400;

std::chrono::milliseconds Seconds(const json& v, const std::string& field) {
  if (!v.is_number() || v.get<double>() <= 0) {
    throw std::invalid_argument("'" + field + "' must be a positive number of seconds");
  }
  return std::chrono::milliseconds(static_cast<long long>(v.get<double>() * 1000));
}
std::string Abs(const json& v, const std::string& field) {
  std::string s = v.get<std::string>();
  if (s.empty() || s[0] != '/')
    throw std::invalid_argument("'" + field + "' must be an absolute path");
  return s;
}
std::int64_t MiB(const json& v, const std::string& field) {
  if (!v.is_number_integer() || v.get<std::int64_t>() < 0 ||
      v.get<std::int64_t>() > (std::int64_t{1} << 40)) {
    throw std::invalid_argument("'" + field + "' must be a whole number of MiB (0 or more)");
  }
  return v.get<std::int64_t>() << 20;
}

// "HH:MM" or "HH:MM:SS" → seconds since midnight; "24:00" ends a day.
int TimeOfDay(const std::string& t, const std::string& field) {
  int h = -1, m = -1, s = 0;
  char extra = 0;
  int n = std::sscanf(t.c_str(), "%2d:%2d:%2d%c", &h, &m, &s, &extra);
  bool shape = (n == 2 && t.size() == 5) || (n == 3 && t.size() == 8);
  if (!shape || h < 0 || m < 0 || m > 59 || s < 0 || s > 59 || h > 24 ||
      (h == 24 && (m != 0 || s != 0))) {
    throw std::invalid_argument("'" + field + "' must be a time of day HH:MM (or HH:MM:SS), not '" +
                                t + "'");
  }
  return h * 3600 + m * 60 + s;
}

MaintenanceWindow Window(const json& w) {
  static const char* kDays[] = {"sun", "mon", "tue", "wed", "thu", "fri", "sat"};
  if (!w.is_object()) throw std::invalid_argument("each window is an object {days, start, end}");
  MaintenanceWindow mw;
  std::string days_text;
  for (const auto& [k, v] : w.items()) {
    if (k != "days" && k != "start" && k != "end")
      throw std::invalid_argument("unknown window field '" + k + "' (days, start, end)");
  }
  for (const auto& d : w.at("days")) {
    std::string name = d.get<std::string>();
    std::string low;
    for (char c : name) low += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    int idx = -1;
    for (int i = 0; i < 7; ++i) {
      if (low.rfind(kDays[i], 0) == 0 && low.size() >= 3) idx = i;
    }
    if (low == "daily" || low == "*") {
      mw.days = 0x7f;
    } else if (idx < 0) {
      throw std::invalid_argument(
          "window day '" + name +
          "' is not a weekday (mon, tue, wed, thu, fri, sat, sun or daily)");
    } else {
      mw.days |= 1u << idx;
    }
    days_text += (days_text.empty() ? "" : ",") + name;
  }
  if (mw.days == 0) throw std::invalid_argument("a window needs at least one day in 'days'");
  std::string start = w.at("start").get<std::string>(), end = w.at("end").get<std::string>();
  mw.start_s = TimeOfDay(start, "start");
  mw.end_s = TimeOfDay(end, "end");
  if (mw.start_s == mw.end_s) throw std::invalid_argument("a window's start and end are equal");
  mw.text = days_text + " " + start + "-" + end;
  return mw;
}

bool ZoneExists(const std::string& zone) {
  if (zone == "UTC" || zone == "Etc/UTC") return true;
  if (zone.empty() || zone[0] == '/' || zone.find("..") != std::string::npos) return false;
  std::vector<std::string> dirs;
  if (const char* d = std::getenv("TZDIR")) dirs.emplace_back(d);
  dirs.insert(dirs.end(), {"/usr/share/zoneinfo", "/etc/zoneinfo", "/usr/lib/zoneinfo"});
  std::error_code ec;
  for (const auto& d : dirs) {
    if (std::filesystem::is_regular_file(d + "/" + zone, ec)) return true;
  }
  return false;
}
}  // namespace

Result<AgentConfig> ParseAgentConfig(std::string_view text, const std::string& origin) {
  auto parsed = ParseJsonBounded(text, 1 << 20, 16);
  if (!parsed) return Err(origin + ": " + parsed.message());
  const json& j = *parsed;
  if (!j.is_object()) return Err(origin + ": expected a JSON object");
  AgentConfig c;
  std::string field;
  try {
    for (auto& [k, v] : j.items()) {
      field = k;
      if (v.is_null()) continue;
      if (k == "machine") {
        c.machine = v.get<std::string>();
      } else if (k == "controllers") {
        for (const auto& u : v) {
          auto url = ParseWsUrl(u.get<std::string>(), "/v1/agent");
          if (!url) throw std::invalid_argument(url.message());
          c.controllers.push_back(*url);
        }
      } else if (k == "controllerPin") {
        auto pin = ParseFingerprint(v.get<std::string>());
        if (!pin) throw std::invalid_argument(pin.message());
        c.controller_pin = *pin;
      } else if (k == "controllerCaFile") {
        c.controller_ca_file = Abs(v, k);
      } else if (k == "trustedOperatorKeys") {
        for (const auto& t : v) {
          auto pk = ParsePublicKey(t.get<std::string>());
          if (!pk) throw std::invalid_argument(pk.message());
          c.trusted_operator_keys.push_back(*pk);
        }
      } else if (k == "stateDir") {
        c.state_dir = Abs(v, k);
      } else if (k == "varsDir") {
        c.vars_dir = Abs(v, k);
      } else if (k == "profile") {
        c.profile = Abs(v, k);
      } else if (k == "currentSystem") {
        c.current_system = Abs(v, k);
      } else if (k == "bootedSystem") {
        c.booted_system = Abs(v, k);
      } else if (k == "confirmTimeout") {
        c.confirm_timeout = Seconds(v, k);
      } else if (k == "healthChecks") {
        for (const auto& h : v) {
          HealthCheck hc;
          hc.name = h.value("name", std::string());
          if (h.contains("command")) hc.command = h.at("command").get<std::vector<std::string>>();
          hc.http = h.value("http", std::string());
          if (h.contains("timeout")) hc.timeout = Seconds(h.at("timeout"), "healthChecks.timeout");
          if (hc.command.empty() == hc.http.empty()) {
            throw std::invalid_argument(
                "each health check needs exactly one of 'command' or 'http'");
          }
          if (!hc.command.empty() && (hc.command[0].empty() || hc.command[0][0] != '/')) {
            throw std::invalid_argument("health check command '" + hc.command[0] +
                                        "' must be an absolute path");
          }
          if (!hc.http.empty() && hc.http.rfind("http://", 0) != 0) {
            throw std::invalid_argument("health check URL '" + hc.http +
                                        "' must start with http:// (https is not supported)");
          }
          if (hc.name.empty()) hc.name = hc.http.empty() ? hc.command[0] : hc.http;
          c.health_checks.push_back(hc);
        }
      } else if (k == "enrollTokenFile") {
        c.enroll_token_file = Abs(v, k);
      } else if (k == "machineKeyFile") {
        c.machine_key_file = Abs(v, k);
      } else if (k == "machineKeyCreatedAt") {
        if (!v.is_number_integer() || v.get<std::int64_t>() < 0) {
          throw std::invalid_argument(
              "must be the key's creation time in unix seconds (clan's muster generator "
              "writes it as the public value 'created-at')");
        }
        c.machine_key_created_at = v.get<std::int64_t>();
      } else if (k == "metricsListen") {
        c.metrics_listen = v.get<std::string>();
        auto hp = ParseHostPort(c.metrics_listen);
        if (!hp) throw std::invalid_argument(hp.message());
      } else if (k == "rebootPolicy") {
        c.reboot_policy = v.get<std::string>();
        if (c.reboot_policy != "never" && c.reboot_policy != "when-required") {
          throw std::invalid_argument("must be \"never\" or \"when-required\"");
        }
      } else if (k == "logLevel") {
        c.log_level = v.get<std::string>();
      } else if (k == "logFile") {
        c.log_file = Abs(v, k);
      } else if (k == "nixBinDir") {
        c.nix_bin_dir = Abs(v, k);
      } else if (k == "homeManagerUser") {
        c.home_manager_user = v.get<std::string>();
        if (c.home_manager_user.empty() ||
            c.home_manager_user.find_first_not_of(
                "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-") !=
                std::string::npos) {
          throw std::invalid_argument("must be a user name");
        }
      } else if (k == "systemdRun") {
        c.systemd_run = v.get<std::string>();
        if (c.systemd_run != "auto" && c.systemd_run != "always" && c.systemd_run != "never") {
          throw std::invalid_argument("must be \"auto\", \"always\" or \"never\"");
        }
      } else if (k == "pingInterval") {
        c.ping_interval = Seconds(v, k);
      } else if (k == "idleTimeout") {
        c.idle_timeout = Seconds(v, k);
      } else if (k == "backoffBase") {
        c.backoff_base = Seconds(v, k);
      } else if (k == "backoffCap") {
        c.backoff_cap = Seconds(v, k);
      } else if (k == "realiseTimeout") {
        c.realise_timeout = Seconds(v, k);
      } else if (k == "activationTimeout") {
        c.activation_timeout = Seconds(v, k);
      } else if (k == "maxManifestFutureSkew") {
        // Every manifest accepted holds back those signed before it: a large
        // skew lets one signed far ahead block updates for that long.
        if (!v.is_number_integer() || v.get<std::int64_t>() < 0 ||
            v.get<std::int64_t>() > kMaxFutureSkewSeconds) {
          throw std::invalid_argument(
              "must be a whole number of seconds from 0 to " +
              std::to_string(kMaxFutureSkewSeconds) +
              " (how far a manifest's signing time may be ahead of this machine's clock)");
        }
        c.max_manifest_future_skew = std::chrono::seconds(v.get<std::int64_t>());
      } else if (k == "maxMessageBytes") {
        if (!v.is_number_unsigned() || v.get<std::uint64_t>() < 4096 ||
            v.get<std::uint64_t>() > (1u << 30)) {
          throw std::invalid_argument(
              "must be a number of bytes from 4096 to 1073741824 (at least the controller's "
              "--max-message-bytes)");
        }
        c.max_message_bytes = v.get<std::size_t>();
      } else if (k == "storeDir") {
        c.store_dir = Abs(v, k);
      } else if (k == "minFreeStoreMiB") {
        c.min_free_store_bytes = MiB(v, k);
      } else if (k == "bootDir") {
        c.boot_dir = Abs(v, k);
      } else if (k == "minFreeBootMiB") {
        c.min_free_boot_bytes = MiB(v, k);
      } else if (k == "maintenanceWindows") {
        if (!v.is_array()) throw std::invalid_argument("must be a list of windows");
        for (const auto& w : v) c.maintenance_windows.push_back(Window(w));
      } else if (k == "maintenanceTimeZone") {
        c.maintenance_time_zone = v.get<std::string>();
        if (!ZoneExists(c.maintenance_time_zone)) {
          throw std::invalid_argument("time zone '" + c.maintenance_time_zone +
                                      "' is not in the zone database (an IANA name such as "
                                      "\"Europe/Berlin\" or \"UTC\"; install tzdata)");
        }
      } else {
        return Err(origin + ": unknown setting '" + k + "'");
      }
    }
  } catch (const std::exception& e) {
    return Err(origin + ": setting '" + field + "': " + e.what());
  }
  if (c.machine.empty()) return Err(origin + ": 'machine' (this machine's name) is required");
  if (c.controllers.empty())
    return Err(origin + ": 'controllers' (wss:// URLs) must list at least one controller");
  if (c.controller_pin.empty())
    return Err(origin + ": 'controllerPin' is required (printed by 'muster-controller init')");
  if (c.trusted_operator_keys.empty()) {
    return Err(origin +
               ": 'trustedOperatorKeys' must list at least one operator key; without it no "
               "generation can be accepted");
  }
  if (c.machine_key_created_at != 0 && c.machine_key_file.empty()) {
    return Err(origin +
               ": 'machineKeyCreatedAt' belongs to 'machineKeyFile'; a key the agent "
               "creates itself needs neither");
  }
  if (!c.machine_key_file.empty() && !c.enroll_token_file.empty()) {
    return Err(origin +
               ": 'machineKeyFile' and 'enrollTokenFile' exclude each other: a provided "
               "key is registered through a signed roster entry, not by enrolment");
  }
  if (c.idle_timeout <= c.ping_interval)
    return Err(origin + ": 'idleTimeout' must be greater than 'pingInterval'");
  return c;
}

Result<AgentConfig> LoadAgentConfig(const std::string& path) {
  auto text = ReadFile(path, 1 << 20);
  if (!text) return Err("cannot read configuration: " + text.message());
  return ParseAgentConfig(*text, path);
}

}  // namespace muster
