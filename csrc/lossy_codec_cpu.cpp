// CPU implementation of torchrec_tt::lossy_encode / lossy_decode (issue 16): the wire format of
// lossy_codec.h, one (chunk, group) per parallel task, two passes over the group's values
// (extremes, then codes) and none over int64 intermediates.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <optional>

#include "lossy_codec.h"
#include "lossy_codec_ops.h"

namespace torchrec_tt {
namespace {

using namespace lossy;

at::Tensor lossy_encode_cpu(const at::Tensor& x_in, at::IntArrayRef bits, int64_t block,
                            int64_t row_bytes, const std::optional<at::Tensor>& status) {
  EncodeArgs a = check_encode(x_in, bits, block, row_bytes, status);
  at::Tensor out = at::zeros({a.chunks, row_bytes}, x_in.options().dtype(at::kByte));
  if (empty_codec(a.chunks, a.geo)) return out;
  const float* x = a.x.data_ptr<float>();
  uint8_t* data = out.data_ptr<uint8_t>();
  const int64_t groups = a.geo.groups;
  std::atomic<bool> bad{false};
  at::parallel_for(0, a.chunks * groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t cg = begin; cg < end; ++cg) {
      const int64_t c = cg / groups, g = cg % groups;
      const bool ok = encode_group_host(x + c * a.geo.chunk_stride(), a.geo, g,
                                        static_cast<int>(a.bits[static_cast<size_t>(g)]),
                                        a.plan, data + c * row_bytes);
      if (!ok) bad.store(true, std::memory_order_relaxed);
    }
  });
  if (bad.load()) {
    // The bad groups are marked in `out` (NaN header, zero codes). With a status tensor the
    // caller decides; without one this is an error, as in the reference codec.
    TORCH_CHECK_VALUE(status.has_value(), kNonFiniteMessage);
    status->data_ptr<int32_t>()[0] = 1;
  }
  return out;
}

void decode_into_cpu(const DecodeArgs& a, float* y) {
  const int64_t groups = a.geo.groups;
  const uint8_t* data = a.data.data_ptr<uint8_t>();
  const int64_t stride = a.data.stride(0);
  at::parallel_for(0, a.chunks * groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t cg = begin; cg < end; ++cg) {
      const int64_t c = cg / groups, g = cg % groups;
      decode_group_host(data + c * stride, a.geo, g,
                        static_cast<int>(a.bits[static_cast<size_t>(g)]), a.plan,
                        y + c * a.geo.chunk_stride());
    }
  });
}

at::Tensor lossy_decode_cpu(const at::Tensor& data_in, int64_t rows, int64_t block,
                            at::IntArrayRef bits) {
  DecodeArgs a = check_decode(data_in, rows, block, bits);
  at::Tensor out =
      at::empty({a.chunks, rows, a.geo.groups * block}, data_in.options().dtype(at::kFloat));
  if (empty_codec(a.chunks, a.geo)) return out.zero_();
  decode_into_cpu(a, out.data_ptr<float>());
  return out;
}

void lossy_decode_into_cpu(const at::Tensor& data_in, int64_t rows, int64_t block,
                           at::IntArrayRef bits, const at::Tensor& out) {
  DecodeArgs a = check_decode(data_in, rows, block, bits);
  check_decode_out(a, data_in, out);
  if (empty_codec(a.chunks, a.geo)) {
    out.zero_();
    return;
  }
  decode_into_cpu(a, out.data_ptr<float>());
}

}  // namespace

TORCH_LIBRARY_IMPL(torchrec_tt, CPU, m) {
  m.impl("lossy_encode", &lossy_encode_cpu);
  m.impl("lossy_decode", &lossy_decode_cpu);
  m.impl("lossy_decode_into", &lossy_decode_into_cpu);
}

}  // namespace torchrec_tt
