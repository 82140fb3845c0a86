"""Hot-row cache of TT tables (issue 14): lookups, counting, refresh / write-back, training,
state_dict and resume, option checks, the path that refuses it (quantization), and TTPolicy's
data-driven selection. Sharded caches: tests/distributed/test_hot_cache_gloo.py."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_tt import TTEmbeddingBagCollection, TTEmbeddingBagConfig
from torchrec_tt.modules import hot_cache
from torchrec_tt.swap import TTPolicy, config_bytes, count_distinct_ids, select_tt_tables, swap_configs
from torchrec_tt.testing import ScalarReads

BATCH = 6
# "a": 2 cores, D=16 -> q=(4,4), R=32: the write-back is exact for up to 8 evicted rows per last
# digit (n * q_1 <= R). "b": no cache, MEAN. "c": 3 cores, cached, MEAN.
FEATURES = [("f", "a", 400), ("g", "a", 400), ("h", "b", 60), ("k", "c", 200)]


def _tables(cache: int = 24, refresh: int = 3, decay: float = 0.5) -> list[TTEmbeddingBagConfig]:
    return [
        TTEmbeddingBagConfig(name="a", num_embeddings=400, embedding_dim=16, feature_names=["f", "g"],
                             tt_ranks=[32], tt_cache_rows=cache, tt_cache_refresh_steps=refresh,
                             tt_cache_decay=decay),
        TTEmbeddingBagConfig(name="b", num_embeddings=60, embedding_dim=8, feature_names=["h"],
                             tt_ranks=[4], pooling=PoolingType.MEAN),
        TTEmbeddingBagConfig(name="c", num_embeddings=200, embedding_dim=8, feature_names=["k"],
                             tt_ranks=[4, 4], pooling=PoolingType.MEAN, tt_cache_rows=cache // 2,
                             tt_cache_refresh_steps=refresh, tt_cache_decay=decay),
    ]


def _kjt(seed: int, weighted: bool = False, hot_shift: int = 0) -> KeyedJaggedTensor:
    """Zipf-like ids (small ids hot, ``hot_shift`` moves the hot set), empty bags included."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 5, (len(FEATURES) * BATCH,), generator=gen)
    values = []
    for i, n in enumerate(lengths.tolist()):
        rows = FEATURES[i // BATCH][2]
        ids = (torch.rand(n, generator=gen) ** 4 * rows).long()
        values.append((ids + hot_shift) % rows)
    weights = torch.rand(int(lengths.sum()), generator=gen) + 0.5 if weighted else None
    return KeyedJaggedTensor.from_lengths_sync(
        [f for f, _, _ in FEATURES], torch.cat(values), lengths, weights=weights
    )


def _dense_reference(ebc: TTEmbeddingBagCollection, kjt: KeyedJaggedTensor) -> torch.Tensor:
    """Pooled lookups of ``kjt`` through ``F.embedding_bag`` over ``full_weight``."""
    pooling = {c.name: c.pooling for c in ebc.embedding_bag_configs()}
    out = []
    jts = kjt.to_dict()
    for f, t, _ in FEATURES:
        jt = jts[f]
        offsets = jt.offsets()
        pooled = F.embedding_bag(jt.values(), ebc.full_weight(t), offsets[:-1], mode="sum",
                                 per_sample_weights=jt.weights_or_none())
        if pooling[t] == PoolingType.MEAN:
            pooled = pooled / jt.lengths().clamp(min=1)[:, None]
        out.append(pooled)
    return torch.cat(out, dim=1)


def _train(ebc: TTEmbeddingBagCollection, steps: int, start: int = 0, **kw: object) -> list[float]:
    losses = []
    for s in range(start, start + steps):
        out = ebc(_kjt(s, **kw)).values()
        loss = (out - 0.3).square().mean()
        loss.backward()
        losses.append(loss.item())
    return losses


def _fused(kind: str = "exact_adagrad", lr: float = 0.1, **kw: object) -> TTEmbeddingBagCollection:
    torch.manual_seed(0)
    return TTEmbeddingBagCollection(_tables(**kw), fused_params={"optimizer": kind, "learning_rate": lr})


@pytest.mark.parametrize("weighted", [False, True])
def test_hits_and_misses_match_the_dense_table(weighted: bool) -> None:
    torch.manual_seed(0)
    ebc = TTEmbeddingBagCollection(_tables(), is_weighted=weighted,
                                   fused_params={"optimizer": "exact_sgd", "learning_rate": 0.5})
    _train(ebc, 7, weighted=weighted)  # two refreshes; the slab rows are trained away from TT
    a = ebc.embedding_bags["a"]
    assert ebc.cached_ids("a").numel() == 24 and ebc.cached_ids("c").numel() == 12
    # The slab holds rows TT does not: the lookup must take them from the slab.
    held = a.cache_ids >= 0
    assert (a.full_weight()[a.cache_ids[held]] - a.cache_weight[held]).abs().max() > 1e-3
    ebc.eval()
    for seed in (100, 101):
        kjt = _kjt(seed, weighted=weighted)
        slots = hot_cache.cache_slots(a, kjt["f"].values())
        assert (slots >= 0).any() and (slots < 0).any()  # both hits and misses
        got = ebc(kjt).values()
        torch.testing.assert_close(got, _dense_reference(ebc, kjt), rtol=1e-5, atol=1e-6)


def test_gradients_match_the_dense_table() -> None:
    torch.manual_seed(0)
    ebc = TTEmbeddingBagCollection(_tables(refresh=1000), is_weighted=True)  # plain autograd
    for name in ("a", "c"):
        table = ebc.embedding_bags[name]
        hot_cache.count_ids(table, torch.arange(30))
        ebc.refresh_cache(name)
        with torch.no_grad():
            table.cache_weight.add_(torch.randn_like(table.cache_weight) * 0.1)
    kjt = _kjt(7, weighted=True)
    params = list(ebc.parameters())
    got = torch.autograd.grad(ebc(kjt).values().square().sum(), params)
    want = torch.autograd.grad(_dense_reference(ebc, kjt).square().sum(), params)
    for (name, _), g, w in zip(ebc.named_parameters(), got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6, msg=name)


def test_counting_picks_the_most_frequent_ids_deterministically() -> None:
    torch.manual_seed(0)
    ebc = TTEmbeddingBagCollection(_tables(cache=4, refresh=1000))
    a = ebc.embedding_bags["a"]
    # Counts: id 7 x5, 3 x4, 9 x4, 1 x3, 2 x3 (tie with 1: the smaller id wins), 5 x1.
    ids = torch.tensor([7] * 5 + [3] * 4 + [9] * 4 + [1] * 3 + [2] * 3 + [5])
    hot_cache.count_ids(a, ids)
    stats = ebc.refresh_cache("a")
    assert ebc.cached_ids("a").tolist() == [1, 3, 7, 9]
    assert (stats.admitted, stats.evicted, stats.cached) == (4, 0, 4)
    # Decay 0.5 then a new hot set: 20 x 11, 21 x 11 overtake 7 (2.5), 3 and 9 (2 each).
    hot_cache.count_ids(a, torch.tensor([20] * 11 + [21] * 11))
    stats = ebc.refresh_cache("a")
    assert ebc.cached_ids("a").tolist() == [3, 7, 20, 21]  # 9 ties 3 at 2.0: smaller id kept
    assert (stats.admitted, stats.evicted) == (2, 2)


def test_candidates_stay_bounded_and_a_late_hot_id_gets_in() -> None:
    torch.manual_seed(0)
    ebc = TTEmbeddingBagCollection(_tables(cache=4, refresh=1000, decay=1.0))
    a = ebc.embedding_bags["a"]
    cap = a.cache_cand_ids.numel()
    assert cap == hot_cache.CANDIDATES_PER_ROW * 4
    hot_cache.count_ids(a, torch.arange(100, 200).repeat(2))  # 100 distinct ids, 2 each
    assert int((a.cache_cand_ids >= 0).sum()) == cap
    for _ in range(3):  # id 5 arrives late, 3 per batch: Space-Saving lets it in and keeps it
        hot_cache.count_ids(a, torch.tensor([5, 5, 5]))
    ebc.refresh_cache("a")
    assert 5 in ebc.cached_ids("a").tolist()


def test_refresh_keeps_every_row_the_model_sees() -> None:
    """Admission copies TT rows, eviction writes the trained slab rows back into the cores: the
    evicted rows read back as trained (exact to float32 rounding at this shape)."""
    ebc = _fused(lr=0.1, refresh=1000)
    a = ebc.embedding_bags["a"]
    hot_cache.count_ids(a, torch.arange(24).repeat(3))
    ebc.refresh_cache("a")
    _train(ebc, 5)  # slab rows of 0..23 trained (refresh_steps=1000: no refresh in between)
    before = ebc.full_weight("a").detach().clone()
    trained = {int(i): a.cache_weight[s].detach().clone()
               for s, i in enumerate(a.cache_ids.tolist()) if i >= 0}
    hot_cache.count_ids(a, torch.arange(300, 316).repeat(10))  # 16 new ids outrank 16 old ones
    stats = ebc.refresh_cache("a")
    cached = ebc.cached_ids("a").tolist()
    assert stats.evicted == stats.admitted >= 16 and set(range(300, 316)) <= set(cached)
    assert stats.writeback_error < 1e-4  # the 1e-6 weight on the other rows, float32 cores
    evicted = sorted(set(trained) - set(cached))
    assert len(evicted) == stats.evicted
    after = ebc.full_weight("a").detach()
    for i in evicted:  # now served by TT
        torch.testing.assert_close(after[i], trained[i], rtol=1e-4, atol=1e-5)
    for i in ebc.cached_ids("a").tolist():  # kept rows bit-equal, admitted = TT after write-back
        if i in trained:
            assert torch.equal(after[i], trained[i])
    admitted = torch.tensor(sorted(set(cached) - set(trained)))
    # (tt_rows and the dense reconstruction round differently)
    torch.testing.assert_close(after[admitted], a.full_weight().detach()[admitted])
    # Rows neither evicted nor admitted keep their values bit for bit when no changed core
    # slice is theirs (other uncached rows sharing a slice move: a TT table shares storage).
    from torchrec_tt.reference import _row_digits
    changed = set(_row_digits(torch.tensor(evicted), a.shape.p)[-1].tolist())
    last = _row_digits(torch.arange(400), a.shape.p)[-1]
    untouched = [i for i in range(400) if last[i].item() not in changed and i not in cached]
    assert untouched and torch.equal(after[untouched], before[untouched])
    # The admitted slots' optimizer state starts from zero.
    slots = hot_cache.cache_slots(a, admitted)
    assert torch.equal(a.cache_weight_momentum1[slots], torch.zeros(len(admitted), 16))


def test_training_with_the_cache_decreases_the_loss_and_trains_the_slab() -> None:
    ebc = _fused(refresh=2)
    losses = _train(ebc, 30)
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5]), losses
    a = ebc.embedding_bags["a"]
    held = a.cache_ids >= 0
    # Trained rows differ from what TT gives them: the slab learned on its own.
    assert (a.cache_weight[held] - a.full_weight()[a.cache_ids[held]]).abs().max() > 1e-3
    assert ebc.last_cache_refresh["a"].cached == 24


