"""Bad plans and misuse give clear errors (in-process: validation runs before any collective)."""

from __future__ import annotations

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec.distributed.planner import ParameterConstraints, Topology
from torchrec.distributed.sharding_plan import (
    column_wise,
    construct_module_sharding_plan,
    data_parallel,
    table_wise,
)
from torchrec.distributed.types import (
    EnumerableShardingSpec,
    ParameterSharding,
    ShardingEnv,
    ShardMetadata,
)

import tt_dist_cases as cases
from torchrec_tt import TTEmbeddingBagCollection
from torchrec_tt.sharding import (
    ShardedTTEmbeddingBagCollection,
    TTEmbeddingBagCollectionSharder,
    plan,
)
from torchrec_tt.sharding.embeddingbag import tt_planning

WORLD = 2


def _module() -> TTEmbeddingBagCollection:
    torch.manual_seed(0)
    return TTEmbeddingBagCollection(cases.TT_TABLES)


def _plan(module: TTEmbeddingBagCollection, **overrides):  # type: ignore[no-untyped-def]
    generators = {"t0": data_parallel(), "t1": table_wise(rank=1), "t2": column_wise(ranks=[0, 1])}
    generators.update(overrides)
    return construct_module_sharding_plan(
        module,
        generators,
        sharder=TTEmbeddingBagCollectionSharder(),
        local_size=WORLD,
        world_size=WORLD,
        device_type="cpu",
    )


def _shard(module: TTEmbeddingBagCollection, params) -> None:  # type: ignore[no-untyped-def]
    TTEmbeddingBagCollectionSharder().shard(module, params, ShardingEnv.from_local(WORLD, 0))


def test_unsupported_sharding_type() -> None:
    module = _module()
    params = dict(_plan(module))
    params["t1"] = ParameterSharding(
        sharding_type="row_wise",
        compute_kernel="customized_kernel",
        ranks=[0, 1],
        sharding_spec=EnumerableShardingSpec(
            [
                ShardMetadata([0, 0], [20, 8], "rank:0/cpu"),
                ShardMetadata([20, 0], [20, 8], "rank:1/cpu"),
            ]
        ),
    )
    with pytest.raises(ValueError, match=r"'t1'.*'row_wise' is not supported.*data_parallel"):
        _shard(module, params)


def test_ranks_out_of_range() -> None:
    module = _module()
    with pytest.raises(ValueError, match=r"'t1': ranks \[5\] are out of range for world size 2"):
        _shard(module, _plan(module, t1=table_wise(rank=5)))


def test_plan_for_unknown_and_missing_tables() -> None:
    module = _module()
    params = dict(_plan(module))
    params["nope"] = params["t0"]
    with pytest.raises(ValueError, match=r"tables \['nope'\] that this TTEmbeddingBagCollection"):
        _shard(module, params)
    del params["nope"], params["t2"]
    with pytest.raises(ValueError, match=r"no entry for the TT tables \['t2'\]"):
        _shard(module, params)


def test_unsupported_compute_kernel() -> None:
    module = _module()
    with pytest.raises(ValueError, match=r"'t1': compute kernel 'fused' is not supported"):
        _shard(module, _plan(module, t1=table_wise(rank=1, compute_kernel="fused")))


def test_column_shards_must_split_q1() -> None:
    module = _module()  # t0: D=16, q=(2, 2, 4): column shards are multiples of 8 columns
    with pytest.raises(ValueError, match=r"'t0'.*not aligned to multiples of D/q_1 = 8"):
        _shard(module, _plan(module, t0=column_wise(size_per_rank=[4, 12])))
    with pytest.raises(ValueError, match=r"'t0'.*at most q_1 = 2 shards"):
        _shard(module, _plan(module, t0=column_wise(ranks=[0, 1, 0, 1])))


def test_fused_optimizer_is_refused_not_dropped() -> None:
    module = TTEmbeddingBagCollection(
        cases.TT_TABLES, fused_params={"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.1}
    )
    with pytest.raises(ValueError, match="built with fused_params cannot be sharded yet"):
        _shard(module, _plan(module))


def test_sharded_module_validates_too() -> None:
    module = _module()
    with pytest.raises(ValueError, match="out of range"):
        ShardedTTEmbeddingBagCollection(
            module, _plan(module, t0=table_wise(rank=2)), ShardingEnv.from_local(WORLD, 0)
        )


def test_sharding_types_only_inside_a_tt_aware_planner() -> None:
    sharder = TTEmbeddingBagCollectionSharder()
    with pytest.raises(ValueError, match=r"torchrec_tt\.sharding\.plan\(model, topology"):
        sharder.sharding_types("cpu")
    with tt_planning():
        assert sharder.sharding_types("cpu") == ["data_parallel", "table_wise", "column_wise"]


def test_plan_rejects_constraints_for_unknown_tables() -> None:
    with pytest.raises(ValueError, match=r"constraints name tables \['nope'\]"):
        plan(
            cases.Model(device="meta"),
            Topology(world_size=WORLD, compute_device="cpu"),
            batch_size=8,
            constraints={"nope": ParameterConstraints(sharding_types=["table_wise"])},
        )
