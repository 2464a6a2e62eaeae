"""grouped_decode stage 1 with TMA tensor-descriptor loads: an experiment, not used by the op.

The op's stage 1 loads K/V tiles through pointer tensors (cp.async). This variant loads
them with ``tl.make_tensor_descriptor`` (TMA on SM90: one descriptor, two coordinates per
tile, no per-row address registers), optionally the query tile too (``q_tma``) and with
Triton's automatic warp specialization of the KV loop (``ws``). Paged caches need the
tile inside one page (BLOCK_N <= page size); page tails and static-cache ends are masked
in a separate last step, so full tiles carry no masks. Stage 2 is the op's.

    python benchmarks/bench_decode_tma.py          # variant grid per point (GPU)
    python benchmarks/bench_decode_tma.py --v2     # q_tma / warp specialization / block_h

Each point times the op's stage 1 + 2 (default settings) and every variant, CUDA-graph
replays, after checking the variant's output against the op's (bf16, 3e-2). Results:
``results/bench_decode_sweep_v9.md`` (H100). ``PROBE_DEV=cpu TRITON_INTERPRET=1`` runs
the kernel in the interpreter (small shapes, ``check`` style).
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback

import torch
import triton
import triton.language as tl

sys.path.insert(0, "benchmarks")
from common import bench_us  # noqa: E402

from attnfuse.custom_ops.kernels.grouped_decode import (  # noqa: E402
    _kv_range, _softmax_step, _split_bounds, decode_settings, plan_grouped_decode)

DEV = os.environ.get("PROBE_DEV", "cuda")
DT = torch.bfloat16
if DEV == "cuda" and torch.cuda.is_available():
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=DEV))


@triton.jit
def _load_tile(desc, c0, c1, c2, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    return desc.load([c0, c1, c2]).reshape(BLOCK_N, BLOCK_D)


@triton.jit
def _block(acc, m_i, l_i, q_a, q_t, kd_a, kd_t, vd, BlockTable, bt_row, outer, kv_head, start, hi,
           sm_scale, BLOCK_N: tl.constexpr, HEAD_DA: tl.constexpr, HEAD_DT: tl.constexpr,
           HEAD_DV: tl.constexpr, PAGE_SIZE: tl.constexpr, PAGED: tl.constexpr,
           SHARED_KV: tl.constexpr, MASKED: tl.constexpr):
    if PAGED:
        page = tl.load(BlockTable + bt_row + start // PAGE_SIZE).to(tl.int32)
        c0 = page * PAGE_SIZE + start % PAGE_SIZE
        c1 = kv_head
    else:
        c0 = outer
        c1 = start
    k_a = _load_tile(kd_a, c0, c1, 0, BLOCK_N, HEAD_DA)
    qk = tl.dot(q_a, tl.trans(k_a))
    if HEAD_DT > 0:
        k_t = _load_tile(kd_t, c0, c1, HEAD_DA, BLOCK_N, HEAD_DT)
        qk += tl.dot(q_t, tl.trans(k_t))
    qk = qk * sm_scale
    offs_n = tl.arange(0, BLOCK_N)
    pos_ok = (start + offs_n) < hi
    if MASKED:
        qk = tl.where(pos_ok[None, :], qk, float("-inf"))
    p, alpha, m_new, l_i = _softmax_step(qk, m_i, l_i)
    if SHARED_KV:
        v = k_a
    else:
        v = _load_tile(vd, c0, c1, 0, BLOCK_N, HEAD_DV)
    if MASKED:
        v = tl.where(pos_ok[:, None], v, 0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.jit
def stage1_tma(
    Q, K, V, BlockTable, SeqLens, PartialOut, PartialLse, Out, Lse,
    sm_scale, group_size, tiles_per_group, n0, n1,
    stride_qb, stride_qh, stride_k0, stride_k1, stride_v0, stride_v1, stride_btb,
    stride_pb, stride_ph, stride_ps, stride_plb, stride_plh, stride_ob, stride_oh, stride_lb, stride_lh,
    NUM_KV_HEADS: tl.constexpr, HEAD_DA: tl.constexpr, HEAD_DT: tl.constexpr, HEAD_DV: tl.constexpr,
    BLOCK_DT: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    PAGE_SIZE: tl.constexpr, PAGED: tl.constexpr, SHARED_KV: tl.constexpr,
    Q_TMA: tl.constexpr = False, WS: tl.constexpr = False, NQ: tl.constexpr = 0,
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1) // tiles_per_group
    tile = tl.program_id(1) % tiles_per_group
    split = tl.program_id(2)
    kv_start, kv_end = _kv_range(SeqLens, b, 0, 0, True, False)
    lo, hi = _split_bounds(kv_start, kv_end, split, NUM_SPLITS, BLOCK_N)

    D_K: tl.constexpr = HEAD_DA + HEAD_DT
    if PAGED:
        # (tokens, kv heads, D): token rows of every page, one after another
        kd_a = tl.make_tensor_descriptor(K, shape=[n0, NUM_KV_HEADS, D_K], strides=[stride_k0, stride_k1, 1],
                                         block_shape=[BLOCK_N, 1, HEAD_DA])
        kd_t = tl.make_tensor_descriptor(K, shape=[n0, NUM_KV_HEADS, D_K], strides=[stride_k0, stride_k1, 1],
                                         block_shape=[BLOCK_N, 1, BLOCK_DT])
        vd = tl.make_tensor_descriptor(V, shape=[n0, NUM_KV_HEADS, HEAD_DV], strides=[stride_v0, stride_v1, 1],
                                       block_shape=[BLOCK_N, 1, HEAD_DV])
    else:
        # (batch * kv heads, positions, D)
        kd_a = tl.make_tensor_descriptor(K, shape=[n0, n1, D_K], strides=[stride_k0, stride_k1, 1],
                                         block_shape=[1, BLOCK_N, HEAD_DA])
        kd_t = tl.make_tensor_descriptor(K, shape=[n0, n1, D_K], strides=[stride_k0, stride_k1, 1],
                                         block_shape=[1, BLOCK_N, BLOCK_DT])
        vd = tl.make_tensor_descriptor(V, shape=[n0, n1, HEAD_DV], strides=[stride_v0, stride_v1, 1],
                                       block_shape=[1, BLOCK_N, HEAD_DV])

    offs_g = tile * BLOCK_H + tl.arange(0, BLOCK_H)
    head_ok = offs_g < group_size
    heads = kv_head * group_size + offs_g
    offs_da = tl.arange(0, HEAD_DA)
    offs_dv = tl.arange(0, HEAD_DV)
    q_rows = Q + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh
    if Q_TMA:
        # rows past the group's heads are other heads' (or zero past the end): their
        # results are never stored
        qd_a = tl.make_tensor_descriptor(Q, shape=[NQ, HEAD_DA + HEAD_DT], strides=[stride_qh, 1],
                                         block_shape=[BLOCK_H, HEAD_DA])
        qd_t = tl.make_tensor_descriptor(Q, shape=[NQ, HEAD_DA + HEAD_DT], strides=[stride_qh, 1],
                                         block_shape=[BLOCK_H, BLOCK_DT])
        q_row0 = b * (stride_qb // stride_qh) + kv_head * group_size + tile * BLOCK_H
        q_a = qd_a.load([q_row0, 0])
        q_t = q_a
        if HEAD_DT > 0:
            q_t = qd_t.load([q_row0, HEAD_DA])
    else:
        q_a = tl.load(q_rows + offs_da[None, :], mask=head_ok[:, None], other=0.0)
        q_t = q_a
    if HEAD_DT > 0 and not Q_TMA:
        offs_dt = tl.arange(0, BLOCK_DT)
        q_t = tl.load(q_rows + HEAD_DA + offs_dt[None, :], mask=head_ok[:, None] & (offs_dt[None, :] < HEAD_DT),
                      other=0.0)
    sm_scale = tl.cast(sm_scale, tl.float32)
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DV], dtype=tl.float32)
    bt_row = b.to(tl.int64) * stride_btb
    outer = b * NUM_KV_HEADS + kv_head
    hi_full = lo + tl.maximum(hi - lo, 0) // BLOCK_N * BLOCK_N
    for start in tl.range(lo, hi_full, BLOCK_N, warp_specialize=WS):
        acc, m_i, l_i = _block(acc, m_i, l_i, q_a, q_t, kd_a, kd_t, vd, BlockTable, bt_row, outer, kv_head,
                               start, hi, sm_scale, BLOCK_N, HEAD_DA, HEAD_DT, HEAD_DV, PAGE_SIZE, PAGED,
                               SHARED_KV, False)
    if hi_full < hi:
        acc, m_i, l_i = _block(acc, m_i, l_i, q_a, q_t, kd_a, kd_t, vd, BlockTable, bt_row, outer, kv_head,
                               hi_full, hi, sm_scale, BLOCK_N, HEAD_DA, HEAD_DT, HEAD_DV, PAGE_SIZE, PAGED,
                               SHARED_KV, True)

    has_mass = l_i > 0.0
    out = tl.where(has_mass[:, None], acc / tl.where(has_mass, l_i, 1.0)[:, None], 0.0)
    lse = tl.where(has_mass, m_i + tl.log(tl.where(has_mass, l_i, 1.0)), float("-inf"))
    if NUM_SPLITS == 1:
        o_ptrs = Out + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_dv[None, :]
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=head_ok[:, None])
        tl.store(Lse + b.to(tl.int64) * stride_lb + heads * stride_lh, lse, mask=head_ok)
    else:
        p_rows = PartialOut + b.to(tl.int64) * stride_pb + heads[:, None] * stride_ph + split * stride_ps
        tl.store(p_rows + offs_dv[None, :], out, mask=head_ok[:, None])
        tl.store(PartialLse + b.to(tl.int64) * stride_plb + heads * stride_plh + split, lse, mask=head_ok)


def _op_plan(q, k, v, table, lens, scale, v_head_dim, **cfg):
    """The op's settings and launches (stage 1, stage 2) for one paged or static call."""
    paged = table is not None
    B, Hq, Dk = q.shape
    hkv = k.shape[2] if paged else k.shape[1]
    cap = table.shape[1] * k.shape[1] if paged else k.shape[2]
    over = {kk: vv for kk, vv in cfg.items() if vv is not None}
    config = decode_settings(batch=B, num_kv_heads=hkv, group_size=Hq // hkv, head_dim_k=Dk, capacity=cap,
                             device=q.device, paged=paged, **over)
    out, _, config, launches = plan_grouped_decode(
        q, k, v, block_table=table, seq_lens=lens, mask=None, mask_is_bool=False, scale=scale,
        softcap=0.0, window=-1, k_scale=None, v_scale=None, v_head_dim=v_head_dim,
        empty=lambda s, d: torch.empty(s, dtype=d, device=q.device), config=config)
    return out, config, launches


