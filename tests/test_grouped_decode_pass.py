"""The ``grouped_decode`` pass: every matched form (rewrite count + numerics against the
unfused graph), the HF graphs it exists for, and the look-alikes it must leave alone."""

from __future__ import annotations

import copy
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode

from attnfuse.examples.hf_models import cache_arg
from attnfuse.fusions.grouped_decode import GroupedDecodeFusion
from attnfuse.passes.testing import graph_diff

NAME = "grouped_decode"
OP = torch.ops.attnfuse.grouped_decode.default
aten = torch.ops.aten
F32_TOL = {"atol": 1e-5, "rtol": 1e-5}
#: bf16: the unfused graph rounds the scores to bf16 before the fp32 softmax; the op does not
BF16_TOL = {"atol": 3e-2, "rtol": 3e-2}
B, HQ, HKV, S, D = 2, 8, 2, 16, 16
SCALE = 0.3
#: V head dim of the SDPA math-path forms (differs from D: CPU SDPA takes the math path)
DV = 8
#: V = the leading DV_LATENT features of an MLA latent row of D_LATENT
D_LATENT, DV_LATENT = 40, 24


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """HF's repeat_kv."""
    b, h, s, d = x.shape
    if n_rep == 1:
        return x
    return x[:, :, None, :, :].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def sdpa_repeat_kv(q, k_cache, v_cache, mask):
    n_rep = q.shape[1] // k_cache.shape[1]
    k, v = repeat_kv(k_cache, n_rep), repeat_kv(v_cache, n_rep)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=SCALE)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def sdpa_enable_gqa(q, k_cache, v_cache):
    return F.scaled_dot_product_attention(q, k_cache, v_cache, enable_gqa=True) * 2


def eager_attention(q, k_cache, v_cache, mask, softcap=None):
    """HF's eager_attention_forward (with Gemma 2's softcap)."""
    n_rep = q.shape[1] // k_cache.shape[1]
    k, v = repeat_kv(k_cache, n_rep), repeat_kv(v_cache, n_rep)
    w = torch.matmul(q, k.transpose(2, 3)) * SCALE
    if softcap is not None:
        w = torch.tanh(w / softcap) * softcap
    if mask is not None:
        w = w + mask
    w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(w, v).transpose(1, 2).contiguous()


def sdpa_math_repeat_kv(q, k_cache, v_cache, keep, enable_gqa=False):
    """K and V head dims differ: CPU SDPA lowers to its math path, whose softmax is
    ``_safe_softmax`` (decomposed: ``where(row all -inf, 0, softmax)``)."""
    if not enable_gqa:
        n_rep = q.shape[1] // k_cache.shape[1]
        k_cache, v_cache = repeat_kv(k_cache, n_rep), repeat_kv(v_cache, n_rep)
    return F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=keep, scale=SCALE,
                                          enable_gqa=enable_gqa)


def sdpa_math_latent(q, latent, keep, v_source=None):
    """Absorbed MLA decode as serving code writes it with SDPA: one latent row per
    position read by every head, V its leading features (or, with ``v_source``, a
    separate tensor: plain MQA with Dk != Dv)."""
    heads = q.shape[1]
    v = latent[..., :DV_LATENT] if v_source is None else v_source
    return F.scaled_dot_product_attention(
        q, latent.unsqueeze(1).expand(-1, heads, -1, -1), v.unsqueeze(1).expand(-1, heads, -1, -1),
        attn_mask=keep[:, None, None, :], scale=SCALE)


def sdpa_math_latent_gathered(q, latent_pool, pe_pool, slot_table, keep):
    """``examples/serving_mla.py``'s decode: K = cat(latent[slots], pe[slots]) and V =
    latent[slots], two reads of one gather the pass must see as one tensor."""
    heads = q.shape[1]
    k = torch.cat([latent_pool[slot_table], pe_pool[slot_table]], dim=-1)
    v = latent_pool[slot_table]
    return F.scaled_dot_product_attention(
        q, k.unsqueeze(1).expand(-1, heads, -1, -1), v.unsqueeze(1).expand(-1, heads, -1, -1),
        attn_mask=keep[:, None, None, :], scale=SCALE)


