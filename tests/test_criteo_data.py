"""Criteo-format data: the synthetic generator, TSV validation, TorchRec .npy preprocessing."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import binary_auroc

from torchrec_tt.criteo import (
    KAGGLE_CARDINALITIES,
    CriteoFormatError,
    SyntheticCriteo,
    load_criteo_npys,
    preprocess_criteo_tsv,
    validate_criteo_tsv,
)

REAL_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "criteo_kaggle_sample.tsv.gz"


def test_synthetic_shapes_cardinalities_and_determinism() -> None:
    gen = SyntheticCriteo(scale=0.01, seed=3)
    assert len(gen.cardinalities) == 26
    assert gen.cardinalities[2] == round(KAGGLE_CARDINALITIES[2] * 0.01)
    assert min(gen.cardinalities) >= 2
    dense, sparse, labels, p = gen.sample(2000, stream=0, index=5)
    assert dense.shape == (2000, 13) and sparse.shape == (2000, 26) and labels.shape == (2000,)
    assert (dense >= 0).all() and (sparse >= 0).all()
    assert (sparse < np.asarray(gen.cardinalities)).all()
    again = gen.sample(2000, stream=0, index=5)
    assert all(np.array_equal(a, b) for a, b in zip((dense, sparse, labels, p), again))
    other = gen.sample(2000, stream=0, index=6)
    assert not np.array_equal(sparse, other[1])
    batch = gen.batch(64, 1, 0)
    assert batch.dense_features.shape == (64, 13) and batch.labels.shape == (64,)
    assert batch.sparse_features.keys() == [f"cat_{i}" for i in range(26)]
    assert batch.sparse_features.values().numel() == 64 * 26


def test_synthetic_ids_are_zipf_and_labels_carry_signal() -> None:
    gen = SyntheticCriteo(scale=1.0, seed=0)
    _, sparse, labels, p = gen.sample(20000, stream=1, index=0)
    # Zipf: in the 10M-row table a few hundred ids carry about half of the lookups.
    _, counts = np.unique(sparse[:, 2], return_counts=True)
    top = np.sort(counts)[::-1]
    assert top[:500].sum() > 0.4 * len(sparse)
    assert 0.2 < labels.mean() < 0.3  # positive rate near the configured 25 %
    oracle = binary_auroc(torch.from_numpy(p), torch.from_numpy(labels)).item()
    assert 0.8 < oracle < 0.95  # the hidden model separates clicks, but not perfectly


def _tsv_lines(path: str) -> list[str]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:  # type: ignore[operator]
        return f.read().splitlines()


def test_write_validate_preprocess_round_trip(tmp_path: Path) -> None:
    gen = SyntheticCriteo(scale=0.001, seed=1)
    path = str(tmp_path / "rows.tsv.gz")
    gen.write_tsv(path, rows=300)
    assert validate_criteo_tsv(path) == 300
    folder = preprocess_criteo_tsv(path, cache_root=str(tmp_path / "cache"))
    assert preprocess_criteo_tsv(path, cache_root=str(tmp_path / "cache")) == folder  # cached
    arrays = load_criteo_npys(folder, gen.cardinalities)
    dense, sparse, labels, _ = gen.sample(300, 0, 0)
    np.testing.assert_array_equal(arrays.sparse, sparse)  # hex ids read back (mod table size)
    np.testing.assert_array_equal(arrays.labels, labels)
    # TorchRec's transform: log(x - min + 2) over the file.
    np.testing.assert_allclose(arrays.dense, np.log(dense - dense.min() + 2), rtol=1e-5)
    train, test = arrays.split(0.2, seed=4)
    train2, test2 = arrays.split(0.2, seed=4)
    assert len(test) == 60 and len(train) == 240
    np.testing.assert_array_equal(test.labels, test2.labels)
    batches = train.batches(32, rank=1, world_size=2, start=0)
    first = next(batches)
    np.testing.assert_array_equal(first.labels.numpy(), train.labels[32:64])  # global batch 1
    resumed = next(train.batches(32, rank=1, world_size=2, start=1))
    np.testing.assert_array_equal(next(batches).labels.numpy(), resumed.labels.numpy())
    seen = sum(len(b.labels) for r in range(2) for b in test.eval_batches(16, r, 2))
    assert seen == len(test)


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("1\t2\t3", r"bad\.tsv:2: expected 40 tab-separated fields .* got 3"),
        ("2" + "\t" * 39, r"bad\.tsv:2: label must be 0 or 1, got '2'"),
        ("0\tx" + "\t" * 38, r"bad\.tsv:2: I1 must be an integer \(ASCII digits, optional '-'\) or empty, got 'x'"),
        ("0" + "\t" * 14 + "zz" + "\t" * 25, r"bad\.tsv:2: C1 must be a hex hash of at most 8 hex digits .* or empty, got 'zz'"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path: Path, line: str, match: str) -> None:
    good = "0" + "\t1" * 13 + "\t68fd1e64" * 26
    path = tmp_path / "bad.tsv"
    path.write_text(good + "\n" + line + "\n" + good + "\n")
    with pytest.raises(CriteoFormatError, match=match):
        validate_criteo_tsv(str(path))
    with pytest.raises(CriteoFormatError, match=match):
        preprocess_criteo_tsv(str(path), cache_root=str(tmp_path / "cache"))


def test_missing_path_is_named(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.tsv")
    with pytest.raises(FileNotFoundError, match="nope.tsv' does not exist"):
        validate_criteo_tsv(missing)


@pytest.mark.skipif(not REAL_SAMPLE.exists(),
                    reason=f"real Criteo sample not found at {REAL_SAMPLE} (shared/data)")
def test_real_kaggle_sample_validates_and_preprocesses(tmp_path: Path) -> None:
    assert validate_criteo_tsv(str(REAL_SAMPLE)) == 19353
    folder = preprocess_criteo_tsv(str(REAL_SAMPLE), cache_root=str(tmp_path))
    assert not folder.startswith(str(Path(__file__).resolve().parents[1]))  # not in the repo
    arrays = load_criteo_npys(folder, KAGGLE_CARDINALITIES)
    assert len(arrays) == 19353
    assert int(arrays.labels.sum()) == 4611  # the positives the data README lists
    assert (arrays.sparse < np.asarray(KAGGLE_CARDINALITIES)).all()
    assert np.isfinite(arrays.dense).all()
    assert os.path.exists(os.path.join(folder, "dense.npy"))
