"""Direct dispatch of the ops (``custom_ops._dispatch.register_direct_kernels``): an
ordinary call reaches the op's body through one Python kernel, and everything else
(gradients, fake tensors, functionalization, inference mode) behaves as torch's
generic custom-op kernels make it behave."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from attnfuse.custom_ops import _dispatch
from attnfuse.custom_ops import grouped_decode as gd
from attnfuse.custom_ops import mla_prefill as mp
from attnfuse.custom_ops import rope_write_kv as rw

_calls: list[str] = []


def _probe_body(x: torch.Tensor, buf: torch.Tensor, scale: float) -> torch.Tensor:
    _calls.append("body")
    buf.add_(1)
    return x * scale


_probe = torch.library.custom_op("attnfuse_test::probe", _probe_body, mutates_args=("buf",))


@_probe.register_fake
def _(x, buf, scale):
    return torch.empty_like(x)


_DIRECT = _dispatch.register_direct_kernels(_probe, _probe_body, mutated=("buf",))


def _rope_args(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, 8, generator=g, dtype=dtype)
    k = torch.randn(3, 2, 8, generator=g, dtype=dtype)
    v = torch.randn(3, 2, 8, generator=g, dtype=dtype)
    cos = torch.randn(3, 8, generator=g, dtype=dtype)
    sin = torch.randn(3, 8, generator=g, dtype=dtype)
    k_cache = torch.randn(6, 2, 8, generator=g, dtype=dtype)
    v_cache = torch.randn(6, 2, 8, generator=g, dtype=dtype)
    slots = torch.tensor([4, -1, 0])
    return [q, k, v, cos, sin, None, k_cache, v_cache, slots, "flat", 8, "neox", None, None, False]


@pytest.mark.parametrize("op", ["attnfuse_test::probe", "attnfuse::rope_write_kv",
                                "attnfuse::grouped_decode", "attnfuse::mla_prefill"])
def test_every_op_registers_direct_kernels(op):
    assert _DIRECT and rw.DIRECT_DISPATCH and gd.DIRECT_DISPATCH and mp.DIRECT_DISPATCH
    for key in ("CPU", "CUDA", "AutogradCPU", "AutogradCUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, key), key


@pytest.mark.parametrize("mode", ["plain", "no_grad", "inference_mode"])
def test_plain_call_runs_body_once_and_bumps_versions(mode):
    x, buf = torch.randn(4), torch.zeros(2)
    ctx = {"plain": torch.enable_grad, "no_grad": torch.no_grad,
           "inference_mode": torch.inference_mode}[mode]
    _calls.clear()
    v0 = buf._version
    with ctx():
        out = torch.ops.attnfuse_test.probe(x, buf, 2.0)
    assert _calls == ["body"]
    assert buf._version > v0  # the mutation is visible to autograd's version checks
    torch.testing.assert_close(out, x * 2.0)
    torch.testing.assert_close(buf, torch.ones(2))
    assert out.grad_fn is None


def test_inputs_requiring_grad_take_the_generic_autograd_kernel():
    x = torch.randn(4, requires_grad=True)
    out = torch.ops.attnfuse_test.probe(x, torch.zeros(2), 2.0)
    # custom_op's autograd kernel: a graph node whose backward says none is registered
    assert out.requires_grad and type(out.grad_fn).__name__.startswith("GeneratedBackwardFor")
    with pytest.raises(RuntimeError, match="no autograd formula"):
        out.sum().backward()
    out = torch.ops.attnfuse.rope_write_kv(*[
        a.requires_grad_() if isinstance(a, torch.Tensor) and i < 3 else a
        for i, a in enumerate(_rope_args())])[0]
    assert out.requires_grad


def test_fake_tensors_reach_the_fake_impl():
    _calls.clear()
    with FakeTensorMode():
        x, buf = torch.empty(4), torch.empty(2)
        out = torch.ops.attnfuse_test.probe(x, buf, 2.0)
        q_rot, k_rot = torch.ops.attnfuse.rope_write_kv(*_rope_args())
    assert _calls == []
    assert out.shape == (4,) and q_rot.shape == (3, 4, 8) and k_rot.numel() == 0


def test_compiled_call_matches_eager():
    """aot_eager traces the op with functional fake tensors (generic path), then runs it
    on plain tensors (direct path)."""
    def step(*args):
        q_rot, _ = torch.ops.attnfuse.rope_write_kv(*args)
        return q_rot * 2

    torch._dynamo.reset()
    eager_args, compiled_args = _rope_args(), _rope_args()
    want = step(*eager_args)
    got = torch.compile(step, backend="aot_eager", fullgraph=True)(*compiled_args)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(compiled_args[6], eager_args[6])  # caches updated in place
    torch.testing.assert_close(compiled_args[7], eager_args[7])


def test_direct_and_generic_paths_agree_on_every_op():
    args = _rope_args()
    ref_args = _rope_args()
    got = torch.ops.attnfuse.rope_write_kv(*args)
    want = rw.reference(*ref_args)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(args[6], ref_args[6])
    torch.testing.assert_close(args[7], ref_args[7])


def test_switch_off(monkeypatch):
    monkeypatch.setenv("ATTNFUSE_DIRECT_DISPATCH", "0")

    def body(x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    op = torch.library.custom_op("attnfuse_test::switched_off", body, mutates_args=())
    assert not _dispatch.register_direct_kernels(op, body)
    torch.testing.assert_close(torch.ops.attnfuse_test.switched_off(torch.ones(2)), torch.ones(2))
