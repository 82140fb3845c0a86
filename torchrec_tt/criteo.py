"""Criteo-format click data for the DLRM trainer: a synthetic generator and real TSV files.

* :class:`SyntheticCriteo`: rows in the Criteo Kaggle layout (13 count features, 26 categorical
  features) with the Kaggle table cardinalities times ``scale``, Zipf-distributed ids scattered
  over each table (as hashing does) and labels drawn from a hidden model (per-id latent vectors,
  pairwise interactions between features, a dense part), so AUC measures how much of the planted
  signal a model recovers. Deterministic: batch ``i`` of a stream depends only on
  ``(seed, stream, i)``, so a resumed run sees the same data.
* Real files: :func:`validate_criteo_tsv` checks the Kaggle/Terabyte TSV layout and names the file
  and line of the first bad row; :func:`preprocess_criteo_tsv` converts a TSV (or ``.tsv.gz``)
  into TorchRec's ``.npy`` triple with ``torchrec.datasets.criteo.BinaryCriteoUtils.tsv_to_npys``;
  :func:`load_criteo_npys` reads the triple back, hashing ids into the tables (``id % rows``).
* TorchRec's in-memory binary layouts (dlrm_main.py's ``--dataset_name``): the Criteo 1TB days
  ``day_<i>_{dense,sparse,labels}.npy`` or the Criteo Kaggle ``train_{dense,sparse,labels}.npy``
  (:func:`binary_criteo_paths`), written from a TSV by :func:`tsv_to_binary_criteo` and read by
  TorchRec's ``InMemoryBinaryCriteoIterDataPipe`` as dlrm_main.py splits them
  (:func:`binary_criteo_pipe`).
* :class:`CriteoArrays`: in-memory rows, a seeded train/test split and TorchRec ``Batch`` es.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import shutil
import tempfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torchrec.datasets.criteo import (
    InMemoryBinaryCriteoIterDataPipe,
    CAT_FEATURE_COUNT,
    DEFAULT_CAT_NAMES,
    INT_FEATURE_COUNT,
    BinaryCriteoUtils,
)
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

__all__ = [
    "BINARY_DATASET_NAMES",
    "CAT_FEATURE_COUNT",
    "INT_FEATURE_COUNT",
    "KAGGLE_CARDINALITIES",
    "CriteoArrays",
    "CriteoFormatError",
    "SyntheticCriteo",
    "binary_criteo_day_paths",
    "binary_criteo_paths",
    "binary_criteo_pipe",
    "load_criteo_npys",
    "make_batch",
    "preprocess_criteo_tsv",
    "tsv_to_binary_criteo",
    "validate_criteo_tsv",
]

#: Rows of the 26 categorical tables of Criteo Kaggle (distinct values of C1..C26 in train.txt),
#: the sizes the DLRM reference uses for Kaggle.
KAGGLE_CARDINALITIES: tuple[int, ...] = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
)  # fmt: skip

NUM_FIELDS = 1 + INT_FEATURE_COUNT + CAT_FEATURE_COUNT


class CriteoFormatError(ValueError):
    """Criteo data that does not follow the format: the message names the file and the line (TSV)
    or row (``.npy``) and what is wrong."""


INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
#: An integer feature: ASCII digits with an optional minus (``str.isdigit`` also takes "²", "١").
_INT_RE = re.compile(r"-?[0-9]+")
#: A categorical hash: 1 to 8 ASCII hex digits (32 bits), no sign, prefix, "_" or spaces (all of
#: which ``int(v, 16)`` would take).
_HEX_RE = re.compile(r"[0-9a-fA-F]{1,8}")
_GZIP_MAGIC = b"\x1f\x8b"


def make_batch(dense: np.ndarray, sparse: np.ndarray, labels: np.ndarray) -> Batch:
    """A TorchRec ``Batch``: ``dense [B, 13]`` float32, ``sparse [B, 26]`` ids (one per feature,
    keys ``cat_0 .. cat_25``), ``labels [B]``."""
    b = dense.shape[0]
    values = torch.from_numpy(np.ascontiguousarray(sparse.T).reshape(-1).astype(np.int64))
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=list(DEFAULT_CAT_NAMES),
        values=values,
        lengths=torch.ones(CAT_FEATURE_COUNT * b, dtype=torch.int32),
    )
    return Batch(
        dense_features=torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32)),
        sparse_features=kjt,
        labels=torch.from_numpy(np.ascontiguousarray(labels, dtype=np.float32).reshape(-1)),
    )


# ---------------------------------------------------------------------------- synthetic data

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: a bijective 64-bit mixer (uint64 arithmetic wraps)."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _hash_normal(ids: np.ndarray, salt: int, dims: int) -> np.ndarray:
    """Pseudo-random standard normals ``[len(ids), dims]``, a fixed function of ``(salt, id)``."""
    base = _splitmix64(ids.astype(np.uint64) ^ _splitmix64(np.array([salt], dtype=np.uint64)))
    out = np.empty((ids.shape[0], dims), dtype=np.float64)
    for j in range(dims):
        h1 = _splitmix64(base + np.uint64(2 * j + 1))
        h2 = _splitmix64(base + np.uint64(2 * j + 2))
        u1 = ((h1 >> np.uint64(11)).astype(np.float64) + 0.5) / 2.0**53
        u2 = (h2 >> np.uint64(11)).astype(np.float64) / 2.0**53
        out[:, j] = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
    return out


@dataclass
class SyntheticCriteo:
    """Synthetic Criteo Kaggle-format rows with a planted signal.

    Ids: feature ``t`` draws a popularity rank ``r`` from a Zipf law with exponent
    ``zipf_exponent`` truncated to the table's rows, and maps it to the id
    ``(a_t * r + b_t) mod N_t`` (a bijection; popular ids end up scattered as hashed ids are).

    Labels: ``P(click) = sigmoid(logit)`` with ``logit = bias + w . dense_std +
    sum_t s_t <z_t(id_t), u_t> + sum_{(t, t') in pairs} c <z_t(id_t), z_t'(id_t')> / sqrt(k)``,
    where ``z_t(id)`` is a ``latent_dim``-vector fixed by hashing ``(seed, t, id)``. Frequent ids
    can be learned; the long tail is noise for any model. ``bias`` is set for ``positive_rate``.

    Args:
        scale: table sizes are ``round(KAGGLE_CARDINALITIES * scale)`` (at least 2 rows).
        num_embeddings: the 26 table sizes instead (``scale`` is then not used).
        seed: fixes the hidden model, the id maps and every stream.
        zipf_exponent: id popularity exponent.
        latent_dim: ``k``, size of the hidden per-id vectors.
        id_weight: scale of the per-feature terms ``s_t``.
        interaction_weight: ``c``; ``num_pairs`` random feature pairs interact.
        dense_weight: scale of ``w``.
        positive_rate: target share of clicks.
    """

    scale: float = 1.0
    seed: int = 0
    zipf_exponent: float = 1.1
    latent_dim: int = 4
    id_weight: float = 0.6
    interaction_weight: float = 0.5
    num_pairs: int = 12
    dense_weight: float = 0.25
    positive_rate: float = 0.25
    num_embeddings: Sequence[int] | None = None
    cardinalities: list[int] = field(init=False)

    def __post_init__(self) -> None:
        if not self.scale > 0:
            raise ValueError(f"scale must be > 0, got {self.scale}")
        if self.num_embeddings is None:
            self.cardinalities = [max(2, int(round(n * self.scale))) for n in KAGGLE_CARDINALITIES]
        else:
            if len(self.num_embeddings) != CAT_FEATURE_COUNT or min(self.num_embeddings) < 1:
                raise ValueError(f"num_embeddings must be {CAT_FEATURE_COUNT} sizes >= 1, got "
                                 f"{list(self.num_embeddings)}")
            self.cardinalities = [int(n) for n in self.num_embeddings]
        rng = np.random.default_rng([self.seed, 12345])
        self._mult = []
        for n in self.cardinalities:
            a = int(rng.integers(1, n)) if n > 2 else 1
            while np.gcd(a, n) != 1:
                a += 1
            self._mult.append(a)
        self._shift = [int(rng.integers(0, n)) for n in self.cardinalities]
        k = self.latent_dim
        self._u = rng.normal(size=(CAT_FEATURE_COUNT, k)) / np.sqrt(k)
        self._s = self.id_weight * rng.uniform(0.2, 1.5, size=CAT_FEATURE_COUNT)
        pairs = set()
        while len(pairs) < self.num_pairs:
            a, b = sorted(rng.choice(CAT_FEATURE_COUNT, size=2, replace=False).tolist())
            pairs.add((a, b))
        self._pairs = sorted(pairs)
        self._w = self.dense_weight * rng.normal(size=INT_FEATURE_COUNT)
        self._dense_mu = rng.uniform(0.3, 4.0, size=INT_FEATURE_COUNT)
        self._dense_sigma = rng.uniform(0.6, 1.6, size=INT_FEATURE_COUNT)
        self._bias = 0.0
        logits = self._logits(*self._features(np.random.default_rng([self.seed, 999]), 20000))
        lo, hi = -10.0, 10.0
        for _ in range(60):  # bias so that the mean click probability is positive_rate
            mid = (lo + hi) / 2
            if (1 / (1 + np.exp(-(logits + mid)))).mean() < self.positive_rate:
                lo = mid
            else:
                hi = mid
        self._bias = (lo + hi) / 2

    # -- the rows ----------------------------------------------------------------------------

    def _features(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        g = rng.normal(size=(n, INT_FEATURE_COUNT))
        dense = np.floor(np.exp(self._dense_mu + self._dense_sigma * g)).astype(np.int64) - 1
        dense = np.maximum(dense, 0)
        s = self.zipf_exponent
        u = rng.random(size=(n, CAT_FEATURE_COUNT))
        sparse = np.empty((n, CAT_FEATURE_COUNT), dtype=np.int64)
        for t, rows in enumerate(self.cardinalities):
            # Inverse CDF of the continuous power law x^-s on [1, rows + 1).
            top = (rows + 1.0) ** (1 - s)
            rank = np.floor((1 + u[:, t] * (top - 1)) ** (1 / (1 - s))).astype(np.int64) - 1
            rank = np.clip(rank, 0, rows - 1)
            sparse[:, t] = (rank * self._mult[t] + self._shift[t]) % rows
        return dense, sparse

    def _logits(self, dense: np.ndarray, sparse: np.ndarray) -> np.ndarray:
        x = np.log1p(dense.astype(np.float64))
        x = (x - self._dense_mu) / self._dense_sigma  # about standard normal
        logit = self._bias + x @ self._w
        k = self.latent_dim
        z = [_hash_normal(sparse[:, t], self.seed * 1000 + t, k) for t in range(CAT_FEATURE_COUNT)]
        for t in range(CAT_FEATURE_COUNT):
            logit += self._s[t] * (z[t] @ self._u[t])
        for a, b in self._pairs:
            logit += self.interaction_weight * (z[a] * z[b]).sum(1) / np.sqrt(k)
        return logit

    def sample(
        self, n: int, stream: int, index: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Rows ``(dense counts int64 [n, 13], ids int64 [n, 26], labels int64 [n],
        click probabilities [n])`` of block ``index`` of ``stream`` (e.g. 0 train, 1 test)."""
        rng = np.random.default_rng([self.seed, stream, index])
        dense, sparse = self._features(rng, n)
        p = 1 / (1 + np.exp(-self._logits(dense, sparse)))
        labels = (rng.random(n) < p).astype(np.int64)
        return dense, sparse, labels, p

    def batch(self, batch_size: int, stream: int, index: int) -> Batch:
        """Block ``index`` of ``stream`` as a TorchRec ``Batch`` (dense ``log(1 + count)``)."""
        dense, sparse, labels, _ = self.sample(batch_size, stream, index)
        return make_batch(np.log1p(dense).astype(np.float32), sparse, labels)

    def write_tsv(self, path: str, rows: int, stream: int = 0, block: int = 4096) -> None:
        """Writes ``rows`` rows in the Kaggle ``train.txt`` layout (``label, I1..I13, C1..C26`` as
        8-digit hex; ``.gz`` paths are compressed), e.g. to exercise the real-data path."""
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "wt") as f:  # type: ignore[operator]
            done, index = 0, 0
            while done < rows:
                n = min(block, rows - done)
                dense, sparse, labels, _ = self.sample(n, stream, index)
                for i in range(n):
                    f.write(
                        "\t".join(
                            [str(labels[i])]
                            + [str(v) for v in dense[i]]
                            + [f"{v:08x}" for v in sparse[i]]
                        )
                        + "\n"
                    )
                done += n
                index += 1


# ---------------------------------------------------------------------------- real TSV files


def _open_binary(path: str):  # type: ignore[no-untyped-def]
    if not os.path.exists(path):
        raise FileNotFoundError(f"Criteo data file {path!r} does not exist")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path!r} is a directory, expected a Criteo TSV file")
    with open(path, "rb") as f:
        magic = f.read(2)
    if path.endswith(".gz"):
        if magic != _GZIP_MAGIC:
            raise CriteoFormatError(
                f"{path}:1: not a gzip file (starts with {magic!r}, gzip starts with "
                f"{_GZIP_MAGIC!r}) although its name ends in .gz"
            )
        return gzip.open(path, "rb")
    if magic == _GZIP_MAGIC:
        raise CriteoFormatError(
            f"{path}:1: gzip-compressed but its name does not end in .gz (TorchRec's reader would "
            "read the compressed bytes as text); rename it to .gz"
        )
    return open(path, "rb")


def _read_lines(path: str) -> Iterator[tuple[int, str]]:
    """``(line number, text without the line end)``. A line is handed out only once the read
    after it succeeded, so a truncated ``.gz`` fails as truncated, not as a short last row."""
    with _open_binary(path) as f:
        lineno, pending = 0, None
        it = iter(f)
        while True:
            try:
                raw = next(it, None)
            except EOFError:
                raise CriteoFormatError(
                    f"{path}:{lineno + 1}: the gzip stream ends before its end marker (truncated "
                    f"file?) after {lineno} complete lines"
                ) from None
            except (OSError, zlib.error) as e:
                raise CriteoFormatError(f"{path}:{lineno + 1}: corrupt gzip data: {e}") from None
            if pending is not None:
                try:
                    text = pending.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise CriteoFormatError(
                        f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start})"
                    ) from None
                yield lineno, text.rstrip("\n").rstrip("\r")
            if raw is None:
                return
            pending = raw
            lineno += 1


