"""Local TT cores of a sharded collection and the lookup module that reads them.

``TTLocalTable`` holds what one rank keeps of one TT table; ``TTPooledEmbeddingsLookup`` looks up
all local tables (or column shards) of one sharding type with a single ``tt_embedding_bag`` call.
TorchRec's ``GroupedPooledEmbeddingsLookup`` raises on ``customized_kernel``; this is its TT twin.
"""

from __future__ import annotations

import os

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchrec.distributed.embedding_types import BaseEmbeddingLookup, GroupedEmbeddingConfig
from torchrec.distributed.types import ShardingType
from torchrec.modules.embedding_configs import PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_tt.modules import hot_cache
from torchrec_tt.modules.embedding_bag import padded_vbe_offsets
from torchrec_tt.ops import PoolingMode, TTBatchLayout, TTKernelOptions, tt_embedding_bag
from torchrec_tt.shapes import TTShape
from torchrec_tt.sharding.tt_shards import column_shard_core0_columns, column_shard_shape

__all__ = ["TTLocalTable", "TTPooledEmbeddingsLookup"]

_POOLING = {PoolingType.SUM: PoolingMode.SUM, PoolingType.MEAN: PoolingMode.MEAN}
# The values once: an enum member's ``.value`` is two Python calls, and the fused update asks
# every table's sharding type several times a step.
_COLUMN_WISE = ShardingType.COLUMN_WISE.value
_TABLE_WISE = ShardingType.TABLE_WISE.value


