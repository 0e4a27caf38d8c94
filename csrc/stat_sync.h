// Batch statistics over a process group (dense_ops.convert_sync_batchnorm).
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>
#include <optional>
#include <string>

namespace dense_ops {

// Every rank runs the same layers in the same order, so the collectives line up across
// ranks; they go through c10d's functional all-reduce op, which finds the group by name.
// Without a group every method is a no-op and count() is the local count.
class StatSync {
 public:
  StatSync(const std::optional<c10::string_view>& group, int64_t local_count, const at::Tensor& like);
  // Samples (N*H*W) over the whole group.
  int64_t count() const { return count_; }
  // Replaces this rank's biased per-channel mean and var with the group's.
  void moments(const at::Tensor& mean, const at::Tensor& var) const;
  // Sums each tensor over the group, in place.
  void sum(std::initializer_list<at::Tensor> tensors) const;

 private:
  void all_reduce(const at::Tensor& t) const;
  std::optional<std::string> group_;
  int64_t local_count_, count_;
};

}  // namespace dense_ops
