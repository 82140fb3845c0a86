"""GPU probe for the TT convolution's design choices (not the benchmark of record, which is
bench_conv.py): times, at the WRN-28-10 shapes, the TT op against alternative compositions
written here in PyTorch, so a kernel change is only made where the probe says it pays:

  fwd   tt_conv2d  |  1×1s as matrix products on the NHWC views (cuBLAS) + the 3×3 in cuDNN
  bwd   tt_conv2d_backward (all grads)  |  the same gradients with the 1×1 parts as matrix
        products, recomputing t1/t2  |  the same given t1/t2 saved by the forward

    python bench/probe_conv.py [--ranks 32] [--dtypes tf32,bf16] [--ncu]

--ncu runs each forward once after warm-up (for `ncu -k regex:tt_conv_fused`) instead of timing.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import torchrec_tt  # noqa: F401  (registers the ops)
from bench_conv import SHAPES, Timer, rel_err  # type: ignore[import-not-found]
from torchrec_tt import tt_conv2d


def mm_forward(x, c0, c1, c2, keep: bool = False):  # type: ignore[no-untyped-def]
    n, c, h, w = x.shape
    r1, r2, k = c0.shape[0], c1.shape[0], c2.shape[0]
    x2 = x.permute(0, 2, 3, 1).reshape(-1, c)  # NHWC view, no copy for channels-last x
    t1 = (x2 @ c0.view(r1, c).t()).view(n, h, w, r1).permute(0, 3, 1, 2)
    t2 = F.conv2d(t1, c1, padding=1)
    t2v = t2.permute(0, 2, 3, 1).reshape(-1, r2)
    y = (t2v @ c2.view(k, r2).t()).view(n, h, w, k).permute(0, 3, 1, 2)
    return (y, t1, t2) if keep else y


def mm_backward(go, x, c0, c1, c2, t1=None, t2=None):  # type: ignore[no-untyped-def]
    n, c, h, w = x.shape
    r1, r2, k = c0.shape[0], c1.shape[0], c2.shape[0]
    x2 = x.permute(0, 2, 3, 1).reshape(-1, c)
    g = go.permute(0, 2, 3, 1).reshape(-1, k)
    if t1 is None:
        t1 = (x2 @ c0.view(r1, c).t()).view(n, h, w, r1).permute(0, 3, 1, 2)
        t2 = F.conv2d(t1, c1, padding=1)
    t2v = t2.permute(0, 2, 3, 1).reshape(-1, r2)
    d2 = g.t() @ t2v                                   # [K, r2]
    g2 = (g @ c2.view(k, r2)).view(n, h, w, r2).permute(0, 3, 1, 2)
    g1, d1, _ = torch.ops.aten.convolution_backward(
        g2, t1, c1, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, True, False])
    g1v = g1.permute(0, 2, 3, 1).reshape(-1, r1)
    d0 = g1v.t() @ x2                                  # [r1, C]
    gi = (g1v @ c0.view(r1, c)).view(n, h, w, c).permute(0, 3, 1, 2)
    return gi, d0.view(r1, c, 1, 1), d1, d2.view(k, r2, 1, 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", default="32")
    ap.add_argument("--dtypes", default="tf32,bf16")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--ncu", action="store_true")
    a = ap.parse_args()
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.matmul.allow_tf32 = True
    timer = Timer(a.iters, 3)
    cl = torch.channels_last
    rows = []
    for dname in a.dtypes.split(","):
        dtype = torch.float32 if dname == "tf32" else torch.bfloat16
        for name, (c, hw) in SHAPES.items():
            for rank in (int(r) for r in a.ranks.split(",")):
                x = torch.randn(128, c, hw, hw, device="cuda").to(dtype).contiguous(memory_format=cl)
                go = torch.randn_like(x)
                c0 = (torch.randn(rank, c, 1, 1, device="cuda") / c**0.5).to(dtype)
                c1 = (torch.randn(rank, rank, 3, 3, device="cuda") / (9 * rank) ** 0.5).to(dtype)
                c2 = (torch.randn(c, rank, 1, 1, device="cuda") / rank**0.5).to(dtype)
                args = ([1, 1], [1, 1], [1, 1])
                if a.ncu:
                    for _ in range(3):
                        tt_conv2d(x, c0, c1, c2, None, 1, 1, 1)
                    torch.cuda.synchronize()
                    continue
                bw = torch.ops.torchrec_tt.tt_conv2d_backward
                y_ref, t1, t2 = mm_forward(x, c0, c1, c2, keep=True)
                ref = bw(go, x, c0, c1, c2, *args, [True] * 4)
                alt = mm_backward(go, x, c0, c1, c2)
                errs = [rel_err(p, q) for p, q in zip(alt, ref)]
                row = {
                    "dtype": dname, "layer": name, "R": rank,
                    "fwd_tt": timer(lambda: tt_conv2d(x, c0, c1, c2, None, 1, 1, 1)),
                    "fwd_mm": timer(lambda: mm_forward(x, c0, c1, c2)),
                    "bwd_tt": timer(lambda: bw(go, x, c0, c1, c2, *args, [True] * 4)),
                    "bwd_mm": timer(lambda: mm_backward(go, x, c0, c1, c2)),
                    "bwd_mm_saved": timer(lambda: mm_backward(go, x, c0, c1, c2, t1, t2)),
                    "err_fwd_mm": rel_err(y_ref, tt_conv2d(x, c0, c1, c2, None, 1, 1, 1)),
                    "err_bwd_max": max(errs),
                }
                rows.append(row)
                print(row, flush=True)
    if rows:
        keys = list(rows[0])
        print("| " + " | ".join(keys) + " |")
        print("|" + "---|" * len(keys))
        for r in rows:
            print("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) and v > 1e-3 else
                                     (f"{v:.1e}" if isinstance(v, float) else str(v))
                                     for v in r.values()) + " |")


if __name__ == "__main__":
    main()
