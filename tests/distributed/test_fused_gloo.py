"""Fused optimizers of sharded TT collections on CPU/gloo at world size 2.

Three training steps of the sharded model equal the unsharded model trained with the same
optimizer on the rank-averaged batch, cores and optimizer state alike, whether the optimizer
comes from the module's ``fused_params``, the sharder's or ``apply_optimizer_in_backward``;
DMP's ``fused_optimizer`` holds the TT cores; TrainPipelineSparseDist drives it;
``torch.distributed.checkpoint`` round-trips the state through the model's state dict and the
fused optimizer's, across plans and world sizes.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import Tensor
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.optimizers import in_backward_optimizer_filter

import test_workflows_gloo as workflows
import tt_dist_cases as cases
from torchrec_tt import TTEmbeddingBagCollection
from torchrec_tt.sharding import TTEmbeddingBagCollectionSharder, tt_skipped_steps
from torchrec_tt.sharding.testing import run_multiprocess

pytestmark = [
    pytest.mark.multiprocess,
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # TorchRec's apply_optimizer_in_backward
]

WORLD = 2
LR = 0.5  # the dense head's SGD
FUSED_LR = 0.05
TT_KEYS = {
    f"tt.embedding_bags.{t.name}.core_{k}"
    for t in cases.TT_TABLES
    for k in range(len(t.tt_ranks) + 1)
}
# Torch optimizer state names -> the fused optimizer's (torch's Adagrad also counts steps).
_TORCH_STATE = {
    torch.optim.Adam: {"exp_avg": "momentum1", "exp_avg_sq": "momentum2", "step": "step"},
    torch.optim.Adagrad: {"sum": "momentum1"},
}


def _models(source: str, optimizer: Any, kwargs: dict[str, Any]) -> tuple[Any, Any, Any]:
    """(model to shard, unsharded reference, sharders) with the same init and optimizer."""
    fused = {"optimizer": optimizer, **kwargs} if source != "in_backward" else None
    model = cases.make_model(0, plain=False, fused_params=fused if source == "module" else None)
    reference = cases.make_model(0, plain=False, fused_params=fused)
    sharders = None
    if source == "sharder":
        sharders = [TTEmbeddingBagCollectionSharder(fused_params=fused)]
    elif source == "in_backward":
        # The reference runs the real torch optimizer in the backward; the sharded model the
        # fused equivalent that the sharder derives from the same marking.
        apply_optimizer_in_backward(optimizer, model.tt.parameters(), kwargs)
        apply_optimizer_in_backward(optimizer, reference.tt.parameters(), kwargs)
    return model, reference, sharders


def _reference_state(reference: Any, source: str) -> dict[str, Tensor]:
    state = dict(reference.state_dict())
    if source == "in_backward":
        for name, p in reference.tt.named_parameters():
            (opt,) = p._in_backward_optimizers
            names = _TORCH_STATE[type(opt)]
            for key, value in opt.state[p].items():
                if key in names:
                    state[f"tt.{name}_{names[key]}"] = value
    return state


def _flat_optimizer_state(optimizer_state: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    return {
        f"{prefix}{key}_{name}": value
        for key, states in optimizer_state["state"].items()
        for name, value in states.items()
    }


def _check_case(rank: int, world_size: int, specs: dict[str, Any], source: str,
                optimizer: Any, kwargs: dict[str, Any]) -> int:
    model, reference, sharders = _models(source, optimizer, kwargs)
    dmp = cases.shard(model, cases.manual_plan(model, specs, world_size), sharders)
    assert set(dmp.fused_optimizer.params) == TT_KEYS
    # TorchRec's filter keeps fused tables out of the dense optimizer.
    dense_params = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    assert dense_params and all(name.startswith("head.") for name in dense_params), dense_params
    dense = torch.optim.SGD(list(dense_params.values()), lr=LR)
    ref_dense = torch.optim.SGD(reference.head.parameters(), lr=LR)
    compared = 0
    for step in range(3):
        if step == 2 and source == "module":  # a scheduler's change of lr takes effect
            for group in [*dmp.fused_optimizer.param_groups,
                          *reference.tt.fused_optimizer.param_groups]:
                group["lr"] *= 0.5
        batches = [cases.batch_for(r, step, plain=False) for r in range(world_size)]
        dmp(*batches[rank]).backward()
        left = [n for n, p in dmp.named_parameters() if n.startswith("tt.") and p.grad is not None]
        assert not left, f"fused cores kept gradients: {left}"
        dense.step()
        dense.zero_grad()
        cases.reference_step(reference, ref_dense, batches)
        expected = _reference_state(reference, source)
        compared += cases.assert_state_matches(dmp.state_dict(), expected)
    # The same state through DMP's fused optimizer (ShardedTensor where the core is sharded).
    state = _flat_optimizer_state(dmp.fused_optimizer.state_dict())
    state_keys = {k for k in expected if k.rsplit("_", 1)[0] in TT_KEYS}
    assert set(state) == state_keys, (sorted(state), sorted(state_keys))
    compared += cases.assert_state_matches(state, {k: expected[k] for k in state_keys})
    return compared


def _check_pipeline(rank: int, world_size: int, steps: int = 3) -> int:
    """TrainPipelineSparseDist drives a fused sharded collection like the plain model."""
    fused = {"optimizer": EmbOptimType.ADAM, "learning_rate": FUSED_LR}

    def make() -> Any:
        torch.manual_seed(0)
        model = workflows.PipelineModel()
        model.tt = TTEmbeddingBagCollection(cases.TT_TABLES, fused_params=fused)
        return model

    model, reference = make(), make()
    plan = cases.manual_plan(cases.make_model(0, plain=False), MIXED, world_size)
    dmp = cases.shard(model, plan)
    pipeline = TrainPipelineSparseDist(
        dmp, torch.optim.SGD(dmp.parameters(), lr=LR), torch.device("cpu")
    )
    ref_dense = torch.optim.SGD(reference.head.parameters(), lr=LR)
    batches = iter([workflows._pipeline_batch(rank, s) for s in range(steps)])
    for step in range(steps):
        pipeline.progress(batches)
        everyone = [workflows._pipeline_batch(r, step) for r in range(world_size)]
        (sum(reference(b)[0] for b in everyone) / world_size).backward()
        ref_dense.step()
        ref_dense.zero_grad()
    return cases.assert_state_matches(dmp.state_dict(), reference.state_dict())


def check_fused(rank: int, world_size: int, runs: list[tuple[Any, ...]]) -> dict[str, int]:
    results = {name: _check_case(rank, world_size, *args) for name, *args in runs}
    results["train_pipeline_sparse_dist"] = _check_pipeline(rank, world_size)
    return results


MIXED = {"t0": ("tw", 1), "t1": ("dp",), "t2": ("cw", [1, 0])}
RUNS = [
    ("dp_adam_module", {"t0": ("dp",), "t1": ("dp",), "t2": ("dp",)}, "module",
     EmbOptimType.ADAM, {"learning_rate": FUSED_LR, "weight_decay": 0.01}),
    ("tw_sgd_sharder", {"t0": ("tw", 1), "t1": ("tw", 0), "t2": ("tw", 1)}, "sharder",
     EmbOptimType.EXACT_SGD, {"learning_rate": LR}),
    # Non-contiguous column shards on one rank; row-wise Adagrad needs full-row statistics.
    ("cw_rowwise_adagrad_module", {"t0": ("cw", [1, 0]), "t1": ("dp",), "t2": ("cw", [0, 1, 1, 0])},
     "module", EmbOptimType.EXACT_ROWWISE_ADAGRAD, {"learning_rate": FUSED_LR, "weight_decay": 0.01}),
    # Every column shard on rank 0: rank 1 only joins the replicated cores' update.
    ("cw_one_rank_adam_sharder", {"t0": ("cw", [0, 0]), "t1": ("tw", 1), "t2": ("cw", [0, 0, 0, 0])},
     "sharder", EmbOptimType.ADAM, {"lr": FUSED_LR, "betas": (0.8, 0.99)}),
    ("mixed_adagrad_module", MIXED, "module", EmbOptimType.EXACT_ADAGRAD, {"learning_rate": FUSED_LR}),
    ("mixed_torch_adam_in_backward", MIXED, "in_backward", torch.optim.Adam,
     {"lr": FUSED_LR, "weight_decay": 0.01}),
    ("cw_torch_adagrad_in_backward", {"t0": ("tw", 0), "t1": ("cw", [1]), "t2": ("cw", [1, 0])},
     "in_backward", torch.optim.Adagrad, {"lr": FUSED_LR}),
]


def test_fused_optimizers_match_unsharded() -> None:
    results = run_multiprocess(check_fused, WORLD, args=(RUNS,))
    for per_run in results:
        assert set(per_run) == {name for name, *_ in RUNS} | {"train_pipeline_sparse_dist"}
        assert all(n > 0 for n in per_run.values()), per_run


# ------------------------------------------------------------------ checkpoints

FUSED = {"optimizer": EmbOptimType.ADAM, "learning_rate": FUSED_LR, "weight_decay": 0.01}
PLAN_A = {"t0": ("tw", 1), "t1": ("dp",), "t2": ("cw", [1, 0])}
PLAN_B = {"t0": ("cw", [0, 1]), "t1": ("tw", 0), "t2": ("dp",)}


def _train(dmp: Any, reference: Any, rank: int, world_size: int, steps: range) -> None:
    dense = torch.optim.SGD(dict(in_backward_optimizer_filter(dmp.named_parameters())).values(), lr=LR)
    ref_dense = torch.optim.SGD(reference.head.parameters(), lr=LR)
    for step in steps:
        batches = [cases.batch_for(r, step, plain=False) for r in range(world_size)]
        dmp(*batches[rank]).backward()
        dense.step()
        dense.zero_grad()
        cases.reference_step(reference, ref_dense, batches)


def checkpoint_round_trip(rank: int, world_size: int, model_path: str, optim_path: str
                          ) -> dict[str, Tensor]:
    """Plan A trains 2 steps and saves the model and DMP's fused optimizer; plan B loads them
    (the optimizer through fused_optimizer.load_state_dict) and trains on equal to the
    reference. Returns the reference's state after the 2 steps."""
    model = cases.make_model(0, plain=False, fused_params=FUSED)
    reference = cases.make_model(0, plain=False, fused_params=FUSED)
    dmp = cases.shard(model, cases.manual_plan(model, PLAN_A, world_size))
    _train(dmp, reference, rank, world_size, range(2))
    dcp.save(dmp.state_dict(), checkpoint_id=model_path)
    dcp.save(dmp.fused_optimizer.state_dict(), checkpoint_id=optim_path)
    saved = {k: v.clone() for k, v in reference.state_dict().items()}

    fresh = cases.make_model(7, plain=False, fused_params=FUSED)
    dmp_b = cases.shard(fresh, cases.manual_plan(fresh, PLAN_B, world_size))
    state = dmp_b.state_dict()
    dcp.load(state, checkpoint_id=model_path)
    dmp_b.load_state_dict(state)
    cases.assert_state_matches(dmp_b.state_dict(), saved)
    # The optimizer state alone, through the fused optimizer.
    with torch.no_grad():
        for name, buffer in dmp_b.named_buffers():
            if name.startswith("tt."):
                buffer.zero_()
    optim_state = dmp_b.fused_optimizer.state_dict()
    dcp.load(optim_state, checkpoint_id=optim_path)
    dmp_b.fused_optimizer.load_state_dict(optim_state)
    cases.assert_state_matches(dmp_b.state_dict(), saved)
    _train(dmp_b, reference, rank, world_size, range(2, 4))
    cases.assert_state_matches(dmp_b.state_dict(), reference.state_dict())
    return saved


