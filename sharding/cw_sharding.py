"""Column-wise sharding of TT tables: TorchRec's strategy with the TT lookup.

A column shard is a split of the first column factor ``q_1`` (see ``tt_shards.py``): the shard
owns a column slice of ``core_0``; ``core_1 ..`` are replicated on every rank and their gradients
summed across ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchrec.distributed.embedding_sharding import EmbeddingShardingInfo
from torchrec.distributed.sharding.cw_sharding import CwPooledEmbeddingSharding
from torchrec.distributed.types import QuantizedCommCodecs, ShardingEnv

from torchrec_tt.sharding.lookup import TTLocalTable, TTLookupFactory

__all__ = ["CwTTPooledEmbeddingSharding"]


class CwTTPooledEmbeddingSharding(TTLookupFactory, CwPooledEmbeddingSharding):
    """Column shards of a table on one or more ranks; outputs re-joined by TorchRec's output dist.

    Args:
        sharding_infos: the column-wise tables.
        env: sharding environment.
        tables: the collection's ``TTLocalTable`` per table name.
        is_weighted: whether the KJT carries per-sample weights.
        replicated: the shared cores (``core_1 ..``) of every column-wise table, in the same
            order on every rank.
        replicated_group: process group that sums their gradients.
        device: compute device.
        fused_update: the fused optimizer's update (``TTFusedUpdate``), run in the lookup's
            backward; None without a fused optimizer.
        qcomm_codecs_registry: quantised-comms codecs for the pooled all-to-all.
    """

    def __init__(
        self,
        sharding_infos: list[EmbeddingShardingInfo],
        env: ShardingEnv,
        tables: Mapping[str, TTLocalTable],
        is_weighted: bool,
        replicated: Sequence[nn.Parameter],
        replicated_group: dist.ProcessGroup | None,
        device: torch.device | None = None,
        fused_update: Callable[[Sequence[Tensor], Sequence[Tensor]], None] | None = None,
        qcomm_codecs_registry: dict[str, QuantizedCommCodecs] | None = None,
    ) -> None:
        super().__init__(
            sharding_infos,
            env,
            device,
            permute_embeddings=True,
            qcomm_codecs_registry=qcomm_codecs_registry,
        )
        self._tt_tables = tables
        self._is_weighted = is_weighted
        self._fused_update = fused_update
        self._replicated = list(replicated)
        self._replicated_group = replicated_group

    def _tt_lookup_kwargs(self) -> dict[str, Any]:
        return {"replicated": self._replicated, "replicated_group": self._replicated_group}
