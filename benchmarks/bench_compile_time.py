"""Compile time with and without attnfuse's passes: HF Llama-3-8B architecture, one decode graph.

Each sample is the wall time of the first decode call of a fresh ``torch.compile`` (Dynamo,
AOTAutograd, Inductor, Triton compilation of every kernel, the first run), with empty
Inductor and Triton caches (new directories per sample) after ``torch._dynamo.reset()``.
Variants alternate within each round so that drift of the machine hits all of them; an
untimed compile first takes the process's one-time costs (imports, CUDA context). The
pass manager's own time per graph (``attnfuse`` debug log) is reported too.
``attnfuse[op calls]`` keeps op calls (``inline_kernels`` off); ``attnfuse[no TTIR
memo]`` inlines but lets Inductor generate each launch node's TTIR anew
(``ATTNFUSE_TTIR_MEMO=0``).

Run: ``python benchmarks/bench_compile_time.py`` (GPU). Environment: ``CT_ROUNDS``,
``CT_LAYERS``, ``CT_CTX``.
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
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 head_dim=128, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=131072)
VARIANTS = {
    "inductor": {},
    "attnfuse": {"backend": "attnfuse"},
    "attnfuse[op calls]": {"backend": "attnfuse", "options": {"inline_kernels": False}},
    "attnfuse[no TTIR memo]": {"backend": "attnfuse", "env": {"ATTNFUSE_TTIR_MEMO": "0"}},
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


def first_call_s(model, cache, kwargs: dict) -> float:
    for var in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        os.environ[var] = tempfile.mkdtemp(prefix="attnfuse_ct_")
    kwargs = dict(kwargs)
    for var in ("ATTNFUSE_TTIR_MEMO",):
        os.environ.pop(var, None)
    os.environ.update(kwargs.pop("env", {}))
    torch._dynamo.reset()
    fwd = torch.compile(model.forward, **kwargs)
    tok = torch.zeros(1, 1, dtype=torch.long, device="cuda")
    pos = torch.full((1, 1), CTX // 2, dtype=torch.long, device="cuda")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        fwd(input_ids=tok, position_ids=pos, past_key_values=cache, use_cache=True, logits_to_keep=1)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    from hf_models import build_from_config, make_static_cache, tiny_config

    import attnfuse  # noqa: F401  (registers the backends)

    handler = _PassTimes()
    log = logging.getLogger("attnfuse")
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    cfg = tiny_config("llama", num_hidden_layers=LAYERS, **LLAMA3_8B)
    model = build_from_config(cfg, dtype=torch.bfloat16, device="cuda")
    cache = make_static_cache(model, batch_size=1, max_cache_len=CTX)
    first_call_s(model, cache, {})  # one-time process costs
    samples: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for r in range(ROUNDS):
        order = list(VARIANTS) if r % 2 == 0 else list(reversed(VARIANTS))
        for name in order:
            s = first_call_s(model, cache, VARIANTS[name])
            samples[name].append(s)
            print(f"round {r} {name:12s} {s:6.2f} s", flush=True)
    rows = []
    for name, xs in samples.items():
        base = statistics.median(samples["inductor+cg" if name.endswith("+cg") else "inductor"])
        rows.append(dict(variant=name, median_s=statistics.median(xs), min_s=min(xs), max_s=max(xs),
                         vs_inductor=statistics.median(xs) / base, rounds=ROUNDS, layers=LAYERS, ctx=CTX))
    pass_ms = statistics.median(handler.ms) if handler.ms else float("nan")
    for r in rows:
        r["pass_manager_ms_median"] = pass_ms
        print(r, flush=True)
    write_results("compile_time", rows,
                  ["variant", "median_s", "min_s", "max_s", "vs_inductor", "pass_manager_ms_median"],
                  title=f"Compile time: first decode call of a fresh compile ({LAYERS} Llama-3-8B layers, B=1)",
                  notes=(f"{ROUNDS} rounds, variants alternating, cold Inductor and Triton caches per sample; "
                         "`vs_inductor` against Inductor in the same mode; `pass_manager_ms_median`: "
                         "the attnfuse pass manager's own time per compiled graph (fusions and kernel "
                         "inlining), median over all attnfuse compiles."))


if __name__ == "__main__":
    main()
