"""Kernel options of the TT embedding-bag op: bounds-check modes, compute precision and the
deterministic backward, on CPU and (skipped without a GPU) CUDA; CUDA-graph capture and
torch.compile of the CUDA op."""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch

from torchrec_tt.ops import (
    BoundsCheckMode,
    ComputePrecision,
    PoolingMode,
    TTBatchLayout,
    TTKernelOptions,
    tt_embedding_bag,
)
from torchrec_tt.reference import tt_embedding_bag_dense_reference
from torchrec_tt.shapes import TTShape
from torchrec_tt.testing import RandomProblem, has_cuda_kernels, random_problem


requires_cuda = pytest.mark.skipif(
    not has_cuda_kernels(), reason="needs a CUDA GPU and torchrec_tt built with its CUDA kernels"
)
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]


def _on(prob: RandomProblem, device: str, dtype: torch.dtype | None = None) -> RandomProblem:
    def conv(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        return t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)

    return dataclasses.replace(
        prob,
        cores=[conv(c) for c in prob.cores],  # type: ignore[misc]
        indices=prob.indices.to(device),
        offsets=prob.offsets.to(device),
        per_sample_weights=conv(prob.per_sample_weights),
    )


def _fwd_bwd(prob: RandomProblem, options: TTKernelOptions, dy: torch.Tensor | None = None):  # type: ignore[no-untyped-def]
    cores = [c.detach().clone().requires_grad_() for c in prob.cores]
    w = prob.per_sample_weights
    w = None if w is None else w.detach().clone().requires_grad_()
    out = tt_embedding_bag(cores, prob.layout, prob.indices, prob.offsets, w, options)
    if dy is None:  # the same values whatever the op's dtype and device
        dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    grads = torch.autograd.grad(
        out, cores + ([w] if w is not None else []), dy.to(device=out.device, dtype=out.dtype)
    )
    return out, list(grads)


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().cpu().double(), want.detach().cpu().double()
    return float((got - want).norm() / want.norm().clamp(min=1e-30))


# ---- options parsing -------------------------------------------------------------------------


def test_options_parse_fbgemm_and_torchrec_spellings() -> None:
    opts = TTKernelOptions.from_fused_params(
        {"bounds_check_mode": "warning", "compute_precision": torch.bfloat16, "deterministic": True,
         "learning_rate": 0.1}
    )
    assert opts == TTKernelOptions(BoundsCheckMode.WARNING, ComputePrecision.BF16, True)
    # fbgemm_gpu is a pinned dependency (requirements/no-deps.txt), always importable here.
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import BoundsCheckMode as FB

    assert BoundsCheckMode.parse(FB.FATAL) is BoundsCheckMode.FATAL
    assert BoundsCheckMode.parse(FB.IGNORE) is BoundsCheckMode.IGNORE
    assert BoundsCheckMode.parse(FB.NONE) is BoundsCheckMode.IGNORE
    assert BoundsCheckMode.parse(FB.FATAL.value) is BoundsCheckMode.FATAL


def test_bad_options_are_rejected_by_name() -> None:
    with pytest.raises(ValueError, match="unknown bounds_check_mode"):
        TTKernelOptions.from_fused_params({"bounds_check_mode": "loud"})
    with pytest.raises(ValueError, match="compute_precision"):
        TTKernelOptions.from_fused_params({"compute_precision": torch.int8})
    with pytest.raises(ValueError, match="deterministic must be a bool"):
        TTKernelOptions.from_fused_params({"deterministic": "yes"})
    prob = random_problem(1, num_tables=1, batch_size=2)
    args = (prob.cores, *prob.layout.op_args(), prob.indices, prob.offsets, None)
    with pytest.raises(RuntimeError, match="bounds_check_mode must be"):
        torch.ops.torchrec_tt.tt_embedding_bag(*args, 5, 0, False)
    with pytest.raises(RuntimeError, match="compute_precision must be"):
        torch.ops.torchrec_tt.tt_embedding_bag(*args, 0, 9, False)
    with pytest.raises(RuntimeError, match="BF16 / FP16 needs float32 cores"):
        torch.ops.torchrec_tt.tt_embedding_bag(*args, 0, int(ComputePrecision.BF16), False)


# ---- bounds checking -------------------------------------------------------------------------


