"""The table-batched TT embedding-bag op against F.embedding_bag over the dense reconstruction."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from torchrec_tt.ops import (
    BoundsCheckMode,
    ComputePrecision,
    PoolingMode,
    TTBatchLayout,
    TTKernelOptions,
    tt_embedding_bag,
)
from torchrec_tt.reference import tt_embedding_bag_dense_reference, tt_rows_reference
from torchrec_tt.shapes import TTShape
from torchrec_tt.testing import has_cuda_kernels, random_problem


def _check_against_reference(prob, weights_grad: bool = False) -> None:  # type: ignore[no-untyped-def]
    cores = [c.clone().requires_grad_() for c in prob.cores]
    weights = prob.per_sample_weights
    if weights is not None and weights_grad:
        weights = weights.clone().requires_grad_()
    out = tt_embedding_bag(cores, prob.layout, prob.indices, prob.offsets, weights)
    ref = tt_embedding_bag_dense_reference(cores, prob.layout, prob.indices, prob.offsets, weights)
    assert out.shape == (prob.batch_size, sum(prob.layout.feature_dims()))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    grad_out = torch.randn_like(out)
    wrt = cores + ([weights] if weights is not None and weights_grad else [])
    got = torch.autograd.grad(out, wrt, grad_out)
    want = torch.autograd.grad(ref, wrt, grad_out)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)


@settings(max_examples=60)
@given(
    seed=st.integers(0, 2**31 - 1),
    num_tables=st.integers(1, 3),
    extra_features=st.integers(0, 2),
    batch_size=st.integers(1, 6),
    index_dtype=st.sampled_from([torch.int32, torch.int64]),
    weighted=st.booleans(),
)
def test_forward_backward_match_dense_reference(
    seed: int, num_tables: int, extra_features: int, batch_size: int, index_dtype: torch.dtype, weighted: bool
) -> None:
    prob = random_problem(
        seed,
        num_tables=num_tables,
        num_features=num_tables + extra_features,
        batch_size=batch_size,
        index_dtype=index_dtype,
        weighted=weighted,
    )
    _check_against_reference(prob, weights_grad=weighted)


@pytest.mark.parametrize("num_cores", [2, 3, 4])
@pytest.mark.parametrize("pooling", list(PoolingMode))
def test_each_core_count_and_pooling(num_cores: int, pooling: PoolingMode) -> None:
    prob = random_problem(
        num_cores * 10 + int(pooling), num_cores=num_cores, pooling=pooling, batch_size=8,
        max_factor=5, max_rank=6, weighted=True,
    )
    _check_against_reference(prob, weights_grad=True)


def test_larger_tables_with_shared_prefixes_float32() -> None:
    # Many lookups per prefix group and the non-tiled path are exercised by a wide last core.
    gen = torch.Generator().manual_seed(3)
    p, q, ranks, n = (7, 5, 300), (2, 3, 5), (6, 4), 10_000
    full = (1, *ranks, 1)
    cores = [torch.randn(p[k], full[k] * q[k] * full[k + 1], generator=gen) for k in range(3)]
    layout = TTBatchLayout.from_shapes(["big"], [TTShape(n, 30, p, q, ranks)], [PoolingMode.SUM], [0])
    indices = torch.randint(0, n, (5000,), generator=gen)
    offsets = torch.arange(0, 5001, 10)
    out = tt_embedding_bag(cores, layout, indices, offsets)
    ref = tt_embedding_bag_dense_reference(cores, layout, indices, offsets)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    rows = tt_rows_reference(cores, p, q, ranks, indices)
    torch.testing.assert_close(out, rows.view(500, 10, -1).sum(1), rtol=1e-4, atol=1e-4)


def test_empty_bags_give_zeros_and_no_gradient() -> None:
    prob = random_problem(1, num_tables=1, batch_size=3)
    offsets = torch.zeros_like(prob.offsets)
    indices = prob.indices[:0]
    cores = [c.clone().requires_grad_() for c in prob.cores]
    out = tt_embedding_bag(cores, prob.layout, indices, offsets)
    assert torch.equal(out, torch.zeros_like(out))
    grads = torch.autograd.grad(out.sum(), cores)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_gradcheck() -> None:
    prob = random_problem(7, num_tables=2, batch_size=3, max_factor=3, max_rank=2, weighted=True)
    cores = [c.clone().requires_grad_() for c in prob.cores]
    weights = prob.per_sample_weights.clone().requires_grad_()

    def fn(w: torch.Tensor, *cs: torch.Tensor) -> torch.Tensor:
        return tt_embedding_bag(list(cs), prob.layout, prob.indices, prob.offsets, w)

    assert torch.autograd.gradcheck(fn, (weights, *cores))


def _opcheck_args(prob, options=None):  # type: ignore[no-untyped-def]
    return (
        [c.clone().requires_grad_() for c in prob.cores],
        *prob.layout.op_args(),
        prob.indices,
        prob.offsets,
        prob.per_sample_weights,
        *(options or TTKernelOptions()).op_args(),
    )


@pytest.mark.parametrize("seed,weighted", [(11, False), (12, True)])
def test_opcheck(seed: int, weighted: bool) -> None:
    prob = random_problem(seed, num_tables=2, num_features=3, weighted=weighted)
    torch.library.opcheck(torch.ops.torchrec_tt.tt_embedding_bag.default, _opcheck_args(prob))


def test_meta_tensors_give_the_output_shape() -> None:
    prob = random_problem(5, num_tables=2, num_features=3, batch_size=7)
    cores = [c.to("meta") for c in prob.cores]
    out = tt_embedding_bag(cores, prob.layout, prob.indices.to("meta"), prob.offsets.to("meta"))
    assert out.device.type == "meta"
    assert out.shape == (7, sum(prob.layout.feature_dims()))


def test_torch_compile_fullgraph_matches_eager() -> None:
    prob = random_problem(9, num_tables=2, batch_size=4, dtype=torch.float32)
    cores = [c.clone().requires_grad_() for c in prob.cores]

    def loss(indices: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return (tt_embedding_bag(cores, prob.layout, indices, offsets) ** 2).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = compiled(prob.indices, prob.offsets)
    got_grads = torch.autograd.grad(got, cores)
    want = loss(prob.indices, prob.offsets)
    want_grads = torch.autograd.grad(want, cores)
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)


# ---- bad input -----------------------------------------------------------------------------

def _call(prob, **over):  # type: ignore[no-untyped-def]
    args = dict(
        cores=prob.cores, layout=prob.layout, indices=prob.indices, offsets=prob.offsets,
        per_sample_weights=prob.per_sample_weights,
    )
    args.update(over)
    return tt_embedding_bag(**args)


@pytest.fixture
def prob():  # type: ignore[no-untyped-def]
    return random_problem(21, num_tables=2, batch_size=4, max_bag=3, weighted=True)


def test_index_out_of_range_names_the_table(prob) -> None:  # type: ignore[no-untyped-def]
    for bad in (-1, 10**6):
        indices = prob.indices.clone()
        indices[-1] = bad
        with pytest.raises(RuntimeError, match=r"table 'table_\d'.*out of range"):
            _call(prob, indices=indices)


def test_bad_offsets(prob) -> None:  # type: ignore[no-untyped-def]
    offsets = prob.offsets.clone()
    offsets[-1] += 1
    with pytest.raises(RuntimeError, match="must end at len\\(indices\\)"):
        _call(prob, offsets=offsets)
    offsets = prob.offsets.clone()
    offsets[2], offsets[3] = offsets[3] + 1, offsets[2]
    with pytest.raises(RuntimeError, match="offsets decrease"):
        _call(prob, offsets=offsets)
    with pytest.raises(RuntimeError, match="F\\*B\\+1"):
        _call(prob, offsets=prob.offsets[:-1])
    offsets = prob.offsets.clone()
    offsets[0] = 1
    with pytest.raises(RuntimeError, match="offsets\\[0\\] must be 0"):
        _call(prob, offsets=offsets)


def test_bad_dtypes_and_shapes(prob) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(RuntimeError, match="indices must be int32 or int64"):
        _call(prob, indices=prob.indices.double())
    with pytest.raises(RuntimeError, match="share a dtype"):
        _call(prob, cores=[prob.cores[0]] + [c.float() for c in prob.cores[1:]])
    with pytest.raises(RuntimeError, match="per_sample_weights has"):
        _call(prob, per_sample_weights=prob.per_sample_weights[:-1])
    with pytest.raises(RuntimeError, match="per_sample_weights is"):
        _call(prob, per_sample_weights=prob.per_sample_weights.float())
    with pytest.raises(RuntimeError, match="must have shape"):
        _call(prob, cores=[prob.cores[0][:, :1]] + prob.cores[1:])
    with pytest.raises(RuntimeError, match="float32 or float64"):
        _call(prob, cores=[c.half() for c in prob.cores], per_sample_weights=None)


def test_bad_layout(prob) -> None:  # type: ignore[no-untyped-def]
    import dataclasses

    lay = dataclasses.replace(prob.layout, num_rows=(10**9,) + prob.layout.num_rows[1:])
    with pytest.raises(RuntimeError, match="table 'table_0' row factors multiply to"):
        _call(prob, layout=lay)
    lay = dataclasses.replace(prob.layout, feature_table_map=(0, 5))
    with pytest.raises(RuntimeError, match="feature 1 maps to table 5"):
        _call(prob, layout=lay)
    lay = dataclasses.replace(prob.layout, pooling_modes=(0, 7))
    with pytest.raises(RuntimeError, match="pooling mode 7"):
        _call(prob, layout=lay)


# ---- CUDA ------------------------------------------------------------------------------------

requires_cuda = pytest.mark.skipif(
    not has_cuda_kernels(), reason="needs a CUDA GPU and torchrec_tt built with its CUDA kernels"
)


def _to(prob, device: str, dtype: torch.dtype | None = None):  # type: ignore[no-untyped-def]
    import dataclasses

    conv = lambda t: None if t is None else t.to(device=device, dtype=dtype if t.is_floating_point() and dtype else t.dtype)  # noqa: E731
    return dataclasses.replace(
        prob,
        cores=[conv(c) for c in prob.cores],
        indices=prob.indices.to(device),
        offsets=prob.offsets.to(device),
        per_sample_weights=conv(prob.per_sample_weights),
    )


@requires_cuda
@settings(max_examples=40)
@given(
    seed=st.integers(0, 2**31 - 1),
    num_tables=st.integers(1, 3),
    batch_size=st.integers(1, 6),
    index_dtype=st.sampled_from([torch.int32, torch.int64]),
    weighted=st.booleans(),
)
def test_cuda_matches_dense_reference(
    seed: int, num_tables: int, batch_size: int, index_dtype: torch.dtype, weighted: bool
) -> None:
    prob = random_problem(
        seed, num_tables=num_tables, num_features=num_tables + 1, batch_size=batch_size,
        index_dtype=index_dtype, weighted=weighted,
    )
    _check_against_reference(_to(prob, "cuda"), weights_grad=weighted)


@requires_cuda
@pytest.mark.parametrize(
    "num_lookups,q,ranks",
    [
        (1 << 12, (4, 4, 4), (32, 32)),
        (1 << 20, (4, 4, 4), (32, 32)),
        (1 << 14, (2, 2, 4), (32, 32)),  # 48 KB of shared memory: the launch-limit edge
        (1 << 14, (4, 4, 4), (64, 64)),  # 16-row tiles
        (1 << 14, (4, 4, 4), (8, 8)),  # ranks padded to 16
    ],
)
def test_cuda_float32_matches_cpu_at_scale(num_lookups: int, q: tuple, ranks: tuple) -> None:
    gen = torch.Generator().manual_seed(num_lookups)
    p, n = (200, 220, 250), 11_000_000
    full = (1, *ranks, 1)
    cores = [0.2 * torch.randn(p[k], full[k] * q[k] * full[k + 1], generator=gen) for k in range(3)]
    shape = TTShape(n, math.prod(q), p, q, ranks)
    layout = TTBatchLayout.from_shapes(["t"], [shape], [PoolingMode.MEAN], [0])
    bags = num_lookups // 16
    lengths = torch.randint(0, 33, (bags,), generator=gen)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    # Zipf-like skew so that dedup and prefix runs matter.
    indices = (torch.randint(0, 1000, (int(offsets[-1]),), generator=gen) ** 2) % n
    cpu = [c.clone().requires_grad_() for c in cores]
    gpu = [c.cuda().requires_grad_() for c in cores]
    out_c = tt_embedding_bag(cpu, layout, indices, offsets)
    out_g = tt_embedding_bag(gpu, layout, indices.cuda(), offsets.cuda())
    _assert_rel_close(out_g, out_c)
    dy = torch.randn_like(out_c)
    g_c = torch.autograd.grad(out_c, cpu, dy)
    g_g = torch.autograd.grad(out_g, gpu, dy.cuda())
    for a, b in zip(g_g, g_c):
        _assert_rel_close(a, b)


def _assert_rel_close(got: torch.Tensor, want: torch.Tensor, tol: float = 3e-3) -> None:
    # float32 cores with 3 cores run on TF32 tensor cores (10-bit mantissa): compare by
    # relative norm error, which lands near 3e-4 for TF32.
    got = got.detach().cpu().double()
    want = want.detach().cpu().double()
    assert torch.isfinite(got).all()
    err = (got - want).norm() / want.norm().clamp(min=1e-30)
    assert err < tol, f"relative error {err:.2e} >= {tol}"


@requires_cuda
@settings(max_examples=40)
@given(
    seed=st.integers(0, 2**31 - 1),
    num_tables=st.integers(1, 3),
    batch_size=st.integers(1, 40),
    weighted=st.booleans(),
)
def test_cuda_float32_tensor_core_path_odd_shapes(
    seed: int, num_tables: int, batch_size: int, weighted: bool
) -> None:
    # 3-core float32 tables take the tensor-core tile path; small random factors and ranks
    # exercise its zero padding (R, q2*R not multiples of 16) and N < prod(p).
    prob = random_problem(
        seed, num_tables=num_tables, num_features=num_tables + 1, batch_size=batch_size,
        num_cores=3, max_factor=6, max_rank=20, max_bag=8, dtype=torch.float32, weighted=weighted,
    )
    gpu = _to(prob, "cuda")
    cores = [c.clone().requires_grad_() for c in gpu.cores]
    w = None if gpu.per_sample_weights is None else gpu.per_sample_weights.clone().requires_grad_()
    out = tt_embedding_bag(cores, gpu.layout, gpu.indices, gpu.offsets, w)
    ref_cores = [c.double().requires_grad_() for c in prob.cores]
    ref_w = None if w is None else prob.per_sample_weights.double().requires_grad_()
    ref = tt_embedding_bag_dense_reference(ref_cores, prob.layout, prob.indices, prob.offsets, ref_w)
    if ref.norm() == 0:
        return
    _assert_rel_close(out, ref)
    dy = torch.randn_like(ref)
    got = torch.autograd.grad(out, cores + ([w] if w is not None else []), dy.float().cuda())
    want = torch.autograd.grad(ref, ref_cores + ([ref_w] if ref_w is not None else []), dy)
    for g, r in zip(got, want):
        if r.norm() > 0:
            _assert_rel_close(g, r)


@requires_cuda
def test_cuda_empty_batch_and_opcheck() -> None:
    prob = _to(random_problem(31, num_tables=2, num_features=3, weighted=True), "cuda")
    torch.library.opcheck(torch.ops.torchrec_tt.tt_embedding_bag.default, _opcheck_args(prob))
    offsets = torch.zeros_like(prob.offsets)
    out = tt_embedding_bag(prob.cores, prob.layout, prob.indices[:0], offsets)
    assert torch.equal(out, torch.zeros_like(out))


def _assert_out_of_range_traps(problem_args: str) -> None:
    # A device-side trap poisons the CUDA context, so run it in a child process.
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        f"""
        import torch
        from torchrec_tt.testing import random_problem
        from torchrec_tt.ops import tt_embedding_bag
        prob = random_problem({problem_args})
        idx = prob.indices.clone(); idx[-1] = 10**7
        out = tt_embedding_bag([c.cuda() for c in prob.cores], prob.layout, idx.cuda(), prob.offsets.cuda())
        torch.cuda.synchronize()
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert "out of range" in res.stdout + res.stderr