class TTLocalTable(nn.Module):
    """The cores one rank holds of one TT table.

    * ``data_parallel``, and ``table_wise`` on the owning rank: ``core_0 .. core_{K-1}``, whole.
    * ``table_wise`` elsewhere: nothing.
    * ``column_wise``: ``core_1 .. core_{K-1}`` whole on every rank (shared by all column shards;
      gradients summed across ranks), and ``core_0_shard_<i>``, the slice of ``core_0`` for each
      column shard placed on this rank (columns ``core_0_shard_cols[i]`` of the embedding).

    A table with a hot-row cache (``cache_rows > 0``; data_parallel and table_wise only) also
    holds the unsharded table's slab ``cache_weight`` and cache buffers where it holds the cores
    (see ``torchrec_tt.modules.hot_cache``); the slab is trained like a core (``whole_params``).

    Parameter names follow the unsharded ``TTEmbeddingTable`` where the tensor is whole. The state
    dict is written by ``ShardedTTEmbeddingBagCollection`` (with sharded tensors), not here.

    Args:
        name: table name.
        shape: the table's TT shape.
        sharding_type: a ``ShardingType`` value.
        local_column_shards: ``(col_offset, num_cols)`` of every column shard on this rank
            (column_wise only).
        owns_table: whether this rank holds the whole table (data_parallel, table_wise owner).
        device: where the cores live.
        cache_rows: rows of the table's hot-row cache (0: none).
        cache_refresh_steps: training forwards between cache refreshes.
        cache_decay: factor applied to the cache's counts at every refresh.
    """

    def __init__(
        self,
        name: str,
        shape: TTShape,
        sharding_type: str,
        local_column_shards: Sequence[tuple[int, int]] = (),
        owns_table: bool = False,
        device: torch.device | None = None,
        cache_rows: int = 0,
        cache_refresh_steps: int = 1,
        cache_decay: float = 1.0,
    ) -> None:
        super().__init__()
        self.name = name
        self.shape = shape
        self.sharding_type = sharding_type
        # The sharded module refuses a cache on column shards before building one.
        assert cache_rows == 0 or sharding_type != _COLUMN_WISE
        self.cache_rows = cache_rows
        self.cache_refresh_steps = cache_refresh_steps
        self.cache_decay = cache_decay
        #: Refresh statistics of the last refresh on this rank (None before the first).
        self.last_cache_refresh: hot_cache.CacheRefreshStats | None = None
        core_shapes = shape.core_shapes()
        self.core_0_shard_cols: list[tuple[int, int]] = []
        if sharding_type == _COLUMN_WISE:
            for k in range(1, shape.num_cores):
                self.register_parameter(
                    f"core_{k}", nn.Parameter(torch.empty(core_shapes[k], device=device))
                )
            for col_offset, num_cols in local_column_shards:
                _, width = column_shard_core0_columns(shape, col_offset, num_cols)
                self.register_parameter(
                    f"core_0_shard_{len(self.core_0_shard_cols)}",
                    nn.Parameter(torch.empty(core_shapes[0][0], width, device=device)),
                )
                self.core_0_shard_cols.append((col_offset, num_cols))
        elif owns_table:
            for k, rows_cols in enumerate(core_shapes):
                self.register_parameter(
                    f"core_{k}", nn.Parameter(torch.empty(rows_cols, device=device))
                )
            if cache_rows > 0:
                hot_cache.add_cache_buffers(self, cache_rows, shape.embedding_dim, device)

    @property
    def param_names(self) -> list[str]:
        """The table's trained tensors (held here or not): ``core_0 ..``, then ``cache_weight``
        with a hot-row cache (the unsharded ``TTEmbeddingTable.trained_params`` order)."""
        names = [f"core_{k}" for k in range(self.shape.num_cores)]
        return names + (["cache_weight"] if self.cache_rows > 0 else [])

    @property
    def param_shapes(self) -> list[tuple[int, int]]:
        """Global shapes of ``param_names``."""
        shapes = [tuple(s) for s in self.shape.core_shapes()]
        if self.cache_rows > 0:
            shapes.append((self.cache_rows, self.shape.embedding_dim))
        return shapes  # type: ignore[return-value]

    def holds_cache(self) -> bool:
        """Whether this rank holds the table's hot-row cache (with its whole cores)."""
        return self.cache_rows > 0 and self.holds_whole_table()

    def whole_params(self) -> list[nn.Parameter]:
        """``whole_cores``, then the cache slab where held: what a fused update of a whole
        table trains."""
        return self.whole_cores() + ([self.cache_weight] if self.holds_cache() else [])

    @torch.no_grad()
    def refresh_cache(self) -> hot_cache.CacheRefreshStats:
        """Refreshes the hot-row cache held here (``hot_cache.refresh_cache``), zeroing the fused
        optimizer state of the slots that change."""
        state = []
        if hasattr(self, "optimizer_state_shapes"):
            state = list(self.optimizer_state(self.shape.num_cores).values())
        stats = hot_cache.refresh_cache(
            self, self.whole_cores(), self.shape, self.cache_decay, state
        )
        self.last_cache_refresh = stats
        return stats

    # whole_cores() and optimizer_state() run for every table in every fused update: they read
    # the module's parameter and buffer dicts directly (what nn.Module.__getattr__ does, without
    # its Python call per tensor), always the current tensors, so nothing can go stale.

    def holds_whole_table(self) -> bool:
        return self.sharding_type != _COLUMN_WISE and "core_0" in self._parameters

    def whole_cores(self) -> list[nn.Parameter]:
        """``core_0 ..`` of a data_parallel / table_wise table held here (else empty)."""
        if not self.holds_whole_table():
            return []
        params = self._parameters
        return [params[f"core_{k}"] for k in range(len(self.shape.p))]  # type: ignore[misc]

    def replicated_cores(self) -> list[nn.Parameter]:
        """The shared cores ``core_1 ..`` of a column_wise table (else empty)."""
        if self.sharding_type != _COLUMN_WISE:
            return []
        return [getattr(self, f"core_{k}") for k in range(1, self.shape.num_cores)]

    @property
    def core_0_shards(self) -> list[nn.Parameter]:
        """The local column slices of ``core_0`` (column_wise), in ``core_0_shard_cols`` order."""
        return [getattr(self, f"core_0_shard_{i}") for i in range(len(self.core_0_shard_cols))]

    def shard_cores(self, col_offset: int, num_cols: int) -> tuple[TTShape, list[nn.Parameter]]:
        """TT shape and cores of the local shard starting at column ``col_offset``."""
        if self.sharding_type != _COLUMN_WISE:
            cores = self.whole_cores()
            if not cores:
                raise RuntimeError(f"TT table {self.name!r} has no cores on this rank")
            return self.shape, cores
        i = self.core_0_shard_cols.index((col_offset, num_cols))
        shape = column_shard_shape(self.shape, col_offset, num_cols)
        return shape, [self.core_0_shards[i], *self.replicated_cores()]

    def local_pieces(self, k: int) -> list[tuple[nn.Parameter, int]]:
        """This rank's pieces of core ``k``: ``(tensor, its first column within the core)``.

        Every piece spans all rows of the core; only column-wise ``core_0`` has pieces narrower
        than the core (one per local column shard).
        """
        if self.sharding_type == _COLUMN_WISE:
            if k > 0:
                return [(getattr(self, f"core_{k}"), 0)]
            return [
                (piece, column_shard_core0_columns(self.shape, col_offset, num_cols)[0])
                for (col_offset, num_cols), piece in zip(self.core_0_shard_cols, self.core_0_shards)
            ]
        return [(getattr(self, self.param_names[k]), 0)] if self.holds_whole_table() else []

    @torch.no_grad()
    def copy_from_full(self, full_cores: Sequence[Tensor]) -> None:
        """Fills the local cores (and the slab, given after the cores with a cache) from the
        table's whole ones."""
        for k, full in enumerate(full_cores):
            for piece, col in self.local_pieces(k):
                piece.copy_(full[:, col : col + piece.shape[1]])

    # --- fused-optimizer state ---------------------------------------------------------------
    #
    # Buffers named like the unsharded module's (``core_<k>_<state>``) where the core is held
    # whole (data_parallel, table_wise owner, column_wise ``core_1 ..``). For column-wise
    # ``core_0``, a state shaped like the core is split like it (``core_0_shard_<i>_<state>``);
    # any other state (row-wise Adagrad's per-row sum, Adam's step) spans all columns and is
    # replicated on every rank as ``core_0_<state>``.

    def init_optimizer_state(self, state_shapes: Callable[[torch.Size], dict[str, tuple[int, ...]]]) -> None:
        """Registers zero state buffers; ``state_shapes`` maps a core shape to its states'."""
        self.optimizer_state_shapes: list[dict[str, tuple[int, ...]]] = [
            state_shapes(torch.Size(s)) for s in self.param_shapes
        ]
        device = next((p.device for p in self.parameters()), None)
        for k, states in enumerate(self.optimizer_state_shapes):
            for key, shape in states.items():
                for name, local_shape in self._state_buffers(k, key, shape):
                    self.register_buffer(name, torch.zeros(local_shape, device=device))

    def _state_buffers(
        self, k: int, key: str, shape: tuple[int, ...]
    ) -> list[tuple[str, tuple[int, ...]]]:
        if self.sharding_type == _COLUMN_WISE and k == 0:
            if shape == tuple(self.shape.core_shapes()[0]):
                return [
                    (f"core_0_shard_{i}_{key}", tuple(piece.shape))
                    for i, piece in enumerate(self.core_0_shards)
                ]
            return [(f"core_0_{key}", shape)]
        if self.sharding_type == _COLUMN_WISE or self.holds_whole_table():
            return [(f"{self.param_names[k]}_{key}", shape)]
        return []

    def is_state_split(self, k: int, key: str) -> bool:
        """Whether state ``key`` of core ``k`` is split by columns like column-wise ``core_0``."""
        return (
            self.sharding_type == _COLUMN_WISE
            and k == 0
            and self.optimizer_state_shapes[0][key] == tuple(self.shape.core_shapes()[0])
        )

    def optimizer_state(self, k: int, piece: int | None = None) -> dict[str, Tensor]:
        """State of core ``k`` (of column-wise ``core_0`` shard ``piece``: its split states and
        the table's replicated ones)."""
        buffers = self._buffers
        if self.sharding_type != _COLUMN_WISE:  # nothing is split
            name = self.param_names[k]
            return {key: buffers[f"{name}_{key}"] for key in self.optimizer_state_shapes[k]}  # type: ignore[misc]
        out = {}
        for key in self.optimizer_state_shapes[k]:
            if self.is_state_split(k, key):
                if piece is not None:
                    out[key] = buffers[f"core_0_shard_{piece}_{key}"]
            else:
                out[key] = buffers[f"{self.param_names[k]}_{key}"]
        return out  # type: ignore[return-value]

    def whole_optimizer_states(self) -> list[dict[str, Tensor]]:
        """``optimizer_state(k)`` of every tensor of ``whole_params`` (empty where this rank
        holds no whole table): one call a table for the fused update, not one a core."""
        if not self.holds_whole_table():
            return []
        buffers = self._buffers
        return [
            {key: buffers[f"{name}_{key}"] for key in shapes}  # type: ignore[misc]
            for name, shapes in zip(self.param_names, self.optimizer_state_shapes)
        ]

    def state_pieces(self, k: int, key: str) -> list[tuple[Tensor, int]]:
        """This rank's pieces of state ``key`` of core ``k`` as ``(tensor, first column)``
        (like ``local_pieces``; one whole piece unless split, none on a non-owner)."""
        if self.is_state_split(k, key):
            return [
                (getattr(self, f"core_0_shard_{i}_{key}"), col)
                for i, (_, col) in enumerate(self.local_pieces(0))
            ]
        name = f"{self.param_names[k]}_{key}"
        return [(getattr(self, name), 0)] if hasattr(self, name) else []

    def replicated_state(self) -> list[Tensor]:
        """State buffers that every rank holding them keeps identical (all but split ones and
        table-wise ones)."""
        if self.sharding_type == _TABLE_WISE:
            return []
        return [
            tensor
            for k, states in enumerate(getattr(self, "optimizer_state_shapes", []))
            for key in states
            if not self.is_state_split(k, key)
            for tensor, _ in self.state_pieces(k, key)
        ]

    @torch.no_grad()
    def copy_state_from_full(self, k: int, key: str, full: Tensor) -> None:
        """Fills this rank's pieces of a state from the unsharded module's buffer."""
        for piece, col in self.state_pieces(k, key):
            if self.is_state_split(k, key):
                piece.copy_(full[:, col : col + piece.shape[1]])
            else:
                piece.copy_(full)

    # The owning ShardedTTEmbeddingBagCollection writes and reads these entries (as sharded
    # tensors where a core is split across ranks), so this module adds none of its own.
    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        return

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        return


