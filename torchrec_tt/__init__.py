"""torchrec_tt: Tensor-Train embedding tables for TorchRec, with compiled CPU/CUDA kernels.

Users write :class:`TTEmbeddingBagConfig` where they wrote ``EmbeddingBagConfig`` and build a
:class:`TTEmbeddingBagCollection`; ``torchrec_tt.sharding`` holds the distributed side.
:class:`MLETEmbeddingBagConfig` / :class:`MLETEmbeddingBagCollection` train tables as MLET (a wide
table and a projection, collapsed after training; ``torchrec_tt.mlet``).
"""

import torch  # noqa: F401  (loads libtorch, which _C links against)

from torchrec_tt import _C  # noqa: F401  (registers the operator library before anything uses it)
from torchrec_tt.configs import MLETEmbeddingBagConfig, TTEmbeddingBagConfig, TTInit
from torchrec_tt import conv_dispatch  # noqa: F401  (TTConv2d's path settings and plans)
from torchrec_tt.conv_ops import tt_conv2d  # also registers the TT conv fake kernels/autograd
from torchrec_tt import lossy_ops  # noqa: F401  (the lossy comms codec ops' fake kernels)
from torchrec_tt.modules import MLETEmbeddingBagCollection, TTEmbeddingBagCollection
from torchrec_tt.modules.conv import TTConv2d
from torchrec_tt.modules.tt_node_embedding import TTNodeEmbedding
from torchrec_tt.ops import PoolingMode, TTBatchLayout, tt_embedding_bag
from torchrec_tt.shapes import TTShape, make_tt_shape
from torchrec_tt.version import __version__
from torchrec_tt import inference  # noqa: F401  (TT's entry in TorchRec's DEFAULT_QUANT_MAPPING)

__all__ = [
    "MLETEmbeddingBagCollection",
    "MLETEmbeddingBagConfig",
    "PoolingMode",
    "TTConv2d",
    "TTBatchLayout",
    "TTEmbeddingBagCollection",
    "TTEmbeddingBagConfig",
    "TTInit",
    "TTNodeEmbedding",
    "TTShape",
    "__version__",
    "make_tt_shape",
    "tt_conv2d",
    "tt_embedding_bag",
]
