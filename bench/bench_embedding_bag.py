"""GPU benchmark: TT embedding bag (our CUDA op) vs FBGEMM TBE (uncompressed) vs plain-PyTorch TT.

Per case, one step = forward + backward + optimizer step (SGD, lr 0.01) over the same index
stream; median over --iters steps after warm-up, rotating among 8 pre-generated index sets.
FBGEMM TBE (SplitTableBatchedEmbeddingBagsCodegen, EXACT_SGD) runs when fbgemm_gpu imports;
otherwise its column says so. Prints a markdown table (ns per lookup, ratios, TFLOP/s of the
TT op counted without dedup, peak extra memory).

    python bench/bench_embedding_bag.py [--iters 20] [--cases all|quick]
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass

import torch

from torchrec_tt.ops import PoolingMode, TTBatchLayout, tt_embedding_bag
from torchrec_tt.reference import tt_rows_reference
from torchrec_tt.shapes import TTShape, make_tt_shape

TF32_PEAK_TFLOPS = 494.7  # H100/H200 SXM dense TF32 tensor-core rate (datasheet)


@dataclass
class Case:
    name: str
    rows: int
    dim: int
    rank: int
    batch: int
    pooling_factor: int
    zipf: bool
    p: tuple[int, ...] | None = None
    q: tuple[int, ...] | None = None


def cases(which: str) -> list[Case]:
    big = dict(rows=11_000_000, dim=64, p=(200, 220, 250), q=(4, 4, 4))
    out = []
    for batch, pf in ((65_536, 1), (8_192, 20)):
        for zipf in (False, True):
            out.append(Case(f"R32 B{batch} L{pf} {'zipf' if zipf else 'unif'}", rank=32, batch=batch,
                            pooling_factor=pf, zipf=zipf, **big))
    if which == "all":
        out.append(Case("R8 B8192 L20 unif", rank=8, batch=8192, pooling_factor=20, zipf=False, **big))
        out.append(Case("R64 B8192 L20 unif", rank=64, batch=8192, pooling_factor=20, zipf=False, **big))
        out.append(Case("D16 q(2,2,4) R32 B8192 L20 unif", rows=11_000_000, dim=16, rank=32, batch=8192,
                        pooling_factor=20, zipf=False, p=(200, 220, 250), q=(2, 2, 4)))
    return out


def index_sets(case: Case, sets: int, device: torch.device) -> list[torch.Tensor]:
    n = case.batch * case.pooling_factor
    gen = torch.Generator(device=device).manual_seed(0)
    out = []
    if case.zipf:
        ranks = torch.arange(1, case.rows + 1, device=device, dtype=torch.float64)
        probs = ranks.pow(-1.05)
        probs /= probs.sum()
        for _ in range(sets):
            r = torch.multinomial(probs.float(), n, replacement=True, generator=gen)
            out.append((r * 2_654_435_761) % case.rows)  # hot ids spread over the table
    else:
        for _ in range(sets):
            out.append(torch.randint(0, case.rows, (n,), device=device, generator=gen))
    return out


def time_steps(step, iters: int) -> float:  # type: ignore[no-untyped-def]
    for i in range(3):
        step(i)
    torch.cuda.synchronize()
    times = []
    for i in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step(i)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    return statistics.median(times)


def tt_step_fn(case: Case, shape: TTShape, idx: list[torch.Tensor], offsets: torch.Tensor, reference: bool):  # type: ignore[no-untyped-def]
    dev = offsets.device
    full = shape.full_ranks
    cores = [
        (0.3 * torch.randn(shape.p[k], full[k] * shape.q[k] * full[k + 1], device=dev)).requires_grad_()
        for k in range(shape.num_cores)
    ]
    opt = torch.optim.SGD(cores, lr=0.01)
    layout = TTBatchLayout.from_shapes(["t"], [shape], [PoolingMode.SUM], [0])
    bags = torch.repeat_interleave(
        torch.arange(case.batch, device=dev), case.pooling_factor
    )

    def step(i: int) -> None:
        ind = idx[i % len(idx)]
        if reference:
            rows = tt_rows_reference(cores, shape.p, shape.q, shape.ranks, ind)
            out = torch.zeros(case.batch, shape.embedding_dim, device=dev).index_add(0, bags, rows)
        else:
            out = tt_embedding_bag(cores, layout, ind, offsets)
        opt.zero_grad(set_to_none=True)
        out.backward(torch.ones_like(out))
        opt.step()

    return step


def tbe_step_fn(case: Case, idx: list[torch.Tensor], offsets: torch.Tensor):  # type: ignore[no-untyped-def]
    try:
        from fbgemm_gpu.split_embedding_configs import EmbOptimType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
            ComputeDevice,
            SplitTableBatchedEmbeddingBagsCodegen,
        )
    except Exception as e:  # noqa: BLE001 - any import failure means "no baseline here"
        return None, f"fbgemm_gpu unavailable ({type(e).__name__})"
    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        [(case.rows, case.dim, EmbeddingLocation.DEVICE, ComputeDevice.CUDA)],
        optimizer=EmbOptimType.EXACT_SGD,
        learning_rate=0.01,
    )

    def step(i: int) -> None:
        out = tbe(idx[i % len(idx)], offsets)
        out.backward(torch.ones_like(out))

    return step, ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--cases", default="all", choices=["all", "quick"])
    ap.add_argument("--no-reference", action="store_true")
    args = ap.parse_args()
    dev = torch.device("cuda")
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    rows = []
    for case in cases(args.cases):
        print(f"case: {case.name}", flush=True)
        shape = make_tt_shape(case.rows, case.dim, [case.rank, case.rank], p=case.p, q=case.q)
        n = case.batch * case.pooling_factor
        idx = index_sets(case, 8, dev)
        offsets = torch.arange(0, n + 1, case.pooling_factor, device=dev)
        res: dict[str, float | str] = {}
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        res["tt"] = time_steps(tt_step_fn(case, shape, idx, offsets, False), args.iters)
        res["tt_mem"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        tbe, why = tbe_step_fn(case, idx, offsets)
        res["tbe"] = time_steps(tbe, args.iters) if tbe else why
        if not args.no_reference:
            res["ref"] = time_steps(tt_step_fn(case, shape, idx, offsets, True), max(5, args.iters // 4))
        flops = (shape.forward_flops_per_lookup() + shape.backward_flops_per_lookup()) * n
        res["tflops"] = flops / res["tt"] / 1e12
        rows.append((case, n, res))
        torch.cuda.empty_cache()
    print("\n| case | TT op ns/lookup | TBE ns/lookup | TT / TBE | ref ns/lookup | ref / TT | TT TFLOP/s (no dedup) | % TF32 peak | TT peak extra MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for case, n, r in rows:
        tt = r["tt"] / n * 1e9
        tbe = r["tbe"]
        tbe_s = f"{tbe / n * 1e9:.2f}" if isinstance(tbe, float) else str(tbe)
        ratio = f"{r['tt'] / tbe:.2f}x" if isinstance(tbe, float) else "-"
        ref = r.get("ref")
        ref_s = f"{ref / n * 1e9:.1f}" if isinstance(ref, float) else "-"
        ref_ratio = f"{ref / r['tt']:.1f}x" if isinstance(ref, float) else "-"
        print(f"| {case.name} | {tt:.2f} | {tbe_s} | {ratio} | {ref_s} | {ref_ratio} | "
              f"{r['tflops']:.1f} | {100 * r['tflops'] / TF32_PEAK_TFLOPS:.1f}% | {r['tt_mem']:.0f} |")


if __name__ == "__main__":
    main()
