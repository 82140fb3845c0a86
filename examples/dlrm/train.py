"""DLRM with Tensor-Train embedding tables, trained on Criteo-format data, TT against uncompressed.

TorchRec's DLRM (``torchrec.models.dlrm.DLRMTrain``) whose big tables are swapped to TT by
config (``torchrec_tt.swap``), sharded with ``DistributedModelParallel`` on a plan from
``torchrec_tt.sharding.plan``, trained with ``TrainPipelineSparseDist``, evaluated with
``torchrec.metrics`` (NE, AUC, calibration, log-loss), checkpointed with
``torch.distributed.checkpoint``. Flags follow TorchRec's examples/dlrm/dlrm_main.py
(``--batch_size``, ``--epochs``, ``--num_embeddings_per_feature``, ``--dense_arch_layer_sizes``
ending in the embedding dim, ``--over_arch_layer_sizes`` ending in 1, ``--learning_rate``,
``--multi_hot_sizes`` ...); the hyphenated and older spellings still work.

Launch (CPU/gloo or GPU/NCCL):

    python examples/dlrm/train.py --nproc 2 --mode compare          # local processes, TT vs uncompressed
    torchrun --nproc-per-node 2 examples/dlrm/train.py --steps 500  # under torchrun (or torchx)
    python examples/dlrm/train.py --data train.txt --baseline       # real Criteo Kaggle TSV
    python examples/dlrm/train.py --batch_size 512 --epochs 1 --limit_train_batches 200 \
        --embedding_dim 16 --dense_arch_layer_sizes 128,64,16 --over_arch_layer_sizes 256,128,1 \
        --adagrad --learning_rate 0.02 --multi_hot_sizes 3,2,1,2,6,1,1,1,1,7,3,8,1,6,9,5,1,1,1,12,4,2,1,3,1,1

Data: synthetic Criteo-format rows with a planted hidden model by default, made on the training
device with torch (``torchrec_tt.synthetic``; ``--scale`` or ``--num_embeddings_per_feature`` set
the tables, ``--multi_hot_sizes`` the ids per feature); ``--data`` takes a Criteo TSV /
``.tsv.gz`` (validated, converted to ``.npy`` with TorchRec's preprocessing and cached) or a
folder of preprocessed ``dense/sparse/labels.npy`` files, split into train/test by
``--split_seed``. Losses stay on the device and are read every ``--log_every`` steps; the step
time and samples/s are measured over those windows.

Outputs (``--out``): ``summary.json``, ``history_<model>.json`` (per-step losses, evaluations),
``curves.png`` (matplotlib), ``tb/<model>`` (TensorBoard), ``checkpoint/<model>`` (DCP). The last
line printed is a summary with ``auc=`` and ``compression=``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import json
import logging
import math
import os
import resource
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.utils.data import DataLoader
from torchrec.datasets.utils import Batch
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.fbgemm_qcomm_codec import (
    CommType,
    QCommsConfig,
    get_qcomm_codecs_registry,
)
from torchrec.distributed.planner import Topology
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.distributed.train_pipeline.utils import PipelinedPostproc
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import CommOp, ShardingEnv, ShardingPlan, ShardingType
from torchrec.metrics.auc import AUCMetric
from torchrec.metrics.calibration import CalibrationMetric
from torchrec.metrics.metrics_config import RecTaskInfo
from torchrec.metrics.ne import NEMetric
from torchrec.models.dlrm import DLRM, DLRMTrain
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from torchrec_tt import TTEmbeddingBagConfig, criteo
from torchrec_tt.mlet import collapse_checkpoint, collapsed_config, mlet_rowwise_lr_scale, swap_to_mlet
from torchrec_tt.sharding import (
    CommsMeter,
    ErrorBoundPolicy,
    TTEmbeddingBagCollectionSharder,
    error_bounded_qcomm_codecs,
    tt_skipped_steps,
)
from torchrec_tt.sharding import plan as tt_plan
from torchrec_tt.swap import HybridEmbeddingBagCollection, TTPolicy, swap_configs
from torchrec_tt.synthetic import DeviceSyntheticCriteo

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # the sibling module, also when this file is loaded by path
    sys.path.insert(0, _HERE)
from dlrm_interaction import use_flat_interaction  # noqa: E402  (examples/dlrm/dlrm_interaction.py)

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover - tqdm is in requirements/base.txt
    tqdm = None

MODELS = ("tt", "uncompressed")
MODELS_OF_MODE = {"tt": ["tt"], "baseline": ["uncompressed"], "compare": ["tt", "uncompressed"]}


# ------------------------------------------------------------------------------ arguments


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows every flag's default, keeps the module docstring's layout."""


def _flag(group: Any, name: str, *aliases: str, **kwargs: Any) -> argparse.Action:
    """``--name`` (TorchRec's spelling), its hyphenated twin, and older spellings."""
    opts = [f"--{name}"]
    for alias in (f"--{name.replace('_', '-')}", *aliases):
        if alias not in opts:
            opts.append(alias)
    return group.add_argument(*opts, dest=name, **kwargs)


def _int_list(text: str) -> list[int]:
    """A comma-separated list of integers >= 1 (argparse names the flag when this fails)."""
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers >= 1")
    return values