def matmul_masked_fill(q, k_cache, v_cache, lens, form="masked_fill", fill=float("-inf")):
    """Serving-style GQA decode: scores by matmul, ``masked_fill(~valid, -inf)``, fp32
    softmax, weighted sum (``examples/serving_gqa.py``, ``decode_attention="matmul"``)."""
    n_rep = q.shape[1] // k_cache.shape[1]
    keys, values = repeat_kv(k_cache, n_rep), repeat_kv(v_cache, n_rep)
    pos = torch.arange(keys.shape[2])[None, :]
    scores = torch.matmul(q, keys.transpose(2, 3)) * SCALE
    if form == "masked_fill":
        valid = pos < lens[:, None]
        scores = scores.masked_fill(~valid[:, None, None, :], fill)
    elif form == "where_keep":
        valid = pos < lens[:, None]
        scores = torch.where(valid[:, None, None, :], scores, fill)
    else:  # "masked_fill_drop": the mask marks the dropped positions directly
        scores = scores.masked_fill((pos >= lens[:, None])[:, None, None, :], fill)
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return torch.matmul(probs, values)


def mla_absorbed_two_part(q_nope, q_pe, latent):
    """Absorbed MLA decode: nope and rope scores over one latent cache, V = its prefix."""
    ckv, kpe = latent[..., :32], latent[..., 32:]
    scores = torch.einsum("bhc,bsc->bhs", q_nope, ckv) + torch.einsum("bhr,bsr->bhs", q_pe, kpe)
    p = torch.softmax(scores.float() * SCALE, -1).to(q_nope.dtype)
    return torch.einsum("bhs,bsc->bhc", p, ckv)


def mla_absorbed_single(q, latent, mask):
    scores = torch.bmm(q, latent.transpose(1, 2)) * SCALE + mask
    p = torch.softmax(scores, -1)
    return torch.bmm(p, latent[..., :32])


def _inputs(dtype=torch.float32, hq=HQ, hkv=HKV, q_len=1):
    torch.manual_seed(0)
    q = torch.randn(B, hq, q_len, D, dtype=dtype)
    k = torch.randn(B, hkv, S, D, dtype=dtype)
    v = torch.randn(B, hkv, S, D, dtype=dtype)
    lens = torch.tensor([11, S])
    keep = torch.arange(S)[None, None, None, :] < lens.view(B, 1, 1, 1)
    return q, k, v, keep


def _keep_with_empty_row(dtype=None):
    """(B, 1, 1, S) bool mask: sequence 0 sees nothing (a fully masked row), sequence 1
    sees a random subset; with ``dtype``, the additive form (0 / -inf)."""
    torch.manual_seed(3)
    keep = torch.rand(B, 1, 1, S) > 0.3
    keep[0] = False
    keep[1, ..., 0] = True
    if dtype is None:
        return keep
    return torch.where(keep, 0.0, float("-inf")).to(dtype)


def _diff(fn, *args):
    return graph_diff(fn, *args, fusions=[NAME], backend="eager")


def _reasons(d):
    return [m.reason for m in d.report.near_misses if m.fusion == NAME]


def _details(d):
    return [site.detail for site in d.report.sites if site.fusion == NAME]


# ------------------------------------------------------------------ forms
@pytest.mark.parametrize("dtype,tol", [(torch.float32, F32_TOL), (torch.bfloat16, BF16_TOL)])
def test_repeat_kv_sdpa_with_mask(dtype, tol):
    q, k, v, keep = _inputs(dtype)
    d = _diff(sdpa_repeat_kv, q, k, v, keep)
    d.assert_fired(grouped_decode=1)
    assert "aten.clone" not in d.after and "grouped_decode" in d.after
    torch.testing.assert_close(d.outputs, sdpa_repeat_kv(q, k, v, keep), **tol)


