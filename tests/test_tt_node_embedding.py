"""TTNodeEmbedding (TT node embeddings for GNNs) and the graph helpers behind it: rows vs the
dense TT product, gradients, the node reordering invisible to callers, state_dict round trips,
input errors; the hierarchical partition ordering and the spectral embedding."""

from __future__ import annotations

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType

from torchrec_tt import TTNodeEmbedding
from torchrec_tt.graph import graph_embedding, partition_order, symmetrize
from torchrec_tt.reference import reconstruct_dense
from torchrec_tt.shapes import max_useful_ranks


def _random_graph(n: int, e: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(0, n, (e,), generator=g)
    dst = (src + torch.randint(-4, 5, (e,), generator=g)) % n  # local structure to partition
    return torch.stack([src, dst])


def _dense_rows(m: TTNodeEmbedding) -> torch.Tensor:
    s = m.tt_shape
    return reconstruct_dense(m.tt.cores(), s.p, s.q, s.ranks)  # [prod(p), D], TT row order


@pytest.mark.parametrize("reorder", [False, True])
def test_rows_are_the_tt_product_at_the_mapped_rows(reorder):
    torch.manual_seed(0)
    n = 300
    m = TTNodeEmbedding.from_graph(_random_graph(n, 1200), n, 16, (4, 4), reorder=reorder)
    ids = torch.tensor([0, 7, 299, 7, 150, 42])
    out = m(ids)
    want = _dense_rows(m)[m.rows_of_nodes()[ids]]
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.full_weight()[ids], want, rtol=1e-5, atol=1e-6)
    assert m.reordered == reorder and m.node_to_row.numel() == (n if reorder else 0)
    if reorder:
        assert not torch.equal(m.rows_of_nodes(), torch.arange(n))
    assert m(ids.int()).shape == (6, 16)
    assert m(ids[:0]).shape == (0, 16)


def test_gradients_match_the_dense_reference():
    torch.manual_seed(1)
    n = 200
    m = TTNodeEmbedding(n, 12, (3, 5), node_order=torch.randperm(n) + 10, tt_p_shapes=[5, 6, 7])
    ids = torch.randint(0, n, (64,))
    w = torch.randn(64, 12)
    (m(ids) * w).sum().backward()
    got = [c.grad.clone() for c in m.tt.cores()]
    for c in m.tt.cores():
        c.grad = None
    (_dense_rows(m)[m.rows_of_nodes()[ids]] * w).sum().backward()
    for g, c in zip(got, m.tt.cores()):
        torch.testing.assert_close(g, c.grad, rtol=1e-4, atol=1e-5)


def test_reordering_is_invisible_to_the_caller():
    # A table that TT represents exactly (ranks at max_useful_ranks): the reordered module,
    # TT-SVD'd from the plain module's dense rows in node order, answers the same ids alike.
    torch.manual_seed(2)
    n, d, p, q = 60, 8, [3, 4, 5], [2, 2, 2]
    ranks = max_useful_ranks(p, q)
    plain = TTNodeEmbedding(n, d, ranks, tt_p_shapes=p, tt_q_shapes=q)
    order = partition_order(_random_graph(n, 200), n, p)
    assert not torch.equal(order, torch.arange(n))
    reordered = TTNodeEmbedding(n, d, ranks, tt_p_shapes=p, tt_q_shapes=q, node_order=order)
    err = reordered.load_dense_weight(plain.full_weight().detach())
    assert err < 1e-5
    ids = torch.randint(0, n, (100,))
    torch.testing.assert_close(reordered(ids), plain(ids), rtol=1e-4, atol=1e-5)
    # ... while the rows are stored elsewhere in the TT.
    moved = torch.nonzero(order != torch.arange(n))[:, 0]
    assert not torch.allclose(_dense_rows(reordered)[moved], _dense_rows(plain)[moved], atol=1e-3)


def test_state_dict_round_trip_keeps_order_cores_and_fused_state():
    torch.manual_seed(3)
    n = 120
    fused = {"optimizer": EmbOptimType.ADAM, "learning_rate": 0.05}
    a = TTNodeEmbedding.from_graph(_random_graph(n, 500), n, 8, (4, 4), init="spectral", fused_params=fused)
    ids = torch.randint(0, n, (40,))
    before = [c.detach().clone() for c in a.tt.cores()]
    a(ids).square().sum().backward()  # the fused Adam updates the cores in the backward
    assert all(c.grad is None for c in a.tt.cores())
    assert any(not torch.equal(b, c) for b, c in zip(before, a.tt.cores()))
    sd = a.state_dict()
    assert "node_to_row" in sd and "tt.embedding_bags.nodes.core_0" in sd
    b = TTNodeEmbedding(n, 8, (4, 4), fused_params=fused)  # identity order, other cores
    assert not torch.allclose(b(ids), a(ids))
    b.load_state_dict(sd)
    torch.testing.assert_close(b(ids), a(ids))
    assert torch.equal(b.node_to_row, a.node_to_row) and b.reordered
    # ... and back: an unordered module's state (empty map) into a reordered one.
    c = TTNodeEmbedding(n, 8, (4, 4))
    b.load_state_dict(c.state_dict(), strict=False)
    assert not b.reordered
    torch.testing.assert_close(b(ids), c(ids))
    bad = dict(sd, node_to_row=torch.zeros(n, dtype=torch.int32))
    with pytest.raises(ValueError, match="same TT row"):
        c.load_state_dict(bad)
    assert not c.reordered  # nothing half-written
    sa, sb = a.fused_optimizer.state_dict()["state"], b.fused_optimizer.state_dict()["state"]
    for key in sa:
        for name, value in sa[key].items():
            torch.testing.assert_close(sb[key][name], value)


