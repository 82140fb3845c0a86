"""MLET accuracy against inference bytes: DLRM at d in --dims, plain (k = 0) and MLET (k = f * d
for f in --factors), uncompressed tables and TT (the 7 largest), over --seeds.

    # real Criteo Kaggle sample (one split; 60 steps x 256 rows), tables capped at 20,000 rows
    nice .venv/bin/python bench/mlet_accuracy.py run real --dims 4 8 16 32 --factors 0 4 8 \\
        --seeds 0 1 2 3 4 -- --max_ind_range 20000
    # synthetic default data at 1% of the Kaggle table sizes, 500 steps x 512 rows
    nice .venv/bin/python bench/mlet_accuracy.py run synthetic --dims 8 16 --seeds 0 1
    # tables (markdown) and the PNG
    .venv/bin/python bench/mlet_accuracy.py report real synthetic --png docs/img/mlet_accuracy.png

Each (data, seed, d, f) is one ``examples/dlrm/train.py --mode compare`` run (TT, then
uncompressed), in this process, one after the other (1 process, 1 thread by default); MLET runs
also evaluate the collapsed model (``--mlet_inner_dim``: DCP checkpoint -> collapse -> load).
Results are appended to ``<out>/<data>.jsonl`` and finished runs are skipped, so an interrupted
sweep resumes. "Inference bytes" are the embedding weights of the collapsed model (what serving
stores); for TT + MLET the report also gives the uncollapsed model (wide TT table and projection).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "criteo_kaggle_sample.tsv.gz"
ENV_OF_RUN = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _train_module():  # type: ignore[no-untyped-def]
    sys.path.insert(0, str(ROOT / "examples" / "dlrm"))
    sys.path.insert(0, str(ROOT))
    import train  # type: ignore[import-not-found]

    return train


def _data_args(data: str, seed: int, steps: int | None) -> list[str]:
    if data == "real":
        if not REAL.exists():
            sys.exit(f"real Criteo sample not found at {REAL}")
        n = steps or 60
        return ["--data", str(REAL), "--steps", str(n), "--batch-size", "256", "--seed",
                str(seed), "--split-seed", "0", "--test-fraction", "0.2", "--eval-every", str(n)]
    n = steps or 500
    return ["--scale", "0.01", "--steps", str(n), "--batch-size", "512", "--seed", str(seed),
            "--eval-samples", "65536", "--eval-every", str(n)]


def run(a: argparse.Namespace) -> None:
    train = _train_module()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / f"{a.data}.jsonl"
    done = set()
    if log.exists():
        for line in log.read_text().splitlines():
            r = json.loads(line)
            done.add((r["seed"], r["d"], r["factor"]))
    for seed in a.seeds:
        for d in a.dims:
            for f in a.factors:
                if (seed, d, f) in done:
                    continue
                run_dir = out / a.data / f"seed{seed}-d{d}-f{f}"
                argv = ["--mode", "compare", "--nproc", "1", "--threads", str(a.threads),
                        "--no-progress", "--out", str(run_dir), "--embedding_dim", str(d),
                        "--dense_arch_layer_sizes", f"128,64,{d}",
                        "--mlet_inner_dim", str(f * d), *_data_args(a.data, seed, a.steps),
                        *a.extra]
                for var in ENV_OF_RUN:  # each run sets up its own (one-process) group
                    os.environ.pop(var, None)
                t0 = time.time()
                print("$ train.py", " ".join(argv), flush=True)
                train.main(argv)
                summary = json.loads((run_dir / "summary.json").read_text())
                record = {"seed": seed, "d": d, "factor": f, "k": f * d,
                          "wall_s": time.time() - t0, "argv": argv,
                          "results": summary["results"], "environment": summary["environment"]}
                with open(log, "a") as fh:
                    fh.write(json.dumps(record) + "\n")


def _ms(xs: list[float]) -> str:
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.4f}"
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}"


def _rows(data: str, out: Path) -> list[dict]:
    """One row per (model, d, factor) with per-seed lists of the metrics."""
    log = out / f"{data}.jsonl"
    if not log.exists():
        return []
    acc: dict[tuple[str, int, int], dict] = defaultdict(lambda: defaultdict(list))
    for line in log.read_text().splitlines():
        rec = json.loads(line)
        for r in rec["results"]:
            key = (r["name"], rec["d"], rec["factor"])
            row = acc[key]
            row["seed"].append(rec["seed"])
            row["auc"].append(r["auc"])
            row["logloss"].append(r["logloss"])
            row["step_ms"].append(r["step_ms"])
            row["train_bytes"] = r["embedding_bytes"]
            row["inference_bytes"] = r["inference_bytes"]
            if r.get("collapsed"):
                row["auc_collapsed"].append(r["collapsed"]["auc"])
                row["logloss_collapsed"].append(r["collapsed"]["logloss"])
                row["tt_svd_error"].append(r["collapsed"]["mean_tt_svd_error"])
    rows = []
    for (name, d, f), row in sorted(acc.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        rows.append({"model": name, "d": d, "factor": f, **row})
    return rows


def _inference_metric(row: dict) -> tuple[list[float], list[float]]:
    """AUC and log-loss of what is served: the collapsed model for MLET, the model otherwise."""
    if row["factor"]:
        return row["auc_collapsed"], row["logloss_collapsed"]
    return row["auc"], row["logloss"]


def report(a: argparse.Namespace) -> None:
    out = Path(a.out)
    series = {}
    for data in a.data:
        rows = _rows(data, out)
        if not rows:
            print(f"{data}: no results in {out}")
            continue
        series[data] = rows
        print(f"\n### {data}\n")
        print("| tables | d | k | seeds | trained bytes | inference bytes | AUC served | "
              "log-loss served | AUC uncollapsed | TT-SVD error | step ms |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            kind = "TT (7 largest)" if r["model"] == "tt" else "plain"
            auc, logloss = _inference_metric(r)
            mlet = bool(r["factor"])
            print(f"| {kind} | {r['d']} | {r['factor'] * r['d'] if mlet else '-'} | "
                  f"{len(r['seed'])} | {r['train_bytes'] / 2**20:.2f} MiB | "
                  f"{r['inference_bytes'] / 2**20:.2f} MiB | {_ms(auc)} | {_ms(logloss)} | "
                  f"{_ms(r['auc']) if mlet else '-'} | "
                  f"{_ms(r['tt_svd_error']) if mlet and r['model'] == 'tt' else '-'} | "
                  f"{statistics.mean(r['step_ms']):.1f} |")
        # Paired by seed: what is served with MLET at d against plain training at d, 4d, 8d.
        by = {(r["model"], r["d"], r["factor"]): r for r in rows}
        print()
        for (model, d, f), r in sorted(by.items()):
            if not f:
                continue
            served = dict(zip(r["seed"], _inference_metric(r)[0]))
            for wider in (d, 4 * d, 8 * d):
                base = by.get((model, wider, 0))
                if base is None:
                    continue
                diff = [served[s] - x for s, x in zip(base["seed"], base["auc"]) if s in served]
                print(f"- {model}, MLET d={d} k={f * d} (served) − plain d={wider}: AUC "
                      f"{_ms(diff)} over {len(diff)} seed(s)")
    if a.png and series:
        _plot(series, Path(a.png))


def _plot(series: dict[str, list[dict]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, len(series), figsize=(6.2 * len(series), 4.6), squeeze=False)
    styles = {("uncompressed", 0): ("C0", "o", "plain"),
              ("uncompressed", 4): ("C1", "s", "MLET k=4d"),
              ("uncompressed", 8): ("C2", "^", "MLET k=8d"),
              ("tt", 0): ("C3", "o", "TT (7 largest)"),
              ("tt", 4): ("C4", "s", "TT + MLET k=4d"),
              ("tt", 8): ("C5", "^", "TT + MLET k=8d")}
    for ax, (data, rows) in zip(axes[0], series.items()):
        for (model, f), (color, marker, label) in styles.items():
            pts = sorted((r["inference_bytes"], r) for r in rows
                         if r["model"] == model and r["factor"] == f)
            if not pts:
                continue
            # Small horizontal offsets keep the error bars of equal-byte points apart.
            shift = {0: 1.0, 4: 1.04, 8: 1.08}[f] if f in (0, 4, 8) else 1.0
            xs = [b / 2**20 * shift for b, _ in pts]
            aucs = [_inference_metric(r)[0] for _, r in pts]
            ys = [statistics.mean(v) for v in aucs]
            es = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in aucs]
            ls = "-" if model == "uncompressed" else "--"
            ax.errorbar(xs, ys, yerr=es, color=color, marker=marker, ls=ls, capsize=3,
                        label=label)
            for (b, r), y in zip(pts, ys):
                if f == 0:
                    ax.annotate(f"d={r['d']}", (b / 2**20, y), textcoords="offset points", xytext=(4, -10),
                                fontsize=7, color=color)
        seeds = max(len(r["seed"]) for r in rows)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set(xlabel="inference embedding MiB (collapsed model, log scale)", ylabel="test AUC",
               title=f"{data} (mean ± sd over up to {seeds} seed{'s' if seeds > 1 else ''})")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("data", choices=("synthetic", "real"))
    r.add_argument("--dims", type=int, nargs="+", default=[4, 8, 16, 32])
    r.add_argument("--factors", type=int, nargs="+", default=[0, 4, 8],
                   help="k = factor * d; 0: plain training")
    r.add_argument("--seeds", type=int, nargs="+", default=[0])
    r.add_argument("--steps", type=int, default=None)
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--out", default=str(ROOT / "runs" / "bench" / "mlet"))
    p = sub.add_parser("report")
    p.add_argument("data", nargs="+", choices=("synthetic", "real"))
    p.add_argument("--out", default=str(ROOT / "runs" / "bench" / "mlet"))
    p.add_argument("--png", default=None)
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    a = ap.parse_args(argv[:cut])
    a.extra = argv[cut + 1:]
    if a.cmd == "run":
        if any(f < 0 for f in a.factors) or any(d < 1 for d in a.dims):
            ap.error("--dims must be >= 1 and --factors >= 0")
        run(a)
    else:
        report(a)


if __name__ == "__main__":
    main()
