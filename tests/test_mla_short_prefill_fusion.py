"""mla_short_prefill: absorbed MLA prefill attention in torch becomes attnfuse::mla_prefill."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attnfuse.examples.serving_mla import MLAConfig, MLAForCausalLM, example_inputs
from attnfuse.passes.testing import graph_diff

NAME = "mla_short_prefill"
OP = "attnfuse.mla_prefill"
H, D_NOPE, D_ROPE, D_V, R = 4, 32, 16, 32, 64
SCALE = 1 / math.sqrt(D_NOPE + D_ROPE)


# --------------------------------------------------------------- the example model
@pytest.mark.parametrize("form", ["sdpa", "matmul"])
@pytest.mark.parametrize("topk", [None, 5])
def test_example_prefill_rewritten_once_per_layer(form, topk):
    cfg = MLAConfig(prefill_attention=form, index_topk=topk, num_layers=2)
    model = MLAForCausalLM.random(cfg)
    args = example_inputs(model, batch=2, seq_len=12)
    expected = MLAForCausalLM.random(cfg).prefill(*args)  # fresh caches, same weights
    d = graph_diff(model.prefill, *args, fusions=[NAME], backend="eager")
    d.assert_fired(**{NAME: cfg.num_layers})
    assert d.after.count(OP) == cfg.num_layers
    assert "aten.amax" not in d.after  # every attention softmax went into the op
    assert not [m for m in d.report.near_misses if m.fusion == NAME]
    torch.testing.assert_close(d.outputs, expected, atol=1e-4, rtol=1e-4)


def test_example_bf16_and_batch_one():
    cfg = MLAConfig(num_layers=2)
    model = MLAForCausalLM.random(cfg, dtype=torch.bfloat16)
    args = example_inputs(model, batch=1, seq_len=9)
    expected = MLAForCausalLM.random(cfg, dtype=torch.bfloat16).prefill(*args).float()
    d = graph_diff(model.prefill, *args, fusions=[NAME], backend="eager")
    d.assert_fired(**{NAME: 2})
    torch.testing.assert_close(d.outputs.float(), expected, atol=8e-2, rtol=5e-2)


def test_example_generate_unchanged():
    cfg = MLAConfig(num_layers=2)
    model = MLAForCausalLM.random(cfg)
    prompt = example_inputs(model, batch=2, seq_len=8)[0]
    eager = model.generate(prompt, steps=4)
    fused_prefill = torch.compile(model.prefill, backend="attnfuse_eager", options={"fusions": [NAME]})
    assert torch.equal(model.generate(prompt, steps=4, prefill_fn=fused_prefill), eager)


def test_example_decode_left_alone():
    cfg = MLAConfig(num_layers=2)
    model = MLAForCausalLM.random(cfg)
    B, L = 2, 6
    pos = torch.full((B,), L - 1)
    table = model.slots_for(B, torch.arange(L).expand(B, L))
    args = (torch.tensor([3, 7]), pos, table[:, -1], table, torch.full((B,), L))
    d = graph_diff(model.decode, *args, fusions=[NAME], backend="eager")
    d.assert_not_fired(NAME)
    # decode's attention carries the absorbed projections but an input-dependent mask
    reasons = [m.reason for m in d.report.near_misses if m.fusion == NAME]
    assert len(reasons) == 2 and all("mask" in r for r in reasons), reasons


# ------------------------------------------------------------- hand-written forms
def _inputs(T=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(H, D_NOPE + D_V, R, generator=g) / math.sqrt(R)
    return (torch.randn(T, H, D_NOPE, generator=g), torch.randn(T, H, D_ROPE, generator=g),
            torch.randn(T, R, generator=g), torch.randn(T, D_ROPE, generator=g),
            w[:, :D_NOPE].contiguous(), w[:, D_NOPE:].contiguous().transpose(1, 2))


def _absorb(q_nope, w_kc):
    return torch.bmm(q_nope.transpose(0, 1), w_kc).transpose(0, 1)


def _unabsorb(o_lat, w_vc):
    return torch.bmm(o_lat.transpose(0, 1), w_vc).transpose(0, 1)


def einsum_single_sequence(q_nope, q_pe, ckv, k_pe, w_kc, w_vc):
    """One prompt, einsum spelling, scale on the scores, masked_fill with triu."""
    T = q_nope.shape[0]
    q_lat = torch.einsum("thd,hdr->thr", q_nope, w_kc)
    scores = (torch.einsum("thr,sr->hts", q_lat, ckv) + torch.einsum("thd,sd->hts", q_pe, k_pe))
    scores = scores * SCALE
    hidden = torch.ones(T, T, dtype=torch.bool).triu(1)
    probs = torch.softmax(scores.masked_fill(hidden, float("-inf")), dim=-1)
    o_lat = torch.einsum("hts,sr->thr", probs, ckv)
    return torch.einsum("thr,hrv->thv", o_lat, w_vc)


def sdpa_non_causal(q_nope, q_pe, ckv, k_pe, w_kc, w_vc):
    q = torch.cat([_absorb(q_nope, w_kc), q_pe], -1).transpose(0, 1)[None]
    k = torch.cat([ckv, k_pe], -1)[None, None].expand(1, H, -1, -1)
    o = F.scaled_dot_product_attention(q, k, ckv[None, None].expand(1, H, -1, -1), scale=SCALE)
    return _unabsorb(o[0].transpose(0, 1), w_vc)


@pytest.mark.parametrize("fn, causal", [(einsum_single_sequence, True), (sdpa_non_causal, False)])
def test_other_spellings_rewritten(fn, causal):
    args = _inputs()
    d = graph_diff(fn, *args, fusions=[NAME], backend="eager")
    d.assert_fired(**{NAME: 1})
    assert f"{OP}" in d.after and (", True, None, False, 'auto')" in d.after) == causal
    torch.testing.assert_close(d.outputs, fn(*args), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------- look-alikes
def values_not_latent(q_nope, q_pe, ckv, k_pe, w_kc, w_vc):
    q = torch.cat([_absorb(q_nope, w_kc), q_pe], -1).transpose(0, 1)[None]
    k = torch.cat([ckv, k_pe], -1)[None, None].expand(1, H, -1, -1)
    v = (ckv * 2)[None, None].expand(1, H, -1, -1)  # not the keys' latent
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=SCALE)
    return _unabsorb(o[0].transpose(0, 1), w_vc)


def sliding_window(q_nope, q_pe, ckv, k_pe, w_kc, w_vc):
    T = q_nope.shape[0]
    q = torch.cat([_absorb(q_nope, w_kc), q_pe], -1).transpose(0, 1)
    k = torch.cat([ckv, k_pe], -1)
    scores = torch.matmul(q, k.t()) * SCALE
    i = torch.arange(T)
    window = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - 3)
    probs = torch.softmax(scores.masked_fill(~window, float("-inf")), dim=-1)
    return _unabsorb(torch.matmul(probs, ckv).transpose(0, 1), w_vc)


def query_not_absorbed(q_nope, q_pe, ckv, k_pe, w_kc, w_vc):
    q_lat = q_nope.repeat(1, 1, R // D_NOPE)  # latent-sized, but not q_nope @ W_UK
    q = torch.cat([q_lat, q_pe], -1).transpose(0, 1)[None]
    k = torch.cat([ckv, k_pe], -1)[None, None].expand(1, H, -1, -1)
    o = F.scaled_dot_product_attention(q, k, ckv[None, None].expand(1, H, -1, -1), is_causal=True, scale=SCALE)
    return _unabsorb(o[0].transpose(0, 1), w_vc)


def output_not_projected(q_nope, q_pe, ckv, k_pe, w_kc, w_vc):
    q = torch.cat([_absorb(q_nope, w_kc), q_pe], -1).transpose(0, 1)[None]
    k = torch.cat([ckv, k_pe], -1)[None, None].expand(1, H, -1, -1)
    o = F.scaled_dot_product_attention(q, k, ckv[None, None].expand(1, H, -1, -1), is_causal=True, scale=SCALE)
    return o.sum(-1)  # no W_UV


def sparse_unclamped(q_nope, q_pe, ckv, k_pe, w_kc, w_vc, topk):
    kv = torch.cat([ckv, k_pe], -1)
    gathered = kv[topk.abs()]  # -1 slots read row 1 instead of being clamped and masked
    q = torch.cat([_absorb(q_nope, w_kc), q_pe], -1)
    scores = torch.bmm(q, gathered.transpose(1, 2)) * SCALE
    scores = scores.masked_fill((topk < 0).unsqueeze(1), float("-inf"))
    return _unabsorb(torch.bmm(torch.softmax(scores, -1), gathered[..., :R]), w_vc)


def input_mask(q_nope, q_pe, ckv, k_pe, w_kc, w_vc, bias):
    q = torch.cat([_absorb(q_nope, w_kc), q_pe], -1).transpose(0, 1)
    k = torch.cat([ckv, k_pe], -1)
    probs = torch.softmax(torch.matmul(q, k.t()) * SCALE + bias, dim=-1)
    return _unabsorb(torch.matmul(probs, ckv).transpose(0, 1), w_vc)


def _topk(T=10, k=4):
    rows = [torch.cat([torch.arange(max(0, t - k + 1), t + 1), torch.full((max(0, k - t - 1),), -1)])
            for t in range(T)]
    return torch.stack(rows)


@pytest.mark.parametrize("fn, extra, reason", [
    (values_not_latent, (), "values are not the latent of the keys"),
    (sliding_window, (), "mask is neither causal nor empty"),
    (query_not_absorbed, (), "query latent part is not a bmm with W_UK"),
    (output_not_projected, (), "attention output does not feed a bmm with W_UV"),
    (sparse_unclamped, (_topk(),), "not clamped at 0"),
    (input_mask, (torch.zeros(10, 10),), "input-dependent bias"),
])
def test_look_alikes_left_alone_with_reason(fn, extra, reason):
    args = (*_inputs(), *extra)
    d = graph_diff(fn, *args, fusions=[NAME], backend="eager")
    d.assert_not_fired(NAME)
    assert OP not in d.after
    reasons = [m.reason for m in d.report.near_misses if m.fusion == NAME]
    assert len(reasons) == 1 and reason in reasons[0], reasons
    torch.testing.assert_close(d.outputs, fn(*args), atol=1e-5, rtol=1e-5)


def test_ordinary_mha_is_not_a_candidate():
    def mha(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    q, k, v = (torch.randn(1, H, 8, 16) for _ in range(3))
    d = graph_diff(mha, q, k, v, fusions=[NAME], backend="eager")
    d.assert_not_fired(NAME)
    assert not [m for m in d.report.near_misses if m.fusion == NAME]


def test_example_through_inductor():
    cfg = MLAConfig(num_layers=2)
    model = MLAForCausalLM.random(cfg)
    args = example_inputs(model, batch=2, seq_len=8)
    expected = MLAForCausalLM.random(cfg).prefill(*args)
    d = graph_diff(model.prefill, *args, fusions=[NAME], backend="inductor")
    d.assert_fired(**{NAME: 2})
    assert "torch.ops.attnfuse.mla_prefill" in d.code
    torch.testing.assert_close(d.outputs, expected, atol=1e-4, rtol=1e-4)


class _Recorder:
    def __init__(self):
        self.rewrites, self.reasons = [], []

    def rewritten(self, node, detail=""):
        self.rewrites.append(detail)

    def near_miss(self, node, reason):
        self.reasons.append(reason)


def test_sdpa_backend_op_form():
    """On CUDA, SDPA stays one backend op (here efficient attention) in the post-grad graph;
    CPU graphs never show it for MLA's unequal head sizes, so the graph is traced directly."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from attnfuse.fusions.mla_short_prefill import MLAShortPrefillFusion

    T, B = 10, 2

    def absorbed(q_nope, q_pe, ckv, k_pe, w_kc, w_vc):
        q = torch.cat([_absorb(q_nope, w_kc), q_pe], -1).view(B, T // B, H, -1).transpose(1, 2)
        k = torch.cat([ckv, k_pe], -1).view(B, 1, T // B, -1).expand(B, H, -1, -1)
        v = ckv.view(B, 1, T // B, R).expand(B, H, -1, -1)
        o = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, False, 0.0, True,
                                                                   scale=SCALE)[0]
        return _unabsorb(o.transpose(1, 2).reshape(T, H, R), w_vc)

    args = _inputs(T)
    gm = make_fx(absorbed, tracing_mode="fake")(*args)
    rec = _Recorder()
    MLAShortPrefillFusion().apply(gm.graph, rec)
    gm.recompile()
    assert rec.rewrites == [f"dense SDPA, {B} x {T // B} tokens, {H} heads"] and not rec.reasons
    assert "efficient_attention" not in gm.code  # the CUDA-only op is gone: runs on CPU
    q_nope, q_pe, ckv, k_pe, w_kc, w_vc = args
    expected = []
    for b in range(B):  # per prompt, with the math SDPA
        s = slice(b * T // B, (b + 1) * T // B)
        q = torch.cat([_absorb(q_nope[s], w_kc), q_pe[s]], -1).transpose(0, 1)
        k = torch.cat([ckv[s], k_pe[s]], -1)
        o = F.scaled_dot_product_attention(q, k.expand(H, -1, -1), ckv[s].expand(H, -1, -1),
                                           is_causal=True, scale=SCALE)
        expected.append(_unabsorb(o.transpose(0, 1), w_vc))
    torch.testing.assert_close(gm(*args), torch.cat(expected), atol=1e-5, rtol=1e-5)


def test_hf_deepseek_v3_decompressed_form_left_alone():
    """HF's DeepSeek-V3 already runs prefill in the decompressed (MHA) form: nothing to do,
    and nothing to report."""
    from attnfuse.examples.hf_models import build_hf_model, prompt_ids

    model, config = build_hf_model("deepseek_v3")
    ids = prompt_ids(config, prompt_len=8)
    d = graph_diff(lambda x: model(x).logits, ids, fusions=[NAME], backend="eager")
    d.assert_not_fired(NAME)
    assert not [m for m in d.report.near_misses if m.fusion == NAME]
