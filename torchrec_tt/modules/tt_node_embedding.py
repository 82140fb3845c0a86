"""TTNodeEmbedding: learned node embeddings of a GNN stored as a Tensor Train (TT-GNN, KDD'22).

Node ids in, ``[n, D]`` rows out, looked up by the project's op (one id per bag, SUM pooling),
so forward and backward run in the compiled kernels and the fused optimizers apply. A node
ordering (e.g. :func:`torchrec_tt.graph.partition_order`) maps each node to its TT row; it is a
buffer of the module, saved in the state_dict and applied inside ``forward``, so callers keep
their own node ids.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchrec.modules.embedding_configs import PoolingType

from torchrec_tt.configs import TTEmbeddingBagConfig, TTInit
from torchrec_tt.initializers import default_target_std, tt_svd
from torchrec_tt.graph import GraphEmbeddingMethod, graph_embedding, partition_order
from torchrec_tt.modules.embedding_bag import TTEmbeddingBagCollection
from torchrec_tt.ops import tt_embedding_bag
from torchrec_tt.optim import TTFusedOptimizer
from torchrec_tt.shapes import TTShape

__all__ = ["NODE_INITS", "TTNodeEmbedding"]

_TABLE = "nodes"

#: Initialisations ``TTNodeEmbedding.from_graph`` takes: the random TT ones and TT-SVD of a
#: graph embedding.
NODE_INITS = tuple(i.value for i in TTInit) + tuple(m.value for m in GraphEmbeddingMethod)


def _check_node_order(order: Tensor, num_nodes: int, padded_rows: int) -> Tensor:
    if not isinstance(order, Tensor) or order.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"node_order must be an int32/int64 Tensor, got {getattr(order, 'dtype', type(order).__name__)}")
    if order.dim() != 1 or order.numel() != num_nodes:
        raise ValueError(f"node_order must have shape [{num_nodes}], got {list(order.shape)}")
    order = order.long()
    lo, hi = int(order.min()), int(order.max())
    if lo < 0 or hi >= padded_rows:
        raise ValueError(f"node_order maps nodes to rows in [{lo}, {hi}], outside the TT's [0, {padded_rows})")
    if torch.unique(order).numel() != num_nodes:
        raise ValueError("node_order maps two nodes to the same TT row")
    return order


def _node_shape(
    num_nodes: int,
    embedding_dim: int,
    tt_ranks: Sequence[int],
    p: Sequence[int] | None,
    q: Sequence[int] | None,
) -> TTShape:
    """The TT shape the project's configs choose for an ``N x D`` table."""
    return TTEmbeddingBagConfig(
        name=_TABLE, num_embeddings=num_nodes, embedding_dim=embedding_dim, tt_ranks=list(tt_ranks),
        tt_p_shapes=None if p is None else list(p), tt_q_shapes=None if q is None else list(q),
    ).tt_shape()