def _check_row(fields: list[str], path: str, lineno: int, has_label: bool) -> list[int]:
    """Checks one row; returns its integer features (empty as 0, as TorchRec reads them)."""
    expected = NUM_FIELDS if has_label else NUM_FIELDS - 1
    if len(fields) != expected:
        raise CriteoFormatError(
            f"{path}:{lineno}: expected {expected} tab-separated fields (label, I1..I13, "
            f"C1..C26), got {len(fields)}"
        )
    start = 0
    if has_label:
        if fields[0] not in ("0", "1"):
            raise CriteoFormatError(f"{path}:{lineno}: label must be 0 or 1, got {fields[0]!r}")
        start = 1
    ints = []
    for j in range(INT_FEATURE_COUNT):
        v = fields[start + j]
        if not v:
            ints.append(0)
            continue
        if not _INT_RE.fullmatch(v):
            raise CriteoFormatError(
                f"{path}:{lineno}: I{j + 1} must be an integer (ASCII digits, optional '-') or "
                f"empty, got {v!r}"
            )
        x = int(v) if len(v) <= 12 else INT32_MAX + 1  # (long strings: out of range anyway)
        if not INT32_MIN <= x <= INT32_MAX:
            raise CriteoFormatError(
                f"{path}:{lineno}: I{j + 1} = {v[:40]} is outside int32 [{INT32_MIN}, "
                f"{INT32_MAX}] (TorchRec stores the integer features as int32)"
            )
        ints.append(x)
    for j in range(CAT_FEATURE_COUNT):
        v = fields[start + INT_FEATURE_COUNT + j]
        if v and not _HEX_RE.fullmatch(v):
            raise CriteoFormatError(
                f"{path}:{lineno}: C{j + 1} must be a hex hash of at most 8 hex digits (32 bits, "
                f"no sign or prefix) or empty, got {v[:40]!r}"
            )
    return ints


