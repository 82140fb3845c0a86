"""Bad plans and misuse give clear errors (in-process: validation runs before any collective);
where a sharded collection's fused optimizer comes from."""

from __future__ import annotations

from typing import Any

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
from torchrec.optim import LAMB, RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.distributed.types import (
    EnumerableShardingSpec,
    ParameterSharding,
    ShardingEnv,
    ShardMetadata,
)

import tt_dist_cases as cases
from torchrec_tt import TTEmbeddingBagCollection
from torchrec_tt.optim import FusedOptimConfig
from torchrec_tt.sharding import (
    ShardedTTEmbeddingBagCollection,
    TTEmbeddingBagCollectionSharder,
    plan,
)
from torchrec_tt.sharding.embeddingbag import tt_planning

WORLD = 2
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # apply_optimizer_in_backward


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


def test_fused_module_shards_with_its_optimizer() -> None:
    module = TTEmbeddingBagCollection(
        cases.TT_TABLES, fused_params={"optimizer": EmbOptimType.ADAM, "learning_rate": 0.1}
    )
    # (In-process, without a process group: TorchRec's table/column-wise dists need one.)
    dp_plan = _plan(module, t1=data_parallel(), t2=data_parallel())
    sharded = TTEmbeddingBagCollectionSharder().shard(
        module, dp_plan, ShardingEnv.from_local(WORLD, 0)
    )
    assert set(sharded.fused_optimizer.params) == {
        f"embedding_bags.{t}.core_{k}" for t, n in (("t0", 3), ("t1", 2), ("t2", 3)) for k in range(n)
    }
    assert set(sharded.state_dict()) == set(module.state_dict())


def test_fused_params_precedence_sharder_module_in_backward() -> None:
    sharder = TTEmbeddingBagCollectionSharder(
        fused_params={"optimizer": EmbOptimType.ADAM, "lr": 0.3, "eps": 1e-6}
    )
    # The sharder's fused_params alone.
    adam = FusedOptimConfig(EmbOptimType.ADAM, learning_rate=0.3, eps=1e-6)
    assert set(sharder.fused_configs(_module()).values()) == {adam}
    # The module's own config (complete) wins over the sharder's; an in-backward marking wins
    # over both, with the torch class's defaults for what it leaves out (Adagrad: eps=1e-10).
    module = TTEmbeddingBagCollection(
        cases.TT_TABLES, fused_params={"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.1}
    )
    apply_optimizer_in_backward(torch.optim.Adagrad, module.embedding_bags["t1"].parameters(),
                                {"lr": 0.2})
    rowwise = TTEmbeddingBagCollection(cases.TT_TABLES)
    apply_optimizer_in_backward(RowWiseAdagrad, rowwise.parameters(), {"lr": 0.4})
    configs = sharder.fused_configs(module)
    assert configs["t0"] == configs["t2"] == FusedOptimConfig(EmbOptimType.EXACT_SGD, 0.1)
    assert configs["t1"] == FusedOptimConfig(EmbOptimType.EXACT_ADAGRAD, 0.2, eps=1e-10)
    assert set(TTEmbeddingBagCollectionSharder().fused_configs(rowwise).values()) == {
        FusedOptimConfig(EmbOptimType.EXACT_ROWWISE_ADAGRAD, 0.4, eps=1e-10)
    }


@pytest.mark.parametrize(
    "optimizer,kwargs,match",
    [
        (torch.optim.RMSprop, {"lr": 0.1},
         r"'t0': apply_optimizer_in_backward optimizer torch\.optim\.rmsprop\.RMSprop has no TT "
         r"fused equivalent; use torch\.optim\.SGD"),
        (LAMB, {"lr": 0.1}, r"'t0'.*LAMB has no TT fused equivalent \(LAMB is not supported\)"),
        (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9},
         r"'t0': torch\.optim\.sgd\.SGD options \['momentum'\] \(values \[0\.9\]\) have no "
         r"equivalent in the TT fused EXACT_SGD"),
    ],
)
def test_unsupported_in_backward_optimizers(optimizer: Any, kwargs: dict, match: str) -> None:
    module = _module()
    apply_optimizer_in_backward(optimizer, module.parameters(), kwargs)
    with pytest.raises(ValueError, match=match):
        _shard(module, _plan(module))


def test_fused_tables_all_or_none() -> None:
    module = _module()
    apply_optimizer_in_backward(torch.optim.SGD, module.embedding_bags["t1"].parameters(),
                                {"lr": 0.1})
    with pytest.raises(ValueError, match=r"\['t1'\] have a fused optimizer but \['t0', 't2'\] do "
                       "not: a sharded TTEmbeddingBagCollection fuses all its tables or none"):
        _shard(module, _plan(module))
    module = _module()
    core_0, *others = module.embedding_bags["t0"].parameters()
    apply_optimizer_in_backward(torch.optim.SGD, [core_0], {"lr": 0.1})
    with pytest.raises(ValueError, match=r"'t0': apply_optimizer_in_backward marks "
                       r"\['embedding_bags\.t0\.core_0'\] but not"):
        _shard(module, _plan(module))
    apply_optimizer_in_backward(torch.optim.Adam, others, {"lr": 0.1})
    with pytest.raises(ValueError, match=r"'t0': its cores are marked with different in-backward"):
        _shard(module, _plan(module))


def test_bad_sharder_fused_params() -> None:
    with pytest.raises(ValueError, match=r"TTEmbeddingBagCollectionSharder\(fused_params=...\): "
                       "fused optimizer LAMB is not supported"):
        TTEmbeddingBagCollectionSharder(fused_params={"optimizer": EmbOptimType.LAMB})
    module = TTEmbeddingBagCollection(cases.TT_TABLES, fused_params={"optimizer": "exact_sgd"})
    sharder = TTEmbeddingBagCollectionSharder(fused_params={"cache_precision": "fp16"})
    with pytest.raises(ValueError, match=r"TT table 't0': fused optimizer from the sharder's "
                       r"fused_params \+ the module's fused_params: fused_params has unsupported "
                       r"keys \['cache_precision'\]"):
        sharder.shard(module, _plan(module), ShardingEnv.from_local(WORLD, 0))


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
