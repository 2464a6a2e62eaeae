"""Compile time with and without attnfuse's passes: HF Llama-3-8B architecture, one decode graph.

Each sample is the wall time of the first decode call of a fresh ``torch.compile`` (Dynamo,
AOTAutograd, Inductor, Triton compilation of every kernel, the first run) after
``torch._dynamo.reset()``, in three cache states:

``cold``         empty Inductor and Triton caches (new directories), and the in-memory
                 caches of attnfuse's kernels cleared (compiled kernels of op calls, the
                 TTIR memo), so every kernel of every variant is compiled anew;
``warm triton``  the Triton cache the cold sample filled, a new Inductor cache, and the
                 in-memory caches cleared again: what a new model or shape costs in a new
                 process on a machine that has compiled these kernels before (Inductor's
                 FX graph cache misses, Triton's kernel cache hits);
``warm``         both caches the cold sample filled (Inductor's FX graph cache hits).

Variants alternate within each round so that drift of the machine hits all of them; an
untimed compile first takes the process's one-time costs (imports, CUDA context). The
pass manager's own time per graph (``attnfuse`` debug log) is reported too, and the time
Inductor spends finding what each user kernel reads and writes (its TTIR analysis of the
``triton_kernel_wrapper`` nodes, ``analysis_s``; calls attnfuse's memo answers cost a copy
and are not counted).
``attnfuse[op calls]`` keeps op calls (``inline_kernels`` off); ``attnfuse[no TTIR
memo]`` inlines but lets Inductor generate each launch node's TTIR anew
(``ATTNFUSE_TTIR_MEMO=0``); ``attnfuse[no early compile]`` leaves our kernels' compilation
to when Inductor loads the module (``ATTNFUSE_EARLY_COMPILE=0``); ``attnfuse[traced
decompose]`` lets Inductor trace the decomposition of our launch nodes
(``ATTNFUSE_DIRECT_DECOMPOSE=0``). ``decompose_s`` is the time of Inductor's
``decompose_triton_kernel_wrapper_functional`` pass per compile.

Host noise on these machines is about +-1 s per 6-7 s sample, and it drifts: besides the
medians, ``paired_ratio`` is the median over rounds of each sample divided by Inductor's
sample of the same round and mode (the two taken seconds apart), and ``paired_q1_q3`` its
quartiles.

Run: ``python benchmarks/bench_compile_time.py`` (GPU). Environment: ``CT_ROUNDS``,
``CT_LAYERS``, ``CT_CTX``, ``CT_VARIANTS`` and ``CT_STATES`` (comma-separated subsets),
``CT_RESULT`` (results file name), ``CT_BUDGET_S`` (no new round starts after this many
seconds; the table says how many rounds ran).
"""

from __future__ import annotations

import logging
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from common import write_results  # noqa: E402

ROUNDS = int(os.environ.get("CT_ROUNDS", "3"))
LAYERS = int(os.environ.get("CT_LAYERS", "4"))
CTX = int(os.environ.get("CT_CTX", "4096"))
#: comma-separated subset of VARIANTS (default: all)
SELECTED = [v for v in os.environ.get("CT_VARIANTS", "").split(",") if v]
#: results file name under benchmarks/results/
RESULT = os.environ.get("CT_RESULT", "compile_time")
BUDGET_S = float(os.environ.get("CT_BUDGET_S", "inf"))
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 head_dim=128, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=131072)
VARIANTS = {
    "inductor": {},
    "attnfuse": {"backend": "attnfuse"},
    "attnfuse[op calls]": {"backend": "attnfuse", "options": {"inline_kernels": False}},
    "attnfuse[no TTIR memo]": {"backend": "attnfuse", "env": {"ATTNFUSE_TTIR_MEMO": "0"}},
    "attnfuse[no early compile]": {"backend": "attnfuse", "env": {"ATTNFUSE_EARLY_COMPILE": "0"}},
    "attnfuse[traced decompose]": {"backend": "attnfuse", "env": {"ATTNFUSE_DIRECT_DECOMPOSE": "0"}},
    "inductor+cg": {"mode": "reduce-overhead"},
    "attnfuse+cg": {"backend": "attnfuse", "options": {"mode": "reduce-overhead"}},
}


