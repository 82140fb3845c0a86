"""``plan()``: one call that plans a model holding plain EBCs and TT collections.

It is TorchRec's ``EmbeddingShardingPlanner`` with two TT-aware parts:

* ``TTEmbeddingEnumerator`` proposes column-wise shards of TT tables aligned to ``q_1`` (the only
  column splits a TT table supports) and marks the run as TT-aware, which the TT sharder checks;
* ``TTShardEstimator`` costs TT options (storage, FLOPs, comms) and hands the rest to TorchRec.
"""

from __future__ import annotations

from torch import nn
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.planner.utils import sharder_name
from torchrec.distributed.planner.types import (
    ParameterConstraints,
    Shard,
    ShardingOption,
    Topology,
)
from torchrec.distributed.types import ModuleSharder, ShardingPlan, ShardingType

import torch.distributed as dist

from torchrec_tt.modules.embedding_bag import TTEmbeddingBagCollection
from torchrec_tt.validation import check_number
from torchrec_tt.sharding.embeddingbag import (
    CACHED_SHARDING_TYPES,
    TTEmbeddingBagCollectionSharder,
    tt_planning,
)
from torchrec_tt.sharding.estimator import TTShardEstimator
from torchrec_tt.sharding.tt_shards import tt_column_shard_dims

__all__ = ["TTEmbeddingEnumerator", "plan"]


class TTEmbeddingEnumerator(EmbeddingEnumerator):
    """``EmbeddingEnumerator`` for models with TT collections (same arguments).

    Column-wise is proposed for a TT table only when its constraints list ``column_wise``: it
    never saves memory (the later cores are replicated) and costs what data_parallel costs plus
    the all-to-alls. Its shards then split ``q_1`` (as many as the world size and ``q_1`` allow,
    each at least the table's ``min_partition`` wide) instead of TorchRec's 128-column blocks.
    A table with a hot-row cache is never proposed column_wise (``CACHED_SHARDING_TYPES``); a
    constraint that allows it nothing else raises ``ValueError`` naming the table.
    Pass a ``TTShardEstimator`` as ``estimator``.
    """

    _TT_SHARDER_KEY = sharder_name(TTEmbeddingBagCollection)

    def _filter_sharding_types(
        self, name: str, allowed_sharding_types: list[str], sharder_key: str = ""
    ) -> list[str]:
        types = super()._filter_sharding_types(name, allowed_sharding_types, sharder_key)
        if sharder_key == self._TT_SHARDER_KEY:
            constraint = self._constraints.get(name) if self._constraints else None
            if constraint is None or not constraint.sharding_types:
                types = [t for t in types if t != ShardingType.COLUMN_WISE.value]
            cache_rows = getattr(self, "_tt_cache_rows", {}).get(name, 0)
            if cache_rows > 0:
                cached = [t for t in types if t in CACHED_SHARDING_TYPES]
                if types and not cached:
                    raise ValueError(
                        f"TT table {name!r} has a hot-row cache (tt_cache_rows={cache_rows}), "
                        f"which sharding types {types} do not support; its constraints must "
                        f"allow one of {list(CACHED_SHARDING_TYPES)}"
                    )
                types = cached
        return types

    def enumerate(
        self, module: nn.Module, sharders: list[ModuleSharder[nn.Module]]
    ) -> list[ShardingOption]:
        # Cache sizes per TT table name (the filter above sees names only).
        self._tt_cache_rows = {
            cfg.name: cfg.tt_cache_rows
            for m in module.modules()
            if isinstance(m, TTEmbeddingBagCollection)
            for cfg in m.embedding_bag_configs()
        }
        with tt_planning():
            return super().enumerate(module, sharders)

    def populate_estimates(self, sharding_options: list[ShardingOption]) -> None:
        for so in sharding_options:
            if so.sharding_type == ShardingType.COLUMN_WISE.value and isinstance(
                so.module[1], TTEmbeddingBagCollection
            ):
                self._align_column_shards(so)
        super().populate_estimates(sharding_options)

    def _align_column_shards(self, so: ShardingOption) -> None:
        shape = so.module[1].tt_shapes()[so.name]
        constraint = self._constraints.get(so.name) if self._constraints else None
        min_partition = constraint.min_partition if constraint is not None else None
        dims = tt_column_shard_dims(shape, self._world_size, min_partition)
        if [s.size[1] for s in so.shards] == dims:
            return
        offsets = [sum(dims[:i]) for i in range(len(dims))]
        so.shards = [
            Shard(size=[shape.num_rows, d], offset=[0, o]) for d, o in zip(dims, offsets)
        ]


