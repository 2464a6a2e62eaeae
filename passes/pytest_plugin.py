"""pytest plugin (entry point ``pytest11``): the ``graph_diff`` fixture.

Installed with attnfuse, so a user's own test suite gets the fixture with no conftest:

    def test_fuses(graph_diff):
        d = graph_diff(model, *example_inputs)
        d.assert_fired(rope_kv_write=2, grouped_decode=2)

torch is imported only when the fixture is used, so unrelated test runs stay fast.
"""

from __future__ import annotations

import pytest


@pytest.fixture
def graph_diff():
    """``graph_diff(fn_or_module, *args, fusions=None, backend="inductor", **kwargs)``.

    See ``attnfuse.passes.testing.graph_diff``. Dynamo is reset before and after, so
    compiled code from other tests never leaks in.
    """
    from .testing import graph_diff as _graph_diff

    return _graph_diff
