"""ShardedTTEmbeddingBagCollection on CPU/gloo at world size 2.

Each spawned job (~5 s of process start-up) runs several plans: forward equals the unsharded
module, three SGD steps equal the rank-averaged unsharded reference, and the bytes measured on
the collectives equal ``plan_comms_bytes`` (in the mixed plans the TT collection's KJT also
carries the plain features, which its input dist drops); the TT-only job also shards a
meta-device model.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.multiprocessing import ProcessRaisedException
from torchrec.distributed.fbgemm_qcomm_codec import (
    CommType,
    QCommsConfig,
    get_qcomm_codecs_registry,
)
from torchrec.distributed.types import ShardedTensor

import tt_dist_cases as cases
from torchrec_tt.sharding import (
    CommsMeter,
    TTEmbeddingBagCollectionSharder,
    plan_comms_bytes,
)
from torchrec_tt.sharding.testing import run_multiprocess

pytestmark = pytest.mark.multiprocess

WORLD = 2
LR = 0.5


def _check_plan(rank: int, world_size: int, specs: dict[str, Any], plain: bool,
                weighted: bool, fp16_comms: bool = False) -> dict[str, int]:
    model = cases.make_model(0, plain=plain, weighted=weighted)
    reference = copy.deepcopy(model)
    plan = cases.manual_plan(model, specs, world_size)
    expected = plan_comms_bytes(
        model, plan, cases.BATCH, cases.FIXED_LENGTHS, world_size,
        embedding_element_size=2 if fp16_comms else 4,
    )
    sharders = None
    tol = {"rtol": 1e-5, "atol": 1e-6}
    if fp16_comms:
        codecs = get_qcomm_codecs_registry(
            QCommsConfig(forward_precision=CommType.FP16, backward_precision=CommType.FP16)
        )
        sharders = [TTEmbeddingBagCollectionSharder(qcomm_codecs_registry=codecs)]
        tol = {"rtol": 1e-2, "atol": 2e-3}
    dmp = cases.shard(model, plan, sharders)
    assert not dmp.fused_optimizer.params  # no fused optimizer: nothing in DMP's
    # TorchRec does not copy plain EBC weights into its sharded module (the TT sharder does copy
    # TT cores); loading the unsharded state dict covers both, through the sharded load path.
    dmp.load_state_dict(reference.state_dict())
    meter = CommsMeter()
    meter.attach(dmp)
    optimizer = torch.optim.SGD(dmp.parameters(), lr=LR)
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=LR)
    compared = 0
    for step in range(3):
        fixed = step == 2  # fixed bag lengths: the comms are then exactly predictable
        # With the plain EBC, the TT collection's KJT holds the plain features too (ignored).
        batches = [cases.batch_for(r, step, plain, weighted, fixed, extra_keys=plain)
                   for r in range(world_size)]
        mine = batches[rank]
        with torch.no_grad():
            got = dmp.module.tt(mine[0]).wait()
            want = reference.tt(mine[0])
            for f in cases.TT_FEATURES:
                torch.testing.assert_close(got[f], want[f], **tol, msg=f)
            assert got.values().shape == want.values().shape
        meter.reset()
        with meter:
            loss = dmp(*mine)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            torch.testing.assert_close(loss, reference(*mine), **tol)
        cases.reference_step(reference, ref_optimizer, batches)
        compared += cases.assert_state_matches(dmp.state_dict(), reference.state_dict(), **tol)
    return {
        "compared": compared,
        "a2a": meter.all_to_all_bytes,
        "a2a_expected": expected.all_to_all[rank],
        "all_reduce": meter.all_reduce_bytes,
        "all_reduce_expected": expected.all_reduce[rank],
    }


def _check_meta_init(rank: int, world_size: int) -> None:
    """Sharding a meta-device model initialises the cores; replicas agree across ranks."""
    model = cases.Model(plain=False, device="meta")
    specs = {"t0": ("dp",), "t1": ("tw", 1), "t2": ("cw", [1, 0])}
    dmp = cases.shard(model, cases.manual_plan(model, specs, world_size))
    replicated = {
        k: v for k, v in dmp.state_dict().items()
        if k.startswith("tt.") and not isinstance(v, ShardedTensor)
    }
    assert sorted(replicated) == [
        "tt.embedding_bags.t0.core_0", "tt.embedding_bags.t0.core_1", "tt.embedding_bags.t0.core_2",
        "tt.embedding_bags.t2.core_1", "tt.embedding_bags.t2.core_2",
    ]
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, replicated)
    for key, value in replicated.items():
        assert value.abs().sum() > 0 and torch.isfinite(value).all(), key
        torch.testing.assert_close(value, gathered[0][key], rtol=0, atol=0, msg=key)
    loss = dmp(*cases.batch_for(rank, 0, plain=False))
    loss.backward()
    assert torch.isfinite(loss)


def check_plans(rank: int, world_size: int, plans: list[tuple[Any, ...]]
                ) -> dict[str, dict[str, int]]:
    results = {name: _check_plan(rank, world_size, *args) for name, *args in plans}
    _check_meta_init(rank, world_size)
    return results


TT_ONLY_PLANS = [
    ("data_parallel", {"t0": ("dp",), "t1": ("dp",), "t2": ("dp",)}, False, False),
    # Every table on rank 0: rank 1 owns none and returns [B, 0] tensors (per-sample weights).
    ("all_on_one_rank_weighted", {"t0": ("tw", 0), "t1": ("tw", 0), "t2": ("cw", [0, 0, 0, 0])},
     False, True),
    # Non-contiguous column shards on one rank (t2 columns 0-7 and 24-31 on rank 0).
    ("column_wise", {"t0": ("cw", [1, 0]), "t1": ("dp",), "t2": ("cw", [0, 1, 1, 0])},
     False, False),
    # Rank 1 holds no column shard but still joins the shared cores' gradient sum.
    ("column_wise_one_rank", {"t0": ("cw", [0, 0]), "t1": ("tw", 1), "t2": ("cw", [0, 0, 0, 0])},
     False, False),
    # TorchRec's quantised comms on the pooled all-to-all (FP16 both ways) work unchanged.
    ("table_wise_fp16_comms", {"t0": ("tw", 1), "t1": ("tw", 0), "t2": ("cw", [0, 1])},
     False, False, True),
]
MIXED_PLANS = [
    ("mixed_with_plain_ebc",
     {"t0": ("dp",), "t1": ("tw", 1), "t2": ("cw", [0, 1]),
      "e0": ("tw", 0), "e1": ("dp",), "e2": ("cw", [1, 0])}, True, False),
    ("tt_data_parallel_plain_table_wise",
     {"t0": ("dp",), "t1": ("dp",), "t2": ("dp",),
      "e0": ("tw", 0), "e1": ("tw", 1), "e2": ("tw", 1)}, True, False),
]


def _assert_results(results: list[dict[str, dict[str, int]]]) -> None:
    for rank, per_plan in enumerate(results):
        for name, r in per_plan.items():
            assert r["compared"] > 0, name
            assert r["a2a"] == r["a2a_expected"], (name, rank, r)
            assert r["all_reduce"] == r["all_reduce_expected"], (name, rank, r)


def test_tt_only_plans_match_unsharded() -> None:
    results = run_multiprocess(check_plans, WORLD, args=(TT_ONLY_PLANS,))
    _assert_results(results)
    # A data-parallel TT plan sends nothing by all-to-all.
    assert all(r["data_parallel"]["a2a"] == 0 for r in results)


def test_mixed_plans_with_plain_ebc_match_unsharded() -> None:
    results = run_multiprocess(check_plans, WORLD, args=(MIXED_PLANS,))
    _assert_results(results)
    # TT tables data-parallel: the all-to-all carries only the plain tables' features, and that
    # is exactly what the accounting of the plain module alone predicts.
    model = cases.make_model(0)
    plan = cases.manual_plan(model, MIXED_PLANS[1][1], WORLD)
    plain_only = type(plan)({"ebc": plan.plan["ebc"]})
    tt_only = type(plan)({"tt": plan.plan["tt"]})
    plain_bytes = plan_comms_bytes(model, plain_only, cases.BATCH, cases.FIXED_LENGTHS, WORLD)
    tt_bytes = plan_comms_bytes(model, tt_only, cases.BATCH, cases.FIXED_LENGTHS, WORLD)
    assert tt_bytes.total_all_to_all == 0
    for rank, r in enumerate(results):
        assert r["tt_data_parallel_plain_table_wise"]["a2a"] == plain_bytes.all_to_all[rank] > 0


def dmp_without_plan(rank: int, world_size: int) -> None:
    try:
        cases.shard(cases.make_model(0), plan=None)  # type: ignore[arg-type]
    except RuntimeError:
        # Rank 0 plans for everyone (and fails); the others lose it while waiting for the
        # broadcast plan. Let rank 0's error be the one reported.
        if rank == 0:
            raise


def test_dmp_without_plan_points_to_plan() -> None:
    with pytest.raises(ProcessRaisedException, match=r"torchrec_tt\.sharding\.plan\(model"):
        run_multiprocess(dmp_without_plan, WORLD, timeout_s=60)
