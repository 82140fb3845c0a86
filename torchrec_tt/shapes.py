"""Tensor-Train shape math: factorisations, validation, parameter and FLOP counts.

Layout reminder (see ``reference.py``): core ``k`` is ``[p_k, r_{k-1} * q_k * r_k]`` with
``r_0 = r_K = 1``; row digits and column digits are most-significant-first.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

__all__ = [
    "SUPPORTED_NUM_CORES",
    "TTShape",
    "factor_dim",
    "factor_rows",
    "make_tt_shape",
    "max_useful_ranks",
]

#: Core counts the kernels are built for.
SUPPORTED_NUM_CORES: tuple[int, ...] = (2, 3, 4)

# factor_rows searches each factor in [root / _ROW_WINDOW, root * _ROW_WINDOW]. A narrow window
# keeps the factors near-balanced (parameter count ~ sum_k p_k, minimised by equal p_k) while still
# offering hundreds of candidates for large N, so the minimum padding found is tiny.
_ROW_WINDOW = 1.25
# Cap on outer-level candidates, spread over the K-2 outer levels. The last two levels are
# vectorised (three factors: one grid of first factor x pair window), so one call takes a few
# milliseconds at any size up to MAX_ROWS (docs/benchmarks.md, "factor_rows").
_ROW_OUTER_BUDGET = 4096
_PAIR_MAX_HALF_WINDOW = 1 << 17
# Above this many pair candidates in all (first factors x the pair window), three factors try
# fewer first factors, so that one call stays in the milliseconds at any size. Sizes up to
# ~1.8e8 rows (3 cores) never reach it (their factors are the same as without it).
_GRID_BUDGET = 1 << 16
# The same for four (or more) factors, over all the first factors tried.
_GRID_BUDGET_4 = 1 << 18
#: Candidates the search evaluated since the last reset (for tests that bound the work).
search_stats = {"candidates": 0}

#: Rows a table may have: the op's sort keys are ``table << 40 | index``, so indices must be
#: below 2^40.
MAX_ROWS = 1 << 40


def _prod(xs: Sequence[int]) -> int:
    return math.prod(int(x) for x in xs)


def _table_prefix(table_name: str) -> str:
    return f"TT table {table_name!r}: " if table_name else "TT table: "


@dataclass(frozen=True)
class TTShape:
    """One TT-compressed table: ``N x D`` split as ``prod(p) >= N`` and ``prod(q) == D``."""

    num_rows: int
    embedding_dim: int
    p: tuple[int, ...]
    q: tuple[int, ...]
    ranks: tuple[int, ...]  # inner ranks r_1..r_{K-1}

    def __post_init__(self) -> None:
        # Accept lists from callers but store tuples so the shape stays hashable.
        for name in ("p", "q", "ranks"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        _validate(self.num_rows, self.embedding_dim, self.p, self.q, self.ranks, "")

    @property
    def num_cores(self) -> int:
        return len(self.p)

    @property
    def full_ranks(self) -> tuple[int, ...]:
        """``(1, r_1, ..., r_{K-1}, 1)``."""
        return (1, *self.ranks, 1)

    @property
    def padded_rows(self) -> int:
        """``prod(p)``: rows the TT represents (rows ``>= num_rows`` are never looked up)."""
        return _prod(self.p)

    def core_shapes(self) -> list[tuple[int, int]]:
        """2-D storage shapes ``[p_k, r_{k-1} * q_k * r_k]``."""
        r = self.full_ranks
        return [(pk, r[k] * qk * r[k + 1]) for k, (pk, qk) in enumerate(zip(self.p, self.q))]

    def num_parameters(self) -> int:
        return sum(a * b for a, b in self.core_shapes())

    def num_bytes(self, element_size: int = 4) -> int:
        return self.num_parameters() * element_size

    def dense_num_bytes(self, element_size: int = 4) -> int:
        """Bytes of the uncompressed ``[N, D]`` table (unpadded)."""
        return self.num_rows * self.embedding_dim * element_size

    def compression_ratio(self) -> float:
        """Dense parameters / TT parameters (element size cancels)."""
        return self.num_rows * self.embedding_dim / self.num_parameters()

    def forward_flops_per_lookup(self) -> int:
        """FLOPs of one row reconstruction without prefix dedup.

        Left-to-right chain: the running product ``[q_1..q_{k-1}, r_{k-1}]`` times core slice
        ``[r_{k-1}, q_k r_k]`` costs ``2 (q_1..q_{k-1}) r_{k-1} q_k r_k`` for ``k >= 2``. For K=3
        with equal ranks R this is ``2R(q_1 q_2 R + D)``.
        """
        r = self.full_ranks
        flops = 0
        left = self.q[0]  # rows of the running product: q_1..q_{k-1}
        for k in range(1, self.num_cores):
            flops += 2 * left * r[k] * self.q[k] * r[k + 1]
            left *= self.q[k]
        return flops

    def backward_flops_per_lookup(self) -> int:
        """FLOPs of one row's gradient w.r.t. its K core slices: ``2 * forward``.

        Each chain matmul ``Y_k = X_{k-1} @ G_k`` (``X_{k-1}: [m, r_{k-1}]``,
        ``G_k: [r_{k-1}, q_k r_k]``, ``m = q_1..q_{k-1}``) needs ``dG_k = X_{k-1}^T dY_k`` and
        ``dX_{k-1} = dY_k G_k^T``, each ``2 m r_{k-1} q_k r_k`` FLOPs; for ``k = 2``, ``dX_1`` is
        core 1's slice gradient. Assumes the forward intermediates ``X_k`` are kept (recomputing
        them adds one forward) and excludes the scatter-add of slice gradients into the cores.
        """
        return 2 * self.forward_flops_per_lookup()


def _validate(
    num_rows: int,
    embedding_dim: int,
    p: Sequence[int],
    q: Sequence[int],
    ranks: Sequence[int],
    table_name: str,
) -> None:
    pre = _table_prefix(table_name)
    if not _is_int(num_rows) or num_rows < 1:
        raise ValueError(f"{pre}num_rows must be a positive int, got {num_rows!r}")
    _check_max_rows(num_rows, table_name)
    if not _is_int(embedding_dim) or embedding_dim < 1:
        raise ValueError(f"{pre}embedding_dim must be a positive int, got {embedding_dim!r}")
    k = len(ranks) + 1
    if k not in SUPPORTED_NUM_CORES:
        raise ValueError(
            f"{pre}{len(ranks)} ranks give {k} cores; supported core counts are "
            f"{SUPPORTED_NUM_CORES} (i.e. 1 to 3 inner ranks)"
        )
    if not all(_is_int(r) and r >= 1 for r in ranks):
        raise ValueError(f"{pre}ranks must be positive ints, got {tuple(ranks)!r}")
    for name, f in (("p", p), ("q", q)):
        if len(f) != k:
            raise ValueError(
                f"{pre}len({name}) = {len(f)} but there are {k} cores ({name}={tuple(f)})"
            )
        if not all(_is_int(v) and v >= 1 for v in f):
            raise ValueError(f"{pre}factors {name}={tuple(f)} must be positive ints")
    if _prod(p) < num_rows:
        raise ValueError(
            f"{pre}row factors p={tuple(p)} (prod {_prod(p)}) cannot represent {num_rows} rows"
        )
    if _prod(q) != embedding_dim:
        raise ValueError(
            f"{pre}column factors q={tuple(q)} (prod {_prod(q)}) must multiply to "
            f"embedding_dim={embedding_dim}"
        )


def _check_max_rows(num_rows: int, table_name: str) -> None:
    if num_rows > MAX_ROWS:
        raise ValueError(
            f"{_table_prefix(table_name)}num_rows {num_rows} exceeds the limit of 2^40 = "
            f"{MAX_ROWS} rows (the op keys lookups as table << 40 | index)"
        )


#: Parameters a TT table may always have, even when that is more than its dense table (small
#: tables at the default ranks are common in tests and examples).
_TT_PARAMETER_ALLOWANCE = 1 << 24


def _check_not_larger_than_dense(shape: TTShape, table_name: str) -> None:
    """Ranks whose cores would outgrow the dense table (beyond a small allowance) are a
    mistake, not a compression: reject them before anything allocates the cores."""
    tt, dense = shape.num_parameters(), shape.num_rows * shape.embedding_dim
    if tt > max(dense, _TT_PARAMETER_ALLOWANCE):
        raise ValueError(
            f"{_table_prefix(table_name)}ranks {shape.ranks} give {tt} TT parameters "
            f"({shape.num_bytes(4)} bytes) for a {shape.num_rows}x{shape.embedding_dim} table "
            f"of {dense} ({shape.dense_num_bytes(4)} bytes): more than the dense table; "
            f"useful ranks are at most {max_useful_ranks(shape.p, shape.q)}"
        )


def _is_int(v: object) -> bool:
    # bool is an int subclass but never a meaningful size; numpy ints are fine.
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _imbalance(f: Sequence[int]) -> float:
    return max(f) / min(f)


def _window(m: int, k: int) -> tuple[int, int]:
    """Candidate range for one of ``k`` factors of ``m``, around ``m^(1/k)``."""
    root = m ** (1.0 / k)
    lo = max(1, min(math.floor(root), math.ceil(root / _ROW_WINDOW)))
    hi = max(math.ceil(root), math.floor(root * _ROW_WINDOW))
    return lo, min(hi, m)


def _pair_window(m: int) -> tuple[int, int]:
    """Candidates for the first of two factors of ``m`` (capped for astronomically large m)."""
    lo, hi = _window(m, 2)
    mid = math.isqrt(m)
    return max(lo, mid - _PAIR_MAX_HALF_WINDOW), min(hi, mid + _PAIR_MAX_HALF_WINDOW)


def _best_pair(m: int) -> tuple[int, tuple[int, int]]:
    """(padding, (a, b)) with ``a * b >= m``: minimal padding over the candidates ``a``, then the
    smallest ``max/min``, then the smallest ``a``; vectorised over the window."""
    lo, hi = _pair_window(m)
    search_stats["candidates"] += hi - lo + 1
    a = np.arange(lo, hi + 1, dtype=np.int64)
    pad = (-m) % a  # with b = ceil(m / a), the smallest partner: a * b - m
    ties = np.flatnonzero(pad == pad.min())  # few: only these need the ratio
    at, bt = a[ties], -((-m) // a[ties])
    i = ties[int(np.argmin(np.maximum(at, bt) / np.minimum(at, bt)))]  # first: smallest a
    return int(pad[i]), (int(a[i]), int(-((-m) // a[i])))


def _best_triple(m: int, per_level: int, budget: int) -> tuple[int, tuple[int, ...]]:
    """(padding, (a, b, c)) for three factors: each candidate ``a`` with the best pair of
    ``ceil(m / a)`` (as :func:`_best_pair` picks it), all candidates at once as one
    ``a x b`` grid (per row, ``b`` runs over the pair window of that row's ``ceil(m / a)``)."""
    lo, hi = _window(m, 3)
    mid = round(m ** (1.0 / 3))
    p_lo, p_hi = _window(-(-m // max(1, mid)), 2)
    pair_width = min(p_hi - p_lo + 1, 2 * _PAIR_MAX_HALF_WINDOW + 1)
    # Bound the grid: fewer first factors when the pair windows are wide.
    per_level = min(per_level, max(4, budget // pair_width))
    start = max(lo, min(mid - per_level // 2, hi - per_level + 1))
    a = np.arange(start, min(hi, start + per_level - 1) + 1, dtype=np.int64)
    rest = -((-m) // a)  # the pair must cover ceil(m / a)
    windows = [_pair_window(int(r)) for r in rest]
    b_lo = np.array([w[0] for w in windows], dtype=np.int64)
    width = np.array([w[1] - w[0] + 1 for w in windows], dtype=np.int64)
    b = b_lo[:, None] + np.arange(int(width.max()), dtype=np.int64)[None, :]
    valid = np.arange(b.shape[1])[None, :] < width[:, None]
    search_stats["candidates"] += int(width.sum())
    big = np.iinfo(np.int64).max
    rest_pad = np.where(valid, (-rest[:, None]) % b, big)
    row_min = rest_pad.min(axis=1)
    c = -((-rest[:, None]) // b)
    ratio = np.where(rest_pad == row_min[:, None], np.maximum(b, c) / np.minimum(b, c), np.inf)
    j = np.argmin(ratio, axis=1)  # the pair's choice per row (first: smallest b)
    total = a * (rest + row_min) - m
    best: tuple[int, float, tuple[int, ...]] | None = None
    for i in np.flatnonzero(total == total.min()):  # the few rows with minimal padding
        f = (int(a[i]), int(b[i, j[i]]), int(c[i, j[i]]))
        key = (int(total[i]), _imbalance(f), f)
        if best is None or key < best:
            best = key
    assert best is not None
    return best[0], best[2]


@lru_cache(maxsize=4096)
def _best_factors(m: int, k: int, per_level: int, budget: int = 0) -> tuple[int, tuple[int, ...]]:
    """(padding, factors) minimising padding of ``k`` factors covering ``m``, then imbalance;
    three factors evaluate at most about ``budget`` pair candidates (``_GRID_BUDGET`` if 0)."""
    if k == 1:
        return 0, (m,)
    if k == 2:
        return _best_pair(m)
    if k == 3:
        return _best_triple(m, per_level, budget or _GRID_BUDGET)
    lo, hi = _window(m, k)
    mid = round(m ** (1.0 / k))
    # The per_level candidates nearest the root (the whole window when it is small enough).
    start = max(lo, min(mid - per_level // 2, hi - per_level + 1))
    cands = range(start, min(hi, start + per_level - 1) + 1)
    # The levels below share the budget (so does each level below them).
    share = max(1 << 10, (budget or _GRID_BUDGET_4) // len(cands))
    best: tuple[int, float, tuple[int, ...]] | None = None
    for a in cands:
        rest_m = -(-m // a)  # the other factors must cover ceil(m / a)
        rest_pad, rest = _best_factors(rest_m, k - 1, per_level, share)
        # Total padding a * (rest_m + rest_pad) - m: minimal for this a because rest is minimal.
        pad = a * (rest_m + rest_pad) - m
        f = (a, *rest)
        key = (pad, _imbalance(f), f)
        if best is None or key < best:
            best = key
    assert best is not None
    return best[0], best[2]


def factor_rows(num_rows: int, num_cores: int) -> tuple[int, ...]:
    """Near-balanced row factors ``p`` (ascending) with ``prod(p) >= num_rows`` and little padding.

    Each factor is searched in a window around ``N^(1/K)`` (recursively for the remaining product);
    among candidates the minimal padding wins, then the smallest ``max/min`` ratio. The largest
    factor goes last so that prefixes ``(i_1..i_{K-1})`` are shared by as many rows as possible.
    """
    if not _is_int(num_rows) or num_rows < 1:
        raise ValueError(f"num_rows must be a positive int, got {num_rows!r}")
    _check_max_rows(num_rows, "")
    if not _is_int(num_cores) or num_cores < 1:
        raise ValueError(f"num_cores must be a positive int, got {num_cores!r}")
    outer_levels = max(1, num_cores - 2)
    per_level = max(2, int(_ROW_OUTER_BUDGET ** (1.0 / outer_levels)))
    _, f = _best_factors(int(num_rows), int(num_cores), per_level)
    return tuple(sorted(f))


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def factor_dim(embedding_dim: int, num_cores: int) -> tuple[int, ...]:
    """Exact factors of ``D`` (ascending, largest last), as balanced as possible.

    Enumerates all non-decreasing factorisations (D is small) and minimises the variance of
    ``log f`` around ``log D / K``, then the largest factor. A prime D gives ``(1, .., 1, D)``.
    """
    if not _is_int(embedding_dim) or embedding_dim < 1:
        raise ValueError(f"embedding_dim must be a positive int, got {embedding_dim!r}")
    if not _is_int(num_cores) or num_cores < 1:
        raise ValueError(f"num_cores must be a positive int, got {num_cores!r}")
    d, k = int(embedding_dim), int(num_cores)
    divs = _divisors(d)
    mean_log = math.log(d) / k

    def partitions(n: int, parts: int, min_f: int) -> list[tuple[int, ...]]:
        if parts == 1:
            return [(n,)] if n >= min_f else []
        out = []
        for f in divs:
            if f < min_f or n % f or f ** parts > n:  # f is the smallest of the remaining parts
                continue
            out.extend((f, *rest) for rest in partitions(n // f, parts - 1, f))
        return out

    def key(f: tuple[int, ...]) -> tuple[float, int]:
        var = sum((math.log(x) - mean_log) ** 2 for x in f)
        return (round(var, 12), max(f))  # round: ties must not hinge on float noise

    return min(partitions(d, k, 1), key=key)


def make_tt_shape(
    num_rows: int,
    embedding_dim: int,
    ranks: Sequence[int],
    p: Sequence[int] | None = None,
    q: Sequence[int] | None = None,
    table_name: str = "",
) -> TTShape:
    """Build a validated :class:`TTShape`, choosing ``p``/``q`` automatically when omitted.

    Raises ``ValueError`` naming ``table_name`` and the problem for any invalid input.
    """
    pre = _table_prefix(table_name)
    if isinstance(ranks, (str, bytes)) or not isinstance(ranks, Sequence | np.ndarray):
        raise ValueError(
            f"{pre}ranks (tt_ranks) must be a list of inner ranks, one fewer than the cores "
            f"(e.g. [{ranks!r}, {ranks!r}] for 3 cores), got {ranks!r}"
        )
    ranks = tuple(ranks)
    if not all(_is_int(r) and r >= 1 for r in ranks):
        raise ValueError(f"{pre}ranks must be positive ints, got {ranks!r}")
    k = len(ranks) + 1
    if k not in SUPPORTED_NUM_CORES:
        raise ValueError(
            f"{pre}{len(ranks)} ranks give {k} cores; supported core counts are "
            f"{SUPPORTED_NUM_CORES} (i.e. 1 to 3 inner ranks)"
        )
    if not _is_int(num_rows) or num_rows < 1:
        raise ValueError(f"{pre}num_rows must be a positive int, got {num_rows!r}")
    _check_max_rows(num_rows, table_name)
    if not _is_int(embedding_dim) or embedding_dim < 1:
        raise ValueError(f"{pre}embedding_dim must be a positive int, got {embedding_dim!r}")
    p_t = factor_rows(num_rows, k) if p is None else tuple(p)
    q_t = factor_dim(embedding_dim, k) if q is None else tuple(q)
    _validate(num_rows, embedding_dim, p_t, q_t, ranks, table_name)
    shape = TTShape(
        num_rows=int(num_rows),
        embedding_dim=int(embedding_dim),
        p=tuple(int(v) for v in p_t),
        q=tuple(int(v) for v in q_t),
        ranks=tuple(int(r) for r in ranks),
    )
    _check_not_larger_than_dense(shape, table_name)
    return shape


def max_useful_ranks(p: Sequence[int], q: Sequence[int]) -> tuple[int, ...]:
    """Largest ranks TT-SVD can use: ``r_k <= min(prod_{i<=k} p_i q_i, prod_{i>k} p_i q_i)``.

    These are the ranks of the k-th unfolding of the padded ``[prod p, prod q]`` table viewed as a
    tensor with modes ``(p_i q_i)``; higher ranks only add zero (or redundant) directions.
    """
    if len(p) != len(q):
        raise ValueError(f"len(p) = {len(p)} != len(q) = {len(q)}")
    modes = [int(a) * int(b) for a, b in zip(p, q)]
    left = list(itertools.accumulate(modes, lambda x, y: x * y))
    total = left[-1] if left else 1
    return tuple(min(left[k], total // left[k]) for k in range(len(modes) - 1))
