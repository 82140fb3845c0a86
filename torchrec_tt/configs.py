"""Table configs for TT-compressed embedding bags.

A :class:`TTEmbeddingBagConfig` *is* a TorchRec ``EmbeddingBagConfig`` (same name, size, feature
names, pooling and init bounds, so TorchRec's planner and models accept it) plus the TT fields.
"""

from __future__ import annotations

import enum
import numbers
from dataclasses import dataclass, field

from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType

from torchrec_tt.kernel_shapes import two_factor_p, two_factor_q
from torchrec_tt.shapes import TTShape, make_tt_shape

__all__ = ["TTEmbeddingBagConfig", "TTInit"]


@enum.unique
class TTInit(str, enum.Enum):
    """How the cores of a TT table are initialised.

    Both match the variance TorchRec's default init gives a dense row (uniform between
    ``weight_init_min`` and ``weight_init_max``, by default ``±sqrt(1/N)``).
    """

    SAMPLED_GAUSSIAN = "sampled_gaussian"  # i.i.d. Gaussian cores, std corrected for the ranks
    ORTHOGONAL = "orthogonal"  # left-orthogonal cores, last core scaled to the target variance


@dataclass
class TTEmbeddingBagConfig(EmbeddingBagConfig):
    """An ``EmbeddingBagConfig`` whose table is stored as a Tensor Train.

    Args:
        tt_ranks (list[int]): inner TT ranks, one fewer than the number of cores (2-4 cores):
            ``[32, 32]`` means three cores, ``[32]`` two (the shape the CUDA two-factor kernels
            run fastest; ``TTPolicy`` and the DLRM trainer default to it).
        tt_p_shapes (list[int] | None): row factors, ``prod >= num_embeddings``; chosen
            automatically when None (2 cores: ``kernel_shapes.two_factor_shape``, which also
            picks ``q``; otherwise near-balanced, little padding).
        tt_q_shapes (list[int] | None): column factors, ``prod == embedding_dim``; chosen
            automatically (largest factor last) when None.
        tt_init (TTInit): core initialisation.

    Example::

        TTEmbeddingBagConfig(name="t_user", num_embeddings=10_000_000, embedding_dim=64,
                             feature_names=["user"], tt_ranks=[32, 32])
    """

    tt_ranks: list[int] = field(default_factory=lambda: [32, 32])
    tt_p_shapes: list[int] | None = None
    tt_q_shapes: list[int] | None = None
    tt_init: TTInit = TTInit.SAMPLED_GAUSSIAN

    def __post_init__(self) -> None:
        # Checked before TorchRec's __post_init__, whose default init bounds divide by N.
        if not isinstance(self.num_embeddings, numbers.Integral) or self.num_embeddings < 1:
            raise ValueError(
                f"TT table {self.name!r}: num_embeddings must be a positive int, got "
                f"{self.num_embeddings!r}"
            )
        super().__post_init__()
        if not self.feature_names:
            self.feature_names = [self.name]
        if not self.name or "." in self.name:
            raise ValueError(f"TT table name {self.name!r} must be non-empty and contain no '.'")
        if self.data_type != DataType.FP32:
            raise ValueError(
                f"TT table {self.name!r}: data_type {self.data_type} is not supported; TT cores "
                "are stored in FP32"
            )
        if self.pooling not in (PoolingType.SUM, PoolingType.MEAN):
            raise ValueError(
                f"TT table {self.name!r}: pooling {self.pooling} is not supported (SUM or MEAN)"
            )
        try:
            self.tt_init = TTInit(self.tt_init)
        except ValueError:
            raise ValueError(
                f"TT table {self.name!r}: tt_init {self.tt_init!r} is not one of "
                f"{[i.value for i in TTInit]}"
            ) from None
        self.tt_shape()  # validates ranks and shapes, naming the table

    def tt_shape(self) -> TTShape:
        """The table's validated TT shape (factors chosen here when not given: for 2 cores the
        shape the CUDA two-factor kernels run best, ``kernel_shapes.two_factor_shape``)."""
        p, q = self.tt_p_shapes, self.tt_q_shapes
        dim = self.embedding_dim
        if (p is None and q is None and isinstance(self.tt_ranks, (list, tuple)) and len(self.tt_ranks) == 1
                and isinstance(dim, int) and dim >= 1):
            q2 = two_factor_q(dim)  # None: D outside the kernels' limits, keep the general choice
            if q2 is not None:
                p, q = two_factor_p(self.num_embeddings, q2), q2
        return make_tt_shape(
            self.num_embeddings,
            self.embedding_dim,
            self.tt_ranks,
            p=p,
            q=q,
            table_name=self.name,
        )
