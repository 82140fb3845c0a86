"""Swap the big tables of an existing TorchRec model to TT by changing configs.

Three pieces:

* :class:`TTPolicy` and :func:`swap_configs`: which tables to compress (the ``k`` largest, those
  with at least ``N`` rows, or as many as a memory budget needs) and at which ranks; returns the
  configs with the chosen tables as :class:`~torchrec_tt.TTEmbeddingBagConfig`, the rest
  untouched.
* :class:`HybridEmbeddingBagCollection`: a plain ``EmbeddingBagCollection`` for the plain tables
  and a :class:`~torchrec_tt.TTEmbeddingBagCollection` for the TT ones behind the
  ``EmbeddingBagCollectionInterface`` contract (KJT in, one ``KeyedTensor`` out, keys in the
  original table order). It drops into ``torchrec.models.dlrm.DLRM`` as the sparse arch, and
  ``DistributedModelParallel`` shards its two children with ``EmbeddingBagCollectionSharder`` and
  ``torchrec_tt.sharding.TTEmbeddingBagCollectionSharder`` (plan with
  ``torchrec_tt.sharding.plan``).
* :func:`convert_to_tt`: a trained ``EmbeddingBagCollection`` -> a hybrid collection whose TT
  tables are the TT-SVD of the trained weights (plain tables copied).

Example::

    configs = swap_configs(dlrm_tables, TTPolicy(largest=7, ranks=32))
    ebc = HybridEmbeddingBagCollection(configs)
    model = DLRM(embedding_bag_collection=ebc, dense_in_features=13, ...)
"""

# No ``from __future__ import annotations``: torch.fx copies forward's annotations into traced
# code, which TorchScript must resolve.
import dataclasses
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from torch import Tensor
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import (
    EmbeddingBagCollection,
    EmbeddingBagCollectionInterface,
    get_embedding_names_by_table,
)
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_tt.configs import TTEmbeddingBagConfig, TTInit
from torchrec_tt.modules.embedding_bag import TTEmbeddingBagCollection
from torchrec_tt.validation import check_number
from torchrec_tt.modules.mlet import (
    MLETEmbeddingBagCollection,
    collapsed_config,
    inner_config,
    is_mlet,
)

__all__ = [
    "HybridEmbeddingBagCollection",
    "TTPolicy",
    "config_bytes",
    "convert_to_tt",
    "embedding_bytes",
    "inference_bytes",
    "count_distinct_ids",
    "select_tt_tables",
    "swap_configs",
]

_DTYPE_BYTES = {
    DataType.FP32: 4,
    DataType.FP16: 2,
    DataType.BF16: 2,
    DataType.INT8: 1,
    DataType.UINT8: 1,
    DataType.INT4: 0.5,
    DataType.INT2: 0.25,
}


def config_bytes(config: EmbeddingBagConfig) -> float:
    """Bytes of one table's weights as trained: its TT cores for a TT config, ``N * D * element
    size`` else; an MLET table counts its wide table and its ``k x d`` FP32 projection."""
    if is_mlet(config):
        return config_bytes(inner_config(config)) + 4 * config.mlet_inner_dim * config.embedding_dim
    if isinstance(config, TTEmbeddingBagConfig):  # cores + the hot-row cache's FP32 slab
        return config.tt_shape().num_bytes(4) + 4 * config.tt_cache_rows * config.tt_row_dim
    return config.num_embeddings * config.embedding_dim * _DTYPE_BYTES.get(config.data_type, 4)


def embedding_bytes(configs: Sequence[EmbeddingBagConfig]) -> float:
    """Total weight bytes of a list of table configs (TT tables counted at their core size)."""
    return float(sum(config_bytes(c) for c in configs))


def inference_bytes(configs: Sequence[EmbeddingBagConfig]) -> float:
    """Total weight bytes after collapsing the MLET tables (``collapsed_config``): what an
    inference model stores."""
    return embedding_bytes([collapsed_config(c) for c in configs])


