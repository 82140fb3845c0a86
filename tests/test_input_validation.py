"""Hardening (issue 13): every bad input gives a clear error naming what is wrong, and a rejected
call changes nothing (parameters, optimizer state, a following valid call).

Sections follow the issue's classes: 1 devices, 2 hyper-parameters, 3 non-finite gradients,
4 state loads, 5 table sizes, 8 smaller errors; the Criteo data checks (6) are in
test_criteo_data.py. The last section feeds random mixes of devices, dtypes and shapes to the ops.
"""

from __future__ import annotations

import copy
import math
import time
import warnings

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from hypothesis import given, settings
from hypothesis import strategies as st
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_tt import TTConv2d, TTEmbeddingBagCollection, TTEmbeddingBagConfig, tt_conv2d
from torchrec_tt.sharding import TTEmbeddingBagCollectionSharder
from torchrec_tt.ops import tt_embedding_bag
from torchrec_tt.optim import fused_update
from torchrec_tt.reference import tt_embedding_bag_dense_reference
from torchrec_tt import shapes
from torchrec_tt.shapes import factor_rows
from torchrec_tt.testing import has_cuda_kernels, random_problem

ALL_OPTIMIZERS = [
    EmbOptimType.EXACT_SGD,
    EmbOptimType.EXACT_ADAGRAD,
    EmbOptimType.EXACT_ROWWISE_ADAGRAD,
    EmbOptimType.ADAM,
]


def _tables(n: int = 2) -> list[TTEmbeddingBagConfig]:
    return [
        TTEmbeddingBagConfig(
            name=f"t{i}", num_embeddings=100 + 20 * i, embedding_dim=8, feature_names=[f"f{i}"],
            tt_ranks=[4, 4],
        )
        for i in range(n)
    ]


def _ebc(optimizer: EmbOptimType | None = EmbOptimType.ADAM, weighted: bool = False, **extra):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    fused = None if optimizer is None else {"optimizer": optimizer, "learning_rate": 0.1, **extra}
    return TTEmbeddingBagCollection(_tables(), is_weighted=weighted, fused_params=fused)


def _kjt(weighted: bool = False, **override) -> KeyedJaggedTensor:  # type: ignore[no-untyped-def]
    args = {
        "keys": ["f0", "f1"],
        "values": torch.tensor([1, 5, 7, 99, 3, 3]),
        "offsets": torch.tensor([0, 2, 3, 5, 6]),
    }
    if weighted:
        args["weights"] = torch.tensor([0.5, 1.0, 2.0, 1.5, 1.0, 0.25])
    args.update(override)
    return KeyedJaggedTensor(**args)


def _snapshot(ebc: TTEmbeddingBagCollection) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (the fused optimizer's state included), copied."""
    return {k: v.detach().clone() for k, v in ebc.state_dict().items()}


def _assert_unchanged(ebc: TTEmbeddingBagCollection, before: dict[str, torch.Tensor]) -> None:
    after = ebc.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=0, equal_nan=False, msg=k)


def _train_step(ebc: TTEmbeddingBagCollection, kjt: KeyedJaggedTensor) -> None:
    ebc(kjt).values().square().sum().backward()


def _assert_valid_step_matches_fresh(
    ebc: TTEmbeddingBagCollection, make, weighted: bool = False  # type: ignore[no-untyped-def]
) -> None:
    """A valid step after a rejected call updates exactly as on a model that never saw it."""
    fresh = make()
    _train_step(ebc, _kjt(weighted))
    _train_step(fresh, _kjt(weighted))
    _assert_unchanged(ebc, _snapshot(fresh))


def _raises(exc: type[BaseException], *names: str):  # type: ignore[no-untyped-def]
    """pytest.raises that also checks the message carries every name in ``names``."""

    class _Ctx:
        def __enter__(self):  # type: ignore[no-untyped-def]
            self._ctx = pytest.raises(exc)
            self.info = self._ctx.__enter__()
            return self.info

        def __exit__(self, *a):  # type: ignore[no-untyped-def]
            handled = self._ctx.__exit__(*a)
            msg = str(self.info.value)
            for n in names:
                assert n in msg, f"{n!r} not in error message {msg!r}"
            return handled

    return _Ctx()


# --- 1. one device for every tensor argument --------------------------------------------------


