"""Fused optimizers of sharded TT collections: where they come from, how they run, how they show.

Where the optimizer of a TT table comes from (more specific wins, key by key, as TorchRec merges
a sharder's ``fused_params`` with per-parameter settings):

1. the sharder's ``fused_params`` (``TTEmbeddingBagCollectionSharder(fused_params=...)``, as
   TorchRec's ``EmbeddingBagCollectionSharder(fused_params=...)``);
2. the unsharded module's own ``fused_params`` (its ``FusedOptimConfig``: complete, so it
   replaces the sharder's entirely);
3. TorchRec / PyTorch ``apply_optimizer_in_backward`` markings on the table's cores
   (``param._optimizer_classes`` / ``_optimizer_kwargs``). The class maps to an ``EmbOptimType``
   as in TorchRec (``torch.optim.SGD`` -> EXACT_SGD, ``Adagrad`` -> EXACT_ADAGRAD, ``Adam`` ->
   ADAM, ``torchrec.optim.RowWiseAdagrad`` -> EXACT_ROWWISE_ADAGRAD, and TorchRec's wrappers of
   these); unlike TorchRec, options the marking leaves out take the *class's* defaults (not
   FBGEMM's), because the unsharded TT module runs that very optimizer on marked cores and the
   sharded one must train the same way (e.g. ``torch.optim.Adagrad``'s ``eps=1e-10``).

How the updates run (``TTFusedUpdate``, called in the backward of each lookup, see
``lookup.py``): every core gradient of the lookup is first made complete, then the update is
applied in place and no ``.grad`` is left:

* table_wise: the owner's gradients are complete (TorchRec's pooled all-to-all already divides
  by the world size), so each core is updated locally (``torchrec_tt.optim.fused_update``).
* data_parallel: one all-reduce of all the lookup's core gradients (averaged over ranks, as DDP
  does), then every rank applies the same update to its replica. This replaces the lookup's DDP
  for fused tables (same bytes on the wire as DDP's buckets; no private DDP hooks needed).
* column_wise: the replicated cores' gradients are summed over ranks (as without a fused
  optimizer) and every rank updates its replica; the ``core_0`` column slices are updated where
  they live. Adam's step counter and row-wise Adagrad's per-row accumulator of ``core_0`` span
  all columns, so they are replicated on every rank; the per-row mean of the squared gradient
  is completed by summing each rank's partial row sums in the same all-reduce. The result is
  the unsharded module's update (up to float summation order).

How they show: ``ShardedTTFusedOptimizer`` is a TorchRec ``KeyedOptimizer`` keyed by the
unsharded module's parameter names (``embedding_bags.<table>.core_<k>``), with plain tensors for
replicated cores and ``ShardedTensor`` s where the core is sharded (table_wise cores,
column_wise ``core_0``), so ``DistributedModelParallel.fused_optimizer`` includes it and its
``state_dict`` goes through ``torch.distributed.checkpoint``.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import Tensor, nn
from torchrec.distributed.utils import optimizer_type_to_emb_opt_type
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer

from torchrec_tt.ops import TTKernelOptions
from torchrec_tt.optim import (
    SUPPORTED_FUSED_OPTIMIZERS,
    FusedOptimConfig,
    ValidatedLoadMixin,
    apply_if,
    count_if_not,
    effective_grad,
    finite_flag,
    finite_flags,
    zero_grad_is_no_op,
    zeroed_unless,
    fused_update,
    fused_update_many,
    read_lr,
)
from torchrec_tt.shapes import TTShape

__all__ = [
    "FusedTable",
    "ShardedTTFusedOptimizer",
    "TTFusedUpdate",
    "fused_params_from_optimizer_class",
    "resolve_fused_configs",
    "tt_optimizer_state_bytes",
    "tt_skipped_steps",
]

_CONFIG_KEYS = frozenset(f.name for f in dataclasses.fields(FusedOptimConfig))
# Options of torch optimizers that only pick an implementation, not the maths.
_IMPLEMENTATION_OPTIONS = frozenset({"foreach", "fused", "capturable", "differentiable"})
_CLASS_DEFAULTS_USED = ("lr", "eps", "betas", "weight_decay")


def _normalize(params: Mapping[str, Any]) -> dict[str, Any]:
    """TorchRec / torch spellings (``lr``, ``betas``) -> ``FusedOptimConfig`` field names."""
    out = dict(params)
    if "lr" in out:
        out["learning_rate"] = out.pop("lr")
    if "betas" in out:
        out["beta1"], out["beta2"] = out.pop("betas")
    return out


def _class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def fused_params_from_optimizer_class(
    table: str, optimizer_class: type, optimizer_kwargs: Mapping[str, Any]
) -> dict[str, Any]:
    """``fused_params`` equivalent to ``optimizer_class(**optimizer_kwargs)`` on a TT table.

    Raises ``ValueError`` (naming the table) for an optimizer or an option the TT fused
    optimizers do not implement.
    """
    kwargs = dict(optimizer_kwargs)
    if "optimizer" in kwargs:  # an explicit EmbOptimType wins, as in TorchRec
        return _normalize(kwargs)
    try:
        opt: EmbOptimType | None = optimizer_type_to_emb_opt_type(optimizer_class)
    except ValueError:
        opt = None
    if opt not in SUPPORTED_FUSED_OPTIMIZERS:
        raise ValueError(
            f"TT table {table!r}: apply_optimizer_in_backward optimizer "
            f"{_class_name(optimizer_class)} has no TT fused equivalent"
            + (f" ({opt.name} is not supported)" if opt is not None else "")
            + "; use torch.optim.SGD (EXACT_SGD), torch.optim.Adagrad (EXACT_ADAGRAD), "
            "torch.optim.Adam (ADAM) or torchrec.optim.RowWiseAdagrad (EXACT_ROWWISE_ADAGRAD)"
        )
    defaults = {
        name: p.default
        for name, p in inspect.signature(optimizer_class.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    params: dict[str, Any] = {"optimizer": opt}
    params.update({k: defaults[k] for k in _CLASS_DEFAULTS_USED if k in defaults})
    unsupported = []
    for key, value in kwargs.items():
        if key in _CLASS_DEFAULTS_USED or key in _CONFIG_KEYS:
            params[key] = value
        elif key in _IMPLEMENTATION_OPTIONS:
            continue
        elif key in defaults and _equal(value, defaults[key]):
            continue  # left at the class default: no effect on the update
        else:
            unsupported.append(key)
    if unsupported:
        raise ValueError(
            f"TT table {table!r}: {_class_name(optimizer_class)} options "
            f"{sorted(unsupported)} (values {[kwargs[k] for k in sorted(unsupported)]}) have no "
            f"equivalent in the TT fused {opt.name}; it supports lr, eps, betas and weight_decay"
        )
    return _normalize(params)


def _equal(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # e.g. tensors of different shapes
        return False


def _marking(table: str, cores: Mapping[str, nn.Parameter]) -> dict[str, Any] | None:
    """The ``apply_optimizer_in_backward`` marking shared by all cores of a table (or None)."""
    marks = {
        name: (getattr(p, "_optimizer_classes", None), getattr(p, "_optimizer_kwargs", None))
        for name, p in cores.items()
    }
    marked = [name for name, (classes, _) in marks.items() if classes]
    if not marked:
        return None
    unmarked = [name for name in marks if name not in marked]
    if unmarked:
        raise ValueError(
            f"TT table {table!r}: apply_optimizer_in_backward marks {marked} but not "
            f"{unmarked}; mark all cores of a table (e.g. module.parameters())"
        )
    (classes, kwargs), *others = marks.values()
    if len(classes) != 1 or len(kwargs) != 1:
        raise ValueError(
            f"TT table {table!r}: a core carries {len(classes)} in-backward optimizers; "
            "a fused TT table takes exactly one"
        )
    for other_classes, other_kwargs in others:
        if list(other_classes) != list(classes) or list(other_kwargs) != list(kwargs):
            raise ValueError(
                f"TT table {table!r}: its cores are marked with different in-backward "
                "optimizers; a TT table has one optimizer for all its cores"
            )
    return fused_params_from_optimizer_class(table, classes[0], kwargs[0])


def _module_config(module: nn.Module) -> FusedOptimConfig | None:
    try:
        return module.fused_optimizer.cfg  # type: ignore[no-any-return]
    except RuntimeError:  # built without fused_params
        return None


def resolve_fused_configs(
    module: nn.Module, sharder_fused_params: Mapping[str, Any] | None = None
) -> dict[str, FusedOptimConfig]:
    """The fused optimizer of every table of a ``TTEmbeddingBagCollection`` ({} when none).

    Merges, per table and in increasing precedence, ``sharder_fused_params``, the module's own
    ``fused_params`` and the ``apply_optimizer_in_backward`` marking of its cores. A collection
    fuses all its tables or none: a partial result raises ``ValueError``, as do unsupported
    optimizers or options (the message names the table and where the setting came from).
    """
    module_cfg = _module_config(module)
    # Kernel settings (bounds_check_mode, ...) share the dict but configure no optimizer.
    sharder_optim = {
        k: v for k, v in (sharder_fused_params or {}).items() if k not in TTKernelOptions.KEYS
    }
    configs: dict[str, FusedOptimConfig] = {}
    for cfg in module.embedding_bag_configs():  # type: ignore[operator]
        name = cfg.name
        table = module.embedding_bags[name]  # type: ignore[index]
        cores = {f"embedding_bags.{name}.{n}": p for n, p in table.named_parameters()}
        merged: dict[str, Any] = {}
        sources = []
        if sharder_optim:
            merged.update(_normalize(sharder_optim))
            sources.append("the sharder's fused_params")
        if module_cfg is not None:
            merged.update(dataclasses.asdict(module_cfg))
            sources.append("the module's fused_params")
        marking = _marking(name, cores)
        if marking is not None:
            merged.update(marking)
            sources.append("apply_optimizer_in_backward")
        if not sources:
            continue
        try:
            configs[name] = FusedOptimConfig.from_fused_params(merged)
        except ValueError as e:
            raise ValueError(
                f"TT table {name!r}: fused optimizer from {' + '.join(sources)}: {e}"
            ) from None
    tables = [c.name for c in module.embedding_bag_configs()]  # type: ignore[operator]
    if configs and len(configs) != len(tables):
        raise ValueError(
            f"TT tables {sorted(configs)} have a fused optimizer but {sorted(set(tables) - set(configs))} "
            "do not: a sharded TTEmbeddingBagCollection fuses all its tables or none (give the "
            "others one too: sharder fused_params, or apply_optimizer_in_backward on their cores)"
        )
    return configs


def tt_optimizer_state_bytes(shape: TTShape, optimizer: EmbOptimType, element_size: int = 4) -> int:
    """Bytes of fused-optimizer state of one TT (or column shard): 0 for EXACT_SGD, the cores'
    size for EXACT_ADAGRAD, one value per core row for EXACT_ROWWISE_ADAGRAD, twice the cores
    (plus a step per core) for ADAM."""
    cfg = FusedOptimConfig(optimizer=optimizer)
    total = 0
    for rows, cols in shape.core_shapes():
        for state_shape in cfg.state_shapes(torch.Size([rows, cols])).values():
            n = 1
            for d in state_shape:
                n *= d
            total += n
    return total * element_size


@dataclass
class FusedTable:
    """A fused table of a sharded collection: its optimizer and its param group (whose ``lr``
    is read at every update, so learning-rate schedulers work)."""

    cfg: FusedOptimConfig
    group: dict[str, Any]
    # Updates dropped by skip_non_finite (on the ranks holding the table): a device tensor once
    # counted, so that counting never synchronises.
    skipped: Tensor | int = 0

    @property
    def skipped_steps(self) -> int:
        """Updates dropped by ``skip_non_finite`` (reading it synchronises with the device)."""
        return int(self.skipped)


class TTFusedUpdate:
    """Completes the core gradients of one lookup and applies the fused optimizer to them.

    Args:
        tables: the ``TTLocalTable`` s of one sharding type, in the same order on every rank
            (tables with nothing on this rank included).
        fused: the fused tables of the collection.
        reduce: ``None`` (table_wise: gradients are complete), ``"mean"`` (data_parallel:
            average the gradients over ``group``) or ``"sum"`` (column_wise: sum the replicated
            cores' gradients and the row statistics over ``group``).
        group: process group of the reduction (one of its own, so that it cannot interleave
            with TorchRec's all-to-alls on the default group).
    """

    def __init__(
        self,
        tables: Sequence[Any],
        fused: Mapping[str, FusedTable],
        reduce: str | None = None,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        if reduce not in (None, "mean", "sum"):
            raise ValueError(f"reduce must be None, 'mean' or 'sum', got {reduce!r}")
        self._tables = list(tables)
        self._fused = fused
        self._reduce = reduce
        self._group = group
        # (table names, their skip counts, a 0-dim view per table held as FusedTable.skipped)
        self._skip_counters: tuple[list[str], Tensor, list[Tensor]] | None = None
        # Each table's whole cores (and slab) by table name, looked up once per call.
        self._whole: dict[str, list[Tensor]] = {}

    def _world_size(self) -> int:
        if not dist.is_initialized():
            return 1
        return dist.get_world_size(self._group)

    @torch.no_grad()
    def __call__(self, params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
        # Every table's learning rate is checked before anything is reduced or updated, once
        # per param group (tables of one config share theirs).
        lrs: dict[str, float] = {}
        lr_of_group: dict[int, float] = {}
        for table in self._tables:
            group = self._fused[table.name].group
            lr = lr_of_group.get(id(group))
            if lr is None:
                lr = lr_of_group[id(group)] = read_lr(group, f"fused optimizer of TT table {table.name!r}")
            lrs[table.name] = lr
        grad_of = {id(p): g for p, g in zip(params, grads)}
        # Each table's whole cores, looked up once per call (the helpers below need them several
        # times a table, and TTLocalTable builds the list by module attribute lookups); read by
        # subscription, not a method: this runs for every table and step.
        self._whole = {t.name: t.whole_params() for t in self._tables}
        row_stats: dict[str, Tensor] = {}
        bad_shards: dict[str, Tensor] = {}  # column_wise: non-finite core_0 shard gradients
        column_wise = self._reduce == "sum"
        if self._reduce is not None:
            # (id of the core, or (kind, table name), tensor)
            parts: list[tuple[Any, Tensor]] = []
            for table in self._tables:
                fused = self._fused[table.name]
                if column_wise:
                    for core in table.replicated_cores():
                        parts.append((id(core), grad_of[id(core)]))
                    if fused.cfg.optimizer == EmbOptimType.EXACT_ROWWISE_ADAGRAD:
                        rows = self._core0_row_sums(table, fused.cfg, grad_of)
                        parts.append((("rows", table.name), rows))
                    if fused.cfg.skip_non_finite:
                        # Shards differ by rank: their finiteness is summed over the group so
                        # that every rank skips (or applies) the table alike.
                        shard_grads = [grad_of[id(piece)] for piece in table.core_0_shards]
                        flag = torch.zeros(1, dtype=torch.float32, device=table.replicated_cores()[0].device)
                        if shard_grads:
                            flag += (~torch.isfinite(torch.cat([g.reshape(-1) for g in shard_grads]))).any()
                        parts.append((("bad", table.name), flag))
                else:
                    for core in self._whole[table.name]:
                        parts.append((id(core), grad_of[id(core)]))
            world = self._world_size()
            if parts and world > 1:
                flat = torch.cat([t.reshape(-1) for _, t in parts])
                dist.all_reduce(flat, group=self._group)
                if self._reduce == "mean":
                    flat.div_(world)
                reduced = []
                pos = 0
                for key, t in parts:
                    reduced.append((key, flat[pos : pos + t.numel()].view(t.shape)))
                    pos += t.numel()
            else:  # one rank: the sums and means are the tensors themselves (no copy)
                reduced = parts
            for key, value in reduced:
                if isinstance(key, tuple):
                    (row_stats if key[0] == "rows" else bad_shards)[key[1]] = value
                else:
                    grad_of[key] = value
        # Whole-core updates that need no copies (no skip, or a skip by zeroed gradients) of
        # tables with the same config and rate run together, after the loop: one foreach
        # update of all their cores (a DLRM step on a GPU is bound by launches). For the same
        # reason the skip_non_finite flags of all whole-core tables are one finite_flags call
        # and their skip counters one add.
        flags = {} if column_wise else self._whole_core_flags(grad_of)
        batches: dict[tuple[FusedOptimConfig, float], list[Any]] = {}
        for table in self._tables:
            fused = self._fused[table.name]
            lr = lrs[table.name]

            def update(table: Any = table, fused: FusedTable = fused, lr: float = lr,
                       deferred: bool = True) -> None:
                if column_wise:
                    for k, core in enumerate(table.replicated_cores(), start=1):
                        fused_update(core, grad_of[id(core)], table.optimizer_state(k), fused.cfg, lr)
                    self._update_core0_shards(table, fused.cfg, lr, grad_of, row_stats.get(table.name))
                elif deferred:
                    batches.setdefault((fused.cfg, lr), []).append(table)
                else:
                    self._apply([table], fused.cfg, lr, grad_of)

            if not fused.cfg.skip_non_finite or not self._holds_any(table):  # nothing here: no-op
                update()
                continue
            ok = flags[table.name] if not column_wise else self._finite(table, grad_of, bad_shards, row_stats)
            if zero_grad_is_no_op(fused.cfg):  # a zeroed gradient changes nothing: no copies
                for t in self._touched_grads(table):
                    grad_of[id(t)] = zeroed_unless(ok, grad_of[id(t)])
                if table.name in row_stats:
                    row_stats[table.name] = zeroed_unless(ok, row_stats[table.name])
                update()
            else:  # the copies must bracket this table's own update: run it now
                apply_if(ok, self._touched(table), lambda: update(deferred=False))
            if column_wise:
                fused.skipped = count_if_not(fused.skipped, ok)
        for (cfg, lr), tables in batches.items():
            self._apply(tables, cfg, lr, grad_of)

    def _whole_core_flags(self, grad_of: Mapping[int, Tensor]) -> dict[str, Tensor]:
        """``skip_non_finite`` of the tables held whole here: every table's finiteness flag
        (0-dim bool views of one ``finite_flags`` result), its skip counted. The counters are
        views of one int64 tensor, so a step counts all the tables' skips in one add."""
        checked = [
            t for t in self._tables
            if self._fused[t.name].cfg.skip_non_finite and self._whole[t.name]
        ]
        if not checked:
            return {}
        ok = finite_flags([[grad_of[id(c)] for c in self._whole[t.name]] for t in checked])
        names = [t.name for t in checked]
        counters = self._skip_counters
        if (
            counters is None
            or counters[0] != names
            or counters[1].device != ok.device
            or any(self._fused[n].skipped is not v for n, v in zip(names, counters[2]))
        ):  # first step, or a counter replaced or moved since: one tensor of the counts so far
            total = torch.stack([
                torch.as_tensor(self._fused[n].skipped, dtype=torch.int64).to(ok.device)
                for n in names
            ])
            counters = (names, total, list(total.unbind(0)))
            for n, view in zip(names, counters[2]):
                self._fused[n].skipped = view
            self._skip_counters = counters
        counters[1].add_(~ok)
        return dict(zip(names, ok.unbind(0)))

    def _apply(self, tables: Sequence[Any], cfg: FusedOptimConfig, lr: float,
               grad_of: Mapping[int, Tensor]) -> None:
        """One :func:`fused_update_many` over the whole cores (and hot-row cache slabs) of
        ``tables``."""
        cores = [c for t in tables for c in self._whole[t.name]]
        states = [state for t in tables for state in t.whole_optimizer_states()]
        if cores:
            fused_update_many(cores, [grad_of[id(c)] for c in cores], states, cfg, lr)

    def _holds_any(self, table: Any) -> bool:
        """Whether this rank holds any core of ``table`` (else its update is a no-op)."""
        if self._reduce == "sum":
            return bool(table.replicated_cores() or table.core_0_shards)
        return bool(self._whole[table.name])

    def _touched_grads(self, table: Any) -> list[Tensor]:
        """The cores of ``table`` on this rank whose gradients an update reads."""
        if self._reduce == "sum":
            return [*table.replicated_cores(), *table.core_0_shards]
        return list(self._whole[table.name])

    def _touched(self, table: Any) -> list[Tensor]:
        """The cores and optimizer state an update of ``table`` may write on this rank."""
        if self._reduce == "sum":
            cores = [*table.replicated_cores(), *table.core_0_shards]
            if not cores:
                return []
            states = [table.optimizer_state(k) for k in range(len(table.replicated_cores()) + 1)]
            states += [table.optimizer_state(0, piece=i) for i in range(len(table.core_0_shards))]
        else:
            cores = self._whole[table.name]
            states = table.whole_optimizer_states()
        out: dict[int, Tensor] = {id(t): t for t in cores}
        out.update({id(t): t for state in states for t in state.values()})
        return list(out.values())

    def _finite(
        self,
        table: Any,
        grad_of: Mapping[int, Tensor],
        bad_shards: Mapping[str, Tensor],
        row_stats: Mapping[str, Tensor],
    ) -> Tensor:
        """Whether the table's (reduced) gradients are all finite, as a 0-dim bool device tensor;
        the same on every rank that holds the table (reduced gradients are equal across ranks,
        and column_wise shards' finiteness was reduced with them)."""
        if self._reduce == "sum":
            local = [grad_of[id(c)] for c in table.replicated_cores()]
            if table.name in row_stats:
                local.append(row_stats[table.name])
            # The summed count of ranks whose core_0 shards held a NaN or inf, as a NaN if > 0.
            local.append(torch.where(bad_shards[table.name] > 0, float("nan"), 0.0))
        else:
            local = [grad_of[id(c)] for c in self._whole[table.name]]
        return finite_flag(local)

    def _core0_row_sums(
        self, table: Any, cfg: FusedOptimConfig, grad_of: Mapping[int, Tensor]
    ) -> Tensor:
        """This rank's part of ``sum over columns of g²`` per row of ``core_0`` (zeros if it
        holds no column shard of the table)."""
        ref = table.replicated_cores()[0]
        total = torch.zeros(table.shape.core_shapes()[0][0], dtype=ref.dtype, device=ref.device)
        for piece in table.core_0_shards:
            total += effective_grad(piece, grad_of[id(piece)], cfg).square().sum(dim=1)
        return total

    def _update_core0_shards(
        self,
        table: Any,
        cfg: FusedOptimConfig,
        lr: float,
        grad_of: Mapping[int, Tensor],
        row_sums: Tensor | None,
    ) -> None:
        pieces = table.core_0_shards
        opt = cfg.optimizer
        if opt == EmbOptimType.EXACT_ROWWISE_ADAGRAD:
            assert row_sums is not None
            m1 = table.optimizer_state(0)["momentum1"]  # replicated: whole rows span all shards
            m1.add_(row_sums.to(m1.dtype) / table.shape.core_shapes()[0][1])
            scale = (lr / (m1.sqrt() + cfg.eps)).unsqueeze(1)
            for piece in pieces:
                piece.sub_(effective_grad(piece, grad_of[id(piece)], cfg) * scale)
        elif opt == EmbOptimType.ADAM:
            step = table.optimizer_state(0)["step"]  # replicated: one step for all shards
            for i, piece in enumerate(pieces):
                state = dict(table.optimizer_state(0, piece=i))
                state["step"] = step.clone()
                fused_update(piece, grad_of[id(piece)], state, cfg, lr)
            step.add_(1)
        else:
            for i, piece in enumerate(pieces):
                fused_update(piece, grad_of[id(piece)], table.optimizer_state(0, piece=i), cfg, lr)


class ShardedTTFusedOptimizer(ValidatedLoadMixin, KeyedOptimizer):
    """``KeyedOptimizer`` view of the fused optimizers of a sharded TT collection.

    Keys are the unsharded module's (``embedding_bags.<table>.core_<k>``) on every rank; values
    are plain tensors for replicated cores and ``ShardedTensor`` s for sharded ones (possibly
    with no local shard), and so is the state (``momentum1`` / ``momentum2`` / ``step``, the
    module's buffers). Updates happen in the backward: ``step()`` and ``zero_grad()`` do nothing.
    One param group per distinct optimizer config; its ``lr`` is read at every update.

    Args:
        views: builds ``{key: core view}`` (called again by ``rebind``).
        state_of: ``key -> {state name: tensor or ShardedTensor}`` (views of the buffers).
        groups: ``(param group, keys in it)`` per distinct config; the dicts are the ones the
            updates read ``lr`` from.
        fused_tables: the collection's fused tables, whose ``skipped_steps`` counters
            (``skip_non_finite``) ``skipped_steps`` reports.
    """

    def __init__(
        self,
        views: Callable[[], dict[str, Tensor]],
        state_of: Callable[[str], dict[str, Any]],
        groups: Sequence[tuple[dict[str, Any], Sequence[str]]],
        fused_tables: Mapping[str, FusedTable] | None = None,
    ) -> None:
        self._fused_tables = dict(fused_tables or {})
        self._views = views
        self._state_of = state_of
        self._group_keys = [list(keys) for _, keys in groups]
        super().__init__(params={}, state={}, param_groups=[g for g, _ in groups])
        self.rebind()

    def rebind(self) -> None:
        """Rebuilds the parameter views (after the module's tensors were replaced)."""
        self.params = self._views()
        for group, keys in zip(self.param_groups, self._group_keys):
            group["params"] = [self.params[k] for k in keys]  # type: ignore[index]

    @property  # type: ignore[override]
    def state(self) -> dict[Tensor, dict[str, Any]]:
        return {p: self._state_of(key) for key, p in self.params.items()}

    @state.setter
    def state(self, value: Mapping[Any, Any]) -> None:
        if value:
            raise ValueError("ShardedTTFusedOptimizer state lives in the module's buffers")

    @property
    def skipped_steps(self) -> dict[str, int]:
        """Updates dropped per table by ``skip_non_finite`` (counted on the ranks that hold the
        table: every rank for data_parallel and column_wise, the owner for table_wise)."""
        return {name: t.skipped_steps for name, t in self._fused_tables.items()}

    def init_state(self, sparse_grad_parameter_names: Any = None) -> None:
        """Nothing to do: the state exists from construction (zeros or the module's)."""
        return None

    def step(self, closure: Any = None) -> None:  # noqa: D102 - updates happen in the backward
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:  # noqa: D102 - no gradients kept
        return None


def tt_skipped_steps(optimizer: Any) -> dict[str, int]:
    """Steps dropped by ``skip_non_finite`` per TT table, from every TT fused optimizer in
    ``optimizer``: a ``TTFusedOptimizer``, a ``ShardedTTFusedOptimizer`` or a TorchRec
    ``CombinedOptimizer`` holding them (``DistributedModelParallel.fused_optimizer``). A table
    name met twice is prefixed with its optimizer's key. Reading synchronises with the device."""
    out: dict[str, int] = {}
    if isinstance(optimizer, CombinedOptimizer):
        for key, sub in optimizer.optimizers:
            for table, n in tt_skipped_steps(sub).items():
                out[f"{key}.{table}" if table in out else table] = n
    elif isinstance(getattr(optimizer, "skipped_steps", None), Mapping):
        out.update(optimizer.skipped_steps)
    return out