def test_eval_forward_neither_counts_nor_refreshes() -> None:
    ebc = _fused(refresh=1)
    _train(ebc, 2)
    state = copy.deepcopy(ebc.state_dict())
    ebc.eval()
    with torch.no_grad():
        for s in range(3):
            ebc(_kjt(50 + s))
    for k, v in ebc.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("kind", ["exact_row_wise_adagrad", "adam"])
def test_state_dict_round_trip_and_exact_resume(kind: str) -> None:
    ebc = _fused(kind, lr=0.05, refresh=2)
    _train(ebc, 5)
    saved = copy.deepcopy(ebc.state_dict())
    assert {"embedding_bags.a.cache_weight", "embedding_bags.a.cache_ids",
            "embedding_bags.a.cache_cand_counts", "embedding_bags.a.cache_step",
            "embedding_bags.a.cache_weight_momentum1"} <= set(saved)
    tail = _train(ebc, 6, start=5)
    torch.manual_seed(123)  # a different init: everything must come from the state dict
    resumed = TTEmbeddingBagCollection(_tables(refresh=2),
                                       fused_params={"optimizer": kind, "learning_rate": 0.05})
    resumed.load_state_dict(saved)
    assert _train(resumed, 6, start=5) == tail
    for k, v in ebc.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_dcp_checkpoint_holds_the_cache(tmp_path: object) -> None:
    import torch.distributed.checkpoint as dcp

    ebc = _fused(refresh=2)
    _train(ebc, 5)
    dcp.save(ebc.state_dict(), checkpoint_id=str(tmp_path))
    other = _fused(refresh=2)
    torch.manual_seed(7)
    other.reset_parameters()  # other cores, an empty cache: all must come from the checkpoint
    state = other.state_dict()
    dcp.load(state, checkpoint_id=str(tmp_path))
    other.load_state_dict(state)
    for k, v in ebc.state_dict().items():
        assert torch.equal(v, other.state_dict()[k]), k
    assert _train(other, 3, start=5) == _train(ebc, 3, start=5)


