// Argument checks and shapes shared by the CPU and CUDA entry points of torchrec_tt::lossy_encode
// and torchrec_tt::lossy_decode (schemas in ops.cpp, format in lossy_codec.h). Shape and value
// errors are ValueError in Python (TORCH_CHECK_VALUE), as the torch-op reference raises.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "checks.h"
#include "lossy_codec.h"

namespace torchrec_tt {
namespace lossy {

// The message of the reference codec (sharding/lossy_codec.py), so callers match one text.
constexpr const char* kNonFiniteMessage =
    "lossy comms: the tensor to encode contains NaN or inf; error-bounded compression needs "
    "finite values (check the loss / learning rate)";

struct EncodeArgs {
  at::Tensor x;  // contiguous float32 [C, rows, G * block]
  std::vector<int64_t> bits;
  Geometry geo;
  int64_t chunks;
  Plan plan;
};

inline std::vector<int64_t> check_bits(const char* op, at::IntArrayRef bits) {
  std::vector<int64_t> out(bits.begin(), bits.end());
  for (const int64_t b : out) {
    TORCH_CHECK_VALUE(b >= 1 && b <= kMaxBits, op, ": code widths must be in 1..", kMaxBits,
                      ", got ", bits);
  }
  return out;
}

inline EncodeArgs check_encode(const at::Tensor& x, at::IntArrayRef bits, int64_t block,
                               int64_t row_bytes, const std::optional<at::Tensor>& status) {
  constexpr const char* op = "lossy_encode";
  SameDeviceCheck(op, "x", x).add("status", status.value_or(at::Tensor())).check();
  check_dim(op, "x", x, 3);
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat, op, ": x must be float32, got ",
                    x.scalar_type());
  TORCH_CHECK_VALUE(block >= 1, op, ": block must be >= 1, got ", block);
  EncodeArgs a;
  a.bits = check_bits(op, bits);
  const int64_t groups = static_cast<int64_t>(a.bits.size());
  TORCH_CHECK_VALUE(x.size(2) == groups * block, op, ": x is ", x.sizes(), " but ", groups,
                    " code widths of groups of ", block, " columns need ", groups * block,
                    " columns");
  if (status.has_value()) {
    TORCH_CHECK_VALUE(status->scalar_type() == at::kInt && status->numel() >= 1 &&
                          status->is_contiguous(),
                      op, ": status must be a contiguous int32 tensor of >= 1 element");
  }
  a.chunks = x.size(0);
  a.geo = Geometry{x.size(1), block, groups};
  const int64_t n = a.geo.rows * block;
  TORCH_CHECK_VALUE(n < (int64_t{1} << 31), op, ": groups of ", n,
                    " values; at most 2^31 - 1 are supported");
  a.plan = make_plan(a.bits.data(), groups, n);
  TORCH_CHECK_VALUE(row_bytes >= a.plan.encoded_bytes, op, ": row_bytes ", row_bytes,
                    " is less than the encoded size of a chunk, ", a.plan.encoded_bytes);
  a.x = x.contiguous();
  return a;
}

struct DecodeArgs {
  at::Tensor data;  // uint8 [C, S], unit stride along S
  std::vector<int64_t> bits;
  Geometry geo;
  int64_t chunks;
  Plan plan;
};

inline DecodeArgs check_decode(const at::Tensor& data, int64_t rows, int64_t block,
                               at::IntArrayRef bits) {
  constexpr const char* op = "lossy_decode";
  check_dim(op, "data", data, 2);
  TORCH_CHECK_VALUE(data.scalar_type() == at::kByte, op, ": data must be uint8, got ",
                    data.scalar_type());
  TORCH_CHECK_VALUE(rows >= 0 && block >= 1, op, ": need rows >= 0 and block >= 1, got ", rows,
                    ", ", block);
  DecodeArgs a;
  a.bits = check_bits(op, bits);
  const int64_t groups = static_cast<int64_t>(a.bits.size());
  const int64_t n = rows * block;
  TORCH_CHECK_VALUE(n < (int64_t{1} << 31), op, ": groups of ", n,
                    " values; at most 2^31 - 1 are supported");
  a.chunks = data.size(0);
  a.geo = Geometry{rows, block, groups};
  a.plan = make_plan(a.bits.data(), groups, n);
  TORCH_CHECK_VALUE(a.chunks == 0 || data.size(1) >= a.plan.encoded_bytes, op, ": rows of ",
                    data.size(1), " bytes, but ", groups, " groups of ", n, " values at ", bits,
                    " bits take ", a.plan.encoded_bytes);
  a.data = data.stride(1) == 1 ? data : data.contiguous();
  return a;
}

// `out` of lossy_decode_into: contiguous float32 on data's device, C * rows * G * block values.
inline void check_decode_out(const DecodeArgs& a, const at::Tensor& data, const at::Tensor& out) {
  constexpr const char* op = "lossy_decode_into";
  SameDeviceCheck(op, "data", data).add("out", out).check();
  const int64_t want = a.chunks * a.geo.chunk_stride();
  TORCH_CHECK_VALUE(out.scalar_type() == at::kFloat && out.is_contiguous() && out.numel() == want,
                    op, ": out must be a contiguous float32 tensor of ", want, " elements, got ",
                    out.scalar_type(), " ", out.sizes());
}

inline bool empty_codec(int64_t chunks, const Geometry& geo) {
  return chunks == 0 || geo.groups == 0 || geo.rows == 0;
}

}  // namespace lossy
}  // namespace torchrec_tt
