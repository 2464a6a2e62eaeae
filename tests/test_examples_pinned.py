"""Graph-diff expecttests: the rewrite of one layer of each example model, pinned.

Each model is built with one layer and one decode (or prefill) step is compiled with the
eager backend; ``d.summary()`` lists the rewrite counts and the ops that vanished and
appeared. A change in what the passes do to these models shows up here as a diff
(``EXPECTTEST_ACCEPT=1 python -m pytest tests/test_examples_pinned.py`` re-pins it).
The paged serving model is pinned beside its other tests.
"""

from __future__ import annotations

import torch

from attnfuse.examples.hf_models import (
    build_hf_model,
    cache_arg,
    greedy_decode,
    make_static_cache,
    prompt_ids,
)
from attnfuse.examples.serving_mla import MLAConfig, MLAForCausalLM, example_inputs
from attnfuse.passes.testing import graph_diff

PROMPT_LEN = 8
MAX_CACHE_LEN = 32


def _hf_decode_layer_diff(family: str):
    model, config = build_hf_model(family, num_hidden_layers=1)
    cache = make_static_cache(model, max_cache_len=MAX_CACHE_LEN)
    prompt = prompt_ids(config, prompt_len=PROMPT_LEN)
    greedy_decode(model, prompt, cache, steps=0)
    step = {"input_ids": prompt[:, :1], "position_ids": torch.tensor([[PROMPT_LEN]]),
            **cache_arg(cache), "use_cache": True, "logits_to_keep": 1}
    with torch.no_grad():
        return graph_diff(model, **step, backend="eager")


def test_llama_decode_layer_rewrite_is_pinned():
    d = _hf_decode_layer_diff("llama")
    d.assert_fired(rope_kv_write=1, grouped_decode=1)
    d.assertExpectedInline(d.summary(), """\
rope_kv_write: 1
grouped_decode: 1
mla_short_prefill: 0
workspace_overlap: 0
- aten._scaled_dot_product_flash_attention_for_cpu x1
- aten.add.Tensor x2
- aten.cat x2
- aten.clone x2
- aten.expand x2
- aten.index_put x2
- aten.mul.Tensor x4
- aten.neg x2
- aten.slice.Tensor x4
- aten.unsqueeze x2
+ aten.permute x4
+ aten.select.int x2
+ aten.squeeze.dim x1
+ attnfuse.grouped_decode x1
+ auto_functionalized(attnfuse.rope_write_kv) x1
+ getitem x3""")


def test_qwen3_decode_layer_rewrite_is_pinned():
    d = _hf_decode_layer_diff("qwen3")
    d.assertExpectedInline(d.summary(), """\
rope_kv_write: 1
grouped_decode: 1
mla_short_prefill: 0
workspace_overlap: 0
- aten._scaled_dot_product_flash_attention_for_cpu x1
- aten.add.Tensor x2
- aten.cat x2
- aten.clone x2
- aten.expand x2
- aten.index_put x2
- aten.mul.Tensor x4
- aten.neg x2
- aten.slice.Tensor x4
- aten.unsqueeze x2
+ aten.permute x4
+ aten.select.int x2
+ aten.squeeze.dim x1
+ attnfuse.grouped_decode x1
+ auto_functionalized(attnfuse.rope_write_kv) x1
+ getitem x3""")


def test_mistral_decode_layer_rewrite_is_pinned():
    d = _hf_decode_layer_diff("mistral")
    d.assertExpectedInline(d.summary(), """\
rope_kv_write: 1
grouped_decode: 1
mla_short_prefill: 0
workspace_overlap: 0
- aten._scaled_dot_product_flash_attention_for_cpu x1
- aten.add.Tensor x2
- aten.cat x2
- aten.clone x2
- aten.expand x2
- aten.index_put x2
- aten.mul.Tensor x4
- aten.neg x2
- aten.slice.Tensor x4
- aten.unsqueeze x2
+ aten.permute x4
+ aten.select.int x2
+ aten.squeeze.dim x1
+ attnfuse.grouped_decode x1
+ auto_functionalized(attnfuse.rope_write_kv) x1
+ getitem x3""")


