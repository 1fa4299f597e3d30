#include "common/log.h"

#include <spdlog/sinks/stdout_sinks.h>

namespace muster {

bool SetupLogging(const std::string& name, const std::string& level) {
  auto logger = spdlog::stderr_logger_mt(name + "-" +
                                         std::to_string(reinterpret_cast<std::uintptr_t>(&name)));
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
