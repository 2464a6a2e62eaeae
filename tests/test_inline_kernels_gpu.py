"""Inlined kernel launches under Inductor on a CUDA GPU (``passes.inline_kernels``).

The compiled code must launch the ops' Triton kernels itself (no op call left), write
the KV caches in place (no clone or copy of a cache), and compute what the op calls
compute. Skipped without a GPU (CI is CPU-only); run on the device with ``pytest -m gpu``.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

TOL = {"atol": 2e-2, "rtol": 2e-2}
B, HQ, HKV, S, D = 2, 8, 2, 512, 64


@pytest.fixture(autouse=True)
def _fresh_compiles():
    from torch._inductor import config as inductor_config

    torch._dynamo.reset()
    with inductor_config.patch(fx_graph_cache=False):  # a cache hit runs no pass
        yield


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _layer(q, k, v, cos, sin, pos, k_cache, v_cache, mask):
    """One decode step as HF writes it: RoPE, index_copy_ into the static caches,
    repeat_kv + SDPA over the whole cache."""
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    k_cache.index_copy_(2, pos, k)
    v_cache.index_copy_(2, pos, v)
    rep = HQ // HKV
    keys = k_cache[:, :, None].expand(B, HKV, rep, S, D).reshape(B, HQ, S, D)
    vals = v_cache[:, :, None].expand(B, HKV, rep, S, D).reshape(B, HQ, S, D)
    return torch.nn.functional.scaled_dot_product_attention(q, keys, vals, attn_mask=mask) * 2


def _inputs(dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, device="cuda", dtype=dtype, generator=g)  # noqa: E731
    pos = torch.tensor([300], device="cuda")
    ang = pos[:, None].float() * torch.rand(D // 2, device="cuda", generator=g)
    emb = torch.cat((ang, ang), -1)[None, None]
    mask = (torch.arange(S, device="cuda") <= pos)[None, None, None, :].expand(B, 1, 1, S)
    return (r(B, HQ, 1, D), r(B, HKV, 1, D), r(B, HKV, 1, D), emb.cos().to(dtype), emb.sin().to(dtype),
            pos, r(B, HKV, S, D), r(B, HKV, S, D), mask)


@pytest.mark.parametrize("inline", [True, False])
def test_compiled_layer_launches_kernels_and_writes_caches_in_place(inline, monkeypatch):
    from torch._inductor.utils import run_and_get_code

    import attnfuse
    from attnfuse.passes import inline_kernels as ik

    decomposed = []
    real_decompose = ik.decompose_our_launches
    monkeypatch.setattr(ik, "decompose_our_launches", lambda g: decomposed.append(real_decompose(g)))

    args = _inputs(torch.bfloat16)
    want_args = [a.clone() for a in args]
    want = _layer(*want_args)
    backend = attnfuse.AttnfuseBackend({"inline_kernels": inline})
    ours_args = [a.clone() for a in args]
    out, (code,) = run_and_get_code(torch.compile(_layer, backend=backend), *ours_args)
    torch.testing.assert_close(out, want, **TOL)
    torch.testing.assert_close(ours_args[6], want_args[6], **TOL)  # k_cache written in place
    torch.testing.assert_close(ours_args[7], want_args[7], **TOL)
    assert backend.report.counts.get("rope_kv_write") == 1
    assert backend.report.counts.get("grouped_decode") == 1
    inlined = [g.inlined for g in backend.report.graphs]
    if inline:
        assert inlined == [{"inlined": 2}], inlined
        assert "torch.ops.attnfuse" not in code
        for kernel in ("_rope_write_kv_kernel", "_grouped_decode_stage1"):
            assert kernel in code, kernel
        # every launch (rope; decode stage 1, and stage 2 when split) decomposed directly
        assert sum(decomposed) >= 2, decomposed
    else:
        assert "torch.ops.attnfuse.rope_write_kv" in code
    # the caches are the graph's inputs, written by the kernel: never cloned or copied back
    assert "clone" not in code and ".copy_(" not in code, code


def test_inlined_decode_fresh_data_every_call():
    """The compiled module is reused across calls: each call must see its own inputs."""
    import attnfuse

    fn = torch.compile(_layer, backend=attnfuse.AttnfuseBackend())
    for seed in range(3):
        args = _inputs(torch.bfloat16, seed)
        want_args = [a.clone() for a in args]
        torch.testing.assert_close(fn(*args), _layer(*want_args), **TOL)


def test_our_kernels_start_compiling_during_code_generation(monkeypatch, tmp_path):
    """With Inductor's worker pool up, each of our kernels is submitted when code
    generation writes it; the module's own compile call then hits that submission:
    one more cache hit per kernel than the same cold compile without the early start."""
    from torch._dynamo.utils import counters
    from torch._inductor.async_compile import AsyncCompile

    import attnfuse
    from attnfuse.passes import inline_kernels

    from torch._inductor.async_compile import get_compile_threads

    if get_compile_threads() <= 1:
        pytest.skip("Inductor compiles in this process (no worker pool): nothing to start early")
    AsyncCompile.wait_pool_ready()  # as after a process's first compile
    assert AsyncCompile.use_process_pool()
    submitted = []
    real = inline_kernels._compile_early
    monkeypatch.setattr(inline_kernels, "_compile_early",
                        lambda code: (submitted.append(code), real(code)))
    hits = {}
    for early in ("0", "1"):
        torch._dynamo.reset()
        inline_kernels.forget_compiled_analyses()
        monkeypatch.setenv("ATTNFUSE_EARLY_COMPILE", early)
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / early / "inductor"))
        monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / early / "triton"))
        counters.clear()
        args = _inputs(torch.bfloat16, seed=5)
        want_args = [a.clone() for a in args]
        out = torch.compile(_layer, backend=attnfuse.AttnfuseBackend())(*args)
        torch.testing.assert_close(out, _layer(*want_args), **TOL)
        hits[early] = counters["inductor"]["async_compile_cache_hit"]
        if early == "0":
            assert submitted == []
    assert len(submitted) >= 2, submitted  # rope, decode (and its merge when it splits)
    assert all(inline_kernels.early_compile_call(c) is not None for c in submitted)
    assert hits["1"] - hits["0"] == len(submitted), hits
