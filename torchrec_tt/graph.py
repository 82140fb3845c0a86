"""Graph helpers for TT node embeddings: adjacency clean-up, the hierarchical-partition node
ordering and spectral / random-walk embeddings used to initialise TT cores (TT-GNN, KDD'22).

Graphs are given as a ``[2, E]`` ``edge_index`` (PyG's convention) over nodes ``0..N-1``.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "GraphEmbeddingMethod",
    "check_edge_index",
    "graph_embedding",
    "partition_order",
    "symmetrize",
    "to_csr",
]


def check_edge_index(edge_index: Tensor, num_nodes: int) -> None:
    """Raises a TypeError / ValueError naming what is wrong with a ``[2, E]`` edge list."""
    if not isinstance(edge_index, Tensor):
        raise TypeError(f"edge_index must be a Tensor, got {type(edge_index).__name__}")
    if edge_index.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"edge_index must be int32 or int64, got {edge_index.dtype}")
    if edge_index.dim() != 2 or edge_index.shape[0] != 2:
        raise ValueError(f"edge_index must have shape [2, E], got {list(edge_index.shape)}")
    if not isinstance(num_nodes, int) or num_nodes < 1:
        raise ValueError(f"num_nodes must be a positive int, got {num_nodes!r}")
    if edge_index.numel():
        lo, hi = int(edge_index.min()), int(edge_index.max())
        if lo < 0 or hi >= num_nodes:
            raise ValueError(
                f"edge_index has node ids in [{lo}, {hi}], outside [0, {num_nodes}) (num_nodes={num_nodes})"
            )


def symmetrize(edge_index: Tensor, num_nodes: int) -> Tensor:
    """Undirected, coalesced edge list without self loops (both directions of every edge)."""
    check_edge_index(edge_index, num_nodes)
    ei = edge_index.long()
    both = torch.cat([ei, ei.flip(0)], dim=1)
    both = both[:, both[0] != both[1]]
    key = torch.unique(both[0] * num_nodes + both[1])
    return torch.stack([key // num_nodes, key % num_nodes])


def to_csr(edge_index: Tensor, num_nodes: int) -> tuple[Tensor, Tensor]:
    """``(rowptr [N + 1], col [E])`` of the edges ``src -> dst`` grouped by source."""
    check_edge_index(edge_index, num_nodes)
    src, dst = edge_index.long()
    order = torch.argsort(src, stable=True)
    counts = torch.bincount(src, minlength=num_nodes)
    rowptr = torch.zeros(num_nodes + 1, dtype=torch.long, device=edge_index.device)
    rowptr[1:] = torch.cumsum(counts, 0)
    return rowptr, dst[order]


# --- hierarchical partition ordering ------------------------------------------------------------


def _metis_parts(nparts: int, n: int, src: np.ndarray, dst: np.ndarray, seed: int) -> np.ndarray:
    """METIS k-way partition of an undirected graph given by both edge directions."""
    import pymetis

    order = np.argsort(src, kind="stable")
    xadj = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(src, minlength=n), out=xadj[1:])
    adjncy = dst[order].astype(np.int64)
    opts = pymetis.Options(seed=seed)
    _, membership = pymetis.part_graph(nparts, pymetis.CSRAdjacency(xadj, adjncy), options=opts)
    return np.asarray(membership, dtype=np.int64)


def _rebalance(part: np.ndarray, nparts: int, cap: int, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Moves nodes out of parts above ``cap`` into parts with room (METIS balances only within
    a tolerance, but a part must fit the ``cap`` rows its TT digit addresses). The nodes moved are
    those with the fewest neighbours inside their part."""
    sizes = np.bincount(part, minlength=nparts)
    if sizes.max() <= cap:
        return part
    part = part.copy()
    internal = np.bincount(src[part[src] == part[dst]], minlength=part.size)
    movers = []
    for j in np.nonzero(sizes > cap)[0]:
        members = np.nonzero(part == j)[0]
        members = members[np.argsort(internal[members], kind="stable")]
        movers.append(members[: sizes[j] - cap])
    moved = np.concatenate(movers)
    room = np.maximum(cap - sizes, 0)
    room[sizes > cap] = 0
    # Free slots, fullest-room parts first, one entry per free row.
    slots = np.repeat(np.argsort(-room, kind="stable"), np.sort(room)[::-1])
    part[moved] = slots[: moved.size]
    return part


