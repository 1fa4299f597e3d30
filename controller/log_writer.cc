#include "controller/log_writer.h"

#include <spdlog/spdlog.h>

namespace muster {

LogWriter::LogWriter(Sink sink, Options options, LogStats& stats)
    : sink_(std::move(sink)), options_(options), stats_(stats) {
  thread_ = std::thread([this] { Loop(); });
}

LogWriter::~LogWriter() { Stop(); }

bool LogWriter::Submit(std::shared_ptr<LogSource> source, proto::LogLines logs) {
  const std::size_t n = logs.lines.size();
  if (n == 0) return true;
  {
    std::lock_guard lock(mu_);
    if (stop_) {  // shutting down
      stats_.dropped_queue_full += n;
      return false;
    }
    if (queued_lines_ + n <= options_.max_queued_lines) {
      queued_lines_ += n;
      stats_.queued_lines = static_cast<std::int64_t>(queued_lines_);
      ++submitted_;
      queue_.push_back({std::move(source), std::move(logs)});
      cv_.notify_one();
      return true;
    }
  }
  stats_.dropped_queue_full += n;
  if (!source->warned_queue_full.exchange(true)) {
    spdlog::warn(
        "{} ({}): the log queue is full ({} lines waiting for the store); dropping log lines "
        "from this connection while it stays full (counted in muster_log_lines_dropped_total)",
        source->peer, source->machine, options_.max_queued_lines);
  }
  return false;
}

void LogWriter::Drain() {
  std::unique_lock lock(mu_);
  const std::uint64_t target = submitted_;
  idle_cv_.wait(lock, [&] { return handled_ >= target; });
}

void LogWriter::Stop() {
  {
    std::lock_guard lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable() && thread_.get_id() != std::this_thread::get_id()) thread_.join();
}

void LogWriter::Loop() {
  for (;;) {
    std::vector<Item> batch;
    {
      std::unique_lock lock(mu_);
      cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopped, and everything queued is stored
      std::size_t lines = 0;
      while (!queue_.empty() && (batch.empty() || lines + queue_.front().logs.lines.size() <=
                                                      options_.max_batch_lines)) {
        lines += queue_.front().logs.lines.size();
        batch.push_back(std::move(queue_.front()));
        queue_.pop_front();
      }
      queued_lines_ -= lines;
      stats_.queued_lines = static_cast<std::int64_t>(queued_lines_);
    }
    Handle(batch);
    {
      std::lock_guard lock(mu_);
      handled_ += batch.size();
    }
    idle_cv_.notify_all();
  }
}

void LogWriter::Handle(std::vector<Item>& batch) {
  std::vector<Fleet::LogWrite> writes;
  writes.reserve(batch.size());
  std::vector<std::size_t> counts;
  counts.reserve(batch.size());
  std::size_t lines = 0;
  for (auto& it : batch) {
    counts.push_back(it.logs.lines.size());
    lines += it.logs.lines.size();
    writes.push_back({it.source->machine, std::move(it.logs)});
  }
  auto stored = sink_(writes);
  if (!stored) {
    stats_.dropped_store_error += lines;
    spdlog::error("cannot store {} log lines: {}", lines, stored.message());
    return;
  }
  for (std::size_t k = 0; k < batch.size(); ++k) {
    if (k < stored->size() && (*stored)[k]) {
      stats_.stored_lines += counts[k];
      continue;
    }
    stats_.dropped_unknown_generation += counts[k];
    const LogSource& src = *batch[k].source;
    if (!batch[k].source->warned_unknown_generation.exchange(true)) {
      spdlog::warn(
          "{} ({}): dropping log lines for generation {}, which does not exist for this "
          "machine; further such lines from this connection are dropped without a warning "
          "(counted in muster_log_lines_dropped_total)",
          src.peer, src.machine, writes[k].logs.generation);
    }
  }
}

}  // namespace muster