def _with_bad_indices(
    seed: int, device: str, dtype: torch.dtype = torch.float64
) -> tuple[RandomProblem, RandomProblem, torch.Tensor]:
    """A problem with out-of-range indices, and the same problem where those lookups have weight
    zero and a valid index (what WARNING / IGNORE must compute)."""
    prob = random_problem(
        seed, num_tables=2, num_features=3, batch_size=6, max_bag=5, weighted=True,
        num_cores=3 if dtype == torch.float32 else None, dtype=dtype,
    )
    idx = prob.indices.clone()
    bad = torch.zeros_like(idx, dtype=torch.bool)
    bad[::4] = True
    idx[bad] = torch.where(torch.arange(int(bad.sum())) % 2 == 0, -3, 10**9).to(idx.dtype)
    with_bad = dataclasses.replace(prob, indices=idx)
    w = prob.per_sample_weights.clone()
    w[bad] = 0
    fixed = dataclasses.replace(prob, indices=torch.where(bad, 0, idx), per_sample_weights=w)
    return _on(with_bad, device), _on(fixed, device), bad.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", [BoundsCheckMode.WARNING, BoundsCheckMode.IGNORE])
@pytest.mark.parametrize(
    "dtype,deterministic",
    # float32 3-core tables take the CUDA tile path; deterministic the atomic-free backward.
    [(torch.float64, False), (torch.float32, False), (torch.float64, True)],
)
def test_out_of_range_lookups_contribute_zero(
    device: str, mode: BoundsCheckMode, dtype: torch.dtype, deterministic: bool
) -> None:
    with_bad, fixed, bad = _with_bad_indices(3, device, dtype)
    opts = TTKernelOptions(bounds_check_mode=mode, deterministic=deterministic)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, grads = _fwd_bwd(with_bad, opts)
        if device == "cuda":
            torch.cuda.synchronize()
    want_out, want_grads = _fwd_bwd(fixed, dataclasses.replace(opts, bounds_check_mode=BoundsCheckMode.FATAL))
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out, want_out, rtol=tol, atol=tol)
    # The weight gradient of an out-of-range lookup is zero; the others match.
    assert torch.all(grads[-1][bad] == 0)
    want_grads[-1][bad] = 0
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol)
    if device == "cpu":
        msgs = [str(c.message) for c in caught if "out of range" in str(c.message)]
        # One report per op call (forward and backward), not one per bad index.
        assert len(msgs) == (2 if mode == BoundsCheckMode.WARNING else 0)
        if msgs:
            assert "table 'table_" in msgs[0] and "contribute zero" in msgs[0]


def test_fatal_names_table_feature_and_position() -> None:
    with_bad, _, _ = _with_bad_indices(3, "cpu")
    with pytest.raises(RuntimeError, match=r"table 'table_\d' \(feature \d\): index -3 at position 0"):
        _fwd_bwd(with_bad, TTKernelOptions())


@requires_cuda
def test_cuda_warning_mode_prints_the_first_bad_index_and_does_not_trap() -> None:
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import torch
        from torchrec_tt.ops import BoundsCheckMode, TTKernelOptions, tt_embedding_bag
        from torchrec_tt.testing import has_cuda_kernels, random_problem
        prob = random_problem(3, num_tables=1, batch_size=4)
        idx = prob.indices.clone(); idx[-1] = 10**7
        out = tt_embedding_bag([c.cuda() for c in prob.cores], prob.layout, idx.cuda(),
                               prob.offsets.cuda(),
                               options=TTKernelOptions(bounds_check_mode=BoundsCheckMode.WARNING))
        torch.cuda.synchronize()
        print("finite", bool(torch.isfinite(out).all()))
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "out of range" in res.stdout and "contribute zero" in res.stdout
    assert "finite True" in res.stdout


# ---- compute precision -----------------------------------------------------------------------


def _rounded(prob: RandomProblem, dtype: torch.dtype) -> RandomProblem:
    return dataclasses.replace(prob, cores=[c.to(dtype).to(c.dtype) for c in prob.cores])


@pytest.mark.parametrize("precision,dtype", [(ComputePrecision.BF16, torch.bfloat16), (ComputePrecision.FP16, torch.float16)])
def test_cpu_half_precision_uses_rounded_cores_with_float32_arithmetic(
    precision: ComputePrecision, dtype: torch.dtype
) -> None:
    prob = random_problem(5, num_tables=2, num_features=3, dtype=torch.float32, weighted=True)
    out, grads = _fwd_bwd(prob, TTKernelOptions(compute_precision=precision))
    want_out, want_grads = _fwd_bwd(_rounded(prob, dtype), TTKernelOptions(compute_precision=ComputePrecision.FP32))
    torch.testing.assert_close(out, want_out)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w)
    # Rounding the cores changes the result at the type's precision, not beyond it.
    exact, _ = _fwd_bwd(prob, TTKernelOptions(compute_precision=ComputePrecision.FP32))
    assert 0 < _rel_err(out, exact) < 3e-2