@requires_cuda
def test_cuda_out_of_range_index_is_caught_on_the_device() -> None:
    _assert_out_of_range_traps("3, num_tables=1, batch_size=4")


# ---- the two-factor CUDA kernels (csrc/embedding_bag_cuda_two_factor.cuh) ------------------------


def _two_factor_problem(seed: int, **kw):  # type: ignore[no-untyped-def]
    # Ranks the two-factor kernels take; float32 and q factors up to 6 (q_last <= 8).
    return random_problem(seed, dtype=torch.float32, rank_choices=(4, 8, 16, 32, 64), **kw)


def _layout_shapes(layout: TTBatchLayout) -> list[TTShape]:
    from torchrec_tt.reference import split_cores

    p = split_cores(list(layout.p_shapes), layout.num_cores)
    q = split_cores(list(layout.q_shapes), layout.num_cores)
    r = split_cores(list(layout.ranks), [k - 1 for k in layout.num_cores])
    return [TTShape(n, math.prod(qq), pp, qq, rr) for n, pp, qq, rr in zip(layout.num_rows, p, q, r)]


def _check_two_factor(prob, monkeypatch, weighted: bool,  # type: ignore[no-untyped-def]
                      precision: ComputePrecision = ComputePrecision.TF32) -> None:
    """The two-factor kernels (the rank-layout forward where the shapes fit it, with the default
    lanes per bag and with one bag per warp; the unit layout, TORCHREC_TT_RANK_LAYOUT=0; the
    backward's default choice; the v6 backward loop without staged dY, TORCHREC_TT_BWD_STAGED=0;
    the generic kernels where an exact-shape one exists, TORCHREC_TT_EXACT_SHAPES=0; the exact-shape
    D=64 forward with v7's strided rank layout, TORCHREC_TT_FWD_STRIDED_RANKS=1) and the older
    kernels (TORCHREC_TT_TWO_FACTOR=0) on the same call against float64: output,
    core gradients and (``weighted``) weight gradients."""
    opts = TTKernelOptions(compute_precision=precision)
    gpu = _to(prob, "cuda")
    results = []
    # The default choice, one bag per warp, the unit layout, the v6 backward loop, the generic
    # kernels, the strided-rank exact-shape forward, the older kernels.
    switches = ("TORCHREC_TT_TWO_FACTOR", "TORCHREC_TT_RANK_LAYOUT", "TORCHREC_TT_FWD_LANES_PER_BAG",
                "TORCHREC_TT_BWD_STAGED", "TORCHREC_TT_EXACT_SHAPES", "TORCHREC_TT_FWD_STRIDED_RANKS")
    modes = ({}, {"TORCHREC_TT_FWD_LANES_PER_BAG": "32"}, {"TORCHREC_TT_RANK_LAYOUT": "0"},
             {"TORCHREC_TT_BWD_STAGED": "0"}, {"TORCHREC_TT_EXACT_SHAPES": "0"},
             {"TORCHREC_TT_FWD_STRIDED_RANKS": "1"}, {"TORCHREC_TT_TWO_FACTOR": "0"})
    for mode in modes:
        for key in switches:
            if key in mode:
                monkeypatch.setenv(key, mode[key])
            else:
                monkeypatch.delenv(key, raising=False)
        cores = [c.clone().requires_grad_() for c in gpu.cores]
        w = None
        if gpu.per_sample_weights is not None:
            w = gpu.per_sample_weights.clone().requires_grad_(weighted)
        out = tt_embedding_bag(cores, gpu.layout, gpu.indices, gpu.offsets, w, options=opts)
        dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).cuda()
        wrt = cores + ([w] if weighted and w is not None else [])
        results.append((out, torch.autograd.grad(out, wrt, dy)))
    ref_cores = [c.double().requires_grad_() for c in prob.cores]
    ref_w = None
    if prob.per_sample_weights is not None:
        ref_w = prob.per_sample_weights.double().requires_grad_(weighted)
    ref = tt_embedding_bag_dense_reference(ref_cores, prob.layout, prob.indices, prob.offsets, ref_w)
    dy = torch.randn(ref.shape, generator=torch.Generator().manual_seed(7)).double()
    want = torch.autograd.grad(ref, ref_cores + ([ref_w] if weighted and ref_w is not None else []), dy)
    # The two-factor kernels compute in float32; under TF32 their level GEMMs (3-4 cores) and
    # the older kernels' 3-core tiles may round to TF32 (~3e-4).
    fp32 = precision == ComputePrecision.FP32
    deep = max(prob.layout.num_cores) > 2
    two_factor_tol = 3e-3 if deep and not fp32 else 1e-4
    tols = (two_factor_tol,) * (len(modes) - 1) + (1e-4 if fp32 else 3e-3,)  # older kernels last
    for (out, grads), tol in zip(results, tols):
        if ref.norm() > 0:
            _assert_rel_close(out, ref, tol=tol)
        for g, r in zip(grads, want):
            if r.norm() > 0:
                _assert_rel_close(g, r, tol=tol)


