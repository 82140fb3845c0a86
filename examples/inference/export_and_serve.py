"""Inference with TT tables, TorchRec's way: train -> fx trace -> TorchScript / torch.export ->
quantize -> serve, checking each step against the trained model.

The model is the DLRM trainer's (``examples/dlrm/train.py``: its flags build the tables, the TT
policy and the layers), trained here in one process, unsharded, on the trainer's synthetic
Criteo data (or, with the trainer's ``--data``, on real Criteo rows). Then:

1. ``torchrec.fx.symbolic_trace`` + ``torch.jit.script`` (saved with ``torch.jit.save`` and loaded
   back) and ``torch.export`` (saved with ``torch.export.save`` and loaded back), outputs compared
   with the trained model;
2. ``torchrec_tt.inference.quantize_embeddings`` at fp16 and int8: plain tables through TorchRec,
   TT tables per the rule of ``torchrec_tt.inference`` (small ones materialised into TorchRec's
   quantized dense tables, the others kept as fp16 / row-wise int8 cores), then traced and
   scripted too; embedding bytes, the largest logit difference and the test AUC are reported.

A loaded model needs ``import torchrec_tt`` first (it registers the ``torchrec_tt`` operators).

    python examples/inference/export_and_serve.py --scale 0.05 --steps 400
    python examples/inference/export_and_serve.py --steps 60 --batch_size 256 -- \\
        --data ../shared/data/criteo_kaggle_sample.tsv.gz     # the real Kaggle sample
    python examples/inference/export_and_serve.py --help
"""

import argparse
import importlib.util
import itertools
import json
import os
import sys
import time
import warnings
from typing import Any, Callable, Iterator

import torch
import torchrec.fx
from torchmetrics.functional.classification import binary_auroc
from torchrec.models.dlrm import DLRM, DLRMTrain
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import torchrec_tt  # noqa: F401  (registers the torchrec_tt operators, also for loaded models)
from torchrec_tt import criteo
from torchrec_tt.inference import (
    DEFAULT_MATERIALIZE_MAX_BYTES,
    kjt_dynamic_shapes,
    quantize_embeddings,
)
from torchrec_tt.swap import HybridEmbeddingBagCollection
from torchrec_tt.synthetic import DeviceSyntheticCriteo

HERE = os.path.dirname(os.path.abspath(__file__))


