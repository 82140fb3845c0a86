"""Effective rank of trained tables, MLET (collapsed) against plain, on the real Criteo sample.

The paper explains MLET's gain by the tendency of the factorised product to learn tables of lower
effective rank. This reads the DCP checkpoints that ``bench/mlet_accuracy.py run real`` leaves
(MLET runs: ``checkpoint/<model>/mlet_final``; plain runs need ``-- --checkpoint_every 60``,
``checkpoint/<model>/step_60``), restricts each table to the rows whose ids occur in the training
split (the other rows keep their random init), and prints the effective rank
(``torchrec_tt.mlet.effective_rank``) over ``d`` of the tables with at least ``--min_rows``
trained rows, mean over tables, then mean ± sd over seeds, per (d, k).

    .venv/bin/python bench/mlet_rank.py --runs runs/bench/mlet/real runs/bench/mlet_rank/real
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from torchrec_tt import criteo  # noqa: E402
from torchrec_tt.mlet import effective_rank  # noqa: E402

REAL = ROOT.parent / "shared" / "data" / "criteo_kaggle_sample.tsv.gz"
PREFIX = "model.model.sparse_arch.embedding_bag_collection."


def _load(ckpt: Path, keys: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    state = {k: torch.empty(s) for k, s in keys.items()}
    dcp.load(state, checkpoint_id=str(ckpt))
    return state


def _shapes(ckpt: Path) -> dict[str, torch.Size]:
    md = dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    return {k: m.size for k, m in md.items() if hasattr(m, "size")}


def tables_of(ckpt: Path, mlet: bool) -> dict[str, torch.Tensor]:
    """``t_cat_i`` -> the served ``[N, d]`` weight (collapsed for MLET)."""
    shapes = _shapes(ckpt)
    if mlet:
        wide = {k: s for k, s in shapes.items() if k.startswith(PREFIX + "mlet.ebc.embedding_bags.")
                or k.startswith(PREFIX + "mlet.projections.")}
        state = _load(ckpt, wide)
        out = {}
        for k, v in state.items():
            m = re.match(re.escape(PREFIX) + r"mlet\.ebc\.embedding_bags\.(t_cat_\d+)\.weight", k)
            if m:
                w = state[f"{PREFIX}mlet.projections.{m.group(1)}.weight"]
                out[m.group(1)] = v @ w.T
        return out
    plain = {k: s for k, s in shapes.items() if k.startswith(PREFIX + "ebc.embedding_bags.")}
    state = _load(ckpt, plain)
    return {re.search(r"(t_cat_\d+)", k).group(1): v for k, v in state.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", required=True, help="bench/mlet_accuracy.py run folders")
    ap.add_argument("--max_ind_range", type=int, default=20000)
    ap.add_argument("--min_rows", type=int, default=1000)
    a = ap.parse_args()
    cards = [min(c, a.max_ind_range) for c in criteo.KAGGLE_CARDINALITIES]
    folder = criteo.preprocess_criteo_tsv(str(REAL))
    train, _ = criteo.load_criteo_npys(folder, cards).split(0.2, 0)  # the benchmark's split 0
    trained_rows = {f"t_cat_{i}": np.unique(train.sparse[:, i]) for i in range(len(cards))}
    big = sorted((t for t, r in trained_rows.items() if len(r) >= a.min_rows),
                 key=lambda t: int(t.split("_")[-1]))
    print(f"tables with >= {a.min_rows} trained rows: {big} "
          f"({[len(trained_rows[t]) for t in big]} rows)")
    per: dict[tuple[int, int], list[float]] = defaultdict(list)
    for runs in a.runs:
        for run in sorted(Path(runs).glob("seed*-d*-f*")):
            seed, d, f = map(int, re.match(r"seed(\d+)-d(\d+)-f(\d+)", run.name).groups())
            ckpt = run / "checkpoint" / "uncompressed" / ("mlet_final" if f else "step_60")
            if not ckpt.exists():
                continue
            weights = tables_of(ckpt, mlet=bool(f))
            ranks = [effective_rank(weights[t][torch.as_tensor(trained_rows[t])]) / d for t in big]
            per[(d, f * d)].append(statistics.mean(ranks))
    print("\n| d | k | seeds | effective rank / d (trained rows, mean over tables) |")
    print("|---|---|---|---|")
    for (d, k), v in sorted(per.items()):
        sd = f" ± {statistics.stdev(v):.3f}" if len(v) > 1 else ""
        print(f"| {d} | {k or '- (plain)'} | {len(v)} | {statistics.mean(v):.3f}{sd} |")


if __name__ == "__main__":
    main()
