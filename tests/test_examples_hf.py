"""The HF example models (``examples/hf_models.py``): eager correctness, then compiled.

Eager: the cached greedy loop must agree with a cache-free forward over the whole
sequence, whatever the mask form, and seeded builds must be reproducible. Compiled: a
prefill plus ``DECODE_STEPS`` greedy steps through ``patch_model`` (the ``attnfuse_eager``
backend, every fusion that exists) give the eager tokens, and the report says, per
attention layer, what fired and what was refused.
"""

from __future__ import annotations

import pytest
import torch

from attnfuse.examples.hf_models import (
    build_hf_model,
    cache_arg,
    families,
    greedy_decode,
    make_static_cache,
    prompt_ids,
)
from attnfuse.examples.model_coverage import (
    LayerExpectation,
    available_fusions,
    compile_and_count,
    coverage_gaps,
    layer_report_mismatches,
)

#: the issue asks for 32 greedy steps after the prefill; the cache holds them all
DECODE_STEPS = 32
PROMPT_LEN = 8
MAX_CACHE_LEN = 48
#: eager steps checked against the cache-free forward (each check reruns the sequence)
RECOMPUTE_STEPS = 6
#: compiled vs eager logits, fp32 models on CPU
FP32_ATOL = 1e-4

#: candidate sites the report says nothing about, by (family, fusion): none. (HF's
#: DeepSeek-V3 attends MHA over the decompressed cache with a qk head of 48 and a v head of
#: 32, which SDPA lowers to its math form on CPU; grouped_decode reports those attentions
#: as near misses.)
SILENT_SITES: dict[tuple[str, str], int] = {}

#: per attention layer, what the report of the prefill graph and of the decode graph says
EXPECTED_LAYERS = {
    # Llama, Qwen3, Mistral: the RoPE'd K write (with V) is fused in both graphs; decode
    # attention becomes the grouped split-KV kernel; prefill attention is not decode
    "gqa": [
        LayerExpectation(fired={"rope_kv_write": 1}, near_misses={"grouped_decode": "not decode"}),
        LayerExpectation(fired={"rope_kv_write": 1, "grouped_decode": 1}),
    ],
    # HF's DeepSeek-V3 caches the normalized latent and the RoPE'd k_rot in the two slots;
    # its RoPE rotates interleaved pairs and writes them de-interleaved, which the op
    # computes from the de-interleaved input: fused in both graphs
    "deepseek_v3": [
        LayerExpectation(fired={"rope_kv_write": 1}),
        LayerExpectation(fired={"rope_kv_write": 1}),
    ],
}


def _build(family: str, **overrides):
    model, config = build_hf_model(family, **overrides)
    cache = make_static_cache(model, max_cache_len=MAX_CACHE_LEN)
    return model, config, cache


@pytest.mark.parametrize("family", families())
def test_cached_decode_matches_cache_free_forward(family):
    model, config, cache = _build(family)
    prompt = prompt_ids(config, prompt_len=PROMPT_LEN)
    result = greedy_decode(model, prompt, cache, steps=RECOMPUTE_STEPS)
    full = torch.cat([prompt, result.tokens[:, :-1]], dim=1)
    with torch.no_grad():
        logits = model(input_ids=full, use_cache=False).logits[:, PROMPT_LEN - 1:].float()
    assert torch.equal(logits.argmax(-1), result.tokens)
    torch.testing.assert_close(torch.stack(result.logits, dim=1), logits, atol=FP32_ATOL, rtol=0)
    # the tokens are not a degenerate repeat of one id
    assert len(set(result.tokens[0].tolist())) > RECOMPUTE_STEPS // 2


@pytest.mark.parametrize("family", ["llama", "deepseek_v3"])
def test_mask_forms_agree(family):
    # the generate form (4-D mask built outside the model) and the in-model mask
    model, config, cache = _build(family)
    prompt = prompt_ids(config, prompt_len=PROMPT_LEN)
    outside = greedy_decode(model, prompt, cache, steps=4, prebuilt_mask=True)
    inside = greedy_decode(model, prompt, cache, steps=4, prebuilt_mask=False)
    assert torch.equal(outside.tokens, inside.tokens)
    torch.testing.assert_close(outside.logits, inside.logits, atol=FP32_ATOL, rtol=0)


