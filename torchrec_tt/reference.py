"""Plain-PyTorch references for the TT embedding-bag op.

Two kinds live here:

* ``reconstruct_dense`` rebuilds the dense ``[N, D]`` table from the cores; tests compare the
  compiled op with ``torch.nn.functional.embedding_bag`` over this reconstruction.
* ``tt_embedding_bag_reference`` is the per-lookup "gather + bmm" formulation that published TT
  kernels use; the CPU benchmark measures the compiled op against it.

Core layout (shared by every part of torchrec_tt): a table with K cores, row factors
``p = (p_1..p_K)``, column factors ``q = (q_1..q_K)`` and ranks ``r_0 = 1, r_1..r_{K-1}, r_K = 1``
stores core k as a 2-D tensor ``[p_k, r_{k-1} * q_k * r_k]`` (row-major view
``[p_k, r_{k-1}, q_k, r_k]``). Row ``i`` has mixed-radix digits ``(i_1..i_K)`` with ``i_1`` most
significant; column ``j`` likewise with ``j_1`` most significant.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from torchrec_tt.ops import PoolingMode, TTBatchLayout


def _row_digits(indices: Tensor, p: Sequence[int]) -> list[Tensor]:
    digits = []
    rem = indices.long()
    for pk in reversed(p):
        digits.append(rem % pk)
        rem = rem // pk
    return digits[::-1]


def reconstruct_dense(
    cores: Sequence[Tensor],
    p: Sequence[int],
    q: Sequence[int],
    ranks: Sequence[int],
    num_rows: int | None = None,
) -> Tensor:
    """Dense ``[N, D]`` reconstruction of one table (``N = num_rows`` or ``prod(p)``).

    ``ranks`` are the inner ranks (``len(cores) - 1`` of them).
    """
    full = [1, *ranks, 1]
    x = cores[0].reshape(p[0], q[0], full[1])  # [P, Q, r]
    for k in range(1, len(cores)):
        g = cores[k].reshape(p[k], full[k], q[k], full[k + 1])
        x = torch.einsum("aqr,brcs->abqcs", x, g)
        x = x.reshape(x.shape[0] * x.shape[1], x.shape[2] * x.shape[3], full[k + 1])
    dense = x.reshape(x.shape[0], x.shape[1])
    return dense if num_rows is None else dense[:num_rows]


def tt_rows_reference(
    cores: Sequence[Tensor],
    p: Sequence[int],
    q: Sequence[int],
    ranks: Sequence[int],
    indices: Tensor,
) -> Tensor:
    """Rows ``[n, D]`` for ``indices``: gather core slices per lookup, chain of batched matmuls."""
    full = [1, *ranks, 1]
    digits = _row_digits(indices, p)
    n = indices.numel()
    x = cores[0][digits[0]].reshape(n, q[0], full[1])  # [n, Q, r]
    for k in range(1, len(cores)):
        g = cores[k][digits[k]].reshape(n, full[k], q[k] * full[k + 1])
        x = torch.bmm(x, g).reshape(n, -1, full[k + 1])
    return x.reshape(n, -1)


def split_cores(cores: Sequence[Tensor], num_cores: Sequence[int]) -> list[list[Tensor]]:
    """Splits the flat core list of a table-batched call into one list per table."""
    out, pos = [], 0
    for k in num_cores:
        out.append(list(cores[pos : pos + k]))
        pos += k
    return out


def tt_embedding_bag_dense_reference(
    cores: Sequence[Tensor],
    layout: TTBatchLayout,
    indices: Tensor,
    offsets: Tensor,
    per_sample_weights: Tensor | None = None,
) -> Tensor:
    """Same contract as :func:`torchrec_tt.ops.tt_embedding_bag`, computed with
    ``F.embedding_bag`` over the dense reconstruction of every table (differentiable)."""
    per_table = split_cores(cores, layout.num_cores)
    p_t = split_cores(list(layout.p_shapes), layout.num_cores)
    q_t = split_cores(list(layout.q_shapes), layout.num_cores)
    r_t = split_cores(list(layout.ranks), [k - 1 for k in layout.num_cores])
    num_features = len(layout.feature_table_map)
    batch = (offsets.numel() - 1) // num_features
    offsets = offsets.long()
    outs = []
    for f, t in enumerate(layout.feature_table_map):
        dense = reconstruct_dense(per_table[t], p_t[t], q_t[t], r_t[t], layout.num_rows[t])
        off = offsets[f * batch : (f + 1) * batch + 1]
        lo, hi = int(off[0]), int(off[-1])
        w = None if per_sample_weights is None else per_sample_weights[lo:hi]
        pooled = torch.nn.functional.embedding_bag(
            indices[lo:hi].long(), dense, off[:-1] - lo, mode="sum", per_sample_weights=w
        )
        if layout.pooling_modes[t] == PoolingMode.MEAN:
            lengths = (off[1:] - off[:-1]).clamp(min=1).to(pooled.dtype)
            pooled = pooled / lengths[:, None]
        outs.append(pooled)
    return torch.cat(outs, dim=1)
