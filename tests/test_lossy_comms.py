"""Error-bounded lossy comms (issue 16): the codec's bound, bad input, the TorchRec codec
protocol (in one process and on 2 gloo processes against a reference codec), the policy and
its checkpoint."""

from __future__ import annotations

import copy
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torchrec.distributed.types import CommOp, QuantizedCommCodecs

from torchrec_tt.sharding import lossy_codec
from torchrec_tt.sharding.lossy_codec import (
    MAX_BITS,
    bits_for_bound,
    decode_groups,
    encode_groups,
    group_bytes,
    guaranteed,
)
from torchrec_tt.sharding.lossy_comms import (
    ErrorBoundPolicy,
    ErrorBoundedCommCodec,
    error_bounded_qcomm_codecs,
    lossy_policy,
)
from torchrec_tt.sharding.testing import run_multiprocess, simulate_pooled_all_to_all

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "distributed"))
sys.path.insert(0, os.path.dirname(__file__))
import tt_dist_cases as cases  # noqa: E402

OP = CommOp.POOLED_EMBEDDINGS_ALL_TO_ALL.name
BOUNDS = (0.3, 0.05, 0.02, 0.01, 1e-3, 1e-5)


def _roundtrip(x: torch.Tensor, rel: float) -> torch.Tensor:
    """``x`` as one group per row of the last dim: [C, G, n]."""
    bits = [bits_for_bound(rel)] * x.shape[1]
    return decode_groups(encode_groups(x, bits), x.shape[1], x.shape[2], bits)


