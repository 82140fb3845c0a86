// Argument parsing and validation shared by the CPU and CUDA embedding-bag kernels: turns the
// op's flattened int lists into one TableInfo per table and checks every argument, naming the
// table (and feature) at fault.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/irange.h>

#include <array>
#include <string>
#include <vector>

#include "checks.h"
#include "ops.h"

namespace torchrec_tt {

constexpr int64_t kMaxCores = 4;

struct TableInfo {
  std::string name;
  int64_t K = 0;
  int64_t first_core = 0;  // position of core 0 in the `cores` list
  std::array<int64_t, kMaxCores> p{};
  std::array<int64_t, kMaxCores> q{};
  std::array<int64_t, kMaxCores + 1> r{};  // full ranks, r[0] = r[K] = 1
  // Q[l] = q_0 * ... * q_l: rows of the level-l prefix matrix [Q[l], r[l+1]].
  std::array<int64_t, kMaxCores> Q{};
  // stride[l] = p_{l+1} * ... * p_{K-1}: row i belongs to level-l prefix group i / stride[l].
  std::array<int64_t, kMaxCores> stride{};
  int64_t N = 0;
  int64_t D = 0;
  int64_t R = 0;  // r[K-1], the rank contracted with the last core
  int64_t pooling = 0;
};

struct KernelOptions {
  BoundsCheckMode bounds = BoundsCheckMode::FATAL;
  ComputePrecision precision = ComputePrecision::TF32;
  bool deterministic = false;
};

struct BatchInfo {
  std::vector<TableInfo> tables;
  std::vector<int64_t> feature_table;
  std::vector<int64_t> feature_col;  // column offset of feature f in the output
  int64_t F = 0;
  int64_t B = 0;
  int64_t total_D = 0;
  at::ScalarType dtype = at::kFloat;
  KernelOptions options;
};

inline std::string table_label(const TableInfo& t) {
  return "table '" + t.name + "'";
}

inline KernelOptions parse_kernel_options(const char* op, at::ScalarType dtype,
                                          int64_t bounds_check_mode, int64_t compute_precision,
                                          bool deterministic) {
  TORCH_CHECK(bounds_check_mode >= 0 && bounds_check_mode <= 2, op, ": bounds_check_mode must be ",
              "0 (FATAL), 1 (WARNING) or 2 (IGNORE), got ", bounds_check_mode);
  TORCH_CHECK(compute_precision >= 0 && compute_precision <= 3, op, ": compute_precision must be ",
              "0 (TF32), 1 (FP32), 2 (BF16) or 3 (FP16), got ", compute_precision);
  KernelOptions o;
  o.bounds = static_cast<BoundsCheckMode>(bounds_check_mode);
  o.precision = static_cast<ComputePrecision>(compute_precision);
  o.deterministic = deterministic;
  TORCH_CHECK(dtype == at::kFloat || o.precision == ComputePrecision::TF32 ||
                  o.precision == ComputePrecision::FP32,
              op, ": compute_precision BF16 / FP16 needs float32 cores, got ", dtype);
  return o;
}

// Every tensor argument on the device of `indices` (cores named by table, as "core k of table
// 't'"). check_backward_args adds the backward's grad_output.
inline void check_devices(const char* op, const std::vector<at::Tensor>& cores,
                          at::IntArrayRef num_cores, const std::vector<std::string>& table_names,
                          const at::Tensor& indices, const at::Tensor& offsets,
                          const std::optional<at::Tensor>& per_sample_weights) {
  SameDeviceCheck check(op, "indices", indices);
  check.add("offsets", offsets);
  if (per_sample_weights.has_value()) check.add("per_sample_weights", *per_sample_weights);
  int64_t t = 0, k = 0;
  for (const auto& c : cores) {
    while (t < static_cast<int64_t>(num_cores.size()) && k >= num_cores[t]) {
      ++t;
      k = 0;
    }
    const std::string table = t < static_cast<int64_t>(table_names.size())
                                  ? "table '" + table_names[t] + "'"
                                  : "an extra table";
    check.add("core " + std::to_string(k) + " of " + table, c);
    ++k;
  }
  check.check();
}

inline BatchInfo parse_and_check(
    const char* op,
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
    bool deterministic) {
  const auto T = static_cast<int64_t>(num_cores.size());
  TORCH_CHECK(T >= 1, op, ": needs at least one table");
  TORCH_CHECK(
      static_cast<int64_t>(num_rows.size()) == T && static_cast<int64_t>(table_names.size()) == T,
      op, ": num_cores, num_rows and table_names must have one entry per table, got ", T, ", ",
      num_rows.size(), " and ", table_names.size());
  TORCH_CHECK(static_cast<int64_t>(pooling_modes.size()) == T, op,
              ": pooling_modes must have one entry per table, got ", pooling_modes.size(),
              " for ", T, " tables");
  TORCH_CHECK(!cores.empty(), op, ": no cores given");
  check_devices(op, cores, num_cores, table_names, indices, offsets, per_sample_weights);
  BatchInfo info;
  info.dtype = cores[0].scalar_type();
  TORCH_CHECK(
      info.dtype == at::kFloat || info.dtype == at::kDouble, op,
      ": cores must be float32 or float64, got ", info.dtype);

  int64_t core_pos = 0, rank_pos = 0;
  for (const auto t : c10::irange(T)) {
    TableInfo ti;
    ti.name = table_names[t];
    ti.K = num_cores[t];
    TORCH_CHECK(ti.K >= 2 && ti.K <= kMaxCores, op, ": ", table_label(ti),
                " must have 2, 3 or 4 cores, got ", ti.K);
    TORCH_CHECK(core_pos + ti.K <= static_cast<int64_t>(p_shapes.size()) &&
                    core_pos + ti.K <= static_cast<int64_t>(q_shapes.size()) &&
                    core_pos + ti.K <= static_cast<int64_t>(cores.size()) &&
                    rank_pos + ti.K - 1 <= static_cast<int64_t>(ranks.size()),
                op, ": p_shapes, q_shapes, ranks or cores are too short for ", table_label(ti));
    ti.first_core = core_pos;
    ti.N = num_rows[t];
    ti.pooling = pooling_modes[t];
    TORCH_CHECK(ti.pooling == static_cast<int64_t>(PoolingMode::SUM) ||
                    ti.pooling == static_cast<int64_t>(PoolingMode::MEAN),
                op, ": ", table_label(ti), " has pooling mode ", ti.pooling,
                "; expected 0 (SUM) or 1 (MEAN)");
    TORCH_CHECK(ti.N >= 1, op, ": ", table_label(ti), " has num_rows ", ti.N);
    ti.r[0] = 1;
    ti.r[ti.K] = 1;
    int64_t prod_p = 1;
    ti.D = 1;
    for (const auto k : c10::irange(ti.K)) {
      ti.p[k] = p_shapes[core_pos + k];
      ti.q[k] = q_shapes[core_pos + k];
      TORCH_CHECK(ti.p[k] >= 1 && ti.q[k] >= 1, op, ": ", table_label(ti),
                  " has a non-positive p or q factor");
      if (k + 1 < ti.K) {
        ti.r[k + 1] = ranks[rank_pos + k];
        TORCH_CHECK(ti.r[k + 1] >= 1, op, ": ", table_label(ti), " has rank ", ti.r[k + 1]);
      }
      // Saturate: only "prod(p) >= N" matters, and huge products must not overflow.
      prod_p = prod_p > ti.N ? prod_p : prod_p * ti.p[k];
      ti.D *= ti.q[k];
    }
    TORCH_CHECK(prod_p >= ti.N, op, ": ", table_label(ti), " row factors multiply to ", prod_p,
                " < num_rows ", ti.N);
    ti.R = ti.r[ti.K - 1];
    int64_t s = 1;
    for (int64_t k = ti.K - 1; k >= 0; --k) {
      ti.stride[k] = s;
      s *= ti.p[k];
    }
    int64_t qq = 1;
    for (const auto k : c10::irange(ti.K)) {
      qq *= ti.q[k];
      ti.Q[k] = qq;
    }
    for (const auto k : c10::irange(ti.K)) {
      const auto& c = cores[core_pos + k];
      TORCH_CHECK(c.scalar_type() == info.dtype, op, ": core ", k, " of ", table_label(ti),
                  " is ", c.scalar_type(), " but core 0 of the batch is ", info.dtype,
                  "; all cores of one call share a dtype");
      const int64_t cols = ti.r[k] * ti.q[k] * ti.r[k + 1];
      TORCH_CHECK(c.dim() == 2 && c.size(0) == ti.p[k] && c.size(1) == cols, op, ": core ", k,
                  " of ", table_label(ti), " must have shape [", ti.p[k], ", ", cols,
                  "] (p_k, r_{k-1}*q_k*r_k), got ", c.sizes());
    }
    core_pos += ti.K;
    rank_pos += ti.K - 1;
    info.tables.push_back(std::move(ti));
  }
  TORCH_CHECK(core_pos == static_cast<int64_t>(cores.size()) &&
                  core_pos == static_cast<int64_t>(p_shapes.size()) &&
                  core_pos == static_cast<int64_t>(q_shapes.size()) &&
                  rank_pos == static_cast<int64_t>(ranks.size()),
              op, ": the tables need ", core_pos, " cores / p / q entries and ", rank_pos,
              " ranks, got ", cores.size(), " / ", p_shapes.size(), " / ", q_shapes.size(),
              " and ", ranks.size());

  info.F = static_cast<int64_t>(feature_table_map.size());
  TORCH_CHECK(info.F >= 1, op, ": feature_table_map is empty");
  info.feature_col.resize(info.F + 1);
  info.feature_col[0] = 0;
  for (const auto f : c10::irange(info.F)) {
    const int64_t t = feature_table_map[f];
    TORCH_CHECK(t >= 0 && t < T, op, ": feature ", f, " maps to table ", t, " but there are ", T,
                " tables");
    info.feature_table.push_back(t);
    info.feature_col[f + 1] = info.feature_col[f] + info.tables[t].D;
  }
  info.total_D = info.feature_col[info.F];

  check_dim(op, "indices", indices, 1);
  check_dim(op, "offsets", offsets, 1);
  check_index_dtype(op, "indices", indices);
  check_index_dtype(op, "offsets", offsets);
  TORCH_CHECK(offsets.numel() >= 1 && (offsets.numel() - 1) % info.F == 0, op,
              ": offsets must have F*B+1 entries for F = ", info.F, " features, got ",
              offsets.numel());
  info.B = (offsets.numel() - 1) / info.F;
  if (per_sample_weights.has_value()) {
    const auto& w = *per_sample_weights;
    check_dim(op, "per_sample_weights", w, 1);
    TORCH_CHECK(w.numel() == indices.numel(), op, ": per_sample_weights has ", w.numel(),
                " entries but there are ", indices.numel(), " indices");
    TORCH_CHECK(w.scalar_type() == info.dtype, op, ": per_sample_weights is ", w.scalar_type(),
                " but the cores are ", info.dtype);
  }
  info.options =
      parse_kernel_options(op, info.dtype, bounds_check_mode, compute_precision, deterministic);
  return info;
}

// The cores the kernels read: for BF16 / FP16 compute, float32 copies rounded to that type (so
// every backend and path sees the same operands); otherwise the contiguous cores themselves.
inline std::vector<at::Tensor> compute_cores(const std::vector<at::Tensor>& cores,
                                             const KernelOptions& o) {
  std::vector<at::Tensor> out;
  out.reserve(cores.size());
  for (const auto& c : cores) {
    if (o.precision == ComputePrecision::BF16) {
      out.push_back(c.to(at::kBFloat16).to(at::kFloat).contiguous());
    } else if (o.precision == ComputePrecision::FP16) {
      out.push_back(c.to(at::kHalf).to(at::kFloat).contiguous());
    } else {
      out.push_back(c.contiguous());
    }
  }
  return out;
}

// Checks of the backward op's own arguments (the shared ones go through parse_and_check).
inline void check_backward_args(const char* op, const BatchInfo& info,
                                const at::Tensor& grad_output, const at::Tensor& indices,
                                const std::optional<at::Tensor>& per_sample_weights,
                                bool per_sample_weights_grad) {
  TORCH_CHECK(per_sample_weights.has_value() || !per_sample_weights_grad, op,
              ": per_sample_weights_grad needs per_sample_weights");
  TORCH_CHECK(grad_output.dim() == 2 && grad_output.size(0) == info.B &&
                  grad_output.size(1) == info.total_D,
              op, ": grad_output must have shape [", info.B, ", ", info.total_D, "], got ",
              grad_output.sizes());
  TORCH_CHECK(grad_output.scalar_type() == info.dtype, op, ": grad_output is ",
              grad_output.scalar_type(), " but the cores are ", info.dtype);
  SameDeviceCheck(op, "indices", indices).add("grad_output", grad_output).check();
}

}  // namespace torchrec_tt