class TTNodeEmbedding(nn.Module):
    """Embeddings of ``num_nodes`` graph nodes as one TT table (``[n] ids -> [n, D]``).

    Args:
        num_nodes: N, the number of nodes (ids ``0..N-1``).
        embedding_dim: D.
        tt_ranks: inner TT ranks (2-4 cores), as in :class:`TTEmbeddingBagConfig`.
        tt_p_shapes / tt_q_shapes: row / column factors (chosen automatically when None).
        tt_init: ``"orthogonal"`` (the paper's) or ``"sampled_gaussian"``; graph-based inits
            go through :meth:`from_graph` or :meth:`load_dense_weight`.
        init_std: std of the embedding entries (default: TorchRec's ``uniform(±1/sqrt(N))``).
        node_order: optional int64 ``[N]``, node ``v`` stored at TT row ``node_order[v]``
            (distinct rows below ``prod(p)``), e.g. from :func:`torchrec_tt.graph.partition_order`.
        fused_params: as for :class:`TTEmbeddingBagCollection` (fused optimizer, kernel keys).
        device: where the cores live.

    The state_dict holds the cores (``tt.embedding_bags.nodes.core_<k>``), the fused optimizer
    state if any, and ``node_to_row``: ``[N]`` with an ordering, empty for the identity (so an
    unordered table stores no map; loading a state_dict takes the map it holds, either kind).
    """

    def __init__(
        self,
        num_nodes: int,
        embedding_dim: int,
        tt_ranks: Sequence[int] = (16, 16),
        *,
        tt_p_shapes: Sequence[int] | None = None,
        tt_q_shapes: Sequence[int] | None = None,
        tt_init: TTInit | str = TTInit.ORTHOGONAL,
        init_std: float | None = None,
        node_order: Tensor | None = None,
        fused_params: Mapping[str, Any] | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(num_nodes, int) or num_nodes < 1:
            raise ValueError(f"num_nodes must be a positive int, got {num_nodes!r}")
        if init_std is not None and not init_std >= 0:
            raise ValueError(f"init_std must be >= 0, got {init_std!r}")
        shape = _node_shape(num_nodes, embedding_dim, tt_ranks, tt_p_shapes, tt_q_shapes)
        # TorchRec's default bounds ±sqrt(1/N) for the real N (not the padded row count).
        bound = (1.0 / num_nodes) ** 0.5 if init_std is None else init_std * 3.0**0.5
        self._num_nodes = num_nodes
        # The table spans all prod(p) rows: an ordering may place nodes on any of them.
        self._config = TTEmbeddingBagConfig(
            name=_TABLE,
            num_embeddings=shape.padded_rows,
            embedding_dim=embedding_dim,
            feature_names=[_TABLE],
            pooling=PoolingType.SUM,
            tt_ranks=list(shape.ranks),
            tt_p_shapes=list(shape.p),
            tt_q_shapes=list(shape.q),
            tt_init=tt_init,
            weight_init_min=-bound,
            weight_init_max=bound,
        )
        # An empty map stands for the identity: no N-entry buffer, no gather in forward.
        if node_order is None:
            order = torch.zeros(0, dtype=torch.long)
        else:
            order = _check_node_order(node_order, num_nodes, shape.padded_rows)
        self.tt = TTEmbeddingBagCollection([self._config], device=device, fused_params=fused_params)
        # int32 where it fits: the map is N entries, often larger than the cores themselves.
        self._index_dtype = torch.int32 if shape.padded_rows < 2**31 else torch.int64
        self.register_buffer("node_to_row", order.to(self.tt.device, self._index_dtype))
        self._offsets_cache: Tensor | None = None

    # --- construction from a graph ----------------------------------------------------------

    @classmethod
    def from_graph(
        cls,
        edge_index: Tensor,
        num_nodes: int,
        embedding_dim: int,
        tt_ranks: Sequence[int] = (16, 16),
        *,
        reorder: bool = True,
        init: str = "orthogonal",
        seed: int = 0,
        **kwargs: Any,
    ) -> TTNodeEmbedding:
        """A TT node embedding for a graph: rows ordered by hierarchical METIS partitioning
        when ``reorder`` (nodes of one part share TT row prefixes), cores initialised by
        ``init`` (one of ``NODE_INITS``: ``"orthogonal"``, ``"sampled_gaussian"``, or
        ``"spectral"`` / ``"randomwalk"``: TT-SVD of that graph embedding, scaled to the
        init std). ``seed`` seeds METIS, the graph embedding and (through ``torch.manual_seed``)
        the random inits. Other keyword arguments go to the constructor."""
        if init not in NODE_INITS:
            raise ValueError(f"init {init!r} is not one of {list(NODE_INITS)}")
        graph_init = init in {m.value for m in GraphEmbeddingMethod}
        tt_init = TTInit.ORTHOGONAL if graph_init else TTInit(init)
        torch.manual_seed(seed)
        probe = _node_shape(num_nodes, embedding_dim, tt_ranks, kwargs.get("tt_p_shapes"),
                            kwargs.get("tt_q_shapes"))
        order = partition_order(edge_index, num_nodes, probe.p, seed=seed) if reorder else None
        module = cls(num_nodes, embedding_dim, tt_ranks, tt_init=tt_init, node_order=order, **kwargs)
        if graph_init:
            dense = graph_embedding(edge_index, num_nodes, embedding_dim, init, seed=seed)
            # Same entry std as the random inits, so the learning rate means the same thing.
            dense = dense * (module.init_std / float(dense.std()))
            module.load_dense_weight(dense.float())
        return module

    # --- lookups ----------------------------------------------------------------------------

    @property
    def num_nodes(self) -> int:
        return self._num_nodes

    @property
    def embedding_dim(self) -> int:
        return self._config.embedding_dim

    @property
    def tt_shape(self) -> TTShape:
        return self.tt.tt_shapes()[_TABLE]

    @property
    def init_std(self) -> float:
        """Std of the entries the random initialisations target."""
        cfg = self._config
        return default_target_std(self._num_nodes, cfg.weight_init_min, cfg.weight_init_max)

    @property
    def reordered(self) -> bool:
        """Whether a node ordering is in use (``node_to_row`` non-empty)."""
        return self.node_to_row.numel() > 0

    def rows_of_nodes(self) -> Tensor:
        """int64 ``[N]``: the TT row of every node (``arange(N)`` without a reordering)."""
        if self.reordered:
            return self.node_to_row.long()
        return torch.arange(self.num_nodes, device=self.node_to_row.device)

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
        # The map's size depends on whether the saved module was reordered (N or 0 entries):
        # take the saved one, checked before anything is written.
        key = prefix + "node_to_row"
        saved = state_dict.get(key)
        if isinstance(saved, Tensor) and saved.shape != self.node_to_row.shape:
            if saved.numel():
                _check_node_order(saved, self.num_nodes, self.tt_shape.padded_rows)
            self.node_to_row = saved.to(self.node_to_row.device, self._index_dtype).clone()
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _check_ids(self, node_ids: Tensor) -> None:
        if not isinstance(node_ids, Tensor):
            raise TypeError(f"node_ids must be a Tensor, got {type(node_ids).__name__}")
        if node_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"node_ids must be int32 or int64, got {node_ids.dtype}")
        if node_ids.dim() != 1:
            raise ValueError(f"node_ids must be 1-D, got shape {list(node_ids.shape)}")
        if node_ids.device != self.tt.device:
            raise ValueError(f"node_ids are on {node_ids.device} but the embedding is on {self.tt.device}")
        if node_ids.numel() and not torch.compiler.is_compiling():
            lo, hi = torch.aminmax(node_ids)  # one host sync; an out-of-range id must not index
            lo, hi = int(lo), int(hi)
            if lo < 0 or hi >= self.num_nodes:
                raise ValueError(
                    f"node_ids in [{lo}, {hi}] are outside [0, {self.num_nodes}) (num_nodes={self.num_nodes})"
                )

    def forward(self, node_ids: Tensor) -> Tensor:
        """``[n, D]`` embeddings of ``node_ids`` (1-D int32/int64, ids in ``[0, num_nodes)``)."""
        self._check_ids(node_ids)
        rows = self.node_to_row[node_ids] if self.reordered else node_ids
        n = rows.numel()
        offsets = self._offsets_cache
        if (offsets is None or offsets.numel() < n + 1 or offsets.device != rows.device
                or offsets.dtype != rows.dtype):
            offsets = torch.arange(max(n, 1024) + 1, device=rows.device, dtype=rows.dtype)
            self._offsets_cache = offsets
        return tt_embedding_bag(
            self.tt.cores(), self.tt._layout, rows, offsets[: n + 1], None, self.tt.kernel_options
        )

    # --- dense views and TT-SVD -------------------------------------------------------------

    def full_weight(self) -> Tensor:
        """Dense ``[N, D]`` table in the caller's node order (differentiable; memory
        ``prod(p) * D``)."""
        dense = self.tt.full_weight(_TABLE)
        return dense[self.node_to_row.long()] if self.reordered else dense[: self.num_nodes]

    @torch.no_grad()
    def load_dense_weight(self, weight: Tensor) -> float:
        """Sets the cores to the TT-SVD of a dense ``[N, D]`` table given in node order (rows
        placed per ``node_to_row``); returns the relative error ``||W - TT|| / ||W||``."""
        n, d = self.num_nodes, self.embedding_dim
        if not isinstance(weight, Tensor) or tuple(weight.shape) != (n, d):
            raise ValueError(f"weight must be a [{n}, {d}] Tensor, got {getattr(weight, 'shape', type(weight).__name__)}")
        # Rows of the TT that no node uses (padding past N, gaps of the ordering) are zero.
        by_row = torch.zeros(self.tt_shape.padded_rows, d, dtype=torch.float64)
        by_row[self.rows_of_nodes().cpu()] = weight.detach().cpu().double()
        for core, new in zip(self.tt.cores(), tt_svd(by_row, self.tt_shape)):
            core.copy_(new)
        ref = weight.detach().cpu().double()
        norm = float(ref.norm())
        approx = self.full_weight().detach().cpu().double()
        return 0.0 if norm == 0.0 else float((approx - ref).norm()) / norm

    # --- sizes and optimizer ----------------------------------------------------------------

    def compression_ratio(self, include_node_order: bool = False) -> float:
        """Dense ``N * D`` FP32 bytes over the TT cores' bytes; with ``include_node_order`` the
        ``node_to_row`` buffer (4 or 8 bytes a node; empty without a reordering) counts too."""
        tt_bytes = self.tt_shape.num_bytes(4)
        if include_node_order:
            tt_bytes += self.node_to_row.numel() * self.node_to_row.element_size()
        return self._num_nodes * self.embedding_dim * 4 / tt_bytes

    @property
    def fused_optimizer(self) -> TTFusedOptimizer:
        """The fused optimizer (with ``fused_params``); see ``TTEmbeddingBagCollection``."""
        return self.tt.fused_optimizer

    def extra_repr(self) -> str:
        s = self.tt_shape
        return (f"num_nodes={self.num_nodes}, embedding_dim={self.embedding_dim}, p={s.p}, "
                f"q={s.q}, ranks={s.ranks}, compression={self.compression_ratio():.1f}x")

    def tt_num_bytes(self) -> int:
        """FP32 bytes of the cores."""
        return self.tt_shape.num_bytes(4)
