"""DLRM accuracy benchmark: TT against uncompressed, runs examples/dlrm/train.py --mode compare.

    # synthetic default (Kaggle-size tables, 7 largest in TT at rank 32), 2 processes
    .venv/bin/python bench/dlrm_accuracy.py synthetic --steps 2000
    # real Criteo Kaggle sample, several seeds on one identical train/test split, one epoch
    # (60 steps of 256 rows: a second epoch overfits, test AUC drops for both models)
    .venv/bin/python bench/dlrm_accuracy.py real --seeds 0 1 2 3 4

Prints one line per run and, for several seeds, mean ± standard deviation of the AUC of both
models and of their per-seed difference; results go to runs/bench/<name>/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "criteo_kaggle_sample.tsv.gz"


def run(out: Path, args: list[str], mode: str = "compare") -> dict:
    """One ``train.py --mode MODE`` run into ``out``: its summary's results by model name."""
    cmd = [sys.executable, str(ROOT / "examples" / "dlrm" / "train.py"), "--mode", mode,
           "--no-progress", "--out", str(out), *args]
    print("$", " ".join(cmd[1:]), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(proc.stdout[-3000:] + proc.stderr[-5000:])
    print(proc.stdout.strip().splitlines()[-1], flush=True)
    summary = json.loads((out / "summary.json").read_text())
    return {r["name"]: r for r in summary["results"]}


def _ms(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.4f}"
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", choices=("synthetic", "real"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench"))
    ap.add_argument("extra", nargs="*", help="more train.py arguments (after --)")
    # Split at "--" by hand: argparse drops what follows "--" after a positional has been read.
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    a = ap.parse_args(argv[:cut])
    a.extra = a.extra + argv[cut + 1:]
    results = []
    for seed in a.seeds:
        if a.data == "synthetic":
            args = ["--nproc", "2", "--steps", str(a.steps or 2000), "--seed", str(seed),
                    "--eval-samples", "131072"]
        else:
            if not REAL.exists():
                sys.exit(f"real Criteo sample not found at {REAL}")
            # One split (split seed 0) for every seed; the seed changes init and batch order.
            args = ["--nproc", "1", "--data", str(REAL), "--steps", str(a.steps or 60),
                    "--batch-size", "256", "--seed", str(seed), "--split-seed", "0",
                    "--test-fraction", "0.2", "--eval-every", str(a.steps or 60)]
        results.append(run(Path(a.out) / f"{a.data}-seed{seed}", args + a.extra))
    tt = [r["tt"]["auc"] for r in results]
    base = [r["uncompressed"]["auc"] for r in results]
    diff = [t - b for t, b in zip(tt, base)]
    r0 = results[0]
    print(f"\n{a.data}: {len(results)} seed(s) {a.seeds}")
    print(f"  AUC TT           {_ms(tt)}")
    print(f"  AUC uncompressed {_ms(base)}")
    print(f"  AUC TT - uncompressed (per seed) {_ms(diff)}")
    print(f"  log-loss TT {_ms([r['tt']['logloss'] for r in results])}, "
          f"uncompressed {_ms([r['uncompressed']['logloss'] for r in results])}")
    print(f"  embedding bytes TT {r0['tt']['embedding_bytes']:.0f}, uncompressed "
          f"{r0['uncompressed']['embedding_bytes']:.0f}: {r0['tt']['compression']:.1f}x")
    print(f"  step ms TT {_ms([r['tt']['step_ms'] for r in results])}, uncompressed "
          f"{_ms([r['uncompressed']['step_ms'] for r in results])}")
    os.makedirs(a.out, exist_ok=True)
    with open(Path(a.out) / f"{a.data}.json", "w") as f:
        json.dump({"seeds": a.seeds, "auc_tt": tt, "auc_uncompressed": base,
                   "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
