"""Shared features (one feature in several TT tables) and variable batch per feature (VBE)
through the TT sharder, on CPU/gloo at world size 2, against the unsharded module.

One spawned job: a weighted collection (per-sample weights) under two plans covering
data_parallel, table_wise and column_wise tables (column shards on one rank and across ranks, a
rank without table_wise tables) that share a feature. Forward equals the unsharded module (keys
``feature@table``, as TorchRec names them) and an SGD step the rank-averaged unsharded
reference's; then a VBE batch (each feature its own batch size, with inverse indices, different on
each rank): forward and one more step again equal the unsharded module's. One plan again with
the cores' SGD fused into the backward.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torchrec.distributed.sharding_plan import (
    column_wise,
    construct_module_sharding_plan,
    data_parallel,
    table_wise,
)
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec.distributed.types import ShardingPlan
from torchrec.modules.embedding_configs import PoolingType
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import tt_dist_cases as cases
from torchrec_tt import TTEmbeddingBagCollection, TTEmbeddingBagConfig
from torchrec_tt.sharding import TTEmbeddingBagCollectionSharder
from torchrec_tt.sharding.testing import run_multiprocess

pytestmark = pytest.mark.multiprocess

WORLD = 2
LR = 0.5
# "s" feeds all three tables (its ids below the smallest table's 40 rows).
TABLES = [
    TTEmbeddingBagConfig(name="t0", num_embeddings=97, embedding_dim=16,
                         feature_names=["f0", "s"], tt_ranks=[3, 2]),
    TTEmbeddingBagConfig(name="t1", num_embeddings=40, embedding_dim=8, feature_names=["s"],
                         tt_ranks=[2], pooling=PoolingType.MEAN),
    TTEmbeddingBagConfig(name="t2", num_embeddings=70, embedding_dim=32,
                         feature_names=["s", "f2"], tt_ranks=[2, 3], tt_q_shapes=[4, 2, 4],
                         pooling=PoolingType.MEAN),
]
ROWS = {"f0": 97, "s": 40, "f2": 70, "zz": 5}
OUTPUT_KEYS = ["f0", "s@t0", "s@t1", "s@t2", "f2"]  # TorchRec's names, table order
PLANS = {
    "dp_tw_cw": {"t0": data_parallel(), "t1": table_wise(rank=1), "t2": column_wise(ranks=[0, 1])},
    # Rank 1 holds no table_wise table (its lookup returns an empty VBE output) and t2's first
    # two column shards.
    "tw_cw_one_rank": {"t0": table_wise(rank=0), "t1": table_wise(rank=0),
                       "t2": column_wise(ranks=[1, 1, 0, 0])},
}


class SharedModel(nn.Module):
    def __init__(self, fused_params: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.tt = TTEmbeddingBagCollection(copy.deepcopy(TABLES), is_weighted=True,
                                           fused_params=fused_params)
        self.head = nn.Linear(16 + 16 + 8 + 32 + 32, 1)

    def forward(self, kjt: KeyedJaggedTensor) -> Tensor:
        pooled = self.tt(kjt)  # indexed by key: the sharded key order follows the plan
        return self.head(torch.cat([pooled[k] for k in OUTPUT_KEYS], dim=1)).square().mean()


def _kjt(seed: int) -> KeyedJaggedTensor:
    # Key order unlike the tables', plus a key of no table ("zz", ignored).
    keys = ["s", "zz", "f2", "f0"]
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 4, (len(keys) * cases.BATCH,), generator=gen)
    per_key = lengths.view(len(keys), cases.BATCH).sum(1).tolist()
    values = torch.cat([torch.randint(0, ROWS[k], (n,), generator=gen)
                        for k, n in zip(keys, per_key)])
    weights = torch.rand(values.numel(), generator=gen) + 0.5
    return KeyedJaggedTensor.from_lengths_sync(keys, values, lengths, weights=weights)


def _vbe_kjt(seed: int) -> KeyedJaggedTensor:
    """VBE: each key has its own batch size (1-4 distinct samples); the inverse indices map the
    ``BATCH`` samples onto them. Keys in ``_kjt``'s order: the sharded module (as TorchRec's)
    fixes its input permutation at the first batch."""
    keys = ["s", "zz", "f2", "f0"]
    gen = torch.Generator().manual_seed(seed)
    strides = torch.randint(1, cases.BATCH + 1, (len(keys),), generator=gen).tolist()
    lengths = torch.cat([torch.randint(0, 4, (b,), generator=gen) for b in strides])
    per_key = [int(seg.sum()) for seg in lengths.split(strides)]
    values = torch.cat([torch.randint(0, ROWS[k], (n,), generator=gen)
                        for k, n in zip(keys, per_key)])
    inverse = torch.stack([torch.randint(0, b, (cases.BATCH,), generator=gen) for b in strides])
    weights = torch.rand(values.numel(), generator=gen) + 0.5
    return KeyedJaggedTensor(keys=keys, values=values, lengths=lengths, weights=weights,
                             stride_per_key_per_rank=[[b] for b in strides],
                             inverse_indices=(keys, inverse))


def _check_plan(rank: int, world_size: int, name: str, fused: bool = False) -> dict[str, Any]:
    torch.manual_seed(0)
    # fused: the cores' SGD runs in the backward (module and reference alike); the head's below.
    fused_params = {"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": LR} if fused else None
    model = SharedModel(fused_params)
    reference = SharedModel(fused_params)
    reference.load_state_dict(model.state_dict())
    plan = ShardingPlan({"tt": construct_module_sharding_plan(
        model.tt, PLANS[name], sharder=TTEmbeddingBagCollectionSharder(),
        local_size=world_size, world_size=world_size, device_type="cpu")})
    dmp = cases.shard(model, plan, [TTEmbeddingBagCollectionSharder()])
    dmp.load_state_dict(reference.state_dict())
    optimizer = torch.optim.SGD(dict(in_backward_optimizer_filter(dmp.named_parameters())).values(),
                                lr=LR)
    ref_optimizer = torch.optim.SGD(
        reference.head.parameters() if fused else reference.parameters(), lr=LR)
    out: dict[str, Any] = {}
    # A batch with one batch size, then a VBE batch: forward equals the unsharded module's, and
    # a step the rank-averaged reference's.
    for what, batches in (("compared", [(_kjt(r),) for r in range(world_size)]),
                          ("compared_vbe", [(_vbe_kjt(7 + r),) for r in range(world_size)])):
        mine = batches[rank][0]
        with torch.no_grad():
            got = dmp.module.tt(mine).wait()
            want = reference.tt(mine)
            assert want.values().shape == (cases.BATCH, 16 + 16 + 8 + 32 + 32)
            assert sorted(got.keys()) == sorted(want.keys()) == sorted(OUTPUT_KEYS), got.keys()
            for key in OUTPUT_KEYS:
                torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=key)
        dmp(mine).backward()
        optimizer.step()
        optimizer.zero_grad()
        cases.reference_step(reference, ref_optimizer, batches)
        out[what] = cases.assert_state_matches(dmp.state_dict(), reference.state_dict())
    return out


def check_shared_and_vbe(rank: int, world_size: int) -> dict[str, Any]:
    out = {name: _check_plan(rank, world_size, name) for name in PLANS}
    out["fused_dp_tw_cw"] = _check_plan(rank, world_size, "dp_tw_cw", fused=True)
    return out


def test_shared_features_and_vbe_match_unsharded() -> None:
    results = run_multiprocess(check_shared_and_vbe, WORLD)
    for per_plan in results:
        for name, r in per_plan.items():
            assert r["compared"] > 0, name
            assert r["compared_vbe"] > 0, name