def validate_criteo_tsv(path: str, has_label: bool = True) -> int:
    """Checks every line of a Criteo Kaggle/Terabyte TSV (``.gz`` too); returns the row count.

    Per line: 40 tab-separated fields (39 without label); label ``0``/``1``; ``I1..I13`` empty or
    ASCII integers within int32; ``C1..C26`` empty or 1-8 hex digits. Per file: UTF-8 text, a
    ``.gz`` name exactly for gzip content, an untruncated gzip stream, at least one row, and the
    integer features' range small enough for TorchRec's int32 shift ``x - min + 2``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CriteoFormatError: the data is malformed; the message is ``path:line: what is wrong``.
    """
    n = 0
    lo, lo_line, hi, hi_line = 0, 0, 0, 0
    for lineno, line in _read_lines(path):
        ints = _check_row(line.split("\t"), path, lineno, has_label)
        a, b = min(ints), max(ints)
        if n == 0 or a < lo:
            lo, lo_line = a, lineno
        if n == 0 or b > hi:
            hi, hi_line = b, lineno
        n += 1
    if n == 0:
        raise CriteoFormatError(f"{path}: no rows")
    if hi - lo + 2 > INT32_MAX:
        raise CriteoFormatError(
            f"{path}:{hi_line}: integer feature {hi} (and {lo} at line {lo_line}) spans more than "
            f"int32: TorchRec's preprocessing computes x - min + 2 = {hi - lo + 2} in int32, which "
            "would wrap around"
        )
    return n


