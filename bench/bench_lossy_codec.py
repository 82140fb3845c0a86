"""Throughput and compression ratio of the error-bounded lossy comms codec.

Throughput (GB/s of float32 input) of encode, decode and both, on the device given, for an
all-to-all-sized tensor (``--batch`` rows x ``--tables`` tables x ``--dim`` columns, per
``--ranks`` destination chunks), at each bound, for both implementations: ``torch-op`` (the
reference, ``impl="reference"``) and ``compiled`` (the ``torchrec_tt::lossy_encode`` /
``lossy_decode`` ops, when built for the device). Rows: ``core`` (``encode_groups`` /
``decode_groups`` on the grouped tensor), ``blocks`` (``encode_blocks`` / ``decode_blocks`` on
the pooled ``[rows, tables * dim]`` layout in place, what the codec calls) and ``codec a2a``
(the TorchRec codec path: one forward and one backward pooled all-to-all of ``--ranks``
simulated ranks, ``simulate_pooled_all_to_all``, wall time including the host work).

On CUDA the core and blocks rows are device time (CUDA events around each call) with the L2
flushed before each call (a 2 x 50 MB write, as FBGEMM's benchmarks do), so the input comes from
HBM; ``--no_flush_l2`` measures L2-warm back-to-back calls instead. The compiled encode's
NaN/inf check is the lazy device flag (no host sync); the torch-op one synchronises
(``--no_check_finite`` turns both off)::

    python bench/bench_lossy_codec.py --device cuda              # the lead's H200 run
    python bench/bench_lossy_codec.py --device cpu --batch 1024  # small, on the CPU

``--captured FILE.pt`` (from ``bench/capture_pooled.py``) instead reports the compression
ratio on captured pooled embeddings and gradients, per capture step, against fp32 and
TorchRec's INT8 qcomms (FBGEMM row-wise, rows of 32 values: 40 bytes per 32 values), and the
entropy of the codes (what an ideal entropy stage would add).

``--count_host`` counts the host work of the ``codec a2a`` call sequence (the codec's own calls
only, not the simulated exchange around them), per call sequence (forward + backward of
``--ranks`` simulated ranks): ops the torch profiler records under the codec's methods (all,
and those called from Python directly), ops as dispatched (``TorchDispatchMode``), Python
function calls (cProfile) and the calls per codec method. The counts are deterministic; run it
on the CPU (the small default batch is enough: the counts do not depend on it) or on CUDA,
where the lazy NaN/inf flag adds its polling::

    python bench/bench_lossy_codec.py --count_host --device cpu --batch 64
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import math
import os
import pstats
import statistics
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torchrec.distributed.types import QuantizedCommCodecs

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from torchrec_tt.sharding.lossy_codec import (  # noqa: E402
    NonFiniteFlag,
    bits_for_bound,
    compiled_available,
    decode_blocks,
    decode_groups,
    encode_blocks,
    encode_groups,
)
from torchrec_tt.sharding.lossy_comms import error_bounded_qcomm_codecs  # noqa: E402
from torchrec_tt.sharding.testing import simulate_pooled_all_to_all  # noqa: E402

INT8_BYTES_PER_VALUE = 40 / 32  # FBGEMM fused 8-bit row-wise, row_dim 32 (TorchRec's default)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, repeats: int, warmup: int = 2,
          flush: torch.Tensor | None = None) -> float:
    """Median seconds of ``fn()``: on CUDA device time from events (``flush`` written before
    each call evicts the L2), else wall time."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        marks = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                 for _ in range(repeats)]
        for start, end in marks:
            if flush is not None:
                flush.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return statistics.median(s.elapsed_time(e) for s, e in marks) / 1e3
    return _wall(fn, device, repeats, warmup=0)


def _gbs(nbytes: int, seconds: float) -> str:
    """GB/s with 3 significant digits (the CPU's are small)."""
    v = nbytes / seconds / 1e9
    return f"{v:.0f}" if v >= 100 else f"{v:.2f}" if v >= 1 else f"{v:.3g}"


