// TT convolution on CPU: argument checks and device-generic compositions of ATen convolutions.
// The CPU backend registers these directly; the CUDA backend (conv_cuda.cu) uses them for the
// cases its fused kernels do not cover.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "checks.h"
#include "conv.h"

namespace torchrec_tt {

namespace {

at::Tensor empty_like_opts(const at::Tensor& ref) { return at::empty({0}, ref.options()); }

void check_core(const char* op, const char* name, const at::Tensor& core,
                const at::Tensor& input) {
  TORCH_CHECK(core.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(core.dim() == 4, op, ": ", name, " must be 4-D, got ", core.dim(),
              "-D of shape ", core.sizes());
  TORCH_CHECK(core.scalar_type() == input.scalar_type(), op, ": ", name, " is ",
              core.scalar_type(), " but input is ", input.scalar_type());
}

}  // namespace

TTConvShape check_tt_conv2d(const char* op, const at::Tensor& input, const at::Tensor& core0,
                            const at::Tensor& core1, const at::Tensor& core2,
                            const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation) {
  SameDeviceCheck(op, "input", input)
      .add("core0", core0)
      .add("core1", core1)
      .add("core2", core2)
      .add("bias", bias.has_value() ? *bias : at::Tensor())
      .check();
  TORCH_CHECK(input.dim() == 4, op, ": input must be 4-D [N, C, H, W], got ", input.dim(),
              "-D of shape ", input.sizes());
  TORCH_CHECK(at::isFloatingType(input.scalar_type()), op,
              ": input must be a floating-point tensor, got ", input.scalar_type());
  check_core(op, "core0", core0, input);
  check_core(op, "core1", core1, input);
  check_core(op, "core2", core2, input);
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
              ": stride, padding and dilation must have 2 entries each, got ", stride, ", ",
              padding, ", ", dilation);
  TTConvShape s{};
  s.N = input.size(0);
  s.C = input.size(1);
  s.H = input.size(2);
  s.W = input.size(3);
  s.r1 = core0.size(0);
  s.r2 = core1.size(0);
  s.K = core2.size(0);
  s.KH = core1.size(2);
  s.KW = core1.size(3);
  s.sh = stride[0];
  s.sw = stride[1];
  s.ph = padding[0];
  s.pw = padding[1];
  s.dh = dilation[0];
  s.dw = dilation[1];
  TORCH_CHECK(core0.size(1) == s.C && core0.size(2) == 1 && core0.size(3) == 1, op,
              ": core0 must have shape [r1, C=", s.C, ", 1, 1], got ", core0.sizes());
  TORCH_CHECK(core1.size(1) == s.r1, op, ": core1 must have shape [r2, r1=", s.r1,
              ", KH, KW], got ", core1.sizes());
  TORCH_CHECK(core2.size(1) == s.r2 && core2.size(2) == 1 && core2.size(3) == 1, op,
              ": core2 must have shape [K, r2=", s.r2, ", 1, 1], got ", core2.sizes());
  TORCH_CHECK(s.r1 >= 1 && s.r2 >= 1 && s.K >= 1 && s.C >= 1 && s.KH >= 1 && s.KW >= 1, op,
              ": ranks, channels and kernel size must be >= 1, got core shapes ", core0.sizes(),
              ", ", core1.sizes(), ", ", core2.sizes());
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == s.K, op, ": bias must have shape [K=", s.K,
                "], got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == input.scalar_type(), op, ": bias is ",
                bias->scalar_type(), " but input is ", input.scalar_type());
  }
  TORCH_CHECK(s.sh >= 1 && s.sw >= 1, op, ": stride must be >= 1, got ", stride);
  TORCH_CHECK(s.dh >= 1 && s.dw >= 1, op, ": dilation must be >= 1, got ", dilation);
  TORCH_CHECK(s.ph >= 0 && s.pw >= 0, op, ": padding must be >= 0, got ", padding);
  const int64_t eh = s.dh * (s.KH - 1) + 1, ew = s.dw * (s.KW - 1) + 1;
  TORCH_CHECK(s.H + 2 * s.ph >= eh && s.W + 2 * s.pw >= ew, op, ": padded input ",
              s.H + 2 * s.ph, "x", s.W + 2 * s.pw, " is smaller than the dilated kernel ", eh,
              "x", ew);
  s.Ho = (s.H + 2 * s.ph - eh) / s.sh + 1;
  s.Wo = (s.W + 2 * s.pw - ew) / s.sw + 1;
  return s;
}

void check_tt_conv2d_grad_output(const char* op, const at::Tensor& grad_output,
                                 const at::Tensor& input, const TTConvShape& s) {
  SameDeviceCheck(op, "input", input).add("grad_output", grad_output).check();
  TORCH_CHECK(grad_output.dim() == 4 && grad_output.size(0) == s.N && grad_output.size(1) == s.K &&
                  grad_output.size(2) == s.Ho && grad_output.size(3) == s.Wo,
              op, ": grad_output must have shape [", s.N, ", ", s.K, ", ", s.Ho, ", ", s.Wo,
              "], got ", grad_output.sizes());
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type(), op, ": grad_output is ",
              grad_output.scalar_type(), " but input is ", input.scalar_type());
}

