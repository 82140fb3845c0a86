"""DLRM's pairwise interaction with a backward that does not sort.

TorchRec's ``InteractionArch`` (torchrec 1.6.1) picks the upper triangle of the ``B x (F+1) x
(F+1)`` interaction matrix with two index tensors, ``interactions[:, triu[0], triu[1]]``. Its
backward is ``index_put_(accumulate=True)``, which CUDA runs as a sort-based deterministic
kernel: on an H200 it took 5.5 ms of a 12 ms DLRM step at B=65,536 (and 0.6 ms at B=8,192), in
the TT and the uncompressed model alike (docs/benchmarks.md, "One-GPU step time"). Selecting
the same entries from the flattened matrix with ``index_select`` gives the same values in the
same order, and its backward is a scatter of distinct indices (no sort, no collisions).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchrec.models.dlrm import DLRM, InteractionArch

__all__ = ["FlatInteractionArch", "use_flat_interaction"]


class FlatInteractionArch(InteractionArch):
    """``InteractionArch`` with the upper triangle taken by ``index_select`` on the flattened
    interaction matrix: same output, same parameters (none) and state_dict (empty)."""

    def __init__(self, num_sparse_features: int) -> None:
        super().__init__(num_sparse_features)
        n = self.F + 1
        self.register_buffer(
            "flat_triu_indices", self.triu_indices[0] * n + self.triu_indices[1], persistent=False
        )

    def forward(self, dense_features: Tensor, sparse_features: Tensor) -> Tensor:
        if self.F <= 0:
            return dense_features
        combined_values = torch.cat((dense_features.unsqueeze(1), sparse_features), dim=1)
        interactions = torch.bmm(combined_values, torch.transpose(combined_values, 1, 2))
        interactions_flat = interactions.flatten(1).index_select(1, self.flat_triu_indices)
        return torch.cat((dense_features, interactions_flat), dim=1)


def use_flat_interaction(model: DLRM) -> DLRM:
    """Replaces ``model.inter_arch`` (a TorchRec ``InteractionArch``) by the equivalent
    :class:`FlatInteractionArch`, on the same device; returns ``model``."""
    old = model.inter_arch
    if type(old) is not InteractionArch:
        raise TypeError(f"expected TorchRec's InteractionArch, got {type(old).__name__}")
    new = FlatInteractionArch(old.F)
    model.inter_arch = new.to(old.triu_indices.device)
    return model
