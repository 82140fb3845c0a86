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


# ------------------------------------------------------------------------------ criteo_kaggle


@pytest.fixture(scope="module")
def kaggle(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, str]], criteo.CriteoArrays]:
    """(the train_*.npy triple, every row as the TSV path reads it, in file order); an odd row
    count, so the halves differ by one."""
    tmp = tmp_path_factory.mktemp("kaggle")
    tsv = tmp / "train.txt.gz"
    criteo.SyntheticCriteo(scale=0.001, seed=4).write_tsv(str(tsv), rows=ROWS + 1)
    files = criteo.tsv_to_binary_criteo(str(tsv), str(tmp / "bin"), cache_root=str(tmp / "cache"),
                                        dataset_name="criteo_kaggle")
    rows = criteo.load_criteo_npys(criteo.preprocess_criteo_tsv(str(tsv), str(tmp / "cache")), CARDS)
    return files, rows


def test_kaggle_layout_is_npy_preproc_criteos(kaggle) -> None:  # type: ignore[no-untyped-def]
    files, rows = kaggle
    folder = Path(files[0]["dense"]).parent
    # TorchRec's npy_preproc_criteo --dataset_name criteo_kaggle names: <split>_<kind>.npy
    assert sorted(p.name for p in folder.iterdir()) == [
        "train_dense.npy", "train_labels.npy", "train_sparse.npy"]
    assert criteo.binary_criteo_paths(str(folder), "criteo_kaggle") == files
    labels = np.load(files[0]["labels"])
    assert labels.shape == (ROWS + 1, 1) and labels.dtype == np.int32  # as tsv_to_npys writes


@pytest.mark.parametrize("mmap_mode", [False, True])
def test_kaggle_stages_are_dlrm_mains(kaggle, mmap_mode: bool) -> None:  # type: ignore[no-untyped-def]
    """dlrm_main.py, criteo_kaggle: train on the whole train file; "val" and "test" are both the
    pipe's "test" stage of that file, its second half (rows ceil(n/2)..n-1)."""
    files, rows = kaggle
    kw = dict(mmap_mode=mmap_mode, dataset_name="criteo_kaggle")
    train = list(criteo.binary_criteo_pipe(files, "train", BATCH, 0, 1, CARDS, drop_last=False,
                                           **kw))
    assert [len(b.labels) for b in train] == [BATCH] * 12 + [1]
    _assert_rows(_rows(train), _expect(rows, 0, ROWS + 1))
    for stage in ("val", "test"):
        got = list(criteo.binary_criteo_pipe(files, stage, 64, 0, 1, CARDS, **kw))
        _assert_rows(_rows(got), _expect(rows, ROWS // 2 + 1, ROWS + 1))
    per_rank = [list(criteo.binary_criteo_pipe(files, "train", BATCH, r, 2, CARDS, **kw))
                for r in (0, 1)]
    interleaved = [b for pair in zip(*per_rank) for b in pair]
    _assert_rows(_rows(interleaved), _expect(rows, 0, ROWS))  # full batches only (drop_last)


def test_bad_kaggle_layouts_are_named(tmp_path: Path, kaggle, converted) -> None:  # type: ignore[no-untyped-def]
    files, _ = kaggle
    with pytest.raises(ValueError, match=r"missing \[.*train_dense.npy"):
        criteo.binary_criteo_paths(str(tmp_path), "criteo_kaggle")
    with pytest.raises(ValueError, match="is not a folder"):
        criteo.binary_criteo_paths(str(tmp_path / "nowhere"), "criteo_kaggle")
    broken = tmp_path / "broken"
    broken.mkdir()
    for kind in ("dense", "labels"):
        (broken / f"train_{kind}.npy").write_bytes(Path(files[0][kind]).read_bytes())
    with pytest.raises(ValueError, match=r"missing \[.*train_sparse.npy'\]"):
        criteo.binary_criteo_paths(str(broken), "criteo_kaggle")
    # the other layout's folder: the error says which --dataset_name it is
    days_folder = str(Path(converted[0][0]["dense"]).parent)
    with pytest.raises(ValueError, match="Criteo 1TB layout: --dataset_name criteo_1t"):
        criteo.binary_criteo_paths(days_folder, "criteo_kaggle")
    with pytest.raises(ValueError, match="Kaggle layout: --dataset_name criteo_kaggle"):
        criteo.binary_criteo_paths(str(Path(files[0]["dense"]).parent), "criteo_1t")
    with pytest.raises(ValueError, match="dataset_name must be one of"):
        criteo.binary_criteo_paths(days_folder, "criteo_1tb")
    with pytest.raises(ValueError, match="one file triple"):
        criteo.binary_criteo_pipe(converted[0], "train", BATCH, 0, 1, CARDS,
                                  dataset_name="criteo_kaggle")
    with pytest.raises(ValueError, match="has no days"):
        criteo.tsv_to_binary_criteo("unused.tsv", str(tmp_path / "x"), days=3,
                                    dataset_name="criteo_kaggle")


@pytest.mark.parametrize("argv, message", [
    (["x.tsv", "--in-memory-binary", "out", "--dataset-name", "criteo_kaggle", "--days", "3"],
     "--days: the criteo_kaggle layout has no days"),
    (["x.tsv", "--dataset-name", "criteo_kaggle"], "apply to --in-memory-binary"),
    (["x.tsv", "--in-memory-binary", "out", "--dataset-name", "kaggle"], "invalid choice"),
])
def test_converter_flags_are_checked(argv: list[str], message: str,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        criteo._main(argv)
    assert message in capsys.readouterr().err