@pytest.mark.parametrize("optimizer", ALL_OPTIMIZERS)
@pytest.mark.parametrize("bad", ["offsets", "weights", "values"])
def test_kjt_part_on_meta_is_rejected_and_changes_nothing(optimizer: EmbOptimType, bad: str) -> None:
    def make():  # type: ignore[no-untyped-def]
        return _ebc(optimizer, weighted=True)

    ebc = make()
    before = _snapshot(ebc)
    good = _kjt(weighted=True)
    parts = {"values": good.values(), "offsets": good.offsets(), "weights": good.weights()}
    parts[bad] = parts[bad].to("meta")
    kjt = KeyedJaggedTensor(keys=["f0", "f1"], **parts)
    # values on meta is caught by the module (KJT vs cores); the others by the op's fake kernel.
    names = ("meta", "cpu") if bad == "values" else (
        "per_sample_weights" if bad == "weights" else "offsets", "meta", "indices", "cpu")
    with _raises((RuntimeError, ValueError), *names):
        _train_step(ebc, kjt)
    _assert_unchanged(ebc, before)
    _assert_valid_step_matches_fresh(ebc, make, weighted=True)


def test_op_names_the_core_on_another_device() -> None:
    prob = random_problem(3, num_tables=2, num_cores=3)
    cores = list(prob.cores)
    cores[4] = cores[4].to("meta")  # table_1, core 1
    with _raises(RuntimeError, "core 1 of table 'table_1' is on meta", "indices is on cpu"):
        tt_embedding_bag(cores, prob.layout, prob.indices, prob.offsets)
    # The backward's fake kernel checks grad_output too.
    out = torch.zeros(prob.batch_size, sum(prob.layout.feature_dims()), dtype=torch.float64)
    with _raises(RuntimeError, "grad_output is on meta"):
        torch.ops.torchrec_tt.tt_embedding_bag_backward(
            out.to("meta"), prob.cores, *prob.layout.op_args(), prob.indices, prob.offsets,
            None, False, 0, 0, False,
        )


def test_conv_module_on_meta_rejects_a_cpu_input() -> None:
    conv = TTConv2d(8, 8, 3, ranks=(4, 4), device="meta")
    with _raises(RuntimeError, "input is on cpu", "core0 is on meta", "bias is on meta"):
        conv(torch.randn(1, 8, 5, 5))
    x, c0, c1, c2 = torch.randn(1, 8, 5, 5), torch.randn(4, 8, 1, 1), torch.randn(4, 4, 3, 3), torch.randn(8, 4, 1, 1)
    with _raises(RuntimeError, "core1 is on meta"):
        tt_conv2d(x, c0, c1.to("meta"), c2)
    with _raises(RuntimeError, "grad_output is on meta"):
        torch.ops.torchrec_tt.tt_conv2d_backward(
            torch.zeros(1, 8, 3, 3, device="meta"), x, c0, c1, c2, [1, 1], [0, 0], [1, 1],
            [True, True, True, True],
        )


@pytest.mark.skipif(not has_cuda_kernels(), reason="needs the CUDA kernels")
def test_cuda_entry_points_name_the_cpu_tensor() -> None:
    prob = random_problem(3, num_tables=2, num_cores=3, dtype=torch.float32)
    cores = [c.cuda() for c in prob.cores]
    with _raises(RuntimeError, "offsets is on cpu", "indices is on cuda"):
        tt_embedding_bag(cores, prob.layout, prob.indices.cuda(), prob.offsets)
    cores[2] = cores[2].cpu()
    with _raises(RuntimeError, "core 2 of table 'table_0' is on cpu"):
        tt_embedding_bag(cores, prob.layout, prob.indices.cuda(), prob.offsets.cuda())
    x = torch.randn(1, 8, 5, 5, device="cuda")
    c0, c1, c2 = torch.randn(4, 8, 1, 1), torch.randn(4, 4, 3, 3), torch.randn(8, 4, 1, 1)
    with _raises(RuntimeError, "core1 is on cpu"):
        tt_conv2d(x, c0.cuda(), c1, c2.cuda())


# --- random mixes of devices, dtypes and shapes: a clear error or the correct result ----------

def _clear_error_or_result(call, op: str, names: tuple[str, ...], valid: bool):  # type: ignore[no-untyped-def]
    """``call()``'s result when the call is valid; None when it is invalid and raised an error
    from ``op`` that names one of ``names``. Anything else fails the test."""
    try:
        out = call()
    except (RuntimeError, ValueError) as e:
        msg = str(e)
        assert msg.startswith(op), msg
        assert any(n in msg for n in names), msg
        assert not valid, f"a valid call was rejected: {msg}"
        return None
    assert valid, "an invalid call returned a result"
    return out


