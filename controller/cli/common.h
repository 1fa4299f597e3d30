// What every muster CLI command shares: global options, the connection to the
// controller, exit codes and output helpers. Single-threaded (one CLI thread).
#pragma once

#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "common/crypto.h"
#include "common/error.h"
#include "controller/cli/connection.h"

namespace muster::cli {

constexpr int kExitFailed = 1;   // the operation failed or was refused
constexpr int kExitUsage = 2;    // usage or configuration error
constexpr int kExitConnect = 3;  // cannot reach or authenticate with the controller
constexpr int kExitTimeout = 4;  // --wait timed out

struct Globals {
  std::string controller;
  std::string pin;
  std::string key;
  std::string config;
  bool json_out = false;
  bool yes = false;  // --yes: do not ask for confirmation
  // Publishing defaults from the config file: binary cache to copy to, its
  // signing key, and what agents should substitute from.
  std::string cache;
  std::string cache_key;
  std::vector<std::string> substituters;
  std::vector<std::string> trusted_keys;
  // Operator keys whose roster entries this CLI trusts besides its own key
  // ('trustedOperatorKeys' in the config file).
  std::vector<std::string> trusted_operator_keys;
};

std::string ConfigHome();  // $XDG_CONFIG_HOME/muster or ~/.config/muster
std::string StateHome();   // $XDG_STATE_HOME/muster or ~/.local/state/muster

// Prints "muster: msg" to stderr and returns code.
int Die(const std::string& msg, int code);

// flag > environment > config file > default.
Status ResolveGlobals(Globals& g);

// Loads the operator key and connects; returns 0, or the exit code after
// saying what is wrong. key may be null.
int OpenConnection(const Globals& g, std::unique_ptr<Connection>* out, SecretKey* key = nullptr);
// Loads the operator key; 0 or the exit code after saying what is wrong.
int LoadOperatorKey(const Globals& g, SecretKey* key);

std::int64_t NowMs();
std::string Ago(std::int64_t unix_ms);
std::string Timestamp(std::int64_t unix_ms);  // ISO 8601, UTC
std::string JoinTags(const nlohmann::json& tags);
void PrintTable(const std::vector<std::vector<std::string>>& rows);

// Text from machines (details, log lines, names) made safe for a terminal:
// control characters and escape sequences are shown as \xNN, invalid UTF-8
// bytes as U+FFFD. Tabs stay.
std::string Printable(std::string_view text);

// Asks a yes/no question on the terminal; false when stdin is not a terminal.
bool Confirm(const std::string& question);
bool Interactive();  // stdin and stderr are terminals

}  // namespace muster::cli
