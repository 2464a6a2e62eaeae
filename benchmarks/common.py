"""Shared benchmark plumbing: environment facts, timing, result files.

Every benchmark script imports this (``from common import ...``; scripts run as
``python benchmarks/bench_<name>.py``) so that all result rows name the GPU and the
torch / triton / flashinfer versions, and all timings are taken the same way:
``triton.testing.do_bench`` medians, or CUDA-graph replays for launch-bound sizes.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
#: bytes moved by the copy-bandwidth probe (read + write counted): large enough to
#: leave every cache level behind
COPY_PROBE_BYTES = 2 * 1024**3
#: graph replays per timing sample for CUDA-graph timings
GRAPH_REPLAYS = 20
#: timing samples for CUDA-graph timings (median taken)
GRAPH_SAMPLES = 15


def env_info() -> dict[str, str]:
    """GPU name and library versions, stamped into every result row."""
    import triton

    try:
        import flashinfer

        fi = flashinfer.__version__
    except Exception:  # optional dependency
        fi = "absent"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    return {
        "gpu": gpu,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "flashinfer": fi,
        "cuda": str(torch.version.cuda),
    }


def bench_us(fn: Callable[[], Any], *, cuda_graph: bool = False, warmup_ms: float = 25,
             rep_ms: float = 100) -> float:
    """Median time of ``fn()`` in microseconds.

    ``cuda_graph=True`` captures ``GRAPH_REPLAYS`` calls into one graph and times its
    replays with CUDA events (for launch-bound sizes, where launch gaps would dominate).
    """
    import triton.testing

    if not cuda_graph:
        return 1e3 * triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm up outside the capture (autotuning, lazy init)
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(GRAPH_REPLAYS):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    samples = []
    for _ in range(GRAPH_SAMPLES):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / GRAPH_REPLAYS)
    return statistics.median(samples)


def host_us(fn: Callable[[], Any], calls: int = 200) -> float:
    """Median host time of one call of ``fn`` in microseconds (no synchronization inside
    the loop: GPU work queues up; it is waited for once before and once after)."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e6)
    torch.cuda.synchronize()
    return statistics.median(samples)


def copy_bandwidth_gbps() -> float:
    """Measured device-to-device copy bandwidth (bytes read + written), GB/s."""
    n = COPY_PROBE_BYTES // 2 // 4
    src = torch.randn(n, device="cuda")
    dst = torch.empty_like(src)
    us = bench_us(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (us * 1e-6) / 1e9


def write_results(name: str, rows: Sequence[dict[str, Any]], columns: Sequence[str],
                  title: str = "", notes: str = "") -> Path:
    """Write ``<name>.json`` (all fields) and ``<name>.md`` (``columns``) under results/.

    When ``$OUT`` is set (the device machine), copies go there too so they come back.
    """
    env = env_info()
    rows = [{**env, **r} for r in rows]
    if rows:  # re-rendering measured rows elsewhere keeps the machine they were measured on
        env = {k: rows[0][k] for k in env}
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    md = [f"# {title or name}", "",
          f"GPU: {env['gpu']} · torch {env['torch']} · triton {env['triton']} · "
          f"flashinfer {env['flashinfer']} · CUDA {env['cuda']}", ""]
    if notes:
        md += [notes, ""]
    md.append("| " + " | ".join(columns) + " |")
    md.append("|" + "---|" * len(columns))
    for r in rows:
        md.append("| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |")
    text_md = "\n".join(md) + "\n"
    text_json = json.dumps(rows, indent=1, default=str)
    targets = [RESULTS_DIR]
    if os.environ.get("OUT"):
        targets.append(Path(os.environ["OUT"]))
    for d in targets:
        (d / f"{name}.json").write_text(text_json)
        (d / f"{name}.md").write_text(text_md)
    return RESULTS_DIR / f"{name}.md"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)
