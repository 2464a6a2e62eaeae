"""Host (CPU-side) cost of one call of each attnfuse op, and where a compiled decode step spends it.

Decode without CUDA graphs is launch-bound at small batch: what counts there is the
time the host needs to issue a call, not the kernel. This measures, with no
synchronization inside the timed loop (GPU work queues up asynchronously):

* each op through ``torch.ops.attnfuse`` (dispatch, validation, launch) and through its
  Triton launcher directly, at Llama-3-8B decode shapes (B=1, 32 q / 8 kv heads,
  head_dim 128, bf16, static cache of ``CTX``);
* baselines: an SDPA call and one elementwise op;
* one compiled 2-layer decode step of the HF model, no CUDA graphs, issue time (host)
  and wall time: ``attnfuse`` (kernels launched by Inductor's code), ``attnfuse`` with
  ``inline_kernels`` off (op calls), and plain Inductor; a torch.profiler table of the
  first: the ops with the largest self CPU time.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from common import host_us, write_results  # noqa: E402

CTX = 4096
CALLS = 200
PASSES = 3
#: compiled decode steps: blocks of STEPS_PER_BLOCK steps, the median block counts
BLOCKS, STEPS_PER_BLOCK = 7, 20
HQ, HKV, D = 32, 8, 128


def _add_probe_cases(cases: dict, args: tuple, rope_args: tuple) -> None:
    """Where the op's own dispatch time goes: the same Python body behind a plain
    ``torch.library.Library`` registration, and called directly."""
    from attnfuse.custom_ops import grouped_decode as gd
    from attnfuse.custom_ops import rope_write_kv as rw

    lib = torch.library.Library("attnfuse_probe", "DEF")
    lib.define(str(torch.ops.attnfuse.grouped_decode.default._schema).replace(
        "attnfuse::grouped_decode", "gd"))
    lib.impl("gd", gd.grouped_decode_op._init_fn if hasattr(gd.grouped_decode_op, "_init_fn")
             else gd.grouped_decode_op, "CUDA")
    _add_probe_cases.lib = lib  # keep the registration alive
    body = gd.grouped_decode_op._init_fn
    cases["grouped_decode python body (no dispatch)"] = lambda: body(*args)
    cases["grouped_decode via plain Library op"] = lambda: torch.ops.attnfuse_probe.gd(*args)
    rbody = rw.rope_write_kv._init_fn
    cases["rope_write_kv python body (no dispatch)"] = lambda: rbody(*rope_args)
    import cProfile
    import io
    import pstats

    def profile(name, fn):
        for _ in range(10):
            fn()
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(200):
            fn()
        pr.disable()
        out = io.StringIO()
        pstats.Stats(pr, stream=out).sort_stats("tottime").print_stats(18)
        print(f"---- cProfile: {name} (200 calls)\n" + out.getvalue()[-3500:], flush=True)

    profile("grouped_decode op", lambda: torch.ops.attnfuse.grouped_decode(*args))
    profile("rope_write_kv op", lambda: torch.ops.attnfuse.rope_write_kv(*rope_args))


def main() -> None:
    from attnfuse.custom_ops import grouped_decode as gd
    from attnfuse.custom_ops import rope_write_kv as rw
    from attnfuse.custom_ops.kernels.grouped_decode import grouped_decode_kernel

    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(1, HQ, D, device=dev, dtype=dt)
    kc = torch.randn(1, HKV, CTX, D, device=dev, dtype=dt)
    vc = torch.randn(1, HKV, CTX, D, device=dev, dtype=dt)
    mask = torch.ones(1, CTX, device=dev, dtype=torch.bool)
    args = (q, kc, vc, None, None, mask, D ** -0.5, 0.0, -1, None, None, -1)
    qs = torch.randn(1, 1, HQ, D, device=dev, dtype=dt)
    ks = torch.randn(1, 1, HKV, D, device=dev, dtype=dt)
    vs = torch.randn(1, 1, HKV, D, device=dev, dtype=dt)
    cos = torch.randn(1, 1, D, device=dev, dtype=dt)
    sin = torch.randn(1, 1, D, device=dev, dtype=dt)
    idx = torch.tensor([CTX - 1], device=dev)
    rope_args = (qs, ks, vs, cos, sin, None, kc, vc, idx, "static", D, "neox", None, None, False)
    q4, k4 = q[:, :, None], kc.repeat_interleave(HQ // HKV, 1)
    x = torch.randn(1024, device=dev)
    rows = []
    cases = {
        "grouped_decode op": lambda: torch.ops.attnfuse.grouped_decode(*args),
        "grouped_decode op [slow launch]": lambda: torch.ops.attnfuse.grouped_decode(*args),
        "grouped_decode validate only": lambda: gd.validate(*args),
        # the op's body without its remembered launches: validation and planning every call
        "grouped_decode op body, planned every call": lambda: (gd.validate(*args), gd._kernel(*args)),
        "rope_write_kv op body, planned every call": lambda: (rw.validate(*rope_args[:-1]), rw._kernel(*rope_args)),
        "grouped_decode launcher": lambda: grouped_decode_kernel(q, kc, vc, mask=mask, scale=D ** -0.5),
        "grouped_decode launcher [slow launch]": lambda: grouped_decode_kernel(
            q, kc, vc, mask=mask, scale=D ** -0.5),
        "rope_write_kv op": lambda: torch.ops.attnfuse.rope_write_kv(*rope_args),
        "rope_write_kv op [slow launch]": lambda: torch.ops.attnfuse.rope_write_kv(*rope_args),
        "rope_write_kv launcher": lambda: rw.kernel(*rope_args),
        "rope_write_kv launcher [slow launch]": lambda: rw.kernel(*rope_args),
        "baseline: SDPA (MHA over repeated K/V)": lambda: torch.nn.functional.scaled_dot_product_attention(
            q4, k4, k4),
        "baseline: one add": lambda: x.add(1),
    }
    _add_probe_cases(cases, args, rope_args)
    # the host drifts (rows measured first read up to 2x higher on H100 hosts): PASSES
    # passes over all cases, order reversed every other pass; the fastest pass counts
    best: dict[str, float] = {}
    for p in range(PASSES):
        for name in (list(cases) if p % 2 == 0 else list(reversed(cases))):
            os.environ["ATTNFUSE_FAST_LAUNCH"] = "0" if name.endswith("[slow launch]") else "1"
            try:
                us = host_us(cases[name], CALLS)
            except Exception as exc:
                print(f"{name}: FAILED {type(exc).__name__}: {exc}")
                continue
            best[name] = min(us, best.get(name, float("inf")))
            print(f"pass {p} {name:45s} {us:8.1f} us host", flush=True)
    os.environ["ATTNFUSE_FAST_LAUNCH"] = "1"
    rows += [dict(call=name, host_us=us) for name, us in best.items()]

    from hf_models import build_from_config, cache_arg, make_static_cache, tiny_config

    import attnfuse  # noqa: F401

    cfg = tiny_config("llama", num_hidden_layers=2, hidden_size=4096, intermediate_size=14336,
                      num_attention_heads=HQ, num_key_value_heads=HKV, head_dim=D, vocab_size=32000)
    model = build_from_config(cfg, dtype=dt, device=dev)
    cache = make_static_cache(model, batch_size=1, max_cache_len=CTX)
    for layer in cache.layers:
        layer.cumulative_length.fill_(CTX // 2)
    tok = torch.zeros(1, 1, dtype=torch.long, device=dev)
    variants = {
        "attnfuse": lambda: torch.compile(model.forward, backend="attnfuse"),
        "attnfuse, op calls (inline_kernels off)": lambda: torch.compile(
            model.forward, backend="attnfuse", options={"inline_kernels": False}),
        "Inductor": lambda: torch.compile(model.forward),
    }
    prof = None
    with torch.no_grad():
        # an untimed compile first: the first compile of a process starts Inductor's
        # worker pool, whose start-up competes with the timed steps that follow it
        torch._dynamo.reset()
        warm = torch.compile(model.forward)
        warm(input_ids=tok, position_ids=torch.full((1, 1), CTX // 2, device=dev, dtype=torch.long),
             **cache_arg(cache), use_cache=True, logits_to_keep=1)
        time.sleep(5)
        for name, make in variants.items():
            torch._dynamo.reset()  # else the frame compiled for the previous variant is reused
            fwd = make()

            def step(i: int, fwd=fwd):
                pos = torch.full((1, 1), CTX // 2 + i, device=dev, dtype=torch.long)
                return fwd(input_ids=tok, position_ids=pos, **cache_arg(cache), use_cache=True,
                           logits_to_keep=1)

            for i in range(8):
                step(i)
            torch.cuda.synchronize()
            issue, wall = [], []
            for b in range(BLOCKS):
                t0 = time.perf_counter()
                for i in range(STEPS_PER_BLOCK):
                    step(8 + i)
                issue.append((time.perf_counter() - t0) * 1e3 / STEPS_PER_BLOCK)
                torch.cuda.synchronize()
                wall.append((time.perf_counter() - t0) * 1e3 / STEPS_PER_BLOCK)
            host_ms, wall_ms = statistics.median(issue), statistics.median(wall)
            print(f"{name} 2-layer decode step: host {host_ms:.2f} ms issue, {wall_ms:.2f} ms wall", flush=True)
            rows.append(dict(call=f"compiled 2-layer HF decode step, {name} (issue time)", host_us=host_ms * 1e3))
            rows.append(dict(call=f"compiled 2-layer HF decode step, {name} (wall)", host_us=wall_ms * 1e3))
            if prof is None:
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                    for i in range(5):
                        step(30 + i)
                    torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    write_results("host_overhead", rows, ["call", "host_us"],
                  title="Host time per call (no CUDA graphs)",
                  notes=f"Ops: median of {CALLS} calls, no synchronization inside the loop, the "
                        f"fastest of {PASSES} passes (order alternating); decode shapes "
                        f"B=1, {HQ} q / {HKV} kv heads, head_dim {D}, bf16, static cache {CTX}. "
                        f"Compiled steps: median of {BLOCKS} blocks of {STEPS_PER_BLOCK} steps, "
                        "after an untimed compile.")


if __name__ == "__main__":
    main()
