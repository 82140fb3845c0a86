"""TTConv2d's dispatch between the fused op and the cuDNN/oneDNN composition (issue 19).

Forced paths agree (forward and gradients); the measured plan is cached per key and never taken
while tracing or capturing; bad path values are rejected naming what is wrong; the module and the
composed path compile without graph breaks. CUDA cases are skipped, with the reason, without a GPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import torchrec_tt
from torchrec_tt import TTConv2d, conv_dispatch
from torchrec_tt.conv_ops import tt_conv2d_composed
from torchrec_tt.modules import conv as conv_module

requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (fused TT conv kernels, CUDA graphs)"
)


@pytest.fixture(autouse=True)
def _fresh_dispatch(monkeypatch):
    """Every test starts from the defaults: no plans, no settings, no environment overrides."""
    monkeypatch.delenv(conv_dispatch.ENV_PATH, raising=False)
    monkeypatch.delenv(conv_dispatch.ENV_BENCHMARK, raising=False)
    conv_dispatch.clear_plans()
    with conv_dispatch.flags(path=None, benchmark=None):
        yield
    conv_dispatch.clear_plans()


class _PathSpy:
    """Counts which path function the module runs (replaces TTConv2d's path table)."""

    def __init__(self, monkeypatch) -> None:
        self.calls: list[str] = []
        table = dict(conv_module._PATH_FNS)

        def wrap(name):
            def fn(*args):
                self.calls.append(name)
                return table[name](*args)
            return fn

        monkeypatch.setattr(conv_module, "_PATH_FNS", {p: wrap(p) for p in table})


CASES = [
    # (C, K, kernel, stride, padding, dilation, ranks, bias, padding_mode, hw)
    (5, 7, 3, 1, 1, 1, (3, 4), True, "zeros", (9, 8)),
    (6, 4, (3, 2), (2, 1), (1, 0), (1, 2), (4, 2), False, "zeros", (10, 7)),
    (4, 6, 3, 2, 2, 2, (2, 3), True, "reflect", (8, 9)),
    (3, 5, 1, 1, 0, 1, (3, 2), True, "zeros", (5, 5)),
]


def _pair_of_modules(case, dtype=torch.float64, device="cpu"):
    c, k, kernel, stride, padding, dilation, ranks, bias, mode, _ = case
    torch.manual_seed(0)
    fused = TTConv2d(c, k, kernel, stride, padding, dilation, bias, ranks, padding_mode=mode,
                     path="fused", device=device, dtype=dtype)
    composed = TTConv2d(c, k, kernel, stride, padding, dilation, bias, ranks, padding_mode=mode,
                        path="composed", device=device, dtype=dtype)
    composed.load_state_dict(fused.state_dict())
    return fused, composed


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_forced_paths_agree_forward_and_gradients(case, channels_last, monkeypatch):
    spy = _PathSpy(monkeypatch)
    fused, composed = _pair_of_modules(case)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, case[0], *case[-1], generator=g, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    outs, grads = [], []
    for m in (fused, composed):
        xr = x.clone().requires_grad_()
        y = m(xr)
        (y * torch.arange(y.numel(), dtype=y.dtype).reshape(y.shape).cos()).sum().backward()
        outs.append(y)
        grads.append([xr.grad] + [p.grad for p in m.parameters()])
    assert spy.calls == ["fused", "composed"]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-10)
    # Same memory format out of both paths (the op's rule: channels-last in, channels-last out).
    assert outs[0].is_contiguous(memory_format=torch.channels_last) == outs[1].is_contiguous(
        memory_format=torch.channels_last)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    # The composition is the dense convolution with the reconstructed weight.
    torch.testing.assert_close(outs[1], _dense_reference(composed, x), rtol=1e-9, atol=1e-9)


def _dense_reference(m: TTConv2d, x: torch.Tensor) -> torch.Tensor:
    padding = m.padding
    if m.padding_mode != "zeros":
        x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]), mode=m.padding_mode)
        padding = (0, 0)
    return F.conv2d(x, m.full_weight(), m.bias, m.stride, padding, m.dilation)


