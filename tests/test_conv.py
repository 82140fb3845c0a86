"""TT convolution: the op and TTConv2d against F.conv2d over the reconstructed dense weight.

CPU tests run everywhere; the CUDA tests (fused kernels) are skipped, with a reason, on machines
without a GPU.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import torchrec_tt
from torchrec_tt import TTConv2d, tt_conv2d
from torchrec_tt.modules.conv import max_tt_conv_ranks, tt_svd_conv_weight

requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (fused TT conv kernels)"
)


def _dense_ref(x, c0, c1, c2, bias, stride, padding, dilation):
    w = torch.einsum("kb,baij,ac->kcij", c2[:, :, 0, 0], c1, c0[:, :, 0, 0])
    return F.conv2d(x, w, bias, stride, padding, dilation)


@st.composite
def conv_problems(draw):
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    eh, ew = dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1
    h = draw(st.integers(max(1, eh - 2 * padding[0]), 9))
    w = draw(st.integers(max(1, ew - 2 * padding[1]), 9))
    return {
        "n": draw(st.integers(1, 3)),
        "c": draw(st.integers(1, 7)),
        "k": draw(st.integers(1, 7)),
        "r1": draw(st.integers(1, 5)),
        "r2": draw(st.integers(1, 5)),
        "kernel": (kh, kw),
        "hw": (h, w),
        "stride": stride,
        "padding": padding,
        "dilation": dilation,
        "bias": draw(st.booleans()),
        "channels_last": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**16)),
    }


def _make(p, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(p["seed"])
    kh, kw = p["kernel"]
    x = torch.randn(p["n"], p["c"], *p["hw"], generator=g, dtype=dtype)
    if p["channels_last"]:
        x = x.contiguous(memory_format=torch.channels_last)
    c0 = torch.randn(p["r1"], p["c"], 1, 1, generator=g, dtype=dtype)
    c1 = torch.randn(p["r2"], p["r1"], kh, kw, generator=g, dtype=dtype)
    c2 = torch.randn(p["k"], p["r2"], 1, 1, generator=g, dtype=dtype)
    b = torch.randn(p["k"], generator=g, dtype=dtype) if p["bias"] else None
    ts = [t.to(device) if t is not None else None for t in (x, c0, c1, c2, b)]
    return ts


# --- op vs dense reference (CPU, float64) ------------------------------------------------------


@settings(max_examples=40)
@given(p=conv_problems())
def test_forward_and_gradients_match_dense_conv(p):
    x, c0, c1, c2, b = _make(p)
    leaves = [t.requires_grad_() for t in (x, c0, c1, c2, b) if t is not None]
    conv_args = (p["stride"], p["padding"], p["dilation"])
    y = tt_conv2d(x, c0, c1, c2, b, *conv_args)
    ref = _dense_ref(x, c0, c1, c2, b, *conv_args)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    expected_format = torch.channels_last if p["channels_last"] and not x.is_contiguous() else None
    if expected_format is not None:
        assert y.is_contiguous(memory_format=expected_format)
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(y, leaves, g)
    ref_grads = torch.autograd.grad(ref, leaves, g)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    "mask", [[True, False, False, False], [False, True, True, True], [False, False, True, False]]
)
def test_backward_mask_computes_only_requested(mask):
    p = dict(n=2, c=5, k=6, r1=3, r2=4, kernel=(3, 3), hw=(7, 6), stride=(2, 1), padding=(1, 1),
             dilation=(1, 2), bias=False, channels_last=False, seed=3)
    x, c0, c1, c2, _ = _make(p)
    args = ([2, 1], [1, 1], [1, 2])
    go = torch.randn_like(tt_conv2d(x, c0, c1, c2, None, *args))
    full = torch.ops.torchrec_tt.tt_conv2d_backward(go, x, c0, c1, c2, *args, [True] * 4)
    part = torch.ops.torchrec_tt.tt_conv2d_backward(go, x, c0, c1, c2, *args, mask)
    for f, q, m in zip(full, part, mask):
        if m:
            torch.testing.assert_close(q, f)
        else:
            assert q.numel() == 0


def test_gradcheck_small():
    p = dict(n=1, c=3, k=2, r1=2, r2=3, kernel=(2, 3), hw=(5, 4), stride=(1, 2), padding=(1, 0),
             dilation=(2, 1), bias=True, channels_last=False, seed=1)
    ts = [t.requires_grad_() for t in _make(p)]
    assert torch.autograd.gradcheck(
        lambda *a: tt_conv2d(*a, stride=(1, 2), padding=(1, 0), dilation=(2, 1)), tuple(ts)
    )


def _opcheck_samples(device="cpu", dtype=torch.float64):
    out = []
    for i, (cl, bias, stride, dil) in enumerate(
        [(False, True, 1, 1), (True, False, 2, 1), (True, True, 1, 2)]
    ):
        p = dict(n=2, c=4, k=5, r1=3, r2=2, kernel=(3, 3), hw=(6, 7), stride=(stride, stride),
                 padding=(1, 1), dilation=(dil, dil), bias=bias, channels_last=cl, seed=10 + i)
        x, c0, c1, c2, b = _make(p, dtype, device)
        args = [[stride, stride], [1, 1], [dil, dil]]
        out.append((x, c0, c1, c2, b, args))
    return out


@pytest.mark.parametrize("idx", range(3))
def test_opcheck(idx):
    x, c0, c1, c2, b, args = _opcheck_samples()[idx]
    for t in (x, c0, c1, c2) + ((b,) if b is not None else ()):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.torchrec_tt.tt_conv2d.default, (x, c0, c1, c2, b, *args))
    go = torch.randn_like(tt_conv2d(x, c0, c1, c2, b, *args)).detach()
    torch.library.opcheck(
        torch.ops.torchrec_tt.tt_conv2d_backward.default,
        (go, x.detach(), c0.detach(), c1.detach(), c2.detach(), *args, [True, False, True, True]),
    )


def test_meta_shapes():
    x = torch.empty(2, 8, 10, 9, device="meta").contiguous(memory_format=torch.channels_last)
    m = TTConv2d(8, 6, 3, stride=2, padding=1, ranks=(4, 4), device="meta")
    y = m(x)
    assert y.shape == (2, 6, 5, 5) and y.device.type == "meta"
    assert y.is_contiguous(memory_format=torch.channels_last)


# --- bad input ----------------------------------------------------------------------------------


def test_op_rejects_bad_input():
    x = torch.randn(1, 4, 6, 6)
    c0, c1, c2 = torch.randn(3, 4, 1, 1), torch.randn(2, 3, 3, 3), torch.randn(5, 2, 1, 1)
    a = ([1, 1], [0, 0], [1, 1])
    with pytest.raises(RuntimeError, match="input must be 4-D"):
        tt_conv2d(x[0], c0, c1, c2, None, *a)
    with pytest.raises(RuntimeError, match=r"core0 must have shape \[r1, C=4"):
        tt_conv2d(x, torch.randn(3, 5, 1, 1), c1, c2, None, *a)
    with pytest.raises(RuntimeError, match=r"core1 must have shape \[r2, r1=3"):
        tt_conv2d(x, c0, torch.randn(2, 4, 3, 3), c2, None, *a)
    with pytest.raises(RuntimeError, match=r"core2 must have shape \[K, r2=2"):
        tt_conv2d(x, c0, c1, torch.randn(5, 3, 1, 1), None, *a)
    with pytest.raises(RuntimeError, match="core1 is Double but input is Float"):
        tt_conv2d(x, c0, c1.double(), c2, None, *a)
    with pytest.raises(RuntimeError, match=r"bias must have shape \[K=5\]"):
        tt_conv2d(x, c0, c1, c2, torch.randn(4), *a)
    with pytest.raises(RuntimeError, match="stride must be >= 1"):
        tt_conv2d(x, c0, c1, c2, None, [0, 1], [0, 0], [1, 1])
    with pytest.raises(RuntimeError, match="padding must be >= 0"):
        tt_conv2d(x, c0, c1, c2, None, [1, 1], [-1, 0], [1, 1])
    with pytest.raises(RuntimeError, match="smaller than the dilated kernel"):
        tt_conv2d(x, c0, c1, c2, None, [1, 1], [0, 0], [4, 4])
    with pytest.raises(RuntimeError, match="floating-point"):
        tt_conv2d(x.long(), c0.long(), c1.long(), c2.long(), None, *a)
    go = torch.randn(1, 5, 3, 3)
    with pytest.raises(RuntimeError, match=r"grad_output must have shape \[1, 5, 4, 4\]"):
        torch.ops.torchrec_tt.tt_conv2d_backward(go, x, c0, c1, c2, *a, [True] * 4)


def test_module_rejects_bad_options():
    with pytest.raises(ValueError, match="groups=2 is not supported"):
        TTConv2d(4, 4, 3, groups=2)
    with pytest.raises(ValueError, match="padding_mode"):
        TTConv2d(4, 4, 3, padding_mode="mirror")
    with pytest.raises(ValueError, match="ranks must be >= 1"):
        TTConv2d(4, 4, 3, ranks=(0, 2))
    with pytest.raises(ValueError, match="'same' needs stride 1"):
        TTConv2d(4, 4, 3, stride=2, padding="same")
    with pytest.raises(ValueError, match="asymmetric"):
        TTConv2d(4, 4, 2, padding="same")
    with pytest.raises(ValueError, match="groups=2"):
        TTConv2d.from_conv(nn.Conv2d(4, 4, 3, groups=2), ranks=2)
    with pytest.raises(TypeError, match="expected nn.Conv2d"):
        TTConv2d.from_conv(nn.ConvTranspose2d(4, 4, 3), ranks=2)
    m = TTConv2d(4, 6, 3, ranks=2)
    with pytest.raises(ValueError, match="expected 4 input channels, got 5"):
        m(torch.randn(1, 5, 8, 8))
    with pytest.raises(ValueError, match="3-D"):
        m(torch.randn(8, 8))


def test_ranks_clamped_with_warning():
    with pytest.warns(UserWarning, match=r"clamped to \(4, 4\)"):
        m = TTConv2d(4, 4, 1, ranks=(9, 9))
    assert m.ranks == (4, 4)
    assert max_tt_conv_ranks(4, 6, (3, 3)) == (4, 6)
    assert max_tt_conv_ranks(64, 2, (3, 3)) == (18, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TTConv2d(16, 16, 3, ranks=(16, 16))  # within bounds: no warning


# --- module: options, from_conv, accounting -----------------------------------------------------


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
def test_module_matches_conv_with_its_full_weight(padding_mode):
    torch.manual_seed(0)
    m = TTConv2d(6, 5, (3, 2), stride=(1, 2), padding=(1, 1), dilation=(2, 1), ranks=(3, 4),
                 padding_mode=padding_mode, dtype=torch.float64)
    dense = nn.Conv2d(6, 5, (3, 2), stride=(1, 2), padding=(1, 1), dilation=(2, 1),
                      padding_mode=padding_mode, dtype=torch.float64)
    with torch.no_grad():
        dense.weight.copy_(m.full_weight())
        dense.bias.copy_(m.bias)
    x = torch.randn(2, 6, 9, 8, dtype=torch.float64)
    torch.testing.assert_close(m(x), dense(x))
    torch.testing.assert_close(m(x[0]), dense(x[0]))  # unbatched


def test_same_padding():
    m = TTConv2d(3, 4, 5, padding="same", dilation=2, ranks=3, dtype=torch.float64)
    x = torch.randn(1, 3, 11, 12, dtype=torch.float64)
    assert m(x).shape == (1, 4, 11, 12)


def test_init_variance_matches_conv2d_default():
    torch.manual_seed(0)
    m = TTConv2d(64, 64, 3, ranks=(32, 32))
    fan_in = 64 * 9
    var = m.full_weight().var().item()
    assert 0.7 / (3 * fan_in) < var < 1.3 / (3 * fan_in)


def test_from_conv_exact_at_full_rank():
    torch.manual_seed(1)
    conv = nn.Conv2d(6, 7, 3, stride=2, padding=1, dtype=torch.float64)
    r1, r2 = max_tt_conv_ranks(6, 7, (3, 3))
    tt = TTConv2d.from_conv(conv, ranks=(r1, r2))
    torch.testing.assert_close(tt.full_weight(), conv.weight, rtol=1e-10, atol=1e-12)
    x = torch.randn(2, 6, 9, 9, dtype=torch.float64)
    torch.testing.assert_close(tt(x), conv(x), rtol=1e-10, atol=1e-10)
    assert (tt.stride, tt.padding) == ((2, 2), (1, 1))


def test_from_conv_error_falls_with_rank():
    torch.manual_seed(2)
    conv = nn.Conv2d(16, 16, 3)
    w = conv.weight.detach().double()
    errs = []
    for r in (1, 2, 4, 8, 12, 16):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tt = TTConv2d.from_conv(conv, ranks=(r, r))
        errs.append(((tt.full_weight().double() - w).norm() / w.norm()).item())
    assert all(b <= a + 1e-9 for a, b in zip(errs, errs[1:])), errs
    assert errs[0] > 0.5 and errs[-1] < 1e-5, errs


def test_from_conv_clamps_with_warning():
    conv = nn.Conv2d(4, 3, 3)
    with pytest.warns(UserWarning, match="clamped"):
        tt = TTConv2d.from_conv(conv, ranks=(100, 100))
    assert tt.ranks == max_tt_conv_ranks(4, 3, (3, 3))
    torch.testing.assert_close(tt.full_weight(), conv.weight, rtol=1e-4, atol=1e-6)


def test_tt_svd_shapes():
    c0, c1, c2 = tt_svd_conv_weight(torch.randn(10, 8, 3, 3), ranks=(5, 6))
    assert c0.shape == (5, 8, 1, 1) and c1.shape == (6, 5, 3, 3) and c2.shape == (10, 6, 1, 1)


def test_parameter_and_flop_accounting():
    m = TTConv2d(160, 320, 3, stride=2, padding=1, ranks=(32, 16))
    counts = m.parameter_counts()
    assert counts["tt"] == sum(p.numel() for p in m.parameters())
    assert counts["tt"] == 32 * 160 + 16 * 32 * 9 + 320 * 16 + 320
    assert counts["dense"] == 320 * 160 * 9 + 320
    assert math.isclose(m.compression_ratio(), counts["dense"] / counts["tt"])
    f = m.flops((32, 32), batch=2)
    assert f["tt"] == 2 * 2 * (32 * 32 * 160 * 32 + 16 * 16 * (32 * 16 * 9 + 16 * 320))
    assert f["dense"] == 2 * 2 * 16 * 16 * 320 * 160 * 9


def test_module_trains():
    torch.manual_seed(0)
    target = nn.Conv2d(4, 4, 3, padding=1)
    m = TTConv2d(4, 4, 3, padding=1, ranks=(4, 4))
    opt = torch.optim.Adam(m.parameters(), lr=3e-2)
    x = torch.randn(8, 4, 8, 8)
    with torch.no_grad():
        y = target(x)
    first = None
    for _ in range(60):
        loss = F.mse_loss(m(x), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * first


def test_autocast_runs_in_autocast_dtype():
    m = TTConv2d(8, 8, 3, padding=1, ranks=4)
    x = torch.randn(2, 8, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert m.core1.grad is not None and m.core1.grad.dtype == torch.float32


def test_exported_names():
    assert torchrec_tt.TTConv2d is TTConv2d
    assert torchrec_tt.modules.TTConv2d is TTConv2d


# --- CUDA (fused kernels) -------------------------------------------------------------------------

_CUDA_TOL = {torch.float32: 5e-3, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def _rel_err(got, want):
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()


def _cuda_case(n, c, k, r1, r2, hw, kernel=3, stride=1, padding=1, dilation=1, dtype=torch.float32,
               channels_last=True, bias=True, seed=0):
    p = dict(n=n, c=c, k=k, r1=r1, r2=r2, kernel=(kernel, kernel), hw=hw, stride=(stride, stride),
             padding=(padding, padding), dilation=(dilation, dilation), bias=bias,
             channels_last=channels_last, seed=seed)
    ref_ts = _make(p, torch.float64)
    # Scale the cores so activations stay O(1).
    x, c0, c1, c2, b = ref_ts
    c0 = c0 / math.sqrt(c)
    c1 = c1 / math.sqrt(r1 * kernel * kernel)
    c2 = c2 / math.sqrt(r2)
    ref_ts = [x, c0, c1, c2, b]
    dev = [t.to("cuda", dtype) if t is not None else None for t in ref_ts]
    if channels_last:
        dev[0] = dev[0].contiguous(memory_format=torch.channels_last)
    return ref_ts, dev, ([stride] * 2, [padding] * 2, [dilation] * 2)


def _fused_plan(x, c0, c1, c2, args):
    return list(torch.ops.torchrec_tt.tt_conv2d_kernel_info(x, c0, c1, c2, *args))


CUDA_CASES = [
    # (n, c, k, r1, r2, hw, kernel, stride, padding, dilation, channels_last)
    (2, 32, 48, 16, 16, (9, 11), 3, 1, 1, 1, True),
    (3, 64, 64, 32, 32, (16, 16), 3, 1, 1, 1, True),
    (2, 40, 24, 8, 24, (8, 8), 3, 1, 1, 1, False),
    (2, 32, 32, 20, 12, (13, 7), 3, 2, 1, 1, True),
    (1, 48, 16, 64, 64, (10, 12), 3, 1, 2, 2, True),
    (2, 16, 16, 16, 16, (7, 9), 1, 1, 0, 1, True),
    (2, 24, 40, 16, 32, (12, 10), 5, 1, 2, 1, True),
    (1, 12, 10, 5, 7, (6, 6), 3, 1, 1, 1, True),  # channels not a multiple of the vector width
    (1, 16, 16, 96, 80, (6, 6), 3, 1, 1, 1, True),  # ranks above the fused limit: fallback
]


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", range(len(CUDA_CASES)))
def test_cuda_forward_and_backward_match_reference(case, dtype):
    n, c, k, r1, r2, hw, kernel, stride, padding, dilation, cl = CUDA_CASES[case]
    ref_ts, dev, args = _cuda_case(n, c, k, r1, r2, hw, kernel, stride, padding, dilation, dtype, cl,
                                   seed=case)
    torch.backends.cudnn.allow_tf32 = True
    y = tt_conv2d(*dev, *args)
    want = _dense_ref(*ref_ts, *args)
    assert y.dtype == dtype and y.shape == want.shape
    if cl and not dev[0].is_contiguous():
        assert y.is_contiguous(memory_format=torch.channels_last)
    assert _rel_err(y.cpu(), want) < _CUDA_TOL[dtype]
    # Gradients against float64 autograd through the dense reference.
    go64 = torch.randn_like(want)
    leaves64 = [t.clone().requires_grad_() for t in ref_ts[:4]]
    ref_grads = torch.autograd.grad(_dense_ref(*leaves64, ref_ts[4], *args), leaves64, go64)
    go = go64.to("cuda", dtype)
    got = torch.ops.torchrec_tt.tt_conv2d_backward(go, *dev[:4], *args, [True] * 4)
    for name, g, r in zip(("input", "core0", "core1", "core2"), got, ref_grads):
        assert g.shape == r.shape, name
        assert _rel_err(g.cpu(), r) < 2 * _CUDA_TOL[dtype], name
    # Input-gradient-only and core-gradient-only masks agree with the full call.
    # (The input-gradient-only call may take the fused kernel while the full call composes
    # cuDNN convolutions, so they agree to rounding, not bit for bit.)
    gi = torch.ops.torchrec_tt.tt_conv2d_backward(go, *dev[:4], *args, [True, False, False, False])
    assert all(g.numel() == 0 for g in gi[1:])
    assert _rel_err(gi[0].cpu(), ref_grads[0]) < 2 * _CUDA_TOL[dtype]
    gc = torch.ops.torchrec_tt.tt_conv2d_backward(go, *dev[:4], *args, [False, True, True, True])
    assert gc[0].numel() == 0
    for a, b in zip(gc[1:], got[1:]):
        assert _rel_err(a.cpu(), b.cpu().double()) < _CUDA_TOL[dtype]


@requires_cuda
def test_cuda_fused_paths_are_taken_on_wrn_shapes():
    """The fused kernels (not the cuDNN fallback) run on the benchmark's shapes."""
    for c, hw in ((160, 32), (320, 16), (640, 8)):
        for dtype in (torch.bfloat16, torch.float32):
            _, dev, args = _cuda_case(2, c, c, 32, 32, (hw, hw), dtype=dtype)
            info = _fused_plan(*dev[:4], args)
            assert info[0] == 1 and info[1] == 1, (c, hw, dtype, info)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_wrn_shapes_match_reference(dtype):
    for c, hw in ((160, 32), (320, 16), (640, 8)):
        ref_ts, dev, args = _cuda_case(4, c, c, 32, 32, (hw, hw), dtype=dtype, seed=c)
        y = tt_conv2d(*dev, *args)
        assert _rel_err(y.cpu(), _dense_ref(*ref_ts, *args)) < _CUDA_TOL[dtype]


