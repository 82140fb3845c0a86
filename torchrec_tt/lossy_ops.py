"""Python side of the compiled lossy comms codec (issue 16): fake (meta) kernels of
``torchrec_tt::lossy_encode`` / ``torchrec_tt::lossy_decode`` so ``torch.compile`` and
``torch.export`` trace them, and :func:`has_kernel`.

The schemas are in ``csrc/ops.cpp``, the format in ``csrc/lossy_codec.h``, the kernels in
``csrc/lossy_codec_cpu.cpp`` and ``csrc/lossy_codec_cuda.cu``. Users call them through
``torchrec_tt.sharding.lossy_codec`` (``encode_blocks`` / ``decode_blocks``).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from torchrec_tt import _C  # noqa: F401  (registers the torchrec_tt ops)

__all__ = ["has_kernel"]

_OPS = ("torchrec_tt::lossy_encode", "torchrec_tt::lossy_decode",
        "torchrec_tt::lossy_decode_into")


@functools.lru_cache(maxsize=None)  # the registrations are fixed once _C is loaded
def has_kernel(device_type: str) -> bool:
    """Whether the built extension has both codec ops for ``device_type`` ("cpu", "cuda")."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None:
        return False
    try:
        return all(torch._C._dispatch_has_kernel_for_dispatch_key(op, key) for op in _OPS)
    except RuntimeError:  # an extension built before the ops existed
        return False


def _encoded_bytes(bits: list[int], rows: int, block: int) -> int:
    n = rows * block
    if n == 0 or not bits:
        return 0
    return 8 * len(bits) + (n + 7) // 8 * sum(bits)


@torch.library.register_fake("torchrec_tt::lossy_encode")
def _lossy_encode_fake(x: Tensor, bits: list[int], block: int, row_bytes: int,
                       status: Tensor | None) -> Tensor:
    torch._check(x.dim() == 3, lambda: "lossy_encode: x must be 3-D")
    torch._check(x.dtype == torch.float32, lambda: "lossy_encode: x must be float32")
    torch._check(x.shape[2] == len(bits) * block,
                 lambda: "lossy_encode: x's columns must be len(bits) * block")
    torch._check(row_bytes >= _encoded_bytes(bits, x.shape[1], block),
                 lambda: "lossy_encode: row_bytes is less than the encoded size")
    return x.new_empty((x.shape[0], row_bytes), dtype=torch.uint8)


@torch.library.register_fake("torchrec_tt::lossy_decode")
def _lossy_decode_fake(data: Tensor, rows: int, block: int, bits: list[int]) -> Tensor:
    torch._check(data.dim() == 2, lambda: "lossy_decode: data must be 2-D")
    torch._check(data.dtype == torch.uint8, lambda: "lossy_decode: data must be uint8")
    return data.new_empty((data.shape[0], rows, len(bits) * block), dtype=torch.float32)


@torch.library.register_fake("torchrec_tt::lossy_decode_into")
def _lossy_decode_into_fake(data: Tensor, rows: int, block: int, bits: list[int],
                            out: Tensor) -> None:
    torch._check(out.numel() == data.shape[0] * rows * len(bits) * block,
                 lambda: "lossy_decode_into: out has the wrong number of elements")
