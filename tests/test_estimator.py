"""TT planner cost model: pure formulas against hand counts, the estimator on enumerated options,
column-shard geometry, and plan() end to end with the planner's printed stats."""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import ParameterConstraints, Topology
from torchrec.distributed.planner.types import CollectiveType, Perf

from torchrec_tt import TTEmbeddingBagCollection, TTEmbeddingBagConfig
from torchrec_tt.shapes import TTShape
from torchrec_tt.sharding import (
    TTEmbeddingBagCollectionSharder,
    TTEmbeddingEnumerator,
    TTShardEstimator,
    measure_tt_flops,
    plan,
)
from torchrec_tt.sharding.estimator import (
    all_reduce_ms,
    all_to_all_ms,
    tt_cache_storage_bytes,
    tt_compute_ms,
    tt_shard_io_bytes,
    tt_shard_perf,
    tt_shard_storage_bytes,
)
from torchrec_tt.sharding.fused import tt_optimizer_state_bytes
from torchrec_tt.sharding.tt_shards import (
    check_column_shards,
    column_shard_core0_columns,
    column_shard_shape,
    tt_column_shard_dims,
)

# p=(4,5,6), q=(2,2,4), ranks (3,2): cores [4, 1*2*3], [5, 3*2*2], [6, 2*4*1]
# = 24 + 60 + 48 = 132 parameters. Forward FLOPs per lookup (left-to-right chain):
# k=2: 2 * q1 * r1 * q2 * r2 = 2*2*3*2*2 = 48; k=3: 2 * (q1 q2) * r2 * q3 * r3 = 2*4*2*4*1 = 64.
SHAPE = TTShape(num_rows=100, embedding_dim=16, p=(4, 5, 6), q=(2, 2, 4), ranks=(3, 2))


def test_hand_counted_shape() -> None:
    assert SHAPE.num_parameters() == 132
    assert SHAPE.forward_flops_per_lookup() == 112
    assert SHAPE.backward_flops_per_lookup() == 224


def test_io_bytes() -> None:
    # 100 ids and 10 pooled rows per rank; data parallel serves only its own batch.
    assert tt_shard_io_bytes("data_parallel", 100, 10, 4, 16) == (800, 640)
    assert tt_shard_io_bytes("table_wise", 100, 10, 4, 16) == (3200, 2560)
    assert tt_shard_io_bytes("column_wise", 100, 10, 4, 8, is_weighted=True) == (4800, 1280)
    with pytest.raises(ValueError, match="row_wise"):
        tt_shard_io_bytes("row_wise", 100, 10, 4, 16)


def test_storage_compute_and_comms_formulas() -> None:
    # 528 core bytes x (param + grad + 2 Adam states) + IO.
    assert tt_shard_storage_bytes(528, 2.0, 800, 640) == 528 * 4 + 1440
    assert tt_shard_storage_bytes(528, 0.0, 0, 0) == 1056
    assert tt_compute_ms(1000, 112, 1e9) == pytest.approx(0.112)
    assert all_to_all_ms(5000, 100.0) == 50.0
    assert all_reduce_ms(1000, 4, 10.0) == pytest.approx(150.0)  # 2 * 3/4 * 1000 / 10
    assert all_reduce_ms(1000, 1, 10.0) == 0.0


