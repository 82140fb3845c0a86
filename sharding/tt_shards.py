"""How a TT table splits into column shards (shared by the sharded module and the estimator).

A column-wise shard of a TT table is a contiguous block of embedding columns. Column ``j`` of a
TT table has mixed-radix digits ``(j_1 .. j_K)`` over ``q = (q_1 .. q_K)`` with ``j_1`` most
significant, so a block aligned to multiples of ``D / q_1`` columns is a range of ``j_1``: the
shard is itself a TT with ``q_1`` replaced by the range's length, made of

* a column slice of the first core (``core_0`` is ``[p_1, q_1 * r_1]``, row-major
  ``[p_1, q_1, r_1]``: the slice is core columns ``[j_lo * r_1, j_hi * r_1)``), and
* the remaining cores ``core_1 .. core_{K-1}`` unchanged.

The remaining cores are therefore shared by all column shards of a table; the sharded module
replicates them and sums their gradients across ranks (see ``embeddingbag.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

from torchrec_tt.shapes import TTShape

__all__ = [
    "check_column_shards",
    "column_block",
    "column_shard_core0_columns",
    "column_shard_shape",
    "tt_column_shard_dims",
]


def column_block(shape: TTShape) -> int:
    """Columns per value of the most significant column digit: ``D / q_1``."""
    return shape.embedding_dim // shape.q[0]


def column_shard_shape(shape: TTShape, col_offset: int, num_cols: int) -> TTShape:
    """The TT shape of columns ``[col_offset, col_offset + num_cols)`` of a table."""
    block = column_block(shape)
    if col_offset % block or num_cols % block or num_cols <= 0:
        raise ValueError(
            f"column shard [{col_offset}, {col_offset + num_cols}) of a TT table with "
            f"q={shape.q} is not aligned to multiples of D/q_1 = {block} columns"
        )
    return TTShape(
        num_rows=shape.num_rows,
        embedding_dim=num_cols,
        p=shape.p,
        q=(num_cols // block, *shape.q[1:]),
        ranks=shape.ranks,
    )


def column_shard_core0_columns(shape: TTShape, col_offset: int, num_cols: int) -> tuple[int, int]:
    """``(start, width)`` of the shard's slice of ``core_0``'s columns."""
    column_shard_shape(shape, col_offset, num_cols)  # validates alignment
    block = column_block(shape)
    r1 = shape.full_ranks[1]
    return (col_offset // block) * r1, (num_cols // block) * r1


def check_column_shards(
    table_name: str,
    shape: TTShape,
    shard_offsets: Sequence[Sequence[int]],
    shard_sizes: Sequence[Sequence[int]],
) -> None:
    """Raises ``ValueError`` unless the shards tile ``[N, D]`` by whole column blocks.

    Shards must cover all rows, be column ranges aligned to ``D / q_1``, and together cover every
    column exactly once.
    """
    spans = []
    for offset, size in zip(shard_offsets, shard_sizes):
        if offset[0] != 0 or size[0] != shape.num_rows:
            raise ValueError(
                f"TT table {table_name!r}: a column-wise shard must span all {shape.num_rows} rows, "
                f"got rows [{offset[0]}, {offset[0] + size[0]})"
            )
        try:
            column_shard_shape(shape, offset[1], size[1])
        except ValueError as e:
            raise ValueError(
                f"TT table {table_name!r}: {e}; valid column-shard widths are multiples of "
                f"{column_block(shape)} dividing {shape.embedding_dim} "
                f"(at most q_1 = {shape.q[0]} shards)"
            ) from None
        spans.append((offset[1], offset[1] + size[1]))
    pos = 0
    for start, end in sorted(spans):
        if start != pos:
            raise ValueError(
                f"TT table {table_name!r}: column shards {sorted(spans)} do not tile "
                f"[0, {shape.embedding_dim}) exactly once"
            )
        pos = end
    if pos != shape.embedding_dim:
        raise ValueError(
            f"TT table {table_name!r}: column shards {sorted(spans)} do not cover "
            f"[0, {shape.embedding_dim})"
        )


def tt_column_shard_dims(
    shape: TTShape, world_size: int, min_partition: int | None = None
) -> list[int]:
    """Column-shard widths the planner proposes for a TT table.

    The most shards ``k`` such that ``k`` divides ``q_1``, ``k <= world_size`` and each shard
    keeps at least ``min_partition`` columns; ``[D]`` (one shard) when no split qualifies.
    """
    d, q1 = shape.embedding_dim, shape.q[0]
    best = 1
    for k in range(1, min(q1, world_size) + 1):
        if q1 % k == 0 and (min_partition is None or d // k >= min_partition):
            best = k
    return [d // best] * best
