"""MLA prefill: decompressed MHA form against absorbed form, and the op's automatic choice.

DeepSeek-V3 shapes (latent 512, RoPE 64, nope 128, v 128; bf16) at 16 heads (TP8) and
128 heads (TP1); prompt lengths 128 to 16k; batches: one sequence, a uniform batch (up to
16k tokens) and a ragged batch (lengths L, L/3, L/2 and a length-1 sequence); dense
attention and DeepSeek-V3.2 sparse attention (top-k 2048; a query with at most k visible
tokens lists all of them, so the MHA form is exact there).

Forms timed (``attnfuse.custom_ops.mla_prefill``):
  mha        kv_b_proj decompression (a batched GEMM each for K and V, written in place)
             + flashinfer ragged prefill, fa3 (192, 128)
  absorbed   dense: W_UK bmm + flashinfer BatchMLAPagedAttentionWrapper (fa3, page 1) + W_UV
             sparse: W_UK bmm + torch gather of the top-k latents per 256-query chunk,
             bmm / fp32 softmax / bmm + W_UV (plain torch; no sparse MLA kernel on SM90 here)
Kernel time = the form's GPU work after flashinfer's plan (host planning is done once,
outside timing, as serving engines do per batch); ``op`` times the whole custom op
(plan + the host read of cu_seqlens included) for single sequences.

Floor per point: max(FLOPs / 989 TFLOP/s dense bf16 peak, bytes / measured copy bandwidth);
FLOPs count causal pairs only. Run: ``python benchmarks/bench_mla_prefill.py`` (the sweep);
``--op [NAME]``: the whole op, automatic choice against both forced forms, offsets on the GPU
and on the host; ``--decompress``: the MHA form's decompression against two GEMMs + concat;
``--inputs``: the MHA form's q, K and V from one Triton launch against the torch form (GPU and
host time).
"""

from __future__ import annotations

import gc
import math
import os
import random
import statistics
import sys
import time
import traceback

import torch

from common import bench_us, copy_bandwidth_gbps, env_info, write_results

from attnfuse.custom_ops import mla_prefill as mp

R, D_ROPE, D_NOPE, D_V = 512, 64, 128, 128
TOPK = 2048
HEADS = (16, 128)
LENGTHS = (128, 256, 512, 1024, 2048, 4096, 8192, 16384)
#: uniform batches hold at most this many tokens (a typical prefill chunk)
UNIFORM_TOKENS = 16384
#: queries whose random top-k rows are drawn at once (keys: chunk x L floats)
SPARSE_INDEX_CHUNK = 1024
#: H100 SXM dense bf16 tensor-core peak, TFLOP/s
PEAK_TFLOPS = 989.0
#: stop starting new points after this many seconds (the device call is limited)
TIME_BUDGET_S = float(os.environ.get("MLA_BENCH_BUDGET_S", "330"))
WARMUP_MS, REP_MS = 10, 40
#: seconds the CUDA-graph phase may run past the sweep's budget
GRAPH_PHASE_S = 40
#: the torch sparse absorbed form is slow (tens of ms); graph-time it only up to here
GRAPH_SPARSE_MAX_LEN = 2048
#: the issue's pre-work flashinfer MHA numbers (16 heads, one sequence), microseconds
ISSUE_MHA_US = {256: 55, 2048: 111, 4096: 257, 8192: 734, 16384: 2380}
ISSUE_ABSORBED_US = {256: 88, 2048: 180, 4096: 578, 8192: 2115, 16384: 8509}

START = time.time()


def elapsed() -> float:
    return time.time() - START


#: "cpu" only for a dry run of the correctness section
DEVICE = os.environ.get("MLA_BENCH_DEVICE", "cuda")


def make_inputs(lens, H, topk=None, seed=0, device=None, dtype=torch.bfloat16):
    device = device or DEVICE
    g = torch.Generator(device=device).manual_seed(seed)
    T = sum(lens)

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * s).to(dtype)

    q_nope, q_pe = rnd(T, H, D_NOPE), rnd(T, H, D_ROPE)
    ckv, k_pe = rnd(T, R), rnd(T, D_ROPE)
    # kv_b_proj scaled like a trained layer so decompressed keys stay O(1)
    w = rnd(H, D_NOPE + D_V, R, s=1 / math.sqrt(R))
    w_uk = w[:, :D_NOPE, :].contiguous()
    w_uv = w[:, D_NOPE:, :].contiguous().transpose(1, 2)  # SGLang's w_vc layout
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32, device=device)
    idx = None
    if topk is not None:
        idx = sparse_indices(lens, topk, g, device)
    return dict(q_nope=q_nope, q_pe=q_pe, ckv=ckv, k_pe=k_pe, w_uk=w_uk, w_uv=w_uv, cu_seqlens=cu,
                max_seqlen=max(lens), scale=1 / math.sqrt(D_NOPE + D_ROPE), causal=True,
                topk_indices=idx)


