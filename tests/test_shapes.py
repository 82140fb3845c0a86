"""Tests for torchrec_tt.shapes: factorisations, validation, counts."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from torchrec_tt import shapes
from torchrec_tt.shapes import (
    TTShape,
    factor_dim,
    factor_rows,
    make_tt_shape,
    max_useful_ranks,
)

SETTINGS = settings(deadline=None, max_examples=60)


def _int_ceil_root(n: int, k: int) -> int:
    """Smallest integer c with c**k >= n (exact, no float rounding)."""
    c = max(1, round(n ** (1.0 / k)))
    while c**k < n:
        c += 1
    while c > 1 and (c - 1) ** k >= n:
        c -= 1
    return c


# ---------------------------------------------------------------- factor_rows


@pytest.mark.parametrize(
    ("n", "k", "expected"),
    [(1_000_000, 3, (100, 100, 100)), (1_000_000, 2, (1000, 1000)), (1024, 2, (32, 32)),
     (1, 3, (1, 1, 1)), (2**40, 4, (1024, 1024, 1024, 1024))],
)
def test_factor_rows_examples(n: int, k: int, expected: tuple[int, ...]) -> None:
    assert factor_rows(n, k) == expected


def test_factor_rows_11m_small_padding() -> None:
    for k in (2, 3, 4):
        p = factor_rows(11_000_000, k)
        assert math.prod(p) >= 11_000_000
        assert (math.prod(p) - 11_000_000) / 11_000_000 < 0.01


@SETTINGS
@given(n=st.integers(1, 10**9), k=st.sampled_from([2, 3, 4]))
def test_factor_rows_properties(n: int, k: int) -> None:
    p = factor_rows(n, k)
    assert len(p) == k
    assert all(isinstance(v, int) and v >= 1 for v in p)
    assert math.prod(p) >= n
    assert list(p) == sorted(p), "largest factor must be last"
    # Never worse than the naive balanced cover (c, .., c) with c = ceil(N^(1/K)).
    assert math.prod(p) <= _int_ceil_root(n, k) ** k
    pad = (math.prod(p) - n) / n
    if n >= 10**6:
        assert pad < 2e-3
    if n >= 10**4:
        assert pad < 0.05
        assert max(p) / min(p) <= 2.0, "factors must stay near-balanced"


@SETTINGS
@given(n=st.integers(1, 2000), k=st.sampled_from([2, 3, 4]))
def test_factor_rows_small_n(n: int, k: int) -> None:
    p = factor_rows(n, k)
    assert math.prod(p) >= n and list(p) == sorted(p)
    assert math.prod(p) <= _int_ceil_root(n, k) ** k


# Factors of the search before it was made fast (2026-12-03): the same at these sizes.
_FACTORS_BEFORE = {
    5461306: [(2321, 2353), (143, 181, 211), (33, 51, 55, 59)],
    7046547: [(2419, 2913), (171, 202, 204), (47, 47, 55, 58)],
    8351593: [(2437, 3427), (182, 192, 239), (37, 57, 60, 66)],
    10131227: [(3071, 3299), (171, 227, 261), (46, 56, 57, 69)],
    100000007: [(9243, 10819), (356, 529, 531), (89, 100, 106, 106)],
    2147483647: [(39650, 54161), (1066, 1321, 1525), (163, 228, 233, 248)],
}


@pytest.mark.parametrize("n", sorted(_FACTORS_BEFORE))
def test_factor_rows_unchanged_at_table_sizes(n: int) -> None:
    assert [factor_rows(n, k) for k in (2, 3, 4)] == _FACTORS_BEFORE[n]


def _sizes_up_to_2_40() -> list[int]:
    """Powers of two and ten, their prime neighbours and large primes, 2 .. 2^40: sizes where
    the old search evaluated up to ~2M candidates (~0.1-0.2 s)."""
    sizes = {2, 3, 97, 10007, 999_999_999_989, 2**31 - 1, 2**40 - 87, 2**40 - 3, 2**40}
    for e in range(2, 41):
        sizes.update({2**e, 2**e + 1, 2**e - 1})
    for e in range(1, 13):
        sizes.update({10**e, 10**e + 7, 10**e - 1})
    return sorted(n for n in sizes if 1 <= n <= 2**40)


def test_factor_rows_work_is_bounded_at_every_size() -> None:
    # The work is counted (candidate factors evaluated), not timed: ~2.6e5 at most (the pair
    # window at 2^40, one vectorised pass), where the old search evaluated up to ~2e6, most of
    # them one Python-level call per outer candidate.
    worst = 0
    for k in (2, 3, 4):
        for n in _sizes_up_to_2_40():
            shapes._best_factors.cache_clear()
            shapes.search_stats["candidates"] = 0
            p = factor_rows(n, k)
            worst = max(worst, shapes.search_stats["candidates"])
            assert len(p) == k and list(p) == sorted(p) and math.prod(p) >= n
            assert math.prod(p) <= _int_ceil_root(n, k) ** k
            if n >= 10**6:
                assert (math.prod(p) - n) / n < 2e-3 and max(p) / min(p) <= 2.0, (n, k, p)
    assert worst <= 2 * shapes._PAIR_MAX_HALF_WINDOW + 1


def test_factor_rows_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        factor_rows(0, 3)
    with pytest.raises(ValueError):
        factor_rows(10, 0)


# ---------------------------------------------------------------- factor_dim


@pytest.mark.parametrize(
    ("d", "k", "expected"),
    [(64, 3, (4, 4, 4)), (16, 3, (2, 2, 4)), (128, 3, (4, 4, 8)), (13, 3, (1, 1, 13)),
     (64, 2, (8, 8)), (64, 4, (2, 2, 4, 4)), (1, 2, (1, 1)), (256, 4, (4, 4, 4, 4))],
)
def test_factor_dim_examples(d: int, k: int, expected: tuple[int, ...]) -> None:
    assert factor_dim(d, k) == expected


def _log_spread(f: tuple[int, ...]) -> float:
    mean = sum(math.log(x) for x in f) / len(f)
    return sum((math.log(x) - mean) ** 2 for x in f)


@SETTINGS
@given(d=st.integers(1, 600), k=st.sampled_from([2, 3, 4]))
def test_factor_dim_exact_ascending_and_most_balanced(d: int, k: int) -> None:
    q = factor_dim(d, k)
    assert len(q) == k and math.prod(q) == d
    assert list(q) == sorted(q)
    # Brute force over every multiset of K divisors (spread is order-free): none is more balanced.
    divs = [x for x in range(1, d + 1) if d % x == 0]
    best = min(
        _log_spread(f)
        for f in itertools.combinations_with_replacement(divs, k)
        if math.prod(f) == d
    )
    assert _log_spread(q) <= best + 1e-9


# ---------------------------------------------------------------- make_tt_shape / validation


def test_make_tt_shape_auto_factors() -> None:
    s = make_tt_shape(1_000_000, 64, (16, 16), table_name="t")
    assert s.p == (100, 100, 100) and s.q == (4, 4, 4) and s.ranks == (16, 16)
    assert s.num_cores == 3 and s.full_ranks == (1, 16, 16, 1) and s.padded_rows == 10**6


def test_make_tt_shape_explicit_factors_kept() -> None:
    s = make_tt_shape(1000, 16, [4], p=[25, 40], q=[2, 8])
    assert s.p == (25, 40) and s.q == (2, 8) and s.ranks == (4,)
    assert isinstance(s.p, tuple)
    assert hash(s) == hash(make_tt_shape(1000, 16, (4,), p=(25, 40), q=(2, 8)))


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        (dict(num_rows=100, embedding_dim=16, ranks=()), "cores"),
        (dict(num_rows=100, embedding_dim=16, ranks=(2, 2, 2, 2)), "cores"),
        (dict(num_rows=100, embedding_dim=16, ranks=(0, 2)), "ranks"),
        (dict(num_rows=100, embedding_dim=16, ranks=(2, -1)), "ranks"),
        (dict(num_rows=100, embedding_dim=16, ranks=(2.5,)), "ranks"),
        (dict(num_rows=100, embedding_dim=16, ranks=(2,), p=(10, 10, 1)), "len(p)"),
        (dict(num_rows=100, embedding_dim=16, ranks=(2,), q=(4,)), "len(q)"),
        (dict(num_rows=100, embedding_dim=16, ranks=(2,), p=(0, 100)), "positive"),
        (dict(num_rows=100, embedding_dim=16, ranks=(2,), q=(-4, -4)), "positive"),
        (dict(num_rows=101, embedding_dim=16, ranks=(2,), p=(10, 10)), "cannot represent 101 rows"),
        (dict(num_rows=100, embedding_dim=16, ranks=(2,), q=(4, 8)), "embedding_dim"),
        (dict(num_rows=0, embedding_dim=16, ranks=(2,)), "num_rows"),
        (dict(num_rows=100, embedding_dim=0, ranks=(2,)), "embedding_dim"),
    ],
)
def test_make_tt_shape_validation_names_table(kwargs: dict, fragment: str) -> None:
    with pytest.raises(ValueError) as exc:
        make_tt_shape(**kwargs, table_name="user_table_7")
    assert "user_table_7" in str(exc.value)
    assert fragment in str(exc.value)


def test_ttshape_direct_construction_validates() -> None:
    with pytest.raises(ValueError):
        TTShape(num_rows=101, embedding_dim=16, p=(10, 10), q=(4, 4), ranks=(2,))
    s = TTShape(100, 16, [10, 10], [4, 4], [2])  # type: ignore[arg-type]
    assert s.p == (10, 10) and s.ranks == (2,)


# ---------------------------------------------------------------- counts


def test_counts_by_hand_k3() -> None:
    s = make_tt_shape(1_000_000, 64, (16, 16), p=(100, 100, 100), q=(4, 4, 4))
    assert s.core_shapes() == [(100, 1 * 4 * 16), (100, 16 * 4 * 16), (100, 16 * 4 * 1)]
    assert s.num_parameters() == 100 * 64 + 100 * 1024 + 100 * 64 == 115_200
    assert s.num_bytes() == 4 * 115_200 and s.num_bytes(2) == 2 * 115_200
    assert s.dense_num_bytes() == 1_000_000 * 64 * 4 and s.dense_num_bytes(8) == 1_000_000 * 64 * 8
    assert s.compression_ratio() == pytest.approx(64_000_000 / 115_200)
    r, d = 16, 64
    assert s.forward_flops_per_lookup() == 2 * r * (4 * 4 * r + d)
    assert s.backward_flops_per_lookup() == 2 * s.forward_flops_per_lookup()


def test_counts_by_hand_k2_k4() -> None:
    s2 = make_tt_shape(1000, 32, (8,), p=(25, 40), q=(4, 8))
    assert s2.core_shapes() == [(25, 32), (40, 64)]
    assert s2.num_parameters() == 25 * 32 + 40 * 64
    assert s2.forward_flops_per_lookup() == 2 * 4 * 8 * 8  # [q1, r] @ [r, q2]: 2 R D
    s4 = make_tt_shape(10_000, 64, (3, 5, 7), p=(10, 10, 10, 10), q=(2, 2, 4, 4))
    assert s4.core_shapes() == [(10, 2 * 3), (10, 3 * 2 * 5), (10, 5 * 4 * 7), (10, 7 * 4)]
    assert s4.num_parameters() == 10 * (6 + 30 + 140 + 28)
    expected = 2 * (2 * 3 * 2 * 5) + 2 * (4 * 5 * 4 * 7) + 2 * (16 * 7 * 4 * 1)
    assert s4.forward_flops_per_lookup() == expected
    assert s4.compression_ratio() == pytest.approx(10_000 * 64 / s4.num_parameters())


@SETTINGS
@given(
    n=st.integers(1, 10**7),
    d=st.sampled_from([1, 8, 13, 16, 32, 64, 96, 128]),
    ranks=st.lists(st.integers(1, 64), min_size=1, max_size=3),
)
def test_counts_consistent(n: int, d: int, ranks: list[int]) -> None:
    s = make_tt_shape(n, d, ranks)
    assert len(s.core_shapes()) == s.num_cores == len(ranks) + 1
    assert s.num_parameters() == sum(a * b for a, b in s.core_shapes())
    assert s.padded_rows == math.prod(s.p) >= n and math.prod(s.q) == d
    # Flops from an explicit chain of matmul shapes.
    fr, left, flops = s.full_ranks, s.q[0], 0
    for k in range(1, s.num_cores):
        flops += 2 * left * fr[k] * s.q[k] * fr[k + 1]
        left *= s.q[k]
    assert left == d and s.forward_flops_per_lookup() == flops


# ---------------------------------------------------------------- max_useful_ranks


def test_max_useful_ranks_examples() -> None:
    assert max_useful_ranks((100, 100, 100), (4, 4, 4)) == (400, 400)
    assert max_useful_ranks((2, 3), (2, 2)) == (4,)
    assert max_useful_ranks((2, 3, 5, 7), (1, 2, 1, 2)) == (2, 12, 14)


@SETTINGS
@given(st.lists(st.tuples(st.integers(1, 20), st.integers(1, 8)), min_size=2, max_size=4))
def test_max_useful_ranks_property(pq: list[tuple[int, int]]) -> None:
    p, q = [a for a, _ in pq], [b for _, b in pq]
    r = max_useful_ranks(p, q)
    modes = [a * b for a, b in pq]
    assert len(r) == len(pq) - 1
    for k, rk in enumerate(r):
        assert rk == min(math.prod(modes[: k + 1]), math.prod(modes[k + 1 :]))