@dataclass(frozen=True)
class TTPolicy:
    """Which tables become TT, and at which ranks.

    Exactly one selector: ``largest`` (the ``k`` tables with most rows), ``min_rows`` (every table
    with at least that many rows), ``memory_budget_bytes`` (the largest tables, one after the
    other, until all embedding weights fit in the budget) or ``tables`` (by name).

    Args:
        largest: compress the ``k`` largest tables (by rows, ties by bytes then name).
        min_rows: compress every table with ``num_embeddings >= min_rows``.
        memory_budget_bytes: compress largest-first until the weights of all tables (TT cores for
            the TT tables, ``N*D*element size`` for the rest) take at most this many bytes;
            tables that TT would not make smaller are skipped.
        tables: compress exactly these tables.
        ranks: TT ranks: an int ``R`` (every inner rank ``R``), a list of inner ranks, or a
            mapping table name -> int or list (tables not in it get ``default_ranks``).
        num_cores: number of cores (2-4) when ranks are given as an int; 2 by default (the
            kernel-aware choice of ``torchrec_tt.kernel_shapes`` for large tables: 1.9-4.4× faster
            graphed Kaggle-7 steps than 3 cores on an H200 at no AUC loss, docs/benchmarks.md "v4").
        default_ranks: ranks for tables missing from a ``ranks`` mapping.
        tt_init: core initialisation of the new TT tables.
        distinct_ids: table name -> number of distinct ids actually seen (e.g. from
            :func:`count_distinct_ids` over a pass of training data, or a known count). The
            selectors then rank and threshold tables by this count instead of the nominal
            ``num_embeddings`` (tables not in it keep ``num_embeddings``), so a 10M-row table that
            holds 2,000 distinct ids is not chosen by ``largest`` or ``min_rows``.
        cache_fraction: hot-row cache of each new TT table, as a fraction of its
            ``num_embeddings`` (``tt_cache_rows = floor(fraction * N)``); 0 (default) for none.
    """

    largest: int | None = None
    min_rows: int | None = None
    memory_budget_bytes: int | None = None
    tables: Sequence[str] | None = None
    ranks: int | Sequence[int] | Mapping[str, int | Sequence[int]] = 32
    num_cores: int = 2
    default_ranks: int | Sequence[int] = 32
    tt_init: TTInit = TTInit.SAMPLED_GAUSSIAN
    distinct_ids: Optional[Mapping[str, int]] = None
    cache_fraction: float = 0.0

    def __post_init__(self) -> None:
        chosen = [
            n for n in ("largest", "min_rows", "memory_budget_bytes", "tables")
            if getattr(self, n) is not None
        ]
        if len(chosen) != 1:
            raise ValueError(
                "TTPolicy takes exactly one of largest=, min_rows=, memory_budget_bytes=, "
                f"tables=; got {chosen or 'none'}"
            )
        if self.largest is not None and (not isinstance(self.largest, int) or self.largest < 1):
            raise ValueError(f"TTPolicy(largest={self.largest!r}): must be an int >= 1")
        if self.min_rows is not None and (not isinstance(self.min_rows, int) or self.min_rows < 1):
            raise ValueError(f"TTPolicy(min_rows={self.min_rows!r}): must be an int >= 1")
        if self.memory_budget_bytes is not None and self.memory_budget_bytes <= 0:
            raise ValueError(
                f"TTPolicy(memory_budget_bytes={self.memory_budget_bytes!r}): must be > 0"
            )
        if not 2 <= self.num_cores <= 4:
            raise ValueError(f"TTPolicy(num_cores={self.num_cores}): TT tables have 2-4 cores")
        if self.distinct_ids is not None:
            if not isinstance(self.distinct_ids, Mapping):
                raise TypeError(
                    f"TTPolicy(distinct_ids=...) must map table names to counts, got "
                    f"{type(self.distinct_ids).__name__}"
                )
            bad = {k: v for k, v in self.distinct_ids.items()
                   if isinstance(v, bool) or not isinstance(v, int) or v < 0}
            if bad:
                raise ValueError(f"TTPolicy(distinct_ids=...): counts must be ints >= 0, got {bad}")
        check_number("cache_fraction", self.cache_fraction, low=0.0, high=1.0, where="TTPolicy")

    def rows_of(self, config: EmbeddingBagConfig) -> int:
        """The row count the selectors use for ``config``: its distinct ids when given, else
        ``num_embeddings``."""
        if self.distinct_ids is not None and config.name in self.distinct_ids:
            return int(self.distinct_ids[config.name])
        return config.num_embeddings

    def ranks_for(self, table_name: str) -> list[int]:
        """The inner TT ranks this policy gives ``table_name``."""
        ranks = self.ranks
        if isinstance(ranks, Mapping):
            ranks = ranks.get(table_name, self.default_ranks)
        if isinstance(ranks, int):
            return [ranks] * (self.num_cores - 1)
        return [int(r) for r in ranks]


