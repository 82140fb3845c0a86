// CUDA implementation of torchrec_tt::lossy_encode / lossy_decode (issue 16): host wrappers
// around the kernels of lossy_codec_kernels.cuh and their registration.
//
// The NaN/inf check never synchronises when the caller passes `status` (an int32 device tensor):
// the encode marks bad groups in the output (NaN header, zero codes, so they decode to NaN, never
// to finite garbage) and sets status[0] = 1 on the device; the caller reads it when it likes
// (torchrec_tt.sharding.lossy_codec.NonFiniteFlag copies it to pinned memory behind an event and
// raises on a later poll). Without `status` the op synchronises and raises ValueError.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <optional>

#include "lossy_codec.h"
#include "lossy_codec_kernels.cuh"
#include "lossy_codec_ops.h"

namespace torchrec_tt {
namespace {

using namespace lossy;

constexpr int kThreads = 256;

int sm_count(int dev) {
  static std::atomic<int> cache[64];
  if (dev >= 0 && dev < 64) {
    const int got = cache[dev].load(std::memory_order_relaxed);
    if (got > 0) return got;
  }
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  if (dev >= 0 && dev < 64) cache[dev].store(sms, std::memory_order_relaxed);
  return sms;
}

int64_t grid_for(const KernelArgs& a, int sms) {
  return std::max<int64_t>(1, std::min<int64_t>(a.units, int64_t{sms} * 16));
}

at::Tensor lossy_encode_cuda(const at::Tensor& x_in, at::IntArrayRef bits, int64_t block,
                             int64_t row_bytes, const std::optional<at::Tensor>& status) {
  c10::cuda::CUDAGuard guard(x_in.device());
  EncodeArgs e = check_encode(x_in, bits, block, row_bytes, status);
  const auto opts = x_in.options();
  at::Tensor out = at::empty({e.chunks, row_bytes}, opts.dtype(at::kByte));
  if (empty_codec(e.chunks, e.geo)) return out.zero_();
  if (row_bytes > e.plan.encoded_bytes) {  // the padding is zeros (the kernels write the rest)
    out.narrow(1, e.plan.encoded_bytes, row_bytes - e.plan.encoded_bytes).zero_();
  }
  at::Tensor flag = status.has_value() ? *status : at::zeros({1}, opts.dtype(at::kInt));
  const int dev = x_in.get_device();
  const int sms = sm_count(dev);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev).stream();
  KernelArgs a = base_args(e.geo, e.plan);
  a.x = e.x.data_ptr<float>();
  a.data = out.data_ptr<uint8_t>();
  a.status = flag.data_ptr<int32_t>();
  a.row_bytes = row_bytes;
  a.vec = vec_ok(e.geo, a.x);
  at::Tensor partial;
  for (int64_t g0 = 0; g0 < e.geo.groups; g0 += kLaunchGroups) {
    set_groups(a, e.bits, e.plan, g0);
    plan_tiles(a, e.chunks, int64_t{sms} * (2048 / kThreads), kThreads);
    if (!partial.defined() || partial.numel() < 2 * a.units) {
      partial = at::empty({2 * a.units}, opts.dtype(at::kFloat));
    }
    a.partial = reinterpret_cast<float2*>(partial.data_ptr<float>());
    const unsigned grid = static_cast<unsigned>(grid_for(a, sms));
    lossy_minmax_kernel<kThreads><<<grid, kThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    lossy_pack_kernel<kThreads><<<grid, kThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (!status.has_value()) {  // no status to report into: check now (a host sync)
    TORCH_CHECK_VALUE(flag.item<int32_t>() == 0, kNonFiniteMessage);
  }
  return out;
}

void decode_into_cuda(const DecodeArgs& d, float* y, int dev) {
  const int sms = sm_count(dev);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev).stream();
  KernelArgs a = base_args(d.geo, d.plan);
  a.y = y;
  a.data = const_cast<uint8_t*>(d.data.data_ptr<uint8_t>());
  a.row_bytes = d.data.stride(0);
  a.vec = vec_ok(d.geo, a.y);
  for (int64_t g0 = 0; g0 < d.geo.groups; g0 += kLaunchGroups) {
    set_groups(a, d.bits, d.plan, g0);
    plan_tiles(a, d.chunks, int64_t{sms} * (2048 / kThreads), kThreads);
    const unsigned grid = static_cast<unsigned>(grid_for(a, sms));
    lossy_unpack_kernel<kThreads><<<grid, kThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

at::Tensor lossy_decode_cuda(const at::Tensor& data_in, int64_t rows, int64_t block,
                             at::IntArrayRef bits) {
  c10::cuda::CUDAGuard guard(data_in.device());
  DecodeArgs d = check_decode(data_in, rows, block, bits);
  at::Tensor out =
      at::empty({d.chunks, rows, d.geo.groups * block}, data_in.options().dtype(at::kFloat));
  if (empty_codec(d.chunks, d.geo)) return out.zero_();
  decode_into_cuda(d, out.data_ptr<float>(), data_in.get_device());
  return out;
}

void lossy_decode_into_cuda(const at::Tensor& data_in, int64_t rows, int64_t block,
                            at::IntArrayRef bits, const at::Tensor& out) {
  c10::cuda::CUDAGuard guard(data_in.device());
  DecodeArgs d = check_decode(data_in, rows, block, bits);
  check_decode_out(d, data_in, out);
  if (empty_codec(d.chunks, d.geo)) {
    out.zero_();
    return;
  }
  decode_into_cuda(d, out.data_ptr<float>(), data_in.get_device());
}

}  // namespace

TORCH_LIBRARY_IMPL(torchrec_tt, CUDA, m) {
  m.impl("lossy_encode", &lossy_encode_cuda);
  m.impl("lossy_decode", &lossy_decode_cuda);
  m.impl("lossy_decode_into", &lossy_decode_into_cuda);
}

}  // namespace torchrec_tt