def test_mean_pooling_divides_by_the_full_bag_length() -> None:
    torch.manual_seed(0)
    ebc = TTEmbeddingBagCollection(_tables(cache=4, refresh=1000))
    c = ebc.embedding_bags["c"]
    hot_cache.count_ids(c, torch.tensor([3, 3, 4]))
    ebc.refresh_cache("c")
    with torch.no_grad():
        c.cache_weight[hot_cache.cache_slots(c, torch.tensor([3]))] = 10.0
    ebc.eval()
    # One bag of "k": [3 (cached), 150 (TT)]: the mean is (10 + row_150) / 2.
    lengths = torch.tensor([0] * BATCH * 3 + [2] + [0] * (BATCH - 1))
    kjt = KeyedJaggedTensor.from_lengths_sync(["f", "g", "h", "k"], torch.tensor([3, 150]), lengths)
    got = ebc(kjt)["k"][0]
    row = c.full_weight()[150]
    torch.testing.assert_close(got, (torch.full((8,), 10.0) + row) / 2)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [("tt_cache_rows", -1, "tt_cache_rows"), ("tt_cache_rows", 401, "tt_cache_rows"),
     ("tt_cache_rows", 2.0, "tt_cache_rows"), ("tt_cache_rows", True, "tt_cache_rows"),
     ("tt_cache_refresh_steps", 0, "tt_cache_refresh_steps"),
     ("tt_cache_decay", 1.5, "tt_cache_decay"), ("tt_cache_decay", float("nan"), "tt_cache_decay")],
)
def test_invalid_cache_options_are_rejected_with_names(field: str, value: object, match: str) -> None:
    kw = {"name": "tbl", "num_embeddings": 400, "embedding_dim": 16, "tt_ranks": [8], field: value}
    with pytest.raises(ValueError, match=f"'tbl'.*{match}"):
        TTEmbeddingBagConfig(**kw)