def _check_convertible(config: EmbeddingBagConfig) -> None:
    if config.data_type != DataType.FP32:
        raise ValueError(
            f"table {config.name!r} has data_type {config.data_type}; only FP32 tables can "
            "become TT"
        )
    if config.pooling not in (PoolingType.SUM, PoolingType.MEAN):
        raise ValueError(
            f"table {config.name!r} has pooling {config.pooling}; TT tables pool with SUM or MEAN"
        )


def _to_tt_config(config: EmbeddingBagConfig, policy: TTPolicy) -> TTEmbeddingBagConfig:
    if isinstance(config, TTEmbeddingBagConfig):
        return config
    _check_convertible(config)
    base = {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(EmbeddingBagConfig)
        if f.init
    }
    if is_mlet(config):  # an MLET table stays MLET: a TT table of width k and its projection
        base["mlet_inner_dim"] = config.mlet_inner_dim
        base["mlet_init_scale"] = config.mlet_init_scale
    return TTEmbeddingBagConfig(
        **base, tt_ranks=policy.ranks_for(config.name), tt_init=policy.tt_init,
        tt_cache_rows=int(policy.cache_fraction * config.num_embeddings),
    )


def _describe(configs: Sequence[EmbeddingBagConfig]) -> str:
    return ", ".join(f"{c.name} ({c.num_embeddings:,} rows)" for c in configs)


def select_tt_tables(configs: Sequence[EmbeddingBagConfig], policy: TTPolicy) -> list[str]:
    """Names of the tables ``policy`` compresses, in ``configs`` order.

    Raises:
        ValueError: the policy selects no table, names unknown tables, or the budget cannot be
            met even with every convertible table in TT.
    """
    configs = list(configs)
    if not configs:
        raise ValueError("no table configs given")
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate table names in {names}")
    if policy.distinct_ids is not None:
        unknown = sorted(set(policy.distinct_ids) - set(names))
        if unknown:
            raise ValueError(
                f"TTPolicy(distinct_ids=...) names unknown tables {unknown}; tables: {names}"
            )
    by_size = sorted(
        configs, key=lambda c: (-policy.rows_of(c), -config_bytes(c), c.name)
    )
    chosen: set[str]
    if policy.tables is not None:
        unknown = sorted(set(policy.tables) - set(names))
        if unknown:
            raise ValueError(f"TTPolicy(tables=...) names unknown tables {unknown}; tables: {names}")
        chosen = set(policy.tables)
    elif policy.largest is not None:
        if policy.largest > len(configs):
            raise ValueError(
                f"TTPolicy(largest={policy.largest}) but there are only {len(configs)} tables"
            )
        chosen = {c.name for c in by_size[: policy.largest]}
    elif policy.min_rows is not None:
        chosen = {c.name for c in configs if policy.rows_of(c) >= policy.min_rows}
        if not chosen:
            raise ValueError(
                f"TTPolicy(min_rows={policy.min_rows:,}) selects no table: the largest is "
                f"{_describe(by_size[:1])}"
            )
    else:
        budget = policy.memory_budget_bytes
        assert budget is not None
        current = {c.name: c for c in configs}
        total = embedding_bytes(configs)
        if total <= budget:
            raise ValueError(
                f"TTPolicy(memory_budget_bytes={budget:,}) selects no table: the "
                f"{len(configs)} tables already take {total:,.0f} bytes"
            )
        chosen = set()
        for c in by_size:
            if total <= budget:
                break
            if isinstance(c, TTEmbeddingBagConfig):
                continue
            try:
                tt = _to_tt_config(c, policy)
            except ValueError:
                continue  # not convertible (dtype/pooling): stays plain
            saved = config_bytes(c) - config_bytes(tt)
            if saved <= 0:
                continue
            chosen.add(c.name)
            current[c.name] = tt
            total -= saved
        if total > budget:
            raise ValueError(
                f"TTPolicy(memory_budget_bytes={budget:,}) cannot be met: with the tables "
                f"{sorted(chosen)} in TT at their ranks the embeddings still take "
                f"{total:,.0f} bytes; lower the ranks or raise the budget"
            )
    if not chosen:
        raise ValueError(f"TT policy {policy} selects no table")
    return [n for n in names if n in chosen]


