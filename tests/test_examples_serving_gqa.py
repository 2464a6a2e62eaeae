"""The serving-style GQA model (``examples/serving_gqa.py``): eager correctness, then compiled.

Eager: paged decoding must agree with recomputing every prefix by prefill (which reads no
cache), for both RoPE styles and both write forms; the block table must really be read.
Compiled: prefill plus ``DECODE_STEPS`` greedy steps through ``patch_model``
(``attnfuse_eager``, every fusion that exists) give the eager tokens, and the report says,
per layer, what fired and what was refused.
"""

from __future__ import annotations

import pytest
import torch

from attnfuse.examples.serving_gqa import (
    ServingGQAConfig,
    ServingGQAModel,
    allocate_block_tables,
    example_inputs,
    generate,
    slot_mapping_for,
)
from attnfuse.examples.model_coverage import (
    LayerExpectation,
    available_fusions,
    compile_and_count,
    coverage_gaps,
    layer_report_mismatches,
)

BATCH = 2
PROMPT_LEN = 8
DECODE_STEPS = 32
#: eager steps checked against prefix recomputation (each check reruns a prefill)
RECOMPUTE_STEPS = 10
FP32_ATOL = 1e-4

#: per attention layer, the report of the prefill graph and of the decode graph, by
#: decode attention form. The paged RoPE + KV write is fused in both graphs; prefill
#: attention is not decode.
PREFILL_LAYER = LayerExpectation(fired={"rope_kv_write": 1},
                                 near_misses={"grouped_decode": "not decode"})
EXPECTED_LAYERS = {
    # SDPA over the gathered, repeated pages becomes the grouped kernel
    "sdpa": [PREFILL_LAYER, LayerExpectation(fired={"rope_kv_write": 1, "grouped_decode": 1})],
    # the matmul, fp32 softmax, matmul spelling (masked_fill(~valid, -inf)) becomes the
    # grouped kernel too, its bool mask carried into the op
    "matmul": [PREFILL_LAYER, LayerExpectation(fired={"rope_kv_write": 1, "grouped_decode": 1})],
}

VARIANTS = [
    pytest.param({}, id="neox-index_put-sdpa"),
    pytest.param({"is_neox_style": False, "kv_write": "index_copy", "decode_attention": "matmul"},
                 id="gptj-index_copy-matmul"),
]


def _prompt(cfg: ServingGQAConfig, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (BATCH, PROMPT_LEN), generator=gen)


@pytest.mark.parametrize("overrides", VARIANTS)
def test_paged_decode_matches_prefix_prefill(overrides):
    model = ServingGQAModel(ServingGQAConfig(**overrides))
    prompt = _prompt(model.config)
    result = generate(model, prompt, steps=RECOMPUTE_STEPS)
    sequence = torch.cat([prompt, result.tokens], dim=1)
    for step in range(RECOMPUTE_STEPS + 1):
        # prefill attends over the new tokens only: no page is read
        ref = generate(model, sequence[:, : PROMPT_LEN + step], steps=0)
        assert torch.equal(ref.tokens[:, 0], result.tokens[:, step]), step
        torch.testing.assert_close(ref.logits[0], result.logits[step], atol=FP32_ATOL, rtol=0)
    assert len(set(result.tokens[0].tolist())) > RECOMPUTE_STEPS // 2


def test_block_tables_are_read():
    model = ServingGQAModel()
    prompt = _prompt(model.config)
    a = generate(model, prompt, steps=6, block_seed=0)
    b = generate(model, prompt, steps=6, block_seed=1)  # other pages, same sequences
    assert torch.equal(a.tokens, b.tokens)
    # decode with the right cache contents but the sequences' tables swapped reads the
    # other sequence's context: the logits must change
    prefill, decode = example_inputs(model, batch_size=BATCH, context=PROMPT_LEN)
    with torch.no_grad():
        model.reset_cache()
        model(*prefill)
        right = model(*decode)
        # rewrite the same decode slots so both calls start from one cache state
        model.reset_cache()
        model(*prefill)
        swapped = list(decode)
        swapped[3] = decode[3].flip(0)
        wrong = model(*swapped)
    assert (right - wrong).abs().max() > 1e-2