def test_inductor_code_calls_op_and_copies_no_cache():
    q, k, v, keep = _inputs()
    d = graph_diff(sdpa_repeat_kv, q, k, v, keep, fusions=[NAME], backend="inductor")
    d.assert_fired(grouped_decode=1)
    assert "attnfuse.grouped_decode" in d.code
    assert "clone" not in d.code  # the n_rep copies of the cache are gone
    torch.testing.assert_close(d.outputs, sdpa_repeat_kv(q, k, v, keep), **F32_TOL)


def test_sdpa_enable_gqa_without_repeat():
    q, k, v, _ = _inputs()
    d = _diff(sdpa_enable_gqa, q, k, v)
    d.assert_fired(grouped_decode=1)
    torch.testing.assert_close(d.outputs, sdpa_enable_gqa(q, k, v), **F32_TOL)


@pytest.mark.parametrize("softcap", [None, 4.0])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, F32_TOL), (torch.bfloat16, BF16_TOL)])
def test_eager_matmul_softmax_matmul(softcap, dtype, tol):
    q, k, v, keep = _inputs(dtype)
    mask = torch.where(keep, 0.0, torch.finfo(dtype).min).to(dtype)  # HF eager: finite min
    d = _diff(eager_attention, q, k, v, mask, softcap)
    d.assert_fired(grouped_decode=1)
    assert "aten.bmm" not in d.after
    torch.testing.assert_close(d.outputs, eager_attention(q, k, v, mask, softcap), **tol)


def test_eager_without_mask_scaled_softmax_rewrite():
    """No mask: Inductor rewrites softmax(x * scale) into its max-on-unscaled form."""
    q, k, v, _ = _inputs()
    d = _diff(eager_attention, q, k, v, None)
    d.assert_fired(grouped_decode=1)
    torch.testing.assert_close(d.outputs, eager_attention(q, k, v, None), **F32_TOL)


def test_mla_absorbed_einsum_two_part():
    torch.manual_seed(1)
    q_nope, q_pe, latent = torch.randn(B, 16, 32), torch.randn(B, 16, 8), torch.randn(B, 20, 40)
    d = _diff(mla_absorbed_two_part, q_nope, q_pe, latent)
    d.assert_fired(grouped_decode=1)
    assert "aten.cat" in d.after  # q = cat(q_nope, q_pe) against the whole latent row
    torch.testing.assert_close(d.outputs, mla_absorbed_two_part(q_nope, q_pe, latent), **F32_TOL)


def test_mla_absorbed_bmm_single_with_mask():
    torch.manual_seed(2)
    q, latent = torch.randn(B, 16, 40), torch.randn(B, 20, 40)
    mask = torch.where(torch.rand(B, 1, 20) > 0.3, 0.0, float("-inf"))
    d = _diff(mla_absorbed_single, q, latent, mask)
    d.assert_fired(grouped_decode=1)
    torch.testing.assert_close(d.outputs, mla_absorbed_single(q, latent, mask), **F32_TOL)


# ------------------------------------------------------------------ SDPA's math path
def _math_inputs(dtype, hkv=HKV, q_len=1):
    torch.manual_seed(4)
    q = torch.randn(B, HQ, q_len, D, dtype=dtype)
    return q, torch.randn(B, hkv, S, D, dtype=dtype), torch.randn(B, hkv, S, DV, dtype=dtype)


@pytest.mark.parametrize("mask_dtype", [None, "additive"], ids=["bool", "additive"])
@pytest.mark.parametrize("enable_gqa", [False, True], ids=["repeat_kv", "enable_gqa"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, F32_TOL), (torch.bfloat16, BF16_TOL)])
def test_sdpa_math_path_safe_softmax(dtype, tol, enable_gqa, mask_dtype):
    """The guard zeroes rows with no visible key, as the op does: matched, and the fully
    masked sequence comes out 0 in both graphs."""
    q, k, v = _math_inputs(dtype)
    keep = _keep_with_empty_row(dtype if mask_dtype else None)
    d = _diff(sdpa_math_repeat_kv, q, k, v, keep, enable_gqa)
    d.assert_fired(grouped_decode=1)
    assert _details(d) == ["eager safe_softmax n_rep=4"] and _reasons(d) == []
    assert "aten.bmm" not in d.after and "aten.any" not in d.after
    expected = sdpa_math_repeat_kv(q, k, v, keep, enable_gqa)
    assert expected[0].abs().max() == 0  # the unfused guard's zeros ...
    assert d.outputs[0].abs().max() == 0  # ... and the op's
    torch.testing.assert_close(d.outputs, expected, **tol)


