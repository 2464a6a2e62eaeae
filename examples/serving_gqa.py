"""A GQA decoder written the way serving engines (vLLM, SGLang) write one, in plain torch.

What makes it "serving style", and what the passes must cope with:

* **Flat tokens.** The model sees ``[num_tokens]`` ids and positions, not ``[batch, seq]``;
  the batch structure lives in the attention metadata.
* **Fused QKV projection** split into q, k, v by ``split``.
* **RoPE from a ``cos_sin_cache``** ``[max_position, rotary_dim]`` (cos half, then sin half)
  gathered by ``positions`` and applied to ``[num_tokens, heads, head_dim]`` views, NeoX
  style (rotate halves) by default, GPT-J style (rotate even/odd pairs) with
  ``is_neox_style=False``.
* **Paged KV cache.** Per layer, a key and a value buffer of shape
  ``(num_blocks, page_size, num_kv_heads, head_dim)``. New k, v are written through a
  flattened ``(num_blocks * page_size, num_kv_heads, head_dim)`` view at ``slot_mapping``
  (``slot = block_table[seq, pos // page_size] * page_size + pos % page_size``), with an
  index assignment (``index_put_``) or ``index_copy_`` (``kv_write="index_copy"``).
* **Decode attention, unfused:** each sequence's pages are gathered through its block
  table into ``[batch, num_kv_heads, max_blocks * page_size, head_dim]``, each KV head is
  repeated for its query-head group (``repeat_kv``: expand + reshape), and SDPA runs with
  a length mask. This is the form ``grouped_decode`` rewrites: the repeat materializes
  ``n_rep`` copies of the whole gathered context every step. ``decode_attention="matmul"``
  spells the same attention as scores, fp32 softmax and a weighted sum.
* **Prefill attention:** causal SDPA over the new tokens only (the prompt starts an empty
  sequence), after writing them into the cache.

Weights are random and seeded, from the small embedded ``ServingGQAConfig``.

Example::

    model = ServingGQAModel(ServingGQAConfig())
    result = generate(model, prompt_ids=torch.randint(0, 512, (2, 8)), steps=16)
    result.tokens  # [2, 17]
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


@dataclasses.dataclass
class ServingGQAConfig:
    """Model and cache sizes. The defaults compile quickly and run fast on a CPU."""

    vocab_size: int = 512
    hidden_size: int = 256
    intermediate_size: int = 512
    num_layers: int = 2
    num_heads: int = 8
    num_kv_heads: int = 2
    head_dim: int = 32
    rope_theta: float = 10000.0
    #: NeoX rotates the two halves of the head; GPT-J rotates adjacent (even, odd) pairs
    is_neox_style: bool = True
    rms_norm_eps: float = 1e-6
    #: tokens per KV page; 16 is vLLM's default block size
    page_size: int = 16
    #: pages in the pool, shared by all sequences
    num_blocks: int = 32
    #: the longest sequence (prompt + generated); the block table has
    #: ceil(max_seq_len / page_size) entries per sequence
    max_seq_len: int = 64
    #: "index_put" (``flat[slot_mapping] = k``, SGLang's set_kv_buffer) or "index_copy"
    kv_write: str = "index_put"
    #: decode attention after the page gather and repeat: "sdpa" (one SDPA call) or
    #: "matmul" (scores, fp32 softmax, weighted sum: the torch-native fallback form)
    decode_attention: str = "sdpa"
    #: std of the random weights: wide enough that greedy argmax is not decided by
    #: rounding noise (see ``examples/hf_models.py``)
    init_std: float = 0.08
    seed: int = 0

    @property
    def max_blocks_per_seq(self) -> int:
        return math.ceil(self.max_seq_len / self.page_size)

    def validate(self) -> None:
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"num_heads: expected a multiple of num_kv_heads={self.num_kv_heads}, got {self.num_heads}"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim: expected an even size for RoPE, got {self.head_dim}")
        if self.kv_write not in ("index_put", "index_copy"):
            raise ValueError(f"kv_write: expected 'index_put' or 'index_copy', got {self.kv_write!r}")
        if self.decode_attention not in ("sdpa", "matmul"):
            raise ValueError(
                f"decode_attention: expected 'sdpa' or 'matmul', got {self.decode_attention!r}"
            )


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back, as the engines' native paths do."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        orig_dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return x32.to(orig_dtype) * self.weight


class RotaryEmbedding(nn.Module):
    """RoPE from a precomputed ``cos_sin_cache`` ``[max_position, head_dim]`` (fp32)."""

    def __init__(self, head_dim: int, max_position: int, base: float, is_neox_style: bool) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.is_neox_style = is_neox_style
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        angles = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
        self.register_buffer(
            "cos_sin_cache", torch.cat([angles.cos(), angles.sin()], dim=-1), persistent=False
        )

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x: [T, heads, D]; cos, sin: [T, 1, D/2]
        if self.is_neox_style:
            x1, x2 = torch.chunk(x, 2, dim=-1)
        else:
            x1, x2 = x[..., 0::2], x[..., 1::2]
        out1 = x1 * cos - x2 * sin
        out2 = x2 * cos + x1 * sin
        if self.is_neox_style:
            return torch.cat((out1, out2), dim=-1)
        return torch.stack((out1, out2), dim=-1).flatten(-2)

    def forward(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate ``query`` ``[T, H, D]`` and ``key`` ``[T, Hkv, D]`` at ``positions`` ``[T]``."""
        cos_sin = self.cos_sin_cache.index_select(0, positions)
        cos, sin = cos_sin.chunk(2, dim=-1)
        cos = cos.unsqueeze(-2).to(query.dtype)
        sin = sin.unsqueeze(-2).to(query.dtype)
        return self._rotate(query, cos, sin), self._rotate(key, cos, sin)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``[B, Hkv, L, D]`` -> ``[B, Hkv * n_rep, L, D]``: each KV head once per query head."""
    if n_rep == 1:
        return x
    batch, kv_heads, length, dim = x.shape
    x = x[:, :, None, :, :].expand(batch, kv_heads, n_rep, length, dim)
    return x.reshape(batch, kv_heads * n_rep, length, dim)


class PagedGQAAttention(nn.Module):
    """Fused QKV projection, RoPE, paged KV write, then prefill or decode attention."""

    def __init__(self, cfg: ServingGQAConfig, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.n_rep = cfg.num_heads // cfg.num_kv_heads
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        self.page_size = cfg.page_size
        self.kv_write = cfg.kv_write
        self.decode_attention = cfg.decode_attention
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=False)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.rotary = rotary
        cache_shape = (cfg.num_blocks, cfg.page_size, cfg.num_kv_heads, cfg.head_dim)
        self.register_buffer("k_cache", torch.zeros(cache_shape), persistent=False)
        self.register_buffer("v_cache", torch.zeros(cache_shape), persistent=False)

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Store ``key``/``value`` ``[T, Hkv, D]`` at the flat slots ``slot_mapping`` ``[T]``."""
        k_flat = self.k_cache.view(-1, self.num_kv_heads, self.head_dim)
        v_flat = self.v_cache.view(-1, self.num_kv_heads, self.head_dim)
        if self.kv_write == "index_copy":
            k_flat.index_copy_(0, slot_mapping, key)
            v_flat.index_copy_(0, slot_mapping, value)
        else:
            k_flat[slot_mapping] = key
            v_flat[slot_mapping] = value

    def gather_pages(self, cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
        """``[B, Hkv, max_blocks * page_size, D]``: each sequence's pages, in order."""
        batch, max_blocks = block_tables.shape
        pages = cache[block_tables]  # [B, max_blocks, page, Hkv, D]
        pages = pages.reshape(batch, max_blocks * self.page_size, self.num_kv_heads, self.head_dim)
        return pages.transpose(1, 2)

    def forward(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        slot_mapping: torch.Tensor,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        is_prefill: bool,
    ) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        qkv = self.qkv_proj(hidden)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        q, k = self.rotary(positions, q, k)
        self.write_kv(k, v, slot_mapping)

        batch = block_tables.shape[0]
        if is_prefill:
            # every sequence is a fresh prompt of the same length: attend to the new
            # tokens only, causally
            seq = num_tokens // batch
            qb = q.view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
            kb = k.view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
            vb = v.view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
            out = F.scaled_dot_product_attention(
                qb, repeat_kv(kb, self.n_rep), repeat_kv(vb, self.n_rep),
                is_causal=True, scale=self.scale,
            )
            out = out.transpose(1, 2).reshape(num_tokens, self.q_size)
        else:
            # one new token per sequence, attending to its whole context in the cache
            keys = repeat_kv(self.gather_pages(self.k_cache, block_tables), self.n_rep)
            values = repeat_kv(self.gather_pages(self.v_cache, block_tables), self.n_rep)
            context = keys.shape[2]
            valid = torch.arange(context, device=hidden.device)[None, :] < seq_lens[:, None]
            qb = q.view(batch, 1, self.num_heads, self.head_dim).transpose(1, 2)
            if self.decode_attention == "matmul":
                scores = torch.matmul(qb, keys.transpose(2, 3)) * self.scale
                scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
                probs = torch.softmax(scores.float(), dim=-1).to(qb.dtype)
                out = torch.matmul(probs, values)
            else:
                out = F.scaled_dot_product_attention(
                    qb, keys, values, attn_mask=valid[:, None, None, :], scale=self.scale,
                )
            out = out.reshape(num_tokens, self.q_size)
        return self.o_proj(out)


class GatedMLP(nn.Module):
    """SiLU-gated MLP with the gate and up projections fused into one matmul."""

    def __init__(self, cfg: ServingGQAConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ServingGQAConfig, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = PagedGQAAttention(cfg, rotary)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg)

    def forward(self, hidden: torch.Tensor, *attn_args: Any) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), *attn_args)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class ServingGQAModel(nn.Module):
    """The whole decoder; ``forward`` returns the last token's logits per sequence."""

    def __init__(self, cfg: ServingGQAConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or ServingGQAConfig()
        cfg.validate()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        # one table shared by every layer, as engines share the rotary module
        rotary = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, cfg.is_neox_style)
        self.layers = nn.ModuleList(DecoderLayer(cfg, rotary) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._init_weights(cfg)
        # inference only: a compiled call then builds an inference graph, whose cache
        # writes are ``copy_`` epilogues into the cache inputs, even outside ``no_grad``
        self.requires_grad_(False)

    def _init_weights(self, cfg: ServingGQAConfig) -> None:
        gen = torch.Generator().manual_seed(cfg.seed)
        with torch.no_grad():
            for name, param in self.named_parameters():
                if name.endswith("layernorm.weight") or name == "norm.weight":
                    continue
                param.copy_(torch.randn(param.shape, generator=gen) * cfg.init_std)
            self.embed_tokens.weight.mul_(1.0 / cfg.init_std)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slot_mapping: torch.Tensor,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        is_prefill: bool,
    ) -> torch.Tensor:
        """Run ``input_ids`` ``[T]`` at ``positions`` ``[T]``; returns ``[B, vocab]`` logits.

        ``slot_mapping`` ``[T]``: flat cache slot of each token. ``block_tables``
        ``[B, max_blocks_per_seq]``: page ids of each sequence (unused entries may hold
        any valid page id). ``seq_lens`` ``[B]``: each sequence's length including the new
        tokens. Prefill: ``T = B * prompt_len``, tokens grouped by sequence. Decode:
        ``T = B``, one token per sequence.
        """
        hidden = self.embed_tokens(input_ids)
        for layer in self.layers:
            hidden = layer(hidden, positions, slot_mapping, block_tables, seq_lens, is_prefill)
        batch = block_tables.shape[0]
        last = hidden.view(batch, -1, hidden.shape[-1])[:, -1]
        return self.lm_head(self.norm(last))

    def reset_cache(self) -> None:
        for layer in self.layers:
            layer.self_attn.k_cache.zero_()
            layer.self_attn.v_cache.zero_()


