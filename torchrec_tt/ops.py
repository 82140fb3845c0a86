"""Python side of the ``torchrec_tt`` operator library: fake (meta) kernels, autograd, and the
thin wrapper :func:`tt_embedding_bag` that modules call.

The schemas and the CPU (and, when built, CUDA) kernels live in ``csrc/``; importing this module
loads ``torchrec_tt._C`` first so the Python registrations find the ops defined.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from torchrec_tt import _C  # noqa: F401  (registers the torchrec_tt ops)

__all__ = ["PoolingMode", "TTBatchLayout", "tt_embedding_bag"]


@enum.unique
class PoolingMode(enum.IntEnum):
    """Pooling of a bag; values match FBGEMM's ``PoolingMode``."""

    SUM = 0
    MEAN = 1


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
    """

    num_cores: tuple[int, ...]
    p_shapes: tuple[int, ...]
    q_shapes: tuple[int, ...]
    ranks: tuple[int, ...]
    num_rows: tuple[int, ...]
    feature_table_map: tuple[int, ...]
    table_names: tuple[str, ...]

    @staticmethod
    def from_tables(
        tables: Sequence[tuple[str, int, Sequence[int], Sequence[int], Sequence[int]]],
        feature_table_map: Sequence[int],
    ) -> TTBatchLayout:
        """Builds a layout from ``(name, num_rows, p, q, ranks)`` per table."""
        return TTBatchLayout(
            num_cores=tuple(len(p) for _, _, p, _, _ in tables),
            p_shapes=tuple(x for _, _, p, _, _ in tables for x in p),
            q_shapes=tuple(x for _, _, _, q, _ in tables for x in q),
            ranks=tuple(x for _, _, _, _, r in tables for x in r),
            num_rows=tuple(n for _, n, _, _, _ in tables),
            feature_table_map=tuple(feature_table_map),
            table_names=tuple(name for name, _, _, _, _ in tables),
        )

    def table_dims(self) -> list[int]:
        """Embedding dimension D of every table."""
        dims, pos = [], 0
        for k in self.num_cores:
            d = 1
            for x in self.q_shapes[pos : pos + k]:
                d *= x
            dims.append(d)
            pos += k
        return dims

    def feature_dims(self) -> list[int]:
        """Embedding dimension of every feature, in output order."""
        dims = self.table_dims()
        return [dims[t] for t in self.feature_table_map]

    def op_args(self) -> tuple[list[int], list[int], list[int], list[int], list[int], list[int], list[str]]:
        return (
            list(self.num_cores),
            list(self.p_shapes),
            list(self.q_shapes),
            list(self.ranks),
            list(self.num_rows),
            list(self.feature_table_map),
            list(self.table_names),
        )


def tt_embedding_bag(
    cores: Sequence[Tensor],
    layout: TTBatchLayout,
    indices: Tensor,
    offsets: Tensor,
    pooling_mode: PoolingMode = PoolingMode.SUM,
    per_sample_weights: Tensor | None = None,
) -> Tensor:
    """Pooled TT embedding lookups of many tables in one call.

    Args:
        cores: every table's cores in order, each 2-D ``[p_k, r_{k-1} * q_k * r_k]``.
        layout: the tables' shapes and the feature → table map.
        indices: 1-D int32/int64, the lookups of all F features back to back.
        offsets: 1-D int32/int64 of length ``F * B + 1``; bag ``(f, b)`` is
            ``indices[offsets[f * B + b] : offsets[f * B + b + 1]]`` (FBGEMM TBE layout).
        pooling_mode: SUM, or MEAN (weighted sum divided by the bag length; empty bags give 0).
        per_sample_weights: optional 1-D weights, one per index, in the cores' dtype.

    Returns:
        ``[B, sum of the features' D]``, features side by side in ``feature_table_map`` order.
    """
    return torch.ops.torchrec_tt.tt_embedding_bag(
        list(cores), *layout.op_args(), indices, offsets, int(pooling_mode), per_sample_weights
    )


def _table_dims(num_cores: Sequence[int], q_shapes: Sequence[int]) -> list[int]:
    dims, pos = [], 0
    for k in num_cores:
        d = 1
        for x in q_shapes[pos : pos + k]:
            d *= x
        dims.append(d)
        pos += k
    return dims


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
    indices: Tensor,
    offsets: Tensor,
    pooling_mode: int,
    per_sample_weights: Tensor | None = None,
) -> Tensor:
    num_features = len(feature_table_map)
    torch._check(num_features >= 1, lambda: "feature_table_map is empty")
    torch._check(indices.dim() == 1 and offsets.dim() == 1, lambda: "indices and offsets must be 1-D")
    torch._check(
        (offsets.shape[0] - 1) % num_features == 0,
        lambda: "offsets must have F*B+1 entries",
    )
    dims = _table_dims(num_cores, q_shapes)
    total_d = sum(dims[t] for t in feature_table_map)
    batch = (offsets.shape[0] - 1) // num_features
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
    indices: Tensor,
    offsets: Tensor,
    pooling_mode: int,
    per_sample_weights: Tensor | None,
    per_sample_weights_grad: bool,
) -> tuple[list[Tensor], Tensor]:
    grads = [torch.empty_like(c, memory_format=torch.contiguous_format) for c in cores]
    n = indices.shape[0] if per_sample_weights_grad else 0
    return grads, grad_output.new_empty((n,))


# Positions of the forward op's arguments (the autograd formula needs them by name).
_FWD_ARGS = (
    "cores num_cores p_shapes q_shapes ranks num_rows feature_table_map table_names "
    "indices offsets pooling_mode per_sample_weights"
).split()


def _setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    args = dict(zip(_FWD_ARGS, inputs))
    cores = args["cores"]
    weights = args["per_sample_weights"]
    ctx.num_core_tensors = len(cores)
    ctx.meta = tuple(args[k] for k in _FWD_ARGS[1:8])
    ctx.pooling_mode = args["pooling_mode"]
    ctx.has_weights = weights is not None
    ctx.save_for_backward(args["indices"], args["offsets"], weights, *cores)


def _backward(ctx, grad_output: Tensor):  # type: ignore[no-untyped-def]
    indices, offsets, weights, *cores = ctx.saved_tensors
    weights_grad = ctx.has_weights and ctx.needs_input_grad[_FWD_ARGS.index("per_sample_weights")]
    core_grads, w_grad = torch.ops.torchrec_tt.tt_embedding_bag_backward(
        grad_output.contiguous(),
        cores,
        *ctx.meta,
        indices,
        offsets,
        ctx.pooling_mode,
        weights,
        bool(weights_grad),
    )
    return (
        list(core_grads),
        None, None, None, None, None, None, None,  # the int/str metadata
        None,  # indices
        None,  # offsets
        None,  # pooling_mode
        w_grad if weights_grad else None,
    )


torch.library.register_autograd(
    "torchrec_tt::tt_embedding_bag", _backward, setup_context=_setup_context
)