def _wall(fn, device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median wall seconds of ``fn()`` (device-synchronised)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def throughput(a: argparse.Namespace) -> None:
    device = torch.device(a.device)
    g = torch.Generator(device=device).manual_seed(0)
    ranks, b, t, d = a.ranks, a.batch, a.tables, a.dim
    # pooled-embedding-like values: per-table scales spread over two decades
    scales = torch.logspace(-1, 1, t, device=device).repeat_interleave(d)
    x = torch.randn(ranks * b, t * d, generator=g, device=device) * scales
    grouped = x.view(ranks, b, t, d).permute(0, 2, 1, 3).reshape(ranks, t, b * d).contiguous()
    in_bytes = x.numel() * 4
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    flush = None
    if device.type == "cuda" and a.flush_l2:
        flush = torch.empty(100 * 2**20 // 4, dtype=torch.float32, device=device)
    impls = ["reference"] + (["compiled"] if compiled_available(device) else [])
    label = {"reference": "torch-op", "compiled": "compiled"}
    print(f"device {name}; input {ranks} chunks x {b} rows x {t} tables x {d} = "
          f"{in_bytes / 2**20:.1f} MiB float32; median of {a.repeats}; "
          + ("device time, L2 flushed" if flush is not None else
             "device time, L2 warm" if device.type == "cuda" else "wall time"))
    print(f"{'path':<10} {'impl':<9} {'bound':>6} {'bits':>4} {'ratio':>6} {'enc ms':>8} "
          f"{'dec ms':>8} {'enc GB/s':>9} {'dec GB/s':>9} {'enc+dec GB/s':>12}")
    rows2d = x.view(ranks, b, t * d)  # the pooled layout the codec encodes in place
    for bound in [float(s) for s in a.bounds.split(",")]:
        bits = [bits_for_bound(bound)] * t
        for impl in impls:
            flag = NonFiniteFlag() if impl == "compiled" else None
            enc = encode_groups(grouped, bits, a.check_finite, flag=flag, impl=impl)
            ratio = in_bytes / enc.numel()
            cases = {
                "core": (lambda: encode_groups(grouped, bits, a.check_finite, flag=flag,
                                               impl=impl),
                         lambda: decode_groups(enc, t, b * d, bits, impl=impl)),
                "blocks": (lambda: encode_blocks(rows2d, bits, d, check_finite=a.check_finite,
                                                 flag=flag, impl=impl),
                           lambda: decode_blocks(encb, b, d, bits, impl=impl)),
            }
            encb = encode_blocks(rows2d, bits, d, check_finite=a.check_finite, impl=impl)
            for path, (fe, fd) in cases.items():
                te = _time(fe, device, a.repeats, flush=flush)
                td = _time(fd, device, a.repeats, flush=flush)
                print(f"{path:<10} {label[impl]:<9} {bound:>6g} {bits[0]:>4} {ratio:>5.2f}x "
                      f"{te * 1e3:>8.3f} {td * 1e3:>8.3f} {_gbs(in_bytes, te):>9} "
                      f"{_gbs(in_bytes, td):>9} {_gbs(in_bytes, te + td):>12}")
            if flag is not None:
                flag.check()
            # TorchRec codec path: forward and backward all-to-all of `ranks` simulated ranks,
            # each rank sending its [ranks * b/ranks ...]: every rank owns t/ranks tables
            per = max(1, t // ranks)
            emb = [x[:, r * per * d:(r + 1) * per * d].contiguous() for r in range(ranks)]
            grads = [x[: b, : per * ranks * d].contiguous() * 1e-3 for _ in range(ranks)]
            codecs = [error_bounded_qcomm_codecs(bound, block_dim=d, table_wise=False,
                                                 check_finite=a.check_finite, codec_impl=impl)
                      ["POOLED_EMBEDDINGS_ALL_TO_ALL"] for _ in range(ranks)]
            tc = _wall(lambda: simulate_pooled_all_to_all(codecs, emb, grads), device, a.repeats)
            moved = 4 * (sum(e.numel() for e in emb) + sum(gr.numel() for gr in grads))
            print(f"{'codec a2a':<10} {label[impl]:<9} {bound:>6g} {bits[0]:>4} {'':>6} "
                  f"{'':>8} {'':>8} {'':>9} {'':>9} {_gbs(moved, tc):>12}   (fwd+bwd, "
                  f"{ranks} ranks, {moved / 2**20:.1f} MiB, wall {tc * 1e3:.3f} ms)")


def _entropy_bits(codes: torch.Tensor) -> float:
    counts = torch.bincount(codes.reshape(-1)).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log2()).sum())


def captured(a: argparse.Namespace) -> None:
    d = torch.load(a.captured)
    src = d["args"].get("data") or "synthetic"
    print(f"{a.captured}: {src}; steps {d['steps']}; [B, F, D] = {tuple(d['emb'].shape[1:])}")
    print(f"{'tensor':<6} {'step':>5} {'bound':>6} {'bits':>4} {'vs fp32':>8} {'vs INT8':>8} "
          f"{'code entropy b/v':>16} {'entropy-coded vs fp32':>21} {'max err / (bound x R)':>21}")
    for kind in ("emb", "grad"):
        for ti, step in enumerate(d["steps"]):
            x = d[kind][ti].float()  # [B, F, D]
            bsz, f, dim = x.shape
            grouped = x.permute(1, 0, 2).reshape(1, f, bsz * dim)  # one group per table
            for bound in [float(s) for s in a.bounds.split(",")]:
                bits = [bits_for_bound(bound)] * f
                enc = encode_groups(grouped, bits)
                dec = decode_groups(enc, f, bsz * dim, bits)
                rng = grouped.amax(-1) - grouped.amin(-1)
                err = ((dec - grouped).abs().amax(-1) / (bound * rng).clamp_min(1e-38)).max()
                ratio = grouped.numel() * 4 / enc.numel()
                lo = grouped.amin(-1, keepdim=True)
                levels = (1 << bits[0]) - 1
                unit = torch.where(rng.unsqueeze(-1) > 0, (grouped - lo) / rng.unsqueeze(-1),
                                   torch.zeros_like(grouped))
                codes = torch.round(unit * levels).long()
                ent = statistics.mean(_entropy_bits(codes[0, t]) for t in range(f))
                ent_ratio = 32 / (ent + 64 / (bsz * dim))
                print(f"{kind:<6} {step:>5} {bound:>6g} {bits[0]:>4} {ratio:>7.2f}x "
                      f"{ratio * INT8_BYTES_PER_VALUE / 4:>7.2f}x {ent:>16.2f} "
                      f"{ent_ratio:>20.2f}x {float(err):>21.3f}")


class _Counted:
    """Wraps a codec: each method call runs under a profiler range named ``codec.<method>`` and,
    counts the call while ``on`` and runs it under cProfile while ``cprof`` (calls nested in
    one are not re-entered)."""

    def __init__(self, codec, state: dict) -> None:
        self._codec, self._state = codec, state

    def __getattr__(self, name: str):
        attr = getattr(self._codec, name)
        if not callable(attr):
            return attr
        state = self._state

        def call(*args, **kwargs):
            if state["depth"]:
                return attr(*args, **kwargs)
            state["depth"] += 1
            state["calls"][name] += state["on"]
            try:
                with torch.profiler.record_function(f"codec.{name}"):
                    if state["cprof"]:
                        state["cprofile"].enable()
                    try:
                        return attr(*args, **kwargs)
                    finally:
                        if state["cprof"]:
                            state["cprofile"].disable()
            finally:
                state["depth"] -= 1
        return call


def count_host(a: argparse.Namespace) -> None:
    """Host work per codec a2a call sequence (see the module docstring)."""
    device = torch.device(a.device)
    impl = "compiled" if compiled_available(device) else "reference"
    g = torch.Generator(device=device).manual_seed(0)
    ranks, b, t, d = a.ranks, a.batch, a.tables, a.dim
    scales = torch.logspace(-1, 1, t, device=device).repeat_interleave(d)
    x = torch.randn(ranks * b, t * d, generator=g, device=device) * scales
    per = max(1, t // ranks)
    emb = [x[:, r * per * d:(r + 1) * per * d].contiguous() for r in range(ranks)]
    grads = [x[: b, : per * ranks * d].contiguous() * 1e-3 for _ in range(ranks)]
    bound = float(a.bounds.split(",")[0])
    dispatched: collections.Counter[str] = collections.Counter()
    state = {"depth": 0, "on": 0, "cprof": 0, "calls": collections.Counter(),
             "cprofile": cProfile.Profile()}

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func.overloadpacket)
            if state["depth"] and state["on"] and not name.startswith("profiler."):
                dispatched[name] += 1
            return func(*args, **(kwargs or {}))

    codecs = []
    for _ in range(ranks):
        c = error_bounded_qcomm_codecs(bound, block_dim=d, table_wise=not a.no_table_wise,
                                       check_finite=a.check_finite, codec_impl=impl)
        c = c["POOLED_EMBEDDINGS_ALL_TO_ALL"]
        codecs.append(QuantizedCommCodecs(forward=_Counted(c.forward, state),
                                          backward=_Counted(c.backward, state)))
    policies = {id(c.forward._codec.policy): c.forward._codec.policy for c in codecs}

    def once() -> None:
        simulate_pooled_all_to_all(codecs, emb, grads)
        for p in policies.values():  # a training step's policy.step()
            p.step()

    for _ in range(3):  # warm-up: layouts, cached widths
        once()
    _sync(device)
    n = a.repeats
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            once()
        _sync(device)
    state["on"] = 1
    with Count():
        for _ in range(n):
            once()
        _sync(device)
    state["on"], state["cprof"] = 0, 1  # cProfile on its own: the counter's calls stay out
    for _ in range(n):
        once()
    _sync(device)
    events = prof.events()

    def codec_range(e) -> bool:
        return e.name.startswith("codec.")

    def under_codec(e) -> bool:
        p = e.cpu_parent
        while p is not None:
            if codec_range(p):
                return True
            p = p.cpu_parent
        return False

    ops = [e for e in events if not codec_range(e) and under_codec(e)]
    top = [e for e in ops if e.cpu_parent is not None and codec_range(e.cpu_parent)]
    stats = pstats.Stats(state["cprofile"])
    own = {k: v for k, v in stats.stats.items()  # type: ignore[attr-defined]
           if "_lsprof" not in k[2]}  # cProfile's own disable()
    py_calls = sum(v[1] for v in own.values())
    by_op = collections.Counter(e.name for e in top)
    print(f"host work of the codec per call sequence (forward + backward, {ranks} simulated ranks,"
          f" {b} rows x {t} tables x {d}, impl {impl}, bound {bound}, "
          f"table_wise {not a.no_table_wise}, device {device.type}; mean of {n} sequences; "
          "deterministic counts)")
    print(f"  codec method calls:        {sum(state['calls'].values()) / n:.1f}  "
          + ", ".join(f"{k} {v / n:g}" for k, v in sorted(state["calls"].items())))
    print(f"  profiler ops (all nested): {len(ops) / n:.1f}")
    print(f"  profiler ops from Python:  {len(top) / n:.1f}  "
          + ", ".join(f"{k} {v / n:g}" for k, v in by_op.most_common()))
    print(f"  dispatched ops:            {sum(dispatched.values()) / n:.1f}  "
          + ", ".join(f"{k} {v / n:g}" for k, v in dispatched.most_common()))
    print(f"  Python calls (cProfile):   {py_calls / n:.1f}")
    funcs = sorted(own.items(), key=lambda kv: kv[1][1], reverse=True)[:12]
    print("  most called: " + ", ".join(f"{os.path.basename(k[0])}:{k[2]} {v[1] / n:g}"
                                        for k, v in funcs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--bounds", default="0.05,0.02,0.01")
    ap.add_argument("--batch", type=int, default=8192, help="rows per destination rank")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--tables", type=int, default=26)
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--no_check_finite", dest="check_finite", action="store_false",
                    help="skip the NaN/inf check (the torch-op one syncs with the host)")
    ap.add_argument("--no_flush_l2", dest="flush_l2", action="store_false",
                    help="CUDA: time L2-warm calls (no L2 flush before each)")
    ap.add_argument("--captured", default=None, help="capture file: compression ratio mode")
    ap.add_argument("--count_host", action="store_true",
                    help="count the codec a2a call sequence's host work (ops, Python calls)")
    ap.add_argument("--no_table_wise", action="store_true",
                    help="--count_host: the policy without the per-table level (as the "
                         "throughput rows)")
    a = ap.parse_args()
    if a.count_host:
        count_host(a)
    elif a.captured:
        captured(a)
    else:
        throughput(a)


if __name__ == "__main__":
    main()
