"""Capture the pooled embeddings (what the forward all-to-all sends) and their gradients (what
the backward all-to-all sends) from the DLRM trainer, and print per-table value statistics.

One process (gloo world of 1), the trainer's own ``build()`` and data; a forward pre-hook on
DLRM's interaction arch takes the ``[B, F, D]`` pooled embeddings and a tensor hook their
gradient, at the steps listed in ``--capture_steps``. Trainer flags go after ``--``::

    python bench/capture_pooled.py --out runs/lossy/synthetic.pt -- --steps 600
    python bench/capture_pooled.py --out runs/lossy/criteo.pt -- \
        --data /work/shared/data/criteo_kaggle_sample.tsv.gz --max_ind_range 100000

The saved file holds ``{"features": [...], "steps": [...], "emb": [T, B, F, D], "grad": ...,
"args": ...}`` for ``bench/lossy_analysis.py`` and ``bench/bench_lossy_codec.py --captured``.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "dlrm"))
import train as trainer  # noqa: E402  (examples/dlrm/train.py)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="where to save the captured tensors (.pt)")
    ap.add_argument("--capture_steps", default="0,50,100,200,400,599",
                    help="comma-separated training steps to capture")
    ap.add_argument("--model", choices=("tt", "uncompressed"), default="uncompressed")
    ap.add_argument("trainer_args", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    extra = a.trainer_args[1:] if a.trainer_args[:1] == ["--"] else a.trainer_args
    args = trainer.parse_args(["--no_pipeline", "--no_progress", *extra])
    capture = sorted({int(s) for s in a.capture_steps.split(",")})
    os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(trainer._free_port()))
    trainer._quiet()
    torch.set_num_threads(args.threads or 1)
    dist.init_process_group("gloo")
    device = torch.device("cpu")
    try:
        data = trainer.load_data(args, 0, device)
        args.steps = trainer.resolve_steps(args, data.batches_per_epoch(args, 1))
        dmp, optimizer, _ = trainer.build(args, data, a.model == "tt", device, dist.group.WORLD)
        dlrm = dmp.module.model
        names = list(dlrm.sparse_arch.sparse_feature_names)
        got: dict[str, torch.Tensor] = {}

        def pre_hook(_module: torch.nn.Module, inputs: tuple, kwargs: dict) -> None:
            sparse = inputs[1] if len(inputs) > 1 else kwargs["sparse_features"]
            got["emb"] = sparse.detach().clone()
            if sparse.requires_grad:
                sparse.register_hook(lambda g: got.__setitem__("grad", g.detach().clone()))

        dlrm.inter_arch.register_forward_pre_hook(pre_hook, with_kwargs=True)
        batches = data.train_batches(args, 0, 1, 0)
        embs, grads, steps = [], [], []
        dmp.train()
        last = min(max(capture), args.steps - 1)
        for step in range(last + 1):
            batch = next(batches).to(device)
            optimizer.zero_grad()
            loss, _ = dmp(batch)
            loss.backward()
            optimizer.step()
            if step in capture:
                embs.append(got["emb"])
                grads.append(got["grad"])
                steps.append(step)
                print(f"step {step}: loss {float(loss):.4f}", flush=True)
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        torch.save({"features": names, "steps": steps, "emb": torch.stack(embs),
                    "grad": torch.stack(grads), "args": vars(args),
                    "plan": trainer.plan_summary(dmp)}, a.out)
        print(f"saved {a.out}: {len(steps)} steps x {tuple(embs[0].shape)}")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
