"""The SASS instructions where a kernel's warps were sampled most, from Nsight Compute's source page as CSV.

    ncu --set full -k regex:NAME --launch-count 1 -o rep python ...      (on the GPU machine)
    ncu --import rep.ncu-rep --page source --csv --print-source sass > sass.csv
    python -m benchmarks.ncu_source_top sass.csv [--top 40] [--around 3]

Prints the total samples, then the top instructions by warp-stall samples (all samples: issued or not) with their
share, the not-issued share and each one's largest stall reasons (the per-reason columns ncu writes, where present),
and a few instructions before each for context. --phases first prints the samples of three spans of the code: before
the first wgmma (HGMMA: the consumers' prologue, Q's loads and rotation), from it to the last (the tile loop), and
after (the epilogue and the producer's loop), each with its largest stall reasons: two kernels' profiles compared by
span. Works from the CSV alone (no GPU, no ncu)."""
from __future__ import annotations

import argparse
import csv
import sys


def _num(v: str) -> float:
    try:
        return float(v.replace(",", ""))
    except ValueError:
        return 0.0


def load(path: str) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        lines = f.read().splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith('"Address"') or ln.startswith("Address")), None)
    if start is None:
        raise SystemExit(f"ncu_source_top: {path} has no 'Address' header (not ncu's --page source --csv output)")
    rows = list(csv.DictReader(lines[start:]))
    return list(rows[0].keys()) if rows else [], rows


def top_reasons(part: list[dict[str, str]], reasons: list[str], n: float) -> str:
    """The three largest stall reasons of the instructions `part` (n samples between them), as shares of n."""
    why = sorted(((c, sum(_num(r[c]) for r in part)) for c in reasons), key=lambda t: -t[1])[:3]
    return ", ".join(f"{c.removeprefix('stall_')} {v / n:.0%}" for c, v in why if v > 0) if n else ""


def phases(rows: list[dict[str, str]], all_col: str, reasons: list[str], total: float) -> list[str]:
    """The samples of the spans before the first HGMMA, from it to the last, and after, with each span's three
    largest stall reasons (shares of the span's samples)."""
    mma = [i for i, r in enumerate(rows) if r.get("Source", "").lstrip().startswith("HGMMA")]
    if not mma:
        return ["phases: no HGMMA in this kernel"]
    spans = (("prologue", 0, mma[0]), ("wgmma span", mma[0], mma[-1] + 1), ("after", mma[-1] + 1, len(rows)))
    out = []
    for name, lo, hi in spans:
        part = rows[lo:hi]
        n = sum(_num(r[all_col]) for r in part)
        out.append(f"  {name:10s} {hi - lo:5d} instructions {n:9.0f} samples {n / total:6.1%}   "
                   f"[{top_reasons(part, reasons, n)}]")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--around", type=int, default=0, help="instructions of context printed before each")
    ap.add_argument("--phases", action="store_true", help="samples before / between / after the wgmma instructions")
    a = ap.parse_args(argv)
    cols, rows = load(a.csv)
    all_col = next((c for c in cols if c.startswith("Warp Stall Sampling (All")), None)
    ni_col = next((c for c in cols if c.startswith("Warp Stall Sampling (Not")), None)
    if all_col is None:
        raise SystemExit(f"ncu_source_top: no warp-stall sampling column among {cols[:12]}...")
    reasons = [c for c in cols if c.startswith("stall_") and "Not Issued" not in c]
    total = sum(_num(r[all_col]) for r in rows) or 1.0
    print(f"{len(rows)} instructions, {total:.0f} samples ({all_col})")
    if a.phases:
        for line in phases(rows, all_col, reasons, total):
            print(line)
    order = sorted(range(len(rows)), key=lambda i: -_num(rows[i][all_col]))[: a.top]
    for i in sorted(order):
        r = rows[i]
        n = _num(r[all_col])
        ni = _num(r[ni_col]) if ni_col else 0.0
        why_s = top_reasons([r], reasons, n)
        for j in range(max(0, i - a.around), i):
            print(f"          {rows[j].get('Address', '')}  {rows[j].get('Source', '')}")
        print(f"{n / total:6.1%} {ni / max(n, 1):4.0%}ni {r.get('Address', '')}  {r.get('Source', '')}"
              + (f"   [{why_s}]" if why_s else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
