"""Quick start: a TT EmbeddingBagCollection in a tiny ranking model, trained for a few steps.

Builds three Criteo-sized tables in TT form, prints how much smaller they are than dense
tables, and trains the model on synthetic click data with a planted signal (the label depends
on hidden per-id scores), so the loss visibly drops. Runs on CPU in well under a minute:

    .venv/bin/python examples/quickstart.py [--steps 60] [--batch-size 512]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_tt import TTEmbeddingBagCollection, TTEmbeddingBagConfig

TABLES = [  # (name, rows, feature); sizes of three large Criteo Kaggle tables
    ("t_cat_2", 10_131_227, "cat_2"),
    ("t_cat_11", 5_461_306, "cat_11"),
    ("t_cat_20", 286_181, "cat_20"),
]


class TinyRanker(nn.Module):
    """Pooled TT embeddings → MLP → click logit."""

    def __init__(self, ebc: TTEmbeddingBagCollection, dim: int) -> None:
        super().__init__()
        self.ebc = ebc
        self.mlp = nn.Sequential(nn.Linear(dim * len(TABLES), 64), nn.ReLU(), nn.Linear(64, 1))

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        return self.mlp(self.ebc(kjt).values()).squeeze(1)


def synthetic_batch(gen: torch.Generator, batch: int, hot: int, secret: torch.Tensor):  # type: ignore[no-untyped-def]
    # Ids come from a "hot" subset of each table (as in real traffic, where few ids dominate);
    # each hot id carries a hidden score, and the click probability follows their sum.
    ids = torch.randint(0, hot, (len(TABLES), batch), generator=gen)
    score = secret.gather(1, ids).sum(0)
    labels = torch.bernoulli(torch.sigmoid(3 * score), generator=gen)
    rows = torch.tensor([n for _, n, _ in TABLES])[:, None]
    values = (ids * 7919) % rows  # spread the hot ids over the whole table
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=[f for _, _, f in TABLES],
        values=values.flatten(),
        lengths=torch.ones(len(TABLES) * batch, dtype=torch.int64),
    )
    return kjt, labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)

    configs = [
        TTEmbeddingBagConfig(name=name, num_embeddings=n, embedding_dim=args.dim,
                             feature_names=[feature], tt_ranks=[args.rank, args.rank])
        for name, n, feature in TABLES
    ]
    ebc = TTEmbeddingBagCollection(configs)
    stats = ebc.compression_stats()
    print(f"{'table':<10} {'rows':>11} {'p':>16} {'q':>10} {'TT KiB':>8} {'dense MiB':>10} {'ratio':>8}")
    for (name, n, _), shape in zip(TABLES, ebc.tt_shapes().values()):
        s = stats[name]
        print(f"{name:<10} {n:>11,} {str(shape.p):>16} {str(shape.q):>10} "
              f"{s['tt_bytes'] / 2**10:>8.1f} {s['dense_bytes'] / 2**20:>10.1f} {s['compression']:>7.0f}x")
    total = stats["total"]
    print(f"{'total':<10} {'':>11} {'':>16} {'':>10} {total['tt_bytes'] / 2**10:>8.1f} "
          f"{total['dense_bytes'] / 2**20:>10.1f} {total['compression']:>7.0f}x")

    model = TinyRanker(ebc, args.dim)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(args.seed)
    secret = torch.randn(len(TABLES), 1000, generator=gen)
    losses = []
    start = time.perf_counter()
    for step in range(args.steps):
        kjt, labels = synthetic_batch(gen, args.batch_size, 1000, secret)
        loss = nn.functional.binary_cross_entropy_with_logits(model(kjt), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    elapsed = time.perf_counter() - start
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f"summary: steps={args.steps} loss_first5={first:.4f} loss_last5={last:.4f} "
          f"compression={total['compression']:.0f}x step_ms={elapsed / args.steps * 1e3:.1f}")


if __name__ == "__main__":
    main()