@requires_cuda
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 2**31 - 1),
    num_tables=st.integers(1, 3),
    num_cores=st.sampled_from([2, 3, 4]),
    batch_size=st.integers(1, 40),
    index_dtype=st.sampled_from([torch.int32, torch.int64]),
    weighted=st.booleans(),
    precision=st.sampled_from([ComputePrecision.TF32, ComputePrecision.FP32]),
)
def test_cuda_two_factor_kernels_match_reference(
    monkeypatch, seed: int, num_tables: int, num_cores: int, batch_size: int, index_dtype: torch.dtype,
    weighted: bool, precision: ComputePrecision,
) -> None:
    # Forward, core gradients and weight gradients of the two-factor kernels and of the older
    # kernels (TORCHREC_TT_TWO_FACTOR=0) against float64: 2-4 cores, SUM/MEAN, empty bags.
    from hypothesis import assume

    from torchrec_tt.kernel_shapes import two_factor_fits

    prob = _two_factor_problem(
        seed, num_tables=num_tables, num_features=num_tables + 1, batch_size=batch_size,
        num_cores=num_cores, max_factor=5, max_bag=8, index_dtype=index_dtype, weighted=weighted,
    )
    assume(all(two_factor_fits(s) for s in _layout_shapes(prob.layout)))
    _check_two_factor(prob, monkeypatch, weighted, precision)


