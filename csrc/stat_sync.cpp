// StatSync: the collectives of synchronized batch statistics (see stat_sync.h).
#include "stat_sync.h"

#include <ATen/core/dispatch/Dispatcher.h>

#include <vector>

namespace dense_ops {

StatSync::StatSync(const std::optional<c10::string_view>& group, int64_t local_count, const at::Tensor& like)
    : local_count_(local_count), count_(local_count) {
  if (!group.has_value()) return;
  group_ = std::string(*group);
  const at::Tensor count = at::full({1}, static_cast<double>(local_count), like.options().dtype(at::kDouble));
  all_reduce(count);
  count_ = static_cast<int64_t>(count.item<double>());
}

void StatSync::all_reduce(const at::Tensor& t) const {
  static const auto reduce = c10::Dispatcher::singleton().findSchemaOrThrow("_c10d_functional::all_reduce_", "");
  static const auto wait = c10::Dispatcher::singleton().findSchemaOrThrow("_c10d_functional::wait_tensor", "");
  std::vector<c10::IValue> stack{t, std::string("sum"), *group_};
  reduce.callBoxed(&stack);
  stack = {t};
  wait.callBoxed(&stack);
}

void StatSync::moments(const at::Tensor& mean, const at::Tensor& var) const {
  if (!group_) return;
  // One all-reduce of the sums [x, x^2] in float64; a rank with no samples adds nothing.
  const int64_t channels = mean.numel();
  const at::Tensor m = mean.to(at::kDouble), v = var.to(at::kDouble);
  const at::Tensor sums = local_count_ > 0 ? at::cat({m, v + m * m}).mul_(static_cast<double>(local_count_))
                                           : at::zeros({2 * channels}, m.options());
  all_reduce(sums);
  const at::Tensor group_mean = sums.narrow(0, 0, channels) / static_cast<double>(count_);
  const at::Tensor group_var = sums.narrow(0, channels, channels) / static_cast<double>(count_) - group_mean.square();
  mean.copy_(group_mean);
  var.copy_(group_var.clamp_min(0));
}

void StatSync::sum(std::initializer_list<at::Tensor> tensors) const {
  if (!group_) return;
  std::vector<at::Tensor> flat;
  for (const auto& t : tensors) flat.push_back(t.reshape(-1).to(at::kDouble));
  const at::Tensor packed = at::cat(flat);  // one collective for all of them
  all_reduce(packed);
  int64_t offset = 0;
  for (const auto& t : tensors) {
    t.copy_(packed.narrow(0, offset, t.numel()).view(t.sizes()));
    offset += t.numel();
  }
}

}  // namespace dense_ops
