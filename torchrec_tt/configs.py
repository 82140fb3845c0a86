"""Table configs for TT-compressed embedding bags.

A :class:`TTEmbeddingBagConfig` *is* a TorchRec ``EmbeddingBagConfig`` (same name, size, feature
names, pooling and init bounds, so TorchRec's planner and models accept it) plus the TT fields.
"""

from __future__ import annotations

import enum
import math
import numbers
from dataclasses import dataclass, field

from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType

from torchrec_tt.kernel_shapes import two_factor_p, two_factor_q
from torchrec_tt.shapes import TTShape, make_tt_shape
from torchrec_tt.validation import check_number

__all__ = ["MLETEmbeddingBagConfig", "TTEmbeddingBagConfig", "TTInit", "check_mlet_fields"]


def check_mlet_fields(config: EmbeddingBagConfig, required: bool) -> None:
    """Validates ``mlet_inner_dim`` / ``mlet_init_scale`` of an MLET table, naming it.

    MLET (multi-layer embedding training, arXiv 2006.05623) trains a table of width
    ``mlet_inner_dim = k`` followed by a linear map ``k -> embedding_dim``; the paper's gains are
    in the regime ``k > d``, and ``k < d`` would only restrict the product to rank ``k``, so
    ``k >= embedding_dim`` is required.
    """
    k = getattr(config, "mlet_inner_dim", None)
    if k is None:
        if required:
            raise ValueError(
                f"MLET table {config.name!r}: mlet_inner_dim is required (the width k of the "
                "trained table, k >= embedding_dim)"
            )
        return
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(
            f"table {config.name!r}: mlet_inner_dim must be a positive int, got {k!r}"
        )
    if k < config.embedding_dim:
        raise ValueError(
            f"table {config.name!r}: mlet_inner_dim={k} is below embedding_dim="
            f"{config.embedding_dim}; MLET trains a wider table (k >= d) and projects it to d"
        )
    scale = getattr(config, "mlet_init_scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not (
        math.isfinite(scale) and scale > 0
    ):
        raise ValueError(
            f"table {config.name!r}: mlet_init_scale must be a finite number > 0, got {scale!r}"
        )


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
        mlet_inner_dim (int | None): MLET: train the TT table at row width ``k`` (``tt_q_shapes``
            then factor ``k``) followed by a linear map to ``embedding_dim``; build such tables
            with ``MLETEmbeddingBagCollection`` or ``HybridEmbeddingBagCollection``.
        mlet_init_scale (float): MLET: init std of the product (table x projection) relative to
            the plain table's (see ``MLETEmbeddingBagConfig``).
        tt_cache_rows (int): hot-row cache (TT-Rec): the ``K`` most frequently looked-up ids are
            served from a dense ``K x D`` slab trained like an uncompressed table, the rest from
            TT; 0 (the default) turns it off. ``0 <= K <= num_embeddings``. See
            ``torchrec_tt.modules.hot_cache`` for counting, admission and write-back.
        tt_cache_refresh_steps (int): the cache is refreshed (admission / eviction from the
            decayed counts) at the start of every ``N``-th training forward; ``N >= 1``.
        tt_cache_decay (float): at every refresh the counts are multiplied by this factor
            (LFU with exponential decay), ``0 <= decay <= 1`` (1: plain LFU).

    Example::

        TTEmbeddingBagConfig(name="t_user", num_embeddings=10_000_000, embedding_dim=64,
                             feature_names=["user"], tt_ranks=[32, 32])
    """

    tt_ranks: list[int] = field(default_factory=lambda: [32, 32])
    tt_p_shapes: list[int] | None = None
    tt_q_shapes: list[int] | None = None
    tt_init: TTInit = TTInit.SAMPLED_GAUSSIAN
    mlet_inner_dim: int | None = None
    mlet_init_scale: float = 1.0
    tt_cache_rows: int = 0
    tt_cache_refresh_steps: int = 100
    tt_cache_decay: float = 0.5

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
        check_mlet_fields(self, required=False)
        self._check_cache_fields()
        self.tt_shape()  # validates ranks and shapes, naming the table

    def _check_cache_fields(self) -> None:
        pre = f"TT table {self.name!r}"
        k = self.tt_cache_rows
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 0 <= k <= self.num_embeddings:
            raise ValueError(
                f"{pre}: tt_cache_rows must be an int in [0, num_embeddings={self.num_embeddings}], "
                f"got {k!r}"
            )
        n = self.tt_cache_refresh_steps
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ValueError(f"{pre}: tt_cache_refresh_steps must be an int >= 1, got {n!r}")
        check_number("tt_cache_decay", self.tt_cache_decay, low=0.0, high=1.0, where=pre)
        if k > 0 and self.mlet_inner_dim is not None:
            raise ValueError(
                f"{pre}: tt_cache_rows is not supported with mlet_inner_dim (an MLET table)"
            )
        self.tt_cache_rows = int(k)
        self.tt_cache_refresh_steps = int(n)
        self.tt_cache_decay = float(self.tt_cache_decay)

    @property
    def tt_row_dim(self) -> int:
        """Row width of the TT table: ``mlet_inner_dim`` for an MLET table, else
        ``embedding_dim``."""
        return self.mlet_inner_dim if self.mlet_inner_dim is not None else self.embedding_dim

    def tt_shape(self) -> TTShape:
        """The table's validated TT shape (factors chosen here when not given: for 2 cores the
        shape the CUDA two-factor kernels run best, ``kernel_shapes.two_factor_shape``); its width
        is ``tt_row_dim``."""
        p, q = self.tt_p_shapes, self.tt_q_shapes
        dim = self.tt_row_dim
        if (p is None and q is None and isinstance(self.tt_ranks, (list, tuple)) and len(self.tt_ranks) == 1
                and isinstance(dim, int) and dim >= 1):
            q2 = two_factor_q(dim)  # None: D outside the kernels' limits, keep the general choice
            if q2 is not None:
                p, q = two_factor_p(self.num_embeddings, q2), q2
        return make_tt_shape(
            self.num_embeddings,
            dim,
            self.tt_ranks,
            p=p,
            q=q,
            table_name=self.name,
        )


@dataclass
class MLETEmbeddingBagConfig(EmbeddingBagConfig):
    """An ``EmbeddingBagConfig`` trained as MLET: a table of width ``mlet_inner_dim = k``
    followed by a linear map ``k -> embedding_dim = d`` (arXiv 2006.05623).

    ``embedding_dim`` is what the model sees (the pooled width ``d`` and, after
    ``MLETEmbeddingBagCollection.collapse()``, the stored width); the trained table is ``N x k``.

    Args:
        mlet_inner_dim (int): the inner width ``k >= embedding_dim`` (the paper gains most at
            ``k`` 4-8x ``d``).
        mlet_init_scale (float): init std of the product ``E W^T`` relative to the plain table's
            (TorchRec's default ``uniform(+-sqrt(1/N))``). ``E`` takes the config's init bounds,
            ``W`` orthonormal rows times this scale, so at 1.0 the collapsed table starts with the
            plain table's entry variance whatever ``k`` is (``MLETEmbeddingBagCollection``).

    Example::

        MLETEmbeddingBagConfig(name="t_user", num_embeddings=1_000_000, embedding_dim=16,
                               feature_names=["user"], mlet_inner_dim=128)
    """

    mlet_inner_dim: int | None = None
    mlet_init_scale: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.feature_names:
            self.feature_names = [self.name]
        if not self.name or "." in self.name:
            raise ValueError(f"MLET table name {self.name!r} must be non-empty and contain no '.'")
        if self.pooling not in (PoolingType.SUM, PoolingType.MEAN):
            raise ValueError(
                f"MLET table {self.name!r}: pooling {self.pooling} is not supported (SUM or MEAN: "
                "the projection is linear, so it commutes with them)"
            )
        check_mlet_fields(self, required=True)
