"""Python side of the ``torchrec_tt`` operator library: fake (meta) kernels, autograd, and the
thin wrapper :func:`tt_embedding_bag` that modules call.

The schemas and the CPU (and, when built, CUDA) kernels live in ``csrc/``; importing this module
loads ``torchrec_tt._C`` first so the Python registrations find the ops defined.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch
from torch import Tensor

from torchrec_tt import _C  # noqa: F401  (registers the torchrec_tt ops)
from torchrec_tt.validation import check_same_device

__all__ = [
    "BoundsCheckMode",
    "ComputePrecision",
    "PoolingMode",
    "TTBatchLayout",
    "TTKernelOptions",
    "tt_embedding_bag",
]


@enum.unique
class PoolingMode(enum.IntEnum):
    """Pooling of a bag; values match FBGEMM's ``PoolingMode``."""

    SUM = 0
    MEAN = 1


@enum.unique
class BoundsCheckMode(enum.IntEnum):
    """What a lookup index outside ``[0, num_rows)`` does; names and values follow FBGEMM's
    ``BoundsCheckMode`` (its ``NONE`` maps to ``IGNORE``: the check costs nothing next to the
    lookup, so it always runs and an out-of-range index never touches memory).

    * ``FATAL``: error naming the table, feature and position (on CUDA a device-side trap, since
      raising would need a host synchronisation).
    * ``WARNING``: the lookup contributes zero (row and gradients) and a warning names the first
      offending index of the call; it still counts in its bag's length for MEAN pooling.
    * ``IGNORE``: like ``WARNING`` without the message.
    """

    FATAL = 0
    WARNING = 1
    IGNORE = 2

    @staticmethod
    def parse(value: Any) -> BoundsCheckMode:
        """Accepts this enum, FBGEMM's (by name, its ``V2_*`` variants included), FBGEMM's int
        values (3 = NONE) or a name string such as ``"warning"``."""
        if isinstance(value, BoundsCheckMode):
            return value
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 3:
            return BoundsCheckMode(min(value, 2))
        name = value if isinstance(value, str) else getattr(value, "name", None)
        if name is None:
            raise ValueError(f"bounds_check_mode must be a BoundsCheckMode or its name, got {value!r}")
        name = name.upper().removeprefix("V2_")
        if name == "NONE":
            return BoundsCheckMode.IGNORE
        try:
            return BoundsCheckMode[name]
        except KeyError:
            raise ValueError(
                f"unknown bounds_check_mode {value!r}; choose one of {[m.name for m in BoundsCheckMode]}"
            ) from None


@enum.unique
class ComputePrecision(enum.IntEnum):
    """Arithmetic of the contractions of float32 cores (float64 cores always compute in float64).

    * ``TF32`` (default): tensor-core GEMMs in TF32 with float32 accumulation on CUDA where the
      tile path applies (3-core tables); float32 elsewhere and on CPU.
    * ``FP32``: float32 everywhere (CUDA cores on the GPU): slower, bit-for-bit independent of
      the tensor-core rounding.
    * ``BF16`` / ``FP16``: the cores are rounded to bfloat16 / float16 and the tile GEMMs run on
      bf16 / fp16 tensor cores with float32 accumulation (FP16's backward gradient GEMMs run in
      TF32: fp16 gradients would underflow without loss scaling); CPU and the non-tile CUDA path use the
      same rounded cores with float32 arithmetic. Gradients are with respect to the float32
      cores (straight through the rounding), and stay float32.
    """

    TF32 = 0
    FP32 = 1
    BF16 = 2
    FP16 = 3

    @staticmethod
    def parse(value: Any) -> ComputePrecision:
        """Accepts this enum, its name (``"bf16"``), or ``torch.bfloat16`` / ``torch.float16`` /
        ``torch.float32`` (the last meaning ``FP32``)."""
        if isinstance(value, ComputePrecision):
            return value
        by_dtype = {
            torch.bfloat16: ComputePrecision.BF16,
            torch.float16: ComputePrecision.FP16,
            torch.float32: ComputePrecision.FP32,
        }
        if isinstance(value, torch.dtype):
            if value not in by_dtype:
                raise ValueError(f"compute_precision {value} is not supported; choose one of {list(by_dtype)}")
            return by_dtype[value]
        if isinstance(value, str):
            try:
                return ComputePrecision[value.upper()]
            except KeyError:
                pass
        raise ValueError(
            f"unknown compute_precision {value!r}; choose one of {[m.name for m in ComputePrecision]}"
        )