_EB_NAMES = ("indices", "offsets", "per_sample_weights", "core", "table", "feature_table_map")


def _perturb_shape(t: torch.Tensor, dim: int) -> torch.Tensor:
    shape = list(t.shape)
    shape[dim % len(shape)] += 1
    return torch.zeros(shape, dtype=t.dtype, device=t.device)


@settings(max_examples=200)
@given(
    seed=st.integers(0, 2**31 - 1),
    weighted=st.booleans(),
    devices=st.lists(st.sampled_from(["cpu", "cpu", "meta"]), min_size=16, max_size=16),
    dtype_change=st.sampled_from(
        [None, None, ("core", torch.float32), ("core", torch.float16), ("core", torch.int64),
         ("indices", torch.float32), ("offsets", torch.float64), ("offsets", torch.int32),
         ("indices", torch.int32), ("weights", torch.float32)]
    ),
    shape_change=st.sampled_from(
        [None, None, ("core", 0), ("core", 1), ("indices", None), ("offsets", None), ("weights", None)]
    ),
    which_core=st.integers(0, 11),
)
def test_embedding_bag_op_gives_a_clear_error_or_the_correct_result(
    seed: int, weighted: bool, devices: list[str], dtype_change, shape_change, which_core: int  # type: ignore[no-untyped-def]
) -> None:
    prob = random_problem(seed, num_tables=2, num_features=3, weighted=weighted)
    cores = list(prob.cores)
    indices, offsets, weights = prob.indices, prob.offsets, prob.per_sample_weights
    valid = True
    i = which_core % len(cores)
    if dtype_change is not None:
        what, dt = dtype_change
        if what == "core":
            cores[i] = cores[i].to(dt)
            valid = False
        elif what == "indices":
            indices = indices.to(dt)
            valid = dt == torch.int32
        elif what == "offsets":
            offsets = offsets.to(dt)
            valid = dt == torch.int32
        elif weights is not None:
            weights = weights.to(dt)
            valid = False
    if shape_change is not None:
        what, dim = shape_change
        if what == "core":
            cores[i] = _perturb_shape(cores[i], dim)
            valid = False
        elif what == "indices":
            indices = indices.unsqueeze(0)
            valid = False
        elif what == "offsets":
            offsets = torch.cat([offsets, offsets[-1:]])  # F*B+2 entries
            valid = False
        elif weights is not None:
            weights = weights[:-1] if weights.numel() else torch.ones(1, dtype=weights.dtype)
            valid = False
    tensors = [indices, offsets, weights, *cores]
    moved = [t.to(d) if t is not None else None for t, d in zip(tensors, devices)]
    used = {t.device.type for t in moved if t is not None}
    valid = valid and len(used) == 1
    indices, offsets, weights, *cores = moved
    out = _clear_error_or_result(
        lambda: tt_embedding_bag(cores, prob.layout, indices, offsets, weights),
        "torchrec_tt::tt_embedding_bag", _EB_NAMES, valid,
    )
    if out is None:
        return
    assert out.device.type == used.pop()
    assert out.shape == (prob.batch_size, sum(prob.layout.feature_dims()))
    if out.device.type == "cpu":
        ref = tt_embedding_bag_dense_reference(cores, prob.layout, indices, offsets, weights)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


_CONV_NAMES = ("input", "core0", "core1", "core2", "bias", "stride", "padding", "dilation", "kernel")