def test_fused_state_checkpoint_across_plans_and_world_sizes(tmp_path: Any) -> None:
    model_path, optim_path = str(tmp_path / "model"), str(tmp_path / "optim")
    expected = run_multiprocess(checkpoint_round_trip, WORLD, args=(model_path, optim_path))[0]
    assert any(k.endswith("_momentum2") for k in expected)
    # World size 1: the unsharded fused module loads the sharded checkpoint, state included.
    single = cases.make_model(11, plain=False, fused_params=FUSED)
    state = single.state_dict()
    dcp.load(state, checkpoint_id=model_path)
    single.load_state_dict(state)
    # (The checkpoint holds the sharded model's values, equal to the reference up to rounding.)
    cases.assert_state_matches(single.state_dict(), expected)


# ------------------------------------------------------------------ skip_non_finite


def _nan_weight(kjt: Any, key: str) -> Any:
    """The same KJT with a NaN per-sample weight on the first id of ``key``."""
    weights = kjt.weights().clone()
    start = kjt.offset_per_key()[kjt.keys().index(key)]
    assert kjt.length_per_key()[kjt.keys().index(key)] > 0
    weights[start] = float("nan")
    return type(kjt)(keys=kjt.keys(), values=kjt.values(), offsets=kjt.offsets(), weights=weights)