def _available_workers(device: str) -> tuple[int, str]:
    """How many local processes the machine can run: GPUs on CUDA, else usable cores."""
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return torch.cuda.device_count(), "GPU(s)"
    return len(os.sched_getaffinity(0)), "CPU core(s)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags with TorchRec's dlrm_main.py names and meanings (hyphenated and older spellings
    still work), validated here, before any process or model exists."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    g = ap.add_argument_group("run")
    g.add_argument("--mode", choices=("tt", "baseline", "compare"), default="tt",
                   help="tt: TT model; baseline: uncompressed; compare: TT then uncompressed")
    g.add_argument("--baseline", action="store_true", help="same as --mode baseline")
    _flag(g, "epochs", type=int, default=1,
          help="epochs; an epoch is --limit_train_batches batches, or one pass over --data")
    _flag(g, "limit_train_batches", type=int, default=None,
          help="training batches per epoch (synthetic data: 1000 when not given)")
    _flag(g, "steps", type=int, default=None,
          help="total training steps (overrides --epochs x batches per epoch)")
    _flag(g, "batch_size", type=int, default=512, help="batch size per process")
    g.add_argument("--nproc", type=int, default=1,
                   help="local processes to spawn, at most one per GPU or CPU core (ignored "
                   "under torchrun/torchx)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: CUDA when available")
    g.add_argument("--seed", type=int, default=0, help="model init and synthetic data seed")
    g.add_argument("--threads", type=int, default=0,
                   help="torch threads per process (0: cores / processes)")
    g.add_argument("--out", default="runs/dlrm", help="output folder")
    _flag(g, "no_pipeline", action="store_true",
          help="plain forward/backward instead of TrainPipelineSparseDist")
    _flag(g, "no_progress", action="store_true", help="no tqdm bar")
    _flag(g, "log_every", type=int, default=50,
          help="read the losses back from the device (and log them) every N steps")
    g = ap.add_argument_group("data")
    g.add_argument("--data", default=None,
                   help="Criteo TSV/.tsv.gz or folder of dense/sparse/labels.npy; "
                   "default: synthetic rows made on the training device")
    g.add_argument("--scale", type=float, default=1.0,
                   help="synthetic table sizes relative to Criteo Kaggle")
    _flag(g, "num_embeddings", type=int, default=None,
          help="rows of every table (synthetic: the generator's tables; real data: ids are "
          "hashed mod this)")
    _flag(g, "num_embeddings_per_feature", type=_int_list, default=None,
          help="comma-separated rows of each of the 26 tables (as --num_embeddings, per table)")
    _flag(g, "multi_hot_sizes", type=_int_list, default=None,
          help="comma-separated ids per sample of each of the 26 features (synthetic data); "
          "default one each")
    _flag(g, "multi_hot_distribution_type", choices=("pareto", "uniform"), default="pareto",
          help="multi-hot ids after the first: the Zipf law of the first (pareto) or uniform "
          "over the table")
    _flag(g, "in_memory_binary_criteo_path", default=None,
          help="folder of TorchRec's preprocessed .npy files (--dataset_name picks the layout), "
          "read by TorchRec's InMemoryBinaryCriteoIterDataPipe in a DataLoader (as dlrm_main.py): "
          "criteo_1t, day_<i>_{dense,sparse,labels}.npy: trains on every day but the last (its "
          "last incomplete batch too, unless --drop_last_training_batch), validates on the first "
          "half of the last day, tests on its second half at the end; make one from a "
          "TSV with: python -m torchrec_tt.criteo TSV --in-memory-binary temp")
    _flag(g, "dataset_name", choices=criteo.BINARY_DATASET_NAMES,
          default=criteo.BINARY_DATASET_NAMES[0],
          help="--in_memory_binary_criteo_path layout (dlrm_main.py's flag): criteo_1t, the "
          "day files; criteo_kaggle, train_{dense,sparse,labels}.npy (TorchRec's "
          "npy_preproc_criteo --dataset_name criteo_kaggle of Kaggle's train.txt): trains on "
          "all of it and validates and tests on its second half, as dlrm_main.py does (Kaggle's "
          "test.txt has no labels), so those evaluation rows are trained on too; make one with: "
          "python -m torchrec_tt.criteo TSV --in-memory-binary DIR --dataset-name criteo_kaggle")
    _flag(g, "drop_last_training_batch", action="store_true",
          help="--in_memory_binary_criteo_path: drop the last non-full training batch (TorchRec's "
          "meaning; without it the last, smaller batch of each pass is trained on; synthetic and "
          "--data batches are always full)")
    _flag(g, "mmap_mode", action="store_true",
          help="--in_memory_binary_criteo_path: memory-map the .npy files instead of reading "
          "them into memory (ids are then hashed per batch)")
    _flag(g, "shuffle_batches", action="store_true",
          help="--in_memory_binary_criteo_path: shuffle the rows inside each batch (TorchRec's "
          "meaning; seeded by --seed)")
    _flag(g, "pin_memory", action="store_true",
          help="pin host-made batches (real data: the DataLoader's pin_memory) so copies to the "
          "GPU overlap compute (no effect on CPU)")
    _flag(g, "eval_samples", type=int, default=65536, help="synthetic test rows")
    _flag(g, "test_fraction", type=float, default=0.2, help="real data: test share")
    _flag(g, "split_seed", type=int, default=0, help="real data: train/test split")
    _flag(g, "max_ind_range", type=int, default=0,
          help="real data: cap table sizes (ids hashed mod size); 0 = Kaggle sizes")
    _flag(g, "cache_dir", default=None, help="where TSVs are converted to .npy")
    g = ap.add_argument_group("model")
    _flag(g, "embedding_dim", type=int, default=16, help="embedding dimension of every table")
    _flag(g, "dense_arch_layer_sizes", type=_int_list, default=None,
          help="bottom MLP, ending in the embedding dim (default: 128,64,EMBEDDING_DIM)")
    _flag(g, "over_arch_layer_sizes", type=_int_list, default=[256, 128, 1],
          help="top MLP, ending in 1")
    g.add_argument("--dense-arch", dest="dense_hidden", type=_int_list, default=None,
                   help="older spelling: bottom MLP hidden layers (the embedding dim is appended)")
    g.add_argument("--over-arch", dest="over_hidden", type=_int_list, default=None,
                   help="older spelling: top MLP hidden layers (1 is appended)")
    _flag(g, "tt_tables", type=int, default=7, help="TT for the k largest tables")
    _flag(g, "tt_min_rows", type=int, default=None, help="TT for tables with >= rows")
    _flag(g, "tt_budget_bytes", type=float, default=None,
          help="TT for as many tables as needed to fit the embeddings in this budget")
    _flag(g, "tt_rank", type=int, default=32, help="TT rank (all inner ranks)")
    _flag(g, "tt_cores", type=int, default=2,
          help="TT cores per table (2: the CUDA two-factor kernels' best shape)")
    _flag(g, "tt_cache_fraction", type=float, default=0.0,
          help="hot-row cache of each TT table (TT-Rec), as a fraction of its rows: the most "
          "frequent ids train as a dense slab (0: off; data_parallel / table_wise plans)")
    _flag(g, "tt_cache_refresh_steps", type=int, default=100,
          help="training steps between hot-row cache refreshes (with --tt_cache_fraction)")
    _flag(g, "mlet_inner_dim", type=int, default=0,
          help="MLET (arXiv 2006.05623): train every table (plain and TT) at this width, "
          "followed by a linear map to --embedding_dim, then collapse it and evaluate the "
          "collapsed model too (0: off)")
    _flag(g, "mlet_skip_collapse", action="store_true",
          help="MLET: do not collapse and evaluate the collapsed model at the end (timing runs)")
    _flag(g, "mlet_init_scale", type=float, default=1.0,
          help="MLET: init std of table x projection relative to the plain table's")
    _flag(g, "mlet_learning_rate", type=float, default=None,
          help="MLET: learning rate of the projections (same optimizer as the dense layers; "
          "default --learning_rate)")
    _flag(g, "mlet_embedding_lr_scale", type=float, default=None,
          help="MLET: factor on --embedding_learning_rate for the wide plain tables "
          "(default sqrt(embedding_dim / mlet_inner_dim): the collapsed table's first row-wise "
          "Adagrad step matches a plain table's)")
    g = ap.add_argument_group("optimisation")
    _flag(g, "learning_rate", "--lr", type=float, default=0.02,
          help="learning rate of the dense layers")
    opt = g.add_mutually_exclusive_group()
    opt.add_argument("--adagrad", action="store_true",
                     help="Adagrad on the dense layers (this trainer's default; TorchRec's "
                     "dlrm_main.py uses SGD without this flag)")
    opt.add_argument("--sgd", action="store_true", help="plain SGD on the dense layers")
    _flag(g, "embedding_learning_rate", "--emb-lr", type=float, default=0.05,
          help="row-wise Adagrad on the plain tables (fused into the backward)")
    _flag(g, "tt_learning_rate", "--tt-lr", type=float, default=0.05,
          help="Adagrad on the TT cores (fused into the backward, as the plain tables')")
    _flag(g, "lr_warmup_steps", type=int, default=0,
          help="learning rates (all optimizers) ramp linearly from 0 over this many steps "
          "(TorchRec's dlrm_main.py LR policy)")
    _flag(g, "lr_decay_start", type=int, default=0,
          help="step at which the polynomial (power 2) learning-rate decay starts")
    _flag(g, "lr_decay_steps", type=int, default=0,
          help="steps of the decay (0: none); after it the rates stay at the last value")
    _flag(g, "no_skip_non_finite", action="store_true",
          help="let a NaN/inf gradient update the TT cores; by default such a step of a TT "
          "table is skipped (cores and optimizer state untouched) and counted in the summary "
          "(the fused optimizer's skip_non_finite; no host sync)")
    g = ap.add_argument_group("communication")
    comms = g.add_mutually_exclusive_group()
    _flag(comms, "lossy_comms", type=float, default=None, metavar="BOUND",
          help="error-bounded lossy compression of the pooled all-to-all (forward embeddings "
          "and backward gradients): every value within BOUND x its table's value range "
          "(torchrec_tt.sharding.error_bounded_qcomm_codecs), e.g. 0.05")
    _flag(comms, "qcomms", choices=("fp16", "bf16", "int8"), default=None,
          help="TorchRec's fixed-rate qcomms for the pooled all-to-all, both directions")
    _flag(g, "lossy_comms_final", type=float, default=None, metavar="BOUND",
          help="--lossy_comms: the bound the schedule tightens to by the last step "
          "(default: half of --lossy_comms)")
    g = ap.add_argument_group("evaluation and checkpoints")
    _flag(g, "validation_freq_within_epoch", "--eval-every", type=int, default=0,
          help="evaluate every N steps (0: 10 evaluations per run)")
    _flag(g, "test_batch_size", "--eval-batch-size", type=int, default=4096,
          help="evaluation batch size per process")
    _flag(g, "checkpoint_every", type=int, default=0,
          help="checkpoint every N steps and at the end (0: no checkpoints unless --stop_after)")
    g.add_argument("--resume", action="store_true",
                   help="resume from --out/checkpoint/<model>; stops if there is none")
    _flag(g, "resume_if_present", action="store_true",
          help="resume when a checkpoint exists, else start from step 0")
    _flag(g, "stop_after", type=int, default=0,
          help="stop (as if killed) after this many steps, having checkpointed")
    args = ap.parse_args(argv)
    try:
        validate_args(args)
    except ValueError as e:
        ap.error(str(e))
    return args