class _PassTimes(logging.Handler):
    """Collects the pass manager's "passes took X ms" debug records."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.ms: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        m = re.search(r"passes took ([0-9.]+) ms", record.getMessage())
        if m:
            self.ms.append(float(m.group(1)))


STATES = tuple(os.environ.get("CT_STATES", "cold,warm triton,warm").split(","))
_ANALYSIS_S: list[float] = []
_DECOMPOSE_S: list[float] = []


def _timed(fn, sink: list[float]):
    def timed(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            sink.append(time.perf_counter() - t0)

    timed._ct_timed = True
    return timed


def _time_decompose() -> None:
    """Accumulate the time of Inductor's decomposition of user-kernel nodes (ours made
    directly first: installed before the timer wraps it) into ``_DECOMPOSE_S``."""
    import torch._inductor.fx_passes.post_grad as post_grad

    from attnfuse.passes.inline_kernels import _install_direct_decomposition

    _install_direct_decomposition()
    fn = post_grad.decompose_triton_kernel_wrapper_functional
    if not getattr(fn, "_ct_timed", False):
        post_grad.decompose_triton_kernel_wrapper_functional = _timed(fn, _DECOMPOSE_S)


def _time_kernel_analysis() -> None:
    """Accumulate the time of Inductor's user-kernel access analysis into ``_ANALYSIS_S``."""
    import torch._higher_order_ops.triton_kernel_wrap as tkw

    for name in ("identify_accessed_tensors", "identify_mutated_tensors"):
        fn = getattr(tkw, name, None)
        if fn is None or getattr(fn, "_ct_timed", False):
            continue
        setattr(tkw, name, _timed(fn, _ANALYSIS_S))


def _forget_compiled_kernels() -> None:
    """Drop what this process remembers of attnfuse's compiled kernels (a cold start)."""
    import importlib
    import pkgutil

    from attnfuse.custom_ops import kernels
    from attnfuse.custom_ops.kernels._launch import Launcher
    from attnfuse.passes import inline_kernels

    for info in pkgutil.iter_modules(kernels.__path__):
        mod = importlib.import_module(f"{kernels.__name__}.{info.name}")
        for obj in vars(mod).values():
            if isinstance(obj, Launcher):
                obj._cache.clear()
                caches = getattr(obj.fn, "device_caches", None)
                if caches is not None:
                    caches.clear()
    inline_kernels.forget_compiled_analyses()