def test_forced_paths_agree_unbatched_and_under_autocast():
    fused, composed = _pair_of_modules(CASES[0], dtype=torch.float32)
    x = torch.randn(5, 9, 8)
    torch.testing.assert_close(fused(x), composed(x), rtol=1e-5, atol=1e-5)
    assert composed(x).shape == (7, 9, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yf, yc = fused(x[None]), composed(x[None])
    assert yf.dtype == yc.dtype == torch.bfloat16
    torch.testing.assert_close(yf.float(), yc.float(), rtol=3e-2, atol=3e-2)


def test_composed_function_matches_op():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 7, 6, generator=g, dtype=torch.float64)
    c0, c1, c2 = (torch.randn(3, 4, 1, 1, generator=g, dtype=torch.float64),
                  torch.randn(2, 3, 3, 3, generator=g, dtype=torch.float64),
                  torch.randn(5, 2, 1, 1, generator=g, dtype=torch.float64))
    b = torch.randn(5, generator=g, dtype=torch.float64)
    for args in ((1, 1, 1), ((2, 1), (0, 1), (1, 2))):
        torch.testing.assert_close(tt_conv2d_composed(x, c0, c1, c2, b, *args),
                                   torchrec_tt.tt_conv2d(x, c0, c1, c2, b, *args))


def test_default_without_benchmark_is_the_composition(monkeypatch):
    spy = _PathSpy(monkeypatch)
    m = TTConv2d(4, 4, 3, padding=1, ranks=(2, 2))
    x = torch.randn(2, 4, 6, 6)
    m(x)
    with torch.no_grad():
        m(x)
    assert spy.calls == ["composed", "composed"]
    assert conv_dispatch.plans() == {}  # defaults are not measurements
    assert conv_dispatch.default_path("cuda", True) == conv_dispatch.default_path("cpu", False) == "composed"


def test_measured_plan_is_cached_per_key(monkeypatch):
    spy = _PathSpy(monkeypatch)
    measured: list[bool] = []

    def fake_measure(run, device):
        measured.append(True)
        for p in ("fused", "composed"):  # the timed callables do run
            run(p)()
        return conv_dispatch.ConvPlan("fused", 1.0, 2.0)

    monkeypatch.setattr(conv_dispatch, "measure_plan", fake_measure)
    conv_dispatch.settings.benchmark = True
    m = TTConv2d(4, 6, 3, padding=1, ranks=(2, 3))
    x = torch.randn(2, 4, 6, 6)
    spy.calls.clear()
    m(x)                                  # training key: measured once
    m(x)
    assert len(measured) == 1 and spy.calls[-2:] == ["fused", "fused"]
    with torch.no_grad():
        m(x)                              # forward-only: a new key
        m(x)
    assert len(measured) == 2
    m(torch.randn(3, 4, 6, 6))            # new batch size: new key
    m(torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last))  # new layout
    assert len(measured) == 4
    keys = list(conv_dispatch.plans())
    assert len(set(keys)) == 4
    assert {k.train for k in keys} == {True, False}
    assert {k.shape for k in keys} == {(2, 6, 6, False), (3, 6, 6, False), (2, 6, 6, True)}
    # A second layer of the same geometry shares the plans; another geometry gets its own.
    twin, other = TTConv2d(4, 6, 3, padding=1, ranks=(2, 3)), TTConv2d(4, 6, 3, padding=1, ranks=(3, 3))
    twin(x)
    assert len(measured) == 4 and twin.plans() == m.plans() == conv_dispatch.plans()
    other(x)
    assert len(measured) == 5 and list(other.plans()) == [k for k in conv_dispatch.plans() if k not in m.plans()]
    conv_dispatch.clear_plans()
    m(x)
    assert len(measured) == 6


