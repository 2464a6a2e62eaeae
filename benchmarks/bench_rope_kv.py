"""RoPE + paged KV-cache write: ``attnfuse::rope_write_kv`` against its baselines.

Llama-3-8B attention shapes (32 q heads, 8 kv heads, head_dim 128, bf16), a paged NHD
cache with page 16, T = 1 ... 32768 new tokens (decode batches up to 128, prefill chunks
of 1024 tokens from 1024 on). Variants, each timed in the same run on the same data:

``attnfuse``        the op (one launch), cos/sin read from the fp32 cos/sin cache by position
``attnfuse_pass``   torch.compile of the unfused code with the ``rope_kv_write`` pass
``flashinfer+ip``   FlashInfer ``apply_rope_with_cos_sin_cache_inplace`` + two ``index_put_``
``inductor``        torch.compile (Inductor) of the unfused torch code
``attnfuse_fp8``    the op writing fp8 e4m3 caches (scale 1/k_scale convention: x / scale);
                    ``attnfuse_fp8_wN``: its kernel launched directly with num_warps=N
``flashinfer_fp8``  FlashInfer ``rope_quantize_fp8_append_paged_kv_cache`` (also writes q in fp8)

CUDA graphs for T <= 1024 (launch-bound sizes). Larger T is timed without graphs (the
fastest of ``NO_GRAPH_PASSES`` passes over all variants: the shared hosts add noise, never
speed) and with graphs; without graphs ``host_us`` is the median host time of one call. Effective bandwidth counts every byte
read and written once: q in and out, k and v in, k and v into the cache, positions and
slots, and one fp32 cos/sin row per token. Before timing, each variant is checked on
random data against the plain-torch reference (fp32 math).

Run: ``python benchmarks/bench_rope_kv.py`` (on a GPU machine).
"""

from __future__ import annotations

import math
import statistics
import sys
import time

import torch

from common import bench_us, copy_bandwidth_gbps, env_info, host_us, write_results

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM = 32, 8, 128  # Llama-3-8B
PAGE = 16  # vLLM's default block size
TOKENS = (1, 16, 128, 1024, 8192, 32768)
#: T at and below which timings replay a CUDA graph (launch-bound sizes)
GRAPH_MAX_TOKENS = 1024
#: decode batches (one token per request) up to this T; prefill chunks above it
DECODE_MAX_TOKENS = 128
PREFILL_CHUNK = 1024
#: context already in the cache of each decode request
DECODE_CONTEXT = 512
MAX_POSITION = 8192
FP8 = torch.float8_e4m3fn
FP8_SCALE = 0.5  # cache = x / scale
#: passes over the variants without CUDA graphs (each variant reports its fastest pass)
NO_GRAPH_PASSES = 3
#: num_warps values tried for the kernel sweep
SWEEP_WARPS = (1, 2, 4, 8)
#: stop starting new compiled variants once the run has taken this long (device budget)
COMPILE_DEADLINE_S = 400