@settings(max_examples=150)
@given(
    c=st.integers(1, 4), k=st.integers(1, 4), r1=st.integers(1, 3), r2=st.integers(1, 3),
    kh=st.integers(1, 3), hw=st.integers(1, 6), stride=st.integers(1, 2), padding=st.integers(0, 1),
    with_bias=st.booleans(),
    devices=st.lists(st.sampled_from(["cpu", "cpu", "meta"]), min_size=5, max_size=5),
    dtype_change=st.sampled_from([None, None, 0, 1, 2, 3, 4]),
    new_dtype=st.sampled_from([torch.float32, torch.float16, torch.int64]),
    # (tensor, dim) grown by one: tensors are input, core0, core1, core2, bias; each choice breaks
    # a shape rule (core1's kernel dims and input's H, W are free, so they are not grown).
    shape_change=st.sampled_from([None, None, (0, 1), (1, 0), (1, 2), (2, 0), (2, 1), (3, 1), (3, 3), (4, 0)]),
)
def test_conv_op_gives_a_clear_error_or_the_correct_result(
    c: int, k: int, r1: int, r2: int, kh: int, hw: int, stride: int, padding: int,
    with_bias: bool, devices: list[str], dtype_change, new_dtype, shape_change,  # type: ignore[no-untyped-def]
) -> None:
    g = torch.Generator().manual_seed(c * 1000 + k * 100 + r1 * 10 + r2)
    d = torch.float64
    tensors: list[torch.Tensor | None] = [
        torch.randn(2, c, hw, hw, generator=g, dtype=d),
        torch.randn(r1, c, 1, 1, generator=g, dtype=d),
        torch.randn(r2, r1, kh, kh, generator=g, dtype=d),
        torch.randn(k, r2, 1, 1, generator=g, dtype=d),
        torch.randn(k, generator=g, dtype=d) if with_bias else None,
    ]
    valid = hw + 2 * padding >= kh
    if dtype_change is not None and tensors[dtype_change] is not None:
        tensors[dtype_change] = tensors[dtype_change].to(new_dtype)  # type: ignore[union-attr]
        valid = False
    if shape_change is not None and tensors[shape_change[0]] is not None:
        tensors[shape_change[0]] = _perturb_shape(tensors[shape_change[0]], shape_change[1])  # type: ignore[arg-type]
        valid = False
    moved = [t.to(dev) if t is not None else None for t, dev in zip(tensors, devices)]
    used = {t.device.type for t in moved if t is not None}
    valid = valid and len(used) == 1
    x, c0, c1, c2, bias = moved
    out = _clear_error_or_result(
        lambda: tt_conv2d(x, c0, c1, c2, bias, stride, padding),  # type: ignore[arg-type]
        "torchrec_tt::tt_conv2d", _CONV_NAMES, valid,
    )
    if out is None:
        return
    ho = (hw + 2 * padding - kh) // stride + 1
    assert out.shape == (2, k, ho, ho) and out.device.type == used.pop()
    if out.device.type == "cpu":
        w = torch.einsum("kb,baij,ac->kcij", c2[:, :, 0, 0], c1, c0[:, :, 0, 0])  # type: ignore[index]
        ref = torch.nn.functional.conv2d(x, w, bias, stride, padding)  # type: ignore[arg-type]
        torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


# --- 2. hyper-parameters: finite, in range, numbers; the lr again at every update -------------


@pytest.mark.parametrize(
    "extra,names",
    [
        ({"learning_rate": float("nan")}, ("learning_rate", "finite", "nan")),
        ({"learning_rate": float("inf")}, ("learning_rate", "finite", "inf")),
        ({"lr": float("inf")}, ("learning_rate", "finite")),
        ({"learning_rate": -0.1}, ("learning_rate", ">= 0.0", "-0.1")),
        ({"eps": float("nan")}, ("eps", "finite")),
        ({"eps": 0.0}, ("eps", "> 0.0")),
        ({"weight_decay": float("nan")}, ("weight_decay", "finite")),
        ({"weight_decay": -5}, ("weight_decay", ">= 0.0", "-5")),
        ({"beta1": 1.0}, ("beta1", "< 1.0")),
        ({"betas": (0.9, float("nan"))}, ("beta2", "finite")),
        ({"learning_rate": "0.1"}, ("learning_rate", "real number", "'0.1'", "str")),
        ({"learning_rate": True}, ("learning_rate", "real number")),
        ({"max_gradient": 0.0}, ("max_gradient", "> 0.0")),
        ({"gradient_clipping": 1}, ("gradient_clipping", "bool")),
        ({"skip_non_finite": "yes"}, ("skip_non_finite", "bool")),
    ],
)
def test_bad_hyper_parameters_are_rejected_at_construction(extra: dict, names: tuple) -> None:
    with _raises(ValueError, "fused optimizer", *names):
        _ebc(EmbOptimType.ADAM, **extra)