def _order_level(
    nodes: np.ndarray,
    src: np.ndarray,
    dst: np.ndarray,
    p: Sequence[int],
    level: int,
    base: int,
    rows: np.ndarray,
    seed: int,
) -> None:
    """Assigns TT rows ``base .. base + prod(p[level:]) - 1`` to ``nodes`` (local edges
    ``src -> dst`` index into ``nodes``): a part per value of digit ``level``, recursively."""
    n = nodes.size
    cap = math.prod(p[level + 1 :])
    if level == len(p) - 1 or n <= 1:
        rows[nodes] = base + np.arange(n)
        return
    nparts = p[level]
    if n <= cap:
        part = np.zeros(n, dtype=np.int64)  # fits one part: keep the nodes under one prefix
    elif src.size == 0:
        # No edges to follow: fill the parts evenly, keeping the incoming order.
        part = (np.arange(n) * nparts) // n
    else:
        part = _metis_parts(min(nparts, n), n, src, dst, seed)
    part = _rebalance(part, nparts, cap, src, dst)
    keep = part[src] == part[dst]
    src_k, dst_k, part_e = src[keep], dst[keep], part[src[keep]]
    # Local ids inside each part: rank of the node among its part's members.
    order = np.argsort(part, kind="stable")
    starts = np.zeros(nparts + 1, dtype=np.int64)
    np.cumsum(np.bincount(part, minlength=nparts), out=starts[1:])
    local = np.empty(n, dtype=np.int64)
    local[order] = np.arange(n) - starts[part[order]]
    edge_order = np.argsort(part_e, kind="stable")
    e_starts = np.zeros(nparts + 1, dtype=np.int64)
    np.cumsum(np.bincount(part_e, minlength=nparts), out=e_starts[1:])
    for j in range(nparts):
        members = order[starts[j] : starts[j + 1]]
        if members.size == 0:
            continue
        e = edge_order[e_starts[j] : e_starts[j + 1]]
        _order_level(
            nodes[members], local[src_k[e]], local[dst_k[e]], p, level + 1, base + j * cap, rows, seed
        )


def partition_order(
    edge_index: Tensor, num_nodes: int, p: Sequence[int], *, seed: int = 0
) -> Tensor:
    """Node -> TT row map from hierarchical METIS partitioning (TT-GNN's reordering).

    The graph is split into ``p[0]`` parts of at most ``prod(p[1:])`` nodes, each part into
    ``p[1]`` parts, and so on, so that nodes of one part share the leading TT row digits (the
    same slices of the first cores) and neighbours mostly share prefixes. Returns an int64
    permutation-into-rows ``rows`` of length ``num_nodes`` (distinct values in
    ``[0, prod(p))``): node ``v`` is stored at TT row ``rows[v]``.

    Needs ``pymetis`` (pinned in requirements/base.txt).
    """
    if not p or any(int(x) < 1 for x in p):
        raise ValueError(f"p must be positive row factors, got {list(p)}")
    if math.prod(p) < num_nodes:
        raise ValueError(f"prod(p) = {math.prod(p)} < num_nodes = {num_nodes}")
    ei = symmetrize(edge_index, num_nodes).cpu().numpy()
    rows = np.full(num_nodes, -1, dtype=np.int64)
    _order_level(np.arange(num_nodes), ei[0], ei[1], [int(x) for x in p], 0, 0, rows, seed)
    return torch.from_numpy(rows)


# --- spectral / random-walk embeddings ----------------------------------------------------------


