"""TorchRec's in-memory binary Criteo layout: the TSV -> day_<i>_*.npy converter and
TorchRec's InMemoryBinaryCriteoIterDataPipe over it give the rows of the --data TSV path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from torchrec_tt import criteo

ROWS, DAYS, BATCH = 600, 3, 50
CARDS = [min(c, 5000) for c in criteo.KAGGLE_CARDINALITIES]


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, str]], criteo.CriteoArrays]:
    """(day paths, every row as the TSV path reads it, in file order)."""
    tmp = tmp_path_factory.mktemp("binary")
    tsv = tmp / "rows.tsv.gz"
    criteo.SyntheticCriteo(scale=0.001, seed=3).write_tsv(str(tsv), rows=ROWS)
    days = criteo.tsv_to_binary_criteo(str(tsv), str(tmp / "bin"), DAYS, str(tmp / "cache"))
    rows = criteo.load_criteo_npys(criteo.preprocess_criteo_tsv(str(tsv), str(tmp / "cache")), CARDS)
    return days, rows


def _rows(batches: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # type: ignore[type-arg]
    dense = torch.cat([b.dense_features for b in batches]).numpy()
    sparse = torch.cat([b.sparse_features.values().view(26, -1).T for b in batches]).numpy()
    labels = torch.cat([b.labels for b in batches]).numpy()
    return dense, sparse, labels


def _expect(rows: criteo.CriteoArrays, lo: int, hi: int) -> tuple[np.ndarray, ...]:
    return rows.dense[lo:hi], rows.sparse[lo:hi], rows.labels[lo:hi]


def _assert_rows(got: tuple[np.ndarray, ...], want: tuple[np.ndarray, ...]) -> None:
    for g, w, what in zip(got, want, ("dense", "sparse", "labels")):
        np.testing.assert_array_equal(g, w.astype(g.dtype), err_msg=what)


def test_days_hold_the_tsv_rows_in_order(converted) -> None:  # type: ignore[no-untyped-def]
    days, rows = converted
    assert [sorted(d) for d in days] == [["dense", "labels", "sparse"]] * DAYS
    sizes = [len(np.load(d["labels"])) for d in days]
    assert sizes == [200, 200, 200]
    assert criteo.binary_criteo_day_paths(str(Path(days[0]["dense"]).parent)) == days


@pytest.mark.parametrize("mmap_mode", [False, True])
def test_pipe_batches_are_the_tsv_rows(converted, mmap_mode: bool) -> None:  # type: ignore[no-untyped-def]
    days, rows = converted
    train = list(criteo.binary_criteo_pipe(days, "train", BATCH, 0, 1, CARDS, mmap_mode=mmap_mode))
    assert len(train) == 400 // BATCH and all(len(b.labels) == BATCH for b in train)
    _assert_rows(_rows(train), _expect(rows, 0, 400))  # every day but the last, in order
    val = list(criteo.binary_criteo_pipe(days, "val", 64, 0, 1, CARDS, mmap_mode=mmap_mode))
    test = list(criteo.binary_criteo_pipe(days, "test", 64, 0, 1, CARDS, mmap_mode=mmap_mode))
    _assert_rows(_rows(val), _expect(rows, 400, 500))  # the last day's halves
    _assert_rows(_rows(test), _expect(rows, 500, 600))


def test_pipe_shards_batches_round_robin_over_ranks(converted) -> None:  # type: ignore[no-untyped-def]
    days, rows = converted
    per_rank = [list(criteo.binary_criteo_pipe(days, "train", BATCH, r, 2, CARDS)) for r in (0, 1)]
    assert [len(p) for p in per_rank] == [4, 4]
    interleaved = [b for pair in zip(*per_rank) for b in pair]  # global batch g on rank g % 2
    _assert_rows(_rows(interleaved), _expect(rows, 0, 400))


def test_shuffle_batches_permutes_rows_inside_each_batch(converted) -> None:  # type: ignore[no-untyped-def]
    days, rows = converted
    plain = list(criteo.binary_criteo_pipe(days, "train", BATCH, 0, 1, CARDS))
    shuffled = list(criteo.binary_criteo_pipe(days, "train", BATCH, 0, 1, CARDS,
                                              shuffle_batches=True, seed=1))
    moved = 0
    for a, b in zip(plain, shuffled):
        ra, rb = (np.concatenate([x.astype(np.float64) for x in (d, s, lab[:, None])], axis=1)
                  for d, s, lab in (_rows([a]), _rows([b])))
        moved += int((ra != rb).any())
        # The same rows, as sets (the order inside a batch is what --shuffle_batches changes).
        np.testing.assert_array_equal(np.unique(ra, axis=0), np.unique(rb, axis=0))
    assert moved == len(plain)


def test_bad_layouts_are_named(tmp_path: Path, converted) -> None:  # type: ignore[no-untyped-def]
    days, _ = converted
    with pytest.raises(ValueError, match="at least 2 days"):
        criteo.binary_criteo_day_paths(str(tmp_path))
    broken = tmp_path / "broken"
    broken.mkdir()
    for day in days:
        for kind, path in day.items():
            if not (kind == "sparse" and path.endswith("day_1_sparse.npy")):
                (broken / Path(path).name).write_bytes(Path(path).read_bytes())
    with pytest.raises(ValueError, match="day_1_sparse.npy"):
        criteo.binary_criteo_day_paths(str(broken))
    with pytest.raises(ValueError, match="days must be an int >= 2"):
        criteo.tsv_to_binary_criteo("unused.tsv", str(tmp_path / "x"), days=1)
