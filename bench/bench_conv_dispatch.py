"""TTConv2d with each dispatch path: forced fused op, forced composition (three F.conv2d through
autograd) and ``path="auto"`` with benchmarking on (what the module then picks), per WRN-28-k
stage shape, forward (no grad) and training step (forward + backward), median (and minimum)
milliseconds of interleaved calls.

Device-generic (CPU: wall clock; CUDA: CUDA events), for the dispatch's default rule on a device
(docs/benchmarks.md, "Dispatch (issue 19)"). bench/bench_conv.py is the GPU kernel benchmark.

    nice .venv/bin/python bench/bench_conv_dispatch.py --device cpu --batch 4 --threads 1 --clock cpu
    python3 bench/bench_conv_dispatch.py --device cuda --batch 128 --width 10 --dtypes tf32,bf16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import torchrec_tt  # noqa: F401  (registers the ops)
from torchrec_tt import TTConv2d, conv_dispatch


def bench_one(c: int, hw: int, rank: int, dtype: torch.dtype, batch: int, device: torch.device,
              warmup: int, iters: int, clock: str) -> dict:
    g = torch.Generator().manual_seed(c + rank)
    x = torch.randn(batch, c, hw, hw, generator=g).to(device=device, dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    mods = {}
    for path in ("fused", "composed", "auto"):
        torch.manual_seed(0)
        mods[path] = TTConv2d(c, c, 3, padding=1, bias=False, ranks=(rank, rank), path=path,
                              device=device, dtype=dtype)
    xr = x.detach().clone().requires_grad_()
    go = torch.ones_like(x)
    row: dict = {"layer": f"{c}@{hw}x{hw}", "rank": rank, "batch": batch}
    conv_dispatch.clear_plans()
    with conv_dispatch.flags(benchmark=True):
        with torch.no_grad():
            row["auto_fwd_path"] = mods["auto"].path_for(x)
        row["auto_step_path"] = mods["auto"].path_for(xr)
        row["plans"] = {("train" if k.train else "fwd"): [p.fused_ms, p.composed_ms]
                        for k, p in conv_dispatch.plans().items()}

        def fwd(m: TTConv2d):  # type: ignore[no-untyped-def]
            def f() -> None:
                with torch.no_grad():
                    m(x)
            return f

        def step(m: TTConv2d):  # type: ignore[no-untyped-def]
            return lambda: m(xr).backward(go)

        for kind, make in (("fwd", fwd), ("step", step)):
            fns = {p: make(m) for p, m in mods.items()}
            # --clock cpu: this process's CPU time, insensitive to other processes on a shared
            # machine (meaningful with --threads 1).
            times = conv_dispatch.time_calls(
                fns, device, warmup, iters, time.process_time if clock == "cpu" else time.perf_counter)
            for p, ts in times.items():
                row[f"{p}_{kind}"] = statistics.median(ts)
                row[f"{p}_{kind}_min"] = min(ts)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--width", type=int, default=10, help="k of WRN-28-k: stages 16k@32², 32k@16², 64k@8²")
    ap.add_argument("--ranks", default="32")
    ap.add_argument("--dtypes", default="fp32", help="comma list of fp32 (tf32 on CUDA), tf32, bf16")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="CPU timing: wall clock, or this process's CPU time (use with --threads 1)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = True
    dts = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16}
    rows = []
    print(f"# device {device} | torch {torch.__version__} | threads {torch.get_num_threads()} | "
          f"batch {args.batch} | clock {args.clock} | median (min) of {args.iters}, interleaved",
          flush=True)
    for dname in args.dtypes.split(","):
        for c, hw in ((16 * args.width, 32), (32 * args.width, 16), (64 * args.width, 8)):
            for r in (int(v) for v in args.ranks.split(",")):
                row = bench_one(c, hw, r, dts[dname], args.batch, device, args.warmup, args.iters,
                                args.clock)
                row["dtype"] = dname
                rows.append(row)
                print(json.dumps(row), flush=True)
    print("\n| dtype | layer | R | fwd fused | fwd composed | fwd auto (picks) | "
          "step fused | step composed | step auto (picks) |")
    print("|---|---|---|---|---|---|---|---|---|")

    def t(r: dict, k: str) -> str:
        return f"{r[k]:.2f} ({r[k + '_min']:.2f})"

    for r in rows:
        print(f"| {r['dtype']} | {r['layer']} | {r['rank']} | {t(r, 'fused_fwd')} | "
              f"{t(r, 'composed_fwd')} | {t(r, 'auto_fwd')} {r['auto_fwd_path']} | "
              f"{t(r, 'fused_step')} | {t(r, 'composed_step')} | {t(r, 'auto_step')} "
              f"{r['auto_step_path']} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