def test_shard_perf_by_sharding_type() -> None:
    flops, a2a_bw, ar_bw = 1e6, 1000.0, 100.0  # FLOP/s, bytes/ms, bytes/ms
    dp = tt_shard_perf(SHAPE, "data_parallel", 10, 2, 4, flops, a2a_bw, ar_bw)
    # 10 lookups; all-reduce of 528 core bytes at 2 * 3/4.
    assert dp == Perf(
        fwd_compute=pytest.approx(10 * 112 / 1e6 * 1e3),
        fwd_comms=0.0,
        bwd_compute=pytest.approx(10 * 224 / 1e6 * 1e3),
        bwd_comms=pytest.approx(2 * 0.75 * 528 / 100.0),
    )
    tw = tt_shard_perf(SHAPE, "table_wise", 10, 2, 4, flops, a2a_bw, ar_bw)
    # 40 lookups (all 4 ranks' ids); KJT: 40 ids x 8 B; pooled: 8 rows x 16 x 4 B each way.
    assert tw.fwd_compute == pytest.approx(40 * 112 / 1e6 * 1e3)
    assert tw.fwd_comms == pytest.approx((40 * 8 + 8 * 16 * 4) / 1000.0)
    assert tw.bwd_comms == pytest.approx(8 * 16 * 4 / 1000.0)
    shard = column_shard_shape(SHAPE, 8, 8)
    cw = tt_shard_perf(shard, "column_wise", 10, 2, 4, flops, a2a_bw, ar_bw, replicated_bytes=432)
    # q=(1,2,4): k=2: 2*1*3*2*2 = 24, k=3: 2*2*2*4 = 32 -> 56 FLOPs per lookup.
    assert shard.forward_flops_per_lookup() == 56
    assert cw.fwd_compute == pytest.approx(40 * 56 / 1e6 * 1e3)
    assert cw.bwd_comms == pytest.approx(8 * 8 * 4 / 1000.0 + 2 * 0.75 * 432 / 100.0)


def test_column_shard_geometry() -> None:
    shard = column_shard_shape(SHAPE, 8, 8)
    assert shard.q == (1, 2, 4) and shard.embedding_dim == 8 and shard.p == SHAPE.p
    assert column_shard_core0_columns(SHAPE, 8, 8) == (3, 3)  # j1 = 1 of 2, times r1 = 3
    with pytest.raises(ValueError, match="D/q_1 = 8"):
        column_shard_shape(SHAPE, 4, 12)
    check_column_shards("t", SHAPE, [[0, 8], [0, 0]], [[100, 8], [100, 8]])
    with pytest.raises(ValueError, match="do not tile"):
        check_column_shards("t", SHAPE, [[0, 0], [0, 0]], [[100, 8], [100, 8]])
    with pytest.raises(ValueError, match="span all 100 rows"):
        check_column_shards("t", SHAPE, [[0, 0]], [[50, 16]])
    wide = TTShape(num_rows=100, embedding_dim=64, p=(4, 5, 6), q=(4, 4, 4), ranks=(2, 2))
    assert tt_column_shard_dims(wide, 2) == [32, 32]
    assert tt_column_shard_dims(wide, 8) == [16, 16, 16, 16]
    assert tt_column_shard_dims(wide, 8, min_partition=20) == [32, 32]
    assert tt_column_shard_dims(wide, 8, min_partition=40) == [64]


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tt = TTEmbeddingBagCollection(
            [
                TTEmbeddingBagConfig(name="big", num_embeddings=10_000_000, embedding_dim=64,
                                     feature_names=["f0"], tt_ranks=[32, 32]),
                TTEmbeddingBagConfig(name="small", num_embeddings=10_000, embedding_dim=64,
                                     feature_names=["f1"], tt_ranks=[8, 8]),
            ],
            device="meta",
        )
        self.ebc = EmbeddingBagCollection(
            [EmbeddingBagConfig(name="plain", num_embeddings=1000, embedding_dim=64,
                                feature_names=["f2"])],
            device="meta",
        )


TOPOLOGY = Topology(world_size=2, compute_device="cpu")


def _options(  # type: ignore[no-untyped-def]
    constraints: dict[str, ParameterConstraints] | None = None,
):
    estimator = TTShardEstimator(TOPOLOGY, constraints, device_flops=1e10, optimizer_multiplier=1.0)
    enumerator = TTEmbeddingEnumerator(TOPOLOGY, 128, constraints, estimator=estimator)
    options = enumerator.enumerate(
        _Model(), [TTEmbeddingBagCollectionSharder(), EmbeddingBagCollectionSharder()]
    )
    return {(o.name, o.sharding_type): o for o in options}


