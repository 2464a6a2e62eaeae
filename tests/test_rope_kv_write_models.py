"""``rope_kv_write`` on whole models: tiny HF decoders with transformers' StaticCache
(Llama, Qwen3 with qk-norm, Mistral, DeepSeek-V3 with its de-interleaving RoPE), the
paged-KV serving model and the serving MLA model (latent caches). Graph-diff expecttests
pin what each rewrite removes and adds; numerics match the eager model."""

from __future__ import annotations

import pytest
import torch

from attnfuse.examples.hf_models import cache_arg
from attnfuse.passes.testing import graph_diff

FUSION = ["rope_kv_write"]


def op_delta(d) -> str:
    """Rewrite count, then ops removed and added (by callee, the custom op named)."""

    def hist(text: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for line in text.splitlines():
            if " = " not in line:
                continue
            rhs = line.split(" = ", 1)[1]
            callee = rhs.split("(", 1)[0]
            if callee.startswith("auto_functionalized"):
                callee += "(" + rhs.split("(", 1)[1].split(",", 1)[0] + ")"
            out[callee] = out.get(callee, 0) + 1
        return out

    before, after = hist(d.before), hist(d.after)
    lines = [f"rope_kv_write: {d.counts.get('rope_kv_write', 0)}"]
    lines += [f"- {op} x{before[op] - after.get(op, 0)}" for op in sorted(before)
              if before[op] > after.get(op, 0)]
    lines += [f"+ {op} x{after[op] - before.get(op, 0)}" for op in sorted(after)
              if after[op] > before.get(op, 0)]
    return "\n".join(lines)


# ------------------------------------------------------------------ HF StaticCache
def _hf_decode(family: str):
    """(model, cache, prefill ids, decode ids) with the cache's buffers allocated."""
    from attnfuse.examples.hf_models import build_hf_model, make_static_cache, prompt_ids

    model, config = build_hf_model(family)
    cache = make_static_cache(model, batch_size=1, max_cache_len=16)
    ids = prompt_ids(config, batch_size=1, prompt_len=5)
    return model, cache, ids, ids[:, -1:]


def _step(fn, cache, ids):
    with torch.no_grad():
        out = fn(input_ids=ids, **cache_arg(cache), use_cache=True, logits_to_keep=1)
    return out.logits


def _cache_state(cache):
    return [t.clone() for layer in cache.layers for t in (layer.keys, layer.values)]


def _hf_check(family: str):
    model, cache, prompt, token = _hf_decode(family)
    cache.reset()
    _step(model, cache, prompt)
    expected = _step(model, cache, token)
    expected_cache = _cache_state(cache)
    cache.reset()
    _step(model, cache, prompt)
    with torch.no_grad():
        d = graph_diff(model, input_ids=token, **cache_arg(cache), use_cache=True,
                       logits_to_keep=1, fusions=FUSION, backend="eager")
    torch.testing.assert_close(d.outputs.logits, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(_cache_state(cache), expected_cache, atol=1e-5, rtol=1e-5)
    return d


def test_hf_llama_static_cache_decode(graph_diff):
    d = _hf_check("llama")
    d.assert_fired(rope_kv_write=2)  # one per layer
    assert all("static, neox, rotary_dim=32" in s.detail for s in d.report.sites)
    d.assertExpectedInline(op_delta(d), """\
rope_kv_write: 2
- aten.add.Tensor x4
- aten.cat x4
- aten.index_put x4
- aten.mul.Tensor x8
- aten.neg x4
- aten.slice.Tensor x8
+ aten.permute x8
+ aten.select.int x4
+ auto_functionalized(attnfuse.rope_write_kv) x2
+ getitem x6""")


@pytest.mark.parametrize("family", ["qwen3", "mistral"])
def test_hf_family_static_cache_decode(family):
    d = _hf_check(family)
    d.assert_fired(rope_kv_write=2)
    assert "aten.index_put" not in d.after


def test_hf_deepseek_v3_rope_of_deinterleaved_pairs():
    """HF DeepSeek-V3 rotates interleaved pairs of k_rot and writes them de-interleaved
    into the cache's RoPE slot, the latent into the other: the op gets the de-interleaved
    q_rot/k_rot (two strided slices each) and writes exactly the graph's layout."""
    d = _hf_check("deepseek_v3")
    d.assert_fired(rope_kv_write=2)
    assert all("static, neox, rotary_dim=16, input features permuted (2 strided slices)"
               in s.detail for s in d.report.sites), d.report.table()
    d.assertExpectedInline(op_delta(d), """\
rope_kv_write: 2
- aten.add.Tensor x4
- aten.index_put x4
- aten.mul.Tensor x16
- aten.sub.Tensor x4
+ aten.permute x8
+ aten.select.int x4
+ auto_functionalized(attnfuse.rope_write_kv) x2
+ getitem x6""")


# ------------------------------------------------------------------ serving MLA model
def _mla_caches(model):
    return [t for layer in model.layers
            for t in (layer.self_attn.latent_cache, layer.self_attn.pe_cache)]


def _fill_mla_caches(model, seed):
    g = torch.Generator().manual_seed(seed)
    for t in _mla_caches(model):
        t.copy_(torch.randn(t.shape, generator=g))


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_serving_mla_latent_cache_writes(phase, graph_diff):
    """ckv into (slots, kv_lora_rank) and the rotated k_pe into (slots, rope_dim): one op
    per layer, on caches holding fresh random data; prefill attends to the rotated k_pe
    itself (the op returns it), decode reads the caches after the write."""
    from attnfuse.examples.serving_mla import MLAConfig, MLAForCausalLM, example_inputs

    model = MLAForCausalLM.random(MLAConfig(num_layers=2))
    ids, positions, slots = example_inputs(model)
    if phase == "prefill":
        fn, args = model.prefill, (ids, positions, slots)
    else:
        batch, seq = ids.shape
        table = model.slots_for(batch, torch.arange(seq + 1).expand(batch, -1))
        fn, args = model.decode, (ids[:, -1], torch.full((batch,), seq), table[:, -1], table,
                                  torch.full((batch,), seq + 1))
    with torch.no_grad():
        _fill_mla_caches(model, seed=5)
        expected = fn(*args)
        expected_caches = [t.clone() for t in _mla_caches(model)]
        _fill_mla_caches(model, seed=5)
        d = graph_diff(fn, *args, fusions=FUSION, backend="eager")
    d.assert_fired(rope_kv_write=2)
    assert all("flat, neox, rotary_dim=16, one-head latent caches" in s.detail
               for s in d.report.sites), d.report.table()
    torch.testing.assert_close(d.outputs, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_mla_caches(model), expected_caches, atol=1e-5, rtol=1e-5)
    assert ("return_k=True" in d.after) == (phase == "prefill")
    assert "aten.index_put" not in d.after


# ------------------------------------------------------------------ paged serving model
@pytest.mark.parametrize("neox", [True, False], ids=["neox", "gptj"])
def test_serving_paged_decode_and_prefill(neox, graph_diff):
    from attnfuse.examples.serving_gqa import ServingGQAConfig, ServingGQAModel, example_inputs

    model = ServingGQAModel(ServingGQAConfig(num_layers=2, is_neox_style=neox))
    prefill, decode = example_inputs(model)
    deltas = []
    for args in (prefill, decode):
        model.reset_cache()
        with torch.no_grad():
            expected = model(*args)
        expected_caches = [t.clone() for l in model.layers for t in (l.self_attn.k_cache, l.self_attn.v_cache)]
        model.reset_cache()
        with torch.no_grad():
            d = graph_diff(model, *args, fusions=FUSION, backend="eager")
        d.assert_fired(rope_kv_write=2)
        torch.testing.assert_close(d.outputs, expected, atol=1e-5, rtol=1e-5)
        got = [t for l in model.layers for t in (l.self_attn.k_cache, l.self_attn.v_cache)]
        torch.testing.assert_close(got, expected_caches, atol=1e-5, rtol=1e-5)
        deltas.append(op_delta(d))
        # prefill attends to the rotated k itself: the op returns it there, and only there
        assert ("return_k=True" in d.after) == (args is prefill)
    if neox:  # decode
        d.assertExpectedInline(deltas[1], """\
rope_kv_write: 2
- aten.add.Tensor x2
- aten.cat x4
- aten.index_put x4
- aten.mul.Tensor x16
- aten.reshape x8
- aten.split.Tensor x4
- aten.sub.Tensor x4
- getitem x2
+ aten.lt.Scalar x2
+ aten.select.int x4
+ aten.where.self x2
+ auto_functionalized(attnfuse.rope_write_kv) x2""")
