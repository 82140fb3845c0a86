"""MLETEmbeddingBagCollection: multi-layer embedding training (arXiv 2006.05623) for TorchRec.

Each MLET table is trained as a wide table ``E`` (``N x k``) followed by a linear map ``W``
(``d x k``): the pooled embedding of a bag is ``W @ sum_i E[i]``. Because the map is linear and
has no bias it commutes with SUM / MEAN pooling and per-sample weights, so after training the two
collapse into one ``N x d`` table ``E W^T`` with identical outputs (:meth:`collapse`): training
uses the wide table, inference stores only ``d`` columns.

The wide tables are an ordinary TorchRec ``EmbeddingBagCollection`` (child ``ebc``) and, for
``TTEmbeddingBagConfig(..., mlet_inner_dim=k)`` tables, a ``TTEmbeddingBagCollection`` of row
width ``k`` (child ``tt``); ``DistributedModelParallel`` shards them with TorchRec's
``EmbeddingBagCollectionSharder`` and ``torchrec_tt.sharding.TTEmbeddingBagCollectionSharder``
(and their fused optimizers and planner costs apply unchanged); the projections (child
``projections``) are dense parameters, replicated and all-reduced by DMP's DDP.

Initialisation and learning rates (defaults):

* ``E`` takes the config's init (TorchRec's ``uniform(+-sqrt(1/N))``, or ``tt_init`` for TT) and
  ``W`` orthonormal rows times ``mlet_init_scale`` (1.0), so each entry of the product ``E W^T``
  has the plain table's variance for every ``k``, and ``W W^T = I``: with SGD the product's first
  update ``-lr (G W W^T + E E^T G)`` is the plain table's ``-lr G`` plus a term of order
  ``lr * |E|^2`` (``G``: the gradient with respect to the product). The paper explains MLET's
  gain by the dynamics of the factorised (two-layer linear) product, whose learned tables tend to
  a lower effective rank (:func:`effective_rank` measures it) -- the effect grows with ``k``
  while this init keeps the starting point and step size of the product independent of ``k``.
* Row-wise Adagrad (TorchRec's fused optimizer for plain tables) normalises a row's step by its
  RMS gradient, so a ``k``-wide row moves ``sqrt(k)`` per step where a ``d``-wide one moves
  ``sqrt(d)``; :func:`mlet_rowwise_lr_scale` (``sqrt(d / k)``) brings the product's first step
  back to the plain table's, and the DLRM trainer applies it by default.
"""

# No ``from __future__ import annotations``: torch.fx copies forward's annotations into traced
# code and TorchScript must resolve them (the hybrid collection scripts with an MLET child).
import dataclasses
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import (
    EmbeddingBagCollection,
    EmbeddingBagCollectionInterface,
)
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_tt.configs import MLETEmbeddingBagConfig, TTEmbeddingBagConfig
from torchrec_tt.modules.embedding_bag import TTEmbeddingBagCollection

__all__ = [
    "MLETEmbeddingBagCollection",
    "MLETProjection",
    "collapsed_config",
    "effective_rank",
    "inner_config",
    "is_mlet",
    "mlet_rowwise_lr_scale",
]


def is_mlet(config: EmbeddingBagConfig) -> bool:
    """Whether a table config is trained as MLET (``mlet_inner_dim`` set)."""
    return getattr(config, "mlet_inner_dim", None) is not None


def _plain_fields(config: EmbeddingBagConfig) -> dict[str, object]:
    return {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(EmbeddingBagConfig)
        if f.init
    }


def inner_config(config: EmbeddingBagConfig) -> EmbeddingBagConfig:
    """The trained (wide) table of an MLET config: a plain ``EmbeddingBagConfig`` or a
    ``TTEmbeddingBagConfig`` of width ``mlet_inner_dim`` (same name, rows, features, pooling,
    init bounds), which TorchRec's and torchrec_tt's collections, sharders and planner take."""
    if not is_mlet(config):
        raise ValueError(f"table {config.name!r} is not an MLET table (no mlet_inner_dim)")
    k = config.mlet_inner_dim  # type: ignore[attr-defined]
    if isinstance(config, TTEmbeddingBagConfig):
        return dataclasses.replace(config, embedding_dim=k, mlet_inner_dim=None)
    return EmbeddingBagConfig(**{**_plain_fields(config), "embedding_dim": k})