def tma_call(q, k, v, table, lens, scale, v_head_dim=None, q_tma=False, ws=False, **cfg):
    """Returns fn() running TMA stage 1 (+ the package's stage 2)."""
    paged = table is not None
    shared = v is None
    B, Hq, Dk = q.shape
    page, hkv = (k.shape[1], k.shape[2]) if paged else (1, k.shape[1])
    _, config, launches = _op_plan(q, k, v, table, lens, scale, v_head_dim, **cfg)
    a = launches[0].args
    partial_out, partial_lse, out, lse = a[8], a[9], a[10], a[11]
    head_dv = v_head_dim if shared else v.shape[-1]
    head_da = head_dv if shared else Dk
    head_dt = Dk - head_da
    vv = k if shared else v
    if paged:
        assert k.stride(0) == page * k.stride(1)
        n0, n1 = k.shape[0] * page, hkv
        sk0, sk1, sv0, sv1 = k.stride(1), k.stride(2), vv.stride(1), vv.stride(2)
    else:
        assert k.stride(0) == hkv * k.stride(1)
        n0, n1 = B * hkv, k.shape[2]
        sk0, sk1, sv0, sv1 = k.stride(1), k.stride(2), vv.stride(1), vv.stride(2)
    splits = config.num_kv_splits
    tiles = -(-(Hq // hkv) // config.block_h)
    grid = (B, hkv * tiles, splits)
    bt = table if paged else lens

    def stage1():
        stage1_tma[grid](
            q, k, vv, bt, lens, partial_out, partial_lse, out, lse,
            scale, Hq // hkv, tiles, n0, n1,
            q.stride(0), q.stride(1), sk0, sk1, sv0, sv1, table.stride(0) if paged else 0,
            partial_out.stride(0), partial_out.stride(1), partial_out.stride(2) if splits > 1 else 0,
            partial_lse.stride(0), partial_lse.stride(1), out.stride(0), out.stride(1), lse.stride(0), lse.stride(1),
            NUM_KV_HEADS=hkv, HEAD_DA=head_da, HEAD_DT=head_dt, HEAD_DV=head_dv,
            BLOCK_DT=max(16, triton.next_power_of_2(head_dt)) if head_dt else 16,
            BLOCK_H=config.block_h, BLOCK_N=config.block_n, NUM_SPLITS=splits, PAGE_SIZE=page,
            PAGED=paged, SHARED_KV=shared, Q_TMA=q_tma, WS=ws, NQ=B * Hq, num_warps=config.num_warps, num_stages=config.num_stages)

    def run():
        stage1()
        for l in launches[1:]:
            l()
        return out
    return run, config, stage1


def ptr_call(q, k, v, table, lens, scale, v_head_dim=None, **cfg):
    out, config, launches = _op_plan(q, k, v, table, lens, scale, v_head_dim, **cfg)

    def run():
        for l in launches:
            l()
        return out
    return run, config, launches[0]


def make_point(kind, heads, batch, ctx, ragged=False, page=None):
    g = torch.Generator(device=DEV).manual_seed(batch * 131 + ctx)
    if ragged:
        lens = torch.randint(ctx // 2, ctx + 1, (batch,), device=DEV, generator=g, dtype=torch.int32)
        lens[0] = ctx - 7
    else:
        lens = torch.full((batch,), ctx, device=DEV, dtype=torch.int32)
    if kind.startswith("mla"):
        page = page or 64
        pps = ctx // page
        kv = torch.randn(batch * pps, page, 1, 576, device=DEV, dtype=DT)
        table = torch.randperm(batch * pps, device=DEV, dtype=torch.int32).view(batch, pps)
        q = torch.randn(batch, heads, 576, device=DEV, dtype=DT)
        return dict(q=q, k=kv, v=None, table=table, lens=lens, scale=192 ** -0.5, v_head_dim=512,
                    kv_bytes=batch * ctx * 576 * 2)
    if kind == "gqa_paged":
        page = page or 16
        pps = ctx // page
        k = torch.randn(batch * pps, page, 8, 128, device=DEV, dtype=DT)
        v = torch.randn_like(k)
        table = torch.randperm(batch * pps, device=DEV, dtype=torch.int32).view(batch, pps)
    else:  # gqa static
        k = torch.randn(batch, 8, ctx, 128, device=DEV, dtype=DT)
        v = torch.randn_like(k)
        table = None
    q = torch.randn(batch, 32, 128, device=DEV, dtype=DT)
    return dict(q=q, k=k, v=v, table=table, lens=lens, scale=128 ** -0.5, v_head_dim=None,
                kv_bytes=batch * ctx * 8 * 128 * 2 * 2)


def args_of(p):
    return (p["q"], p["k"], p["v"], p["table"], p["lens"], p["scale"], p["v_head_dim"])


def variants(kind, heads):
    if kind.startswith("mla") and heads >= 64:
        return [dict(block_h=bh, block_n=bn, num_warps=w, num_stages=s)
                for bh in (64, 32) for bn in (32, 64) for w in (4, 8) for s in (2, 3)]
    if kind.startswith("mla"):
        return [dict(block_n=bn, num_warps=w, num_stages=s) for bn in (32, 64) for w in (4, 8) for s in (2, 3, 4)]
    if kind == "gqa_paged":
        return [dict(block_n=16, num_warps=w, num_stages=s) for w in (4, 8) for s in (3, 4, 6)]
    return [dict(block_n=bn, num_warps=w, num_stages=s) for bn in (64, 128) for w in (4, 8) for s in (2, 3, 4)]


POINTS = [
    ("mla", 16, 1, 32768), ("mla", 16, 16, 32768), ("mla", 16, 64, 4096), ("mla", 16, 128, 4096),
    ("mla", 16, 1, 4096),
    ("mla", 128, 1, 32768), ("mla", 128, 64, 4096), ("mla", 128, 16, 32768),
    ("gqa_static", 32, 16, 1024), ("gqa_static", 32, 16, 8192), ("gqa_static", 32, 1, 8192),
    ("gqa_static", 32, 1, 32768),
    ("gqa_paged", 32, 16, 1024), ("gqa_paged", 32, 1, 8192),
]


def variants2(kind, heads):
    out = []
    if kind.startswith("mla") and heads >= 64:
        for q_tma in (False, True):
            for ws in (False, True):
                for bn, w, st in ((64, 8, 2), (32, 8, 2), (32, 8, 3), (64, 4, 2)):
                    out.append(dict(block_h=64, block_n=bn, num_warps=w, num_stages=st, q_tma=q_tma, ws=ws))
        return out
    if kind.startswith("mla"):
        for bh in (16, 64):
            for q_tma in (False, True):
                for ws in (False, True):
                    for bn, w, st in ((64, 4, 2), (32, 4, 3), (64, 8, 2), (32, 4, 4)):
                        out.append(dict(block_h=bh, block_n=bn, num_warps=w, num_stages=st, q_tma=q_tma, ws=ws))
        return out
    for ws in (False, True):
        for bn, w, st in ((64, 4, 3), (128, 4, 2), (128, 8, 3), (64, 8, 4)):
            out.append(dict(block_n=bn, num_warps=w, num_stages=st, ws=ws))
    return out


POINTS2 = [
    ("mla", 128, 64, 4096), ("mla", 128, 16, 32768), ("mla", 128, 1, 32768),
    ("mla", 16, 64, 4096), ("mla", 16, 128, 4096), ("mla", 16, 16, 32768), ("mla", 16, 1, 32768),
    ("gqa_static", 32, 16, 1024),
]


def check():
    rows = []
    for kind, heads, batch, ctx in [("mla", 16, 3, 4096), ("mla", 128, 2, 2048), ("gqa_static", 32, 3, 1024),
                                    ("gqa_paged", 32, 3, 1024)]:
        for splits in (1, 5):
            p = make_point(kind, heads, batch, ctx, ragged=True)
            ref, _, _ = ptr_call(*args_of(p), num_kv_splits=splits)
            cfg = dict(num_kv_splits=splits)
            if kind == "gqa_paged":
                cfg["block_n"] = 16
            new, _, _ = tma_call(*args_of(p), **cfg)
            err = (ref().float() - new().float()).abs().max().item()
            rows.append(dict(kind=kind, heads=heads, splits=splits, max_err=err, ok=err < 2e-2))
            print(rows[-1], flush=True)
    return rows


def main():
    quick = "--quick" in sys.argv
    out_dir = os.environ.get("OUT", "/tmp")
    v2 = "--v2" in sys.argv
    results = {"check": [] if v2 else check(), "points": []}
    for kind, heads, batch, ctx in (POINTS2 if v2 else POINTS):
        p = make_point(kind, heads, batch, ctx)
        gb = p["kv_bytes"] / 1e3
        fn, cfg, _ = ptr_call(*args_of(p))
        base = bench_us(fn, cuda_graph=True)
        ref_out = fn().float().clone()
        row = dict(kind=kind, heads=heads, batch=batch, ctx=ctx, splits=cfg.num_kv_splits,
                   ptr_cfg=f"{cfg.block_h}/{cfg.block_n}/{cfg.num_warps}/{cfg.num_stages}", ptr_us=base,
                   ptr_gbs=gb / base, tma=[])
        vs = variants2(kind, heads) if v2 else variants(kind, heads)
        vs = vs[:4] if quick else vs
        for v in vs:
            t0 = time.time()
            try:
                fn2, cfg2, _ = tma_call(*args_of(p), **v)
                err = (fn2().float() - ref_out).abs().max().item()
                if not err < 3e-2:
                    raise AssertionError(f"max err {err}")
                us = bench_us(fn2, cuda_graph=True)
                row["tma"].append(dict(v=v, us=us, gbs=gb / us))
            except Exception as e:  # noqa: BLE001
                row["tma"].append(dict(v=v, err=f"{type(e).__name__}: {str(e)[:200]}"))
            if time.time() - t0 > 60:
                print("slow variant", v, flush=True)
        ok = [t for t in row["tma"] if "us" in t]
        best = min(ok, key=lambda t: t["us"]) if ok else None
        row["best"] = best
        results["points"].append(row)
        print(kind, heads, batch, ctx, "ptr", round(base, 1), row["ptr_cfg"], "tma best",
              best and (round(best["us"], 1), best["v"]), "errors", [t["err"] for t in row["tma"] if "err" in t][:1],
              flush=True)
        del p
        torch.cuda.empty_cache()
    with open(os.path.join(out_dir, "bench_decode_tma.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    print("\n| kind | H | B | ctx | splits | ptr us | ptr GB/s | tma us | tma GB/s | tma cfg | x |")
    for r in results["points"]:
        b = r["best"]
        if b:
            print(f"| {r['kind']} | {r['heads']} | {r['batch']} | {r['ctx']} | {r['splits']} | {r['ptr_us']:.1f} | "
                  f"{r['ptr_gbs']:.0f} | {b['us']:.1f} | {b['gbs']:.0f} | {b['v']} | {r['ptr_us']/b['us']:.2f} |")
        else:
            print(f"| {r['kind']} | {r['heads']} | {r['batch']} | {r['ctx']} | {r['splits']} | {r['ptr_us']:.1f} | - | fail |")


if __name__ == "__main__":
    try:
        main()
    except Exception:
        traceback.print_exc()
        raise