@dataclass(frozen=True)
class TTKernelOptions:
    """Kernel settings of a TT collection (given through ``fused_params``, as TorchRec passes
    FBGEMM's ``bounds_check_mode``).

    Args:
        bounds_check_mode: see :class:`BoundsCheckMode`.
        compute_precision: see :class:`ComputePrecision`.
        deterministic: backward without floating-point atomics: core gradients bit-identical
            across runs (on CPU for a fixed thread count), at some cost in speed on the GPU. Also
            on whenever ``torch.use_deterministic_algorithms(True)`` is in effect.
    """

    bounds_check_mode: BoundsCheckMode = BoundsCheckMode.FATAL
    compute_precision: ComputePrecision = ComputePrecision.TF32
    deterministic: bool = False

    KEYS = ("bounds_check_mode", "compute_precision", "deterministic")

    @staticmethod
    def from_fused_params(fused_params: Mapping[str, Any] | None) -> TTKernelOptions:
        """Reads the kernel keys (``KEYS``) of a ``fused_params`` dict; other keys are ignored."""
        params = dict(fused_params or {})
        opts = TTKernelOptions()
        if "bounds_check_mode" in params:
            opts = replace(opts, bounds_check_mode=BoundsCheckMode.parse(params["bounds_check_mode"]))
        if "compute_precision" in params:
            opts = replace(opts, compute_precision=ComputePrecision.parse(params["compute_precision"]))
        if "deterministic" in params:
            if not isinstance(params["deterministic"], bool):
                raise ValueError(f"deterministic must be a bool, got {params['deterministic']!r}")
            opts = replace(opts, deterministic=params["deterministic"])
        return opts

    def op_args(self) -> list[Any]:
        """The trailing ``bounds_check_mode, compute_precision, deterministic`` op arguments."""
        deterministic = self.deterministic or torch.are_deterministic_algorithms_enabled()
        return [int(self.bounds_check_mode), int(self.compute_precision), bool(deterministic)]


class _TTShapeLike(Protocol):
    num_rows: int
    p: tuple[int, ...]
    q: tuple[int, ...]
    ranks: tuple[int, ...]


def _table_dims(num_cores: Sequence[int], q_shapes: Sequence[int]) -> list[int]:
    dims, pos = [], 0
    for k in num_cores:
        dims.append(math.prod(q_shapes[pos : pos + k]))
        pos += k
    return dims


@dataclass(frozen=True)
class TTBatchLayout:
    """Static description of the tables in one table-batched call (flattened per table).

    Args:
        num_cores: K per table.
        p_shapes: row factors, K per table, concatenated.
        q_shapes: column factors, K per table, concatenated.
        ranks: inner ranks, K - 1 per table, concatenated.
        num_rows: N per table.
        feature_table_map: for every feature (KJT key, in output order) the table it looks up.
        table_names: used in error messages.
        pooling_modes: ``PoolingMode`` value per table.
    """

    num_cores: tuple[int, ...]
    p_shapes: tuple[int, ...]
    q_shapes: tuple[int, ...]
    ranks: tuple[int, ...]
    num_rows: tuple[int, ...]
    feature_table_map: tuple[int, ...]
    table_names: tuple[str, ...]
    pooling_modes: tuple[int, ...]

    @staticmethod
    def from_shapes(
        table_names: Sequence[str],
        shapes: Sequence[_TTShapeLike],
        pooling_modes: Sequence[PoolingMode | int],
        feature_table_map: Sequence[int],
    ) -> TTBatchLayout:
        """Builds a layout from one shape (``num_rows, p, q, ranks``) per table."""
        return TTBatchLayout(
            num_cores=tuple(len(s.p) for s in shapes),
            p_shapes=tuple(x for s in shapes for x in s.p),
            q_shapes=tuple(x for s in shapes for x in s.q),
            ranks=tuple(x for s in shapes for x in s.ranks),
            num_rows=tuple(s.num_rows for s in shapes),
            feature_table_map=tuple(feature_table_map),
            table_names=tuple(table_names),
            pooling_modes=tuple(int(m) for m in pooling_modes),
        )

    def feature_dims(self) -> list[int]:
        """Embedding dimension of every feature, in output order."""
        dims = _table_dims(self.num_cores, self.q_shapes)
        return [dims[t] for t in self.feature_table_map]

    def op_args(self) -> list[Any]:
        """The layout as the op's positional metadata arguments (``num_cores`` … ``pooling_modes``)."""
        return [
            list(self.num_cores),
            list(self.p_shapes),
            list(self.q_shapes),
            list(self.ranks),
            list(self.num_rows),
            list(self.feature_table_map),
            list(self.table_names),
            list(self.pooling_modes),
        ]


