"""Cost of the trainer's device-side synthetic batches (torchrec_tt.synthetic): aten ops and
time per batch, one batch per call against several per call (``DeviceSyntheticCriteo.batches``).

    python bench/bench_synthetic.py [--device cpu|cuda] [--batch-size 512] [--per-call 1 16]

On a GPU the op count is what matters (each op is a kernel launch of ~5-10 us of host time);
times are CUDA-synchronised wall clock there, this process's CPU time on the CPU.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from torchrec_tt.criteo import SyntheticCriteo
from torchrec_tt.synthetic import DeviceSyntheticCriteo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--per-call", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    dev = torch.device(a.device)
    gen = DeviceSyntheticCriteo(SyntheticCriteo(scale=1.0, seed=0), device=dev)
    clock = time.perf_counter if dev.type == "cuda" else time.process_time
    print("| batch | batches per call | aten ops per batch | ms per batch |")
    print("|---|---|---|---|")
    for k in a.per_call:
        gen.batches(a.batch_size, 0, list(range(k)))  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            gen.batches(a.batch_size, 0, list(range(k)))
        ops = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = clock()
        for r in range(a.repeats):
            gen.batches(a.batch_size, 0, list(range(r * k, (r + 1) * k)))
        if dev.type == "cuda":
            torch.cuda.synchronize()
        ms = (clock() - t0) / (a.repeats * k) * 1e3
        print(f"| {a.batch_size} | {k} | {ops / k:.0f} | {ms:.2f} |")


if __name__ == "__main__":
    main()
