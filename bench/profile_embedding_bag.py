"""Per-kernel GPU time of one TT embedding-bag step (fwd + bwd), via torch.profiler.

    python bench/profile_embedding_bag.py [--batch 65536] [--pooling-factor 1] [--rank 32]
    python bench/profile_embedding_bag.py --kaggle7 [--dim 16] [--batch 65536]  # two-factor shapes
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from torchrec_tt.kernel_shapes import two_factor_shape
from torchrec_tt.ops import PoolingMode, TTBatchLayout, tt_embedding_bag
from torchrec_tt.shapes import make_tt_shape


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=65536)
    ap.add_argument("--pooling-factor", type=int, default=1)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--kaggle7", action="store_true",
                    help="the 7 largest Criteo Kaggle tables in the two-factor 2-core shape, Zipf ids")
    args = ap.parse_args()
    if args.kaggle7:
        from bench_embedding_bag import CRITEO_KAGGLE_ROWS, zipf_ids

        rows = sorted(CRITEO_KAGGLE_ROWS, reverse=True)[:7]
        shapes = [two_factor_shape(r, args.dim, args.rank) for r in rows]
        gen = torch.Generator(device="cuda").manual_seed(0)
        idx = [torch.cat([zipf_ids(r, args.batch, gen) for r in rows]) for _ in range(4)]
    else:
        shapes = [make_tt_shape(11_000_000, 64, [args.rank, args.rank], p=(200, 220, 250), q=(4, 4, 4))]
        n = args.batch * args.pooling_factor
        idx = [torch.randint(0, shapes[0].num_rows, (n,), device="cuda") for _ in range(4)]
    cores = [
        (0.3 * torch.randn(s.p[k], s.full_ranks[k] * s.q[k] * s.full_ranks[k + 1], device="cuda")).requires_grad_()
        for s in shapes for k in range(s.num_cores)
    ]
    t = len(shapes)
    layout = TTBatchLayout.from_shapes([f"t{i}" for i in range(t)], shapes, [PoolingMode.SUM] * t, list(range(t)))
    pf = 1 if args.kaggle7 else args.pooling_factor
    offsets = torch.arange(0, idx[0].numel() + 1, pf, device="cuda")
    dy = torch.randn(args.batch, sum(s.embedding_dim for s in shapes), device="cuda")

    def step(i: int) -> None:
        out = tt_embedding_bag(cores, layout, idx[i % 4], offsets)
        out.backward(dy)

    for i in range(3):
        step(i)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(5):
            step(i)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=70))


if __name__ == "__main__":
    main()
