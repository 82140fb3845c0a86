"""Training-step cost of MLET against plain training: examples/dlrm/train.py runs (synthetic
data, one process) with and without ``--mlet_inner_dim``, uncompressed and TT, step time read
from each run's summary (mean over the logging windows, evaluations left out).

    # the project's 2-core CPU machine: tables at 1% of the Kaggle sizes, batch 512
    nice .venv/bin/python bench/mlet_step.py --device cpu
    # one GPU (H200): the Kaggle table sizes (33.8M rows; k = 8d = 128 is 17 GB of tables)
    .venv/bin/python bench/mlet_step.py --device cuda --scale 1 --batch_size 8192 --steps 300

Prints one row per (model, d, k) with the step time and its ratio to plain training at the same
d, and writes ``<out>/mlet_step_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--dims", type=int, nargs="+", default=[16])
    ap.add_argument("--factors", type=int, nargs="+", default=[0, 4, 8],
                    help="k = factor * d; 0: plain training")
    ap.add_argument("--models", nargs="+", choices=("baseline", "tt"),
                    default=["baseline", "tt"], help="train.py --mode of each run")
    ap.add_argument("--scale", type=float, default=None,
                    help="synthetic table sizes relative to Kaggle (default: cpu 0.01, cuda 1)")
    ap.add_argument("--batch_size", type=int, default=None, help="default: cpu 512, cuda 8192")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (cpu; 0: all cores)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench" / "mlet_step"))
    a = ap.parse_args()
    cuda = a.device == "cuda"
    scale = a.scale if a.scale is not None else (1.0 if cuda else 0.01)
    batch = a.batch_size or (8192 if cuda else 512)
    rows = []
    for mode in a.models:
        for d in a.dims:
            base = None
            for f in a.factors:
                out = Path(a.out) / a.device / f"{mode}-d{d}-f{f}"
                cmd = [sys.executable, str(ROOT / "examples" / "dlrm" / "train.py"),
                       "--mode", mode, "--nproc", "1", "--device", a.device, "--no-progress",
                       "--out", str(out), "--scale", str(scale), "--batch_size", str(batch),
                       "--steps", str(a.steps), "--eval-every", str(a.steps),
                       "--eval-samples", "8192", "--threads", str(a.threads),
                       "--embedding_dim", str(d), "--dense_arch_layer_sizes", f"128,64,{d}",
                       "--mlet_inner_dim", str(f * d), "--mlet_skip_collapse"]
                print("$", " ".join(cmd[1:]), flush=True)
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                                      env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                          filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})
                if proc.returncode != 0:
                    sys.exit(proc.stdout[-3000:] + proc.stderr[-5000:])
                r = json.loads((out / "summary.json").read_text())["results"][0]
                if f == 0:
                    base = r["step_ms"]
                rows.append({"model": r["name"], "d": d, "k": f * d, "step_ms": r["step_ms"],
                             "ratio": r["step_ms"] / base if base else float("nan"),
                             "train_bytes": r["embedding_bytes"],
                             "inference_bytes": r["inference_bytes"], "peak_mib": r["peak_mib"]})
                print(f"  {r['name']} d={d} k={f * d}: {r['step_ms']:.1f} ms/step "
                      f"({rows[-1]['ratio']:.2f}x plain)", flush=True)
    print(f"\n| model | d | k | step ms | vs plain | trained emb bytes | peak MiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['d']} | {r['k'] or '-'} | {r['step_ms']:.1f} | "
              f"{r['ratio']:.2f}x | {r['train_bytes'] / 2**20:.1f} MiB | {r['peak_mib']:.0f} |")
    Path(a.out).mkdir(parents=True, exist_ok=True)
    with open(Path(a.out) / f"mlet_step_{a.device}.json", "w") as fh:
        json.dump({"args": vars(a), "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
