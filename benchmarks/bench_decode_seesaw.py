"""MLA decode stage 1 with the two warpgroups out of phase (``mla_seesaw_kernel.py``): an
experiment, not used by the op.

    python benchmarks/bench_decode_seesaw.py --check   # vs the float32 reference (GPU)
    python benchmarks/bench_decode_seesaw.py           # timing table (GPU)
    python benchmarks/bench_decode_seesaw.py --trace   # cycle trace of one program

The timing table runs the op's MLA path (``grouped_decode_kernel``: stage 1 + stage 2,
default split counts) with stage 1 swapped between the op's SM90 Gluon kernel (``sm90``)
and the seesaw kernel (``seesaw``), CUDA-graph replays, random order, median of 3-5
rounds, against FlashInfer's ``BatchMLAPagedAttentionWrapper`` (fa3). ``*_noload`` are
the same kernels with every KV copy past position 128 masked off (zero-filled tiles):
what the schedule costs without memory traffic. It writes ``results/bench_decode_seesaw``
(``.json``, ``.md``); the findings are in ``results/bench_decode_sweep_v12.md``.
"""
from __future__ import annotations

import argparse
import importlib.util
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, "benchmarks")
from bench_decode import (  # noqa: E402
    DEV, DT, MLA_CKV, MLA_KPE, MLA_SCALE, flashinfer_mla, ours_mla, paged_mla)
from common import bench_us, write_results  # noqa: E402

import mla_seesaw_kernel as seesaw  # noqa: E402
from attnfuse.custom_ops.grouped_decode import reference  # noqa: E402
from attnfuse.custom_ops.kernels import grouped_decode as gd  # noqa: E402
from attnfuse.custom_ops.kernels import mla_decode_sm90  # noqa: E402
from attnfuse.custom_ops.kernels._launch import Launcher  # noqa: E402


class SeesawLaunch:
    """Stands in for the op's SM90 stage-1 launcher (same arguments) and runs the seesaw
    kernel: 4 warps in the default partition, the register cap of ``MAX_REGS``."""

    #: ``--stagger``: the kernel's ``STAGGER`` switch for every launch
    default_stagger = False

    def __init__(self, noload: bool = False, dbg: torch.Tensor | None = None,
                 stagger: bool | None = None) -> None:
        self.noload, self.dbg = noload, dbg
        self.stagger = self.default_stagger if stagger is None else stagger

    def __call__(self, grid, args, constexprs, *, num_warps, num_stages=3):
        dbg = self.dbg if self.dbg is not None else args[0]  # never written without TRACE
        seesaw.mla_seesaw_stage1[grid](
            *args, dbg, **constexprs, NOLOAD=self.noload, TRACE=self.dbg is not None,
            STAGGER=self.stagger,
            num_warps=seesaw.NUM_WARPS, maxnreg=seesaw.MAX_REGS)