def _trainer() -> Any:
    """examples/dlrm/train.py as a module (its flags and table configs)."""
    path = os.path.join(HERE, "..", "dlrm", "train.py")
    if "dlrm_train" in sys.modules:
        return sys.modules["dlrm_train"]
    spec = importlib.util.spec_from_file_location("dlrm_train", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["dlrm_train"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, argparse.Namespace]:
    """This script's flags, and the trainer's (model and data flags after ``--``, e.g.
    ``-- --tt_rank 16 --embedding_dim 32``; ``--scale``, ``--steps``, ``--batch_size`` and
    ``--seed`` are passed on)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--scale", type=float, default=0.05, help="synthetic table sizes (x Kaggle)")
    ap.add_argument("--steps", type=int, default=400, help="training steps")
    ap.add_argument("--batch_size", type=int, default=512)
    ap.add_argument("--eval_samples", type=int, default=32768, help="synthetic test rows")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--materialize_max_bytes", type=int, default=DEFAULT_MATERIALIZE_MAX_BYTES,
                    help="TT tables whose quantized dense form fits are materialised")
    ap.add_argument("--out", default="runs/inference", help="saved models and summary.json")
    ap.add_argument("--no_export", action="store_true",
                    help="skip torch.export (about 20 s for the 26-table model on 2 cores)")
    ap.add_argument("trainer_args", nargs="*", help="flags of examples/dlrm/train.py (after --)")
    args = ap.parse_args(argv)
    for flag in ("steps", "batch_size", "eval_samples"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    train = _trainer()
    targs = train.parse_args([
        "--scale", str(args.scale), "--steps", str(args.steps), "--batch_size",
        str(args.batch_size), "--seed", str(args.seed), "--device", "cpu", *args.trainer_args,
    ])
    train.validate_args(targs)
    targs.cardinalities = train.cardinalities(targs)
    targs.table_configs = train.table_configs(targs, targs.cardinalities, tt=True)
    return args, targs


class _Logits(torch.nn.Module):
    """DLRM as served: (dense, KJT) -> logits."""

    def __init__(self, dlrm: DLRM) -> None:
        super().__init__()
        self.model = dlrm

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        return self.model(dense_features, sparse_features).squeeze(-1)


def build_and_train(args: argparse.Namespace, targs: argparse.Namespace,
                    train_batches: Iterator[Any]) -> _Logits:
    """The trainer's model, trained unsharded with its optimizers' kinds and learning rates
    (Adagrad: dense layers at --learning_rate, TT cores at --tt_learning_rate, plain tables at
    --embedding_learning_rate)."""
    torch.manual_seed(targs.seed)
    ebc = HybridEmbeddingBagCollection(targs.table_configs)
    dlrm = DLRM(embedding_bag_collection=ebc, dense_in_features=criteo.INT_FEATURE_COUNT,
                dense_arch_layer_sizes=targs.dense_arch_layer_sizes,
                over_arch_layer_sizes=targs.over_arch_layer_sizes)
    train_model = DLRMTrain(dlrm)
    groups = [
        {"params": [p for n, p in dlrm.named_parameters() if "embedding_bag_collection" not in n],
         "lr": targs.learning_rate},
        {"params": list(ebc.tt.parameters()) if ebc.tt is not None else [],
         "lr": targs.tt_learning_rate},
        {"params": list(ebc.ebc.parameters()) if ebc.ebc is not None else [],
         "lr": targs.embedding_learning_rate},
    ]
    optimizer = torch.optim.Adagrad([g for g in groups if g["params"]])
    train_model.train()
    for step in range(args.steps):
        batch = next(train_batches)
        loss, _ = train_model(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model = _Logits(dlrm)
    model.eval()
    return model


def load_batches(args: argparse.Namespace, targs: argparse.Namespace
                 ) -> tuple[Iterator[Any], list[Any], str]:
    """Train batches (endless) and test batches: the trainer's synthetic data, or with the
    trainer's ``--data`` a Criteo TSV / ``.npy`` folder split by ``--split_seed``."""
    if targs.data is None:
        syn = criteo.SyntheticCriteo(scale=targs.scale, seed=targs.seed,
                                     num_embeddings=targs.cardinalities)
        data = DeviceSyntheticCriteo(syn, None, "pareto", device=torch.device("cpu"))
        size = min(4096, args.eval_samples)
        test = [data.batch(min(size, args.eval_samples - i), 1, i // size)
                for i in range(0, args.eval_samples, size)]
        train = (data.batch(args.batch_size, 0, step) for step in itertools.count())
        return train, test, f"synthetic Criteo, scale {targs.scale}"
    folder = targs.data
    if not os.path.isdir(folder):
        folder = criteo.preprocess_criteo_tsv(targs.data, targs.cache_dir)
    rows = criteo.load_criteo_npys(folder, targs.cardinalities)
    train_rows, test_rows = rows.split(targs.test_fraction, targs.split_seed)
    test = list(test_rows.eval_batches(4096))
    train = train_rows.batches(args.batch_size, 0, 1, 0, targs.seed)
    return train, test, (f"{targs.data}: {len(train_rows)} train / {len(test_rows)} test rows "
                         f"(split seed {targs.split_seed})")


@torch.no_grad()
def evaluate(fn: Callable[..., torch.Tensor], batches: list[Any]) -> tuple[torch.Tensor, float]:
    """Logits of every test row and the AUC."""
    logits = torch.cat([fn(b.dense_features, b.sparse_features).reshape(-1) for b in batches])
    labels = torch.cat([b.labels for b in batches]).to(torch.int64)
    return logits, float(binary_auroc(logits, labels))


def embedding_bytes(model: torch.nn.Module) -> int:
    """Bytes of the embedding weights (parameters and buffers of the sparse arch)."""
    ebc = model.get_submodule("model.sparse_arch.embedding_bag_collection")
    tensors = {id(t): t for t in [*ebc.parameters(), *ebc.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def tt_bytes(model: torch.nn.Module) -> int:
    """Bytes of the TT tables (float cores, or quantized cores and materialised rows)."""
    tt = model.get_submodule("model.sparse_arch.embedding_bag_collection.tt")
    return sum(t.numel() * t.element_size() for t in [*tt.parameters(), *tt.buffers()])


def _script_roundtrip(model: torch.nn.Module, path: str) -> torch.jit.ScriptModule:
    """fx trace -> TorchScript -> saved -> loaded."""
    scripted = torch.jit.script(torchrec.fx.symbolic_trace(model))
    torch.jit.save(scripted, path)
    return torch.jit.load(path)


def _export_roundtrip(model: torch.nn.Module, example: Any, path: str) -> Callable[..., Any]:
    """torch.export -> saved -> loaded; the unlifted module runs it."""
    kjt = example.sparse_features
    shapes = ({0: torch.export.Dim.AUTO}, kjt_dynamic_shapes(kjt))  # any batch, any ids
    program = torch.export.export(model, (example.dense_features, kjt), dynamic_shapes=shapes,
                                  strict=False)
    # The example inputs (a KJT) are not saved: torch.export.load reads them with torch.load's
    # weights_only mode, which refuses a KJT (and falls back with a broken log message).
    program.example_inputs = None
    torch.export.save(program, path)
    return torch.export.load(path).module()


def run(args: argparse.Namespace, targs: argparse.Namespace) -> dict[str, Any]:
    os.makedirs(args.out, exist_ok=True)
    train_batches, batches, data_description = load_batches(args, targs)
    t0 = time.perf_counter()
    model = build_and_train(args, targs, train_batches)
    train_s = time.perf_counter() - t0
    ref_logits, ref_auc = evaluate(model, batches)
    rows: list[dict[str, Any]] = []

    def record(name: str, fn: Callable[..., torch.Tensor], nbytes: int, tbytes: int) -> None:
        logits, auc = evaluate(fn, batches)
        rows.append({"model": name, "embedding_bytes": nbytes, "tt_bytes": tbytes,
                     "max_abs_logit_diff": float((logits - ref_logits).abs().max()),
                     "auc": auc, "auc_change": auc - ref_auc})

    fp32_bytes, fp32_tt = embedding_bytes(model), tt_bytes(model)
    rows.append({"model": "trained (eager, fp32)", "embedding_bytes": fp32_bytes,
                 "tt_bytes": fp32_tt,
                 "max_abs_logit_diff": 0.0, "auc": ref_auc, "auc_change": 0.0})
    record("fx + TorchScript (saved, loaded)",
           _script_roundtrip(model, os.path.join(args.out, "model_fp32.pt")), fp32_bytes, fp32_tt)
    if not args.no_export:
        record("torch.export (saved, loaded)",
               _export_roundtrip(model, batches[0], os.path.join(args.out, "model_fp32.pt2")),
               fp32_bytes, fp32_tt)
    modes: dict[str, Any] = {}
    for label, dtype in (("fp16", torch.float16), ("int8", torch.qint8)):
        quant = quantize_embeddings(model, dtype=dtype, inplace=False,
                                    materialize_max_bytes=args.materialize_max_bytes)
        tt = quant.get_submodule("model.sparse_arch.embedding_bag_collection.tt")
        modes[label] = {n: {"mode": m["mode"], "dtype": str(m["dtype"]), "bytes": m["bytes"]}
                        for n, m in tt.table_modes().items()}
        nbytes, tbytes = embedding_bytes(quant), tt_bytes(quant)
        record(f"{label} embeddings (eager)", quant, nbytes, tbytes)
        record(f"{label} embeddings, fx + TorchScript (saved, loaded)",
               _script_roundtrip(quant, os.path.join(args.out, f"model_{label}.pt")), nbytes,
               tbytes)
        if any(m["mode"] == "dense" for m in modes[label].values()):
            # The same with every TT table kept as cores, for comparison.
            cores = quantize_embeddings(model, dtype=dtype, inplace=False, materialize_max_bytes=0)
            record(f"{label} embeddings, all TT tables as cores (eager)", cores,
                   embedding_bytes(cores), tt_bytes(cores))
    summary = {"data": data_description, "train_steps": args.steps, "train_seconds": train_s,
               "test_rows": int(ref_logits.numel()), "scale": targs.scale,
               "tt_tables": [c.name for c in targs.table_configs
                             if type(c).__name__ == "TTEmbeddingBagConfig"],
               "rows": rows, "tt_table_modes": modes}
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def report(summary: dict[str, Any]) -> str:
    lines = [summary["data"], f"{'model':<52} {'emb MiB':>9} {'TT MiB':>8} {'max |dlogit|':>13} {'AUC':>7} "
             f"{'dAUC':>8}"]
    for r in summary["rows"]:
        lines.append(f"{r['model']:<52} {r['embedding_bytes'] / 2**20:>9.3f} "
                     f"{r['tt_bytes'] / 2**20:>8.3f} "
                     f"{r['max_abs_logit_diff']:>13.2e} {r['auc']:>7.4f} {r['auc_change']:>+8.4f}")
    for label, modes in summary["tt_table_modes"].items():
        kinds = {}
        for m in modes.values():
            kinds[f"{m['mode']} {m['dtype']}"] = kinds.get(f"{m['mode']} {m['dtype']}", 0) + 1
        lines.append(f"{label}: TT tables " + ", ".join(f"{v} {k}" for k, v in kinds.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args, targs = parse_args(argv)
    with warnings.catch_warnings():
        # TorchRec's non-strict export notes and TorchScript's annotation notes.
        warnings.filterwarnings("ignore", category=UserWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        summary = run(args, targs)
    print(report(summary))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
