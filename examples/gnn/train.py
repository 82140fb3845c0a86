"""Featureless node classification with learned node embeddings: TT (TTNodeEmbedding) vs a full
embedding table, same GNN, same schedule (the TT-GNN setting, KDD'22).

Every node gets a learned D-dimensional embedding (no input features); a 2-layer GraphSAGE
(PyG ``SAGEConv``, mean aggregation) or GCN (``GCNConv``) maps them to class scores. The
embedding is either ``torchrec_tt.TTNodeEmbedding`` (rows looked up by the project's compiled
op, optionally with the hierarchical-METIS node reordering and a graph-based initialisation) or
a plain ``nn.Embedding``. Both see the same seed, optimizer (Adam), learning rate and epochs.

Data: the Planetoid citation graphs (Cora, CiteSeer, PubMed) read in place from
shared/data/graphs (--data, $TORCHREC_TT_GRAPHS, ../shared/data/graphs beside the repository,
/work/shared/data/graphs), full-batch, Planetoid split, test accuracy at the best validation
epoch; or a synthetic power-law graph with planted communities (``--num_nodes``, 10M+ on a GPU),
trained on mini-batches with uniform neighbour sampling (``--fanouts``; written with torch
ops, since PyG's sampler needs pyg-lib / torch-sparse, which have no wheels for torch 2.13).

    python examples/gnn/train.py --dataset cora --embedding tt --epochs 200
    python examples/gnn/train.py --dataset cora --embedding full --epochs 200
    python examples/gnn/train.py --dataset citeseer --embedding tt --reorder --init spectral
    python examples/gnn/train.py --dataset synthetic --num_nodes 10000000 --embedding tt \\
        --device cuda --epochs 2
    # CPU smoke run (seconds)
    python examples/gnn/train.py --dataset synthetic --num_nodes 5000 --epochs 1 --steps_per_epoch 3

The last line is a summary: ``acc=`` (test accuracy) and ``compression=`` (dense table bytes over
the embedding's bytes: the TT cores; ``compression_with_map=`` also counts the node ordering).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data import PLANETOID, Graph, find_graph_root, load_planetoid, power_law_graph  # noqa: E402

from torchrec_tt import TTEmbeddingBagConfig, TTNodeEmbedding  # noqa: E402
from torchrec_tt.graph import GraphEmbeddingMethod, graph_embedding, to_csr  # noqa: E402
from torchrec_tt.modules.tt_node_embedding import NODE_INITS  # noqa: E402

DATASETS = (*PLANETOID, "synthetic")


# --- embeddings -----------------------------------------------------------------------------


class FullNodeEmbedding(nn.Module):
    """The baseline: a dense ``[N, D]`` table with the same initialisations as the TT one."""

    def __init__(self, num_nodes: int, dim: int, sparse: bool, device: torch.device) -> None:
        super().__init__()
        self.table = nn.Embedding(num_nodes, dim, sparse=sparse, device=device)
        self.init_std = math.sqrt(1.0 / num_nodes) / math.sqrt(3.0)  # TorchRec's uniform(±1/sqrt(N))

    @torch.no_grad()
    def initialise(self, init: str, graph: Graph, seed: int) -> None:
        w = self.table.weight
        b = self.init_std * math.sqrt(3.0)
        if init == "sampled_gaussian":
            w.normal_(0.0, self.init_std)
        elif init == "orthogonal":
            nn.init.orthogonal_(w)
            w.mul_(self.init_std / w.std())
        elif init in {m.value for m in GraphEmbeddingMethod}:
            dense = graph_embedding(graph.edge_index, graph.num_nodes, w.shape[1], init, seed=seed)
            w.copy_(dense * (self.init_std / dense.std()))
        else:
            w.uniform_(-b, b)

    def forward(self, ids: Tensor) -> Tensor:
        return self.table(ids)


def choose_rank(num_nodes: int, dim: int, cores: int, min_compression: float) -> int:
    """The largest TT rank (equal inner ranks) whose cores are ``min_compression`` times smaller
    than the dense table."""
    for r in range(128, 0, -1):
        shape = TTEmbeddingBagConfig(name="nodes", num_embeddings=num_nodes, embedding_dim=dim,
                                     tt_ranks=[r] * (cores - 1)).tt_shape()
        if shape.compression_ratio() >= min_compression:
            return r
    raise ValueError(f"no TT rank gives {min_compression}x for N={num_nodes}, D={dim}, {cores} cores")


def build_embedding(args: argparse.Namespace, graph: Graph, device: torch.device) -> nn.Module:
    if args.embedding == "full":
        emb = FullNodeEmbedding(graph.num_nodes, args.embedding_dim, args.full_optimizer == "sparse_adam", device)
        emb.initialise(args.init, graph, args.seed)
        return emb
    rank = args.tt_rank or choose_rank(graph.num_nodes, args.embedding_dim, args.tt_cores, args.min_compression)
    fused = None
    if args.fused:
        from fbgemm_gpu.split_embedding_configs import EmbOptimType

        fused = {"optimizer": EmbOptimType.ADAM, "learning_rate": args.lr}
    init = "orthogonal" if args.init == "uniform" else args.init
    # METIS runs on the host (partition_order copies the edges there); the graph embedding runs
    # where the edges are.
    return TTNodeEmbedding.from_graph(
        graph.edge_index, graph.num_nodes, args.embedding_dim, [rank] * (args.tt_cores - 1),
        reorder=args.reorder, init=init, seed=args.seed, fused_params=fused, device=device,
    )


# --- model and sampling ---------------------------------------------------------------------


class GNN(nn.Module):
    """Two message-passing layers (PyG) over the node embeddings, dropout between."""

    def __init__(self, kind: str, dim: int, hidden: int, classes: int, dropout: float) -> None:
        super().__init__()
        from torch_geometric.nn import GCNConv, SAGEConv

        conv = SAGEConv if kind == "sage" else GCNConv
        self.conv1, self.conv2 = conv(dim, hidden), conv(hidden, classes)
        self.dropout = dropout

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        x = F.dropout(x, self.dropout, self.training)
        x = F.relu(self.conv1(x, edge_index))
        x = F.dropout(x, self.dropout, self.training)
        return self.conv2(x, edge_index)


def sample_subgraph(
    rowptr: Tensor, col: Tensor, seeds: Tensor, fanouts: list[int], gen: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """Uniform neighbour sampling with replacement (GraphSAGE's), ``fanouts[k]`` neighbours per
    node at hop ``k``. Returns ``(nodes, local edge_index, positions of the seeds in nodes)``;
    messages flow from the sampled neighbour to the node that sampled it."""
    frontier, srcs, dsts = seeds, [], []
    for f in fanouts:
        start, deg = rowptr[frontier], rowptr[frontier + 1] - rowptr[frontier]
        has = deg > 0
        frontier, start, deg = frontier[has], start[has], deg[has]
        pick = (torch.rand(frontier.numel(), f, generator=gen, device=seeds.device) * deg[:, None]).long()
        nbr = col[start[:, None] + pick]
        srcs.append(nbr.reshape(-1))
        dsts.append(frontier[:, None].expand(-1, f).reshape(-1))
        frontier = torch.unique(nbr)
    nodes = torch.unique(torch.cat([seeds, *srcs]))
    src = torch.searchsorted(nodes, torch.cat(srcs)) if srcs else seeds[:0]
    dst = torch.searchsorted(nodes, torch.cat(dsts)) if dsts else seeds[:0]
    return nodes, torch.stack([src, dst]), torch.searchsorted(nodes, seeds)


# --- training -------------------------------------------------------------------------------


@dataclass
class Result:
    dataset: str
    embedding: str
    init: str
    reorder: bool
    seed: int
    num_nodes: int
    embedding_dim: int
    tt_shape: str
    compression: float
    compression_with_map: float
    embedding_bytes: int
    test_acc: float
    best_val_acc: float
    best_epoch: int
    epoch_time_s: list[float] = field(default_factory=list)
    peak_memory_bytes: int = 0
    device: str = "cpu"
    prep_s: float = 0.0  # embedding construction: METIS ordering, graph embedding, TT-SVD


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def run(args: argparse.Namespace) -> Result:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.dataset == "synthetic":
        graph = power_law_graph(args.num_nodes, args.avg_degree, num_classes=args.num_classes,
                                seed=args.seed, device=device)
    else:
        root = find_graph_root(args.data)
        if root is None:
            raise SystemExit("shared/data/graphs (with planetoid/) not found: pass --data or set $TORCHREC_TT_GRAPHS")
        graph = load_planetoid(root, args.dataset).to(device)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    emb = build_embedding(args, graph, device)
    prep_s = time.perf_counter() - t0
    gnn = GNN(args.model, args.embedding_dim, args.hidden, graph.num_classes, args.dropout).to(device)
    optims: list[torch.optim.Optimizer] = [torch.optim.Adam(gnn.parameters(), lr=args.lr, weight_decay=args.weight_decay)]
    if isinstance(emb, FullNodeEmbedding) and args.full_optimizer == "sparse_adam":
        optims.append(torch.optim.SparseAdam(emb.parameters(), lr=args.lr))
    elif not (isinstance(emb, TTNodeEmbedding) and args.fused):
        optims.append(torch.optim.Adam(emb.parameters(), lr=args.lr))
    if isinstance(emb, TTNodeEmbedding):
        comp, comp_map = emb.compression_ratio(), emb.compression_ratio(include_node_order=True)
        emb_bytes = emb.tt_num_bytes()
        shape = emb.tt_shape
        shape_s = f"p={list(shape.p)} q={list(shape.q)} ranks={list(shape.ranks)}"
    else:
        comp = comp_map = 1.0
        emb_bytes = graph.num_nodes * args.embedding_dim * 4
        shape_s = "dense"
    full_batch = args.batch_size == 0
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    if full_batch:
        all_ids = torch.arange(graph.num_nodes, device=device)
    else:
        rowptr, col = to_csr(graph.edge_index, graph.num_nodes)
    fanouts = args.fanouts

    def logits_of(seeds: Tensor | None) -> Tensor:
        if seeds is None:
            return gnn(emb(all_ids), graph.edge_index)
        nodes, ei, pos = sample_subgraph(rowptr, col, seeds, fanouts, gen)
        return gnn(emb(nodes), ei)[pos]

    @torch.no_grad()
    def accuracy(split: Tensor) -> float:
        gnn.eval()
        if full_batch:
            pred = logits_of(None)[split].argmax(1)
        else:
            pred = torch.cat([logits_of(s).argmax(1) for s in split.split(args.batch_size)])
        gnn.train()
        return float((pred == graph.labels[split]).float().mean())

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    best_val, best_epoch, test_at_best, times = -1.0, -1, 0.0, []
    for epoch in range(args.epochs):
        _sync(device)
        t = time.perf_counter()
        if full_batch:
            batches = [None]
        else:
            order = graph.train[torch.randperm(graph.train.numel(), generator=gen, device=device)]
            batches = list(order.split(args.batch_size))[: args.steps_per_epoch or None]
        for seeds in batches:
            logits = logits_of(seeds)
            target = graph.labels[graph.train] if seeds is None else graph.labels[seeds]
            loss = F.cross_entropy(logits[graph.train] if seeds is None else logits, target)
            for o in optims:
                o.zero_grad(set_to_none=True)
            loss.backward()
            for o in optims:
                o.step()
        _sync(device)
        times.append(time.perf_counter() - t)
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            val = accuracy(graph.val)
            if val > best_val:
                best_val, best_epoch, test_at_best = val, epoch, accuracy(graph.test)
            if args.verbose:
                print(f"epoch {epoch}: loss {float(loss):.4f} val {val:.4f} ({times[-1]:.3f} s)", flush=True)
    return Result(
        dataset=args.dataset, embedding=args.embedding, init=args.init, reorder=args.reorder,
        seed=args.seed, num_nodes=graph.num_nodes, embedding_dim=args.embedding_dim,
        tt_shape=shape_s, compression=comp, compression_with_map=comp_map,
        embedding_bytes=emb_bytes, test_acc=test_at_best, best_val_acc=best_val,
        best_epoch=best_epoch, epoch_time_s=times, peak_memory_bytes=_peak_memory(device),
        device=str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        prep_s=prep_s,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", choices=DATASETS, default="cora")
    p.add_argument("--embedding", choices=("tt", "full"), default="tt")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--model", choices=("sage", "gcn"), default="sage")
    p.add_argument("--embedding_dim", type=int, default=64)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--dropout", type=float, default=0.5)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--weight_decay", type=float, default=5e-4, help="of the GNN layers")
    p.add_argument("--tt_cores", type=int, default=3, choices=(2, 3, 4))
    p.add_argument("--tt_rank", type=int, default=None, help="default: the largest with --min_compression")
    p.add_argument("--min_compression", type=float, default=100.0)
    p.add_argument("--reorder", action="store_true", help="TT rows ordered by hierarchical METIS partitioning")
    p.add_argument("--init", choices=("uniform", *NODE_INITS), default="orthogonal",
                   help="uniform: TorchRec's default (full table; TT uses orthogonal)")
    p.add_argument("--fused", action="store_true", help="TT cores updated by the fused Adam in the backward")
    p.add_argument("--full_optimizer", choices=("adam", "sparse_adam"), default="adam",
                   help="full table: dense Adam (same as TT) or SparseAdam on a sparse-gradient table")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="CPU threads of torch (0: torch's default)")
    p.add_argument("--data", default=None, help="folder holding planetoid/")
    p.add_argument("--num_nodes", type=int, default=10_000_000, help="synthetic graph")
    p.add_argument("--avg_degree", type=float, default=10.0, help="synthetic graph")
    p.add_argument("--num_classes", type=int, default=16, help="synthetic graph")
    p.add_argument("--batch_size", type=int, default=None, help="0: full batch (default for the citation graphs; 1024 for synthetic)")
    p.add_argument("--fanouts", type=lambda s: [int(x) for x in s.split(",")], default=[10, 5])
    p.add_argument("--steps_per_epoch", type=int, default=0, help="0: one pass over the training nodes")
    p.add_argument("--eval_every", type=int, default=1)
    p.add_argument("--json", default=None, help="append the result as one JSON line to this file")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.batch_size is None:
        args.batch_size = 1024 if args.dataset == "synthetic" else 0
    for name in ("epochs", "embedding_dim", "hidden", "eval_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("batch_size", "steps_per_epoch", "threads"):
        if getattr(args, name) < 0:
            p.error(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.tt_rank is not None and args.tt_rank < 1:
        p.error(f"--tt_rank must be >= 1, got {args.tt_rank}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        p.error(f"--lr must be a positive finite number, got {args.lr}")
    if not 0 <= args.dropout < 1:
        p.error(f"--dropout must be in [0, 1), got {args.dropout}")
    if any(f < 1 for f in args.fanouts):
        p.error(f"--fanouts must be positive, got {args.fanouts}")
    if args.embedding == "full" and (args.reorder or args.fused):
        p.error("--reorder and --fused apply to --embedding tt only")
    if args.dataset == "synthetic" and args.num_nodes < 2 * args.num_classes:
        p.error(f"--num_nodes must be >= 2 * --num_classes ({2 * args.num_classes})")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no GPU")
    return args


def main(argv: list[str] | None = None) -> Result:
    args = parse_args(argv)
    res = run(args)
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(asdict(res)) + "\n")
    steady = res.epoch_time_s[1:] or res.epoch_time_s
    print(f"{res.dataset} {res.embedding} init={res.init} reorder={res.reorder} seed={res.seed} "
          f"shape={res.tt_shape} embedding_bytes={res.embedding_bytes} "
          f"epoch_s={sorted(steady)[len(steady) // 2]:.4f} peak_mem={res.peak_memory_bytes / 2**20:.1f}MiB "
          f"acc={res.test_acc:.4f} val={res.best_val_acc:.4f} compression={res.compression:.1f}x "
          f"compression_with_map={res.compression_with_map:.1f}x", flush=True)
    return res


if __name__ == "__main__":
    main()
