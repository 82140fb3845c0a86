"""Shared features (one feature in several TT tables) and variable batch per feature (VBE)
through the TT sharder, on CPU/gloo at world size 2, against the unsharded module.

One spawned job: two plans covering data_parallel, table_wise and column_wise tables that share
a feature (forward equals the unsharded module, keys ``feature@table`` as TorchRec names them;
two SGD steps equal the rank-averaged unsharded reference), then a VBE batch, which the sharded
collection refuses with a ValueError naming what it lacks (the unsharded module takes it).
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
    "dp_tw_cw": {"t0": data_parallel(), "t1": table_wise(rank=1), "t2": column_wise(ranks=[0, 1])},
    "tw_cw_one_rank": {"t0": table_wise(rank=0), "t1": table_wise(rank=0),
                       "t2": column_wise(ranks=[1, 1, 0, 0])},
}


class SharedModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tt = TTEmbeddingBagCollection(copy.deepcopy(TABLES))
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
    values = torch.cat([torch.randint(0, ROWS[k], (n,), generator=gen) for k, n in zip(keys, per_key)])
    return KeyedJaggedTensor.from_lengths_sync(keys, values, lengths)


def _vbe_kjt() -> KeyedJaggedTensor:
    """Batch sizes 2, 3, 1 for f0, s, f2; the inverse indices map 4 samples onto them."""
    keys = ["f0", "s", "f2"]
    lengths = torch.tensor([1, 2, 0, 3, 1, 2])
    values = torch.tensor([5, 7, 8, 1, 2, 3, 4, 9, 10])
    inverse = torch.tensor([[0, 1, 1, 0], [2, 0, 1, 2], [0, 0, 0, 0]])
    return KeyedJaggedTensor(keys=keys, values=values, lengths=lengths,
                             stride_per_key_per_rank=[[2], [3], [1]], inverse_indices=(keys, inverse))


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
    # VBE: the unsharded module takes it, the sharded one refuses it (before any collective).
    assert reference.tt(_vbe_kjt()).values().shape == (4, 16 + 16 + 8 + 32 + 32)
    try:
        dmp(_vbe_kjt())
    except ValueError as e:
        out["vbe_error"] = str(e)
    return out


def check_shared_and_vbe(rank: int, world_size: int) -> dict[str, Any]:
    return {name: _check_plan(rank, world_size, name) for name in PLANS}


def test_shared_features_match_unsharded_and_vbe_is_refused() -> None:
    results = run_multiprocess(check_shared_and_vbe, WORLD)
    for per_plan in results:
        for name, r in per_plan.items():
            assert r["compared"] > 0, name
            assert "variable batch size per feature (VBE" in r["vbe_error"], name
            assert "TT tables ['t0', 't1', 't2']" in r["vbe_error"]
            assert "the unsharded TTEmbeddingBagCollection takes VBE" in r["vbe_error"]
