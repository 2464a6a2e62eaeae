"""A Llama-style model with Megatron-style tensor parallelism, compiled with attnfuse.

Attention heads are split across ranks: q/k/v projections are column-parallel (each rank
holds ``heads / world`` query heads and ``kv_heads / world`` KV heads, and its own slice
of the static KV cache), the output projection is row-parallel and followed by an
all-reduce; the MLP's gate/up are column-parallel, down is row-parallel and all-reduced.
Every rank compiles its own graph, collectives included, through ``attnfuse.patch_model``.

Run on 2 GPUs (NCCL) or 2 CPU processes (gloo)::

    torchrun --nproc-per-node 2 examples/tensor_parallel.py            # checks tokens
    torchrun --nproc-per-node 2 examples/tensor_parallel.py --ctx 32768 --bench

With ``mode="reduce-overhead"`` the all-reduces are captured in CUDA graphs; free those
graphs (``torch._dynamo.reset()``) before ``destroy_process_group``, whose NCCL teardown
otherwise hangs (pytorch/pytorch#115388; ``benchmarks/bench_tensor_parallel.py`` does so).

``build_full`` makes the single-process model; ``shard`` cuts its weights for one rank,
so the test can check that the sharded, patched model gives the same output.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

#: Llama's RMSNorm epsilon
RMS_EPS = 1e-5


@dataclass(frozen=True)
class TPConfig:
    vocab: int = 512
    hidden: int = 256
    intermediate: int = 512
    layers: int = 2
    heads: int = 8
    kv_heads: int = 2
    head_dim: int = 32
    max_len: int = 64
    batch: int = 1
    rope_theta: float = 500000.0


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _all_reduce(x: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(x)
    return x


class Attention(nn.Module):
    def __init__(self, cfg: TPConfig, world: int) -> None:
        super().__init__()
        if cfg.heads % world or cfg.kv_heads % world:
            raise ValueError(f"world: {world} must divide heads={cfg.heads} and kv_heads={cfg.kv_heads}")
        self.cfg, self.world = cfg, world
        self.heads, self.kv_heads = cfg.heads // world, cfg.kv_heads // world
        d = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden, self.heads * d, bias=False)      # column-parallel
        self.k_proj = nn.Linear(cfg.hidden, self.kv_heads * d, bias=False)   # column-parallel
        self.v_proj = nn.Linear(cfg.hidden, self.kv_heads * d, bias=False)   # column-parallel
        self.o_proj = nn.Linear(self.heads * d, cfg.hidden, bias=False)      # row-parallel
        shape = (cfg.batch, self.kv_heads, cfg.max_len, d)
        self.register_buffer("k_cache", torch.zeros(shape), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape), persistent=False)

    def forward(self, x, cos, sin, cache_position, mask):
        b, s, _ = x.shape
        d = self.cfg.head_dim
        q = self.q_proj(x).view(b, s, self.heads, d).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.kv_heads, d).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.kv_heads, d).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        self.k_cache.index_copy_(2, cache_position, k)
        self.v_cache.index_copy_(2, cache_position, v)
        n_rep = self.heads // self.kv_heads
        keys = self.k_cache[:, :, None].expand(b, self.kv_heads, n_rep, self.cfg.max_len, d).reshape(b, self.heads, -1, d)
        vals = self.v_cache[:, :, None].expand(b, self.kv_heads, n_rep, self.cfg.max_len, d).reshape(b, self.heads, -1, d)
        out = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask, scale=d ** -0.5)
        out = self.o_proj(out.transpose(1, 2).reshape(b, s, self.heads * d))
        return _all_reduce(out, self.world)


class Block(nn.Module):
    def __init__(self, cfg: TPConfig, world: int) -> None:
        super().__init__()
        self.world = world
        self.attn_norm = nn.RMSNorm(cfg.hidden, eps=RMS_EPS)
        self.attn = Attention(cfg, world)
        self.mlp_norm = nn.RMSNorm(cfg.hidden, eps=RMS_EPS)
        inter = cfg.intermediate // world
        self.gate = nn.Linear(cfg.hidden, inter, bias=False)   # column-parallel
        self.up = nn.Linear(cfg.hidden, inter, bias=False)     # column-parallel
        self.down = nn.Linear(inter, cfg.hidden, bias=False)   # row-parallel

    def forward(self, x, cos, sin, cache_position, mask):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache_position, mask)
        h = self.mlp_norm(x)
        return x + _all_reduce(self.down(F.silu(self.gate(h)) * self.up(h)), self.world)


class TPModel(nn.Module):
    """The model one rank holds (``world=1``: the whole model)."""

    def __init__(self, cfg: TPConfig, world: int = 1) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.hidden)
        self.blocks = nn.ModuleList(Block(cfg, world) for _ in range(cfg.layers))
        self.norm = nn.RMSNorm(cfg.hidden, eps=RMS_EPS)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab, bias=False)
        inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def reset_cache(self) -> None:
        for blk in self.blocks:
            blk.attn.k_cache.zero_()
            blk.attn.v_cache.zero_()

    def forward(self, input_ids: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        freqs = cache_position[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)[None]
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        kv_pos = torch.arange(self.cfg.max_len, device=input_ids.device)
        mask = (kv_pos[None, :] <= cache_position[:, None])[None, None]
        for blk in self.blocks:
            x = blk(x, cos, sin, cache_position, mask)
        return self.lm_head(self.norm(x))


def build_full(cfg: TPConfig, seed: int = 0) -> TPModel:
    torch.manual_seed(seed)
    return TPModel(cfg, 1).eval()


def shard(full: TPModel, rank: int, world: int) -> TPModel:
    """This rank's slice of ``full``: column-parallel rows, row-parallel columns."""
    cfg = full.cfg
    part = TPModel(cfg, world).eval()
    d = cfg.head_dim

    def rows(w: torch.Tensor, n: int) -> torch.Tensor:
        step = w.shape[0] // world
        return w[rank * step:(rank + 1) * step] if n else w

    def cols(w: torch.Tensor) -> torch.Tensor:
        step = w.shape[1] // world
        return w[:, rank * step:(rank + 1) * step]

    with torch.no_grad():
        part.embed.weight.copy_(full.embed.weight)
        part.norm.weight.copy_(full.norm.weight)
        part.lm_head.weight.copy_(full.lm_head.weight)
        for pb, fb in zip(part.blocks, full.blocks):
            pb.attn_norm.weight.copy_(fb.attn_norm.weight)
            pb.mlp_norm.weight.copy_(fb.mlp_norm.weight)
            pb.attn.q_proj.weight.copy_(rows(fb.attn.q_proj.weight, d))
            pb.attn.k_proj.weight.copy_(rows(fb.attn.k_proj.weight, d))
            pb.attn.v_proj.weight.copy_(rows(fb.attn.v_proj.weight, d))
            pb.attn.o_proj.weight.copy_(cols(fb.attn.o_proj.weight))
            pb.gate.weight.copy_(rows(fb.gate.weight, 1))
            pb.up.weight.copy_(rows(fb.up.weight, 1))
            pb.down.weight.copy_(cols(fb.down.weight))
    return part


