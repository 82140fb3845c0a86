"""Synthetic Criteo batches made on the training device with torch, one-hot or multi-hot.

:class:`DeviceSyntheticCriteo` draws the rows of :class:`torchrec_tt.criteo.SyntheticCriteo`'s
planted model (same tables, id maps, hidden vectors and weights) with torch ops on any device, so
a GPU trainer does not wait for numpy on the host. Every random number is a counter-based hash
(SplitMix64) of ``(seed, stream, index, element)``: batch ``index`` of a stream is a fixed function
of those, the same on CPU and CUDA and independent of what was drawn before, so a resumed run
sees exactly the batches it would have seen. No host synchronisation per batch.

Multi-hot (TorchRec's ``--multi_hot_sizes``): feature ``t`` has ``L_t`` ids per row (fixed-length
bags, as TorchRec's synthetic multi-hot). The first id follows the Zipf law of the one-hot data;
the others follow it too (``"pareto"``) or are uniform over the table (``"uniform"``). The hidden
model sees the mean of the bag's latent vectors, and the bias is re-fitted so that the click rate
stays ``positive_rate``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_tt.criteo import (
    CAT_FEATURE_COUNT,
    DEFAULT_CAT_NAMES,
    INT_FEATURE_COUNT,
    SyntheticCriteo,
    _splitmix64,
)

__all__ = ["MULTI_HOT_DISTRIBUTIONS", "DeviceSyntheticCriteo", "hash_normal", "splitmix64"]

MULTI_HOT_DISTRIBUTIONS = ("pareto", "uniform")
_GOLDEN = 0x9E3779B97F4A7C15
_TWO53 = float(2**53)


def _signed(x: int) -> int:
    """A uint64 value as the int64 with the same bits (torch has no uint64 arithmetic)."""
    x &= (1 << 64) - 1
    return x - (1 << 64) if x >= 1 << 63 else x


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's ``>>`` is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """The SplitMix64 finaliser of :mod:`torchrec_tt.criteo` on int64 tensors (wrapping
    arithmetic gives the same bits as numpy's uint64)."""
    x = x + _signed(_GOLDEN)
    x = (x ^ _shr(x, 30)) * _signed(0xBF58476D1CE4E5B9)
    x = (x ^ _shr(x, 27)) * _signed(0x94D049BB133111EB)
    return x ^ _shr(x, 31)


def _key(*parts: int) -> int:
    """A 64-bit stream key from integers (host side, once per batch)."""
    h = np.uint64(0)
    for p in parts:
        h = _splitmix64(np.array([h ^ np.uint64(p & ((1 << 64) - 1))], dtype=np.uint64))[0]
    return _signed(int(h))


def _unit(h: torch.Tensor, half: bool) -> torch.Tensor:
    """float64 in [0, 1) from the top 53 bits (``half``: shifted into (0, 1) for logs)."""
    u = _shr(h, 11).to(torch.float64)
    return (u + 0.5) / _TWO53 if half else u / _TWO53


def hash_normal(ids: torch.Tensor, salt_hash: torch.Tensor, dims: int) -> torch.Tensor:
    """``criteo._hash_normal`` in torch: ``[*ids.shape, dims]`` standard normals fixed by
    ``(salt, id)``; ``salt_hash`` is ``splitmix64(salt)`` broadcast against ``ids``."""
    base = splitmix64(ids ^ salt_hash).unsqueeze(-1)
    steps = torch.arange(1, 2 * dims + 1, dtype=torch.int64, device=ids.device)
    h = splitmix64(base + steps)
    u1, u2 = _unit(h[..., 0::2], half=True), _unit(h[..., 1::2], half=False)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)


