"""Tiny HF transformers decoder models with random weights, and a greedy decode loop.

The fusions are only worth what they do on model code nobody wrote for them, so these
are the real ``transformers`` modeling files (tested with 5.23 and 5.24), built from a
config with random, seeded weights: no download, no tokenizer.

Families
--------
``llama``        Llama-3 layout: GQA (8 query heads share 2 KV heads), rotate-half RoPE.
``qwen3``        Qwen3: as Llama plus RMSNorm on q and k before RoPE (qk-norm).
``mistral``      Mistral: as Llama; ``sliding_window`` is off by default (Mistral 7B v0.2+
                 and Nemo ship it off). Pass ``sliding_window=...`` to get the sliding
                 static cache, which recompiles every step until the window is full.
``deepseek_v3``  DeepSeek-V3 as HF implements it: MLA with a LoRA query, a latent
                 (``kv_lora_rank``) cache slot and a separate RoPE slot, interleaved RoPE,
                 layer 0 dense and layer 1 MoE.

Sizes follow the configuration the graph captures in the research notes were taken
with (2 layers, hidden 256, head_dim 32, vocab 512): it compiles with no graph break and
runs in well under a second per step on a 2-core CPU.

The decode loop (``greedy_decode``) calls the model's forward the way
``GenerationMixin.generate`` does for a ``StaticCache`` in transformers 5.23-5.24: one
prefill with the whole prompt, then one token per step, passing ``input_ids``,
``position_ids`` (2-D), the cache (``cache_arg``: ``cache=`` from 5.24, ``past_key_values=``
before), ``use_cache=True`` and ``logits_to_keep=1``, plus the 4-D boolean attention mask
that ``create_masks_for_generate`` builds outside the model (``prebuilt_mask=True``, the
``generate`` form) or no mask so the model builds it inside its graph
(``prebuilt_mask=False``). These versions have no ``cache_position`` argument: the static
cache keeps its own write position in ``cumulative_length``.

Example::

    model, config = build_hf_model("llama")
    prompt = prompt_ids(config, prompt_len=8)
    cache = make_static_cache(model, batch_size=1, max_cache_len=64)
    result = greedy_decode(model, prompt, cache, steps=16)
    result.tokens        # [1, 17]: the prefill's token, then one per decode step
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch

#: Sizes shared by every family: small enough for CPU tests, large enough that GQA has
#: n_rep = 4 and RoPE has a non-trivial half (head_dim 32 -> 16 rotated pairs).
TINY_COMMON: dict[str, Any] = {
    "num_hidden_layers": 2,
    "hidden_size": 256,
    "intermediate_size": 512,
    "vocab_size": 512,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}

#: Per-family additions and overrides of ``TINY_COMMON``.
FAMILY_OVERRIDES: dict[str, dict[str, Any]] = {
    "llama": {},
    "qwen3": {"use_sliding_window": False},
    "mistral": {"sliding_window": None},
    "deepseek_v3": {
        # HF's MLA keeps one KV head per query head after kv_b_proj: MHA over the
        # decompressed cache, so num_key_value_heads = num_attention_heads.
        "num_key_value_heads": 8,
        "q_lora_rank": 64,
        "kv_lora_rank": 64,
        "qk_rope_head_dim": 16,
        # HF sizes the rotary table by head_dim: for MLA that is the RoPE part only
        "head_dim": 16,
        "qk_nope_head_dim": 32,
        "v_head_dim": 32,
        # layer 0 dense, layer 1 MoE with 4 routed experts (2 per token) + 1 shared
        "first_k_dense_replace": 1,
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "n_shared_experts": 1,
        "moe_intermediate_size": 128,
        "n_group": 1,
        "topk_group": 1,
    },
}

#: family -> transformers config class name
CONFIG_CLASSES: dict[str, str] = {
    "llama": "LlamaConfig",
    "qwen3": "Qwen3Config",
    "mistral": "MistralConfig",
    "deepseek_v3": "DeepseekV3Config",
}

#: The default weight init (normal, std 0.02) gives near-uniform logits, where greedy
#: argmax is decided by rounding noise and eager and compiled runs part ways on ties.
#: A wider init separates the top logits by far more than fp32 (and bf16) noise.
INITIALIZER_RANGE = 0.08

DEFAULT_SEED = 0


def families() -> list[str]:
    """The model families ``build_hf_model`` knows."""
    return list(CONFIG_CLASSES)


def tiny_config(family: str, **overrides: Any) -> Any:
    """The tiny ``transformers`` config of ``family`` (``ValueError`` for an unknown one)."""
    import transformers

    if family not in CONFIG_CLASSES:
        raise ValueError(f"family: unknown model family {family!r}; expected one of {families()}")
    kwargs: dict[str, Any] = {**TINY_COMMON, "initializer_range": INITIALIZER_RANGE}
    kwargs.update(FAMILY_OVERRIDES[family])
    kwargs.update(overrides)
    attn_implementation = kwargs.pop("attn_implementation", "sdpa")
    config = getattr(transformers, CONFIG_CLASSES[family])(**kwargs)
    config._attn_implementation = attn_implementation
    return config


def build_from_config(
    config: Any,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = DEFAULT_SEED,
) -> torch.nn.Module:
    """``AutoModelForCausalLM.from_config`` with seeded random weights, for inference.

    Eval mode and no parameter requires grad, so a compiled call builds an inference
    graph (cache writes as ``copy_`` into the cache inputs) even outside ``no_grad``. The
    global RNG is forked, so building a model does not disturb the caller's stream.
    """
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, attn_implementation=config._attn_implementation
        )
    return model.to(device).eval().requires_grad_(False)


def build_hf_model(
    family: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = DEFAULT_SEED,
    **overrides: Any,
) -> tuple[torch.nn.Module, Any]:
    """Build a tiny ``family`` model with random weights; returns ``(model, config)``.

    ``overrides`` replace config fields (``num_hidden_layers=4``,
    ``attn_implementation="eager"``, ``sliding_window=16``, ...). The same ``seed`` and
    overrides give the same weights.
    """
    config = tiny_config(family, **overrides)
    return build_from_config(config, dtype=dtype, device=device, seed=seed), config


def prompt_ids(
    config: Any,
    *,
    batch_size: int = 1,
    prompt_len: int = 8,
    seed: int = DEFAULT_SEED,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """A random prompt ``[batch_size, prompt_len]`` of token ids below the vocab size."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (batch_size, prompt_len), generator=gen)
    return ids.to(device)


