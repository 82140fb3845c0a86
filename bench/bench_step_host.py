"""Host cost of one DLRM training step: the trainer's model (examples/dlrm/train.py ``build()``),
TT vs uncompressed, counted in aten ops, Python calls and host milliseconds.

    nice python bench/bench_step_host.py [--device cpu|cuda] [--batch-size 64] [--scale 0.05]
        [--steps 30] [--tt-cores 2] [--top 15] [--loop model|trainer]
        [--tt-cache-fraction 0.01 [--tt-cache-refresh-steps 100]]

On a GPU both models are bound by host time at B=8,192 (docs/benchmarks.md, "One-GPU step
time"), so what the host does per step is what to cut. On the CPU at a tiny batch the kernels cost
little and the step is a proxy of that host work: the same Python runs the same dispatches, except
where a library picks a CPU path (``torch.optim.Adagrad`` runs tensor by tensor on the CPU, with
``foreach`` on CUDA; FBGEMM's CPU TBE; foreach ops run tensor by tensor underneath). Per model:

* ops/step: every op the profiler records (nested ones included), and the aten ops among them;
* dispatched ops/step: ops as Python and the autograd engine dispatch them (a foreach op counts
  once, as on a GPU, where it is a launch or a few): the closest count to the GPU's launches;
* Python calls/step (cProfile) and the median host ms per step over ``--steps`` timed steps (no
  profiler attached; on a shared machine a noisy number, unlike the counts);
* the dispatched-op difference between the models, and the top ops by self CPU time and Python
  functions by own time.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import json
import os
import pstats
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "dlrm"))
sys.path.insert(0, str(ROOT))  # this checkout's torchrec_tt, not an installed one

import train  # noqa: E402  (examples/dlrm/train.py)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(args: argparse.Namespace, tt: bool, device: torch.device,
            pg: dist.ProcessGroup) -> dict[str, Any]:
    argv = ["--device", device.type, "--nproc", "1", "--batch_size", str(args.batch_size),
            "--scale", str(args.scale), "--embedding_dim", str(args.embedding_dim)]
    if tt:
        argv += ["--tt_cores", str(args.tt_cores)]
        if args.tt_cache_fraction > 0:
            argv += ["--tt_cache_fraction", str(args.tt_cache_fraction),
                     "--tt_cache_refresh_steps", str(args.tt_cache_refresh_steps)]
    targs = train.parse_args(argv)
    data = train.load_data(targs, 0, device)
    dmp, optimizer, ebc = train.build(targs, data, tt, device, pg)
    tt_tables = int(ebc.memory_stats()["tt_tables"])
    it = data.train_batches(targs, 0, 1, 0)
    dmp.train()
    if args.loop == "trainer":
        # train.py's own step (TrainPipelineSparseDist over its batch iterator, comms meter,
        # losses kept on the device); the losses are read between the counted windows, as
        # train.py reads them every --log_every steps.
        loop = train.TrainLoop(targs, dmp, optimizer, it, device, pg, 1)
        batches: list[Any] = []

        def step(i: int) -> None:
            loop.step()
    else:
        loop = None
        batches = [next(it).to(device) for _ in range(4)]

        def step(i: int) -> None:
            optimizer.zero_grad()
            loss, _ = dmp(batches[i % len(batches)])
            loss.backward()
            optimizer.step()

    def read() -> None:  # the trainer's every---log_every read, outside the counted steps
        if loop is not None:
            loop.log.read()

    for i in range(5):
        step(i)
    _sync(device)
    read()
    times = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        step(i)
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    read()
    phases: list[tuple[float, ...]] = []
    if loop is None:
        # Host time of each phase with the GPU left running (no synchronisation inside the step),
        # then the wait for the GPU: where a host-bound step spends its time.
        for i in range(args.steps):
            t0 = time.perf_counter()
            optimizer.zero_grad()
            loss, _ = dmp(batches[i % len(batches)])
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            optimizer.step()
            t3 = time.perf_counter()
            _sync(device)
            t4 = time.perf_counter()
            phases.append(tuple((b - a) * 1e3 for a, b in ((t0, t1), (t1, t2), (t2, t3), (t3, t4))))

    n_prof = 5
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for i in range(n_prof):
            step(i)
        _sync(device)
    read()
    events = prof.events()
    ops = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    launches = sum(1 for e in ops if e.name in ("cudaLaunchKernel", "cuLaunchKernel",
                                                 "cudaLaunchKernelExC", "cudaMemcpyAsync"))
    averages = prof.key_averages()
    top_ops = sorted(averages, key=lambda a: a.self_cpu_time_total, reverse=True)[: args.top]

    # Ops as dispatched by Python and the autograd engine (a foreach op counts once, as on a GPU,
    # where it is one launch per chunk; on the CPU it runs tensor by tensor underneath).
    dispatched: collections.Counter[str] = collections.Counter()

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            dispatched[str(func.overloadpacket)] += 1
            return func(*args, **(kwargs or {}))

    with Count():
        for i in range(n_prof):
            step(i)
        _sync(device)
    read()

    cp = cProfile.Profile()
    cp.enable()
    for i in range(n_prof):
        step(i)
    _sync(device)
    cp.disable()
    read()
    stats = pstats.Stats(cp)
    calls = sum(v[1] for v in stats.stats.values())  # type: ignore[attr-defined]
    reattach: dict[str, float] = {}
    if loop is not None and loop.pipeline is not None:
        # What the first step after an evaluation or checkpoint adds: train.py detaches the
        # pipeline for them, and re-attaching re-runs TorchRec's model rewrite (an fx trace).
        train.detach_pipeline(loop.pipeline, dmp)
        cp_attach = cProfile.Profile()
        t0 = time.perf_counter()
        cp_attach.enable()
        loop.pipeline.attach(dmp)
        cp_attach.disable()
        reattach["ms"] = (time.perf_counter() - t0) * 1e3
        reattach["py_calls"] = sum(v[1] for v in pstats.Stats(cp_attach).stats.values())  # type: ignore[attr-defined]
    funcs = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[: args.top]  # type: ignore[attr-defined]
    cum = sorted(stats.stats.items(), key=lambda kv: kv[1][3], reverse=True)[: 2 * args.top]  # type: ignore[attr-defined]
    del dmp, optimizer, ebc, batches, loop
    return {
        "name": (f"TT {args.tt_cores}-core ({tt_tables} tables"
                 + (f", hot-row cache {args.tt_cache_fraction:g}" if args.tt_cache_fraction > 0 else "")
                 + ")") if tt else "uncompressed",
        "ops": len(ops) / n_prof,
        "aten": sum(1 for e in ops if e.name.startswith("aten::")) / n_prof,
        "dispatched": sum(dispatched.values()) / n_prof,
        "dispatched_by_op": {k: v / n_prof for k, v in dispatched.items()},
        "launches": launches / n_prof,
        "py_calls": calls / n_prof,
        "reattach": reattach,
        "ms": statistics.median(times),
        "ms_min": min(times),
        "top_ops": [(a.key, a.count / n_prof, a.self_cpu_time_total / n_prof / 1e3)
                    for a in top_ops],
        "top_funcs": [(f"{Path(k[0]).name}:{k[1]}({k[2]})", v[1] / n_prof, v[2] / n_prof * 1e3)
                      for k, v in funcs],
        "top_cum": [(f"{Path(k[0]).name}:{k[1]}({k[2]})", v[1] / n_prof, v[3] / n_prof * 1e3)
                    for k, v in cum],
        "phases": [statistics.median(col) for col in zip(*phases)] if phases else [],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--scale", type=float, default=0.05,
                    help="table sizes relative to Kaggle (the op counts do not depend on it; "
                    "on a GPU use 1.0 for the trainer's model)")
    ap.add_argument("--embedding-dim", type=int, default=16)
    ap.add_argument("--tt-cores", type=int, default=2)
    ap.add_argument("--tt-cache-fraction", type=float, default=0.0,
                    help="train.py's --tt_cache_fraction for the TT model (a hot-row cache of "
                    "each TT table; 0: none)")
    ap.add_argument("--tt-cache-refresh-steps", type=int, default=100,
                    help="train.py's --tt_cache_refresh_steps (with --tt-cache-fraction; the "
                    "counted steps include a refresh only if it falls in them)")
    ap.add_argument("--steps", type=int, default=30, help="timed steps (median reported)")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--loop", choices=("model", "trainer"), default="model",
                    help="model: zero_grad/forward/backward/step on 4 resident batches (as "
                    "bench_dlrm_step.py); trainer: train.py's step (train.TrainLoop: "
                    "TrainPipelineSparseDist over the synthetic batch iterator)")
    ap.add_argument("--models", nargs="+", choices=("tt", "uncompressed"),
                    default=["uncompressed", "tt"])
    ap.add_argument("--json", default=None, help="also write the results (counts per op) here")
    a = ap.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:  # a free one: back-to-back runs must not collide
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
    device = torch.device(a.device, 0) if a.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    torch.set_num_threads(1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"loop {a.loop}  device {device}  torch {torch.__version__}  batch {a.batch_size}  scale {a.scale}  "
          f"1 intra-op thread  load average {load:.1f}")
    results = [measure(a, m == "tt", device, dist.group.WORLD) for m in a.models]
    print("\n| model | ops/step | aten ops/step | dispatched ops/step | launches+memcpy/step | "
          "Python calls/step | host ms/step (median) | min |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['name']} | {r['ops']:.0f} | {r['aten']:.0f} | {r['dispatched']:.0f} | "
              f"{r['launches']:.0f} | {r['py_calls']:.0f} | {r['ms']:.2f} | {r['ms_min']:.2f} |")
    if any(r["phases"] for r in results):
        print("\n| model | zero_grad + forward host ms | backward host ms | optimizer.step host ms | "
              "then waiting for the device ms |\n|---|---|---|---|---|")
        for r in results:
            if r["phases"]:
                print(f"| {r['name']} | " + " | ".join(f"{x:.2f}" for x in r["phases"]) + " |")
    for r in results:
        if r["reattach"]:
            print(f"{r['name']}: re-attaching the pipeline (after an evaluation/checkpoint): "
                  f"{r['reattach']['py_calls']:.0f} Python calls, {r['reattach']['ms']:.1f} ms")
    if a.json:
        with open(a.json, "w") as f:
            json.dump([{k: v for k, v in r.items()} for r in results], f, indent=1)
    if len(results) == 2:  # where the two models' dispatches differ
        a_, b_ = results[0]["dispatched_by_op"], results[1]["dispatched_by_op"]
        diff = sorted(((b_.get(k, 0) - a_.get(k, 0), k) for k in set(a_) | set(b_)), reverse=True)
        print(f"\n== dispatched ops per step, {results[1]['name']} minus {results[0]['name']} "
              f"(ops that differ by >= 1)")
        print(f"| op | {results[0]['name']} | {results[1]['name']} | difference |\n|---|---|---|---|")
        for d, k in diff:
            if abs(d) >= 1:
                print(f"| {k} | {a_.get(k, 0):.0f} | {b_.get(k, 0):.0f} | {d:+.0f} |")
    for r in results:
        print(f"\n== {r['name']}: top {a.top} ops by self CPU time (per step)")
        print("| op | calls/step | self ms/step |\n|---|---|---|")
        for name, count, ms in r["top_ops"]:
            print(f"| {name} | {count:.0f} | {ms:.3f} |")
        print(f"\n== {r['name']}: top {a.top} Python functions by own time (cProfile, per step)")
        print("| function | calls/step | own ms/step |\n|---|---|---|")
        for name, count, ms in r["top_funcs"]:
            print(f"| {name} | {count:.0f} | {ms:.3f} |")
        print(f"\n== {r['name']}: top {2 * a.top} Python functions by cumulative time (cProfile, per step)")
        print("| function | calls/step | cumulative ms/step |\n|---|---|---|")
        for name, count, ms in r["top_cum"]:
            print(f"| {name} | {count:.0f} | {ms:.3f} |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
