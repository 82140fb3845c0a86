"""CPU benchmark: compiled TT embedding-bag op vs the plain-PyTorch TT reference.

Forward + backward (dense core gradients) of one table, median over repeats, fresh indices each
repeat. Default case (issue 2): 1M rows, D=64, R=16, 8,192 bags x 20 lookups.

    .venv/bin/python bench/bench_cpu_embedding_bag.py [--rows 1000000] [--dim 64] [--rank 16]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from torchrec_tt.ops import PoolingMode, TTBatchLayout, tt_embedding_bag
from torchrec_tt.reference import tt_rows_reference
from torchrec_tt.shapes import make_tt_shape


def reference_bag(cores, p, q, ranks, indices, offsets):  # type: ignore[no-untyped-def]
    rows = tt_rows_reference(cores, p, q, ranks, indices)
    bags = torch.repeat_interleave(
        torch.arange(offsets.numel() - 1), offsets[1:] - offsets[:-1], output_size=indices.numel()
    )
    out = torch.zeros(offsets.numel() - 1, rows.shape[1], dtype=rows.dtype)
    return out.index_add(0, bags, rows)


def time_fn(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    fn(0)  # warm-up
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        fn(r + 1)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8192)
    ap.add_argument("--pooling-factor", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    shape = make_tt_shape(args.rows, args.dim, [args.rank, args.rank])
    p, q, ranks = shape.p, shape.q, shape.ranks
    full = shape.full_ranks
    gen = torch.Generator().manual_seed(0)
    cores = [
        (0.3 * torch.randn(p[k], full[k] * q[k] * full[k + 1], generator=gen)).requires_grad_()
        for k in range(3)
    ]
    layout = TTBatchLayout.from_shapes(["t0"], [shape], [PoolingMode.SUM], [0])
    n = args.batch * args.pooling_factor
    offsets = torch.arange(0, n + 1, args.pooling_factor)
    index_sets = [torch.randint(0, args.rows, (n,), generator=gen) for _ in range(args.repeats + 1)]

    def run_op(r: int) -> None:
        out = tt_embedding_bag(cores, layout, index_sets[r], offsets)
        out.backward(torch.ones_like(out))

    def run_ref(r: int) -> None:
        out = reference_bag(cores, p, q, ranks, index_sets[r], offsets)
        out.backward(torch.ones_like(out))

    t_op = time_fn(run_op, args.repeats)
    t_ref = time_fn(run_ref, args.repeats)
    print(f"torch threads: {torch.get_num_threads()}; table {args.rows} x {args.dim}, p={p}, q={q}, R={args.rank}; "
          f"{args.batch} bags x {args.pooling_factor} lookups")
    print("| implementation | fwd+bwd ms (median) | ns / lookup | speed-up |")
    print("|---|---|---|---|")
    print(f"| plain-PyTorch TT reference (gather + bmm + autograd) | {t_ref * 1e3:.1f} | {t_ref / n * 1e9:.0f} | 1.00x |")
    print(f"| torchrec_tt compiled CPU op | {t_op * 1e3:.1f} | {t_op / n * 1e9:.0f} | {t_ref / t_op:.2f}x |")


if __name__ == "__main__":
    main()
