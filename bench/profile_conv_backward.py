"""Kernel-level breakdown (torch.profiler) of the TT convolution's backward against the unfused
autograd baseline at one WRN-28-10 shape, to see which launches make up the time:

    python bench/profile_conv_backward.py [--c 160 --hw 32 --rank 32 --dtype bf16]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import torchrec_tt  # noqa: F401  (registers the ops)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--c", type=int, default=160)
    ap.add_argument("--hw", type=int, default=32)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--iters", type=int, default=10)
    a = ap.parse_args()
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = True
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    cl = torch.channels_last
    x = torch.randn(128, a.c, a.hw, a.hw, device="cuda").to(dtype).contiguous(memory_format=cl)
    go = torch.randn_like(x)
    r = a.rank
    c0 = (torch.randn(r, a.c, 1, 1, device="cuda") / a.c**0.5).to(dtype)
    c1 = (torch.randn(r, r, 3, 3, device="cuda") / (9 * r) ** 0.5).to(dtype)
    c2 = (torch.randn(a.c, r, 1, 1, device="cuda") / r**0.5).to(dtype)
    bw = torch.ops.torchrec_tt.tt_conv2d_backward
    args = ([1, 1], [1, 1], [1, 1])
    p = [t.detach().clone().requires_grad_() for t in (c0, c1, c2)]
    xr = x.detach().clone().requires_grad_()

    def tt() -> None:
        bw(go, x, c0, c1, c2, *args, [True] * 4)

    def unfused() -> None:
        y = F.conv2d(F.conv2d(F.conv2d(xr, p[0]), p[1], padding=1), p[2])
        y.backward(go)

    for name, fn in (("tt backward", tt), ("unfused fwd+bwd", unfused)):
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(a.iters):
                fn()
            torch.cuda.synchronize()
        print(f"\n## {name}: {a.c}@{a.hw}x{a.hw} R{r} {a.dtype}, {a.iters} calls")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=70))


if __name__ == "__main__":
    main()
