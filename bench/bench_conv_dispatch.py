"""TTConv2d with each dispatch path: forced fused op, forced composition (three F.conv2d through
autograd) and ``path="auto"`` with benchmarking on (what the module then picks), per WRN-28-k
stage shape, forward (no grad) and training step (forward + backward), median milliseconds.

Device-generic (CPU: wall clock; CUDA: CUDA events), for the dispatch's default rule on a device
(docs/benchmarks.md, "Dispatch (issue 19)"). bench/bench_conv.py is the GPU kernel benchmark.

    nice .venv/bin/python bench/bench_conv_dispatch.py --device cpu --batch 8 --width 4
    python3 bench/bench_conv_dispatch.py --device cuda --batch 128 --width 10 --dtypes tf32,bf16
"""

from __future__ import annotations

import argparse
import json

import torch

import torchrec_tt  # noqa: F401  (registers the ops)
from torchrec_tt import TTConv2d, conv_dispatch


def bench_one(c: int, hw: int, rank: int, dtype: torch.dtype, batch: int, device: torch.device,
              warmup: int, iters: int) -> dict:
    g = torch.Generator().manual_seed(c + rank)
    x = torch.randn(batch, c, hw, hw, generator=g).to(device=device, dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    conv = TTConv2d(c, c, 3, padding=1, bias=False, ranks=(rank, rank), device=device, dtype=dtype)
    xr = x.detach().clone().requires_grad_()
    go = torch.ones_like(x)
    row: dict = {"layer": f"{c}@{hw}x{hw}", "rank": rank, "dtype": str(dtype).replace("torch.", ""),
                 "batch": batch}
    for path in ("fused", "composed", "auto"):
        conv.path = path
        with conv_dispatch.flags(benchmark=True):
            conv_dispatch.clear_plans()
            with torch.no_grad():
                row[f"{path}_fwd_path"] = conv.path_for(x)
                row[f"{path}_fwd"] = conv_dispatch.time_ms(lambda: conv(x), device, warmup, iters)
            row[f"{path}_step_path"] = conv.path_for(xr)

            def step() -> None:
                conv(xr).backward(go)

            row[f"{path}_step"] = conv_dispatch.time_ms(step, device, warmup, iters)
            row["plans"] = {("train" if k.train else "fwd"): [p.fused_ms, p.composed_ms]
                            for k, p in conv_dispatch.plans().items()}
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
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = True
    dts = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16}
    rows = []
    print(f"# device {device} | torch {torch.__version__} | threads {torch.get_num_threads()} | "
          f"batch {args.batch}", flush=True)
    for dname in args.dtypes.split(","):
        for c, hw in ((16 * args.width, 32), (32 * args.width, 16), (64 * args.width, 8)):
            for r in (int(v) for v in args.ranks.split(",")):
                row = bench_one(c, hw, r, dts[dname], args.batch, device, args.warmup, args.iters)
                row["dtype"] = dname
                rows.append(row)
                print(json.dumps(row), flush=True)
    print("\n| dtype | layer | R | fwd fused | fwd composed | fwd auto (picks) | "
          "step fused | step composed | step auto (picks) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dtype']} | {r['layer']} | {r['rank']} | {r['fused_fwd']:.2f} | "
              f"{r['composed_fwd']:.2f} | {r['auto_fwd']:.2f} ({r['auto_fwd_path']}) | "
              f"{r['fused_step']:.2f} | {r['composed_step']:.2f} | {r['auto_step']:.2f} "
              f"({r['auto_step_path']}) |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
