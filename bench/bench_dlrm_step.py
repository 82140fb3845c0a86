"""One-GPU DLRM training step: the trainer's model (examples/dlrm/train.py ``build()``), TT vs
uncompressed, with the batches already on the GPU and no host read inside the timed steps.

    python bench/bench_dlrm_step.py [--batch-sizes 8192 65536] [--tt-cores 2 3] [--steps 50] [--profile]

Per batch size both models are built (8 device-made synthetic batches each, drawn once), 10
warm-up steps run, then ``--repeats`` windows of ``--steps`` steps (forward, backward,
optimizer) are timed between two CUDA events (one synchronisation at the end of a window),
alternating uncompressed / TT windows (and their order) so that a drift of the machine reaches both; the median
window is reported. Python's garbage collector is counted: a full (generation-2) collection walks
every object of both models (TorchRec modules, awaitables), milliseconds on the host of a
host-bound step, so the table says how many ran inside the timed windows; ``--gc-freeze`` moves
everything built before the timing into the permanent generation (``gc.freeze()``), as a training
loop can. Prints a markdown table: ms per step, TT / uncompressed, compression, the most GPU
memory a window allocated beyond what was resident (both models are resident while timed).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "dlrm"))

import train  # noqa: E402  (examples/dlrm/train.py)


class _FullCollections:
    """Counts generation-2 collections while active (a ``gc.callbacks`` hook)."""

    def __init__(self) -> None:
        self.count = 0
        self.active = False
        gc.callbacks.append(self._on)

    def _on(self, phase: str, info: dict) -> None:
        if self.active and phase == "start" and info.get("generation") == 2:
            self.count += 1


class _Model:
    """One built model with its resident batches: warm-up once, then timed windows."""

    def __init__(self, args: argparse.Namespace, tt: bool, device: torch.device,
                 pg: dist.ProcessGroup) -> None:
        data = train.load_data(args, 0, device)
        self.tt = tt
        self.dmp, self.optimizer, self.ebc = train.build(args, data, tt, device, pg)
        it = data.train_batches(args, 0, 1, 0)
        self.batches = [next(it).to(device) for _ in range(8)]
        self.dmp.train()
        self.peak_mib = 0.0  # the most a window allocated beyond what was resident
        for i in range(10):
            self.step(i)
        torch.cuda.synchronize()

    def step(self, i: int) -> None:
        self.optimizer.zero_grad()
        loss, _ = self.dmp(self.batches[i % len(self.batches)])
        loss.backward()
        self.optimizer.step()

    def window(self, steps: int, collections: _FullCollections) -> float:
        """ms per step over ``steps`` steps, one synchronisation at the end."""
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        collections.active = True
        start.record()
        for i in range(steps):
            self.step(i)
        end.record()
        end.synchronize()
        collections.active = False
        self.peak_mib = max(self.peak_mib, (torch.cuda.max_memory_allocated() - resident) / 2**20)
        return start.elapsed_time(end) / steps

    def profile(self, batch_size: int) -> None:
        """Where the step's time goes: GPU time per kernel and host time per op."""
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for i in range(5):
                self.step(i)
            torch.cuda.synchronize()
        print(f"\n== profile: {'TT' if self.tt else 'uncompressed'}, batch {batch_size}, 5 steps")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=70))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[8192, 65536])
    ap.add_argument("--tt-cores", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--embedding-dim", type=int, default=16)
    ap.add_argument("--profile", action="store_true", help="also print a torch.profiler table per model")
    ap.add_argument("--repeats", type=int, default=3, help="timed windows per model (median reported)")
    ap.add_argument("--gc-freeze", action="store_true",
                    help="gc.freeze() after building the models (no full collection walks them)")
    a = ap.parse_args()
    if a.steps < 1 or a.repeats < 1:
        ap.error("--steps and --repeats must be >= 1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", rank=0, world_size=1)
    pg = dist.group.WORLD
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    collections = _FullCollections()
    rows = []
    for batch in a.batch_sizes:
        base = train.parse_args(["--device", "cuda", "--nproc", "1", "--batch_size", str(batch),
                                 "--embedding_dim", str(a.embedding_dim)])
        plain = _Model(base, False, device, pg)
        for cores in a.tt_cores:
            args = train.parse_args(["--device", "cuda", "--nproc", "1", "--batch_size", str(batch),
                                     "--embedding_dim", str(a.embedding_dim), "--tt_cores", str(cores)])
            tt = _Model(args, True, device, pg)
            gc.collect()
            if a.gc_freeze:
                gc.freeze()
            collections.count = 0
            plain.peak_mib = 0.0
            times: dict[bool, list[float]] = {False: [], True: []}
            for r in range(a.repeats):  # the order alternates too: no position bias
                for model in ((plain, tt) if r % 2 == 0 else (tt, plain)):
                    times[model.tt].append(model.window(a.steps, collections))
            if a.profile:
                plain.profile(batch)
                tt.profile(batch)
            mem = tt.ebc.memory_stats()
            rows.append((batch, cores, statistics.median(times[True]), statistics.median(times[False]),
                         float(mem["compression"]), tt.peak_mib, plain.peak_mib, collections.count,
                         times))
            if a.gc_freeze:
                gc.unfreeze()
            del tt
            gc.collect()
            torch.cuda.empty_cache()
        del plain
        gc.collect()
        torch.cuda.empty_cache()
    print(f"\nDLRM (trainer's build(), D={a.embedding_dim}, 7 largest tables TT at R=32), one GPU, "
          f"GPU-resident batches, median of {a.repeats} alternating windows of {a.steps} steps "
          f"between CUDA events, gc.freeze() {'on' if a.gc_freeze else 'off'}")
    print("| batch | TT cores | TT ms/step | uncompressed ms/step | TT / uncompressed | compression | "
          "TT step extra MiB | uncompressed step extra MiB | full GCs in both models' windows | windows TT / uncompressed ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for batch, cores, t, p, comp, tpk, ppk, ngc, times in rows:
        spread = (" ".join(f"{x:.2f}" for x in times[True]) + " / "
                  + " ".join(f"{x:.2f}" for x in times[False]))
        print(f"| {batch} | {cores} | {t:.2f} | {p:.2f} | {t / p:.2f}x | {comp:.0f}x | {tpk:.0f} | "
              f"{ppk:.0f} | {ngc} | {spread} |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