# Every (D, q, R) the two-factor kernels take at these q splits; the ones they do not take
# (registers: ranks per lane x Q > 32) are in tests/test_kernel_shapes.py.
_KAGGLE_SIZED = [
    (16, (4, 4), r) for r in (8, 32, 64, 128)
] + [(64, q, r) for q in ((8, 8), (16, 4)) for r in (8, 32, 64)] + [
    (128, (16, 8), r) for r in (8, 32)
] + [(12, (3, 4), r) for r in (8, 32, 64, 128)]


@requires_cuda
@pytest.mark.parametrize(
    "dim,q,rank", _KAGGLE_SIZED, ids=[f"D{d}-q{q[0]}x{q[1]}-R{r}" for d, q, r in _KAGGLE_SIZED]
)
def test_cuda_two_factor_kaggle_sized_shapes(monkeypatch, dim: int, q: tuple, rank: int) -> None:
    # Large 2-core tables at the kernel limits (Q up to 32, q_last up to 8, R up to 128), Zipf-like
    # skew (hot prefixes spread over many warps), MEAN pooling and weights.
    from torchrec_tt.kernel_shapes import two_factor_fits

    gen = torch.Generator().manual_seed(dim * rank)
    n = 1_000_003
    p = (1001, 1000)
    shape = TTShape(n, dim, p, q, (rank,))
    assert two_factor_fits(shape)
    cores = [0.1 * torch.randn(p[0], q[0] * rank, generator=gen), 0.1 * torch.randn(p[1], rank * q[1], generator=gen)]
    layout = TTBatchLayout.from_shapes(["t"], [shape], [PoolingMode.MEAN], [0])
    lengths = torch.randint(0, 9, (4096,), generator=gen)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    indices = (torch.randint(0, 1000, (int(offsets[-1]),), generator=gen) ** 2 * 7919) % n
    weights = torch.rand(indices.numel(), generator=gen)
    import dataclasses

    prob = dataclasses.replace(
        random_problem(0, num_tables=1), cores=cores, layout=layout, indices=indices, offsets=offsets,
        per_sample_weights=weights, batch_size=4096,
    )
    _check_two_factor(prob, monkeypatch, weighted=True)


