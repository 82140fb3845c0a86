"""One-GPU DLRM training step: the trainer's model (examples/dlrm/train.py ``build()``), TT vs
uncompressed, with the batches already on the GPU and no host read inside the timed steps.

    python bench/bench_dlrm_step.py [--batch-sizes 8192 65536] [--tt-cores 2 3] [--steps 50] [--profile]

Per configuration: 8 device-made synthetic batches are drawn once, 10 warm-up steps run, then
``--steps`` steps (forward, backward, optimizer) are timed between two CUDA events (one
synchronisation at the end). Prints a markdown table: ms per step, TT / uncompressed, embedding
bytes, peak GPU memory.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "dlrm"))

import train  # noqa: E402  (examples/dlrm/train.py)


def time_model(args: argparse.Namespace, tt: bool, steps: int, device: torch.device,
               pg: dist.ProcessGroup, profile: bool = False) -> dict[str, float]:
    data = train.load_data(args, 0, device)
    dmp, optimizer, ebc = train.build(args, data, tt, device, pg)
    it = data.train_batches(args, 0, 1, 0)
    batches = [next(it).to(device) for _ in range(8)]
    dmp.train()

    def step(i: int) -> None:
        optimizer.zero_grad()
        loss, _ = dmp(batches[i % len(batches)])
        loss.backward()
        optimizer.step()

    for i in range(10):
        step(i)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(steps):
        step(i)
    end.record()
    end.synchronize()
    if profile:  # where the step's time goes: GPU time per kernel and host time per op
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for i in range(5):
                step(i)
            torch.cuda.synchronize()
        print(f"\n== profile: {'TT' if tt else 'uncompressed'}, batch {args.batch_size}, 5 steps")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=70))
    mem = ebc.memory_stats()
    out = {"ms": start.elapsed_time(end) / steps, "bytes": float(mem["bytes"]),
           "compression": float(mem["compression"]),
           "peak_mib": torch.cuda.max_memory_allocated() / 2**20}
    del dmp, optimizer, ebc, batches
    torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[8192, 65536])
    ap.add_argument("--tt-cores", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--embedding-dim", type=int, default=16)
    ap.add_argument("--profile", action="store_true", help="also print a torch.profiler table per model")
    a = ap.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", rank=0, world_size=1)
    pg = dist.group.WORLD
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    rows = []
    for batch in a.batch_sizes:
        base = train.parse_args(["--device", "cuda", "--nproc", "1", "--batch_size", str(batch),
                                 "--embedding_dim", str(a.embedding_dim)])
        plain = time_model(base, False, a.steps, device, pg, a.profile)
        for cores in a.tt_cores:
            args = train.parse_args(["--device", "cuda", "--nproc", "1", "--batch_size", str(batch),
                                     "--embedding_dim", str(a.embedding_dim), "--tt_cores", str(cores)])
            rows.append((batch, cores, time_model(args, True, a.steps, device, pg, a.profile), plain))
    print(f"\nDLRM (trainer's build(), D={a.embedding_dim}, 7 largest tables TT at R=32), one GPU, "
          f"GPU-resident batches, {a.steps} steps between CUDA events")
    print("| batch | TT cores | TT ms/step | uncompressed ms/step | TT / uncompressed | compression | "
          "TT peak MiB | uncompressed peak MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for batch, cores, t, p in rows:
        print(f"| {batch} | {cores} | {t['ms']:.2f} | {p['ms']:.2f} | {t['ms'] / p['ms']:.2f}x | "
              f"{t['compression']:.0f}x | {t['peak_mib']:.0f} | {p['peak_mib']:.0f} |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
