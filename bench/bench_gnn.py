"""Epoch time and peak memory of examples/gnn/train.py on the synthetic power-law graph: TT
node embeddings vs a full table (dense Adam, and SparseAdam on a sparse-gradient table), one
process per run so each peak is its own.

    # one H200: 10M nodes (the full table is 2.56 GB at D=64), then larger graphs until the
    # full table no longer fits (a run that fails with out-of-memory is reported as OOM)
    python bench/bench_gnn.py --device cuda --sizes 10000000 50000000 100000000
    # CPU check that it works (small)
    nice .venv/bin/python bench/bench_gnn.py --sizes 100000 --epochs 2 --steps_per_epoch 10

TT rank: the largest with --min_compression (default 1,000x), unless --tt_rank.
Epoch = one pass over the training nodes (1% of the nodes, mini-batches of 1,024 with fanouts
10,5) unless --steps_per_epoch caps it; the table reports the median epoch after the first.
Peak memory is torch.cuda.max_memory_allocated on CUDA, the process's peak RSS on CPU. Extra
train.py flags go after --. Results are appended to --out (JSON lines) and printed as markdown.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "tt": ["--embedding", "tt"],
    "full-adam": ["--embedding", "full", "--full_optimizer", "adam"],
    "full-sparse_adam": ["--embedding", "full", "--full_optimizer", "sparse_adam"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000_000])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--steps_per_epoch", type=int, default=0)
    ap.add_argument("--tt_rank", type=int, default=None, help="default: the largest with --min_compression")
    ap.add_argument("--min_compression", type=float, default=1000.0)
    ap.add_argument("--embedding_dim", type=int, default=64)
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench" / "gnn_bench.jsonl"))
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    a = ap.parse_args(argv[:cut])
    extra = argv[cut + 1 :]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in a.sizes:
        for variant in a.variants:
            with tempfile.TemporaryDirectory() as tmp:
                js = Path(tmp) / "r.jsonl"
                cmd = [sys.executable, str(ROOT / "examples/gnn/train.py"), "--dataset", "synthetic",
                       "--num_nodes", str(n), "--device", a.device, "--epochs", str(a.epochs),
                       "--steps_per_epoch", str(a.steps_per_epoch), "--eval_every", str(a.epochs),
                       "--embedding_dim", str(a.embedding_dim), "--min_compression", str(a.min_compression),
                       # Gaussian for both: an orthogonal init of a 100M-row table needs a QR of it.
                       "--init", "sampled_gaussian",
                       *(["--tt_rank", str(a.tt_rank)] if a.tt_rank else []),
                       "--json", str(js), *VARIANTS[variant], *extra]
                print("$", " ".join(cmd[1:]), flush=True)
                try:
                    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=a.timeout)
                    failed = proc.returncode != 0
                    tail = (proc.stdout + proc.stderr)[-3000:]
                except subprocess.TimeoutExpired:
                    failed, tail = True, f"timeout after {a.timeout} s"
                if failed:
                    oom = "out of memory" in tail.lower() or "outofmemory" in tail.lower()
                    print(tail, flush=True)
                    rows.append(f"| {n:,} | {variant} | {'OOM' if oom else 'failed'} | | | | | |")
                    continue
                r = json.loads(js.read_text().splitlines()[-1])
            with out.open("a") as f:
                f.write(json.dumps({"variant": variant, "extra": extra, **r}) + "\n")
            steady = r["epoch_time_s"][1:] or r["epoch_time_s"]
            rows.append(
                f"| {n:,} | {variant} | {r['embedding_bytes'] / 2**20:,.2f} | {r['compression']:,.0f}x | "
                f"{statistics.median(steady):.3f} | {r['peak_memory_bytes'] / 2**30:.2f} | {r['test_acc']:.4f} | "
                f"{r['device']} |")
            print(rows[-1], flush=True)
    print("| nodes | embedding | embedding MiB | compression | epoch s (median) | peak GiB | test acc | device |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
