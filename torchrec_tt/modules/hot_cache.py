"""Hot-row cache of a TT table (TT-Rec's "caching strategies for embedding vector lookups").

A TT table with ``tt_cache_rows = K > 0`` keeps its ``K`` most frequently looked-up ids in a
dense ``K x D`` slab (``cache_weight``, a parameter trained like an uncompressed table, by the
collection's fused optimizer when it has one); every other id goes through the TT op. The pieces,
all buffers of the table (so in its state_dict and DCP checkpoints):

* ``cache_ids`` ``[K]`` (int64): the id each slot holds, ``-1`` for an empty slot. Slots are
  stable: an id keeps its slot (and its optimizer state) for as long as it stays cached.
* ``cache_sorted_ids`` / ``cache_sorted_slots`` ``[K]``: the id -> slot map, as the cached ids in
  ascending order and their slots; a lookup is a ``torch.searchsorted`` (``O(log K)`` per id,
  ``O(K)`` memory, same code on CPU and CUDA). A dense ``[num_embeddings]`` map would cost as much
  memory as a column of the uncompressed table, which the TT table exists to avoid.
* ``cache_cand_ids`` / ``cache_cand_counts`` ``[2K]``: the frequency counts, kept for a bounded
  set of candidate ids (Space-Saving heavy hitters: when the candidate set is full, a new id
  enters with the smallest count there plus its own, and the ``2K`` largest counts stay; ties go
  to the smaller id). While fewer than ``2K`` distinct ids were seen the counts are exact. Counts
  are multiplied by ``tt_cache_decay`` at every refresh (LFU with exponential decay).
* ``cache_step`` (int64 scalar): training forwards seen, which schedules the refreshes. The
  schedule reads a host-side copy of it (``host_step``), so a training forward reads no device
  memory for it (on a GPU, a host sync per cached table and step); the buffer stays the source
  of truth (checkpoints save it).

The slab's gradient is dense (``[K, D]``, from ``embedding_bag``), and the fused optimizer
updates it as it does a core (its state buffers ``cache_weight_<state>`` have the slab's
leading dimension): rows without a lookup get a zero gradient, which SGD and Adagrad turn into
no change; Adam's moments still move them, as dense Adam does. A torch optimizer over
``parameters()`` trains the slab too, but its state does not follow a slot to its next row.

Schedule: a forward in training mode counts its ids (every occurrence counts 1, weights play no
part). At the start of every ``tt_cache_refresh_steps``-th training forward (when the previous
step's backward and fused update are done) the cache is refreshed: the ``K`` ids with the largest
counts (count > 0) become the cached set. Evicted rows are written back into TT, then admitted
rows are copied from TT into their slots (their fused-optimizer state zeroed), so the model's
value of every row is unchanged by a refresh, up to the write-back's error (below) and its side
effect on uncached rows. Eval-mode forwards only look up.

Write-back (exact where the rank allows it at a bounded cost to the other rows): row ``i`` of a
TT table, viewed as a ``[Q', q_K]`` matrix (``Q' = q_1 ... q_{K-1}``), is ``P_i @ G_K[i_K]``,
where ``P_i`` is the product of the first ``K-1`` core slices and ``G_K[i_K]`` the ``[r, q_K]``
slice of the last core at the row's last digit. For the evicted rows sharing a last digit ``j``
the write-back changes ``G_K[j]`` only (a float64 solve per slice): the fit of the evicted rows
to their slab rows, traded against the change of every row sharing the slice (a TT table has no
private storage per row, so other uncached rows of a changed slice move; cached ones are served
from the slab and do not). It takes the exact fit (to ~1e-5 relative: float32 cores, a 1e-6
weight on the other rows) when one exists (``n_j * Q' <= r`` independent rows, e.g. 2 cores,
D=16, q=(4,4), R=32: 8 rows per digit) and moves the other rows by at most
``WRITEBACK_MAX_MOVED_PER_RESTORED`` times what it restores; otherwise a damped fit (see
``write_back``). ``CacheRefreshStats.writeback_error`` reports the
largest relative error of an evicted row after the refresh. (An undamped exact fit of nearly
singular rows made training diverge in the tests' 3-core rank-4 table.)

Sharded (``torchrec_tt.sharding``): data_parallel and table_wise tables keep the cache with the
rank(s) that hold the table and give the unsharded module's result on the union of the ranks'
batches. A table-wise owner sees every rank's ids of its table (TorchRec's KJT all-to-all) and
counts, refreshes and trains its slab alone; data-parallel replicas gather the ids of all ranks
before counting (one all-gather per step), so every replica holds the same counts, refreshes
alike and averages its slab gradient like a core's. Column-wise tables refuse the cache.

Not supported with the cache (each raises naming the table): column-wise sharding, the
quantized inference module; the cached forward runs in eager mode only (TorchScript,
``torch.fx`` and ``torch.export`` take the collection without a cache).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from torchrec_tt.reference import _row_digits
from torchrec_tt.shapes import TTShape

__all__ = ["CACHE_BUFFERS", "CacheRefreshStats", "CachedLookupLayout", "add_cache_buffers",
           "cache_buffer_specs", "cache_slots", "cached_pooled", "count_ids", "host_step", "record_ids",
           "refresh_cache", "refresh_due", "refuse_hot_cache", "reset_cache", "tt_rows", "write_back"]

#: Candidate ids counted per cached row.
CANDIDATES_PER_ROW = 2
#: Weights (relative to an evicted row's error) of the other rows' change that the write-back
#: tries in turn, per core slice (see ``write_back``).
WRITEBACK_WEIGHTS = (1e-6, 1e-4, 1e-2, 1.0)
#: How much (squared norm) the write-back may move the other rows of a core slice per unit of
#: squared error it removes from the evicted rows. Evicted rows were among the most frequent, the
#: others are mostly rarer, so a ratio above 1 still pays. Exact fits measured 1.7-3.1 for
#: single rows and up to ~10 for two rows on a slice (2 cores, R=32, D=16: the tests' table "a"),
#: 8-260 for nearly singular ones (3 cores, R=4, D=8), which made training diverge undamped.
WRITEBACK_MAX_MOVED_PER_RESTORED = 10.0


def refuse_hot_cache(configs: list, what: str, reason: str) -> None:
    """Raises ``ValueError`` naming the tables of ``configs`` with a hot-row cache, for a path
    (``what``) that does not support it, and why."""
    cached = [c.name for c in configs if getattr(c, "tt_cache_rows", 0) > 0]
    if cached:
        raise ValueError(
            f"{what} does not support the hot-row cache (tt_cache_rows > 0) of TT tables "
            f"{cached}: {reason}; build those tables with tt_cache_rows=0"
        )


@dataclass(frozen=True)
class CacheRefreshStats:
    """What one refresh of one table did."""

    admitted: int
    evicted: int
    cached: int
    #: Largest ``||row_after - slab_row|| / ||slab_row||`` over the evicted rows (0 if none).
    writeback_error: float


#: The cache's buffers (besides the ``cache_weight`` slab), in state-dict order.
CACHE_BUFFERS = ("cache_ids", "cache_sorted_ids", "cache_sorted_slots", "cache_cand_ids",
                 "cache_cand_counts", "cache_step")


def cache_buffer_specs(rows: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shape and dtype of each of ``CACHE_BUFFERS`` for a cache of ``rows`` rows."""
    cand = CANDIDATES_PER_ROW * rows
    return {
        "cache_ids": ((rows,), torch.int64),
        "cache_sorted_ids": ((rows,), torch.int64),
        "cache_sorted_slots": ((rows,), torch.int64),
        "cache_cand_ids": ((cand,), torch.int64),
        "cache_cand_counts": ((cand,), torch.float32),
        "cache_step": ((), torch.int64),
    }