def _table_names(model: nn.Module, sharders: list[ModuleSharder[nn.Module]]) -> set[str]:
    by_type = {sharder.module_type: sharder for sharder in sharders}
    names: set[str] = set()
    for module in model.modules():
        sharder = by_type.get(type(module))
        if sharder is not None:
            names.update(sharder.shardable_parameters(module))
    return names


def plan(
    model: nn.Module,
    topology: Topology,
    batch_size: int,
    constraints: dict[str, ParameterConstraints] | None = None,
    *,
    sharders: list[ModuleSharder[nn.Module]] | None = None,
    device_flops: float | None = None,
    optimizer_multiplier: float | None = None,
    pg: dist.ProcessGroup | None = None,
) -> ShardingPlan:
    """A ``ShardingPlan`` for a model holding ``TTEmbeddingBagCollection`` s and plain EBCs.

    Args:
        model: the unsharded model (meta device is fine).
        topology: TorchRec ``Topology`` (world size, compute device, memory, bandwidths).
        batch_size: per-rank batch size.
        constraints: TorchRec ``ParameterConstraints`` keyed by table name (sharding types,
            pooling factors, ``min_partition`` ...), for TT and plain tables alike.
        sharders: defaults to ``[TTEmbeddingBagCollectionSharder(), EmbeddingBagCollectionSharder()]``;
            pass the same list to ``DistributedModelParallel``.
        device_flops: effective FLOP/s of the TT lookup (see ``TTShardEstimator``).
        optimizer_multiplier: optimizer state per TT core element (2: Adam, 0: SGD) for every TT
            table; None: each table's fused optimizer state (see ``TTShardEstimator``).
        pg: when given, plan on its rank 0 and broadcast (``collective_plan``); otherwise every
            caller plans locally (deterministic for equal inputs).

    Returns:
        the plan, to pass as ``DistributedModelParallel(..., plan=...)``. The planner's stats
        (logged at INFO on ``torchrec.distributed.planner.stats``) show TT tables with their
        estimated TT storage.
    """
    batch_size = int(check_number("batch_size", batch_size, low=1, integer=True, where="plan()"))
    if sharders is None:
        sharders = [TTEmbeddingBagCollectionSharder(), EmbeddingBagCollectionSharder()]
    if constraints:
        unknown = sorted(set(constraints) - _table_names(model, sharders))
        if unknown:
            raise ValueError(f"constraints name tables {unknown} that the model does not have")
        known = [t.value for t in ShardingType]
        for table, constraint in constraints.items():
            bogus = [t for t in constraint.sharding_types or () if t not in known]
            if bogus:
                raise ValueError(
                    f"constraints[{table!r}].sharding_types has {bogus}, which are not sharding "
                    f"types; choose from {known} (TT tables: data_parallel, table_wise, column_wise)"
                )
    estimator = TTShardEstimator(
        topology,
        constraints,
        device_flops=device_flops,
        optimizer_multiplier=optimizer_multiplier,
    )
    planner = EmbeddingShardingPlanner(
        topology=topology,
        batch_size=batch_size,
        enumerator=TTEmbeddingEnumerator(
            topology=topology,
            batch_size=batch_size,
            constraints=constraints,
            estimator=estimator,
        ),
        constraints=constraints,
    )
    if pg is not None:
        return planner.collective_plan(model, sharders, pg)
    return planner.plan(model, sharders)
