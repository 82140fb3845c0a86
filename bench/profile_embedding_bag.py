"""Per-kernel GPU time of one TT embedding-bag step (fwd + bwd), via torch.profiler.

    python bench/profile_embedding_bag.py [--batch 65536] [--pooling-factor 1] [--rank 32]
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from torchrec_tt.ops import PoolingMode, TTBatchLayout, tt_embedding_bag
from torchrec_tt.shapes import make_tt_shape


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=65536)
    ap.add_argument("--pooling-factor", type=int, default=1)
    ap.add_argument("--rank", type=int, default=32)
    args = ap.parse_args()
    shape = make_tt_shape(11_000_000, 64, [args.rank, args.rank], p=(200, 220, 250), q=(4, 4, 4))
    full = shape.full_ranks
    cores = [
        (0.3 * torch.randn(shape.p[k], full[k] * shape.q[k] * full[k + 1], device="cuda")).requires_grad_()
        for k in range(3)
    ]
    layout = TTBatchLayout.from_shapes(["t"], [shape], [PoolingMode.SUM], [0])
    n = args.batch * args.pooling_factor
    idx = [torch.randint(0, shape.num_rows, (n,), device="cuda") for _ in range(4)]
    offsets = torch.arange(0, n + 1, args.pooling_factor, device="cuda")

    def step(i: int) -> None:
        out = tt_embedding_bag(cores, layout, idx[i % 4], offsets)
        out.backward(torch.ones_like(out))

    for i in range(3):
        step(i)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(5):
            step(i)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))


if __name__ == "__main__":
    main()
