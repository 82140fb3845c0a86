"""TTEmbeddingBagConfig: a TorchRec EmbeddingBagConfig plus validated TT fields."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchrec import EmbeddingBagCollection
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType

from torchrec_tt import TTEmbeddingBagCollection, TTEmbeddingBagConfig, TTInit
from torchrec_tt.shapes import SUPPORTED_NUM_CORES


def _cfg(**kw: object) -> TTEmbeddingBagConfig:
    args: dict[str, object] = dict(name="tab", num_embeddings=100, embedding_dim=8,
                                   feature_names=["f"], tt_ranks=[2, 2])
    args.update(kw)
    return TTEmbeddingBagConfig(**args)  # type: ignore[arg-type]


def test_is_a_torchrec_embedding_bag_config() -> None:
    cfg = _cfg(weight_init_min=-0.5, weight_init_max=0.25, pooling=PoolingType.MEAN)
    assert isinstance(cfg, EmbeddingBagConfig)
    assert (cfg.name, cfg.num_embeddings, cfg.embedding_dim) == ("tab", 100, 8)
    assert cfg.feature_names == ["f"] and cfg.num_features() == 1
    assert cfg.pooling == PoolingType.MEAN and cfg.data_type == DataType.FP32
    assert (cfg.get_weight_init_min(), cfg.get_weight_init_max()) == (-0.5, 0.25)
    assert cfg.init_fn is not None  # TorchRec's __post_init__ ran (its EBC asserts on it)
    # So TorchRec itself accepts it: a plain EBC builds a dense [N, D] table from the same config.
    dense = EmbeddingBagCollection([cfg])
    assert dense.embedding_bags["tab"].weight.shape == (100, 8)


def test_defaults() -> None:
    cfg = TTEmbeddingBagConfig(name="t", num_embeddings=10_000, embedding_dim=64)
    assert cfg.tt_ranks == [32, 32]  # three cores
    assert cfg.tt_p_shapes is None and cfg.tt_q_shapes is None
    assert cfg.tt_init is TTInit.SAMPLED_GAUSSIAN
    assert cfg.pooling == PoolingType.SUM
    assert cfg.feature_names == ["t"]
    assert cfg.tt_shape().num_cores == 3
    assert TTEmbeddingBagConfig(name="a", num_embeddings=5, embedding_dim=2).tt_ranks is not (
        TTEmbeddingBagConfig(name="b", num_embeddings=5, embedding_dim=2).tt_ranks
    )  # no shared mutable default


def test_tt_init_accepts_strings() -> None:
    assert _cfg(tt_init="orthogonal").tt_init is TTInit.ORTHOGONAL
    assert _cfg(tt_init=TTInit.SAMPLED_GAUSSIAN).tt_init is TTInit.SAMPLED_GAUSSIAN


def test_explicit_factors_are_used() -> None:
    s = _cfg(tt_p_shapes=[5, 5, 5], tt_q_shapes=[1, 2, 4], tt_ranks=[3, 4]).tt_shape()
    assert (s.p, s.q, s.ranks) == ((5, 5, 5), (1, 2, 4), (3, 4))
    assert (s.num_rows, s.embedding_dim) == (100, 8)
    assert s.core_shapes() == [(5, 1 * 1 * 3), (5, 3 * 2 * 4), (5, 4 * 4 * 1)]


@settings(max_examples=60)
@given(
    num_rows=st.integers(1, 10**9),
    dim=st.integers(1, 256),
    ranks=st.lists(st.integers(1, 64), min_size=1, max_size=3),
)
def test_automatic_shape_can_represent_the_table(num_rows: int, dim: int, ranks: list[int]) -> None:
    cfg = _cfg(num_embeddings=num_rows, embedding_dim=dim, tt_ranks=ranks)
    s = cfg.tt_shape()
    assert s.num_cores == len(ranks) + 1 == len(s.p) == len(s.q)
    assert math.prod(s.p) >= num_rows
    assert math.prod(s.q) == dim
    assert s.ranks == tuple(ranks)
    assert s == cfg.tt_shape()  # deterministic: the state_dict shapes depend on it
    # The module's cores are exactly the shape's (checked on meta: no memory).
    ebc = TTEmbeddingBagCollection([cfg], device="meta")
    assert [tuple(c.shape) for c in ebc.embedding_bags["tab"].cores()] == s.core_shapes()


def test_replace_revalidates() -> None:
    cfg = _cfg()
    assert dataclasses.replace(cfg, tt_ranks=[4]).tt_shape().num_cores == 2
    with pytest.raises(ValueError, match="'tab'"):
        dataclasses.replace(cfg, tt_ranks=[])


# ---------------------------------------------------------------- validation: every error names the table


@pytest.mark.parametrize(
    "kw,problem",
    [
        (dict(tt_ranks=[]), r"0 ranks give 1 cores; supported core counts are \(2, 3, 4\)"),
        (dict(tt_ranks=[2, 2, 2, 2]), r"4 ranks give 5 cores"),
        (dict(tt_ranks=[2, 0]), r"ranks must be positive ints, got \(2, 0\)"),
        (dict(tt_ranks=[2.0, 2]), r"ranks must be positive ints"),
        (dict(tt_p_shapes=[3, 3, 3]), r"row factors p=\(3, 3, 3\) \(prod 27\) cannot represent 100 rows"),
        (dict(tt_p_shapes=[10, 10]), r"len\(p\) = 2 but there are 3 cores"),
        (dict(tt_p_shapes=[0, 200, 1]), r"factors p=\(0, 200, 1\) must be positive ints"),
        (dict(tt_q_shapes=[2, 2, 3]), r"column factors q=\(2, 2, 3\) \(prod 12\) must multiply to embedding_dim=8"),
        (dict(tt_q_shapes=[2, 4]), r"len\(q\) = 2 but there are 3 cores"),
        (dict(data_type=DataType.FP16), r"data_type FP16 is not supported"),
        (dict(data_type=DataType.INT8), r"data_type INT8 is not supported"),
        (dict(pooling=PoolingType.NONE), r"pooling PoolingType.NONE is not supported"),
        (dict(tt_init="svd"), r"tt_init 'svd' is not one of \['sampled_gaussian', 'orthogonal'\]"),
        (dict(num_embeddings=0), r"num_embeddings must be a positive int, got 0"),
        (dict(num_embeddings=-5), r"num_embeddings must be a positive int, got -5"),
        (dict(embedding_dim=0), r"embedding_dim must be a positive int, got 0"),
    ],
)
def test_invalid_config_names_the_table_and_the_problem(kw: dict[str, object], problem: str) -> None:
    with pytest.raises(ValueError, match=rf"TT table 'tab'.*{problem}") as info:
        _cfg(**kw)
    assert "'tab'" in str(info.value)


@pytest.mark.parametrize("name", ["", "a.b"])
def test_invalid_table_name(name: str) -> None:
    with pytest.raises(ValueError, match=rf"TT table name {name!r} must be non-empty and contain no '\.'"):
        _cfg(name=name)


def test_supported_core_counts_are_accepted() -> None:
    for k in SUPPORTED_NUM_CORES:
        cfg = _cfg(tt_ranks=[2] * (k - 1))
        ebc = TTEmbeddingBagCollection([cfg])
        assert len(list(ebc.parameters())) == k
        assert torch.isfinite(ebc.full_weight("tab")).all()
