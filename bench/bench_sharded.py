"""Two-GPU NCCL comparison of issue 4: DLRM on the 26 Criteo Kaggle tables (D=64), uncompressed
EmbeddingBagCollection with TorchRec's own plan vs the 7 largest tables in TT (R=32) with
``torchrec_tt.sharding.plan``; plus the TT module's sharded-vs-unsharded correctness checks over
the same process group.

    torchrun --standalone --nproc_per_node 2 bench/bench_sharded.py [args]   # GPU machine
    python bench/bench_sharded.py [args]          # spawns --nproc ranks itself (default 2)
    python bench/bench_sharded.py --cpu-smoke     # gloo, world size 2, tiny tables, few steps

Configurations (all ``torchrec.models.dlrm.DLRMTrain``, dense arch 13 -> 512 -> 256 -> D, over
arch 512 -> 512 -> 256 -> 1, BCE loss, SGD everywhere):

* ``uncompressed``: one ``EmbeddingBagCollection`` of the 26 tables, planned by TorchRec's
  ``EmbeddingShardingPlanner`` (``collective_plan``), tables trained by TorchRec's fused SGD
  (``EmbOptimType.EXACT_SGD``) as its sharder does by default with ``fused_params``.
* ``tt``: the 7 largest tables as ``TTEmbeddingBagConfig`` (ranks [R, R]) in a
  ``TTEmbeddingBagCollection`` beside a plain EBC for the other 19
  (``torchrec_tt.swap.HybridEmbeddingBagCollection``, which DLRM takes as its sparse arch),
  planned by ``torchrec_tt.sharding.plan`` (``optimizer_multiplier=0``: SGD keeps no state; TT
  FLOP rate measured on the GPU with ``measure_tt_flops``); plain tables as above, TT cores
  trained by the dense ``torch.optim.SGD`` (the sharded TT module has no fused optimizer yet).
* ``tt_dp`` (not run by default): ``tt`` with the TT tables constrained to data_parallel (the
  mechanism issue 4 is after: replicated TT tables send no all-to-all). ``plan`` weighs the
  all-reduce of the cores at TorchRec's all-reduce bandwidth (12.5 GB/s per GPU, a NIC model,
  even within one host), so left free it may well keep TT tables table_wise.
* ``tt_no_rw`` (not run by default): ``tt`` with the plain tables kept off row_wise sharding.

Per configuration and rank: all-to-all / all-reduce bytes per step computed from the plan
(``plan_comms_bytes``) and measured by ``CommsMeter`` (attached after the timed steps, so the
timing runs DDP's built-in all-reduce, not the Python reference hook the meter installs). TorchRec's
planner puts some plain tables row_wise, which ``plan_comms_bytes`` does not cover and whose pooled
output moves by reduce-scatter / all-gather, which ``CommsMeter`` does not wrap: this script
accounts for row_wise tables itself (``computed_comms``) and hooks those collectives
(``GatherScatterMeter``), reported as "RS/AG". Also: the median step time over
``--steps`` steps after ``--warmup`` (CUDA events around forward + backward + optimizer step,
rotating ``--num-batches`` pre-generated batches), peak memory (``max_memory_allocated`` since
the configuration started, model construction included) and the embedding parameter bytes this
rank holds (from the sharded modules' state dicts: local shards and replicas). Synthetic batches:
``--pooling`` ids per feature per sample (fixed, so the computed bytes are exact), ids drawn from
a Zipf-like law (exponent ``--zipf``) with the hot ids spread over the table by a hash.
Rank 0 prints a markdown table last.
"""

from __future__ import annotations

import os

# NVLink SHARP / multicast must stay off on the lent multi-GPU machines (env.sh sets these too;
# spawned ranks inherit them). Set before torch initialises NCCL.
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")

import argparse  # noqa: E402
import copy  # noqa: E402
import gc  # noqa: E402
import inspect  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from datetime import timedelta  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch import Tensor, nn  # noqa: E402

# Criteo Kaggle (Display Advertising Challenge) categorical cardinalities, C1..C26 in order: the
# published counts (facebookresearch/dlrm, Kaggle preprocessing without frequency threshold).
# torchrec.datasets.criteo ships the feature names (DEFAULT_CAT_NAMES) but not these counts.
KAGGLE_CARDINALITIES: tuple[int, ...] = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
)
NUM_DENSE = 13
#: Configurations with the TT tables (see the module docstring).
TT_CONFIGS = ("tt", "tt_dp", "tt_no_rw")
GIB = 1 << 30
MIB = 1 << 20


class _DropNoise(logging.Filter):
    """Drops TorchRec log lines repeated once per table (data-parallel tables have no sharding
    spec and ignore caching params); everything else passes."""

    PATTERNS = ("Sharding spec not found for", "caching params will be ignored")

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(p in msg for p in self.PATTERNS)


def quiet_known_noise() -> None:
    for handler in logging.getLogger().handlers or []:
        handler.addFilter(_DropNoise())
    for name in ("", "torchrec.distributed.utils", "torchrec.distributed.embedding_sharding"):
        logging.getLogger(name).addFilter(_DropNoise())
    for msg in (r".*`broadcast_buffers` is deprecated", r".*_get_pg_default_device",
                r".*Multiple backends are registered with this ProcessGroup"):
        warnings.filterwarnings("ignore", message=msg)


def log(rank: int, *msg: Any) -> None:
    if rank == 0:
        print(f"[{time.strftime('%H:%M:%S')}]", *msg, flush=True)