def _skip_in_dmp(rank: int, world_size: int) -> int:
    """A NaN weight in rank 1's batch of t0 (column_wise over both ranks; t1 dp, t2 tw): both
    ranks skip the step (and count it) as the unsharded model with the option does on the
    rank-averaged batch, state equal to it; the finite steps before and after match it too."""
    fused = {"optimizer": EmbOptimType.EXACT_ADAGRAD, "learning_rate": FUSED_LR,
             "skip_non_finite": True}
    model = cases.make_model(0, plain=False, weighted=True)
    reference = cases.make_model(0, plain=False, weighted=True, fused_params=fused)
    specs = {"t0": ("cw", [1, 0]), "t1": ("dp",), "t2": ("tw", 0)}
    dmp = cases.shard(model, cases.manual_plan(model, specs, world_size),
                      [TTEmbeddingBagCollectionSharder(fused_params=fused)])
    dense = torch.optim.SGD(dict(in_backward_optimizer_filter(dmp.named_parameters())).values(), lr=LR)
    ref_dense = torch.optim.SGD(reference.head.parameters(), lr=LR)
    compared = 0
    for step in range(3):
        batches = [cases.batch_for(r, step, plain=False, weighted=True) for r in range(world_size)]
        if step == 1:
            batches[1] = (_nan_weight(batches[1][0], "f0"),)
        dmp(*batches[rank]).backward()
        loss = sum(reference(*b) for b in batches) / world_size
        loss.backward()
        # The dense head sees the NaN too; both models drop its gradient alike.
        for opt in (dense, ref_dense):
            for group in opt.param_groups:
                for p in group["params"]:
                    p.grad.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
            opt.step()
            opt.zero_grad()
        # Rank 1's NaN sample reaches every table's gradient through the shared head.
        expected = {t: int(step >= 1) for t in ("t0", "t1", "t2")}
        assert reference.tt.fused_optimizer.skipped_steps == expected
        expected["t2"] *= int(rank == 0)  # table_wise: counted where the table lives
        assert tt_skipped_steps(dmp.fused_optimizer) == expected, (rank, step)
        compared += cases.assert_state_matches(dmp.state_dict(), reference.state_dict())
    return compared


