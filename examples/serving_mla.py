"""A DeepSeek-style MLA model written in plain torch the way serving engines write it.

What it shows: the graph ``mla_short_prefill`` rewrites. Tokens of a batch are flattened
to ``(T, hidden)``; each layer keeps a latent cache ``(slots, kv_lora_rank)`` and a RoPE
key cache ``(slots, rope_dim)`` addressed by a slot mapping (one slot per token, as in
SGLang's token-to-KV pool); attention runs in the *absorbed* form in both phases:

* prefill: ``q_lat = bmm(q_nope, W_UK)``; attention of ``[q_lat ; q_pe]`` over the
  prompt's own ``[ckv ; k_pe]`` (causal; SDPA or an explicit matmul-softmax-matmul, or,
  with ``index_topk`` set, DeepSeek-V3.2-style sparse attention over the top-k tokens a
  small indexer picks); ``out = bmm(o_lat, W_UV)``. ``mla_short_prefill`` turns this
  into ``attnfuse::mla_prefill``, which may run it decompressed (MHA) instead.
* decode: the same projections around attention of one query per sequence over the
  latent cache gathered through a slot table (``grouped_decode`` matches this form).

Random weights from a small config with DeepSeek-V3's ratios (kv_lora_rank 64, rope 16,
nope 32, v 32). Run ``python examples/serving_mla.py`` for a greedy generation with and
without the fusion.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class MLAConfig:
    vocab_size: int = 512
    hidden_size: int = 256
    intermediate_size: int = 512
    num_layers: int = 2
    num_heads: int = 8
    q_lora_rank: int = 96
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    #: slots per sequence in the caches (the longest prompt + generated tokens)
    max_seq_len: int = 64
    max_batch: int = 4
    #: "sdpa" or "matmul": how prefill attention over the latent is written
    prefill_attention: str = "sdpa"
    #: DeepSeek-V3.2 sparse attention: each query attends its top-k tokens (None: dense)
    index_topk: Optional[int] = None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class RotaryEmbedding(nn.Module):
    def __init__(self, dim: int, theta: float) -> None:
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / theta ** (torch.arange(0, dim, 2).float() / dim),
                             persistent=False)

    def forward(self, positions: torch.Tensor, q_pe: torch.Tensor, k_pe: torch.Tensor):
        """q_pe (T, H, D), k_pe (T, D), positions (T,)."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos(), emb.sin()
        q = q_pe.float() * cos[:, None] + rotate_half(q_pe.float()) * sin[:, None]
        k = k_pe.float() * cos + rotate_half(k_pe.float()) * sin
        return q.to(q_pe.dtype), k.to(k_pe.dtype)


