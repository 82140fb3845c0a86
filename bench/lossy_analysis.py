"""Value distributions of captured pooled embeddings and gradients (``bench/capture_pooled.py``),
per table and over training: what the lossy comms codec is designed from.

    python bench/lossy_analysis.py runs/lossy/synthetic.pt runs/lossy/criteo.pt

Per capture step, over the 26 tables: the range ``R = max - min`` (min / median / max over
tables, and the max/min spread), ``R / std`` (how much of the range a few outliers take), the
share of values within one std of the mean, the excess kurtosis, and the range's change from
the previous capture; then one line per table at the last step.
"""

from __future__ import annotations

import sys

import torch


def _table_stats(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """``x``: [B, F, D] -> per-table statistics over the B x D values of each table."""
    v = x.permute(1, 0, 2).reshape(x.shape[1], -1).double()
    mean, std = v.mean(1), v.std(1)
    rng = v.amax(1) - v.amin(1)
    z = (v - mean[:, None]) / std.clamp_min(1e-300)[:, None]
    return {"range": rng, "std": std, "rho": rng / std.clamp_min(1e-300),
            "within1": (z.abs() <= 1).double().mean(1), "kurt": (z**4).mean(1) - 3,
            "zeros": (v == 0).double().mean(1)}


def report(path: str) -> None:
    d = torch.load(path)
    names = d["features"]
    src = d["args"].get("data") or "synthetic"
    print(f"\n=== {path} ({src}; batch {d['emb'].shape[1]}, steps {d['steps']})")
    for kind in ("emb", "grad"):
        print(f"-- {kind}: per step, over tables")
        print(f"{'step':>5} {'R min':>9} {'R median':>9} {'R max':>9} {'max/min':>8} "
              f"{'R/std med':>9} {'R/std max':>9} {'|z|<=1':>7} {'kurt med':>8} "
              f"{'R vs prev (med)':>15}")
        prev = None
        for ti, step in enumerate(d["steps"]):
            s = _table_stats(d[kind][ti])
            r = s["range"]
            change = "" if prev is None else f"{float((r / prev).median()):.2f}x"
            print(f"{step:>5} {float(r.min()):>9.2e} {float(r.median()):>9.2e} "
                  f"{float(r.max()):>9.2e} {float(r.max() / r.min().clamp_min(1e-300)):>8.1f} "
                  f"{float(s['rho'].median()):>9.1f} {float(s['rho'].max()):>9.1f} "
                  f"{float(s['within1'].median()):>7.2f} {float(s['kurt'].median()):>8.1f} "
                  f"{change:>15}")
            prev = r
        s = _table_stats(d[kind][-1])
        print(f"-- {kind}: per table at step {d['steps'][-1]} (plan: {kind})")
        print(f"{'table':<10} {'plan':<18} {'range':>9} {'std':>9} {'R/std':>6} {'kurt':>6}")
        for i, name in enumerate(names):
            plan = d["plan"].get(f"t_{name}", "")
            print(f"{name:<10} {plan:<18} {float(s['range'][i]):>9.2e} {float(s['std'][i]):>9.2e}"
                  f" {float(s['rho'][i]):>6.1f} {float(s['kurt'][i]):>6.1f}")


if __name__ == "__main__":
    for p in sys.argv[1:]:
        report(p)
