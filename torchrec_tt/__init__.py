"""torchrec_tt: Tensor-Train embedding tables for TorchRec, with compiled CPU/CUDA kernels."""

from torchrec_tt import _C  # noqa: F401  (loads the operator library before anything uses it)
from torchrec_tt.ops import PoolingMode, TTBatchLayout, tt_embedding_bag

__all__ = ["PoolingMode", "TTBatchLayout", "tt_embedding_bag"]
