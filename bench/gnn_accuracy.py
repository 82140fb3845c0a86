"""Featureless node-classification accuracy, TT vs full table, over seeds: runs
examples/gnn/train.py's ``run`` in this process for every (dataset, config, seed).

    # the grid of docs/benchmarks.md (Cora and CiteSeer, 5 seeds, 200 epochs, one thread)
    nice .venv/bin/python bench/gnn_accuracy.py --datasets cora citeseer --seeds 0 1 2 3 4
    # fewer configs, extra train.py flags after --
    .venv/bin/python bench/gnn_accuracy.py --datasets pubmed --configs full tt-reorder-spectral -- --tt_cores 4

A config is ``full-<init>`` or ``tt[-reorder]-<init>`` (inits: the train.py --init choices).
Appends one JSON line per run to --out and prints a markdown table: test accuracy mean ± sd,
compression (cores; with the node map) and the mean epoch time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "gnn"))
import train  # noqa: E402

DEFAULT_CONFIGS = (
    "full-uniform", "full-orthogonal", "full-spectral",
    "tt-orthogonal", "tt-sampled_gaussian", "tt-spectral", "tt-randomwalk",
    "tt-reorder-orthogonal", "tt-reorder-sampled_gaussian", "tt-reorder-spectral", "tt-reorder-randomwalk",
)


def config_args(config: str) -> list[str]:
    parts = config.split("-")
    if parts[0] not in ("full", "tt") or len(parts) not in (2, 3) or (len(parts) == 3 and parts[1] != "reorder"):
        raise SystemExit(f"config {config!r} is not full-<init> or tt[-reorder]-<init>")
    args = ["--embedding", parts[0], "--init", parts[-1]]
    return args + (["--reorder"] if len(parts) == 3 else [])


def _ms(xs: list[float]) -> str:
    return f"{xs[0]:.4f}" if len(xs) == 1 else f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=["cora", "citeseer"], choices=train.PLANETOID)
    ap.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench" / "gnn_accuracy.jsonl"))
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    a = ap.parse_args(argv[:cut])
    extra = argv[cut + 1 :]
    for c in a.configs:
        config_args(c)  # all configs checked before the first run
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for ds in a.datasets:
        for config in a.configs:
            accs, times = [], []
            for seed in a.seeds:
                args = train.parse_args(["--dataset", ds, "--epochs", str(a.epochs), "--seed", str(seed),
                                         "--threads", "1", *config_args(config), *extra])
                res = train.run(args)
                with out.open("a") as f:
                    f.write(json.dumps({"config": config, "extra": extra, **asdict(res)}) + "\n")
                accs.append(res.test_acc)
                times.append(statistics.mean(res.epoch_time_s))
                print(f"{ds} {config} seed={seed} acc={res.test_acc:.4f}", flush=True)
            rows.append(f"| {ds} | {config} | {_ms(accs)} | {res.compression:.1f}x | "
                        f"{res.compression_with_map:.1f}x | {res.tt_shape} | {statistics.mean(times) * 1e3:.1f} |")
            print(rows[-1], flush=True)
    print("| dataset | config | test acc (mean ± sd) | compression | with node map | TT shape | epoch ms |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