def test_mlet_cache_and_refresh_without_cache_are_rejected() -> None:
    with pytest.raises(ValueError, match="'m'.*mlet_inner_dim"):
        TTEmbeddingBagConfig(name="m", num_embeddings=400, embedding_dim=16, tt_ranks=[8],
                             mlet_inner_dim=32, tt_cache_rows=4)
    ebc = TTEmbeddingBagCollection(_tables())
    with pytest.raises(ValueError, match="'b' has no hot-row cache"):
        ebc.refresh_cache("b")


def test_quantization_refuses_a_cached_table() -> None:
    # (Sharding takes cached tables: tests/distributed/test_hot_cache_gloo.py.)
    from torchrec_tt.inference import QuantTTEmbeddingBagCollection

    ebc = TTEmbeddingBagCollection(_tables())
    with pytest.raises(ValueError, match=r"QuantTTEmbeddingBagCollection.*\['a', 'c'\]"):
        QuantTTEmbeddingBagCollection(ebc)


def test_no_cache_collection_still_scripts() -> None:
    ebc = TTEmbeddingBagCollection(_tables(cache=0))
    scripted = torch.jit.script(ebc)
    kjt = _kjt(3)
    torch.testing.assert_close(scripted(kjt).values(), ebc(kjt).values())


def test_scripted_cached_collection_says_it_runs_eagerly() -> None:
    scripted = torch.jit.script(TTEmbeddingBagCollection(_tables()))
    with pytest.raises(torch.jit.Error, match="eager mode only"):
        scripted(_kjt(0))


