"""Config swap (TTPolicy / swap_configs), HybridEmbeddingBagCollection and TT-SVD conversion."""

from __future__ import annotations

import pytest
import torch
import torchrec.fx
from torchrec import EmbeddingBagCollection
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_tt import TTEmbeddingBagCollection, TTEmbeddingBagConfig
from torchrec_tt.swap import (
    HybridEmbeddingBagCollection,
    TTPolicy,
    config_bytes,
    convert_to_tt,
    embedding_bytes,
    select_tt_tables,
    swap_configs,
)

ROWS = [50, 4000, 7, 900, 12000, 300]
DIM = 8


def _configs() -> list[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(name=f"t{i}", num_embeddings=n, embedding_dim=DIM,
                           feature_names=[f"f{i}"],
                           pooling=PoolingType.MEAN if i == 3 else PoolingType.SUM)
        for i, n in enumerate(ROWS)
    ]


def _kjt(configs: list[EmbeddingBagConfig], batch: int, seed: int,
         order: list[int] | None = None) -> KeyedJaggedTensor:
    gen = torch.Generator().manual_seed(seed)
    order = order if order is not None else list(range(len(configs)))
    keys, values, lengths = [], [], []
    for i in order:
        c = configs[i]
        lens = torch.randint(0, 4, (batch,), generator=gen)
        keys.append(c.feature_names[0])
        lengths.append(lens)
        values.append(torch.randint(0, c.num_embeddings, (int(lens.sum()),), generator=gen))
    return KeyedJaggedTensor.from_lengths_sync(keys, torch.cat(values), torch.cat(lengths))


# ------------------------------------------------------------------ policies


def test_largest_selects_k_biggest_and_keeps_the_rest() -> None:
    configs = _configs()
    swapped = swap_configs(configs, TTPolicy(largest=2, ranks=4))
    assert [type(c).__name__ for c in swapped] == [
        "EmbeddingBagConfig", "TTEmbeddingBagConfig", "EmbeddingBagConfig",
        "EmbeddingBagConfig", "TTEmbeddingBagConfig", "EmbeddingBagConfig",
    ]
    for before, after in zip(configs, swapped):
        assert (after.name, after.num_embeddings, after.embedding_dim, after.feature_names,
                after.pooling) == (before.name, before.num_embeddings, before.embedding_dim,
                                   before.feature_names, before.pooling)
        assert after.weight_init_max == before.weight_init_max
        if isinstance(after, TTEmbeddingBagConfig):
            assert after.tt_ranks == [4]  # TTPolicy defaults to 2 cores
        else:
            assert after is before


def test_min_rows_and_per_table_ranks() -> None:
    policy = TTPolicy(min_rows=900, ranks={"t4": [6, 5]}, default_ranks=3, num_cores=3)
    assert select_tt_tables(_configs(), policy) == ["t1", "t3", "t4"]
    swapped = {c.name: c for c in swap_configs(_configs(), policy)}
    assert swapped["t4"].tt_ranks == [6, 5]
    assert swapped["t1"].tt_ranks == [3, 3]
    assert swapped["t3"].pooling == PoolingType.MEAN


def test_swap_accepts_an_embedding_bag_collection() -> None:
    ebc = EmbeddingBagCollection(_configs(), device=torch.device("meta"))
    assert select_tt_tables(ebc.embedding_bag_configs(), TTPolicy(tables=["t0"])) == ["t0"]
    assert [c.name for c in swap_configs(ebc, TTPolicy(largest=1))
            if isinstance(c, TTEmbeddingBagConfig)] == ["t4"]


def test_budget_compresses_largest_first_until_it_fits() -> None:
    configs = _configs()
    total = embedding_bytes(configs)
    policy = TTPolicy(memory_budget_bytes=int(total * 0.6), ranks=4)
    chosen = select_tt_tables(configs, policy)
    assert chosen == ["t4"]  # the largest table alone (12000 of 17257 rows) is enough
    swapped = swap_configs(configs, policy)
    assert embedding_bytes(swapped) <= total * 0.6
    tighter = TTPolicy(memory_budget_bytes=int(total * 0.3), ranks=4)
    assert select_tt_tables(configs, tighter) == ["t1", "t4"]
    assert embedding_bytes(swap_configs(configs, tighter)) <= total * 0.3


def test_bytes_accounting() -> None:
    plain = EmbeddingBagConfig(name="a", num_embeddings=10, embedding_dim=4, feature_names=["a"])
    half = EmbeddingBagConfig(name="b", num_embeddings=10, embedding_dim=4, feature_names=["b"],
                              data_type=DataType.FP16)
    tt = TTEmbeddingBagConfig(name="c", num_embeddings=1000, embedding_dim=8,
                              feature_names=["c"], tt_ranks=[2, 2])
    assert config_bytes(plain) == 160 and config_bytes(half) == 80
    assert config_bytes(tt) == 4 * tt.tt_shape().num_parameters()