def validate_args(args: argparse.Namespace) -> None:
    """Checks the flags together and fills the derived ones (``steps`` stays None until the
    data size is known); raises ValueError naming the flag."""
    if args.baseline:
        args.mode = "baseline"
    positive = {"--batch_size": args.batch_size, "--test_batch_size": args.test_batch_size,
                "--epochs": args.epochs, "--log_every": args.log_every,
                "--eval_samples": args.eval_samples, "--embedding_dim": args.embedding_dim,
                "--tt_rank": args.tt_rank, "--nproc": args.nproc}
    for opt in ("steps", "limit_train_batches", "num_embeddings", "tt_min_rows"):
        if getattr(args, opt) is not None:
            positive[f"--{opt}"] = getattr(args, opt)
    for flag, value in positive.items():
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    for flag in ("validation_freq_within_epoch", "checkpoint_every", "stop_after", "threads",
                 "max_ind_range", "tt_tables", "lr_warmup_steps", "lr_decay_start",
                 "lr_decay_steps"):
        if getattr(args, flag) < 0:
            raise ValueError(f"--{flag} must be >= 0, got {getattr(args, flag)}")
    if args.tt_cores < 2:
        raise ValueError(f"--tt_cores must be >= 2, got {args.tt_cores}")
    if not (math.isfinite(args.tt_cache_fraction) and 0 <= args.tt_cache_fraction <= 1):
        raise ValueError(f"--tt_cache_fraction must be in [0, 1], got {args.tt_cache_fraction}")
    if args.tt_cache_refresh_steps < 1:
        raise ValueError(f"--tt_cache_refresh_steps must be >= 1, got {args.tt_cache_refresh_steps}")
    if args.tt_cache_fraction > 0 and args.mlet_inner_dim > 0:
        raise ValueError("--tt_cache_fraction does not combine with --mlet_inner_dim (MLET's TT "
                         "tables take no hot-row cache)")
    if args.mlet_inner_dim < 0:
        raise ValueError(f"--mlet_inner_dim must be >= 0 (0: off), got {args.mlet_inner_dim}")
    if 0 < args.mlet_inner_dim < args.embedding_dim:
        raise ValueError(f"--mlet_inner_dim {args.mlet_inner_dim} must be >= --embedding_dim "
                         f"{args.embedding_dim} (MLET trains wider tables), or 0 for off")
    for flag in ("mlet_init_scale", "mlet_embedding_lr_scale", "mlet_learning_rate"):
        value = getattr(args, flag)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"--{flag} must be a finite number > 0, got {value}")
    for flag in ("learning_rate", "embedding_learning_rate", "tt_learning_rate", "scale"):
        value = getattr(args, flag)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"--{flag} must be a finite number > 0, got {value}")
    if args.lossy_comms is not None:
        final = args.lossy_comms / 2 if args.lossy_comms_final is None else args.lossy_comms_final
        for flag, value in (("--lossy_comms", args.lossy_comms), ("--lossy_comms_final", final)):
            if not (math.isfinite(value) and 0 < value < 0.5):
                raise ValueError(f"{flag} must be a number in (0, 0.5), got {value}")
        if final > args.lossy_comms:
            raise ValueError(f"--lossy_comms_final {final} is looser than --lossy_comms "
                             f"{args.lossy_comms}; the schedule only tightens")
        args.lossy_comms_final = final
    elif args.lossy_comms_final is not None:
        raise ValueError("--lossy_comms_final needs --lossy_comms")
    if not 0 < args.test_fraction < 1:
        raise ValueError(f"--test_fraction must be in (0, 1), got {args.test_fraction}")
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:  # we spawn the processes
        if args.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: CUDA is not available on this machine")
        available, what = _available_workers(args.device)
        if args.nproc > available:
            raise ValueError(f"--nproc {args.nproc} exceeds the {available} {what} available")
    args.optimizer = "sgd" if args.sgd else "adagrad"
    # Layer lists, TorchRec's meaning: the bottom MLP ends in the embedding dim, the top in 1.
    d = args.embedding_dim
    if args.dense_hidden is not None:
        if args.dense_arch_layer_sizes is not None:
            raise ValueError("give --dense_arch_layer_sizes or --dense-arch, not both")
        args.dense_arch_layer_sizes = args.dense_hidden + [d]
    elif args.dense_arch_layer_sizes is None:
        args.dense_arch_layer_sizes = [128, 64, d]
    if args.over_hidden is not None:
        args.over_arch_layer_sizes = args.over_hidden + [1]
    if args.dense_arch_layer_sizes[-1] != d:
        raise ValueError(f"--dense_arch_layer_sizes {args.dense_arch_layer_sizes} must end in "
                         f"the embedding dim {d} (--embedding_dim)")
    if args.over_arch_layer_sizes[-1] != 1:
        raise ValueError(f"--over_arch_layer_sizes {args.over_arch_layer_sizes} must end in 1 "
                         "(one logit)")
    for flag in ("num_embeddings_per_feature", "multi_hot_sizes"):
        value = getattr(args, flag)
        if value is not None and len(value) != criteo.CAT_FEATURE_COUNT:
            raise ValueError(f"--{flag} needs {criteo.CAT_FEATURE_COUNT} values (one per "
                             f"sparse feature), got {len(value)}")
    if args.num_embeddings is not None and args.num_embeddings_per_feature is not None:
        raise ValueError("give --num_embeddings or --num_embeddings_per_feature, not both")
    if args.data is not None and args.in_memory_binary_criteo_path is not None:
        raise ValueError("give --data or --in_memory_binary_criteo_path, not both")
    if args.in_memory_binary_criteo_path is not None:
        # Names what is missing; the values are checked (per rank) before the model is built.
        criteo.binary_criteo_paths(args.in_memory_binary_criteo_path, args.dataset_name)
    elif (args.mmap_mode or args.shuffle_batches or args.drop_last_training_batch
          or args.dataset_name != criteo.BINARY_DATASET_NAMES[0]):
        raise ValueError("--mmap_mode / --shuffle_batches / --drop_last_training_batch / "
                         "--dataset_name apply to --in_memory_binary_criteo_path")
    if args.multi_hot_sizes is not None and (args.data or args.in_memory_binary_criteo_path):
        raise ValueError("--multi_hot_sizes: multi-hot features are synthetic only; real "
                         "Criteo rows have one id per feature")
    if args.resume and not args.resume_if_present:
        models = [name for name in MODELS_OF_MODE[args.mode]
                  if os.path.exists(os.path.join(_ckpt_dir(args, name), "latest"))]
        if not models:
            raise ValueError(f"--resume: no checkpoint under {os.path.join(args.out, 'checkpoint')}"
                             " (--resume_if_present starts from step 0 when there is none)")
    args.resume = args.resume or args.resume_if_present


