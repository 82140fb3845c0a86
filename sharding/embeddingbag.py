"""ShardedTTEmbeddingBagCollection and its sharder.

TorchRec's pooled strategies (``Dp|Tw|CwPooledEmbeddingSharding``) do the feature and embedding
movement: KJT all-to-all in, pooled all-to-all out (with qcomms codecs), awaitables that become a
``KeyedTensor``. Only the lookup is ours (``TTPooledEmbeddingsLookup``).

Sharding types:

* ``data_parallel``: every rank holds the whole TT and looks up its own batch; no all-to-all.
  The lookup sits in its own ``DistributedDataParallel`` (gradients averaged over ranks): if
  DMP's outer DDP owned these cores, the first step's gradients would not be all-reduced.
* ``table_wise``: the whole TT on one rank.
* ``column_wise``: a split of the first column factor ``q_1`` (see ``tt_shards.py``). Each shard
  owns a column slice of ``core_0``; ``core_1 ..`` are replicated on every rank and their
  gradients summed across ranks once per step (one all-reduce over a process group created for
  that purpose when the module is sharded, so every process of the job must shard it, as DMP
  does). This keeps the sharded table exactly the unsharded one (same forward, same
  gradients, same checkpoint) at the price of replicating the later cores: column-wise splits the
  lookup work and the pooled all-to-all, not the storage.

State dict keys are the unsharded module's (``embedding_bags.<table>.core_<k>``): plain tensors
for data-parallel and replicated cores, ``ShardedTensor`` for table-wise cores and for
column-wise ``core_0`` (also when the environment asks for DTensor outputs: DTensor state is not
implemented). All are ``torch.distributed.checkpoint`` compatible, so a checkpoint saved under
one plan or world size loads under another.

Weights are copied from the unsharded module unless it is on the meta device (then each table is
initialised per its config); replicated cores are then broadcast from rank 0 (data-parallel ones
by their DDP) so replicas agree.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
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
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor
from torchrec.sparse.jagged_tensor_validator import validate_keyed_jagged_tensor

from torchrec_tt.modules.embedding_bag import TTEmbeddingBagCollection
from torchrec_tt.shapes import TTShape
from torchrec_tt.sharding.cw_sharding import CwTTPooledEmbeddingSharding
from torchrec_tt.sharding.dp_sharding import DpTTPooledEmbeddingSharding
from torchrec_tt.sharding.lookup import TTLocalTable
from torchrec_tt.sharding.tt_shards import check_column_shards, column_shard_core0_columns
from torchrec_tt.sharding.tw_sharding import TwTTPooledEmbeddingSharding

__all__ = [
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
    ]
):
    """The sharded twin of ``TTEmbeddingBagCollection`` (built by its sharder).

    Input and output follow ``ShardedEmbeddingBagCollection``: a data-parallel KJT in, a lazily
    awaited ``KeyedTensor`` out (keys are the feature names; their order depends on the plan, so
    index by key). Variable batch per feature (VBE) is not supported.

    Args:
        module: the unsharded collection (any device; meta means "initialise here").
        table_name_to_parameter_sharding: one ``ParameterSharding`` per table.
        env: sharding environment.
        device: compute device of this rank.
        qcomm_codecs_registry: quantised-comms codecs for the pooled all-to-all.
        module_fqn: the module's name in the model (trace annotations).
    """

    def __init__(
        self,
        module: TTEmbeddingBagCollection,
        table_name_to_parameter_sharding: Mapping[str, ParameterSharding],
        env: ShardingEnv,
        device: torch.device | None = None,
        qcomm_codecs_registry: dict[str, QuantizedCommCodecs] | None = None,
        module_fqn: str | None = None,
    ) -> None:
        super().__init__(qcomm_codecs_registry=qcomm_codecs_registry)
        if isinstance(env, ShardingEnv2D):
            raise ValueError("TT tables do not support 2D parallelism (ShardingEnv2D)")
        if _has_fused_optimizer(module):
            # The sharded twin would have to run the update after the gradient sums and keep the
            # optimizer state sharded like the cores; until it does, refuse rather than drop it.
            raise ValueError(
                "a TTEmbeddingBagCollection built with fused_params cannot be sharded yet: build "
                "it without fused_params and train the cores with a regular optimizer"
            )
        _validate_plan(module, table_name_to_parameter_sharding, env.world_size)
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
        self._init_weights(module)

        column_wise = [
            t for t in self.embedding_bags.values()  # type: ignore[union-attr]
            if t.sharding_type == ShardingType.COLUMN_WISE.value
        ]
        replicated = [p for t in column_wise for p in t.replicated_cores()]
        replicated_group = None
        if column_wise:
            pg = env.process_group
            if pg is not None and env.world_size > 1:
                replicated_group = dist.new_group(
                    ranks=dist.get_process_group_ranks(pg), backend=dist.get_backend(pg)
                )
                src = dist.get_global_rank(pg, 0)
                with torch.no_grad():
                    for p in replicated:
                        dist.broadcast(p, src=src, group=pg)
            else:
                replicated_group = pg

        infos: dict[str, list[EmbeddingShardingInfo]] = {}
        for cfg in self._embedding_bag_configs:
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
                        embedding_names=list(cfg.feature_names),
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
            if sharding_type == ShardingType.DATA_PARALLEL.value:
                sharding: Any = DpTTPooledEmbeddingSharding(
                    sharding_infos, env, tables, self._is_weighted, self._device
                )
            elif sharding_type == ShardingType.TABLE_WISE.value:
                sharding = TwTTPooledEmbeddingSharding(
                    sharding_infos,
                    env,
                    tables,
                    self._is_weighted,
                    self._device,
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
                    qcomm_codecs_registry=self.qcomm_codecs_registry,
                )
            self._embedding_shardings.append(sharding)

        for sharding_type, sharding in zip(self._sharding_types, self._embedding_shardings):
            lookup: nn.Module = sharding.create_lookup()
            if sharding_type == ShardingType.DATA_PARALLEL.value:
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
        for sharding in self._embedding_shardings:
            self._output_dists.append(sharding.create_output_dist(device=self._device))
            self._embedding_names.extend(sharding.embedding_names())
            self._embedding_dims.extend(sharding.embedding_dims())

        self._feature_splits: list[int] = []
        self._features_order: list[int] = []
        self._has_uninitialized_input_dist = True
        self._has_features_permute = True

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
        return TTLocalTable(
            name,
            self._shapes[name],
            ps.sharding_type,
            local_column_shards=column_shards,
            owns_table=owns,
            device=self._device,
        )

    @torch.no_grad()
    def _init_weights(self, module: TTEmbeddingBagCollection) -> None:
        source = module
        if module.cores()[0].device.type == "meta":
            source = TTEmbeddingBagCollection(
                self._embedding_bag_configs, is_weighted=self._is_weighted, device="cpu"
            )
        for name, local in self.embedding_bags.items():
            table = source.embedding_bags[name]
            local.copy_from_full([c.detach().to(self._device) for c in table.cores()])

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
        expected = [f for cfg in self._embedding_bag_configs for f in cfg.feature_names]
        keys = features.keys()
        unknown = [k for k in keys if k not in expected]
        if unknown:
            raise ValueError(
                f"KeyedJaggedTensor keys {unknown} match no table of this sharded "
                f"TTEmbeddingBagCollection (features: {expected})"
            )
        missing = [f for f in expected if f not in keys]
        if missing:
            raise ValueError(f"KeyedJaggedTensor lacks the features {missing}")
        validate_keyed_jagged_tensor(features)

    def input_dist(
        self, ctx: EmbeddingBagCollectionContext, features: KeyedJaggedTensor
    ) -> Awaitable[Awaitable[KJTList]]:
        if features.variable_stride_per_key():
            raise ValueError(
                "variable batch size per feature (VBE) is not supported by "
                "ShardedTTEmbeddingBagCollection"
            )
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
                        variable_batch_per_feature=False,
                    )
                )
            return KJTListSplitsAwaitable(awaitables, ctx, self._module_fqn, self._sharding_types)

    def compute(self, ctx: EmbeddingBagCollectionContext, dist_input: KJTList) -> list[Tensor]:
        return [lookup(features) for lookup, features in zip(self._lookups, dist_input)]

    def output_dist(
        self, ctx: EmbeddingBagCollectionContext, output: list[Tensor]
    ) -> LazyAwaitable[KeyedTensor]:
        awaitables = [
            dist_(embeddings, sharding_ctx)
            for dist_, sharding_ctx, embeddings in zip(
                self._output_dists, ctx.sharding_contexts, output
            )
        ]
        return EmbeddingBagCollectionAwaitable(
            awaitables=awaitables,
            embedding_dims=self._embedding_dims,
            embedding_names=self._embedding_names,
            module_fqn=self._module_fqn,
            sharding_types=self._sharding_types,
        )

    # --- state dict -------------------------------------------------------------------------

    def _sharded_core(self, name: str, k: int, keep_vars: bool) -> ShardedTensor:
        """Core ``k`` of a table_wise table, or ``core_0`` of a column_wise one, as a ShardedTensor."""
        ps = self.module_sharding_plan[name]
        assert ps.sharding_spec is not None
        shape = self._shapes[name]
        core_shape = list(shape.core_shapes()[k])
        metadata = {}  # first column in the core -> the plan shard's piece of it
        for s in ps.sharding_spec.shards:
            if ps.sharding_type == ShardingType.TABLE_WISE.value:
                start, width = 0, core_shape[1]
            else:
                start, width = column_shard_core0_columns(
                    shape, s.shard_offsets[1], s.shard_sizes[1]
                )
            metadata[start] = ShardMetadata(
                shard_offsets=[0, start], shard_sizes=[core_shape[0], width], placement=s.placement
            )
        local: TTLocalTable = self.embedding_bags[name]  # type: ignore[assignment]
        local_shards = [
            Shard(tensor=tensor if keep_vars else tensor.detach(), metadata=metadata[start])
            for tensor, start in local.local_pieces(k)
        ]
        global_metadata = ShardedTensorMetadata(
            shards_metadata=list(metadata.values()),
            size=torch.Size(core_shape),
            tensor_properties=TensorProperties(dtype=torch.float32),
        )
        return ShardedTensor._init_from_local_shards_and_global_metadata(
            local_shards, global_metadata, process_group=self._env.process_group
        )

    def _is_sharded_core(self, name: str, k: int) -> bool:
        sharding_type = self.module_sharding_plan[name].sharding_type
        return sharding_type == ShardingType.TABLE_WISE.value or (
            sharding_type == ShardingType.COLUMN_WISE.value and k == 0
        )

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for cfg in self._embedding_bag_configs:
            name = cfg.name
            for k in range(self._shapes[name].num_cores):
                key = f"{prefix}embedding_bags.{name}.core_{k}"
                if self._is_sharded_core(name, k):
                    destination[key] = self._sharded_core(name, k, keep_vars)
                else:
                    local: TTLocalTable = self.embedding_bags[name]  # type: ignore[assignment]
                    ((core, _),) = local.local_pieces(k)
                    destination[key] = core if keep_vars else core.detach()

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
            name = cfg.name
            for k in range(self._shapes[name].num_cores):
                key = f"{prefix}embedding_bags.{name}.core_{k}"
                expected.add(key)
                if key not in state_dict:
                    missing_keys.append(key)
                    continue
                try:
                    self._load_core(name, k, state_dict[key])
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
    def _load_core(self, name: str, k: int, source: Any) -> None:
        core_shape = tuple(self._shapes[name].core_shapes()[k])
        local: TTLocalTable = self.embedding_bags[name]  # type: ignore[assignment]
        for tensor, c0 in local.local_pieces(k):
            r0, (h, w) = 0, tensor.shape
            if isinstance(source, ShardedTensor):
                if tuple(source.size()) != core_shape:
                    raise ValueError(f"shape {tuple(source.size())} != {core_shape}")
                block = None
                for shard in source.local_shards():
                    (sr, sc), (sh, sw) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                    if sr <= r0 and sc <= c0 and r0 + h <= sr + sh and c0 + w <= sc + sw:
                        block = shard.tensor[r0 - sr : r0 - sr + h, c0 - sc : c0 - sc + w]
                        break
                if block is None:
                    raise ValueError(
                        f"rows [{r0}, {r0 + h}) x columns [{c0}, {c0 + w}) are not in this rank's "
                        "local shards; load sharded checkpoints with torch.distributed.checkpoint"
                    )
            elif isinstance(source, Tensor):
                if tuple(source.shape) != core_shape:
                    raise ValueError(f"shape {tuple(source.shape)} != {core_shape}")
                block = source[r0 : r0 + h, c0 : c0 + w]
            else:
                raise TypeError(f"expected a Tensor or ShardedTensor, got {type(source).__name__}")
            if block.data_ptr() != tensor.data_ptr() or block.stride() != tensor.stride():
                tensor.copy_(block)  # (a state dict of this module aliases the cores already)


class TTEmbeddingBagCollectionSharder(ModuleSharder[TTEmbeddingBagCollection]):
    """Shards ``TTEmbeddingBagCollection`` (data_parallel, table_wise, column_wise).

    Pass it to ``DistributedModelParallel`` with a plan from ``torchrec_tt.sharding.plan`` (and add
    ``EmbeddingBagCollectionSharder()`` for plain EBCs: ``sharders=`` replaces the defaults).

    To TorchRec's planner a TT table is a ``[N, D]`` table on meta (its real storage and cost come
    from ``TTShardEstimator``); its only compute kernel is ``customized_kernel``. The default planner
    cannot cost it, so ``sharding_types`` raises outside a TT-aware planner run: that is what
    ``DistributedModelParallel(plan=None)`` hits.

    Args:
        qcomm_codecs_registry: quantised-comms codecs for the pooled all-to-all.
    """

    def __init__(self, qcomm_codecs_registry: dict[str, QuantizedCommCodecs] | None = None) -> None:
        super().__init__(qcomm_codecs_registry=qcomm_codecs_registry)

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
