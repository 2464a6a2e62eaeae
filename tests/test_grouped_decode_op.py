"""``attnfuse::grouped_decode``: schema/fake/dispatch (opcheck), the plain-torch reference
against float64, the interpreted kernel through the op, and input validation."""

from __future__ import annotations

import pytest
import torch

from attnfuse.custom_ops.grouped_decode import grouped_decode, kernel_on_cpu, reference

OP = torch.ops.attnfuse.grouped_decode.default
F32_TOL = dict(atol=1e-5, rtol=1e-5)


def _float64_attention(q, k, v, visible, scale):
    """Attention written out per sequence and head in float64: the independent check."""
    batch, hq, _ = q.shape
    hkv = k.shape[1]
    out = torch.zeros(batch, hq, v.shape[-1], dtype=torch.float64)
    for b in range(batch):
        for h in range(hq):
            kv = h // (hq // hkv)
            keep = visible[b]
            if not keep.any():
                continue
            logits = (k[b, kv, keep].double() @ q[b, h].double()) * scale
            out[b, h] = torch.softmax(logits, 0) @ v[b, kv, keep].double()
    return out


def _static_args(batch=3, hq=8, hkv=2, cap=24, d=16, dtype=torch.float32):
    torch.manual_seed(0)
    q = torch.randn(batch, hq, d, dtype=dtype)
    k = torch.randn(batch, hkv, cap, d, dtype=dtype)
    v = torch.randn(batch, hkv, cap, d, dtype=dtype)
    return q, k, v


def test_reference_matches_float64_with_lengths_and_mask():
    q, k, v = _static_args()
    lens = torch.tensor([0, 5, 24])
    keep = torch.rand(3, 24) > 0.3
    out, lse = OP(q, k, v, None, lens, keep, 0.25, 0.0, -1, None, None, -1)
    visible = (torch.arange(24)[None] < lens[:, None]) & keep
    torch.testing.assert_close(out.double(), _float64_attention(q, k, v, visible, 0.25), **F32_TOL)
    assert (out[0] == 0).all() and (lse[0] == float("-inf")).all()
    assert torch.isfinite(lse[1:]).all()


def test_reference_paged_equals_static_layout():
    q, k, v = _static_args(batch=2, cap=32)
    page = 8
    # scatter the static cache into shuffled pages
    order = torch.randperm(8)
    table = order.view(2, 4).int()
    kp = torch.empty(8, page, 2, 16)
    vp = torch.empty(8, page, 2, 16)
    for b in range(2):
        for j in range(4):
            kp[table[b, j]] = k[b, :, j * page:(j + 1) * page].transpose(0, 1)
            vp[table[b, j]] = v[b, :, j * page:(j + 1) * page].transpose(0, 1)
    lens = torch.tensor([32, 13])
    static = OP(q, k, v, None, lens, None, 0.3, 0.0, -1, None, None, -1)
    paged = OP(q, kp, vp, table, lens, None, 0.3, 0.0, -1, None, None, -1)
    torch.testing.assert_close(paged, static)


def test_kernel_through_op_matches_reference():
    q, k, v = _static_args(dtype=torch.float16)
    mask = torch.where(torch.rand(3, 24) > 0.2, 0.0, float("-inf")).to(torch.float16)
    args = (q, k, v, None, torch.tensor([24, 1, 9], dtype=torch.int32), mask, 0.25, 0.0, -1,
            None, None, -1)
    ref_out, ref_lse = reference(*args)
    with kernel_on_cpu():
        out, lse = OP(*args)
    torch.testing.assert_close(out, ref_out, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)


def _opcheck_cases():
    q, k, v = _static_args()
    lens = torch.tensor([3, 0, 24])
    yield "static", (q, k, v, None, lens, None, 0.25, 0.0, -1, None, None, -1)
    yield "mask+softcap+window", (q, k, v, None, None, torch.rand(1, 24) > 0.5, 0.25, 2.0, 7,
                                  None, None, -1)
    kp, vp = k.reshape(18, 4, 2, 16), v.reshape(18, 4, 2, 16)
    table = torch.randperm(18).view(3, 6).int()
    yield "paged", (q, kp, vp, table, torch.tensor([8, 1, 24]), None, 0.25, 0.0, -1, None, None, -1)
    latent = torch.randn(3, 1, 24, 16)
    yield "mla", (q, latent, None, None, None, None, 0.25, 0.0, -1, None, None, 12)
    k8, v8 = k.to(torch.float8_e4m3fn), v.to(torch.float8_e5m2)
    yield "fp8", (q, k8, v8, None, None, None, 0.25, 0.0, -1, torch.tensor([0.5]),
                  torch.tensor([2.0]), -1)


