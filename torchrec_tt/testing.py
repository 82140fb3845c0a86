"""Helpers shared by tests, examples and benchmarks: random table-batched problems, and a count
of the host reads of given tensors.

Kept inside the package (not under tests/) so benchmarks and examples can import them.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from torchrec_tt.ops import PoolingMode, TTBatchLayout
from torchrec_tt.shapes import TTShape


@dataclass
class RandomProblem:
    """Cores, layout and a KJT-style (indices, offsets, weights) batch."""

    cores: list[Tensor]
    layout: TTBatchLayout
    indices: Tensor
    offsets: Tensor
    per_sample_weights: Tensor | None
    batch_size: int


def random_problem(
    seed: int,
    *,
    num_tables: int = 2,
    num_features: int | None = None,
    batch_size: int = 4,
    max_bag: int = 4,
    num_cores: int | None = None,
    max_factor: int = 4,
    max_rank: int = 4,
    index_dtype: torch.dtype = torch.int64,
    dtype: torch.dtype = torch.float64,
    weighted: bool = False,
    pooling: PoolingMode | None = None,
    rank_choices: tuple[int, ...] | None = None,
) -> RandomProblem:
    """A small random problem: tables with random K (2-4 unless given), factors and ranks
    (1..max_rank, or drawn from ``rank_choices``), N anywhere in (prod(p)/2, prod(p)], bags of
    0..max_bag lookups (empty bags included)."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    shapes = []
    names = []
    cores: list[Tensor] = []
    for t in range(num_tables):
        k = num_cores or rng.randint(2, 4)
        p = tuple(rng.randint(1, max_factor) for _ in range(k))
        q = tuple(rng.randint(1, max_factor) for _ in range(k))
        ranks = tuple(
            rng.choice(rank_choices) if rank_choices else rng.randint(1, max_rank) for _ in range(k - 1)
        )
        padded = math.prod(p)
        n = rng.randint(max(1, padded // 2), padded)
        full = (1, *ranks, 1)
        for j in range(k):
            cores.append(
                torch.randn(p[j], full[j] * q[j] * full[j + 1], generator=gen, dtype=dtype)
            )
        shapes.append(TTShape(n, math.prod(q), p, q, ranks))
        names.append(f"table_{t}")
    num_features = num_features or num_tables
    feature_table_map = [f % num_tables for f in range(num_features)]
    rng.shuffle(feature_table_map)
    poolings = [pooling if pooling is not None else rng.choice(list(PoolingMode)) for _ in shapes]
    layout = TTBatchLayout.from_shapes(names, shapes, poolings, feature_table_map)
    lengths = torch.randint(0, max_bag + 1, (num_features * batch_size,), generator=gen)
    offsets = torch.zeros(lengths.numel() + 1, dtype=index_dtype)
    offsets[1:] = lengths.cumsum(0)
    parts = []
    for f, t in enumerate(feature_table_map):
        count = int(lengths[f * batch_size : (f + 1) * batch_size].sum())
        parts.append(torch.randint(0, shapes[t].num_rows, (count,), generator=gen))
    indices = torch.cat(parts).to(index_dtype)
    weights = torch.rand(indices.numel(), generator=gen, dtype=dtype) if weighted else None
    return RandomProblem(cores, layout, indices, offsets, weights, batch_size)


def has_cuda_kernels() -> bool:
    """A CUDA device is present and torchrec_tt was built with its CUDA embedding-bag kernels."""
    if not torch.cuda.is_available():
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("torchrec_tt::tt_embedding_bag", "CUDA")


class ScalarReads(TorchDispatchMode):
    """While active, counts the reads of one value to the host (``item()``, ``int()``,
    ``float()``, ``bool()``: aten's ``_local_scalar_dense``, a host sync on a GPU) of the given
    tensors, matched by storage, in ``count``; ``total`` counts those of any tensor."""

    def __init__(self, tensors: list[Tensor]) -> None:
        super().__init__()
        self._storages = {t.untyped_storage().data_ptr() for t in tensors}
        self.count = 0
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is torch.ops.aten._local_scalar_dense.default:
            self.total += 1
            if args[0].untyped_storage().data_ptr() in self._storages:
                self.count += 1
        return func(*args, **(kwargs or {}))