@enum.unique
class GraphEmbeddingMethod(str, enum.Enum):
    """Dense node embeddings that TT-SVD turns into initial cores.

    * ``SPECTRAL``: the leading eigenvectors of the normalised adjacency
      ``D^-1/2 A D^-1/2`` (Laplacian eigenmaps), equal column weights.
    * ``RANDOMWALK``: the factorisation of DeepWalk's window-``T`` co-occurrence matrix
      ``(1/T) sum_{t=1..T} P^t`` (``P = D^-1 A``) in its symmetric form, without DeepWalk's
      elementwise log (so it stays sparse-friendly at any size): the same eigenvectors, column
      ``i`` weighted by ``sqrt(|f(mu_i)|)``, ``f(mu) = (1/T) sum_t mu^t``; the leading directions are
      chosen by ``|f(mu)|``, which favours slowly mixing (community) directions over the
      oscillating ones of bipartite-like structure.
    """

    SPECTRAL = "spectral"
    RANDOMWALK = "randomwalk"


def _normalized_adjacency(edge_index: Tensor, num_nodes: int, device: torch.device) -> Tensor:
    ei = symmetrize(edge_index, num_nodes).to(device)
    deg = torch.bincount(ei[0], minlength=num_nodes).to(torch.float64).clamp_min(1.0)
    dinv = deg.rsqrt()
    vals = dinv[ei[0]] * dinv[ei[1]]
    # symmetrize() returns sorted unique pairs, so the COO tensor is valid and coalesced.
    return torch.sparse_coo_tensor(
        ei, vals, (num_nodes, num_nodes), is_coalesced=True, check_invariants=False
    )


def graph_embedding(
    edge_index: Tensor,
    num_nodes: int,
    dim: int,
    method: GraphEmbeddingMethod | str = GraphEmbeddingMethod.SPECTRAL,
    *,
    window: int = 5,
    iterations: int = 60,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> Tensor:
    """``[num_nodes, dim]`` float64 embedding (see :class:`GraphEmbeddingMethod`), columns of
    unit norm before weighting.

    Block (subspace) iteration with Rayleigh-Ritz on the sparse normalised adjacency, so it
    needs only sparse mat-mats (any graph size that fits; on ``device`` if given). The
    spectrum is shifted to ``[0, 1]`` for ``SPECTRAL`` (leading = largest eigenvalues) and
    squared for ``RANDOMWALK`` (leading = largest ``|mu|``, then ranked by ``|f(mu)|``).
    """
    method = GraphEmbeddingMethod(method)
    if not isinstance(dim, int) or dim < 1 or dim > num_nodes:
        raise ValueError(f"dim must be an int in [1, num_nodes={num_nodes}], got {dim!r}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    dev = torch.device(device) if device is not None else edge_index.device
    a = _normalized_adjacency(edge_index, num_nodes, dev)
    block = min(num_nodes, dim + max(8, dim // 2))  # oversampling speeds up convergence
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(num_nodes, block, generator=gen, dtype=torch.float64).to(dev)

    def op(v: Tensor) -> Tensor:
        av = a @ v
        if method is GraphEmbeddingMethod.SPECTRAL:
            return 0.5 * (v + av)  # (I + A_hat) / 2: eigenvalues (1 + mu) / 2 in [0, 1]
        return a @ av  # A_hat^2: eigenvalues mu^2, leading = largest |mu|

    for _ in range(iterations):
        x, _ = torch.linalg.qr(op(x))
    # Rayleigh-Ritz with A_hat itself gives the eigenvalues mu of the converged subspace.
    ritz = x.T @ (a @ x)
    mu, w = torch.linalg.eigh(0.5 * (ritz + ritz.T))
    vecs = x @ w
    if method is GraphEmbeddingMethod.SPECTRAL:
        keep = torch.argsort(mu, descending=True)[:dim]
        return vecs[:, keep].contiguous()
    f = sum(mu**t for t in range(1, window + 1)) / window
    keep = torch.argsort(f.abs(), descending=True)[:dim]
    return (vecs[:, keep] * f[keep].abs().sqrt()).contiguous()