@pytest.mark.parametrize("case", ["static", "mask+softcap+window", "paged", "mla", "fp8"])
def test_opcheck(case):
    args = dict(_opcheck_cases())[case]
    utils = ("test_schema", "test_autograd_registration", "test_faketensor",
             "test_aot_dispatch_dynamic")
    if case == "fp8":
        # test_schema perturbs the inputs with a multiply, which CPU fp8 does not implement
        utils = utils[1:]
    torch.library.opcheck(OP, args, test_utils=utils)


def test_mla_value_is_latent_prefix():
    torch.manual_seed(1)
    q = torch.randn(2, 16, 24)
    latent = torch.randn(2, 1, 10, 24)
    out = grouped_decode(q, latent, v_head_dim=16, scale=0.2)
    visible = torch.ones(2, 10, dtype=torch.bool)
    expected = _float64_attention(q, latent, latent[..., :16], visible, 0.2)
    assert out.shape == (2, 16, 16)
    torch.testing.assert_close(out.double(), expected, **F32_TOL)


def test_fp8_scales_dequantize_separately():
    q, k, v = _static_args()
    k8, v8 = k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn)
    ks, vs = torch.tensor([0.5]), torch.tensor([3.0])
    out = grouped_decode(q, k8, v8, k_scale=ks, v_scale=vs, scale=0.25)
    visible = torch.ones(3, 24, dtype=torch.bool)
    expected = _float64_attention(q, k8.double() * 0.5, v8.double() * 3.0, visible, 0.25)
    torch.testing.assert_close(out.double(), expected, **F32_TOL)