def add_cache_buffers(table: nn.Module, rows: int, dim: int, device: torch.device | None) -> None:
    """Registers the slab parameter and the cache buffers (an empty cache) on a TT table module."""
    table.register_parameter("cache_weight", nn.Parameter(torch.zeros(rows, dim, device=device)))
    for name, (shape, dtype) in cache_buffer_specs(rows).items():
        table.register_buffer(name, torch.empty(shape, dtype=dtype, device=device))
    reset_cache(table)  # (also on meta: the ops only propagate shapes there)


@torch.no_grad()
def reset_cache(table: nn.Module) -> None:
    """Empties the cache (no id cached, no counts)."""
    table.cache_weight.zero_()
    table.cache_ids.fill_(-1)
    table.cache_sorted_ids.fill_(-1)
    table.cache_sorted_slots.copy_(torch.arange(table.cache_ids.numel(), device=table.cache_ids.device))
    table.cache_cand_ids.fill_(-1)
    table.cache_cand_counts.zero_()
    step = table.cache_step
    step.zero_()
    _set_mirror(table, step, 0)


def cache_slots(table: nn.Module, ids: Tensor) -> Tensor:
    """The slab slot of each id, ``-1`` where it is not cached."""
    sorted_ids: Tensor = table.cache_sorted_ids
    ids = ids.long()
    pos = torch.searchsorted(sorted_ids, ids).clamp_(max=sorted_ids.numel() - 1)
    hit = sorted_ids[pos] == ids
    return torch.where(hit, table.cache_sorted_slots[pos], torch.full_like(ids, -1))