def test_sdpa_math_path_without_mask():
    q, k, v = _math_inputs(torch.float32)
    d = _diff(sdpa_math_repeat_kv, q, k, v, None)
    d.assert_fired(grouped_decode=1)
    torch.testing.assert_close(d.outputs, sdpa_math_repeat_kv(q, k, v, None), **F32_TOL)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, F32_TOL), (torch.bfloat16, BF16_TOL)])
def test_sdpa_math_path_latent_broadcast_is_shared_latent(dtype, tol):
    """MLA decode through SDPA: every head reads one latent row (expand of a size-1 head
    dim), V is its leading features; the op reads the latent once (no V operand)."""
    torch.manual_seed(5)
    q = torch.randn(B, HQ, 1, D_LATENT, dtype=dtype)
    latent = torch.randn(B, S, D_LATENT, dtype=dtype)
    keep = _keep_with_empty_row()[:, 0, 0]
    d = _diff(sdpa_math_latent, q, latent, keep)
    d.assert_fired(grouped_decode=1)
    assert _details(d) == [f"eager safe_softmax n_rep={HQ} shared-latent"]
    expected = sdpa_math_latent(q, latent, keep)
    assert d.outputs[0].abs().max() == 0
    torch.testing.assert_close(d.outputs, expected, **tol)


@pytest.mark.parametrize("dv, detail", [
    # V a tensor of its own: one KV head, K and V read separately (math path: Dk != Dv)
    (DV_LATENT, f"eager safe_softmax n_rep={HQ}"),
    # Dk == Dv: CPU SDPA keeps its flash op; the broadcast KV row is one KV head
    (D_LATENT, f"sdpa _scaled_dot_product_flash_attention_for_cpu n_rep={HQ}"),
], ids=["math-path-separate-v", "cpu-flash-op"])
def test_broadcast_kv_row_with_separate_values(dv, detail):
    torch.manual_seed(6)
    q, latent = torch.randn(B, HQ, 1, D_LATENT), torch.randn(B, S, D_LATENT)
    values = torch.randn(B, S, dv)
    keep = _keep_with_empty_row()[:, 0, 0]
    d = _diff(sdpa_math_latent, q, latent, keep, values)
    d.assert_fired(grouped_decode=1)
    assert _details(d) == [detail]
    torch.testing.assert_close(d.outputs, sdpa_math_latent(q, latent, keep, values), **F32_TOL)


def test_sdpa_math_path_gathered_latent_read_twice_is_shared():
    torch.manual_seed(7)
    slots = 64
    q = torch.randn(B, HQ, 1, D_LATENT)
    latent_pool, pe_pool = torch.randn(slots, DV_LATENT), torch.randn(slots, D_LATENT - DV_LATENT)
    slot_table = torch.randperm(slots)[:B * S].view(B, S)
    keep = _keep_with_empty_row()[:, 0, 0]
    args = (q, latent_pool, pe_pool, slot_table, keep)
    d = _diff(sdpa_math_latent_gathered, *args)
    d.assert_fired(grouped_decode=1)
    assert _details(d) == [f"eager safe_softmax n_rep={HQ} shared-latent"]
    torch.testing.assert_close(d.outputs, sdpa_math_latent_gathered(*args), **F32_TOL)


def test_sdpa_math_path_inductor_code_calls_op():
    q, k, v = _math_inputs(torch.float32)
    keep = _keep_with_empty_row()
    d = graph_diff(sdpa_math_repeat_kv, q, k, v, keep, fusions=[NAME], backend="inductor")
    d.assert_fired(grouped_decode=1)
    assert "attnfuse.grouped_decode" in d.code and "clone" not in d.code
    torch.testing.assert_close(d.outputs, sdpa_math_repeat_kv(q, k, v, keep), **F32_TOL)