def tt_embedding_bag(
    cores: Sequence[Tensor],
    layout: TTBatchLayout,
    indices: Tensor,
    offsets: Tensor,
    per_sample_weights: Tensor | None = None,
    options: TTKernelOptions | None = None,
) -> Tensor:
    """Pooled TT embedding lookups of many tables in one call.

    Args:
        cores: every table's cores in order, each 2-D ``[p_k, r_{k-1} * q_k * r_k]``.
        layout: the tables' shapes, pooling modes and the feature → table map.
        indices: 1-D int32/int64, the lookups of all F features back to back.
        offsets: 1-D int32/int64 of length ``F * B + 1``; bag ``(f, b)`` is
            ``indices[offsets[f * B + b] : offsets[f * B + b + 1]]`` (FBGEMM TBE layout).
        per_sample_weights: optional 1-D weights, one per index, in the cores' dtype.
            MEAN pooling divides the weighted sum by the bag length; empty bags give zeros.
        options: bounds checking, compute precision and determinism (defaults: FATAL, TF32,
            non-deterministic unless ``torch.use_deterministic_algorithms(True)``).

    Returns:
        ``[B, sum of the features' D]``, features side by side in ``feature_table_map`` order.
    """
    opts = options if options is not None else TTKernelOptions()
    return torch.ops.torchrec_tt.tt_embedding_bag(
        list(cores), *layout.op_args(), indices, offsets, per_sample_weights, *opts.op_args()
    )


