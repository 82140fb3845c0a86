"""TTEmbeddingBagCollection: the KJT -> KeyedTensor module path against dense references, its
TorchRec contract (configs, state_dict, meta device, DLRM swap, fx tracing) and bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchrec.fx
from hypothesis import given, settings
from hypothesis import strategies as st
from torchrec import EmbeddingBagCollection
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_tt import TTEmbeddingBagCollection, TTEmbeddingBagConfig, TTInit
from torchrec_tt.shapes import max_useful_ranks

# ---------------------------------------------------------------- helpers


def _random_kjt(
    tables: list[TTEmbeddingBagConfig],
    keys: list[str],
    batch_size: int,
    seed: int,
    *,
    max_bag: int = 3,
    values_dtype: torch.dtype = torch.int64,
    lengths_dtype: torch.dtype = torch.int64,
    weighted: bool = False,
) -> KeyedJaggedTensor:
    """A KJT with ``keys`` (any order), bags of 0..max_bag in-range lookups."""
    gen = torch.Generator().manual_seed(seed)
    rows = {f: cfg.num_embeddings for cfg in tables for f in cfg.feature_names}
    lengths = torch.randint(0, max_bag + 1, (len(keys) * batch_size,), generator=gen)
    values = torch.cat(
        [
            torch.randint(0, rows[k], (int(lengths[i * batch_size : (i + 1) * batch_size].sum()),),
                          generator=gen)
            for i, k in enumerate(keys)
        ]
    )
    weights = torch.rand(values.numel(), generator=gen) + 0.1 if weighted else None
    return KeyedJaggedTensor.from_lengths_sync(
        keys, values.to(values_dtype), lengths.to(lengths_dtype), weights=weights
    )


def _dense_reference(
    ebc: TTEmbeddingBagCollection, kjt: KeyedJaggedTensor, weighted: bool
) -> dict[str, torch.Tensor]:
    """Per feature: F.embedding_bag over ``full_weight(table)`` (differentiable in the cores)."""
    out: dict[str, torch.Tensor] = {}
    jts = kjt.to_dict()
    for cfg in ebc.embedding_bag_configs():
        dense = ebc.full_weight(cfg.name)
        for f in cfg.feature_names:
            jt = jts[f]
            idx, off = jt.values().long(), jt.offsets().long()
            if weighted:
                w = jt.weights().to(dense.dtype)
                pooled = F.embedding_bag(idx, dense, off[:-1], mode="sum", per_sample_weights=w)
                if cfg.pooling == PoolingType.MEAN:  # FBGEMM semantics: weighted sum / length
                    pooled = pooled / (off[1:] - off[:-1]).clamp(min=1).to(dense.dtype)[:, None]
            else:
                mode = "mean" if cfg.pooling == PoolingType.MEAN else "sum"
                pooled = F.embedding_bag(idx, dense, off[:-1], mode=mode)
            out[f] = pooled
    return out


def _two_tables(**kw: object) -> list[TTEmbeddingBagConfig]:
    return [
        TTEmbeddingBagConfig(
            name="t1", num_embeddings=100, embedding_dim=8, feature_names=["f1", "f2"],
            tt_ranks=[3, 4], **kw,
        ),
        TTEmbeddingBagConfig(
            name="t2", num_embeddings=37, embedding_dim=6, feature_names=["g"], tt_ranks=[5],
            pooling=PoolingType.MEAN, **kw,
        ),
    ]


@st.composite
def _collections(draw: st.DrawFn) -> list[TTEmbeddingBagConfig]:
    tables = []
    for t in range(draw(st.integers(1, 3))):
        k = draw(st.integers(2, 4))
        tables.append(
            TTEmbeddingBagConfig(
                name=f"t{t}",
                num_embeddings=draw(st.integers(1, 300)),
                embedding_dim=draw(st.integers(1, 12)),
                feature_names=[f"t{t}_f{i}" for i in range(draw(st.integers(1, 2)))],
                tt_ranks=[draw(st.integers(1, 4)) for _ in range(k - 1)],
                pooling=draw(st.sampled_from([PoolingType.SUM, PoolingType.MEAN])),
                tt_init=draw(st.sampled_from(list(TTInit))),
            )
        )
    return tables


# ---------------------------------------------------------------- forward / backward


@settings(max_examples=80)
@given(
    tables=_collections(),
    data=st.data(),
    batch_size=st.integers(1, 5),
    values_dtype=st.sampled_from([torch.int32, torch.int64]),
    lengths_dtype=st.sampled_from([torch.int32, torch.int64]),
    weighted=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_module_matches_dense_embedding_bag_forward_and_backward(
    tables: list[TTEmbeddingBagConfig],
    data: st.DataObject,
    batch_size: int,
    values_dtype: torch.dtype,
    lengths_dtype: torch.dtype,
    weighted: bool,
    seed: int,
) -> None:
    torch.manual_seed(seed)
    ebc = TTEmbeddingBagCollection(tables, is_weighted=weighted).double()
    features = [f for cfg in tables for f in cfg.feature_names]
    keys = data.draw(st.permutations(features), label="kjt key order")
    kjt = _random_kjt(
        tables, list(keys), batch_size, seed, values_dtype=values_dtype,
        lengths_dtype=lengths_dtype, weighted=weighted,
    )
    kt = ebc(kjt)

    # KeyedTensor contract: keys in table order whatever the KJT order, D per key, [B, sum D].
    dims = [cfg.embedding_dim for cfg in tables for _ in cfg.feature_names]
    assert isinstance(kt, KeyedTensor)
    assert kt.keys() == features
    assert kt.length_per_key() == dims
    assert kt.values().shape == (batch_size, sum(dims))
    assert kt.values().dtype == torch.float64

    ref = _dense_reference(ebc, kjt, weighted)
    for f in features:
        torch.testing.assert_close(kt[f], ref[f], rtol=1e-10, atol=1e-12)

    # Backward: core gradients of the module == autograd through the dense reconstruction.
    gen = torch.Generator().manual_seed(seed + 1)
    grad_out = torch.randn(kt.values().shape, generator=gen, dtype=torch.float64)
    cores = list(ebc.parameters())
    got = torch.autograd.grad(kt.values(), cores, grad_out)
    want = torch.autograd.grad(torch.cat([ref[f] for f in features], dim=1), cores, grad_out)
    for name, g, w in zip(dict(ebc.named_parameters()), got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN])
def test_empty_bags_give_zero_rows_and_zero_gradients(pooling: PoolingType) -> None:
    tables = [
        TTEmbeddingBagConfig(name="t", num_embeddings=50, embedding_dim=4, feature_names=["a", "b"],
                             tt_ranks=[2, 2], pooling=pooling)
    ]
    ebc = TTEmbeddingBagCollection(tables)
    # a: bags [1, 2], [], [3]; b: all three empty.
    kjt = KeyedJaggedTensor.from_lengths_sync(
        ["a", "b"], torch.tensor([1, 2, 3]), torch.tensor([2, 0, 1, 0, 0, 0])
    )
    kt = ebc(kjt)
    assert torch.equal(kt["a"][1], torch.zeros(4))
    assert torch.equal(kt["b"], torch.zeros(3, 4))
    assert kt["a"][0].abs().sum() > 0
    # All bags empty: zeros, and zero gradients.
    empty = KeyedJaggedTensor.from_lengths_sync(
        ["a", "b"], torch.empty(0, dtype=torch.int64), torch.zeros(6, dtype=torch.int64)
    )
    out = ebc(empty).values()
    assert torch.equal(out, torch.zeros(3, 8))
    grads = torch.autograd.grad(out.sum(), list(ebc.parameters()))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_float32_module_matches_torchrec_embedding_bag_collection() -> None:
    """A TorchRec EBC built from the very same configs and loaded with ``full_weight`` gives the
    same KeyedTensor (unweighted SUM/MEAN, and weighted SUM, the case TorchRec's EBC supports)."""
    torch.manual_seed(0)
    for weighted, tables in ((False, _two_tables()), (True, _two_tables()[:1])):
        tt = TTEmbeddingBagCollection(tables, is_weighted=weighted)
        dense = EmbeddingBagCollection(tables, is_weighted=weighted)  # TT configs are EBC configs
        with torch.no_grad():
            for cfg in tables:
                dense.embedding_bags[cfg.name].weight.copy_(tt.full_weight(cfg.name))
        features = [f for cfg in tables for f in cfg.feature_names]
        kjt = _random_kjt(tables, features[::-1], 6, seed=1, weighted=weighted)
        got, want = tt(kjt), dense(kjt)
        assert got.keys() == want.keys()
        assert got.length_per_key() == want.length_per_key()
        torch.testing.assert_close(got.values(), want.values(), rtol=1e-5, atol=1e-6)


def test_weights_are_cast_to_the_core_dtype_and_ignored_when_unweighted() -> None:
    tables = _two_tables()
    kjt = _random_kjt(tables, ["g", "f2", "f1"], 4, seed=3, weighted=True)
    torch.manual_seed(0)
    weighted = TTEmbeddingBagCollection(tables, is_weighted=True)
    unweighted = TTEmbeddingBagCollection(tables, is_weighted=False)
    unweighted.load_state_dict(weighted.state_dict())
    ones = KeyedJaggedTensor.from_lengths_sync(
        kjt.keys(), kjt.values(), kjt.lengths(), weights=torch.ones(kjt.values().numel())
    )
    # Unit weights == no weights; an unweighted collection ignores the KJT's weights.
    torch.testing.assert_close(weighted(ones).values(), unweighted(kjt).values())
    assert not torch.allclose(weighted(kjt).values(), unweighted(kjt).values())
    # float64 weights into a float32 module.
    w64 = KeyedJaggedTensor.from_lengths_sync(
        kjt.keys(), kjt.values(), kjt.lengths(), weights=kjt.weights().double()
    )
    torch.testing.assert_close(weighted(w64).values(), weighted(kjt).values())


# ---------------------------------------------------------------- TorchRec contract


def test_interface_configs_and_is_weighted() -> None:
    tables = _two_tables()
    ebc = TTEmbeddingBagCollection(tables, is_weighted=True)
    assert ebc.is_weighted() is True
    assert TTEmbeddingBagCollection(tables).is_weighted() is False
    configs = ebc.embedding_bag_configs()
    assert [c.name for c in configs] == ["t1", "t2"]
    assert all(a is b for a, b in zip(configs, tables))
    configs.clear()  # a copy: the module keeps its own list
    assert len(ebc.embedding_bag_configs()) == 2
    assert ebc.tt_shapes() == {c.name: c.tt_shape() for c in tables}


def test_state_dict_names_shapes_and_round_trip() -> None:
    tables = _two_tables()
    torch.manual_seed(0)
    a = TTEmbeddingBagCollection(tables)
    torch.manual_seed(1)
    b = TTEmbeddingBagCollection(tables)
    sd = a.state_dict()
    expected = [
        f"embedding_bags.{cfg.name}.core_{k}"
        for cfg in tables
        for k in range(len(cfg.tt_ranks) + 1)
    ]
    assert list(sd.keys()) == expected
    assert [n for n, _ in a.named_parameters()] == expected
    for cfg in tables:
        shapes = cfg.tt_shape().core_shapes()
        for k, shape in enumerate(shapes):
            t = sd[f"embedding_bags.{cfg.name}.core_{k}"]
            assert t.dim() == 2 and tuple(t.shape) == shape
    kjt = _random_kjt(tables, ["f1", "f2", "g"], 5, seed=2)
    assert not torch.allclose(a(kjt).values(), b(kjt).values())
    b.load_state_dict(sd)
    assert torch.equal(a(kjt).values(), b(kjt).values())
    for cfg in tables:
        assert torch.equal(a.full_weight(cfg.name), b.full_weight(cfg.name))
    # The names are what a checkpoint relies on: a missing or misshapen core is refused.
    bad = dict(sd)
    del bad["embedding_bags.t2.core_1"]
    with pytest.raises(RuntimeError, match="embedding_bags.t2.core_1"):
        b.load_state_dict(bad)
    bad = dict(sd)
    bad["embedding_bags.t1.core_0"] = torch.zeros(1, 1)
    with pytest.raises(RuntimeError, match="embedding_bags.t1.core_0"):
        b.load_state_dict(bad)


def test_meta_construction_then_materialise() -> None:
    # A 10-billion-row table: cores only, and on meta not even those.
    big = TTEmbeddingBagConfig(name="big", num_embeddings=10**10, embedding_dim=128,
                               feature_names=["x"], tt_ranks=[64, 64])
    tables = [*_two_tables(), big]
    meta = TTEmbeddingBagCollection(tables, device=torch.device("meta"))
    for cfg in tables:
        shapes = [tuple(p.shape) for p in meta.embedding_bags[cfg.name].cores()]
        assert shapes == cfg.tt_shape().core_shapes()
    assert all(p.is_meta for p in meta.parameters())
    # The fake kernel gives the output shape on meta (what the planner / tracing see).
    kjt = _random_kjt(tables, ["x", "g", "f1", "f2"], 3, seed=0)
    out = meta(KeyedJaggedTensor.from_lengths_sync(
        kjt.keys(), kjt.values().to("meta"), kjt.lengths().to("meta")))
    assert out.values().is_meta and out.values().shape == (3, 8 + 8 + 6 + 128)

    small = _two_tables()
    meta = TTEmbeddingBagCollection(small, device="meta")
    meta.to_empty(device="cpu")
    torch.manual_seed(7)
    meta.reset_parameters()
    torch.manual_seed(7)
    eager = TTEmbeddingBagCollection(small)  # __init__ initialises with the same RNG draws
    for (n, p), q in zip(meta.named_parameters(), eager.parameters()):
        assert p.device.type == "cpu" and torch.isfinite(p).all(), n
        assert torch.equal(p, q), n
    kjt = _random_kjt(small, ["f1", "f2", "g"], 4, seed=5)
    assert torch.equal(meta(kjt).values(), eager(kjt).values())


@pytest.mark.parametrize("init", list(TTInit))
@pytest.mark.parametrize(
    "num_rows,dim,ranks", [(1000, 16, [8, 8]), (3000, 12, [6]), (20000, 16, [4, 4, 4])]
)
def test_initializer_statistics_match_torchrec_default(
    init: TTInit, num_rows: int, dim: int, ranks: list[int]
) -> None:
    """Reconstructed rows: mean ~ 0, std ~ 1/sqrt(3N) (TorchRec's uniform(+-1/sqrt(N)))."""
    target = 1.0 / math.sqrt(3 * num_rows)
    cfg = TTEmbeddingBagConfig(name="t", num_embeddings=num_rows, embedding_dim=dim,
                               feature_names=["f"], tt_ranks=ranks, tt_init=init)
    # TorchRec's own init of the same config, as a check on the target itself.
    torch.manual_seed(0)
    dense = EmbeddingBagCollection([cfg]).embedding_bags["t"].weight.detach()
    assert abs(dense.std().item() / target - 1) < 0.02
    variances, means = [], []
    for seed in range(12):
        torch.manual_seed(seed)
        w = TTEmbeddingBagCollection([cfg]).full_weight("t").detach().double()
        assert w.shape == (num_rows, dim)
        # A TT table has few random parameters, so one draw's std spreads more than a dense one's.
        assert 0.7 < w.std().item() / target < 1.3, seed
        variances.append(w.var().item())
        means.append(w.mean().item())
    assert abs(math.sqrt(sum(variances) / len(variances)) / target - 1) < 0.08
    assert max(abs(m) for m in means) < 0.1 * target


def test_initializer_uses_the_config_bounds() -> None:
    lo, hi = -0.3, 0.3  # std (hi - lo) / sqrt(12)
    for init in TTInit:
        cfg = TTEmbeddingBagConfig(name="t", num_embeddings=5000, embedding_dim=32,
                                   feature_names=["f"], tt_ranks=[16, 16], tt_init=init,
                                   weight_init_min=lo, weight_init_max=hi)
        stds = []
        for seed in range(6):
            torch.manual_seed(seed)
            stds.append(TTEmbeddingBagCollection([cfg]).full_weight("t").std().item())
        rms = math.sqrt(sum(s * s for s in stds) / len(stds))
        assert abs(rms / ((hi - lo) / math.sqrt(12)) - 1) < 0.08, init


def test_load_dense_weight_is_exact_at_full_rank() -> None:
    gen = torch.Generator().manual_seed(0)
    p, q = (2, 3, 4), (1, 2, 3)
    for n in (24, 19):  # prod(p) == N and N < prod(p) (zero-padded rows)
        cfg = TTEmbeddingBagConfig(name="t", num_embeddings=n, embedding_dim=6, feature_names=["f"],
                                   tt_ranks=list(max_useful_ranks(p, q)), tt_p_shapes=list(p),
                                   tt_q_shapes=list(q))
        ebc = TTEmbeddingBagCollection([cfg]).double()
        weight = torch.randn(n, 6, generator=gen, dtype=torch.float64)
        ebc.load_dense_weight("t", weight)
        torch.testing.assert_close(ebc.full_weight("t"), weight, rtol=1e-10, atol=1e-10)
        # ... and lookups then equal F.embedding_bag over the dense table.
        kjt = KeyedJaggedTensor.from_lengths_sync(["f"], torch.arange(n), torch.tensor([n - 5, 5]))
        want = F.embedding_bag(torch.arange(n), weight, torch.tensor([0, n - 5]), mode="sum")
        torch.testing.assert_close(ebc(kjt)["f"], want, rtol=1e-10, atol=1e-10)


def test_load_dense_weight_recovers_a_low_rank_table_and_error_falls_with_rank() -> None:
    torch.manual_seed(0)
    # N = prod(p): with padded rows TT-SVD sees zeros there, which a random TT does not have.
    cfg = dict(name="t", num_embeddings=336, embedding_dim=16, feature_names=["f"],
               tt_p_shapes=[6, 7, 8], tt_q_shapes=[2, 2, 4])
    source = TTEmbeddingBagCollection([TTEmbeddingBagConfig(**cfg, tt_ranks=[3, 2])]).double()
    low_rank = source.full_weight("t").detach()
    target = TTEmbeddingBagCollection([TTEmbeddingBagConfig(**cfg, tt_ranks=[3, 2])]).double()
    target.load_dense_weight("t", low_rank)  # the table's TT ranks fit: exact
    torch.testing.assert_close(target.full_weight("t"), low_rank, rtol=1e-9, atol=1e-12)
    dense = torch.randn(336, 16, dtype=torch.float64)
    errors = []
    for r in (1, 2, 4, 8, 16):
        ebc = TTEmbeddingBagCollection([TTEmbeddingBagConfig(**cfg, tt_ranks=[r, r])]).double()
        ebc.load_dense_weight("t", dense)
        errors.append((ebc.full_weight("t") - dense).norm().item())
    assert all(a > b for a, b in zip(errors, errors[1:])), errors


def test_compression_stats_against_hand_counts() -> None:
    tables = [
        TTEmbeddingBagConfig(name="a", num_embeddings=1000, embedding_dim=16, feature_names=["x"],
                             tt_ranks=[4, 4], tt_p_shapes=[10, 10, 10], tt_q_shapes=[2, 2, 4]),
        TTEmbeddingBagConfig(name="b", num_embeddings=50, embedding_dim=6, feature_names=["y"],
                             tt_ranks=[3], tt_p_shapes=[5, 10], tt_q_shapes=[2, 3]),
    ]
    ebc = TTEmbeddingBagCollection(tables)
    stats = ebc.compression_stats()
    # a: [10, 1*2*4] + [10, 4*2*4] + [10, 4*4*1] = 80 + 320 + 160 = 560 parameters.
    assert stats["a"] == {"tt_parameters": 560, "tt_bytes": 2240, "cache_bytes": 0, "dense_bytes": 64000,
                          "compression": pytest.approx(64000 / 2240)}
    # b: [5, 1*2*3] + [10, 3*3*1] = 30 + 90 = 120; dense 50*6 (unpadded rows).
    assert stats["b"] == {"tt_parameters": 120, "tt_bytes": 480, "cache_bytes": 0, "dense_bytes": 1200,
                          "compression": pytest.approx(2.5)}
    assert stats["total"] == {"tt_parameters": 680, "tt_bytes": 2720, "cache_bytes": 0, "dense_bytes": 65200,
                              "compression": pytest.approx(65200 / 2720)}
    assert sum(p.numel() for p in ebc.parameters()) == 680


# ---------------------------------------------------------------- in a model: DLRM, training, fx


def _dlrm_tables(config_cls: type[EmbeddingBagConfig]) -> list[EmbeddingBagConfig]:
    # Exactly what a pipeline would write; only the class differs between the two models.
    return [
        config_cls(name="t_user", num_embeddings=1000, embedding_dim=8, feature_names=["user"]),
        config_cls(name="t_item", num_embeddings=500, embedding_dim=8,
                   feature_names=["item", "item_hist"], pooling=PoolingType.MEAN),
    ]


def _dlrm(ebc: torch.nn.Module) -> DLRM:
    return DLRM(embedding_bag_collection=ebc, dense_in_features=4,
                dense_arch_layer_sizes=[16, 8], over_arch_layer_sizes=[8, 1])


def _dlrm_batch(batch_size: int = 16) -> tuple[torch.Tensor, KeyedJaggedTensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    kjt = _random_kjt(_dlrm_tables(EmbeddingBagConfig), ["item_hist", "user", "item"],
                      batch_size, seed=0)
    dense = torch.randn(batch_size, 4, generator=gen)
    labels = torch.randint(0, 2, (batch_size,), generator=gen).float()
    return dense, kjt, labels


def test_dlrm_config_swap_forward_backward_and_training() -> None:
    torch.manual_seed(0)
    plain = _dlrm(EmbeddingBagCollection(_dlrm_tables(EmbeddingBagConfig)))
    tt_ebc = TTEmbeddingBagCollection(_dlrm_tables(TTEmbeddingBagConfig))
    model = _dlrm(tt_ebc)
    dense, kjt, labels = _dlrm_batch()
    logits = model(dense, kjt)
    assert logits.shape == plain(dense, kjt).shape == (16, 1)
    assert torch.isfinite(logits).all()
    loss = F.binary_cross_entropy_with_logits(logits.squeeze(1), labels)
    loss.backward()
    for name, p in tt_ebc.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(model(dense, kjt).squeeze(1), labels)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]


def test_tt_collection_trains_on_a_toy_regression() -> None:
    """SGD on the cores alone fits a teacher collection's outputs."""
    tables = [
        TTEmbeddingBagConfig(name="t0", num_embeddings=500, embedding_dim=8, feature_names=["f0"],
                             tt_ranks=[4, 4]),
        TTEmbeddingBagConfig(name="t1", num_embeddings=300, embedding_dim=8, feature_names=["f1"],
                             tt_ranks=[4]),
    ]
    torch.manual_seed(0)
    student = TTEmbeddingBagCollection(tables)
    teacher = TTEmbeddingBagCollection(tables)
    kjt = _random_kjt(tables, ["f0", "f1"], 32, seed=1, max_bag=4)
    with torch.no_grad():
        target = teacher(kjt).values()
    opt = torch.optim.SGD(student.parameters(), lr=20.0)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = F.mse_loss(student(kjt).values(), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.6 * losses[0], losses


class _Wrapper(torch.nn.Module):
    def __init__(self, ebc: TTEmbeddingBagCollection) -> None:
        super().__init__()
        self.ebc = ebc

    def forward(self, kjt: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        kt = self.ebc(kjt)
        return kt.values(), kt["g"] * 2


def test_torchrec_fx_symbolic_trace() -> None:
    torch.manual_seed(0)
    tables = _two_tables()
    wrapper = _Wrapper(TTEmbeddingBagCollection(tables, is_weighted=True))
    gm = torchrec.fx.symbolic_trace(wrapper)
    # The op is a node of the graph (not hidden in a leaf), so graph passes see the lookup.
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.torchrec_tt.tt_embedding_bag in targets or any(
        getattr(t, "_overloadpacket", None) is torch.ops.torchrec_tt.tt_embedding_bag
        for t in targets
    )
    # Key order is resolved at run time, not frozen at trace time.
    for keys in (["f1", "f2", "g"], ["g", "f2", "f1"]):
        kjt = _random_kjt(tables, keys, 4, seed=len(keys[0]), weighted=True)
        got, want = gm(kjt), wrapper(kjt)
        for a, b in zip(got, want):
            assert torch.equal(a, b)
        ga = torch.autograd.grad(got[0].sum() + got[1].sum(), list(gm.parameters()))
        gb = torch.autograd.grad(want[0].sum() + want[1].sum(), list(wrapper.parameters()))
        assert all(torch.equal(a, b) for a, b in zip(ga, gb))
    # Extra keys are dropped and bad input is still caught by the traced module.
    extra = [*tables, TTEmbeddingBagConfig(name="zzz", num_embeddings=5, embedding_dim=2,
                                           tt_ranks=[1])]
    kjt = _random_kjt(extra, ["zzz", "g", "f2", "f1"], 3, seed=0, weighted=True)
    for a, b in zip(gm(kjt), wrapper(kjt)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"lacks the features 'f1' \(table 't1'\)"):
        gm(_random_kjt(extra, ["f2", "g", "zzz"], 2, seed=0, weighted=True))

    model = _dlrm(TTEmbeddingBagCollection(_dlrm_tables(TTEmbeddingBagConfig)))
    traced = torchrec.fx.symbolic_trace(model)
    dense, kjt, _ = _dlrm_batch()
    assert torch.equal(traced(dense, kjt), model(dense, kjt))


# ---------------------------------------------------------------- bad input


@pytest.fixture
def ebc() -> TTEmbeddingBagCollection:
    torch.manual_seed(0)
    return TTEmbeddingBagCollection(_two_tables())


def _kjt(keys: list[str], values: list[int], lengths: list[int], **kw: object) -> KeyedJaggedTensor:
    return KeyedJaggedTensor.from_lengths_sync(keys, torch.tensor(values), torch.tensor(lengths),
                                               **kw)


def test_extra_kjt_keys_are_ignored(ebc: TTEmbeddingBagCollection) -> None:
    # As in TorchRec's EmbeddingBagCollection: one KJT can feed several collections.
    other = TTEmbeddingBagConfig(name="o", num_embeddings=5, embedding_dim=2,
                                 feature_names=["h", "h2"], tt_ranks=[1])
    mixed = _random_kjt([*_two_tables(), other], ["h", "g", "f1", "h2", "f2"], 3, seed=4)
    by_key = mixed.to_dict()
    own = KeyedJaggedTensor.from_jt_dict({k: by_key[k] for k in ["f1", "f2", "g"]})
    want, got = ebc(own), ebc(mixed)
    assert got.keys() == want.keys() == ["f1", "f2", "g"]
    assert torch.equal(got.values(), want.values())
    # A key of no table may even come twice.
    twice = _kjt(["f1", "h", "f2", "g", "h"], [1, 2, 3, 4, 5], [1, 1, 1, 1, 1])
    assert ebc(twice).values().shape == (1, 8 + 8 + 6)


def test_missing_feature_is_named_with_its_table(ebc: TTEmbeddingBagCollection) -> None:
    with pytest.raises(ValueError, match=r"lacks the features 'g' \(table 't2'\)"):
        ebc(_kjt(["f2", "f1"], [1, 2], [1, 0, 1, 0]))


def test_duplicate_kjt_key(ebc: TTEmbeddingBagCollection) -> None:
    with pytest.raises(ValueError, match=r"\['f1'\] more than once"):
        ebc(_kjt(["f1", "f1", "f2", "g"], [1, 2, 3, 4], [1, 1, 1, 1]))


def test_weighted_collection_needs_weights() -> None:
    ebc = TTEmbeddingBagCollection(_two_tables(), is_weighted=True)
    with pytest.raises(ValueError, match="is_weighted=True.*without weights.*'t1'"):
        ebc(_kjt(["f1", "f2", "g"], [1, 2, 3], [1, 1, 1]))


@pytest.mark.parametrize("bad,feature", [(-1, "g"), (37, "g"), (100, "f2"), (10**12, "f1")])
def test_index_out_of_range_names_the_table(
    ebc: TTEmbeddingBagCollection, bad: int, feature: str
) -> None:
    table = "t2" if feature == "g" else "t1"
    values = {"f1": [1, 2], "f2": [3], "g": [4]}
    values[feature][-1] = bad
    kjt = _kjt(["f1", "f2", "g"], values["f1"] + values["f2"] + values["g"], [2, 1, 1])
    with pytest.raises(RuntimeError, match=rf"table '{table}'.*index {bad} .*out of range"):
        ebc(kjt)


def test_values_on_another_device(ebc: TTEmbeddingBagCollection) -> None:
    meta_kjt = KeyedJaggedTensor.from_lengths_sync(
        ["f1", "f2", "g"], torch.tensor([1, 2, 3], device="meta"),
        torch.tensor([1, 1, 1], device="meta"),
    )
    with pytest.raises(ValueError, match="on meta but the cores of TT tables.*'t1'.*on cpu"):
        ebc(meta_kjt)
    meta_ebc = TTEmbeddingBagCollection(_two_tables(), device="meta")
    with pytest.raises(ValueError, match="on cpu but the cores .* on meta"):
        meta_ebc(_kjt(["f1", "f2", "g"], [1, 2, 3], [1, 1, 1]))


def test_wrong_input_types(ebc: TTEmbeddingBagCollection) -> None:
    with pytest.raises(TypeError, match=r"expected a KeyedJaggedTensor \(or a TensorDict of jagged features\), got Tensor"):
        ebc(torch.tensor([1, 2, 3]))
    with pytest.raises(RuntimeError, match="int32 or int64"):
        ebc(KeyedJaggedTensor.from_lengths_sync(
            ["f1", "f2", "g"], torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1, 1, 1])))


def test_bad_collections_name_the_table() -> None:
    t1, t2 = _two_tables()
    with pytest.raises(ValueError, match="Duplicate table name 't1'"):
        TTEmbeddingBagCollection([t1, TTEmbeddingBagConfig(name="t1", num_embeddings=5,
                                                           embedding_dim=2, feature_names=["z"],
                                                           tt_ranks=[1])])
    # A feature in two tables is TorchRec's shared feature (tests/test_ebc_contract.py); twice
    # in one table it is an error.
    twice = TTEmbeddingBagConfig(name="t3", num_embeddings=5, embedding_dim=2,
                                 feature_names=["z", "z"], tt_ranks=[1])
    with pytest.raises(ValueError, match=r"table 't3' lists a feature more than once: \['z', 'z'\]"):
        TTEmbeddingBagCollection([t1, t2, twice])
    plain = EmbeddingBagConfig(name="dense_t", num_embeddings=5, embedding_dim=2,
                               feature_names=["z"])
    with pytest.raises(TypeError, match="'dense_t' is a EmbeddingBagConfig.*TTEmbeddingBagConfig"):
        TTEmbeddingBagCollection([t1, plain])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="at least one table"):
        TTEmbeddingBagCollection([])