def make_batch(T: int, device: str = "cuda", seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    if T <= DECODE_MAX_TOKENS:
        batch, new, ctx = T, 1, DECODE_CONTEXT
    else:
        batch, new, ctx = T // PREFILL_CHUNK, PREFILL_CHUNK, 0
    pages_per_req = math.ceil((ctx + new) / PAGE)
    num_pages = batch * pages_per_req
    kv_indices = torch.randperm(num_pages, generator=g).int()
    kv_indptr = (torch.arange(batch + 1) * pages_per_req).int()
    batch_idx = torch.arange(batch).repeat_interleave(new)
    pos = (ctx + torch.arange(new)).repeat(batch)
    page_ids = kv_indices[(kv_indptr[batch_idx] + pos // PAGE).long()].long()
    slots = page_ids * PAGE + pos % PAGE
    q = torch.randn(T, NUM_Q_HEADS, HEAD_DIM, generator=g).to(torch.bfloat16)
    k = torch.randn(T, NUM_KV_HEADS, HEAD_DIM, generator=g).to(torch.bfloat16)
    v = torch.randn(T, NUM_KV_HEADS, HEAD_DIM, generator=g).to(torch.bfloat16)
    inv = 1.0 / 10000 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)
    ang = torch.outer(torch.arange(MAX_POSITION).float(), inv)
    cos_sin = torch.cat([ang.cos(), ang.sin()], -1)
    cache_shape = (num_pages, PAGE, NUM_KV_HEADS, HEAD_DIM)
    d = dict(q=q, k=k, v=v, positions=pos, slots=slots, cos_sin=cos_sin,
             k_cache=torch.randn(cache_shape, generator=g).to(torch.bfloat16),
             v_cache=torch.randn(cache_shape, generator=g).to(torch.bfloat16),
             kv_indices=kv_indices, kv_indptr=kv_indptr, batch_idx=batch_idx.int(),
             pos_in_req=pos.int())
    return {n: t.to(device) for n, t in d.items()}


def unfused(q, k, v, positions, slots, cos_sin, k_cache, v_cache):
    """The torch code serving engines run natively: gather, rotate-half, two writes."""
    cos, sin = cos_sin.index_select(0, positions).chunk(2, dim=-1)
    cos = cos.unsqueeze(-2).to(q.dtype)
    sin = sin.unsqueeze(-2).to(q.dtype)

    def rot(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    q, k = rot(q), rot(k)
    k_cache.view(-1, NUM_KV_HEADS, HEAD_DIM)[slots] = k
    v_cache.view(-1, NUM_KV_HEADS, HEAD_DIM)[slots] = v
    return q


def ours(b, k_cache=None, v_cache=None, scale=None, num_warps=None):
    half = HEAD_DIM // 2
    cos, sin = b["cos_sin"][:, :half], b["cos_sin"][:, half:]
    kc = b["k_cache"] if k_cache is None else k_cache
    vc = b["v_cache"] if v_cache is None else v_cache
    if num_warps is None:
        return torch.ops.attnfuse.rope_write_kv(
            b["q"], b["k"], b["v"], cos, sin, b["positions"], kc, vc, b["slots"], "paged_nhd",
            HEAD_DIM, "neox", scale, scale, False)[0]
    from attnfuse.custom_ops.rope_write_kv import kernel

    return kernel(b["q"], b["k"], b["v"], cos, sin, b["positions"], kc, vc, b["slots"],
                  "paged_nhd", HEAD_DIM, "neox", scale, scale, False, num_warps=num_warps)[0]


def flashinfer_index_put(b):
    import flashinfer

    T = b["q"].shape[0]
    flashinfer.apply_rope_with_cos_sin_cache_inplace(
        b["positions"], b["q"].view(T, -1), b["k"].view(T, -1), HEAD_DIM, b["cos_sin"], is_neox=True)
    b["k_cache"].view(-1, NUM_KV_HEADS, HEAD_DIM)[b["slots"]] = b["k"]
    b["v_cache"].view(-1, NUM_KV_HEADS, HEAD_DIM)[b["slots"]] = b["v"]
    return b["q"]


def flashinfer_fp8(b, k_cache, v_cache):
    from flashinfer.rope import rope_quantize_fp8_append_paged_kv_cache

    return rope_quantize_fp8_append_paged_kv_cache(
        b["q"], b["k"], None, None, b["v"], b["cos_sin"], b["positions"], (k_cache, v_cache),
        b["kv_indices"], b["kv_indptr"], b["batch_idx"], b["pos_in_req"], is_neox=True,
        quantize_dtype=FP8, quant_scale_q=1.0, quant_scale_kv=1.0 / FP8_SCALE, page_size=PAGE,
        kv_layout="NHD")


def bytes_moved(T: int, cache_bytes: int = 2, q_out_bytes: int = 2) -> int:
    q = NUM_Q_HEADS * HEAD_DIM
    kv = NUM_KV_HEADS * HEAD_DIM
    per_token = q * 2 + q * q_out_bytes + 2 * kv * 2 + 2 * kv * cache_bytes + 8 + 8 + HEAD_DIM * 4
    return T * per_token


def check(b) -> dict[str, float]:
    """Max errors of every variant against the reference on the same random data."""
    from attnfuse.custom_ops.rope_write_kv import reference

    half = HEAD_DIM // 2
    args = lambda kc, vc, scale: [b["q"], b["k"], b["v"], b["cos_sin"][:, :half],  # noqa: E731
                                  b["cos_sin"][:, half:], b["positions"], kc, vc, b["slots"],
                                  "paged_nhd", HEAD_DIM, "neox", scale, scale, False]
    rk, rv = b["k_cache"].clone(), b["v_cache"].clone()
    ref_q, _ = reference(*args(rk, rv, None))
    ok, ov = b["k_cache"].clone(), b["v_cache"].clone()
    q = ours(b, ok, ov)
    err = {"q": (q.float() - ref_q.float()).abs().max().item(),
           "k_cache": (ok.float() - rk.float()).abs().max().item(),
           "v_cache": (ov.float() - rv.float()).abs().max().item()}
    scale = torch.tensor(FP8_SCALE, device="cuda")
    fk, fv = torch.empty_like(rk, dtype=FP8), torch.empty_like(rv, dtype=FP8)
    fk.copy_(rk.to(FP8)), fv.copy_(rv.to(FP8))
    rfk, rfv = fk.clone(), fv.clone()
    reference(*args(rfk, rfv, scale))
    ours(b, fk, fv, scale)
    err["fp8_k_mismatch_frac"] = (fk.float() != rfk.float()).float().mean().item()
    err["fp8_v_mismatch_frac"] = (fv.float() != rfv.float()).float().mean().item()
    # FlashInfer computes the same rotation: a cross-check of the convention
    bq = dict(b, q=b["q"].clone(), k=b["k"].clone(), k_cache=b["k_cache"].clone(),
              v_cache=b["v_cache"].clone())
    try:
        fq = flashinfer_index_put(bq)
        err["flashinfer_q_vs_ref"] = (fq.float() - ref_q.float()).abs().max().item()
    except Exception as exc:  # optional dependency
        err["flashinfer_q_vs_ref"] = f"unavailable: {type(exc).__name__}"
    return err


def time_variants(b, T: int, graph: bool, start: float, check_row: dict
                  ) -> tuple[dict[str, float], dict[str, float]]:
    """Median µs of every variant at one size (with or without CUDA graphs) and, without
    graphs, the host time of one call."""
    from attnfuse.passes.backend import AttnfuseBackend

    timings: dict[str, float] = {}
    hosts: dict[str, float] = {}

    def run(name, fn):
        try:
            timings[name] = bench_us(fn, cuda_graph=graph)
            if not graph:
                hosts[name] = host_us(fn)
        except Exception as exc:
            print(f"{name} failed:", type(exc).__name__, exc, flush=True)

    run("attnfuse", lambda: ours(b))
    for w in SWEEP_WARPS:
        run(f"attnfuse_w{w}", lambda w=w: ours(b, num_warps=w))
    bi = dict(b, q=b["q"].clone(), k=b["k"].clone())
    run("flashinfer+ip", lambda: flashinfer_index_put(bi))
    args = (b["q"], b["k"], b["v"], b["positions"], b["slots"], b["cos_sin"], b["k_cache"],
            b["v_cache"])
    if time.time() - start < COMPILE_DEADLINE_S:
        torch._dynamo.reset()  # one backend's compiled code alive at a time
        ind = torch.compile(unfused, dynamic=False)
        run("inductor", lambda: ind(*args))
        torch._dynamo.reset()
        be = AttnfuseBackend({"fusions": ["rope_kv_write"]})
        fused = torch.compile(unfused, backend=be, dynamic=False)
        out = fused(*args)
        fired = be.report.counts.get("rope_kv_write", 0)
        ref = unfused(*[a.clone() for a in args])
        print(f"pass fired {fired}x, max |q - unfused| {(out.float() - ref.float()).abs().max().item():.3g}",
              flush=True)
        check_row["pass_fired"] = fired
        run("attnfuse_pass", lambda: fused(*args))
    scale = torch.tensor(FP8_SCALE, device="cuda")
    fk = torch.empty_like(b["k_cache"], dtype=FP8)
    fv = torch.empty_like(b["v_cache"], dtype=FP8)
    run("attnfuse_fp8", lambda: ours(b, fk, fv, scale))
    for w in SWEEP_WARPS:
        run(f"attnfuse_fp8_w{w}", lambda w=w: ours(b, fk, fv, scale, num_warps=w))
    bf = dict(b, q=b["q"].clone(), k=b["k"].clone())
    run("flashinfer_fp8", lambda: flashinfer_fp8(bf, fk, fv))
    return timings, hosts


def main() -> None:
    # each size compiles the same code again: without the FX graph cache every compile
    # runs the passes, so the report counts what fired (a cache hit reports nothing)
    torch._inductor.config.fx_graph_cache = False
    start = time.time()
    env = env_info()
    print("env", env, flush=True)
    copy_gbps = copy_bandwidth_gbps()
    print(f"copy bandwidth {copy_gbps:.0f} GB/s", flush=True)
    rows, checks = [], []
    for T in TOKENS:
        b = make_batch(T)
        graph = T <= GRAPH_MAX_TOKENS
        err = check(b)
        checks.append({"T": T, **err})
        print("check", T, err, flush=True)
        nbytes = bytes_moved(T)
        modes = (True,) if graph else (False, True)
        for mode in modes:
            passes = [time_variants(b, T, mode, start, checks[-1])
                      for _ in range(1 if mode else NO_GRAPH_PASSES)]
            # the fastest pass of each variant: interference from the shared host only
            # adds time; host_us is the median over passes
            timings = {n: min(p[0][n] for p in passes if n in p[0]) for n in passes[0][0]}
            hosts = {n: statistics.median(p[1][n] for p in passes if n in p[1])
                     for n in passes[0][1]}
            for name, us in timings.items():
                nb = bytes_moved(T, cache_bytes=1) if name.startswith("attnfuse_fp8") else (
                    bytes_moved(T, cache_bytes=1, q_out_bytes=1) if name == "flashinfer_fp8" else nbytes)
                rows.append({"T": T, "variant": name, "cuda_graph": mode, "us": us,
                             "host_us": hosts.get(name, ""),
                             "GB/s": nb / (us * 1e-6) / 1e9, "bytes": nb,
                             "pct_copy_bw": 100 * nb / (us * 1e-6) / 1e9 / copy_gbps,
                             "floor_us": nb / (copy_gbps * 1e9) * 1e6})
            line = "  ".join(f"{n}={us:.1f}" for n, us in timings.items())
            print(f"T={T} graph={mode}: {line}", flush=True)
    notes = (f"Llama-3-8B: {NUM_Q_HEADS} q / {NUM_KV_HEADS} kv heads, head_dim {HEAD_DIM}, bf16, "
             f"paged NHD page {PAGE}. Measured copy bandwidth {copy_gbps:.0f} GB/s; floor_us = "
             f"bytes / copy bandwidth. CUDA graphs for T <= {GRAPH_MAX_TOKENS}. attnfuse_wN: the "
             f"kernel launched directly with num_warps=N (no dispatcher, no validation). Above "
             f"100% of copy bandwidth (T <= 1024): the working set stays in the 50 MB L2 "
             f"across graph replays. T > {GRAPH_MAX_TOKENS} is timed twice: without graphs (as "
             f"issued eagerly; fastest of {NO_GRAPH_PASSES} passes over all variants) and with "
             f"graphs (GPU time alone); host_us (without graphs): median "
             f"host time to issue one call, no synchronization in the loop. A variant whose "
             f"host_us exceeds its kernel time is host-bound when issued eagerly. "
             f"attnfuse_pass: torch.compile with the pass (Inductor launches the kernel, plus "
             f"one prep kernel for the cos/sin gather and the slot wrap). "
             f"fp8: flashinfer also writes q in fp8 (18% fewer bytes); ours writes "
             f"q in bf16, so compare GB/s for equal work. "
             f"Checks (max abs error vs the fp32-math reference, bf16 data): {checks}")
    path = write_results("bench_rope_kv", rows,
                         ["T", "variant", "cuda_graph", "us", "host_us", "GB/s", "pct_copy_bw",
                          "floor_us"],
                         title="RoPE + paged KV write (attnfuse::rope_write_kv)", notes=notes)
    print(open(path).read())
    print(f"total {time.time() - start:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
