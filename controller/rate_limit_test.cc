#include "controller/rate_limit.h"

#include <gtest/gtest.h>

namespace muster {
namespace {

using std::chrono::milliseconds;
using std::chrono::nanoseconds;
using std::chrono::seconds;
const TokenBucket::TimePoint kT0{seconds(1000)};

TEST(TokenBucket, StartsFullAndSpendsTheBurstWithoutDelay) {
  TokenBucket b(10, 5, kT0);
  for (int i = 0; i < 5; ++i) {
    b.Charge(1, kT0);
    EXPECT_EQ(b.Delay(kT0), nanoseconds(0)) << "message " << i << " is within the burst";
  }
  b.Charge(1, kT0);
  EXPECT_EQ(b.Delay(kT0), milliseconds(100)) << "one token of debt at 10/s";
}

TEST(TokenBucket, RefillsAtTheRateAndNeverAboveTheBurst) {
  TokenBucket b(10, 5, kT0);
  b.Charge(5, kT0);
  EXPECT_DOUBLE_EQ(b.Available(kT0), 0);
  EXPECT_DOUBLE_EQ(b.Available(kT0 + milliseconds(200)), 2);
  EXPECT_DOUBLE_EQ(b.Available(kT0 + seconds(60)), 5) << "capped at the burst";
}

TEST(TokenBucket, DebtIsRepaidOverTime) {
  TokenBucket b(100, 100, kT0);
  b.Charge(400, kT0);  // 300 tokens of debt: 3 s at 100/s
  EXPECT_EQ(b.Delay(kT0), seconds(3));
  EXPECT_EQ(b.Delay(kT0 + seconds(1)), seconds(2));
  EXPECT_EQ(b.Delay(kT0 + seconds(3)), nanoseconds(0));
  EXPECT_EQ(b.Delay(kT0 + seconds(4)), nanoseconds(0));
}

TEST(TokenBucket, AClockGoingBackwardsAddsNothing) {
  TokenBucket b(10, 10, kT0);
  b.Charge(10, kT0);
  EXPECT_DOUBLE_EQ(b.Available(kT0 - seconds(5)), 0);
  EXPECT_DOUBLE_EQ(b.Available(kT0 + milliseconds(100)), 1);
}

TEST(SessionLimiter, PacesTheScarcerBudget) {
  SessionLimits l;
  l.messages_per_second = 10;
  l.bytes_per_second = 1000;
  l.burst_seconds = 1;
  SessionLimiter s(l, 500, kT0);  // bursts: 10 messages, 1000 bytes
  // Small messages: the message budget runs out first.
  for (int i = 0; i < 10; ++i) s.Charge(1, kT0);
  EXPECT_EQ(s.Delay(kT0), nanoseconds(0));
  s.Charge(1, kT0);
  EXPECT_EQ(s.Delay(kT0), milliseconds(100));
  // A second later both buckets are full again; large messages hit the bytes.
  auto t1 = kT0 + seconds(2);
  s.Charge(1000, t1);
  EXPECT_EQ(s.Delay(t1), nanoseconds(0));
  s.Charge(500, t1);
  EXPECT_EQ(s.Delay(t1), milliseconds(500));
}

TEST(SessionLimiter, BurstHoldsAtLeastOneLargestMessage) {
  SessionLimits l;
  l.messages_per_second = 10;
  l.bytes_per_second = 100;  // a 1 MiB message would need 10,000 s of budget
  l.burst_seconds = 1;
  SessionLimiter s(l, 1 << 20, kT0);
  s.Charge(1 << 20, kT0);
  EXPECT_EQ(s.Delay(kT0), nanoseconds(0)) << "the first maximal message passes at once";
  s.Charge(100, kT0);
  EXPECT_EQ(s.Delay(kT0), seconds(1)) << "then the rate applies";
}

}  // namespace
}  // namespace muster
