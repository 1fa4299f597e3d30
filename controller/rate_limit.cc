#include "controller/rate_limit.h"

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace muster {

TokenBucket::TokenBucket(double rate, double burst, TimePoint start)
    : rate_(std::max(rate, 1e-9)), burst_(std::max(burst, 1.0)), tokens_(burst_), last_(start) {}

void TokenBucket::Refill(TimePoint now) {
  if (now <= last_) return;  // a clock that did not advance adds nothing
  double elapsed = std::chrono::duration<double>(now - last_).count();
  tokens_ = std::min(burst_, tokens_ + elapsed * rate_);
  last_ = now;
}

void TokenBucket::Charge(double cost, TimePoint now) {
  Refill(now);
  tokens_ -= cost;
}

double TokenBucket::Available(TimePoint now) {
  Refill(now);
  return tokens_;
}

std::chrono::nanoseconds TokenBucket::Delay(TimePoint now) {
  Refill(now);
  if (tokens_ >= 0) return std::chrono::nanoseconds(0);
  return std::chrono::nanoseconds(static_cast<std::int64_t>(std::ceil(-tokens_ / rate_ * 1e9)));
}

SessionLimiter::SessionLimiter(const SessionLimits& limits, std::size_t max_message_bytes,
                               TokenBucket::TimePoint start)
    : messages_(limits.messages_per_second,
                std::max(1.0, limits.messages_per_second * limits.burst_seconds), start),
      bytes_(limits.bytes_per_second,
             std::max(static_cast<double>(max_message_bytes),
                      limits.bytes_per_second * limits.burst_seconds),
             start) {}

void SessionLimiter::Charge(std::size_t bytes, TokenBucket::TimePoint now) {
  messages_.Charge(1, now);
  bytes_.Charge(static_cast<double>(bytes), now);
}

std::chrono::nanoseconds SessionLimiter::Delay(TokenBucket::TimePoint now) {
  return std::max(messages_.Delay(now), bytes_.Delay(now));
}

}  // namespace muster
