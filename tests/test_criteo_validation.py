"""Issue 13 item 6: bad Criteo data fails as ``file:line: what`` (TSV) or ``file: row: what``
(``.npy``), never as silent garbage or a raw numpy/gzip error. Tiny files in tmp_path only."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from torchrec_tt.criteo import (
    CriteoFormatError,
    SyntheticCriteo,
    preprocess_criteo_tsv,
    validate_criteo_tsv,
)

GOOD = "0" + "\t1" * 13 + "\t68fd1e64" * 26


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