def _check_op_args(
    op: str,
    cores: list[Tensor],
    num_cores: list[int],
    p_shapes: list[int],
    q_shapes: list[int],
    ranks: list[int],
    num_rows: list[int],
    feature_table_map: list[int],
    table_names: list[str],
    pooling_modes: list[int],
    indices: Tensor,
    offsets: Tensor,
    per_sample_weights: Tensor | None,
    grad_output: Tensor | None = None,
) -> tuple[int, int]:
    """The checks of ``parse_and_check`` (csrc/embedding_bag_common.h) that need no tensor data,
    for the fake (meta) kernels, with the same messages; returns ``(B, total D)``."""
    t_count = len(num_cores)
    torch._check(t_count >= 1, lambda: f"{op}: needs at least one table")
    torch._check(
        len(num_rows) == t_count and len(table_names) == t_count and len(pooling_modes) == t_count,
        lambda: f"{op}: num_cores, num_rows, table_names and pooling_modes must have one entry "
        f"per table, got {t_count}, {len(num_rows)}, {len(table_names)} and {len(pooling_modes)}",
    )
    torch._check(len(cores) >= 1, lambda: f"{op}: no cores given")
    named = [("indices", indices), ("offsets", offsets), ("per_sample_weights", per_sample_weights)]
    if grad_output is not None:
        named.append(("grad_output", grad_output))
    pos = 0
    for t, k_count in enumerate(num_cores):
        for k in range(k_count):
            if pos < len(cores):
                named.append((f"core {k} of table {table_names[t]!r}", cores[pos]))
            pos += 1
    check_same_device(op, named)
    dtype = cores[0].dtype
    torch._check(
        dtype in (torch.float32, torch.float64),
        lambda: f"{op}: cores must be float32 or float64, got {dtype}",
    )
    core_pos = rank_pos = 0
    dims = []
    for t, k_count in enumerate(num_cores):
        label = f"table {table_names[t]!r}"
        torch._check(
            2 <= k_count <= 4, lambda: f"{op}: {label} must have 2, 3 or 4 cores, got {k_count}"
        )
        torch._check(
            core_pos + k_count <= min(len(p_shapes), len(q_shapes), len(cores))
            and rank_pos + k_count - 1 <= len(ranks),
            lambda: f"{op}: p_shapes, q_shapes, ranks or cores are too short for {label}",
        )
        torch._check(
            pooling_modes[t] in (int(PoolingMode.SUM), int(PoolingMode.MEAN)),
            lambda: f"{op}: {label} has pooling mode {pooling_modes[t]}; expected 0 (SUM) or 1 (MEAN)",
        )
        torch._check(num_rows[t] >= 1, lambda: f"{op}: {label} has num_rows {num_rows[t]}")
        p = p_shapes[core_pos : core_pos + k_count]
        q = q_shapes[core_pos : core_pos + k_count]
        r = [1, *ranks[rank_pos : rank_pos + k_count - 1], 1]
        torch._check(
            all(v >= 1 for v in (*p, *q)), lambda: f"{op}: {label} has a non-positive p or q factor"
        )
        torch._check(all(v >= 1 for v in r), lambda: f"{op}: {label} has rank {min(r)}")
        torch._check(
            math.prod(p) >= num_rows[t],
            lambda: f"{op}: {label} row factors multiply to {math.prod(p)} < num_rows {num_rows[t]}",
        )
        for k in range(k_count):
            c = cores[core_pos + k]
            torch._check(
                c.dtype == dtype,
                lambda: f"{op}: core {k} of {label} is {c.dtype} but core 0 of the batch is "
                f"{dtype}; all cores of one call share a dtype",
            )
            cols = r[k] * q[k] * r[k + 1]
            torch._check(
                c.dim() == 2 and c.shape[0] == p[k] and c.shape[1] == cols,
                lambda: f"{op}: core {k} of {label} must have shape [{p[k]}, {cols}] "
                f"(p_k, r_{{k-1}}*q_k*r_k), got {list(c.shape)}",
            )
        dims.append(math.prod(q))
        core_pos += k_count
        rank_pos += k_count - 1
    torch._check(
        core_pos == len(cores) == len(p_shapes) == len(q_shapes) and rank_pos == len(ranks),
        lambda: f"{op}: the tables need {core_pos} cores / p / q entries and {rank_pos} ranks, "
        f"got {len(cores)} / {len(p_shapes)} / {len(q_shapes)} and {len(ranks)}",
    )
    num_features = len(feature_table_map)
    torch._check(num_features >= 1, lambda: f"{op}: feature_table_map is empty")
    for f, t in enumerate(feature_table_map):
        torch._check(
            0 <= t < t_count,
            lambda: f"{op}: feature {f} maps to table {t} but there are {t_count} tables",
        )
    for name, x in (("indices", indices), ("offsets", offsets)):
        torch._check(
            x.dim() == 1, lambda: f"{op}: {name} must be 1-D, got {x.dim()}-D of shape {list(x.shape)}"
        )
        torch._check(
            x.dtype in (torch.int32, torch.int64),
            lambda: f"{op}: {name} must be int32 or int64, got {x.dtype}",
        )
    torch._check(
        offsets.shape[0] >= 1 and (offsets.shape[0] - 1) % num_features == 0,
        lambda: f"{op}: offsets must have F*B+1 entries for F = {num_features} features, got "
        f"{offsets.shape[0]}",
    )
    if per_sample_weights is not None:
        w = per_sample_weights
        torch._check(
            w.dim() == 1,
            lambda: f"{op}: per_sample_weights must be 1-D, got {w.dim()}-D of shape {list(w.shape)}",
        )
        torch._check(
            w.shape[0] == indices.shape[0],
            lambda: f"{op}: per_sample_weights has {w.shape[0]} entries but there are "
            f"{indices.shape[0]} indices",
        )
        torch._check(
            w.dtype == dtype,
            lambda: f"{op}: per_sample_weights is {w.dtype} but the cores are {dtype}",
        )
    batch = (offsets.shape[0] - 1) // num_features
    return batch, sum(dims[t] for t in feature_table_map)


def _check_kernel_options(
    op: str, dtype: torch.dtype, bounds_check_mode: int, compute_precision: int
) -> None:
    torch._check(
        0 <= bounds_check_mode <= 2,
        lambda: f"{op}: bounds_check_mode must be 0 (FATAL), 1 (WARNING) or 2 (IGNORE), got "
        f"{bounds_check_mode}",
    )
    torch._check(
        0 <= compute_precision <= 3,
        lambda: f"{op}: compute_precision must be 0 (TF32), 1 (FP32), 2 (BF16) or 3 (FP16), got "
        f"{compute_precision}",
    )
    torch._check(
        dtype == torch.float32 or compute_precision in (0, 1),
        lambda: f"{op}: compute_precision BF16 / FP16 needs float32 cores, got {dtype}",
    )


