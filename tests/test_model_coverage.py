"""Coverage beyond the named families: no silent non-matching on models nobody tuned for.

For each family, one decode step of a tiny random-weight model with a ``StaticCache`` is
compiled with ``attnfuse_eager`` and every fusion that exists. Candidate sites are
counted from the graph structure before the passes (``examples/model_coverage.py``), so
a fusion that skips a site without saying why fails here.

The CI subset always runs. ``ATTNFUSE_COVERAGE_ALL=1`` walks every CausalLM family the
installed transformers offers and writes ``benchmarks/results/model_coverage.md``
(minutes on a 2-core CPU).
"""

from __future__ import annotations

import os

import pytest

from attnfuse.examples.model_coverage import (
    CI_FAMILIES,
    COUNTED_FUSIONS,
    available_fusions,
    causal_lm_families,
    check_family,
    walk_families,
    write_table,
)

#: tolerance of the compiled decode step's logits against eager (fp32 models)
LOGITS_ATOL = 1e-4
#: rewrites in the decode step of each CI family (2 layers), and a fragment of the reason
#: given where a layer's site is left alone
EXPECTED = {
    "llama": ({"rope_kv_write": 2, "grouped_decode": 2}, {}),
    "qwen3": ({"rope_kv_write": 2, "grouped_decode": 2}, {}),
    "mistral": ({"rope_kv_write": 2, "grouped_decode": 2}, {}),
    # partial rotary (half the head) behind a fused qkv projection
    "phi3": ({"rope_kv_write": 2, "grouped_decode": 2}, {}),
    # MHA: each query head has its own KV head, so there is no group to share a read
    "gpt_neox": ({"rope_kv_write": 2, "grouped_decode": 0}, {"grouped_decode": "MHA"}),
    # eager (softcapped) attention: matmul, tanh softcap, softmax, matmul
    "gemma2": ({"rope_kv_write": 2, "grouped_decode": 2}, {}),
}
#: every CI family has 2 layers with one K and one V buffer each and one attention
EXPECTED_CANDIDATES = {"kv_write": 4, "decode_attention": 2}


@pytest.mark.parametrize("family", CI_FAMILIES)
def test_ci_family_sites_are_rewritten_or_explained(family):
    fusions = available_fusions()
    result = check_family(family, fusions)
    assert result.status == "ok", result.status
    assert result.graphs == 1, "the decode step must compile without a graph break"
    assert result.candidates == EXPECTED_CANDIDATES
    assert result.max_logit_diff is not None and result.max_logit_diff < LOGITS_ATOL
    for fusion in COUNTED_FUSIONS:
        if fusion in fusions:
            assert result.gaps[fusion] == [], (fusion, result.gaps[fusion])
    fired, reasons = EXPECTED[family]
    assert {f: result.fired.get(f, 0) for f in fired if f in fusions} == {
        f: n for f, n in fired.items() if f in fusions}
    for fusion, fragment in reasons.items():
        if fusion in fusions:
            assert any(f == fusion and fragment in r for f, r in result.near_misses), result.near_misses
    # every near miss carries a reason
    assert all(reason.strip() for _, reason in result.near_misses)


def test_families_without_a_static_cache_are_skipped_with_a_reason():
    # an encoder-decoder family is not walked, and says why
    result = check_family("bart", [])
    assert result.status.startswith("skipped: does not build tiny")
    assert "encoder-decoder" in result.status


def test_walk_lists_the_installed_causal_lm_families():
    names = causal_lm_families()
    assert set(CI_FAMILIES) <= set(names)
    assert len(names) > 50


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("ATTNFUSE_COVERAGE_ALL") != "1",
                    reason="walks every family (minutes); set ATTNFUSE_COVERAGE_ALL=1")
def test_walk_all_families_and_write_table():
    fusions = available_fusions()
    results = walk_families()
    path = write_table(results, fusions)
    assert os.path.exists(path)
    ran = [r for r in results if r.status == "ok"]
    assert len(ran) >= len(CI_FAMILIES)
    # no fusion raises on any family, and no rewrite changes what a model computes
    assert [(r.family, r.status) for r in results if r.status.startswith("failed")] == []