def sm90_noload():
    """The op's SM90 kernel with the same masking of every copy past position 128."""
    src = open(mla_decode_sm90.__file__).read()
    old = "ok = pos < hi"
    assert src.count(old) == 1, "mla_decode_sm90._tile_rows changed: update this variant"
    src = src.replace(old, "ok = (pos < hi) & (pos < 128)").replace(
        "from .._dispatch import cuda_major", "cuda_major = None")
    path = "/tmp/attnfuse_sm90_noload.py"
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location("attnfuse_sm90_noload", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return Launcher(module.mla_decode_sm90_stage1, maxnreg=module.MAX_REGS)


def check() -> bool:
    """Ragged lengths (0, 1, one tile, an odd tile count, long), 1-8 splits, 16-128 heads."""
    ok = True
    torch.manual_seed(0)
    for heads in (128, 64, 16):
        kv, table, _ = paged_mla(6, 4096)
        q = torch.randn(6, heads, MLA_CKV + MLA_KPE, device=DEV, dtype=DT)
        lens = torch.tensor([0, 1, 64, 100, 3000, 4096], device=DEV, dtype=torch.int32)
        ref, ref_lse = reference(q.float(), kv.unsqueeze(2).float(), None, table, lens, None,
                                 MLA_SCALE, 0.0, -1, None, None, MLA_CKV)[:2]
        for splits in (1, 3, 8):
            gd._STAGE1_SM90 = SeesawLaunch()
            out, lse, _ = ours_mla(q, kv, table, lens, num_kv_splits=splits)()
            torch.cuda.synchronize()
            err = (out.float() - ref).abs().max().item()
            lse_err = (lse[1:] - ref_lse[1:]).abs().max().item()
            good = (err < 2e-2 and lse_err < 1e-3 and bool((out[0] == 0).all())
                    and bool(torch.isinf(lse[0]).all()) and not out.isnan().any())
            ok &= good
            print(f"check heads={heads} splits={splits} max|out-ref|={err:.3g} "
                  f"max|lse-ref|={lse_err:.3g} {'ok' if good else 'FAIL'}", flush=True)
    gd._STAGE1_SM90 = _OP_STAGE1
    return ok


def timing() -> None:
    launchers = {"sm90": _OP_STAGE1, "seesaw": SeesawLaunch()}
    noload = {"sm90_noload": sm90_noload(), "seesaw_noload": SeesawLaunch(noload=True)}
    points = [(128, 1, 32768), (128, 16, 4096), (128, 16, 32768), (128, 64, 4096),
              (128, 64, 32768), (128, 128, 4096), (128, 1, 131072), (16, 64, 4096),
              (16, 16, 32768)]
    with_noload = {(128, 64, 4096), (128, 64, 32768), (128, 16, 32768), (128, 1, 32768)}
    rows, t0 = [], time.time()
    for heads, batch, ctx in points:
        torch.manual_seed(0)
        kv, table, lens = paged_mla(batch, ctx)
        q = torch.randn(batch, heads, MLA_CKV + MLA_KPE, device=DEV, dtype=DT)
        variants = dict(launchers, **(noload if (heads, batch, ctx) in with_noload else {}))
        times = {k: [] for k in variants}
        for _ in range(3 if batch * ctx > 2 ** 21 else 5):
            order = list(variants)
            random.shuffle(order)
            for k in order:
                gd._STAGE1_SM90 = variants[k]
                times[k].append(bench_us(ours_mla(q, kv, table, lens), cuda_graph=True))
        gd._STAGE1_SM90 = _OP_STAGE1
        us = {k: statistics.median(v) for k, v in times.items()}
        fi = statistics.median(bench_us(flashinfer_mla(q, kv, table, lens, heads),
                                        cuda_graph=True) for _ in range(3))
        rows.append(dict(heads=heads, batch=batch, ctx=ctx,
                         **{f"{k}_us": v for k, v in us.items()}, flashinfer_us=fi,
                         fi_over_sm90=fi / us["sm90"], fi_over_seesaw=fi / us["seesaw"]))
        print(rows[-1], f"t={time.time() - t0:.0f}s", flush=True)
        del kv, table
        torch.cuda.empty_cache()
    print(write_results("bench_decode_seesaw", rows, COLUMNS, TITLE, NOTES).read_text())


COLUMNS = ["heads", "batch", "ctx", "sm90_us", "seesaw_us", "sm90_noload_us",
           "seesaw_noload_us", "flashinfer_us", "fi_over_sm90", "fi_over_seesaw"]
TITLE = "MLA decode stage 1: the op's SM90 kernel vs the seesaw experiment"
NOTES = ("`benchmarks/bench_decode_seesaw.py`: the op's MLA path with stage 1 swapped; "
         "`*_noload`: every KV copy past position 128 masked off; fi_over_x = FlashInfer "
         "time / x time (> 1: x faster). Findings: `bench_decode_sweep_v12.md`.")

TRACE_NAMES = ["wg0 S_A start", "wg0 S_A done", "wg0 P_A published", "wg0 P_A V_L done",
               "wg0 P_B received", "wg0 P_B V_L done", "wg1 S_B start", "wg1 S_B done",
               "wg1 m_A received", "wg1 P_B published", "wg1 P_A V_R done",
               "wg1 P_B V_R done", "loader A rope", "loader A left", "loader A right",
               "loader B rope", "loader B left", "loader B right"]


def trace() -> None:
    """Cycle counter at 18 points of pairs 8-15 of program (0, 0, 0), MLA-128 B=64 32k."""
    torch.manual_seed(0)
    kv, table, lens = paged_mla(64, 32768)
    q = torch.randn(64, 128, MLA_CKV + MLA_KPE, device=DEV, dtype=DT)
    for noload in (False, True):
        dbg = torch.zeros(seesaw.TRACE_PAIRS * seesaw.TRACE_SLOTS, dtype=torch.int64,
                          device=DEV)
        gd._STAGE1_SM90 = SeesawLaunch(noload=noload, dbg=dbg)
        for _ in range(3):
            ours_mla(q, kv, table, lens)()
        torch.cuda.synchronize()
        gd._STAGE1_SM90 = _OP_STAGE1
        d = dbg.view(seesaw.TRACE_PAIRS, seesaw.TRACE_SLOTS).cpu()
        start = d[0, 0].item()
        print(f"\n{'no KV loads' if noload else 'KV loads'}: cycles from pair 8's S_A start")
        print("| point | " + " | ".join(f"pair {p + 8}" for p in range(8)) + " |")
        print("|---|" + "---|" * 8)
        for slot, name in enumerate(TRACE_NAMES):
            print(f"| {name} | " + " | ".join(str(d[p, slot].item() - start)
                                            for p in range(8)) + " |")
        periods = [(d[p + 1, 0] - d[p, 0]).item() for p in range(seesaw.TRACE_PAIRS - 1)]
        print(f"pair period: median {statistics.median(periods):.0f} cycles "
              f"(min {min(periods)}, max {max(periods)})")


_OP_STAGE1 = gd._STAGE1_SM90

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--trace", action="store_true")
    parser.add_argument("--stagger", action="store_true",
                        help="warpgroup 1's score product after warpgroup 0's (STAGGER; "
                             "with --check or --trace)")
    opts = parser.parse_args()
    if opts.stagger and not (opts.check or opts.trace):
        parser.error("--stagger goes with --check or --trace (the timing table compares "
                     "the committed schedules)")
    SeesawLaunch.default_stagger = opts.stagger
    try:
        import flashinfer
        fi_version = flashinfer.__version__
    except ImportError:
        fi_version = "not installed"
    print(f"GPU: {torch.cuda.get_device_name()} · torch {torch.__version__} · "
          f"triton {__import__('triton').__version__} · flashinfer {fi_version}")
    if opts.check:
        sys.exit(0 if check() else 1)
    if opts.trace:
        trace()
    else:
        timing()
