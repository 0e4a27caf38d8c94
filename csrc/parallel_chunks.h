// Dynamic scheduling over the intra-op threads, for the CPU loops of the block and its kernels.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace dense_ops {

// Runs chunk(i) for every i in [0, count), each thread claiming the next chunk when it is done
// with one. at::parallel_for splits a range into one static share per thread, and on a 2-core
// machine a thread that starts late (woken from sleep) or runs slower (the other process's core)
// holds the other at the region's end. Which thread runs a chunk varies, so a caller's results
// must not depend on it: per-chunk partials added in chunk order do not. Nested in another
// parallel region, the claims run on the calling thread, in order.
template <typename Chunk>
void parallel_chunks(int64_t count, const Chunk& chunk) {
  if (count <= 0) return;
  std::atomic<int64_t> next{0};
  const auto claim = [&next] { return next.fetch_add(1, std::memory_order_relaxed); };
  at::parallel_for(0, std::min<int64_t>(count, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    for (int64_t i = claim(); i < count; i = claim()) chunk(i);
  });
}

}  // namespace dense_ops