def resolve_steps(args: argparse.Namespace, batches_per_epoch: int | None) -> int:
    """Total steps: --steps, else --epochs x batches per epoch (--limit_train_batches, capped by
    one pass over real data; 1000 for synthetic data)."""
    if args.steps is not None:
        return int(args.steps)
    per_epoch = args.limit_train_batches or batches_per_epoch or 1000
    if batches_per_epoch is not None:
        per_epoch = min(per_epoch, batches_per_epoch)
    return args.epochs * per_epoch


# ------------------------------------------------------------------------------ data


# Rows of synthetic batches made per generator call (its temporaries are a few KB per row).
SYNTHETIC_ROWS_PER_CALL = 131_072


@dataclass
class Data:
    """Train batches from a step on, and the test batches of this rank."""

    cardinalities: list[int]
    synthetic: DeviceSyntheticCriteo | None = None
    train: criteo.CriteoArrays | None = None
    test: criteo.CriteoArrays | None = None
    #: --in_memory_binary_criteo_path: TorchRec's pipes by stage ("train", "val", "test").
    binary: dict[str, Any] | None = None
    description: str = ""

    def batches_per_epoch(self, args: argparse.Namespace, world: int) -> int | None:
        """Local batches in one pass over the real training rows (None: synthetic, endless)."""
        if self.binary is not None:
            return len(self.binary["train"])
        if self.train is None:
            return None
        return len(self.train) // (args.batch_size * world)

    def train_batches(self, args: argparse.Namespace, rank: int, world: int,
                      start: int) -> Iterator[Batch]:
        """Synthetic batches are made on the training device; real ones on the host (pinned
        with --pin_memory), for the pipeline to copy."""
        if self.synthetic is not None:
            # Several batches per call (up to 131,072 rows): the same batches, fewer launches.
            per_call = max(1, SYNTHETIC_ROWS_PER_CALL // args.batch_size)
            for first in itertools.count(start, per_call):
                indices = [step * world + rank for step in range(first, first + per_call)]
                yield from self.synthetic.batches(args.batch_size, 0, indices)
        elif self.binary is not None:
            # TorchRec's pipe in a DataLoader, epoch after epoch, as dlrm_main.py reads it.
            # Resuming reads (and drops) the batches before ``start``, so that the pipe's
            # shuffling RNG is where it was.
            loader = DataLoader(self.binary["train"], batch_size=None, collate_fn=lambda b: b,
                                pin_memory=args.pin_memory and torch.cuda.is_available())
            for i, batch in enumerate(itertools.chain.from_iterable(itertools.repeat(loader))):
                if i >= start:
                    yield batch
        else:
            assert self.train is not None
            for batch in self.train.batches(args.batch_size, rank, world, start, args.seed):
                yield batch.pin_memory() if args.pin_memory else batch

    def test_batches(self, args: argparse.Namespace, rank: int, world: int,
                     final: bool = True) -> Iterator[Batch]:
        """Evaluation batches of this rank (binary layout: the ``"val"`` pipe, the ``"test"`` one
        for the ``final`` evaluation)."""
        if self.binary is not None:
            yield from self.binary["test" if final else "val"]
            return
        if self.synthetic is not None:
            per_rank = math.ceil(args.eval_samples / world)
            blocks = math.ceil(per_rank / args.test_batch_size)
            for i in range(blocks):
                n = min(args.test_batch_size, per_rank - i * args.test_batch_size)
                yield self.synthetic.batch(n, 1, rank * blocks + i)
        else:
            assert self.test is not None
            yield from self.test.eval_batches(args.test_batch_size, rank, world)


def cardinalities(args: argparse.Namespace) -> list[int]:
    """Table sizes: --num_embeddings(_per_feature), else the synthetic generator's (--scale) or
    Kaggle's (capped by --max_ind_range)."""
    if args.num_embeddings_per_feature is not None:
        return list(args.num_embeddings_per_feature)
    if args.num_embeddings is not None:
        return [args.num_embeddings] * criteo.CAT_FEATURE_COUNT
    if args.data is None and args.in_memory_binary_criteo_path is None:
        return [max(2, int(round(n * args.scale))) for n in criteo.KAGGLE_CARDINALITIES]
    cards = list(criteo.KAGGLE_CARDINALITIES)
    if args.max_ind_range > 0:
        cards = [min(c, args.max_ind_range) for c in cards]
    return cards


def load_data(args: argparse.Namespace, rank: int, device: torch.device) -> Data:
    cards = cardinalities(args)
    if args.in_memory_binary_criteo_path is not None:
        return load_binary(args, cards, rank, dist.get_world_size())
    if args.data is None:
        model = criteo.SyntheticCriteo(scale=args.scale, seed=args.seed, num_embeddings=cards)
        syn = DeviceSyntheticCriteo(model, args.multi_hot_sizes,
                                    args.multi_hot_distribution_type, device=device)
        hot = ("one id per feature" if args.multi_hot_sizes is None else
               f"multi-hot {sum(args.multi_hot_sizes)} ids/sample "
               f"({args.multi_hot_distribution_type})")
        return Data(cards, synthetic=syn,
                    description=f"synthetic Criteo (scale {args.scale}, seed {args.seed}, "
                    f"{hot}, made on {device.type})")
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


def load_binary(args: argparse.Namespace, cards: list[int], rank: int, world: int) -> Data:
    """TorchRec's in-memory binary layout (``--in_memory_binary_criteo_path``, ``--dataset_name``),
    each file triple checked first (``criteo.load_criteo_npys``: shapes, row counts, labels,
    finite dense values, ids), then read by ``InMemoryBinaryCriteoIterDataPipe``."""
    folder, name = args.in_memory_binary_criteo_path, args.dataset_name
    files = criteo.binary_criteo_paths(folder, name)
    for triple in files:
        criteo.load_criteo_npys(folder, cards, paths=triple)
    # The evaluation rows: the second half of the last file (the pipe's "test" stage).
    last = len(np.load(files[-1]["labels"], mmap_mode="r"))
    if last < 2:
        raise criteo.CriteoFormatError(
            f"{files[-1]['labels']}: {last} row; validation and test need at least 2 (each takes "
            "a half)")

    def pipe(stage: str, batch_size: int, **kw: Any) -> Any:
        return criteo.binary_criteo_pipe(files, stage, batch_size, rank, world, cards,
                                         seed=args.seed, mmap_mode=args.mmap_mode,
                                         dataset_name=name, **kw)

    # Each pipe seeds numpy's global RNG when built: the training pipe comes last, so that its
    # --shuffle_batches order depends on --seed only.
    pipes = {"val": pipe("val", args.test_batch_size)}
    # criteo_kaggle validates and tests on the same rows: one pipe (one copy in memory).
    pipes["test"] = pipes["val"] if name == "criteo_kaggle" else pipe("test", args.test_batch_size)
    pipes["train"] = pipe("train", args.batch_size, shuffle_batches=args.shuffle_batches,
                          drop_last=args.drop_last_training_batch)
    how = (f"TorchRec's InMemoryBinaryCriteoIterDataPipe{', mmap' if args.mmap_mode else ''}"
           f"{', shuffled batches' if args.shuffle_batches else ''}")
    if name == "criteo_kaggle":
        where = (f"{name} train file ({how}): all {last} rows trained on, "
                 f"{len(pipes['train'])} batches/rank; validation = test = its last {last // 2} "
                 "rows (dlrm_main.py's split: also trained on)")
    else:
        where = (f"{len(files)} days ({how}): train days 0-{len(files) - 2}, "
                 f"{len(pipes['train'])} batches/rank; validation {(last + 1) // 2} / test "
                 f"{last // 2} rows of day {len(files) - 1}")
    return Data(cards, binary=pipes, description=f"{folder}: {where}")


# ------------------------------------------------------------------------------ model


def table_configs(args: argparse.Namespace, cardinalities: list[int],
                  tt: bool) -> list[EmbeddingBagConfig]:
    configs = [
        EmbeddingBagConfig(name=f"t_{f}", embedding_dim=args.embedding_dim, num_embeddings=n,
                           feature_names=[f])
        for f, n in zip(criteo.DEFAULT_CAT_NAMES, cardinalities)
    ]
    if tt:
        configs = tt_configs(args, configs)
    if args.mlet_inner_dim:
        configs = swap_to_mlet(configs, inner_dim=args.mlet_inner_dim,
                               init_scale=args.mlet_init_scale)
    return configs


def tt_configs(args: argparse.Namespace,
               configs: list[EmbeddingBagConfig]) -> list[EmbeddingBagConfig]:
    common = {"ranks": args.tt_rank, "num_cores": args.tt_cores,
              "cache_fraction": args.tt_cache_fraction}
    if args.tt_budget_bytes is not None:
        policy = TTPolicy(memory_budget_bytes=int(args.tt_budget_bytes), **common)
    elif args.tt_min_rows is not None:
        policy = TTPolicy(min_rows=args.tt_min_rows, **common)
    else:
        policy = TTPolicy(largest=args.tt_tables, **common)
    return [
        replace(c, tt_cache_refresh_steps=args.tt_cache_refresh_steps)
        if isinstance(c, TTEmbeddingBagConfig) and c.tt_cache_rows > 0 else c
        for c in swap_configs(configs, policy)
    ]


def build(args: argparse.Namespace, data: Data, tt: bool, device: torch.device,
          pg: dist.ProcessGroup, configs: list[EmbeddingBagConfig] | None = None,
          fuse_tt: bool = True,
          ) -> tuple[DistributedModelParallel, CombinedOptimizer, HybridEmbeddingBagCollection]:
    """The sharded model and its optimizers; ``configs`` overrides the tables (the collapsed
    model of an MLET run); ``fuse_tt=False`` leaves the TT cores without their fused optimizer
    (a model that is only evaluated: no TT optimizer state in its state dict)."""
    torch.manual_seed(args.seed)
    if configs is None:
        configs = table_configs(args, data.cardinalities, tt)
    ebc = HybridEmbeddingBagCollection(configs, device=torch.device("meta"))
    model = DLRMTrain(use_flat_interaction(DLRM(
        embedding_bag_collection=ebc, dense_in_features=criteo.INT_FEATURE_COUNT,
        dense_arch_layer_sizes=args.dense_arch_layer_sizes,
        over_arch_layer_sizes=args.over_arch_layer_sizes, dense_device=device)))
    if ebc.ebc is not None:  # plain tables: TorchRec's fused row-wise Adagrad in the backward
        apply_optimizer_in_backward(RowWiseAdagrad, ebc.ebc.parameters(),
                                    {"lr": args.embedding_learning_rate})
    if ebc.mlet is not None and ebc.mlet.ebc is not None:  # MLET's wide plain tables: the same
        scale = args.mlet_embedding_lr_scale
        if scale is None:
            scale = mlet_rowwise_lr_scale(ebc.mlet.embedding_bag_configs()[0])
        apply_optimizer_in_backward(RowWiseAdagrad, ebc.mlet.ebc.parameters(),
                                    {"lr": args.embedding_learning_rate * scale})
    # TT cores (MLET's TT tables too): Adagrad fused into the lookup's backward by the TT sharder
    # (torch.optim.Adagrad's arithmetic and eps; skip_non_finite from its fused_params), as the
    # plain tables' row-wise Adagrad is: no DDP of the data-parallel TT tables and no optimizer
    # step of their own, which on a GPU, where the step is bound by host launch time, counts
    # (docs/benchmarks.md, "One-GPU step time").
    for tt_child in (ebc.tt, ebc.mlet.tt if ebc.mlet is not None else None):
        if tt_child is not None and fuse_tt:
            apply_optimizer_in_backward(torch.optim.Adagrad, tt_child.parameters(),
                                        {"lr": args.tt_learning_rate, "eps": 1e-10})
    registries, policy = comms_registries(args, device, pg)
    sharders: list[Any] = [
        TTEmbeddingBagCollectionSharder(
            qcomm_codecs_registry=registries[0],
            fused_params={"skip_non_finite": not args.no_skip_non_finite} if fuse_tt else None),
        EmbeddingBagCollectionSharder(qcomm_codecs_registry=registries[1]),
    ]
    world = dist.get_world_size(pg)
    topology = Topology(world_size=world, compute_device=device.type,
                        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    constraints = None
    if args.multi_hot_sizes is not None:  # the planner prices lookups by the pooling factor
        constraints = {f"t_{f}": ParameterConstraints(pooling_factors=[float(n)])
                       for f, n in zip(criteo.DEFAULT_CAT_NAMES, args.multi_hot_sizes)}
    sharding_plan = plan_without_dp_spec_warnings(
        model, topology, batch_size=args.batch_size, constraints=constraints, sharders=sharders,
        optimizer_multiplier=1.0, pg=pg)
    dmp = DistributedModelParallel(model, env=ShardingEnv.from_process_group(pg), device=device,
                                   plan=sharding_plan, sharders=sharders)
    dmp.lossy_policy = policy  # stepped by train_one, saved with the checkpoints
    params = dict(in_backward_optimizer_filter(dmp.named_parameters()))  # no fused tables
    projections = {k: v for k, v in params.items()  # MLET's (dense), with their own lr
                   if ".embedding_bag_collection.mlet.projections." in k}
    dense_params = {k: v for k, v in params.items() if k not in projections}
    dense_optim = torch.optim.SGD if args.optimizer == "sgd" else torch.optim.Adagrad
    optims: list[Any] = [
        dmp.fused_optimizer,
        KeyedOptimizerWrapper(dense_params, lambda p: dense_optim(p, lr=args.learning_rate)),
    ]
    if projections:
        mlet_lr = args.mlet_learning_rate or args.learning_rate
        optims.append(KeyedOptimizerWrapper(projections,
                                            lambda p: dense_optim(p, lr=mlet_lr)))
    return dmp, CombinedOptimizer(optims), ebc


def comms_registries(args: argparse.Namespace, device: torch.device, pg: dist.ProcessGroup
                     ) -> tuple[tuple[Any, Any], ErrorBoundPolicy | None]:
    """qcomms registries for the TT and the plain sharder (--lossy_comms / --qcomms), and the
    lossy policy (None without --lossy_comms).

    Lossy comms: one policy (bound BOUND tightening to --lossy_comms_final over the run, per
    table from statistics all-reduced over ``pg``), one registry per sharder (each keeps the
    layouts of its own all-to-alls), groups of one feature (``block_dim`` = embedding dim)."""
    if args.lossy_comms is not None:
        policy = ErrorBoundPolicy(args.lossy_comms, args.lossy_comms_final,
                                  decay_steps=int(args.steps or 0), process_group=pg)
        return tuple(error_bounded_qcomm_codecs(policy=policy, block_dim=args.embedding_dim)
                     for _ in range(2)), policy  # type: ignore[return-value]
    if args.qcomms is not None:
        precision = CommType(args.qcomms)
        registry = get_qcomm_codecs_registry(
            QCommsConfig(forward_precision=precision, backward_precision=precision),
            comm_ops=[CommOp.POOLED_EMBEDDINGS_ALL_TO_ALL], device=device)
        return (registry, registry), None
    return (None, None), None


class _MissingSpecOfDataParallel(logging.Filter):
    """Drops TorchRec's "Sharding spec not found" warning (planners.validate_rank_assignment,
    torchrec 1.6.1), which it logs for every data-parallel table: those have no sharding spec
    by design. ``plan_without_dp_spec_warnings`` checks the other tables itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Sharding spec not found for ")


def plan_without_dp_spec_warnings(model: torch.nn.Module, topology: Topology,
                                  **kwargs: Any) -> ShardingPlan:
    """``torchrec_tt.sharding.plan`` without the false warning per data-parallel table; a
    sharded table without a spec still warns."""
    quiet = _MissingSpecOfDataParallel()
    root = logging.getLogger()
    root.addFilter(quiet)
    try:
        sharding_plan = tt_plan(model, topology, **kwargs)
    finally:
        root.removeFilter(quiet)
    for module, module_plan in sharding_plan.plan.items():
        for table, ps in module_plan.items():  # type: ignore[union-attr]
            if ps.sharding_spec is None and ps.sharding_type != ShardingType.DATA_PARALLEL.value:
                warnings.warn(f"{module}.{table}: {ps.sharding_type} plan without a sharding spec")
    return sharding_plan


def plan_summary(dmp: DistributedModelParallel) -> dict[str, str]:
    return {table: f"{ps.sharding_type}{list(ps.ranks) if ps.ranks else ''}"
            for module_plan in dmp.plan.plan.values()
            for table, ps in module_plan.items()}  # type: ignore[union-attr]


# ------------------------------------------------------------------------------ evaluation


def detach_pipeline(pipeline: TrainPipelineSparseDist | None,
                    dmp: DistributedModelParallel) -> None:
    """Restores the plain forwards (the next ``progress`` re-attaches, keeping in-flight batches).

    ``TrainPipelineSparseDist.detach`` puts pipelined postproc modules back with
    ``setattr(model, fqn, ...)``, which is wrong for a nested fqn (torchrec 1.6.1): the pipelined
    wrapper stays in place. Put the original module back at its real parent. (The hybrid
    collection has no postproc module any more; this keeps models that do have one working.)
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


class EvalMetrics:
    """Test NE, AUC, calibration and log-loss with ``torchrec.metrics`` (NEMetric, AUCMetric,
    CalibrationMetric: states on the device, gathered over the process group at ``compute``).

    NE is the log-loss divided by the entropy of the label rate ``p``:
    ``-(p log p + (1 - p) log(1 - p))``; calibration is the sum of predicted click
    probabilities over the number of clicks.
    """

    TASK = "ctr"

    def __init__(self, world: int, rank: int, batch_size: int, device: torch.device,
                 pg: dist.ProcessGroup | None = None) -> None:
        task = RecTaskInfo(name=self.TASK)
        kw: dict[str, Any] = dict(world_size=world, my_rank=rank, batch_size=batch_size,
                                  tasks=[task], window_size=2**40, compute_on_all_ranks=True,
                                  process_group=pg)
        self.metrics = [NEMetric(include_logloss=True, **kw).to(device),
                        AUCMetric(**kw).to(device), CalibrationMetric(**kw).to(device)]

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        predictions = {self.TASK: torch.sigmoid(logits.float())}
        targets = {self.TASK: labels.float()}
        weights = {self.TASK: torch.ones_like(predictions[self.TASK])}
        for metric in self.metrics:
            metric.update(predictions=predictions, labels=targets, weights=weights)

    def compute(self) -> dict[str, float]:
        out: dict[str, torch.Tensor] = {}
        for metric in self.metrics:
            out.update(metric.compute())
        t = self.TASK
        keys = {"auc": f"auc-{t}|window_auc", "ne": f"ne-{t}|lifetime_ne",
                "logloss": f"ne-{t}|lifetime_logloss",
                "calibration": f"calibration-{t}|lifetime_calibration"}
        values = {name: float(out[key]) for name, key in keys.items()}
        # torchrec.metrics' cross entropy is in bits (log2); report nats, as torch's BCE loss.
        values["logloss"] *= math.log(2)
        return values


@torch.no_grad()
def evaluate(dmp: DistributedModelParallel, data: Data, args: argparse.Namespace, rank: int,
             world: int, device: torch.device, pg: dist.ProcessGroup,
             final: bool = True) -> dict[str, float]:
    """Test metrics (:class:`EvalMetrics`) over all ranks' test rows (binary layout: its
    validation rows unless ``final``)."""
    metrics = EvalMetrics(world, rank, args.test_batch_size, device, pg)
    was_training = dmp.training
    dmp.eval()
    for batch in data.test_batches(args, rank, world, final):
        batch = batch.to(device, non_blocking=True)
        _, (_, logits, labels) = dmp(batch)
        metrics.update(logits, labels)
    dmp.train(was_training)
    return metrics.compute()


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
        policy = getattr(dmp, "lossy_policy", None)
        if policy is not None:  # the same on every rank: rank 0 writes it
            with open(os.path.join(path, "lossy_policy.json"), "w") as f:
                json.dump(policy.state_dict(), f)
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
    policy = getattr(dmp, "lossy_policy", None)
    if policy is not None:
        policy_file = os.path.join(path, "lossy_policy.json")
        if not os.path.exists(policy_file):
            raise ValueError(f"--lossy_comms: the checkpoint {path} has no lossy_policy.json "
                             "(it was saved without --lossy_comms)")
        with open(policy_file) as f:
            policy.load_state_dict(json.load(f))
    return int(state["trainer"]["step"]), history


# ------------------------------------------------------------------------------ training


@dataclass
class RunResult:
    name: str
    embedding_bytes: float
    dense_bytes: float
    compression: float
    tt_tables: int
    inference_bytes: float = float("nan")
    mlet_inner_dim: int = 0
    collapsed: dict[str, float] = field(default_factory=dict)
    auc: float = float("nan")
    ne: float = float("nan")
    logloss: float = float("nan")
    calibration: float = float("nan")
    step_ms: float = float("nan")
    samples_per_s: float = float("nan")
    peak_mib: float = float("nan")
    steps: int = 0
    stopped: bool = False
    a2a_bytes_per_step: float = float("nan")
    pooled_a2a_bytes_per_step: float = float("nan")
    plan: dict[str, str] = field(default_factory=dict)
    pipelined: list[str] = field(default_factory=list)
    #: TT tables' updates dropped by skip_non_finite (NaN/inf gradients), over the whole run.
    skipped_steps: dict[str, int] = field(default_factory=dict)


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux


class LossLog:
    """Per-step losses kept on the device and read back every ``--log_every`` steps (and before
    evaluations and checkpoints), averaged over ranks in one all-reduce per read.

    Step time is measured over the same windows: wall time from the end of one read (or of an
    evaluation/checkpoint) to the next read, after a device synchronisation, over the steps in
    between; the first window (warm-up) is left out when there are others.
    """

    def __init__(self, device: torch.device, pg: dist.ProcessGroup, world: int) -> None:
        self.device, self.pg, self.world = device, pg, world
        self.pending: list[torch.Tensor] = []
        self.windows: list[tuple[int, float]] = []
        self.restart_clock()

    def restart_clock(self) -> None:
        self.t0 = time.perf_counter()

    def add(self, loss: torch.Tensor) -> None:
        self.pending.append(loss.detach().reshape(()))

    def read(self) -> list[float]:
        """The mean-over-ranks losses of the steps since the last read (a host sync)."""
        if not self.pending:
            return []
        losses = torch.stack(self.pending).to(torch.float64)
        dist.all_reduce(losses, group=self.pg)
        values = (losses / self.world).tolist()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.windows.append((len(values), time.perf_counter() - self.t0))
        self.pending.clear()
        self.restart_clock()
        return values

    def step_seconds(self) -> float:
        windows = self.windows[1:] or self.windows
        steps = sum(n for n, _ in windows)
        return sum(t for _, t in windows) / steps if steps else float("nan")


def skipped_steps(dmp: DistributedModelParallel, pg: dist.ProcessGroup, device: torch.device,
                  history: dict[str, Any]) -> dict[str, int]:
    """TT updates skipped per table so far (this run's counts, which only the ranks holding a
    table keep, maxed over ranks; plus a resumed run's earlier ones). Reads the device."""
    counts = tt_skipped_steps(dmp.fused_optimizer)
    tables = sorted(counts)
    now = torch.tensor([counts[t] for t in tables], dtype=torch.int64, device=device)
    if tables:
        dist.all_reduce(now, op=dist.ReduceOp.MAX, group=pg)
    before = history.get("skipped_steps_resumed", {})
    return {t: int(n) + int(before.get(t, 0)) for t, n in zip(tables, now.tolist())}


def lr_factor(step: int, warmup: int, decay_start: int, decay_steps: int) -> float:
    """The learning-rate multiplier of ``step`` (0-based) under TorchRec dlrm_main.py's LR
    policy: a linear warm-up over ``warmup`` steps, then 1, then from ``decay_start`` a
    polynomial decay (power 2) over ``decay_steps`` steps, held at its last value after it (at
    least 1e-7 of the base rate)."""
    if step < warmup:
        return (step + 1) / warmup
    if decay_steps > 0 and step >= decay_start:
        done = min(step - decay_start, decay_steps - 1)
        return max(1e-7, ((decay_steps - done) / decay_steps) ** 2)
    return 1.0


class TrainLoop:
    """One training step of ``train_one`` (pipeline or plain forward/backward/step, the comms
    meter, the lossy-comms policy step, the loss kept on the device), apart from its evaluation,
    checkpoint and logging schedule: what bench/bench_step_host.py ``--loop trainer`` counts."""

    def __init__(self, args: argparse.Namespace, dmp: DistributedModelParallel,
                 optimizer: CombinedOptimizer, batches: Iterator[Batch], device: torch.device,
                 pg: dist.ProcessGroup, world: int) -> None:
        self.dmp, self.optimizer, self.batches, self.device = dmp, optimizer, batches, device
        self.pipeline: TrainPipelineSparseDist | None = None
        if not args.no_pipeline:
            self.pipeline = TrainPipelineSparseDist(dmp, optimizer, device,
                                                    execute_all_batches=False,
                                                    pipeline_postproc=True)
        self.log = LossLog(device, pg, world)
        self.meter = CommsMeter()  # all-to-all bytes this rank sends, training steps only
        self.policy = getattr(dmp, "lossy_policy", None)

    def step(self) -> None:
        with self.meter:
            if self.pipeline is not None:
                loss, _, _ = self.pipeline.progress(self.batches)
            else:
                batch = next(self.batches).to(self.device, non_blocking=True)
                self.optimizer.zero_grad()
                loss, _ = self.dmp(batch)
                loss.backward()
                self.optimizer.step()
        if self.policy is not None:
            self.policy.step()  # every rank, same step (may all-reduce the table statistics)
        self.log.add(loss)


def train_one(args: argparse.Namespace, name: str, data: Data, rank: int, world: int,
              device: torch.device, pg: dist.ProcessGroup, writer_factory: Any) -> RunResult:
    dmp, optimizer, ebc = build(args, data, name == "tt", device, pg)
    # Base rates as built (before a checkpoint brings back scaled ones): the schedule sets every
    # group's rate from them and the step, so a resumed run follows it exactly.
    schedule = args.lr_warmup_steps > 0 or args.lr_decay_steps > 0
    base_lrs = [(group, float(group["lr"])) for group in optimizer.param_groups]
    mem = ebc.memory_stats()
    result = RunResult(name, mem["bytes"], mem["dense_bytes"], mem["compression"],
                       int(mem["tt_tables"]), inference_bytes=mem["inference_bytes"],
                       mlet_inner_dim=args.mlet_inner_dim, plan=plan_summary(dmp))
    history: dict[str, Any] = {"loss": [], "eval": [], "samples_per_s": []}
    start = 0
    if args.resume:
        loaded = load_checkpoint(args, name, dmp, optimizer)
        if loaded is not None:
            start, history = loaded
            history.setdefault("samples_per_s", [])
            # The counters start at 0 again; the checkpoint's counts are added to them.
            history["skipped_steps_resumed"] = history.get("skipped_steps", {})
            if rank == 0:
                print(f"[{name}] resumed from step {start}", flush=True)
    eval_every = args.validation_freq_within_epoch or max(1, args.steps // 10)
    writer = writer_factory(name) if rank == 0 else None
    loop = TrainLoop(args, dmp, optimizer, data.train_batches(args, rank, world, start),
                     device, pg, world)
    pipeline, log, meter = loop.pipeline, loop.log, loop.meter
    bar = None
    if rank == 0 and tqdm is not None and not args.no_progress:
        bar = tqdm(total=args.steps, initial=start, desc=name, dynamic_ncols=True,
                   mininterval=2.0, file=sys.stdout)
    samples_per_step = args.batch_size * world

    def read_losses(step: int) -> None:
        losses = log.read()
        if not losses:
            return
        first = step - len(losses) + 1
        history["loss"].extend(losses)
        rate = samples_per_step * log.windows[-1][0] / log.windows[-1][1]
        history["samples_per_s"].append([step, rate])
        if writer is not None:
            for i, value in enumerate(losses):
                writer.add_scalar("train/loss", value, first + i)
            writer.add_scalar("train/samples_per_s", rate, step)
        if bar is not None:
            bar.update(len(losses))
            bar.set_postfix(loss=f"{sum(losses) / len(losses):.4f}", samples_s=f"{rate:,.0f}")

    stop_at = min(args.steps, args.stop_after) if args.stop_after else args.steps
    checkpointing = args.checkpoint_every > 0 or args.stop_after > 0
    dmp.train()
    step = start
    steps_metered = 0
    while step < stop_at:
        if schedule:
            factor = lr_factor(step, args.lr_warmup_steps, args.lr_decay_start,
                               args.lr_decay_steps)
            for group, base in base_lrs:
                group["lr"] = base * factor
        loop.step()
        steps_metered += 1
        step += 1
        if pipeline is not None and not result.pipelined:
            result.pipelined = sorted({type(m).__name__ for m in dmp.modules()
                                       if getattr(m, "is_pipelined", False)})
        evaluating = step % eval_every == 0 or step == args.steps
        saving = checkpointing and (step == stop_at or (args.checkpoint_every > 0
                                                        and step % args.checkpoint_every == 0))
        if step % args.log_every == 0 or evaluating or saving or step == stop_at:
            read_losses(step)
        if evaluating:
            detach_pipeline(pipeline, dmp)  # plain forwards; the next progress() re-attaches
            metrics = evaluate(dmp, data, args, rank, world, device, pg,
                               final=step == args.steps)
            history["eval"].append({"step": step, **metrics})
            if writer is not None:
                for key, value in metrics.items():
                    writer.add_scalar(f"eval/{key}", value, step)
            if rank == 0:
                msg = (f"[{name}] step {step}: loss {history['loss'][-1]:.4f} "
                       f"test auc {metrics['auc']:.4f} ne {metrics['ne']:.4f} "
                       f"logloss {metrics['logloss']:.4f}")
                (bar.write(msg) if bar is not None else print(msg, flush=True))
        if saving:
            detach_pipeline(pipeline, dmp)
            history["skipped_steps"] = skipped_steps(dmp, pg, device, history)
            save_checkpoint(args, name, dmp, optimizer, step, history, rank)
        if evaluating or saving:
            if pipeline is not None and step < stop_at:
                # Re-attach now, not in the next progress(): re-attaching re-runs TorchRec's
                # model rewrite (an fx trace, ~8 steps' worth of host time), a cost of the
                # evaluation or checkpoint, which the step time leaves out.
                pipeline.attach(dmp)
            log.restart_clock()  # step time leaves evaluations and checkpoints out
    if bar is not None:
        bar.close()
    if writer is not None:
        writer.close()
    result.steps = step
    result.stopped = step < args.steps
    result.skipped_steps = skipped_steps(dmp, pg, device, history)
    if rank == 0 and any(result.skipped_steps.values()):
        print(f"[{name}] non-finite TT gradients: updates skipped per table "
              f"{ {t: n for t, n in result.skipped_steps.items() if n} }", flush=True)
    result.step_ms = 1e3 * log.step_seconds()
    result.samples_per_s = samples_per_step / log.step_seconds()
    result.peak_mib = peak_memory_mib(device)
    # Pooled all-to-all bytes: what is not the KJT all-to-all's integer tensors.
    pooled = sum(n for dtype, n in meter.all_to_all_bytes_by_dtype.items()
                 if dtype not in (torch.int64, torch.int32))
    sent = torch.tensor([meter.all_to_all_bytes, pooled], dtype=torch.float64, device=device)
    dist.all_reduce(sent, group=pg)
    per_step = (sent / (world * max(steps_metered, 1))).tolist()
    result.a2a_bytes_per_step, result.pooled_a2a_bytes_per_step = per_step
    if history["eval"]:
        for key in ("auc", "ne", "logloss", "calibration"):
            setattr(result, key, history["eval"][-1][key])
    if ebc.mlet is not None and not result.stopped and not args.mlet_skip_collapse:
        detach_pipeline(pipeline, dmp)
        result.collapsed = evaluate_collapsed(args, name, dmp, ebc, data, rank, world, device,
                                              pg)
        if rank == 0:
            c = result.collapsed
            print(f"[{name}] collapsed to width {args.embedding_dim}: test auc {c['auc']:.4f} "
                  f"logloss {c['logloss']:.4f} (MLET {result.auc:.4f} / {result.logloss:.4f}); "
                  f"max TT-SVD error {c['max_tt_svd_error']:.4f}", flush=True)
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


def evaluate_collapsed(args: argparse.Namespace, name: str, dmp: DistributedModelParallel,
                       ebc: HybridEmbeddingBagCollection, data: Data, rank: int, world: int,
                       device: torch.device, pg: dist.ProcessGroup) -> dict[str, float]:
    """The DCP path from the trained MLET model to the collapsed one: saves the sharded MLET
    model, writes the collapsed checkpoint (``torchrec_tt.mlet.collapse_checkpoint``), builds
    the collapsed model (``d``-wide tables; TT ones at their ranks) on its own plan, loads it and
    evaluates it."""
    src = os.path.join(_ckpt_dir(args, name), "mlet_final")
    dst = os.path.join(_ckpt_dir(args, name), "collapsed")
    dcp.save({"model": dmp.state_dict()}, checkpoint_id=src)
    errors = collapse_checkpoint(src, dst, ebc,
                                 prefix="model.model.sparse_arch.embedding_bag_collection.")
    configs = [collapsed_config(c) for c in ebc.embedding_bag_configs()]
    collapsed, _, _ = build(args, data, False, device, pg, configs=configs, fuse_tt=False)
    state = {"model": collapsed.state_dict()}
    dcp.load(state, checkpoint_id=dst)
    collapsed.load_state_dict(state["model"])
    metrics = evaluate(collapsed, data, args, rank, world, device, pg)
    metrics["max_tt_svd_error"] = max(errors.values(), default=0.0)
    metrics["mean_tt_svd_error"] = sum(errors.values()) / len(errors) if errors else 0.0
    del collapsed
    return metrics


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
        r = h["result"]
        label = (f"TT (rank {args.tt_rank}, {r['compression']:.1f}x smaller)" if name == "tt"
                 else "uncompressed")
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


def environment(device: torch.device) -> dict[str, str]:
    """Library versions, git commit, device and date, for summary.json."""
    from importlib.metadata import PackageNotFoundError, version

    env = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
           "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                      else f"cpu ({os.cpu_count()} cores)"),
           "python": sys.version.split()[0]}
    for pkg in ("torch", "torchrec", "fbgemm-gpu", "fbgemm-gpu-cpu"):
        with contextlib.suppress(PackageNotFoundError):
            env[pkg] = version(pkg)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        env["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    return env


def report(args: argparse.Namespace, results: list[RunResult], data: Data, world: int,
           device: torch.device) -> None:
    print(f"\ndata: {data.description}; {world} process(es), batch {args.batch_size}/process")
    for r in results:
        print(f"plan [{r.name}]: " + ", ".join(f"{t}={s}" for t, s in sorted(r.plan.items())))
    head = (f"{'model':<13} {'TT tables':>9} {'emb bytes':>11} {'compression':>11} "
            f"{'AUC':>7} {'NE':>7} {'log-loss':>8} {'calib':>6} {'step ms':>8} "
            f"{'samples/s':>10} {'peak MiB':>9}")
    print(head)
    print("-" * len(head))
    for r in results:
        print(f"{r.name:<13} {r.tt_tables:>9} {_fmt_bytes(r.embedding_bytes):>11} "
              f"{r.compression:>10.1f}x {r.auc:>7.4f} {r.ne:>7.4f} {r.logloss:>8.4f} "
              f"{r.calibration:>6.3f} {r.step_ms:>8.1f} {r.samples_per_s:>10.0f} "
              f"{r.peak_mib:>9.0f}")
    by = {r.name: r for r in results}
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump({"args": vars(args), "data": data.description, "world_size": world,
                   "environment": environment(device),
                   "results": [r.__dict__ for r in results]}, f, indent=1)
    main = by.get("tt", results[0])
    if main.mlet_inner_dim:
        print(f"MLET k={main.mlet_inner_dim}: " + "; ".join(
            f"{r.name}: trained {_fmt_bytes(r.embedding_bytes)}, inference "
            f"{_fmt_bytes(r.inference_bytes)}, collapsed auc {r.collapsed['auc']:.4f}"
            for r in results if r.collapsed))
    line = (f"summary: model={main.name} steps={main.steps} auc={main.auc:.4f} "
            f"ne={main.ne:.4f} logloss={main.logloss:.4f} compression={main.compression:.1f}x "
            f"emb_bytes={main.embedding_bytes:.0f} step_ms={main.step_ms:.1f} "
            f"samples_per_s={main.samples_per_s:.0f} "
            f"a2a_bytes_per_step={main.a2a_bytes_per_step:.0f} "
            f"pooled_bytes_per_step={main.pooled_a2a_bytes_per_step:.0f} "
            f"skipped_tt_updates={sum(main.skipped_steps.values())}")
    if "tt" in by and "uncompressed" in by:
        base = by["uncompressed"]
        line += (f" auc_uncompressed={base.auc:.4f} auc_delta={main.auc - base.auc:+.4f} "
                 f"ne_uncompressed={base.ne:.4f} step_ms_uncompressed={base.step_ms:.1f}")
    if main.collapsed:
        line += (f" inference_bytes={main.inference_bytes:.0f}"
                 f" auc_collapsed={main.collapsed['auc']:.4f}")
    print(line, flush=True)


# ------------------------------------------------------------------------------ processes


def _quiet() -> None:
    # Known, harmless noise from the pinned torch/torchrec/fbgemm stack.
    warnings.filterwarnings("ignore", message=".*an autograd kernel was not registered.*")
    warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*is_fx_tracing will return true.*")
    warnings.filterwarnings("ignore", message=".*_get_pg_default_device.*")
    warnings.filterwarnings("ignore", message=".*Multiple backends are registered.*")
    # DMP's own state dicts are ShardedTensors (torchrec 1.6.1); DCP warns on each.
    warnings.filterwarnings("ignore", message=".*Please use DTensor instead.*",
                            category=FutureWarning)
    logging.getLogger("torchrec.distributed.utils").setLevel(logging.ERROR)
    logging.getLogger("torchrec.distributed.train_pipeline.postproc").setLevel(logging.ERROR)
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    # "known issue with TorchRec's dense tensor size calculation in dry run scenarios": the
    # planner runs on the meta-device model by design; its dense estimate only sizes the HBM
    # reservation, which does not bind for these models.
    logging.getLogger("torchrec.distributed.planner.storage_reservations").setLevel(logging.ERROR)


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
        data = load_data(args, rank, device)
        args.steps = resolve_steps(args, data.batches_per_epoch(args, world))
        results = []
        writer_factory = _writer_factory(args) if rank == 0 else (lambda name: None)
        if rank == 0:
            os.makedirs(args.out, exist_ok=True)
        for name in MODELS_OF_MODE[args.mode]:
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
            report(args, results, data, world, device)
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
