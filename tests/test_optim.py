"""Fused optimizers of TTEmbeddingBagCollection against torch optimizers on dense core grads."""

from __future__ import annotations

import copy

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_tt import TTEmbeddingBagCollection, TTEmbeddingBagConfig
from torchrec_tt.optim import FusedOptimConfig

TABLES = [
    TTEmbeddingBagConfig(name="a", num_embeddings=500, embedding_dim=12, feature_names=["fa"], tt_ranks=[3, 4]),
    TTEmbeddingBagConfig(name="b", num_embeddings=90, embedding_dim=8, feature_names=["fb", "fc"], tt_ranks=[5]),
]


def _batches(n: int) -> list[KeyedJaggedTensor]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        lengths = torch.randint(0, 4, (3 * 5,), generator=gen)
        values = torch.cat(
            [torch.randint(0, 500, (int(lengths[:5].sum()),), generator=gen),
             torch.randint(0, 90, (int(lengths[5:].sum()),), generator=gen)]
        )
        out.append(KeyedJaggedTensor.from_lengths_sync(["fa", "fb", "fc"], values, lengths))
    return out


def _row_wise_adagrad_reference(cores, grads, states, lr, eps):  # type: ignore[no-untyped-def]
    for c, g, s in zip(cores, grads, states):
        s += g.square().mean(1)
        c -= lr * g / (s.sqrt() + eps)[:, None]


@pytest.mark.parametrize(
    "optimizer,reference",
    [
        (EmbOptimType.EXACT_SGD, lambda ps: torch.optim.SGD(ps, lr=0.05, weight_decay=0.01)),
        (EmbOptimType.EXACT_ADAGRAD, lambda ps: torch.optim.Adagrad(ps, lr=0.05, eps=1e-8, weight_decay=0.01)),
        (EmbOptimType.ADAM, lambda ps: torch.optim.Adam(ps, lr=0.05, eps=1e-8, weight_decay=0.01)),
        (EmbOptimType.EXACT_ROWWISE_ADAGRAD, None),
    ],
)
def test_fused_matches_reference_optimizer(optimizer: EmbOptimType, reference) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    fused = TTEmbeddingBagCollection(
        copy.deepcopy(TABLES),
        fused_params={"optimizer": optimizer, "learning_rate": 0.05, "weight_decay": 0.01},
    ).double()
    dense = copy.deepcopy(fused)
    dense_cores = dense.cores()
    # The copy keeps the fused hooks only on the original's parameters.
    opt = reference(dense_cores) if reference is not None else None
    states = [torch.zeros(c.shape[0], dtype=c.dtype) for c in dense_cores]
    for kjt in _batches(4):
        target = torch.randn(5, 28, dtype=torch.float64)
        loss = ((fused(kjt).values() - target) ** 2).sum()
        loss.backward()
        assert all(c.grad is None for c in fused.cores()), "fused mode must not keep gradients"
        dense_loss = ((dense(kjt).values() - target) ** 2).sum()
        grads = torch.autograd.grad(dense_loss, dense_cores)
        with torch.no_grad():
            if opt is not None:
                for c, g in zip(dense_cores, grads):
                    c.grad = g
                opt.step()
            else:
                g_wd = [g + 0.01 * c for c, g in zip(dense_cores, grads)]
                _row_wise_adagrad_reference(dense_cores, g_wd, states, 0.05, 1e-8)
    for a, b in zip(fused.cores(), dense_cores):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_fused_state_in_state_dict_and_keyed_optimizer() -> None:
    ebc = TTEmbeddingBagCollection(copy.deepcopy(TABLES), fused_params={"optimizer": "adam", "lr": 0.01})
    keys = set(ebc.state_dict())
    assert "embedding_bags.a.core_0_momentum1" in keys and "embedding_bags.b.core_1_momentum2" in keys
    (ebc(_batches(1)[0]).values().sum()).backward()
    opt_state = ebc.fused_optimizer.state_dict()["state"]
    assert set(opt_state) == {f"embedding_bags.{t}.core_{k}" for t, n in (("a", 3), ("b", 2)) for k in range(n)}
    m1 = opt_state["embedding_bags.a.core_0"]["momentum1"]
    assert m1.abs().sum() > 0
    # Loading a state_dict restores the optimizer state too.
    clone = TTEmbeddingBagCollection(copy.deepcopy(TABLES), fused_params={"optimizer": "adam", "lr": 0.01})
    clone.load_state_dict(ebc.state_dict())
    torch.testing.assert_close(clone.fused_optimizer.state_dict()["state"]["embedding_bags.a.core_0"]["momentum1"], m1)
    # A learning-rate change through param_groups (as schedulers do) takes effect.
    ebc.fused_optimizer.param_groups[0]["lr"] = 0.0
    before = [c.detach().clone() for c in ebc.cores()]
    (ebc(_batches(1)[0]).values().sum()).backward()
    assert all(torch.equal(a, b) for a, b in zip(before, ebc.cores()))


def test_meta_construction_then_materialise_keeps_fused_state_live() -> None:
    ebc = TTEmbeddingBagCollection(copy.deepcopy(TABLES), device="meta", fused_params={"optimizer": "exact_adagrad"})
    ebc.to_empty(device="cpu")
    ebc.reset_parameters()
    for name, buf in ebc.named_buffers():
        buf.zero_()
    (ebc(_batches(1)[0]).values().sum()).backward()
    state = ebc.fused_optimizer.state_dict()["state"]
    assert state["embedding_bags.a.core_0"]["momentum1"].device.type == "cpu"
    assert state["embedding_bags.a.core_0"]["momentum1"].abs().sum() > 0


def test_apply_optimizer_in_backward_is_honoured() -> None:
    ebc = TTEmbeddingBagCollection(copy.deepcopy(TABLES))
    ref = copy.deepcopy(ebc)
    apply_optimizer_in_backward(torch.optim.SGD, ebc.parameters(), {"lr": 0.1})
    kjt = _batches(1)[0]
    ebc(kjt).values().sum().backward()
    grads = torch.autograd.grad(ref(kjt).values().sum(), ref.cores())
    for a, b, g in zip(ebc.cores(), ref.cores(), grads):
        torch.testing.assert_close(a, b - 0.1 * g)


@pytest.mark.parametrize(
    "params,match",
    [
        ({"learning_rate": 0.1}, "needs an 'optimizer'"),
        ({"optimizer": "lamb"}, "LAMB is not supported"),
        ({"optimizer": "nonsense"}, "unknown optimizer"),
        ({"optimizer": "exact_sgd", "momentum": 0.9}, "unsupported keys \\['momentum'\\]"),
        ({"optimizer": "adam", "beta1": 1.5}, "fused optimizer: beta1 must be < 1.0, got 1.5"),
    ],
)
def test_bad_fused_params(params: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FusedOptimConfig.from_fused_params(params)


def test_fused_optimizer_absent_without_fused_params() -> None:
    with pytest.raises(RuntimeError, match="without fused_params"):
        TTEmbeddingBagCollection(copy.deepcopy(TABLES)).fused_optimizer