@pytest.mark.parametrize(
    ("policy", "match"),
    [
        (TTPolicy(min_rows=10**6), r"min_rows=1,000,000\) selects no table.*t4 \(12,000 rows\)"),
        (TTPolicy(memory_budget_bytes=10**9), r"selects no table: the 6 tables already take"),
        (TTPolicy(memory_budget_bytes=1000, ranks=4), r"cannot be met: .*still take"),
        (TTPolicy(largest=7), r"only 6 tables"),
        (TTPolicy(tables=["nope"]), r"unknown tables \['nope'\]"),
    ],
)
def test_policy_errors(policy: TTPolicy, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        swap_configs(_configs(), policy)


def test_policy_needs_exactly_one_selector() -> None:
    with pytest.raises(ValueError, match="exactly one of"):
        TTPolicy()
    with pytest.raises(ValueError, match="exactly one of"):
        TTPolicy(largest=1, min_rows=5)
    with pytest.raises(ValueError, match="must be an int >= 1"):
        TTPolicy(largest=0)


def test_non_fp32_table_cannot_become_tt() -> None:
    configs = [EmbeddingBagConfig(name="h", num_embeddings=100, embedding_dim=8,
                                  feature_names=["h"], data_type=DataType.FP16)]
    with pytest.raises(ValueError, match="'h' has data_type .*only FP32"):
        swap_configs(configs, TTPolicy(largest=1))


# ------------------------------------------------------------------ hybrid module


def _reference_pooled(hybrid: HybridEmbeddingBagCollection, kjt: KeyedJaggedTensor,
                      configs: list[EmbeddingBagConfig]) -> dict[str, torch.Tensor]:
    """Per-feature pooling with nn.functional.embedding_bag over each table's dense weight."""
    out = {}
    feats = kjt.to_dict()
    for c in configs:
        if isinstance(c, TTEmbeddingBagConfig):
            weight = hybrid.tt.full_weight(c.name)
        else:
            weight = hybrid.ebc.embedding_bags[c.name].weight
        jt = feats[c.feature_names[0]]
        mode = "mean" if c.pooling == PoolingType.MEAN else "sum"
        out[c.feature_names[0]] = torch.nn.functional.embedding_bag(
            jt.values(), weight, jt.offsets(), mode=mode, include_last_offset=True)
    return out


def test_hybrid_forward_keeps_table_order_and_matches_dense_reference() -> None:
    torch.manual_seed(0)
    configs = swap_configs(_configs(), TTPolicy(largest=3, ranks=3))
    hybrid = HybridEmbeddingBagCollection(configs)
    assert hybrid.tt_table_names() == ["t1", "t3", "t4"]
    assert [c.name for c in hybrid.embedding_bag_configs()] == [c.name for c in configs]
    kjt = _kjt(configs, batch=5, seed=1, order=[4, 2, 0, 5, 1, 3])  # keys in another order
    kt = hybrid(kjt)
    assert kt.keys() == [f"f{i}" for i in range(len(ROWS))]
    assert kt.values().shape == (5, DIM * len(ROWS))
    ref = _reference_pooled(hybrid, kjt, configs)
    for key, value in kt.to_dict().items():
        torch.testing.assert_close(value, ref[key], rtol=1e-5, atol=1e-6)
    kt.values().sum().backward()
    assert hybrid.tt.embedding_bags["t4"].core_1.grad is not None
    assert hybrid.ebc.embedding_bags["t0"].weight.grad is not None


def test_hybrid_is_dlrm_sparse_arch() -> None:
    torch.manual_seed(0)
    configs = swap_configs(_configs(), TTPolicy(largest=2, ranks=4))
    model = DLRM(embedding_bag_collection=HybridEmbeddingBagCollection(configs),
                 dense_in_features=3, dense_arch_layer_sizes=[8, DIM],
                 over_arch_layer_sizes=[8, 1])
    logits = model(torch.randn(4, 3), _kjt(configs, batch=4, seed=2))
    assert logits.shape == (4, 1) and torch.isfinite(logits).all()


def test_hybrid_takes_extra_keys_and_traces_with_torchrec_fx() -> None:
    import torchrec.fx

    torch.manual_seed(0)
    configs = swap_configs(_configs(), TTPolicy(largest=2, ranks=4))
    hybrid = HybridEmbeddingBagCollection(configs)
    model = DLRM(embedding_bag_collection=hybrid, dense_in_features=3,
                 dense_arch_layer_sizes=[8, DIM], over_arch_layer_sizes=[8, 1])
    traced = torchrec.fx.symbolic_trace(model)
    assert not any(n.op == "call_module" and "select" in n.target.lower()
                   for n in traced.graph.nodes)
    extra = [*configs, EmbeddingBagConfig(name="x", num_embeddings=9, embedding_dim=DIM,
                                          feature_names=["other"])]
    dense = torch.randn(4, 3)
    for order in ([0, 1, 2, 3, 4, 5], [5, 3, 1, 4, 2, 0], [6, 4, 0, 3, 5, 1, 2]):
        kjt = _kjt(extra, batch=4, seed=len(order), order=order)
        torch.testing.assert_close(traced(dense, kjt), model(dense, kjt), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"lacks the features 'f4' \(table 't4'\)"):
        traced(dense, _kjt(configs, batch=4, seed=0, order=[0, 1, 2, 3, 5]))


def test_hybrid_memory_stats() -> None:
    configs = swap_configs(_configs(), TTPolicy(largest=2, ranks=4))
    stats = HybridEmbeddingBagCollection(configs, device="meta").memory_stats()
    assert stats["dense_bytes"] == sum(ROWS) * DIM * 4
    assert stats["bytes"] == embedding_bytes(configs)
    assert stats["compression"] == pytest.approx(stats["dense_bytes"] / stats["bytes"])
    assert stats["tt_tables"] == 2


def test_hybrid_shared_features_across_children() -> None:
    # "x" feeds a plain and a TT table: keys "x@a" / "x@b" as TorchRec's EBC names them.
    configs = [EmbeddingBagConfig(name="a", num_embeddings=5, embedding_dim=4, feature_names=["x"]),
               TTEmbeddingBagConfig(name="b", num_embeddings=50, embedding_dim=4,
                                    feature_names=["x", "y"], tt_ranks=[2, 2])]
    hybrid = HybridEmbeddingBagCollection(configs)
    plain = EmbeddingBagCollection([EmbeddingBagConfig(name=c.name, num_embeddings=c.num_embeddings,
                                                       embedding_dim=4, feature_names=c.feature_names)
                                    for c in configs])
    kjt = KeyedJaggedTensor.from_lengths_sync(["y", "x"], torch.tensor([7, 1, 4, 2]),
                                              torch.tensor([1, 0, 2, 1]))
    out = hybrid(kjt)
    assert out.keys() == plain(kjt).keys() == ["x@a", "x@b", "y"]
    assert hybrid.ebc is not None and hybrid.tt is not None
    assert torch.equal(out["x@a"], hybrid.ebc(kjt)["x"])
    assert torch.equal(out["x@b"], hybrid.tt(kjt)["x"])
    assert torch.equal(out["y"], hybrid.tt(kjt)["y"])
    traced = torchrec.fx.symbolic_trace(hybrid)
    assert torch.equal(traced(kjt).values(), out.values())


# ------------------------------------------------------------------ TT-SVD conversion


def test_convert_trained_ebc_by_tt_svd() -> None:
    torch.manual_seed(0)
    configs = _configs()
    ebc = EmbeddingBagCollection(configs)
    # A table that is exactly a TT of ranks (4, 4) is recovered by TT-SVD at ranks (8, 8).
    t1 = ebc.embedding_bags["t1"].weight
    source = TTEmbeddingBagCollection(swap_configs([configs[1]], TTPolicy(largest=1, ranks=4)))
    with torch.no_grad():
        t1.copy_(source.full_weight("t1"))
    with pytest.warns(UserWarning, match=r"loses much of these tables \(relative reconstruction error 't4'"):
        hybrid = convert_to_tt(ebc, TTPolicy(tables=["t1", "t4"], ranks=8))
    assert hybrid.tt_table_names() == ["t1", "t4"]
    assert hybrid.tt_conversion_errors["t1"] < 1e-4  # exactly a TT: recovered
    torch.testing.assert_close(hybrid.tt.full_weight("t1"), t1.detach(), rtol=1e-4, atol=1e-5)
    for name in ("t0", "t2", "t3", "t5"):
        torch.testing.assert_close(hybrid.ebc.embedding_bags[name].weight,
                                   ebc.embedding_bags[name].weight, rtol=0, atol=0)
    w4 = ebc.embedding_bags["t4"].weight.detach()
    err = (hybrid.tt.full_weight("t4") - w4).norm() / w4.norm()
    assert err < 1.0  # a rank-8 TT of a random table keeps part of it, never more than all
    assert abs(hybrid.tt_conversion_errors["t4"] - float(err)) < 1e-4  # the reported error
    kjt = _kjt(configs, batch=6, seed=3)
    out, ref = hybrid(kjt), ebc(kjt)
    torch.testing.assert_close(out["f1"], ref["f1"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["f0"], ref["f0"], rtol=0, atol=0)


def test_convert_rejects_other_modules() -> None:
    with pytest.raises(TypeError, match="expected a torchrec EmbeddingBagCollection"):
        convert_to_tt(torch.nn.Linear(2, 2), TTPolicy(largest=1))  # type: ignore[arg-type]


def test_merge_goes_by_key_not_position() -> None:
    # A sharded child's KeyedTensor lists its keys in plan order, not table order.
    from torchrec.sparse.jagged_tensor import KeyedTensor

    from torchrec_tt.swap import _merge_pooled

    a, b, c = torch.full((2, 1), 1.0), torch.full((2, 2), 2.0), torch.full((2, 3), 3.0)
    plain = KeyedTensor.from_tensor_list(["y", "x"], [b, a])
    tt = KeyedTensor.from_tensor_list(["x"], [c])
    out = _merge_pooled(plain, tt, None, ["x", "y"], ["x@p", "y"], ["x"], ["x@t"], [], [],
                        ["x@p", "y", "x@t"])
    assert out.keys() == ["x@p", "y", "x@t"]
    assert torch.equal(out.values(), torch.cat([a, b, c], dim=1))