def test_compression_counts_the_slab() -> None:
    ebc = TTEmbeddingBagCollection(_tables())
    stats = ebc.compression_stats()
    assert stats["a"]["cache_bytes"] == 24 * 16 * 4
    assert stats["c"]["cache_bytes"] == 12 * 8 * 4
    assert stats["a"]["compression"] == pytest.approx(
        stats["a"]["dense_bytes"] / (stats["a"]["tt_bytes"] + 24 * 16 * 4))
    cfg = _tables()[0]
    assert config_bytes(cfg) == cfg.tt_shape().num_bytes(4) + 24 * 16 * 4


def test_policy_selects_by_distinct_ids_and_sets_the_cache() -> None:
    configs = [
        EmbeddingBagConfig(name="big_sparse", num_embeddings=10_000_000, embedding_dim=16,
                           feature_names=["u"]),
        EmbeddingBagConfig(name="mid", num_embeddings=200_000, embedding_dim=16, feature_names=["v"]),
        EmbeddingBagConfig(name="small", num_embeddings=5_000, embedding_dim=16, feature_names=["w"]),
    ]
    batches = [
        KeyedJaggedTensor.from_lengths_sync(
            ["u", "v", "w", "other"],
            torch.cat([torch.arange(1000) * 7919 + s, torch.arange(3000) * 13 + s,
                       torch.arange(10) + s, torch.arange(5)]),
            torch.tensor([1000, 3000, 10, 5]),
        )
        for s in (0, 1)
    ]
    seen = count_distinct_ids(configs, batches)
    assert seen == {"big_sparse": 2000, "mid": 6000, "small": 11}
    assert select_tt_tables(configs, TTPolicy(largest=1)) == ["big_sparse"]
    assert select_tt_tables(configs, TTPolicy(largest=1, distinct_ids=seen)) == ["mid"]
    assert select_tt_tables(configs, TTPolicy(min_rows=5_000, distinct_ids={"big_sparse": 2000})) == [
        "mid", "small"]
    swapped = swap_configs(configs, TTPolicy(largest=1, distinct_ids=seen, cache_fraction=0.05))
    assert isinstance(swapped[1], TTEmbeddingBagConfig) and swapped[1].tt_cache_rows == 10_000
    with pytest.raises(ValueError, match="unknown tables"):
        select_tt_tables(configs, TTPolicy(largest=1, distinct_ids={"nope": 3}))
    with pytest.raises(ValueError, match="distinct_ids"):
        TTPolicy(largest=1, distinct_ids={"mid": -1})
    with pytest.raises(ValueError, match="cache_fraction"):
        TTPolicy(largest=1, cache_fraction=2.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_through_refreshes() -> None:
    """The cache on CUDA (CUDA TT kernels, slab lookups, counting, admission and write-back on
    the device) trains like the CPU one: same state in, same batches, same outputs and rows."""
    cpu = _fused(lr=0.1, refresh=2)
    torch.manual_seed(0)
    gpu = TTEmbeddingBagCollection(_tables(refresh=2), device=torch.device("cuda"),
                                   fused_params={"optimizer": "exact_adagrad", "learning_rate": 0.1})
    gpu.load_state_dict(cpu.state_dict())
    for step in range(7):  # three refreshes
        kjt = _kjt(step)
        outs = []
        for ebc, k in ((cpu, kjt), (gpu, kjt.to(torch.device("cuda")))):
            out = ebc(k).values()
            (out - 0.3).square().mean().backward()
            outs.append(out.detach().cpu())
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-3, atol=1e-4, msg=f"step {step}")
    for name in ("a", "c"):
        assert torch.equal(gpu.cached_ids(name).cpu(), cpu.cached_ids(name))
        torch.testing.assert_close(gpu.full_weight(name).detach().cpu(), cpu.full_weight(name).detach(),
                                   rtol=1e-3, atol=1e-4)


