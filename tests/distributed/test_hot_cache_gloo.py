"""Sharded TT tables with a hot-row cache (issue 14) on CPU/gloo at world size 2.

One spawned job runs two plans (each cached table data_parallel in one and table_wise in the
other), with the fused Adagrad and with plain SGD: the sharded model's forward, cache (ids, id
map, counts, step), slab, cores and fused-optimizer state equal the unsharded module's trained
on the union of the ranks' batches, through five training steps with two refreshes (one with
evictions and write-back), and in eval mode. ``torch.distributed.checkpoint`` then round-trips
the sharded state exactly into the other plan and into the unsharded module at world size 1;
restored under the same plan, the model trains on bit for bit as the saved one (under the other
plan, to rounding, cache buffers exactly), refreshing at the same step, with no read of a step
counter from the device per step (one per cache after the load). TrainPipelineSparseDist trains
a cached model as plain forward/backward does. Column-wise sharding of a cached table is refused
with the table named, by the sharder and by the planner.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.planner import ParameterConstraints, Topology
from torchrec.distributed.sharding_plan import (
    column_wise,
    construct_module_sharding_plan,
    data_parallel,
    table_wise,
)
from torchrec.datasets.utils import Batch
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.distributed.types import ShardedTensor, ShardingEnv, ShardingPlan
from torchrec.modules.embedding_configs import PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_tt import TTEmbeddingBagCollection, TTEmbeddingBagConfig
from torchrec_tt.modules import hot_cache
from torchrec_tt.sharding import TTEmbeddingBagCollectionSharder, plan
from torchrec_tt.sharding.testing import run_multiprocess
from torchrec_tt.testing import ScalarReads

pytestmark = pytest.mark.multiprocess

WORLD = 2
BATCH = 6  # per rank
REFRESH = 2  # refreshes at the start of steps 2 and 4
LR = 0.1
# (feature, table, rows): "a" 2 cores, two features; "b" no cache, MEAN; "c" 3 cores, MEAN.
FEATURES = [("f", "a", 400), ("g", "a", 400), ("h", "b", 60), ("k", "c", 200)]
KEYS = [f for f, _, _ in FEATURES]
PLANS = [{"a": ("dp",), "b": ("tw", 0), "c": ("tw", 1)},
         {"a": ("tw", 1), "b": ("dp",), "c": ("dp",)}]


def _tables(cache: int = 24) -> list[TTEmbeddingBagConfig]:
    return [
        TTEmbeddingBagConfig(name="a", num_embeddings=400, embedding_dim=16,
                             feature_names=["f", "g"], tt_ranks=[32], tt_cache_rows=cache,
                             tt_cache_refresh_steps=REFRESH, tt_cache_decay=0.5),
        TTEmbeddingBagConfig(name="b", num_embeddings=60, embedding_dim=8, feature_names=["h"],
                             tt_ranks=[4], pooling=PoolingType.MEAN),
        TTEmbeddingBagConfig(name="c", num_embeddings=200, embedding_dim=8, feature_names=["k"],
                             tt_ranks=[4, 4], pooling=PoolingType.MEAN, tt_cache_rows=cache // 2,
                             tt_cache_refresh_steps=REFRESH, tt_cache_decay=0.5),
    ]


class CacheModel(nn.Module):
    """The collection's pooled features in a fixed order (sharded key order depends on the plan)."""

    def __init__(self, fused_params: Mapping[str, Any] | None, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.tt = TTEmbeddingBagCollection(_tables(), fused_params=fused_params)

    def forward(self, kjt: KeyedJaggedTensor) -> Tensor:
        pooled = self.tt(kjt)
        return torch.cat([pooled[f] for f in KEYS], dim=1)


def _loss(out: Tensor) -> Tensor:
    return (out - 0.3).square().mean()


class PipelineCacheModel(CacheModel):
    """What TrainPipelineSparseDist drives: ``forward(batch) -> (loss, output)``."""

    def forward(self, batch: Batch) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        out = super().forward(batch.sparse_features)
        return _loss(out), out.detach()


def _batch(rank: int, step: int) -> Batch:
    return Batch(dense_features=torch.zeros(BATCH, 1), sparse_features=_kjt(rank, step),
                 labels=torch.zeros(BATCH))


def _kjt(rank: int, step: int) -> KeyedJaggedTensor:
    """Zipf-like ids (small ids hot; the hot set moves at step 3, so the second refresh
    evicts), empty bags included."""
    gen = torch.Generator().manual_seed(1000 * step + 17 * rank)
    lengths = torch.randint(0, 5, (len(FEATURES) * BATCH,), generator=gen)
    shift = 0 if step < 3 else 150
    values = []
    for i, n in enumerate(lengths.tolist()):
        rows = FEATURES[i // BATCH][2]
        values.append(((torch.rand(n, generator=gen) ** 4 * rows).long() + shift) % rows)
    return KeyedJaggedTensor.from_lengths_sync(KEYS, torch.cat(values), lengths)


def _union(kjts: Sequence[KeyedJaggedTensor]) -> KeyedJaggedTensor:
    """The ranks' batches as one batch (rank 0's samples first), for the unsharded reference."""
    values, lengths = [], []
    for key in KEYS:
        for kjt in kjts:
            values.append(kjt[key].values())
            lengths.append(kjt[key].lengths())
    return KeyedJaggedTensor.from_lengths_sync(KEYS, torch.cat(values), torch.cat(lengths))


def _generator(spec: Sequence[Any]) -> Any:
    return data_parallel() if spec[0] == "dp" else table_wise(rank=spec[1])


def _shard(model: CacheModel, specs: Mapping[str, Sequence[Any]], world_size: int
           ) -> DistributedModelParallel:
    module_plan = construct_module_sharding_plan(
        model.tt, {t: _generator(s) for t, s in specs.items()},
        sharder=TTEmbeddingBagCollectionSharder(), local_size=world_size,
        world_size=world_size, device_type="cpu",
    )
    return DistributedModelParallel(
        model, env=ShardingEnv.from_process_group(dist.group.WORLD), device=torch.device("cpu"),
        plan=ShardingPlan({"tt": module_plan}), sharders=[TTEmbeddingBagCollectionSharder()],
    )


def _full(value: Any) -> Tensor:
    """A state-dict value as the whole tensor on every rank (a table-wise ShardedTensor has
    one shard: broadcast from its owner)."""
    if not isinstance(value, ShardedTensor):
        return value.detach().clone()
    (meta,) = value.metadata().shards_metadata
    owner = meta.placement.rank()
    out = torch.empty(tuple(value.size()), dtype=value.dtype)
    if dist.get_rank() == owner:
        out.copy_(value.local_shards()[0].tensor)
    dist.broadcast(out, src=owner)
    return out


def _full_state(module: nn.Module) -> dict[str, Tensor]:
    return {k: _full(v) for k, v in module.state_dict().items()}


def _assert_matches(sharded: Mapping[str, Tensor], reference: Mapping[str, Tensor], what: str
                    ) -> None:
    """Cache ids, id map, step and counts exactly (they decide every later lookup); float
    tensors to the rounding of the ranks' gradient reduction."""
    assert set(sharded) == set(reference), (what, sorted(set(sharded) ^ set(reference)))
    for key, ref in reference.items():
        got = sharded[key]
        if key.rsplit(".", 1)[-1] in hot_cache.CACHE_BUFFERS:
            assert torch.equal(got, ref), f"{what}: {key}\n{got}\n{ref}"
        else:
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5, msg=f"{what}: {key}")


def _train(dmp: nn.Module, rank: int, world_size: int, steps: range) -> list[Tensor]:
    outs = []
    for step in steps:
        out = dmp(_kjt(rank, step))
        _loss(out).backward()
        outs.append(out.detach())
    return outs


def _held_caches(dmp: nn.Module) -> list[Any]:
    return [t for t in dmp.module.tt.embedding_bags.values() if t.holds_cache()]


def _held_steps(dmp: nn.Module) -> list[Tensor]:
    return [t.cache_step for t in _held_caches(dmp)]


@contextlib.contextmanager
def _logged_refreshes(dmp: nn.Module) -> Iterator[list[int]]:
    """The step (read from the buffer after the steps) of every refresh of a cache held here."""
    steps: list[Tensor] = []
    held = _held_caches(dmp)
    for local in held:
        def logged(local: Any = local, refresh: Any = local.refresh_cache) -> Any:
            steps.append(local.cache_step.clone())
            return refresh()
        local.refresh_cache = logged
    out: list[int] = []
    try:
        yield out
    finally:
        for local in held:
            del local.refresh_cache
    out.extend(int(s) for s in steps)


def _check_plans(rank: int, world_size: int, fused: Mapping[str, Any] | None, ckpt: str
                 ) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for i, specs in enumerate(PLANS):
        reference = CacheModel(fused)
        dmp = _shard(CacheModel(fused), specs, world_size)
        ref_opt = torch.optim.SGD(reference.parameters(), lr=LR) if fused is None else None
        opt = torch.optim.SGD(dmp.parameters(), lr=LR) if fused is None else None
        for step in range(5):
            batches = [_kjt(r, step) for r in range(world_size)]
            out = dmp(batches[rank])
            _loss(out).backward()
            ref_out = reference(_union(batches))
            _loss(ref_out).backward()
            for o in (opt, ref_opt):
                if o is not None:
                    o.step()
                    o.zero_grad()
            torch.testing.assert_close(
                out, ref_out[rank * BATCH : (rank + 1) * BATCH].detach(), rtol=1e-4, atol=1e-5,
                msg=f"plan {i} step {step}",
            )
            _assert_matches(_full_state(dmp.module), reference.state_dict(), f"plan {i} step {step}")
        tt = reference.tt
        assert tt.last_cache_refresh["a"].evicted > 0 and tt.last_cache_refresh["c"].evicted > 0
        assert tt.cached_ids("a").numel() == 24 and tt.cached_ids("c").numel() == 12
        dmp.eval()
        reference.eval()
        with torch.no_grad():
            batches = [_kjt(r, 50) for r in range(world_size)]
            torch.testing.assert_close(
                dmp(batches[rank]), reference(_union(batches))[rank * BATCH : (rank + 1) * BATCH],
                rtol=1e-4, atol=1e-5,
            )
        dmp.train()
        # A variable-batch (VBE) batch is refused on every rank before any collective, naming
        # the cached tables.
        kjt = _kjt(rank, 60)
        vbe = KeyedJaggedTensor(
            keys=KEYS, values=kjt.values(), lengths=kjt.lengths(),
            stride_per_key_per_rank=[[BATCH]] * len(KEYS),
            inverse_indices=(KEYS, torch.arange(BATCH).repeat(len(KEYS), 1)),
        )
        with pytest.raises(ValueError, match=r"hot-row cache \(\['a', 'c'\]\).*VBE"):
            dmp(vbe)
        if fused is not None:
            keys = set(dmp.fused_optimizer.params)
            assert {"tt.embedding_bags.a.cache_weight", "tt.embedding_bags.c.cache_weight"} <= keys
            opt_state = dmp.fused_optimizer.state_dict()["state"]
            assert set(opt_state["tt.embedding_bags.a.cache_weight"]) == {"momentum1"}
        if i == 0 and fused is not None:
            # Checkpoint plan 0, load it into plan 1: the same values, exactly; plan 1 then
            # trains on as plan 0 does (equal states; cache buffers bit for bit).
            saved = _full_state(dmp.module)
            dcp.save(dmp.state_dict(), checkpoint_id=ckpt)
            other = _shard(CacheModel(fused, seed=7), PLANS[1], world_size)
            state = other.state_dict()
            dcp.load(state, checkpoint_id=ckpt)
            other.load_state_dict(state)
            loaded = _full_state(other.module)
            assert set(loaded) == set(saved)
            for key, value in saved.items():
                assert torch.equal(loaded[key], value), key
            # Same plan from the checkpoint: resume is exact.
            same = _shard(CacheModel(fused, seed=9), PLANS[0], world_size)
            state = same.state_dict()
            dcp.load(state, checkpoint_id=ckpt)
            same.load_state_dict(state)
            # Refreshes at the start of step 6 in both (REFRESH=2: cache_step 6), with no read
            # of a step counter from the device, except once per held cache after the load.
            with ScalarReads(_held_steps(dmp)) as reads_dmp, _logged_refreshes(dmp) as log_dmp:
                a = _train(dmp, rank, world_size, range(5, 8))
            with ScalarReads(_held_steps(same)) as reads_same, _logged_refreshes(same) as log_same:
                b = _train(same, rank, world_size, range(5, 8))
            held = len(_held_steps(same))
            assert held == (1 if rank == 0 else 2)  # a (data_parallel), c (table_wise on rank 1)
            assert log_dmp == log_same == [6] * held
            assert reads_dmp.count == 0 and reads_same.count == held
            _train(other, rank, world_size, range(5, 8))
            assert all(torch.equal(x, y) for x, y in zip(a, b))
            after = _full_state(dmp.module)
            for key, value in _full_state(same.module).items():
                assert torch.equal(value, after[key]), key
            _assert_matches(_full_state(other.module), after, "other plan after resume")
            result["saved"] = saved
    if fused is not None:
        # TrainPipelineSparseDist (next batch's input dist before this step's backward) trains
        # a cached model as plain forward/backward does, refreshes included.
        steps = 5
        piped = _shard(PipelineCacheModel(fused), PLANS[0], world_size)
        plain = _shard(CacheModel(fused), PLANS[0], world_size)
        pipeline = TrainPipelineSparseDist(
            piped, torch.optim.SGD(piped.parameters(), lr=LR), torch.device("cpu")
        )
        batches = iter([_batch(rank, s) for s in range(steps)])
        for _ in range(steps):
            pipeline.progress(batches)
        assert any(getattr(m, "is_pipelined", False) for m in piped.modules())
        _train(plain, rank, world_size, range(steps))
        _assert_matches(_full_state(piped.module), _full_state(plain.module), "pipeline")
    return result


FUSED = {"optimizer": "exact_adagrad", "learning_rate": LR}


def _check_both(rank: int, world_size: int, ckpt: str) -> dict[str, Any]:
    """Fused Adagrad, then plain SGD over ``dmp.parameters()`` (one job: one process start)."""
    result = _check_plans(rank, world_size, FUSED, ckpt)
    _check_plans(rank, world_size, None, ckpt)
    return result


def test_sharded_cache_equals_unsharded_and_checkpoints(tmp_path: Any) -> None:
    ckpt = str(tmp_path / "ckpt")
    saved = run_multiprocess(_check_both, WORLD, args=(ckpt,))[0]["saved"]
    assert any(k.endswith("cache_weight_momentum1") for k in saved)
    # World size 1: the unsharded module loads the sharded checkpoint, cache included.
    single = CacheModel(FUSED, seed=11)
    state = single.state_dict()
    dcp.load(state, checkpoint_id=ckpt)
    single.load_state_dict(state)
    for key, value in single.state_dict().items():
        assert torch.equal(value, saved[key]), key
    assert os.path.isdir(ckpt)


def test_column_wise_cached_table_is_refused_with_its_name() -> None:
    model = CacheModel(None)
    params = construct_module_sharding_plan(
        model.tt, {"a": column_wise(ranks=[0, 1]), "b": data_parallel(), "c": data_parallel()},
        sharder=TTEmbeddingBagCollectionSharder(), local_size=WORLD, world_size=WORLD,
        device_type="cpu",
    )
    with pytest.raises(ValueError, match=r"TT table 'a' has a hot-row cache.*'column_wise'"):
        TTEmbeddingBagCollectionSharder().shard(model.tt, params, ShardingEnv.from_local(WORLD, 0))
    topology = Topology(world_size=WORLD, compute_device="cpu")
    with pytest.raises(ValueError, match=r"TT table 'c' has a hot-row cache.*column_wise"):
        plan(model, topology, batch_size=BATCH,
             constraints={"c": ParameterConstraints(sharding_types=["column_wise"])})
    # Unconstrained, the planner never proposes column_wise for a cached table.
    chosen = plan(model, topology, batch_size=BATCH).plan["tt"]
    assert {chosen[t].sharding_type for t in ("a", "c")} <= {"data_parallel", "table_wise"}