# Relative error bounds against the float64 reference on the (rounded) cores.
_TOL = {
    ComputePrecision.FP32: 1e-5,
    ComputePrecision.TF32: 3e-3,
    ComputePrecision.BF16: 3e-2,
    ComputePrecision.FP16: 5e-3,
}
_ROUND = {ComputePrecision.BF16: torch.bfloat16, ComputePrecision.FP16: torch.float16}


@requires_cuda
@pytest.mark.parametrize("precision", list(ComputePrecision))
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("num_cores", [2, 3, 4])
def test_cuda_options_match_float64_reference(
    precision: ComputePrecision, deterministic: bool, num_cores: int
) -> None:
    for seed in range(4):
        prob = random_problem(
            100 + seed, num_tables=3, num_features=4, batch_size=24, num_cores=num_cores,
            max_factor=6, max_rank=20, max_bag=8, dtype=torch.float32, weighted=seed % 2 == 1,
        )
        if precision in _ROUND:
            prob = _rounded(prob, _ROUND[precision])
        opts = TTKernelOptions(compute_precision=precision, deterministic=deterministic)
        out, grads = _fwd_bwd(_on(prob, "cuda"), opts)
        ref, ref_grads = _fwd_bwd(_on(prob, "cpu", torch.float64), TTKernelOptions())
        tol = _TOL[precision]
        assert _rel_err(out, ref) < tol
        for g, r in zip(grads, ref_grads):
            if r.norm() > 0:
                assert _rel_err(g, r) < tol


@requires_cuda
@pytest.mark.parametrize("precision", [ComputePrecision.BF16, ComputePrecision.FP16])
def test_cuda_half_precision_gradients_survive_small_loss_scales(precision: ComputePrecision) -> None:
    # dY of a mean loss over a large batch is ~1e-7: gradients must not flush to zero in fp16.
    prob = _rounded(
        random_problem(7, num_tables=1, batch_size=32, num_cores=3, max_factor=6, max_rank=20,
                       max_bag=8, dtype=torch.float32),
        _ROUND[precision],
    )
    dy = 1e-7 * torch.randn(32, sum(prob.layout.feature_dims()), dtype=torch.float64,
                            generator=torch.Generator().manual_seed(3))
    _, grads = _fwd_bwd(_on(prob, "cuda"), TTKernelOptions(compute_precision=precision), dy)
    _, ref = _fwd_bwd(_on(prob, "cpu", torch.float64), TTKernelOptions(), dy)
    for g, r in zip(grads, ref):
        if r.norm() > 0:
            assert _rel_err(g, r) < _TOL[precision]


