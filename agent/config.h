// The agent's configuration file (JSON), as rendered by the NixOS module.
//
// Every field except machine, controllers, controllerPin and
// trustedOperatorKeys has a default that matches a real NixOS machine; tests
// and the Quick start point the paths into a sandbox root.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "common/crypto.h"
#include "common/error.h"
#include "common/json_limits.h"
#include "common/url.h"

namespace muster {

// A maintenance window: on the given weekdays (bit 0 = Sunday … bit 6 =
// Saturday), from start to end, seconds since local midnight in the agent's
// maintenance time zone; end <= start crosses midnight into the next day.
struct MaintenanceWindow {
  unsigned days = 0;
  int start_s = 0;
  int end_s = 0;
  std::string text;  // as configured, for messages: "mon,tue 02:00-04:00"
};

struct HealthCheck {
  std::string name;
  std::vector<std::string> command;  // argv, argv[0] absolute; or
  std::string http;                  // http://host[:port]/path, expecting 2xx
  std::chrono::milliseconds timeout{std::chrono::seconds(30)};
};

struct AgentConfig {
  std::string machine;
  std::vector<WsUrl> controllers;
  std::string controller_pin;
  std::string controller_ca_file;  // optional: the controller's certificate must also chain to it
  std::vector<PublicKey> trusted_operator_keys;
  std::string state_dir = "/var/lib/muster-agent";
  std::string vars_dir = "/var/lib/sops-nix";
  std::string profile = "/nix/var/nix/profiles/system";
  std::string current_system = "/run/current-system";
  std::string booted_system = "/run/booted-system";
  std::chrono::milliseconds confirm_timeout{std::chrono::seconds(120)};
  std::vector<HealthCheck> health_checks;
  std::string enroll_token_file;
  // A key provided by a secret store (clan vars) instead of <stateDir>/machine.key,
  // and the time it was created (unix seconds; 0 = unknown): the replay floor's
  // start when neither floor.json nor state.json exists (see agent/floor.h).
  std::string machine_key_file;
  std::int64_t machine_key_created_at = 0;
  std::string metrics_listen;
  std::string reboot_policy = "never";  // never | when-required
  std::string log_level = "info";
  // "" = stderr (journald); else a file, rotated at 10 MiB with 5 kept.
  std::string log_file;
  std::string nix_bin_dir;           // "" = search PATH and the usual places
  std::string home_manager_user;     // home-manager kind: activate as this user
  std::string systemd_run = "auto";  // auto | always | never
  std::chrono::milliseconds ping_interval{std::chrono::seconds(50)};
  std::chrono::milliseconds idle_timeout{std::chrono::seconds(150)};
  std::chrono::milliseconds backoff_base{std::chrono::seconds(1)};
  std::chrono::milliseconds backoff_cap{std::chrono::seconds(60)};
  std::chrono::milliseconds realise_timeout{std::chrono::hours(2)};
  std::chrono::milliseconds activation_timeout{std::chrono::minutes(30)};
  // How far a manifest's signing time may be ahead of this machine's clock.
  std::chrono::seconds max_manifest_future_skew{300};
  // Largest message accepted from the controller; must be at least the
  // controller's --max-message-bytes, which bounds the deploys it sends.
  std::size_t max_message_bytes = kDefaultMaxMessageBytes;
  // Free-space checks before a realise (agent/disk_space.h): the store's file
  // system keeps min_free_store_bytes free after the fetch; /boot keeps
  // min_free_boot_bytes after new kernels and initrds.
  std::string store_dir = "/nix/store";
  std::int64_t min_free_store_bytes = std::int64_t{256} << 20;
  std::string boot_dir = "/boot";
  std::int64_t min_free_boot_bytes = 0;
  // Generations published with schedule "window" activate only inside one of
  // these (none: at once). The zone is an IANA name ("Europe/Berlin"); ""
  // keeps the machine's own local time.
  std::vector<MaintenanceWindow> maintenance_windows;
  std::string maintenance_time_zone;

  std::string KeyPath() const {
    return machine_key_file.empty() ? state_dir + "/machine.key" : machine_key_file;
  }
  bool KeyProvided() const { return !machine_key_file.empty(); }
  std::string StatePath() const { return state_dir + "/state.json"; }
  std::string FloorPath() const { return state_dir + "/floor.json"; }
};

// Parses and validates the JSON text. Errors name the file and the field.
Result<AgentConfig> ParseAgentConfig(std::string_view text, const std::string& origin);
Result<AgentConfig> LoadAgentConfig(const std::string& path);

}  // namespace muster
