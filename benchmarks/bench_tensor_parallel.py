"""Tensor-parallel decode: the example's Llama-style model on TP ranks, eager vs Inductor vs attnfuse.

Run with ``torchrun`` (NCCL on GPUs, gloo on CPU)::

    torchrun --nproc-per-node 2 benchmarks/bench_tensor_parallel.py
    torchrun --nproc-per-node 1 benchmarks/bench_tensor_parallel.py   # TP=1 rows, same table

Started with plain ``python`` (as ``attnfuse bench`` does), it runs itself under
``torchrun`` with ``TP_WORLD`` ranks (default: 2, or the GPU count if lower).

Two parts, both on every rank:

* **check** (small float32 model): each rank builds the single-process model, runs it,
  then runs its own shard compiled with ``backend="attnfuse"`` (Inductor, and with
  ``mode="reduce-overhead"``). The rows record the per-rank head counts, what fused, whether
  the greedy tokens are the same and the largest logit difference against the
  single-process model. Float32 matmuls in Triton's ``tl.dot`` use TF32 on GPUs, so the
  tolerance is TF32's, relative to the largest logit.
* **bench** (Llama-3-8B layer sizes, bf16, ``TP_LAYERS`` layers, random weights built on
  the device): decode steps at the end of a full static cache of ``ctx`` positions, for
  ``eager``, ``inductor``, ``attnfuse`` and the two ``+cg`` (CUDA graph) variants. A step's
  time is the slowest rank's median; the floor is the bytes one rank must read per step
  (its weight shard, the replicated LM head and its KV-cache shard) over the measured copy
  bandwidth, all-reduces not counted.

Check rows go to ``results/tensor_parallel_check``, decode rows to ``results/tensor_parallel``;
rows for other TP sizes already there are kept, so the TP=1 and TP=2 runs share the tables. Environment: ``TP_POINTS`` (``BxCTX,...``), ``TP_STEPS``,
``TP_LAYERS``, ``TP_RESULT`` (result name); ``TP_DRY_RUN=1`` runs tiny shapes on CPU (no result file).
"""

from __future__ import annotations

import faulthandler
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from common import RESULTS_DIR, copy_bandwidth_gbps, env_info, write_results  # noqa: E402
from tensor_parallel import TPConfig, TPModel, build_full, greedy, shard  # noqa: E402

DRY_RUN = os.environ.get("TP_DRY_RUN") == "1"
POINTS = [tuple(int(v) for v in p.split("x")) for p in
          os.environ.get("TP_POINTS", "1x64,2x64" if DRY_RUN else "1x32768,16x32768").split(",")]
STEPS = int(os.environ.get("TP_STEPS", "3" if DRY_RUN else "20"))
LAYERS = int(os.environ.get("TP_LAYERS", "4"))
#: decode steps before timing: compilation, CUDA-graph recording, autotuning
WARMUP_STEPS = 4
CHECK_STEPS = 4
#: float32 logits against the single-process model, relative to the largest logit:
#: TF32 in ``tl.dot`` on GPUs (10-bit mantissa) over a few layers; exact-order float32 on CPU
CHECK_REL_TOL = 5e-3
#: bf16 logits of compiled variants against eager, relative to the largest logit
BENCH_REL_TOL = 5e-2
LLAMA3_8B_LAYER = dict(hidden=4096, intermediate=14336, heads=32, kv_heads=8, head_dim=128, vocab=128256)
if DRY_RUN:
    LLAMA3_8B_LAYER = dict(hidden=256, intermediate=512, heads=8, kv_heads=2, head_dim=32, vocab=512)
#: seconds the process-group teardown may take before the stacks are dumped
TEARDOWN_S = 60
RESULT = os.environ.get("TP_RESULT", "tensor_parallel")


