"""``attnfuse demo``: a small Llama-style model, eager against patched, on CPU or GPU.

The embedded model is written the way Hugging Face's Llama with a ``StaticCache`` is:
RoPE (rotate-half) on q and k, the cache written with ``index_copy_`` at the cache
positions, an attention mask over the whole static cache, and ``repeat_kv`` + SDPA for
grouped-query attention. That is the unfused code attnfuse exists for: the demo runs a
prefill and greedy decode steps eagerly and through ``attnfuse.patch_model``, prints the
fusion report, checks that both produce the same tokens and, on a GPU, prints decode
tokens per second for both.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class DemoConfig:
    vocab: int = 512
    hidden: int = 256
    layers: int = 2
    heads: int = 8
    kv_heads: int = 2
    head_dim: int = 32
    max_len: int = 64
    rope_theta: float = 10000.0
    batch: int = 1
    prompt_len: int = 8
    decode_steps: int = 16
    seed: int = 0


#: the model's own RMSNorm epsilon (Llama's default)
RMS_EPS = 1e-5


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


class _Attention(nn.Module):
    def __init__(self, cfg: DemoConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.q_proj = nn.Linear(cfg.hidden, cfg.heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden, cfg.kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden, cfg.kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.heads * cfg.head_dim, cfg.hidden, bias=False)
        shape = (cfg.batch, cfg.kv_heads, cfg.max_len, cfg.head_dim)
        self.register_buffer("k_cache", torch.zeros(shape), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape), persistent=False)

    def forward(self, x, cos, sin, cache_position, mask):
        cfg = self.cfg
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, cfg.heads, cfg.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, cfg.kv_heads, cfg.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, cfg.kv_heads, cfg.head_dim).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        self.k_cache.index_copy_(2, cache_position, k)
        self.v_cache.index_copy_(2, cache_position, v)
        n_rep = cfg.heads // cfg.kv_heads
        keys = _repeat_kv(self.k_cache, n_rep)
        values = _repeat_kv(self.v_cache, n_rep)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=cfg.head_dim ** -0.5)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, cfg.heads * cfg.head_dim))


class _Block(nn.Module):
    def __init__(self, cfg: DemoConfig) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.hidden, eps=RMS_EPS)
        self.attn = _Attention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.hidden, eps=RMS_EPS)
        self.gate = nn.Linear(cfg.hidden, 2 * cfg.hidden, bias=False)
        self.up = nn.Linear(cfg.hidden, 2 * cfg.hidden, bias=False)
        self.down = nn.Linear(2 * cfg.hidden, cfg.hidden, bias=False)

    def forward(self, x, cos, sin, cache_position, mask):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache_position, mask)
        h = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class DemoModel(nn.Module):
    """A Llama-style decoder with a static KV cache held in buffers."""

    def __init__(self, cfg: DemoConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.hidden)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.layers))
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
        # a mask over the whole static cache, as HF builds it inside compiled regions
        kv_pos = torch.arange(self.cfg.max_len, device=input_ids.device)
        mask = (kv_pos[None, :] <= cache_position[:, None])[None, None]
        for blk in self.blocks:
            x = blk(x, cos, sin, cache_position, mask)
        return self.lm_head(self.norm(x))


def greedy(model: DemoModel, prompt: torch.Tensor, steps: int) -> tuple[torch.Tensor, float]:
    """Prefill then ``steps`` greedy decode steps; returns tokens and decode seconds."""
    model.reset_cache()
    dev = prompt.device
    s = prompt.shape[1]
    logits = model(prompt, torch.arange(s, device=dev))
    tok = logits[:, -1].argmax(-1, keepdim=True)
    out = [tok]
    _sync(dev)
    start = time.perf_counter()
    for i in range(steps - 1):
        logits = model(tok, torch.tensor([s + i], device=dev))
        tok = logits[:, -1].argmax(-1, keepdim=True)
        out.append(tok)
    _sync(dev)
    return torch.cat(out, dim=1), time.perf_counter() - start


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def run_demo(device: str | None = None, steps: int | None = None, backend: str = "attnfuse") -> int:
    import attnfuse

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = DemoConfig()
    if steps is not None:
        cfg = DemoConfig(decode_steps=steps)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(cfg.seed)
    model = DemoModel(cfg).to(dev, dtype).eval()
    prompt = torch.randint(0, cfg.vocab, (cfg.batch, cfg.prompt_len), device=dev)
    print(f"attnfuse demo: {cfg.layers}-layer Llama-style model, {cfg.heads} q / {cfg.kv_heads} kv heads, "
          f"static cache {cfg.max_len}, {dev.type}, {str(dtype).replace('torch.', '')}")
    with torch.no_grad():
        eager_tokens, eager_s = greedy(model, prompt, cfg.decode_steps)
        t0 = time.perf_counter()
        attnfuse.patch_model(model, backend=backend)
        fused_tokens, _ = greedy(model, prompt, cfg.decode_steps)  # compiles prefill + decode
        compile_s = time.perf_counter() - t0
        fused_tokens, fused_s = greedy(model, prompt, cfg.decode_steps)
    print()
    print(attnfuse.report_of(model).table())
    print()
    same = torch.equal(eager_tokens, fused_tokens)
    print(f"tokens eager:   {eager_tokens[0].tolist()}")
    print(f"tokens patched: {fused_tokens[0].tolist()}")
    print(f"same tokens: {'yes' if same else 'NO'}   (first compile + run: {compile_s:.1f} s)")
    if dev.type == "cuda":
        n = cfg.batch * (cfg.decode_steps - 1)
        print(f"decode tokens/s: eager {n / eager_s:.0f}, attnfuse {n / fused_s:.0f}")
    return 0 if same else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="attnfuse demo", description=__doc__.splitlines()[0])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--steps", type=int, default=None, help="decode steps (default 16)")
    p.add_argument("--backend", default="attnfuse", choices=["attnfuse", "attnfuse_eager"])
    args = p.parse_args(argv)
    return run_demo(args.device, args.steps, args.backend)
