"""TorchRec's EmbeddingBagCollection module tests (torchrec/modules/tests/test_embedding_modules.py,
``EmbeddingBagCollectionTest``, not shipped in the wheel), ported to TT tables with the same
table specs, inputs and assertions. Where the port differs, the difference is deliberate and in
the README's "Differences from EmbeddingBagCollection"; each such test says which.

Beyond TorchRec's shape and key checks, every output is compared with TorchRec's own
``EmbeddingBagCollection`` holding the TT tables' dense reconstructions (``full_weight``).
TorchRec's ``EmbeddingCollectionTest`` has no TT counterpart (there is no TT
``EmbeddingCollection``) and is not ported.
"""

from functools import partial

import pytest
import torch
from torchrec import EmbeddingBagCollection
from torchrec.fx import symbolic_trace
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_tt import TTEmbeddingBagCollection, TTEmbeddingBagConfig


def _tt(name: str, dim: int, features: list[str], **kw: object) -> TTEmbeddingBagConfig:
    # TorchRec's specs: 10 rows; a rank-2 TT (2 cores) of the table.
    return TTEmbeddingBagConfig(name=name, embedding_dim=dim, num_embeddings=10,
                                feature_names=features, tt_ranks=[2], **kw)


def _dense_twin(ebc: TTEmbeddingBagCollection) -> EmbeddingBagCollection:
    """TorchRec's EBC with the same tables, holding the TT tables' dense reconstructions."""
    configs = [EmbeddingBagConfig(name=c.name, embedding_dim=c.embedding_dim,
                                  num_embeddings=c.num_embeddings,
                                  feature_names=list(c.feature_names), pooling=c.pooling)
               for c in ebc.embedding_bag_configs()]
    twin = EmbeddingBagCollection(tables=configs, is_weighted=ebc.is_weighted(),
                                  device=ebc.device)
    with torch.no_grad():
        for c in configs:
            twin.embedding_bags[c.name].weight.copy_(ebc.full_weight(c.name))
    return twin


def _same(got: KeyedTensor, want: KeyedTensor) -> None:
    assert got.keys() == want.keys()
    assert got.offset_per_key() == want.offset_per_key()
    torch.testing.assert_close(got.values(), want.values(), rtol=1e-5, atol=1e-6)


def _unweighted_features() -> KeyedJaggedTensor:
    #     0       1        2  <-- batch
    # 0   [0,1] None    [2]
    # 1   [3]    [4]    [5,6,7]
    # ^
    # feature
    return KeyedJaggedTensor.from_offsets_sync(
        keys=["f1", "f2"], values=torch.tensor([0, 1, 2, 3, 4, 5, 6, 7]),
        offsets=torch.tensor([0, 2, 2, 3, 4, 5, 8]))


def _weighted_features(device: str = "cpu") -> KeyedJaggedTensor:
    return KeyedJaggedTensor.from_offsets_sync(
        keys=["f1", "f3", "f2"],
        values=torch.tensor([1, 2, 4, 5, 4, 3, 2, 9, 1, 3, 4, 7], device=device),
        offsets=torch.tensor([0, 2, 4, 6, 8, 10, 12], device=device),
        weights=torch.tensor([0.1, 0.2, 0.4, 0.5, 0.4, 0.3, 0.2, 0.9, 0.1, 0.3, 0.4, 0.7],
                             device=device))


def _weighted_tables() -> list[TTEmbeddingBagConfig]:
    return [_tt("t1", 3, ["f1", "f3"]), _tt("t2", 4, ["f2"])]


def test_unweighted() -> None:
    # Difference: init_fn is not applied to TT cores (it is written for a dense [N, D] weight);
    # the collection warns naming the tables and uses tt_init.
    t1 = _tt("t1", 3, ["f1"], init_fn=partial(torch.nn.init.normal_, mean=0.0, std=1.5))
    t2 = _tt("t2", 4, ["f2"], init_fn=partial(torch.nn.init.uniform_, a=-0.036, b=0.036))
    with pytest.warns(UserWarning, match=r"TT tables \['t1', 't2'\] have an init_fn"):
        ebc = TTEmbeddingBagCollection(tables=[t1, t2])
    pooled = ebc(_unweighted_features())
    assert pooled.values().size() == (3, 7)
    assert pooled.keys() == ["f1", "f2"]
    assert pooled.offset_per_key() == [0, 3, 7]
    _same(pooled, _dense_twin(ebc)(_unweighted_features()))