def test_estimator_storage_is_the_cores_not_the_dense_table() -> None:
    options = _options()
    model = _Model()
    shape = model.tt.tt_shapes()["big"]
    dp = options[("big", "data_parallel")]
    assert len(dp.shards) == 2
    io = tt_shard_io_bytes("data_parallel", 128, 128, 2, 64)
    for shard in dp.shards:
        assert shard.storage.hbm == 0
        assert shard.storage.ddr == tt_shard_storage_bytes(shape.num_bytes(4), 1.0, *io)
        assert shard.storage.ddr < shape.dense_num_bytes(4) / 100
    tw = options[("big", "table_wise")].shards[0]
    assert tw.perf.fwd_compute == pytest.approx(2 * dp.shards[0].perf.fwd_compute)
    # Plain tables keep TorchRec's estimates; column_wise is offered only on request.
    assert options[("plain", "table_wise")].shards[0].storage.ddr > 1000 * 64 * 4
    assert ("big", "column_wise") not in options


def test_column_wise_options_split_q1_when_asked() -> None:
    constraints = {"big": ParameterConstraints(sharding_types=["column_wise"])}
    option = _options(constraints)[("big", "column_wise")]
    assert [s.size for s in option.shards] == [[10_000_000, 32], [10_000_000, 32]]
    assert [s.offset for s in option.shards] == [[0, 0], [0, 32]]
    assert all(s.perf is not None and s.storage is not None for s in option.shards)


def test_plan_end_to_end_and_stats_show_tt_storage(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="torchrec.distributed.planner.stats")
    sharding_plan = plan(_Model(), TOPOLOGY, batch_size=128, device_flops=1e10)
    tt_plan: Any = sharding_plan.plan["tt"]
    plain_plan: Any = sharding_plan.plan["ebc"]
    assert set(tt_plan) == {"big", "small"}
    assert all(ps.compute_kernel == "customized_kernel" for ps in tt_plan.values())
    assert plain_plan["plain"].compute_kernel != "customized_kernel"
    rows = [r.message for r in caplog.records if " tt.big " in r.message]
    assert rows, "planner stats have no row for tt.big"
    # "(HBM GB, DDR GB, SSD GB)": the TT table's tens of MB, not the 2.56 GB dense table.
    storage = rows[0].split("(0.0 GB, ")[1].split(" GB")[0]
    assert 0 < float(storage) < 0.1


def test_measure_tt_flops_is_positive() -> None:
    rate = measure_tt_flops(num_rows=10_000, tt_rank=8, batch_size=32, pooling_factor=4, repeats=2)
    assert math.isfinite(rate) and rate > 0


def test_estimator_rejects_nonpositive_flops() -> None:
    with pytest.raises(ValueError, match="device_flops"):
        TTShardEstimator(TOPOLOGY, device_flops=0)


def test_optimizer_state_bytes_per_fused_optimizer() -> None:
    # SHAPE: 132 parameters = 528 bytes in cores [4, 6], [5, 12], [6, 8] (rows 4 + 5 + 6 = 15).
    assert tt_optimizer_state_bytes(SHAPE, EmbOptimType.EXACT_SGD) == 0
    assert tt_optimizer_state_bytes(SHAPE, EmbOptimType.EXACT_ADAGRAD) == 528
    assert tt_optimizer_state_bytes(SHAPE, EmbOptimType.EXACT_ROWWISE_ADAGRAD) == 15 * 4
    assert tt_optimizer_state_bytes(SHAPE, EmbOptimType.ADAM) == 2 * 528 + 3 * 4  # + a step per core
    assert tt_shard_storage_bytes(528, 2.0, 800, 640, optimizer_state_bytes=60) == 1056 + 60 + 1440


