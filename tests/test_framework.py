"""The framework itself, tested with a toy fusion (``silu_fusion.py``): backends, pass
manager, uuid and FX-cache behaviour, reports, explain, patch_model, graph diffs."""

from __future__ import annotations

import functools
import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from silu_fusion import SiluFusion, SiluModel
from torch._dynamo.utils import counters

import attnfuse
from attnfuse.passes.manager import PassManager
from attnfuse.passes.testing import graph_diff

HERE = os.path.dirname(os.path.abspath(__file__))
#: tolerance of the fused float32 graph against eager (one extra rounding of sigmoid*x)
F32_TOL = 1e-6


def _run_python(code: str, env: dict[str, str] | None = None) -> str:
    """Run ``code`` in a fresh interpreter with tests/ importable; return its stdout."""
    full_env = {**os.environ, "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", "")}
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=full_env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _inputs():
    torch.manual_seed(0)
    return SiluModel().eval(), torch.randn(4, 8)


# ------------------------------------------------------------------ backends
def test_backend_found_by_name_in_fresh_process():
    out = _run_python(
        """
        import sys, json, torch
        from torch._dynamo.utils import counters
        names = torch._dynamo.list_backends(exclude_tags=())
        imported_before = "attnfuse" in sys.modules
        def f(x):
            return x * torch.sigmoid(x)
        # no attnfuse import: the name resolves through the entry point
        y = torch.compile(f, backend="attnfuse", options={"fusions": []})(torch.randn(4))
        from silu_fusion import SiluFusion
        torch._dynamo.reset()
        y = torch.compile(f, backend="attnfuse_eager", options={"fusions": [SiluFusion()]})(torch.randn(4))
        print(json.dumps({"listed": "attnfuse" in names and "attnfuse_eager" in names,
                          "imported_before": imported_before,
                          "count": counters["attnfuse"]["silu_test"]}))
        """
    )
    res = json.loads(out.strip().splitlines()[-1])
    assert res == {"listed": True, "imported_before": False, "count": 1}


@pytest.mark.parametrize("backend", ["attnfuse", "attnfuse_eager"])
def test_backend_counts_and_numerics(backend):
    model, x = _inputs()
    with torch.no_grad(), attnfuse.collect_reports() as report:
        fast = torch.compile(model, backend=backend, options={"fusions": [SiluFusion()], "fx_graph_cache": False})
        got = fast(x)
        want = model(x)
    torch.testing.assert_close(got, want, atol=F32_TOL, rtol=F32_TOL)
    assert report.counts == {"silu_test": 2}
    assert counters["attnfuse"]["silu_test"] == 2
    assert [m.reason for m in report.near_misses] == ["sigmoid of another tensor"]
    # source locations come from node metadata: this file's model, by line
    assert all(s.location.startswith("silu_fusion.py:") for s in report.sites)
    assert {s.module for s in report.sites} == {""} or all(s.module for s in report.sites)


