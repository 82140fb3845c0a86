"""MLET (issue 17): configs, MLETEmbeddingBagCollection against its definition, collapse
exactness (plain and TT), the hybrid and the config swap, init, tracing; sharded = unsharded for
data_parallel / table_wise / column_wise on 2 gloo processes with the DCP round trip and the
checkpoint path to the collapsed model; the trainer flag."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.sharding_plan import (
    column_wise,
    construct_module_sharding_plan,
    data_parallel,
    table_wise,
)
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from torchrec.fx import symbolic_trace
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_tt import (
    MLETEmbeddingBagCollection,
    MLETEmbeddingBagConfig,
    TTEmbeddingBagCollection,
    TTEmbeddingBagConfig,
)
from torchrec_tt.mlet import (
    collapse_checkpoint,
    collapsed_config,
    effective_rank,
    mlet_rowwise_lr_scale,
    swap_to_mlet,
)
from torchrec_tt.sharding import TTEmbeddingBagCollectionSharder
from torchrec_tt.sharding.testing import run_multiprocess
from torchrec_tt.swap import HybridEmbeddingBagCollection, TTPolicy, inference_bytes, swap_configs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "distributed"))  # the distributed tests' shared checks
import tt_dist_cases as cases  # noqa: E402

# Plain MLET: a two-feature SUM table and a MEAN table; TT MLET: 2 cores with explicit factors
# (so the collapsed table keeps the row split) and 3 cores.
PLAIN = [
    MLETEmbeddingBagConfig(name="a", num_embeddings=50, embedding_dim=4,
                           feature_names=["fa", "fa2"], mlet_inner_dim=16),
    MLETEmbeddingBagConfig(name="b", num_embeddings=30, embedding_dim=8, feature_names=["fb"],
                           mlet_inner_dim=32, pooling=PoolingType.MEAN),
]
TT = [
    TTEmbeddingBagConfig(name="c", num_embeddings=60, embedding_dim=8, feature_names=["fc"],
                         tt_ranks=[3], tt_p_shapes=[6, 10], tt_q_shapes=[4, 8],
                         mlet_inner_dim=32),
    TTEmbeddingBagConfig(name="e", num_embeddings=64, embedding_dim=8, feature_names=["fe"],
                         tt_ranks=[2, 3], tt_p_shapes=[4, 4, 4], tt_q_shapes=[2, 4, 4],
                         mlet_inner_dim=32, pooling=PoolingType.MEAN),
]
ROWS = {f: t.num_embeddings for t in PLAIN + TT for f in t.feature_names}
ROWS.update(other=5, ft=40)


def kjt(keys: list[str], seed: int, batch: int = 3, weighted: bool = False) -> KeyedJaggedTensor:
    """Bags of 0..3 ids (empty bags included)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 4, (len(keys) * batch,), generator=gen)
    values = torch.cat([
        torch.randint(0, ROWS[k], (int(lengths[i * batch:(i + 1) * batch].sum()),), generator=gen)
        for i, k in enumerate(keys)
    ])
    weights = torch.rand(values.numel(), generator=gen) + 0.5 if weighted else None
    return KeyedJaggedTensor.from_lengths_sync(keys, values, lengths, weights=weights)


def kronecker_projection(mlet: MLETEmbeddingBagCollection, name: str) -> None:
    """Sets a TT table's projection to a Kronecker product over its column factors: then the
    collapsed table has the table's TT ranks and the TT-SVD at those ranks is exact."""
    cfg = next(c for c in mlet.embedding_bag_configs() if c.name == name)
    q_in = mlet.tt.tt_shapes()[name].q
    q_out = collapsed_config(cfg).tt_shape().q
    gen = torch.Generator().manual_seed(3)
    w = torch.ones(1, 1)
    for a, b in zip(q_out, q_in):
        w = torch.kron(w, torch.randn(a, b, generator=gen))
    with torch.no_grad():
        mlet.projections[name].weight.copy_(w)


def assert_same_pooled(got: Any, want: Any, keys: list[str], atol: float = 1e-6) -> None:
    assert got.keys() == want.keys() == keys
    assert got.length_per_key() == want.length_per_key()
    for k in keys:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=atol, msg=k)


# ------------------------------------------------------------------------------ configs