at::Tensor tt_conv2d_composite(const at::Tensor& input, const at::Tensor& core0,
                               const at::Tensor& core1, const at::Tensor& core2,
                               const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_tt_conv2d("torchrec_tt::tt_conv2d", input, core0, core1, core2, bias, stride, padding,
                  dilation);
  const auto t1 = at::conv2d(input, core0);
  const auto t2 = at::conv2d(t1, core1, {}, stride, padding, dilation);
  auto y = at::conv2d(t2, core2, bias);
  // The fake kernel promises this memory format; ATen's own choice varies by backend.
  return y.contiguous(output_memory_format(input));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> tt_conv2d_backward_composite(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& core0,
    const at::Tensor& core1, const at::Tensor& core2, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, std::array<bool, 4> output_mask) {
  const char* op = "torchrec_tt::tt_conv2d_backward";
  const TTConvShape s =
      check_tt_conv2d(op, input, core0, core1, core2, std::nullopt, stride, padding, dilation);
  check_tt_conv2d_grad_output(op, grad_output, input, s);
  const auto [want_input, want0, want1, want2] = output_mask;
  const std::array<int64_t, 2> one{1, 1}, zero{0, 0};
  const std::array<bool, 3> weight_only{false, true, false};

  at::Tensor t1, t2, g2, g1;
  if (want1 || want2) t1 = at::conv2d(input, core0);
  if (want2) t2 = at::conv2d(t1, core1, {}, stride, padding, dilation);
  if (want_input || want0 || want1) {
    g2 = at::conv2d(grad_output, core2.transpose(0, 1).contiguous());  // [N, r2, Ho, Wo]
  }
  if (want_input || want0) {
    // The transposed convolution maps Ho back to H; output_padding recovers the rows the
    // forward's floor division dropped (always < stride).
    const std::array<int64_t, 2> out_pad{
        s.H - ((s.Ho - 1) * s.sh - 2 * s.ph + s.dh * (s.KH - 1) + 1),
        s.W - ((s.Wo - 1) * s.sw - 2 * s.pw + s.dw * (s.KW - 1) + 1)};
    g1 = at::conv_transpose2d(g2, core1, {}, stride, padding, out_pad, 1, dilation);
  }

  at::Tensor grad_input = empty_like_opts(input), grad0 = empty_like_opts(input),
             grad1 = empty_like_opts(input), grad2 = empty_like_opts(input);
  if (want_input) {
    grad_input = at::conv2d(g1, core0.transpose(0, 1).contiguous())
                     .contiguous(output_memory_format(input));
  }
  if (want0) {
    grad0 = std::get<1>(at::convolution_backward(g1, input, core0, std::nullopt, one, zero, one,
                                                 false, zero, 1, weight_only))
                .contiguous();
  }
  if (want1) {
    grad1 = std::get<1>(at::convolution_backward(g2, t1, core1, std::nullopt, stride, padding,
                                                 dilation, false, zero, 1, weight_only))
                .contiguous();
  }
  if (want2) {
    grad2 = std::get<1>(at::convolution_backward(grad_output, t2, core2, std::nullopt, one, zero,
                                                 one, false, zero, 1, weight_only))
                .contiguous();
  }
  return {grad_input, grad0, grad1, grad2};
}

namespace {

at::Tensor tt_conv2d_cpu(const at::Tensor& input, const at::Tensor& core0, const at::Tensor& core1,
                         const at::Tensor& core2, const std::optional<at::Tensor>& bias,
                         at::IntArrayRef stride, at::IntArrayRef padding,
                         at::IntArrayRef dilation) {
  return tt_conv2d_composite(input, core0, core1, core2, bias, stride, padding, dilation);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> tt_conv2d_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& core0,
    const at::Tensor& core1, const at::Tensor& core2, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, std::array<bool, 4> output_mask) {
  return tt_conv2d_backward_composite(grad_output, input, core0, core1, core2, stride, padding,
                                      dilation, output_mask);
}

std::vector<int64_t> tt_conv2d_kernel_info_cpu(const at::Tensor& input, const at::Tensor& core0,
                                               const at::Tensor& core1, const at::Tensor& core2,
                                               at::IntArrayRef stride, at::IntArrayRef padding,
                                               at::IntArrayRef dilation) {
  check_tt_conv2d("torchrec_tt::tt_conv2d_kernel_info", input, core0, core1, core2, std::nullopt,
                  stride, padding, dilation);
  return {0, 0, 0};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchrec_tt, CPU, m) {
  m.impl("tt_conv2d", &tt_conv2d_cpu);
  m.impl("tt_conv2d_backward", &tt_conv2d_backward_cpu);
  m.impl("tt_conv2d_kernel_info", &tt_conv2d_kernel_info_cpu);
}

}  // namespace torchrec_tt