# ------------------------------------------------------------------ bool-masked matmul
@pytest.mark.parametrize("form", ["masked_fill", "where_keep", "masked_fill_drop"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, F32_TOL), (torch.bfloat16, BF16_TOL)])
def test_matmul_bool_mask_carried(dtype, tol, form):
    """-inf written over masked logits: the bool mask goes to the op (True = attend)."""
    q, k, v, _ = _inputs(dtype)
    lens = torch.tensor([5, S - 3])
    d = _diff(matmul_masked_fill, q, k, v, lens, form)
    d.assert_fired(grouped_decode=1)
    assert _details(d) == ["eager n_rep=4"]
    assert ("aten.logical_not" in d.after) == (form == "masked_fill_drop")
    torch.testing.assert_close(d.outputs, matmul_masked_fill(q, k, v, lens, form), **tol)


# ------------------------------------------------------------------ HF models
def _hf_decode(config_cls, attn, fusions=(NAME,), **extra):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = config_cls(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=8, num_key_value_heads=2, head_dim=8, vocab_size=128,
                     max_position_embeddings=64, **extra)
    cfg._attn_implementation = attn
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    cache = transformers.StaticCache(config=cfg, max_cache_len=16)
    with torch.no_grad():
        model(torch.randint(0, 128, (2, 5)), **cache_arg(cache), cache_position=torch.arange(5))
        token, pos = torch.randint(0, 128, (2, 1)), torch.tensor([5])
        expected = model(token, **cache_arg(copy.deepcopy(cache)), cache_position=pos).logits

        def step(token, pos):
            return model(token, **cache_arg(cache), cache_position=pos).logits

        d = graph_diff(step, token, pos, fusions=list(fusions), backend="eager")
    return d, expected


@pytest.mark.parametrize(
    "family,attn",
    [("Llama", "sdpa"), ("Llama", "eager"), ("Qwen3", "sdpa"), ("Mistral", "sdpa")],
)
def test_hf_static_cache_decode(family, attn):
    transformers = pytest.importorskip("transformers")
    extra = {"sliding_window": None} if family == "Mistral" else {}
    d, expected = _hf_decode(getattr(transformers, f"{family}Config"), attn, **extra)
    d.assert_fired(grouped_decode=2)  # one per layer
    assert _reasons(d) == []
    torch.testing.assert_close(d.outputs, expected, **F32_TOL)


def test_hf_decode_after_rope_kv_write():
    """rope_kv_write runs first: attention then reads the cache from its op's output."""
    transformers = pytest.importorskip("transformers")
    d, expected = _hf_decode(transformers.LlamaConfig, "sdpa",
                             fusions=("rope_kv_write", NAME))
    d.assert_fired(rope_kv_write=2, grouped_decode=2)
    torch.testing.assert_close(d.outputs, expected, **F32_TOL)


# ------------------------------------------------------------------ look-alikes left alone
def test_prefill_is_a_near_miss():
    q, k, v, _ = _inputs(q_len=4)
    keep = torch.ones(B, 1, 4, S, dtype=torch.bool)
    d = _diff(sdpa_repeat_kv, q, k, v, keep)
    d.assert_not_fired(NAME)
    assert _reasons(d) == ["query length 4 > 1 (not decode)"]


def test_symbolic_shapes_are_a_near_miss():
    """dynamic=True: the pass records why and leaves the graph alone (it never raises)."""
    q, k, v, keep = _inputs()
    d = graph_diff(sdpa_repeat_kv, q, k, v, keep, fusions=[NAME], backend="eager", dynamic=True)
    d.assert_not_fired(NAME)
    assert len(_reasons(d)) == 1 and "symbolic shape" in _reasons(d)[0]
    torch.testing.assert_close(d.outputs, sdpa_repeat_kv(q, k, v, keep))


def test_mha_without_sharing_is_left_alone():
    """n_rep = 1: SDPA already reads each KV head once; the rewrite would gain nothing."""
    q, k, v, keep = _inputs(hkv=HQ)
    d = _diff(sdpa_repeat_kv, q, k, v, keep)
    d.assert_not_fired(NAME)
    assert _reasons(d) == ["no KV head sharing (Hq == Hkv, MHA): nothing to gain"]