class MLAAttention(nn.Module):
    def __init__(self, cfg: MLAConfig) -> None:
        super().__init__()
        self.cfg = cfg
        H, R = cfg.num_heads, cfg.kv_lora_rank
        self.qk_head_dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        self.scale = self.qk_head_dim ** -0.5
        self.q_a_proj = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=False)
        self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
        self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.hidden_size, R + cfg.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(R, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(R, H * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * cfg.v_head_dim, cfg.hidden_size, bias=False)
        self.rotary = RotaryEmbedding(cfg.qk_rope_head_dim, cfg.rope_theta)
        if cfg.index_topk is not None:
            # a stand-in for DeepSeek-V3.2's lightning indexer: its own small query/key
            self.indexer_q = nn.Linear(cfg.hidden_size, cfg.qk_rope_head_dim, bias=False)
            self.indexer_k = nn.Linear(cfg.hidden_size, cfg.qk_rope_head_dim, bias=False)
        slots = cfg.max_batch * cfg.max_seq_len
        self.register_buffer("latent_cache", torch.zeros(slots, R), persistent=False)
        self.register_buffer("pe_cache", torch.zeros(slots, cfg.qk_rope_head_dim), persistent=False)
        self.w_kc: Optional[torch.Tensor] = None
        self.w_vc: Optional[torch.Tensor] = None

    def absorb_weights(self) -> None:
        """Split kv_b_proj into W_UK (H, nope, R) and W_UV (H, R, v) after loading, as
        SGLang's ``post_load_weights`` does."""
        cfg = self.cfg
        w = self.kv_b_proj.weight.detach().unflatten(0, (cfg.num_heads, -1))
        w_kc, w_vc = w.split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=1)
        self.w_kc = w_kc.contiguous()
        self.w_vc = w_vc.transpose(1, 2).contiguous()

    def _project(self, hidden: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor):
        cfg = self.cfg
        T = hidden.shape[0]
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden))).view(T, cfg.num_heads, -1)
        q_nope, q_pe = q.split([cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_proj_with_mqa(hidden)
        ckv, k_pe = latent.split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        ckv = self.kv_a_layernorm(ckv)
        q_pe, k_pe = self.rotary(positions, q_pe, k_pe)
        self.latent_cache[slots] = ckv
        self.pe_cache[slots] = k_pe
        # absorbed: queries move into the latent space through W_UK
        q_lat = torch.bmm(q_nope.transpose(0, 1), self.w_kc).transpose(0, 1)
        return q_lat, q_pe, ckv, k_pe

    def _finish(self, o_lat: torch.Tensor) -> torch.Tensor:
        # (T, H, R) -> (H, T, R) @ W_UV -> (T, H * v)
        out = torch.bmm(o_lat.transpose(0, 1), self.w_vc).transpose(0, 1)
        return self.o_proj(out.reshape(out.shape[0], -1))

    def prefill(self, hidden, positions, slots, batch: int) -> torch.Tensor:
        """``hidden`` (T, hidden) holds ``batch`` prompts of equal length, back to back."""
        cfg = self.cfg
        q_lat, q_pe, ckv, k_pe = self._project(hidden, positions, slots)
        if cfg.index_topk is not None:
            return self._finish(self._sparse_prefill(hidden, q_lat, q_pe, ckv, k_pe, batch))
        T, H, R = q_lat.shape
        S = T // batch
        q = torch.cat([q_lat, q_pe], dim=-1).view(batch, S, H, -1).transpose(1, 2)
        k = torch.cat([ckv, k_pe], dim=-1).view(batch, 1, S, -1)
        v = ckv.view(batch, 1, S, R)
        if cfg.prefill_attention == "sdpa":
            o = F.scaled_dot_product_attention(q, k.expand(-1, H, -1, -1), v.expand(-1, H, -1, -1),
                                               is_causal=True, scale=self.scale)
        else:
            scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale
            causal = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
            scores = scores.masked_fill(~causal, float("-inf"))
            o = torch.matmul(torch.softmax(scores.float(), dim=-1).to(q.dtype), v)
        return self._finish(o.transpose(1, 2).reshape(T, H, R))

    def _sparse_prefill(self, hidden, q_lat, q_pe, ckv, k_pe, batch: int) -> torch.Tensor:
        T, H, R = q_lat.shape
        S = T // batch
        topk = self.cfg.index_topk
        # indexer: causal scores within each prompt, top-k rows (global), -1 where a query
        # has fewer than k visible tokens
        iq = self.indexer_q(hidden).view(batch, S, -1)
        ik = self.indexer_k(hidden).view(batch, S, -1)
        iscores = torch.matmul(iq, ik.transpose(-1, -2))
        causal = torch.ones(S, S, dtype=torch.bool, device=hidden.device).tril()
        iscores = iscores.masked_fill(~causal, float("-inf"))
        top_scores, top = iscores.topk(min(topk, S), dim=-1)
        base = (torch.arange(batch, device=hidden.device) * S).view(batch, 1, 1)
        indices = torch.where(top_scores > float("-inf"), top + base, -1).view(T, -1)
        # sparse absorbed attention: gather each query's latents, attend, project back
        kv = torch.cat([ckv, k_pe], dim=-1)
        gathered = kv[indices.clamp(min=0)]                      # (T, k, R + rope)
        q = torch.cat([q_lat, q_pe], dim=-1)                       # (T, H, R + rope)
        scores = torch.bmm(q, gathered.transpose(1, 2)) * self.scale
        scores = scores.masked_fill((indices < 0).unsqueeze(1), float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        return torch.bmm(probs, gathered[..., :R])

    def decode(self, hidden, positions, slots, slot_table, context_lens) -> torch.Tensor:
        """One new token per sequence; ``slot_table`` (B, L) lists each sequence's slots."""
        q_lat, q_pe, _, _ = self._project(hidden, positions, slots)
        B, H, R = q_lat.shape
        L = slot_table.shape[1]
        q = torch.cat([q_lat, q_pe], dim=-1).unsqueeze(2)                       # (B, H, 1, R+rope)
        k = torch.cat([self.latent_cache[slot_table], self.pe_cache[slot_table]], dim=-1)
        v = self.latent_cache[slot_table]                                       # (B, L, R)
        valid = torch.arange(L, device=hidden.device)[None, :] < context_lens[:, None]
        o = F.scaled_dot_product_attention(
            q, k.unsqueeze(1).expand(-1, H, -1, -1), v.unsqueeze(1).expand(-1, H, -1, -1),
            attn_mask=valid[:, None, None, :], scale=self.scale)
        return self._finish(o.squeeze(2))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: MLAConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLAAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gate_up = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)

    def forward(self, hidden, attend) -> torch.Tensor:
        hidden = hidden + attend(self.self_attn, self.input_layernorm(hidden))
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class MLAForCausalLM(nn.Module):
    def __init__(self, cfg: MLAConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @classmethod
    def random(cls, cfg: MLAConfig, *, seed: int = 0, dtype: torch.dtype = torch.float32,
               device: str = "cpu") -> "MLAForCausalLM":
        torch.manual_seed(seed)
        model = cls(cfg)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 2:
                    # small init keeps logits of a random 2-layer model away from ties
                    p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]))
        model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        for layer in model.layers:
            layer.self_attn.absorb_weights()
        return model

    def prefill(self, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor):
        """input_ids, positions, slots: (B, S). Returns logits of each prompt's last token."""
        B, S = input_ids.shape
        hidden = self.embed_tokens(input_ids.reshape(-1))
        for layer in self.layers:
            hidden = layer(hidden, lambda attn, h: attn.prefill(h, positions.reshape(-1),
                                                                slots.reshape(-1), B))
        last = self.norm(hidden).view(B, S, -1)[:, -1]
        return self.lm_head(last)

    def decode(self, input_ids, positions, slots, slot_table, context_lens):
        """input_ids, positions, slots, context_lens: (B,); slot_table (B, L)."""
        hidden = self.embed_tokens(input_ids)
        for layer in self.layers:
            hidden = layer(hidden, lambda attn, h: attn.decode(h, positions, slots, slot_table,
                                                               context_lens))
        return self.lm_head(self.norm(hidden))

    def slots_for(self, batch: int, positions: torch.Tensor) -> torch.Tensor:
        """Slot of each (sequence, position): sequence b owns a contiguous slot range."""
        base = torch.arange(batch, device=positions.device)[:, None] * self.cfg.max_seq_len
        return base + positions

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, steps: int, *, prefill_fn=None,
                 decode_fn=None) -> torch.Tensor:
        """Greedy generation for equal-length prompts ``(B, S)``; returns ``(B, steps)``.

        ``prefill_fn``/``decode_fn`` default to this model's methods (pass compiled ones).
        """
        prefill_fn = prefill_fn or self.prefill
        decode_fn = decode_fn or self.decode
        B, S = prompt_ids.shape
        if S + steps > self.cfg.max_seq_len or B > self.cfg.max_batch:
            raise ValueError(f"prompt_ids: {B} x {S} + {steps} steps exceeds the caches "
                             f"({self.cfg.max_batch} x {self.cfg.max_seq_len})")
        dev = prompt_ids.device
        positions = torch.arange(S, device=dev).expand(B, S)
        logits = prefill_fn(prompt_ids, positions, self.slots_for(B, positions))
        out = [logits.argmax(-1)]
        for step in range(1, steps):
            pos = torch.full((B,), S + step - 1, device=dev)
            slot_table = self.slots_for(B, torch.arange(S + step, device=dev).expand(B, -1))
            context = torch.full((B,), S + step, device=dev)
            logits = decode_fn(out[-1], pos, slot_table[:, -1], slot_table, context)
            out.append(logits.argmax(-1))
        return torch.stack(out, dim=1)


def example_inputs(model: MLAForCausalLM, batch: int = 2, seq_len: int = 12, seed: int = 1):
    """Random prompt ids, positions and slots for ``model.prefill``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.cfg.vocab_size, (batch, seq_len), generator=g)
    positions = torch.arange(seq_len).expand(batch, seq_len)
    return ids, positions, model.slots_for(batch, positions)


if __name__ == "__main__":
    cfg = MLAConfig()
    model = MLAForCausalLM.random(cfg)
    prompt = example_inputs(model)[0]
    eager = model.generate(prompt, steps=6)
    fused_prefill = torch.compile(model.prefill, backend="attnfuse_eager",
                                  options={"fusions": ["mla_short_prefill"]})
    fused = model.generate(prompt, steps=6, prefill_fn=fused_prefill)
    print("eager:", eager.tolist())
    print("fused:", fused.tolist(), "same" if torch.equal(eager, fused) else "DIFFERENT")
