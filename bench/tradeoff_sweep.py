"""Memory/accuracy trade-off of TT tables: DLRM test AUC and NE against embedding bytes, over TT
ranks x how many of the largest tables are TT (the TT-Rec grid), with the uncompressed model.

    # run (appends to runs/bench/tradeoff/<data>.jsonl; finished points are skipped on a rerun)
    nice .venv/bin/python bench/tradeoff_sweep.py run synthetic real --ranks 8 32 16 64 \\
        --tables 3 5 7
    # markdown tables and the PNG
    .venv/bin/python bench/tradeoff_sweep.py report synthetic real \\
        --png docs/img/tradeoff_auc_ne.png

Each point is one ``examples/dlrm/train.py`` run (``--mode baseline`` for the uncompressed point,
``--mode tt --tt_tables K --tt_rank R`` for the others), evaluated once at the end:

* synthetic: the main job's data and length (``scripts/main.sh``: Kaggle-size tables, 2
  processes x batch 512, 600 steps, 65,536 test rows);
* real: the Criteo Kaggle sample in ../shared/data, one split (split seed 0), 1 process,
  batch 256, one epoch (60 steps), as ``bench/dlrm_accuracy.py real``.

Ranks run in the order given, so a sweep cut short still has complete rows for the first ones.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

from dlrm_accuracy import REAL, ROOT, run as run_train


def _data_args(data: str, seed: int, steps: int | None, cache: Path) -> list[str]:
    if data == "real":
        if not REAL.exists():
            sys.exit(f"real Criteo sample not found at {REAL}")
        n = steps or 60
        return ["--nproc", "1", "--data", str(REAL), "--cache_dir", str(cache), "--steps", str(n),
                "--batch_size", "256", "--seed", str(seed), "--split_seed", "0",
                "--test_fraction", "0.2", "--validation_freq_within_epoch", str(n)]
    n = steps or 600
    return ["--nproc", "2", "--steps", str(n), "--seed", str(seed), "--eval_samples", "65536",
            "--validation_freq_within_epoch", str(n)]


def _key(point: dict) -> tuple[int, int]:
    return int(point["tt_tables"]), int(point["tt_rank"])


def _load(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run(a: argparse.Namespace) -> None:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for data in a.data:
        log = out / f"{data}.jsonl"
        done = {_key(p) for p in _load(log)}
        points = [(0, 0)] + [(k, r) for r in a.ranks for k in a.tables]
        for tables, rank in points:
            if (tables, rank) in done:
                continue
            args = _data_args(data, a.seed, a.steps, out / "cache")
            if tables:
                mode, name = "tt", "tt"
                args += ["--tt_tables", str(tables), "--tt_rank", str(rank)]
            else:
                mode, name = "baseline", "uncompressed"
            t0 = time.perf_counter()
            result = run_train(out / f"{data}-k{tables}-r{rank}", args + a.extra, mode=mode)[name]
            point = {"data": data, "seed": a.seed, "tt_tables": tables, "tt_rank": rank,
                     "wall_s": round(time.perf_counter() - t0, 1),
                     **{k: result[k] for k in ("embedding_bytes", "compression", "auc", "ne",
                                               "logloss", "calibration", "step_ms", "steps")}}
            with open(log, "a") as f:
                f.write(json.dumps(point) + "\n")


def report(a: argparse.Namespace) -> None:
    out = Path(a.out)
    sets = {data: _load(out / f"{data}.jsonl") for data in a.data}
    for data, points in sets.items():
        base = [p for p in points if p["tt_tables"] == 0]
        if not base:
            print(f"{data}: no uncompressed point yet")
            continue
        b = base[-1]
        print(f"\n{data} (seed {b['seed']}, {b['steps']} steps):\n")
        print("| TT tables | rank | embedding bytes | compression | AUC | NE | ΔAUC | ΔNE |"
              " step ms |")
        print("|---|---|---|---|---|---|---|---|---|")
        for p in sorted(points, key=lambda p: (p["tt_tables"], p["tt_rank"])):
            label = ("uncompressed", "–") if p["tt_tables"] == 0 else (p["tt_tables"],
                                                                       p["tt_rank"])
            print(f"| {label[0]} | {label[1]} | {p['embedding_bytes'] / 2**20:,.1f} MiB | "
                  f"{p['compression']:.1f}× | {p['auc']:.4f} | {p['ne']:.4f} | "
                  f"{p['auc'] - b['auc']:+.4f} | {p['ne'] - b['ne']:+.4f} | "
                  f"{p['step_ms']:.1f} |")
    if a.png:
        plot(sets, a.png)


def plot(sets: dict[str, list[dict]], png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {"synthetic": "synthetic default (main job)", "real": "real Criteo Kaggle sample"}
    fig, axes = plt.subplots(2, len(sets), figsize=(5.5 * len(sets), 7.5), squeeze=False)
    for col, (data, points) in enumerate(sets.items()):
        by_tables: dict[int, list[dict]] = defaultdict(list)
        for p in points:
            by_tables[p["tt_tables"]].append(p)
        for row, metric in enumerate(("auc", "ne")):
            ax = axes[row][col]
            for tables, ps in sorted(by_tables.items()):
                if tables == 0:
                    continue
                ps = sorted(ps, key=lambda p: p["embedding_bytes"])
                xs = [p["embedding_bytes"] for p in ps]
                ax.plot(xs, [p[metric] for p in ps], marker="o",
                        label=f"TT, {tables} largest tables")
                for p in ps:
                    ax.annotate(f"R{p['tt_rank']}", (p["embedding_bytes"], p[metric]),
                                textcoords="offset points", xytext=(3, 3), fontsize=7)
            for p in by_tables.get(0, []):
                ax.scatter([p["embedding_bytes"]], [p[metric]], marker="*", s=160, color="k",
                           zorder=3, label="uncompressed")
                ax.axhline(p[metric], color="k", lw=0.6, ls=":")
            ax.set_xscale("log")
            ax.set(xlabel="embedding bytes (all 26 tables)",
                   ylabel="test AUC (higher is better)" if metric == "auc"
                   else "test NE (lower is better)",
                   title=titles.get(data, data))
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=8)
    seeds = sorted({p["seed"] for ps in sets.values() for p in ps})
    fig.suptitle("DLRM, embedding dim 16: accuracy against embedding memory (TT rank R x number "
                 f"of TT tables; seed {', '.join(map(str, seeds))}: differences below ~0.003 AUC "
                 "are within the real sample's seed-to-seed spread)", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    print(f"\nwrote {png}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=("run", "report"))
    ap.add_argument("data", nargs="+", choices=("synthetic", "real"))
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--tables", type=int, nargs="+", default=[3, 5, 7])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None, help="default: 600 synthetic, 60 real")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench" / "tradeoff"))
    ap.add_argument("--png", default=None)
    # More train.py arguments after "--" (argparse would drop them after the positionals).
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    a = ap.parse_args(argv[:cut])
    a.extra = argv[cut + 1:]
    (run if a.command == "run" else report)(a)


if __name__ == "__main__":
    main()
