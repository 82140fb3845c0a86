"""Table-wise sharding of TT tables: TorchRec's strategy with the TT lookup."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor
from torchrec.distributed.embedding_sharding import EmbeddingShardingInfo
from torchrec.distributed.sharding.tw_sharding import TwPooledEmbeddingSharding
from torchrec.distributed.types import QuantizedCommCodecs, ShardingEnv

from torchrec_tt.sharding.lookup import TTLocalTable, TTLookupFactory

__all__ = ["TwTTPooledEmbeddingSharding"]


class TwTTPooledEmbeddingSharding(TTLookupFactory, TwPooledEmbeddingSharding):
    """Each table lives whole on one rank; TorchRec's KJT and pooled all-to-alls move the data.

    Args:
        sharding_infos: the table-wise tables.
        env: sharding environment.
        tables: the collection's ``TTLocalTable`` per table name.
        is_weighted: whether the KJT carries per-sample weights.
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
        device: torch.device | None = None,
        fused_update: Callable[[Sequence[Tensor], Sequence[Tensor]], None] | None = None,
        qcomm_codecs_registry: dict[str, QuantizedCommCodecs] | None = None,
    ) -> None:
        super().__init__(sharding_infos, env, device, qcomm_codecs_registry=qcomm_codecs_registry)
        self._tt_tables = tables
        self._is_weighted = is_weighted
        self._fused_update = fused_update
