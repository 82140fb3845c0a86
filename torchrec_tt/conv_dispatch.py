"""Which implementation runs a :class:`~torchrec_tt.TTConv2d` call: the fused op or the composition.

A TT convolution can run two ways that compute the same thing (up to rounding):

* ``"fused"``: the op ``torchrec_tt::tt_conv2d`` (:func:`torchrec_tt.tt_conv2d`): one fused
  kernel per call on CUDA; its backward is ``torchrec_tt::tt_conv2d_backward``, which saves only
  the input and recomputes the rank intermediates.
* ``"composed"``: three ``F.conv2d`` calls (1×1 C→r1, KH×KW r1→r2, 1×1 r2→K) through autograd
  (:func:`torchrec_tt.conv_ops.tt_conv2d_composed`), so cuDNN (or oneDNN on CPU) runs forward and
  backward, with bf16/fp16 tensor cores in the backward; autograd saves the input and the two
  rank intermediates ``t1 [N, r1, H, W]`` and ``t2 [N, r2, Ho, Wo]`` (``r1/C`` and ``r2/K`` of
  the activation sizes) instead of recomputing them.

The choice, per call, in this order:

1. ``TTConv2d(..., path="fused"|"composed")``: the module's own setting;
2. :data:`settings` ``.path`` (``"fused"``/``"composed"``; initially from the environment
   variable ``TORCHREC_TT_CONV_PATH=auto|fused|composed``, ``auto`` when unset);
3. with ``settings.benchmark`` on (initially ``TORCHREC_TT_CONV_BENCHMARK=1``; off by default,
   like ``torch.backends.cudnn.benchmark``): a **measured plan** per key, i.e. the first call with
   a new (device, dtype, TF32 setting, forward-only or training, layer geometry, input shape and
   memory format) times both paths (forward, or forward + backward when autograd records the
   call) on copies of the call's tensors and caches the faster one in :func:`plans`;
4. otherwise the **default**: ``"composed"`` on CUDA for training and inference (faster than the
   fused op at rank 32 on the WRN-28-10 stages, issue 19's H200 table; within 4% the other way
   for the bf16 training step at 160@32²), on CPU (the fused op is a composition of ATen
   convolutions there whose backward recomputes t1/t2: forward level, training step 1.17–1.38×
   slower, docs/benchmarks.md "Dispatch (issue 19)"), and on every other device (the fused op
   has CPU and CUDA kernels only).

Measuring never happens while a CUDA graph is being captured, under ``torch.compile`` /
``torch.export`` tracing or ``torch.jit.trace``; there a cached plan is used when one exists (under
tracing, one that agrees for every input shape measured for the layer), else the default. Under
``torch.compile`` the choice is a Python constant of the traced graph, so the dispatch adds no
graph break and no guard on the plan cache (so changing the settings or the plans afterwards
needs a recompile, ``torch._dynamo.reset()``). Only CPU and CUDA tensors are timed (other
devices take the default): CUDA events on CUDA (median of 10 after 3 warm-up calls),
``time.perf_counter`` on CPU (minimum of 3; noisy on a shared machine, docs/benchmarks.md), the
two paths interleaved. Plans live in this process only: each process (each DDP rank) measures
for itself, and ranks may pick different paths, which compute the same thing.

Example::

    import torchrec_tt.conv_dispatch as conv_dispatch
    conv_dispatch.settings.benchmark = True          # measure each new shape once
    with conv_dispatch.flags(path="fused"):          # force a path for a region
        y = conv(x)
    conv_dispatch.plans()                            # {ConvPlanKey: ConvPlan(path, fused_ms, composed_ms)}
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch

__all__ = [
    "ENV_BENCHMARK",
    "ENV_PATH",
    "PATHS",
    "ConvDispatchSettings",
    "ConvPlan",
    "ConvPlanKey",
    "check_conv_path",
    "clear_plans",
    "default_path",
    "flags",
    "plans",
    "settings",
    "time_calls",
    "time_ms",
]

PATHS: tuple[str, ...] = ("auto", "fused", "composed")
ENV_PATH = "TORCHREC_TT_CONV_PATH"
ENV_BENCHMARK = "TORCHREC_TT_CONV_BENCHMARK"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def check_conv_path(path: object, name: str = "path", where: str = "") -> str:
    """``path`` if it is one of :data:`PATHS`; else ``TypeError`` (not a string) or ``ValueError``
    naming ``name`` (prefixed by ``where``), the value and the allowed values."""
    pre = f"{where}: " if where else ""
    if not isinstance(path, str):
        raise TypeError(
            f"{pre}{name} must be one of {', '.join(map(repr, PATHS))}, got {path!r} "
            f"({type(path).__name__})"
        )
    if path not in PATHS:
        raise ValueError(f"{pre}{name} must be one of {', '.join(map(repr, PATHS))}, got {path!r}")
    return path


class ConvDispatchSettings:
    """Process-wide settings of the dispatch (the module-level :data:`settings`).

    ``path``: ``"auto"`` (measured plan or default), ``"fused"`` or ``"composed"``; a module's own
    ``path`` other than ``"auto"`` wins. ``benchmark``: measure each new key once (``auto`` only).
    Assigning ``None`` returns a setting to its environment variable's value (the variables are
    read when first needed and again after such an assignment, not on every call).
    """

    def __init__(self) -> None:
        self._path: str | None = None
        self._benchmark: bool | None = None
        # The environment variables, parsed when first needed (not on every call) and again
        # after a setting is assigned None.
        self._env_path: str | None = None
        self._env_benchmark: bool | None = None

    @property
    def path(self) -> str:
        if self._path is not None:
            return self._path
        if self._env_path is None:
            env = os.environ.get(ENV_PATH, "").strip()
            self._env_path = check_conv_path(env, name=f"${ENV_PATH}") if env else "auto"
        return self._env_path

    @path.setter
    def path(self, value: str | None) -> None:
        self._path = None if value is None else check_conv_path(
            value, name="torchrec_tt.conv_dispatch.settings.path"
        )
        self._env_path = None

    @property
    def benchmark(self) -> bool:
        if self._benchmark is not None:
            return self._benchmark
        if self._env_benchmark is None:
            env = os.environ.get(ENV_BENCHMARK, "").strip().lower()
            if env not in _TRUE and env not in _FALSE:
                raise ValueError(
                    f"${ENV_BENCHMARK} must be one of 1/true/yes/on or 0/false/no/off (or unset), "
                    f"got {os.environ[ENV_BENCHMARK]!r}"
                )
            self._env_benchmark = env in _TRUE
        return self._env_benchmark

    @benchmark.setter
    def benchmark(self, value: bool | None) -> None:
        if value is not None and not isinstance(value, bool):
            raise TypeError(
                "torchrec_tt.conv_dispatch.settings.benchmark must be a bool or None, got "
                f"{value!r} ({type(value).__name__})"
            )
        self._benchmark = value
        self._env_benchmark = None

    def __repr__(self) -> str:
        return f"ConvDispatchSettings(path={self.path!r}, benchmark={self.benchmark})"


settings = ConvDispatchSettings()


_UNSET = object()


@contextlib.contextmanager
def flags(*, path: object = _UNSET, benchmark: object = _UNSET) -> Iterator[ConvDispatchSettings]:
    """Sets :data:`settings` ``path`` and/or ``benchmark`` for a ``with`` block (validated before
    anything changes) and restores the previous values on exit."""
    old = (settings._path, settings._benchmark)
    new_path, new_bench = old
    if path is not _UNSET:
        new_path = None if path is None else check_conv_path(path, name="path", where="conv_dispatch.flags")
    if benchmark is not _UNSET:
        if benchmark is not None and not isinstance(benchmark, bool):
            raise TypeError(
                f"conv_dispatch.flags: benchmark must be a bool or None, got {benchmark!r} "
                f"({type(benchmark).__name__})"
            )
        new_bench = benchmark  # type: ignore[assignment]
    settings._path, settings._benchmark = new_path, new_bench
    settings._env_path = settings._env_benchmark = None
    try:
        yield settings
    finally:
        settings._path, settings._benchmark = old
        settings._env_path = settings._env_benchmark = None


class ConvPlanKey(NamedTuple):
    """What a measured plan is cached under."""

    device: str          # "cuda:0", "cpu", ...
    dtype: str           # the dtype the layer runs in (the autocast dtype under autocast)
    tf32: bool           # torch.backends.cudnn.allow_tf32 (decides the fused fp32 CUDA kernel)
    train: bool          # autograd records the call (forward + backward timed)
    geometry: tuple      # (C, K, r1, r2, KH, KW, stride, padding, dilation, bias)
    shape: tuple         # (N, H, W, channels_last)


@dataclass(frozen=True)
class ConvPlan:
    """A measured choice: the faster path and both times in milliseconds (the median of 10 on
    CUDA, the minimum of 3 on CPU)."""

    path: str
    fused_ms: float
    composed_ms: float


_PLANS: dict[ConvPlanKey, ConvPlan] = {}


def plans() -> dict[ConvPlanKey, ConvPlan]:
    """A copy of the measured plans (empty until a call measures one)."""
    return dict(_PLANS)


def clear_plans() -> None:
    """Forgets every measured plan (the next call of each key measures again)."""
    _PLANS.clear()


def default_path(device_type: str, train: bool) -> str:
    """The path taken without a measured plan (the rule in this module's docstring).

    CUDA: the composition, for training (cuDNN's bf16 tensor-core backward, saved rank
    intermediates) and for inference (three cuDNN convolutions were 1.1–1.6× faster than the
    fused kernel at rank 32 on all three WRN-28-10 stages, tf32 and bf16, on an H200). CPU: the
    composition too (the fused op is itself a composition of ATen convolutions on CPU, and its
    backward recomputes the rank intermediates). Other devices have no fused kernel. With
    benchmarking off this is what runs, so it must never be the clearly slower path.
    """
    # Kept a function of (device, train): the measurements give one answer today, a faster fused
    # kernel (issue 19, item 2) would change it per case.
    return "composed"


def requested_path(module_path: str) -> str:
    """The module's path unless it is ``"auto"``, else :data:`settings` ``.path``."""
    return module_path if module_path != "auto" else settings.path


def tf32_enabled() -> bool:
    return bool(torch.backends.cudnn.allow_tf32)


def choose_auto(
    device: torch.device, train: bool, make_key: Callable[[], ConvPlanKey],
    measure: Callable[[], ConvPlan] | None,
) -> str:
    """The path of an eager ``"auto"`` call: its measured plan, measured now when benchmarking is
    on and there is none (``measure`` is None where timing is not allowed, e.g. during CUDA-graph
    capture), else the default. ``make_key`` is called only when a plan could apply."""
    if not _PLANS and not settings.benchmark:
        return default_path(device.type, train)  # the common case, without building a key
    key = make_key()
    plan = _PLANS.get(key)
    if plan is not None:
        return plan.path
    if measure is not None and settings.benchmark:
        plan = measure()
        _PLANS[key] = plan
        return plan.path
    return default_path(device.type, train)


@torch.compiler.assume_constant_result
def choose_traced(
    module_path: str, device: str, dtype: str, train: bool, geometry: tuple
) -> str:
    """The path under ``torch.compile`` / ``torch.export`` tracing, evaluated once at trace time
    and kept as a constant of the graph. The input's batch and spatial sizes may be symbolic
    there, so a measured plan is used only if the plans measured for this layer agree for every
    input shape; otherwise the default."""
    requested = requested_path(module_path)
    if requested != "auto":
        return requested
    tf32 = tf32_enabled()
    found = {
        p.path for k, p in _PLANS.items()
        if (k.device, k.dtype, k.tf32, k.train, k.geometry) == (device, dtype, tf32, train, geometry)
    }
    if len(found) == 1:
        return found.pop()
    return default_path(device.split(":")[0], train)


# GPU cycles of spin queued before each timed call (~0.5 ms at 2 GHz): longer than a layer's
# host launch time, so the call's kernels are queued before its start event fires.
_QUEUE_AHEAD_CYCLES = 1_000_000


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Median milliseconds of ``fn()`` (see :func:`time_calls`)."""
    return statistics.median(time_calls({"fn": fn}, device, warmup, iters)["fn"])


def time_calls(
    fns: dict[str, Callable[[], object]], device: torch.device, warmup: int, iters: int,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Milliseconds of ``iters`` calls of each function, interleaved (one call of each in turn,
    so a change in the machine's load hits all alike), after ``warmup`` calls each. CUDA: events
    on the current stream around each call, each call queued behind a short GPU spin so that
    its launches are hidden and the events measure GPU time (timed from an idle queue, the
    composition's three launches read as GPU time: on the H200 that made the plan pick the fused
    forward where three cuDNN convolutions are 1.2-1.6x faster), one synchronisation at the end;
    elsewhere ``clock`` (wall clock; ``time.process_time`` measures this process's CPU time
    instead)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    if device.type == "cuda":
        with torch.cuda.device(device):
            events: dict[str, list[tuple[torch.cuda.Event, torch.cuda.Event]]] = {k: [] for k in fns}
            for _ in range(iters):
                for k, fn in fns.items():
                    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    torch.cuda._sleep(_QUEUE_AHEAD_CYCLES)
                    s.record()
                    fn()
                    e.record()
                    events[k].append((s, e))
            torch.cuda.synchronize(device)
            return {k: [s.elapsed_time(e) for s, e in v] for k, v in events.items()}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(iters):
        for k, fn in fns.items():
            t0 = clock()
            fn()
            times[k].append((clock() - t0) * 1e3)
    return times


def measure_plan(
    run: Callable[[str], Callable[[], object]], device: torch.device
) -> ConvPlan:
    """Times ``run("fused")()`` against ``run("composed")()`` and returns the faster as a
    :class:`ConvPlan`. CUDA: 3 warm-up and 10 timed calls each, the median; elsewhere 1 and 3,
    the minimum (the least disturbed by other processes on a shared CPU)."""
    cuda = device.type == "cuda"
    ms = time_calls({p: run(p) for p in ("fused", "composed")}, device, *((3, 10) if cuda else (1, 3)))
    reduce = statistics.median if cuda else min
    fused, composed = reduce(ms["fused"]), reduce(ms["composed"])
    return ConvPlan("fused" if fused < composed else "composed", fused, composed)
