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

Implementations. The functions here run the compiled ops ``torchrec_tt::lossy_encode`` /
``lossy_decode`` (``csrc/lossy_codec_*``: C++ on the CPU, one fused pass per direction on
CUDA) when the extension has them for the tensor's device, and otherwise the torch-op reference
(``encode_groups_reference`` / ``decode_groups_reference``), which defines the format: the
compiled ops are bit-identical to it. ``impl="reference"`` (or the environment variable
``TORCHREC_TT_LOSSY_CODEC=reference``) selects the reference, ``impl="compiled"`` insists on the
ops. One difference: a group whose extreme is a zero of both signs may carry either zero in its
header (the reference's ``amin``/``amax`` return whichever their reduction order meets), so a
decoded zero may differ in sign; values are equal.

NaN/inf. The compiled encode marks a group holding NaN or inf in the output (NaN header, zero
codes: it decodes to NaN) and reports it; ``check_finite`` turns the report into a ValueError.
On the CPU that is immediate. On CUDA, with a :class:`NonFiniteFlag` passed as ``flag``, it is
lazy (no host sync): the encode sets a device flag, and :meth:`NonFiniteFlag.poll` (called by
every later encode with that flag and by ``ErrorBoundPolicy.step``) raises once a non-blocking
copy of it shows it set; without ``flag`` the encode synchronises and raises at once.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "HEADER_BYTES",
    "IMPLEMENTATIONS",
    "MAX_BITS",
    "NonFiniteFlag",
    "bits_for_bound",
    "compiled_available",
    "decode_blocks",
    "decode_groups",
    "decode_groups_reference",
    "encode_blocks",
    "encode_groups",
    "encode_groups_reference",
    "encoded_bytes",
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


def encode_groups_reference(x: Tensor, bits: Sequence[int], check_finite: bool = True
                            ) -> Tensor:
    """The torch-op reference of :func:`encode_groups`: encodes ``x`` (float32 ``[C, G, n]``:
    ``C`` chunks of ``G`` groups of ``n`` values) with ``bits[g]`` bits per value for group
    ``g``; returns uint8 ``[C, S]``, one row per chunk.

    A row is the ``G`` headers (min, max as float32, group order) followed by the packed codes,
    groups ordered by code width then index. ``S = sum_g group_bytes(n, bits[g])``.
    Raises ValueError on NaN/inf (``check_finite``) or a width outside ``1..MAX_BITS``.
    """
    c, g, n = _check_groups(x, bits)
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


def decode_groups_reference(data: Tensor, groups: int, n: int, bits: Sequence[int]) -> Tensor:
    """The torch-op reference of :func:`decode_groups`."""
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


# ---------------------------------------------------------------------- compiled / dispatch

#: ``impl`` values: the compiled ops (``torchrec_tt::lossy_encode`` / ``lossy_decode``) or the
#: torch-op reference.
IMPLEMENTATIONS = ("compiled", "reference")
_ENV = "TORCHREC_TT_LOSSY_CODEC"


def compiled_available(device: torch.device | str) -> bool:
    """Whether the built extension has the compiled codec for ``device``'s type."""
    from torchrec_tt.lossy_ops import has_kernel

    return has_kernel(torch.device(device).type)


def _resolve(impl: str | None, device: torch.device) -> str:
    if impl is None:
        impl = os.environ.get(_ENV) or None
    if impl is None:
        return "compiled" if compiled_available(device) else "reference"
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"lossy codec impl must be one of {IMPLEMENTATIONS} (or None: compiled "
                         f"when built), got {impl!r} (check {_ENV})")
    if impl == "compiled" and not compiled_available(device):
        raise ValueError(f"the compiled lossy codec is not built for {device.type} tensors "
                         "(rebuild torchrec_tt with its CUDA kernels, or use impl='reference')")
    return impl


def encoded_bytes(bits: Sequence[int], n: int) -> int:
    """Encoded bytes of one chunk: groups of ``n`` values at ``bits`` (headers included)."""
    return sum(group_bytes(n, int(b)) for b in bits)


def _check_widths(bits: Sequence[int]) -> list[int]:
    widths = [int(b) for b in bits]
    if any(not 1 <= b <= MAX_BITS for b in widths):
        raise ValueError(f"code widths must be in 1..{MAX_BITS}, got {list(bits)}")
    return widths


def _check_groups(x: Tensor, bits: Sequence[int]) -> tuple[int, int, int]:
    if x.dim() != 3:
        raise ValueError(f"encode_groups expects [chunks, groups, values], got {tuple(x.shape)}")
    c, g, n = x.shape
    if len(bits) != g:
        raise ValueError(f"{len(bits)} code widths for {g} groups")
    _check_widths(bits)
    return c, g, n