def test_deepseek_v3_decode_layer_is_left_alone_with_reasons():
    # HF's DeepSeek-V3 attends over K/V decompressed from the latent cache (MHA): nothing
    # here is an absorbed MLA form, and the attention fusions say why; only the write of
    # the latent with the RoPE'd k_rot (its de-interleaving RoPE) is fused
    d = _hf_decode_layer_diff("deepseek_v3")
    d.assertExpectedInline(d.summary(), """\
rope_kv_write: 1
grouped_decode: 0
mla_short_prefill: 0
workspace_overlap: 0
- aten.add.Tensor x2
- aten.index_put x2
- aten.mul.Tensor x8
- aten.sub.Tensor x2
+ aten.permute x4
+ aten.select.int x2
+ auto_functionalized(attnfuse.rope_write_kv) x1
+ getitem x3""")
    assert d.report.near_misses


def test_serving_mla_prefill_layer_rewrite_is_pinned():
    model = MLAForCausalLM.random(MLAConfig(num_layers=1))
    with torch.no_grad():
        d = graph_diff(model.prefill, *example_inputs(model), backend="eager")
    d.assertExpectedInline(d.summary(), """\
rope_kv_write: 1
grouped_decode: 0
mla_short_prefill: 1
workspace_overlap: 0
- aten.add.Tensor x2
- aten.amax x1
- aten.any.dim x1
- aten.bmm x4
- aten.cat x4
- aten.clone x3
- aten.div.Tensor x1
- aten.eq.Scalar x1
- aten.exp x1
- aten.expand x6
- aten.full x4
- aten.index_put x2
- aten.le.Scalar x1
- aten.logical_and x1
- aten.logical_not x2
- aten.mul.Scalar x2
- aten.mul.Tensor x4
- aten.neg x2
- aten.permute x5
- aten.reshape x10
- aten.split.Tensor x2
- aten.sub.Tensor x2
- aten.sum.dim_IntList x1
- aten.unsqueeze x2
- aten.where.self x1
- prims.iota x2
+ aten.lt.Scalar x1
+ aten.squeeze.dim x1
+ attnfuse.mla_prefill x1
+ auto_functionalized(attnfuse.rope_write_kv) x1""")


def test_serving_mla_decode_layer_rewrite_is_pinned():
    model = MLAForCausalLM.random(MLAConfig(num_layers=1))
    ids, positions, slots = example_inputs(model)
    batch, seq = ids.shape
    with torch.no_grad():
        model.prefill(ids, positions, slots)  # fills the latent cache the decode step reads
        slot_table = model.slots_for(batch, torch.arange(seq + 1).expand(batch, -1))
        step = (ids[:, -1], torch.full((batch,), seq), slot_table[:, -1], slot_table,
                torch.full((batch,), seq + 1))
        d = graph_diff(model.decode, *step, backend="eager")
        torch.testing.assert_close(d.outputs, model.decode(*step), atol=1e-4, rtol=1e-4)
    # the absorbed decode runs through SDPA's math path here (qk 80 vs v 64 wide, the
    # softmax inside _safe_softmax's guard); V is the latent that K's rows start with, so
    # the op reads the latent once
    d.assert_fired(grouped_decode=1)
    assert [s.detail for s in d.report.sites if s.fusion == "grouped_decode"] == [
        "eager safe_softmax n_rep=8 shared-latent"], d.report.table()
    d.assertExpectedInline(d.summary(), """\
rope_kv_write: 1
grouped_decode: 1
mla_short_prefill: 0
workspace_overlap: 0
- aten.add.Tensor x2
- aten.amax x1
- aten.any.dim x1
- aten.bmm x2
- aten.cat x2
- aten.clone x1
- aten.div.Tensor x1
- aten.eq.Scalar x1
- aten.exp x1
- aten.expand x6
- aten.full x1
- aten.index.Tensor x1
- aten.index_put x2
- aten.logical_not x2
- aten.mul.Scalar x2
- aten.mul.Tensor x4
- aten.neg x2
- aten.permute x1
- aten.reshape x2
- aten.split.Tensor x2
- aten.sub.Tensor x1
- aten.sum.dim_IntList x1
- aten.unsqueeze x2
+ aten.lt.Scalar x1
+ aten.squeeze.dim x1
+ attnfuse.grouped_decode x1
+ auto_functionalized(attnfuse.rope_write_kv) x1""")