@pytest.mark.parametrize(
    "optimizer",
    [EmbOptimType.EXACT_SGD, EmbOptimType.EXACT_ADAGRAD, EmbOptimType.EXACT_ROWWISE_ADAGRAD,
     EmbOptimType.ADAM],
)
def test_estimator_counts_the_fused_optimizer_state(optimizer: EmbOptimType) -> None:
    """The optimizer the sharder will give a table (here from the sharder's fused_params and
    from the module's) sets its state bytes; without one, the default multiplier (Adam)."""
    def ddr(model: nn.Module, sharder: TTEmbeddingBagCollectionSharder) -> int:
        estimator = TTShardEstimator(TOPOLOGY, device_flops=1e10)
        enumerator = TTEmbeddingEnumerator(TOPOLOGY, 128, estimator=estimator)
        options = enumerator.enumerate(model, [sharder, EmbeddingBagCollectionSharder()])
        (dp,) = [o for o in options if (o.name, o.sharding_type) == ("big", "data_parallel")]
        return dp.shards[0].storage.ddr

    shape = _Model().tt.tt_shapes()["big"]
    io = tt_shard_io_bytes("data_parallel", 128, 128, 2, 64)
    core = shape.num_bytes(4)
    fused = {"optimizer": optimizer, "learning_rate": 0.1}
    expected = 2 * core + tt_optimizer_state_bytes(shape, optimizer) + sum(io)
    assert ddr(_Model(), TTEmbeddingBagCollectionSharder(fused_params=fused)) == expected
    model = _Model()
    model.tt = TTEmbeddingBagCollection(model.tt.embedding_bag_configs(), device="meta",
                                        fused_params=fused)
    assert ddr(model, TTEmbeddingBagCollectionSharder()) == expected
    assert ddr(_Model(), TTEmbeddingBagCollectionSharder()) == 4 * core + sum(io)


def test_cache_storage_by_hand() -> None:
    # K=100 rows, D=16: slab 6400 B + its gradient 6400 B; buffers: 3 x 100 int64 (id map) +
    # 200 int64 + 200 float32 (candidates) + one int64 step = 2400 + 1600 + 800 + 8 = 4808 B.
    assert tt_cache_storage_bytes(0, 16, EmbOptimType.ADAM) == 0
    assert tt_cache_storage_bytes(100, 16, EmbOptimType.EXACT_SGD) == 12800 + 4808
    assert tt_cache_storage_bytes(100, 16, EmbOptimType.EXACT_ADAGRAD) == 12800 + 6400 + 4808
    assert tt_cache_storage_bytes(100, 16, EmbOptimType.EXACT_ROWWISE_ADAGRAD) == 12800 + 400 + 4808
    assert tt_cache_storage_bytes(100, 16, EmbOptimType.ADAM) == 12800 + 12804 + 4808  # + a step
    assert tt_cache_storage_bytes(100, 16, None, optimizer_multiplier=2.0) == 12800 + 12800 + 4808


def test_estimator_counts_the_hot_row_cache() -> None:
    """A cached table's shard storage is the uncached one plus the cache's bytes (fused Adagrad:
    slab, gradient, Adagrad state, buffers); data_parallel also all-reduces the slab and
    all-gathers the ids; column_wise is not offered to it."""
    def options(cache_rows: int) -> dict[tuple[str, str], Any]:
        model = _Model()
        configs = [dataclasses.replace(c, tt_cache_rows=cache_rows) if c.name == "big" else c
                   for c in model.tt.embedding_bag_configs()]
        model.tt = TTEmbeddingBagCollection(configs, device="meta", fused_params={
            "optimizer": EmbOptimType.EXACT_ADAGRAD, "learning_rate": 0.1})
        constraints = {"big": ParameterConstraints(sharding_types=["data_parallel", "table_wise",
                                                                   "column_wise"])}
        estimator = TTShardEstimator(TOPOLOGY, constraints, device_flops=1e10)
        enumerator = TTEmbeddingEnumerator(TOPOLOGY, 128, constraints, estimator=estimator)
        found = enumerator.enumerate(model, [TTEmbeddingBagCollectionSharder(),
                                             EmbeddingBagCollectionSharder()])
        return {(o.name, o.sharding_type): o for o in found}

    plain, cached = options(0), options(500_000)  # a 5% cache
    extra = tt_cache_storage_bytes(500_000, 64, EmbOptimType.EXACT_ADAGRAD)
    assert extra == 3 * 500_000 * 64 * 4 + 500_000 * (5 * 8 + 2 * 4) + 8
    for kind in ("data_parallel", "table_wise"):
        for a, b in zip(plain[("big", kind)].shards, cached[("big", kind)].shards):
            assert b.storage.ddr == a.storage.ddr + extra
    assert ("big", "column_wise") in plain and ("big", "column_wise") not in cached
    dp_plain, dp_cached = plain[("big", "data_parallel")].shards[0].perf, cached[("big", "data_parallel")].shards[0].perf
    bw = TOPOLOGY.comms_bandwidths
    ar = bw.get_bw(local_world_size=TOPOLOGY.local_world_size, world_size=2,
                   collective_type=CollectiveType.ALL_REDUCE)
    a2a = bw.get_bw(local_world_size=TOPOLOGY.local_world_size, world_size=2,
                    collective_type=CollectiveType.ALL_TO_ALL)
    assert dp_cached.bwd_comms == pytest.approx(dp_plain.bwd_comms + all_reduce_ms(500_000 * 64 * 4, 2, ar))
    assert dp_cached.fwd_comms == pytest.approx(dp_plain.fwd_comms + all_to_all_ms(128 * 8, a2a))