def test_sharder_rejects_non_finite_hyper_parameters_naming_the_table() -> None:
    with _raises(ValueError, "TTEmbeddingBagCollectionSharder", "learning_rate must be finite"):
        TTEmbeddingBagCollectionSharder(
            fused_params={"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": float("nan")}
        )
    module = _ebc(None)
    for cores in (module.embedding_bags["t0"].parameters(), module.embedding_bags["t1"].parameters()):
        apply_optimizer_in_backward(torch.optim.Adam, cores, {"lr": float("inf")})
    with _raises(ValueError, "TT table 't0'", "learning_rate must be finite, got inf"):
        TTEmbeddingBagCollectionSharder().fused_configs(module)


@pytest.mark.parametrize("optimizer", ALL_OPTIMIZERS)
@pytest.mark.parametrize("lr", [-0.1, float("nan"), float("inf"), "0.1"])
def test_bad_lr_set_in_param_groups_is_rejected_at_the_update(optimizer: EmbOptimType, lr) -> None:  # type: ignore[no-untyped-def]
    def make():  # type: ignore[no-untyped-def]
        return _ebc(optimizer)

    ebc = make()
    before = _snapshot(ebc)
    ebc.fused_optimizer.param_groups[0]["lr"] = lr
    with _raises(ValueError, "param_groups lr", "'t0'", "'t1'"):
        _train_step(ebc, _kjt())
    _assert_unchanged(ebc, before)
    assert all(c.grad is None for c in ebc.cores())
    ebc.fused_optimizer.param_groups[0]["lr"] = 0.1
    _assert_valid_step_matches_fresh(ebc, make)


# --- 3. non-finite gradients: clipping, and the opt-in skip with a counter --------------------


@pytest.mark.parametrize("optimizer", ALL_OPTIMIZERS)
def test_skip_non_finite_drops_the_step_and_counts_it(optimizer: EmbOptimType) -> None:
    def make():  # type: ignore[no-untyped-def]
        return _ebc(optimizer, weighted=True, skip_non_finite=True)

    ebc = make()
    before = _snapshot(ebc)
    bad = _kjt(weighted=True)
    w = bad.weights().clone()
    w[0] = float("nan")  # a lookup of t0 only: t1's update stays valid
    bad = KeyedJaggedTensor(keys=bad.keys(), values=bad.values(), offsets=bad.offsets(), weights=w)
    _train_step(ebc, bad)  # NaN in t0's gradients only (t1's lookups carry finite weights)
    assert ebc.fused_optimizer.skipped_steps == {"t0": 1, "t1": 0}
    state = _snapshot(ebc)
    for k, v in before.items():
        if ".t0." in k:
            torch.testing.assert_close(state[k], v, rtol=0, atol=0, msg=k)
    assert not torch.equal(state["embedding_bags.t1.core_0"], before["embedding_bags.t1.core_0"])
    assert all(torch.isfinite(v).all() for v in state.values())
    # A following valid step updates t0 exactly as a fresh model's first step does.
    fresh = make()
    _train_step(ebc, _kjt(weighted=True))
    _train_step(fresh, _kjt(weighted=True))
    got, want = ebc.state_dict(), fresh.state_dict()
    for k in want:
        if ".t0." in k:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
    assert ebc.fused_optimizer.skipped_steps == {"t0": 1, "t1": 0}
    # Without the option the same step writes NaN into the cores (the reproducer).
    plain = _ebc(optimizer, weighted=True)
    _train_step(plain, bad)
    assert not torch.isfinite(plain.embedding_bags["t0"].core_0).all()


def test_skip_non_finite_on_a_nan_loss_keeps_adam_moments_finite() -> None:
    ebc = _ebc(EmbOptimType.ADAM, skip_non_finite=True)
    before = _snapshot(ebc)
    (ebc(_kjt()).values().sum() * float("nan")).backward()
    assert ebc.fused_optimizer.skipped_steps == {"t0": 1, "t1": 1}
    _assert_unchanged(ebc, before)
    _assert_valid_step_matches_fresh(ebc, lambda: _ebc(EmbOptimType.ADAM, skip_non_finite=True))


@pytest.mark.parametrize("optimizer", ALL_OPTIMIZERS)
def test_gradient_clipping_clamps_every_gradient_entry(optimizer: EmbOptimType) -> None:
    clipped = _ebc(optimizer, gradient_clipping=True, max_gradient=0.01)
    reference = _ebc(None)
    cores = reference.cores()
    grads = torch.autograd.grad(reference(_kjt()).values().square().sum() * 1e3, cores)
    (clipped(_kjt()).values().square().sum() * 1e3).backward()
    assert max(g.abs().max() for g in grads) > 0.01  # the clamp matters here
    # The clipped model equals a plain one stepped by hand with the clamped gradients.
    manual = _ebc(optimizer)
    for (name, p), g in zip(manual.fused_optimizer.params.items(), grads):
        state = manual.fused_optimizer.state[p]
        fused_update(p, g.clamp(-0.01, 0.01), state, manual.fused_optimizer.cfg, 0.1)
    _assert_unchanged(clipped, _snapshot(manual))