def make_static_cache(
    model: torch.nn.Module,
    *,
    batch_size: int = 1,
    max_cache_len: int = 64,
) -> Any:
    """A ``transformers.StaticCache`` for ``model`` whose buffers already exist.

    A fresh ``StaticCache`` allocates its buffers on the first ``update``; inside a
    compiled prefill that allocation would be traced into the graph (a ``full`` plus an
    ``index_put`` returned as outputs) instead of mutating address-marked inputs. So one
    token runs eagerly to allocate and mark the buffers, and ``reset()`` zeroes them.
    """
    from transformers import StaticCache

    config = model.config
    cache = StaticCache(config=config, max_cache_len=max_cache_len)
    device = next(model.parameters()).device
    warm = torch.zeros((batch_size, 1), dtype=torch.long, device=device)
    with torch.no_grad():
        model(input_ids=warm, **cache_arg(cache), use_cache=True, logits_to_keep=1)
    cache.reset()
    return cache


@functools.cache
def cache_keyword() -> str:
    """The keyword a transformers forward takes its cache by: ``cache`` from 5.24, which
    deprecates ``past_key_values`` (removed in 5.40), ``past_key_values`` before."""
    from transformers.masking_utils import create_masks_for_generate

    params = inspect.signature(create_masks_for_generate).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_arg(cache: Any) -> dict[str, Any]:
    """``{cache_keyword(): cache}``: pass as ``model(..., **cache_arg(cache))``."""
    return {cache_keyword(): cache}