def test_per_head_mask_is_a_near_miss():
    q, k, v, _ = _inputs()
    per_head = torch.rand(B, HQ, 1, S) > 0.2
    per_head[..., 0] = True
    d = _diff(sdpa_repeat_kv, q, k, v, per_head)
    d.assert_not_fired(NAME)
    assert len(_reasons(d)) == 1 and _reasons(d)[0].startswith("mask varies per head")
    torch.testing.assert_close(d.outputs, sdpa_repeat_kv(q, k, v, per_head))


def test_sdpa_math_path_prefill_is_a_near_miss():
    q, k, v = _math_inputs(torch.float32, q_len=4)
    d = _diff(sdpa_math_repeat_kv, q, k, v, torch.ones(B, 1, 4, S, dtype=torch.bool))
    d.assert_not_fired(NAME)
    assert _reasons(d) == ["query length 4 > 1 (not decode)"]


def test_sdpa_math_path_mha_reason_is_no_sharing():
    """HF DeepSeek-V3's form (decompressed K/V, Hq == Hkv, math path): the reason shown
    is the lack of sharing, not the softmax guard."""
    q, k, v = _math_inputs(torch.float32, hkv=HQ)
    keep = _keep_with_empty_row()
    d = _diff(sdpa_math_repeat_kv, q, k, v, keep)
    d.assert_not_fired(NAME)
    assert _reasons(d) == ["no KV head sharing (Hq == Hkv, MHA): nothing to gain"]


def test_matmul_masked_fill_with_finite_value_is_a_near_miss():
    """A finite fill averages every position of a fully masked row; the op writes 0."""
    q, k, v, _ = _inputs()
    lens = torch.tensor([5, S - 3])
    fill = torch.finfo(torch.float32).min
    d = _diff(matmul_masked_fill, q, k, v, lens, "masked_fill", fill)
    d.assert_not_fired(NAME)
    assert _reasons(d) == [f"logits masked with {fill} instead of -inf"]
    torch.testing.assert_close(d.outputs, matmul_masked_fill(q, k, v, lens, "masked_fill", fill))


def test_mask_added_before_the_scale_is_a_near_miss():
    """(scores + mask) * s scales the mask too; the op adds it after scaling."""
    def mask_then_scale(q, k_cache, v_cache, mask):
        k, v = repeat_kv(k_cache, 4), repeat_kv(v_cache, 4)
        w = (torch.matmul(q, k.transpose(2, 3)) + mask) * SCALE
        return torch.matmul(F.softmax(w, dim=-1), v)

    q, k, v, keep = _inputs()
    mask = torch.where(keep, 0.0, torch.finfo(torch.float32).min)
    d = _diff(mask_then_scale, q, k, v, mask)
    d.assert_not_fired(NAME)
    assert _reasons(d) == ["mask added before the logit scale"]


def test_attention_weights_used_elsewhere_is_a_near_miss():
    def returns_weights(q, k_cache, v_cache):
        k, v = repeat_kv(k_cache, 4), repeat_kv(v_cache, 4)
        w = F.softmax(torch.matmul(q, k.transpose(2, 3)) * SCALE, dim=-1, dtype=torch.float32)
        return torch.matmul(w, v), w

    q, k, v, _ = _inputs()
    d = _diff(returns_weights, q, k, v)
    d.assert_not_fired(NAME)
    assert _reasons(d) == ["attention weights are used elsewhere"]


# ------------------------------------------------------------------ CUDA op forms (fake tensors)
class _Rec:
    """A SiteRecorder that keeps what it is told."""

    def __init__(self):
        self.done: list[str] = []
        self.missed: list[str] = []

    def rewritten(self, node, detail=""):
        self.done.append(detail)

    def near_miss(self, node, reason):
        self.missed.append(reason)