# --- arguments ------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true",
                   help="gloo on CPU, world size 2, tiny tables and batches, few steps")
    p.add_argument("--nproc", type=int, default=2, help="ranks when self-spawning (not torchrun)")
    p.add_argument("--batch-size", type=int, default=8192, help="per rank")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--tt-rank", type=int, default=32)
    p.add_argument("--num-tt", type=int, default=7, help="largest tables stored as TT")
    p.add_argument("--pooling", type=int, default=1, help="ids per feature per sample")
    p.add_argument("--zipf", type=float, default=1.05, help="Zipf exponent of the id law")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--measure-steps", type=int, default=2, help="steps under CommsMeter")
    p.add_argument("--num-batches", type=int, default=8, help="pre-generated batches rotated")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--dense-arch", default="512,256", help="hidden sizes; D is appended")
    p.add_argument("--over-arch", default="512,512,256,1")
    p.add_argument("--configs", default="uncompressed,tt",
                   help="comma list of uncompressed, tt, tt_dp (TT tables data_parallel), "
                        "tt_no_rw (plain tables kept off row_wise)")
    p.add_argument("--plain-types", default="",
                   help="comma list: sharding types allowed for the plain tables of every config "
                        "(planner constraint; default: the planner's choice)")
    p.add_argument("--device-flops", type=float, default=0.0,
                   help="TT FLOP/s for the TT planner; 0: measure on cuda, default on cpu")
    p.add_argument("--hbm-gb", type=float, default=0.0,
                   help="HBM per device for both planners; 0: the device's total memory")
    p.add_argument("--skip-check", action="store_true", help="skip the correctness checks")
    p.add_argument("--check-only", action="store_true", help="only the correctness checks")
    p.add_argument("--timeout", type=float, default=300.0, help="collective timeout (s)")
    p.add_argument("--cardinality-divisor", type=int, default=1,
                   help="divide the Kaggle cardinalities (min 3 rows); for quick trials")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.nproc = 2
        args.batch_size = min(args.batch_size, 64)
        args.dim = 16
        args.tt_rank = 4
        args.warmup, args.steps, args.num_batches = 1, 3, 2
        args.dense_arch, args.over_arch = "32", "32,1"
        args.cardinality_divisor = max(args.cardinality_divisor, 10_000)
    return args