# --- 4. state loads: checked whole before anything is written ---------------------------------


@pytest.mark.parametrize("optimizer", [EmbOptimType.EXACT_ADAGRAD, EmbOptimType.ADAM])
def test_bad_optimizer_state_dict_is_rejected_naming_the_key(optimizer: EmbOptimType) -> None:
    def make():  # type: ignore[no-untyped-def]
        return _ebc(optimizer)

    ebc = make()
    _train_step(ebc, _kjt())
    ebc.fused_optimizer.save_param_groups(True)
    good = copy.deepcopy(ebc.fused_optimizer.state_dict())
    zeroed = copy.deepcopy(good)
    for st_ in zeroed["state"].values():
        for v in st_.values():
            v.zero_()
    last = "embedding_bags.t1.core_2"
    cases = []
    bad = copy.deepcopy(zeroed)
    bad["state"][last]["momentum1"] = torch.zeros(2)  # wrong shape on the last core
    cases.append((bad, (repr(last), "'momentum1'", "shape (2,)", "nothing was loaded")))
    bad = copy.deepcopy(zeroed)
    bad["state"][last]["momentum1"] = bad["state"][last]["momentum1"].double()
    cases.append((bad, (repr(last), "float64", "float32")))
    bad = copy.deepcopy(zeroed)
    del bad["state"][last]
    cases.append((bad, ("missing", repr(last))))
    bad = copy.deepcopy(zeroed)
    bad["state"]["embedding_bags.t9.core_0"] = bad["state"][last]
    cases.append((bad, ("unexpected", "'embedding_bags.t9.core_0'")))
    bad = copy.deepcopy(zeroed)
    bad["state"][last] = {**bad["state"][last], "momentum3": torch.zeros(1)}
    cases.append((bad, (repr(last), "momentum3")))
    bad = copy.deepcopy(zeroed)
    bad["param_groups"][0]["lr"] = float("nan")
    cases.append((bad, ("param_groups lr", "finite")))
    bad = copy.deepcopy(zeroed)
    bad["param_groups"].append(dict(bad["param_groups"][0]))
    cases.append((bad, ("param_groups", "1 groups")))
    before = _snapshot(ebc)
    for sd, names in cases:
        with _raises(ValueError, "fused optimizer state_dict", *names):
            ebc.fused_optimizer.load_state_dict(sd)
        _assert_unchanged(ebc, before)
    assert ebc.fused_optimizer.param_groups[0]["lr"] == 0.1
    ebc.fused_optimizer.load_state_dict(zeroed)  # a good one loads entirely
    assert all(float(v.abs().sum()) == 0 for k, v in ebc.state_dict().items() if "momentum" in k)
    ebc.fused_optimizer.load_state_dict(good)
    _assert_unchanged(ebc, before)


# --- 5. table sizes: fast factorisation, the 2^40 key limit, ranks beyond the dense table -----


def test_huge_tables_are_rejected_at_once_with_the_limit() -> None:
    t0 = time.perf_counter()
    with _raises(ValueError, "TT table 'huge'", "2^40", str(2**62)):
        TTEmbeddingBagConfig(name="huge", num_embeddings=2**62, embedding_dim=8, feature_names=["f"])
    assert time.perf_counter() - t0 < 1.0
    for k in (2, 3, 4):  # the largest allowed size factorises with bounded work
        shapes._best_factors.cache_clear()
        shapes.search_stats["candidates"] = 0
        p = factor_rows(2**40 - 3, k)
        assert math.prod(p) >= 2**40 - 3
        assert shapes.search_stats["candidates"] <= 2 * shapes._PAIR_MAX_HALF_WINDOW + 1


def test_ranks_beyond_the_dense_table_are_rejected_naming_it() -> None:
    with _raises(ValueError, "TT table 'small'", "more than the dense table", "100x8"):
        TTEmbeddingBagConfig(
            name="small", num_embeddings=100, embedding_dim=8, feature_names=["f"],
            tt_ranks=[100_000, 100_000],
        )


