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

__all__ = ["run_multiprocess", "simulate_pooled_all_to_all"]


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


def simulate_pooled_all_to_all(
    codecs: Sequence[Any],
    embeddings: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor] | None = None,
) -> dict[str, Any]:
    """TorchRec's pooled all-to-all with qcomms codecs, forward and backward, in one process.

    ``codecs[r]`` is rank ``r``'s ``QuantizedCommCodecs``; ``embeddings[r]`` its
    ``[B * world, D_r]`` pooled tensor (rows for rank 0 first); ``grads[r]`` (optional) the
    ``[B, sum(D)]`` gradient of its output. The calls follow
    ``torchrec.distributed.comm_ops`` (``create_context``, ``padded_size``, ``encode``,
    ``calc_quantized_size``, split, exchange, ``decode``; backward with a fresh context for
    encode and the forward one for decode), so codecs can be checked without processes.
    Returns ``outputs`` (``[B, sum(D)]`` per rank), ``grad_inputs`` (``[B * world, D_r]``) and
    ``bytes_sent`` (per rank, to other ranks, forward + backward).
    """
    world = len(codecs)
    dims = [e.shape[1] for e in embeddings]
    batch = embeddings[0].shape[0] // world
    ctxs, sent_fwd = [], [[] for _ in range(world)]  # sent_fwd[src][dst]
    bytes_sent = [0] * world
    for r in range(world):
        ctx = codecs[r].forward.create_context()
        codecs[r].forward.padded_size(embeddings[r], dims, r, ctx)
        data = codecs[r].forward.encode(embeddings[r].reshape(-1), ctx)
        splits = [codecs[r].forward.calc_quantized_size(dims[r] * batch, ctx)
                  for _ in range(world)]
        if sum(splits) != data.numel():
            raise AssertionError(f"rank {r}: encoded {data.numel()} != splits {splits}")
        sent_fwd[r] = list(data.split(splits))
        bytes_sent[r] += sum(s for d, s in enumerate(splits) if d != r) * data.element_size()
        ctxs.append(ctx)
    outputs = []
    for r in range(world):
        expected = [codecs[r].forward.calc_quantized_size(batch * d, ctxs[r]) for d in dims]
        got = [sent_fwd[src][r] for src in range(world)]
        if [g.numel() for g in got] != expected:
            raise AssertionError(f"rank {r}: received {[g.numel() for g in got]} != {expected}")
        flat = codecs[r].forward.decode(torch.cat(got), ctxs[r])
        outputs.append(torch.cat([c.view(batch, d) for c, d in
                                  zip(flat.split([batch * d for d in dims]), dims)], dim=1))
    result: dict[str, Any] = {"outputs": outputs, "bytes_sent": bytes_sent}
    if grads is None:
        return result
    sent_bwd = [[] for _ in range(world)]
    for r in range(world):
        ctx = codecs[r].backward.create_context()
        recat = torch.cat([c.reshape(-1) for c in grads[r].split(dims, dim=1)])
        data = codecs[r].backward.encode(recat, ctx)
        splits = [codecs[r].backward.calc_quantized_size(batch * d, ctx) for d in dims]
        sent_bwd[r] = list(data.split(splits))
        bytes_sent[r] += sum(s for d, s in enumerate(splits) if d != r) * data.element_size()
    grad_inputs = []
    for r in range(world):
        got = torch.cat([sent_bwd[src][r] for src in range(world)])
        grad_inputs.append(codecs[r].backward.decode(got, ctxs[r]).view(batch * world, dims[r]))
    result["grad_inputs"] = grad_inputs
    return result
