"""Tensor parallel on CPU: 2 gloo processes, each compiling its own shard with attnfuse."""

from __future__ import annotations

import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
sys.path.insert(0, EXAMPLES)

from tensor_parallel import TPConfig, build_full, greedy, shard  # noqa: E402

WORLD = 2
DECODE_STEPS = 4
#: float32 sharded matmuls + all-reduce sum in another order than the full model
TP_TOL = 1e-4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, queue) -> None:
    import attnfuse

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        cfg = TPConfig()
        model = shard(build_full(cfg), rank, WORLD)
        prompt = torch.randint(0, cfg.vocab, (cfg.batch, 8), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            attnfuse.patch_model(model, backend="attnfuse_eager")
            tokens, logits = greedy(model, prompt, DECODE_STEPS)
        report = attnfuse.report_of(model)
        near = sorted({(m.fusion, m.reason) for m in report.near_misses})
        # plain Python values: tensors through a queue would share memory with a process
        # that is about to exit
        queue.put((rank, tokens.tolist(), logits.tolist(), report.counts, near, model.blocks[0].attn.heads,
                   model.blocks[0].attn.kv_heads))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_rank_tensor_parallel_matches_single_process():
    cfg = TPConfig()
    full = build_full(cfg)
    prompt = torch.randint(0, cfg.vocab, (cfg.batch, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want_tokens, want_logits = greedy(full, prompt, DECODE_STEPS)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, port, queue)) for r in range(WORLD)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=600) for _ in range(WORLD)]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for rank, tokens, logits, counts, near, heads, kv_heads in results:
        assert heads == cfg.heads // WORLD and kv_heads == cfg.kv_heads // WORLD
        assert tokens == want_tokens.tolist(), f"rank {rank}"
        torch.testing.assert_close(torch.tensor(logits), want_logits, atol=TP_TOL, rtol=TP_TOL)
        # every layer's RoPE + cache write and decode attention are rewritten on every rank
        assert counts.get("rope_kv_write") == 2 * cfg.layers, (rank, counts, near)
        assert counts.get("grouped_decode") == cfg.layers, (rank, counts, near)
