// Argument checks whose messages name the argument and what was found, in the style of
// fbgemm_gpu/utils/tensor_utils.h. They throw c10::Error (RuntimeError in Python).
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <utility>
#include <vector>

namespace torchrec_tt {

inline void check_dim(const char* op, const char* name, const at::Tensor& x, int64_t n) {
  TORCH_CHECK(x.dim() == n, op, ": ", name, " must be ", n, "-D, got ", x.dim(), "-D of shape ",
              x.sizes());
}

inline void check_index_dtype(const char* op, const char* name, const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kInt || x.scalar_type() == at::kLong, op, ": ", name,
              " must be int32 or int64, got ", x.scalar_type());
}

// The tensor arguments of one op call, by name: every one must be on the device of the first.
// A kernel reading a tensor of another device reads garbage (or faults), so every op entry
// point (CPU and CUDA) checks all its tensors here before anything else, and the error lists
// each tensor that is elsewhere with its device. The fake (meta) kernels in torchrec_tt/ops.py
// and conv_ops.py apply the same rule.
class SameDeviceCheck {
 public:
  SameDeviceCheck(const char* op, std::string first_name, const at::Tensor& first)
      : op_(op), first_name_(std::move(first_name)), device_(first.device()) {}

  // Undefined tensors (absent optional arguments) are skipped.
  SameDeviceCheck& add(const std::string& name, const at::Tensor& t) {
    if (t.defined() && t.device() != device_) {
      wrong_.push_back(name + " is on " + t.device().str());
    }
    return *this;
  }

  void check() const {
    if (wrong_.empty()) return;
    std::string list;
    for (const auto& w : wrong_) list += (list.empty() ? "" : ", ") + w;
    TORCH_CHECK(false, op_, ": all tensor arguments must be on one device, but ", first_name_,
                " is on ", device_, " and ", list);
  }

 private:
  const char* op_;
  std::string first_name_;
  at::Device device_;
  std::vector<std::string> wrong_;
};

}  // namespace torchrec_tt