def count_distinct_ids(
    configs: Sequence[EmbeddingBagConfig], batches: Iterable[KeyedJaggedTensor]
) -> Dict[str, int]:
    """Distinct ids per table (over all its features) in ``batches``, for
    ``TTPolicy(distinct_ids=...)``. Keys of the KJTs that match no table are ignored."""
    feature_tables: Dict[str, List[str]] = {}
    for c in configs:
        for f in c.feature_names or [c.name]:
            feature_tables.setdefault(f, []).append(c.name)
    seen: Dict[str, List[Tensor]] = {c.name: [] for c in configs}
    for kjt in batches:
        for key, jt in kjt.to_dict().items():
            ids = torch.unique(jt.values())
            for t in feature_tables.get(key, []):
                # Merge as we go so memory stays at the distinct ids, not the whole pass.
                seen[t] = [torch.unique(torch.cat([*seen[t], ids]))]
    return {t: int(v[0].numel()) if v else 0 for t, v in seen.items()}


def swap_configs(
    tables: Sequence[EmbeddingBagConfig] | EmbeddingBagCollection, policy: TTPolicy
) -> list[EmbeddingBagConfig]:
    """The table configs with the tables ``policy`` selects as ``TTEmbeddingBagConfig``.

    Args:
        tables: table configs, or an ``EmbeddingBagCollection`` (its configs are used).
        policy: which tables and ranks.

    Returns:
        a new list in the same order: selected tables as ``TTEmbeddingBagConfig`` with the same
        name, size, dimension, features, pooling and init bounds; the others unchanged.
    """
    configs = (
        tables.embedding_bag_configs()
        if isinstance(tables, EmbeddingBagCollectionInterface)
        else list(tables)
    )
    chosen = set(select_tt_tables(configs, policy))
    return [_to_tt_config(c, policy) if c.name in chosen else c for c in configs]


@torch.fx.wrap
def _merge_pooled(
    first: Optional[KeyedTensor],
    second: Optional[KeyedTensor],
    third: Optional[KeyedTensor],
    first_keys: List[str],
    first_names: List[str],
    second_keys: List[str],
    second_names: List[str],
    third_keys: List[str],
    third_names: List[str],
    keys: List[str],
) -> KeyedTensor:
    """One KeyedTensor with ``keys`` from the children's outputs, looked up by key (a sharded
    child's key order follows its plan): a child's key ``*_keys[i]`` is ``*_names[i]`` in
    ``keys`` (they differ for a feature shared by tables of two children: ``f@t`` outside, ``f``
    in the child). Scriptable (flat lists: TorchScript types an empty list argument from the
    signature, but not an empty dict or nested list literal in traced code)."""
    tensors: Dict[str, Tensor] = {}
    if first is not None:
        parts = first.to_dict()
        for key, name in zip(first_keys, first_names):
            tensors[name] = parts[key]
    if second is not None:
        parts = second.to_dict()
        for key, name in zip(second_keys, second_names):
            tensors[name] = parts[key]
    if third is not None:
        parts = third.to_dict()
        for key, name in zip(third_keys, third_names):
            tensors[name] = parts[key]
    return KeyedTensor.from_tensor_list(keys, [tensors[k] for k in keys])


