"""Data-parallel sharding of TT tables: TorchRec's strategy with the TT lookup."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torchrec.distributed.embedding_sharding import EmbeddingShardingInfo
from torchrec.distributed.sharding.dp_sharding import DpPooledEmbeddingSharding
from torchrec.distributed.types import ShardingEnv

from torchrec_tt.sharding.lookup import TTLocalTable, TTLookupFactory

__all__ = ["DpTTPooledEmbeddingSharding"]


class DpTTPooledEmbeddingSharding(TTLookupFactory, DpPooledEmbeddingSharding):
    """Every rank holds every table and looks up its own batch: no all-to-all at all.

    The caller wraps the lookup in ``DistributedDataParallel`` (its core gradients are averaged
    over ranks, like TorchRec's data-parallel tables), unless the tables have a fused optimizer:
    then ``fused_update`` averages the gradients and updates the replicas in the backward.

    Args:
        sharding_infos: the data-parallel tables.
        env: sharding environment.
        tables: the collection's ``TTLocalTable`` per table name.
        is_weighted: whether the KJT carries per-sample weights.
        device: compute device.
        fused_update: the fused optimizer's update (``TTFusedUpdate``), run in the lookup's
            backward; None without a fused optimizer.
        count_group: the ranks whose ids the hot-row caches of these tables count (see
            ``TTPooledEmbeddingsLookup``); None when no table has a cache.
    """

    def __init__(
        self,
        sharding_infos: list[EmbeddingShardingInfo],
        env: ShardingEnv,
        tables: Mapping[str, TTLocalTable],
        is_weighted: bool,
        device: torch.device | None = None,
        fused_update: Callable[[Sequence[Tensor], Sequence[Tensor]], None] | None = None,
        count_group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__(sharding_infos, env, device)
        self._tt_tables = tables
        self._is_weighted = is_weighted
        self._fused_update = fused_update
        self._count_group = count_group

    def _tt_lookup_kwargs(self) -> dict[str, Any]:
        return {"count_group": self._count_group}
