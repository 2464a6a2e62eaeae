"""End-to-end decode: HF Llama-3-8B architecture with a StaticCache, eager vs Inductor vs attnfuse.

Model: transformers' Llama with Llama-3-8B sizes (hidden 4096, 32 q / 8 kv heads,
head_dim 128, MLP 14336, vocab 128256), random bf16 weights, ``LAYERS`` of the 32 layers
(the per-layer cost is what attnfuse changes; the full model scales it by 8).

Each point decodes at the end of a cache filled with random data (the cache's write
counters are set to ``ctx - steps``, so attention reads ``ctx`` positions every step, as
late in a long generation). Variants, all in one run:

* ``eager``: the HF model as is (SDPA + ``repeat_kv`` over the whole static cache);
* ``inductor`` / ``inductor+cg``: ``torch.compile`` (``mode="reduce-overhead"`` for +cg);
* ``attnfuse`` / ``attnfuse+cg``: ``backend="attnfuse"``, same modes;
* ``attnfuse[op calls]``: ``options={"inline_kernels": False}``, the ops called through
  the dispatcher instead of their kernels launched by Inductor's code (host time).

The memory floor per step is the bytes every step must read once: the layers' weights,
the LM head (``logits_to_keep=1`` still reads it whole) and the KV cache up to ``ctx``,
over the measured copy bandwidth. Compile time is the first call's wall time (prefill
excluded: one decode graph) at the first point, where every variant starts from empty
Inductor and Triton caches (``cold_compile``); later points share one cache.

Run: ``python benchmarks/bench_e2e.py`` (GPU). Environment: ``E2E_LAYERS``, ``E2E_POINTS``
(e.g. ``1x4096,16x32768``), ``E2E_STEPS``.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from common import copy_bandwidth_gbps, write_results  # noqa: E402

LAYERS = int(os.environ.get("E2E_LAYERS", "4"))
POINTS = [tuple(int(v) for v in p.split("x")) for p in
          os.environ.get("E2E_POINTS", "1x4096,1x32768,16x4096,16x32768").split(",")]
STEPS = int(os.environ.get("E2E_STEPS", "30"))
#: decode steps before timing: compilation, CUDA-graph recording, autotuning
WARMUP_STEPS = 4
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 head_dim=128, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=131072)
#: bf16 logits of a 4-layer random model: tolerance of compiled against eager
LOGIT_TOL = 5e-2
#: ``E2E_DRY_RUN=1``: a tiny model on CPU, to check the script before spending GPU time
DRY_RUN = os.environ.get("E2E_DRY_RUN") == "1"
DEVICE = "cpu" if DRY_RUN else "cuda"
if DRY_RUN:
    LLAMA3_8B = dict(hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=2,
                     head_dim=32, vocab_size=512)
    POINTS = [(1, 64), (2, 64)]
    STEPS = 3


def build(layers: int):
    from hf_models import build_from_config, tiny_config

    cfg = tiny_config("llama", num_hidden_layers=layers, **LLAMA3_8B)
    dtype = torch.float32 if DRY_RUN else torch.bfloat16
    return build_from_config(cfg, dtype=dtype, device=DEVICE), cfg


#: seed of the random cache contents: every variant must see the same cache
CACHE_SEED = 1234


def fill_cache(cache, start: int) -> None:
    torch.manual_seed(CACHE_SEED)
    for layer in cache.layers:
        layer.keys.normal_()
        layer.values.normal_()
        layer.cumulative_length.fill_(start)


def decode_times(forward, cache, batch: int, ctx: int, vocab: int) -> tuple[list[float], torch.Tensor, float]:
    """(ms per timed step, logits of the first step, wall seconds of the first call)."""
    from hf_models import cache_arg

    start = ctx - STEPS - WARMUP_STEPS
    fill_cache(cache, start)
    tok = torch.randint(0, vocab, (batch, 1), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    times, first_logits, first_s = [], None, 0.0
    for i in range(WARMUP_STEPS + STEPS):
        pos = torch.full((batch, 1), start + i, device=DEVICE, dtype=torch.long)
        t_begin = time.perf_counter()
        if DRY_RUN:
            out = forward(input_ids=tok, position_ids=pos, **cache_arg(cache), use_cache=True, logits_to_keep=1)
            step_ms = (time.perf_counter() - t_begin) * 1e3
        else:
            ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            ev0.record()
            out = forward(input_ids=tok, position_ids=pos, **cache_arg(cache), use_cache=True, logits_to_keep=1)
            ev1.record()
            ev1.synchronize()
            step_ms = ev0.elapsed_time(ev1)
        if i == 0:
            first_s = time.perf_counter() - t_begin
            first_logits = out.logits[:, -1].float().clone()
        if i >= WARMUP_STEPS:
            times.append(step_ms)
    return times, first_logits, first_s


def save(rows, weight_bytes: float, bw: float) -> None:
    if DRY_RUN:
        return
    write_results(
        "e2e_decode", rows,
        ["B", "ctx", "variant", "ms_per_step", "tokens_per_s", "x_floor", "speedup_vs_inductor",
         "first_call_s", "cold_compile", "max_logit_diff_vs_eager", "fused"],
        title=f"HF Llama-3-8B architecture ({LAYERS} layers), StaticCache decode",
        notes=(f"Floor: weights ({weight_bytes / 1e9:.2f} GB without embeddings) + KV cache read once "
               f"at the measured copy bandwidth {bw:.0f} GB/s. first_call_s: wall time of the first "
               "decode call, compile included (cold caches where cold_compile). speedup_vs_inductor: against Inductor "
               "in the same mode."),
    )


def main() -> None:
    from hf_models import make_static_cache

    import attnfuse

    torch.manual_seed(0)
    model, cfg = build(LAYERS)
    bw = float("nan") if DRY_RUN else copy_bandwidth_gbps()
    weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)
    rows = []
    for batch, ctx in POINTS:
        cache = make_static_cache(model, batch_size=batch, max_cache_len=ctx)
        kv_bytes = sum(l.keys.numel() * l.keys.element_size() * 2 for l in cache.layers)
        floor_ms = (weight_bytes + kv_bytes) / (bw * 1e9) * 1e3
        variants = {
            "eager": lambda: model.forward,
            "inductor": lambda: torch.compile(model.forward),
            "attnfuse": lambda: torch.compile(model.forward, backend="attnfuse"),
            "attnfuse[op calls]": lambda: torch.compile(model.forward, backend="attnfuse",
                                                        options={"inline_kernels": False}),
        }
        if not DRY_RUN:
            variants["inductor+cg"] = lambda: torch.compile(model.forward, mode="reduce-overhead")
            variants["attnfuse+cg"] = lambda: torch.compile(model.forward, backend="attnfuse",
                                                            options={"mode": "reduce-overhead"})
        ref_logits = None
        result = {}
        for name, make in variants.items():
            torch._dynamo.reset()
            cold = (batch, ctx) == POINTS[0]
            if cold:  # compile-time point: nothing cached from any earlier compile
                # no space in the path: Inductor's C++ build shlex-splits an unquoted command line
                tag = "".join(c if c.isalnum() else "_" for c in name)
                for var in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
                    os.environ[var] = tempfile.mkdtemp(prefix=f"attnfuse_e2e_{tag}_")
            with torch.no_grad(), attnfuse.collect_reports() as report:
                try:
                    times, logits, first_s = decode_times(make(), cache, batch, ctx, cfg.vocab_size)
                except Exception as exc:  # report and go on: one variant must not sink the table
                    print(f"B={batch} ctx={ctx} {name}: FAILED {type(exc).__name__}: {exc}", flush=True)
                    continue
            med = statistics.median(times)
            if ref_logits is None:
                ref_logits = logits
            err = (logits - ref_logits).abs().max().item()
            result[name] = med
            row = dict(B=batch, ctx=ctx, variant=name, ms_per_step=med, tokens_per_s=batch * 1e3 / med,
                       floor_ms=floor_ms, x_floor=med / floor_ms, first_call_s=first_s, cold_compile=cold,
                       max_logit_diff_vs_eager=err, logits_ok=err <= LOGIT_TOL,
                       fused=", ".join(f"{k}={v}" for k, v in report.counts.items() if v),
                       copy_gbps=bw, layers=LAYERS)
            rows.append(row)
            print(f"B={batch:3d} ctx={ctx:6d} {name:12s} {med:8.3f} ms  x{med / floor_ms:5.2f} floor  "
                  f"first {first_s:6.1f} s  logit diff {err:.3g}  {row['fused']}", flush=True)
        for r in rows:
            if r["B"] == batch and r["ctx"] == ctx:
                base = result.get("inductor+cg" if r["variant"].endswith("+cg") else "inductor")
                r["speedup_vs_inductor"] = base / r["ms_per_step"] if base else float("nan")
        del cache
        if not DRY_RUN:
            torch.cuda.empty_cache()
        save(rows, weight_bytes, bw)  # after every point: a cut-off run keeps what it measured


if __name__ == "__main__":
    main()