class _SumGradientsAcrossRanks(torch.autograd.Function):
    """Identity forward; backward all-reduces (sums) the gradients of all inputs in one call.

    Column shards of a TT table share ``core_1 ..``; each rank's backward yields the part of their
    gradient that comes from its own shards, and the sum over ranks is the full gradient. Every
    rank applies this to the same tensors in the same order each step (ranks without shards
    contribute zeros), on a process group of its own so that the all-reduce cannot interleave with
    TorchRec's all-to-alls.
    """

    @staticmethod
    def forward(ctx: Any, group: dist.ProcessGroup, *tensors: Tensor) -> tuple[Tensor, ...]:
        ctx.group = group
        ctx.shapes = [t.shape for t in tensors]
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Any, ...]:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=ctx.group)
        out, pos = [], 0
        for shape in ctx.shapes:
            n = shape.numel()
            out.append(flat[pos : pos + n].view(shape))
            pos += n
        return (None, *out)


class _FusedUpdateInBackward(torch.autograd.Function):
    """Identity forward; backward hands the core gradients to a ``TTFusedUpdate`` (which
    completes them across ranks where needed and updates the cores in place) and returns no
    gradient, so nothing accumulates in ``.grad``."""

    @staticmethod
    def forward(ctx: Any, update: Any, *params: Tensor) -> tuple[Tensor, ...]:
        ctx.update = update
        ctx.params = params
        return tuple(p.view_as(p) for p in params)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Any, ...]:
        ctx.update(ctx.params, grads)
        return (None,) * (1 + len(grads))


