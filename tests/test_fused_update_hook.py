"""The sharded fused update's hook on the TT op's autograd node (``sharding/lookup.py``): it must
hand the update exactly the core gradients plain autograd computes, leave no ``.grad``, and pass
the op's other gradients (per-sample weights) on untouched."""

from __future__ import annotations

from typing import Any

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


def _local(v: torch.Tensor) -> torch.Tensor:
    """A copy of this rank's values of a plain, sharded (TorchRec's ShardedTensor) or DTensor."""
    if hasattr(v, "local_shards"):
        shards = v.local_shards()
        return torch.cat([sh.tensor.detach().reshape(-1) for sh in shards]) if shards else torch.empty(0)
    if hasattr(v, "to_local"):
        return v.to_local().detach().clone()
    return v.detach().clone()


def _trainer_steps(device: str, tmp_path: Any, hook: str, monkeypatch: Any) -> tuple[dict, list]:
    """Three steps of the trainer's DLRM (examples/dlrm/train.py ``build()``: TT tables sharded
    data_parallel, their Adagrad fused into the backward) with the fused update as the hook
    (``TORCHREC_TT_FUSED_UPDATE_HOOK=1``, the default) or as the identity-view Function (``0``):
    the model's and the optimizer's state, and the names of parameters left with a ``.grad``."""
    import sys
    from pathlib import Path

    import torch.distributed as dist

    train_dir = Path(__file__).resolve().parents[1] / "examples" / "dlrm"
    sys.path.insert(0, str(train_dir))
    try:
        import train  # type: ignore[import-not-found]
    finally:
        sys.path.pop(0)
    monkeypatch.setenv("TORCHREC_TT_FUSED_UPDATE_HOOK", hook)
    from torchrec_tt.sharding import lookup

    views_applied = []
    original = lookup._FusedUpdateInBackward.apply

    def counted(*a: Any) -> Any:
        views_applied.append(1)
        return original(*a)

    monkeypatch.setattr(lookup._FusedUpdateInBackward, "apply", counted)
    dev = torch.device(device)
    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("nccl" if device == "cuda" else "gloo",
                                init_method=f"file://{tmp_path / ('pg' + hook)}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        args = train.parse_args(["--device", device, "--nproc", "1", "--batch_size", "32",
                                 "--scale", "0.002", "--tt_cores", "2"])
        data = train.load_data(args, 0, dev)
        dmp, optimizer, _ = train.build(args, data, True, dev, dist.group.WORLD)
        it = data.train_batches(args, 0, 1, 0)
        dmp.train()
        for _ in range(3):
            batch = next(it).to(dev)
            optimizer.zero_grad()
            loss, _ = dmp(batch)
            loss.backward()
            optimizer.step()
        model = {k: _local(v) for k, v in dmp.state_dict().items() if isinstance(v, torch.Tensor)}
        opt = optimizer.state_dict()["state"]
        flat = {f"{k}/{s}": _local(v) for k, st in opt.items() for s, v in st.items()
                if isinstance(v, torch.Tensor)}
        with_grad = [n for n, p in dmp.named_parameters() if p.grad is not None]
        assert bool(views_applied) == (hook == "0")  # the switch picked the path
        return {**model, **flat}, with_grad
    finally:
        if own_group:
            dist.destroy_process_group()


@pytest.mark.parametrize("device", DEVICES)
def test_trainer_model_same_with_hook_and_with_identity_views(device: str, tmp_path: Any,
                                                               monkeypatch: Any) -> None:
    views, grads_views = _trainer_steps(device, tmp_path, "0", monkeypatch)
    hooked, grads_hooked = _trainer_steps(device, tmp_path, "1", monkeypatch)
    assert views.keys() == hooked.keys()
    for k in views:
        _same(hooked[k], views[k])
    assert grads_views == grads_hooked  # the TT cores get no .grad either way
    assert not any("tt" in n and "cores" in n for n in grads_hooked), grads_hooked