def test_bad_table_name_in_tt_methods(ebc: TTEmbeddingBagCollection) -> None:
    with pytest.raises(KeyError, match="no TT table 'nope'"):
        ebc.full_weight("nope")
    with pytest.raises(ValueError, match=r"table 't2': dense weight has shape \(37, 5\)"):
        ebc.load_dense_weight("t2", torch.zeros(37, 5))


def test_device_follows_torchrec_conventions() -> None:
    # The default device context places the cores (as it does an EmbeddingBagCollection's
    # weights), `device` reports where they are, and an init_fn (dense-only) is not silently lost.
    import warnings

    cfg = TTEmbeddingBagConfig(name="t", num_embeddings=100, embedding_dim=8, feature_names=["f"],
                               tt_ranks=[4])
    with torch.device("meta"):
        ebc = TTEmbeddingBagCollection([cfg])
    assert ebc.device.type == "meta" and all(p.is_meta for p in ebc.parameters())
    plain = TTEmbeddingBagCollection([cfg])
    assert plain.device == torch.device("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TTEmbeddingBagCollection([cfg], device="meta")  # no warning without an init_fn
    with_init = TTEmbeddingBagConfig(name="t", num_embeddings=100, embedding_dim=8, feature_names=["f"],
                                     tt_ranks=[4], init_fn=lambda w: w)
    with pytest.warns(UserWarning, match=r"TT tables \['t'\] have an init_fn"):
        TTEmbeddingBagCollection([with_init], device="meta")


def test_fused_optimizer_probe_without_fused_params() -> None:
    # hasattr() is how TorchRec and TorchScript probe it: False, not an exception.
    cfg = TTEmbeddingBagConfig(name="t", num_embeddings=100, embedding_dim=8, feature_names=["f"],
                               tt_ranks=[4])
    ebc = TTEmbeddingBagCollection([cfg], device="meta")
    assert not hasattr(ebc, "fused_optimizer")
    with pytest.raises(RuntimeError, match="built without fused_params"):
        ebc.fused_optimizer  # noqa: B018
    fused = TTEmbeddingBagCollection([cfg], device="meta", fused_params={"optimizer": "exact_sgd"})
    assert hasattr(fused, "fused_optimizer")