def test_seeded_builds_are_reproducible_and_seeds_differ():
    a, _ = build_hf_model("qwen3", seed=3)
    b, _ = build_hf_model("qwen3", seed=3)
    c, _ = build_hf_model("qwen3", seed=4)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
    assert not all(torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))
    assert not any(p.requires_grad for p in a.parameters())


def test_family_configs_have_the_advertised_shape():
    _, llama = build_hf_model("llama")
    assert (llama.num_attention_heads, llama.num_key_value_heads, llama.head_dim) == (8, 2, 32)
    _, mistral = build_hf_model("mistral")
    assert mistral.sliding_window is None
    model, _ = build_hf_model("qwen3")
    assert hasattr(model.model.layers[0].self_attn, "q_norm")
    model, ds = build_hf_model("deepseek_v3")
    assert (ds.kv_lora_rank, ds.qk_rope_head_dim, ds.num_key_value_heads) == (64, 16, 8)
    assert type(model.model.layers[1].mlp).__name__ == "DeepseekV3MoE"


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="family"):
        build_hf_model("gpt5")
    model, config, cache = _build("llama")
    with pytest.raises(ValueError, match="steps"):
        greedy_decode(model, prompt_ids(config), cache, steps=-1)
    with pytest.raises(ValueError, match="input_ids"):
        greedy_decode(model, prompt_ids(config)[0], cache, steps=1)


# ---------------------------------------------------------------------- compiled
def _patched_run(model, cache, prompt, steps, backend="attnfuse_eager"):
    """Greedy decode through ``patch_model`` (every fusion that exists, caches off);
    returns the result and the model's merged report."""
    from attnfuse.passes.patch import patch_model, report_of, unpatch_model
    from attnfuse.passes.testing import NO_CACHE_PATCHES

    patch_model(model, fusions=available_fusions(), backend=backend, fullgraph=True,
                dynamic=False, options=dict(NO_CACHE_PATCHES))
    try:
        result = greedy_decode(model, prompt, cache, steps)
        report = report_of(model)
    finally:
        unpatch_model(model)
        torch._dynamo.reset()
    return result, report


#: (family, config overrides): every family as configured, plus Llama with HF's eager
#: attention (matmul, fp32 softmax, matmul instead of SDPA)
PATCHED_CASES = [pytest.param(f, {}, id=f) for f in families()] + [
    pytest.param("llama", {"attn_implementation": "eager"}, id="llama-eager"),
]


@pytest.mark.parametrize("family,overrides", PATCHED_CASES)
def test_patched_greedy_decode_matches_eager(family, overrides):
    model, config, cache = _build(family, **overrides)
    prompt = prompt_ids(config, prompt_len=PROMPT_LEN)
    eager = greedy_decode(model, prompt, cache, DECODE_STEPS)
    patched, report = _patched_run(model, cache, prompt, DECODE_STEPS)
    assert torch.equal(patched.tokens, eager.tokens)
    torch.testing.assert_close(patched.logits, eager.logits, atol=FP32_ATOL, rtol=0)
    # one prefill graph and one decode graph: the decode steps never recompile
    assert len(report.graphs) == 2, report.table()
    assert not [e for g in report.graphs for e in g.errors], report.table()
    _check_layer_report(family, report, config.num_hidden_layers)


def _check_layer_report(family, report, num_layers):
    """The report says, for each attention layer of each graph, what ``EXPECTED_LAYERS``
    says (for the fusions that exist)."""
    modules = [f"model.layers.{i}.self_attn" for i in range(num_layers)]
    expected = EXPECTED_LAYERS.get(family, EXPECTED_LAYERS["gqa"])
    problems = layer_report_mismatches(report, expected, modules, available_fusions())
    assert problems == [], f"{family}:\n" + "\n".join(problems) + "\n" + report.table()


