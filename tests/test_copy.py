"""copy.deepcopy and pickle of TT collections with a fused optimizer: the copy is independent
(its own hooks, state and updates) and trains as the original would."""

import copy
import pickle

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_tt import TTEmbeddingBagCollection, TTEmbeddingBagConfig
from torchrec_tt.swap import HybridEmbeddingBagCollection

TABLES = [
    TTEmbeddingBagConfig(name="t1", num_embeddings=120, embedding_dim=8, feature_names=["f1"],
                         tt_ranks=[4, 4]),
    TTEmbeddingBagConfig(name="t2", num_embeddings=60, embedding_dim=4, feature_names=["f2"],
                         tt_ranks=[3]),
]
FUSED = {"optimizer": "adam", "learning_rate": 0.05}


def _kjt(seed: int) -> KeyedJaggedTensor:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 3, (2 * 4,), generator=gen)
    values = torch.randint(0, 60, (int(lengths.sum()),), generator=gen)
    return KeyedJaggedTensor.from_lengths_sync(["f1", "f2"], values, lengths)


def _step(ebc: torch.nn.Module, seed: int) -> None:
    (ebc(_kjt(seed)).values() ** 2).sum().backward()


def _snapshot(ebc: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in ebc.state_dict().items()}


def _pickled(ebc: torch.nn.Module) -> torch.nn.Module:
    return pickle.loads(pickle.dumps(ebc))


@pytest.mark.parametrize("make_copy", [copy.deepcopy, _pickled], ids=["deepcopy", "pickle"])
def test_copy_trains_on_its_own(make_copy) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    ebc = TTEmbeddingBagCollection(copy.deepcopy(TABLES), fused_params=FUSED)
    _step(ebc, 0)  # some optimizer state to copy
    twin = make_copy(ebc)
    before = _snapshot(ebc)
    assert all(torch.equal(v, twin.state_dict()[k]) for k, v in before.items())

    # Training the copy changes the copy only: its cores and its optimizer state.
    _step(twin, 1)
    after_twin = _snapshot(twin)
    assert all(torch.equal(v, ebc.state_dict()[k]) for k, v in before.items())
    changed = [k for k in before if not torch.equal(before[k], after_twin[k])]
    assert any(".core_" in k and k.endswith(("core_0", "core_1", "core_2")) for k in changed)
    assert any(k.endswith("_momentum1") for k in changed)
    assert all(c.grad is None for c in twin.cores())  # the update ran in the backward

    # The copy's optimizer reads the copy's buffers.
    twin_state = twin.fused_optimizer.state
    twin_buffers = {id(b) for b in twin.buffers()}
    assert all(id(t) in twin_buffers for s in twin_state.values() for t in s.values())

    # Training the original the same way gives the same result: the copy is a true copy.
    _step(ebc, 1)
    assert all(torch.equal(v, after_twin[k]) for k, v in _snapshot(ebc).items())


def test_pickled_hybrid_with_fused_tt_tables_trains() -> None:
    torch.manual_seed(0)
    hybrid = HybridEmbeddingBagCollection(copy.deepcopy(TABLES), tt_fused_params=FUSED)
    twin = _pickled(hybrid)
    kjt = _kjt(3)
    assert torch.equal(twin(kjt).values(), hybrid(kjt).values())
    _step(twin, 3)
    assert not torch.equal(twin(kjt).values(), hybrid(kjt).values())
    _step(hybrid, 3)
    assert torch.equal(twin(kjt).values(), hybrid(kjt).values())


def test_deepcopy_of_a_copy_and_after_to() -> None:
    torch.manual_seed(0)
    ebc = TTEmbeddingBagCollection(copy.deepcopy(TABLES), fused_params=FUSED)
    twin = copy.deepcopy(copy.deepcopy(ebc)).double()
    _step(twin, 0)
    assert all(c.grad is None and c.dtype == torch.float64 for c in twin.cores())
    # The original's hooks still update the original (a copy never removes them).
    before = _snapshot(ebc)
    _step(ebc, 0)
    assert not torch.equal(before["embedding_bags.t1.core_0"], ebc.state_dict()["embedding_bags.t1.core_0"])
