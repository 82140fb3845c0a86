"""User-facing modules: what a TorchRec user builds (sharding lives in torchrec_tt.sharding)."""

from torchrec_tt.modules.conv import TTConv2d
from torchrec_tt.modules.embedding_bag import TTEmbeddingBagCollection, TTEmbeddingTable

__all__ = ["TTConv2d", "TTEmbeddingBagCollection", "TTEmbeddingTable"]
