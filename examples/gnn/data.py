"""Graphs for examples/gnn: the Planetoid citation graphs read in place, and a synthetic
power-law graph with planted communities that scales to 10M+ nodes.

Only numpy and torch are needed: the node features (the scipy parts of the Planetoid release) are
never read, since the embeddings are learned (the featureless TT-GNN setting).
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

PLANETOID = ("cora", "citeseer", "pubmed")
REPO = Path(__file__).resolve().parents[2]
CANDIDATES = (
    os.environ.get("TORCHREC_TT_GRAPHS"),
    str(REPO.parent / "shared/data/graphs"),
    "/work/shared/data/graphs",
    str(REPO / ".data/graphs"),
)


@dataclass
class Graph:
    """A node-classification graph: undirected ``edge_index`` (both directions), labels and
    the train / validation / test node ids."""

    name: str
    num_nodes: int
    edge_index: Tensor  # [2, E] int64
    labels: Tensor  # [N] int64
    train: Tensor
    val: Tensor
    test: Tensor

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1

    def to(self, device: torch.device | str) -> Graph:
        return Graph(self.name, self.num_nodes, *(t.to(device) for t in (
            self.edge_index, self.labels, self.train, self.val, self.test)))


def find_graph_root(explicit: str | None = None) -> Path | None:
    """The folder holding ``planetoid/`` (--data, $TORCHREC_TT_GRAPHS, shared/data/graphs beside
    the repository, /work/shared/data/graphs, .data/graphs), or None."""
    for c in (explicit, *CANDIDATES):
        if c and (Path(c) / "planetoid" / "ind.cora.graph").exists():
            return Path(c)
    return None


def load_planetoid(root: Path | str, name: str) -> Graph:
    """Cora / CiteSeer / PubMed with the Planetoid split (PyG's ``Planetoid`` reading: train =
    the labelled nodes of ``ind.<name>.y``, the next 500 nodes validation, ``test.index`` test;
    CiteSeer's test nodes missing from the graph are padded as isolated nodes of label 0, outside
    every split)."""
    if name not in PLANETOID:
        raise ValueError(f"unknown Planetoid graph {name!r}; choose one of {PLANETOID}")
    base = Path(root) / "planetoid"

    def part(p: str):  # noqa: ANN202  (numpy arrays / dict, Python 2 pickles)
        path = base / f"ind.{name}.{p}"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found (see shared/data/graphs/README.md)")
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")

    y, ty, ally, graph = (np.asarray(part(p)) if p != "graph" else part(p) for p in ("y", "ty", "ally", "graph"))
    test_index = np.loadtxt(base / f"ind.{name}.test.index", dtype=np.int64)
    sorted_test = np.sort(test_index)
    if name == "citeseer":
        full = np.zeros((sorted_test[-1] - sorted_test[0] + 1, ty.shape[1]), dtype=ty.dtype)
        full[sorted_test - sorted_test[0]] = ty
        ty = full
    onehot = np.concatenate([ally, ty])
    labels = onehot.argmax(1)
    labels[test_index] = labels[sorted_test]  # the release stores test rows in sorted order
    n = labels.shape[0]
    src = np.fromiter((k for k, vs in graph.items() for _ in vs), dtype=np.int64)
    dst = np.fromiter((v for vs in graph.values() for v in vs), dtype=np.int64)
    keep = (src < n) & (dst < n) & (src != dst)
    ei = torch.from_numpy(np.stack([src[keep], dst[keep]]))
    from torchrec_tt.graph import symmetrize

    return Graph(
        name=name,
        num_nodes=n,
        edge_index=symmetrize(ei, n),
        labels=torch.from_numpy(labels.astype(np.int64)),
        train=torch.arange(y.shape[0]),
        val=torch.arange(y.shape[0], y.shape[0] + 500),
        test=torch.from_numpy(test_index),
    )


def power_law_graph(
    num_nodes: int,
    avg_degree: float = 10.0,
    *,
    num_classes: int = 16,
    exponent: float = 2.5,
    homophily: float = 0.8,
    train_fraction: float = 0.01,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> Graph:
    """Chung-Lu graph with a power-law degree sequence (exponent ``exponent``) and planted
    communities (the labels): each of the ``num_nodes * avg_degree / 2`` edges picks its source
    by expected degree and, with probability ``homophily``, a target of the same community
    (else any node), also by expected degree. Node ids are a random permutation of the
    community-sorted order, so ids carry no community information. Everything is drawn with
    torch on ``device`` (10M nodes / 50M edges take seconds on a GPU). Splits:
    ``train_fraction`` of the nodes, then 1,000 validation and up to 10,000 test nodes."""
    if num_nodes < 2 * num_classes:
        raise ValueError(f"num_nodes ({num_nodes}) must be >= 2 * num_classes ({2 * num_classes})")
    if not 0.0 <= homophily <= 1.0:
        raise ValueError(f"homophily must be in [0, 1], got {homophily}")
    if exponent <= 2.0:
        raise ValueError(f"exponent must be > 2 (finite mean degree), got {exponent}")
    gen = torch.Generator(device=device).manual_seed(seed)
    dev = torch.device(device)
    # Expected degrees w_i ~ i^(-1/(exponent-1)) give P(deg = k) ~ k^-exponent; they are shuffled
    # so that every community gets hubs and leaves.
    w = torch.arange(1, num_nodes + 1, device=dev, dtype=torch.float64).pow(-1.0 / (exponent - 1.0))
    w = w[torch.randperm(num_nodes, generator=gen, device=dev)]
    # Communities are contiguous blocks in this internal order.
    bounds = torch.linspace(0, num_nodes, num_classes + 1, device=dev).long()
    community = torch.bucketize(torch.arange(num_nodes, device=dev), bounds[1:], right=True)
    cdf = torch.cumsum(w, 0)
    cdf = torch.cat([cdf.new_zeros(1), cdf])
    m = int(num_nodes * avg_degree / 2)
    u = torch.rand(m, generator=gen, device=dev, dtype=torch.float64)
    src = torch.searchsorted(cdf, u * cdf[-1], right=True) - 1
    c = community[src.clamp(0, num_nodes - 1)]
    lo, hi = cdf[bounds[c]], cdf[bounds[c + 1]]
    same = torch.rand(m, generator=gen, device=dev) < homophily
    u2 = torch.rand(m, generator=gen, device=dev, dtype=torch.float64)
    target = torch.where(same, lo + u2 * (hi - lo), u2 * cdf[-1])
    dst = torch.searchsorted(cdf, target, right=True) - 1
    src, dst = src.clamp(0, num_nodes - 1), dst.clamp(0, num_nodes - 1)
    perm = torch.randperm(num_nodes, generator=gen, device=dev)  # internal -> public id
    ei = torch.stack([perm[src], perm[dst]])
    ei = ei[:, ei[0] != ei[1]]
    ei = torch.cat([ei, ei.flip(0)], dim=1)  # duplicates are kept: cheaper than unique at 10M+
    labels = torch.empty(num_nodes, dtype=torch.long, device=dev)
    labels[perm] = community
    order = torch.randperm(num_nodes, generator=gen, device=dev)
    n_train = max(num_classes, int(train_fraction * num_nodes))
    n_val = min(1000, (num_nodes - n_train) // 2)
    n_test = min(10000, num_nodes - n_train - n_val)
    return Graph(
        name="synthetic",
        num_nodes=num_nodes,
        edge_index=ei,
        labels=labels,
        train=order[:n_train],
        val=order[n_train : n_train + n_val],
        test=order[n_train + n_val : n_train + n_val + n_test],
    )
