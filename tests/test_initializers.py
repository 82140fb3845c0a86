"""Tests for torchrec_tt.initializers: random inits' statistics, orthogonality, TT-SVD."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchrec_tt.initializers import (
    default_target_std,
    orthogonal_cores,
    sampled_gaussian_cores,
    tt_svd,
)
from torchrec_tt.reference import reconstruct_dense
from torchrec_tt.shapes import TTShape, make_tt_shape, max_useful_ranks

SETTINGS = settings(deadline=None, max_examples=30)
SLOW_SETTINGS = settings(deadline=None, max_examples=15)
INITS = [sampled_gaussian_cores, orthogonal_cores]


def _dense(cores: list[torch.Tensor], s: TTShape, padded: bool = True) -> torch.Tensor:
    return reconstruct_dense(cores, s.p, s.q, s.ranks, None if padded else s.num_rows)


def _unfolding(core: torch.Tensor, s: TTShape, k: int) -> torch.Tensor:
    """Left unfolding ``[r_{k-1} * p_k * q_k, r_k]`` of core ``k`` (0-based) from storage order."""
    r = s.full_ranks
    return core.reshape(s.p[k], r[k], s.q[k], r[k + 1]).permute(1, 0, 2, 3).reshape(-1, r[k + 1])


@st.composite
def small_shapes(draw: st.DrawFn, max_rank: int = 6) -> TTShape:
    k = draw(st.sampled_from([2, 3, 4]))
    p = tuple(draw(st.integers(1, 4)) for _ in range(k))
    q = tuple(draw(st.integers(1, 3)) for _ in range(k))
    ranks = tuple(draw(st.integers(1, max_rank)) for _ in range(k - 1))
    n = draw(st.integers(1, math.prod(p)))  # usually N < prod(p): padded rows
    return make_tt_shape(n, math.prod(q), ranks, p=p, q=q)


# ---------------------------------------------------------------- common contract


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cores_layout_dtype_and_reproducibility(init, dtype: torch.dtype) -> None:
    s = make_tt_shape(5000, 48, (5, 7))
    a = init(s, 0.1, dtype=dtype, generator=torch.Generator().manual_seed(3))
    b = init(s, 0.1, dtype=dtype, generator=torch.Generator().manual_seed(3))
    c = init(s, 0.1, dtype=dtype, generator=torch.Generator().manual_seed(4))
    assert [tuple(x.shape) for x in a] == s.core_shapes()
    assert sum(x.numel() for x in a) == s.num_parameters()
    assert all(x.dtype == dtype and x.device.type == "cpu" for x in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


# ---------------------------------------------------------------- statistics


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize(
    ("n", "d", "ranks", "tol"),
    [
        # Entries share cores, so the table's RMS fluctuates more than i.i.d. sampling would:
        # measured per-seed relative sd ~0.7% (K=2), ~2-3% (K=3), ~5-9% (K=4); tol is >= ~2 sd of
        # the 6-seed average (seeds are fixed, so the test is deterministic).
        (50_000, 32, (16,), 0.03),
        (50_000, 64, (8, 8), 0.05),
        (20_000, 64, (8, 8, 8), 0.08),
        (1_000, 16, (64, 64), 0.05),  # r_1 > p_1 q_1: orthogonal_cores' orthonormal-rows branch
    ],
)
def test_reconstructed_statistics(init, n: int, d: int, ranks: tuple[int, ...], tol: float) -> None:
    s = make_tt_shape(n, d, ranks)
    target = 0.05
    seeds = range(6)
    ms, means, row_means = [], [], []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        w = _dense(init(s, target, dtype=torch.float64, generator=g), s)
        ms.append(w.pow(2).mean().item())
        means.append(w.mean().item())
        row_means.append(w[:n].mean(dim=1).abs().mean().item())
    rms = math.sqrt(sum(ms) / len(ms))
    assert abs(rms / target - 1) < tol
    for m in means:  # zero-mean: the table mean is far below its std
        assert abs(m) < 0.05 * target
    # Row means average D entries: ~target / sqrt(D) in size, not ~target (no per-row offsets).
    assert max(row_means) < 2.0 * target / math.sqrt(d)
    # The std of the real (unpadded) rows also matches the target (one seed: looser tolerance).
    g = torch.Generator().manual_seed(0)
    w = _dense(init(s, target, dtype=torch.float64, generator=g), s, False)
    assert abs(w.std().item() / target - 1) < 3 * tol


def test_sampled_gaussian_core_scale() -> None:
    s = make_tt_shape(100_000, 64, (16, 16))
    target = 0.02
    g = torch.Generator().manual_seed(0)
    cores = sampled_gaussian_cores(s, target, dtype=torch.float64, generator=g)
    expected = (target**2 / (16 * 16)) ** (1 / 6)
    for c in cores:
        assert abs(c.std().item() / expected - 1) < 0.03
        assert abs(c.mean().item()) < 0.03 * expected


def test_zero_target_std_gives_zero_table() -> None:
    s = make_tt_shape(100, 8, (3,))
    for init in INITS:
        assert _dense(init(s, 0.0), s).abs().max().item() == 0.0


# ---------------------------------------------------------------- orthogonality


@SETTINGS
@given(s=small_shapes(max_rank=12), seed=st.integers(0, 2**31 - 1))
def test_orthogonal_unfoldings(s: TTShape, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    cores = orthogonal_cores(s, 0.3, dtype=torch.float64, generator=g)
    r = s.full_ranks
    left_orthonormal = True
    for k in range(s.num_cores - 1):
        u = _unfolding(cores[k], s, k)
        if u.shape[0] >= u.shape[1]:
            eye = torch.eye(r[k + 1], dtype=torch.float64)
            torch.testing.assert_close(u.T @ u, eye, atol=1e-10, rtol=0)
        else:  # more columns than rows: orthonormal rows instead
            eye = torch.eye(u.shape[0], dtype=torch.float64)
            torch.testing.assert_close(u @ u.T, eye, atol=1e-10, rtol=0)
            left_orthonormal = False
    if left_orthonormal:
        # Left-orthonormal cores: the full (padded) tensor has the last core's Frobenius norm.
        full = _dense(cores, s)
        assert full.norm().item() == pytest.approx(cores[-1].norm().item(), rel=1e-10)


def test_orthogonal_last_core_scale() -> None:
    s = make_tt_shape(100_000, 64, (16, 16))
    target = 0.02
    g = torch.Generator().manual_seed(0)
    cores = orthogonal_cores(s, target, dtype=torch.float64, generator=g)
    # ||T||_F^2 = ||G_K||_F^2 and E||G_K||_F^2 = numel(G_K) sigma^2 = prod(p) D target^2.
    sigma = target * math.sqrt(s.padded_rows * s.embedding_dim / cores[-1].numel())
    assert abs(cores[-1].std().item() / sigma - 1) < 0.05


# ---------------------------------------------------------------- default_target_std


def test_default_target_std() -> None:
    n = 1_000_000
    assert default_target_std(n) == pytest.approx(math.sqrt(1 / n) / math.sqrt(3))
    assert default_target_std(n, -0.5, 0.5) == pytest.approx(1 / math.sqrt(12))
    assert default_target_std(n, 0.0, 1.0) == pytest.approx(1 / math.sqrt(12))
    # A single bound falls back to TorchRec's default for the other one.
    expected = (0.01 + 1e-3) / math.sqrt(12)
    assert default_target_std(n, weight_init_max=0.01) == pytest.approx(expected)
    assert default_target_std(n, weight_init_min=0.0) == pytest.approx(1e-3 / math.sqrt(12))
    # Matches the empirical std of TorchRec's uniform init.
    x = torch.empty(200_000, dtype=torch.float64).uniform_(-math.sqrt(1 / n), math.sqrt(1 / n))
    assert x.std().item() == pytest.approx(default_target_std(n), rel=0.01)
    with pytest.raises(ValueError):
        default_target_std(n, 1.0, -1.0)
    with pytest.raises(ValueError):
        default_target_std(0)


# ---------------------------------------------------------------- TT-SVD


@SETTINGS
@given(s=small_shapes(), seed=st.integers(0, 2**31 - 1))
def test_tt_svd_exact_at_full_rank(s: TTShape, seed: int) -> None:
    full = make_tt_shape(s.num_rows, s.embedding_dim, max_useful_ranks(s.p, s.q), p=s.p, q=s.q)
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(s.num_rows, s.embedding_dim, dtype=torch.float64, generator=g)
    cores = tt_svd(dense, full)
    assert [tuple(c.shape) for c in cores] == full.core_shapes()
    rec = _dense(cores, full)
    torch.testing.assert_close(rec[: s.num_rows], dense, atol=1e-10, rtol=0)
    if full.padded_rows > s.num_rows:  # zero padding rows are reproduced as zeros
        assert rec[s.num_rows :].abs().max().item() < 1e-10


@SLOW_SETTINGS
@given(s=small_shapes(), seed=st.integers(0, 2**31 - 1), extra=st.integers(1, 5))
def test_tt_svd_ranks_above_useful_are_zero_padded(s: TTShape, seed: int, extra: int) -> None:
    big = tuple(r + extra for r in max_useful_ranks(s.p, s.q))
    shape = make_tt_shape(s.num_rows, s.embedding_dim, big, p=s.p, q=s.q)
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(s.num_rows, s.embedding_dim, dtype=torch.float64, generator=g)
    cores = tt_svd(dense, shape)
    assert [tuple(c.shape) for c in cores] == shape.core_shapes()
    torch.testing.assert_close(_dense(cores, shape, False), dense, atol=1e-10, rtol=0)


def _padded(dense: torch.Tensor, s: TTShape) -> torch.Tensor:
    return torch.cat([dense, dense.new_zeros(s.padded_rows - s.num_rows, s.embedding_dim)])


def _unfolding_tail_sq(dense_padded: torch.Tensor, s: TTShape, k: int, rank: int) -> float:
    """Best rank-``rank`` squared error of the k-th unfolding of the (p_i q_i)-mode tensor."""
    kk = s.num_cores
    x = dense_padded.reshape(*s.p, *s.q).permute(*[i for j in range(kk) for i in (j, kk + j)])
    rows = math.prod(s.p[i] * s.q[i] for i in range(k + 1))
    sv = torch.linalg.svdvals(x.reshape(rows, -1))
    return float(sv[rank:].pow(2).sum())


@SLOW_SETTINGS
@given(s=small_shapes(), seed=st.integers(0, 2**31 - 1), low_rank=st.booleans())
def test_tt_svd_error_monotone_and_quasi_optimal(s: TTShape, seed: int, low_rank: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    n, d = s.num_rows, s.embedding_dim
    dense = torch.randn(n, d, dtype=torch.float64, generator=g)
    if low_rank:  # spectrum with structure, so truncation errors differ a lot between ranks
        dense = dense[:, :1] @ torch.randn(1, d, dtype=torch.float64, generator=g) * 5 + 0.1 * dense
    mu = max_useful_ranks(s.p, s.q)
    prev = math.inf
    for rank in range(1, max(mu) + 2):
        ranks = tuple(min(rank, m) for m in mu)
        shape = make_tt_shape(n, d, ranks, p=s.p, q=s.q)
        rec = _dense(tt_svd(dense, shape), shape)
        err_sq = float((rec - _padded(dense, shape)).pow(2).sum())
        # Frobenius error non-increasing as the (uniform, clamped) rank grows.
        assert err_sq <= prev * (1 + 1e-9) + 1e-18
        prev = err_sq
        # TT-SVD bound (Oseledets 2011): err^2 <= sum_k best rank-r_k error^2 of unfolding k.
        full = _padded(dense, shape)
        bound = sum(_unfolding_tail_sq(full, shape, k, ranks[k]) for k in range(len(ranks)))
        assert err_sq <= bound * (1 + 1e-9) + 1e-18
        if shape.num_cores == 2:  # K = 2 is a plain truncated SVD: Eckart-Young optimal
            assert err_sq == pytest.approx(bound, rel=1e-9, abs=1e-18)
    assert prev < 1e-18  # exact at full rank


@pytest.mark.parametrize("init", INITS)
def test_tt_svd_recovers_a_tt_table(init) -> None:
    # A table that *is* a TT of ranks r is recovered exactly by TT-SVD at ranks r.
    s = make_tt_shape(4 * 5 * 6, 24, (3, 4), p=(4, 5, 6), q=(2, 3, 4))
    cores = init(s, 1.0, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    dense = _dense(cores, s)
    torch.testing.assert_close(_dense(tt_svd(dense, s), s), dense, atol=1e-10, rtol=0)


def test_tt_svd_dtype_and_validation() -> None:
    s = make_tt_shape(100, 16, (4, 4), p=(4, 5, 5), q=(2, 2, 4))
    dense = torch.randn(100, 16)
    cores = tt_svd(dense, s)
    assert all(c.dtype == torch.float32 for c in cores)
    assert [tuple(c.shape) for c in cores] == s.core_shapes()
    with pytest.raises(ValueError):
        tt_svd(torch.randn(99, 16), s)
    with pytest.raises(ValueError):
        tt_svd(torch.randn(100, 8), s)