def _set_mirror(table: nn.Module, step_buffer: Tensor, step: int) -> None:
    """Sets the table's ``_cache_step_mirror``, ``[buffer, its _version, step]`` (a plain
    attribute: not in the state dict), to ``step`` for ``step_buffer`` as it is now."""
    mirror = table.__dict__.get("_cache_step_mirror")
    if mirror is None:  # (first set by reset_cache; or a module pickled before it existed)
        mirror = table.__dict__["_cache_step_mirror"] = [None, -1, 0]
    mirror[0], mirror[1], mirror[2] = step_buffer, step_buffer._version, step


def _current_mirror(table: nn.Module, step_buffer: Tensor) -> list | None:
    """The table's mirror if it still copies ``step_buffer`` as it is now, else None."""
    mirror = table.__dict__.get("_cache_step_mirror")
    if mirror is not None and mirror[0] is step_buffer and mirror[1] == step_buffer._version:
        return mirror
    return None


def host_step(table: nn.Module) -> int:
    """The table's ``cache_step``, from its host-side mirror where that is current, else read
    from the buffer (a host sync on a GPU) and mirrored.

    The mirror holds the buffer it copies and the buffer's version counter then (torch bumps a
    tensor's version at every in-place write, through views and ``detach()`` too: ``record_ids``,
    ``reset_cache``, ``load_state_dict``'s copy, ``torch.distributed.checkpoint``'s load, a
    broadcast); moving or copying the module (``.to``, ``to_empty``, ``deepcopy``,
    ``load_state_dict(assign=True)``) puts another tensor there. Either way the buffer is read
    again, so the mirror cannot go stale except by a write through ``.data``, which has a version
    counter of its own. ``record_ids`` advances the mirror with its own ``add_(1)``."""
    buf: Tensor = table._buffers["cache_step"]  # type: ignore[assignment]
    mirror = _current_mirror(table, buf)
    if mirror is not None:
        return mirror[2]
    step = int(buf)
    _set_mirror(table, buf, step)
    return step


def refresh_due(table: nn.Module, refresh_steps: int) -> bool:
    """Whether the next training forward starts with a refresh (from ``host_step``: no device
    read unless the step buffer was written or replaced since the last one)."""
    step = host_step(table)
    return step > 0 and step % refresh_steps == 0


@torch.no_grad()
def record_ids(table: nn.Module, ids: Tensor) -> None:
    """What a training forward adds to a table's cache: the counts of its ids and one step."""
    count_ids(table, ids)
    buf: Tensor = table._buffers["cache_step"]  # type: ignore[assignment]
    mirror = _current_mirror(table, buf)
    buf.add_(1)
    if mirror is not None:  # advance with the buffer; else stale, for host_step to read again
        mirror[1], mirror[2] = buf._version, mirror[2] + 1