def _core_slots(next_functions: Any, params: Sequence[Tensor], cached: list[int]) -> list[int]:
    """Where each of ``params`` is among a node's ``next_functions`` (by its ``AccumulateGrad``;
    the op's other inputs come without one): ``cached`` when it still matches (checked without a
    Python call per core: this runs every step), else looked up again."""
    if len(cached) == len(params):
        try:
            for k, j in enumerate(cached):
                if next_functions[j][0].variable is not params[k]:
                    break
            else:
                return cached
        except (AttributeError, IndexError):
            pass
    position = {id(p): k for k, p in enumerate(params)}
    slots = [-1] * len(params)
    for j, (fn, _) in enumerate(next_functions):
        k = position.get(id(getattr(fn, "variable", None)), -1)
        if k >= 0:
            slots[k] = j
    if -1 in slots:
        raise RuntimeError(
            "TT lookup: the fused update expected every core as a direct input of the TT op"
        )
    return slots


def _update_in_op_backward(
    pooled: Tensor, update: Callable[[Sequence[Tensor], Sequence[Tensor]], None],
    params: Sequence[Tensor], slots: list[int],
) -> list[int]:
    """What ``_FusedUpdateInBackward`` does, without its identity views (an op per core and step):
    a post-hook on the TT op's autograd node hands the core gradients (its grad_inputs) to
    ``update`` and replaces them by None, so nothing reaches the cores' ``AccumulateGrad`` and no
    ``.grad`` is left. Needs every one of ``params`` passed to the op once, as a leaf that
    requires grad (the caller checks). The node's inputs are found by their ``AccumulateGrad``
    (``_core_slots``), so the slot order of the backend's autograd (Python on the CPU, C++ on
    CUDA) does not matter. Returns the slots (for the next call's ``slots``)."""
    node = pooled.grad_fn
    if node is None:  # no autograd graph: nothing to update
        return slots
    slots = _core_slots(node.next_functions, params, slots)

    def hook(grad_inputs: tuple[Tensor | None, ...], grad_outputs: Any) -> tuple[Any, ...]:
        out = list(grad_inputs)
        grads = []
        for k, j in enumerate(slots):
            g = out[j]
            grads.append(g if g is not None else torch.zeros_like(params[k]))
            out[j] = None
        update(params, grads)
        return tuple(out)

    node.register_hook(hook)
    return slots