def test_real_measurement_picks_the_faster_and_leaves_no_trace():
    conv_dispatch.settings.benchmark = True
    m = TTConv2d(8, 8, 3, padding=1, ranks=(4, 4))
    x = torch.randn(2, 8, 10, 10, requires_grad=True)
    rng = torch.get_rng_state()
    assert m.path_for(x) in ("fused", "composed")
    assert torch.equal(torch.get_rng_state(), rng)  # measuring draws no random numbers
    assert all(p.grad is None for p in m.parameters()) and x.grad is None
    (key, plan), = conv_dispatch.plans().items()
    assert key.train and key.device == "cpu" and key.dtype == "torch.float32"
    assert plan.fused_ms > 0 and plan.composed_ms > 0
    assert plan.path == ("fused" if plan.fused_ms < plan.composed_ms else "composed")


def test_precedence_module_then_settings_then_plan(monkeypatch):
    spy = _PathSpy(monkeypatch)
    monkeypatch.setattr(conv_dispatch, "measure_plan",
                        lambda run, device: conv_dispatch.ConvPlan("fused", 1.0, 2.0))
    conv_dispatch.settings.benchmark = True
    auto, forced = TTConv2d(4, 4, 3, ranks=(2, 2)), TTConv2d(4, 4, 3, ranks=(2, 2), path="composed")
    x = torch.randn(1, 4, 5, 5)
    auto(x), forced(x)
    assert spy.calls == ["fused", "composed"]
    with conv_dispatch.flags(path="composed"):
        auto(x)
    monkeypatch.setenv(conv_dispatch.ENV_PATH, "composed")
    conv_dispatch.settings.path = None        # (re-)read the environment
    auto(x)
    monkeypatch.setenv(conv_dispatch.ENV_PATH, "fused")
    conv_dispatch.settings.path = None
    forced(x)
    assert spy.calls[2:] == ["composed", "composed", "composed"]
    assert conv_dispatch.settings.path == "fused"
    monkeypatch.delenv(conv_dispatch.ENV_PATH)
    assert conv_dispatch.settings.path == "fused"  # read once, not on every call
    conv_dispatch.settings.path = None
    assert conv_dispatch.settings.path == "auto"
    auto.path = "composed"
    auto(x)
    assert spy.calls[-1] == "composed" and "path='composed'" in repr(auto)
    monkeypatch.setenv(conv_dispatch.ENV_BENCHMARK, "0")
    conv_dispatch.settings.benchmark = None   # back to the environment: off
    conv_dispatch.clear_plans()
    TTConv2d(4, 4, 3, ranks=(2, 2))(x)
    assert conv_dispatch.plans() == {} and spy.calls[-1] == "composed"


def test_bad_path_values_are_rejected_with_names(monkeypatch):
    with pytest.raises(ValueError, match=r"TTConv2d: path must be one of 'auto', 'fused', 'composed', got 'fast'"):
        TTConv2d(4, 4, 3, ranks=2, path="fast")
    with pytest.raises(TypeError, match=r"TTConv2d: path must be one of .*got None \(NoneType\)"):
        TTConv2d(4, 4, 3, ranks=2, path=None)  # type: ignore[arg-type]
    m = TTConv2d(4, 4, 3, ranks=2, path="fused")
    with pytest.raises(ValueError, match=r"TTConv2d.path: path must be one of .*got 'Fused'"):
        m.path = "Fused"
    assert m.path == "fused"  # unchanged
    with pytest.raises(ValueError, match=r"settings.path must be one of .*got 'cudnn'"):
        conv_dispatch.settings.path = "cudnn"
    with pytest.raises(TypeError, match=r"settings.benchmark must be a bool or None, got 1"):
        conv_dispatch.settings.benchmark = 1  # type: ignore[assignment]
    with pytest.raises(ValueError, match=r"conv_dispatch.flags: path must be one of"):
        with conv_dispatch.flags(path="x", benchmark=True):
            pass
    assert conv_dispatch.settings.path == "auto" and conv_dispatch.settings.benchmark is False
    x = torch.randn(1, 4, 5, 5)
    monkeypatch.setenv(conv_dispatch.ENV_PATH, "fast")
    conv_dispatch.settings.path = None
    with pytest.raises(ValueError, match=r"\$TORCHREC_TT_CONV_PATH must be one of .*got 'fast'"):
        TTConv2d(4, 4, 3, ranks=2)(x)
    monkeypatch.delenv(conv_dispatch.ENV_PATH)
    conv_dispatch.settings.path = None
    monkeypatch.setenv(conv_dispatch.ENV_BENCHMARK, "maybe")
    conv_dispatch.settings.benchmark = None
    with pytest.raises(ValueError, match=r"\$TORCHREC_TT_CONV_BENCHMARK must be one of .*got 'maybe'"):
        TTConv2d(4, 4, 3, ranks=2)(x)
    with pytest.raises(ValueError, match=r"TTConv2d: path must be one of"):
        TTConv2d.from_conv(torch.nn.Conv2d(4, 4, 3), ranks=2, path="dense")