class CachedLookupLayout:
    """What ``cached_pooled`` needs that depends only on the table layout, built once by the
    collection or lookup, so that a step does only what depends on its batch.

    ``position_tables[f]``: the table of feature position ``f``; ``mean_tables[t]``: whether
    table ``t`` pools by MEAN; ``dims[f]``: the width of position ``f``; ``cached_tables``: the
    tables with a cache (the keys of ``cached_pooled``'s ``caches``)."""

    def __init__(self, position_tables: Sequence[int], mean_tables: Sequence[bool],
                 dims: Sequence[int], cached_tables: Sequence[int]) -> None:
        if len(position_tables) != len(dims):
            raise ValueError(f"{len(position_tables)} feature positions but {len(dims)} dims")
        self.position_tables = list(position_tables)
        self.cached_tables = list(cached_tables)
        position_mean = [bool(mean_tables[t]) for t in position_tables]
        self._position_mean = position_mean
        self.any_mean = any(position_mean)
        self.all_mean = all(position_mean)
        #: Each cached table's feature positions.
        self.positions: dict[int, list[int]] = {
            t: [j for j, pt in enumerate(position_tables) if pt == t] for t in cached_tables
        }
        # The output's column blocks in position order: (j, 0) for the slab block of a cached
        # table's position j, (-1, width) for a run of positions without a cache (one zero block).
        cached = set(cached_tables)
        pieces: list[tuple[int, int]] = []
        for j, (t, d) in enumerate(zip(position_tables, dims)):
            if t in cached:
                pieces.append((j, 0))
            elif pieces and pieces[-1][0] < 0:
                pieces[-1] = (-1, pieces[-1][1] + d)
            else:
                pieces.append((-1, d))
        self.pieces = pieces
        self._device_tensors: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def device_tensors(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """``position_tables`` and each position's MEAN flag as tensors on ``device`` (made on
        the first call per device: on a GPU each is a host-to-device copy)."""
        got = self._device_tensors.get(device)
        if got is None:
            got = (torch.tensor(self.position_tables, dtype=torch.int64, device=device),
                   torch.tensor(self._position_mean, dtype=torch.bool, device=device))
            self._device_tensors[device] = got
        return got


def cached_pooled(
    values: Tensor,
    offsets: Tensor,
    weights: Tensor | None,
    dtype: torch.dtype,
    layout: CachedLookupLayout,
    caches: Mapping[int, nn.Module],
    tt_sum: Callable[[Tensor, Tensor, Tensor], Tensor],
    slabs: Mapping[int, Tensor] | None = None,
) -> tuple[Tensor, dict[int, Tensor]]:
    """Pooled lookups ``[B, sum(dims)]`` of a table-batched bag layout with hot-row caches.

    ``values`` / ``offsets`` / ``weights``: the op's flat layout (``F * B`` bags, feature-major);
    ``layout``: the positions' tables, MEAN flags and widths (``CachedLookupLayout``);
    ``caches``: table -> the module holding its cache buffers (the layout's cached tables). Each
    cached table's ids found in its slab are pooled from it with ``embedding_bag`` (per-sample
    weights kept; MEAN divides by the full bag length); the other ids go to
    ``tt_sum(values, offsets, per_sample_weights)``, the TT op over all tables with SUM pooling
    (weights pre-divided by the full bag length for MEAN tables), and the two are added.
    ``slabs``: the tensor to pool each cached table's hits from (default: its ``cache_weight``;
    a sharded lookup passes a view that routes the gradient). Returns the pooled values and each
    cached table's ids (for ``record_ids``; nothing is counted here)."""
    dev = values.device
    pos_table, pos_mean = layout.device_tensors(dev)
    nbags = offsets.numel() - 1
    batch = nbags // len(layout.position_tables)
    lengths = (offsets[1:] - offsets[:-1]).long()
    bag_of = torch.repeat_interleave(
        torch.arange(nbags, device=dev), lengths, output_size=values.numel()
    )
    pos_of = bag_of // batch if batch > 0 else bag_of
    table_of = pos_table[pos_of]
    w = weights if weights is not None else torch.ones(values.numel(), dtype=dtype, device=dev)
    if w.dtype == dtype and not layout.any_mean:  # what the where below gives, without it
        scale = w
    elif w.dtype == dtype and layout.all_mean:
        scale = w / lengths.clamp(min=1).to(dtype)[bag_of]
    else:
        scale = torch.where(pos_mean[pos_of], w / lengths.clamp(min=1).to(dtype)[bag_of], w)
    hit = torch.zeros(values.numel(), dtype=torch.bool, device=dev)
    blocks: dict[int, Tensor] = {}
    seen: dict[int, Tensor] = {}
    for t, table in caches.items():
        idx = torch.nonzero(table_of == t).squeeze(1)
        ids = values[idx]
        slots = cache_slots(table, ids)
        found = slots >= 0
        hidx = idx[found]
        hit[hidx] = True
        counts = torch.bincount(bag_of[hidx], minlength=nbags)
        off = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
        slab = slabs[t] if slabs is not None else table.cache_weight
        pooled = torch.nn.functional.embedding_bag(
            slots[found], slab, off, mode="sum",
            per_sample_weights=scale[hidx], include_last_offset=True,
        )
        for j in layout.positions[t]:
            blocks[j] = pooled[j * batch : (j + 1) * batch]
        seen[t] = ids
    keep = ~hit
    kept = torch.bincount(bag_of[keep], minlength=nbags)
    kept_offsets = torch.cat([kept.new_zeros(1), torch.cumsum(kept, 0)]).to(offsets.dtype)
    tt_values = tt_sum(values[keep], kept_offsets, scale[keep])
    parts = [blocks[j] if j >= 0 else tt_values.new_zeros(batch, d) for j, d in layout.pieces]
    return tt_values + (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)), seen


