"""Initialisers for TT cores: random (Gaussian / orthogonal) and TT-SVD of a dense table.

Every function returns ``list[Tensor]`` of 2-D cores ``[p_k, r_{k-1} * q_k * r_k]`` (row-major view
``[p_k, r_{k-1}, q_k, r_k]``), the layout fixed in ``reference.py``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from torchrec_tt.shapes import TTShape

__all__ = [
    "default_target_std",
    "orthogonal_cores",
    "sampled_gaussian_cores",
    "tt_svd",
]


def _randn(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device | str | None,
    generator: torch.Generator | None,
) -> Tensor:
    # Sample on the generator's device (torch requires them to match) and in at least float32 so
    # that a seed gives the same draws whatever the requested dtype; then move/cast.
    gen_device = generator.device if generator is not None else device
    sample_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.randn(shape, generator=generator, dtype=sample_dtype, device=gen_device)
    return x.to(device=device if device is not None else x.device)


def sampled_gaussian_cores(
    shape: TTShape,
    target_std: float,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> list[Tensor]:
    """I.i.d. ``N(0, s^2)`` core entries so reconstructed entries have std ``target_std``.

    An entry is a sum of ``prod(ranks)`` uncorrelated products of ``K`` independent entries, so its
    variance is ``prod(ranks) * s^(2K)``; hence ``s = (target_std^2 / prod(ranks))^(1 / 2K)``.
    """
    if target_std < 0:
        raise ValueError(f"target_std must be >= 0, got {target_std}")
    k = shape.num_cores
    s = (target_std**2 / math.prod(shape.ranks)) ** (1.0 / (2 * k))
    return [(_randn(cs, dtype, device, generator) * s).to(dtype) for cs in shape.core_shapes()]


def _orthonormal(
    rows: int,
    cols: int,
    generator: torch.Generator | None,
    device: torch.device | str | None,
) -> Tensor:
    """Haar-random float64 ``[rows, cols]`` with orthonormal columns (rows if ``rows < cols``)."""
    tall = rows >= cols
    g = _randn((max(rows, cols), min(rows, cols)), torch.float64, device, generator)
    qm, r = torch.linalg.qr(g)
    # Fix QR's sign ambiguity so the distribution is Haar (uniform), not biased by the algorithm.
    d = torch.sign(torch.diagonal(r))
    qm = qm * torch.where(d == 0, torch.ones_like(d), d)
    return qm if tall else qm.T


def orthogonal_cores(
    shape: TTShape,
    target_std: float,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> list[Tensor]:
    """Left-orthogonal cores 1..K-1 and a Gaussian last core scaled to RMS ``target_std``.

    Core ``k < K`` has an unfolding ``[r_{k-1} * p_k * q_k, r_k]`` (rows ordered ``(r_{k-1}, p_k,
    q_k)``) with orthonormal columns, drawn by QR of a Gaussian matrix and permuted into the storage
    order ``[p_k, r_{k-1}, q_k, r_k]``. Where ``r_k > r_{k-1} p_k q_k`` orthonormal columns are
    impossible and the unfolding gets orthonormal *rows* instead (the extra rank directions are
    redundant). The last core is i.i.d. ``N(0, sigma^2)``; ``sigma`` uses the exact Gram matrix of
    the left interface, ``E ||T||_F^2 = sigma^2 p_K q_K tr(L^T L)``, so the expected mean square
    of the padded ``[prod p, D]`` table is ``target_std^2`` in either case (with left-orthonormal
    cores ``tr(L^T L) = r_{K-1}``, i.e. ``||T||_F = ||G_K||_F``).
    """
    if target_std < 0:
        raise ValueError(f"target_std must be >= 0, got {target_std}")
    p, q, r = shape.p, shape.q, shape.full_ranks
    k_cores = shape.num_cores
    cores64: list[Tensor] = []
    # Gram matrix L^T L of the left interface L (rows: all (i_1 j_1 .. i_k j_k), cols: r_k).
    gram: Tensor | None = None  # None stands for the 1x1 identity of r_0 = 1
    for k in range(k_cores - 1):
        u = _orthonormal(r[k] * p[k] * q[k], r[k + 1], generator, device)
        u4 = u.reshape(r[k], p[k], q[k], r[k + 1])
        # gram' = sum_{a,b,i,j} U[a,i,j,c] gram[a,b] U[b,i,j,d]
        if gram is None:
            gram = torch.einsum("aijc,aijd->cd", u4, u4)
        else:
            gram = torch.einsum("aijc,ab,bijd->cd", u4, gram, u4)
        cores64.append(u4.permute(1, 0, 2, 3).reshape(p[k], -1))
    trace = float(torch.trace(gram)) if gram is not None else 1.0
    padded_entries = shape.padded_rows * shape.embedding_dim
    sigma = target_std * math.sqrt(padded_entries / (p[-1] * q[-1] * trace)) if trace > 0 else 0.0
    g_last = _randn((r[-2], p[-1], q[-1]), torch.float64, device, generator) * sigma
    cores64.append(g_last.permute(1, 0, 2).reshape(p[-1], -1))
    return [c.to(dtype) for c in cores64]


def default_target_std(
    num_rows: int,
    weight_init_min: float | None = None,
    weight_init_max: float | None = None,
) -> float:
    """Std of TorchRec's default EBC init ``uniform(min, max)``: ``(max - min) / sqrt(12)``.

    Missing bounds default like ``EmbeddingBagConfig``: ``max = sqrt(1/N)``, ``min = -sqrt(1/N)``,
    giving ``sqrt(1/N) / sqrt(3)`` when both are omitted.
    """
    if num_rows < 1:
        raise ValueError(f"num_rows must be >= 1, got {num_rows}")
    hi = math.sqrt(1.0 / num_rows) if weight_init_max is None else float(weight_init_max)
    lo = -math.sqrt(1.0 / num_rows) if weight_init_min is None else float(weight_init_min)
    if hi < lo:
        raise ValueError(f"weight_init_max ({hi}) < weight_init_min ({lo})")
    return (hi - lo) / math.sqrt(12.0)


def tt_svd(dense: Tensor, shape: TTShape) -> list[Tensor]:
    """TT-SVD of a dense ``[N, D]`` table at ``shape.ranks`` (float64 inside, ``dense.dtype`` out).

    Rows are zero-padded to ``prod(p)``; the tensor is viewed with modes ``(p_k q_k)`` in storage
    order and split by sequential truncated SVDs. A rank above what an unfolding provides is padded
    with zero factors so the cores keep the configured shapes; at ``max_useful_ranks`` the result
    is exact up to rounding.
    """
    n, d = shape.num_rows, shape.embedding_dim
    if dense.dim() != 2 or dense.shape[0] != n or dense.shape[1] != d:
        raise ValueError(f"dense has shape {tuple(dense.shape)}, expected [{n}, {d}]")
    p, q, r = shape.p, shape.q, shape.full_ranks
    k_cores = shape.num_cores
    x = dense.to(torch.float64)
    if shape.padded_rows > n:
        x = torch.cat([x, x.new_zeros(shape.padded_rows - n, d)])
    # [p_1..p_K, q_1..q_K] -> [p_1, q_1, p_2, q_2, ...]; digits are most-significant-first.
    x = x.reshape(*p, *q).permute(*[i for k in range(k_cores) for i in (k, k_cores + k)])
    rest = x.reshape(-1)  # current remainder, row-major over (r_{k-1}, p_k, q_k, p_{k+1}, ...)
    cores: list[Tensor] = []
    for k in range(k_cores - 1):
        mat = rest.reshape(r[k] * p[k] * q[k], -1)
        u, s, vh = torch.linalg.svd(mat, full_matrices=False)
        keep = min(r[k + 1], s.numel())
        u = u[:, :keep]
        sv = s[:keep, None] * vh[:keep]
        if keep < r[k + 1]:  # pad with zero directions so the core keeps its configured rank
            u = torch.cat([u, u.new_zeros(u.shape[0], r[k + 1] - keep)], dim=1)
            sv = torch.cat([sv, sv.new_zeros(r[k + 1] - keep, sv.shape[1])])
        cores.append(u.reshape(r[k], p[k], q[k], r[k + 1]).permute(1, 0, 2, 3).reshape(p[k], -1))
        rest = sv
    last = rest.reshape(r[-2], p[-1], q[-1])
    cores.append(last.permute(1, 0, 2).reshape(p[-1], -1))
    return [c.to(dense.dtype).contiguous() for c in cores]
