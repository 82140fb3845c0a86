"""ShardedTTEmbeddingBagCollection and its sharder.

TorchRec's pooled strategies (``Dp|Tw|CwPooledEmbeddingSharding``) do the feature and embedding
movement: KJT all-to-all in, pooled all-to-all out (with qcomms codecs), awaitables that become a
``KeyedTensor``. Only the lookup is ours (``TTPooledEmbeddingsLookup``).

Sharding types:

* ``data_parallel``: every rank holds the whole TT and looks up its own batch; no all-to-all.
  The lookup sits in its own ``DistributedDataParallel`` (gradients averaged over ranks): if
  DMP's outer DDP owned these cores, the first step's gradients would not be all-reduced.
  With a fused optimizer the lookup's backward does that average itself (see below) instead.
* ``table_wise``: the whole TT on one rank.
* ``column_wise``: a split of the first column factor ``q_1`` (see ``tt_shards.py``). Each shard
  owns a column slice of ``core_0``; ``core_1 ..`` are replicated on every rank and their
  gradients summed across ranks once per step (one all-reduce over a process group created for
  that purpose when the module is sharded, so every process of the job must shard it, as DMP
  does). This keeps the sharded table exactly the unsharded one (same forward, same
  gradients, same checkpoint) at the price of replicating the later cores: column-wise splits the
  lookup work and the pooled all-to-all, not the storage.

Hot-row caches (``tt_cache_rows > 0``, ``torchrec_tt.modules.hot_cache``): data_parallel and
table_wise tables keep theirs with the cores, and the sharded collection gives the unsharded
module's result on the union of the ranks' batches (same cached ids, counts, refreshes, slab and
slab optimizer state; float values up to the rounding of the gradient reduction). A table-wise
owner receives every rank's ids of the table from the KJT all-to-all, so it counts, refreshes
and trains its slab alone. Data-parallel replicas all-gather the step's ids of their cached
tables (two all-gathers per step on a group of their own: the sizes, then the ids) and count
them all, so every replica refreshes to the same state; the slab's gradient is averaged with
the cores' (by the lookup's DDP, or the fused update's all-reduce). Column-wise sharding of a
cached table raises ``ValueError`` naming it (a column shard would need a split slab and a
write-back solve spanning ranks).

Fused optimizers (``torchrec_tt.sharding.fused``): a table's optimizer comes from the sharder's
``fused_params``, the module's ``fused_params`` and ``apply_optimizer_in_backward`` on its
cores; all three sharding types support all four TT fused optimizers exactly (the update runs in
the lookup's backward after the gradient is complete across ranks, and leaves no ``.grad``).
``fused_optimizer`` exposes them as a TorchRec ``KeyedOptimizer`` keyed like the unsharded
module's, which ``DistributedModelParallel.fused_optimizer`` collects. Their state
(``core_<k>_momentum1`` / ``_momentum2`` / ``_step``) is in the state dict under the unsharded
module's buffer names, sharded like its core (column-wise ``core_0``: Adam's step and row-wise
Adagrad's row sums are replicated, as they span all columns).

State dict keys are the unsharded module's (``embedding_bags.<table>.core_<k>``, and for a
hot-row cache ``cache_weight``, its optimizer state and the ``hot_cache.CACHE_BUFFERS``): plain
tensors for data-parallel and replicated cores, ``ShardedTensor`` for everything of a table-wise
table (one shard, on its owner) and for column-wise ``core_0`` (also when the environment asks
for DTensor outputs: DTensor state is not implemented). All are ``torch.distributed.checkpoint`` compatible, so a checkpoint saved under
one plan or world size loads under another.

Weights are copied from the unsharded module unless it is on the meta device (then each table is
initialised per its config); replicated cores are then broadcast from rank 0 (data-parallel ones
by their DDP) so replicas agree.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from fbgemm_gpu.permute_pooled_embedding_modules import PermutePooledEmbeddings
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torchrec.distributed.embedding_sharding import (
    EmbeddingSharding,
    EmbeddingShardingContext,
    EmbeddingShardingInfo,
    KJTListSplitsAwaitable,
)
from torchrec.distributed.embedding_types import (
    EmbeddingComputeKernel,
    KJTList,
    ShardedEmbeddingModule,
)
from torchrec.distributed.embeddingbag import (
    EmbeddingBagCollectionAwaitable,
    EmbeddingBagCollectionContext,
    VariableBatchEmbeddingBagCollectionAwaitable,
)
from torchrec.distributed.types import (
    Awaitable,
    EmbeddingModuleShardingPlan,
    LazyAwaitable,
    ModuleSharder,
    ParameterSharding,
    QuantizedCommCodecs,
    Shard,
    ShardedTensor,
    ShardedTensorMetadata,
    ShardingEnv,
    ShardingEnv2D,
    ShardingType,
    ShardMetadata,
    TensorProperties,
)
from torchrec.modules.embedding_configs import EmbeddingTableConfig
from torchrec.modules.embedding_modules import get_embedding_names_by_table
from torchrec.optim.fused import EmptyFusedOptimizer, FusedOptimizerModule
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor
from torchrec.sparse.jagged_tensor_validator import validate_keyed_jagged_tensor

from torchrec_tt.modules.embedding_bag import TTEmbeddingBagCollection
from torchrec_tt.modules import hot_cache
from torchrec_tt.ops import TTKernelOptions
from torchrec_tt.optim import FusedOptimConfig
from torchrec_tt.shapes import TTShape
from torchrec_tt.sharding.cw_sharding import CwTTPooledEmbeddingSharding
from torchrec_tt.sharding.dp_sharding import DpTTPooledEmbeddingSharding
from torchrec_tt.sharding.fused import (
    FusedTable,
    ShardedTTFusedOptimizer,
    TTFusedUpdate,
    resolve_fused_configs,
)
from torchrec_tt.sharding.lookup import TTLocalTable
from torchrec_tt.sharding.tt_shards import check_column_shards, column_shard_core0_columns
from torchrec_tt.sharding.tw_sharding import TwTTPooledEmbeddingSharding

__all__ = [
    "CACHED_SHARDING_TYPES",
    "TT_COMPUTE_KERNELS",
    "TT_SHARDING_TYPES",
    "ShardedTTEmbeddingBagCollection",
    "TTEmbeddingBagCollectionSharder",
]

#: Sharding types a TT table supports.
TT_SHARDING_TYPES: tuple[str, ...] = (
    ShardingType.DATA_PARALLEL.value,
    ShardingType.TABLE_WISE.value,
    ShardingType.COLUMN_WISE.value,
)
#: Sharding types a TT table with a hot-row cache supports (``tt_cache_rows > 0``).
CACHED_SHARDING_TYPES: tuple[str, ...] = (
    ShardingType.DATA_PARALLEL.value,
    ShardingType.TABLE_WISE.value,
)
#: Compute kernels accepted in a plan. The planner proposes ``customized_kernel``; ``dense`` (what
#: TorchRec's ``data_parallel()`` / ``table_wise()`` plan helpers write when no kernel is named)
#: means the same TT lookup, with gradients left to the user's optimizer.
TT_COMPUTE_KERNELS: tuple[str, ...] = (
    EmbeddingComputeKernel.CUSTOMIZED_KERNEL.value,
    EmbeddingComputeKernel.DENSE.value,
)

_NO_DEFAULT_PLANNER = (
    "TorchRec's default planner has no cost model for TTEmbeddingBagCollection (its estimators "
    "reject compute kernel 'customized_kernel'). Make the plan with "
    "torchrec_tt.sharding.plan(model, topology, batch_size) and pass it as "
    "DistributedModelParallel(..., plan=plan)."
)
_TT_PLANNING: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "torchrec_tt_planning", default=False
)


@contextlib.contextmanager
def tt_planning() -> Iterator[None]:
    """Marks a planner run as TT-aware (``TTEmbeddingEnumerator`` enters it while enumerating)."""
    token = _TT_PLANNING.set(True)
    try:
        yield
    finally:
        _TT_PLANNING.reset(token)


def _validate_plan(
    module: TTEmbeddingBagCollection,
    plan: Mapping[str, ParameterSharding],
    world_size: int,
) -> None:
    tables = [cfg.name for cfg in module.embedding_bag_configs()]
    unknown = [t for t in plan if t not in tables]
    if unknown:
        raise ValueError(
            f"sharding plan names tables {unknown} that this TTEmbeddingBagCollection does not "
            f"have (its tables: {tables})"
        )
    missing = [t for t in tables if t not in plan]
    if missing:
        raise ValueError(f"sharding plan has no entry for the TT tables {missing}")
    shapes = module.tt_shapes()
    for name in tables:
        ps = plan[name]
        if ps.sharding_type not in TT_SHARDING_TYPES:
            raise ValueError(
                f"TT table {name!r}: sharding type {ps.sharding_type!r} is not supported; "
                f"TT tables support {list(TT_SHARDING_TYPES)}"
            )
        if ps.compute_kernel not in TT_COMPUTE_KERNELS:
            raise ValueError(
                f"TT table {name!r}: compute kernel {ps.compute_kernel!r} is not supported; "
                f"use {EmbeddingComputeKernel.CUSTOMIZED_KERNEL.value!r}"
            )
        ranks = list(ps.ranks or [])
        bad = [r for r in ranks if not isinstance(r, int) or not 0 <= r < world_size]
        if bad:
            raise ValueError(
                f"TT table {name!r}: ranks {bad} are out of range for world size {world_size}"
            )
        cache_rows = next(c.tt_cache_rows for c in module.embedding_bag_configs() if c.name == name)
        if cache_rows > 0 and ps.sharding_type not in CACHED_SHARDING_TYPES:
            raise ValueError(
                f"TT table {name!r} has a hot-row cache (tt_cache_rows={cache_rows}), which "
                f"sharding type {ps.sharding_type!r} does not support (a column shard would need "
                f"a split slab and a write-back across ranks); shard it with one of "
                f"{list(CACHED_SHARDING_TYPES)} or build it with tt_cache_rows=0"
            )
        if ps.sharding_type == ShardingType.DATA_PARALLEL.value:
            continue
        shards = ps.sharding_spec.shards if ps.sharding_spec is not None else []
        if not shards or len(shards) != len(ranks):
            raise ValueError(
                f"TT table {name!r}: {ps.sharding_type} needs one rank per shard, got "
                f"{len(shards)} shards and ranks {ranks}"
            )
        shape = shapes[name]
        if ps.sharding_type == ShardingType.TABLE_WISE.value:
            if len(shards) != 1 or list(shards[0].shard_sizes) != [
                shape.num_rows,
                shape.embedding_dim,
            ]:
                raise ValueError(
                    f"TT table {name!r}: a table_wise shard must be the whole "
                    f"[{shape.num_rows}, {shape.embedding_dim}] table"
                )
        else:
            check_column_shards(
                name,
                shape,
                [s.shard_offsets for s in shards],
                [s.shard_sizes for s in shards],
            )


def _has_fused_optimizer(module: TTEmbeddingBagCollection) -> bool:
    try:
        module.fused_optimizer
    except RuntimeError:  # built without fused_params
        return False
    return True


def _logical_table(num_rows: int, dim: int) -> Tensor:
    """What TorchRec's planner and sharding classes see of a TT table: a ``[N, D]`` meta tensor."""
    return torch.empty(num_rows, dim, device="meta")