@requires_cuda
@pytest.mark.parametrize("warps_n", ["2", "4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_warp_column_splits_match_reference(monkeypatch, warps_n, dtype):
    """Both column splits of the fused kernel's warps (8 or 16 warps per block; the planner picks
    by grid size) compute the same convolution, forward and input gradient, at ranks 32 and 64."""
    monkeypatch.setenv("TORCHREC_TT_CONV_WARPS_N", warps_n)
    for r, c, hw in ((32, 64, (16, 16)), (64, 48, (9, 12))):
        ref_ts, dev, args = _cuda_case(3, c, c, r, r, hw, dtype=dtype, seed=r)
        assert _fused_plan(*dev[:4], args)[:2] == [1, 1]
        y = tt_conv2d(*dev, *args)
        assert _rel_err(y.cpu(), _dense_ref(*ref_ts, *args)) < _CUDA_TOL[dtype]
        leaves = [t.clone().requires_grad_() for t in ref_ts[:1]]
        go64 = torch.randn_like(y.cpu().double())
        (want,) = torch.autograd.grad(_dense_ref(*leaves, *ref_ts[1:], *args), leaves, go64)
        gi = torch.ops.torchrec_tt.tt_conv2d_backward(
            go64.to("cuda", dtype), *dev[:4], *args, [True, False, False, False])[0]
        assert _rel_err(gi.cpu(), want) < 2 * _CUDA_TOL[dtype]


@requires_cuda
def test_cuda_output_fully_written_and_deterministic():
    _, dev, args = _cuda_case(3, 64, 96, 32, 32, (15, 17), dtype=torch.bfloat16)
    a = tt_conv2d(*dev, *args)
    b = tt_conv2d(*dev, *args)
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@requires_cuda
def test_cuda_fp32_without_tf32_is_exact_fp32():
    ref_ts, dev, args = _cuda_case(2, 32, 32, 16, 16, (8, 8), dtype=torch.float32)
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        y = tt_conv2d(*dev, *args)
    finally:
        torch.backends.cudnn.allow_tf32 = old
    assert _rel_err(y.cpu(), _dense_ref(*ref_ts, *args)) < 1e-5


@requires_cuda
def test_cuda_opcheck():
    # With gradients in float64 (the cuDNN composition, made deterministic: opcheck compares
    # eager and AOT-compiled backward results bit-closely, and TF32 cuDNN weight-gradient
    # algorithms are not deterministic), and forward-only through the fused kernel.
    old = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True
    try:
        for x, c0, c1, c2, b, args in _opcheck_samples("cuda", torch.float64):
            for t in (x, c0, c1, c2) + ((b,) if b is not None else ()):
                t.requires_grad_()
            torch.library.opcheck(torch.ops.torchrec_tt.tt_conv2d.default, (x, c0, c1, c2, b, *args))
        for dtype in (torch.bfloat16, torch.float32):
            for cl in (True, False):
                _, dev, args = _cuda_case(2, 16, 24, 8, 8, (6, 7), dtype=dtype, channels_last=cl)
                assert _fused_plan(*dev[:4], args)[0] == 1
                torch.library.opcheck(torch.ops.torchrec_tt.tt_conv2d.default, (*dev, *args))
    finally:
        torch.backends.cudnn.deterministic = old


@requires_cuda
@pytest.mark.parametrize("path", ["fused", "composed"])  # the module's two paths (issue 19)
def test_cuda_module_matches_cpu(path):
    torch.manual_seed(0)
    m = TTConv2d(32, 32, 3, padding=1, ranks=(16, 16), path=path)
    x = torch.randn(2, 32, 12, 12)
    want = m(x)
    got = m.cuda()(x.cuda().contiguous(memory_format=torch.channels_last))
    assert _rel_err(got.cpu(), want.double()) < 5e-3
