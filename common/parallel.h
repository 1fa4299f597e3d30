// ParallelFor: runs a loop body on every core, for CPU-bound batches (sealing,
// signing and verifying thousands of items) in the CLI and the controller.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <thread>
#include <vector>

namespace muster {

// Calls fn(i) once for every i in [0, n), on up to max_threads threads
// (0: one per core), the calling thread included; returns when all are done.
// fn must be safe to call concurrently for different i and must not throw.
template <typename Fn>
void ParallelFor(std::size_t n, Fn&& fn, unsigned max_threads = 0) {
  unsigned threads = max_threads ? max_threads : std::max(1u, std::thread::hardware_concurrency());
  // Below a few hundred items a thread costs more than it saves.
  threads = static_cast<unsigned>(std::min<std::size_t>(threads, n / 256 + 1));
  if (threads <= 1) {
    for (std::size_t i = 0; i < n; ++i) fn(i);
    return;
  }
  std::atomic<std::size_t> next{0};
  constexpr std::size_t kChunk = 64;
  auto work = [&] {
    for (;;) {
      std::size_t begin = next.fetch_add(kChunk);
      if (begin >= n) return;
      std::size_t end = std::min(n, begin + kChunk);
      for (std::size_t i = begin; i < end; ++i) fn(i);
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(threads - 1);
  for (unsigned t = 1; t < threads; ++t) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();
}

}  // namespace muster
