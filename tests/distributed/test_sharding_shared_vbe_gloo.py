"""Shared features (one feature in several TT tables) and variable batch per feature (VBE)
through the TT sharder, on CPU/gloo at world size 2, against the unsharded module.

One spawned job: a weighted collection (per-sample weights) under three plans covering
data_parallel, table_wise and column_wise tables (column shards on one rank and across ranks, a
rank without tables) that share a feature. Forward equals the unsharded module (keys
``feature@table``, as TorchRec names them) and two SGD steps equal the rank-averaged unsharded
reference; then a VBE batch (each feature its own batch size, with inverse indices, different on
each rank): forward and one more step again equal the unsharded module's.
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
from torchrec.distributed.types import ShardingPlan
from torchrec.modules.embedding_configs import PoolingType
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
    # Rank 1 holds no table_wise table: its lookup returns an empty VBE output.
    "tw_one_rank": {"t0": table_wise(rank=0), "t1": table_wise(rank=0), "t2": table_wise(rank=0)},
    "dp_tw_cw": {"t0": data_parallel(), "t1": table_wise(rank=1), "t2": column_wise(ranks=[0, 1])},
    "tw_cw_one_rank": {"t0": table_wise(rank=0), "t1": table_wise(rank=0),
                       "t2": column_wise(ranks=[1, 1, 0, 0])},
}


class SharedModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tt = TTEmbeddingBagCollection(copy.deepcopy(TABLES), is_weighted=True)
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


def _check_plan(rank: int, world_size: int, name: str) -> dict[str, Any]:
    torch.manual_seed(0)
    model = SharedModel()
    reference = copy.deepcopy(model)
    plan = ShardingPlan({"tt": construct_module_sharding_plan(
        model.tt, PLANS[name], sharder=TTEmbeddingBagCollectionSharder(),
        local_size=world_size, world_size=world_size, device_type="cpu")})
    dmp = cases.shard(model, plan, [TTEmbeddingBagCollectionSharder()])
    dmp.load_state_dict(reference.state_dict())
    optimizer = torch.optim.SGD(dmp.parameters(), lr=LR)
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=LR)
    compared = 0
    for step in range(2):
        batches = [(_kjt(100 * step + r),) for r in range(world_size)]
        mine = batches[rank][0]
        with torch.no_grad():
            got = dmp.module.tt(mine).wait()
            want = reference.tt(mine)
            assert sorted(got.keys()) == sorted(want.keys()) == sorted(OUTPUT_KEYS), got.keys()
            for key in OUTPUT_KEYS:
                torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=key)
        loss = dmp(mine)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        cases.reference_step(reference, ref_optimizer, batches)
        compared += cases.assert_state_matches(dmp.state_dict(), reference.state_dict())
    out: dict[str, Any] = {"compared": compared}
    vbe = [(_vbe_kjt(7 + r),) for r in range(world_size)]
    # VBE: forward equals the unsharded module's, and a step the rank-averaged reference's.
    with torch.no_grad():
        got = dmp.module.tt(vbe[rank][0]).wait()
        want = reference.tt(vbe[rank][0])
        assert want.values().shape == (cases.BATCH, 16 + 16 + 8 + 32 + 32)
        for key in OUTPUT_KEYS:
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=key)
    dmp(vbe[rank][0]).backward()
    optimizer.step()
    cases.reference_step(reference, ref_optimizer, vbe)
    out["compared_vbe"] = cases.assert_state_matches(dmp.state_dict(), reference.state_dict())
    return out


def check_shared_and_vbe(rank: int, world_size: int) -> dict[str, Any]:
    return {name: _check_plan(rank, world_size, name) for name in PLANS}


def test_shared_features_and_vbe_match_unsharded() -> None:
    results = run_multiprocess(check_shared_and_vbe, WORLD)
    for per_plan in results:
        for name, r in per_plan.items():
            assert r["compared"] > 0, name
            assert r["compared_vbe"] > 0, name
