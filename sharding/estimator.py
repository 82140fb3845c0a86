"""TTShardEstimator: storage and cost of TT sharding options for TorchRec's planner.

The formulas are module-level functions of plain numbers (unit-tested against hand counts); the
estimator only gathers their inputs from a ``ShardingOption`` and delegates every non-TT option
to TorchRec's own estimators.

Model, per shard (times in ms, as TorchRec's ``Perf``; bandwidths in bytes/ms from the
topology; ``L`` = lookups per step the shard serves, ``W`` = world size):

* storage = cores x (1 parameter + 1 dense gradient) + optimizer state + the step's input ids
  (and weights) + pooled outputs. A column shard holds its slice of ``core_0`` plus the shared
  later cores. The optimizer state is the table's fused optimizer's when it has one (as the
  sharder resolves it: 0 for EXACT_SGD, the cores' size for EXACT_ADAGRAD, one value per core
  row for EXACT_ROWWISE_ADAGRAD, twice the cores for ADAM; ``tt_optimizer_state_bytes``), else
  ``optimizer_multiplier`` x the cores (the user's dense optimizer is unknown; 2 = Adam).
  A table with a hot-row cache (``tt_cache_rows = K``; data_parallel and table_wise) adds
  ``tt_cache_storage_bytes``: the ``K x D`` slab and its dense gradient, the slab's optimizer
  state (the same rule as for a core) and the cache's id map and counters.
* compute (compute-bound): ``L x FLOPs per lookup / device FLOP rate``; backward uses
  ``TTShape.backward_flops_per_lookup``. The rate is a constructor argument; ``measure_tt_flops``
  measures the TT kernel's effective rate on a device.
* comms: table_wise / column_wise pay the KJT all-to-all and the pooled all-to-all in
  ``fwd_comms`` (TorchRec keeps the KJT part in ``input_dist_comms``, which ``Perf.total``
  leaves out; the TT model counts it) and the pooled all-to-all again in ``bwd_comms``;
  column_wise adds the all-reduce of the shared cores' gradients; data_parallel pays only the
  all-reduce of its core gradients (ring: ``2 (W-1)/W`` of the bytes), plus, with a hot-row
  cache, the slab's gradient in that all-reduce and the all-gather of the step's ids (every
  replica counts every rank's ids) at the all-to-all bandwidth. Bandwidths come from the
  topology (TorchRec's model: all-reduce at the inter-host bandwidth); latency is not modelled.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torchrec.distributed.planner.shard_estimators import (
    EmbeddingPerfEstimator,
    EmbeddingStorageEstimator,
    get_num_poolings,
)
from torchrec.distributed.planner.utils import sharder_name
from torchrec.distributed.planner.types import (
    CollectiveType,
    ParameterConstraints,
    Perf,
    ShardEstimator,
    ShardingOption,
    Storage,
    Topology,
)
from torchrec.distributed.types import ModuleSharder, ShardingType

from fbgemm_gpu.split_embedding_configs import EmbOptimType

from torchrec_tt.kernel_shapes import TWO_FACTOR_FLOPS, kernel_cost
from torchrec_tt.modules.embedding_bag import TTEmbeddingBagCollection
from torchrec_tt.modules.hot_cache import cache_buffer_specs
from torchrec_tt.ops import PoolingMode, TTBatchLayout, tt_embedding_bag
from torchrec_tt.optim import FusedOptimConfig
from torchrec_tt.shapes import TTShape, make_tt_shape
from torchrec_tt.sharding.embeddingbag import TTEmbeddingBagCollectionSharder
from torchrec_tt.sharding.fused import resolve_fused_configs, tt_optimizer_state_bytes
from torchrec_tt.sharding.tt_shards import column_shard_shape

__all__ = [
    "DEFAULT_OPTIMIZER_MULTIPLIER",
    "DEFAULT_TT_FLOPS",
    "TTShardEstimator",
    "all_reduce_ms",
    "all_to_all_ms",
    "measure_tt_flops",
    "tt_cache_storage_bytes",
    "tt_compute_ms",
    "tt_shard_io_bytes",
    "tt_shard_perf",
    "tt_shard_storage_bytes",
]

#: Effective FLOP/s of the TT lookup per compute device, used when none is given: rough values
#: (the CPU one measured with ``measure_tt_flops`` on a 2-core CI machine). On CUDA, when no rate
#: is given, each shape is costed at the measured rate of the kernels that run it
#: (``torchrec_tt.kernel_shapes.KernelCost.flops_per_second``, H200; docs/benchmarks.md "v4" gives
#: estimate / measured per case); the "cuda" entry is the two-factor rate. Measure and pass
#: ``device_flops`` for real planning.
DEFAULT_TT_FLOPS: dict[str, float] = {"cpu": 5e9, "cuda": TWO_FACTOR_FLOPS, "mtia": TWO_FACTOR_FLOPS}

#: Optimizer state per core element assumed for TT tables without a fused optimizer (Adam).
DEFAULT_OPTIMIZER_MULTIPLIER = 2.0

_INDEX_BYTES = 8  # TorchRec's planner assumes int64 ids (BIGINT_DTYPE)
_WEIGHT_BYTES = 4
_MS_PER_S = 1000.0


# --- pure cost functions ----------------------------------------------------------------------


def _is_model_parallel(sharding_type: str) -> bool:
    if sharding_type == ShardingType.DATA_PARALLEL.value:
        return False
    if sharding_type in (ShardingType.TABLE_WISE.value, ShardingType.COLUMN_WISE.value):
        return True
    raise ValueError(f"TT tables do not support sharding type {sharding_type!r}")


def tt_shard_io_bytes(
    sharding_type: str,
    batch_inputs: float,
    batch_outputs: float,
    world_size: int,
    shard_dim: int,
    is_weighted: bool = False,
    index_bytes: int = _INDEX_BYTES,
    output_element_size: int = 4,
) -> tuple[int, int]:
    """``(input, output)`` bytes a shard holds per step.

    ``batch_inputs`` = ids per rank per step (sum over features of batch x pooling factor x
    poolings); ``batch_outputs`` = pooled rows per rank per step. A model-parallel shard serves
    all ``world_size`` ranks' batches; a data-parallel one only its own.
    """
    scale = world_size if _is_model_parallel(sharding_type) else 1
    per_id = index_bytes + (_WEIGHT_BYTES if is_weighted else 0)
    return (
        math.ceil(batch_inputs * scale * per_id),
        math.ceil(batch_outputs * scale * shard_dim * output_element_size),
    )


def tt_shard_storage_bytes(
    core_bytes: int,
    optimizer_multiplier: float,
    input_bytes: int,
    output_bytes: int,
    optimizer_state_bytes: int | None = None,
) -> int:
    """Cores + their dense gradients + optimizer state + the step's IO buffers.

    The optimizer state is ``optimizer_state_bytes`` when given (a fused optimizer's exact
    state), else ``optimizer_multiplier`` x the cores.
    """
    if optimizer_state_bytes is None:
        return math.ceil(core_bytes * (2 + optimizer_multiplier)) + input_bytes + output_bytes
    return 2 * core_bytes + optimizer_state_bytes + input_bytes + output_bytes


def tt_cache_storage_bytes(
    cache_rows: int,
    embedding_dim: int,
    optimizer: EmbOptimType | None = None,
    optimizer_multiplier: float = DEFAULT_OPTIMIZER_MULTIPLIER,
    element_size: int = 4,
) -> int:
    """Bytes a hot-row cache of ``cache_rows`` rows adds where its table is held: the slab and
    its dense gradient (``2 K D``), the slab's optimizer state (a fused ``optimizer``'s exact
    state of a ``[K, D]`` tensor, else ``optimizer_multiplier`` x the slab) and the buffers of
    ``hot_cache`` (id map ``3 K`` int64, candidates ``2 K`` int64 + ``2 K`` float32, a step)."""
    if cache_rows == 0:
        return 0
    slab = cache_rows * embedding_dim * element_size
    if optimizer is None:
        state = math.ceil(slab * optimizer_multiplier)
    else:
        shapes = FusedOptimConfig(optimizer=optimizer).state_shapes(
            torch.Size([cache_rows, embedding_dim])
        )
        state = sum(math.prod(shape) for shape in shapes.values()) * element_size
    buffers = sum(
        math.prod(shape) * dtype.itemsize for shape, dtype in cache_buffer_specs(cache_rows).values()
    )
    return 2 * slab + state + buffers


def tt_compute_ms(num_lookups: float, flops_per_lookup: int, device_flops: float) -> float:
    """Compute-bound time of ``num_lookups`` row reconstructions."""
    return num_lookups * flops_per_lookup / device_flops * _MS_PER_S


def all_to_all_ms(num_bytes: float, bandwidth: float) -> float:
    """Time to move ``num_bytes`` through an all-to-all at ``bandwidth`` bytes/ms."""
    return num_bytes / bandwidth


def all_reduce_ms(num_bytes: float, world_size: int, bandwidth: float) -> float:
    """Ring all-reduce of ``num_bytes``: each rank sends ``2 (W-1)/W`` of them."""
    if world_size <= 1:
        return 0.0
    return 2 * (world_size - 1) / world_size * num_bytes / bandwidth


def tt_shard_perf(
    shard_shape: TTShape,
    sharding_type: str,
    batch_inputs: float,
    batch_outputs: float,
    world_size: int,
    device_flops: float | None,
    all_to_all_bandwidth: float,
    all_reduce_bandwidth: float,
    replicated_bytes: int = 0,
    is_weighted: bool = False,
    index_bytes: int = _INDEX_BYTES,
    output_element_size: int = 4,
    compute_device: str = "cpu",
    cache_rows: int = 0,
) -> Perf:
    """Per-step cost of one TT shard (``shard_shape`` is the shard's own TT: for a column shard,
    ``q_1`` reduced). ``replicated_bytes``: column_wise only, the shared cores whose gradients
    are all-reduced. On CUDA the FLOPs are those of the kernels that run the shape (the
    two-factor kernels do ``2DR`` forward whatever the core count: ``kernel_cost``), and a
    ``device_flops`` of None means those kernels' fitted cost model (``KernelCost``).
    ``cache_rows``: the table's hot-row cache (data_parallel: its slab joins the gradient
    all-reduce and the step's ids are all-gathered; the compute is not reduced for cache hits,
    whose rate is unknown here)."""
    model_parallel = _is_model_parallel(sharding_type)
    scale = world_size if model_parallel else 1
    lookups = batch_inputs * scale
    if compute_device == "cuda":
        cost = kernel_cost(shard_shape)
        fwd_flops, bwd_flops = cost.forward_flops, cost.backward_flops
    else:
        fwd_flops, bwd_flops = shard_shape.forward_flops_per_lookup(), shard_shape.backward_flops_per_lookup()
    if compute_device == "cuda" and device_flops is None:
        # The kernels' fitted cost model: per-lookup, per-FLOP and per-call (sort, update) terms.
        fwd_compute = cost.forward_seconds(lookups) * _MS_PER_S
        bwd_compute = cost.backward_seconds(lookups) * _MS_PER_S
    elif device_flops is None:
        raise ValueError(f"device_flops is needed on compute device {compute_device!r}")
    else:
        fwd_compute = tt_compute_ms(lookups, fwd_flops, device_flops)
        bwd_compute = tt_compute_ms(lookups, bwd_flops, device_flops)
    if not model_parallel:
        slab_bytes = cache_rows * shard_shape.embedding_dim * 4
        gathered = (world_size - 1) * batch_inputs * index_bytes if cache_rows else 0.0
        return Perf(
            fwd_compute=fwd_compute,
            fwd_comms=all_to_all_ms(gathered, all_to_all_bandwidth),
            bwd_compute=bwd_compute,
            bwd_comms=all_reduce_ms(
                shard_shape.num_bytes(4) + slab_bytes, world_size, all_reduce_bandwidth
            ),
        )
    input_bytes, output_bytes = tt_shard_io_bytes(
        sharding_type,
        batch_inputs,
        batch_outputs,
        world_size,
        shard_shape.embedding_dim,
        is_weighted,
        index_bytes,
        output_element_size,
    )
    pooled = all_to_all_ms(output_bytes, all_to_all_bandwidth)
    return Perf(
        fwd_compute=fwd_compute,
        fwd_comms=all_to_all_ms(input_bytes, all_to_all_bandwidth) + pooled,
        bwd_compute=bwd_compute,
        bwd_comms=pooled + all_reduce_ms(replicated_bytes, world_size, all_reduce_bandwidth),
    )


# --- the estimator --------------------------------------------------------------------------


class TTShardEstimator(ShardEstimator):
    """Sets ``storage`` and ``perf`` of TT sharding options; delegates the rest to TorchRec.

    Args:
        topology: device topology (compute device, world size, comms bandwidths).
        constraints: TorchRec parameter constraints keyed by table name (pooling factors,
            num poolings, batch sizes).
        device_flops: effective FLOP/s of the TT lookup; ``DEFAULT_TT_FLOPS`` per device when
            None (see ``measure_tt_flops``).
        optimizer_multiplier: optimizer state per core element (2: Adam, 1: Adagrad, 0: SGD)
            for every TT table when given; when None, a table with a fused optimizer (from
            the module, the TT sharder's ``fused_params`` or ``apply_optimizer_in_backward``)
            counts that optimizer's exact state and others ``DEFAULT_OPTIMIZER_MULTIPLIER``.
        delegates: estimators for non-TT options; TorchRec's perf and storage estimators when
            None.
    """

    def __init__(
        self,
        topology: Topology,
        constraints: dict[str, ParameterConstraints] | None = None,
        device_flops: float | None = None,
        optimizer_multiplier: float | None = None,
        delegates: Sequence[ShardEstimator] | None = None,
    ) -> None:
        self._topology = topology
        self._constraints = constraints
        # On CUDA without a given rate, each shape gets its kernels' measured rate (see tt_shard_perf).
        self._kernel_rates = device_flops is None and topology.compute_device == "cuda"
        if device_flops is None:
            device_flops = DEFAULT_TT_FLOPS.get(topology.compute_device, DEFAULT_TT_FLOPS["cuda"])
        if device_flops <= 0:
            raise ValueError(f"device_flops must be positive, got {device_flops}")
        self._device_flops = float(device_flops)
        self._optimizer_multiplier = optimizer_multiplier
        self._delegates = (
            list(delegates)
            if delegates is not None
            else [
                EmbeddingPerfEstimator(topology=topology, constraints=constraints),
                EmbeddingStorageEstimator(topology=topology, constraints=constraints),
            ]
        )

    @property
    def device_flops(self) -> float:
        return self._device_flops

    def estimate(
        self,
        sharding_options: list[ShardingOption],
        sharder_map: dict[str, ModuleSharder[nn.Module]] | None = None,
        **kwargs: Any,
    ) -> None:
        tt_options = [so for so in sharding_options if self.is_tt_option(so)]
        others = [so for so in sharding_options if not self.is_tt_option(so)]
        if others:
            for delegate in self._delegates:
                delegate.estimate(others, sharder_map, **kwargs)
        for so in tt_options:
            self._estimate_tt(so, self._fused_config(so, sharder_map))

    @staticmethod
    def is_tt_option(sharding_option: ShardingOption) -> bool:
        return isinstance(sharding_option.module[1], TTEmbeddingBagCollection)

    def _batch_inputs_outputs(self, so: ShardingOption) -> tuple[float, float]:
        constraint = self._constraints.get(so.name) if self._constraints else None
        num_poolings = get_num_poolings(self._constraints, so)
        batch_sizes = (
            list(constraint.batch_sizes)
            if constraint is not None and constraint.batch_sizes
            else [so.batch_size] * so.num_inputs
        )
        if not len(so.input_lengths) == len(num_poolings) == len(batch_sizes):
            raise ValueError(
                f"TT table {so.name!r}: pooling_factors, num_poolings and batch_sizes constraints "
                "must have one entry per input"
            )
        batch_inputs = sum(
            length * pools * batch
            for length, pools, batch in zip(so.input_lengths, num_poolings, batch_sizes)
        )
        batch_outputs = sum(pools * batch for pools, batch in zip(num_poolings, batch_sizes))
        return batch_inputs, batch_outputs

    @staticmethod
    def _fused_config(
        so: ShardingOption, sharder_map: Mapping[str, Any] | None
    ) -> FusedOptimConfig | None:
        """The table's fused optimizer as its sharder will resolve it (None if it has none)."""
        module: TTEmbeddingBagCollection = so.module[1]  # type: ignore[assignment]
        sharder = (sharder_map or {}).get(sharder_name(type(module)))
        sharder = getattr(sharder, "sharder", sharder)  # newer TorchRec passes SharderData
        if isinstance(sharder, TTEmbeddingBagCollectionSharder):
            configs = sharder.fused_configs(module)
        else:
            configs = resolve_fused_configs(module)
        return configs.get(so.name)

    def _estimate_tt(self, so: ShardingOption, fused: FusedOptimConfig | None = None) -> None:
        module: TTEmbeddingBagCollection = so.module[1]  # type: ignore[assignment]
        shape = module.tt_shapes()[so.name]
        weighted = module.is_weighted()
        world_size = self._topology.world_size
        batch_inputs, batch_outputs = self._batch_inputs_outputs(so)
        bandwidths = self._topology.comms_bandwidths
        a2a_bw = bandwidths.get_bw(
            local_world_size=self._topology.local_world_size,
            world_size=world_size,
            collective_type=CollectiveType.ALL_TO_ALL,
        )
        ar_bw = bandwidths.get_bw(
            local_world_size=self._topology.local_world_size,
            world_size=world_size,
            collective_type=CollectiveType.ALL_REDUCE,
        )
        on_hbm = self._topology.compute_device in ("cuda", "mtia")
        cfg = next(c for c in module.embedding_bag_configs() if c.name == so.name)
        cache_rows = cfg.tt_cache_rows
        replicated = 0
        if so.sharding_type == ShardingType.COLUMN_WISE.value:
            replicated = shape.num_bytes(4) - shape.core_shapes()[0][0] * shape.core_shapes()[0][1] * 4
        for shard in so.shards:
            if so.sharding_type == ShardingType.COLUMN_WISE.value:
                shard_shape = column_shard_shape(shape, shard.offset[1], shard.size[1])
            else:
                shard_shape = shape
            input_bytes, output_bytes = tt_shard_io_bytes(
                so.sharding_type,
                batch_inputs,
                batch_outputs,
                world_size,
                shard_shape.embedding_dim,
                weighted,
            )
            state_bytes = None
            multiplier = self._optimizer_multiplier
            if multiplier is None:
                if fused is not None:
                    state_bytes = tt_optimizer_state_bytes(shard_shape, fused.optimizer)
                multiplier = DEFAULT_OPTIMIZER_MULTIPLIER
            total = tt_shard_storage_bytes(
                shard_shape.num_bytes(4), multiplier, input_bytes, output_bytes, state_bytes
            )
            total += tt_cache_storage_bytes(
                cache_rows,
                shard_shape.embedding_dim,
                fused.optimizer if fused is not None and self._optimizer_multiplier is None else None,
                multiplier,
            )
            shard.storage = Storage(hbm=total if on_hbm else 0, ddr=0 if on_hbm else total)
            shard.perf = tt_shard_perf(
                shard_shape,
                so.sharding_type,
                batch_inputs,
                batch_outputs,
                world_size,
                None if self._kernel_rates else self._device_flops,
                a2a_bw,
                ar_bw,
                replicated_bytes=replicated,
                is_weighted=weighted,
                compute_device=self._topology.compute_device,
                cache_rows=cache_rows,
            )


# --- measuring the FLOP rate ----------------------------------------------------------------


def measure_tt_flops(
    device: torch.device | str = "cpu",
    num_rows: int = 1_000_000,
    embedding_dim: int = 64,
    tt_rank: int = 32,
    batch_size: int = 512,
    pooling_factor: int = 16,
    repeats: int = 5,
    seed: int = 0,
) -> float:
    """Effective forward FLOP/s of ``tt_embedding_bag`` on ``device`` for one representative table.

    Counts ``TTShape.forward_flops_per_lookup`` per id (no deduplication credit) over random ids
    and divides by the median wall time of ``repeats`` calls (after one warm-up): the rate that
    makes ``TTShardEstimator``'s compute model match this kernel on this device.
    """
    device = torch.device(device)
    shape = make_tt_shape(num_rows, embedding_dim, [tt_rank, tt_rank])
    gen = torch.Generator().manual_seed(seed)
    cores = [
        torch.randn(rows, cols, generator=gen).to(device) for rows, cols in shape.core_shapes()
    ]
    layout = TTBatchLayout.from_shapes(["t"], [shape], [PoolingMode.SUM], [0])
    indices = torch.randint(0, num_rows, (batch_size * pooling_factor,), generator=gen).to(device)
    offsets = torch.arange(0, batch_size * pooling_factor + 1, pooling_factor).to(device)

    def run() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.no_grad():
            tt_embedding_bag(cores, layout, indices, offsets)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    run()
    seconds = statistics.median(run() for _ in range(repeats))
    return indices.numel() * shape.forward_flops_per_lookup() / seconds