@torch.no_grad()
def count_ids(table: nn.Module, ids: Tensor) -> None:
    """Adds one count per occurrence of each id to the table's candidate counts."""
    cand_ids: Tensor = table.cache_cand_ids
    cand_counts: Tensor = table.cache_cand_counts
    capacity = cand_ids.numel()
    if ids.numel() == 0:
        return
    uniq, counts = torch.unique(ids.long(), return_counts=True)
    counts = counts.to(cand_counts.dtype)
    valid = cand_ids >= 0
    held_ids, held_counts = cand_ids[valid], cand_counts[valid]
    if held_ids.numel() >= capacity:
        # Space-Saving: a new id may have been seen before it entered (or after it was dropped),
        # up to the smallest count kept; it enters with that much.
        new = ~torch.isin(uniq, held_ids)
        counts = torch.where(new, counts + held_counts.min(), counts)
    merged_ids, inverse = torch.unique(torch.cat([held_ids, uniq]), return_inverse=True)
    merged = torch.zeros(merged_ids.numel(), dtype=cand_counts.dtype, device=cand_counts.device)
    merged.index_add_(0, inverse, torch.cat([held_counts, counts]))  # <= 2 terms per id: exact order
    if merged_ids.numel() > capacity:
        # Stable sort on counts over ids in ascending order: ties keep the smaller id.
        keep = torch.sort(merged, descending=True, stable=True).indices[:capacity]
        keep = torch.sort(keep).values
        merged_ids, merged = merged_ids[keep], merged[keep]
    n = merged_ids.numel()
    cand_ids.fill_(-1)
    cand_counts.zero_()
    cand_ids[:n] = merged_ids
    cand_counts[:n] = merged


def _prefix(cores: list[Tensor], shape: TTShape, digits: list[Tensor]) -> Tensor:
    """``P_i`` ``[n, Q', r]``: the product of the first ``K-1`` core slices of each row."""
    full, q = shape.full_ranks, shape.q
    n = digits[0].numel()
    x = cores[0][digits[0]].reshape(n, q[0], full[1])
    for k in range(1, len(cores) - 1):
        g = cores[k][digits[k]].reshape(n, full[k], q[k] * full[k + 1])
        x = torch.bmm(x, g).reshape(n, -1, full[k + 1])
    return x


