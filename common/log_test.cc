#include "common/log.h"

#include <gtest/gtest.h>

#include <boost/asio/post.hpp>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/testutil.h"

namespace muster {
namespace {

TEST(RunIoContextGuarded, AHandlerExceptionIsLoggedAndTheLoopCarriesOn) {
  spdlog::set_level(spdlog::level::off);
  boost::asio::io_context ioc;
  std::vector<int> ran;
  boost::asio::post(ioc, [&] { ran.push_back(1); });
  boost::asio::post(ioc, [] { throw std::runtime_error("bad handler"); });
  boost::asio::post(ioc, [&] { ran.push_back(2); });
  boost::asio::post(ioc, [] { throw 42; });  // not even a std::exception
  boost::asio::post(ioc, [&] { ran.push_back(3); });
  EXPECT_EQ(RunIoContextGuarded(ioc, "test"), 2u);
  EXPECT_EQ(ran, (std::vector<int>{1, 2, 3})) << "every handler after a throwing one still ran";
  spdlog::set_level(spdlog::level::info);
}

TEST(SetupLogging, AFileIsRotatedBySize) {
  // The darwin agent's log (launchd cannot rotate what it captures).
  testing::TempDir dir;
  const auto file = dir / "agent.log";
  const std::string name = "rotation-test";
  ASSERT_TRUE(SetupLogging(name, "info", file.string(), 4096, 2));
  for (int i = 0; i < 200; ++i) spdlog::info("line {} {}", i, std::string(60, 'x'));
  spdlog::default_logger()->flush();
  namespace fs = std::filesystem;
  EXPECT_LE(fs::file_size(file), 4096u);
  EXPECT_TRUE(fs::exists(dir / "agent.1.log"));
  EXPECT_TRUE(fs::exists(dir / "agent.2.log"));
  EXPECT_FALSE(fs::exists(dir / "agent.3.log")) << "only files_kept rotated files";
  EXPECT_NE(testing::Slurp(file).find("line 199"), std::string::npos);
  EXPECT_NE(testing::Slurp(file).find(" info " + name + ": line"), std::string::npos);
  ASSERT_TRUE(SetupLogging("muster-test", "info"));  // back to stderr for the other tests
}

}  // namespace
}  // namespace muster
