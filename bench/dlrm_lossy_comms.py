"""The DLRM trainer with uncompressed comms, TorchRec's FP16/INT8 qcomms and error-bounded lossy
comms at a few bounds, over seeds: pooled all-to-all bytes per step, AUC and log-loss.

Runs ``examples/dlrm/train.py`` once per (comms, seed) as a subprocess and reads its summary
line; extra trainer flags go after ``--``::

    python bench/dlrm_lossy_comms.py --seeds 0,1,2 --bounds 0.05,0.02,0.01 -- --nproc 2 --steps 400

Prints a table (mean and spread over seeds) and writes ``--out``/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
KEYS = ("auc", "logloss", "ne", "a2a_bytes_per_step", "pooled_bytes_per_step", "step_ms")


def run(flags: list[str], out: str) -> dict[str, float]:
    cmd = [sys.executable, os.path.join(ROOT, "examples", "dlrm", "train.py"), *flags,
           "--no_progress", "--out", out]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("summary:")]
    if proc.returncode or not line:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    values = dict(re.findall(r"(\w+)=([-+0-9.eE]+)", line[-1]))
    got = {k: float(values[k]) for k in KEYS}
    got["wall_s"] = time.time() - t0
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--bounds", default="0.05,0.02,0.01", help="--lossy_comms bounds")
    ap.add_argument("--qcomms", default="fp16,int8",
                    help="TorchRec qcomms precisions to run ('' for none)")
    ap.add_argument("--out", default="runs/lossy_matrix")
    ap.add_argument("--summarise", action="store_true",
                    help="only print the table of an earlier --out/results.json")
    ap.add_argument("trainer_args", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    if a.summarise:
        with open(os.path.join(a.out, "results.json")) as f:
            saved = json.load(f)
        for rows in saved["results"].values():  # runs saved before "seed" was recorded
            for i, r in enumerate(rows):
                r.setdefault("seed", saved["seeds"][i])
        print_table(saved["results"], saved["seeds"])
        return
    extra = a.trainer_args[1:] if a.trainer_args[:1] == ["--"] else a.trainer_args
    configs: list[tuple[str, list[str]]] = [("fp32 (uncompressed comms)", [])]
    configs += [(f"TorchRec {p.upper()} qcomms", ["--qcomms", p])
                for p in a.qcomms.split(",") if p]
    configs += [(f"lossy {b} -> {float(b) / 2:g}", ["--lossy_comms", b])
                for b in a.bounds.split(",") if b]
    seeds = [int(s) for s in a.seeds.split(",")]
    results: dict[str, list[dict[str, float]]] = {}
    for name, flags in configs:
        for seed in seeds:
            out = os.path.join(a.out, re.sub(r"[^\w.]+", "_", name), f"seed{seed}")
            try:
                got = run([*extra, *flags, "--seed", str(seed)], out)
            except RuntimeError as e:  # keep the other runs; the failure is printed
                print(f"{name} seed {seed}: FAILED\n{e}", flush=True)
                continue
            got["seed"] = seed
            results.setdefault(name, []).append(got)
            print(f"{name} seed {seed}: " + " ".join(f"{k}={v:.6g}" for k, v in got.items()),
                  flush=True)
            os.makedirs(a.out, exist_ok=True)
            with open(os.path.join(a.out, "results.json"), "w") as f:
                json.dump({"trainer_args": extra, "seeds": seeds, "results": results}, f, indent=1)
    print_table(results, seeds)


def print_table(results: dict[str, list[dict[str, float]]], seeds: list[int]) -> None:
    """Means over seeds; AUC and log-loss also as the mean of per-seed differences to the first
    configuration (fp32 comms) on the same seed (same data and init), which removes most of
    the seed-to-seed spread."""
    names = list(results)
    base_name = names[0]
    base = {int(r["seed"]): r for r in results[base_name]}
    base_bytes = statistics.mean(r["pooled_bytes_per_step"] for r in results[base_name])
    print(f"\n{'comms':<28} {'pooled B/step':>13} {'vs fp32':>8} {'AUC mean':>9} "
          f"{'dAUC (paired)':>17} {'log-loss':>9} {'dlogloss (paired)':>18} {'seeds':>5}")
    for name in names:
        rows = results[name]
        pooled = statistics.mean(r["pooled_bytes_per_step"] for r in rows)
        auc = statistics.mean(r["auc"] for r in rows)
        ll = statistics.mean(r["logloss"] for r in rows)
        d_auc = [r["auc"] - base[int(r["seed"])]["auc"] for r in rows if int(r["seed"]) in base]
        d_ll = [r["logloss"] - base[int(r["seed"])]["logloss"] for r in rows
                if int(r["seed"]) in base]

        def fmt(v: list[float]) -> str:
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            return f"{statistics.mean(v):+.4f} ± {sd:.4f}" if v else "-"

        print(f"{name:<28} {pooled:>13,.0f} {base_bytes / pooled:>7.2f}x {auc:>9.4f} "
              f"{fmt(d_auc):>17} {ll:>9.4f} {fmt(d_ll):>18} {len(rows):>5}")

if __name__ == "__main__":
    main()
