"""Kernel options (bounds_check_mode, compute_precision, deterministic) reach the sharded TT
lookups: the module's fused_params keys, overridden by the sharder's, on CPU/gloo at world size 2.
"""

from __future__ import annotations

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import tt_dist_cases as cases
from torchrec_tt.ops import BoundsCheckMode, ComputePrecision, TTKernelOptions
from torchrec_tt.sharding import TTEmbeddingBagCollectionSharder
from torchrec_tt.sharding.testing import run_multiprocess

pytestmark = [pytest.mark.multiprocess]

WORLD = 2
MIXED = {"t0": ("tw", 1), "t1": ("dp",), "t2": ("cw", [1, 0])}


def _with_bad_index(kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
    values = kjt.values().clone()
    values[0] = 10**6  # beyond every TT table
    return KeyedJaggedTensor.from_lengths_sync(kjt.keys(), values, kjt.lengths())


def _check(rank: int, world_size: int) -> int:
    module_params = {"compute_precision": "fp32", "bounds_check_mode": BoundsCheckMode.FATAL}
    model = cases.make_model(0, plain=False, fused_params=module_params)
    reference = cases.make_model(
        0, plain=False, fused_params={"compute_precision": "fp32", "bounds_check_mode": "ignore"}
    )
    sharder = TTEmbeddingBagCollectionSharder(
        fused_params={"bounds_check_mode": "ignore", "deterministic": True}
    )
    dmp = cases.shard(model, cases.manual_plan(model, MIXED, world_size), [sharder])
    want = TTKernelOptions(BoundsCheckMode.IGNORE, ComputePrecision.FP32, deterministic=True)
    lookups = [getattr(lk, "module", lk) for lk in dmp.module.tt._lookups]
    assert lookups and all(lk.kernel_options == want for lk in lookups), [
        lk.kernel_options for lk in lookups
    ]
    # Kernel keys alone make no fused optimizer: the cores still get gradients.
    batches = [(_with_bad_index(cases.batch_for(r, 0, plain=False)[0]),) for r in range(world_size)]
    loss = dmp(*batches[rank])
    loss.backward()
    assert all(p.grad is not None for n, p in dmp.named_parameters() if n.startswith("tt."))
    # Out-of-range ids contribute zero on every shard, as in the unsharded module.
    torch.testing.assert_close(loss, reference(*batches[rank]))
    return len(lookups)


def test_sharded_lookups_take_module_and_sharder_kernel_options() -> None:
    results = run_multiprocess(_check, WORLD)
    assert all(n > 0 for n in results)