def _cuda_graph(sdpa_target, reshape_target, with_mask, cache_from_getitem=False):
    """The repeat_kv + SDPA decode graph as the CUDA dumps show it, on fake CUDA tensors."""
    graph = fx.Graph()
    mode = FakeTensorMode()

    def _emit(graph, target, args, kwargs=None):
        node = graph.call_function(target, args, kwargs or {})
        fake_args, fake_kwargs = fx.node.map_arg((args, kwargs or {}), lambda n: n.meta["val"])
        with mode:
            node.meta["val"] = target(*fake_args, **fake_kwargs)
        return node

    with mode:
        vals = {
            "q": torch.empty(B, HQ, 1, D, device="cuda", dtype=torch.bfloat16),
            "k": torch.empty(B, HKV, S, D, device="cuda", dtype=torch.bfloat16),
            "v": torch.empty(B, HKV, S, D, device="cuda", dtype=torch.bfloat16),
            "m": torch.empty(B, 1, 1, S, device="cuda", dtype=torch.bool),
        }
    ph = {}
    for name, val in vals.items():
        ph[name] = graph.placeholder(name)
        ph[name].meta["val"] = val
    caches = []
    for name in ("k", "v"):
        src = ph[name]
        if cache_from_getitem:  # e.g. the output of an auto_functionalized cache write
            sorted_ = _emit(graph, aten.sort.default, (src,))
            src = _emit(graph, operator.getitem, (sorted_, 0))
        unsq = _emit(graph, aten.unsqueeze.default, (src, 2))
        exp = _emit(graph, aten.expand.default, (unsq, [B, HKV, HQ // HKV, S, D]))
        clone = _emit(graph, aten.clone.default, (exp,), {"memory_format": torch.contiguous_format})
        caches.append(_emit(graph, reshape_target, (clone, [B, HQ, S, D])))
    mask = None
    if with_mask:
        zero = _emit(graph, aten.full.default, ([], 0.0),
                     {"dtype": torch.bfloat16, "device": torch.device("cuda")})
        ninf = _emit(graph, aten.full.default, ([], float("-inf")),
                     {"dtype": torch.bfloat16, "device": torch.device("cuda")})
        mask = _emit(graph, aten.where.self, (ph["m"], zero, ninf))
    q, k, v = ph["q"], caches[0], caches[1]
    if sdpa_target in (aten._scaled_dot_product_cudnn_attention.default,
                       aten._scaled_dot_product_efficient_attention.default):
        call = _emit(graph, sdpa_target, (q, k, v, mask, False), {"scale": SCALE})
    elif sdpa_target is aten._scaled_dot_product_flash_attention.default:
        call = _emit(graph, sdpa_target, (q, k, v), {"scale": SCALE})
    else:
        call = _emit(graph, sdpa_target, (q, k, v, mask), {"scale": SCALE})
    out = _emit(graph, operator.getitem, (call, 0))
    graph.output((out,))
    return graph


@pytest.mark.parametrize(
    "target,with_mask",
    [
        (aten._scaled_dot_product_cudnn_attention.default, True),
        (aten._scaled_dot_product_efficient_attention.default, True),
        (aten._scaled_dot_product_flash_attention.default, False),
        (aten._scaled_dot_product_attention_math.default, True),
    ],
)
@pytest.mark.parametrize("reshape",
                         [aten.reshape.default, aten.view.default, aten._unsafe_view.default])
def test_cuda_sdpa_ops_and_view_forms(target, with_mask, reshape):
    graph = _cuda_graph(target, reshape, with_mask, cache_from_getitem=reshape is aten.view.default)
    rec = _Rec()
    GroupedDecodeFusion().apply(graph, rec)
    graph.eliminate_dead_code()
    assert len(rec.done) == 1 and rec.missed == []
    targets = [n.target for n in graph.nodes if n.op == "call_function"]
    assert OP in targets and target not in targets and aten.clone.default not in targets
    call = next(n for n in graph.nodes if n.target is OP)
    assert call.args[6] == SCALE
    assert (call.args[5] is not None) == with_mask
    # the op reads the cache itself, not a repeated copy
    assert call.args[1].op == "placeholder" or call.args[1].target is operator.getitem
