// Agents' log lines, written to the store by one thread in group commits.
//
// Sessions hand each log message to Submit() on their I/O thread; it never
// blocks and never touches the store: past max_queued_lines the message is
// dropped and counted (the store's fsync cannot stall the I/O threads, and a
// flood cannot grow the queue). The writer thread takes everything queued, up
// to max_batch_lines, and stores it with one Sink call (Fleet::AgentLogBatch:
// one transaction, one fsync). Messages for a generation that does not exist
// for their machine are dropped and counted; each source is warned about once.
// Thread-safe.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "controller/fleet.h"

namespace muster {

// Counters for metrics; monotonic except queued_lines.
struct LogStats {
  std::atomic<std::uint64_t> stored_lines{0};
  std::atomic<std::uint64_t> dropped_queue_full{0};          // lines
  std::atomic<std::uint64_t> dropped_unknown_generation{0};  // lines
  std::atomic<std::uint64_t> dropped_store_error{0};         // lines
  std::atomic<std::int64_t> queued_lines{0};
};

// One agent session, as the writer's warnings see it.
struct LogSource {
  std::string machine;
  std::string peer;
  std::atomic<bool> warned_unknown_generation{false};
  std::atomic<bool> warned_queue_full{false};
};

class LogWriter {
 public:
  // Stores one batch; see Fleet::AgentLogBatch.
  using Sink = std::function<Result<std::vector<bool>>(const std::vector<Fleet::LogWrite>&)>;
  struct Options {
    std::size_t max_queued_lines = 200000;
    std::size_t max_batch_lines = 20000;
  };

  LogWriter(Sink sink, Options options, LogStats& stats);
  ~LogWriter();  // Stop()

  // Queues one message from source; false (dropped and counted) when the
  // queue is full or the writer has stopped.
  bool Submit(std::shared_ptr<LogSource> source, proto::LogLines logs);
  // Blocks until everything queued before the call has been handled (tests,
  // shutdown). Returns at once after Stop().
  void Drain();
  // Stores what is queued, then joins the thread; later Submits are dropped.
  void Stop();

 private:
  struct Item {
    std::shared_ptr<LogSource> source;
    proto::LogLines logs;
  };
  void Loop();
  void Handle(std::vector<Item>& batch);

  Sink sink_;
  Options options_;
  LogStats& stats_;
  std::mutex mu_;
  std::condition_variable cv_;       // work queued, or stop
  std::condition_variable idle_cv_;  // a batch finished
  std::deque<Item> queue_;
  std::size_t queued_lines_ = 0;
  std::uint64_t submitted_ = 0;  // items accepted
  std::uint64_t handled_ = 0;    // items handled
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace muster
