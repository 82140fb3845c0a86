"""A small multi-process harness for distributed checks (CPU, gloo).

TorchRec's own harness (``test_utils.test_sharding``) imports unshipped test modules, so tests,
examples and benchmarks use this one::

    def check(rank: int, world_size: int, scale: float) -> float:
        ...  # runs in each process with torch.distributed initialised
        return value

    results = run_multiprocess(check, world_size=2, args=(0.5,))  # one result per rank

The function must be importable by name (module level), as ``spawn`` pickles it by reference.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["run_multiprocess"]


def _worker(
    rank: int,
    world_size: int,
    backend: str,
    init_file: str,
    out_dir: str,
    fn: Callable[..., Any],
    args: Sequence[Any],
    timeout_s: float,
) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        backend,
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    try:
        result = fn(rank, world_size, *args)
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(result, f)
    finally:
        dist.destroy_process_group()


def run_multiprocess(
    fn: Callable[..., Any],
    world_size: int = 2,
    args: Sequence[Any] = (),
    backend: str = "gloo",
    timeout_s: float = 120.0,
) -> list[Any]:
    """Runs ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes.

    Each process gets a fresh default process group (``backend``) and one intra-op thread.
    Returns the per-rank results (they must pickle). If any process raises, the others are
    terminated and ``torch.multiprocessing.ProcessRaisedException`` carries its traceback;
    collectives time out after ``timeout_s`` seconds.
    """
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.start_processes(
            _worker,
            args=(world_size, backend, init_file, tmp, fn, tuple(args), timeout_s),
            nprocs=world_size,
            join=True,
            start_method="spawn",
        )
        results = []
        for rank in range(world_size):
            with open(os.path.join(tmp, f"rank{rank}.pkl"), "rb") as f:
                results.append(pickle.load(f))
        return results