def _child_names(
    tables: Sequence[EmbeddingBagConfig], global_names: Mapping[str, list[str]]
) -> tuple[list[str], list[str]]:
    """A child's output keys (named over its own tables) and the parent's names for them."""
    own = get_embedding_names_by_table(list(tables)) if tables else []
    return (
        [child for names in own for child in names],
        [parent for t in tables for parent in global_names[t.name]],
    )


class HybridEmbeddingBagCollection(EmbeddingBagCollectionInterface):
    """Plain and TT tables behind one ``EmbeddingBagCollection`` contract.

    ``TTEmbeddingBagConfig`` tables go to a ``TTEmbeddingBagCollection`` (child ``tt``), MLET
    tables (``MLETEmbeddingBagConfig``, ``TTEmbeddingBagConfig(mlet_inner_dim=k)``) to a
    ``MLETEmbeddingBagCollection`` (child ``mlet``), the others to a TorchRec
    ``EmbeddingBagCollection`` (child ``ebc``); a child is ``None`` when it would hold no table. ``forward`` takes one ``KeyedJaggedTensor`` with every feature and returns
    one ``KeyedTensor`` whose keys are the feature names in the original table order.

    Under ``DistributedModelParallel`` each child is sharded by its own sharder, so pass both::

        sharders = [EmbeddingBagCollectionSharder(), TTEmbeddingBagCollectionSharder()]
        plan = torchrec_tt.sharding.plan(model, topology, batch_size, sharders=sharders)
        DistributedModelParallel(model, plan=plan, sharders=sharders)

    Both children take the whole KJT and use their own features (the others are ignored, as by
    TorchRec's EBC), so the module traces with ``torchrec.fx.symbolic_trace``,
    ``TrainPipelineSparseDist`` pipelines both sharded children, and the unsharded module scripts
    (``torch.jit.script``, also after the trace) and exports. A feature may feed several tables,
    in either child (output keys ``feature@table``, TorchRec's naming). After
    ``torchrec_tt.inference.quantize_embeddings`` or TorchRec's ``quantize_inference_model`` the
    children are quantized; TorchRec's ``quantize_embeddings`` without TT's mapping quantizes the
    plain one only, and the TT child warns then, naming its tables.

    Args:
        tables: the configs, e.g. from :func:`swap_configs`.
        is_weighted: per-sample weights (both children).
        device: where the weights live (``"meta"`` to build without memory).
        tt_fused_params: ``fused_params`` of the TT collection (its fused optimizer; the TT
            sharder keeps it when the collection is sharded).
    """

    # Each child's output keys and their names here, empty for an absent child: TorchScript
    # types an empty list attribute from the class annotations.
    _plain_keys: List[str]
    _plain_names: List[str]
    _tt_keys: List[str]
    _tt_names: List[str]
    _mlet_keys: List[str]
    _mlet_names: List[str]
    _embedding_names: List[str]

    def __init__(
        self,
        tables: Sequence[EmbeddingBagConfig],
        is_weighted: bool = False,
        device: torch.device | str | None = None,
        tt_fused_params: Mapping[str, object] | None = None,
    ) -> None:
        super().__init__()
        #: Relative TT-SVD reconstruction error per table, set by ``convert_to_tt``.
        self.tt_conversion_errors: dict[str, float] = {}
        tables = list(tables)
        if not tables:
            raise ValueError("HybridEmbeddingBagCollection needs at least one table")
        names = [t.name for t in tables]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate table names in {names}")
        for t in tables:
            if not t.feature_names:
                t.feature_names = [t.name]  # as TorchRec's EBC does
        self._configs = tables
        self._is_weighted = is_weighted
        mlet_tables = [t for t in tables if is_mlet(t)]
        tt_tables = [t for t in tables if isinstance(t, TTEmbeddingBagConfig) and not is_mlet(t)]
        plain_tables = [
            t for t in tables if not isinstance(t, TTEmbeddingBagConfig) and not is_mlet(t)
        ]
        dev = torch.device(device) if device is not None else None
        self.ebc: Optional[EmbeddingBagCollection] = (
            EmbeddingBagCollection(plain_tables, is_weighted=is_weighted, device=dev)
            if plain_tables
            else None
        )
        self.tt: Optional[TTEmbeddingBagCollection] = (
            TTEmbeddingBagCollection(
                tt_tables, is_weighted=is_weighted, device=dev, fused_params=tt_fused_params
            )
            if tt_tables
            else None
        )
        self.mlet: Optional[MLETEmbeddingBagCollection] = (
            MLETEmbeddingBagCollection(mlet_tables, is_weighted=is_weighted, device=dev,
                                       tt_fused_params=tt_fused_params)
            if mlet_tables
            else None
        )
        # Output keys as TorchRec's EBC names them over all tables (a feature of several tables
        # is "feature@table"); each child names its keys over its own tables only.
        global_names = dict(zip(names, get_embedding_names_by_table(tables)))
        self._embedding_names = [n for t in tables for n in global_names[t.name]]
        self._plain_keys, self._plain_names = _child_names(plain_tables, global_names)
        self._tt_keys, self._tt_names = _child_names(tt_tables, global_names)
        self._mlet_keys, self._mlet_names = _child_names(mlet_tables, global_names)

    # --- EmbeddingBagCollectionInterface ----------------------------------------------------

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        return list(self._configs)

    def is_weighted(self) -> bool:
        return self._is_weighted

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """Pooled embeddings of every feature, keys in table order."""
        plain: Optional[KeyedTensor] = None
        tt: Optional[KeyedTensor] = None
        mlet: Optional[KeyedTensor] = None
        if self.ebc is not None:
            plain = self.ebc(features)
        if self.tt is not None:
            tt = self.tt(features)
        if self.mlet is not None:
            mlet = self.mlet(features)
        return _merge_pooled(
            plain, tt, mlet, self._plain_keys, self._plain_names, self._tt_keys, self._tt_names,
            self._mlet_keys, self._mlet_names, self._embedding_names,
        )

    # --- accounting -------------------------------------------------------------------------

    def tt_table_names(self) -> list[str]:
        return [t.name for t in self._configs if isinstance(t, TTEmbeddingBagConfig)]

    def memory_stats(self) -> dict[str, float]:
        """Embedding weight bytes: ``bytes`` (as built and trained: MLET tables at width ``k``
        with their projections), ``inference_bytes`` (MLET tables collapsed to width ``d``),
        ``dense_bytes`` (every table plain, FP32, width ``d``), ``compression`` (dense over
        inference bytes), ``tt_tables`` and ``mlet_tables`` (how many)."""
        dense = sum(c.num_embeddings * c.embedding_dim * 4 for c in self._configs)
        inference = inference_bytes(self._configs)
        return {
            "bytes": embedding_bytes(self._configs),
            "inference_bytes": inference,
            "dense_bytes": float(dense),
            "compression": dense / inference,
            "tt_tables": float(len(self.tt_table_names())),
            "mlet_tables": float(sum(is_mlet(c) for c in self._configs)),
        }

    @torch.no_grad()
    def collapse(
        self, device: torch.device | str | None = None, warn_above: float = 0.3
    ) -> "HybridEmbeddingBagCollection":
        """The same collection with every MLET table collapsed to one ``d``-wide table (see
        ``MLETEmbeddingBagCollection.collapse``; TT-SVD for TT tables, errors in
        ``tt_conversion_errors``); plain and TT tables are copied. Unsharded modules only."""
        if self.mlet is None:
            raise ValueError("this HybridEmbeddingBagCollection has no MLET table to collapse")
        dev = torch.device(device) if device is not None else self.mlet.device
        out = HybridEmbeddingBagCollection(
            [collapsed_config(c) for c in self._configs], is_weighted=self._is_weighted,
            device=dev,
        )
        collapsed = self.mlet.collapse(device=dev, warn_above=warn_above)
        state: dict[str, Tensor] = {}
        for prefix, child in (("ebc.", self.ebc), ("tt.", self.tt)):
            if child is not None:
                state.update({prefix + k: v for k, v in child.state_dict().items()})
        # The collapsed child's keys as children of the new hybrid (its ebc / tt, or both).
        prefix = {EmbeddingBagCollection: "ebc.", TTEmbeddingBagCollection: "tt."}.get(
            type(collapsed), ""
        )
        state.update({prefix + k: v for k, v in collapsed.state_dict().items()})
        wanted = out.state_dict()
        out.load_state_dict({k: v for k, v in state.items() if k in wanted}, strict=True)
        out.tt_conversion_errors = dict(collapsed.tt_conversion_errors)
        return out