class NonFiniteFlag:
    """A device-side record that an encode met NaN or inf, reported without a host sync.

    Each compiled encode on CUDA given this flag sets ``status(device)`` to 1 when a group holds
    NaN/inf (that group is sent as NaN). :meth:`poll` never waits: it reads the last
    non-blocking copy of the status once its event has completed (raising ValueError if set)
    and starts the next copy. :meth:`check` synchronises and raises at once. On the CPU the
    encode raises immediately and the flag is not used.
    """

    def __init__(self) -> None:
        self._status: dict[torch.device, Tensor] = {}
        self._pending: dict[torch.device, tuple[Tensor, Any]] = {}
        self._unchecked: dict[torch.device, Tensor] = {}

    def unchecked_status(self, device: torch.device) -> Tensor:
        """A status tensor for encodes with ``check_finite=False``: they still mark bad groups
        (sent as NaN), but nobody polls it, so they never raise through this flag."""
        st = self._unchecked.get(device)
        if st is None:
            st = torch.zeros(1, dtype=torch.int32, device=device)
            self._unchecked[device] = st
        return st

    def status(self, device: torch.device) -> Tensor:
        """The int32 ``[1]`` status tensor the encodes on ``device`` set."""
        st = self._status.get(device)
        if st is None:
            st = torch.zeros(1, dtype=torch.int32, device=device)
            self._status[device] = st
        return st

    def poll(self) -> None:
        """Raises ValueError when an earlier encode's NaN/inf has reached the host; never
        waits for the device."""
        for device, st in self._status.items():
            if device.type != "cuda":
                continue
            pending = self._pending.get(device)
            if pending is not None:
                host, event = pending
                if not event.query():
                    continue
                if int(host[0]):
                    self._report(device)
            if pending is None:  # one pinned word and one event per device, reused
                pending = (torch.zeros(1, dtype=torch.int32, pin_memory=True), torch.cuda.Event())
            host, event = pending
            with torch.cuda.device(device):
                host.copy_(st, non_blocking=True)
                event.record()
            self._pending[device] = pending

    def check(self) -> None:
        """Synchronises with the devices and raises ValueError if any encode since the last
        report met NaN or inf."""
        for device, st in self._status.items():
            if int(st.item()):
                self._report(device)

    def _report(self, device: torch.device) -> None:
        self._status[device].zero_()
        self._pending.pop(device, None)
        raise ValueError(f"lossy comms: a tensor encoded on {device} contained NaN or inf "
                         "(reported after the encode, without a host sync; the groups concerned "
                         "were sent as NaN); error-bounded compression needs finite values "
                         "(check the loss / learning rate)")

    def __deepcopy__(self, memo: dict[int, Any]) -> NonFiniteFlag:
        return NonFiniteFlag()  # device state is not copied: a copy starts clean

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()


def encode_blocks(x: Tensor, bits: Sequence[int], block: int, row_bytes: int | None = None, *,
                  check_finite: bool = True, flag: NonFiniteFlag | None = None,
                  impl: str | None = None) -> Tensor:
    """Encodes ``x`` (float32 ``[C, rows, G * block]``: ``C`` chunks; group ``g`` is the column
    block ``[g * block, (g + 1) * block)`` over all rows, ``n = rows * block`` values, in
    row-major order) at ``bits[g]`` bits; returns uint8 ``[C, row_bytes]`` (default: the encoded
    size; longer rows are zero-padded). Same bytes as :func:`encode_groups` of the grouped
    tensor, without materialising it. ``flag``: lazy NaN/inf reporting on CUDA (module doc).
    """
    if x.dim() != 3:
        raise ValueError(f"encode_blocks expects [chunks, rows, groups * block], got "
                         f"{tuple(x.shape)}")
    widths = _check_widths(bits)
    if not isinstance(block, int) or block < 1 or x.shape[2] != len(widths) * block:
        raise ValueError(f"{len(widths)} groups of block {block!r} columns do not match x of "
                         f"shape {tuple(x.shape)}")
    c, rows = x.shape[0], x.shape[1]
    size = encoded_bytes(widths, rows * block)
    row_bytes = size if row_bytes is None else row_bytes
    if row_bytes < size:
        raise ValueError(f"row_bytes {row_bytes} is less than the encoded size {size}")
    if x.dtype != torch.float32:
        x = x.float()
    return _encode_blocks_checked(x, widths, block, row_bytes, check_finite, flag,
                                  _resolve(impl, x.device))


def _encode_blocks_checked(x: Tensor, widths: list[int], block: int, row_bytes: int,
                           check_finite: bool, flag: NonFiniteFlag | None, impl: str) -> Tensor:
    """:func:`encode_blocks` after its checks (float32 ``x``, valid ``widths``, ``row_bytes``
    at least the encoded size, ``impl`` resolved): the codec calls it with a layout's widths
    checked once."""
    if impl == "reference":
        c, rows = x.shape[0], x.shape[1]
        grouped = (x.reshape(c, rows, len(widths), block).permute(0, 2, 1, 3)
                   .reshape(c, len(widths), rows * block))
        data = encode_groups_reference(grouped, widths, check_finite)
        if data.shape[1] < row_bytes:
            data = torch.nn.functional.pad(data, (0, row_bytes - data.shape[1]))
        return data
    status = None
    if not check_finite:  # bad groups are still sent as NaN; nobody reads the report
        status = (flag.unchecked_status(x.device) if flag is not None
                  else torch.zeros(1, dtype=torch.int32, device=x.device))
    elif flag is not None and x.device.type == "cuda":
        flag.poll()
        status = flag.status(x.device)
    return torch.ops.torchrec_tt.lossy_encode(x, widths, block, row_bytes, status)


