"""Communication accounting: the bytes a sharding plan moves per training step.

``plan_comms_bytes`` computes them from the plan; ``CommsMeter`` measures them by hooking the
collectives (``torch.distributed.all_to_all_single`` and ``all_reduce``, which TorchRec's dists
and the TT column-wise gradient sum call, and a DDP communication hook for DDP's bucketed
all-reduce), so one can check the other.

Conventions (per rank, per step = one forward + backward):

* all-to-all bytes: what the rank sends to *other* ranks (its own chunk never leaves it),
  forward and backward. TorchRec's KJT all-to-all sends, per sharding group, a splits tensor
  (int64: one per KJT tensor plus the stride), the lengths, the ids and (if weighted) the
  weights; the pooled all-to-all sends pooled embeddings forward and their gradients backward.
* all-reduce bytes: the size of the buffers all-reduced (what a rank contributes; a ring moves
  ``2 (W-1)/W`` of it each way): DDP buckets of data-parallel tables and dense parameters, and
  the gradient sum of shared TT cores of column-wise tables.

Only data_parallel, table_wise and column_wise (and table_column_wise on one host) are covered.
A fused optimizer on TT tables moves the same bytes (data-parallel gradients are then averaged
by one all-reduce in the lookup's backward instead of DDP's buckets), except row-wise Adagrad on
column-wise tables, which adds one float per row of ``core_0`` to the shared cores' all-reduce
(not counted here). Data-parallel TT tables with a hot-row cache all-reduce their slab with their
cores (counted) and all-gather the step's ids so that every replica counts them (two
``all_gather`` calls per step: not counted here, nor hooked by ``CommsMeter``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel
from torchrec.distributed.embedding_types import ShardedEmbeddingModule
from torchrec.distributed.types import ShardingPlan, ShardingType
from torchrec.modules.embedding_configs import DATA_TYPE_NUM_BITS
from torchrec.modules.embedding_modules import EmbeddingBagCollectionInterface

from torchrec_tt.modules.embedding_bag import TTEmbeddingBagCollection

__all__ = ["CommsMeter", "StepComms", "plan_comms_bytes"]

_SPLITS_ELEMENT_SIZE = 8  # TorchRec builds the KJT splits tensor from Python ints (int64)
_WEIGHT_ELEMENT_SIZE = 4
_COLUMN_TYPES = (ShardingType.COLUMN_WISE.value, ShardingType.TABLE_COLUMN_WISE.value)


@dataclass(frozen=True)
class StepComms:
    """Bytes per rank for one training step (see the module docstring for what counts)."""

    all_to_all: tuple[int, ...]
    all_reduce: tuple[int, ...]

    @property
    def total_all_to_all(self) -> int:
        return sum(self.all_to_all)

    @property
    def total_all_reduce(self) -> int:
        return sum(self.all_reduce)


def _table_bytes(module: nn.Module, name: str, num_rows: int, dim: int, data_type: Any) -> int:
    """Bytes of a data-parallel table's gradient: a TT table's cores and hot-row cache slab."""
    if isinstance(module, TTEmbeddingBagCollection):
        cfg = next(c for c in module.embedding_bag_configs() if c.name == name)
        return module.tt_shapes()[name].num_bytes(4) + cfg.tt_cache_rows * dim * 4
    return num_rows * dim * DATA_TYPE_NUM_BITS[data_type] // 8


def _shared_core_bytes(module: nn.Module, name: str) -> int:
    """Bytes of the cores a column-wise TT table replicates (``core_1 ..``); 0 for plain tables."""
    if not isinstance(module, TTEmbeddingBagCollection):
        return 0
    shape = module.tt_shapes()[name]
    rows, cols = shape.core_shapes()[0]
    return shape.num_bytes(4) - rows * cols * 4


def plan_comms_bytes(
    model: nn.Module,
    plan: ShardingPlan,
    batch_size: int,
    lookups_per_sample: Mapping[str, float],
    world_size: int,
    *,
    index_element_size: int = 8,
    length_element_size: int = 8,
    embedding_element_size: int = 4,
    include_dense: bool = True,
) -> StepComms:
    """Per-rank all-to-all and all-reduce bytes of one step of ``model`` under ``plan``.

    Args:
        model: the unsharded model the plan was made for.
        plan: its ``ShardingPlan``.
        batch_size: per-rank batch size.
        lookups_per_sample: ids per sample of every feature (the pooling factor; exact when
            every bag of that feature has that length).
        world_size: number of ranks.
        index_element_size / length_element_size: bytes of a KJT id / length (int64: 8).
        embedding_element_size: bytes of a pooled embedding element on the wire (fp32: 4).
        include_dense: count the DDP all-reduce of parameters outside the sharded modules.
    """
    a2a = [0.0] * world_size
    all_reduce = [0.0] * world_size
    batch = batch_size
    for path, module_plan in plan.plan.items():
        module = model.get_submodule(path)
        if not isinstance(module, EmbeddingBagCollectionInterface):
            raise ValueError(f"{path!r} is a {type(module).__name__}, not an embedding bag collection")
        weighted = module.is_weighted()
        groups: dict[str, list[tuple[Any, Any]]] = {}
        for cfg in module.embedding_bag_configs():
            ps = module_plan[cfg.name]  # type: ignore[index]
            groups.setdefault(ps.sharding_type, []).append((cfg, ps))
        for sharding_type, tables in groups.items():
            if sharding_type == ShardingType.DATA_PARALLEL.value:
                size = sum(
                    _table_bytes(module, c.name, c.num_embeddings, c.embedding_dim, c.data_type)
                    for c, _ in tables
                )
                all_reduce = [x + size for x in all_reduce]
                continue
            if sharding_type not in (ShardingType.TABLE_WISE.value, *_COLUMN_TYPES):
                raise ValueError(f"comms accounting does not cover sharding type {sharding_type!r}")
            features_on = [0] * world_size
            ids_on = [0.0] * world_size
            dims_on = [0] * world_size
            for cfg, ps in tables:
                shards = ps.sharding_spec.shards
                for shard, rank in zip(shards, ps.ranks):
                    features_on[rank] += len(cfg.feature_names)
                    ids_on[rank] += sum(lookups_per_sample[f] for f in cfg.feature_names)
                    dims_on[rank] += shard.shard_sizes[1] * len(cfg.feature_names)
                if sharding_type in _COLUMN_TYPES:
                    shared = _shared_core_bytes(module, cfg.name)
                    all_reduce = [x + shared for x in all_reduce]
            num_tensors = 2 + (1 if weighted else 0)  # lengths, values (, weights)
            per_id = index_element_size + (_WEIGHT_ELEMENT_SIZE if weighted else 0)
            for src in range(world_size):
                for dst in range(world_size):
                    if dst == src:
                        continue
                    a2a[src] += (num_tensors + 1) * _SPLITS_ELEMENT_SIZE
                    a2a[src] += batch * features_on[dst] * length_element_size
                    a2a[src] += batch * ids_on[dst] * per_id
                    a2a[src] += batch * dims_on[src] * embedding_element_size  # forward
                    a2a[src] += batch * dims_on[dst] * embedding_element_size  # backward
    if include_dense:
        sharded = tuple(plan.plan)
        dense = sum(
            p.numel() * p.element_size()
            for name, p in model.named_parameters()
            if p.requires_grad and not any(name.startswith(f"{m}.") for m in sharded)
        )
        if dense and world_size > 1:
            all_reduce = [x + dense for x in all_reduce]
    if world_size == 1:
        all_reduce = [0.0]
    return StepComms(tuple(round(x) for x in a2a), tuple(round(x) for x in all_reduce))


class CommsMeter:
    """Measures the bytes this rank's collectives move (same conventions as ``plan_comms_bytes``).

    Inside ``with meter:`` it wraps ``torch.distributed.all_to_all_single`` and ``all_reduce``.
    DDP all-reduces its buckets in C++, so ``attach(model)`` first gives every
    ``DistributedDataParallel`` in the model (DMP's outer DDP and the data-parallel lookups inside
    sharded modules) PyTorch's reference ``allreduce_hook``, which calls the Python
    ``all_reduce``; call it once, before the first backward (DDP accepts one hook)::

        meter = CommsMeter()
        meter.attach(dmp)
        with meter:
            loss = dmp(batch); loss.backward()
        meter.all_to_all_bytes, meter.all_reduce_bytes
    """

    def __init__(self) -> None:
        self.all_to_all_bytes = 0
        self.all_reduce_bytes = 0
        #: all-to-all bytes by wire dtype: the KJT all-to-all sends int64 (lengths, ids, splits),
        #: the pooled one float32 or a qcomms codec's dtype (float16, uint8 ...).
        self.all_to_all_bytes_by_dtype: dict[torch.dtype, int] = {}
        self._saved: dict[str, Any] = {}

    def reset(self) -> None:
        self.all_to_all_bytes = 0
        self.all_reduce_bytes = 0
        self.all_to_all_bytes_by_dtype = {}

    def attach(self, model: nn.Module) -> None:
        for ddp in _ddp_modules(model):
            # PyTorch's reference hook: same result as DDP's built-in all-reduce, but issued
            # through torch.distributed.all_reduce, which the meter wraps.
            ddp.register_comm_hook(state=ddp.process_group, hook=allreduce_hook)

    def __enter__(self) -> CommsMeter:
        self._saved = {
            "all_to_all_single": dist.all_to_all_single,
            "all_reduce": dist.all_reduce,
        }
        original_a2a = self._saved["all_to_all_single"]
        original_ar = self._saved["all_reduce"]

        def all_to_all_single(output: Tensor, input: Tensor, output_split_sizes: Any = None,
                              input_split_sizes: Any = None, group: Any = None,
                              async_op: bool = False) -> Any:
            sent = _sent_to_others(input, input_split_sizes, group)
            self.all_to_all_bytes += sent
            by = self.all_to_all_bytes_by_dtype
            by[input.dtype] = by.get(input.dtype, 0) + sent
            return original_a2a(output, input, output_split_sizes, input_split_sizes, group, async_op)

        def all_reduce(tensor: Tensor, op: Any = dist.ReduceOp.SUM, group: Any = None,
                       async_op: bool = False) -> Any:
            self.all_reduce_bytes += tensor.numel() * tensor.element_size()
            return original_ar(tensor, op, group, async_op)

        dist.all_to_all_single = all_to_all_single  # type: ignore[assignment]
        dist.all_reduce = all_reduce  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: Any) -> None:
        dist.all_to_all_single = self._saved["all_to_all_single"]  # type: ignore[assignment]
        dist.all_reduce = self._saved["all_reduce"]  # type: ignore[assignment]


def _sent_to_others(input: Tensor, input_split_sizes: Any, group: Any) -> int:
    world_size = dist.get_world_size(group)
    rank = dist.get_rank(group)
    rows = input.shape[0] if input.dim() else 1
    row_bytes = (input.numel() // rows if rows else 0) * input.element_size()
    splits = list(input_split_sizes) if input_split_sizes else [rows // world_size] * world_size
    return (sum(splits) - splits[rank]) * row_bytes


def _ddp_modules(model: nn.Module) -> Iterator[DistributedDataParallel]:
    seen: set[int] = set()
    for module in model.modules():
        candidates = [module]
        if isinstance(module, ShardedEmbeddingModule):
            candidates.extend(module._lookups)
        for candidate in candidates:
            if isinstance(candidate, DistributedDataParallel) and id(candidate) not in seen:
                seen.add(id(candidate))
                yield candidate
