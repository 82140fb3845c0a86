"""Planner-made plans, torch.distributed.checkpoint save/load with resharding, and
TrainPipelineSparseDist, for TT collections on CPU/gloo at world size 2."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import Tensor, nn
from torchrec.datasets.utils import Batch
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import ParameterConstraints, Topology
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.distributed.types import ShardingType

import tt_dist_cases as cases
from torchrec_tt import TTEmbeddingBagCollection
from torchrec_tt.sharding import TTEmbeddingBagCollectionSharder, plan
from torchrec_tt.sharding.testing import run_multiprocess

pytestmark = pytest.mark.multiprocess

WORLD = 2
LR = 0.5


# ------------------------------------------------------------------ planner-made plans


def _sharders() -> list[Any]:
    # Plain tables get TorchRec's fused kernel from the planner; exact SGD at the same rate as
    # the reference keeps the comparison exact.
    return [
        TTEmbeddingBagCollectionSharder(),
        EmbeddingBagCollectionSharder(
            fused_params={"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": LR}
        ),
    ]


def check_planner_plans(rank: int, world_size: int,
                        constraint_sets: list[dict[str, list[str]]]) -> list[dict[str, str]]:
    chosen = []
    for sharding_types in constraint_sets:
        model = cases.make_model(0)
        reference = copy.deepcopy(model)
        constraints = {t: ParameterConstraints(sharding_types=s) for t, s in sharding_types.items()}
        sharders = _sharders()
        sharding_plan = plan(
            model,
            Topology(world_size=world_size, compute_device="cpu"),
            batch_size=cases.BATCH,
            constraints=constraints or None,
            sharders=sharders,
        )
        chosen.append(
            {
                table: ps.sharding_type
                for module_plan in sharding_plan.plan.values()
                for table, ps in module_plan.items()  # type: ignore[union-attr]
            }
        )
        collective = plan(
            model,
            Topology(world_size=world_size, compute_device="cpu"),
            batch_size=cases.BATCH,
            constraints=constraints or None,
            sharders=sharders,
            pg=dist.group.WORLD,
        )
        assert collective == sharding_plan
        dmp = cases.shard(model, sharding_plan, sharders)
        dmp.load_state_dict(reference.state_dict())
        optimizer = torch.optim.SGD([p for p in dmp.parameters()], lr=LR)
        ref_optimizer = torch.optim.SGD(reference.parameters(), lr=LR)
        for step in range(2):
            batches = [cases.batch_for(r, step, plain=True) for r in range(world_size)]
            loss = dmp(*batches[rank])
            with torch.no_grad():
                torch.testing.assert_close(loss, reference(*batches[rank]), rtol=1e-5, atol=1e-6)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            cases.reference_step(reference, ref_optimizer, batches)
            cases.assert_state_matches(dmp.state_dict(), reference.state_dict())
    return chosen


def test_planner_made_plans_match_unsharded() -> None:
    constraint_sets = [
        {},  # the planner's own choice
        {"t0": ["table_wise"], "t1": ["data_parallel"], "t2": ["column_wise"],
         "e0": ["column_wise"], "e1": ["data_parallel"]},
    ]
    results = run_multiprocess(check_planner_plans, WORLD, args=(constraint_sets,))
    assert results[0] == results[1]  # every rank planned the same
    default, forced = results[0]
    assert {default[t] for t in ("t0", "t1", "t2")} <= {
        ShardingType.DATA_PARALLEL.value, ShardingType.TABLE_WISE.value
    }  # column_wise only on request
    assert forced["t0"] == "table_wise" and forced["t2"] == "column_wise"
    assert forced["t1"] == forced["e1"] == "data_parallel" and forced["e0"] == "column_wise"


# ------------------------------------------------------------------ checkpoints

PLAN_A = {"t0": ("tw", 1), "t1": ("dp",), "t2": ("cw", [1, 0]),
          "e0": ("tw", 0), "e1": ("cw", [0, 1]), "e2": ("dp",)}
PLAN_B = {"t0": ("cw", [0, 1]), "t1": ("tw", 0), "t2": ("dp",),
          "e0": ("dp",), "e1": ("tw", 1), "e2": ("tw", 0)}


def train_and_save(rank: int, world_size: int, path: str) -> dict[str, Tensor]:
    """Plan A, one step, DCP save; returns the unsharded reference's state after that step."""
    model = cases.make_model(0)
    reference = copy.deepcopy(model)
    dmp = cases.shard(model, cases.manual_plan(model, PLAN_A, world_size))
    dmp.load_state_dict(reference.state_dict())
    optimizer = torch.optim.SGD(dmp.parameters(), lr=LR)
    batches = [cases.batch_for(r, 0, plain=True) for r in range(world_size)]
    dmp(*batches[rank]).backward()
    optimizer.step()
    cases.reference_step(reference, torch.optim.SGD(reference.parameters(), lr=LR), batches)
    dcp.save(dmp.state_dict(), checkpoint_id=path)
    return {k: v.clone() for k, v in reference.state_dict().items()}