def greedy(model: TPModel, prompt: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill + ``steps`` greedy decode steps; returns tokens and the last logits."""
    model.reset_cache()
    dev, s = prompt.device, prompt.shape[1]
    logits = model(prompt, torch.arange(s, device=dev))
    tok = logits[:, -1].argmax(-1, keepdim=True)
    out = [tok]
    for i in range(steps):
        logits = model(tok, torch.tensor([s + i], device=dev))
        tok = logits[:, -1].argmax(-1, keepdim=True)
        out.append(tok)
    return torch.cat(out, dim=1), logits


#: decode steps run before timing (compilation, autotuning, allocator warm-up)
WARMUP_STEPS = 3


def time_decode(model: TPModel, cfg: TPConfig, dev: torch.device, steps: int) -> float:
    """Median ms per decode step at the end of a full cache (random cache contents)."""
    for blk in model.blocks:
        blk.attn.k_cache.normal_()
        blk.attn.v_cache.normal_()
    tok = torch.randint(0, cfg.vocab, (cfg.batch, 1), device=dev)
    times = []
    for i in range(WARMUP_STEPS + steps):
        pos = torch.tensor([cfg.max_len - steps - WARMUP_STEPS + i], device=dev)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        model(tok, pos)
        end.record()
        end.synchronize()
        if i >= WARMUP_STEPS:
            times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--ctx", type=int, default=None, help="static cache length (default: small)")
    p.add_argument("--bench", action="store_true", help="time decode steps, eager vs patched")
    p.add_argument("--backend", default=None, help="attnfuse (default on GPU) or attnfuse_eager")
    args = p.parse_args(argv)

    import attnfuse

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(dev)
    dtype = torch.bfloat16 if cuda else torch.float32
    cfg = TPConfig()
    if args.ctx:
        cfg = replace(cfg, max_len=args.ctx, hidden=4096, intermediate=14336, heads=32, kv_heads=8,
                      head_dim=128, layers=4, vocab=32000)
    full = build_full(cfg)
    model = shard(full, rank, world).to(dev, dtype)
    del full
    prompt = torch.randint(0, cfg.vocab, (cfg.batch, 8), generator=torch.Generator().manual_seed(1)).to(dev)
    with torch.no_grad():
        eager_tokens, _ = greedy(model, prompt, args.steps)
        attnfuse.patch_model(model, backend=args.backend or ("attnfuse" if cuda else "attnfuse_eager"))
        fused_tokens, _ = greedy(model, prompt, args.steps)
        if rank == 0:
            print(attnfuse.report_of(model).table())
            print("same tokens:", torch.equal(eager_tokens, fused_tokens))
        if args.bench and cuda:
            timings = {"attnfuse": time_decode(model, cfg, dev, args.steps)}
            attnfuse.unpatch_model(model)
            timings["eager"] = time_decode(model, cfg, dev, args.steps)
            model.forward = torch.compile(model.forward)
            timings["inductor"] = time_decode(model, cfg, dev, args.steps)
            if rank == 0:
                for name, ms in timings.items():
                    print(f"TP={world} ctx={cfg.max_len} B={cfg.batch} {name}: {ms:.3f} ms/step, "
                          f"{cfg.batch * 1e3 / ms:.1f} tokens/s")
    dist.destroy_process_group()
    return 0 if torch.equal(eager_tokens, fused_tokens) else 1


if __name__ == "__main__":
    sys.exit(main())
