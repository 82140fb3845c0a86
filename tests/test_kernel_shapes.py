"""The kernel-aware shape choice and cost model (torchrec_tt.kernel_shapes)."""

from __future__ import annotations

import math

import pytest

from torchrec_tt.kernel_shapes import (
    choose_tt_shape,
    kernel_cost,
    prefix_floats,
    two_factor_fits,
    two_factor_shape,
)
from torchrec_tt.shapes import TTShape

KAGGLE7 = [10131227, 8351593, 7046547, 5461306, 2202608, 286181, 142572]


@pytest.mark.parametrize("rows", KAGGLE7 + [1, 2, 97, 1_000_003])
@pytest.mark.parametrize("dim", [4, 8, 12, 16, 64, 128])
def test_two_factor_shape_is_valid_and_taken_by_the_kernels(rows: int, dim: int) -> None:
    s = two_factor_shape(rows, dim, 32)
    assert s.num_cores == 2 and s.padded_rows >= rows and math.prod(s.q) == dim
    # The lookup reads (Q + q_last) * R floats: no other split within the kernel limits reads fewer.
    best = min(dim // ql + ql for ql in range(1, 9) if dim % ql == 0 and dim // ql <= 32)
    assert sum(s.q) == best
    assert two_factor_fits(s)
    assert prefix_floats(s) == 0


def test_compression_of_the_kaggle_tables_stays_above_100x() -> None:
    for dim, want in ((16, 150), (64, 300)):
        dense = sum(KAGGLE7) * dim
        params = sum(two_factor_shape(n, dim, 32).num_parameters() for n in KAGGLE7)
        assert dense / params > want


def test_kernel_cost_counts_the_two_factor_work() -> None:
    s = two_factor_shape(10_000_000, 64, 32)
    c = kernel_cost(s)
    assert c.two_factor and c.forward_flops == 2 * 64 * 32 and c.backward_flops == 4 * 64 * 32
    assert c.bytes_per_lookup == 4 * (s.q[0] * 32 + 32 * s.q[1])
    # A balanced 3-core shape whose prefix table is too large for the kernels: the older
    # per-row formula, 2R(q0 q1 R + D) forward.
    balanced = TTShape(11_000_000, 64, (200, 220, 250), (4, 4, 4), (32, 32))
    assert not two_factor_fits(balanced)
    assert kernel_cost(balanced).forward_flops == balanced.forward_flops_per_lookup()
    # Ranks the kernels do not take.
    assert not two_factor_fits(TTShape(1000, 16, (32, 32), (4, 4), (24,)))


def test_choose_tt_shape_prefers_two_factor_and_respects_the_budget() -> None:
    s = choose_tt_shape(10_000_000, 16, 32)
    assert s.num_cores == 2 and two_factor_fits(s)
    small = choose_tt_shape(10_000_000, 16, 32, max_parameters=600_000)
    assert small.num_parameters() <= 600_000 and small.num_cores >= 3
    with pytest.raises(ValueError, match="at most 10 parameters"):
        choose_tt_shape(10_000_000, 16, 32, max_parameters=10)


@pytest.mark.parametrize("dim,q,rank", [(64, (8, 8), 128), (64, (16, 4), 128), (128, (16, 8), 64),
                                        (128, (16, 8), 128)])
def test_shapes_beyond_the_kernels_registers_go_to_the_older_kernels(dim: int, q: tuple, rank: int) -> None:
    # The backward keeps ranks-per-lane x Q accumulators per lane: at most 32.
    assert not two_factor_fits(TTShape(1_000_003, dim, (1001, 1000), q, (rank,)))
