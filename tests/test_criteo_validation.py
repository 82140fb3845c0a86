"""Issue 13 item 6: bad Criteo data fails as ``file:line: what`` (TSV) or ``file: row: what``
(``.npy``), never as silent garbage or a raw numpy/gzip error. Tiny files in tmp_path only."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from torchrec_tt.criteo import (
    CriteoArrays,
    CriteoFormatError,
    SyntheticCriteo,
    load_criteo_npys,
    preprocess_criteo_tsv,
    validate_criteo_tsv,
)

GOOD = "0" + "\t1" * 13 + "\t68fd1e64" * 26
SIZES = [100] * 26


def _row(label: str = "0", ints: dict[int, str] | None = None,
         cats: dict[int, str] | None = None) -> str:
    i = ["1"] * 13
    c = ["68fd1e64"] * 26
    for k, v in (ints or {}).items():
        i[k] = v
    for k, v in (cats or {}).items():
        c[k] = v
    return "\t".join([label, *i, *c])


# ------------------------------------------------------------------------------------ TSV lines


@pytest.mark.parametrize(
    ("line", "match"),
    [
        # str.isdigit() accepts "²" and other non-ASCII digits; int() would then fail in TorchRec.
        (_row(ints={0: "²"}), r"bad\.tsv:2: I1 must be an integer \(ASCII digits.*got '²'"),
        (_row(ints={0: "١٢"}), r"bad\.tsv:2: I1 must be an integer.*got '١٢'"),
        (_row(ints={3: "2147483648"}), r"bad\.tsv:2: I4 = 2147483648 is outside int32"),
        (_row(ints={3: "-2147483649"}), r"bad\.tsv:2: I4 = -2147483649 is outside int32"),
        (_row(ints={3: "9" * 5000}), r"bad\.tsv:2: I4 = 9{40} is outside int32"),
        (_row(ints={0: "1_000"}), r"bad\.tsv:2: I1 must be an integer"),
        (_row(ints={0: " 5"}), r"bad\.tsv:2: I1 must be an integer"),
        (_row(cats={2: "123456789"}), r"bad\.tsv:2: C3 must be a hex hash of at most 8 hex digits"),
        (_row(cats={0: "-1f"}), r"bad\.tsv:2: C1 must be a hex hash .* got '-1f'"),
        (_row(cats={0: "0x1f"}), r"bad\.tsv:2: C1 must be a hex hash .* got '0x1f'"),
        (_row(cats={0: "+1f"}), r"bad\.tsv:2: C1 must be a hex hash"),
    ],
)
def test_tsv_bad_value_names_file_line_and_field(tmp_path: Path, line: str, match: str) -> None:
    path = tmp_path / "bad.tsv"
    path.write_text(GOOD + "\n" + line + "\n" + GOOD + "\n", encoding="utf-8")
    with pytest.raises(CriteoFormatError, match=match):
        validate_criteo_tsv(str(path))
    with pytest.raises(CriteoFormatError, match=match):  # the preprocessing path checks first
        preprocess_criteo_tsv(str(path), cache_root=str(tmp_path / "cache"))
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.npy"))


def test_tsv_limits_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "edge.tsv"
    rows = [_row(ints={0: "1000000", 1: "-3"}, cats={0: "ffffffff", 1: "0", 2: "ABCDEF12"}),
            _row(label="1", ints={i: "" for i in range(13)}, cats={i: "" for i in range(26)})]
    path.write_text("\n".join(rows) + "\n")
    assert validate_criteo_tsv(str(path)) == 2


def test_tsv_range_that_would_wrap_torchrec_int32_shift(tmp_path: Path) -> None:
    # Each value fits int32, but TorchRec computes x - min + 2 in int32 over the whole file.
    path = tmp_path / "wide.tsv"
    path.write_text(_row(ints={0: "2147483000"}) + "\n" + _row(ints={5: "-2000000"}) + "\n")
    with pytest.raises(CriteoFormatError,
                       match=r"wide\.tsv:1: integer feature 2147483000 \(and -2000000 at line 2\)"):
        validate_criteo_tsv(str(path))


def test_tsv_not_utf8_names_line(tmp_path: Path) -> None:
    path = tmp_path / "latin.tsv"
    path.write_bytes((GOOD + "\n" + GOOD + "\n").encode() + b"0\t\xff" + b"\t" * 38 + b"\n")
    with pytest.raises(CriteoFormatError, match=r"latin\.tsv:3: not UTF-8 text"):
        validate_criteo_tsv(str(path))


# ------------------------------------------------------------------------------------ gzip files


def test_truncated_gz_fails_as_truncated(tmp_path: Path) -> None:
    path = tmp_path / "rows.tsv.gz"
    SyntheticCriteo(scale=0.001, seed=0).write_tsv(str(path), rows=500)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CriteoFormatError,
                       match=r"rows\.tsv\.gz:\d+: the gzip stream ends before its end marker "
                             r"\(truncated file\?\) after \d+ complete lines"):
        validate_criteo_tsv(str(path))
    with pytest.raises(CriteoFormatError, match="truncated"):
        preprocess_criteo_tsv(str(path), cache_root=str(tmp_path / "cache"))


def test_gz_without_end_marker_only_fails_as_truncated(tmp_path: Path) -> None:
    # Cut inside the deflate stream just before the trailer: every row but the end is there.
    path = tmp_path / "cut.gz"
    path.write_bytes(gzip.compress(("\n".join([GOOD] * 3) + "\n").encode())[:-9])
    with pytest.raises(CriteoFormatError, match=r"cut\.gz:\d+: the gzip stream ends"):
        validate_criteo_tsv(str(path))


def test_plain_text_named_gz(tmp_path: Path) -> None:
    path = tmp_path / "plain.tsv.gz"
    path.write_text(GOOD + "\n")
    with pytest.raises(CriteoFormatError,
                       match=r"plain\.tsv\.gz:1: not a gzip file \(starts with b'0\\t'.*ends in \.gz"):
        validate_criteo_tsv(str(path))


def test_gzip_content_without_gz_name(tmp_path: Path) -> None:
    path = tmp_path / "rows.tsv"
    path.write_bytes(gzip.compress((GOOD + "\n").encode()))
    with pytest.raises(CriteoFormatError, match=r"rows\.tsv:1: gzip-compressed but its name"):
        validate_criteo_tsv(str(path))


def test_corrupt_gz_body(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.gz"
    data = bytearray(gzip.compress(("\n".join([GOOD] * 50) + "\n").encode()))
    data[12:40] = b"\xff" * 28  # garbage inside the deflate stream
    path.write_bytes(bytes(data))
    with pytest.raises(CriteoFormatError, match=r"corrupt\.gz:\d+: (corrupt gzip data|the gzip)"):
        validate_criteo_tsv(str(path))


# ------------------------------------------------------------------------------------ .npy folder


def _write_npys(folder: Path, n: int = 20, **override: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {
        "dense": rng.random((n, 13), dtype=np.float32),
        "sparse": rng.integers(0, 1000, size=(n, 26), dtype=np.int64),
        "labels": rng.integers(0, 2, size=(n, 1), dtype=np.int32),
    }
    arrays.update(override)
    for k, a in arrays.items():
        np.save(folder / f"{k}.npy", a)
    return folder


def test_npy_good_folder_loads_and_hashes(tmp_path: Path) -> None:
    folder = _write_npys(tmp_path / "d")
    arrays = load_criteo_npys(str(folder), SIZES)
    assert len(arrays) == 20 and arrays.labels.shape == (20,)
    assert (arrays.sparse < 100).all() and arrays.dense.dtype == np.float32
    with pytest.raises(CriteoFormatError, match=r"sparse\.npy: row 0, column \d+ \(C\d+\): id \d+ "
                                                r"is not below the table size 100"):
        load_criteo_npys(str(folder), SIZES, hash_ids=False)
    assert len(load_criteo_npys(str(folder), [1000] * 26, hash_ids=False)) == 20


def test_npy_labels_must_be_0_or_1(tmp_path: Path) -> None:
    labels = np.zeros((20, 1), dtype=np.int32)
    labels[7] = 5
    labels[9] = 5
    folder = _write_npys(tmp_path / "d", labels=labels)
    with pytest.raises(CriteoFormatError,
                       match=r"labels\.npy: row 7: label must be 0 or 1, got 5 \(2 bad labels\)"):
        load_criteo_npys(str(folder), SIZES)
    nan_labels = np.zeros(20, dtype=np.float32)
    nan_labels[3] = np.nan
    folder = _write_npys(tmp_path / "f", labels=nan_labels)
    with pytest.raises(CriteoFormatError, match=r"labels\.npy: row 3: label must be 0 or 1, got nan"):
        load_criteo_npys(str(folder), SIZES)


@pytest.mark.parametrize("short", ["dense", "sparse", "labels"])
def test_npy_row_counts_must_agree(tmp_path: Path, short: str) -> None:
    full = _write_npys(tmp_path / "full")
    arr = np.load(full / f"{short}.npy")
    folder = _write_npys(tmp_path / "d", **{short: arr[:15]})
    with pytest.raises(CriteoFormatError, match="row counts of the Criteo files disagree") as e:
        load_criteo_npys(str(folder), SIZES)
    msg = str(e.value)
    for k in ("dense", "sparse", "labels"):
        assert f"{k}.npy: {15 if k == short else 20}" in msg


def test_npy_dense_must_be_finite(tmp_path: Path) -> None:
    dense = np.ones((20, 13), dtype=np.float32)
    dense[4, 2] = np.nan
    folder = _write_npys(tmp_path / "d", dense=dense)
    with pytest.raises(CriteoFormatError,
                       match=r"dense\.npy: row 4, column 2 \(I3\): dense value nan is not finite"):
        load_criteo_npys(str(folder), SIZES)
    big = np.ones((20, 13), dtype=np.float64)
    big[1, 0] = 1e300  # finite as float64, inf once cast to float32
    folder = _write_npys(tmp_path / "b", dense=big)
    with pytest.raises(CriteoFormatError, match=r"row 1, column 0 \(I1\).*as float32: inf"):
        load_criteo_npys(str(folder), SIZES)


@pytest.mark.parametrize(
    ("name", "array", "match"),
    [
        ("dense", np.ones((20, 12), np.float32), r"dense\.npy: expected shape \(rows, 13\).*\(20, 12\)"),
        ("dense", np.ones(20, np.float32), r"dense\.npy: expected shape \(rows, 13\).*\(20,\)"),
        ("dense", np.ones((20, 13), np.int32), r"dense\.npy: expected floating dense.*int32"),
        ("sparse", np.ones((20, 13), np.int64), r"sparse\.npy: expected shape \(rows, 26\).*\(20, 13\)"),
        ("sparse", np.ones((20, 26), np.float32), r"sparse\.npy: expected integer ids, got dtype float32"),
        ("labels", np.ones((20, 2), np.int32), r"labels\.npy: expected shape \(rows,\) or \(rows, 1\)"),
        ("labels", np.array(["1"] * 20), r"labels\.npy: expected integer, bool or float labels"),
    ],
)
def test_npy_wrong_shape_or_dtype_names_file(tmp_path: Path, name: str, array: np.ndarray,
                                             match: str) -> None:
    folder = _write_npys(tmp_path / "d", **{name: array})
    with pytest.raises(CriteoFormatError, match=match):
        load_criteo_npys(str(folder), SIZES)


def test_npy_negative_ids_and_unreadable_files(tmp_path: Path) -> None:
    sparse = np.zeros((20, 26), dtype=np.int64)
    sparse[6, 25] = -3  # would otherwise hash silently to 97
    folder = _write_npys(tmp_path / "d", sparse=sparse)
    with pytest.raises(CriteoFormatError, match=r"sparse\.npy: row 6, column 25 \(C26\): negative id -3"):
        load_criteo_npys(str(folder), SIZES)
    folder = _write_npys(tmp_path / "e")
    (folder / "dense.npy").write_text("not numpy")
    with pytest.raises(CriteoFormatError, match=r"dense\.npy: not a readable \.npy array"):
        load_criteo_npys(str(folder), SIZES)
    np.save(folder / "dense.npy", np.array([{"a": 1}] * 20, dtype=object))
    with pytest.raises(CriteoFormatError, match=r"dense\.npy: not a readable \.npy array"):
        load_criteo_npys(str(folder), SIZES)
    folder = _write_npys(tmp_path / "z", n=0)
    with pytest.raises(CriteoFormatError, match="have no rows"):
        load_criteo_npys(str(folder), SIZES)
    with pytest.raises(ValueError, match=r"table sizes must be integers >= 1.*\(3, 0\)"):
        load_criteo_npys(str(_write_npys(tmp_path / "g")), [100] * 3 + [0] + [100] * 22)


def test_criteo_arrays_rejects_mismatched_rows() -> None:
    with pytest.raises(ValueError, match="row counts disagree"):
        CriteoArrays(np.zeros((4, 13), np.float32), np.zeros((3, 26), np.int64), np.zeros(4))
    with pytest.raises(ValueError, match=r"dense must be \[rows, 13\]"):
        CriteoArrays(np.zeros((4, 12), np.float32), np.zeros((4, 26), np.int64), np.zeros(4))