@pytest.mark.parametrize("family", families())
def test_decode_step_sites_are_all_accounted_for(family):
    # candidate sites counted from graph structure, independently of the fusions
    model, config, cache = _build(family)
    prompt = prompt_ids(config, prompt_len=PROMPT_LEN)
    greedy_decode(model, prompt, cache, steps=0)
    step = {
        "input_ids": prompt[:, :1],
        "position_ids": torch.tensor([[PROMPT_LEN]]),
        **cache_arg(cache),
        "use_cache": True,
        "logits_to_keep": 1,
    }
    with torch.no_grad():
        run = compile_and_count(model, **step)
    (decode,) = run.candidates
    # K and V buffers of each layer, one attention per layer
    assert len(decode.kv_writes) == 2 * config.num_hidden_layers
    assert len(decode.decode_attention) == config.num_hidden_layers
    assert decode.modules("kv_writes") == {f"model.layers.{i}.self_attn" for i in range(2)}
    for fusion in ("rope_kv_write", "grouped_decode"):
        if fusion in available_fusions():
            gaps = coverage_gaps(run, fusion)
            assert len(gaps) == SILENT_SITES.get((family, fusion), 0), (gaps, run.report.table())


#: bf16 logits of these models reach about 4.5 in magnitude, where one bf16 ulp is
#: 2**-5; the rewritten ops round at other points than eager does, so allow a few ulps
BF16_LOGIT_ATOL = 4 * 2**-5
#: greedy bf16 runs part ways at the first near-tie; seeded weights keep these steps clear
BF16_STEPS = 8


def test_patched_bf16_decode_stays_within_bf16_noise():
    model, config, cache = _build("llama", dtype=torch.bfloat16)
    prompt = prompt_ids(config, prompt_len=PROMPT_LEN)
    eager = greedy_decode(model, prompt, cache, BF16_STEPS)
    patched, report = _patched_run(model, cache, prompt, BF16_STEPS)
    assert torch.equal(patched.tokens, eager.tokens)
    torch.testing.assert_close(patched.logits, eager.logits, atol=BF16_LOGIT_ATOL, rtol=0)
    assert not [e for g in report.graphs for e in g.errors], report.table()


def test_compile_with_backend_name_and_options():
    # the entry-point backend by name, our options through torch.compile
    from attnfuse.passes.report import collect_reports

    model, config, cache = _build("qwen3")
    prompt = prompt_ids(config, prompt_len=PROMPT_LEN)
    eager = greedy_decode(model, prompt, cache, steps=8)
    fusions = available_fusions()
    compiled = torch.compile(model, backend="attnfuse_eager", fullgraph=True, dynamic=False,
                             options={"fusions": fusions})
    try:
        with collect_reports() as report:
            result = greedy_decode(compiled, prompt, cache, steps=8, config=config)
    finally:
        torch._dynamo.reset()
    assert torch.equal(result.tokens, eager.tokens)
    assert len(report.graphs) == 2
    assert [g.fusions for g in report.graphs] == [tuple(fusions)] * 2


@pytest.mark.slow
def test_inductor_patched_greedy_decode_matches_eager():
    # the one Inductor run of this file (about 30 s on 2 CPU cores): prefill and decode
    # graphs through the attnfuse backend with code generation
    model, config, cache = _build("llama")
    prompt = prompt_ids(config, prompt_len=PROMPT_LEN)
    eager = greedy_decode(model, prompt, cache, steps=4)
    patched, report = _patched_run(model, cache, prompt, 4, backend="attnfuse")
    assert torch.equal(patched.tokens, eager.tokens)
    torch.testing.assert_close(patched.logits, eager.logits, atol=FP32_ATOL, rtol=0)
    assert len(report.graphs) == 2 and report.from_cache == 0, report.table()
    _check_layer_report("llama", report, config.num_hidden_layers)
