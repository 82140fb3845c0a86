// TT convolution: a KH x KW convolution from C to K channels whose weight is held as three
// cores, run as three convolutions
//   1x1 C -> r1 (core0 [r1, C, 1, 1]),
//   KHxKW r1 -> r2 with stride/padding/dilation (core1 [r2, r1, KH, KW]),
//   1x1 r2 -> K (core2 [K, r2, 1, 1]) plus an optional bias [K].
// The dense weight they stand for is W[k, c, i, j] = sum_{a,b} core2[k,b] core1[b,a,i,j] core0[a,c].
// Schemas are in ops.cpp; the CPU registration is in conv_cpu.cpp, the CUDA one in conv_cuda.cu.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <tuple>

namespace torchrec_tt {

// Shapes of one call, validated by check_tt_conv2d (which throws c10::Error with a message that
// names the offending argument).
struct TTConvShape {
  int64_t N, C, H, W;   // input
  int64_t r1, r2;       // ranks
  int64_t K, KH, KW;    // output channels, kernel size
  int64_t Ho, Wo;       // output size
  int64_t sh, sw, ph, pw, dh, dw;
};

TTConvShape check_tt_conv2d(const char* op, const at::Tensor& input, const at::Tensor& core0,
                            const at::Tensor& core1, const at::Tensor& core2,
                            const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation);

// Checks grad_output against the forward's shapes (throws c10::Error naming what is wrong).
void check_tt_conv2d_grad_output(const char* op, const at::Tensor& grad_output,
                                 const at::Tensor& input, const TTConvShape& s);

// Memory format of the output (and of grad_input): channels-last when the input is channels-last
// (and not also plain contiguous), else contiguous. torchrec_tt/conv_ops.py's fake kernels use
// the same rule.
inline at::MemoryFormat output_memory_format(const at::Tensor& input) {
  return input.is_contiguous(at::MemoryFormat::ChannelsLast) && !input.is_contiguous()
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

// Device-generic compositions of ATen convolutions (the CPU kernels; the CUDA backend falls back
// to them for what its fused kernels do not cover). Masked-off gradients come back as empty
// tensors (numel 0).
at::Tensor tt_conv2d_composite(const at::Tensor& input, const at::Tensor& core0,
                               const at::Tensor& core1, const at::Tensor& core2,
                               const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> tt_conv2d_backward_composite(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& core0,
    const at::Tensor& core1, const at::Tensor& core2, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, std::array<bool, 4> output_mask);

}  // namespace torchrec_tt
