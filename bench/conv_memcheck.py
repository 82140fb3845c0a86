"""Small fused TT-conv launches (forward and input gradient, fp32/bf16/fp16, several tiles and
strides) checked against the unfused cuDNN convolutions; meant to run under compute-sanitizer:

    compute-sanitizer --tool memcheck --error-exitcode 9 python3 bench/conv_memcheck.py
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

import torchrec_tt  # noqa: F401
from torchrec_tt import tt_conv2d

CASES = [  # n, c, k, r1, r2, h, w, kernel, stride, padding, dilation, tile
    (2, 32, 48, 16, 16, 9, 11, 3, 1, 1, 1, ""),
    (1, 64, 64, 32, 32, 16, 16, 3, 1, 1, 1, "8x16"),
    (1, 40, 24, 8, 24, 8, 8, 3, 2, 1, 1, ""),
    (1, 16, 32, 64, 48, 11, 12, 3, 1, 2, 2, "4x16"),
    (1, 16, 16, 16, 16, 9, 9, 5, 1, 2, 1, "8x8"),
]


def main() -> int:
    bad = 0
    torch.backends.cudnn.allow_tf32 = True
    for dtype, tol in ((torch.float32, 5e-3), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)):
        for n, c, k, r1, r2, h, w, ks, s, p, d, tile in CASES:
            os.environ["TORCHREC_TT_CONV_TILE"] = tile
            g = torch.Generator(device="cuda").manual_seed(c + k)
            x = torch.randn(n, c, h, w, device="cuda", generator=g).to(dtype)
            x = x.contiguous(memory_format=torch.channels_last)
            c0 = (torch.randn(r1, c, 1, 1, device="cuda", generator=g) / c**0.5).to(dtype)
            c1 = (torch.randn(r2, r1, ks, ks, device="cuda", generator=g) / (r1 * ks * ks) ** 0.5).to(dtype)
            c2 = (torch.randn(k, r2, 1, 1, device="cuda", generator=g) / r2**0.5).to(dtype)
            b = torch.randn(k, device="cuda", generator=g).to(dtype)
            args = ([s, s], [p, p], [d, d])
            y = tt_conv2d(x, c0, c1, c2, b, *args)
            ref = F.conv2d(F.conv2d(F.conv2d(x.double(), c0.double()), c1.double(), None, s, p, d),
                           c2.double(), b.double())
            err = ((y.double() - ref).norm() / ref.norm()).item()
            go = torch.randn(y.shape, device="cuda", generator=g).to(dtype).contiguous(
                memory_format=torch.channels_last)
            gi = torch.ops.torchrec_tt.tt_conv2d_backward(go, x, c0, c1, c2, *args,
                                                          [True, False, False, False])[0]
            xr = x.double().requires_grad_()
            F.conv2d(F.conv2d(F.conv2d(xr, c0.double()), c1.double(), None, s, p, d),
                     c2.double()).backward(go.double())
            gerr = ((gi.double() - xr.grad).norm() / xr.grad.norm()).item()
            info = list(torch.ops.torchrec_tt.tt_conv2d_kernel_info(x, c0, c1, c2, *args))
            ok = err < tol and gerr < tol and torch.isfinite(y).all().item()
            bad += not ok
            print(f"{str(dtype):15s} c{c} k{k} r{r1},{r2} {h}x{w} k{ks} s{s} p{p} d{d} tile {tile or 'auto':5s}"
                  f" fused {info[:2]} fwd err {err:.1e} igrad err {gerr:.1e} {'ok' if ok else 'FAIL'}")
    torch.cuda.synchronize()
    print("memcheck cases:", "FAILED" if bad else "all ok")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
