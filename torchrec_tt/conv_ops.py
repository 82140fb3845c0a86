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
import torch.nn.functional as F
from torch import Tensor

from torchrec_tt import _C  # noqa: F401  (registers the torchrec_tt ops)
from torchrec_tt.validation import check_same_device

__all__ = ["pair", "tt_conv2d", "tt_conv2d_composed", "tt_conv2d_output_size"]


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


def tt_conv2d_composed(
    input: Tensor,
    core0: Tensor,
    core1: Tensor,
    core2: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
) -> Tensor:
    """The same TT convolution as :func:`tt_conv2d`, run as three ``F.conv2d`` calls through
    autograd (cuDNN / oneDNN forward and backward). Autograd saves ``input``, ``t1 = conv(input,
    core0)`` ``[N, r1, H, W]`` and ``t2 = conv(t1, core1)`` ``[N, r2, Ho, Wo]`` for the backward
    (the fused op's backward saves only ``input`` and recomputes ``t1``/``t2``). The output has
    the input's memory format, as :func:`tt_conv2d`'s."""
    t1 = F.conv2d(input, core0)
    t2 = F.conv2d(t1, core1, None, pair(stride, "stride"), pair(padding, "padding"),
                  pair(dilation, "dilation"))
    y = F.conv2d(t2, core2, bias)
    # cuDNN picks channels-last when any operand is (e.g. cores converted by
    # model.to(memory_format=torch.channels_last)); keep the op's rule so both paths agree.
    return y.contiguous(memory_format=_output_memory_format(input))


def _check_conv_args(
    op: str, input: Tensor, core0: Tensor, core1: Tensor, core2: Tensor, bias: Tensor | None,
    stride: list[int], padding: list[int], dilation: list[int],
) -> tuple[int, int]:
    """The checks of ``check_tt_conv2d`` (csrc/conv_cpu.cpp) for the fake (meta) kernels, with
    the same messages; returns the output's ``(Ho, Wo)``."""
    check_same_device(
        op, [("input", input), ("core0", core0), ("core1", core1), ("core2", core2), ("bias", bias)]
    )
    torch._check(
        input.dim() == 4,
        lambda: f"{op}: input must be 4-D [N, C, H, W], got {input.dim()}-D of shape {list(input.shape)}",
    )
    torch._check(
        input.dtype.is_floating_point,
        lambda: f"{op}: input must be a floating-point tensor, got {input.dtype}",
    )
    for name, core in (("core0", core0), ("core1", core1), ("core2", core2)):
        torch._check(
            core.dim() == 4,
            lambda: f"{op}: {name} must be 4-D, got {core.dim()}-D of shape {list(core.shape)}",
        )
        torch._check(
            core.dtype == input.dtype, lambda: f"{op}: {name} is {core.dtype} but input is {input.dtype}"
        )
    torch._check(
        len(stride) == 2 and len(padding) == 2 and len(dilation) == 2,
        lambda: f"{op}: stride, padding and dilation must have 2 entries each, got {stride}, "
        f"{padding}, {dilation}",
    )
    c, r1, r2, k = input.shape[1], core0.shape[0], core1.shape[0], core2.shape[0]
    torch._check(
        core0.shape[1] == c and core0.shape[2] == 1 and core0.shape[3] == 1,
        lambda: f"{op}: core0 must have shape [r1, C={c}, 1, 1], got {list(core0.shape)}",
    )
    torch._check(
        core1.shape[1] == r1,
        lambda: f"{op}: core1 must have shape [r2, r1={r1}, KH, KW], got {list(core1.shape)}",
    )
    torch._check(
        core2.shape[1] == r2 and core2.shape[2] == 1 and core2.shape[3] == 1,
        lambda: f"{op}: core2 must have shape [K, r2={r2}, 1, 1], got {list(core2.shape)}",
    )
    torch._check(
        min(r1, r2, k, c, core1.shape[2], core1.shape[3]) >= 1,
        lambda: f"{op}: ranks, channels and kernel size must be >= 1, got core shapes "
        f"{list(core0.shape)}, {list(core1.shape)}, {list(core2.shape)}",
    )
    if bias is not None:
        torch._check(
            bias.dim() == 1 and bias.shape[0] == k,
            lambda: f"{op}: bias must have shape [K={k}], got {list(bias.shape)}",
        )
        torch._check(
            bias.dtype == input.dtype, lambda: f"{op}: bias is {bias.dtype} but input is {input.dtype}"
        )
    torch._check(min(stride) >= 1, lambda: f"{op}: stride must be >= 1, got {stride}")
    torch._check(min(dilation) >= 1, lambda: f"{op}: dilation must be >= 1, got {dilation}")
    torch._check(min(padding) >= 0, lambda: f"{op}: padding must be >= 0, got {padding}")
    eh = dilation[0] * (core1.shape[2] - 1) + 1
    ew = dilation[1] * (core1.shape[3] - 1) + 1
    ph, pw = input.shape[2] + 2 * padding[0], input.shape[3] + 2 * padding[1]
    torch._check(
        ph >= eh and pw >= ew,
        lambda: f"{op}: padded input {ph}x{pw} is smaller than the dilated kernel {eh}x{ew}",
    )
    return tt_conv2d_output_size(
        input.shape[2], input.shape[3], (core1.shape[2], core1.shape[3]),
        (stride[0], stride[1]), (padding[0], padding[1]), (dilation[0], dilation[1]),
    )


@torch.library.register_fake("torchrec_tt::tt_conv2d")
def _tt_conv2d_fake(
    input: Tensor, core0: Tensor, core1: Tensor, core2: Tensor, bias: Tensor | None,
    stride: list[int], padding: list[int], dilation: list[int],
) -> Tensor:
    ho, wo = _check_conv_args(
        "torchrec_tt::tt_conv2d", input, core0, core1, core2, bias, stride, padding, dilation
    )
    out = input.new_empty((input.shape[0], core2.shape[0], ho, wo))
    return out.contiguous(memory_format=_output_memory_format(input))


@torch.library.register_fake("torchrec_tt::tt_conv2d_backward")
def _tt_conv2d_backward_fake(
    grad_output: Tensor, input: Tensor, core0: Tensor, core1: Tensor, core2: Tensor,
    stride: list[int], padding: list[int], dilation: list[int], output_mask: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    op = "torchrec_tt::tt_conv2d_backward"
    torch._check(len(output_mask) == 4, lambda: f"{op}: output_mask needs 4 entries")
    ho, wo = _check_conv_args(op, input, core0, core1, core2, None, stride, padding, dilation)
    check_same_device(op, [("input", input), ("grad_output", grad_output)])
    want = [input.shape[0], core2.shape[0], ho, wo]
    torch._check(
        grad_output.dim() == 4 and list(grad_output.shape) == want,
        lambda: f"{op}: grad_output must have shape {want}, got {list(grad_output.shape)}",
    )
    torch._check(
        grad_output.dtype == input.dtype,
        lambda: f"{op}: grad_output is {grad_output.dtype} but input is {input.dtype}",
    )
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