def _prefix_gram(cores: list[Tensor], shape: TTShape) -> Tensor:
    """``sum_i P_i^T P_i`` ``[r, r]`` over every prefix (every combination of the first ``K-1``
    digits), by the recursion ``M' = sum_{i,c} G_i[:, c, :]^T M G_i[:, c, :]`` (no prefix is
    materialised)."""
    full, p, q = shape.full_ranks, shape.p, shape.q
    g0 = cores[0].reshape(p[0], q[0], full[1])
    m = torch.einsum("iqr,iqs->rs", g0, g0)
    for k in range(1, len(cores) - 1):
        g = cores[k].reshape(p[k], full[k], q[k], full[k + 1])
        m = torch.einsum("ab,iacs,ibct->st", m, g, g)
    return m


def tt_rows(cores: list[Tensor], shape: TTShape, ids: Tensor) -> Tensor:
    """Rows ``[n, D]`` of the TT table at ``ids`` (no autograd graph kept by callers)."""
    digits = _row_digits(ids, shape.p)
    x = _prefix(cores, shape, digits)
    r, q_last = shape.full_ranks[-2], shape.q[-1]
    last = cores[-1].reshape(shape.p[-1], r, q_last)[digits[-1]]
    return torch.bmm(x, last).reshape(ids.numel(), -1)


def write_back(cores: list[Tensor], shape: TTShape, ids: Tensor, rows: Tensor) -> tuple[Tensor, float]:
    """A new last core with which the TT rows at (distinct) ``ids`` equal ``rows`` as closely as
    the minimum-norm change of the last core's slices allows (see the module docstring), and the
    largest relative row error left. Inputs are not modified."""
    last = cores[-1]
    if ids.numel() == 0:
        return last.clone(), 0.0
    dtype = torch.float64
    c64 = [c.detach().to(dtype) for c in cores]
    digits = _row_digits(ids, shape.p)
    x = _prefix(c64, shape, digits)  # [n, Q', r]
    n, qp, r = x.shape
    q_last = shape.q[-1]
    g = c64[-1].reshape(shape.p[-1], r, q_last)
    target = rows.detach().to(dtype).reshape(n, qp, q_last)
    j = digits[-1]
    resid = target - torch.bmm(x, g[j])  # [n, Q', q_last]
    groups, inverse, sizes = torch.unique(j, return_inverse=True, return_counts=True)
    order = torch.sort(inverse, stable=True).indices
    start = torch.cumsum(sizes, 0) - sizes
    pos = torch.empty_like(inverse)
    pos[order] = torch.arange(n, device=ids.device) - start[inverse[order]]
    width = int(sizes.max())
    a = torch.zeros(groups.numel(), width, qp, r, dtype=dtype, device=x.device)
    b = torch.zeros(groups.numel(), width, qp, q_last, dtype=dtype, device=x.device)
    a[inverse, pos] = x
    b[inverse, pos] = resid
    # Per group (slice j): min ||A dG - R||^2 + w * tr(dG^T M dG), where the second term is the
    # change of ALL rows sharing the slice (M: the Gram of every prefix, see _prefix_gram). Zero
    # padding rows add no constraint. Small w gives the exact fit where the rank allows it, the
    # one that moves the slice's other rows least; but an exact fit of a nearly singular system
    # can move them a lot, and that feeds back through later admissions. So each group takes the
    # smallest w of WRITEBACK_WEIGHTS whose fit moves the other rows by at most
    # WRITEBACK_MAX_MOVED_PER_RESTORED times what it restores of the evicted rows
    # (tr(dG^T M dG) <= c * (||R||^2 - ||A dG - R||^2)); w = 1 always passes (it minimises their
    # sum, and dG = 0 is a candidate), so the ladder ends there.
    a2 = a.reshape(groups.numel(), width * qp, r)
    b2 = b.reshape(groups.numel(), width * qp, q_last)
    gram = a2.transpose(1, 2) @ a2
    rhs = a2.transpose(1, 2) @ b2
    m = _prefix_gram(c64, shape)
    ridge = 1e-12 * m.diagonal().mean().clamp(min=1e-30) * torch.eye(r, dtype=dtype, device=x.device)
    before = b2.square().sum(dim=(1, 2))
    delta = torch.zeros_like(rhs)
    done = torch.zeros(groups.numel(), dtype=torch.bool, device=x.device)
    for w in WRITEBACK_WEIGHTS:
        d = torch.linalg.solve(gram + w * m + ridge, rhs)
        restored = before - (a2 @ d - b2).square().sum(dim=(1, 2))
        moved = torch.einsum("grq,rs,gsq->g", d, m, d)
        ok = moved <= WRITEBACK_MAX_MOVED_PER_RESTORED * restored
        take = ~done & (ok | (w == WRITEBACK_WEIGHTS[-1]))
        delta[take] = d[take]
        done |= take
    g = g.clone()
    g[groups] += delta
    new_last = g.reshape(last.shape).to(last.dtype)
    after = tt_rows([*c64[:-1], new_last.to(dtype)], shape, ids)  # as stored (in the cores' dtype)
    target_rows = target.reshape(n, -1)
    err = (after - target_rows).norm(dim=1) / target_rows.norm(dim=1).clamp(min=1e-30)
    return new_last, float(err.max())


