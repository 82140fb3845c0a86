"""Time ``torchrec_tt.shapes.factor_rows`` over table sizes 2 .. 2^40 (powers of two and ten,
their neighbours, large primes), 2-4 cores, with the search's cache cleared before each call.

    nice .venv/bin/python bench/bench_factor_rows.py

Prints, per core count, the median and worst time of one call and the size of the worst.
"""

from __future__ import annotations

import statistics
import time

from torchrec_tt import shapes


def sizes() -> list[int]:
    out = {2, 3, 97, 10007, 999_999_999_989, 2**31 - 1, 2**40 - 87, 2**40 - 3}
    for e in range(2, 41):
        out.update({2**e, 2**e + 1, 2**e - 1})
    for e in range(1, 13):
        out.update({10**e, 10**e + 7, 10**e - 1})
    return sorted(n for n in out if n <= 2**40)


def main() -> None:
    for k in (2, 3, 4):
        times = []
        for n in sizes():
            best = float("inf")
            for _ in range(3):  # best of 3: the machine is shared
                shapes._best_factors.cache_clear()
                t0 = time.perf_counter()
                shapes.factor_rows(n, k)
                best = min(best, time.perf_counter() - t0)
            times.append((best, n))
        worst = max(times)
        print(f"{k} cores: {len(times)} sizes, median {1e3 * statistics.median(t for t, _ in times):.2f}"
              f" ms, worst {1e3 * worst[0]:.2f} ms (num_rows {worst[1]})", flush=True)


if __name__ == "__main__":
    main()