def _cache_dir_for(path: str, cache_root: str) -> str:
    st = os.stat(path)
    key = f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    name = os.path.basename(path).split(".")[0]
    return os.path.join(cache_root, f"{name}-{digest}")


def default_cache_root() -> str:
    return os.environ.get(
        "TORCHREC_TT_DATA_CACHE",
        os.path.join(os.path.expanduser("~"), ".cache", "torchrec_tt", "criteo"),
    )


def preprocess_criteo_tsv(path: str, cache_root: str | None = None) -> str:
    """Validates a Criteo TSV (plain or ``.gz``) and converts it with TorchRec's
    ``BinaryCriteoUtils.tsv_to_npys`` into ``{dense,sparse,labels}.npy`` (dense already
    ``log``-transformed, as TorchRec does). Returns the folder; a second call reuses it.

    The folder lives under ``cache_root`` (default ``$TORCHREC_TT_DATA_CACHE`` or
    ``~/.cache/torchrec_tt/criteo``), keyed by the file's path, size and mtime.
    """
    validate_criteo_tsv(path)
    out = _cache_dir_for(path, cache_root or default_cache_root())
    names = {k: os.path.join(out, f"{k}.npy") for k in ("dense", "sparse", "labels")}
    if all(os.path.exists(p) for p in names.values()):
        return out
    os.makedirs(out, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        tsv = path
        if path.endswith(".gz"):  # TorchRec's reader takes plain text
            tsv = os.path.join(tmp, "rows.tsv")
            with gzip.open(path, "rb") as src, open(tsv, "wb") as dst:
                shutil.copyfileobj(src, dst)
        parts = {k: os.path.join(tmp, f"{k}.npy") for k in names}
        # "criteo_1tb": the labelled row layout, which Kaggle's train.txt shares. (With
        # "criteo_kaggle", TorchRec treats any path containing "test" as the unlabelled Kaggle
        # test set and shifts every column.)
        BinaryCriteoUtils.tsv_to_npys(
            tsv, parts["dense"], parts["sparse"], parts["labels"], dataset_name="criteo_1tb"
        )
        for k in names:
            os.replace(parts[k], names[k])
    return out


@dataclass
class CriteoArrays:
    """Rows in memory: ``dense [n, 13]`` float32 (transformed), ``sparse [n, 26]`` int64 ids
    already reduced to the table sizes, ``labels [n]``."""

    dense: np.ndarray
    sparse: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        # Shapes only (cheap, also on every take); values are checked by load_criteo_npys.
        if self.dense.ndim != 2 or self.dense.shape[1] != INT_FEATURE_COUNT:
            raise ValueError(f"dense must be [rows, {INT_FEATURE_COUNT}], got {self.dense.shape}")
        if self.sparse.ndim != 2 or self.sparse.shape[1] != CAT_FEATURE_COUNT:
            raise ValueError(f"sparse must be [rows, {CAT_FEATURE_COUNT}], got "
                             f"{self.sparse.shape}")
        if self.labels.ndim != 1:
            raise ValueError(f"labels must be [rows], got {self.labels.shape}")
        n = {"dense": self.dense.shape[0], "sparse": self.sparse.shape[0],
             "labels": self.labels.shape[0]}
        if len(set(n.values())) != 1:
            raise ValueError(f"row counts disagree: {n}")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, index: np.ndarray) -> CriteoArrays:
        return CriteoArrays(self.dense[index], self.sparse[index], self.labels[index])

    def split(self, test_fraction: float, seed: int) -> tuple[CriteoArrays, CriteoArrays]:
        """A random train/test split fixed by ``seed`` (same seed, same split)."""
        if not 0 < test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        perm = np.random.default_rng([seed, 7]).permutation(len(self))
        n_test = max(1, int(round(len(self) * test_fraction)))
        return self.take(np.sort(perm[n_test:])), self.take(np.sort(perm[:n_test]))

    def batches(
        self,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        start: int = 0,
        shuffle_seed: int | None = None,
    ) -> Iterator[Batch]:
        """This rank's batches, forever (epoch after epoch), from local batch ``start`` on.

        Global batch ``g`` is rows ``[g*B, (g+1)*B)`` of the epoch's order (reshuffled per epoch
        with ``shuffle_seed``, kept when None) and goes to rank ``g % world_size``; incomplete
        tails are dropped so every rank gets the same number of batches per epoch.
        """
        per_epoch = len(self) // (batch_size * world_size)
        if per_epoch == 0:
            raise ValueError(
                f"{len(self)} rows cannot fill one batch of {batch_size} on {world_size} ranks"
            )
        local = start
        while True:
            epoch, i = divmod(local, per_epoch)
            order = (
                np.random.default_rng([shuffle_seed, epoch]).permutation(len(self))
                if shuffle_seed is not None
                else None
            )
            g = i * world_size + rank
            rows = np.arange(g * batch_size, (g + 1) * batch_size)
            if order is not None:
                rows = order[rows]
            yield make_batch(self.dense[rows], self.sparse[rows], self.labels[rows])
            local += 1

    def eval_batches(self, batch_size: int, rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
        """Every row once, the rows split into ``world_size`` contiguous parts (one per rank)."""
        bounds = np.linspace(0, len(self), world_size + 1).astype(int)
        lo, hi = bounds[rank], bounds[rank + 1]
        for s in range(lo, hi, batch_size):
            rows = np.arange(s, min(s + batch_size, hi))
            yield make_batch(self.dense[rows], self.sparse[rows], self.labels[rows])


_CHUNK = 1 << 20  # rows per block of the value checks (bounds the temporaries)


def _first_bad(arr: np.ndarray, bad) -> tuple[int, int] | None:  # type: ignore[no-untyped-def]
    """``(row, column)`` of the first entry where ``bad(block)`` is True, checked block by block;
    None if there is none. ``arr`` is 1-D or 2-D."""
    for s in range(0, arr.shape[0], _CHUNK):
        mask = bad(np.asarray(arr[s : s + _CHUNK]))
        if mask.any():
            flat = int(np.argmax(mask.reshape(-1)))
            if mask.ndim == 1:
                return s + flat, 0
            return s + flat // mask.shape[1], flat % mask.shape[1]
    return None


def _load_npy(path: str) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - numpy raises many kinds for a bad file
        raise CriteoFormatError(f"{path}: not a readable .npy array ({type(e).__name__}: {e})") \
            from None


def load_criteo_npys(
    folder: str, num_embeddings: Sequence[int], hash_ids: bool = True,
    paths: Mapping[str, str] | None = None,
) -> CriteoArrays:
    """Reads the ``dense/sparse/labels.npy`` triple that :func:`preprocess_criteo_tsv` (TorchRec's
    layout) wrote; ids become ``id % num_embeddings[t]`` (``hash_ids=False``: ids must already be
    below the table sizes).

    Checks, each failing with :class:`CriteoFormatError` naming the file (and the first bad row,
    column and value): ``labels`` shape ``[n]`` or ``[n, 1]``, integer/bool/float, every value 0
    or 1; ``dense`` shape ``[n, 13]``, floating (TorchRec's log-transformed values), finite also as
    float32; ``sparse`` shape ``[n, 26]``, integer, no negative ids (and, without hashing, below
    the table sizes); the three row counts equal and not zero. ``paths`` names the three files
    (``dense``, ``sparse``, ``labels`` keys) when they are not ``folder/<key>.npy``.
    """
    if paths is None:
        paths = {k: os.path.join(folder, f"{k}.npy") for k in ("dense", "sparse", "labels")}
    missing = [p for p in paths.values() if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"missing preprocessed Criteo files {missing}")
    if len(num_embeddings) != CAT_FEATURE_COUNT:
        raise ValueError(f"need {CAT_FEATURE_COUNT} table sizes, got {len(num_embeddings)}")
    bad_sizes = [(t, n) for t, n in enumerate(num_embeddings)
                 if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1]
    if bad_sizes:
        raise ValueError(f"table sizes must be integers >= 1; got (feature, size) {bad_sizes}")
    sizes = np.asarray(num_embeddings, dtype=np.int64)
    raw = {k: _load_npy(p) for k, p in paths.items()}

    # Shapes and dtypes, before any value is read.
    lab = raw["labels"]
    if not (lab.ndim == 1 or (lab.ndim == 2 and lab.shape[1] == 1)):
        raise CriteoFormatError(f"{paths['labels']}: expected shape (rows,) or (rows, 1), got "
                                f"{lab.shape}")
    if lab.dtype.kind not in "biuf":
        raise CriteoFormatError(f"{paths['labels']}: expected integer, bool or float labels, got "
                                f"dtype {lab.dtype}")
    for k, cols, what in (("dense", INT_FEATURE_COUNT, "I1..I13"),
                          ("sparse", CAT_FEATURE_COUNT, "C1..C26")):
        a = raw[k]
        if a.ndim != 2 or a.shape[1] != cols:
            raise CriteoFormatError(f"{paths[k]}: expected shape (rows, {cols}) ({what}), got "
                                    f"{a.shape}")
    if raw["dense"].dtype.kind != "f":
        raise CriteoFormatError(
            f"{paths['dense']}: expected floating dense features (TorchRec's log-transformed "
            f"float32), got dtype {raw['dense'].dtype}"
        )
    if raw["sparse"].dtype.kind not in "iu":
        raise CriteoFormatError(f"{paths['sparse']}: expected integer ids, got dtype "
                                f"{raw['sparse'].dtype}")
    counts = {k: int(a.shape[0]) for k, a in raw.items()}
    if len(set(counts.values())) != 1:
        raise CriteoFormatError(
            "row counts of the Criteo files disagree (no rows are dropped to make them fit): "
            + ", ".join(f"{paths[k]}: {n}" for k, n in counts.items())
        )
    if counts["labels"] == 0:
        raise CriteoFormatError(f"{folder}: the Criteo files have no rows")

    # Values.
    labels = np.asarray(lab).reshape(-1).astype(np.float32)
    hit = _first_bad(labels, lambda b: (b != 0) & (b != 1))
    if hit is not None:
        r = hit[0]
        n_bad = int(((labels != 0) & (labels != 1)).sum())
        raise CriteoFormatError(f"{paths['labels']}: row {r}: label must be 0 or 1, got "
                                f"{np.asarray(lab).reshape(-1)[r].item()!r} ({n_bad} bad labels)")
    with np.errstate(over="ignore"):  # float64 beyond float32 becomes inf, reported below
        dense = np.asarray(raw["dense"]).astype(np.float32)
    hit = _first_bad(dense, lambda b: ~np.isfinite(b))
    if hit is not None:
        r, c = hit
        raise CriteoFormatError(
            f"{paths['dense']}: row {r}, column {c} (I{c + 1}): dense value "
            f"{raw['dense'][r, c].item()!r} is not finite (as float32: {dense[r, c].item()})"
        )
    sp = raw["sparse"]
    if sp.dtype.kind == "u" and sp.dtype.itemsize >= 8:
        hit = _first_bad(sp, lambda b: b > np.iinfo(np.int64).max)
        if hit is not None:
            r, c = hit
            raise CriteoFormatError(f"{paths['sparse']}: row {r}, column {c} (C{c + 1}): id "
                                    f"{sp[r, c]} does not fit int64")
    sparse = np.asarray(sp).astype(np.int64)
    hit = _first_bad(sparse, lambda b: b < 0)
    if hit is not None:
        r, c = hit
        raise CriteoFormatError(f"{paths['sparse']}: row {r}, column {c} (C{c + 1}): negative id "
                                f"{sparse[r, c]}")
    if hash_ids:
        sparse %= sizes
    else:
        hit = _first_bad(sparse, lambda b: b >= sizes)
        if hit is not None:
            r, c = hit
            raise CriteoFormatError(
                f"{paths['sparse']}: row {r}, column {c} (C{c + 1}): id {sparse[r, c]} is not "
                f"below the table size {int(sizes[c])}"
            )
    return CriteoArrays(dense, sparse, labels)


BINARY_KINDS = ("dense", "sparse", "labels")
#: dlrm_main.py's ``--dataset_name`` values (and default first): the in-memory binary layouts.
BINARY_DATASET_NAMES = ("criteo_1t", "criteo_kaggle")
_DAY_FILE = re.compile(r"day_(\d+)_(?:dense|sparse|labels)\.npy")


def _check_dataset_name(dataset_name: str) -> None:
    if dataset_name not in BINARY_DATASET_NAMES:
        raise ValueError(f"dataset_name must be one of {BINARY_DATASET_NAMES} (dlrm_main.py's "
                         f"--dataset_name), got {dataset_name!r}")


def _kaggle_triple(folder: str) -> dict[str, str]:
    return {k: os.path.join(folder, f"train_{k}.npy") for k in BINARY_KINDS}


def binary_criteo_day_paths(folder: str) -> list[dict[str, str]]:
    """The ``day_<i>_{dense,sparse,labels}.npy`` triples of TorchRec's in-memory binary layout
    (``InMemoryBinaryCriteoIterDataPipe``, dlrm_main.py's ``--in_memory_binary_criteo_path``),
    days in order; ValueError naming the folder when a file is missing or none is there."""
    if not os.path.isdir(folder):
        raise ValueError(f"--in_memory_binary_criteo_path {folder!r} is not a folder")
    days = sorted({int(m.group(1)) for f in os.listdir(folder) if (m := _DAY_FILE.fullmatch(f))})
    if len(days) < 2:
        hint = ""
        if any(os.path.exists(p) for p in _kaggle_triple(folder).values()):
            hint = " (it holds train_*.npy, the Criteo Kaggle layout: --dataset_name criteo_kaggle)"
        raise ValueError(
            f"{folder}: needs day_<i>_{{dense,sparse,labels}}.npy files for at least 2 days "
            f"(training days, then the last day for validation/test), found days {days}{hint}")
    out = []
    for i, day in enumerate(days):
        paths = {k: os.path.join(folder, f"day_{day}_{k}.npy") for k in BINARY_KINDS}
        missing = [p for p in paths.values() if not os.path.exists(p)]
        if day != i or missing:
            raise ValueError(f"{folder}: days must be 0..{len(days) - 1} with all three files; "
                             f"missing {missing or f'day_{i}'}")
        out.append(paths)
    return out


def binary_criteo_paths(folder: str, dataset_name: str = "criteo_1t") -> list[dict[str, str]]:
    """The ``{dense, sparse, labels}`` file triples of ``folder`` in dlrm_main.py's layout for
    ``dataset_name``: ``"criteo_1t"``, the days of :func:`binary_criteo_day_paths`;
    ``"criteo_kaggle"``, the one triple ``train_{dense,sparse,labels}.npy`` that
    TorchRec's ``npy_preproc_criteo --dataset_name criteo_kaggle`` writes from Kaggle's
    ``train.txt`` (its ``test_*.npy``, from the unlabelled ``test.txt``, is not read, as in
    dlrm_main.py). ValueError naming the folder and the missing files."""
    _check_dataset_name(dataset_name)
    if dataset_name == "criteo_1t":
        return binary_criteo_day_paths(folder)
    if not os.path.isdir(folder):
        raise ValueError(f"--in_memory_binary_criteo_path {folder!r} is not a folder")
    paths = _kaggle_triple(folder)
    missing = [p for p in paths.values() if not os.path.exists(p)]
    if missing:
        hint = ""
        if any(_DAY_FILE.fullmatch(f) for f in os.listdir(folder)):
            hint = " (it holds day_<i>_*.npy, the Criteo 1TB layout: --dataset_name criteo_1t)"
        raise ValueError(f"{folder}: --dataset_name criteo_kaggle reads "
                         f"train_{{dense,sparse,labels}}.npy; missing {missing}{hint}")
    return [paths]


def binary_criteo_pipe(days: Sequence[Mapping[str, str]], stage: str, batch_size: int, rank: int,
                       world_size: int, num_embeddings: Sequence[int],
                       shuffle_batches: bool = False, mmap_mode: bool = False,
                       seed: int = 0, drop_last: bool = True,
                       dataset_name: str = "criteo_1t") -> InMemoryBinaryCriteoIterDataPipe:
    """TorchRec's ``InMemoryBinaryCriteoIterDataPipe`` over ``days`` (the triples of
    :func:`binary_criteo_paths`) as dlrm_main.py builds it. ``"criteo_1t"``: ``"train"`` reads
    every day but the last, ``"val"`` / ``"test"`` the first / second half of the last day.
    ``"criteo_kaggle"`` (one triple, the train file): ``"train"`` reads all of it, and ``"val"``
    and ``"test"`` both read its second half (dlrm_main.py's "criteo_kaggle has no validation
    set, so use 2nd half of training set": those rows are trained on too).

    Ids are hashed modulo ``num_embeddings`` (per batch with ``mmap_mode``), batches go
    round-robin to the ranks, ``shuffle_batches`` shuffles the rows inside each batch (numpy's
    global RNG, seeded by the pipe with ``seed``); ``drop_last`` drops the last, smaller training
    batch (so every step has ``batch_size`` rows); ``drop_last=False`` keeps it (dlrm_main.py's
    default, without ``--drop_last_training_batch``)."""
    if stage not in ("train", "val", "test"):
        raise ValueError(f"stage must be 'train', 'val' or 'test', got {stage!r}")
    _check_dataset_name(dataset_name)
    if dataset_name == "criteo_kaggle":
        if len(days) != 1:
            raise ValueError(f"criteo_kaggle takes one file triple (train_*.npy), got {len(days)}")
        # dlrm_main.py: the pipe's "test" stage is the second half of its (only) file.
        chosen, pipe_stage = list(days), ("train" if stage == "train" else "test")
    else:
        chosen, pipe_stage = (list(days[:-1]) if stage == "train" else [days[-1]]), stage
    return InMemoryBinaryCriteoIterDataPipe(
        pipe_stage, *[[d[k] for d in chosen] for k in BINARY_KINDS], batch_size=batch_size,
        rank=rank, world_size=world_size, drop_last=drop_last and stage == "train",
        shuffle_batches=shuffle_batches, shuffle_training_set_random_seed=seed,
        mmap_mode=mmap_mode, hashes=list(num_embeddings))


def _save_npy(path: str, array: np.ndarray) -> None:
    """Writes ``path`` whole or not at all (a temporary file, then renamed)."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def tsv_to_binary_criteo(path: str, out_dir: str, days: int | None = None,
                         cache_root: str | None = None,
                         dataset_name: str = "criteo_1t") -> list[dict[str, str]]:
    """Converts a Criteo TSV (plain or ``.gz``) into TorchRec's in-memory binary layout for
    ``dataset_name`` (:func:`binary_criteo_paths`). ``"criteo_1t"``:
    ``out_dir/day_<i>_{dense,sparse,labels}.npy`` for ``days`` (default 2) consecutive blocks of
    rows (file order, so the last day is the latest rows; TorchRec trains on all days but the
    last and splits the last into validation and test halves). ``"criteo_kaggle"``:
    ``out_dir/train_{dense,sparse,labels}.npy`` with every row (what TorchRec's
    ``npy_preproc_criteo --dataset_name criteo_kaggle`` makes of Kaggle's ``train.txt``; ``days``
    must not be given).

    The rows go through :func:`preprocess_criteo_tsv` (validation, then TorchRec's
    ``BinaryCriteoUtils.tsv_to_npys`` over the whole file) and are only cut into days, so every
    row is the same as on the ``--data`` TSV path (TorchRec's log transform subtracts the file's
    minimum, which would differ between separately converted day files). Returns the paths.
    """
    _check_dataset_name(dataset_name)
    if dataset_name == "criteo_kaggle" and days is not None:
        raise ValueError("days: the criteo_kaggle layout has no days (one train_*.npy triple)")
    days = 2 if days is None else days
    if isinstance(days, bool) or not isinstance(days, int) or days < 2:
        raise ValueError(f"days must be an int >= 2 (training days and a last day), got {days!r}")
    folder = preprocess_criteo_tsv(path, cache_root)
    arrays = {k: np.load(os.path.join(folder, f"{k}.npy")) for k in BINARY_KINDS}
    rows = len(arrays["labels"])
    os.makedirs(out_dir, exist_ok=True)
    if dataset_name == "criteo_kaggle":
        for k, p in _kaggle_triple(out_dir).items():
            _save_npy(p, arrays[k])
        return binary_criteo_paths(out_dir, dataset_name)
    if rows < 2 * days:
        raise ValueError(f"{path}: {rows} rows cannot fill {days} days of at least 2 rows")
    bounds = np.linspace(0, rows, days + 1).astype(int)
    for day in range(days):
        for k, a in arrays.items():
            _save_npy(os.path.join(out_dir, f"day_{day}_{k}.npy"), a[bounds[day]:bounds[day + 1]])
    return binary_criteo_day_paths(out_dir)


def _main(argv: Sequence[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m torchrec_tt.criteo",
        description="Validate a Criteo TSV (.gz too) and convert it to TorchRec's "
        "dense/sparse/labels .npy files; prints the folder (pass it to train.py --data).",
    )
    ap.add_argument("tsv")
    ap.add_argument("--cache-dir", default=None, help=f"default: {default_cache_root()}")
    ap.add_argument("--in-memory-binary", metavar="DIR", default=None,
                    help="write TorchRec's in-memory binary layout here instead (pass it to "
                    "train.py --in_memory_binary_criteo_path, with the same --dataset_name); "
                    "'temp': a new temporary folder")
    ap.add_argument("--dataset-name", "--dataset_name", dest="dataset_name",
                    choices=BINARY_DATASET_NAMES, default=BINARY_DATASET_NAMES[0],
                    help="--in-memory-binary layout, dlrm_main.py's names: criteo_1t writes "
                    "day_<i>_{dense,sparse,labels}.npy, criteo_kaggle writes "
                    "train_{dense,sparse,labels}.npy (every row)")
    ap.add_argument("--days", type=int, default=None,
                    help="--in-memory-binary criteo_1t: days to cut into (default 2)")
    a = ap.parse_args(argv)
    if a.in_memory_binary is None:
        if a.days is not None or a.dataset_name != BINARY_DATASET_NAMES[0]:
            ap.error("--days and --dataset-name apply to --in-memory-binary")
        print(preprocess_criteo_tsv(a.tsv, a.cache_dir))
        return
    if a.dataset_name == "criteo_kaggle" and a.days is not None:
        ap.error("--days: the criteo_kaggle layout has no days (one train_*.npy triple)")
    out = tempfile.mkdtemp(prefix="criteo_binary_") if a.in_memory_binary == "temp" \
        else a.in_memory_binary
    tsv_to_binary_criteo(a.tsv, out, a.days, a.cache_dir, a.dataset_name)
    print(out)


if __name__ == "__main__":
    _main()
