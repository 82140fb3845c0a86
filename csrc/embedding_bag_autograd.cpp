// Autograd of tt_embedding_bag for CUDA tensors in C++ (as FBGEMM's TBE ops do): the Python
// formula registered through torch.library (torchrec_tt/ops.py, still used for CPU and meta
// tensors) costs ~1 ms of host time per forward (schema walks on every call), more than the GPU
// work of a step. CPU keeps the Python formula because only a Python-level autograd.Function
// turns the CPU kernel's TORCH_WARN (bounds_check_mode WARNING) into Python warnings; on CUDA
// that report is a device printf either way.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

#include "ops.h"

namespace torchrec_tt {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::vector<int64_t> to_vec(at::IntArrayRef a) {
  return a.vec();
}

class TTEmbeddingBagFunction : public torch::autograd::Function<TTEmbeddingBagFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, at::TensorList cores, at::IntArrayRef num_cores,
                            at::IntArrayRef p_shapes, at::IntArrayRef q_shapes,
                            at::IntArrayRef ranks, at::IntArrayRef num_rows,
                            at::IntArrayRef feature_table_map,
                            const std::vector<std::string>& table_names,
                            at::IntArrayRef pooling_modes, const at::Tensor& indices,
                            const at::Tensor& offsets,
                            const std::optional<at::Tensor>& per_sample_weights,
                            int64_t bounds_check_mode, int64_t compute_precision,
                            bool deterministic) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("torchrec_tt::tt_embedding_bag", "")
                         .typed<decltype(tt_embedding_bag_cpu)>();
    at::Tensor out;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      out = op.call(cores.vec(), num_cores, p_shapes, q_shapes, ranks, num_rows, feature_table_map,
                    table_names, pooling_modes, indices, offsets, per_sample_weights,
                    bounds_check_mode, compute_precision, deterministic);
    }
    const bool has_w = per_sample_weights.has_value() && per_sample_weights->defined();
    std::vector<at::Tensor> saved(cores.begin(), cores.end());
    saved.push_back(indices);
    saved.push_back(offsets);
    saved.push_back(has_w ? *per_sample_weights : at::Tensor());
    ctx->save_for_backward(saved);
    ctx->saved_data["num_tensors"] = static_cast<int64_t>(cores.size());
    ctx->saved_data["num_cores"] = to_vec(num_cores);
    ctx->saved_data["p_shapes"] = to_vec(p_shapes);
    ctx->saved_data["q_shapes"] = to_vec(q_shapes);
    ctx->saved_data["ranks"] = to_vec(ranks);
    ctx->saved_data["num_rows"] = to_vec(num_rows);
    ctx->saved_data["feature_table_map"] = to_vec(feature_table_map);
    ctx->saved_data["table_names"] = table_names;
    ctx->saved_data["pooling_modes"] = to_vec(pooling_modes);
    ctx->saved_data["has_w"] = has_w;
    ctx->saved_data["w_grad"] = has_w && per_sample_weights->requires_grad();
    ctx->saved_data["bounds_check_mode"] = bounds_check_mode;
    ctx->saved_data["compute_precision"] = compute_precision;
    ctx->saved_data["deterministic"] = deterministic;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    static auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("torchrec_tt::tt_embedding_bag_backward", "")
            .typed<decltype(tt_embedding_bag_backward_cpu)>();
    const auto saved = ctx->get_saved_variables();
    const int64_t nt = ctx->saved_data["num_tensors"].toInt();
    std::vector<at::Tensor> cores(saved.begin(), saved.begin() + nt);
    const at::Tensor& indices = saved[nt];
    const at::Tensor& offsets = saved[nt + 1];
    const bool has_w = ctx->saved_data["has_w"].toBool();
    const bool w_grad = ctx->saved_data["w_grad"].toBool();
    std::optional<at::Tensor> weights;
    if (has_w) weights = saved[nt + 2];
    auto ints = [&](const char* k) { return ctx->saved_data[k].toIntVector(); };
    const auto num_cores = ints("num_cores"), p = ints("p_shapes"), q = ints("q_shapes"),
               r = ints("ranks"), rows = ints("num_rows"), ftm = ints("feature_table_map"),
               pm = ints("pooling_modes");
    std::vector<std::string> names;
    for (const auto& v : ctx->saved_data["table_names"].toListRef()) names.push_back(v.toStringRef());
    auto [core_grads, wgrad] = op.call(
        grad_outputs[0].contiguous(), cores, num_cores, p, q, r, rows, ftm, names, pm, indices,
        offsets, weights, w_grad, ctx->saved_data["bounds_check_mode"].toInt(),
        ctx->saved_data["compute_precision"].toInt(), ctx->saved_data["deterministic"].toBool());
    // One entry per forward argument, tensors of the core list flattened (custom_function.h).
    variable_list grads(core_grads.begin(), core_grads.end());
    for (int i = 0; i < 8; ++i) grads.emplace_back();  // num_cores .. pooling_modes
    grads.emplace_back();                              // indices
    grads.emplace_back();                              // offsets
    grads.push_back(w_grad ? wgrad : at::Tensor());    // per_sample_weights
    for (int i = 0; i < 3; ++i) grads.emplace_back();  // options
    return grads;
  }
};

// Same C++ signature as the backend kernels (the dispatcher requires one per op).
at::Tensor tt_embedding_bag_autograd(
    const std::vector<at::Tensor>& cores, at::IntArrayRef num_cores, at::IntArrayRef p_shapes,
    at::IntArrayRef q_shapes, at::IntArrayRef ranks, at::IntArrayRef num_rows,
    at::IntArrayRef feature_table_map, const std::vector<std::string>& table_names,
    at::IntArrayRef pooling_modes, const at::Tensor& indices, const at::Tensor& offsets,
    const std::optional<at::Tensor>& per_sample_weights, int64_t bounds_check_mode,
    int64_t compute_precision, bool deterministic) {
  // As a TensorList the cores are autograd inputs (a std::vector would not be).
  return TTEmbeddingBagFunction::apply(at::TensorList(cores), num_cores, p_shapes, q_shapes, ranks, num_rows,
                                       feature_table_map, table_names, pooling_modes, indices,
                                       offsets, per_sample_weights, bounds_check_mode, compute_precision,
                                       deterministic);
}

}  // namespace

TORCH_LIBRARY_IMPL(torchrec_tt, AutogradCUDA, m) {
  m.impl("tt_embedding_bag", &tt_embedding_bag_autograd);
}

}  // namespace torchrec_tt