def collapsed_config(config: EmbeddingBagConfig) -> EmbeddingBagConfig:
    """The config of a table after :meth:`MLETEmbeddingBagCollection.collapse`: width
    ``embedding_dim``; a TT table keeps its ranks (and row factors), its column factors are chosen
    again for ``embedding_dim``. Non-MLET configs are returned unchanged."""
    if not is_mlet(config):
        return config
    if isinstance(config, TTEmbeddingBagConfig):
        return dataclasses.replace(config, mlet_inner_dim=None, mlet_init_scale=1.0,
                                   tt_q_shapes=None)
    return EmbeddingBagConfig(**_plain_fields(config))


def mlet_rowwise_lr_scale(config: EmbeddingBagConfig) -> float:
    """Learning-rate factor ``sqrt(d / k)`` for row-wise Adagrad on an MLET table's wide rows, so
    the collapsed table's first step has the plain ``d``-wide table's size (1.0 for others)."""
    if not is_mlet(config):
        return 1.0
    return math.sqrt(config.embedding_dim / config.mlet_inner_dim)  # type: ignore[attr-defined]


@torch.no_grad()
def effective_rank(weight: Tensor) -> float:
    """Effective rank (Roy & Vetterli 2007) of a table: ``exp`` of the entropy of its normalised
    singular values, between 1 and ``min(N, D)`` (0 for a zero table)."""
    s = torch.linalg.svdvals(weight.detach().double().cpu())
    total = float(s.sum())
    if total == 0.0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


class MLETProjection(nn.Module):
    """The linear map ``k -> d`` of one MLET table: ``weight`` is ``[d, k]`` (``nn.Linear``'s
    layout, no bias: a bias would not commute with pooling, empty bags and per-sample weights).

    ``reset_parameters`` (which DMP calls when it materialises a meta-device model) draws
    orthonormal rows times ``init_scale``."""

    def __init__(self, in_dim: int, out_dim: int, init_scale: float = 1.0,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.in_dim, self.out_dim, self.init_scale = in_dim, out_dim, float(init_scale)
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim, device=device))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.weight.device.type == "meta":
            return
        nn.init.orthogonal_(self.weight)  # d <= k: orthonormal rows, W W^T = I
        self.weight.mul_(self.init_scale)

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, out_dim={self.out_dim}, init_scale={self.init_scale}"


@torch.fx.wrap
def _project_pooled(
    plain: Optional[KeyedTensor],
    tt: Optional[KeyedTensor],
    weights: List[Tensor],
    groups: List[Tuple[List[str], List[int]]],
    keys: List[str],
    dims: List[int],
) -> KeyedTensor:
    """Applies each table's projection to its features' pooled ``[B, k]`` embeddings, one
    batched matmul per group of tables with the same ``(k, d)``; keys in table order. Written
    in the TorchScript subset (scripted models call it)."""
    pooled: Dict[str, Tensor] = {}
    if plain is not None:
        pooled.update(plain.to_dict())
    if tt is not None:
        pooled.update(tt.to_dict())
    projected: List[Tensor] = []
    for feats, widx in groups:
        x = torch.stack([pooled[f] for f in feats])  # [G, B, k]
        w = torch.stack([weights[i] for i in widx])  # [G, d, k]
        projected.append(torch.bmm(x, w.transpose(1, 2)))  # [G, B, d]
    if len(groups) == 1 and groups[0][0] == keys:
        # The usual case (one width for every table, features in table order): the [G, B, d]
        # result is the KeyedTensor's [B, G * d] values after a transpose, no per-key split.
        y = projected[0]
        return KeyedTensor(keys=keys, length_per_key=dims,
                           values=y.transpose(0, 1).reshape(y.shape[1], -1))
    out: Dict[str, Tensor] = {}
    for group, y in zip(groups, projected):
        for f, block in zip(group[0], y.unbind(0)):
            out[f] = block
    return KeyedTensor.from_tensor_list(keys, [out[k] for k in keys])


