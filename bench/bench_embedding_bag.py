"""GPU benchmark: TT embedding bag (our CUDA op) vs FBGEMM TBE (uncompressed) vs plain-PyTorch TT.

Per case, one step = forward + backward + optimizer step (SGD, lr 0.01) over the same index
stream; median over --iters steps after warm-up, rotating among 8 pre-generated index sets.
FBGEMM TBE (SplitTableBatchedEmbeddingBagsCodegen, EXACT_SGD) runs when fbgemm_gpu imports;
otherwise its column says so. Prints a markdown table (ns per lookup, ratios, TFLOP/s of the
TT op counted without dedup, peak extra memory).

    python bench/bench_embedding_bag.py [--iters 20] [--cases all|quick] [--variants] [--graph] [--criteo] [--kaggle7] [--offload]
    python bench/bench_embedding_bag.py --kaggle7 [--iters 20]   # the decisive case set only
"""

from __future__ import annotations

import argparse
import os
import statistics
from dataclasses import dataclass

import torch

from torchrec_tt.ops import ComputePrecision, PoolingMode, TTBatchLayout, TTKernelOptions, tt_embedding_bag
from torchrec_tt.kernel_shapes import two_factor_fits, two_factor_shape
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


def tt_step_fn(case: Case, shape: TTShape, idx: list[torch.Tensor], offsets: torch.Tensor, reference: bool,  # type: ignore[no-untyped-def]
               options: TTKernelOptions | None = None):
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

    def step_on(ind: torch.Tensor) -> None:
        if reference:
            rows = tt_rows_reference(cores, shape.p, shape.q, shape.ranks, ind)
            out = torch.zeros(case.batch, shape.embedding_dim, device=dev).index_add(0, bags, rows)
        else:
            out = tt_embedding_bag(cores, layout, ind, offsets, options=options)
        opt.zero_grad(set_to_none=True)
        out.backward(torch.ones_like(out))
        opt.step()

    return step_on


def eager(step_on, idx: list[torch.Tensor]):  # type: ignore[no-untyped-def]
    return lambda i: step_on(idx[i % len(idx)])