@dataclasses.dataclass
class DecodeResult:
    """What ``greedy_decode`` returns.

    ``tokens``: ``[batch, 1 + steps]`` int64, the token chosen after the prefill, then one
    per decode step. ``logits``: one ``[batch, vocab]`` float32 tensor per forward call
    (prefill first), the logits that token was chosen from.
    """

    tokens: torch.Tensor
    logits: list[torch.Tensor]


def _generate_mask(model: Any, config: Any, cache: Any, position_ids: torch.Tensor,
                   seq_len: int, dtype: torch.dtype) -> Any:
    """The 4-D mask ``prepare_inputs_for_generation`` builds for a compileable cache
    (through the model's own ``create_masks_for_generate`` where it overrides it)."""
    from transformers.masking_utils import create_masks_for_generate

    make_masks = getattr(model, "create_masks_for_generate", create_masks_for_generate)
    batch_size = position_ids.shape[0]
    mask = make_masks(
        config=config,
        inputs_embeds=torch.empty((batch_size, seq_len, 0), dtype=dtype, device=position_ids.device),
        attention_mask=None,
        position_ids=position_ids,
        **cache_arg(cache),
    )
    if isinstance(mask, dict):
        return {k: v.contiguous() if v is not None else None for k, v in mask.items()}
    return mask.contiguous() if mask is not None else None


def greedy_decode(
    model_or_forward: Callable[..., Any],
    input_ids: torch.Tensor,
    cache: Any,
    steps: int,
    *,
    config: Any = None,
    prebuilt_mask: bool = True,
) -> DecodeResult:
    """One prefill of ``input_ids`` then ``steps`` single-token greedy decode steps.

    ``model_or_forward`` is the model, a compiled or patched model, or any callable with
    the model's forward keywords. ``cache`` is a ``StaticCache`` (see
    ``make_static_cache``); it is reset first, so the same cache can serve an eager run
    and then a compiled one. ``prebuilt_mask=True`` passes the 4-D mask built outside the
    model as ``generate`` does (needs ``config``, taken from ``model_or_forward.config``
    when not given); ``False`` lets the model build the mask inside its forward.
    """
    if steps < 0:
        raise ValueError(f"steps: expected a count >= 0, got {steps}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids: expected [batch, prompt_len], got shape {tuple(input_ids.shape)}")
    if config is None:
        config = getattr(model_or_forward, "config", None)
    if prebuilt_mask and config is None:
        raise ValueError("config: prebuilt_mask=True needs the model config; pass config=")
    cache.reset()
    batch_size = input_ids.shape[0]
    device = input_ids.device
    mask_dtype = torch.float32
    if isinstance(model_or_forward, torch.nn.Module):
        mask_dtype = next(model_or_forward.parameters()).dtype

    tokens: list[torch.Tensor] = []
    logits: list[torch.Tensor] = []
    step_ids = input_ids
    start = 0
    with torch.no_grad():
        for _ in range(steps + 1):
            seq_len = step_ids.shape[1]
            position_ids = torch.arange(start, start + seq_len, device=device).unsqueeze(0)
            position_ids = position_ids.expand(batch_size, -1).contiguous()
            kwargs: dict[str, Any] = {
                "input_ids": step_ids,
                "position_ids": position_ids,
                **cache_arg(cache),
                "use_cache": True,
                "logits_to_keep": 1,
            }
            if prebuilt_mask:
                kwargs["attention_mask"] = _generate_mask(
                    model_or_forward, config, cache, position_ids, seq_len, mask_dtype
                )
            out = model_or_forward(**kwargs)
            step_logits = (out.logits if hasattr(out, "logits") else out[0])[:, -1, :].float()
            next_token = step_logits.argmax(dim=-1, keepdim=True)
            logits.append(step_logits.clone())
            tokens.append(next_token)
            start += seq_len
            step_ids = next_token
    return DecodeResult(tokens=torch.cat(tokens, dim=1), logits=logits)


def _main() -> None:
    for family in families():
        model, config = build_hf_model(family)
        cache = make_static_cache(model, max_cache_len=48)
        result = greedy_decode(model, prompt_ids(config), cache, steps=8)
        print(f"{family:12s} tokens {result.tokens[0].tolist()}")


if __name__ == "__main__":
    _main()
