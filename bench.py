"""``attnfuse bench``: run the benchmark suites and plot their results.

Each suite is a script ``benchmarks/bench_<name>.py`` (run from a source checkout) that
times attnfuse's ops against their baselines in the same run and writes
``benchmarks/results/<name>*.json`` and ``.md`` through ``benchmarks/common.py``. After
the suites ran, ``PLOTS`` turns the result files into PNG plots: speedup against context
length, and bandwidth against the measured copy ceiling (``--no-plots`` skips them;
``--plot-only`` redraws them from existing results; they need matplotlib).
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
#: the measured copy bandwidth of the H100 runs, where a result file does not carry its own
DEFAULT_COPY_GBPS = 3000.0


def _ratio(num: str, den: str):
    return lambda r: (r[num] / r[den]) if isinstance(r.get(num), (int, float)) and r.get(den) else None


def _col(name: str):
    return lambda r: r.get(name) if isinstance(r.get(name), (int, float)) else None


#: (result file stem, output suffix, x column, series label, y value, y label, ceiling?)
PLOTS = [
    ("bench_decode", "bandwidth", "ctx", lambda r: f"{r['kind']} H={r['heads']} B={r['batch']} ours",
     _col("ours_GB/s"), "KV read GB/s", True),
    ("bench_decode", "speedup", "ctx", lambda r: f"{r['kind']} H={r['heads']} B={r['batch']}",
     _ratio("flashinfer_us", "ours_us"), "speedup over FlashInfer (x)", False),
    ("bench_rope_kv", "bandwidth", "T", lambda r: f"{r['variant']}", _col("GB/s"), "effective GB/s", True),
    ("mla_prefill", "speedup", "max_len", lambda r: f"{r['attention']} H={r['heads']} {r['batch']}",
     _ratio("absorbed_us", "mha_us"), "MHA form speedup over absorbed (x)", False),
    ("e2e_decode", "speedup", "ctx", lambda r: f"B={r['B']} {r['variant']}",
     _col("speedup_vs_inductor"), "decode speedup over Inductor, same mode (x)", False),
    ("e2e_decode", "floor", "ctx", lambda r: f"B={r['B']} {r['variant']}",
     _col("x_floor"), "time / memory floor (x)", False),
]


def suites() -> dict[str, Path]:
    return {p.stem.removeprefix("bench_"): p for p in sorted(BENCH_DIR.glob("bench_*.py"))}


def plot_results(results_dir: Path = RESULTS_DIR) -> list[Path]:
    """Speedup-against-length and bandwidth-against-ceiling plots of the result files."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("attnfuse bench: matplotlib is not installed; no plots", file=sys.stderr)
        return []
    made = []
    for stem, suffix, x, label, y, ylabel, ceiling in PLOTS:
        path = results_dir / f"{stem}.json"
        if not path.exists():
            continue
        rows = json.loads(path.read_text())
        series: dict[str, list[tuple[float, float]]] = {}
        for r in rows:
            value = y(r)
            if value is not None and isinstance(r.get(x), (int, float)):
                series.setdefault(label(r), []).append((r[x], value))
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for name, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        if ceiling:
            bw = rows[0].get("copy_gbps", DEFAULT_COPY_GBPS)
            ax.axhline(bw, color="k", linestyle="--", label=f"measured copy bandwidth ({bw:.0f} GB/s)")
        elif "speedup" in suffix:
            ax.axhline(1.0, color="k", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(x)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{stem} ({rows[0].get('gpu', '')})")
        ax.legend(fontsize=6, ncol=2)
        out = results_dir / f"{stem}_{suffix}.png"
        fig.tight_layout()
        fig.savefig(out, dpi=110)
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
        for png in plot_results():
            print(f"plot: {png.relative_to(ROOT)}")
    return 1 if failed else 0