def sparse_indices(lens, topk, g, device):
    """Per query: all visible rows when there are at most k (covering, in order), else k
    distinct random visible rows (global row ids); -1 pads."""
    rows = []
    start = 0
    slot = torch.arange(topk, device=device)
    for L in lens:
        pos = torch.arange(L, device=device)
        out = torch.where(slot[None, :] <= pos[:, None], start + slot[None, :], -1).to(torch.int32)
        for a in range(topk, L, SPARSE_INDEX_CHUNK):  # queries with more than k visible rows
            b = min(L, a + SPARSE_INDEX_CHUNK)
            keys = torch.rand(b - a, b, generator=g, device=device)
            keys = keys.masked_fill(torch.arange(b, device=device)[None, :] > pos[a:b, None], -1.0)
            out[a:b] = (keys.topk(topk, dim=-1).indices + start).to(torch.int32)
        rows.append(out)
        start += L
    return torch.cat(rows)


def flops(lens, H):
    """(MHA, absorbed) FLOPs of dense causal attention, projections included."""
    pairs = sum(L * (L + 1) // 2 for L in lens)
    T = sum(lens)
    mha = 2 * pairs * H * (D_NOPE + D_ROPE + D_V) + 2 * T * R * H * (D_NOPE + D_V)
    absorbed = 2 * pairs * H * (R + D_ROPE + R) + 2 * T * H * R * (D_NOPE + D_V)
    return mha, absorbed


def pairs_sparse(lens, topk):
    return sum(min(p + 1, topk) for L in lens for p in range(L))


def runner(inp, path):
    return mp.prepare_path(path, inp["q_nope"], inp["q_pe"], inp["ckv"], inp["k_pe"], inp["w_uk"],
                           inp["w_uv"], inp["cu_seqlens"], inp["max_seqlen"], inp["scale"],
                           inp["causal"], inp["topk_indices"])


def op_call(inp, path, host_offsets=False):
    """The op as a caller calls it; ``host_offsets``: cu_seqlens given as a CPU tensor (no
    device read, no sync inside the call)."""
    cu = inp["cu_seqlens"].cpu() if host_offsets else inp["cu_seqlens"]
    return lambda: torch.ops.attnfuse.mla_prefill(
        inp["q_nope"], inp["q_pe"], inp["ckv"], inp["k_pe"], inp["w_uk"], inp["w_uv"],
        cu, inp["max_seqlen"], inp["scale"], True, inp["topk_indices"],
        inp["topk_indices"] is not None, path)


def auto_path(inp, host_offsets=False):
    """The form the op's rule picks (offsets on the GPU, or on the host: the rule may differ)."""
    cu = inp["cu_seqlens"].cpu() if host_offsets else inp["cu_seqlens"]
    return mp.mla_prefill_path(inp["q_nope"], inp["q_pe"], inp["ckv"], inp["k_pe"], inp["w_uv"],
                               cu, inp["max_seqlen"], inp["topk_indices"],
                               inp["topk_indices"] is not None, "auto")


# ------------------------------------------------------------------ correctness
def check_correctness() -> list[dict]:
    rows = []
    lens = [1, 37, 262, 100]
    for H in (16, 128):
        for topk in (None, 64):
            inp = make_inputs(lens, H, topk, seed=1)
            ref = mp.mla_prefill_reference(inp["q_nope"], inp["q_pe"], inp["ckv"], inp["k_pe"],
                                           inp["w_uk"], inp["w_uv"], inp["cu_seqlens"],
                                           inp["max_seqlen"], inp["scale"], True,
                                           inp["topk_indices"]).float()
            paths = ["absorbed"] + (["mha"] if topk is None else [])
            outs = {}
            for p in paths:
                try:
                    outs[p] = runner(inp, p)().float()
                except Exception:
                    traceback.print_exc()
            # sparse with lengths <= k: covering indices make the MHA form exact
            if topk is not None:
                short = make_inputs([1, 37, 64, 50], H, topk, seed=2)
                sref = mp.mla_prefill_reference(short["q_nope"], short["q_pe"], short["ckv"],
                                                short["k_pe"], short["w_uk"], short["w_uv"],
                                                short["cu_seqlens"], short["max_seqlen"],
                                                short["scale"], True, short["topk_indices"]).float()
                for p in ("mha", "absorbed"):
                    try:
                        err = (runner(short, p)().float() - sref).abs().max().item()
                    except Exception:
                        traceback.print_exc()
                        err = float("inf")
                    rows.append(dict(check=f"sparse covering H={H}", path=p, max_abs_err=err,
                                     ref_max=sref.abs().max().item(), ok=err < 2e-2 * max(1, sref.abs().max().item())))
            for p, o in outs.items():
                err = (o - ref).abs().max().item()
                rows.append(dict(check=f"{'dense' if topk is None else 'sparse'} H={H}", path=p,
                                 max_abs_err=err, ref_max=ref.abs().max().item(),
                                 ok=err < 2e-2 * max(1, ref.abs().max().item())))
    # flashinfer MLA plans split into groups (long sequences cut into query chunks)
    saved = mp.MLA_PLAN_MAX_TOKEN_HEADS
    try:
        for H in HEADS:
            mp.MLA_PLAN_MAX_TOKEN_HEADS = 100 * H
            inp = make_inputs(lens, H, None, seed=3)
            ref = mp.mla_prefill_reference(inp["q_nope"], inp["q_pe"], inp["ckv"], inp["k_pe"],
                                           inp["w_uk"], inp["w_uv"], inp["cu_seqlens"],
                                           inp["max_seqlen"], inp["scale"], True).float()
            try:
                err = (runner(inp, "absorbed")().float() - ref).abs().max().item()
            except Exception:
                traceback.print_exc()
                err = float("inf")
            rows.append(dict(check=f"dense H={H} plans of 100 tokens", path="absorbed", max_abs_err=err,
                             ref_max=ref.abs().max().item(), ok=err < 2e-2 * max(1, ref.abs().max().item())))
    finally:
        mp.MLA_PLAN_MAX_TOKEN_HEADS = saved
    for r in rows:
        print(f"check {r['check']:24s} {r['path']:9s} err {r['max_abs_err']:.2e} "
              f"(|ref| {r['ref_max']:.2f}) {'ok' if r['ok'] else 'FAIL'}")
    return rows


# ------------------------------------------------------------------------ sweep
def batches(L):
    out = [("single", [L])]
    B = min(8, UNIFORM_TOKENS // L)
    if B > 1:
        out.append((f"uniform{B}", [L] * B))
    out.append(("ragged", [L, max(1, L // 3), 1, max(1, L // 2)]))
    return out


def time_point(H, kind, lens, topk, bw_gbps, with_op) -> dict:
    inp = make_inputs(lens, H, topk)
    T = sum(lens)
    row = dict(attention="dense" if topk is None else f"sparse{topk}", heads=H, batch=kind,
               max_len=max(lens), tokens=T)
    mha_ok = topk is None or max(lens) <= topk
    times = {}
    for p in ("mha", "absorbed"):
        if p == "mha" and not mha_ok:
            continue
        try:
            times[p] = bench_us(runner(inp, p), warmup_ms=WARMUP_MS, rep_ms=REP_MS)
        except Exception as exc:  # report and go on: one failing point must not end the sweep
            print(f"  {p} failed at H={H} {kind} {lens}: {type(exc).__name__}: {exc}")
        torch.cuda.empty_cache()
    auto = auto_path(inp)
    row.update(mha_us=times.get("mha"), absorbed_us=times.get("absorbed"), auto=auto)
    if times:
        best = min(times, key=times.get)
        row["best"] = best
        row["auto_us"] = times.get(auto)
        row["auto_over_best"] = (times[auto] / times[best]) if auto in times else None
    mha_f, abs_f = flops(lens, H) if topk is None else (None, None)
    if topk is not None:
        pairs = pairs_sparse(lens, topk)
        abs_f = 2 * pairs * H * (2 * R + D_ROPE) + 2 * T * H * R * (D_NOPE + D_V)
        mha_f = 2 * pairs * H * (D_NOPE + D_ROPE + D_V) + 2 * T * R * H * (D_NOPE + D_V) if mha_ok else None
    # bytes: inputs read once, decompressed K/V written and read back (MHA), output written
    io = 2 * (T * H * (D_NOPE + D_ROPE) + T * (R + D_ROPE) + T * H * D_V)
    kv = 2 * 2 * T * H * (D_NOPE + D_ROPE + D_V)
    if "mha" in times and mha_f:
        floor = max(mha_f / (PEAK_TFLOPS * 1e12), (io + kv) / (bw_gbps * 1e9)) * 1e6
        row.update(mha_tflops=mha_f / (times["mha"] * 1e-6) / 1e12, mha_floor_us=floor,
                   mha_x_floor=times["mha"] / floor)
    if "absorbed" in times:
        floor = max(abs_f / (PEAK_TFLOPS * 1e12), io / (bw_gbps * 1e9)) * 1e6
        row.update(absorbed_tflops=abs_f / (times["absorbed"] * 1e-6) / 1e12, absorbed_floor_us=floor,
                   absorbed_x_floor=times["absorbed"] / floor)
    if with_op:
        for p in ("auto", "mha", "absorbed"):
            if p == "mha" and not mha_ok:
                continue
            try:
                row[f"op_{p}_us"] = bench_us(op_call(inp, p), warmup_ms=WARMUP_MS, rep_ms=REP_MS)
            except Exception as exc:
                print(f"  op {p} failed: {type(exc).__name__}: {exc}")
    if topk is None and H == 16 and kind == "single" and max(lens) in ISSUE_MHA_US:
        row["issue_mha_us"] = ISSUE_MHA_US[max(lens)]
        row["issue_absorbed_us"] = ISSUE_ABSORBED_US[max(lens)]
    print(f"[{elapsed():5.0f}s] {row['attention']:10s} H={H:3d} {kind:9s} L={max(lens):5d} T={T:6d} "
          f"mha {_f(row.get('mha_us'))} abs {_f(row.get('absorbed_us'))} auto={auto} "
          f"ratio {_f(row.get('auto_over_best'), '.3f')} op_auto {_f(row.get('op_auto_us'))}")
    del inp
    torch.cuda.empty_cache()
    return row


def _f(v, fmt=".0f"):
    return "-" if v is None else format(v, fmt)


def warm_up():
    """flashinfer JIT-compiles its modules at first use: do it before any timing."""
    t0 = time.time()
    for H in HEADS:
        inp = make_inputs([64, 1, 30], H)
        for p in ("mha", "absorbed"):
            try:
                runner(inp, p)()
            except Exception:  # the sweep reports per-point failures; keep going
                traceback.print_exc()
    torch.cuda.synchronize()
    print(f"warm-up (JIT) {time.time() - t0:.0f}s")


def main():
    print(env_info())
    warm_up()
    checks = check_correctness()
    write_results("mla_prefill_correctness", checks, ["check", "path", "max_abs_err", "ref_max", "ok"],
                  title="MLA prefill: GPU correctness (bf16 vs float32 reference)")
    bw = copy_bandwidth_gbps()
    print(f"copy bandwidth {bw:.0f} GB/s")
    rows = []
    # priority order: dense single sequence, sparse single, then uniform and ragged batches
    plan = []
    for topk in (None, TOPK):
        for H in HEADS:
            for L in LENGTHS:
                for kind, lens in batches(L):
                    if kind == "single":
                        plan.append((0 if topk is None else 1, H, kind, lens, topk))
                    else:
                        plan.append((2 if topk is None else 3, H, kind, lens, topk))
    plan.sort(key=lambda x: x[0])
    skipped = 0
    for prio, H, kind, lens, topk in plan:
        if elapsed() > TIME_BUDGET_S:
            skipped += 1
            continue
        rows.append(time_point(H, kind, lens, topk, bw, with_op=(kind == "single")))
        if len(rows) % 8 == 0:
            _write(rows, bw, skipped)
    _write(rows, bw, skipped)
    print(f"points: {len(rows)} timed, {skipped} skipped (time budget)")
    # GPU time without launch gaps (CUDA graphs) for single sequences, last: a failed
    # capture must not cost the eager results above
    for r in rows:
        if r["batch"] != "single" or elapsed() > TIME_BUDGET_S + GRAPH_PHASE_S:
            continue
        topk = None if r["attention"] == "dense" else TOPK
        inp = make_inputs([r["max_len"]], r["heads"], topk)
        for p in ("mha", "absorbed"):
            if r.get(f"{p}_us") is None or (topk is not None and p == "absorbed" and r["max_len"] > GRAPH_SPARSE_MAX_LEN):
                continue
            try:
                r[f"{p}_graph_us"] = bench_us(runner(inp, p), cuda_graph=True)
            except Exception as exc:
                print(f"  graph timing {p} failed: {type(exc).__name__}: {str(exc)[:200]}")
        if r.get("mha_graph_us") and r.get("absorbed_graph_us"):
            best = min(r["mha_graph_us"], r["absorbed_graph_us"])
            r["auto_over_best_graph"] = r[f"{r['auto']}_graph_us"] / best
        print(f"graph {r['attention']} H={r['heads']} L={r['max_len']}: mha {_f(r.get('mha_graph_us'))} "
              f"abs {_f(r.get('absorbed_graph_us'))}")
        del inp
        torch.cuda.empty_cache()
    _write(rows, bw, skipped)
    summary(rows)


def check_groups():
    """The MHA form run in budget groups: correctness (forced small budget) and the time of
    the ragged 16k batch at 128 heads, which one 2.5 GB decompression no longer serves."""
    warm_up()
    rows = []
    saved = mp.DECOMPRESSED_KV_BUDGET_BYTES
    lens = [1, 37, 262, 100]
    try:
        for H in HEADS:
            inp = make_inputs(lens, H, None, seed=4)
            ref = mp.mla_prefill_reference(inp["q_nope"], inp["q_pe"], inp["ckv"], inp["k_pe"],
                                           inp["w_uk"], inp["w_uv"], inp["cu_seqlens"],
                                           inp["max_seqlen"], inp["scale"], True).float()
            mp.DECOMPRESSED_KV_BUDGET_BYTES = 300 * mp.decompressed_kv_bytes(1, H, D_NOPE + D_ROPE, D_V, 2)
            groups = mp.mha_groups(inp["cu_seqlens"].tolist(), 300)
            err = (runner(inp, "mha")().float() - ref).abs().max().item()
            mp.DECOMPRESSED_KV_BUDGET_BYTES = saved
            rows.append(dict(check=f"mha in {len(groups)} groups, H={H}", max_abs_err=err,
                             ref_max=ref.abs().max().item(), ok=err < 2e-2 * max(1, ref.abs().max().item())))
    finally:
        mp.DECOMPRESSED_KV_BUDGET_BYTES = saved
    inp = make_inputs([16384, 5461, 1, 8192], 128)
    groups = mp.mha_groups(inp["cu_seqlens"].tolist(), mp.DECOMPRESSED_KV_BUDGET_BYTES //
                           mp.decompressed_kv_bytes(1, 128, D_NOPE + D_ROPE, D_V, 2))
    t_groups = bench_us(runner(inp, "mha"), warmup_ms=WARMUP_MS, rep_ms=REP_MS)
    rows.append(dict(check=f"ragged 16k x 128 heads, mha in {len(groups)} groups", time_us=t_groups,
                     auto=auto_path(inp)))
    for r in rows:
        print(r)
    write_results("mla_prefill_groups", rows, ["check", "max_abs_err", "ref_max", "ok", "time_us", "auto"],
                  title="MLA prefill: MHA form in budget groups (H100)")


#: op-level comparison: rounds per point (the paths in a fresh random order each round) and
#: the wall time each path is run for per round
OP_ROUNDS, OP_ROUND_MS = 25, 12
#: rounds of the re-planning call, timed after the others (it leaves the GPU idle between
#: its calls, which must not precede the calls compared)
REPLAN_ROUNDS = 5


def _wall_us(fn, ms: float) -> float:
    """Wall time per call of ``fn`` over about ``ms`` milliseconds, the GPU waited for
    (a call with offsets on the GPU synchronises inside: host + GPU time; with offsets on
    the host calls queue: the larger of the two)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    once = time.perf_counter() - t0
    n = max(3, int(ms / 1e3 / max(once, 1e-6)))
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


class QuietHost:
    """While timing host-bound calls: one CPU core (no migrations; not core 0, where
    interrupts land) and no garbage collection pauses."""

    def __enter__(self):
        self.cores = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {max(self.cores)})
        gc.collect()
        gc.disable()
        return self

    def __exit__(self, *exc):
        gc.enable()
        os.sched_setaffinity(0, self.cores)


def op_points():
    """Where the two forms are close enough that the op's choice can matter (short and
    mid lengths), plus a long point per head count as a control."""
    pts = []
    for H in HEADS:
        for L in (128, 256, 512, 1024, 2048, 4096, 8192):
            pts.append((H, "single", [L], None))
        for L in (128, 256, 512, 1024, 2048):
            pts.append((H, "ragged", [L, max(1, L // 3), 1, max(1, L // 2)], None))
            if L <= 1024:
                pts.append((H, "uniform8", [L] * 8, None))
        for L in (128, 1024, 2048):
            pts.append((H, "single", [L], TOPK))
    return pts


def steal_ms() -> float:
    """CPU time the hypervisor took from this VM so far (all cores; /proc/stat's steal
    column, in clock ticks), in milliseconds; 0 where it is not reported."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8]) * 1e3 / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _op_row(H, kind, lens, topk, auto, auto_host, samples) -> dict:
    """One point's statistics: per call the median round (primary) and the fastest round;
    the rule's form against the faster forced form, for offsets on the GPU and on the host."""
    med = {p: statistics.median(v) for p, v in samples.items()}
    fast = {p: min(v) for p, v in samples.items()}

    def best(stat, suffix=""):
        return min(("mha", "absorbed"), key=lambda p: stat.get(p + suffix, float("inf")))

    b, bh, bf = best(med), best(med, "_host"), best(fast)
    return dict(
        attention="dense" if topk is None else f"sparse{topk}", heads=H, batch=kind,
        max_len=max(lens), tokens=sum(lens), auto=auto, best_op=b,
        op_auto_us=med["auto"], op_mha_us=med.get("mha"), op_absorbed_us=med["absorbed"],
        auto_over_best_op=med[auto] / med[b], auto_call_over_best=med["auto"] / med[b],
        auto_host=auto_host, host_best=bh, host_auto_us=med["auto_host"],
        host_mha_us=med.get("mha_host"), host_absorbed_us=med["absorbed_host"],
        host_auto_over_best=med[f"{auto_host}_host"] / med[f"{bh}_host"],
        host_auto_call_over_best=med["auto_host"] / med[f"{bh}_host"],
        fastest_auto_over_best=fast[auto] / fast[bf],
        fastest_host_auto_over_best=fast[f"{auto_host}_host"] / min(
            fast.get("mha_host", float("inf")), fast["absorbed_host"]),
        same_code_gap=max(abs(med["auto"] / med[auto] - 1),
                          abs(med["auto_host"] / med[f"{auto_host}_host"] - 1)),
        op_replan_us=med["replan"],
        spread=max(max(v) / min(v) for v in samples.values()))


OP_COLUMNS = ["attention", "heads", "batch", "max_len", "tokens", "auto", "best_op", "op_auto_us",
              "op_mha_us", "op_absorbed_us", "auto_over_best_op", "auto_call_over_best",
              "auto_host", "host_best", "host_auto_us", "host_mha_us", "host_absorbed_us",
              "host_auto_over_best",
              "host_auto_call_over_best", "fastest_auto_over_best", "fastest_host_auto_over_best",
              "same_code_gap", "op_replan_us", "spread", "steal_ms"]


def op_rounds(name: str = "mla_prefill_op") -> list[dict]:
    """The whole op (``path`` auto / mha / absorbed) as a caller sees it: wall time per
    call, the paths in a fresh random order in each of OP_ROUNDS rounds; per path the median
    round. ``*_host``: the same calls with cu_seqlens as a CPU tensor. ``replan``: the auto
    path with its flashinfer plan dropped before every call (the cost the plan-once reuse
    saves: layers after the first reuse the plan)."""
    warm_up()
    rows = []
    for H, kind, lens, topk in op_points():
        inp = make_inputs(lens, H, topk)
        auto, auto_host = auto_path(inp), auto_path(inp, host_offsets=True)
        paths = ["auto", "absorbed"] + (["mha"] if topk is None or max(lens) <= topk else [])
        fns = {p: op_call(inp, p) for p in paths}
        fns.update({f"{p}_host": op_call(inp, p, host_offsets=True) for p in paths})

        def replan(f=fns["auto"]):
            mp.WRAPPERS._plan_keys.clear()
            return f()

        for f in fns.values():
            f()
        samples = {p: [] for p in fns}
        names = list(fns)
        shuffle = random.Random(len(rows)).shuffle
        stolen = steal_ms()
        with QuietHost():
            for _ in range(OP_ROUNDS):  # a fresh random order each round: no fixed neighbours
                shuffle(names)
                for p in names:
                    samples[p].append(_wall_us(fns[p], OP_ROUND_MS))
            samples["replan"] = [_wall_us(replan, OP_ROUND_MS) for _ in range(REPLAN_ROUNDS)]
        row = _op_row(H, kind, lens, topk, auto, auto_host, samples)
        row["steal_ms"] = steal_ms() - stolen
        rows.append(row)
        print(f"op {row['attention']:10s} H={H:3d} {kind:8s} L={max(lens):5d} auto={auto:8s} "
              f"mha {_f(row['op_mha_us'])} abs {row['op_absorbed_us']:.0f} -> "
              f"{row['auto_over_best_op']:.3f} | host offsets ({auto_host}): mha {_f(row['host_mha_us'])} "
              f"abs {row['host_absorbed_us']:.0f} -> {row['host_auto_over_best']:.3f} | "
              f"same-code gap {row['same_code_gap']:.3f} steal {row['steal_ms']:.0f} ms", flush=True)
        del inp, fns
        torch.cuda.empty_cache()
    write_results(name, rows, OP_COLUMNS,
                  title="MLA prefill: the whole op, wall time per call (H100)",
                  notes=(f"Wall time per call of torch.ops.attnfuse.mla_prefill, path auto / mha / "
                         f"absorbed forced, in a fresh random order in each of {OP_ROUNDS} rounds of "
                         f"{OP_ROUND_MS} ms on one pinned CPU core with garbage collection off; "
                         f"the median round of each (fastest_* = the fastest round). op_* columns: "
                         f"cu_seqlens on the GPU (one sync per call: host work + GPU time); host_* "
                         f"columns: cu_seqlens as a CPU tensor (no sync: calls queue, the time per "
                         f"call is the larger of host and GPU time; auto_host = the rule's form for "
                         f"such calls). auto_over_best = the rule's "
                         f"form / the faster forced form; auto_call_over_best = the auto call itself "
                         f"/ the faster forced form; same_code_gap = how far the auto call and the "
                         f"forced call of the same form (identical work) differ, the resolution of "
                         f"the run; op_replan_us = the auto call with its flashinfer plan dropped "
                         f"before each call ({REPLAN_ROUNDS} rounds after the others); spread = "
                         f"worst max/min over rounds; steal_ms = CPU time the hypervisor took from "
                         f"the VM (all cores) while the point was timed."))
    return rows


def _decompress_two_gemms(ckv, k_pe, w_uk, w_uv):
    """The MHA form's decompression before it wrote in place: a GEMM each against the
    flattened weights (a copy of them where they are strided views) and a concatenation."""
    H, d_nope, R = w_uk.shape
    d_v = w_uv.shape[2]
    k_nope = (ckv @ w_uk.reshape(H * d_nope, R).t()).view(-1, H, d_nope)
    v = (ckv @ w_uv.transpose(1, 2).reshape(H * d_v, R).t()).view(-1, H, d_v)
    return torch.cat([k_nope, k_pe[:, None, :].expand(-1, H, -1)], dim=-1), v


def decompress_timing():
    """GPU time (CUDA graphs) of ``mp.decompress_kv`` against two GEMMs + concatenation,
    with contiguous weights and with kv_b_proj's strided views (as SGLang and HF hold them)."""
    print("| H | T | weights | two_gemms_us | in_place_us | ratio | max_abs_diff |")
    print("|---|---|---|---|---|---|---|")
    for H in HEADS:
        w = torch.randn(H, D_NOPE + D_V, R, device="cuda", dtype=torch.bfloat16) / R ** 0.5
        layouts = {"contiguous": (w[:, :D_NOPE].contiguous(), w[:, D_NOPE:].contiguous().transpose(1, 2)),
                   "kv_b_proj view": (w[:, :D_NOPE], w[:, D_NOPE:].transpose(1, 2))}
        for T in (128, 512, 2048, 16384):
            ckv = torch.randn(T, R, device="cuda", dtype=torch.bfloat16)
            k_pe = torch.randn(T, D_ROPE, device="cuda", dtype=torch.bfloat16)
            for name, (w_uk, w_uv) in layouts.items():
                before = _decompress_two_gemms(ckv, k_pe, w_uk, w_uv)
                after = mp.decompress_kv(ckv, k_pe, w_uk, w_uv)
                diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(before, after))
                t0 = bench_us(lambda: _decompress_two_gemms(ckv, k_pe, w_uk, w_uv), cuda_graph=True)
                t1 = bench_us(lambda: mp.decompress_kv(ckv, k_pe, w_uk, w_uv), cuda_graph=True)
                print(f"| {H} | {T} | {name} | {t0:.1f} | {t1:.1f} | {t1 / t0:.2f} | {diff:.3f} |",
                      flush=True)


def _host_us(fn, n: int = 300) -> float:
    """Median host time of ``fn()`` issued without synchronization (the GPU drained every
    50 calls so the launch queue never fills)."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    samples = []
    with QuietHost():
        for i in range(n):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
            if i % 50 == 49:
                torch.cuda.synchronize()
    torch.cuda.synchronize()
    return 1e6 * statistics.median(samples)


def inputs_timing():
    """The MHA form's q, K and V: one Triton launch (``kernels/mla_decompress``) against the
    torch form (two in-place GEMMs, a copy, a concatenation). Checks both against float32
    (contiguous weights and kv_b_proj views), then GPU time (CUDA graphs) and host time."""
    from attnfuse.custom_ops.kernels import mla_decompress as md

    keys = ("q_nope", "q_pe", "ckv", "k_pe", "w_uk", "w_uv")
    for H, T in ((16, 1), (16, 100), (128, 4097), (16, 16384)):
        inp = make_inputs([T], H)
        a = [inp[k] for k in keys]
        w = torch.cat([a[4], a[5].transpose(1, 2)], 1).contiguous()  # (H, 256, 512) kv_b_proj
        for name, (w_uk, w_uv) in (("contiguous", (a[4], a[5])),
                                   ("kv_b_proj view", (w[:, :D_NOPE], w[:, D_NOPE:].transpose(1, 2)))):
            args = (*a[:4], w_uk, w_uv)
            k_ref = torch.einsum("tr,hdr->thd", args[2].float(), w_uk.float())
            v_ref = torch.einsum("tr,hrd->thd", args[2].float(), w_uv.float())
            errs = []
            for fn in (md.mha_inputs, mp.mha_inputs_torch):
                q, k, v = fn(*args)
                assert torch.equal(q, torch.cat([args[0], args[1]], -1))
                assert torch.equal(k[..., D_NOPE:], args[3][:, None].expand(T, H, D_ROPE))
                errs.append(max((k[..., :D_NOPE].float() - k_ref).abs().max().item(),
                                (v.float() - v_ref).abs().max().item()))
            assert errs[0] <= 2 * errs[1] + 1e-2, (H, T, name, errs)
            print(f"check H={H} T={T} {name}: max |err| fused {errs[0]:.4f}, torch {errs[1]:.4f}")
    print("| H | T | fused_gpu_us | torch_gpu_us | fused_TFLOP/s | torch_TFLOP/s | fused_host_us | torch_host_us |")
    print("|---|---|---|---|---|---|---|---|")
    for H in HEADS:
        for T in (128, 512, 2048, 8192, 16384):
            inp = make_inputs([T], H)
            a = [inp[k] for k in keys]
            g = [statistics.median(bench_us(lambda f=f, a=a: f(*a), cuda_graph=True) for _ in range(3))
                 for f in (md.mha_inputs, mp.mha_inputs_torch)]
            h = ([_host_us(lambda f=f, a=a: f(*a)) for f in (md.mha_inputs, mp.mha_inputs_torch)]
                 if T <= 2048 else [float("nan")] * 2)
            tflops = [2 * T * R * (D_NOPE + D_V) * H / t / 1e6 for t in g]
            print(f"| {H} | {T} | {g[0]:.1f} | {g[1]:.1f} | {tflops[0]:.0f} | {tflops[1]:.0f} | "
                  f"{h[0]:.0f} | {h[1]:.0f} |", flush=True)
            del inp, a
            torch.cuda.empty_cache()


def rescore(path):
    """Re-apply the op's current rule to measured rows (after a rule change)."""
    import json

    rows = json.load(open(path))
    rule = mp.RULES["sm90"]
    for r in rows:
        nseq = {"single": 1, "ragged": 4}.get(r["batch"], None) or int(r["batch"].removeprefix("uniform"))
        topk = None if r["attention"] == "dense" else TOPK
        r["auto"] = mp.choose_path(num_tokens=r["tokens"], num_heads=r["heads"], num_seqs=nseq,
                                   qk_nope_dim=D_NOPE, rope_dim=D_ROPE, v_head_dim=D_V, element_size=2,
                                   max_seqlen=r["max_len"], topk=topk, topk_covers_visible=True, rule=rule)
        times = {p: r.get(f"{p}_us") for p in ("mha", "absorbed") if r.get(f"{p}_us")}
        if times:
            r["best"] = min(times, key=times.get)
            r["auto_us"] = times.get(r["auto"])
            r["auto_over_best"] = times[r["auto"]] / times[r["best"]] if r["auto"] in times else None
        g = {p: r.get(f"{p}_graph_us") for p in ("mha", "absorbed") if r.get(f"{p}_graph_us")}
        if len(g) == 2:
            r["auto_over_best_graph"] = g[r["auto"]] / min(g.values()) if r["auto"] in g else None
    return rows


def restamp(md_path, row):
    """A rescore runs off the GPU: put the measuring machine back in the header line."""
    from pathlib import Path

    text = Path(md_path).read_text().splitlines()
    text[2] = (f"GPU: {row['gpu']} · torch {row['torch']} · triton {row['triton']} · "
               f"flashinfer {row['flashinfer']} · CUDA {row['cuda']} (rescored off-GPU with the current rule)")
    Path(md_path).write_text("\n".join(text) + "\n")


COLUMNS = ["attention", "heads", "batch", "max_len", "tokens", "mha_us", "absorbed_us", "best", "auto",
           "auto_over_best", "mha_graph_us", "absorbed_graph_us", "auto_over_best_graph", "op_auto_us", "op_mha_us", "op_absorbed_us", "mha_tflops", "mha_x_floor",
           "absorbed_tflops", "issue_mha_us", "issue_absorbed_us"]


FINDINGS = """Findings (H100). Dense: the MHA form's kernels are faster than the absorbed form's at
every point in GPU time (*_graph_us, CUDA graphs: 1.3x at 128 tokens up to 3.7x at 16k, at 16
and at 128 heads). Eager times (mha_us, absorbed_us) of calls under about 1k tokens measure how
fast the host launches (do_bench queues calls back to back), and single points there jump 2-3x
between runs; the op's own measure is mla_prefill_op.md. Since the MHA form's q, K and V come
from one Triton launch (mla_decompress, up to 128k token-heads), its host work is no larger than
the absorbed form's (mla_prefill_host.md), so the rule takes the MHA form for every dense call
whose decompressed K/V fit 2 GiB; the whole op then ran the faster form at all 38 points, with
offsets on the GPU and on the host, in three runs of four (mla_prefill_op_run15.md to run18.md;
run 17's one miss, 1.08, was a call the kernel's limit then left to the four launches).
Sparse (top-k 2048): the MHA form is exact only up to k tokens (covering indices)
and there beats the absorbed form (torch gather + bmm) by 23x to 130x; past k only the absorbed
form is exact, so the crossover is k itself. A masked MHA past k would cost at least dense MHA:
against a FlashMLA-class sparse kernel (640 TFLOP/s, published H800 figure) that bound crosses
near 10k tokens at 16 and 128 heads (estimate, not measured). The ragged 16k row at 128 heads
was measured before budget grouping (one 2.5 GB decompression, 26.3 ms); the rule now runs it as
MHA in two groups: 27.0 ms (mla_prefill_groups.md), against 99.5 ms for the absorbed form."""


def _write(rows, bw, skipped):
    notes = (f"Kernel times (µs, median, do_bench) after flashinfer's plan; op_* = the whole custom op "
             f"(plan and the host read of cu_seqlens included). auto_over_best = time of the form the "
             f"op's rule picks / the faster form (eager; *_graph = CUDA-graph replays, single sequences). "
             f"Copy bandwidth {bw:.0f} GB/s; peak {PEAK_TFLOPS:.0f} TFLOP/s; *_x_floor = time / "
             f"max(FLOPs/peak, bytes/bandwidth). Sparse = top-k {TOPK}; its MHA form exists only for "
             f"max_len <= k. {skipped} points skipped.\n\n{FINDINGS}")
    return write_results("mla_prefill", rows, COLUMNS, title="MLA prefill: MHA form vs absorbed form",
                         notes=notes)


def summary(rows):
    worst = max((r for r in rows if r.get("auto_over_best")), key=lambda r: r["auto_over_best"], default=None)
    if worst:
        print(f"worst auto/best: {worst['auto_over_best']:.3f} at {worst['attention']} H={worst['heads']} "
              f"{worst['batch']} L={worst['max_len']}")
    print("\n| attn | H | batch | L | mha µs | abs µs | auto | auto/best | issue mha |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['attention']} | {r['heads']} | {r['batch']} | {r['max_len']} | {_f(r.get('mha_us'))} | "
              f"{_f(r.get('absorbed_us'))} | {r['auto']} | {_f(r.get('auto_over_best'), '.3f')} | "
              f"{_f(r.get('issue_mha_us'))} |")


if __name__ == "__main__":
    if len(sys.argv) == 2 and sys.argv[1] == "--check-groups":
        check_groups()
    elif len(sys.argv) == 2 and sys.argv[1] == "--decompress":
        print(env_info())
        decompress_timing()
    elif len(sys.argv) == 2 and sys.argv[1] == "--inputs":
        print(env_info())
        inputs_timing()
    elif len(sys.argv) in (2, 3) and sys.argv[1] == "--op":  # --op [results name]
        print(env_info())
        op_rounds(*sys.argv[2:])
    elif len(sys.argv) == 4 and sys.argv[1] == "--rescore":  # --rescore results.json copy_gbps
        rescored = rescore(sys.argv[2])
        restamp(_write(rescored, float(sys.argv[3]), 0), rescored[0])
        summary(rescored)
    else:
        main()
