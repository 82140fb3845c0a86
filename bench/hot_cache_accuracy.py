"""Hot-row cache accuracy (issue 14): TT DLRM with and without ``tt_cache_rows``, against the
uncompressed model, trained unsharded in one process (see torchrec_tt/modules/hot_cache.py; the
sharded collection takes data_parallel and table_wise cached tables since, with the same cache
behaviour, but this script predates that and keeps one process).

    .venv/bin/python bench/hot_cache_accuracy.py --cache_fractions 0 0.05 --seeds 0 1 2 \\
        -- --data ../shared/data/criteo_kaggle_sample.tsv.gz --max_ind_range 100000 \\
           --steps 60 --batch_size 256 --split_seed 0 --test_fraction 0.2

Arguments after ``--`` are examples/dlrm/train.py flags (data, model sizes, learning rates, TT
tables and rank), parsed by its own parser, so the data, split, batches, configs and metrics are
the trainer's. What differs from the trainer: no DistributedModelParallel (one process, no
pipeline); plain tables train with TorchRec's ``RowWiseAdagrad`` as an ordinary optimizer (the
trainer fuses it into the backward: the same update); TT tables with the collection's fused
``EXACT_ADAGRAD`` (``--tt_optimizer``) at ``--tt_learning_rate`` (eps 1e-10, as the trainer's ``torch.optim.Adagrad``),
which also trains the slab and resets a slot's state when its row changes. The cache refreshes
every ``--refresh_steps`` steps. Prints one line per run and mean ± sd per variant; writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torchrec.models.dlrm import DLRM, DLRMTrain
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from torchrec_tt import TTEmbeddingBagConfig, criteo
from torchrec_tt.swap import HybridEmbeddingBagCollection

ROOT = Path(__file__).resolve().parents[1]


def _trainer() -> object:
    spec = importlib.util.spec_from_file_location("dlrm_train", ROOT / "examples" / "dlrm" / "train.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (its dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


def run(tr: object, args: argparse.Namespace, data: object, tt: bool, fraction: float,
        refresh: int, tt_optimizer: str) -> dict[str, float]:
    torch.manual_seed(args.seed)
    configs = tr.table_configs(args, data.cardinalities, tt)  # type: ignore[attr-defined]
    configs = [
        dataclasses.replace(c, tt_cache_rows=int(fraction * c.num_embeddings),
                            tt_cache_refresh_steps=refresh)
        if isinstance(c, TTEmbeddingBagConfig) else c
        for c in configs
    ]
    fused = {"optimizer": tt_optimizer, "learning_rate": args.tt_learning_rate, "eps": 1e-10}
    ebc = HybridEmbeddingBagCollection(configs, tt_fused_params=fused if tt else None)
    model = DLRMTrain(DLRM(embedding_bag_collection=ebc, dense_in_features=criteo.INT_FEATURE_COUNT,
                           dense_arch_layer_sizes=args.dense_arch_layer_sizes,
                           over_arch_layer_sizes=args.over_arch_layer_sizes))
    emb = [p for n, p in model.named_parameters() if ".embedding_bag_collection.ebc." in n]
    tt_ids = {id(p) for p in ebc.tt.parameters()} if ebc.tt is not None else set()
    dense = [p for n, p in model.named_parameters()
             if ".embedding_bag_collection." not in n and id(p) not in tt_ids]
    dense_optim = torch.optim.SGD if args.optimizer == "sgd" else torch.optim.Adagrad
    optims = [dense_optim(dense, lr=args.learning_rate)]
    if emb:
        optims.append(RowWiseAdagrad(emb, lr=args.embedding_learning_rate))
    model.train()
    start = time.perf_counter()
    for step, batch in enumerate(data.train_batches(args, 0, 1, 0)):  # type: ignore[attr-defined]
        if step >= args.steps:
            break
        loss, _ = model(batch)
        loss.backward()
        for o in optims:
            o.step()
            o.zero_grad()
    seconds = time.perf_counter() - start
    metrics = tr.EvalMetrics(1, 0, args.test_batch_size, torch.device("cpu"))  # type: ignore[attr-defined]
    model.eval()
    with torch.no_grad():
        for batch in data.test_batches(args, 0, 1):  # type: ignore[attr-defined]
            _, (_, logits, labels) = model(batch)
            metrics.update(logits, labels)
    out = metrics.compute()
    stats = ebc.memory_stats()
    out["compression"] = float(stats["compression"])
    out["seconds"] = seconds
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--cache_fractions", type=float, nargs="+", default=[0.0, 0.05])
    ap.add_argument("--refresh_steps", type=int, default=10)
    ap.add_argument("--no_baseline", action="store_true", help="skip the uncompressed model")
    ap.add_argument("--tt_optimizer", default="exact_adagrad",
                    help="fused optimizer of the TT cores and slab (an EmbOptimType value)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench" / "hot_cache.json"))
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    a = ap.parse_args(argv[:cut])
    tr = _trainer()
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1)
        results: dict[str, list[dict[str, float]]] = {}
        variants = [] if a.no_baseline else [("uncompressed", False, 0.0)]
        variants += [(f"tt_cache{f:g}", True, f) for f in a.cache_fractions]
        for seed in a.seeds:
            args = tr.parse_args([*argv[cut + 1:], "--seed", str(seed)])  # type: ignore[attr-defined]
            data = tr.load_data(args, 0, torch.device("cpu"))  # type: ignore[attr-defined]
            for name, tt, fraction in variants:
                r = run(tr, args, data, tt, fraction, a.refresh_steps, a.tt_optimizer)
                results.setdefault(name, []).append(r)
                print(f"seed {seed} {name}: auc {r['auc']:.4f} logloss {r['logloss']:.4f} "
                      f"compression {r['compression']:.1f}x ({r['seconds']:.1f} s)", flush=True)
        dist.destroy_process_group()

    def ms(xs: list[float]) -> str:
        return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}" if len(xs) > 1 else f"{xs[0]:.4f}"

    for name, rs in results.items():
        print(f"{name}: AUC {ms([r['auc'] for r in rs])}, log-loss {ms([r['logloss'] for r in rs])}, "
              f"compression {rs[0]['compression']:.1f}x")
    if "uncompressed" in results:
        base = results["uncompressed"]
        for name, rs in results.items():
            if name != "uncompressed":
                print(f"{name} - uncompressed (per seed): AUC "
                      f"{ms([r['auc'] - b['auc'] for r, b in zip(rs, base)])}, log-loss "
                      f"{ms([r['logloss'] - b['logloss'] for r, b in zip(rs, base)])}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"seeds": a.seeds, "results": results}, indent=1))


if __name__ == "__main__":
    main()