def _skewed_problem(num_lookups: int, q: tuple[int, ...], ranks: tuple[int, ...], seed: int = 0):  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(seed)
    p = (200, 220, 250, 30)[: len(q)]
    n = math.prod(p) - 7
    full = (1, *ranks, 1)
    cores = [0.2 * torch.randn(p[k], full[k] * q[k] * full[k + 1], generator=gen) for k in range(len(q))]
    shape = TTShape(n, math.prod(q), p, q, ranks)
    layout = TTBatchLayout.from_shapes(["t"], [shape], [PoolingMode.SUM], [0])
    bags = max(1, num_lookups // 8)
    lengths = torch.randint(0, 17, (bags,), generator=gen)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    # Squares of uniform ids: a few very hot rows (thousands of lookups each) and a long tail.
    indices = (torch.randint(0, 3000, (int(offsets[-1]),), generator=gen) ** 2) % n
    return RandomProblem(cores, layout, indices, offsets, None, bags)


@requires_cuda
@pytest.mark.parametrize("q,ranks", [((4, 4, 4), (32, 32)), ((2, 4), (16,)), ((2, 2, 2, 4), (8, 8, 8))])
def test_cuda_deterministic_backward_is_bit_identical(q: tuple, ranks: tuple) -> None:
    prob = _on(_skewed_problem(1 << 18, q, ranks), "cuda")
    opts = TTKernelOptions(deterministic=True)
    _, first = _fwd_bwd(prob, opts)
    for _ in range(3):
        _, again = _fwd_bwd(prob, opts)
        for a, b in zip(first, again):
            assert torch.equal(a, b)
    # Same values as the float32 atomic backward (the deterministic one computes on CUDA cores
    # in float32), up to summation order over hot rows' thousands of lookups.
    _, atomic = _fwd_bwd(prob, TTKernelOptions(compute_precision=ComputePrecision.FP32))
    for a, b in zip(first, atomic):
        assert _rel_err(a, b) < 1e-4


@requires_cuda
def test_cuda_deterministic_backward_takes_slices_larger_than_shared_memory() -> None:
    # R=128, q=4: one middle-core slice is 256 KB, more than a block's shared memory.
    prob = _on(_skewed_problem(1 << 12, (4, 4, 4), (128, 128), seed=5), "cuda")
    _, a = _fwd_bwd(prob, TTKernelOptions(deterministic=True))
    _, b = _fwd_bwd(prob, TTKernelOptions(deterministic=True))
    _, ref = _fwd_bwd(prob, TTKernelOptions(compute_precision=ComputePrecision.FP32))
    for x, y, r in zip(a, b, ref):
        assert torch.equal(x, y)
        assert _rel_err(x, r) < 1e-4


@requires_cuda
def test_use_deterministic_algorithms_selects_the_deterministic_backward() -> None:
    prob = _on(_skewed_problem(1 << 16, (4, 4, 4), (32, 32), seed=1), "cuda")
    torch.use_deterministic_algorithms(True)
    try:
        assert TTKernelOptions().op_args()[-1] is True
        _, a = _fwd_bwd(prob, TTKernelOptions())
        _, b = _fwd_bwd(prob, TTKernelOptions())
    finally:
        torch.use_deterministic_algorithms(False)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


# ---- CUDA graphs and torch.compile -----------------------------------------------------------


@requires_cuda
def test_cuda_graph_capture_replays_forward_and_backward() -> None:
    prob = _on(_skewed_problem(1 << 14, (4, 4, 4), (16, 16), seed=2), "cuda")
    cores = [c.clone().requires_grad_() for c in prob.cores]
    indices = prob.indices.clone()
    offsets = prob.offsets.clone()
    dy = torch.randn(prob.batch_size, 64, device="cuda")

    def step() -> list[torch.Tensor]:
        out = tt_embedding_bag(cores, prob.layout, indices, offsets)
        return [out, *torch.autograd.grad(out, cores, dy)]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm-up outside the capture (allocator, cuBLAS/cub workspaces)
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    # New lookups, same shapes: the replay must see them.
    new = _on(_skewed_problem(1 << 14, (4, 4, 4), (16, 16), seed=3), "cuda")
    n = min(new.indices.numel(), indices.numel())
    indices.copy_(torch.cat([new.indices[:n], indices[n:]]))
    graph.replay()
    torch.cuda.synchronize()
    eager = step()
    for a, b in zip(captured, eager):
        assert _rel_err(a, b) < 1e-5


@requires_cuda
def test_torch_compile_fullgraph_on_cuda() -> None:
    prob = _on(_skewed_problem(1 << 12, (4, 4, 4), (16, 16), seed=4), "cuda")

    def fn(cores: list[torch.Tensor], indices: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return tt_embedding_bag(cores, prob.layout, indices, offsets).square().sum()

    compiled = torch.compile(fn, fullgraph=True)
    cores = [c.clone().requires_grad_() for c in prob.cores]
    loss = compiled(cores, prob.indices, prob.offsets)
    grads = torch.autograd.grad(loss, cores)
    cores2 = [c.clone().requires_grad_() for c in prob.cores]
    loss2 = fn(cores2, prob.indices, prob.offsets)
    grads2 = torch.autograd.grad(loss2, cores2)
    assert _rel_err(loss, loss2) < 1e-5
    for a, b in zip(grads, grads2):
        assert _rel_err(a, b) < 1e-4


# ---- module ----------------------------------------------------------------------------------


def test_module_takes_kernel_keys_from_fused_params() -> None:
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from torchrec_tt import TTEmbeddingBagCollection, TTEmbeddingBagConfig

    tables = [TTEmbeddingBagConfig(name="t", num_embeddings=1000, embedding_dim=16,
                                   feature_names=["f"], tt_ranks=[4])]
    ebc = TTEmbeddingBagCollection(tables, fused_params={"bounds_check_mode": BoundsCheckMode.IGNORE})
    assert ebc.kernel_options.bounds_check_mode is BoundsCheckMode.IGNORE
    with pytest.raises(RuntimeError, match="built without fused_params"):
        ebc.fused_optimizer  # noqa: B018 - kernel keys alone make no fused optimizer
    kjt = KeyedJaggedTensor.from_lengths_sync(["f"], torch.tensor([3, 5000, 9]), torch.tensor([2, 1]))
    out = ebc(kjt)["f"]
    row9 = ebc(KeyedJaggedTensor.from_lengths_sync(["f"], torch.tensor([9]), torch.tensor([1])))["f"]
    row3 = ebc(KeyedJaggedTensor.from_lengths_sync(["f"], torch.tensor([3]), torch.tensor([1])))["f"]
    torch.testing.assert_close(out[0], row3[0])  # 5000 is out of range: contributes zero
    torch.testing.assert_close(out[1], row9[0])
    strict = TTEmbeddingBagCollection(tables)
    with pytest.raises(RuntimeError, match="out of range"):
        strict(kjt)
