// Host entry points of torchrec_tt._C. Schemas live in ops.cpp; each backend registers its
// implementations beside its kernels (embedding_bag_cpu.cpp, embedding_bag_cuda.cu).
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <tuple>
#include <vector>

namespace torchrec_tt {

// Pooling modes cross the op boundary as int, with FBGEMM's PoolingMode values.
enum class PoolingMode : int64_t { SUM = 0, MEAN = 1 };
// FBGEMM's BoundsCheckMode values (NONE is mapped to IGNORE in Python).
enum class BoundsCheckMode : int64_t { FATAL = 0, WARNING = 1, IGNORE = 2 };
enum class ComputePrecision : int64_t { TF32 = 0, FP32 = 1, BF16 = 2, FP16 = 3 };

at::Tensor tt_embedding_bag_cpu(
    const std::vector<at::Tensor>& cores,
    at::IntArrayRef num_cores,
    at::IntArrayRef p_shapes,
    at::IntArrayRef q_shapes,
    at::IntArrayRef ranks,
    at::IntArrayRef num_rows,
    at::IntArrayRef feature_table_map,
    const std::vector<std::string>& table_names,
    at::IntArrayRef pooling_modes,
    const at::Tensor& indices,
    const at::Tensor& offsets,
    const std::optional<at::Tensor>& per_sample_weights,
    int64_t bounds_check_mode,
    int64_t compute_precision,
    bool deterministic);

std::tuple<std::vector<at::Tensor>, at::Tensor> tt_embedding_bag_backward_cpu(
    const at::Tensor& grad_output,
    const std::vector<at::Tensor>& cores,
    at::IntArrayRef num_cores,
    at::IntArrayRef p_shapes,
    at::IntArrayRef q_shapes,
    at::IntArrayRef ranks,
    at::IntArrayRef num_rows,
    at::IntArrayRef feature_table_map,
    const std::vector<std::string>& table_names,
    at::IntArrayRef pooling_modes,
    const at::Tensor& indices,
    const at::Tensor& offsets,
    const std::optional<at::Tensor>& per_sample_weights,
    bool per_sample_weights_grad,
    int64_t bounds_check_mode,
    int64_t compute_precision,
    bool deterministic);

}  // namespace torchrec_tt
