// Token buckets for pacing what one agent session may send.
//
// Pure: no clock of its own, time is passed in, so tests need no sleeps. A
// bucket holds at most `burst` tokens and refills at `rate` tokens per second.
// Charge() always succeeds and may leave the bucket in debt; Delay() says how
// long until the debt is repaid. The server charges every message an agent sends
// and, while a session is in debt, stops reading from it (backpressure): nothing
// is dropped, so status reports are never lost, and a peer sending faster than
// its budget simply waits in TCP flow control. Not thread-safe: one per session,
// used on the session's strand.
#pragma once

#include <chrono>
#include <cstddef>

namespace muster {

class TokenBucket {
 public:
  using TimePoint = std::chrono::steady_clock::time_point;

  // rate > 0 tokens per second; burst >= 1. The bucket starts full at `start`.
  TokenBucket(double rate, double burst, TimePoint start);

  // Takes `cost` tokens at `now`, going into debt if there are not enough.
  void Charge(double cost, TimePoint now);
  // How long from `now` until the balance is back at zero (zero when not in debt).
  std::chrono::nanoseconds Delay(TimePoint now);
  // Tokens available at `now` (negative while in debt).
  double Available(TimePoint now);

 private:
  void Refill(TimePoint now);

  double rate_;
  double burst_;
  double tokens_;
  TimePoint last_;
};

// The budget of one agent session: messages and bytes per second.
struct SessionLimits {
  double messages_per_second = 100;
  double bytes_per_second = 1 << 20;
  // Bursts: this many seconds' worth of budget, and at least one message of
  // max_message_bytes (else such a message would always wait).
  double burst_seconds = 4;
};

class SessionLimiter {
 public:
  SessionLimiter(const SessionLimits& limits, std::size_t max_message_bytes,
                 TokenBucket::TimePoint start);
  // Charges one message of `bytes` bytes.
  void Charge(std::size_t bytes, TokenBucket::TimePoint now);
  // How long the session must wait before its next read (zero: read now).
  std::chrono::nanoseconds Delay(TokenBucket::TimePoint now);

 private:
  TokenBucket messages_;
  TokenBucket bytes_;
};

}  // namespace muster