def _adversarial() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n = 203  # not a multiple of 8: exercises the padded last word
    normal = torch.randn(n, generator=g)
    cases_ = {
        "normal": normal,
        "uniform": torch.rand(n, generator=g),
        "heavy_tail": torch.randn(n, generator=g) / torch.rand(n, generator=g).clamp_min(1e-3),
        "one_outlier": torch.cat([normal[:-1] * 1e-3, torch.tensor([50.0])]),
        "constant": torch.full((n,), 0.37),
        "zeros": torch.zeros(n),
        "two_values": torch.where(normal > 0, 1.0, -3.0),
        "offset": 10.0 + 0.01 * torch.rand(n, generator=g),
        "tiny": 1e-30 * normal,
        "huge": 1e30 * normal,
        "subnormal": 1e-42 * torch.randint(-5, 6, (n,), generator=g).float(),
        "float_max": torch.tensor([-3.4e38, 3.4e38] * (n // 2) + [0.0]),
        "sign_split": torch.cat([-torch.rand(n // 2, generator=g) - 1, torch.rand(n - n // 2,
                                                                                generator=g) + 1]),
        "steps_of_ulp": 1.0 + torch.arange(n).float() * 2.0**-23,
    }
    return cases_


@pytest.mark.parametrize("rel", BOUNDS)
def test_bound_holds_elementwise(rel: float) -> None:
    checked = 0
    for name, x in _adversarial().items():
        x = x.float().reshape(1, 1, -1)
        y = _roundtrip(x, rel)
        err = (y - x).abs()
        rng = float(x.max()) - float(x.min())
        if not math.isfinite(rng):  # float_max: the range overflows float32; check in float64
            rng = float(x.double().max() - x.double().min())
        if guaranteed(x, rel):
            assert float(err.double().max()) <= rel * rng, (name, rel)
            checked += 1
        else:  # below float32 resolution: the documented rounding slack
            slack = 2.0**-22 * float(x.abs().max()) + 2.0**-20 * rng
            assert float(err.double().max()) <= rel * rng + slack, (name, rel)
        assert torch.isfinite(y).all(), name
    assert checked >= 10


def test_constant_groups_exact_and_random_groups_bounded() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 7, 64, generator=g) * torch.logspace(-6, 3, 7).view(1, 7, 1)
    x[1, 2] = -4.5  # a constant group among others
    bits = [1, 2, 3, 5, 8, 11, 16]
    y = decode_groups(encode_groups(x, bits), 7, 64, bits)
    assert torch.equal(y[1, 2], x[1, 2])
    rng = x.amax(-1) - x.amin(-1)
    half_step = rng / (2 * (2 ** torch.tensor(bits).float() - 1))
    rounding = 2.0**-22 * rng + 2.0**-24 * x.abs().amax(-1)  # float32 room (lossy_codec docs)
    assert ((y - x).abs().amax(-1) <= half_step + rounding).all()
    assert encode_groups(x, bits).shape == (3, sum(group_bytes(64, b) for b in bits))


def test_bits_for_bound() -> None:
    assert [bits_for_bound(r) for r in (0.05, 0.02, 0.01)] == [4, 5, 6]
    for rel in (0.4, 0.05, 0.013, 1e-3, 1e-5):
        b = bits_for_bound(rel)
        assert 1 / (2 * (2**b - 1)) <= rel
        assert b == 1 or 1 / (2 * (2 ** (b - 1) - 1)) > rel * 63 / 64
    for bad in (0.0, -0.1, 0.5, float("nan"), float("inf"), 1e-7, "0.1"):
        with pytest.raises(ValueError, match="rel_bound"):
            bits_for_bound(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_inf_rejected(bad: float) -> None:
    x = torch.randn(2, 3, 16)
    x[1, 2, 5] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        encode_groups(x, [4, 4, 4])
    registry = error_bounded_qcomm_codecs(0.05, block_dim=8)
    codecs = [copy.deepcopy(registry[OP]) for _ in range(2)]
    emb = [torch.randn(4, 8), torch.randn(4, 8)]
    emb[1][3, 1] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        simulate_pooled_all_to_all(codecs, emb)


def test_empty_inputs() -> None:
    assert encode_groups(torch.zeros(2, 0, 5), []).shape == (2, 0)
    assert encode_groups(torch.zeros(2, 3, 0), [4, 4, 4]).shape == (2, 0)
    assert decode_groups(torch.zeros(2, 0, dtype=torch.uint8), 3, 0, [4, 4, 4]).shape == (2, 3, 0)
    with pytest.raises(ValueError, match="code widths"):
        encode_groups(torch.zeros(1, 1, 8), [MAX_BITS + 1])


def _codecs(world: int, rel: float = 0.05, **kwargs: Any) -> list[QuantizedCommCodecs]:
    # one registry (own policy and layouts) per simulated rank, as in separate processes
    return [error_bounded_qcomm_codecs(rel, block_dim=8, **kwargs)[OP] for _ in range(world)]


def _expected(emb: list[torch.Tensor], grads: list[torch.Tensor], batch: int
              ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    world = len(emb)
    dims = [e.shape[1] for e in emb]
    starts = [sum(dims[:r]) for r in range(world)]
    outs = [torch.cat([e[r * batch:(r + 1) * batch] for e in emb], 1) for r in range(world)]
    gins = [torch.cat([g[:, starts[r]:starts[r] + dims[r]] for g in grads], 0)
            for r in range(world)]
    return outs, gins


def _assert_within(got: torch.Tensor, want: torch.Tensor, rel: float, block: int) -> None:
    """Per block of columns (a table), every element within rel x that table's range in the
    chunk encoded -- which is at most rel x the whole tensor's range."""
    if want.numel() == 0:
        return
    for c in range(0, want.shape[1], block):
        w, y = want[:, c:c + block], got[:, c:c + block]
        assert float((y - w).abs().max()) <= rel * float(w.max() - w.min()) + 1e-30
    assert float((got - want).abs().max()) <= rel * float(want.max() - want.min()) + 1e-30


@pytest.mark.parametrize("dims,batch", [([16, 32], 5), ([0, 24], 4), ([8, 0, 16], 3),
                                        ([8, 8], 0), ([0, 0], 2)])
def test_codec_protocol_in_process(dims: list[int], batch: int) -> None:
    """TorchRec's call sequence on 2-3 simulated ranks, zero-length splits included: outputs
    and gradients within the bound per table, byte counts exact."""
    world = len(dims)
    g = torch.Generator().manual_seed(2)
    scales = torch.logspace(-4, 1, max(sum(dims), 1))
    emb = [torch.randn(batch * world, d, generator=g) * scales[:d] for d in dims]
    grads = [torch.randn(batch, sum(dims), generator=g) * 1e-3 for _ in range(world)]
    res = simulate_pooled_all_to_all(_codecs(world), emb, grads)
    outs, gins = _expected(emb, grads, batch)
    for r in range(world):
        assert res["outputs"][r].shape == outs[r].shape
        _assert_within(res["outputs"][r], outs[r], 0.05, 8)
        assert res["grad_inputs"][r].shape == gins[r].shape
        for s in range(world):  # the gradient chunk each peer encoded for me
            _assert_within(res["grad_inputs"][r][s * batch:(s + 1) * batch],
                           gins[r][s * batch:(s + 1) * batch], 0.05, 8)
    # 4-bit codes + an 8-byte header per (chunk, 8-column group)
    expected = 0
    for r in range(world):
        others = [s for s in range(world) if s != r]
        expected = len(others) * (dims[r] // 8) * group_bytes(batch * 8, 4)  # forward
        expected += sum(dims[s] // 8 * group_bytes(batch * 8, 4) for s in others)  # backward
        assert res["bytes_sent"][r] == expected


def test_block_dim_and_layout_errors() -> None:
    codecs = _codecs(2)
    with pytest.raises(ValueError, match="block_dim 8 does not divide"):
        simulate_pooled_all_to_all(codecs, [torch.randn(4, 12), torch.randn(4, 8)])
    codec = codecs[0].backward
    with pytest.raises(ValueError, match="no forward pooled all-to-all of this size"):
        codec.encode(torch.randn(40), codec.create_context())
    with pytest.raises(ValueError, match="no all-to-all layout"):
        codecs[0].forward.encode(torch.randn(8), codecs[0].forward.create_context())
    with pytest.raises(TypeError, match="float32"):
        codecs[0].forward.encode(torch.randn(8, dtype=torch.float64), None)
    with pytest.raises(ValueError, match="only POOLED_EMBEDDINGS_ALL_TO_ALL"):
        error_bounded_qcomm_codecs(0.05, comm_ops=[CommOp.POOLED_EMBEDDINGS_REDUCE_SCATTER])
    with pytest.raises(ValueError, match="rel_error_bound"):
        error_bounded_qcomm_codecs(0.7)
    with pytest.raises(ValueError, match="looser"):
        error_bounded_qcomm_codecs(0.01, final_rel_error_bound=0.05, decay_steps=10)
    with pytest.raises(ValueError, match="decay_steps"):
        error_bounded_qcomm_codecs(0.05, final_rel_error_bound=0.01)
    with pytest.raises(ValueError, match="block_dim"):
        error_bounded_qcomm_codecs(0.05, block_dim=0)
    with pytest.raises(ValueError, match="not both"):
        error_bounded_qcomm_codecs(0.05, policy=ErrorBoundPolicy(0.05))


def test_same_length_chunks_with_different_widths_are_padded() -> None:
    """Two ranks with equal dims but different per-table widths: the size stays a function of
    length (the narrower chunk is padded) and decoding still works."""
    world, batch = 2, 6
    codecs = _codecs(world)
    for c in codecs:  # tighten one table of rank 1 only (as the table-wise level may)
        c.forward.policy._scale["forward:16,16:1:0"] = 0.25
    emb = [torch.randn(batch * world, 16) for _ in range(world)]
    res = simulate_pooled_all_to_all(codecs, emb)
    outs, _ = _expected(emb, [torch.zeros(batch, 32)] * world, batch)
    for r in range(world):
        _assert_within(res["outputs"][r], outs[r], 0.05, 8)
    assert res["bytes_sent"][0] == res["bytes_sent"][1] == group_bytes(48, 4) + group_bytes(48, 6)


def test_policy_schedule_and_table_scales() -> None:
    policy = ErrorBoundPolicy(0.05, 0.01, decay_steps=100, update_every=2, stats_every=1)
    bounds = []
    for _ in range(120):
        bounds.append(policy.iteration_bound())
        policy.step()
    assert bounds[0] == 0.05 and abs(bounds[100] - 0.01) < 1e-12 and bounds[-1] == bounds[100]
    assert all(a >= b for a, b in zip(bounds, bounds[1:]))
    # table level: a tail-heavy table gets a tighter bound, never looser than the schedule's
    # one policy object for both simulated ranks stands for the all-reduced statistics
    shared = ErrorBoundPolicy(0.05, update_every=2, stats_every=1)
    codecs = [error_bounded_qcomm_codecs(policy=shared, block_dim=8)[OP] for _ in range(2)]
    g = torch.Generator().manual_seed(3)
    batch = 64
    for step in range(10):
        emb = [torch.randn(batch * 2, 16, generator=g) for _ in range(2)]
        emb[0][0, 0] = 200.0  # table 0 of rank 0: one outlier sets its range
        simulate_pooled_all_to_all(codecs, emb)
        for c in codecs:
            lossy_policy({OP: c}).step()
    policy = codecs[0].forward.policy
    # (no process group here: each simulated rank updates from its own statistics)
    scales = policy.state_dict()["scale"]
    assert scales["forward:16,16:0:0"] < 0.5
    assert all(0.25 <= s <= 1 for s in scales.values())
    assert policy.table_bound("forward", "16,16:0:0") < policy.table_bound("forward", "16,16:0:1")


def test_policy_checkpoint_resume_exact() -> None:
    def run(policy: ErrorBoundPolicy, steps: range, seed: int) -> list[Any]:
        codecs = error_bounded_qcomm_codecs(policy=policy, block_dim=8)[OP]
        peer = error_bounded_qcomm_codecs(policy=copy.deepcopy(policy), block_dim=8)[OP]
        seen = []
        for step in steps:
            g = torch.Generator().manual_seed(seed + step)
            emb = [torch.randn(32, 16, generator=g) * (1 + step), torch.randn(32, 8, generator=g)]
            emb[0][step % 32, :8] += 20
            res = simulate_pooled_all_to_all([codecs, peer], emb)
            seen.append((res["outputs"][0].clone(), res["bytes_sent"]))
            policy.step()
            peer.forward.policy.step()
            peer.forward.policy.load_state_dict(policy.state_dict())  # as if all-reduced
        return seen

    make = lambda: ErrorBoundPolicy(0.05, 0.005, decay_steps=30, update_every=3,  # noqa: E731
                                    stats_every=1)
    full = make()
    straight = run(full, range(20), 0)
    first = make()
    run(first, range(11), 0)
    saved = json.loads(json.dumps(first.state_dict()))  # what the trainer writes
    resumed = make()
    resumed.load_state_dict(saved)
    assert resumed.state_dict() == first.state_dict()
    rest = run(resumed, range(11, 20), 0)
    for (a, ba), (b, bb) in zip(straight[11:], rest):
        assert torch.equal(a, b) and ba == bb
    assert resumed.state_dict() == full.state_dict()
    with pytest.raises(ValueError, match="settings"):
        ErrorBoundPolicy(0.05).load_state_dict(saved)
    before = make().state_dict()
    with pytest.raises(ValueError, match="not an ErrorBoundPolicy state_dict"):
        p = make()
        p.load_state_dict({"iteration": 3})
    assert p.state_dict() == before


# ------------------------------------------------------------------ compiled codec vs reference

needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and lossy_codec.compiled_available("cuda")),
    reason="needs a CUDA GPU and torchrec_tt built with its CUDA kernels (compiled lossy codec)")
ALL_BITS = list(range(1, MAX_BITS + 1))


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical float32 tensors (NaN included)."""
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.int32),
                                              b.contiguous().view(torch.int32))


def _assert_impls_agree(x: torch.Tensor, bits: list[int]) -> None:
    """encode_groups / decode_groups: compiled and reference give the same bytes, and decode
    the same bytes to the same bits."""
    c, g, n = x.shape
    ref = encode_groups(x, bits, impl="reference")
    got = encode_groups(x, bits, impl="compiled")
    assert torch.equal(ref, got), (tuple(x.shape), bits)
    dref = decode_groups(ref, g, n, bits, impl="reference")
    dgot = decode_groups(ref, g, n, bits, impl="compiled")
    assert _same_bits(dref, dgot), (tuple(x.shape), bits)


def _random_cases(device: str) -> list[tuple[torch.Tensor, list[int]]]:
    g = torch.Generator().manual_seed(5)
    out = []
    for c, groups, n in [(2, 16, 203), (1, 16, 1), (3, 16, 64), (2, 16, 1028), (1, 16, 9)]:
        x = torch.randn(c, groups, n, generator=g) * torch.logspace(-6, 4, groups).view(1, -1, 1)
        x = x + torch.randn(1, groups, 1, generator=g) * 10  # offsets: groups not around 0
        out.append((x.to(device), ALL_BITS))  # every width the codec can pick
    widths = [int(b) for b in torch.randint(1, MAX_BITS + 1, (7,), generator=g)]
    out.append((torch.randn(4, 7, 333, generator=g).to(device), widths))
    return out


def _adversarial_cases(device: str) -> list[tuple[torch.Tensor, list[int]]]:
    out = []
    for x in _adversarial().values():
        x = x.float().reshape(1, 1, -1).to(device)
        out.append((x.expand(len(ALL_BITS), 1, -1).reshape(1, len(ALL_BITS), -1).contiguous(),
                    ALL_BITS))
    return out


def test_compiled_codec_is_bit_identical_to_reference() -> None:
    """Random tables (every code width, odd sizes, offsets) and the adversarial inputs
    (constant, zeros, subnormal, float32-max ranges, ulp steps, outliers, 1 value)."""
    assert lossy_codec.compiled_available("cpu")
    for x, bits in _random_cases("cpu") + _adversarial_cases("cpu"):
        _assert_impls_agree(x, bits)


@pytest.mark.parametrize("rows,block,groups", [(37, 16, 5), (21, 3, 4), (1, 203, 3), (5, 1, 6),
                                               (300, 8, 2), (0, 16, 2), (4, 16, 0)])
def test_compiled_blocks_match_reference(rows: int, block: int, groups: int) -> None:
    """encode_blocks / decode_blocks (the codec's in-place layout), padded rows included."""
    g = torch.Generator().manual_seed(rows * 31 + block)
    x = torch.randn(3, rows, groups * block, generator=g) * 3 + 1
    bits = [int(b) for b in torch.randint(1, MAX_BITS + 1, (groups,), generator=g)]
    size = sum(group_bytes(rows * block, b) for b in bits)
    for row_bytes in (size, size + 5):
        ref = lossy_codec.encode_blocks(x, bits, block, row_bytes, impl="reference")
        got = lossy_codec.encode_blocks(x, bits, block, row_bytes, impl="compiled")
        assert got.shape == (3, row_bytes) and torch.equal(ref, got)
        dref = lossy_codec.decode_blocks(ref, rows, block, bits, impl="reference")
        dgot = lossy_codec.decode_blocks(ref, rows, block, bits, impl="compiled")
        assert dgot.shape == (3, rows, groups * block) and _same_bits(dref, dgot)
        for impl in ("compiled", "reference"):  # into a slice of a larger buffer
            buf = torch.full((dgot.numel() + 7,), -1.0)
            lossy_codec.decode_blocks(ref, rows, block, bits, impl=impl, out=buf[3:-4])
            assert _same_bits(buf[3:-4], dgot.reshape(-1)) and (buf[:3] == -1).all()
    if rows and groups:  # the same bytes as encode_groups of the grouped tensor
        grouped = x.reshape(3, rows, groups, block).permute(0, 2, 1, 3).reshape(3, groups, -1)
        assert torch.equal(encode_groups(grouped, bits, impl="reference"),
                           lossy_codec.encode_blocks(x, bits, block))


def test_compiled_signed_zero_extremes_decode_equal() -> None:
    """A group whose extreme is +0 and -0: the header may hold either zero (see the module
    doc); decoded values compare equal to the reference's."""
    x = torch.tensor([[[0.0, -0.0, 1.0, 2.0, -0.0, 0.0, 3.0, 0.5, 0.0]]])
    for bits in ALL_BITS:
        ref = decode_groups(encode_groups(x, [bits], impl="reference"), 1, 9, [bits],
                            impl="reference")
        got = decode_groups(encode_groups(x, [bits], impl="compiled"), 1, 9, [bits],
                            impl="compiled")
        assert torch.equal(ref, got)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_compiled_nan_inf_rejected_or_marked(bad: float) -> None:
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 16, generator=g)
    x[1, 2, 5] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        encode_groups(x, [4, 4, 4], impl="compiled")
    with pytest.raises(ValueError, match="NaN or inf"):
        lossy_codec.encode_blocks(x.reshape(2, 1, 48), [4, 4, 4], 16, impl="compiled",
                                  flag=lossy_codec.NonFiniteFlag())  # CPU: raised at once
    # unchecked: the bad group is sent marked and decodes to NaN; the others are unchanged
    data = encode_groups(x, [4, 4, 4], check_finite=False, impl="compiled")
    y = decode_groups(data, 3, 16, [4, 4, 4], impl="compiled")
    assert torch.isnan(y[1, 2]).all()
    good = x.clone()
    good[1, 2] = 0.0
    ref = decode_groups(encode_groups(good, [4, 4, 4], impl="reference"), 3, 16, [4, 4, 4],
                        impl="reference")
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[1, 2] = False
    assert _same_bits(y[mask], ref[mask])
    # unchecked with a flag (what the codec passes): the flag never reports it, so a policy's
    # step() cannot raise for an encode that asked not to be checked
    flag = lossy_codec.NonFiniteFlag()
    marked = lossy_codec.encode_blocks(x.reshape(2, 1, 48), [4, 4, 4], 16, impl="compiled",
                                       check_finite=False, flag=flag)
    assert torch.equal(marked, lossy_codec.encode_blocks(x.reshape(2, 1, 48), [4, 4, 4], 16,
                                                         impl="compiled", check_finite=False))
    flag.check()
    flag.poll()


def test_compiled_codec_path_equals_reference_codec() -> None:
    """TorchRec's call sequence (3 simulated ranks, one with no columns): the compiled codec
    sends the reference's bytes and decodes them to the same bits, both directions."""
    g = torch.Generator().manual_seed(7)
    dims, batch = [16, 0, 24], 5
    emb = [torch.randn(batch * 3, d, generator=g) * (1 + d) for d in dims]
    grads = [torch.randn(batch, sum(dims), generator=g) * 1e-3 for _ in range(3)]
    res = {impl: simulate_pooled_all_to_all(
        [error_bounded_qcomm_codecs(0.02, block_dim=8, codec_impl=impl)[OP] for _ in range(3)],
        emb, grads) for impl in ("compiled", "reference")}
    for r in range(3):
        assert _same_bits(res["compiled"]["outputs"][r], res["reference"]["outputs"][r])
        assert _same_bits(res["compiled"]["grad_inputs"][r], res["reference"]["grad_inputs"][r])
    assert res["compiled"]["bytes_sent"] == res["reference"]["bytes_sent"]


def _codec_op_calls(codecs: list[QuantizedCommCodecs], emb: list[torch.Tensor],
                    grads: list[torch.Tensor]) -> tuple[dict[str, Any], dict[str, int]]:
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    calls: Counter[str] = Counter()

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                               kwargs: Any = None) -> Any:
            name = str(func.overloadpacket)
            if name.startswith("torchrec_tt."):
                calls[name.split(".")[1].replace("_into", "")] += 1
            return func(*args, **(kwargs or {}))

    with Count():
        res = simulate_pooled_all_to_all(codecs, emb, grads)
    return res, dict(calls)


@pytest.mark.parametrize("scaled_rank", [None, 2])
def test_codec_one_kernel_call_per_run_of_ranks(scaled_rank: int | None) -> None:
    """Ranks with the same dims and code widths are encoded / decoded by one op call (one per
    all-to-all and direction on each rank when all agree), with the bits of the reference
    codec; a rank whose table is scaled to other widths gets its own call."""
    # The CPU kernels are always built (setup.py): a missing op is a failure, not a skip.
    assert lossy_codec.compiled_available("cpu")
    g = torch.Generator().manual_seed(9)
    dims, batch, world = [16, 16, 16], 6, 3
    emb = [torch.randn(batch * world, d, generator=g) * 2 for d in dims]
    grads = [torch.randn(batch, sum(dims), generator=g) * 1e-3 for _ in range(world)]
    res = {}
    for impl in ("compiled", "reference"):
        codecs = [error_bounded_qcomm_codecs(0.05, block_dim=8, codec_impl=impl)[OP]
                  for _ in range(world)]
        if scaled_rank is not None:  # the same state on every rank, as after an all-reduce
            for c in codecs:
                state = c.forward.policy.state_dict()
                for direction in ("forward", "backward"):
                    state["scale"][f"{direction}:16,16,16:{scaled_rank}:0"] = 0.25
                c.forward.policy.load_state_dict(state)
        simulate_pooled_all_to_all(codecs, emb, grads)  # step 0 measures statistics
        for c in codecs:  # step 1 does not (per rank, its tables' statistics: a call per rank)
            c.forward.policy.step()
        res[impl], calls = _codec_op_calls(codecs, emb, grads)
        if impl == "compiled":
            runs = 1 if scaled_rank is None else 2
            # forward: one encode per rank, a decode per run; backward: the reverse
            assert calls == {"lossy_encode": world + world * runs,
                             "lossy_decode": world * runs + world}
    for r in range(world):
        assert _same_bits(res["compiled"]["outputs"][r], res["reference"]["outputs"][r])
        assert _same_bits(res["compiled"]["grad_inputs"][r], res["reference"]["grad_inputs"][r])
    assert res["compiled"]["bytes_sent"] == res["reference"]["bytes_sent"]


def test_codec_impl_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(1, 2, 8)
    with pytest.raises(ValueError, match="impl must be one of"):
        encode_groups(x, [4, 4], impl="fast")
    with pytest.raises(ValueError, match="codec_impl must be one of"):
        error_bounded_qcomm_codecs(0.05, codec_impl="fast")
    monkeypatch.setenv("TORCHREC_TT_LOSSY_CODEC", "reference")
    assert lossy_codec._resolve(None, torch.device("cpu")) == "reference"
    monkeypatch.setenv("TORCHREC_TT_LOSSY_CODEC", "compiled")
    assert lossy_codec._resolve(None, torch.device("cpu")) == "compiled"
    monkeypatch.delenv("TORCHREC_TT_LOSSY_CODEC")
    assert lossy_codec._resolve(None, torch.device("cpu")) == "compiled"
    with pytest.raises(ValueError, match="row_bytes"):
        lossy_codec.encode_blocks(x.reshape(1, 1, 16), [4, 4], 8, 3)
    with pytest.raises(ValueError, match="do not match"):
        lossy_codec.encode_blocks(x.reshape(1, 1, 16), [4, 4], 5)
    with pytest.raises(ValueError, match="expected"):
        lossy_codec.decode_blocks(torch.zeros(1, 3, dtype=torch.uint8), 1, 8, [4, 4])
    with pytest.raises(ValueError, match="code widths"):  # the op's own check, past Python's
        torch.ops.torchrec_tt.lossy_encode(x.reshape(1, 1, 16), [4, 17], 8, 64, None)
    data = lossy_codec.encode_blocks(x.reshape(1, 1, 16), [4, 4], 8)
    with pytest.raises(ValueError, match="out must be"):
        lossy_codec.decode_blocks(data, 1, 8, [4, 4], out=torch.empty(15))
    with pytest.raises(ValueError, match="out must be"):  # the op's own check
        torch.ops.torchrec_tt.lossy_decode_into(data, 1, 8, [4, 4], torch.empty(15))


def test_compiled_ops_fake_kernels_and_opcheck() -> None:
    """Meta tensors give the right shapes; torch.library.opcheck (schema, fake tensor, AOT
    dispatch) passes, so torch.compile / export can trace the ops."""
    x = torch.randn(2, 5, 3 * 8)
    bits = [3, 9, 16]
    size = sum(group_bytes(40, b) for b in bits)
    meta = torch.ops.torchrec_tt.lossy_encode(x.to("meta"), bits, 8, size + 4, None)
    assert meta.shape == (2, size + 4) and meta.dtype == torch.uint8
    data = torch.ops.torchrec_tt.lossy_encode(x, bits, 8, size + 4, None)
    dmeta = torch.ops.torchrec_tt.lossy_decode(data.to("meta"), 5, 8, bits)
    assert dmeta.shape == (2, 5, 24) and dmeta.dtype == torch.float32
    status = torch.zeros(1, dtype=torch.int32)
    torch.library.opcheck(torch.ops.torchrec_tt.lossy_encode.default,
                          (x, bits, 8, size + 4, status))
    torch.library.opcheck(torch.ops.torchrec_tt.lossy_decode.default, (data, 5, 8, bits))
    torch.library.opcheck(torch.ops.torchrec_tt.lossy_decode_into.default,
                          (data, 5, 8, bits, torch.empty(2 * 5 * 24)))


@needs_cuda
def test_cuda_compiled_codec_is_bit_identical_to_reference() -> None:
    """The CUDA kernels against the torch-op reference on the GPU and the CPU op (same bytes,
    same decoded bits): random, every width, adversarial, vector and scalar paths."""
    for x, bits in _random_cases("cuda") + _adversarial_cases("cuda"):
        _assert_impls_agree(x, bits)
        c, g, n = x.shape
        cpu = encode_groups(x.cpu(), bits, impl="compiled")
        gpu = encode_groups(x, bits, impl="compiled")
        assert torch.equal(cpu, gpu.cpu())
        assert _same_bits(decode_groups(cpu, g, n, bits, impl="compiled"),
                          decode_groups(gpu, g, n, bits, impl="compiled").cpu())


@needs_cuda
@pytest.mark.parametrize("rows,block,groups,offset", [(37, 16, 5, 0), (21, 3, 4, 0),
                                                      (19, 16, 3, 1), (1, 1028, 2, 0),
                                                      (4096, 16, 26, 0), (2, 8, 300, 0),
                                                      (1, 1 << 18, 1, 0)])
def test_cuda_compiled_blocks_match_reference(rows: int, block: int, groups: int,
                                              offset: int) -> None:
    """The codec layout on the GPU: misaligned input (scalar path), odd blocks, more groups
    than one launch takes (300 > 256), one big group over many tiles, padded rows."""
    g = torch.Generator().manual_seed(rows + block + groups)
    buf = torch.randn(3 * rows * groups * block + offset, generator=g) * 2 - 1
    x = buf[offset:].view(3, rows, groups * block).cuda() if offset == 0 else \
        buf.cuda()[offset:].view(3, rows, groups * block)
    bits = [int(b) for b in torch.randint(1, MAX_BITS + 1, (groups,), generator=g)]
    size = sum(group_bytes(rows * block, b) for b in bits)
    ref = lossy_codec.encode_blocks(x, bits, block, size + 3, impl="reference")
    got = lossy_codec.encode_blocks(x, bits, block, size + 3, impl="compiled")
    assert torch.equal(ref, got)
    assert torch.equal(got.cpu(), lossy_codec.encode_blocks(x.cpu(), bits, block, size + 3))
    dref = lossy_codec.decode_blocks(ref, rows, block, bits, impl="reference")
    dgot = lossy_codec.decode_blocks(ref, rows, block, bits, impl="compiled")
    assert _same_bits(dref, dgot)
    # a decode straight from a byte slice at an odd offset (as the forward all-to-all does)
    wide = torch.cat([torch.zeros(3, 1, dtype=torch.uint8, device="cuda"), got], 1)
    assert _same_bits(lossy_codec.decode_blocks(wide[:, 1:], rows, block, bits), dgot)
    for at in (0, 1, 4):  # into a buffer slice: aligned (vector stores) and not (scalar)
        buf = torch.full((dgot.numel() + 8,), -1.0, device="cuda")
        lossy_codec.decode_blocks(got, rows, block, bits, out=buf[at: at + dgot.numel()])
        assert _same_bits(buf[at: at + dgot.numel()], dgot.reshape(-1))
        assert (buf[:at] == -1).all() and (buf[at + dgot.numel():] == -1).all()


@needs_cuda
def test_cuda_non_finite_flag_reports_without_sync() -> None:
    """With a NonFiniteFlag the CUDA encode does not synchronise; the bad group decodes to NaN;
    check() raises, and poll() raises once the device's flag has reached the host."""
    flag = lossy_codec.NonFiniteFlag()
    x = torch.randn(2, 4, 1000, device="cuda")
    lossy_codec.encode_groups(x, [5] * 4, flag=flag)
    flag.poll()  # the pinned buffer and the first copy, outside the checked region
    x[1, 3, 17] = float("nan")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        data = lossy_codec.encode_groups(x, [5] * 4, flag=flag)  # no sync, no raise yet
        y = lossy_codec.decode_groups(data, 4, 1000, [5] * 4)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isnan(y[1, 3]).all() and torch.isfinite(y[0]).all()
    with pytest.raises(ValueError, match="NaN or inf"):
        flag.check()
    flag.check()  # reported once; clean again
    lossy_codec.encode_groups(x, [5] * 4, flag=flag)
    with pytest.raises(ValueError, match="NaN or inf"):
        for _ in range(1000):
            torch.cuda.synchronize()
            flag.poll()
    with pytest.raises(ValueError, match="NaN or inf"):  # no flag: synchronise and raise
        lossy_codec.encode_groups(x, [5] * 4)


@needs_cuda
def test_cuda_codec_path_equals_reference_and_does_not_sync() -> None:
    """TorchRec's call sequence on GPU tensors: compiled and reference codecs give the same
    bits both ways, and the compiled path runs under CUDA sync-debug mode "error"."""
    g = torch.Generator().manual_seed(8)
    dims, batch = [32, 16], 64
    emb = [(torch.randn(batch * 2, d, generator=g) * 3).cuda() for d in dims]
    grads = [(torch.randn(batch, sum(dims), generator=g) * 1e-3).cuda() for _ in range(2)]
    res = {}
    for impl in ("compiled", "reference"):
        codecs = [error_bounded_qcomm_codecs(0.02, block_dim=16, codec_impl=impl)[OP]
                  for _ in range(2)]
        simulate_pooled_all_to_all(codecs, emb, grads)  # warm-up: allocations, pinned buffers
        torch.cuda.synchronize()
        if impl == "compiled":
            torch.cuda.set_sync_debug_mode("error")
        try:
            res[impl] = simulate_pooled_all_to_all(codecs, emb, grads)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for r in range(2):
        assert _same_bits(res["compiled"]["outputs"][r], res["reference"]["outputs"][r])
        assert _same_bits(res["compiled"]["grad_inputs"][r], res["reference"]["grad_inputs"][r])


# ------------------------------------------------------------------ 2 gloo processes


class ReferenceCodec(ErrorBoundedCommCodec):
    """The same wire format written the slow, obvious way: per group, per value, with numpy
    float32 arithmetic and a bit-by-bit LSB-first writer."""

    def _encode_chunks(self, x: torch.Tensor, layout: Any, owner: int, chunks: int,
                       padded: int) -> torch.Tensor:
        import numpy as np

        g, k, b = layout.groups(owner), layout.block, layout.batch
        if self.policy.wants_stats():
            grouped = x.reshape(chunks, b, g, k).permute(0, 2, 1, 3).reshape(chunks, g, b * k)
            self.policy.observe(self.direction, layout, owner, grouped)
        bits = self.policy.bits(self.direction, layout, owner)
        arr = x.detach().numpy().reshape(chunks, b, g, k)
        out = bytearray()
        for c in range(chunks):
            groups = [arr[c, :, j, :].reshape(-1).astype(np.float32) for j in range(g)]
            row = bytearray()
            for v in groups:
                if v.size:
                    row += np.array([v.min(), v.max()], dtype="<f4").tobytes()
            order = sorted(range(g), key=lambda j: (bits[j], j))
            hi_parts: list[tuple[int, list[int]]] = []
            for j in order:
                v = groups[j]
                if not v.size:
                    continue
                lo, r = np.float32(v.min()), np.float32(v.max()) - np.float32(v.min())
                levels = (1 << bits[j]) - 1
                scale = np.float32(levels) / r if r > 0 else np.float32(0)
                q = [int(min(max(np.rint(np.float32(np.float32(t) - lo) * scale), 0), levels))
                     for t in v]
                q += [0] * ((-len(q)) % 8)
                row += _bitstream(q, bits[j])
            out += row
            out += bytes(padded - len(row))
        return torch.frombuffer(bytearray(out), dtype=torch.uint8) if out else x.new_empty(
            0, dtype=torch.uint8)


def _bitstream(codes: list[int], bits: int) -> bytes:
    if bits > 8:  # low bytes as they are, then the high bits
        return bytes(c & 0xFF for c in codes) + _bitstream([c >> 8 for c in codes], bits - 8)
    acc, out = 0, bytearray()
    for i, c in enumerate(codes):
        acc |= c << (bits * i)
    nbytes = len(codes) * bits // 8
    return acc.to_bytes(nbytes, "little") if nbytes else b""


def _registry(kind: str) -> dict[str, QuantizedCommCodecs] | None:
    if kind == "none":
        return None
    if kind == "tight":  # 16-bit codes: any mix-up of rows, columns or ranks would show
        policy = ErrorBoundPolicy(1e-5, table_wise=False)
    else:
        policy = ErrorBoundPolicy(0.05, 0.01, decay_steps=4, update_every=2, stats_every=1)
    registry = error_bounded_qcomm_codecs(policy=policy, block_dim=8)
    if kind == "reference":
        fwd, bwd = registry[OP].forward, registry[OP].backward
        registry[OP] = QuantizedCommCodecs(
            forward=ReferenceCodec(policy, "forward", 8, fwd._layouts),
            backward=ReferenceCodec(policy, "backward", 8, bwd._layouts))
    return registry


def train_with_codec(rank: int, world_size: int, kinds: list[str]) -> dict[str, Any]:
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder

    from torchrec_tt.sharding import CommsMeter, TTEmbeddingBagCollectionSharder

    specs = {"t0": ("tw", 0), "t1": ("tw", 1), "t2": ("cw", [0, 1]),
             "e0": ("tw", 1), "e1": ("tw", 0), "e2": ("tw", 1)}
    out: dict[str, Any] = {}
    for kind in kinds:
        model = cases.make_model(0)
        plan = cases.manual_plan(model, specs, world_size)
        registry, registry_ebc = _registry(kind), _registry(kind)
        if registry is not None:  # the plain tables' registry shares the TT one's policy
            policy = lossy_policy(registry)
            registry_ebc = error_bounded_qcomm_codecs(policy=policy, block_dim=8)
            if kind == "reference":
                registry_ebc[OP] = QuantizedCommCodecs(
                    forward=ReferenceCodec(policy, "forward", 8, registry_ebc[OP].forward._layouts),
                    backward=ReferenceCodec(policy, "backward", 8,
                                            registry_ebc[OP].backward._layouts))
        sharders = [
            TTEmbeddingBagCollectionSharder(qcomm_codecs_registry=registry),
            EmbeddingBagCollectionSharder(
                qcomm_codecs_registry=registry_ebc,
                fused_params={"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.1}),
        ]
        dmp = cases.shard(model, plan, sharders)
        opt = torch.optim.SGD([p for n, p in dmp.named_parameters() if "ebc" not in n], lr=0.1)
        meter = CommsMeter()
        losses, per_step = [], []
        for step in range(6):
            batch = cases.batch_for(rank, step, plain=True, fixed=True)
            before = meter.all_to_all_bytes
            with meter:
                loss = dmp(*batch)
                loss.backward()
            per_step.append(meter.all_to_all_bytes - before)
            opt.step()
            opt.zero_grad()
            if registry is not None:
                lossy_policy(registry).step()
            losses.append(loss.detach())
        out[kind] = {"losses": torch.stack(losses), "a2a": meter.all_to_all_bytes,
                     "per_step": per_step,
                     "head": dmp.module.head.weight.detach().clone(),
                     "state": (lossy_policy(registry).state_dict() if registry else None)}
    return out


@pytest.mark.multiprocess
def test_sharded_training_equals_reference_codec() -> None:
    """TT sharder (table-wise and column-wise tables) and TorchRec's EBC sharder, 2 gloo
    processes: training with the codec equals training with the reference codec on the same
    bytes, exactly; it sends fewer all-to-all bytes than fp32 and trains close to it."""
    results = run_multiprocess(train_with_codec, world_size=2,
                               args=(["ours", "reference", "none", "tight"],))
    for res in results:
        ours, ref, none = res["ours"], res["reference"], res["none"]
        # at a 1e-5 bound the codec path trains as fp32 comms do, to rounding
        torch.testing.assert_close(res["tight"]["losses"], none["losses"], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(res["tight"]["head"], none["head"], rtol=1e-4, atol=1e-6)
        assert torch.equal(ours["losses"], ref["losses"])
        assert torch.equal(ours["head"], ref["head"])
        assert ours["a2a"] == ref["a2a"] and ours["a2a"] < none["a2a"]
        assert ours["state"] == ref["state"] and ours["state"]["iteration"] == 6
        assert ours["state"]["scale"]  # the table level updated (statistics all-reduced)
        # the schedule (0.05 -> 0.01 over 4 steps: 4 -> 6 bits) reached the sharders' codecs
        assert ours["per_step"][-1] > ours["per_step"][0]
        assert none["per_step"][-1] == none["per_step"][0]
        torch.testing.assert_close(ours["losses"], none["losses"], rtol=0.1, atol=1e-3)
        assert not torch.equal(ours["losses"], none["losses"])
    assert results[0]["ours"]["state"] == results[1]["ours"]["state"]  # same policy on all ranks


# ------------------------------------------------------------------ the trainer's flag


@pytest.mark.multiprocess
def test_trainer_lossy_comms_stop_and_resume_is_exact(tmp_path: Path) -> None:
    """``--lossy_comms`` on 2 processes: fewer pooled bytes than fp32 comms would send, and a run
    stopped and resumed (policy state from the checkpoint) gives the same losses."""
    import test_dlrm_train as t

    flags = ["--steps", "8", "--eval-every", "8", "--lossy_comms", "0.05"]
    output = t._run(tmp_path / "full", *flags)
    last = [ln for ln in output.splitlines() if ln.startswith("summary:")][-1]
    fields = dict(kv.split("=", 1) for kv in last.split()[1:])
    # the plain tables' pooled all-to-all: at most 5 bits per value (+ headers) instead of 32
    pooled = float(fields["pooled_bytes_per_step"])
    assert 0 < pooled
    part = tmp_path / "part"
    assert "stopped after step 5" in t._run(part, *flags, "--stop-after", "5")
    assert (part / "checkpoint" / "tt" / "step_5" / "lossy_policy.json").exists()
    t._run(part, *flags, "--resume")
    a, b = t._history(tmp_path / "full", "tt"), t._history(part, "tt")
    assert a["loss"] == b["loss"] and a["eval"] == b["eval"]
    assert b["result"]["pooled_a2a_bytes_per_step"] > 0


@pytest.mark.parametrize("argv,message", [
    (["--lossy_comms", "0.7"], "--lossy_comms must be a number in (0, 0.5)"),
    (["--lossy_comms", "0.05", "--lossy_comms_final", "0.1"], "looser than --lossy_comms"),
    (["--lossy_comms_final", "0.01"], "--lossy_comms_final needs --lossy_comms"),
])
def test_trainer_lossy_flags_are_checked(argv: list[str], message: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples", "dlrm"))
    import train

    with pytest.raises(SystemExit):
        train.parse_args(argv)
    assert message in capsys.readouterr().err
