"""GPU benchmark: TT convolution (our fused CUDA op) vs the dense cuDNN convolution and vs the
same TT layer run as three unfused cuDNN convolutions.

Per layer at Wide-ResNet-28-10 shapes (3×3, stride 1, padding 1; 160 channels at 32×32, 320 at
16×16, 640 at 8×8; batch 128), TT ranks r1 = r2 = R, in tf32 (fp32 tensors, TF32 allowed for
cuDNN and cuBLAS) and bf16, channels-last everywhere. Timed, each as the median of --iters
CUDA-event timings after warm-up, with the L2 cache flushed (a 64 MB write) and the GPU kept busy
(a ~1 ms spin) before every timed call, so that CPU launch overhead does not show up as GPU time:

  forward        dense F.conv2d | three F.conv2d (1×1, 3×3, 1×1) | tt_conv2d
  input grad     dense dgrad    | three dgrads                   | tt_conv2d_backward [1,0,0,0]
  core grads     dense wgrad    | dgrads + wgrads of the three, given the activations autograd
                                  saves (x, t1, t2)              | tt_conv2d_backward [0,1,1,1]
  backward       dense dgrad+wgrad | autograd of the three convs | tt_conv2d_backward [1,1,1,1]
  train step     forward + backward through autograd of each layer (wall clock incl. launches)

plus "TTConv2d auto": a TTConv2d module with the same cores and path="auto", measured plans on
(torchrec_tt.conv_dispatch.settings.benchmark), forward (no grad; CUDA events as above) and train
step (wall clock), with the path it picked for each (issue 19: never slower than the faster of
the fused op and the three cuDNN convolutions).

Ratios are baseline time / TT time (> 1: TT faster). Every TT result is checked against the
unfused computation first. Also sweeps the fused kernel's output tile and pipeline depth at
R=32 (env TORCHREC_TT_CONV_TILE / TORCHREC_TT_CONV_STAGES / TORCHREC_TT_CONV_WARPS_N). Prints markdown tables; --json writes every number.

    python bench/bench_conv.py [--iters 30] [--ranks 8,16,32,64] [--dtypes tf32,bf16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

import torchrec_tt  # noqa: F401  (registers the ops)
from torchrec_tt import TTConv2d, conv_dispatch, tt_conv2d

SHAPES = {"160@32x32": (160, 32), "320@16x16": (320, 16), "640@8x8": (640, 8)}
# (tile, pipeline stages, warps across columns) variants of the fused kernel; "" = the planner's.
TILES = [("", "", ""), ("", "2", ""), ("", "3", ""), ("", "4", ""), ("", "", "2"), ("", "", "4"), ("8x8", "", ""),
         ("8x8", "", "4"), ("4x16", "", ""), ("8x16", "", ""), ("8x16", "", "4"), ("16x8", "", "")]


def tile_name(t: tuple[str, str, str]) -> str:
    return (t[0] or "auto") + (f"/st{t[1]}" if t[1] else "") + (f"/wn{t[2]}" if t[2] else "")


class Timer:
    def __init__(self, iters: int, warmup: int) -> None:
        self.iters, self.warmup = iters, warmup
        self.flush_buf = torch.empty(64 * 2**20, dtype=torch.int8, device="cuda")

    def __call__(self, fn) -> float:  # type: ignore[no-untyped-def]
        """Median GPU milliseconds of fn()."""
        for _ in range(self.warmup):
            fn()
        torch.cuda.synchronize()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.iters)]
        for s, e in zip(starts, ends):
            self.flush_buf.zero_()
            # ~1 ms of GPU work while the CPU enqueues fn: the backward compositions make about
            # ten cuDNN/cuBLAS calls whose host time (50-300 µs) would otherwise show up as GPU
            # idle time inside the events (seen with a 50 µs spin: docs/benchmarks.md, v2).
            torch.cuda._sleep(2_000_000)
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def wall_ms(fn, iters: int, warmup: int) -> float:  # type: ignore[no-untyped-def]
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3 / iters


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def conv_bwd(go, x, w, mask, stride=1, padding=1):  # type: ignore[no-untyped-def]
    return torch.ops.aten.convolution_backward(
        go, x, w, None, [stride] * 2, [padding] * 2, [1, 1], False, [0, 0], 1, mask
    )


def bench_layer(name: str, c: int, hw: int, rank: int, dtype: torch.dtype, batch: int,
                timer: Timer, dense_cache: dict, wall_iters: int) -> dict:
    dev = "cuda"
    cl = torch.channels_last
    g = torch.Generator(device=dev).manual_seed(rank * 1000 + c)
    x = torch.randn(batch, c, hw, hw, device=dev, generator=g).to(dtype).contiguous(memory_format=cl)
    go = torch.randn(batch, c, hw, hw, device=dev, generator=g).to(dtype).contiguous(memory_format=cl)
    c0 = (torch.randn(rank, c, 1, 1, device=dev, generator=g) / c**0.5).to(dtype)
    c1 = (torch.randn(rank, rank, 3, 3, device=dev, generator=g) / (9 * rank) ** 0.5).to(dtype)
    c2 = (torch.randn(c, rank, 1, 1, device=dev, generator=g) / rank**0.5).to(dtype)
    c0t = c0.transpose(0, 1).contiguous()
    c2t = c2.transpose(0, 1).contiguous()
    args = ([1, 1], [1, 1], [1, 1])
    row: dict = {"layer": name, "rank": rank, "dtype": "tf32" if dtype == torch.float32 else "bf16"}
    info = list(torch.ops.torchrec_tt.tt_conv2d_kernel_info(x, c0, c1, c2, *args))
    row["fused_fwd"], row["fused_igrad"] = info[0], info[1]

    # --- correctness of the TT op against the unfused convolutions
    t1 = F.conv2d(x, c0)
    t2 = F.conv2d(t1, c1, padding=1)
    y_unf = F.conv2d(t2, c2)
    y_tt = tt_conv2d(x, c0, c1, c2, None, 1, 1, 1)
    row["err_fwd"] = rel_err(y_tt, y_unf)
    gi_tt = torch.ops.torchrec_tt.tt_conv2d_backward(go, x, c0, c1, c2, *args, [True, False, False, False])[0]
    g2 = F.conv2d(go, c2t)
    g1 = conv_bwd(g2, t1, c1, [True, False, False])[0]
    gi_unf = F.conv2d(g1, c0t)
    row["err_igrad"] = rel_err(gi_tt, gi_unf)

    # --- dense baseline (same for every rank)
    key = (name, dtype)
    if key not in dense_cache:
        w = (torch.randn(c, c, 3, 3, device=dev, generator=g) / (9 * c) ** 0.5).to(dtype)
        w = w.contiguous(memory_format=cl)
        d = {}
        d["fwd"] = timer(lambda: F.conv2d(x, w, padding=1))
        d["igrad"] = timer(lambda: conv_bwd(go, x, w, [True, False, False]))
        d["cgrad"] = timer(lambda: conv_bwd(go, x, w, [False, True, False]))
        d["bwd"] = timer(lambda: conv_bwd(go, x, w, [True, True, False]))
        dense_mod = torch.nn.Conv2d(c, c, 3, padding=1, bias=False, device=dev, dtype=dtype)
        dense_mod = dense_mod.to(memory_format=cl)
        xr = x.detach().clone().requires_grad_()

        def dense_step() -> None:
            dense_mod(xr).backward(go)

        d["step"] = wall_ms(dense_step, wall_iters, 5)
        dense_cache[key] = d
    d = dense_cache[key]

    # --- unfused: three cuDNN convolutions
    u = {}
    u["fwd"] = timer(lambda: F.conv2d(F.conv2d(F.conv2d(x, c0), c1, padding=1), c2))

    def unf_igrad() -> torch.Tensor:
        a = conv_bwd(go, t2, c2, [True, False, False], 1, 0)[0]
        b = conv_bwd(a, t1, c1, [True, False, False])[0]
        return conv_bwd(b, x, c0, [True, False, False], 1, 0)[0]

    def unf_cgrad() -> None:
        a, wc2, _ = conv_bwd(go, t2, c2, [True, True, False], 1, 0)
        b, wc1, _ = conv_bwd(a, t1, c1, [True, True, False])
        conv_bwd(b, x, c0, [False, True, False], 1, 0)

    def unf_bwd() -> None:
        a, wc2, _ = conv_bwd(go, t2, c2, [True, True, False], 1, 0)
        b, wc1, _ = conv_bwd(a, t1, c1, [True, True, False])
        conv_bwd(b, x, c0, [True, True, False], 1, 0)

    u["igrad"] = timer(unf_igrad)
    u["cgrad"] = timer(unf_cgrad)
    u["bwd"] = timer(unf_bwd)
    p0, p1, p2 = (t.detach().clone().requires_grad_() for t in (c0, c1, c2))
    xr = x.detach().clone().requires_grad_()

    def unf_step() -> None:
        F.conv2d(F.conv2d(F.conv2d(xr, p0), p1, padding=1), p2).backward(go)

    u["step"] = wall_ms(unf_step, wall_iters, 5)

    # --- TT op
    bw = torch.ops.torchrec_tt.tt_conv2d_backward
    t = {}
    t["fwd"] = timer(lambda: tt_conv2d(x, c0, c1, c2, None, 1, 1, 1))
    t["igrad"] = timer(lambda: bw(go, x, c0, c1, c2, *args, [True, False, False, False]))
    t["cgrad"] = timer(lambda: bw(go, x, c0, c1, c2, *args, [False, True, True, True]))
    t["bwd"] = timer(lambda: bw(go, x, c0, c1, c2, *args, [True, True, True, True]))

    def tt_step() -> None:
        tt_conv2d(xr, p0, p1, p2, None, 1, 1, 1).backward(go)

    t["step"] = wall_ms(tt_step, wall_iters, 5)

    # --- TTConv2d, path="auto" with measured plans: what the module runs
    mod = TTConv2d(c, c, 3, padding=1, bias=False, ranks=(rank, rank), device=dev, dtype=dtype)
    with torch.no_grad():
        for p, v in zip(mod.cores(), (c0, c1, c2)):
            p.copy_(v)
    a = {}
    with conv_dispatch.flags(path="auto", benchmark=True):
        with torch.no_grad():
            row["auto_fwd_path"] = mod.path_for(x)
            row["err_auto_fwd"] = rel_err(mod(x), y_unf)

        def auto_fwd() -> None:
            with torch.no_grad():
                mod(x)

        a["fwd"] = timer(auto_fwd)
        row["auto_step_path"] = mod.path_for(xr)

        def auto_step() -> None:
            mod(xr).backward(go)

        a["step"] = wall_ms(auto_step, wall_iters, 5)
    row["auto_plans"] = {("train" if k.train else "fwd"): [v.fused_ms, v.composed_ms]
                         for k, v in mod.plans().items() if k.dtype == str(dtype)}
    for k in ("fwd", "step"):
        row[f"auto_{k}"] = a[k]
        row[f"x_auto_dense_{k}"] = d[k] / a[k]
        row[f"x_auto_best_{k}"] = min(u[k], t[k]) / a[k]

    for k in ("fwd", "igrad", "cgrad", "bwd", "step"):
        row[f"dense_{k}"], row[f"unf_{k}"], row[f"tt_{k}"] = d[k], u[k], t[k]
        row[f"x_dense_{k}"] = d[k] / t[k]
        row[f"x_unf_{k}"] = u[k] / t[k]
    bytes_fwd = (x.numel() + x.numel()) * x.element_size()
    row["tt_fwd_GBps"] = bytes_fwd / (t["fwd"] * 1e-3) / 1e9
    return row


def tile_sweep(name: str, c: int, hw: int, dtype: torch.dtype, batch: int, timer: Timer) -> dict:
    dev = "cuda"
    x = torch.randn(batch, c, hw, hw, device=dev).to(dtype).contiguous(memory_format=torch.channels_last)
    c0 = (torch.randn(32, c, 1, 1, device=dev) / c**0.5).to(dtype)
    c1 = (torch.randn(32, 32, 3, 3, device=dev) / 288**0.5).to(dtype)
    c2 = (torch.randn(c, 32, 1, 1, device=dev) / 32**0.5).to(dtype)
    go = torch.randn_like(x)
    out = {}
    ref = tt_conv2d(x, c0, c1, c2, None, 1, 1, 1)
    for tile, stages, wn in TILES:
        os.environ["TORCHREC_TT_CONV_TILE"] = tile
        os.environ["TORCHREC_TT_CONV_STAGES"] = stages
        os.environ["TORCHREC_TT_CONV_WARPS_N"] = wn
        y = tt_conv2d(x, c0, c1, c2, None, 1, 1, 1)
        err = rel_err(y, ref)
        fwd = timer(lambda: tt_conv2d(x, c0, c1, c2, None, 1, 1, 1))
        ig = timer(lambda: torch.ops.torchrec_tt.tt_conv2d_backward(
            go, x, c0, c1, c2, [1, 1], [1, 1], [1, 1], [True, False, False, False]))
        out[tile_name((tile, stages, wn))] = {"fwd": fwd, "igrad": ig, "err_vs_auto": err}
    os.environ.pop("TORCHREC_TT_CONV_TILE", None)
    os.environ.pop("TORCHREC_TT_CONV_STAGES", None)
    os.environ.pop("TORCHREC_TT_CONV_WARPS_N", None)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--ranks", default="8,16,32,64")
    ap.add_argument("--dtypes", default="tf32,bf16")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--wall-iters", type=int, default=20)
    ap.add_argument("--no-tile-sweep", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_conv.py needs a CUDA GPU")
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.matmul.allow_tf32 = True
    timer = Timer(args.iters, args.warmup)
    ranks = [int(r) for r in args.ranks.split(",")]
    dtypes = {"tf32": torch.float32, "bf16": torch.bfloat16}
    rows, sweeps = [], {}
    dense_cache: dict = {}
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | batch {args.batch}", flush=True)
    for dname in args.dtypes.split(","):
        dtype = dtypes[dname]
        for name in args.shapes.split(","):
            c, hw = SHAPES[name]
            for r in ranks:
                row = bench_layer(name, c, hw, r, dtype, args.batch, timer, dense_cache, args.wall_iters)
                rows.append(row)
                print(json.dumps(row), flush=True)
            if not args.no_tile_sweep:
                sweeps[f"{name} {dname}"] = tile_sweep(name, c, hw, dtype, args.batch, timer)
                print(json.dumps({f"tiles {name} {dname}": sweeps[f"{name} {dname}"]}), flush=True)

    def f(v: float) -> str:
        return f"{v:.3f}"

    for part, label in (("fwd", "forward"), ("igrad", "input gradient"), ("cgrad", "core gradients"),
                        ("bwd", "backward (input + cores)"), ("step", "train step fwd+bwd, wall clock")):
        print(f"\n### {label} (ms, median; ×: baseline / TT)\n")
        print("| dtype | layer | R | dense | 3× cuDNN | TT op | × vs dense | × vs 3× cuDNN |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['dtype']} | {r['layer']} | {r['rank']} | {f(r[f'dense_{part}'])} | "
                  f"{f(r[f'unf_{part}'])} | {f(r[f'tt_{part}'])} | {r[f'x_dense_{part}']:.2f} | "
                  f"{r[f'x_unf_{part}']:.2f} |")
    print("\n### TTConv2d auto (issue 19): what the module picks, forward (GPU ms) and train step "
          "(wall ms); ×best = min(3× cuDNN, TT op) / auto (≈1: never slower than the faster)\n")
    print("| dtype | layer | R | fwd dense | fwd 3× cuDNN | fwd TT op | fwd auto (path) | × dense | × best "
          "| step dense | step 3× cuDNN | step TT op | step auto (path) | × dense | × best |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dtype']} | {r['layer']} | {r['rank']} | " + " | ".join(
            f"{f(r[f'dense_{k}'])} | {f(r[f'unf_{k}'])} | {f(r[f'tt_{k}'])} | "
            f"{f(r[f'auto_{k}'])} ({r[f'auto_{k}_path']}) | {r[f'x_auto_dense_{k}']:.2f} | "
            f"{r[f'x_auto_best_{k}']:.2f}" for k in ("fwd", "step")) + " |")
    print("\n### checks: fused paths taken, error vs unfused, TT forward bandwidth\n")
    print("| dtype | layer | R | fused fwd | fused igrad | err fwd | err igrad | err auto fwd | TT fwd GB/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dtype']} | {r['layer']} | {r['rank']} | {r['fused_fwd']} | {r['fused_igrad']} | "
              f"{r['err_fwd']:.1e} | {r['err_igrad']:.1e} | {r['err_auto_fwd']:.1e} | {r['tt_fwd_GBps']:.0f} |")
    if sweeps:
        print("\n### fused kernel tile sweep at R=32 (forward / input-grad ms)\n")
        names = [tile_name(t) for t in TILES]
        print("| layer dtype | " + " | ".join(names) + " |")
        print("|---|" + "---|" * len(names))
        for k, v in sweeps.items():
            print(f"| {k} | " + " | ".join(f"{v[t]['fwd']:.3f}/{v[t]['igrad']:.3f}" for t in names) + " |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "batch": args.batch, "rows": rows, "tile_sweep": sweeps}, fh, indent=1)


if __name__ == "__main__":
    main()
