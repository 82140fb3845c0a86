"""Issue 13 item 8: DistributedModelParallel(plan=None) without the TT sharder puts the whole TT
module into its DDP. The unsharded module notices it runs inside that DDP: a fused optimizer is
refused (its in-backward update would use rank-local gradients), otherwise a warning says so.
One in-process gloo group of world size 1 (CPU)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_tt import TTEmbeddingBagCollection, TTEmbeddingBagConfig


@pytest.fixture
def gloo_group(tmp_path: Path) -> Iterator[None]:
    if dist.is_initialized():
        # Another test left its group up: DDP below needs a world of one, which that group may be.
        assert dist.get_world_size() == 1, "a process group of world size > 1 is already initialised"
        yield
        return
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                            world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _ebc(fused: bool) -> TTEmbeddingBagCollection:
    tables = [TTEmbeddingBagConfig(name="t1", num_embeddings=60, embedding_dim=8,
                                   feature_names=["f1"], tt_ranks=[3])]
    return TTEmbeddingBagCollection(
        tables, fused_params={"optimizer": "exact_sgd", "learning_rate": 0.1} if fused else None)


class _Model(nn.Module):
    def __init__(self, fused: bool) -> None:
        super().__init__()
        self.ebc = _ebc(fused)

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        return self.ebc(kjt).values()


def _kjt() -> KeyedJaggedTensor:
    return KeyedJaggedTensor.from_lengths_sync(
        keys=["f1"], values=torch.tensor([1, 5, 7]), lengths=torch.tensor([2, 1]))


def test_outside_ddp_no_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _Model(fused=True)(_kjt())


def test_fused_tt_in_dmp_without_tt_sharder_is_refused(gloo_group: None) -> None:
    model = _Model(fused=True)
    before = [c.detach().clone() for c in model.ebc.cores()]
    dmp = DistributedModelParallel(model, device=torch.device("cpu"))  # plan=None, no TT sharder
    for _ in range(2):  # every forward, not only the first
        with pytest.raises(RuntimeError,
                           match=r"tables \['t1'\]\) with a fused optimizer runs inside "
                                 r"DistributedDataParallel.*TTEmbeddingBagCollectionSharder"):
            dmp(_kjt())
    assert all(torch.equal(a, b) for a, b in zip(before, model.ebc.cores()))


def test_unfused_tt_in_ddp_warns_once(gloo_group: None) -> None:
    ddp = DistributedDataParallel(_Model(fused=False))
    with pytest.warns(UserWarning, match=r"runs inside DistributedDataParallel unsharded.*"
                                         r"TTEmbeddingBagCollectionSharder"):
        out = ddp(_kjt())
    out.sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ddp(_kjt())  # checked once per DDP object


def test_tt_outside_the_running_ddp_is_not_flagged(gloo_group: None) -> None:
    # A DDP over other parameters (e.g. the dense part, TT cores ignored) is fine.
    model = _Model(fused=True)
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, [n for n, _ in model.named_parameters()])
    model.pad = nn.Linear(1, 1)  # DDP needs one parameter to manage
    ddp = DistributedDataParallel(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ddp(_kjt())