def graphed(step_on, idx: list[torch.Tensor]):  # type: ignore[no-untyped-def]
    """The step captured once in a CUDA graph; a replay copies the next index set into the
    captured input buffer first (as a graphed training loop does)."""
    static = idx[0].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step_on(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step_on(static)

    def step(i: int) -> None:
        static.copy_(idx[i % len(idx)])
        graph.replay()

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

    def step_on(ind: torch.Tensor) -> None:
        out = tbe(ind, offsets)
        out.backward(torch.ones_like(out))

    return step_on, ""


# Cardinalities of the 26 categorical features of the Criteo Kaggle (Display Advertising
# Challenge) dataset, as used by TorchRec's DLRM example.
CRITEO_KAGGLE_ROWS = [
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27, 14992,
    5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
]


def criteo_case(iters: int, batch: int = 16_384, dim: int = 64, rank: int = 32, num_tt: int = 7) -> None:
    """26 tables, one lookup per feature per sample: all in TBE vs the ``num_tt`` largest in TT
    (one TT op call) plus the others in TBE."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        SplitTableBatchedEmbeddingBagsCodegen,
    )

    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    order = sorted(range(26), key=lambda f: -CRITEO_KAGGLE_ROWS[f])
    tt_feats, plain_feats = sorted(order[:num_tt]), sorted(order[num_tt:])

    def batch_for(feats: list[int], sets: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = []
        for _ in range(sets):
            idx = torch.cat([torch.randint(0, CRITEO_KAGGLE_ROWS[f], (batch,), device=dev, generator=gen) for f in feats])
            out.append((idx, torch.arange(0, idx.numel() + 1, device=dev)))
        return out

    def tbe_for(feats: list[int]):  # type: ignore[no-untyped-def]
        return SplitTableBatchedEmbeddingBagsCodegen(
            [(CRITEO_KAGGLE_ROWS[f], dim, EmbeddingLocation.DEVICE, ComputeDevice.CUDA) for f in feats],
            optimizer=EmbOptimType.EXACT_SGD, learning_rate=0.01,
        )

    all_batches = batch_for(list(range(26)))
    tbe_all = tbe_for(list(range(26)))

    def step_all(i: int) -> None:
        out = tbe_all(*all_batches[i % 8])
        out.backward(torch.ones_like(out))

    shapes = [make_tt_shape(CRITEO_KAGGLE_ROWS[f], dim, [rank, rank], q=(4, 4, 4)) for f in tt_feats]
    layout = TTBatchLayout.from_shapes([f"t{f}" for f in tt_feats], shapes, [PoolingMode.SUM] * num_tt, list(range(num_tt)))
    cores = [
        (0.3 * torch.randn(s.p[k], s.full_ranks[k] * s.q[k] * s.full_ranks[k + 1], device=dev)).requires_grad_()
        for s in shapes for k in range(s.num_cores)
    ]
    opt = torch.optim.SGD(cores, lr=0.01)
    tt_batches = batch_for(tt_feats)
    plain_batches = batch_for(plain_feats)
    tbe_plain = tbe_for(plain_feats)

    def step_mixed(i: int) -> None:
        out_tt = tt_embedding_bag(cores, layout, *tt_batches[i % 8])
        out_plain = tbe_plain(*plain_batches[i % 8])
        opt.zero_grad(set_to_none=True)
        torch.cat([out_tt, out_plain], dim=1).backward(torch.ones(batch, 26 * dim, device=dev))
        opt.step()

    n = 26 * batch
    t_all = time_steps(step_all, iters)
    t_mixed = time_steps(step_mixed, iters)
    dense_mb = sum(CRITEO_KAGGLE_ROWS) * dim * 4 / 2**20
    mixed_mb = (sum(c.numel() for c in cores) * 4 + sum(CRITEO_KAGGLE_ROWS[f] for f in plain_feats) * dim * 4) / 2**20
    print(f"\nCriteo-Kaggle-shaped: 26 tables, D={dim}, B={batch}, one lookup per feature; "
          f"TT (R={rank}, q=(4,4,4)) on the {num_tt} largest")
    print("| setup | ns/lookup (all 26 features) | step ms | embedding MiB |")
    print("|---|---|---|---|")
    print(f"| TBE, all 26 tables | {t_all / n * 1e9:.2f} | {t_all * 1e3:.3f} | {dense_mb:.0f} |")
    print(f"| TT for 7 + TBE for 19 | {t_mixed / n * 1e9:.2f} | {t_mixed * 1e3:.3f} | {mixed_mb:.0f} |")
    print(f"| ratio (mixed / TBE) | {t_mixed / t_all:.2f}x | | {dense_mb / mixed_mb:.0f}x smaller |")


def zipf_ids(rows: int, n: int, gen: torch.Generator, exponent: float = 1.05) -> torch.Tensor:
    """``n`` Zipf-distributed ids of a ``rows``-row table, hot ids spread over the table."""
    ranks = torch.arange(1, rows + 1, device=gen.device, dtype=torch.float32)
    probs = ranks.pow(-exponent)
    r = torch.multinomial(probs / probs.sum(), n, replacement=True, generator=gen)
    return (r * 2_654_435_761) % rows


def _tbe_kaggle7_times(rows: list[int], dim: int, sets: list[torch.Tensor], offsets: torch.Tensor,
                       dy: torch.Tensor, iters: int, cache_load_factor: float | None = None
                       ) -> dict[str, float | str]:
    """TBE (EXACT_SGD) eager and graphed step times and peak extra GPU memory, or why there is
    no baseline here. ``cache_load_factor``: the tables in host memory (UVM,
    ``EmbeddingLocation.MANAGED_CACHING``) behind a GPU cache of that fraction of the rows."""
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    try:
        from fbgemm_gpu.split_embedding_configs import EmbOptimType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
            ComputeDevice,
            SplitTableBatchedEmbeddingBagsCodegen,
        )

        location = EmbeddingLocation.DEVICE if cache_load_factor is None else EmbeddingLocation.MANAGED_CACHING
        extra = {} if cache_load_factor is None else {"cache_load_factor": cache_load_factor}
        tbe = SplitTableBatchedEmbeddingBagsCodegen(
            [(r, dim, location, ComputeDevice.CUDA) for r in rows],
            optimizer=EmbOptimType.EXACT_SGD, learning_rate=0.01, **extra,
        )
    except Exception as e:  # noqa: BLE001 - missing, stubbed or broken fbgemm_gpu: TT still timed
        why = f"no fbgemm_gpu ({type(e).__name__})"
        return {"tbe": why, "tbe_graph": why, "tbe_mem": why}

    def tbe_on(ind: torch.Tensor) -> None:
        tbe(ind, offsets).backward(dy)

    out: dict[str, float | str] = {"tbe": time_steps(eager(tbe_on, sets), iters)}
    out["tbe_mem"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    try:
        out["tbe_graph"] = time_steps(graphed(tbe_on, sets), iters)
    except Exception as e:  # noqa: BLE001 - the UVM cache may not capture: report, keep going
        out["tbe_graph"] = f"not capturable ({type(e).__name__})"
    del tbe
    torch.cuda.empty_cache()
    return out


def _tt_kaggle7_step(shapes: list[TTShape], offsets: torch.Tensor, dy: torch.Tensor):  # type: ignore[no-untyped-def]
    """A fwd + bwd + SGD step of random TT tables of ``shapes`` (one feature each), and the cores."""
    layout = TTBatchLayout.from_shapes([f"t{i}" for i in range(len(shapes))], shapes,
                                       [PoolingMode.SUM] * len(shapes), list(range(len(shapes))))
    cores = [(0.3 * torch.randn(s.p[k], s.full_ranks[k] * s.q[k] * s.full_ranks[k + 1], device=dy.device)).requires_grad_()
             for s in shapes for k in range(s.num_cores)]
    opt = torch.optim.SGD(cores, lr=0.01)

    def tt_on(ind: torch.Tensor) -> None:
        tt_embedding_bag(cores, layout, ind, offsets).backward(dy)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return tt_on, cores


def offload(iters: int, dim: int = 64, batch: int = 65_536, rank: int = 32) -> None:
    """Issue 11 item 5, the case where the tables do not fit on the GPU: TBE with its 7 Kaggle
    tables in host memory behind a GPU cache of 10% of the rows (MANAGED_CACHING, LRU) vs the TT
    tables (two-factor 2-core) entirely on the GPU vs TBE on the GPU, same Zipf index stream;
    then TT's peak extra memory at ~1M lookups (B=150,000) against 2x cores + B*D."""
    dev = torch.device("cuda")
    rows = sorted(CRITEO_KAGGLE_ROWS, reverse=True)[:7]
    shapes = [two_factor_shape(r, dim, rank) for r in rows]
    results: list[tuple[str, float | str, float | str, float | str]] = []
    for b in (batch, 150_000):
        gen = torch.Generator(device=dev).manual_seed(b + dim)
        sets = [torch.cat([zipf_ids(r, b, gen) for r in rows]) for _ in range(8)]
        offsets = torch.arange(0, 7 * b + 1, device=dev)
        dy = torch.randn(b, 7 * dim, device=dev)
        if b == batch:
            for name, clf in (("TBE on the GPU", None), ("TBE in host memory, 10% GPU cache", 0.1)):
                r = _tbe_kaggle7_times(rows, dim, sets, offsets, dy, iters, clf)
                results.append((f"{name}, B={b}", r["tbe"], r["tbe_graph"], r["tbe_mem"]))
        tt_on, cores = _tt_kaggle7_step(shapes, offsets, dy)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t_eager = time_steps(eager(tt_on, sets), iters)
        mem = (torch.cuda.max_memory_allocated() - base) / 2**20
        core_mib = sum(c.numel() for c in cores) * 4 / 2**20
        bound = 2 * core_mib + b * 7 * dim * 4 / 2**20
        results.append((f"TT on the GPU (cores {core_mib:.0f} MiB), B={b}, {7 * b:,} lookups; "
                        f"2x cores + B*D = {bound:.0f} MiB", t_eager, time_steps(graphed(tt_on, sets), iters), mem))
        del tt_on, cores, sets
        torch.cuda.empty_cache()
    print(f"\nKaggle's 7 largest tables, D={dim}, R={rank}, Zipf 1.05, fwd + bwd + SGD, median of {iters} steps")
    print("| variant | eager ms | graphed ms | peak extra GPU MiB (weights or cache included) |")
    print("|---|---|---|---|")
    for name, te, tg, m in results:
        fmt = lambda x: f"{x * 1e3:.3f}" if isinstance(x, float) else str(x)  # noqa: E731
        print(f"| {name} | {fmt(te)} | {fmt(tg)} | {m if isinstance(m, str) else f'{m:.0f}'} |")


def kaggle7(iters: int, dims: tuple[int, ...] = (16, 64), batches: tuple[int, ...] = (65_536, 8_192),
            rank: int = 32) -> None:
    """The 7 largest Criteo Kaggle tables, one Zipf 1.05 lookup per table and sample, fwd + bwd +
    SGD: TBE (EXACT_SGD, uncompressed) vs TT with the two-factor 2-core shape and with the
    balanced 3-core shape (the default before 2 cores), eager and replayed from a CUDA graph, same index stream."""
    dev = torch.device("cuda")
    rows = sorted(CRITEO_KAGGLE_ROWS, reverse=True)[:7]
    results = []
    for dim in dims:
        for batch in batches:
            gen = torch.Generator(device=dev).manual_seed(batch + dim)
            sets = [torch.cat([zipf_ids(r, batch, gen) for r in rows]) for _ in range(8)]
            offsets = torch.arange(0, 7 * batch + 1, device=dev)
            dy = torch.randn(batch, 7 * dim, device=dev)
            res = _tbe_kaggle7_times(rows, dim, sets, offsets, dy, iters)
            two = [two_factor_shape(r, dim, rank) for r in rows]
            variants: dict[str, tuple[list[TTShape], dict[str, str]]] = {
                "two-factor 2-core": (two, {}),
                "two-factor 2-core, v6 backward loop (no staged dY)": (two, {"TORCHREC_TT_BWD_STAGED": "0"}),
                "two-factor 2-core, generic-shape kernels": (two, {"TORCHREC_TT_EXACT_SHAPES": "0"}),
                "3-core balanced (old default)": ([make_tt_shape(r, dim, [rank, rank]) for r in rows], {}),
                "two-factor shape, old kernels": (two, {"TORCHREC_TT_TWO_FACTOR": "0"}),
            }
            if dim == 64:  # the only exact shape whose forward takes consecutive ranks
                variants["two-factor 2-core, D=64 strided-rank forward (v7)"] = (
                    two, {"TORCHREC_TT_FWD_STRIDED_RANKS": "1"})
            for name, (shapes, env) in variants.items():
                os.environ.update(env)
                tt_on, cores = _tt_kaggle7_step(shapes, offsets, dy)
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                res[name] = time_steps(eager(tt_on, sets), iters)
                res[name + " mem"] = (torch.cuda.max_memory_allocated() - base) / 2**20
                res[name + " graph"] = time_steps(graphed(tt_on, sets), iters)
                dense = sum(rows) * dim
                res[name + " x"] = dense / sum(s.num_parameters() for s in shapes)
                res[name + " fits"] = all(two_factor_fits(s) for s in shapes) and "TORCHREC_TT_TWO_FACTOR" not in env
                for key in env:
                    os.environ.pop(key)
                del tt_on, cores
                torch.cuda.empty_cache()
            results.append((dim, batch, res, list(variants)))
    print(f"\nKaggle's 7 largest tables, R={rank}, one Zipf 1.05 lookup per table and sample, fwd + bwd + SGD, "
          f"median of {iters} steps, ms")
    print("| D | B | TBE eager | TBE graphed | TT variant | two-factor kernels | compression | TT eager | TT graphed | "
          "eager ratio | graphed ratio | TT peak extra MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for dim, batch, r, names in results:
        for name in names:
            print(f"| {dim} | {batch} | {_ms(r['tbe'])} | {_ms(r['tbe_graph'])} | {name} | "
                  f"{'yes' if r[name + ' fits'] else 'no'} | {r[name + ' x']:.0f}x | {r[name] * 1e3:.3f} | "
                  f"{r[name + ' graph'] * 1e3:.3f} | {_ratio(r[name], r['tbe'])} | "
                  f"{_ratio(r[name + ' graph'], r['tbe_graph'])} | {r[name + ' mem']:.0f} |")


def _ms(seconds: float | str) -> str:
    return f"{seconds * 1e3:.3f}" if isinstance(seconds, float) else str(seconds)


def _ns(seconds: float | str, n: int, digits: int = 2) -> str:
    """ns per lookup, or the reason a column has no time."""
    return f"{seconds / n * 1e9:.{digits}f}" if isinstance(seconds, float) else str(seconds)


def _ratio(a: float | str, b: float | str, digits: int = 2) -> str:
    return f"{a / b:.{digits}f}x" if isinstance(a, float) and isinstance(b, float) else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--cases", default="all", choices=["all", "quick"])
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--variants", action="store_true",
                    help="also time the BF16 compute option and the deterministic backward")
    ap.add_argument("--graph", action="store_true",
                    help="also time TT and TBE steps replayed from CUDA graphs (no host launch cost)")
    ap.add_argument("--tile-rows", default="",
                    help="comma list of TORCHREC_TT_MAX_TILE_ROWS values to compare (graphed TT "
                         "step per value), e.g. 32,16")
    ap.add_argument("--criteo", action="store_true",
                    help="also run the Criteo-Kaggle-shaped 26-table case")
    ap.add_argument("--kaggle7", action="store_true",
                    help="run only the 7-largest-Kaggle-tables case set (TT shapes vs TBE)")
    ap.add_argument("--offload", action="store_true",
                    help="run only TT on the GPU vs TBE with the tables in host memory (10%% GPU cache)")
    args = ap.parse_args()
    dev = torch.device("cuda")
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    if args.kaggle7:
        kaggle7(args.iters)
        return
    if args.offload:
        offload(args.iters)
        return
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
        res["tt"] = time_steps(eager(tt_step_fn(case, shape, idx, offsets, False), idx), args.iters)
        res["tt_mem"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        if args.variants:
            bf16 = TTKernelOptions(compute_precision=ComputePrecision.BF16)
            res["tt_bf16"] = time_steps(eager(tt_step_fn(case, shape, idx, offsets, False, bf16), idx), args.iters)
            det = TTKernelOptions(deterministic=True)
            res["tt_det"] = time_steps(eager(tt_step_fn(case, shape, idx, offsets, False, det), idx), args.iters)
        if args.graph:
            res["tt_graph"] = time_steps(graphed(tt_step_fn(case, shape, idx, offsets, False), idx), args.iters)
        for rows_cap in filter(None, args.tile_rows.split(",")):
            os.environ["TORCHREC_TT_MAX_TILE_ROWS"] = rows_cap
            for mode, wrap in (("eager", eager), ("graph", graphed)):
                res[f"tile{rows_cap}_{mode}"] = time_steps(wrap(tt_step_fn(case, shape, idx, offsets, False), idx), args.iters)
            os.environ.pop("TORCHREC_TT_MAX_TILE_ROWS")
        tbe, why = tbe_step_fn(case, idx, offsets)
        res["tbe"] = time_steps(eager(tbe, idx), args.iters) if tbe else why
        if args.graph and tbe:
            try:
                res["tbe_graph"] = time_steps(graphed(tbe, idx), args.iters)
            except Exception as e:  # noqa: BLE001 - report, keep benchmarking
                res["tbe_graph"] = f"not capturable ({type(e).__name__})"
        if not args.no_reference:
            res["ref"] = time_steps(eager(tt_step_fn(case, shape, idx, offsets, True), idx), max(5, args.iters // 4))
        flops = (shape.forward_flops_per_lookup() + shape.backward_flops_per_lookup()) * n
        res["tflops"] = flops / res["tt"] / 1e12
        rows.append((case, n, res))
        torch.cuda.empty_cache()
    print("\n| case | TT op ns/lookup | TBE ns/lookup | TT / TBE | ref ns/lookup | ref / TT | TT TFLOP/s (no dedup) | % TF32 peak | TT peak extra MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for case, n, r in rows:
        print(f"| {case.name} | {_ns(r['tt'], n)} | {_ns(r['tbe'], n)} | {_ratio(r['tt'], r['tbe'])} | "
              f"{_ns(r.get('ref', '-'), n, 1)} | {_ratio(r.get('ref', '-'), r['tt'], 1)} | "
              f"{r['tflops']:.1f} | {100 * r['tflops'] / TF32_PEAK_TFLOPS:.1f}% | {r['tt_mem']:.0f} |")
    if args.variants:
        print("\n| case | TT TF32 ns/lookup | TT BF16 ns/lookup | TT deterministic ns/lookup |")
        print("|---|---|---|---|")
        for case, n, r in rows:
            print(f"| {case.name} | {r['tt'] / n * 1e9:.2f} | {r['tt_bf16'] / n * 1e9:.2f} | "
                  f"{r['tt_det'] / n * 1e9:.2f} |")
    if args.graph:
        print("\n| case | TT eager ns/lookup | TT graphed ns/lookup | TBE eager ns/lookup | TBE graphed ns/lookup | TT graphed / TBE graphed |")
        print("|---|---|---|---|---|---|")
        for case, n, r in rows:
            tbe_g = r.get("tbe_graph", "-")
            print(f"| {case.name} | {_ns(r['tt'], n)} | {_ns(r['tt_graph'], n)} | {_ns(r['tbe'], n)} | "
                  f"{_ns(tbe_g, n)} | {_ratio(r['tt_graph'], tbe_g)} |")
    caps = list(filter(None, args.tile_rows.split(",")))
    if caps:
        print("\n| case | " + " | ".join(f"tile<={c} eager | tile<={c} graphed" for c in caps) + " |")
        print("|---|" + "---|" * (2 * len(caps)))
        for case, n, r in rows:
            cells = [f"{_ns(r[f'tile{c}_eager'], n)} | {_ns(r[f'tile{c}_graph'], n)}" for c in caps]
            print(f"| {case.name} | " + " | ".join(cells) + " |")
    if args.criteo:
        criteo_case(args.iters)


if __name__ == "__main__":
    main()