def test_bad_inputs_raise_named_errors():
    m = TTNodeEmbedding(50, 8, (2, 2))
    with pytest.raises(TypeError, match="int32 or int64"):
        m(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="1-D"):
        m(torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match=r"\[-1, 3\] are outside \[0, 50\)"):
        m(torch.tensor([3, -1]))
    with pytest.raises(ValueError, match=r"\[0, 50\] are outside"):
        m(torch.tensor([0, 50]))
    with pytest.raises(TypeError, match="Tensor"):
        m([1, 2])
    with pytest.raises(ValueError, match="same TT row"):
        TTNodeEmbedding(50, 8, (2, 2), node_order=torch.zeros(50, dtype=torch.long))
    with pytest.raises(ValueError, match=r"shape \[50\]"):
        TTNodeEmbedding(50, 8, (2, 2), node_order=torch.arange(49))
    with pytest.raises(ValueError, match="outside the TT"):
        TTNodeEmbedding(50, 8, (2, 2), node_order=torch.arange(50) + 10**6)
    with pytest.raises(ValueError, match="num_nodes"):
        TTNodeEmbedding(0, 8, (2, 2))
    with pytest.raises(ValueError, match="init 'svd'"):
        TTNodeEmbedding.from_graph(_random_graph(50, 100), 50, 8, (2, 2), init="svd")
    with pytest.raises(ValueError, match="outside"):
        TTNodeEmbedding.from_graph(torch.tensor([[0, 1], [1, 50]]), 50, 8, (2, 2))
    with pytest.raises(ValueError, match=r"\[50, 8\]"):
        m.load_dense_weight(torch.zeros(49, 8))


def test_partition_order_puts_each_community_under_one_prefix():
    # 4 cliques of 30 nodes (shuffled ids) and p = (4, 5, 6): every clique fills one first digit.
    p, size = (4, 5, 6), 30
    perm = torch.randperm(4 * size, generator=torch.Generator().manual_seed(4))
    edges = []
    for c in range(4):
        members = perm[c * size : (c + 1) * size]
        i, j = torch.meshgrid(members, members, indexing="ij")
        edges.append(torch.stack([i.reshape(-1), j.reshape(-1)]))
    edges.append(torch.tensor([[perm[0], perm[size]], [perm[2 * size], perm[3 * size]]]).T)  # 2 bridges
    rows = partition_order(torch.cat(edges, 1), 4 * size, p)
    assert torch.unique(rows).numel() == 4 * size and int(rows.max()) < 120
    first = rows // (5 * 6)
    for c in range(4):
        assert torch.unique(first[perm[c * size : (c + 1) * size]]).numel() == 1
    assert torch.unique(first).numel() == 4


def test_partition_order_handles_padding_isolated_nodes_and_overfull_parts():
    n = 500
    ei = _random_graph(n, 300)  # sparse: many isolated nodes
    for p in [(8, 8, 8), (23, 22), (4, 4, 4, 8)]:
        rows = partition_order(ei, n, p)
        assert rows.shape == (n,) and torch.unique(rows).numel() == n
        assert 0 <= int(rows.min()) and int(rows.max()) < torch.tensor(p).prod()
    with pytest.raises(ValueError, match="prod"):
        partition_order(ei, n, (4, 4))


def test_spectral_embedding_is_the_leading_eigenvectors():
    n = 80
    ei = symmetrize(_random_graph(n, 400), n)
    emb = graph_embedding(ei, n, 6, "spectral", iterations=300)
    a = torch.zeros(n, n, dtype=torch.float64)
    a[ei[0], ei[1]] = 1.0
    dinv = a.sum(1).clamp_min(1).rsqrt()
    a_hat = dinv[:, None] * a * dinv[None, :]
    mu = torch.linalg.eigvalsh(a_hat)
    torch.testing.assert_close(emb.T @ emb, torch.eye(6, dtype=torch.float64), atol=1e-8, rtol=0)
    ray = torch.diag(emb.T @ a_hat @ emb).sort(descending=True).values
    torch.testing.assert_close(ray, mu.sort(descending=True).values[:6], atol=1e-4, rtol=0)
    rw = graph_embedding(ei, n, 6, "randomwalk", iterations=300)
    assert rw.shape == (n, 6) and torch.isfinite(rw).all()


@pytest.mark.parametrize("init", ["orthogonal", "sampled_gaussian", "spectral", "randomwalk"])
def test_inits_reach_the_target_std(init):
    n = 400
    m = TTNodeEmbedding.from_graph(_random_graph(n, 2000), n, 16, (8, 8), init=init, seed=5)
    std = float(m.full_weight().detach().std())
    assert 0.3 * m.init_std < std < 2.0 * m.init_std
    assert m.compression_ratio() > m.compression_ratio(include_node_order=True) > 1.0
