"""Error-bounded quantisation with bit-packing, in torch tensor ops (CPU and CUDA alike).

The unit of encoding is a *group*: ``n`` float32 values (in the all-to-all, one feature's pooled
embeddings, or their gradients, for the rows of one destination). A group with range
``R = max - min`` is sent as its ``min`` and ``max`` (two float32) and one ``b``-bit code per
value, ``q = round((x - min) * (2**b - 1) / R)``; it decodes to ``min + q * R / (2**b - 1)``,
clamped to ``[min, max]``. The error is at most half a step, ``R / (2 (2**b - 1))``, and
:func:`bits_for_bound` picks the smallest ``b`` that keeps half a step below
``rel_bound * R`` with a margin of 1/64 of the bound for float32 rounding. So every decoded
element lies within ``rel_bound * R`` of its input, and ``R`` is at most the range of the whole
tensor encoded. Constant groups (``R = 0``) decode exactly.

The float32 margin covers the rounding of the encode and decode arithmetic as long as the bound
is not below float32 resolution at the group's magnitude: precisely, when
``2**-24 * max|x| + 2**-22 * R + 2**-147 <= rel_bound * R - R / (2 (2**b - 1))``, the room
left by the integer code width, at least ``rel_bound * R / 64`` (the last term: subnormal
resolution) (e.g. a group in ``[10, 10.01]`` at
``rel_bound = 0.01``, ``max|x| / R = 1000``, is covered; the limit is ``max|x| / R`` of about
``2**18 * rel_bound``). Below that no fixed-width code can meet the bound at all: a range of
``k`` float32 steps with ``rel_bound * R`` under one step must be sent losslessly, which takes
``log2(k + 1)`` bits, more than ``b``. :func:`guaranteed` says whether a tensor is in the covered
regime; the tests check the bound element-wise there and the documented slack outside it.

Packing: codes of ``b <= 8`` bits are packed eight at a time into one int64 word and written as
``b`` bytes (little-endian, code ``i`` at bit ``b * i``); wider codes (up to 16 bits) send their
low byte as it is and their high ``b - 8`` bits packed the same way. A group of ``n`` values
takes ``8 + ceil(n / 8) * b`` bytes (the last word padded with zeros).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "HEADER_BYTES",
    "MAX_BITS",
    "bits_for_bound",
    "decode_groups",
    "encode_groups",
    "group_bytes",
    "guaranteed",
]

#: Bytes of a group's header (min and max, float32).
HEADER_BYTES = 8
#: Widest code (a relative bound of about 7.7e-6).
MAX_BITS = 16
_MARGIN = 63 / 64  # half a step stays below this fraction of the bound (float32 rounding room)


def bits_for_bound(rel_bound: float) -> int:
    """Smallest code width ``b`` with ``1 / (2 (2**b - 1)) <= rel_bound * 63/64``.

    Raises ValueError when ``rel_bound`` is not a finite number in ``(0, 0.5)`` or needs more
    than ``MAX_BITS`` bits.
    """
    if not (isinstance(rel_bound, (int, float)) and math.isfinite(rel_bound)
            and 0 < rel_bound < 0.5):
        raise ValueError(f"rel_bound must be a finite number in (0, 0.5), got {rel_bound!r}")
    levels = 1.0 / (2.0 * rel_bound * _MARGIN)  # intervals needed: 2**b - 1 >= levels
    bits = max(1, math.ceil(math.log2(levels + 1.0)))
    while bits > 1 and 1.0 / (2.0 * ((1 << (bits - 1)) - 1)) <= rel_bound * _MARGIN:
        bits -= 1  # log2 rounding guard
    while 1.0 / (2.0 * ((1 << bits) - 1)) > rel_bound * _MARGIN:
        bits += 1
    if bits > MAX_BITS:
        raise ValueError(f"rel_bound {rel_bound} needs {bits} bits per value; at most "
                         f"{MAX_BITS} are supported (rel_bound >= ~7.7e-6)")
    return bits


def group_bytes(n: int, bits: int) -> int:
    """Encoded bytes of one group of ``n`` values at ``bits`` bits (0 for an empty group)."""
    if n == 0:
        return 0
    return HEADER_BYTES + (n + 7) // 8 * bits


def guaranteed(x: Tensor, rel_bound: float) -> bool:
    """Whether float32 rounding is covered for ``x`` as one group (see the module docstring)."""
    if x.numel() == 0:
        return True
    lo, hi = float(x.min()), float(x.max())
    r = hi - lo
    if r == 0:
        return True
    m = max(abs(lo), abs(hi))
    bits = bits_for_bound(rel_bound)
    slack = rel_bound * r - r / (2.0 * ((1 << bits) - 1))  # >= rel_bound * r / 64
    return 2.0**-24 * m + 2.0**-22 * r + 2.0**-147 <= slack


def _check_finite(mn: Tensor, mx: Tensor) -> None:
    # amin/amax propagate NaN and +-inf, so the per-group extremes catch every bad element.
    if not bool(torch.isfinite(mn).all() & torch.isfinite(mx).all()):
        raise ValueError("lossy comms: the tensor to encode contains NaN or inf; error-bounded "
                         "compression needs finite values (check the loss / learning rate)")


def _scaled_range(mn: Tensor, mx: Tensor) -> tuple[Tensor, Tensor]:
    """Per group a factor ``s`` (1, or 0.5 where ``max - min`` overflows float32) and the range
    ``R_s = max * s - min * s``; both sides compute in the ``x * s`` domain (exact: s is a
    power of two), so groups spanning almost all of float32 are handled too."""
    s = torch.where(torch.isinf(mx - mn), 0.5, 1.0).to(mn.dtype)
    return s, mx * s - mn * s


def _pack(codes: Tensor, bits: int) -> Tensor:
    """int64 codes ``[..., m*8]`` -> uint8 ``[..., m*bits]``."""
    if bits > 8:
        low = (codes & 0xFF).to(torch.uint8)
        return torch.cat([low, _pack(codes >> 8, bits - 8)], dim=-1)
    lead = codes.shape[:-1]
    words = codes.reshape(*lead, -1, 8) << (torch.arange(8, device=codes.device) * bits)
    word = words.sum(-1, keepdim=True)  # disjoint bit fields: the sum is an OR
    shifts = torch.arange(bits, device=codes.device) * 8
    return ((word >> shifts) & 0xFF).to(torch.uint8).reshape(*lead, -1)


def _unpack(data: Tensor, bits: int, count: int) -> Tensor:
    """uint8 ``[..., m*bits]`` -> int64 codes ``[..., m*8]`` (``count = m*8``)."""
    if bits > 8:
        low = data[..., :count].to(torch.int64)
        return low | (_unpack(data[..., count:], bits - 8, count) << 8)
    lead = data.shape[:-1]
    shifts = torch.arange(bits, device=data.device) * 8
    word = (data.reshape(*lead, -1, bits).to(torch.int64) << shifts).sum(-1, keepdim=True)
    mask = (1 << bits) - 1
    codes = (word >> (torch.arange(8, device=data.device) * bits)) & mask
    return codes.reshape(*lead, count)


def _bit_classes(bits: Sequence[int]) -> list[tuple[int, list[int]]]:
    """Groups by code width, widths ascending: the payload order of :func:`encode_groups`."""
    classes: dict[int, list[int]] = {}
    for g, b in enumerate(bits):
        classes.setdefault(int(b), []).append(g)
    return sorted(classes.items())


def encode_groups(x: Tensor, bits: Sequence[int], check_finite: bool = True) -> Tensor:
    """Encodes ``x`` (float32 ``[C, G, n]``: ``C`` chunks of ``G`` groups of ``n`` values) with
    ``bits[g]`` bits per value for group ``g``; returns uint8 ``[C, S]``, one row per chunk.

    A row is the ``G`` headers (min, max as float32, group order) followed by the packed codes,
    groups ordered by code width then index. ``S = sum_g group_bytes(n, bits[g])``.
    Raises ValueError on NaN/inf (``check_finite``) or a width outside ``1..MAX_BITS``.
    """
    if x.dim() != 3:
        raise ValueError(f"encode_groups expects [chunks, groups, values], got {tuple(x.shape)}")
    c, g, n = x.shape
    if len(bits) != g:
        raise ValueError(f"{len(bits)} code widths for {g} groups")
    if any(not 1 <= int(b) <= MAX_BITS for b in bits):
        raise ValueError(f"code widths must be in 1..{MAX_BITS}, got {list(bits)}")
    if c == 0 or g == 0 or n == 0:
        return torch.empty(c, 0, dtype=torch.uint8, device=x.device)
    x = x.float()
    mn, mx = x.amin(-1), x.amax(-1)  # [C, G]
    if check_finite:
        _check_finite(mn, mx)
    half, rng = _scaled_range(mn, mx)
    header = torch.stack([mn, mx], -1).contiguous().view(torch.uint8).reshape(c, -1)
    pad = (-n) % 8
    parts = [header]
    for b, groups in _bit_classes(bits):
        idx = torch.tensor(groups, device=x.device)
        s = half.index_select(1, idx).unsqueeze(-1)
        xs, lo = x.index_select(1, idx) * s, mn.index_select(1, idx).unsqueeze(-1) * s
        r = rng.index_select(1, idx).unsqueeze(-1)
        levels = float((1 << b) - 1)
        # (x - min) / R in [0, 1] first: levels / R would overflow for subnormal ranges
        unit = torch.where(r > 0, (xs - lo) / r, torch.zeros_like(xs))
        q = torch.round(unit * levels).clamp_(0, levels).to(torch.int64)
        if pad:
            q = torch.nn.functional.pad(q, (0, pad))
        parts.append(_pack(q, b).reshape(c, -1))
    return torch.cat(parts, dim=1)


def decode_groups(data: Tensor, groups: int, n: int, bits: Sequence[int]) -> Tensor:
    """Inverse of :func:`encode_groups`: uint8 ``[C, S]`` -> float32 ``[C, groups, n]``."""
    c = data.shape[0]
    if c == 0 or groups == 0 or n == 0:
        return torch.zeros(c, groups, n, dtype=torch.float32, device=data.device)
    expected = sum(group_bytes(n, b) for b in bits)
    if data.dim() != 2 or data.shape[1] != expected:
        raise ValueError(f"encoded chunk has {tuple(data.shape)} bytes, expected [{c}, {expected}]"
                         f" for {groups} groups of {n} values at {list(bits)} bits")
    # a fresh buffer: the slice may start at any byte offset, and view() needs 4-byte alignment
    raw = torch.empty(c, HEADER_BYTES * groups, dtype=torch.uint8, device=data.device)
    raw.copy_(data[:, : HEADER_BYTES * groups])
    header = raw.view(torch.float32).reshape(c, groups, 2)
    mn, mx = header[..., 0], header[..., 1]
    half, rng = _scaled_range(mn, mx)
    out = torch.empty(c, groups, n, dtype=torch.float32, device=data.device)
    offset = HEADER_BYTES * groups
    padded = n + (-n) % 8
    for b, members in _bit_classes(bits):
        k = len(members)
        size = padded // 8 * b
        chunk = data[:, offset: offset + k * size].reshape(c, k, size)
        offset += k * size
        q = _unpack(chunk, b, padded)[..., :n].to(torch.float32)
        idx = torch.tensor(members, device=data.device)
        lo, hi = mn.index_select(1, idx).unsqueeze(-1), mx.index_select(1, idx).unsqueeze(-1)
        s = half.index_select(1, idx).unsqueeze(-1)
        r = rng.index_select(1, idx).unsqueeze(-1)
        # (q / levels) * R: one rounding into a subnormal range, not a subnormal step times q
        values = (lo * s + (q * (1.0 / float((1 << b) - 1))) * r) / s
        values = torch.minimum(torch.maximum(values, lo), hi)
        out.index_copy_(1, idx, values)
    return out
