#include "common/log.h"

#include <spdlog/sinks/rotating_file_sink.h>
#include <spdlog/sinks/stdout_sinks.h>

#include <cstdio>

namespace muster {

bool SetupLogging(const std::string& name, const std::string& level, const std::string& file,
                  std::size_t file_max_bytes, std::size_t files_kept) {
  const std::string id = name + "-" + std::to_string(reinterpret_cast<std::uintptr_t>(&name));
  std::shared_ptr<spdlog::logger> logger;
  if (!file.empty()) {
    try {
      logger = spdlog::rotating_logger_mt(id, file, file_max_bytes, files_kept);
    } catch (const spdlog::spdlog_ex& e) {
      std::fprintf(stderr, "%s: cannot log to %s (%s); logging to stderr\n", name.c_str(),
                   file.c_str(), e.what());
    }
  }
  if (!logger) logger = spdlog::stderr_logger_mt(id);
  logger->set_pattern("%Y-%m-%dT%H:%M:%S.%e %^%l%$ " + name + ": %v");
  spdlog::set_default_logger(logger);
  auto lvl = spdlog::level::from_str(level);
  bool ok = !(lvl == spdlog::level::off && level != "off");
  spdlog::set_level(ok ? lvl : spdlog::level::info);
  spdlog::flush_on(spdlog::level::info);
  return ok;
}

std::uint64_t RunIoContextGuarded(boost::asio::io_context& ioc, const char* where) {
  std::uint64_t caught = 0;
  for (;;) {
    try {
      ioc.run();
      return caught;
    } catch (const std::exception& e) {
      ++caught;
      spdlog::error("{}: a handler failed: {}; continuing", where, e.what());
    } catch (...) {
      ++caught;
      spdlog::error("{}: a handler failed with an unknown exception; continuing", where);
    }
  }
}

}  // namespace muster