def _step_buffers(ebc: TTEmbeddingBagCollection) -> list[torch.Tensor]:
    return [t.cache_step for t in ebc.embedding_bags.values() if t.cache_rows > 0]


def _train_logging_refreshes(ebc: TTEmbeddingBagCollection, steps: range) -> list[tuple[int, str]]:
    """Trains like ``_train`` and returns ``(step, table)`` of every refresh, the step read from
    the buffer at the refresh (the schedule's source of truth)."""
    log: list[tuple[torch.Tensor, str]] = []
    refresh = ebc.refresh_cache

    def logged(name: str) -> hot_cache.CacheRefreshStats:
        log.append((ebc.embedding_bags[name].cache_step.clone(), name))  # (read after the steps)
        return refresh(name)

    ebc.refresh_cache = logged  # type: ignore[method-assign]
    try:
        for s in steps:
            ebc(_kjt(s)).values().square().mean().backward()
    finally:
        del ebc.refresh_cache
    return [(int(step), name) for step, name in log]


def test_training_forwards_read_no_step_counter_from_the_device() -> None:
    ebc = _fused(refresh=3)
    # The first forward reads nothing either: reset_cache leaves the mirror current.
    with ScalarReads(_step_buffers(ebc)) as reads:
        log = _train_logging_refreshes(ebc, range(8))
    assert reads.count == 0
    # Refreshes at the start of every third forward, as when the step was read from the buffer.
    assert log == [(3, "a"), (3, "c"), (6, "a"), (6, "c")]
    for table in ebc.embedding_bags.values():
        if table.cache_rows > 0:
            assert hot_cache.host_step(table) == int(table.cache_step) == 8
    # A write behind the mirror's back (any in-place write bumps the buffer's version) is read
    # once, at the next forward, and the schedule follows it.
    ebc.embedding_bags["a"].cache_step.fill_(5)
    with ScalarReads(_step_buffers(ebc)) as reads:
        log = _train_logging_refreshes(ebc, range(8, 10))
    assert reads.count == 1
    assert log == [(6, "a"), (9, "c")]


def test_refresh_schedule_after_loading_a_checkpoint_taken_mid_interval() -> None:
    ebc = _fused(refresh=3)
    _train_logging_refreshes(ebc, range(4))  # step 4: one into the interval
    saved = copy.deepcopy(ebc.state_dict())
    copied = copy.deepcopy(ebc)
    moved = copy.deepcopy(ebc)._apply(torch.Tensor.clone)  # new tensors, as a device move makes
    # A module whose own mirror is current at another step (2) must take the checkpoint's.
    resumed = _fused(refresh=3)
    _train_logging_refreshes(resumed, range(100, 102))
    resumed.load_state_dict(saved)
    logs, reads = [], []
    for m in (ebc, resumed, copied, moved):
        with ScalarReads(_step_buffers(m)) as counted:
            logs.append(_train_logging_refreshes(m, range(4, 11)))
        reads.append(counted.count)
    assert logs[0] == [(6, "a"), (6, "c"), (9, "a"), (9, "c")]
    assert all(log == logs[0] for log in logs[1:])
    # Each table's step is read once where the buffer was written (the load) or replaced.
    assert reads[0] == 0 and reads[1] == 2 and reads[3] == 2
    state = ebc.state_dict()
    for other in (resumed, copied, moved):
        for k, v in other.state_dict().items():
            assert torch.equal(v, state[k]), k