def _skip_on_one_rank_shard(rank: int, world_size: int, optimizer: EmbOptimType) -> int:
    """column_wise: an inf in the core_0 shard gradient of rank 1 only (the replicated cores'
    gradients finite): the reduced flag makes rank 0 skip the table too, nothing moves on
    either rank, and the next finite update applies on both. (Adam skips by keeping copies,
    row-wise Adagrad by zeroing the gradients and the reduced row statistics.)"""
    from torchrec_tt.optim import FusedOptimConfig
    from torchrec_tt.shapes import make_tt_shape
    from torchrec_tt.sharding.fused import FusedTable, TTFusedUpdate
    from torchrec_tt.sharding.lookup import TTLocalTable

    shape = make_tt_shape(50, 8, [4])
    table = TTLocalTable("t", shape, "column_wise", local_column_shards=[(4 * rank, 4)])
    torch.manual_seed(0)
    for p in table.parameters():
        torch.nn.init.normal_(p)
    cfg = FusedOptimConfig(optimizer, learning_rate=0.1, skip_non_finite=True)
    table.init_optimizer_state(cfg.state_shapes)
    fused = {"t": FusedTable(cfg, {"lr": 0.1})}
    update = TTFusedUpdate([table], fused, reduce="sum", group=torch.distributed.group.WORLD)
    params = [*table.replicated_cores(), *table.core_0_shards]
    before = {k: v.clone() for k, v in [*table.named_parameters(), *table.named_buffers()]}
    grads = [torch.ones_like(p) for p in params]
    if rank == 1:
        grads[-1][0, 0] = float("inf")  # this rank's core_0 shard only
    update(params, [g.clone() for g in grads])
    assert fused["t"].skipped_steps == 1
    for k, v in [*table.named_parameters(), *table.named_buffers()]:
        assert torch.equal(v, before[k]), (rank, k)
    update(params, [torch.ones_like(p) for p in params])
    assert fused["t"].skipped_steps == 1
    moved = [k for k, v in table.named_parameters() if not torch.equal(v, before[k])]
    assert sorted(moved) == sorted(k for k, _ in table.named_parameters()), moved
    return len(moved)


def check_skip_non_finite(rank: int, world_size: int) -> dict[str, int]:
    return {"dmp": _skip_in_dmp(rank, world_size),
            **{f"one_rank_shard_{o.name}": _skip_on_one_rank_shard(rank, world_size, o)
               for o in (EmbOptimType.ADAM, EmbOptimType.EXACT_ROWWISE_ADAGRAD)}}


def test_skip_non_finite_sharded_column_wise_reduces_the_flag() -> None:
    for per_rank in run_multiprocess(check_skip_non_finite, WORLD):
        assert all(n > 0 for n in per_rank.values()), per_rank
