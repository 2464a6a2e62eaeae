"""Plots of ``results/bench_decode.json``: speedup over FlashInfer and KV-read bandwidth.

Run after ``bench_decode.py --table``: ``python benchmarks/plot_decode.py`` (matplotlib).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def series(rows, value):
    lines = defaultdict(list)
    for r in rows:
        y = value(r)
        if y is not None:
            lines[f"{r['kind']} H={r['heads']} B={r['batch']}"].append((r["ctx"], y))
    return lines


def plot(lines, ylabel, title, path, hline=None):
    fig, ax = plt.subplots(figsize=(9, 4.8))
    ax.set_prop_cycle(color=plt.cm.tab20.colors)  # more series than the default 10 colours
    for label, pts in lines.items():
        xs, ys = zip(*sorted(pts))
        ax.plot(xs, ys, marker="o", label=label)
    if hline is not None:
        ax.axhline(hline, color="black", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("ctx")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    rows = json.loads((RESULTS / "bench_decode.json").read_text())
    gpu = rows[0].get("gpu", "GPU")
    plot(series(rows, lambda r: r["flashinfer_us"] / r["ours_us"]
                if r.get("flashinfer_us") and r.get("ours_us") else None),
         "speedup over FlashInfer (x)", f"bench_decode ({gpu})",
         RESULTS / "bench_decode_speedup.png", hline=1.0)
    plot(series(rows, lambda r: r.get("ours_GB/s")), "KV read, GB/s (ours)",
         f"bench_decode ({gpu}): bandwidth", RESULTS / "bench_decode_bandwidth.png")


if __name__ == "__main__":
    main()
