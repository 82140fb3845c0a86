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
  m.def(
      "tt_embedding_bag(Tensor[] cores, int[] num_cores, int[] p_shapes, int[] q_shapes, "
      "int[] ranks, int[] num_rows, int[] feature_table_map, str[] table_names, "
      "int[] pooling_modes, Tensor indices, Tensor offsets, Tensor? per_sample_weights) -> Tensor");

  // Dense gradients of every core (same shapes as `cores`) and, when per_sample_weights_grad,
  // the gradient of per_sample_weights (else an empty tensor).
  m.def(
      "tt_embedding_bag_backward(Tensor grad_output, Tensor[] cores, int[] num_cores, "
      "int[] p_shapes, int[] q_shapes, int[] ranks, int[] num_rows, int[] feature_table_map, "
      "str[] table_names, int[] pooling_modes, Tensor indices, Tensor offsets, "
      "Tensor? per_sample_weights, bool per_sample_weights_grad) -> (Tensor[], Tensor)");
}

// A plain module init (no pybind11): importing torchrec_tt._C only has to load this library so
// the registrations above run.
extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
