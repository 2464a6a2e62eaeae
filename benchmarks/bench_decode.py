"""Decode attention: ``attnfuse::grouped_decode`` (split-KV grouped Triton kernel) vs baselines.

Sections (all by default; pick with flags):

``--check``  bf16 correctness on the GPU against the op's fp32 reference: GQA static with
             an HF-style mask and ragged without one (the SM90 Gluon GQA stage 1), paged
             ragged (incl. length 0), MLA, fp8 with distinct scales, softcap + window.
``--sweep``  kernel variants (BLOCK_N, num_warps, num_stages, BLOCK_H, split count) on a
             few key points; prints the best per point (results/bench_decode_sweep.*).
``--sm90``   the SM90 Gluon MLA stage 1 (``mla_decode_sm90.py``) against the Triton one on
             MLA points at 16 and 128 heads: tile shapes (BLOCK_N, stages) and split
             targets (programs per SM); optional FlashInfer (``--with-flashinfer``)
             (results/bench_decode_sm90.*).
``--table``  the issue's table (results/bench_decode.*):
             GQA 32 q / 8 kv heads, head_dim 128, bf16, page 16, B in {1, 16, 64} x
             context in {1k, 8k, 32k, 128k}: ours (paged; static), ours with one split,
             FlashInfer BatchDecodeWithPagedKVCacheWrapper (tensor cores), torch SDPA
             (enable_gqa=True), HF repeat_kv + SDPA.
             MLA (16 and 128 heads, ckv 512 + kpe 64, page 64), B in {1, 16, 64, 128} x
             context in {4k, 32k, 128k}: ours, ours with one split, FlashInfer
             BatchMLAPagedAttentionWrapper (fa3).

Bytes and floors: GQA reads K and V once: ``B * ctx * Hkv * D * 2 (K,V) * 2 bytes``;
MLA reads the latent row once: ``B * ctx * 576 * 2 bytes`` (V is its first 512 features).
GB/s below is that count over the measured time; the floor is the measured copy
bandwidth. MLA FLOPs: ``2 * B * H * ctx * (576 + 512)``.

Timings: CUDA-graph replays where a call takes under ``GRAPH_BELOW_US`` (launch-bound),
``triton.testing.do_bench`` medians otherwise; random data, never zeros. In the MLA rows
the implementations are timed in ``MLA_ROUNDS`` interleaved rounds (fresh random order
each) and the median is kept: at 128 heads they run compute-bound for up to tens of ms,
and one-after-another timings drifted by up to 12% between identical calls.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import traceback

import torch
from common import bench_us, copy_bandwidth_gbps, write_results

from attnfuse.custom_ops.grouped_decode import reference
from attnfuse.custom_ops.kernels.grouped_decode import (
    _STAGE1,
    choose_num_kv_splits,
    grouped_decode_kernel,
    plan_grouped_decode,
)

#: calls faster than this are timed as CUDA-graph replays (launch overhead would dominate)
GRAPH_BELOW_US = 300.0
#: FlashInfer's recommended float workspace
FI_WORKSPACE_BYTES = 128 * 1024 * 1024
#: leave this much GPU memory free when deciding whether a point fits
MEMORY_HEADROOM_BYTES = 4 * 1024**3
#: bf16 output tolerance against the fp32 reference (one bf16 rounding of O(1) values)
BF16_ATOL = 2e-2

GQA_Q_HEADS, GQA_KV_HEADS, GQA_HEAD_DIM, GQA_PAGE = 32, 8, 128, 16
GQA_BATCHES = (1, 16, 64)
GQA_CONTEXTS = (1024, 8192, 32768, 131072)
MLA_HEADS = (16, 128)
MLA_CKV, MLA_KPE, MLA_PAGE = 512, 64, 64
MLA_BATCHES = (1, 16, 64, 128)
MLA_CONTEXTS = (4096, 32768, 131072)
#: MLA rows time ours, ours with one split, FlashInfer and the Triton stage 1 interleaved
MLA_ROUNDS = 3
#: DeepSeek's softmax scale: qk head dim 192 (128 nope + 64 rope)
MLA_SCALE = 192 ** -0.5

DEV = "cuda"
DT = torch.bfloat16


def timed(fn) -> float:
    us = bench_us(fn, warmup_ms=10, rep_ms=40)
    if us < GRAPH_BELOW_US:
        try:
            us = bench_us(fn, cuda_graph=True)
        except Exception:  # not capturable (host work inside): keep the event timing
            torch.cuda.synchronize()
    return us


def free_bytes() -> int:
    gc.collect()
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info()[0]


# ------------------------------------------------------------------ data
def paged_gqa(batch, ctx, dtype=DT):
    pages_per_seq = ctx // GQA_PAGE
    num_pages = batch * pages_per_seq
    k = torch.randn(num_pages, GQA_PAGE, GQA_KV_HEADS, GQA_HEAD_DIM, device=DEV, dtype=dtype)
    v = torch.randn_like(k)
    # shuffled pages: a real allocator never hands out one contiguous run
    table = torch.randperm(num_pages, device=DEV, dtype=torch.int32).view(batch, pages_per_seq)
    lens = torch.full((batch,), ctx, device=DEV, dtype=torch.int32)
    return k, v, table, lens


def paged_mla(batch, ctx):
    pages_per_seq = ctx // MLA_PAGE
    num_pages = batch * pages_per_seq
    kv = torch.randn(num_pages, MLA_PAGE, MLA_CKV + MLA_KPE, device=DEV, dtype=DT)
    table = torch.randperm(num_pages, device=DEV, dtype=torch.int32).view(batch, pages_per_seq)
    lens = torch.full((batch,), ctx, device=DEV, dtype=torch.int32)
    return kv, table, lens


# ------------------------------------------------------------------ implementations
def ours_gqa(q, k, v, table, lens, **over):
    return lambda: grouped_decode_kernel(q, k, v, block_table=table, seq_lens=lens,
                                         scale=GQA_HEAD_DIM ** -0.5, **over)


def ours_mla(q, kv, table, lens, **over):
    kv4 = kv.unsqueeze(2)
    return lambda: grouped_decode_kernel(q, kv4, None, block_table=table, seq_lens=lens,
                                         scale=MLA_SCALE, v_head_dim=MLA_CKV, **over)


def flashinfer_gqa(q, k, v, table, lens):
    import flashinfer

    batch, pages_per_seq = table.shape
    ws = torch.empty(FI_WORKSPACE_BYTES, dtype=torch.uint8, device=DEV)
    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=True)
    indptr = torch.arange(batch + 1, device=DEV, dtype=torch.int32) * pages_per_seq
    last = torch.full((batch,), GQA_PAGE, device=DEV, dtype=torch.int32)
    w.plan(indptr, table.flatten(), last, GQA_Q_HEADS, GQA_KV_HEADS, GQA_HEAD_DIM, GQA_PAGE,
           q_data_type=DT, kv_data_type=DT)
    return lambda: w.run(q, (k, v))


def flashinfer_mla(q, kv, table, lens, heads):
    import flashinfer
    from flashinfer.mla._batch_mla import MLAPlanMetadata

    batch, pages_per_seq = table.shape
    ws = torch.empty(FI_WORKSPACE_BYTES, dtype=torch.uint8, device=DEV)
    w = flashinfer.BatchMLAPagedAttentionWrapper(ws, backend="fa3")
    meta = MLAPlanMetadata.csr(
        torch.arange(batch + 1, device=DEV, dtype=torch.int32),
        torch.arange(batch + 1, device=DEV, dtype=torch.int32) * pages_per_seq,
        table.flatten().contiguous(), lens.to(torch.int32))
    w.plan(metadata=meta, num_heads=heads, head_dim_ckv=MLA_CKV, head_dim_kpe=MLA_KPE,
           page_size=MLA_PAGE, causal=False, sm_scale=MLA_SCALE, q_data_type=DT,
           kv_data_type=DT)
    return lambda: w.run(query=q, kv_cache=kv)


def sdpa_gqa(q4, ks, vs):
    return lambda: torch.nn.functional.scaled_dot_product_attention(q4, ks, vs, enable_gqa=True)


def hf_repeat_kv_sdpa(q4, ks, vs):
    def run():
        b, h, s, d = ks.shape
        rep = q4.shape[1] // h
        k = ks[:, :, None].expand(b, h, rep, s, d).reshape(b, h * rep, s, d)
        v = vs[:, :, None].expand(b, h, rep, s, d).reshape(b, h * rep, s, d)
        return torch.nn.functional.scaled_dot_product_attention(q4, k, v)
    return run


# ------------------------------------------------------------------ check
def check() -> list[dict]:
    torch.manual_seed(0)
    rows = []

    def compare(name, got, ref_args):
        ref_out, ref_lse = reference(*ref_args)
        out, lse = got[:2]
        err = (out.float() - ref_out.float()).abs().max().item()
        finite = torch.isfinite(ref_lse)
        lse_err = (lse[finite] - ref_lse[finite]).abs().max().item() if finite.any() else 0.0
        ok = err < BF16_ATOL and lse_err < 1e-2 and bool(torch.isfinite(out).all())
        ok = ok and bool((lse[~finite] == float("-inf")).all())
        rows.append({"case": name, "max_abs_err": err, "lse_err": lse_err, "ok": ok})
        verdict = "ok" if ok else "FAIL"
        print(f"check {name:32s} err {err:.2e} lse {lse_err:.2e} {verdict}", flush=True)

    b, hq, hkv, s, d = 4, 32, 8, 1000, 128
    q = torch.randn(b, hq, d, device=DEV, dtype=DT)
    k = torch.randn(b, hkv, s, d, device=DEV, dtype=DT)
    v = torch.randn(b, hkv, s, d, device=DEV, dtype=DT)
    visible_lens = torch.tensor([[900], [1], [500], [1000]], device=DEV)
    keep = torch.arange(s, device=DEV)[None, :] < visible_lens
    additive = torch.where(keep, 0.0, float("-inf")).to(DT)
    for name, mask in (("gqa static bool mask", keep), ("gqa static additive mask", additive)):
        for splits in (None, 1, 7):
            over = {} if splits is None else {"num_kv_splits": splits}
            got = grouped_decode_kernel(q, k, v, mask=mask, scale=d ** -0.5, **over)
            compare(f"{name} splits={got[2].num_kv_splits}", got,
                    (q, k, v, None, None, mask, d ** -0.5, 0.0, -1, None, None, -1))
    lens_s = torch.tensor([0, 1, 777, 1000], device=DEV, dtype=torch.int32)
    for splits in (None, 1, 5):  # no mask: the SM90 Gluon GQA stage 1 where it applies
        over = {} if splits is None else {"num_kv_splits": splits}
        got = grouped_decode_kernel(q, k, v, seq_lens=lens_s, scale=d ** -0.5, **over)
        compare(f"gqa static ragged {got[2].kernel} splits={got[2].num_kv_splits}", got,
                (q, k, v, None, lens_s, None, d ** -0.5, 0.0, -1, None, None, -1))
    kp, vp, table_g, _ = paged_gqa(4, 2048)
    kp[table_g[:, -1].long()] = float("nan")  # poisoned tails past every length below
    lens_g = torch.tensor([0, 1, 1500, 2000], device=DEV, dtype=torch.int32)
    got = grouped_decode_kernel(q, kp, vp, block_table=table_g, seq_lens=lens_g, scale=0.1)
    compare("gqa paged ragged (0, 1, ..) nan tails", got,
            (q, kp, vp, table_g, lens_g, None, 0.1, 0.0, -1, None, None, -1))
    lens_w = torch.tensor([1000, 10, 299, 700], device=DEV)
    got = grouped_decode_kernel(q, k, v, scale=0.1, softcap=5.0, window=300, seq_lens=lens_w)
    compare("gqa softcap+window", got, (q, k, v, None, lens_w, None, 0.1, 5.0, 300, None, None, -1))
    k8, v8 = k.to(torch.float8_e4m3fn), (v * 4).to(torch.float8_e4m3fn)
    ks_, vs_ = torch.tensor([0.5], device=DEV), torch.tensor([0.25], device=DEV)
    got = grouped_decode_kernel(q, k8, v8, scale=0.1, k_scale=ks_, v_scale=vs_)
    compare("gqa fp8 k_scale!=v_scale", got,
            (q, k8, v8, None, None, None, 0.1, 0.0, -1, ks_, vs_, -1))
    for heads in MLA_HEADS:
        kv, table, _ = paged_mla(3, 4096)
        lens = torch.tensor([4096, 0, 777], device=DEV, dtype=torch.int32)
        qm = torch.randn(3, heads, MLA_CKV + MLA_KPE, device=DEV, dtype=DT)
        for splits in (None, 1, 70):
            over = {} if splits is None else {"num_kv_splits": splits}
            got = grouped_decode_kernel(qm, kv.unsqueeze(2), None, block_table=table, seq_lens=lens,
                                        scale=MLA_SCALE, v_head_dim=MLA_CKV, **over)
            compare(f"mla {heads} heads paged ragged splits={got[2].num_kv_splits}", got,
                    (qm, kv.unsqueeze(2), None, table, lens, None, MLA_SCALE, 0.0, -1, None, None,
                     MLA_CKV))
    write_results("bench_decode_check", rows, ["case", "max_abs_err", "lse_err", "ok"],
                  title="grouped_decode: bf16 correctness on the GPU vs fp32 reference")
    return rows


# ------------------------------------------------------------------ sweep
def stage_launches(q, k, v, table, lens, cfg, scale, v_head_dim=None):
    """The launches of one paged call, to time its stages apart."""
    out = plan_grouped_decode(
        q, k, v, block_table=table, seq_lens=lens, mask=None, mask_is_bool=False,
        scale=scale, softcap=0.0, window=-1, k_scale=None, v_scale=None,
        v_head_dim=v_head_dim, empty=lambda shape, dtype: torch.empty(shape, dtype=dtype, device=DEV),
        config=cfg)
    return out[3]


def _variants(keys_values):
    out = [{}]
    for key, values in keys_values:
        out = [{**o, key: v} for o in out for v in values]
    return out


def sweep() -> list[dict]:
    rows = []
    # earlier sweeps: results/bench_decode_sweep_v1.md (block shapes), _v2.md (a
    # transposed-product variant, slower everywhere, since removed)
    # _v3.md (block shapes at 128 MLA heads; MLA split counts) and _v4.md (static-cache
    # blocks; small-context split counts; starting each program at a rotated block of
    # its split, measured no gain and not kept)
    # _v5.md: the points still short of their targets (GQA vs SDPA at small sizes; MLA-16
    # at B=1 ctx 32k and at batch >= 16), with more pipeline stages and split counts
    # beyond the automatic rule's cap
    # _v6.md: at MLA's 512-wide accumulator, V's columns cut over programs (each
    # recomputing the logits) and the query tile reloaded per KV step: no gain (2-4x
    # slower and unchanged); both dropped. Stage 1 timed alone showed stage 2 costing
    # 3-6 us at batch 1 (GQA ctx 8k: 10.3 of 14.7 us; MLA-16 ctx 32k: 21.5 of 27.6 us)
    # _v7.md: stage 2's shape: splits merged per step (one step for the automatic
    # counts), output features per program, warps
    # _v8.md (code since removed): the query tile loaded in every KV step under a
    # step-dependent mask, to pipeline it through shared memory instead of holding it in
    # registers: no gain (MLA-128 B=64 ctx 4k 626 vs 425 us; more spills), dropped
    merge = _variants([("merge_chunk", (32, 128)), ("merge_dv", (16, 32, 64)),
                       ("merge_warps", (1, 2, 4))])
    points = [
        ("gqa", 1, 8192, None, merge),
        ("gqa", 1, 32768, None, merge),
        ("gqa", 16, 1024, None, merge),
        ("mla", 1, 32768, 16, merge),
        ("mla", 1, 4096, 16, merge),
        ("mla", 16, 4096, 16, merge),
        ("mla", 1, 32768, 128, merge),
    ]
    for kind, batch, ctx, heads, variants in points:
        torch.manual_seed(0)
        if kind == "gqa":
            k, v, table, lens = paged_gqa(batch, ctx)
            q = torch.randn(batch, GQA_Q_HEADS, GQA_HEAD_DIM, device=DEV, dtype=DT)
            make = lambda over: ours_gqa(q, k, v, table, lens, **over)  # noqa: E731
            nbytes = k.numel() * 2 * k.element_size()
        elif kind == "gqa_static":
            k = torch.randn(batch, GQA_KV_HEADS, ctx, GQA_HEAD_DIM, device=DEV, dtype=DT)
            v = torch.randn_like(k)
            q = torch.randn(batch, GQA_Q_HEADS, GQA_HEAD_DIM, device=DEV, dtype=DT)
            make = lambda over: (lambda: grouped_decode_kernel(  # noqa: E731
                q, k, v, scale=GQA_HEAD_DIM ** -0.5, **over))
            nbytes = k.numel() * 2 * k.element_size()
        else:
            kv, table, lens = paged_mla(batch, ctx)
            q = torch.randn(batch, heads, MLA_CKV + MLA_KPE, device=DEV, dtype=DT)
            make = lambda over: ours_mla(q, kv, table, lens, **over)  # noqa: E731
            nbytes = kv.numel() * kv.element_size()
        best = None
        baseline = {}
        try:
            if kind == "gqa":
                fi = flashinfer_gqa(q, k, v, table, lens)
                baseline["flashinfer_us"] = timed(fi)
                q4 = q[:, :, None, :]
                ks = torch.randn(batch, GQA_KV_HEADS, ctx, GQA_HEAD_DIM, device=DEV, dtype=DT)
                baseline["sdpa_gqa_us"] = timed(sdpa_gqa(q4, ks, torch.randn_like(ks)))
                del ks
            elif kind == "mla":
                baseline["flashinfer_us"] = timed(flashinfer_mla(q, kv, table, lens, heads))
        except Exception as exc:
            print(f"sweep baseline {kind}: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
        for over in variants:
            try:
                fn = make(over)
                _STAGE1._cache.clear()
                cfg = fn()[2]
                compiled = [c for c, _ in _STAGE1._cache.values()]
                us = timed(fn)
                stage1_us = None
                if cfg.num_kv_splits > 1:
                    launches = (stage_launches(q, k, v, table, lens, cfg, GQA_HEAD_DIM ** -0.5)
                                if kind == "gqa" else
                                stage_launches(q, kv.unsqueeze(2), None, table, lens, cfg,
                                               MLA_SCALE, MLA_CKV))
                    stage1_us = timed(launches[0])
            except Exception as exc:
                print(f"sweep {kind} {heads} B={batch} ctx={ctx} {over}: {type(exc).__name__}: "
                      f"{str(exc)[:120]}", flush=True)
                continue
            row = {"kind": kind, "heads": heads or GQA_Q_HEADS, "batch": batch, "ctx": ctx,
                   "block_h": cfg.block_h, "block_n": cfg.block_n, "num_warps": cfg.num_warps,
                   "num_stages": cfg.num_stages, "splits": cfg.num_kv_splits,
                   "merge_chunk": cfg.merge_chunk, "merge_dv": cfg.merge_dv,
                   "merge_warps": cfg.merge_warps, "us": us,
                   "GB/s": nbytes / us / 1e3, "stage1_us": stage1_us,
                   "n_regs": compiled[-1].n_regs if compiled else None,
                   "n_spills": compiled[-1].n_spills if compiled else None, **baseline}
            if baseline.get("flashinfer_us"):
                row["vs_flashinfer"] = baseline["flashinfer_us"] / us
            rows.append(row)
            if best is None or us < best["us"]:
                best = row
        print(f"sweep best {best}", flush=True)
        del make
        free_bytes()
        # after every point, so a run cut short still returns what it measured
        write_results("bench_decode_sweep", rows, ["kind", "heads", "batch", "ctx",
                      "block_h", "block_n", "num_warps", "num_stages", "splits", "merge_chunk",
                      "merge_dv", "merge_warps", "n_regs", "n_spills", "us", "GB/s", "stage1_us",
                      "flashinfer_us", "sdpa_gqa_us", "vs_flashinfer"],
                      title="grouped_decode: kernel variant sweep (H100)")
    return rows


# ------------------------------------------------------------------ table
def sweep_sm90(with_flashinfer: bool) -> list[dict]:
    """SM90 Gluon stage 1 variants against the Triton kernel at its defaults."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    points = [(16, 1, 32768), (16, 16, 32768), (16, 64, 4096), (16, 128, 4096),
              (128, 1, 32768), (128, 16, 32768), (128, 64, 4096), (128, 128, 4096)]
    shapes = [(64, 2), (32, 3), (32, 4)]
    rows, summary = [], []
    for heads, batch, ctx in points:
        torch.manual_seed(0)
        kv, table, lens = paged_mla(batch, ctx)
        q = torch.randn(batch, heads, MLA_CKV + MLA_KPE, device=DEV, dtype=DT)
        nbytes = kv.numel() * kv.element_size()
        base = {"heads": heads, "batch": batch, "ctx": ctx}
        tri = ours_mla(q, kv, table, lens, kernel="triton")
        tri_us = timed(tri)
        auto = ours_mla(q, kv, table, lens)
        auto_cfg = auto()[2]
        auto_us = timed(auto)
        fi_us = (_try(lambda: flashinfer_mla(q, kv, table, lens, heads), "flashinfer mla")
                 if with_flashinfer else None)
        best = None
        tiles = -(-heads // 64)
        splits_seen = set()
        for per_sm in (1, 2, 4):
            splits = choose_num_kv_splits(batch, 1, tiles, ctx, sms, per_sm=per_sm)
            if splits in splits_seen:
                continue
            splits_seen.add(splits)
            for block_n, stages in shapes:
                over = dict(kernel="sm90", block_n=block_n, num_stages=stages,
                            num_kv_splits=splits)
                try:
                    us = timed(ours_mla(q, kv, table, lens, **over))
                except Exception as exc:
                    print(f"sm90 {base} {over}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                    continue
                row = {**base, "per_sm": per_sm, "splits": splits, "block_n": block_n,
                       "stages": stages, "us": us, "GB/s": nbytes / us / 1e3,
                       "triton_us": tri_us, "x_triton": tri_us / us}
                rows.append(row)
                print("  " + " ".join(f"{k}={_short(v)}" for k, v in row.items()), flush=True)
                if best is None or us < best["us"]:
                    best = row
        summary.append({**base, "triton_us": tri_us, "auto_us": auto_us,
                        "auto": f"{auto_cfg.kernel} {auto_cfg.block_n}/{auto_cfg.num_stages} "
                                f"splits {auto_cfg.num_kv_splits}",
                        "auto_GB/s": nbytes / auto_us / 1e3,
                        "best_us": best and best["us"],
                        "best": best and f"{best['block_n']}/{best['stages']} splits "
                                         f"{best['splits']} (per_sm {best['per_sm']})",
                        "flashinfer_us": fi_us,
                        "auto_vs_flashinfer": fi_us and fi_us / auto_us,
                        "auto_vs_triton": tri_us / auto_us})
        del kv, table, q
        free_bytes()
    cols = ["heads", "batch", "ctx", "per_sm", "splits", "block_n", "stages", "us", "GB/s",
            "triton_us", "x_triton"]
    write_results("bench_decode_sm90_sweep", rows, cols,
                  title="grouped_decode: SM90 Gluon MLA stage 1 variants (H100)")
    scols = ["heads", "batch", "ctx", "triton_us", "auto_us", "auto", "auto_GB/s", "best_us",
             "best", "flashinfer_us", "auto_vs_flashinfer", "auto_vs_triton"]
    write_results("bench_decode_sm90", summary, scols,
                  title="grouped_decode: SM90 Gluon MLA stage 1 against the Triton kernel")
    print(" | ".join(scols))
    for r in summary:
        print(" | ".join(_short(r.get(c, "")) for c in scols))
    return rows


def _try(fn_factory, label):
    try:
        fn = fn_factory()
        fn()
        return timed(fn)
    except Exception as exc:
        print(f"  {label}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
        return None


def _interleaved(factories, rounds=MLA_ROUNDS):
    """Median times of several implementations of one point, measured in ``rounds``
    rounds, each in a fresh random order, so that slow drifts of the clock (a long
    compute-bound run heats the GPU) fall on all of them alike; ``None`` where one
    fails."""
    fns, times = {}, {}
    for key, (factory, label) in factories.items():
        try:
            fns[key] = factory()
            fns[key]()
            times[key] = []
        except Exception as exc:
            print(f"  {label}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
    order = random.Random(0)
    for _ in range(rounds):
        for key in order.sample(list(fns), len(fns)):
            times[key].append(timed(fns[key]))
    return {key: statistics.median(times[key]) if key in times else None for key in factories}


def table_gqa(copy_gbps, rows):
    for batch in GQA_BATCHES:
        for ctx in GQA_CONTEXTS:
            kv_bytes = batch * ctx * GQA_KV_HEADS * GQA_HEAD_DIM * 2 * 2
            row = {"kind": "gqa", "heads": f"{GQA_Q_HEADS}/{GQA_KV_HEADS}", "batch": batch,
                   "ctx": ctx, "kv_MB": kv_bytes / 2**20, "floor_us": kv_bytes / copy_gbps / 1e3}
            if kv_bytes + MEMORY_HEADROOM_BYTES > free_bytes():
                row["note"] = "skipped: does not fit in memory"
                rows.append(row)
                continue
            torch.manual_seed(0)
            q = torch.randn(batch, GQA_Q_HEADS, GQA_HEAD_DIM, device=DEV, dtype=DT)
            k, v, table, lens = paged_gqa(batch, ctx)
            fn = ours_gqa(q, k, v, table, lens)
            row["splits"] = fn()[2].num_kv_splits
            row["ours_us"] = timed(fn)
            row["kernel"] = fn()[2].kernel
            if row["kernel"] != "triton":
                row["ours_triton_us"] = _try(
                    lambda: ours_gqa(q, k, v, table, lens, kernel="triton"), "ours triton")
            row["ours_1split_us"] = _try(lambda: ours_gqa(q, k, v, table, lens, num_kv_splits=1),
                                         "ours 1 split")
            row["flashinfer_us"] = _try(lambda: flashinfer_gqa(q, k, v, table, lens), "flashinfer")
            del k, v, table, fn
            free_bytes()
            ks = torch.randn(batch, GQA_KV_HEADS, ctx, GQA_HEAD_DIM, device=DEV, dtype=DT)
            vs = torch.randn_like(ks)
            q4 = q.unsqueeze(2)
            row["ours_static_us"] = _try(
                lambda: (lambda: grouped_decode_kernel(q, ks, vs, scale=GQA_HEAD_DIM ** -0.5)),
                "ours static")
            row["static_kernel"] = grouped_decode_kernel(q, ks, vs,
                                                         scale=GQA_HEAD_DIM ** -0.5)[2].kernel
            row["sdpa_gqa_us"] = _try(lambda: sdpa_gqa(q4, ks, vs), "sdpa enable_gqa")
            # repeat_kv materializes K and V n_rep times
            if kv_bytes * (GQA_Q_HEADS // GQA_KV_HEADS) + MEMORY_HEADROOM_BYTES < free_bytes():
                row["hf_repeat_kv_us"] = _try(lambda: hf_repeat_kv_sdpa(q4, ks, vs), "hf repeat_kv")
            else:
                row["hf_repeat_kv_us"] = None
                row["note"] = "hf repeat_kv skipped: the repeated K/V does not fit"
            del ks, vs
            free_bytes()
            _finish(row, kv_bytes, copy_gbps, ("flashinfer_us", "sdpa_gqa_us"))
            rows.append(row)


def table_mla(copy_gbps, rows):
    for heads in MLA_HEADS:
        for batch in MLA_BATCHES:
            for ctx in MLA_CONTEXTS:
                kv_bytes = batch * ctx * (MLA_CKV + MLA_KPE) * 2
                row = {"kind": "mla", "heads": heads, "batch": batch, "ctx": ctx,
                       "kv_MB": kv_bytes / 2**20, "floor_us": kv_bytes / copy_gbps / 1e3}
                if kv_bytes + MEMORY_HEADROOM_BYTES > free_bytes():
                    row["note"] = "skipped: does not fit in memory"
                    rows.append(row)
                    continue
                torch.manual_seed(0)
                q = torch.randn(batch, heads, MLA_CKV + MLA_KPE, device=DEV, dtype=DT)
                kv, table, lens = paged_mla(batch, ctx)
                fn = ours_mla(q, kv, table, lens)
                row["splits"] = fn()[2].num_kv_splits
                row["kernel"] = fn()[2].kernel
                factories = {
                    "ours_us": (lambda: fn, "ours"),
                    "ours_1split_us": (lambda: ours_mla(q, kv, table, lens, num_kv_splits=1),
                                       "ours 1 split"),
                    "flashinfer_us": (lambda: flashinfer_mla(q, kv, table, lens, heads),
                                      "flashinfer mla"),
                }
                if row["kernel"] != "triton":
                    factories["ours_triton_us"] = (
                        lambda: ours_mla(q, kv, table, lens, kernel="triton"), "ours triton")
                row.update(_interleaved(factories))
                if row["ours_us"] is None:
                    raise RuntimeError(f"grouped_decode failed at MLA {heads} heads, B={batch}, "
                                       f"ctx={ctx}")
                flops = 2 * batch * heads * ctx * (MLA_CKV + MLA_KPE + MLA_CKV)
                row["ours_TFLOP/s"] = flops / row["ours_us"] / 1e6
                del kv, table, fn
                free_bytes()
                _finish(row, kv_bytes, copy_gbps, ("flashinfer_us",))
                rows.append(row)


def _finish(row, kv_bytes, copy_gbps, baselines):
    row["ours_GB/s"] = kv_bytes / row["ours_us"] / 1e3
    row["of_copy"] = row["ours_GB/s"] / copy_gbps
    if row.get("ours_1split_us"):
        row["split_gain"] = row["ours_1split_us"] / row["ours_us"]
    if row.get("flashinfer_us"):
        row["flashinfer_GB/s"] = kv_bytes / row["flashinfer_us"] / 1e3
    best = [row[b] for b in baselines if row.get(b)]
    if best:
        row["vs_best_baseline"] = min(best) / row["ours_us"]
    if row.get("ours_static_us") and row.get("sdpa_gqa_us"):
        row["static_vs_sdpa"] = row["sdpa_gqa_us"] / row["ours_static_us"]
    print("  " + " ".join(f"{k}={_short(v)}" for k, v in row.items()), flush=True)


def _short(v):
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--sm90", action="store_true")
    ap.add_argument("--with-flashinfer", action="store_true")
    ap.add_argument("--mla-only", action="store_true")
    args = ap.parse_args()
    everything = not (args.check or args.sweep or args.table or args.sm90)
    print(f"gpu {torch.cuda.get_device_name(0)}", flush=True)
    if args.check or everything:
        check()
    copy_gbps = copy_bandwidth_gbps()
    print(f"copy bandwidth {copy_gbps:.0f} GB/s", flush=True)
    if args.sweep or everything:
        sweep()
    if args.sm90:
        sweep_sm90(args.with_flashinfer)
    if args.table or everything:
        rows: list[dict] = []
        cols = ["kind", "heads", "batch", "ctx", "kv_MB", "kernel", "splits", "ours_us", "ours_GB/s",
                "of_copy", "ours_1split_us", "split_gain", "ours_static_us", "flashinfer_us",
                "flashinfer_GB/s", "sdpa_gqa_us", "hf_repeat_kv_us", "ours_triton_us",
                "vs_best_baseline", "static_kernel", "static_vs_sdpa",
                "ours_TFLOP/s", "floor_us", "note"]
        notes = (f"Measured copy bandwidth {copy_gbps:.0f} GB/s (read + write). ours = paged "
                 "(page 16 GQA / 64 MLA); ours_static = HF-layout (B, Hkv, S, D) cache; "
                 "vs_best_baseline = best of FlashInfer and SDPA(enable_gqa) time / ours time "
                 "(> 1: ours faster); split_gain = one-split time / chosen-split time; "
                 "kernel = stage 1 of ours (sm90: the Gluon MLA kernel on SM90, sm90_gqa: the Gluon GQA kernel; "
                 "ours_triton_us: the Triton kernel at its defaults, same call); "
                 "static_kernel = stage 1 of ours_static (sm90_gqa: the Gluon GQA kernel); "
                 "static_vs_sdpa = SDPA(enable_gqa) time / ours_static time, same layout. "
                 "HF repeat_kv + SDPA runs without a mask.")
        try:
            if not args.mla_only:
                table_gqa(copy_gbps, rows)
            table_mla(copy_gbps, rows)
        except Exception:
            traceback.print_exc()
        if args.mla_only:  # the GQA rows of bench_decode.md stay as they were measured
            cols = [c for c in cols if c not in ("ours_static_us", "sdpa_gqa_us",
                                                 "hf_repeat_kv_us")]
        write_results("bench_decode_mla" if args.mla_only else "bench_decode", rows, cols,
                      title="grouped_decode vs baselines (decode, bf16)", notes=notes)
        print_table(rows, cols)


def print_table(rows, cols):
    short = ["kind", "heads", "batch", "ctx", "kernel", "splits", "ours_us", "ours_GB/s",
             "split_gain", "ours_triton_us",
             "flashinfer_us", "sdpa_gqa_us", "hf_repeat_kv_us", "vs_best_baseline"]
    print(" | ".join(short))
    for r in rows:
        print(" | ".join(_short(r.get(c, "")) for c in short))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