@pytest.mark.parametrize(
    "change,arg",
    [
        (lambda a: {**a, "q": a["q"][0]}, "q"),
        (lambda a: {**a, "k_cache": a["k_cache"][..., :8]}, "k_cache"),
        (lambda a: {**a, "k_cache": a["k_cache"][:, :1].expand(3, 3, 24, 16)}, "k_cache"),
        (lambda a: {**a, "v_cache": a["v_cache"][:2]}, "v_cache"),
        (lambda a: {**a, "v_cache": None}, "v_head_dim"),
        (lambda a: {**a, "seq_lens": torch.tensor([1.0, 2.0, 3.0])}, "seq_lens"),
        (lambda a: {**a, "mask": torch.ones(3, 23, dtype=torch.bool)}, "mask"),
        (lambda a: {**a, "mask": torch.ones(3, 24, dtype=torch.int32)}, "mask"),
        (lambda a: {**a, "k_cache": a["k_cache"].to(torch.float8_e4m3fn)}, "k_scale"),
        (lambda a: {**a, "k_scale": torch.tensor([1.0])}, "k_scale"),
        (lambda a: {**a, "scale": 0.0}, "scale"),
        (lambda a: {**a, "window": -2}, "window"),
        (lambda a: {**a, "block_table": torch.zeros(3, 2, dtype=torch.int32)}, "k_cache"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(change, arg):
    q, k, v = _static_args()
    base = dict(q=q, k_cache=k, v_cache=v, block_table=None, seq_lens=None, mask=None,
                scale=0.25, softcap=0.0, window=-1, k_scale=None, v_scale=None, v_head_dim=-1)
    a = change(base)
    with pytest.raises(ValueError, match=rf"^{arg}: expected"):
        OP(*a.values())


# ------------------------------------------------------------------ remembered calls
def _fresh_call(kind: str, seed: int):
    """One op call's arguments (fresh random data) of the given form."""
    g = torch.Generator().manual_seed(seed)
    b, hq, hkv, cap, d = 2, 8, 2, 80, 16
    q = torch.randn(b, hq, d, generator=g)
    if kind == "paged":
        kp, vp = torch.randn(20, 16, hkv, d, generator=g), torch.randn(20, 16, hkv, d, generator=g)
        table = torch.randperm(20, generator=g)[:16].view(b, 8).int()  # capacity 128
        lens = torch.randint(1, 129, (b,), generator=g, dtype=torch.int32)
        return (q, kp, vp, table, lens, None, 0.3, 0.0, -1, None, None, -1)
    k, v = torch.randn(b, hkv, cap, d, generator=g), torch.randn(b, hkv, cap, d, generator=g)
    if kind == "bool_mask":
        return (q, k, v, None, None, torch.rand(b, cap, generator=g) > 0.3, 0.3, 0.0, -1,
                None, None, -1)
    # MLA: V is the leading 12 features of the shared latent row
    return (q, k[:, :1].contiguous(), None, None, None, None, 0.3, 0.0, -1, None, None, 12)


@pytest.mark.parametrize("kind", ["paged", "bool_mask", "mla"])
def test_remembered_call_uses_each_calls_tensors(kind):
    """The second call of a signature takes the remembered launches: it must read that
    call's tensors (fresh data) and return fresh outputs, not the first call's."""
    from attnfuse.custom_ops import grouped_decode as gd

    gd._PLANS.clear()
    results = []
    for seed in (1, 2):
        args = _fresh_call(kind, seed)
        with kernel_on_cpu():
            out, lse = OP(*args)
        want_out, want_lse = reference(*args)
        torch.testing.assert_close(out, want_out, **F32_TOL)
        torch.testing.assert_close(lse, want_lse, **F32_TOL)
        results.append(out)
        assert len(gd._PLANS) == 1 and gd._signature(*args) in gd._PLANS
    assert results[0].data_ptr() != results[1].data_ptr()
    plan = next(iter(gd._PLANS.values()))
    assert plan is not None and len(plan.launches) >= 1


def test_remembered_call_with_splits_allocates_its_scratch():
    """A split call's plan repeats its scratch buffers and both launches."""
    from attnfuse.custom_ops import grouped_decode as gd
    from attnfuse.custom_ops.kernels.grouped_decode import decode_settings

    args = _fresh_call("paged", 3)
    cfg = decode_settings(batch=2, num_kv_heads=2, group_size=4, head_dim_k=16, capacity=128,
                          device=torch.device("cpu"))
    assert cfg.num_kv_splits > 1  # the interpreter's SM count makes this call split
    gd._PLANS.clear()
    with kernel_on_cpu():
        OP(*args)
        plan = gd._PLANS[gd._signature(*args)]
        assert len(plan.launches) == 2 and len(plan.allocations) >= 4  # out, lse, partials
        args2 = _fresh_call("paged", 4)
        out, lse = OP(*args2)
    torch.testing.assert_close(out, reference(*args2)[0], **F32_TOL)
    torch.testing.assert_close(lse, reference(*args2)[1], **F32_TOL)


def test_signature_tells_strides_and_scalars_apart():
    from attnfuse.custom_ops import grouped_decode as gd

    gd._PLANS.clear()
    args = list(_fresh_call("bool_mask", 5))
    with kernel_on_cpu():
        OP(*args)
        args[6] = 0.5  # another scale: planned anew (the scale is a kernel argument)
        assert gd._signature(*args) not in gd._PLANS
        out, _ = OP(*args)
        torch.testing.assert_close(out, reference(*args)[0], **F32_TOL)
        k = args[1]
        args[1] = k.transpose(0, 1).contiguous().transpose(0, 1)  # same shape, other strides
        assert gd._signature(*args) not in gd._PLANS
        out, _ = OP(*args)
    torch.testing.assert_close(out, reference(*args)[0], **F32_TOL)
    assert len(gd._PLANS) == 3


def test_bad_input_is_never_remembered():
    from attnfuse.custom_ops import grouped_decode as gd

    gd._PLANS.clear()
    args = list(_fresh_call("paged", 6))
    args[6] = -1.0
    for _ in range(2):
        with kernel_on_cpu(), pytest.raises(ValueError, match="scale"):
            OP(*args)
    assert not gd._PLANS