@pytest.mark.parametrize("kwargs, message", [
    ({}, "MLET table 'x': mlet_inner_dim is required"),
    ({"mlet_inner_dim": 4}, "table 'x': mlet_inner_dim=4 is below embedding_dim=8"),
    ({"mlet_inner_dim": 16.0}, "table 'x': mlet_inner_dim must be a positive int, got 16.0"),
    ({"mlet_inner_dim": 0}, "table 'x': mlet_inner_dim must be a positive int, got 0"),
    ({"mlet_inner_dim": 16, "mlet_init_scale": 0.0}, "table 'x': mlet_init_scale must be"),
    ({"mlet_inner_dim": 16, "pooling": PoolingType.NONE}, "MLET table 'x': pooling"),
])
def test_config_errors_name_the_table(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        MLETEmbeddingBagConfig(name="x", num_embeddings=10, embedding_dim=8, **kwargs)


def test_tt_config_takes_the_inner_width_and_tt_collection_refuses_it() -> None:
    cfg = TT[0]
    assert cfg.tt_row_dim == 32 and cfg.tt_shape().embedding_dim == 32
    with pytest.raises(ValueError, match="table 'c': mlet_inner_dim=4 is below"):
        dataclasses.replace(cfg, mlet_inner_dim=4, tt_q_shapes=None)
    with pytest.raises(TypeError, match="TT table 'c' has mlet_inner_dim=32"):
        TTEmbeddingBagCollection([cfg])
    with pytest.raises(TypeError, match="'p' .*is not an MLET table"):
        MLETEmbeddingBagCollection([EmbeddingBagConfig(name="p", num_embeddings=4,
                                                       embedding_dim=4)])


# ------------------------------------------------------------------------------ module


@pytest.mark.parametrize("weighted", [False, True])
def test_forward_is_the_projection_of_the_wide_tables(weighted: bool) -> None:
    torch.manual_seed(0)
    # TorchRec's unsharded EBC has no weighted MEAN bags: table b only unweighted.
    tables = PLAIN + TT if not weighted else [PLAIN[0], *TT]
    mlet = MLETEmbeddingBagCollection(tables, is_weighted=weighted)
    keys = [f for t in tables for f in t.feature_names]
    # Keys in another order, plus a key of no table (ignored, as by TorchRec's EBC).
    features = kjt(["other", *reversed(keys)], seed=1, weighted=weighted)
    out = mlet(features)
    assert out.keys() == keys
    assert out.length_per_key() == [t.embedding_dim for t in tables for _ in t.feature_names]
    wide = {**mlet.ebc(features).to_dict(), **mlet.tt(features).to_dict()}
    table_of = {f: t.name for t in tables for f in t.feature_names}
    for f in keys:
        want = wide[f] @ mlet.projections[table_of[f]].weight.T
        torch.testing.assert_close(out[f], want, rtol=1e-5, atol=1e-6, msg=f)
    out.values().sum().backward()  # gradients reach the wide tables and the projections
    assert mlet.projections["a"].weight.grad.abs().sum() > 0
    assert mlet.ebc.embedding_bags["a"].weight.grad is not None
    assert mlet.tt.embedding_bags["c"].core_0.grad.abs().sum() > 0


@pytest.mark.parametrize("weighted", [False, True])
def test_collapse_plain_is_exact(weighted: bool) -> None:
    torch.manual_seed(1)
    tables = PLAIN if not weighted else PLAIN[:1]  # no weighted MEAN in TorchRec's EBC
    mlet = MLETEmbeddingBagCollection(tables, is_weighted=weighted)
    ebc = mlet.collapse()
    assert type(ebc) is EmbeddingBagCollection and ebc.tt_conversion_errors == {}
    assert [c.embedding_dim for c in ebc.embedding_bag_configs()] == [4, 8][:len(tables)]
    assert ebc.embedding_bags["a"].weight.shape == (50, 4)
    keys = [f for t in tables for f in t.feature_names]
    features = kjt(list(reversed(keys)), seed=2, batch=5, weighted=weighted)
    assert_same_pooled(ebc(features), mlet(features), keys)


def test_collapse_tt_is_exact_when_the_product_has_the_ranks() -> None:
    torch.manual_seed(2)
    mlet = MLETEmbeddingBagCollection(TT)
    for name in ("c", "e"):
        kronecker_projection(mlet, name)
    tt = mlet.collapse()
    assert type(tt) is TTEmbeddingBagCollection
    assert {n: s.ranks for n, s in tt.tt_shapes().items()} == {"c": (3,), "e": (2, 3)}
    assert all(e < 1e-5 for e in tt.tt_conversion_errors.values()), tt.tt_conversion_errors
    features = kjt(["fe", "fc"], seed=3, batch=5)
    assert_same_pooled(tt(features), mlet(features), ["fc", "fe"], atol=1e-5)


def test_collapse_tt_reports_the_reconstruction_error() -> None:
    torch.manual_seed(3)
    mlet = MLETEmbeddingBagCollection(TT)  # random projection: not within the ranks
    with pytest.warns(UserWarning, match="MLET collapse: the TT-SVD"):
        tt = mlet.collapse(warn_above=0.01)
    for name in ("c", "e"):
        want = mlet.collapsed_weight(name).double()
        got = tt.full_weight(name).double()
        error = float((got - want).norm() / want.norm())
        assert tt.tt_conversion_errors[name] == pytest.approx(error, rel=1e-4)
        assert 0.01 < error < 1


def test_hybrid_routes_mlet_tables_and_collapses() -> None:
    torch.manual_seed(4)
    plain = EmbeddingBagConfig(name="p", num_embeddings=5, embedding_dim=4,
                               feature_names=["other"])
    tt_plain = TTEmbeddingBagConfig(name="t", num_embeddings=40, embedding_dim=8,
                                    feature_names=["ft"], tt_ranks=[2])
    configs = [PLAIN[0], plain, TT[0], tt_plain, PLAIN[1]]
    hybrid = HybridEmbeddingBagCollection(configs)
    assert hybrid.mlet is not None and [c.name for c in hybrid.mlet.embedding_bag_configs()] == [
        "a", "c", "b"]
    kronecker_projection(hybrid.mlet, "c")
    stats = hybrid.memory_stats()
    collapsed = hybrid.collapse()
    assert collapsed.mlet is None and collapsed.tt_conversion_errors["c"] < 1e-5
    assert stats["inference_bytes"] == collapsed.memory_stats()["bytes"] == inference_bytes(configs)
    assert stats["bytes"] > stats["inference_bytes"] and stats["mlet_tables"] == 3
    features = kjt(["ft", "fb", "fa", "other", "fa2", "fc"], seed=5)
    keys = ["fa", "fa2", "other", "fc", "ft", "fb"]
    assert_same_pooled(collapsed(features), hybrid(features), keys, atol=1e-5)
    # torchrec.fx (what TrainPipelineSparseDist uses) traces through the projection.
    traced = symbolic_trace(hybrid)
    assert_same_pooled(traced(features), hybrid(features), keys)


def test_hybrid_with_mlet_scripts_and_exports() -> None:
    # TorchRec's inference path with an MLET child: TorchScript (direct and after torchrec.fx,
    # saved and loaded) and torch.export give the eager outputs. Two (k, d) groups of projections
    # and plain + TT wide tables.
    import io

    from torchrec_tt.inference import kjt_dynamic_shapes

    torch.manual_seed(6)
    plain = EmbeddingBagConfig(name="p", num_embeddings=5, embedding_dim=4, feature_names=["other"])
    hybrid = HybridEmbeddingBagCollection([PLAIN[0], plain, TT[0], PLAIN[1], TT[1]])
    hybrid.eval()
    keys = ["fa", "fa2", "other", "fc", "fb", "fe"]
    features = kjt(["fe", "fb", "fa", "other", "fa2", "fc", "ft"], seed=7)  # "ft": ignored
    want = hybrid(features)
    mlet = hybrid.mlet
    assert mlet is not None
    assert_same_pooled(torch.jit.script(mlet)(features), mlet(features),
                       ["fa", "fa2", "fc", "fb", "fe"])
    for module in (hybrid, symbolic_trace(hybrid)):
        buf = io.BytesIO()
        torch.jit.save(torch.jit.script(module), buf)
        buf.seek(0)
        scripted = torch.jit.load(buf)
        assert_same_pooled(scripted(features), want, keys)
    program = torch.export.export(hybrid, (features,), strict=False,
                                  dynamic_shapes=(kjt_dynamic_shapes(features),))
    other = kjt(["fe", "fb", "fa", "other", "fa2", "fc", "ft"], seed=8, batch=5)
    assert_same_pooled(program.module()(other), hybrid(other), keys)
    # TorchRec's quantize_inference_model quantizes the wide tables (plain and TT) in place;
    # the quantized model scripts after torchrec.fx with its eager outputs.
    import torchrec.inference.modules as trec_inference
    from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEBC

    from torchrec_tt.inference import QuantTTEmbeddingBagCollection

    quantized = trec_inference.quantize_inference_model(copy.deepcopy(hybrid))
    assert isinstance(quantized.mlet.ebc, QuantEBC)
    assert isinstance(quantized.mlet.tt, QuantTTEmbeddingBagCollection)
    got = quantized(features)
    assert_same_pooled(got, want, keys, atol=0.05 * float(want.values().abs().max()))
    assert_same_pooled(torch.jit.script(symbolic_trace(quantized))(features), got, keys)


def test_config_swap_keeps_mlet() -> None:
    tables = [EmbeddingBagConfig(name=f"t{i}", num_embeddings=n, embedding_dim=8,
                                 feature_names=[f"f{i}"]) for i, n in enumerate([1000, 10, 500])]
    mlet = swap_to_mlet(tables, factor=4, names=["t0", "t1"])
    assert [type(c).__name__ for c in mlet] == [
        "MLETEmbeddingBagConfig", "MLETEmbeddingBagConfig", "EmbeddingBagConfig"]
    assert mlet[0].mlet_inner_dim == 32
    tt = swap_configs(mlet, TTPolicy(largest=1, ranks=4))
    assert isinstance(tt[0], TTEmbeddingBagConfig) and tt[0].mlet_inner_dim == 32
    assert tt[0].tt_shape().embedding_dim == 32
    assert collapsed_config(tt[0]).tt_shape().embedding_dim == 8
    assert swap_to_mlet(tt, inner_dim=16, names=["t2"])[2].mlet_inner_dim == 16
    with pytest.raises(ValueError, match="table 't0' is already an MLET table"):
        swap_to_mlet(mlet, factor=2)
    with pytest.raises(ValueError, match="exactly one of inner_dim= and factor="):
        swap_to_mlet(tables)
    with pytest.raises(ValueError, match=r"unknown tables \['nope'\]"):
        swap_to_mlet(tables, factor=2, names=["nope"])


def test_init_matches_the_plain_table_for_every_width() -> None:
    """The product starts with the plain table's entry std, whatever k; W W^T = I (scaled)."""
    n, d = 20_000, 8
    plain_std = math.sqrt(1 / n) / math.sqrt(3)
    for k in (8, 32, 64):
        torch.manual_seed(k)
        cfg = MLETEmbeddingBagConfig(name="t", num_embeddings=n, embedding_dim=d,
                                     mlet_inner_dim=k)
        mlet = MLETEmbeddingBagCollection([cfg])
        w = mlet.projections["t"].weight
        torch.testing.assert_close(w @ w.T, torch.eye(d), rtol=0, atol=1e-5)
        assert mlet.collapsed_weight("t").std().item() == pytest.approx(plain_std, rel=0.03)
        assert mlet_rowwise_lr_scale(cfg) == pytest.approx(math.sqrt(d / k))
        # Full effective rank at init (a random n x d table).
        assert effective_rank(mlet.collapsed_weight("t")) > 0.95 * d
    scaled = MLETEmbeddingBagCollection([dataclasses.replace(cfg, mlet_init_scale=0.1)])
    assert scaled.collapsed_weight("t").std().item() == pytest.approx(0.1 * plain_std, rel=0.03)
    assert effective_rank(torch.ones(10, 4)) == pytest.approx(1.0)
    meta = MLETEmbeddingBagCollection([cfg], device="meta")  # builds without memory
    assert meta.projections["t"].weight.is_meta and meta.ebc.embedding_bags["t"].weight.is_meta


# ------------------------------------------------------------------------------ sharded


class Model(nn.Module):
    """An MLET collection (plain and TT wide tables) and a head over the pooled features."""

    def __init__(self) -> None:
        super().__init__()
        self.mlet = MLETEmbeddingBagCollection(PLAIN + TT)
        self.head = nn.Linear(4 + 4 + 8 + 8 + 8, 1)

    def forward(self, features: KeyedJaggedTensor) -> Tensor:
        pooled = self.mlet(features)
        return self.head(pooled.values()).square().mean()


def _gen(spec: tuple[Any, ...], plain: bool) -> Any:
    kernel = {"compute_kernel": "dense"} if plain else {}
    if spec[0] == "dp":
        return data_parallel()
    if spec[0] == "tw":
        return table_wise(rank=spec[1], **kernel)
    return column_wise(ranks=list(spec[1]), **kernel)


def _shard(model: Model, specs: dict[str, tuple[Any, ...]], world: int
           ) -> DistributedModelParallel:
    plan = ShardingPlan({
        "mlet.ebc": construct_module_sharding_plan(
            model.mlet.ebc, {t.name: _gen(specs[t.name], True) for t in PLAIN},
            sharder=EmbeddingBagCollectionSharder(), local_size=world, world_size=world,
            device_type="cpu"),
        "mlet.tt": construct_module_sharding_plan(
            model.mlet.tt, {t.name: _gen(specs[t.name], False) for t in TT},
            sharder=TTEmbeddingBagCollectionSharder(), local_size=world, world_size=world,
            device_type="cpu"),
    })
    return DistributedModelParallel(
        model, env=ShardingEnv.from_process_group(dist.group.WORLD), device=torch.device("cpu"),
        plan=plan, sharders=[TTEmbeddingBagCollectionSharder(), EmbeddingBagCollectionSharder()])


KEYS = ["fe", "fb", "fa2", "fc", "fa"]
PLANS = {
    "data_parallel": {"a": ("dp",), "b": ("dp",), "c": ("dp",), "e": ("dp",)},
    "table_wise": {"a": ("tw", 1), "b": ("tw", 0), "c": ("tw", 0), "e": ("tw", 1)},
    # a: 16 columns in 2 shards; c: the first column factor (4) split over the ranks.
    "column_wise": {"a": ("cw", [0, 1]), "b": ("tw", 1), "c": ("cw", [1, 0]), "e": ("dp",)},
}


def check_sharded(rank: int, world: int, ckpt_root: str) -> dict[str, int]:
    checked: dict[str, int] = {}
    for name, specs in PLANS.items():
        torch.manual_seed(0)
        model = Model()
        reference = copy.deepcopy(model)
        dmp = _shard(model, specs, world)
        dmp.load_state_dict(reference.state_dict())
        opt = torch.optim.SGD(dmp.parameters(), lr=0.3)
        ref_opt = torch.optim.SGD(reference.parameters(), lr=0.3)
        for step in range(2):
            batches = [kjt(KEYS, seed=100 * step + r) for r in range(world)]
            with torch.no_grad():
                got = dmp.module.mlet(batches[rank])
                got = got.wait() if hasattr(got, "wait") else got
                assert_same_pooled(got, reference.mlet(batches[rank]), sorted(KEYS))
            loss = dmp(batches[rank])
            loss.backward()
            opt.step()
            opt.zero_grad()
            cases.reference_step(reference, ref_opt, [(b,) for b in batches])
        n = cases.assert_state_matches(dmp.state_dict(), reference.state_dict())
        checked[name] = n
        if name != "column_wise":
            continue
        # DCP: save the sharded MLET model; load it into another plan (round trip); write the
        # collapsed checkpoint and load it into a sharded collapsed model.
        src, dst = os.path.join(ckpt_root, "mlet"), os.path.join(ckpt_root, "collapsed")
        dcp.save({"model": dmp.state_dict()}, checkpoint_id=src)
        torch.manual_seed(5)
        other = _shard(Model(), PLANS["table_wise"], world)
        state = {"model": other.state_dict()}
        dcp.load(state, checkpoint_id=src)
        other.load_state_dict(state["model"])
        probe = kjt(KEYS, seed=999 + rank)
        with torch.no_grad():
            want = reference.mlet(probe)
            got = other.module.mlet(probe)
            assert_same_pooled(got.wait() if hasattr(got, "wait") else got, want, sorted(KEYS))
        errors = collapse_checkpoint(src, dst, reference.mlet, prefix="model.mlet.")
        collapsed_ref = reference.mlet.collapse(warn_above=1.0)
        assert errors == pytest.approx(collapsed_ref.tt_conversion_errors, rel=1e-4)
        target = copy.deepcopy(collapsed_ref)  # the collapsed model's layout, re-sharded
        plan = ShardingPlan({
            "ebc": construct_module_sharding_plan(
                target.ebc, {"a": table_wise(rank=1, compute_kernel="dense"),
                             "b": column_wise(ranks=[0, 1], compute_kernel="dense")},
                sharder=EmbeddingBagCollectionSharder(), local_size=world, world_size=world,
                device_type="cpu"),
            "tt": construct_module_sharding_plan(
                target.tt, {"c": data_parallel(), "e": table_wise(rank=0)},
                sharder=TTEmbeddingBagCollectionSharder(), local_size=world, world_size=world,
                device_type="cpu"),
        })
        served = DistributedModelParallel(
            target, env=ShardingEnv.from_process_group(dist.group.WORLD),
            device=torch.device("cpu"), plan=plan,
            sharders=[TTEmbeddingBagCollectionSharder(), EmbeddingBagCollectionSharder()])
        state = {"model.mlet." + k: v for k, v in served.state_dict().items()}
        dcp.load(state, checkpoint_id=dst)
        served.load_state_dict({k[len("model.mlet."):]: v for k, v in state.items()})
        with torch.no_grad():
            got = served(probe)
            got = got.wait() if hasattr(got, "wait") else got
            want = collapsed_ref(probe)
            assert_same_pooled(got, want, sorted(KEYS), atol=1e-5)
            # The plain tables' collapse is exact: the served model equals the MLET model there.
            for f in ("fa", "fa2", "fb"):
                torch.testing.assert_close(got[f], reference.mlet(probe)[f], rtol=1e-5,
                                           atol=1e-6)
    return checked


@pytest.mark.multiprocess
def test_sharded_equals_unsharded_and_checkpoints_collapse(tmp_path: Path) -> None:
    results = run_multiprocess(check_sharded, 2, args=(str(tmp_path),))
    for r in results:
        assert set(r) == set(PLANS) and all(n > 0 for n in r.values())


# ------------------------------------------------------------------------------ trainer


def test_trainer_flag_trains_collapses_and_evaluates(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    cmd = [sys.executable, str(ROOT / "examples" / "dlrm" / "train.py"), "--nproc", "1",
           "--out", str(tmp_path), "--scale", "0.001", "--batch-size", "128",
           "--eval-samples", "1024", "--eval-batch-size", "512", "--dense-arch", "16",
           "--over-arch", "16", "--tt-rank", "4", "--no-progress", "--threads", "1",
           "--mode", "compare", "--steps", "4", "--eval-every", "4",
           "--embedding_dim", "8", "--mlet_inner_dim", "32"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    by = {r["name"]: r for r in summary["results"]}
    for r in by.values():
        assert r["mlet_inner_dim"] == 32 and r["collapsed"]
        assert r["inference_bytes"] < r["embedding_bytes"]
    plain = by["uncompressed"]
    # Plain tables collapse exactly: the collapsed model scores what the MLET model did.
    assert plain["collapsed"]["auc"] == pytest.approx(plain["auc"], abs=1e-4)
    assert plain["collapsed"]["logloss"] == pytest.approx(plain["logloss"], abs=1e-4)
    assert plain["inference_bytes"] == plain["dense_bytes"]
    assert 0 < by["tt"]["collapsed"]["max_tt_svd_error"] < 1
    assert "auc_collapsed=" in proc.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("argv, message", [
    (["--mlet_inner_dim", "8"], "--mlet_inner_dim 8 must be >= --embedding_dim 16"),
    (["--mlet_inner_dim", "-1"], "--mlet_inner_dim must be >= 0 (0: off), got -1"),
    (["--mlet_init_scale", "0"], "--mlet_init_scale must be a finite number > 0, got 0.0"),
])
def test_trainer_flag_is_checked(argv: list[str], message: str,
                                 capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    sys.path.insert(0, str(ROOT / "examples" / "dlrm"))
    try:
        import train  # type: ignore[import-not-found]
    finally:
        sys.path.pop(0)
    with pytest.raises(SystemExit):
        train.parse_args(argv)
    assert message in capsys.readouterr().err
