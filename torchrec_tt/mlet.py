"""MLET (multi-layer embedding training, arXiv 2006.05623): configs swap and checkpoints.

The module itself is :class:`torchrec_tt.modules.mlet.MLETEmbeddingBagCollection` (its docstring
gives the initialisation and learning-rate defaults); here:

* :func:`swap_to_mlet`: the configs of an existing model with chosen tables trained as MLET
  (plain tables -> ``MLETEmbeddingBagConfig``, TT tables -> ``TTEmbeddingBagConfig(mlet_inner_dim=k)``),
  for ``HybridEmbeddingBagCollection``.
* :func:`collapse_checkpoint`: a ``torch.distributed.checkpoint`` of a trained MLET model (sharded
  or not) -> a checkpoint of the collapsed model (``d``-wide tables), which loads into the
  collapsed model built from ``collapsed_config`` s, sharded with any plan.

Example::

    configs = swap_to_mlet(dlrm_tables, factor=8)        # k = 8 d for every table
    ebc = HybridEmbeddingBagCollection(configs)           # child .mlet: the MLET collection
    ...train, dcp.save({"model": dmp.state_dict()}, checkpoint_id=ckpt)...
    collapse_checkpoint(ckpt, ckpt_collapsed, ebc, prefix="model.model.sparse_arch.embedding_bag_collection.")
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollectionInterface

from torchrec_tt.configs import MLETEmbeddingBagConfig, TTEmbeddingBagConfig
from torchrec_tt.modules.mlet import (
    MLETEmbeddingBagCollection,
    MLETProjection,
    collapsed_config,
    effective_rank,
    inner_config,
    is_mlet,
    mlet_rowwise_lr_scale,
)
from torchrec_tt.swap import HybridEmbeddingBagCollection

__all__ = [
    "MLETEmbeddingBagCollection",
    "MLETEmbeddingBagConfig",
    "MLETProjection",
    "collapse_checkpoint",
    "collapsed_config",
    "effective_rank",
    "inner_config",
    "is_mlet",
    "mlet_rowwise_lr_scale",
    "swap_to_mlet",
]


def swap_to_mlet(
    tables: Sequence[EmbeddingBagConfig],
    inner_dim: int | None = None,
    factor: int | None = None,
    names: Sequence[str] | None = None,
    init_scale: float = 1.0,
) -> list[EmbeddingBagConfig]:
    """The configs with the chosen tables (``names``; all by default) trained as MLET at inner
    width ``inner_dim`` or ``factor * embedding_dim`` (exactly one of the two).

    Plain tables become ``MLETEmbeddingBagConfig``; TT tables get ``mlet_inner_dim`` (their column
    factors are chosen again for the inner width); tables that are MLET already are refused.
    """
    tables = list(tables)
    if (inner_dim is None) == (factor is None):
        raise ValueError("swap_to_mlet takes exactly one of inner_dim= and factor=")
    for what, v in (("inner_dim", inner_dim), ("factor", factor)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"swap_to_mlet({what}={v!r}): must be an int >= 1")
    all_names = [t.name for t in tables]
    chosen = set(all_names if names is None else names)
    unknown = sorted(chosen - set(all_names))
    if unknown:
        raise ValueError(f"swap_to_mlet(names=...) names unknown tables {unknown}; tables: "
                         f"{all_names}")
    out: list[EmbeddingBagConfig] = []
    for t in tables:
        if t.name not in chosen:
            out.append(t)
            continue
        if is_mlet(t):
            raise ValueError(f"table {t.name!r} is already an MLET table "
                             f"(mlet_inner_dim={t.mlet_inner_dim})")  # type: ignore[attr-defined]
        k = inner_dim if inner_dim is not None else factor * t.embedding_dim  # type: ignore[operator]
        if isinstance(t, TTEmbeddingBagConfig):
            out.append(dataclasses.replace(t, mlet_inner_dim=k, mlet_init_scale=init_scale,
                                           tt_q_shapes=None))
        else:
            base = {f.name: getattr(t, f.name) for f in dataclasses.fields(EmbeddingBagConfig)
                    if f.init}
            out.append(MLETEmbeddingBagConfig(**base, mlet_inner_dim=k,
                                              mlet_init_scale=init_scale))
    return out


def _tensor_keys(checkpoint_id: str | os.PathLike[str]) -> dict[str, TensorStorageMetadata]:
    metadata = dcp.FileSystemReader(os.fspath(checkpoint_id)).read_metadata()
    return {k: m for k, m in metadata.state_dict_metadata.items()
            if isinstance(m, TensorStorageMetadata)}


@torch.no_grad()
def collapse_checkpoint(
    checkpoint_id: str | os.PathLike[str],
    out_checkpoint_id: str | os.PathLike[str],
    module: MLETEmbeddingBagCollection | HybridEmbeddingBagCollection,
    prefix: str = "",
    copy_prefix: str | None = None,
    warn_above: float = 0.3,
) -> dict[str, float]:
    """Writes the collapsed model's checkpoint from a trained MLET model's checkpoint.

    Reads the collection's tensors (``prefix`` + its state-dict keys: written by ``dcp.save``
    from the sharded or unsharded model, any plan) into an unsharded CPU copy of ``module``'s
    tables, collapses it (``collapse()``: the returned module's keys replace the collection's under
    ``prefix``; a hybrid keeps its ``ebc.`` / ``tt.`` children) and saves with ``dcp.save``.
    Every other tensor whose key starts with ``copy_prefix`` (default: the first component of
    ``prefix``, e.g. ``"model."``; ``""`` copies all) is copied unchanged, so the output loads into
    the whole collapsed model; optimizer states of other prefixes and non-tensor entries are left
    out (an inference / fine-tuning checkpoint).

    Under an initialised process group every rank must call it (``dcp`` is collective; each rank
    reads the full tables). ``module`` only supplies the configs (it may be on ``meta``).

    Returns:
        the relative TT-SVD reconstruction error of each collapsed TT table (see
        ``MLETEmbeddingBagCollection.collapse``).
    """
    if not isinstance(module, (MLETEmbeddingBagCollection, HybridEmbeddingBagCollection)):
        raise TypeError(
            f"module must be an MLETEmbeddingBagCollection or HybridEmbeddingBagCollection, got "
            f"{type(module).__name__}"
        )
    if copy_prefix is None:
        copy_prefix = prefix.split(".", 1)[0] + "." if "." in prefix else ""
    work = type(module)(module.embedding_bag_configs(), is_weighted=module.is_weighted(),
                        device="cpu")
    available = _tensor_keys(checkpoint_id)
    state = {prefix + k: v for k, v in work.state_dict().items()}
    missing = sorted(k for k in state if k not in available)
    if missing:
        raise ValueError(
            f"checkpoint {os.fspath(checkpoint_id)!r} lacks {len(missing)} tensors of the MLET "
            f"collection under prefix {prefix!r}, e.g. {missing[:3]}"
        )
    others = {
        k: torch.empty(m.size, dtype=m.properties.dtype)
        for k, m in available.items()
        if k.startswith(copy_prefix) and not k.startswith(prefix)
    }
    dcp.load({**state, **others}, checkpoint_id=checkpoint_id)
    collapsed: EmbeddingBagCollectionInterface = work.collapse(device="cpu", warn_above=warn_above)
    out = {prefix + k: v for k, v in collapsed.state_dict().items()}
    out.update(others)
    dcp.save(out, checkpoint_id=out_checkpoint_id)
    return dict(collapsed.tt_conversion_errors)  # type: ignore[arg-type]
