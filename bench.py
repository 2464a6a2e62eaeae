"""``attnfuse bench``: run the benchmark suites and plot their results.

Each suite is a script ``benchmarks/bench_<name>.py`` (run from a source checkout) that
times attnfuse's ops against their baselines in the same run and writes
``benchmarks/results/<name>*.json`` and ``.md`` through ``benchmarks/common.py``. After
the suites ran, every result file with a context-length or token-count column gets PNG
plots (``--no-plots`` skips them; they need matplotlib).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
BENCH_DIR = ROOT / "benchmarks"
RESULTS_DIR = BENCH_DIR / "results"
#: columns that can serve as a plot's x axis, in order of preference
X_COLUMNS = ("ctx", "context", "seq_len", "tokens", "T")


def suites() -> dict[str, Path]:
    return {p.stem.removeprefix("bench_"): p for p in sorted(BENCH_DIR.glob("bench_*.py"))}


def plot_results(paths: list[Path]) -> list[Path]:
    """Speedup-against-length and bandwidth-against-ceiling plots for result files."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("attnfuse bench: matplotlib is not installed; no plots", file=sys.stderr)
        return []
    made = []
    for path in paths:
        rows = json.loads(path.read_text())
        if not rows:
            continue
        x = next((c for c in X_COLUMNS if c in rows[0]), None)
        if x is None:
            continue
        for metric, ylabel in (("speedup", "speedup over baseline (x)"), ("gbps", "GB/s")):
            cols = [c for c in rows[0] if c.startswith(metric)]
            if not cols:
                continue
            fig, ax = plt.subplots(figsize=(7, 4))
            series: dict[str, list[tuple[float, float]]] = {}
            for r in rows:
                group = " ".join(str(r[k]) for k in ("B", "batch", "heads", "variant") if k in r)
                for c in cols:
                    if isinstance(r.get(c), (int, float)):
                        series.setdefault(f"{c} {group}".strip(), []).append((r[x], r[c]))
            for label, pts in series.items():
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
            if metric == "gbps" and "copy_gbps" in rows[0]:
                ax.axhline(rows[0]["copy_gbps"], color="k", linestyle="--", label="measured copy bandwidth")
            ax.set_xscale("log", base=2)
            ax.set_xlabel(x)
            ax.set_ylabel(ylabel)
            ax.set_title(f"{path.stem} ({rows[0].get('gpu', '')})")
            ax.legend(fontsize=6)
            out = path.with_name(f"{path.stem}_{metric}.png")
            fig.tight_layout()
            fig.savefig(out, dpi=120)
            plt.close(fig)
            made.append(out)
    return made


def main(argv: list[str] | None = None) -> int:
    available = suites()
    p = argparse.ArgumentParser(prog="attnfuse bench", description=__doc__.splitlines()[0])
    p.add_argument("suite", nargs="*", help=f"suites to run (default all): {', '.join(available)}")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--plot-only", action="store_true", help="only plot existing results")
    args = p.parse_args(argv)
    if not available:
        print("attnfuse bench: no benchmarks/ folder here (run from a source checkout)", file=sys.stderr)
        return 2
    unknown = [s for s in args.suite if s not in available]
    if unknown:
        print(f"attnfuse bench: unknown suite(s) {unknown}; expected {list(available)}", file=sys.stderr)
        return 2
    chosen = args.suite or list(available)
    failed = []
    if not args.plot_only:
        for i, name in enumerate(chosen, 1):
            print(f"[{i}/{len(chosen)}] {name} ...", flush=True)
            t0 = time.perf_counter()
            rc = subprocess.call([sys.executable, str(available[name])], cwd=ROOT, env=os.environ.copy())
            print(f"[{i}/{len(chosen)}] {name}: {'ok' if rc == 0 else f'failed ({rc})'} in {time.perf_counter() - t0:.0f} s")
            if rc:
                failed.append(name)
    if not args.no_plots:
        for png in plot_results(sorted(RESULTS_DIR.glob("*.json"))):
            print(f"plot: {png.relative_to(ROOT)}")
    return 1 if failed else 0