@torch.library.register_fake("torchrec_tt::tt_embedding_bag")
def _tt_embedding_bag_fake(
    cores: list[Tensor],
    num_cores: list[int],
    p_shapes: list[int],
    q_shapes: list[int],
    ranks: list[int],
    num_rows: list[int],
    feature_table_map: list[int],
    table_names: list[str],
    pooling_modes: list[int],
    indices: Tensor,
    offsets: Tensor,
    per_sample_weights: Tensor | None,
    bounds_check_mode: int,
    compute_precision: int,
    deterministic: bool,
) -> Tensor:
    op = "torchrec_tt::tt_embedding_bag"
    batch, total_d = _check_op_args(
        op, cores, num_cores, p_shapes, q_shapes, ranks, num_rows, feature_table_map,
        table_names, pooling_modes, indices, offsets, per_sample_weights,
    )
    _check_kernel_options(op, cores[0].dtype, bounds_check_mode, compute_precision)
    return cores[0].new_empty((batch, total_d))


@torch.library.register_fake("torchrec_tt::tt_embedding_bag_backward")
def _tt_embedding_bag_backward_fake(
    grad_output: Tensor,
    cores: list[Tensor],
    num_cores: list[int],
    p_shapes: list[int],
    q_shapes: list[int],
    ranks: list[int],
    num_rows: list[int],
    feature_table_map: list[int],
    table_names: list[str],
    pooling_modes: list[int],
    indices: Tensor,
    offsets: Tensor,
    per_sample_weights: Tensor | None,
    per_sample_weights_grad: bool,
    bounds_check_mode: int,
    compute_precision: int,
    deterministic: bool,
) -> tuple[list[Tensor], Tensor]:
    op = "torchrec_tt::tt_embedding_bag_backward"
    batch, total_d = _check_op_args(
        op, cores, num_cores, p_shapes, q_shapes, ranks, num_rows, feature_table_map,
        table_names, pooling_modes, indices, offsets, per_sample_weights, grad_output,
    )
    _check_kernel_options(op, cores[0].dtype, bounds_check_mode, compute_precision)
    torch._check(
        per_sample_weights is not None or not per_sample_weights_grad,
        lambda: f"{op}: per_sample_weights_grad needs per_sample_weights",
    )
    torch._check(
        grad_output.dim() == 2 and grad_output.shape[0] == batch and grad_output.shape[1] == total_d,
        lambda: f"{op}: grad_output must have shape [{batch}, {total_d}], got {list(grad_output.shape)}",
    )
    torch._check(
        grad_output.dtype == cores[0].dtype,
        lambda: f"{op}: grad_output is {grad_output.dtype} but the cores are {cores[0].dtype}",
    )
    grads = [torch.empty_like(c, memory_format=torch.contiguous_format) for c in cores]
    n = indices.shape[0] if per_sample_weights_grad else 0
    return grads, grad_output.new_empty((n,))


# Argument names of the forward op, in schema order (the autograd formula looks them up).
_FWD_ARGS = (
    "cores num_cores p_shapes q_shapes ranks num_rows feature_table_map table_names "
    "pooling_modes indices offsets per_sample_weights bounds_check_mode compute_precision "
    "deterministic"
).split()
_NUM_META_ARGS = 8  # num_cores … pooling_modes


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    args = dict(zip(_FWD_ARGS, inputs))
    ctx.meta = tuple(args[k] for k in _FWD_ARGS[1 : 1 + _NUM_META_ARGS])
    ctx.options = tuple(args[k] for k in _FWD_ARGS[-3:])
    ctx.has_weights = args["per_sample_weights"] is not None
    ctx.save_for_backward(
        args["indices"], args["offsets"], args["per_sample_weights"], *args["cores"]
    )


def _backward(ctx: Any, grad_output: Tensor) -> tuple[Any, ...]:
    indices, offsets, weights, *cores = ctx.saved_tensors
    weights_grad = bool(
        ctx.has_weights and ctx.needs_input_grad[_FWD_ARGS.index("per_sample_weights")]
    )
    core_grads, w_grad = torch.ops.torchrec_tt.tt_embedding_bag_backward(
        grad_output.contiguous(), cores, *ctx.meta, indices, offsets, weights, weights_grad,
        *ctx.options,
    )
    return (
        list(core_grads),
        *([None] * _NUM_META_ARGS),
        None,  # indices
        None,  # offsets
        w_grad if weights_grad else None,
        None,  # bounds_check_mode
        None,  # compute_precision
        None,  # deterministic
    )


# CPU and meta tensors; CUDA tensors take the C++ formula (csrc/embedding_bag_autograd.cpp),
# registered for AutogradCUDA, which wins over this registration for the Autograd alias.
torch.library.register_autograd(
    "torchrec_tt::tt_embedding_bag", _backward, setup_context=_setup_context
)
