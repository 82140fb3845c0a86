"""torchx component for the TT-DLRM trainer (examples/dlrm/train.py).

Two local processes (CPU/gloo, or one GPU each when CUDA is there), from the repository root
with the virtual environment on PATH::

    . .venv/bin/activate
    torchx run -s local_cwd examples/dlrm/component.py:train --nproc_per_node 2 -- \\
        --steps 200 --mode compare

The same component runs on any torchx scheduler (``-s slurm``, ``-s kubernetes`` with an image
holding this repository and its environment, ``--nnodes`` for several hosts); arguments after
``--`` go to train.py.
"""

# typing.Optional/Dict, not `X | None`: torchx 0.7.0's component linter reads the annotations.
from typing import Dict, Optional

import torchx.specs as specs
from torchx.components.structured_arg import StructuredNameArgument

__all__ = ["train"]


def train(
    *script_args: str,
    nnodes: int = 1,
    nproc_per_node: int = 2,
    name: str = "tt-dlrm",
    image: str = ".",
    python: str = "python",
    script: str = "examples/dlrm/train.py",
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    h: Optional[str] = None,
    rdzv_port: int = 29500,
    max_retries: int = 0,
    env: Optional[Dict[str, str]] = None,
) -> specs.AppDef:
    """TT-DLRM training under torchrun: nnodes x nproc_per_node processes.

    Args:
        script_args: arguments to train.py (e.g. --steps 500 --mode compare --data train.txt)
        nnodes: number of hosts
        nproc_per_node: processes per host (one per GPU on GPU hosts)
        name: job name
        image: image (local_cwd: the working directory, i.e. the repository root)
        python: Python interpreter of the environment with torchrec-tt installed
        script: trainer path relative to the image root
        cpu: CPUs per host
        gpu: GPUs per host
        memMB: memory per host in MB
        h: a registered named resource (overrides cpu, gpu, memMB)
        rdzv_port: rendezvous port on the first host (multi-host jobs)
        max_retries: scheduler retries
        env: extra environment variables
    """
    if nnodes < 1 or nproc_per_node < 1:
        raise ValueError(f"nnodes ({nnodes}) and nproc_per_node ({nproc_per_node}) must be >= 1")
    if nnodes == 1:
        rdzv = "localhost:0"  # a free port; every worker runs under one agent
    else:
        rdzv = f"$${{{specs.macros.rank0_env}:=localhost}}:{rdzv_port}"
    cmd = [
        python, "-m", "torch.distributed.run",
        "--rdzv_backend", "c10d",
        "--rdzv_endpoint", rdzv,
        "--rdzv_id", specs.macros.app_id,
        "--nnodes", str(nnodes),
        "--nproc_per_node", str(nproc_per_node),
        script, *script_args,
    ]
    run_env = {"LOGLEVEL": "WARNING", **(env or {})}
    return specs.AppDef(
        name=StructuredNameArgument.parse_from(name=name, script=script).run_name,
        roles=[
            specs.Role(
                name="trainer",
                image=image,
                entrypoint="bash",
                args=["-c", " ".join(_quote(a) for a in cmd)],
                num_replicas=nnodes,
                resource=specs.resource(cpu=cpu, gpu=gpu, memMB=memMB, h=h),
                env=run_env,
                port_map={"c10d": rdzv_port},
                max_retries=max_retries,
            )
        ],
    )


def _quote(arg: str) -> str:
    """Shell-quotes an argument, leaving ``${...}`` rendezvous expansions to bash."""
    if arg.startswith("$${") or arg.startswith("${"):
        return arg
    import shlex

    return shlex.quote(arg)