@torch.no_grad()
def convert_to_tt(
    ebc: EmbeddingBagCollection,
    policy: TTPolicy,
    device: torch.device | str | None = None,
    warn_above: float = 0.3,
) -> HybridEmbeddingBagCollection:
    """A hybrid collection from a trained ``EmbeddingBagCollection``.

    The tables ``policy`` selects become TT tables set to the TT-SVD of the trained weights at the
    policy's ranks (the best rank-limited TT up to the SVD truncation, see
    ``torchrec_tt.initializers.tt_svd``); the other tables keep their weights exactly.

    The relative reconstruction error of every converted table is in the returned module's
    ``tt_conversion_errors`` (table name -> ``||W - TT|| / ||W||``), and a warning names each
    table above ``warn_above``. Trained embedding tables are rarely close to low TT rank (errors
    of 0.95-0.998 were seen on a trained 200k x 16 table at ranks 4-32): such a conversion keeps
    little of the table. Train the table in TT from the start (``swap_configs``), or use the
    converted model only as an initialisation and fine-tune (distil) it.
    """
    if not isinstance(ebc, EmbeddingBagCollection):
        raise TypeError(f"expected a torchrec EmbeddingBagCollection, got {type(ebc).__name__}")
    configs = swap_configs(ebc.embedding_bag_configs(), policy)
    hybrid = HybridEmbeddingBagCollection(configs, is_weighted=ebc.is_weighted(), device=device)
    errors: dict[str, float] = {}
    for cfg in configs:
        weight = ebc.embedding_bags[cfg.name].weight
        if isinstance(cfg, TTEmbeddingBagConfig):
            assert hybrid.tt is not None
            errors[cfg.name] = hybrid.tt.load_dense_weight(cfg.name, weight.detach().float())
        else:
            assert hybrid.ebc is not None
            hybrid.ebc.embedding_bags[cfg.name].weight.copy_(weight)
    hybrid.tt_conversion_errors = errors
    lossy = {n: e for n, e in errors.items() if e > warn_above}
    if lossy:
        listed = ", ".join(f"{n!r}: {e:.3f}" for n, e in lossy.items())
        warnings.warn(
            f"convert_to_tt: the TT-SVD at the policy's ranks loses much of these tables "
            f"(relative reconstruction error {listed}; warn_above={warn_above}); trained tables "
            "are rarely low TT rank: train them in TT from the start, or fine-tune the converted "
            "model",
            stacklevel=2,
        )
    return hybrid