def _passes_args(fn):
    """A ``forward`` decorator whose wrapper takes ``*args``, as transformers' kwarg
    deprecation does: Dynamo then names the root module ``L['args'][0]``."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)
    return wrapper


class _Outer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = SiluModel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


class _DecoratedOuter(_Outer):
    @_passes_args
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


@pytest.mark.parametrize("cls", [_Outer, _DecoratedOuter], ids=["plain", "decorated"])
def test_report_module_paths_start_at_the_compiled_module(cls):
    torch.manual_seed(0)
    model, x = cls().eval(), torch.randn(4, 8)
    with torch.no_grad(), attnfuse.collect_reports() as report:
        torch.compile(model, backend="attnfuse_eager", options={"fusions": [SiluFusion()]})(x)
    assert report.counts == {"silu_test": 2}
    assert {s.module for s in report.sites} == {"inner"}
    assert {m.module for m in report.near_misses} == {"inner"}


@pytest.mark.parametrize("raw,clean", [
    ("L['self'].model.layers[0].self_attn", "model.layers[0].self_attn"),
    ("L['args'][0].model.layers.0.self_attn", "model.layers.0.self_attn"),
    ("L['self']._modules['model']._modules['layers']", "model.layers"),
    ("L['fn'].layers.1.attn", "layers.1.attn"),
    ("G['model'].decoder", "decoder"),
    ("L['self']", ""),
])
def test_module_path_spellings(raw, clean):
    from attnfuse.passes.report import _clean_module_path
    assert _clean_module_path(raw) == clean


def test_eager_backend_matches_pytorch_eager_without_fusions():
    model, x = _inputs()
    with torch.no_grad():
        got = torch.compile(model, backend="attnfuse_eager", options={"fusions": []})(x)
        want = model(x)
    torch.testing.assert_close(got, want, atol=F32_TOL, rtol=F32_TOL)


def test_mode_goes_through_options():
    model, x = _inputs()
    with torch.no_grad(), attnfuse.collect_reports() as report:
        torch.compile(model, backend="attnfuse",
                      options={"mode": "max-autotune-no-cudagraphs", "fusions": [SiluFusion()],
                               "fx_graph_cache": False})(x)
    assert report.counts == {"silu_test": 2}


def test_unknown_fusion_name_is_rejected():
    with pytest.raises(ValueError, match="unknown fusion 'rope_kv_wirte'"):
        attnfuse.AttnfuseBackend({"fusions": ["rope_kv_wirte"]})
    with pytest.raises(ValueError, match="fusions: expected a list"):
        attnfuse.AttnfuseBackend({"fusions": "rope_kv_write"})


def test_fusion_that_raises_leaves_graph_as_it_was():
    model, x = _inputs()
    d = graph_diff(model, x, fusions=[SiluFusion({"raise_inside": True})], backend="eager")
    assert d.before == d.after
    assert d.counts == {"silu_test": 0}
    assert "planted failure" in d.report.graphs[0].errors[0]
    with torch.no_grad():
        torch.testing.assert_close(d.outputs, model(x), atol=F32_TOL, rtol=F32_TOL)
    with pytest.raises(Exception, match="planted failure"):
        graph_diff(model, x, fusions=[SiluFusion({"raise_inside": True})], backend="eager",
                   options={"strict": True})


class _RaisingSilu(SiluFusion):
    name = "silu_raise"

    def __init__(self) -> None:
        super().__init__({"raise_inside": True})


class _Idle(SiluFusion):
    name = "idle"

    def apply(self, graph, sites) -> None:
        pass


@pytest.mark.parametrize("first", ["rewrites", "idle"])
def test_failure_restores_the_graph_as_the_previous_fusion_left_it(first):
    """A raising fusion undoes only itself: an earlier fusion's rewrites stay (its copy is
    taken after them), and after one that changed nothing the copy from before it serves."""
    model, x = _inputs()
    earlier = SiluFusion({}) if first == "rewrites" else _Idle({})
    d = graph_diff(model, x, fusions=[earlier, _RaisingSilu()], backend="eager")
    assert "planted failure" in d.report.graphs[0].errors[0]
    assert "tanh" not in d.after
    if first == "rewrites":
        assert d.counts == {"silu_test": 2, "silu_raise": 0}
        assert d.after.count("attnfuse_testing.silu") == 2
    else:
        assert d.before == d.after
    with torch.no_grad():
        torch.testing.assert_close(d.outputs, model(x), atol=F32_TOL, rtol=F32_TOL)


def test_composes_with_a_pass_already_installed():
    seen = []

    class UserPass(torch._inductor.custom_graph_pass.CustomGraphPass):
        def __call__(self, graph):
            seen.append(sum(1 for n in graph.nodes if n.op == "call_function"))

        def uuid(self):
            return "user-pass-v1"

    model, x = _inputs()
    with torch.no_grad(), attnfuse.collect_reports() as report:
        torch.compile(model, backend="attnfuse",
                      options={"fusions": [SiluFusion()], "fx_graph_cache": False,
                               "post_grad_custom_pre_pass": UserPass()})(x)
    assert report.counts == {"silu_test": 2}
    assert len(seen) == 1  # the user's pass ran, after ours


# ------------------------------------------------------------------ uuid and cache
_UUID_SNIPPET = """
    import attnfuse
    from silu_fusion import SiluFusion
    from attnfuse.fusions import fusion_names
    print(attnfuse.PassManager([SiluFusion()]).uuid())
    print(attnfuse.PassManager([SiluFusion({"threshold": 3})]).uuid())
    print(attnfuse.PassManager([SiluFusion()], strict=True).uuid())
