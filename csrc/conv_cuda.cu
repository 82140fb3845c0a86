// TT convolution on CUDA: host wrappers around the fused kernels of conv_cuda_kernels.cuh and
// the CUDA registration of torchrec_tt::tt_conv2d / tt_conv2d_backward / tt_conv2d_kernel_info.
//
// What runs where:
//   forward         fused kernel (one launch after a tiny weight-packing launch) for fp32 (with
//                   TF32 allowed for cuDNN, torch.backends.cudnn.allow_tf32, PyTorch's default),
//                   bf16 and fp16; ranks <= 64; C and K multiples of 16 bytes. Otherwise, and for
//                   fp32 with TF32 disallowed, the composition of three cuDNN convolutions.
//   input gradient  when it is the only gradient asked for: the same fused kernel on grad_output
//                   with the transposed cores (1x1 K->r2, flipped KHxKW r2->r1, 1x1 r1->C) when
//                   stride is 1 and padding <= dilation*(kernel-1); otherwise cuDNN.
//   core gradients  cuDNN (conv_cpu.cpp's composition, run on the GPU), which also yields the
//                   input gradient cheaply from the rank-r1 gradient it computes anyway.
// Inputs in NCHW are converted to channels-last for the fused kernels and the output converted
// back, so channels-last inputs are the fast path.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "conv.h"
#include "conv_cuda_kernels.cuh"

