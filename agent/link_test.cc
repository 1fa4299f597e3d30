#include "agent/link.h"

#include <gtest/gtest.h>

namespace muster {
namespace {

using std::chrono::milliseconds;

TEST(Backoff, FullJitterBetweenZeroAndTheCappedExponential) {
  const milliseconds base(1000), cap(60000);
  struct Case {
    int attempt;
    double u;
    long long expected_ms;
  } cases[] = {
      {0, 0.0, 0},     {0, 0.5, 500},   {0, 0.999, 999}, {1, 0.5, 1000},   {2, 0.5, 2000},
      {5, 1.0, 32000}, {6, 1.0, 60000}, {6, 0.5, 30000}, {20, 0.5, 30000}, {1000, 0.25, 15000},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.attempt);
    EXPECT_EQ(BackoffDelay(c.attempt, base, cap, c.u).count(), c.expected_ms);
  }
}

}  // namespace
}  // namespace muster