def _gather(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _variants(cuda: bool) -> dict[str, dict]:
    """name -> ``patch_model`` / ``torch.compile`` arguments (``None``: eager)."""
    v = {"eager": None, "inductor": {}, "attnfuse": {"backend": "attnfuse"}}
    if cuda:
        v["inductor+cg"] = {"mode": "reduce-overhead"}
        v["attnfuse+cg"] = {"backend": "attnfuse", "mode": "reduce-overhead"}
    elif DRY_RUN:
        v["attnfuse"] = {"backend": "attnfuse_eager"}
    return v


def _compile(model: TPModel, kwargs: dict | None) -> None:
    import attnfuse

    torch._dynamo.reset()
    if kwargs is None:
        return
    if "backend" in kwargs:
        attnfuse.patch_model(model, **kwargs)
    else:
        model.forward = torch.compile(model.forward, **kwargs)


def _uncompile(model: TPModel) -> None:
    import attnfuse

    attnfuse.unpatch_model(model)
    model.__dict__.pop("forward", None)


def check(rank: int, world: int, dev: torch.device) -> list[dict]:
    """Sharded + compiled against the single-process model, float32, small shapes."""
    import attnfuse

    cfg = TPConfig()
    full = build_full(cfg).to(dev)
    prompt = torch.randint(0, cfg.vocab, (cfg.batch, 8), generator=torch.Generator().manual_seed(1)).to(dev)
    with torch.no_grad():
        want_tokens, want_logits = greedy(full, prompt, CHECK_STEPS)
        part = shard(full.cpu(), rank, world).to(dev)
    del full
    rows = []
    for name, kwargs in _variants(dev.type == "cuda").items():
        if kwargs is None or "backend" not in kwargs:
            continue
        _compile(part, kwargs)
        with torch.no_grad():
            tokens, logits = greedy(part, prompt, CHECK_STEPS)
        report = attnfuse.report_of(part)
        scale = max(want_logits.abs().max().item(), 1.0)
        err = (logits.float() - want_logits.float()).abs().max().item() / scale
        rows.append(dict(part="check", TP=world, rank=rank, variant=name, dtype="float32",
                         q_heads=part.blocks[0].attn.heads, kv_heads=part.blocks[0].attn.kv_heads,
                         layers=cfg.layers, fused=", ".join(f"{k}={v}" for k, v in report.counts.items() if v),
                         rope_kv_write=report.counts.get("rope_kv_write", 0),
                         grouped_decode=report.counts.get("grouped_decode", 0),
                         same_tokens=torch.equal(tokens, want_tokens), rel_logit_diff=err,
                         logits_ok=err <= CHECK_REL_TOL))
        _uncompile(part)
    return rows


def _step_ms(model: TPModel, tok: torch.Tensor, pos: torch.Tensor, cuda: bool) -> tuple[float, torch.Tensor]:
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        logits = model(tok, pos)
        end.record()
        end.synchronize()
        return start.elapsed_time(end), logits
    t0 = time.perf_counter()
    logits = model(tok, pos)
    return (time.perf_counter() - t0) * 1e3, logits


def decode(model: TPModel, cfg: TPConfig, dev: torch.device) -> tuple[float, torch.Tensor, float]:
    """(median ms per step, last logits, first-call seconds) at the end of a full cache."""
    gen = torch.Generator(device=dev).manual_seed(2)
    for blk in model.blocks:  # same cache contents for every variant
        blk.attn.k_cache.normal_(generator=gen)
        blk.attn.v_cache.normal_(generator=gen)
    tok = torch.randint(0, cfg.vocab, (cfg.batch, 1), device=dev, generator=gen)
    pos = torch.full((1,), cfg.max_len - 1, device=dev)
    cuda = dev.type == "cuda"
    times = []
    t0 = time.perf_counter()
    for i in range(WARMUP_STEPS + STEPS):
        dist.barrier()
        ms, logits = _step_ms(model, tok, pos, cuda)
        if i == 0:
            first_s = time.perf_counter() - t0
        if i >= WARMUP_STEPS:
            times.append(ms)
    return statistics.median(times), logits.float().clone(), first_s


def bench(rank: int, world: int, dev: torch.device) -> list[dict]:
    import attnfuse

    cuda = dev.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    bw = copy_bandwidth_gbps() if cuda else float("nan")
    rows = []
    for batch, ctx in POINTS:
        cfg = replace(TPConfig(), layers=LAYERS, batch=batch, max_len=ctx, **LLAMA3_8B_LAYER)
        torch.manual_seed(100 + rank)
        with torch.device(dev):
            model = TPModel(cfg, world).eval().to(dtype)
        weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if not n.startswith("embed"))
        kv = sum(b.attn.k_cache.numel() * b.attn.k_cache.element_size() * 2 for b in model.blocks)
        floor_ms = (weights + kv) / (bw * 1e9) * 1e3
        ref = None
        for name, kwargs in _variants(cuda).items():
            _compile(model, kwargs)
            with torch.no_grad(), attnfuse.collect_reports() as report:
                try:
                    ms, logits, first_s = decode(model, cfg, dev)
                    failed = ""
                except Exception as exc:  # one variant must not sink the table
                    ms, logits, first_s, failed = float("nan"), None, float("nan"), f"{type(exc).__name__}: {exc}"
            _uncompile(model)
            failed = [f for f in _gather(failed) if f]
            if failed:
                if rank == 0:
                    print(f"B={batch} ctx={ctx} {name}: FAILED {failed[0]}", flush=True)
                continue
            ms = max(_gather(ms))  # the slowest rank sets the step
            if ref is None:
                ref = logits
            err = (logits - ref).abs().max().item() / max(ref.abs().max().item(), 1.0)
            row = dict(part="bench", TP=world, B=batch, ctx=ctx, variant=name, ms_per_step=ms,
                       tokens_per_s=batch * 1e3 / ms, floor_ms=floor_ms, x_floor=ms / floor_ms,
                       first_call_s=first_s, rel_logit_diff_vs_eager=max(_gather(err)),
                       fused=", ".join(f"{k}={v}" for k, v in report.counts.items() if v),
                       layers=LAYERS, copy_gbps=bw)
            row["logits_ok"] = row["rel_logit_diff_vs_eager"] <= BENCH_REL_TOL
            rows.append(row)
            if rank == 0:
                print(f"TP={world} B={batch:3d} ctx={ctx:6d} {name:12s} {ms:8.3f} ms/step "
                      f"{row['tokens_per_s']:8.1f} tok/s  x{row['x_floor']:5.2f} floor  first {first_s:6.1f} s  "
                      f"logit diff {row['rel_logit_diff_vs_eager']:.3g}  {row['fused']}", flush=True)
        base = {r["variant"]: r["ms_per_step"] for r in rows if r["B"] == batch and r["ctx"] == ctx}
        for r in rows:
            if r["B"] == batch and r["ctx"] == ctx:
                b = base.get("inductor+cg" if r["variant"].endswith("+cg") else "inductor")
                r["speedup_vs_inductor"] = b / r["ms_per_step"] if b else float("nan")
        del model
        if cuda:
            torch.cuda.empty_cache()
    return rows