def first_call_s(model, cache, kwargs: dict, state: str = "cold") -> float:
    from hf_models import cache_arg

    if state != "warm":  # as in a new process: nothing of attnfuse's kernels in memory
        _forget_compiled_kernels()
    for var in {"cold": ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"),
                "warm triton": ("TORCHINDUCTOR_CACHE_DIR",), "warm": ()}[state]:
        os.environ[var] = tempfile.mkdtemp(prefix="attnfuse_ct_")
    kwargs = dict(kwargs)
    for var in ("ATTNFUSE_TTIR_MEMO", "ATTNFUSE_EARLY_COMPILE", "ATTNFUSE_DIRECT_DECOMPOSE"):
        os.environ.pop(var, None)
    os.environ.update(kwargs.pop("env", {}))
    torch._dynamo.reset()
    fwd = torch.compile(model.forward, **kwargs)
    tok = torch.zeros(1, 1, dtype=torch.long, device="cuda")
    pos = torch.full((1, 1), CTX // 2, dtype=torch.long, device="cuda")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        fwd(input_ids=tok, position_ids=pos, **cache_arg(cache), use_cache=True, logits_to_keep=1)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    from hf_models import build_from_config, make_static_cache, tiny_config

    import attnfuse  # noqa: F401  (registers the backends)

    _time_kernel_analysis()
    _time_decompose()
    handler = _PassTimes()
    log = logging.getLogger("attnfuse")
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    cfg = tiny_config("llama", num_hidden_layers=LAYERS, **LLAMA3_8B)
    model = build_from_config(cfg, dtype=torch.bfloat16, device="cuda")
    cache = make_static_cache(model, batch_size=1, max_cache_len=CTX)
    first_call_s(model, cache, {})  # one-time process costs
    variants = {n: VARIANTS[n] for n in SELECTED} if SELECTED else VARIANTS
    samples: dict[tuple[str, str], list[float]] = {}
    analysis: dict[tuple[str, str], list[float]] = {}
    decompose: dict[tuple[str, str], list[float]] = {}
    start = time.perf_counter()
    rounds = 0
    for r in range(ROUNDS):
        if time.perf_counter() - start > BUDGET_S:
            print(f"budget of {BUDGET_S:.0f} s spent after {r} rounds", flush=True)
            break
        rounds += 1
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in order:
            for state in STATES:
                _ANALYSIS_S.clear()
                _DECOMPOSE_S.clear()
                s = first_call_s(model, cache, variants[name], state)
                samples.setdefault((name, state), []).append(s)
                analysis.setdefault((name, state), []).append(sum(_ANALYSIS_S))
                decompose.setdefault((name, state), []).append(sum(_DECOMPOSE_S))
                print(f"round {r} {name:26s} {state:11s} {s:6.2f} s  analysis {sum(_ANALYSIS_S):.2f} s"
                      f"  decompose {sum(_DECOMPOSE_S):.3f} s", flush=True)
    rows = []
    for (name, state), xs in samples.items():
        base_name = "inductor+cg" if name.endswith("+cg") else "inductor"
        base_xs = samples.get((base_name, state))
        base = statistics.median(base_xs) if base_xs else float("nan")
        paired = sorted(x / b for x, b in zip(xs, base_xs)) if base_xs else [float("nan")]
        q = statistics.quantiles(paired, n=4) if len(paired) > 1 else [paired[0]] * 3
        rows.append(dict(variant=name, caches=state, median_s=statistics.median(xs), min_s=min(xs),
                         max_s=max(xs), vs_inductor=statistics.median(xs) / base,
                         paired_ratio=statistics.median(paired), paired_q1_q3=f"{q[0]:.3f}-{q[2]:.3f}",
                         analysis_s=statistics.median(analysis[name, state]),
                         decompose_s=statistics.median(decompose[name, state]), rounds=rounds,
                         layers=LAYERS, ctx=CTX))
    pass_ms = statistics.median(handler.ms) if handler.ms else float("nan")
    for r in rows:
        r["pass_manager_ms_median"] = pass_ms
        print(r, flush=True)
    write_results(RESULT, rows,
                  ["variant", "caches", "median_s", "min_s", "max_s", "vs_inductor", "paired_ratio",
                   "paired_q1_q3", "analysis_s", "decompose_s", "pass_manager_ms_median"],
                  title=f"Compile time: first decode call of a fresh compile ({LAYERS} Llama-3-8B layers, B=1)",
                  notes=(f"{rounds} rounds, variants alternating; caches: `cold` (new Inductor and "
                         "Triton caches, attnfuse's in-memory kernel caches cleared), `warm triton` "
                         "(the Triton cache of the cold sample kept, in-memory caches cleared), "
                         "`warm` (both kept: FX graph "
                         "cache hit); `vs_inductor` against Inductor in the same mode and cache state; "
                         "`paired_ratio`: median over rounds of the sample over Inductor's sample of "
                         "the same round and mode (`paired_q1_q3`: its quartiles); "
                         "`analysis_s`: Inductor's TTIR access analysis of user kernels; "
                         "`decompose_s`: Inductor's decomposition of user-kernel nodes; "
                         "`pass_manager_ms_median`: "
                         "the attnfuse pass manager's own time per compiled graph (fusions and kernel "
                         "inlining), median over all attnfuse compiles."))


if __name__ == "__main__":
    main()