"""


def test_uuid_is_stable_across_processes_and_changes_with_config():
    first = _run_python(_UUID_SNIPPET).split()
    second = _run_python(_UUID_SNIPPET).split()
    assert first == second
    assert len(set(first)) == 3  # options and strictness change it
    assert all(len(u) == 64 for u in first)
    # in-process value agrees with the fresh processes
    assert PassManager([SiluFusion()]).uuid() == first[0]


def test_uuid_is_none_only_for_an_unhashable_chained_pass():
    assert PassManager([SiluFusion()], chained=lambda g: None).uuid() is None
    assert PassManager([SiluFusion()]).uuid() is not None


def test_cache_hit_report_says_from_cache(tmp_path):
    code = """
        import json, torch, attnfuse
        from silu_fusion import SiluFusion, SiluModel
        torch.manual_seed(0)
        model, x = SiluModel().eval(), torch.randn(4, 8)
        with torch.no_grad(), attnfuse.collect_reports() as report:
            torch.compile(model, backend="attnfuse", options={"fusions": [SiluFusion()]})(x)
        print(json.dumps({"from_cache": report.from_cache, "counts": report.counts,
                          "table": report.table()}))
    """
    env = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    cold = json.loads(_run_python(code, env).strip().splitlines()[-1])
    warm = json.loads(_run_python(code, env).strip().splitlines()[-1])
    assert cold["from_cache"] == 0 and cold["counts"] == {"silu_test": 2}
    assert warm["from_cache"] == 1
    assert "from cache" in warm["table"]
    assert "silu_test=0" not in warm["table"]


# ------------------------------------------------------------------ graph diff
def test_graph_diff_shows_the_rewrite():
    model, x = _inputs()
    with torch.no_grad():
        d = graph_diff(model, x, fusions=[SiluFusion()], backend="eager")
    d.assert_fired(silu_test=2)
    with pytest.raises(AssertionError, match="expected no rewrites"):
        d.assert_not_fired("silu_test")
    with pytest.raises(AssertionError, match="expected {'silu_test': 1}"):
        d.assert_fired(silu_test=1)
    assert "attnfuse_testing.silu" in d.after and "attnfuse_testing.silu" not in d.before
    d.assertExpectedInline(d.summary(), """\
silu_test: 2
- aten.mul.Tensor x2
- aten.sigmoid x2
+ attnfuse_testing.silu x2""")


def test_graph_diff_fixture_and_inductor_code(graph_diff):
    model, x = _inputs()
    with torch.no_grad():
        d = graph_diff(model, x, fusions=[SiluFusion()])
        want = model(x)
    d.assert_fired(silu_test=2)
    assert "attnfuse_testing.silu" in d.code
    torch.testing.assert_close(d.outputs, want, atol=F32_TOL, rtol=F32_TOL)
    d.assertExpectedInline(d.diff, """\
@@ -7,11 +7,9 @@
 addmm: f32[4, 8] = aten.addmm(in1, in2, permute)
-sigmoid: f32[4, 8] = aten.sigmoid(addmm)
-mul: f32[4, 8] = aten.mul.Tensor(addmm, sigmoid)
+silu: f32[4, 8] = attnfuse_testing.silu(addmm)
 permute_1: f32[8, 8] = aten.permute(in3, [1, 0])
