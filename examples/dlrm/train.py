"""DLRM with Tensor-Train embedding tables, trained on Criteo-format data, TT against uncompressed.

TorchRec's DLRM (``torchrec.models.dlrm.DLRMTrain``) whose big tables are swapped to TT by
config (``torchrec_tt.swap``), sharded with ``DistributedModelParallel`` on a plan from
``torchrec_tt.sharding.plan``, trained with ``TrainPipelineSparseDist``, evaluated with
torchmetrics (AUC, log-loss), checkpointed with ``torch.distributed.checkpoint``.

Launch (CPU/gloo or GPU/NCCL):

    python examples/dlrm/train.py --nproc 2 --mode compare          # local processes, TT vs uncompressed
    torchrun --nproc-per-node 2 examples/dlrm/train.py --steps 500  # under torchrun (or torchx)
    python examples/dlrm/train.py --data train.txt --baseline       # real Criteo Kaggle TSV

Data: synthetic Criteo-format rows with a planted hidden model by default (``--scale`` sets the
table sizes relative to Criteo Kaggle); ``--data`` takes a Criteo TSV / ``.tsv.gz`` (validated,
converted to ``.npy`` with TorchRec's preprocessing and cached) or a folder of preprocessed
``dense/sparse/labels.npy`` files, split into train/test by ``--split-seed``.

Outputs (``--out``): ``summary.json``, ``history_<model>.json`` (per-step losses, evaluations),
``curves.png`` (matplotlib), ``tb/<model>`` (TensorBoard), ``checkpoint/<model>`` (DCP). The last
line printed is a summary with ``auc=`` and ``compression=``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import math
import os
import resource
import socket
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
import torch.nn.functional as F
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryAUROC
from torchrec.datasets.utils import Batch
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import Topology
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.distributed.train_pipeline.utils import PipelinedPostproc
from torchrec.distributed.types import ShardingEnv
from torchrec.models.dlrm import DLRM, DLRMTrain
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from torchrec_tt import criteo
from torchrec_tt.sharding import TTEmbeddingBagCollectionSharder
from torchrec_tt.sharding import plan as tt_plan
from torchrec_tt.swap import HybridEmbeddingBagCollection, TTPolicy, swap_configs

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover - tqdm is in requirements/base.txt
    tqdm = None

MODELS = ("tt", "uncompressed")


# ------------------------------------------------------------------------------ arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    g = ap.add_argument_group("run")
    g.add_argument("--mode", choices=("tt", "baseline", "compare"), default="tt",
                   help="tt: TT model; baseline: uncompressed; compare: TT then uncompressed")
    g.add_argument("--baseline", action="store_true", help="same as --mode baseline")
    g.add_argument("--steps", type=int, default=1000, help="training steps")
    g.add_argument("--batch-size", type=int, default=512, help="per-process batch size")
    g.add_argument("--nproc", type=int, default=1,
                   help="local processes to spawn (ignored under torchrun/torchx)")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda")
    g.add_argument("--seed", type=int, default=0, help="model init and synthetic data seed")
    g.add_argument("--threads", type=int, default=0,
                   help="torch threads per process (0: cores / processes)")
    g.add_argument("--out", default="runs/dlrm", help="output folder")
    g.add_argument("--no-pipeline", action="store_true",
                   help="plain forward/backward instead of TrainPipelineSparseDist")
    g.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    g.add_argument("--log-every", type=int, default=50)
    g = ap.add_argument_group("data")
    g.add_argument("--data", default=None,
                   help="Criteo TSV/.tsv.gz or folder of dense/sparse/labels.npy; "
                   "default: synthetic")
    g.add_argument("--scale", type=float, default=1.0,
                   help="synthetic table sizes relative to Criteo Kaggle")
    g.add_argument("--eval-samples", type=int, default=65536, help="synthetic test rows")
    g.add_argument("--test-fraction", type=float, default=0.2, help="real data: test share")
    g.add_argument("--split-seed", type=int, default=0, help="real data: train/test split")
    g.add_argument("--max-ind-range", type=int, default=0,
                   help="real data: cap table sizes (ids hashed mod size); 0 = Kaggle sizes")
    g.add_argument("--cache-dir", default=None, help="where TSVs are converted to .npy")
    g = ap.add_argument_group("model")
    g.add_argument("--embedding-dim", type=int, default=16)
    g.add_argument("--dense-arch", default="128,64", help="bottom MLP (the embedding dim is appended)")
    g.add_argument("--over-arch", default="256,128", help="top MLP (1 is appended)")
    g.add_argument("--tt-tables", type=int, default=7, help="TT for the k largest tables")
    g.add_argument("--tt-min-rows", type=int, default=None, help="TT for tables with >= rows")
    g.add_argument("--tt-budget-bytes", type=float, default=None,
                   help="TT for as many tables as needed to fit the embeddings in this budget")
    g.add_argument("--tt-rank", type=int, default=32)
    g.add_argument("--tt-cores", type=int, default=3)
    g.add_argument("--lr", type=float, default=0.02, help="dense Adagrad learning rate")
    g.add_argument("--emb-lr", type=float, default=0.05, help="row-wise Adagrad (plain tables)")
    g.add_argument("--tt-lr", type=float, default=0.05, help="Adagrad on the TT cores")
    g = ap.add_argument_group("evaluation and checkpoints")
    g.add_argument("--eval-every", type=int, default=0, help="0: 10 evaluations per run")
    g.add_argument("--eval-batch-size", type=int, default=4096)
    g.add_argument("--checkpoint-every", type=int, default=0,
                   help="checkpoint every N steps and at the end (0: no checkpoints unless "
                   "--stop-after)")
    g.add_argument("--resume", action="store_true", help="resume from --out/checkpoint/<model>")
    g.add_argument("--stop-after", type=int, default=0,
                   help="stop (as if killed) after this many steps, having checkpointed")
    args = ap.parse_args(argv)
    if args.baseline:
        args.mode = "baseline"
    if args.steps < 1 or args.batch_size < 1:
        ap.error("--steps and --batch-size must be >= 1")
    return args


# ------------------------------------------------------------------------------ data


@dataclass
class Data:
    """Train batches from a step on, and the test batches of this rank."""

    cardinalities: list[int]
    synthetic: criteo.SyntheticCriteo | None = None
    train: criteo.CriteoArrays | None = None
    test: criteo.CriteoArrays | None = None
    description: str = ""

    def train_batches(self, args: argparse.Namespace, rank: int, world: int,
                      start: int) -> Iterator[Batch]:
        if self.synthetic is not None:
            for step in itertools.count(start):
                yield self.synthetic.batch(args.batch_size, 0, step * world + rank)
        else:
            assert self.train is not None
            yield from self.train.batches(args.batch_size, rank, world, start, args.seed)

    def test_batches(self, args: argparse.Namespace, rank: int, world: int) -> Iterator[Batch]:
        if self.synthetic is not None:
            per_rank = math.ceil(args.eval_samples / world)
            blocks = math.ceil(per_rank / args.eval_batch_size)
            for i in range(blocks):
                n = min(args.eval_batch_size, per_rank - i * args.eval_batch_size)
                yield self.synthetic.batch(n, 1, rank * blocks + i)
        else:
            assert self.test is not None
            yield from self.test.eval_batches(args.eval_batch_size, rank, world)


def cardinalities(args: argparse.Namespace) -> list[int]:
    """Table sizes: the synthetic generator's, or Kaggle's (capped by --max-ind-range)."""
    if args.data is None:
        return [max(2, int(round(n * args.scale))) for n in criteo.KAGGLE_CARDINALITIES]
    cards = list(criteo.KAGGLE_CARDINALITIES)
    if args.max_ind_range > 0:
        cards = [min(c, args.max_ind_range) for c in cards]
    return cards


def load_data(args: argparse.Namespace, rank: int) -> Data:
    if args.data is None:
        syn = criteo.SyntheticCriteo(scale=args.scale, seed=args.seed)
        assert syn.cardinalities == cardinalities(args)
        return Data(list(syn.cardinalities), synthetic=syn,
                    description=f"synthetic Criteo (scale {args.scale}, seed {args.seed})")
    cards = cardinalities(args)
    path = args.data
    if not os.path.exists(path):
        raise FileNotFoundError(f"--data {path!r} does not exist")
    folder = path
    if not os.path.isdir(path):
        # Rank 0 validates and converts (cached); the others wait, then read the same files.
        if rank == 0:
            folder = criteo.preprocess_criteo_tsv(path, args.cache_dir)
        objs = [folder]
        dist.broadcast_object_list(objs, src=0)
        folder = objs[0]
    arrays = criteo.load_criteo_npys(folder, cards)
    train, test = arrays.split(args.test_fraction, args.split_seed)
    return Data(cards, train=train, test=test,
                description=f"{path}: {len(train)} train / {len(test)} test rows "
                f"(split seed {args.split_seed})")


# ------------------------------------------------------------------------------ model


def table_configs(args: argparse.Namespace, cardinalities: list[int],
                  tt: bool) -> list[EmbeddingBagConfig]:
    configs = [
        EmbeddingBagConfig(name=f"t_{f}", embedding_dim=args.embedding_dim, num_embeddings=n,
                           feature_names=[f])
        for f, n in zip(criteo.DEFAULT_CAT_NAMES, cardinalities)
    ]
    if not tt:
        return configs
    if args.tt_budget_bytes is not None:
        policy = TTPolicy(memory_budget_bytes=int(args.tt_budget_bytes), ranks=args.tt_rank,
                          num_cores=args.tt_cores)
    elif args.tt_min_rows is not None:
        policy = TTPolicy(min_rows=args.tt_min_rows, ranks=args.tt_rank, num_cores=args.tt_cores)
    else:
        policy = TTPolicy(largest=args.tt_tables, ranks=args.tt_rank, num_cores=args.tt_cores)
    return swap_configs(configs, policy)


def build(args: argparse.Namespace, data: Data, tt: bool, device: torch.device,
          pg: dist.ProcessGroup) -> tuple[DistributedModelParallel, CombinedOptimizer,
                                          HybridEmbeddingBagCollection]:
    torch.manual_seed(args.seed)
    configs = table_configs(args, data.cardinalities, tt)
    ebc = HybridEmbeddingBagCollection(configs, device=torch.device("meta"))
    dense = [int(x) for x in args.dense_arch.split(",") if x] + [args.embedding_dim]
    over = [int(x) for x in args.over_arch.split(",") if x] + [1]
    model = DLRMTrain(DLRM(embedding_bag_collection=ebc,
                           dense_in_features=criteo.INT_FEATURE_COUNT,
                           dense_arch_layer_sizes=dense, over_arch_layer_sizes=over,
                           dense_device=device))
    if ebc.ebc is not None:  # plain tables: TorchRec's fused row-wise Adagrad in the backward
        apply_optimizer_in_backward(RowWiseAdagrad, ebc.ebc.parameters(), {"lr": args.emb_lr})
    sharders: list[Any] = [TTEmbeddingBagCollectionSharder(), EmbeddingBagCollectionSharder()]
    world = dist.get_world_size(pg)
    topology = Topology(world_size=world, compute_device=device.type,
                        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    sharding_plan = tt_plan(model, topology, batch_size=args.batch_size, sharders=sharders,
                            optimizer_multiplier=1.0, pg=pg)
    dmp = DistributedModelParallel(model, env=ShardingEnv.from_process_group(pg), device=device,
                                   plan=sharding_plan, sharders=sharders)
    params = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    tt_params = {k: v for k, v in params.items() if ".embedding_bag_collection.tt." in k}
    dense_params = {k: v for k, v in params.items() if k not in tt_params}
    optims: list[Any] = [dmp.fused_optimizer,
                         KeyedOptimizerWrapper(dense_params,
                                               lambda p: torch.optim.Adagrad(p, lr=args.lr))]
    if tt_params:
        optims.append(KeyedOptimizerWrapper(tt_params,
                                            lambda p: torch.optim.Adagrad(p, lr=args.tt_lr)))
    return dmp, CombinedOptimizer(optims), ebc


def plan_summary(dmp: DistributedModelParallel) -> dict[str, str]:
    return {table: f"{ps.sharding_type}{list(ps.ranks) if ps.ranks else ''}"
            for module_plan in dmp.plan.plan.values()
            for table, ps in module_plan.items()}  # type: ignore[union-attr]


# ------------------------------------------------------------------------------ evaluation


def detach_pipeline(pipeline: TrainPipelineSparseDist | None,
                    dmp: DistributedModelParallel) -> None:
    """Restores the plain forwards (the next ``progress`` re-attaches, keeping in-flight batches).

    ``TrainPipelineSparseDist.detach`` puts pipelined postproc modules back with
    ``setattr(model, fqn, ...)``, which is wrong for a nested fqn such as
    ``model.sparse_arch.embedding_bag_collection.tt_features`` (torchrec 1.6.1): the pipelined
    wrapper stays in place. Put the original module back at its real parent.
    """
    if pipeline is None:
        return
    pipeline.detach()
    root = dmp.module
    for key in [k for k in vars(root)["_modules"] if "." in k]:  # the stray dotted attribute
        del vars(root)["_modules"][key]
    for name, mod in list(root.named_modules()):
        if isinstance(mod, PipelinedPostproc):
            parent_name, _, attr = name.rpartition(".")
            parent = root.get_submodule(parent_name) if parent_name else root
            setattr(parent, attr, mod.postproc_module)


@torch.no_grad()
def evaluate(dmp: DistributedModelParallel, data: Data, args: argparse.Namespace, rank: int,
             world: int, device: torch.device) -> dict[str, float]:
    """Test AUC (torchmetrics BinaryAUROC) and log-loss (torch BCE averaged by torchmetrics
    MeanMetric), gathered over all ranks."""
    auroc = BinaryAUROC().to(device)
    logloss = MeanMetric().to(device)
    was_training = dmp.training
    dmp.eval()
    for batch in data.test_batches(args, rank, world):
        batch = batch.to(device)
        _, (_, logits, labels) = dmp(batch)
        logits = logits.float()
        auroc.update(torch.sigmoid(logits), labels.int())
        logloss.update(F.binary_cross_entropy_with_logits(logits, labels.float(),
                                                          reduction="none"))
    dmp.train(was_training)
    return {"auc": float(auroc.compute()), "logloss": float(logloss.compute())}


# ------------------------------------------------------------------------------ checkpoints


def _ckpt_dir(args: argparse.Namespace, name: str) -> str:
    return os.path.join(args.out, "checkpoint", name)


def save_checkpoint(args: argparse.Namespace, name: str, dmp: DistributedModelParallel,
                    optimizer: CombinedOptimizer, step: int, history: dict[str, Any],
                    rank: int) -> None:
    """Model (sharded), optimizers (fused, dense, TT cores) and the data position (``step``)."""
    path = os.path.join(_ckpt_dir(args, name), f"step_{step}")
    state = {"model": dmp.state_dict(), "optim": optimizer.state_dict(),
             "trainer": {"step": torch.tensor(step)}}
    dcp.save(state, checkpoint_id=path)
    dist.barrier()
    if rank == 0:
        with open(os.path.join(path, "history.json"), "w") as f:
            json.dump(history, f)
        tmp = os.path.join(_ckpt_dir(args, name), "latest.tmp")
        with open(tmp, "w") as f:
            f.write(f"step_{step}\n")
        os.replace(tmp, os.path.join(_ckpt_dir(args, name), "latest"))
    dist.barrier()


def load_checkpoint(args: argparse.Namespace, name: str, dmp: DistributedModelParallel,
                    optimizer: CombinedOptimizer) -> tuple[int, dict[str, Any]] | None:
    latest = os.path.join(_ckpt_dir(args, name), "latest")
    if not os.path.exists(latest):
        return None
    with open(latest) as f:
        path = os.path.join(_ckpt_dir(args, name), f.read().strip())
    state = {"model": dmp.state_dict(), "optim": optimizer.state_dict(),
             "trainer": {"step": torch.tensor(0)}}
    dcp.load(state, checkpoint_id=path)
    dmp.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optim"])
    with open(os.path.join(path, "history.json")) as f:
        history = json.load(f)
    return int(state["trainer"]["step"]), history


# ------------------------------------------------------------------------------ training


@dataclass
class RunResult:
    name: str
    embedding_bytes: float
    dense_bytes: float
    compression: float
    tt_tables: int
    auc: float = float("nan")
    logloss: float = float("nan")
    step_ms: float = float("nan")
    peak_mib: float = float("nan")
    steps: int = 0
    stopped: bool = False
    plan: dict[str, str] = field(default_factory=dict)
    pipelined: list[str] = field(default_factory=list)


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux


def train_one(args: argparse.Namespace, name: str, data: Data, rank: int, world: int,
              device: torch.device, pg: dist.ProcessGroup, writer_factory: Any) -> RunResult:
    dmp, optimizer, ebc = build(args, data, name == "tt", device, pg)
    mem = ebc.memory_stats()
    result = RunResult(name, mem["bytes"], mem["dense_bytes"], mem["compression"],
                       int(mem["tt_tables"]), plan=plan_summary(dmp))
    history: dict[str, Any] = {"loss": [], "eval": []}
    start = 0
    if args.resume:
        loaded = load_checkpoint(args, name, dmp, optimizer)
        if loaded is not None:
            start, history = loaded
            if rank == 0:
                print(f"[{name}] resumed from step {start}", flush=True)
    eval_every = args.eval_every or max(1, args.steps // 10)
    writer = writer_factory(name) if rank == 0 else None
    batches = data.train_batches(args, rank, world, start)
    pipeline = None
    if not args.no_pipeline:
        pipeline = TrainPipelineSparseDist(dmp, optimizer, device, execute_all_batches=False,
                                           pipeline_postproc=True)
    bar = None
    if rank == 0 and tqdm is not None and not args.no_progress:
        bar = tqdm(total=args.steps, initial=start, desc=name, dynamic_ncols=True,
                   mininterval=2.0, file=sys.stdout)
    step_times: list[float] = []
    loss_sum = torch.zeros(2, dtype=torch.float64, device=device)  # NCCL needs device tensors
    stop_at = min(args.steps, args.stop_after) if args.stop_after else args.steps
    dmp.train()
    step = start
    while step < stop_at:
        t0 = time.perf_counter()
        if pipeline is not None:
            loss, _, _ = pipeline.progress(batches)
        else:
            batch = next(batches).to(device)
            optimizer.zero_grad()
            loss, _ = dmp(batch)
            loss.backward()
            optimizer.step()
        step_times.append(time.perf_counter() - t0)
        step += 1
        if pipeline is not None and not result.pipelined:
            result.pipelined = sorted({type(m).__name__ for m in dmp.modules()
                                       if getattr(m, "is_pipelined", False)})
        # Mean loss over ranks (one small all-reduce per step).
        loss_sum[0], loss_sum[1] = float(loss.detach()), 1.0
        dist.all_reduce(loss_sum, group=pg)
        mean_loss = float(loss_sum[0] / loss_sum[1])
        history["loss"].append(mean_loss)
        if writer is not None:
            writer.add_scalar("train/loss", mean_loss, step)
        if bar is not None:
            bar.update(1)
            if step % args.log_every == 0:
                bar.set_postfix(loss=f"{sum(history['loss'][-args.log_every:]) / args.log_every:.4f}")
        if step % eval_every == 0 or step == args.steps:
            detach_pipeline(pipeline, dmp)  # plain forwards; the next progress() re-attaches
            metrics = evaluate(dmp, data, args, rank, world, device)
            history["eval"].append({"step": step, **metrics})
            if writer is not None:
                writer.add_scalar("eval/auc", metrics["auc"], step)
                writer.add_scalar("eval/logloss", metrics["logloss"], step)
            if rank == 0:
                msg = (f"[{name}] step {step}: loss {mean_loss:.4f} "
                       f"test auc {metrics['auc']:.4f} logloss {metrics['logloss']:.4f}")
                (bar.write(msg) if bar is not None else print(msg, flush=True))
        checkpointing = args.checkpoint_every > 0 or args.stop_after > 0
        if checkpointing and (step == stop_at or (args.checkpoint_every
                                                  and step % args.checkpoint_every == 0)):
            detach_pipeline(pipeline, dmp)
            save_checkpoint(args, name, dmp, optimizer, step, history, rank)
    if bar is not None:
        bar.close()
    if writer is not None:
        writer.close()
    result.steps = step
    result.stopped = step < args.steps
    warm = step_times[min(10, len(step_times) // 2):] or step_times
    if warm:
        result.step_ms = 1e3 * sum(warm) / len(warm)
    result.peak_mib = peak_memory_mib(device)
    if history["eval"]:
        result.auc = history["eval"][-1]["auc"]
        result.logloss = history["eval"][-1]["logloss"]
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"history_{name}.json"), "w") as f:
            json.dump({**history, "result": result.__dict__}, f)
    # Peak memory is per process: report the largest over ranks.
    peak = torch.tensor([result.peak_mib], device=device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=pg)
    result.peak_mib = float(peak)
    del pipeline, dmp, optimizer
    return result


# ------------------------------------------------------------------------------ reporting


def _writer_factory(args: argparse.Namespace) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("tensorboard is not installed: no TensorBoard logs (pip install -r "
              "requirements/base.txt)", flush=True)
        return lambda name: None
    return lambda name: SummaryWriter(os.path.join(args.out, "tb", name))


def plot_curves(args: argparse.Namespace, names: list[str]) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", flush=True)
        return None
    fig, (ax_loss, ax_auc) = plt.subplots(1, 2, figsize=(11, 4))
    for name in names:
        with open(os.path.join(args.out, f"history_{name}.json")) as f:
            h = json.load(f)
        loss = h["loss"]
        w = max(1, len(loss) // 50)
        smooth = [sum(loss[max(0, i - w + 1):i + 1]) / len(loss[max(0, i - w + 1):i + 1])
                  for i in range(len(loss))]
        label = "TT" if name == "tt" else "uncompressed"
        ax_loss.plot(range(1, len(loss) + 1), smooth, label=label)
        ev = h["eval"]
        ax_auc.plot([e["step"] for e in ev], [e["auc"] for e in ev], marker="o", label=label)
    ax_loss.set(xlabel="step", ylabel=f"train log-loss (moving mean)", title="training loss")
    ax_auc.set(xlabel="step", ylabel="test AUC", title="test AUC")
    for ax in (ax_loss, ax_auc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = os.path.join(args.out, "curves.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def report(args: argparse.Namespace, results: list[RunResult], data: Data, world: int) -> None:
    print(f"\ndata: {data.description}; {world} process(es), batch {args.batch_size}/process")
    for r in results:
        print(f"plan [{r.name}]: " + ", ".join(f"{t}={s}" for t, s in sorted(r.plan.items())))
    head = (f"{'model':<13} {'TT tables':>9} {'emb bytes':>11} {'compression':>11} "
            f"{'AUC':>7} {'log-loss':>8} {'step ms':>8} {'peak MiB':>9}")
    print(head)
    print("-" * len(head))
    for r in results:
        print(f"{r.name:<13} {r.tt_tables:>9} {_fmt_bytes(r.embedding_bytes):>11} "
              f"{r.compression:>10.1f}x {r.auc:>7.4f} {r.logloss:>8.4f} {r.step_ms:>8.1f} "
              f"{r.peak_mib:>9.0f}")
    by = {r.name: r for r in results}
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump({"args": vars(args), "data": data.description, "world_size": world,
                   "results": [r.__dict__ for r in results]}, f, indent=1)
    main = by.get("tt", results[0])
    line = (f"summary: model={main.name} steps={main.steps} auc={main.auc:.4f} "
            f"logloss={main.logloss:.4f} compression={main.compression:.1f}x "
            f"emb_bytes={main.embedding_bytes:.0f} step_ms={main.step_ms:.1f}")
    if "tt" in by and "uncompressed" in by:
        base = by["uncompressed"]
        line += (f" auc_uncompressed={base.auc:.4f} auc_delta={main.auc - base.auc:+.4f} "
                 f"step_ms_uncompressed={base.step_ms:.1f}")
    print(line, flush=True)


# ------------------------------------------------------------------------------ processes


def _quiet() -> None:
    # Known, harmless noise from the pinned torch/torchrec/fbgemm stack.
    warnings.filterwarnings("ignore", message=".*an autograd kernel was not registered.*")
    warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*is_fx_tracing will return true.*")
    warnings.filterwarnings("ignore", message=".*_get_pg_default_device.*")
    warnings.filterwarnings("ignore", message=".*Multiple backends are registered.*")
    logging.getLogger("torchrec.distributed.utils").setLevel(logging.ERROR)
    logging.getLogger("torchrec.distributed.train_pipeline.postproc").setLevel(logging.ERROR)
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)


def worker(args: argparse.Namespace) -> None:
    _quiet()
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        threads = args.threads or max(1, (os.cpu_count() or 1) // local_world)
        torch.set_num_threads(threads)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    pg = dist.group.WORLD
    try:
        data = load_data(args, rank)
        names = {"tt": ["tt"], "baseline": ["uncompressed"], "compare": ["tt", "uncompressed"]}
        results = []
        writer_factory = _writer_factory(args) if rank == 0 else (lambda name: None)
        if rank == 0:
            os.makedirs(args.out, exist_ok=True)
        for name in names[args.mode]:
            results.append(train_one(args, name, data, rank, world, device, pg, writer_factory))
            if results[-1].stopped:
                if rank == 0:
                    print(f"[{name}] stopped after step {results[-1].steps} (--stop-after); "
                          "resume with --resume", flush=True)
                return
        if rank == 0:
            done = [r.name for r in results]
            png = plot_curves(args, done)
            if png:
                print(f"curves: {png}")
            report(args, results, data, world)
    finally:
        with contextlib.suppress(Exception):
            dist.barrier()
        dist.destroy_process_group()


def _spawned(local_rank: int, nproc: int, port: int, args: argparse.Namespace) -> None:
    os.environ.update(RANK=str(local_rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(local_rank),
                      LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    worker(args)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.data is not None and not os.path.exists(args.data):
        raise FileNotFoundError(f"--data {args.data!r} does not exist")
    if args.mode != "baseline":
        table_configs(args, cardinalities(args), tt=True)  # a bad TT policy fails here, once
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun / torchx
        worker(args)
    elif args.nproc > 1:
        mp.start_processes(_spawned, args=(args.nproc, _free_port(), args), nprocs=args.nproc,
                           join=True, start_method="spawn")
    else:
        _spawned(0, 1, _free_port(), args)


if __name__ == "__main__":
    main()
