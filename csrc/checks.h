// Argument checks whose messages name the argument and what was found, in the style of
// fbgemm_gpu/utils/tensor_utils.h. They throw c10::Error (RuntimeError in Python).
#pragma once

#include <ATen/ATen.h>

#define TT_CHECK_DEVICE(x, dev)                                                     \
  TORCH_CHECK((x).device() == (dev), "torchrec_tt: ", #x, " is on ", (x).device(), \
              ", expected ", (dev))

#define TT_CHECK_DIM(x, n)                                                     \
  TORCH_CHECK((x).dim() == (n), "torchrec_tt: ", #x, " must be ", (n), "-D, got ", \
              (x).dim(), "-D of shape ", (x).sizes())

#define TT_CHECK_INDEX_DTYPE(x)                                                  \
  TORCH_CHECK((x).scalar_type() == at::kInt || (x).scalar_type() == at::kLong,   \
              "torchrec_tt: ", #x, " must be int32 or int64, got ", (x).scalar_type())