def test_shared_tables() -> None:
    ebc = TTEmbeddingBagCollection(tables=[_tt("t1", 3, ["f1", "f2"])])
    pooled = ebc(_unweighted_features())
    assert pooled.values().size() == (3, 6)
    assert pooled.keys() == ["f1", "f2"]
    assert pooled.offset_per_key() == [0, 3, 6]
    _same(pooled, _dense_twin(ebc)(_unweighted_features()))


def test_shared_features() -> None:
    ebc = TTEmbeddingBagCollection(tables=[_tt("t1", 3, ["f1"]), _tt("t2", 4, ["f1"])])
    features = KeyedJaggedTensor.from_offsets_sync(
        keys=["f1"], values=torch.tensor([0, 1, 2, 3, 4, 5, 6, 7]),
        offsets=torch.tensor([0, 2, 2, 3, 4, 5, 8]))
    pooled = ebc(features)
    assert pooled.values().size() == (6, 7)
    assert pooled.keys() == ["f1@t1", "f1@t2"]
    assert pooled.offset_per_key() == [0, 3, 7]
    _same(pooled, _dense_twin(ebc)(features))
    # Gradients reach both tables from the one feature.
    pooled.values().sum().backward()
    assert all(c.grad is not None and c.grad.abs().sum() > 0 for c in ebc.cores())


def test_weighted() -> None:
    ebc = TTEmbeddingBagCollection(tables=_weighted_tables(), is_weighted=True)
    pooled = ebc(_weighted_features())
    assert pooled.values().size() == (2, 10)
    assert pooled.keys() == ["f1", "f3", "f2"]
    assert pooled.offset_per_key() == [0, 3, 6, 10]
    _same(pooled, _dense_twin(ebc)(_weighted_features()))


def test_forward_with_meta_device() -> None:
    ebc = TTEmbeddingBagCollection(tables=_weighted_tables(), is_weighted=True,
                                   device=torch.device("meta"))
    pooled = ebc(_weighted_features("meta"))
    assert pooled.values().size() == (2, 10)
    assert pooled.keys() == ["f1", "f3", "f2"]
    assert pooled.offset_per_key() == [0, 3, 6, 10]
    assert pooled.values().device == torch.device("meta")


def test_fx() -> None:
    ebc = TTEmbeddingBagCollection(tables=_weighted_tables(), is_weighted=True)
    gm = symbolic_trace(ebc)
    scripted = torch.jit.script(gm)
    pooled = gm(_weighted_features())
    assert pooled.values().size() == (2, 10)
    assert pooled.keys() == ["f1", "f3", "f2"]
    assert pooled.offset_per_key() == [0, 3, 6, 10]
    _same(pooled, ebc(_weighted_features()))
    _same(scripted(_weighted_features()), ebc(_weighted_features()))


def test_scripting() -> None:
    ebc = TTEmbeddingBagCollection(tables=[_tt("t1", 3, ["f1"])])
    scripted = torch.jit.script(ebc)
    features = KeyedJaggedTensor.from_offsets_sync(
        keys=["f1"], values=torch.tensor([0, 1, 9]), offsets=torch.tensor([0, 2, 3]))
    _same(scripted(features), ebc(features))


def test_duplicate_config_name_fails() -> None:
    with pytest.raises(ValueError):
        TTEmbeddingBagCollection(tables=[_tt("t1", 3, ["f1"]), _tt("t1", 4, ["f2"])])


def test_device() -> None:
    config = _tt("t1", 3, ["f1"])
    # device from the argument
    ebc = TTEmbeddingBagCollection(tables=[config], device=torch.device("meta"))
    assert ebc.embedding_bags["t1"].core_0.device == torch.device("meta")
    assert ebc.device == torch.device("meta")
    # device from the context manager
    with torch.device("meta"):
        ebc = TTEmbeddingBagCollection(tables=[config])
    assert ebc.embedding_bags["t1"].core_0.device == torch.device("meta")
    assert ebc.device == torch.device("meta")
    # CPU by default
    ebc = TTEmbeddingBagCollection(tables=[config])
    assert ebc.embedding_bags["t1"].core_0.device == torch.device("cpu")
    assert ebc.device == torch.device("cpu")


# --- TorchRec 1.6 EBC behaviours that its module tests do not cover ------------------------