def test_slot_mapping_and_cache_writes():
    cfg = ServingGQAConfig()
    tables = allocate_block_tables(cfg, BATCH, seed=0)
    assert tables.unique().numel() == tables.numel()  # no page shared
    positions = torch.arange(cfg.max_seq_len).expand(BATCH, -1)
    slots = slot_mapping_for(tables, positions, cfg.page_size)
    assert slots.unique().numel() == slots.numel()
    assert torch.equal(slots.view(BATCH, -1)[:, 17] // cfg.page_size, tables[:, 1])

    model = ServingGQAModel(cfg)
    prefill, _ = example_inputs(model, batch_size=BATCH, context=PROMPT_LEN)
    model.reset_cache()
    with torch.no_grad():
        model(*prefill)
    flat = model.layers[0].self_attn.k_cache.view(-1, cfg.num_kv_heads * cfg.head_dim)
    written = flat.abs().sum(-1).nonzero().flatten()
    assert torch.equal(written.sort().values, prefill[2].sort().values)


def test_bad_inputs_raise_value_error():
    with pytest.raises(ValueError, match="num_heads"):
        ServingGQAModel(ServingGQAConfig(num_heads=6, num_kv_heads=4))
    with pytest.raises(ValueError, match="kv_write"):
        ServingGQAModel(ServingGQAConfig(kv_write="scatter"))
    with pytest.raises(ValueError, match="decode_attention"):
        ServingGQAModel(ServingGQAConfig(decode_attention="flash"))
    with pytest.raises(ValueError, match="batch_size"):
        allocate_block_tables(ServingGQAConfig(), batch_size=100)
    model = ServingGQAModel()
    with pytest.raises(ValueError, match="steps"):
        generate(model, _prompt(model.config), steps=model.config.max_seq_len)


# ---------------------------------------------------------------------- compiled
@pytest.mark.parametrize("overrides", VARIANTS)
def test_patched_generate_matches_eager(overrides):
    from attnfuse.passes.patch import patch_model, report_of, unpatch_model

    model = ServingGQAModel(ServingGQAConfig(**overrides))
    prompt = _prompt(model.config)
    eager = generate(model, prompt, steps=DECODE_STEPS)
    patch_model(model, fusions=available_fusions(), backend="attnfuse_eager",
                fullgraph=True, dynamic=False)
    try:
        patched = generate(model, prompt, steps=DECODE_STEPS)
        report = report_of(model)
    finally:
        unpatch_model(model)
        torch._dynamo.reset()
    assert torch.equal(patched.tokens, eager.tokens)
    torch.testing.assert_close(patched.logits, eager.logits, atol=FP32_ATOL, rtol=0)
    # prefill and decode graphs only: positions and slots are data, not guards
    assert len(report.graphs) == 2, report.table()
    assert not [e for g in report.graphs for e in g.errors], report.table()
    modules = [f"layers.{i}.self_attn" for i in range(model.config.num_layers)]
    expected = EXPECTED_LAYERS[model.config.decode_attention]
    problems = layer_report_mismatches(report, expected, modules, available_fusions())
    assert problems == [], "\n".join(problems) + "\n" + report.table()


@pytest.mark.parametrize("overrides", VARIANTS)
def test_decode_sites_are_all_accounted_for(overrides):
    model = ServingGQAModel(ServingGQAConfig(**overrides))
    prefill, decode = example_inputs(model, batch_size=BATCH, context=PROMPT_LEN)
    with torch.no_grad():
        model.reset_cache()
        model(*prefill)
        run = compile_and_count(model, *decode)
    (sites,) = run.candidates
    assert len(sites.kv_writes) == 2 * model.config.num_layers
    assert len(sites.decode_attention) == model.config.num_layers
    assert sites.modules("decode_attention") == {"layers.0.self_attn", "layers.1.self_attn"}
    for fusion in ("rope_kv_write", "grouped_decode"):
        if fusion in available_fusions():
            assert coverage_gaps(run, fusion) == [], run.report.table()


def test_inductor_decode_step_writes_the_cache_in_place():
    # the one Inductor compile of this file: the rewritten decode step must write the
    # model's own cache buffers (reinplaced, no copy back) and match eager
    from attnfuse.passes.testing import graph_diff

    model = ServingGQAModel(ServingGQAConfig(num_layers=1))
    prefill, decode = example_inputs(model, batch_size=BATCH, context=PROMPT_LEN)
    attn = model.layers[0].self_attn
    with torch.no_grad():
        model.reset_cache()
        model(*prefill)
        ref_logits = model(*decode)
        ref_k, ref_v = attn.k_cache.clone(), attn.v_cache.clone()
        model.reset_cache()
        model(*prefill)
        d = graph_diff(model, *decode, fusions=available_fusions(), backend="inductor")
    torch.testing.assert_close(d.outputs, ref_logits, atol=FP32_ATOL, rtol=0)
    torch.testing.assert_close(attn.k_cache, ref_k, atol=FP32_ATOL, rtol=0)
    torch.testing.assert_close(attn.v_cache, ref_v, atol=FP32_ATOL, rtol=0)
    if "rope_kv_write" in available_fusions():
        d.assert_fired(rope_kv_write=1)
        assert "torch.ops.attnfuse.rope_write_kv" in d.code
        assert "index_put" not in d.code
    if "grouped_decode" in available_fusions():
        d.assert_fired(grouped_decode=1)
        assert "torch.ops.attnfuse.grouped_decode" in d.code


PINNED_FUSIONS = ["rope_kv_write", "grouped_decode"]


@pytest.mark.skipif(not set(PINNED_FUSIONS) <= set(available_fusions()),
                    reason="pins the rewrite of rope_kv_write and grouped_decode together")
def test_decode_layer_rewrite_is_pinned():
    from attnfuse.passes.testing import graph_diff

    model = ServingGQAModel(ServingGQAConfig(num_layers=1))
    prefill, decode = example_inputs(model, batch_size=BATCH, context=PROMPT_LEN)
    with torch.no_grad():
        model.reset_cache()
        model(*prefill)
        d = graph_diff(model, *decode, fusions=PINNED_FUSIONS, backend="eager")
    d.assert_fired(rope_kv_write=1, grouped_decode=1)
    d.assertExpectedInline(d.summary(), """\
rope_kv_write: 1
grouped_decode: 1
- aten._scaled_dot_product_flash_attention_for_cpu x1
- aten.add.Tensor x1
- aten.cat x2
- aten.clone x2
- aten.expand x2
- aten.index_put x2
- aten.mul.Tensor x8
- aten.reshape x4
- aten.split.Tensor x2
- aten.sub.Tensor x2
- aten.unsqueeze x2
- getitem x1
+ aten.lt.Scalar x1
+ aten.select.int x2
+ aten.squeeze.dim x1
+ aten.where.self x1
+ attnfuse.grouped_decode x1
+ auto_functionalized(attnfuse.rope_write_kv) x1""")
