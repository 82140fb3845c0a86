"""Summarise an ncu source-page CSV (``ncu -i REP --page source --csv --print-source sass``).

Prints the executed warp instructions and stall samples per opcode class and the hottest SASS
lines, so a kernel's cost can be read per instruction kind (what bench/gpu_round.sh's
NCU_SOURCE step exports). Usage: python3 bench/ncu_hot_lines.py FILE.csv [--top 25]
"""
import argparse
import collections
import csv


def rows(path: str):
    with open(path, newline="") as f:
        r = csv.reader(f)
        next(r)  # kernel name
        header = next(r)
        for rec in r:
            if len(rec) == len(header):
                yield dict(zip(header, rec))


def num(x: str) -> float:
    try:
        return float(x.replace(",", ""))
    except ValueError:
        return 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args()
    recs = list(rows(a.csv))
    stall_cols = [c for c in recs[0] if c.startswith("stall_")] if recs else []
    by_op = collections.defaultdict(lambda: [0.0, 0.0])
    total_i = total_s = 0.0
    for r in recs:
        op = r["Source"].split()[0] if r["Source"].split() else "?"
        if op.startswith("@"):
            op = r["Source"].split()[1]
        op = op.split(".")[0]
        i, s = num(r["Instructions Executed"]), num(r["Warp Stall Sampling (All Samples)"])
        by_op[op][0] += i
        by_op[op][1] += s
        total_i += i
        total_s += s
    print(f"warp instructions executed: {total_i:,.0f}; stall samples: {total_s:,.0f}")
    print("| opcode | warp instr | % instr | % samples |")
    print("|---|---|---|---|")
    for op, (i, s) in sorted(by_op.items(), key=lambda kv: -kv[1][1])[:20]:
        print(f"| {op} | {i:,.0f} | {100 * i / max(total_i, 1):.1f} | {100 * s / max(total_s, 1):.1f} |")
    print()
    print("| address | sass | warp instr | samples | top stalls |")
    print("|---|---|---|---|---|")
    for r in sorted(recs, key=lambda r: -num(r["Warp Stall Sampling (All Samples)"]))[: a.top]:
        st = sorted(((num(r[c]), c[6:]) for c in stall_cols), reverse=True)[:3]
        stalls = ", ".join(f"{n} {v:.0f}" for v, n in st if v > 0)
        src = " ".join(r["Source"].split())
        print(f"| {r['Address'][-5:]} | {src[:60]} | {num(r['Instructions Executed']):,.0f} | "
              f"{num(r['Warp Stall Sampling (All Samples)']):.0f} | {stalls} |")


if __name__ == "__main__":
    main()