def cardinalities(args: argparse.Namespace) -> list[int]:
    return [max(3, n // args.cardinality_divisor) for n in KAGGLE_CARDINALITIES]


def cat_names() -> list[str]:
    try:
        from torchrec.datasets.criteo import DEFAULT_CAT_NAMES

        names = list(DEFAULT_CAT_NAMES)
        if len(names) == len(KAGGLE_CARDINALITIES):
            return names
    except ImportError:
        pass
    return [f"cat_{i}" for i in range(len(KAGGLE_CARDINALITIES))]


# --- models ---------------------------------------------------------------------------------


def table_specs(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    """(table name, feature name, rows) of the 26 tables."""
    return [(f"t_{f}", f, n) for f, n in zip(cat_names(), cardinalities(args))]


def build_model(config: str, args: argparse.Namespace,
                device: torch.device) -> tuple[nn.Module, list[str], list[str]]:
    """DLRMTrain with meta-device embeddings; returns it, the KJT key order to feed it and the
    names of its TT tables. The TT configurations use ``torchrec_tt.swap``: ``swap_configs`` with
    ``TTPolicy(largest=--num-tt, ranks=--tt-rank)`` (3 cores) and ``HybridEmbeddingBagCollection``
    (a TTEmbeddingBagCollection ``tt`` beside a plain EmbeddingBagCollection ``ebc``)."""
    from torchrec import EmbeddingBagCollection
    from torchrec.models.dlrm import DLRM, DLRMTrain
    from torchrec.modules.embedding_configs import EmbeddingBagConfig

    from torchrec_tt.swap import HybridEmbeddingBagCollection, TTPolicy, swap_configs

    meta = torch.device("meta")
    tables = [
        EmbeddingBagConfig(name=t, embedding_dim=args.dim, num_embeddings=n, feature_names=[f])
        for t, f, n in table_specs(args)
    ]
    tt_names: list[str] = []
    if config == "uncompressed":
        collection: nn.Module = EmbeddingBagCollection(tables=tables, device=meta)
    elif config in TT_CONFIGS:
        hybrid = HybridEmbeddingBagCollection(
            swap_configs(tables, TTPolicy(largest=args.num_tt, ranks=args.tt_rank, num_cores=3)),
            device=meta)
        tt_names = hybrid.tt_table_names()
        collection = hybrid
    else:
        raise ValueError(f"unknown configuration {config!r}")
    order = [f for c in collection.embedding_bag_configs() for f in c.feature_names]
    dense = [int(x) for x in args.dense_arch.split(",") if x] + [args.dim]
    over = [int(x) for x in args.over_arch.split(",") if x]
    dlrm = DLRM(
        embedding_bag_collection=collection,  # type: ignore[arg-type]
        dense_in_features=NUM_DENSE,
        dense_arch_layer_sizes=dense,
        over_arch_layer_sizes=over,
        dense_device=device,
    )
    return DLRMTrain(dlrm), order, tt_names


# --- synthetic data -------------------------------------------------------------------------


def zipf_ids(rows: int, count: int, s: float, gen: torch.Generator, device: torch.device) -> Tensor:
    """``count`` ids in ``[0, rows)``: popularity rank from a continuous power law of exponent
    ``s`` on ``[1, rows + 1)`` (inverse CDF), hashed so the hot ids are spread over the table."""
    u = torch.rand(count, generator=gen, device=device, dtype=torch.float64)
    if abs(s - 1.0) < 1e-9:
        x = torch.exp(u * math.log(rows + 1))
    else:
        a = 1.0 - s
        x = (((rows + 1) ** a - 1.0) * u + 1.0) ** (1.0 / a)
    r = (x.floor().long() - 1).clamp_(0, rows - 1)
    return (r * 2_654_435_761) % rows


def make_batches(args: argparse.Namespace, keys: Sequence[str], rank: int,
                 device: torch.device) -> list[Any]:
    from torchrec.datasets.utils import Batch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    rows = {f: n for _, f, n in table_specs(args)}
    gen = torch.Generator(device=device).manual_seed(1234 + 7919 * rank)
    b, pool = args.batch_size, args.pooling
    out = []
    for _ in range(args.num_batches):
        values = torch.cat([zipf_ids(rows[k], b * pool, args.zipf, gen, device) for k in keys])
        lengths = torch.full((len(keys) * b,), pool, dtype=torch.int32, device=device)
        kjt = KeyedJaggedTensor.from_lengths_sync(list(keys), values, lengths)
        dense = torch.rand(b, NUM_DENSE, generator=gen, device=device)
        labels = torch.randint(0, 2, (b,), generator=gen, device=device)
        out.append(Batch(dense_features=dense, sparse_features=kjt, labels=labels))
    return out


# --- measurement helpers --------------------------------------------------------------------


class GatherScatterMeter:
    """Bytes this rank sends by reduce-scatter / all-gather (and list all-to-all), which
    ``CommsMeter`` does not wrap; TorchRec's row_wise pooled output uses them. Same convention as
    ``CommsMeter`` for all-to-all: what the rank sends to the *other* ranks, logically (a
    reduce-scatter sends every other rank its chunk, an all-gather sends its input to every other
    rank), not what a ring algorithm moves."""

    NAMES = ("reduce_scatter_tensor", "all_gather_into_tensor", "reduce_scatter", "all_gather",
             "all_to_all", "_reduce_scatter_base", "_all_gather_base")

    def __init__(self) -> None:
        self.bytes: dict[str, int] = {}
        self._saved: dict[str, Any] = {}

    @staticmethod
    def _nbytes(t: Any) -> int:
        return t.numel() * t.element_size() if isinstance(t, Tensor) else 0

    def _sent(self, name: str, bound: dict[str, Any]) -> int:
        group = bound.get("group")
        world, me = dist.get_world_size(group), dist.get_rank(group)
        if name in ("reduce_scatter_tensor", "_reduce_scatter_base"):
            return self._nbytes(bound.get("input")) * (world - 1) // world
        if name in ("all_gather_into_tensor", "_all_gather_base"):
            return self._nbytes(bound.get("input_tensor")) * (world - 1)
        if name == "all_gather":
            return self._nbytes(bound.get("tensor")) * (world - 1)
        if name == "reduce_scatter":
            chunks = list(bound.get("input_list") or [])
            return sum(self._nbytes(t) for j, t in enumerate(chunks) if j != me)
        if name == "all_to_all":
            chunks = list(bound.get("input_tensor_list") or [])
            return sum(self._nbytes(t) for j, t in enumerate(chunks) if j != me)
        return 0

    def __enter__(self) -> GatherScatterMeter:
        for name in self.NAMES:
            fn = getattr(dist, name, None)
            if fn is None:
                continue
            self._saved[name] = fn
            sig = inspect.signature(fn)

            def wrapped(*a: Any, _fn: Callable[..., Any] = fn, _name: str = name,
                        _sig: inspect.Signature = sig, **kw: Any) -> Any:
                try:
                    bound = _sig.bind(*a, **kw).arguments
                    self.bytes[_name] = self.bytes.get(_name, 0) + self._sent(_name, bound)
                except TypeError:
                    self.bytes[_name + " (unparsed call)"] = 0
                return _fn(*a, **kw)

            setattr(dist, name, wrapped)
        return self

    def __exit__(self, *exc: Any) -> None:
        for name, fn in self._saved.items():
            setattr(dist, name, fn)
        self._saved = {}

    @property
    def total(self) -> int:
        return sum(self.bytes.values())


def computed_comms(model: nn.Module, sharding_plan: Any, args: argparse.Namespace,
                   keys: Sequence[str], world: int, rank: int,
                   batches: Sequence[Any]) -> dict[str, Any]:
    """Per-step bytes of this rank computed from the plan (before sharding ``model``).

    ``plan_comms_bytes`` covers data_parallel / table_wise / column_wise; TorchRec's planner also
    picks row_wise for plain tables, which it does not cover. Row-wise tables are therefore taken
    out of their collection (a meta EBC of the other tables stands in while ``plan_comms_bytes``
    runs) and counted here: their KJT all-to-all (splits, B x F lengths to every other rank, and
    the ids that fall in other ranks' row blocks, counted on ``batches``: data dependent) and their
    pooled output, a reduce-scatter forward and an all-gather backward of ``[B, sum of dims]``."""
    from torchrec import EmbeddingBagCollection
    from torchrec.distributed.types import EmbeddingModuleShardingPlan, ShardingPlan, ShardingType

    from torchrec_tt.sharding import plan_comms_bytes

    rw = ShardingType.ROW_WISE.value
    filtered: dict[str, Any] = {}
    swaps: list[tuple[nn.Module, str, nn.Module, nn.Module]] = []
    rw_a2a = 0.0
    rw_pooled = 0
    b = args.batch_size
    for path, module_plan in sharding_plan.plan.items():
        rw_tables = [t for t, ps in module_plan.items() if ps.sharding_type == rw]
        if not rw_tables:
            filtered[path] = module_plan
            continue
        module = model.get_submodule(path)
        if not isinstance(module, EmbeddingBagCollection) or module.is_weighted():
            raise ValueError(f"row_wise accounting covers unweighted plain EBCs only ({path})")
        configs = {c.name: c for c in module.embedding_bag_configs()}
        keep = [c for c in module.embedding_bag_configs() if c.name not in rw_tables]
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        stand_in: nn.Module = (EmbeddingBagCollection(keep, device=torch.device("meta"))
                               if keep else nn.Module())
        swaps.append((parent, child, module, stand_in))
        if keep:
            filtered[path] = EmbeddingModuleShardingPlan(
                {t: ps for t, ps in module_plan.items() if t not in rw_tables})
        num_features = 0
        ids_to = [0.0] * world
        for t in rw_tables:
            cfg, ps = configs[t], module_plan[t]
            num_features += len(cfg.feature_names)
            rw_pooled += 2 * (world - 1) * b * cfg.embedding_dim * len(cfg.feature_names) * 4
            for shard, dst in zip(ps.sharding_spec.shards, ps.ranks):
                lo, hi = shard.shard_offsets[0], shard.shard_offsets[0] + shard.shard_sizes[0]
                for f in cfg.feature_names:
                    for batch in batches:
                        ids = batch.sparse_features[f].values()
                        ids_to[dst] += int(((ids >= lo) & (ids < hi)).sum()) / len(batches)
        for dst in range(world):
            if dst != rank:  # splits (lengths, values + stride), lengths (int32), ids (int64)
                rw_a2a += 3 * 8 + b * num_features * 4 + ids_to[dst] * 8
    for parent, child, _, stand_in in swaps:
        setattr(parent, child, stand_in)
    try:
        base = plan_comms_bytes(
            model, ShardingPlan(filtered), b, {k: float(args.pooling) for k in keys}, world,
            index_element_size=8, length_element_size=4)  # int64 ids, int32 lengths (make_batches)
    finally:
        for parent, child, module, _ in swaps:
            setattr(parent, child, module)
    return {
        "a2a_plan": base.all_to_all[rank] + rw_a2a,
        "ar_plan": base.all_reduce[rank],
        "rsag_plan": rw_pooled,
        "rw_note": bool(swaps),
    }


def local_bytes(value: Any) -> int:
    """Bytes of a state-dict value held by this rank (local shards of sharded tensors)."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    if isinstance(value, ShardedTensor):
        return sum(s.tensor.numel() * s.tensor.element_size() for s in value.local_shards())
    try:
        from torch.distributed.tensor import DTensor

        if isinstance(value, DTensor):
            t = value.to_local()
            return t.numel() * t.element_size()
    except ImportError:
        pass
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    return 0


def embedding_bytes_on_rank(dmp: nn.Module, paths: Sequence[str]) -> int:
    root = dmp.module  # type: ignore[attr-defined]
    total = 0
    for path in paths:
        for key, value in root.get_submodule(path).state_dict().items():
            if "embedding_bags" in key:
                total += local_bytes(value)
    return total


def logical_embedding_bytes(model: nn.Module) -> int:
    """Unsharded embedding parameter bytes of the model (TT: cores; plain: N x D x 4)."""
    from torchrec import EmbeddingBagCollection

    from torchrec_tt import TTEmbeddingBagCollection

    total = 0
    for m in model.modules():
        if isinstance(m, TTEmbeddingBagCollection):
            total += sum(s.num_bytes(4) for s in m.tt_shapes().values())
        elif isinstance(m, EmbeddingBagCollection):
            total += sum(c.num_embeddings * c.embedding_dim * 4 for c in m.embedding_bag_configs())
    return total


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plan_summary(plan: Any) -> list[str]:
    lines = []
    for path, module_plan in plan.plan.items():
        by: dict[tuple[str, str, tuple[int, ...]], list[str]] = {}
        for table, ps in module_plan.items():
            by.setdefault((ps.sharding_type, ps.compute_kernel, tuple(ps.ranks or ())), []).append(table)
        for (st, kernel, ranks), tables in sorted(by.items()):
            lines.append(f"  {path}: {st}/{kernel} ranks {list(ranks)}: {', '.join(sorted(tables))}")
    return lines


# --- correctness checks (the CPU tests, over this process group) -----------------------------


def _check_tables() -> list[Any]:
    from torchrec.modules.embedding_configs import PoolingType

    from torchrec_tt import TTEmbeddingBagConfig

    return [  # as tests/distributed/tt_dist_cases.py, plus a larger 3-core table
        TTEmbeddingBagConfig(name="t0", num_embeddings=97, embedding_dim=16, feature_names=["f0"],
                             tt_ranks=[3, 2]),
        TTEmbeddingBagConfig(name="t1", num_embeddings=40, embedding_dim=8,
                             feature_names=["f1", "f1b"], tt_ranks=[2], pooling=PoolingType.MEAN),
        TTEmbeddingBagConfig(name="t2", num_embeddings=70, embedding_dim=32, feature_names=["f2"],
                             tt_ranks=[2, 3], tt_q_shapes=[4, 2, 4], pooling=PoolingType.MEAN),
        TTEmbeddingBagConfig(name="t3", num_embeddings=20_000, embedding_dim=64,
                             feature_names=["f3"], tt_ranks=[16, 16]),
    ]


CHECK_BATCH = 16
CHECK_LENGTHS = {"f0": 2, "f1": 3, "f1b": 1, "f2": 2, "f3": 4}


class CheckModel(nn.Module):
    """A TT collection and a linear head (the CPU tests' model without the plain EBC)."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        super().__init__()
        from torchrec_tt import TTEmbeddingBagCollection

        tables = _check_tables()
        self.tt = TTEmbeddingBagCollection(tables, device=device)
        self.features = [f for t in tables for f in t.feature_names]
        dims = sum(t.embedding_dim * len(t.feature_names) for t in tables)
        self.head = nn.Linear(dims, 1, device=device)

    def forward(self, kjt: Any) -> Tensor:
        pooled = self.tt(kjt).to_dict()
        return self.head(torch.cat([pooled[f] for f in self.features], dim=1)).square().mean()


def _check_kjt(rank: int, step: int, device: torch.device, fixed: bool) -> Any:
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    rows = {f: t.num_embeddings for t in _check_tables() for f in t.feature_names}
    keys = list(reversed(rows))  # not the module's order, as a user's KJT may be
    gen = torch.Generator().manual_seed(1000 * step + 17 * rank)
    if fixed:
        lengths = torch.tensor([CHECK_LENGTHS[k] for k in keys for _ in range(CHECK_BATCH)])
    else:
        lengths = torch.randint(0, 5, (len(keys) * CHECK_BATCH,), generator=gen)
    values = torch.cat([
        torch.randint(0, rows[k], (int(lengths[i * CHECK_BATCH:(i + 1) * CHECK_BATCH].sum()),),
                      generator=gen)
        for i, k in enumerate(keys)
    ])
    return KeyedJaggedTensor.from_lengths_sync(keys, values.to(device), lengths.to(device))


def _rel_err(got: Tensor, want: Tensor) -> float:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if not torch.isfinite(got).all():
        return float("inf")
    return float((got - want).norm() / want.norm().clamp(min=1e-30))


def _state_err(state: dict[str, Any], reference: dict[str, Tensor]) -> float:
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    if set(state) != set(reference):
        raise AssertionError(f"state keys differ: {sorted(set(state) ^ set(reference))}")
    worst = 0.0
    for key, value in state.items():
        ref = reference[key]
        if isinstance(value, ShardedTensor):
            for shard in value.local_shards():
                (r0, c0), (h, w) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                worst = max(worst, _rel_err(shard.tensor, ref[r0:r0 + h, c0:c0 + w]))
        else:
            worst = max(worst, _rel_err(value, ref))
    return worst


def run_checks(rank: int, world: int, device: torch.device) -> list[tuple[str, bool, str]]:
    """Forward, one SGD step and comms bytes of the sharded TT module vs the unsharded one on
    the same device, for a data_parallel and a table_wise plan."""
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.sharding_plan import (
        construct_module_sharding_plan,
        data_parallel,
        table_wise,
    )
    from torchrec.distributed.types import ShardingEnv, ShardingPlan

    from torchrec_tt.sharding import CommsMeter, TTEmbeddingBagCollectionSharder, plan_comms_bytes

    # 3-core float32 tables run on TF32 tensor cores on CUDA: compare by relative norm error.
    tol = 3e-3 if device.type == "cuda" else 1e-5
    lr = 0.5
    results: list[tuple[str, bool, str]] = []
    names = [t.name for t in _check_tables()]
    plans = {
        "data_parallel": {n: data_parallel() for n in names},
        "table_wise": {n: table_wise(rank=i % world) for i, n in enumerate(names)},
    }
    for plan_name, generators in plans.items():
        torch.manual_seed(0)
        model = CheckModel("cpu")  # identical on every rank (same seed, CPU RNG)
        reference = copy.deepcopy(model).to(device)
        plan = ShardingPlan({"tt": construct_module_sharding_plan(
            model.tt, generators, sharder=TTEmbeddingBagCollectionSharder(),
            local_size=world, world_size=world, device_type=device.type)})
        expected = plan_comms_bytes(model, plan, CHECK_BATCH, CHECK_LENGTHS, world)
        dmp = DistributedModelParallel(
            model, env=ShardingEnv.from_process_group(dist.group.WORLD), device=device,
            plan=plan, sharders=[TTEmbeddingBagCollectionSharder()])
        dmp.load_state_dict(reference.state_dict())
        meter = CommsMeter()
        meter.attach(dmp)
        opt = torch.optim.SGD(dmp.parameters(), lr=lr)
        ref_opt = torch.optim.SGD(reference.parameters(), lr=lr)
        fwd_err = step_err = 0.0
        bytes_ok = True
        bytes_msg = ""
        try:
            for step in range(2):
                fixed = step == 1
                batches = [_check_kjt(r, step, device, fixed) for r in range(world)]
                mine = batches[rank]
                with torch.no_grad():
                    got = dmp.module.tt(mine).wait().to_dict()
                    want = reference.tt(mine).to_dict()
                    fwd_err = max(fwd_err, max(_rel_err(got[f], want[f]) for f in want))
                meter.reset()
                with meter:
                    loss = dmp(mine)
                    loss.backward()
                opt.step()
                opt.zero_grad()
                ref_loss = sum(reference(b) for b in batches) / world
                ref_loss.backward()
                ref_opt.step()
                ref_opt.zero_grad()
                step_err = max(step_err, _state_err(dmp.state_dict(), reference.state_dict()))
                if fixed:
                    a2a, ar = meter.all_to_all_bytes, meter.all_reduce_bytes
                    ea, er = expected.all_to_all[rank], expected.all_reduce[rank]
                    bytes_ok = a2a == ea and ar == er
                    bytes_msg = f"a2a {a2a} (plan {ea}), all-reduce {ar} (plan {er})"
                    if plan_name == "data_parallel" and a2a != 0:
                        bytes_ok = False
                        bytes_msg += "; data_parallel must send no all-to-all bytes"
        except Exception as e:  # noqa: BLE001 (reported as FAIL, then re-raised below)
            results.append((f"{plan_name}: exception", False, f"{type(e).__name__}: {e}"))
            traceback.print_exc()
            raise
        finally:
            del dmp, opt
            gc.collect()
        results.append((f"{plan_name}: sharded forward == unsharded", fwd_err < tol,
                        f"max rel err {fwd_err:.2e} (tol {tol:.0e})"))
        results.append((f"{plan_name}: 2 SGD steps == rank-averaged unsharded", step_err < tol,
                        f"max rel err of the state {step_err:.2e} (tol {tol:.0e})"))
        results.append((f"{plan_name}: measured bytes == plan_comms_bytes", bytes_ok, bytes_msg))
    return results


# --- the benchmark --------------------------------------------------------------------------


def run_config(config: str, args: argparse.Namespace, rank: int, world: int,
               device: torch.device, device_flops: float) -> dict[str, Any]:
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.distributed.planner.types import ParameterConstraints
    from torchrec.distributed.types import ShardingEnv

    from torchrec_tt.sharding import CommsMeter, TTEmbeddingBagCollectionSharder, plan

    out: dict[str, Any] = {"config": config}
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        out["mem_at_start"] = torch.cuda.memory_allocated(device)
    torch.manual_seed(0)
    model, keys, tt_names = build_model(config, args, device)
    out["logical_emb_bytes"] = logical_embedding_bytes(model)
    ebc_sharder = EmbeddingBagCollectionSharder(
        fused_params={"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": args.lr})
    topo_kw: dict[str, Any] = {}
    if device.type == "cuda":
        hbm = args.hbm_gb * 1e9 if args.hbm_gb > 0 else torch.cuda.get_device_properties(device).total_memory
        topo_kw["hbm_cap"] = int(hbm)
    topology = Topology(world_size=world, compute_device=device.type, local_world_size=world, **topo_kw)
    constraints = {t: ParameterConstraints(pooling_factors=[float(args.pooling)])
                   for t, _, _ in table_specs(args)}
    plain_types = [t.strip() for t in args.plain_types.split(",") if t.strip()]
    if config == "tt_no_rw":  # plain tables without row-wise sharding types
        plain_types = plain_types or ["data_parallel", "table_wise", "column_wise",
                                      "table_column_wise"]
    if config == "tt_dp":  # TT tables replicated: no all-to-all for their features
        for t in tt_names:
            constraints[t].sharding_types = ["data_parallel"]
    if plain_types:
        for t, c in constraints.items():
            if t not in tt_names:
                c.sharding_types = plain_types
    t0 = time.perf_counter()
    if config == "uncompressed":
        sharders: list[Any] = [ebc_sharder]
        planner = EmbeddingShardingPlanner(topology=topology, batch_size=args.batch_size,
                                           constraints=constraints)
        sharding_plan = planner.collective_plan(model, sharders, dist.group.WORLD)
    else:
        sharders = [TTEmbeddingBagCollectionSharder(), ebc_sharder]
        sharding_plan = plan(model, topology, args.batch_size, constraints, sharders=sharders,
                             device_flops=device_flops, optimizer_multiplier=0.0,
                             pg=dist.group.WORLD)
    out["plan_s"] = time.perf_counter() - t0
    out["plan"] = plan_summary(sharding_plan)
    batches = make_batches(args, keys, rank, device)
    measured_batches = [batches[i % len(batches)] for i in range(args.measure_steps)]
    try:
        out.update(computed_comms(model, sharding_plan, args, keys, world, rank, measured_batches))
    except ValueError as e:  # a sharding type neither plan_comms_bytes nor the RW part covers
        out["a2a_plan"] = out["ar_plan"] = out["rsag_plan"] = None
        out["plan_comms_error"] = str(e)

    t0 = time.perf_counter()
    dmp = DistributedModelParallel(model, env=ShardingEnv.from_process_group(dist.group.WORLD),
                                   device=device, plan=sharding_plan, sharders=sharders)
    sync(device)
    out["shard_s"] = time.perf_counter() - t0
    paths = list(sharding_plan.plan)
    out["emb_bytes"] = embedding_bytes_on_rank(dmp, paths)
    if device.type == "cuda":
        out["mem_after_init"] = torch.cuda.memory_allocated(device)
    # Fused-kernel tables update in the backward (their weights get no .grad); everything else
    # (dense arch, data-parallel plain tables, TT cores) is trained here.
    opt = torch.optim.SGD([p for p in dmp.parameters() if p.requires_grad], lr=args.lr)
    sync(device)

    def step(i: int) -> Tensor:
        loss, _ = dmp(batches[i % len(batches)])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for i in range(args.warmup):
        step(i)
    sync(device)
    dist.barrier()
    times: list[float] = []
    t_wall = time.perf_counter()
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(args.steps)]
        for i, (start, end) in enumerate(events):
            start.record()
            loss = step(args.warmup + i)
            end.record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in events]
    else:
        for i in range(args.steps):
            t = time.perf_counter()
            loss = step(args.warmup + i)
            times.append((time.perf_counter() - t) * 1e3)
    out["wall_ms"] = (time.perf_counter() - t_wall) * 1e3 / max(args.steps, 1)
    out["step_ms"] = statistics.median(times) if times else float("nan")
    out["loss"] = float(loss.detach()) if args.steps else float("nan")
    if device.type == "cuda":
        out["peak_mem"] = torch.cuda.max_memory_allocated(device)

    # Comms, measured after the timed steps (the meter's DDP hook is Python).
    meter = CommsMeter()
    try:
        meter.attach(dmp)
        other = GatherScatterMeter()
        with other, meter:
            for i in range(args.measure_steps):
                step(i)
        sync(device)
        n = max(args.measure_steps, 1)
        out["a2a_meas"] = meter.all_to_all_bytes / n
        out["ar_meas"] = meter.all_reduce_bytes / n
        out["rsag_meas"] = other.total / n
        out["rsag_by_op"] = {k: v / n for k, v in other.bytes.items()}
    except Exception as e:  # noqa: BLE001 (symmetric on all ranks; reported)
        out["a2a_meas"] = out["ar_meas"] = out["rsag_meas"] = None
        out["meter_error"] = f"{type(e).__name__}: {e}"
    sync(device)
    dist.barrier()
    del dmp, opt, batches, measured_batches, model, meter
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


# --- report ---------------------------------------------------------------------------------


def _fmt_bytes(x: float | None) -> str:
    if x is None:
        return "n/a"
    if x >= GIB:
        return f"{x / GIB:.2f} GiB"
    if x >= MIB:
        return f"{x / MIB:.2f} MiB"
    if x >= 1024:
        return f"{x / 1024:.1f} KiB"
    return f"{x:.0f} B"


def _per_rank(values: Sequence[Any], fmt: Callable[[Any], str]) -> str:
    return " / ".join(fmt(v) for v in values)


def _close(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and abs(a - b) < 0.5


def report(all_ranks: list[list[dict[str, Any]]], checks: list[list[tuple[str, bool, str]]],
           args: argparse.Namespace, device_kind: str, device_flops: float) -> tuple[bool, bool]:
    """Prints the details, the checks and the markdown table; returns (checks ok, bytes match)."""
    world = len(all_ranks)
    ok, bytes_match = True, True
    configs = [[all_ranks[r][i] for r in range(world)] for i in range(len(all_ranks[0]))]
    for per in configs:
        r0 = per[0]
        print(f"\n## {r0['config']}: plan ({r0['plan_s']:.1f} s to plan, {r0['shard_s']:.1f} s to shard)")
        for line in r0["plan"]:
            print(line)
        if "plan_comms_error" in r0:
            print(f"  computed bytes: n/a ({r0['plan_comms_error']})")
        elif r0.get("rw_note"):
            print("  computed bytes: plan_comms_bytes for the non-row_wise tables + this script's "
                  "row_wise accounting (ids per row block counted on the measured batches)")
        if "meter_error" in r0:
            print(f"  CommsMeter failed: {r0['meter_error']}")
        for r, o in enumerate(per):
            if o.get("a2a_meas") is not None:
                ops = ", ".join(f"{k} {_fmt_bytes(v)}" for k, v in o.get("rsag_by_op", {}).items())
                print(f"  rank {r}: measured per step: all-to-all {o['a2a_meas']:.0f} B, all-reduce "
                      f"{o['ar_meas']:.0f} B, reduce-scatter/all-gather {o['rsag_meas']:.0f} B"
                      + (f" ({ops})" if ops else ""))
            if o.get("a2a_plan") is not None and o.get("a2a_meas") is not None:
                match = (_close(o["a2a_plan"], o["a2a_meas"]) and _close(o["ar_plan"], o["ar_meas"])
                         and _close(o["rsag_plan"], o["rsag_meas"]))
                bytes_match &= match
                print(f"  rank {r}: computed per step: all-to-all {o['a2a_plan']:.0f} B, all-reduce "
                      f"{o['ar_plan']:.0f} B, reduce-scatter/all-gather {o['rsag_plan']:.0f} B: "
                      + ("measured == computed" if match else "MISMATCH with measured"))
            print(f"  rank {r}: median step {o['step_ms']:.3f} ms (wall mean {o['wall_ms']:.3f} ms), "
                  f"last loss {o['loss']:.4f}, embedding params here {_fmt_bytes(o['emb_bytes'])}"
                  + (f", GPU mem at start {_fmt_bytes(o['mem_at_start'])}, after sharding "
                     f"{_fmt_bytes(o['mem_after_init'])}, peak {_fmt_bytes(o['peak_mem'])}"
                     if "peak_mem" in o else ""))

    print("\n## correctness over the process group (TT module, sharded vs unsharded)")
    for name_idx, (name, _, _) in enumerate(checks[0]):
        passed = all(c[name_idx][1] for c in checks)
        ok &= passed
        details = "; ".join(f"rank {r}: {c[name_idx][2]}" for r, c in enumerate(checks))
        print(f"{'PASS' if passed else 'FAIL'} {name} ({details})")
    if not checks[0]:
        print("(skipped)")

    print(f"\n## Sharded DLRM, 26 Criteo Kaggle tables, D={args.dim}, {world} ranks ({device_kind})\n")
    print(f"Batch {args.batch_size} per rank, {args.pooling} id per feature, Zipf {args.zipf}, SGD "
          f"lr {args.lr}; median step (forward + backward + optimizer) of {args.steps} after "
          f"{args.warmup} warm-up; TT: the {args.num_tt} largest tables, ranks [{args.tt_rank}, "
          f"{args.tt_rank}], TT planner FLOP rate {device_flops:.3g}/s. Per rank per step "
          f"(rank 0 / rank 1 ...): bytes sent to other ranks by all-to-all and by reduce-scatter/"
          f"all-gather (row_wise), bytes all-reduced (DDP buckets); plan = computed from the plan, "
          f"meas = CommsMeter (+ reduce-scatter/all-gather hooks) over {args.measure_steps} steps.\n")
    print("| config | all-to-all plan | all-to-all meas | RS/AG plan | RS/AG meas | all-reduce plan "
          "| all-reduce meas | median step ms | peak GPU mem | embedding params on rank "
          "| embedding params (unsharded) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = {}
    for per in configs:
        r0 = per[0]
        rows[r0["config"]] = per
        cells = [_per_rank([o.get(k) for o in per], _fmt_bytes)
                 for k in ("a2a_plan", "a2a_meas", "rsag_plan", "rsag_meas", "ar_plan", "ar_meas")]
        print(
            f"| {r0['config']} | " + " | ".join(cells)
            + f" | {_per_rank([o['step_ms'] for o in per], lambda v: f'{v:.3f}')} "
            f"| {_per_rank([o.get('peak_mem') for o in per], _fmt_bytes)} "
            f"| {_per_rank([o['emb_bytes'] for o in per], _fmt_bytes)} "
            f"| {_fmt_bytes(r0['logical_emb_bytes'])} |"
        )
    base = rows.get("uncompressed")
    for name, per in rows.items():
        if base is None or name == "uncompressed":
            continue

        def ratio(key: str, reduce: Callable[[list[float]], float]) -> str:
            va = [o.get(key) for o in base]
            vb = [o.get(key) for o in per]
            if any(v is None for v in va + vb):
                return "n/a"
            xb = reduce(vb)
            return f"{reduce(va) / xb:.2f}x" if xb else "inf"

        def wire(rows_: list[dict[str, Any]]) -> float | None:
            vals = [o.get(k) for o in rows_ for k in ("a2a_meas", "rsag_meas", "ar_meas")]
            return None if any(v is None for v in vals) else sum(vals)

        wa, wb = wire(base), wire(per)
        print(f"\nuncompressed / {name}: step time (slowest rank) {ratio('step_ms', max)}; bytes "
              f"summed over ranks (measured): all-to-all {ratio('a2a_meas', sum)}, all-reduce "
              f"{ratio('ar_meas', sum)}, all three "
              + (f"{wa / wb:.2f}x ({_fmt_bytes(wa)} vs {_fmt_bytes(wb)})" if wa and wb else "n/a")
              + f"; embedding params: fullest rank {ratio('emb_bytes', max)}, summed over ranks "
              f"{ratio('emb_bytes', sum)}, unsharded "
              f"{base[0]['logical_emb_bytes'] / per[0]['logical_emb_bytes']:.1f}x; peak GPU memory "
              f"(fullest rank) {ratio('peak_mem', max)}")
    return ok, bytes_match


# --- process setup --------------------------------------------------------------------------


def worker(rank: int, world: int, local_rank: int, args: argparse.Namespace,
           init_method: str | None) -> None:
    quiet_known_noise()
    use_cuda = not args.cpu_smoke and torch.cuda.is_available()
    if not args.cpu_smoke and not use_cuda:
        raise SystemExit("no CUDA device: use --cpu-smoke for the gloo smoke check")
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, min(4, (os.cpu_count() or 2) // world)))
        backend = "gloo"
    kw: dict[str, Any] = {"timeout": timedelta(seconds=args.timeout)}
    if init_method is not None:
        kw.update(init_method=init_method, rank=rank, world_size=world)
    if use_cuda:
        kw["device_id"] = device
    dist.init_process_group(backend, **kw)
    ok = True
    try:
        if use_cuda:
            nccl = torch.cuda.nccl.version()
            nccl = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
            device_kind = f"{world} x {torch.cuda.get_device_name(device)}, NCCL {nccl}"
        else:
            device_kind = "CPU, gloo"
        log(rank, f"world {world}, {device_kind}, torch {torch.__version__}, "
                  f"NCCL_NVLS_ENABLE={os.environ.get('NCCL_NVLS_ENABLE')}")
        checks: list[tuple[str, bool, str]] = []
        if not args.skip_check:
            t0 = time.perf_counter()
            checks = run_checks(rank, world, device)
            log(rank, f"correctness checks: {time.perf_counter() - t0:.1f} s")
            for name, passed, msg in checks:
                log(rank, f"  {'PASS' if passed else 'FAIL'} {name}: {msg}")

        device_flops = args.device_flops
        if device_flops <= 0:
            from torchrec_tt.sharding.estimator import DEFAULT_TT_FLOPS, measure_tt_flops

            if use_cuda:
                measured = [0.0]
                if rank == 0:  # one TT table of the largest size, at this batch and pooling
                    measured[0] = measure_tt_flops(
                        device, num_rows=max(cardinalities(args)), embedding_dim=args.dim,
                        tt_rank=args.tt_rank, batch_size=args.batch_size,
                        pooling_factor=args.pooling, repeats=10)
                dist.broadcast_object_list(measured, src=0)
                device_flops = measured[0]
                log(rank, f"TT lookup FLOP rate (measure_tt_flops): {device_flops:.3g}/s")
            else:
                device_flops = DEFAULT_TT_FLOPS["cpu"]

        results: list[dict[str, Any]] = []
        if not args.check_only:
            for config in [c.strip() for c in args.configs.split(",") if c.strip()]:
                t0 = time.perf_counter()
                log(rank, f"configuration {config} ...")
                results.append(run_config(config, args, rank, world, device, device_flops))
                log(rank, f"configuration {config}: {time.perf_counter() - t0:.1f} s")

        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, (results, checks))
        if rank == 0:
            ok, match = report([g[0] for g in gathered], [g[1] for g in gathered], args,
                               device_kind, device_flops)
            print(f"\nRESULT: {'all correctness checks passed' if ok else 'SOME CHECKS FAILED'}; "
                  f"{'measured bytes == computed' if match else 'measured bytes differ from computed (see above)'}",
                  flush=True)
        dist.barrier()
    except BaseException:
        print(f"[rank {rank}] failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        raise
    finally:
        dist.destroy_process_group()
    if not ok:
        sys.exit(1)


def _spawned(local_rank: int, world: int, args: argparse.Namespace, init_method: str) -> None:
    worker(local_rank, world, local_rank, args, init_method)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun
        worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
               int(os.environ.get("LOCAL_RANK", os.environ["RANK"])), args, None)
        return
    world = args.nproc
    if not args.cpu_smoke and torch.cuda.is_available() and torch.cuda.device_count() < world:
        raise SystemExit(f"{world} ranks need {world} GPUs; {torch.cuda.device_count()} visible")
    mp.start_processes(_spawned, args=(world, args, f"tcp://127.0.0.1:{_free_port()}"),
                       nprocs=world, join=True, start_method="spawn")


if __name__ == "__main__":
    main()
