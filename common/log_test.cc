#include "common/log.h"

#include <gtest/gtest.h>

#include <boost/asio/post.hpp>
#include <stdexcept>
#include <vector>

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

}  // namespace
}  // namespace muster
