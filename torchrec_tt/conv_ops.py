"""Python side of the TT convolution ops: the wrapper :func:`tt_conv2d`, fake (meta) kernels and
autograd for ``torchrec_tt::tt_conv2d`` / ``torchrec_tt::tt_conv2d_backward``.

The schemas are in ``csrc/ops.cpp``; the CPU kernels (compositions of ATen convolutions) in
``csrc/conv_cpu.cpp`` and the CUDA kernels (fused, tensor cores) in ``csrc/conv_cuda.cu``.
A D×D convolution C→K in TT form with ranks (r1, r2) is three convolutions:
1×1 C→r1 (``core0 [r1, C, 1, 1]``), D×D r1→r2 carrying stride/padding/dilation
(``core1 [r2, r1, D, D]``) and 1×1 r2→K (``core2 [K, r2, 1, 1]``), plus an optional bias.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from torchrec_tt import _C  # noqa: F401  (registers the torchrec_tt ops)

__all__ = ["pair", "tt_conv2d", "tt_conv2d_output_size"]


def pair(v: int | tuple[int, ...] | list[int], name: str = "value") -> tuple[int, int]:
    """``v`` as an ``(h, w)`` pair of ints; a single int is used for both."""
    if isinstance(v, int) and not isinstance(v, bool):
        return (v, v)
    t = tuple(v)
    if len(t) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in t):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return (int(t[0]), int(t[1]))


def tt_conv2d_output_size(
    h: int, w: int, kernel_size: tuple[int, int], stride: tuple[int, int],
    padding: tuple[int, int], dilation: tuple[int, int],
) -> tuple[int, int]:
    """Output height and width of the convolution (as ``nn.Conv2d``)."""
    ho = (h + 2 * padding[0] - dilation[0] * (kernel_size[0] - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kernel_size[1] - 1) - 1) // stride[1] + 1
    return ho, wo


def _output_memory_format(x: Tensor) -> torch.memory_format:
    # Must match output_memory_format() in csrc/conv_cpu.cpp and conv_cuda.cu.
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def tt_conv2d(
    input: Tensor,
    core0: Tensor,
    core1: Tensor,
    core2: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
) -> Tensor:
    """TT convolution of ``input [N, C, H, W]``; differentiable in the input, cores and bias.

    Equal (up to rounding) to ``F.conv2d(input, W, bias, stride, padding, dilation)`` with
    ``W[k, c, i, j] = sum_{a, b} core2[k, b] core1[b, a, i, j] core0[a, c]``. The output has
    the input's memory format (channels-last in, channels-last out).
    """
    return torch.ops.torchrec_tt.tt_conv2d(
        input, core0, core1, core2, bias,
        list(pair(stride, "stride")), list(pair(padding, "padding")),
        list(pair(dilation, "dilation")),
    )


@torch.library.register_fake("torchrec_tt::tt_conv2d")
def _tt_conv2d_fake(
    input: Tensor, core0: Tensor, core1: Tensor, core2: Tensor, bias: Tensor | None,
    stride: list[int], padding: list[int], dilation: list[int],
) -> Tensor:
    torch._check(input.dim() == 4, lambda: "tt_conv2d: input must be 4-D [N, C, H, W]")
    for name, core in (("core0", core0), ("core1", core1), ("core2", core2)):
        torch._check(core.dim() == 4, lambda: f"tt_conv2d: {name} must be 4-D")
        torch._check(core.dtype == input.dtype, lambda: f"tt_conv2d: {name} dtype differs from input")
    torch._check(core0.shape[1] == input.shape[1], lambda: "tt_conv2d: core0 must be [r1, C, 1, 1]")
    torch._check(core1.shape[1] == core0.shape[0], lambda: "tt_conv2d: core1 must be [r2, r1, KH, KW]")
    torch._check(core2.shape[1] == core1.shape[0], lambda: "tt_conv2d: core2 must be [K, r2, 1, 1]")
    ho, wo = tt_conv2d_output_size(
        input.shape[2], input.shape[3], (core1.shape[2], core1.shape[3]),
        (stride[0], stride[1]), (padding[0], padding[1]), (dilation[0], dilation[1]),
    )
    torch._check(ho >= 1 and wo >= 1, lambda: "tt_conv2d: output would be empty")
    out = input.new_empty((input.shape[0], core2.shape[0], ho, wo))
    return out.contiguous(memory_format=_output_memory_format(input))


@torch.library.register_fake("torchrec_tt::tt_conv2d_backward")
def _tt_conv2d_backward_fake(
    grad_output: Tensor, input: Tensor, core0: Tensor, core1: Tensor, core2: Tensor,
    stride: list[int], padding: list[int], dilation: list[int], output_mask: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    torch._check(len(output_mask) == 4, lambda: "tt_conv2d_backward: output_mask needs 4 entries")
    empty = input.new_empty((0,))
    grad_input = (
        torch.empty_like(input, memory_format=_output_memory_format(input))
        if output_mask[0] else empty
    )
    grads = [
        torch.empty_like(c, memory_format=torch.contiguous_format) if m else input.new_empty((0,))
        for c, m in zip((core0, core1, core2), output_mask[1:])
    ]
    return grad_input, grads[0], grads[1], grads[2]


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    input, core0, core1, core2, bias, stride, padding, dilation = inputs
    ctx.conv_args = (list(stride), list(padding), list(dilation))
    ctx.has_bias = bias is not None
    ctx.save_for_backward(input, core0, core1, core2)


def _backward(ctx: Any, grad_output: Tensor) -> tuple[Any, ...]:
    input, core0, core1, core2 = ctx.saved_tensors
    mask = [bool(ctx.needs_input_grad[i]) for i in range(4)]
    grads: list[Tensor | None] = [None] * 4
    if any(mask):
        out = torch.ops.torchrec_tt.tt_conv2d_backward(
            grad_output, input, core0, core1, core2, *ctx.conv_args, mask
        )
        grads = [g if m else None for g, m in zip(out, mask)]
    grad_bias = None
    if ctx.has_bias and ctx.needs_input_grad[4]:
        grad_bias = grad_output.sum(dim=(0, 2, 3))
    return (*grads, grad_bias, None, None, None)


torch.library.register_autograd(
    "torchrec_tt::tt_conv2d", _backward, setup_context=_setup_context
)
