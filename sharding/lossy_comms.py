"""Error-bounded lossy compression of the pooled-embedding all-to-all, as a TorchRec qcomms option.

Turn it on like TorchRec's qcomms (``get_qcomm_codecs_registry``), for our sharder and
TorchRec's alike::

    registry = error_bounded_qcomm_codecs(0.05, final_rel_error_bound=0.02, decay_steps=10_000,
                                          block_dim=16)
    sharders = [TTEmbeddingBagCollectionSharder(qcomm_codecs_registry=registry),
                EmbeddingBagCollectionSharder(qcomm_codecs_registry=registry)]
    policy = lossy_policy(registry)
    ...                                  # every training step, after optimizer.step():
    policy.step()                        # all ranks, same step (it may all-reduce statistics)

What is sent. TorchRec hands the codec the whole ``[B_global, D_local]`` pooled tensor (forward)
or the re-ordered ``[B_local, D_r]`` gradient chunks (backward), one chunk per peer rank. Each
chunk is cut into *groups*: one block of ``block_dim`` columns (one feature's pooled embedding
when ``block_dim`` is the embedding dim) over all the chunk's rows. A group is quantised on its
own range (``torchrec_tt.sharding.lossy_codec``): its absolute bound is ``rel_bound * (max -
min)`` of that table's values in the tensor encoded, so every decoded element is within
``rel_bound`` x the group's range, and so within ``rel_bound`` x the range of the whole tensor,
whatever bound below the user's the policy chose.

Fixed wire size (the choice TorchRec's interface asks for: the split sizes are computed from
lengths before any data moves). The code width of a group is a function of the policy state
only, never of the data: the bound in force (iteration schedule x per-table scale) gives the
bits, and the group range goes in the group's header. The policy state is the same on every
rank (its statistics are all-reduced in ``step()`` every ``update_every`` steps, the same step
everywhere), so every rank derives the same widths and the same byte count for every chunk,
and ``calc_quantized_size(length)`` is exact. When two ranks' chunks have the same length but a
different total width, both are padded to the larger (the size must be a function of length).

Layout. ``padded_size`` (called by TorchRec's pooled all-to-all before ``encode``) gives the
codec the per-rank dims; the backward ``encode`` (TorchRec gives it a fresh context) finds the
layout by the gradient's length among those the forward decoded, so two pooled all-to-alls of a
step with the same total size but different per-rank dims are an error (give each sharder its
own registry; they may share one policy).
Only ``CommOp.POOLED_EMBEDDINGS_ALL_TO_ALL`` is covered (table-wise, column-wise,
table-column-wise sharding); row-wise's reduce-scatter is not.

The dual-level policy (:class:`ErrorBoundPolicy`):

* iteration level: the bound goes from ``rel_error_bound`` to ``final_rel_error_bound`` over
  ``decay_steps`` steps (cosine), tightening as training converges;
* table level: each table's (group's) bound is scaled by ``min(1, rho_ref / rho_t)``, floored at
  ``min_table_scale``, where ``rho_t`` is the table's range over standard deviation (measured,
  averaged over steps, all-reduced) and ``rho_ref`` the median over tables. A tail-heavy table
  (a few outliers set its range) would see a range-relative error that is large against its
  typical values; this keeps ``bound x range / std`` even across tables. Scales only tighten.

Its state (step, per-table statistics) is in ``state_dict()`` / ``load_state_dict()``, exact on
resume.

The codec runs the compiled ops (``torchrec_tt::lossy_encode`` / ``lossy_decode``: one call per
run of ranks with the same dims and code widths, so one encode and one decode per all-to-all and
direction when all ranks agree, reading the pooled tensor in place, no permuted copies; the
widths, sizes and runs are derived once per layout and bound, not per call) where
the extension has them, else the torch-op reference (``codec_impl=``, see
``torchrec_tt.sharding.lossy_codec``). NaN/inf in a tensor to encode raise ValueError: at once on
the CPU; on CUDA without a host sync, from a later encode or ``policy.step()`` (the groups
concerned are sent as NaN meanwhile; ``policy.non_finite.check()`` synchronises and raises now).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torchrec.distributed.types import CommOp, QuantizedCommCodecs

from torchrec_tt.sharding.lossy_codec import (
    IMPLEMENTATIONS,
    NonFiniteFlag,
    _check_widths,
    _decode_blocks_checked,
    _encode_blocks_checked,
    _resolve,
    bits_for_bound,
    encoded_bytes,
)

__all__ = [
    "ErrorBoundPolicy",
    "ErrorBoundedCommCodec",
    "ErrorBoundedContext",
    "error_bounded_qcomm_codecs",
    "lossy_policy",
]

_DIRECTIONS = ("forward", "backward")


@dataclass(frozen=True)
class _Layout:
    """One pooled all-to-all: the dims every rank contributes, this rank, the batch per rank."""

    dims: tuple[int, ...]
    rank: int
    batch: int
    block: int

    @property
    def world(self) -> int:
        return len(self.dims)

    def groups(self, owner: int) -> int:
        return self.dims[owner] // self.block

    @property
    def name(self) -> str:
        return ",".join(map(str, self.dims))


@dataclass(eq=False)
class _Plan:
    """What the codec needs of one layout and direction at the widths in force, derived once
    (the widths change only with the policy's state), so a call does no per-group work.

    ``widths[r]``: the code widths of rank r's groups (checked); ``encoded[r]``: the bytes they
    take; ``padded[r]``: the bytes of r's chunk on the wire (equal lengths are padded to the
    larger); ``sizes``: chunk length ->
    bytes; ``runs``: ``(first rank, count)`` of consecutive ranks with equal dims and widths,
    whose chunks one encode / decode call handles; ``impls``: the implementation resolved per
    (codec's ``impl``, device type)."""

    widths: tuple[list[int], ...]
    encoded: tuple[int, ...]
    padded: tuple[int, ...]
    sizes: dict[int, int]
    runs: tuple[tuple[int, int], ...]
    impls: dict[tuple[str | None, str], str] = field(default_factory=dict)

    def impl(self, codec_impl: str | None, device: torch.device) -> str:
        got = self.impls.get((codec_impl, device.type))
        if got is None:
            got = self.impls[(codec_impl, device.type)] = _resolve(codec_impl, device)
        return got


@dataclass
class ErrorBoundedContext:
    """Per-call state TorchRec threads from ``encode`` to ``calc_quantized_size`` / ``decode``.

    ``padded_dim_sum_per_rank`` is read by TorchRec's pooled all-to-all (no padding: None).
    """

    padded_dim_sum_per_rank: list[int] | None = None
    layout: _Layout | None = None


class ErrorBoundPolicy:
    """The bound in force per direction, table and step (see the module docstring).

    Args:
        rel_error_bound: the bound relative to each table's value range, at step 0 (the largest
            the policy uses), in (0, 0.5).
        final_rel_error_bound: the bound after ``decay_steps`` (default: ``rel_error_bound``).
        decay_steps: steps of the cosine schedule from the first bound to the final one.
        backward_scale: the gradients' bound relative to the embeddings' (1: the same).
        table_wise: adapt the bound per table from its range / std statistics.
        min_table_scale: the tightest per-table scale.
        update_every: steps between statistics updates (an all-reduce of a few floats per table).
        stats_every: measure the statistics on every ``stats_every``-th step only (they cost a
            pass over the data).
        process_group: where statistics are all-reduced (default: the default group).
    """

    def __init__(
        self,
        rel_error_bound: float,
        final_rel_error_bound: float | None = None,
        decay_steps: int = 0,
        backward_scale: float = 1.0,
        table_wise: bool = True,
        min_table_scale: float = 0.25,
        update_every: int = 50,
        stats_every: int = 5,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        final = rel_error_bound if final_rel_error_bound is None else final_rel_error_bound
        for name, value in (("rel_error_bound", rel_error_bound),
                            ("final_rel_error_bound", final)):
            if not isinstance(value, (int, float)) or not (math.isfinite(value)
                                                           and 0 < value < 0.5):
                raise ValueError(f"{name} must be a finite number in (0, 0.5), got {value!r}")
        if final > rel_error_bound:
            raise ValueError(f"final_rel_error_bound {final} is looser than rel_error_bound "
                             f"{rel_error_bound}; the schedule only tightens")
        if not isinstance(decay_steps, int) or decay_steps < 0:
            raise ValueError(f"decay_steps must be an int >= 0, got {decay_steps!r}")
        if decay_steps == 0 and final != rel_error_bound:
            raise ValueError("final_rel_error_bound differs from rel_error_bound: give "
                             "decay_steps >= 1 (the steps over which the bound tightens)")
        if not (math.isfinite(backward_scale) and 0 < backward_scale <= 1):
            raise ValueError(f"backward_scale must be in (0, 1], got {backward_scale!r}")
        if not (math.isfinite(min_table_scale) and 0 < min_table_scale <= 1):
            raise ValueError(f"min_table_scale must be in (0, 1], got {min_table_scale!r}")
        for name, value in (("update_every", update_every), ("stats_every", stats_every)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        # the tightest bound the policy can reach must be codable
        bits_for_bound(final * backward_scale * (min_table_scale if table_wise else 1.0))
        self.rel_error_bound = float(rel_error_bound)
        self.final_rel_error_bound = float(final)
        self.decay_steps = decay_steps
        self.backward_scale = float(backward_scale)
        self.table_wise = table_wise
        self.min_table_scale = float(min_table_scale)
        self.update_every = update_every
        self.stats_every = stats_every
        self.process_group = process_group
        self.iteration = 0
        #: NaN/inf reports of the codecs' CUDA encodes (polled in step(), never synchronising)
        self.non_finite = NonFiniteFlag()
        # per table key: [sum of rho, count] since the last update, and the scale in force
        self._acc: dict[str, list[float | Tensor]] = {}
        self._rho: dict[str, float] = {}
        self._scale: dict[str, float] = {}
        # code widths (direction, layout, owner, bound) and the codecs' plans ("plan",
        # direction, layout, bound), derived from the state; cleared whenever the scales change
        self._bits_cache: dict[tuple[Any, ...], Any] = {}
        #: bumped whenever the widths may change (step, update, load): codecs reuse a plan
        #: while it stands
        self.version = 0
        self._registered: set[_Layout] = set()
        # the group keys per (direction, layout, owner), and the statistics observed since the
        # last fold into ``_acc``: per tuple of keys, [sum of rho, count] as device vectors
        self._keys: dict[tuple[str, _Layout, int], tuple[str, ...]] = {}
        self._pending: dict[tuple[str, ...], list[Tensor]] = {}

    # ------------------------------------------------------------------ the bound in force

    def iteration_bound(self, direction: str = "forward") -> float:
        """The schedule's bound at the current step (before the per-table scale)."""
        hi, lo = self.rel_error_bound, self.final_rel_error_bound
        if self.decay_steps == 0:
            bound = hi
        else:
            t = min(self.iteration, self.decay_steps) / self.decay_steps
            bound = lo + (hi - lo) * 0.5 * (1.0 + math.cos(math.pi * t))
        return bound * (self.backward_scale if direction == "backward" else 1.0)

    def table_bound(self, direction: str, key: str) -> float:
        """The bound in force for one table (group) key: schedule x per-table scale."""
        return self.iteration_bound(direction) * self._scale.get(f"{direction}:{key}", 1.0)

    def bits(self, direction: str, layout: _Layout, owner: int) -> tuple[int, ...]:
        """Code widths of the groups of rank ``owner``'s columns in ``layout``."""
        bound = self.iteration_bound(direction)
        # keyed by the schedule's bound, not the step: without decay they hold for the run
        cache_key = (direction, layout, owner, bound)
        got = self._bits_cache.get(cache_key)
        if got is None:
            got = tuple(bits_for_bound(bound * self._scale.get(key, 1.0))
                        for key in self.group_keys(direction, layout, owner))
            self._cache(cache_key, got)
        return got

    def group_keys(self, direction: str, layout: _Layout, owner: int) -> tuple[str, ...]:
        """The statistics / scale keys of rank ``owner``'s groups in ``layout``."""
        got = self._keys.get((direction, layout, owner))
        if got is None:
            got = tuple(f"{direction}:{_group_key(layout, owner, g)}"
                        for g in range(layout.groups(owner)))
            self._keys[(direction, layout, owner)] = got
        return got

    def _cache(self, key: tuple[Any, ...], value: Any) -> None:
        if len(self._bits_cache) > 4096:
            self._bits_cache.clear()
        self._bits_cache[key] = value

    def _changed(self) -> None:
        """The widths may have changed: drop what was derived from them."""
        self._bits_cache.clear()
        self.version += 1

    # ------------------------------------------------------------------ statistics

    def register(self, layout: _Layout) -> None:
        """Adds the tables of a layout (every rank registers every table, so the all-reduce in
        ``step`` sees the same keys everywhere)."""
        if layout in self._registered:  # every pooled all-to-all registers its layout
            return
        for direction in _DIRECTIONS:
            for owner in range(layout.world):
                for key in self.group_keys(direction, layout, owner):
                    if key not in self._acc:
                        self._acc[key] = [0.0, 0.0]
        self._registered.add(layout)

    def wants_stats(self) -> bool:
        return self.table_wise and self.iteration % self.stats_every == 0

    def observe(self, direction: str, layout: _Layout, owner: int, x: Tensor) -> None:
        """Accumulates range / std of each group of ``x`` (``[C, G, n]``, rank ``owner``'s
        groups) on the device (no host sync)."""
        if x.shape[1] == 0 or x.shape[0] * x.shape[2] < 2:
            return
        flat = x.transpose(0, 1).reshape(x.shape[1], -1)
        std = flat.std(-1)
        rng = flat.amax(-1) - flat.amin(-1)
        rho = torch.where(std > 0, rng / std, torch.zeros_like(std))
        valid = (std > 0).to(rho.dtype)
        keys = self.group_keys(direction, layout, owner)[: x.shape[1]]
        acc = self._pending.get(keys)
        if acc is None:
            if any(k in self._pending_keys() for k in keys):  # overlapping tuples: fold first
                self._fold()
            # start from the accumulated values, so the float64 sums add in the same order as
            # one group at a time would
            acc = [torch.stack([torch.as_tensor(self._acc.get(k, [0.0, 0.0])[i],
                                                dtype=torch.float64, device=x.device)
                                for k in keys]) for i in (0, 1)]
            self._pending[keys] = acc
        acc[0] = acc[0] + rho.double()
        acc[1] = acc[1] + valid.double()

    def _pending_keys(self) -> set[str]:
        return {k for keys in self._pending for k in keys}

    def _fold(self) -> None:
        """Moves the pending vectors into ``_acc`` (0-d device tensors: no host sync)."""
        for keys, (total, count) in self._pending.items():
            for i, key in enumerate(keys):
                self._acc[key] = [total[i], count[i]]
        self._pending.clear()

    def step(self) -> None:
        """Advances the schedule one step; every ``update_every`` steps all-reduces the table
        statistics (a collective: every rank must call it at the same step)."""
        self.iteration += 1
        self.version += 1  # the schedule's bound may move
        self.non_finite.poll()
        if self.table_wise and self.iteration % self.update_every == 0:
            self._update()

    def _update(self) -> None:
        self._fold()
        keys = sorted(self._acc)
        if not keys:
            return
        device = torch.device("cpu")
        if dist.is_initialized() and dist.get_backend(self.process_group) == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        acc = torch.tensor([[float(self._acc[k][0]), float(self._acc[k][1])] for k in keys],
                           dtype=torch.float64, device=device)
        if dist.is_initialized() and dist.get_world_size(self.process_group) > 1:
            dist.all_reduce(acc, group=self.process_group)
        for key, (total, count) in zip(keys, acc.tolist()):
            if count > 0:
                rho = total / count
                old = self._rho.get(key)
                self._rho[key] = rho if old is None else 0.5 * (old + rho)
            self._acc[key] = [0.0, 0.0]
        for direction in _DIRECTIONS:
            mine = {k: v for k, v in self._rho.items() if k.startswith(direction + ":")}
            if not mine:
                continue
            ref = statistics.median(mine.values())
            for key, rho in mine.items():
                scale = 1.0 if rho <= 0 else min(1.0, ref / rho)
                self._scale[key] = max(self.min_table_scale, scale)
        self._changed()

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Plain Python (JSON-able): the step, per-table statistics and scales, and the
        statistics accumulated since the last update (so a resumed run is exact)."""
        self._fold()
        return {
            "iteration": self.iteration,
            "acc": {k: [float(v[0]), float(v[1])] for k, v in sorted(self._acc.items())},
            "rho": dict(sorted(self._rho.items())),
            "scale": dict(sorted(self._scale.items())),
            "config": self._config(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores :meth:`state_dict`; raises ValueError (and changes nothing) when it is
        malformed or was saved by a policy with other settings."""
        try:
            iteration = int(state["iteration"])
            acc = {str(k): [float(v[0]), float(v[1])] for k, v in state["acc"].items()}
            rho = {str(k): float(v) for k, v in state["rho"].items()}
            scale = {str(k): float(v) for k, v in state["scale"].items()}
            config = dict(state["config"])
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ValueError(f"not an ErrorBoundPolicy state_dict: {e!r}") from e
        if config != self._config():
            raise ValueError(f"policy state saved with settings {config}, this policy has "
                             f"{self._config()}")
        self.iteration, self._acc, self._rho, self._scale = iteration, acc, rho, scale
        self._pending.clear()
        self._registered.clear()  # re-registering adds keys the state may lack
        self._changed()

    def _config(self) -> dict[str, Any]:
        return {"rel_error_bound": self.rel_error_bound,
                "final_rel_error_bound": self.final_rel_error_bound,
                "decay_steps": self.decay_steps, "backward_scale": self.backward_scale,
                "table_wise": self.table_wise, "min_table_scale": self.min_table_scale,
                "update_every": self.update_every, "stats_every": self.stats_every}


def _group_key(layout: _Layout, owner: int, group: int) -> str:
    return f"{layout.name}:{owner}:{group}"


class ErrorBoundedCommCodec:
    """A TorchRec ``QuantizedCommCodec`` for the pooled all-to-all (one direction).

    ``encode``/``decode`` follow TorchRec's call order (``create_context``, ``padded_size``,
    ``encode``, ``calc_quantized_size``, ``decode``); the wire dtype is ``torch.uint8``.
    Use :func:`error_bounded_qcomm_codecs` rather than building these by hand.
    """

    def __init__(self, policy: ErrorBoundPolicy, direction: str, block_dim: int | None,
                 layouts: dict[int, _Layout | None], check_finite: bool = True,
                 impl: str | None = None) -> None:
        if direction not in _DIRECTIONS:
            raise ValueError(f"direction must be one of {_DIRECTIONS}, got {direction!r}")
        self.policy = policy
        self.direction = direction
        self.block_dim = block_dim
        self.check_finite = check_finite
        self.impl = impl  # None: compiled ops where built, else the torch-op reference
        self._layouts = layouts  # shared by the pair: forward decode -> backward encode
        self._layout_of: dict[tuple[tuple[int, ...], int, int], _Layout] = {}
        self._last: tuple[int, _Layout | None, _Plan | None] = (-1, None, None)

    @property
    def quantized_dtype(self) -> torch.dtype:
        return torch.uint8

    def create_context(self) -> ErrorBoundedContext:
        return ErrorBoundedContext()

    def padded_size(self, input_tensor: Tensor, dim_per_rank: list[int], my_rank: int,
                    qcomm_ctx: ErrorBoundedContext) -> tuple[int, int]:
        rows = input_tensor.shape[0]
        world = len(dim_per_rank)
        if rows % world:
            raise ValueError(f"lossy comms: {rows} rows over {world} ranks; the codec needs the "
                             "same batch size on every rank")
        qcomm_ctx.layout = self._layout(tuple(dim_per_rank), my_rank, rows // world)
        self.policy.register(qcomm_ctx.layout)
        cols = input_tensor.shape[1] if input_tensor.dim() == 2 else dim_per_rank[my_rank]
        return cols, 0

    def _layout(self, dims: tuple[int, ...], rank: int, batch: int) -> _Layout:
        # one object per layout: the plan lookups compare it by identity
        got = self._layout_of.get((dims, rank, batch))
        if got is not None:
            return got
        nonzero = [d for d in dims if d]
        block = self.block_dim or (math.gcd(*nonzero) if nonzero else 1)
        bad = [d for d in dims if d % block]
        if bad:
            raise ValueError(f"lossy comms: block_dim {block} does not divide the per-rank "
                             f"embedding dims {list(dims)}; set block_dim to the embedding dim "
                             "(or a divisor of every table's dim)")
        got = self._layout_of[(dims, rank, batch)] = _Layout(dims, rank, batch, block)
        return got

    # -------------------------------------------------------------- sizes

    def _plan(self, layout: _Layout) -> _Plan:
        """The layout's plan at the widths in force: the last one while the policy's state has
        not changed, else from the policy's cache (kept across steps while the bound is the
        same), else derived."""
        policy = self.policy
        version, last_layout, plan = self._last
        if version == policy.version and last_layout is layout:
            return plan  # type: ignore[return-value]
        key = ("plan", self.direction, layout, policy.iteration_bound(self.direction))
        plan = policy._bits_cache.get(key)
        if plan is None:
            plan = self._derive_plan(layout)
            policy._cache(key, plan)
        self._last = (policy.version, layout, plan)
        return plan

    def _derive_plan(self, layout: _Layout) -> _Plan:
        bits = [self.policy.bits(self.direction, layout, owner) for owner in range(layout.world)]
        widths = tuple(_check_widths(b) for b in bits)
        encoded = tuple(encoded_bytes(w, layout.batch * layout.block) for w in widths)
        sizes: dict[int, int] = {}
        for owner, d in enumerate(layout.dims):
            length = layout.batch * d
            sizes[length] = max(sizes.get(length, 0), encoded[owner])
        padded = tuple(sizes[layout.batch * d] for d in layout.dims)
        runs: list[tuple[int, int]] = []
        for owner in range(layout.world):
            if runs:
                first, count = runs[-1]
                if layout.dims[first] == layout.dims[owner] and bits[first] == bits[owner]:
                    runs[-1] = (first, count + 1)
                    continue
            runs.append((owner, 1))
        return _Plan(widths, encoded, padded, sizes, tuple(runs))

    def calc_quantized_size(self, input_len: int, ctx: ErrorBoundedContext | None = None) -> int:
        layout = self._require(ctx)
        sizes = self._plan(layout).sizes
        got = sizes.get(input_len)
        if got is None:
            raise ValueError(f"lossy comms: a chunk of {input_len} values does not match the "
                             f"all-to-all layout (dims {list(layout.dims)}, batch "
                             f"{layout.batch}: lengths {sorted(sizes)})")
        return got

    def _require(self, ctx: ErrorBoundedContext | None) -> _Layout:
        if ctx is None or ctx.layout is None:
            raise ValueError("lossy comms: no all-to-all layout in the context; the codec works "
                             "in TorchRec's pooled all-to-all (asynchronous collectives), which "
                             "calls padded_size before encode")
        return ctx.layout

    # -------------------------------------------------------------- encode / decode

    def _encode_chunks(self, x: Tensor, layout: _Layout, owner: int, chunks: int,
                       padded: int) -> Tensor:
        """``x``: ``chunks`` row blocks of ``[batch, dims[owner]]`` (any shape of that many
        values) -> ``[chunks * padded]``."""
        g, k, b = layout.groups(owner), layout.block, layout.batch
        rows = x.reshape(chunks, b, g * k)  # group j: columns [j*k, (j+1)*k) of every row
        if self.policy.wants_stats():
            grouped = rows.reshape(chunks, b, g, k).permute(0, 2, 1, 3).reshape(chunks, g, b * k)
            self.policy.observe(self.direction, layout, owner, grouped)
        plan = self._plan(layout)
        data = _encode_blocks_checked(rows, plan.widths[owner], k, padded, self.check_finite,
                                      self.policy.non_finite, plan.impl(self.impl, x.device))
        return data.view(-1)

    def _decode_chunks(self, data: Tensor, layout: _Layout, owner: int, chunks: int,
                       padded: int, out: Tensor | None = None) -> Tensor:
        """``chunks * padded`` bytes -> ``[chunks, batch, dims[owner]]`` flat, as TorchRec lays
        it out (into ``out``, flat, when given)."""
        plan = self._plan(layout)
        if data.numel() != chunks * padded:
            raise ValueError(f"lossy comms: received {data.numel()} bytes for {chunks} chunks "
                             f"of {padded}")
        values = _decode_blocks_checked(data.reshape(chunks, padded), layout.batch, layout.block,
                                        plan.widths[owner], plan.encoded[owner],
                                        plan.impl(self.impl, data.device), out)
        return values.view(-1)

    def encode(self, input_tensor: Tensor, ctx: ErrorBoundedContext | None = None) -> Tensor:
        if input_tensor.dtype != torch.float32:
            raise TypeError(f"lossy comms encodes float32 tensors, got {input_tensor.dtype}")
        if self.direction == "forward":
            layout = self._require(ctx)
            me = layout.rank
            return self._encode_chunks(input_tensor, layout, me, layout.world,
                                       self._plan(layout).padded[me])
        # backward: TorchRec passes a fresh context; the forward decode left the layout
        if ctx is None:
            raise ValueError("lossy comms: backward encode needs a context")
        numel = input_tensor.numel()
        layout = self._layouts.get(numel, "missing")  # type: ignore[arg-type]
        if layout == "missing" or layout is None:
            why = ("two pooled all-to-alls with this size but different per-rank dims ran; give "
                   "each sharder its own registry" if layout is None else
                   "no forward pooled all-to-all of this size was decoded")
            raise ValueError(f"lossy comms: backward encode of {numel} values: {why}")
        ctx.layout = layout
        plan = self._plan(layout)
        # one encode per run of ranks with the same dims and widths (with statistics due, one
        # per rank: they are kept per rank's tables); a single run needs no concatenation
        runs = plan.runs if not self.policy.wants_stats() else tuple(
            (owner, 1) for owner in range(layout.world))
        if len(runs) == 1:
            first, count = runs[0]
            return self._encode_chunks(input_tensor, layout, first, count, plan.padded[first])
        x = input_tensor.reshape(-1)
        parts, offset = [], 0
        for first, count in runs:
            n = count * layout.batch * layout.dims[first]
            parts.append(self._encode_chunks(x[offset: offset + n], layout, first, count,
                                             plan.padded[first]))
            offset += n
        return torch.cat(parts) if parts else x.new_empty(0, dtype=torch.uint8)

    def decode(self, input_grad: Tensor, ctx: ErrorBoundedContext | None = None) -> Tensor:
        layout = self._require(ctx)
        plan = self._plan(layout)
        if self.direction == "backward":  # from every rank: [batch, my dims], my widths
            me = layout.rank
            return self._decode_chunks(input_grad, layout, me, layout.world, plan.padded[me])
        # forward: from each rank r its [batch, dims[r]] chunk; one decode per run of ranks
        # with the same dims and widths, side by side into one buffer (no concatenation pass)
        if len(plan.runs) == 1:
            first, count = plan.runs[0]
            out = self._decode_chunks(input_grad, layout, first, count, plan.padded[first])
        else:
            data = input_grad.reshape(-1)
            out = data.new_empty(layout.batch * sum(layout.dims), dtype=torch.float32)
            offset, at = 0, 0
            for first, count in plan.runs:
                size, n = count * plan.padded[first], count * layout.batch * layout.dims[first]
                self._decode_chunks(data[offset: offset + size], layout, first, count,
                                    plan.padded[first], out=out[at: at + n])
                offset += size
                at += n
        total = out.numel()
        # the backward of this all-to-all encodes a gradient of the same length and layout
        seen = self._layouts.get(total, "missing")  # type: ignore[arg-type]
        if seen is not layout:
            if seen == "missing" or seen == layout:
                self._layouts[total] = layout
            else:
                self._layouts[total] = None  # ambiguous: the backward encode says so
        return out


def error_bounded_qcomm_codecs(
    rel_error_bound: float | None = None,
    *,
    final_rel_error_bound: float | None = None,
    decay_steps: int = 0,
    block_dim: int | None = None,
    table_wise: bool = True,
    policy: ErrorBoundPolicy | None = None,
    comm_ops: Sequence[CommOp] | None = None,
    check_finite: bool = True,
    codec_impl: str | None = None,
) -> dict[str, QuantizedCommCodecs]:
    """A qcomms registry (TorchRec's ``get_qcomm_codecs_registry`` shape) whose pooled
    all-to-all sends error-bounded quantised embeddings and gradients.

    Args:
        rel_error_bound: the largest bound, relative to each table's value range (e.g. 0.05).
        final_rel_error_bound / decay_steps: the iteration schedule (see ErrorBoundPolicy).
        block_dim: columns per group; set it to the embedding dim so a group is one feature
            (default: the gcd of the per-rank dims, which may span several features).
        table_wise: per-table adaptation of the bound.
        policy: an existing policy (shared with another registry); then the bound arguments
            must be left out.
        comm_ops: only ``[CommOp.POOLED_EMBEDDINGS_ALL_TO_ALL]`` (the default) is supported.
        check_finite: reject NaN/inf with a ValueError (on CUDA without a host sync: raised by
            a later encode or ``policy.step()``; see the module docstring).
        codec_impl: ``"compiled"`` (the torchrec_tt ops), ``"reference"`` (torch ops) or None
            (compiled where built; ``TORCHREC_TT_LOSSY_CODEC`` overrides).

    Returns ``{"POOLED_EMBEDDINGS_ALL_TO_ALL": QuantizedCommCodecs(forward, backward)}``; pass
    it as ``qcomm_codecs_registry=`` to a sharder, and call ``lossy_policy(registry).step()``
    once per training step on every rank.
    """
    if policy is None:
        if rel_error_bound is None:
            raise ValueError("give rel_error_bound (or an ErrorBoundPolicy as policy=)")
        policy = ErrorBoundPolicy(rel_error_bound, final_rel_error_bound, decay_steps,
                                  table_wise=table_wise)
    elif rel_error_bound is not None or final_rel_error_bound is not None or decay_steps:
        raise ValueError("give either policy= or the bound arguments, not both")
    if not isinstance(policy, ErrorBoundPolicy):
        raise TypeError(f"policy must be an ErrorBoundPolicy, got {type(policy).__name__}")
    if codec_impl is not None and codec_impl not in IMPLEMENTATIONS:
        raise ValueError(f"codec_impl must be one of {IMPLEMENTATIONS} or None, got "
                         f"{codec_impl!r}")
    if block_dim is not None and (not isinstance(block_dim, int) or block_dim < 1):
        raise ValueError(f"block_dim must be an int >= 1, got {block_dim!r}")
    ops = list(comm_ops) if comm_ops is not None else [CommOp.POOLED_EMBEDDINGS_ALL_TO_ALL]
    unsupported = [op.name for op in ops if op != CommOp.POOLED_EMBEDDINGS_ALL_TO_ALL]
    if unsupported:
        raise ValueError(f"lossy comms supports only POOLED_EMBEDDINGS_ALL_TO_ALL, got "
                         f"{unsupported}")
    layouts: dict[int, _Layout | None] = {}
    return {
        op.name: QuantizedCommCodecs(
            forward=ErrorBoundedCommCodec(policy, "forward", block_dim, layouts, check_finite,
                                          codec_impl),
            backward=ErrorBoundedCommCodec(policy, "backward", block_dim, layouts, check_finite,
                                           codec_impl),
        )
        for op in ops
    }


def lossy_policy(registry: Mapping[str, QuantizedCommCodecs]) -> ErrorBoundPolicy:
    """The policy behind a registry from :func:`error_bounded_qcomm_codecs`."""
    for codecs in registry.values():
        if isinstance(codecs.forward, ErrorBoundedCommCodec):
            return codecs.forward.policy
    raise ValueError("the registry holds no error-bounded codec")