# --- 8. smaller errors --------------------------------------------------------------------------


def test_int_tt_ranks_and_float_channels_say_what_is_wrong() -> None:
    with _raises(ValueError, "TT table 't'", "tt_ranks", "list", "got 4"):
        TTEmbeddingBagConfig(name="t", num_embeddings=100, embedding_dim=8, feature_names=["f"], tt_ranks=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no bogus "clamped to (8.5, 8)" warning first
        with _raises(ValueError, "TTConv2d", "in_channels", "8.5"):
            TTConv2d(8.5, 8, 3)  # type: ignore[arg-type]


def test_mismatched_core_shape_on_meta_is_rejected() -> None:
    prob = random_problem(7, num_tables=2, num_cores=3)
    cores = [c.to("meta") for c in prob.cores]
    cores[1] = torch.empty(cores[1].shape[0] + 1, cores[1].shape[1], device="meta", dtype=cores[1].dtype)
    with _raises(RuntimeError, "core 1 of table 'table_0' must have shape"):
        tt_embedding_bag(cores, prob.layout, prob.indices.to("meta"), prob.offsets.to("meta"))


def test_plan_rejects_bad_batch_sizes_and_sharding_types() -> None:
    from torchrec.distributed.planner import ParameterConstraints, Topology

    from torchrec_tt.sharding import plan

    model = TTEmbeddingBagCollection(_tables(), device="meta")
    topology = Topology(world_size=2, compute_device="cpu")
    for bad in (0, -8, 2.5):
        with _raises(ValueError, "plan()", "batch_size", str(bad)):
            plan(model, topology, batch_size=bad)  # type: ignore[arg-type]
    with _raises(ValueError, "constraints['t0'].sharding_types", "'bogus'", "table_wise"):
        plan(model, topology, batch_size=8,
             constraints={"t0": ParameterConstraints(sharding_types=["bogus"])})
    assert plan(model, topology, batch_size=8).plan  # a valid call still plans


class _LocalTable:
    """The slice of TTLocalTable that TTFusedUpdate uses for a whole (table_wise) table."""

    def __init__(self, name: str, cores: list[torch.Tensor], cfg) -> None:  # type: ignore[no-untyped-def]
        self.name, self.cores = name, cores
        self.state = [{k: torch.zeros(s) for k, s in cfg.state_shapes(c.shape).items()} for c in cores]

    def whole_cores(self) -> list[torch.Tensor]:
        return self.cores

    def whole_params(self) -> list[torch.Tensor]:  # no hot-row cache: the cores
        return self.cores

    def optimizer_state(self, k: int) -> dict[str, torch.Tensor]:
        return self.state[k]

    def whole_optimizer_states(self) -> list[dict[str, torch.Tensor]]:
        return self.state


def test_sharded_fused_update_checks_lr_first_and_skips_non_finite_tables() -> None:
    from torchrec_tt.optim import FusedOptimConfig
    from torchrec_tt.sharding.fused import FusedTable, TTFusedUpdate

    cfg = FusedOptimConfig(EmbOptimType.ADAM, learning_rate=0.1, skip_non_finite=True)
    tables = [_LocalTable(n, [torch.randn(3, 4), torch.randn(2, 5)], cfg) for n in ("a", "b")]
    groups = {"a": {"lr": 0.1}, "b": {"lr": 0.1}}
    fused = {n: FusedTable(cfg, groups[n]) for n in groups}
    update = TTFusedUpdate(tables, fused)
    params = [c for t in tables for c in t.cores]
    before = [c.clone() for c in params]
    grads = [torch.ones_like(c) for c in params]
    groups["b"]["lr"] = float("nan")  # table b's lr is bad: table a must not move either
    with _raises(ValueError, "TT table 'b'", "param_groups lr", "finite"):
        update(params, grads)
    assert all(torch.equal(a, b) for a, b in zip(params, before))
    groups["b"]["lr"] = 0.1
    grads[3] = torch.full_like(grads[3], float("inf"))  # table b, core 1
    update(params, grads)
    assert [fused["a"].skipped_steps, fused["b"].skipped_steps] == [0, 1]
    assert not torch.equal(params[0], before[0])
    assert torch.equal(params[2], before[2]) and torch.equal(params[3], before[3])
    assert all(float(v.abs().sum()) == 0 for s in tables[1].state for v in s.values())