def test_cuda_compute_counts_the_two_factor_kernels_flops() -> None:
    # On CUDA a 3-core shape whose prefix fits the two-factor kernels costs 2DR forward and 4DR
    # backward per lookup (what those kernels do), not the per-row chain's 2R(q0 q1 R + D).
    shape = TTShape(10_000, 16, (25, 20, 20), (2, 2, 4), (32, 32))
    flops, lookups = 1e12, 4096.0
    cpu = tt_shard_perf(shape, "data_parallel", lookups, 1, 1, flops, 1e9, 1e9)
    cuda = tt_shard_perf(shape, "data_parallel", lookups, 1, 1, flops, 1e9, 1e9, compute_device="cuda")
    assert math.isclose(cpu.fwd_compute, lookups * shape.forward_flops_per_lookup() / flops * 1e3)
    assert math.isclose(cuda.fwd_compute, lookups * 2 * 16 * 32 / flops * 1e3)
    assert math.isclose(cuda.bwd_compute, lookups * 4 * 16 * 32 / flops * 1e3)
    assert cuda.fwd_compute < cpu.fwd_compute


def test_cuda_without_a_rate_costs_each_shape_with_its_kernels_model() -> None:
    from torchrec_tt.kernel_shapes import OLDER_KERNEL_FLOPS, kernel_cost

    two = TTShape(10_000, 16, (100, 100), (4, 4), (32,))
    older = TTShape(11_000_000, 64, (200, 220, 250), (4, 4, 4), (32, 32))  # prefix too large
    perf = tt_shard_perf(older, "data_parallel", 4096.0, 1, 1, None, 1e9, 1e9, compute_device="cuda")
    assert math.isclose(perf.fwd_compute, 4096 * older.forward_flops_per_lookup() / OLDER_KERNEL_FLOPS * 1e3)
    # The two-factor kernels: the fitted model, whose per-call part (sort, update) is in the
    # backward and whose per-lookup part grows with the lookups.
    cost = kernel_cost(two)
    small, large = (tt_shard_perf(two, "data_parallel", n, 1, 1, None, 1e9, 1e9, compute_device="cuda")
                    for n in (4096.0, 65536.0))
    assert math.isclose(small.fwd_compute, cost.forward_seconds(4096) * 1e3)
    assert math.isclose(small.bwd_compute, cost.backward_seconds(4096) * 1e3)
    assert math.isclose(small.fwd_compute + small.bwd_compute, cost.step_seconds(4096) * 1e3)
    assert cost.backward_seconds(0) > 0 == cost.forward_seconds(0)
    assert large.fwd_compute > small.fwd_compute and large.bwd_compute > small.bwd_compute
    with pytest.raises(ValueError, match="device_flops is needed"):
        tt_shard_perf(two, "data_parallel", 4096.0, 1, 1, None, 1e9, 1e9)