class DeviceSyntheticCriteo:
    """Batches of the planted Criteo-format model, drawn on ``device``.

    Args:
        model: the planted model (tables, id maps, hidden vectors) to draw from.
        multi_hot_sizes: ids per row of each of the 26 features (None: one each).
        multi_hot_distribution: how ids after the first are drawn, ``"pareto"`` (the Zipf law of
            the first id) or ``"uniform"`` (uniform over the table).
        device: where batches are made.
    """

    def __init__(
        self,
        model: SyntheticCriteo,
        multi_hot_sizes: Sequence[int] | None = None,
        multi_hot_distribution: str = "pareto",
        device: torch.device | str = "cpu",
    ) -> None:
        sizes = [1] * CAT_FEATURE_COUNT if multi_hot_sizes is None else [int(x) for x in multi_hot_sizes]
        if len(sizes) != CAT_FEATURE_COUNT or min(sizes) < 1:
            raise ValueError(f"multi_hot_sizes must be {CAT_FEATURE_COUNT} sizes >= 1, got {sizes}")
        if multi_hot_distribution not in MULTI_HOT_DISTRIBUTIONS:
            raise ValueError(f"multi_hot_distribution must be one of {MULTI_HOT_DISTRIBUTIONS}, "
                             f"got {multi_hot_distribution!r}")
        self.model = model
        self.multi_hot_sizes = sizes
        self.device = torch.device(device)
        dev, f64, i64 = self.device, torch.float64, torch.int64
        col_feature = np.repeat(np.arange(CAT_FEATURE_COUNT), sizes)  # feature of each id column
        first = np.concatenate([[True] + [False] * (n - 1) for n in sizes])

        def col(values: Sequence[float] | Sequence[int], dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(np.asarray(values)[col_feature], dtype=dtype, device=dev)

        self._rows = col(model.cardinalities, i64)
        self._mult = col(model._mult, i64)
        self._shift = col(model._shift, i64)
        self._zipf = torch.tensor(first | (multi_hot_distribution == "pareto"), device=dev)
        salts = [_signed(int(_splitmix64(np.array([model.seed * 1000 + t], dtype=np.uint64))[0]))
                 for t in range(CAT_FEATURE_COUNT)]
        self._salt = col(salts, i64)
        ends = np.cumsum(sizes)
        self._bounds = [(int(e) - n, int(e)) for e, n in zip(ends, sizes)]
        self._bag_end = torch.tensor(ends, dtype=i64, device=dev)
        self._bag_start = torch.tensor(ends - np.asarray(sizes), dtype=i64, device=dev)
        self._bag_len = torch.tensor(sizes, dtype=f64, device=dev)
        self._u = torch.tensor(model._u, dtype=f64, device=dev)
        self._s = torch.tensor(model._s, dtype=f64, device=dev)
        self._pair_a = torch.tensor([a for a, _ in model._pairs], dtype=i64, device=dev)
        self._pair_b = torch.tensor([b for _, b in model._pairs], dtype=i64, device=dev)
        self._w = torch.tensor(model._w, dtype=f64, device=dev)
        self._mu = torch.tensor(model._dense_mu, dtype=f64, device=dev)
        self._sigma = torch.tensor(model._dense_sigma, dtype=f64, device=dev)
        self._lengths: dict[int, torch.Tensor] = {}
        self.bias = 0.0
        self.bias = self._fit_bias()

    @property
    def num_ids(self) -> int:
        """Ids per row over all features."""
        return sum(self.multi_hot_sizes)

    def _fit_bias(self, rows: int = 20000) -> float:
        """The bias that makes the mean click probability ``positive_rate`` (bisection on the
        host over one fixed block of rows, once)."""
        dense, ids, _ = self._draw(rows, _key(self.model.seed, 999, 0))
        logits = self.logits(dense, ids).cpu().numpy()
        lo, hi = -10.0, 10.0
        for _ in range(60):
            mid = (lo + hi) / 2
            if (1 / (1 + np.exp(-(logits + mid)))).mean() < self.model.positive_rate:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2

    def _draw(self, n: int, key: int | Sequence[int]
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Dense counts ``[n, 13]`` (float64), ids ``[n, sum L]`` and label uniforms ``[n]``;
        several keys: their blocks of ``n`` rows one after the other, each the same bits as
        drawn alone (``[len(key) * n, ...]``)."""
        per_row = 2 * INT_FEATURE_COUNT + self.num_ids + 1
        counter = torch.arange(n * per_row, dtype=torch.int64, device=self.device) * _signed(_GOLDEN)
        if isinstance(key, int):
            h = splitmix64(counter + key).view(n, per_row)
        else:
            keys = torch.tensor(list(key), dtype=torch.int64).to(self.device, non_blocking=True)
            h = splitmix64(counter[None, :] + keys[:, None]).view(len(keys) * n, per_row)
        d = 2 * INT_FEATURE_COUNT
        u1, u2 = _unit(h[:, 0:d:2], half=True), _unit(h[:, 1:d:2], half=False)
        g = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
        dense = torch.clamp(torch.floor(torch.exp(self._mu + self._sigma * g)) - 1, min=0)
        u = _unit(h[:, d:d + self.num_ids], half=False)
        rows = self._rows.to(torch.float64)
        s = self.model.zipf_exponent
        top = (rows + 1.0) ** (1 - s)
        zipf_rank = torch.floor((1 + u * (top - 1)) ** (1 / (1 - s))) - 1
        rank = torch.where(self._zipf, zipf_rank, torch.floor(u * rows)).to(torch.int64)
        rank = torch.minimum(rank.clamp_(min=0), self._rows - 1)
        ids = (rank * self._mult + self._shift) % self._rows
        return dense, ids, _unit(h[:, -1], half=False)

    def logits(self, dense: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The planted model's logit ``[n]`` of dense counts ``[n, 13]`` and ids ``[n, sum L]``
        (the mean latent vector of each bag); one-hot, equal to ``SyntheticCriteo._logits``
        up to rounding and the re-fitted bias."""
        k = self.model.latent_dim
        x = (torch.log1p(dense.to(torch.float64)) - self._mu) / self._sigma
        z = hash_normal(ids, self._salt, k)  # [n, sum L, k]
        zc = torch.nn.functional.pad(z.cumsum(1), (0, 0, 1, 0))  # bag sums from prefix sums
        z = (zc[:, self._bag_end] - zc[:, self._bag_start]) / self._bag_len[:, None]
        logit = self.bias + x @ self._w + ((z * self._u).sum(-1) * self._s).sum(-1)
        pairs = (z[:, self._pair_a] * z[:, self._pair_b]).sum(-1).sum(-1)
        return logit + self.model.interaction_weight * pairs / math.sqrt(k)

    def sample(self, n: int, stream: int, index: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Block ``index`` of ``stream``: dense counts ``[n, 13]``, ids ``[n, sum L]`` (feature
        ``t``'s bag in columns ``sum L[:t] .. sum L[:t+1]``), labels ``[n]`` and click
        probabilities ``[n]``, all on the device."""
        return self._sample(n, _key(self.model.seed, stream, index))

    def _sample(self, n: int, key: int | Sequence[int]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`sample` of the block(s) of ``key`` (see :meth:`_draw`)."""
        dense, ids, u = self._draw(n, key)
        p = torch.sigmoid(self.logits(dense, ids))
        return dense, ids, (u < p).to(torch.int64), p

    def batch(self, batch_size: int, stream: int, index: int) -> Batch:
        """Block ``index`` of ``stream`` as a TorchRec ``Batch`` on the device (dense
        ``log(1 + count)``, KJT keys ``cat_0 .. cat_25`` with ``L_t`` ids per bag)."""
        return self.batches(batch_size, stream, [index])[0]

    def batches(self, batch_size: int, stream: int, indices: Sequence[int]) -> list[Batch]:
        """Blocks ``indices`` of ``stream``, each equal to ``batch(batch_size, stream, i)``,
        drawn in one pass: a batch is ~400 small tensor ops, so on a GPU making several per
        call divides their launch cost (the hashes are per row and key, so the bits match)."""
        keys = [_key(self.model.seed, stream, i) for i in indices]
        dense, ids, labels, _ = self._sample(batch_size, keys[0] if len(keys) == 1 else keys)
        # KJT values are feature-major: feature t's bags of all rows, then feature t + 1's;
        # reordered for all the blocks at once ([blocks, batch_size * sum L], one row per
        # batch), which is the same data movement with 1/len(keys) of the ops per batch.
        blocks = ids.view(len(keys), batch_size, -1)
        values = torch.cat([blocks[:, :, a:b].reshape(len(keys), -1) for a, b in self._bounds],
                           dim=1)
        return [self._to_batch(dense[k * batch_size:(k + 1) * batch_size], values[k],
                               labels[k * batch_size:(k + 1) * batch_size])
                for k in range(len(keys))]

    def _to_batch(self, dense: torch.Tensor, values: torch.Tensor, labels: torch.Tensor) -> Batch:
        batch_size = dense.shape[0]
        lengths = self._lengths.get(batch_size)
        if lengths is None:
            lengths = torch.tensor(self.multi_hot_sizes, dtype=torch.int32,
                                   device=self.device).repeat_interleave(batch_size)
            self._lengths[batch_size] = lengths
        # Every bag of feature t has L_t ids, so the ids per feature are known on the host:
        # given here, TorchRec's input dist does not read them back from the device (a sum
        # and a device-to-host copy, i.e. a host sync, per batch).
        per_key = [n * batch_size for n in self.multi_hot_sizes]
        kjt = KeyedJaggedTensor(keys=list(DEFAULT_CAT_NAMES), values=values, lengths=lengths,
                                stride=batch_size, length_per_key=per_key,
                                offset_per_key=[0, *itertools.accumulate(per_key)])
        return Batch(dense_features=torch.log1p(dense).to(torch.float32), sparse_features=kjt,
                     labels=labels.to(torch.float32))
