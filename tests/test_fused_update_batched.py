"""The batched skip_non_finite of the sharded fused update (one ``finite_flags`` call and one
counter add for all whole-core tables) against the per-table semantics it replaces."""

from __future__ import annotations

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType

from torchrec_tt.optim import FusedOptimConfig, finite_flag, finite_flags, fused_update_many
from torchrec_tt.shapes import make_tt_shape
from torchrec_tt.sharding.fused import FusedTable, TTFusedUpdate
from torchrec_tt.sharding.lookup import TTLocalTable

_SPECIALS = (float("nan"), float("inf"), float("-inf"))
# On CUDA the foreach ops take their fused multi-tensor kernels (on the CPU they run per tensor).
_DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))]


def _isfinite_all(group: list[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in group)


@pytest.mark.parametrize("device", _DEVICES)
def test_finite_flags_matches_isfinite_per_group(device: str) -> None:
    gen = torch.Generator().manual_seed(0)
    for trial in range(60):
        groups = []
        for _ in range(1 + trial % 4):
            group = []
            for _ in range(1 + int(torch.randint(0, 4, (), generator=gen))):
                shape = [(), (0,), (3,), (4, 5), (2, 3, 2)][int(torch.randint(0, 5, (), generator=gen))]
                dtype = torch.float64 if trial % 3 == 0 else torch.float32
                t = torch.randn(shape, generator=gen, dtype=dtype) * 1e30
                if t.numel() and torch.rand((), generator=gen) < 0.3:
                    t.view(-1)[int(torch.randint(0, t.numel(), (), generator=gen))] = _SPECIALS[trial % 3]
                if t.numel() and torch.rand((), generator=gen) < 0.3:
                    t.view(-1)[0] = torch.finfo(dtype).max  # finite, and so is its inf-norm
                group.append(t.to(device))
            groups.append(group)
        flags = finite_flags(groups)
        assert flags.dtype == torch.bool and flags.shape == (len(groups),)
        assert flags.tolist() == [_isfinite_all(g) for g in groups], trial
        for g in groups:
            assert bool(finite_flag(g)) == _isfinite_all(g)


@pytest.mark.parametrize("device", _DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_finite_flags_on_nan_only_inf_only_and_mixed(device: str, dtype: torch.dtype) -> None:
    nan, inf, big = float("nan"), float("inf"), torch.finfo(dtype).max

    def t(*values: float, zeros: int = 0) -> torch.Tensor:  # ``values`` after ``zeros`` zeros
        return torch.cat([torch.zeros(zeros, dtype=dtype), torch.tensor(values, dtype=dtype)]).to(device)

    groups = {
        "nan only": [t(nan, nan)],
        "inf only": [t(inf), t(-inf, -inf)],
        "nan, then inf": [t(nan, inf)],
        "inf, then nan": [t(inf, nan)],
        "nan and -inf in two tensors": [t(nan), t(1.0, -inf)],
        "a nan at the end of a long tensor": [t(nan, zeros=10_000)],
        "a nan first in a long tensor": [t(nan, *([1.0] * 9_999))],
        "-inf at the end of a long tensor": [t(-inf, zeros=9_999)],
        "float max, both signs": [t(big, -big), t(big, zeros=9_999)],
        "a 0-dim nan": [torch.tensor(nan, dtype=dtype, device=device)],
        "a 0-dim inf among finite": [t(1.0), torch.tensor(inf, dtype=dtype, device=device)],
        "a 0-dim finite": [torch.tensor(-big, dtype=dtype, device=device)],
        "empty only": [t(), t().reshape(0, 3)],
        "empty and a nan": [t(), t(nan)],
        "empty and finite": [t(2.0), t()],
    }
    want = [_isfinite_all(g) for g in groups.values()]
    assert want == [False] * 8 + [True, False, False, True, True, False, True]
    assert finite_flags(list(groups.values())).tolist() == want  # unequal group lengths
    for (name, group), ok in zip(groups.items(), want):
        assert bool(finite_flag(group)) == ok, name


def test_finite_flags_dispatches_five_ops_and_no_copy_of_the_tensors() -> None:
    """Five ops for all groups (one more, a zero, to pad groups of unequal length), none of
    them elementwise over the tensors (the inf-norm reads them once)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    ops: list[str] = []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            ops.append(str(func.overloadpacket).rsplit(".", 1)[-1])
            return func(*args, **(kwargs or {}))

    groups = [[torch.randn(50, 40), torch.randn(7)], [torch.randn(3), torch.randn(2, 2)]]
    with Ops():
        finite_flags(groups)
    assert ops == ["_foreach_norm", "stack", "view", "amax", "lt"]
    ops.clear()
    groups = [[torch.randn(50, 40), torch.randn(7)], [torch.randn(3)]]
    with Ops():
        finite_flags(groups)
    assert ops == ["_foreach_norm", "new_zeros", "stack", "view", "amax", "lt"]


def test_finite_flags_needs_a_tensor_in_every_group() -> None:
    with pytest.raises(ValueError, match="at least one tensor"):
        finite_flags([])
    with pytest.raises(ValueError, match="at least one tensor"):
        finite_flags([[torch.ones(2)], []])


def _tables(cfgs: list[FusedOptimConfig], device: str = "cpu"
            ) -> tuple[list[TTLocalTable], dict[str, FusedTable]]:
    torch.manual_seed(0)
    tables, fused = [], {}
    for i, cfg in enumerate(cfgs):
        ranks = [4] if i % 2 == 0 else [3, 2]  # 2- and 3-core tables: groups of unequal length
        table = TTLocalTable(f"t{i}", make_tt_shape(60, 8, ranks), "data_parallel", owns_table=True,
                             device=torch.device(device))
        for p in table.parameters():
            torch.nn.init.normal_(p)
        table.init_optimizer_state(cfg.state_shapes)
        tables.append(table)
        fused[table.name] = FusedTable(cfg, {"lr": cfg.learning_rate})
    return tables, fused


def _reference_step(tables: list[TTLocalTable], fused: dict[str, FusedTable],
                    grads: dict[str, list[torch.Tensor]], skipped: dict[str, int]) -> None:
    """The per-table semantics: a table with a non-finite core gradient is left as it is and
    counted; the others take their own fused_update_many (core by core on the CPU)."""
    for table in tables:
        cfg = fused[table.name].cfg
        g = grads[table.name]
        if cfg.skip_non_finite and not _isfinite_all(g):
            skipped[table.name] += 1
            continue
        cores = table.whole_cores()
        states = [table.optimizer_state(k) for k in range(len(cores))]
        fused_update_many(cores, g, states, cfg, cfg.learning_rate)


def _snapshot(tables: list[TTLocalTable]) -> dict[str, torch.Tensor]:
    return {f"{t.name}.{k}": v.detach().clone()
            for t in tables for k, v in [*t.named_parameters(), *t.named_buffers()]}


@pytest.mark.parametrize("device", _DEVICES)
@pytest.mark.parametrize("reduce", [None, "mean"])
def test_batched_skip_matches_per_table_updates(reduce: str | None, device: str) -> None:
    adagrad = FusedOptimConfig(EmbOptimType.EXACT_ADAGRAD, learning_rate=0.1, eps=1e-10,
                               skip_non_finite=True)
    cfgs = [adagrad, adagrad, adagrad,
            FusedOptimConfig(EmbOptimType.ADAM, learning_rate=0.05, skip_non_finite=True),
            FusedOptimConfig(EmbOptimType.EXACT_SGD, learning_rate=0.2)]  # no skip: NaN applies
    tables, fused = _tables(cfgs, device)
    ref_tables, ref_fused = _tables(cfgs, device)
    update = TTFusedUpdate(tables, fused, reduce=reduce)
    skipped = {t.name: 0 for t in tables}
    gen = torch.Generator().manual_seed(1)
    bad = {1: ["t0"], 2: ["t1", "t3"], 4: ["t0", "t1", "t2", "t3"], 5: ["t4"]}
    for step in range(7):
        grads = {t.name: [torch.randn(c.shape, generator=gen).to(device) for c in t.whole_cores()]
                 for t in tables}
        for i, name in enumerate(bad.get(step, [])):
            grads[name][i % len(grads[name])].view(-1)[step] = _SPECIALS[(step + i) % 3]
        params = [c for t in tables for c in t.whole_cores()]
        update(params, [g.clone() for t in tables for g in grads[t.name]])
        _reference_step(ref_tables, ref_fused, grads, skipped)
        got, want = _snapshot(tables), _snapshot(ref_tables)
        for key in want:  # exact, NaN included (SGD without the skip applies its NaN step)
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, equal_nan=True,
                                       msg=f"step {step}, {key}")
        assert {n: f.skipped_steps for n, f in fused.items()} == skipped, step
    assert skipped == {"t0": 2, "t1": 2, "t2": 1, "t3": 2, "t4": 0}


def test_batched_skip_counter_keeps_a_replaced_count() -> None:
    cfg = FusedOptimConfig(EmbOptimType.EXACT_ADAGRAD, learning_rate=0.1, skip_non_finite=True)
    tables, fused = _tables([cfg, cfg])
    update = TTFusedUpdate(tables, fused)
    params = [c for t in tables for c in t.whole_cores()]

    def step(bad_table: int | None) -> None:
        grads = [torch.ones_like(c) for c in params]
        if bad_table is not None:
            grads[2 * bad_table][0, 0] = float("nan")
        update(params, grads)

    step(0)
    assert [fused["t0"].skipped_steps, fused["t1"].skipped_steps] == [1, 0]
    fused["t1"].skipped = 5  # e.g. a user resetting a counter: the next count starts there
    step(1)
    assert [fused["t0"].skipped_steps, fused["t1"].skipped_steps] == [1, 6]
    step(None)
    assert [fused["t0"].skipped_steps, fused["t1"].skipped_steps] == [1, 6]
