#include "controller/store.h"

#include <spdlog/spdlog.h>

#include <algorithm>

namespace muster {

Status QueueDeliveriesOf(std::span<const StatusWrite> writes, const EnqueueDeliveriesFn& enqueue) {
  std::vector<DeliveryRecord> all;
  std::int64_t max_queued = 0;
  for (const auto& w : writes) {
    all.insert(all.end(), w.deliveries.begin(), w.deliveries.end());
    max_queued = std::max(max_queued, w.max_queued);
  }
  if (all.empty()) return Status::Ok();
  auto dropped = enqueue(all, max_queued);
  if (!dropped) return dropped.error();
  if (*dropped > 0) spdlog::warn("notifications: queue full; dropped the {} oldest", *dropped);
  return Status::Ok();
}

}  // namespace muster
