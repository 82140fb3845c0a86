"""The sharded fused update's hook on the TT op's autograd node (``sharding/lookup.py``): it must
hand the update exactly the core gradients plain autograd computes, leave no ``.grad``, and pass
the op's other gradients (per-sample weights) on untouched."""

from __future__ import annotations

import pytest
import torch

from torchrec_tt.ops import PoolingMode, TTBatchLayout, tt_embedding_bag
from torchrec_tt.shapes import TTShape
from torchrec_tt.sharding.lookup import _update_in_op_backward


# On CUDA the op's autograd node is C++ (csrc/embedding_bag_autograd.cpp), on the CPU Python.
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")),
]


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    # The CUDA backward adds with atomics, so two runs agree to rounding, not bit for bit.
    if a.is_cuda:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(a, b)


def _problem(
    device: str = "cpu",
) -> tuple[list[torch.Tensor], TTBatchLayout, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    shapes = [TTShape(50, 8, (5, 10), (2, 4), (3,)), TTShape(120, 8, (4, 5, 6), (2, 2, 2), (2, 3))]
    cores = []
    for shape in shapes:
        for rows, cols in shape.core_shapes():
            cores.append(0.3 * torch.randn(rows, cols, generator=gen))
    layout = TTBatchLayout.from_shapes(
        ["a", "b"], shapes, [PoolingMode.SUM, PoolingMode.MEAN], [0, 1, 1]
    )
    batch = 4
    lengths = torch.randint(0, 4, (3 * batch,), generator=gen)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    bounds = [50] * batch + [120] * (2 * batch)
    indices = torch.cat([
        torch.randint(0, bounds[i], (int(n),), generator=gen) for i, n in enumerate(lengths)
    ])
    weights = torch.rand(indices.numel(), generator=gen)
    return ([c.to(device) for c in cores], layout, indices.to(device), offsets.to(device),
            weights.to(device))


@pytest.mark.parametrize("device", DEVICES)
def test_hook_hands_the_core_gradients_to_the_update_and_leaves_no_grad(device: str) -> None:
    values, layout, indices, offsets, weights = _problem(device)
    ref_cores = [torch.nn.Parameter(v.clone()) for v in values]
    ref_weights = weights.clone().requires_grad_()
    out = tt_embedding_bag(ref_cores, layout, indices, offsets, ref_weights)
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device)
    (out * dy).sum().backward()

    cores = [torch.nn.Parameter(v.clone()) for v in values]
    params = cores[::-1]  # the update's order need not be the op's
    calls: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
    slots: list[int] = []
    for _ in range(2):  # the second step reuses the cached slots
        w = weights.clone().requires_grad_()
        pooled = tt_embedding_bag(cores, layout, indices, offsets, w)
        new_slots = _update_in_op_backward(
            pooled, lambda p, g: calls.append((list(p), [x.clone() for x in g])), params, slots
        )
        assert not slots or new_slots is slots
        slots = new_slots
        (pooled * dy).sum().backward()
        got_params, grads = calls[-1]
        assert all(a is b for a, b in zip(got_params, params)) and len(got_params) == len(params)
        position = {id(c): k for k, c in enumerate(cores)}
        for g, p in zip(grads, params):
            _same(g, ref_cores[position[id(p)]].grad)
        assert all(c.grad is None for c in cores)
        assert w.grad is not None
        _same(w.grad, ref_weights.grad)
    assert len(calls) == 2


@pytest.mark.parametrize("device", DEVICES)
def test_no_graph_no_hook(device: str) -> None:
    values, layout, indices, offsets, _ = _problem(device)
    cores = [torch.nn.Parameter(v) for v in values]
    with torch.no_grad():
        pooled = tt_embedding_bag(cores, layout, indices, offsets)
    assert _update_in_op_backward(pooled, lambda p, g: None, cores, []) == []