def decode_blocks(data: Tensor, rows: int, block: int, bits: Sequence[int], *,
                  impl: str | None = None, out: Tensor | None = None) -> Tensor:
    """Inverse of :func:`encode_blocks`: uint8 ``[C, S]`` (``S`` >= the encoded size; the rest
    is ignored) -> float32 ``[C, rows, len(bits) * block]``, written into ``out`` (contiguous
    float32 of as many elements, e.g. a slice of a larger buffer) when given."""
    widths = _check_widths(bits)
    if data.dim() != 2 or data.dtype != torch.uint8:
        raise ValueError(f"decode_blocks expects uint8 [chunks, bytes], got {data.dtype} "
                         f"{tuple(data.shape)}")
    c = data.shape[0]
    n = rows * block
    size = encoded_bytes(widths, n)
    if c and data.shape[1] < size:
        raise ValueError(f"encoded chunk has {tuple(data.shape)} bytes, expected [{c}, {size}] "
                         f"for {len(widths)} groups of {n} values at {widths} bits")
    shape = (c, rows, len(widths) * block)
    if out is not None and (out.dtype != torch.float32 or not out.is_contiguous()
                            or out.numel() != c * rows * len(widths) * block):
        raise ValueError(f"out must be a contiguous float32 tensor of {shape} elements, got "
                         f"{out.dtype} {tuple(out.shape)}")
    return _decode_blocks_checked(data, rows, block, widths, size, _resolve(impl, data.device),
                                  out)


def _decode_blocks_checked(data: Tensor, rows: int, block: int, widths: list[int], size: int,
                           impl: str, out: Tensor | None = None) -> Tensor:
    """:func:`decode_blocks` after its checks (``size``: the encoded bytes of a chunk)."""
    c = data.shape[0]
    shape = (c, rows, len(widths) * block)
    if impl == "reference":
        values = decode_groups_reference(data[:, :size], len(widths), rows * block, widths)
        values = values.reshape(c, len(widths), rows, block).permute(0, 2, 1, 3).reshape(shape)
        return values if out is None else out.view(shape).copy_(values)
    if out is None:
        return torch.ops.torchrec_tt.lossy_decode(data, rows, block, widths)
    torch.ops.torchrec_tt.lossy_decode_into(data, rows, block, widths, out)
    return out.view(shape)


def encode_groups(x: Tensor, bits: Sequence[int], check_finite: bool = True, *,
                  flag: NonFiniteFlag | None = None, impl: str | None = None) -> Tensor:
    """Encodes ``x`` (float32 ``[C, G, n]``: ``C`` chunks of ``G`` groups of ``n`` values) with
    ``bits[g]`` bits per value for group ``g``; returns uint8 ``[C, S]``, one row per chunk.

    A row is the ``G`` headers (min, max as float32, group order) followed by the packed codes,
    groups ordered by code width then index. ``S = sum_g group_bytes(n, bits[g])``.
    Raises ValueError on NaN/inf (``check_finite``; lazily with ``flag`` on CUDA, see the
    module doc) or a width outside ``1..MAX_BITS``.
    """
    c, g, n = _check_groups(x, bits)
    if c == 0 or g == 0 or n == 0:
        return torch.empty(c, 0, dtype=torch.uint8, device=x.device)
    if _resolve(impl, x.device) == "reference":
        return encode_groups_reference(x, bits, check_finite)
    return encode_blocks(x.reshape(c, 1, g * n), bits, n, check_finite=check_finite, flag=flag,
                         impl="compiled")


def decode_groups(data: Tensor, groups: int, n: int, bits: Sequence[int], *,
                  impl: str | None = None) -> Tensor:
    """Inverse of :func:`encode_groups`: uint8 ``[C, S]`` -> float32 ``[C, groups, n]``."""
    c = data.shape[0]
    if c == 0 or groups == 0 or n == 0:
        return torch.zeros(c, groups, n, dtype=torch.float32, device=data.device)
    if _resolve(impl, data.device) == "reference":
        return decode_groups_reference(data, groups, n, bits)
    expected = encoded_bytes(bits, n)
    if data.dim() != 2 or data.shape[1] != expected or len(bits) != groups:
        raise ValueError(f"encoded chunk has {tuple(data.shape)} bytes, expected [{c}, {expected}]"
                         f" for {groups} groups of {n} values at {list(bits)} bits")
    return decode_blocks(data, 1, n, bits, impl="compiled").view(c, groups, n)
