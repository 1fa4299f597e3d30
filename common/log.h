// Logging set-up shared by the binaries (spdlog to stderr; journald and launchd
// capture it). Levels: trace, debug, info, warn, error.
#pragma once

#include <spdlog/spdlog.h>

#include <string>

namespace muster {

// Configures the default logger: "<time> <level> <name>: message" to stderr.
// Returns false (and leaves the level at info) when level is not recognised.
bool SetupLogging(const std::string& name, const std::string& level);

}  // namespace muster
