#include "controller/log_writer.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <spdlog/sinks/ostream_sink.h>
#include <spdlog/spdlog.h>

#include <future>
#include <sstream>

namespace muster {
namespace {

using ::testing::ElementsAre;

std::shared_ptr<LogSource> Source(const std::string& machine) {
  auto s = std::make_shared<LogSource>();
  s->machine = machine;
  s->peer = "127.0.0.1:1";
  return s;
}

proto::LogLines Lines(std::int64_t generation, std::size_t n) {
  proto::LogLines l{generation, "realise", {}};
  for (std::size_t i = 0; i < n; ++i) l.lines.push_back("line " + std::to_string(i));
  return l;
}

// Captures what the writer logs, to count warnings.
class CaptureLog {
 public:
  CaptureLog() : previous_(spdlog::default_logger()) {
    auto sink = std::make_shared<spdlog::sinks::ostream_sink_mt>(out_);
    spdlog::set_default_logger(std::make_shared<spdlog::logger>("capture", sink));
  }
  ~CaptureLog() { spdlog::set_default_logger(previous_); }
  int Count(const std::string& needle) const {
    std::string text = out_.str();
    int n = 0;
    for (auto p = text.find(needle); p != std::string::npos; p = text.find(needle, p + 1)) ++n;
    return n;
  }

 private:
  std::ostringstream out_;
  std::shared_ptr<spdlog::logger> previous_;
};

// A sink that records every batch and can hold the writer inside its first call.
struct RecordingSink {
  std::mutex mu;
  std::vector<std::vector<Fleet::LogWrite>> batches;
  std::promise<void> entered;
  std::shared_future<void> release;
  bool hold_first = false;

  LogWriter::Sink Fn() {
    return [this](const std::vector<Fleet::LogWrite>& w) -> Result<std::vector<bool>> {
      bool first;
      {
        std::lock_guard lock(mu);
        first = batches.empty();
        batches.push_back(w);
      }
      if (first && hold_first) {
        entered.set_value();
        release.wait();
      }
      std::vector<bool> known;
      for (const auto& x : w) known.push_back(x.logs.generation != 99);
      return known;
    };
  }
};

TEST(LogWriter, MessagesQueuedMeanwhileAreStoredInOneBatch) {
  LogStats stats;
  RecordingSink sink;
  std::promise<void> go;
  sink.hold_first = true;
  sink.release = go.get_future().share();
  LogWriter w(sink.Fn(), {}, stats);
  auto src = Source("web1");
  ASSERT_TRUE(w.Submit(src, Lines(1, 2)));
  sink.entered.get_future().wait();  // the writer is inside the store call
  ASSERT_TRUE(w.Submit(src, Lines(1, 3)));
  ASSERT_TRUE(w.Submit(Source("db1"), Lines(2, 1)));
  ASSERT_TRUE(w.Submit(src, Lines(1, 4)));
  EXPECT_EQ(stats.queued_lines.load(), 8);
  go.set_value();
  w.Drain();
  ASSERT_EQ(sink.batches.size(), 2u);
  EXPECT_EQ(sink.batches[0].size(), 1u);
  ASSERT_EQ(sink.batches[1].size(), 3u) << "one group commit for everything queued";
  EXPECT_EQ(sink.batches[1][1].machine, "db1");
  EXPECT_EQ(sink.batches[1][2].logs.lines.size(), 4u) << "in order";
  EXPECT_EQ(stats.stored_lines.load(), 10u);
  EXPECT_EQ(stats.queued_lines.load(), 0);
}

TEST(LogWriter, AFullQueueDropsAndCountsWithoutBlocking) {
  CaptureLog log;
  LogStats stats;
  RecordingSink sink;
  std::promise<void> go;
  sink.hold_first = true;
  sink.release = go.get_future().share();
  LogWriter::Options o;
  o.max_queued_lines = 10;
  LogWriter w(sink.Fn(), o, stats);
  auto src = Source("flood");
  ASSERT_TRUE(w.Submit(src, Lines(1, 10)));  // taken by the writer, which then waits
  sink.entered.get_future().wait();
  EXPECT_TRUE(w.Submit(src, Lines(1, 6)));
  EXPECT_TRUE(w.Submit(src, Lines(1, 4)));
  for (int i = 0; i < 100; ++i) EXPECT_FALSE(w.Submit(src, Lines(1, 1))) << "returns at once";
  EXPECT_FALSE(w.Submit(Source("other"), Lines(1, 5)));
  EXPECT_EQ(stats.dropped_queue_full.load(), 105u);
  EXPECT_EQ(log.Count("the log queue is full"), 2) << "once per source";
  go.set_value();
  w.Drain();
  EXPECT_EQ(stats.stored_lines.load(), 20u);
  EXPECT_TRUE(w.Submit(src, Lines(1, 10))) << "room again once drained";
}

TEST(LogWriter, UnknownGenerationsAreDroppedCountedAndWarnedOncePerSource) {
  CaptureLog log;
  LogStats stats;
  RecordingSink sink;
  LogWriter w(sink.Fn(), {}, stats);
  auto a = Source("web1");
  auto b = Source("web1");  // a second connection of the same machine
  for (int i = 0; i < 50; ++i) ASSERT_TRUE(w.Submit(a, Lines(99, 2)));
  ASSERT_TRUE(w.Submit(a, Lines(3, 1)));
  ASSERT_TRUE(w.Submit(b, Lines(99, 1)));
  w.Drain();
  EXPECT_EQ(stats.dropped_unknown_generation.load(), 101u);
  EXPECT_EQ(stats.stored_lines.load(), 1u);
  EXPECT_EQ(log.Count("which does not exist for this machine"), 2);
}

TEST(LogWriter, StoreErrorsAreCountedAndStopStoresWhatIsQueued) {
  LogStats stats;
  int calls = 0;
  std::vector<std::size_t> sizes;
  {
    LogWriter w(
        [&](const std::vector<Fleet::LogWrite>& writes) -> Result<std::vector<bool>> {
          ++calls;
          sizes.push_back(writes.size());
          if (calls == 1) return Err("disk full");
          return std::vector<bool>(writes.size(), true);
        },
        {}, stats);
    ASSERT_TRUE(w.Submit(Source("web1"), Lines(1, 3)));
    w.Drain();
    EXPECT_EQ(stats.dropped_store_error.load(), 3u);
    ASSERT_TRUE(w.Submit(Source("web1"), Lines(1, 2)));
    w.Stop();
    EXPECT_FALSE(w.Submit(Source("web1"), Lines(1, 1))) << "refused after Stop";
  }
  EXPECT_EQ(stats.stored_lines.load(), 2u) << "what was queued at Stop was stored";
  EXPECT_THAT(sizes, ElementsAre(1u, 1u));
}

}  // namespace
}  // namespace muster