@requires_cuda
@pytest.mark.parametrize("dim", [16, 64])
@pytest.mark.parametrize("weighted", [False, True])
def test_cuda_two_factor_exact_shapes_several_features(monkeypatch, dim: int, weighted: bool) -> None:
    # The exact-shape kernels (R = 32, q_last = Q) with two tables, three features (one table
    # read by two of them, so feature columns and tables differ) and both poolings.
    gen = torch.Generator().manual_seed(dim + weighted)
    q = (dim // 8, 8) if dim == 64 else (4, 4)
    rank, batch = 32, 512
    shapes = [TTShape(100_003, dim, (317, 316), q, (rank,)), TTShape(20_011, dim, (142, 141), q, (rank,))]
    cores = []
    for shape in shapes:
        cores += [0.1 * torch.randn(shape.p[0], q[0] * rank, generator=gen),
                  0.1 * torch.randn(shape.p[1], rank * q[1], generator=gen)]
    feature_table = [0, 1, 0]
    layout = TTBatchLayout.from_shapes(["a", "b"], shapes, [PoolingMode.SUM, PoolingMode.MEAN], feature_table)
    lengths = torch.randint(0, 6, (len(feature_table) * batch,), generator=gen)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    rows = [shapes[feature_table[b // batch]].num_rows for b in range(len(lengths))]
    indices = torch.cat([(torch.randint(0, 300, (int(k),), generator=gen) ** 2 * 7919) % r
                         for k, r in zip(lengths, rows)])
    import dataclasses

    prob = dataclasses.replace(
        random_problem(0, num_tables=2), cores=cores, layout=layout, indices=indices, offsets=offsets,
        per_sample_weights=torch.rand(indices.numel(), generator=gen) if weighted else None,
        batch_size=batch,
    )
    _check_two_factor(prob, monkeypatch, weighted=weighted)


@requires_cuda
@pytest.mark.parametrize("bounds", [BoundsCheckMode.WARNING, BoundsCheckMode.IGNORE])
def test_cuda_two_factor_out_of_range_lookups_contribute_zero(bounds: BoundsCheckMode) -> None:
    prob = _to(_two_factor_problem(5, num_tables=2, num_features=3, batch_size=16, num_cores=2,
                                   max_factor=6, pooling=PoolingMode.SUM, weighted=True), "cuda")
    opts = TTKernelOptions(bounds_check_mode=bounds)
    bad = prob.indices.clone()
    bad[::3] = -1 - bad[::3]  # every third lookup out of range
    keep = bad >= 0
    w = prob.per_sample_weights.clone().requires_grad_()
    w_zeroed = (prob.per_sample_weights * keep).clone().requires_grad_()
    cores = [c.clone().requires_grad_() for c in prob.cores]
    cores2 = [c.clone().requires_grad_() for c in prob.cores]
    out = tt_embedding_bag(cores, prob.layout, bad, prob.offsets, w, options=opts)
    want = tt_embedding_bag(cores2, prob.layout, torch.where(keep, bad, 0), prob.offsets, w_zeroed, options=opts)
    _assert_rel_close(out, want, tol=1e-6)
    dy = torch.randn_like(out)
    got = torch.autograd.grad(out, cores + [w], dy)
    exp = torch.autograd.grad(want, cores2 + [w_zeroed], dy)
    for g, e in zip(got[:-1], exp[:-1]):
        _assert_rel_close(g, e, tol=1e-6)
    assert torch.all(got[-1][~keep] == 0)


@requires_cuda
def test_cuda_two_factor_fatal_out_of_range_traps() -> None:
    _assert_out_of_range_traps("3, num_tables=1, batch_size=4, num_cores=2, dtype=torch.float32, "
                               "rank_choices=(8,)")