def test_tensordict_input() -> None:
    from tensordict import TensorDict

    # A TensorDict of jagged (nested) tensors, one per feature, as TorchRec 1.6's EBC takes.
    ebc = TTEmbeddingBagCollection(tables=_weighted_tables())
    nested = torch.nested.nested_tensor_from_jagged
    values = torch.tensor([1, 2, 4, 5, 4, 3, 2, 9, 1])
    td = TensorDict({
        "f2": nested(values[:4], offsets=torch.tensor([0, 2, 4])),
        "f1": nested(values[4:7], lengths=torch.tensor([3, 0])),
        "f3": nested(values[7:], lengths=torch.tensor([1, 1])),
    }, batch_size=[2])
    kjt = KeyedJaggedTensor.from_lengths_sync(["f2", "f1", "f3"], values,
                                              torch.tensor([2, 2, 3, 0, 1, 1]))
    _same(ebc(td), ebc(kjt))
    _same(ebc(td), _dense_twin(ebc)(td))


def test_extra_keys_are_ignored_and_missing_ones_named() -> None:
    ebc = TTEmbeddingBagCollection(tables=[_tt("t1", 3, ["f1"])])
    _same(ebc(_unweighted_features()), _dense_twin(ebc)(_unweighted_features()))
    # Difference: TorchRec's EBC raises a bare KeyError; this names the feature and table.
    with pytest.raises(ValueError, match=r"lacks the features 'f3' \(table 't1'\)"):
        TTEmbeddingBagCollection(tables=_weighted_tables())(_unweighted_features())


def test_variable_batch_per_feature() -> None:
    # VBE as TorchRec 1.6's EBC takes it: f1 has 2 distinct samples, f2 one; the inverse indices
    # give each of the 3 samples its row.
    ebc = TTEmbeddingBagCollection(tables=[_tt("t1", 3, ["f1"]), _tt("t2", 4, ["f2", "f3"])])
    inverse = torch.tensor([[0, 1, 0], [0, 0, 0], [2, 1, 0]])
    vbe = KeyedJaggedTensor(keys=["f1", "f2", "f3"], values=torch.tensor([0, 1, 2, 3, 4, 5, 9]),
                            lengths=torch.tensor([1, 2, 1, 1, 0, 2]),
                            stride_per_key_per_rank=[[2], [1], [3]],
                            inverse_indices=(["f1", "f2", "f3"], inverse))
    pooled = ebc(vbe)
    assert pooled.values().shape == (3, 11)
    _same(pooled, _dense_twin(ebc)(vbe))
    _same(torch.jit.script(ebc)(vbe), pooled)
    _same(symbolic_trace(ebc)(vbe), pooled)
    # Without inverse indices the samples cannot be lined up (TorchRec's EBC fails too).
    bare = KeyedJaggedTensor(keys=["f1", "f2", "f3"], values=torch.tensor([0, 1, 2, 3, 4, 5, 9]),
                             lengths=torch.tensor([1, 2, 1, 1, 0, 2]),
                             stride_per_key_per_rank=[[2], [1], [3]])
    with pytest.raises(ValueError, match=r"\(VBE\) needs the KeyedJaggedTensor's inverse_indices"):
        ebc(bare)


def test_variable_batch_with_shared_features_and_other_key_order() -> None:
    # The KJT's keys in another order than the tables' and f1 in two tables: the module
    # reorders (and repeats) the features before the lookup, and still lines the samples up by
    # the KJT's inverse indices.
    ebc = TTEmbeddingBagCollection(tables=[_tt("t1", 3, ["f1"]), _tt("t2", 4, ["f1", "f2"])])
    keys = ["f2", "zz", "f1"]
    vbe = KeyedJaggedTensor(keys=keys, values=torch.tensor([0, 1, 2, 3, 4, 5, 9]),
                            lengths=torch.tensor([1, 2, 1, 1, 0, 2]),
                            stride_per_key_per_rank=[[2], [1], [3]],
                            inverse_indices=(keys, torch.tensor([[0, 1, 0], [0, 0, 0], [2, 1, 0]])))
    pooled = ebc(vbe)
    assert pooled.keys() == ["f1@t1", "f1@t2", "f2"]
    assert pooled.values().shape == (3, 11)
    _same(pooled, _dense_twin(ebc)(vbe))
    _same(torch.jit.script(ebc)(vbe), pooled)