def test_composed_path_names_the_tensor_on_the_wrong_device_or_dtype():
    m = TTConv2d(4, 4, 3, ranks=(2, 2), path="composed", device="meta")
    with pytest.raises(RuntimeError, match="input is on cpu and core0 is on meta"):
        m(torch.randn(1, 4, 5, 5))
    assert m(torch.randn(1, 4, 5, 5, device="meta")).shape == (1, 4, 3, 3)
    m.path = "auto"
    with conv_dispatch.flags(benchmark=True):  # nothing to time on meta: the default, no plan
        assert m(torch.randn(1, 4, 5, 5, device="meta")).shape == (1, 4, 3, 3)
    assert conv_dispatch.plans() == {}
    m = TTConv2d(4, 4, 3, ranks=(2, 2), path="composed")
    with pytest.raises(RuntimeError, match=r"input is torch.float64 but the layer's parameters are torch.float32"):
        m(torch.randn(1, 4, 5, 5, dtype=torch.float64))


def test_no_measurement_while_tracing_with_jit(monkeypatch):
    conv_dispatch.settings.benchmark = True
    monkeypatch.setattr(conv_dispatch, "measure_plan", lambda *a: pytest.fail("measured while tracing"))
    m = TTConv2d(4, 4, 3, ranks=(2, 2))
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        traced = torch.jit.trace(m, (x,), check_trace=False)
        assert conv_dispatch.plans() == {}
        with conv_dispatch.flags(benchmark=False):
            torch.testing.assert_close(traced(x), m(x))


# --- torch.compile -------------------------------------------------------------------------


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        TTConv2d(8, 8, 3, padding=1, ranks=(4, 4)), torch.nn.ReLU(),
        TTConv2d(8, 6, 3, stride=2, padding=1, ranks=(3, 3), padding_mode="reflect"),
    )


def _graph_ops(model, x):
    """Targets of the ops in the graphs dynamo hands to the backend."""
    targets: list[str] = []

    def backend(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op in ("call_function", "call_method"))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=backend, fullgraph=True)(x)
    return targets