def _merge(name: str, rows: list[dict], world: int) -> list[dict]:
    """Rows for other TP sizes already in ``results/<name>.json``, then ``rows`` (env stamped)."""
    path = RESULTS_DIR / f"{name}.json"
    kept = [r for r in json.loads(path.read_text()) if r.get("TP") != world] if path.exists() else []
    env = env_info()
    return kept + [{**env, **r} for r in rows]


def save(checks: list[dict], rows: list[dict], world: int) -> None:
    checks = sorted(_merge(f"{RESULT}_check", checks, world), key=lambda r: (r["TP"], r["rank"], r["variant"]))
    write_results(f"{RESULT}_check", checks,
                  ["TP", "rank", "variant", "q_heads", "kv_heads", "fused", "same_tokens", "rel_logit_diff",
                   "logits_ok"],
                  title="Tensor-parallel check: each rank's compiled shard against the single-process model",
                  notes=("Float32, the example's small model, prefill + decode steps. `rel_logit_diff` is "
                         "relative to the largest logit; tolerance " f"{CHECK_REL_TOL} (TF32 in `tl.dot` on GPUs)."))
    rows = sorted(_merge(RESULT, rows, world), key=lambda r: (r["TP"], r["B"], r["ctx"]))
    write_results(RESULT, rows,
                  ["TP", "B", "ctx", "variant", "ms_per_step", "tokens_per_s", "floor_ms", "x_floor",
                   "speedup_vs_inductor", "first_call_s", "rel_logit_diff_vs_eager", "logits_ok", "fused"],
                  title="Tensor-parallel decode (example Llama-style model)",
                  notes=(f"{LAYERS} Llama-3-8B-sized layers, bf16, the KV cache full to `ctx`; ms/step is the "
                         "slowest rank's median; the floor is one rank's bytes per step (weight shard, "
                         "replicated LM head, KV-cache shard) over the copy bandwidth, all-reduces not counted; "
                         "`speedup_vs_inductor` compares against Inductor in the same mode."))


def relaunch() -> int:
    """Started without ``torchrun`` (``attnfuse bench tensor_parallel``): run under it."""
    cuda = torch.cuda.is_available() and not DRY_RUN
    world = int(os.environ.get("TP_WORLD", min(2, torch.cuda.device_count()) if cuda else 2))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}", __file__]
    print("bench_tensor_parallel:", " ".join(cmd[1:]), flush=True)
    return subprocess.call(cmd)


def main() -> int:
    if "LOCAL_RANK" not in os.environ:
        return relaunch()
    cuda = torch.cuda.is_available() and not DRY_RUN
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(dev)
    try:
        checks = [r for rs in _gather(check(rank, world, dev)) for r in rs]
        if rank == 0:
            for r in checks:
                print(f"check TP={world} rank {r['rank']} {r['variant']}: heads {r['q_heads']}/{r['kv_heads']} "
                      f"{r['fused']}  same tokens {r['same_tokens']}  rel logit diff {r['rel_logit_diff']:.3g}",
                      flush=True)
        rows = bench(rank, world, dev)
        if rank == 0 and not DRY_RUN:
            save(checks, rows, world)
        ok = all(r["logits_ok"] and r["same_tokens"] for r in checks) and all(r["logits_ok"] for r in rows)
        print(f"rank {rank}: done at {time.strftime('%X')}", flush=True)
    finally:
        # NCCL's communicator destruction hangs while captured CUDA graphs that hold its
        # collectives are alive (pytorch/pytorch#115388): free them first
        torch._dynamo.reset()
        if cuda:
            from torch._inductor.cudagraph_trees import reset_cudagraph_trees

            reset_cudagraph_trees()
            gc.collect()
            torch.cuda.synchronize()
        # a teardown that still hangs must not hold the GPUs: dump every thread's stack and exit
        faulthandler.dump_traceback_later(TEARDOWN_S, exit=True)
        dist.barrier()
        dist.destroy_process_group()
        faulthandler.cancel_dump_traceback_later()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