namespace torchrec_tt {
namespace {

using namespace ttconv;

struct DeviceLimits {
  int sms;
  int max_smem;
};

DeviceLimits device_limits(int dev) {
  static DeviceLimits cache[64];
  static std::atomic<bool> have[64];
  if (dev >= 0 && dev < 64 && have[dev].load(std::memory_order_acquire)) return cache[dev];
  DeviceLimits d{};
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  if (dev >= 0 && dev < 64) {
    cache[dev] = d;
    have[dev].store(true, std::memory_order_release);
  }
  return d;
}

// TORCHREC_TT_CONV_TILE=THxTW pins the fused kernel's output tile and TORCHREC_TT_CONV_STAGES=2|3|4
// its pipeline depth (for benchmarking); unset, unparsable or unfitting means automatic.
// TORCHREC_TT_CONV_WARPS_N=2|4 pins the fused kernel's column split of the warps (benchmarking).
int forced_wn() {
  const char* e = std::getenv("TORCHREC_TT_CONV_WARPS_N");
  return (e != nullptr && (e[0] == '2' || e[0] == '4') && e[1] == '\0') ? e[0] - '0' : 0;
}

int forced_stages() {
  const char* e = std::getenv("TORCHREC_TT_CONV_STAGES");
  return (e != nullptr && e[0] >= '2' && e[0] <= '4' && e[1] == '\0') ? e[0] - '0' : 0;
}

void forced_tile(int& th, int& tw) {
  th = tw = 0;
  const char* e = std::getenv("TORCHREC_TT_CONV_TILE");
  if (e == nullptr || *e == '\0') return;
  int a = 0, b = 0;
  if (std::sscanf(e, "%dx%d", &a, &b) == 2 && a > 0 && b > 0) {
    th = a;
    tw = b;
  }
}

bool fused_dtype(at::ScalarType t) {
  if (t == at::kBFloat16 || t == at::kHalf) return true;
  // fp32 runs on TF32 tensor cores, which is what cuDNN does for convolutions by default; when
  // the user turns TF32 off we keep full fp32 by using cuDNN.
  return t == at::kFloat && at::globalContext().allowTF32CuDNN();
}

int elem_bytes(at::ScalarType t) { return t == at::kFloat ? 4 : 2; }

bool fits_int(const TTConvShape& s) {
  const int64_t lim = (int64_t{1} << 31) - 1;
  return s.N * std::max(s.H, s.Ho) < lim && s.N * s.H * s.W * s.C < lim &&
         s.N * s.Ho * s.Wo * s.K < lim;
}

FusedGeom forward_geom(const TTConvShape& s) {
  return FusedGeom{static_cast<int>(s.N),  static_cast<int>(s.C),  static_cast<int>(s.H),
                   static_cast<int>(s.W),  static_cast<int>(s.K),  static_cast<int>(s.r1),
                   static_cast<int>(s.r2), static_cast<int>(s.KH), static_cast<int>(s.KW),
                   static_cast<int>(s.sh), static_cast<int>(s.sw), static_cast<int>(s.ph),
                   static_cast<int>(s.pw), static_cast<int>(s.dh), static_cast<int>(s.dw),
                   static_cast<int>(s.Ho), static_cast<int>(s.Wo)};
}

// The input gradient as a stride-1 TT convolution of grad_output: K -> r2 -> r1 -> C.
bool input_grad_geom(const TTConvShape& s, FusedGeom& g) {
  if (s.sh != 1 || s.sw != 1) return false;
  const int64_t ph = s.dh * (s.KH - 1) - s.ph, pw = s.dw * (s.KW - 1) - s.pw;
  if (ph < 0 || pw < 0) return false;
  g = FusedGeom{static_cast<int>(s.N),  static_cast<int>(s.K),  static_cast<int>(s.Ho),
                static_cast<int>(s.Wo), static_cast<int>(s.C),  static_cast<int>(s.r2),
                static_cast<int>(s.r1), static_cast<int>(s.KH), static_cast<int>(s.KW),
                1,
                1,
                static_cast<int>(ph),
                static_cast<int>(pw),
                static_cast<int>(s.dh),
                static_cast<int>(s.dw),
                static_cast<int>(s.H),
                static_cast<int>(s.W)};
  return true;
}

FusedPlan plan_for(const FusedGeom& g, at::ScalarType dtype, int dev) {
  FusedPlan none;
  if (!fused_dtype(dtype)) {
    none.why = "dtype (fp32 with TF32 disallowed, or not fp32/bf16/fp16)";
    return none;
  }
  if (g.N == 0) {
    none.why = "empty batch";
    return none;
  }
  const DeviceLimits lim = device_limits(dev);
  int th, tw;
  forced_tile(th, tw);
  const int st = forced_stages();
  FusedPlan plan =
      plan_fused(g, elem_bytes(dtype), lim.max_smem, lim.sms, th, tw, st, forced_wn());
  if (!plan.ok && (th > 0 || st > 0)) {
    plan = plan_fused(g, elem_bytes(dtype), lim.max_smem, lim.sms, 0, 0, 0, forced_wn());
  }
  return plan;
}

template <typename Tag, int RP, int MT2, int WN>
void launch_fused_t(const FusedPlan& plan, const FusedParams& prm, cudaStream_t stream, int dev) {
  // Raise the dynamic shared-memory limit once per device for this instantiation.
  static std::atomic<uint64_t> configured{0};
  const uint64_t bit = uint64_t{1} << (dev & 63);
  if ((configured.load(std::memory_order_acquire) & bit) == 0) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(tt_conv_fused_kernel<Tag, RP, MT2, WN>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        device_limits(dev).max_smem));
    configured.fetch_or(bit, std::memory_order_acq_rel);
  }
  tt_conv_fused_kernel<Tag, RP, MT2, WN>
      <<<static_cast<unsigned>(plan.blocks), threads_for(WN), plan.smem, stream>>>(prm);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Tag>
void launch_fused(const FusedPlan& plan, const FusedParams& prm, cudaStream_t stream, int dev) {
#define TT_CASE(RP_, MT_, WN_)                                     \
  if (plan.RP == RP_ && plan.MT2 == MT_ && plan.WN == WN_) {       \
    launch_fused_t<Tag, RP_, MT_, WN_>(plan, prm, stream, dev);    \
    return;                                                        \
  }
  TT_CASE(16, 1, 2) TT_CASE(16, 2, 2)
  TT_CASE(32, 1, 2) TT_CASE(32, 2, 2) TT_CASE(32, 1, 4) TT_CASE(32, 2, 4)
  TT_CASE(64, 1, 2) TT_CASE(64, 2, 2) TT_CASE(64, 1, 4) TT_CASE(64, 2, 4)
#undef TT_CASE
  TORCH_CHECK(false, "torchrec_tt: no fused TT-conv kernel for RP=", plan.RP, " MT2=", plan.MT2,
              " WN=", plan.WN);
}

template <typename Tag>
void launch_pack(const PackJob (&jobs)[3], cudaStream_t stream) {
  long long most = 0;
  for (const auto& j : jobs) {
    most = std::max(most, static_cast<long long>(j.taps) * j.ksteps * j.ntiles * 32);
  }
  const unsigned blocks = static_cast<unsigned>(std::min<long long>((most + 255) / 256, 1024));
  tt_conv_pack_kernel<Tag><<<dim3(std::max(blocks, 1u), 3), 256, 0, stream>>>(jobs[0], jobs[1],
                                                                                 jobs[2]);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Runs the fused kernel: x is the NHWC (channels-last) input of geometry g; returns the NHWC
// output as an [N, K, Ho, Wo] channels-last tensor. transposed selects the input-gradient
// packing of the cores (which are the convolution's own, C0 -> K0).
at::Tensor run_fused(const FusedGeom& g, const FusedPlan& plan, bool transposed,
                     const at::Tensor& x_in, const at::Tensor& core0, const at::Tensor& core1,
                     const at::Tensor& core2, const std::optional<at::Tensor>& bias, int C0,
                     int K0, int r1, int r2) {
  // The kernel reads 16-byte vectors: a view whose data pointer is not 16-byte aligned (an odd
  // storage offset) is copied first.
  const at::Tensor x = reinterpret_cast<uintptr_t>(x_in.data_ptr()) % 16 == 0
                           ? x_in
                           : x_in.clone(at::MemoryFormat::ChannelsLast);
  const auto dtype = x.scalar_type();
  const int bytes = elem_bytes(dtype);
  const int dev = x.get_device();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev).stream();
  const auto c0 = core0.contiguous(), c1 = core1.contiguous(), c2 = core2.contiguous();
  FusedGeom gsz{};
  gsz.C = g.C;
  gsz.K = g.K;
  gsz.KH = g.KH;
  gsz.KW = g.KW;
  const PackSizes sz = pack_sizes(gsz, plan.RP, bytes);
  auto packed = at::empty({2 * (sz.w1 + sz.w2 + sz.w3)}, x.options().dtype(at::kInt));
  uint2* w = reinterpret_cast<uint2*>(packed.data_ptr<int32_t>());
  PackJob jobs[3];
  make_pack_jobs(jobs, transposed, c0.data_ptr(), c1.data_ptr(), c2.data_ptr(), C0, K0, r1, r2,
                 g.KH, g.KW, plan.RP, bytes, w);
  at::Tensor bias_f;
  if (bias.has_value() && bias->defined()) bias_f = bias->to(at::kFloat).contiguous();
  auto y = at::empty({g.N, g.K, g.Ho, g.Wo}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  const FusedParams prm = make_params(g, plan, bytes, x.data_ptr(), y.data_ptr(), w, w + sz.w1,
                                      w + sz.w1 + sz.w2,
                                      bias_f.defined() ? bias_f.data_ptr<float>() : nullptr);
  switch (dtype) {
    case at::kFloat:
      launch_pack<TagF32>(jobs, stream);
      launch_fused<TagF32>(plan, prm, stream, dev);
      break;
    case at::kBFloat16:
      launch_pack<TagBF16>(jobs, stream);
      launch_fused<TagBF16>(plan, prm, stream, dev);
      break;
    case at::kHalf:
      launch_pack<TagF16>(jobs, stream);
      launch_fused<TagF16>(plan, prm, stream, dev);
      break;
    default:
      TORCH_CHECK(false, "torchrec_tt: unexpected dtype ", dtype);
  }
  return y;
}

void check_cuda_args(const char* op, const at::Tensor& input) {
  TORCH_CHECK(input.is_cuda(), op, ": input must be a CUDA tensor, got ", input.device());
}

at::Tensor tt_conv2d_cuda(const at::Tensor& input, const at::Tensor& core0,
                          const at::Tensor& core1, const at::Tensor& core2,
                          const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation) {
  const char* op = "torchrec_tt::tt_conv2d";
  check_cuda_args(op, input);
  const TTConvShape s =
      check_tt_conv2d(op, input, core0, core1, core2, bias, stride, padding, dilation);
  c10::cuda::CUDAGuard guard(input.device());
  const FusedGeom g = forward_geom(s);
  const FusedPlan plan = fits_int(s) ? plan_for(g, input.scalar_type(), input.get_device())
                                     : FusedPlan{};
  if (!plan.ok) {
    return tt_conv2d_composite(input, core0, core1, core2, bias, stride, padding, dilation);
  }
  const auto x = input.contiguous(at::MemoryFormat::ChannelsLast);
  auto y = run_fused(g, plan, false, x, core0, core1, core2, bias, g.C, g.K, g.r1, g.r2);
  return y.contiguous(output_memory_format(input));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> tt_conv2d_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& core0,
    const at::Tensor& core1, const at::Tensor& core2, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, std::array<bool, 4> output_mask) {
  const char* op = "torchrec_tt::tt_conv2d_backward";
  check_cuda_args(op, input);
  const TTConvShape s =
      check_tt_conv2d(op, input, core0, core1, core2, std::nullopt, stride, padding, dilation);
  check_tt_conv2d_grad_output(op, grad_output, input, s);
  c10::cuda::CUDAGuard guard(input.device());

  // Input gradient alone: the fused kernel on grad_output (one read of grad_output, one write of
  // grad_input). When core gradients are wanted too, the composition computes the rank-r1
  // gradient g1 anyway, and grad_input = g1 . core0 (a 1x1 convolution from r1 channels) is
  // cheaper than a second pass over grad_output.
  const bool input_only = output_mask[0] && !output_mask[1] && !output_mask[2] && !output_mask[3];
  FusedGeom gi{};
  if (input_only && fits_int(s) && input_grad_geom(s, gi)) {
    const FusedPlan plan = plan_for(gi, input.scalar_type(), input.get_device());
    if (plan.ok) {
      const auto go = grad_output.contiguous(at::MemoryFormat::ChannelsLast);
      auto grad_input = run_fused(gi, plan, true, go, core0, core1, core2, std::nullopt,
                                  static_cast<int>(s.C), static_cast<int>(s.K),
                                  static_cast<int>(s.r1), static_cast<int>(s.r2))
                            .contiguous(output_memory_format(input));
      const auto empty = at::empty({0}, input.options());
      return {grad_input, empty, empty, empty};
    }
  }
  return tt_conv2d_backward_composite(grad_output, input, core0, core1, core2, stride, padding,
                                      dilation, output_mask);
}

std::vector<int64_t> tt_conv2d_kernel_info_cuda(const at::Tensor& input, const at::Tensor& core0,
                                                const at::Tensor& core1, const at::Tensor& core2,
                                                at::IntArrayRef stride, at::IntArrayRef padding,
                                                at::IntArrayRef dilation) {
  const char* op = "torchrec_tt::tt_conv2d_kernel_info";
  check_cuda_args(op, input);
  const TTConvShape s =
      check_tt_conv2d(op, input, core0, core1, core2, std::nullopt, stride, padding, dilation);
  c10::cuda::CUDAGuard guard(input.device());
  const int dev = input.get_device();
  const bool fwd = fits_int(s) && plan_for(forward_geom(s), input.scalar_type(), dev).ok;
  FusedGeom gi{};
  const bool igrad = fits_int(s) && input_grad_geom(s, gi) &&
                     plan_for(gi, input.scalar_type(), dev).ok;
  return {fwd ? 1 : 0, igrad ? 1 : 0, 0};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchrec_tt, CUDA, m) {
  m.impl("tt_conv2d", &tt_conv2d_cuda);
  m.impl("tt_conv2d_backward", &tt_conv2d_backward_cuda);
  m.impl("tt_conv2d_kernel_info", &tt_conv2d_kernel_info_cuda);
}

}  // namespace torchrec_tt