class MLETEmbeddingBagCollection(EmbeddingBagCollectionInterface):
    """MLET tables behind TorchRec's ``EmbeddingBagCollection`` contract: ``KeyedJaggedTensor``
    in (keys of other collections are ignored), ``KeyedTensor`` out with the feature names in
    table order and ``embedding_dim`` (``d``) columns per feature.

    Children: ``ebc`` (TorchRec ``EmbeddingBagCollection`` of the ``MLETEmbeddingBagConfig``
    tables at width ``k``), ``tt`` (``TTEmbeddingBagCollection`` of the
    ``TTEmbeddingBagConfig(mlet_inner_dim=k)`` tables at row width ``k``) -- either ``None`` when it
    would hold no table -- and ``projections`` (one :class:`MLETProjection` per table, shared by
    the table's features). See the module docstring for init and learning rates.

    Args:
        tables: ``MLETEmbeddingBagConfig`` and/or ``TTEmbeddingBagConfig`` with
            ``mlet_inner_dim`` (non-MLET tables go in ``HybridEmbeddingBagCollection`` with them).
        is_weighted: per-sample weights (both children).
        device: where the weights live (``"meta"`` builds without memory; DMP materialises it).
        tt_fused_params: ``fused_params`` of the TT child.

    Example::

        tables = [MLETEmbeddingBagConfig(name="t", num_embeddings=100_000, embedding_dim=16,
                                         feature_names=["f"], mlet_inner_dim=128)]
        mlet = MLETEmbeddingBagCollection(tables)
        ebc = mlet.collapse()   # torchrec.EmbeddingBagCollection of width 16, same outputs
    """

    def __init__(
        self,
        tables: Sequence[EmbeddingBagConfig],
        is_weighted: bool = False,
        device: torch.device | str | None = None,
        tt_fused_params: Mapping[str, object] | None = None,
    ) -> None:
        super().__init__()
        tables = list(tables)
        if not tables:
            raise ValueError("MLETEmbeddingBagCollection needs at least one table")
        for cfg in tables:
            if not is_mlet(cfg) or not isinstance(
                cfg, (MLETEmbeddingBagConfig, TTEmbeddingBagConfig)
            ):
                raise TypeError(
                    f"table {getattr(cfg, 'name', cfg)!r} ({type(cfg).__name__}) is not an MLET "
                    "table: use MLETEmbeddingBagConfig or TTEmbeddingBagConfig(mlet_inner_dim=k) "
                    "(HybridEmbeddingBagCollection takes MLET and other tables together)"
                )
        names = [t.name for t in tables]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate table names in {names}")
        features = [f for t in tables for f in t.feature_names]
        if len(set(features)) != len(features):
            dup = sorted({f for f in features if features.count(f) > 1})
            raise ValueError(f"features {dup} are used by more than one table")
        dev = torch.device(device) if device is not None else torch.get_default_device()
        self._configs = tables
        self._is_weighted = is_weighted
        plain = [inner_config(t) for t in tables if not isinstance(t, TTEmbeddingBagConfig)]
        tt = [inner_config(t) for t in tables if isinstance(t, TTEmbeddingBagConfig)]
        self.ebc: Optional[EmbeddingBagCollection] = (
            EmbeddingBagCollection(plain, is_weighted=is_weighted, device=dev) if plain else None
        )
        self.tt: Optional[TTEmbeddingBagCollection] = (
            TTEmbeddingBagCollection(tt, is_weighted=is_weighted, device=dev,  # type: ignore[arg-type]
                                     fused_params=tt_fused_params)
            if tt else None
        )
        self.projections = nn.ModuleDict({
            t.name: MLETProjection(t.mlet_inner_dim, t.embedding_dim,  # type: ignore[attr-defined]
                                   t.mlet_init_scale, device=dev)  # type: ignore[attr-defined]
            for t in tables
        })
        self._feature_names = features
        self._dims = [t.embedding_dim for t in tables for _ in t.feature_names]
        # Features grouped by (k, d), in table order, with the index of their table's projection.
        groups: dict[tuple[int, int], tuple[list[str], list[int]]] = {}
        for i, t in enumerate(tables):
            feats, widx = groups.setdefault(
                (t.mlet_inner_dim, t.embedding_dim), ([], [])  # type: ignore[attr-defined]
            )
            feats.extend(t.feature_names)
            widx.extend([i] * len(t.feature_names))
        self._groups = list(groups.values())

    # --- EmbeddingBagCollectionInterface ----------------------------------------------------

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        return list(self._configs)

    def is_weighted(self) -> bool:
        return self._is_weighted

    # TorchScript compiles a module's properties; this one is Python-side only.
    __jit_unused_properties__ = ["device"]

    @property
    def device(self) -> torch.device:
        return next(iter(self.projections.values())).weight.device

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """Pooled ``d``-wide embeddings of every feature, keys in table order."""
        plain: Optional[KeyedTensor] = None
        tt: Optional[KeyedTensor] = None
        if self.ebc is not None:
            plain = self.ebc(features)
        if self.tt is not None:
            tt = self.tt(features)
        weights = [p.weight for p in self.projections.values()]
        return _project_pooled(plain, tt, weights, self._groups, self._feature_names, self._dims)

    # --- collapse ---------------------------------------------------------------------------

    @torch.no_grad()
    def inner_weight(self, table_name: str) -> Tensor:
        """The trained ``[N, k]`` table (dense reconstruction for a TT table)."""
        cfg = self._config(table_name)
        if isinstance(cfg, TTEmbeddingBagConfig):
            assert self.tt is not None
            return self.tt.full_weight(table_name)
        assert self.ebc is not None
        return self.ebc.embedding_bags[table_name].weight

    @torch.no_grad()
    def collapsed_weight(self, table_name: str) -> Tensor:
        """The ``[N, d]`` table ``E W^T`` that gives this collection's outputs in one lookup."""
        weight = self.inner_weight(table_name)
        if type(weight) not in (torch.Tensor, nn.Parameter):  # ShardedTensor, DTensor
            raise TypeError(
                f"table {table_name!r} is sharded ({type(weight).__name__}); collapse the "
                "unsharded module, e.g. through a checkpoint (torchrec_tt.mlet.collapse_checkpoint)"
            )
        return weight @ self.projections[table_name].weight.T

    @torch.no_grad()
    def collapse(
        self, device: torch.device | str | None = None, warn_above: float = 0.3
    ) -> EmbeddingBagCollectionInterface:
        """One ``d``-wide table per MLET table, with this collection's outputs.

        Returns a ``torchrec.EmbeddingBagCollection`` when every table is plain (exact up to
        float rounding), a ``TTEmbeddingBagCollection`` when every table is TT (each collapsed
        table ``E W^T`` goes through the TT-SVD at the table's ranks, see
        ``TTEmbeddingBagCollection.load_dense_weight``: exact only when ``E W^T`` has TT ranks
        within them), else a ``HybridEmbeddingBagCollection`` holding both. The returned module's
        ``tt_conversion_errors`` maps each TT table to its relative reconstruction error
        ``||E W^T - TT|| / ||E W^T||`` (empty without TT tables); a warning names tables above
        ``warn_above``.
        """
        dev = torch.device(device) if device is not None else self.device
        configs = [collapsed_config(c) for c in self._configs]
        tt_cfgs = [c for c in configs if isinstance(c, TTEmbeddingBagConfig)]
        plain_cfgs = [c for c in configs if not isinstance(c, TTEmbeddingBagConfig)]
        out: EmbeddingBagCollectionInterface
        ebc: EmbeddingBagCollection | None = None
        tt: TTEmbeddingBagCollection | None = None
        if tt_cfgs and plain_cfgs:
            # Imported here: swap.py builds on this module (HybridEmbeddingBagCollection routes
            # MLET tables here), so a top-level import would be circular.
            from torchrec_tt.swap import HybridEmbeddingBagCollection

            out = HybridEmbeddingBagCollection(configs, is_weighted=self._is_weighted, device=dev)
            ebc, tt = out.ebc, out.tt
        elif tt_cfgs:
            out = tt = TTEmbeddingBagCollection(tt_cfgs, is_weighted=self._is_weighted, device=dev)
        else:
            out = ebc = EmbeddingBagCollection(plain_cfgs, is_weighted=self._is_weighted,
                                               device=dev)
        errors: dict[str, float] = {}
        for cfg in configs:
            weight = self.collapsed_weight(cfg.name)
            if isinstance(cfg, TTEmbeddingBagConfig):
                assert tt is not None
                errors[cfg.name] = tt.load_dense_weight(cfg.name, weight.float())
            else:
                assert ebc is not None
                ebc.embedding_bags[cfg.name].weight.copy_(weight)
        out.tt_conversion_errors = errors  # type: ignore[assignment]
        lossy = {n: e for n, e in errors.items() if e > warn_above}
        if lossy:
            listed = ", ".join(f"{n!r}: {e:.3f}" for n, e in lossy.items())
            warnings.warn(
                f"MLET collapse: the TT-SVD of the collapsed tables at their ranks loses much of "
                f"them (relative reconstruction error {listed}; warn_above={warn_above}); keep "
                "the wide TT table and its projection for inference, or fine-tune the collapsed "
                "model",
                stacklevel=3,  # past torch.no_grad's wrapper: the caller of collapse()
            )
        return out

    # --- accounting -------------------------------------------------------------------------

    def _config(self, table_name: str) -> EmbeddingBagConfig:
        for cfg in self._configs:
            if cfg.name == table_name:
                return cfg
        raise KeyError(f"no MLET table {table_name!r}; tables: {[c.name for c in self._configs]}")