def load_and_check(rank: int, world_size: int, path: str, expected: dict[str, Tensor]) -> int:
    """Plan B from a fresh init, DCP load, state and forward equal the expected model."""
    model = cases.make_model(7)
    dmp = cases.shard(model, cases.manual_plan(model, PLAN_B, world_size))
    state = dmp.state_dict()
    dcp.load(state, checkpoint_id=path)
    dmp.load_state_dict(state)
    compared = cases.assert_state_matches(dmp.state_dict(), expected)
    reference = cases.make_model(3)
    reference.load_state_dict(expected)
    batch = cases.batch_for(rank, 5, plain=True)
    with torch.no_grad():
        torch.testing.assert_close(dmp(*batch), reference(*batch), rtol=1e-5, atol=1e-6)
    return compared


def test_checkpoint_save_world2_load_world1_and_back(tmp_path: Any) -> None:
    saved = str(tmp_path / "world2")
    expected = run_multiprocess(train_and_save, WORLD, args=(saved,))[0]

    # World size 1: the unsharded model loads the sharded checkpoint.
    single = cases.make_model(11)
    state = single.state_dict()
    dcp.load(state, checkpoint_id=saved)
    single.load_state_dict(state)
    for key, value in single.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)

    # ... changes it, saves at world size 1, and a different plan at world size 2 loads it.
    with torch.no_grad():
        for p in single.parameters():
            p.mul_(1.5).add_(0.01)
    resaved = str(tmp_path / "world1")
    dcp.save(single.state_dict(), checkpoint_id=resaved)
    changed = {k: v.clone() for k, v in single.state_dict().items()}
    compared = run_multiprocess(load_and_check, WORLD, args=(resaved, changed))
    assert all(c > 0 for c in compared)


# ------------------------------------------------------------------ TrainPipelineSparseDist

DENSE_IN = 3


class PipelineModel(nn.Module):
    """What TrainPipelineSparseDist drives: ``forward(batch) -> (loss, output)``."""

    def __init__(self) -> None:
        super().__init__()
        self.tt = TTEmbeddingBagCollection(cases.TT_TABLES)
        self.head = nn.Linear(sum(cases.DIMS[f] for f in cases.TT_FEATURES) + DENSE_IN, 1)

    def forward(self, batch: Batch) -> tuple[Tensor, Tensor]:
        pooled = self.tt(batch.sparse_features)
        x = torch.cat([pooled[f] for f in cases.TT_FEATURES] + [batch.dense_features], dim=1)
        prediction = self.head(x).squeeze(1)
        return F.mse_loss(prediction, batch.labels), prediction.detach()


def _pipeline_batch(rank: int, step: int) -> Batch:
    gen = torch.Generator().manual_seed(500 + 10 * step + rank)
    return Batch(
        dense_features=torch.randn(cases.BATCH, DENSE_IN, generator=gen),
        sparse_features=cases.random_kjt(cases.TT_FEATURES, 900 + 10 * step + rank),
        labels=torch.randn(cases.BATCH, generator=gen),
    )


def run_pipeline(rank: int, world_size: int, steps: int) -> int:
    torch.manual_seed(0)
    model = PipelineModel()
    reference = copy.deepcopy(model)
    specs = {"t0": ("dp",), "t1": ("tw", 1), "t2": ("cw", [0, 1])}
    plain_plan = cases.manual_plan(cases.make_model(0, plain=False), specs, world_size)
    dmp = cases.shard(model, plain_plan)
    optimizer = torch.optim.SGD(dmp.parameters(), lr=LR)
    pipeline = TrainPipelineSparseDist(dmp, optimizer, torch.device("cpu"))
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=LR)
    batches = iter([_pipeline_batch(rank, s) for s in range(steps)])
    for step in range(steps):
        prediction = pipeline.progress(batches)
        all_batches = [_pipeline_batch(r, step) for r in range(world_size)]
        with torch.no_grad():
            torch.testing.assert_close(
                prediction, reference(all_batches[rank])[1], rtol=1e-5, atol=1e-6
            )
        loss = sum(reference(b)[0] for b in all_batches) / world_size
        loss.backward()
        ref_optimizer.step()
        ref_optimizer.zero_grad()
    with pytest.raises(StopIteration):
        pipeline.progress(batches)
    assert any(
        type(m).__name__ == "ShardedTTEmbeddingBagCollection" and m.is_pipelined
        for m in dmp.modules()
    )
    return cases.assert_state_matches(dmp.state_dict(), reference.state_dict())


def test_train_pipeline_sparse_dist_matches_unsharded() -> None:
    compared = run_multiprocess(run_pipeline, WORLD, args=(4,))
    assert all(c > 0 for c in compared)