@pytest.mark.parametrize("path", ["auto", "fused", "composed"])
def test_compiles_without_graph_breaks_and_matches_eager(path):
    model = _model()
    for m in model:
        if isinstance(m, TTConv2d):
            m.path = path
    x = torch.randn(2, 8, 9, 9)
    torch._dynamo.reset()
    explain = torch._dynamo.explain(model)(x)
    assert explain.graph_break_count == 0, [r.reason for r in explain.break_reasons]
    assert explain.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    ys = [compiled(xs[0]), model(xs[1])]
    for y in ys:
        y.square().sum().backward()
    torch.testing.assert_close(ys[0], ys[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-5, atol=1e-5)


def test_compiled_graph_takes_the_measured_plan_as_a_constant(monkeypatch):
    model = _model()
    x = torch.randn(2, 8, 9, 9)
    fused_op = "torchrec_tt.tt_conv2d"
    ops = _graph_ops(model, x)
    assert fused_op not in ops and "<built-in method conv2d" in " ".join(ops)  # no plan: the default
    monkeypatch.setattr(conv_dispatch, "measure_plan",
                        lambda run, device: conv_dispatch.ConvPlan("fused", 1.0, 2.0))
    with conv_dispatch.flags(benchmark=True):
        model(x)                                  # eager: measures (training key)
        assert len(conv_dispatch.plans()) == 2
        ops = _graph_ops(model, x)
    assert ops.count(fused_op) == 2
    # Dynamic batch size: still one graph, still the plan (it agrees for the one shape measured).
    torch._dynamo.reset()
    xd = torch.randn(3, 8, 9, 9)
    torch._dynamo.mark_dynamic(xd, 0)
    explain = torch._dynamo.explain(model)(xd)
    assert explain.graph_break_count == 0, [r.reason for r in explain.break_reasons]


# --- CUDA ----------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_forced_paths_agree(dtype):
    fused, composed = _pair_of_modules((64, 64, 3, 1, 1, 1, (32, 32), True, "zeros", (16, 16)),
                                       dtype=dtype, device="cuda")
    x = torch.randn(4, 64, 16, 16, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
    tol = 3e-2 if dtype == torch.bfloat16 else 5e-3
    grads = []
    for m in (fused, composed):
        xr = x.clone().requires_grad_()
        y = m(xr)
        y.float().square().sum().backward()
        grads.append([y.float(), xr.grad.float()] + [p.grad.float() for p in m.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item())


@requires_cuda
def test_cuda_measured_plan_uses_events_and_graph_capture_measures_nothing():
    conv_dispatch.settings.benchmark = True
    m = TTConv2d(64, 64, 3, padding=1, bias=False, ranks=(16, 16), device="cuda")
    x = torch.randn(8, 64, 16, 16, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        path = m.path_for(x)
        (key, plan), = conv_dispatch.plans().items()
        assert plan.path == path and key.device.startswith("cuda") and not key.train
        # Capture with a new key (another batch size): no measurement (it would synchronise).
        xc = torch.randn(4, 64, 16, 16, device="cuda").contiguous(memory_format=torch.channels_last)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            with conv_dispatch.flags(benchmark=False):
                m(xc)  # warm-up outside capture, no plan made
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            yc = m(xc)
        assert len(conv_dispatch.plans()) == 1
        graph.replay()
        torch.cuda.synchronize()
        m.path = conv_dispatch.default_path("cuda", False)
        # The same path eagerly; cuDNN may pick another TF32 algorithm outside the capture.
        torch.testing.assert_close(yc, m(xc), rtol=1e-2, atol=1e-2)


def test_export_measures_nothing_and_matches_eager(monkeypatch):
    # Non-strict export (the default) runs forward in Python on fake tensors, outside dynamo:
    # torch.compiler.is_compiling() is true there too, so no timing on fake tensors.
    conv_dispatch.settings.benchmark = True
    monkeypatch.setattr(conv_dispatch, "measure_plan", lambda *a: pytest.fail("measured while exporting"))
    model = _model().eval()
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        ep = torch.export.export(model, (x,), strict=False,
                                 dynamic_shapes={"input": {0: torch.export.Dim("batch")}})
        assert conv_dispatch.plans() == {}
        with conv_dispatch.flags(benchmark=False):
            for n in (2, 5):
                xn = torch.randn(n, 8, 9, 9)
                torch.testing.assert_close(ep.module()(xn), model(xn))


@requires_cuda
@pytest.mark.parametrize("path", ["fused", "composed"])
def test_cuda_training_step_is_graph_capturable(path):
    """Forward and backward of either path captured by make_graphed_callables, replayed on new
    data, equal to eager (TF32 tolerance)."""
    import copy

    torch.manual_seed(0)
    m = TTConv2d(64, 64, 3, padding=1, ranks=(16, 16), path=path, device="cuda")
    ref = copy.deepcopy(m)
    x = torch.randn(8, 64, 16, 16, device="cuda").contiguous(memory_format=torch.channels_last)
    graphed = torch.cuda.make_graphed_callables(m, (x.clone().requires_grad_(),))
    m.zero_grad(set_to_none=True)
    xs = torch.randn_like(x).requires_grad_()
    xr = xs.detach().clone().requires_grad_()
    y, yr = graphed(xs), ref(xr)
    y.square().sum().backward()
    yr.square().sum().backward()
    pairs = [(y, yr), (xs.grad, xr.grad)] + [(p.grad, q.grad) for p, q in zip(m.parameters(), ref.parameters())]
    for a, b in pairs:
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2 * b.abs().max().item())
