"""Kernel-aware TT shapes: the number of cores and the row/column factors chosen from a cost
model of the CUDA kernels (parameters, FLOPs, bytes moved, intermediate sizes).

The CUDA op looks a row up as two factors, ``row i = P[i // p_last] @ G_last[i % p_last]``,
where ``P`` is the chain of all cores but the last (core 0 itself for 2 cores, built once per
call for 3 and 4). Per lookup that reads ``Q*R + R*q_last`` floats (``Q = D / q_last``) and does
``2*D*R`` FLOPs forward, twice that backward, whatever the number of cores. A balanced 3-core
chain computed per row costs ``2R(q_0 q_1 R + D)`` instead. See docs/benchmarks.md for the
measurements behind the constants below.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from torchrec_tt.shapes import TTShape, factor_dim, factor_rows

__all__ = [
    "KernelCost",
    "choose_tt_shape",
    "kernel_cost",
    "two_factor_fits",
    "two_factor_p",
    "two_factor_q",
    "two_factor_shape",
]

#: Ranks the two-factor CUDA kernels take (lanes own 4-rank chunks / single ranks).
TWO_FACTOR_RANKS = (4, 8, 16, 32, 64, 128)
#: The CUDA kernels build P for 3- and 4-core tables up to this many floats (32 MB).
MAX_PREFIX_FLOATS = 1 << 23
#: The two-factor kernels' cost on an H200, fitted to the v7 Kaggle-7 fwd + bwd + SGD steps with
#: the exact-shape kernels (docs/benchmarks.md "v7", graphed, 7 tables at R=32): per lookup a fixed part and the 6DR
#: FLOPs at an effective rate (the slopes between B=8,192 and 65,536 at D=16 and 64), per call a
#: part per table and one per byte of cores (the intercepts: the dense gradient zeroing and the
#: SGD update touch every core).
TWO_FACTOR_FLOPS = 14.3e12
TWO_FACTOR_LOOKUP_SECONDS = 0.212e-9
TWO_FACTOR_TABLE_SECONDS = 12.6e-6
TWO_FACTOR_CORE_BYTE_SECONDS = 2.6e-6 / 2**20
#: cuBLAS rate of the level GEMMs that build P for 3- and 4-core tables (fitted to v4).
PREFIX_GEMM_FLOPS = 3e12
OLDER_KERNEL_FLOPS = 1.7e13


def _pow2_at_least(x: int) -> int:
    p = 1
    while p < x:
        p <<= 1
    return p


def two_factor_fits(shape: TTShape) -> bool:
    """Whether the CUDA op's two-factor kernels take this table (mirrors ``two_factor::applies``
    in csrc/embedding_bag_cuda_two_factor.cuh for a float32, non-deterministic call)."""
    r, ql = shape.ranks[-1], shape.q[-1]
    q_rows = shape.embedding_dim // ql
    if r not in TWO_FACTOR_RANKS or ql > 8 or q_rows > 32:
        return False
    mstep = 32 // (r // 4)
    upl = _pow2_at_least(-(-q_rows // mstep))
    rpl = _pow2_at_least(-(-r // 32))
    qlm = max(4, _pow2_at_least(ql))
    if upl * qlm > 32 or rpl * max(8, _pow2_at_least(q_rows)) > 32:
        return False
    if shape.num_cores > 2 and prefix_floats(shape) > MAX_PREFIX_FLOATS:
        return False
    return True


def prefix_floats(shape: TTShape) -> int:
    """Floats of the prefix table P the CUDA op builds per call (0 for 2 cores: P is core 0)."""
    if shape.num_cores == 2:
        return 0
    return math.prod(shape.p[:-1]) * (shape.embedding_dim // shape.q[-1]) * shape.ranks[-1]


@dataclass(frozen=True)
class KernelCost:
    """Modelled cost of one table in the CUDA op (per step of ``lookups`` lookups)."""

    params: int            # floats of the cores
    flops_per_lookup: int  # forward + backward
    forward_flops: int     # per lookup
    backward_flops: int    # per lookup
    bytes_per_lookup: int  # core data a lookup reads (from L2 when the cores fit there)
    prefix_floats: int     # P built per call (3-4 cores)
    prefix_flops: int      # building P and going back through it, per call
    two_factor: bool       # taken by the two-factor kernels

    @property
    def flops_per_second(self) -> float:
        """The per-FLOP rate of the kernels that run the shape: for the two-factor kernels only
        the FLOP term of their model (``step_seconds`` adds per-lookup and per-call terms)."""
        return TWO_FACTOR_FLOPS if self.two_factor else OLDER_KERNEL_FLOPS

    def _two_factor_per_lookup(self) -> float:
        return TWO_FACTOR_LOOKUP_SECONDS + self.flops_per_lookup / TWO_FACTOR_FLOPS

    def forward_seconds(self, lookups: float) -> float:
        """Modelled forward GPU time of ``lookups`` lookups (a third of the per-lookup cost: the
        forward's share of the FLOPs; the prefix build)."""
        if not self.two_factor:
            return lookups * self.forward_flops / self.flops_per_second
        per_lookup = self._two_factor_per_lookup()
        prefix = self.prefix_flops / 3 / PREFIX_GEMM_FLOPS
        return lookups * per_lookup * self.forward_flops / self.flops_per_lookup + prefix

    def backward_seconds(self, lookups: float) -> float:
        """Modelled backward + update GPU time: the rest of the per-lookup cost and the per-call
        costs (sort, gradient zeroing, the update of every core)."""
        if not self.two_factor:
            return lookups * self.backward_flops / self.flops_per_second
        per_lookup = self._two_factor_per_lookup()
        fixed = TWO_FACTOR_TABLE_SECONDS + 4 * self.params * TWO_FACTOR_CORE_BYTE_SECONDS
        prefix = 2 * self.prefix_flops / 3 / PREFIX_GEMM_FLOPS
        return lookups * per_lookup * self.backward_flops / self.flops_per_lookup + fixed + prefix

    def step_seconds(self, lookups: float) -> float:
        """Modelled fwd + bwd + update GPU time of one call with ``lookups`` lookups of this table
        (estimate / measured per Kaggle-7 case in docs/benchmarks.md "v7")."""
        return self.forward_seconds(lookups) + self.backward_seconds(lookups)


def kernel_cost(shape: TTShape) -> KernelCost:
    """The cost model of ``shape`` in the CUDA op."""
    d, r_last, ql = shape.embedding_dim, shape.ranks[-1], shape.q[-1]
    fits = two_factor_fits(shape)
    pf = prefix_floats(shape)
    if fits:
        fwd, bwd = 2 * d * r_last, 4 * d * r_last  # backward: dP and dG_last
        nbytes = 4 * (d // ql * r_last + r_last * ql)
        # Each level l of P is one GEMM [rows, r_l] x [r_l, p_l q_l r_{l+1}]; backward twice that.
        prefix_flops, rows, m = 0, shape.p[0], shape.q[0]
        full = shape.full_ranks
        for k in range(1, shape.num_cores - 1):
            prefix_flops += 3 * 2 * rows * m * full[k] * shape.p[k] * shape.q[k] * full[k + 1]
            rows *= shape.p[k]
            m *= shape.q[k]
    else:
        fwd, bwd = shape.forward_flops_per_lookup(), shape.backward_flops_per_lookup()
        full = shape.full_ranks
        nbytes = 4 * sum(full[k] * shape.q[k] * full[k + 1] for k in range(shape.num_cores))
        prefix_flops = 0
    return KernelCost(
        params=shape.num_parameters(),
        flops_per_lookup=fwd + bwd,
        forward_flops=fwd,
        backward_flops=bwd,
        bytes_per_lookup=nbytes,
        prefix_floats=pf,
        prefix_flops=prefix_flops,
        two_factor=fits,
    )


def two_factor_q(embedding_dim: int) -> tuple[int, int] | None:
    """``(Q, q_last)`` with ``Q * q_last = D`` minimising the floats a lookup reads per rank
    (``Q + q_last``) within the kernels' limits (q_last <= 8, Q <= 32), larger q_last on ties;
    None when D has no such split."""
    best: tuple[int, int] | None = None
    for ql in range(min(8, embedding_dim), 0, -1):
        if embedding_dim % ql or embedding_dim // ql > 32:
            continue
        if best is None or embedding_dim // ql + ql < best[0] + best[1]:
            best = (embedding_dim // ql, ql)
    return best


def two_factor_p(num_rows: int, q: tuple[int, int]) -> tuple[int, int]:
    """Row factors minimising ``p_0 Q R + p_1 R q_last`` with ``p_0 p_1 >= N``:
    ``p_0 = sqrt(N q_last / Q)``."""
    p0 = max(1, min(num_rows, round(math.sqrt(num_rows * q[1] / q[0]))))
    return p0, -(-num_rows // p0)


def two_factor_shape(num_rows: int, embedding_dim: int, rank: int) -> TTShape:
    """The 2-core shape the two-factor kernels run best (``two_factor_q``, ``two_factor_p``)."""
    q = two_factor_q(embedding_dim)
    if q is None:
        raise ValueError(f"embedding_dim {embedding_dim} has no split D = Q * q_last with q_last <= 8, Q <= 32")
    return TTShape(num_rows, embedding_dim, two_factor_p(num_rows, q), q, (rank,))


def _balanced_shape(num_rows: int, embedding_dim: int, ranks: Sequence[int]) -> TTShape:
    k = len(ranks) + 1
    return TTShape(num_rows, embedding_dim, factor_rows(num_rows, k), factor_dim(embedding_dim, k), tuple(ranks))


def choose_tt_shape(
    num_rows: int,
    embedding_dim: int,
    rank: int,
    max_parameters: int | None = None,
    lookups_per_step: int = 65_536,
) -> TTShape:
    """The fastest modelled shape of an ``num_rows x embedding_dim`` table at ``rank``, among
    the two-factor 2-core shape and balanced 3- and 4-core shapes, with at most
    ``max_parameters`` core floats (default: no budget). Raises ``ValueError`` if none fits."""
    candidates = []
    try:
        candidates.append(two_factor_shape(num_rows, embedding_dim, rank))
    except ValueError:
        pass
    for k in (3, 4):
        try:
            candidates.append(_balanced_shape(num_rows, embedding_dim, [rank] * (k - 1)))
        except ValueError:
            continue
    if max_parameters is not None:
        candidates = [s for s in candidates if s.num_parameters() <= max_parameters]
    if not candidates:
        raise ValueError(
            f"no TT shape of a {num_rows} x {embedding_dim} table at rank {rank} has at most "
            f"{max_parameters} parameters; lower the rank"
        )
    return min(candidates, key=lambda s: (kernel_cost(s).step_seconds(lookups_per_step), s.num_parameters()))