class ShardedTTEmbeddingBagCollection(
    ShardedEmbeddingModule[
        KJTList, list[torch.Tensor], KeyedTensor, EmbeddingBagCollectionContext
    ],
    FusedOptimizerModule,
):
    """The sharded twin of ``TTEmbeddingBagCollection`` (built by its sharder).

    Input and output follow ``ShardedEmbeddingBagCollection``: a data-parallel KJT in, a lazily
    awaited ``KeyedTensor`` out (keys are the feature names; their order depends on the plan, so
    index by key). A feature of several tables (TorchRec's shared features) is looked up in each,
    its outputs keyed ``feature@table``. Variable batch per feature (VBE, with the KJT's inverse
    indices) works as in TorchRec's sharded EBC.

    Args:
        module: the unsharded collection (any device; meta means "initialise here").
        table_name_to_parameter_sharding: one ``ParameterSharding`` per table.
        env: sharding environment.
        device: compute device of this rank.
        qcomm_codecs_registry: quantised-comms codecs for the pooled all-to-all.
        module_fqn: the module's name in the model (trace annotations).
        fused_params: the sharder's ``fused_params`` (see ``torchrec_tt.sharding.fused`` for how
            they combine with the module's and with ``apply_optimizer_in_backward``).
    """

    def __init__(
        self,
        module: TTEmbeddingBagCollection,
        table_name_to_parameter_sharding: Mapping[str, ParameterSharding],
        env: ShardingEnv,
        device: torch.device | None = None,
        qcomm_codecs_registry: dict[str, QuantizedCommCodecs] | None = None,
        module_fqn: str | None = None,
        fused_params: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(qcomm_codecs_registry=qcomm_codecs_registry)
        if isinstance(env, ShardingEnv2D):
            raise ValueError("TT tables do not support 2D parallelism (ShardingEnv2D)")
        _validate_plan(module, table_name_to_parameter_sharding, env.world_size)
        fused_configs = resolve_fused_configs(module, fused_params)
        # The module's kernel options, with the sharder's fused_params keys taking precedence.
        kernel_options = TTKernelOptions.from_fused_params(
            {**dataclasses.asdict(module.kernel_options), **dict(fused_params or {})}
        )
        self._kernel_options = kernel_options
        self._fused_optimizer: ShardedTTFusedOptimizer | None = None
        self._env = env
        self._device = device if device is not None else torch.device("cpu")
        self._module_fqn = module_fqn
        self._is_weighted = module.is_weighted()
        self._embedding_bag_configs = module.embedding_bag_configs()
        self._shapes: dict[str, TTShape] = module.tt_shapes()
        self.module_sharding_plan = EmbeddingModuleShardingPlan(
            {
                cfg.name: table_name_to_parameter_sharding[cfg.name]
                for cfg in self._embedding_bag_configs
            }
        )

        self.embedding_bags = nn.ModuleDict()
        for cfg in self._embedding_bag_configs:
            self.embedding_bags[cfg.name] = self._local_table(cfg.name)
        # One param group per distinct config; the updates read its "lr".
        groups: dict[FusedOptimConfig, dict[str, Any]] = {}
        self._fused_tables: dict[str, FusedTable] = {
            name: FusedTable(cfg, groups.setdefault(cfg, {"lr": cfg.learning_rate}))
            for name, cfg in fused_configs.items()
        }
        for name, fused in self._fused_tables.items():
            local: TTLocalTable = self.embedding_bags[name]  # type: ignore[assignment]
            local.init_optimizer_state(fused.cfg.state_shapes)
            for p in local.parameters():
                # As TorchRec marks fused tables: in_backward_optimizer_filter() then leaves
                # them out of the user's dense optimizer.
                p._in_backward_optimizers = [EmptyFusedOptimizer()]  # type: ignore[attr-defined]
        self._init_weights(module)

        by_type: dict[str, list[TTLocalTable]] = {}
        for local in self.embedding_bags.values():  # type: ignore[assignment]
            by_type.setdefault(local.sharding_type, []).append(local)
        column_wise = by_type.get(ShardingType.COLUMN_WISE.value, [])
        replicated = [p for t in column_wise for p in t.replicated_cores()]
        # Tensors every rank must hold equal: broadcast from rank 0 (non-fused data-parallel
        # cores are broadcast by their DDP).
        to_broadcast: list[Tensor] = list(replicated)
        for local in self.embedding_bags.values():  # type: ignore[assignment]
            data_parallel = local.sharding_type == ShardingType.DATA_PARALLEL.value
            if data_parallel and local.holds_cache():
                # (the DDP of a non-fused lookup broadcasts its parameters, not these)
                to_broadcast.extend(getattr(local, b) for b in hot_cache.CACHE_BUFFERS)
            if self._fused_tables:
                to_broadcast.extend(local.replicated_state())
                if data_parallel:
                    to_broadcast.extend(local.whole_params())
        pg = env.process_group
        distributed = pg is not None and env.world_size > 1
        if distributed and to_broadcast:
            src = dist.get_global_rank(pg, 0)
            with torch.no_grad():
                for t in to_broadcast:
                    dist.broadcast(t, src=src, group=pg)

        def own_group() -> dist.ProcessGroup | None:
            # Gradient reductions in the backward run on a group of their own, so that they
            # cannot interleave with TorchRec's all-to-alls (every rank creates the same groups
            # in the same order: the plan is the same everywhere).
            if not distributed:
                return pg
            return dist.new_group(
                ranks=dist.get_process_group_ranks(pg), backend=dist.get_backend(pg)
            )

        replicated_group = own_group() if column_wise else None
        # Data-parallel replicas with a hot-row cache count every rank's ids (an all-gather on a
        # group of its own in the forward), so that they all refresh alike.
        cached_dp = any(
            local.holds_cache() for local in by_type.get(ShardingType.DATA_PARALLEL.value, [])
        )
        count_group = own_group() if cached_dp else None
        fused_updates: dict[str, TTFusedUpdate] = {}
        if self._fused_tables:
            reductions = {
                ShardingType.DATA_PARALLEL.value: ("mean", own_group),
                ShardingType.TABLE_WISE.value: (None, lambda: None),
                ShardingType.COLUMN_WISE.value: ("sum", lambda: replicated_group),
            }
            for sharding_type, locals_ in by_type.items():
                reduce, group = reductions[sharding_type]
                fused_updates[sharding_type] = TTFusedUpdate(
                    locals_, self._fused_tables, reduce, group()
                )

        infos: dict[str, list[EmbeddingShardingInfo]] = {}
        # A feature of several tables (TorchRec's shared features) is routed to each of them (the
        # input permute repeats it) and its outputs are named "feature@table", as TorchRec's
        # sharded EBC names them.
        embedding_names = get_embedding_names_by_table(self._embedding_bag_configs)
        for cfg, names in zip(self._embedding_bag_configs, embedding_names):
            ps = self.module_sharding_plan[cfg.name]
            infos.setdefault(ps.sharding_type, []).append(
                EmbeddingShardingInfo(
                    embedding_config=EmbeddingTableConfig(
                        num_embeddings=cfg.num_embeddings,
                        embedding_dim=cfg.embedding_dim,
                        name=cfg.name,
                        data_type=cfg.data_type,
                        feature_names=list(cfg.feature_names),
                        pooling=cfg.pooling,
                        is_weighted=self._is_weighted,
                        has_feature_processor=False,
                        embedding_names=list(names),
                        weight_init_max=cfg.weight_init_max,
                        weight_init_min=cfg.weight_init_min,
                    ),
                    param_sharding=ps,
                    param=_logical_table(cfg.num_embeddings, cfg.embedding_dim),
                    fused_params={},
                )
            )
        self._sharding_types: list[str] = list(infos)
        tables = self.embedding_bags
        self._embedding_shardings: list[
            EmbeddingSharding[EmbeddingShardingContext, KeyedJaggedTensor, Tensor, Tensor]
        ] = []
        for sharding_type, sharding_infos in infos.items():
            fused_update = fused_updates.get(sharding_type)
            if sharding_type == ShardingType.DATA_PARALLEL.value:
                sharding: Any = DpTTPooledEmbeddingSharding(
                    sharding_infos, env, tables, self._is_weighted, self._device, fused_update,
                    count_group=count_group,
                )
            elif sharding_type == ShardingType.TABLE_WISE.value:
                sharding = TwTTPooledEmbeddingSharding(
                    sharding_infos,
                    env,
                    tables,
                    self._is_weighted,
                    self._device,
                    fused_update,
                    qcomm_codecs_registry=self.qcomm_codecs_registry,
                )
            else:
                sharding = CwTTPooledEmbeddingSharding(
                    sharding_infos,
                    env,
                    tables,
                    self._is_weighted,
                    replicated,
                    replicated_group,
                    self._device,
                    fused_update,
                    qcomm_codecs_registry=self.qcomm_codecs_registry,
                )
            self._embedding_shardings.append(sharding)

        for sharding_type, sharding in zip(self._sharding_types, self._embedding_shardings):
            lookup: nn.Module = sharding.create_lookup()
            lookup.kernel_options = kernel_options  # type: ignore[assignment]
            if sharding_type == ShardingType.DATA_PARALLEL.value and not self._fused_tables:
                lookup = DistributedDataParallel(
                    module=lookup,
                    device_ids=None if self._device.type == "cpu" else [self._device],
                    process_group=env.process_group,
                    gradient_as_bucket_view=True,
                    static_graph=True,
                )
            self._lookups.append(lookup)

        self._embedding_names: list[str] = []
        self._embedding_dims: list[int] = []
        uncombined_names: list[str] = []
        self._uncombined_embedding_dims: list[int] = []
        shard_offsets: list[int] = []
        for sharding in self._embedding_shardings:
            self._output_dists.append(sharding.create_output_dist(device=self._device))
            self._embedding_names.extend(sharding.embedding_names())
            self._embedding_dims.extend(sharding.embedding_dims())
            uncombined_names.extend(sharding.uncombined_embedding_names())
            self._uncombined_embedding_dims.extend(sharding.uncombined_embedding_dims())
            shard_offsets.extend(
                meta.shard_offsets[1] if meta is not None else 0
                for meta in sharding.embedding_shard_metadata()
            )
        # VBE batches: the column shards of a feature are put back together (in column order)
        # after the inverse indices line the rows up, as TorchRec's sharded EBC does; the other
        # batches have it done by the column-wise output dist.
        first: dict[str, int] = {}
        for i, name in enumerate(uncombined_names):
            first.setdefault(name, i)
        self._vbe_permute = PermutePooledEmbeddings(
            self._uncombined_embedding_dims,
            sorted(range(len(uncombined_names)),
                   key=lambda i: (first[uncombined_names[i]], shard_offsets[i])),
            self._device,
        )

        self._vbe_output_dists: list[nn.Module] | None = None
        self._feature_splits: list[int] = []
        self._features_order: list[int] = []
        self._has_uninitialized_input_dist = True
        self._has_features_permute = True

        if self._fused_tables:
            by_group: dict[int, tuple[dict[str, Any], list[str]]] = {}
            for name, fused in self._fused_tables.items():
                keys = [f"embedding_bags.{name}.{p}" for p in self._param_names(name)]
                by_group.setdefault(id(fused.group), (fused.group, []))[1].extend(keys)
            self._fused_optimizer = ShardedTTFusedOptimizer(
                self._fused_param_views, self._fused_state_views, list(by_group.values()),
                self._fused_tables,
            )

    # --- construction helpers ---------------------------------------------------------------

    def _local_table(self, name: str) -> TTLocalTable:
        ps = self.module_sharding_plan[name]
        rank = self._env.rank
        column_shards: list[tuple[int, int]] = []
        if ps.sharding_type == ShardingType.COLUMN_WISE.value:
            assert ps.sharding_spec is not None and ps.ranks is not None
            column_shards = [
                (s.shard_offsets[1], s.shard_sizes[1])
                for s, r in zip(ps.sharding_spec.shards, ps.ranks)
                if r == rank
            ]
        owns = ps.sharding_type == ShardingType.DATA_PARALLEL.value or (
            ps.sharding_type == ShardingType.TABLE_WISE.value
            and ps.ranks is not None
            and ps.ranks[0] == rank
        )
        cfg = next(c for c in self._embedding_bag_configs if c.name == name)
        return TTLocalTable(
            name,
            self._shapes[name],
            ps.sharding_type,
            local_column_shards=column_shards,
            owns_table=owns,
            device=self._device,
            cache_rows=cfg.tt_cache_rows,
            cache_refresh_steps=cfg.tt_cache_refresh_steps,
            cache_decay=cfg.tt_cache_decay,
        )

    @torch.no_grad()
    def _init_weights(self, module: TTEmbeddingBagCollection) -> None:
        source = module
        if module.cores()[0].device.type == "meta":
            source = TTEmbeddingBagCollection(
                self._embedding_bag_configs, is_weighted=self._is_weighted, device="cpu"
            )
        module_cfg = module.fused_optimizer.cfg if _has_fused_optimizer(module) else None
        for name, local in self.embedding_bags.items():
            table = source.embedding_bags[name]
            local.copy_from_full(
                [getattr(table, p).detach().to(self._device) for p in local.param_names]
            )
            if local.holds_cache():
                for b in hot_cache.CACHE_BUFFERS:
                    getattr(local, b).copy_(getattr(table, b))
            fused = self._fused_tables.get(name)
            if fused is None or module_cfg is None or source is not module:
                continue
            if module_cfg.optimizer != fused.cfg.optimizer:
                continue  # another optimizer: its state does not apply; start from zeros
            for k, states in enumerate(local.optimizer_state_shapes):
                for key in states:
                    full = getattr(table, f"{local.param_names[k]}_{key}")
                    local.copy_state_from_full(k, key, full.detach().to(self._device))

    # --- ShardedModule ----------------------------------------------------------------------

    def create_context(self) -> EmbeddingBagCollectionContext:
        return EmbeddingBagCollectionContext()

    @property
    def unsharded_module_type(self) -> type[TTEmbeddingBagCollection]:
        return TTEmbeddingBagCollection

    def _create_input_dist(self, input_feature_names: list[str]) -> None:
        feature_names: list[str] = []
        for sharding in self._embedding_shardings:
            self._input_dists.append(sharding.create_input_dist())
            feature_names.extend(sharding.feature_names())
            self._feature_splits.append(len(sharding.feature_names()))
        #: The feature of each output position (a shared feature once per table).
        self._input_feature_names = feature_names
        if feature_names == input_feature_names:
            self._has_features_permute = False
        else:
            self._features_order = [input_feature_names.index(f) for f in feature_names]
            self.register_buffer(
                "_features_order_tensor",
                torch.tensor(self._features_order, device=self._device, dtype=torch.int32),
                persistent=False,
            )

    def _validate_features(self, features: KeyedJaggedTensor) -> None:
        # Keys of no table are ignored (the input permute drops them), as in TorchRec's EBC.
        expected = [f for cfg in self._embedding_bag_configs for f in cfg.feature_names]
        keys = features.keys()
        duplicated = sorted({k for k in keys if k in expected and keys.count(k) > 1})
        if duplicated:
            raise ValueError(f"KeyedJaggedTensor has the keys {duplicated} more than once")
        missing = [f for f in expected if f not in keys]
        if missing:
            raise ValueError(
                f"KeyedJaggedTensor (keys {keys}) lacks the features {missing} of this sharded "
                "TTEmbeddingBagCollection"
            )
        validate_keyed_jagged_tensor(features)

    def input_dist(
        self, ctx: EmbeddingBagCollectionContext, features: KeyedJaggedTensor
    ) -> Awaitable[Awaitable[KJTList]]:
        if features.variable_stride_per_key():
            # VBE: the lookups pad the bags to one batch size (as the unsharded module does) and
            # write TorchRec's VBE layout, which its variable-batch pooled all-to-all moves and
            # its VBE awaitable lines up by the inverse indices (output_dist).
            if features.inverse_indices_or_none() is None:
                raise ValueError(
                    "variable batch size per feature (VBE) needs the KeyedJaggedTensor's "
                    "inverse_indices (as TorchRec's sharded EmbeddingBagCollection)"
                )
            # Every rank knows the configs: all refuse before any collective.
            cached = [c.name for c in self._embedding_bag_configs if c.tt_cache_rows > 0]
            if cached:
                raise ValueError(
                    f"TT tables with a hot-row cache ({cached}) take no variable-batch (VBE) "
                    "KeyedJaggedTensor; pass one batch size per feature"
                )
            ctx.variable_batch_per_feature = True
            ctx.inverse_indices = features.inverse_indices()
        if self._has_uninitialized_input_dist:
            self._validate_features(features)
            self._create_input_dist(features.keys())
            self._has_uninitialized_input_dist = False
        with torch.no_grad():
            if self._has_features_permute:
                features = features.permute(self._features_order, self._features_order_tensor)
            awaitables = []
            for input_dist, features_by_shard in zip(
                self._input_dists, features.split(self._feature_splits)
            ):
                awaitables.append(input_dist(features_by_shard))
                ctx.sharding_contexts.append(
                    EmbeddingShardingContext(
                        batch_size_per_feature_pre_a2a=features_by_shard.stride_per_key(),
                        variable_batch_per_feature=ctx.variable_batch_per_feature,
                    )
                )
            return KJTListSplitsAwaitable(awaitables, ctx, self._module_fqn, self._sharding_types)

    def compute(self, ctx: EmbeddingBagCollectionContext, dist_input: KJTList) -> list[Tensor]:
        return [lookup(features) for lookup, features in zip(self._lookups, dist_input)]

    def output_dist(
        self, ctx: EmbeddingBagCollectionContext, output: list[Tensor]
    ) -> LazyAwaitable[KeyedTensor]:
        dists = self._output_dists
        if ctx.variable_batch_per_feature:
            # TorchRec's pooled dists pick VBE or not at their first call and keep it: VBE
            # batches get dists of their own, made at the first one.
            # (A plain list: their comms buffers stay out of the state dict, as the other
            # dists' are.)
            if self._vbe_output_dists is None:
                self._vbe_output_dists = [
                    sharding.create_output_dist(device=self._device)
                    for sharding in self._embedding_shardings
                ]
            dists = self._vbe_output_dists
        awaitables = [
            dist_(embeddings, sharding_ctx)
            for dist_, sharding_ctx, embeddings in zip(dists, ctx.sharding_contexts, output)
        ]
        if ctx.variable_batch_per_feature:
            assert ctx.inverse_indices is not None  # checked in input_dist
            # Rows of the inverse indices (KJT key order) for the output features (ours).
            row_of = {name: i for i, name in enumerate(ctx.inverse_indices[0])}
            rows = [row_of[f] for f in self._input_feature_names]
            return VariableBatchEmbeddingBagCollectionAwaitable(
                awaitables=awaitables,
                inverse_indices=ctx.inverse_indices,
                inverse_indices_permute_indices=torch.tensor(
                    rows, device=ctx.inverse_indices[1].device
                ),
                batch_size_per_feature_pre_a2a=[
                    b for sc in ctx.sharding_contexts for b in sc.batch_size_per_feature_pre_a2a
                ],
                uncombined_embedding_dims=self._uncombined_embedding_dims,
                embedding_names=self._embedding_names,
                embedding_dims=self._embedding_dims,
                permute_op=self._vbe_permute,
                module_fqn=self._module_fqn,
                sharding_types=self._sharding_types,
            )
        return EmbeddingBagCollectionAwaitable(
            awaitables=awaitables,
            embedding_dims=self._embedding_dims,
            embedding_names=self._embedding_names,
            module_fqn=self._module_fqn,
            sharding_types=self._sharding_types,
        )

    # --- fused optimizer --------------------------------------------------------------------

    @property
    def fused_optimizer(self) -> KeyedOptimizer:
        """The fused optimizers as one TorchRec ``KeyedOptimizer`` (keys
        ``embedding_bags.<table>.core_<k>``, as the unsharded module's); empty without one.
        ``DistributedModelParallel.fused_optimizer`` includes it."""
        if self._fused_optimizer is None:
            return CombinedOptimizer([])
        return self._fused_optimizer

    def _param_names(self, name: str) -> list[str]:
        """A table's trained tensors: ``core_<k>``, then ``cache_weight`` with a hot-row cache."""
        local: TTLocalTable = self.embedding_bags[name]  # type: ignore[assignment]
        return local.param_names

    def _fused_param_views(self) -> dict[str, Tensor]:
        return {
            f"embedding_bags.{name}.{p}": self._core_value(name, k, keep_vars=True)
            for name in self._fused_tables
            for k, p in enumerate(self._param_names(name))
        }

    def _fused_state_views(self, key: str) -> dict[str, Any]:
        _, name, param = key.split(".")
        return self._state_values(name, self._param_names(name).index(param), keep_vars=True)

    def _state_values(self, name: str, k: int, keep_vars: bool) -> dict[str, Any]:
        """The optimizer state of trained tensor ``k`` (``_param_names``) of a fused table, as
        it appears in the state dict: whole for replicated state, a ShardedTensor where the
        tensor is sharded."""
        local: TTLocalTable = self.embedding_bags[name]  # type: ignore[assignment]
        full_shapes = self._fused_tables[name].cfg.state_shapes(torch.Size(local.param_shapes[k]))
        out: dict[str, Any] = {}
        for key, full_shape in full_shapes.items():
            pieces = local.state_pieces(k, key)
            if self._is_sharded_state(name, k, key):
                out[key] = self._sharded_tensor(name, list(full_shape), pieces, keep_vars)
            else:
                ((tensor, _),) = pieces
                out[key] = tensor if keep_vars else tensor.detach()
        return out

    def _is_sharded_state(self, name: str, k: int, key: str) -> bool:
        sharding_type = self.module_sharding_plan[name].sharding_type
        local: TTLocalTable = self.embedding_bags[name]  # type: ignore[assignment]
        return sharding_type == ShardingType.TABLE_WISE.value or local.is_state_split(k, key)

    def _apply(self, fn: Any, recurse: bool = True) -> ShardedTTEmbeddingBagCollection:
        out = super()._apply(fn, recurse)
        if getattr(self, "_fused_optimizer", None) is not None:
            self._fused_optimizer.rebind()  # type: ignore[union-attr]
        return out

    # --- state dict -------------------------------------------------------------------------

    def _sharded_tensor(
        self, name: str, size: list[int], pieces: list[tuple[Tensor, int]], keep_vars: bool,
        dtype: torch.dtype = torch.float32,
    ) -> ShardedTensor:
        """A sharded core of a table (every table_wise core, column_wise ``core_0``) or a state
        of one, as a ShardedTensor of global ``size`` with this rank's ``pieces``
        (``(tensor, first column)``). Column-wise pieces split the columns of a 2-D ``size``;
        table-wise ones are the whole tensor (any number of dimensions, 0 included)."""
        ps = self.module_sharding_plan[name]
        assert ps.sharding_spec is not None
        shape = self._shapes[name]
        metadata = {}  # first column -> the plan shard's piece of the tensor
        for s in ps.sharding_spec.shards:
            if ps.sharding_type == ShardingType.TABLE_WISE.value:
                metadata[0] = ShardMetadata(
                    shard_offsets=[0] * len(size), shard_sizes=list(size), placement=s.placement
                )
            else:
                start, width = column_shard_core0_columns(
                    shape, s.shard_offsets[1], s.shard_sizes[1]
                )
                metadata[start] = ShardMetadata(
                    shard_offsets=[0, start], shard_sizes=[size[0], width], placement=s.placement
                )
        local_shards = [
            Shard(tensor=tensor if keep_vars else tensor.detach(), metadata=metadata[start])
            for tensor, start in pieces
        ]
        global_metadata = ShardedTensorMetadata(
            shards_metadata=list(metadata.values()),
            size=torch.Size(size),
            tensor_properties=TensorProperties(
                dtype=dtype,
                requires_grad=keep_vars and any(t.requires_grad for t, _ in pieces),
            ),
        )
        return ShardedTensor._init_from_local_shards_and_global_metadata(
            local_shards, global_metadata, process_group=self._env.process_group
        )

    def _core_value(self, name: str, k: int, keep_vars: bool) -> Tensor:
        """Trained tensor ``k`` of a table (``_param_names``) as it appears in the state dict."""
        local: TTLocalTable = self.embedding_bags[name]  # type: ignore[assignment]
        return self._entry_value(
            name, local.param_shapes[k], torch.float32, local.local_pieces(k),
            self._is_sharded_core(name, k), keep_vars,
        )

    def _entry_value(
        self, name: str, size: tuple[int, ...], dtype: torch.dtype,
        pieces: list[tuple[Tensor, int]], sharded: bool, keep_vars: bool,
    ) -> Any:
        if sharded:
            return self._sharded_tensor(name, list(size), pieces, keep_vars, dtype)
        ((tensor, _),) = pieces
        return tensor if keep_vars else tensor.detach()

    def _is_sharded_core(self, name: str, k: int) -> bool:
        sharding_type = self.module_sharding_plan[name].sharding_type
        return sharding_type == ShardingType.TABLE_WISE.value or (
            sharding_type == ShardingType.COLUMN_WISE.value and k == 0
        )

    def _state_entries(
        self, name: str
    ) -> list[tuple[str, tuple[int, ...], torch.dtype, list[tuple[Tensor, int]], bool]]:
        """Every state-dict entry of a table, under the unsharded module's names:
        ``(name in the table, global size, dtype, this rank's pieces, sharded)``. The trained
        tensors (cores, hot-row cache slab), the cache buffers (whole where the table is held,
        so table-wise ones are sharded tensors on one rank), the fused optimizer's state."""
        local: TTLocalTable = self.embedding_bags[name]  # type: ignore[assignment]
        table_wise = self.module_sharding_plan[name].sharding_type == ShardingType.TABLE_WISE.value
        entries = [
            (p, tuple(size), torch.float32, local.local_pieces(k), self._is_sharded_core(name, k))
            for k, (p, size) in enumerate(zip(local.param_names, local.param_shapes))
        ]
        if local.cache_rows > 0:
            for b, (size, dtype) in hot_cache.cache_buffer_specs(local.cache_rows).items():
                pieces = [(getattr(local, b), 0)] if local.holds_cache() else []
                entries.append((b, size, dtype, pieces, table_wise))
        fused = self._fused_tables.get(name)
        if fused is not None:
            for k, (p, size) in enumerate(zip(local.param_names, local.param_shapes)):
                for state, shape in fused.cfg.state_shapes(torch.Size(size)).items():
                    entries.append((
                        f"{p}_{state}", tuple(shape), torch.float32, local.state_pieces(k, state),
                        self._is_sharded_state(name, k, state),
                    ))
        return entries

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for cfg in self._embedding_bag_configs:
            for suffix, size, dtype, pieces, sharded in self._state_entries(cfg.name):
                destination[f"{prefix}embedding_bags.{cfg.name}.{suffix}"] = self._entry_value(
                    cfg.name, size, dtype, pieces, sharded, keep_vars
                )

    def _load_from_state_dict(
        self,
        state_dict: Mapping[str, Any],
        prefix: str,
        local_metadata: Any,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        expected = set()
        for cfg in self._embedding_bag_configs:
            for suffix, size, _, pieces, _ in self._state_entries(cfg.name):
                key = f"{prefix}embedding_bags.{cfg.name}.{suffix}"
                expected.add(key)
                if key not in state_dict:
                    missing_keys.append(key)
                    continue
                try:
                    _load_pieces(size, pieces, state_dict[key])
                except (TypeError, ValueError) as e:
                    error_msgs.append(f"{key}: {e}")
        if strict:
            for key in state_dict:
                rest = key[len(prefix) :].split(".") if key.startswith(prefix) else []
                if (
                    len(rest) >= 2
                    and rest[0] == "embedding_bags"
                    and rest[1] in self._shapes
                    and key not in expected
                ):
                    unexpected_keys.append(key)


@torch.no_grad()
def _load_pieces(size: tuple[int, ...], pieces: list[tuple[Tensor, int]], source: Any) -> None:
    """Copies this rank's ``pieces`` (``(tensor, first column)``, all rows) of a tensor of global
    ``size`` from ``source``, a Tensor or a ShardedTensor holding them locally."""
    for tensor, c0 in pieces:
        offsets = [0] * tensor.dim()
        if tensor.dim() == 2:
            offsets[1] = c0
        lengths = list(tensor.shape)
        region = " x ".join(f"[{o}, {o + n})" for o, n in zip(offsets, lengths)) or "the scalar"
        if isinstance(source, ShardedTensor):
            if tuple(source.size()) != size:
                raise ValueError(f"shape {tuple(source.size())} != {size}")
            block = None
            for shard in source.local_shards():
                so, sl = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                if all(a <= o and o + n <= a + m for o, n, a, m in zip(offsets, lengths, so, sl)):
                    index = tuple(slice(o - a, o - a + n) for o, n, a in zip(offsets, lengths, so))
                    block = shard.tensor[index]
                    break
            if block is None:
                raise ValueError(
                    f"{region} is not in this rank's local shards; load sharded checkpoints "
                    "with torch.distributed.checkpoint"
                )
        elif isinstance(source, Tensor):
            if tuple(source.shape) != size:
                raise ValueError(f"shape {tuple(source.shape)} != {size}")
            block = source[tuple(slice(o, o + n) for o, n in zip(offsets, lengths))]
        else:
            raise TypeError(f"expected a Tensor or ShardedTensor, got {type(source).__name__}")
        if block.data_ptr() != tensor.data_ptr() or block.stride() != tensor.stride():
            tensor.copy_(block)  # (a state dict of this module aliases its tensors already)


class TTEmbeddingBagCollectionSharder(ModuleSharder[TTEmbeddingBagCollection]):
    """Shards ``TTEmbeddingBagCollection`` (data_parallel, table_wise, column_wise).

    Pass it to ``DistributedModelParallel`` with a plan from ``torchrec_tt.sharding.plan`` (and add
    ``EmbeddingBagCollectionSharder()`` for plain EBCs: ``sharders=`` replaces the defaults).

    To TorchRec's planner a TT table is a ``[N, D]`` table on meta (its real storage and cost come
    from ``TTShardEstimator``); its only compute kernel is ``customized_kernel``. The default planner
    cannot cost it, so ``sharding_types`` raises outside a TT-aware planner run: that is what
    ``DistributedModelParallel(plan=None)`` hits.

    Fused optimizers: a table's optimizer comes from this sharder's ``fused_params``, the
    module's own ``fused_params`` and ``apply_optimizer_in_backward`` on its cores (in increasing
    precedence; see ``torchrec_tt.sharding.fused``). The sharded module then updates the cores in
    the backward and exposes ``fused_optimizer`` (collected by DMP's ``fused_optimizer``).

    Args:
        fused_params: FBGEMM-style fused optimizer for every TT table, e.g.
            ``{"optimizer": EmbOptimType.ADAM, "learning_rate": 0.01}`` (keys of
            ``torchrec_tt.optim.FusedOptimConfig``; ``lr`` and ``betas`` are accepted too).
        qcomm_codecs_registry: quantised-comms codecs for the pooled all-to-all.
    """

    def __init__(
        self,
        fused_params: Mapping[str, Any] | None = None,
        qcomm_codecs_registry: dict[str, QuantizedCommCodecs] | None = None,
    ) -> None:
        super().__init__(qcomm_codecs_registry=qcomm_codecs_registry)
        self._fused_params = copy.deepcopy(dict(fused_params)) if fused_params is not None else None
        if self._fused_params and "optimizer" in self._fused_params:
            try:  # fail here, not at sharding time, when it cannot work for any table
                FusedOptimConfig.from_fused_params(self._fused_params)
            except ValueError as e:
                raise ValueError(f"TTEmbeddingBagCollectionSharder(fused_params=...): {e}") from None

    @property
    def fused_params(self) -> dict[str, Any] | None:
        """The sharder's ``fused_params`` (as TorchRec's embedding sharders expose them)."""
        return self._fused_params

    def fused_configs(self, module: TTEmbeddingBagCollection) -> dict[str, FusedOptimConfig]:
        """The fused optimizer each table of ``module`` gets when sharded ({} if none)."""
        return resolve_fused_configs(module, self._fused_params)

    def shard(
        self,
        module: TTEmbeddingBagCollection,
        params: EmbeddingModuleShardingPlan,
        env: ShardingEnv,
        device: torch.device | None = None,
        module_fqn: str | None = None,
    ) -> ShardedTTEmbeddingBagCollection:
        return ShardedTTEmbeddingBagCollection(
            module,
            params,
            env,
            device,
            qcomm_codecs_registry=self.qcomm_codecs_registry,
            module_fqn=module_fqn,
            fused_params=self._fused_params,
        )

    def shardable_parameters(self, module: TTEmbeddingBagCollection) -> dict[str, nn.Parameter]:
        return {
            cfg.name: nn.Parameter(
                _logical_table(cfg.num_embeddings, cfg.embedding_dim), requires_grad=False
            )
            for cfg in module.embedding_bag_configs()
        }

    def sharding_types(self, compute_device_type: str) -> list[str]:
        if not _TT_PLANNING.get():
            raise ValueError(_NO_DEFAULT_PLANNER)
        return list(TT_SHARDING_TYPES)

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> list[str]:
        return [EmbeddingComputeKernel.CUSTOMIZED_KERNEL.value]

    @property
    def module_type(self) -> type[TTEmbeddingBagCollection]:
        return TTEmbeddingBagCollection

    @property
    def sharded_module_type(self) -> type[ShardedTTEmbeddingBagCollection]:
        return ShardedTTEmbeddingBagCollection
