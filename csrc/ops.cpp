// All schemas of the torchrec_tt operator library, and the module stub that lets Python import
// torchrec_tt._C (which runs the static registrations below).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(torchrec_tt, m) {
  // Fake (meta) kernels and autograd are registered from this Python module.
  m.set_python_module("torchrec_tt.ops");

  // Table-batched TT embedding bag, FBGEMM TBE layout: `indices` holds the lookups of all F
  // features back to back; `offsets` has F*B+1 entries and bag (f, b) is
  // indices[offsets[f*B+b] : offsets[f*B+b+1]]. Feature f looks up table feature_table_map[f];
  // table t has num_cores[t] cores given in order in `cores` (2-D, [p_k, r_{k-1}*q_k*r_k]).
  // The output is [B, sum_f D_f], features side by side in order. pooling_modes[t]: 0 SUM,
  // 1 MEAN (MEAN divides the weighted sum by the bag length; empty bags give zeros).
  // bounds_check_mode (FBGEMM's values): 0 FATAL (error / device trap naming the table),
  // 1 WARNING (out-of-range lookups contribute zero; the first one is reported), 2 IGNORE (zero,
  // silently). compute_precision: 0 TF32 tensor cores (float32 cores, CUDA tile path), 1 FP32,
  // 2 BF16, 3 FP16 (cores rounded, float32 accumulation). deterministic: no float atomics in
  // the backward (bit-identical core gradients run to run). No defaults: the Python autograd
  // formula would otherwise see the trailing arguments dropped when they equal them.
  m.def(
      "tt_embedding_bag(Tensor[] cores, int[] num_cores, int[] p_shapes, int[] q_shapes, "
      "int[] ranks, int[] num_rows, int[] feature_table_map, str[] table_names, "
      "int[] pooling_modes, Tensor indices, Tensor offsets, Tensor? per_sample_weights, "
      "int bounds_check_mode, int compute_precision, bool deterministic) -> Tensor");

  // Dense gradients of every core (same shapes as `cores`) and, when per_sample_weights_grad,
  // the gradient of per_sample_weights (else an empty tensor).
  m.def(
      "tt_embedding_bag_backward(Tensor grad_output, Tensor[] cores, int[] num_cores, "
      "int[] p_shapes, int[] q_shapes, int[] ranks, int[] num_rows, int[] feature_table_map, "
      "str[] table_names, int[] pooling_modes, Tensor indices, Tensor offsets, "
      "Tensor? per_sample_weights, bool per_sample_weights_grad, int bounds_check_mode, "
      "int compute_precision, bool deterministic) -> (Tensor[], Tensor)");

  // TT convolution (conv.h). Its fake kernels and autograd live in torchrec_tt.conv_ops; the
  // module is switched back to torchrec_tt.ops after these definitions.
  m.set_python_module("torchrec_tt.conv_ops");

  // 1x1 C->r1 (core0 [r1, C, 1, 1]), KHxKW r1->r2 with stride, padding
  // and dilation (core1 [r2, r1, KH, KW]), 1x1 r2->K (core2 [K, r2, 1, 1]), plus bias [K].
  // input is [N, C, H, W] in any memory format; the output has the input's memory format.
  m.def(
      "tt_conv2d(Tensor input, Tensor core0, Tensor core1, Tensor core2, Tensor? bias, "
      "int[2] stride, int[2] padding, int[2] dilation) -> Tensor");

  // Gradients of tt_conv2d (the bias gradient is grad_output summed over N, H, W and is left to
  // the caller): (grad_input, grad_core0, grad_core1, grad_core2), each computed only where
  // output_mask says so and an empty tensor (numel 0) otherwise, as in
  // aten::convolution_backward.
  m.def(
      "tt_conv2d_backward(Tensor grad_output, Tensor input, Tensor core0, Tensor core1, "
      "Tensor core2, int[2] stride, int[2] padding, int[2] dilation, bool[4] output_mask) -> "
      "(Tensor, Tensor, Tensor, Tensor)");

  // Which tt_conv2d kernels a call with these arguments would run, for tests and benchmarks:
  // [forward fused, input gradient (asked for alone) fused, core gradients fused], 1 for the
  // backend's fused kernel and 0 for the composition of ATen convolutions (always 0 on CPU).
  m.def(
      "tt_conv2d_kernel_info(Tensor input, Tensor core0, Tensor core1, Tensor core2, "
      "int[2] stride, int[2] padding, int[2] dilation) -> int[]");

  // Error-bounded lossy comms codec (issue 16; format in lossy_codec.h, bit-identical to the
  // torch-op reference in sharding/lossy_codec.py). Fake kernels in torchrec_tt.lossy_ops.
  m.set_python_module("torchrec_tt.lossy_ops");

  // x: float32 [C, rows, G * block], C chunks; group g of a chunk is the column block
  // [g * block, (g + 1) * block) over all rows (n = rows * block values), coded at bits[g]
  // (1..16) bits. Returns uint8 [C, row_bytes]: per chunk the encoded row, zero-padded to
  // row_bytes (>= the encoded size). A group holding NaN or +-inf is sent marked (NaN header,
  // zero codes; it decodes to NaN); then status[0] is set to 1 when status is given (on CUDA
  // without a host sync: the caller reads it when it likes), and without status the op raises
  // ValueError (on CUDA after a synchronisation).
  m.def(
      "lossy_encode(Tensor x, int[] bits, int block, int row_bytes, Tensor(a!)? status) -> "
      "Tensor");

  // data: uint8 [C, S] (S >= the encoded size; bytes past it are ignored) -> float32
  // [C, rows, G * block], the inverse of lossy_encode with the same rows, block and bits.
  m.def("lossy_decode(Tensor data, int rows, int block, int[] bits) -> Tensor");
  // lossy_decode into `out` (contiguous float32 of C * rows * G * block elements), so the
  // forward all-to-all decodes every rank's chunk straight into one buffer.
  m.def(
      "lossy_decode_into(Tensor data, int rows, int block, int[] bits, Tensor(a!) out) -> ()");
  m.set_python_module("torchrec_tt.ops");
}

// A plain module init (no pybind11): importing torchrec_tt._C only has to load this library so
// the registrations above run.
extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
