"""torchrec_tt.synthetic: the planted Criteo model drawn with torch (device-generic), against
the numpy generator of torchrec_tt.criteo."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from torchrec_tt.criteo import CAT_FEATURE_COUNT, SyntheticCriteo, _hash_normal, _splitmix64
from torchrec_tt.synthetic import DeviceSyntheticCriteo, hash_normal, splitmix64

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def test_splitmix_and_hash_normal_are_bit_exact_with_numpy() -> None:
    x = np.array([0, 1, 7, 2**40 + 3, 2**62 + 12345, 2**63 - 1], dtype=np.int64)
    ref = _splitmix64(x.astype(np.uint64)).view(np.int64)
    assert np.array_equal(splitmix64(torch.from_numpy(x)).numpy(), ref)
    salt = 3 * 1000 + 5
    salt_hash = torch.tensor(int(_splitmix64(np.array([salt], dtype=np.uint64)).view(np.int64)[0]))
    got = hash_normal(torch.from_numpy(x), salt_hash, 4).numpy()
    assert np.array_equal(got, _hash_normal(x, salt, 4))


def test_logits_are_the_numpy_planted_model() -> None:
    model = SyntheticCriteo(scale=0.01, seed=3)
    gen = DeviceSyntheticCriteo(model)
    dense, ids, _, _ = model.sample(500, 0, 0)
    got = gen.logits(torch.from_numpy(dense), torch.from_numpy(ids)).numpy() - gen.bias
    np.testing.assert_allclose(got, model._logits(dense, ids) - model._bias, atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
def test_batches_are_a_function_of_the_index_only(device: str) -> None:
    gen = DeviceSyntheticCriteo(SyntheticCriteo(scale=0.001, seed=1), device=device)
    a, b, c = gen.batch(256, 0, 5), gen.batch(256, 0, 5), gen.batch(256, 0, 6)
    assert a.dense_features.device.type == device
    assert torch.equal(a.sparse_features.values(), b.sparse_features.values())
    assert torch.equal(a.labels, b.labels) and torch.equal(a.dense_features, b.dense_features)
    assert not torch.equal(a.sparse_features.values(), c.sparse_features.values())
    assert not torch.equal(a.labels, gen.batch(256, 1, 5).labels)  # streams differ


@pytest.mark.parametrize("device", DEVICES)
def test_several_batches_per_call_are_the_single_batches(device: str) -> None:
    """``batches`` draws several blocks in one pass, bit for bit the blocks ``batch`` draws."""
    sizes = [1 + (t % 3) for t in range(CAT_FEATURE_COUNT)]
    gen = DeviceSyntheticCriteo(SyntheticCriteo(scale=0.001, seed=1), sizes, device=device)
    indices = [3, 4, 11, 0]
    for got, i in zip(gen.batches(100, 2, indices), indices):
        want = gen.batch(100, 2, i)
        assert torch.equal(got.dense_features, want.dense_features)
        assert torch.equal(got.labels, want.labels)
        assert torch.equal(got.sparse_features.values(), want.sparse_features.values())
        assert torch.equal(got.sparse_features.lengths(), want.sparse_features.lengths())


def test_rows_follow_the_tables_and_the_click_rate() -> None:
    model = SyntheticCriteo(num_embeddings=list(range(2, 2 + CAT_FEATURE_COUNT)), seed=2)
    gen = DeviceSyntheticCriteo(model)
    dense, ids, labels, p = gen.sample(20000, 0, 0)
    assert (ids >= 0).all() and (ids < torch.arange(2, 2 + CAT_FEATURE_COUNT)).all()
    assert (dense >= 0).all() and torch.equal(dense, dense.floor())
    assert labels.float().mean().item() == pytest.approx(model.positive_rate, abs=0.02)
    assert p.mean().item() == pytest.approx(model.positive_rate, abs=0.02)


@pytest.mark.parametrize("distribution", ["pareto", "uniform"])
def test_multi_hot_kjt_layout(distribution: str) -> None:
    sizes = [1 + (t % 4) for t in range(CAT_FEATURE_COUNT)]
    model = SyntheticCriteo(scale=0.001, seed=4)
    gen = DeviceSyntheticCriteo(model, sizes, distribution)
    n = 64
    dense, ids, labels, _ = gen.sample(n, 0, 3)
    batch = gen.batch(n, 0, 3)
    kjt = batch.sparse_features
    starts = np.concatenate([[0], np.cumsum(sizes)])
    for t, name in enumerate(kjt.keys()):
        jt = kjt[name]
        assert torch.equal(jt.lengths(), torch.full((n,), sizes[t], dtype=torch.int32))
        assert torch.equal(jt.values(), ids[:, starts[t]:starts[t + 1]].reshape(-1))
        assert int(jt.values().max()) < model.cardinalities[t]
    assert torch.equal(batch.labels, labels.float())
    assert torch.equal(batch.dense_features, torch.log1p(dense).float())
    # several batches per call: each one's values are that batch's own ids, same layout
    many = gen.batches(n, 0, [5, 3, 9])
    assert torch.equal(many[1].sparse_features.values(), kjt.values())
    # the ids per feature come with the KJT (no device read in TorchRec's input dist) and are
    # what its lengths say
    for b in (batch, *many):
        k = b.sparse_features
        assert k._length_per_key == [s * n for s in sizes]
        assert k.length_per_key() == k.lengths().view(-1, n).sum(1).tolist()
        assert k.offset_per_key() == [0, *np.cumsum(k.length_per_key()).tolist()]
    # the bias is re-fitted to the bag means: the click rate stays near its target
    big = gen.sample(20000, 0, 0)[2].float().mean().item()
    assert big == pytest.approx(model.positive_rate, abs=0.02)


def test_bad_generator_arguments_are_named() -> None:
    model = SyntheticCriteo(scale=0.001)
    with pytest.raises(ValueError, match="multi_hot_sizes must be 26 sizes >= 1"):
        DeviceSyntheticCriteo(model, [1, 2])
    with pytest.raises(ValueError, match="multi_hot_distribution must be one of"):
        DeviceSyntheticCriteo(model, None, "zipf")
    with pytest.raises(ValueError, match="num_embeddings must be 26 sizes >= 1"):
        SyntheticCriteo(num_embeddings=[0] * 26)
