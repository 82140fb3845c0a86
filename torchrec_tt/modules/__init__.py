"""User-facing modules: what a TorchRec user builds (sharding lives in torchrec_tt.sharding)."""

from torchrec_tt.modules.conv import TTConv2d
from torchrec_tt.modules.embedding_bag import TTEmbeddingBagCollection, TTEmbeddingTable
from torchrec_tt.modules.mlet import MLETEmbeddingBagCollection, MLETProjection
from torchrec_tt.modules.tt_node_embedding import TTNodeEmbedding

__all__ = [
    "MLETEmbeddingBagCollection",
    "MLETProjection",
    "TTConv2d",
    "TTEmbeddingBagCollection",
    "TTEmbeddingTable",
    "TTNodeEmbedding",
]
