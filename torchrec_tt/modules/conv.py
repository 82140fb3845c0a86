"""TTConv2d: a 2-D convolution whose weight is a Tensor Train of three cores.

A D×D convolution C→K in TT form with ranks (r1, r2) is three small convolutions, run by one op
(``torchrec_tt::tt_conv2d``; fused on CUDA):

    1×1 C→r1 (core0 [r1, C, 1, 1]) → D×D r1→r2 with stride/padding/dilation
    (core1 [r2, r1, D, D]) → 1×1 r2→K (core2 [K, r2, 1, 1]) → + bias

so ``W[k, c, i, j] = sum_{a, b} core2[k, b] core1[b, a, i, j] core0[a, c]``.

Each call runs either the fused op or the same three convolutions as ``F.conv2d`` calls through
autograd (cuDNN's forward and backward), whichever :mod:`torchrec_tt.conv_dispatch` picks for the
call: the module's ``path``, the process-wide setting, a measured plan or the default.

Ranks larger than the shapes allow (r1 > min(C, K·KH·KW), r2 > min(K, r1·KH·KW)) add nothing
that a smaller rank cannot represent: they are clamped to those maxima with a ``UserWarning``
(in the constructor and in :meth:`TTConv2d.from_conv` alike). Ranks < 1, ``groups != 1`` and
unknown ``padding_mode`` values raise ``ValueError``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchrec_tt import conv_dispatch
from torchrec_tt.conv_ops import pair, tt_conv2d, tt_conv2d_composed, tt_conv2d_output_size
from torchrec_tt.validation import check_number, check_same_device

__all__ = ["TTConv2d", "max_tt_conv_ranks", "tt_svd_conv_weight"]

_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
_PATH_FNS = {"fused": tt_conv2d, "composed": tt_conv2d_composed}


def max_tt_conv_ranks(
    in_channels: int, out_channels: int, kernel_size: tuple[int, int], r1: int | None = None
) -> tuple[int, int]:
    """The largest useful ranks ``(r1_max, r2_max)``: beyond them the TT form is already exact.

    ``r1_max = min(C, K·KH·KW)``; ``r2_max = min(K, r1·KH·KW)`` with ``r1`` (default ``r1_max``).
    """
    kk = kernel_size[0] * kernel_size[1]
    r1_max = min(in_channels, out_channels * kk)
    r1_eff = r1_max if r1 is None else min(r1, r1_max)
    return r1_max, min(out_channels, r1_eff * kk)


def _clamp_ranks(
    ranks: int | Sequence[int], in_channels: int, out_channels: int,
    kernel_size: tuple[int, int], who: str,
) -> tuple[int, int]:
    r = pair(ranks, "ranks")
    if r[0] < 1 or r[1] < 1:
        raise ValueError(f"{who}: ranks must be >= 1, got {tuple(r)}")
    r1_max, _ = max_tt_conv_ranks(in_channels, out_channels, kernel_size)
    r1 = min(r[0], r1_max)
    r2 = min(r[1], max_tt_conv_ranks(in_channels, out_channels, kernel_size, r1)[1])
    if (r1, r2) != tuple(r):
        warnings.warn(
            f"{who}: ranks {tuple(r)} exceed what a {in_channels}->{out_channels} "
            f"{kernel_size[0]}x{kernel_size[1]} convolution allows; clamped to ({r1}, {r2}), "
            "which is already exact",
            UserWarning,
            stacklevel=3,
        )
    return r1, r2


def tt_svd_conv_weight(
    weight: Tensor, ranks: int | Sequence[int]
) -> tuple[Tensor, Tensor, Tensor]:
    """TT-SVD of a dense ``[K, C, KH, KW]`` weight into ``(core0, core1, core2)``.

    Two truncated SVDs (in float64): ``W`` as ``[C, KH·KW·K]`` gives core0 (the top ``r1`` left
    singular vectors); the remainder ``S·Vᵀ`` as ``[r1·KH·KW, K]`` gives core1 (left singular
    vectors) and core2 (singular values × right vectors). Ranks are clamped (with a warning) to
    :func:`max_tt_conv_ranks`; at those maxima the reconstruction is exact up to rounding.
    Cores are returned in float64 on ``weight``'s device.
    """
    if weight.dim() != 4:
        raise ValueError(f"tt_svd_conv_weight: weight must be [K, C, KH, KW], got {tuple(weight.shape)}")
    k, c, kh, kw = weight.shape
    r1, r2 = _clamp_ranks(ranks, c, k, (kh, kw), "tt_svd_conv_weight")
    w = weight.detach().to(torch.float64)
    m1 = w.permute(1, 2, 3, 0).reshape(c, kh * kw * k)  # rows: c; cols: (i, j, k)
    u1, s1, v1h = torch.linalg.svd(m1, full_matrices=False)
    r1 = min(r1, s1.numel())
    core0 = u1[:, :r1].T.contiguous()  # [r1, C]
    rest = s1[:r1, None] * v1h[:r1]  # [r1, KH*KW*K]
    m2 = rest.reshape(r1 * kh * kw, k)  # rows: (a, i, j); cols: k
    u2, s2, v2h = torch.linalg.svd(m2, full_matrices=False)
    r2 = min(r2, s2.numel())
    core1 = u2[:, :r2].reshape(r1, kh, kw, r2).permute(3, 0, 1, 2).contiguous()  # [r2, r1, KH, KW]
    core2 = (s2[:r2, None] * v2h[:r2]).T.contiguous()  # [K, r2]
    return core0[:, :, None, None], core1, core2[:, :, None, None]


class TTConv2d(nn.Module):
    """``nn.Conv2d`` with its weight in TT form (three cores), run by the fused op or by three
    cuDNN convolutions, whichever is faster.

    Args:
        in_channels (int): C.
        out_channels (int): K.
        kernel_size (int | tuple[int, int]): KH, KW.
        stride, padding, dilation: as ``nn.Conv2d`` (``padding`` may be an int, a pair,
            ``"valid"`` or ``"same"``; ``"same"`` needs stride 1 and an even
            ``dilation·(kernel-1)``).
        bias (bool): learnable bias [K].
        ranks (int | tuple[int, int]): TT ranks (r1, r2); clamped with a warning to the maxima of
            :func:`max_tt_conv_ranks`.
        groups (int): must be 1 (grouped convolutions are not supported: ``ValueError``).
        padding_mode (str): ``"zeros"`` (fused in the op) or ``"reflect"``, ``"replicate"``,
            ``"circular"`` (applied to the input before the op, which is exact because the first
            core is a 1×1 convolution).
        path (str): ``"auto"`` (default: :mod:`torchrec_tt.conv_dispatch` decides: its
            ``settings.path``, else a measured plan when ``settings.benchmark`` is on, else the
            default, the composition), ``"fused"`` (always the op ``torchrec_tt::tt_conv2d``) or
            ``"composed"`` (always three ``F.conv2d`` through autograd). Both give the same
            result up to rounding; settable later (``conv.path = "fused"``).
        device, dtype: of the parameters.

    Parameters are ``core0 [r1, C, 1, 1]``, ``core1 [r2, r1, KH, KW]``, ``core2 [K, r2, 1, 1]``
    and ``bias [K]``. Under ``torch.autocast`` the layer runs in the autocast dtype (like
    ``nn.Conv2d``). Initialisation gives the reconstructed weight the variance of
    ``nn.Conv2d``'s default, ``1 / (3·fan_in)``, and the same bias distribution.

    Example::

        conv = TTConv2d(160, 160, 3, padding=1, ranks=(32, 32))
        y = conv(torch.randn(8, 160, 32, 32))          # [8, 160, 32, 32]
        tt = TTConv2d.from_conv(trained_conv, ranks=32)  # TT-SVD of a trained layer
        print(conv.compression_ratio(), conv.flops((32, 32)))
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = True,
        ranks: int | tuple[int, int] = (32, 32),
        *,
        groups: int = 1,
        padding_mode: str = "zeros",
        path: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            check_number(name, value, low=1, integer=True, where="TTConv2d")
        if groups != 1:
            raise ValueError(
                f"TTConv2d: groups={groups} is not supported; the TT cores couple all channels, "
                "so only groups=1 can be represented"
            )
        if padding_mode not in _PADDING_MODES:
            raise ValueError(
                f"TTConv2d: padding_mode must be one of {_PADDING_MODES}, got {padding_mode!r}"
            )
        self._path = conv_dispatch.check_conv_path(path, where="TTConv2d")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = pair(kernel_size, "kernel_size")
        self.stride = pair(stride, "stride")
        self.dilation = pair(dilation, "dilation")
        if min(self.kernel_size) < 1 or min(self.stride) < 1 or min(self.dilation) < 1:
            raise ValueError(
                f"TTConv2d: kernel_size, stride and dilation must be >= 1, got "
                f"{self.kernel_size}, {self.stride}, {self.dilation}"
            )
        self.padding = self._resolve_padding(padding)
        self.padding_mode = padding_mode
        self.groups = 1
        self.ranks = _clamp_ranks(ranks, in_channels, out_channels, self.kernel_size, "TTConv2d")
        r1, r2 = self.ranks
        kh, kw = self.kernel_size
        factory = {"device": device, "dtype": dtype}
        self.core0 = nn.Parameter(torch.empty(r1, in_channels, 1, 1, **factory))
        self.core1 = nn.Parameter(torch.empty(r2, r1, kh, kw, **factory))
        self.core2 = nn.Parameter(torch.empty(out_channels, r2, 1, 1, **factory))
        if bias:
            self.bias: nn.Parameter | None = nn.Parameter(torch.empty(out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    @property
    def path(self) -> str:
        """``"auto"``, ``"fused"`` or ``"composed"`` (see the class docstring)."""
        return self._path

    @path.setter
    def path(self, value: str) -> None:
        self._path = conv_dispatch.check_conv_path(value, where="TTConv2d.path")

    def _resolve_padding(self, padding: int | tuple[int, int] | str) -> tuple[int, int]:
        if isinstance(padding, str):
            if padding == "valid":
                return (0, 0)
            if padding == "same":
                if self.stride != (1, 1):
                    raise ValueError("TTConv2d: padding='same' needs stride 1")
                total = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size)]
                if any(t % 2 for t in total):
                    raise ValueError(
                        "TTConv2d: padding='same' with an odd total padding "
                        f"{tuple(total)} (asymmetric) is not supported"
                    )
                return (total[0] // 2, total[1] // 2)
            raise ValueError(f"TTConv2d: padding must be an int, a pair, 'valid' or 'same', got {padding!r}")
        p = pair(padding, "padding")
        if min(p) < 0:
            raise ValueError(f"TTConv2d: padding must be >= 0, got {p}")
        return p

    def reset_parameters(self) -> None:
        """Independent normal cores whose product has ``nn.Conv2d``'s default weight variance."""
        if self.core0.is_meta:
            return
        r1, r2 = self.ranks
        kk = self.kernel_size[0] * self.kernel_size[1]
        fan_in = self.in_channels * kk
        with torch.no_grad():
            # Var(W) = r1·r2·σ0²·σ1²·σ2² = (1/3) / fan_in.
            nn.init.normal_(self.core0, std=1.0 / math.sqrt(self.in_channels))
            nn.init.normal_(self.core1, std=1.0 / math.sqrt(r1 * kk))
            nn.init.normal_(self.core2, std=math.sqrt(1.0 / (3.0 * r2)))
            if self.bias is not None:
                bound = 1.0 / math.sqrt(fan_in)
                nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_conv(
        cls, conv: nn.Conv2d, ranks: int | tuple[int, int], *, path: str = "auto"
    ) -> TTConv2d:
        """A TTConv2d initialised by TT-SVD of a (trained) ``nn.Conv2d``, with its options
        (``path`` as in the constructor).

        Ranks are clamped with a warning to what the shapes allow (where the result is exact).
        ``groups != 1`` raises ``ValueError``; transposed convolutions raise ``TypeError``.
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"TTConv2d.from_conv: expected nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(
                f"TTConv2d.from_conv: groups={conv.groups} is not supported (only groups=1)"
            )
        padding = conv.padding if isinstance(conv.padding, str) else tuple(conv.padding)
        weight = conv.weight
        k, c, kh, kw = weight.shape
        r = _clamp_ranks(ranks, c, k, (kh, kw), "TTConv2d.from_conv")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # already warned about the clamp
            tt = cls(
                c, k, (kh, kw), stride=tuple(conv.stride), padding=padding,
                dilation=tuple(conv.dilation), bias=conv.bias is not None, ranks=r,
                padding_mode=conv.padding_mode, path=path, device=weight.device,
                dtype=weight.dtype,
            )
            cores = tt_svd_conv_weight(weight, r)
        with torch.no_grad():
            for p, v in zip((tt.core0, tt.core1, tt.core2), cores):
                if p.shape != v.shape:  # the SVD had fewer singular values than the clamp
                    raise RuntimeError(f"TTConv2d.from_conv: core shape {tuple(v.shape)} != {tuple(p.shape)}")
                p.copy_(v)
            if conv.bias is not None and tt.bias is not None:
                tt.bias.copy_(conv.bias)
        return tt

    def cores(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.core0, self.core1, self.core2

    def full_weight(self) -> Tensor:
        """The dense ``[K, C, KH, KW]`` weight the cores stand for (differentiable)."""
        return torch.einsum(
            "kb,baij,ac->kcij", self.core2[:, :, 0, 0], self.core1, self.core0[:, :, 0, 0]
        )

    def forward(self, input: Tensor) -> Tensor:
        x, cores, bias, padding = self._prepare(input)
        path = self._choose_path(x, cores, bias, padding)
        y = _PATH_FNS[path](x, *cores, bias, self.stride, padding, self.dilation)
        return y.squeeze(0) if input.dim() == 3 else y

    def path_for(self, input: Tensor) -> str:
        """``"fused"`` or ``"composed"``: what :meth:`forward` runs for ``input`` in the current
        grad mode and autocast state (measuring a plan first if benchmarking is on and the call's
        key has none)."""
        x, cores, bias, padding = self._prepare(input)
        return self._choose_path(x, cores, bias, padding)

    def _prepare(
        self, input: Tensor
    ) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor], Tensor | None, tuple[int, int]]:
        """The checked 4-D input, the cores and bias in the compute dtype, and the padding left
        for the convolution (non-zero padding modes are applied to the input here)."""
        if input.dim() not in (3, 4):
            raise ValueError(
                f"TTConv2d: expected a 3-D [C, H, W] or 4-D [N, C, H, W] input, got shape {tuple(input.shape)}"
            )
        if input.shape[-3] != self.in_channels:
            raise ValueError(
                f"TTConv2d: expected {self.in_channels} input channels, got {input.shape[-3]} "
                f"(input shape {tuple(input.shape)})"
            )
        x = input.unsqueeze(0) if input.dim() == 3 else input
        cores, bias = (self.core0, self.core1, self.core2), self.bias
        # The op checks these itself; the composition would fail inside F.conv2d with a message
        # that names neither the layer nor the tensor.
        dev = x.device
        if not (cores[0].device == dev and cores[1].device == dev and cores[2].device == dev
                and (bias is None or bias.device == dev)):
            check_same_device(
                "TTConv2d",
                [("input", x), ("core0", cores[0]), ("core1", cores[1]), ("core2", cores[2]),
                 ("bias", bias)],
            )
        padding = self.padding
        if self.padding_mode != "zeros" and padding != (0, 0):
            # Exact: the 1×1 first core commutes with any spatial padding of its input.
            ph, pw = padding
            x = F.pad(x, (pw, pw, ph, ph), mode=self.padding_mode)
            padding = (0, 0)
        kind = dev.type
        if kind in ("cuda", "cpu") and torch.is_autocast_enabled(kind):
            # Custom ops are not autocast-aware; run in the autocast dtype, as nn.Conv2d does
            # (both paths alike, so they agree).
            dt = torch.get_autocast_dtype(kind)
            x = x.to(dt)
            cores = tuple(c.to(dt) for c in cores)  # type: ignore[assignment]
            bias = bias.to(dt) if bias is not None else None
        if x.dtype != cores[0].dtype or (bias is not None and bias.dtype != x.dtype):
            raise RuntimeError(
                f"TTConv2d: input is {x.dtype} but the layer's parameters are {cores[0].dtype}"
                + (f" (bias {bias.dtype})" if bias is not None else "")
            )
        return x, cores, bias, padding

    def _geometry(self, padding: tuple[int, int]) -> tuple:
        return (self.in_channels, self.out_channels, *self.ranks, *self.kernel_size, self.stride,
                padding, self.dilation, self.bias is not None)

    def plans(self) -> dict[conv_dispatch.ConvPlanKey, conv_dispatch.ConvPlan]:
        """The measured plans (:func:`torchrec_tt.conv_dispatch.plans`) that apply to this layer:
        those of its geometry, for every device, dtype and input shape measured so far."""
        padding = self.padding if self.padding_mode == "zeros" else (0, 0)
        geometry = self._geometry(padding)
        return {k: v for k, v in conv_dispatch.plans().items() if k.geometry == geometry}

    def _choose_path(
        self, x: Tensor, cores: tuple[Tensor, Tensor, Tensor], bias: Tensor | None,
        padding: tuple[int, int],
    ) -> str:
        train = torch.is_grad_enabled() and (
            x.requires_grad or cores[0].requires_grad or cores[1].requires_grad
            or cores[2].requires_grad or (bias is not None and bias.requires_grad)
        )
        if torch.compiler.is_compiling():
            # A trace-time constant (no graph break, no guard on the plan cache).
            return conv_dispatch.choose_traced(
                self._path, str(x.device), str(x.dtype), train, self._geometry(padding)
            )
        requested = conv_dispatch.requested_path(self._path)
        if requested != "auto":
            return requested

        def make_key() -> conv_dispatch.ConvPlanKey:
            return conv_dispatch.ConvPlanKey(
                str(x.device), str(x.dtype), conv_dispatch.tf32_enabled(), train,
                self._geometry(padding),
                (x.shape[0], x.shape[2], x.shape[3], _is_channels_last(x)),
            )

        # No timing (and no synchronisation) while a CUDA graph is captured or a TorchScript
        # trace records: the cached plan or the default is used there. Only CPU and CUDA have
        # both paths (and real timings: not meta).
        can_measure = x.device.type in ("cpu", "cuda") and not torch.jit.is_tracing() and not (
            x.is_cuda and torch.cuda.is_current_stream_capturing()
        )
        measure = (
            (lambda: self._measure(x, cores, bias, padding, train)) if can_measure else None
        )
        return conv_dispatch.choose_auto(x.device, train, make_key, measure)

    def _measure(
        self, x: Tensor, cores: tuple[Tensor, Tensor, Tensor], bias: Tensor | None,
        padding: tuple[int, int], train: bool,
    ) -> conv_dispatch.ConvPlan:
        """Times both paths on detached copies of this call's tensors (the parameters' .grad
        and autograd state are untouched; no random numbers are drawn)."""
        def leaf(t: Tensor) -> Tensor:
            return t.detach().requires_grad_(train and t.requires_grad)

        xl, cl, bl = leaf(x), tuple(leaf(c) for c in cores), (leaf(bias) if bias is not None else None)
        wrt = [t for t in (xl, *cl, bl) if t is not None and t.requires_grad]
        grad_out: list[Tensor] = []

        def run(path: str):  # type: ignore[no-untyped-def]
            fn = _PATH_FNS[path]

            def call() -> None:
                with torch.enable_grad() if train else torch.no_grad():
                    y = fn(xl, *cl, bl, self.stride, padding, self.dilation)
                    if train:
                        if not grad_out:
                            grad_out.append(torch.ones_like(y))
                        torch.autograd.grad(y, wrt, grad_out[0])

            return call

        return conv_dispatch.measure_plan(run, x.device)

    # Accounting ---------------------------------------------------------------------------

    def parameter_counts(self) -> dict[str, int]:
        """``{"tt": ..., "dense": ...}``: this layer's parameters and those of the dense layer it
        replaces (biases included in both)."""
        r1, r2 = self.ranks
        kh, kw = self.kernel_size
        c, k = self.in_channels, self.out_channels
        b = k if self.bias is not None else 0
        return {
            "tt": r1 * c + r2 * r1 * kh * kw + k * r2 + b,
            "dense": k * c * kh * kw + b,
        }

    def compression_ratio(self) -> float:
        """Dense parameters over TT parameters."""
        p = self.parameter_counts()
        return p["dense"] / p["tt"]

    def flops(self, input_size: tuple[int, int], batch: int = 1) -> dict[str, int]:
        """Forward FLOPs (2 per multiply-add, bias ignored) for an ``H×W`` input: the three TT
        convolutions (the first at input resolution) and the dense convolution."""
        h, w = input_size
        ho, wo = tt_conv2d_output_size(h, w, self.kernel_size, self.stride, self.padding, self.dilation)
        r1, r2 = self.ranks
        kh, kw = self.kernel_size
        c, k = self.in_channels, self.out_channels
        tt = h * w * c * r1 + ho * wo * (r1 * r2 * kh * kw + r2 * k)
        dense = ho * wo * k * c * kh * kw
        return {"tt": 2 * batch * tt, "dense": 2 * batch * dense}

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, ranks={self.ranks}"
        )
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        if self._path != "auto":
            s += f", path={self._path!r}"
        return s


def _is_channels_last(x: Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