# ------------------------------------------------------------------ scheduling helpers
def allocate_block_tables(cfg: ServingGQAConfig, batch_size: int, seed: int = 0) -> torch.Tensor:
    """``[batch, max_blocks_per_seq]`` distinct page ids drawn at random from the pool.

    Random (not consecutive) pages make decode really gather: a model that ignored the
    block table would read the wrong pages.
    """
    needed = batch_size * cfg.max_blocks_per_seq
    if needed > cfg.num_blocks:
        raise ValueError(
            f"batch_size: {batch_size} sequences of {cfg.max_seq_len} tokens need {needed} pages, "
            f"the pool has num_blocks={cfg.num_blocks}"
        )
    gen = torch.Generator().manual_seed(seed)
    pages = torch.randperm(cfg.num_blocks, generator=gen)[:needed]
    return pages.view(batch_size, cfg.max_blocks_per_seq)


def slot_mapping_for(
    block_tables: torch.Tensor, positions: torch.Tensor, page_size: int
) -> torch.Tensor:
    """Flat cache slots of ``positions`` ``[B, S]`` of each sequence: ``[B * S]``."""
    pages = torch.gather(block_tables, 1, positions // page_size)
    return (pages * page_size + positions % page_size).reshape(-1)


def step_inputs(
    cfg: ServingGQAConfig,
    token_ids: torch.Tensor,
    start: int,
    block_tables: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """The forward arguments (without ``is_prefill``) for ``token_ids`` ``[B, S]`` placed
    at positions ``start .. start + S - 1`` of every sequence."""
    batch, seq = token_ids.shape
    positions = torch.arange(start, start + seq).expand(batch, seq)
    slots = slot_mapping_for(block_tables, positions, cfg.page_size)
    seq_lens = torch.full((batch,), start + seq, dtype=torch.long)
    return token_ids.reshape(-1), positions.reshape(-1), slots, block_tables, seq_lens


@dataclasses.dataclass
class GenerateResult:
    """``tokens`` ``[B, 1 + steps]``; ``logits``: ``[B, vocab]`` float32 per forward call."""

    tokens: torch.Tensor
    logits: list[torch.Tensor]


def generate(
    model: ServingGQAModel,
    prompt_ids: torch.Tensor,
    steps: int,
    *,
    forward: Callable[..., torch.Tensor] | None = None,
    block_seed: int = 0,
) -> GenerateResult:
    """Greedy decoding: one prefill of ``prompt_ids`` ``[B, S]`` then ``steps`` decode steps.

    ``forward`` replaces ``model`` for the calls (a compiled or patched model); the
    cache buffers always belong to ``model`` and are zeroed first.
    """
    cfg = model.config
    batch, prompt_len = prompt_ids.shape
    if prompt_len + steps > cfg.max_seq_len:
        raise ValueError(
            f"steps: prompt {prompt_len} + {steps} steps exceeds max_seq_len={cfg.max_seq_len}"
        )
    forward = model if forward is None else forward
    model.reset_cache()
    device = model.embed_tokens.weight.device
    block_tables = allocate_block_tables(cfg, batch, seed=block_seed)
    tokens: list[torch.Tensor] = []
    logits: list[torch.Tensor] = []
    step_ids, start, is_prefill = prompt_ids.cpu(), 0, True
    with torch.no_grad():
        for _ in range(steps + 1):
            args = [t.to(device) for t in step_inputs(cfg, step_ids, start, block_tables)]
            step_logits = forward(*args, is_prefill).float()
            next_token = step_logits.argmax(dim=-1, keepdim=True)
            logits.append(step_logits.clone())
            tokens.append(next_token.cpu())
            start += step_ids.shape[1]
            step_ids, is_prefill = next_token.cpu(), False
    return GenerateResult(tokens=torch.cat(tokens, dim=1), logits=logits)


def example_inputs(
    model: ServingGQAModel, *, batch_size: int = 2, context: int = 8, seed: int = 0
) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """``(prefill_args, decode_args)`` for ``model.forward``: a prompt of ``context``
    tokens per sequence, then one decode token at position ``context``."""
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, cfg.vocab_size, (batch_size, context), generator=gen)
    block_tables = allocate_block_tables(cfg, batch_size, seed=seed)
    device = model.embed_tokens.weight.device
    prefill = tuple(t.to(device) for t in step_inputs(cfg, prompt, 0, block_tables)) + (True,)
    token = torch.randint(0, cfg.vocab_size, (batch_size, 1), generator=gen)
    decode = tuple(t.to(device) for t in step_inputs(cfg, token, context, block_tables)) + (False,)
    return prefill, decode


def _main() -> None:
    model = ServingGQAModel()
    prompt = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    result = generate(model, prompt, steps=8)
    for row in result.tokens.tolist():
        print("tokens", row)


if __name__ == "__main__":
    _main()