class TTPooledEmbeddingsLookup(BaseEmbeddingLookup[KeyedJaggedTensor, Tensor]):
    """Pooled lookups of the TT tables (or column shards) a rank holds for one sharding type.

    Args:
        grouped_configs: this rank's grouped tables (from the TorchRec sharding); their order
            fixes the order of the input features and of the output columns.
        tables: the collection's ``TTLocalTable`` per table name.
        is_weighted: pass the KJT's weights as per-sample weights.
        replicated: column_wise only: every rank's shared cores of all column-wise tables, in one
            order on all ranks; their gradients are summed over ``replicated_group``.
        replicated_group: the process group for that sum.
        fused_update: a ``torchrec_tt.sharding.fused.TTFusedUpdate`` when the tables have a
            fused optimizer: it then runs in the backward instead of the gradient sum (doing
            that sum itself) and the cores get no ``.grad``.
        count_group: data_parallel tables with a hot-row cache: the ranks whose ids every
            replica counts (all of them, so replicas refresh alike); None counts this rank's
            ids only (table_wise: the owner already sees every rank's ids).

    Tables with a hot-row cache are looked up as in the unsharded module
    (``hot_cache.cached_pooled``); in training mode the lookup refreshes them when due, then
    counts the step's ids. Their slabs are parameters of the lookup after the cores (trained
    with them: the fused update, or the caller's DistributedDataParallel).

    Forward takes the features of ``grouped_configs`` (``(F, B, L)``) and returns
    ``[B, sum of local dims]``; a rank without tables returns a ``[B, 0]`` tensor that still takes
    part in autograd, so the output all-to-all's backward runs on every rank.
    """

    def __init__(
        self,
        grouped_configs: Sequence[GroupedEmbeddingConfig],
        tables: Mapping[str, TTLocalTable],
        is_weighted: bool,
        replicated: Sequence[nn.Parameter] = (),
        replicated_group: dist.ProcessGroup | None = None,
        fused_update: Callable[[Sequence[Tensor], Sequence[Tensor]], None] | None = None,
        count_group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        names, shapes, poolings, cores = [], [], [], []
        caches: dict[int, TTLocalTable] = {}
        features: list[str] = []
        feature_table_map: list[int] = []
        for config in grouped_configs:
            for table in config.embedding_tables:
                local = tables[table.name]
                meta = table.local_metadata
                col_offset = meta.shard_offsets[1] if meta is not None else 0
                shape, table_cores = local.shard_cores(col_offset, table.local_cols)
                if shape.embedding_dim != table.local_cols:
                    raise RuntimeError(
                        f"TT table {table.name!r}: local shard has {table.local_cols} columns but "
                        f"its TT shape has {shape.embedding_dim}"
                    )
                for feature in table.feature_names:
                    features.append(feature)
                    feature_table_map.append(len(names))
                if local.holds_cache():
                    caches[len(names)] = local
                names.append(table.name)
                shapes.append(shape)
                poolings.append(_POOLING[table.pooling])
                cores.extend(table_cores)
        self._feature_names = features
        self._is_weighted = is_weighted
        self._layout: TTBatchLayout | None = (
            TTBatchLayout.from_shapes(names, shapes, poolings, feature_table_map) if names else None
        )
        self._feature_dims = self._layout.feature_dims() if self._layout is not None else []
        # Distinct parameters, in first-use order (the same on every rank for data_parallel, which
        # DistributedDataParallel checks); the op takes `cores` with repeats for shared cores.
        slabs = [local.cache_weight for local in caches.values()]
        position: dict[int, int] = {}
        for core in [*cores, *replicated, *slabs]:
            position.setdefault(id(core), len(position))
        self.cores = nn.ParameterList(
            list({id(c): c for c in [*cores, *replicated, *slabs]}.values())
        )
        self._core_index = [position[id(c)] for c in cores]
        # Hot-row caches: table index in the layout -> its TTLocalTable (a plain dict: the
        # sharded module owns the tables), and the slab's index in `cores`.
        self._caches = caches
        self._slab_index = {t: position[id(local.cache_weight)] for t, local in caches.items()}
        self._count_group = count_group
        self._cache_layout = hot_cache.CachedLookupLayout(
            feature_table_map, [p == PoolingMode.MEAN for p in poolings],
            [shapes[t].embedding_dim for t in feature_table_map], list(caches),
        ) if caches else None
        self._sum_layout: TTBatchLayout | None = (
            TTBatchLayout.from_shapes(names, shapes, [PoolingMode.SUM] * len(names), feature_table_map)
            if caches else None
        )
        self._replicated_index = [position[id(c)] for c in replicated]
        self._replicated_group = replicated_group
        self._fused_update = fused_update
        if replicated and replicated_group is None and fused_update is None:
            raise ValueError("replicated cores need a process group for their gradient sum")
        # The fused update runs as a hook on the TT op's node (no identity views) where every
        # parameter is an op input exactly once: no replicated core outside this rank's shards,
        # no shared core given twice, no cache slab (those take _FusedUpdateInBackward).
        # On CUDA the op's node is C++ (tests/test_fused_update_hook.py runs the hook on both).
        # TORCHREC_TT_FUSED_UPDATE_HOOK=0 keeps the identity views (for A/B runs).
        self._update_by_hook = (
            fused_update is not None and not caches
            and sorted(self._core_index) == list(range(len(self.cores)))
            and os.environ.get("TORCHREC_TT_FUSED_UPDATE_HOOK", "1") != "0"
        )
        self._hook_slots: list[int] = []
        self._checked_keys = False
        # Set by the sharded module (the unsharded module's options, then the sharder's keys).
        self.kernel_options = TTKernelOptions()

    def feature_names(self) -> list[str]:
        return list(self._feature_names)

    def prefetch(self, sparse_features: KeyedJaggedTensor, forward_stream: Any = None) -> None:
        """Nothing to prefetch: the cores are resident (called by prefetching pipelines)."""
        return None

    def forward(self, sparse_features: KeyedJaggedTensor) -> Tensor:
        if not self._checked_keys:
            if sparse_features.keys() != self._feature_names:
                raise RuntimeError(
                    f"TT lookup expected features {self._feature_names}, got "
                    f"{sparse_features.keys()}"
                )
            self._checked_keys = True
        if self.training:
            for local in self._caches.values():  # before the cores are read (in place)
                if hot_cache.refresh_due(local, local.cache_refresh_steps):
                    local.refresh_cache()
        # The ParameterList's own dict, in index order: list(self.cores) costs a Python
        # __getitem__ per core every step.
        params: list[Tensor] = list(self.cores._parameters.values())  # type: ignore[arg-type]
        hooked = self._update_by_hook and torch.is_grad_enabled()
        if hooked:
            for p in params:  # a frozen core is no op input with an AccumulateGrad
                if not p.requires_grad:
                    hooked = False
                    break
        if self._fused_update is not None:
            if params and not hooked:
                params = list(_FusedUpdateInBackward.apply(self._fused_update, *params))
        elif self._replicated_index:
            shared = _SumGradientsAcrossRanks.apply(
                self._replicated_group, *[params[i] for i in self._replicated_index]
            )
            for i, tensor in zip(self._replicated_index, shared):
                params[i] = tensor
        vbe = sparse_features.variable_stride_per_key()
        if self._layout is None:
            # A VBE batch's output is flat (see below): an empty one is [0].
            batch = sparse_features.stride() if not vbe else 0
            if self._replicated_index:
                # Tie the empty output to the shared cores so that this rank joins the sum.
                anchor = params[self._replicated_index[0]]
                empty = anchor.reshape(-1)[:0]
                return empty if vbe else empty.reshape(batch, 0)
            first = next(iter(self.cores), None)
            device = first.device if first is not None else sparse_features.values().device
            dtype = first.dtype if first is not None else torch.float32
            shape = (0,) if vbe else (batch, 0)
            return torch.zeros(shape, device=device, dtype=dtype, requires_grad=True)
        cores = [params[i] for i in self._core_index]
        weights = None
        if self._is_weighted:
            weights = sparse_features.weights().to(cores[0].dtype)
        if self._caches:  # (VBE batches are refused for cached tables by the sharded module)
            return self._cached_forward(sparse_features, cores, params, weights)
        if vbe:
            # VBE: the bags padded to the largest batch for the op (reordered below).
            per_rank = sparse_features.stride_per_key_per_rank()
            offsets = padded_vbe_offsets(sparse_features.lengths(), [sum(s) for s in per_rank])
        else:
            offsets = sparse_features.offsets()
        pooled = tt_embedding_bag(
            cores, self._layout, sparse_features.values(), offsets, weights, self.kernel_options
        )
        if hooked:
            self._hook_slots = _update_in_op_backward(
                pooled, self._fused_update, params, self._hook_slots  # type: ignore[arg-type]
            )
        if not vbe:
            return pooled
        # TorchRec's VBE layout: for each destination rank r, each feature's [B_{f,r}, D_f] rows
        # flattened, one after another (what its variable-batch pooled all-to-all splits by
        # rank, and, for one rank, VariableBatchEmbeddingBagCollectionAwaitable lines up by the
        # inverse indices). The KJT holds feature f's bags rank after rank.
        blocks = pooled.split(self._feature_dims, dim=1)
        parts: list[Tensor] = []
        for r in range(len(per_rank[0])):
            for block, sizes in zip(blocks, per_rank):
                start = sum(sizes[:r])
                parts.append(block[start : start + sizes[r]].reshape(-1))
        return torch.cat(parts)

    def _cached_forward(
        self, features: KeyedJaggedTensor, cores: list[Tensor], params: list[Tensor],
        weights: Tensor | None,
    ) -> Tensor:
        """``forward`` of a lookup holding hot-row caches (``hot_cache.cached_pooled``); in
        training mode records the step's ids (all ranks' with a ``count_group``)."""
        assert self._sum_layout is not None and self._cache_layout is not None
        sum_layout = self._sum_layout
        slabs = {t: params[i] for t, i in self._slab_index.items()}
        out, seen = hot_cache.cached_pooled(
            features.values(), features.offsets(), weights, cores[0].dtype, self._cache_layout,
            self._caches,
            lambda v, o, w: tt_embedding_bag(cores, sum_layout, v, o, w, self.kernel_options),
            slabs,
        )
        if self.training:
            if self._count_group is not None:
                seen = _gather_ids(seen, self._count_group)
            for t, ids in seen.items():
                hot_cache.record_ids(self._caches[t], ids)
        return out


@torch.no_grad()
def _gather_ids(ids: Mapping[int, Tensor], group: dist.ProcessGroup) -> dict[int, Tensor]:
    """Every rank's ids per table (concatenated in rank order), on every rank of ``group``: two
    all-gathers (the per-table counts, then the ids padded to the longest rank's), and a host
    read of the counts."""
    world = dist.get_world_size(group)
    keys = sorted(ids)
    if world == 1 or not keys:
        return dict(ids)
    flat = torch.cat([ids[t].long() for t in keys])
    sizes = torch.tensor([ids[t].numel() for t in keys], dtype=torch.int64, device=flat.device)
    all_sizes = [torch.empty_like(sizes) for _ in range(world)]
    dist.all_gather(all_sizes, sizes, group=group)
    per_rank = torch.stack(all_sizes).tolist()  # [world][tables]
    longest = max(sum(row) for row in per_rank)
    if longest == 0:  # no ids anywhere this step (an empty all-gather is not portable)
        return {t: flat.new_empty(0) for t in keys}
    padded = torch.full((longest,), -1, dtype=torch.int64, device=flat.device)
    padded[: flat.numel()] = flat
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=group)
    out: dict[int, list[Tensor]] = {t: [] for t in keys}
    for row, data in zip(per_rank, gathered):
        for t, piece in zip(keys, data[: sum(row)].split(row)):
            out[t].append(piece)
    return {t: torch.cat(pieces) for t, pieces in out.items()}


class TTLookupFactory:
    """Mixin of the Dp/Tw/Cw TT shardings: ``create_lookup`` builds the TT lookup over the
    strategy's grouped configs (the one thing the TT shardings change in TorchRec's classes).

    Set ``_tt_tables``, ``_is_weighted`` and ``_fused_update`` in ``__init__``; override
    ``_tt_lookup_kwargs`` for extra lookup arguments.
    """

    _tt_tables: Mapping[str, TTLocalTable]
    _is_weighted: bool
    _fused_update: Callable[[Sequence[Tensor], Sequence[Tensor]], None] | None
    _grouped_embedding_configs: list[GroupedEmbeddingConfig]

    def _tt_lookup_kwargs(self) -> dict[str, Any]:
        return {}

    def create_lookup(
        self,
        device: torch.device | None = None,
        fused_params: dict[str, Any] | None = None,
        feature_processor: Any = None,
    ) -> TTPooledEmbeddingsLookup:
        return TTPooledEmbeddingsLookup(
            self._grouped_embedding_configs,
            self._tt_tables,
            self._is_weighted,
            fused_update=self._fused_update,
            **self._tt_lookup_kwargs(),
        )