-addmm_1: f32[4, 8] = aten.addmm(in4, mul, permute_1)
-sigmoid_1: f32[4, 8] = aten.sigmoid(addmm_1)
-mul_1: f32[4, 8] = aten.mul.Tensor(addmm_1, sigmoid_1)
-sigmoid_2: f32[4, 8] = aten.sigmoid(addmm_1)
-mul_2: f32[4, 8] = aten.mul.Tensor(in2, sigmoid_2)
-add: f32[4, 8] = aten.add.Tensor(mul_1, mul_2)
+addmm_1: f32[4, 8] = aten.addmm(in4, silu, permute_1)
+silu_1: f32[4, 8] = attnfuse_testing.silu(addmm_1)
+sigmoid: f32[4, 8] = aten.sigmoid(addmm_1)
+mul: f32[4, 8] = aten.mul.Tensor(in2, sigmoid)
+add: f32[4, 8] = aten.add.Tensor(silu_1, mul)
 return (add,)""")


# ------------------------------------------------------------------ patch_model, explain
def test_patch_model_is_idempotent_and_unpatch_restores():
    model, x = _inputs()
    original_forward = model.forward
    same = attnfuse.patch_model(model, fusions=[SiluFusion], backend="attnfuse_eager")
    assert same is model and attnfuse.is_patched(model)
    patched_forward = model.forward
    attnfuse.patch_model(model, fusions=[SiluFusion], backend="attnfuse_eager")
    assert model.forward is patched_forward  # not wrapped twice
    with torch.no_grad():
        got = model(x)
    assert attnfuse.report_of(model).counts == {"silu_test": 2}
    attnfuse.unpatch_model(model)
    assert not attnfuse.is_patched(model) and "forward" not in model.__dict__
    assert model.forward == original_forward
    with torch.no_grad():
        torch.testing.assert_close(got, model(x), atol=F32_TOL, rtol=F32_TOL)
    with pytest.raises(ValueError, match="backend: expected one of"):
        attnfuse.patch_model(model, backend="inductor")
    with pytest.raises(ValueError, match="model: expected a torch.nn.Module"):
        attnfuse.patch_model(lambda x: x)


def test_explain_lists_sites_and_near_misses(caplog):
    model, x = _inputs()
    with caplog.at_level(logging.DEBUG, logger="attnfuse"), torch.no_grad():
        report = attnfuse.explain(model, x, fusions=[SiluFusion()])
    assert report.counts == {"silu_test": 2}
    assert len(report.near_misses) == 1
    text = str(report)
    assert "rewritten" in text and "near miss" in text and "sigmoid of another tensor" in text
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert any("silu_test=2" in m for m in info)
    assert any("sigmoid of another tensor" in m for m in debug)


def test_pass_manager_leaves_unfamiliar_graph_alone():
    gm = torch.fx.symbolic_trace(lambda x: torch.relu(x) + 1)
    before = gm.code
    pm = PassManager([SiluFusion()])
    pm(gm.graph)
    gm.recompile()
    assert pm.calls == 1 and gm.code == before
    with pytest.raises(ValueError, match="unknown fusion"):
        attnfuse.fusion_pass("no_such_fusion")


def test_pattern_fusion_base_rewrites_and_records_refusals():
    from silu_fusion import SiluPatternFusion

    model, x = _inputs()
    with torch.no_grad():
        d = graph_diff(model, x, fusions=[SiluPatternFusion()], backend="eager")
        torch.testing.assert_close(d.outputs, model(x), atol=F32_TOL, rtol=F32_TOL)
    d.assert_fired(silu_pattern_test=2)
    model64 = model.double()
    with torch.no_grad():
        d64 = graph_diff(model64, x.double(), fusions=[SiluPatternFusion()], backend="eager")
    d64.assert_not_fired("silu_pattern_test")
    assert {m.reason for m in d64.report.near_misses} == {"silu: float64 is not supported"}


def test_eager_backend_handles_random_ops():
    # Inductor's joint-graph passes rewrite random ops and need a fake mode in scope
    def noisy(x):
        return x + torch.randn(x.shape)

    out = torch.compile(noisy, backend="attnfuse_eager", options={"fusions": []})(torch.zeros(4))
    assert out.shape == (4,) and torch.isfinite(out).all() and out.abs().sum() > 0