@torch.no_grad()
def refresh_cache(
    table: nn.Module, cores: list[Tensor], shape: TTShape, decay: float,
    slab_state: list[Tensor],
) -> CacheRefreshStats:
    """Re-picks the cached ids from the counts; writes evicted rows back into the last core and
    copies admitted rows from TT. Everything is computed first and committed at the end, so an
    error leaves the table as it was. ``slab_state``: fused-optimizer buffers of the slab with a
    leading slot dimension (zeroed for admitted slots)."""
    slab: Tensor = table.cache_weight
    slots_held: Tensor = table.cache_ids
    k = slots_held.numel()
    cand_ids, cand_counts = table.cache_cand_ids, table.cache_cand_counts
    live = (cand_ids >= 0) & (cand_counts > 0)
    ids_live, counts_live = cand_ids[live], cand_counts[live]
    # Candidates are kept in ascending id order, so the stable sort breaks ties by smaller id.
    top = torch.sort(counts_live, descending=True, stable=True).indices[:k]
    chosen = torch.sort(ids_live[top]).values
    held = slots_held >= 0
    keep = held & torch.isin(slots_held, chosen)
    evict_slots = torch.nonzero(held & ~keep).squeeze(1)
    admitted = chosen[~torch.isin(chosen, slots_held[keep])]
    free_slots = torch.nonzero(~keep).squeeze(1)[: admitted.numel()]
    evicted_ids = slots_held[evict_slots]
    new_last, err = write_back(cores, shape, evicted_ids, slab[evict_slots])
    admitted_rows = tt_rows([*cores[:-1], new_last], shape, admitted).to(slab.dtype)
    new_ids = slots_held.clone()
    new_ids[evict_slots] = -1
    new_ids[free_slots] = admitted
    sorted_ids, sorted_slots = torch.sort(new_ids)
    # Commit (no step below can fail on valid buffers).
    cores[-1].copy_(new_last)
    slab[evict_slots] = 0
    slab[free_slots] = admitted_rows
    changed = torch.cat([evict_slots, free_slots])
    for s in slab_state:
        if s.dim() >= 1 and s.shape[0] == k:
            s[changed] = 0
    slots_held.copy_(new_ids)
    table.cache_sorted_ids.copy_(sorted_ids)
    table.cache_sorted_slots.copy_(sorted_slots)
    cand_counts.mul_(decay)
    return CacheRefreshStats(
        admitted=int(admitted.numel()),
        evicted=int(evict_slots.numel()),
        cached=int((new_ids >= 0).sum()),
        writeback_error=err,
    )
