// Logging set-up shared by the binaries (spdlog to stderr; journald and launchd
// capture it). Levels: trace, debug, info, warn, error. Also the guard every
// daemon thread runs under: an exception is logged, never the end of the process.
#pragma once

#include <spdlog/spdlog.h>

#include <boost/asio/io_context.hpp>
#include <cstdint>
#include <string>

namespace muster {

// Configures the default logger: "<time> <level> <name>: message" to stderr,
// or, when file is set, to that file, rotated by size (file.1 … file.N kept;
// for launchd, which cannot rotate what it captures). Returns false (and leaves
// the level at info) when level is not recognised; a file that cannot be opened
// falls back to stderr with an error logged there.
bool SetupLogging(const std::string& name, const std::string& level, const std::string& file = "",
                  std::size_t file_max_bytes = 10u << 20, std::size_t files_kept = 5);

// ioc.run() until it returns normally (stopped, or out of work). An exception
// escaping a handler is logged as "<where>: …" and the loop is entered again,
// so that one bad handler costs its own connection at most, never the process.
// Returns how many exceptions were caught (for tests).
std::uint64_t RunIoContextGuarded(boost::asio::io_context& ioc, const char* where);

}  // namespace muster
